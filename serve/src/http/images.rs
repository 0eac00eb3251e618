//! Image endpoints for people with pictures, not tensors:
//! `POST /v1/models/{m}/embed`, `/classify`, `/segment`. Bodies are one raw
//! image (JPEG, PNG, TIFF/GeoTIFF) or a `multipart/form-data` batch; images
//! are decoded on the blocking pool by `geossl_raster`'s one decoder (the
//! trainer's, with its policy for grey, alpha, 16-bit and band counts),
//! fitted to the model's input and sent in their stored type (or normalized
//! float32 for float models). Segmentation masks go back as PNG or RLE.

use std::sync::Arc;
use std::time::Instant;

use actix_web::http::header::{self, ContentType};
use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine;
use futures_util::{future::try_join_all, StreamExt};
use serde::Deserialize;
use serde_json::json;

use geossl_raster::{Block, Samples, Want};
use image::{imageops::FilterType, ImageBuffer, ImageEncoder, Luma};

use crate::http::error::ServeError;
use crate::http::state::AppState;
use crate::infer::backend::OutputRole;
use crate::infer::{Arrival, ModelInfo, Task, Tensor, Worker};

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

/// Decodes every request image for `info`'s model and fits it to the model's input size (images of a
/// model that takes any size stay as they are); runs on the blocking pool.
pub fn decode_images<B: AsRef<[u8]>>(
    images: &[B],
    info: &ModelInfo,
    max_pixels: u64,
    grey_to_rgb: bool,
) -> Result<Vec<Block>, ServeError> {
    let (c, h, w) = info.input_chw();
    let names = geossl_raster::model_band_names(c, &info.bands);
    let want = Want { bands: &names, grey_to_rgb, max_pixels };
    images
        .iter()
        .enumerate()
        .map(|(i, bytes)| {
            let label = if images.len() == 1 { "image".to_string() } else { format!("image {i}") };
            let img = geossl_raster::decode_bytes(bytes.as_ref(), &label, &want)?.into_planar();
            info.check_samples(img.samples.sample_type())
                .map_err(|e| ServeError::Unprocessable(format!("{label}: {e}")))?;
            Ok(match (h, w) {
                (Some(h), Some(w)) => fit(img, h, w),
                _ => img,
            })
        })
        .collect()
}

/// Stacks same-sized images into the model's input tensor `[N, C, H, W]`.
fn to_input(planes: &[Block], info: &ModelInfo) -> Result<Tensor, ServeError> {
    let shape = [planes.len(), planes[0].bands, planes[0].height, planes[0].width];
    let mut px = Samples::with_capacity(planes[0].samples.sample_type(), shape.iter().product());
    for p in planes {
        if !px.extend_from(&p.samples) {
            return Err(ServeError::Unprocessable("the images of one request store different sample types".into()));
        }
    }
    info.input_from_samples(shape, &px).map_err(|e| ServeError::Unprocessable(format!("{e}; use the OIP endpoint")))
}

fn resize_plane<P>(p: &[P::Subpixel], w: usize, h: usize, nw: usize, nh: usize) -> Vec<P::Subpixel>
where
    P: image::Pixel + 'static,
    P::Subpixel: 'static,
{
    let img: ImageBuffer<P, &[P::Subpixel]> = ImageBuffer::from_raw(w as u32, h as u32, p).expect("plane size");
    image::imageops::resize(&img, nw as u32, nh as u32, FilterType::Triangle).into_raw()
}

