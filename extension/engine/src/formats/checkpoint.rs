//! A checkpoint read one tensor at a time. Every tensor's name, dtype, shape and byte range
//! come from headers (safetensors files, a tensor manifest) before any value is read, so an
//! import checks names and shapes first (`names::stream`) and then holds one tensor at a time,
//! whatever the size of the model.

use std::collections::HashMap;
use std::ops::Range;

use safetensors::tensor::Metadata;
use safetensors::Dtype;

use crate::model::DType;
use sha2::{Digest, Sha256};

use super::hf_config::Family;
use super::{manifest, names};
use crate::error::{EngineError, Result};
use crate::model::ModelConfig;

/// Random access to a checkpoint's files (server files, or blobs in memory).
pub trait Files {
    /// The size of `file` in bytes.
    fn size(&mut self, file: &str) -> Result<u64>;
    /// Fills `out` with the bytes of `file` from `offset`; an error if the file ends first.
    fn read_at(&mut self, file: &str, offset: u64, out: &mut [u8]) -> Result<()>;
}

/// Blobs in memory, by name.
pub struct Blobs<'a>(pub HashMap<String, &'a [u8]>);

impl Files for Blobs<'_> {
    fn size(&mut self, file: &str) -> Result<u64> {
        Ok(self.blob(file)?.len() as u64)
    }

    fn read_at(&mut self, file: &str, offset: u64, out: &mut [u8]) -> Result<()> {
        let blob = self.blob(file)?;
        let bytes = usize::try_from(offset)
            .ok()
            .and_then(|start| blob.get(start..start.checked_add(out.len())?))
            .ok_or_else(|| EngineError::data(format!("{file} ends before byte {offset}")))?;
        out.copy_from_slice(bytes);
        Ok(())
    }
}

impl Blobs<'_> {
    fn blob(&self, file: &str) -> Result<&[u8]> {
        self.0
            .get(file)
            .copied()
            .ok_or_else(|| EngineError::Internal(format!("no blob named {file}")))
    }
}

/// Where one tensor's bytes are.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub file: String,
    pub offset: u64,
    pub length: u64,
    /// The digest a manifest promises for these bytes.
    pub sha256: Option<String>,
}

/// The largest safetensors header read (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// The tensors of safetensors file `file`, from its header alone. The header is checked the
/// way the safetensors crate checks a whole file (JSON, known dtypes, ranges contiguous from
/// zero and matching their shapes, no name twice) and the file must end where the last
/// tensor does.
pub fn safetensors_tensors(files: &mut dyn Files, file: &str) -> Result<Vec<Stored>> {
    let invalid =
        |why: String| EngineError::data(format!("{file} is not a valid safetensors file: {why}"));
    let size = files.size(file)?;
    if size < 8 {
        return Err(invalid(format!(
            "{size} bytes, shorter than the header length"
        )));
    }
    let mut len = [0u8; 8];
    files.read_at(file, 0, &mut len)?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER || 8 + n > size {
        return Err(invalid(format!(
            "a header of {n} bytes in a file of {size}"
        )));
    }
    let mut head = vec![0u8; 8 + n as usize];
    files.read_at(file, 0, &mut head)?;
    // Metadata's own deserialisation checks dtypes and ranges (as `SafeTensors` does).
    let text = std::str::from_utf8(&head[8..]).map_err(|e| invalid(e.to_string()))?;
    let metadata: Metadata = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
    super::safetensors::reject_repeated_names(&head).map_err(|e| invalid(e.to_string()))?;
    let data_start = 8 + n;
    let data_len = metadata.data_len() as u64;
    if data_start + data_len != size {
        return Err(invalid(format!(
            "the header describes {data_len} bytes of tensors but the file holds {}",
            size - data_start
        )));
    }
    let mut out: Vec<Stored> = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| Stored {
            name,
            dtype: info.dtype,
            shape: info.shape.clone(),
            file: file.to_string(),
            offset: data_start + info.data_offsets.0 as u64,
            length: (info.data_offsets.1 - info.data_offsets.0) as u64,
            sha256: None,
        })
        .collect();
    out.sort_by_key(|s| s.offset);
    Ok(out)
}

/// A manifest's entries as stored tensors; `path` turns an entry's file (relative to the
/// manifest) into the name `Files` knows it by.
pub fn manifest_tensors(
    entries: Vec<manifest::Entry>,
    path: impl Fn(&str) -> String,
) -> Vec<Stored> {
    entries
        .into_iter()
        .map(|e| Stored {
            dtype: manifest::dtype(&e.dtype),
            file: path(&e.file),
            name: e.name,
            shape: e.shape,
            offset: e.offset,
            length: e.length,
            sha256: Some(e.sha256),
        })
        .collect()
}

