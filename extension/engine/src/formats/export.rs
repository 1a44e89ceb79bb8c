//! pg_gpt3's canonical parameters → a Hugging Face checkpoint that `transformers` loads with
//! the same logits: tensor names and layouts (the inverse of `names::to_canonical`, read off
//! the same tables) and the matching `config.json`.
//!
//! An export is planned before any value is touched: the plan names every output tensor with
//! its shape and a recipe, so a writer can emit the safetensors header first and then make
//! and write one tensor at a time (memory of one tensor, not of the model).
//!
//! Models of an imported family go back to that family. pg_gpt3's own GPT-3 models go to
//! GPT-2's layout when every layer is dense (it has every bias and scales scores by
//! 1/√d_head, as GPT-3 does), and to GPT-Neo's when some layers are locally banded. GPT-Neo
//! differs from GPT-3 in three ways, of which two fold away exactly: it does not scale scores
//! (the scale goes into the query weights), and it has no q/k/v biases — a key bias adds
//! q·b_k to every score of a row, which softmax ignores, and a value bias adds b_v to every
//! attention output (the weights sum to one), which the output projection turns into
//! W_o·b_v added to its bias. A query bias adds b_q·k_j, different for every key: no GPT-Neo
//! weights reproduce it, so a model whose query biases are not all zero is refused.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::hf_config::Family;
use super::names::{layout, Rule};
use super::PIECE;
use crate::error::{EngineError, Result};
use crate::model::{Activation, AttnKind, LnPlacement, ModelConfig};

/// One tensor of the exported checkpoint.
#[derive(Clone, Debug)]
pub struct Planned {
    pub name: String,
    pub shape: Vec<usize>,
    recipe: Recipe,
}

#[derive(Clone, Debug)]
enum Recipe {
    /// The canonical tensor's first `shape[0]` rows (a padded vocabulary loses its padding).
    Copy(String),
    /// A canonical Linear weight [out, in] written as a Conv1D weight [in, out].
    Transpose(String),
    /// GPT-2's fused c_attn of a layer: weight [d, 3·d_attn] (Conv1D) or bias [3·d_attn].
    FusedQkv { layer: usize, bias: bool },
    /// A canonical tensor times a constant (GPT-3's score scale folded into query weights).
    Scaled(String, f32),
    /// out_proj.bias + out_proj.weight · v_proj.bias of a layer.
    FoldedOutBias(usize),
}

/// What an export writes: the family, its config.json and the tensors in file order.
#[derive(Clone, Debug)]
pub struct Plan {
    pub family: Family,
    pub config: Value,
    pub tensors: Vec<Planned>,
}

/// A model's canonical tensors, fetched by name as the export needs them (a recipe uses at
/// most three), so a source can read them from storage one at a time.
pub trait Canonical {
    fn fetch(&mut self, name: &str) -> Result<Vec<f32>>;

    /// Values `range` of a tensor (an export streams a large copied tensor in pieces); by
    /// default cut from the whole tensor.
    fn fetch_range(&mut self, name: &str, range: std::ops::Range<usize>) -> Result<Vec<f32>> {
        let all = self.fetch(name)?;
        all.get(range.clone()).map(<[f32]>::to_vec).ok_or_else(|| {
            EngineError::data(format!(
                "parameter \"{name}\" has {} values, not {}",
                all.len(),
                range.end
            ))
        })
    }
}

/// The family a model exports to: its own, or for pg_gpt3's GPT-3 models GPT-2 (all layers
/// dense) or GPT-Neo (some layers local).
pub fn target_family(stored: Family, cfg: &ModelConfig) -> Family {
    match stored {
        Family::Gpt3 if (0..cfg.n_layer).all(|i| cfg.layer_kind(i) == AttnKind::Dense) => {
            if cfg.activation == Activation::Gelu {
                Family::Cerebras
            } else {
                Family::Gpt2
            }
        }
        Family::Gpt3 => Family::GptNeo,
        // Megatron-LM's GPT is GPT-2's architecture.
        Family::Megatron(_) if cfg.activation == Activation::Gelu => Family::Cerebras,
        Family::Megatron(_) => Family::Gpt2,
        other => other,
    }
}

