//! Checkpoint formats and the mapping of each model family's tensor names and layouts onto
//! pg_gpt3's canonical parameters.

pub mod checkpoint;
pub mod convert;
pub mod export;
pub mod hf_config;
pub mod manifest;
pub mod names;
pub mod pg_gpt2;
pub mod safetensors;

use std::collections::HashMap;

/// Named float32 tensors: name → (shape, row-major values).
pub type TensorMap = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Values per piece when a large tensor is streamed (4 Mi values, 16 MB of float32): import,
/// initialisation and export hand a larger tensor over in pieces of this size, so no buffer
/// of a streamed tensor exceeds it. `llm_param` chunks tensors at the same size. Small enough
/// that writing or reading one piece (a row of `llm_param`, which PostgreSQL stores without
/// serving interrupts) ends well inside a cancel's 100 ms, large enough that per-row costs
/// do not show.
pub const PIECE: usize = 4 * 1024 * 1024;

/// Where streamed canonical tensors go: (name, the tensor's shape, offset of the first value
/// within the tensor, values). A tensor arrives whole (offset 0) or in consecutive pieces of
/// `PIECE` values, the last one shorter.
pub type Sink<'a> = dyn FnMut(&str, &[usize], usize, Vec<f32>) -> crate::error::Result<()> + 'a;

/// Adds a piece handed to a `Sink` to `map`, after the tensor's earlier pieces.
pub fn collect_piece(
    map: &mut TensorMap,
    name: &str,
    shape: &[usize],
    offset: usize,
    values: Vec<f32>,
) -> crate::error::Result<()> {
    let (_, whole) = map
        .entry(name.to_string())
        .or_insert_with(|| (shape.to_vec(), Vec::new()));
    if whole.len() != offset {
        return Err(crate::error::EngineError::Internal(format!(
            "a piece of \"{name}\" arrived out of order"
        )));
    }
    whole.extend(values);
    Ok(())
}