/// The tensors of several files (a sharded checkpoint); a name in two files is refused.
pub fn merge(parts: Vec<Vec<Stored>>) -> Result<Vec<Stored>> {
    let mut seen = HashMap::new();
    let mut out = Vec::new();
    for s in parts.into_iter().flatten() {
        if let Some(first) = seen.insert(s.name.clone(), s.file.clone()) {
            return Err(EngineError::data(format!(
                "tensor \"{}\" appears in more than one shard ({first} and {})",
                s.name, s.file
            )));
        }
        out.push(s);
    }
    Ok(out)
}

/// Imports `tensors` of a `family` checkpoint into canonical tensors handed to `sink`, one
/// source tensor (or piece of one) in memory at a time (`names::stream`): names and shapes are
/// checked against `cfg` first, then every digest a manifest promises, and only then is
/// anything handed over. Digests are checked again as the tensors are read (a file changed in
/// between is an error, and the caller's transaction rolls back). Returns the number of values.
pub fn import(
    family: Family,
    cfg: &ModelConfig,
    tensors: &[Stored],
    files: &mut dyn Files,
    sink: &mut super::Sink<'_>,
) -> Result<u64> {
    let shapes: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|s| (s.name.clone(), s.shape.clone()))
        .collect();
    let by_name: HashMap<&str, &Stored> = tensors.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut verified = false;
    let mut digest = None;
    names::stream(
        family,
        cfg,
        &shapes,
        &mut |name, range| {
            // The first read comes after names and shapes checked out.
            if !verified {
                verify(files, tensors)?;
                verified = true;
            }
            let s = by_name
                .get(name)
                .ok_or_else(|| EngineError::Internal(format!("no tensor \"{name}\"")))?;
            if range.start == 0 {
                digest = s.sha256.as_ref().map(|_| Sha256::new());
            }
            let values = read_range(files, s, range.clone(), digest.as_mut())?;
            if range.end == numel(s) {
                if let Some(hasher) = digest.take() {
                    check_digest(s, hasher)?;
                }
            }
            Ok(values)
        },
        sink,
    )
}

/// Checks every promised digest, reading in blocks; nothing is kept.
pub fn verify(files: &mut dyn Files, tensors: &[Stored]) -> Result<()> {
    const BLOCK: u64 = 16 << 20;
    let mut block = Vec::new();
    for s in tensors.iter().filter(|s| s.sha256.is_some()) {
        let mut hasher = Sha256::new();
        for at in (0..s.length).step_by(BLOCK as usize) {
            block.resize(BLOCK.min(s.length - at) as usize, 0);
            files.read_at(&s.file, s.offset + at, &mut block)?;
            hasher.update(&block);
        }
        check_digest(s, hasher)?;
    }
    Ok(())
}

/// One whole tensor's values as float32, its digest checked when one is promised.
pub fn read(files: &mut dyn Files, s: &Stored) -> Result<Vec<f32>> {
    let mut hasher = s.sha256.as_ref().map(|_| Sha256::new());
    let values = read_range(files, s, 0..numel(s), hasher.as_mut())?;
    match hasher {
        Some(h) => check_digest(s, h).map(|_| values),
        None => Ok(values),
    }
}

fn numel(s: &Stored) -> usize {
    s.shape.iter().product()
}

/// Values `range` of a tensor as float32 (see `safetensors::decode_floats`: half precision
/// widened, non-finite values refused), their stored bytes fed to `digest`. float32 data is
/// read straight into the result.
fn read_range(
    files: &mut dyn Files,
    s: &Stored,
    range: Range<usize>,
    digest: Option<&mut Sha256>,
) -> Result<Vec<f32>> {
    let what = format!("tensor \"{}\" of {}", s.name, s.file);
    let size = s.dtype.bitsize() / 8;
    let offset = s.offset + (range.start * size) as u64;
    if s.dtype == Dtype::F32 && cfg!(target_endian = "little") {
        let mut values = crate::tensor::alloc_zeroed(range.len())?;
        // SAFETY: any bytes are a valid f32 bit pattern, and the slice covers exactly `values`.
        let bytes = unsafe { values.align_to_mut::<u8>() }.1;
        files.read_at(&s.file, offset, bytes)?;
        if let Some(d) = digest {
            d.update(&*bytes);
        }
        crate::tensor::check_finite(&values, &what, crate::tensor::Finite::Required)?;
        return Ok(values);
    }
    let len = range.len() * size;
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(len).map_err(|_| {
        EngineError::too_large(format!("tensor \"{}\" does not fit in memory", s.name))
    })?;
    bytes.resize(len, 0);
    files.read_at(&s.file, offset, &mut bytes)?;
    if let Some(d) = digest {
        d.update(&bytes);
    }
    super::safetensors::decode_floats(s.dtype, &bytes, &what)
}

