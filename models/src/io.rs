//! The ONNX input/output contract shared by the exporter (which writes it) and
//! the server (which relies on it).
//!
//! * one input `images`: `uint8 [N, C, H, W]` by default or `uint16` (stored
//!   samples, e.g. Sentinel-2 or Landsat digital numbers; scale/offset and
//!   normalization inside the graph), or `float32 [N, C, H, W]` already
//!   normalized;
//! * outputs named by head: `embedding [N, D]`; `logits` and `probabilities
//!   [N, K]`; `mask_logits [N, K, H, W]`;
//! * `N` is always dynamic; `H`, `W` are dynamic for segmentation.

use serde::{Deserialize, Serialize};

use crate::heads::{HeadKind, HeadSpec};
pub use crate::sample::SampleType;
use crate::spec::ModelSpec;

/// Name of the single model input.
pub const INPUT_NAME: &str = "images";
/// Output names.
pub const OUTPUT_EMBEDDING: &str = "embedding";
pub const OUTPUT_LOGITS: &str = "logits";
pub const OUTPUT_PROBABILITIES: &str = "probabilities";
pub const OUTPUT_MASK_LOGITS: &str = "mask_logits";
/// The backbone's last feature map `[N, D, ⌈H/32⌉, ⌈W/32⌉]` (`--head features`): one embedding per cell.
pub const OUTPUT_FEATURE_MAP: &str = "feature_map";

/// `metadata_props` keys written by the exporter.
pub mod metadata {
    pub const VERSION: &str = "geossl.version";
    pub const SPEC: &str = "geossl.spec";
    pub const HEAD: &str = "geossl.head";
    pub const INPUT_DTYPE: &str = "geossl.input_dtype";
    pub const LABELS: &str = "geossl.labels";
    pub const SOURCE_SHA256: &str = "geossl.source_sha256";
    pub const PRESET: &str = "geossl.training_preset";
}

/// Element type of the model input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum InputDType {
    /// Raw 8-bit pixels; the graph scales and normalizes.
    #[default]
    Uint8,
    /// Raw 16-bit samples (e.g. reflectance × 10000); the graph scales and normalizes.
    Uint16,
    /// Normalized float input.
    Float32,
}

impl InputDType {
    /// The stored sample type such an input carries (`None` for normalized float).
    pub fn samples(self) -> Option<SampleType> {
        match self {
            InputDType::Uint8 => Some(SampleType::U8),
            InputDType::Uint16 => Some(SampleType::U16),
            InputDType::Float32 => None,
        }
    }
}

/// Element types appearing in the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ElemType {
    Uint8,
    Uint16,
    Float32,
}

/// A dimension: fixed, or dynamic with a symbolic name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    Fixed(usize),
    Dynamic(String),
}

/// Name, element type and dimensions of one tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorContract {
    pub name: String,
    pub dtype: ElemType,
    pub dims: Vec<Dim>,
}

/// Inputs and outputs of an exported model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoContract {
    pub inputs: Vec<TensorContract>,
    pub outputs: Vec<TensorContract>,
}

fn dynamic(s: &str) -> Dim {
    Dim::Dynamic(s.into())
}

