//! The inference engine: the backend contract ([`backend`]), host tensors ([`tensor`]), ONNX Runtime
//! sessions ([`ort`]) and the dynamic batcher ([`batcher`]), with the engine's metrics ([`metrics`]). Its
//! errors ([`InferError`]) say what went wrong, not which HTTP status answers it: that is `crate::http`'s
//! table.

pub mod backend;
pub mod batcher;
pub mod metrics;
pub mod ort;
pub mod tensor;

pub use backend::{Backend, BackendError, ModelInfo, Task, TensorSpec};
pub use batcher::{Arrival, BatchConfig, Worker};
pub use metrics::InferMetrics;
pub use ort::LoadError;
pub use tensor::{DType, Data, Tensor};

/// Why the engine did not produce outputs for an input.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// The input does not fit the model: batch size, shape, data type, sample type, values.
    #[error("{0}")]
    Invalid(String),
    /// The model's queue is full, or the input waited past its deadline.
    #[error("{message}")]
    Overloaded { message: String, retry_after_s: u64 },
    /// The model is shutting down.
    #[error("{0}")]
    Closed(String),
    /// The backend failed on a valid input (a bug, or a broken device).
    #[error("{0}")]
    Backend(String),
}
