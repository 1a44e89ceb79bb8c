//! Megatron-LM GPT checkpoints (tests/fixtures/megatron, written by
//! make_megatron_fixtures.py in each fused-QKV ordering from the GPT-3 model of
//! tests/fixtures/export/dense) import to exactly that model, compute transformers' logits
//! for it, and export to the GPT-2 layout transformers was given.

mod common;

use std::path::PathBuf;

use common::fixture_dir;
use pg_llm_engine::formats::export;
use pg_llm_engine::formats::hf_config::{self, Family, QkvOrder};
use pg_llm_engine::formats::{names, safetensors, TensorMap};
use pg_llm_engine::model::{Activation, MapSource, Model, ModelConfig, ModelWeights};
use pg_llm_engine::Cancel;

fn dir(rel: &str) -> PathBuf {
    fixture_dir("..").join(rel)
}

fn read_map(path: PathBuf) -> TensorMap {
    safetensors::read(&std::fs::read(&path).unwrap(), &path.to_string_lossy()).unwrap()
}

fn config(case: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir(&format!("megatron/{case}/config.json"))).unwrap())
        .unwrap()
}

fn import(case: &str) -> (ModelConfig, Family, TensorMap) {
    let (cfg, family) = hf_config::parse(&config(case)).unwrap();
    let raw = read_map(dir(&format!("megatron/{case}/model.safetensors")));
    let canonical = names::to_canonical(family, &cfg, raw).unwrap();
    (cfg, family, canonical)
}

fn check(case: &str, order: QkvOrder) {
    let (cfg, family, canonical) = import(case);
    assert_eq!(family, Family::Megatron(order), "{case}");
    assert_eq!(cfg.padded_vocab, Some(128));
    assert_eq!(cfg.activation, Activation::GeluNew);

    // Exactly the GPT-3 model the fixture was written from (the padding rows aside).
    let want = read_map(dir("export/dense/canonical.safetensors"));
    assert_eq!(canonical.len(), want.len(), "{case}: tensor count");
    for (name, (shape, values)) in &want {
        let (got_shape, got) = &canonical[name];
        if name == "wte.weight" {
            assert_eq!(got_shape, &vec![128, shape[1]]);
            assert!(got[..values.len()] == values[..], "{case}: {name}");
        } else {
            assert_eq!(got_shape, shape, "{case}: shape of {name}");
            assert!(got == values, "{case}: {name} differs");
        }
    }

    // transformers' logits for that model.
    let expected = std::fs::read(dir("export/dense/expected.safetensors")).unwrap();
    let ids: Vec<u32> = safetensors::read_ints(&expected, "input_ids")
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect();
    let want_logits = safetensors::read_one(&expected, "logits").unwrap().1;
    let weights = ModelWeights::load(&cfg, &mut MapSource::new(canonical.clone())).unwrap();
    let model = Model::new(cfg.clone(), weights).unwrap();
    let logits = model.logits(&ids, Cancel::NEVER).unwrap();
    assert_eq!(
        logits.len(),
        want_logits.len(),
        "{case}: logits over the unpadded vocabulary"
    );
    let worst = logits
        .iter()
        .zip(&want_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst < 1e-4,
        "{case}: logits differ from transformers by {worst}"
    );

    // Exported, it is GPT-2 checkpoint transformers computed those logits from.
    let plan = export::plan(family, &cfg, &mut canonical.clone()).unwrap();
    assert_eq!(plan.family, Family::Gpt2);
    let mut bytes = Vec::new();
    export::write_safetensors(
        &mut bytes,
        &plan.tensors,
        &mut canonical.clone(),
        &cfg,
        &mut || Ok(()),
    )
    .unwrap();
    let exported = safetensors::read(&bytes, "export").unwrap();
    let hf = read_map(dir("export/dense/hf.safetensors"));
    assert_eq!(exported.len(), hf.len());
    for (name, (shape, values)) in &hf {
        assert_eq!(&exported[name].0, shape, "{case}: {name}");
        assert!(&exported[name].1 == values, "{case}: {name} differs");
    }
}

#[test]
fn version_0_split_ordering() {
    check("v0", QkvOrder::Split);
}

#[test]
fn version_1_head_dim_ordering() {
    check("v1", QkvOrder::HeadDim);
}

#[test]
fn version_2_and_later_head_split_ordering() {
    check("v2", QkvOrder::HeadSplit);
}

#[test]
fn the_orderings_differ_so_a_wrong_version_gives_other_weights() {
    let (cfg, _, right) = import("v1");
    let raw = read_map(dir("megatron/v1/model.safetensors"));
    let wrong = names::to_canonical(Family::Megatron(QkvOrder::HeadSplit), &cfg, raw).unwrap();
    assert!(wrong["layers.0.attn.q_proj.weight"].1 != right["layers.0.attn.q_proj.weight"].1);
}

#[test]
fn unsupported_megatron_variants_and_bad_tensors_are_refused() {
    for (key, value) in [
        ("position_embedding_type", serde_json::json!("rope")),
        ("normalization", serde_json::json!("RMSNorm")),
        ("swiglu", serde_json::json!(true)),
        ("add_bias_linear", serde_json::json!(false)),
        ("kv_channels", serde_json::json!(5)),
    ] {
        let mut c = config("v2");
        c[key] = value;
        let err = hf_config::parse(&c).unwrap_err().to_string();
        assert!(
            err.contains("Megatron") || err.contains("kv_channels"),
            "{key}: {err}"
        );
    }
    let (cfg, family) = hf_config::parse(&config("v2")).unwrap();
    let good = read_map(dir("megatron/v2/model.safetensors"));
    let qkv = "language_model.encoder.layers.1.self_attention.query_key_value.weight";
    let mut short = good.clone();
    let (shape, data) = short.get_mut(qkv).unwrap();
    shape[0] -= 1;
    data.truncate(shape[0] * shape[1]);
    assert!(names::to_canonical(family, &cfg, short).is_err());
    let mut extra = good.clone();
    extra.insert(
        "language_model.encoder.layers.1.mlp.gate.weight".into(),
        (vec![1], vec![0.0]),
    );
    assert!(names::to_canonical(family, &cfg, extra).is_err());
    let mut deep = good;
    let (s, d) = deep.remove(qkv).unwrap();
    deep.insert(qkv.replace("layers.1", "layers.7"), (s, d));
    assert!(names::to_canonical(family, &cfg, deep).is_err());
}
