//! SQL functions, one module per concern.

mod args;
mod kernels;
mod model;
mod optim;
mod sample;
mod tensor_io;
