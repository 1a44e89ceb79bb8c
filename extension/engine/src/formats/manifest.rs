//! Tensor manifests (`*.manifest.jsonl`): one JSON object per line and tensor,
//!
//! ```text
//! {"name": "transformer.wte.weight", "dtype": "F32", "shape": [50257, 768],
//!  "file": "model-00001-of-00002.safetensors", "offset": 1184, "length": 154389504,
//!  "sha256": "9f86d0…"}
//! ```
//!
//! naming a tensor's bytes anywhere in a set of files: `offset` and `length` are a byte range
//! of `file` (a path relative to the manifest's directory), little-endian values of `dtype`
//! (F32, F16, BF16 or F64) in row-major order, and `sha256` is the digest of exactly those
//! bytes. Export writes one beside a folder's safetensors files (the ranges then point into
//! them); import accepts one in place of a checkpoint and verifies every digest before it
//! writes anything (`checkpoint::verify`), and again as it reads each tensor. Names are those
//! of the checkpoint's family.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{EngineError, Result};
use safetensors::Dtype;

/// One line of a manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub file: String,
    pub offset: u64,
    pub length: u64,
    pub sha256: String,
}

/// The float dtype a manifest names, with safetensors' spelling.
fn parse_dtype(name: &str) -> Option<Dtype> {
    match name {
        "F32" => Some(Dtype::F32),
        "F16" => Some(Dtype::F16),
        "BF16" => Some(Dtype::BF16),
        "F64" => Some(Dtype::F64),
        _ => None,
    }
}

/// The dtype of an entry that `parse` accepted.
pub fn dtype(name: &str) -> Dtype {
    parse_dtype(name).unwrap_or(Dtype::F64)
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lower-case hex of a digest.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses and checks a manifest: every line an entry with a known dtype, a length that
/// matches its shape, a digest of 64 hex digits, a file named relative to the manifest (no
/// absolute path, no `..`); names unique; ranges within one file not overlapping.
pub fn parse(text: &str) -> Result<Vec<Entry>> {
    let bad = |line: usize, why: String| EngineError::data(format!("manifest line {line}: {why}"));
    let mut entries: Vec<Entry> = Vec::new();
    let mut names = std::collections::HashSet::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let n = i + 1;
        let e: Entry = serde_json::from_str(line).map_err(|err| bad(n, err.to_string()))?;
        let size = parse_dtype(&e.dtype)
            .map(|d| d.bitsize() as u64 / 8)
            .ok_or_else(|| {
                bad(
                    n,
                    format!("unknown dtype \"{}\" (F32, F16, BF16, F64)", e.dtype),
                )
            })?;
        let numel = e
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .filter(|&v| v <= crate::tensor::MAX_TENSOR_ELEMS as u64)
            .ok_or_else(|| bad(n, format!("shape {:?} is too large", e.shape)))?;
        if e.length != numel * size {
            return Err(bad(
                n,
                format!(
                    "\"{}\": {} bytes do not hold shape {:?} of {}",
                    e.name, e.length, e.shape, e.dtype
                ),
            ));
        }
        if e.offset.checked_add(e.length).is_none() {
            return Err(bad(n, "the byte range overflows".into()));
        }
        if e.sha256.len() != 64 || !e.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(n, "sha256 must be 64 hex digits".into()));
        }
        let path = std::path::Path::new(&e.file);
        let escapes = path.is_absolute()
            || e.file.is_empty()
            || path
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)));
        if escapes {
            return Err(bad(
                n,
                format!(
                    "file \"{}\" must be a plain path inside the manifest's directory",
                    e.file
                ),
            ));
        }
        if !names.insert(e.name.clone()) {
            return Err(bad(n, format!("tensor \"{}\" is listed twice", e.name)));
        }
        entries.push(e);
    }
    if entries.is_empty() {
        return Err(EngineError::data("the manifest lists no tensors"));
    }
    let mut ranges: Vec<(&str, u64, u64, &str)> = entries
        .iter()
        .map(|e| {
            (
                e.file.as_str(),
                e.offset,
                e.offset + e.length,
                e.name.as_str(),
            )
        })
        .collect();
    ranges.sort();
    for w in ranges.windows(2) {
        if w[0].0 == w[1].0 && w[1].1 < w[0].2 {
            return Err(EngineError::data(format!(
                "manifest: the bytes of \"{}\" and \"{}\" overlap in \"{}\"",
                w[0].3, w[1].3, w[0].0
            )));
        }
    }
    Ok(entries)
}

