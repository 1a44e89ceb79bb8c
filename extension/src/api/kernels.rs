//! Tensor kernels as SQL functions (names and argument order kept from pg_gpt2).

use pg_llm_engine::kernels::attention::{
    attention_block_backward, attention_block_forward, AttnBlockWeights,
};
use pg_llm_engine::kernels::{cross_entropy, dropout, elementwise, layernorm, matmul, softmax};
use pg_llm_engine::tape::Op;
use pg_llm_engine::{sample::rng_from_seed, tensor, EngineError};
use std::borrow::Cow;

use pgrx::prelude::*;

use super::args::{
    dim, finite, logits as logits_arg, operand_exact, required, tensor, tensor_exact,
};
use super::float32_bytea::Float32Bytea;
use crate::errors::{cancel, run};
use crate::tape;

/// [m, k] · [k, n] → [m, n].
#[pg_extern(immutable, parallel_safe)]
fn pg_llm_matmul(
    a: Option<&[u8]>,
    b: Option<&[u8]>,
    m: Option<i32>,
    k: Option<i32>,
    n: Option<i32>,
) -> Float32Bytea {
    run("pg_llm_matmul", || {
        let (m, k, n) = (dim(m, "m")?, dim(k, "k")?, dim(n, "n")?);
        let a_len = tensor::numel(&[m, k], "a")?;
        let b_len = tensor::numel(&[k, n], "b")?;
        let a = operand_exact(a, "a", a_len, &format!("[m={m}, k={k}]"))?;
        let b = operand_exact(b, "b", b_len, &format!("[k={k}, n={n}]"))?;
        let len = tensor::numel(&[m, n], "matmul result")?;
        // Computed in the result value; matmul checks it (22003 beyond float32's range), and a
        // non-finite result is traced to a non-finite operand (22000) where there is one.
        Float32Bytea::overwritten(len, |y| {
            let product = matmul::matmul_into(y, &a, &b, m, k, n, cancel());
            tensor::blame_operands(product, len, &[(&a, "a"), (&b, "b")])?;
            tape::record(Op::MatMul { m, k, n }, &[&a, &b], y, vec![m, n])
        })
    })
}

/// a + b, or a + bias broadcast over rows when len(b) divides len(a).
#[pg_extern(immutable, parallel_safe)]
fn pg_llm_add(a: Option<&[u8]>, b: Option<&[u8]>) -> Float32Bytea {
    run("pg_llm_add", || {
        let (a, b) = (tensor(a, "a")?, tensor(b, "b")?);
        Float32Bytea::computed(a.len(), cancel(), |y| {
            elementwise::add_into(y, &a, &b)?;
            tape::record(Op::Add, &[&a, &b], y, vec![y.len()])
        })
    })
}

/// GELU, GPT-2's tanh approximation.
#[pg_extern(immutable, parallel_safe)]
fn pg_llm_gelu(a: Option<&[u8]>) -> Float32Bytea {
    run("pg_llm_gelu", || {
        let a = tensor(a, "a")?;
        Float32Bytea::computed(a.len(), cancel(), |y| {
            elementwise::gelu_forward_into(y, &a)?;
            tape::record(Op::Gelu, &[&a], y, vec![y.len()])
        })
    })
}

/// dL/dx of GELU given its input x and dL/dy.
#[pg_extern(immutable, parallel_safe)]
fn pg_llm_gelu_backward(x: Option<&[u8]>, dy: Option<&[u8]>) -> Float32Bytea {
    run("pg_llm_gelu_backward", || {
        Ok(Float32Bytea::from(elementwise::gelu_backward(
            &tensor(x, "x")?,
            &tensor(dy, "dy")?,
        )?))
    })
}

fn cols_or_all(cols: Option<i32>, len: usize) -> pg_llm_engine::Result<usize> {
    match cols {
        None => Ok(len.max(1)),
        Some(c) => tensor::dim(c as i64, "cols"),
    }
}

fn softmax_recorded(a: Option<&[u8]>, cols: Option<i32>) -> pg_llm_engine::Result<Float32Bytea> {
    let a = logits_arg(a, "a")?;
    let cols = cols_or_all(cols, a.len())?;
    Float32Bytea::computed(a.len(), cancel(), |y| {
        softmax::softmax_forward_into(y, &a, cols)?;
        tape::record(Op::Softmax { cols }, &[&a], y, vec![y.len() / cols, cols])
    })
}

/// Softmax over the whole vector (pg_gpt2 semantics).
#[pg_extern(immutable, parallel_safe)]
fn pg_llm_softmax(a: Option<&[u8]>) -> Float32Bytea {
    run("pg_llm_softmax", || softmax_recorded(a, None))
}

