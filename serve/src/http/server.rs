//! Routes, the request-metrics middleware, model loading with warm-up, and
//! the server's lifecycle (bind after warm-up, SIGTERM drain).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpResponse, HttpServer};

use crate::http::error::ServeError;
use crate::http::metrics::Metrics;
use crate::http::repository;
use crate::http::state::{AppState, Limits};
use crate::http::{images, oip, search};
use crate::infer::backend::{Backend, ModelInfo};
use crate::infer::batcher::Worker;
use crate::infer::ort::{self, OrtBackend, SessionOptions};
use crate::infer::tensor::{DType, Tensor};
use crate::search::index::Index;

/// The OpenAPI document of this server.
pub const OPENAPI: &str = include_str!("../../openapi.json");

async fn not_found() -> Result<HttpResponse, ServeError> {
    Err(ServeError::NotFound("no such route (see /openapi.json)".into()))
}

async fn openapi() -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(OPENAPI)
}

/// `GET /v1/models`: every loaded model version.
async fn list_models(state: web::Data<AppState>, req: actix_web::HttpRequest) -> Result<HttpResponse, ServeError> {
    state.authorize(&req)?;
    let models: Vec<_> = state
        .models
        .values()
        .flat_map(|v| v.values())
        .map(|w| {
            serde_json::json!({
                "name": w.info.name, "version": w.info.version, "task": w.info.task,
                "input": w.info.input, "execution_provider": w.info.execution_provider,
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "models": models })))
}

/// Counts every response by model (known names only), route and status.
async fn track(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let start = Instant::now();
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let res = next.call(req).await?;
    if let Some(state) = state {
        let endpoint = res.request().match_pattern().unwrap_or_else(|| "unmatched".into());
        let model =
            res.request().match_info().get("m").filter(|m| state.models.contains_key(*m)).unwrap_or("-").to_string();
        let status = res.status().as_u16().to_string();
        state.metrics.requests.with_label_values(&[&model, &endpoint, &status]).inc();
        state.metrics.request_seconds.with_label_values(&[&model, &endpoint]).observe(start.elapsed().as_secs_f64());
    }
    Ok(res.map_into_boxed_body())
}

/// The application: every route over `state`.
pub fn app(
    state: web::Data<AppState>,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<BoxBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let m = "/v2/models/{m}";
    let mv = "/v2/models/{m}/versions/{v}";
    // The router tries routes in order, a regex for each pattern with a segment to capture: the search routes,
    // the ones called thousands of times a second, come first.
    App::new()
        .app_data(state)
        .wrap(from_fn(track))
        .route("/v1/indexes/{index}/search", web::post().to(search::search))
        .route("/v1/indexes/{index}/classify", web::post().to(search::classify))
        .route("/v2", web::get().to(oip::server_metadata))
        .route("/v2/health/live", web::get().to(oip::live))
        .route("/v2/health/ready", web::get().to(oip::ready))
        .route(m, web::get().to(oip::model_metadata))
        .route(mv, web::get().to(oip::model_metadata))
        .route(&format!("{m}/ready"), web::get().to(oip::model_ready))
        .route(&format!("{mv}/ready"), web::get().to(oip::model_ready))
        .route(&format!("{m}/infer"), web::post().to(oip::infer))
        .route(&format!("{mv}/infer"), web::post().to(oip::infer))
        .route("/v1/models", web::get().to(list_models))
        .route("/v1/models/{m}/embed", web::post().to(images::embed))
        .route("/v1/models/{m}/classify", web::post().to(images::classify))
        .route("/v1/models/{m}/segment", web::post().to(images::segment))
        .route("/v1/indexes", web::get().to(search::list))
        .route("/openapi.json", web::get().to(openapi))
        .default_service(web::to(not_found))
}

