//! Linear layers y = x · Wᵀ + b with W stored [out, in] (PyTorch `Linear`).
//! Layout: x [t, in], y [t, out], row-major.

use rayon::prelude::*;

use super::matmul::{self, gemm_into, slice_cols, Accumulate, MatRef, Threads, FLOPS_PER_SLICE};
use crate::error::Result;
use crate::model::dtype::Matrix;
use crate::parallel::{self, Cancel};
use crate::{simd, tensor};

/// Up to this many rows of x, each weight row is streamed once and dotted with every row of x
/// (`streams_rows`). Beyond a few rows that is compute-bound, but it stays faster than
/// packing the weights for the `gemm` crate (a transpose of every weight matrix per call,
/// `linear_many_rows`) up to about 48 rows. Measured on gpt3-125m, 2 threads, float32 prompt
/// pass (Intel Xeon): 16 tokens 38 vs 70 ms, 32 tokens 58 vs 75 – 88 ms, 48 tokens 81 vs
/// 89 – 95 ms, 64 tokens 110 vs 97 – 104 ms.
const SMALL_T: usize = 48;
/// The same for half-precision weights, whose dots widen every value: 32 rows (bfloat16 at
/// 48 tokens 104 – 122 ms streamed vs 89 – 92 ms at 49 through the library).
const HALF_SMALL_T: usize = 32;
/// Where the own AVX2 product serves (`matmul::packs_any_layout`), which packs the weights
/// untransposed (half ones widened as packed), the crossover is lower. gpt3-125m prompt pass,
/// 2 threads, AMD EPYC, streamed vs packed: float32 at 12 tokens 62 vs 71 – 76 ms, 16 tokens
/// 79 – 82 vs 77 – 94, 20 tokens 96 – 103 vs 85 – 96, 24 tokens 134 – 136 vs 83 – 96;
/// bfloat16 at 12 tokens 59 – 62 vs 58 – 67 ms, 16 tokens 71 – 99 vs 63, 24 tokens 107 –
/// 116 vs 81 – 82.
const OWN_PRODUCT_SMALL_T: usize = 16;
const OWN_PRODUCT_HALF_SMALL_T: usize = 12;

/// Whether a product of t rows of x by d_out weight rows streams the weight rows.
fn streams_rows(t: usize, d_out: usize, half: bool) -> bool {
    let limit = match (matmul::packs_any_layout(t, d_out), half) {
        (true, false) => OWN_PRODUCT_SMALL_T,
        (true, true) => OWN_PRODUCT_HALF_SMALL_T,
        (false, false) => SMALL_T,
        (false, true) => HALF_SMALL_T,
    };
    t <= limit
}

/// Output rows per task in the small-t path.
const ROWS_PER_TASK: usize = 64;
/// The same bytes of half-precision weights per task.
const HALF_ROWS_PER_TASK: usize = 2 * ROWS_PER_TASK;

/// y[t, out] = x[t, in] · w[out, in]ᵀ (+ b), checking `cancel` between slices.
pub fn linear(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    t: usize,
    d_in: usize,
    d_out: usize,
    cancel: Cancel,
) -> Result<Vec<f32>> {
    let mut y = tensor::alloc_zeroed(t * d_out)?;
    linear_into(
        &mut y,
        x,
        w,
        b,
        (t, d_in, d_out),
        Accumulate::Overwrite,
        cancel,
    )?;
    Ok(y)
}

/// Backward of y = x · wᵀ: dw[out, in] += dyᵀ · x and, when asked, dx[t, in] = dy · w.
pub fn linear_backward(
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dims: (usize, usize, usize),
) {
    use super::matmul::{gemm, Threads};
    backward_products(dx, dw, x, w, dy, dims, |dst, a, b, acc| {
        gemm(dst, a, b, acc, Threads::Pool)
    });
}

