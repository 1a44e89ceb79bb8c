//! Training: the loss of a batch and the gradient of every parameter, for every architecture
//! the forward pass supports (pre- and post-LayerNorm, dense and locally banded attention,
//! the three activations, projected embeddings, tied or separate head, rotary position
//! embeddings, sequential or parallel residuals, optional biases), llm.c style: a
//! forward pass that keeps what the backward needs, then the backward layer by layer with each
//! kernel's backward function.
//!
//! Layout: a batch of B sequences of T tokens is N = B·T rows; activations are [N, width]
//! row-major and attention runs per sequence. Gradients live in one buffer with the packing
//! of the weights (`weights::packing`), so that `Param::range` of a weight is also where its
//! gradient is, and an optimizer walks one flat buffer.

use super::config::{Activation, AttnKind, LnPlacement, ModelConfig, Residual};
use super::forward::{activate, check_ids, Model};
use super::weights::{LayerWeights, Norm};
use super::{DType, Param};
use crate::error::{EngineError, Result};
use crate::kernels::attention::{
    attend_into, attention_backward, AttnInputs, AttnOptions, AttnShape,
};
use crate::kernels::elementwise::gelu_new_grad;
use crate::kernels::layernorm::{layernorm_backward, layernorm_into};
use crate::kernels::linear::{self, bias_backward, linear_backward, linear_into};
use crate::kernels::matmul::Accumulate;
use crate::kernels::rotary::RotaryTable;
use crate::parallel::{self, Cancel};
use crate::tensor;
use std::borrow::Cow;

/// B sequences of T tokens with their next-token targets, row-major [B, T].
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    pub tokens: &'a [u32],
    pub targets: &'a [u32],
    pub sequences: usize,
    pub len: usize,
}

impl Batch<'_> {
    fn rows(&self) -> usize {
        self.sequences * self.len
    }

    pub(crate) fn check(&self, cfg: &ModelConfig) -> Result<()> {
        let n = self.rows();
        if n == 0 {
            return Err(EngineError::invalid("a batch needs at least one token"));
        }
        if self.tokens.len() != n || self.targets.len() != n {
            return Err(EngineError::invalid(format!(
                "a batch of {} × {} needs {n} tokens and targets, got {} and {}",
                self.sequences,
                self.len,
                self.tokens.len(),
                self.targets.len()
            )));
        }
        if self.len > cfg.n_positions {
            return Err(EngineError::invalid(format!(
                "sequences of {} tokens exceed the model's context of {}",
                self.len, cfg.n_positions
            )));
        }
        check_ids(self.tokens, cfg.vocab, "token")?;
        check_ids(self.targets, cfg.vocab, "target")
    }
}

/// What one layer's backward needs from its forward.
struct LayerActs {
    /// Residual stream entering the layer [N, d].
    x_in: Vec<f32>,
    /// Attention sub-layer input: LayerNorm(x_in) with pre-LN (x_in itself with post-LN) [N, d].
    h1: Option<Vec<f32>>,
    /// q|k|v [N, 3·d_attn], q and k after the rotary embedding.
    qkv: Vec<f32>,
    /// Attention output [N, d_attn] and its log-sum-exp, per sequence [H, T].
    attn: Vec<f32>,
    lse: Vec<Vec<f32>>,
    /// Residual stream after the attention sub-layer, before its post-LN [N, d].
    s1: Vec<f32>,
    /// Stream entering the MLP sub-layer (after post-LN) [N, d]; with pre-LN it equals s1.
    x_mid: Option<Vec<f32>>,
    /// MLP input: LayerNorm(x_mid) with pre-LN; with a parallel residual LN2(x_in), or
    /// LN1(x_in) again without an LN2 [N, d].
    h2: Option<Vec<f32>>,
    /// MLP hidden before and after the activation [N, d_ff].
    f_pre: Vec<f32>,
    f_act: Vec<f32>,
    /// Residual stream after the MLP sub-layer, before its post-LN [N, d] (post-LN only).
    s2: Option<Vec<f32>>,
}

impl LayerActs {
    fn x_mid(&self) -> &[f32] {
        self.x_mid.as_deref().unwrap_or(&self.s1)
    }
    fn h1(&self) -> &[f32] {
        self.h1.as_deref().unwrap_or(&self.x_in)
    }
    fn h2(&self) -> &[f32] {
        self.h2.as_deref().unwrap_or(self.x_mid())
    }
}

