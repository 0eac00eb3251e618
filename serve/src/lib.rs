//! geossl serving: ONNX Runtime sessions behind an HTTP API (Open Inference
//! Protocol v2 + image endpoints). Never links libtorch.
//!
//! Layers, bottom up: [`backend`] (the contract: model description and one
//! `infer` call), [`ort_backend`] (ONNX Runtime, CUDA EP or CPU), [`batcher`]
//! (bounded queue, dynamic batching on dedicated threads), [`repository`]
//! (model directory layout and `config.toml`), [`oip`] and [`images`]
//! (handlers), [`server`] (routes, metrics, lifecycle). [`error`] holds the one
//! table from error kind to HTTP status. [`embed`] turns GeoTIFF archives into
//! GeoParquet through the same backend contract; [`map`] draws what an embedded
//! scene's windows look like to the model (principal components, neighbours).

pub mod archive;
pub mod backend;
pub mod batcher;
pub mod embed;
pub mod error;
pub mod image_io;
pub mod images;
pub mod inputs;
pub mod map;
pub mod metrics;
pub mod oip;
pub mod ort_backend;
pub mod repository;
pub mod server;
pub mod stac;
pub mod state;
pub mod store;
pub mod tensor;

pub use backend::{Backend, BackendError, ModelInfo, Task, TensorSpec};
pub use batcher::{BatchConfig, Worker};
pub use error::ServeError;
pub use state::{AppState, Limits};
pub use tensor::{DType, Tensor};
