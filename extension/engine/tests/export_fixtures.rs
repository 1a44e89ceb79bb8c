//! Export to Hugging Face layouts, checked against committed `transformers` results (no
//! PyTorch in CI):
//! - every imported family (tests/fixtures/models) exports back to exactly the tensors it was
//!   imported from, with a config.json that describes the same model;
//! - pg_gpt3 GPT-3 models (tests/fixtures/export, made by make_export_fixtures.py) export to
//!   GPT-2's layout (all layers dense) or GPT-Neo's (banded layers) as the tensors
//!   transformers was given, and the engine's logits equal what transformers computed there;
//! - what has no exact mapping is refused; sharding and the written file's header.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use common::fixture_dir;
use pg_llm_engine::formats::export::{self, Canonical, Packed};
use pg_llm_engine::formats::hf_config::{self, Family};
use pg_llm_engine::formats::{checkpoint, names, safetensors, TensorMap};
use pg_llm_engine::model::{AttnKind, MapSource, Model, ModelConfig, ModelWeights};
use pg_llm_engine::Cancel;

fn read_map(path: PathBuf) -> TensorMap {
    safetensors::read(&std::fs::read(&path).unwrap(), &path.to_string_lossy()).unwrap()
}

/// Writes a plan as one safetensors file in memory and reads it back.
fn export_bytes(plan: &export::Plan, params: &mut dyn Canonical, cfg: &ModelConfig) -> Vec<u8> {
    let mut out = Vec::new();
    let n =
        export::write_safetensors(&mut out, &plan.tensors, params, cfg, &mut || Ok(())).unwrap();
    assert_eq!(n as usize, out.len());
    out
}

fn round_trip(name: &str, family_name: &str) {
    let dir = fixture_dir(name);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let (cfg, family) = hf_config::parse(&config).unwrap();
    let original = read_map(dir.join("model.safetensors"));
    let canonical = names::to_canonical(family, &cfg, original.clone()).unwrap();

    let plan = export::plan(family, &cfg, &mut canonical.clone()).unwrap();
    assert_eq!(plan.family, family);
    assert_eq!(plan.config["model_type"], family_name);
    // The exported config.json describes the same model.
    assert_eq!(
        hf_config::parse(&plan.config).unwrap(),
        (cfg.clone(), family)
    );

    let exported =
        safetensors::read(&export_bytes(&plan, &mut canonical.clone(), &cfg), "export").unwrap();
    for (n, (shape, values)) in &exported {
        let (want_shape, want) = original
            .get(n)
            .unwrap_or_else(|| panic!("{name}: exported \"{n}\" is not in the checkpoint"));
        assert_eq!(shape, want_shape, "{name}: shape of {n}");
        assert!(values == want, "{name}: values of {n} differ");
    }
    // What the export leaves out: buffers, and a head tied to the embedding.
    for n in original.keys().filter(|n| !exported.contains_key(*n)) {
        let tied = n == "lm_head.weight" && cfg.tied_head;
        assert!(
            tied || n.ends_with("attn.bias") || n.ends_with("masked_bias"),
            "{name}: {n} not exported"
        );
    }
}

#[test]
fn gpt2_exports_back_to_its_checkpoint() {
    round_trip("gpt2", "gpt2");
}

#[test]
fn cerebras_gpt_exports_back_to_its_checkpoint() {
    round_trip("cerebras", "gpt2");
}

#[test]
fn opt_exports_back_to_its_checkpoint() {
    round_trip("opt", "opt");
}

#[test]
fn opt_post_layernorm_exports_back_to_its_checkpoint() {
    round_trip("opt_post_ln", "opt");
}

#[test]
fn gpt_neo_exports_back_to_its_checkpoint() {
    round_trip("gpt_neo", "gpt_neo");
}

#[test]
fn gpt_neox_exports_back_to_its_checkpoint() {
    round_trip("gpt_neox", "gpt_neox");
    round_trip("gpt_neox_full", "gpt_neox");
}

#[test]
fn gptj_exports_back_to_its_checkpoint() {
    round_trip("gptj", "gptj");
}