/// The two products of `linear_backward`, computed by `product(dst, a, b, acc)`.
fn backward_products(
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    (t, d_in, d_out): (usize, usize, usize),
    product: impl Fn(&mut [f32], MatRef, MatRef, Accumulate),
) {
    assert_eq!(x.len(), t * d_in, "linear_backward: x");
    assert_eq!(w.len(), d_out * d_in, "linear_backward: w");
    assert_eq!(dy.len(), t * d_out, "linear_backward: dy");
    assert_eq!(dw.len(), d_out * d_in, "linear_backward: dw");
    let dy_t = MatRef::transposed(dy, d_out, t);
    product(dw, dy_t, MatRef::new(x, t, d_in), Accumulate::Add);
    if let Some(dx) = dx {
        assert_eq!(dx.len(), t * d_in, "linear_backward: dx");
        let (dy, w) = (MatRef::new(dy, t, d_out), MatRef::new(w, d_out, d_in));
        product(dx, dy, w, Accumulate::Overwrite);
    }
}

/// Backward of a bias broadcast over rows: db[out] += Σ_rows dy[·, out].
pub fn bias_backward(db: &mut [f32], dy: &[f32], d_out: usize) {
    assert_eq!(db.len(), d_out, "bias_backward: db");
    let mut sums = vec![0.0f64; d_out];
    for row in dy.chunks_exact(d_out) {
        sums.iter_mut().zip(row).for_each(|(s, &v)| *s += v as f64);
    }
    db.iter_mut().zip(&sums).for_each(|(d, &s)| *d += s as f32);
}

/// y = x · wᵀ (+ b) with `Accumulate::Overwrite`, y += x · wᵀ (+ b) with `Accumulate::Add`
/// (a residual connection without a temporary). y is [t, out] and is never read when
/// overwritten.
pub fn linear_into(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    (t, d_in, d_out): (usize, usize, usize),
    acc: Accumulate,
    cancel: Cancel,
) -> Result<()> {
    check_shapes(y, x, w.len(), b, (t, d_in, d_out));
    if streams_rows(t, d_out, false) {
        linear_each_row(y, x, w, b, (t, d_in, d_out), acc);
        return Ok(());
    }
    linear_many_rows(
        y,
        x,
        Matrix::F32(w),
        b,
        (t, d_in, d_out),
        acc,
        FLOPS_PER_SLICE,
        cancel,
    )
}

/// Whether `linear_bf16_into` / `linear_backward_bf16` run here (AMX tiles, `kernels::amx`).
pub fn bf16_products_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::amx::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `linear_into` with x and w rounded to bfloat16 and the products accumulated in float32
/// (mixed precision), on AMX tiles; only where `bf16_products_available()`.
#[cfg(target_arch = "x86_64")]
pub fn linear_bf16_into(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    (t, d_in, d_out): (usize, usize, usize),
    acc: Accumulate,
    cancel: Cancel,
) -> Result<()> {
    check_shapes(y, x, w.len(), b, (t, d_in, d_out));
    cancel.check()?;
    let acc = place_bias(y, b, d_out, acc);
    let (x, wt) = (MatRef::new(x, t, d_in), MatRef::transposed(w, d_in, d_out));
    super::amx::gemm_bf16(y, x, wt, acc);
    Ok(())
}

/// `linear_backward` with x, w and dy rounded to bfloat16 and the products accumulated in
/// float32, on AMX tiles; only where `bf16_products_available()`.
#[cfg(target_arch = "x86_64")]
pub fn linear_backward_bf16(
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dims: (usize, usize, usize),
) {
    backward_products(dx, dw, x, w, dy, dims, super::amx::gemm_bf16);
}

