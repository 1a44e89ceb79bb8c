//! pg_gpt3_client: a typed async client for the `pg_llm` PostgreSQL extension.
//!
//! The client so far: connection, errors with SQLSTATE and their kind (`Error::kind`), the
//! model registry, generation and its token stream, logits as an `ndarray::Array2`, tensor
//! helpers. Training, tokenizer, dataset and checkpoint calls follow (see docs/roadmap.md).
//!
//! ```no_run
//! # async fn demo() -> Result<(), pg_gpt3_client::Error> {
//! let client = pg_gpt3_client::Client::connect("host=/tmp/pg_gpt3_cluster/sock port=54329 user=postgres").await?;
//! let cfg = client.model_config(pg_gpt3_client::DEFAULT_MODEL).await?;
//! assert_eq!(cfg.d_model, 768);
//! # Ok(()) }
//! ```

use futures_util::{Stream, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

/// The model every call uses unless told otherwise.
pub const DEFAULT_MODEL: &str = "gpt3-125m";

/// Errors from the client. Server errors keep their SQLSTATE.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{message} (SQLSTATE {sqlstate})")]
    Server { sqlstate: String, message: String },
    #[error("connection: {0}")]
    Connection(String),
    #[error("{0}")]
    Protocol(String),
}

/// What went wrong, by the SQLSTATE the server reported (or the failure on the client's
/// side), for callers that react by kind rather than by code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// Arguments the server refused: wrong sizes, NaN, negative counts, corrupt files,
    /// oversized requests (SQLSTATE classes 22 and 54, 42601/42804/42P02).
    BadInput,
    /// No such model, tokenizer, dataset or checkpoint (42704).
    UnknownModel,
    /// The role lacks a privilege (42501).
    Permission,
    /// The query was cancelled (57014 by request).
    Cancelled,
    /// The query ran past `statement_timeout` (57014 by timeout).
    Timeout,
    /// Memory, disk or another server resource ran out (class 53).
    Resources,
    /// The connection could not be made or was lost (class 08, server shutdown, I/O).
    Connection,
    /// Anything else (an internal server error, a reply the client did not expect).
    Other,
}

impl Error {
    /// The five-character SQLSTATE of a server error (for example "42704" for an unknown model).
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::Server { sqlstate, .. } => Some(sqlstate),
            _ => None,
        }
    }

    /// The kind of failure (see `ErrorKind`).
    pub fn kind(&self) -> ErrorKind {
        let (code, message) = match self {
            Error::Server { sqlstate, message } => (sqlstate.as_str(), message.as_str()),
            Error::Connection(_) => return ErrorKind::Connection,
            Error::Protocol(_) => return ErrorKind::Other,
        };
        match code {
            "42704" => ErrorKind::UnknownModel,
            "42501" => ErrorKind::Permission,
            "57014" if message.contains("statement timeout") => ErrorKind::Timeout,
            "57014" => ErrorKind::Cancelled,
            "42601" | "42804" | "42P02" => ErrorKind::BadInput,
            _ if code.starts_with("22") || code.starts_with("54") => ErrorKind::BadInput,
            _ if code.starts_with("53") => ErrorKind::Resources,
            _ if code.starts_with("08") || code.starts_with("57P") => ErrorKind::Connection,
            _ => ErrorKind::Other,
        }
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => Error::Server {
                sqlstate: db.code().code().to_string(),
                message: db.message().to_string(),
            },
            None => Error::Connection(e.to_string()),
        }
    }
}

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

/// A connection to a database with the `pg_llm` extension.
pub struct Client {
    inner: tokio_postgres::Client,
}

