//! Reading and writing models in their tables (`llm_model_config`, `llm_param`) through SPI.
//! Everything runs in the caller's transaction: an error rolls every write back. Reads go
//! through `spi::read`; a caller that needs several reads to agree (a model load) wraps them in
//! `spi::consistent`.

use std::collections::HashMap;

use pg_llm_engine::model::config::{Residual, Rotary, RotaryPairing};
use pg_llm_engine::model::weights::{packed_tensors, packing};
use pg_llm_engine::model::{Activation, AttnKind, DType, LnPlacement, ModelConfig, TensorSource};
use pg_llm_engine::{tensor, EngineError, Result};
use pgrx::prelude::*;
use pgrx::PgMemoryContexts;

use crate::errors::spi_error;
use crate::spi;
use crate::wait;

/// Values per stored chunk (4 MB) for new writes. PostgreSQL stores a row (its TOAST pieces and
/// their WAL) without serving interrupts: on a 2-core machine a 16 MB row took 116-144 ms, a
/// 4 MB row 26-37 ms, so a cancel waits at most about one 4 MB row. A streamed piece
/// (`formats::PIECE`, 16 MB) is four chunks. Readers and the training write-back follow
/// whatever layout the rows have.
pub const CHUNK_ELEMS: usize = pg_llm_engine::formats::PIECE / 4;

/// A registered model's configuration, family and current version; 42704 when unknown.
pub struct StoredConfig {
    pub config: ModelConfig,
    pub family: String,
    pub version: i64,
    /// The precision the model is served in.
    pub dtype: DType,
}

pub fn load_config(model: &str) -> Result<StoredConfig> {
    let mut stored = None;
    spi::read(
        "SELECT n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab, activation, attention_pattern, \
         local_window, scale_attn, position_offset, qkv_bias, tied_head, padded_vocab, ln_placement, ln_eps, \
         d_embed, family, version, position_embedding, rotary_dim, rotary_base, rotary_pairing, residual, \
         out_proj_bias, head_bias, weight_dtype FROM llm_model_config WHERE model = $1",
        &[model.into()],
        |row| {
            stored = Some(config_from_row(row)?);
            Ok(())
        },
    )?;
    stored.ok_or_else(|| {
        EngineError::UndefinedObject(format!(
            "model \"{model}\" is not registered in llm_model_config"
        ))
    })
}

fn config_from_row(row: &crate::spi::Row) -> Result<StoredConfig> {
    let int = |i: usize| -> Result<usize> {
        Ok(row.get::<i32>(i).map_err(spi_error)?.unwrap_or(0).max(0) as usize)
    };
    let opt_int = |i: usize| -> Result<Option<usize>> {
        Ok(row
            .get::<i32>(i)
            .map_err(spi_error)?
            .map(|v| v.max(0) as usize))
    };
    let text = |i: usize| -> Result<String> {
        Ok(row.get::<String>(i).map_err(spi_error)?.unwrap_or_default())
    };
    let flag =
        |i: usize| -> Result<bool> { Ok(row.get::<bool>(i).map_err(spi_error)?.unwrap_or(false)) };
    let pattern: Vec<Option<String>> = row.get(9).map_err(spi_error)?.unwrap_or_default();
    let config = ModelConfig {
        n_layer: int(1)?,
        n_head: int(2)?,
        d_model: int(3)?,
        d_head: int(4)?,
        d_ff: int(5)?,
        n_positions: int(6)?,
        vocab: int(7)?,
        activation: Activation::parse(&text(8)?)?,
        attention_pattern: pattern
            .iter()
            .map(|k| AttnKind::parse(k.as_deref().unwrap_or("")))
            .collect::<Result<_>>()?,
        local_window: opt_int(10)?,
        scale_attn: flag(11)?,
        position_offset: int(12)?,
        qkv_bias: flag(13)?,
        tied_head: flag(14)?,
        padded_vocab: opt_int(15)?,
        ln_placement: if text(16)? == "post" {
            LnPlacement::Post
        } else {
            LnPlacement::Pre
        },
        ln_eps: row.get::<f32>(17).map_err(spi_error)?.unwrap_or(1e-5),
        d_embed: opt_int(18)?,
        rotary: match text(21)?.as_str() {
            "rotary" => Some(Rotary {
                dims: opt_int(22)?.unwrap_or(0),
                base: row.get::<f32>(23).map_err(spi_error)?.unwrap_or(10000.0),
                pairing: RotaryPairing::parse(&text(24)?)?,
            }),
            _ => None,
        },
        residual: Residual::parse(&text(25)?)?,
        out_proj_bias: flag(26)?,
        head_bias: flag(27)?,
    };
    let family = text(19)?;
    let version = row.get::<i64>(20).map_err(spi_error)?.unwrap_or(0);
    let dtype = DType::parse(&text(28)?)?;
    config.validate()?;
    Ok(StoredConfig {
        config,
        family,
        version,
        dtype,
    })
}

