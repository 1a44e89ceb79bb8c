//! Models as SQL: initialisation, checkpoint import, logits.

use pg_llm_engine::formats::{export, hf_config, manifest, names, pg_gpt2, safetensors, TensorMap};
use pg_llm_engine::model::check_tensors;
use pg_llm_engine::model::init::init_params;
use pg_llm_engine::model::ModelConfig;
use pg_llm_engine::{tensor, EngineError, Result};
use pgrx::prelude::*;
use pgrx::JsonB;

use super::args::{self, required};
use super::float32_bytea::Float32Bytea;
use crate::errors::{cancel, run};
use crate::{files, model_cache, store};

/// Initialises every parameter of a registered model (GPT-2/3 scheme), replacing any it had.
/// Returns the number of parameters written.
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn llm_init_params(model: Option<&str>, seed: default!(Option<i64>, 0)) -> i64 {
    run("llm_init_params", || {
        let model = args::model_name(model, "model")?;
        let stored = store::load_config(model)?;
        let params = init_params(&stored.config, required(seed, "seed")? as u64)?;
        store::write_params(model, &params)?;
        let n = count(&params);
        model_cache::publish(model, params)?;
        Ok(n)
    })
}

fn count(t: &TensorMap) -> i64 {
    t.values().map(|(_, d)| d.len() as i64).sum()
}

/// Shared by both import forms: `files` are the checkpoint's safetensors blobs.
fn import(model: &str, files: Vec<(String, Vec<u8>)>, config: Option<JsonB>) -> Result<i64> {
    import_tensors(model, config, || {
        let mut raw = TensorMap::new();
        for (what, bytes) in files {
            pgrx::check_for_interrupts!();
            for (name, t) in safetensors::read(&bytes, &what)? {
                if raw.insert(name.clone(), t).is_some() {
                    return Err(EngineError::data(format!(
                        "tensor \"{name}\" appears in more than one shard"
                    )));
                }
            }
        }
        Ok(raw)
    })
}

/// Resolves the model (from `config`, or its registered row), then maps the checkpoint's
/// tensors (its family's names, from `read`) onto it, checks them against its configuration
/// and writes them, all or nothing.
fn import_tensors(
    model: &str,
    config: Option<JsonB>,
    read: impl FnOnce() -> Result<TensorMap>,
) -> Result<i64> {
    let (cfg, family) = match config {
        Some(JsonB(json)) => {
            let (cfg, family) = hf_config::parse(&json)?;
            store::ensure_config(model, &cfg, family.name())?;
            (cfg, family)
        }
        None => {
            let stored = store::load_config(model)?;
            (stored.config, hf_config::Family::parse(&stored.family)?)
        }
    };
    let canonical = names::to_canonical(family, &cfg, read()?)?;
    store_canonical(model, &cfg, canonical)
}

/// Checks completeness and shapes before writing anything (without copying the weights),
/// then writes the parameters and publishes them; returns the parameter count.
fn store_canonical(model: &str, cfg: &ModelConfig, canonical: TensorMap) -> Result<i64> {
    check_tensors(cfg, &canonical)?;
    store::write_params(model, &canonical)?;
    let n = count(&canonical);
    model_cache::publish(model, canonical)?;
    Ok(n)
}

/// A pg_gpt2 archive into a registered model that GPT-2's checkpoint layout expresses.
fn import_npz(model: &str, bytes: &[u8]) -> Result<i64> {
    let stored = store::load_config(model)?;
    let family = hf_config::Family::parse(&stored.family)?;
    let cfg = stored.config;
    if !matches!(
        export::target_family(family, &cfg),
        hf_config::Family::Gpt2 | hf_config::Family::Cerebras
    ) {
        return Err(EngineError::invalid(format!(
            "pg_gpt2 archives hold GPT-2 models; model \"{model}\" has locally banded layers or \
             another family's layout"
        )));
    }
    let raw = pg_gpt2::to_gpt2_checkpoint(pg_gpt2::read(bytes)?, &cfg)?;
    let canonical = names::to_canonical(hf_config::Family::Gpt2, &cfg, raw)?;
    store_canonical(model, &cfg, canonical)
}

/// Imports one of pg_gpt2's checkpoint archives (its `.npz`: a gzip stream of GPT-2's arrays,
/// shaped or flattened) given as bytes into a registered model. All or nothing; any role
/// with table privileges. Returns the parameter count.
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn pg_llm_import_npz_bytes(data: Option<&[u8]>, model: Option<&str>) -> i64 {
    run("pg_llm_import_npz_bytes", || {
        import_npz(args::model_name(model, "model")?, required(data, "data")?)
    })
}

