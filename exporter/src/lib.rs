//! geossl export: checkpoint directories to ONNX, in pure Rust — this crate
//! never links libtorch. The graph is built from the `models` spec and the
//! safetensors weights (not traced), following the I/O contract of
//! `geossl_models::io`.
//!
//! Implemented: embedding (pooled features, optional projection and L2
//! normalization), classifier (logits + probabilities) and segmentation
//! (FCN head, bilinear upsampling to a dynamic input size) heads, uint8
//! (normalization in-graph) or float32 input, optional fp16 weights/compute,
//! metadata; import of PyTorch `torch.save` checkpoints (the paper's released
//! MoCo `.pth.tar`, torchvision state dicts) and torchvision-layout safetensors.

pub mod export;
pub mod graph;
#[rustfmt::skip]
pub mod onnx_pb;
pub mod pickle;
pub mod torch_import;

pub use export::{build_model, export_checkpoint, ExportError, ExportOptions};
pub use torch_import::{import_checkpoint, ImportOptions, InputContract};
