//! An index over a GeoParquet dataset of embeddings, and its build.
//!
//! Layout (a local directory or an object-storage prefix):
//! - `index.json` — the [`Manifest`]: the dataset's model (name, version, SHA-256) and plan hash, the
//!   dimension, level, quantization and HNSW parameters, and every indexed part with its rows' key range.
//!   Written last: an index is what its manifest says.
//! - `vectors.hnsw` — the HNSW graph and the vectors (cosine metric; stored as f32, f16 or i8, see
//!   [`super::hnsw`]), keyed by row number `0..rows`.
//! - `vectors.f32` — when the manifest says `rerank` (by default for i8 indexes): every vector in float32,
//!   read to re-score the graph's candidates ([`super::rerank`]).
//! - `rows-NNNNN.parquet` — per indexed part, its rows' metadata (the dataset's `chip_id`, `source`,
//!   `window`, `geometry`, `bbox`, `center_lat`, `center_lon`, `datetime`, `cell` columns) and `key`:
//!   itself a GeoParquet file.
//!
//! Building over a dataset that already has an index at `out` adds only the parts the manifest does not
//! list (a growing dataset is not rebuilt).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arrow_array::{Array, ArrayRef, BinaryArray, Float64Array, RecordBatch, StringArray, StructArray, UInt64Array};
use arrow_array::{TimestampMicrosecondArray, UInt32Array};
use arrow_schema::{DataType, Field, FieldRef, Schema};
use serde::{Deserialize, Serialize};

use super::hnsw::Graph;
use super::{rerank, simd, SearchError};
use crate::archive::geoparquet::{self, col};
use crate::archive::shard;
use crate::archive::store::Location;

/// The index format this build writes and reads (1: the vectors in a usearch file; 2: geossl's HNSW).
pub const FORMAT_VERSION: u32 = 2;
pub const MANIFEST: &str = "index.json";
pub const VECTORS: &str = "vectors.hnsw";
/// The rows files' key column: the row's key in `vectors.hnsw`.
pub const KEY: &str = "key";
/// The engine underneath, as recorded in manifests.
pub const ENGINE: &str = "geossl-hnsw 1";

/// The dataset's columns an index keeps for answers and filters (`cell` too, in patch-level datasets).
const META_COLUMNS: [&str; 8] =
    [col::CHIP_ID, col::SOURCE, col::WINDOW, col::GEOMETRY, col::BBOX, col::CENTER_LAT, col::CENTER_LON, col::DATETIME];

/// How the index stores vectors: f32 (4·D bytes a vector), f16 (2·D) or i8 (D; [`to_i8`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    #[default]
    F32,
    F16,
    I8,
}

/// The model a dataset's rows were made with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelId {
    pub name: String,
    pub version: String,
    pub sha256: String,
}

/// HNSW parameters: graph degree, and the candidate list lengths while adding and searching.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hnsw {
    pub connectivity: usize,
    pub expansion_add: usize,
    pub expansion_search: usize,
}

impl Default for Hnsw {
    /// Measured in docs/benchmarks/search.md.
    fn default() -> Self {
        Hnsw { connectivity: 16, expansion_add: 128, expansion_search: 256 }
    }
}

/// One indexed part of the dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedPart {
    /// The part's file name (its identity in the dataset: a part is added once).
    pub name: String,
    /// Where it was read.
    pub location: String,
    pub rows: usize,
    /// Its rows hold keys `first_key .. first_key + rows`.
    pub first_key: u64,
    /// Its rows' metadata in the index.
    pub rows_file: String,
}

/// `index.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub software: String,
    pub engine: String,
    /// The dataset the index was (last) built from.
    pub dataset: String,
    pub model: ModelId,
    /// The plan of a sharded dataset.
    pub plan_sha256: Option<String>,
    pub dimensions: usize,
    /// `pooled` (a row per window) or `spatial` (a row per cell of a window's feature grid).
    pub level: String,
    /// The dataset's stored embedding type (float32, float16, int8).
    pub embedding_dtype: String,
    /// Cosine similarity of L2-normalized vectors.
    pub metric: String,
    pub quantization: Quantization,
    /// Whether `vectors.f32` keeps every vector in float32 to re-score the graph's candidates
    /// ([`super::rerank`]; absent in indexes made before it: false).
    #[serde(default)]
    pub rerank: bool,
    pub hnsw: Hnsw,
    pub rows: usize,
    pub parts: Vec<IndexedPart>,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// A GeoParquet file, or a directory/prefix of parts (a sharded run's, by its success markers).
    pub dataset: String,
    /// The index directory or prefix.
    pub out: String,
    pub quantization: Quantization,
    /// Keep a float32 copy of the vectors to re-score the graph's candidates (`None`: for i8 indexes only).
    pub rerank: Option<bool>,
    pub hnsw: Hnsw,
    /// Threads adding vectors (0: all cores).
    pub threads: usize,
}

/// What a build did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BuildSummary {
    pub rows: usize,
    pub parts: usize,
    pub added_rows: usize,
    pub added_parts: Vec<String>,
    /// Seconds adding vectors to the graph (reading and writing excluded).
    pub graph_seconds: f64,
    pub seconds: f64,
    /// Bytes of `vectors.hnsw`.
    pub vector_file_bytes: u64,
}

