//! Hugging Face `config.json` → `ModelConfig`, with family detection.

use serde_json::Value;

use crate::error::{EngineError, Result};
use crate::model::{Activation, AttnKind, LnPlacement, ModelConfig};

/// The checkpoint layouts pg_gpt3 imports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// pg_gpt3's own canonical names (GPT-3 presets).
    Gpt3,
    /// GPT-2: Conv1D weights [in, out], fused c_attn.
    Gpt2,
    /// Cerebras-GPT: the GPT-2 layout with exact GELU.
    Cerebras,
    /// OPT: separate q/k/v Linear layers, positions offset by 2.
    Opt,
    /// GPT-Neo: global/local layers, no score scaling, bias-free q/k/v.
    GptNeo,
}

impl Family {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Gpt3 => "gpt3",
            Self::Gpt2 => "gpt2",
            Self::Cerebras => "cerebras",
            Self::Opt => "opt",
            Self::GptNeo => "gpt-neo",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "gpt3" => Ok(Self::Gpt3),
            "gpt2" => Ok(Self::Gpt2),
            "cerebras" => Ok(Self::Cerebras),
            "opt" => Ok(Self::Opt),
            "gpt-neo" => Ok(Self::GptNeo),
            other => Err(EngineError::invalid(format!(
                "unknown model family \"{other}\""
            ))),
        }
    }
}

fn uint(v: &Value, key: &str) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| {
            EngineError::invalid(format!("config.json lacks a positive integer \"{key}\""))
        })
}

fn opt_uint(v: &Value, key: &str) -> Option<usize> {
    v.get(key).and_then(Value::as_u64).map(|x| x as usize)
}

fn string<'a>(v: &'a Value, key: &str, default: &'a str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or(default)
}

fn boolean(v: &Value, key: &str, default: bool) -> bool {
    v.get(key).and_then(Value::as_bool).unwrap_or(default)
}

fn eps(v: &Value, key: &str) -> f32 {
    v.get(key).and_then(Value::as_f64).unwrap_or(1e-5) as f32
}

/// Parses a Hugging Face config.json; returns the configuration and the detected family.
pub fn parse(config: &Value) -> Result<(ModelConfig, Family)> {
    let model_type = string(config, "model_type", "");
    let (cfg, family) = match model_type {
        "gpt2" => {
            let d = uint(config, "n_embd")?;
            let n_head = uint(config, "n_head")?;
            let act = Activation::parse(string(config, "activation_function", "gelu_new"))?;
            let family = if act == Activation::Gelu {
                Family::Cerebras
            } else {
                Family::Gpt2
            };
            let cfg = ModelConfig {
                n_layer: uint(config, "n_layer")?,
                n_head,
                d_model: d,
                d_head: head_size(d, n_head)?,
                d_ff: opt_uint(config, "n_inner").unwrap_or(4 * d),
                n_positions: uint(config, "n_positions")?,
                vocab: uint(config, "vocab_size")?,
                activation: act,
                attention_pattern: vec![AttnKind::Dense],
                local_window: None,
                scale_attn: boolean(config, "scale_attn_weights", true),
                position_offset: 0,
                qkv_bias: true,
                tied_head: boolean(config, "tie_word_embeddings", true),
                padded_vocab: None,
                ln_placement: LnPlacement::Pre,
                ln_eps: eps(config, "layer_norm_epsilon"),
                d_embed: None,
            };
            if boolean(config, "scale_attn_by_inverse_layer_idx", false)
                || boolean(config, "reorder_and_upcast_attn", false)
            {
                return Err(EngineError::invalid(
                    "GPT-2 checkpoints with scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn are not supported",
                ));
            }
            (cfg, family)
        }
        "opt" => {
            let d = uint(config, "hidden_size")?;
            let n_head = uint(config, "num_attention_heads")?;
            let e = opt_uint(config, "word_embed_proj_dim").unwrap_or(d);
            if !boolean(config, "enable_bias", true)
                || !boolean(config, "layer_norm_elementwise_affine", true)
            {
                return Err(EngineError::invalid(
                    "OPT checkpoints without biases or LayerNorm gains are not supported",
                ));
            }
            let pre = boolean(config, "do_layer_norm_before", true);
            if pre && boolean(config, "_remove_final_layer_norm", false) {
                return Err(EngineError::invalid(
                    "OPT checkpoints with _remove_final_layer_norm are not supported",
                ));
            }
            let cfg = ModelConfig {
                n_layer: uint(config, "num_hidden_layers")?,
                n_head,
                d_model: d,
                d_head: head_size(d, n_head)?,
                d_ff: uint(config, "ffn_dim")?,
                n_positions: uint(config, "max_position_embeddings")?,
                vocab: uint(config, "vocab_size")?,
                activation: Activation::parse(string(config, "activation_function", "relu"))?,
                attention_pattern: vec![AttnKind::Dense],
                local_window: None,
                scale_attn: true,
                position_offset: 2,
                qkv_bias: true,
                tied_head: boolean(config, "tie_word_embeddings", true),
                padded_vocab: None,
                ln_placement: if pre {
                    LnPlacement::Pre
                } else {
                    LnPlacement::Post
                },
                ln_eps: 1e-5,
                d_embed: (e != d).then_some(e),
            };
            (cfg, Family::Opt)
        }
        "gpt_neo" => {
            let d = uint(config, "hidden_size")?;
            let n_head = uint(config, "num_heads")?;
            let layers: Vec<AttnKind> = config
                .get("attention_layers")
                .and_then(Value::as_array)
                .ok_or_else(|| EngineError::invalid("config.json lacks \"attention_layers\""))?
                .iter()
                .map(|k| AttnKind::parse(k.as_str().unwrap_or("?")))
                .collect::<Result<_>>()?;
            let cfg = ModelConfig {
                n_layer: uint(config, "num_layers")?,
                n_head,
                d_model: d,
                d_head: head_size(d, n_head)?,
                d_ff: opt_uint(config, "intermediate_size").unwrap_or(4 * d),
                n_positions: uint(config, "max_position_embeddings")?,
                vocab: uint(config, "vocab_size")?,
                activation: Activation::parse(string(config, "activation_function", "gelu_new"))?,
                local_window: Some(uint(config, "window_size")?),
                attention_pattern: layers,
                scale_attn: false,
                position_offset: 0,
                qkv_bias: false,
                tied_head: boolean(config, "tie_word_embeddings", true),
                padded_vocab: None,
                ln_placement: LnPlacement::Pre,
                ln_eps: eps(config, "layer_norm_epsilon"),
                d_embed: None,
            };
            (cfg, Family::GptNeo)
        }
        "" => return Err(EngineError::invalid("config.json has no \"model_type\"")),
        other => {
            return Err(EngineError::invalid(format!(
            "model_type \"{other}\" is not supported (gpt2, opt, gpt_neo; Cerebras-GPT uses gpt2)"
        )))
        }
    };
    if cfg.attention_pattern.len() != 1 && cfg.attention_pattern.len() != cfg.n_layer {
        return Err(EngineError::invalid(
            "attention_layers must list one kind per layer",
        ));
    }
    cfg.validate()?;
    Ok((cfg, family))
}

fn head_size(d: usize, n_head: usize) -> Result<usize> {
    if n_head == 0 || d % n_head != 0 {
        return Err(EngineError::invalid(format!(
            "hidden size {d} is not divisible by {n_head} heads"
        )));
    }
    Ok(d / n_head)
}