/// Softmax of each row of a [rows, cols] matrix.
#[pg_extern(immutable, parallel_safe, name = "pg_llm_softmax")]
fn pg_llm_softmax_rows(a: Option<&[u8]>, cols: Option<i32>) -> Float32Bytea {
    run("pg_llm_softmax", || {
        softmax_recorded(a, Some(required(cols, "cols")?))
    })
}

/// dL/dx of the whole-vector softmax given its output y and dL/dy.
#[pg_extern(immutable, parallel_safe)]
fn pg_llm_softmax_backward(y: Option<&[u8]>, dy: Option<&[u8]>) -> Float32Bytea {
    run("pg_llm_softmax_backward", || {
        let y = tensor(y, "y")?;
        Ok(Float32Bytea::from(softmax::softmax_backward(
            &y,
            &tensor(dy, "dy")?,
            cols_or_all(None, y.len())?,
        )?))
    })
}

/// Row-wise softmax backward.
#[pg_extern(immutable, parallel_safe, name = "pg_llm_softmax_backward")]
fn pg_llm_softmax_backward_rows(
    y: Option<&[u8]>,
    dy: Option<&[u8]>,
    cols: Option<i32>,
) -> Float32Bytea {
    run("pg_llm_softmax_backward", || {
        let y = tensor(y, "y")?;
        let cols = cols_or_all(Some(required(cols, "cols")?), y.len())?;
        Ok(Float32Bytea::from(softmax::softmax_backward(
            &y,
            &tensor(dy, "dy")?,
            cols,
        )?))
    })
}

/// LayerNorm over the last dimension (= length of gamma), any number of rows.
#[pg_extern(immutable, parallel_safe)]
fn pg_llm_layernorm(
    x: Option<&[u8]>,
    gamma: Option<&[u8]>,
    beta: Option<&[u8]>,
    eps: Option<f32>,
) -> Float32Bytea {
    run("pg_llm_layernorm", || {
        let (x, gamma, beta) = (
            tensor(x, "x")?,
            tensor(gamma, "gamma")?,
            tensor(beta, "beta")?,
        );
        let eps = finite(eps, "eps")?;
        Float32Bytea::computed(x.len(), cancel(), |y| {
            layernorm::layernorm_into(y, &x, &gamma, &beta, eps)?;
            let shape = vec![y.len() / gamma.len().max(1), gamma.len()];
            tape::record(Op::LayerNorm { eps }, &[&x, &gamma, &beta], y, shape)
        })
    })
}

#[pg_extern(immutable, parallel_safe)]
fn pg_llm_layernorm_backward(
    x: Option<&[u8]>,
    dy: Option<&[u8]>,
    gamma: Option<&[u8]>,
    eps: Option<f32>,
) -> pgrx::composite_type!('static, "layernorm_grads") {
    let g = run("pg_llm_layernorm_backward", || {
        layernorm::layernorm_backward(
            &tensor(x, "x")?,
            &tensor(dy, "dy")?,
            &tensor(gamma, "gamma")?,
            finite(eps, "eps")?,
        )
    });
    let mut t = PgHeapTuple::new_composite_type("layernorm_grads").expect("type layernorm_grads");
    t.set_by_name("dx", Float32Bytea::from(g.dx)).expect("dx");
    t.set_by_name("dgamma", Float32Bytea::from(g.dgamma))
        .expect("dgamma");
    t.set_by_name("dbeta", Float32Bytea::from(g.dbeta))
        .expect("dbeta");
    t
}

/// −log softmax(logits)[target].
#[pg_extern(immutable, parallel_safe)]
fn pg_llm_cross_entropy(logits: Option<&[u8]>, target: Option<i32>) -> f32 {
    run("pg_llm_cross_entropy", || {
        cross_entropy_recorded(logits, vec![required(target, "target")? as i64])
    })
}

/// Mean over the rows of a [len(targets), vocab] logits matrix of −log softmax(row)[target]:
/// the loss of a sequence's positions (`llm_loss` of a forward composed in SQL).
#[pg_extern(immutable, parallel_safe)]
fn pg_llm_cross_entropy_mean(logits: Option<&[u8]>, targets: Option<Vec<Option<i32>>>) -> f32 {
    run("pg_llm_cross_entropy_mean", || {
        cross_entropy_recorded(logits, target_ids(targets)?)
    })
}

fn target_ids(targets: Option<Vec<Option<i32>>>) -> pg_llm_engine::Result<Vec<i64>> {
    let ids = required(targets, "targets")?;
    ids.into_iter()
        .map(|t| Ok(required(t, "an element of targets")? as i64))
        .collect()
}