/// How a training pass runs beyond the plain loss and gradient.
#[derive(Clone, Copy, Debug, Default)]
pub struct TrainOptions {
    /// Dropout probability on the embeddings and on each sub-layer's output before it joins
    /// the residual stream (GPT-2's embd_pdrop and resid_pdrop); 0 = off.
    pub dropout_p: f32,
    /// Seed of the dropout masks. A mask element is a pure function of (seed, site, row,
    /// column), so a recomputed layer sees the same mask and the result does not depend on
    /// the thread count.
    pub dropout_seed: u64,
    /// Row of this batch's first sequence within the whole step's batch, so that the
    /// micro-batches of an accumulated step get the masks the whole batch would.
    pub first_row: usize,
    /// Keep only each layer's input during the forward and recompute the rest during the
    /// backward: activation memory of one layer instead of all, for about a third more work.
    pub recompute: bool,
    /// Multiplies the loss's gradient (not the returned loss): a micro-batch holding a
    /// fraction f of the step's tokens uses f, so the accumulated gradient is the whole
    /// batch's. 0 is taken as 1.
    pub grad_scale: f32,
    /// Precision of the linear layers' operands (mixed precision, as `torch.autocast`): with
    /// a half dtype each product's input and, in the backward, its incoming gradient are
    /// rounded to it, while products accumulate, and LayerNorm, softmax, the activations and
    /// the loss compute, in float32. The weights' rounded copy is the trainer's. With float16
    /// a gradient beyond its range becomes infinite, which loss scaling detects.
    pub operands: DType,
}

/// What the backward gets back from a layer's forward.
enum Saved {
    All(LayerActs),
    /// The layer's input only (recomputation).
    Input(Vec<f32>),
}

impl Model {
    /// Mean cross-entropy of `batch` (eval mode, no dropout) and, with `grads` (the packed
    /// layout, `packed_len` values), the gradient of that loss added into it.
    pub fn loss_and_grads(
        &self,
        batch: Batch,
        mut grads: Option<&mut [f32]>,
        cancel: Cancel,
    ) -> Result<f32> {
        let loss = self.train_pass(
            batch,
            grads.as_deref_mut(),
            &TrainOptions::default(),
            cancel,
        )?;
        if let Some(g) = grads {
            tensor::check_result(g, "gradient")?;
        }
        Ok(loss)
    }

    /// `loss_and_grads` in training mode: dropout, recomputation and gradient scaling as
    /// `opts` says. The returned loss is the batch's mean cross-entropy with dropout applied.
    /// The gradient is not checked for overflow here: the trainer's gradient norm is
    /// non-finite exactly when a gradient is, so one pass over it does both.
    pub fn train_pass(
        &self,
        batch: Batch,
        grads: Option<&mut [f32]>,
        opts: &TrainOptions,
        cancel: Cancel,
    ) -> Result<f32> {
        let cfg = &self.config;
        batch.check(cfg)?;
        let dtype = self.weights.storage().dtype();
        if dtype != crate::model::DType::Float32 {
            return Err(EngineError::NotReady(format!(
                "gradients need the float32 weights; this copy of the model holds its matrices \
                 in {}",
                dtype.name()
            )));
        }
        if !(0.0..1.0).contains(&opts.dropout_p) {
            return Err(EngineError::invalid(format!(
                "dropout_p must be in [0, 1), got {}",
                opts.dropout_p
            )));
        }
        let pass = Pass {
            dropout: Dropout::new(opts),
            operands: opts.operands,
        };
        let dropout = &pass.dropout;
        if let Some(g) = grads.as_deref() {
            if g.len() != self.weights.storage().len() {
                return Err(EngineError::Internal(
                    "gradient buffer of the wrong size".into(),
                ));
            }
        }
        let n = batch.rows();
        let (d, e) = (cfg.d_model, cfg.d_embed());
        let tok = self.token_rows(batch.tokens)?;
        let mut x = self.embed_rows(&tok, |r| r % batch.len, cancel)?;
        dropout.apply(&mut x, d, EMBEDDING_SITE);
        let mut saved = Vec::with_capacity(cfg.n_layer);
        for (i, layer) in self.weights.layers.iter().enumerate() {
            cancel.check()?;
            let (layer_acts, out) = self.layer_forward(i, layer, x, batch, &pass, cancel)?;
            // Without a gradient to compute nothing needs keeping.
            if grads.is_some() {
                saved.push(if opts.recompute {
                    Saved::Input(layer_acts.x_in)
                } else {
                    Saved::All(layer_acts)
                });
            }
            x = out;
        }
        // Head: final LayerNorm (pre-LN), projection (OPT-350m), output layer.
        let w = &self.weights;
        let hf = match &w.ln_f {
            Some(nrm) => Some(norm(&x, nrm, cfg.ln_eps)?),
            None => None,
        };
        let hf_d = hf.as_deref().unwrap_or(&x);
        let he = match &w.project_out {
            Some(p) => {
                let mut he = tensor::alloc_zeroed(n * e)?;
                let dims = (n, d, e);
                pass.linear_into(&mut he, hf_d, p, None, dims, Accumulate::Overwrite, cancel)?;
                Some(he)
            }
            None => None,
        };
        let h_out = he.as_deref().unwrap_or(hf_d);
        let table = w.lm_head.as_ref().unwrap_or(&w.wte);
        let head_bias = w.lm_head_bias.as_ref().map(|b| &b[..cfg.vocab]);
        let mut logits = tensor::alloc_zeroed(tensor::numel(&[n, cfg.vocab], "logits")?)?;
        pass.linear_into(
            &mut logits,
            h_out,
            &table[..cfg.vocab * e],
            head_bias,
            (n, e, cfg.vocab),
            Accumulate::Overwrite,
            cancel,
        )?;
        // Loss; with gradients, the logits become dL/dlogits in place.
        let grad_scale = if opts.grad_scale == 0.0 {
            1.0
        } else {
            opts.grad_scale
        };
        let loss = cross_entropy_rows(
            &mut logits,
            batch.targets,
            cfg.vocab,
            grads.is_some().then_some(grad_scale),
        )?;
        let Some(grads) = grads else {
            return Ok(loss);
        };

        // Output layer: table [vocab, e] (wte when tied; padding rows get no gradient).
        let rows = range(table).start..range(table).start + cfg.vocab * e;
        let mut dh = tensor::alloc_zeroed(n * e)?;
        // The logits' gradient is the head's dy operand: rounded in place, not copied.
        pass.operands.round_slice(&mut logits);
        pass.linear_backward(
            Some(&mut dh),
            &mut grads[rows],
            h_out,
            &table[..cfg.vocab * e],
            &logits,
            (n, e, cfg.vocab),
        );
        if let Some(b) = &w.lm_head_bias {
            let at = range(b).start;
            bias_backward(&mut grads[at..at + cfg.vocab], &logits, cfg.vocab);
        }
        drop(logits);
        if let Some(p) = &w.project_out {
            let mut dhd = tensor::alloc_zeroed(n * d)?;
            pass.linear_grads(grads, p, None, Some(&mut dhd), hf_d, &dh, (n, d, e));
            dh = dhd;
        }
        let mut dx = match &w.ln_f {
            Some(nrm) => norm_backward(grads, &x, &dh, nrm, cfg.ln_eps)?,
            None => dh,
        };
        drop(x);

        for (i, layer) in self.weights.layers.iter().enumerate().rev() {
            cancel.check()?;
            let a = match saved.pop().expect("one activation set per layer") {
                Saved::All(a) => a,
                Saved::Input(x_in) => self.layer_forward(i, layer, x_in, batch, &pass, cancel)?.0,
            };
            dx = self.layer_backward(i, layer, &a, dx, batch, &pass, grads, cancel)?;
        }
        dropout.apply(&mut dx, d, EMBEDDING_SITE);

        // Embeddings: positions (a learned table), then (through project_in) tokens.
        if let Some(wpe) = &w.wpe {
            let wpe_at = range(wpe).start;
            for (r, row) in dx.chunks_exact(d).enumerate() {
                let pos = r % batch.len + cfg.position_offset;
                let g = &mut grads[wpe_at + pos * d..wpe_at + (pos + 1) * d];
                g.iter_mut().zip(row).for_each(|(g, v)| *g += v);
            }
        }
        let dtok = match &w.project_in {
            Some(p) => {
                let mut dt = tensor::alloc_zeroed(n * e)?;
                // The projection of the token embeddings runs in float32 in the forward
                // (`embed_rows`, shared with inference), so its backward does too.
                linear_backward(Some(&mut dt), &mut grads[range(p)], &tok, p, &dx, (n, e, d));
                dt
            }
            None => dx,
        };
        let wte_at = range(&w.wte).start;
        for (&id, row) in batch.tokens.iter().zip(dtok.chunks_exact(e)) {
            let at = wte_at + id as usize * e;
            let g = &mut grads[at..at + e];
            g.iter_mut().zip(row).for_each(|(g, v)| *g += v);
        }
        Ok(loss)
    }

