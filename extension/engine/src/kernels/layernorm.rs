//! LayerNorm over the last dimension. Layout: x is [rows, C] row-major, gamma and beta are [C].

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{EngineError, Result};
use crate::tensor;

fn check(x: &[f32], gamma: &[f32], eps: f32) -> Result<usize> {
    let c = gamma.len();
    if c == 0 || x.len() % c != 0 {
        return Err(EngineError::invalid(format!(
            "x has {} values, which is not a whole number of rows of gamma's length {c}",
            x.len()
        )));
    }
    if !(eps > 0.0) || !eps.is_finite() {
        return Err(EngineError::invalid(format!(
            "eps must be a positive finite number, got {eps}"
        )));
    }
    Ok(c)
}

/// Mean and reciprocal standard deviation of one row (biased variance, as PyTorch), in float64:
/// float32 sums of values near ±3.4e38 overflow, and a float32 mean of {2e38, −2e38, 1} loses
/// the row's spread entirely.
#[inline(always)]
fn row_stats(row: &[f32], eps: f32) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = crate::simd::sum_map_f64(row, |v| v) / n;
    let var = crate::simd::sum_map_f64(row, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps as f64).sqrt())
}

/// Normalises one row into y, in float64 until the single final rounding (x − mean of
/// ±3e38 overflows float32, and the scaled value may only come back in range after beta).
/// Returns whether every value of y is finite.
#[inline(always)]
fn normalise_row_body(y: &mut [f32], x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) -> bool {
    let (mean, rstd) = row_stats(x, eps);
    for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
        *y = ((x as f64 - mean) * rstd * g as f64 + b as f64) as f32;
    }
    // The largest magnitude as integer bits: a reduction that vectorises, unlike is_finite.
    let top = y.iter().map(|v| v.to_bits() & 0x7fff_ffff).max();
    top.unwrap_or(0) < f32::INFINITY.to_bits()
}

// Float64 lanes are half as wide as float32 ones: AVX2 keeps the row as fast as the float32
// code was on the baseline instruction set.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn normalise_row_avx2(y: &mut [f32], x: &[f32], g: &[f32], b: &[f32], eps: f32) -> bool {
    normalise_row_body(y, x, g, b, eps)
}

fn normalise_row(y: &mut [f32], x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) -> bool {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx2_fma() {
        // SAFETY: the features were detected at run time.
        return unsafe { normalise_row_avx2(y, x, gamma, beta, eps) };
    }
    normalise_row_body(y, x, gamma, beta, eps)
}

/// y = (x − mean) / sqrt(var + eps) · gamma + beta, per row.
pub fn layernorm_forward(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) -> Result<Vec<f32>> {
    let mut y = tensor::alloc_zeroed(x.len())?;
    layernorm_into(&mut y, x, gamma, beta, eps)?;
    Ok(y)
}

