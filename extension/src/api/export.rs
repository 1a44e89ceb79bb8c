//! Checkpoint export: a model's weights as a Hugging Face checkpoint `transformers` loads with
//! the same logits (`formats::export` plans names, layouts and config.json).

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use pg_llm_engine::formats::export::{self, Plan};
use pg_llm_engine::formats::hf_config::Family;
use pg_llm_engine::formats::{pg_gpt2, PIECE};
use pg_llm_engine::model::ModelConfig;
use pg_llm_engine::{EngineError, Result};
use pgrx::prelude::*;
use pgrx::JsonB;

use super::args::{self, required};
use super::float32_bytea::Bytea;
use crate::errors::{report, run};
use crate::files::{self, StagedFiles};
use crate::spi;
use crate::store::{self, TableTensors};

/// A model's export, planned: its configuration, the plan, its tensors (read from the tables
/// when made) and the model version it was planned from. Run inside `spi::consistent`.
struct PlannedExport {
    cfg: ModelConfig,
    plan: Plan,
    tensors: TableTensors,
    version: i64,
}

fn plan_export(model: &str) -> Result<PlannedExport> {
    let stored = store::load_config(model)?;
    let family = Family::parse(&stored.family)?;
    let mut tensors = TableTensors::new(model, &stored.config)?;
    let plan = export::plan(family, &stored.config, &mut tensors)?;
    Ok(PlannedExport {
        cfg: stored.config,
        plan,
        tensors,
        version: stored.version,
    })
}

/// Runs `f` with the model's configuration, its export plan and its tensors, all read from
/// the tables under one snapshot: the export is one committed state of the model, read one
/// tensor at a time (no copy of the whole model in memory, whatever its size).
fn with_plan<R>(
    model: &str,
    f: impl FnOnce(&ModelConfig, &Plan, &mut TableTensors) -> Result<R>,
) -> Result<R> {
    spi::consistent(|| {
        let mut p = plan_export(model)?;
        f(&p.cfg, &p.plan, &mut p.tensors)
    })
}

fn write(
    out: &mut dyn Write,
    cfg: &ModelConfig,
    tensors: &[export::Planned],
    params: &mut TableTensors,
) -> Result<u64> {
    export::write_safetensors(out, tensors, params, cfg, &mut || {
        pgrx::check_for_interrupts!();
        Ok(())
    })
}

/// The largest bytea PostgreSQL stores.
const MAX_BYTEA: u64 = (1 << 30) - 1;

/// The bytes of a bytes-form export's tensors; refused when they exceed a bytea (less 1 MB
/// for headers), `path_form` being the call to use instead.
fn check_fits_bytea(plan: &Plan, path_form: &str) -> Result<u64> {
    let size: u64 = plan.tensors.iter().map(export::data_bytes).sum();
    if size > MAX_BYTEA - (1 << 20) {
        return Err(EngineError::too_large(format!(
            "the export holds {size} bytes of tensors, beyond a bytea's 1 GB; use {path_form}"
        )));
    }
    Ok(size)
}

