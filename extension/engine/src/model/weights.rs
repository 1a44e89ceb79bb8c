//! A model's weights in memory, laid out for the forward pass: per layer, q/k/v are fused into
//! one [3·d_attn, d_model] matrix so a layer's projection is one product.

use super::config::{LnPlacement, ModelConfig};
use crate::error::{EngineError, Result};
use crate::formats::TensorMap;

/// LayerNorm gain and bias.
pub struct Norm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

pub struct LayerWeights {
    pub ln_1: Norm,
    /// [3·d_attn, d_model]: q rows, then k rows, then v rows.
    pub w_qkv: Vec<f32>,
    /// [3·d_attn]; zeros when the model has no q/k/v biases.
    pub b_qkv: Vec<f32>,
    /// [d_model, d_attn]
    pub w_o: Vec<f32>,
    pub b_o: Vec<f32>,
    pub ln_2: Norm,
    /// [d_ff, d_model]
    pub w_fc: Vec<f32>,
    pub b_fc: Vec<f32>,
    /// [d_model, d_ff]
    pub w_proj: Vec<f32>,
    pub b_proj: Vec<f32>,
}

pub struct ModelWeights {
    /// [embedding_rows, d_embed]
    pub wte: Vec<f32>,
    /// [position_rows, d_model]
    pub wpe: Vec<f32>,
    /// [d_model, d_embed] when d_embed ≠ d_model.
    pub project_in: Option<Vec<f32>>,
    pub layers: Vec<LayerWeights>,
    /// Pre-LN models only.
    pub ln_f: Option<Norm>,
    /// [d_embed, d_model] when d_embed ≠ d_model.
    pub project_out: Option<Vec<f32>>,
    /// [embedding_rows, d_embed] when the head is not tied to wte.
    pub lm_head: Option<Vec<f32>>,
}

/// Source of canonical tensors: `fetch(name, shape)` returns the tensor's values, checking
/// that it exists with that shape.
pub trait TensorSource {
    fn fetch(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
}

impl ModelWeights {
    /// Gathers every canonical tensor of `cfg` from `src`.
    pub fn load(cfg: &ModelConfig, src: &mut dyn TensorSource) -> Result<Self> {
        cfg.validate()?;
        let (d, da, ff) = (cfg.d_model, cfg.d_attn(), cfg.d_ff);
        let norm = |src: &mut dyn TensorSource, p: &str| -> Result<Norm> {
            Ok(Norm {
                weight: src.fetch(&format!("{p}.weight"), &[d])?,
                bias: src.fetch(&format!("{p}.bias"), &[d])?,
            })
        };
        let wte = src.fetch("wte.weight", &[cfg.embedding_rows(), cfg.d_embed()])?;
        let wpe = src.fetch("wpe.weight", &[cfg.position_rows(), d])?;
        let project_in = match cfg.d_embed {
            Some(e) => Some(src.fetch("project_in.weight", &[d, e])?),
            None => None,
        };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = |s: &str| format!("layers.{i}.{s}");
            let ln_1 = norm(src, &p("ln_1"))?;
            let mut w_qkv = Vec::with_capacity(3 * da * d);
            let mut b_qkv = Vec::with_capacity(3 * da);
            for q in ["q_proj", "k_proj", "v_proj"] {
                w_qkv.extend(src.fetch(&p(&format!("attn.{q}.weight")), &[da, d])?);
                if cfg.qkv_bias {
                    b_qkv.extend(src.fetch(&p(&format!("attn.{q}.bias")), &[da])?);
                } else {
                    b_qkv.extend(std::iter::repeat_n(0.0, da));
                }
            }
            layers.push(LayerWeights {
                ln_1,
                w_qkv,
                b_qkv,
                w_o: src.fetch(&p("attn.out_proj.weight"), &[d, da])?,
                b_o: src.fetch(&p("attn.out_proj.bias"), &[d])?,
                ln_2: norm(src, &p("ln_2"))?,
                w_fc: src.fetch(&p("mlp.fc_in.weight"), &[ff, d])?,
                b_fc: src.fetch(&p("mlp.fc_in.bias"), &[ff])?,
                w_proj: src.fetch(&p("mlp.fc_out.weight"), &[d, ff])?,
                b_proj: src.fetch(&p("mlp.fc_out.bias"), &[d])?,
            });
        }
        let ln_f = match cfg.ln_placement {
            LnPlacement::Pre => Some(norm(src, "ln_f")?),
            LnPlacement::Post => None,
        };
        let project_out = match cfg.d_embed {
            Some(e) => Some(src.fetch("project_out.weight", &[e, d])?),
            None => None,
        };
        let lm_head = if cfg.tied_head {
            None
        } else {
            Some(src.fetch("lm_head.weight", &[cfg.embedding_rows(), cfg.d_embed()])?)
        };
        Ok(Self {
            wte,
            wpe,
            project_in,
            layers,
            ln_f,
            project_out,
            lm_head,
        })
    }
}

