//! The forward pass of every supported architecture, driven by `ModelConfig`, with a KV cache
//! so that generation processes the prompt once and then one token per step.
//! Layout: activations are [T, d_model] row-major; cached keys and values are [positions, d_attn].

use rayon::prelude::*;

use super::config::{Activation, AttnKind, LnPlacement, ModelConfig, Residual};
use super::dtype::{DType, Half, Matrix};
use super::weights::{LayerWeights, ModelWeights, Norm};
use crate::error::{EngineError, Result};
use crate::kernels::attention::{attend_into, AttnInputs, AttnOptions, AttnShape};
use crate::kernels::layernorm::{layernorm_forward, layernorm_into};
use crate::kernels::linear::{linear_each_row_into, linear_half_into, linear_into};
use crate::kernels::matmul::Accumulate;
use crate::kernels::rotary::RotaryTable;
use crate::parallel::{self, Cancel};
use crate::tensor;

/// A model ready to run: its configuration and weights.
pub struct Model {
    pub config: ModelConfig,
    pub weights: ModelWeights,
}

/// Keys and values of the positions processed so far, per layer, each [n_head, capacity,
/// d_head]: one head's keys are contiguous, so a decoding step reads them as one stream
/// (position-major rows would make it gather 256 bytes every 3 KB, which the hardware
/// prefetchers do not follow). A model served in half precision keeps them in that precision
/// (`new_cache`): half the bytes a decoding step reads from a long context.
#[derive(Clone)]
pub struct KvCache {
    keys: Vec<KvRows>,
    values: Vec<KvRows>,
    len: usize,
    capacity: usize,
    d_head: usize,
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

