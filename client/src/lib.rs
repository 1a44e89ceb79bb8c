//! # pg_gpt3_client
//!
//! A typed async client for pg_gpt3: GPT-3 family models that live, train and generate
//! inside PostgreSQL (the `pg_llm` extension). Every call is one of the extension's SQL
//! functions with typed arguments and results; nothing here needs SQL.
//!
//! ```no_run
//! use futures_util::StreamExt;
//! use pg_gpt3_client::{Client, GenerateOptions, TrainOptions, DatasetOptions};
//!
//! # async fn demo() -> Result<(), pg_gpt3_client::Error> {
//! let dsn = std::env::var("PG_GPT3_DSN").unwrap_or_else(|_| "host=localhost user=postgres".into());
//! let mut client = Client::connect(&dsn).await?;
//!
//! // A model from a Hugging Face checkpoint on this machine (a folder with config.json).
//! client.import_checkpoint("./gpt3-125m", "gpt3-125m").await?;
//! client.load_tokenizer("gpt3-125m", "./gpt3-125m/vocab.json", "./gpt3-125m/merges.txt").await?;
//!
//! // Generate, whole or token by token.
//! let opts = GenerateOptions::default().max_tokens(32).temperature(0.0);
//! println!("{}", client.generate("PostgreSQL is", &opts).await?);
//! let mut tokens = client.generate_stream("PostgreSQL is", &opts).await?;
//! while let Some(event) = tokens.next().await {
//!     print!("{}", event?.token);
//! }
//!
//! // Train on text, watching each step arrive.
//! let data = DatasetOptions::default().block_size(128);
//! client.dataset_from_text("Rows and columns, all the way down.", &data).await?;
//! let mut steps = client.train(&TrainOptions::default().n_steps(10).batch_size(4)).await?;
//! while let Some(step) = steps.next().await {
//!     let step = step?;
//!     println!("step {}: loss {:.3}", step.step, step.loss);
//! }
//!
//! // Keep the result: in the database, and on this machine.
//! client.checkpoint_save("gpt3-125m", Some("after 10 steps")).await?;
//! client.export_checkpoint("./trained", "gpt3-125m").await?;
//! # Ok(()) }
//! ```
//!
//! ## What is here
//! - Connections: [`Client::connect`], [`Client::connect_tls`] (feature `tls`),
//!   `Client::from(tokio_postgres::Client)`, [`Pool`] (feature `pool`); a per-call timeout
//!   ([`Client::set_timeout`]) and cancel from anywhere ([`Client::canceller`]).
//! - Inference: [`Client::generate`], [`Client::generate_ids`], [`Client::generate_stream`],
//!   [`Client::beam_search`], [`Client::logits`] (an `ndarray::Array2<f32>`, fetched in
//!   binary), [`Client::loss`], [`Client::encode`], [`Client::decode`].
//! - Training: [`Client::train`] (a stream of [`TrainStep`]s), [`Client::train_step`],
//!   [`Client::train_run`] (durable, resumable), [`Client::train_log`], [`Client::eval`]; data from texts, files or token ids ([`Client::dataset_from_text`],
//!   [`Client::dataset_from_files`], [`Client::dataset_upload_tokens`]);
//!   [`Client::load_tokenizer`].
//! - Models and checkpoints: [`Client::model_config`], [`Client::models`],
//!   [`Client::init_params`], [`Client::import_checkpoint`] / [`Client::export_checkpoint`]
//!   (Hugging Face checkpoints between this machine's disk and the server, in pieces),
//!   [`Client::checkpoint_save`] / [`Client::checkpoint_load`] / [`Client::checkpoints`].
//!
//! Errors keep the server's SQLSTATE ([`Error::sqlstate`]) and sort into an [`ErrorKind`]:
//!
//! ```no_run
//! # async fn demo(client: &pg_gpt3_client::Client) {
//! use pg_gpt3_client::ErrorKind;
//! match client.model_config("gpt3-7b-typo").await {
//!     Err(e) if e.kind() == ErrorKind::UnknownModel => eprintln!("no such model ({e})"),
//!     other => { other.unwrap(); }
//! }
//! # }
//! ```
//!
//! Options are builders whose defaults are the SQL functions' defaults (model `gpt3-125m`);
//! options and results derive serde's `Serialize` and `Deserialize`.

mod checkpoint;
mod client;
mod data;
mod error;
mod generate;
mod model;
#[cfg(feature = "pool")]
mod pool;
mod tensor;
#[cfg(feature = "tls")]
mod tls;
mod train;

pub use checkpoint::{Checkpoint, ExportedFile};
pub use client::{CancelHandle, Client, RowsOf};
pub use data::DatasetOptions;
pub use error::{Error, ErrorKind};
pub use generate::{Beam, BeamOptions, GenerateOptions, StreamEvent};
pub use model::ModelConfig;
#[cfg(feature = "pool")]
pub use pool::Pool;
pub use tensor::{decode, encode, Tokens};
#[cfg(feature = "tls")]
pub use tls::TlsConfig;
pub use train::{Evaluation, StepOptions, TrainOptions, TrainStep};

/// The model every call uses unless told otherwise.
pub const DEFAULT_MODEL: &str = "gpt3-125m";

#[cfg(test)]
mod tests {
    use super::*;

    /// Options and results travel as JSON (a service's config, a job queue, a log).
    #[test]
    fn options_and_results_round_trip_through_serde() {
        fn round_trip<T>(value: &T)
        where
            T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
        {
            let json = serde_json::to_string(value).unwrap();
            assert_eq!(&serde_json::from_str::<T>(&json).unwrap(), value, "{json}");
        }
        round_trip(&GenerateOptions::default().top_k(5).seed(3));
        round_trip(&BeamOptions::default().beam_width(2));
        round_trip(&TrainOptions::default().n_steps(10).seq_len(64));
        round_trip(&StepOptions::default().lr(1e-3));
        round_trip(&DatasetOptions::default().stride(16));
        round_trip(&TrainStep {
            step: 1,
            loss: 2.5,
            lr: 1e-4,
            grad_norm: 0.5,
            tokens_per_s: 100.0,
        });
        round_trip(&StreamEvent {
            step: 1,
            token_id: 11,
            token: ",".into(),
            text: "a,".into(),
            is_complete: false,
        });
        round_trip(&ErrorKind::UnknownModel);
        let json = serde_json::to_value(TrainOptions::default()).unwrap();
        assert_eq!(json["model"], DEFAULT_MODEL);
        assert_eq!(json["lr_max"].as_f64().unwrap() as f32, 6e-4);
    }
}