/// Rotary embeddings and parallel residuals have no GPT-2 or GPT-Neo layout, and GPT-J's
/// layout has no second LayerNorm.
#[test]
fn rotary_and_parallel_models_go_to_their_own_families_only() {
    let (neox, _) = common::load("gpt_neox");
    for family in [Family::Gpt3, Family::GptNeo, Family::GptJ] {
        let err = export::plan(family, &neox.config, &mut names_of(&neox)).unwrap_err();
        assert!(err.to_string().contains("cannot be exported"), "{err}");
    }
}

fn names_of(m: &Model) -> TensorMap {
    let mut map = TensorMap::new();
    for (name, range) in pg_llm_engine::model::weights::packed_tensors(&m.config) {
        let shape = m
            .config
            .param_specs()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1;
        map.insert(
            name,
            (shape, m.weights.storage().as_f32().unwrap()[range].to_vec()),
        );
    }
    map
}

/// The GPT-3 configuration of make_export_fixtures.py.
fn gpt3_config(banded: bool) -> ModelConfig {
    let base = ModelConfig {
        n_positions: 64,
        vocab: 100,
        d_ff: 128,
        ..ModelConfig::gpt3(2, 32, 4, 8)
    };
    if banded {
        ModelConfig {
            local_window: Some(5),
            ..base
        }
    } else {
        ModelConfig {
            attention_pattern: vec![AttnKind::Dense],
            local_window: None,
            ..base
        }
    }
}

fn export_dir(case: &str) -> PathBuf {
    fixture_dir("../export").join(case)
}

fn gpt3_exports_like_transformers(case: &str, banded: bool, family: Family, model_type: &str) {
    let cfg = gpt3_config(banded);
    let dir = export_dir(case);
    let canonical = read_map(dir.join("canonical.safetensors"));
    let plan = export::plan(Family::Gpt3, &cfg, &mut canonical.clone()).unwrap();
    assert_eq!(plan.family, family);
    assert_eq!(plan.config["model_type"], model_type);

    // The tensors transformers was given (folding rounds, hence a tolerance).
    let want = read_map(dir.join("hf.safetensors"));
    let got =
        safetensors::read(&export_bytes(&plan, &mut canonical.clone(), &cfg), "export").unwrap();
    let names = |m: &TensorMap| m.keys().cloned().collect::<HashSet<_>>();
    assert_eq!(names(&got), names(&want), "{case}: exported tensor names");
    for (n, (shape, values)) in &got {
        let (want_shape, want_values) = &want[n];
        assert_eq!(shape, want_shape, "{case}: shape of {n}");
        let worst = values
            .iter()
            .zip(want_values)
            .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-6, "{case}: {n} differs by {worst}");
    }

    // The config transformers was built from, read back by the importer, is the exported one.
    let committed: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        hf_config::parse(&plan.config).unwrap().0,
        hf_config::parse(&committed).unwrap().0,
        "{case}: config.json"
    );

    // And the engine, running the GPT-3 model itself, computes transformers' logits.
    let expected = std::fs::read(dir.join("expected.safetensors")).unwrap();
    let ids: Vec<u32> = safetensors::read_ints(&expected, "input_ids")
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect();
    let want_logits = safetensors::read_one(&expected, "logits").unwrap().1;
    let weights = ModelWeights::load(&cfg, &mut MapSource::new(canonical)).unwrap();
    let model = Model::new(cfg, weights).unwrap();
    let logits = model.logits(&ids, Cancel::NEVER).unwrap();
    let worst = logits
        .iter()
        .zip(&want_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst < 1e-4,
        "{case}: logits differ from transformers by {worst}"
    );
}

#[test]
fn dense_gpt3_exports_as_gpt2_with_transformers_logits() {
    gpt3_exports_like_transformers("dense", false, Family::Gpt2, "gpt2");
}

#[test]
fn banded_gpt3_exports_as_gpt_neo_with_transformers_logits() {
    gpt3_exports_like_transformers("local", true, Family::GptNeo, "gpt_neo");
}