impl IoContract {
    /// The contract of `spec` exported with head `head` and input type `input`.
    pub fn for_export(spec: &ModelSpec, head: HeadKind, input: InputDType) -> Result<Self, crate::ContractError> {
        let c = spec.backbone.in_channels;
        let [h, w] = spec.input_size;
        let spatial_dynamic = head == HeadKind::Segmentation;
        let (hd, wd) = if spatial_dynamic { (dynamic("H"), dynamic("W")) } else { (Dim::Fixed(h), Dim::Fixed(w)) };
        let in_dtype = match input {
            InputDType::Uint8 => ElemType::Uint8,
            InputDType::Uint16 => ElemType::Uint16,
            InputDType::Float32 => ElemType::Float32,
        };
        let inputs = vec![TensorContract {
            name: INPUT_NAME.into(),
            dtype: in_dtype,
            dims: vec![dynamic("N"), Dim::Fixed(c), hd.clone(), wd.clone()],
        }];
        let f32_out = |name: &str, dims: Vec<Dim>| TensorContract { name: name.into(), dtype: ElemType::Float32, dims };
        let outputs = match (head, spec.head(head)) {
            (HeadKind::Embedding, Some(HeadSpec::Embedding(e))) => {
                let d = e.projection.map_or(spec.backbone.feature_dim(), |p| p.out);
                vec![f32_out(OUTPUT_EMBEDDING, vec![dynamic("N"), Dim::Fixed(d)])]
            }
            // A backbone without an embedding head still exports pooled features.
            (HeadKind::Embedding, None) => {
                vec![f32_out(OUTPUT_EMBEDDING, vec![dynamic("N"), Dim::Fixed(spec.backbone.feature_dim())])]
            }
            (HeadKind::Classifier, Some(HeadSpec::Classifier(cl))) => vec![
                f32_out(OUTPUT_LOGITS, vec![dynamic("N"), Dim::Fixed(cl.num_classes)]),
                f32_out(OUTPUT_PROBABILITIES, vec![dynamic("N"), Dim::Fixed(cl.num_classes)]),
            ],
            (HeadKind::Segmentation, Some(HeadSpec::Segmentation(s))) => {
                vec![f32_out(OUTPUT_MASK_LOGITS, vec![dynamic("N"), Dim::Fixed(s.num_classes), hd, wd])]
            }
            (HeadKind::Geo, _) => return Err("the geo head is a training pretext and is not exported".into()),
            // Every ResNet stage halves with ceil (stride-2 convolutions and max-pool, padded): 5 of them.
            (HeadKind::Features, _) => {
                let cells = |n: usize| Dim::Fixed((0..5).fold(n, |a, _| a.div_ceil(2)));
                vec![f32_out(
                    OUTPUT_FEATURE_MAP,
                    vec![dynamic("N"), Dim::Fixed(spec.backbone.feature_dim()), cells(h), cells(w)],
                )]
            }
            (k, _) => return Err(format!("the checkpoint has no {} head", k.name()).into()),
        };
        Ok(Self { inputs, outputs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Arch, ClassifierHead, EmbeddingHead, ProjectionSpec, SegmentationHead};

    #[test]
    fn contract_follows_heads() {
        let mut spec = ModelSpec::rgb(Arch::Resnet18, 224);
        spec.heads.push(HeadSpec::Embedding(EmbeddingHead {
            projection: Some(ProjectionSpec::moco_v2(512)),
            l2_normalize: true,
        }));
        spec.heads.push(HeadSpec::Classifier(ClassifierHead { num_classes: 62, labels: vec![] }));
        spec.heads.push(HeadSpec::Segmentation(SegmentationHead { num_classes: 2, hidden: 128, labels: vec![] }));
        let e = IoContract::for_export(&spec, HeadKind::Embedding, InputDType::Uint8).unwrap();
        assert_eq!(e.inputs[0].dtype, ElemType::Uint8);
        assert_eq!(e.inputs[0].dims, vec![dynamic("N"), Dim::Fixed(3), Dim::Fixed(224), Dim::Fixed(224)]);
        assert_eq!(e.outputs[0].dims[1], Dim::Fixed(128));
        let c = IoContract::for_export(&spec, HeadKind::Classifier, InputDType::Float32).unwrap();
        assert_eq!(
            c.outputs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(),
            [OUTPUT_LOGITS, OUTPUT_PROBABILITIES]
        );
        let s = IoContract::for_export(&spec, HeadKind::Segmentation, InputDType::Uint8).unwrap();
        assert_eq!(s.outputs[0].dims[2], dynamic("H"));
        assert!(IoContract::for_export(&spec, HeadKind::Geo, InputDType::Uint8).is_err());
        let f = IoContract::for_export(&spec, HeadKind::Features, InputDType::Uint8).unwrap();
        assert_eq!(f.outputs[0].dims, vec![dynamic("N"), Dim::Fixed(512), Dim::Fixed(7), Dim::Fixed(7)]);
        let bare = ModelSpec::rgb(Arch::Resnet50, 224);
        let b = IoContract::for_export(&bare, HeadKind::Embedding, InputDType::Uint8).unwrap();
        assert_eq!(b.outputs[0].dims[1], Dim::Fixed(2048));
        assert!(IoContract::for_export(&bare, HeadKind::Classifier, InputDType::Uint8)
            .unwrap_err()
            .to_string()
            .contains("no classifier"));
    }
}
