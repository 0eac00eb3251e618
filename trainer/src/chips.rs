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

/// Where chips take their labels from.
#[derive(Debug, Clone, PartialEq)]
pub enum LabelSource {
    /// A class raster (band 1; any grid and CRS: each scene pixel looks up the class under its centre). A
    /// chip's label is the class most of its pixels have.
    Raster(PathBuf),
    /// GeoJSON polygons (WGS84, as GeoJSON is) with the class in property `field`: a chip's label is that of
    /// the polygon containing its centre.
    Polygons { path: PathBuf, field: String },
}

impl LabelSource {
    /// `.geojson`/`.json` files are polygons (their class in `field`), anything else a class raster.
    pub fn from_path(path: &Path, field: Option<&str>) -> Result<Self, ChipsError> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        match (ext.as_str(), field) {
            ("geojson" | "json", Some(f)) => Ok(LabelSource::Polygons { path: path.to_owned(), field: f.to_owned() }),
            ("geojson" | "json", None) => {
                Err(format!("{}: polygons need --label-field, the property that holds their class", path.display())
                    .into())
            }
            _ => Ok(LabelSource::Raster(path.to_owned())),
        }
    }
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
    /// Labels for the manifest's `label` column; chips without one are left out.
    pub labels: Option<LabelSource>,
    /// With a class raster: the least share of a chip's pixels its majority class must cover.
    pub min_label_share: f64,
}

impl Default for TileOptions {
    fn default() -> Self {
        TileOptions {
            size: 224,
            stride: 224,
            max_nodata: 0.05,
            timestamp: None,
            format: ChipFormat::Auto,
            labels: None,
            min_label_share: 0.5,
        }
    }
}

/// A class raster held in memory, read through its georeference.
struct ClassRaster {
    values: Vec<f64>,
    width: usize,
    height: usize,
    nodata: Option<f64>,
    georef: geossl_raster::Georef,
    /// The scene's grid is the class raster's: pixels correspond one to one.
    same_grid: bool,
}

/// A closed ring of (lon, lat) vertices.
type Ring = Vec<(f64, f64)>;

/// Polygons with their class.
struct ClassPolygons {
    /// (class, rings: the outer ring first, then holes) per polygon part.
    parts: Vec<(String, Vec<Ring>)>,
}

enum Labeller {
    Raster(ClassRaster),
    Polygons(ClassPolygons),
}

/// A class value as a label: integers without a fraction.
fn class_name(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

impl Labeller {
    fn open(src: &LabelSource, scene: &geossl_raster::Georef) -> Result<Self, ChipsError> {
        match src {
            LabelSource::Raster(path) => {
                let mut r = Raster::open(path)?;
                let info = r.info().clone();
                let georef = r.georef()?.clone();
                let block = r.read_window(0, 0, info.width, info.height, &[0])?;
                let values = (0..info.width * info.height).map(|i| block.samples.get(i)).collect();
                Ok(Labeller::Raster(ClassRaster {
                    values,
                    width: info.width,
                    height: info.height,
                    nodata: info.nodata,
                    same_grid: georef.same_grid(scene),
                    georef,
                }))
            }
            LabelSource::Polygons { path, field } => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ChipsError::Invalid(format!("{}: {e}", path.display())))?;
                Ok(Labeller::Polygons(
                    ClassPolygons::parse(&text, field)
                        .map_err(|e| ChipsError::Invalid(format!("{}: {e}", path.display())))?,
                ))
            }
        }
    }

    /// The label of the window at `(x0, y0)` of `size` pixels of the scene georeferenced by `scene`, or
    /// `None` (no class covers `min_share` of it, or no polygon holds its centre).
    fn label(
        &self,
        scene: &geossl_raster::Georef,
        x0: usize,
        y0: usize,
        size: usize,
        min_share: f64,
    ) -> Result<Option<String>, ChipsError> {
        match self {
            Labeller::Raster(c) => {
                let mut counts: Vec<(f64, usize)> = Vec::new();
                for y in y0..y0 + size {
                    for x in x0..x0 + size {
                        let (px, py) = if c.same_grid {
                            (x as f64 + 0.5, y as f64 + 0.5)
                        } else {
                            let (lat, lon) = scene.to_latlon(x as f64 + 0.5, y as f64 + 0.5)?;
                            c.georef.from_latlon(lat, lon)?
                        };
                        if px < 0.0 || py < 0.0 || px >= c.width as f64 || py >= c.height as f64 {
                            continue;
                        }
                        let v = c.values[py as usize * c.width + px as usize];
                        if !v.is_finite() || c.nodata == Some(v) {
                            continue;
                        }
                        match counts.iter_mut().find(|(k, _)| *k == v) {
                            Some(e) => e.1 += 1,
                            None => counts.push((v, 1)),
                        }
                    }
                }
                // The majority class; on a tie the smaller value.
                counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.total_cmp(&b.0)));
                Ok(counts
                    .first()
                    .filter(|(_, n)| *n as f64 >= min_share * (size * size) as f64)
                    .map(|(v, _)| class_name(*v)))
            }
            Labeller::Polygons(p) => {
                let half = size as f64 / 2.0;
                let (lat, lon) = scene.to_latlon(x0 as f64 + half, y0 as f64 + half)?;
                Ok(p.class_at(lon, lat))
            }
        }
    }
}