/// Registers `model` with `cfg`, or checks that an existing row has the same architecture.
pub fn ensure_config(model: &str, cfg: &ModelConfig, family: &str) -> Result<()> {
    match load_config(model) {
        Ok(stored) => {
            if stored.config != *cfg {
                return Err(EngineError::invalid(format!(
                    "the checkpoint's config.json does not match the registered model \"{model}\" \
                     (registered: {}; checkpoint: {})",
                    describe(&stored.config),
                    describe(cfg)
                )));
            }
            Ok(())
        }
        Err(EngineError::UndefinedObject(_)) => {
            let pattern: Vec<String> = cfg
                .attention_pattern
                .iter()
                .map(|k| {
                    if *k == AttnKind::Local {
                        "local"
                    } else {
                        "dense"
                    }
                    .to_string()
                })
                .collect();
            let n = |v: usize| v as i32;
            Spi::run_with_args(
                "INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab, \
                 activation, attention_pattern, local_window, scale_attn, position_offset, qkv_bias, tied_head, \
                 padded_vocab, ln_placement, ln_eps, d_embed, family, position_embedding, rotary_dim, rotary_base, \
                 rotary_pairing, residual, out_proj_bias, head_bias) \
                 VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20,\
                         $21,$22,$23,$24,$25,$26,$27)",
                &[
                    model.into(),
                    n(cfg.n_layer).into(),
                    n(cfg.n_head).into(),
                    n(cfg.d_model).into(),
                    n(cfg.d_head).into(),
                    n(cfg.d_ff).into(),
                    n(cfg.n_positions).into(),
                    n(cfg.vocab).into(),
                    cfg.activation.name().into(),
                    pattern.into(),
                    cfg.local_window.map(n).into(),
                    cfg.scale_attn.into(),
                    n(cfg.position_offset).into(),
                    cfg.qkv_bias.into(),
                    cfg.tied_head.into(),
                    cfg.padded_vocab.map(n).into(),
                    if cfg.ln_placement == LnPlacement::Post { "post" } else { "pre" }.into(),
                    cfg.ln_eps.into(),
                    cfg.d_embed.map(n).into(),
                    family.into(),
                    if cfg.rotary.is_some() { "rotary" } else { "learned" }.into(),
                    cfg.rotary.map(|r| n(r.dims)).into(),
                    cfg.rotary.map_or(10000.0, |r| r.base).into(),
                    cfg.rotary
                        .map_or(RotaryPairing::Halves, |r| r.pairing)
                        .name()
                        .into(),
                    cfg.residual.name().into(),
                    cfg.out_proj_bias.into(),
                    cfg.head_bias.into(),
                ],
            )
            .map_err(spi_error)
        }
        Err(e) => Err(e),
    }
}

fn describe(c: &ModelConfig) -> String {
    format!(
        "n_layer {}, n_head {}, d_model {}, d_ff {}, n_positions {}, vocab {}, activation {}",
        c.n_layer,
        c.n_head,
        c.d_model,
        c.d_ff,
        c.n_positions,
        c.vocab,
        c.activation.name()
    )
}

/// Removes every parameter row of `model` (the start of a replacement), one row (a chunk of
/// at most 16 MB) per statement with a look for a cancel between: PostgreSQL deletes a
/// value's TOAST without looking for one, which took 0.5 s for a whole gpt3-125m.
pub fn delete_params(model: &str) -> Result<()> {
    // A whole model written anew holds all of its tensors: its shares end.
    Spi::run_with_args(
        "DELETE FROM llm_param_share WHERE model = $1",
        &[model.into()],
    )
    .map_err(spi_error)?;
    let mut rows = Vec::new();
    spi::read(
        "SELECT name, chunk FROM llm_param WHERE model = $1",
        &[model.into()],
        |row| {
            let name = row.get::<String>(1).map_err(spi_error)?;
            let chunk = row.get::<i32>(2).map_err(spi_error)?;
            rows.extend(name.zip(chunk));
            Ok(())
        },
    )?;
    for (name, chunk) in rows {
        wait::pace_to_wal_flush();
        Spi::run_with_args(
            "DELETE FROM llm_param WHERE model = $1 AND name = $2 AND chunk = $3",
            &[model.into(), name.into(), chunk.into()],
        )
        .map_err(spi_error)?;
    }
    Ok(())
}

