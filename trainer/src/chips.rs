//! Tiling GeoTIFF scenes into training chips with a manifest.
//!
//! Each chip's latitude/longitude is its centre, from the GeoTIFF's tiepoint
//! and pixel scale. Its `location_id` is that centre rounded to 1e-5°, so
//! co-registered scenes of the same place on different dates share location
//! ids — which is what temporal positives pair.

use std::path::{Path, PathBuf};

use crate::fixtures::{write_manifest, Chip};

pub use geossl_models::georef::read_georef;

/// Options of [`tile_scene`].
#[derive(Debug, Clone)]
pub struct TileOptions {
    pub size: u32,
    pub stride: u32,
    /// Largest accepted fraction of nodata (all-zero) pixels in a chip.
    pub max_nodata: f64,
    /// Acquisition time to record (ISO-8601), if known.
    pub timestamp: Option<String>,
}

/// Cuts `scene` into chips written as PNG under `out`; returns them.
pub fn tile_scene(scene: &Path, out: &Path, opt: &TileOptions) -> Result<Vec<Chip>, String> {
    if opt.size < 8 || opt.stride == 0 {
        return Err(format!("chip size must be ≥ 8 and stride ≥ 1 (got {} and {})", opt.size, opt.stride));
    }
    let g = read_georef(scene)?;
    let img = image::open(scene).map_err(|e| format!("{}: cannot decode: {e}", scene.display()))?;
    let (w, h) = (img.width(), img.height());
    if w < opt.size || h < opt.size {
        return Err(format!("{}: {w}×{h} is smaller than one {} px chip", scene.display(), opt.size));
    }
    let stem = scene.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "scene".into());
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let sixteen = matches!(
        img.color(),
        image::ColorType::L16 | image::ColorType::Rgb16 | image::ColorType::Rgba16 | image::ColorType::La16
    );
    let mut chips = Vec::new();
    for y0 in (0..=h - opt.size).step_by(opt.stride as usize) {
        for x0 in (0..=w - opt.size).step_by(opt.stride as usize) {
            let chip = img.crop_imm(x0, y0, opt.size, opt.size);
            let chip = if sixteen {
                image::DynamicImage::ImageRgb16(chip.to_rgb16())
            } else {
                image::DynamicImage::ImageRgb8(chip.to_rgb8())
            };
            let px = (opt.size * opt.size) as usize;
            let zeros = match &chip {
                image::DynamicImage::ImageRgb16(b) => b.pixels().filter(|p| p.0 == [0, 0, 0]).count(),
                other => other.to_rgb8().pixels().filter(|p| p.0 == [0, 0, 0]).count(),
            };
            if zeros as f64 > opt.max_nodata * px as f64 {
                continue;
            }
            let half = opt.size as f64 / 2.0;
            let (lat, lon) = g.to_latlon(x0 as f64 + half, y0 as f64 + half)?;
            let path = out.join(format!("{stem}_{y0}_{x0}.png"));
            chip.save(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            chips.push(Chip {
                path,
                lat,
                lon,
                timestamp: opt.timestamp.clone(),
                location_id: format!("{lat:.5}_{lon:.5}"),
                label: None,
            });
        }
    }
    Ok(chips)
}

/// Tiles several scenes into `out` and writes `out/manifest.csv`.
/// `timestamps` pairs with `scenes` (empty = unknown for all).
pub fn tile_scenes(
    scenes: &[PathBuf],
    timestamps: &[String],
    out: &Path,
    opt: &TileOptions,
) -> Result<(PathBuf, usize), String> {
    if !timestamps.is_empty() && timestamps.len() != scenes.len() {
        return Err(format!("{} timestamps for {} scenes", timestamps.len(), scenes.len()));
    }
    let mut all = Vec::new();
    for (i, s) in scenes.iter().enumerate() {
        let o = TileOptions { timestamp: timestamps.get(i).cloned().or(opt.timestamp.clone()), ..opt.clone() };
        let sub = out.join(format!("scene{i:03}"));
        all.extend(tile_scene(s, &sub, &o)?);
    }
    if all.is_empty() {
        return Err("no chip passed the nodata filter".into());
    }
    let n = all.len();
    Ok((write_manifest(&all, &out.join("manifest.csv"))?, n))
}
