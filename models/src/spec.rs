//! `spec.json`: everything needed to rebuild a model from its weights.

use serde::{Deserialize, Serialize};

use crate::arch::{Arch, BackboneSpec};
use crate::heads::{HeadKind, HeadSpec};
use crate::norm::Normalization;
pub use crate::param::{ParamRole, ParamSpec};

/// Current `spec.json` format version.
pub const SPEC_FORMAT: u32 = 1;

/// Largest accepted band count (Sentinel-2 has 13; hyperspectral users may go further).
pub const MAX_BANDS: usize = 64;
/// Accepted input side lengths in pixels.
pub const MIN_INPUT: usize = 32;
pub const MAX_INPUT: usize = 8192;

/// How a checkpoint was trained (absent for imported weights).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TrainingInfo {
    /// `moco`, `moco-tp`, `moco-geo`, `moco-tp-geo`, `probe`, `finetune`, `import`, ...
    pub method: String,
    /// Name of the preset/config file used.
    #[serde(default)]
    pub preset: Option<String>,
    /// SHA-256 of the exact training config.
    #[serde(default)]
    pub config_sha256: Option<String>,
    /// Optimizer steps taken.
    #[serde(default)]
    pub step: u64,
    /// Free-form origin, e.g. the imported file's name and hash.
    #[serde(default)]
    pub source: Option<String>,
}

/// The contents of `spec.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub format: u32,
    pub backbone: BackboneSpec,
    /// Band names in channel order (`["red","green","blue"]`, `["B01",...,"B12"]`).
    pub bands: Vec<String>,
    /// Training/export input size `[H, W]`.
    pub input_size: [usize; 2],
    /// How the training data stored its samples (`uint8` for 8-bit imagery,
    /// `uint16` for Sentinel-2/Landsat digital numbers, …); `normalization`
    /// applies to values of this type. Absent in specs written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_type: Option<crate::sample::SampleType>,
    pub normalization: Normalization,
    #[serde(default)]
    pub heads: Vec<HeadSpec>,
    #[serde(default)]
    pub training: Option<TrainingInfo>,
}

impl ModelSpec {
    /// A headless RGB backbone with ImageNet normalization at `size × size`.
    pub fn rgb(arch: Arch, size: usize) -> Self {
        Self {
            format: SPEC_FORMAT,
            backbone: BackboneSpec::new(arch, 3),
            bands: vec!["red".into(), "green".into(), "blue".into()],
            input_size: [size, size],
            sample_type: Some(crate::sample::SampleType::U8),
            normalization: Normalization::imagenet(),
            heads: Vec::new(),
            training: None,
        }
    }

    /// The head of kind `kind`, if present.
    pub fn head(&self, kind: HeadKind) -> Option<&HeadSpec> {
        self.heads.iter().find(|h| h.kind() == kind)
    }

    /// Width of the embedding projection, when the embedding head has one.
    pub fn projection_out(&self) -> Option<usize> {
        match self.head(HeadKind::Embedding) {
            Some(HeadSpec::Embedding(e)) => e.projection.map(|p| p.out),
            _ => None,
        }
    }

    /// Every tensor of the state dict (`model.safetensors`): backbone in
    /// torchvision order, then heads in spec order.
    pub fn parameters(&self) -> Vec<ParamSpec> {
        let mut p = self.backbone.parameters();
        let d = self.backbone.feature_dim();
        let proj = self.projection_out();
        for h in &self.heads {
            p.extend(h.parameters(d, proj));
        }
        p
    }