/// Plans the export of a model of family `stored` with configuration `cfg`. Value checks (a
/// GPT-3 model's query biases for GPT-Neo) read `params`; nothing else is read.
pub fn plan(stored: Family, cfg: &ModelConfig, params: &mut dyn Canonical) -> Result<Plan> {
    cfg.validate()?;
    let family = target_family(stored, cfg);
    check_expressible(family, cfg)?;
    let lay = layout(family).expect("every export family has a layout");
    let prefix = lay.prefixes[0];
    let vocab = cfg.vocab;
    let (d, da) = (cfg.d_model, cfg.d_attn());
    let shapes: std::collections::HashMap<String, Vec<usize>> = crate::model::weights::packing(cfg)
        .into_iter()
        .filter_map(|s| Some((s.name?, s.shape)))
        .collect();
    let shape_of = |canonical: &str| shapes.get(canonical).cloned().unwrap_or_default();
    let mut tensors = Vec::new();
    for (source, canonical) in lay.global {
        if *canonical == "lm_head.weight" && cfg.tied_head {
            continue;
        }
        let shape = shape_of(canonical);
        if shape.is_empty() {
            continue; // a tensor this configuration does not have (ln_f with post-LN, …)
        }
        let shape = match *canonical {
            // Vocabulary padding rows are pg_gpt3's own: transformers' table has `vocab` rows.
            "wte.weight" | "lm_head.weight" => vec![vocab, shape[1]],
            _ => shape,
        };
        let name = if *canonical == "lm_head.weight" {
            source.to_string()
        } else {
            format!("{prefix}{source}")
        };
        tensors.push(Planned {
            name,
            shape,
            recipe: Recipe::Copy(canonical.to_string()),
        });
    }
    let neo_from_gpt3 = family == Family::GptNeo && stored == Family::Gpt3;
    for i in 0..cfg.n_layer {
        let name = |suffix: &str| format!("{prefix}{}{i}.{suffix}", lay.layer);
        let canonical = |t: &str| format!("layers.{i}.{t}");
        for (suffix, rule) in lay.layer_rules {
            let planned = match rule {
                Rule::Ignore => continue,
                Rule::SplitFusedQkv => {
                    return Err(EngineError::Internal(
                        "no export family fuses QKV the Megatron way".into(),
                    ))
                }
                Rule::SplitQkv => {
                    let bias = !suffix.ends_with("weight");
                    Planned {
                        name: name(suffix),
                        shape: if bias { vec![3 * da] } else { vec![d, 3 * da] },
                        recipe: Recipe::FusedQkv { layer: i, bias },
                    }
                }
                Rule::Transpose(t) => {
                    let s = shape_of(&canonical(t));
                    Planned {
                        name: name(suffix),
                        shape: vec![s[1], s[0]],
                        recipe: Recipe::Transpose(canonical(t)),
                    }
                }
                Rule::Rename(t) => {
                    let recipe = match *t {
                        "attn.q_proj.weight" if neo_from_gpt3 && cfg.scale_attn => {
                            Recipe::Scaled(canonical(t), 1.0 / (cfg.d_head as f32).sqrt())
                        }
                        "attn.out_proj.bias" if neo_from_gpt3 && cfg.qkv_bias => {
                            Recipe::FoldedOutBias(i)
                        }
                        _ => Recipe::Copy(canonical(t)),
                    };
                    Planned {
                        name: name(suffix),
                        shape: shape_of(&canonical(t)),
                        recipe,
                    }
                }
            };
            tensors.push(planned);
        }
        if neo_from_gpt3 && cfg.qkv_bias {
            let b_q = params.fetch(&canonical("attn.q_proj.bias"))?;
            if let Some(at) = b_q.iter().position(|&v| v != 0.0) {
                return Err(EngineError::invalid(format!(
                    "layer {i} has a non-zero query bias (element {at} is {}); its locally banded \
                     layers need GPT-Neo's layout, which has no query bias and nothing that adds \
                     one exactly, so this model has no transformers equivalent",
                    b_q[at]
                )));
            }
        }
    }
    Ok(Plan {
        family,
        config: config_json(family, cfg),
        tensors,
    })
}

/// Refuses configurations the target family cannot express. (GPT-2 without q/k/v biases is
/// expressed by zero biases in c_attn; GPT-Neo's missing score scale by folding.)
fn check_expressible(family: Family, cfg: &ModelConfig) -> Result<()> {
    let refuse = |why: &str| {
        Err(EngineError::invalid(format!(
            "this model cannot be exported as {}: {why}",
            family.name()
        )))
    };
    if cfg.d_attn() != cfg.d_model {
        return refuse("its attention width differs from its model width");
    }
    match family {
        Family::Opt => {
            if !cfg.scale_attn || !cfg.qkv_bias || cfg.position_offset != 2 {
                return refuse("OPT scales scores, has q/k/v biases and offsets positions by 2");
            }
        }
        _ => {
            if cfg.ln_placement != LnPlacement::Pre
                || cfg.d_embed.is_some()
                || cfg.position_offset != 0
            {
                return refuse(
                    "only OPT has post-LayerNorm layers, projected embeddings or offset positions",
                );
            }
        }
    }
    Ok(())
}

