//! Row-wise softmax and its backward. Layout: [rows, cols] row-major; the whole-vector softmax
//! of pg_gpt2 is the single-row case.

use super::elementwise::same_len;
use crate::error::{EngineError, Result};
use crate::tensor;

fn rows_of(len: usize, cols: usize, arg: &str) -> Result<usize> {
    if cols == 0 || len % cols != 0 {
        return Err(EngineError::invalid(format!(
            "{arg} has {len} values, which is not a whole number of rows of {cols}"
        )));
    }
    Ok(len / cols)
}

/// Numerically stable softmax of each row in place. A row that is entirely −∞ is an error
/// (it has no distribution).
pub fn softmax_rows_inplace(x: &mut [f32], cols: usize) -> Result<()> {
    rows_of(x.len(), cols, "input")?;
    for (r, row) in x.chunks_exact_mut(cols).enumerate() {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return Err(EngineError::data(format!(
                "row {r} of the softmax input is entirely -infinity"
            )));
        }
        let mut sum = 0.0f32;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|v| *v *= inv);
    }
    Ok(())
}

pub fn softmax_forward(x: &[f32], cols: usize) -> Result<Vec<f32>> {
    let mut y = tensor::alloc_zeroed(x.len())?;
    softmax_forward_into(&mut y, x, cols)?;
    Ok(y)
}

/// `softmax_forward` into `y`, which must hold as many values as x.
pub fn softmax_forward_into(y: &mut [f32], x: &[f32], cols: usize) -> Result<()> {
    same_len(y, x, "the result", "x")?;
    y.copy_from_slice(x);
    softmax_rows_inplace(y, cols)
}

/// dx = y ⊙ (dy − Σ_row y⊙dy), given the softmax output y. Any finite y is accepted, so the
/// row's dot product (9e76 for y = dy = 3e38) is formed in float64; a dx beyond float32's range
/// is `OutOfRange`.
pub fn softmax_backward(y: &[f32], dy: &[f32], cols: usize) -> Result<Vec<f32>> {
    same_len(y, dy, "y", "dy")?;
    rows_of(y.len(), cols, "y")?;
    let mut dx = tensor::alloc_zeroed(y.len())?;
    for ((yr, gr), dr) in y
        .chunks_exact(cols)
        .zip(dy.chunks_exact(cols))
        .zip(dx.chunks_exact_mut(cols))
    {
        let dot: f64 = yr.iter().zip(gr).map(|(&a, &b)| a as f64 * b as f64).sum();
        for ((d, &yv), &gv) in dr.iter_mut().zip(yr).zip(gr) {
            *d = (yv as f64 * (gv as f64 - dot)) as f32;
        }
    }
    tensor::check_result(&dx, "softmax gradient")?;
    Ok(dx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gradcheck::assert_grad_matches;

    #[test]
    fn rows_sum_to_one_and_handle_masks() {
        let y = softmax_forward(&[1.0, 2.0, 3.0, 0.0, f32::NEG_INFINITY, 0.0], 3).unwrap();
        assert!((y[0..3].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((y[2] - 0.665_240_9).abs() < 1e-6);
        assert_eq!(y[4], 0.0);
        assert!((y[3] - 0.5).abs() < 1e-6);
        assert!(softmax_forward(&[f32::NEG_INFINITY; 2], 2).is_err());
        assert!(softmax_forward(&[1.0; 5], 2).is_err());
    }

    #[test]
    fn backward_of_large_values() {
        // Reported: y = dy = {3e38, 1} gave −inf; the true dx[0] = 3e38·(3e38 − 9e76) is out
        // of range. A partial dot product beyond float32 (1.5·3e38) is no error when the
        // result is in range: here dot = 3e38 and dx = 0.
        let err = softmax_backward(&[3e38, 1.0], &[3e38, 1.0], 2).unwrap_err();
        assert!(matches!(err, EngineError::OutOfRange(_)), "{err}");
        let dx = softmax_backward(&[1.5, -0.5], &[3e38, 3e38], 2).unwrap();
        assert_eq!(dx, vec![0.0, 0.0]);
        let y = softmax_forward(&[3.4e38, -3.4e38, 0.0], 3).unwrap();
        assert_eq!(y, vec![1.0, 0.0, 0.0]);
    }

    #[test]
    fn gradient() {
        let x: Vec<f32> = (0..8).map(|i| (i as f32 * 0.7).sin()).collect();
        let w: Vec<f32> = (0..8).map(|i| (i as f32 * 1.3).cos()).collect();
        let y = softmax_forward(&x, 4).unwrap();
        let dx = softmax_backward(&y, &w, 4).unwrap();
        assert_grad_matches(&x, &dx, |x| {
            softmax_forward(x, 4)
                .unwrap()
                .iter()
                .zip(&w)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum()
        });
    }
}
