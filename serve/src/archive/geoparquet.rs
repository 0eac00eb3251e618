//! The GeoParquet rows of archive embedding, in one place: the schema (column names and types, the `geo`
//! metadata), the sink that writes them, and the readers of a file's columns (verify, map, search).
//!
//! Rows (GeoParquet 1.1, geometry WKB in OGC:CRS84): `chip_id` (SHA-256 of model hash + source + window),
//! `source`, `window {x, y, w, h}` (pixels), `geometry` (the window's footprint polygon), `bbox {xmin, ymin,
//! xmax, ymax}` (the covering), `center_lat`, `center_lon`, `datetime` (nullable), `model_name`,
//! `model_version`, `model_sha256`, `embedding` (`FixedSizeList<Float32, D>`; with `--dtype float16`
//! `FixedSizeList<Float16, D>`; with `--dtype int8` `FixedSizeList<Int8, D>` and `embedding_scale`
//! (Float32): the row's values are `q × embedding_scale`, see [`EmbeddingDtype`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{
    Array, ArrayRef, BinaryArray, FixedSizeListArray, Float16Array, Float32Array, Float64Array, Int8Array, RecordBatch,
    StringArray, StructArray, TimestampMicrosecondArray, UInt32Array,
};
use arrow_schema::{DataType, Field, Fields, Schema, TimeUnit};

use crate::archive::error::ArchiveError;
use crate::archive::store::Location;

/// Column names.
pub mod col {
    pub const CHIP_ID: &str = "chip_id";
    pub const SOURCE: &str = "source";
    pub const WINDOW: &str = "window";
    pub const GEOMETRY: &str = "geometry";
    pub const BBOX: &str = "bbox";
    pub const CENTER_LAT: &str = "center_lat";
    pub const CENTER_LON: &str = "center_lon";
    pub const DATETIME: &str = "datetime";
    pub const MODEL_NAME: &str = "model_name";
    pub const MODEL_VERSION: &str = "model_version";
    pub const MODEL_SHA256: &str = "model_sha256";
    pub const EMBEDDING: &str = "embedding";
    /// int8 rows only: the step of the row's quantization.
    pub const EMBEDDING_SCALE: &str = "embedding_scale";
    /// Patch-level rows only (`embed --level spatial`): the cell `{row, col}` of the window's feature grid.
    pub const CELL: &str = "cell";
}

/// How the `embedding` column stores values.
///
/// * `float32`: as the model gave them.
/// * `float16`: rounded to the nearest half-precision value (relative error ≤ 2⁻¹¹ in its normal range;
///   half the bytes).
/// * `int8`: per-row symmetric quantization, a quarter of the bytes: `scale = max|x| / 127` (in the row's
///   `embedding_scale` column) and `q = round(x / scale)`, so `q × scale` is within `scale / 2` of `x` in
///   every element.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingDtype {
    #[default]
    Float32,
    Float16,
    Int8,
}

impl EmbeddingDtype {
    fn element(self) -> DataType {
        match self {
            EmbeddingDtype::Float32 => DataType::Float32,
            EmbeddingDtype::Float16 => DataType::Float16,
            EmbeddingDtype::Int8 => DataType::Int8,
        }
    }
}

/// A row's int8 quantization: the step and the values (see [`EmbeddingDtype`]).
pub fn quantize_i8(x: &[f32]) -> (f32, Vec<i8>) {
    let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if max == 0.0 || !max.is_finite() {
        return (0.0, vec![0; x.len()]);
    }
    let scale = max / 127.0;
    (scale, x.iter().map(|v| (v / scale).round().clamp(-127.0, 127.0) as i8).collect())
}

/// Default rows per Parquet row group: bounds the writer's memory (with D = 2048, 8192 rows of embeddings
/// are 64 MiB).
pub const ROW_GROUP_ROWS: usize = 8192;

