//! Answers as a GeoJSON FeatureCollection (QGIS, web maps) or GeoParquet (the index's row columns, with
//! `rank` and `score` first).

use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, RecordBatch, UInt32Array};
use arrow_schema::{DataType, Field, Schema};
use serde::Serialize;
use serde_json::Value;

use super::index::{ChipId, Index};
use super::query::Hit;
use super::SearchError;
use crate::archive::geoparquet;

/// The GeoParquet media type (`Accept` for Parquet answers).
pub const PARQUET_MEDIA_TYPE: &str = "application/vnd.apache.parquet";
pub const GEOJSON_MEDIA_TYPE: &str = "application/geo+json";

fn rfc3339(micros: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_micros(micros).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
}

/// A GeoJSON FeatureCollection of answers, serialized as it is (no intermediate `serde_json::Value`: the
/// answer is a tenth of a served search's CPU when built as a `Value` tree, docs/benchmarks/search.md).
#[derive(Debug, Serialize)]
pub struct FeatureCollection<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    features: Vec<Feature<'a>>,
    geossl: Value,
}

#[derive(Debug, Serialize)]
struct Feature<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: ChipId,
    geometry: Polygon<'a>,
    properties: Properties<'a>,
}

#[derive(Debug, Serialize)]
struct Polygon<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    /// One ring: the footprint, (lon, lat), closed.
    coordinates: [Ring<'a>; 1],
}

/// A footprint's ring written as GeoJSON straight from the index's WKB (`[[lon, lat], …]`; empty if the
/// WKB is not a one-ring polygon).
#[derive(Debug)]
struct Ring<'a>(&'a [u8]);

impl Serialize for Ring<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match geoparquet::wkb_ring_points(self.0) {
            Some(points) => s.collect_seq(points.map(|(x, y)| [x, y])),
            None => s.collect_seq(std::iter::empty::<[f64; 2]>()),
        }
    }
}

#[derive(Debug, Serialize)]
struct Properties<'a> {
    rank: usize,
    score: f64,
    chip_id: ChipId,
    source: &'a str,
    datetime: Option<String>,
    window: Window,
    center: [f64; 2],
    #[serde(skip_serializing_if = "Option::is_none")]
    cell: Option<Cell>,
}

#[derive(Debug, Serialize)]
struct Window {
    x: u32,
    y: u32,
    w: u32,
    h: u32,
}

#[derive(Debug, Serialize)]
struct Cell {
    row: u32,
    col: u32,
}

/// The answers as a GeoJSON FeatureCollection: each a Feature with the chip's footprint and `rank`
/// (from 1), `score`, `chip_id`, `source`, `datetime` (null when undated), `window`, `center` (and `cell`)
/// as properties; `about` goes into the collection's `geossl` member (the query, the index, the model).
pub fn geojson<'a>(index: &'a Index, hits: &[Hit], about: Value) -> FeatureCollection<'a> {
    index.prefetch_rows(hits.iter().map(|h| h.key));
    let features = hits
        .iter()
        .enumerate()
        .map(|(rank, h)| {
            let (window, cell) = index.window(h.key);
            let chip = index.chip_id(h.key);
            let (lon, lat) = index.center_of(h.key);
            Feature {
                kind: "Feature",
                id: chip,
                geometry: Polygon { kind: "Polygon", coordinates: [Ring(index.footprint_wkb(h.key))] },
                properties: Properties {
                    rank: rank + 1,
                    score: h.score,
                    chip_id: chip,
                    source: index.source_of(h.key),
                    datetime: index.datetime_of(h.key).and_then(rfc3339),
                    window: Window { x: window[0], y: window[1], w: window[2], h: window[3] },
                    center: [lon, lat],
                    cell: cell.map(|[row, col]| Cell { row, col }),
                },
            }
        })
        .collect();
    FeatureCollection { kind: "FeatureCollection", features, geossl: about }
}

/// The answers as GeoParquet bytes: `rank`, `score`, then the index's row columns (the dataset's, less the
/// model's and the embedding), with the `geo` metadata.
pub fn geoparquet(index: &Index, hits: &[Hit]) -> Result<Vec<u8>, SearchError> {
    use parquet::file::metadata::KeyValue;
    use parquet::file::properties::WriterProperties;
    let keys: Vec<u64> = hits.iter().map(|h| h.key).collect();
    let mut fields = vec![Field::new("rank", DataType::UInt32, false), Field::new("score", DataType::Float64, false)];
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(UInt32Array::from_iter_values(1..=hits.len() as u32)),
        Arc::new(Float64Array::from_iter_values(hits.iter().map(|h| h.score))),
    ];
    for (f, c) in index.row_columns(&keys)? {
        fields.push(f.as_ref().clone());
        columns.push(c);
    }
    let geo = geoparquet::geo_metadata().to_string();
    let schema = Arc::new(Schema::new_with_metadata(fields, [("geo".to_string(), geo.clone())].into_iter().collect()));
    let batch = RecordBatch::try_new(schema.clone(), columns).map_err(SearchError::index)?;
    let props =
        WriterProperties::builder().set_key_value_metadata(Some(vec![KeyValue::new("geo".into(), geo)])).build();
    let mut w = parquet::arrow::ArrowWriter::try_new(Vec::new(), schema, Some(props)).map_err(SearchError::index)?;
    w.write(&batch).map_err(SearchError::index)?;
    w.into_inner().map_err(SearchError::index)
}
