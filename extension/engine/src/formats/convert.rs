//! Checkpoint conversion outside the database (`pg-gpt3 convert`): a Hugging Face or
//! Megatron-LM checkpoint on local disk → pg_gpt3's canonical safetensors (the names and
//! layouts `llm_param` stores, float32) and a config.json of model type "pg_gpt3" that holds
//! the whole configuration. The result imports with no conversion left to do: every tensor is
//! only renamed, so the server streams even the largest in pieces.
//!
//! Like the server's import, the converter reads one source tensor (or piece) at a time and
//! writes it at its place in the output file: memory stays at about one tensor.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::checkpoint::{self, Files, Stored};
use super::hf_config::{self, Family};
use super::{manifest, safetensors};
use crate::error::{EngineError, Result};
use crate::model::ModelConfig;

/// Files of one local folder, by name.
pub struct LocalFiles {
    dir: PathBuf,
    open: HashMap<String, (File, u64)>,
}

impl LocalFiles {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            open: HashMap::new(),
        }
    }

    fn get(&mut self, name: &str) -> Result<&(File, u64)> {
        if !self.open.contains_key(name) {
            let path = self.dir.join(name);
            let io = |e: std::io::Error| EngineError::Io(format!("{}: {e}", path.display()));
            let file = File::open(&path).map_err(io)?;
            let size = file.metadata().map_err(io)?.len();
            self.open.insert(name.to_string(), (file, size));
        }
        Ok(&self.open[name])
    }
}

impl Files for LocalFiles {
    fn size(&mut self, file: &str) -> Result<u64> {
        Ok(self.get(file)?.1)
    }

    fn read_at(&mut self, file: &str, offset: u64, out: &mut [u8]) -> Result<()> {
        let (handle, size) = self.get(file)?;
        if offset.saturating_add(out.len() as u64) > *size {
            return Err(EngineError::data(format!(
                "{file} ends before byte {}",
                offset.saturating_add(out.len() as u64)
            )));
        }
        handle
            .read_exact_at(out, offset)
            .map_err(|e| EngineError::Io(format!("{file}: {e}")))
    }
}

/// What `convert` wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Converted {
    pub config: ModelConfig,
    /// The source's family.
    pub family: Family,
    pub parameters: u64,
    pub bytes: u64,
}

/// The folder of `source` and the tensors of the checkpoint there: `source` is a
/// `.safetensors` file, a sharded checkpoint's index, a tensor manifest (`*.jsonl`), or a
/// folder holding one of them (manifest, index or model.safetensors, in that order).
pub fn source_tensors(source: &Path) -> Result<(LocalFiles, Vec<Stored>)> {
    let (dir, entry) = if source.is_dir() {
        let pick = ["model.manifest.jsonl", "model.safetensors.index.json"]
            .into_iter()
            .find(|n| source.join(n).exists())
            .unwrap_or("model.safetensors");
        (source.to_path_buf(), pick.to_string())
    } else {
        let name = source
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| EngineError::invalid(format!("{} is not a file", source.display())))?;
        let dir = source.parent().unwrap_or(Path::new(".")).to_path_buf();
        (dir, name)
    };
    let mut files = LocalFiles::new(&dir);
    let read_text = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .map_err(|e| EngineError::Io(format!("{}: {e}", dir.join(name).display())))
    };
    let tensors = if entry.ends_with(".jsonl") {
        checkpoint::manifest_tensors(manifest::parse(&read_text(&entry)?)?, |f| f.to_string())
    } else if entry.ends_with(".index.json") {
        let index: Value = serde_json::from_str(&read_text(&entry)?)
            .map_err(|e| EngineError::data(format!("{entry} is not JSON: {e}")))?;
        let mut shards: Vec<&str> = index
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| EngineError::data(format!("{entry} has no weight_map")))?
            .values()
            .filter_map(Value::as_str)
            .collect();
        shards.sort();
        shards.dedup();
        let mut parts = Vec::new();
        for shard in shards {
            parts.push(checkpoint::safetensors_tensors(&mut files, shard)?);
        }
        checkpoint::merge(parts)?
    } else {
        checkpoint::safetensors_tensors(&mut files, &entry)?
    };
    Ok((files, tensors))
}

