//! Checkpoint export: a model's weights as a Hugging Face checkpoint `transformers` loads with
//! the same logits (`formats::export` plans names, layouts and config.json).

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use pg_llm_engine::formats::export::{self, Plan};
use pg_llm_engine::formats::hf_config::Family;
use pg_llm_engine::formats::pg_gpt2;
use pg_llm_engine::model::ModelConfig;
use pg_llm_engine::{EngineError, Result};
use pgrx::prelude::*;
use pgrx::JsonB;

use super::args::{self, required};
use crate::errors::run;
use crate::files::{self, StagedFiles};
use crate::spi;
use crate::store::{self, TableTensors};

/// Runs `f` with the model's configuration, its export plan and its tensors, all read from
/// the tables under one snapshot: the export is one committed state of the model, read one
/// tensor at a time (no copy of the whole model in memory, whatever its size).
fn with_plan<R>(
    model: &str,
    f: impl FnOnce(&ModelConfig, &Plan, &mut TableTensors) -> Result<R>,
) -> Result<R> {
    spi::consistent(|| {
        let stored = store::load_config(model)?;
        let family = Family::parse(&stored.family)?;
        let mut tensors = TableTensors::new(model, &stored.config)?;
        let plan = export::plan(family, &stored.config, &mut tensors)?;
        f(&stored.config, &plan, &mut tensors)
    })
}

fn write(
    out: &mut dyn Write,
    cfg: &ModelConfig,
    tensors: &[export::Planned],
    params: &mut TableTensors,
    manifest_file: Option<&str>,
) -> Result<export::Written> {
    export::write_safetensors(out, tensors, params, cfg, manifest_file, &mut || {
        pgrx::check_for_interrupts!();
        Ok(())
    })
}

/// The largest bytea PostgreSQL stores.
const MAX_BYTEA: u64 = (1 << 30) - 1;

/// Refuses a bytes-form export whose tensors alone exceed a bytea (less 1 MB for headers);
/// `path_form` is the call to use instead.
fn check_fits_bytea(plan: &Plan, path_form: &str) -> Result<()> {
    let size: u64 = plan.tensors.iter().map(export::data_bytes).sum();
    if size > MAX_BYTEA - (1 << 20) {
        return Err(EngineError::too_large(format!(
            "the export holds {size} bytes of tensors, beyond a bytea's 1 GB; use {path_form}"
        )));
    }
    Ok(())
}

/// The model as one safetensors file in its Hugging Face family's layout (bytes; any role
/// that may read the model). Larger than 1 GB: use the path form, which shards.
#[pg_extern(volatile, parallel_safe)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn pg_llm_export_safetensors_bytes(model: Option<&str>) -> Vec<u8> {
    run("pg_llm_export_safetensors_bytes", || {
        with_plan(args::model_name(model, "model")?, |cfg, plan, params| {
            check_fits_bytea(plan, "pg_llm_export_safetensors(path, model)")?;
            let mut bytes = Vec::new();
            write(&mut bytes, cfg, &plan.tensors, params, None)?;
            Ok(bytes)
        })
    })
}

/// The `config.json` of the model's export (what `from_pretrained` needs beside the weights).
#[pg_extern(volatile, parallel_safe)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn pg_llm_export_config(model: Option<&str>) -> JsonB {
    run("pg_llm_export_config", || {
        with_plan(args::model_name(model, "model")?, |_, plan, _| {
            Ok(JsonB(plan.config.clone()))
        })
    })
}

/// The model as one of pg_gpt2's checkpoint archives (its `.npz`), for GPT-2-layout models
/// with a tied head (bytes; any role that may read the model).
#[pg_extern(volatile, parallel_safe)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn pg_llm_export_npz_bytes(model: Option<&str>) -> Vec<u8> {
    run("pg_llm_export_npz_bytes", || {
        with_plan(args::model_name(model, "model")?, |cfg, plan, params| {
            let entries = pg_gpt2::archive_entries(plan)?;
            check_fits_bytea(plan, "pg_llm_export_npz(path, model)")?;
            let mut bytes = Vec::new();
            write_npz(&mut bytes, cfg, params, &entries)?;
            Ok(bytes)
        })
    })
}

