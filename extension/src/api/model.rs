//! Models as SQL: initialisation, checkpoint import, logits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use pg_llm_engine::formats::checkpoint::{self, Blobs, Files, Stored};
use pg_llm_engine::formats::hf_config::{self, Family};
use pg_llm_engine::formats::{export, manifest, names, pg_gpt2};
use pg_llm_engine::memory;
use pg_llm_engine::model::init::init_each;
use pg_llm_engine::model::{DType, ModelConfig};
use pg_llm_engine::{tensor, EngineError, Result};
use pgrx::prelude::*;
use pgrx::JsonB;

use super::args::{self, required};
use super::float32_bytea::Float32Bytea;
use crate::errors::{cancel, run};
use crate::files::{self, ServerFiles};
use crate::large_objects::LargeObjects;
use crate::model_cache::{self, Replacement};
use crate::{guc, store};

/// Initialises every parameter of a registered model (GPT-2/3 scheme), replacing any it had,
/// one tensor at a time. Returns the number of parameters written.
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn llm_init_params(model: Option<&str>, seed: default!(Option<i64>, 0)) -> i64 {
    run("llm_init_params", || {
        crate::privileges::require_writer(model)?;
        let model = args::model_name(model, "model")?;
        let seed = required(seed, "seed")? as u64;
        let cfg = store::load_config(model)?.config;
        let mut replacement = Replacement::new(model, &cfg)?;
        let n = init_each(&cfg, seed, cancel(), &mut |name, shape, at, values| {
            replacement.put(name, shape, at, values)
        })?;
        replacement.finish()?;
        Ok(n as i64)
    })
}

/// The model a checkpoint goes into and the family whose names it uses: from `config` (its
/// config.json; the model row is created, or checked against an existing one) or from the
/// registered row.
fn resolve(model: &str, config: Option<JsonB>) -> Result<(ModelConfig, Family)> {
    match config {
        Some(JsonB(json)) => {
            let (cfg, family) = hf_config::parse(&json)?;
            store::ensure_config(model, &cfg, family.name())?;
            Ok((cfg, family))
        }
        None => {
            let stored = store::load_config(model)?;
            Ok((stored.config, Family::parse(&stored.family)?))
        }
    }
}

/// Imports `tensors` (located in `files`) into `model`, tensor by tensor (see
/// `checkpoint::import` for what is checked before anything is written). All or nothing.
fn import(
    model: &str,
    config: Option<JsonB>,
    keep_dtype: Option<bool>,
    files: &mut dyn Files,
    tensors: impl FnOnce(&mut dyn Files) -> Result<Vec<Stored>>,
) -> Result<i64> {
    let keep_dtype = required(keep_dtype, "keep_dtype")?;
    let (cfg, family) = resolve(model, config)?;
    let tensors = tensors(files)?;
    if keep_dtype {
        // Served from the start in the checkpoint's precision: the new weight file is
        // written in it as the tensors arrive.
        set_weight_dtype(model, checkpoint::matrix_dtype(&tensors)?)?;
    }
    let family = exported_layout(family, &cfg, &tensors);
    let mut replacement = Replacement::new(model, &cfg)?;
    let n = checkpoint::import(
        family,
        &cfg,
        &tensors,
        files,
        &mut |name, shape, at, values| replacement.put(name, shape, at, values),
    )?;
    replacement.finish()?;
    Ok(n as i64)
}

/// Records the precision `model` is served in (a change of its registry row: a new version).
fn set_weight_dtype(model: &str, dtype: DType) -> Result<()> {
    Spi::connect_mut(|client| {
        client
            .update(
                "UPDATE llm_model_config SET weight_dtype = $2 WHERE model = $1",
                None,
                &[model.into(), dtype.name().into()],
            )
            .map(|_| ())
    })
    .map_err(crate::errors::spi_error)
}