/// Converts the checkpoint at `source` (see `source_tensors`) described by `config` (its
/// config.json, or Megatron-LM's arguments) into `destination`/model.safetensors and
/// `destination`/config.json. Files appear only when complete.
pub fn convert(source: &Path, config: &Value, destination: &Path) -> Result<Converted> {
    let (cfg, family) = hf_config::parse(config)?;
    let (mut files, tensors) = source_tensors(source)?;
    std::fs::create_dir_all(destination)
        .map_err(|e| EngineError::Io(format!("{}: {e}", destination.display())))?;

    let specs = cfg.param_specs();
    let entries: Vec<(&str, &[usize])> = specs
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .collect();
    let header = safetensors::f32_header(&entries)?;
    let mut at = header.len() as u64;
    let mut start: HashMap<&str, u64> = HashMap::new();
    for (name, shape) in &specs {
        start.insert(name, at);
        at += 4 * shape.iter().map(|&d| d as u64).product::<u64>();
    }
    let total = at;

    let weights = destination.join("model.safetensors");
    let partial = destination.join(".model.safetensors.partial");
    let io = |e: std::io::Error| EngineError::Io(format!("{}: {e}", partial.display()));
    let out = File::create(&partial).map_err(io)?;
    out.set_len(total).map_err(io)?;
    out.write_all_at(&header, 0).map_err(io)?;
    let written = checkpoint::import(
        family,
        &cfg,
        &tensors,
        &mut files,
        &mut |name, _shape, offset, values| {
            let base = start.get(name).ok_or_else(|| {
                EngineError::Internal(format!("no canonical parameter \"{name}\""))
            })?;
            out.write_all_at(&crate::tensor::le_bytes(&values), base + 4 * offset as u64)
                .map_err(io)
        },
    );
    let result = written.and_then(|n| {
        out.sync_all().map_err(io)?;
        std::fs::rename(&partial, &weights).map_err(io)?;
        Ok(n)
    });
    let parameters = match result {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    let config_json = serde_json::to_vec_pretty(&hf_config::canonical_config(&cfg, family))
        .map_err(|e| EngineError::Internal(format!("config.json: {e}")))?;
    std::fs::write(destination.join("config.json"), config_json)
        .map_err(|e| EngineError::Io(format!("{}: {e}", destination.display())))?;
    Ok(Converted {
        config: cfg,
        family,
        parameters,
        bytes: total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(path: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(path)
    }

    /// The converted file holds what the in-memory mapping makes of the same checkpoint, and
    /// its config.json describes the same model; converting that again changes nothing.
    #[test]
    fn converts_hugging_face_checkpoints_to_canonical_files() {
        let sources = [
            "models/gpt2",
            "models/gpt2_sharded",
            "models/cerebras",
            "models/opt",
            "models/opt_post_ln",
            "models/gpt_neo",
            "megatron/v0",
            "megatron/v1",
            "megatron/v2",
        ];
        for name in sources {
            let dir = fixture(name);
            let config: Value =
                serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
            let out = std::env::temp_dir().join(format!(
                "pg_gpt3_convert_{}_{}",
                name.replace('/', "_"),
                std::process::id()
            ));
            let converted = convert(&dir, &config, &out).unwrap();
            let (cfg, family) = hf_config::parse(&config).unwrap();
            assert_eq!(
                (converted.config.clone(), converted.family),
                (cfg.clone(), family)
            );
            assert_eq!(converted.parameters, cfg.param_count());

            let (mut files, tensors) = source_tensors(&dir).unwrap();
            let mut expected = super::super::TensorMap::new();
            checkpoint::import(family, &cfg, &tensors, &mut files, &mut |n, s, o, v| {
                super::super::collect_piece(&mut expected, n, s, o, v)
            })
            .unwrap();
            let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
            let got = safetensors::read(&bytes, "converted").unwrap();
            assert_eq!(got, expected);

            let written: Value =
                serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
            assert_eq!(written["model_type"], "pg_gpt3");
            assert_eq!(hf_config::parse(&written).unwrap(), (cfg, Family::Gpt3));
            let again = out.join("again");
            convert(&out, &written, &again).unwrap();
            assert_eq!(
                std::fs::read(again.join("model.safetensors")).unwrap(),
                bytes
            );
            std::fs::remove_dir_all(&out).unwrap();
        }
    }

    #[test]
    fn a_damaged_checkpoint_leaves_no_file() {
        let dir = fixture("models/gpt2");
        let config: Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let tmp = std::env::temp_dir().join(format!("pg_gpt3_convert_bad_{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let mut bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        bytes.truncate(bytes.len() - 4);
        std::fs::write(tmp.join("model.safetensors"), bytes).unwrap();
        let out = tmp.join("out");
        assert!(convert(&tmp, &config, &out).is_err());
        assert!(!out.join("model.safetensors").exists());
        assert!(!out.join(".model.safetensors.partial").exists());
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