    /// An empty cache for up to `capacity` positions (at most the model's context), in the
    /// precision the model's weights are served in.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        self.new_cache_as(capacity, self.weights.storage().dtype())
    }

    /// `new_cache` holding keys and values in `dtype`.
    pub fn new_cache_as(&self, capacity: usize, dtype: DType) -> Result<KvCache> {
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
            keys.push(KvRows::new(per_layer, dtype)?);
            values.push(KvRows::new(per_layer, dtype)?);
        }
        Ok(KvCache {
            keys,
            values,
            len: 0,
            capacity,
            d_head: cfg.d_head,
        })
    }

    /// Logits [T, vocab] for every position of `tokens`, from an empty cache.
    pub fn logits(&self, tokens: &[u32], cancel: Cancel) -> Result<Vec<f32>> {
        let mut out =
            tensor::alloc_zeroed(tensor::numel(&[tokens.len(), self.config.vocab], "logits")?)?;
        self.logits_into(&mut out, tokens, cancel)?;
        Ok(out)
    }

    /// `logits` into a caller's [T, vocab] buffer (such as the result value itself). Keeps no
    /// keys or values: attention reads them straight from each layer's q|k|v product.
    pub fn logits_into(&self, out: &mut [f32], tokens: &[u32], cancel: Cancel) -> Result<()> {
        if out.len() != tokens.len() * self.config.vocab {
            return Err(EngineError::invalid(format!(
                "a buffer of {} values cannot hold the logits of {} tokens",
                out.len(),
                tokens.len()
            )));
        }
        parallel::install(|| {
            let h = self.hidden(tokens, Rows::Sequence(None), cancel)?;
            self.head_into(out, &h, tokens.len(), Kernel::Auto, cancel)
        })
    }

    /// Runs `tokens` at positions cache.len().. and appends their keys and values.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        which: Logits,
        cancel: Cancel,
    ) -> Result<Vec<f32>> {
        // The whole pass runs on the compute threads (as do `logits_into` and
        // `forward_batch`): its many short parallel steps then hand work between threads that
        // are awake, instead of waking the caller's thread and a worker for each.
        parallel::install(|| {
            let d = self.config.d_model;
            let h = self.hidden(tokens, Rows::Sequence(Some(cache)), cancel)?;
            let (rows, h) = match which {
                Logits::All => (tokens.len(), &h[..]),
                Logits::Last => (1, &h[(tokens.len() - 1) * d..]),
            };
            let mut out = tensor::alloc_zeroed(rows * self.config.vocab)?;
            self.head_into(&mut out, h, rows, Kernel::Auto, cancel)?;
            Ok(out)
        })
    }

    /// One decoding step of several sequences at once (continuous batching): token b runs at
    /// position caches[b].len() of its own sequence, and its keys and values go to caches[b].
    /// Returns the next-token logits [B, vocab]. The weights are read once for all B rows, and
    /// row b is bit for bit what `forward(&[tokens[b]], caches[b], Logits::Last)` gives alone.
    pub fn decode(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
        cancel: Cancel,
    ) -> Result<Vec<f32>> {
        self.forward_batch(tokens, &vec![1; tokens.len()], caches, cancel)
    }

    /// One pass over several sequences: sequence b takes the next `lens[b]` tokens of `tokens`
    /// (a whole prompt, or the one token of a decoding step) at positions caches[b].len().. and
    /// appends their keys and values to caches[b]. Returns the logits [B, vocab] after each
    /// sequence's last token. Every row is computed on its own (and attention per sequence),
    /// so a sequence's results are the same bits whatever sequences run beside it.
    pub fn forward_batch(
        &self,
        tokens: &[u32],
        lens: &[usize],
        caches: &mut [&mut KvCache],
        cancel: Cancel,
    ) -> Result<Vec<f32>> {
        if lens.len() != caches.len() || lens.iter().sum::<usize>() != tokens.len() {
            return Err(EngineError::invalid(format!(
                "{} tokens in {} runs for {} sequences",
                tokens.len(),
                lens.len(),
                caches.len()
            )));
        }
        if lens.contains(&0) {
            return Err(EngineError::invalid(
                "every sequence of a batch needs a token",
            ));
        }
        parallel::install(|| {
            let d = self.config.d_model;
            let h = self.hidden(tokens, Rows::Batch { caches, lens }, cancel)?;
            let mut last = Vec::with_capacity(lens.len() * d);
            let mut end = 0;
            for &len in lens {
                end += len;
                last.extend_from_slice(&h[(end - 1) * d..end * d]);
            }
            let mut out = tensor::alloc_zeroed(lens.len() * self.config.vocab)?;
            self.head_into(&mut out, &last, lens.len(), Kernel::EachRow, cancel)?;
            Ok(out)
        })
    }

    /// The hidden state [T, d_model] after the last layer for `tokens`, the rows `rows` says
    /// (consecutive positions of one sequence, or one position of each of several). One set of
    /// activation buffers serves every layer, and the residual stream x takes each sub-layer's
    /// output projection in place.
    fn hidden(&self, tokens: &[u32], mut rows: Rows, cancel: Cancel) -> Result<Vec<f32>> {
        let cfg = &self.config;
        let (t, d, da) = (tokens.len(), cfg.d_model, cfg.d_attn());
        if t == 0 {
            return Err(EngineError::invalid("no tokens to process"));
        }
        rows.check_room(t, cfg.n_positions)?;
        check_ids(tokens, cfg.vocab, "token")?;
        let kernel = rows.kernel();
        let tok = self.token_rows(tokens)?;
        let positions = rows.positions(t);
        let mut x = self.embed_rows_with(&tok, |r| positions[r], kernel, cancel)?;
        let mut h = tensor::alloc_zeroed(t * d)?;
        let mut qkv = tensor::alloc_zeroed(t * 3 * da)?;
        let mut attn = tensor::alloc_zeroed(t * da)?;
        let mut f = tensor::alloc_zeroed(t * cfg.d_ff)?;
        let rotary = cfg.rotary.as_ref().map(RotaryTable::new);
        for (i, layer) in self.weights.layers.iter().enumerate() {
            cancel.check()?;
            let opts = AttnOptions {
                window: match cfg.layer_kind(i) {
                    AttnKind::Dense => None,
                    AttnKind::Local => cfg.local_window,
                },
                scale: cfg.scale_attn,
            };
            // Attention sub-layer.
            let input = self.sublayer_input(&mut h, &x, &layer.ln_1)?;
            let dims = (t, d, 3 * da);
            let (w, b) = (layer.w_qkv.matrix(), Some(&layer.b_qkv[..]));
            kernel.linear_into(&mut qkv, input, w, b, dims, OVERWRITE, cancel)?;
            // Queries and keys turn by their absolute positions; the cache keeps turned keys.
            if let Some(r) = &rotary {
                r.rotate_qk(&mut qkv, cfg, &positions, 1.0);
            }
            let shape = AttnShape {
                t,
                n_head: cfg.n_head,
                d_head: cfg.d_head,
            };
            match &mut rows {
                Rows::Sequence(cache) => {
                    let inputs = match cache.as_deref_mut() {
                        Some(cache) => cache.append(i, &qkv, t, da),
                        None => AttnInputs::fused(&qkv, shape),
                    };
                    attend_into(&mut attn, inputs, cfg.n_head, cfg.d_head, opts, cancel)?;
                }
                Rows::Batch { caches, lens } => {
                    // Each sequence's rows: its keys and values into its cache, then its
                    // queries against its cache; the sequences in parallel.
                    let mut outs = Vec::with_capacity(lens.len());
                    let mut rest = &mut attn[..];
                    let mut from = 0;
                    for (cache, &len) in caches.iter_mut().zip(lens.iter()) {
                        let q = &qkv[from * 3 * da..(from + len) * 3 * da];
                        cache.store(i, q, len, da);
                        let (out, tail) = rest.split_at_mut(len * da);
                        outs.push((&**cache, q, len, out));
                        rest = tail;
                        from += len;
                    }
                    parallel::install(|| {
                        outs.into_par_iter().try_for_each(|(cache, q, len, out)| {
                            let inputs = cache.view(i, q, len, da);
                            attend_into(out, inputs, cfg.n_head, cfg.d_head, opts, cancel)
                                .map(|_| ())
                        })
                    })?;
                }
            }
            let o_dims = (t, da, d);
            let (w_o, b_o) = (layer.w_o.matrix(), Some(&layer.b_o[..]));
            if cfg.residual == Residual::Sequential {
                kernel.linear_into(&mut x, &attn, w_o, b_o, o_dims, ADD, cancel)?;
                self.post_norm(&mut x, &mut h, &layer.ln_1)?;
                let input = self.sublayer_input(&mut h, &x, mlp_norm(layer))?;
                self.mlp_hidden(&mut f, input, layer, kernel, cancel)?;
            } else {
                // Both branches read the layer's input: the MLP's input is taken before x
                // changes. h still holds LN1(x), the MLP's input without an LN2 (GPT-J).
                if let Some(n) = &layer.ln_2 {
                    norm_into(&mut h, &x, n, cfg.ln_eps)?;
                }
                self.mlp_hidden(&mut f, &h, layer, kernel, cancel)?;
                kernel.linear_into(&mut x, &attn, w_o, b_o, o_dims, ADD, cancel)?;
            }
            let dims = (t, cfg.d_ff, d);
            let (w, b) = (layer.w_proj.matrix(), Some(&layer.b_proj[..]));
            kernel.linear_into(&mut x, &f, w, b, dims, ADD, cancel)?;
            self.post_norm(&mut x, &mut h, mlp_norm(layer))?;
        }
        rows.advance(t);
        Ok(x)
    }

    /// The MLP's activated hidden layer f [T, d_ff] for its input [T, d_model].
    fn mlp_hidden(
        &self,
        f: &mut [f32],
        input: &[f32],
        layer: &LayerWeights,
        kernel: Kernel,
        cancel: Cancel,
    ) -> Result<()> {
        let cfg = &self.config;
        let dims = (input.len() / cfg.d_model, cfg.d_model, cfg.d_ff);
        let (w, b) = (layer.w_fc.matrix(), Some(&layer.b_fc[..]));
        kernel.linear_into(f, input, w, b, dims, OVERWRITE, cancel)?;
        activate(f, cfg.activation);
        Ok(())
    }

    /// A sub-layer's input: LayerNorm(x), written to h, with pre-LN; x itself with post-LN.
    fn sublayer_input<'a>(&self, h: &'a mut [f32], x: &'a [f32], n: &Norm) -> Result<&'a [f32]> {
        if self.config.ln_placement == LnPlacement::Pre {
            norm_into(h, x, n, self.config.ln_eps)?;
            Ok(h)
        } else {
            Ok(x)
        }
    }

    /// After a sub-layer's residual addition: x ← LayerNorm(x) with post-LN (through h).
    fn post_norm(&self, x: &mut Vec<f32>, h: &mut Vec<f32>, n: &Norm) -> Result<()> {
        if self.config.ln_placement == LnPlacement::Post {
            norm_into(h, x, n, self.config.ln_eps)?;
            std::mem::swap(x, h);
        }
        Ok(())
    }

    /// The token-embedding rows of `tokens` → [T, d_embed] (ids already checked).
    pub(crate) fn token_rows(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let e = self.config.d_embed();
        let mut tok = Vec::new();
        tok.try_reserve_exact(tokens.len() * e)
            .map_err(|_| EngineError::too_large("the token embeddings do not fit in memory"))?;
        let wte = self.weights.wte.matrix();
        for &id in tokens {
            wte.extend_f32(id as usize * e..(id as usize + 1) * e, &mut tok);
        }
        Ok(tok)
    }

    /// Token rows [T, d_embed] (projected when d_embed ≠ d_model) plus the position
    /// embedding of each row's position `position(r)` → [T, d_model].
    pub(crate) fn embed_rows(
        &self,
        tok: &[f32],
        position: impl Fn(usize) -> usize,
        cancel: Cancel,
    ) -> Result<Vec<f32>> {
        self.embed_rows_with(tok, position, Kernel::Auto, cancel)
    }

    fn embed_rows_with(
        &self,
        tok: &[f32],
        position: impl Fn(usize) -> usize,
        kernel: Kernel,
        cancel: Cancel,
    ) -> Result<Vec<f32>> {
        let cfg = &self.config;
        let (d, e) = (cfg.d_model, cfg.d_embed());
        let rows = tok.len() / e;
        let mut x = match &self.weights.project_in {
            Some(p) => kernel.linear(tok, p.matrix(), (rows, e, d), cancel)?,
            None => tok.to_vec(),
        };
        // Rotary models have no position table: positions enter through q and k.
        if let Some(wpe) = &self.weights.wpe {
            let (wpe, mut at) = (wpe.matrix(), Vec::with_capacity(d));
            for (r, row) in x.chunks_exact_mut(d).enumerate() {
                let pos = position(r) + cfg.position_offset;
                at.clear();
                wpe.extend_f32(pos * d..(pos + 1) * d, &mut at);
                row.iter_mut().zip(&at).for_each(|(v, p)| *v += p);
            }
        }
        Ok(x)
    }

    /// Final LayerNorm, projection and output layer for `rows` rows of hidden state, into
    /// out [rows, vocab]. Embedding rows past the vocabulary (padding) are never computed.
    fn head_into(
        &self,
        out: &mut [f32],
        h: &[f32],
        rows: usize,
        kernel: Kernel,
        cancel: Cancel,
    ) -> Result<()> {
        let cfg = &self.config;
        let w = &self.weights;
        let normed;
        let h = match &w.ln_f {
            Some(n) => {
                normed = layernorm_forward(h, &n.weight, &n.bias, cfg.ln_eps)?;
                &normed[..]
            }
            None => h,
        };
        let projected;
        let h = match &w.project_out {
            Some(p) => {
                let dims = (rows, cfg.d_model, cfg.d_embed());
                projected = kernel.linear(h, p.matrix(), dims, cancel)?;
                &projected[..]
            }
            None => h,
        };
        let e = cfg.d_embed();
        let table = w.lm_head.as_ref().unwrap_or(&w.wte).matrix();
        let table = table.rows(0..cfg.vocab * e);
        let bias = w.lm_head_bias.as_ref().map(|b| &b[..cfg.vocab]);
        let dims = (rows, e, cfg.vocab);
        kernel.linear_into(out, h, table, bias, dims, OVERWRITE, cancel)
    }
}