impl Client {
    /// Connects with a libpq-style connection string (no TLS) and drives the connection on a
    /// background task of the current tokio runtime.
    pub async fn connect(dsn: &str) -> Result<Self, Error> {
        let (inner, connection) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Self { inner })
    }

    /// The registry row of `model`; an unknown model is a server error with SQLSTATE 42704.
    pub async fn model_config(&self, model: &str) -> Result<ModelConfig, Error> {
        let row = self
            .inner
            .query_one(
                "SELECT model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab, activation, \
                 attention_pattern, local_window, family FROM llm_get_model_config($1)",
                &[&model],
            )
            .await?;
        Ok(ModelConfig {
            model: row.get(0),
            n_layer: row.get(1),
            n_head: row.get(2),
            d_model: row.get(3),
            d_head: row.get(4),
            d_ff: row.get(5),
            n_positions: row.get(6),
            vocab: row.get(7),
            activation: row.get(8),
            attention_pattern: row.get(9),
            local_window: row.get(10),
            family: row.get(11),
        })
    }

    /// float32 logits [T, vocab] of every position of `ids` under `model`, fetched as the
    /// binary `bytea` the server computes them into (no text round trip).
    pub async fn logits(&self, ids: &[i32], model: &str) -> Result<ndarray::Array2<f32>, Error> {
        let row = self
            .inner
            .query_one("SELECT llm_logits($1, $2)", &[&ids, &model])
            .await?;
        let bytes: &[u8] = row.get(0);
        let values = decode(bytes)?;
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

    /// Registered model names.
    pub async fn models(&self) -> Result<Vec<String>, Error> {
        let rows = self
            .inner
            .query("SELECT model FROM llm_model_config ORDER BY model", &[])
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
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
            .inner
            .query_one(
                "SELECT pg_llm_matmul($1, $2, $3, $4, $5)",
                &[&encode(a), &encode(b), &m, &k, &n],
            )
            .await?;
        decode(row.get::<_, &[u8]>(0))
    }
}

/// Options of a generation call, with the server's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateOptions {
    pub max_tokens: i32,
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub model: String,
    /// `None` never stops early.
    pub eos_token: Option<i32>,
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

/// One row of `llm_generate_stream`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamEvent {
    pub step: i32,
    pub token_id: i32,
    pub token: String,
    pub text: String,
    pub is_complete: bool,
}

impl Client {
    /// The continuation of `prompt` (`llm_generate`).
    pub async fn generate(&self, prompt: &str, opts: &GenerateOptions) -> Result<String, Error> {
        let row = self
            .inner
            .query_one(
                "SELECT llm_generate($1, $2, $3, $4, $5, $6, $7, $8)",
                &generate_params(&prompt, opts),
            )
            .await?;
        Ok(row.get(0))
    }

    /// The token ids that continue `ids` (`llm_generate_ids`; the prompt is not repeated).
    pub async fn generate_ids(
        &self,
        ids: &[i32],
        opts: &GenerateOptions,
    ) -> Result<Vec<i32>, Error> {
        let row = self
            .inner
            .query_one(
                "SELECT llm_generate_ids($1, $2, $3, $4, $5, $6, $7, $8)",
                &generate_params(&ids, opts),
            )
            .await?;
        Ok(row.get(0))
    }

    /// The best continuations of `prompt` by beam search (`llm_beam_search`), best first.
    pub async fn beam_search(&self, prompt: &str, opts: &BeamOptions) -> Result<Vec<Beam>, Error> {
        let rows = self
            .inner
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
        Ok(rows
            .iter()
            .map(|r| Beam {
                rank: r.get(0),
                score: r.get(1),
                token_ids: r.get(2),
                text: r.get(3),
            })
            .collect())
    }

    /// `text` as token ids with `model`'s tokenizer (`llm_encode`).
    pub async fn encode(&self, text: &str, model: &str) -> Result<Vec<i32>, Error> {
        let row = self
            .inner
            .query_one("SELECT llm_encode($1, $2)", &[&text, &model])
            .await?;
        Ok(row.get(0))
    }

    /// Token ids back to text with `model`'s tokenizer (`llm_decode`).
    pub async fn decode(&self, ids: &[i32], model: &str) -> Result<String, Error> {
        let row = self
            .inner
            .query_one("SELECT llm_decode($1, $2)", &[&ids, &model])
            .await?;
        Ok(row.get(0))
    }

    /// Mean cross-entropy of `model` predicting `targets` from `tokens` (`llm_loss`; equal
    /// lengths, no gradient).
    pub async fn loss(&self, tokens: &[i32], targets: &[i32], model: &str) -> Result<f32, Error> {
        let row = self
            .inner
            .query_one("SELECT llm_loss($1, $2, $3)", &[&model, &tokens, &targets])
            .await?;
        Ok(row.get(0))
    }

