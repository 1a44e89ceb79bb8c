//! Linear layers y = x · Wᵀ + b with W stored [out, in] (PyTorch `Linear`).
//! Layout: x [t, in], y [t, out], row-major.

use rayon::prelude::*;

use super::matmul::{gemm, Accumulate, MatRef, Threads};
use crate::error::Result;
use crate::parallel::{self, Cancel};
use crate::simd;

/// Up to this many rows of x, the product is memory-bound: each weight row is streamed once and
/// dotted with every row of x.
const SMALL_T: usize = 4;
/// Output rows per task in the small-t path.
const ROWS_PER_TASK: usize = 64;
/// Rows of x per uninterruptible product in the large-t path: a 256 × 768 · 768 × 3072 slice
/// is about 10 ms on two cores, so a cancel request is seen well within 100 ms.
const ROWS_PER_SLICE: usize = 256;

/// y[t, out] = x[t, in] · w[out, in]ᵀ (+ b), checking `cancel` between row slices.
pub fn linear(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    t: usize,
    d_in: usize,
    d_out: usize,
    cancel: Cancel,
) -> Result<Vec<f32>> {
    assert_eq!(x.len(), t * d_in, "linear: x");
    assert_eq!(w.len(), d_out * d_in, "linear: w");
    let mut y = vec![0.0f32; t * d_out];
    if t <= SMALL_T {
        // yt[out, t]: each task owns a range of output rows, contiguous in yt.
        let mut yt = vec![0.0f32; d_out * t];
        parallel::install(|| {
            yt.par_chunks_mut(ROWS_PER_TASK * t)
                .enumerate()
                .for_each(|(chunk, out)| {
                    let o0 = chunk * ROWS_PER_TASK;
                    for (r, cell) in out.chunks_exact_mut(t).enumerate() {
                        let row = &w[(o0 + r) * d_in..(o0 + r + 1) * d_in];
                        for (ti, c) in cell.iter_mut().enumerate() {
                            *c = simd::dot(&x[ti * d_in..(ti + 1) * d_in], row);
                        }
                    }
                })
        });
        for o in 0..d_out {
            for ti in 0..t {
                y[ti * d_out + o] = yt[o * t + ti];
            }
        }
    } else {
        for r0 in (0..t).step_by(ROWS_PER_SLICE) {
            cancel.check()?;
            let r1 = (r0 + ROWS_PER_SLICE).min(t);
            let xs = MatRef::new(&x[r0 * d_in..r1 * d_in], r1 - r0, d_in);
            gemm(
                &mut y[r0 * d_out..r1 * d_out],
                xs,
                MatRef::transposed(w, d_in, d_out),
                Accumulate::Overwrite,
                Threads::Pool,
            );
        }
    }
    if let Some(b) = b {
        assert_eq!(b.len(), d_out, "linear: b");
        for row in y.chunks_exact_mut(d_out) {
            row.iter_mut().zip(b).for_each(|(v, bv)| *v += bv);
        }
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;

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
