//! Training as SQL: llm_loss, llm_train_step, llm_train (its rows stream to the client as
//! steps end), llm_train_segment (the unit of work of `CALL llm_train_run`), llm_eval.
//! The work itself is in training.rs (state held for a call, written back once) and
//! dataset.rs (how a run walks its data).

use pg_llm_engine::memory;
use pg_llm_engine::model::weights::{packed_len, packed_tensors, packing};
use pg_llm_engine::model::{Batch, DType};
use pg_llm_engine::optim::{lr_schedule, AdamW};
use pg_llm_engine::train::StepSettings;
use pg_llm_engine::{EngineError, Result};
use pgrx::prelude::*;
use pgrx::Array;

use super::args::{self, finite, required, token_matrix};
use super::float32_bytea::Float32Bytea;
use crate::dataset::{self, Samples};
use crate::errors::{cancel, report, run};
use crate::training::{self, Session};
use crate::{guc, model_cache, spi, store};

/// The GPT-3 schedule's floor: cosine decay ends at 10 % of lr_max, as in the paper.
const LR_MIN_RATIO: f32 = 0.1;

fn adamw(
    lr: Option<f32>,
    beta1: Option<f32>,
    beta2: Option<f32>,
    eps: Option<f32>,
    wd: Option<f32>,
) -> Result<AdamW> {
    let opt = AdamW {
        lr: finite(lr, "lr")?,
        beta1: finite(beta1, "beta1")?,
        beta2: finite(beta2, "beta2")?,
        eps: finite(eps, "eps")?,
        weight_decay: finite(wd, "wd")?,
    };
    opt.validate()?;
    Ok(opt)
}

fn grad_clip(value: Option<f32>) -> Result<f32> {
    let clip = finite(value, "grad_clip")?;
    if clip < 0.0 {
        return Err(EngineError::invalid(format!(
            "grad_clip must be non-negative (0 = no clipping), got {clip}"
        )));
    }
    Ok(clip)
}

/// Settings of one step; recomputation and micro-batching come from the GUCs.
fn step_settings(adamw: AdamW, grad_clip: f32, dropout_p: f32, dropout_seed: u64) -> StepSettings {
    StepSettings {
        adamw,
        grad_clip,
        micro_batch: guc::TRAIN_MICRO_BATCH.get().max(0) as usize,
        dropout_p,
        dropout_seed,
        recompute: guc::TRAIN_RECOMPUTE.get(),
        precision: guc::train_precision(),
    }
}

/// Rows of one forward/backward pass under the current settings, for the memory check.
fn pass_rows(sequences: usize, len: usize) -> usize {
    let micro = guc::TRAIN_MICRO_BATCH.get().max(0) as usize;
    let per_pass = if micro == 0 {
        sequences
    } else {
        micro.min(sequences)
    };
    per_pass * len
}

/// Tokens and targets as one batch: both 1-D of one length, or both 2-D of one shape.
fn batch_arrays(
    tokens: Option<Array<i32>>,
    targets: Option<Array<i32>>,
) -> Result<(Vec<u32>, Vec<u32>, usize, usize)> {
    let (t, rows, len) = token_matrix(tokens, "tokens")?;
    let (y, y_rows, y_len) = token_matrix(targets, "targets")?;
    if (rows, len) != (y_rows, y_len) {
        return Err(EngineError::invalid(format!(
            "tokens ({rows} × {len}) and targets ({y_rows} × {y_len}) must have the same shape"
        )));
    }
    Ok((t, y, rows, len))
}

/// Mean next-token cross-entropy of `targets` given `tokens` (eval mode, no dropout); 1-D
/// arrays are one sequence, 2-D arrays a batch of equal-length sequences.
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn llm_loss(model: Option<&str>, tokens: Option<Array<i32>>, targets: Option<Array<i32>>) -> f32 {
    run("llm_loss", || {
        let model = args::model_name(model, "model")?;
        let (t, y, sequences, len) = batch_arrays(tokens, targets)?;
        let what = format!("a loss over {sequences} × {len} tokens of \"{model}\"");
        let loaded = model_cache::get_float32_within(model, &what, |cfg| {
            memory::loss(cfg, sequences * len, guc::threads())
        })?;
        loaded.loss_and_grads(
            Batch {
                tokens: &t,
                targets: &y,
                sequences,
                len,
            },
            None,
            cancel(),
        )
    })
}

