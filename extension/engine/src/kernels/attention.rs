//! Causal multi-head self-attention, forward and backward.
//!
//! Layout: `qkv` is [T, 3·H·dh] row-major with q | k | v side by side in each row (the output of
//! x · w_qkv); head h occupies columns [h·dh, (h+1)·dh) of each third. The output is [T, H·dh].
//!
//! Memory stays linear in T: queries are processed in blocks of `Q_BLOCK` rows, scores for one
//! block against its visible keys are formed, softmaxed and consumed at once, and only the
//! per-row log-sum-exp is kept for the backward pass (which recomputes the scores the same way).

use std::borrow::Cow;

use rayon::prelude::*;

use super::matmul::{gemm, Accumulate, MatRef, Threads};
use crate::error::{EngineError, Result};
use crate::model::dtype::{Half, Matrix};
use crate::parallel::{self, Cancel};
use crate::tensor;

/// Query rows per block: 64 × 2048 scores is 512 KiB of scratch per thread at GPT-3's context.
const Q_BLOCK: usize = 64;

/// Which keys a query may see and how scores are scaled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnOptions {
    /// Local band: query i sees keys j with i − window < j ≤ i. `None` = dense causal.
    pub window: Option<usize>,
    /// Multiply scores by 1/√dh (GPT-2/3, OPT); GPT-Neo does not scale.
    pub scale: bool,
}

impl AttnOptions {
    pub const DENSE: AttnOptions = AttnOptions {
        window: None,
        scale: true,
    };
}

/// Shape of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub t: usize,
    pub n_head: usize,
    pub d_head: usize,
}

impl AttnShape {
    fn width(&self) -> usize {
        self.n_head * self.d_head
    }
}

/// Forward result: the attention output and the per-(head, row) log-sum-exp of the scores.
pub struct AttnForward {
    /// [T, H·dh]
    pub out: Vec<f32>,
    /// [H, T]
    pub lse: Vec<f32>,
}

/// Keys visible to queries [i0, i1): [lo, i1).
fn key_range(i0: usize, i1: usize, opts: AttnOptions) -> (usize, usize) {
    let lo = match opts.window {
        Some(w) => (i0 + 1).saturating_sub(w),
        None => 0,
    };
    (lo, i1)
}

/// First visible key of query i.
fn first_key(i: usize, opts: AttnOptions) -> usize {
    match opts.window {
        Some(w) => (i + 1).saturating_sub(w),
        None => 0,
    }
}

/// Copies columns [col, col+dh) of every row of a [T, stride] matrix into a [T, dh] buffer.
fn gather(src: &[f32], t: usize, stride: usize, col: usize, dh: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(t * dh);
    for r in 0..t {
        out.extend_from_slice(&src[r * stride + col..r * stride + col + dh]);
    }
    out
}

fn scatter(dst: &mut [f32], src: &[f32], t: usize, stride: usize, col: usize, dh: usize) {
    for r in 0..t {
        dst[r * stride + col..r * stride + col + dh].copy_from_slice(&src[r * dh..(r + 1) * dh]);
    }
}

fn check_shape(qkv: &[f32], s: AttnShape, opts: AttnOptions) -> Result<()> {
    if s.t == 0 || s.n_head == 0 || s.d_head == 0 {
        return Err(EngineError::invalid(
            "attention needs T, n_head and d_head to be positive",
        ));
    }
    if opts.window == Some(0) {
        return Err(EngineError::invalid(
            "a local attention window must be at least 1",
        ));
    }
    if qkv.len() != s.t * 3 * s.width() {
        return Err(EngineError::invalid(format!(
            "qkv has {} values but [T={}, 3·{}] needs {}",
            qkv.len(),
            s.t,
            s.width(),
            s.t * 3 * s.width()
        )));
    }
    Ok(())
}

/// Scaled, masked scores of queries [i0, i1) against keys [lo, hi), then softmax in place.
/// Returns nothing; `lse` receives each row's log-sum-exp when given.
#[allow(clippy::too_many_arguments)]
fn block_probs(
    scores: &mut [f32],
    q: &[f32],
    k: &[f32],
    dh: usize,
    i0: usize,
    i1: usize,
    lo: usize,
    opts: AttnOptions,
    scale: f32,
) {
    let (nb, nk) = (i1 - i0, i1 - lo);
    let q_blk = MatRef::new(&q[i0 * dh..i1 * dh], nb, dh);
    let k_t = MatRef::transposed(&k[lo * dh..i1 * dh], dh, nk);
    gemm(
        &mut scores[..nb * nk],
        q_blk,
        k_t,
        Accumulate::Overwrite,
        Threads::Single,
    );
    for r in 0..nb {
        let i = i0 + r;
        let row = &mut scores[r * nk..(r + 1) * nk];
        let (first, last) = (first_key(i, opts) - lo, i - lo);
        row[..first].fill(f32::NEG_INFINITY);
        row[last + 1..].fill(f32::NEG_INFINITY);
        row[first..=last].iter_mut().for_each(|v| *v *= scale);
    }
}

