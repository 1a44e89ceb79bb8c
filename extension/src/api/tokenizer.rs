//! The GPT-2/3 byte-level BPE tokenizer as SQL.

use pg_llm_engine::tokenizer::Bpe;
use pg_llm_engine::{EngineError, Result};
use pgrx::prelude::*;

use super::args::{self, required, token_ids};
use crate::errors::{run, spi_error};
use crate::{files, spi, store, tokenizer_cache};

/// Validates, stores (once per distinct content) and attaches a tokenizer to `model`.
fn attach(model: &str, vocab: &str, merges: &str) -> Result<i32> {
    store::load_config(model)?;
    let bpe = Bpe::new(vocab, merges)?;
    let n = bpe.vocab_size() as i32;
    let stored = Spi::connect_mut(|client| {
        let rows = client.update(
            "WITH ins AS (INSERT INTO llm_tokenizer (digest, vocab, merges, n_tokens) \
                          VALUES (md5($1 || E'\\x1f' || $2), $1, $2, $3) ON CONFLICT (digest) DO NOTHING RETURNING id) \
             SELECT id FROM ins UNION ALL SELECT id FROM llm_tokenizer WHERE digest = md5($1 || E'\\x1f' || $2) LIMIT 1",
            None,
            &[vocab.into(), merges.into(), n.into()],
        )?;
        if rows.is_empty() {
            Ok(None)
        } else {
            rows.first().get_one::<i64>()
        }
    })
    .map_err(spi_error)?;
    let id = match stored {
        Some(id) => id,
        // Another transaction stored the same files and committed while this insert waited
        // on it: the statement's snapshot predates that row, the next statement's does not.
        None => spi::read_one::<i64>(
            "SELECT id FROM llm_tokenizer WHERE digest = md5($1 || E'\\x1f' || $2)",
            &[vocab.into(), merges.into()],
        )?
        // (Not even then under REPEATABLE READ or SERIALIZABLE: a retry will see it.)
        .ok_or_else(|| {
            EngineError::Conflict(
                "a concurrent transaction stored the same tokenizer; retry the call".into(),
            )
        })?,
    };
    Spi::run_with_args(
        "INSERT INTO llm_model_tokenizer (model, tokenizer_id) VALUES ($1, $2) \
         ON CONFLICT (model) DO UPDATE SET tokenizer_id = EXCLUDED.tokenizer_id",
        &[model.into(), id.into()],
    )
    .map_err(spi_error)?;
    Ok(n)
}

/// Loads a tokenizer from file contents: `vocab` is encoder.json / vocab.json, `merges` is
/// vocab.bpe / merges.txt. Models loading identical files share one stored copy. Returns the
/// vocabulary size.
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn llm_load_tokenizer(model: Option<&str>, vocab: Option<&str>, merges: Option<&str>) -> i32 {
    run("llm_load_tokenizer", || {
        crate::privileges::require_writer(model)?;
        attach(
            args::model_name(model, "model")?,
            required(vocab, "vocab")?,
            required(merges, "merges")?,
        )
    })
}

/// pg_gpt2's two-step loading from server files (restricted like COPY FROM): the tokenizer
/// is attached once both halves are loaded. Returns the number of entries read.
fn load_half(function: &str, path: Option<&str>, model: Option<&str>, column: &str) -> Result<i32> {
    files::require_read_privilege(function)?;
    crate::privileges::require_writer(model)?;
    let model = args::model_name(model, "model")?;
    store::load_config(model)?;
    let content = files::read_text(required(path, "path")?)?;
    let entries = if column == "vocab" {
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&content)
            .map_err(|e| EngineError::data(format!("vocab file is not a JSON object: {e}")))?
            .len()
    } else {
        pg_llm_engine::tokenizer::parse_merges(&content)?.len()
    };
    let sql = format!(
        "INSERT INTO llm_tokenizer_staging (model, {column}) VALUES ($1, $2) \
         ON CONFLICT (model) DO UPDATE SET {column} = EXCLUDED.{column}"
    );
    Spi::run_with_args(&sql, &[model.into(), content.as_str().into()]).map_err(spi_error)?;
    let mut halves = (None, None);
    spi::read(
        "SELECT vocab, merges FROM llm_tokenizer_staging WHERE model = $1",
        &[model.into()],
        |row| {
            halves = (
                row.get::<String>(1).map_err(spi_error)?,
                row.get::<String>(2).map_err(spi_error)?,
            );
            Ok(())
        },
    )?;
    if let (Some(v), Some(m)) = halves {
        attach(model, &v, &m)?;
        Spi::run_with_args(
            "DELETE FROM llm_tokenizer_staging WHERE model = $1",
            &[model.into()],
        )
        .map_err(spi_error)?;
    }
    Ok(entries as i32)
}

#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn pg_llm_load_bpe_vocab(path: Option<&str>, model: Option<&str>) -> i32 {
    run("pg_llm_load_bpe_vocab", || {
        load_half("pg_llm_load_bpe_vocab", path, model, "vocab")
    })
}

#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn pg_llm_load_bpe_merges(path: Option<&str>, model: Option<&str>) -> i32 {
    run("pg_llm_load_bpe_merges", || {
        load_half("pg_llm_load_bpe_merges", path, model, "merges")
    })
}

/// Token ids of `text_in`; `<|endoftext|>` is the single token 50256.
#[pg_extern(stable, parallel_safe)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn llm_encode(text_in: Option<&str>, model: default!(Option<&str>, "'gpt3-125m'")) -> Vec<i32> {
    run("llm_encode", || {
        let bpe = tokenizer_cache::for_model(args::model_name(model, "model")?)?;
        Ok(bpe
            .encode(required(text_in, "text_in")?)?
            .into_iter()
            .map(|t| t as i32)
            .collect())
    })
}

/// Text of `ids` (every id decodes, repeated ones repeatedly).
#[pg_extern(stable, parallel_safe)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn llm_decode(
    ids: Option<Vec<Option<i32>>>,
    model: default!(Option<&str>, "'gpt3-125m'"),
) -> String {
    run("llm_decode", || {
        let bpe = tokenizer_cache::for_model(args::model_name(model, "model")?)?;
        let ids = match ids {
            Some(v) if v.is_empty() => return Ok(String::new()),
            other => token_ids(other, "ids")?,
        };
        bpe.decode(&ids)
    })
}