/// A dataset's parts, in order, and its plan hash.
#[derive(Debug, Clone)]
pub struct DatasetParts {
    pub parts: Vec<(String, Location)>,
    pub plan_sha256: Option<String>,
}

/// The parts of `dataset`: one `.parquet` file; a sharded run's parts as its success markers list them (in
/// shard order; unfinished shards' files are not parts); else every `.parquet` file in the directory.
pub fn dataset_parts(dataset: &str) -> Result<DatasetParts, SearchError> {
    let at = Location::parse(dataset)?;
    if dataset.ends_with(".parquet") {
        return Ok(DatasetParts { parts: vec![(at.file_name(), at)], plan_sha256: None });
    }
    let mut markers = shard::markers(&at)?.into_iter().map(|(_, m)| m).collect::<Vec<_>>();
    if !markers.is_empty() {
        markers.sort_by_key(|m| m.shard_index);
        let plan = markers[0].plan_sha256.clone();
        if let Some(m) = markers.iter().find(|m| m.plan_sha256 != plan) {
            return Err(SearchError::Index(format!(
                "{dataset}: shard {} was made from another plan ({}) than shard {} ({plan})",
                m.shard_index, m.plan_sha256, markers[0].shard_index
            )));
        }
        let parts = markers.iter().flat_map(|m| m.part_names()).map(|n| (n.clone(), at.join(&n))).collect();
        return Ok(DatasetParts { parts, plan_sha256: Some(plan) });
    }
    let parts: Vec<(String, Location)> = if at.as_local().is_some_and(|p| !p.is_dir()) {
        Vec::new()
    } else {
        at.list()?
            .into_iter()
            .filter(|l| {
                let name = l.file_name();
                name.ends_with(".parquet") && !name.starts_with('.') && at.join(&name).as_str() == l.as_str()
            })
            .map(|l| (l.file_name(), l))
            .collect()
    };
    if parts.is_empty() {
        return Err(SearchError::Index(format!(
            "{dataset}: no GeoParquet embeddings here (give a .parquet file or a directory of them)"
        )));
    }
    Ok(DatasetParts { parts, plan_sha256: None })
}

/// What a part's footer says about its rows.
struct PartInfo {
    model: ModelId,
    dimensions: usize,
    level: String,
    dtype: String,
}

fn part_info(name: &str, provenance: Option<String>) -> Result<PartInfo, SearchError> {
    let p: serde_json::Value = provenance.and_then(|v| serde_json::from_str(&v).ok()).ok_or_else(|| {
        SearchError::Index(format!("{name}: no geossl provenance in the footer (not an embed output)"))
    })?;
    let s = |v: &serde_json::Value| v.as_str().map(str::to_string);
    let model = (|| {
        Some(ModelId {
            name: s(&p["model"]["name"])?,
            version: s(&p["model"]["version"])?,
            sha256: s(&p["model"]["sha256"])?,
        })
    })()
    .ok_or_else(|| SearchError::Index(format!("{name}: the footer names no model")))?;
    let dimensions = p["embedding"]["dimensions"]
        .as_u64()
        .ok_or_else(|| SearchError::Index(format!("{name}: the footer gives no embedding dimension")))?
        as usize;
    Ok(PartInfo {
        model,
        dimensions,
        level: s(&p["level"]).unwrap_or_else(|| "pooled".into()),
        dtype: s(&p["embedding"]["dtype"]).unwrap_or_else(|| "float32".into()),
    })
}

/// A vector in i8 as an i8 index stores it: `round(127 · x / max|x|)`, so the largest component is ±127 (the
/// cosine metric does not see a vector's scale). Dividing by the L2 norm instead would leave a
/// 512-dimensional vector (components ~0.04 of its norm) a handful of levels.
pub fn to_i8(x: &[f32]) -> Vec<i8> {
    let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if max == 0.0 {
        return vec![0; x.len()];
    }
    x.iter().map(|v| (v * 127.0 / max).round().clamp(-127.0, 127.0) as i8).collect()
}

/// `x` divided by its L2 norm (zero stays zero).
pub fn normalized(x: &[f32]) -> Vec<f32> {
    let norm = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt();
    if norm == 0.0 {
        return x.to_vec();
    }
    x.iter().map(|&v| (f64::from(v) / norm) as f32).collect()
}

fn engine_err<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> SearchError + '_ {
    move |e| SearchError::Index(format!("{what}: {e}"))
}

/// Reads the vectors file at `at` (into memory).
fn load_vectors(at: &Location) -> Result<Graph, SearchError> {
    let loaded = match at.as_local() {
        Some(p) => {
            let f = std::fs::File::open(p).map_err(|e| SearchError::Index(format!("{at}: no vectors file ({e})")))?;
            Graph::read(&mut std::io::BufReader::with_capacity(1 << 20, f))
        }
        None => {
            let bytes = at.read()?.ok_or_else(|| SearchError::Index(format!("{at}: no vectors file")))?;
            Graph::read(&mut &bytes[..])
        }
    };
    loaded.map_err(|e| SearchError::Index(format!("{at}: not a readable vector index: {e}")))
}

