//! SQL functions, one module per concern.

mod args;
mod generate;
mod kernels;
mod model;
mod optim;
mod sample;
mod tensor_io;
mod tokenizer;
