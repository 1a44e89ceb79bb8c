//! A model's weights laid out for the forward pass, packed into one buffer in a fixed order
//! (`packing`): per layer, q/k/v are consecutive, so together they form one [3·d_attn, d_model]
//! matrix and a layer's projection is one product.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::config::{LnPlacement, ModelConfig};
use super::dtype::{DType, Layout};
use super::storage::{Cursor, Param, Storage};
use crate::error::{EngineError, Result};
use crate::formats::TensorMap;

/// LayerNorm gain and bias.
pub struct Norm {
    pub weight: Param,
    pub bias: Param,
}

pub struct LayerWeights {
    pub ln_1: Norm,
    /// [3·d_attn, d_model]: q rows, then k rows, then v rows.
    pub w_qkv: Param,
    /// [3·d_attn]; zeros when the model has no q/k/v biases.
    pub b_qkv: Param,
    /// [d_model, d_attn]
    pub w_o: Param,
    /// [d_model]; zeros when the output projection has no bias.
    pub b_o: Param,
    /// None when the MLP reads LN1's output too (`Residual::ParallelOneNorm`).
    pub ln_2: Option<Norm>,
    /// [d_ff, d_model]
    pub w_fc: Param,
    pub b_fc: Param,
    /// [d_model, d_ff]
    pub w_proj: Param,
    pub b_proj: Param,
}

/// Every weight of a model, as views into one packed buffer (see `packing`).
pub struct ModelWeights {
    /// [embedding_rows, d_embed]
    pub wte: Param,
    /// [position_rows, d_model]; None with rotary position embeddings.
    pub wpe: Option<Param>,
    /// [d_model, d_embed] when d_embed ≠ d_model.
    pub project_in: Option<Param>,
    pub layers: Vec<LayerWeights>,
    /// Pre-LN models only.
    pub ln_f: Option<Norm>,
    /// [d_embed, d_model] when d_embed ≠ d_model.
    pub project_out: Option<Param>,
    /// [embedding_rows, d_embed] when the head is not tied to wte.
    pub lm_head: Option<Param>,
    /// [embedding_rows] when the head has a bias.
    pub lm_head_bias: Option<Param>,
}

/// Where canonical tensors come from (a checkpoint in memory, the `llm_param` table, …).
pub trait TensorSource {
    /// Name and shape of every tensor the source holds.
    fn shapes(&self) -> Result<HashMap<String, Vec<usize>>>;
    /// Copies the values of tensor `name` into `out`, whose length is the tensor's size.
    fn read_into(&mut self, name: &str, out: &mut [f32]) -> Result<()>;
}

/// One slot of the packed weight buffer: a canonical tensor, or zeros standing in for the
/// q/k/v or output-projection biases of a model that has none.
#[derive(Clone, Debug, PartialEq)]
pub struct Slot {
    pub name: Option<String>,
    pub shape: Vec<usize>,
}

impl Slot {
    /// Whether this matrix is read as one with the slot before it: k and v after q, the
    /// layer's [3·d_attn, d_model] projection.
    pub fn joins_previous(&self) -> bool {
        self.name
            .as_deref()
            .is_some_and(|n| n.ends_with("attn.k_proj.weight") || n.ends_with("attn.v_proj.weight"))
    }
}

