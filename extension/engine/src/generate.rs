//! Generation on top of the KV-cached forward pass: sampling one token per step, and beam
//! search. The prompt is processed once; each step runs one position.

use std::ops::Deref;

use crate::error::{EngineError, Result};
use crate::model::{KvCache, Logits, Model, ModelConfig};
use crate::parallel::Cancel;
use crate::sample::{rng_from_seed, sample, EngineRng, SamplingParams};

/// What to generate.
#[derive(Clone, Copy, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop after this token (it is returned); `None` = always produce `max_tokens`.
    pub eos: Option<u32>,
    pub seed: Option<i64>,
}

/// Checks that `prompt_len + max_new` positions fit the model's context.
pub fn check_fits(cfg: &ModelConfig, prompt_len: usize, max_new: usize) -> Result<usize> {
    let ctx = cfg.n_positions;
    if prompt_len == 0 {
        return Err(EngineError::invalid("the prompt is empty"));
    }
    if prompt_len > ctx {
        return Err(EngineError::invalid(format!(
            "the prompt has {prompt_len} tokens, more than the model's context of {ctx}"
        )));
    }
    if prompt_len + max_new > ctx {
        return Err(EngineError::invalid(format!(
            "the prompt ({prompt_len} tokens) plus max_tokens ({max_new}) exceed the model's context of {ctx}"
        )));
    }
    Ok(prompt_len + max_new)
}

/// Token-by-token generation; `M` is any handle to a model (a reference, `Rc`, `Arc`).
pub struct Generator<M: Deref<Target = Model>> {
    model: M,
    cache: KvCache,
    rng: EngineRng,
    logits: Vec<f32>,
    /// A prompt not processed yet (`deferred`): the next `next_tokens` pass processes it.
    prompt: Option<Vec<u32>>,
    opts: GenerateOptions,
    produced: usize,
    finished: bool,
}

impl<M: Deref<Target = Model>> Generator<M> {
    /// Processes the prompt; no token is produced yet.
    pub fn new(model: M, prompt: &[u32], opts: GenerateOptions, cancel: Cancel) -> Result<Self> {
        let capacity = check_fits(&model.config, prompt.len(), opts.max_tokens)?;
        let mut cache = model.new_cache(capacity)?;
        let logits = model.forward(prompt, &mut cache, Logits::Last, cancel)?;
        let finished = opts.max_tokens == 0;
        Ok(Self {
            model,
            cache,
            rng: rng_from_seed(opts.seed),
            logits,
            prompt: None,
            opts,
            produced: 0,
            finished,
        })
    }

    /// A generation whose prompt is processed by the first `next_tokens` pass it takes part
    /// in, together with the other sequences of that pass (each row on its own, so its tokens
    /// do not depend on what runs beside it). That pass produces no token for it.
    pub fn deferred(model: M, prompt: &[u32], opts: GenerateOptions) -> Result<Self> {
        let capacity = check_fits(&model.config, prompt.len(), opts.max_tokens)?;
        crate::model::check_ids(prompt, model.config.vocab, "token")?;
        let cache = model.new_cache(capacity)?;
        Ok(Self {
            model,
            cache,
            rng: rng_from_seed(opts.seed),
            logits: Vec::new(),
            prompt: Some(prompt.to_vec()),
            opts,
            produced: 0,
            finished: opts.max_tokens == 0,
        })
    }

    /// Whether every token has been produced.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The next token and whether generation is complete after it; `None` once complete.
    pub fn next_token(&mut self, cancel: Cancel) -> Result<Option<(u32, bool)>> {
        if let Some(prompt) = self.prompt.take() {
            self.logits = self
                .model
                .forward(&prompt, &mut self.cache, Logits::Last, cancel)?;
        }
        let next = self.sample_next()?;
        if let Some((token, false)) = next {
            self.logits = self
                .model
                .forward(&[token], &mut self.cache, Logits::Last, cancel)?;
        }
        Ok(next)
    }

    /// The model generating.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Draws the next token from the current logits (the forward pass after it is the
    /// caller's); `None` once complete.
    fn sample_next(&mut self) -> Result<Option<(u32, bool)>> {
        if self.finished || self.prompt.is_some() {
            return Ok(None);
        }
        let token = sample(&self.logits, self.opts.sampling, &mut self.rng)? as u32;
        self.produced += 1;
        self.finished = self.produced >= self.opts.max_tokens || Some(token) == self.opts.eos;
        Ok(Some((token, self.finished)))
    }
}

