//! Archive embedding: scenes → windows of the model's input size → embeddings → GeoParquet rows
//! ([`crate::archive::geoparquet`]). Uses the same backend contract as the server.
//!
//! Failures are handled by their class ([`ArchiveError`]): an input that cannot be embedded is skipped and
//! named, and **none of its rows are kept** (its rows are held until its last window is embedded), so a
//! retry never duplicates a chip id; a run-level failure (credentials, a store unreachable through every
//! retry, the model, the output) stops the run, and the caller publishes nothing.

use std::path::PathBuf;
use std::time::Instant;

use geossl_raster::{hilbert_index, nodata_fraction, BandGroup, Georef, Raster, Samples, WindowGrid};

use crate::archive::error::ArchiveError;
pub use crate::archive::geoparquet::ROW_GROUP_ROWS;
use crate::archive::geoparquet::{Row, Sink};
pub use crate::archive::inputs::{collect_inputs, Input};
use crate::archive::store::Location;
use crate::infer::backend::OutputRole;
use crate::infer::ort::{OrtBackend, SessionOptions};
use crate::infer::{Backend, ModelInfo};

/// What to embed and how.
#[derive(Debug, Clone)]
pub struct EmbedOptions {
    /// The ONNX model, or a STAC MLM model card (`.json`) whose `mlm:model` asset is the ONNX file and
    /// whose input contract and output roles are used instead of the model's own metadata.
    pub model: PathBuf,
    /// Paths, directories, globs, object-store URLs or prefixes, STAC Items/ItemCollections.
    pub inputs: Vec<String>,
    /// The local file the GeoParquet rows are written to (a spool, published by the caller; removed on
    /// failure).
    pub out: PathBuf,
    /// Window step in pixels (default: the model's input size, no overlap).
    pub stride: Option<usize>,
    pub batch_size: usize,
    /// Largest fraction of nodata (all bands zero) pixels in a kept window.
    pub max_nodata: f64,
    pub session: SessionOptions,
    pub ort_lib: PathBuf,
    /// Each directory of GeoTIFFs is one input whose files are its bands (one file per band, as
    /// Sentinel-2 tiles and BigEarthNet patches ship them), instead of a folder to search.
    pub band_groups: bool,
    /// The files' bands to feed, by name (or 1-based number), in the model's channel order, instead of
    /// the model's own band names (e.g. `B04,B03,B02` for an RGB model on Sentinel-2 files).
    pub bands: Option<Vec<String>>,
    /// Rows per Parquet row group (readers skip whole row groups outside their area by the bbox
    /// column's statistics: smaller groups prune finer, larger ones compress better).
    pub row_group_rows: usize,
    /// Inputs already resolved (a shard of a plan), used instead of `inputs`.
    pub planned: Option<Vec<Input>>,
    /// Only windows whose footprint meets this box (`xmin, ymin, xmax, ymax` in lon/lat, CRS84) are read
    /// and embedded; scenes outside it are not read at all.
    pub bbox: Option<[f64; 4]>,
    /// Recorded in every row (default: the model file's parent directory names).
    pub model_name: Option<String>,
    pub model_version: Option<String>,
    /// How the embedding column stores values (float32, float16, or int8 with a per-row step).
    pub dtype: crate::archive::geoparquet::EmbeddingDtype,
    /// One row per window (`pooled`), or one per cell of the window's feature map (`spatial`).
    pub level: Level,
}

/// What a row embeds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// The window: the model's `embedding [N, D]` (`geossl-export onnx --head embed`).
    #[default]
    Pooled,
    /// Each cell of the window's feature grid, with the footprint of the cell around its receptive field's
    /// centre: the model's `feature_map [N, D, h, w]` (`geossl-export onnx --head features`; a ResNet's
    /// cell is 32 × 32 pixels, centred on the window's pixel (32·i, 32·j)).
    Spatial,
}

/// An input that could not be embedded (none of its rows were kept).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Failure {
    /// The input as planned (`Input::path`): what `--retry-failed` redoes.
    pub input: String,
    pub error: String,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub files: usize,
    pub failed: Vec<Failure>,
    pub rows: usize,
    pub nodata_windows: usize,
    /// Wall time of the run.
    pub seconds: f64,
    /// Bytes and requests fetched from object stores.
    pub fetched_bytes: u64,
    pub fetch_requests: u64,
}

