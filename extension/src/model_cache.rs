//! Per-backend cache of materialised models, keyed by the model's version (a sequence value
//! that changes with every write), so a backend reads a model once and again only after a
//! change.
//!
//! Weight files (`pg_llm.weight_files`, on by default) make the first call of a new
//! connection cheap too: the first backend to need a version reads it from `llm_param` into
//! its weight file (see weight_cache.rs), and every backend then maps that file, sharing one
//! copy of the weights in the page cache. Versions are never reused (they
//! come from a sequence), so a file's name and header say exactly which state of the tables
//! it holds; a file written for a transaction's own version is removed if it rolls back.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pg_llm_engine::memory::{self, Need};
use pg_llm_engine::model::dtype::Layout;
use pg_llm_engine::model::weights::packed_tensors;
use pg_llm_engine::model::{DType, Model, ModelConfig, ModelWeights};
use pg_llm_engine::Result;

use crate::admission;
use crate::spi;
use crate::stats::{self, Counter};
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

/// `get` for a call whose memory need `need` computes from the model's configuration (after
/// refusing input the model cannot take): the need is checked against `pg_llm.max_memory`
/// before any weight is loaded.
pub fn get_within(
    model: &str,
    what: &str,
    need: impl FnOnce(&ModelConfig, DType) -> Result<Need>,
) -> Result<Rc<Model>> {
    let stored = store::load_config(model)?;
    let mut need = need(&stored.config, stored.dtype)?;
    // The served copy holds the matrices in the model's weight dtype (half the bytes in
    // bfloat16 or float16), not the float32 the estimates count.
    if stored.dtype != DType::Float32 {
        need.weights = Layout::new(&stored.config, stored.dtype)?.bytes() as u64;
    }
    admission::admit(what, need)?;
    get(model)
}

/// Checks the need of `what` on `model` against `pg_llm.max_memory`; 42704 for an unknown
/// model.
pub fn admit(
    model: &str,
    what: &str,
    need: impl FnOnce(&ModelConfig) -> Result<Need>,
) -> Result<()> {
    let stored = store::load_config(model)?;
    admission::admit(what, need(&stored.config)?)
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
        stats::count(Counter::ModelCacheHits, 1);
        return Ok((version, hit));
    }
    stats::count(Counter::ModelLoads, 1);
    // Drop a stale copy first so two versions never sit in memory together.
    MODELS.with(|m| m.borrow_mut().remove(model));
    let mut tables = TableSource::new(model);
    let weights = if crate::guc::WEIGHT_FILES.get() {
        let place = FilePlace::new(model, stored.version, stored.dtype)?;
        weight_cache::open_or_write(&place, &stored.config, &mut tables)?
    } else {
        ModelWeights::load_as(&stored.config, &mut tables, stored.dtype)?
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
                    storage.image().len() as i64,
                )
            })
            .collect()
    });
    out.sort();
    out
}

/// Replaces every parameter of a model, one tensor at a time (initialisation, import): each
/// tensor goes into `llm_param` and, at its packed place, into the weight file of the new
/// version, then is freed, so memory holds one tensor whatever the size of the model. All in
/// the caller's transaction; an error or cancel leaves the old rows and no new file.
pub struct Replacement {
    model: String,
    cfg: ModelConfig,
    ranges: HashMap<String, std::ops::Range<usize>>,
    file: Option<weight_cache::PendingFile>,
    started: bool,
}

impl Replacement {
    /// Nothing is touched until the first tensor arrives: checks that run before it (names,
    /// shapes, checksums) fail with the old parameters untouched even inside the transaction.
    /// A model whose weights cannot be held within `pg_llm.max_memory` is refused here: it
    /// could never be used (see admission.rs).
    pub fn new(model: &str, cfg: &ModelConfig) -> Result<Self> {
        let ranges: HashMap<_, _> = packed_tensors(cfg).into_iter().collect();
        // Writing holds one piece of a tensor and its copy in a SQL value.
        let piece = ranges
            .values()
            .map(|r| r.len())
            .max()
            .unwrap_or(0)
            .min(pg_llm_engine::formats::PIECE);
        let need = Need {
            weights: memory::weights(cfg)?,
            working: 2 * 4 * piece as u64,
        };
        admission::admit(&format!("the model \"{model}\""), need)?;
        Ok(Self {
            model: model.to_string(),
            cfg: cfg.clone(),
            ranges,
            file: None,
            started: false,
        })
    }

