//! Training sets cut from real imagery, for tests, benchmarks and reports.
//!
//! They read the committed fixtures (`tests/fixtures/`: `eolearn/`, `rasterio/`,
//! see its README for sources and licences): a 5-date Sentinel-2 series over
//! Slovenia and a Landsat 7 GeoTIFF over the Bahamas. User-facing commands never
//! need them.

use std::path::{Path, PathBuf};

use crate::data::{write_manifest, Sample};
use crate::npy::read_npy;

/// Why a fixture could not be made.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error(transparent)]
    Npy(#[from] crate::npy::NpyError),
    #[error(transparent)]
    Chips(#[from] crate::chips::ChipsError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Contract(#[from] geossl_models::ContractError),
    #[error("{0}")]
    Other(String),
}

impl From<String> for FixtureError {
    fn from(m: String) -> Self {
        FixtureError::Other(m)
    }
}

/// Dates of `REFERENCE_SCENES.npy`'s five acquisitions, by index.
pub const S2_DATES: [&str; 5] = ["2015-08-20", "2015-07-31", "2015-09-09", "2015-08-30", "2015-07-11"];
/// Centre of the Sentinel-2 patch.
pub const S2_CENTRE: (f64, f64) = (45.8705, 14.5578);

fn offset(lat: f64, lon: f64, dy_m: f64, dx_m: f64) -> (f64, f64) {
    (lat - dy_m / 111_320.0, lon + dx_m / (111_320.0 * lat.to_radians().cos()))
}

/// Sentinel-2 RGB chips of `side` pixels every `stride` pixels over the patch,
/// for all five dates (true colour, reflectance × 3.5 stretched to 8 bit).
/// Chips of one window on different dates share a `location_id`.
pub fn sentinel2_chips(data: &Path, out: &Path, side: usize, stride: usize) -> Result<Vec<Sample>, FixtureError> {
    let a = read_npy(&data.join("eolearn/REFERENCE_SCENES.npy"))?;
    if a.shape.len() != 4 || a.shape[3] != 13 {
        return Err(format!("unexpected Sentinel-2 array shape {:?}", a.shape).into());
    }
    let (t, h, w, c) = (a.shape[0], a.shape[1], a.shape[2], a.shape[3]);
    if side > h.min(w) || stride == 0 {
        return Err(format!("{side} px chips every {stride} px do not fit in {h}×{w}").into());
    }
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut chips = Vec::new();
    for (gy, y0) in (0..=h - side).step_by(stride).enumerate() {
        for (gx, x0) in (0..=w - side).step_by(stride).enumerate() {
            let (lat, lon) = offset(
                S2_CENTRE.0,
                S2_CENTRE.1,
                ((y0 + side / 2) as f64 - h as f64 / 2.0) * 10.0,
                ((x0 + side / 2) as f64 - w as f64 / 2.0) * 10.0,
            );
            for (ti, date) in S2_DATES.iter().enumerate().take(t) {
                let mut img = image::RgbImage::new(side as u32, side as u32);
                for y in 0..side {
                    for x in 0..side {
                        let base = ((ti * h + y0 + y) * w + x0 + x) * c;
                        let px = [3, 2, 1].map(|b| (a.data[base + b] * 3.5 * 255.0).clamp(0.0, 255.0) as u8);
                        img.put_pixel(x as u32, y as u32, image::Rgb(px));
                    }
                }
                let path = out.join(format!("s2_{gy}_{gx}_{date}.png"));
                img.save(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                chips.push(Sample {
                    path,
                    lat,
                    lon,
                    timestamp: Some(date.to_string()),
                    location_id: format!("s2_{gy}_{gx}"),
                    label: None,
                    crop: None,
                });
            }
        }
    }
    Ok(chips)
}

/// Land-cover names of the patch's `LULC.npy` codes (eo-learn's Slovenia example).
pub const LULC_NAMES: [(u32, &str); 6] =
    [(0, "no_data"), (1, "cultivated"), (2, "forest"), (3, "grassland"), (4, "shrubland"), (8, "artificial")];

/// [`sentinel2_chips`] labelled with the majority land-cover class of each
/// window (`TestEOPatch/mask_timeless/LULC.npy`, the same 101×100 grid).
pub fn sentinel2_landcover_chips(
    data: &Path,
    out: &Path,
    side: usize,
    stride: usize,
) -> Result<Vec<Sample>, FixtureError> {
    let lulc = read_npy(&data.join("eolearn/TestEOPatch/mask_timeless/LULC.npy"))?;
    let (h, w) = match lulc.shape[..] {
        [h, w, 1] => (h, w),
        _ => return Err(format!("unexpected LULC shape {:?}", lulc.shape).into()),
    };
    let mut chips = sentinel2_chips(data, out, side, stride)?;
    for c in &mut chips {
        // location_id is `s2_{gy}_{gx}`: window (gy, gx) starts at (gy·stride, gx·stride).
        let grid: Vec<usize> =
            c.location_id.trim_start_matches("s2_").split('_').filter_map(|v| v.parse().ok()).collect();
        let [gy, gx] = grid[..] else { return Err(format!("unexpected chip id {}", c.location_id).into()) };
        let (y0, x0) = (gy * stride, gx * stride);
        if y0 + side > h || x0 + side > w {
            return Err(format!("window {} is outside the {h}×{w} land-cover grid", c.location_id).into());
        }
        let mut counts = std::collections::BTreeMap::<u32, usize>::new();
        for y in y0..y0 + side {
            for x in x0..x0 + side {
                *counts.entry(lulc.data[y * w + x] as u32).or_default() += 1;
            }
        }
        // Most frequent class; ties go to the smaller code.
        let code = counts.into_iter().max_by_key(|&(code, n)| (n, std::cmp::Reverse(code))).map_or(0, |(c, _)| c);
        let name =
            LULC_NAMES.iter().find(|(c, _)| *c == code).map_or_else(|| format!("class_{code}"), |(_, n)| n.to_string());
        c.label = Some(name);
    }
    Ok(chips)
}

/// The mixed real set: Sentinel-2 chips (multi-date) + Landsat chips (single
/// date). (`cogeo.tif` is JPEG-in-TIFF YCbCr, which the `image` decoder does not read.) Writes `manifest.csv` in `out` and returns its path.
pub fn real_chips(data: &Path, out: &Path) -> Result<PathBuf, FixtureError> {
    let mut chips = sentinel2_chips(data, &out.join("s2"), 48, 50)?;
    // Landsat chips with their GeoTIFF georeference; the first 24 that are < 5 % nodata.
    let opt = crate::chips::TileOptions { size: 64, stride: 64, ..Default::default() };
    chips.extend(
        crate::chips::tile_scene(&data.join("rasterio/RGB.byte.tif"), &out.join("landsat"), &opt)?.into_iter().take(24),
    );
    Ok(write_manifest(&chips, &out.join("manifest.csv"))?)
}

/// A CPU-sized `moco` pretraining setup for tests (ResNet-18 at 32², queue 64, one shuffle-BN group,
/// temperature 0.2, batch 8) and its model spec.
pub fn tiny_moco() -> Result<(geossl_models::ModelSpec, crate::config::PretrainConfig), FixtureError> {
    let (mut cfg, _) = crate::config::PretrainConfig::load(Path::new("moco"))?;
    cfg.model.arch = geossl_models::Arch::Resnet18;
    cfg.model.input_size = 32;
    cfg.moco.queue_size = 64;
    cfg.moco.shuffle_bn_groups = 1;
    cfg.moco.temperature = 0.2;
    cfg.optim.batch_size = 8;
    let spec = crate::pretrain::run_spec(&cfg, None)?;
    Ok((spec, cfg))
}