#[test]
fn a_query_bias_has_no_gpt_neo_equivalent() {
    let cfg = gpt3_config(true);
    let mut canonical = read_map(export_dir("local").join("canonical.safetensors"));
    canonical.get_mut("layers.1.attn.q_proj.bias").unwrap().1[3] = 0.25;
    let err = export::plan(Family::Gpt3, &cfg, &mut canonical.clone()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("layer 1") && msg.contains("query bias"),
        "{msg}"
    );
}

#[test]
fn post_layernorm_without_opt_positions_is_refused() {
    let cfg = ModelConfig {
        ln_placement: pg_llm_engine::model::LnPlacement::Post,
        ..gpt3_config(false)
    };
    let params = TensorMap::new();
    assert!(export::plan(Family::Gpt3, &cfg, &mut params.clone()).is_err());
}

#[test]
fn packed_weights_export_like_the_tensor_map() {
    let cfg = gpt3_config(true);
    let canonical = read_map(export_dir("local").join("canonical.safetensors"));
    let weights = ModelWeights::load(&cfg, &mut MapSource::new(canonical.clone())).unwrap();
    let mut packed = Packed::new(&cfg, weights.storage().as_f32().unwrap());
    let plan = export::plan(Family::Gpt3, &cfg, &mut packed).unwrap();
    assert_eq!(
        export_bytes(&plan, &mut packed, &cfg),
        export_bytes(&plan, &mut canonical.clone(), &cfg)
    );
}

#[test]
fn shards_split_in_order_and_index_every_tensor() {
    let cfg = gpt3_config(true);
    let canonical = read_map(export_dir("local").join("canonical.safetensors"));
    let plan = export::plan(Family::Gpt3, &cfg, &mut canonical.clone()).unwrap();
    let total: u64 = plan.tensors.iter().map(export::data_bytes).sum();
    let shards = export::shards(&plan.tensors, total / 3);
    assert!(shards.len() >= 3, "{} shards", shards.len());
    assert_eq!(
        shards.iter().map(|s| s.len()).sum::<usize>(),
        plan.tensors.len()
    );
    for s in &shards {
        let bytes: u64 = s.iter().map(export::data_bytes).sum();
        assert!(
            s.len() == 1 || bytes <= total / 3,
            "a shard of {bytes} bytes"
        );
    }
    let index = export::shard_index(&shards);
    assert_eq!(index["metadata"]["total_size"], total);
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), plan.tensors.len());
    assert_eq!(
        map[&plan.tensors[0].name],
        export::shard_file_name(1, shards.len())
    );
    assert_eq!(export::shards(&plan.tensors, u64::MAX).len(), 1);
}

#[test]
fn manifest_entries_describe_the_written_file() {
    use pg_llm_engine::formats::manifest;
    let cfg = gpt3_config(true);
    let canonical = read_map(export_dir("local").join("canonical.safetensors"));
    let plan = export::plan(Family::Gpt3, &cfg, &mut canonical.clone()).unwrap();
    let n_tensors = plan.tensors.len();
    // The folder export: model.safetensors and the manifest describing it.
    let mut folder = export::Folder::new(plan, &cfg, u64::MAX).unwrap();
    let mut made: HashMap<String, Vec<u8>> = HashMap::new();
    let mut params = canonical.clone();
    while let Some(name) = folder.next_file().map(str::to_string) {
        let mut bytes = Vec::new();
        while let Some(chunk) = folder.next_chunk(&mut params, 1000).unwrap() {
            bytes.extend_from_slice(&chunk.bytes());
        }
        made.insert(name, bytes);
    }
    let bytes = made.remove("model.safetensors").unwrap();
    let manifest = String::from_utf8(made.remove(export::MANIFEST).unwrap()).unwrap();
    let entries = manifest::parse(&manifest).unwrap();
    assert_eq!(entries.len(), n_tensors);
    let mut files = checkpoint::Blobs(HashMap::from([(
        "model.safetensors".to_string(),
        bytes.as_slice(),
    )]));
    let mut from_manifest = TensorMap::new();
    for s in checkpoint::manifest_tensors(entries, str::to_string) {
        let values = checkpoint::read(&mut files, &s).unwrap();
        from_manifest.insert(s.name, (s.shape, values));
    }
    assert_eq!(from_manifest, safetensors::read(&bytes, "export").unwrap());
}