fn read_manifest(out: &Location) -> Result<Option<Manifest>, SearchError> {
    let at = out.join(MANIFEST);
    let Some(bytes) = at.read()? else { return Ok(None) };
    let m: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| SearchError::Index(format!("{at}: not a geossl index manifest: {e}")))?;
    if m.format != FORMAT_VERSION {
        return Err(SearchError::Index(format!(
            "{at}: index format {} (this geossl reads {FORMAT_VERSION}); rebuild it",
            m.format
        )));
    }
    Ok(Some(m))
}

/// The rows' metadata of `batch` (the dataset's columns) with `key` from `first_key`.
fn rows_batch(batch: &RecordBatch, first_key: u64, name: &str) -> Result<RecordBatch, SearchError> {
    let mut fields = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for c in META_COLUMNS.iter().chain(std::iter::once(&col::CELL)) {
        match batch.schema().column_with_name(c) {
            Some((i, f)) => {
                fields.push(f.clone());
                columns.push(batch.column(i).clone());
            }
            None if *c == col::CELL => {}
            None => return Err(SearchError::Index(format!("{name}: no `{c}` column"))),
        }
    }
    fields.push(Field::new(KEY, DataType::UInt64, false));
    columns.push(Arc::new(UInt64Array::from_iter_values(first_key..first_key + batch.num_rows() as u64)));
    let meta = [("geo".to_string(), geoparquet::geo_metadata().to_string())].into_iter().collect::<HashMap<_, _>>();
    RecordBatch::try_new(Arc::new(Schema::new_with_metadata(fields, meta)), columns)
        .map_err(|e| SearchError::Index(format!("{name}: {e}")))
}

/// Writes `batches` as a (GeoParquet) file at `path`.
fn write_parquet(path: &Path, batches: &[RecordBatch]) -> Result<(), SearchError> {
    use parquet::file::metadata::KeyValue;
    use parquet::file::properties::WriterProperties;
    let Some(first) = batches.first() else { return Err(SearchError::Index("no rows to write".into())) };
    let schema = first.schema();
    let kv = schema.metadata().iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())).collect();
    let props = WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
        .set_key_value_metadata(Some(kv))
        .build();
    let f = std::fs::File::create(path).map_err(|e| SearchError::Index(format!("{}: {e}", path.display())))?;
    let mut w = parquet::arrow::ArrowWriter::try_new(f, schema, Some(props)).map_err(SearchError::index)?;
    for b in batches {
        w.write(b).map_err(SearchError::index)?;
    }
    w.close().map_err(SearchError::index)?;
    Ok(())
}

