//! Image endpoints for people with pictures, not tensors:
//! `POST /v1/models/{m}/embed`, `/classify`, `/segment`. Bodies are one raw
//! image (JPEG, PNG, TIFF/GeoTIFF) or a `multipart/form-data` batch; images
//! are decoded on the blocking pool, fitted to the model's input and sent as
//! uint8 (or normalized float32 for float models).

use std::sync::Arc;
use std::time::Instant;

use actix_web::http::header::{self, ContentType};
use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine;
use futures_util::{future::try_join_all, StreamExt};
use serde::Deserialize;
use serde_json::json;

use crate::backend::{ModelInfo, Task};
use crate::batcher::{Arrival, Worker};
use crate::error::ServeError;
use crate::image_io::{self, Planes};
use crate::state::AppState;
use crate::tensor::Tensor;

/// Query parameters of the image endpoints.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ImageQuery {
    /// Model version (default: newest).
    pub version: Option<String>,
    /// Classes returned per image by `/classify` (default 5).
    pub top_k: Option<usize>,
    /// `/segment` output: `png` (one image only) or `rle`.
    pub format: Option<String>,
}

/// Largest segmentation input when the model takes any size (pixels).
const MAX_SEGMENT_PIXELS: u64 = 4096 * 4096;

async fn read_images(
    state: &AppState,
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<Vec<web::Bytes>, ServeError> {
    let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    if ct.starts_with("multipart/form-data") {
        let mut mp = actix_multipart::Multipart::new(req.headers(), payload);
        let mut images = Vec::new();
        let mut total = 0usize;
        let limit = state.limits.max_body_bytes;
        while let Some(field) = mp.next().await {
            let mut field = field.map_err(|e| ServeError::BadRequest(format!("malformed multipart body: {e}")))?;
            let mut buf = web::BytesMut::new();
            while let Some(chunk) = field.next().await {
                let chunk = chunk.map_err(|e| ServeError::BadRequest(format!("malformed multipart body: {e}")))?;
                total += chunk.len();
                if total > limit {
                    return Err(ServeError::TooLarge(format!("multipart body over the {limit}-byte limit")));
                }
                buf.extend_from_slice(&chunk);
            }
            images.push(buf.freeze());
        }
        if images.is_empty() {
            return Err(ServeError::BadRequest("multipart body has no parts".into()));
        }
        return Ok(images);
    }
    let accepted = ct.is_empty() || ct.starts_with("image/") || ct.starts_with("application/octet-stream");
    if !accepted {
        return Err(ServeError::UnsupportedMediaType(format!(
            "content type {ct:?}; send image/jpeg, image/png, image/tiff, application/octet-stream or multipart/form-data"
        )));
    }
    Ok(vec![state.read_body(req, payload).await?])
}

/// Decodes and fits every image; runs on the blocking pool.
fn prepare(images: Vec<web::Bytes>, info: &ModelInfo, max_pixels: u64) -> Result<Vec<Planes>, ServeError> {
    let (c, h, w) = info.input_chw();
    images
        .iter()
        .enumerate()
        .map(|(i, bytes)| {
            let name = |e: ServeError| -> ServeError {
                if images.len() == 1 {
                    return e;
                }
                let m = format!("image {i}: {e}");
                match e {
                    ServeError::BadRequest(_) => ServeError::BadRequest(m),
                    ServeError::TooLarge(_) => ServeError::TooLarge(m),
                    ServeError::UnsupportedMediaType(_) => ServeError::UnsupportedMediaType(m),
                    ServeError::Unprocessable(_) => ServeError::Unprocessable(m),
                    other => other,
                }
            };
            let planes = image_io::decode(bytes, c, &info.bands, max_pixels).map_err(name)?;
            info.check_samples(planes.stored).map_err(|e| name(ServeError::Unprocessable(e)))?;
            Ok(match (h, w) {
                (Some(h), Some(w)) => planes.fit(h, w),
                _ => planes,
            })
        })
        .collect()
}

/// Stacks same-sized planes into the model's input tensor `[N, C, H, W]`.
fn to_input(planes: &[Planes], info: &ModelInfo) -> Result<Tensor, ServeError> {
    let shape = [planes.len(), planes[0].c, planes[0].h, planes[0].w];
    let mut px = geossl_raster::Samples::with_capacity(planes[0].data.sample_type(), shape.iter().product());
    for p in planes {
        if !px.extend_from(&p.data) {
            return Err(ServeError::Unprocessable("the images of one request store different sample types".into()));
        }
    }
    info.input_from_samples(shape, &px).map_err(|e| ServeError::Unprocessable(format!("{e}; use the OIP endpoint")))
}

/// Runs `planes` through `worker` in chunks of at most `max_batch_size`,
/// concurrently, and returns per-output tensors for all rows in order.
async fn run_rows(state: &AppState, p: &Prepared, planes: &[Planes]) -> Result<Vec<Tensor>, ServeError> {
    let worker = &p.worker;
    let chunks: Vec<Tensor> =
        planes.chunks(worker.config.max_batch_size).map(|c| to_input(c, &worker.info)).collect::<Result<_, _>>()?;
    let timeout = state.limits.request_timeout;
    let results = try_join_all(chunks.into_iter().map(|t| worker.infer(t, timeout, Some(&p.arrival)))).await?;
    let n_out = worker.info.outputs.len();
    (0..n_out)
        .map(|k| {
            let parts: Vec<&Tensor> = results.iter().map(|r| &r[k]).collect();
            Tensor::concat(&parts)
        })
        .collect()
}

struct Prepared {
    worker: Arc<Worker>,
    arrival: Arrival,
    planes: Vec<Planes>,
    query: ImageQuery,
}

async fn accept(
    state: &web::Data<AppState>,
    req: &HttpRequest,
    payload: web::Payload,
    task: Task,
    endpoint: &str,
) -> Result<(Prepared, tokio::sync::OwnedSemaphorePermit), ServeError> {
    state.authorize(req)?;
    let query = web::Query::<ImageQuery>::from_query(req.query_string())
        .map_err(|e| ServeError::BadRequest(format!("query string: {e}")))?
        .into_inner();
    let m = req.match_info().get("m").unwrap_or_default();
    let worker = state.lookup(m, query.version.as_deref())?.clone();
    if worker.info.task != task {
        return Err(ServeError::Unprocessable(format!(
            "model {m} is a {:?} model; /{endpoint} needs a {task:?} model",
            worker.info.task
        )));
    }
    let arrival = worker.announce();
    let permit = state.permit()?;
    let images = read_images(state, req, payload).await?;
    let started = Instant::now();
    let info = worker.info.clone();
    let max_pixels = match info.input_chw() {
        (_, Some(_), Some(_)) => state.limits.max_pixels,
        _ => state.limits.max_pixels.min(MAX_SEGMENT_PIXELS),
    };
    let planes = web::block(move || prepare(images, &info, max_pixels))
        .await
        .map_err(|e| ServeError::Internal(format!("decoder task failed: {e}")))??;
    state.metrics.decode_seconds.with_label_values(&[worker.label()]).observe(started.elapsed().as_secs_f64());
    Ok((Prepared { worker, arrival, planes, query }, permit))
}

fn output<'a>(info: &ModelInfo, outs: &'a [Tensor], name: &str) -> Option<&'a Tensor> {
    info.outputs.iter().position(|o| o.name == name).map(|i| &outs[i])
}

