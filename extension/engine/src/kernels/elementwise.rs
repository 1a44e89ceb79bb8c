//! Element-wise kernels: addition with bias broadcast, GELU / ReLU (forward + backward),
//! transpose.

use crate::error::{EngineError, Result};
use crate::tensor;

/// a + b. When b is shorter than a and its length divides a's, b is a bias broadcast over the
/// rows of a viewed as [len(a) / len(b), len(b)].
pub fn add(a: &[f32], b: &[f32]) -> Result<Vec<f32>> {
    let mut out = tensor::alloc_zeroed(a.len())?;
    add_into(&mut out, a, b)?;
    Ok(out)
}

/// `add` into `out`, which must hold as many values as a.
pub fn add_into(out: &mut [f32], a: &[f32], b: &[f32]) -> Result<()> {
    if b.is_empty() || a.len() % b.len() != 0 {
        return Err(EngineError::invalid(format!(
            "cannot add tensors of {} and {} values: the second must have the same length or be a bias whose length divides the first's",
            a.len(),
            b.len()
        )));
    }
    same_len(out, a, "the result", "a")?;
    for (row, ar) in out.chunks_exact_mut(b.len()).zip(a.chunks_exact(b.len())) {
        for ((o, av), bv) in row.iter_mut().zip(ar).zip(b) {
            *o = av + bv;
        }
    }
    tensor::check_result(out, "add")
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_CUBIC: f64 = 0.044_715;

/// d gelu_new(x) / dx, in float64: in float32, x³ overflows for |x| above 7e12 and the second
/// term becomes 0·∞ = NaN; in float64 it is 0 there (tanh has saturated), as it should be.
#[inline]
pub fn gelu_new_grad(x: f64) -> f64 {
    let inner = SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x);
    let t = inner.tanh();
    let d_inner = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x);
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * d_inner
}

/// GPT-2's tanh approximation of GELU ("gelu_new"): 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))),
/// vectorised (`simd::gelu_new_inplace`).
pub fn gelu_forward(x: &[f32]) -> Vec<f32> {
    let mut y = x.to_vec();
    crate::simd::gelu_new_inplace(&mut y);
    y
}

/// `gelu_forward` into `y`, which must hold as many values as x.
pub fn gelu_forward_into(y: &mut [f32], x: &[f32]) -> Result<()> {
    same_len(y, x, "the result", "x")?;
    y.copy_from_slice(x);
    crate::simd::gelu_new_inplace(y);
    Ok(())
}

/// dx = dy · gelu'(x); `OutOfRange` where that exceeds float32 (gelu' peaks at 1.13).
pub fn gelu_backward(x: &[f32], dy: &[f32]) -> Result<Vec<f32>> {
    same_len(x, dy, "x", "dy")?;
    let dx: Vec<f32> = x
        .iter()
        .zip(dy)
        .map(|(&v, &g)| (g as f64 * gelu_new_grad(v as f64)) as f32)
        .collect();
    tensor::check_result(&dx, "gelu gradient")?;
    Ok(dx)
}

/// Out-of-place transpose of a row-major [rows, cols] matrix.
pub fn transpose(src: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>> {
    let mut out = tensor::alloc_zeroed(src.len())?;
    transpose_into(&mut out, src, rows, cols)?;
    Ok(out)
}

/// `transpose` into `out`, which must hold as many values as src.
pub fn transpose_into(out: &mut [f32], src: &[f32], rows: usize, cols: usize) -> Result<()> {
    if src.len() != rows * cols {
        return Err(EngineError::invalid(format!(
            "src has {} values but [rows={rows}, cols={cols}] needs {}",
            src.len(),
            rows * cols
        )));
    }
    same_len(out, src, "the result", "src")?;
    // Blocked so both sides stay in cache for large matrices.
    const B: usize = 32;
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(cols) {
                    out[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
    Ok(())
}

pub(crate) fn same_len(a: &[f32], b: &[f32], an: &str, bn: &str) -> Result<()> {
    if a.len() != b.len() {
        return Err(EngineError::invalid(format!(
            "{an} and {bn} must have the same length, got {} and {} values",
            a.len(),
            b.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gradcheck::assert_grad_matches;

    #[test]
    fn add_broadcasts_bias() {
        let out = add(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[10.0, 20.0, 30.0]).unwrap();
        assert_eq!(out, vec![11.0, 22.0, 33.0, 14.0, 25.0, 36.0]);
        assert!(add(&[1.0; 4], &[1.0; 3]).is_err());
        assert!(add(&[f32::MAX], &[f32::MAX]).is_err());
    }

    #[test]
    fn gelu_values() {
        // Reference values of 0.5x(1+tanh(√(2/π)(x+0.044715x³))) computed in float64.
        let y = gelu_forward(&[1.0, -2.0, 0.0]);
        assert!((y[0] - 0.841_192).abs() < 1e-6);
        assert!((y[1] - (-0.045_402_3)).abs() < 1e-6);
        assert_eq!(y[2], 0.0);
    }

    #[test]
    fn gelu_gradient() {
        let x: Vec<f32> = (0..11).map(|i| -2.5 + 0.5 * i as f32).collect();
        let dy: Vec<f32> = (0..11).map(|i| 0.3 - 0.05 * i as f32).collect();
        let analytic = gelu_backward(&x, &dy).unwrap();
        assert_grad_matches(&x, &analytic, |x| {
            gelu_forward(x)
                .iter()
                .zip(&dy)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum()
        });
    }

    #[test]
    fn gelu_gradient_at_extremes() {
        // gelu' is 1 for large x and 0 for large −x, not NaN (x³ overflowed float32).
        let dx = gelu_backward(&[3.4e38, -3.4e38, 1e13, -1e13], &[2.0; 4]).unwrap();
        assert_eq!(dx, vec![2.0, 0.0, 2.0, 0.0]);
        // Reported: dy = 3.4e38 gave inf; gelu'(1) = 1.0830 makes 3.68e38, out of range.
        let err = gelu_backward(&[1.0], &[3.4e38]).unwrap_err();
        assert!(matches!(err, EngineError::OutOfRange(_)), "{err}");
        assert!(gelu_forward(&[3.4e38, -3.4e38, -1e-45])
            .iter()
            .all(|v| v.is_finite()));
    }

    #[test]
    fn transpose_round_trip() {
        let src: Vec<f32> = (0..35).map(|i| i as f32).collect();
        let t = transpose(&src, 5, 7).unwrap();
        assert_eq!(t[1], 7.0);
        assert_eq!(transpose(&t, 7, 5).unwrap(), src);
    }
}
