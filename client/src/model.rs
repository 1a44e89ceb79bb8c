//! The model registry: configurations, parameter initialisation, and the tensor kernels.

use serde::{Deserialize, Serialize};

use crate::tensor::{decode, encode};
use crate::{Client, Error};

/// A row of `llm_model_config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub model: String,
    pub n_layer: i32,
    pub n_head: i32,
    pub d_model: i32,
    pub d_head: i32,
    pub d_ff: i32,
    pub n_positions: i32,
    pub vocab: i32,
    pub activation: String,
    pub attention_pattern: Vec<String>,
    pub local_window: Option<i32>,
    pub family: String,
}

impl Client {
    /// The registry row of `model`; an unknown model is `ErrorKind::UnknownModel` (42704).
    pub async fn model_config(&self, model: &str) -> Result<ModelConfig, Error> {
        let row = self
            .query_one(
                "SELECT model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab, activation, \
                 attention_pattern, local_window, family FROM llm_get_model_config($1)",
                &[&model],
            )
            .await?;
        Ok(ModelConfig {
            model: row.try_get(0)?,
            n_layer: row.try_get(1)?,
            n_head: row.try_get(2)?,
            d_model: row.try_get(3)?,
            d_head: row.try_get(4)?,
            d_ff: row.try_get(5)?,
            n_positions: row.try_get(6)?,
            vocab: row.try_get(7)?,
            activation: row.try_get(8)?,
            attention_pattern: row.try_get(9)?,
            local_window: row.try_get(10)?,
            family: row.try_get(11)?,
        })
    }

    /// Registered model names.
    pub async fn models(&self) -> Result<Vec<String>, Error> {
        let rows = self
            .query("SELECT model FROM llm_model_config ORDER BY model", &[])
            .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    /// Initialises every parameter of a registered model with the GPT-2/3 scheme, replacing
    /// any it had (`llm_init_params`). Returns the number of parameters.
    pub async fn init_params(&self, model: &str, seed: i64) -> Result<i64, Error> {
        let row = self
            .query_one("SELECT llm_init_params($1, $2)", &[&model, &seed])
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Serves `model` in `dtype`: "float32", or "bfloat16" / "float16" for its matrices
    /// (`llm_set_weight_dtype`: the stored matrices are rounded to a half dtype; decoding reads
    /// half the bytes). Returns how many stored values the rounding changed.
    pub async fn set_weight_dtype(&self, model: &str, dtype: &str) -> Result<i64, Error> {
        let row = self
            .query_one("SELECT llm_set_weight_dtype($1, $2)", &[&model, &dtype])
            .await?;
        Ok(row.try_get(0)?)
    }

    /// [m, k] · [k, n] computed by the server's `pg_llm_matmul`.
    pub async fn matmul(
        &self,
        a: &[f32],
        b: &[f32],
        m: i32,
        k: i32,
        n: i32,
    ) -> Result<Vec<f32>, Error> {
        let row = self
            .query_one(
                "SELECT pg_llm_matmul($1, $2, $3, $4, $5)",
                &[&encode(a), &encode(b), &m, &k, &n],
            )
            .await?;
        decode(row.try_get(0)?)
    }
}
