//! Choosing the next token from logits: temperature, top-k, top-p (nucleus), seeded RNG.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{EngineError, Result};

/// The RNG behind every random choice in the engine: ChaCha8, portable and reproducible.
pub type EngineRng = ChaCha8Rng;

/// An RNG from a caller's seed, or from the operating system when none is given.
pub fn rng_from_seed(seed: Option<i64>) -> EngineRng {
    match seed {
        Some(s) => ChaCha8Rng::seed_from_u64(s as u64),
        None => ChaCha8Rng::from_os_rng(),
    }
}

/// Sampling settings, validated by `new`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p; 1 keeps all.
    pub top_p: f32,
}

impl SamplingParams {
    pub fn new(temperature: f32, top_k: i64, top_p: f32) -> Result<Self> {
        if !(temperature >= 0.0) || !temperature.is_finite() {
            return Err(EngineError::invalid(format!(
                "temperature must be a non-negative finite number (0 = greedy), got {temperature}"
            )));
        }
        if top_k < 0 {
            return Err(EngineError::invalid(format!(
                "topk must be non-negative (0 disables it), got {top_k}"
            )));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(EngineError::invalid(format!(
                "topp must be in (0, 1] (1 disables it), got {top_p}"
            )));
        }
        Ok(Self {
            temperature,
            top_k: top_k as usize,
            top_p,
        })
    }

    pub const GREEDY: SamplingParams = SamplingParams {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
    };
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best
}

/// Draws one token id from one row of logits. The order of the filters follows Hugging Face
/// `generate`: temperature, then top-k, then top-p.
pub fn sample(logits: &[f32], p: SamplingParams, rng: &mut impl Rng) -> Result<usize> {
    if logits.is_empty() {
        return Err(EngineError::invalid("logits must not be empty"));
    }
    if logits.iter().all(|v| *v == f32::NEG_INFINITY) {
        return Err(EngineError::data(
            "every logit is -infinity; there is nothing to sample",
        ));
    }
    if p.temperature == 0.0 {
        return Ok(argmax(logits));
    }
    // Candidates sorted by logit, descending; top-k trims before sorting everything.
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit_desc = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if p.top_k > 0 && p.top_k < idx.len() {
        idx.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
        idx.truncate(p.top_k);
    }
    idx.sort_unstable_by(by_logit_desc);
    let max = logits[idx[0] as usize];
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| (((logits[i as usize] - max) / p.temperature) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|x| *x /= total);
    // Nucleus: keep a token while the mass before it is below top_p (at least one token).
    if p.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = 0;
        for &q in &probs {
            if cum >= p.top_p as f64 && keep > 0 {
                break;
            }
            cum += q;
            keep += 1;
        }
        probs.truncate(keep);
        idx.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut r = rng.random::<f64>() * total;
    for (k, &q) in probs.iter().enumerate() {
        if r < q {
            return Ok(idx[k] as usize);
        }
        r -= q;
    }
    Ok(*idx.last().unwrap() as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_validation() {
        let mut rng = rng_from_seed(Some(1));
        assert_eq!(
            sample(&[0.1, 3.0, 2.0], SamplingParams::GREEDY, &mut rng).unwrap(),
            1
        );
        assert!(SamplingParams::new(-1.0, 0, 1.0).is_err());
        assert!(SamplingParams::new(1.0, -1, 1.0).is_err());
        assert!(SamplingParams::new(1.0, 0, 0.0).is_err());
        assert!(SamplingParams::new(f32::NAN, 0, 1.0).is_err());
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_reproduces() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 7919) % 31) as f32 * 0.1).collect();
        let p = SamplingParams::new(1.0, 1, 1.0).unwrap();
        assert_eq!(
            sample(&logits, p, &mut rng_from_seed(Some(5))).unwrap(),
            argmax(&logits)
        );
        let p = SamplingParams::new(0.8, 10, 0.9).unwrap();
        let draw = |seed| {
            (0..20)
                .map(|_| 0)
                .scan(rng_from_seed(Some(seed)), |r, _| {
                    Some(sample(&logits, p, r).unwrap())
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(9), draw(9));
    }

    #[test]
    fn frequencies_follow_the_distribution() {
        // p = softmax([ln 1, ln 2, ln 7]) = [0.1, 0.2, 0.7]; top-p 0.75 keeps {2, 1}.
        let logits = [0.0f32, 2f32.ln(), 7f32.ln()];
        let mut rng = rng_from_seed(Some(42));
        let mut counts = [0usize; 3];
        let all = SamplingParams::new(1.0, 0, 1.0).unwrap();
        for _ in 0..20_000 {
            counts[sample(&logits, all, &mut rng).unwrap()] += 1;
        }
        assert!((counts[0] as f64 / 20_000.0 - 0.1).abs() < 0.01);
        assert!((counts[2] as f64 / 20_000.0 - 0.7).abs() < 0.01);
        let nucleus = SamplingParams::new(1.0, 0, 0.75).unwrap();
        let mut seen0 = false;
        for _ in 0..2_000 {
            seen0 |= sample(&logits, nucleus, &mut rng).unwrap() == 0;
        }
        assert!(!seen0, "top-p 0.75 must exclude the 10% token");
    }
}
