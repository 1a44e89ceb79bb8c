//! Hugging Face `config.json` → `ModelConfig`, with family detection.

use serde_json::Value;

use crate::error::{EngineError, Result};
use crate::model::config::{Residual, Rotary, RotaryPairing};
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
    /// Megatron-LM GPT: Linear weights [out, in], a fused query_key_value whose row order
    /// depends on the checkpoint version, a vocabulary padded to a multiple of 128.
    Megatron(QkvOrder),
    /// GPT-NeoX (Pythia): rotary embeddings on a fraction of each head, a fused
    /// query_key_value in [heads, 3, d_head] order, parallel residual, untied head.
    GptNeoX,
    /// GPT-J: interleaved rotary embeddings, one LayerNorm feeding attention and MLP in
    /// parallel, bias-free attention, an output layer with a bias.
    GptJ,
}

/// Row order of Megatron-LM's fused query_key_value weight and bias, by checkpoint version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkvOrder {
    /// Version 0: [3, heads, d_head] (all queries, then keys, then values).
    Split,
    /// Version 1.0: [heads, d_head, 3].
    HeadDim,
    /// Version 2.0 and later: [heads, 3, d_head].
    HeadSplit,
}

impl QkvOrder {
    /// The fused row holding row `j` of head `head` of part `part` (0 q, 1 k, 2 v).
    pub fn fused_row(
        self,
        part: usize,
        head: usize,
        j: usize,
        heads: usize,
        d_head: usize,
    ) -> usize {
        match self {
            Self::Split => (part * heads + head) * d_head + j,
            Self::HeadDim => (head * d_head + j) * 3 + part,
            Self::HeadSplit => (head * 3 + part) * d_head + j,
        }
    }
}

