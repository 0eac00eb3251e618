//! The embeddings dataset as STAC: one Collection per dataset, one Item per GeoParquet part, following the
//! embeddings STAC extension's published text (geo-embeddings/embeddings-stac-specification, `emb:`
//! [`EMB_SCHEMA`]; on no registry) over STAC 1.1.
//!
//! - **Item** (per part): footprint = the union of its rows' footprints (CRS84, exterior rings
//!   counter-clockwise), bbox, the rows' datetime (or their range), `table:row_count`, the run's parameters
//!   (`emb:runtime_parameters`: bands, chip size, stride, nodata limit, area), `processing:datetime` and
//!   `processing:software`, `emb:quantization` for float16/int8 rows; links to the model (`emb:model`: its
//!   STAC MLM card when there is one) and to each source file (`emb:source-data`); the asset `embeddings`.
//! - **Collection**: `emb:type` (`chip`), `emb:dimensions`, `data_type`, `emb:chip_layout` (regular grid,
//!   chip size, stride), extent (union of the items' boxes, their time range), `item_assets`, summaries,
//!   links to every item, the model and the source data.
//!
//! The GeoParquet footers keep their `geo` and `geossl` keys; these documents are derived from them and from
//! the rows, so writing them again gives the same content (less `processing:datetime`).

use std::collections::BTreeSet;

use arrow_array::{Array, BinaryArray, StringArray, TimestampMicrosecondArray};
use geo::{Coord, LineString, MultiPolygon, Orient, Polygon};
use serde_json::{json, Value};

use crate::archive::error::ArchiveError;
use crate::archive::geoparquet::{self, col};
use crate::archive::store::Location;

/// The embeddings extension's schema identifier (v0.0.1, the published proposal).
pub const EMB_SCHEMA: &str = "https://stac-extensions.github.io/embeddings/v0.0.1/schema.json";
/// The processing extension (`processing:datetime`, `processing:software`).
pub const PROCESSING_SCHEMA: &str = "https://stac-extensions.github.io/processing/v1.2.0/schema.json";
/// The table extension (`table:row_count`).
pub const TABLE_SCHEMA: &str = "https://stac-extensions.github.io/table/v1.2.0/schema.json";
/// The item-assets extension (the Collection's `item_assets`).
pub const ITEM_ASSETS_SCHEMA: &str = "https://stac-extensions.github.io/item-assets/v1.0.0/schema.json";
const PARQUET_MEDIA_TYPE: &str = "application/vnd.apache.parquet";

/// What one part holds, read from its footer and rows.
#[derive(Debug, Clone)]
pub struct PartSummary {
    pub rows: usize,
    /// The union of the rows' footprints.
    pub footprint: MultiPolygon<f64>,
    /// `[xmin, ymin, xmax, ymax]`.
    pub bbox: [f64; 4],
    /// Earliest and latest row datetime (µs since 1970, UTC), when rows have one.
    pub datetimes: Option<(i64, i64)>,
    /// Distinct `source` values, sorted.
    pub sources: BTreeSet<String>,
    /// The footer's `geossl` provenance.
    pub provenance: Value,
}

