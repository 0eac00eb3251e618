//! Input normalization: `x_norm[c] = (x[c] * scale + offset[c] - mean[c]) / std[c]`.
//!
//! `scale` and `offset` map stored values to physical units, the range the
//! statistics were computed in (1/255 for 8-bit RGB with ImageNet statistics;
//! 1/10000 for Sentinel-2 L1C digital numbers to reflectance, with offset −0.1
//! for L2A since baseline 04.00; 2.75e-5 and −0.2 for Landsat Collection 2 L2;
//! 1 for data that is already scaled). This is the one definition of
//! preprocessing: the trainer, the exporter's graph and the server all use
//! [`Normalization::affine`] or [`Normalization::physical`].

use serde::{Deserialize, Serialize};

/// Per-band normalization.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    /// Name of the preset this came from (`imagenet`, `identity`, `per_band`).
    pub preset: String,
    pub scale: f32,
    /// Per-band offset added after `scale` (empty = 0 for every band).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub offset: Vec<f32>,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Normalization {
    /// ImageNet RGB statistics for 8-bit input (torchvision's `Normalize`).
    pub fn imagenet() -> Self {
        Self {
            preset: "imagenet".into(),
            scale: 1.0 / 255.0,
            offset: Vec::new(),
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
        }
    }

    /// No change beyond `scale` (mean 0, std 1) for `bands` bands.
    pub fn identity(bands: usize, scale: f32) -> Self {
        Self { preset: "identity".into(), scale, offset: Vec::new(), mean: vec![0.0; bands], std: vec![1.0; bands] }
    }

    /// Per-band statistics measured on the user's own data (see [`BandStats`]).
    /// `mean`/`std` are in units of `value * scale`.
    pub fn per_band(scale: f32, mean: Vec<f32>, std: Vec<f32>) -> Self {
        Self { preset: "per_band".into(), scale, offset: Vec::new(), mean, std }
    }

    /// Look up a named preset for `bands` bands.
    pub fn preset(name: &str, bands: usize) -> Result<Self, crate::ContractError> {
        match name {
            "imagenet" if bands == 3 => Ok(Self::imagenet()),
            "imagenet" => Err(format!("the imagenet preset is for 3 RGB bands, not {bands}").into()),
            "identity" => Ok(Self::identity(bands, 1.0)),
            "identity_u8" => Ok(Self::identity(bands, 1.0 / 255.0)),
            other => Err(format!(
                "unknown normalization preset `{other}` (expected imagenet, identity, identity_u8, or per-band statistics)"
            ).into()),
        }
    }

    pub fn bands(&self) -> usize {
        self.mean.len()
    }

    /// Checks lengths and values; `bands` is the model's input channel count.
    pub fn validate(&self, bands: usize) -> Result<(), crate::ContractError> {
        if self.mean.len() != bands || self.std.len() != bands {
            return Err(format!(
                "normalization has {} means and {} stds for {bands} bands",
                self.mean.len(),
                self.std.len()
            )
            .into());
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(format!("normalization scale must be finite and > 0, got {}", self.scale).into());
        }
        if let Some((i, s)) = self.std.iter().enumerate().find(|(_, s)| !(s.is_finite() && **s > 0.0)) {
            return Err(format!("normalization std of band {i} must be finite and > 0, got {s}").into());
        }
        if !self.offset.is_empty() && self.offset.len() != bands {
            return Err(format!("normalization has {} offsets for {bands} bands", self.offset.len()).into());
        }
        if let Some((i, o)) = self.offset.iter().enumerate().find(|(_, o)| !o.is_finite()) {
            return Err(format!("normalization offset of band {i} must be finite, got {o}").into());
        }
        if let Some((i, m)) = self.mean.iter().enumerate().find(|(_, m)| !m.is_finite()) {
            return Err(format!("normalization mean of band {i} must be finite, got {m}").into());
        }
        Ok(())
    }

    /// The affine form `x_norm = x * mul[c] + add[c]`, handy for graph builders
    /// that fold normalization into one `Mul` + `Add`.
    /// In f64, so that callers computing in float32 round once.
    pub fn affine(&self) -> (Vec<f32>, Vec<f32>) {
        let (mul, add) = self.affine_f64();
        (mul.iter().map(|&v| v as f32).collect(), add.iter().map(|&v| v as f32).collect())
    }

    /// [`Normalization::affine`] in f64.
    pub fn affine_f64(&self) -> (Vec<f64>, Vec<f64>) {
        let offsets = self.offsets();
        let mul = self.std.iter().map(|&s| f64::from(self.scale) / f64::from(s)).collect();
        let add = (0..self.mean.len())
            .map(|c| (f64::from(offsets[c]) - f64::from(self.mean[c])) / f64::from(self.std[c]))
            .collect();
        (mul, add)
    }

    /// Stored value → physical units: `x * scale + offset[c]` as `(scale, offsets)`.
    pub fn physical(&self) -> (f32, Vec<f32>) {
        (self.scale, self.offsets())
    }

    /// Per-band offsets (zeros when none are set).
    pub fn offsets(&self) -> Vec<f32> {
        if self.offset.is_empty() {
            vec![0.0; self.mean.len()]
        } else {
            self.offset.clone()
        }
    }

    /// Normalize one stored value of band `c`.
    pub fn apply(&self, c: usize, x: f32) -> f32 {
        let o = self.offset.get(c).copied().unwrap_or(0.0);
        (x * self.scale + o - self.mean[c]) / self.std[c]
    }
}