/// One window's row, less its embedding.
#[derive(Debug, Clone)]
pub struct Row {
    pub source: String,
    /// `[x, y, w, h]` in pixels.
    pub window: [u32; 4],
    /// The footprint: a closed ring of (lon, lat).
    pub corners: Vec<(f64, f64)>,
    /// (lat, lon) of the window's centre.
    pub center: (f64, f64),
    /// Microseconds since 1970 (UTC).
    pub datetime: Option<i64>,
    /// Patch-level rows: `[row, col]` of the cell in the window's feature grid (`window` stays the window's;
    /// `corners` and `center` are the cell's).
    pub cell: Option<[u32; 2]>,
}

/// A row's chip id: [`chip_id`] of its window, the cell's appended to the source for patch-level rows
/// (cells of overlapping windows can cover the same pixels and still differ: their context does).
pub fn row_chip_id(model_sha256: &str, r: &Row) -> String {
    match r.cell {
        None => chip_id(model_sha256, &r.source, r.window),
        Some([i, j]) => chip_id(model_sha256, &format!("{}#cell({i},{j})", r.source), r.window),
    }
}

/// The chip id of a window: the first 128 bits of SHA-256 of the model hash, the source and the window.
pub fn chip_id(model_sha256: &str, source: &str, window: [u32; 4]) -> String {
    let key = format!("{model_sha256}\n{source}\n{window:?}");
    geossl_models::sha256_hex(key.as_bytes())[..32].to_string()
}

/// `[xmin, ymin, xmax, ymax]` of a ring of (lon, lat) points.
pub fn ring_bounds(ring: &[(f64, f64)]) -> [f64; 4] {
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

/// The ring of a one-ring polygon in the WKB [`wkb_polygon`] writes (little-endian OGC WKB); `None` for
/// anything else.
pub fn wkb_ring(b: &[u8]) -> Option<Vec<(f64, f64)>> {
    wkb_ring_points(b).map(Iterator::collect)
}

/// [`wkb_ring`]'s points as they are read, without collecting them.
pub fn wkb_ring_points(b: &[u8]) -> Option<impl ExactSizeIterator<Item = (f64, f64)> + Clone + '_> {
    let u32_at = |i: usize| b.get(i..i + 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]));
    if b.first() != Some(&1) || u32_at(1)? != 3 || u32_at(5)? != 1 {
        return None;
    }
    let n = u32_at(9)? as usize;
    if b.len() != 13 + 16 * n {
        return None;
    }
    let f = move |i: usize| f64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
    Some((0..n).map(move |k| (f(13 + 16 * k), f(21 + 16 * k))))
}

/// The non-null fields `names`, all of type `t`, of a struct column (`bbox`, `window`, `cell`).
fn struct_fields(names: &[&str], t: DataType) -> Fields {
    names.iter().map(|f| Field::new(*f, t.clone(), false)).collect::<Vec<_>>().into()
}

fn bbox_fields() -> Fields {
    struct_fields(&["xmin", "ymin", "xmax", "ymax"], DataType::Float64)
}

fn cell_fields() -> Fields {
    struct_fields(&["row", "col"], DataType::UInt32)
}

fn window_fields() -> Fields {
    struct_fields(&["x", "y", "w", "h"], DataType::UInt32)
}

/// The `geo` metadata: GeoParquet 1.1, WKB footprints in OGC:CRS84 with the bbox covering, whose
/// row-group statistics let readers skip what lies outside their area.
pub fn geo_metadata() -> serde_json::Value {
    serde_json::json!({
        "version": "1.1.0",
        "primary_column": col::GEOMETRY,
        "columns": { col::GEOMETRY: {
            "encoding": "WKB",
            "geometry_types": ["Polygon"],
            "orientation": "counterclockwise",
            "covering": { col::BBOX: {
                "xmin": [col::BBOX, "xmin"], "ymin": [col::BBOX, "ymin"],
                "xmax": [col::BBOX, "xmax"], "ymax": [col::BBOX, "ymax"],
            } },
        } },
    })
}

