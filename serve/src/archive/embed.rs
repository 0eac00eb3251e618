//! Archive embedding: GeoTIFF scenes → windows of the model's input size →
//! embeddings → one GeoParquet file. Uses the same [`Backend`] contract as
//! the server.
//!
//! Rows (GeoParquet 1.1, geometry WKB in OGC:CRS84): `chip_id` (SHA-256 of
//! model hash + source + window), `source`, `window {x, y, w, h}` (pixels),
//! `geometry` (the window's footprint polygon), `center_lat`, `center_lon`,
//! `datetime` (TIFF DateTime tag, nullable), `model_name`, `model_version`,
//! `model_sha256`, `embedding` (`FixedSizeList<Float32, D>`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow_array::builder::{FixedSizeListBuilder, Float32Builder};
use arrow_array::{
    ArrayRef, BinaryArray, Float64Array, RecordBatch, StringArray, StructArray, TimestampMicrosecondArray, UInt32Array,
};
use arrow_schema::{DataType, Field, Fields, Schema, TimeUnit};

use geossl_raster::{hilbert_index, nodata_fraction, BandGroup, Georef, Raster, Samples, WindowGrid};

pub use crate::archive::inputs::{collect_inputs, Input};
use crate::archive::store::Location;

use crate::infer::backend::{Backend, ModelInfo, Task};
use crate::infer::ort::{OrtBackend, SessionOptions};

/// What to embed and how.
#[derive(Debug, Clone)]
pub struct EmbedOptions {
    pub model: PathBuf,
    /// Paths, directories, globs, object-store URLs or prefixes, STAC Items/ItemCollections.
    pub inputs: Vec<String>,
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
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub files: usize,
    pub skipped_files: Vec<String>,
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
            self.skipped_files.len()
        );
        if self.fetch_requests > 0 {
            s += &format!("; fetched {:.1} MB in {} requests", self.fetched_bytes as f64 / 1e6, self.fetch_requests);
        }
        s
    }
}

