//! Checkpoint export: a model's weights as a Hugging Face checkpoint `transformers` loads with
//! the same logits (`formats::export` plans names, layouts and config.json).

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use pg_llm_engine::formats::export::{self, Packed, Plan};
use pg_llm_engine::formats::hf_config::Family;
use pg_llm_engine::formats::pg_gpt2;
use pg_llm_engine::model::Model;
use pg_llm_engine::{EngineError, Result};
use pgrx::prelude::*;
use pgrx::JsonB;

use super::args::{self, required};
use crate::errors::run;
use crate::files::{self, StagedFiles};
use crate::{model_cache, spi, store};

/// The model's weights (one committed version) and its export plan.
fn planned(model: &str) -> Result<(Rc<Model>, Plan)> {
    let (family, loaded) = spi::consistent(|| -> Result<_> {
        let stored = store::load_config(model)?;
        Ok((Family::parse(&stored.family)?, model_cache::get(model)?))
    })?;
    let cfg = &loaded.config;
    let packed = Packed::new(cfg, loaded.weights.storage().as_slice());
    let plan = export::plan(family, cfg, &packed)?;
    Ok((loaded, plan))
}

fn write(
    out: &mut dyn Write,
    model: &Model,
    tensors: &[export::Planned],
    manifest_file: Option<&str>,
) -> Result<export::Written> {
    let packed = Packed::new(&model.config, model.weights.storage().as_slice());
    export::write_safetensors(
        out,
        tensors,
        &packed,
        &model.config,
        manifest_file,
        &mut || {
            pgrx::check_for_interrupts!();
            Ok(())
        },
    )
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
        let (loaded, plan) = planned(args::model_name(model, "model")?)?;
        check_fits_bytea(&plan, "pg_llm_export_safetensors(path, model)")?;
        let mut bytes = Vec::new();
        write(&mut bytes, &loaded, &plan.tensors, None)?;
        Ok(bytes)
    })
}

/// The `config.json` of the model's export (what `from_pretrained` needs beside the weights).
#[pg_extern(volatile, parallel_safe)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn pg_llm_export_config(model: Option<&str>) -> JsonB {
    run("pg_llm_export_config", || {
        Ok(JsonB(planned(args::model_name(model, "model")?)?.1.config))
    })
}

/// The model as one of pg_gpt2's checkpoint archives (its `.npz`), for GPT-2-layout models
/// with a tied head (bytes; any role that may read the model).
#[pg_extern(volatile, parallel_safe)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn pg_llm_export_npz_bytes(model: Option<&str>) -> Vec<u8> {
    run("pg_llm_export_npz_bytes", || {
        let (loaded, plan) = planned(args::model_name(model, "model")?)?;
        let entries = pg_gpt2::archive_entries(&plan)?;
        check_fits_bytea(&plan, "pg_llm_export_npz(path, model)")?;
        let mut bytes = Vec::new();
        write_npz(&mut bytes, &loaded, &entries)?;
        Ok(bytes)
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
        let (loaded, plan) = planned(args::model_name(model, "model")?)?;
        let entries = pg_gpt2::archive_entries(&plan)?;
        let mut staged = StagedFiles::default();
        let file = staged.create(&path)?;
        let mut out = BufWriter::with_capacity(8 << 20, file);
        write_npz(&mut out, &loaded, &entries)?;
        out.flush()
            .map_err(|e| EngineError::Io(format!("could not write \"{}\": {e}", path.display())))?;
        let written = out
            .get_ref()
            .metadata()
            .map_err(|e| EngineError::Io(format!("could not stat \"{}\": {e}", path.display())))?
            .len();
        drop(out);
        staged.commit()?;
        Ok(written as i64)
    })
}

fn write_npz(
    out: &mut dyn Write,
    model: &Model,
    entries: &[(String, &export::Planned)],
) -> Result<()> {
    let packed = Packed::new(&model.config, model.weights.storage().as_slice());
    pg_gpt2::write_archive(out, entries, &packed, &model.config, &mut || {
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
        let (loaded, plan) = planned(args::model_name(model, "model")?)?;
        let mut staged = StagedFiles::default();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let written = write_file(&mut staged, &path, &loaded, &plan.tensors, false)?;
            staged.commit()?;
            return Ok(written.bytes as i64);
        }
        let (written, names) =
            write_directory(&mut staged, &path, &loaded, &plan, max_shard as u64)?;
        staged.commit()?;
        remove_stale_weights(&path, &names)?;
        Ok(written as i64)
    })
}

/// One safetensors file; with `manifest`, its tensors' manifest entries too.
fn write_file(
    staged: &mut StagedFiles,
    path: &Path,
    model: &Model,
    tensors: &[export::Planned],
    manifest: bool,
) -> Result<export::Written> {
    let file = staged.create(path)?;
    let mut out = BufWriter::with_capacity(8 << 20, file);
    let name = path.file_name().map(|n| n.to_string_lossy().to_string());
    let written = write(
        &mut out,
        model,
        tensors,
        name.as_deref().filter(|_| manifest),
    )?;
    out.flush()
        .map_err(|e| EngineError::Io(format!("could not write \"{}\": {e}", path.display())))?;
    Ok(written)
}

fn write_json(staged: &mut StagedFiles, path: &Path, json: &serde_json::Value) -> Result<u64> {
    let text = serde_json::to_vec_pretty(json)
        .map_err(|e| EngineError::Internal(format!("{}: {e}", path.display())))?;
    write_bytes(staged, path, &text)
}

fn write_bytes(staged: &mut StagedFiles, path: &Path, bytes: &[u8]) -> Result<u64> {
    staged
        .create(path)?
        .write_all(bytes)
        .map_err(|e| EngineError::Io(format!("could not write \"{}\": {e}", path.display())))?;
    Ok(bytes.len() as u64)
}

/// The tensor manifest of a folder export.
const MANIFEST: &str = "model.manifest.jsonl";

fn write_directory(
    staged: &mut StagedFiles,
    dir: &Path,
    model: &Model,
    plan: &Plan,
    max_shard: u64,
) -> Result<(u64, Vec<String>)> {
    std::fs::create_dir_all(dir).map_err(|e| {
        EngineError::Io(format!(
            "could not create directory \"{}\": {e}",
            dir.display()
        ))
    })?;
    let mut written = write_json(staged, &dir.join("config.json"), &plan.config)?;
    let shards = export::shards(&plan.tensors, max_shard);
    let mut names = Vec::new();
    let mut entries = Vec::new();
    let mut add = |w: export::Written| {
        written += w.bytes;
        entries.extend(w.entries);
    };
    if shards.len() == 1 {
        names.push("model.safetensors".to_string());
        add(write_file(
            staged,
            &dir.join(&names[0]),
            model,
            shards[0],
            true,
        )?);
    } else {
        for (k, shard) in shards.iter().enumerate() {
            let name = export::shard_file_name(k + 1, shards.len());
            add(write_file(staged, &dir.join(&name), model, shard, true)?);
            names.push(name);
        }
        let index = export::shard_index(&shards);
        names.push("model.safetensors.index.json".to_string());
        written += write_json(staged, &dir.join("model.safetensors.index.json"), &index)?;
    }
    // The manifest: every tensor's byte range and checksum (formats::manifest).
    let manifest = pg_llm_engine::formats::manifest::to_jsonl(&entries);
    written += write_bytes(staged, &dir.join(MANIFEST), manifest.as_bytes())?;
    Ok((written, names))
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