/// Advances several generations of one model together, with one pass over the weights for
/// all of them (continuous batching: the caller adds and removes generators between steps):
/// each produces its next token, and a `deferred` one has its prompt processed in the same
/// pass instead (entry `None` for it, as for one already complete). Each gets exactly the
/// tokens it would get alone. After an error the generators are spent.
pub fn next_tokens<M: Deref<Target = Model>>(
    gens: &mut [&mut Generator<M>],
    cancel: Cancel,
) -> Result<Vec<Option<(u32, bool)>>> {
    next_tokens_with(gens, cancel, |_| {})
}

/// `next_tokens`, handing the tokens to `drawn` as soon as they are drawn, before the pass that
/// prepares the next ones (a server sends them a pass earlier that way).
pub fn next_tokens_with<M: Deref<Target = Model>>(
    gens: &mut [&mut Generator<M>],
    cancel: Cancel,
    drawn: impl FnOnce(&[Option<(u32, bool)>]),
) -> Result<Vec<Option<(u32, bool)>>> {
    if let Some(first) = gens.first() {
        let model: &Model = &first.model;
        if gens.iter().any(|g| !std::ptr::eq(&*g.model, model)) {
            return Err(EngineError::invalid(
                "generations decoded together must share one model",
            ));
        }
    }
    let mut produced = Vec::with_capacity(gens.len());
    for g in gens.iter_mut() {
        produced.push(g.sample_next()?);
    }
    drawn(&produced);
    // The rows of the pass: a deferred prompt, or the token just drawn by a generation that
    // goes on (the others need no logits).
    let mut tokens = Vec::new();
    let mut lens = Vec::new();
    let mut members = Vec::new();
    for (i, g) in gens.iter_mut().enumerate() {
        if let Some(prompt) = g.prompt.take() {
            tokens.extend_from_slice(&prompt);
            lens.push(prompt.len());
            members.push(i);
        } else if let Some((token, false)) = produced[i] {
            tokens.push(token);
            lens.push(1);
            members.push(i);
        }
    }
    if members.is_empty() {
        return Ok(produced);
    }
    let logits = {
        let mut model = None;
        let mut caches = Vec::with_capacity(members.len());
        for (i, g) in gens.iter_mut().enumerate() {
            if members.contains(&i) {
                let Generator {
                    model: m, cache, ..
                } = &mut **g;
                model.get_or_insert(&**m);
                caches.push(cache);
            }
        }
        model
            .unwrap()
            .forward_batch(&tokens, &lens, &mut caches, cancel)?
    };
    let vocab = logits.len() / members.len();
    for (row, &i) in members.iter().enumerate() {
        gens[i].logits = logits[row * vocab..(row + 1) * vocab].to_vec();
    }
    Ok(produced)
}

/// Generates up to `opts.max_tokens` tokens after `prompt` (the EOS token included when hit).
pub fn generate(
    model: &Model,
    prompt: &[u32],
    opts: GenerateOptions,
    cancel: Cancel,
) -> Result<Vec<u32>> {
    let mut g = Generator::new(model, prompt, opts, cancel)?;
    let mut out = Vec::with_capacity(opts.max_tokens);
    while let Some((t, _)) = g.next_token(cancel)? {
        out.push(t);
    }
    Ok(out)
}

/// One finished beam: generated tokens (EOS included when it ended the beam) and its score,
/// the summed log-probability divided by length^length_penalty (Hugging Face's convention).
#[derive(Clone, Debug)]
pub struct Hypothesis {
    pub tokens: Vec<u32>,
    pub score: f64,
}

struct Beam {
    tokens: Vec<u32>,
    logprob: f64,
    cache: KvCache,
    logits: Vec<f32>,
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln();
    logits.iter().map(|&v| v as f64 - lse).collect()
}

fn normalised(logprob: f64, len: usize, length_penalty: f64) -> f64 {
    logprob / (len.max(1) as f64).powf(length_penalty)
}

