//! AdamW, gradient clipping and the GPT-3 learning-rate schedule.

use rayon::prelude::*;

use crate::error::{EngineError, Result};
use crate::parallel::{self, Cancel};
use crate::tensor;

/// Hyper-parameters of one AdamW step (PyTorch's `torch.optim.AdamW` semantics).
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl AdamW {
    pub fn validate(&self) -> Result<()> {
        let AdamW {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = *self;
        if !(lr >= 0.0 && lr.is_finite()) {
            return Err(EngineError::invalid(format!(
                "lr must be a non-negative finite number, got {lr}"
            )));
        }
        for (name, b) in [("beta1", beta1), ("beta2", beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(EngineError::invalid(format!(
                    "{name} must be in [0, 1), got {b}"
                )));
            }
        }
        if !(eps > 0.0 && eps.is_finite()) {
            return Err(EngineError::invalid(format!(
                "eps must be a positive finite number, got {eps}"
            )));
        }
        if !(weight_decay >= 0.0 && weight_decay.is_finite()) {
            return Err(EngineError::invalid(format!(
                "weight_decay must be a non-negative finite number, got {weight_decay}"
            )));
        }
        Ok(())
    }

    /// One step in place. `step` counts optimizer steps from 1 (bias correction uses it).
    /// Decay is decoupled: w ← w·(1 − lr·wd) before the Adam update, as PyTorch does.
    /// Computed in float64 (g² of a gradient above 1.8e19 overflows float32 even when
    /// (1 − beta2)·g² does not); a new w, m or v beyond float32's range is `OutOfRange`, and
    /// the buffers are then partly updated, as they are when `cancel` stops the step (it is
    /// looked at between blocks: a first step over a large model faults in fresh moments
    /// for seconds).
    pub fn step(
        &self,
        w: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        step: i64,
        cancel: Cancel,
    ) -> Result<()> {
        self.step_scaled(w, g, m, v, step, 1.0, cancel)
    }

    /// `step` with the gradient taken as `grad_scale`·g: gradient clipping folded into the
    /// update, so the gradient buffer is neither rewritten nor read twice.
    #[allow(clippy::too_many_arguments)]
    pub fn step_scaled(
        &self,
        w: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        step: i64,
        grad_scale: f64,
        cancel: Cancel,
    ) -> Result<()> {
        self.validate()?;
        if step < 1 {
            return Err(EngineError::invalid(format!(
                "step must be at least 1, got {step}"
            )));
        }
        let n = w.len();
        if g.len() != n || m.len() != n || v.len() != n {
            return Err(EngineError::invalid(format!(
                "weight, grad, m and v must have the same length, got {}, {}, {} and {} values",
                n,
                g.len(),
                m.len(),
                v.len()
            )));
        }
        let t = step.min(i32::MAX as i64) as i32;
        let (beta1, beta2) = (self.beta1 as f64, self.beta2 as f64);
        let k = UpdateConstants {
            beta1,
            beta2,
            step_size: self.lr as f64 / (1.0 - beta1.powi(t)),
            bias2_sqrt: (1.0 - beta2.powi(t)).sqrt(),
            decay: 1.0 - self.lr as f64 * self.weight_decay as f64,
            eps: self.eps as f64,
            grad_scale,
        };
        // Elementwise, so blocks on the compute pool give the same result as one loop.
        let finite = if n <= BLOCK {
            cancel.check()?;
            update(w, g, m, v, &k)
        } else {
            parallel::install(|| {
                w.par_chunks_mut(BLOCK)
                    .zip(g.par_chunks(BLOCK))
                    .zip(m.par_chunks_mut(BLOCK))
                    .zip(v.par_chunks_mut(BLOCK))
                    .map(|(((w, g), m), v)| {
                        cancel.check()?;
                        Ok(update(w, g, m, v, &k))
                    })
                    .try_reduce(|| true, |a, b| Ok(a && b))
            })?
        };
        if finite {
            return Ok(());
        }
        // Only on failure: find what overflowed, for the message.
        tensor::check_result(w, "updated weight")?;
        tensor::check_result(m, "first moment m")?;
        tensor::check_result(v, "second moment v")
    }
}

struct UpdateConstants {
    beta1: f64,
    beta2: f64,
    step_size: f64,
    bias2_sqrt: f64,
    decay: f64,
    eps: f64,
    grad_scale: f64,
}

/// The AdamW update of one block; false when a new w, m or v is not finite. Vectorised:
/// the float64 arithmetic runs four or eight lanes wide, and the finiteness test is an
/// integer OR of exponent bits rather than a branch.
fn update(w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &UpdateConstants) -> bool {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx2_fma() {
        // SAFETY: the features were detected at run time.
        return unsafe { update_avx2(w, g, m, v, k) };
    }
    update_body(w, g, m, v, k)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn update_avx2(
    w: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    k: &UpdateConstants,
) -> bool {
    update_body(w, g, m, v, k)
}

#[inline(always)]
fn update_body(
    w: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    k: &UpdateConstants,
) -> bool {
    const EXPONENT: u32 = 0x7f80_0000;
    let n = w.len();
    let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
    let mut overflow = 0u32;
    for i in 0..n {
        let gi = g[i] as f64 * k.grad_scale;
        let mi = k.beta1 * m[i] as f64 + (1.0 - k.beta1) * gi;
        let vi = k.beta2 * v[i] as f64 + (1.0 - k.beta2) * gi * gi;
        let denom = vi.sqrt() / k.bias2_sqrt + k.eps;
        let (wn, mn, vn) = (
            (w[i] as f64 * k.decay - k.step_size * mi / denom) as f32,
            mi as f32,
            vi as f32,
        );
        w[i] = wn;
        m[i] = mn;
        v[i] = vn;
        // All exponent bits set: ±inf or NaN.
        overflow |= ((wn.to_bits() & EXPONENT) == EXPONENT) as u32
            | ((mn.to_bits() & EXPONENT) == EXPONENT) as u32
            | ((vn.to_bits() & EXPONENT) == EXPONENT) as u32;
    }
    overflow == 0
}

/// Values per task of the optimizer's elementwise and reduction work.
const BLOCK: usize = 64 * 1024;

/// L2 norm of a gradient, accumulated in float64.
/// Partial sums over fixed blocks, added in order: the same value for any thread count.
pub fn grad_norm(g: &[f32]) -> f64 {
    let square_sum = |b: &[f32]| crate::simd::sum_squares_f64(b);
    let partial: Vec<f64> = if g.len() <= BLOCK {
        vec![square_sum(g)]
    } else {
        parallel::install(|| g.par_chunks(BLOCK).map(square_sum).collect())
    };
    partial.iter().sum::<f64>().sqrt()
}

/// Dynamic loss scaling for float16 training, with `torch.amp.GradScaler`'s policy: the loss's
/// gradient is multiplied by `scale` so that small gradients survive float16's range; a step
/// whose gradient overflows is skipped and the scale halved; after `GROWTH_INTERVAL` steps in a
/// row without overflow the scale doubles.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScaler {
    pub scale: f32,
    /// Steps without overflow since the scale last changed.
    pub good_steps: u32,
}

impl LossScaler {
    pub const INITIAL_SCALE: f32 = 65536.0;
    pub const GROWTH_INTERVAL: u32 = 2000;

    pub fn new(scale: f32) -> Result<Self> {
        if !(scale > 0.0 && scale.is_finite()) {
            return Err(EngineError::invalid(format!(
                "the loss scale must be a positive finite number, got {scale}"
            )));
        }
        Ok(Self {
            scale,
            good_steps: 0,
        })
    }

    /// The state after a step that used `self.scale`.
    pub fn update(&mut self, overflowed: bool) {
        if overflowed {
            // Never down to zero: a scale that small means the gradient itself is not finite.
            self.scale = (self.scale * 0.5).max(f32::MIN_POSITIVE);
            self.good_steps = 0;
        } else {
            self.good_steps += 1;
            if self.good_steps >= Self::GROWTH_INTERVAL {
                self.scale = (self.scale * 2.0).min(f32::MAX);
                self.good_steps = 0;
            }
        }
    }
}

impl Default for LossScaler {
    fn default() -> Self {
        Self {
            scale: Self::INITIAL_SCALE,
            good_steps: 0,
        }
    }
}

/// The factor `clip_grad_norm` scales a gradient of L2 norm `norm` by (PyTorch's
/// max_norm / (norm + 1e-6), never above 1).
pub fn clip_coefficient(norm: f64, max_norm: f32) -> f64 {
    (max_norm as f64 / (norm + 1e-6)).min(1.0)
}

/// Scales `g` in place so its L2 norm is at most `max_norm` (PyTorch's `clip_grad_norm_`:
/// coefficient max_norm / (norm + 1e-6), never above 1). Returns the norm before clipping.
pub fn clip_grad_norm(g: &mut [f32], max_norm: f32) -> Result<f64> {
    if !(max_norm > 0.0) || !max_norm.is_finite() {
        return Err(EngineError::invalid(format!(
            "clip must be a positive finite number, got {max_norm}"
        )));
    }
    let norm = grad_norm(g);
    let coef = clip_coefficient(norm, max_norm);
    if coef < 1.0 {
        // Scaled in float64: coef itself can be below float32's range (a 1e-30 clip of a
        // 3e38 gradient) while the scaled values are not.
        let scale = |b: &mut [f32]| b.iter_mut().for_each(|x| *x = (*x as f64 * coef) as f32);
        parallel::install(|| g.par_chunks_mut(BLOCK).for_each(scale));
    }
    Ok(norm)
}

/// The GPT-3 schedule. `step` counts optimizer steps from 1. Linear warmup to `lr_max` over
/// `warmup` steps (step s gets lr_max·s/warmup), then cosine decay to `min_ratio`·lr_max at
/// step `total`, constant after that. `warmup` = 0 starts decaying at once.
pub fn lr_schedule(step: i64, warmup: i64, total: i64, lr_max: f32, min_ratio: f32) -> Result<f32> {
    if step < 0 {
        return Err(EngineError::invalid(format!(
            "step must be non-negative, got {step}"
        )));
    }
    if warmup < 0 {
        return Err(EngineError::invalid(format!(
            "warmup must be non-negative, got {warmup}"
        )));
    }
    if total < warmup || total < 1 {
        return Err(EngineError::invalid(format!(
            "total must be at least 1 and at least warmup ({warmup}), got {total}"
        )));
    }
    if !(lr_max >= 0.0) || !lr_max.is_finite() {
        return Err(EngineError::invalid(format!(
            "lr_max must be a non-negative finite number, got {lr_max}"
        )));
    }
    if !(0.0..=1.0).contains(&min_ratio) {
        return Err(EngineError::invalid(format!(
            "min_ratio must be in [0, 1], got {min_ratio}"
        )));
    }
    let lr_max = lr_max as f64;
    let lr_min = lr_max * min_ratio as f64;
    let lr = if step < warmup {
        lr_max * step as f64 / warmup as f64
    } else if total == warmup {
        lr_min
    } else {
        let progress = ((step - warmup) as f64 / (total - warmup) as f64).min(1.0);
        lr_min + 0.5 * (lr_max - lr_min) * (1.0 + (std::f64::consts::PI * progress).cos())
    };
    Ok(lr as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEST_ADAMW: AdamW = AdamW {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };

    #[test]
    fn adamw_first_step_matches_closed_form() {
        // At step 1, m̂ = g and v̂ = g², so the update is lr·g/(|g| + eps) after decay.
        let opt = TEST_ADAMW;
        let (mut w, g) = (vec![1.0f32, -2.0], vec![0.5f32, -0.25]);
        let (mut m, mut v) = (vec![0.0; 2], vec![0.0; 2]);
        opt.step(&mut w, &g, &mut m, &mut v, 1, Cancel::NEVER)
            .unwrap();
        assert!((w[0] - (1.0 * 0.99 - 0.1)).abs() < 1e-6);
        assert!((w[1] - (-2.0 * 0.99 + 0.1)).abs() < 1e-6);
        assert!((m[0] - 0.05).abs() < 1e-7 && (v[0] - 0.0125).abs() < 1e-7);
        assert!(opt
            .step(&mut w, &g, &mut m, &mut v, 0, Cancel::NEVER)
            .is_err());
        let bad = AdamW { beta2: 1.0, ..opt };
        assert!(bad
            .step(&mut w, &g, &mut m, &mut v, 2, Cancel::NEVER)
            .is_err());
    }

    #[test]
    fn a_cancelled_step_stops() {
        let opt = AdamW {
            weight_decay: 0.0,
            ..TEST_ADAMW
        };
        let stop = || true;
        for n in [10, 3 * BLOCK] {
            let (mut w, g) = (vec![1.0f32; n], vec![0.5f32; n]);
            let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
            let err = opt
                .step(&mut w, &g, &mut m, &mut v, 1, Cancel::new(&stop))
                .unwrap_err();
            assert!(matches!(err, EngineError::Cancelled), "{err}");
        }
    }

    #[test]
    fn adamw_with_huge_gradients() {
        let opt = AdamW {
            weight_decay: 0.0,
            ..TEST_ADAMW
        };
        // Reported: grad 3e38 gave v = inf; the true v = 0.05·9e76 is out of range.
        let (mut w, mut m, mut v) = (vec![1.0f32], vec![0.0f32], vec![0.0f32]);
        let err = opt
            .step(&mut w, &[3e38], &mut m, &mut v, 1, Cancel::NEVER)
            .unwrap_err();
        assert!(matches!(err, EngineError::OutOfRange(_)), "{err}");
        // g² = 2.5e39 overflows float32 but v = 0.05·g² = 1.25e38 does not; the step is lr.
        let (mut w, mut m, mut v) = (vec![1.0f32], vec![0.0f32], vec![0.0f32]);
        opt.step(&mut w, &[5e19], &mut m, &mut v, 1, Cancel::NEVER)
            .unwrap();
        assert!((v[0] / 1.25e38 - 1.0).abs() < 1e-6 && (w[0] - 0.9).abs() < 1e-6);
    }

    #[test]
    fn norm_and_clip_of_huge_gradients() {
        let mut g = vec![3e38f32; 4];
        assert!((grad_norm(&g) / 6e38 - 1.0).abs() < 1e-7);
        clip_grad_norm(&mut g, 1e-30).unwrap();
        assert!(g.iter().all(|x| (x / 5e-31 - 1.0).abs() < 1e-6), "{g:?}");
    }

    #[test]
    fn clip_scales_to_max_norm() {
        let mut g = vec![3.0f32, 4.0];
        assert_eq!(clip_grad_norm(&mut g, 1.0).unwrap(), 5.0);
        assert!((grad_norm(&g) - 1.0).abs() < 1e-5);
        let mut small = vec![0.3f32, 0.4];
        clip_grad_norm(&mut small, 1.0).unwrap();
        assert_eq!(small, vec![0.3, 0.4]);
    }

    #[test]
    fn schedule_shape() {
        let lr = |s| lr_schedule(s, 10, 110, 6e-4, 0.1).unwrap();
        assert_eq!(lr(0), 0.0);
        assert!((lr(5) - 3e-4).abs() < 1e-9);
        assert!((lr(10) - 6e-4).abs() < 1e-9);
        assert!((lr(60) - 3.3e-4).abs() < 1e-9);
        assert!((lr(110) - 6e-5).abs() < 1e-9);
        assert!((lr(500) - 6e-5).abs() < 1e-9);
        assert!(lr_schedule(1, 10, 5, 6e-4, 0.1).is_err());
    }
}
