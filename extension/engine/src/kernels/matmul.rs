//! Matrix products on top of the `gemm` crate (cache-blocked, AVX2/FMA/AVX-512 chosen at run
//! time, multi-threaded on the engine's compute pool).
//!
//! Layout: every matrix is a strided view over a float32 slice, so transposed operands
//! (`x · Wᵀ` with W stored [out, in]) need no copy.

use gemm::Parallelism;

use crate::error::{EngineError, Result};
use crate::model::dtype::Matrix;
use crate::parallel::{self, Cancel};
use crate::tensor;

/// A read-only matrix view: element (r, c) lives at `data[r * row_stride + c * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major [rows, cols] matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols, 1)
    }

    /// The transpose of a row-major [cols, rows] matrix, viewed as [rows, cols].
    pub fn transposed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, 1, rows)
    }

    /// A general strided view. Panics if the view reaches outside `data` (a programming error).
    pub fn strided(
        data: &'a [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * row_stride + (cols - 1) * col_stride;
            assert!(
                last < data.len(),
                "matrix view [{rows}, {cols}] reaches past its {} values",
                data.len()
            );
        }
        Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn row_stride(&self) -> usize {
        self.row_stride
    }

    pub fn col_stride(&self) -> usize {
        self.col_stride
    }

    /// The values the view reads (element (r, c) at r·row_stride + c·col_stride).
    pub fn data(&self) -> &'a [f32] {
        self.data
    }

    /// Columns `start..end` of this view.
    pub fn col_range(&self, start: usize, end: usize) -> Self {
        assert!(start <= end && end <= self.cols);
        let data = if end > start {
            &self.data[start * self.col_stride..]
        } else {
            &self.data[..0]
        };
        Self {
            data,
            cols: end - start,
            ..*self
        }
    }
}

/// Whether the product overwrites the destination or adds to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accumulate {
    Overwrite,
    Add,
}

/// How many threads a product may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    /// The engine's configured compute pool.
    Pool,
    /// The calling thread only (for use inside already-parallel code).
    Single,
}

/// dst[m, n] (row-major, contiguous) = a[m, k] · b[k, n], or += with `Accumulate::Add`.
pub fn gemm(dst: &mut [f32], a: MatRef, b: MatRef, acc: Accumulate, threads: Threads) {
    gemm_into(dst, b.cols, a, b, acc, threads)
}

/// Like `gemm`, with row r of the result at dst[r * dst_stride..] (a column block of a wider
/// row-major matrix).
pub(crate) fn gemm_into(
    dst: &mut [f32],
    dst_stride: usize,
    a: MatRef,
    b: MatRef,
    acc: Accumulate,
    threads: Threads,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "inner dimensions differ");
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        dst_stride >= n && dst.len() >= (m - 1) * dst_stride + n,
        "destination too small"
    );
    if k == 0 {
        if acc == Accumulate::Overwrite {
            for r in 0..m {
                dst[r * dst_stride..r * dst_stride + n].fill(0.0);
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if packs_any_layout(m, n) {
        let n_threads = match threads {
            Threads::Single => 1,
            Threads::Pool => parallel::threads(),
        };
        let b = super::gemm_avx2::Rhs::F32(b);
        let run = |dst: &mut [f32]| super::gemm_avx2::gemm(dst, dst_stride, a, b, acc, n_threads);
        return if n_threads > 1 {
            parallel::install(|| run(dst))
        } else {
            run(dst)
        };
    }
    let mut run = |parallelism| {
        // SAFETY: the views were bounds-checked at construction and dst holds m*n values;
        // gemm computes dst = alpha*dst + beta*a*b.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                dst_stride as isize,
                acc == Accumulate::Add,
                a.data.as_ptr(),
                a.col_stride as isize,
                a.row_stride as isize,
                b.data.as_ptr(),
                b.col_stride as isize,
                b.row_stride as isize,
                1.0f32,
                1.0f32,
                false,
                false,
                false,
                parallelism,
            )
        }
    };
    match threads {
        Threads::Single => run(Parallelism::None),
        Threads::Pool => {
            let n_threads = parallel::threads();
            if n_threads <= 1 {
                run(Parallelism::None)
            } else {
                parallel::install(|| run(Parallelism::Rayon(n_threads)))
            }
        }
    }
}

