//! Prometheus metrics, served on `--metrics-port`.

use prometheus::{
    exponential_buckets, Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// All metrics of one server; cheap to share behind an `Arc`.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Requests by model, endpoint (route pattern) and status code.
    pub requests: IntCounterVec,
    /// Whole-request latency by model and endpoint.
    pub request_seconds: HistogramVec,
    /// Time from enqueue to the start of the batch.
    pub queue_seconds: HistogramVec,
    /// Image decoding and resizing.
    pub decode_seconds: HistogramVec,
    /// One backend call (a whole batch).
    pub inference_seconds: HistogramVec,
    /// Rows per backend call.
    pub batch_size: HistogramVec,
    /// Requests waiting in each model's queue.
    pub queue_depth: IntGaugeVec,
    /// Requests turned away before inference, by model and reason.
    pub rejected: IntCounterVec,
}

fn hist(name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels).expect("valid histogram")
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let secs = || exponential_buckets(0.0001, 2.0, 18).expect("valid buckets");
        let m = Self {
            registry: Registry::new(),
            requests: IntCounterVec::new(
                Opts::new("geossl_requests_total", "HTTP requests by model, endpoint and status"),
                &["model", "endpoint", "status"],
            )
            .expect("valid counter"),
            request_seconds: hist(
                "geossl_request_duration_seconds",
                "HTTP request latency",
                &["model", "endpoint"],
                secs(),
            ),
            queue_seconds: hist(
                "geossl_queue_duration_seconds",
                "Time spent queued before a batch",
                &["model"],
                secs(),
            ),
            decode_seconds: hist("geossl_decode_duration_seconds", "Image decode and resize time", &["model"], secs()),
            inference_seconds: hist("geossl_inference_duration_seconds", "Backend time per batch", &["model"], secs()),
            batch_size: hist(
                "geossl_batch_size",
                "Rows per backend call",
                &["model"],
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
            ),
            queue_depth: IntGaugeVec::new(Opts::new("geossl_queue_depth", "Requests waiting per model"), &["model"])
                .expect("valid gauge"),
            rejected: IntCounterVec::new(
                Opts::new("geossl_rejected_total", "Requests dropped before inference"),
                &["model", "reason"],
            )
            .expect("valid counter"),
        };
        for c in [
            Box::new(m.requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.request_seconds.clone()),
            Box::new(m.queue_seconds.clone()),
            Box::new(m.decode_seconds.clone()),
            Box::new(m.inference_seconds.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.queue_depth.clone()),
            Box::new(m.rejected.clone()),
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
