//! Per-band statistics of a manifest's images in physical units (stored value × scale + offset): the mean
//! and standard deviation a pretraining config's `[model.normalization]` needs (`geossl-train stats`).

use std::path::PathBuf;

use geossl_models::{BandStats, SampleType};

use crate::data::{read_manifest, Format};

/// What to measure.
#[derive(Debug, Clone)]
pub struct StatsOptions {
    /// A CSV manifest.
    pub manifest: PathBuf,
    pub bands: usize,
    /// Stored value × scale (+ offset) = physical units.
    pub scale: f32,
    /// Per-band offsets (empty = none).
    pub offset: Vec<f32>,
    /// A stored value marking missing pixels (skipped when every band has it); `None`: each file's own
    /// nodata value, where it declares one (GeoTIFF chips keep their scene's).
    pub nodata: Option<f64>,
    /// At most this many images, evenly spread over the manifest (0 = all).
    pub max_images: usize,
}

/// What was measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub images: usize,
    /// Images that could not be decoded (skipped, logged).
    pub unreadable: usize,
    /// Pixels counted per band.
    pub pixels: u64,
    pub sample_type: SampleType,
    pub scale: f32,
    pub offset: Vec<f32>,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Stats {
    /// The config's `[model]` sample type and `[model.normalization]` table, as TOML.
    pub fn config_toml(&self) -> String {
        let list = |v: &[f32]| v.iter().map(|x| format!("{x:.6}")).collect::<Vec<_>>().join(", ");
        let mut s = format!(
            "[model]\nsample_type = \"{}\"\n[model.normalization]\nscale = {}\n",
            self.sample_type.name(),
            self.scale
        );
        if !self.offset.is_empty() {
            s += &format!("offset = [{}]\n", list(&self.offset));
        }
        s += &format!("mean = [{}]\nstd = [{}]\n", list(&self.mean), list(&self.std));
        s
    }
}

/// Why band statistics cannot be derived.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error(transparent)]
    Manifest(#[from] crate::data::DataError),
    /// The images or options make statistics impossible; the message says which image, band or option.
    #[error("{0}")]
    Invalid(String),
}

/// The statistics of `o.manifest`'s images; the error says which image or band makes them impossible.
pub fn band_stats(o: &StatsOptions) -> Result<Stats, StatsError> {
    let samples = read_manifest(&o.manifest, Format::Csv)?;
    if !o.offset.is_empty() && o.offset.len() != o.bands {
        return Err(StatsError::Invalid(format!("--offset has {} values for {} bands", o.offset.len(), o.bands)));
    }
    let step = if o.max_images == 0 { 1 } else { samples.len().div_ceil(o.max_images).max(1) };
    let mut st = BandStats::new(o.bands);
    let (mut images, mut unreadable, mut stored) = (0usize, 0usize, None);
    for s in samples.iter().step_by(step) {
        let img = match crate::image_io::decode(&s.path, &crate::image_io::positional(o.bands)) {
            Ok(img) => img,
            Err(e) => {
                tracing::warn!("skipping unreadable image: {e}");
                unreadable += 1;
                continue;
            }
        };
        if *stored.get_or_insert(img.stored()) != img.stored() {
            return Err(StatsError::Invalid(format!(
                "{}: stores {} samples; earlier images store {:?}",
                s.path.display(),
                img.stored(),
                stored
            )));
        }
        let x = Vec::<f32>::try_from(img.tensor().flatten(0, -1))
            .map_err(|e| StatsError::Invalid(format!("{}: {e}", s.path.display())))?;
        let hw = img.h * img.w;
        let nodata = o.nodata.or(img.nodata);
        for i in 0..hw {
            if nodata.is_some_and(|nd| (0..o.bands).all(|c| f64::from(x[c * hw + i]) == nd)) {
                continue;
            }
            for c in 0..o.bands {
                let off = o.offset.get(c).copied().unwrap_or(0.0);
                st.push(c, f64::from(x[c * hw + i]) * f64::from(o.scale) + f64::from(off));
            }
        }
        images += 1;
    }
    if images == 0 {
        return Err(StatsError::Invalid(format!("{}: no readable image", o.manifest.display())));
    }
    let (mean, std) = st.finish();
    if let Some(c) = std.iter().position(|&s| s <= 0.0) {
        return Err(StatsError::Invalid(format!(
            "band {c} is constant over the images (std 0): no normalization can be derived"
        )));
    }
    Ok(Stats {
        images,
        unreadable,
        pixels: st.counts()[0],
        sample_type: stored.unwrap_or(SampleType::U8),
        scale: o.scale,
        offset: o.offset.clone(),
        mean,
        std,
    })
}
