//! Native part of the Python package `pg_gpt3_client`: a thin pyo3 skin over the Rust client
//! (client.rs), run on one tokio runtime with the GIL released and Ctrl-C cancelling
//! (runtime.rs), its errors as Python exceptions (errors.rs).

mod client;
mod convert;
mod errors;
mod rows;
mod runtime;

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
    m.add("DEFAULT_MODEL", pg_gpt3_client::DEFAULT_MODEL)?;
    m.add_function(wrap_pyfunction!(encode_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(decode_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(convert::convert_checkpoint, m)?)?;
    m.add_class::<client::Client>()?;
    m.add_class::<client::StreamEvent>()?;
    m.add_class::<client::TrainStep>()?;
    m.add_class::<client::TokenStream>()?;
    m.add_class::<client::TrainSteps>()?;
    Ok(())
}
