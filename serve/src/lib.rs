//! geossl serving, in four parts that never import each other sideways:
//!
//! - [`infer`]: the inference engine — the backend contract (a model description and one `infer` call),
//!   host tensors, ONNX Runtime sessions (CUDA or CPU) and the dynamic batcher, with its own error enum.
//!   It knows no HTTP status code and no file format.
//! - [`http`]: the service — routes, the Open Inference Protocol v2 and the image endpoints, the model
//!   repository, state, metrics, and the one table from error kind to HTTP status.
//! - [`archive`]: archive embedding — inputs (paths, globs, object storage, STAC), locations, scene and
//!   window reading, the GeoParquet schema and sink, plan/shard/verify, and the map picture.
//! - [`search`]: similarity search over archive embeddings — indexes over GeoParquet datasets, filtered
//!   queries and the quick classifier, answers as GeoJSON or GeoParquet. Stands on `archive`'s readers.
//!
//! `http` and `archive` both stand on `infer`; `http` serves `search`; pixels and places come from `geossl_raster`. Never links
//! libtorch.

pub mod archive;
pub mod http;
pub mod infer;
pub mod search;
