//! The engine's Prometheus metrics: queues, batches and backend time per model. They register into the
//! registry the service exposes.

use prometheus::{exponential_buckets, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// Metrics of the batchers and backends of one process.
#[derive(Debug, Clone)]
pub struct InferMetrics {
    /// Time from enqueue to the start of the batch.
    pub queue_seconds: HistogramVec,
    /// One backend call (a whole batch).
    pub inference_seconds: HistogramVec,
    /// Rows per backend call.
    pub batch_size: HistogramVec,
    /// Requests waiting in each model's queue.
    pub queue_depth: IntGaugeVec,
    /// Requests turned away before inference, by model and reason.
    pub rejected: IntCounterVec,
}

/// Latency buckets from 0.1 ms to ~13 s.
pub fn seconds_buckets() -> Vec<f64> {
    exponential_buckets(0.0001, 2.0, 18).expect("valid buckets")
}

pub(crate) fn hist(name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels).expect("valid histogram")
}

impl InferMetrics {
    /// The engine's metrics, registered in `registry`.
    pub fn new(registry: &Registry) -> Self {
        let m = Self {
            queue_seconds: hist(
                "geossl_queue_duration_seconds",
                "Time spent queued before a batch",
                &["model"],
                seconds_buckets(),
            ),
            inference_seconds: hist(
                "geossl_inference_duration_seconds",
                "Backend time per batch",
                &["model"],
                seconds_buckets(),
            ),
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
            Box::new(m.queue_seconds.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.inference_seconds.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.queue_depth.clone()),
            Box::new(m.rejected.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        m
    }
}