    fn attn_options(&self, layer: usize) -> AttnOptions {
        AttnOptions {
            window: match self.config.layer_kind(layer) {
                AttnKind::Dense => None,
                AttnKind::Local => self.config.local_window,
            },
            scale: self.config.scale_attn,
        }
    }

    /// Turns q and k of every row of qkv [N, 3·d_attn] by the row's position in its
    /// sequence of `t`; `sign` −1 turns back (the rotation's gradient is its inverse).
    fn rotate_qk(&self, qkv: &mut [f32], t: usize, sign: f32) {
        let cfg = &self.config;
        if let Some(r) = &cfg.rotary {
            let positions: Vec<usize> =
                (0..qkv.len() / (3 * cfg.d_attn())).map(|r| r % t).collect();
            RotaryTable::new(r).rotate_qk(qkv, cfg, &positions, sign);
        }
    }

    fn shape(&self, t: usize) -> AttnShape {
        AttnShape {
            t,
            n_head: self.config.n_head,
            d_head: self.config.d_head,
        }
    }

    /// One layer of the training forward: its saved activations and its output stream.
    fn layer_forward(
        &self,
        i: usize,
        layer: &LayerWeights,
        x_in: Vec<f32>,
        batch: Batch,
        pass: &Pass,
        cancel: Cancel,
    ) -> Result<(LayerActs, Vec<f32>)> {
        let dropout = &pass.dropout;
        let cfg = &self.config;
        let (n, d, da, ff, t) = (batch.rows(), cfg.d_model, cfg.d_attn(), cfg.d_ff, batch.len);
        let pre = cfg.ln_placement == LnPlacement::Pre;
        let h1 = if pre {
            Some(norm(&x_in, &layer.ln_1, cfg.ln_eps)?)
        } else {
            None
        };
        let mut qkv = tensor::alloc_zeroed(n * 3 * da)?;
        let input = h1.as_deref().unwrap_or(&x_in);
        pass.linear_into(
            &mut qkv,
            input,
            &layer.w_qkv,
            Some(&layer.b_qkv),
            (n, d, 3 * da),
            Accumulate::Overwrite,
            cancel,
        )?;
        self.rotate_qk(&mut qkv, t, 1.0);
        let mut attn = tensor::alloc_zeroed(n * da)?;
        let mut lse = Vec::with_capacity(batch.sequences);
        for (q, o) in qkv
            .chunks_exact(t * 3 * da)
            .zip(attn.chunks_exact_mut(t * da))
        {
            let inputs = AttnInputs::fused(q, self.shape(t));
            lse.push(attend_into(
                o,
                inputs,
                cfg.n_head,
                cfg.d_head,
                self.attn_options(i),
                cancel,
            )?);
        }
        let s1 = residual_branch(&x_in, d, dropout, attn_site(i), |out, acc| {
            pass.linear_into(
                out,
                &attn,
                &layer.w_o,
                Some(&layer.b_o),
                (n, da, d),
                acc,
                cancel,
            )
        })?;
        let x_mid = if pre {
            None
        } else {
            Some(norm(&s1, &layer.ln_1, cfg.ln_eps)?)
        };
        // The MLP's stream: after attention (sequential), or the layer's input (parallel).
        let mid = match cfg.residual {
            Residual::Sequential => x_mid.as_deref().unwrap_or(&s1),
            _ => &x_in,
        };
        let h2 = match (&layer.ln_2, pre) {
            (Some(ln_2), true) => Some(norm(mid, ln_2, cfg.ln_eps)?),
            (Some(_), false) => None,
            (None, _) => h1.clone(),
        };
        let mut f_pre = tensor::alloc_zeroed(n * ff)?;
        let input = h2.as_deref().unwrap_or(mid);
        pass.linear_into(
            &mut f_pre,
            input,
            &layer.w_fc,
            Some(&layer.b_fc),
            (n, d, ff),
            Accumulate::Overwrite,
            cancel,
        )?;
        let mut f_act = f_pre.clone();
        activate(&mut f_act, cfg.activation);
        let base = match cfg.residual {
            Residual::Sequential => mid,
            _ => &s1,
        };
        let s2 = residual_branch(base, d, dropout, mlp_site(i), |out, acc| {
            pass.linear_into(
                out,
                &f_act,
                &layer.w_proj,
                Some(&layer.b_proj),
                (n, ff, d),
                acc,
                cancel,
            )
        })?;
        let (out, s2) = if pre {
            (s2, None)
        } else {
            (norm(&s2, ln_2(layer)?, cfg.ln_eps)?, Some(s2))
        };
        let acts = LayerActs {
            x_in,
            h1,
            qkv,
            attn,
            lse,
            s1,
            x_mid,
            h2,
            f_pre,
            f_act,
            s2,
        };
        Ok((acts, out))
    }