/// Checks that `map` holds exactly the canonical tensors of `cfg`, with their shapes, without
/// touching the data: the same verdict, and the same first error, as loading it through a
/// `MapSource` and calling `finish`.
pub fn check_tensors(cfg: &ModelConfig, map: &TensorMap) -> Result<()> {
    cfg.validate()?;
    let specs = cfg.param_specs();
    for (name, shape) in &specs {
        match map.get(name) {
            None => return Err(missing(name)),
            Some((s, _)) if s != shape => return Err(wrong_shape(name, s, shape)),
            Some(_) => {}
        }
    }
    let known: std::collections::HashSet<&str> = specs.iter().map(|(n, _)| n.as_str()).collect();
    leftovers(map.keys().filter(|k| !known.contains(k.as_str())))
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

/// An error naming the first (in sorted order) of the tensors a model does not use.
fn leftovers<'a>(names: impl Iterator<Item = &'a String>) -> Result<()> {
    let mut left: Vec<&String> = names.collect();
    left.sort();
    match left.first() {
        None => Ok(()),
        Some(first) => Err(EngineError::invalid(format!(
            "{} tensor(s) are not parameters of this model, first \"{first}\"",
            left.len()
        ))),
    }
}

/// A tensor source over an in-memory map of canonical tensors (imports, tests). `finish`
/// reports tensors the model did not use, so an import never silently drops data.
pub struct MapSource {
    map: TensorMap,
}

impl MapSource {
    pub fn new(map: TensorMap) -> Self {
        Self { map }
    }

    pub fn finish(self) -> Result<()> {
        leftovers(self.map.keys())
    }
}

impl TensorSource for MapSource {
    fn fetch(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        match self.map.remove(name) {
            None => Err(missing(name)),
            Some((s, _)) if s != shape => Err(wrong_shape(name, &s, shape)),
            Some((_, data)) => Ok(data),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::tiny_gpt3;
    use crate::model::init::init_params;

    /// check_tensors gives the same verdict and first error as loading through MapSource.
    fn via_load(cfg: &ModelConfig, map: &TensorMap) -> Result<()> {
        let mut src = MapSource::new(map.clone());
        ModelWeights::load(cfg, &mut src)?;
        src.finish()
    }

    #[test]
    fn check_agrees_with_loading() {
        let cfg = tiny_gpt3();
        let full = init_params(&cfg, 1).unwrap();
        assert!(check_tensors(&cfg, &full).is_ok() && via_load(&cfg, &full).is_ok());

        let mut missing = full.clone();
        missing.remove("layers.1.attn.k_proj.bias");
        missing.remove("ln_f.weight");
        assert_eq!(check_tensors(&cfg, &missing), via_load(&cfg, &missing));
        assert!(check_tensors(&cfg, &missing)
            .unwrap_err()
            .to_string()
            .contains("layers.1.attn.k_proj.bias"));

        let mut reshaped = full.clone();
        reshaped.get_mut("wpe.weight").unwrap().0 = vec![8, 16];
        assert_eq!(check_tensors(&cfg, &reshaped), via_load(&cfg, &reshaped));

        let mut extra = full;
        extra.insert("layers.9.ln_1.weight".into(), (vec![8], vec![1.0; 8]));
        extra.insert("bogus".into(), (vec![1], vec![0.0]));
        assert_eq!(check_tensors(&cfg, &extra), via_load(&cfg, &extra));
        assert!(check_tensors(&cfg, &extra)
            .unwrap_err()
            .to_string()
            .contains("2 tensor(s)"));
    }
}
