//! GPT-3 family models: configuration, weights, forward pass with KV cache.

pub mod backward;
pub mod config;
pub mod dtype;
pub mod forward;
pub mod init;
pub mod storage;
pub mod weight_file;
pub mod weights;

pub use backward::Batch;
pub use config::{Activation, AttnKind, LnPlacement, ModelConfig};
pub use dtype::{DType, Half, Layout, Matrix};
pub(crate) use forward::check_ids;
pub use forward::{KvCache, Logits, Model};
pub use storage::{Param, Storage};
pub use weights::{check_shapes, check_tensors, MapSource, ModelWeights, TensorSource};
