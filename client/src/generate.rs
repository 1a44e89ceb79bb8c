//! Inference: generation (whole, as ids, as a stream of tokens), beam search, logits, loss,
//! and the tokenizer's encode/decode.

use serde::{Deserialize, Serialize};
use tokio_postgres::types::ToSql;

use crate::client::RowsOf;
use crate::tensor::decode as decode_tensor;
use crate::{Client, Error, Tokens, DEFAULT_MODEL};

/// Options of a generation call, with the server's defaults (`llm_generate`).
///
/// ```
/// use pg_gpt3_client::GenerateOptions;
/// let greedy = GenerateOptions::default().max_tokens(20).temperature(0.0);
/// assert_eq!(greedy.model, "gpt3-125m");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateOptions {
    pub max_tokens: i32,
    /// 0 is greedy decoding.
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub model: String,
    /// `None` never stops early.
    pub eos_token: Option<i32>,
    /// `None`: a different sample each call.
    pub seed: Option<i64>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 64,
            temperature: 1.0,
            top_k: 50,
            top_p: 0.95,
            model: DEFAULT_MODEL.to_string(),
            eos_token: Some(50256),
            seed: None,
        }
    }
}

impl GenerateOptions {
    pub fn max_tokens(mut self, n: i32) -> Self {
        self.max_tokens = n;
        self
    }
    pub fn temperature(mut self, t: f32) -> Self {
        self.temperature = t;
        self
    }
    /// Sample among the `k` most likely tokens (0: all).
    pub fn top_k(mut self, k: i32) -> Self {
        self.top_k = k;
        self
    }
    /// Sample among the most likely tokens whose probabilities sum to `p`.
    pub fn top_p(mut self, p: f32) -> Self {
        self.top_p = p;
        self
    }
    pub fn model(mut self, m: impl Into<String>) -> Self {
        self.model = m.into();
        self
    }
    pub fn eos_token(mut self, eos: Option<i32>) -> Self {
        self.eos_token = eos;
        self
    }
    pub fn seed(mut self, seed: i64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The eight arguments shared by llm_generate, llm_generate_ids and llm_generate_stream.
    fn params<'a>(&'a self, prompt: &'a (dyn ToSql + Sync)) -> [&'a (dyn ToSql + Sync); 8] {
        [
            prompt,
            &self.max_tokens,
            &self.temperature,
            &self.top_k,
            &self.top_p,
            &self.model,
            &self.eos_token,
            &self.seed,
        ]
    }
}

/// Options of a beam search (`llm_beam_search`), with the server's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BeamOptions {
    pub beam_width: i32,
    pub max_tokens: i32,
    pub model: String,
    pub length_penalty: f32,
}

impl Default for BeamOptions {
    fn default() -> Self {
        Self {
            beam_width: 4,
            max_tokens: 32,
            model: DEFAULT_MODEL.to_string(),
            length_penalty: 1.0,
        }
    }
}

impl BeamOptions {
    pub fn beam_width(mut self, n: i32) -> Self {
        self.beam_width = n;
        self
    }
    pub fn max_tokens(mut self, n: i32) -> Self {
        self.max_tokens = n;
        self
    }
    pub fn model(mut self, m: impl Into<String>) -> Self {
        self.model = m.into();
        self
    }
    pub fn length_penalty(mut self, p: f32) -> Self {
        self.length_penalty = p;
        self
    }
}

/// One finished beam, best first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Beam {
    pub rank: i32,
    pub score: f64,
    pub token_ids: Vec<i32>,
    pub text: String,
}

/// One token of `Client::generate_stream` (a row of `llm_generate_stream`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamEvent {
    /// 1 for the first generated token.
    pub step: i32,
    pub token_id: i32,
    /// This token's text.
    pub token: String,
    /// The text generated so far.
    pub text: String,
    /// Whether this is the last token.
    pub is_complete: bool,
}

impl StreamEvent {
    fn from_row(row: &tokio_postgres::Row) -> Result<Self, Error> {
        Ok(Self {
            step: row.try_get(0)?,
            token_id: row.try_get(1)?,
            token: row.try_get(2)?,
            text: row.try_get(3)?,
            is_complete: row.try_get(4)?,
        })
    }
}