/// Where attention reads its queries, keys and values. Row i of head h of q starts at
/// `q[i * q_stride + h * d_head]`; of k and v at `k[i * kv_stride + h * kv_head_stride]`
/// (keys of one head side by side in a fused q|k|v matrix, or each head's keys contiguous
/// in a KV cache, which a decoding step then streams in order). A KV cache of a model served
/// in half precision holds its keys and values in that precision (`Matrix::Half`, rows of one
/// head contiguous: `kv_stride` = d_head), widened as attention reads them. Query row i sits at
/// absolute position `start + i` and sees keys up to that position, so the keys hold at least
/// `start + t` rows (a KV cache, or the same rows as the queries when `start` = 0).
#[derive(Clone, Copy)]
pub struct AttnInputs<'a> {
    pub q: &'a [f32],
    pub q_stride: usize,
    pub k: Matrix<'a>,
    pub v: Matrix<'a>,
    pub kv_stride: usize,
    pub kv_head_stride: usize,
    pub start: usize,
    pub t: usize,
}

impl<'a> AttnInputs<'a> {
    /// Self-attention over a fused [T, 3·H·dh] matrix (q | k | v in each row).
    pub fn fused(qkv: &'a [f32], s: AttnShape) -> Self {
        let w = s.width();
        Self {
            q: qkv,
            q_stride: 3 * w,
            k: Matrix::F32(&qkv[w..]),
            v: Matrix::F32(&qkv[2 * w..]),
            kv_stride: 3 * w,
            kv_head_stride: s.d_head,
            start: 0,
            t: s.t,
        }
    }
}

/// Attention of `inp.t` queries against their visible keys; returns the output [t, H·dh] and
/// the log-sum-exp of each (head, query) [H, t].
pub fn attend(
    inp: AttnInputs,
    n_head: usize,
    d_head: usize,
    opts: AttnOptions,
    cancel: Cancel,
) -> Result<AttnForward> {
    let mut out = tensor::alloc_zeroed(inp.t * n_head * d_head)?;
    let lse = attend_into(&mut out, inp, n_head, d_head, opts, cancel)?;
    Ok(AttnForward { out, lse })
}

/// `attend` into a caller's [t, H·dh] buffer; returns the log-sum-exp [H, t].
pub fn attend_into(
    out: &mut [f32],
    inp: AttnInputs,
    n_head: usize,
    d_head: usize,
    opts: AttnOptions,
    cancel: Cancel,
) -> Result<Vec<f32>> {
    let (t, dh, width) = (inp.t, d_head, n_head * d_head);
    assert_eq!(out.len(), t * width, "attention: out");
    let n_kv = inp.start + t;
    if t == 0 || n_head == 0 || dh == 0 || opts.window == Some(0) {
        return Err(EngineError::invalid(
            "attention needs T, n_head, d_head and the window to be positive",
        ));
    }
    let scale = if opts.scale {
        1.0 / (dh as f32).sqrt()
    } else {
        1.0
    };
    if t == 1 {
        return Ok(attend_one_query(out, inp, dh, opts, scale));
    }
    let heads: Vec<Result<(Vec<f32>, Vec<f32>)>> = parallel::install(|| {
        (0..n_head)
            .into_par_iter()
            .map(|h| {
                let mut out = vec![0.0f32; t * dh];
                let mut lse = vec![0.0f32; t];
                let mut scores = vec![0.0f32; Q_BLOCK.min(t) * n_kv];
                let (k, v, kv_stride, head_at) = head_keys_values(&inp, h, n_kv, dh);
                for i0 in (0..t).step_by(Q_BLOCK) {
                    cancel.check()?;
                    let i1 = (i0 + Q_BLOCK).min(t);
                    let (a0, a1) = (inp.start + i0, inp.start + i1);
                    let (lo, hi) = key_range(a0, a1, opts);
                    let (nb, nk) = (i1 - i0, hi - lo);
                    let q = MatRef::strided(
                        &inp.q[i0 * inp.q_stride + h * dh..],
                        nb,
                        dh,
                        inp.q_stride,
                        1,
                    );
                    let k_t = MatRef::strided(&k[lo * kv_stride + head_at..], dh, nk, 1, kv_stride);
                    gemm(
                        &mut scores[..nb * nk],
                        q,
                        k_t,
                        Accumulate::Overwrite,
                        Threads::Single,
                    );
                    for r in 0..nb {
                        let i = a0 + r;
                        let row = &mut scores[r * nk..(r + 1) * nk];
                        let (first, last) = (first_key(i, opts) - lo, i - lo);
                        row[..first].fill(0.0);
                        row[last + 1..].fill(0.0);
                        let live = &mut row[first..=last];
                        lse[i0 + r] = crate::simd::softmax_scaled_inplace(live, scale);
                    }
                    let p = MatRef::new(&scores[..nb * nk], nb, nk);
                    let v = MatRef::strided(&v[lo * kv_stride + head_at..], nk, dh, kv_stride, 1);
                    gemm(
                        &mut out[i0 * dh..i1 * dh],
                        p,
                        v,
                        Accumulate::Overwrite,
                        Threads::Single,
                    );
                }
                Ok((out, lse))
            })
            .collect()
    });
    let mut lse_all = Vec::with_capacity(n_head * t);
    for (h, head) in heads.into_iter().enumerate() {
        let (o, lse) = head?;
        scatter(out, &o, t, width, h * dh, dh);
        lse_all.extend_from_slice(&lse);
    }
    Ok(lse_all)
}

