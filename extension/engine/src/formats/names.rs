//! Each family's tensor names and layouts → pg_gpt3's canonical parameters
//! (`layers.{i}.attn.q_proj.weight`, …; Linear weights [out, in]). One table per family.

use super::hf_config::Family;
use super::TensorMap;
use crate::error::{EngineError, Result};
use crate::model::ModelConfig;

/// How a source tensor becomes canonical tensors.
pub(super) enum Rule {
    /// Same layout under a new name.
    Rename(&'static str),
    /// A Conv1D weight [in, out] stored transposed relative to Linear.
    Transpose(&'static str),
    /// GPT-2's fused c_attn: weight [d, 3·d_attn] (Conv1D) or bias [3·d_attn], q | k | v.
    SplitQkv,
    /// Megatron-LM's fused query_key_value: weight [3·d_attn, d] (Linear) or bias
    /// [3·d_attn], rows in the checkpoint version's order (`QkvOrder`).
    SplitFusedQkv,
    /// Buffers some checkpoints carry (causal masks): not parameters.
    Ignore,
}

/// (source suffix after the layer prefix, rule); `{}` in the target is the layer index.
const GPT2_LAYER: &[(&str, Rule)] = &[
    ("ln_1.weight", Rule::Rename("ln_1.weight")),
    ("ln_1.bias", Rule::Rename("ln_1.bias")),
    ("attn.c_attn.weight", Rule::SplitQkv),
    ("attn.c_attn.bias", Rule::SplitQkv),
    (
        "attn.c_proj.weight",
        Rule::Transpose("attn.out_proj.weight"),
    ),
    ("attn.c_proj.bias", Rule::Rename("attn.out_proj.bias")),
    ("ln_2.weight", Rule::Rename("ln_2.weight")),
    ("ln_2.bias", Rule::Rename("ln_2.bias")),
    ("mlp.c_fc.weight", Rule::Transpose("mlp.fc_in.weight")),
    ("mlp.c_fc.bias", Rule::Rename("mlp.fc_in.bias")),
    ("mlp.c_proj.weight", Rule::Transpose("mlp.fc_out.weight")),
    ("mlp.c_proj.bias", Rule::Rename("mlp.fc_out.bias")),
    ("attn.bias", Rule::Ignore),
    ("attn.masked_bias", Rule::Ignore),
];
const GPT2_GLOBAL: &[(&str, &str)] = &[
    ("wte.weight", "wte.weight"),
    ("wpe.weight", "wpe.weight"),
    ("ln_f.weight", "ln_f.weight"),
    ("ln_f.bias", "ln_f.bias"),
    ("lm_head.weight", "lm_head.weight"),
];

const NEO_LAYER: &[(&str, Rule)] = &[
    ("ln_1.weight", Rule::Rename("ln_1.weight")),
    ("ln_1.bias", Rule::Rename("ln_1.bias")),
    (
        "attn.attention.q_proj.weight",
        Rule::Rename("attn.q_proj.weight"),
    ),
    (
        "attn.attention.k_proj.weight",
        Rule::Rename("attn.k_proj.weight"),
    ),
    (
        "attn.attention.v_proj.weight",
        Rule::Rename("attn.v_proj.weight"),
    ),
    (
        "attn.attention.out_proj.weight",
        Rule::Rename("attn.out_proj.weight"),
    ),
    (
        "attn.attention.out_proj.bias",
        Rule::Rename("attn.out_proj.bias"),
    ),
    ("ln_2.weight", Rule::Rename("ln_2.weight")),
    ("ln_2.bias", Rule::Rename("ln_2.bias")),
    ("mlp.c_fc.weight", Rule::Rename("mlp.fc_in.weight")),
    ("mlp.c_fc.bias", Rule::Rename("mlp.fc_in.bias")),
    ("mlp.c_proj.weight", Rule::Rename("mlp.fc_out.weight")),
    ("mlp.c_proj.bias", Rule::Rename("mlp.fc_out.bias")),
    ("attn.attention.bias", Rule::Ignore),
    ("attn.attention.masked_bias", Rule::Ignore),
];

const OPT_LAYER: &[(&str, Rule)] = &[
    ("self_attn_layer_norm.weight", Rule::Rename("ln_1.weight")),
    ("self_attn_layer_norm.bias", Rule::Rename("ln_1.bias")),
    (
        "self_attn.q_proj.weight",
        Rule::Rename("attn.q_proj.weight"),
    ),
    ("self_attn.q_proj.bias", Rule::Rename("attn.q_proj.bias")),
    (
        "self_attn.k_proj.weight",
        Rule::Rename("attn.k_proj.weight"),
    ),
    ("self_attn.k_proj.bias", Rule::Rename("attn.k_proj.bias")),
    (
        "self_attn.v_proj.weight",
        Rule::Rename("attn.v_proj.weight"),
    ),
    ("self_attn.v_proj.bias", Rule::Rename("attn.v_proj.bias")),
    (
        "self_attn.out_proj.weight",
        Rule::Rename("attn.out_proj.weight"),
    ),
    (
        "self_attn.out_proj.bias",
        Rule::Rename("attn.out_proj.bias"),
    ),
    ("final_layer_norm.weight", Rule::Rename("ln_2.weight")),
    ("final_layer_norm.bias", Rule::Rename("ln_2.bias")),
    ("fc1.weight", Rule::Rename("mlp.fc_in.weight")),
    ("fc1.bias", Rule::Rename("mlp.fc_in.bias")),
    ("fc2.weight", Rule::Rename("mlp.fc_out.weight")),
    ("fc2.bias", Rule::Rename("mlp.fc_out.bias")),
];
const OPT_GLOBAL: &[(&str, &str)] = &[
    ("embed_tokens.weight", "wte.weight"),
    ("embed_positions.weight", "wpe.weight"),
    ("final_layer_norm.weight", "ln_f.weight"),
    ("final_layer_norm.bias", "ln_f.bias"),
    ("project_in.weight", "project_in.weight"),
    ("project_out.weight", "project_out.weight"),
    ("lm_head.weight", "lm_head.weight"),
];

/// Megatron-LM GPT, in the current spelling; `respell` maps older checkpoints'
/// (`transformer.layers.N.attention.*`) onto it.
const MEGATRON_LAYER: &[(&str, Rule)] = &[
    ("input_layernorm.weight", Rule::Rename("ln_1.weight")),
    ("input_layernorm.bias", Rule::Rename("ln_1.bias")),
    ("self_attention.query_key_value.weight", Rule::SplitFusedQkv),
    ("self_attention.query_key_value.bias", Rule::SplitFusedQkv),
    (
        "self_attention.dense.weight",
        Rule::Rename("attn.out_proj.weight"),
    ),
    (
        "self_attention.dense.bias",
        Rule::Rename("attn.out_proj.bias"),
    ),
    (
        "post_attention_layernorm.weight",
        Rule::Rename("ln_2.weight"),
    ),
    ("post_attention_layernorm.bias", Rule::Rename("ln_2.bias")),
    ("mlp.dense_h_to_4h.weight", Rule::Rename("mlp.fc_in.weight")),
    ("mlp.dense_h_to_4h.bias", Rule::Rename("mlp.fc_in.bias")),
    (
        "mlp.dense_4h_to_h.weight",
        Rule::Rename("mlp.fc_out.weight"),
    ),
    ("mlp.dense_4h_to_h.bias", Rule::Rename("mlp.fc_out.bias")),
];
const MEGATRON_GLOBAL: &[(&str, &str)] = &[
    ("embedding.word_embeddings.weight", "wte.weight"),
    ("embedding.position_embeddings.weight", "wpe.weight"),
    ("encoder.final_layernorm.weight", "ln_f.weight"),
    ("encoder.final_layernorm.bias", "ln_f.bias"),
    ("output_layer.weight", "lm_head.weight"),
];

/// Older Megatron-LM checkpoints name the layer stack `transformer` and the attention block
/// `attention`; current ones `encoder` and `self_attention`.
fn respell(family: Family, name: &str) -> String {
    if !matches!(family, Family::Megatron(_)) {
        return name.to_string();
    }
    let name = match name.strip_prefix("transformer.") {
        Some(rest) => format!("encoder.{rest}"),
        None => name.to_string(),
    };
    name.replace(".attention.", ".self_attention.")
}

/// Where a family keeps its layers and the names of its global tensors.
pub(super) struct Layout {
    pub prefixes: &'static [&'static str],
    pub layer: &'static str,
    pub layer_rules: &'static [(&'static str, Rule)],
    pub global: &'static [(&'static str, &'static str)],
}