impl Summary {
    /// One line for logs: rows, files, failures, chips/s, bytes fetched.
    pub fn line(&self) -> String {
        let mut s = format!(
            "{} rows from {} inputs in {:.1} s ({:.1} chips/s); {} windows over the nodata limit; {} inputs failed",
            self.rows,
            self.files,
            self.seconds,
            self.rows as f64 / self.seconds.max(1e-9),
            self.nodata_windows,
            self.failed.len()
        );
        if self.fetch_requests > 0 {
            s += &format!("; fetched {:.1} MB in {} requests", self.fetched_bytes as f64 / 1e6, self.fetch_requests);
        }
        s
    }
}

/// Parses "YYYY:MM:DD HH:MM:SS" (also with '-' in the date) to µs since 1970 UTC.
pub fn parse_tiff_datetime(s: &str) -> Option<i64> {
    let s = s.trim().trim_end_matches('\0');
    let (date, time) = s.split_once(' ')?;
    let d: Vec<i64> = date.split([':', '-']).map(|v| v.parse().ok()).collect::<Option<_>>()?;
    let t: Vec<i64> = time.split(':').map(|v| v.parse().ok()).collect::<Option<_>>()?;
    let ([y, m, day], [hh, mm, ss]) = (d.as_slice(), t.as_slice()) else { return None };
    if !(1..=12).contains(m) || !(1..=31).contains(day) || *hh > 23 || *mm > 59 || *ss > 60 {
        return None;
    }
    // Days from civil (H. Hinnant).
    let (y, m) = if *m <= 2 { (y - 1, m + 9) } else { (*y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400) + hh * 3600 + mm * 60 + ss) * 1_000_000)
}

/// One input scene, opened: header, georeference and date read; pixels are
/// read window by window.
struct Scene {
    /// The input as planned (for messages).
    label: String,
    /// Recorded in rows: the canonical path, URL, or STAC item.
    source: String,
    georef: Georef,
    raster: BandGroup<Box<dyn geossl_raster::Source + Send>>,
    bands: Vec<usize>,
    datetime: Option<i64>,
}

/// Opens and georeferences `input` for a model of `c` bands taking `info`'s
/// samples; the error names the file (or the band group and its member).
fn open_scene(
    input: &Input,
    c: usize,
    info: &ModelInfo,
    band_override: Option<&[String]>,
) -> Result<Scene, ArchiveError> {
    let label = input.path.clone();
    let model_names = geossl_raster::model_band_names(c, &info.bands);
    // STAC assets are picked by name: the --bands names where given as names, else the model's.
    let wanted = match band_override {
        Some(n) if n.iter().all(|b| b.parse::<usize>().is_err()) => n.to_vec(),
        _ => model_names.clone(),
    };
    let r = input.resolve(&wanted)?;
    let members = r
        .files
        .iter()
        .map(|f| {
            Raster::new(f.open().map_err(ArchiveError::reading)?, f.as_str().to_string()).map_err(ArchiveError::raster)
        })
        .collect::<Result<Vec<_>, ArchiveError>>()?;
    if let Some(counts) = &r.band_counts {
        for (m, &n) in members.iter().zip(counts) {
            if m.info().bands != n {
                return Err(ArchiveError::Input(format!(
                    "{}: {} band(s); its STAC asset declares {n}",
                    m.file(),
                    m.info().bands
                )));
            }
        }
    }
    let raster = BandGroup::new(&label, members, &r.file_band_names).map_err(ArchiveError::raster)?;
    let georef = raster.georef().map_err(ArchiveError::raster)?.clone();
    // The model's bands as the input fixes them (STAC), else by name where the files name their bands,
    // else by position.
    let bands = match (&r.bands, band_override) {
        (Some(b), _) => b.clone(),
        (None, Some(names)) => {
            pick_bands(&raster, names, c).map_err(|e| ArchiveError::Input(format!("{label}: {e}")))?
        }
        (None, None) => raster.select_bands(&model_names).map_err(ArchiveError::raster)?,
    };
    info.check_samples(raster.info().sample_type).map_err(|e| ArchiveError::Input(format!("{label}: {e}")))?;
    let datetime = r.datetime.or_else(|| raster.info().datetime.as_deref().and_then(parse_tiff_datetime));
    Ok(Scene { label, source: r.source, georef, raster, bands, datetime })
}

