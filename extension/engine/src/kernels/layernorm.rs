//! LayerNorm over the last dimension. Layout: x is [rows, C] row-major, gamma and beta are [C].

use crate::error::{EngineError, Result};

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

/// Mean and reciprocal standard deviation of one row (biased variance, as PyTorch).
#[inline]
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = crate::simd::sum_map(row, |v| v) / n;
    let var = crate::simd::sum_map(row, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// y = (x − mean) / sqrt(var + eps) · gamma + beta, per row.
pub fn layernorm_forward(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) -> Result<Vec<f32>> {
    let mut y = crate::tensor::alloc_zeroed(x.len())?;
    layernorm_into(&mut y, x, gamma, beta, eps)?;
    Ok(y)
}

/// `layernorm_forward` into a caller's buffer of x's size.
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
    crate::parallel::for_rows(y, c, |first, block| {
        let xs = &x[first * c..first * c + block.len()];
        for (xr, yr) in xs.chunks_exact(c).zip(block.chunks_exact_mut(c)) {
            let (mean, rstd) = row_stats(xr, eps);
            for (((y, &x), &g), &b) in yr.iter_mut().zip(xr).zip(gamma).zip(beta) {
                *y = (x - mean) * rstd * g + b;
            }
        }
    });
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
    let mut dx = vec![0.0f32; x.len()];
    let mut dgamma = vec![0.0f32; c];
    let mut dbeta = vec![0.0f32; c];
    for ((xr, gr), dxr) in x
        .chunks_exact(c)
        .zip(dy.chunks_exact(c))
        .zip(dx.chunks_exact_mut(c))
    {
        let (mean, rstd) = row_stats(xr, eps);
        // dnorm = dy·gamma; dx = rstd·(dnorm − mean(dnorm) − norm·mean(dnorm·norm)).
        let mut mean_dnorm = 0.0f32;
        let mut mean_dnorm_norm = 0.0f32;
        for i in 0..c {
            let norm = (xr[i] - mean) * rstd;
            let dnorm = gr[i] * gamma[i];
            mean_dnorm += dnorm;
            mean_dnorm_norm += dnorm * norm;
            dgamma[i] += gr[i] * norm;
            dbeta[i] += gr[i];
        }
        mean_dnorm /= c as f32;
        mean_dnorm_norm /= c as f32;
        for i in 0..c {
            let norm = (xr[i] - mean) * rstd;
            let dnorm = gr[i] * gamma[i];
            dxr[i] = rstd * (dnorm - mean_dnorm - norm * mean_dnorm_norm);
        }
    }
    Ok(LayerNormGrads { dx, dgamma, dbeta })
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
