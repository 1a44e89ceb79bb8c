//! Per-backend cache of materialised models, keyed by the model's version (a sequence value
//! that changes with every write), so a backend reads a model once and again only after a
//! change.
//!
//! Weight files (`pg_llm.weight_files`, on by default) make the first call of a new
//! connection cheap too: the first backend to need a version reads it from `llm_param` into
//! `$PGDATA/pg_llm_cache/<database oid>/<version>.weights`, and every backend then maps that
//! file, sharing one copy of the weights in the page cache. Versions are never reused (they
//! come from a sequence), so a file's name and header say exactly which state of the tables
//! it holds; a file written inside a transaction that rolls back is simply never asked for.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use pg_llm_engine::formats::TensorMap;
use pg_llm_engine::model::weight_file::{self, FileId, Rejected};
use pg_llm_engine::model::{MapSource, Model, ModelConfig, ModelWeights};
use pg_llm_engine::{EngineError, Result};
use pgrx::pg_sys;

use crate::errors::spi_error;
use crate::spi;
use crate::store::{self, StoredConfig, TableSource};

thread_local! {
    static MODELS: RefCell<HashMap<String, (i64, Rc<Model>)>> = RefCell::new(HashMap::new());
}

/// The current weights of `model`, loading them when the cache is cold or stale. The version,
/// the configuration and every tensor are read under one snapshot, so the weights are exactly
/// one committed state of the tables, and the weight file written for that version holds it.
pub fn get(model: &str) -> Result<Rc<Model>> {
    spi::consistent(|| load(model))
}

fn load(model: &str) -> Result<Rc<Model>> {
    let stored = store::load_config(model)?;
    if let Some(hit) = MODELS.with(|m| {
        m.borrow()
            .get(model)
            .filter(|(v, _)| *v == stored.version)
            .map(|(_, m)| m.clone())
    }) {
        return Ok(hit);
    }
    // Drop a stale copy first so two versions never sit in memory together.
    MODELS.with(|m| m.borrow_mut().remove(model));
    let weights = if crate::guc::WEIGHT_FILES.get() {
        let place = FilePlace::new(model, stored.version)?;
        match weight_file::open(&place.path, &place.id, &stored.config)? {
            Ok(mapped) => mapped,
            Err(rejected) => {
                if let Rejected::Corrupt(why) = rejected {
                    pgrx::log!(
                        "pg_llm: rebuilding weight file \"{}\": {why}",
                        place.path.display()
                    );
                }
                let private = ModelWeights::load(&stored.config, &mut TableSource::new(model))?;
                share(&place, &stored.config, private)?
            }
        }
    } else {
        ModelWeights::load(&stored.config, &mut TableSource::new(model))?
    };
    remember(model, stored, weights)
}

/// What this backend holds: (model, version, mapped from a weight file, bytes of weights).
pub fn loaded() -> Vec<(String, i64, bool, i64)> {
    let mut out: Vec<_> = MODELS.with(|m| {
        m.borrow()
            .iter()
            .map(|(name, (version, model))| {
                let storage = model.weights.storage();
                (
                    name.clone(),
                    *version,
                    storage.is_mapped(),
                    (storage.as_slice().len() * 4) as i64,
                )
            })
            .collect()
    });
    out.sort();
    out
}

/// Called right after all of `model`'s parameters were written (init, import) with the
/// tensors still in memory: caches the new version in this backend and writes its weight file,
/// so the next call, here or in any other connection, reads nothing from `llm_param`.
pub fn publish(model: &str, tensors: TensorMap) -> Result<()> {
    let stored = store::load_config(model)?;
    // MapSource frees each tensor once packed: the weights are never held twice.
    let private = ModelWeights::load(&stored.config, &mut MapSource::new(tensors))?;
    let weights = if crate::guc::WEIGHT_FILES.get() {
        share(
            &FilePlace::new(model, stored.version)?,
            &stored.config,
            private,
        )?
    } else {
        private
    };
    remember(model, stored, weights).map(|_| ())
}

fn remember(model: &str, stored: StoredConfig, weights: ModelWeights) -> Result<Rc<Model>> {
    let version = stored.version;
    let loaded = Rc::new(Model::new(stored.config, weights)?);
    MODELS.with(|m| {
        m.borrow_mut()
            .insert(model.to_string(), (version, loaded.clone()))
    });
    Ok(loaded)
}

