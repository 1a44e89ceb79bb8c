//! Training calls. A call holds the model's weights and AdamW state in this backend for all
//! of its steps and writes them back once, at its end, in the caller's transaction: a call
//! that fails or is cancelled changes nothing, and other connections see the old weights or
//! the new ones, never a mix (they read one committed version).
//!
//! The moments written at the end of a call are also kept in this backend, keyed by the
//! version the write gave the model, so the next call here (the next `llm_train_step` of a
//! loop, the next segment of `llm_train_run`) does not read them back; any other write to the
//! model changes its version and the kept copy is ignored.

use std::cell::RefCell;
use std::time::Instant;

use pg_llm_engine::memory;
use pg_llm_engine::model::{Batch, DType};
use pg_llm_engine::optim::LossScaler;
use pg_llm_engine::train::{StepSettings, StepStats, TrainState, Trainer};
use pg_llm_engine::{EngineError, Result};
use pgrx::prelude::*;

use crate::errors::{cancel, spi_error};
use crate::model_cache;
use crate::store::{self, Moments};

struct KeptMoments {
    model: String,
    version: i64,
    moments: Moments,
}

thread_local! {
    static KEPT: RefCell<Option<KeptMoments>> = const { RefCell::new(None) };
}

/// One step as `llm_train_log` records it.
#[derive(Clone, Copy, Debug)]
pub struct StepLog {
    pub step: i64,
    pub loss: f32,
    pub lr: f32,
    pub grad_norm: f32,
    pub tokens_per_s: f32,
    pub tokens: i32,
    /// When the step ended, in seconds since the Unix epoch.
    pub ended_at: f64,
    pub precision: DType,
    pub loss_scale: Option<f32>,
    pub skipped: bool,
}

pub struct Session {
    model: String,
    trainer: Trainer,
    log: Vec<StepLog>,
}

impl Session {
    /// Locks `model` against other training calls and writers (until the transaction ends)
    /// and loads its weights and optimizer state.
    pub fn open(model: &str) -> Result<Self> {
        store::load_config(model)?; // 42704 for an unknown model, before locking
                                    // Training writes the tensors the model shares where they are stored: it needs the
                                    // right to write those models too, and locks them as it locks its own.
        let sources = store::share_sources(model)?;
        for source in &sources {
            crate::privileges::require_writer(Some(source))?;
        }
        let mut locked: Vec<&str> = sources.iter().map(String::as_str).collect();
        locked.push(model);
        locked.sort_unstable();
        locked.dedup();
        for m in locked {
            lock(m)?;
        }
        let (version, loaded) = model_cache::get_versioned(model)?;
        let config = loaded.config.clone();
        let weights = model_cache::float32_values(model, &loaded)?;
        drop(loaded);
        // This call's copy is the only one needed until it publishes the new weights.
        model_cache::forget(model);
        let kept = KEPT
            .with(|k| k.borrow_mut().take())
            .filter(|k| k.model == model && k.version == version);
        let moments = match kept {
            Some(k) => Some(k.moments),
            None => store::read_moments(model, &config, weights.len())?,
        };
        let trainer = match moments {
            Some(Moments { m, v, step }) => Trainer::new(
                config,
                TrainState {
                    weights,
                    m,
                    v,
                    step,
                },
            )?,
            None => Trainer::fresh(config, weights)?,
        };
        let mut trainer = trainer;
        if crate::guc::train_precision() == DType::Float16 {
            trainer.set_loss_scaler(logged_loss_scaler(model)?);
        }
        Ok(Self {
            model: model.to_string(),
            trainer,
            log: Vec::new(),
        })
    }

    /// Optimizer steps the weights have taken.
    pub fn step_count(&self) -> i64 {
        self.trainer.state().step
    }

    /// One optimizer step; returns its statistics and log row.
    pub fn step(&mut self, batch: Batch, settings: &StepSettings) -> Result<(StepStats, StepLog)> {
        let started = Instant::now();
        let step = self.step_count() + 1;
        let stats = self
            .trainer
            .step(batch, settings, cancel())
            .map_err(|e| match e {
                EngineError::OutOfRange(msg) => EngineError::OutOfRange(format!(
                    "training diverged at step {step} ({msg}); nothing of this call was stored"
                )),
                e => e,
            })?;
        crate::stats::count(crate::stats::Counter::TrainingSteps, 1);
        let tokens = batch.tokens.len();
        let entry = StepLog {
            step: self.step_count(),
            loss: stats.loss,
            lr: settings.adamw.lr,
            grad_norm: stats.grad_norm,
            tokens_per_s: (tokens as f64 / started.elapsed().as_secs_f64().max(1e-9)) as f32,
            tokens: tokens as i32,
            ended_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            precision: settings.precision,
            loss_scale: stats.loss_scale,
            skipped: stats.skipped,
        };
        self.log.push(entry);
        Ok((stats, entry))
    }

