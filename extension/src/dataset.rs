//! How training walks `llm_dataset`.
//!
//! The samples of a split are windows of `seq_len` tokens: each row of the split (in id
//! order) gives ⌊length / seq_len⌋ non-overlapping windows from its start; a row shorter than
//! seq_len gives none. Sample k of a run (k = step·batch_size + b, where step counts the
//! model's optimizer steps before this one) is taken from epoch k / S (S samples) at place
//! k mod S of that epoch's order, a permutation drawn from (seed, epoch) alone. So the walk
//! depends only on the seed, the batch size and the model's step count: a run continued in a
//! later call, or resumed after a crash, reads exactly what one uninterrupted run would.

use pg_llm_engine::train::epoch_order;
use pg_llm_engine::{EngineError, Result};

use crate::errors::spi_error;
use crate::spi;

pub struct Samples {
    /// (row id, first token) of each window.
    windows: Vec<(i64, i32)>,
    pub seq_len: usize,
    seed: u64,
    order: Option<(u64, Vec<usize>)>,
}

impl Samples {
    /// The windows of `split` of `model`. `seq_len` None is the shortest row's length (at
    /// most the context), so every row counts.
    pub fn load(
        model: &str,
        split: &str,
        seq_len: Option<usize>,
        n_positions: usize,
        seed: u64,
    ) -> Result<Self> {
        let mut rows: Vec<(i64, usize)> = Vec::new();
        spi::read(
            "SELECT id, cardinality(tokens) FROM llm_dataset WHERE model = $1 AND split = $2 ORDER BY id",
            &[model.into(), split.into()],
            |row| {
                let id: i64 = row.get(1).map_err(spi_error)?.unwrap_or(0);
                let len: i32 = row.get(2).map_err(spi_error)?.unwrap_or(0);
                rows.push((id, len.max(0) as usize));
                Ok(())
            },
        )?;
        if rows.is_empty() {
            return Err(EngineError::NotReady(format!(
                "model \"{model}\" has no rows in split '{split}' of llm_dataset; add them with \
                 llm_dataset_from_text or COPY"
            )));
        }
        let seq_len = match seq_len {
            Some(s) if s > n_positions => {
                return Err(EngineError::invalid(format!(
                    "seq_len {s} exceeds the model's context of {n_positions}"
                )))
            }
            Some(s) => s,
            None => rows.iter().map(|r| r.1).min().unwrap_or(1).min(n_positions),
        };
        let windows: Vec<(i64, i32)> = rows
            .iter()
            .flat_map(|&(id, len)| (0..len / seq_len).map(move |k| (id, (k * seq_len) as i32)))
            .collect();
        if windows.is_empty() {
            return Err(EngineError::NotReady(format!(
                "no row in split '{split}' of model \"{model}\" has seq_len = {seq_len} tokens"
            )));
        }
        Ok(Self {
            windows,
            seq_len,
            seed,
            order: None,
        })
    }

    /// Tokens and targets of samples `first`, `first`+1, … (`count` of them), row-major.
    pub fn batch(&mut self, first: u64, count: usize) -> Result<(Vec<u32>, Vec<u32>)> {
        let mut tokens = Vec::with_capacity(count * self.seq_len);
        let mut targets = Vec::with_capacity(count * self.seq_len);
        for k in first..first + count as u64 {
            let (id, start) = self.window(k);
            let mut found = false;
            spi::read(
                "SELECT tokens[$2:$3], target[$2:$3] FROM llm_dataset WHERE id = $1",
                &[
                    id.into(),
                    (start + 1).into(),
                    (start + self.seq_len as i32).into(),
                ],
                |row| {
                    found = true;
                    tokens.extend(token_ids(row, 1)?);
                    targets.extend(token_ids(row, 2)?);
                    Ok(())
                },
            )?;
            if !found || tokens.len() != targets.len() || tokens.len() % self.seq_len != 0 {
                return Err(EngineError::data(format!(
                    "llm_dataset row {id} changed while training read it"
                )));
            }
        }
        Ok((tokens, targets))
    }

    fn window(&mut self, k: u64) -> (i64, i32) {
        let n = self.windows.len() as u64;
        let epoch = k / n;
        if self.order.as_ref().map(|o| o.0) != Some(epoch) {
            self.order = Some((epoch, epoch_order(n as usize, self.seed, epoch)));
        }
        let order = &self.order.as_ref().expect("just set").1;
        self.windows[order[(k % n) as usize]]
    }
}

/// Column `col` of `row`, an `int[]` of token ids. The table's constraints keep NULL and
/// negative ids out; should one appear anyway it becomes an id beyond any vocabulary, which
/// training refuses with 22023.
pub fn token_ids(row: &crate::spi::Row, col: usize) -> Result<Vec<u32>> {
    let ids: Vec<Option<i32>> = row.get(col).map_err(spi_error)?.unwrap_or_default();
    Ok(ids
        .into_iter()
        .map(|t| t.filter(|&t| t >= 0).map_or(u32::MAX, |t| t as u32))
        .collect())
}
