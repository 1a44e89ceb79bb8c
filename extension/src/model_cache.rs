//! Per-backend cache of materialised models, keyed by the model's version (a sequence value
//! that changes with every write), so a backend reads a model once and again only after a
//! change.
//!
//! Weight files (`pg_llm.weight_files`, on by default) make the first call of a new
//! connection cheap too: the first backend to need a version reads it from `llm_param` into
//! its weight file (see weight_cache.rs), and every backend then maps that file, sharing one
//! copy of the weights in the page cache. Versions are never reused (they
//! come from a sequence), so a file's name and header say exactly which state of the tables
//! it holds; a file written inside a transaction that rolls back is simply never asked for.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use pg_llm_engine::formats::TensorMap;
use pg_llm_engine::model::{MapSource, Model, ModelWeights, Storage};
use pg_llm_engine::Result;

use crate::spi;
use crate::store::{self, StoredConfig, TableSource};
use crate::weight_cache::{self, FilePlace};

thread_local! {
    static MODELS: RefCell<HashMap<String, (i64, Rc<Model>)>> = RefCell::new(HashMap::new());
}

/// The current weights of `model`, loading them when the cache is cold or stale. The version,
/// the configuration and every tensor are read under one snapshot, so the weights are exactly
/// one committed state of the tables, and the weight file written for that version holds it.
pub fn get(model: &str) -> Result<Rc<Model>> {
    spi::consistent(|| load(model)).map(|(_, m)| m)
}

/// `get` with the version the weights are.
pub fn get_versioned(model: &str) -> Result<(i64, Rc<Model>)> {
    spi::consistent(|| load(model))
}

fn load(model: &str) -> Result<(i64, Rc<Model>)> {
    let stored = store::load_config(model)?;
    let version = stored.version;
    if let Some(hit) = MODELS.with(|m| {
        m.borrow()
            .get(model)
            .filter(|(v, _)| *v == stored.version)
            .map(|(_, m)| m.clone())
    }) {
        return Ok((version, hit));
    }
    // Drop a stale copy first so two versions never sit in memory together.
    MODELS.with(|m| m.borrow_mut().remove(model));
    let from_tables = || ModelWeights::load(&stored.config, &mut TableSource::new(model));
    let weights = if crate::guc::WEIGHT_FILES.get() {
        let place = FilePlace::new(model, stored.version)?;
        weight_cache::open_or_write(&place, &stored.config, from_tables)?
    } else {
        from_tables()?
    };
    remember(model, stored, weights).map(|m| (version, m))
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
    publish_weights(model, stored, private)
}

/// `publish` for weights already in the packed layout (a training call's result).
pub fn publish_packed(model: &str, weights: Vec<f32>) -> Result<()> {
    let stored = store::load_config(model)?;
    let private = ModelWeights::from_storage(&stored.config, Arc::new(Storage::Owned(weights)))?;
    publish_weights(model, stored, private)
}

/// Shares `private` through the version's weight file (when weight files are on) and caches it.
fn publish_weights(model: &str, stored: StoredConfig, private: ModelWeights) -> Result<()> {
    let weights = if crate::guc::WEIGHT_FILES.get() {
        weight_cache::share(
            &FilePlace::new(model, stored.version)?,
            &stored.config,
            private,
        )?
    } else {
        private
    };
    remember(model, stored, weights).map(|_| ())
}

/// Drops this backend's copy of `model` (a training call holds its own while it runs).
pub fn forget(model: &str) {
    MODELS.with(|m| m.borrow_mut().remove(model));
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