/// The keys and values of head `h` for the first `n_kv` positions, as float32 rows: in place
/// (returned with their row stride and head `h`'s offset), or widened from a half-precision
/// cache once for all of a call's query blocks (then rows of `dh`, from offset 0).
fn head_keys_values<'a>(
    inp: &AttnInputs<'a>,
    h: usize,
    n_kv: usize,
    dh: usize,
) -> (Cow<'a, [f32]>, Cow<'a, [f32]>, usize, usize) {
    let widen = |m: Matrix<'a>| -> Cow<'a, [f32]> {
        match m {
            Matrix::F32(values) => Cow::Borrowed(values),
            half => {
                assert_eq!(
                    inp.kv_stride, dh,
                    "half-precision keys are rows of one head"
                );
                let at = h * inp.kv_head_stride;
                let mut rows = Vec::with_capacity(n_kv * dh);
                half.extend_f32(at..at + n_kv * dh, &mut rows);
                Cow::Owned(rows)
            }
        }
    };
    let (k, v) = (widen(inp.k), widen(inp.v));
    match (&k, &v) {
        (Cow::Borrowed(_), Cow::Borrowed(_)) => (k, v, inp.kv_stride, h * inp.kv_head_stride),
        (Cow::Owned(_), Cow::Owned(_)) => (k, v, dh, 0),
        _ => unreachable!("keys and values in different precisions"),
    }
}

/// Keys visible to one query from which attention is worth spreading over threads by head.
const PARALLEL_KEYS: usize = 16;

/// Attention of one query (a decoding step): per head, dot products with the visible keys, a
/// softmax, and the values summed with those weights. Cheaper than matrix products of one row,
/// and each head's arithmetic is the same however the heads are spread over threads, so a
/// sequence decoded alone and one decoded beside others (forward.rs) get the same bits.
fn attend_one_query(
    out: &mut [f32],
    inp: AttnInputs,
    dh: usize,
    opts: AttnOptions,
    scale: f32,
) -> Vec<f32> {
    let i = inp.start;
    let keys = first_key(i, opts)..i + 1;
    let head = |h: usize, out: &mut [f32]| -> f32 {
        let q = &inp.q[h * dh..(h + 1) * dh];
        let at = |j: usize| j * inp.kv_stride + h * inp.kv_head_stride;
        // A half-precision cache's rows of this head are contiguous (kv_stride = dh).
        let span = at(keys.start)..at(keys.end - 1) + dh;
        let contiguous = || assert_eq!(inp.kv_stride, dh, "half keys are rows of one head");
        let mut scores: Vec<f32> = match inp.k {
            Matrix::F32(k) => keys
                .clone()
                .map(|j| crate::simd::dot(q, &k[at(j)..at(j) + dh]))
                .collect(),
            Matrix::Half(k, hf) => {
                contiguous();
                half_scores(q, &k[span.clone()], dh, hf)
            }
            Matrix::Grouped(..) => unreachable!("a KV cache is row-major"),
        };
        let lse = crate::simd::softmax_scaled_inplace(&mut scores, scale);
        out.fill(0.0);
        match inp.v {
            Matrix::F32(v) => {
                for (&p, j) in scores.iter().zip(keys.clone()) {
                    crate::simd::axpy(out, p, &v[at(j)..at(j) + dh]);
                }
            }
            Matrix::Half(v, hf) => crate::simd::weighted_rows_half(out, &scores, &v[span], hf),
            Matrix::Grouped(..) => unreachable!("a KV cache is row-major"),
        }
        lse
    };
    if keys.len() < PARALLEL_KEYS {
        out.chunks_exact_mut(dh)
            .enumerate()
            .map(|(h, o)| head(h, o))
            .collect()
    } else {
        parallel::install(|| {
            out.par_chunks_exact_mut(dh)
                .enumerate()
                .map(|(h, o)| head(h, o))
                .collect()
        })
    }
}

