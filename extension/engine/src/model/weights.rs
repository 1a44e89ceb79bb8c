//! A model's weights in memory, laid out for the forward pass: per layer, q/k/v are fused into
//! one [3·d_attn, d_model] matrix so a layer's projection is one product.

use super::config::{LnPlacement, ModelConfig};
use crate::error::{EngineError, Result};

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
        let mut get = |name: &str, shape: &[usize]| src.fetch(name, shape);
        let norm =
            |get: &mut dyn FnMut(&str, &[usize]) -> Result<Vec<f32>>, p: &str| -> Result<Norm> {
                Ok(Norm {
                    weight: get(&format!("{p}.weight"), &[d])?,
                    bias: get(&format!("{p}.bias"), &[d])?,
                })
            };
        let wte = get("wte.weight", &[cfg.embedding_rows(), cfg.d_embed()])?;
        let wpe = get("wpe.weight", &[cfg.position_rows(), d])?;
        let project_in = match cfg.d_embed {
            Some(e) => Some(get("project_in.weight", &[d, e])?),
            None => None,
        };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = |s: &str| format!("layers.{i}.{s}");
            let ln_1 = norm(&mut get, &p("ln_1"))?;
            let mut w_qkv = Vec::with_capacity(3 * da * d);
            let mut b_qkv = Vec::with_capacity(3 * da);
            for q in ["q_proj", "k_proj", "v_proj"] {
                w_qkv.extend(get(&p(&format!("attn.{q}.weight")), &[da, d])?);
                if cfg.qkv_bias {
                    b_qkv.extend(get(&p(&format!("attn.{q}.bias")), &[da])?);
                } else {
                    b_qkv.extend(std::iter::repeat_n(0.0, da));
                }
            }
            layers.push(LayerWeights {
                ln_1,
                w_qkv,
                b_qkv,
                w_o: get(&p("attn.out_proj.weight"), &[d, da])?,
                b_o: get(&p("attn.out_proj.bias"), &[d])?,
                ln_2: norm(&mut get, &p("ln_2"))?,
                w_fc: get(&p("mlp.fc_in.weight"), &[ff, d])?,
                b_fc: get(&p("mlp.fc_in.bias"), &[ff])?,
                w_proj: get(&p("mlp.fc_out.weight"), &[d, ff])?,
                b_proj: get(&p("mlp.fc_out.bias"), &[d])?,
            });
        }
        let ln_f = match cfg.ln_placement {
            LnPlacement::Pre => Some(norm(&mut get, "ln_f")?),
            LnPlacement::Post => None,
        };
        let project_out = match cfg.d_embed {
            Some(e) => Some(get("project_out.weight", &[e, d])?),
            None => None,
        };
        let lm_head = if cfg.tied_head {
            None
        } else {
            Some(get(
                "lm_head.weight",
                &[cfg.embedding_rows(), cfg.d_embed()],
            )?)
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

    /// Bytes held by the weights.
    pub fn bytes(&self) -> usize {
        let n = |v: &Vec<f32>| v.len();
        let norm = |x: &Norm| x.weight.len() + x.bias.len();
        let layer = |l: &LayerWeights| {
            norm(&l.ln_1)
                + n(&l.w_qkv)
                + n(&l.b_qkv)
                + n(&l.w_o)
                + n(&l.b_o)
                + norm(&l.ln_2)
                + n(&l.w_fc)
                + n(&l.b_fc)
                + n(&l.w_proj)
                + n(&l.b_proj)
        };
        let opt = |v: &Option<Vec<f32>>| v.as_ref().map_or(0, |v| v.len());
        4 * (n(&self.wte)
            + n(&self.wpe)
            + opt(&self.project_in)
            + self.layers.iter().map(layer).sum::<usize>()
            + self.ln_f.as_ref().map_or(0, norm)
            + opt(&self.project_out)
            + opt(&self.lm_head))
    }
}

/// A tensor source over an in-memory map of canonical tensors (imports, tests). `finish`
/// reports tensors the model did not use, so an import never silently drops data.
pub struct MapSource {
    map: crate::formats::TensorMap,
}

impl MapSource {
    pub fn new(map: crate::formats::TensorMap) -> Self {
        Self { map }
    }

    pub fn finish(self) -> Result<()> {
        let mut left: Vec<&String> = self.map.keys().collect();
        left.sort();
        match left.first() {
            None => Ok(()),
            Some(first) => Err(EngineError::invalid(format!(
                "{} tensor(s) are not parameters of this model, first \"{first}\"",
                left.len()
            ))),
        }
    }
}

impl TensorSource for MapSource {
    fn fetch(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        match self.map.remove(name) {
            None => Err(EngineError::invalid(format!(
                "tensor \"{name}\" is missing"
            ))),
            Some((s, _)) if s != shape => Err(EngineError::invalid(format!(
                "tensor \"{name}\" has shape {} but the model needs {}",
                crate::tensor::shape_str(&s),
                crate::tensor::shape_str(shape)
            ))),
            Some((_, data)) => Ok(data),
        }
    }
}
