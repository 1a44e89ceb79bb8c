//! The kernels a model's forward needs when composed in SQL (`llm_forward_gpt3`): linear
//! layers in the stored [out, in] layout (no transposed copies of weights), embedding lookup,
//! and causal attention with GPT-3's locally banded layers. Each has its backward.

use pg_llm_engine::kernels::attention::{
    causal_attention, causal_attention_backward, AttnOptions, AttnShape,
};
use pg_llm_engine::kernels::embedding::{embedding, embedding_backward};
use pg_llm_engine::kernels::linear::{bias_backward, linear_backward, linear_into};
use pg_llm_engine::kernels::matmul::Accumulate::Overwrite;
use pg_llm_engine::tape::Op;
use pg_llm_engine::{tensor, EngineError, Result};
use std::borrow::Cow;

use pgrx::prelude::*;

use super::args::{dim, operand_exact, required, tensor as tensor_arg, tensor_exact};
use super::float32_bytea::Float32Bytea;
use crate::errors::{cancel, run};
use crate::tape;

struct LinearArgs<'a> {
    x: Cow<'a, [f32]>,
    w: Cow<'a, [f32]>,
    rows: usize,
    d_in: usize,
    d_out: usize,
}

fn linear_args<'a>(
    x: Option<&'a [u8]>,
    w: Option<&'a [u8]>,
    rows: Option<i32>,
    d_in: Option<i32>,
    d_out: Option<i32>,
    view: impl Fn(Option<&'a [u8]>, &str, usize, &str) -> Result<Cow<'a, [f32]>>,
) -> Result<LinearArgs<'a>> {
    let (rows, d_in, d_out) = (dim(rows, "rows")?, dim(d_in, "d_in")?, dim(d_out, "d_out")?);
    let x_len = tensor::numel(&[rows, d_in], "x")?;
    let w_len = tensor::numel(&[d_out, d_in], "w")?;
    Ok(LinearArgs {
        x: view(x, "x", x_len, &format!("[rows={rows}, d_in={d_in}]"))?,
        w: view(w, "w", w_len, &format!("[d_out={d_out}, d_in={d_in}]"))?,
        rows,
        d_in,
        d_out,
    })
}

/// y [rows, d_out] = x [rows, d_in] · wᵀ + b, with w [d_out, d_in] as `llm_param` stores it
/// (PyTorch's `Linear`); b NULL = no bias. A tied head is `pg_llm_linear(h, wte, NULL, …)`.
#[pg_extern(immutable, parallel_safe)]
fn pg_llm_linear(
    x: Option<&[u8]>,
    w: Option<&[u8]>,
    b: Option<&[u8]>,
    rows: Option<i32>,
    d_in: Option<i32>,
    d_out: Option<i32>,
) -> Float32Bytea {
    run("pg_llm_linear", || {
        let a = linear_args(x, w, rows, d_in, d_out, operand_exact)?;
        let b = b
            .map(|b| operand_exact(Some(b), "b", a.d_out, &format!("[d_out={}]", a.d_out)))
            .transpose()?;
        let dims = (a.rows, a.d_in, a.d_out);
        let len = tensor::numel(&[a.rows, a.d_out], "pg_llm_linear result")?;
        Float32Bytea::overwritten(len, |y| {
            // A non-finite result is traced to a non-finite operand (22000) where there is one.
            let product = linear_into(y, &a.x, &a.w, b.as_deref(), dims, Overwrite, cancel())
                .and_then(|()| tensor::check_result(y, "pg_llm_linear"));
            let mut operands = vec![(&*a.x, "x"), (&*a.w, "w")];
            operands.extend(b.as_deref().map(|b| (b, "b")));
            tensor::blame_operands(product, len, &operands)?;
            let op = Op::Linear {
                t: a.rows,
                d_in: a.d_in,
                d_out: a.d_out,
            };
            let shape = vec![a.rows, a.d_out];
            match &b {
                Some(b) => tape::record(op, &[&a.x, &a.w, b], y, shape),
                None => tape::record(op, &[&a.x, &a.w], y, shape),
            }
        })
    })
}

