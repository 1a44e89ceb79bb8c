//! Model architecture: one explicit knob per choice, so that GPT-3 and its imported relatives
//! (GPT-2, Cerebras-GPT, OPT, GPT-Neo, Megatron, GPT-NeoX/Pythia, GPT-J) run through one
//! forward pass. Mirrors the columns of `llm_model_config`.

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

/// Which dimensions of a head a rotary embedding rotates together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RotaryPairing {
    /// Dimension j with j + dims/2 (GPT-NeoX's rotate_half).
    Halves,
    /// Dimension 2j with 2j + 1 (GPT-J's rotate_every_two).
    Interleaved,
}

impl RotaryPairing {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "halves" => Ok(Self::Halves),
            "interleaved" => Ok(Self::Interleaved),
            other => Err(EngineError::invalid(format!(
                "unknown rotary pairing \"{other}\" (halves or interleaved)"
            ))),
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            Self::Halves => "halves",
            Self::Interleaved => "interleaved",
        }
    }
}

/// Rotary position embedding of queries and keys (instead of a learned position table):
/// the first `dims` dimensions of each head turn by position · base^(−2i/dims).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rotary {
    pub dims: usize,
    pub base: f32,
    pub pairing: RotaryPairing,
}

/// How a layer's two sub-layers meet the residual stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Residual {
    /// x += attn(LN1(x)); x += mlp(LN2(x)) (GPT-2/3, OPT, GPT-Neo).
    #[default]
    Sequential,
    /// x += attn(LN1(x)) + mlp(LN2(x)) (GPT-NeoX's use_parallel_residual).
    ParallelTwoNorms,
    /// x += attn(LN1(x)) + mlp(LN1(x)); no LN2 (GPT-J).
    ParallelOneNorm,
}

impl Residual {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "sequential" => Ok(Self::Sequential),
            "parallel_two_norms" => Ok(Self::ParallelTwoNorms),
            "parallel_one_norm" => Ok(Self::ParallelOneNorm),
            other => Err(EngineError::invalid(format!(
                "unknown residual layout \"{other}\" (sequential, parallel_two_norms or parallel_one_norm)"
            ))),
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sequential => "sequential",
            Self::ParallelTwoNorms => "parallel_two_norms",
            Self::ParallelOneNorm => "parallel_one_norm",
        }
    }
    /// Whether a layer has its own LayerNorm before the MLP.
    pub fn has_ln_2(&self) -> bool {
        *self != Self::ParallelOneNorm
    }
}

fn yes() -> bool {
    true
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
    /// Rotary position embedding; None: the learned position table `wpe`.
    #[serde(default)]
    pub rotary: Option<Rotary>,
    #[serde(default)]
    pub residual: Residual,
    /// Whether the attention output projection has a bias (GPT-J's has none).
    #[serde(default = "yes")]
    pub out_proj_bias: bool,
    /// Whether the output layer adds a bias to the logits (GPT-J).
    #[serde(default)]
    pub head_bias: bool,
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
        if let Some(r) = &self.rotary {
            if r.dims == 0 || r.dims % 2 != 0 || r.dims > self.d_head {
                return Err(EngineError::invalid(format!(
                    "rotary dimensions must be even and in 2..={} (d_head), got {}",
                    self.d_head, r.dims
                )));
            }
            if !(r.base > 0.0 && r.base.is_finite()) {
                return Err(EngineError::invalid(format!(
                    "rotary base must be positive, got {}",
                    r.base
                )));
            }
            if self.position_offset != 0 {
                return Err(EngineError::invalid(
                    "position_offset applies to a learned position table, not to rotary embeddings",
                ));
            }
        }
        if self.residual != Residual::Sequential && self.ln_placement != LnPlacement::Pre {
            return Err(EngineError::invalid(
                "a parallel residual needs pre-LayerNorm placement",
            ));
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
        let mut v = vec![(
            "wte.weight".to_string(),
            vec![self.embedding_rows(), self.d_embed()],
        )];
        if self.rotary.is_none() {
            v.push(("wpe.weight".to_string(), vec![self.position_rows(), d]));
        }
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
            if self.out_proj_bias {
                v.push((p("attn.out_proj.bias"), vec![d]));
            }
            if self.residual.has_ln_2() {
                v.push((p("ln_2.weight"), vec![d]));
                v.push((p("ln_2.bias"), vec![d]));
            }
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
        if self.head_bias {
            v.push(("lm_head.bias".into(), vec![self.embedding_rows()]));
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
            rotary: None,
            residual: Residual::Sequential,
            out_proj_bias: true,
            head_bias: false,
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

/// The tiny GPT-3 with GPT-NeoX's knobs: rotary on half of each head, parallel residual
/// from two LayerNorms, separate head.
#[cfg(test)]
pub(crate) fn tiny_neox() -> ModelConfig {
    ModelConfig {
        attention_pattern: vec![AttnKind::Dense],
        local_window: None,
        tied_head: false,
        rotary: Some(Rotary {
            dims: 2,
            base: 10000.0,
            pairing: RotaryPairing::Halves,
        }),
        residual: Residual::ParallelTwoNorms,
        ..tiny_gpt3()
    }
}

/// The tiny GPT-3 with GPT-J's knobs: interleaved rotary on every dimension, one LayerNorm
/// for both branches, bias-free attention, a head with a bias.
#[cfg(test)]
pub(crate) fn tiny_gptj() -> ModelConfig {
    ModelConfig {
        qkv_bias: false,
        out_proj_bias: false,
        head_bias: true,
        rotary: Some(Rotary {
            dims: 4,
            base: 100.0,
            pairing: RotaryPairing::Interleaved,
        }),
        residual: Residual::ParallelOneNorm,
        ..tiny_neox()
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
        let rotary = |dims, base| {
            Some(Rotary {
                dims,
                base,
                pairing: RotaryPairing::Halves,
            })
        };
        for bad in [
            rotary(3, 1e4),
            rotary(0, 1e4),
            rotary(6, 1e4),
            rotary(2, 0.0),
        ] {
            let cfg = ModelConfig {
                rotary: bad,
                ..tiny_neox()
            };
            assert!(cfg.validate().is_err(), "{:?}", cfg.rotary);
        }
        assert!(ModelConfig {
            ln_placement: LnPlacement::Post,
            ..tiny_neox()
        }
        .validate()
        .is_err());
    }

    /// Each architecture lists exactly the tensors it has.
    #[test]
    fn param_specs_follow_the_knobs() {
        let names = |cfg: ModelConfig| -> Vec<String> {
            cfg.validate().unwrap();
            cfg.param_specs().into_iter().map(|(n, _)| n).collect()
        };
        let neox = names(tiny_neox());
        assert!(!neox.contains(&"wpe.weight".to_string()));
        assert!(neox.contains(&"layers.1.ln_2.weight".to_string()));
        assert!(neox.contains(&"layers.1.attn.out_proj.bias".to_string()));
        assert!(neox.contains(&"lm_head.weight".to_string()));
        let gptj = names(tiny_gptj());
        assert!(!gptj.iter().any(|n| n.contains("ln_2")
            || n.contains("out_proj.bias")
            || n.contains("q_proj.bias")));
        assert!(gptj.contains(&"lm_head.bias".to_string()));
        assert_eq!(names(tiny_gpt3()).len(), neox.len());
        assert_eq!(neox.len() - gptj.len(), 2 * (2 + 1 + 3) - 1);
    }
}