    /// One layer's backward: dL/d(output stream) in, dL/d(input stream) out; parameter
    /// gradients are added into `grads`.
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        i: usize,
        layer: &LayerWeights,
        a: &LayerActs,
        d_out: Vec<f32>,
        batch: Batch,
        pass: &Pass,
        grads: &mut [f32],
        cancel: Cancel,
    ) -> Result<Vec<f32>> {
        let dropout = &pass.dropout;
        let cfg = &self.config;
        let (n, d, da, ff, t) = (batch.rows(), cfg.d_model, cfg.d_attn(), cfg.d_ff, batch.len);
        let pre = cfg.ln_placement == LnPlacement::Pre;
        // MLP sub-layer: out = s2 (pre-LN) or LN2(s2) (post-LN), s2 = x_mid + mlp(h2).
        let ds2 = match &a.s2 {
            None => d_out,
            Some(s2) => norm_backward(grads, s2, &d_out, ln_2(layer)?, cfg.ln_eps)?,
        };
        let mut df = tensor::alloc_zeroed(n * ff)?;
        let dbranch = dropout.masked(&ds2, d, mlp_site(i));
        pass.linear_grads(
            grads,
            &layer.w_proj,
            Some(&layer.b_proj),
            Some(&mut df),
            &a.f_act,
            dbranch.as_deref().unwrap_or(&ds2),
            (n, ff, d),
        );
        drop(dbranch);
        scale_by_activation_grad(&mut df, &a.f_pre, cfg.activation);
        let mut dh2 = tensor::alloc_zeroed(n * d)?;
        pass.linear_grads(
            grads,
            &layer.w_fc,
            Some(&layer.b_fc),
            Some(&mut dh2),
            a.h2(),
            &df,
            (n, d, ff),
        );
        drop(df);
        // dL/dx_mid: the residual path plus, with a sequential residual, the MLP input's
        // path (through LN2 with pre-LN). With a parallel one the MLP input's path leads to
        // x_in: through LN2 (`d_in_mlp`), or into LN1's output gradient without an LN2.
        let mut dmid = ds2;
        let (mut d_in_mlp, mut dh1_mlp) = (None, None);
        match (cfg.residual, &layer.ln_2) {
            (Residual::Sequential, _) => {
                let through = if pre {
                    norm_backward(grads, a.x_mid(), &dh2, ln_2(layer)?, cfg.ln_eps)?
                } else {
                    dh2
                };
                add_into(&mut dmid, &through);
            }
            (_, Some(ln_2)) => {
                d_in_mlp = Some(norm_backward(grads, &a.x_in, &dh2, ln_2, cfg.ln_eps)?)
            }
            (_, None) => dh1_mlp = Some(dh2),
        }
        cancel.check()?;

        // Attention sub-layer: x_mid = s1 (pre-LN) or LN1(s1), s1 = x_in + attn(h1)·W_oᵀ + b_o.
        let ds1 = if pre {
            dmid
        } else {
            norm_backward(grads, &a.s1, &dmid, &layer.ln_1, cfg.ln_eps)?
        };
        let mut dattn = tensor::alloc_zeroed(n * da)?;
        let dbranch = dropout.masked(&ds1, d, attn_site(i));
        pass.linear_grads(
            grads,
            &layer.w_o,
            cfg.out_proj_bias.then_some(&layer.b_o),
            Some(&mut dattn),
            &a.attn,
            dbranch.as_deref().unwrap_or(&ds1),
            (n, da, d),
        );
        drop(dbranch);
        let mut dqkv = Vec::with_capacity(n * 3 * da);
        for (b, (q, o)) in a
            .qkv
            .chunks_exact(t * 3 * da)
            .zip(a.attn.chunks_exact(t * da))
            .enumerate()
        {
            let dout = &dattn[b * t * da..(b + 1) * t * da];
            dqkv.extend(attention_backward(
                q,
                o,
                &a.lse[b],
                dout,
                self.shape(t),
                self.attn_options(i),
                cancel,
            )?);
        }
        drop(dattn);
        self.rotate_qk(&mut dqkv, t, -1.0);
        // Models without q/k/v biases keep a zero slot there: it gets no gradient.
        let b_qkv = cfg.qkv_bias.then_some(&layer.b_qkv);
        let mut dh1 = tensor::alloc_zeroed(n * d)?;
        pass.linear_grads(
            grads,
            &layer.w_qkv,
            b_qkv,
            Some(&mut dh1),
            a.h1(),
            &dqkv,
            (n, d, 3 * da),
        );
        drop(dqkv);
        if let Some(g) = dh1_mlp {
            add_into(&mut dh1, &g);
        }
        let mut dx = ds1;
        let through = if pre {
            norm_backward(grads, &a.x_in, &dh1, &layer.ln_1, cfg.ln_eps)?
        } else {
            dh1
        };
        add_into(&mut dx, &through);
        if let Some(g) = d_in_mlp {
            add_into(&mut dx, &g);
        }
        Ok(dx)
    }
}