impl Planned {
    /// Values `range` of a tensor made element by element (copied or scaled), else None: such
    /// a tensor is written in pieces of `PIECE` values.
    pub fn piece(
        &self,
        params: &mut dyn Canonical,
        range: std::ops::Range<usize>,
    ) -> Option<Result<Vec<f32>>> {
        match &self.recipe {
            Recipe::Copy(name) => Some(params.fetch_range(name, range)),
            Recipe::Scaled(name, k) => Some(params.fetch_range(name, range).map(|mut v| {
                v.iter_mut().for_each(|x| *x *= k);
                v
            })),
            _ => None,
        }
    }

    /// Makes this tensor's values from the model's canonical tensors.
    pub fn values(&self, params: &mut dyn Canonical, cfg: &ModelConfig) -> Result<Vec<f32>> {
        let numel: usize = self.shape.iter().product();
        let (d, da) = (cfg.d_model, cfg.d_attn());
        let values = match &self.recipe {
            Recipe::Copy(name) => {
                let mut values = params.fetch(name)?;
                values.truncate(numel);
                values
            }
            Recipe::Transpose(name) => {
                let (rows, cols) = (self.shape[1], self.shape[0]);
                crate::kernels::elementwise::transpose(&params.fetch(name)?, rows, cols)?
            }
            Recipe::Scaled(name, k) => {
                let mut values = params.fetch(name)?;
                values.iter_mut().for_each(|v| *v *= k);
                values
            }
            Recipe::FoldedOutBias(i) => {
                let b_o = params.fetch(&format!("layers.{i}.attn.out_proj.bias"))?;
                let w_o = params.fetch(&format!("layers.{i}.attn.out_proj.weight"))?;
                let b_v = params.fetch(&format!("layers.{i}.attn.v_proj.bias"))?;
                b_o.iter()
                    .zip(w_o.chunks_exact(da))
                    .map(|(&b, row)| {
                        let dot: f64 = row
                            .iter()
                            .zip(&b_v)
                            .map(|(&w, &v)| w as f64 * v as f64)
                            .sum();
                        (b as f64 + dot) as f32
                    })
                    .collect()
            }
            Recipe::FusedQkv { layer, bias } => {
                let mut part = |q: &str, kind: &str| -> Result<Vec<f32>> {
                    let name = format!("layers.{layer}.attn.{q}.{kind}");
                    if kind == "bias" && !cfg.qkv_bias {
                        return Ok(vec![0.0; da]);
                    }
                    params.fetch(&name)
                };
                if *bias {
                    let mut out = Vec::with_capacity(3 * da);
                    for q in ["q_proj", "k_proj", "v_proj"] {
                        out.extend(part(q, "bias")?);
                    }
                    out
                } else {
                    // [3·da, d] (Linear, q | k | v row blocks) → [d, 3·da] (Conv1D).
                    let mut stacked = Vec::with_capacity(3 * da * d);
                    for q in ["q_proj", "k_proj", "v_proj"] {
                        stacked.extend(part(q, "weight")?);
                    }
                    crate::kernels::elementwise::transpose(&stacked, 3 * da, d)?
                }
            }
        };
        if values.len() != numel {
            return Err(EngineError::Internal(format!(
                "export of \"{}\" made {} values for shape {:?}",
                self.name,
                values.len(),
                self.shape
            )));
        }
        Ok(values)
    }
}