/// The gradient of `llm_loss` with respect to every parameter, as rows (nothing is stored):
/// what a training step would apply before clipping, and what the relational path's
/// `llm_backprop` is checked against.
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn llm_grads(
    model: Option<&str>,
    tokens: Option<Array<i32>>,
    targets: Option<Array<i32>>,
) -> TableIterator<
    'static,
    (
        name!(name, String),
        name!(shape, Vec<i32>),
        name!(grad, Float32Bytea),
    ),
> {
    let rows = run("llm_grads", || {
        let model = args::model_name(model, "model")?;
        let (t, y, sequences, len) = batch_arrays(tokens, targets)?;
        let what = format!("gradients over {sequences} × {len} tokens of \"{model}\"");
        let loaded = model_cache::get_float32_within(model, &what, |cfg| {
            memory::training(cfg, sequences * len, false, DType::Float32, guc::threads())
        })?;
        let cfg = &loaded.config;
        let mut grads = pg_llm_engine::tensor::alloc_zeroed(packed_len(cfg)?)?;
        let batch = Batch {
            tokens: &t,
            targets: &y,
            sequences,
            len,
        };
        loaded.loss_and_grads(batch, Some(&mut grads), cancel())?;
        let shapes: std::collections::HashMap<String, Vec<usize>> = packing(cfg)
            .into_iter()
            .filter_map(|s| Some((s.name?, s.shape)))
            .collect();
        Ok(packed_tensors(cfg)
            .into_iter()
            .map(|(name, range)| {
                let shape = shapes[&name].iter().map(|&d| d as i32).collect();
                (name, shape, Float32Bytea::from(grads[range].to_vec()))
            })
            .collect::<Vec<_>>())
    });
    TableIterator::new(rows)
}

/// One AdamW step on one sequence (1-D arrays) or a batch (2-D), without dropout. Returns the
/// mean loss before the update. Weights, moments and step count are stored before it returns.
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn llm_train_step(
    model: Option<&str>,
    tokens: Option<Array<i32>>,
    targets: Option<Array<i32>>,
    lr: Option<f32>,
    beta1: default!(Option<f32>, 0.9),
    beta2: default!(Option<f32>, 0.95),
    eps: default!(Option<f32>, 1e-8),
    wd: default!(Option<f32>, 0.1),
    grad_clip: default!(Option<f32>, 1.0),
) -> f32 {
    run("llm_train_step", || {
        crate::privileges::require_writer(model)?;
        let model = args::model_name(model, "model")?;
        let opt = adamw(lr, beta1, beta2, eps, wd)?;
        let clip = self::grad_clip(grad_clip)?;
        let (t, y, sequences, len) = batch_arrays(tokens, targets)?;
        training::admit(model, pass_rows(sequences, len))?;
        let mut session = Session::open(model)?;
        let batch = Batch {
            tokens: &t,
            targets: &y,
            sequences,
            len,
        };
        let (stats, _) = session.step(batch, &step_settings(opt, clip, 0.0, 0))?;
        session.finish()?;
        Ok(stats.loss)
    })
}

/// How many steps a training call takes and the schedule's end.
enum Plan {
    /// `n` steps; the schedule ends with them (or at the warmup's end, if later).
    Steps(i64),
    /// Up to `max` steps towards a run of `total` optimizer steps (llm_train_run).
    Until { total: i64, max: i64 },
}

struct Hyper {
    lr_max: f32,
    warmup: i64,
    adamw: AdamW,
    grad_clip: f32,
    dropout_p: f32,
    seed: i64,
    batch_size: usize,
}

/// A training call in progress: one row per step, computed when PostgreSQL asks for it.
struct TrainRun {
    session: Option<Session>,
    samples: Samples,
    hyper: Hyper,
    total: i64,
    remaining: i64,
    emitted: bool,
}

type TrainRow = (i32, f32, f32, f32, f32);

