//! Converting between float4[] and the float32 bytea tensor format.

use pg_llm_engine::tensor::{self, Finite};
use pg_llm_engine::EngineError;
use pgrx::prelude::*;

use super::args::{bytes, required};
use crate::errors::run;

/// float4[] → little-endian float32 bytea (NULL elements are rejected; the array's shape is
/// flattened in row-major order).
#[pg_extern(immutable, parallel_safe)]
fn pg_llm_from_array(values: Option<Vec<Option<f32>>>) -> Vec<u8> {
    run("pg_llm_from_array", || {
        let values = required(values, "values")?;
        let mut out = Vec::with_capacity(values.len());
        for (i, v) in values.into_iter().enumerate() {
            out.push(v.ok_or_else(|| EngineError::NullValue(format!("values has a NULL at element {}", i + 1)))?);
        }
        tensor::check_finite(&out, "values", Finite::AllowNegInf)?;
        Ok(bytes(&out))
    })
}

/// Little-endian float32 bytea → float4[].
#[pg_extern(immutable, parallel_safe)]
fn pg_llm_to_array(tensor_in: Option<&[u8]>) -> Vec<f32> {
    run("pg_llm_to_array", || {
        let raw = required(tensor_in, "tensor")?;
        if raw.len() % 4 != 0 {
            return Err(EngineError::data(format!(
                "tensor is not float32: its length {} bytes is not a multiple of 4",
                raw.len()
            )));
        }
        Ok(raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    })
}