/// Builds an index of `opts.dataset` at `opts.out`, or adds the dataset's new parts to the index there.
pub fn build(opts: &BuildOptions) -> Result<BuildSummary, SearchError> {
    let started = Instant::now();
    let out = Location::parse(&opts.out)?;
    if let Some(dir) = out.as_local() {
        std::fs::create_dir_all(dir).map_err(|e| SearchError::Index(format!("{}: {e}", dir.display())))?;
    }
    let dataset = dataset_parts(&opts.dataset)?;
    let existing = read_manifest(&out)?;
    let threads =
        if opts.threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { opts.threads };
    let (mut manifest, vectors) = match existing {
        Some(m) => {
            if m.quantization != opts.quantization {
                return Err(SearchError::Index(format!(
                    "{}: the index there stores {:?} vectors; this build asks for {:?} (build elsewhere, or keep its quantization)",
                    opts.out, m.quantization, opts.quantization
                )));
            }
            if opts.rerank.is_some_and(|r| r != m.rerank) {
                return Err(SearchError::Index(format!(
                    "{}: the index there {} a float32 copy for re-ranking; this build asks otherwise (build elsewhere, \
                     or keep its choice)",
                    opts.out,
                    if m.rerank { "keeps" } else { "has no" }
                )));
            }
            if let (Some(a), Some(b)) = (&m.plan_sha256, &dataset.plan_sha256) {
                if a != b {
                    tracing::warn!(index = %a, dataset = %b, "the dataset's plan differs from the indexed one's; adding its new parts");
                }
            }
            let mut v = load_vectors(&out.join(VECTORS))?;
            if v.len() > m.rows {
                tracing::warn!(index = %opts.out, vectors = v.len(), manifest = m.rows,
                    "the vectors file holds rows of a build that did not finish; dropping them");
                v.truncate(m.rows);
            }
            if v.len() != m.rows || v.dimensions() != m.dimensions {
                return Err(SearchError::Index(format!(
                    "{}: the vectors file holds {} vectors of {}; the manifest says {} of {}",
                    opts.out,
                    v.len(),
                    v.dimensions(),
                    m.rows,
                    m.dimensions
                )));
            }
            (m, Some(v))
        }
        None => {
            let (name, first) = &dataset.parts[0];
            let (_, provenance) = geoparquet::read_columns_with_provenance(first, &[col::CHIP_ID])?;
            let info = part_info(name, provenance)?;
            let m = Manifest {
                format: FORMAT_VERSION,
                software: format!("geossl {}", geossl_models::GEOSSL_VERSION),
                engine: ENGINE.into(),
                dataset: opts.dataset.clone(),
                model: info.model,
                plan_sha256: dataset.plan_sha256.clone(),
                dimensions: info.dimensions,
                level: info.level,
                embedding_dtype: info.dtype,
                metric: "cos".into(),
                quantization: opts.quantization,
                rerank: opts.rerank.unwrap_or(opts.quantization == Quantization::I8),
                hnsw: opts.hnsw,
                rows: 0,
                parts: Vec::new(),
            };
            (m, None)
        }
    };
    let mut vectors = match vectors {
        Some(v) => v,
        None => Graph::new(manifest.dimensions, manifest.quantization, manifest.hnsw.connectivity),
    };
    let known: std::collections::HashSet<String> = manifest.parts.iter().map(|p| p.name.clone()).collect();
    let new_parts: Vec<&(String, Location)> = dataset.parts.iter().filter(|(n, _)| !known.contains(n)).collect();
    let mut summary = BuildSummary {
        rows: manifest.rows,
        parts: manifest.parts.len(),
        added_rows: 0,
        added_parts: Vec::new(),
        graph_seconds: 0.0,
        seconds: 0.0,
        vector_file_bytes: 0,
    };
    if new_parts.is_empty() {
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    }
    let mut columns: Vec<&str> = META_COLUMNS.to_vec();
    columns.extend([col::CELL, col::EMBEDDING]);
    let mut published = Vec::new();
    let d = manifest.dimensions;
    let mut copy = match manifest.rerank {
        true => Some(rerank::Appender::open(&out.join(rerank::FILE), d, manifest.rows)?),
        false => None,
    };
    for (name, at) in new_parts {
        let (batches, provenance) = geoparquet::column_batches(at, &columns)?;
        let info = part_info(name, provenance)?;
        if info.model.sha256 != manifest.model.sha256 {
            return Err(SearchError::Index(format!(
                "{at}: made by model {} ({}); the index holds model {} ({})",
                info.model.name, info.model.sha256, manifest.model.name, manifest.model.sha256
            )));
        }
        if info.dimensions != d || info.level != manifest.level {
            return Err(SearchError::Index(format!(
                "{at}: {} {}-dimensional rows; the index holds {} {d}-dimensional rows",
                info.level, info.dimensions, manifest.level
            )));
        }
        let first_key = manifest.rows as u64;
        let mut key = first_key;
        let mut meta = Vec::new();
        let mut values = Vec::new();
        // A batch at a time: its embeddings are normalized into `values` and dropped.
        for b in batches {
            let b = &b?;
            let (emb, bd) = geoparquet::embedding_values(b, at.as_str())?;
            if bd != d {
                return Err(SearchError::Index(format!("{at}: {bd}-dimensional embeddings; the footer says {d}")));
            }
            if let Some(i) = emb.iter().position(|v| !v.is_finite()) {
                return Err(SearchError::Index(format!(
                    "{at}: row {} has a value that is not finite",
                    key as usize + i / d - first_key as usize
                )));
            }
            meta.push(rows_batch(b, key, at.as_str())?);
            for row in emb.chunks_exact(d) {
                values.extend(normalized(row));
            }
            key += b.num_rows() as u64;
        }
        let rows = (key - first_key) as usize;
        if rows == 0 {
            tracing::warn!(part = %at, "no rows; not indexed");
            continue;
        }
        let t = Instant::now();
        vectors.add(&values, threads, manifest.hnsw.expansion_add).map_err(engine_err("adding vectors"))?;
        summary.graph_seconds += t.elapsed().as_secs_f64();
        if let Some(c) = copy.as_mut() {
            c.push(&values)?;
        }
        let rows_file = format!("rows-{:05}.parquet", manifest.parts.len());
        let target = out.join(&rows_file);
        let spool = target.spool("index");
        write_parquet(&spool, &meta)?;
        target.publish(&spool)?;
        published.push(rows_file.clone());
        manifest.parts.push(IndexedPart {
            name: name.clone(),
            location: at.as_str().to_string(),
            rows,
            first_key,
            rows_file,
        });
        manifest.rows += rows;
        summary.added_rows += rows;
        summary.added_parts.push(name.clone());
        tracing::info!(part = %at, rows, "indexed");
    }
    manifest.dataset = opts.dataset.clone();
    let target = out.join(VECTORS);
    let spool = target.spool("index");
    let saved = std::fs::File::create(&spool).and_then(|f| {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        vectors.write(&mut w)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()
    });
    saved.map_err(|e| SearchError::Index(format!("{}: writing the vector index: {e}", spool.display())))?;
    summary.vector_file_bytes = std::fs::metadata(&spool).map(|m| m.len()).unwrap_or(0);
    target.publish(&spool)?;
    if let Some(c) = copy {
        c.finish()?;
    }
    let bytes = serde_json::to_vec_pretty(&manifest).map_err(SearchError::index)?;
    out.join(MANIFEST).write(&bytes, false)?;
    summary.rows = manifest.rows;
    summary.parts = manifest.parts.len();
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// One batch of a rows file in memory ([`geoparquet::BATCH_ROWS`] rows, keys `first_key..`): the columns
/// answers read that the index does not keep per key already, typed once when the index opens rather than
/// looked up by name for each answer. (The chip id, `source`, `bbox`, the centre and `datetime` are the
/// index's per-key vectors, which lookups and filters read: the rest of the batch is dropped as soon as it is
/// read, so that opening an index never holds a whole rows file's columns at once.)
#[derive(Debug)]
struct RowChunk {
    first_key: u64,
    /// The footprint, as WKB.
    geometry: BinaryArray,
    /// `window`'s `x`, `y`, `w`, `h`.
    window: [UInt32Array; 4],
    /// `cell`'s `row`, `col` (patch-level rows).
    cell: Option<[UInt32Array; 2]>,
}

/// An opened index: the vectors and every row's metadata, ready for queries (shared between threads).
pub struct Index {
    pub manifest: Manifest,
    pub location: String,
    pub(super) vectors: Graph,
    /// The float32 copy that re-scores the graph's candidates, when the index keeps one.
    pub(super) copy: Option<rerank::Vectors>,
    /// In key order.
    chunks: Vec<RowChunk>,
    /// The rows files' columns less `key` (the dataset's but the model's and the embedding): a GeoParquet
    /// answer's.
    row_fields: Vec<FieldRef>,
    /// Per key: its chip id's 128 bits (16 B a row, where the rows file's string and its offset took 40).
    chips: Vec<u128>,
    /// The keys in the order of their chip ids (ties by key): a chip id's key by binary search (4 B a row,
    /// where a hash map from chip id to key took ~52 at its load factor). Keys are the graph's `u32` ids.
    by_chip: Vec<u32>,
    /// Per key: `[xmin, ymin, xmax, ymax]` of the footprint, its datetime ([`NO_TIME`] when it has none: 8 B
    /// a row, where an `Option<i64>` takes 16), its source (into `sources`) and its centre (lon, lat).
    pub(super) bbox: Vec<[f64; 4]>,
    datetime: Vec<i64>,
    pub(super) source: Vec<u32>,
    pub(super) sources: Vec<String>,
    pub(super) center: Vec<(f64, f64)>,
    /// Admitted rows × dimensions at or below which a filtered query is answered by brute force.
    pub(super) exact_budget: usize,
    /// Candidates a graph search keeps (at least k): the manifest's `expansion_search` unless changed.
    pub(super) expansion: usize,
    /// Candidates re-scored by the float32 copy per answer asked for.
    pub(super) rerank_per_answer: usize,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index").field("location", &self.location).field("rows", &self.manifest.rows).finish()
    }
}

