//! The relational path's autograd as SQL: parameters fetched onto the tape, the tape as rows
//! (`llm_tape`, `llm_tensor_rt`), `llm_backprop`, and `llm_accumulate_grads` into
//! `llm_param.grad`. The tape itself is tape.rs; the rules of the backward are the engine's.

use pg_llm_engine::tape::Source;
use pg_llm_engine::{tensor, EngineError, Result};
use pgrx::prelude::*;

use super::args::{model_name, required, tensor as tensor_arg};
use super::float32_bytea::Float32Bytea;
use crate::errors::{cancel, run, spi_error};
use crate::{privileges, spi, store, tape};

/// A stored parameter's shape and values (every chunk), under one snapshot.
fn read_param(model: &str, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    spi::consistent(|| {
        let mut shape: Option<Vec<i32>> = None;
        spi::read(
            "SELECT shape FROM llm_param_resolved WHERE model = $1 AND name = $2 AND chunk = 0",
            &[model.into(), name.into()],
            |row| {
                shape = row.get::<Vec<i32>>(1).map_err(spi_error)?;
                Ok(())
            },
        )?;
        let Some(shape) = shape else {
            store::load_config(model)?; // 42704 for an unknown model, first
            return Err(EngineError::UndefinedObject(format!(
                "model \"{model}\" has no parameter \"{name}\""
            )));
        };
        let shape: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
        let n = tensor::numel(&shape, name)?;
        if n > tensor::MAX_TENSOR_ELEMS {
            return Err(EngineError::too_large(format!(
                "parameter \"{name}\" holds {n} values, more than one bytea (1 GB) can"
            )));
        }
        Ok((shape.clone(), store::read_range(model, name, 0..n)?))
    })
}

/// A parameter's values as a float32 tensor. With `pg_llm.autograd` on, it is recorded on
/// the tape as that parameter, so the kernels it is passed to give it a gradient.
#[pg_extern(volatile, parallel_restricted)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn llm_param_tensor(model: Option<&str>, name: Option<&str>) -> Float32Bytea {
    run("llm_param_tensor", || {
        let model = model_name(model, "model")?;
        let name = required(name, "name")?;
        let (shape, values) = read_param(model, name)?;
        let source = Source::Param {
            model: model.to_string(),
            name: name.to_string(),
        };
        tape::leaf(&values, shape, source)?;
        Ok(Float32Bytea::from(values))
    })
}

/// Marks a value as an input whose gradient `llm_backprop` should compute; returns it.
#[pg_extern(volatile, parallel_restricted)]
fn llm_tape_watch(x: Option<&[u8]>, label: default!(Option<&str>, "NULL")) -> Float32Bytea {
    run("llm_tape_watch", || {
        let x = tensor_arg(x, "x")?;
        if !tape::enabled() {
            return Err(EngineError::NotReady(
                "llm_tape_watch records on the autograd tape: SET pg_llm.autograd = on first"
                    .into(),
            ));
        }
        tape::leaf(
            &x,
            vec![x.len()],
            Source::Watched(label.map(str::to_string)),
        )?;
        Ok(Float32Bytea::from(x.into_owned()))
    })
}

/// Empties this session's tape.
#[pg_extern(volatile, parallel_restricted)]
fn llm_tape_reset() {
    tape::with(|t| t.clear());
}

/// The tape's records in order: `llm_tape` is a view over this.
#[pg_extern(volatile, parallel_restricted)]
fn llm_tape_records() -> TableIterator<
    'static,
    (
        name!(id, i32),
        name!(op, String),
        name!(inputs, Vec<i32>),
        name!(output, i32),
        name!(attrs, pgrx::JsonB),
    ),
> {
    let rows: Vec<_> = tape::with(|t| {
        t.records()
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let attrs = serde_json::from_str(&r.op.attrs_json()).unwrap_or_default();
                (
                    i as i32 + 1,
                    r.op.name().to_string(),
                    r.inputs.iter().map(|&x| x as i32).collect(),
                    r.output as i32,
                    pgrx::JsonB(attrs),
                )
            })
            .collect()
    });
    TableIterator::new(rows)
}

/// The tape's tensors: values, shapes, where each came from, and gradients after
/// `llm_backprop`. `llm_tensor_rt` is a view over this.
#[pg_extern(volatile, parallel_restricted)]
fn llm_tape_tensors() -> TableIterator<
    'static,
    (
        name!(id, i32),
        name!(shape, Vec<i32>),
        name!(source, String),
        name!(model, Option<String>),
        name!(name, Option<String>),
        name!(requires_grad, bool),
        name!(data, Float32Bytea),
        name!(grad, Option<Float32Bytea>),
    ),