/// Whether `gemm_into` packs an [m, ·] · [·, n] product's operands from any layout at full
/// speed here (its own AVX2 product), so a transposed weight view needs no copy first.
pub(crate) fn packs_any_layout(m: usize, n: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::gemm_avx2::suits(m, n);
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Work per uninterruptible slice of a large product (floating-point operations): about
/// 12 ms on two cores, so a cancel request is honoured well within 100 ms.
pub const FLOPS_PER_SLICE: usize = 2_000_000_000;

/// Columns per slice of an [m, k] · [k, n] product of at most `flops_per_slice` per slice: of
/// equal widths (one slice of 2544 columns and one of 528 would leave a thread idle in the
/// short one), a multiple of 48 to keep slice edges on whole micro-kernel tiles.
pub(crate) fn slice_cols(m: usize, k: usize, n: usize, flops_per_slice: usize) -> usize {
    let most = (flops_per_slice / (2 * m * k).max(1)).max(1);
    n.div_ceil(n.div_ceil(most).max(1))
        .max(1)
        .next_multiple_of(48)
}

/// dst[m, n] (row-major, contiguous) = a · b, or += with `Accumulate::Add`, on the compute
/// pool in slices of b's columns of at most `flops_per_slice` each, checking `cancel` before
/// every slice. Each column block of b is packed once (slicing a's rows instead would pack all
/// of b again for every slice).
pub fn gemm_sliced(
    dst: &mut [f32],
    a: MatRef,
    b: MatRef,
    acc: Accumulate,
    flops_per_slice: usize,
    cancel: Cancel,
) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    in_column_slices((m, k, n), flops_per_slice, cancel, |c0, c1| {
        let b = b.col_range(c0, c1);
        gemm_into(&mut dst[c0..], n, a, b, acc, Threads::Pool)
    })
}

/// Runs `product(c0, c1)` for the column slices of an [m, k] · [k, n] product, of at most
/// `flops_per_slice` each (`slice_cols`), checking `cancel` before every slice.
fn in_column_slices(
    (m, k, n): (usize, usize, usize),
    flops_per_slice: usize,
    cancel: Cancel,
    mut product: impl FnMut(usize, usize),
) -> Result<()> {
    let cols = slice_cols(m, k, n, flops_per_slice);
    for c0 in (0..n).step_by(cols) {
        cancel.check()?;
        product(c0, (c0 + cols).min(n));
    }
    Ok(())
}

