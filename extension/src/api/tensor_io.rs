//! Converting between float4[] and the float32 bytea tensor format.

use pg_llm_engine::EngineError;
use pgrx::prelude::*;

use super::args::required;
use super::float32_bytea::Float32Bytea;
use crate::errors::run;

/// float4[] → little-endian float32 bytea, flattened in row-major order. The conversion is
/// faithful (NaN and infinities are kept, so bad data can be reproduced); the compute
/// functions are the ones that validate. NULL elements are rejected.
#[pg_extern(immutable, parallel_safe)]
fn pg_llm_from_array(values: Option<Vec<Option<f32>>>) -> Float32Bytea {
    run("pg_llm_from_array", || {
        let values = required(values, "values")?;
        let mut out = Vec::with_capacity(values.len());
        for (i, v) in values.into_iter().enumerate() {
            out.push(v.ok_or_else(|| {
                EngineError::NullValue(format!("values has a NULL at element {}", i + 1))
            })?);
        }
        Ok(Float32Bytea::from(out))
    })
}

/// Little-endian float32 bytea → float4[].
#[pg_extern(immutable, parallel_safe)]
fn pg_llm_to_array(tensor: Option<&[u8]>) -> Vec<f32> {
    run("pg_llm_to_array", || {
        pg_llm_engine::tensor::decode_any(required(tensor, "tensor")?, "tensor")
    })
}
