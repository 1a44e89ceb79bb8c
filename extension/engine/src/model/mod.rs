//! GPT-3 family models: configuration, weights, forward pass with KV cache.

pub mod config;
pub mod forward;
pub mod init;
pub mod weights;

pub use config::{Activation, AttnKind, LnPlacement, ModelConfig};
pub use forward::{KvCache, Logits, Model};
pub use weights::{check_tensors, MapSource, ModelWeights, TensorSource};
