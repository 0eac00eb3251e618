//! Similarity search over HTTP: `GET /v1/indexes`, `POST /v1/indexes/{name}/search` and
//! `POST /v1/indexes/{name}/classify`. Queries are JSON (a chip id, a point, an embedding, several
//! positive examples), an embedding as raw little-endian float32 ([`EMBEDDING_MEDIA_TYPE`], filters in the
//! query string: no JSON to parse), or an image body (`image/*`, filters in the query string) embedded by the
//! index's model. Answers are a GeoJSON FeatureCollection, or GeoParquet when the request accepts
//! `application/vnd.apache.parquet`. Searches run on the HTTP worker; classifiers on the blocking pool.

use std::sync::Arc;
use std::time::Instant;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::http::error::ServeError;
use crate::http::images;
use crate::http::state::AppState;
use crate::infer::{DType, Data, Tensor};
use crate::search::answers::{self, GEOJSON_MEDIA_TYPE, PARQUET_MEDIA_TYPE};
use crate::search::index::Index;
use crate::search::query::{check_bbox, parse_bbox, parse_datetime, Example, Filters, Hit, Query};
use crate::search::SearchError;

/// A chip as JSON: its id, or `[lon, lat]` inside it.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ExampleJson {
    Chip(String),
    Point([f64; 2]),
}

impl ExampleJson {
    fn example(&self) -> Example {
        match self {
            ExampleJson::Chip(id) => Example::Chip(id.clone()),
            ExampleJson::Point([lon, lat]) => Example::Point { lon: *lon, lat: *lat },
        }
    }
}

/// The filters of a JSON query.
#[derive(Debug, Clone, Default)]
pub struct FilterJson {
    /// `[xmin, ymin, xmax, ymax]` in lon/lat.
    pub bbox: Option<Vec<f64>>,
    /// RFC 3339 datetime or interval `start/end` (`..` open).
    pub datetime: Option<String>,
    pub exclude_own_scene: bool,
    pub keep_overlapping: bool,
}

impl FilterJson {
    fn filters(&self) -> Result<Filters, SearchError> {
        let bbox = match &self.bbox {
            None => None,
            Some(v) => Some(check_bbox(<[f64; 4]>::try_from(v.as_slice()).map_err(|_| {
                SearchError::BadQuery(format!("bbox has {} numbers; want [xmin, ymin, xmax, ymax]", v.len()))
            })?)?),
        };
        Ok(Filters {
            bbox,
            datetime: self.datetime.as_deref().map(parse_datetime).transpose()?,
            exclude_own_scene: self.exclude_own_scene,
            keep_overlapping: self.keep_overlapping,
        })
    }
}

/// `POST /v1/indexes/{name}/search` (JSON): exactly one of `chip_id`, `point`, `embedding`, `positives`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchBody {
    pub chip_id: Option<String>,
    pub point: Option<[f64; 2]>,
    pub embedding: Option<Vec<f32>>,
    pub positives: Option<Vec<ExampleJson>>,
    /// Answers (default 10); signed so that 0 and negatives are named, not a JSON type error.
    pub k: Option<i64>,
    pub bbox: Option<Vec<f64>>,
    pub datetime: Option<String>,
    #[serde(default)]
    pub exclude_own_scene: bool,
    #[serde(default)]
    pub keep_overlapping: bool,
}

/// Media type of a search body that is the query embedding itself: the index's dimension of little-endian
/// float32 values, nothing else (`[D]`, 4·D bytes).
pub const EMBEDDING_MEDIA_TYPE: &str = "application/vnd.geossl.embedding";

/// `POST /v1/indexes/{name}/search` with an image or a binary embedding body: the query string.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchParams {
    pub k: Option<i64>,
    /// `xmin,ymin,xmax,ymax`.
    pub bbox: Option<String>,
    pub datetime: Option<String>,
    /// Image queries: the model to embed with (default: the index's model name), and its version (default:
    /// newest).
    pub model: Option<String>,
    pub version: Option<String>,
}

impl SearchParams {
    fn parse(req: &HttpRequest) -> Result<Self, ServeError> {
        Ok(web::Query::<SearchParams>::from_query(req.query_string())
            .map_err(|e| ServeError::BadRequest(format!("query string: {e}")))?
            .into_inner())
    }

    /// `k` and the filters.
    fn query(&self) -> Result<(usize, Filters), SearchError> {
        let filters = Filters {
            bbox: self.bbox.as_deref().map(parse_bbox).transpose()?,
            datetime: self.datetime.as_deref().map(parse_datetime).transpose()?,
            ..Filters::default()
        };
        Ok((count(self.k, 10)?, filters))
    }
}