/// Inserts the rows of values `offset..` of a tensor (all of it, or a streamed piece starting
/// on a chunk boundary), chunked. Each chunk's copy into a SQL value lives in a memory
/// context freed right after its INSERT, so writing a model holds one chunk at a time rather
/// than every chunk until the statement ends.
pub fn insert_tensor(
    model: &str,
    name: &str,
    shape: &[usize],
    offset: usize,
    data: &[f32],
) -> Result<()> {
    pgrx::check_for_interrupts!();
    if offset % CHUNK_ELEMS != 0 {
        return Err(EngineError::Internal(format!(
            "a piece of \"{name}\" starts at {offset}, not on a chunk boundary"
        )));
    }
    let shape_i32: Vec<i32> = shape.iter().map(|&d| d as i32).collect();
    for (k, values) in data.chunks(CHUNK_ELEMS).enumerate() {
        let chunk = offset / CHUNK_ELEMS + k;
        wait::pace_to_wal_flush();
        let mut context = PgMemoryContexts::new("pg_llm tensor chunk");
        // SAFETY: the closure only allocates through PostgreSQL; nothing allocated inside
        // escapes it, and the context is deleted when `context` drops.
        unsafe {
            context.switch_to(|_| {
                Spi::run_with_args(
                    "INSERT INTO llm_param (model, name, chunk, shape, elem_offset, data) VALUES ($1, $2, $3, $4, $5, $6)",
                    &[
                        model.into(),
                        name.into(),
                        (chunk as i32).into(),
                        shape_i32.clone().into(),
                        ((chunk * CHUNK_ELEMS) as i64).into(),
                        tensor::le_bytes(values).as_ref().into(),
                    ],
                )
            })
        }
        .map_err(spi_error)?;
    }
    Ok(())
}

/// Values `range` of a stored tensor, read from the chunks that hold them. Only the bytes of
/// the range are fetched (`data` is stored uncompressed, so `substring` reads just the TOAST
/// pages it needs): a piece of a 256 MB chunk costs the piece, not the chunk.
pub fn read_range(model: &str, name: &str, range: std::ops::Range<usize>) -> Result<Vec<f32>> {
    pgrx::check_for_interrupts!();
    let mut values = tensor::alloc_zeroed(range.len())?;
    let mut filled = 0;
    spi::read(
        "SELECT elem_offset + lo, substring(data FROM (lo * 4 + 1)::int FOR ((hi - lo) * 4)::int) \
         FROM (SELECT chunk, elem_offset, data, greatest($3 - elem_offset, 0) AS lo, \
                      least($4 - elem_offset, length(data) / 4) AS hi \
                 FROM llm_param_resolved WHERE model = $1 AND name = $2 \
                  AND elem_offset < $4 AND elem_offset + length(data) / 4 > $3) s \
         ORDER BY chunk",
        &[
            model.into(),
            name.into(),
            (range.start as i64).into(),
            (range.end as i64).into(),
        ],
        |row| {
            let at = row.get::<i64>(1).map_err(spi_error)?.unwrap_or(0).max(0) as usize;
            let bytes: &[u8] = row.get(2).map_err(spi_error)?.unwrap_or_default();
            let from = range.start.max(at);
            let to = range.end.min(at + bytes.len() / 4);
            if from != range.start + filled || to < from {
                return Err(EngineError::data(format!(
                    "the chunks of parameter \"{name}\" of model \"{model}\" do not cover its values"
                )));
            }
            tensor::copy_decoded(
                &mut values[filled..filled + (to - from)],
                &bytes[(from - at) * 4..(to - at) * 4],
                name,
            )?;
            filled += to - from;
            Ok(())
        },
    )?;
    if filled != range.len() {
        return Err(EngineError::data(format!(
            "parameter \"{name}\" of model \"{model}\" does not hold values {}..{}",
            range.start, range.end
        )));
    }
    Ok(values)
}

/// A model's parameters read one tensor at a time by canonical name (`formats::export`), all
/// under the caller's snapshot (`spi::consistent`).
pub struct TableTensors {
    source: TableSource,
    shapes: HashMap<String, Vec<usize>>,
}

