//! How much memory a call will need, computed from shapes before anything is allocated, so
//! the SQL layer can refuse work that does not fit (`pg_llm.max_memory`, SQLSTATE 53200)
//! instead of letting the kernel's OOM killer end the server.
//!
//! Every estimate is an upper bound of the engine's peak heap use for that work (checked
//! against a counting allocator in `tests/memory_bounds.rs`), split into the model's weights
//! (which a backend maps from the shared weight file, or holds privately) and the working
//! memory the call allocates on top (activations, KV caches, logits, gradients, moments).

use crate::error::Result;
use crate::model::weights::packed_len;
use crate::model::{DType, ModelConfig};

/// Bytes a call needs: the weights it reads and the working memory it allocates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Need {
    pub weights: u64,
    pub working: u64,
}

impl Need {
    pub fn total(&self) -> u64 {
        self.weights.saturating_add(self.working)
    }
}

const F32: u64 = 4;
/// What no shape predicts: the matrix library's packing buffers (a few MB per thread, sized
/// by the caches), allocator bookkeeping, small vectors.
pub fn margin(threads: usize) -> u64 {
    (8 << 20) + (threads.max(1) as u64) * (2 << 20)
}
/// Rows of queries an attention task scores at once (`kernels::attention`).
const Q_BLOCK: u64 = 64;

/// The model's weights in bytes.
pub fn weights(cfg: &ModelConfig) -> Result<u64> {
    Ok(packed_len(cfg)? as u64 * F32)
}

/// A forward pass over `tokens` positions returning `logits_rows` rows of logits, without a
/// KV cache, on `threads` compute threads.
pub fn inference(
    cfg: &ModelConfig,
    tokens: usize,
    logits_rows: usize,
    threads: usize,
) -> Result<Need> {
    Ok(Need {
        weights: weights(cfg)?,
        working: forward_working(cfg, tokens as u64, threads as u64)
            .saturating_add(head_working(cfg, logits_rows as u64))
            .saturating_add(margin(threads)),
    })
}

/// Generation of up to `max_new` tokens after a `prompt`-token prompt, keeping `caches` KV
/// caches at once (1 for sampling; beam search holds each beam's and its successors'), whose
/// keys and values are in `kv` (the precision the model is served in).
pub fn generation(
    cfg: &ModelConfig,
    prompt: usize,
    max_new: usize,
    caches: usize,
    kv: DType,
    threads: usize,
) -> Result<Need> {
    let positions = (prompt as u64).saturating_add(max_new as u64);
    let mut need = inference(cfg, prompt, 1, threads)?;
    // Per cache: its keys and values, the tokens so far and the last logits of its beam.
    let per_cache = kv_cache(cfg, positions, kv)
        .saturating_add(positions * 4)
        .saturating_add(cfg.vocab as u64 * F32);
    // Sampling sorts the candidates of one row (value and index per token).
    let sampling = cfg.vocab as u64 * 16;
    // A prompt reading a half-precision cache widens one head's keys and values per thread.
    let widened = match kv {
        DType::Float32 => 0,
        _ => (threads.max(1) as u64)
            .saturating_mul(2 * positions * cfg.d_head as u64)
            .saturating_mul(F32),
    };
    need.working = need
        .working
        .saturating_add(per_cache.saturating_mul(caches as u64))
        .saturating_add(sampling)
        .saturating_add(widened);
    Ok(need)
}

/// A loss without gradients over `rows` tokens (batch × sequence length).
pub fn loss(cfg: &ModelConfig, rows: usize, threads: usize) -> Result<Need> {
    let n = rows as u64;
    Ok(Need {
        weights: weights(cfg)?,
        working: layer_activations(cfg, n)
            .saturating_add(head_working(cfg, n))
            .saturating_add(attention_scratch(cfg, n, threads as u64))
            .saturating_add(n * 16)
            .saturating_add(margin(threads)),
    })
}

