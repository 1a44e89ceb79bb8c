//! The engine's training against Hugging Face `transformers` + PyTorch on the committed
//! fixtures (tests/fixtures/models/<family>/training.safetensors, made by
//! tests/fixtures/make_grad_fixtures.py): for a fixed batch, the loss and the gradient of
//! every parameter, then the weights after three AdamW steps with pg_gpt3's conventions
//! (decay on tensors of two or more dimensions only, global-norm clipping to 1.0).

mod common;

use std::sync::Arc;

use common::{fixture_dir, load};
use pg_llm_engine::formats::hf_config::Family;
use pg_llm_engine::formats::{names, safetensors, TensorMap};
use pg_llm_engine::model::weights::packing;
use pg_llm_engine::model::{Batch, MapSource, Model, ModelWeights, Storage};
use pg_llm_engine::optim::{clip_grad_norm, AdamW};
use pg_llm_engine::Cancel;

struct Reference {
    tokens: Vec<u32>,
    targets: Vec<u32>,
    sequences: usize,
    loss: f32,
    losses: Vec<f32>,
    bytes: Vec<u8>,
}

fn reference(name: &str) -> Reference {
    let bytes = std::fs::read(fixture_dir(name).join("training.safetensors")).unwrap();
    let ids = |n: &str| -> Vec<u32> {
        safetensors::read_ints(&bytes, n)
            .unwrap()
            .iter()
            .map(|&x| x as u32)
            .collect()
    };
    let (shape, _) = safetensors::read_one(&bytes, "loss").unwrap();
    assert!(shape.is_empty());
    let sequences = {
        let st = ::safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensor("tokens").unwrap().shape()[0]
    };
    Reference {
        tokens: ids("tokens"),
        targets: ids("targets"),
        sequences,
        loss: safetensors::read_one(&bytes, "loss").unwrap().1[0],
        losses: safetensors::read_one(&bytes, "losses").unwrap().1,
        bytes,
    }
}

impl Reference {
    fn batch(&self) -> Batch<'_> {
        Batch {
            tokens: &self.tokens,
            targets: &self.targets,
            sequences: self.sequences,
            len: self.tokens.len() / self.sequences,
        }
    }

    /// The tensors stored under `prefix` ("grad." or "after."), mapped to canonical names and
    /// packed like the model's weights.
    fn packed(&self, prefix: &str, model: &Model, family: Family) -> Vec<f32> {
        let st = ::safetensors::SafeTensors::deserialize(&self.bytes).unwrap();
        let mut map = TensorMap::new();
        for name in st.names() {
            if let Some(hf_name) = name.strip_prefix(prefix) {
                map.insert(
                    hf_name.to_string(),
                    safetensors::read_one(&self.bytes, name).unwrap(),
                );
            }
        }
        let canonical = names::to_canonical(family, &model.config, map).unwrap();
        let weights = ModelWeights::load(&model.config, &mut MapSource::new(canonical)).unwrap();
        weights.storage().as_f32().unwrap().to_vec()
    }
}

/// The largest |got − want| / (1e-5 + 1e-3·|want|): within float32 tolerance when ≤ 1.
fn worst(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / (1e-5 + 1e-3 * w.abs()))
        .fold(0.0, f32::max)
}

fn with_weights(model: &Model, values: Vec<f32>) -> Model {
    let weights =
        ModelWeights::from_storage(&model.config, Arc::new(Storage::Owned(values))).unwrap();
    Model::new(model.config.clone(), weights).unwrap()
}

fn check_family(name: &str) {
    let (model, family) = load(name);
    let r = reference(name);
    let n = model.weights.storage().len();

    let mut grads = vec![0.0; n];
    let loss = model
        .loss_and_grads(r.batch(), Some(&mut grads), Cancel::NEVER)
        .unwrap();
    assert!(
        (loss - r.loss).abs() <= 1e-5 * r.loss.abs(),
        "{name}: loss {loss} vs PyTorch {}",
        r.loss
    );
    let want = r.packed("grad.", &model, family);
    let err = worst(&grads, &want);
    assert!(
        err <= 1.0,
        "{name}: gradients differ from PyTorch's ({err} × tolerance)"
    );

    // Three AdamW steps: decay on matrices and embeddings only, gradients clipped to norm 1.
    let decay = AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let no_decay = AdamW {
        weight_decay: 0.0,
        ..decay
    };
    let mut w = model.weights.storage().as_f32().unwrap().to_vec();
    let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
    let mut current = with_weights(&model, w.clone());
    for (step, want_loss) in (1..=3).zip(&r.losses) {
        let mut g = vec![0.0; n];
        let loss = current
            .loss_and_grads(r.batch(), Some(&mut g), Cancel::NEVER)
            .unwrap();
        assert!(
            (loss - want_loss).abs() <= 1e-4 * want_loss.abs(),
            "{name}: loss before step {step}: {loss} vs PyTorch {want_loss}"
        );
        clip_grad_norm(&mut g, 1.0).unwrap();
        let mut at = 0;
        for slot in packing(&model.config) {
            let len: usize = slot.shape.iter().product();
            let r = at..at + len;
            at += len;
            if slot.name.is_none() {
                continue; // the zero q/k/v bias of bias-free models is not a parameter
            }
            let opt = if slot.shape.len() >= 2 {
                decay
            } else {
                no_decay
            };
            opt.step(
                &mut w[r.clone()],
                &g[r.clone()],
                &mut m[r.clone()],
                &mut v[r],
                step,
                Cancel::NEVER,
            )
            .unwrap();
        }
        current = with_weights(&model, w.clone());
    }
    // Key biases are left out: their exact gradient is zero (a key bias adds the same q·b to
    // every score of a query, which softmax ignores), so both sides hold rounding noise there,
    // which Adam's normalisation turns into steps of ±lr in arbitrary directions.
    let want = r.packed("after.", &model, family);
    let mut at = 0;
    for slot in packing(&model.config) {
        let len: usize = slot.shape.iter().product();
        let r = at..at + len;
        at += len;
        let Some(tensor) = slot.name else { continue };
        if tensor.ends_with("attn.k_proj.bias") {
            continue;
        }
        let err = worst(&w[r.clone()], &want[r]);
        assert!(
            err <= 1.0,
            "{name}: {tensor} after 3 steps differs from PyTorch's ({err} × tolerance)"
        );
    }
}

#[test]
fn gpt2_trains_like_pytorch() {
    check_family("gpt2");
}

#[test]
fn cerebras_gpt_trains_like_pytorch() {
    check_family("cerebras");
}

#[test]
fn opt_trains_like_pytorch() {
    check_family("opt");
}

#[test]
fn opt_post_layernorm_with_projection_trains_like_pytorch() {
    check_family("opt_post_ln");
}

#[test]
fn gpt_neo_with_local_attention_trains_like_pytorch() {
    check_family("gpt_neo");
}

#[test]
fn gpt_neox_with_partial_rotary_and_parallel_residual_trains_like_pytorch() {
    check_family("gpt_neox");
}

#[test]
fn gpt_neox_with_full_rotary_and_sequential_residual_trains_like_pytorch() {
    check_family("gpt_neox_full");
}

#[test]
fn gptj_with_interleaved_rotary_and_one_layernorm_trains_like_pytorch() {
    check_family("gptj");
}
