//! pg_gpt2's checkpoint archives (tests/fixtures/pg_gpt2, written by
//! make_pg_gpt2_fixtures.py from the GPT-2 fixture the way pg_gpt2's converter and its C
//! export wrote them) import to exactly that checkpoint's model, and a GPT-2 model exports to
//! an archive that reads back to the same arrays.

mod common;

use common::fixture_dir;
use pg_llm_engine::formats::hf_config::{self, Family};
use pg_llm_engine::formats::{export, names, pg_gpt2, safetensors, TensorMap};
use pg_llm_engine::model::ModelConfig;

fn gpt2() -> (ModelConfig, TensorMap) {
    let dir = fixture_dir("gpt2");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let (cfg, family) = hf_config::parse(&config).unwrap();
    let raw = safetensors::read(
        &std::fs::read(dir.join("model.safetensors")).unwrap(),
        "gpt2",
    )
    .unwrap();
    let canonical = names::to_canonical(family, &cfg, raw).unwrap();
    (cfg, canonical)
}

fn archive(name: &str) -> Vec<u8> {
    std::fs::read(fixture_dir("../pg_gpt2").join(name)).unwrap()
}

fn import(bytes: &[u8], cfg: &ModelConfig) -> pg_llm_engine::Result<TensorMap> {
    let raw = pg_gpt2::to_gpt2_checkpoint(pg_gpt2::read(bytes)?, cfg)?;
    names::to_canonical(Family::Gpt2, cfg, raw)
}

#[test]
fn shaped_and_flattened_archives_import_to_the_checkpoint() {
    let (cfg, want) = gpt2();
    for name in ["gpt2.npz", "gpt2_flat.npz"] {
        let got = import(&archive(name), &cfg).unwrap();
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn export_writes_what_pg_gpt2_wrote() {
    let (cfg, canonical) = gpt2();
    let plan = export::plan(Family::Gpt2, &cfg, &mut canonical.clone()).unwrap();
    let entries = pg_gpt2::archive_entries(&plan).unwrap();
    let mut bytes = Vec::new();
    pg_gpt2::write_archive(
        &mut bytes,
        &entries,
        &mut canonical.clone(),
        &cfg,
        &mut || Ok(()),
    )
    .unwrap();
    let mut ours = pg_gpt2::read(&bytes).unwrap();
    let mut theirs = pg_gpt2::read(&archive("gpt2.npz")).unwrap();
    ours.sort_by(|a, b| a.0.cmp(&b.0));
    theirs.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(ours, theirs);
    assert_eq!(import(&bytes, &cfg).unwrap(), canonical);
}

#[test]
fn other_layouts_and_bad_archives_are_refused() {
    // GPT-Neo has no place in a GPT-2 archive.
    let dir = fixture_dir("gpt_neo");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let (neo_cfg, family) = hf_config::parse(&config).unwrap();
    let raw = safetensors::read(
        &std::fs::read(dir.join("model.safetensors")).unwrap(),
        "neo",
    )
    .unwrap();
    let neo = names::to_canonical(family, &neo_cfg, raw).unwrap();
    let plan = export::plan(family, &neo_cfg, &mut neo.clone()).unwrap();
    assert!(pg_gpt2::archive_entries(&plan).is_err());

    let (cfg, _) = gpt2();
    let good = archive("gpt2.npz");
    // Not gzip, truncated, another model's shapes, an array too few.
    assert!(pg_gpt2::read(b"PK\x03\x04 not gzip").is_err());
    assert!(pg_gpt2::read(&good[..good.len() / 2]).is_err());
    let wider = ModelConfig {
        d_model: cfg.d_model * 2,
        d_head: cfg.d_head * 2,
        ..cfg.clone()
    };
    assert!(import(&good, &wider).is_err());
    let mut entries = pg_gpt2::read(&good).unwrap();
    entries.retain(|(n, _, _)| n != "h.1.mlp.c_fc.bias");
    let raw = pg_gpt2::to_gpt2_checkpoint(entries, &cfg).unwrap();
    let err = names::to_canonical(Family::Gpt2, &cfg, raw).unwrap_err();
    assert!(
        err.to_string().contains("h.1.mlp.fc_in.bias")
            || err.to_string().contains("layers.1.mlp.fc_in.bias"),
        "{err}"
    );
}
