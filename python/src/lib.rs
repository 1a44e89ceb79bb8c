//! Native part of the Python package `pg_gpt3_client`: a thin pyo3 skin over Rust code.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// Encodes a sequence of floats in pg_llm's tensor format (little-endian float32 bytes).
#[pyfunction]
fn encode_tensor(values: Vec<f32>) -> Vec<u8> {
    pg_llm_engine::tensor::encode(&values)
}

/// Decodes pg_llm's tensor format into a list of floats.
#[pyfunction]
fn decode_tensor(data: &[u8]) -> PyResult<Vec<f32>> {
    pg_llm_engine::tensor::decode_any(data, "data")
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(encode_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(decode_tensor, m)?)?;
    Ok(())
}