/// `pg_llm_export_npz_bytes` to a server file (absolute path), written under a temporary
/// name and renamed into place when complete; restricted like COPY TO a file. Returns the
/// bytes written.
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn pg_llm_export_npz(path: Option<&str>, model: Option<&str>) -> i64 {
    run("pg_llm_export_npz", || {
        files::require_write_privilege("pg_llm_export_npz")?;
        let path = absolute(required(path, "path")?)?;
        with_plan(args::model_name(model, "model")?, |cfg, plan, params| {
            let entries = pg_gpt2::archive_entries(plan)?;
            let mut staged = StagedFiles::default();
            let file = staged.create(&path)?;
            let mut out = BufWriter::with_capacity(8 << 20, file);
            write_npz(&mut out, cfg, params, &entries)?;
            out.flush().map_err(|e| {
                EngineError::Io(format!("could not write \"{}\": {e}", path.display()))
            })?;
            let written = out
                .get_ref()
                .metadata()
                .map_err(|e| {
                    EngineError::Io(format!("could not stat \"{}\": {e}", path.display()))
                })?
                .len();
            drop(out);
            staged.commit()?;
            Ok(written as i64)
        })
    })
}

fn write_npz(
    out: &mut dyn Write,
    cfg: &ModelConfig,
    params: &mut TableTensors,
    entries: &[(String, &export::Planned)],
) -> Result<()> {
    pg_gpt2::write_archive(out, entries, params, cfg, &mut || {
        pgrx::check_for_interrupts!();
        Ok(())
    })
}

/// A server path for writing: absolute, so it never lands relative to the data directory.
fn absolute(path: &str) -> Result<PathBuf> {
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(EngineError::invalid(format!(
            "path must be absolute, got \"{}\"",
            path.display()
        )));
    }
    Ok(path)
}

/// Hugging Face's default shard size (save_pretrained's "5GB").
const DEFAULT_SHARD_BYTES: i64 = 5_000_000_000;

/// Exports to a server path, restricted like COPY TO a file. A path ending in `.safetensors`
/// gets that one file; any other path is a directory (created if missing) that receives
/// config.json and model.safetensors, or shards of at most `max_shard_size` bytes with
/// model.safetensors.index.json — a folder `from_pretrained` loads as it is. Files appear
/// only once complete; a previous export's weight files in the directory are replaced.
/// Returns the bytes written.
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn pg_llm_export_safetensors(
    path: Option<&str>,
    model: Option<&str>,
    max_shard_size: default!(Option<i64>, 5000000000),
) -> i64 {
    run("pg_llm_export_safetensors", || {
        files::require_write_privilege("pg_llm_export_safetensors")?;
        let path = absolute(required(path, "path")?)?;
        let max_shard = required(max_shard_size, "max_shard_size")?;
        if max_shard <= 0 {
            return Err(EngineError::invalid(format!(
                "max_shard_size must be positive, got {max_shard} (default {DEFAULT_SHARD_BYTES})"
            )));
        }
        with_plan(args::model_name(model, "model")?, |cfg, plan, params| {
            let mut staged = StagedFiles::default();
            let mut out = Output {
                staged: &mut staged,
                cfg,
                params,
            };
            if path.extension().is_some_and(|e| e == "safetensors") {
                let written = out.safetensors(&path, &plan.tensors, false)?;
                staged.commit()?;
                return Ok(written.bytes as i64);
            }
            let (written, names) = out.directory(&path, plan, max_shard as u64)?;
            staged.commit()?;
            remove_stale_weights(&path, &names)?;
            Ok(written as i64)
        })
    })
}