/// A layer's LN2, which a sequential residual always has (`ModelConfig::validate`).
fn ln_2(layer: &LayerWeights) -> Result<&Norm> {
    layer
        .ln_2
        .as_ref()
        .ok_or_else(|| EngineError::Internal("a sequential layer without LN2".into()))
}

/// Where a weight's gradient lives in the packed gradient buffer.
fn range(p: &Param) -> std::ops::Range<usize> {
    p.range()
}

/// What a training pass does besides the plain forward: dropout, and the precision of the
/// linear layers' operands.
struct Pass {
    dropout: Dropout,
    operands: DType,
}

impl Pass {
    /// Whether the products run on bfloat16 tiles (which round their operands themselves).
    fn tiles(&self) -> bool {
        self.operands == DType::Bfloat16 && linear::bf16_products_available()
    }

    /// y (+)= x · wᵀ + b with x and w as operands (w is the rounded copy already).
    #[allow(clippy::too_many_arguments)]
    fn linear_into(
        &self,
        y: &mut [f32],
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        dims: (usize, usize, usize),
        acc: Accumulate,
        cancel: Cancel,
    ) -> Result<()> {
        #[cfg(target_arch = "x86_64")]
        if self.tiles() {
            return linear::linear_bf16_into(y, x, w, b, dims, acc, cancel);
        }
        linear_into(y, &self.operand(x), w, b, dims, acc, cancel)
    }

    /// `linear_backward` with x and w as operands; dy is one already (`operand`).
    fn linear_backward(
        &self,
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        dims: (usize, usize, usize),
    ) {
        #[cfg(target_arch = "x86_64")]
        if self.tiles() {
            return linear::linear_backward_bf16(dx, dw, x, w, dy, dims);
        }
        linear_backward(dx, dw, &self.operand(x), w, dy, dims);
    }