/// Reads `part`'s rows' geometry, datetime and source, and its provenance, into a [`PartSummary`] (one
/// reader).
pub fn summarize_part(part: &Location) -> Result<PartSummary, ArchiveError> {
    let name = part.as_str().to_string();
    let (batches, provenance) =
        geoparquet::read_columns_with_provenance(part, &[col::GEOMETRY, col::DATETIME, col::SOURCE])?;
    let provenance = provenance
        .and_then(|v| serde_json::from_str::<Value>(&v).ok())
        .ok_or_else(|| ArchiveError::Run(format!("{name}: no geossl provenance in the footer")))?;
    // The rows' exact bounds (the union is computed on i_overlay's fixed-point grid: its vertices are
    // within ~1e-9° of the rows').
    let mut bbox = [f64::INFINITY, f64::INFINITY, f64::NEG_INFINITY, f64::NEG_INFINITY];
    let mut datetimes: Option<(i64, i64)> = None;
    let mut sources = BTreeSet::new();
    let ring_of = |geom: &BinaryArray, i: usize| {
        geoparquet::wkb_ring(geom.value(i))
            .ok_or_else(|| ArchiveError::Run(format!("{name}: row {i}: geometry is not a one-ring polygon")))
    };
    for b in &batches {
        let geom: &BinaryArray = geoparquet::column(b, col::GEOMETRY, &name)?;
        let dt: &TimestampMicrosecondArray = geoparquet::column(b, col::DATETIME, &name)?;
        let src: &StringArray = geoparquet::column(b, col::SOURCE, &name)?;
        for i in 0..b.num_rows() {
            bbox = widen(bbox, geoparquet::ring_bounds(&ring_of(geom, i)?));
            if dt.is_valid(i) {
                let t = dt.value(i);
                datetimes = Some(datetimes.map_or((t, t), |(a, z)| (a.min(t), z.max(t))));
            }
            if !sources.contains(src.value(i)) {
                sources.insert(src.value(i).to_string());
            }
        }
    }
    // Second pass, the bounds known: the union, every step of it on the grid of the whole part.
    let mut footprint = Footprint::new(bbox);
    for b in &batches {
        let geom: &BinaryArray = geoparquet::column(b, col::GEOMETRY, &name)?;
        for i in 0..b.num_rows() {
            footprint.add(Polygon::new(LineString::from(ring_of(geom, i)?), vec![]));
        }
    }
    let rows = footprint.rows;
    if rows == 0 {
        return Err(ArchiveError::Run(format!("{name}: no rows")));
    }
    let footprint = footprint.finish();
    if footprint.0.is_empty() {
        return Err(ArchiveError::Run(format!("{name}: the rows' footprints have no area")));
    }
    Ok(PartSummary { rows, bbox, footprint, datetimes, sources, provenance })
}

/// The union of many windows' footprints, merged as they come by a cascade: every [`Footprint::FAN`]
/// polygons of one level are unioned into one entry of the next (rows come in scan order, so a group is
/// neighbouring windows and its union sheds their shared interior edges early), and windows with a footprint
/// already seen (a place's other dates) are skipped. Memory and time follow the outline, not the row count
/// (one union of 1.35 M overlapping windows held > 9 GB in the boolean-ops engine; merging chunks of 4,096
/// into the running union took minutes).
///
/// The boolean-ops engine snaps every input to a fixed-point grid scaled to the bounds of that call's input;
/// so that the steps of the cascade do not each snap to their own grid (errors adding up, 5e-9 of the area
/// measured), every call also gets two point-rings at the corners of the whole part's bounds: one grid for
/// all, on which a union of unions is the union of all.
struct Footprint {
    /// `levels[l]`: unions of FAN^l windows each, waiting for FAN of them.
    levels: Vec<Vec<Polygon<f64>>>,
    /// Zero-area rings at the part's bounding corners: they fix the grid and add nothing.
    anchors: [Polygon<f64>; 2],
    /// 128-bit hashes of the footprints merged so far (16 bytes a distinct footprint).
    seen: std::collections::HashSet<u128>,
    rows: usize,
}

impl Footprint {
    const FAN: usize = 16;

    /// A union over windows inside `bbox` (`[xmin, ymin, xmax, ymax]`).
    fn new(bbox: [f64; 4]) -> Footprint {
        let point = |x: f64, y: f64| Polygon::new(LineString::from(vec![(x, y), (x, y), (x, y), (x, y)]), vec![]);
        Footprint {
            levels: Vec::new(),
            anchors: [point(bbox[0], bbox[1]), point(bbox[2], bbox[3])],
            seen: Default::default(),
            rows: 0,
        }
    }

    fn add(&mut self, p: Polygon<f64>) {
        self.rows += 1;
        use std::hash::{Hash, Hasher};
        let half = |salt: u8| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            salt.hash(&mut h);
            for c in p.exterior().coords() {
                (c.x.to_bits(), c.y.to_bits()).hash(&mut h);
            }
            h.finish()
        };
        if !self.seen.insert(u128::from(half(0)) << 64 | u128::from(half(1))) {
            return;
        }
        self.push(0, vec![p]);
    }

    fn union(&self, polygons: &[Polygon<f64>]) -> Vec<Polygon<f64>> {
        geo::unary_union(polygons.iter().chain(self.anchors.iter())).0
    }

    /// Adds `polygons` (one union) to `level`, cascading when it holds FAN.
    fn push(&mut self, level: usize, polygons: Vec<Polygon<f64>>) {
        if self.levels.len() == level {
            self.levels.push(Vec::new());
        }
        self.levels[level].extend(polygons);
        if self.levels[level].len() >= Self::FAN {
            let union = self.union(&self.levels[level]);
            self.levels[level].clear();
            self.push(level + 1, union);
        }
    }

    fn finish(self) -> MultiPolygon<f64> {
        let rest: Vec<Polygon<f64>> = self.levels.iter().flatten().cloned().collect();
        MultiPolygon(self.union(&rest)).orient(geo::orient::Direction::Default)
    }
}