/// Where a path-form export writes: staged files, filled from the model's tables.
struct Output<'a> {
    staged: &'a mut StagedFiles,
    cfg: &'a ModelConfig,
    params: &'a mut TableTensors,
}

/// The tensor manifest of a folder export.
const MANIFEST: &str = "model.manifest.jsonl";

impl Output<'_> {
    /// One safetensors file; with `manifest`, its tensors' manifest entries too.
    fn safetensors(
        &mut self,
        path: &Path,
        tensors: &[export::Planned],
        manifest: bool,
    ) -> Result<export::Written> {
        let file = self.staged.create(path)?;
        let mut out = BufWriter::with_capacity(8 << 20, file);
        let name = path.file_name().map(|n| n.to_string_lossy().to_string());
        let manifest_file = name.as_deref().filter(|_| manifest);
        let written = write(&mut out, self.cfg, tensors, self.params, manifest_file)?;
        out.flush()
            .map_err(|e| EngineError::Io(format!("could not write \"{}\": {e}", path.display())))?;
        Ok(written)
    }

    fn json(&mut self, path: &Path, json: &serde_json::Value) -> Result<u64> {
        let text = serde_json::to_vec_pretty(json)
            .map_err(|e| EngineError::Internal(format!("{}: {e}", path.display())))?;
        self.bytes(path, &text)
    }

    fn bytes(&mut self, path: &Path, bytes: &[u8]) -> Result<u64> {
        self.staged
            .create(path)?
            .write_all(bytes)
            .map_err(|e| EngineError::Io(format!("could not write \"{}\": {e}", path.display())))?;
        Ok(bytes.len() as u64)
    }

    /// config.json, the weights (one file or shards with their index) and the manifest;
    /// returns the bytes written and the weight files' names.
    fn directory(&mut self, dir: &Path, plan: &Plan, max_shard: u64) -> Result<(u64, Vec<String>)> {
        std::fs::create_dir_all(dir).map_err(|e| {
            EngineError::Io(format!(
                "could not create directory \"{}\": {e}",
                dir.display()
            ))
        })?;
        let mut written = self.json(&dir.join("config.json"), &plan.config)?;
        let shards = export::shards(&plan.tensors, max_shard);
        let mut names = Vec::new();
        let mut entries = Vec::new();
        for (k, shard) in shards.iter().enumerate() {
            let name = if shards.len() == 1 {
                "model.safetensors".to_string()
            } else {
                export::shard_file_name(k + 1, shards.len())
            };
            let w = self.safetensors(&dir.join(&name), shard, true)?;
            written += w.bytes;
            entries.extend(w.entries);
            names.push(name);
        }
        if shards.len() > 1 {
            let index = export::shard_index(&shards);
            names.push("model.safetensors.index.json".to_string());
            written += self.json(&dir.join("model.safetensors.index.json"), &index)?;
        }
        // The manifest: every tensor's byte range and checksum (formats::manifest).
        let manifest = pg_llm_engine::formats::manifest::to_jsonl(&entries);
        written += self.bytes(&dir.join(MANIFEST), manifest.as_bytes())?;
        Ok((written, names))
    }
}

/// A previous export's weight files that the new one did not replace would shadow or mix
/// with it (`from_pretrained` prefers model.safetensors over an index): remove them.
fn remove_stale_weights(dir: &Path, current: &[String]) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        EngineError::Io(format!(
            "could not read directory \"{}\": {e}",
            dir.display()
        ))
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let shard =
            name.starts_with("model-") && name.contains("-of-") && name.ends_with(".safetensors");
        let weights =
            shard || name == "model.safetensors" || name == "model.safetensors.index.json";
        if weights && !current.contains(&name) {
            std::fs::remove_file(entry.path()).map_err(|e| {
                EngineError::Io(format!(
                    "could not remove \"{}\": {e}",
                    entry.path().display()
                ))
            })?;
        }
    }
    Ok(())
}