/// The rows of one forward pass.
enum Rows<'a, 'c> {
    /// Consecutive positions of one sequence: from its cache's length on (appending to the
    /// cache), or from 0 without a cache.
    Sequence(Option<&'a mut KvCache>),
    /// Several sequences: lens[b] consecutive rows of sequence b after caches[b]'s positions.
    Batch {
        caches: &'a mut [&'c mut KvCache],
        lens: &'a [usize],
    },
}

impl Rows<'_, '_> {
    /// Refuses `t` rows that do not fit the caches (or the model's context `n_positions`).
    fn check_room(&self, t: usize, n_positions: usize) -> Result<()> {
        let full = |len: usize, capacity: usize| {
            EngineError::invalid(format!(
                "{len} positions exceed the context of {capacity} tokens"
            ))
        };
        match self {
            Rows::Sequence(None) if t > n_positions => Err(full(t, n_positions)),
            Rows::Sequence(Some(c)) if c.len + t > c.capacity => Err(full(c.len + t, c.capacity)),
            Rows::Batch { caches, lens } => {
                match caches
                    .iter()
                    .zip(lens.iter())
                    .find(|(c, &n)| c.len + n > c.capacity)
                {
                    Some((c, &n)) => Err(full(c.len + n, c.capacity)),
                    None => Ok(()),
                }
            }
            Rows::Sequence(_) => Ok(()),
        }
    }