/// Gradients of `pg_llm_linear` given dL/dy: `linear_grads(dx, dw, db)`.
#[pg_extern(immutable, parallel_safe)]
fn pg_llm_linear_backward(
    x: Option<&[u8]>,
    w: Option<&[u8]>,
    dy: Option<&[u8]>,
    rows: Option<i32>,
    d_in: Option<i32>,
    d_out: Option<i32>,
) -> pgrx::composite_type!('static, "linear_grads") {
    let (dx, dw, db) = run("pg_llm_linear_backward", || {
        let a = linear_args(x, w, rows, d_in, d_out, tensor_exact)?;
        let dy_len = a.rows * a.d_out;
        let dy = tensor_exact(
            dy,
            "dy",
            dy_len,
            &format!("[rows={}, d_out={}]", a.rows, a.d_out),
        )?;
        let mut dx = tensor::alloc_zeroed(a.rows * a.d_in)?;
        let mut dw = tensor::alloc_zeroed(a.d_out * a.d_in)?;
        let mut db = vec![0.0; a.d_out];
        pgrx::check_for_interrupts!();
        linear_backward(
            Some(&mut dx),
            &mut dw,
            &a.x,
            &a.w,
            &dy,
            (a.rows, a.d_in, a.d_out),
        );
        bias_backward(&mut db, &dy, a.d_out);
        tensor::check_result(&dw, "dw")?;
        Ok((dx, dw, db))
    });
    let mut t = PgHeapTuple::new_composite_type("linear_grads").expect("type linear_grads");
    t.set_by_name("dx", Float32Bytea::from(dx)).expect("dx");
    t.set_by_name("dw", Float32Bytea::from(dw)).expect("dw");
    t.set_by_name("db", Float32Bytea::from(db)).expect("db");
    t
}

fn ids_arg(ids: Option<Vec<Option<i32>>>) -> Result<Vec<i64>> {
    let ids = required(ids, "ids")?;
    if ids.is_empty() {
        return Err(EngineError::invalid("ids must not be empty"));
    }
    ids.into_iter()
        .map(|i| Ok(required(i, "an element of ids")? as i64))
        .collect()
}

/// Rows `ids` of a [rows, cols] table: [len(ids), cols] (token and position embeddings).
#[pg_extern(immutable, parallel_safe)]
fn pg_llm_embedding(
    weight: Option<&[u8]>,
    ids: Option<Vec<Option<i32>>>,
    cols: Option<i32>,
) -> Float32Bytea {
    run("pg_llm_embedding", || {
        let (table, ids, cols) = (
            tensor_arg(weight, "weight")?,
            ids_arg(ids)?,
            dim(cols, "cols")?,
        );
        let y = embedding(&table, &ids, cols)?;
        let shape = vec![ids.len(), cols];
        tape::record(Op::Embedding { ids, cols }, &[&table], &y, shape)?;
        Ok(Float32Bytea::from(y))
    })
}

/// Gradient of `pg_llm_embedding` with respect to the [rows, cols] table.
#[pg_extern(immutable, parallel_safe)]
fn pg_llm_embedding_backward(
    dy: Option<&[u8]>,
    ids: Option<Vec<Option<i32>>>,
    rows: Option<i32>,
    cols: Option<i32>,
) -> Float32Bytea {
    run("pg_llm_embedding_backward", || {
        let ids = ids_arg(ids)?;
        let (rows, cols) = (dim(rows, "rows")?, dim(cols, "cols")?);
        Ok(Float32Bytea::from(embedding_backward(
            &tensor_arg(dy, "dy")?,
            &ids,
            rows,
            cols,
        )?))
    })
}

struct AttnArgs<'a> {
    q: Cow<'a, [f32]>,
    k: Cow<'a, [f32]>,
    v: Cow<'a, [f32]>,
    shape: AttnShape,
    opts: AttnOptions,
}

