//! Half-precision serving against Hugging Face `transformers` on the committed fixtures
//! (tests/fixtures/models/gpt2_bf16, gpt2_fp16, made by tests/fixtures/make_half_fixtures.py
//! from the GPT-2 fixture): a model served with bfloat16 / float16 matrices widens them and
//! accumulates in float32, so it matches transformers computing in float32 on the same half
//! weights (logits within 1e-5, identical greedy tokens), and differs from transformers
//! computing in the half dtype itself by about that dtype's rounding of the activations.

mod common;

use common::{fixture_dir, load};
use pg_llm_engine::formats::safetensors;
use pg_llm_engine::model::{DType, Logits, Model, ModelWeights};
use pg_llm_engine::sample::argmax;
use pg_llm_engine::Cancel;

fn ints(file: &[u8], name: &str) -> Vec<u32> {
    safetensors::read_ints(file, name)
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

/// The fixture's model served in `dtype` (its matrices in a half-precision image).
fn served_in(name: &str, dtype: DType) -> Model {
    let (model, _) = load(name);
    let cfg = model.config.clone();
    let values = model.weights.storage().as_f32().unwrap().to_vec();
    let weights = ModelWeights::from_values(&cfg, values, dtype).unwrap();
    Model::new(cfg, weights).unwrap()
}

/// `half_tolerance`: how far transformers computing in the half dtype may be from pg_llm (its
/// own distance from its float32 computation on the same weights, as measured when the
/// fixture was made, is 0.047 for bfloat16 and 0.0056 for float16).
fn check(name: &str, dtype: DType, half_tolerance: f32) {
    let model = served_in(name, dtype);
    assert_eq!(model.weights.storage().dtype(), dtype);
    let expected = std::fs::read(fixture_dir(name).join("expected.safetensors")).unwrap();
    let ids = ints(&expected, "input_ids");
    let got = model.logits(&ids, Cancel::NEVER).unwrap();

    let widened = safetensors::read_one(&expected, "logits_widened")
        .unwrap()
        .1;
    let worst = max_diff(&got, &widened);
    assert!(worst < 1e-5, "{name}: {worst} from transformers in float32");
    let half = safetensors::read_one(&expected, "logits_half").unwrap().1;
    let from_half = max_diff(&got, &half);
    assert!(
        from_half > 0.0 && from_half < half_tolerance,
        "{name}: {from_half} from transformers computing in {}",
        dtype.name()
    );

    // Greedy decoding with the KV cache, one token per step. The cache holds keys and values
    // in the half precision, so the prompt's last logits move from transformers' float32
    // computation by that rounding: less than its distance to transformers in the half dtype.
    let greedy = ints(&expected, "greedy_widened");
    let mut cache = model.new_cache(ids.len() + greedy.len()).unwrap();
    let mut last = model
        .forward(&ids, &mut cache, Logits::Last, Cancel::NEVER)
        .unwrap();
    let vocab = last.len();
    let last_row = |all: &[f32]| all[all.len() - vocab..].to_vec();
    let cached = max_diff(&last, &last_row(&widened));
    let half_last = max_diff(&last_row(&half), &last_row(&widened));
    eprintln!("{name}: cached keys and values move the last logits by {cached} (transformers in the half dtype: {half_last})");
    assert!(
        cached < half_last,
        "{name}: {cached} from transformers in float32 with a half KV cache"
    );
    let mut out = Vec::new();
    for _ in 0..greedy.len() {
        out.push(argmax(&last) as u32);
        last = model
            .forward(
                &out[out.len() - 1..],
                &mut cache,
                Logits::Last,
                Cancel::NEVER,
            )
            .unwrap();
    }
    assert_eq!(
        out, greedy,
        "{name}: greedy tokens differ from transformers"
    );
    assert_eq!(out, ints(&expected, "greedy_half"));
}

#[test]
fn bfloat16_weights_match_transformers() {
    check("gpt2_bf16", DType::Bfloat16, 0.1);
}

#[test]
fn float16_weights_match_transformers() {
    check("gpt2_fp16", DType::Float16, 0.012);
}

/// Rounding the float32 fixture's matrices to bfloat16 (what llm_set_weight_dtype does)
/// moves its logits by the amount docs/performance.md states; float16 by less.
#[test]
fn rounding_a_float32_model_moves_its_logits_a_little() {
    let expected = std::fs::read(fixture_dir("gpt2").join("expected.safetensors")).unwrap();
    let ids = ints(&expected, "input_ids");
    let fp32 = safetensors::read_one(&expected, "logits").unwrap().1;
    let bf16 = served_in("gpt2", DType::Bfloat16)
        .logits(&ids, Cancel::NEVER)
        .unwrap();
    let fp16 = served_in("gpt2", DType::Float16)
        .logits(&ids, Cancel::NEVER)
        .unwrap();
    let (d_bf16, d_fp16) = (max_diff(&bf16, &fp32), max_diff(&fp16, &fp32));
    assert!(d_bf16 > 1e-3 && d_bf16 < 0.08, "bfloat16: {d_bf16}");
    assert!(d_fp16 > 1e-5 && d_fp16 < d_bf16 / 4.0, "float16: {d_fp16}");
}