    /// The position of every row.
    fn positions(&self, t: usize) -> Vec<usize> {
        match self {
            Rows::Sequence(cache) => {
                let start = cache.as_ref().map_or(0, |c| c.len);
                (start..start + t).collect()
            }
            Rows::Batch { caches, lens } => caches
                .iter()
                .zip(lens.iter())
                .flat_map(|(c, &n)| c.len..c.len + n)
                .collect(),
        }
    }

    /// Rows of several sequences must not influence each other's results.
    fn kernel(&self) -> Kernel {
        match self {
            Rows::Sequence(_) => Kernel::Auto,
            Rows::Batch { .. } => Kernel::EachRow,
        }
    }

    /// Counts the `t` rows just processed into the caches.
    fn advance(&mut self, t: usize) {
        match self {
            Rows::Sequence(cache) => {
                if let Some(c) = cache {
                    c.len += t;
                }
            }
            Rows::Batch { caches, lens } => caches
                .iter_mut()
                .zip(lens.iter())
                .for_each(|(c, &n)| c.len += n),
        }
    }
}

/// How a linear layer computes its rows: the fastest way for their number, or each row on its
/// own (batched decoding, so that a sequence's results do not depend on its neighbours).
#[derive(Clone, Copy)]
enum Kernel {
    Auto,
    EachRow,
}