/// Server options (the `serve` subcommand's flags).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// None: a search-only server (image queries need the index's model).
    pub model_repository: Option<PathBuf>,
    /// Similarity-search indexes: (name, location).
    pub indexes: Vec<(String, String)>,
    pub host: String,
    pub port: u16,
    pub metrics_port: u16,
    pub ort_lib: PathBuf,
    pub session: SessionOptions,
    pub limits: Limits,
    pub api_key: Option<String>,
    /// Time between readiness turning false and the listener closing.
    pub drain_delay: Duration,
    /// Time in-flight requests get to finish after the listener closes.
    pub shutdown_timeout: Duration,
    /// HTTP worker threads (0 = one per core).
    pub http_workers: usize,
    /// Replicate one-band (grey) images into three bands for three-band models.
    pub grey_to_rgb: bool,
}

/// A zero input of `[n, C, H, W]` for warm-up; dynamic sizes use 224 (or the
/// spec's input size).
fn warmup_input(info: &ModelInfo, n: usize) -> Tensor {
    let size = info
        .metadata
        .get(geossl_models::io::metadata::SPEC)
        .and_then(|s| serde_json::from_str::<geossl_models::ModelSpec>(s).ok())
        .map_or([224, 224], |s| s.input_size);
    let (c, h, w) = info.input_chw();
    let shape = vec![n, c.max(1), h.unwrap_or(size[0]), w.unwrap_or(size[1])];
    let len = shape.iter().product();
    match info.input.datatype {
        DType::U8 => Tensor::u8(shape, vec![0; len]),
        DType::U16 => Tensor::u16(shape, vec![0; len]),
        DType::F32 => Tensor::f32(shape, vec![0.0; len]),
    }
}

/// Why the server could not start its models.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Repository(#[from] repository::RepositoryError),
    #[error(transparent)]
    Load(#[from] crate::infer::LoadError),
    #[error("{model}: warm-up with batch {batch} failed: {message}")]
    Warmup { model: String, batch: usize, message: String },
    #[error("starting workers: {0}")]
    Workers(#[from] std::io::Error),
    #[error("index {name}: {source}")]
    Index { name: String, source: crate::search::SearchError },
}

/// A loaded model's worker and the SHA-256 of its ONNX file.
#[derive(Debug)]
pub struct Loaded {
    pub worker: Worker,
    pub sha256: String,
}

/// Opens every `--index NAME=LOCATION` (manifest, vectors and rows into memory).
pub fn load_indexes(opts: &ServeOptions) -> Result<BTreeMap<String, Arc<Index>>, StartError> {
    let mut out = BTreeMap::new();
    for (name, location) in &opts.indexes {
        let started = Instant::now();
        let index = Index::open(location).map_err(|source| StartError::Index { name: name.clone(), source })?;
        tracing::info!(index = %name, %location, rows = index.len(), dimensions = index.dimensions(),
            model = %index.manifest.model.name, simd = %index.acceleration(), load_ms = started.elapsed().as_millis() as u64, "index ready");
        out.insert(name.clone(), Arc::new(index));
    }
    if !out.is_empty() && crate::search::pages::release_free_heap() {
        tracing::debug!("the rows files' dropped buffers handed back to the kernel");
    }
    Ok(out)
}

/// Loads every model version of the repository, warms each session up
/// (batch 1 and `max_batch_size`) and starts its workers.
pub fn load_models(opts: &ServeOptions, metrics: &Arc<Metrics>) -> Result<Vec<Loaded>, StartError> {
    let Some(repo) = &opts.model_repository else { return Ok(Vec::new()) };
    let entries = repository::scan(repo)?;
    let env = ort::init(&opts.ort_lib)?;
    let mut workers = Vec::new();
    for e in entries {
        let batch = e.config.batch_config()?;
        let mut session = opts.session.clone();
        if let Some(ep) = e.config.execution_provider {
            session.ep = ep;
        }
        if let Some(t) = e.config.intra_threads {
            session.intra_threads = t;
        }
        let started = Instant::now();
        let card = e.card.as_deref().map(ort::read_card).transpose()?.map(|(_, c)| c);
        let mut backends: Vec<Box<dyn Backend>> = Vec::new();
        let mut info = None;
        for _ in 0..batch.instances {
            let (mut b, sig) = OrtBackend::load(env, &e.model_path, &session)?;
            let i = sig.into_info(&e.name, e.version, e.config.labels.clone(), card.as_ref())?;
            for n in [1, batch.max_batch_size] {
                b.infer(&warmup_input(&i, n)).map_err(|err| StartError::Warmup {
                    model: e.model_path.display().to_string(),
                    batch: n,
                    message: err.to_string(),
                })?;
            }
            backends.push(Box::new(b));
            info = Some(i);
        }
        let Some(info) = info else { continue }; // instances ≥ 1 (checked by the repository)
        tracing::info!(
            model = %e.name, version = e.version, task = ?info.task, execution_provider = %info.execution_provider,
            input = ?info.input.shape, max_batch_size = batch.max_batch_size, instances = batch.instances,
            warmup_ms = started.elapsed().as_millis() as u64,
            contract = e.card.as_ref().map_or_else(|| "onnx metadata".to_string(), |p| p.display().to_string()),
            "model ready"
        );
        let bytes = std::fs::read(&e.model_path)?;
        let sha256 = geossl_models::sha256_hex(&bytes);
        workers.push(Loaded { worker: Worker::start(info, batch, backends, metrics.infer.clone())?, sha256 });
    }
    Ok(workers)
}

/// Addresses the server listens on, once bound.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub http: SocketAddr,
    pub metrics: SocketAddr,
}

