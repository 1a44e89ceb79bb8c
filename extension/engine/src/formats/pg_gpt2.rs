//! pg_gpt2's checkpoint archives (its `pg_llm_import_npz` / `pg_llm_export_npz`). Despite the
//! name they are not zip files: one gzip stream of entries, each a little-endian u16 name
//! length, the UTF-8 name and a NumPy `.npy` array (format 1.0 or 2.0, little-endian float32,
//! float64 or float16, C order). Names are GPT-2's without the `transformer.` prefix (`wte`,
//! `wpe`, `h.{i}.attn.c_attn.weight`, …, `ln_f.bias`), weights keep GPT-2's Conv1D layout,
//! and the output layer is tied to `wte`. pg_gpt2's converter wrote arrays in their shapes,
//! its C export flattened every one: both read back, reshaped to the model's shapes.

use std::io::{Read, Write};

use super::TensorMap;
use crate::error::{EngineError, Result};
use crate::model::ModelConfig;

/// One archive entry: name, shape as stored, float32 values.
pub type Entry = (String, Vec<usize>, Vec<f32>);

fn bad(why: String) -> EngineError {
    EngineError::data(format!("not a pg_gpt2 archive: {why}"))
}

/// Reads every entry of an archive. The stream is decompressed entry by entry, so a
/// truncated or corrupt archive fails at the entry where it breaks, and no entry may claim
/// more than the largest tensor pg_gpt3 accepts.
pub fn read(bytes: &[u8]) -> Result<Vec<Entry>> {
    let mut gz = flate2::read::GzDecoder::new(bytes);
    let mut entries = Vec::new();
    let mut names = std::collections::HashSet::new();
    loop {
        let mut len = [0u8; 2];
        match read_some(&mut gz, &mut len)? {
            0 => break,
            2 => {}
            _ => return Err(bad("the stream ends inside an entry's name length".into())),
        }
        let name_len = u16::from_le_bytes(len) as usize;
        if name_len == 0 {
            return Err(bad("an entry has an empty name".into()));
        }
        let name = String::from_utf8(read_exact(&mut gz, name_len, "a name")?)
            .map_err(|_| bad("an entry's name is not UTF-8".into()))?;
        let (shape, values) = read_npy(&mut gz, &name)?;
        if !names.insert(name.clone()) {
            return Err(bad(format!("\"{name}\" appears twice")));
        }
        entries.push((name, shape, values));
    }
    if entries.is_empty() {
        return Err(bad("it holds no arrays".into()));
    }
    Ok(entries)
}

/// Fills `buf` as far as the stream allows; returns how many bytes were read.
fn read_some(r: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut at = 0;
    while at < buf.len() {
        match r.read(&mut buf[at..]) {
            Ok(0) => break,
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(bad(format!("the gzip stream is corrupt ({e})"))),
        }
    }
    Ok(at)
}

fn read_exact(r: &mut impl Read, n: usize, what: &str) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    buf.try_reserve_exact(n)
        .map_err(|_| EngineError::too_large(format!("{what} of {n} bytes")))?;
    buf.resize(n, 0);
    if read_some(r, &mut buf)? != n {
        return Err(bad(format!("the stream ends inside {what}")));
    }
    Ok(buf)
}

/// One `.npy` array: magic, version, header (a Python dict literal), data.
fn read_npy(r: &mut impl Read, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let lead = read_exact(r, 8, "an array header")?;
    if &lead[..6] != b"\x93NUMPY" {
        return Err(bad(format!("\"{name}\" is not a .npy array")));
    }
    let header_len = match (lead[6], lead[7]) {
        (1, 0) => {
            u16::from_le_bytes(read_exact(r, 2, "an array header")?.try_into().unwrap()) as usize
        }
        (2, 0) | (3, 0) => {
            u32::from_le_bytes(read_exact(r, 4, "an array header")?.try_into().unwrap()) as usize
        }
        (major, minor) => {
            return Err(bad(format!(
                "\"{name}\" uses .npy format {major}.{minor} (1.0 and 2.0 are read)"
            )))
        }
    };
    if header_len > 1 << 16 {
        return Err(bad(format!("\"{name}\" has a {header_len}-byte header")));
    }
    let header = String::from_utf8(read_exact(r, header_len, "an array header")?)
        .map_err(|_| bad(format!("\"{name}\": the header is not text")))?;
    let (dtype, fortran, shape) = parse_header(&header)
        .ok_or_else(|| bad(format!("\"{name}\": cannot read the header {header:?}")))?;
    if fortran {
        return Err(bad(format!("\"{name}\" is in Fortran order")));
    }
    let numel = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= crate::tensor::MAX_TENSOR_ELEMS)
        .ok_or_else(|| EngineError::too_large(format!("\"{name}\" has shape {shape:?}")))?;
    let size = match dtype.as_str() {
        "<f4" => 4,
        "<f8" => 8,
        "<f2" => 2,
        other => {
            return Err(bad(format!(
                "\"{name}\" has dtype {other} (float32/64/16 are read)"
            )))
        }
    };
    let raw = read_exact(r, numel * size, "an array's data")?;
    let what = format!("array \"{name}\"");
    let st_dtype = match size {
        4 => safetensors::Dtype::F32,
        8 => safetensors::Dtype::F64,
        _ => safetensors::Dtype::F16,
    };
    Ok((
        shape,
        super::safetensors::decode_floats(st_dtype, &raw, &what)?,
    ))
}

