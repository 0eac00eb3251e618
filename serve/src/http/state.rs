//! Shared server state: loaded models and search indexes, limits, readiness, metrics.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header;
use actix_web::{web, HttpRequest};
use futures_util::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::http::error::ServeError;
use crate::http::metrics::Metrics;
use crate::http::repository::parse_version;
use crate::infer::batcher::Worker;
use crate::search::index::Index;

/// Request limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Largest decoded image in pixels (413 beyond, checked from the header).
    pub max_pixels: u64,
    /// Time a request may wait for inference (429 when it expires in the queue).
    pub request_timeout: Duration,
    /// Requests being read, decoded or inferred at once (429 beyond).
    pub max_inflight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 32 << 20,
            max_pixels: 64 << 20,
            request_timeout: Duration::from_secs(30),
            max_inflight: 512,
        }
    }
}

/// Everything handlers share.
#[derive(Debug)]
pub struct AppState {
    /// name → version → worker.
    pub models: BTreeMap<String, BTreeMap<u64, Arc<Worker>>>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// Replicate one-band (grey) images into three bands for three-band models (`--grey-to-rgb`).
    pub grey_to_rgb: bool,
    /// Similarity-search indexes by name (`--index NAME=LOCATION`).
    pub indexes: BTreeMap<String, Arc<Index>>,
    /// SHA-256 of each model's ONNX file by name and version: an image query of an index must come from
    /// the index's model.
    pub model_sha256: BTreeMap<(String, u64), String>,
    api_key: Option<String>,
    ready: AtomicBool,
    inflight: Arc<Semaphore>,
}

impl AppState {
    pub fn new(workers: Vec<Worker>, metrics: Arc<Metrics>, limits: Limits, api_key: Option<String>) -> Self {
        let mut models: BTreeMap<String, BTreeMap<u64, Arc<Worker>>> = BTreeMap::new();
        for w in workers {
            models.entry(w.info.name.clone()).or_default().insert(w.info.version, Arc::new(w));
        }
        Self {
            models,
            metrics,
            limits,
            grey_to_rgb: false,
            indexes: BTreeMap::new(),
            model_sha256: BTreeMap::new(),
            api_key: api_key.filter(|k| !k.is_empty()),
            ready: AtomicBool::new(true),
            inflight: Arc::new(Semaphore::new(limits.max_inflight.max(1))),
        }
    }

    /// With one-band images replicated for three-band models.
    pub fn with_grey_to_rgb(mut self, on: bool) -> Self {
        self.grey_to_rgb = on;
        self
    }

    /// With these search indexes.
    pub fn with_indexes(mut self, indexes: BTreeMap<String, Arc<Index>>) -> Self {
        self.indexes = indexes;
        self
    }

    /// With the models' file hashes.
    pub fn with_model_sha256(mut self, hashes: BTreeMap<(String, u64), String>) -> Self {
        self.model_sha256 = hashes;
        self
    }

    /// The index `name`, or 404.
    pub fn index(&self, name: &str) -> Result<&Arc<Index>, ServeError> {
        self.indexes.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.indexes.keys().map(String::as_str).collect();
            ServeError::NotFound(format!("unknown index {name:?} (this server has {known:?})"))
        })
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Readiness turns false when draining starts.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// The worker for `name` at `version` (the newest when `None`).
    pub fn lookup(&self, name: &str, version: Option<&str>) -> Result<&Arc<Worker>, ServeError> {
        let versions = self.models.get(name).ok_or_else(|| ServeError::NotFound(format!("unknown model {name:?}")))?;
        match version {
            None | Some("") => versions.values().next_back().ok_or_else(|| ServeError::NotFound(name.to_string())),
            Some(v) => parse_version(v)
                .and_then(|v| versions.get(&v))
                .ok_or_else(|| ServeError::NotFound(format!("model {name:?} has no version {v:?}"))),
        }
    }

    /// Checks the bearer token when an API key is configured.
    pub fn authorize(&self, req: &HttpRequest) -> Result<(), ServeError> {
        let Some(key) = &self.api_key else { return Ok(()) };
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Constant-time comparison of equal-length strings.
        let ok = given.len() == key.len() && given.bytes().zip(key.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0;
        if ok {
            Ok(())
        } else {
            Err(ServeError::Unauthorized("missing or wrong API key (Authorization: Bearer <key>)".into()))
        }
    }

    /// An in-flight slot, or 429.
    pub fn permit(&self) -> Result<OwnedSemaphorePermit, ServeError> {
        self.inflight.clone().try_acquire_owned().map_err(|_| ServeError::Overloaded {
            message: format!("server overloaded: {} requests in flight", self.limits.max_inflight),
            retry_after_s: 1,
        })
    }

    /// Reads the whole body, refusing more than `max_body_bytes` (413).
    pub async fn read_body(&self, req: &HttpRequest, mut payload: web::Payload) -> Result<web::Bytes, ServeError> {
        let limit = self.limits.max_body_bytes;
        let too_large = |n: String| ServeError::TooLarge(format!("request body of {n} bytes; the limit is {limit}"));
        let declared =
            req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if let Some(n) = declared {
            if n > limit as u64 {
                return Err(too_large(n.to_string()));
            }
        }
        let mut buf = web::BytesMut::with_capacity(declared.map_or(0, |n| n as usize));
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| ServeError::BadRequest(format!("reading the body: {e}")))?;
            if buf.len() + chunk.len() > limit {
                return Err(too_large(format!("more than {limit}")));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }
}
