//! Per-backend cache of materialised models, keyed by the model's version (a sequence value
//! that changes with every write), so weights are read from the tables once per backend and
//! reloaded only after a change.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pg_llm_engine::model::{MapSource, Model, ModelWeights};
use pg_llm_engine::Result;

use crate::store;

thread_local! {
    static MODELS: RefCell<HashMap<String, (i64, Rc<Model>)>> = RefCell::new(HashMap::new());
}

/// The current weights of `model`, loading them when the cache is cold or stale.
pub fn get(model: &str) -> Result<Rc<Model>> {
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
    let mut src = MapSource::new(store::read_params(model)?);
    let weights = ModelWeights::load(&stored.config, &mut src)?;
    src.finish()?;
    let loaded = Rc::new(Model::new(stored.config, weights)?);
    // Loading left many freed tensor-sized holes in the heap: give them back to the system.
    // SAFETY: plain libc call.
    unsafe {
        libc::malloc_trim(0);
    }
    MODELS.with(|m| {
        m.borrow_mut()
            .insert(model.to_string(), (stored.version, loaded.clone()))
    });
    Ok(loaded)
}