/// `POST /v1/models/{m}/embed` → `{"embeddings": [[f32; D]; N], "dim": D}`
pub async fn embed(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ServeError> {
    let (p, _permit) = accept(&state, &req, payload, Task::Embedding, "embed").await?;
    let outs = run_rows(&state, &p, &p.planes).await?;
    let e = output(&p.worker.info, &outs, geossl_models::io::OUTPUT_EMBEDDING)
        .ok_or_else(|| ServeError::Internal("embedding output missing".into()))?;
    let d = e.shape.get(1).copied().unwrap_or(0);
    let v = e.as_f32().unwrap_or(&[]);
    let rows: Vec<&[f32]> = if d == 0 { Vec::new() } else { v.chunks(d).collect() };
    #[derive(serde::Serialize)]
    struct EmbedResponse<'a> {
        model: &'a str,
        version: u64,
        dim: usize,
        embeddings: Vec<&'a [f32]>,
    }
    Ok(HttpResponse::Ok().json(EmbedResponse {
        model: &p.worker.info.name,
        version: p.worker.info.version,
        dim: d,
        embeddings: rows,
    }))
}

fn softmax(row: &[f32]) -> Vec<f32> {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = row.iter().map(|x| (x - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

/// `POST /v1/models/{m}/classify?top_k=5` → `{"predictions": [[{"label", "index", "score"}]]}`
pub async fn classify(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ServeError> {
    let (p, _permit) = accept(&state, &req, payload, Task::Classification, "classify").await?;
    let info = &p.worker.info;
    let outs = run_rows(&state, &p, &p.planes).await?;
    use geossl_models::io::{OUTPUT_LOGITS, OUTPUT_PROBABILITIES};
    let (t, is_prob) = match output(info, &outs, OUTPUT_PROBABILITIES) {
        Some(t) => (t, true),
        None => {
            (output(info, &outs, OUTPUT_LOGITS).ok_or_else(|| ServeError::Internal("logits missing".into()))?, false)
        }
    };
    let k = t.shape.get(1).copied().unwrap_or(0);
    let top_k = p.query.top_k.unwrap_or(5).clamp(1, k.max(1));
    let preds: Vec<Vec<serde_json::Value>> = t
        .as_f32()
        .unwrap_or(&[])
        .chunks(k.max(1))
        .map(|row| {
            let probs = if is_prob { row.to_vec() } else { softmax(row) };
            let mut idx: Vec<usize> = (0..probs.len()).collect();
            idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
            idx.into_iter()
                .take(top_k)
                .map(|i| {
                    let label = info.labels.get(i).cloned().unwrap_or_else(|| format!("class_{i}"));
                    json!({ "label": label, "index": i, "score": probs[i] })
                })
                .collect()
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "model": info.name, "version": info.version, "predictions": preds })))
}

/// `POST /v1/models/{m}/segment?format=png|rle`: one image → PNG mask (pixel =
/// class id) by default; `rle` or a multipart batch → JSON masks.
pub async fn segment(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ServeError> {
    let (p, _permit) = accept(&state, &req, payload, Task::Segmentation, "segment").await?;
    let info = &p.worker.info;
    let format = p.query.format.clone().unwrap_or_else(|| "png".into());
    if format != "png" && format != "rle" {
        return Err(ServeError::BadRequest(format!("format {format:?}; use png or rle")));
    }
    // Images of different sizes go as separate requests; the batcher merges equal sizes.
    let futures = p.planes.iter().map(|pl| run_rows(&state, &p, std::slice::from_ref(pl)));
    let results = try_join_all(futures).await?;
    let mut masks = Vec::with_capacity(results.len());
    for (pl, outs) in p.planes.iter().zip(&results) {
        let t = output(info, outs, geossl_models::io::OUTPUT_MASK_LOGITS)
            .ok_or_else(|| ServeError::Internal("mask_logits missing".into()))?;
        let (k, h, w) = (t.shape[1], t.shape[2], t.shape[3]);
        debug_assert_eq!((h, w), (pl.h, pl.w));
        masks.push((image_io::argmax_mask(t.as_f32().unwrap_or(&[]), k, h, w), h, w, k));
    }
    let single = masks.len() == 1
        && req
            .headers()
            .get(header::CONTENT_TYPE)
            .is_none_or(|v| !v.to_str().unwrap_or("").to_ascii_lowercase().starts_with("multipart/"));
    if single && format == "png" {
        let (m, h, w, k) = &masks[0];
        return Ok(HttpResponse::Ok()
            .content_type(ContentType::png())
            .insert_header(("x-geossl-classes", k.to_string()))
            .body(image_io::mask_png(m, *h, *w)?));
    }
    let list = masks
        .iter()
        .map(|(m, h, w, _)| {
            Ok(if format == "png" {
                json!({ "height": h, "width": w,
                        "png_base64": base64::engine::general_purpose::STANDARD.encode(image_io::mask_png(m, *h, *w)?) })
            } else {
                json!({ "height": h, "width": w, "rle": image_io::mask_rle(m) })
            })
        })
        .collect::<Result<Vec<_>, ServeError>>()?;
    let k = masks.first().map_or(0, |m| m.3);
    Ok(HttpResponse::Ok().json(json!({
        "model": info.name, "version": info.version, "classes": k, "labels": info.labels, "masks": list,
    })))
}