/// The compute-bound case: slices of output columns (weight rows), each transposed, packed and
/// multiplied once, so cancel is checked every `flops_per_slice` at most. The bias is placed in
/// (or added to) y first and the products accumulate onto it.
#[allow(clippy::too_many_arguments)]
fn linear_many_rows(
    y: &mut [f32],
    x: &[f32],
    w: Matrix,
    b: Option<&[f32]>,
    (t, d_in, d_out): (usize, usize, usize),
    acc: Accumulate,
    flops_per_slice: usize,
    cancel: Cancel,
) -> Result<()> {
    let acc = place_bias(y, b, d_out, acc);
    let xs = MatRef::new(x, t, d_in);
    if matmul::packs_any_layout(t, d_out) {
        // The product packs the [out, in] weights as they are (half ones widened as packed).
        return match w {
            Matrix::F32(w) => {
                let wt = MatRef::transposed(w, d_in, d_out);
                matmul::gemm_sliced(y, xs, wt, acc, flops_per_slice, cancel)
            }
            half => {
                matmul::gemm_half_weights_sliced(y, xs, half, d_out, acc, flops_per_slice, cancel)
            }
        };
    }
    // The matrix library packs the weights along the output index, which [out, in] storage
    // strides by a whole row: its packing then gathers one value per cache line (the rows'
    // stride maps them to the same few cache sets), slower than the product itself for a
    // 3072-wide input and ~90 ms per gpt3-125m pass whatever the rows. Each slice of weight
    // rows is transposed to [in, cols] first (8 × 8 register blocks, on the compute pool),
    // small enough (128 Ki values) to stay in L2 while the library packs its contiguous rows.
    let cols = slice_cols(t, d_in, d_out, flops_per_slice).min(TRANSPOSED_SLICE / d_in);
    let cols = cols.max(1).next_multiple_of(48);
    let mut w_t = tensor::alloc_zeroed(d_in * cols.min(d_out))?;
    for c0 in (0..d_out).step_by(cols) {
        cancel.check()?;
        let c1 = (c0 + cols).min(d_out);
        let (w_t, rows) = (&mut w_t[..d_in * (c1 - c0)], c1 - c0);
        let src = w.rows(c0 * d_in..c1 * d_in);
        // Blocks of w_t's rows (src's columns, 16 at a time: whole chunks of a grouped
        // matrix's rows) on the compute pool.
        parallel::for_rows(w_t, 16 * rows, |first, block| {
            let c = 16 * first..16 * first + block.len() / rows;
            simd::transpose_cols(src, rows, d_in, c, block);
        });
        let slice = MatRef::new(w_t, d_in, c1 - c0);
        gemm_into(&mut y[c0..], d_out, xs, slice, acc, Threads::Pool);
    }
    Ok(())
}

/// Values of a weight slice transposed at once (512 KB: it stays in L2 until packed).
const TRANSPOSED_SLICE: usize = 128 * 1024;

/// `linear_into` with every output row computed on its own (`linear_each_row`), whatever the
/// number of rows: row r of y is bit for bit what a one-row call on row r of x gives. Batched
/// decoding uses it, so a sequence decoded beside others gets exactly its tokens when alone.
pub fn linear_each_row_into(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    (t, d_in, d_out): (usize, usize, usize),
    acc: Accumulate,
) {
    check_shapes(y, x, w.len(), b, (t, d_in, d_out));
    linear_each_row(y, x, w, b, (t, d_in, d_out), acc);
}

/// Puts the bias in each row of y (or adds it, with `Accumulate::Add`) before products
/// accumulate onto it; returns how the products must then be accumulated.
fn place_bias(y: &mut [f32], b: Option<&[f32]>, d_out: usize, acc: Accumulate) -> Accumulate {
    let Some(b) = b else {
        return acc;
    };
    parallel::for_rows(y, d_out, |_, rows| {
        for row in rows.chunks_exact_mut(d_out) {
            match acc {
                Accumulate::Overwrite => row.copy_from_slice(b),
                Accumulate::Add => row.iter_mut().zip(b).for_each(|(v, b)| *v += b),
            }
        }
    });
    Accumulate::Add
}

/// The callers' contract: x [t, in], w [out, in] (`w_len` values), y [t, out], b [out].
fn check_shapes(
    y: &[f32],
    x: &[f32],
    w_len: usize,
    b: Option<&[f32]>,
    (t, d_in, d_out): (usize, usize, usize),
) {
    assert_eq!(x.len(), t * d_in, "linear: x");
    assert_eq!(w_len, d_out * d_in, "linear: w");
    assert_eq!(y.len(), t * d_out, "linear: y");
    if let Some(b) = b {
        assert_eq!(b.len(), d_out, "linear: b");
    }
}