impl TableTensors {
    /// Checks the stored tensors against `cfg` (present, shaped right) before any is read.
    pub fn new(model: &str, cfg: &ModelConfig) -> Result<Self> {
        let source = TableSource::new(model);
        let shapes = source.shapes()?;
        pg_llm_engine::model::check_shapes(cfg, &shapes)?;
        Ok(Self { source, shapes })
    }
}

impl pg_llm_engine::formats::export::Canonical for TableTensors {
    fn fetch(&mut self, name: &str) -> Result<Vec<f32>> {
        let shape = self
            .shapes
            .get(name)
            .ok_or_else(|| EngineError::data(format!("the model has no parameter \"{name}\"")))?;
        let mut values = tensor::alloc_zeroed(tensor::numel(shape, name)?)?;
        self.source.read_into(name, &mut values)?;
        Ok(values)
    }

    fn fetch_range(&mut self, name: &str, range: std::ops::Range<usize>) -> Result<Vec<f32>> {
        self.source.read_range(name, range)
    }
}

/// The parameters of `model` in `llm_param`, read one tensor at a time straight into the
/// caller's buffer (the weights are never held twice, only the tensor being read).
pub struct TableSource {
    model: String,
}

impl TableSource {
    pub fn new(model: &str) -> Self {
        Self {
            model: model.to_string(),
        }
    }

    /// Values `range` of one tensor (`read_range`).
    pub fn read_range(&self, name: &str, range: std::ops::Range<usize>) -> Result<Vec<f32>> {
        read_range(&self.model, name, range)
    }
}

impl TensorSource for TableSource {
    fn shapes(&self) -> Result<HashMap<String, Vec<usize>>> {
        let mut shapes = HashMap::new();
        spi::read(
            "SELECT name, shape FROM llm_param_resolved WHERE model = $1 AND chunk = 0",
            &[self.model.as_str().into()],
            |row| {
                let name: String = row.get(1).map_err(spi_error)?.unwrap_or_default();
                let shape: Vec<i32> = row.get(2).map_err(spi_error)?.unwrap_or_default();
                shapes.insert(name, shape.iter().map(|&d| d.max(0) as usize).collect());
                Ok(())
            },
        )?;
        if shapes.is_empty() {
            return Err(EngineError::UndefinedObject(format!(
                "model \"{}\" has no parameters; create them with llm_init_params or pg_llm_import_safetensors",
                self.model
            )));
        }
        Ok(shapes)
    }

    fn read_into(&mut self, name: &str, out: &mut [f32]) -> Result<()> {
        pgrx::check_for_interrupts!();
        // One query per tensor: its detoasted chunks are freed before the next tensor.
        let mut filled = 0;
        spi::read(
            "SELECT data FROM llm_param_resolved WHERE model = $1 AND name = $2 ORDER BY chunk",
            &[self.model.as_str().into(), name.into()],
            |row| {
                let bytes: &[u8] = row.get(1).map_err(spi_error)?.unwrap_or_default();
                filled += tensor::copy_decoded(&mut out[filled..], bytes, name)
                    .map_err(|_| self.wrong_size(name, out.len()))?;
                Ok(())
            },
        )?;
        if filled != out.len() {
            return Err(self.wrong_size(name, out.len()));
        }
        Ok(())
    }
}

impl TableSource {
    fn wrong_size(&self, name: &str, numel: usize) -> EngineError {
        EngineError::data(format!(
            "parameter \"{name}\" of model \"{}\" does not hold the {numel} values its shape needs",
            self.model
        ))
    }
}

/// AdamW state stored beside a model's weights, in the packed layout.
pub struct Moments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub step: i64,
}

