//! Drawing a token from logits as an SQL function.

use pg_llm_engine::sample::{rng_from_seed, sample, SamplingParams};
use pg_llm_engine::tensor;
use pg_llm_engine::EngineError;
use pgrx::prelude::*;

use super::args::{finite, logits as logits_arg, required};
use crate::errors::run;

/// One draw from softmax(logits / temperature) after top-k and top-p filtering; temperature 0
/// is argmax. With `vocab` given, logits may be [T, vocab] (as `llm_logits` returns) and the
/// last row is used. A `seed` makes the draw reproducible.
#[pg_extern(volatile, parallel_safe)]
fn pg_llm_sample(
    logits: Option<&[u8]>,
    temperature: Option<f32>,
    topk: Option<i32>,
    topp: Option<f32>,
    seed: default!(Option<i64>, "NULL"),
    vocab: default!(Option<i32>, "NULL"),
) -> i32 {
    run("pg_llm_sample", || {
        let params = SamplingParams::new(
            finite(temperature, "temperature")?,
            required(topk, "topk")? as i64,
            finite(topp, "topp")?,
        )?;
        let all = logits_arg(logits, "logits")?;
        let row = match vocab {
            None => &all[..],
            Some(v) => {
                let v = tensor::dim(v as i64, "vocab")?;
                if all.is_empty() || all.len() % v != 0 {
                    return Err(EngineError::invalid(format!(
                        "logits have {} values, which is not a whole, non-zero number of rows of vocab = {v}",
                        all.len()
                    )));
                }
                &all[all.len() - v..]
            }
        };
        Ok(sample(row, params, &mut rng_from_seed(seed))? as i32)
    })
}