/// The model as one safetensors file in its Hugging Face family's layout (bytes; any role
/// that may read the model). Larger than 1 GB: use the path form, which shards.
#[pg_extern(volatile, parallel_safe)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn pg_llm_export_safetensors_bytes(model: Option<&str>) -> Bytea {
    run("pg_llm_export_safetensors_bytes", || {
        with_plan(args::model_name(model, "model")?, |cfg, plan, params| {
            let size = check_fits_bytea(plan, "pg_llm_export_safetensors(path, model)")?;
            // Room for the tensors and a header up front: growing the buffer would copy it.
            let mut bytes = Vec::with_capacity(size as usize + (1 << 20));
            write(&mut bytes, cfg, &plan.tensors, params)?;
            Ok(Bytea(bytes))
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
fn pg_llm_export_npz_bytes(model: Option<&str>) -> Bytea {
    run("pg_llm_export_npz_bytes", || {
        with_plan(args::model_name(model, "model")?, |cfg, plan, params| {
            let entries = pg_gpt2::archive_entries(plan)?;
            check_fits_bytea(plan, "pg_llm_export_npz(path, model)")?;
            let mut bytes = Vec::new();
            write_npz(&mut bytes, cfg, params, &entries)?;
            Ok(Bytea(bytes))
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
                let written = out.safetensors(&path, &plan.tensors)?;
                staged.commit()?;
                return Ok(written as i64);
            }
            let (written, names) = out.directory(&path, plan, max_shard as u64)?;
            staged.commit()?;
            remove_stale_weights(&path, &names)?;
            Ok(written as i64)
        })
    })
}

/// The largest piece a pieces export hands out: one bytea of at most 1 GB − 1.
const MAX_PIECE_BYTES: i32 = (1 << 30) - 1;

/// A pieces export in progress: one piece per call, made when PostgreSQL asks for the row.
/// Each call reads under a snapshot of its own, in which the model must still have the
/// version the export was planned from.
struct PieceRun {
    model: String,
    version: i64,
    params: TableTensors,
    pieces: export::Pieces,
    emitted: bool,
}

type PieceRow = (String, i64, Vec<u8>);

impl PieceRun {
    fn next_piece(&mut self) -> Result<Option<PieceRow>> {
        spi::consistent(|| {
            let now: Option<i64> = spi::read_one(
                "SELECT version FROM llm_model_config WHERE model = $1",
                &[self.model.as_str().into()],
            )?;
            if now != Some(self.version) {
                return Err(EngineError::Conflict(format!(
                    "model \"{}\" changed during the export (it was {}); retry, or run the \
                     export in a REPEATABLE READ transaction, where every piece reads the same \
                     snapshot",
                    self.model,
                    match now {
                        Some(v) => format!("at version {}, now {v}", self.version),
                        None => format!("at version {}, now dropped", self.version),
                    }
                )));
            }
            let piece = self.pieces.next_piece(&mut self.params, &mut || {
                pgrx::check_for_interrupts!();
                Ok(())
            })?;
            Ok(piece.map(|p| (p.file, p.offset as i64, p.data)))
        })
    }
}

impl Iterator for PieceRun {
    type Item = PieceRow;

    fn next(&mut self) -> Option<PieceRow> {
        // The previous piece is in PostgreSQL's output buffer: send it before making the next.
        if self.emitted {
            crate::flush::flush_to_client();
        }
        self.emitted = true;
        match self.next_piece() {
            Ok(row) => row,
            Err(e) => report("pg_llm_export_safetensors_pieces", e),
        }
    }
}

/// The folder `pg_llm_export_safetensors(path, model, max_shard_size)` writes (config.json,
/// model.safetensors or shards with model.safetensors.index.json, model.manifest.jsonl, the
/// same bytes), as rows of at most `piece_bytes` bytes: each file's pieces in order of
/// `offset`, files in the order written. Called in the select list, each row is made when
/// PostgreSQL asks for it and sent to the client before the next is made, so the server holds
/// about one piece (or one tensor whose layout changes). Every piece checks that the model
/// has not changed since the first (40001 otherwise: run it in a REPEATABLE READ
/// transaction). Any role that may read the model.
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn pg_llm_export_safetensors_pieces(
    model: Option<&str>,
    max_shard_size: default!(Option<i64>, 5000000000),
    piece_bytes: default!(Option<i32>, 16777216),
) -> TableIterator<
    'static,
    (
        name!(file, String),
        name!(offset, i64),
        name!(data, Vec<u8>),
    ),
> {
    let run_ = run("pg_llm_export_safetensors_pieces", || {
        let model = args::model_name(model, "model")?;
        let max_shard = required(max_shard_size, "max_shard_size")?;
        if max_shard <= 0 {
            return Err(EngineError::invalid(format!(
                "max_shard_size must be positive, got {max_shard} (default {DEFAULT_SHARD_BYTES})"
            )));
        }
        let piece = required(piece_bytes, "piece_bytes")?;
        if !(1..=MAX_PIECE_BYTES).contains(&piece) {
            return Err(EngineError::invalid(format!(
                "piece_bytes must be between 1 and {MAX_PIECE_BYTES} (a bytea's limit), got {piece}"
            )));
        }
        let planned = spi::consistent(|| plan_export(model))?;
        let folder = export::Folder::new(planned.plan, &planned.cfg, max_shard as u64)?;
        Ok(PieceRun {
            model: model.to_string(),
            version: planned.version,
            params: planned.tensors,
            pieces: export::Pieces::new(folder, piece as usize)?,
            emitted: false,
        })
    });
    TableIterator::new(run_)
}

/// Where a path-form export writes: staged files, filled from the model's tables.
struct Output<'a> {
    staged: &'a mut StagedFiles,
    cfg: &'a ModelConfig,
    params: &'a mut TableTensors,
}

impl Output<'_> {
    /// One safetensors file.
    fn safetensors(&mut self, path: &Path, tensors: &[export::Planned]) -> Result<u64> {
        let file = self.staged.create(path)?;
        let mut out = BufWriter::with_capacity(8 << 20, file);
        let written = write(&mut out, self.cfg, tensors, self.params)?;
        out.flush()
            .map_err(|e| EngineError::Io(format!("could not write \"{}\": {e}", path.display())))?;
        Ok(written)
    }

    /// The folder `export::Folder` describes (config.json, the weights, their index and the
    /// manifest) in `dir`; returns the bytes written and the weight files' names.
    fn directory(&mut self, dir: &Path, plan: &Plan, max_shard: u64) -> Result<(u64, Vec<String>)> {
        std::fs::create_dir_all(dir).map_err(|e| {
            EngineError::Io(format!(
                "could not create directory \"{}\": {e}",
                dir.display()
            ))
        })?;
        let mut folder = export::Folder::new(plan.clone(), self.cfg, max_shard)?;
        let mut written = 0;
        while let Some(name) = folder.next_file() {
            let path = dir.join(name);
            let io = |e: std::io::Error| {
                EngineError::Io(format!("could not write \"{}\": {e}", path.display()))
            };
            let mut out = BufWriter::with_capacity(8 << 20, self.staged.create(&path)?);
            loop {
                pgrx::check_for_interrupts!();
                let Some(chunk) = folder.next_chunk(self.params, PIECE)? else {
                    break;
                };
                out.write_all(&chunk.bytes()).map_err(io)?;
                written += chunk.len() as u64;
            }
            out.flush().map_err(io)?;
        }
        Ok((written, folder.weight_files()))
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