/// The stored moments and step count of `model`, or None when any tensor has none (never
/// trained, or weights replaced since): the optimizer then starts afresh. A step count that
/// differs between tensors (hand-edited rows) is a data error.
pub fn read_moments(model: &str, cfg: &ModelConfig, len: usize) -> Result<Option<Moments>> {
    let mut m = tensor::alloc_zeroed(len)?;
    let mut v = tensor::alloc_zeroed(len)?;
    let mut step: Option<i64> = None;
    for (name, range) in packed_tensors(cfg) {
        pgrx::check_for_interrupts!();
        let mut filled = 0;
        let mut complete = true;
        spi::read(
            "SELECT m, v, step FROM llm_param_resolved WHERE model = $1 AND name = $2 ORDER BY chunk",
            &[model.into(), name.as_str().into()],
            |row| {
                pgrx::check_for_interrupts!();
                let mb: Option<&[u8]> = row.get(1).map_err(spi_error)?;
                let vb: Option<&[u8]> = row.get(2).map_err(spi_error)?;
                let s = row.get::<i32>(3).map_err(spi_error)?.unwrap_or(0) as i64;
                let (Some(mb), Some(vb)) = (mb, vb) else {
                    complete = false;
                    return Ok(());
                };
                if *step.get_or_insert(s) != s {
                    return Err(EngineError::data(format!(
                        "the tensors of model \"{model}\" have different optimizer step counts \
                         (a tensor it shares may have been trained with another model); reset them with \
                         UPDATE llm_param SET m = NULL, v = NULL, step = 0 WHERE model = '{model}'"
                    )));
                }
                let dst = range.start + filled..range.end;
                let got = tensor::copy_decoded(&mut m[dst.clone()], mb, &name)?;
                if tensor::copy_decoded(&mut v[dst], vb, &name)? != got {
                    return Err(EngineError::data(format!(
                        "moments m and v of \"{name}\" differ in length"
                    )));
                }
                filled += got;
                Ok(())
            },
        )?;
        if !complete {
            return Ok(None);
        }
        if filled != range.len() {
            return Err(EngineError::data(format!(
                "the optimizer moments of \"{name}\" of model \"{model}\" do not hold {} values",
                range.len()
            )));
        }
    }
    // Moments are computed, never user input: NaN, infinity or a negative second moment can
    // only come from hand edits, and would poison every later step.
    let corrupt = |what: &str| {
        EngineError::data(format!(
            "the stored optimizer state of model \"{model}\" is corrupt ({what}); reset it with \
             UPDATE llm_param SET m = NULL, v = NULL, step = 0 WHERE model = '{model}'"
        ))
    };
    if m.iter().any(|x| !x.is_finite()) {
        return Err(corrupt("a non-finite first moment"));
    }
    if v.iter().any(|x| !(x.is_finite() && *x >= 0.0)) {
        return Err(corrupt("a negative or non-finite second moment"));
    }
    Ok(step.map(|step| Moments { m, v, step }))
}

/// Writes trained weights and their moments and step count over `model`'s rows, chunk by
/// chunk in the layout the rows have (whatever chunk size wrote them). Every row must exist
/// (the caller loaded them).
pub fn write_trained(
    model: &str,
    cfg: &ModelConfig,
    weights: &[f32],
    moments: &Moments,
) -> Result<()> {
    let step = i32::try_from(moments.step)
        .map_err(|_| EngineError::too_large("the optimizer step count passed 2³¹"))?;
    for (name, range) in packed_tensors(cfg) {
        pgrx::check_for_interrupts!();
        // A shared tensor is written where it is stored, once.
        let (stored_model, stored_name, chunks) = chunk_layout(model, &name, range.len())?;
        for (chunk, part) in chunks {
            // A row is stored without serving interrupts: look for a cancel between rows.
            wait::pace_to_wal_flush();
            let part = range.start + part.start..range.start + part.end;
            // The chunk's SQL values live in a context freed after the UPDATE (see insert_tensor).
            let mut context = PgMemoryContexts::new("pg_llm trained chunk");
            // SAFETY: only PostgreSQL allocations happen inside, and none escape the closure.
            let updated = unsafe {
                context.switch_to(|_| {
                    Spi::connect_mut(|client| {
                        client
                    .update(
                        "UPDATE llm_param SET data = $4, m = $5, v = $6, step = $7, grad = NULL \
                         WHERE model = $1 AND name = $2 AND chunk = $3",
                        None,
                        &[
                            stored_model.as_str().into(),
                            stored_name.as_str().into(),
                            chunk.into(),
                            tensor::le_bytes(&weights[part.clone()]).as_ref().into(),
                            tensor::le_bytes(&moments.m[part.clone()]).as_ref().into(),
                            tensor::le_bytes(&moments.v[part.clone()]).as_ref().into(),
                            step.into(),
                        ],
                    )
                    .map(|t| t.len())
                    })
                })
            }
            .map_err(spi_error)?;
            if updated != 1 {
                return Err(EngineError::data(format!(
                    "chunk {chunk} of parameter \"{name}\" of model \"{model}\" is missing from llm_param"
                )));
            }
        }
    }
    Ok(())
}

