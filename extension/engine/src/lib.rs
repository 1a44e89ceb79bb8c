//! pg_llm_engine: the numerical engine of pg_gpt3.
//!
//! Plain Rust with no PostgreSQL dependency, so every kernel and model can be tested with
//! `cargo test`. The `pg_llm` extension is a thin SQL layer over this crate.
//!
//! Conventions: tensors are float32, row-major; shapes are stated at the top of each kernel
//! file; every public entry point validates its input and returns [`EngineError`] rather than
//! panicking.

pub mod error;
pub mod formats;
pub mod generate;
pub mod kernels;
pub mod memory;
pub mod model;
pub mod optim;
pub mod parallel;
pub mod sample;
pub mod simd;
pub mod tape;
pub mod tensor;
pub mod tokenizer;
pub mod train;

pub use error::{EngineError, Result};
pub use parallel::Cancel;
