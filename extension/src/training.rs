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

use pg_llm_engine::model::{Batch, ModelConfig};
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
        lock(model)?;
        let (version, loaded) = model_cache::get_versioned(model)?;
        let config = loaded.config.clone();
        let weights = loaded.weights.storage().as_slice().to_vec();
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
        Ok(Self {
            model: model.to_string(),
            trainer,
            log: Vec::new(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        self.trainer.config()
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
/// for, since every write to its parameters updates that row.
fn lock(model: &str) -> Result<()> {
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
    Spi::run_with_args(
        "INSERT INTO llm_train_log (model, step, loss, lr, grad_norm, tokens_per_s, tokens, logged_at) \
         SELECT $1, s, l, r, g, t, n, to_timestamp(e) \
           FROM unnest($2::int[], $3::real[], $4::real[], $5::real[], $6::real[], $7::int[], $8::float8[]) \
                AS u(s, l, r, g, t, n, e)",
        &[
            model.into(),
            steps.into(),
            col(&|l| l.loss).into(),
            col(&|l| l.lr).into(),
            col(&|l| l.grad_norm).into(),
            col(&|l| l.tokens_per_s).into(),
            tokens.into(),
            ended.into(),
        ],
    )
    .map_err(spi_error)
}

/// Refuses a pass whose activations would not fit in the memory the system has available
/// (rather than letting the kernel's OOM killer end the server), with the ways out.
pub fn check_memory(cfg: &ModelConfig, rows: usize, recompute: bool) -> Result<()> {
    let (d, da, ff) = (cfg.d_model as u64, cfg.d_attn() as u64, cfg.d_ff as u64);
    let rows = rows as u64;
    let per_layer = rows * (5 * d + 4 * da + 2 * ff) * 4;
    let layers = if recompute {
        cfg.n_layer as u64 * rows * d * 4 + per_layer
    } else {
        cfg.n_layer as u64 * per_layer
    };
    // Logits and their gradient, plus the backward's temporaries of one layer.
    let need = layers + 2 * rows * cfg.vocab as u64 * 4 + per_layer;
    let Some(available) = mem_available() else {
        return Ok(());
    };
    if need > available {
        return Err(EngineError::too_large(format!(
            "a pass over {rows} tokens needs about {:.1} GiB of activations and {:.1} GiB are \
             available; use a smaller batch, pg_llm.train_micro_batch or pg_llm.train_recompute",
            need as f64 / (1u64 << 30) as f64,
            available as f64 / (1u64 << 30) as f64
        )));
    }
    Ok(())
}

fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