/// q · k for each of the consecutive half-precision key rows `keys` ([n, dh] bits of `h`),
/// eight rows per pass so that q is loaded once for all eight (each the bits `dot_half` gives).
fn half_scores(q: &[f32], keys: &[u16], dh: usize, h: Half) -> Vec<f32> {
    let mut scores = Vec::with_capacity(keys.len() / dh);
    let mut blocks = keys.chunks_exact(8 * dh);
    for block in &mut blocks {
        let r: [&[u16]; 8] = std::array::from_fn(|i| &block[i * dh..(i + 1) * dh]);
        scores.extend(crate::simd::dot_half_rows(q, r, h));
    }
    for row in blocks.remainder().chunks_exact(dh) {
        scores.push(crate::simd::dot_half(q, row, h));
    }
    scores
}

/// Causal self-attention over a fused qkv matrix.
pub fn attention_forward(
    qkv: &[f32],
    s: AttnShape,
    opts: AttnOptions,
    cancel: Cancel,
) -> Result<AttnForward> {
    check_shape(qkv, s, opts)?;
    attend(AttnInputs::fused(qkv, s), s.n_head, s.d_head, opts, cancel)
}

/// Gradient with respect to qkv, given the forward's output [T, H·dh] and log-sum-exp [H, T]
/// (see `AttnForward`) and dL/dout.
pub fn attention_backward(
    qkv: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    s: AttnShape,
    opts: AttnOptions,
    cancel: Cancel,
) -> Result<Vec<f32>> {
    check_shape(qkv, s, opts)?;
    let (t, dh, width) = (s.t, s.d_head, s.width());
    if dout.len() != t * width || out.len() != t * width || lse.len() != s.n_head * t {
        return Err(EngineError::invalid(format!(
            "attention gradient has {} values but [T={t}, {width}] needs {}",
            dout.len(),
            t * width
        )));
    }
    let scale = if opts.scale {
        1.0 / (dh as f32).sqrt()
    } else {
        1.0
    };
    let heads: Vec<Result<[Vec<f32>; 3]>> = parallel::install(|| {
        (0..s.n_head)
            .into_par_iter()
            .map(|h| {
                let q = gather(qkv, t, 3 * width, h * dh, dh);
                let k = gather(qkv, t, 3 * width, width + h * dh, dh);
                let v = gather(qkv, t, 3 * width, 2 * width + h * dh, dh);
                let o = gather(out, t, width, h * dh, dh);
                let d_o = gather(dout, t, width, h * dh, dh);
                let lse = &lse[h * t..(h + 1) * t];
                // D_i = dO_i · O_i, the row term of the softmax backward; summed in float64,
                // where a partial sum cannot overflow before the last terms cancel it.
                let delta: Vec<f32> = (0..t)
                    .map(|i| {
                        let row = i * dh..(i + 1) * dh;
                        let dot: f64 = (o[row.clone()].iter().zip(&d_o[row]))
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum();
                        dot as f32
                    })
                    .collect();
                let (mut dq, mut dk, mut dv) = (
                    vec![0.0f32; t * dh],
                    vec![0.0f32; t * dh],
                    vec![0.0f32; t * dh],
                );
                let mut p_buf = vec![0.0f32; Q_BLOCK * t];
                let mut dp_buf = vec![0.0f32; Q_BLOCK * t];
                for i0 in (0..t).step_by(Q_BLOCK) {
                    cancel.check()?;
                    let i1 = (i0 + Q_BLOCK).min(t);
                    let (lo, hi) = key_range(i0, i1, opts);
                    let (nb, nk) = (i1 - i0, hi - lo);
                    block_probs(&mut p_buf, &q, &k, dh, i0, i1, lo, opts, scale);
                    for r in 0..nb {
                        let l = lse[i0 + r];
                        p_buf[r * nk..(r + 1) * nk]
                            .iter_mut()
                            .for_each(|x| *x = (*x - l).exp());
                    }
                    let d_o_blk = MatRef::new(&d_o[i0 * dh..i1 * dh], nb, dh);
                    // dV[lo..hi] += Pᵀ · dO
                    gemm(
                        &mut dv[lo * dh..hi * dh],
                        MatRef::transposed(&p_buf[..nb * nk], nk, nb),
                        d_o_blk,
                        Accumulate::Add,
                        Threads::Single,
                    );
                    // dP = dO · Vᵀ
                    let v_t = MatRef::transposed(&v[lo * dh..hi * dh], dh, nk);
                    gemm(
                        &mut dp_buf[..nb * nk],
                        d_o_blk,
                        v_t,
                        Accumulate::Overwrite,
                        Threads::Single,
                    );
                    // dS = P ⊙ (dP − D) · scale, written over dP.
                    for r in 0..nb {
                        let d = delta[i0 + r];
                        for c in 0..nk {
                            let idx = r * nk + c;
                            dp_buf[idx] = p_buf[idx] * (dp_buf[idx] - d) * scale;
                        }
                    }
                    let ds = MatRef::new(&dp_buf[..nb * nk], nb, nk);
                    // dQ_blk = dS · K ; dK += dSᵀ · Q_blk
                    gemm(
                        &mut dq[i0 * dh..i1 * dh],
                        ds,
                        MatRef::new(&k[lo * dh..hi * dh], nk, dh),
                        Accumulate::Overwrite,
                        Threads::Single,
                    );
                    gemm(
                        &mut dk[lo * dh..hi * dh],
                        MatRef::transposed(&dp_buf[..nb * nk], nk, nb),
                        MatRef::new(&q[i0 * dh..i1 * dh], nb, dh),
                        Accumulate::Add,
                        Threads::Single,
                    );
                }
                Ok([dq, dk, dv])
            })
            .collect()
    });
    let mut dqkv = tensor::alloc_zeroed(t * 3 * width)?;
    for (h, head) in heads.into_iter().enumerate() {
        let [dq, dk, dv] = head?;
        scatter(&mut dqkv, &dq, t, 3 * width, h * dh, dh);
        scatter(&mut dqkv, &dk, t, 3 * width, width + h * dh, dh);
        scatter(&mut dqkv, &dv, t, 3 * width, 2 * width + h * dh, dh);
    }
    Ok(dqkv)
}

