//! Per-backend cache of tokenizers. A stored tokenizer never changes (rows are keyed by the
//! digest of their content), so its id is a sufficient cache key.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pg_llm_engine::tokenizer::Bpe;
use pg_llm_engine::{EngineError, Result};
use pgrx::prelude::*;

thread_local! {
    static TOKENIZERS: RefCell<HashMap<i64, Rc<Bpe>>> = RefCell::new(HashMap::new());
}

/// The tokenizer of `model`; 42704 when the model has none.
pub fn for_model(model: &str) -> Result<Rc<Bpe>> {
    let id = Spi::get_one_with_args::<i64>("SELECT tokenizer_id FROM llm_model_tokenizer WHERE model = $1", &[model.into()])
        .ok()
        .flatten()
        .ok_or_else(|| {
            EngineError::UndefinedObject(format!(
                "model \"{model}\" has no tokenizer; load one with llm_load_tokenizer(model, vocab, merges)"
            ))
        })?;
    if let Some(hit) = TOKENIZERS.with(|t| t.borrow().get(&id).cloned()) {
        return Ok(hit);
    }
    let (vocab, merges) = Spi::get_two_with_args::<String, String>(
        "SELECT vocab, merges FROM llm_tokenizer WHERE id = $1",
        &[id.into()],
    )
    .map_err(crate::errors::spi)?;
    let bpe = Rc::new(Bpe::new(
        &vocab.unwrap_or_default(),
        &merges.unwrap_or_default(),
    )?);
    TOKENIZERS.with(|t| t.borrow_mut().insert(id, bpe.clone()));
    Ok(bpe)
}
