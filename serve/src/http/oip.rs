//! Open Inference Protocol v2 (KServe / Triton) over HTTP, with Triton's
//! binary tensor data extension.

use std::sync::Arc;

use actix_web::http::header::{ContentType, HeaderName};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::http::error::ServeError;
use crate::http::state::AppState;
use crate::infer::backend::ModelInfo;
use crate::infer::batcher::Worker;
use crate::infer::tensor::{DType, Data, Tensor};

/// Header giving the length of the JSON part of a binary request/response.
pub const HEADER_LEN: &str = "inference-header-content-length";

#[derive(Debug, Deserialize)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<InferInput>,
    #[serde(default)]
    outputs: Vec<RequestedOutput>,
}

#[derive(Debug, Deserialize)]
struct InferInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// A validated inference request.
#[derive(Debug)]
pub struct ParsedRequest {
    pub id: Option<String>,
    /// `[N, C, H, W]` in the model's input dtype.
    pub input: Tensor,
    /// (output index in the model, as binary)
    pub outputs: Vec<(usize, bool)>,
}

fn flatten(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flatten(x, out)),
        other => out.push(other.clone()),
    }
}

fn flag(m: &Map<String, Value>, key: &str) -> Option<bool> {
    m.get(key).and_then(Value::as_bool)
}