    /// Writes the weights, moments and step count back, logs the steps, and makes the new
    /// weights this backend's (and, through the weight file, every backend's) copy.
    pub fn finish(self) -> Result<()> {
        let Session {
            model,
            trainer,
            log,
        } = self;
        let config = trainer.config().clone();
        let TrainState {
            weights,
            m,
            v,
            step,
        } = trainer.into_state();
        let moments = Moments { m, v, step };
        store::write_trained(&model, &config, &weights, &moments)?;
        write_log(&model, &log)?;
        model_cache::publish_packed(&model, weights)?;
        let version = store::load_config(&model)?.version;
        KEPT.with(|k| {
            *k.borrow_mut() = Some(KeptMoments {
                model,
                version,
                moments,
            })
        });
        Ok(())
    }
}

/// Row lock on the model's registry row: training calls on one model run one after the
/// other, and a model written meanwhile (import, init, checkpoint load) waits or is waited
/// for, since every write to its parameters updates that row. Several models are locked in
/// name order, so two calls never wait for each other.
pub(crate) fn lock(model: &str) -> Result<()> {
    Spi::connect_mut(|client| {
        client
            .update(
                "SELECT 1 FROM llm_model_config WHERE model = $1 FOR NO KEY UPDATE",
                None,
                &[model.into()],
            )
            .map(|_| ())
    })
    .map_err(spi_error)
}

fn write_log(model: &str, log: &[StepLog]) -> Result<()> {
    if log.is_empty() {
        return Ok(());
    }
    let col = |f: &dyn Fn(&StepLog) -> f32| log.iter().map(f).collect::<Vec<f32>>();
    let steps: Vec<i32> = log.iter().map(|l| l.step as i32).collect();
    let tokens: Vec<i32> = log.iter().map(|l| l.tokens).collect();
    let ended: Vec<f64> = log.iter().map(|l| l.ended_at).collect();
    let precision: Vec<&str> = log.iter().map(|l| l.precision.name()).collect();
    let scales: Vec<Option<f32>> = log.iter().map(|l| l.loss_scale).collect();
    let skipped: Vec<bool> = log.iter().map(|l| l.skipped).collect();
    Spi::run_with_args(
        "INSERT INTO llm_train_log (model, step, loss, lr, grad_norm, tokens_per_s, tokens, \
                                    logged_at, precision, loss_scale, skipped) \
         SELECT $1, s, l, r, g, t, n, to_timestamp(e), p, c, k \
           FROM unnest($2::int[], $3::real[], $4::real[], $5::real[], $6::real[], $7::int[], \
                       $8::float8[], $9::text[], $10::real[], $11::bool[]) \
                AS u(s, l, r, g, t, n, e, p, c, k)",
        &[
            model.into(),
            steps.into(),
            col(&|l| l.loss).into(),
            col(&|l| l.lr).into(),
            col(&|l| l.grad_norm).into(),
            col(&|l| l.tokens_per_s).into(),
            tokens.into(),
            ended.into(),
            precision.into(),
            scales.into(),
            skipped.into(),
        ],
    )
    .map_err(spi_error)
}

/// The loss scaling a float16 run of `model` continues with: replayed from the model's last
/// float16 steps in llm_train_log (the scale of the last one, and how many steps in a row
/// used it without overflow), or `pg_llm.train_loss_scale` when there are none.
fn logged_loss_scaler(model: &str) -> Result<LossScaler> {
    let recent: Vec<(f32, bool)> = Spi::connect(|client| {
        client
            .select(
                "SELECT loss_scale, skipped FROM llm_train_log \
                  WHERE model = $1 AND loss_scale IS NOT NULL ORDER BY id DESC LIMIT $2",
                None,
                &[model.into(), (LossScaler::GROWTH_INTERVAL as i64).into()],
            )?
            .map(|row| {
                Ok((
                    row.get::<f32>(1)?.unwrap_or(0.0),
                    row.get::<bool>(2)?.unwrap_or(false),
                ))
            })
            .collect::<std::result::Result<Vec<_>, pgrx::spi::Error>>()
    })
    .map_err(spi_error)?;
    let Some(&(scale, skipped)) = recent.first() else {
        return LossScaler::new(crate::guc::TRAIN_LOSS_SCALE.get() as f32);
    };
    // The state before the last step, then that step's update.
    let run = recent
        .iter()
        .take_while(|&&(s, k)| s == scale && !k)
        .count() as u32;
    let mut scaler = LossScaler::new(scale)?;
    scaler.good_steps = run.saturating_sub(1);
    scaler.update(skipped);
    Ok(scaler)
}

/// Refuses a training call on `model` whose passes run `pass_rows` tokens when its memory
/// (the model's weights, their private copy, gradient and AdamW moments, one pass's
/// activations) exceeds `pg_llm.max_memory`; before anything is loaded.
pub fn admit(model: &str, pass_rows: usize) -> Result<()> {
    let recompute = crate::guc::TRAIN_RECOMPUTE.get();
    let what = format!("training \"{model}\" in passes of {pass_rows} tokens");
    model_cache::admit(model, &what, |cfg| {
        memory::training(
            cfg,
            pass_rows,
            recompute,
            crate::guc::train_precision(),
            crate::guc::threads(),
        )
    })
    .map_err(|e| match e {
        EngineError::OutOfMemory(msg) => EngineError::OutOfMemory(format!(
            "{msg}; a smaller batch, pg_llm.train_micro_batch or pg_llm.train_recompute need less"
        )),
        e => e,
    })
}