/// `pg_llm_import_npz_bytes` from a server file; restricted like COPY FROM.
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn pg_llm_import_npz(path: Option<&str>, model: Option<&str>) -> i64 {
    run("pg_llm_import_npz", || {
        files::require_read_privilege("pg_llm_import_npz")?;
        let bytes = files::read(required(path, "path")?)?;
        import_npz(args::model_name(model, "model")?, &bytes)
    })
}

/// Imports a Hugging Face safetensors checkpoint given as bytes (any role). With `config`
/// (the checkpoint's config.json) the model row is created or checked and the family detected;
/// without it the model must be registered. All or nothing. Returns the parameter count.
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn pg_llm_import_safetensors_bytes(
    data: Option<&[u8]>,
    model: Option<&str>,
    config: default!(Option<JsonB>, "NULL"),
) -> i64 {
    run("pg_llm_import_safetensors_bytes", || {
        let data = required(data, "data")?.to_vec();
        import(
            args::model_name(model, "model")?,
            vec![("data".into(), data)],
            config,
        )
    })
}

/// Imports from a server path: a `.safetensors` file, a sharded checkpoint's
/// `model.safetensors.index.json`, a directory holding either, or a tensor manifest
/// (`*.jsonl`, `formats::manifest`) whose checksums are all verified before anything is
/// written. Restricted like COPY FROM.
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn pg_llm_import_safetensors(
    path: Option<&str>,
    model: Option<&str>,
    config: default!(Option<JsonB>, "NULL"),
) -> i64 {
    run("pg_llm_import_safetensors", || {
        files::require_read_privilege("pg_llm_import_safetensors")?;
        let path = std::path::PathBuf::from(required(path, "path")?);
        if path.to_string_lossy().ends_with(".jsonl") {
            return import_manifest(&path, args::model_name(model, "model")?, config);
        }
        let index = if path.is_dir() {
            let idx = path.join("model.safetensors.index.json");
            if idx.exists() {
                Some(idx)
            } else {
                None
            }
        } else if path.to_string_lossy().ends_with(".index.json") {
            Some(path.clone())
        } else {
            None
        };
        let shards: Vec<std::path::PathBuf> = match index {
            Some(idx) => {
                let json: serde_json::Value =
                    serde_json::from_slice(&files::read(&idx.to_string_lossy())?).map_err(|e| {
                        EngineError::data(format!("{} is not JSON: {e}", idx.display()))
                    })?;
                let map = json
                    .get("weight_map")
                    .and_then(|m| m.as_object())
                    .ok_or_else(|| {
                        EngineError::data(format!("{} has no weight_map", idx.display()))
                    })?;
                let mut files: Vec<String> = map
                    .values()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect();
                files.sort();
                files.dedup();
                let dir = idx.parent().unwrap_or(std::path::Path::new("."));
                files.iter().map(|f| dir.join(f)).collect()
            }
            None if path.is_dir() => vec![path.join("model.safetensors")],
            None => vec![path],
        };
        let mut blobs = Vec::new();
        for shard in shards {
            let name = shard.to_string_lossy().to_string();
            blobs.push((name.clone(), files::read(&name)?));
        }
        import(args::model_name(model, "model")?, blobs, config)
    })
}

/// A checkpoint described by a tensor manifest: each tensor's byte range is read from its
/// file (relative to the manifest) and checked against its sha256 before anything is written.
fn import_manifest(path: &std::path::Path, model: &str, config: Option<JsonB>) -> Result<i64> {
    import_tensors(model, config, || {
        let entries = manifest::parse(&files::read_text(&path.to_string_lossy())?)?;
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        manifest::read_tensors(&entries, &mut |e| {
            files::read_range(&dir.join(&e.file).to_string_lossy(), e.offset, e.length)
        })
    })
}

/// float32 logits [T, vocab] for every position of `token_ids`.
#[pg_extern(volatile, parallel_safe)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn llm_logits(
    token_ids: Option<Vec<Option<i32>>>,
    model_name: default!(Option<&str>, "'gpt3-125m'"),
) -> Float32Bytea {
    run("llm_logits", || {
        let ids = args::token_ids(token_ids, "token_ids")?;
        let model = model_cache::get(args::model_name(model_name, "model_name")?)?;
        if ids.len() > model.config.n_positions {
            return Err(EngineError::invalid(format!(
                "{} tokens exceed the model's context of {} tokens",
                ids.len(),
                model.config.n_positions
            )));
        }
        let len = tensor::numel(&[ids.len(), model.config.vocab], "logits")?;
        Float32Bytea::computed(len, cancel(), |out| model.logits_into(out, &ids, cancel()))
    })
}