/// `gemm_sliced` of a [m, k] by the transpose of half-precision weights w [n, k]
/// (`Matrix::Half` or `Matrix::Grouped`), widened exactly as the product packs them: the same
/// values and arithmetic as a float32 copy of the weights. Only where `packs_any_layout(m, n)`
/// holds.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub(crate) fn gemm_half_weights_sliced(
    dst: &mut [f32],
    a: MatRef,
    w: Matrix,
    n: usize,
    acc: Accumulate,
    flops_per_slice: usize,
    cancel: Cancel,
) -> Result<()> {
    let (m, k) = (a.rows, a.cols);
    assert!(
        packs_any_layout(m, n),
        "half weights: no product packs them here"
    );
    #[cfg(target_arch = "x86_64")]
    {
        let b = super::gemm_avx2::Rhs::half_weights(w, n, k);
        let threads = parallel::threads();
        in_column_slices((m, k, n), flops_per_slice, cancel, |c0, c1| {
            let b = b.col_range(c0, c1);
            parallel::install(|| super::gemm_avx2::gemm(&mut dst[c0..], n, a, b, acc, threads))
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("packs_any_layout holds only on x86-64")
}

/// C[m, n] = A[m, k] · B[k, n] for row-major operands, validated; a large product runs in
/// slices (`gemm_sliced`) so a cancel request is honoured between them. A product beyond
/// float32's range is `OutOfRange`, and so is one whose float32 partial sums overflow (an
/// infinity is not brought back by later terms).
pub fn matmul(
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    cancel: Cancel,
) -> Result<Vec<f32>> {
    check_operands(a, b, m, k, n)?;
    let mut out = tensor::alloc_zeroed(tensor::numel(&[m, n], "matmul result")?)?;
    matmul_into(&mut out, a, b, m, k, n, cancel)?;
    Ok(out)
}

/// `matmul` writing its [m, n] result into `out` (for example a SQL result value), which must
/// hold exactly m·n values; their previous contents do not matter.
pub fn matmul_into(
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    cancel: Cancel,
) -> Result<()> {
    check_operands(a, b, m, k, n)?;
    if out.len() != m * n {
        return Err(EngineError::invalid(format!(
            "matmul result has room for {} values; [m={m}, n={n}] needs {}",
            out.len(),
            m * n
        )));
    }
    if m <= SMALL_M {
        cancel.check()?;
        small_m_product(out, a, b, m, k, n);
    } else {
        gemm_sliced(
            out,
            MatRef::new(a, m, k),
            MatRef::new(b, k, n),
            Accumulate::Overwrite,
            FLOPS_PER_SLICE,
            cancel,
        )?;
    }
    tensor::check_result(out, "matmul result")
}

fn check_operands(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Result<()> {
    if a.len() != m * k || b.len() != k * n {
        return Err(EngineError::invalid(format!(
            "matmul operands have {} and {} values; [m={m}, k={k}] and [k={k}, n={n}] need {} and {}",
            a.len(),
            b.len(),
            m * k,
            k * n
        )));
    }
    Ok(())
}

/// Up to this many rows of A, a product is a few matrix-vector products (decode, beam
/// search): memory-bound, so B is streamed once and shared by all rows.
const SMALL_M: usize = 4;
/// Least columns of B per task of the small-m product. Tasks stream long contiguous runs of
/// each row of B (short runs at a large stride defeat the hardware prefetcher).
const SMALL_M_MIN_COLS: usize = 4096;

/// out[m, n] = a[m, k] · b[k, n] for m ≤ SMALL_M, parallel over column blocks of B.
fn small_m_product(out: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize) {
    use rayon::prelude::*;
    let tasks = parallel::threads().min(n.div_ceil(SMALL_M_MIN_COLS)).max(1);
    let cols = n.div_ceil(tasks);
    let blocks: Vec<(usize, Vec<f32>)> = parallel::install(|| {
        (0..tasks)
            .into_par_iter()
            .map(|blk| {
                let c0 = blk * cols;
                let w = cols.min(n - c0);
                let mut acc = vec![0.0f32; m * w];
                let row = |p: usize| &b[p * n + c0..p * n + c0 + w];
                let mut p = 0;
                while p + 4 <= k {
                    let rows = [row(p), row(p + 1), row(p + 2), row(p + 3)];
                    for i in 0..m {
                        let coef = [
                            a[i * k + p],
                            a[i * k + p + 1],
                            a[i * k + p + 2],
                            a[i * k + p + 3],
                        ];
                        crate::simd::axpy4(&mut acc[i * w..(i + 1) * w], coef, rows);
                    }
                    p += 4;
                }
                for p in p..k {
                    for i in 0..m {
                        crate::simd::axpy(&mut acc[i * w..(i + 1) * w], a[i * k + p], row(p));
                    }
                }
                (c0, acc)
            })
            .collect()
    });
    for (c0, acc) in blocks {
        let w = acc.len() / m;
        for i in 0..m {
            out[i * n + c0..i * n + c0 + w].copy_from_slice(&acc[i * w..(i + 1) * w]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                    .sum::<f64>() as f32;
            }
        }
        c
    }

    fn seq(n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * scale)
            .collect()
    }

    #[test]
    fn matches_naive_on_odd_shapes() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 5, 7),
            (17, 33, 65),
            (1, 768, 1300),
            (4, 9, 515),
            (130, 70, 1),
        ] {
            let a = seq(m * k, 0.01);
            let b = seq(k * n, 0.02);
            let c = matmul(&a, &b, m, k, n, Cancel::NEVER).unwrap();
            for (x, y) in c.iter().zip(naive(&a, &b, m, k, n)) {
                assert!(
                    (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                    "{x} vs {y} at {m}x{k}x{n}"
                );
            }
        }
    }

    #[test]
    fn transposed_view_and_accumulate() {
        // a [2,3], w stored [4,3] (out, in): a · wᵀ is [2,4].
        let a = seq(6, 0.1);
        let w = seq(12, 0.1);
        let mut wt = vec![0.0; 12];
        for r in 0..4 {
            for c in 0..3 {
                wt[c * 4 + r] = w[r * 3 + c];
            }
        }
        let expect = naive(&a, &wt, 2, 3, 4);
        let mut out = vec![1.0f32; 8];
        gemm(
            &mut out,
            MatRef::new(&a, 2, 3),
            MatRef::transposed(&w, 3, 4),
            Accumulate::Add,
            Threads::Single,
        );
        for (x, y) in out.iter().zip(expect) {
            assert!((x - (y + 1.0)).abs() < 1e-5);
        }
    }

    #[test]
    fn column_slices_match_one_product() {
        // 1 FLOP per slice: 48-column slices, the last one ragged, on a row-major b.
        let (m, k, n) = (7, 5, 101);
        let (a, b) = (seq(m * k, 0.3), seq(k * n, 0.2));
        let expect = naive(&a, &b, m, k, n);
        let mut out = vec![f32::NAN; m * n];
        let (av, bv) = (MatRef::new(&a, m, k), MatRef::new(&b, k, n));
        gemm_sliced(&mut out, av, bv, Accumulate::Overwrite, 1, Cancel::NEVER).unwrap();
        for (x, y) in out.iter().zip(&expect) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
        let stop = || true;
        let cancelled = gemm_sliced(&mut out, av, bv, Accumulate::Add, 1, Cancel::new(&stop));
        assert_eq!(cancelled, Err(EngineError::Cancelled));
    }

    #[test]
    fn rejects_wrong_lengths() {
        let err = matmul(&[1.0; 5], &[1.0; 6], 2, 3, 2, Cancel::NEVER).unwrap_err();
        assert_eq!(err.sqlstate(), "22023");
    }

    #[test]
    fn overflow_is_out_of_range() {
        // Both paths: m ≤ SMALL_M and the sliced product.
        for m in [1, 9] {
            let a = vec![3e38f32; m * 2];
            let err = matmul(&a, &[1.0, 1.0], m, 2, 1, Cancel::NEVER).unwrap_err();
            assert!(matches!(err, EngineError::OutOfRange(_)), "{err}");
            let c = matmul(&a, &[1.0, -1.0], m, 2, 1, Cancel::NEVER).unwrap();
            assert!(c.iter().all(|v| *v == 0.0));
        }
    }

    #[test]
    fn honours_cancel() {
        let stop = || true;
        let err = matmul(&[1.0; 4], &[1.0; 4], 2, 2, 2, Cancel::new(&stop)).unwrap_err();
        assert_eq!(err, EngineError::Cancelled);
    }

    /// A non-finite operand value always shows in the result of `matmul_into` and
    /// `linear_into`, whatever the product's path (few rows, k ≤ 2, small, general) and even
    /// against zeros, so `blame_operands` reports it as checking the operands first would.
    #[test]
    fn a_non_finite_operand_is_traced_through_the_result() {
        use crate::kernels::linear::linear_into;
        use crate::tensor::{blame_operands, check_finite, check_result, Finite};
        let expect = |values: &[f32], arg: &str| {
            check_finite(values, arg, Finite::Required)
                .unwrap_err()
                .to_string()
        };
        // x [m, k] · w [n, k]ᵀ + bias [n] as a linear layer, its error traced.
        let linear_error = |x: &[f32], w: &[f32], bias: &[f32], (m, k, n)| {
            let mut y = vec![0.0; m * n];
            let dims = (m, k, n);
            let product = linear_into(
                &mut y,
                x,
                w,
                Some(bias),
                dims,
                Accumulate::Overwrite,
                Cancel::NEVER,
            )
            .and_then(|()| check_result(&y, "y"));
            let operands = [(x, "x"), (w, "w"), (bias, "b")];
            blame_operands(product, m * n, &operands)
                .unwrap_err()
                .to_string()
        };
        for (m, k, n) in [(1, 3, 5), (3, 2, 7), (5, 1, 3), (16, 16, 16), (70, 33, 90)] {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                for zeros in [false, true] {
                    let fill = |len: usize| -> Vec<f32> {
                        if zeros {
                            vec![0.0; len]
                        } else {
                            seq(len, 0.1)
                        }
                    };
                    let places = [
                        (0, 0),
                        (0, m * k - 1),
                        (1, 0),
                        (1, k * n / 2),
                        (1, k * n - 1),
                    ];
                    for (which, at) in places {
                        let (mut a, mut b) = (fill(m * k), fill(k * n));
                        if which == 0 {
                            a[at] = bad
                        } else {
                            b[at] = bad
                        }
                        let mut c = vec![0.0; m * n];
                        let got = blame_operands(
                            matmul_into(&mut c, &a, &b, m, k, n, Cancel::NEVER),
                            m * n,
                            &[(&a, "a"), (&b, "b")],
                        );
                        let want = if which == 0 {
                            expect(&a, "a")
                        } else {
                            expect(&b, "b")
                        };
                        assert_eq!(got.unwrap_err().to_string(), want, "{m}x{k}x{n} {bad}");

                        // The same operands as a linear layer's x [m, k] and w [n, k].
                        let want = if which == 0 {
                            expect(&a, "x")
                        } else {
                            expect(&b, "w")
                        };
                        let got = linear_error(&a, &b, &fill(n), (m, k, n));
                        assert_eq!(got, want, "linear {m}x{k}x{n} {bad}");
                    }
                    let mut bias = fill(n);
                    bias[n - 1] = bad;
                    let got = linear_error(&fill(m * k), &fill(k * n), &bias, (m, k, n));
                    assert_eq!(got, expect(&bias, "b"));
                }
            }
        }
        // Finite operands whose product overflows keep the overflow error; an empty result
        // has its operands checked directly.
        let (a, b) = (vec![3e38f32; 4], vec![3e38f32; 4]);
        let mut c = vec![0.0; 4];
        let got = blame_operands(
            matmul_into(&mut c, &a, &b, 2, 2, 2, Cancel::NEVER),
            4,
            &[(&a, "a"), (&b, "b")],
        );
        assert!(matches!(got, Err(EngineError::OutOfRange(_))));
        let b = vec![f32::NAN; 3];
        let got = blame_operands(Ok(()), 0, &[(&[], "a"), (&b, "b")]);
        assert_eq!(got.unwrap_err().to_string(), expect(&b, "b"));
    }
}