fn cross_entropy_recorded(logits: Option<&[u8]>, targets: Vec<i64>) -> pg_llm_engine::Result<f32> {
    let logits = logits_arg(logits, "logits")?;
    let loss = cross_entropy::mean_cross_entropy(&logits, &targets)?;
    tape::record(Op::CrossEntropy { targets }, &[&logits], &[loss], vec![1])?;
    Ok(loss)
}

/// (softmax(row) − onehot(target)) / rows for every row: the gradient of the mean loss.
#[pg_extern(immutable, parallel_safe)]
fn pg_llm_cross_entropy_mean_backward(
    logits: Option<&[u8]>,
    targets: Option<Vec<Option<i32>>>,
) -> Float32Bytea {
    run("pg_llm_cross_entropy_mean_backward", || {
        let g = cross_entropy::mean_cross_entropy_backward(
            &logits_arg(logits, "logits")?,
            &target_ids(targets)?,
        )?;
        Ok(Float32Bytea::from(g))
    })
}

/// softmax(logits) − onehot(target).
#[pg_extern(immutable, parallel_safe)]
fn pg_llm_cross_entropy_backward(logits: Option<&[u8]>, target: Option<i32>) -> Float32Bytea {
    run("pg_llm_cross_entropy_backward", || {
        let g = cross_entropy::cross_entropy_backward(
            &logits_arg(logits, "logits")?,
            required(target, "target")? as i64,
        )?;
        Ok(Float32Bytea::from(g))
    })
}

/// Inverted dropout. Random unless `seed` is given; identity when not training.
#[pg_extern(volatile, parallel_safe)]
fn pg_llm_dropout(
    input: Option<&[u8]>,
    p: Option<f32>,
    training: default!(Option<bool>, false),
    seed: default!(Option<i64>, "NULL"),
) -> Float32Bytea {
    run("pg_llm_dropout", || {
        let x = tensor(input, "input")?;
        let mut rng = rng_from_seed(seed);
        let (p, training) = (finite(p, "p")?, required(training, "training")?);
        let y = dropout::dropout_forward(&x, p, training, &mut rng)?;
        tape::record(Op::Dropout { p, training }, &[&x], &y, vec![y.len()])?;
        Ok(Float32Bytea::from(y))
    })
}

#[pg_extern(immutable, parallel_safe)]
fn pg_llm_dropout_backward(
    input: Option<&[u8]>,
    output: Option<&[u8]>,
    grad: Option<&[u8]>,
    p: Option<f32>,
    training: Option<bool>,
) -> Float32Bytea {
    run("pg_llm_dropout_backward", || {
        let dx = dropout::dropout_backward(
            &tensor(input, "input")?,
            &tensor(output, "output")?,
            &tensor(grad, "grad")?,
            finite(p, "p")?,
            required(training, "training")?,
        )?;
        Ok(Float32Bytea::from(dx))
    })
}

fn filled_like(src: Option<&[u8]>, value: f32) -> pg_llm_engine::Result<Float32Bytea> {
    let src = required(src, "src")?;
    if src.len() % 4 != 0 {
        return Err(EngineError::data(format!(
            "src is not a float32 tensor: its length {} bytes is not a multiple of 4",
            src.len()
        )));
    }
    Ok(Float32Bytea::from(vec![value; src.len() / 4]))
}

#[pg_extern(immutable, parallel_safe)]
fn pg_llm_ones_like(src: Option<&[u8]>) -> Float32Bytea {
    run("pg_llm_ones_like", || filled_like(src, 1.0))
}

#[pg_extern(immutable, parallel_safe)]
fn pg_llm_zeros_like(src: Option<&[u8]>) -> Float32Bytea {
    run("pg_llm_zeros_like", || filled_like(src, 0.0))
}

/// [rows, cols] → [cols, rows].
#[pg_extern(immutable, parallel_safe)]
fn pg_llm_transpose(src: Option<&[u8]>, rows: Option<i32>, cols: Option<i32>) -> Float32Bytea {
    run("pg_llm_transpose", || {
        let (r, c) = (dim(rows, "rows")?, dim(cols, "cols")?);
        let n = tensor::numel(&[r, c], "src")?;
        let src = tensor_exact(src, "src", n, &format!("[rows={r}, cols={c}]"))?;
        Float32Bytea::computed(n, cancel(), |y| {
            elementwise::transpose_into(y, &src, r, c)?;
            tape::record(Op::Transpose { rows: r, cols: c }, &[&src], y, vec![c, r])
        })
    })
}

struct BlockArgs<'a> {
    x: Cow<'a, [f32]>,
    w_qkv: Cow<'a, [f32]>,
    b_qkv: Cow<'a, [f32]>,
    w_o: Cow<'a, [f32]>,
    b_o: Cow<'a, [f32]>,
    n_head: usize,
    t: usize,
    d: usize,
}