impl ClassPolygons {
    /// Polygons and multipolygons of a GeoJSON FeatureCollection (or one Feature) with their `field`.
    fn parse(text: &str, field: &str) -> Result<Self, String> {
        let doc: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let features = match doc["type"].as_str() {
            Some("FeatureCollection") => doc["features"].as_array().cloned().unwrap_or_default(),
            Some("Feature") => vec![doc.clone()],
            other => return Err(format!("a GeoJSON FeatureCollection or Feature was expected, not {other:?}")),
        };
        let ring = |r: &serde_json::Value| -> Option<Vec<(f64, f64)>> {
            r.as_array()?.iter().map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?))).collect()
        };
        let rings = |poly: &serde_json::Value| -> Option<Vec<Ring>> { poly.as_array()?.iter().map(ring).collect() };
        let mut parts = Vec::new();
        for (i, f) in features.iter().enumerate() {
            let class = match &f["properties"][field] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => class_name(n.as_f64().unwrap_or(f64::NAN)),
                serde_json::Value::Null => continue,
                other => return Err(format!("feature {i}: property {field:?} is {other}, not a class")),
            };
            let g = &f["geometry"];
            let polys = match g["type"].as_str() {
                Some("Polygon") => vec![rings(&g["coordinates"])],
                Some("MultiPolygon") => {
                    g["coordinates"].as_array().map(|a| a.iter().map(rings).collect()).unwrap_or_default()
                }
                Some(_) | None => continue,
            };
            for p in polys {
                parts.push((class.clone(), p.ok_or_else(|| format!("feature {i}: malformed coordinates"))?));
            }
        }
        if parts.is_empty() {
            return Err(format!("no polygon has the property {field:?}"));
        }
        Ok(ClassPolygons { parts })
    }

    /// The class of the first polygon that holds `(lon, lat)` (even-odd rule over its rings: holes excluded).
    fn class_at(&self, lon: f64, lat: f64) -> Option<String> {
        let crossings = |ring: &[(f64, f64)]| {
            let mut inside = false;
            for (a, b) in ring.iter().zip(ring.iter().cycle().skip(1)) {
                if (a.1 > lat) != (b.1 > lat) && lon < a.0 + (lat - a.1) / (b.1 - a.1) * (b.0 - a.0) {
                    inside = !inside;
                }
            }
            inside
        };
        self.parts
            .iter()
            .find(|(_, rings)| rings.iter().filter(|r| crossings(r)).count() % 2 == 1)
            .map(|(c, _)| c.clone())
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
    if !(0.0..=1.0).contains(&opt.min_label_share) {
        return Err(format!("minimum label share {} (must be 0..=1)", opt.min_label_share).into());
    }
    let labeller = opt.labels.as_ref().map(|src| Labeller::open(src, &g)).transpose()?;
    let mut chips = Vec::new();
    let mut unlabelled = 0usize;
    for (x0, y0) in grid.row_major() {
        let label = match &labeller {
            Some(l) => match l.label(&g, x0, y0, size, opt.min_label_share)? {
                Some(label) => Some(label),
                None => {
                    unlabelled += 1;
                    continue;
                }
            },
            None => None,
        };
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
            label,
            crop: None,
        });
    }
    if unlabelled > 0 {
        tracing::info!(scene = %scene.display(), "{unlabelled} window(s) without a label left out");
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
/// `timestamps` pairs with `scenes` (empty = unknown for all); so does `labels` (empty: `opt.labels`; one:
/// the same for every scene).
pub fn tile_scenes(
    scenes: &[PathBuf],
    timestamps: &[String],
    labels: &[LabelSource],
    out: &Path,
    opt: &TileOptions,
) -> Result<(PathBuf, usize), ChipsError> {
    if !timestamps.is_empty() && timestamps.len() != scenes.len() {
        return Err(format!("{} timestamps for {} scenes", timestamps.len(), scenes.len()).into());
    }
    if labels.len() > 1 && labels.len() != scenes.len() {
        return Err(
            format!("{} label sources for {} scenes (give one, or one per scene)", labels.len(), scenes.len()).into()
        );
    }
    let mut all = Vec::new();
    for (i, s) in scenes.iter().enumerate() {
        let label = labels.get(i).or(labels.first()).cloned().or(opt.labels.clone());
        let o = TileOptions {
            timestamp: timestamps.get(i).cloned().or(opt.timestamp.clone()),
            labels: label,
            ..opt.clone()
        };
        let sub = out.join(format!("scene{i:03}"));
        all.extend(tile_scene(s, &sub, &o)?);
    }
    if all.is_empty() {
        return Err(ChipsError::Invalid(
            if labels.is_empty() && opt.labels.is_none() {
                "no chip passed the nodata filter"
            } else {
                "no chip passed the nodata filter with a label (check that the labels cover the scenes)"
            }
            .into(),
        ));
    }
    let n = all.len();
    Ok((write_manifest(&all, &out.join("manifest.csv"))?, n))
}