/// `{'descr': '<f4', 'fortran_order': False, 'shape': (768, 2304), }` → its three fields.
fn parse_header(h: &str) -> Option<(String, bool, Vec<usize>)> {
    let field = |key: &str| -> Option<&str> {
        let at = h.find(&format!("'{key}'"))? + key.len() + 2;
        Some(h[at..].trim_start().strip_prefix(':')?.trim_start())
    };
    let descr = field("descr")?.strip_prefix('\'')?;
    let descr = descr[..descr.find('\'')?].to_string();
    let fortran = match field("fortran_order")? {
        f if f.starts_with("False") => false,
        f if f.starts_with("True") => true,
        _ => return None,
    };
    let shape = field("shape")?.strip_prefix('(')?;
    let shape = &shape[..shape.find(')')?];
    let dims = shape
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| d.trim_end_matches('L').parse::<usize>().ok())
        .collect::<Option<Vec<_>>>()?;
    Some((descr, fortran, dims))
}

/// The GPT-2 checkpoint names and shapes of a model (the Conv1D layout pg_gpt2 kept).
fn gpt2_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (d, ff, da) = (cfg.d_model, cfg.d_ff, cfg.d_attn());
    let mut out = vec![
        ("wte".to_string(), vec![cfg.vocab, d]),
        ("wpe".to_string(), vec![cfg.n_positions, d]),
        ("ln_f.weight".to_string(), vec![d]),
        ("ln_f.bias".to_string(), vec![d]),
    ];
    for i in 0..cfg.n_layer {
        for (suffix, shape) in [
            ("ln_1.weight", vec![d]),
            ("ln_1.bias", vec![d]),
            ("attn.c_attn.weight", vec![d, 3 * da]),
            ("attn.c_attn.bias", vec![3 * da]),
            ("attn.c_proj.weight", vec![da, d]),
            ("attn.c_proj.bias", vec![d]),
            ("ln_2.weight", vec![d]),
            ("ln_2.bias", vec![d]),
            ("mlp.c_fc.weight", vec![d, ff]),
            ("mlp.c_fc.bias", vec![ff]),
            ("mlp.c_proj.weight", vec![ff, d]),
            ("mlp.c_proj.bias", vec![d]),
        ] {
            out.push((format!("h.{i}.{suffix}"), shape));
        }
    }
    out
}

/// A pg_gpt2 archive's arrays as a GPT-2 checkpoint (`transformer.…` names, the model's
/// shapes) for `names::to_canonical` with the GPT-2 family. Flattened arrays are reshaped;
/// any other shape, a missing array or one the model does not have is an error.
pub fn to_gpt2_checkpoint(entries: Vec<Entry>, cfg: &ModelConfig) -> Result<TensorMap> {
    let expected: std::collections::HashMap<String, Vec<usize>> =
        gpt2_shapes(cfg).into_iter().collect();
    let mut out = TensorMap::new();
    for (name, shape, values) in entries {
        let Some(want) = expected.get(&name) else {
            return Err(EngineError::invalid(format!(
                "pg_gpt2 archive array \"{name}\" is not part of this GPT-2 model"
            )));
        };
        let numel: usize = want.iter().product();
        if values.len() != numel || (shape.len() > 1 && &shape != want) {
            return Err(EngineError::invalid(format!(
                "pg_gpt2 archive array \"{name}\" has shape {shape:?}; the model needs {want:?}"
            )));
        }
        let full = match name.as_str() {
            "wte" | "wpe" => format!("transformer.{name}.weight"),
            other => format!("transformer.{other}"),
        };
        out.insert(full, (want.clone(), values));
    }
    Ok(out)
}