impl<'a> BlockArgs<'a> {
    #[allow(clippy::too_many_arguments)]
    fn parse(
        x: Option<&'a [u8]>,
        w_qkv: Option<&'a [u8]>,
        b_qkv: Option<&'a [u8]>,
        w_o: Option<&'a [u8]>,
        b_o: Option<&'a [u8]>,
        n_head: Option<i32>,
        t: Option<i32>,
        d: Option<i32>,
    ) -> pg_llm_engine::Result<Self> {
        let (n_head, t, d) = (dim(n_head, "n_head")?, dim(t, "T")?, dim(d, "D")?);
        let d3 = tensor::numel(&[d, 3], "b_qkv")?;
        Ok(Self {
            x: tensor_exact(
                x,
                "x",
                tensor::numel(&[t, d], "x")?,
                &format!("[T={t}, D={d}]"),
            )?,
            w_qkv: tensor_exact(
                w_qkv,
                "w_qkv",
                tensor::numel(&[d, d3], "w_qkv")?,
                &format!("[D={d}, 3D={d3}]"),
            )?,
            b_qkv: tensor_exact(b_qkv, "b_qkv", d3, &format!("[3D={d3}]"))?,
            w_o: tensor_exact(
                w_o,
                "w_o",
                tensor::numel(&[d, d], "w_o")?,
                &format!("[D={d}, D={d}]"),
            )?,
            b_o: tensor_exact(b_o, "b_o", d, &format!("[D={d}]"))?,
            n_head,
            t,
            d,
        })
    }

    fn weights(&self) -> AttnBlockWeights<'_> {
        AttnBlockWeights {
            w_qkv: &self.w_qkv,
            b_qkv: &self.b_qkv,
            w_o: &self.w_o,
            b_o: &self.b_o,
        }
    }
}

/// Causal multi-head self-attention block: x [T, D], fused w_qkv [D, 3D] (q | k | v columns),
/// w_o [D, D]; weights are [in, out].
#[pg_extern(immutable, parallel_safe)]
#[allow(clippy::too_many_arguments)]
fn pg_llm_attention(
    x: Option<&[u8]>,
    w_qkv: Option<&[u8]>,
    b_qkv: Option<&[u8]>,
    w_o: Option<&[u8]>,
    b_o: Option<&[u8]>,
    n_head: Option<i32>,
    t: Option<i32>,
    d: Option<i32>,
) -> Float32Bytea {
    run("pg_llm_attention", || {
        let a = BlockArgs::parse(x, w_qkv, b_qkv, w_o, b_o, n_head, t, d)?;
        let y = attention_block_forward(&a.x, a.weights(), a.t, a.d, a.n_head, cancel())?;
        let op = Op::AttentionBlock {
            n_head: a.n_head,
            t: a.t,
            d: a.d,
        };
        let inputs: [&[f32]; 5] = [&a.x, &a.w_qkv, &a.b_qkv, &a.w_o, &a.b_o];
        tape::record(op, &inputs, &y, vec![a.t, a.d])?;
        Ok(Float32Bytea::from(y))
    })
}

#[pg_extern(immutable, parallel_safe)]
#[allow(clippy::too_many_arguments)]
fn pg_llm_attention_backward(
    x: Option<&[u8]>,
    w_qkv: Option<&[u8]>,
    b_qkv: Option<&[u8]>,
    w_o: Option<&[u8]>,
    b_o: Option<&[u8]>,
    grad_output: Option<&[u8]>,
    n_head: Option<i32>,
    t: Option<i32>,
    d: Option<i32>,
) -> pgrx::composite_type!('static, "attention_grads") {
    let g = run("pg_llm_attention_backward", || {
        let a = BlockArgs::parse(x, w_qkv, b_qkv, w_o, b_o, n_head, t, d)?;
        let dy = tensor_exact(
            grad_output,
            "grad_output",
            a.x.len(),
            &format!("[T={}, D={}]", a.t, a.d),
        )?;
        attention_block_backward(&a.x, a.weights(), &dy, a.t, a.d, a.n_head, cancel())
    });
    let mut t = PgHeapTuple::new_composite_type("attention_grads").expect("type attention_grads");
    t.set_by_name("dx", Float32Bytea::from(g.dx)).expect("dx");
    t.set_by_name("dw_qkv", Float32Bytea::from(g.dw_qkv))
        .expect("dw_qkv");
    t.set_by_name("db_qkv", Float32Bytea::from(g.db_qkv))
        .expect("db_qkv");
    t.set_by_name("dw_o", Float32Bytea::from(g.dw_o))
        .expect("dw_o");
    t.set_by_name("db_o", Float32Bytea::from(g.db_o))
        .expect("db_o");
    t
}
