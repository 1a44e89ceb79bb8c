//! Model architecture: one explicit knob per choice, so that GPT-3 and its imported relatives
//! (GPT-2, Cerebras-GPT, OPT, GPT-Neo) run through one forward pass. Mirrors the columns of
//! `llm_model_config`.

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// GPT-2's tanh approximation.
    GeluNew,
    /// Exact erf GELU (Cerebras-GPT).
    Gelu,
    /// OPT.
    Relu,
}

impl Activation {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Self::GeluNew),
            "gelu" => Ok(Self::Gelu),
            "relu" => Ok(Self::Relu),
            other => Err(EngineError::invalid(format!(
                "unsupported activation \"{other}\" (gelu_new, gelu or relu)"
            ))),
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            Self::GeluNew => "gelu_new",
            Self::Gelu => "gelu",
            Self::Relu => "relu",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttnKind {
    Dense,
    Local,
}

impl AttnKind {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "dense" | "global" => Ok(Self::Dense),
            "local" => Ok(Self::Local),
            other => Err(EngineError::invalid(format!(
                "unknown attention kind \"{other}\" (dense or local)"
            ))),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LnPlacement {
    /// LayerNorm before each sub-layer, plus a final one (GPT-2/3, OPT ≥ 1.3B, GPT-Neo).
    Pre,
    /// LayerNorm after each residual addition, no final one (OPT-350m).
    Post,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub n_layer: usize,
    pub n_head: usize,
    pub d_model: usize,
    pub d_head: usize,
    pub d_ff: usize,
    pub n_positions: usize,
    pub vocab: usize,
    pub activation: Activation,
    /// Layer kinds, repeated over the layers.
    pub attention_pattern: Vec<AttnKind>,
    pub local_window: Option<usize>,
    pub scale_attn: bool,
    pub position_offset: usize,
    pub qkv_bias: bool,
    pub tied_head: bool,
    /// Rows of the embedding (≥ vocab); logits beyond `vocab` are dropped.
    pub padded_vocab: Option<usize>,
    pub ln_placement: LnPlacement,
    pub ln_eps: f32,
    /// Token embedding width when it differs from d_model (projected in and out).
    pub d_embed: Option<usize>,
}

/// Upper bounds that keep every derived size far from overflow.
const MAX_DIM: usize = 1 << 20;

impl ModelConfig {
    /// Checks internal consistency; every public constructor of a model calls it.
    pub fn validate(&self) -> Result<()> {
        let dims = [
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("d_model", self.d_model),
            ("d_head", self.d_head),
            ("d_ff", self.d_ff),
            ("n_positions", self.n_positions),
            ("vocab", self.vocab),
        ];
        for (name, v) in dims {
            if v == 0 || v > MAX_DIM {
                return Err(EngineError::invalid(format!(
                    "{name} must be in 1..={MAX_DIM}, got {v}"
                )));
            }
        }
        if self.attention_pattern.is_empty() {
            return Err(EngineError::invalid("attention_pattern must not be empty"));
        }
        if self.attention_pattern.contains(&AttnKind::Local)
            && !matches!(self.local_window, Some(w) if w > 0)
        {
            return Err(EngineError::invalid(
                "local attention layers need a positive local_window",
            ));
        }
        if let Some(p) = self.padded_vocab {
            if p < self.vocab {
                return Err(EngineError::invalid(format!(
                    "padded_vocab {p} is smaller than vocab {}",
                    self.vocab
                )));
            }
        }
        if !(self.ln_eps > 0.0 && self.ln_eps.is_finite()) {
            return Err(EngineError::invalid(format!(
                "ln_eps must be positive, got {}",
                self.ln_eps
            )));
        }
        if matches!(self.d_embed, Some(0)) {
            return Err(EngineError::invalid("d_embed must be positive"));
        }
        Ok(())
    }

    /// Width of the attention (n_head · d_head); usually d_model.
    pub fn d_attn(&self) -> usize {
        self.n_head * self.d_head
    }

    /// Width of the token embedding.
    pub fn d_embed(&self) -> usize {
        self.d_embed.unwrap_or(self.d_model)
    }

    /// Rows of the token embedding.
    pub fn embedding_rows(&self) -> usize {
        self.padded_vocab.unwrap_or(self.vocab)
    }

    /// Rows of the position embedding (OPT stores `position_offset` extra rows).
    pub fn position_rows(&self) -> usize {
        self.n_positions + self.position_offset
    }

    pub fn layer_kind(&self, layer: usize) -> AttnKind {
        self.attention_pattern[layer % self.attention_pattern.len()]
    }