impl Client {
    /// The continuation of `prompt` (`llm_generate`).
    ///
    /// ```no_run
    /// # async fn demo(client: &pg_gpt3_client::Client) -> Result<(), pg_gpt3_client::Error> {
    /// use pg_gpt3_client::GenerateOptions;
    /// let text = client
    ///     .generate("The database said", &GenerateOptions::default().max_tokens(16).seed(7))
    ///     .await?;
    /// println!("{text}");
    /// # Ok(()) }
    /// ```
    pub async fn generate(&self, prompt: &str, opts: &GenerateOptions) -> Result<String, Error> {
        let row = self
            .query_one(
                "SELECT llm_generate($1, $2, $3, $4, $5, $6, $7, $8)",
                &opts.params(&prompt),
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    /// The token ids that continue `ids` (`llm_generate_ids`; the prompt is not repeated).
    pub async fn generate_ids(
        &self,
        ids: &[i32],
        opts: &GenerateOptions,
    ) -> Result<Vec<i32>, Error> {
        let row = self
            .query_one(
                "SELECT llm_generate_ids($1, $2, $3, $4, $5, $6, $7, $8)",
                &opts.params(&ids),
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Tokens as the server produces them (`llm_generate_stream` in the select list, so
    /// PostgreSQL sends each row as soon as it exists). Dropping the stream before the
    /// token with `is_complete` cancels the generation.
    ///
    /// ```no_run
    /// # async fn demo(client: &pg_gpt3_client::Client) -> Result<(), pg_gpt3_client::Error> {
    /// use futures_util::StreamExt;
    /// let opts = pg_gpt3_client::GenerateOptions::default().max_tokens(32);
    /// let mut tokens = client.generate_stream("Once upon a time", &opts).await?;
    /// while let Some(event) = tokens.next().await {
    ///     print!("{}", event?.token);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn generate_stream(
        &self,
        prompt: &str,
        opts: &GenerateOptions,
    ) -> Result<RowsOf<StreamEvent>, Error> {
        self.stream(
            "SELECT (s).step, (s).token_id, (s).token, (s).text, (s).is_complete \
             FROM (SELECT llm_generate_stream($1, $2, $3, $4, $5, $6, $7, $8) AS s) q",
            &opts.params(&prompt),
            StreamEvent::from_row,
            |event, _| event.is_complete,
        )
        .await
    }

    /// The best continuations of `prompt` by beam search (`llm_beam_search`), best first.
    pub async fn beam_search(&self, prompt: &str, opts: &BeamOptions) -> Result<Vec<Beam>, Error> {
        let rows = self
            .query(
                "SELECT rank, score, token_ids, text FROM llm_beam_search($1, $2, $3, $4, $5)",
                &[
                    &prompt,
                    &opts.beam_width,
                    &opts.max_tokens,
                    &opts.model,
                    &opts.length_penalty,
                ],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Beam {
                    rank: r.try_get(0)?,
                    score: r.try_get(1)?,
                    token_ids: r.try_get(2)?,
                    text: r.try_get(3)?,
                })
            })
            .collect()
    }

    /// `text` as token ids with `model`'s tokenizer (`llm_encode`).
    pub async fn encode(&self, text: &str, model: &str) -> Result<Vec<i32>, Error> {
        let row = self
            .query_one("SELECT llm_encode($1, $2)", &[&text, &model])
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Token ids back to text with `model`'s tokenizer (`llm_decode`).
    pub async fn decode(&self, ids: &[i32], model: &str) -> Result<String, Error> {
        let row = self
            .query_one("SELECT llm_decode($1, $2)", &[&ids, &model])
            .await?;
        Ok(row.try_get(0)?)
    }

    /// float32 logits [T, vocab] of every position of `ids` under `model`, fetched as the
    /// binary `bytea` the server computes them into (no text round trip).
    ///
    /// ```no_run
    /// # async fn demo(client: &pg_gpt3_client::Client) -> Result<(), pg_gpt3_client::Error> {
    /// let logits = client.logits(&[464, 3290], "gpt3-125m").await?;
    /// let next = logits.row(1).iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    /// # Ok(()) }
    /// ```
    pub async fn logits(&self, ids: &[i32], model: &str) -> Result<ndarray::Array2<f32>, Error> {
        let row = self
            .query_one("SELECT llm_logits($1, $2)", &[&ids, &model])
            .await?;
        let values = decode_tensor(row.try_get(0)?)?;
        let rows = ids.len().max(1);
        if values.len() % rows != 0 {
            return Err(Error::Protocol(format!(
                "{} logits do not divide into {rows} positions",
                values.len()
            )));
        }
        ndarray::Array2::from_shape_vec((ids.len(), values.len() / rows), values)
            .map_err(|e| Error::Protocol(e.to_string()))
    }

    /// Mean cross-entropy of `model` predicting `targets` from `tokens` (`llm_loss`: one
    /// sequence or a batch, no gradient).
    ///
    /// ```no_run
    /// # async fn demo(client: &pg_gpt3_client::Client) -> Result<(), pg_gpt3_client::Error> {
    /// let loss = client.loss(&[464, 3290, 318][..], &[3290, 318, 257][..], "gpt3-125m").await?;
    /// # Ok(()) }
    /// ```
    pub async fn loss<'a>(
        &self,
        tokens: impl Into<Tokens<'a>>,
        targets: impl Into<Tokens<'a>>,
        model: &str,
    ) -> Result<f32, Error> {
        let (tokens, targets) = (tokens.into(), targets.into());
        let row = self
            .query_one("SELECT llm_loss($1, $2, $3)", &[&model, &tokens, &targets])
            .await?;
        Ok(row.try_get(0)?)
    }
}
