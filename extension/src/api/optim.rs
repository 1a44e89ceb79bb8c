//! AdamW, gradient clipping and the learning-rate schedule as SQL functions.

use pg_llm_engine::optim::{self, AdamW};
use pg_llm_engine::EngineError;
use pgrx::prelude::*;

use super::args::{finite, required, tensor};
use super::float32_bytea::Float32Bytea;
use crate::errors::run;

/// One AdamW step (bias-corrected, decoupled weight decay); `step` counts from 1.
#[pg_extern(immutable, parallel_safe)]
#[allow(clippy::too_many_arguments)]
fn pg_llm_adamw_step(
    weight: Option<&[u8]>,
    grad: Option<&[u8]>,
    m: Option<&[u8]>,
    v: Option<&[u8]>,
    lr: Option<f32>,
    beta1: Option<f32>,
    beta2: Option<f32>,
    eps: Option<f32>,
    weight_decay: Option<f32>,
    step: Option<i32>,
) -> pgrx::composite_type!('static, "adamw_state") {
    let (w, m, v) = run("pg_llm_adamw_step", || {
        let opt = AdamW {
            lr: finite(lr, "lr")?,
            beta1: finite(beta1, "beta1")?,
            beta2: finite(beta2, "beta2")?,
            eps: finite(eps, "eps")?,
            weight_decay: finite(weight_decay, "weight_decay")?,
        };
        // The step updates w, m and v: owned copies of them.
        let (mut w, g) = (
            tensor(weight, "weight")?.into_owned(),
            tensor(grad, "grad")?,
        );
        let (mut m, mut v) = (tensor(m, "m")?.into_owned(), tensor(v, "v")?.into_owned());
        if v.iter().any(|x| *x < 0.0) {
            return Err(EngineError::data(
                "v (the second moment) must not be negative",
            ));
        }
        // The engine checks w, m and v (22003 when one leaves float32's range).
        opt.step(
            &mut w,
            &g,
            &mut m,
            &mut v,
            required(step, "step")? as i64,
            crate::errors::cancel(),
        )?;
        Ok((w, m, v))
    });
    let mut t = PgHeapTuple::new_composite_type("adamw_state").expect("type adamw_state");
    t.set_by_name("weight", Float32Bytea::from(w))
        .expect("weight");
    t.set_by_name("m", Float32Bytea::from(m)).expect("m");
    t.set_by_name("v", Float32Bytea::from(v)).expect("v");
    t
}

/// Scales grad so its L2 norm is at most `clip`.
#[pg_extern(immutable, parallel_safe)]
fn pg_llm_grad_clip(grad: Option<&[u8]>, clip: Option<f32>) -> Float32Bytea {
    run("pg_llm_grad_clip", || {
        let mut g = tensor(grad, "grad")?.into_owned();
        optim::clip_grad_norm(&mut g, finite(clip, "clip")?)?;
        Ok(Float32Bytea::from(g))
    })
}

/// L2 norm of a tensor (to log gradient norms).
#[pg_extern(immutable, parallel_safe)]
fn pg_llm_norm(a: Option<&[u8]>) -> f64 {
    run("pg_llm_norm", || Ok(optim::grad_norm(&tensor(a, "a")?)))
}

/// GPT-3 schedule: linear warmup over `warmup` steps, cosine decay to min_ratio·lr_max at
/// `total`, constant after. Steps count from 1 (step 0 gives 0 during warmup).
#[pg_extern(immutable, parallel_safe)]
fn pg_llm_lr_schedule(
    step: Option<i32>,
    warmup: Option<i32>,
    total: Option<i32>,
    lr_max: Option<f32>,
    min_ratio: default!(Option<f32>, 0.1),
) -> f32 {
    run("pg_llm_lr_schedule", || {
        optim::lr_schedule(
            required(step, "step")? as i64,
            required(warmup, "warmup")? as i64,
            required(total, "total")? as i64,
            finite(lr_max, "lr_max")?,
            finite(min_ratio, "min_ratio")?,
        )
    })
}