/// The order of the packed buffer. `ModelWeights::from_storage` walks the same order.
pub fn packing(cfg: &ModelConfig) -> Vec<Slot> {
    let (d, da, ff) = (cfg.d_model, cfg.d_attn(), cfg.d_ff);
    let mut slots = Vec::new();
    let mut add = |name: Option<String>, shape: Vec<usize>| slots.push(Slot { name, shape });
    let named = |s: &str| Some(s.to_string());
    add(
        named("wte.weight"),
        vec![cfg.embedding_rows(), cfg.d_embed()],
    );
    if cfg.rotary.is_none() {
        add(named("wpe.weight"), vec![cfg.position_rows(), d]);
    }
    if let Some(e) = cfg.d_embed {
        add(named("project_in.weight"), vec![d, e]);
    }
    for i in 0..cfg.n_layer {
        let p = |s: &str| Some(format!("layers.{i}.{s}"));
        add(p("ln_1.weight"), vec![d]);
        add(p("ln_1.bias"), vec![d]);
        for q in ["q_proj", "k_proj", "v_proj"] {
            add(p(&format!("attn.{q}.weight")), vec![da, d]);
        }
        if cfg.qkv_bias {
            for q in ["q_proj", "k_proj", "v_proj"] {
                add(p(&format!("attn.{q}.bias")), vec![da]);
            }
        } else {
            add(None, vec![3 * da]);
        }
        add(p("attn.out_proj.weight"), vec![d, da]);
        if cfg.out_proj_bias {
            add(p("attn.out_proj.bias"), vec![d]);
        } else {
            add(None, vec![d]);
        }
        if cfg.residual.has_ln_2() {
            add(p("ln_2.weight"), vec![d]);
            add(p("ln_2.bias"), vec![d]);
        }
        add(p("mlp.fc_in.weight"), vec![ff, d]);
        add(p("mlp.fc_in.bias"), vec![ff]);
        add(p("mlp.fc_out.weight"), vec![d, ff]);
        add(p("mlp.fc_out.bias"), vec![d]);
    }
    if cfg.ln_placement == LnPlacement::Pre {
        add(named("ln_f.weight"), vec![d]);
        add(named("ln_f.bias"), vec![d]);
    }
    if let Some(e) = cfg.d_embed {
        add(named("project_out.weight"), vec![e, d]);
    }
    if !cfg.tied_head {
        add(
            named("lm_head.weight"),
            vec![cfg.embedding_rows(), cfg.d_embed()],
        );
    }
    if cfg.head_bias {
        add(named("lm_head.bias"), vec![cfg.embedding_rows()]);
    }
    slots
}

/// Each named tensor of `cfg` with its range in the packed buffer (`weights::packing`); the
/// zero bias slots of bias-free models are not stored tensors and are left out.
pub fn packed_tensors(cfg: &ModelConfig) -> Vec<(String, std::ops::Range<usize>)> {
    let mut at = 0;
    let mut out = Vec::new();
    for slot in packing(cfg) {
        let n: usize = slot.shape.iter().product();
        if let Some(name) = slot.name {
            out.push((name, at..at + n));
        }
        at += n;
    }
    out
}

/// Number of float32 values in the packed buffer of `cfg`.
pub fn packed_len(cfg: &ModelConfig) -> Result<usize> {
    let mut total = 0usize;
    for slot in packing(cfg) {
        total = total
            .checked_add(crate::tensor::numel(&slot.shape, "model")?)
            .ok_or_else(|| EngineError::too_large("the model is too large"))?;
    }
    Ok(total)
}

/// Copies every tensor of `src` into `out` (length `packed_len`) in packing order, after
/// checking names and shapes so that nothing is read from a source that does not fit.
fn fill(cfg: &ModelConfig, src: &mut dyn TensorSource, out: &mut [f32]) -> Result<()> {
    check_shapes(cfg, &src.shapes()?)?;
    let mut pos = 0;
    for slot in packing(cfg) {
        let n: usize = slot.shape.iter().product();
        let dst = &mut out[pos..pos + n];
        match &slot.name {
            Some(name) => src.read_into(name, dst)?,
            None => dst.fill(0.0),
        }
        pos += n;
    }
    if pos != out.len() {
        return Err(EngineError::Internal(format!(
            "packed {pos} values into a buffer of {}",
            out.len()
        )));
    }
    Ok(())
}

impl ModelWeights {
    /// Reads every canonical tensor of `cfg` from `src` into one private buffer.
    pub fn load(cfg: &ModelConfig, src: &mut dyn TensorSource) -> Result<Self> {
        Self::load_as(cfg, src, DType::Float32)
    }

    /// `load` with the matrices in `dtype` (rounded; see `from_values`).
    pub fn load_as(cfg: &ModelConfig, src: &mut dyn TensorSource, dtype: DType) -> Result<Self> {
        cfg.validate()?;
        let mut buf = crate::tensor::alloc_zeroed(packed_len(cfg)?)?;
        fill(cfg, src, &mut buf)?;
        Self::from_values(cfg, buf, dtype)
    }

    /// Weights from all packed float32 `values`, kept as they are for float32 or made into an
    /// image with the matrices in a half `dtype` (the float32 values are then freed).
    pub fn from_values(cfg: &ModelConfig, values: Vec<f32>, dtype: DType) -> Result<Self> {
        let storage = match dtype {
            DType::Float32 => Storage::Owned(values),
            _ => Storage::image_of(&values, Layout::new(cfg, dtype)?)?,
        };
        Self::from_storage(cfg, Arc::new(storage))
    }