/// cells[i] = dots[i] + bias (or += with `Accumulate::Add`).
fn put<const N: usize>(cells: &mut [f32], dots: [f32; N], bias: f32, acc: Accumulate) {
    for (c, d) in cells.iter_mut().zip(dots) {
        match acc {
            Accumulate::Overwrite => *c = d + bias,
            Accumulate::Add => *c += d + bias,
        }
    }
}

/// The memory-bound case (few rows, or rows that must not influence each other): each weight
/// row is read once and dotted with every row of x, eight or four rows at a time (`simd::dot8`,
/// `simd::dot4`: the same bits as one `simd::dot` per row); tasks own ranges of output rows.
fn linear_each_row(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    (t, d_in, d_out): (usize, usize, usize),
    acc: Accumulate,
) {
    let x_row = |i: usize| &x[i * d_in..(i + 1) * d_in];
    // Rows ti.. of one output row's cells (all of them when ti = 0): eight, four, then one at
    // a time.
    let rest_of_row = |cell: &mut [f32], mut ti: usize, row: &[f32], bias: f32, cell_acc| {
        while ti + 8 <= t {
            put(
                &mut cell[ti..ti + 8],
                simd::dot8(std::array::from_fn(|k| x_row(ti + k)), row),
                bias,
                cell_acc,
            );
            ti += 8;
        }
        while ti + 4 <= t {
            let rows = [x_row(ti), x_row(ti + 1), x_row(ti + 2), x_row(ti + 3)];
            put(&mut cell[ti..ti + 4], simd::dot4(rows, row), bias, cell_acc);
            ti += 4;
        }
        for (i, c) in cell.iter_mut().enumerate().skip(ti) {
            put(
                std::slice::from_mut(c),
                [simd::dot(x_row(i), row)],
                bias,
                cell_acc,
            );
        }
    };
    let one_row = t == 1;
    by_output_rows(y, (t, d_out), acc, ROWS_PER_TASK, |o0, out, cell_acc| {
        let w_row = |o: usize| &w[o * d_in..(o + 1) * d_in];
        let bias = |o: usize| b.map_or(0.0, |b| b[o]);
        if one_row {
            // Four weight rows per load of x, in the order they lie in memory.
            let mut quads = out.chunks_exact_mut(4);
            let whole = quads.len();
            for (q, cells) in quads.by_ref().enumerate() {
                let o = o0 + 4 * q;
                let rows = [w_row(o), w_row(o + 1), w_row(o + 2), w_row(o + 3)];
                let dots = simd::dot_rows(x, rows);
                for (k, (cell, dot)) in cells.iter_mut().zip(dots).enumerate() {
                    put(std::slice::from_mut(cell), [dot], bias(o + k), cell_acc);
                }
            }
            let o1 = o0 + 4 * whole;
            for (k, cell) in quads.into_remainder().iter_mut().enumerate() {
                let dot = simd::dot(x, w_row(o1 + k));
                put(std::slice::from_mut(cell), [dot], bias(o1 + k), cell_acc);
            }
            return;
        }
        let mut cells = out.chunks_exact_mut(t).enumerate();
        while let Some((r, cell)) = cells.next() {
            let o = o0 + r;
            let row = &w[o * d_in..(o + 1) * d_in];
            let bias = b.map_or(0.0, |b| b[o]);
            let mut ti = 0;
            // Two weight rows share each load of eight rows of x, while the two
            // after them (the next pair's) are prefetched.
            if t >= 8 {
                if let Some((_, next)) = cells.next() {
                    let row2 = &w[(o + 1) * d_in..(o + 2) * d_in];
                    let bias2 = b.map_or(0.0, |b| b[o + 1]);
                    let ahead = w.get((o + 2) * d_in..(o + 4) * d_in).unwrap_or(&[]);
                    while ti + 8 <= t {
                        let rows = std::array::from_fn(|k| x_row(ti + k));
                        let [d1, d2] = simd::dot8x2(rows, [row, row2], ahead);
                        put(&mut cell[ti..ti + 8], d1, bias, cell_acc);
                        put(&mut next[ti..ti + 8], d2, bias2, cell_acc);
                        ti += 8;
                    }
                    rest_of_row(next, ti, row2, bias2, cell_acc);
                }
            }
            rest_of_row(cell, ti, row, bias, cell_acc);
        }
    });
}