/// Weights of pg_gpt2's attention block: fused projection w_qkv [D, 3D] + b_qkv [3D], then the
/// output projection w_o [D, D] + b_o [D]. Weights are [in, out] (x · W).
#[derive(Clone, Copy)]
pub struct AttnBlockWeights<'a> {
    pub w_qkv: &'a [f32],
    pub b_qkv: &'a [f32],
    pub w_o: &'a [f32],
    pub b_o: &'a [f32],
}

/// Gradients of the attention block with respect to its input and weights.
pub struct AttnBlockGrads {
    pub dx: Vec<f32>,
    pub dw_qkv: Vec<f32>,
    pub db_qkv: Vec<f32>,
    pub dw_o: Vec<f32>,
    pub db_o: Vec<f32>,
}

fn check_block(
    x: &[f32],
    w: &AttnBlockWeights,
    t: usize,
    d: usize,
    n_head: usize,
) -> Result<AttnShape> {
    if d % n_head != 0 {
        return Err(EngineError::invalid(format!(
            "D = {d} is not divisible by n_head = {n_head}"
        )));
    }
    let expect = [
        ("x", x.len(), t * d, format!("[T={t}, D={d}]")),
        (
            "w_qkv",
            w.w_qkv.len(),
            d * 3 * d,
            format!("[D={d}, 3D={}]", 3 * d),
        ),
        ("b_qkv", w.b_qkv.len(), 3 * d, format!("[3D={}]", 3 * d)),
        ("w_o", w.w_o.len(), d * d, format!("[D={d}, D={d}]")),
        ("b_o", w.b_o.len(), d, format!("[D={d}]")),
    ];
    for (name, got, want, shape) in expect {
        if got != want {
            return Err(EngineError::invalid(format!(
                "{name} has {got} values but shape {shape} needs {want}"
            )));
        }
    }
    Ok(AttnShape {
        t,
        n_head,
        d_head: d / n_head,
    })
}

/// y[T, out] = x[T, in] · w[in, out] + b[out].
fn linear(x: &[f32], w: &[f32], b: &[f32], t: usize, d_in: usize, d_out: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; t * d_out];
    for row in y.chunks_exact_mut(d_out) {
        row.copy_from_slice(b);
    }
    gemm(
        &mut y,
        MatRef::new(x, t, d_in),
        MatRef::new(w, d_in, d_out),
        Accumulate::Add,
        Threads::Pool,
    );
    y
}

/// Backward of `linear`: returns dx and adds into dw, db.
fn linear_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    t: usize,
    d_in: usize,
    d_out: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dx = vec![0.0f32; t * d_in];
    gemm(
        &mut dx,
        MatRef::new(dy, t, d_out),
        MatRef::transposed(w, d_out, d_in),
        Accumulate::Overwrite,
        Threads::Pool,
    );
    let mut dw = vec![0.0f32; d_in * d_out];
    gemm(
        &mut dw,
        MatRef::transposed(x, d_in, t),
        MatRef::new(dy, t, d_out),
        Accumulate::Overwrite,
        Threads::Pool,
    );
    // The bias gradient sums dy over rows in float64: cheap, and a float32 running sum can
    // overflow before later rows bring it back into range.
    let mut db = vec![0.0f64; d_out];
    for row in dy.chunks_exact(d_out) {
        db.iter_mut().zip(row).for_each(|(a, &b)| *a += b as f64);
    }
    (dx, dw, db.iter().map(|&v| v as f32).collect())
}

