//! Each family's tensor names and layouts → pg_gpt3's canonical parameters
//! (`layers.{i}.attn.q_proj.weight`, …; Linear weights [out, in]). One table per family.

use super::hf_config::Family;
use std::ops::Range;

use super::{collect_piece, Sink, TensorMap, PIECE};
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
    /// Megatron-LM's or GPT-NeoX's fused query_key_value: weight [3·d_attn, d] (Linear) or
    /// bias [3·d_attn], rows in the family's order (`QkvOrder`; GPT-NeoX: [heads, 3, d_head]).
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

const NEOX_LAYER: &[(&str, Rule)] = &[
    ("input_layernorm.weight", Rule::Rename("ln_1.weight")),
    ("input_layernorm.bias", Rule::Rename("ln_1.bias")),
    ("attention.query_key_value.weight", Rule::SplitFusedQkv),
    ("attention.query_key_value.bias", Rule::SplitFusedQkv),
    (
        "attention.dense.weight",
        Rule::Rename("attn.out_proj.weight"),
    ),
    ("attention.dense.bias", Rule::Rename("attn.out_proj.bias")),
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
    ("attention.rotary_emb.inv_freq", Rule::Ignore),
    ("attention.bias", Rule::Ignore),
    ("attention.masked_bias", Rule::Ignore),
];
const NEOX_GLOBAL: &[(&str, &str)] = &[
    ("embed_in.weight", "wte.weight"),
    ("final_layer_norm.weight", "ln_f.weight"),
    ("final_layer_norm.bias", "ln_f.bias"),
    ("embed_out.weight", "lm_head.weight"),
];

const GPTJ_LAYER: &[(&str, Rule)] = &[
    ("ln_1.weight", Rule::Rename("ln_1.weight")),
    ("ln_1.bias", Rule::Rename("ln_1.bias")),
    ("attn.q_proj.weight", Rule::Rename("attn.q_proj.weight")),
    ("attn.k_proj.weight", Rule::Rename("attn.k_proj.weight")),
    ("attn.v_proj.weight", Rule::Rename("attn.v_proj.weight")),
    ("attn.out_proj.weight", Rule::Rename("attn.out_proj.weight")),
    ("mlp.fc_in.weight", Rule::Rename("mlp.fc_in.weight")),
    ("mlp.fc_in.bias", Rule::Rename("mlp.fc_in.bias")),
    ("mlp.fc_out.weight", Rule::Rename("mlp.fc_out.weight")),
    ("mlp.fc_out.bias", Rule::Rename("mlp.fc_out.bias")),
    ("attn.bias", Rule::Ignore),
    ("attn.masked_bias", Rule::Ignore),
];
const GPTJ_GLOBAL: &[(&str, &str)] = &[
    ("wte.weight", "wte.weight"),
    ("ln_f.weight", "ln_f.weight"),
    ("ln_f.bias", "ln_f.bias"),
    ("lm_head.weight", "lm_head.weight"),
    ("lm_head.bias", "lm_head.bias"),
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
        Family::GptNeoX => Some(Layout {
            prefixes: &["gpt_neox.", ""],
            layer: "layers.",
            layer_rules: NEOX_LAYER,
            global: NEOX_GLOBAL,
        }),
        Family::GptJ => Some(Layout {
            prefixes: &["transformer.", ""],
            layer: "h.",
            layer_rules: GPTJ_LAYER,
            global: GPTJ_GLOBAL,
        }),
        Family::Gpt3 => None,
    }
}

/// What one checkpoint tensor becomes: the canonical tensors it holds, with their shapes,
/// known before any value is read.
pub struct Mapped {
    pub source: String,
    pub targets: Vec<(String, Vec<usize>)>,
    how: How,
}

enum How {
    Same,
    /// [in, out] → [out, in].
    Transpose,
    /// GPT-2's c_attn weight [d, 3·da] (Conv1D): transposed, then q | k | v row blocks.
    SplitConv1dQkv,
    /// Consecutive blocks of `da` rows (or values) each.
    SplitRows,
    /// Megatron-LM's or GPT-NeoX's fused rows, `width` values each, in the family's order.
    SplitFused(super::hf_config::QkvOrder, usize),
}