/// Parses and validates an infer body against `info`. `header_len` is the
/// `Inference-Header-Content-Length` value when binary data follows the JSON.
pub fn parse_request(
    body: &[u8],
    header_len: Option<usize>,
    info: &ModelInfo,
    max_pixels: u64,
) -> Result<ParsedRequest, ServeError> {
    let bad = ServeError::BadRequest;
    let (json_part, mut binary) = match header_len {
        Some(n) if n > body.len() => {
            return Err(bad(format!("Inference-Header-Content-Length is {n} but the body has {} bytes", body.len())))
        }
        Some(n) => (&body[..n], &body[n..]),
        None => (body, &[][..]),
    };
    if json_part.is_empty() {
        return Err(bad("empty body: expected an inference request (JSON)".into()));
    }
    let req: InferRequest =
        serde_json::from_slice(json_part).map_err(|e| bad(format!("invalid inference request JSON: {e}")))?;
    let spec = &info.input;
    let [inp] = req.inputs.as_slice() else {
        return Err(bad(format!("model {} takes one input `{}`; got {}", info.name, spec.name, req.inputs.len())));
    };
    if inp.name != spec.name {
        return Err(bad(format!("unknown input `{}`; model {} takes `{}`", inp.name, info.name, spec.name)));
    }
    let dtype = DType::from_oip(&inp.datatype).ok_or_else(|| {
        ServeError::Unprocessable(format!("datatype {:?} is not served; use UINT8 or FP32", inp.datatype))
    })?;
    if dtype != spec.datatype {
        return Err(ServeError::Unprocessable(format!(
            "input `{}` is {}; model {} takes {}",
            inp.name,
            inp.datatype,
            info.name,
            spec.datatype.oip_name()
        )));
    }
    let shape_err = || {
        ServeError::Unprocessable(format!(
            "input shape {:?} does not match the model's {:?} (-1 = any)",
            inp.shape, spec.shape
        ))
    };
    if inp.shape.len() != spec.shape.len() || inp.shape.iter().any(|&d| d < 1) {
        return Err(shape_err());
    }
    if inp.shape.iter().zip(&spec.shape).skip(1).any(|(&got, &want)| want >= 0 && got != want) {
        return Err(shape_err());
    }
    let shape: Vec<usize> = inp.shape.iter().map(|&d| d as usize).collect();
    let pixels = shape[2..].iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64)).unwrap_or(u64::MAX);
    if pixels > max_pixels {
        return Err(ServeError::TooLarge(format!("input of {pixels} pixels per image; the limit is {max_pixels}")));
    }
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(shape_err)?;
    let input = if let Some(size) = inp.parameters.get("binary_data_size") {
        let size = size.as_u64().ok_or_else(|| bad("binary_data_size must be a non-negative integer".into()))? as usize;
        if header_len.is_none() {
            return Err(bad("binary_data_size given without Inference-Header-Content-Length".into()));
        }
        if size > binary.len() {
            return Err(bad(format!("binary_data_size {size} exceeds the {} binary bytes sent", binary.len())));
        }
        let (chunk, rest) = binary.split_at(size);
        binary = rest;
        Tensor::from_le_bytes(shape.clone(), dtype, chunk).ok_or_else(|| {
            ServeError::Unprocessable(format!(
                "shape {:?} of {} needs {} bytes; binary_data_size is {size}",
                inp.shape,
                inp.datatype,
                numel.saturating_mul(dtype.size())
            ))
        })?
    } else {
        let data = inp
            .data
            .as_ref()
            .ok_or_else(|| bad(format!("input `{}` has neither data nor binary_data_size", inp.name)))?;
        let mut flat = Vec::with_capacity(numel);
        flatten(data, &mut flat);
        if flat.len() != numel {
            return Err(ServeError::Unprocessable(format!(
                "shape {:?} needs {numel} values; got {}",
                inp.shape,
                flat.len()
            )));
        }
        match dtype {
            DType::U8 => {
                let v = flat
                    .iter()
                    .map(|x| x.as_u64().filter(|&u| u <= 255).map(|u| u as u8))
                    .collect::<Option<Vec<u8>>>()
                    .ok_or_else(|| ServeError::Unprocessable("UINT8 data must be integers 0..=255".into()))?;
                Tensor::u8(shape, v)
            }
            DType::U16 => {
                let v = flat
                    .iter()
                    .map(|x| x.as_u64().filter(|&u| u <= 65535).map(|u| u as u16))
                    .collect::<Option<Vec<u16>>>()
                    .ok_or_else(|| ServeError::Unprocessable("UINT16 data must be integers 0..=65535".into()))?;
                Tensor::u16(shape, v)
            }
            DType::F32 => {
                let v = flat
                    .iter()
                    .map(|x| x.as_f64().map(|f| f as f32))
                    .collect::<Option<Vec<f32>>>()
                    .ok_or_else(|| ServeError::Unprocessable("FP32 data must be numbers".into()))?;
                Tensor::f32(shape, v)
            }
        }
    };
    if !binary.is_empty() {
        return Err(bad(format!("{} binary bytes after the last tensor", binary.len())));
    }
    if let Data::F32(v) = &input.data {
        if v.iter().any(|x| !x.is_finite()) {
            return Err(ServeError::Unprocessable("input contains NaN or infinite values".into()));
        }
    }
    let all_binary = flag(&req.parameters, "binary_data_output").unwrap_or(false);
    let outputs = if req.outputs.is_empty() {
        (0..info.outputs.len()).map(|i| (i, all_binary)).collect()
    } else {
        req.outputs
            .iter()
            .map(|o| {
                let i = info.outputs.iter().position(|s| s.name == o.name).ok_or_else(|| {
                    bad(format!(
                        "unknown output `{}`; model {} has {:?}",
                        o.name,
                        info.name,
                        info.outputs.iter().map(|s| &s.name).collect::<Vec<_>>()
                    ))
                })?;
                Ok((i, flag(&o.parameters, "binary_data").unwrap_or(all_binary)))
            })
            .collect::<Result<Vec<_>, ServeError>>()?
    };
    Ok(ParsedRequest { id: req.id, input, outputs })
}

#[derive(Serialize)]
#[serde(untagged)]
enum OutData<'a> {
    F32(&'a [f32]),
    U8(&'a [u8]),
    U16(&'a [u16]),
}

#[derive(Serialize)]
struct OutTensor<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [usize],
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<OutData<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
}

#[derive(Serialize)]
struct InferResponse<'a> {
    model_name: &'a str,
    model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: Vec<OutTensor<'a>>,
}