/// Beam search with `width` beams for up to `max_tokens` steps; returns up to `width`
/// hypotheses, best first.
pub fn beam_search(
    model: &Model,
    prompt: &[u32],
    width: usize,
    max_tokens: usize,
    length_penalty: f64,
    eos: Option<u32>,
    cancel: Cancel,
) -> Result<Vec<Hypothesis>> {
    if width == 0 {
        return Err(EngineError::invalid("beam_width must be at least 1"));
    }
    if max_tokens == 0 {
        return Err(EngineError::invalid("max_tokens must be at least 1"));
    }
    if !length_penalty.is_finite() {
        return Err(EngineError::invalid("length_penalty must be finite"));
    }
    let capacity = check_fits(&model.config, prompt.len(), max_tokens)?;
    let mut cache = model.new_cache(capacity)?;
    let logits = model.forward(prompt, &mut cache, Logits::Last, cancel)?;
    let mut beams = vec![Beam {
        tokens: Vec::new(),
        logprob: 0.0,
        cache,
        logits,
    }];
    let mut finished: Vec<Hypothesis> = Vec::new();
    for step in 0..max_tokens {
        cancel.check()?;
        // Best 2·width continuations over all beams.
        let mut cands: Vec<(f64, usize, u32)> = Vec::new();
        for (b, beam) in beams.iter().enumerate() {
            let lp = log_softmax(&beam.logits);
            let mut idx: Vec<usize> = (0..lp.len()).collect();
            let k = (2 * width).min(idx.len());
            idx.select_nth_unstable_by(k - 1, |a, c| lp[*c].total_cmp(&lp[*a]));
            for &t in &idx[..k] {
                cands.push((beam.logprob + lp[t], b, t as u32));
            }
        }
        cands.sort_by(|a, c| c.0.total_cmp(&a.0).then(a.1.cmp(&c.1)).then(a.2.cmp(&c.2)));
        let mut next: Vec<(usize, u32, f64)> = Vec::new();
        for (rank, &(lp, b, t)) in cands.iter().enumerate() {
            if Some(t) == eos {
                // An EOS only ends a hypothesis when it ranks among the best `width`.
                if rank < width {
                    let mut tokens = beams[b].tokens.clone();
                    tokens.push(t);
                    finished.push(Hypothesis {
                        score: normalised(lp, tokens.len() - 1, length_penalty),
                        tokens,
                    });
                }
            } else if next.len() < width {
                next.push((b, t, lp));
            }
            if next.len() == width {
                break;
            }
        }
        let last_step = step + 1 == max_tokens;
        let mut new_beams = Vec::with_capacity(next.len());
        for (b, t, lp) in next {
            let mut tokens = beams[b].tokens.clone();
            tokens.push(t);
            let mut cache = beams[b].cache.clone();
            let logits = if last_step {
                Vec::new()
            } else {
                model.forward(&[t], &mut cache, Logits::Last, cancel)?
            };
            new_beams.push(Beam {
                tokens,
                logprob: lp,
                cache,
                logits,
            });
        }
        beams = new_beams;
        if beams.is_empty() {
            break;
        }
        // Done when `width` hypotheses are finished and no live beam can still beat the worst.
        if finished.len() >= width {
            finished.sort_by(|a, c| c.score.total_cmp(&a.score));
            let worst = finished[width - 1].score;
            let best_live = beams
                .iter()
                .map(|b| normalised(b.logprob, b.tokens.len(), length_penalty))
                .fold(f64::NEG_INFINITY, f64::max);
            if best_live <= worst {
                break;
            }
        }
    }
    for b in beams {
        finished.push(Hypothesis {
            score: normalised(b.logprob, b.tokens.len(), length_penalty),
            tokens: b.tokens,
        });
    }
    finished.sort_by(|a, c| c.score.total_cmp(&a.score));
    finished.truncate(width);
    Ok(finished)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::tiny_gpt3;
    use crate::model::init::init_params;
    use crate::model::{MapSource, ModelWeights};

    fn model() -> Model {
        let cfg = tiny_gpt3();
        let mut params = init_params(&cfg, 3).unwrap();
        // Sharpen the random model so decisions are not near-ties.
        let wte = &mut params.get_mut("wte.weight").unwrap().1;
        wte.iter_mut().for_each(|v| *v *= 60.0);
        let weights = ModelWeights::load(&cfg, &mut MapSource::new(params)).unwrap();
        Model::new(cfg, weights).unwrap()
    }

    fn greedy_by_recomputation(m: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
        let mut ids = prompt.to_vec();
        for _ in 0..n {
            let logits = m.logits(&ids, Cancel::NEVER).unwrap();
            let last = &logits[logits.len() - m.config.vocab..];
            ids.push(crate::sample::argmax(last) as u32);
        }
        ids[prompt.len()..].to_vec()
    }

    #[test]
    fn cached_greedy_equals_recomputation_and_seeds_reproduce() {
        let m = model();
        let opts = GenerateOptions {
            max_tokens: 8,
            sampling: SamplingParams::GREEDY,
            eos: None,
            seed: None,
        };
        let got = generate(&m, &[1, 2, 3], opts, Cancel::NEVER).unwrap();
        assert_eq!(got, greedy_by_recomputation(&m, &[1, 2, 3], 8));
        let sampled = GenerateOptions {
            sampling: SamplingParams::new(1.0, 0, 1.0).unwrap(),
            seed: Some(5),
            ..opts
        };
        assert_eq!(
            generate(&m, &[4], sampled, Cancel::NEVER).unwrap(),
            generate(&m, &[4], sampled, Cancel::NEVER).unwrap()
        );
    }

    /// Generations of different prompts, lengths and sampling, decoded together and joining
    /// at different steps, get the tokens each gets alone, bit for bit.
    #[test]
    fn decoding_together_gives_each_its_tokens_alone() {
        let m = model();
        let sampled = SamplingParams::new(0.8, 0, 1.0).unwrap();
        let requests: Vec<(Vec<u32>, usize, SamplingParams, Option<i64>)> = vec![
            (vec![1, 2, 3], 9, SamplingParams::GREEDY, None),
            (vec![7], 4, SamplingParams::GREEDY, None),
            (vec![4, 4, 9, 2, 0], 6, sampled, Some(11)),
            (vec![3, 8], 8, SamplingParams::GREEDY, None),
            (vec![5, 6, 1], 5, sampled, Some(2)),
        ];
        let opts = |&(_, n, sampling, seed): &(Vec<u32>, usize, SamplingParams, Option<i64>)| {
            GenerateOptions {
                max_tokens: n,
                sampling,
                eos: None,
                seed,
            }
        };
        let alone: Vec<Vec<u32>> = requests
            .iter()
            .map(|r| generate(&m, &r.0, opts(r), Cancel::NEVER).unwrap())
            .collect();
        // Request i joins at step i.
        let mut live: Vec<(usize, Generator<&Model>)> = Vec::new();
        let mut got = vec![Vec::new(); requests.len()];
        for step in 0.. {
            if step < requests.len() {
                let r = &requests[step];
                live.push((
                    step,
                    Generator::new(&m, &r.0, opts(r), Cancel::NEVER).unwrap(),
                ));
            }
            if live.is_empty() {
                break;
            }
            let mut gens: Vec<&mut Generator<&Model>> = live.iter_mut().map(|(_, g)| g).collect();
            let out = next_tokens(&mut gens, Cancel::NEVER).unwrap();
            let mut done = Vec::new();
            for ((i, g), o) in live.iter().zip(out) {
                match o {
                    Some((token, finished)) => {
                        got[*i].push(token);
                        if finished {
                            done.push(*i);
                        }
                    }
                    None => assert!(!g.is_finished(), "a deferred prompt was processed"),
                }
            }
            live.retain(|(i, _)| !done.contains(i));
        }
        assert_eq!(got, alone);
    }

    #[test]
    fn stops_at_eos_and_rejects_overlong_requests() {
        let m = model();
        let first = generate(
            &m,
            &[1, 2],
            GenerateOptions {
                max_tokens: 1,
                sampling: SamplingParams::GREEDY,
                eos: None,
                seed: None,
            },
            Cancel::NEVER,
        )
        .unwrap()[0];
        let opts = GenerateOptions {
            max_tokens: 5,
            sampling: SamplingParams::GREEDY,
            eos: Some(first),
            seed: None,
        };
        assert_eq!(
            generate(&m, &[1, 2], opts, Cancel::NEVER).unwrap(),
            vec![first]
        );
        let too_long = GenerateOptions {
            max_tokens: 14,
            ..opts
        };
        assert!(
            generate(&m, &[1, 2, 3], too_long, Cancel::NEVER).is_err(),
            "3 + 14 > 16 positions"
        );
        assert!(generate(&m, &[1; 17], opts, Cancel::NEVER).is_err());
    }

    #[test]
    fn beam_of_one_is_greedy_and_wider_beams_score_at_least_as_well() {
        let m = model();
        let greedy = greedy_by_recomputation(&m, &[5, 6], 6);
        let one = beam_search(&m, &[5, 6], 1, 6, 1.0, None, Cancel::NEVER).unwrap();
        assert_eq!(one[0].tokens, greedy);
        let four = beam_search(&m, &[5, 6], 4, 6, 0.0, None, Cancel::NEVER).unwrap();
        assert_eq!(four.len(), 4);
        assert!(four.windows(2).all(|w| w[0].score >= w[1].score));
        let one_raw = beam_search(&m, &[5, 6], 1, 6, 0.0, None, Cancel::NEVER).unwrap();
        assert!(
            four[0].score >= one_raw[0].score - 1e-9,
            "a wider beam never finds a worse best sequence here"
        );
    }
}