/// The schema of rows with `d`-dimensional embeddings (patch-level when `cells`) and `meta` (`geo`,
/// `geossl`) in its metadata.
pub fn schema(d: usize, dtype: EmbeddingDtype, cells: bool, meta: &[(String, String)]) -> Schema {
    let element = Arc::new(Field::new("element", dtype.element(), false));
    let mut fields = vec![
        Field::new(col::CHIP_ID, DataType::Utf8, false),
        Field::new(col::SOURCE, DataType::Utf8, false),
        Field::new(col::WINDOW, DataType::Struct(window_fields()), false),
        Field::new(col::GEOMETRY, DataType::Binary, false),
        Field::new(col::BBOX, DataType::Struct(bbox_fields()), false),
        Field::new(col::CENTER_LAT, DataType::Float64, false),
        Field::new(col::CENTER_LON, DataType::Float64, false),
        Field::new(col::DATETIME, DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true),
        Field::new(col::MODEL_NAME, DataType::Utf8, false),
        Field::new(col::MODEL_VERSION, DataType::Utf8, false),
        Field::new(col::MODEL_SHA256, DataType::Utf8, false),
        Field::new(col::EMBEDDING, DataType::FixedSizeList(element, d as i32), false),
    ];
    if dtype == EmbeddingDtype::Int8 {
        fields.push(Field::new(col::EMBEDDING_SCALE, DataType::Float32, false));
    }
    if cells {
        fields.push(Field::new(col::CELL, DataType::Struct(cell_fields()), false));
    }
    Schema::new_with_metadata(fields, meta.iter().cloned().collect::<std::collections::HashMap<String, String>>())
}

/// The GeoParquet output (ZSTD, the `geo` and `geossl` provenance metadata in both the Arrow schema and the
/// file's key-value metadata), written as rows come into `path` (a spool: [`Location::publish`] moves it to
/// its place). Dropped unfinished, it removes the file.
#[derive(Debug)]
pub struct Sink {
    writer: Option<parquet::arrow::ArrowWriter<std::fs::File>>,
    schema: Arc<Schema>,
    path: PathBuf,
    d: usize,
    dtype: EmbeddingDtype,
    /// Model name, version and SHA-256, recorded in every row.
    model: [String; 3],
    pub rows: usize,
}

fn parquet_err(e: parquet::errors::ParquetError) -> ArchiveError {
    ArchiveError::Run(format!("parquet: {e}"))
}

