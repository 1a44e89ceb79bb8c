//! The engine against Hugging Face `transformers` on committed fixtures
//! (tests/fixtures/models, made by tests/fixtures/make_fixtures.py): logits within 1e-4 and
//! identical greedy generations, for every supported family.

use std::path::PathBuf;

use pg_llm_engine::formats::{hf_config, names, safetensors};
use pg_llm_engine::model::{Logits, MapSource, Model, ModelWeights};
use pg_llm_engine::sample::argmax;
use pg_llm_engine::Cancel;

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn load(name: &str) -> Model {
    let dir = fixture_dir(name);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let (cfg, family) = hf_config::parse(&config).unwrap();
    let raw = safetensors::read(
        &std::fs::read(dir.join("model.safetensors")).unwrap(),
        "model.safetensors",
    )
    .unwrap();
    let canonical = names::to_canonical(family, &cfg, raw).unwrap();
    let mut src = MapSource::new(canonical);
    let weights = ModelWeights::load(&cfg, &mut src).unwrap();
    src.finish().unwrap();
    Model::new(cfg, weights).unwrap()
}

fn check_family(name: &str) {
    let model = load(name);
    let expected = std::fs::read(fixture_dir(name).join("expected.safetensors")).unwrap();
    let ids: Vec<u32> = safetensors::read_ints(&expected, "input_ids")
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect();
    let greedy: Vec<u32> = safetensors::read_ints(&expected, "greedy_ids")
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect();
    let want = safetensors::read_one(&expected, "logits").unwrap().1;

    let got = model.logits(&ids, Cancel::NEVER).unwrap();
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst < 1e-4,
        "{name}: logits differ from transformers by {worst}"
    );

    // Greedy decoding with the KV cache: prompt once, then one token per step.
    let mut cache = model.new_cache(ids.len() + greedy.len()).unwrap();
    let mut last = model
        .forward(&ids, &mut cache, Logits::Last, Cancel::NEVER)
        .unwrap();
    let mut out = Vec::new();
    for _ in 0..greedy.len() {
        let next = argmax(&last) as u32;
        out.push(next);
        last = model
            .forward(&[next], &mut cache, Logits::Last, Cancel::NEVER)
            .unwrap();
    }
    assert_eq!(
        out, greedy,
        "{name}: greedy generation differs from transformers"
    );
}

#[test]
fn gpt2_matches_transformers() {
    check_family("gpt2");
}

#[test]
fn cerebras_gpt_matches_transformers() {
    check_family("cerebras");
}

#[test]
fn opt_matches_transformers() {
    check_family("opt");
}

#[test]
fn opt_post_layernorm_with_projection_matches_transformers() {
    check_family("opt_post_ln");
}

#[test]
fn gpt_neo_with_local_attention_matches_transformers() {
    check_family("gpt_neo");
}