/// The smallest `[xmin, ymin, xmax, ymax]` holding both.
fn widen(a: [f64; 4], b: [f64; 4]) -> [f64; 4] {
    [a[0].min(b[0]), a[1].min(b[1]), a[2].max(b[2]), a[3].max(b[3])]
}

fn ring_json(l: &LineString<f64>) -> Value {
    Value::Array(l.coords().map(|c: &Coord<f64>| json!([c.x, c.y])).collect())
}

/// GeoJSON of a footprint: a Polygon when it is one piece, else a MultiPolygon.
fn geojson(m: &MultiPolygon<f64>) -> Value {
    let poly = |p: &Polygon<f64>| {
        let mut rings = vec![ring_json(p.exterior())];
        rings.extend(p.interiors().iter().map(ring_json));
        Value::Array(rings)
    };
    match m.0.as_slice() {
        [one] => json!({"type": "Polygon", "coordinates": poly(one)}),
        many => json!({"type": "MultiPolygon", "coordinates": many.iter().map(poly).collect::<Vec<_>>()}),
    }
}

fn rfc3339(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        .unwrap_or_default()
}

/// The model link of a run: its STAC MLM card (the one it was given, or the exporter's beside the ONNX
/// file), else the ONNX file.
fn model_link(provenance: &Value) -> Value {
    let m = &provenance["model"];
    let name = m["name"].as_str().unwrap_or("model");
    // Local paths as absolute ones: the documents are read from elsewhere than where the run started.
    let absolute = |p: &str| std::fs::canonicalize(p).map_or_else(|_| p.to_string(), |a| a.display().to_string());
    let card = m["card"].as_str().map(absolute).or_else(|| {
        let onnx = std::path::Path::new(m["file"].as_str()?);
        let beside = geossl_models::mlm::card_path(onnx);
        beside.is_file().then(|| absolute(&beside.display().to_string()))
    });
    let file = m["file"].as_str().map(absolute);
    match card {
        Some(c) => json!({"rel": "emb:model", "href": c, "type": "application/geo+json",
            "title": format!("{name}: STAC MLM model card")}),
        None => json!({"rel": "emb:model", "href": file, "type": geossl_models::mlm::ONNX_MEDIA_TYPE,
            "title": format!("{name}: ONNX model")}),
    }
}

/// `data_type` of the stored embeddings (STAC common metadata names).
fn data_type(provenance: &Value) -> String {
    provenance["embedding"]["dtype"].as_str().unwrap_or("float32").to_string()
}

