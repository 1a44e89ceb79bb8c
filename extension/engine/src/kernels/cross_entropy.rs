//! Cross-entropy of one row of logits against a target class, and its gradient.

use crate::error::{EngineError, Result};

fn check_target(len: usize, target: i64) -> Result<usize> {
    if len == 0 {
        return Err(EngineError::invalid("logits must not be empty"));
    }
    if target < 0 || target as u64 >= len as u64 {
        return Err(EngineError::invalid(format!(
            "target {target} is outside the {len} classes of logits (0..{})",
            len - 1
        )));
    }
    Ok(target as usize)
}

/// The largest logit and log Σ exp(logit − max); an error when every logit is −∞. In float64:
/// a float32 difference of logits overflows (3e38 − (−3e38)), and max + log Σ rounds away the
/// log term whenever max is large (at 1e10 a float32 ulp is 1024).
fn shifted_lse(logits: &[f32]) -> Result<(f64, f64)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    if max == f64::NEG_INFINITY {
        return Err(EngineError::data("logits are entirely -infinity"));
    }
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    Ok((max, sum.ln()))
}

/// log Σ exp(logits), stable (−∞ when every logit is −∞). It never overflows: the log term is
/// at most ln(len), negligible next to a max near float32's limit.
pub fn logsumexp(logits: &[f32]) -> f32 {
    shifted_lse(logits).map_or(f32::NEG_INFINITY, |(max, log_sum)| (max + log_sum) as f32)
}

/// −log softmax(logits)[target] = (max − logits[target]) + log Σ exp(logit − max); a loss
/// beyond float32's range (3e38 − (−3e38)) is `OutOfRange`.
pub fn cross_entropy_forward(logits: &[f32], target: i64) -> Result<f32> {
    let t = check_target(logits.len(), target)?;
    if logits[t] == f32::NEG_INFINITY {
        return Err(EngineError::OutOfRange(format!(
            "the logit of target {target} is -infinity, so the loss is infinite"
        )));
    }
    let (max, log_sum) = shifted_lse(logits)?;
    let loss = (max - logits[t] as f64) + log_sum;
    if !(loss as f32).is_finite() {
        return Err(EngineError::OutOfRange(format!(
            "the loss {loss:.4e} overflows float32"
        )));
    }
    Ok(loss as f32)
}

/// softmax(logits) − onehot(target), each probability exp(logit − max) / Σ in float64 (so
/// two logits of 1e10 get 0.5 each, not 1).
pub fn cross_entropy_backward(logits: &[f32], target: i64) -> Result<Vec<f32>> {
    let t = check_target(logits.len(), target)?;
    let (max, log_sum) = shifted_lse(logits)?;
    let mut grad: Vec<f32> = logits
        .iter()
        .map(|&v| ((v as f64 - max) - log_sum).exp() as f32)
        .collect();
    grad[t] -= 1.0;
    Ok(grad)
}

/// Rows of a [rows, cols] logits matrix, one target per row; an error when they do not fit.
fn check_rows(logits: &[f32], targets: &[i64]) -> Result<usize> {
    if logits.is_empty() {
        return Err(EngineError::invalid("logits must not be empty"));
    }
    if targets.is_empty() || logits.len() % targets.len() != 0 {
        return Err(EngineError::invalid(format!(
            "logits have {} values, which is not a whole number of rows for {} targets",
            logits.len(),
            targets.len()
        )));
    }
    Ok(logits.len() / targets.len())
}

/// Mean over rows of −log softmax(row)[target]: the loss of a sequence's positions at once.
pub fn mean_cross_entropy(logits: &[f32], targets: &[i64]) -> Result<f32> {
    let cols = check_rows(logits, targets)?;
    let mut sum = 0.0f64;
    for (row, &t) in logits.chunks_exact(cols).zip(targets) {
        sum += cross_entropy_forward(row, t)? as f64;
    }
    Ok((sum / targets.len() as f64) as f32)
}

/// Gradient of `mean_cross_entropy`: (softmax(row) − onehot(target)) / rows for every row.
pub fn mean_cross_entropy_backward(logits: &[f32], targets: &[i64]) -> Result<Vec<f32>> {
    let cols = check_rows(logits, targets)?;
    let scale = 1.0 / targets.len() as f32;
    let mut grad = Vec::with_capacity(logits.len());
    for (row, &t) in logits.chunks_exact(cols).zip(targets) {
        grad.extend(
            cross_entropy_backward(row, t)?
                .into_iter()
                .map(|g| g * scale),
        );
    }
    Ok(grad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gradcheck::assert_grad_matches;

    #[test]
    fn values_and_errors() {
        // −log(e^3 / (e^1 + e^2 + e^3)) = 0.407605964...
        assert!((cross_entropy_forward(&[1.0, 2.0, 3.0], 2).unwrap() - 0.407_606).abs() < 1e-6);
        assert!(cross_entropy_forward(&[1.0, 2.0], 2).is_err());
        assert!(cross_entropy_forward(&[1.0, 2.0], -1).is_err());
        assert!(cross_entropy_forward(&[f32::NEG_INFINITY, 2.0], 0).is_err());
    }

    #[test]
    fn extreme_logits() {
        // Reported: {3e38, −3e38} with target 1 gave inf; the loss 6e38 is out of range.
        let err = cross_entropy_forward(&[3e38, -3e38], 1).unwrap_err();
        assert!(matches!(err, EngineError::OutOfRange(_)), "{err}");
        assert_eq!(err.to_string(), "the loss 6.0000e38 overflows float32");
        assert_eq!(cross_entropy_forward(&[3e38, -3e38], 0).unwrap(), 0.0);
        // At 1e10 a float32 ulp is 1024: the loss ln 2 must not round away.
        let loss = cross_entropy_forward(&[1e10, 1e10], 0).unwrap();
        assert!((loss - std::f32::consts::LN_2).abs() < 1e-6, "{loss}");
        assert_eq!(
            cross_entropy_backward(&[1e10, 1e10], 0).unwrap(),
            vec![-0.5, 0.5]
        );
        assert_eq!(
            cross_entropy_backward(&[3e38, -3e38], 1).unwrap(),
            vec![1.0, -1.0]
        );
        assert_eq!(logsumexp(&[3.4e38, 3.4e38]), 3.4e38);
    }

    #[test]
    fn gradient() {
        let x: Vec<f32> = (0..7).map(|i| (i as f32 * 1.1).sin() * 3.0).collect();
        let g = cross_entropy_backward(&x, 4).unwrap();
        assert_grad_matches(&x, &g, |x| cross_entropy_forward(x, 4).unwrap() as f64);
    }
}