/// A binary embedding body: `dimensions` little-endian float32 values (decoded as OIP's binary tensors are).
fn embedding_le(bytes: &[u8], dimensions: usize) -> Result<Vec<f32>, ServeError> {
    match Tensor::from_le_bytes(vec![dimensions], DType::F32, bytes) {
        Some(Tensor { data: Data::F32(v), .. }) => Ok(v),
        _ => Err(ServeError::BadRequest(format!(
            "{EMBEDDING_MEDIA_TYPE} body of {} bytes; the index wants {dimensions} little-endian float32 values ({} bytes)",
            bytes.len(),
            4 * dimensions
        ))),
    }
}

/// `POST /v1/indexes/{name}/classify`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyBody {
    pub positives: Vec<ExampleJson>,
    pub negatives: Vec<ExampleJson>,
    /// Inverse regularization strength (scikit-learn's C; default 1).
    pub c: Option<f64>,
    /// How many of the best-scoring chips (default 100).
    pub top: Option<i64>,
    pub bbox: Option<Vec<f64>>,
    pub datetime: Option<String>,
}

fn count(k: Option<i64>, default: usize) -> Result<usize, SearchError> {
    match k {
        None => Ok(default),
        Some(k) if k >= 1 => Ok(usize::try_from(k).unwrap_or(usize::MAX)),
        Some(k) => Err(SearchError::BadQuery(format!("k = {k}: ask for 1 to {} answers", crate::search::query::MAX_K))),
    }
}

fn json_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ServeError> {
    serde_json::from_slice(bytes).map_err(|e| ServeError::BadRequest(format!("request body: {e}")))
}

/// Answers in the representation the request accepts.
fn respond(req: &HttpRequest, index: &Index, hits: &[Hit], about: Value) -> Result<HttpResponse, ServeError> {
    let accept = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    if accept.contains(PARQUET_MEDIA_TYPE) {
        let bytes = answers::geoparquet(index, hits)?;
        return Ok(HttpResponse::Ok().content_type(PARQUET_MEDIA_TYPE).body(bytes));
    }
    Ok(HttpResponse::Ok().content_type(GEOJSON_MEDIA_TYPE).json(answers::geojson(index, hits, about)))
}

/// How an operation on the index runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// On the HTTP worker itself: a search is milliseconds of CPU (a graph search: ~1 ms at 100k rows,
    /// ~3 ms at 1M at ef 256; a selective filter adds a scan of every row's metadata and brute force over at
    /// most the index's exact budget, 2²⁴ elements), and handing it to the blocking pool and back cost more
    /// than it saved —
    /// measured at 8 clients on 2 cores: served QPS 0.56–0.71× in process through the pool, 0.63–0.78×
    /// inline, p99 16–22 ms → 11–13 ms (docs/benchmarks/search.md). The HTTP workers bound how many run at
    /// once.
    Inline,
    /// On the blocking pool: fitting a classifier and ranking the whole index.
    Blocking,
}

/// Runs `f` on the index, timed into the search metric.
async fn in_index<T: Send + 'static>(
    state: &web::Data<AppState>,
    name: &str,
    op: &'static str,
    how: Run,
    f: impl FnOnce(&Index) -> Result<T, SearchError> + Send + 'static,
) -> Result<T, ServeError> {
    let index = state.index(name)?.clone();
    let started = Instant::now();
    let r = match how {
        Run::Inline => f(&index),
        Run::Blocking => {
            web::block(move || f(&index)).await.map_err(|e| ServeError::Internal(format!("{op} task failed: {e}")))?
        }
    };
    state.metrics.search_seconds.with_label_values(&[name, op]).observe(started.elapsed().as_secs_f64());
    Ok(r?)
}

/// `GET /v1/indexes`: every index with its model, rows and dimension.
pub async fn list(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ServeError> {
    state.authorize(&req)?;
    let indexes: Vec<Value> = state
        .indexes
        .iter()
        .map(|(name, i)| {
            let m = &i.manifest;
            json!({"name": name, "location": i.location, "rows": m.rows, "dimensions": m.dimensions, "level": m.level,
                "quantization": m.quantization, "rerank": m.rerank, "model": m.model, "plan_sha256": m.plan_sha256,
                "parts": m.parts.len()})
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "indexes": indexes })))
}

