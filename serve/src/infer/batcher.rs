//! Dynamic batching: requests for one model wait in a bounded queue; worker
//! threads, each owning one backend session, merge them up to
//! `max_batch_size` rows within `max_queue_delay`, run one inference and hand
//! each request its rows back.
//!
//! The window is adaptive: handlers [announce](Worker::announce) a request as
//! soon as they know its model, before reading and decoding its body. A worker
//! holding a partial batch waits while announced requests are still on their
//! way, or while its previous batch merged several requests (sustained
//! concurrent load: clients are re-sending, company is coming); otherwise a
//! lone request runs at once instead of paying the whole window.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use tokio::sync::oneshot;

use crate::infer::backend::{Backend, ModelInfo};
use crate::infer::tensor::Tensor;
use crate::infer::{InferError, InferMetrics};

/// Batching limits of one model (from its `config.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Most rows in one backend call; also the largest request accepted.
    pub max_batch_size: usize,
    /// How long the first request of a batch waits for company.
    pub max_queue_delay: Duration,
    /// Requests that may wait; one more gets 429.
    pub queue_capacity: usize,
    /// Worker threads (one backend session each).
    pub instances: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self { max_batch_size: 32, max_queue_delay: Duration::from_millis(5), queue_capacity: 64, instances: 1 }
    }
}

type Reply = Result<Vec<Tensor>, InferError>;

struct Job {
    input: Tensor,
    enqueued: Instant,
    deadline: Instant,
    reply: oneshot::Sender<Reply>,
}

/// The queue of one model version and its worker threads. Dropping the last
/// handle closes the queue; workers finish what they hold and exit.
#[derive(Debug)]
pub struct Worker {
    pub info: Arc<ModelInfo>,
    pub config: BatchConfig,
    tx: Sender<Job>,
    metrics: Arc<InferMetrics>,
    label: String,
    arriving: Arc<AtomicUsize>,
}

/// A request announced to a worker and not yet queued: while any exists, a
/// worker with a partial batch waits (up to `max_queue_delay`) for it.
/// Settled by its first [`Worker::infer`] or when dropped.
#[derive(Debug)]
pub struct Arrival {
    arriving: Arc<AtomicUsize>,
    settled: AtomicBool,
}