impl Kernel {
    #[allow(clippy::too_many_arguments)]
    fn linear_into(
        self,
        y: &mut [f32],
        x: &[f32],
        w: Matrix,
        b: Option<&[f32]>,
        dims: (usize, usize, usize),
        acc: Accumulate,
        cancel: Cancel,
    ) -> Result<()> {
        let each_row = matches!(self, Kernel::EachRow);
        match w {
            Matrix::F32(w) if each_row => {
                linear_each_row_into(y, x, w, b, dims, acc);
                Ok(())
            }
            Matrix::F32(w) => linear_into(y, x, w, b, dims, acc, cancel),
            half => linear_half_into(y, x, half, b, dims, acc, each_row, cancel),
        }
    }

    /// x · wᵀ without bias → [t, out].
    fn linear(
        self,
        x: &[f32],
        w: Matrix,
        dims: (usize, usize, usize),
        cancel: Cancel,
    ) -> Result<Vec<f32>> {
        let mut y = tensor::alloc_zeroed(dims.0 * dims.2)?;
        self.linear_into(&mut y, x, w, None, dims, OVERWRITE, cancel)?;
        Ok(y)
    }
}

impl KvCache {
    /// Stores the keys and values of `t` new positions of layer `layer` (from its [t, 3·da]
    /// q|k|v product) and returns attention's view: those queries against every cached key.
    fn append<'a>(
        &'a mut self,
        layer: usize,
        qkv: &'a [f32],
        t: usize,
        da: usize,
    ) -> AttnInputs<'a> {
        self.store(layer, qkv, t, da);
        self.view(layer, qkv, t, da)
    }

    /// Stores the keys and values of `t` positions of layer `layer` after the cached ones.
    fn store(&mut self, layer: usize, qkv: &[f32], t: usize, da: usize) {
        let (start, dh, head_stride) = (self.len, self.d_head, self.capacity * self.d_head);
        let (keys, values) = (&mut self.keys[layer], &mut self.values[layer]);
        for (r, row) in qkv.chunks_exact(3 * da).take(t).enumerate() {
            let (k, v) = (&row[da..2 * da], &row[2 * da..]);
            for (h, (k, v)) in k.chunks_exact(dh).zip(v.chunks_exact(dh)).enumerate() {
                let at = h * head_stride + (start + r) * dh;
                keys.write(at, k);
                values.write(at, v);
            }
        }
    }

    /// Attention's view of layer `layer` for the `t` queries of `qkv` just stored.
    fn view<'a>(&'a self, layer: usize, qkv: &'a [f32], t: usize, da: usize) -> AttnInputs<'a> {
        AttnInputs {
            q: qkv,
            q_stride: 3 * da,
            k: self.keys[layer].matrix(),
            v: self.values[layer].matrix(),
            kv_stride: self.d_head,
            kv_head_stride: self.capacity * self.d_head,
            start: self.len,
            t,
        }
    }
}