/// The Item of the part `file`, beside it and its Collection (`collection_file`; links are relative).
pub fn part_item(collection_id: &str, collection_file: &str, file: &str, p: &PartSummary, now: &str) -> Value {
    let pv = &p.provenance;
    let id = file.trim_end_matches(".parquet").to_string();
    let mut props = serde_json::Map::new();
    match p.datetimes {
        Some((a, z)) if a == z => {
            props.insert("datetime".into(), rfc3339(a).into());
        }
        Some((a, z)) => {
            props.insert("datetime".into(), Value::Null);
            props.insert("start_datetime".into(), rfc3339(a).into());
            props.insert("end_datetime".into(), rfc3339(z).into());
        }
        // STAC needs a time: the rows carry no acquisition time, so the item's is when it was embedded.
        None => {
            props.insert("datetime".into(), now.into());
            props.insert("geossl:datetime_is".into(), "processing time (the rows carry no acquisition time)".into());
        }
    }
    props.insert("table:row_count".into(), p.rows.into());
    props.insert(
        "emb:runtime_parameters".into(),
        json!({
            "bands": pv["bands"], "band_selection": pv["band_selection"], "sample_type": pv["sample_type"],
            "chip_size": pv["window"], "stride": pv["stride"], "max_nodata": pv["max_nodata"], "bbox": pv["bbox"],
            "level": pv["level"], "feature_grid": pv["grid"],
        }),
    );
    props.insert("processing:datetime".into(), now.into());
    props.insert("processing:software".into(), json!({"geossl": geossl_models::GEOSSL_VERSION}));
    let dtype = data_type(pv);
    if dtype != "float32" {
        let method = match dtype.as_str() {
            "int8" => format!(
                "per-row symmetric: value = q × {}, {} = max|x| / 127 (a Float32 column per row)",
                col::EMBEDDING_SCALE,
                col::EMBEDDING_SCALE
            ),
            _ => "round to nearest half-precision value".to_string(),
        };
        props.insert(
            "emb:quantization".into(),
            json!({"method": method, "original_dtype": "float32", "quantized_dtype": dtype}),
        );
    }
    let mut links = vec![
        json!({"rel": "collection", "href": collection_file, "type": "application/json", "title": collection_id}),
        json!({"rel": "parent", "href": collection_file, "type": "application/json"}),
        json!({"rel": "root", "href": collection_file, "type": "application/json"}),
        model_link(pv),
    ];
    links.extend(p.sources.iter().map(|s| json!({"rel": "emb:source-data", "href": s, "title": "source scene"})));
    json!({
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": [EMB_SCHEMA, PROCESSING_SCHEMA, TABLE_SCHEMA],
        "id": id,
        "collection": collection_id,
        "geometry": geojson(&p.footprint),
        "bbox": p.bbox,
        "properties": props,
        "links": links,
        "assets": { "embeddings": {
            "href": file, "type": PARQUET_MEDIA_TYPE, "roles": ["data"],
            "title": format!("{} chip embeddings (GeoParquet)", p.rows),
        } },
    })
}

/// The Collection (`collection_file`) over `parts`, whose items are `item_files` (same order) beside it;
/// `sources` are the run's inputs (or its plan) for the collection's `emb:source-data` links.
pub fn collection(
    id: &str,
    collection_file: &str,
    parts: &[(Location, PartSummary)],
    item_files: &[String],
    sources: &[String],
    now: &str,
) -> Value {
    let pv = parts.first().map(|(_, p)| p.provenance.clone()).unwrap_or(Value::Null);
    let bbox = parts
        .iter()
        .fold([f64::INFINITY, f64::INFINITY, f64::NEG_INFINITY, f64::NEG_INFINITY], |b, (_, p)| widen(b, p.bbox));
    let times: Vec<(i64, i64)> = parts.iter().filter_map(|(_, p)| p.datetimes).collect();
    let interval = match (times.iter().map(|t| t.0).min(), times.iter().map(|t| t.1).max()) {
        (Some(a), Some(z)) => json!([[rfc3339(a), rfc3339(z)]]),
        _ => json!([[now, now]]),
    };
    let dims = pv["embedding"]["dimensions"].clone();
    let dtype = data_type(&pv);
    let rows: usize = parts.iter().map(|(_, p)| p.rows).sum();
    let mut links: Vec<Value> = vec![
        json!({"rel": "self", "href": collection_file, "type": "application/json"}),
        json!({"rel": "root", "href": collection_file, "type": "application/json"}),
        model_link(&pv),
    ];
    links.extend(sources.iter().map(|s| json!({"rel": "emb:source-data", "href": s, "title": "source data"})));
    links.extend(item_files.iter().map(|f| json!({"rel": "item", "href": f, "type": "application/geo+json"})));
    let stride = pv["stride"].clone();
    json!({
        "type": "Collection",
        "stac_version": "1.1.0",
        "stac_extensions": [EMB_SCHEMA, ITEM_ASSETS_SCHEMA, TABLE_SCHEMA],
        "id": id,
        "title": format!("{id}: chip embeddings by {}", pv["model"]["name"].as_str().unwrap_or("model")),
        "description": format!(
            "{rows} chip embeddings ({dims} dimensions, {dtype}) of windows of {} pixels at stride {stride}, one \
             GeoParquet row each (footprint, centre, source, window, datetime, model), written by geossl {}.",
            pv["window"], geossl_models::GEOSSL_VERSION
        ),
        "license": "other",
        "extent": {
            "spatial": {"bbox": [bbox]},
            "temporal": {"interval": interval},
        },
        "emb:type": "chip",
        "emb:dimensions": dims,
        "data_type": dtype,
        // Patch-level rows: a cell per row, cells a cell apart within each window.
        "emb:chip_layout": if pv["cell"].is_array() {
            json!({"layout_type": "regular_grid", "chip_size": pv["cell"], "stride": pv["cell"]})
        } else {
            json!({"layout_type": "regular_grid", "chip_size": pv["window"], "stride": [stride, stride]})
        },
        "emb:fit_for_use": ["retrieval", "classification"],
        "table:row_count": rows,
        "item_assets": {"embeddings": {"type": PARQUET_MEDIA_TYPE, "roles": ["data"], "title": "chip embeddings"}},
        "summaries": {"emb:type": ["chip"], "emb:dimensions": [dims], "data_type": [dtype]},
        "links": links,
        "assets": {},
    })
}