    /// Views over a packed buffer laid out by `packing(cfg)`.
    pub fn from_storage(cfg: &ModelConfig, storage: Arc<Storage>) -> Result<Self> {
        let expected = packed_len(cfg)?;
        if storage.len() != expected {
            return Err(EngineError::data(format!(
                "a packed buffer of {} values does not fit a model of {expected}",
                storage.len()
            )));
        }
        let (d, da, ff) = (cfg.d_model, cfg.d_attn(), cfg.d_ff);
        let mut c = Cursor::new(storage);
        let norm = |c: &mut Cursor| Norm {
            weight: c.take(d),
            bias: c.take(d),
        };
        let wte = c.take(cfg.embedding_rows() * cfg.d_embed());
        let wpe = cfg
            .rotary
            .is_none()
            .then(|| c.take(cfg.position_rows() * d));
        let project_in = cfg.d_embed.map(|e| c.take(d * e));
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for _ in 0..cfg.n_layer {
            layers.push(LayerWeights {
                ln_1: norm(&mut c),
                w_qkv: c.take(3 * da * d),
                b_qkv: c.take(3 * da),
                w_o: c.take(d * da),
                b_o: c.take(d),
                ln_2: cfg.residual.has_ln_2().then(|| norm(&mut c)),
                w_fc: c.take(ff * d),
                b_fc: c.take(ff),
                w_proj: c.take(d * ff),
                b_proj: c.take(d),
            });
        }
        let ln_f = (cfg.ln_placement == LnPlacement::Pre).then(|| norm(&mut c));
        let project_out = cfg.d_embed.map(|e| c.take(e * d));
        let lm_head = (!cfg.tied_head).then(|| c.take(cfg.embedding_rows() * cfg.d_embed()));
        let lm_head_bias = cfg.head_bias.then(|| c.take(cfg.embedding_rows()));
        if c.position() != expected {
            return Err(EngineError::Internal(format!(
                "weight views cover {} of {expected} packed values",
                c.position()
            )));
        }
        Ok(Self {
            wte,
            wpe,
            project_in,
            layers,
            ln_f,
            project_out,
            lm_head,
            lm_head_bias,
        })
    }

    /// The buffer every view points into.
    pub fn storage(&self) -> &Arc<Storage> {
        self.wte.storage()
    }
}

/// Checks that a source holds exactly the canonical tensors of `cfg`, with their shapes;
/// the first error names the first offending tensor in the model's order (missing or
/// misshapen), then the first unused one in sorted order.
pub fn check_shapes(cfg: &ModelConfig, shapes: &HashMap<String, Vec<usize>>) -> Result<()> {
    cfg.validate()?;
    let specs = cfg.param_specs();
    for (name, shape) in &specs {
        match shapes.get(name) {
            None => return Err(missing(name)),
            Some(s) if s != shape => return Err(wrong_shape(name, s, shape)),
            Some(_) => {}
        }
    }
    let known: HashSet<&str> = specs.iter().map(|(n, _)| n.as_str()).collect();
    let mut left: Vec<&String> = shapes
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .collect();
    left.sort();
    match left.first() {
        None => Ok(()),
        Some(first) => Err(EngineError::invalid(format!(
            "{} tensor(s) are not parameters of this model, first \"{first}\"",
            left.len()
        ))),
    }
}

/// `check_shapes` for tensors in memory.
pub fn check_tensors(cfg: &ModelConfig, map: &TensorMap) -> Result<()> {
    check_shapes(cfg, &shapes_of(map))
}

fn shapes_of(map: &TensorMap) -> HashMap<String, Vec<usize>> {
    map.iter()
        .map(|(name, (shape, _))| (name.clone(), shape.clone()))
        .collect()
}

fn missing(name: &str) -> EngineError {
    EngineError::invalid(format!("tensor \"{name}\" is missing"))
}

fn wrong_shape(name: &str, got: &[usize], want: &[usize]) -> EngineError {
    EngineError::invalid(format!(
        "tensor \"{name}\" has shape {} but the model needs {}",
        crate::tensor::shape_str(got),
        crate::tensor::shape_str(want)
    ))
}