impl TrainRun {
    #[allow(clippy::too_many_arguments)]
    fn start(
        model: &str,
        plan: Plan,
        batch_size: Option<i32>,
        seq_len: Option<i32>,
        lr_max: Option<f32>,
        warmup: Option<i32>,
        adamw: AdamW,
        grad_clip: f32,
        dropout_p: Option<f32>,
        seed: Option<i64>,
    ) -> Result<Self> {
        let batch_size = required(batch_size, "batch_size")?;
        if batch_size < 1 {
            return Err(EngineError::invalid(format!(
                "batch_size must be at least 1, got {batch_size}"
            )));
        }
        if let Some(s) = seq_len.filter(|&s| s < 1) {
            return Err(EngineError::invalid(format!(
                "seq_len must be at least 1, got {s}"
            )));
        }
        let lr_max = finite(lr_max, "lr_max")?;
        let warmup = required(warmup, "warmup")? as i64;
        // Checks lr_max and warmup the way every step will use them.
        lr_schedule(1, warmup, warmup.max(1), lr_max, LR_MIN_RATIO)?;
        let dropout_p = finite(dropout_p, "dropout_p")?;
        if !(0.0..1.0).contains(&dropout_p) {
            return Err(EngineError::invalid(format!(
                "dropout_p must be in [0, 1), got {dropout_p}"
            )));
        }
        let seed = required(seed, "seed")?;
        let context = store::load_config(model)?.config.n_positions;
        let samples = Samples::load(
            model,
            "train",
            seq_len.map(|s| s as usize),
            context,
            seed as u64,
        )?;
        training::admit(model, pass_rows(batch_size as usize, samples.seq_len))?;
        let session = Session::open(model)?;
        let done = session.step_count();
        let (remaining, total) = match plan {
            Plan::Steps(n) => (n, (done + n).max(warmup).max(1)),
            Plan::Until { total, max } => ((total - done).clamp(0, max), total.max(warmup)),
        };
        Ok(Self {
            session: Some(session),
            samples,
            hyper: Hyper {
                lr_max,
                warmup,
                adamw,
                grad_clip,
                dropout_p,
                seed,
                batch_size: batch_size as usize,
            },
            total,
            remaining,
            emitted: false,
        })
    }

    fn next_step(&mut self) -> Result<Option<TrainRow>> {
        if self.remaining == 0 {
            // A call of no steps writes nothing; one of several has written at its last.
            return Ok(None);
        }
        let h = &self.hyper;
        let session = self.session.as_mut().expect("open until the last step");
        let step = session.step_count() + 1;
        let lr = lr_schedule(step, h.warmup, self.total, h.lr_max, LR_MIN_RATIO)?;
        let first = (step - 1) as u64 * h.batch_size as u64;
        let (tokens, targets) = self.samples.batch(first, h.batch_size)?;
        let batch = Batch {
            tokens: &tokens,
            targets: &targets,
            sequences: h.batch_size,
            len: self.samples.seq_len,
        };
        let seed = (h.seed as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ step as u64;
        let settings = step_settings(AdamW { lr, ..h.adamw }, h.grad_clip, h.dropout_p, seed);
        let (stats, log) = session.step(batch, &settings)?;
        self.remaining -= 1;
        if self.remaining == 0 {
            self.session.take().expect("open").finish()?;
        }
        Ok(Some((
            log.step as i32,
            stats.loss,
            lr,
            stats.grad_norm,
            log.tokens_per_s,
        )))
    }
}

impl Iterator for TrainRun {
    type Item = TrainRow;