/// Streaming per-band mean and standard deviation (Welford), for building a
/// [`Normalization::per_band`] from a user's archive.
#[derive(Debug, Clone)]
pub struct BandStats {
    n: Vec<u64>,
    mean: Vec<f64>,
    m2: Vec<f64>,
}

impl BandStats {
    pub fn new(bands: usize) -> Self {
        Self { n: vec![0; bands], mean: vec![0.0; bands], m2: vec![0.0; bands] }
    }

    /// Adds one value of band `c`; non-finite values (nodata) are ignored.
    pub fn push(&mut self, c: usize, x: f64) {
        if !x.is_finite() {
            return;
        }
        self.n[c] += 1;
        let d = x - self.mean[c];
        self.mean[c] += d / self.n[c] as f64;
        self.m2[c] += d * (x - self.mean[c]);
    }

    /// Values seen per band.
    pub fn counts(&self) -> &[u64] {
        &self.n
    }

    /// Per-band mean and population standard deviation, in the units pushed.
    pub fn finish(&self) -> (Vec<f32>, Vec<f32>) {
        let mean = self.mean.iter().map(|&m| m as f32).collect();
        let std = self
            .m2
            .iter()
            .zip(&self.n)
            .map(|(&m2, &n)| if n > 0 { (m2 / n as f64).sqrt() as f32 } else { 0.0 })
            .collect();
        (mean, std)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imagenet_matches_torchvision_normalize() {
        let n = Normalization::imagenet();
        // ToTensor (x/255) then Normalize(mean, std).
        let x = 200.0;
        assert!((n.apply(1, x) - (200.0 / 255.0 - 0.456) / 0.224).abs() < 1e-6);
        let (mul, add) = n.affine();
        assert!((x * mul[2] + add[2] - n.apply(2, x)).abs() < 1e-5);
    }

    #[test]
    fn validate_names_the_problem() {
        assert!(Normalization::imagenet().validate(3).is_ok());
        assert!(Normalization::imagenet().validate(4).unwrap_err().to_string().contains("4 bands"));
        let mut n = Normalization::identity(2, 1.0);
        n.std[1] = 0.0;
        assert!(n.validate(2).unwrap_err().to_string().contains("band 1"));
        assert!(Normalization::preset("imagenet", 13).is_err());
        assert!(Normalization::preset("nope", 3).unwrap_err().to_string().contains("nope"));
    }

    #[test]
    fn band_stats_match_direct_computation() {
        let xs = [1.0, 2.0, 4.0, 8.0, f64::NAN];
        let mut s = BandStats::new(2);
        for &x in &xs {
            s.push(0, x);
            s.push(1, 10.0);
        }
        let (m, sd) = s.finish();
        let direct_mean = 15.0 / 4.0;
        let direct_var = [1.0f64, 2.0, 4.0, 8.0].iter().map(|x| (x - direct_mean).powi(2)).sum::<f64>() / 4.0;
        assert!((m[0] as f64 - direct_mean).abs() < 1e-6);
        assert!((sd[0] as f64 - direct_var.sqrt()).abs() < 1e-6);
        assert_eq!(sd[1], 0.0);
        assert_eq!(s.counts(), &[4, 5]);
    }
}