/// q | k | v = x · w_qkv + b_qkv, then the attention over them. Any intermediate beyond
/// float32's range is `OutOfRange`: a q|k|v value, or a score q·k (whose log-sum-exp is then
/// not finite); softmax would turn either into NaN.
fn block_attention(
    x: &[f32],
    w: &AttnBlockWeights,
    shape: AttnShape,
    cancel: Cancel,
) -> Result<(Vec<f32>, AttnForward)> {
    let d = shape.width();
    let qkv = linear(x, w.w_qkv, w.b_qkv, shape.t, d, 3 * d);
    tensor::check_result(&qkv, "attention q|k|v projection")?;
    let attn = attention_forward(&qkv, shape, AttnOptions::DENSE, cancel)?;
    tensor::check_result(&attn.lse, "attention scores' log-sum-exp")?;
    tensor::check_result(&attn.out, "attention-weighted values")?;
    Ok((qkv, attn))
}

/// q | k | v [T, W] each, side by side in one [T, 3W] matrix (the fused layout).
fn fuse_qkv(q: &[f32], k: &[f32], v: &[f32], s: AttnShape) -> Result<Vec<f32>> {
    let w = s.width();
    for (name, m) in [("q", q), ("k", k), ("v", v)] {
        if m.len() != s.t * w {
            return Err(EngineError::invalid(format!(
                "{name} has {} values but [T={}, {w}] needs {}",
                m.len(),
                s.t,
                s.t * w
            )));
        }
    }
    let mut qkv = tensor::alloc_zeroed(s.t * 3 * w)?;
    for (r, row) in qkv.chunks_exact_mut(3 * w).enumerate() {
        row[..w].copy_from_slice(&q[r * w..(r + 1) * w]);
        row[w..2 * w].copy_from_slice(&k[r * w..(r + 1) * w]);
        row[2 * w..].copy_from_slice(&v[r * w..(r + 1) * w]);
    }
    Ok(qkv)
}

/// Causal attention of separate q, k, v [T, H·dh] (the outputs of three projections): the
/// SQL kernel `pg_llm_causal_attention`, with the model's window and scaling.
pub fn causal_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    opts: AttnOptions,
    cancel: Cancel,
) -> Result<Vec<f32>> {
    let qkv = fuse_qkv(q, k, v, s)?;
    Ok(attention_forward(&qkv, s, opts, cancel)?.out)
}

/// Gradients of `causal_attention` with respect to q, k and v, given dL/dout [T, H·dh].
pub fn causal_attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    s: AttnShape,
    opts: AttnOptions,
    cancel: Cancel,
) -> Result<[Vec<f32>; 3]> {
    let qkv = fuse_qkv(q, k, v, s)?;
    let fwd = attention_forward(&qkv, s, opts, cancel)?;
    let dqkv = attention_backward(&qkv, &fwd.out, &fwd.lse, dout, s, opts, cancel)?;
    let w = s.width();
    let mut parts = [Vec::new(), Vec::new(), Vec::new()];
    for (i, part) in parts.iter_mut().enumerate() {
        *part = gather(&dqkv, s.t, 3 * w, i * w, w);
    }
    Ok(parts)
}

/// y = softmax-attention(x · w_qkv + b_qkv) · w_o + b_o, causal, dense.
pub fn attention_block_forward(
    x: &[f32],
    w: AttnBlockWeights,
    t: usize,
    d: usize,
    n_head: usize,
    cancel: Cancel,
) -> Result<Vec<f32>> {
    let shape = check_block(x, &w, t, d, n_head)?;
    let (_, attn) = block_attention(x, &w, shape, cancel)?;
    let y = linear(&attn.out, w.w_o, w.b_o, t, d, d);
    tensor::check_result(&y, "attention output")?;
    Ok(y)
}

/// Gradients of `attention_block_forward` given dL/dy; the forward is recomputed.
pub fn attention_block_backward(
    x: &[f32],
    w: AttnBlockWeights,
    dy: &[f32],
    t: usize,
    d: usize,
    n_head: usize,
    cancel: Cancel,
) -> Result<AttnBlockGrads> {
    let shape = check_block(x, &w, t, d, n_head)?;
    if dy.len() != t * d {
        return Err(EngineError::invalid(format!(
            "grad_output has {} values but [T={t}, D={d}] needs {}",
            dy.len(),
            t * d
        )));
    }
    let (qkv, attn) = block_attention(x, &w, shape, cancel)?;
    let (d_attn, dw_o, db_o) = linear_backward(&attn.out, w.w_o, dy, t, d, d);
    // Checked before use: an overflowed gradient turns into NaN downstream.
    tensor::check_result(&d_attn, "gradient of the attention-weighted values")?;
    let dqkv = attention_backward(
        &qkv,
        &attn.out,
        &attn.lse,
        &d_attn,
        shape,
        AttnOptions::DENSE,
        cancel,
    )?;
    tensor::check_result(&dqkv, "gradient of q|k|v")?;
    let (dx, dw_qkv, db_qkv) = linear_backward(x, w.w_qkv, &dqkv, t, d, 3 * d);
    let grads = AttnBlockGrads {
        dx,
        dw_qkv,
        db_qkv,
        dw_o,
        db_o,
    };
    grads.check()?;
    Ok(grads)
}