/// `layernorm_forward` into a caller's buffer of x's size. A value beyond float32's range is
/// an `OutOfRange` error (y is then partly written).
pub fn layernorm_into(
    y: &mut [f32],
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> Result<()> {
    let c = check(x, gamma, eps)?;
    if beta.len() != c {
        return Err(EngineError::invalid(format!(
            "beta has {} values but gamma has {c}",
            beta.len()
        )));
    }
    assert_eq!(y.len(), x.len(), "layernorm: y");
    let overflow = AtomicBool::new(false);
    crate::parallel::for_rows(y, c, |first, block| {
        let xs = &x[first * c..first * c + block.len()];
        for (xr, yr) in xs.chunks_exact(c).zip(block.chunks_exact_mut(c)) {
            if !normalise_row(yr, xr, gamma, beta, eps) {
                overflow.store(true, Ordering::Relaxed);
            }
        }
    });
    if overflow.into_inner() {
        // Only now pay for locating the value, for the message.
        tensor::check_result(y, "layernorm")?;
    }
    Ok(())
}

/// Gradients of LayerNorm with respect to x, gamma and beta.
pub struct LayerNormGrads {
    pub dx: Vec<f32>,
    pub dgamma: Vec<f32>,
    pub dbeta: Vec<f32>,
}

/// Backward pass, recomputing the row statistics from x.
pub fn layernorm_backward(
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    eps: f32,
) -> Result<LayerNormGrads> {
    let c = check(x, gamma, eps)?;
    if dy.len() != x.len() {
        return Err(EngineError::invalid(format!(
            "dy has {} values but x has {}",
            dy.len(),
            x.len()
        )));
    }
    let mut dx = tensor::alloc_zeroed(x.len())?;
    // Summed over rows in float64: a float32 running sum can overflow before later rows bring
    // it back into range.
    let mut dgamma = vec![0.0f64; c];
    let mut dbeta = vec![0.0f64; c];
    for ((xr, gr), dxr) in x
        .chunks_exact(c)
        .zip(dy.chunks_exact(c))
        .zip(dx.chunks_exact_mut(c))
    {
        backward_row(dxr, &mut dgamma, &mut dbeta, xr, gr, gamma, eps);
    }
    let dgamma: Vec<f32> = dgamma.iter().map(|&v| v as f32).collect();
    let dbeta: Vec<f32> = dbeta.iter().map(|&v| v as f32).collect();
    tensor::check_result(&dx, "layernorm dx")?;
    tensor::check_result(&dgamma, "layernorm dgamma")?;
    tensor::check_result(&dbeta, "layernorm dbeta")?;
    Ok(LayerNormGrads { dx, dgamma, dbeta })
}

/// One row of the backward pass, in float64: dy·gamma of two large values overflows float32,
/// and so can its row sums even when dx, scaled by a tiny rstd, is in range.
/// dnorm = dy·gamma; dx = rstd·(dnorm − mean(dnorm) − norm·mean(dnorm·norm)).
fn backward_row(
    dx: &mut [f32],
    dgamma: &mut [f64],
    dbeta: &mut [f64],
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    eps: f32,
) {
    let c = x.len();
    let (mean, rstd) = row_stats(x, eps);
    let norm = |i: usize| (x[i] as f64 - mean) * rstd;
    let dnorm = |i: usize| dy[i] as f64 * gamma[i] as f64;
    let mut mean_dnorm = 0.0f64;
    let mut mean_dnorm_norm = 0.0f64;
    for i in 0..c {
        mean_dnorm += dnorm(i);
        mean_dnorm_norm += dnorm(i) * norm(i);
        dgamma[i] += dy[i] as f64 * norm(i);
        dbeta[i] += dy[i] as f64;
    }
    mean_dnorm /= c as f64;
    mean_dnorm_norm /= c as f64;
    for (i, d) in dx.iter_mut().enumerate() {
        *d = (rstd * (dnorm(i) - mean_dnorm - norm(i) * mean_dnorm_norm)) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gradcheck::assert_grad_matches;

    fn data() -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let x: Vec<f32> = (0..12).map(|i| (i as f32 * 0.9).sin() * 2.0).collect();
        let g: Vec<f32> = (0..4).map(|i| 1.0 + 0.1 * i as f32).collect();
        let b: Vec<f32> = (0..4).map(|i| -0.2 * i as f32).collect();
        let w: Vec<f32> = (0..12).map(|i| (i as f32 * 0.4).cos()).collect();
        (x, g, b, w)
    }

    fn loss(y: &[f32], w: &[f32]) -> f64 {
        y.iter()
            .zip(w)
            .map(|(a, b)| (*a as f64) * (*b as f64))
            .sum()
    }

    #[test]
    fn normalises_every_row() {
        let (x, _, _, _) = data();
        let y = layernorm_forward(&x, &[1.0; 4], &[0.0; 4], 1e-5).unwrap();
        for row in y.chunks(4) {
            assert!(row.iter().sum::<f32>().abs() < 1e-5);
        }
        assert!(layernorm_forward(&x, &[1.0; 5], &[0.0; 5], 1e-5).is_err());
        assert!(layernorm_forward(&x, &[1.0; 4], &[0.0; 4], 0.0).is_err());
    }

    #[test]
    fn huge_values_normalise_in_range() {
        // Reported: {3e38, 3e38} gave NaN (x − mean is 0, so y = beta) and {2e38, −2e38, 1}
        // gave zeros (the float32 mean and variance overflowed).
        let y = layernorm_forward(&[3e38, 3e38], &[1.0; 2], &[0.5, -2.0], 1e-5).unwrap();
        assert_eq!(y, vec![0.5, -2.0]);
        let y = layernorm_forward(&[2e38, -2e38, 1.0], &[1.0; 3], &[0.0; 3], 1e-5).unwrap();
        let want = [1.5f32.sqrt(), -(1.5f32.sqrt()), 0.0];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
    }

    #[test]
    fn unrepresentable_output_is_out_of_range() {
        // Normalised values are ±1; gamma 3e38 and beta 2e38 make 5e38.
        let err = layernorm_forward(&[1.0, 2.0], &[3e38; 2], &[2e38; 2], 1e-5).unwrap_err();
        assert!(matches!(err, EngineError::OutOfRange(_)), "{err}");
        // The same products brought back into range by beta are fine: about ∓(3e38 − 2e38).
        let y = layernorm_forward(&[1.0, 2.0], &[3e38; 2], &[2e38, -2e38], 1e-5).unwrap();
        assert!((y[0] / -1e38 - 1.0).abs() < 1e-4 && (y[1] / 1e38 - 1.0).abs() < 1e-4);
    }

    #[test]
    fn backward_of_huge_values() {
        // dy·gamma = 3e76 overflows float32, but rstd = 1/(√6·1e38) brings dx back into range:
        // dx = rstd·1e76·{1/2, 1/2, −1}.
        let (x, dy, g) = ([3e38, -3e38, 0.0], [1e38, 0.0, 0.0], [3e38, 1.0, 1.0]);
        let grads = layernorm_backward(&x, &dy, &g, 1e-5).unwrap();
        let want = [2.041_241_5e37f32, 2.041_241_5e37, -4.082_483e37];
        for (a, b) in grads.dx.iter().zip(want) {
            assert!((a / b - 1.0).abs() < 1e-6, "{:?}", grads.dx);
        }
        assert!((grads.dgamma[0] / 1.224_744_9e38 - 1.0).abs() < 1e-6);
        // dbeta sums dy over rows: 3e38 + 3e38 is out of float32's range.
        let err = layernorm_backward(&[1.0, 2.0, 1.0, 2.0], &[3e38; 4], &[1.0; 2], 1e-5);
        assert!(matches!(err, Err(EngineError::OutOfRange(_))));
    }

    #[test]
    fn gradients() {
        let (x, g, b, w) = data();
        let grads = layernorm_backward(&x, &w, &g, 1e-5).unwrap();
        assert_grad_matches(&x, &grads.dx, |x| {
            loss(&layernorm_forward(x, &g, &b, 1e-5).unwrap(), &w)
        });
        assert_grad_matches(&g, &grads.dgamma, |g| {
            loss(&layernorm_forward(&x, g, &b, 1e-5).unwrap(), &w)
        });
        assert_grad_matches(&b, &grads.dbeta, |b| {
            loss(&layernorm_forward(&x, &g, b, 1e-5).unwrap(), &w)
        });
    }
}
