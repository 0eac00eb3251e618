//! geossl training on tch (libtorch): ResNet backbones with torchvision
//! parameter names, heads, checkpoint directories, the MoCo-v2 +
//! temporal-positive + geo pretraining loop (one process or data-parallel),
//! linear probes, fine-tuning and segmentation.
//!
//! Tensor shapes are given as `[N, C, H, W]` (batch, bands, height, width).

pub mod amp;
pub mod augment;
pub mod backbone;
pub mod checkpoint;
pub mod chips;
pub mod config;
pub mod data;
pub mod device;
pub mod evaluate;
pub mod finetune;
pub mod fixtures;
pub mod geo;
pub mod health;
pub mod image_io;
pub mod loader;
pub mod moco;
pub mod model;
pub mod npy;
pub mod optim;
pub mod pack;
pub mod pipeline;
pub mod plot;
pub mod pretrain;
pub mod probe;
pub use geossl_models::rng;
pub mod segment;
pub mod stats;
pub mod supervised;

pub use backbone::Backbone;
pub use checkpoint::{load_checkpoint, save_checkpoint, CheckpointError, Loaded};
pub use model::Model;
