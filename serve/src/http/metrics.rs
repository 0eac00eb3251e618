//! Prometheus metrics, served on `--metrics-port`: the service's own (requests, latency, decoding) and
//! the engine's ([`crate::infer::InferMetrics`]), in one registry.

use std::sync::Arc;

use prometheus::{Encoder, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder};

use crate::infer::metrics::{hist, seconds_buckets};
use crate::infer::InferMetrics;

/// All metrics of one server; cheap to share behind an `Arc`.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Requests by model, endpoint (route pattern) and status code.
    pub requests: IntCounterVec,
    /// Whole-request latency by model and endpoint.
    pub request_seconds: HistogramVec,
    /// Image decoding and resizing.
    pub decode_seconds: HistogramVec,
    /// Similarity search: time in the index by index and operation (search, classify); its count's rate
    /// is the QPS.
    pub search_seconds: HistogramVec,
    /// The engine's: queues, batches, backend time.
    pub infer: Arc<InferMetrics>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = Self {
            requests: IntCounterVec::new(
                Opts::new("geossl_requests_total", "HTTP requests by model, endpoint and status"),
                &["model", "endpoint", "status"],
            )
            .expect("valid counter"),
            request_seconds: hist(
                "geossl_request_duration_seconds",
                "HTTP request latency",
                &["model", "endpoint"],
                seconds_buckets(),
            ),
            decode_seconds: hist(
                "geossl_decode_duration_seconds",
                "Image decode and resize time",
                &["model"],
                seconds_buckets(),
            ),
            search_seconds: hist(
                "geossl_search_duration_seconds",
                "Time answering a search or classification in the index (HTTP excluded)",
                &["index", "op"],
                seconds_buckets(),
            ),
            infer: Arc::new(InferMetrics::new(&registry)),
            registry,
        };
        for c in [
            Box::new(m.requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.request_seconds.clone()),
            Box::new(m.decode_seconds.clone()),
            Box::new(m.search_seconds.clone()),
        ] {
            m.registry.register(c).expect("unique metric names");
        }
        m
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}