/// Runs `fill(first_row, cells, cell_acc)` on the compute pool over tasks of `rows_per_task`
/// output rows, whose cells are [rows, t]. With one row of x that is y's own layout: the tasks
/// write y, accumulating as the caller asked (`cell_acc` = `acc`); with more they overwrite a
/// transposed buffer that is then put into y.
fn by_output_rows(
    y: &mut [f32],
    (t, d_out): (usize, usize),
    acc: Accumulate,
    rows_per_task: usize,
    fill: impl Fn(usize, &mut [f32], Accumulate) + Sync + Send,
) {
    if t == 1 {
        parallel::install(|| {
            y.par_chunks_mut(rows_per_task)
                .enumerate()
                .for_each(|(chunk, out)| fill(chunk * rows_per_task, out, acc))
        });
        return;
    }
    let mut yt = vec![0.0f32; d_out * t];
    parallel::install(|| {
        yt.par_chunks_mut(rows_per_task * t)
            .enumerate()
            .for_each(|(chunk, out)| fill(chunk * rows_per_task, out, Accumulate::Overwrite))
    });
    transpose_into(y, &yt, (t, d_out), acc);
}

/// y[t, out] = yt[out, t]ᵀ (or += with `Accumulate::Add`).
fn transpose_into(y: &mut [f32], yt: &[f32], (t, d_out): (usize, usize), acc: Accumulate) {
    for o in 0..d_out {
        for ti in 0..t {
            let (dst, v) = (&mut y[ti * d_out + o], yt[o * t + ti]);
            match acc {
                Accumulate::Overwrite => *dst = v,
                Accumulate::Add => *dst += v,
            }
        }
    }
}

/// `linear_into` for half-precision weights (`Matrix::Half` or `Matrix::Grouped`, widened
/// exactly, accumulated in float32). With few rows, or `each_row`, every output row is
/// computed on its own, one `simd::dot_half` per cell (the same bits whatever rows run beside
/// it); with more, `linear_many_rows` widens the weights as the AVX2 product packs them (or,
/// elsewhere, each slice of weight rows as it transposes it for the `gemm` crate).
#[allow(clippy::too_many_arguments)]
pub fn linear_half_into(
    y: &mut [f32],
    x: &[f32],
    w: Matrix,
    b: Option<&[f32]>,
    (t, d_in, d_out): (usize, usize, usize),
    acc: Accumulate,
    each_row: bool,
    cancel: Cancel,
) -> Result<()> {
    assert!(
        !matches!(w, Matrix::F32(_)),
        "linear_half_into: float32 weights"
    );
    check_shapes(y, x, w.len(), b, (t, d_in, d_out));
    if each_row || streams_rows(t, d_out, true) {
        half_each_row(y, x, w, b, (t, d_in, d_out), acc);
        return Ok(());
    }
    linear_many_rows(y, x, w, b, (t, d_in, d_out), acc, FLOPS_PER_SLICE, cancel)
}

