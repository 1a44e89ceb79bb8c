//! Property tests of the checkpoint parsers on hostile input: whatever the bytes, reading a
//! safetensors file, a pg_gpt2 archive, a tensor manifest or a config.json, and mapping what it holds onto a
//! model, ends in a value or an error — never a panic, and never a model whose tensors do
//! not match its configuration. Mutations of a valid checkpoint (truncation, flipped bytes,
//! a rewritten header length, edited header text) exercise the paths past the first check.

mod common;

use common::fixture_dir;
use std::collections::HashMap;

use pg_llm_engine::formats::checkpoint::{self, Blobs};
use pg_llm_engine::formats::{hf_config, manifest, names, pg_gpt2, safetensors, TensorMap};
use pg_llm_engine::model::check_tensors;
use proptest::prelude::*;

fn valid_checkpoint() -> Vec<u8> {
    std::fs::read(fixture_dir("gpt2").join("model.safetensors")).unwrap()
}

fn valid_config() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture_dir("gpt2").join("config.json")).unwrap())
        .unwrap()
}

/// Parses `bytes` as a GPT-2 checkpoint and maps it; any outcome but a panic is fine, and a
/// success must be a complete, well-shaped model.
fn import(bytes: &[u8]) {
    let (cfg, family) = hf_config::parse(&valid_config()).unwrap();
    // In memory, as the bytea form reads it…
    if let Ok(raw) = safetensors::read(bytes, "fuzzed") {
        if let Ok(canonical) = names::to_canonical(family, &cfg, raw) {
            check_tensors(&cfg, &canonical).unwrap();
        }
    }
    // …and streamed from its header, as the server-file forms read it.
    let mut files = Blobs(HashMap::from([("fuzzed".to_string(), bytes)]));
    if let Ok(stored) = checkpoint::safetensors_tensors(&mut files, "fuzzed") {
        let mut canonical = TensorMap::new();
        let imported = checkpoint::import(family, &cfg, &stored, &mut files, &mut |n, s, at, v| {
            assert_eq!(at, 0, "fixture tensors are smaller than a piece");
            canonical.insert(n.to_string(), (s.to_vec(), v));
            Ok(())
        });
        if imported.is_ok() {
            check_tensors(&cfg, &canonical).unwrap();
            for (shape, values) in canonical.values() {
                assert_eq!(shape.iter().product::<usize>(), values.len());
                assert!(values.iter().all(|v| v.is_finite()));
            }
        }
    }
}

/// Reads `bytes` as a pg_gpt2 archive into the GPT-2 fixture's model; any outcome but a panic.
fn import_archive(bytes: &[u8]) {
    let (cfg, family) = hf_config::parse(&valid_config()).unwrap();
    if let Ok(entries) = pg_gpt2::read(bytes) {
        if let Ok(raw) = pg_gpt2::to_gpt2_checkpoint(entries, &cfg) {
            let _ = names::to_canonical(family, &cfg, raw);
        }
    }
}

fn valid_archive() -> Vec<u8> {
    std::fs::read(fixture_dir("../pg_gpt2").join("gpt2.npz")).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        import(&bytes);
    }

    #[test]
    fn truncated_checkpoints(cut in 0usize..40_000) {
        let valid = valid_checkpoint();
        import(&valid[..cut.min(valid.len())]);
    }

    #[test]
    fn flipped_bytes(flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..8)) {
        let mut bytes = valid_checkpoint();
        for (at, x) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= x;
        }
        import(&bytes);
    }

    #[test]
    fn rewritten_header_length(len in any::<u64>()) {
        let mut bytes = valid_checkpoint();
        bytes[..8].copy_from_slice(&len.to_le_bytes());
        import(&bytes);
    }

    #[test]
    fn edited_header_text(at in any::<prop::sample::Index>(), text in "[\\[\\]{}\",:0-9A-Za-z_. -]{0,12}") {
        let bytes = valid_checkpoint();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut header = bytes[8..8 + header_len].to_vec();
        let i = at.index(header.len());
        header.splice(i..(i + text.len()).min(header.len()), text.bytes());
        let mut edited = (header.len() as u64).to_le_bytes().to_vec();
        edited.extend(header);
        edited.extend_from_slice(&bytes[8 + header_len..]);
        import(&edited);
    }

    #[test]
    fn archives_from_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        import_archive(&bytes);
        // Behind a valid gzip header too, so the entry parser sees the bytes.
        import_archive(&flate2_stream(&bytes));
    }

    #[test]
    fn archives_with_flipped_or_cut_bytes(at in any::<prop::sample::Index>(), x in 1u8..=255, cut in 0usize..200_000) {
        let mut bytes = valid_archive();
        let i = at.index(bytes.len());
        bytes[i] ^= x;
        import_archive(&bytes);
        let valid = valid_archive();
        import_archive(&valid[..cut.min(valid.len())]);
    }

    #[test]
    fn arbitrary_manifests(text in "(\\{[ -~]{0,80}\\}\n){0,4}") {
        let _ = manifest::parse(&text);
    }

    #[test]
    fn edited_manifest_lines(field in 0usize..7, value in "[ -~]{0,24}") {
        let keys = ["name", "dtype", "shape", "file", "offset", "length", "sha256"];
        let mut line = serde_json::json!({
            "name": "a", "dtype": "F32", "shape": [2, 3], "file": "x.safetensors",
            "offset": 8, "length": 24, "sha256": "0".repeat(64)
        });
        line[keys[field]] = serde_json::from_str(&value).unwrap_or(serde_json::Value::String(value));
        if let Ok(entries) = manifest::parse(&line.to_string()) {
            // Whatever parsed is self-consistent; reading checks the bytes it finds.
            let zeros = vec![0u8; entries[0].length.min(4096) as usize];
            let mut files = Blobs(HashMap::from([("x.safetensors".to_string(), zeros.as_slice())]));
            let stored = checkpoint::manifest_tensors(entries, str::to_string);
            let _ = checkpoint::read(&mut files, &stored[0]);
        }
    }

    #[test]
    fn edited_configs(key in 0usize..8, value in prop_oneof![
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        "[ -~]{0,8}".prop_map(serde_json::Value::from),
        Just(serde_json::Value::Null),
        Just(serde_json::json!([])),
    ]) {
        let keys = ["model_type", "n_layer", "n_embd", "n_head", "n_positions", "vocab_size", "n_inner", "layer_norm_epsilon"];
        let mut config = valid_config();
        config[keys[key]] = value;
        if let Ok((cfg, _)) = hf_config::parse(&config) {
            prop_assert!(cfg.validate().is_ok());
        }
    }
}

/// `bytes` as the content of a gzip stream (so the archive parser, not the decompressor,
/// sees them).
fn flate2_stream(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}