/// Resizes the shorter side to cover `th`×`tw`, then centre-crops to it (what torchvision's Resize +
/// CenterCrop do). Unchanged at that size. 8- and 16-bit samples stay so; other types are resized as
/// float32.
pub fn fit(b: Block, th: usize, tw: usize) -> Block {
    if b.height == th && b.width == tw {
        return b;
    }
    let scale = (th as f64 / b.height as f64).max(tw as f64 / b.width as f64);
    let nh = ((b.height as f64 * scale).round() as usize).max(th);
    let nw = ((b.width as f64 * scale).round() as usize).max(tw);
    let (y0, x0) = ((nh - th) / 2, (nw - tw) / 2);
    let n = b.height * b.width;
    fn crop<T: Copy>(r: &[T], out: &mut Vec<T>, y0: usize, x0: usize, th: usize, tw: usize, nw: usize) {
        for y in y0..y0 + th {
            out.extend_from_slice(&r[y * nw + x0..y * nw + x0 + tw]);
        }
    }
    let samples = match &b.samples {
        Samples::U8(v) => {
            let mut out = Vec::with_capacity(b.bands * th * tw);
            for c in 0..b.bands {
                let r = resize_plane::<Luma<u8>>(&v[c * n..(c + 1) * n], b.width, b.height, nw, nh);
                crop(&r, &mut out, y0, x0, th, tw, nw);
            }
            Samples::U8(out)
        }
        Samples::U16(v) => {
            let mut out = Vec::with_capacity(b.bands * th * tw);
            for c in 0..b.bands {
                let r = resize_plane::<Luma<u16>>(&v[c * n..(c + 1) * n], b.width, b.height, nw, nh);
                crop(&r, &mut out, y0, x0, th, tw, nw);
            }
            Samples::U16(out)
        }
        other => {
            let v = other.to_f32();
            let mut out = Vec::with_capacity(b.bands * th * tw);
            for c in 0..b.bands {
                let r = resize_plane::<Luma<f32>>(&v[c * n..(c + 1) * n], b.width, b.height, nw, nh);
                crop(&r, &mut out, y0, x0, th, tw, nw);
            }
            Samples::F32(out)
        }
    };
    Block { bands: b.bands, height: th, width: tw, samples }
}

/// Per-pixel argmax of `logits` (`[K, H, W]`) → class ids (`[H, W]`).
pub fn argmax_mask(logits: &[f32], k: usize, h: usize, w: usize) -> Vec<u8> {
    let n = h * w;
    (0..n)
        .map(|i| {
            let mut best = 0usize;
            for c in 1..k {
                if logits[c * n + i] > logits[best * n + i] {
                    best = c;
                }
            }
            best.min(255) as u8
        })
        .collect()
}

/// Class mask as an 8-bit grayscale PNG (pixel value = class id).
pub fn mask_png(mask: &[u8], h: usize, w: usize) -> Result<Vec<u8>, ServeError> {
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(mask, w as u32, h as u32, image::ExtendedColorType::L8)
        .map_err(|e| ServeError::Internal(format!("PNG encoding failed: {e}")))?;
    Ok(out)
}

/// Row-major run-length encoding: `[[class, run], ...]`.
pub fn mask_rle(mask: &[u8]) -> Vec<[u32; 2]> {
    let mut runs: Vec<[u32; 2]> = Vec::new();
    for &v in mask {
        match runs.last_mut() {
            Some(r) if r[0] == u32::from(v) => r[1] += 1,
            _ => runs.push([u32::from(v), 1]),
        }
    }
    runs
}

/// Runs `planes` through `worker` in chunks of at most `max_batch_size`,
/// concurrently, and returns per-output tensors for all rows in order.
async fn run_rows(state: &AppState, p: &Prepared, planes: &[Block]) -> Result<Vec<Tensor>, ServeError> {
    let worker = &p.worker;
    let chunks: Vec<Tensor> =
        planes.chunks(worker.config.max_batch_size).map(|c| to_input(c, &worker.info)).collect::<Result<_, _>>()?;
    let timeout = state.limits.request_timeout;
    let results = try_join_all(chunks.into_iter().map(|t| worker.infer(t, timeout, Some(&p.arrival))))
        .await
        .map_err(ServeError::from)?;
    let n_out = worker.info.outputs.len();
    (0..n_out)
        .map(|k| {
            let parts: Vec<&Tensor> = results.iter().map(|r| &r[k]).collect();
            Tensor::concat(&parts).map_err(ServeError::from)
        })
        .collect()
}