/// Where an input lies (lon, lat of its centre), for ordering: from its STAC
/// item, else from its first file's header (cached for the read that follows).
fn input_center(input: &Input) -> Option<(f64, f64)> {
    if let Some(c) = input.known_center() {
        return Some(c);
    }
    let f = Location::parse(input.files.first()?).ok()?;
    let r = Raster::new(f.open().ok()?, f.as_str().to_string()).ok()?;
    let (lat, lon) = r.georef().ok()?.to_latlon(r.info().width as f64 / 2.0, r.info().height as f64 / 2.0).ok()?;
    Some((lon, lat))
}

/// Inputs in Hilbert order of their centres on a lon/lat grid (unplaceable ones last, in plan order).
fn spatial_order(inputs: &[Input]) -> Vec<Input> {
    let key = |input: &Input| {
        input_center(input).map_or(u64::MAX, |(lon, lat)| {
            let q = |v: f64, lo: f64, span: f64| (((v - lo) / span).clamp(0.0, 1.0) * 65535.0) as u64;
            hilbert_index(16, q(lon, -180.0, 360.0), q(lat, -90.0, 180.0))
        })
    };
    // Headers are read by a few threads at once (remote ones are mostly waiting on the network; the header
    // cache keeps them for the embedding that follows).
    let threads = if inputs.iter().any(|i| i.files.iter().any(|f| crate::archive::store::is_url(f))) { 8 } else { 1 };
    let per = inputs.len().div_ceil(threads).max(1);
    let keys: Vec<u64> = std::thread::scope(|s| {
        let parts: Vec<_> = inputs
            .chunks(per)
            .map(|part| (part.len(), s.spawn(move || part.iter().map(key).collect::<Vec<_>>())))
            .collect();
        // A part whose thread failed keeps its inputs, unplaced (last).
        parts.into_iter().flat_map(|(n, p)| p.join().unwrap_or_else(|_| vec![u64::MAX; n])).collect()
    });
    let mut keyed: Vec<(u64, usize)> = keys.into_iter().zip(0..).collect();
    keyed.sort();
    keyed.into_iter().map(|(_, i)| inputs[i].clone()).collect()
}

/// `--bands`: each entry a band name of the files or a 1-based band number; as many as the model's channels.
fn pick_bands<R: geossl_raster::Source>(r: &BandGroup<R>, names: &[String], c: usize) -> Result<Vec<usize>, String> {
    if names.len() != c {
        return Err(format!("--bands names {} band(s); the model takes {c}", names.len()));
    }
    let n = r.info().bands;
    let mut out = Vec::with_capacity(c);
    for name in names {
        match name.parse::<usize>() {
            Ok(k) if (1..=n).contains(&k) => out.push(k - 1),
            Ok(k) => return Err(format!("band {k} does not exist (the files have {n}, numbered from 1)")),
            Err(_) => out.push(r.select_bands(std::slice::from_ref(name)).map_err(|e| e.to_string())?[0]),
        }
    }
    Ok(out)
}

/// Windows per prefetch burst, at least: at window k (a multiple of B), the strips/tiles of windows k+B..k+2B
/// are requested in the background (at the start, 0..2B). B spans about four tiles' windows (a 2 × 2 block of
/// the Hilbert walk, whose tiles pair up in the file), so nearby tiles go in one request.
const PREFETCH_WINDOWS: usize = 8;

/// What the reading thread sends, input by input: batches of an input's windows, then that input's end or
/// its failure.
enum Read {
    Batch(Vec<Row>, Samples),
    Done { label: String, windows: usize, nodata: usize },
    Failed { input: String, error: ArchiveError },
}