impl Sink {
    pub fn create(
        path: &Path,
        d: usize,
        dtype: EmbeddingDtype,
        cells: bool,
        model: [&str; 3],
        provenance: &serde_json::Value,
        row_group_rows: usize,
    ) -> Result<Self, ArchiveError> {
        use parquet::file::metadata::KeyValue;
        use parquet::file::properties::WriterProperties;
        // In the Arrow schema (pyarrow, GeoPandas) and in the file's key-value metadata (GDAL, DuckDB).
        let meta = [("geo".to_string(), geo_metadata().to_string()), ("geossl".to_string(), provenance.to_string())];
        let schema = Arc::new(schema(d, dtype, cells, &meta));
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| ArchiveError::Run(format!("{}: {e}", dir.display())))?;
        }
        let f = std::fs::File::create(path).map_err(|e| ArchiveError::Run(format!("{}: {e}", path.display())))?;
        let props = WriterProperties::builder()
            .set_compression(parquet::basic::Compression::ZSTD(
                parquet::basic::ZstdLevel::try_new(3).map_err(parquet_err)?,
            ))
            .set_max_row_group_row_count(Some(row_group_rows))
            .set_key_value_metadata(Some(meta.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())).collect()))
            .build();
        let writer = parquet::arrow::ArrowWriter::try_new(f, schema.clone(), Some(props)).map_err(parquet_err)?;
        Ok(Sink {
            writer: Some(writer),
            schema,
            path: path.to_path_buf(),
            d,
            dtype,
            model: model.map(str::to_string),
            rows: 0,
        })
    }

    /// Appends `rows` with their embeddings (`rows.len() × D`, row-major).
    pub fn write(&mut self, rows: &[Row], embeddings: &[f32]) -> Result<(), ArchiveError> {
        let (n, d) = (rows.len(), self.d);
        if embeddings.len() != n * d {
            return Err(ArchiveError::Run(format!("the model gave {} values for {n} rows of {d}", embeddings.len())));
        }
        let u32s = |k: usize| Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.window[k]))) as ArrayRef;
        let window = StructArray::new(window_fields(), vec![u32s(0), u32s(1), u32s(2), u32s(3)], None);
        let chip_ids = rows.iter().map(|r| row_chip_id(&self.model[2], r));
        let element = Arc::new(Field::new("element", self.dtype.element(), false));
        let mut scales = Vec::new();
        let values: ArrayRef = match self.dtype {
            EmbeddingDtype::Float32 => Arc::new(Float32Array::from(embeddings.to_vec())),
            EmbeddingDtype::Float16 => {
                Arc::new(Float16Array::from_iter_values(embeddings.iter().map(|&v| half::f16::from_f32(v))))
            }
            EmbeddingDtype::Int8 => {
                let mut q = Vec::with_capacity(n * d);
                for row in embeddings.chunks(d) {
                    let (scale, r) = quantize_i8(row);
                    q.extend(r);
                    scales.push(scale);
                }
                Arc::new(Int8Array::from(q))
            }
        };
        let emb = FixedSizeListArray::try_new(element, d as i32, values, None)
            .map_err(|e| ArchiveError::Run(format!("building embeddings: {e}")))?;
        // The covering: each footprint's bounding box in CRS84.
        let bounds: Vec<[f64; 4]> = rows.iter().map(|r| ring_bounds(&r.corners)).collect();
        let f64s = |k: usize| Arc::new(Float64Array::from_iter_values(bounds.iter().map(|b| b[k]))) as ArrayRef;
        let bbox = StructArray::new(bbox_fields(), vec![f64s(0), f64s(1), f64s(2), f64s(3)], None);
        let constant = |v: &str| Arc::new(StringArray::from(vec![v; n])) as ArrayRef;
        let mut columns: Vec<ArrayRef> = vec![
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
            Arc::new(emb),
        ];
        if self.dtype == EmbeddingDtype::Int8 {
            columns.push(Arc::new(Float32Array::from(scales)));
        }
        if self.schema.column_with_name(col::CELL).is_some() {
            let cell = |k: usize| {
                Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.cell.map_or(0, |c| c[k])))) as ArrayRef
            };
            columns.push(Arc::new(StructArray::new(cell_fields(), vec![cell(0), cell(1)], None)));
        }
        let batch = RecordBatch::try_new(self.schema.clone(), columns)
            .map_err(|e| ArchiveError::Run(format!("building rows: {e}")))?;
        let w = self.writer.as_mut().ok_or_else(|| ArchiveError::Run("the output is already closed".into()))?;
        w.write(&batch).map_err(parquet_err)?;
        self.rows += n;
        Ok(())
    }

    /// Closes the Parquet file and syncs it; returns its path.
    pub fn finish(mut self) -> Result<PathBuf, ArchiveError> {
        let w = self.writer.take().ok_or_else(|| ArchiveError::Run("the output is already closed".into()))?;
        let f = w.into_inner().map_err(parquet_err)?;
        f.sync_all().map_err(|e| ArchiveError::Run(format!("{}: {e}", self.path.display())))?;
        Ok(std::mem::take(&mut self.path))
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            self.writer = None;
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Rows a decoded batch holds (arrow-rs's default is 1024): an opened index keeps its rows in chunks of this
/// many, found by a binary search over them (1M rows: 245 chunks).
pub const BATCH_ROWS: usize = 4096;

/// The record batches of `columns` of a GeoParquet file (a remote one is read by ranges: its footer, then
/// those columns' chunks; `embedding` brings `embedding_scale` along where the file has it). Failures end the
/// run (a dataset that cannot be read).
pub fn read_columns(at: &Location, columns: &[&str]) -> Result<Vec<RecordBatch>, ArchiveError> {
    read_columns_with_provenance(at, columns).map(|(batches, _)| batches)
}

/// [`read_columns`], and the file's `geossl` provenance (from the footer's Arrow schema; projected batches
/// do not carry it) with the same reader.
pub fn read_columns_with_provenance(
    at: &Location,
    columns: &[&str],
) -> Result<(Vec<RecordBatch>, Option<String>), ArchiveError> {
    let (batches, provenance) = column_batches(at, columns)?;
    Ok((batches.collect::<Result<_, _>>()?, provenance))
}

/// [`read_columns_with_provenance`] one batch ([`BATCH_ROWS`] rows) at a time, each decoded when it is asked
/// for: a caller that keeps part of each batch never holds the whole file's columns at once.
pub fn column_batches(
    at: &Location,
    columns: &[&str],
) -> Result<(impl Iterator<Item = Result<RecordBatch, ArchiveError>>, Option<String>), ArchiveError> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::arrow::ProjectionMask;
    let builder = ParquetRecordBatchReaderBuilder::try_new(at.parquet_reader().map_err(ArchiveError::run)?)
        .map_err(|e| ArchiveError::Run(format!("{at}: not a readable Parquet file: {e}")))?;
    // The embedding's quantization step travels with it (int8 files).
    let mut columns = columns.to_vec();
    if columns.contains(&col::EMBEDDING) && builder.schema().column_with_name(col::EMBEDDING_SCALE).is_some() {
        columns.push(col::EMBEDDING_SCALE);
    }
    let provenance = builder.schema().metadata().get("geossl").cloned();
    let mask = ProjectionMask::columns(builder.parquet_schema(), columns.iter().copied());
    let reader = builder
        .with_projection(mask)
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(|e| ArchiveError::Run(format!("{at}: not readable: {e}")))?;
    let name = at.to_string();
    Ok((reader.map(move |b| b.map_err(|e| ArchiveError::Run(format!("{name}: {e}")))), provenance))
}

/// A column of a batch as the array type the schema gives it; the error names the file and the column.
pub fn column<'a, T: 'static>(b: &'a RecordBatch, name: &str, file: &str) -> Result<&'a T, ArchiveError> {
    b.column_by_name(name)
        .ok_or_else(|| ArchiveError::Run(format!("{file}: no `{name}` column")))?
        .as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| ArchiveError::Run(format!("{file}: column `{name}` has an unexpected type")))
}

/// The `window` column's `x`, `y`, `w`, `h` arrays.
pub fn window_columns<'a>(b: &'a RecordBatch, file: &str) -> Result<[&'a UInt32Array; 4], ArchiveError> {
    let [x, y, w, h] = u32_fields(column(b, col::WINDOW, file)?, col::WINDOW, ["x", "y", "w", "h"], file)?;
    Ok([x, y, w, h])
}

