//! Checkpoint formats and the mapping of each model family's tensor names and layouts onto
//! pg_gpt3's canonical parameters.

pub mod checkpoint;
pub mod export;
pub mod hf_config;
pub mod manifest;
pub mod names;
pub mod pg_gpt2;
pub mod safetensors;

use std::collections::HashMap;

/// Named float32 tensors: name → (shape, row-major values).
pub type TensorMap = HashMap<String, (Vec<usize>, Vec<f32>)>;
