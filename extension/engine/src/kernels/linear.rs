//! Linear layers y = x · Wᵀ + b with W stored [out, in] (PyTorch `Linear`).
//! Layout: x [t, in], y [t, out], row-major.

use rayon::prelude::*;

use super::matmul::{gemm_into, Accumulate, MatRef, Threads, FLOPS_PER_SLICE};
use crate::error::Result;
use crate::parallel::{self, Cancel};
use crate::simd;

/// Up to this many rows of x, the product is memory-bound: each weight row is streamed once and
/// dotted with every row of x.
const SMALL_T: usize = 4;
/// Output rows per task in the small-t path.
const ROWS_PER_TASK: usize = 64;

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
    assert_eq!(x.len(), t * d_in, "linear: x");
    assert_eq!(w.len(), d_out * d_in, "linear: w");
    if let Some(b) = b {
        assert_eq!(b.len(), d_out, "linear: b");
    }
    if t <= SMALL_T {
        return Ok(linear_few_rows(x, w, b, t, d_in, d_out));
    }
    linear_many_rows(x, w, b, (t, d_in, d_out), FLOPS_PER_SLICE, cancel)
}

/// The compute-bound case: slices of output columns (weight rows), each packed and multiplied
/// once, so cancel is checked every `flops_per_slice` without re-reading the weights. y starts
/// as the broadcast bias and the products accumulate onto it.
fn linear_many_rows(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    (t, d_in, d_out): (usize, usize, usize),
    flops_per_slice: usize,
    cancel: Cancel,
) -> Result<Vec<f32>> {
    let mut y = vec![0.0f32; t * d_out];
    if let Some(b) = b {
        parallel::for_rows(&mut y, d_out, |_, rows| {
            rows.chunks_exact_mut(d_out)
                .for_each(|row| row.copy_from_slice(b))
        });
    }
    let acc = if b.is_some() {
        Accumulate::Add
    } else {
        Accumulate::Overwrite
    };
    // A multiple of 48 keeps slice edges on whole micro-kernel tiles.
    let cols = (flops_per_slice / (2 * t * d_in).max(1))
        .max(1)
        .next_multiple_of(48);
    let xs = MatRef::new(x, t, d_in);
    for c0 in (0..d_out).step_by(cols) {
        cancel.check()?;
        let c1 = (c0 + cols).min(d_out);
        gemm_into(
            &mut y[c0..],
            d_out,
            xs,
            MatRef::transposed(&w[c0 * d_in..c1 * d_in], d_in, c1 - c0),
            acc,
            Threads::Pool,
        );
    }
    Ok(y)
}

/// The memory-bound case of at most SMALL_T rows: each weight row is read once and dotted
/// with every row of x; tasks own ranges of output rows.
fn linear_few_rows(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    t: usize,
    d_in: usize,
    d_out: usize,
) -> Vec<f32> {
    // yt[out, t]: each task owns a range of output rows, contiguous in yt.
    let mut yt = vec![0.0f32; d_out * t];
    parallel::install(|| {
        yt.par_chunks_mut(ROWS_PER_TASK * t)
            .enumerate()
            .for_each(|(chunk, out)| {
                let o0 = chunk * ROWS_PER_TASK;
                for (r, cell) in out.chunks_exact_mut(t).enumerate() {
                    let row = &w[(o0 + r) * d_in..(o0 + r + 1) * d_in];
                    let bias = b.map_or(0.0, |b| b[o0 + r]);
                    for (ti, c) in cell.iter_mut().enumerate() {
                        *c = simd::dot(&x[ti * d_in..(ti + 1) * d_in], row) + bias;
                    }
                }
            })
    });
    let mut y = vec![0.0f32; t * d_out];
    for o in 0..d_out {
        for ti in 0..t {
            y[ti * d_out + o] = yt[o * t + ti];
        }
    }
    y
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
            // Many column slices (the last one ragged), with and without bias, agree too.
            if t > SMALL_T {
                let dims = (t, d_in, d_out);
                let max_diff = |p: &[f32]| {
                    p.iter()
                        .zip(&y)
                        .map(|(p, q)| (p - q).abs())
                        .fold(0.0, f32::max)
                };
                let sliced = linear_many_rows(&x, &w, Some(&b), dims, 1, Cancel::NEVER).unwrap();
                assert!(max_diff(&sliced) < 1e-5);
                let no_bias = linear_many_rows(&x, &w, None, dims, 1, Cancel::NEVER).unwrap();
                let biased: Vec<f32> = no_bias
                    .chunks(d_out)
                    .flat_map(|r| r.iter().zip(&b).map(|(v, b)| v + b))
                    .collect();
                assert!(max_diff(&biased) < 1e-5);
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
