//! Training: `llm_train` as a stream of per-step records, single steps, evaluation.

use serde::{Deserialize, Serialize};
use tokio_postgres::types::ToSql;

use crate::client::RowsOf;
use crate::{Client, Error, Tokens, DEFAULT_MODEL};

/// Options of `Client::train`, named after `llm_train`'s arguments, with its defaults.
///
/// ```
/// use pg_gpt3_client::TrainOptions;
/// let opts = TrainOptions::default().n_steps(100).batch_size(8).seq_len(128).lr_max(3e-4).seed(1);
/// assert_eq!(opts.warmup, 0);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    pub model: String,
    /// Optimizer steps this call takes (`llm_train` has no default; here 1).
    pub n_steps: i32,
    pub batch_size: i32,
    /// Tokens per sequence; `None`: the dataset's block length.
    pub seq_len: Option<i32>,
    pub lr_max: f32,
    /// Linear warmup over the model's first `warmup` steps, then cosine decay to 10 %.
    pub warmup: i32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub wd: f32,
    pub grad_clip: f32,
    pub dropout_p: f32,
    pub seed: i64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            model: DEFAULT_MODEL.to_string(),
            n_steps: 1,
            batch_size: 1,
            seq_len: None,
            lr_max: 6e-4,
            warmup: 0,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            wd: 0.1,
            grad_clip: 1.0,
            dropout_p: 0.0,
            seed: 0,
        }
    }
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty),* $(,)?) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, value: $ty) -> Self {
                self.$name = value.into();
                self
            }
        )*
    };
}

impl TrainOptions {
    /// The arguments after the step count(s), shared by `llm_train` and `llm_train_run`:
    /// batch_size … seed.
    fn run_params(&self) -> [&(dyn ToSql + Sync); 11] {
        [
            &self.batch_size,
            &self.seq_len,
            &self.lr_max,
            &self.warmup,
            &self.beta1,
            &self.beta2,
            &self.eps,
            &self.wd,
            &self.grad_clip,
            &self.dropout_p,
            &self.seed,
        ]
    }

    setters! {
        model: &str,
        n_steps: i32,
        batch_size: i32,
        seq_len: i32,
        lr_max: f32,
        warmup: i32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        wd: f32,
        grad_clip: f32,
        dropout_p: f32,
        seed: i64,
    }
}

/// One optimizer step of a training run (a row of `llm_train`, logged in llm_train_log).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainStep {
    /// The model's optimizer step count after this step.
    pub step: i32,
    /// Mean loss of the batch, before the update.
    pub loss: f32,
    pub lr: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// The step's compute only.
    pub tokens_per_s: f32,
}

impl TrainStep {
    fn from_row(row: &tokio_postgres::Row) -> Result<Self, Error> {
        Ok(Self {
            step: row.try_get(0)?,
            loss: row.try_get(1)?,
            lr: row.try_get(2)?,
            grad_norm: row.try_get(3)?,
            tokens_per_s: row.try_get(4)?,
        })
    }
}

/// Options of one `Client::train_step` (`llm_train_step`'s arguments and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepOptions {
    pub model: String,
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub wd: f32,
    pub grad_clip: f32,
}

impl Default for StepOptions {
    fn default() -> Self {
        Self {
            model: DEFAULT_MODEL.to_string(),
            lr: 6e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            wd: 0.1,
            grad_clip: 1.0,
        }
    }
}

impl StepOptions {
    setters! {
        model: &str,
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        wd: f32,
        grad_clip: f32,
    }
}

/// The loss of a model over a dataset split (`llm_eval`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub loss: f64,
    pub perplexity: f64,
    pub sequences: i64,
    pub tokens: i64,
}