/// The names a checkpoint for a model of `family` uses. A dense model registered with
/// pg_gpt3's own names (`gpt3`) exports in GPT-2's layout: a checkpoint without canonical layer
/// names (`layers.N.…`) is read in that layout, so such a model's export imports back without
/// its config.json. (A locally banded model exports GPT-Neo's layout, which lacks the query and
/// key biases such a model has: it goes into a model registered from the export's config.)
fn exported_layout(family: Family, cfg: &ModelConfig, tensors: &[Stored]) -> Family {
    let exported = export::target_family(family, cfg);
    if family == Family::Gpt3
        && matches!(exported, Family::Gpt2 | Family::Cerebras)
        && !tensors.iter().any(|t| t.name.starts_with("layers."))
    {
        exported
    } else {
        family
    }
}

/// A pg_gpt2 archive into a registered model that GPT-2's checkpoint layout expresses. The
/// archive is a gzip stream, read whole (pg_gpt2's models are GPT-2 sized).
fn import_npz(model: &str, bytes: &[u8]) -> Result<i64> {
    let stored = store::load_config(model)?;
    let family = Family::parse(&stored.family)?;
    let cfg = stored.config;
    if !matches!(
        export::target_family(family, &cfg),
        Family::Gpt2 | Family::Cerebras
    ) {
        return Err(EngineError::invalid(format!(
            "pg_gpt2 archives hold GPT-2 models; model \"{model}\" has locally banded layers or \
             another family's layout"
        )));
    }
    let raw = pg_gpt2::to_gpt2_checkpoint(pg_gpt2::read(bytes)?, &cfg)?;
    let mut replacement = Replacement::new(model, &cfg)?;
    let n = names::stream_map(Family::Gpt2, &cfg, &raw, &mut |name, shape, at, values| {
        replacement.put(name, shape, at, values)
    })?;
    replacement.finish()?;
    Ok(n as i64)
}

/// Sets the precision `model` is served in: 'float32', or 'bfloat16' / 'float16' for its
/// matrices (kernels widen them and accumulate in float32; vectors stay float32). Converting
/// to half precision rounds the stored matrices to it, as `model.to(torch.bfloat16)` would,
/// so that exports give what is served; training keeps float32 master weights in
/// `llm_param`, and the served copy is rounded from them. The model's owner. Returns how
/// many stored values the rounding changed.
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn llm_set_weight_dtype(model: Option<&str>, dtype: Option<&str>) -> i64 {
    run("llm_set_weight_dtype", || {
        crate::privileges::require_writer(model)?;
        let model = args::model_name(model, "model")?;
        let dtype = DType::parse(required(dtype, "dtype")?)?;
        crate::training::lock(model)?;
        let stored = store::load_config(model)?;
        let changed = match dtype {
            DType::Float32 => 0,
            _ => store::round_matrices(model, &stored.config, dtype)?,
        };
        set_weight_dtype(model, dtype)?;
        model_cache::forget(model);
        Ok(changed)
    })
}

/// Imports one of pg_gpt2's checkpoint archives (its `.npz`: a gzip stream of GPT-2's arrays,
/// shaped or flattened) given as bytes into a registered model. All or nothing; the model's
/// owner. Returns the parameter count.
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn pg_llm_import_npz_bytes(data: Option<&[u8]>, model: Option<&str>) -> i64 {
    run("pg_llm_import_npz_bytes", || {
        crate::privileges::require_writer(model)?;
        import_npz(args::model_name(model, "model")?, required(data, "data")?)
    })
}

/// `pg_llm_import_npz_bytes` from a server file; restricted like COPY FROM.
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn pg_llm_import_npz(path: Option<&str>, model: Option<&str>) -> i64 {
    run("pg_llm_import_npz", || {
        files::require_read_privilege("pg_llm_import_npz")?;
        crate::privileges::require_writer(model)?;
        let bytes = files::read(required(path, "path")?)?;
        import_npz(args::model_name(model, "model")?, &bytes)
    })
}

/// Imports a Hugging Face safetensors checkpoint given as bytes (no file privilege needed; the
/// model's owner). With `config` (the checkpoint's config.json) the model row is created or
/// checked and the family detected; without it the model must be registered. All or nothing.
/// Returns the parameter count.
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn pg_llm_import_safetensors_bytes(
    data: Option<&[u8]>,
    model: Option<&str>,
    config: default!(Option<JsonB>, "NULL"),
    keep_dtype: default!(Option<bool>, false),
) -> i64 {
    run("pg_llm_import_safetensors_bytes", || {
        crate::privileges::require_writer(model)?;
        let data = required(data, "data")?;
        let mut blobs = Blobs(HashMap::from([("data".to_string(), data)]));
        import(
            args::model_name(model, "model")?,
            config,
            keep_dtype,
            &mut blobs,
            |f| checkpoint::safetensors_tensors(f, "data"),
        )
    })
}