/// Writes the Collection `collection_at` over `parts` (Items beside each part: `part-00000.parquet` →
/// `part-00000.item.json`; the parts, items and collection share one directory or prefix). Each part is
/// where it is published and its summary ([`summarize_part`]: made before publishing, a local file is read
/// instead of the object store). Returns the items' locations.
pub fn write(
    id: &str,
    parts: &[(Location, PartSummary)],
    collection_at: &Location,
    sources: &[String],
) -> Result<Vec<Location>, ArchiveError> {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let collection_file = collection_at.file_name();
    let mut items = Vec::new();
    let mut files = Vec::new();
    for (part, s) in parts {
        let part_file = part.file_name();
        let file = format!("{}.item.json", part_file.trim_end_matches(".parquet"));
        let at = part.resolve(&file).map_err(ArchiveError::run)?;
        let body = serde_json::to_vec_pretty(&part_item(id, &collection_file, &part_file, s, &now))
            .map_err(|e| ArchiveError::Run(e.to_string()))?;
        at.write(&body, false).map_err(ArchiveError::run)?;
        items.push(at);
        files.push(file);
    }
    let c = collection(id, &collection_file, parts, &files, sources, &now);
    let body = serde_json::to_vec_pretty(&c).map_err(|e| ArchiveError::Run(e.to_string()))?;
    collection_at.write(&body, false).map_err(ArchiveError::run)?;
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two adjacent squares and a third apart: one polygon of their union plus the third, counter-clockwise.
    #[test]
    fn footprints_are_unions_oriented_as_geojson_asks() {
        let sq = |x: f64| {
            Polygon::new(LineString::from(vec![(x, 0.0), (x, 1.0), (x + 1.0, 1.0), (x + 1.0, 0.0), (x, 0.0)]), vec![])
        };
        let u = geo::unary_union(&[sq(0.0), sq(1.0), sq(5.0)]).orient(geo::orient::Direction::Default);
        assert_eq!(u.0.len(), 2);
        use geo::Area;
        assert!((u.unsigned_area() - 3.0).abs() < 1e-12);
        for p in &u.0 {
            assert!(p.exterior().is_closed());
            assert!(p.signed_area() > 0.0, "exterior counter-clockwise");
        }
        let g = geojson(&u);
        assert_eq!(g["type"], "MultiPolygon");
        assert_eq!(geojson(&MultiPolygon(vec![sq(0.0)]))["type"], "Polygon");
    }

    /// Merging as rows come (the cascade) gives the union of all at once: 10,000 overlapping windows
    /// (2 × 2 at stride 1 over a 100 × 100 grid, the 20 × 20 block in the middle left out) make one
    /// polygon with one hole whatever the order; areas agree with the one-shot union and with the
    /// arithmetic (101² minus the 19 × 19 hole, 41..60 on both axes, that the missing windows leave).
    #[test]
    fn the_cascade_is_the_union_of_all_rows() {
        use geo::Area;
        let win = |x: f64, y: f64| {
            Polygon::new(LineString::from(vec![(x, y), (x + 2.0, y), (x + 2.0, y + 2.0), (x, y + 2.0), (x, y)]), vec![])
        };
        let mut all = Vec::new();
        for i in 0..100 {
            for j in 0..100 {
                if !((40..60).contains(&i) && (40..60).contains(&j)) {
                    all.push(win(i as f64, j as f64));
                }
            }
        }
        let mut f = Footprint::new([0.0, 0.0, 101.0, 101.0]);
        for p in all.iter().rev() {
            f.add(p.clone());
        }
        // Another date of every place: counted as rows, nothing to merge.
        for p in &all {
            f.add(p.clone());
        }
        assert_eq!(f.rows, 2 * all.len());
        let chunked = f.finish();
        let once = geo::unary_union(&all);
        assert_eq!(chunked.0.len(), 1);
        assert_eq!(chunked.0[0].interiors().len(), 1);
        let expected = 101.0 * 101.0 - 19.0 * 19.0;
        assert!((chunked.unsigned_area() - expected).abs() < 1e-9 * expected, "{}", chunked.unsigned_area());
        assert!((once.unsigned_area() - expected).abs() < 1e-9 * expected);
        assert!(chunked.0[0].exterior().is_closed() && chunked.0[0].signed_area() > 0.0);
    }

    /// Windows on a lon/lat grid that is neither dyadic nor axis-aligned (30 m pixels, 32-pixel windows at
    /// stride 8, the grid turned by 0.3° as a UTM grid is in lon/lat; 3,600 windows: three levels of the
    /// cascade): the footprint is the turned square, its vertices within the one-shot union's snapping of its
    /// outline — every step on the grid of the whole part — where cascading on each step's own grid drifts.
    #[test]
    fn the_cascade_snaps_once_like_the_one_shot_union() {
        let (x0, y0, px) = (-105.123_456_789, 40.012_345_678, 0.000_269_494_585);
        let (w, s, n) = (32.0 * px, 8.0 * px, 60);
        let (sin, cos) = 0.3f64.to_radians().sin_cos();
        let at = |u: f64, v: f64| (x0 + u * cos - v * sin, y0 + u * sin + v * cos);
        let win = |i: usize, j: usize| {
            let (u, v) = (i as f64 * s, j as f64 * s);
            Polygon::new(
                LineString::from(vec![at(u, v), at(u + w, v), at(u + w, v + w), at(u, v + w), at(u, v)]),
                vec![],
            )
        };
        let all: Vec<Polygon<f64>> = (0..n).flat_map(|j| (0..n).map(move |i| (i, j))).map(|(i, j)| win(i, j)).collect();
        let side = (n - 1) as f64 * s + w;
        let corners = [at(0.0, 0.0), at(side, 0.0), at(side, side), at(0.0, side)];
        // The largest distance of an outline vertex from the exact square's outline.
        let to_edge = |c: Coord<f64>| {
            (0..4)
                .map(|e| {
                    let ((ax, ay), (bx, by)) = (corners[e], corners[(e + 1) % 4]);
                    let (dx, dy) = (bx - ax, by - ay);
                    let t = (((c.x - ax) * dx + (c.y - ay) * dy) / (dx * dx + dy * dy)).clamp(0.0, 1.0);
                    (c.x - ax - t * dx).hypot(c.y - ay - t * dy)
                })
                .fold(f64::INFINITY, f64::min)
        };
        let off = |m: &MultiPolygon<f64>| {
            assert_eq!(m.0.len(), 1);
            assert!(m.0[0].interiors().is_empty());
            m.0[0].exterior().coords().map(|&c| to_edge(c)).fold(0.0, f64::max)
        };
        let bounds =
            all.iter().map(|p| geoparquet::ring_bounds(&p.exterior().coords().map(|c| (c.x, c.y)).collect::<Vec<_>>()));
        let bbox = bounds.fold([f64::INFINITY, f64::INFINITY, f64::NEG_INFINITY, f64::NEG_INFINITY], widen);
        let mut f = Footprint::new(bbox);
        all.iter().for_each(|p| f.add(p.clone()));
        let cascade = off(&f.finish());
        let once = off(&geo::unary_union(&all));
        // The same cascade with anchors at the first window's corners only: each step on its own grid.
        let mut drifting = Footprint::new(geoparquet::ring_bounds(
            &all[0].exterior().coords().map(|c| (c.x, c.y)).collect::<Vec<_>>(),
        ));
        all.iter().for_each(|p| drifting.add(p.clone()));
        let drift = off(&drifting.finish());
        eprintln!("outline error (degrees): cascade {cascade:e}, one union {once:e}, own grids {drift:e}");
        assert!(cascade <= once * 1.5 + 1e-15, "cascade {cascade:e} vs one union {once:e}");
    }
}