struct Prepared {
    worker: Arc<Worker>,
    arrival: Arrival,
    planes: Vec<Block>,
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
    let grey_to_rgb = state.grey_to_rgb;
    let planes = web::block(move || decode_images(&images, &info, max_pixels, grey_to_rgb))
        .await
        .map_err(|e| ServeError::Internal(format!("decoder task failed: {e}")))??;
    state.metrics.decode_seconds.with_label_values(&[worker.label()]).observe(started.elapsed().as_secs_f64());
    Ok((Prepared { worker, arrival, planes, query }, permit))
}

/// The embedding of the one image in the request body by `worker`'s model (an embedding model): the
/// image query of a similarity search.
pub async fn embed_one(
    state: &web::Data<AppState>,
    req: &HttpRequest,
    payload: web::Payload,
    worker: Arc<Worker>,
) -> Result<Vec<f32>, ServeError> {
    let arrival = worker.announce();
    let _permit = state.permit()?;
    let images = read_images(state, req, payload).await?;
    if images.len() != 1 {
        return Err(ServeError::BadRequest(format!("send one query image, not {}", images.len())));
    }
    let info = worker.info.clone();
    let (max_pixels, grey_to_rgb) = (state.limits.max_pixels, state.grey_to_rgb);
    let started = Instant::now();
    let planes = web::block(move || decode_images(&images, &info, max_pixels, grey_to_rgb))
        .await
        .map_err(|e| ServeError::Internal(format!("decoder task failed: {e}")))??;
    state.metrics.decode_seconds.with_label_values(&[worker.label()]).observe(started.elapsed().as_secs_f64());
    let p = Prepared { worker, arrival, planes, query: ImageQuery::default() };
    let outs = run_rows(state, &p, &p.planes).await?;
    let e = output(&p.worker.info, &outs, OutputRole::Embedding)
        .ok_or_else(|| ServeError::Unprocessable(format!("model {} has no embedding output", p.worker.info.name)))?;
    Ok(e.as_f32().unwrap_or(&[]).to_vec())
}

fn output<'a>(info: &ModelInfo, outs: &'a [Tensor], role: OutputRole) -> Option<&'a Tensor> {
    info.output_index(role).and_then(|i| outs.get(i))
}

/// `POST /v1/models/{m}/embed` → `{"embeddings": [[f32; D]; N], "dim": D}`
pub async fn embed(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ServeError> {
    let (p, _permit) = accept(&state, &req, payload, Task::Embedding, "embed").await?;
    let outs = run_rows(&state, &p, &p.planes).await?;
    let e = output(&p.worker.info, &outs, OutputRole::Embedding)
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
    let (t, is_prob) = match output(info, &outs, OutputRole::Probabilities) {
        Some(t) => (t, true),
        None => (
            output(info, &outs, OutputRole::Logits).ok_or_else(|| ServeError::Internal("logits missing".into()))?,
            false,
        ),
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
        let t = output(info, outs, OutputRole::MaskLogits)
            .ok_or_else(|| ServeError::Internal("mask_logits missing".into()))?;
        let (k, h, w) = (t.shape[1], t.shape[2], t.shape[3]);
        debug_assert_eq!((h, w), (pl.height, pl.width));
        masks.push((argmax_mask(t.as_f32().unwrap_or(&[]), k, h, w), h, w, k));
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
            .body(mask_png(m, *h, *w)?));
    }
    let list = masks
        .iter()
        .map(|(m, h, w, _)| {
            Ok(if format == "png" {
                json!({ "height": h, "width": w,
                        "png_base64": base64::engine::general_purpose::STANDARD.encode(mask_png(m, *h, *w)?) })
            } else {
                json!({ "height": h, "width": w, "rle": mask_rle(m) })
            })
        })
        .collect::<Result<Vec<_>, ServeError>>()?;
    let k = masks.first().map_or(0, |m| m.3);
    Ok(HttpResponse::Ok().json(json!({
        "model": info.name, "version": info.version, "classes": k, "labels": info.labels, "masks": list,
    })))
}