/// The 128 bits of a chip id given as 32 hex digits (either case; a query may capitalize it).
fn chip_key(id: &str) -> Option<u128> {
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| u128::from_str_radix(id, 16).ok()).flatten()
}

/// A row's datetime when it has none (a timestamp no dataset row may hold: refused when an index opens).
const NO_TIME: i64 = i64::MIN;

/// A chip id as the dataset wrote it: 32 lowercase hex digits (the first 128 bits of a SHA-256,
/// [`geoparquet::chip_id`]), rebuilt from the 128 bits the index keeps.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ChipId([u8; 32]);

impl ChipId {
    fn new(bits: u128) -> ChipId {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        ChipId(std::array::from_fn(|i| HEX[((bits >> (124 - 4 * i)) & 0xf) as usize]))
    }

    pub fn as_str(&self) -> &str {
        // Hex digits only: always UTF-8.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl AsRef<str> for ChipId {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for ChipId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl std::fmt::Debug for ChipId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl Serialize for ChipId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl Index {
    /// Opens the index at `location` (a directory or an object-storage prefix): its manifest, vectors and
    /// rows, checked against each other.
    pub fn open(location: &str) -> Result<Index, SearchError> {
        let at = Location::parse(location)?;
        let manifest = read_manifest(&at)?
            .ok_or_else(|| SearchError::Index(format!("{location}: no index here (no {MANIFEST})")))?;
        let mut vectors = load_vectors(&at.join(VECTORS))?;
        // Rows past the manifest's are a build's that did not finish: the index is what its manifest says.
        vectors.truncate(manifest.rows);
        if vectors.dimensions() != manifest.dimensions || vectors.len() != manifest.rows {
            return Err(SearchError::Index(format!(
                "{location}: the vectors file holds {} vectors of {}; the manifest says {} of {}",
                vectors.len(),
                vectors.dimensions(),
                manifest.rows,
                manifest.dimensions
            )));
        }
        let n = manifest.rows;
        let copy = match manifest.rerank {
            true => Some(rerank::Vectors::open(&at.join(rerank::FILE), manifest.dimensions, n)?),
            false => None,
        };
        let mut index = Index {
            location: location.to_string(),
            vectors,
            copy,
            chunks: Vec::new(),
            row_fields: Vec::new(),
            chips: Vec::with_capacity(n),
            by_chip: Vec::new(),
            bbox: Vec::with_capacity(n),
            datetime: Vec::with_capacity(n),
            source: Vec::with_capacity(n),
            sources: Vec::new(),
            center: Vec::with_capacity(n),
            exact_budget: super::query::EXACT_BUDGET,
            expansion: manifest.hnsw.expansion_search,
            rerank_per_answer: rerank::PER_ANSWER,
            manifest,
        };
        let mut source_ids: HashMap<String, u32> = HashMap::new();
        for p in index.manifest.parts.clone() {
            let file = at.join(&p.rows_file);
            let name = file.as_str().to_string();
            if p.first_key != index.bbox.len() as u64 {
                return Err(SearchError::Index(format!(
                    "{name}: starts at key {}, after {} rows",
                    p.first_key,
                    index.bbox.len()
                )));
            }
            let (batches, _) = geoparquet::column_batches(&file, &[&META_COLUMNS[..], &[col::CELL, KEY]].concat())?;
            let not_the_manifests = || {
                SearchError::Index(format!(
                    "{name}: its rows are not keys {}..{} as the manifest says",
                    p.first_key,
                    p.first_key + p.rows as u64
                ))
            };
            let mut next = p.first_key;
            for batch in batches {
                let batch = batch?;
                let first_key = next;
                let keys: &UInt64Array = geoparquet::column(&batch, KEY, &name)?;
                next += batch.num_rows() as u64;
                if next > p.first_key + p.rows as u64 || (0..keys.len()).any(|i| keys.value(i) != first_key + i as u64)
                {
                    return Err(not_the_manifests());
                }
                if batch.num_rows() > 0 {
                    index.add_rows(&batch, first_key, first_key - p.first_key, &name, &mut source_ids)?;
                }
            }
            if next == p.first_key && p.rows > 0 {
                return Err(SearchError::Index(format!("{name}: no rows; the manifest counts {}", p.rows)));
            }
            if next != p.first_key + p.rows as u64 {
                return Err(not_the_manifests());
            }
        }
        if index.bbox.len() != n {
            return Err(SearchError::Index(format!(
                "{location}: the rows files hold {} rows; the manifest counts {n}",
                index.bbox.len()
            )));
        }
        let rows = u32::try_from(n)
            .map_err(|_| SearchError::Index(format!("{location}: {n} rows; an index holds at most {}", u32::MAX)))?;
        let mut by_chip: Vec<u32> = (0..rows).collect();
        by_chip.sort_unstable_by_key(|&k| (index.chips[k as usize], k));
        index.by_chip = by_chip;
        Ok(index)
    }

    /// Takes in one batch of a rows file (`name`), keys `first_key..`, its first row the file's `row0`th:
    /// its rows' per-key values, and a chunk of the columns answers read.
    fn add_rows(
        &mut self,
        batch: &RecordBatch,
        first_key: u64,
        row0: u64,
        name: &str,
        source_ids: &mut HashMap<String, u32>,
    ) -> Result<(), SearchError> {
        let ids: &StringArray = geoparquet::column(batch, col::CHIP_ID, name)?;
        let src: &StringArray = geoparquet::column(batch, col::SOURCE, name)?;
        let dt: &TimestampMicrosecondArray = geoparquet::column(batch, col::DATETIME, name)?;
        let lat: &Float64Array = geoparquet::column(batch, col::CENTER_LAT, name)?;
        let lon: &Float64Array = geoparquet::column(batch, col::CENTER_LON, name)?;
        let bbox: &StructArray = geoparquet::column(batch, col::BBOX, name)?;
        let corner = |k: &str| -> Result<&Float64Array, SearchError> {
            bbox.column_by_name(k)
                .and_then(|c| c.as_any().downcast_ref::<Float64Array>())
                .ok_or_else(|| SearchError::Index(format!("{name}: column `bbox` has no `{k}`")))
        };
        let [x0, y0, x1, y1] = [corner("xmin")?, corner("ymin")?, corner("xmax")?, corner("ymax")?];
        for i in 0..batch.num_rows() {
            let id = ids.value(i);
            let chip = chip_key(id).filter(|&c| ChipId::new(c).as_str() == id).ok_or_else(|| {
                SearchError::Index(format!(
                    "{name}: row {}: chip id {id:?} is not 32 lowercase hex digits",
                    row0 + i as u64
                ))
            })?;
            self.chips.push(chip);
            let s = match source_ids.get(src.value(i)) {
                Some(&s) => s,
                None => {
                    let s = self.sources.len() as u32;
                    source_ids.insert(src.value(i).to_string(), s);
                    self.sources.push(src.value(i).to_string());
                    s
                }
            };
            self.source.push(s);
            self.datetime.push(match dt.is_valid(i) {
                false => NO_TIME,
                true if dt.value(i) == NO_TIME => {
                    return Err(SearchError::Index(format!(
                        "{name}: row {}: datetime {NO_TIME} µs is not a time",
                        row0 + i as u64
                    )))
                }
                true => dt.value(i),
            });
            self.center.push((lon.value(i), lat.value(i)));
            self.bbox.push([x0.value(i), y0.value(i), x1.value(i), y1.value(i)]);
        }
        let geometry: &BinaryArray = geoparquet::column(batch, col::GEOMETRY, name)?;
        let fields: Vec<FieldRef> = batch.schema().fields().iter().filter(|f| f.name() != KEY).cloned().collect();
        if self.chunks.is_empty() {
            self.row_fields = fields;
        } else if fields != self.row_fields {
            return Err(SearchError::Index(format!(
                "{name}: its columns are not those of the index's first rows file ({})",
                self.manifest.parts[0].rows_file
            )));
        }
        self.chunks.push(RowChunk {
            first_key,
            geometry: geometry.clone(),
            window: geoparquet::window_columns(batch, name)?.map(Clone::clone),
            cell: geoparquet::cell_columns(batch, name)?.map(|c| c.map(Clone::clone)),
        });
        Ok(())
    }

    /// With filtered queries answered by brute force when the filter admits at most `elements / D` rows
    /// (default [`super::query::EXACT_BUDGET`]; 0: always through the graph, unless it finds too few).
    pub fn with_exact_budget(mut self, elements: usize) -> Self {
        self.exact_budget = elements;
        self
    }

    /// With graph searches keeping `candidates` candidates (at least k): more is slower and finds more of
    /// the true nearest neighbours.
    pub fn with_expansion(mut self, candidates: usize) -> Self {
        self.expansion = candidates.max(1);
        self
    }

    /// With `per_answer` candidates re-scored by the float32 copy (when the index keeps one) for each answer
    /// asked for, at most the graph's expansion: more finds more of the true nearest neighbours.
    pub fn with_rerank(mut self, per_answer: usize) -> Self {
        self.rerank_per_answer = per_answer.max(1);
        self
    }

    /// The distance kernels this CPU runs (`avx2+fma`, or `portable`).
    pub fn acceleration(&self) -> String {
        self.vectors.simd().name().to_string()
    }

    /// Rows in the index.
    pub fn len(&self) -> usize {
        self.manifest.rows
    }

    pub fn is_empty(&self) -> bool {
        self.manifest.rows == 0
    }

    pub fn dimensions(&self) -> usize {
        self.manifest.dimensions
    }

    /// The key of a chip id.
    pub fn key_of(&self, chip_id: &str) -> Option<u64> {
        let c = chip_key(chip_id)?;
        // Each row's chip id is its own (a cell's names its cell); were one repeated, its last key answers.
        let end = self.by_chip.partition_point(|&k| self.chips[k as usize] <= c);
        let k = *self.by_chip.get(end.checked_sub(1)?)?;
        (self.chips[k as usize] == c).then_some(u64::from(k))
    }

    /// The unit vector of `key`: from the float32 copy when the index keeps one, else as the graph stores it
    /// (f16/i8 dequantized).
    pub fn vector(&self, key: u64) -> Result<Vec<f32>, SearchError> {
        if let Some(c) = &self.copy {
            return Ok(normalized(c.row(key)?));
        }
        let mut v = vec![0f32; self.dimensions()];
        self.stored(key, &mut v)?;
        Ok(normalized(&v))
    }

    /// Writes the stored vector of `key` (dequantized, not normalized) into `out` (`dimensions` long).
    pub(super) fn stored(&self, key: u64, out: &mut [f32]) -> Result<(), SearchError> {
        if key as usize >= self.vectors.len() || out.len() != self.dimensions() {
            return Err(SearchError::Index(format!("{}: no vector for key {key}", self.location)));
        }
        self.vectors.stored(key as usize, out);
        Ok(())
    }

    /// The graph's `count` nearest to the unit vector `q` among keys `filter` admits (all when `None`),
    /// keeping `max(count, expansion)` candidates: (key, cosine similarity), most similar first.
    pub(super) fn graph_search(
        &self,
        q: &[f32],
        count: usize,
        filter: Option<&dyn Fn(u64) -> bool>,
    ) -> Vec<(u64, f32)> {
        self.vectors.search(q, count, self.expansion, filter)
    }

    /// The chunk holding `key`, and its row there.
    fn chunk_of(&self, key: u64) -> (&RowChunk, usize) {
        let p = &self.chunks[self.chunks.partition_point(|p| p.first_key <= key).saturating_sub(1)];
        (p, (key - p.first_key) as usize)
    }

    /// Asks the CPU for what an answer reads of each of `keys`' rows, all at once, before it is read: the rows
    /// are random, so each of their ~12 cache lines is a miss, which reading row after row takes one at a time:
    /// a GeoJSON answer of ten after a search cost 17 / 20 µs so at 100k / 1M rows, 12 / 14 µs with this, 7 µs
    /// with every line in cache (docs/benchmarks/search.md). First the fixed-width values (the chip id among
    /// them) and the footprint's offset, then, once the offset arrives, the footprint's bytes.
    pub fn prefetch_rows(&self, keys: impl Iterator<Item = u64> + Clone) {
        for key in keys.clone() {
            let (p, i) = self.chunk_of(key);
            let k = key as usize;
            simd::prefetch(&self.center[k..]);
            simd::prefetch(&self.datetime[k..]);
            simd::prefetch(&self.chips[k..]);
            simd::prefetch(&self.source[k..]);
            for c in p.window.iter().chain(p.cell.iter().flatten()) {
                simd::prefetch(&c.values()[i..]);
            }
            simd::prefetch(&p.geometry.value_offsets()[i..]);
        }
        for key in keys {
            let (p, i) = self.chunk_of(key);
            let wkb = p.geometry.value(i);
            simd::prefetch(wkb);
            simd::prefetch(wkb.get(64..).unwrap_or_default());
        }
    }

    /// The footprint of `key` as WKB (a one-ring polygon, lon/lat).
    pub fn footprint_wkb(&self, key: u64) -> &[u8] {
        let (p, i) = self.chunk_of(key);
        p.geometry.value(i)
    }

    /// The footprint ring (lon, lat) of `key`.
    pub fn ring(&self, key: u64) -> Vec<(f64, f64)> {
        geoparquet::wkb_ring(self.footprint_wkb(key)).unwrap_or_default()
    }

    /// The chip id of `key`.
    pub fn chip_id(&self, key: u64) -> ChipId {
        ChipId::new(self.chips[key as usize])
    }

    /// The datetime of `key` (µs since the epoch), if it has one.
    pub fn datetime_of(&self, key: u64) -> Option<i64> {
        Some(self.datetime[key as usize]).filter(|&t| t != NO_TIME)
    }

    /// (lon, lat) of `key`'s centre.
    pub fn center_of(&self, key: u64) -> (f64, f64) {
        self.center[key as usize]
    }

    /// The source of `key`.
    pub fn source_of(&self, key: u64) -> &str {
        &self.sources[self.source[key as usize] as usize]
    }

    /// `[x, y, w, h]` of `key`'s window, and its cell for patch-level rows.
    pub fn window(&self, key: u64) -> ([u32; 4], Option<[u32; 2]>) {
        let (p, i) = self.chunk_of(key);
        (p.window.each_ref().map(|c| c.value(i)), p.cell.as_ref().map(|c| c.each_ref().map(|c| c.value(i))))
    }

    /// The rows `keys` as the index's row columns (`row_fields`: the dataset's but the model's and the
    /// embedding), each rebuilt from what the index keeps.
    pub(super) fn row_columns(&self, keys: &[u64]) -> Result<Vec<(FieldRef, ArrayRef)>, SearchError> {
        let f64s = |f: &dyn Fn(u64) -> f64| -> ArrayRef {
            Arc::new(Float64Array::from_iter_values(keys.iter().map(|&k| f(k))))
        };
        let u32s = |f: &dyn Fn(u64) -> u32| -> ArrayRef {
            Arc::new(UInt32Array::from_iter_values(keys.iter().map(|&k| f(k))))
        };
        // A struct column, each of its fields (by name) from `child`.
        let structure = |field: &Field, child: &dyn Fn(&str) -> Option<ArrayRef>| -> Result<ArrayRef, SearchError> {
            let unknown =
                |what: &str| SearchError::Index(format!("{}: column `{}` {what}", self.location, field.name()));
            let DataType::Struct(fields) = field.data_type() else { return Err(unknown("is not a struct")) };
            let children = fields
                .iter()
                .map(|f| {
                    child(f.name())
                        .ok_or_else(|| unknown(&format!("has a field `{}` the index does not keep", f.name())))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Arc::new(StructArray::try_new(fields.clone(), children, None).map_err(SearchError::index)?))
        };
        let at = |names: &[&str], name: &str| names.iter().position(|n| *n == name);
        let window = |name: &str| at(&["x", "y", "w", "h"], name).map(|i| u32s(&|k| self.window(k).0[i]));
        let cell = |name: &str| at(&["row", "col"], name).map(|i| u32s(&|k| self.window(k).1.map_or(0, |c| c[i])));
        let bbox =
            |name: &str| at(&["xmin", "ymin", "xmax", "ymax"], name).map(|i| f64s(&|k| self.bbox[k as usize][i]));
        self.row_fields
            .iter()
            .map(|field| {
                let column: ArrayRef = match field.name().as_str() {
                    col::CHIP_ID => Arc::new(StringArray::from_iter_values(keys.iter().map(|&k| self.chip_id(k)))),
                    col::SOURCE => Arc::new(StringArray::from_iter_values(keys.iter().map(|&k| self.source_of(k)))),
                    col::GEOMETRY => {
                        Arc::new(BinaryArray::from_iter_values(keys.iter().map(|&k| self.footprint_wkb(k))))
                    }
                    col::WINDOW => structure(field, &window)?,
                    col::CELL => structure(field, &cell)?,
                    col::BBOX => structure(field, &bbox)?,
                    col::CENTER_LON => f64s(&|k| self.center[k as usize].0),
                    col::CENTER_LAT => f64s(&|k| self.center[k as usize].1),
                    col::DATETIME => {
                        let DataType::Timestamp(_, tz) = field.data_type() else {
                            return Err(SearchError::Index(format!(
                                "{}: `datetime` is not a timestamp",
                                self.location
                            )));
                        };
                        let t = TimestampMicrosecondArray::from(
                            keys.iter().map(|&k| self.datetime_of(k)).collect::<Vec<_>>(),
                        );
                        Arc::new(t.with_timezone_opt(tz.clone()))
                    }
                    other => {
                        return Err(SearchError::Index(format!(
                            "{}: rows hold a column `{other}` the index does not keep",
                            self.location
                        )))
                    }
                };
                Ok((field.clone(), column))
            })
            .collect()
    }
}