/// The memory-bound half-precision case: tasks own ranges of output rows; each weight row is
/// read once (from memory) and dotted with every row of x (from the cache). Four rows at a
/// time share each load of x: a group of a grouped matrix (one sequential stream), or four
/// row-major rows.
fn half_each_row(
    y: &mut [f32],
    x: &[f32],
    w: Matrix,
    b: Option<&[f32]>,
    (t, d_in, d_out): (usize, usize, usize),
    acc: Accumulate,
) {
    let (bits, h, grouped) = match w {
        Matrix::Half(bits, h) => (bits, h, false),
        Matrix::Grouped(bits, h, cols) => {
            assert_eq!(cols, d_in, "half_each_row: grouped rows of another length");
            (bits, h, true)
        }
        Matrix::F32(_) => unreachable!("half_each_row: float32 weights"),
    };
    by_output_rows(
        y,
        (t, d_out),
        acc,
        HALF_ROWS_PER_TASK,
        |o0, out, cell_acc| {
            // Tasks start on whole groups; the rows after the last whole group are row-major.
            let w_row = |o: usize| &bits[o * d_in..(o + 1) * d_in];
            let bias = |o: usize| b.map_or(0.0, |b| b[o]);
            let whole_quads = out.len() / (4 * t);
            let mut quads = out.chunks_exact_mut(4 * t);
            for (q, cells) in quads.by_ref().enumerate() {
                let o = o0 + 4 * q;
                for ti in 0..t {
                    let x = &x[ti * d_in..(ti + 1) * d_in];
                    let dots = if grouped {
                        simd::dot_half_group(x, &bits[o * d_in..(o + 4) * d_in], h)
                    } else {
                        let rows = [w_row(o), w_row(o + 1), w_row(o + 2), w_row(o + 3)];
                        simd::dot_half_rows(x, rows, h)
                    };
                    for (k, dot) in dots.into_iter().enumerate() {
                        let cell = &mut cells[k * t + ti..k * t + ti + 1];
                        put(cell, [dot], bias(o + k), cell_acc);
                    }
                }
            }
            let rest = quads.into_remainder();
            let o1 = o0 + 4 * whole_quads;
            for (r, cell) in rest.chunks_exact_mut(t).enumerate() {
                let o = o1 + r;
                for (ti, c) in cell.iter_mut().enumerate() {
                    let dot = simd::dot_half(&x[ti * d_in..(ti + 1) * d_in], w_row(o), h);
                    put(std::slice::from_mut(c), [dot], bias(o), cell_acc);
                }
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each row of a many-row `linear_each_row_into` is the same bits as that row alone.
    #[test]
    fn each_row_results_do_not_depend_on_the_other_rows() {
        let (d_in, d_out, t) = (70, 130, 11);
        let w: Vec<f32> = (0..d_in * d_out)
            .map(|i| ((i * 17 % 31) as f32 - 15.0) * 0.02)
            .collect();
        let b: Vec<f32> = (0..d_out).map(|i| i as f32 * 0.003).collect();
        let x: Vec<f32> = (0..t * d_in)
            .map(|i| ((i * 5 % 23) as f32 - 11.0) * 0.09)
            .collect();
        let mut all = vec![0.0; t * d_out];
        let dims = (t, d_in, d_out);
        linear_each_row_into(&mut all, &x, &w, Some(&b), dims, Accumulate::Overwrite);
        for r in 0..t {
            let one = linear(
                &x[r * d_in..(r + 1) * d_in],
                &w,
                Some(&b),
                1,
                d_in,
                d_out,
                Cancel::NEVER,
            )
            .unwrap();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&all[r * d_out..(r + 1) * d_out]),
                bits(&one),
                "row {r}"
            );
        }
    }

    /// Half-precision weights give the float32 product of their widening on every path (rows
    /// streamed one at a time, and prompt-sized products, whose weights are widened as packed
    /// or as transposed), with a bias and accumulating onto y.
    #[test]
    fn half_weights_match_their_float32_widening() {
        use crate::model::dtype::{grouped, Half};
        let d_out = 301;
        let b: Vec<f32> = (0..d_out).map(|i| i as f32 * 0.001).collect();
        // Row-major weights (rows of 70), and grouped ones (rows of 64; the last row after
        // the whole groups row-major).
        for (h, d_in) in [
            (Half::Bf16, 70),
            (Half::F16, 70),
            (Half::Bf16, 64),
            (Half::F16, 64),
        ] {
            let bits: Vec<u16> = (0..d_in * d_out)
                .map(|i| h.narrow(((i * 13 % 29) as f32 - 14.0) * 0.01))
                .collect();
            let w: Vec<f32> = bits.iter().map(|&v| h.widen(v)).collect();
            let grouped_bits = grouped(&bits, d_in);
            let half = if d_in % 16 == 0 {
                Matrix::Grouped(&grouped_bits, h, d_in)
            } else {
                Matrix::Half(&bits, h)
            };
            for t in [1, 8, HALF_SMALL_T + 1, 300] {
                let x: Vec<f32> = (0..t * d_in)
                    .map(|i| ((i * 7 % 17) as f32 - 8.0) * 0.1)
                    .collect();
                let dims = (t, d_in, d_out);
                let start: Vec<f32> = (0..t * d_out).map(|i| (i % 5) as f32).collect();
                let (mut want, mut got) = (start.clone(), start);
                let add = Accumulate::Add;
                linear_into(&mut want, &x, &w, Some(&b), dims, add, Cancel::NEVER).unwrap();
                linear_half_into(
                    &mut got,
                    &x,
                    half,
                    Some(&b),
                    dims,
                    add,
                    false,
                    Cancel::NEVER,
                )
                .unwrap();
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(g, w)| (g - w).abs())
                    .fold(0.0, f32::max);
                assert!(worst < 1e-5, "{h:?}, {t} rows: {worst}");
            }
        }
    }

    #[test]
    fn small_and_large_paths_agree_with_naive() {
        let (d_in, d_out) = (37, 300);
        let w: Vec<f32> = (0..d_in * d_out)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) * 0.01)
            .collect();
        let b: Vec<f32> = (0..d_out).map(|i| i as f32 * 0.001).collect();
        for t in [1, 3, 9, 300] {
            let x: Vec<f32> = (0..t * d_in)
                .map(|i| ((i * 7 % 17) as f32 - 8.0) * 0.1)
                .collect();
            let y = linear(&x, &w, Some(&b), t, d_in, d_out, Cancel::NEVER).unwrap();
            let dims = (t, d_in, d_out);
            let max_diff = |p: &[f32], q: &[f32]| {
                p.iter()
                    .zip(q)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0.0, f32::max)
            };
            // Accumulating onto a residual adds exactly the product and the bias.
            let residual: Vec<f32> = (0..t * d_out).map(|i| (i % 11) as f32 - 5.0).collect();
            let mut summed = residual.clone();
            let add = Accumulate::Add;
            linear_into(&mut summed, &x, &w, Some(&b), dims, add, Cancel::NEVER).unwrap();
            let expected: Vec<f32> = residual.iter().zip(&y).map(|(r, y)| r + y).collect();
            assert!(max_diff(&summed, &expected) < 1e-5);
            // Many column slices (the last one ragged), with and without bias, agree too.
            if t > SMALL_T {
                let overwrite = Accumulate::Overwrite;
                let mut sliced = vec![f32::NAN; t * d_out];
                linear_many_rows(
                    &mut sliced,
                    &x,
                    Matrix::F32(&w),
                    Some(&b),
                    dims,
                    overwrite,
                    1,
                    Cancel::NEVER,
                )
                .unwrap();
                assert!(max_diff(&sliced, &y) < 1e-5);
                let mut no_bias = vec![f32::NAN; t * d_out];
                linear_many_rows(
                    &mut no_bias,
                    &x,
                    Matrix::F32(&w),
                    None,
                    dims,
                    overwrite,
                    1,
                    Cancel::NEVER,
                )
                .unwrap();
                let biased: Vec<f32> = no_bias
                    .chunks(d_out)
                    .flat_map(|r| r.iter().zip(&b).map(|(v, b)| v + b))
                    .collect();
                assert!(max_diff(&biased, &y) < 1e-5);
                let mut summed = residual.clone();
                linear_many_rows(
                    &mut summed,
                    &x,
                    Matrix::F32(&w),
                    None,
                    dims,
                    add,
                    1,
                    Cancel::NEVER,
                )
                .unwrap();
                let plus_bias: Vec<f32> = summed
                    .chunks(d_out)
                    .flat_map(|r| r.iter().zip(&b).map(|(v, b)| v + b))
                    .collect();
                assert!(max_diff(&plus_bias, &expected) < 1e-5);
            }
            for ti in 0..t {
                for o in 0..d_out {
                    let e: f32 = (0..d_in)
                        .map(|k| x[ti * d_in + k] * w[o * d_in + k])
                        .sum::<f32>()
                        + b[o];
                    assert!((y[ti * d_out + o] - e).abs() < 1e-4, "t={t} o={o}");
                }
            }
        }
    }
}
