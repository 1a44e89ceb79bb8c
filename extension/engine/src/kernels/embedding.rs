//! Embedding lookup: rows of a [rows, cols] table gathered by id, and the gradient scattered
//! back. Layout: the result is [ids, cols], row-major.

use crate::error::{EngineError, Result};
use crate::tensor;

fn check(table_len: usize, ids: &[i64], cols: usize) -> Result<usize> {
    if cols == 0 || table_len % cols != 0 {
        return Err(EngineError::invalid(format!(
            "the table has {table_len} values, which is not a whole number of rows of {cols}"
        )));
    }
    let rows = table_len / cols;
    if let Some(&bad) = ids.iter().find(|&&i| i < 0 || i as u64 >= rows as u64) {
        return Err(EngineError::invalid(format!(
            "id {bad} is outside the table's {rows} rows"
        )));
    }
    Ok(rows)
}

/// table[ids[i]] for every i: [ids, cols].
pub fn embedding(table: &[f32], ids: &[i64], cols: usize) -> Result<Vec<f32>> {
    check(table.len(), ids, cols)?;
    let mut out = Vec::with_capacity(tensor::numel(&[ids.len(), cols], "embedding result")?);
    for &id in ids {
        let at = id as usize * cols;
        out.extend_from_slice(&table[at..at + cols]);
    }
    Ok(out)
}

/// Gradient of `embedding` with respect to the table [rows, cols]: row ids[i] of the result
/// receives dy's row i (summed where an id repeats).
pub fn embedding_backward(dy: &[f32], ids: &[i64], rows: usize, cols: usize) -> Result<Vec<f32>> {
    let len = tensor::numel(&[rows, cols], "embedding table")?;
    check(len, ids, cols)?;
    if dy.len() != ids.len() * cols {
        return Err(EngineError::invalid(format!(
            "dy has {} values but [{} ids, {cols}] needs {}",
            dy.len(),
            ids.len(),
            ids.len() * cols
        )));
    }
    let mut grad = tensor::alloc_zeroed(len)?;
    for (&id, row) in ids.iter().zip(dy.chunks_exact(cols)) {
        let at = id as usize * cols;
        grad[at..at + cols]
            .iter_mut()
            .zip(row)
            .for_each(|(g, &d)| *g += d);
    }
    Ok(grad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathers_rows_and_scatters_gradients_back() {
        let table = [0.0, 1.0, 10.0, 11.0, 20.0, 21.0];
        assert_eq!(
            embedding(&table, &[2, 0, 2], 2).unwrap(),
            [20.0, 21.0, 0.0, 1.0, 20.0, 21.0]
        );
        let g = embedding_backward(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 0, 2], 3, 2).unwrap();
        assert_eq!(g, [3.0, 4.0, 0.0, 0.0, 6.0, 8.0]);
        assert!(embedding(&table, &[3], 2).is_err());
        assert!(embedding(&table, &[-1], 2).is_err());
        assert!(embedding(&table, &[0], 4).is_err());
    }
}
