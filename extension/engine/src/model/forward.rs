//! The forward pass of every supported architecture, driven by `ModelConfig`, with a KV cache
//! so that generation processes the prompt once and then one token per step.
//! Layout: activations are [T, d_model] row-major; cached keys and values are [positions, d_attn].

use super::config::{Activation, AttnKind, LnPlacement, ModelConfig};
use super::weights::{ModelWeights, Norm};
use crate::error::{EngineError, Result};
use crate::kernels::attention::{attend, AttnInputs, AttnOptions};
use crate::kernels::layernorm::layernorm_forward;
use crate::kernels::linear::linear;
use crate::parallel::{self, Cancel};
use crate::tensor;

/// A model ready to run: its configuration and weights.
pub struct Model {
    pub config: ModelConfig,
    pub weights: ModelWeights,
}

/// Keys and values of the positions processed so far, per layer.
#[derive(Clone)]
pub struct KvCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
    capacity: usize,
}

/// Which logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// [T, vocab]: every position of the call.
    All,
    /// [vocab]: the last position only (generation).
    Last,
}

impl Model {
    pub fn new(config: ModelConfig, weights: ModelWeights) -> Result<Self> {
        config.validate()?;
        Ok(Self { config, weights })
    }

    /// An empty cache for up to `capacity` positions (at most the model's context).
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        let cfg = &self.config;
        if capacity > cfg.n_positions {
            return Err(EngineError::invalid(format!(
                "{capacity} positions exceed the model's context of {}",
                cfg.n_positions
            )));
        }
        let per_layer = tensor::numel(&[capacity, cfg.d_attn()], "KV cache")?;
        let mut keys = Vec::with_capacity(cfg.n_layer);
        let mut values = Vec::with_capacity(cfg.n_layer);
        for _ in 0..cfg.n_layer {
            keys.push(tensor::alloc_zeroed(per_layer)?);
            values.push(tensor::alloc_zeroed(per_layer)?);
        }
        Ok(KvCache {
            keys,
            values,
            len: 0,
            capacity,
        })
    }

    /// Logits for every position of `tokens`, from an empty cache.
    pub fn logits(&self, tokens: &[u32], cancel: Cancel) -> Result<Vec<f32>> {
        let mut cache = self.new_cache(tokens.len().max(1))?;
        self.forward(tokens, &mut cache, Logits::All, cancel)
    }

    /// Runs `tokens` at positions cache.len().. and appends their keys and values.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        which: Logits,
        cancel: Cancel,
    ) -> Result<Vec<f32>> {
        let cfg = &self.config;
        let w = &self.weights;
        let (t, d, da) = (tokens.len(), cfg.d_model, cfg.d_attn());
        if t == 0 {
            return Err(EngineError::invalid("no tokens to process"));
        }
        if cache.len + t > cache.capacity {
            return Err(EngineError::invalid(format!(
                "{} positions exceed the context of {} tokens",
                cache.len + t,
                cache.capacity
            )));
        }
        if let Some((i, bad)) = tokens
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= cfg.vocab)
        {
            return Err(EngineError::invalid(format!(
                "token id {bad} at index {i} is outside the vocabulary of {} tokens",
                cfg.vocab
            )));
        }
        let start = cache.len;
        let mut x = self.embed(tokens, start, cancel)?;
        for (i, layer) in w.layers.iter().enumerate() {
            cancel.check()?;
            let opts = AttnOptions {
                window: match cfg.layer_kind(i) {
                    AttnKind::Dense => None,
                    AttnKind::Local => cfg.local_window,
                },
                scale: cfg.scale_attn,
            };
            // Attention sub-layer.
            let h = match cfg.ln_placement {
                LnPlacement::Pre => norm(&x, &layer.ln_1, cfg.ln_eps)?,
                LnPlacement::Post => x.clone(),
            };
            let qkv = linear(
                &h,
                &layer.w_qkv,
                Some(&layer.b_qkv[..]),
                t,
                d,
                3 * da,
                cancel,
            )?;
            let (keys, values) = (&mut cache.keys[i], &mut cache.values[i]);
            for r in 0..t {
                let row = &qkv[r * 3 * da..(r + 1) * 3 * da];
                keys[(start + r) * da..(start + r + 1) * da].copy_from_slice(&row[da..2 * da]);
                values[(start + r) * da..(start + r + 1) * da].copy_from_slice(&row[2 * da..]);
            }
            let inputs = AttnInputs {
                q: &qkv,
                q_stride: 3 * da,
                k: keys,
                v: values,
                kv_stride: da,
                start,
                t,
            };
            let attn = attend(inputs, cfg.n_head, cfg.d_head, opts, cancel)?.out;
            let a = linear(&attn, &layer.w_o, Some(&layer.b_o[..]), t, da, d, cancel)?;
            add_into(&mut x, &a);
            if cfg.ln_placement == LnPlacement::Post {
                x = norm(&x, &layer.ln_1, cfg.ln_eps)?;
            }
            // MLP sub-layer.
            let h = match cfg.ln_placement {
                LnPlacement::Pre => norm(&x, &layer.ln_2, cfg.ln_eps)?,
                LnPlacement::Post => x.clone(),
            };
            let mut f = linear(
                &h,
                &layer.w_fc,
                Some(&layer.b_fc[..]),
                t,
                d,
                cfg.d_ff,
                cancel,
            )?;
            activate(&mut f, cfg.activation);
            let m = linear(
                &f,
                &layer.w_proj,
                Some(&layer.b_proj[..]),
                t,
                cfg.d_ff,
                d,
                cancel,
            )?;
            add_into(&mut x, &m);
            if cfg.ln_placement == LnPlacement::Post {
                x = norm(&x, &layer.ln_2, cfg.ln_eps)?;
            }
        }
        cache.len += t;
        let (rows, h) = match which {
            Logits::All => (t, x),
            Logits::Last => (1, x[(t - 1) * d..].to_vec()),
        };
        self.head(&h, rows, cancel)
    }

    /// Token + position embeddings of `tokens` placed at positions start.. → [T, d_model].
    fn embed(&self, tokens: &[u32], start: usize, cancel: Cancel) -> Result<Vec<f32>> {
        let cfg = &self.config;
        let (d, e) = (cfg.d_model, cfg.d_embed());
        let mut tok = Vec::with_capacity(tokens.len() * e);
        for &id in tokens {
            tok.extend_from_slice(&self.weights.wte[id as usize * e..(id as usize + 1) * e]);
        }
        let mut x = match &self.weights.project_in {
            Some(p) => linear(&tok, p, None, tokens.len(), e, d, cancel)?,
            None => tok,
        };
        for (r, row) in x.chunks_exact_mut(d).enumerate() {
            let pos = start + r + cfg.position_offset;
            row.iter_mut()
                .zip(&self.weights.wpe[pos * d..(pos + 1) * d])
                .for_each(|(v, p)| *v += p);
        }
        Ok(x)
    }

    /// Final LayerNorm, projection and output layer for `rows` rows of hidden state.
    fn head(&self, h: &[f32], rows: usize, cancel: Cancel) -> Result<Vec<f32>> {
        let cfg = &self.config;
        let w = &self.weights;
        let mut h = match &w.ln_f {
            Some(n) => norm(h, n, cfg.ln_eps)?,
            None => h.to_vec(),
        };
        if let Some(p) = &w.project_out {
            h = linear(&h, p, None, rows, cfg.d_model, cfg.d_embed(), cancel)?;
        }
        let table = w.lm_head.as_ref().unwrap_or(&w.wte);
        let n_rows = cfg.embedding_rows();
        let mut logits = linear(&h, table, None, rows, cfg.d_embed(), n_rows, cancel)?;
        if n_rows != cfg.vocab {
            logits = logits
                .chunks_exact(n_rows)
                .flat_map(|r| r[..cfg.vocab].to_vec())
                .collect();
        }
        Ok(logits)
    }
}

fn norm(x: &[f32], n: &Norm, eps: f32) -> Result<Vec<f32>> {
    layernorm_forward(x, &n.weight, &n.bias, eps)
}

/// x += y, in parallel blocks for long inputs.
fn add_into(x: &mut [f32], y: &[f32]) {
    parallel::for_rows(x, 1, |first, block| {
        let ys = &y[first..first + block.len()];
        block.iter_mut().zip(ys).for_each(|(a, b)| *a += b);
    });
}

fn activate(x: &mut [f32], act: Activation) {
    parallel::for_rows(x, 1, |_, block| match act {
        Activation::GeluNew => crate::simd::gelu_new_inplace(block),
        Activation::Gelu => block
            .iter_mut()
            .for_each(|v| *v = 0.5 * *v * (1.0 + libm::erff(*v * std::f32::consts::FRAC_1_SQRT_2))),
        Activation::Relu => block.iter_mut().for_each(|v| *v = v.max(0.0)),
    });
}