/// Rounds every matrix (2-D tensor) `model` stores to `dtype`, chunk by chunk, rewriting the
/// chunks whose values change; returns how many values changed. A matrix shared from another
/// model is refused (55000): rounding it would change that model too.
pub fn round_matrices(model: &str, cfg: &ModelConfig, dtype: DType) -> Result<i64> {
    let has_params: Option<bool> = spi::read_one(
        "SELECT EXISTS (SELECT 1 FROM llm_param_resolved WHERE model = $1)",
        &[model.into()],
    )?;
    if has_params != Some(true) {
        return Err(EngineError::UndefinedObject(format!(
            "model \"{model}\" has no parameters; create them with llm_init_params or \
             pg_llm_import_safetensors"
        )));
    }
    let mut changed = 0i64;
    let mut at = 0;
    for slot in packing(cfg) {
        let numel: usize = slot.shape.iter().product();
        let range = at..at + numel;
        at += numel;
        let (Some(name), 2) = (slot.name, slot.shape.len()) else {
            continue;
        };
        let (stored_model, stored_name, chunks) = chunk_layout(model, &name, range.len())?;
        if stored_model != model {
            return Err(EngineError::NotReady(format!(
                "\"{name}\" of model \"{model}\" is shared from model \"{stored_model}\": convert \
                 that model instead"
            )));
        }
        for (chunk, part) in chunks {
            pgrx::check_for_interrupts!();
            let mut values = read_range(model, &name, part.clone())?;
            let before = values.clone();
            dtype.round_checked(&mut values, &name)?;
            let n = values
                .iter()
                .zip(&before)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            if n == 0 {
                continue;
            }
            changed += n as i64;
            wait::pace_to_wal_flush();
            Spi::connect_mut(|client| {
                client
                    .update(
                        "UPDATE llm_param SET data = $4 WHERE model = $1 AND name = $2 AND chunk = $3",
                        None,
                        &[
                            model.into(),
                            stored_name.as_str().into(),
                            chunk.into(),
                            tensor::le_bytes(&values).as_ref().into(),
                        ],
                    )
                    .map(|_| ())
            })
            .map_err(spi_error)?;
        }
    }
    Ok(changed)
}

/// Where a model's tensor of `numel` values is stored (model and name: another model's for a
/// shared tensor) and its chunks there: (chunk number, the values it holds), in order; a data
/// error unless they cover the values exactly once.
pub fn chunk_layout(
    model: &str,
    name: &str,
    numel: usize,
) -> Result<(String, String, Vec<(i32, std::ops::Range<usize>)>)> {
    let mut chunks = Vec::new();
    let mut covered = 0usize;
    let mut stored = (model.to_string(), name.to_string());
    spi::read(
        "SELECT chunk, elem_offset, length(data) / 4, stored_model, stored_name \
           FROM llm_param_resolved WHERE model = $1 AND name = $2 ORDER BY chunk",
        &[model.into(), name.into()],
        |row| {
            let chunk: i32 = row.get(1).map_err(spi_error)?.unwrap_or(0);
            if let (Some(m), Some(n)) = (
                row.get::<String>(4).map_err(spi_error)?,
                row.get::<String>(5).map_err(spi_error)?,
            ) {
                stored = (m, n);
            }
            let at = row.get::<i64>(2).map_err(spi_error)?.unwrap_or(-1);
            let len = row.get::<i32>(3).map_err(spi_error)?.unwrap_or(0).max(0) as usize;
            if at != covered as i64 {
                return Err(EngineError::data(format!(
                    "the chunks of parameter \"{name}\" of model \"{model}\" do not cover its values"
                )));
            }
            chunks.push((chunk, covered..covered + len));
            covered += len;
            Ok(())
        },
    )?;
    if covered != numel {
        return Err(EngineError::data(format!(
            "parameter \"{name}\" of model \"{model}\" does not hold the {numel} values its shape needs"
        )));
    }
    Ok((stored.0, stored.1, chunks))
}

/// The models `model` shares tensors from (which its training writes), in name order.
pub fn share_sources(model: &str) -> Result<Vec<String>> {
    let mut sources = Vec::new();
    spi::read(
        "SELECT DISTINCT source_model FROM llm_param_share WHERE model = $1 ORDER BY 1",
        &[model.into()],
        |row| {
            sources.extend(row.get::<String>(1).map_err(spi_error)?);
            Ok(())
        },
    )?;
    Ok(sources)
}