/// The `cell` column's `row` and `col` arrays, in patch-level files (`None`: a pooled file, without one).
pub fn cell_columns<'a>(b: &'a RecordBatch, file: &str) -> Result<Option<[&'a UInt32Array; 2]>, ArchiveError> {
    if b.column_by_name(col::CELL).is_none() {
        return Ok(None);
    }
    u32_fields(column(b, col::CELL, file)?, col::CELL, ["row", "col"], file).map(Some)
}

/// The uint32 fields `names` of the struct column `name`.
fn u32_fields<'a, const N: usize>(
    s: &'a StructArray,
    name: &str,
    names: [&str; N],
    file: &str,
) -> Result<[&'a UInt32Array; N], ArchiveError> {
    let mut out = Vec::with_capacity(N);
    for k in names {
        out.push(
            s.column_by_name(k)
                .and_then(|c| c.as_any().downcast_ref::<UInt32Array>())
                .ok_or_else(|| ArchiveError::Run(format!("{file}: column `{name}` has no `{k}`")))?,
        );
    }
    out.try_into().map_err(|_| ArchiveError::Run(format!("{file}: column `{name}`")))
}

/// The `embedding` column of a batch as float32, row-major, and the dimension: float16 widened, int8 rows
/// multiplied by their `embedding_scale`.
pub fn embedding_values(b: &RecordBatch, file: &str) -> Result<(Vec<f32>, usize), ArchiveError> {
    let emb: &FixedSizeListArray = column(b, col::EMBEDDING, file)?;
    let d = emb.value_length() as usize;
    // Rows sliced out of a larger batch start at their offset in the values.
    let (start, n) = (emb.value_offset(0).max(0) as usize, emb.len() * d);
    let values = emb.values();
    let any = values.as_any();
    let out = if let Some(v) = any.downcast_ref::<Float32Array>() {
        v.values()[start..start + n].to_vec()
    } else if let Some(v) = any.downcast_ref::<Float16Array>() {
        v.values()[start..start + n].iter().map(|x| x.to_f32()).collect()
    } else if let Some(v) = any.downcast_ref::<Int8Array>() {
        let scale: &Float32Array = column(b, col::EMBEDDING_SCALE, file)?;
        let q = &v.values()[start..start + n];
        q.chunks(d.max(1))
            .zip(scale.values().iter())
            .flat_map(|(row, &s)| row.iter().map(move |&x| f32::from(x) * s))
            .collect()
    } else {
        return Err(ArchiveError::Run(format!(
            "{file}: column `embedding` holds {}; expected float32, float16 or int8",
            values.data_type()
        )));
    };
    Ok((out, d))
}