impl AttnBlockGrads {
    /// `OutOfRange` when a gradient overflowed float32.
    fn check(&self) -> Result<()> {
        tensor::check_result(&self.dx, "attention dx")?;
        tensor::check_result(&self.dw_qkv, "attention dw_qkv")?;
        tensor::check_result(&self.db_qkv, "attention db_qkv")?;
        tensor::check_result(&self.dw_o, "attention dw_o")?;
        tensor::check_result(&self.db_o, "attention db_o")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gradcheck::assert_grad_matches;

    fn wave(n: usize, a: f32, b: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32) * a + b).sin() * 0.5).collect()
    }

    /// Direct O(T²) reference: explicit scores, mask, softmax.
    fn reference(qkv: &[f32], s: AttnShape, opts: AttnOptions) -> Vec<f32> {
        let (t, dh, w) = (s.t, s.d_head, s.width());
        let scale = if opts.scale {
            1.0 / (dh as f64).sqrt()
        } else {
            1.0
        };
        let mut out = vec![0.0f32; t * w];
        for h in 0..s.n_head {
            for i in 0..t {
                let lo = first_key(i, opts);
                let scores: Vec<f64> = (lo..=i)
                    .map(|j| {
                        (0..dh)
                            .map(|c| {
                                qkv[i * 3 * w + h * dh + c] as f64
                                    * qkv[j * 3 * w + w + h * dh + c] as f64
                            })
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|x| (x - max).exp()).sum();
                for c in 0..dh {
                    out[i * w + h * dh + c] = (lo..=i)
                        .map(|j| {
                            (scores[j - lo] - max).exp() / z
                                * qkv[j * 3 * w + 2 * w + h * dh + c] as f64
                        })
                        .sum::<f64>() as f32;
                }
            }
        }
        out
    }

    #[test]
    fn matches_reference_dense_and_local() {
        // T = 150 spans three query blocks.
        let s = AttnShape {
            t: 150,
            n_head: 3,
            d_head: 4,
        };
        let qkv = wave(150 * 36, 0.37, 0.1);
        for opts in [
            AttnOptions::DENSE,
            AttnOptions {
                window: Some(5),
                scale: true,
            },
            AttnOptions {
                window: Some(70),
                scale: false,
            },
        ] {
            let got = attention_forward(&qkv, s, opts, Cancel::NEVER).unwrap().out;
            for (a, b) in got.iter().zip(reference(&qkv, s, opts)) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b} with {opts:?}");
            }
        }
    }

    #[test]
    fn incremental_queries_match_the_full_pass() {
        // Attending query by query against a growing cache equals one pass over all rows.
        let s = AttnShape {
            t: 9,
            n_head: 2,
            d_head: 3,
        };
        let qkv = wave(9 * 18, 0.53, 0.2);
        let opts = AttnOptions {
            window: Some(4),
            scale: true,
        };
        let full = attention_forward(&qkv, s, opts, Cancel::NEVER).unwrap().out;
        let w = s.width();
        let (q, k, v): (Vec<f32>, Vec<f32>, Vec<f32>) = (
            (0..9)
                .flat_map(|r| qkv[r * 3 * w..r * 3 * w + w].to_vec())
                .collect(),
            (0..9)
                .flat_map(|r| qkv[r * 3 * w + w..r * 3 * w + 2 * w].to_vec())
                .collect(),
            (0..9)
                .flat_map(|r| qkv[r * 3 * w + 2 * w..r * 3 * w + 3 * w].to_vec())
                .collect(),
        );
        for i in 0..9 {
            let inp = AttnInputs {
                q: &q[i * w..],
                q_stride: w,
                k: Matrix::F32(&k),
                v: Matrix::F32(&v),
                kv_stride: w,
                kv_head_stride: 3,
                start: i,
                t: 1,
            };
            let one = attend(inp, 2, 3, opts, Cancel::NEVER).unwrap().out;
            for c in 0..w {
                assert!((one[c] - full[i * w + c]).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn qkv_gradient() {
        let s = AttnShape {
            t: 5,
            n_head: 2,
            d_head: 3,
        };
        let qkv = wave(5 * 18, 0.71, 0.3);
        let w = wave(5 * 6, 1.3, 0.7);
        for opts in [
            AttnOptions::DENSE,
            AttnOptions {
                window: Some(2),
                scale: false,
            },
        ] {
            let fwd = attention_forward(&qkv, s, opts, Cancel::NEVER).unwrap();
            let g =
                attention_backward(&qkv, &fwd.out, &fwd.lse, &w, s, opts, Cancel::NEVER).unwrap();
            assert_grad_matches(&qkv, &g, |x| {
                let o = attention_forward(x, s, opts, Cancel::NEVER).unwrap().out;
                o.iter()
                    .zip(&w)
                    .map(|(a, b)| (*a as f64) * (*b as f64))
                    .sum()
            });
        }
    }

    #[test]
    fn block_gradients() {
        let (t, d, nh) = (4, 6, 2);
        let x = wave(t * d, 0.9, 0.0);
        let w_qkv = wave(d * 3 * d, 0.43, 1.0);
        let b_qkv = wave(3 * d, 0.77, 2.0);
        let w_o = wave(d * d, 0.61, 3.0);
        let b_o = wave(d, 0.5, 4.0);
        let dy = wave(t * d, 1.7, 5.0);
        let weights = AttnBlockWeights {
            w_qkv: &w_qkv,
            b_qkv: &b_qkv,
            w_o: &w_o,
            b_o: &b_o,
        };
        let g = attention_block_backward(&x, weights, &dy, t, d, nh, Cancel::NEVER).unwrap();
        let loss = |y: Vec<f32>| {
            y.iter()
                .zip(&dy)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum::<f64>()
        };
        let f = |w: AttnBlockWeights, x: &[f32]| {
            loss(attention_block_forward(x, w, t, d, nh, Cancel::NEVER).unwrap())
        };
        assert_grad_matches(&x, &g.dx, |x| f(weights, x));
        assert_grad_matches(&w_qkv, &g.dw_qkv, |v| {
            f(
                AttnBlockWeights {
                    w_qkv: v,
                    ..weights
                },
                &x,
            )
        });
        assert_grad_matches(&b_qkv, &g.db_qkv, |v| {
            f(
                AttnBlockWeights {
                    b_qkv: v,
                    ..weights
                },
                &x,
            )
        });
        assert_grad_matches(&w_o, &g.dw_o, |v| {
            f(AttnBlockWeights { w_o: v, ..weights }, &x)
        });
        assert_grad_matches(&b_o, &g.db_o, |v| {
            f(AttnBlockWeights { b_o: v, ..weights }, &x)
        });
    }

    fn one_by_one<'a>(w_qkv: &'a [f32], zeros: &'a [f32]) -> AttnBlockWeights<'a> {
        AttnBlockWeights {
            w_qkv,
            b_qkv: &zeros[..3],
            w_o: &[1.0],
            b_o: &zeros[..1],
        }
    }

    #[test]
    fn overflowing_scores_are_out_of_range() {
        // Reported: x = 3e38 gave dx = NaN. With unit weights q·k = 9e76 is beyond float32.
        let zeros = [0.0f32; 3];
        let w = one_by_one(&[1.0; 3], &zeros);
        let fwd = attention_block_forward(&[3e38], w, 1, 1, 1, Cancel::NEVER);
        assert!(matches!(fwd, Err(EngineError::OutOfRange(_))));
        let bwd = attention_block_backward(&[3e38], w, &[1.0], 1, 1, 1, Cancel::NEVER);
        assert!(matches!(bwd, Err(EngineError::OutOfRange(_))));
        // Scaled down by the weights, the same x is fine: one query attends to itself, so
        // dq = dk = 0, dv = dy and dw_qkv = xᵀ·dqkv.
        let w = one_by_one(&[1e-38; 3], &zeros);
        let g = attention_block_backward(&[3e38], w, &[1.0], 1, 1, 1, Cancel::NEVER).unwrap();
        assert_eq!(g.dw_qkv, vec![0.0, 0.0, 3e38]);
        assert!((g.dx[0] - 1e-38).abs() < 1e-44);
    }

    #[test]
    fn a_score_overflowing_to_minus_infinity_gets_no_weight() {
        // x = [[−3e38, 0], [0, 1]]; q = (1e20·x₁, 0), k = (x₀ + x₁, 0), v = x, w_o = I.
        // Query 1 scores key 0 at 1e20·(−3e38) = −∞: its weight is exactly 0, so y₁ = v₁.
        // (e^−87.3 in its place gave −3e38·1.2e-38 = −3.6 in y₁.)
        let w_qkv = [0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1e20, 0.0, 1.0, 0.0, 0.0, 1.0];
        let w = AttnBlockWeights {
            w_qkv: &w_qkv,
            b_qkv: &[0.0; 6],
            w_o: &[1.0, 0.0, 0.0, 1.0],
            b_o: &[0.0; 2],
        };
        let x = [-3e38, 0.0, 0.0, 1.0];
        let y = attention_block_forward(&x, w, 2, 2, 1, Cancel::NEVER).unwrap();
        assert_eq!(y, vec![-3e38, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn long_context_runs_in_linear_memory() {
        // GPT-3's 2048-token context with two small heads: scratch is Q_BLOCK × T per head.
        let s = AttnShape {
            t: 2048,
            n_head: 2,
            d_head: 8,
        };
        let qkv = wave(2048 * 48, 0.013, 0.0);
        let fwd = attention_forward(&qkv, s, AttnOptions::DENSE, Cancel::NEVER).unwrap();
        assert!(fwd.out.iter().all(|v| v.is_finite()));
        // The first row attends only to itself: its output is its own v.
        assert!((fwd.out[0] - qkv[32]).abs() < 1e-6);
    }
}
