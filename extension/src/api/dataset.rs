//! Training data as SQL: llm_dataset_from_text (tokenize and cut into blocks) and
//! llm_dataset_retokenize (move rows to another model's vocabulary). Clients with token ids
//! already load them in bulk with COPY into llm_dataset (see training.sql).

use pg_llm_engine::{EngineError, Result};
use pgrx::prelude::*;

use super::args::{self, required};
use crate::errors::{run, spi_error};
use crate::{spi, tokenizer_cache};

/// Start of each block of `len` tokens over a stream of `n`: every `stride` tokens while a
/// whole block (and its next-token targets) fits, then one last block ending at the stream's
/// end, so that no token is left out and every block has the same length.
fn block_starts(n: usize, len: usize, stride: usize) -> Vec<usize> {
    let last = n - 1 - len; // the last start whose block's targets fit
    let mut starts: Vec<usize> = (0..=last).step_by(stride).collect();
    if starts.last() != Some(&last) {
        starts.push(last);
    }
    starts
}

fn insert_row(model: &str, split: &str, tokens: &[u32], target: &[u32]) -> Result<()> {
    let ids = |s: &[u32]| s.iter().map(|&t| t as i32).collect::<Vec<i32>>();
    Spi::run_with_args(
        "INSERT INTO llm_dataset (model, split, tokens, target) VALUES ($1, $2, $3, $4)",
        &[
            model.into(),
            split.into(),
            ids(tokens).into(),
            ids(target).into(),
        ],
    )
    .map_err(spi_error)
}

/// Tokenizes `text_in` with the model's tokenizer (documents separated by `<|endoftext|>`,
/// which becomes the end-of-text token) and adds rows of `block_size` tokens with their
/// next-token targets, starting every `stride` tokens (NULL: `block_size`, no overlap); the
/// last row ends at the text's end. A text shorter than one block gives one shorter row.
/// Returns the number of rows added.
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn llm_dataset_from_text(
    model: Option<&str>,
    text_in: Option<&str>,
    block_size: default!(Option<i32>, 2048),
    stride: default!(Option<i32>, "NULL"),
    split: default!(Option<&str>, "'train'"),
) -> i64 {
    run("llm_dataset_from_text", || {
        crate::privileges::require_writer(model)?;
        let model = args::model_name(model, "model")?;
        let split = args::model_name(split, "split")?;
        let block = required(block_size, "block_size")?;
        let stride = stride.unwrap_or(block);
        if block < 1 || stride < 1 {
            return Err(EngineError::invalid(format!(
                "block_size and stride must be at least 1, got {block} and {stride}"
            )));
        }
        let bpe = tokenizer_cache::for_model(model)?;
        let ids = bpe.encode(required(text_in, "text_in")?)?;
        if ids.len() < 2 {
            return Err(EngineError::invalid(format!(
                "text_in gives {} token(s); a row needs at least 2 (a token and its target)",
                ids.len()
            )));
        }
        let len = (block as usize).min(ids.len() - 1);
        let starts = block_starts(ids.len(), len, stride as usize);
        for &s in &starts {
            pgrx::check_for_interrupts!();
            insert_row(model, split, &ids[s..s + len], &ids[s + 1..s + len + 1])?;
        }
        Ok(starts.len() as i64)
    })
}

/// Copies rows of `source_model` (one split, or all with NULL) to `target_model`, decoding
/// each row's text with the source tokenizer and encoding it with the target's: one row per
/// source row, in the same split, whose length follows the new vocabulary. Returns the rows
/// added (rows whose text gives fewer than 2 tokens are skipped).
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn llm_dataset_retokenize(
    source_model: Option<&str>,
    target_model: Option<&str>,
    split: default!(Option<&str>, "NULL"),
) -> i64 {
    run("llm_dataset_retokenize", || {
        crate::privileges::require_writer(target_model)?;
        let source = args::model_name(source_model, "source_model")?;
        let target = args::model_name(target_model, "target_model")?;
        let from = tokenizer_cache::for_model(source)?;
        let to = tokenizer_cache::for_model(target)?;
        let mut rows: Vec<(String, Vec<u32>)> = Vec::new();
        spi::read(
            "SELECT split, tokens || target[cardinality(target)] FROM llm_dataset \
             WHERE model = $1 AND ($2::text IS NULL OR split = $2) ORDER BY id",
            &[source.into(), split.into()],
            |row| {
                let split: String = row.get(1).map_err(spi_error)?.unwrap_or_default();
                rows.push((split, crate::dataset::token_ids(row, 2)?));
                Ok(())
            },
        )?;
        let mut added = 0;
        for (split, ids) in rows {
            pgrx::check_for_interrupts!();
            let new = to.encode(&from.decode(&ids)?)?;
            if new.len() >= 2 {
                insert_row(target, &split, &new[..new.len() - 1], &new[1..])?;
                added += 1;
            }
        }
        Ok(added)
    })
}

#[cfg(test)]
mod tests {
    use super::block_starts;

    #[test]
    fn blocks_cover_the_stream() {
        // 10 tokens, blocks of 4 (+1 target): starts 0, 4, and 5 to reach the end.
        assert_eq!(block_starts(10, 4, 4), vec![0, 4, 5]);
        assert_eq!(block_starts(9, 4, 4), vec![0, 4]);
        assert_eq!(block_starts(10, 4, 2), vec![0, 2, 4, 5]);
        assert_eq!(block_starts(3, 2, 8), vec![0]);
    }
}