    fn next(&mut self) -> Option<TrainRow> {
        // The previous row is in PostgreSQL's output buffer: send it before the next step.
        if self.emitted {
            crate::flush::flush_to_client();
        }
        self.emitted = true;
        match self.next_step() {
            Ok(row) => row,
            Err(e) => report("llm_train", e),
        }
    }
}

/// `n_steps` AdamW steps on batches of the model's `train` rows of llm_dataset (see
/// dataset.rs for the order), with the GPT-3 schedule: linear warmup over the model's first
/// `warmup` optimizer steps, cosine decay to 10 % of lr_max at the step this call ends. One
/// row per step, sent as the step ends when called in the select list; the steps are logged
/// in llm_train_log; weights and optimizer state are written once, after the last step.
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn llm_train(
    model: Option<&str>,
    n_steps: Option<i32>,
    batch_size: default!(Option<i32>, 1),
    seq_len: default!(Option<i32>, "NULL"),
    lr_max: default!(Option<f32>, 6e-4),
    warmup: default!(Option<i32>, 0),
    beta1: default!(Option<f32>, 0.9),
    beta2: default!(Option<f32>, 0.95),
    eps: default!(Option<f32>, 1e-8),
    wd: default!(Option<f32>, 0.1),
    grad_clip: default!(Option<f32>, 1.0),
    dropout_p: default!(Option<f32>, 0.0),
    seed: default!(Option<i64>, 0),
) -> TableIterator<
    'static,
    (
        name!(step, i32),
        name!(loss, f32),
        name!(lr, f32),
        name!(grad_norm, f32),
        name!(tokens_per_s, f32),
    ),
> {
    let run_ = run("llm_train", || {
        crate::privileges::require_writer(model)?;
        let model = args::model_name(model, "model")?;
        let n = required(n_steps, "n_steps")?;
        if n < 0 {
            return Err(EngineError::invalid(format!(
                "n_steps must be non-negative, got {n}"
            )));
        }
        let opt = adamw(lr_max, beta1, beta2, eps, wd)?;
        TrainRun::start(
            model,
            Plan::Steps(n as i64),
            batch_size,
            seq_len,
            lr_max,
            warmup,
            opt,
            self::grad_clip(grad_clip)?,
            dropout_p,
            seed,
        )
    });
    TableIterator::new(run_)
}

/// Up to `max_steps` steps of a run of `total_steps` optimizer steps (the schedule's end),
/// continuing from the model's stored step count; returns the steps taken, 0 once the model
/// has reached `total_steps`. The unit of work between the commits of `CALL llm_train_run`.
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn llm_train_segment(
    model: Option<&str>,
    total_steps: Option<i32>,
    max_steps: Option<i32>,
    batch_size: Option<i32>,
    seq_len: Option<i32>,
    lr_max: Option<f32>,
    warmup: Option<i32>,
    beta1: Option<f32>,
    beta2: Option<f32>,
    eps: Option<f32>,
    wd: Option<f32>,
    grad_clip: Option<f32>,
    dropout_p: Option<f32>,
    seed: Option<i64>,
) -> i32 {
    run("llm_train_run", || {
        crate::privileges::require_writer(model)?;
        let model = args::model_name(model, "model")?;
        let total = required(total_steps, "total_steps")?;
        let max = required(max_steps, "commit_every")?;
        if total < 1 || max < 1 {
            return Err(EngineError::invalid(format!(
                "total_steps and commit_every must be at least 1, got {total} and {max}"
            )));
        }
        let opt = adamw(lr_max, beta1, beta2, eps, wd)?;
        let mut run = TrainRun::start(
            model,
            Plan::Until {
                total: total as i64,
                max: max as i64,
            },
            batch_size,
            seq_len,
            lr_max,
            warmup,
            opt,
            self::grad_clip(grad_clip)?,
            dropout_p,
            seed,
        )?;
        let mut steps = 0;
        while run.next_step()?.is_some() {
            steps += 1;
        }
        Ok(steps)
    })
}

/// Mean loss and perplexity of `model` over a split of its llm_dataset rows (eval mode), each
/// row in windows of at most the model's context, weighted by tokens.
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn llm_eval(
    model: Option<&str>,
    split: default!(Option<&str>, "'validation'"),
) -> TableIterator<
    'static,
    (
        name!(loss, f64),
        name!(perplexity, f64),
        name!(sequences, i64),
        name!(tokens, i64),
    ),
> {
    let row = run("llm_eval", || {
        let model = args::model_name(model, "model")?;
        let split = required(split, "split")?;
        let what = format!("evaluating \"{model}\"");
        // Rows are evaluated in windows of at most the model's context.
        let loaded = model_cache::get_float32_within(model, &what, |cfg| {
            memory::loss(cfg, cfg.n_positions, guc::threads())
        })?;
        let ctx = loaded.config.n_positions;
        let mut ids: Vec<i64> = Vec::new();
        spi::read(
            "SELECT id FROM llm_dataset WHERE model = $1 AND split = $2 ORDER BY id",
            &[model.into(), split.into()],
            |row| {
                ids.push(row.get(1).map_err(crate::errors::spi_error)?.unwrap_or(0));
                Ok(())
            },
        )?;
        if ids.is_empty() {
            return Err(EngineError::NotReady(format!(
                "model \"{model}\" has no rows in split '{split}' of llm_dataset"
            )));
        }
        let (mut sum, mut tokens) = (0.0f64, 0i64);
        for id in &ids {
            let (t, y) = read_row(*id)?;
            for (tw, yw) in t.chunks(ctx).zip(y.chunks(ctx)) {
                let batch = Batch {
                    tokens: tw,
                    targets: yw,
                    sequences: 1,
                    len: tw.len(),
                };
                let loss = loaded.loss_and_grads(batch, None, cancel())?;
                sum += loss as f64 * tw.len() as f64;
                tokens += tw.len() as i64;
            }
        }
        let mean = sum / tokens as f64;
        Ok(vec![(mean, mean.exp(), ids.len() as i64, tokens)])
    });
    TableIterator::new(row)
}

fn read_row(id: i64) -> Result<(Vec<u32>, Vec<u32>)> {
    let mut out = (Vec::new(), Vec::new());
    spi::read(
        "SELECT tokens, target FROM llm_dataset WHERE id = $1",
        &[id.into()],
        |row| {
            out = (dataset::token_ids(row, 1)?, dataset::token_ids(row, 2)?);
            Ok(())
        },
    )?;
    Ok(out)
}
