//! Loading the committed Hugging Face fixtures (tests/fixtures/models).
#![allow(dead_code)]

use std::path::PathBuf;

use pg_llm_engine::formats::hf_config::{self, Family};
use pg_llm_engine::formats::{names, safetensors};
use pg_llm_engine::model::{MapSource, Model, ModelWeights};

pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

/// The fixture's model, and the family its config.json names.
pub fn load(name: &str) -> (Model, Family) {
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
    (Model::new(cfg, weights).unwrap(), family)
}