/// A tensor source over canonical tensors in memory (imports, tests). Each tensor is freed
/// as soon as it has been copied.
pub struct MapSource {
    map: TensorMap,
}

impl MapSource {
    pub fn new(map: TensorMap) -> Self {
        Self { map }
    }
}

impl TensorSource for MapSource {
    fn shapes(&self) -> Result<HashMap<String, Vec<usize>>> {
        Ok(shapes_of(&self.map))
    }

    fn read_into(&mut self, name: &str, out: &mut [f32]) -> Result<()> {
        match self.map.remove(name) {
            Some((_, data)) if data.len() == out.len() => {
                out.copy_from_slice(&data);
                Ok(())
            }
            Some((shape, data)) => Err(EngineError::data(format!(
                "tensor \"{name}\" of shape {} holds {} values",
                crate::tensor::shape_str(&shape),
                data.len()
            ))),
            None => Err(missing(name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::tiny_gpt3;
    use crate::model::init::init_params;

    fn load(cfg: &ModelConfig, map: &TensorMap) -> Result<ModelWeights> {
        ModelWeights::load(cfg, &mut MapSource::new(map.clone()))
    }

    #[test]
    fn packing_holds_every_parameter_once_and_views_read_them_back() {
        for qkv_bias in [true, false] {
            let cfg = ModelConfig {
                qkv_bias,
                ..tiny_gpt3()
            };
            let params = init_params(&cfg, 1).unwrap();
            let mut names: Vec<String> = packing(&cfg).into_iter().filter_map(|s| s.name).collect();
            names.sort();
            let mut specs: Vec<String> = cfg.param_specs().into_iter().map(|(n, _)| n).collect();
            specs.sort();
            assert_eq!(names, specs);

            let w = load(&cfg, &params).unwrap();
            let get = |n: &str| params[n].1.clone();
            let l1 = &w.layers[1];
            let qkv: Vec<f32> = ["q_proj", "k_proj", "v_proj"]
                .iter()
                .flat_map(|q| get(&format!("layers.1.attn.{q}.weight")))
                .collect();
            assert_eq!(&l1.w_qkv[..], &qkv[..]);
            if qkv_bias {
                assert_eq!(
                    &l1.b_qkv[..cfg.d_attn()],
                    &get("layers.1.attn.q_proj.bias")[..]
                );
            } else {
                assert!(l1.b_qkv.len() == 3 * cfg.d_attn() && l1.b_qkv.iter().all(|v| *v == 0.0));
            }
            assert_eq!(&l1.w_proj[..], &get("layers.1.mlp.fc_out.weight")[..]);
            assert_eq!(&w.ln_f.as_ref().unwrap().bias[..], &get("ln_f.bias")[..]);
            assert_eq!(&w.wpe.as_ref().unwrap()[..], &get("wpe.weight")[..]);
            assert_eq!(w.storage().len(), packed_len(&cfg).unwrap());
        }
    }

    #[test]
    fn loading_checks_names_and_shapes_before_reading() {
        let cfg = tiny_gpt3();
        let full = init_params(&cfg, 1).unwrap();
        assert!(check_tensors(&cfg, &full).is_ok());

        let mut missing = full.clone();
        missing.remove("layers.1.attn.k_proj.bias");
        missing.remove("ln_f.weight");
        let err = load(&cfg, &missing).err().unwrap();
        assert!(
            err.to_string()
                .contains("\"layers.1.attn.k_proj.bias\" is missing"),
            "{err}"
        );
        assert_eq!(check_tensors(&cfg, &missing).unwrap_err(), err);

        let mut reshaped = full.clone();
        reshaped.get_mut("wpe.weight").unwrap().0 = vec![8, 16];
        let err = load(&cfg, &reshaped).err().unwrap();
        assert!(err.to_string().contains("has shape [8, 16]"), "{err}");

        let mut extra = full.clone();
        extra.insert("layers.9.ln_1.weight".into(), (vec![8], vec![1.0; 8]));
        extra.insert("bogus".into(), (vec![1], vec![0.0]));
        let err = load(&cfg, &extra).err().unwrap();
        assert!(err.to_string().contains("2 tensor(s)") && err.to_string().contains("\"bogus\""));

        let mut ragged = full;
        ragged.get_mut("ln_f.bias").unwrap().1.pop();
        assert!(matches!(load(&cfg, &ragged), Err(EngineError::Data(_))));
    }
}
