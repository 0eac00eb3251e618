//! Pretraining configuration (TOML). The four variants of the paper are
//! presets (`configs/<preset>.toml`, also built into the binary), never code edits.

use std::path::{Path, PathBuf};

use geossl_models::{Arch, Normalization};
use serde::{Deserialize, Serialize};

use crate::augment::AugConfig;
use crate::data::Format;

/// The presets shipped in `configs/` (also embedded in the binary).
pub const PRESETS: [(&str, &str); 5] = [
    ("moco", include_str!("../../configs/moco.toml")),
    ("moco-tp", include_str!("../../configs/moco-tp.toml")),
    ("moco-geo", include_str!("../../configs/moco-geo.toml")),
    ("moco-tp-geo", include_str!("../../configs/moco-tp-geo.toml")),
    ("quickstart", include_str!("../../configs/quickstart.toml")),
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainConfig {
    /// Name of the variant: `moco`, `moco-tp`, `moco-geo`, `moco-tp-geo` or a custom name.
    pub preset: String,
    pub model: ModelConfig,
    pub moco: MocoConfig,
    #[serde(default)]
    pub temporal: TemporalConfig,
    #[serde(default)]
    pub geo: GeoConfig,
    pub optim: OptimConfig,
    #[serde(default)]
    pub aug: AugConfig,
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub run: RunConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub arch: Arch,
    pub input_size: usize,
    /// Band names in channel order; `red`, `green`, `blue` enable the photometric augmentations.
    #[serde(default = "rgb")]
    pub bands: Vec<String>,
    /// How the training images store their samples: `uint8` (default), `uint16`
    /// (Sentinel-2/Landsat digital numbers), `int16`, `float32`, … — checked
    /// against the data and recorded in the spec, so that serving refuses other types.
    #[serde(default = "u8_samples")]
    pub sample_type: geossl_models::SampleType,
    /// `imagenet`, `identity`, `identity_u8`, or a table `{ scale, offset, mean, std }`
    /// (stored value × scale + offset[band] = physical units, in which mean/std are given).
    #[serde(default = "imagenet")]
    pub normalization: NormalizationConfig,
}

fn u8_samples() -> geossl_models::SampleType {
    geossl_models::SampleType::U8
}

fn rgb() -> Vec<String> {
    vec!["red".into(), "green".into(), "blue".into()]
}
fn imagenet() -> NormalizationConfig {
    NormalizationConfig::Preset("imagenet".into())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NormalizationConfig {
    Preset(String),
    PerBand {
        scale: f32,
        #[serde(default)]
        offset: Vec<f32>,
        mean: Vec<f32>,
        std: Vec<f32>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MocoConfig {
    /// Projection output width (128).
    pub dim: usize,
    /// Projection hidden width; default = backbone feature width.
    #[serde(default)]
    pub hidden: Option<usize>,
    /// Number of negatives K (65536); must be a multiple of the batch size.
    pub queue_size: usize,
    /// Key-encoder momentum m (0.999).
    pub momentum: f64,
    /// Softmax temperature (the paper's code: 0.02; MoCo-v2: 0.2).
    pub temperature: f64,
    /// The key batch is shuffled and encoded in this many sub-batches, each with its
    /// own batch-norm statistics (single-device stand-in for MoCo's shuffling BN).
    #[serde(default = "default_groups")]
    pub shuffle_bn_groups: usize,
}

fn default_groups() -> usize {
    8
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TemporalConfig {
    /// Key = another image of the same location at a different time.
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeoConfig {
    pub enabled: bool,
    /// k-means clusters on training lat/lon (100).
    pub clusters: usize,
    /// λ in InfoNCE + λ·CE.
    pub loss_weight: f64,
    pub kmeans_iters: usize,
}

impl Default for GeoConfig {
    fn default() -> Self {
        Self { enabled: false, clusters: 100, loss_weight: 1.0, kmeans_iters: 100 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Learning rate per 256 images: lr = base_lr × batch_size / 256.
    pub base_lr: f64,
    pub batch_size: usize,
    pub momentum: f64,
    pub weight_decay: f64,
    pub epochs: usize,
    /// Stop after this many steps (for smoke runs); default: epochs × steps per epoch.
    #[serde(default)]
    pub max_steps: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    pub format: Format,
    /// Manifest path (relative to the config file); `--data` overrides it.
    pub manifest: Option<PathBuf>,
    /// Decoded images kept in memory up to this many MiB (0 disables).
    pub cache_mib: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self { format: Format::Csv, manifest: None, cache_mib: 2048 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// `auto`, `cpu`, `cuda`, `cuda:N`.
    pub device: String,
    pub seed: u64,
    pub checkpoint_every: u64,
    pub log_every: u64,
    /// Every this many steps, the collapse and health measures of the queue's embeddings (std, effective
    /// rank, uniformity, mean cosine; see `health`) go to metrics.jsonl and the log; 0: never.
    pub health_every: u64,
    /// Loader threads decoding and cropping images.
    pub workers: usize,
    /// Batches prepared ahead per worker.
    pub prefetch: usize,
    /// Mixed precision on CUDA (libtorch autocast).
    pub amp: bool,
    /// Autocast type: `bf16` (default; no loss scaling) or `fp16` (dynamic loss scaling).
    pub amp_dtype: crate::amp::AmpDtype,
    /// On CUDA, keep convolution weights and inputs channels-last (NHWC), which
    /// cuDNN's tensor-core kernels prefer.
    pub channels_last: bool,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            device: "auto".into(),
            seed: 0,
            checkpoint_every: 500,
            log_every: 10,
            health_every: 100,
            workers: 4,
            prefetch: 2,
            amp: true,
            amp_dtype: crate::amp::AmpDtype::Bf16,
            channels_last: true,
        }
    }
}

/// Errors loading a config; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: {error}")]
    Parse { path: PathBuf, error: Box<toml::de::Error> },
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
}

impl PretrainConfig {
    /// Loads a config file, or a built-in preset when `name` is a preset name and no such file exists.
    /// Returns the config and its exact text (stored next to checkpoints and hashed).
    pub fn load(name: &Path) -> Result<(Self, String), ConfigError> {
        let text = match std::fs::read_to_string(name) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match PRESETS.iter().find(|(p, _)| Path::new(p) == name) {
                    Some((_, t)) => t.to_string(),
                    None => {
                        let names: Vec<&str> = PRESETS.iter().map(|(p, _)| *p).collect();
                        return Err(ConfigError::Io {
                            path: name.to_owned(),
                            error: std::io::Error::new(
                                e.kind(),
                                format!("no such file, and not a preset ({})", names.join(", ")),
                            ),
                        });
                    }
                }
            }
            Err(error) => return Err(ConfigError::Io { path: name.to_owned(), error }),
        };
        let mut cfg = Self::parse(&text, name)?;
        if let (Some(m), Some(dir)) = (&cfg.data.manifest, name.parent()) {
            if m.is_relative() && name.exists() {
                cfg.data.manifest = Some(dir.join(m));
            }
        }
        Ok((cfg, text))
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: Self =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_owned(), error: Box::new(e) })?;
        cfg.validate().map_err(|e| ConfigError::Invalid { path: path.to_owned(), msg: e.to_string() })?;
        Ok(cfg)
    }

    pub fn normalization(&self) -> Result<Normalization, geossl_models::ContractError> {
        match &self.model.normalization {
            NormalizationConfig::Preset(p) => Normalization::preset(p, self.model.bands.len()),
            NormalizationConfig::PerBand { scale, offset, mean, std } => {
                let mut n = Normalization::per_band(*scale, mean.clone(), std.clone());
                n.offset = offset.clone();
                n.validate(self.model.bands.len())?;
                Ok(n)
            }
        }
    }

    /// Learning rate after linear scaling.
    pub fn lr(&self) -> f64 {
        self.optim.base_lr * self.optim.batch_size as f64 / 256.0
    }

    pub fn validate(&self) -> Result<(), geossl_models::ContractError> {
        let b = self.optim.batch_size;
        if b < 2 {
            return Err(format!("optim.batch_size must be at least 2, got {b}").into());
        }
        if self.moco.queue_size == 0 || !self.moco.queue_size.is_multiple_of(b) {
            return Err(format!(
                "moco.queue_size ({}) must be a positive multiple of optim.batch_size ({b})",
                self.moco.queue_size
            )
            .into());
        }
        if !(0.0..1.0).contains(&self.moco.momentum) {
            return Err(format!("moco.momentum must be in [0, 1), got {}", self.moco.momentum).into());
        }
        if !(self.moco.temperature > 0.0 && self.moco.temperature.is_finite()) {
            return Err(format!("moco.temperature must be > 0, got {}", self.moco.temperature).into());
        }
        let g = self.moco.shuffle_bn_groups;
        if g == 0 || !b.is_multiple_of(g) || b / g < 2 {
            return Err(format!(
                "moco.shuffle_bn_groups ({g}) must divide optim.batch_size ({b}) into sub-batches of at least 2"
            )
            .into());
        }
        if self.model.input_size < 32 || self.model.input_size > 4096 {
            return Err(format!("model.input_size must be 32..=4096, got {}", self.model.input_size).into());
        }
        if self.optim.base_lr <= 0.0 || !self.optim.base_lr.is_finite() {
            return Err(format!("optim.base_lr must be > 0, got {}", self.optim.base_lr).into());
        }
        if self.optim.epochs == 0 {
            return Err("optim.epochs must be at least 1".into());
        }
        if self.geo.enabled && self.geo.clusters < 2 {
            return Err(format!("geo.clusters must be at least 2, got {}", self.geo.clusters).into());
        }
        if self.run.workers == 0 || self.run.checkpoint_every == 0 || self.run.log_every == 0 {
            return Err("run.workers, run.checkpoint_every and run.log_every must be at least 1".into());
        }
        self.normalization()?.validate(self.model.bands.len())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_load_with_the_papers_settings() {
        for (name, _) in PRESETS {
            let (c, text) = PretrainConfig::load(Path::new(name)).unwrap();
            assert_eq!(c.preset, name);
            assert!(!text.is_empty());
            if name == "quickstart" {
                continue;
            }
            assert_eq!(c.temporal.enabled, name.contains("tp"), "{name}");
            assert_eq!(c.geo.enabled, name.contains("geo"), "{name}");
            assert_eq!(c.aug.tp_resize.is_some(), name.contains("tp"), "{name}");
            assert_eq!(c.model.arch, Arch::Resnet50);
            assert_eq!((c.optim.batch_size, c.optim.epochs), (256, 200));
            assert_eq!((c.optim.base_lr, c.optim.momentum, c.optim.weight_decay), (0.03, 0.9, 1e-4));
            assert_eq!((c.moco.queue_size, c.moco.momentum, c.moco.dim), (65536, 0.999, 128));
            assert_eq!(c.geo.clusters, 100);
            assert_eq!(c.aug, AugConfig { tp_resize: c.aug.tp_resize, ..Default::default() });
        }
    }

    #[test]
    fn bad_configs_name_file_and_field() {
        let base = PRESETS[0].1;
        let p = Path::new("my.toml");
        let e = PretrainConfig::parse(&base.replace("queue_size = 65536", "queue_size = 1000"), p).unwrap_err();
        assert!(e.to_string().contains("my.toml") && e.to_string().contains("queue_size"), "{e}");
        let e = PretrainConfig::parse(&format!("{base}\n[bogus]\nx = 1\n"), p).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = PretrainConfig::parse(&base.replace("arch = \"resnet50\"", "arch = \"vgg\""), p).unwrap_err();
        assert!(e.to_string().contains("vgg"), "{e}");
        let e = PretrainConfig::load(Path::new("no-such-preset")).unwrap_err();
        assert!(e.to_string().contains("not a preset"), "{e}");
    }
}