fn check_digest(s: &Stored, hasher: Sha256) -> Result<()> {
    let Some(want) = &s.sha256 else {
        return Ok(());
    };
    let digest = manifest::hex(&hasher.finalize());
    if digest == want.to_ascii_lowercase() {
        return Ok(());
    }
    let file = std::path::Path::new(&s.file)
        .file_name()
        .map_or(s.file.clone(), |n| n.to_string_lossy().into_owned());
    Err(EngineError::data(format!(
        "\"{}\" in \"{file}\" does not match its manifest checksum (sha256 {digest}, manifest {want})",
        s.name
    )))
}

/// The precision a checkpoint holds its matrices (2-D tensors) in; 22023 when they are in
/// several, or in one pg_llm cannot serve.
pub fn matrix_dtype(tensors: &[Stored]) -> Result<DType> {
    let mut kinds: Vec<Dtype> = tensors
        .iter()
        .filter(|t| t.shape.len() == 2)
        .map(|t| t.dtype)
        .collect();
    kinds.sort_by_key(|d| d.to_string());
    kinds.dedup();
    match kinds.as_slice() {
        [Dtype::F32] => Ok(DType::Float32),
        [Dtype::BF16] => Ok(DType::Bfloat16),
        [Dtype::F16] => Ok(DType::Float16),
        other => Err(EngineError::invalid(format!(
            "keep_dtype: the checkpoint's matrices are in {}, not one of F32, BF16 or F16",
            other
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(" and ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::super::safetensors::blob;
    use super::*;

    #[test]
    fn headers_are_checked_before_values_are_read() {
        let data: Vec<u8> = [1.5f32, -2.0, 0.25]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let header = r#"{"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let file = blob(header, &data);
        let mut files = Blobs(HashMap::from([("f".to_string(), file.as_slice())]));
        let tensors = safetensors_tensors(&mut files, "f").unwrap();
        assert_eq!(
            tensors.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(read(&mut files, &tensors[0]).unwrap(), vec![1.5, -2.0]);
        assert_eq!(read(&mut files, &tensors[1]).unwrap(), vec![0.25]);

        // Cut short, or with bytes beyond the last tensor: refused from the header.
        for bad in [
            &file[..file.len() - 1],
            &[file.as_slice(), &[0]].concat()[..],
        ] {
            let mut files = Blobs(HashMap::from([("f".to_string(), bad)]));
            let err = safetensors_tensors(&mut files, "f")
                .unwrap_err()
                .to_string();
            assert!(err.contains("not a valid safetensors file"), "{err}");
        }
        // A header length beyond the file.
        let mut huge = file.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        let mut files = Blobs(HashMap::from([("f".to_string(), huge.as_slice())]));
        assert!(safetensors_tensors(&mut files, "f").is_err());
    }

    #[test]
    fn shards_must_not_repeat_a_tensor_and_digests_are_checked() {
        let a = Stored {
            name: "a".into(),
            dtype: Dtype::F32,
            shape: vec![1],
            file: "x".into(),
            offset: 0,
            length: 4,
            sha256: Some(manifest::sha256_hex(&2.0f32.to_le_bytes())),
        };
        let again = Stored {
            file: "y".into(),
            ..a.clone()
        };
        assert!(merge(vec![vec![a.clone()], vec![again]]).is_err());
        let bytes = 2.0f32.to_le_bytes();
        let mut files = Blobs(HashMap::from([("x".to_string(), &bytes[..])]));
        assert_eq!(read(&mut files, &a).unwrap(), vec![2.0]);
        verify(&mut files, std::slice::from_ref(&a)).unwrap();
        let other = 3.0f32.to_le_bytes();
        let mut files = Blobs(HashMap::from([("x".to_string(), &other[..])]));
        let err = verify(&mut files, &[a]).unwrap_err().to_string();
        assert!(err.contains("sha256"), "{err}");
    }

    #[test]
    fn the_dtype_of_a_checkpoints_matrices() {
        let t = |dtype: Dtype, shape: &[usize]| Stored {
            name: "t".into(),
            dtype,
            shape: shape.to_vec(),
            file: "f".into(),
            offset: 0,
            length: 0,
            sha256: None,
        };
        // Vectors do not count: a half checkpoint may keep its LayerNorms in float32.
        let bf16 = [
            t(Dtype::BF16, &[4, 4]),
            t(Dtype::F32, &[4]),
            t(Dtype::BF16, &[8, 4]),
        ];
        assert_eq!(matrix_dtype(&bf16).unwrap(), DType::Bfloat16);
        assert_eq!(
            matrix_dtype(&[t(Dtype::F16, &[2, 2])]).unwrap(),
            DType::Float16
        );
        assert_eq!(
            matrix_dtype(&[t(Dtype::F32, &[2, 2])]).unwrap(),
            DType::Float32
        );
        let mixed = [t(Dtype::BF16, &[4, 4]), t(Dtype::F16, &[4, 4])];
        assert!(matches!(
            matrix_dtype(&mixed),
            Err(EngineError::InvalidParameter(_))
        ));
        assert!(matrix_dtype(&[t(Dtype::F64, &[2, 2])]).is_err());
    }
}