/// One layer's cached keys (or values): float32, or the bits of a half precision.
#[derive(Clone)]
enum KvRows {
    F32(Vec<f32>),
    Half(Vec<u16>, Half),
}

impl KvRows {
    fn new(len: usize, dtype: DType) -> Result<Self> {
        Ok(match dtype.half() {
            None => KvRows::F32(tensor::alloc_zeroed(len)?),
            Some(h) => {
                let mut bits = Vec::new();
                bits.try_reserve_exact(len).map_err(|_| {
                    EngineError::OutOfMemory(format!(
                        "out of memory allocating a KV cache of {len} values"
                    ))
                })?;
                bits.resize(len, 0);
                KvRows::Half(bits, h)
            }
        })
    }

    /// Stores `values` from index `at` on (rounded to the half precision, if any).
    fn write(&mut self, at: usize, values: &[f32]) {
        match self {
            KvRows::F32(rows) => rows[at..at + values.len()].copy_from_slice(values),
            KvRows::Half(bits, h) => h.narrow_into(values, &mut bits[at..at + values.len()]),
        }
    }

    fn matrix(&self) -> Matrix<'_> {
        match self {
            KvRows::F32(rows) => Matrix::F32(rows),
            KvRows::Half(bits, h) => Matrix::Half(bits, *h),
        }
    }
}

/// Refuses an id outside the vocabulary; `what` names the ids in the message.
pub(crate) fn check_ids(ids: &[u32], vocab: usize, what: &str) -> Result<()> {
    match ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        Some((i, bad)) => Err(EngineError::invalid(format!(
            "{what} id {bad} at index {i} is outside the vocabulary of {vocab} tokens"
        ))),
        None => Ok(()),
    }
}

const OVERWRITE: Accumulate = Accumulate::Overwrite;
const ADD: Accumulate = Accumulate::Add;