/// The manifest's text, one line per entry.
pub fn to_jsonl(entries: &[Entry]) -> String {
    entries
        .iter()
        .map(|e| serde_json::to_string(e).expect("entries serialise") + "\n")
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, file: &str, offset: u64, values: &[f32]) -> (Entry, Vec<u8>) {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let e = Entry {
            name: name.into(),
            dtype: "F32".into(),
            shape: vec![values.len()],
            file: file.into(),
            offset,
            length: bytes.len() as u64,
            sha256: sha256_hex(&bytes),
        };
        (e, bytes)
    }

    #[test]
    fn round_trip_and_checksums() {
        use super::super::checkpoint::{self, Blobs};
        let (a, a_bytes) = entry("a", "x.bin", 0, &[1.0, 2.0]);
        let (b, b_bytes) = entry("b", "sub/y.bin", 16, &[3.5]);
        let text = to_jsonl(&[a.clone(), b.clone()]);
        assert_eq!(text.lines().count(), 2);
        let parsed = parse(&text).unwrap();
        assert_eq!(parsed, vec![a.clone(), b.clone()]);
        let y = [vec![0u8; 16], b_bytes].concat();
        let read = |bytes: &[u8], y: &[u8], e: &Entry| {
            let mut files = Blobs(std::collections::HashMap::from([
                ("dir/x.bin".to_string(), bytes),
                ("dir/sub/y.bin".to_string(), y),
            ]));
            let stored = checkpoint::manifest_tensors(vec![e.clone()], |f| format!("dir/{f}"));
            checkpoint::read(&mut files, &stored[0])
        };
        assert_eq!(read(&a_bytes, &y, &a).unwrap(), vec![1.0, 2.0]);
        assert_eq!(read(&a_bytes, &y, &b).unwrap(), vec![3.5]);
        // One flipped byte: refused, naming the tensor.
        let mut corrupt = a_bytes.clone();
        corrupt[3] ^= 1;
        let err = read(&corrupt, &y, &a).unwrap_err().to_string();
        assert!(err.contains("\"a\"") && err.contains("checksum"), "{err}");
        assert!(read(&a_bytes[..4], &y, &a).is_err(), "a short read");
        // Half precision widens to float32.
        let half_bytes: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        let h = Entry {
            dtype: "BF16".into(),
            shape: vec![2],
            length: 4,
            sha256: sha256_hex(&half_bytes),
            ..a
        };
        assert_eq!(read(&half_bytes, &y, &h).unwrap(), vec![1.5, -2.0]);
    }

    #[test]
    fn malformed_manifests_are_refused() {
        let (a, _) = entry("a", "x.bin", 0, &[1.0, 2.0]);
        let line = |e: &Entry| serde_json::to_string(e).unwrap();
        let cases: Vec<(&str, String)> = vec![
            ("empty", String::new()),
            ("not json", "{".into()),
            ("unknown field", line(&a).replace("\"name\"", "\"nom\"")),
            (
                "dtype",
                line(&Entry {
                    dtype: "I8".into(),
                    ..a.clone()
                }),
            ),
            (
                "length",
                line(&Entry {
                    length: 4,
                    ..a.clone()
                }),
            ),
            (
                "absolute file",
                line(&Entry {
                    file: "/etc/passwd".into(),
                    ..a.clone()
                }),
            ),
            (
                "escaping file",
                line(&Entry {
                    file: "../x.bin".into(),
                    ..a.clone()
                }),
            ),
            (
                "short digest",
                line(&Entry {
                    sha256: "abc".into(),
                    ..a.clone()
                }),
            ),
            (
                "overflow",
                line(&Entry {
                    offset: u64::MAX,
                    ..a.clone()
                }),
            ),
            (
                "huge shape",
                line(&Entry {
                    shape: vec![usize::MAX, 2],
                    ..a.clone()
                }),
            ),
            ("duplicate", format!("{}\n{}", line(&a), line(&a))),
            (
                "overlap",
                format!(
                    "{}\n{}",
                    line(&a),
                    line(&Entry {
                        name: "b".into(),
                        offset: 4,
                        ..a.clone()
                    })
                ),
            ),
        ];
        for (what, text) in cases {
            assert!(parse(&text).is_err(), "{what} was accepted");
        }
        // Adjacent ranges and the same range in different files are fine.
        let b = Entry {
            name: "b".into(),
            offset: 8,
            ..a.clone()
        };
        let c = Entry {
            name: "c".into(),
            file: "y.bin".into(),
            ..a.clone()
        };
        assert_eq!(parse(&to_jsonl(&[a, b, c])).unwrap().len(), 3);
    }
}
