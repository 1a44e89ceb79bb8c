//! SQL functions, one module per concern.

pub(crate) mod args;
mod autograd;
mod cache;
mod dataset;
mod export;
mod float32_bytea;
mod generate;
mod kernels;
mod layers;
mod model;
mod optim;
mod sample;
pub(crate) mod serving;
mod tensor_io;
mod tokenizer;
mod train;
