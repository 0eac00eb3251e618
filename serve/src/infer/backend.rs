//! The backend contract: what the HTTP layer and the archive embedder know
//! about a model, and the one call they make into it. ONNX Runtime implements
//! it in [`crate::infer::ort`]; tests implement it with plain Rust.

use std::collections::BTreeMap;

pub use geossl_models::mlm::OutputRole;
use geossl_raster::{SampleType, Samples};
use serde::Serialize;

use crate::infer::tensor::{DType, Tensor};
use crate::infer::InferError;

/// What a model's head produces, which decides the image endpoints it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// `embedding [N, D]`
    Embedding,
    /// `logits`/`probabilities [N, K]`
    Classification,
    /// `mask_logits [N, K, H, W]`
    Segmentation,
    /// Anything else: OIP only.
    Other,
}

/// Name, type and dimensions of one model input or output; `-1` is dynamic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorSpec {
    pub name: String,
    #[serde(serialize_with = "ser_dtype")]
    pub datatype: DType,
    pub shape: Vec<i64>,
}

fn ser_dtype<S: serde::Serializer>(d: &DType, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(d.oip_name())
}

/// Everything the server knows about one loaded model version.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub version: u64,
    /// The single input, `[N, C, H, W]`.
    pub input: TensorSpec,
    pub outputs: Vec<TensorSpec>,
    /// What each output is (parallel to `outputs`): from geossl's output names, or a model card's tasks.
    pub roles: Vec<Option<OutputRole>>,
    pub task: Task,
    /// Class names (classification, segmentation), may be empty.
    pub labels: Vec<String>,
    /// Per-channel `x * mul + add` applied to stored samples when the model
    /// takes float32 input (from the exporter's spec metadata).
    pub normalization: Option<(Vec<f32>, Vec<f32>)>,
    /// The sample type the model's normalization was made for (spec metadata).
    pub sample_type: Option<SampleType>,
    /// Band names in channel order (spec metadata; empty when unknown): TIFF bands are picked by them.
    pub bands: Vec<String>,
    /// ONNX `metadata_props`.
    pub metadata: BTreeMap<String, String>,
    /// Execution provider the session got (`CUDA`, `CPU`, `fake`).
    pub execution_provider: String,
}

impl ModelInfo {
    /// Channels, height, width of the input; height/width `None` when dynamic.
    pub fn input_chw(&self) -> (usize, Option<usize>, Option<usize>) {
        let d = |i: usize| self.input.shape.get(i).and_then(|&v| usize::try_from(v).ok());
        (d(1).unwrap_or(0), d(2), d(3))
    }

    /// Whether images storing `stored` samples can go to this model: an
    /// integer-input model takes exactly its own type, a float32 model the
    /// type its spec's normalization was made for (any, when the spec predates
    /// that record). The message names both types (422 at the HTTP layer).
    pub fn check_samples(&self, stored: SampleType) -> Result<(), InferError> {
        let want = match self.input.datatype {
            DType::U8 => Some(SampleType::U8),
            DType::U16 => Some(SampleType::U16),
            DType::F32 => self.sample_type,
        };
        match want {
            Some(t) if t != stored => Err(InferError::Invalid(format!(
                "model {} takes {t} samples; the image stores {stored} samples",
                self.name
            ))),
            _ => Ok(()),
        }
    }

    /// The model input `[N, C, H, W]` from channel-major samples (checked with
    /// [`ModelInfo::check_samples`]): as they are for uint8/uint16 models,
    /// `x * mul + add` per channel for float32 models (the spec's one normalization).
    pub fn input_from_samples(&self, shape: [usize; 4], px: &Samples) -> Result<Tensor, InferError> {
        match (self.input.datatype, px) {
            (DType::U8, Samples::U8(v)) => Ok(Tensor::u8(shape.to_vec(), v.clone())),
            (DType::U16, Samples::U16(v)) => Ok(Tensor::u16(shape.to_vec(), v.clone())),
            (DType::F32, px) => {
                let c = shape[1];
                let (mul, add) =
                    self.normalization.as_ref().filter(|(m, a)| m.len() == c && a.len() == c).ok_or_else(|| {
                        InferError::Invalid(format!(
                            "model {} takes float32 input and carries no {c}-band normalization (geossl.spec metadata)",
                            self.name
                        ))
                    })?;
                let hw = shape[2] * shape[3];
                let v = px.to_f32().into_iter().enumerate().map(|(i, v)| {
                    let ch = (i / hw) % c;
                    v * mul[ch] + add[ch]
                });
                Ok(Tensor::f32(shape.to_vec(), v.collect()))
            }
            (t, px) => Err(InferError::Invalid(format!(
                "model {} takes {} input; got {} samples",
                self.name,
                t.oip_name(),
                px.sample_type()
            ))),
        }
    }

    /// Roles from output names, following `geossl_models::io` (`embedding`, `logits`, …).
    pub fn roles_from_names(outputs: &[TensorSpec]) -> Vec<Option<OutputRole>> {
        outputs.iter().map(|o| OutputRole::of_name(&o.name)).collect()
    }

    /// The task the roles make: an embedding, a mask, or class scores.
    pub fn task_from_roles(roles: &[Option<OutputRole>]) -> Task {
        let has = |r: OutputRole| roles.contains(&Some(r));
        if has(OutputRole::Embedding) {
            Task::Embedding
        } else if has(OutputRole::MaskLogits) {
            Task::Segmentation
        } else if has(OutputRole::Logits) || has(OutputRole::Probabilities) {
            Task::Classification
        } else {
            Task::Other
        }
    }

    /// Position of the output that plays `role` (in `outputs` and in what [`Backend::infer`] returns).
    pub fn output_index(&self, role: OutputRole) -> Option<usize> {
        self.roles.iter().position(|r| *r == Some(role))
    }
}

/// Inference failure inside a backend.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

/// One inference session, owned by one worker thread.
pub trait Backend: Send {
    /// Runs `input` (`[N, C, H, W]`, the model's input dtype) and returns the
    /// model's outputs in the order of [`ModelInfo::outputs`], each `[N, ...]`.
    fn infer(&mut self, input: &Tensor) -> Result<Vec<Tensor>, BackendError>;
}