    /// `x` as a linear layer's operand: itself in float32, else a copy rounded to the
    /// operands' precision.
    fn operand<'a>(&self, x: &'a [f32]) -> Cow<'a, [f32]> {
        match self.operands {
            DType::Float32 => Cow::Borrowed(x),
            dtype => {
                let mut rounded = x.to_vec();
                dtype.round_slice(&mut rounded);
                Cow::Owned(rounded)
            }
        }
    }

    /// Backward of y = x · wᵀ (+ b): the gradients of `w` (and `b`) added into `grads`, and
    /// dx when asked; x (as the forward saw it) and dy are operands.
    #[allow(clippy::too_many_arguments)]
    fn linear_grads(
        &self,
        grads: &mut [f32],
        w: &Param,
        b: Option<&Param>,
        dx: Option<&mut [f32]>,
        x: &[f32],
        dy: &[f32],
        dims: (usize, usize, usize),
    ) {
        let dy = self.operand(dy);
        self.linear_backward(dx, &mut grads[range(w)], x, w, &dy, dims);
        if let Some(b) = b {
            bias_backward(&mut grads[range(b)], &dy, dims.2);
        }
    }
}

fn norm(x: &[f32], n: &Norm, eps: f32) -> Result<Vec<f32>> {
    let mut y = tensor::alloc_zeroed(x.len())?;
    layernorm_into(&mut y, x, &n.weight, &n.bias, eps)?;
    Ok(y)
}

/// LayerNorm backward: adds dgamma and dbeta into `grads`, returns dx.
fn norm_backward(grads: &mut [f32], x: &[f32], dy: &[f32], n: &Norm, eps: f32) -> Result<Vec<f32>> {
    let g = layernorm_backward(x, dy, &n.weight, eps)?;
    add_into(&mut grads[range(&n.weight)], &g.dgamma);
    add_into(&mut grads[range(&n.bias)], &g.dbeta);
    Ok(g.dx)
}

fn add_into(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
}

/// g ← g · act′(x), elementwise on the compute pool.
fn scale_by_activation_grad(g: &mut [f32], x: &[f32], act: Activation) {
    use rayon::prelude::*;
    const BLOCK: usize = 16 * 1024;
    let scale = |g: &mut [f32], x: &[f32]| match act {
        Activation::GeluNew => crate::simd::mul_gelu_new_grad(g, x),
        _ => g
            .iter_mut()
            .zip(x)
            .for_each(|(g, &v)| *g *= activation_grad(act, v)),
    };
    parallel::install(|| {
        g.par_chunks_mut(BLOCK)
            .zip(x.par_chunks(BLOCK))
            .for_each(|(g, x)| scale(g, x))
    });
}

fn activation_grad(act: Activation, x: f32) -> f32 {
    match act {
        Activation::GeluNew => gelu_new_grad(x as f64) as f32,
        Activation::Gelu => {
            let x = x as f64;
            let cdf = 0.5 * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            (cdf + x * pdf) as f32
        }
        Activation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
    }
}

const EMBEDDING_SITE: u64 = 0;

fn attn_site(layer: usize) -> u64 {
    1 + 2 * layer as u64
}

fn mlp_site(layer: usize) -> u64 {
    2 + 2 * layer as u64
}

/// Inverted dropout with masks that are a pure function of (seed, site, row, column): the
/// backward applies the very mask the forward did without storing it.
struct Dropout {
    p: f32,
    seed: u64,
    first_row: usize,
}

impl Dropout {
    fn new(opts: &TrainOptions) -> Self {
        Self {
            p: opts.dropout_p,
            seed: opts.dropout_seed,
            first_row: opts.first_row,
        }
    }

    fn active(&self) -> bool {
        self.p > 0.0
    }

    /// Zeroes the dropped elements of `x` ([rows, width]) and scales the kept ones by 1/(1−p).
    fn apply(&self, x: &mut [f32], width: usize, site: u64) {
        if !self.active() {
            return;
        }
        // Keep when the hash's top 32 bits are at or above p·2³².
        let threshold = (self.p as f64 * 4294967296.0) as u64;
        let scale = (1.0 / (1.0 - self.p as f64)) as f32;
        let site_key = splitmix64(self.seed ^ splitmix64(site));
        let first = self.first_row;
        parallel::for_rows(x, width, |row0, block| {
            for (r, row) in block.chunks_exact_mut(width).enumerate() {
                let base = ((first + row0 + r) * width) as u64;
                for (c, v) in row.iter_mut().enumerate() {
                    let keep = splitmix64(site_key ^ (base + c as u64)) >> 32 >= threshold;
                    *v = if keep { *v * scale } else { 0.0 };
                }
            }
        });
    }