/// Runs the server until SIGTERM/SIGINT: load and warm up every model, open every index, bind
/// (only then), serve; on a signal turn readiness false, wait `drain_delay`,
/// stop accepting and let in-flight requests finish.
pub async fn run(opts: ServeOptions, on_bound: impl FnOnce(Bound)) -> anyhow::Result<()> {
    use anyhow::Context;
    let metrics = Arc::new(Metrics::new());
    let o = opts.clone();
    let m = metrics.clone();
    let loaded = tokio::task::spawn_blocking(move || load_models(&o, &m))
        .await
        .context("model loading task")?
        .context("loading the model repository")?;
    let o = opts.clone();
    let indexes = tokio::task::spawn_blocking(move || load_indexes(&o))
        .await
        .context("index loading task")?
        .context("loading the indexes")?;
    let hashes =
        loaded.iter().map(|l| ((l.worker.info.name.clone(), l.worker.info.version), l.sha256.clone())).collect();
    let workers = loaded.into_iter().map(|l| l.worker).collect();
    let state = web::Data::new(
        AppState::new(workers, metrics.clone(), opts.limits, opts.api_key.clone())
            .with_grey_to_rgb(opts.grey_to_rgb)
            .with_indexes(indexes)
            .with_model_sha256(hashes),
    );

    let st = state.clone();
    let mut http = HttpServer::new(move || app(st.clone()))
        .disable_signals()
        .shutdown_timeout(opts.shutdown_timeout.as_secs().max(1));
    if opts.http_workers > 0 {
        http = http.workers(opts.http_workers);
    }
    let http =
        http.bind((opts.host.as_str(), opts.port)).with_context(|| format!("binding {}:{}", opts.host, opts.port))?;
    let http_addr = *http.addrs().first().context("no bound address")?;
    let mm = metrics.clone();
    let mserver = HttpServer::new(move || {
        let mm = mm.clone();
        App::new().route(
            "/metrics",
            web::get().to(move || {
                let body = mm.render();
                async move { HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(body) }
            }),
        )
    })
    .disable_signals()
    .workers(1)
    .bind((opts.host.as_str(), opts.metrics_port))
    .with_context(|| format!("binding metrics {}:{}", opts.host, opts.metrics_port))?;
    let metrics_addr = *mserver.addrs().first().context("no bound metrics address")?;
    let http = http.run();
    let mserver = mserver.run();
    let (h, mh) = (http.handle(), mserver.handle());
    on_bound(Bound { http: http_addr, metrics: metrics_addr });

    let drain = opts.drain_delay;
    let st = state.clone();
    actix_web::rt::spawn(async move {
        wait_for_signal().await;
        st.set_ready(false);
        tracing::info!(drain_delay_ms = drain.as_millis() as u64, "signal received: readiness off, draining");
        tokio::time::sleep(drain).await;
        h.stop(true).await;
        mh.stop(true).await;
    });
    let (a, b) = futures_util::future::join(http, mserver).await;
    a.context("http server")?;
    b.context("metrics server")?;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {},
                _ = i.recv() => {},
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