/// Maps checkpoint tensor `full` of `shape` onto canonical names: None for what a model does
/// not store (buffers, a tied output layer). Shapes the rule needs are checked here; the
/// canonical shapes are checked against the model by the caller (`stream`).
pub fn map_tensor(
    family: Family,
    cfg: &ModelConfig,
    full: &str,
    shape: &[usize],
) -> Result<Option<Mapped>> {
    let mapped = |targets: Vec<(String, Vec<usize>)>, how| {
        Ok(Some(Mapped {
            source: full.to_string(),
            targets,
            how,
        }))
    };
    let Some(lay) = layout(family) else {
        return mapped(vec![(full.to_string(), shape.to_vec())], How::Same);
    };
    let da = cfg.d_attn();
    let name = respell(
        family,
        lay.prefixes
            .iter()
            .find_map(|p| full.strip_prefix(p))
            .unwrap_or(full),
    );
    let name = name.as_str();
    // Global tensors.
    if let Some((_, target)) = lay.global.iter().find(|(s, _)| *s == name || full == *s) {
        if *target == "lm_head.weight" && cfg.tied_head {
            return Ok(None);
        }
        return mapped(vec![(target.to_string(), shape.to_vec())], How::Same);
    }
    // Per-layer tensors: "<layer>{i}.<suffix>".
    let not_part = || {
        EngineError::invalid(format!(
            "checkpoint tensor \"{full}\" is not part of a {} model",
            family.name()
        ))
    };
    let (i, suffix) = name
        .strip_prefix(lay.layer)
        .and_then(|rest| {
            let (idx, suffix) = rest.split_once('.')?;
            Some((idx.parse::<usize>().ok()?, suffix))
        })
        .ok_or_else(not_part)?;
    if i >= cfg.n_layer {
        return Err(EngineError::invalid(format!(
            "checkpoint tensor \"{full}\" belongs to layer {i}, but the model has {} layers",
            cfg.n_layer
        )));
    }
    let (_, rule) = lay
        .layer_rules
        .iter()
        .find(|(s, _)| *s == suffix)
        .ok_or_else(not_part)?;
    let target = |s: &str| format!("layers.{i}.{s}");
    let qkv = |kind: &str, shape: Vec<usize>| -> Vec<(String, Vec<usize>)> {
        ["q_proj", "k_proj", "v_proj"]
            .iter()
            .map(|q| (target(&format!("attn.{q}.{kind}")), shape.clone()))
            .collect()
    };
    match rule {
        Rule::Rename(t) => mapped(vec![(target(t), shape.to_vec())], How::Same),
        Rule::Transpose(t) => match shape {
            [rows, cols] => mapped(vec![(target(t), vec![*cols, *rows])], How::Transpose),
            _ => Err(EngineError::invalid(format!(
                "\"{full}\" has shape {}, expected a matrix",
                crate::tensor::shape_str(shape)
            ))),
        },
        Rule::Ignore => Ok(None),
        Rule::SplitQkv => match shape {
            // Conv1D [d, 3·da]: transposed to [3·da, d], q, k, v are consecutive row blocks.
            [d, cols] if *cols == 3 * da => {
                mapped(qkv("weight", vec![da, *d]), How::SplitConv1dQkv)
            }
            [n] if *n == 3 * da => mapped(qkv("bias", vec![da]), How::SplitRows),
            _ => Err(EngineError::invalid(format!(
                "\"{full}\" has shape {}, expected [d, 3·{da}] or [3·{da}]",
                crate::tensor::shape_str(shape)
            ))),
        },
        Rule::SplitFusedQkv => {
            let order = match family {
                Family::Megatron(order) => order,
                Family::GptNeoX => super::hf_config::QkvOrder::HeadSplit,
                _ => {
                    return Err(EngineError::Internal(
                        "fused QKV outside Megatron and GPT-NeoX".into(),
                    ))
                }
            };
            match shape {
                [rows, width] if *rows == 3 * da => mapped(
                    qkv("weight", vec![da, *width]),
                    How::SplitFused(order, *width),
                ),
                [rows] if *rows == 3 * da => {
                    mapped(qkv("bias", vec![da]), How::SplitFused(order, 1))
                }
                _ => Err(EngineError::invalid(format!(
                    "\"{full}\" has shape {}, expected [3·{da}, d] or [3·{da}]",
                    crate::tensor::shape_str(shape)
                ))),
            }
        }
    }
}

impl Mapped {
    /// The canonical tensors made from the source tensor's values (of the shape it was mapped
    /// with), in `targets` order.
    pub fn apply(&self, cfg: &ModelConfig, data: Vec<f32>) -> Result<Vec<Vec<f32>>> {
        let da = cfg.d_attn();
        let split = |rows: &[f32], n: usize| -> Vec<Vec<f32>> {
            rows.chunks_exact(n).map(<[f32]>::to_vec).collect()
        };
        Ok(match &self.how {
            How::Same => vec![data],
            How::Transpose => {
                let [rows, cols] = self.targets[0].1[..] else {
                    return Err(EngineError::Internal("transpose of a non-matrix".into()));
                };
                vec![crate::kernels::elementwise::transpose(&data, cols, rows)?]
            }
            How::SplitConv1dQkv => {
                let d = self.targets[0].1[1];
                let t = crate::kernels::elementwise::transpose(&data, d, 3 * da)?;
                split(&t, da * d)
            }
            How::SplitRows => split(&data, da),
            How::SplitFused(order, width) => {
                let (heads, dh) = (cfg.n_head, cfg.d_head);
                (0..3)
                    .map(|part| {
                        let mut t = Vec::with_capacity(da * width);
                        for head in 0..heads {
                            for j in 0..dh {
                                let row = order.fused_row(part, head, j, heads, dh);
                                t.extend_from_slice(&data[row * width..(row + 1) * width]);
                            }
                        }
                        t
                    })
                    .collect()
            }
        })
    }
}

