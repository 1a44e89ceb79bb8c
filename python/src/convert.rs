//! `pg-gpt3 convert`: the engine's checkpoint converter, on this machine, no server needed.

use std::path::PathBuf;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use pg_llm_engine::formats::convert;
use pg_llm_engine::EngineError;

/// Converts a Hugging Face or Megatron-LM checkpoint (a .safetensors file, an index, a
/// manifest or a folder) into `destination`/model.safetensors in pg_gpt3's canonical names
/// plus a config.json of model type "pg_gpt3". `config` is the checkpoint's config.json
/// (default: the one beside it). Returns {"parameters", "bytes", "family"}.
#[pyfunction]
#[pyo3(signature = (source, destination, config=None))]
pub fn convert_checkpoint<'py>(
    py: Python<'py>,
    source: PathBuf,
    destination: PathBuf,
    config: Option<PathBuf>,
) -> PyResult<Bound<'py, PyDict>> {
    let config = config.unwrap_or_else(|| {
        let dir = if source.is_dir() {
            source.clone()
        } else {
            source.parent().map(PathBuf::from).unwrap_or_default()
        };
        dir.join("config.json")
    });
    let text = std::fs::read(&config)
        .map_err(|e| PyOSError::new_err(format!("{}: {e}", config.display())))?;
    let json: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| PyValueError::new_err(format!("{} is not JSON: {e}", config.display())))?;
    let converted = py
        .detach(|| convert::convert(&source, &json, &destination))
        .map_err(|e| match e {
            EngineError::Io(m) => PyOSError::new_err(m),
            other => PyValueError::new_err(other.to_string()),
        })?;
    let out = PyDict::new(py);
    out.set_item("parameters", converted.parameters)?;
    out.set_item("bytes", converted.bytes)?;
    out.set_item("family", converted.family.name())?;
    Ok(out)
}
