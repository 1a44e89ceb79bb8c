//! Turning SQL arguments into validated engine inputs. NULL is an error (22004) rather than a
//! silent NULL result: a NULL weight almost always means a missing row upstream.

use std::borrow::Cow;

use pg_llm_engine::tensor::{self, Finite};
use pg_llm_engine::{EngineError, Result};

pub fn required<T>(value: Option<T>, name: &str) -> Result<T> {
    value.ok_or_else(|| EngineError::NullValue(format!("{name} must not be NULL")))
}

// How a bytea argument arrives: pgrx passes `&[u8]` through `pg_detoast_datum_packed`, which
// brings an out-of-line or compressed value into memory as a new palloc'd varlena with a 4-byte
// header (MAXALIGN'd, so its data is 4-byte aligned), but leaves a value that is already plain
// in memory where it is, in its short 1-byte-header form included; the slice is that value's
// data in place. Data after a 4-byte header is 4-byte aligned (a function result, a detoasted
// value, a large value inline in a row, whose column is int-aligned); data after a 1-byte
// header (a value of up to 126 bytes stored in a row, or a copy of one) starts at any byte.
// Aligned data is viewed as float32 values without a copy, the rest is copied
// (`tensor::view`). The slice lives as long as the call's argument.

/// A float32 tensor argument of any length, viewed in place where aligned.
pub fn tensor<'a>(value: Option<&'a [u8]>, name: &str) -> Result<Cow<'a, [f32]>> {
    tensor::view(required(value, name)?, name, Finite::Required)
}

/// A logits argument: −infinity is allowed as a mask.
pub fn logits<'a>(value: Option<&'a [u8]>, name: &str) -> Result<Cow<'a, [f32]>> {
    tensor::view(required(value, name)?, name, Finite::AllowNegInf)
}

/// A float32 tensor argument that must hold exactly `numel` values.
pub fn tensor_exact<'a>(
    value: Option<&'a [u8]>,
    name: &str,
    numel: usize,
    shape: &str,
) -> Result<Cow<'a, [f32]>> {
    tensor::view_exact(required(value, name)?, name, numel, shape, Finite::Required)
}

/// `tensor_exact` for an operand of a product, whose finiteness the product's result proves
/// (`tensor::blame_operands` must see the outcome): a finite result needs no second read.
pub fn operand_exact<'a>(
    value: Option<&'a [u8]>,
    name: &str,
    numel: usize,
    shape: &str,
) -> Result<Cow<'a, [f32]>> {
    tensor::view_exact(
        required(value, name)?,
        name,
        numel,
        shape,
        Finite::ThroughProduct,
    )
}

/// A dimension argument: present, positive, not absurd.
pub fn dim(value: Option<i32>, name: &str) -> Result<usize> {
    tensor::dim(required(value, name)? as i64, name)
}

/// A finite float argument.
pub fn finite(value: Option<f32>, name: &str) -> Result<f32> {
    let v = required(value, name)?;
    if !v.is_finite() {
        return Err(EngineError::invalid(format!(
            "{name} must be finite, got {v}"
        )));
    }
    Ok(v)
}

/// A token-id array: non-empty, no NULLs, no negative ids.
pub fn token_ids(ids: Option<Vec<Option<i32>>>, name: &str) -> Result<Vec<u32>> {
    let ids = required(ids, name)?;
    if ids.is_empty() {
        return Err(EngineError::invalid(format!("{name} must not be empty")));
    }
    ids.into_iter()
        .enumerate()
        .map(|(i, v)| match v {
            None => Err(EngineError::NullValue(format!(
                "{name} has a NULL at element {}",
                i + 1
            ))),
            Some(x) if x < 0 => Err(EngineError::invalid(format!(
                "{name} has a negative token id {x} at element {}",
                i + 1
            ))),
            Some(x) => Ok(x as u32),
        })
        .collect()
}

/// A model name argument: present and not empty (the registry refuses empty names too).
pub fn model_name<'a>(value: Option<&'a str>, name: &str) -> Result<&'a str> {
    let model = required(value, name)?;
    if model.is_empty() {
        return Err(EngineError::invalid(format!("{name} must not be empty")));
    }
    Ok(model)
}

/// A token-id array of one row (1-D) or several equal-length rows (2-D; PostgreSQL itself
/// refuses ragged ones): the ids row-major, with (rows, row length).
pub fn token_matrix(
    value: Option<pgrx::Array<i32>>,
    name: &str,
) -> Result<(Vec<u32>, usize, usize)> {
    let array = required(value, name)?;
    let elems: Vec<Option<i32>> = array.iter().collect();
    // SAFETY: `array` came from PostgreSQL as an ArrayType.
    let dims: Vec<usize> = unsafe { pgrx::array::RawArray::from_array(array) }
        .map(|raw| raw.dims().iter().map(|&d| d.max(0) as usize).collect())
        .unwrap_or_default();
    let (rows, len) = match dims.as_slice() {
        [n] => (1, *n),
        [r, n] => (*r, *n),
        [] => return Err(EngineError::invalid(format!("{name} must not be empty"))),
        _ => {
            return Err(EngineError::invalid(format!(
            "{name} must be a 1-D array (one sequence) or a 2-D array (a batch), got {} dimensions",
            dims.len()
        )))
        }
    };
    let ids = token_ids(Some(elems), name)?;
    debug_assert_eq!(ids.len(), rows * len);
    Ok((ids, rows, len))
}