/// Where the weight file of one version of a model lives, and the identity it must carry.
struct FilePlace {
    dir: PathBuf,
    path: PathBuf,
    id: FileId,
    param_table: u32,
}

impl FilePlace {
    fn new(model: &str, version: i64) -> Result<Self> {
        let param_table = param_table_oid()?;
        let dir = database_dir();
        Ok(Self {
            path: dir.join(format!("{version}.weights")),
            dir,
            id: FileId {
                owner: format!("{param_table}:{model}"),
                version,
            },
            param_table,
        })
    }
}

/// Writes `private` to its weight file and returns the weights mapped from it (the private
/// copy is then freed). A file-system problem (full disk, permissions) costs sharing, not the
/// query: the private copy is kept, with a WARNING.
fn share(place: &FilePlace, cfg: &ModelConfig, private: ModelWeights) -> Result<ModelWeights> {
    let attempt = || -> Result<ModelWeights> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&place.dir)
            .map_err(|e| {
                EngineError::Io(format!("could not create \"{}\": {e}", place.dir.display()))
            })?;
        let mapped = weight_file::write(&place.path, &place.id, cfg, private.storage().as_slice())?;
        prune(place);
        Ok(mapped)
    };
    match attempt() {
        Ok(mapped) => Ok(mapped),
        Err(EngineError::Io(why)) => {
            pgrx::warning!("pg_llm: model weights stay private to this connection: {why}");
            Ok(private)
        }
        Err(e) => Err(e),
    }
}

/// `$PGDATA/pg_llm_cache/<database oid>`: model names and versions are per database.
fn database_dir() -> PathBuf {
    // SAFETY: DataDir is set at postmaster start and never changes; MyDatabaseId is set once
    // the backend has connected, before any SQL function can run.
    let (data_dir, database) = unsafe {
        (
            std::ffi::CStr::from_ptr(pg_sys::DataDir)
                .to_string_lossy()
                .into_owned(),
            pg_sys::MyDatabaseId.to_u32(),
        )
    };
    Path::new(&data_dir)
        .join("pg_llm_cache")
        .join(database.to_string())
}

/// The OID of `llm_param`: it changes when the extension is dropped and created again, which
/// restarts the version sequence, so files of an earlier installation never match.
fn param_table_oid() -> Result<u32> {
    spi::read_one::<pg_sys::Oid>("SELECT 'llm_param'::regclass::oid", &[])?
        .map(|o| o.to_u32())
        .ok_or_else(|| EngineError::Internal("llm_param has no OID".into()))
}

/// Removes files this one supersedes: other versions of the same model, files of an earlier
/// installation of the extension, files of models no longer registered, and the directories
/// of dropped databases. Backends still mapping a removed file keep their mapping.
fn prune(place: &FilePlace) {
    let (dir, keep, id) = (&place.dir, &place.path, &place.id);
    let mut models = HashSet::new();
    let listed = spi::read("SELECT model FROM llm_model_config", &[], |row| {
        models.extend(row.get::<String>(1).map_err(spi_error)?);
        Ok(())
    });
    if listed.is_err() {
        return;
    }
    let prefix = format!("{}:", place.param_table);
    let entries = fs::read_dir(dir).into_iter().flatten().flatten();
    for path in entries.map(|e| e.path()) {
        if path == *keep || path.extension().is_none_or(|e| e != "weights") {
            continue;
        }
        let superseded = match weight_file::read_id(&path) {
            Some(other) => match other.owner.strip_prefix(&prefix) {
                Some(model) => other.owner == id.owner || !models.contains(model),
                None => true,
            },
            None => false,
        };
        if superseded {
            let _ = fs::remove_file(&path);
        }
    }
    let mut databases = HashSet::new();
    let listed = spi::read("SELECT oid FROM pg_database", &[], |row| {
        databases.extend(row.get::<pg_sys::Oid>(1).map_err(spi_error)?.map(|o| o.to_u32()));
        Ok(())
    });
    let (Ok(()), Some(root)) = (listed, dir.parent()) else {
        return;
    };
    for entry in fs::read_dir(root).into_iter().flatten().flatten() {
        let dropped = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|oid| !databases.contains(&oid));
        if dropped {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}