    /// Canonical parameter names and shapes, in a stable order. Weights of linear layers are
    /// [out, in] (PyTorch `Linear`); biases and LayerNorm parameters are 1-D.
    pub fn param_specs(&self) -> Vec<(String, Vec<usize>)> {
        let (d, da, ff) = (self.d_model, self.d_attn(), self.d_ff);
        let mut v = vec![
            (
                "wte.weight".to_string(),
                vec![self.embedding_rows(), self.d_embed()],
            ),
            ("wpe.weight".to_string(), vec![self.position_rows(), d]),
        ];
        if self.d_embed.is_some() {
            v.push(("project_in.weight".into(), vec![d, self.d_embed()]));
        }
        for i in 0..self.n_layer {
            let p = |s: &str| format!("layers.{i}.{s}");
            v.push((p("ln_1.weight"), vec![d]));
            v.push((p("ln_1.bias"), vec![d]));
            for q in ["q_proj", "k_proj", "v_proj"] {
                v.push((p(&format!("attn.{q}.weight")), vec![da, d]));
                if self.qkv_bias {
                    v.push((p(&format!("attn.{q}.bias")), vec![da]));
                }
            }
            v.push((p("attn.out_proj.weight"), vec![d, da]));
            v.push((p("attn.out_proj.bias"), vec![d]));
            v.push((p("ln_2.weight"), vec![d]));
            v.push((p("ln_2.bias"), vec![d]));
            v.push((p("mlp.fc_in.weight"), vec![ff, d]));
            v.push((p("mlp.fc_in.bias"), vec![ff]));
            v.push((p("mlp.fc_out.weight"), vec![d, ff]));
            v.push((p("mlp.fc_out.bias"), vec![d]));
        }
        if self.ln_placement == LnPlacement::Pre {
            v.push(("ln_f.weight".into(), vec![d]));
            v.push(("ln_f.bias".into(), vec![d]));
        }
        if self.d_embed.is_some() {
            v.push(("project_out.weight".into(), vec![self.d_embed(), d]));
        }
        if !self.tied_head {
            v.push((
                "lm_head.weight".into(),
                vec![self.embedding_rows(), self.d_embed()],
            ));
        }
        v
    }

    /// Number of parameters (elements over all canonical tensors).
    pub fn param_count(&self) -> u64 {
        self.param_specs()
            .iter()
            .map(|(_, s)| s.iter().map(|&d| d as u64).product::<u64>())
            .sum()
    }
}

impl ModelConfig {
    /// The GPT-3 architecture at one size, as the registry seeds it: pre-LN, gelu_new, MLP
    /// width 4·d_model, 2048 positions, the 50257-token vocabulary, dense and locally banded
    /// (256) attention alternating.
    pub fn gpt3(n_layer: usize, d_model: usize, n_head: usize, d_head: usize) -> Self {
        ModelConfig {
            n_layer,
            n_head,
            d_model,
            d_head,
            d_ff: 4 * d_model,
            n_positions: 2048,
            vocab: 50257,
            activation: Activation::GeluNew,
            attention_pattern: vec![AttnKind::Dense, AttnKind::Local],
            local_window: Some(256),
            scale_attn: true,
            position_offset: 0,
            qkv_bias: true,
            tied_head: true,
            padded_vocab: None,
            ln_placement: LnPlacement::Pre,
            ln_eps: 1e-5,
            d_embed: None,
        }
    }
}

#[cfg(test)]
pub(crate) fn tiny_gpt3() -> ModelConfig {
    ModelConfig {
        n_positions: 16,
        vocab: 11,
        local_window: Some(3),
        ..ModelConfig::gpt3(2, 8, 2, 4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt3_small_has_125m_parameters() {
        let cfg = ModelConfig::gpt3(12, 768, 12, 64);
        cfg.validate().unwrap();
        // 124.4M weights + biases + LayerNorms (the paper rounds to 125M).
        let n = cfg.param_count();
        assert!((125_000_000..126_000_000).contains(&n), "{n}");
    }

    #[test]
    fn validation() {
        assert!(ModelConfig {
            local_window: None,
            ..tiny_gpt3()
        }
        .validate()
        .is_err());
        assert!(ModelConfig {
            n_head: 0,
            ..tiny_gpt3()
        }
        .validate()
        .is_err());
        assert!(ModelConfig {
            padded_vocab: Some(3),
            ..tiny_gpt3()
        }
        .validate()
        .is_err());
    }
}