/// The embedding of an image query by the index's model; 422 naming both when the server's model is not
/// the one the index was built with.
async fn image_query(
    state: &web::Data<AppState>,
    req: &HttpRequest,
    payload: web::Payload,
    index: &Arc<Index>,
    params: &SearchParams,
) -> Result<Vec<f32>, ServeError> {
    let want = &index.manifest.model;
    let name = params.model.as_deref().unwrap_or(&want.name);
    let worker = state.lookup(name, params.version.as_deref()).map_err(|_| {
        ServeError::Unprocessable(format!(
            "index {} was built with model {} (sha256 {}); this server has no model {name:?} to embed the image",
            index.location, want.name, want.sha256
        ))
    })?;
    let have =
        state.model_sha256.get(&(worker.info.name.clone(), worker.info.version)).map_or("unknown", String::as_str);
    if have != want.sha256 {
        return Err(ServeError::Unprocessable(format!(
            "index {} was built with model {} (sha256 {}); this server's model {} version {} is another (sha256 {have}): \
             its embeddings are not comparable",
            index.location, want.name, want.sha256, worker.info.name, worker.info.version
        )));
    }
    images::embed_one(state, req, payload, worker.clone()).await
}

/// `POST /v1/indexes/{name}/search`.
pub async fn search(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ServeError> {
    state.authorize(&req)?;
    let name = req.match_info().get("index").unwrap_or_default().to_string();
    let index = state.index(&name)?.clone();
    let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    let (query, k, filters, about) = if ct.starts_with("image/") || ct.starts_with("multipart/form-data") {
        let params = SearchParams::parse(&req)?;
        let (k, filters) = params.query()?;
        let v = image_query(&state, &req, payload, &index, &params).await?;
        (Query::Embedding(v), k, filters, json!({"image": true}))
    } else if ct.starts_with(EMBEDDING_MEDIA_TYPE) {
        let params = SearchParams::parse(&req)?;
        if params.model.is_some() || params.version.is_some() {
            return Err(ServeError::BadRequest(
                "model and version choose the model that embeds an image query; an embedding is already embedded"
                    .into(),
            ));
        }
        let (k, filters) = params.query()?;
        let _permit = state.permit()?;
        let bytes = state.read_body(&req, payload).await?;
        (Query::Embedding(embedding_le(&bytes, index.manifest.dimensions)?), k, filters, json!({"embedding": true}))
    } else {
        let _permit = state.permit()?;
        let bytes = state.read_body(&req, payload).await?;
        let body: SearchBody = json_body(&bytes)?;
        let given = [body.chip_id.is_some(), body.point.is_some(), body.embedding.is_some(), body.positives.is_some()];
        if given.iter().filter(|&&g| g).count() != 1 {
            return Err(ServeError::BadRequest(
                "give exactly one query: chip_id, point [lon, lat], embedding, or positives".into(),
            ));
        }
        let about = json!({"chip_id": body.chip_id, "point": body.point, "positives": body.positives.as_ref().map(|p| p.len())});
        let query = if let Some(id) = body.chip_id {
            Query::Example(Example::Chip(id))
        } else if let Some([lon, lat]) = body.point {
            Query::Example(Example::Point { lon, lat })
        } else if let Some(e) = body.embedding {
            Query::Embedding(e)
        } else {
            Query::Examples(body.positives.unwrap_or_default().iter().map(ExampleJson::example).collect())
        };
        let filters = FilterJson {
            bbox: body.bbox,
            datetime: body.datetime,
            exclude_own_scene: body.exclude_own_scene,
            keep_overlapping: body.keep_overlapping,
        }
        .filters()?;
        (query, count(body.k, 10)?, filters, about)
    };
    let hits = in_index(&state, &name, "search", Run::Inline, move |i| i.search(&query, k, &filters)).await?;
    let about = json!({"index": name, "model": index.manifest.model, "k": k, "query": about});
    respond(&req, &index, &hits, about)
}

/// `POST /v1/indexes/{name}/classify`.
pub async fn classify(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ServeError> {
    state.authorize(&req)?;
    let name = req.match_info().get("index").unwrap_or_default().to_string();
    let index = state.index(&name)?.clone();
    let _permit = state.permit()?;
    let bytes = state.read_body(&req, payload).await?;
    let body: ClassifyBody = json_body(&bytes)?;
    let c = body.c.unwrap_or(1.0);
    if !(c > 0.0 && c.is_finite()) {
        return Err(ServeError::BadRequest(format!("c = {c}: the inverse regularization strength must be positive")));
    }
    let top = count(body.top, 100)?;
    let filters = FilterJson { bbox: body.bbox, datetime: body.datetime, ..FilterJson::default() }.filters()?;
    let pos: Vec<Example> = body.positives.iter().map(ExampleJson::example).collect();
    let neg: Vec<Example> = body.negatives.iter().map(ExampleJson::example).collect();
    let r =
        in_index(&state, &name, "classify", Run::Blocking, move |i| i.classify(&pos, &neg, c, top, &filters)).await?;
    let about = json!({"index": name, "model": index.manifest.model, "top": top, "classifier": {
        "c": c, "positives": r.positives.len(), "negatives": r.negatives.len(), "intercept": r.model.intercepts[0],
        "iterations": r.model.iterations, "converged": r.model.converged}});
    respond(&req, &index, &r.hits, about)
}