/// Builds the infer response: plain JSON, or JSON + binary tensors with
/// `Inference-Header-Content-Length` when any output is binary.
pub fn build_response(info: &ModelInfo, req: &ParsedRequest, outputs: &[Tensor]) -> HttpResponse {
    let mut binary: Vec<u8> = Vec::new();
    let mut outs = Vec::with_capacity(req.outputs.len());
    for &(i, as_binary) in &req.outputs {
        let t = &outputs[i];
        let (data, parameters) = if as_binary {
            let start = binary.len();
            binary.extend_from_slice(&t.to_le_bytes());
            (None, Some(json!({ "binary_data_size": binary.len() - start })))
        } else {
            let d = match &t.data {
                Data::F32(v) => OutData::F32(v),
                Data::U8(v) => OutData::U8(v),
                Data::U16(v) => OutData::U16(v),
            };
            (Some(d), None)
        };
        outs.push(OutTensor {
            name: &info.outputs[i].name,
            datatype: t.dtype().oip_name(),
            shape: &t.shape,
            data,
            parameters,
        });
    }
    let any_binary = req.outputs.iter().any(|o| o.1);
    let head = InferResponse {
        model_name: &info.name,
        model_version: info.version.to_string(),
        id: req.id.as_deref(),
        outputs: outs,
    };
    let head = serde_json::to_vec(&head).unwrap_or_default();
    if !any_binary {
        return HttpResponse::Ok().content_type(ContentType::json()).body(head);
    }
    let len = head.len();
    let mut body = head;
    body.extend_from_slice(&binary);
    HttpResponse::Ok()
        .content_type(ContentType::octet_stream())
        .insert_header((HeaderName::from_static(HEADER_LEN), len.to_string()))
        .body(body)
}

fn route_model<'a>(state: &'a AppState, req: &HttpRequest) -> Result<&'a Arc<Worker>, ServeError> {
    let m = req.match_info().get("m").unwrap_or_default();
    state.lookup(m, req.match_info().get("v"))
}

/// `GET /v2`
pub async fn server_metadata() -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "name": "geossl-serve",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
}

/// `GET /v2/health/live`
pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "live": true }))
}

/// `GET /v2/health/ready`: 200 while serving, 503 while draining.
pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    if state.is_ready() {
        HttpResponse::Ok().json(json!({ "ready": true }))
    } else {
        HttpResponse::ServiceUnavailable().json(json!({ "ready": false, "error": "draining" }))
    }
}

/// `GET /v2/models/{m}[/versions/{v}]`
pub async fn model_metadata(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ServeError> {
    state.authorize(&req)?;
    let w = route_model(&state, &req)?;
    let i = &w.info;
    let versions: Vec<String> =
        state.models.get(&i.name).map(|v| v.keys().map(u64::to_string).collect()).unwrap_or_default();
    Ok(HttpResponse::Ok().json(json!({
        "name": i.name,
        "versions": versions,
        "platform": "onnxruntime_onnx",
        "inputs": [i.input],
        "outputs": i.outputs,
        "parameters": {
            "task": i.task,
            "labels": i.labels,
            "max_batch_size": w.config.max_batch_size,
            "execution_provider": i.execution_provider,
        },
    })))
}

/// `GET /v2/models/{m}[/versions/{v}]/ready`
pub async fn model_ready(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ServeError> {
    state.authorize(&req)?;
    let w = route_model(&state, &req)?;
    Ok(HttpResponse::Ok().json(json!({ "name": w.info.name, "ready": true })))
}

/// `POST /v2/models/{m}[/versions/{v}]/infer`
pub async fn infer(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ServeError> {
    state.authorize(&req)?;
    let worker = route_model(&state, &req)?.clone();
    let arrival = worker.announce();
    let _permit = state.permit()?;
    let header_len = match req.headers().get(HEADER_LEN) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| ServeError::BadRequest("Inference-Header-Content-Length is not a number".into()))?,
        ),
    };
    let body = state.read_body(&req, payload).await?;
    let max_pixels = state.limits.max_pixels;
    let w = worker.clone();
    let parsed = web::block(move || parse_request(&body, header_len, &w.info, max_pixels))
        .await
        .map_err(|e| ServeError::Internal(format!("parser task failed: {e}")))??;
    let mut parsed = parsed;
    let input = std::mem::replace(&mut parsed.input, Tensor::u8(vec![0], Vec::new()));
    let outputs = worker.infer(input, state.limits.request_timeout, Some(&arrival)).await?;
    Ok(build_response(&worker.info, &parsed, &outputs))
}
