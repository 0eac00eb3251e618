//! Heads that sit on top of a backbone, each under its own parameter prefix.

use serde::{Deserialize, Serialize};

use crate::arch::{bn, conv, linear};
use crate::param::{ParamRole, ParamSpec};

/// MoCo-v2 MLP projection `Linear(D, hidden) → ReLU → Linear(hidden, out)`,
/// parameters `proj.0.*` and `proj.2.*` (the released MoCo checkpoints' `fc.0`/`fc.2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectionSpec {
    pub hidden: usize,
    pub out: usize,
}

impl ProjectionSpec {
    /// The paper's projection for a backbone of feature width `d`: `d → d → 128`.
    pub fn moco_v2(d: usize) -> Self {
        Self { hidden: d, out: 128 }
    }
}

/// Embedding head: pooled backbone features `[N, D]`, optionally projected
/// (`[N, projection.out]`) and L2-normalized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct EmbeddingHead {
    #[serde(default)]
    pub projection: Option<ProjectionSpec>,
    #[serde(default)]
    pub l2_normalize: bool,
}

/// Linear classifier on pooled features: `fc.weight [K, D]`, `fc.bias [K]`
/// (torchvision's `fc`), outputs `logits [N, K]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassifierHead {
    pub num_classes: usize,
    /// Class names; empty or exactly `num_classes` long.
    #[serde(default)]
    pub labels: Vec<String>,
}

/// FCN-style segmentation head on the last feature map (torchvision `FCNHead`
/// layout): `seg.0` 3×3 conv `D → hidden`, `seg.1` BN, ReLU, dropout, `seg.4`
/// 1×1 conv `hidden → K` with bias; logits are upsampled bilinearly to the
/// input size: `[N, K, H, W]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentationHead {
    pub num_classes: usize,
    pub hidden: usize,
    #[serde(default)]
    pub labels: Vec<String>,
}

/// Geo-location pretext head (Ayush et al.): `ReLU → Linear(projection.out, K)`
/// on the un-normalized projection, `geo.weight [K, P]`, `geo.bias [K]`.
/// `centroids` are the k-means cluster centres as unit 3-D vectors
/// (x, y, z on the sphere), one per class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeoHead {
    pub num_clusters: usize,
    #[serde(default)]
    pub centroids: Vec<[f64; 3]>,
}

/// Which kind of head (used in CLIs and ONNX metadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadKind {
    Embedding,
    Classifier,
    Segmentation,
    Geo,
    /// No head: the backbone's last feature map `[N, D, H/32, W/32]` (patch-level embeddings).
    Features,
}

impl HeadKind {
    pub fn name(self) -> &'static str {
        match self {
            HeadKind::Embedding => "embedding",
            HeadKind::Classifier => "classifier",
            HeadKind::Segmentation => "segmentation",
            HeadKind::Geo => "geo",
            HeadKind::Features => "features",
        }
    }
}

/// A head and its configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HeadSpec {
    Embedding(EmbeddingHead),
    Classifier(ClassifierHead),
    Segmentation(SegmentationHead),
    Geo(GeoHead),
}

impl HeadSpec {
    pub fn kind(&self) -> HeadKind {
        match self {
            HeadSpec::Embedding(_) => HeadKind::Embedding,
            HeadSpec::Classifier(_) => HeadKind::Classifier,
            HeadSpec::Segmentation(_) => HeadKind::Segmentation,
            HeadSpec::Geo(_) => HeadKind::Geo,
        }
    }

    /// The head's parameters for a backbone of feature width `feature_dim`;
    /// `projection_out` is the embedding projection width that the geo head reads.
    pub fn parameters(&self, feature_dim: usize, projection_out: Option<usize>) -> Vec<ParamSpec> {
        let mut p = Vec::new();
        match self {
            HeadSpec::Embedding(e) => {
                if let Some(proj) = e.projection {
                    linear(&mut p, "proj.0", proj.hidden, feature_dim);
                    linear(&mut p, "proj.2", proj.out, proj.hidden);
                }
            }
            HeadSpec::Classifier(c) => linear(&mut p, "fc", c.num_classes, feature_dim),
            HeadSpec::Segmentation(s) => {
                conv(&mut p, "seg.0", s.hidden, feature_dim, 3);
                bn(&mut p, "seg.1", s.hidden);
                conv(&mut p, "seg.4", s.num_classes, s.hidden, 1);
                p.push(ParamSpec::new("seg.4.bias".into(), vec![s.num_classes], ParamRole::Bias));
            }
            HeadSpec::Geo(g) => linear(&mut p, "geo", g.num_clusters, projection_out.unwrap_or(feature_dim)),
        }
        p
    }
}