#[allow(clippy::too_many_arguments)]
fn attn_args<'a>(
    q: Option<&'a [u8]>,
    k: Option<&'a [u8]>,
    v: Option<&'a [u8]>,
    n_head: Option<i32>,
    t: Option<i32>,
    window: Option<i32>,
    scale: Option<bool>,
) -> Result<AttnArgs<'a>> {
    let (n_head, t) = (dim(n_head, "n_head")?, dim(t, "T")?);
    let q = tensor_arg(q, "q")?;
    let width = q.len() / t;
    if width == 0 || q.len() != t * width || width % n_head != 0 {
        return Err(EngineError::invalid(format!(
            "q has {} values, which is not [T={t}, n_head={n_head} × d_head]",
            q.len()
        )));
    }
    let shape_str = format!("[T={t}, {width}]");
    let window = window.map(|w| dim(Some(w), "window")).transpose()?;
    Ok(AttnArgs {
        k: tensor_exact(k, "k", q.len(), &shape_str)?,
        v: tensor_exact(v, "v", q.len(), &shape_str)?,
        q,
        shape: AttnShape {
            t,
            n_head,
            d_head: width / n_head,
        },
        opts: AttnOptions {
            window,
            scale: required(scale, "scale")?,
        },
    })
}

/// Causal multi-head attention of q, k, v [T, n_head·d_head] (the outputs of the three
/// projections): softmax(q·kᵀ/√d_head + causal mask)·v per head. `window` = a locally banded
/// layer (query i sees keys i−window < j ≤ i); `scale` false = no 1/√d_head (GPT-Neo).
#[pg_extern(immutable, parallel_safe)]
fn pg_llm_causal_attention(
    q: Option<&[u8]>,
    k: Option<&[u8]>,
    v: Option<&[u8]>,
    n_head: Option<i32>,
    t: Option<i32>,
    window: default!(Option<i32>, "NULL"),
    scale: default!(Option<bool>, true),
) -> Float32Bytea {
    run("pg_llm_causal_attention", || {
        let a = attn_args(q, k, v, n_head, t, window, scale)?;
        let y = causal_attention(&a.q, &a.k, &a.v, a.shape, a.opts, cancel())?;
        let shape = vec![a.shape.t, a.q.len() / a.shape.t];
        let op = Op::CausalAttention {
            shape: a.shape,
            opts: a.opts,
        };
        tape::record(op, &[&a.q, &a.k, &a.v], &y, shape)?;
        Ok(Float32Bytea::from(y))
    })
}

/// Gradients of `pg_llm_causal_attention` given dL/dout: `attention_qkv_grads(dq, dk, dv)`.
#[pg_extern(immutable, parallel_safe)]
#[allow(clippy::too_many_arguments)]
fn pg_llm_causal_attention_backward(
    q: Option<&[u8]>,
    k: Option<&[u8]>,
    v: Option<&[u8]>,
    grad_output: Option<&[u8]>,
    n_head: Option<i32>,
    t: Option<i32>,
    window: default!(Option<i32>, "NULL"),
    scale: default!(Option<bool>, true),
) -> pgrx::composite_type!('static, "attention_qkv_grads") {
    let [dq, dk, dv] = run("pg_llm_causal_attention_backward", || {
        let a = attn_args(q, k, v, n_head, t, window, scale)?;
        let dy = tensor_exact(grad_output, "grad_output", a.q.len(), "the shape of q")?;
        causal_attention_backward(&a.q, &a.k, &a.v, &dy, a.shape, a.opts, cancel())
    });
    let mut t =
        PgHeapTuple::new_composite_type("attention_qkv_grads").expect("type attention_qkv_grads");
    t.set_by_name("dq", Float32Bytea::from(dq)).expect("dq");
    t.set_by_name("dk", Float32Bytea::from(dk)).expect("dk");
    t.set_by_name("dv", Float32Bytea::from(dv)).expect("dv");
    t
}
