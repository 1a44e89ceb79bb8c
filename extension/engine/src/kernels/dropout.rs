//! Inverted dropout: in training mode each element is zeroed with probability p and survivors
//! are scaled by 1/(1−p), so evaluation needs no rescaling.

use rand::Rng;

use crate::error::{EngineError, Result};
use crate::tensor;

fn check_p(p: f32) -> Result<()> {
    if !(0.0..=1.0).contains(&p) {
        return Err(EngineError::invalid(format!(
            "dropout probability p must be in [0, 1], got {p}"
        )));
    }
    Ok(())
}

pub fn dropout_forward(x: &[f32], p: f32, training: bool, rng: &mut impl Rng) -> Result<Vec<f32>> {
    check_p(p)?;
    if !training || p == 0.0 {
        return Ok(x.to_vec());
    }
    if p == 1.0 {
        return Ok(vec![0.0; x.len()]);
    }
    let scale = 1.0 / (1.0 - p);
    let y: Vec<f32> = x
        .iter()
        .map(|&v| {
            if rng.random::<f32>() < p {
                0.0
            } else {
                v * scale
            }
        })
        .collect();
    // Survivors grow by 1/(1−p): 3e38 kept at p = 0.5 is 6e38.
    tensor::check_result(&y, "dropout output")?;
    Ok(y)
}

/// Gradient of dropout given its input and output. The mask is read back from the output: an
/// element was kept when its output is non-zero, or when its input was zero (then both
/// choices gave the same output and the kept branch is taken).
pub fn dropout_backward(
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    p: f32,
    training: bool,
) -> Result<Vec<f32>> {
    check_p(p)?;
    if x.len() != y.len() || x.len() != dy.len() {
        return Err(EngineError::invalid(format!(
            "input, output and grad must have the same length, got {}, {} and {} values",
            x.len(),
            y.len(),
            dy.len()
        )));
    }
    if !training || p == 0.0 {
        return Ok(dy.to_vec());
    }
    if p == 1.0 {
        return Ok(vec![0.0; x.len()]);
    }
    let scale = 1.0 / (1.0 - p);
    let dx: Vec<f32> = x
        .iter()
        .zip(y)
        .zip(dy)
        .map(|((&xv, &yv), &g)| {
            if yv != 0.0 || xv == 0.0 {
                g * scale
            } else {
                0.0
            }
        })
        .collect();
    tensor::check_result(&dx, "dropout gradient")?;
    Ok(dx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn keeps_expected_fraction_and_is_seeded() {
        let x = vec![1.0f32; 10_000];
        let y = dropout_forward(&x, 0.25, true, &mut ChaCha8Rng::seed_from_u64(7)).unwrap();
        let kept = y.iter().filter(|v| **v != 0.0).count();
        assert!((7300..7700).contains(&kept), "kept {kept}");
        assert!(y
            .iter()
            .all(|v| *v == 0.0 || (*v - 1.0 / 0.75).abs() < 1e-6));
        let again = dropout_forward(&x, 0.25, true, &mut ChaCha8Rng::seed_from_u64(7)).unwrap();
        assert_eq!(y, again);
        let eval = dropout_forward(&x, 0.25, false, &mut ChaCha8Rng::seed_from_u64(7)).unwrap();
        assert_eq!(eval, x);
        assert!(dropout_forward(&x, 1.5, true, &mut ChaCha8Rng::seed_from_u64(7)).is_err());
    }

    #[test]
    fn scaled_survivors_beyond_float32_are_out_of_range() {
        // Reported: {3e38} at p = 0.5 with seed 1 gave inf (the element was kept: 6e38).
        let mut rng = crate::sample::rng_from_seed(Some(1));
        let err = dropout_forward(&[3e38], 0.5, true, &mut rng).unwrap_err();
        assert!(matches!(err, EngineError::OutOfRange(_)), "{err}");
        let err = dropout_backward(&[1.0], &[2.0], &[3e38], 0.5, true).unwrap_err();
        assert!(matches!(err, EngineError::OutOfRange(_)), "{err}");
        let y = dropout_forward(&[1e38; 8], 0.5, true, &mut rng).unwrap();
        assert!(y.iter().all(|v| *v == 0.0 || *v == 2e38));
    }

    #[test]
    fn backward_uses_the_forward_mask() {
        // For a fixed mask, dropout is linear: y = mask·x/(1−p), so the gradient is mask/(1−p).
        let x: Vec<f32> = (1..=100).map(|i| i as f32 * 0.1).collect();
        let y = dropout_forward(&x, 0.5, true, &mut ChaCha8Rng::seed_from_u64(3)).unwrap();
        let dy = vec![1.0f32; 100];
        let dx = dropout_backward(&x, &y, &dy, 0.5, true).unwrap();
        for i in 0..100 {
            assert_eq!(dx[i], if y[i] != 0.0 { 2.0 } else { 0.0 });
            assert!(
                (dx[i] * x[i] - y[i]).abs() < 1e-5,
                "y = dx·x for a linear map"
            );
        }
    }
}