/// Reads every window of every file, nodata-filtered, in batches of `opts.batch_size` (each batch within
/// one file), then reports the file done. A file that fails to open, or whose window cannot be read or
/// georeferenced, is reported failed with its error's class: the embedding side drops the file's earlier
/// batches and, for a run-level failure, stops the run; reading stops there too.
fn read_windows(
    files: &[Input],
    opts: &EmbedOptions,
    info: &ModelInfo,
    [c, h, w, stride]: [usize; 4],
    feature_grid: Option<[usize; 2]>,
    tx: &std::sync::mpsc::SyncSender<Read>,
) {
    let fail = |input: &Input, error: ArchiveError| {
        let run_level = !error.is_input();
        tx.send(Read::Failed { input: input.path.clone(), error }).is_err() || run_level
    };
    'files: for file in files {
        let mut scene = match open_scene(file, c, info, opts.bands.as_deref()) {
            Ok(s) => s,
            Err(e) => {
                if fail(file, e) {
                    return;
                }
                continue;
            }
        };
        let ri = scene.raster.info().clone();
        if ri.height < h || ri.width < w {
            tracing::warn!(file = %scene.label, "smaller than one window; no rows");
        }
        let meets = |ring: &[(f64, f64)]| {
            opts.bbox.is_none_or(|[x0, y0, x1, y1]| {
                let b = crate::archive::geoparquet::ring_bounds(ring);
                b[0] <= x1 && b[2] >= x0 && b[1] <= y1 && b[3] >= y0
            })
        };
        // A scene outside the box is not read (its outline: corners and edge midpoints).
        let (sw, sh) = (ri.width as f64, ri.height as f64);
        let outline: Result<Vec<(f64, f64)>, geossl_raster::GeorefError> =
            [(0.0, 0.0), (0.5, 0.0), (1.0, 0.0), (1.0, 0.5), (1.0, 1.0), (0.5, 1.0), (0.0, 1.0), (0.0, 0.5)]
                .iter()
                .map(|&(fx, fy)| scene.georef.to_latlon(fx * sw, fy * sh).map(|(lat, lon)| (lon, lat)))
                .collect();
        if opts.bbox.is_some() && outline.is_ok_and(|o| !meets(&o)) {
            if tx.send(Read::Done { label: scene.label, windows: 0, nodata: 0 }).is_err() {
                return;
            }
            continue;
        }
        let (mut rows, mut px) = (Vec::new(), Samples::with_capacity(ri.sample_type, opts.batch_size * c * h * w));
        let (mut windows, mut nodata, mut in_batch) = (0, 0, 0usize);
        // Windows in Hilbert order; with a box, only those meeting it (nothing else is read or fetched).
        let grid = match WindowGrid::new(ri.width, ri.height, w, h, stride) {
            Ok(g) => g,
            Err(e) => {
                fail(file, ArchiveError::run(e));
                return;
            }
        };
        let order: Vec<(usize, usize)> = grid
            .hilbert()
            .into_iter()
            .filter(|&(x, y)| {
                opts.bbox.is_none()
                    || scene.georef.footprint(x as f64, y as f64, w as f64, h as f64).map_or(true, |r| meets(&r))
            })
            .collect();
        let per_tile = (ri.chunk_width / stride).max(1) * (ri.chunk_height.min(ri.chunk_width) / stride).max(1);
        let burst_len = (4 * per_tile).clamp(PREFETCH_WINDOWS, 256);
        for (k, &(x, y)) in order.iter().enumerate() {
            // Remote tiles are fetched a burst of windows ahead, while earlier windows decode, each burst's
            // nearby byte ranges in one request (a no-op for local files).
            if k % burst_len == 0 {
                let b = burst_len;
                let (from, to) = if k == 0 { (0, 2 * b) } else { (k + b, k + 2 * b) };
                let burst = &order[from.min(order.len())..to.min(order.len())];
                if !burst.is_empty() {
                    scene.raster.prefetch_windows(burst, w, h, &scene.bands);
                }
            }
            // Place, read, drop windows over the nodata limit (windows outside the box are not in `order`).
            let (xf, yf, wf, hf) = (x as f64, y as f64, w as f64, h as f64);
            let g = &scene.georef;
            let window = [x as u32, y as u32, w as u32, h as u32];
            let georef = |e: geossl_raster::GeorefError| ArchiveError::Input(e.to_string());
            let row = |corners, center, cell| Row {
                source: scene.source.clone(),
                window,
                corners,
                center,
                datetime: scene.datetime,
                cell,
            };
            let placed = g.footprint(xf, yf, wf, hf).map_err(georef).and_then(|ring| {
                let win = scene.raster.read_window(x, y, w, h, &scene.bands).map_err(ArchiveError::raster)?;
                if nodata_fraction(&win, ri.nodata) > opts.max_nodata {
                    return Ok(None);
                }
                let placed_rows = match feature_grid {
                    None => vec![row(ring, g.to_latlon(xf + wf / 2.0, yf + hf / 2.0).map_err(georef)?, None)],
                    // Patch-level: a row per cell (row-major, as the feature map is laid out). A cell's centre
                    // is its receptive field's: ResNet's padded stride-2 stages centre cell (i, j) on the
                    // window's pixel (s·i, s·j), s = 32 (measured: scripts/reference/receptive_field.py), i.e.
                    // at continuous coordinates (s·j + ½, s·i + ½); its footprint is the s × s box around that
                    // centre (so row and column 0 reach half a cell before the window).
                    Some([gh, gw]) => {
                        let (ch, cw) = (hf / gh as f64, wf / gw as f64);
                        (0..gh * gw)
                            .map(|k| {
                                let (i, j) = (k / gw, k % gw);
                                let (mx, my) = (xf + j as f64 * cw + 0.5, yf + i as f64 * ch + 0.5);
                                let corners = g.footprint(mx - cw / 2.0, my - ch / 2.0, cw, ch).map_err(georef)?;
                                Ok(row(corners, g.to_latlon(mx, my).map_err(georef)?, Some([i as u32, j as u32])))
                            })
                            .collect::<Result<Vec<_>, ArchiveError>>()?
                    }
                };
                Ok(Some((win, placed_rows)))
            });
            let (win, placed_rows) = match placed {
                Ok(Some(p)) => p,
                Ok(None) => {
                    nodata += 1;
                    continue;
                }
                Err(e) => {
                    let e = e.context(format!(
                        "{} (window at {x}, {y}; its {windows} earlier windows dropped)",
                        scene.label
                    ));
                    if fail(file, e) {
                        return;
                    }
                    continue 'files;
                }
            };
            rows.extend(placed_rows);
            px.extend_from(&win.samples);
            windows += 1;
            in_batch += 1;
            if in_batch == opts.batch_size {
                in_batch = 0;
                let cap = px.len();
                let full = std::mem::replace(&mut px, Samples::with_capacity(ri.sample_type, cap));
                if tx.send(Read::Batch(std::mem::take(&mut rows), full)).is_err() {
                    return;
                }
            }
        }
        if !rows.is_empty() && tx.send(Read::Batch(rows, px)).is_err() {
            return;
        }
        if tx.send(Read::Done { label: scene.label, windows, nodata }).is_err() {
            return;
        }
    }
}

