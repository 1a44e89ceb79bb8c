//! Reading `.safetensors` files (Hugging Face) into float32 tensors. float16, bfloat16 and
//! float64 are widened or narrowed to float32; integer tensors are rejected.

use safetensors::{Dtype, SafeTensors};

use super::TensorMap;
use crate::error::{EngineError, Result};

/// Parses a safetensors blob; `what` names the file in messages.
pub fn read(bytes: &[u8], what: &str) -> Result<TensorMap> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| EngineError::data(format!("{what} is not a valid safetensors file: {e}")))?;
    reject_repeated_names(bytes)
        .map_err(|e| EngineError::data(format!("{what} is not a valid safetensors file: {e}")))?;
    let mut out = TensorMap::new();
    for (name, view) in st.tensors() {
        let values = to_f32(&view, what, &name)?;
        out.insert(name, (view.shape().to_vec(), values));
    }
    Ok(out)
}

/// The header of a float32 safetensors file whose tensors follow it in the order given,
/// packed: the 8-byte length, then the JSON (with the `{"format": "pt"}` metadata that
/// `transformers` requires) padded with spaces to a multiple of 8 bytes.
pub fn f32_header(tensors: &[(&str, &[usize])]) -> Result<Vec<u8>> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut at = 0u64;
    for (name, shape) in tensors {
        let bytes = 4 * shape.iter().map(|&d| d as u64).product::<u64>();
        let entry = serde_json::json!({
            "dtype": "F32",
            "shape": shape,
            "data_offsets": [at, at + bytes],
        });
        if map.insert(name.to_string(), entry).is_some() || *name == "__metadata__" {
            return Err(EngineError::invalid(format!(
                "tensor name \"{name}\" appears twice"
            )));
        }
        at += bytes;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(map))
        .map_err(|e| EngineError::Internal(format!("safetensors header: {e}")))?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut header = (json.len() as u64).to_le_bytes().to_vec();
    header.extend(json);
    Ok(header)
}

/// One float tensor of a safetensors blob.
pub fn read_one(bytes: &[u8], name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| EngineError::data(format!("invalid safetensors: {e}")))?;
    let view = st
        .tensor(name)
        .map_err(|e| EngineError::data(format!("tensor {name}: {e}")))?;
    Ok((view.shape().to_vec(), to_f32(&view, "safetensors", name)?))
}

/// The header is a JSON object keyed by tensor name. JSON parsers (the safetensors crate's
/// included) keep the last of repeated keys, so a header naming a tensor twice would import
/// silently whichever comes last: refuse it. Called on a blob that already parsed.
pub(super) fn reject_repeated_names(bytes: &[u8]) -> std::result::Result<(), serde_json::Error> {
    use serde::de::{Deserializer, Error, IgnoredAny, MapAccess, Visitor};

    struct UniqueKeys;
    impl<'de> Visitor<'de> for UniqueKeys {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                if !seen.insert(key.clone()) {
                    return Err(A::Error::custom(format!(
                        "the header names \"{key}\" twice"
                    )));
                }
            }
            Ok(())
        }
    }

    let len = u64::from_le_bytes(bytes[..8].try_into().expect("parsed blobs have a header"));
    let header = &bytes[8..8 + len as usize];
    serde_json::Deserializer::from_slice(header).deserialize_map(UniqueKeys)
}

fn to_f32(view: &safetensors::tensor::TensorView<'_>, what: &str, name: &str) -> Result<Vec<f32>> {
    decode_floats(
        view.dtype(),
        view.data(),
        &format!("{what}: tensor \"{name}\""),
    )
}

/// Little-endian float values of `dtype` widened or narrowed to float32; non-finite values
/// and non-float dtypes are refused (`what` names the tensor in messages).
pub fn decode_floats(dtype: Dtype, raw: &[u8], what: &str) -> Result<Vec<f32>> {
    let values: Vec<f32> = match dtype {
        Dtype::F32 => crate::tensor::decode_any(raw, what)?,
        Dtype::F16 => raw
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => raw
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => raw
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        other => {
            return Err(EngineError::data(format!(
                "{what} has dtype {other:?}; only float tensors can be imported"
            )))
        }
    };
    crate::tensor::check_finite(&values, what, crate::tensor::Finite::Required)?;
    Ok(values)
}

/// Reads the integer tensors of a safetensors blob (fixtures: token ids) as i64.
pub fn read_ints(bytes: &[u8], name: &str) -> Result<Vec<i64>> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| EngineError::data(format!("invalid safetensors: {e}")))?;
    let view = st
        .tensor(name)
        .map_err(|e| EngineError::data(format!("tensor {name}: {e}")))?;
    match view.dtype() {
        Dtype::I64 => Ok(view
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect()),
        Dtype::I32 => Ok(view
            .data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
            .collect()),
        other => Err(EngineError::data(format!(
            "tensor {name} has dtype {other:?}, not an integer"
        ))),
    }
}

/// A safetensors file from its header text and data (tests of the parsers).
#[cfg(test)]
pub(super) fn blob(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tensor_named_twice_is_refused() {
        let one = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        let data = 1.5f32.to_le_bytes();
        assert_eq!(read(&blob(one, &data), "f").unwrap()["a"].1, vec![1.5]);

        let twice = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        let err = read(&blob(twice, &data), "f").unwrap_err();
        assert!(
            matches!(&err, EngineError::Data(m) if m.contains("names \"a\" twice")),
            "{err}"
        );
    }
}
