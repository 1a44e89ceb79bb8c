//! Per-backend cache of tokenizers. A stored tokenizer never changes (rows are keyed by the
//! digest of their content), so its id is a sufficient cache key.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pg_llm_engine::tokenizer::Bpe;
use pg_llm_engine::{EngineError, Result};

use crate::errors::spi_error;
use crate::spi;

thread_local! {
    static TOKENIZERS: RefCell<HashMap<i64, Rc<Bpe>>> = RefCell::new(HashMap::new());
}

/// The tokenizer of `model`; 42704 when the model has none.
pub fn for_model(model: &str) -> Result<Rc<Bpe>> {
    let id = spi::read_one::<i64>(
        "SELECT tokenizer_id FROM llm_model_tokenizer WHERE model = $1",
        &[model.into()],
    )?
    .ok_or_else(|| {
            EngineError::UndefinedObject(format!(
                "model \"{model}\" has no tokenizer; load one with llm_load_tokenizer(model, vocab, merges)"
            ))
        })?;
    if let Some(hit) = TOKENIZERS.with(|t| t.borrow().get(&id).cloned()) {
        return Ok(hit);
    }
    let mut bpe = None;
    spi::read(
        "SELECT vocab, merges FROM llm_tokenizer WHERE id = $1",
        &[id.into()],
        |row| {
            let text = |i| {
                row.get::<&str>(i)
                    .map_err(spi_error)
                    .map(Option::unwrap_or_default)
            };
            bpe = Some(Rc::new(Bpe::new(text(1)?, text(2)?)?));
            Ok(())
        },
    )?;
    let bpe = bpe.ok_or_else(|| {
        EngineError::UndefinedObject(format!("tokenizer {id} of model \"{model}\" is gone"))
    })?;
    TOKENIZERS.with(|t| t.borrow_mut().insert(id, bpe.clone()));
    Ok(bpe)
}
