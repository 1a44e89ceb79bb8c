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

/// log Σ exp(logits), stable.
pub fn logsumexp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return f32::NEG_INFINITY;
    }
    let sum: f32 = logits.iter().map(|v| (v - max).exp()).sum();
    max + sum.ln()
}

/// −log softmax(logits)[target].
pub fn cross_entropy_forward(logits: &[f32], target: i64) -> Result<f32> {
    let t = check_target(logits.len(), target)?;
    if logits[t] == f32::NEG_INFINITY {
        return Err(EngineError::OutOfRange(format!(
            "the logit of target {target} is -infinity, so the loss is infinite"
        )));
    }
    Ok(logsumexp(logits) - logits[t])
}

/// softmax(logits) − onehot(target).
pub fn cross_entropy_backward(logits: &[f32], target: i64) -> Result<Vec<f32>> {
    let t = check_target(logits.len(), target)?;
    let lse = logsumexp(logits);
    if lse == f32::NEG_INFINITY {
        return Err(EngineError::data("logits are entirely -infinity"));
    }
    let mut grad: Vec<f32> = logits.iter().map(|v| (v - lse).exp()).collect();
    grad[t] -= 1.0;
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
    fn gradient() {
        let x: Vec<f32> = (0..7).map(|i| (i as f32 * 1.1).sin() * 3.0).collect();
        let g = cross_entropy_backward(&x, 4).unwrap();
        assert_grad_matches(&x, &g, |x| cross_entropy_forward(x, 4).unwrap() as f64);
    }
}