/// Imports from a server path: a `.safetensors` file, a sharded checkpoint's
/// `model.safetensors.index.json`, a directory holding either, or a tensor manifest
/// (`*.jsonl`, `formats::manifest`) whose checksums are all verified before anything is
/// written. Files are read tensor by tensor, never whole. Restricted like COPY FROM.
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn pg_llm_import_safetensors(
    path: Option<&str>,
    model: Option<&str>,
    config: default!(Option<JsonB>, "NULL"),
    keep_dtype: default!(Option<bool>, false),
) -> i64 {
    run("pg_llm_import_safetensors", || {
        files::require_read_privilege("pg_llm_import_safetensors")?;
        crate::privileges::require_writer(model)?;
        let path = PathBuf::from(required(path, "path")?);
        let model = args::model_name(model, "model")?;
        let mut server = ServerFiles::default();
        if path.to_string_lossy().ends_with(".jsonl") {
            let entries = manifest::parse(&files::read_text(&path.to_string_lossy())?)?;
            let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            return import(model, config, keep_dtype, &mut server, |_| {
                Ok(checkpoint::manifest_tensors(entries, |f| {
                    dir.join(f).to_string_lossy().into_owned()
                }))
            });
        }
        let shards = shard_files(&path)?;
        import(model, config, keep_dtype, &mut server, |f| {
            let mut parts = Vec::new();
            for shard in &shards {
                parts.push(checkpoint::safetensors_tensors(
                    f,
                    &shard.to_string_lossy(),
                )?);
            }
            checkpoint::merge(parts)
        })
    })
}

/// The safetensors files of a checkpoint path: a file, a sharded checkpoint's index, or a
/// directory holding either.
fn shard_files(path: &Path) -> Result<Vec<PathBuf>> {
    let index = if path.is_dir() {
        Some(path.join("model.safetensors.index.json")).filter(|idx| idx.exists())
    } else if path.to_string_lossy().ends_with(".index.json") {
        Some(path.to_path_buf())
    } else {
        None
    };
    let Some(idx) = index else {
        return Ok(vec![if path.is_dir() {
            path.join("model.safetensors")
        } else {
            path.to_path_buf()
        }]);
    };
    let dir = idx.parent().unwrap_or(Path::new("."));
    let names = index_shards(
        &files::read(&idx.to_string_lossy())?,
        &idx.to_string_lossy(),
    )?;
    Ok(names.iter().map(|f| dir.join(f)).collect())
}