/// Embeds every window of every input into GeoParquet rows at `opts.out` (a spool the caller publishes;
/// removed on failure). A second thread reads windows (decoding only the strips/tiles they touch) while the
/// model embeds the previous batch; an input's rows go to the file when its last window is embedded, so
/// memory holds a few batches, one input's rows and one row group, however large the archive.
///
/// Inputs that cannot be embedded are listed in the summary; a run-level failure is the error.
pub fn run(opts: &EmbedOptions) -> Result<Summary, ArchiveError> {
    let bad = |m: String| ArchiveError::Run(m);
    if opts.batch_size == 0 || opts.batch_size > 4096 {
        return Err(bad(format!("batch size {} (must be 1..=4096)", opts.batch_size)));
    }
    if !(0.0..=1.0).contains(&opts.max_nodata) {
        return Err(bad(format!("max nodata fraction {} (must be 0..=1)", opts.max_nodata)));
    }
    let fetched0 = crate::archive::store::fetched();
    let files = match &opts.planned {
        Some(p) => p.clone(),
        None => collect_inputs(&opts.inputs, opts.band_groups)?,
    };
    let env = crate::infer::ort::init(&opts.ort_lib).map_err(ArchiveError::run)?;
    // A model card names its model file; a plain ONNX file is its own contract.
    let (model_path, card) = if opts.model.extension().is_some_and(|e| e.eq_ignore_ascii_case("json")) {
        let (item, contract) = crate::infer::ort::read_card(&opts.model).map_err(ArchiveError::run)?;
        let path = geossl_models::mlm::resolve_href(&opts.model, &contract.model_href)
            .map_err(|e| bad(format!("{}: {e}", opts.model.display())))?;
        (path, Some((item, contract)))
    } else {
        (opts.model.clone(), None)
    };
    let (mut backend, sig) = OrtBackend::load(env, &model_path, &opts.session).map_err(ArchiveError::run)?;
    // Rows are written in space-filling-curve order (inputs by centre, windows within each), so each
    // row group covers a compact area and readers filtering by the bbox covering skip the others. (After
    // the model loads: a bad model fails before any input header is read.)
    let files = spatial_order(&files);
    let model_bytes = std::fs::read(&model_path).map_err(|e| bad(format!("{}: {e}", model_path.display())))?;
    let model_sha = geossl_models::sha256_hex(&model_bytes);
    drop(model_bytes);
    let parent =
        |n: usize| model_path.ancestors().nth(n).and_then(|p| p.file_name()).map(|s| s.to_string_lossy().into_owned());
    let name = opts
        .model_name
        .clone()
        .or_else(|| card.as_ref().map(|(_, c)| c.name.clone()))
        .or_else(|| parent(2))
        .unwrap_or_else(|| "model".into());
    let version = opts.model_version.clone().or_else(|| parent(1)).unwrap_or_else(|| "1".into());
    let info = sig.into_info(&name, 1, None, card.as_ref().map(|(_, c)| c)).map_err(ArchiveError::run)?;
    // Throughput is timed from here: the model is loaded, the inputs are resolved.
    let started = Instant::now();
    let role = match opts.level {
        Level::Pooled => OutputRole::Embedding,
        Level::Spatial => OutputRole::FeatureMap,
    };
    let embedding = match info.output_index(role) {
        Some(i) => i,
        None if opts.level == Level::Spatial => {
            return Err(bad(format!(
                "{}: --level spatial needs the backbone's feature map (`feature_map [N, D, h, w]`: export with \
                 geossl-export onnx --head features); outputs {:?}",
                model_path.display(),
                info.outputs.iter().map(|o| &o.name).collect::<Vec<_>>()
            )))
        }
        None => {
            return Err(bad(format!(
                "{}: not an embedding model: no output is the embedding (outputs {:?}; geossl's exports name it \
                 `embedding`; a model made elsewhere needs its STAC MLM model card, --model card.item.json, to say \
                 which output is the embedding and how its input is scaled)",
                model_path.display(),
                info.outputs.iter().map(|o| &o.name).collect::<Vec<_>>()
            )))
        }
    };
    let (c, Some(h), Some(w)) = info.input_chw() else {
        return Err(bad(format!("{}: the input size must be fixed for archive embedding", model_path.display())));
    };
    let out_shape = &info.outputs[embedding].shape;
    let d =
        out_shape.get(1).copied().filter(|&d| d > 0).ok_or_else(|| bad("embedding size is not fixed".into()))? as usize;
    // Patch-level: the feature grid, whose cells must tile the window.
    let grid = match opts.level {
        Level::Pooled => None,
        Level::Spatial => {
            let (gh, gw) = match out_shape.as_slice() {
                [_, _, gh, gw] if *gh > 0 && *gw > 0 => (*gh as usize, *gw as usize),
                s => return Err(bad(format!("the feature map's shape {s:?} is not [N, D, h, w] with h, w fixed"))),
            };
            if h % gh != 0 || w % gw != 0 {
                return Err(bad(format!(
                    "the model's {h}×{w} input is not a whole number of its {gh}×{gw} feature cells: export at a \
                     multiple of 32 pixels for patch-level rows"
                )));
            }
            Some([gh, gw])
        }
    };
    let stride = opts.stride.unwrap_or(h.min(w));
    if stride == 0 {
        return Err(bad("stride must be at least 1".into()));
    }
    if opts.row_group_rows == 0 {
        return Err(bad("row group size must be at least 1".into()));
    }
    let spec = info
        .metadata
        .get(geossl_models::io::metadata::SPEC)
        .and_then(|s| serde_json::from_str::<geossl_models::ModelSpec>(s).ok());
    let provenance = serde_json::json!({
        "software": format!("geossl {}", geossl_models::GEOSSL_VERSION),
        "model": {
            "name": name, "version": version, "sha256": model_sha, "file": model_path.display().to_string(),
            "card": card.as_ref().map(|_| opts.model.display().to_string()),
        },
        "bands": info.bands,
        "band_selection": opts.bands,
        "sample_type": info.sample_type,
        // The spec's normalization when the model carries it; a card's value scaling as the affine map
        // the embedder applied.
        "normalization": match (&card, &spec) {
            (Some((item, _)), _) => serde_json::json!({
                "value_scaling": item.properties.input.first().map(|i| &i.value_scaling),
                "affine": info.normalization,
            }),
            (None, Some(s)) => serde_json::json!(s.normalization),
            (None, None) => serde_json::Value::Null,
        },
        "window": [h, w],
        "stride": stride,
        "level": opts.level,
        "grid": grid,
        "cell": grid.map(|[gh, gw]| [h / gh, w / gw]),
        "max_nodata": opts.max_nodata,
        "bbox": opts.bbox,
        "inputs": files.len(),
        "embedding": {
            "dimensions": d,
            "dtype": opts.dtype,
            "quantization": (opts.dtype == crate::archive::geoparquet::EmbeddingDtype::Int8).then(|| serde_json::json!({
                "method": "per-row symmetric: value = q × embedding_scale, embedding_scale = max|x| / 127",
                "scale_column": crate::archive::geoparquet::col::EMBEDDING_SCALE,
            })),
        },
    });
    let mut sink = Sink::create(
        &opts.out,
        d,
        opts.dtype,
        grid.is_some(),
        [&name, &version, &model_sha],
        &provenance,
        opts.row_group_rows,
    )?;
    let mut summary = Summary::default();
    let progress = indicatif::ProgressBar::new(files.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} inputs · {msg} · ETA {eta}")
            .map_err(|e| bad(e.to_string()))?
            .progress_chars("=> "),
    );
    std::thread::scope(|s| -> Result<(), ArchiveError> {
        let (tx, batches) = std::sync::mpsc::sync_channel(2);
        let (files, info_r) = (&files, &info);
        let reader = s.spawn(move || read_windows(files, opts, info_r, [c, h, w, stride], grid, &tx));
        // The current input's rows and embeddings, written when it is done, dropped when it fails.
        let (mut rows_held, mut emb_held): (Vec<Row>, Vec<f32>) = (Vec::new(), Vec::new());
        let mut embedded = 0usize;
        let run = (|| {
            for msg in &batches {
                match msg {
                    Read::Batch(rows, px) => {
                        let n = px.len() / (c * h * w);
                        let input = info.input_from_samples([n, c, h, w], &px).map_err(ArchiveError::run)?;
                        let out = backend.infer(&input).map_err(|e| bad(format!("inference failed: {e}")))?;
                        let emb = out[embedding].as_f32().ok_or_else(|| bad("embedding is not float32".into()))?;
                        embedded += rows.len();
                        rows_held.extend(rows);
                        match grid {
                            None => emb_held.extend_from_slice(emb),
                            // [n, D, gh, gw] → one D-vector per cell, windows then cells row-major.
                            Some([gh, gw]) => {
                                let cells = gh * gw;
                                for win in emb.chunks_exact(d * cells) {
                                    for k in 0..cells {
                                        emb_held.extend((0..d).map(|ch| win[ch * cells + k]));
                                    }
                                }
                            }
                        }
                        let secs = started.elapsed().as_secs_f64().max(1e-9);
                        progress.set_message(format!("{embedded} chips · {:.1} chips/s", embedded as f64 / secs));
                    }
                    Read::Done { label, windows, nodata } => {
                        sink.write(&rows_held, &emb_held)?;
                        (rows_held, emb_held) = (Vec::new(), Vec::new());
                        summary.files += 1;
                        summary.nodata_windows += nodata;
                        progress.inc(1);
                        progress.suspend(|| tracing::info!(file = %label, windows, "embedded"));
                    }
                    Read::Failed { input, error } => {
                        progress.inc(1);
                        embedded -= rows_held.len();
                        (rows_held, emb_held) = (Vec::new(), Vec::new());
                        if !error.is_input() {
                            return Err(error);
                        }
                        progress.suspend(|| tracing::warn!(error = %error, "skipped"));
                        summary.failed.push(Failure { input, error: error.to_string() });
                    }
                }
            }
            Ok(())
        })();
        // Whatever ended the loop, the reader ends too: its sends fail once `batches` is gone.
        drop(batches);
        reader.join().map_err(|_| bad("the reading thread panicked".into()))?;
        run
    })?;
    progress.finish_and_clear();
    summary.rows = sink.rows;
    sink.finish()?;
    let fetched = crate::archive::store::fetched();
    summary.seconds = started.elapsed().as_secs_f64();
    summary.fetched_bytes = fetched.0 - fetched0.0;
    summary.fetch_requests = fetched.1 - fetched0.1;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiff_datetimes_parse_to_utc_micros() {
        assert_eq!(parse_tiff_datetime("1970:01:01 00:00:00"), Some(0));
        assert_eq!(parse_tiff_datetime("2000:03:01 00:00:01"), Some((951_868_800 + 1) * 1_000_000));
        assert_eq!(parse_tiff_datetime("2024-02-29 12:00:00\0"), Some(1_709_208_000 * 1_000_000));
        for bad in ["", "2020:13:01 00:00:00", "yesterday", "2020:01:01"] {
            assert_eq!(parse_tiff_datetime(bad), None, "{bad}");
        }
    }
}