impl Client {
    /// Trains on the model's `train` rows of llm_dataset (`llm_train`): one record per step,
    /// sent by the server as the step ends. Weights and optimizer state are written once,
    /// after the last step, so dropping the stream early cancels the run and keeps the
    /// model as it was.
    ///
    /// ```no_run
    /// # async fn demo(client: &pg_gpt3_client::Client) -> Result<(), pg_gpt3_client::Error> {
    /// use futures_util::StreamExt;
    /// let opts = pg_gpt3_client::TrainOptions::default().n_steps(10).batch_size(4).seq_len(64);
    /// let mut steps = client.train(&opts).await?;
    /// while let Some(step) = steps.next().await {
    ///     let step = step?;
    ///     println!("step {} loss {:.3} ({:.0} tokens/s)", step.step, step.loss, step.tokens_per_s);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn train(&self, opts: &TrainOptions) -> Result<RowsOf<TrainStep>, Error> {
        let n_steps = usize::try_from(opts.n_steps).unwrap_or(0);
        self.stream(
            "SELECT (s).step, (s).loss, (s).lr, (s).grad_norm, (s).tokens_per_s FROM \
             (SELECT llm_train($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) AS s) q",
            &[&opts.model as &(dyn ToSql + Sync), &opts.n_steps]
                .into_iter()
                .chain(opts.run_params())
                .collect::<Vec<_>>(),
            TrainStep::from_row,
            move |_, seen| seen == n_steps,
        )
        .await
    }

    /// One AdamW step on one sequence or a batch (`llm_train_step`); returns the batch's loss
    /// before the update. The new weights are stored when it returns.
    pub async fn train_step<'a>(
        &self,
        tokens: impl Into<Tokens<'a>>,
        targets: impl Into<Tokens<'a>>,
        opts: &StepOptions,
    ) -> Result<f32, Error> {
        let (tokens, targets) = (tokens.into(), targets.into());
        let row = self
            .query_one(
                "SELECT llm_train_step($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                &[
                    &opts.model,
                    &tokens,
                    &targets,
                    &opts.lr,
                    &opts.beta1,
                    &opts.beta2,
                    &opts.eps,
                    &opts.wd,
                    &opts.grad_clip,
                ],
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Trains until the model has taken `total_steps` optimizer steps in all, committing every
    /// `commit_every` steps (`CALL llm_train_run`): a durable run that loses at most one
    /// segment to a crash and, called again, resumes where the model is (a no-op once it has
    /// `total_steps`). `opts.n_steps` is not used; the schedule spans `total_steps`. Progress
    /// is in `train_log` as segments commit. Call it outside a transaction.
    pub async fn train_run(
        &self,
        total_steps: i32,
        commit_every: i32,
        opts: &TrainOptions,
    ) -> Result<(), Error> {
        self.bounded(async {
            self.pg()
                .execute(
                    "CALL llm_train_run($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
                    &[
                        &opts.model as &(dyn ToSql + Sync),
                        &total_steps,
                        &commit_every,
                    ]
                    .into_iter()
                    .chain(opts.run_params())
                    .collect::<Vec<_>>(),
                )
                .await?;
            Ok(())
        })
        .await
    }

    /// The model's logged steps after step `after` (0: all), oldest first (llm_train_log: one
    /// row per committed step of `train`, `train_step` and `train_run`).
    pub async fn train_log(&self, model: &str, after: i32) -> Result<Vec<TrainStep>, Error> {
        let rows = self
            .query(
                "SELECT step, loss, lr, grad_norm, tokens_per_s FROM llm_train_log \
                 WHERE model = $1 AND step > $2 ORDER BY step, id",
                &[&model, &after],
            )
            .await?;
        rows.iter().map(TrainStep::from_row).collect()
    }

    /// Precision of this connection's training steps (`pg_llm.train_precision`): "float32",
    /// or "bfloat16" / "float16" for mixed precision (the passes on a rounded copy of the
    /// weights, float32 weights and moments updated; float16 with loss scaling, its overflowing
    /// steps skipped and logged).
    pub async fn set_train_precision(&self, precision: &str) -> Result<(), Error> {
        self.query_one(
            "SELECT set_config('pg_llm.train_precision', $1, false)",
            &[&precision],
        )
        .await?;
        Ok(())
    }

    /// The model's mean loss and perplexity over a split of its dataset (`llm_eval`).
    pub async fn eval(&self, model: &str, split: &str) -> Result<Evaluation, Error> {
        let row = self
            .query_one(
                "SELECT loss, perplexity, sequences, tokens FROM llm_eval($1, $2)",
                &[&model, &split],
            )
            .await?;
        Ok(Evaluation {
            loss: row.try_get(0)?,
            perplexity: row.try_get(1)?,
            sequences: row.try_get(2)?,
            tokens: row.try_get(3)?,
        })
    }
}