/// The shard files a sharded checkpoint's index (`model.safetensors.index.json`) names in its
/// weight_map, each once, sorted.
fn index_shards(index: &[u8], what: &str) -> Result<Vec<String>> {
    let json: serde_json::Value = serde_json::from_slice(index)
        .map_err(|e| EngineError::data(format!("{what} is not JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| EngineError::data(format!("{what} has no weight_map")))?;
    let mut names: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// `file` named relative to the directory of `beside` (a manifest or an index among the
/// uploaded files), as the uploaded files name it.
fn sibling(beside: &str, file: &str) -> String {
    match beside.rfind('/') {
        Some(slash) => format!("{}/{file}", &beside[..slash]),
        None => file.to_string(),
    }
}

/// Imports a checkpoint uploaded into large objects (`lo_from_bytea`, `lo_put`): `objects`
/// holds its files and `files` their names. As for a directory given to the path form, a
/// tensor manifest (`*.jsonl`, every checksum verified first) decides what is read if one is
/// among the files; else a shard index (`*.index.json`) names the shards; else every
/// `.safetensors` file is a shard. Files are read in blocks, never whole, through lo_get:
/// PostgreSQL's large object privileges apply, and nothing on the server's disk is read, so
/// the model's owner may import without file privileges. All or nothing. Returns the
/// parameter count.
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn pg_llm_import_safetensors_lo(
    objects: Option<Vec<Option<pgrx::pg_sys::Oid>>>,
    files: Option<Vec<Option<String>>>,
    model: Option<&str>,
    config: default!(Option<JsonB>, "NULL"),
    keep_dtype: default!(Option<bool>, false),
) -> i64 {
    run("pg_llm_import_safetensors_lo", || {
        crate::privileges::require_writer(model)?;
        let mut objects = LargeObjects::new(objects, files)?;
        let model = args::model_name(model, "model")?;
        let names: Vec<String> = objects.names().into_iter().map(str::to_string).collect();
        let one_of = |kind: &str, suffix: &str| -> Result<Option<String>> {
            let found: Vec<&String> = names.iter().filter(|n| n.ends_with(suffix)).collect();
            match found.as_slice() {
                [] => Ok(None),
                [one] => Ok(Some(one.to_string())),
                more => Err(EngineError::invalid(format!(
                    "more than one {kind} among the files: {}",
                    more.iter()
                        .map(|n| format!("\"{n}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            }
        };
        let missing = |what: &str, file: &str| {
            EngineError::invalid(format!(
                "{what} names \"{file}\", which is not among the files given"
            ))
        };
        if let Some(manifest_file) = one_of("manifest", ".jsonl")? {
            let text = String::from_utf8(objects.read_all(&manifest_file)?).map_err(|_| {
                EngineError::data(format!("manifest \"{manifest_file}\" is not UTF-8 text"))
            })?;
            let entries = manifest::parse(&text)?;
            if let Some(e) = entries
                .iter()
                .find(|e| !objects.contains(&sibling(&manifest_file, &e.file)))
            {
                return Err(missing(&format!("manifest \"{manifest_file}\""), &e.file));
            }
            return import(model, config, keep_dtype, &mut objects, |_| {
                Ok(checkpoint::manifest_tensors(entries, |f| {
                    sibling(&manifest_file, f)
                }))
            });
        }
        let shards: Vec<String> = match one_of("shard index", ".index.json")? {
            Some(index) => {
                let what = format!("index \"{index}\"");
                let shards: Vec<String> = index_shards(&objects.read_all(&index)?, &what)?
                    .iter()
                    .map(|f| sibling(&index, f))
                    .collect();
                if let Some(absent) = shards.iter().find(|f| !objects.contains(f)) {
                    return Err(missing(&what, absent));
                }
                shards
            }
            None => names
                .iter()
                .filter(|n| n.ends_with(".safetensors"))
                .cloned()
                .collect(),
        };
        if shards.is_empty() {
            return Err(EngineError::invalid(format!(
                "no checkpoint among the files ({}): give .safetensors files, with \
                 model.safetensors.index.json when sharded, or a *.jsonl manifest",
                names.join(", ")
            )));
        }
        import(model, config, keep_dtype, &mut objects, |f| {
            let mut parts = Vec::new();
            for shard in &shards {
                parts.push(checkpoint::safetensors_tensors(f, shard)?);
            }
            checkpoint::merge(parts)
        })
    })
}

/// float32 logits [T, vocab] for every position of `token_ids`.
#[pg_extern(volatile, parallel_safe)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn llm_logits(
    token_ids: Option<Vec<Option<i32>>>,
    model_name: default!(Option<&str>, "'gpt3-125m'"),
) -> Float32Bytea {
    run("llm_logits", || {
        let ids = args::token_ids(token_ids, "token_ids")?;
        let name = args::model_name(model_name, "model_name")?;
        let what = format!("a forward pass over {} tokens of \"{name}\"", ids.len());
        let model = model_cache::get_within(name, &what, |cfg, _| {
            if ids.len() > cfg.n_positions {
                return Err(EngineError::invalid(format!(
                    "{} tokens exceed the model's context of {} tokens",
                    ids.len(),
                    cfg.n_positions
                )));
            }
            memory::inference(cfg, ids.len(), ids.len(), guc::threads())
        })?;
        let len = tensor::numel(&[ids.len(), model.config.vocab], "logits")?;
        Float32Bytea::computed(len, cancel(), |out| model.logits_into(out, &ids, cancel()))
    })
}
