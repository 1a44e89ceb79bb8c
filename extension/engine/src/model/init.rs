//! GPT-2/3 initialisation: weights ~ N(0, 0.02), the two residual projections of each layer
//! (attention output, MLP output) ~ N(0, 0.02/√(2·n_layer)), biases 0, LayerNorm gains 1.
//! Each tensor draws from its own ChaCha8 stream derived from (seed, tensor index), so the
//! result does not depend on the number of threads.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use super::config::ModelConfig;
use crate::error::Result;
use crate::formats::{collect_piece, Sink, TensorMap, PIECE};
use crate::parallel::Cancel;
use crate::tensor;

const STD: f32 = 0.02;

/// How one canonical tensor is initialised.
fn init_of(name: &str, n_layer: usize) -> Init {
    let residual = name.ends_with("attn.out_proj.weight") || name.ends_with("mlp.fc_out.weight");
    if name.contains("ln_") && name.ends_with(".weight") {
        Init::Const(1.0)
    } else if name.ends_with(".bias") {
        Init::Const(0.0)
    } else if residual {
        Init::Normal(STD / (2.0 * n_layer as f32).sqrt())
    } else {
        Init::Normal(STD)
    }
}

enum Init {
    Const(f32),
    Normal(f32),
}

/// Fresh parameters for `cfg`, in canonical names. Reproducible for a given seed.
pub fn init_params(cfg: &ModelConfig, seed: u64) -> Result<TensorMap> {
    let mut out = TensorMap::new();
    // Whole tensors, drawn from the same streams as the pieces of `init_each`.
    init_in_pieces(
        cfg,
        seed,
        Cancel::NEVER,
        &mut |name, shape, at, data| collect_piece(&mut out, name, shape, at, data),
        usize::MAX,
    )?;
    Ok(out)
}

/// `init_params` one tensor at a time, a tensor larger than `PIECE` values in pieces (drawn
/// from the same stream, so the values are those of `init_params`): memory holds one piece,
/// whatever the size of the model. Returns the number of values.
pub fn init_each(cfg: &ModelConfig, seed: u64, cancel: Cancel, sink: &mut Sink<'_>) -> Result<u64> {
    init_in_pieces(cfg, seed, cancel, sink, PIECE)
}

/// Normal values drawn between two looks for a cancel (a few milliseconds' work).
const DRAW_BLOCK: usize = 1 << 18;

fn init_in_pieces(
    cfg: &ModelConfig,
    seed: u64,
    cancel: Cancel,
    sink: &mut Sink<'_>,
    piece: usize,
) -> Result<u64> {
    cfg.validate()?;
    let mut values = 0;
    for (i, (name, shape)) in cfg.param_specs().into_iter().enumerate() {
        let numel = tensor::numel(&shape, &name)?;
        let init = init_of(&name, cfg.n_layer);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(i as u64);
        for start in (0..numel).step_by(piece) {
            let mut data = tensor::alloc_zeroed(piece.min(numel - start))?;
            match init {
                Init::Const(c) => data.fill(c),
                Init::Normal(std) => {
                    let normal = Normal::new(0.0f32, std).expect("positive std");
                    // One stream per tensor, drawn in order: the values cannot be spread over
                    // threads, so the draw looks for a cancel between blocks instead.
                    for block in data.chunks_mut(DRAW_BLOCK) {
                        cancel.check()?;
                        block.iter_mut().for_each(|v| *v = normal.sample(&mut rng));
                    }
                }
            }
            values += data.len() as u64;
            sink(&name, &shape, start, data)?;
        }
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::tiny_gpt3;
    use crate::model::{MapSource, Model, ModelWeights};

    #[test]
    fn pieces_hold_the_values_of_whole_tensors() {
        let cfg = tiny_gpt3();
        let whole = init_params(&cfg, 11).unwrap();
        let mut pieces = TensorMap::new();
        init_in_pieces(
            &cfg,
            11,
            Cancel::NEVER,
            &mut |name, shape, at, values| {
                assert!(values.len() <= 1000);
                let (_, t) = pieces
                    .entry(name.to_string())
                    .or_insert_with(|| (shape.to_vec(), Vec::new()));
                assert_eq!(t.len(), at);
                t.extend(values);
                Ok(())
            },
            1000,
        )
        .unwrap();
        assert_eq!(pieces, whole);
    }

    #[test]
    fn statistics_and_reproducibility() {
        let cfg = ModelConfig {
            d_model: 64,
            d_head: 32,
            d_ff: 256,
            vocab: 500,
            ..tiny_gpt3()
        };
        let p = init_params(&cfg, 7).unwrap();
        let wte = &p["wte.weight"].1;
        let std = (wte.iter().map(|v| v * v).sum::<f32>() / wte.len() as f32).sqrt();
        assert!((std - 0.02).abs() < 0.001, "wte std {std}");
        let proj = &p["layers.0.mlp.fc_out.weight"].1;
        let std = (proj.iter().map(|v| v * v).sum::<f32>() / proj.len() as f32).sqrt();
        assert!(
            (std - 0.01).abs() < 0.001,
            "residual projection std {std} (0.02/sqrt(4))"
        );
        assert!(p["layers.1.ln_2.weight"].1.iter().all(|v| *v == 1.0));
        assert!(p["layers.1.attn.q_proj.bias"].1.iter().all(|v| *v == 0.0));
        assert_eq!(init_params(&cfg, 7).unwrap()["wte.weight"].1, *wte);
        assert_ne!(init_params(&cfg, 8).unwrap()["wte.weight"].1, *wte);
    }

    #[test]
    fn initialised_gpt3_model_runs_with_local_layers() {
        let cfg = tiny_gpt3();
        let mut src = MapSource::new(init_params(&cfg, 1).unwrap());
        let model = Model::new(cfg.clone(), ModelWeights::load(&cfg, &mut src).unwrap()).unwrap();
        let logits = model.logits(&[1, 2, 3, 4, 5, 6], Cancel::NEVER).unwrap();
        assert_eq!(logits.len(), 6 * cfg.vocab);
        // Random init: logits are near zero, every probability near 1/vocab.
        assert!(logits.iter().all(|v| v.abs() < 1.0));
        assert!(
            model.logits(&[11], Cancel::NEVER).is_err(),
            "token 11 is outside the vocabulary"
        );
    }
}