/// Maps every tensor of a checkpoint (names and shapes, `shapes`) onto canonical names and
/// checks the result against `cfg` — every parameter present once with its shape, nothing
/// left over — before any value is read; then reads each source tensor through `read` (a
/// range of its values), converts it and hands the canonical tensors to `sink`. A tensor that
/// only changes its name and holds more than `PIECE` values is read and handed over in
/// pieces; memory holds one source tensor (or piece) at a time. Returns the number of values
/// handed over.
pub fn stream(
    family: Family,
    cfg: &ModelConfig,
    shapes: &[(String, Vec<usize>)],
    read: &mut dyn FnMut(&str, Range<usize>) -> Result<Vec<f32>>,
    sink: &mut Sink<'_>,
) -> Result<u64> {
    stream_in_pieces(family, cfg, shapes, read, sink, PIECE)
}

fn stream_in_pieces(
    family: Family,
    cfg: &ModelConfig,
    shapes: &[(String, Vec<usize>)],
    read: &mut dyn FnMut(&str, Range<usize>) -> Result<Vec<f32>>,
    sink: &mut Sink<'_>,
    piece: usize,
) -> Result<u64> {
    // Sorted, so the first offending tensor named in an error is always the same one.
    let mut sorted: Vec<&(String, Vec<usize>)> = shapes.iter().collect();
    sorted.sort();
    let mut plan = Vec::new();
    let mut canonical = std::collections::HashMap::new();
    for (name, shape) in sorted {
        let Some(m) = map_tensor(family, cfg, name, shape)? else {
            continue;
        };
        for (target, shape) in &m.targets {
            if canonical.insert(target.clone(), shape.clone()).is_some() {
                return Err(EngineError::invalid(format!(
                    "the checkpoint holds parameter \"{target}\" twice (again as \"{name}\")"
                )));
            }
        }
        plan.push((m, shape.iter().product::<usize>()));
    }
    crate::model::check_shapes(cfg, &canonical)?;
    let mut read_checked = |name: &str, range: Range<usize>| -> Result<Vec<f32>> {
        let data = read(name, range.clone())?;
        if data.len() != range.len() {
            return Err(EngineError::data(format!(
                "checkpoint tensor \"{name}\" gave {} values where {} were expected",
                data.len(),
                range.len()
            )));
        }
        Ok(data)
    };
    for (m, numel) in &plan {
        if matches!(m.how, How::Same) {
            let (target, shape) = &m.targets[0];
            for start in (0..*numel).step_by(piece) {
                let values = read_checked(&m.source, start..(start + piece).min(*numel))?;
                sink(target, shape, start, values)?;
            }
            continue;
        }
        let data = read_checked(&m.source, 0..*numel)?;
        for ((target, shape), part) in m.targets.iter().zip(m.apply(cfg, data)?) {
            sink(target, shape, 0, part)?;
        }
    }
    Ok(canonical
        .values()
        .map(|s| s.iter().product::<usize>() as u64)
        .sum())
}

/// `stream` over a checkpoint's tensors in memory.
pub fn stream_map(
    family: Family,
    cfg: &ModelConfig,
    src: &TensorMap,
    sink: &mut Sink<'_>,
) -> Result<u64> {
    let shapes: Vec<(String, Vec<usize>)> = src
        .iter()
        .map(|(n, (s, _))| (n.clone(), s.clone()))
        .collect();
    stream(
        family,
        cfg,
        &shapes,
        &mut |name, range| {
            // A tensor shorter than its shape reads short and is refused by `stream`.
            Ok(src
                .get(name)
                .and_then(|(_, d)| d.get(range))
                .map(<[f32]>::to_vec)
                .unwrap_or_default())
        },
        sink,
    )
}

/// A checkpoint's tensors in memory → canonical tensors (`stream_map`).
pub fn to_canonical(family: Family, cfg: &ModelConfig, src: TensorMap) -> Result<TensorMap> {
    let mut out = TensorMap::new();
    stream_map(family, cfg, &src, &mut |name, shape, offset, data| {
        collect_piece(&mut out, name, shape, offset, data)
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::tiny_gpt3;
    use crate::model::init::init_params;

    #[test]
    fn large_tensors_arrive_in_consecutive_pieces() {
        let cfg = tiny_gpt3();
        let params = init_params(&cfg, 3).unwrap();
        let shapes: Vec<(String, Vec<usize>)> = params
            .iter()
            .map(|(n, (s, _))| (n.clone(), s.clone()))
            .collect();
        let mut got = TensorMap::new();
        let mut reads = 0;
        stream_in_pieces(
            Family::Gpt3,
            &cfg,
            &shapes,
            &mut |name, range| {
                reads += 1;
                assert!(range.len() <= 100);
                Ok(params[name].1[range].to_vec())
            },
            &mut |name, shape, at, values| {
                let (_, whole) = got
                    .entry(name.to_string())
                    .or_insert_with(|| (shape.to_vec(), Vec::new()));
                assert_eq!(whole.len(), at, "{name}: pieces in order");
                whole.extend(values);
                Ok(())
            },
            100,
        )
        .unwrap();
        assert_eq!(got, params);
        assert!(reads > params.len(), "the embedding came in pieces");
    }
}