/// The `config.json` that makes `transformers` build this model in `family`'s architecture.
/// Dropout is off (an exported model is for inference or fine-tuning with the caller's own
/// settings).
pub fn config_json(family: Family, cfg: &ModelConfig) -> Value {
    let act = cfg.activation.name();
    let mut config = match family {
        Family::Opt => json!({
            "model_type": "opt",
            "architectures": ["OPTForCausalLM"],
            "hidden_size": cfg.d_model,
            "num_attention_heads": cfg.n_head,
            "num_hidden_layers": cfg.n_layer,
            "ffn_dim": cfg.d_ff,
            "max_position_embeddings": cfg.n_positions,
            "vocab_size": cfg.vocab,
            "word_embed_proj_dim": cfg.d_embed(),
            "do_layer_norm_before": cfg.ln_placement == LnPlacement::Pre,
            "activation_function": act,
            "enable_bias": true,
            "layer_norm_elementwise_affine": true,
            "tie_word_embeddings": cfg.tied_head,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "activation_dropout": 0.0,
            "layerdrop": 0.0,
            "pad_token_id": 1,
            "bos_token_id": 2,
            "eos_token_id": 2,
            "dtype": "float32",
        }),
        Family::GptNeo => {
            let kinds: Vec<&str> = (0..cfg.n_layer)
                .map(|i| match cfg.layer_kind(i) {
                    AttnKind::Dense => "global",
                    AttnKind::Local => "local",
                })
                .collect();
            // GPT-Neo expands attention_types ([[kinds], repeat] pairs) into attention_layers.
            let types: Vec<Value> = kinds.iter().map(|k| json!([[k], 1])).collect();
            json!({
                "model_type": "gpt_neo",
                "architectures": ["GPTNeoForCausalLM"],
                "hidden_size": cfg.d_model,
                "num_heads": cfg.n_head,
                "num_layers": cfg.n_layer,
                "intermediate_size": cfg.d_ff,
                "max_position_embeddings": cfg.n_positions,
                "vocab_size": cfg.vocab,
                "window_size": cfg.local_window.unwrap_or(cfg.n_positions),
                "attention_types": types,
                "attention_layers": kinds,
                "activation_function": act,
                "layer_norm_epsilon": cfg.ln_eps,
                "tie_word_embeddings": cfg.tied_head,
                "embed_dropout": 0.0,
                "resid_dropout": 0.0,
                "attention_dropout": 0.0,
                "dtype": "float32",
            })
        }
        Family::Gpt2 | Family::Cerebras | Family::Gpt3 | Family::Megatron(_) => json!({
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "n_embd": cfg.d_model,
            "n_head": cfg.n_head,
            "n_layer": cfg.n_layer,
            "n_inner": cfg.d_ff,
            "n_positions": cfg.n_positions,
            "vocab_size": cfg.vocab,
            "activation_function": act,
            "layer_norm_epsilon": cfg.ln_eps,
            "scale_attn_weights": cfg.scale_attn,
            "tie_word_embeddings": cfg.tied_head,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "dtype": "float32",
        }),
    };
    // GPT-2's end-of-text token, where the vocabulary has it.
    if family != Family::Opt && cfg.vocab > 50256 {
        config["bos_token_id"] = json!(50256);
        config["eos_token_id"] = json!(50256);
    }
    config
}

impl Canonical for super::TensorMap {
    fn fetch(&mut self, name: &str) -> Result<Vec<f32>> {
        self.get(name)
            .map(|(_, values)| values.clone())
            .ok_or_else(|| EngineError::data(format!("the model has no parameter \"{name}\"")))
    }
}

/// A model's packed weight buffer (`weights::packing`) read by canonical name.
pub struct Packed<'a> {
    data: &'a [f32],
    ranges: std::collections::HashMap<String, std::ops::Range<usize>>,
}

impl<'a> Packed<'a> {
    pub fn new(cfg: &ModelConfig, data: &'a [f32]) -> Self {
        Self {
            data,
            ranges: crate::model::weights::packed_tensors(cfg)
                .into_iter()
                .collect(),
        }
    }
}

impl Canonical for Packed<'_> {
    fn fetch(&mut self, name: &str) -> Result<Vec<f32>> {
        let whole = self.ranges.get(name).map_or(0..0, |r| 0..r.len());
        self.fetch_range(name, whole)
    }

    fn fetch_range(&mut self, name: &str, range: std::ops::Range<usize>) -> Result<Vec<f32>> {
        self.ranges
            .get(name)
            .filter(|r| range.end <= r.len())
            .and_then(|r| self.data.get(r.start + range.start..r.start + range.end))
            .map(<[f32]>::to_vec)
            .ok_or_else(|| EngineError::data(format!("the model has no parameter \"{name}\"")))
    }
}

/// Bytes of a planned tensor's float32 data.
pub fn data_bytes(t: &Planned) -> u64 {
    4 * t.shape.iter().product::<usize>() as u64
}

/// What `write_safetensors` wrote.
#[derive(Debug, Default)]
pub struct Written {
    pub bytes: u64,
    /// Manifest entries of the file's tensors, when asked for (see `manifest`).
    pub entries: Vec<super::manifest::Entry>,
}