pub(super) fn layout(family: Family) -> Option<Layout> {
    match family {
        Family::Gpt2 | Family::Cerebras => Some(Layout {
            prefixes: &["transformer.", ""],
            layer: "h.",
            layer_rules: GPT2_LAYER,
            global: GPT2_GLOBAL,
        }),
        Family::GptNeo => Some(Layout {
            prefixes: &["transformer.", ""],
            layer: "h.",
            layer_rules: NEO_LAYER,
            global: GPT2_GLOBAL,
        }),
        Family::Opt => Some(Layout {
            prefixes: &["model.decoder.", "decoder.", ""],
            layer: "layers.",
            layer_rules: OPT_LAYER,
            global: OPT_GLOBAL,
        }),
        Family::Megatron(_) => Some(Layout {
            prefixes: &[
                "model.language_model.",
                "module.language_model.",
                "language_model.",
                "",
            ],
            layer: "encoder.layers.",
            layer_rules: MEGATRON_LAYER,
            global: MEGATRON_GLOBAL,
        }),
        Family::Gpt3 => None,
    }
}

fn transpose(shape: &[usize], data: &[f32]) -> Result<(Vec<usize>, Vec<f32>)> {
    if shape.len() != 2 {
        return Err(EngineError::invalid(format!(
            "expected a matrix, got shape {}",
            crate::tensor::shape_str(shape)
        )));
    }
    let t = crate::kernels::elementwise::transpose(data, shape[0], shape[1])?;
    Ok((vec![shape[1], shape[0]], t))
}