impl Family {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Gpt3 => "gpt3",
            Self::Gpt2 => "gpt2",
            Self::Cerebras => "cerebras",
            Self::Opt => "opt",
            Self::GptNeo => "gpt-neo",
            Self::Megatron(QkvOrder::Split) => "megatron-v0",
            Self::Megatron(QkvOrder::HeadDim) => "megatron-v1",
            Self::Megatron(QkvOrder::HeadSplit) => "megatron",
            Self::GptNeoX => "gpt-neox",
            Self::GptJ => "gptj",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "gpt3" => Ok(Self::Gpt3),
            "gpt2" => Ok(Self::Gpt2),
            "cerebras" => Ok(Self::Cerebras),
            "opt" => Ok(Self::Opt),
            "gpt-neo" => Ok(Self::GptNeo),
            "megatron-v0" => Ok(Self::Megatron(QkvOrder::Split)),
            "megatron-v1" => Ok(Self::Megatron(QkvOrder::HeadDim)),
            "megatron" => Ok(Self::Megatron(QkvOrder::HeadSplit)),
            "gpt-neox" => Ok(Self::GptNeoX),
            "gptj" => Ok(Self::GptJ),
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

/// The config.json of a canonical checkpoint (`convert`): model type "pg_gpt3" with every
/// field of the configuration, and the family the checkpoint came from (informative).
pub fn canonical_config(cfg: &ModelConfig, source: Family) -> Value {
    let mut json = serde_json::to_value(cfg).expect("a configuration serialises");
    if let Value::Object(map) = &mut json {
        map.insert("model_type".into(), Value::from("pg_gpt3"));
        map.insert("converted_from".into(), Value::from(source.name()));
    }
    json
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
                rotary: None,
                residual: Residual::Sequential,
                out_proj_bias: true,
                head_bias: false,
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
                rotary: None,
                residual: Residual::Sequential,
                out_proj_bias: true,
                head_bias: false,
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
                rotary: None,
                residual: Residual::Sequential,
                out_proj_bias: true,
                head_bias: false,
            };
            (cfg, Family::GptNeo)
        }
        "megatron-lm" | "megatron_gpt" => megatron(config)?,
        "gpt_neox" => (gpt_neox(config)?, Family::GptNeoX),
        "gptj" => (gptj(config)?, Family::GptJ),
        "pg_gpt3" => {
            // pg_gpt3's own canonical checkpoints (`convert`): the whole configuration.
            let cfg: ModelConfig = serde_json::from_value(config.clone()).map_err(|e| {
                EngineError::invalid(format!("a pg_gpt3 config.json that does not parse: {e}"))
            })?;
            (cfg, Family::Gpt3)
        }
        "" => return Err(EngineError::invalid("config.json has no \"model_type\"")),
        other => {
            return Err(EngineError::invalid(format!(
            "model_type \"{other}\" is not supported (gpt2, opt, gpt_neo, gpt_neox, gptj, megatron-lm, pg_gpt3; Cerebras-GPT uses gpt2)"
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

/// A Megatron-LM GPT model from its training arguments (the names of Megatron's `args`, given
/// as a JSON object with `"model_type": "megatron-lm"`). Megatron's GPT is GPT-2's
/// architecture: pre-LN, learned positions, dense attention scaled by 1/√d_head (query-key
/// layer scaling changes nothing numerically), exact GELU unless `openai_gelu`.
fn megatron(config: &Value) -> Result<(ModelConfig, Family)> {
    let refuse = |what: &str| {
        Err(EngineError::invalid(format!(
            "Megatron-LM checkpoints with {what} are not supported"
        )))
    };
    if !matches!(
        string(config, "position_embedding_type", "learned_absolute"),
        "learned_absolute"
    ) {
        return refuse("rotary or relative position embeddings");
    }
    if !matches!(string(config, "normalization", "LayerNorm"), "LayerNorm") {
        return refuse("RMSNorm");
    }
    if boolean(config, "swiglu", false) || boolean(config, "squared_relu", false) {
        return refuse("a gated or squared activation");
    }
    if boolean(config, "group_query_attention", false)
        || boolean(config, "apply_residual_connection_post_layernorm", false)
        || !boolean(config, "add_bias_linear", true)
    {
        return refuse("grouped-query attention, post-LayerNorm residuals or bias-free layers");
    }
    let d = uint(config, "hidden_size")?;
    let n_head = uint(config, "num_attention_heads")?;
    let d_head = match opt_uint(config, "kv_channels") {
        Some(k) if k * n_head != d => return refuse("kv_channels · heads ≠ hidden_size"),
        _ => head_size(d, n_head)?,
    };
    let vocab = uint(config, "vocab_size")?;
    let version = config
        .get("checkpoint_version")
        .and_then(Value::as_f64)
        .unwrap_or(3.0);
    let order = if version < 1.0 {
        QkvOrder::Split
    } else if version < 2.0 {
        QkvOrder::HeadDim
    } else {
        QkvOrder::HeadSplit
    };
    let cfg = ModelConfig {
        n_layer: uint(config, "num_layers")?,
        n_head,
        d_model: d,
        d_head,
        d_ff: opt_uint(config, "ffn_hidden_size").unwrap_or(4 * d),
        n_positions: uint(config, "max_position_embeddings")?,
        vocab,
        activation: if boolean(config, "openai_gelu", false) {
            Activation::GeluNew
        } else {
            Activation::Gelu
        },
        attention_pattern: vec![AttnKind::Dense],
        local_window: None,
        scale_attn: true,
        position_offset: 0,
        qkv_bias: true,
        tied_head: !boolean(config, "untie_embeddings_and_output_weights", false),
        padded_vocab: opt_uint(config, "padded_vocab_size").filter(|&p| p > vocab),
        ln_placement: LnPlacement::Pre,
        ln_eps: eps(config, "layernorm_epsilon"),
        d_embed: None,
        rotary: None,
        residual: Residual::Sequential,
        out_proj_bias: true,
        head_bias: false,
    };
    Ok((cfg, Family::Megatron(order)))
}

/// GPT-NeoX (Pythia). transformers 5 writes the rotary settings as `rope_parameters`
/// (rope_theta, partial_rotary_factor); older config.json files as rotary_emb_base and
/// rotary_pct. Either is read; transformers' defaults are 10000 and 0.25.
fn gpt_neox(config: &Value) -> Result<ModelConfig> {
    let d = uint(config, "hidden_size")?;
    let n_head = uint(config, "num_attention_heads")?;
    let d_head = head_size(d, n_head)?;
    let rope = config.get("rope_parameters").or(config.get("rope_scaling"));
    let rope_value = |new: &str, old: &str| {
        rope.and_then(|r| r.get(new))
            .or(config.get(old))
            .and_then(Value::as_f64)
    };
    let rope_type = rope
        .and_then(|r| r.get("rope_type").or(r.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    if rope_type != "default" {
        return Err(EngineError::invalid(format!(
            "GPT-NeoX checkpoints with rope_type \"{rope_type}\" are not supported (default only)"
        )));
    }
    let pct = rope_value("partial_rotary_factor", "rotary_pct").unwrap_or(0.25);
    let base = rope_value("rope_theta", "rotary_emb_base").unwrap_or(10000.0);
    if !(pct > 0.0 && pct <= 1.0) {
        return Err(EngineError::invalid(format!(
            "rotary_pct must be in (0, 1], got {pct}"
        )));
    }
    let bias = boolean(config, "attention_bias", true);
    Ok(ModelConfig {
        n_layer: uint(config, "num_hidden_layers")?,
        n_head,
        d_model: d,
        d_head,
        d_ff: uint(config, "intermediate_size")?,
        n_positions: uint(config, "max_position_embeddings")?,
        vocab: uint(config, "vocab_size")?,
        activation: Activation::parse(string(config, "hidden_act", "gelu"))?,
        attention_pattern: vec![AttnKind::Dense],
        local_window: None,
        scale_attn: true,
        position_offset: 0,
        qkv_bias: bias,
        tied_head: boolean(config, "tie_word_embeddings", false),
        padded_vocab: None,
        ln_placement: LnPlacement::Pre,
        ln_eps: eps(config, "layer_norm_eps"),
        d_embed: None,
        // transformers: int(head_size · partial_rotary_factor).
        rotary: Some(Rotary {
            dims: (d_head as f64 * pct) as usize,
            base: base as f32,
            pairing: RotaryPairing::Halves,
        }),
        residual: if boolean(config, "use_parallel_residual", true) {
            Residual::ParallelTwoNorms
        } else {
            Residual::Sequential
        },
        out_proj_bias: bias,
        head_bias: false,
    })
}

/// GPT-J: rotary_dim interleaved dimensions per head at base 10000.
fn gptj(config: &Value) -> Result<ModelConfig> {
    let d = uint(config, "n_embd")?;
    let n_head = uint(config, "n_head")?;
    let d_head = head_size(d, n_head)?;
    // transformers builds its sin/cos table rotary_dim (or, when null, n_embd) wide and
    // applies it to each head: a null rotary_dim only works with one head.
    let dims = match opt_uint(config, "rotary_dim") {
        Some(r) => r,
        None if n_head == 1 => d_head,
        None => {
            return Err(EngineError::invalid(
                "GPT-J checkpoints without rotary_dim are only supported with one head",
            ))
        }
    };
    Ok(ModelConfig {
        n_layer: uint(config, "n_layer")?,
        n_head,
        d_model: d,
        d_head,
        d_ff: opt_uint(config, "n_inner").unwrap_or(4 * d),
        n_positions: uint(config, "n_positions")?,
        vocab: uint(config, "vocab_size")?,
        activation: Activation::parse(string(config, "activation_function", "gelu_new"))?,
        attention_pattern: vec![AttnKind::Dense],
        local_window: None,
        scale_attn: true,
        position_offset: 0,
        qkv_bias: false,
        tied_head: boolean(config, "tie_word_embeddings", false),
        padded_vocab: None,
        ln_placement: LnPlacement::Pre,
        ln_eps: eps(config, "layer_norm_epsilon"),
        d_embed: None,
        rotary: Some(Rotary {
            dims,
            base: 10000.0,
            pairing: RotaryPairing::Interleaved,
        }),
        residual: Residual::ParallelOneNorm,
        out_proj_bias: false,
        head_bias: true,
    })
}

fn head_size(d: usize, n_head: usize) -> Result<usize> {
    if n_head == 0 || d % n_head != 0 {
        return Err(EngineError::invalid(format!(
            "hidden size {d} is not divisible by {n_head} heads"
        )));
    }
    Ok(d / n_head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn neox(extra: Value) -> Value {
        let mut c = json!({
            "model_type": "gpt_neox", "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "intermediate_size": 256, "max_position_embeddings": 128,
            "vocab_size": 100, "hidden_act": "gelu"
        });
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    }

    /// Pythia's config.json as transformers 4 wrote it (rotary_pct, rotary_emb_base) and as
    /// transformers 5 writes it (rope_parameters) give the same model; defaults follow
    /// transformers (0.25 of each head, base 10000, parallel residual, untied head).
    #[test]
    fn gpt_neox_rotary_settings_in_either_spelling() {
        let old = neox(json!({"rotary_pct": 0.5, "rotary_emb_base": 500.0}));
        let new = neox(json!({"rope_parameters": {"rope_type": "default",
            "partial_rotary_factor": 0.5, "rope_theta": 500.0}}));
        let (a, fa) = parse(&old).unwrap();
        assert_eq!(parse(&new).unwrap(), (a.clone(), fa));
        assert_eq!(fa, Family::GptNeoX);
        let r = a.rotary.unwrap();
        assert_eq!(
            (r.dims, r.base, r.pairing),
            (8, 500.0, RotaryPairing::Halves)
        );
        let (d, _) = parse(&neox(json!({}))).unwrap();
        assert_eq!(d.rotary.unwrap().dims, 4);
        assert_eq!(d.residual, Residual::ParallelTwoNorms);
        assert!(!d.tied_head && d.qkv_bias && d.out_proj_bias);
        let (seq, _) = parse(&neox(json!({"use_parallel_residual": false}))).unwrap();
        assert_eq!(seq.residual, Residual::Sequential);
    }

    #[test]
    fn unsupported_rotary_settings_are_refused() {
        let linear = neox(json!({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}));
        assert!(parse(&linear)
            .unwrap_err()
            .to_string()
            .contains("rope_type"));
        assert!(parse(&neox(json!({"rotary_pct": 0.0}))).is_err());
        let gptj = json!({"model_type": "gptj", "n_embd": 64, "n_head": 4, "n_layer": 1,
            "n_positions": 32, "vocab_size": 50, "rotary_dim": null});
        assert!(parse(&gptj).unwrap_err().to_string().contains("rotary_dim"));
    }
}