    /// `g` with the mask applied, or None when dropout is off (use `g` itself).
    fn masked(&self, g: &[f32], width: usize, site: u64) -> Option<Vec<f32>> {
        self.active().then(|| {
            let mut out = g.to_vec();
            self.apply(&mut out, width, site);
            out
        })
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `residual + dropout(branch)`, where `branch` writes (or adds) the sub-layer's output into
/// its buffer: without dropout it adds straight into a copy of the residual.
fn residual_branch(
    residual: &[f32],
    width: usize,
    dropout: &Dropout,
    site: u64,
    branch: impl FnOnce(&mut [f32], Accumulate) -> Result<()>,
) -> Result<Vec<f32>> {
    let mut out = residual.to_vec();
    if !dropout.active() {
        branch(&mut out, Accumulate::Add)?;
        return Ok(out);
    }
    let mut b = tensor::alloc_zeroed(residual.len())?;
    branch(&mut b, Accumulate::Overwrite)?;
    dropout.apply(&mut b, width, site);
    add_into(&mut out, &b);
    Ok(out)
}

/// Mean cross-entropy of each row's target; with `grad_scale`, each row becomes
/// grad_scale·(softmax − onehot)/rows, the (scaled) gradient of the mean. Rows run on the
/// compute pool; the mean is summed in row order, so it does not depend on the thread count.
fn cross_entropy_rows(
    logits: &mut [f32],
    targets: &[u32],
    vocab: usize,
    grad_scale: Option<f32>,
) -> Result<f32> {
    use rayon::prelude::*;
    let rows = targets.len();
    let scale = grad_scale.map(|s| s as f64 / rows as f64);
    let per_row: Vec<f64> = parallel::install(|| {
        logits
            .par_chunks_mut(vocab)
            .zip(targets.par_iter())
            .map(|(row, &target)| {
                // Shifted by the row's max: every e^{v − max} ≤ 1 and the sum cannot overflow.
                let max = crate::simd::max(row);
                let target_logit = row[target as usize] as f64;
                let sum = crate::simd::exp_shifted_inplace(row, max);
                let loss = max as f64 + sum.ln() - target_logit;
                if let Some(scale) = scale {
                    // softmax − onehot, times the gradient scale: the row now holds e^{v − max}.
                    let k = (scale / sum) as f32;
                    row.iter_mut().for_each(|p| *p *= k);
                    row[target as usize] -= scale as f32;
                }
                loss
            })
            .collect()
    });
    let loss = (per_row.iter().sum::<f64>() / rows as f64) as f32;
    if !loss.is_finite() {
        return Err(EngineError::OutOfRange(format!(
            "the loss {loss} is not finite"
        )));
    }
    Ok(loss)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::kernels::gradcheck::{assert_grad_matches, assert_grad_matches_piecewise};
    use crate::model::config::{tiny_gpt3, tiny_gptj, tiny_neox, Rotary, RotaryPairing};
    use crate::model::weights::{packed_len, packing};
    use crate::model::{ModelWeights, Storage};
    use crate::parallel::Cancel;

    /// Every architecture knob the forward supports, on tiny shapes.
    fn families() -> Vec<(&'static str, ModelConfig)> {
        let gpt3 = tiny_gpt3();
        vec![
            ("gpt3 dense + local", gpt3.clone()),
            (
                "gpt2",
                ModelConfig {
                    attention_pattern: vec![AttnKind::Dense],
                    local_window: None,
                    ..gpt3.clone()
                },
            ),
            (
                "cerebras (exact gelu), untied, padded vocabulary",
                ModelConfig {
                    activation: Activation::Gelu,
                    tied_head: false,
                    padded_vocab: Some(14),
                    ..gpt3.clone()
                },
            ),
            (
                "opt pre-LN",
                ModelConfig {
                    activation: Activation::Relu,
                    position_offset: 2,
                    attention_pattern: vec![AttnKind::Dense],
                    local_window: None,
                    ..gpt3.clone()
                },
            ),
            (
                "opt post-LN, projected embeddings",
                ModelConfig {
                    activation: Activation::Relu,
                    position_offset: 2,
                    attention_pattern: vec![AttnKind::Dense],
                    local_window: None,
                    ln_placement: LnPlacement::Post,
                    d_embed: Some(6),
                    ..gpt3.clone()
                },
            ),
            (
                "gpt-neo",
                ModelConfig {
                    scale_attn: false,
                    qkv_bias: false,
                    ..gpt3
                },
            ),
            ("gpt-neox: partial rotary, parallel residual", tiny_neox()),
            (
                "gpt-neox: full rotary, sequential residual",
                ModelConfig {
                    rotary: Some(Rotary {
                        dims: 4,
                        base: 50.0,
                        pairing: RotaryPairing::Halves,
                    }),
                    residual: Residual::Sequential,
                    ..tiny_neox()
                },
            ),
            (
                "gpt-j: interleaved rotary, one LayerNorm, head bias",
                tiny_gptj(),
            ),
        ]
    }

    /// Weights from a fixed pseudo-random uniform(-0.5, 0.5): large enough that every
    /// non-linearity matters; zero in the q/k/v bias slot of models without one.
    fn packed(cfg: &ModelConfig, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut out = Vec::with_capacity(packed_len(cfg).unwrap());
        for slot in packing(cfg) {
            let n: usize = slot.shape.iter().product();
            for _ in 0..n {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                out.push(if slot.name.is_some() { u } else { 0.0 });
            }
        }
        out
    }

    fn model(cfg: &ModelConfig, values: Vec<f32>) -> Model {
        let weights = ModelWeights::from_storage(cfg, Arc::new(Storage::Owned(values))).unwrap();
        Model::new(cfg.clone(), weights).unwrap()
    }

    const TOKENS: [u32; 10] = [1, 4, 9, 2, 0, 7, 7, 3, 10, 5];
    const TARGETS: [u32; 10] = [4, 9, 2, 0, 6, 7, 3, 10, 5, 1];

    fn batch() -> Batch<'static> {
        Batch {
            tokens: &TOKENS,
            targets: &TARGETS,
            sequences: 2,
            len: 5,
        }
    }

    /// Every third parameter (every tensor has several), starting at a different offset per
    /// family, to keep the test quick.
    #[test]
    fn gradients_match_finite_differences_for_every_family() {
        for (k, (family, cfg)) in families().into_iter().enumerate() {
            let values = packed(&cfg, 7);
            let m = model(&cfg, values.clone());
            let mut grads = vec![0.0; values.len()];
            m.loss_and_grads(batch(), Some(&mut grads), Cancel::NEVER)
                .unwrap();
            // Only real parameters: the zero q/k/v bias slot of bias-free models is not one.
            let mut at = 0;
            let mut params = Vec::new();
            for slot in packing(&cfg) {
                let n: usize = slot.shape.iter().product();
                if slot.name.is_some() {
                    params.extend((at..at + n).filter(|i| (i + k) % 3 == 0));
                } else {
                    assert!(grads[at..at + n].iter().all(|g| *g == 0.0), "{family}");
                }
                at += n;
            }
            let x: Vec<f32> = params.iter().map(|&i| values[i]).collect();
            let analytic: Vec<f32> = params.iter().map(|&i| grads[i]).collect();
            let loss_at = |probe: &[f32]| {
                let mut v = values.clone();
                params.iter().zip(probe).for_each(|(&i, &p)| v[i] = p);
                model(&cfg, v)
                    .loss_and_grads(batch(), None, Cancel::NEVER)
                    .unwrap() as f64
            };
            println!("{family}: {} parameters checked", params.len());
            if cfg.activation == Activation::Relu {
                assert_grad_matches_piecewise(&x, &analytic, loss_at);
            } else {
                assert_grad_matches(&x, &analytic, loss_at);
            }
        }
    }

    /// Dropout masks are fixed by their seed, so the training loss is a smooth function of
    /// the weights and its gradient can be checked the same way (recomputation on).
    #[test]
    fn gradients_with_dropout_match_finite_differences() {
        let cfg = tiny_gpt3();
        let values = packed(&cfg, 11);
        let opts = TrainOptions {
            dropout_p: 0.25,
            dropout_seed: 42,
            recompute: true,
            ..TrainOptions::default()
        };
        let mut grads = vec![0.0; values.len()];
        model(&cfg, values.clone())
            .train_pass(batch(), Some(&mut grads), &opts, Cancel::NEVER)
            .unwrap();
        let params: Vec<usize> = (0..values.len()).step_by(5).collect();
        let x: Vec<f32> = params.iter().map(|&i| values[i]).collect();
        let analytic: Vec<f32> = params.iter().map(|&i| grads[i]).collect();
        let loss_at = |probe: &[f32]| {
            let mut v = values.clone();
            params.iter().zip(probe).for_each(|(&i, &p)| v[i] = p);
            model(&cfg, v)
                .train_pass(batch(), None, &opts, Cancel::NEVER)
                .unwrap() as f64
        };
        assert_grad_matches(&x, &analytic, loss_at);
    }

    /// The training forward computes the same loss as the inference forward's logits.
    #[test]
    fn loss_equals_cross_entropy_of_the_logits() {
        for (family, cfg) in families() {
            let m = model(&cfg, packed(&cfg, 3));
            let loss = m.loss_and_grads(batch(), None, Cancel::NEVER).unwrap() as f64;
            let mut total = 0.0f64;
            for (tokens, targets) in TOKENS.chunks(5).zip(TARGETS.chunks(5)) {
                let logits = m.logits(tokens, Cancel::NEVER).unwrap();
                for (row, &t) in logits.chunks(cfg.vocab).zip(targets) {
                    let max = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
                    let lse = max
                        + row
                            .iter()
                            .map(|&v| (v as f64 - max).exp())
                            .sum::<f64>()
                            .ln();
                    total += lse - row[t as usize] as f64;
                }
            }
            let expected = total / TOKENS.len() as f64;
            assert!(
                (loss - expected).abs() < 1e-5 * expected.abs().max(1.0),
                "{family}: {loss} vs {expected}"
            );
        }
    }

    #[test]
    fn bad_batches_are_refused() {
        let cfg = tiny_gpt3();
        let m = model(&cfg, packed(&cfg, 1));
        let err = |b: Batch| m.loss_and_grads(b, None, Cancel::NEVER).unwrap_err();
        let ragged = Batch {
            sequences: 3,
            ..batch()
        };
        assert!(matches!(err(ragged), EngineError::InvalidParameter(_)));
        let beyond = [11u32; 10];
        let outside = Batch {
            targets: &beyond,
            ..batch()
        };
        assert!(
            matches!(err(outside), EngineError::InvalidParameter(m) if m.contains("target id 11"))
        );
        let long = [1u32; 17];
        let too_long = Batch {
            tokens: &long,
            targets: &long,
            sequences: 1,
            len: 17,
        };
        assert!(matches!(err(too_long), EngineError::InvalidParameter(m) if m.contains("context")));
    }
}