/// Every chip id of a file (only that column is read).
pub fn chip_ids(at: &Location) -> Result<Vec<String>, ArchiveError> {
    let mut out = Vec::new();
    for b in read_columns(at, &[col::CHIP_ID])? {
        let ids: &StringArray = column(&b, col::CHIP_ID, at.as_str())?;
        out.extend((0..ids.len()).map(|i| ids.value(i).to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wkb_rings_read_back() {
        let ring = vec![(-78.5, 25.4), (-78.4, 25.4), (-78.4, 25.5), (-78.5, 25.5), (-78.5, 25.4)];
        let b = wkb_polygon(&ring);
        assert_eq!(wkb_ring(&b), Some(ring));
        assert_eq!(wkb_ring(&b[..b.len() - 1]), None);
        let mut point = b.clone();
        point[1] = 1;
        assert_eq!(wkb_ring(&point), None);
    }

    #[test]
    fn int8_rows_are_within_half_a_step() {
        let x: Vec<f32> = (0..300).map(|i| ((i as f32) * 0.37).sin() * 0.2 - 0.01).collect();
        let (scale, q) = quantize_i8(&x);
        assert!((scale - x.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0).abs() < 1e-9);
        assert!(q.iter().any(|&v| v.abs() == 127));
        for (a, &b) in x.iter().zip(&q) {
            // Half a step, plus the float rounding of x / scale (a few ulps of 127 × scale).
            assert!((a - f32::from(b) * scale).abs() <= scale * (0.5 + 4.0 * f32::EPSILON * 127.0), "{a} {b}");
        }
        assert_eq!(quantize_i8(&[0.0; 4]), (0.0, vec![0; 4]));
    }

    #[test]
    fn wkb_polygon_layout() {
        let b = wkb_polygon(&[(0.0, 0.0), (1.0, 0.0), (0.0, 0.0)]);
        assert_eq!(b.len(), 1 + 4 + 4 + 4 + 3 * 16);
        assert_eq!(&b[..9], &[1, 3, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(f64::from_le_bytes(b[29..37].try_into().unwrap()), 1.0);
    }
}