/// The archive name of a GPT-2 checkpoint tensor (the inverse of `to_gpt2_checkpoint`).
pub fn archive_name(gpt2_name: &str) -> Option<String> {
    let short = gpt2_name.strip_prefix("transformer.")?;
    Some(match short {
        "wte.weight" => "wte".into(),
        "wpe.weight" => "wpe".into(),
        other => other.into(),
    })
}

/// Writes one entry (a float32 `.npy` 1.0 array in its shape) to a gzip stream.
pub fn write_entry(
    out: &mut impl Write,
    name: &str,
    shape: &[usize],
    values: &[f32],
) -> Result<()> {
    let io = |e: std::io::Error| EngineError::Io(format!("could not write the archive: {e}"));
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
    // numpy pads the header with spaces and a newline so the data starts 64-byte aligned.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let name_len = u16::try_from(name.len())
        .map_err(|_| EngineError::invalid(format!("tensor name \"{name}\" is too long")))?;
    out.write_all(&name_len.to_le_bytes()).map_err(io)?;
    out.write_all(name.as_bytes()).map_err(io)?;
    out.write_all(b"\x93NUMPY\x01\x00").map_err(io)?;
    out.write_all(&(header.len() as u16).to_le_bytes())
        .map_err(io)?;
    out.write_all(header.as_bytes()).map_err(io)?;
    out.write_all(&crate::tensor::le_bytes(values)).map_err(io)
}

/// The planned tensors of an export that go into a pg_gpt2 archive, under the archive's
/// names. pg_gpt2 held GPT-2 models with the output layer tied to `wte`: a model that exports
/// to another layout, or has a separate output layer, is refused.
pub fn archive_entries(
    plan: &super::export::Plan,
) -> Result<Vec<(String, &super::export::Planned)>> {
    use super::hf_config::Family;
    if !matches!(plan.family, Family::Gpt2 | Family::Cerebras) {
        return Err(EngineError::invalid(format!(
            "pg_gpt2 archives hold GPT-2 models; this model exports as {}",
            plan.family.name()
        )));
    }
    plan.tensors
        .iter()
        .map(|t| match archive_name(&t.name) {
            Some(name) => Ok((name, t)),
            None => Err(EngineError::invalid(format!(
                "pg_gpt2 archives have no place for \"{}\" (a separate output layer)",
                t.name
            ))),
        })
        .collect()
}

/// Writes a whole archive: each planned tensor made (from `params`) and written in turn, so
/// memory holds one tensor at a time; `between` runs before each (a cancel check).
pub fn write_archive(
    out: &mut dyn Write,
    entries: &[(String, &super::export::Planned)],
    params: &mut dyn super::export::Canonical,
    cfg: &ModelConfig,
    between: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
    for (name, t) in entries {
        between()?;
        write_entry(&mut gz, name, &t.shape, &t.values(params, cfg)?)?;
    }
    gz.finish()
        .map_err(|e| EngineError::Io(format!("could not write the archive: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_numpy_writes() {
        assert_eq!(
            parse_header("{'descr': '<f4', 'fortran_order': False, 'shape': (768, 2304), }"),
            Some(("<f4".into(), false, vec![768, 2304]))
        );
        assert_eq!(
            parse_header("{'descr': '<f8', 'fortran_order': True, 'shape': (5,), }"),
            Some(("<f8".into(), true, vec![5]))
        );
        assert_eq!(
            parse_header("{'descr': '<f4', 'fortran_order': False, 'shape': (), }"),
            Some(("<f4".into(), false, vec![]))
        );
        assert_eq!(parse_header("{'descr': '<f4', 'shape': (x,), }"), None);
    }

    #[test]
    fn written_entries_read_back() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        write_entry(&mut gz, "h.0.ln_1.weight", &[3], &[1.0, 2.0, 3.0]).unwrap();
        write_entry(&mut gz, "wte", &[2, 2], &[0.5, -1.0, 2.5, 4.0]).unwrap();
        let bytes = gz.finish().unwrap();
        let entries = read(&bytes).unwrap();
        assert_eq!(
            entries[0],
            ("h.0.ln_1.weight".into(), vec![3], vec![1.0, 2.0, 3.0])
        );
        assert_eq!(
            entries[1],
            ("wte".into(), vec![2, 2], vec![0.5, -1.0, 2.5, 4.0])
        );
        // Truncated anywhere: an error, never a panic or a partial archive.
        for cut in 0..bytes.len() {
            assert!(read(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}
