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
//!
//! Rotary position embeddings, parallel residuals and bias-free output projections exist only
//! in GPT-NeoX's and GPT-J's layouts: such models go back to those families alone.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::hf_config::{Family, QkvOrder};
use super::names::{layout, Rule};
use super::PIECE;
use crate::error::{EngineError, Result};
use crate::model::config::{Residual, RotaryPairing};
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
    /// GPT-NeoX's fused query_key_value of a layer: weight [3·d_attn, d] (Linear) or bias
    /// [3·d_attn], rows in [heads, 3, d_head] order.
    FusedHeadSplit { layer: usize, bias: bool },
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
            "lm_head.bias" => vec![vocab],
            _ => shape,
        };
        let name = if canonical.starts_with("lm_head.") {
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
                    let bias = !suffix.ends_with("weight");
                    if family != Family::GptNeoX {
                        return Err(EngineError::Internal(
                            "no export family but GPT-NeoX fuses QKV by heads".into(),
                        ));
                    }
                    if bias && !cfg.qkv_bias {
                        continue;
                    }
                    Planned {
                        name: name(suffix),
                        shape: if bias { vec![3 * da] } else { vec![3 * da, d] },
                        recipe: Recipe::FusedHeadSplit { layer: i, bias },
                    }
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
                    if shape_of(&canonical(t)).is_empty() {
                        continue; // a bias this configuration does not have
                    }
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
    let dense = (0..cfg.n_layer).all(|i| cfg.layer_kind(i) == AttnKind::Dense);
    let rotary = cfg.rotary.as_ref();
    match family {
        Family::GptNeoX => {
            let pct_ok = rotary.is_some_and(|r| {
                r.pairing == RotaryPairing::Halves
                    && (cfg.d_head as f64 * (r.dims as f64 / cfg.d_head as f64)) as usize == r.dims
            });
            if !pct_ok
                || cfg.residual == Residual::ParallelOneNorm
                || cfg.qkv_bias != cfg.out_proj_bias
                || cfg.head_bias
                || !cfg.scale_attn
                || !dense
            {
                return refuse(
                    "GPT-NeoX has rotary embeddings on halves, an LN2, attention biases on all \
                     or none of q/k/v/output, no output-layer bias and dense scaled attention",
                );
            }
        }
        Family::GptJ => {
            let rotary_ok = rotary
                .is_some_and(|r| r.pairing == RotaryPairing::Interleaved && r.base == 10000.0);
            if !rotary_ok
                || cfg.residual != Residual::ParallelOneNorm
                || cfg.qkv_bias
                || cfg.out_proj_bias
                || !cfg.head_bias
                || !cfg.scale_attn
                || !dense
            {
                return refuse(
                    "GPT-J has interleaved rotary embeddings at base 10000, one LayerNorm \
                     feeding attention and MLP in parallel, bias-free attention, an output-layer \
                     bias and dense scaled attention",
                );
            }
        }
        _ => {
            if rotary.is_some()
                || cfg.residual != Residual::Sequential
                || !cfg.out_proj_bias
                || cfg.head_bias
            {
                return refuse(
                    "only GPT-NeoX and GPT-J have rotary embeddings, parallel residuals, \
                     bias-free output projections or output-layer biases",
                );
            }
        }
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
            Recipe::FusedHeadSplit { layer, bias } => {
                let width = if *bias { 1 } else { d };
                let parts = ["q_proj", "k_proj", "v_proj"]
                    .iter()
                    .map(|q| {
                        let kind = if *bias { "bias" } else { "weight" };
                        params.fetch(&format!("layers.{layer}.attn.{q}.{kind}"))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let (heads, dh) = (cfg.n_head, cfg.d_head);
                let mut out = vec![0.0; 3 * da * width];
                for (part, values) in parts.iter().enumerate() {
                    for (r, row) in values.chunks_exact(width).enumerate() {
                        let at = QkvOrder::HeadSplit.fused_row(part, r / dh, r % dh, heads, dh);
                        out[at * width..(at + 1) * width].copy_from_slice(row);
                    }
                }
                out
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
        Family::GptNeoX => {
            let r = cfg.rotary.unwrap_or(crate::model::config::Rotary {
                dims: cfg.d_head,
                base: 10000.0,
                pairing: RotaryPairing::Halves,
            });
            let pct = r.dims as f64 / cfg.d_head as f64;
            // transformers 5 reads rope_parameters; earlier versions rotary_pct and
            // rotary_emb_base.
            json!({
                "model_type": "gpt_neox",
                "architectures": ["GPTNeoXForCausalLM"],
                "hidden_size": cfg.d_model,
                "num_attention_heads": cfg.n_head,
                "num_hidden_layers": cfg.n_layer,
                "intermediate_size": cfg.d_ff,
                "max_position_embeddings": cfg.n_positions,
                "vocab_size": cfg.vocab,
                "hidden_act": act,
                "rotary_pct": pct,
                "rotary_emb_base": r.base,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": r.base,
                    "partial_rotary_factor": pct,
                },
                "use_parallel_residual": cfg.residual == Residual::ParallelTwoNorms,
                "attention_bias": cfg.qkv_bias,
                "layer_norm_eps": cfg.ln_eps,
                "tie_word_embeddings": cfg.tied_head,
                "attention_dropout": 0.0,
                "hidden_dropout": 0.0,
                "dtype": "float32",
            })
        }
        Family::GptJ => json!({
            "model_type": "gptj",
            "architectures": ["GPTJForCausalLM"],
            "n_embd": cfg.d_model,
            "n_head": cfg.n_head,
            "n_layer": cfg.n_layer,
            "n_inner": cfg.d_ff,
            "n_positions": cfg.n_positions,
            "vocab_size": cfg.vocab,
            "rotary_dim": cfg.rotary.map_or(cfg.d_head, |r| r.dims),
            "activation_function": act,
            "layer_norm_epsilon": cfg.ln_eps,
            "tie_word_embeddings": cfg.tied_head,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "dtype": "float32",
        }),
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

/// Writes `tensors` as one float32 safetensors file, making each tensor's values only when
/// it is written; `between` runs before each chunk (a cancel check). Returns the bytes
/// written. (A folder export, whose manifest needs each tensor's checksum, is `Folder`.)
pub fn write_safetensors(
    out: &mut dyn std::io::Write,
    tensors: &[Planned],
    params: &mut dyn Canonical,
    cfg: &ModelConfig,
    between: &mut dyn FnMut() -> Result<()>,
) -> Result<u64> {
    write_in_pieces(out, tensors, params, cfg, between, PIECE)
}

fn write_in_pieces(
    out: &mut dyn std::io::Write,
    tensors: &[Planned],
    params: &mut dyn Canonical,
    cfg: &ModelConfig,
    between: &mut dyn FnMut() -> Result<()>,
    piece: usize,
) -> Result<u64> {
    let io = |e: std::io::Error| EngineError::Io(format!("could not write the checkpoint: {e}"));
    let mut stream = FileStream::new(0..tensors.len(), None);
    loop {
        between()?;
        match stream.next_chunk(tensors, params, cfg, piece)? {
            Some(chunk) => out.write_all(&chunk.bytes()).map_err(io)?,
            None => break,
        }
    }
    Ok(stream.bytes)
}

/// Bytes of an export as they are made: values still in float32 (a piece of a tensor, written
/// out without another copy) or already bytes (a header, a JSON file).
pub enum Chunk {
    Values(Vec<f32>),
    Bytes(Vec<u8>),
}

impl Chunk {
    pub fn bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            Chunk::Values(v) => crate::tensor::le_bytes(v),
            Chunk::Bytes(b) => std::borrow::Cow::Borrowed(b),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Chunk::Values(v) => 4 * v.len(),
            Chunk::Bytes(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One safetensors file of an export (tensors `tensors` of a plan) made a chunk at a time:
/// its header, then each tensor's values — a copied or scaled tensor in ranges of at most the
/// values asked for, any other whole (its layout changes, so it is made at once). With a
/// manifest file name, each tensor's manifest entry is recorded as it ends.
struct FileStream {
    tensors: std::ops::Range<usize>,
    manifest_file: Option<String>,
    header_done: bool,
    /// The tensor being made and how many of its values are made.
    tensor: usize,
    at: usize,
    digest: Sha256,
    length: u64,
    /// Bytes of the file made so far.
    bytes: u64,
    entries: Vec<super::manifest::Entry>,
}

impl FileStream {
    fn new(tensors: std::ops::Range<usize>, manifest_file: Option<String>) -> Self {
        Self {
            tensor: tensors.start,
            tensors,
            manifest_file,
            header_done: false,
            at: 0,
            digest: Sha256::new(),
            length: 0,
            bytes: 0,
            entries: Vec::new(),
        }
    }

    /// The file's next chunk (at most `max_values` values of a tensor made in pieces), or
    /// None once the file is complete. `all` is the plan's tensor list.
    fn next_chunk(
        &mut self,
        all: &[Planned],
        params: &mut dyn Canonical,
        cfg: &ModelConfig,
        max_values: usize,
    ) -> Result<Option<Chunk>> {
        if !self.header_done {
            let entries: Vec<(&str, &[usize])> = all[self.tensors.clone()]
                .iter()
                .map(|t| (t.name.as_str(), t.shape.as_slice()))
                .collect();
            let header = super::safetensors::f32_header(&entries)?;
            self.header_done = true;
            self.bytes = header.len() as u64;
            return Ok(Some(Chunk::Bytes(header)));
        }
        while self.tensor < self.tensors.end {
            let t = &all[self.tensor];
            let numel: usize = t.shape.iter().product();
            if self.at < numel {
                let range = self.at..self.at.saturating_add(max_values.max(1)).min(numel);
                let values = match t.piece(params, range.clone()) {
                    Some(piece) => {
                        self.at = range.end;
                        piece?
                    }
                    None => {
                        self.at = numel;
                        t.values(params, cfg)?
                    }
                };
                let chunk = Chunk::Values(values);
                if self.manifest_file.is_some() {
                    self.digest.update(&*chunk.bytes());
                }
                self.length += chunk.len() as u64;
                return Ok(Some(chunk));
            }
            if let Some(file) = &self.manifest_file {
                let digest = std::mem::take(&mut self.digest);
                self.entries.push(super::manifest::Entry {
                    name: t.name.clone(),
                    dtype: "F32".into(),
                    shape: t.shape.clone(),
                    file: file.clone(),
                    offset: self.bytes,
                    length: self.length,
                    sha256: super::manifest::hex(&digest.finalize()),
                });
            }
            self.bytes += self.length;
            (self.tensor, self.at, self.length) = (self.tensor + 1, 0, 0);
        }
        Ok(None)
    }
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

/// The index file of a sharded folder export.
pub const INDEX: &str = "model.safetensors.index.json";
/// The tensor manifest of a folder export.
pub const MANIFEST: &str = "model.manifest.jsonl";

/// What one file of a folder export holds.
#[derive(Clone, Debug)]
enum Content {
    /// Bytes known when the export is planned (config.json, the shard index).
    Fixed(Vec<u8>),
    /// A safetensors file of plan tensors `range`.
    Weights(std::ops::Range<usize>),
    /// The manifest of every tensor written before it.
    Manifest,
}

/// A folder export — config.json, model.safetensors or shards of at most `max_shard` bytes
/// with model.safetensors.index.json, and model.manifest.jsonl, a folder `from_pretrained`
/// loads — made a file at a time and a chunk at a time within a file, so a writer holds one
/// chunk (at most one tensor) and never the whole model. The path form writes its chunks to
/// files; `Pieces` cuts them into pieces of a bounded size for a client.
pub struct Folder {
    plan: Plan,
    cfg: ModelConfig,
    files: Vec<(String, Content)>,
    /// The file being made (None before the first); the next file to make.
    current: Option<usize>,
    next: usize,
    stream: Option<FileStream>,
    fixed_done: bool,
    entries: Vec<super::manifest::Entry>,
}

fn pretty(json: &Value) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(json).map_err(|e| EngineError::Internal(format!("JSON: {e}")))
}

impl Folder {
    pub fn new(plan: Plan, cfg: &ModelConfig, max_shard: u64) -> Result<Self> {
        let mut files = vec![(
            "config.json".to_string(),
            Content::Fixed(pretty(&plan.config)?),
        )];
        let shards = shards(&plan.tensors, max_shard);
        let mut start = 0;
        for (k, shard) in shards.iter().enumerate() {
            let name = if shards.len() == 1 {
                "model.safetensors".to_string()
            } else {
                shard_file_name(k + 1, shards.len())
            };
            files.push((name, Content::Weights(start..start + shard.len())));
            start += shard.len();
        }
        if shards.len() > 1 {
            files.push((
                INDEX.to_string(),
                Content::Fixed(pretty(&shard_index(&shards))?),
            ));
        }
        files.push((MANIFEST.to_string(), Content::Manifest));
        Ok(Self {
            plan,
            cfg: cfg.clone(),
            files,
            current: None,
            next: 0,
            stream: None,
            fixed_done: false,
            entries: Vec::new(),
        })
    }

    /// The names of the folder's files, in the order they are made.
    pub fn file_names(&self) -> impl Iterator<Item = &str> {
        self.files.iter().map(|(name, _)| name.as_str())
    }

    /// The weight files: safetensors files and the shard index.
    pub fn weight_files(&self) -> Vec<String> {
        self.files
            .iter()
            .filter(|(name, c)| matches!(c, Content::Weights(_)) || name == INDEX)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Moves on to the next file and returns its name, or None after the last. The previous
    /// file must be complete (`next_chunk` returned None).
    pub fn next_file(&mut self) -> Option<&str> {
        self.current = Some(self.next).filter(|&k| k < self.files.len());
        self.next = (self.next + 1).min(self.files.len());
        let (name, content) = &self.files[self.current?];
        self.fixed_done = false;
        self.stream = match content {
            Content::Weights(range) => Some(FileStream::new(range.clone(), Some(name.clone()))),
            _ => None,
        };
        Some(name)
    }

    /// The current file's next chunk (a tensor made in pieces in at most `max_values`
    /// values), or None once the file is complete. Every file has a first chunk, an empty
    /// one for an empty file.
    pub fn next_chunk(
        &mut self,
        params: &mut dyn Canonical,
        max_values: usize,
    ) -> Result<Option<Chunk>> {
        let Some((_, content)) = self.current.map(|k| &self.files[k]) else {
            return Ok(None);
        };
        if let Some(stream) = &mut self.stream {
            let chunk = stream.next_chunk(&self.plan.tensors, params, &self.cfg, max_values)?;
            if chunk.is_none() {
                self.entries.append(&mut stream.entries);
            }
            return Ok(chunk);
        }
        if std::mem::replace(&mut self.fixed_done, true) {
            return Ok(None);
        }
        Ok(Some(Chunk::Bytes(match content {
            Content::Fixed(bytes) => bytes.clone(),
            Content::Manifest => super::manifest::to_jsonl(&self.entries).into_bytes(),
            Content::Weights(_) => unreachable!("weight files have a stream"),
        })))
    }
}

/// One piece of a folder export: `data` are the bytes of `file` from byte `offset`.
#[derive(Clone, Debug, PartialEq)]
pub struct Piece {
    pub file: String,
    pub offset: u64,
    pub data: Vec<u8>,
}

/// A folder export as pieces of at most `max_bytes` bytes, made when asked for: file by file,
/// each file's pieces in order from offset 0 and contiguous, every piece but a file's last
/// exactly `max_bytes` long (an empty file is one empty piece). Memory held between pieces:
/// less than a piece, or the rest of a tensor that is made whole (transposed, fused).
pub struct Pieces {
    folder: Folder,
    max_bytes: usize,
    pending: Vec<u8>,
    /// Bytes of `pending` already handed out.
    taken: usize,
    /// The current file's offset of the next piece; whether its chunks are all in `pending`;
    /// whether it has had a piece.
    offset: u64,
    file_done: bool,
    file_emitted: bool,
    file: Option<String>,
}

impl Pieces {
    pub fn new(folder: Folder, max_bytes: usize) -> Result<Self> {
        if max_bytes == 0 {
            return Err(EngineError::invalid("pieces must hold at least one byte"));
        }
        Ok(Self {
            folder,
            max_bytes,
            pending: Vec::new(),
            taken: 0,
            offset: 0,
            file_done: true,
            file_emitted: true,
            file: None,
        })
    }

    /// The next piece, or None after the last; `between` runs before each chunk is made (a
    /// cancel check).
    pub fn next_piece(
        &mut self,
        params: &mut dyn Canonical,
        between: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Option<Piece>> {
        loop {
            while !self.file_done && self.pending.len() - self.taken < self.max_bytes {
                let missing = self.max_bytes - (self.pending.len() - self.taken);
                between()?;
                match self
                    .folder
                    .next_chunk(params, missing.div_ceil(4).min(PIECE))?
                {
                    Some(chunk) => {
                        self.pending.drain(..self.taken);
                        self.taken = 0;
                        let bytes = chunk.bytes();
                        self.pending.try_reserve(bytes.len()).map_err(|_| {
                            EngineError::too_large("an export piece does not fit in memory")
                        })?;
                        self.pending.extend_from_slice(&bytes);
                    }
                    None => self.file_done = true,
                }
            }
            let available = self.pending.len() - self.taken;
            if available > 0 || !self.file_emitted {
                let n = available.min(self.max_bytes);
                let data = if self.taken == 0 && n == self.pending.len() {
                    std::mem::take(&mut self.pending)
                } else {
                    let data = self.pending[self.taken..self.taken + n].to_vec();
                    self.taken += n;
                    if self.taken == self.pending.len() {
                        // A whole tensor's buffer goes once it is handed out.
                        self.pending = Vec::new();
                        self.taken = 0;
                    }
                    data
                };
                let piece = Piece {
                    file: self.file.clone().unwrap_or_default(),
                    offset: self.offset,
                    data,
                };
                self.offset += n as u64;
                self.file_emitted = true;
                return Ok(Some(piece));
            }
            let Some(name) = self.folder.next_file() else {
                return Ok(None);
            };
            self.file = Some(name.to_string());
            (self.offset, self.file_done, self.file_emitted) = (0, false, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::tiny_gpt3;
    use crate::model::init::init_params;
    use std::collections::BTreeMap;

    #[test]
    fn pieces_write_the_same_file() {
        let cfg = tiny_gpt3();
        let mut params = init_params(&cfg, 2).unwrap();
        let plan = plan(Family::Gpt3, &cfg, &mut params).unwrap();
        let write = |piece: usize, params: &mut crate::formats::TensorMap| {
            let mut bytes = Vec::new();
            let n = write_in_pieces(
                &mut bytes,
                &plan.tensors,
                params,
                &cfg,
                &mut || Ok(()),
                piece,
            )
            .unwrap();
            assert_eq!(n, bytes.len() as u64);
            bytes
        };
        assert!(write(usize::MAX, &mut params) == write(1000, &mut params));
    }

    /// Manifest entries of the safetensors file `name` computed from its bytes alone: each
    /// tensor's byte range from the header, and the sha256 of those bytes.
    fn manifest_of(name: &str, bytes: &[u8]) -> Vec<super::super::manifest::Entry> {
        let mut files =
            super::super::checkpoint::Blobs([(name.to_string(), bytes)].into_iter().collect());
        super::super::checkpoint::safetensors_tensors(&mut files, name)
            .unwrap()
            .into_iter()
            .map(|s| {
                let range = s.offset as usize..(s.offset + s.length) as usize;
                super::super::manifest::Entry {
                    sha256: super::super::manifest::sha256_hex(&bytes[range]),
                    name: s.name,
                    dtype: "F32".into(),
                    shape: s.shape,
                    file: name.to_string(),
                    offset: s.offset,
                    length: s.length,
                }
            })
            .collect()
    }

    /// The folder the path form writes, made file by file with `write_safetensors` (the
    /// reference the pieces are checked against).
    fn folder_files(
        plan: &Plan,
        cfg: &ModelConfig,
        params: &mut dyn Canonical,
        max_shard: u64,
    ) -> Vec<(String, Vec<u8>)> {
        let mut files = vec![(
            "config.json".to_string(),
            serde_json::to_vec_pretty(&plan.config).unwrap(),
        )];
        let shards = shards(&plan.tensors, max_shard);
        let mut entries = Vec::new();
        for (k, shard) in shards.iter().enumerate() {
            let name = if shards.len() == 1 {
                "model.safetensors".to_string()
            } else {
                shard_file_name(k + 1, shards.len())
            };
            let mut bytes = Vec::new();
            write_safetensors(&mut bytes, shard, params, cfg, &mut || Ok(())).unwrap();
            entries.extend(manifest_of(&name, &bytes));
            files.push((name, bytes));
        }
        if shards.len() > 1 {
            let index = serde_json::to_vec_pretty(&shard_index(&shards)).unwrap();
            files.push((INDEX.to_string(), index));
        }
        let manifest = super::super::manifest::to_jsonl(&entries);
        files.push((MANIFEST.to_string(), manifest.into_bytes()));
        files
    }

    #[test]
    fn a_folder_in_pieces_is_the_folder_the_path_form_writes() {
        // A banded model: its export has copied, scaled, transposed and fused tensors.
        let mut cfg = tiny_gpt3();
        cfg.attention_pattern = vec![AttnKind::Dense, AttnKind::Local];
        cfg.local_window = Some(4);
        let mut params = init_params(&cfg, 5).unwrap();
        let plan = plan(Family::Gpt3, &cfg, &mut params).unwrap();
        let largest = plan.tensors.iter().map(data_bytes).max().unwrap();
        let total: u64 = plan.tensors.iter().map(data_bytes).sum();
        for max_shard in [u64::MAX, total / 3, 1] {
            let want = folder_files(&plan, &cfg, &mut params, max_shard);
            if max_shard < total {
                assert!(want.iter().any(|(f, _)| f == INDEX), "sharded");
            }
            // Pieces that split floats, the header and tensors, a tensor's exact size, one
            // piece per file.
            for max_bytes in [1, 3, 7, 64, 1000, 4097, largest as usize, usize::MAX / 2] {
                let folder = Folder::new(plan.clone(), &cfg, max_shard).unwrap();
                assert_eq!(
                    folder.file_names().collect::<Vec<_>>(),
                    want.iter().map(|(f, _)| f.as_str()).collect::<Vec<_>>()
                );
                let mut pieces = Pieces::new(folder, max_bytes).unwrap();
                let mut got: Vec<(String, Vec<u8>)> = Vec::new();
                let mut calls = 0;
                while let Some(p) = pieces
                    .next_piece(&mut params, &mut || {
                        calls += 1;
                        Ok(())
                    })
                    .unwrap()
                {
                    assert!(p.data.len() <= max_bytes && !p.data.is_empty());
                    match got.last_mut() {
                        Some((file, bytes)) if *file == p.file => {
                            assert_eq!(p.offset, bytes.len() as u64, "contiguous");
                            // Only a file's last piece is short.
                            assert!(bytes.len() % max_bytes == 0);
                            bytes.extend(p.data);
                        }
                        _ => {
                            assert_eq!(p.offset, 0);
                            got.push((p.file, p.data));
                        }
                    }
                }
                assert!(calls > 0);
                assert_eq!(got.len(), want.len());
                for ((gf, gb), (wf, wb)) in got.iter().zip(&want) {
                    assert_eq!(gf, wf);
                    assert!(gb == wb, "{gf} differs with pieces of {max_bytes} bytes");
                }
                assert!(pieces
                    .next_piece(&mut params, &mut || Ok(()))
                    .unwrap()
                    .is_none());
            }
        }
    }

    #[test]
    fn folder_chunks_name_every_file_once_and_pieces_stop_on_errors() {
        let cfg = tiny_gpt3();
        let mut params = init_params(&cfg, 1).unwrap();
        let plan = plan(Family::Gpt3, &cfg, &mut params).unwrap();
        let mut folder = Folder::new(plan.clone(), &cfg, 1).unwrap();
        let mut files = BTreeMap::new();
        while let Some(name) = folder.next_file().map(str::to_string) {
            let mut bytes = Vec::new();
            while let Some(chunk) = folder.next_chunk(&mut params, 10).unwrap() {
                bytes.extend_from_slice(&chunk.bytes());
            }
            assert!(files.insert(name, bytes).is_none());
        }
        assert!(folder.next_file().is_none() && folder.next_file().is_none());
        let want: BTreeMap<_, _> = folder_files(&plan, &cfg, &mut params, 1)
            .into_iter()
            .collect();
        assert!(files == want);
        assert!(folder
            .weight_files()
            .iter()
            .all(|f| f == INDEX || f.ends_with(".safetensors")));

        assert!(Pieces::new(Folder::new(plan.clone(), &cfg, 1).unwrap(), 0).is_err());
        let mut pieces = Pieces::new(Folder::new(plan, &cfg, 1).unwrap(), 100).unwrap();
        let err = pieces
            .next_piece(&mut params, &mut || Err(EngineError::Cancelled))
            .unwrap_err();
        assert_eq!(err, EngineError::Cancelled);
        // A missing tensor is an error of the piece that needs it.
        let mut empty = crate::formats::TensorMap::new();
        let mut failed = false;
        for _ in 0..100 {
            match pieces.next_piece(&mut empty, &mut || Ok(())) {
                Err(e) => {
                    assert!(e.to_string().contains("no parameter"), "{e}");
                    failed = true;
                    break;
                }
                Ok(p) => assert!(p.is_some()),
            }
        }
        assert!(failed);
    }
}