/// The LayerNorm before a layer's MLP: LN2, or LN1 where the MLP shares it (GPT-J).
fn mlp_norm(layer: &LayerWeights) -> &Norm {
    layer.ln_2.as_ref().unwrap_or(&layer.ln_1)
}

fn norm_into(y: &mut [f32], x: &[f32], n: &Norm, eps: f32) -> Result<()> {
    layernorm_into(y, x, &n.weight, &n.bias, eps)
}

pub(crate) fn activate(x: &mut [f32], act: Activation) {
    parallel::for_rows(x, 1, |_, block| match act {
        Activation::GeluNew => crate::simd::gelu_new_inplace(block),
        Activation::Gelu => block
            .iter_mut()
            .for_each(|v| *v = 0.5 * *v * (1.0 + libm::erff(*v * std::f32::consts::FRAC_1_SQRT_2))),
        Activation::Relu => block.iter_mut().for_each(|v| *v = v.max(0.0)),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{tiny_gpt3, tiny_gptj, tiny_neox};
    use crate::model::init::init_params;
    use crate::model::MapSource;

    /// The tiny GPT-3, a post-LN one with a padded embedding table, and the rotary,
    /// parallel-residual ones of GPT-NeoX and GPT-J.
    fn pre_and_post_ln() -> [ModelConfig; 4] {
        let post = ModelConfig {
            ln_placement: LnPlacement::Post,
            padded_vocab: Some(16),
            ..tiny_gpt3()
        };
        [tiny_gpt3(), post, tiny_neox(), tiny_gptj()]
    }

    fn model(cfg: ModelConfig) -> Model {
        let mut src = MapSource::new(init_params(&cfg, 3).unwrap());
        Model::new(cfg.clone(), ModelWeights::load(&cfg, &mut src).unwrap()).unwrap()
    }

    /// A decoding step of six sequences at different positions gives each the bits of its own
    /// one-token step (the batch takes the four-row and the one-row paths of the kernels).
    #[test]
    fn decoding_together_is_bitwise_decoding_alone() {
        for cfg in pre_and_post_ln() {
            let m = model(cfg);
            let prompts: Vec<Vec<u32>> = (0..6)
                .map(|s| (0..=s).map(|i| ((i * 5 + s) % 11) as u32).collect())
                .collect();
            let mut caches: Vec<KvCache> = prompts
                .iter()
                .map(|p| {
                    let mut c = m.new_cache(16).unwrap();
                    m.forward(p, &mut c, Logits::Last, Cancel::NEVER).unwrap();
                    c
                })
                .collect();
            let tokens: Vec<u32> = (0..6).map(|s| (s * 3 % 11) as u32).collect();
            let alone: Vec<Vec<f32>> = caches
                .iter()
                .zip(&tokens)
                .map(|(c, &t)| {
                    let mut c = c.clone();
                    m.forward(&[t], &mut c, Logits::Last, Cancel::NEVER)
                        .unwrap()
                })
                .collect();
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            let together = m.decode(&tokens, &mut refs, Cancel::NEVER).unwrap();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&together), bits(&alone.concat()));
            assert!(caches
                .iter()
                .zip(&prompts)
                .all(|(c, p)| c.len == p.len() + 1));
        }
    }

    /// One pass without a cache (the logits path) and cached chunks that take both the
    /// few-rows and the many-rows linear paths give the same logits, for pre- and post-LN and
    /// a padded embedding table.
    #[test]
    fn cached_chunks_match_one_pass() {
        for cfg in pre_and_post_ln() {
            let m = model(cfg);
            let tokens: Vec<u32> = (0..13).map(|i| (i * 7 % 11) as u32).collect();
            let whole = m.logits(&tokens, Cancel::NEVER).unwrap();
            let mut cache = m.new_cache(16).unwrap();
            let mut chunked = Vec::new();
            for part in [&tokens[..6], &tokens[6..7], &tokens[7..]] {
                chunked.extend(
                    m.forward(part, &mut cache, Logits::All, Cancel::NEVER)
                        .unwrap(),
                );
            }
            assert_eq!(whole.len(), 13 * 11);
            let worst = whole
                .iter()
                .zip(&chunked)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(worst < 1e-5, "{worst}");
            // 13 of 16 positions are used: one more fits, three more do not.
            assert!(m
                .forward(&[1], &mut cache, Logits::Last, Cancel::NEVER)
                .is_ok());
            assert!(m
                .forward(&[1, 2, 3], &mut cache, Logits::Last, Cancel::NEVER)
                .is_err());
        }
    }

    /// A model served in bfloat16 or float16 computes what the float32 model computes from
    /// the rounded weights (float32 accumulation either way) on every path: one pass (many
    /// rows), cached one-token steps, and a batched step, bitwise its one-token steps.
    #[test]
    fn half_precision_matches_float32_of_the_rounded_weights() {
        use crate::model::DType;
        for cfg in pre_and_post_ln() {
            let params = init_params(&cfg, 3).unwrap();
            for dtype in [DType::Bfloat16, DType::Float16] {
                let rounded: crate::formats::TensorMap = params
                    .iter()
                    .map(|(name, (shape, v))| {
                        let v = match shape.len() {
                            2 => v.iter().map(|&x| dtype.round(x)).collect(),
                            _ => v.clone(),
                        };
                        (name.clone(), (shape.clone(), v))
                    })
                    .collect();
                let reference = model_from(&cfg, rounded, DType::Float32);
                let half = model_from(&cfg, params.clone(), dtype);
                assert_eq!(half.weights.storage().dtype(), dtype);
                let tokens: Vec<u32> = (0..9).map(|i| (i * 7 % 11) as u32).collect();
                let close = |a: &[f32], b: &[f32]| {
                    let worst = a
                        .iter()
                        .zip(b)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0, f32::max);
                    assert!(a.len() == b.len() && worst < 2e-5, "{dtype:?}: {worst}");
                };
                close(
                    &half.logits(&tokens, Cancel::NEVER).unwrap(),
                    &reference.logits(&tokens, Cancel::NEVER).unwrap(),
                );
                // The half model's cache holds keys and values in its precision.
                let (mut c_half, mut c_ref) = (
                    half.new_cache(12).unwrap(),
                    reference.new_cache_as(12, dtype).unwrap(),
                );
                for &t in &tokens[..4] {
                    let a = half
                        .forward(&[t], &mut c_half, Logits::Last, Cancel::NEVER)
                        .unwrap();
                    let b = reference
                        .forward(&[t], &mut c_ref, Logits::Last, Cancel::NEVER)
                        .unwrap();
                    close(&a, &b);
                }
                // Several positions at once read the cached half keys widened.
                let (mut more_half, mut more_ref) = (c_half.clone(), c_ref.clone());
                close(
                    &half
                        .forward(&tokens[4..8], &mut more_half, Logits::All, Cancel::NEVER)
                        .unwrap(),
                    &reference
                        .forward(&tokens[4..8], &mut more_ref, Logits::All, Cancel::NEVER)
                        .unwrap(),
                );
                let mut caches = [c_half.clone(), c_half.clone(), c_half];
                let alone: Vec<f32> = (0..3u32)
                    .flat_map(|t| {
                        let mut c = caches[0].clone();
                        half.forward(&[t], &mut c, Logits::Last, Cancel::NEVER)
                            .unwrap()
                    })
                    .collect();
                let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
                let together = half.decode(&[0, 1, 2], &mut refs, Cancel::NEVER).unwrap();
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&together), bits(&alone));
            }
        }
    }

    fn model_from(
        cfg: &ModelConfig,
        params: crate::formats::TensorMap,
        dtype: crate::model::DType,
    ) -> Model {
        let weights = ModelWeights::load_as(cfg, &mut MapSource::new(params), dtype).unwrap();
        Model::new(cfg.clone(), weights).unwrap()
    }
}