/// A training call: the private weights, gradient and AdamW moments it holds for all its
/// steps (four copies of the model), plus one pass over `pass_rows` tokens (a micro-batch),
/// keeping every layer's activations or, with `recompute`, only each layer's input. Passes in
/// half `precision` add the rounded copy of the weights and the rounded operands of a layer
/// and of the head.
pub fn training(
    cfg: &ModelConfig,
    pass_rows: usize,
    recompute: bool,
    precision: DType,
    threads: usize,
) -> Result<Need> {
    let w = weights(cfg)?;
    let n = pass_rows as u64;
    let layer = layer_activations(cfg, n);
    let layers = if recompute {
        (cfg.n_layer as u64)
            .saturating_mul(n * cfg.d_model as u64 * F32)
            .saturating_add(layer)
    } else {
        (cfg.n_layer as u64).saturating_mul(layer)
    };
    // The backward of one layer holds gradients of its activations besides what it saved.
    let backward = layer;
    // Logits, which become their own gradient, and the head's input and gradient.
    let head = head_working(cfg, n).saturating_add(n * 2 * width(cfg) * F32);
    let (copies, operands) = match precision {
        DType::Float32 => (4, 0),
        _ => (5, layer.saturating_add(head_working(cfg, n))),
    };
    let working = w
        .saturating_mul(copies)
        .saturating_add(operands)
        .saturating_add(layers)
        .saturating_add(backward)
        .saturating_add(head)
        .saturating_add(attention_scratch(cfg, n, threads as u64))
        .saturating_add(n * 16)
        .saturating_add(margin(threads));
    Ok(Need {
        weights: w,
        working,
    })
}

/// The widest residual-stream row: d_model, or the embedding width of a projected model.
fn width(cfg: &ModelConfig) -> u64 {
    cfg.d_model.max(cfg.d_embed()) as u64
}

/// One layer's activations over `n` rows as the training forward saves them (inputs,
/// normalised inputs, q|k|v, attention output, MLP hidden before and after activation).
fn layer_activations(cfg: &ModelConfig, n: u64) -> u64 {
    let (d, da, ff) = (width(cfg), cfg.d_attn() as u64, cfg.d_ff as u64);
    n.saturating_mul(6 * d + 4 * da + 2 * ff + cfg.n_head as u64)
        .saturating_mul(F32)
}

/// The inference forward's buffers over `t` positions: one set serves every layer.
fn forward_working(cfg: &ModelConfig, t: u64, threads: u64) -> u64 {
    let (d, da, ff) = (width(cfg), cfg.d_attn() as u64, cfg.d_ff as u64);
    t.saturating_mul(4 * d + 4 * da + ff + 2)
        .saturating_mul(F32)
        .saturating_add(attention_scratch(cfg, t, threads))
}

/// Per compute thread, an attention task's output, log-sum-exp and one block of scores.
fn attention_scratch(cfg: &ModelConfig, t: u64, threads: u64) -> u64 {
    let per_task = t.saturating_mul(cfg.d_head as u64 + 1 + Q_BLOCK);
    threads.max(1).saturating_mul(per_task).saturating_mul(F32)
}

/// The output layer over `rows` rows: the logits, the final norm and projection's outputs.
fn head_working(cfg: &ModelConfig, rows: u64) -> u64 {
    rows.saturating_mul(cfg.vocab as u64 + 2 * width(cfg))
        .saturating_mul(F32)
}

/// Keys and values of `positions` positions in every layer, in `kv`.
fn kv_cache(cfg: &ModelConfig, positions: u64, kv: DType) -> u64 {
    positions
        .saturating_mul(2 * cfg.n_layer as u64 * cfg.d_attn() as u64)
        .saturating_mul(kv.value_bytes() as u64)
}

/// `bytes` for messages: "1.5 GB", "640 MB", "12 kB" (powers of 1024, PostgreSQL's units).
pub fn pretty(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else if value < 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.0} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretty_uses_postgres_units() {
        assert_eq!(pretty(512), "512 bytes");
        assert_eq!(pretty(1536), "1.5 kB");
        assert_eq!(pretty(500 << 20), "500 MB");
        assert_eq!(pretty(27 << 30), "27 GB");
    }
}