    fn begin(&mut self) -> Result<()> {
        forget(&self.model);
        store::delete_params(&self.model)?;
        // A model registered to be served in half precision gets its file in it.
        let dtype = store::load_config(&self.model).map_or(DType::Float32, |s| s.dtype);
        self.file = weight_cache::start_file(&self.model, &self.cfg, dtype)?;
        self.started = true;
        Ok(())
    }

    /// Writes values `offset..` of one canonical tensor (the whole tensor, or a streamed
    /// piece; names and shapes were checked by the caller).
    pub fn put(
        &mut self,
        name: &str,
        shape: &[usize],
        offset: usize,
        values: Vec<f32>,
    ) -> Result<()> {
        if !self.started {
            self.begin()?;
        }
        store::insert_tensor(&self.model, name, shape, offset, &values)?;
        if let (Some(file), Some(range)) = (&mut self.file, self.ranges.get(name)) {
            if let Err(e) = file.write_at(range.start + offset, &values) {
                pgrx::warning!(
                    "pg_llm: the new weights of \"{}\" will not be shared: {e}",
                    self.model
                );
                self.file = None;
            }
        }
        Ok(())
    }

    /// Completes the weight file under the version the writes gave the model.
    pub fn finish(self) -> Result<()> {
        if let Some(file) = self.file {
            let version = store::load_config(&self.model)?.version;
            match file.finish(version) {
                Err(pg_llm_engine::EngineError::Io(why)) => {
                    pgrx::warning!("pg_llm: the new weights will not be shared: {why}")
                }
                other => other?,
            }
        }
        Ok(())
    }
}

/// Caches weights just written in the packed layout (a training call's result) and shares
/// them through the version's weight file.
pub fn publish_packed(model: &str, weights: Vec<f32>) -> Result<()> {
    let stored = store::load_config(model)?;
    let (cfg, dtype) = (&stored.config, stored.dtype);
    let weights = if crate::guc::WEIGHT_FILES.get() {
        weight_cache::share(&FilePlace::new(model, stored.version, dtype)?, cfg, weights)?
    } else {
        ModelWeights::from_values(cfg, weights, dtype)?
    };
    remember(model, stored, weights).map(|_| ())
}

/// The float32 values of `loaded` (the model as this backend holds it), all packed; read from
/// the tables when it is served in half precision (the tables keep the float32 master).
pub fn float32_values(model: &str, loaded: &Model) -> Result<Vec<f32>> {
    match loaded.weights.storage().as_f32() {
        Some(values) => Ok(values.to_vec()),
        None => {
            let w = ModelWeights::load(&loaded.config, &mut TableSource::new(model))?;
            Ok(w.storage().as_f32().expect("loaded as float32").to_vec())
        }
    }
}

/// `get_within` for work that needs the float32 weights (losses and gradients): a model
/// served in half precision is read from the tables into a copy of this call's own.
pub fn get_float32_within(
    model: &str,
    what: &str,
    need: impl FnOnce(&ModelConfig) -> Result<Need>,
) -> Result<Rc<Model>> {
    admit(model, what, need)?;
    spi::consistent(|| {
        let stored = store::load_config(model)?;
        if stored.dtype == DType::Float32 {
            return load(model).map(|(_, m)| m);
        }
        // Straight from the tables: the served half-precision copy is not needed.
        let weights = ModelWeights::load(&stored.config, &mut TableSource::new(model))?;
        Ok(Rc::new(Model::new(stored.config, weights)?))
    })
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