/// Writes `tensors` as one float32 safetensors file, making each tensor's values only when
/// it is written; `between` runs before each tensor (a cancel check). With `manifest_file`,
/// also returns a manifest entry (byte range and sha256) per tensor, naming that file.
pub fn write_safetensors(
    out: &mut dyn std::io::Write,
    tensors: &[Planned],
    params: &mut dyn Canonical,
    cfg: &ModelConfig,
    manifest_file: Option<&str>,
    between: &mut dyn FnMut() -> Result<()>,
) -> Result<Written> {
    write_in_pieces(out, tensors, params, cfg, manifest_file, between, PIECE)
}

fn write_in_pieces(
    out: &mut dyn std::io::Write,
    tensors: &[Planned],
    params: &mut dyn Canonical,
    cfg: &ModelConfig,
    manifest_file: Option<&str>,
    between: &mut dyn FnMut() -> Result<()>,
    piece: usize,
) -> Result<Written> {
    let io = |e: std::io::Error| EngineError::Io(format!("could not write the checkpoint: {e}"));
    let entries: Vec<(&str, &[usize])> = tensors
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice()))
        .collect();
    let header = super::safetensors::f32_header(&entries)?;
    out.write_all(&header).map_err(io)?;
    let mut written = Written {
        bytes: header.len() as u64,
        entries: Vec::new(),
    };
    for t in tensors {
        let mut digest = Sha256::new();
        let mut length = 0u64;
        let mut emit = |values: &[f32]| -> Result<()> {
            let bytes = crate::tensor::le_bytes(values);
            out.write_all(&bytes).map_err(io)?;
            if manifest_file.is_some() {
                digest.update(&*bytes);
            }
            length += bytes.len() as u64;
            Ok(())
        };
        let numel: usize = t.shape.iter().product();
        for start in (0..numel).step_by(piece) {
            between()?;
            let range = start..(start + piece).min(numel);
            match t.piece(params, range) {
                Some(piece) => emit(&piece?)?,
                None => {
                    emit(&t.values(params, cfg)?)?;
                    break;
                }
            }
        }
        if let Some(file) = manifest_file {
            written.entries.push(super::manifest::Entry {
                name: t.name.clone(),
                dtype: "F32".into(),
                shape: t.shape.clone(),
                file: file.to_string(),
                offset: written.bytes,
                length,
                sha256: super::manifest::hex(&digest.finalize()),
            });
        }
        written.bytes += length;
    }
    Ok(written)
}

/// Splits the plan, in order, into shards of at most `max_bytes` of tensor data (a larger
/// tensor gets a shard of its own), as `save_pretrained`'s max_shard_size does.
pub fn shards(tensors: &[Planned], max_bytes: u64) -> Vec<&[Planned]> {
    let mut out = Vec::new();
    let (mut start, mut size) = (0, 0u64);
    for (i, t) in tensors.iter().enumerate() {
        let n = data_bytes(t);
        if i > start && size + n > max_bytes {
            out.push(&tensors[start..i]);
            (start, size) = (i, 0);
        }
        size += n;
    }
    if start < tensors.len() {
        out.push(&tensors[start..]);
    }
    out
}

/// Hugging Face's name for shard `k` (from 1) of `n`.
pub fn shard_file_name(k: usize, n: usize) -> String {
    format!("model-{k:05}-of-{n:05}.safetensors")
}

/// `model.safetensors.index.json` for `shards` named by `shard_file_name`.
pub fn shard_index(shards: &[&[Planned]]) -> Value {
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for (k, shard) in shards.iter().enumerate() {
        for t in *shard {
            weight_map.insert(t.name.clone(), shard_file_name(k + 1, shards.len()).into());
            total += data_bytes(t);
        }
    }
    json!({ "metadata": { "total_size": total }, "weight_map": weight_map })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::tiny_gpt3;
    use crate::model::init::init_params;

    #[test]
    fn pieces_write_the_same_file_and_manifest() {
        let cfg = tiny_gpt3();
        let mut params = init_params(&cfg, 2).unwrap();
        let plan = plan(Family::Gpt3, &cfg, &mut params).unwrap();
        let write = |piece: usize, params: &mut crate::formats::TensorMap| {
            let mut bytes = Vec::new();
            let w = write_in_pieces(
                &mut bytes,
                &plan.tensors,
                params,
                &cfg,
                Some("m"),
                &mut || Ok(()),
                piece,
            )
            .unwrap();
            (bytes, w.entries)
        };
        let (whole, whole_entries) = write(usize::MAX, &mut params);
        let (pieces, piece_entries) = write(1000, &mut params);
        assert!(whole == pieces);
        assert_eq!(whole_entries, piece_entries);
    }
}