    /// Checks internal consistency; the message names the offending field.
    pub fn validate(&self) -> Result<(), crate::ContractError> {
        if self.format != SPEC_FORMAT {
            return Err(
                format!("format {} is not supported (this geossl reads format {SPEC_FORMAT})", self.format).into()
            );
        }
        let c = self.backbone.in_channels;
        if c == 0 || c > MAX_BANDS {
            return Err(format!("backbone.in_channels must be 1..={MAX_BANDS}, got {c}").into());
        }
        if self.bands.len() != c {
            return Err(format!("bands lists {} names for in_channels = {c}", self.bands.len()).into());
        }
        for (i, s) in self.input_size.iter().enumerate() {
            if !(MIN_INPUT..=MAX_INPUT).contains(s) {
                return Err(format!("input_size[{i}] must be {MIN_INPUT}..={MAX_INPUT}, got {s}").into());
            }
        }
        self.normalization.validate(c)?;
        let mut seen = Vec::new();
        for h in &self.heads {
            let k = h.kind();
            if seen.contains(&k) {
                return Err(format!("two {} heads", k.name()).into());
            }
            seen.push(k);
            match h {
                HeadSpec::Embedding(e) => {
                    if let Some(p) = e.projection {
                        if p.hidden == 0 || p.out == 0 {
                            return Err("embedding projection widths must be > 0".into());
                        }
                    }
                }
                HeadSpec::Classifier(cl) => check_classes("classifier", cl.num_classes, &cl.labels)?,
                HeadSpec::Segmentation(s) => {
                    check_classes("segmentation", s.num_classes, &s.labels)?;
                    if s.hidden == 0 {
                        return Err("segmentation hidden width must be > 0".into());
                    }
                }
                HeadSpec::Geo(g) => {
                    if g.num_clusters < 2 {
                        return Err(format!("geo head needs at least 2 clusters, got {}", g.num_clusters).into());
                    }
                    if !g.centroids.is_empty() && g.centroids.len() != g.num_clusters {
                        return Err(format!(
                            "geo head has {} centroids for {} clusters",
                            g.centroids.len(),
                            g.num_clusters
                        )
                        .into());
                    }
                    if self.projection_out().is_none() {
                        return Err(
                            "the geo head reads the embedding projection: add an embedding head with a projection"
                                .into(),
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

fn check_classes(what: &str, k: usize, labels: &[String]) -> Result<(), crate::ContractError> {
    if k == 0 || k > 1_000_000 {
        return Err(format!("{what} num_classes must be 1..=1000000, got {k}").into());
    }
    if !labels.is_empty() && labels.len() != k {
        return Err(format!("{what} has {} labels for {k} classes", labels.len()).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EmbeddingHead, GeoHead, ProjectionSpec};

    #[test]
    fn json_round_trip_is_exact() {
        let mut s = ModelSpec::rgb(Arch::Resnet50, 224);
        s.heads.push(HeadSpec::Embedding(EmbeddingHead {
            projection: Some(ProjectionSpec::moco_v2(2048)),
            l2_normalize: true,
        }));
        s.heads.push(HeadSpec::Geo(GeoHead { num_clusters: 2, centroids: vec![[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]] }));
        s.training = Some(TrainingInfo { method: "moco-tp-geo".into(), step: 7, ..Default::default() });
        s.validate().unwrap();
        let j = serde_json::to_string_pretty(&s).unwrap();
        assert!(j.contains("\"arch\": \"resnet50\""));
        assert_eq!(serde_json::from_str::<ModelSpec>(&j).unwrap(), s);
        let names: Vec<_> = s.parameters().into_iter().map(|p| p.name).collect();
        assert!(names.ends_with(&[
            "proj.0.weight".into(),
            "proj.0.bias".into(),
            "proj.2.weight".into(),
            "proj.2.bias".into(),
            "geo.weight".into(),
            "geo.bias".into()
        ]));
    }

    #[test]
    fn validate_rejects_inconsistent_specs() {
        let mut s = ModelSpec::rgb(Arch::Resnet18, 224);
        s.backbone.in_channels = 4;
        assert!(s.validate().unwrap_err().to_string().contains("bands"));
        let mut s = ModelSpec::rgb(Arch::Resnet18, 224);
        s.input_size = [224, 100_000];
        assert!(s.validate().unwrap_err().to_string().contains("input_size[1]"));
        let mut s = ModelSpec::rgb(Arch::Resnet18, 224);
        s.heads.push(HeadSpec::Geo(GeoHead { num_clusters: 10, centroids: vec![] }));
        assert!(s.validate().unwrap_err().to_string().contains("projection"));
    }
}