struct Row {
    source: String,
    window: [u32; 4],
    corners: Vec<(f64, f64)>, // (lon, lat), closed ring
    center: (f64, f64),       // (lat, lon)
    datetime: Option<i64>,
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

/// `[xmin, ymin, xmax, ymax]` of a ring of (lon, lat) points.
fn ring_bounds(ring: &[(f64, f64)]) -> [f64; 4] {
    ring.iter().fold([f64::INFINITY, f64::INFINITY, f64::NEG_INFINITY, f64::NEG_INFINITY], |b, &(x, y)| {
        [b[0].min(x), b[1].min(y), b[2].max(x), b[3].max(y)]
    })
}

/// OGC WKB (little endian) of a one-ring polygon.
pub fn wkb_polygon(ring: &[(f64, f64)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(13 + 16 * ring.len());
    b.push(1);
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&(ring.len() as u32).to_le_bytes());
    for (x, y) in ring {
        b.extend_from_slice(&x.to_le_bytes());
        b.extend_from_slice(&y.to_le_bytes());
    }
    b
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
fn open_scene(input: &Input, c: usize, info: &ModelInfo, band_override: Option<&[String]>) -> Result<Scene, String> {
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
        .map(|f| Raster::new(f.open()?, f.as_str().to_string()).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, String>>()?;
    if let Some(counts) = &r.band_counts {
        for (m, &n) in members.iter().zip(counts) {
            if m.info().bands != n {
                return Err(format!("{}: {} band(s); its STAC asset declares {n}", m.file(), m.info().bands));
            }
        }
    }
    let raster = BandGroup::new(&label, members, &r.file_band_names).map_err(|e| e.to_string())?;
    let georef = raster.georef().map_err(|e| e.to_string())?.clone();
    // The model's bands as the input fixes them (STAC), else by name where the files name their bands,
    // else by position.
    let bands = match (&r.bands, band_override) {
        (Some(b), _) => b.clone(),
        (None, Some(names)) => pick_bands(&raster, names, c).map_err(|e| format!("{label}: {e}"))?,
        (None, None) => raster.select_bands(&model_names).map_err(|e| e.to_string())?,
    };
    info.check_samples(raster.info().sample_type).map_err(|e| format!("{label}: {e}"))?;
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

/// What the reading thread sends: a batch of windows, or the end of a file.
enum Read {
    Batch(Vec<Row>, Samples),
    FileDone { label: String, windows: usize, nodata: usize },
    Skipped(String),
}

/// Reads every window of every file, nodata-filtered, in batches of
/// `opts.batch_size` (each batch within one file). A file that fails to open,
/// or whose window cannot be read or georeferenced (a truncated tile, say), is
/// reported as skipped and the run goes on with the next one (batches of its
/// earlier windows are already on their way).
fn read_windows(
    files: &[Input],
    opts: &EmbedOptions,
    info: &ModelInfo,
    [c, h, w, stride]: [usize; 4],
    tx: &std::sync::mpsc::SyncSender<Read>,
) -> Result<(), String> {
    'files: for file in files {
        let mut scene = match open_scene(file, c, info, opts.bands.as_deref()) {
            Ok(s) => s,
            Err(e) => {
                if tx.send(Read::Skipped(e)).is_err() {
                    return Ok(());
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
                let b = ring_bounds(ring);
                b[0] <= x1 && b[2] >= x0 && b[1] <= y1 && b[3] >= y0
            })
        };
        // A scene outside the box is not read (its outline: corners and edge midpoints).
        let (sw, sh) = (ri.width as f64, ri.height as f64);
        let outline: Result<Vec<(f64, f64)>, String> =
            [(0.0, 0.0), (0.5, 0.0), (1.0, 0.0), (1.0, 0.5), (1.0, 1.0), (0.5, 1.0), (0.0, 1.0), (0.0, 0.5)]
                .iter()
                .map(|&(fx, fy)| scene.georef.to_latlon(fx * sw, fy * sh).map(|(lat, lon)| (lon, lat)))
                .collect();
        if opts.bbox.is_some() && outline.is_ok_and(|o| !meets(&o)) {
            if tx.send(Read::FileDone { label: scene.label, windows: 0, nodata: 0 }).is_err() {
                return Ok(());
            }
            continue;
        }
        let (mut rows, mut px) = (Vec::new(), Samples::with_capacity(ri.sample_type, opts.batch_size * c * h * w));
        let (mut windows, mut nodata) = (0, 0);
        // Windows in Hilbert order; with a box, only those meeting it (nothing else is read or fetched).
        let grid = WindowGrid::new(ri.width, ri.height, w, h, stride).map_err(|e| e.to_string())?;
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
            let placed = g.footprint(xf, yf, wf, hf).and_then(|ring| {
                let win = scene.raster.read_window(x, y, w, h, &scene.bands).map_err(|e| e.to_string())?;
                if nodata_fraction(&win, ri.nodata) > opts.max_nodata {
                    return Ok(None);
                }
                Ok(Some((win, ring, g.to_latlon(xf + wf / 2.0, yf + hf / 2.0)?)))
            });
            let (win, corners, center) = match placed {
                Ok(Some(p)) => p,
                Ok(None) => {
                    nodata += 1;
                    continue;
                }
                Err(e) => {
                    let e = format!("{e} (window at {x}, {y}; {windows} earlier windows of {} embedded)", scene.label);
                    if tx.send(Read::Skipped(e)).is_err() {
                        return Ok(());
                    }
                    continue 'files;
                }
            };
            rows.push(Row {
                source: scene.source.clone(),
                window: [x as u32, y as u32, w as u32, h as u32],
                corners,
                center,
                datetime: scene.datetime,
            });
            px.extend_from(&win.samples);
            windows += 1;
            if rows.len() == opts.batch_size {
                let cap = px.len();
                let full = std::mem::replace(&mut px, Samples::with_capacity(ri.sample_type, cap));
                if tx.send(Read::Batch(std::mem::take(&mut rows), full)).is_err() {
                    return Ok(());
                }
            }
        }
        if !rows.is_empty() && tx.send(Read::Batch(rows, px)).is_err() {
            return Ok(());
        }
        if tx.send(Read::FileDone { label: scene.label, windows, nodata }).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Embeds every window of every input and writes the GeoParquet file
/// atomically (nothing is left at `out` on failure). A second thread reads
/// windows (decoding only the strips/tiles they touch) while the model embeds
/// the previous batch, and rows go to the file as they are made: memory holds
/// a few batches, the strips/tiles of the current windows and one row group,
/// however large the scenes and the archive.
pub fn run(opts: &EmbedOptions) -> Result<Summary, String> {
    if opts.batch_size == 0 || opts.batch_size > 4096 {
        return Err(format!("batch size {} (must be 1..=4096)", opts.batch_size));
    }
    if !(0.0..=1.0).contains(&opts.max_nodata) {
        return Err(format!("max nodata fraction {} (must be 0..=1)", opts.max_nodata));
    }
    let fetched0 = crate::archive::store::fetched();
    let files = match &opts.planned {
        Some(p) => p.clone(),
        None => collect_inputs(&opts.inputs, opts.band_groups)?,
    };
    let env = crate::infer::ort::init(&opts.ort_lib)?;
    let (mut backend, sig) = OrtBackend::load(env, &opts.model, &opts.session)?;
    // Rows are written in space-filling-curve order (inputs by centre, windows within each), so each
    // row group covers a compact area and readers filtering by the bbox covering skip the others. (After
    // the model loads: a bad model fails before any input header is read.)
    let files = spatial_order(&files);
    let model_bytes = std::fs::read(&opts.model).map_err(|e| format!("{}: {e}", opts.model.display()))?;
    let model_sha = geossl_models::sha256_hex(&model_bytes);
    drop(model_bytes);
    let parent =
        |n: usize| opts.model.ancestors().nth(n).and_then(|p| p.file_name()).map(|s| s.to_string_lossy().into_owned());
    let name = opts.model_name.clone().or_else(|| parent(2)).unwrap_or_else(|| "model".into());
    let version = opts.model_version.clone().or_else(|| parent(1)).unwrap_or_else(|| "1".into());
    let info = sig.into_info(&name, 1, None);
    // Throughput is timed from here: the model is loaded, the inputs are resolved.
    let started = Instant::now();
    if info.task != Task::Embedding {
        return Err(format!("{}: not an embedding model (outputs {:?})", opts.model.display(), info.outputs));
    }
    let (c, Some(h), Some(w)) = info.input_chw() else {
        return Err(format!("{}: the input size must be fixed for archive embedding", opts.model.display()));
    };
    let d = info.outputs[0].shape.get(1).copied().filter(|&d| d > 0).ok_or("embedding size is not fixed")? as usize;
    let stride = opts.stride.unwrap_or(h.min(w));
    if stride == 0 {
        return Err("stride must be at least 1".into());
    }
    if opts.row_group_rows == 0 {
        return Err("row group size must be at least 1".into());
    }
    let spec = info
        .metadata
        .get(geossl_models::io::metadata::SPEC)
        .and_then(|s| serde_json::from_str::<geossl_models::ModelSpec>(s).ok());
    let provenance = serde_json::json!({
        "software": format!("geossl {}", geossl_models::GEOSSL_VERSION),
        "model": { "name": name, "version": version, "sha256": model_sha, "file": opts.model.display().to_string() },
        "bands": info.bands,
        "band_selection": opts.bands,
        "sample_type": spec.as_ref().and_then(|s| s.sample_type),
        "normalization": spec.as_ref().map(|s| &s.normalization),
        "window": [h, w],
        "stride": stride,
        "max_nodata": opts.max_nodata,
        "bbox": opts.bbox,
        "inputs": files.len(),
    });
    let mut sink =
        GeoParquetSink::create(&opts.out, d, [&name, &version, &model_sha], &provenance, opts.row_group_rows)?;
    let mut summary = Summary::default();
    let progress = indicatif::ProgressBar::new(files.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} inputs · {msg} · ETA {eta}")
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
    );
    std::thread::scope(|s| -> Result<(), String> {
        let (tx, batches) = std::sync::mpsc::sync_channel(2);
        let (files, info_r) = (&files, &info);
        let reader = s.spawn(move || read_windows(files, opts, info_r, [c, h, w, stride], &tx));
        for msg in batches {
            match msg {
                Read::Batch(rows, px) => {
                    let input = info.input_from_samples([rows.len(), c, h, w], &px).map_err(|e| e.to_string())?;
                    let out = backend.infer(&input).map_err(|e| format!("inference failed: {e}"))?;
                    let emb = out[0].as_f32().ok_or("embedding is not float32")?;
                    sink.write(&rows, emb)?;
                    let secs = started.elapsed().as_secs_f64().max(1e-9);
                    progress.set_message(format!("{} chips · {:.1} chips/s", sink.rows, sink.rows as f64 / secs));
                }
                Read::FileDone { label, windows, nodata } => {
                    summary.files += 1;
                    summary.nodata_windows += nodata;
                    progress.inc(1);
                    progress.suspend(|| tracing::info!(file = %label, windows, "embedded"));
                }
                Read::Skipped(e) => {
                    progress.inc(1);
                    progress.suspend(|| tracing::warn!(error = %e, "skipped"));
                    summary.skipped_files.push(e);
                }
            }
        }
        reader.join().map_err(|_| "the reading thread panicked".to_string())?
    })?;
    if summary.files == 0 {
        return Err(format!("no input could be read: {}", summary.skipped_files.join("; ")));
    }
    progress.finish_and_clear();
    summary.rows = sink.rows;
    sink.finish()?;
    let fetched = crate::archive::store::fetched();
    summary.seconds = started.elapsed().as_secs_f64();
    summary.fetched_bytes = fetched.0 - fetched0.0;
    summary.fetch_requests = fetched.1 - fetched0.1;
    Ok(summary)
}

/// Default rows per Parquet row group: bounds the writer's memory (with D =
/// 2048, 8192 rows of embeddings are 64 MiB).
pub const ROW_GROUP_ROWS: usize = 8192;

/// The GeoParquet output (ZSTD, the `geo` and `geossl` provenance metadata in
/// both the Arrow schema and the file's key-value metadata), written as rows
/// come into a temporary file beside `out`; [`GeoParquetSink::finish`] syncs and
/// renames it to `out`. Dropped unfinished, it removes the temporary file and
/// leaves `out` as it was.
struct GeoParquetSink {
    writer: Option<parquet::arrow::ArrowWriter<std::fs::File>>,
    schema: Arc<Schema>,
    tmp: PathBuf,
    out: PathBuf,
    d: usize,
    /// Model name, version and SHA-256, recorded in every row.
    model: [String; 3],
    rows: usize,
}

fn bbox_fields() -> Fields {
    ["xmin", "ymin", "xmax", "ymax"].iter().map(|f| Field::new(*f, DataType::Float64, false)).collect::<Vec<_>>().into()
}

fn window_fields() -> Fields {
    ["x", "y", "w", "h"].iter().map(|f| Field::new(*f, DataType::UInt32, false)).collect::<Vec<_>>().into()
}

impl GeoParquetSink {
    fn create(
        out: &Path,
        d: usize,
        model: [&str; 3],
        provenance: &serde_json::Value,
        row_group_rows: usize,
    ) -> Result<Self, String> {
        use parquet::file::metadata::KeyValue;
        use parquet::file::properties::WriterProperties;
        let element = Arc::new(Field::new("element", DataType::Float32, false));
        // GeoParquet 1.1: WKB footprints in OGC:CRS84 and a bbox covering column, whose row-group
        // statistics let readers skip what lies outside their area.
        let geo = serde_json::json!({
            "version": "1.1.0",
            "primary_column": "geometry",
            "columns": { "geometry": {
                "encoding": "WKB",
                "geometry_types": ["Polygon"],
                "orientation": "counterclockwise",
                "covering": { "bbox": {
                    "xmin": ["bbox", "xmin"], "ymin": ["bbox", "ymin"],
                    "xmax": ["bbox", "xmax"], "ymax": ["bbox", "ymax"],
                } },
            } },
        });
        // In the Arrow schema (pyarrow, GeoPandas) and in the file's key-value metadata (GDAL, DuckDB).
        let meta = [("geo".to_string(), geo.to_string()), ("geossl".to_string(), provenance.to_string())];
        let schema = Arc::new(Schema::new_with_metadata(
            vec![
                Field::new("chip_id", DataType::Utf8, false),
                Field::new("source", DataType::Utf8, false),
                Field::new("window", DataType::Struct(window_fields()), false),
                Field::new("geometry", DataType::Binary, false),
                Field::new("bbox", DataType::Struct(bbox_fields()), false),
                Field::new("center_lat", DataType::Float64, false),
                Field::new("center_lon", DataType::Float64, false),
                Field::new("datetime", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true),
                Field::new("model_name", DataType::Utf8, false),
                Field::new("model_version", DataType::Utf8, false),
                Field::new("model_sha256", DataType::Utf8, false),
                Field::new("embedding", DataType::FixedSizeList(element, d as i32), false),
            ],
            meta.iter().cloned().collect::<std::collections::HashMap<String, String>>(),
        ));
        let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let tmp = dir.join(format!(
            ".{}.tmp-{}",
            out.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
            std::process::id()
        ));
        let f = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let props = WriterProperties::builder()
            .set_compression(parquet::basic::Compression::ZSTD(
                parquet::basic::ZstdLevel::try_new(3).map_err(parquet_err)?,
            ))
            .set_max_row_group_row_count(Some(row_group_rows))
            .set_key_value_metadata(Some(meta.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())).collect()))
            .build();
        let mut sink = Self {
            writer: None,
            schema: schema.clone(),
            tmp,
            out: out.to_path_buf(),
            d,
            model: model.map(str::to_string),
            rows: 0,
        };
        sink.writer = Some(parquet::arrow::ArrowWriter::try_new(f, schema, Some(props)).map_err(parquet_err)?);
        Ok(sink)
    }

    /// Appends `rows` with their embeddings (`rows.len() × D`, row-major).
    fn write(&mut self, rows: &[Row], embeddings: &[f32]) -> Result<(), String> {
        let (n, d) = (rows.len(), self.d);
        if embeddings.len() != n * d {
            return Err(format!("the model gave {} values for {n} rows of {d}", embeddings.len()));
        }
        let u32s = |k: usize| Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.window[k]))) as ArrayRef;
        let window = StructArray::new(window_fields(), vec![u32s(0), u32s(1), u32s(2), u32s(3)], None);
        let chip_ids = rows.iter().map(|r| {
            let key = format!("{}\n{}\n{:?}", self.model[2], r.source, r.window);
            geossl_models::sha256_hex(key.as_bytes())[..32].to_string()
        });
        let mut emb = FixedSizeListBuilder::with_capacity(Float32Builder::with_capacity(n * d), d as i32, n)
            .with_field(Arc::new(Field::new("element", DataType::Float32, false)));
        for row in embeddings.chunks(d) {
            emb.values().append_slice(row);
            emb.append(true);
        }
        // The covering: each footprint's bounding box in CRS84.
        let bounds: Vec<[f64; 4]> = rows.iter().map(|r| ring_bounds(&r.corners)).collect();
        let f64s = |k: usize| Arc::new(Float64Array::from_iter_values(bounds.iter().map(|b| b[k]))) as ArrayRef;
        let bbox = StructArray::new(bbox_fields(), vec![f64s(0), f64s(1), f64s(2), f64s(3)], None);
        let constant = |v: &str| Arc::new(StringArray::from(vec![v; n])) as ArrayRef;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(chip_ids)),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.source.as_str()))),
            Arc::new(window),
            Arc::new(BinaryArray::from_iter_values(rows.iter().map(|r| wkb_polygon(&r.corners)))),
            Arc::new(bbox),
            Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.center.0))),
            Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.center.1))),
            Arc::new(
                TimestampMicrosecondArray::from(rows.iter().map(|r| r.datetime).collect::<Vec<_>>())
                    .with_timezone("UTC"),
            ),
            constant(&self.model[0]),
            constant(&self.model[1]),
            constant(&self.model[2]),
            Arc::new(emb.finish()),
        ];
        let batch = RecordBatch::try_new(self.schema.clone(), columns).map_err(|e| format!("building rows: {e}"))?;
        self.writer.as_mut().ok_or("the output is already closed")?.write(&batch).map_err(parquet_err)?;
        self.rows += n;
        Ok(())
    }

    /// Closes the Parquet file, syncs and renames it to `out`.
    fn finish(mut self) -> Result<(), String> {
        let w = self.writer.take().ok_or("the output is already closed")?;
        let f = w.into_inner().map_err(parquet_err)?;
        f.sync_all().map_err(|e| format!("{}: {e}", self.tmp.display()))?;
        std::fs::rename(&self.tmp, &self.out).map_err(|e| format!("{}: {e}", self.out.display()))?;
        self.tmp = PathBuf::new(); // renamed: nothing to remove
        Ok(())
    }
}

impl Drop for GeoParquetSink {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            self.writer = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn parquet_err(e: parquet::errors::ParquetError) -> String {
    format!("parquet: {e}")
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

    #[test]
    fn wkb_polygon_layout() {
        let b = wkb_polygon(&[(0.0, 0.0), (1.0, 0.0), (0.0, 0.0)]);
        assert_eq!(b.len(), 1 + 4 + 4 + 4 + 3 * 16);
        assert_eq!(&b[..9], &[1, 3, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(f64::from_le_bytes(b[29..37].try_into().unwrap()), 1.0);
    }
}