    /// Tokens as the server produces them (`llm_generate_stream` called in the select list, so
    /// PostgreSQL sends each row as soon as it exists).
    pub async fn generate_stream(
        &self,
        prompt: &str,
        opts: &GenerateOptions,
    ) -> Result<impl Stream<Item = Result<StreamEvent, Error>> + '_, Error> {
        let rows = self
            .inner
            .query_raw(
                "SELECT (s).step, (s).token_id, (s).token, (s).text, (s).is_complete \
                 FROM (SELECT llm_generate_stream($1, $2, $3, $4, $5, $6, $7, $8) AS s) q",
                generate_params(&prompt, opts),
            )
            .await?;
        Ok(rows.map_err(Error::from).map(|r| {
            r.map(|row| StreamEvent {
                step: row.get(0),
                token_id: row.get(1),
                token: row.get(2),
                text: row.get(3),
                is_complete: row.get(4),
            })
        }))
    }

    /// Runs a statement (setup in tests and tools).
    pub async fn execute(&self, sql: &str) -> Result<u64, Error> {
        Ok(self.inner.execute(sql, &[]).await?)
    }

    /// A token that cancels this connection's running query (a long generation, say) from
    /// anywhere: `token.cancel_query(tokio_postgres::NoTls).await`. The query then fails
    /// with SQLSTATE 57014 and its transaction rolls back.
    pub fn cancel_token(&self) -> tokio_postgres::CancelToken {
        self.inner.cancel_token()
    }

    /// The underlying tokio-postgres client, for queries this crate does not wrap yet.
    pub fn raw(&self) -> &tokio_postgres::Client {
        &self.inner
    }
}

/// The eight arguments shared by llm_generate, llm_generate_ids and llm_generate_stream.
fn generate_params<'a>(
    prompt: &'a (dyn tokio_postgres::types::ToSql + Sync),
    opts: &'a GenerateOptions,
) -> [&'a (dyn tokio_postgres::types::ToSql + Sync); 8] {
    [
        prompt,
        &opts.max_tokens,
        &opts.temperature,
        &opts.top_k,
        &opts.top_p,
        &opts.model,
        &opts.eos_token,
        &opts.seed,
    ]
}

/// Encodes float32 values in the extension's tensor format (little-endian bytes).
pub fn encode(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Decodes the extension's tensor format.
pub fn decode(bytes: &[u8]) -> Result<Vec<f32>, Error> {
    if bytes.len() % 4 != 0 {
        return Err(Error::Protocol(format!(
            "tensor of {} bytes is not float32",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_follow_sqlstates() {
        let server = |code: &str, message: &str| Error::Server {
            sqlstate: code.into(),
            message: message.into(),
        };
        let cases = [
            (server("22023", "x"), ErrorKind::BadInput),
            (server("22P02", "x"), ErrorKind::BadInput),
            (server("54000", "too large"), ErrorKind::BadInput),
            (server("42704", "no model"), ErrorKind::UnknownModel),
            (server("42501", "denied"), ErrorKind::Permission),
            (
                server("57014", "canceling statement due to user request"),
                ErrorKind::Cancelled,
            ),
            (
                server("57014", "canceling statement due to statement timeout"),
                ErrorKind::Timeout,
            ),
            (server("53200", "out of memory"), ErrorKind::Resources),
            (
                server("57P01", "terminating connection"),
                ErrorKind::Connection,
            ),
            (server("XX000", "internal"), ErrorKind::Other),
            (Error::Connection("refused".into()), ErrorKind::Connection),
            (Error::Protocol("odd reply".into()), ErrorKind::Other),
        ];
        for (err, kind) in cases {
            assert_eq!(err.kind(), kind, "{err}");
        }
    }

    #[test]
    fn tensor_format_round_trips() {
        let v = vec![1.0f32, -0.5, 3.25];
        assert_eq!(decode(&encode(&v)).unwrap(), v);
        assert_eq!(encode(&[1.0]), vec![0x00, 0x00, 0x80, 0x3f]);
        assert!(decode(&[0, 1, 2]).is_err());
    }
}