/// Maps a checkpoint's tensors onto canonical names, checking nothing is left unexplained.
/// Tied output layers (`lm_head.weight` equal to the embedding) are dropped when `cfg` ties.
pub fn to_canonical(family: Family, cfg: &ModelConfig, mut src: TensorMap) -> Result<TensorMap> {
    let Some(lay) = layout(family) else {
        return Ok(src);
    };
    let mut out = TensorMap::new();
    let da = cfg.d_attn();
    // Sorted, so the first offending tensor named in an error is always the same one.
    let mut names: Vec<String> = src.keys().cloned().collect();
    names.sort();
    for full in names {
        let (shape, data) = src.remove(&full).expect("present");
        let name = respell(
            family,
            lay.prefixes
                .iter()
                .find_map(|p| full.strip_prefix(p))
                .unwrap_or(&full),
        );
        let name = name.as_str();
        // Global tensors.
        if let Some((_, target)) = lay.global.iter().find(|(s, _)| *s == name || full == *s) {
            if *target == "lm_head.weight" && cfg.tied_head {
                continue;
            }
            out.insert(target.to_string(), (shape, data));
            continue;
        }
        // Per-layer tensors: "<layer>{i}.<suffix>".
        let layer_part = name.strip_prefix(lay.layer).and_then(|rest| {
            let (idx, suffix) = rest.split_once('.')?;
            Some((idx.parse::<usize>().ok()?, suffix))
        });
        let Some((i, suffix)) = layer_part else {
            return Err(EngineError::invalid(format!(
                "checkpoint tensor \"{full}\" is not part of a {} model",
                family.name()
            )));
        };
        if i >= cfg.n_layer {
            return Err(EngineError::invalid(format!(
                "checkpoint tensor \"{full}\" belongs to layer {i}, but the model has {} layers",
                cfg.n_layer
            )));
        }
        let Some((_, rule)) = lay.layer_rules.iter().find(|(s, _)| *s == suffix) else {
            return Err(EngineError::invalid(format!(
                "checkpoint tensor \"{full}\" is not part of a {} model",
                family.name()
            )));
        };
        let target = |s: &str| format!("layers.{i}.{s}");
        match rule {
            Rule::Rename(t) => {
                out.insert(target(t), (shape, data));
            }
            Rule::Transpose(t) => {
                out.insert(target(t), transpose(&shape, &data)?);
            }
            Rule::Ignore => {}
            Rule::SplitQkv if shape.len() == 2 => {
                // Conv1D [d, 3·da]: transpose to [3·da, d], then q, k, v are consecutive row blocks.
                if shape[1] != 3 * da {
                    return Err(EngineError::invalid(format!(
                        "\"{full}\" has {} columns, expected 3·{da}",
                        shape[1]
                    )));
                }
                let (tshape, t) = transpose(&shape, &data)?;
                let d = tshape[1];
                for (k, q) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                    out.insert(
                        target(&format!("attn.{q}.weight")),
                        (vec![da, d], t[k * da * d..(k + 1) * da * d].to_vec()),
                    );
                }
            }
            Rule::SplitFusedQkv => {
                let Family::Megatron(order) = family else {
                    return Err(EngineError::Internal("fused QKV outside Megatron".into()));
                };
                let width = if shape.len() == 2 { shape[1] } else { 1 };
                if shape.first() != Some(&(3 * da)) || shape.len() > 2 {
                    return Err(EngineError::invalid(format!(
                        "\"{full}\" has shape {}, expected [3·{da}{}]",
                        crate::tensor::shape_str(&shape),
                        if shape.len() == 2 { ", d" } else { "" }
                    )));
                }
                let kind = if shape.len() == 2 { "weight" } else { "bias" };
                let (heads, dh) = (cfg.n_head, cfg.d_head);
                for (part, q) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                    let mut t = Vec::with_capacity(da * width);
                    for head in 0..heads {
                        for j in 0..dh {
                            let row = order.fused_row(part, head, j, heads, dh);
                            t.extend_from_slice(&data[row * width..(row + 1) * width]);
                        }
                    }
                    let shape = if kind == "weight" {
                        vec![da, width]
                    } else {
                        vec![da]
                    };
                    out.insert(target(&format!("attn.{q}.{kind}")), (shape, t));
                }
            }
            Rule::SplitQkv => {
                if shape != [3 * da] {
                    return Err(EngineError::invalid(format!(
                        "\"{full}\" has {} values, expected 3·{da}",
                        data.len()
                    )));
                }
                for (k, q) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                    out.insert(
                        target(&format!("attn.{q}.bias")),
                        (vec![da], data[k * da..(k + 1) * da].to_vec()),
                    );
                }
            }
        }
    }
    Ok(out)
}
