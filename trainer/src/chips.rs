//! Tiling georeferenced GeoTIFF scenes into training chips with a manifest.
//!
//! Any band count and sample type (a 13-band uint16 Sentinel-2 scene as well as an 8-bit RGB one): the
//! scene is read window by window through `geossl_raster` (the decoder and window grid that
//! `geossl-serve embed` uses), and each chip keeps its samples as stored. Chips are PNG for 8-bit RGB
//! scenes (what image tools and the loader's fast path expect) and GeoTIFF otherwise — keeping the
//! bands, their names, the sample type, the nodata value and the georeference (the window's own origin).
//!
//! Each chip's latitude/longitude is its centre. Its `location_id` is that centre rounded to 1e-5°, so
//! co-registered scenes of the same place on different dates share location ids — which is what temporal
//! positives pair.

use std::path::{Path, PathBuf};

use geossl_models::SampleType;
use geossl_raster::{nodata_fraction, write_geotiff, GeoTiffMeta, GeorefError, Raster, RasterError, WindowGrid};

use crate::data::{write_manifest, DataError, Sample};

/// Why scenes could not be cut into chips.
#[derive(Debug, thiserror::Error)]
pub enum ChipsError {
    /// A scene that cannot be read, or a chip that cannot be written.
    #[error(transparent)]
    Raster(#[from] RasterError),
    #[error(transparent)]
    Georef(#[from] GeorefError),
    #[error(transparent)]
    Manifest(#[from] DataError),
    /// Options or scenes that cannot be cut (sizes, formats, no chip left).
    #[error("{0}")]
    Invalid(String),
}

impl From<String> for ChipsError {
    fn from(m: String) -> Self {
        ChipsError::Invalid(m)
    }
}

pub use geossl_raster::read_georef;

/// The file format of chips.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ChipFormat {
    /// PNG for 8-bit RGB scenes, GeoTIFF for everything else.
    #[default]
    Auto,
    /// PNG (8-bit RGB scenes only).
    Png,
    /// GeoTIFF, whatever the scene.
    Tiff,
}

/// Options of [`tile_scene`].
#[derive(Debug, Clone)]
pub struct TileOptions {
    pub size: u32,
    pub stride: u32,
    /// Largest accepted fraction of nodata pixels in a chip (every band at the file's nodata value, or 0).
    pub max_nodata: f64,
    /// Acquisition time to record (ISO-8601), if known.
    pub timestamp: Option<String>,
    pub format: ChipFormat,
}

impl Default for TileOptions {
    fn default() -> Self {
        TileOptions { size: 224, stride: 224, max_nodata: 0.05, timestamp: None, format: ChipFormat::Auto }
    }
}

/// Cuts `scene` into chips written under `out`; returns them as manifest rows.
pub fn tile_scene(scene: &Path, out: &Path, opt: &TileOptions) -> Result<Vec<Sample>, ChipsError> {
    if opt.size < 8 || opt.stride == 0 {
        return Err(format!("chip size must be ≥ 8 and stride ≥ 1 (got {} and {})", opt.size, opt.stride).into());
    }
    if !(0.0..=1.0).contains(&opt.max_nodata) {
        return Err(format!("max nodata fraction {} (must be 0..=1)", opt.max_nodata).into());
    }
    let mut r = Raster::open(scene)?;
    let g = r.georef()?.clone();
    let info = r.info().clone();
    let size = opt.size as usize;
    if info.width < size || info.height < size {
        return Err(
            format!("{}: {}×{} is smaller than one {size} px chip", scene.display(), info.width, info.height).into()
        );
    }
    // Every band but an alpha channel, as stored.
    let bands: Vec<usize> = (0..info.bands - usize::from(info.alpha && info.bands > 1)).collect();
    if bands.len() < info.bands {
        tracing::info!(scene = %scene.display(), "alpha band dropped from the chips");
    }
    let rgb8 = bands.len() == 3 && info.sample_type == SampleType::U8;
    let png = match opt.format {
        ChipFormat::Auto => rgb8,
        ChipFormat::Png if rgb8 => true,
        ChipFormat::Png => {
            return Err(format!(
                "{}: PNG chips are for 8-bit RGB scenes; this one has {} band(s) of {} samples (use --format tiff)",
                scene.display(),
                bands.len(),
                info.sample_type
            )
            .into())
        }
        ChipFormat::Tiff => false,
    };
    let names: Vec<Option<String>> = bands.iter().map(|&b| info.band_names[b].clone()).collect();
    let stem = scene.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "scene".into());
    std::fs::create_dir_all(out).map_err(|source| RasterError::Io { file: out.display().to_string(), source })?;
    let grid = WindowGrid::new(info.width, info.height, size, size, opt.stride as usize)?;
    let mut chips = Vec::new();
    for (x0, y0) in grid.row_major() {
        let block = r.read_window(x0, y0, size, size, &bands)?;
        if nodata_fraction(&block, info.nodata) > opt.max_nodata {
            continue;
        }
        let half = size as f64 / 2.0;
        let (lat, lon) = g.to_latlon(x0 as f64 + half, y0 as f64 + half)?;
        let path = if png {
            let path = out.join(format!("{stem}_{y0}_{x0}.png"));
            write_png(&path, &block)?;
            path
        } else {
            let path = out.join(format!("{stem}_{y0}_{x0}.tif"));
            let window = g.window(x0 as f64, y0 as f64);
            let meta = GeoTiffMeta {
                georef: Some(&window),
                band_names: &names,
                nodata: info.nodata,
                datetime: info.datetime.as_deref(),
            };
            write_geotiff(&path, &block, &meta)?;
            path
        };
        chips.push(Sample {
            path,
            lat,
            lon,
            timestamp: opt.timestamp.clone(),
            location_id: format!("{lat:.5}_{lon:.5}"),
            label: None,
            crop: None,
        });
    }
    Ok(chips)
}

/// An 8-bit RGB planar block as a PNG.
fn write_png(path: &Path, block: &geossl_raster::Block) -> Result<(), ChipsError> {
    let geossl_raster::Samples::U8(px) = &block.samples else {
        return Err(format!("{}: PNG chips hold 8-bit samples", path.display()).into());
    };
    let n = block.width * block.height;
    let rgb: Vec<u8> = (0..n).flat_map(|i| [px[i], px[n + i], px[2 * n + i]]).collect();
    let img = image::RgbImage::from_raw(block.width as u32, block.height as u32, rgb)
        .ok_or_else(|| format!("{}: chip size", path.display()))?;
    img.save(path).map_err(|e| ChipsError::Invalid(format!("{}: {e}", path.display())))
}

/// Tiles several scenes into `out` and writes `out/manifest.csv`.
/// `timestamps` pairs with `scenes` (empty = unknown for all).
pub fn tile_scenes(
    scenes: &[PathBuf],
    timestamps: &[String],
    out: &Path,
    opt: &TileOptions,
) -> Result<(PathBuf, usize), ChipsError> {
    if !timestamps.is_empty() && timestamps.len() != scenes.len() {
        return Err(format!("{} timestamps for {} scenes", timestamps.len(), scenes.len()).into());
    }
    let mut all = Vec::new();
    for (i, s) in scenes.iter().enumerate() {
        let o = TileOptions { timestamp: timestamps.get(i).cloned().or(opt.timestamp.clone()), ..opt.clone() };
        let sub = out.join(format!("scene{i:03}"));
        all.extend(tile_scene(s, &sub, &o)?);
    }
    if all.is_empty() {
        return Err(ChipsError::Invalid("no chip passed the nodata filter".into()));
    }
    let n = all.len();
    Ok((write_manifest(&all, &out.join("manifest.csv"))?, n))
}