impl Arrival {
    fn settle(&self) {
        if !self.settled.swap(true, Ordering::SeqCst) {
            self.arriving.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Arrival {
    fn drop(&mut self) {
        self.settle();
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("shape", &self.input.shape).finish()
    }
}

impl Worker {
    /// Starts `config.instances` threads, each owning one backend from
    /// `backends` (which must yield that many).
    pub fn start(
        info: ModelInfo,
        config: BatchConfig,
        backends: Vec<Box<dyn Backend>>,
        metrics: Arc<InferMetrics>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(config.queue_capacity.max(1));
        let label = format!("{}/{}", info.name, info.version);
        let arriving = Arc::new(AtomicUsize::new(0));
        for (i, backend) in backends.into_iter().enumerate() {
            let queue = Queue { rx: rx.clone(), arriving: arriving.clone() };
            let metrics = metrics.clone();
            let label = label.clone();
            std::thread::Builder::new()
                .name(format!("infer-{}-{}-{i}", info.name, info.version))
                .spawn(move || run_worker(backend, queue, config, metrics, label))?;
        }
        Ok(Self { info: Arc::new(info), config, tx, metrics, label, arriving })
    }

    /// Announces a request that will call [`infer`](Self::infer) once its body
    /// is read and decoded, so that a batch being formed waits for it.
    pub fn announce(&self) -> Arrival {
        self.arriving.fetch_add(1, Ordering::SeqCst);
        Arrival { arriving: self.arriving.clone(), settled: AtomicBool::new(false) }
    }

    /// Model label used in metrics: `name/version`.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Queues `input` (`[n, C, H, W]`, n ≤ `max_batch_size`) and waits for its
    /// outputs. Fails fast with 429 when the queue is full. `arrival`, the
    /// request's announcement if it made one, is settled once the job is queued.
    pub async fn infer(
        &self,
        input: Tensor,
        timeout: Duration,
        arrival: Option<&Arrival>,
    ) -> Result<Vec<Tensor>, InferError> {
        let n = input.batch();
        if n == 0 || n > self.config.max_batch_size {
            return Err(InferError::Invalid(format!(
                "batch of {n} rows; model {} takes 1 to {} per request",
                self.label, self.config.max_batch_size
            )));
        }
        let (reply, rx) = oneshot::channel();
        let now = Instant::now();
        let job = Job { input, enqueued: now, deadline: now + timeout, reply };
        let sent = self.tx.try_send(job);
        if let Some(a) = arrival {
            a.settle();
        }
        match sent {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.metrics.rejected.with_label_values(&[&self.label, "queue_full"]).inc();
                return Err(InferError::Overloaded {
                    message: format!(
                        "model {} is overloaded: {} requests already queued",
                        self.label, self.config.queue_capacity
                    ),
                    retry_after_s: 1,
                });
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(InferError::Closed(format!("model {} is shutting down", self.label)))
            }
        }
        self.metrics.queue_depth.with_label_values(&[&self.label]).set(self.tx.len() as i64);
        rx.await.map_err(|_| InferError::Backend(format!("the worker of model {} stopped", self.label)))?
    }
}

/// Drops jobs whose client went away or whose deadline passed; true when the
/// job should run.
fn still_wanted(job: &Job, metrics: &InferMetrics, label: &str) -> bool {
    if job.reply.is_closed() {
        metrics.rejected.with_label_values(&[label, "client_gone"]).inc();
        return false;
    }
    true
}

fn expired(job: Job, metrics: &InferMetrics, label: &str, now: Instant) -> Option<Job> {
    if now < job.deadline {
        return Some(job);
    }
    metrics.rejected.with_label_values(&[label, "deadline"]).inc();
    let waited = now.duration_since(job.enqueued);
    let _ = job.reply.send(Err(InferError::Overloaded {
        message: format!("request waited {} ms in the queue, past its deadline; server overloaded", waited.as_millis()),
        retry_after_s: 1,
    }));
    None
}

/// A worker's end of the queue.
struct Queue {
    rx: Receiver<Job>,
    arriving: Arc<AtomicUsize>,
}

/// How often a waiting worker re-checks whether anything is still arriving.
const ARRIVAL_POLL: Duration = Duration::from_micros(250);

impl Queue {
    /// The next job within `until`, or `None` when the window closed, the
    /// queue shut down, or (unless `patient`) the queue is empty with nothing
    /// announced.
    fn next_before(&self, until: Instant, patient: bool) -> Option<Job> {
        loop {
            if let Ok(j) = self.rx.try_recv() {
                return Some(j);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || (!patient && self.arriving.load(Ordering::SeqCst) == 0) {
                return None;
            }
            match self.rx.recv_timeout(left.min(ARRIVAL_POLL)) {
                Ok(j) => return Some(j),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }
}

fn run_worker(
    mut backend: Box<dyn Backend>,
    queue: Queue,
    config: BatchConfig,
    metrics: Arc<InferMetrics>,
    label: String,
) {
    let mut held: Option<Job> = None;
    // Requests merged into the previous batch: more than one means load.
    let mut last_jobs = 1usize;
    loop {
        let first = match held.take() {
            Some(j) => j,
            None => match queue.rx.recv() {
                Ok(j) => j,
                Err(_) => return, // queue closed: shutdown
            },
        };
        let Some(first) = expired(first, &metrics, &label, Instant::now()) else { continue };
        if !still_wanted(&first, &metrics, &label) {
            continue;
        }
        let mut rows = first.input.batch();
        let mut jobs = vec![first];
        let until = Instant::now() + config.max_queue_delay;
        while rows < config.max_batch_size {
            let Some(next) = queue.next_before(until, last_jobs > 1) else { break };
            let Some(next) = expired(next, &metrics, &label, Instant::now()) else { continue };
            if !still_wanted(&next, &metrics, &label) {
                continue;
            }
            let fits = next.input.shape[1..] == jobs[0].input.shape[1..]
                && next.input.dtype() == jobs[0].input.dtype()
                && rows + next.input.batch() <= config.max_batch_size;
            if !fits {
                held = Some(next);
                break;
            }
            rows += next.input.batch();
            jobs.push(next);
        }
        metrics.queue_depth.with_label_values(&[&label]).set(queue.rx.len() as i64);
        last_jobs = jobs.len();
        run_batch(backend.as_mut(), jobs, &metrics, &label);
    }
}

fn run_batch(backend: &mut dyn Backend, jobs: Vec<Job>, metrics: &InferMetrics, label: &str) {
    let start = Instant::now();
    for j in &jobs {
        metrics.queue_seconds.with_label_values(&[label]).observe(start.duration_since(j.enqueued).as_secs_f64());
    }
    let sizes: Vec<usize> = jobs.iter().map(|j| j.input.batch()).collect();
    let rows: usize = sizes.iter().sum();
    let result = if jobs.len() == 1 {
        backend.infer(&jobs[0].input)
    } else {
        let parts: Vec<&Tensor> = jobs.iter().map(|j| &j.input).collect();
        match Tensor::concat(&parts) {
            Ok(batch) => backend.infer(&batch),
            Err(e) => Err(crate::infer::BackendError(e.to_string())),
        }
    };
    metrics.inference_seconds.with_label_values(&[label]).observe(start.elapsed().as_secs_f64());
    metrics.batch_size.with_label_values(&[label]).observe(rows as f64);
    let outputs = result.map_err(|e| InferError::Backend(format!("inference failed: {e}")));
    let split: Result<Vec<Vec<Tensor>>, InferError> = outputs.and_then(|outs| {
        let mut per_job: Vec<Vec<Tensor>> = sizes.iter().map(|_| Vec::with_capacity(outs.len())).collect();
        for o in outs {
            for (k, piece) in o.split(&sizes)?.into_iter().enumerate() {
                per_job[k].push(piece);
            }
        }
        Ok(per_job)
    });
    match split {
        Ok(per_job) => {
            for (job, outs) in jobs.into_iter().zip(per_job) {
                let _ = job.reply.send(Ok(outs));
            }
        }
        Err(e) => {
            for job in jobs {
                let _ = job.reply.send(Err(InferError::Backend(e.to_string())));
            }
        }
    }
}