> {
    let rows: Vec<_> = tape::with(|t| {
        t.nodes()
            .iter()
            .enumerate()
            .map(|(id, n)| {
                let (source, model, name) = match &n.source {
                    Source::Param { model, name } => {
                        ("param", Some(model.clone()), Some(name.clone()))
                    }
                    Source::Watched(label) => ("watched", None, label.clone()),
                    Source::Constant => ("constant", None, None),
                    Source::Output => ("output", None, None),
                };
                (
                    id as i32,
                    n.shape.iter().map(|&d| d as i32).collect(),
                    source.to_string(),
                    model,
                    name,
                    n.requires_grad,
                    Float32Bytea::from(n.data.clone()),
                    n.grad.clone().map(Float32Bytea::from),
                )
            })
            .collect()
    });
    TableIterator::new(rows)
}

/// The id the tape knows these values by (the most recent tensor holding them), or NULL.
#[pg_extern(volatile, parallel_restricted)]
fn llm_tape_id(x: Option<&[u8]>) -> Option<i32> {
    run("llm_tape_id", || {
        let x = tensor::decode_any(required(x, "x")?, "x")?;
        Ok(tape::with(|t| t.find(&x)).map(|id| id as i32))
    })
}

/// The gradient `llm_backprop` gave the tensor holding these values, or NULL.
#[pg_extern(volatile, parallel_restricted)]
fn llm_tape_grad(x: Option<&[u8]>) -> Option<Float32Bytea> {
    run("llm_tape_grad", || {
        let x = tensor::decode_any(required(x, "x")?, "x")?;
        Ok(tape::with(|t| {
            let id = t.find(&x)?;
            t.nodes()[id].grad.clone()
        })
        .map(Float32Bytea::from))
    })
}

/// Gradients of tensor `output_id` (summed, so a loss's) with respect to every recorded
/// tensor that depends on a parameter or a watched input; with `model`, that model's
/// parameter gradients are also added to `llm_param.grad` (`llm_accumulate_grads`). Returns
/// the number of tensors that received a gradient.
#[pg_extern(volatile, parallel_restricted)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn llm_backprop(output_id: Option<i32>, model: default!(Option<&str>, "NULL")) -> i32 {
    run("llm_backprop", || {
        let id = required(output_id, "output_id")?;
        if id < 0 {
            return Err(EngineError::invalid(format!(
                "output_id must be a tensor id of llm_tensor_rt, got {id}"
            )));
        }
        if let Some(m) = model {
            privileges::require_writer(Some(m))?;
        }
        let n = tape::with(|t| {
            tape::admit_backward(t)?;
            t.backward(id as usize, cancel())
        })?;
        if let Some(m) = model {
            accumulate(m)?;
        }
        Ok(n as i32)
    })
}

/// Adds this session's tape gradients of `model`'s parameters to `llm_param.grad` (NULL
/// counts as zero); returns how many parameters were written.
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn llm_accumulate_grads(model: Option<&str>) -> i32 {
    run("llm_accumulate_grads", || {
        let model = model_name(model, "model")?;
        privileges::require_writer(Some(model))?;
        accumulate(model)
    })
}

fn accumulate(model: &str) -> Result<i32> {
    store::load_config(model)?;
    // A shared tensor's gradient goes where the tensor is stored.
    for source in store::share_sources(model)? {
        privileges::require_writer(Some(&source))?;
    }
    let grads = tape::with(|t| t.param_grads(model));
    for (name, grad) in &grads {
        pgrx::check_for_interrupts!();
        // Where the tensor is stored, its chunks there (an error unless they hold exactly the
        // values of the gradient on the tape) and their stored gradients, under one snapshot.
        let (stored_model, stored_name, chunks, stored_grads) = spi::consistent(|| {
            let (m, n, chunks) = store::chunk_layout(model, name, grad.len())?;
            let mut grads: Vec<Option<Vec<f32>>> = Vec::new();
            spi::read(
                "SELECT grad FROM llm_param WHERE model = $1 AND name = $2 ORDER BY chunk",
                &[m.as_str().into(), n.as_str().into()],
                |row| {
                    grads.push(match row.get::<&[u8]>(1).map_err(spi_error)? {
                        Some(b) => Some(tensor::decode_any(b, "llm_param.grad")?),
                        None => None,
                    });
                    Ok(())
                },
            )?;
            Ok::<_, EngineError>((m, n, chunks, grads))
        })?;
        for ((chunk, part), old) in chunks.into_iter().zip(stored_grads) {
            let mut sum = grad[part.clone()].to_vec();
            if let Some(old) = old {
                if old.len() != part.len() {
                    return Err(EngineError::data(format!(
                        "llm_param.grad of \"{name}\" chunk {chunk} has {} values, its data {}",
                        old.len(),
                        part.len()
                    )));
                }
                sum.iter_mut().zip(&old).for_each(|(s, o)| *s += o);
            }
            tensor::check_result(&sum, "gradient")?;
            crate::wait::pace_to_wal_flush();
            Spi::run_with_args(
                "UPDATE llm_param SET grad = $4 WHERE model = $1 AND name = $2 AND chunk = $3",
                &[
                    stored_model.as_str().into(),
                    stored_name.as_str().into(),
                    chunk.into(),
                    tensor::le_bytes(&sum).as_ref().into(),
                ],
            )
            .map_err(spi_error)?;
        }
    }
    Ok(grads.len() as i32)
}
