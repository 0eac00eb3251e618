//! `geossl-serve`: the inference service and the archive embedder.

use std::path::PathBuf;

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use geossl_serve::http::server::{self, ServeOptions};
use geossl_serve::http::Limits;
use geossl_serve::infer::ort::{EpPreference, IoBindingMode, SessionOptions};

/// Geography-aware self-supervised learning for satellite imagery: serving.
///
/// Every flag can also be set through the environment variable named in its help.
#[derive(Debug, Parser)]
#[command(name = "geossl-serve", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve a model repository over HTTP: Open Inference Protocol v2 and image endpoints.
    Serve(ServeArgs),
    /// Embed a GeoTIFF archive into GeoParquet: every window of the model's input size, with its footprint.
    Embed(EmbedArgs),
    /// Draw an embedded scene as a PNG: its windows coloured by the first three principal components of their
    /// embeddings, and a query window with its nearest neighbours (cosine) outlined.
    Map(MapArgs),
    /// Similarity-search indexes over embedding datasets (`index build`).
    Index(IndexArgs),
    /// The chips of an index nearest to a chip, a point, or several of them (mean direction), under exact
    /// filters; printed, and written as GeoJSON or GeoParquet with --out.
    Search(SearchArgs),
    /// Fit a logistic regression on positive and negative chips of an index and rank the whole index by it.
    Classify(ClassifyArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Model repository: DIR/<model>/<version>/model.onnx (+ optional config.toml). Optional with --index
    /// (a search-only server; image queries need the index's model).
    #[arg(long, env = "GEOSSL_MODEL_REPOSITORY", required_unless_present = "index")]
    model_repository: Option<PathBuf>,
    /// Similarity-search index to serve as NAME=LOCATION (a directory or URL from `index build`); repeatable
    /// (comma-separated in the environment). Loaded before the server binds.
    #[arg(long, env = "GEOSSL_INDEXES", value_delimiter = ',', value_parser = parse_named_index)]
    index: Vec<(String, String)>,
    /// Address to bind.
    #[arg(long, env = "GEOSSL_HOST", default_value = "0.0.0.0")]
    host: String,
    /// HTTP port for inference and health (0 = any free port; the bound one is printed).
    #[arg(long, env = "GEOSSL_PORT", default_value_t = 8080)]
    port: u16,
    /// Port of the Prometheus /metrics endpoint (0 = any free port).
    #[arg(long, env = "GEOSSL_METRICS_PORT", default_value_t = 9090)]
    metrics_port: u16,
    /// Execution provider for models whose config.toml doesn't choose: auto (CUDA if it registers, else CPU), cuda, cpu.
    #[arg(long, env = "GEOSSL_EXECUTION_PROVIDER", value_enum, default_value = "auto")]
    execution_provider: EpPreference,
    /// CUDA device id.
    #[arg(long, env = "GEOSSL_CUDA_DEVICE", default_value_t = 0)]
    cuda_device: i32,
    /// CUDA memory arena limit per session in MiB (0 = none; the arena grows only by what is requested).
    #[arg(long, env = "GEOSSL_GPU_MEM_LIMIT_MB", default_value_t = 0)]
    gpu_mem_limit_mb: usize,
    /// Intra-op threads per CPU session (0 = ONNX Runtime's default, one per core).
    #[arg(long, env = "GEOSSL_INTRA_THREADS", default_value_t = 0)]
    intra_threads: usize,
    /// Let idle ONNX Runtime intra-op threads spin-wait (its default: lower latency; `false` frees CPU for
    /// HTTP and decoding on small machines).
    #[arg(long, env = "GEOSSL_ORT_SPINNING", default_value_t = true, action = clap::ArgAction::Set)]
    ort_spinning: bool,
    /// CUDA: prefer NHWC (channels-last) convolution kernels (fp16 tensor cores without layout transposes).
    #[arg(long, env = "GEOSSL_CUDA_NHWC", default_value_t = true, action = clap::ArgAction::Set)]
    cuda_nhwc: bool,
    /// ONNX Runtime IO binding: auto (on for CUDA: inputs staged in pinned host memory and copied to the GPU
    /// asynchronously, outputs copied back into pinned memory), on, off.
    #[arg(long, env = "GEOSSL_IO_BINDING", value_enum, default_value = "auto")]
    io_binding: IoBindingMode,
    /// ONNX Runtime shared library (libonnxruntime.so.1.31.1; onnxruntime-gpu's for CUDA).
    #[arg(long, env = "ORT_DYLIB_PATH", default_value = default_ort_lib())]
    ort_lib: PathBuf,
    /// Largest request body in MiB (413 beyond).
    #[arg(long, env = "GEOSSL_MAX_BODY_MB", default_value_t = 32)]
    max_body_mb: usize,
    /// Largest image in megapixels, checked from the header before decoding (413 beyond).
    #[arg(long, env = "GEOSSL_MAX_MEGAPIXELS", default_value_t = 64)]
    max_megapixels: u64,
    /// How long a request may wait for inference, in ms (429 when it expires queued).
    #[arg(long, env = "GEOSSL_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    request_timeout_ms: u64,
    /// Requests being read, decoded or inferred at once (429 beyond).
    #[arg(long, env = "GEOSSL_MAX_INFLIGHT", default_value_t = 512)]
    max_inflight: usize,
    /// Image endpoints: replicate a one-band (grey) image into three bands for a three-band model (without
    /// it, a band count the model does not take is refused with 422, as the trainer refuses it).
    #[arg(long, env = "GEOSSL_GREY_TO_RGB")]
    grey_to_rgb: bool,
    /// Bearer API key required on model routes (health stays public). Unset = no auth.
    #[arg(long, env = "GEOSSL_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// After SIGTERM: ms with readiness off (load balancers stop sending) before the listener closes.
    #[arg(long, env = "GEOSSL_DRAIN_DELAY_MS", default_value_t = 0)]
    drain_delay_ms: u64,
    /// After the listener closes: seconds in-flight requests get to finish.
    #[arg(long, env = "GEOSSL_SHUTDOWN_TIMEOUT_S", default_value_t = 30)]
    shutdown_timeout_s: u64,
    /// HTTP worker threads (0 = one per core).
    #[arg(long, env = "GEOSSL_HTTP_WORKERS", default_value_t = 0)]
    http_workers: usize,
    /// Log format: text or json.
    #[arg(long, env = "GEOSSL_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "GEOSSL_LOG", default_value = "info")]
    log: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The ONNX Runtime library baked in at build time (the project's `.ort` link).
fn default_ort_lib() -> &'static str {
    option_env!("ORT_DYLIB_PATH").unwrap_or("libonnxruntime.so.1.31.1")
}

#[derive(Debug, Subcommand)]
enum EmbedSub {
    /// Freeze the resolved inputs (files, band groups, STAC items) into a sorted plan file for sharded runs.
    Plan(PlanArgs),
    /// Check a sharded dataset against its plan: every shard finished, no chip id twice.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
struct PlanArgs {
    /// GeoTIFFs, directories or object-store prefixes (searched recursively for .tif/.tiff), globs, or STAC
    /// Items/ItemCollections (.json); paths or URLs (s3://, gs://, az://, http(s)://).
    #[arg(long, env = "GEOSSL_PLAN_INPUT", num_args = 1.., value_delimiter = ',', required = true)]
    input: Vec<String>,
    /// Each directory of GeoTIFFs is one input whose files are its bands.
    #[arg(long, env = "GEOSSL_PLAN_BAND_GROUPS")]
    band_groups: bool,
    /// Plan file to write (JSON): a path or an object-store URL.
    #[arg(long, env = "GEOSSL_PLAN_OUT")]
    out: String,
    /// Keep a plan already at --out (so every pod of an Indexed Job may run this step: the first fixes the plan).
    #[arg(long, env = "GEOSSL_KEEP_EXISTING_PLAN")]
    keep_existing: bool,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    /// The plan the dataset was made from (a path or URL).
    #[arg(long, env = "GEOSSL_VERIFY_PLAN")]
    plan: String,
    /// The dataset directory or prefix (part-NNNNN.parquet and _SUCCESS-NNNNN.json): a path or URL.
    #[arg(long, env = "GEOSSL_DATASET")]
    dataset: String,
    /// Succeed even when some inputs failed (they are listed; without it, failed inputs make verify fail).
    #[arg(long, env = "GEOSSL_ALLOW_FAILED")]
    allow_failed: bool,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct EmbedArgs {
    #[command(subcommand)]
    sub: Option<EmbedSub>,
    /// ONNX embedding model (from `geossl-export onnx --head embed`), or a STAC MLM model card (`.json`,
    /// e.g. the `model.item.json` the exporter writes, or one written for a model made elsewhere) whose
    /// `mlm:model` asset is the ONNX file: its bands, input type, value scaling and embedding output are used.
    #[arg(long, env = "GEOSSL_MODEL", required = true)]
    model: Option<PathBuf>,
    /// GeoTIFFs, directories or object-store prefixes (searched recursively for .tif/.tiff), globs, or STAC
    /// Items/ItemCollections (.json, assets picked by the model's band names); paths or URLs (s3://, gs://,
    /// az://, http(s)://; COGs are read by range requests, credentials from AWS_*/GOOGLE_*/AZURE_* variables).
    #[arg(long, env = "GEOSSL_INPUT", num_args = 1.., value_delimiter = ',', required_unless_present = "plan")]
    input: Vec<String>,
    /// Output GeoParquet file (written atomically); with --plan, the dataset directory. A path or a URL.
    #[arg(long, env = "GEOSSL_OUT", required = true)]
    out: Option<String>,
    /// Embed one shard of this plan (from `embed plan`) into the dataset directory --out:
    /// part-NNNNN.parquet, then _SUCCESS-NNNNN.json; a finished shard is skipped, an unfinished one redone.
    #[arg(long, env = "GEOSSL_PLAN", conflicts_with = "input")]
    plan: Option<String>,
    /// This process's shard (Kubernetes Indexed Jobs set JOB_COMPLETION_INDEX).
    #[arg(long, env = "JOB_COMPLETION_INDEX", default_value_t = 0)]
    shard_index: usize,
    /// How many shards the plan is split into.
    #[arg(long, env = "GEOSSL_SHARD_COUNT", default_value_t = 1)]
    shard_count: usize,
    /// With --plan: embed again exactly the inputs that this finished shard recorded as failed, into one
    /// more part of the shard (its marker then lists what still failed).
    #[arg(long, env = "GEOSSL_RETRY_FAILED", requires = "plan")]
    retry_failed: bool,
    /// Seconds an object-store request keeps being retried (backoff from 0.25 s to 8 s) on timeouts,
    /// connection resets, 429 and 5xx before the run fails and publishes nothing (0 = only object_store's
    /// own few quick retries).
    #[arg(long, env = "GEOSSL_RETRY_TIMEOUT_S", default_value_t = 120.0)]
    retry_timeout_s: f64,
    /// Window step in pixels (default: the model's input size, no overlap).
    #[arg(long, env = "GEOSSL_STRIDE")]
    stride: Option<usize>,
    /// Each directory of GeoTIFFs is one input whose files are its bands (one file per band, named by their
    /// band descriptions or the file name's last `_` part, e.g. `…_B04.tif`); the files must share one grid.
    #[arg(long, env = "GEOSSL_BAND_GROUPS")]
    band_groups: bool,
    /// Rows per Parquet row group (readers skip groups outside their area by the bbox column's statistics).
    #[arg(long, env = "GEOSSL_ROW_GROUP_ROWS", default_value_t = geossl_serve::archive::embed::ROW_GROUP_ROWS)]
    row_group_rows: usize,
    /// The files' bands to feed, by name or 1-based number, in the model's channel order (default: the
    /// model's band names where the files name their bands, else by position), e.g. B04,B03,B02.
    #[arg(long, env = "GEOSSL_BANDS", value_delimiter = ',')]
    bands: Option<Vec<String>>,
    /// Windows per inference batch.
    #[arg(long, env = "GEOSSL_BATCH_SIZE", default_value_t = 32)]
    batch_size: usize,
    /// Only embed windows meeting this box, XMIN,YMIN,XMAX,YMAX in longitude/latitude (CRS84): windows and
    /// scenes outside it are not read (for remote COGs: not fetched).
    #[arg(long, env = "GEOSSL_BBOX", value_parser = parse_bbox, allow_hyphen_values = true)]
    bbox: Option<[f64; 4]>,
    /// Largest fraction of nodata (all-zero) pixels in a kept window.
    #[arg(long, env = "GEOSSL_MAX_NODATA", default_value_t = 0.5)]
    max_nodata: f64,
    /// Model name recorded in the rows (default: the model's <model>/<version>/ directories).
    #[arg(long, env = "GEOSSL_MODEL_NAME")]
    model_name: Option<String>,
    /// Model version recorded in the rows.
    #[arg(long, env = "GEOSSL_MODEL_VERSION")]
    model_version: Option<String>,
    /// How the embedding column stores values: float32 (as computed), float16 (half the bytes), or int8 (a
    /// quarter: per-row symmetric, value = q × embedding_scale, each within half a step of float32).
    #[arg(long, env = "GEOSSL_EMBEDDING_DTYPE", value_enum, default_value = "float32")]
    dtype: geossl_serve::archive::geoparquet::EmbeddingDtype,
    /// pooled: one row per window (the model's `embedding`); spatial: one row per cell of the window's feature
    /// map, with the cell's footprint and a `cell` column (a model exported with `geossl-export onnx --head
    /// features`; ResNet cells are 32×32 pixels).
    #[arg(long, env = "GEOSSL_EMBED_LEVEL", value_enum, default_value = "pooled")]
    level: geossl_serve::archive::embed::Level,
    /// Execution provider: auto, cuda, cpu.
    #[arg(long, env = "GEOSSL_EXECUTION_PROVIDER", value_enum, default_value = "auto")]
    execution_provider: EpPreference,
    /// CUDA device id.
    #[arg(long, env = "GEOSSL_CUDA_DEVICE", default_value_t = 0)]
    cuda_device: i32,
    /// ONNX Runtime shared library.
    #[arg(long, env = "ORT_DYLIB_PATH", default_value = default_ort_lib())]
    ort_lib: PathBuf,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "GEOSSL_LOG", default_value = "info")]
    log: String,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(a) => serve(a),
        Command::Embed(a) => embed(a),
        Command::Map(a) => map(a),
        Command::Index(a) => index(a),
        Command::Search(a) => search(a),
        Command::Classify(a) => classify(a),
    }
}

fn init_logs(filter: &str, format: LogFormat) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).with_context(|| format!("log filter {filter:?}"))?;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(geossl_models::stderr_colour());
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
    Ok(())
}

fn serve(a: ServeArgs) -> Result<()> {
    init_logs(&a.log, a.log_format)?;
    if a.max_body_mb == 0 || a.max_megapixels == 0 || a.max_inflight == 0 || a.request_timeout_ms == 0 {
        bail!("--max-body-mb, --max-megapixels, --max-inflight and --request-timeout-ms must be positive");
    }
    let opts = ServeOptions {
        model_repository: a.model_repository,
        indexes: a.index,
        host: a.host,
        port: a.port,
        metrics_port: a.metrics_port,
        ort_lib: a.ort_lib,
        session: SessionOptions {
            ep: a.execution_provider,
            device_id: a.cuda_device,
            intra_threads: a.intra_threads,
            gpu_mem_limit: a.gpu_mem_limit_mb << 20,
            spinning: a.ort_spinning,
            cuda_nhwc: a.cuda_nhwc,
            io_binding: a.io_binding,
        },
        limits: Limits {
            max_body_bytes: a.max_body_mb.checked_mul(1 << 20).context("--max-body-mb too large")?,
            max_pixels: a.max_megapixels.saturating_mul(1_000_000),
            request_timeout: Duration::from_millis(a.request_timeout_ms),
            max_inflight: a.max_inflight,
        },
        api_key: a.api_key,
        drain_delay: Duration::from_millis(a.drain_delay_ms),
        shutdown_timeout: Duration::from_secs(a.shutdown_timeout_s),
        http_workers: a.http_workers,
        grey_to_rgb: a.grey_to_rgb,
    };
    actix_web::rt::System::new().block_on(server::run(opts, |b| {
        // One line on stdout that scripts and tests wait for.
        println!("listening http={} metrics={}", b.http, b.metrics);
        tracing::info!(http = %b.http, metrics = %b.metrics, "listening");
    }))
}

#[derive(Debug, Args)]
struct MapArgs {
    /// GeoParquet written by `geossl-serve embed`.
    #[arg(long, env = "GEOSSL_EMBEDDINGS")]
    embeddings: PathBuf,
    /// The scene those rows came from (an RGB GeoTIFF, PNG or JPEG).
    #[arg(long, env = "GEOSSL_SCENE")]
    scene: PathBuf,
    /// PNG to write.
    #[arg(long, env = "GEOSSL_OUT")]
    out: PathBuf,
    /// Query pixel X,Y: the window whose centre is nearest is the query (default: the scene's centre).
    #[arg(long, env = "GEOSSL_QUERY", value_parser = parse_xy)]
    query: Option<(f64, f64)>,
    /// How many nearest neighbours of the query to outline.
    #[arg(long, env = "GEOSSL_NEIGHBOURS", default_value_t = 5)]
    neighbours: usize,
    /// Take the neighbours from this search index (from `index build` over a dataset holding these rows): the
    /// whole archive's nearest, windows overlapping the query left out; those in other scenes are listed.
    #[arg(long, env = "GEOSSL_INDEX")]
    index: Option<String>,
    /// Print what the picture shows as JSON instead of text.
    #[arg(long, env = "GEOSSL_JSON")]
    json: bool,
}

/// `X,Y` → pixel coordinates.
fn parse_bbox(s: &str) -> std::result::Result<[f64; 4], String> {
    let v: Vec<f64> = s
        .split(',')
        .map(|p| p.trim().parse::<f64>().map_err(|e| format!("{p:?}: {e}")))
        .collect::<std::result::Result<_, _>>()?;
    match v.as_slice() {
        &[x0, y0, x1, y1]
            if x0 <= x1
                && y0 <= y1
                && (-180.0..=180.0).contains(&x0)
                && (-90.0..=90.0).contains(&y0)
                && (-180.0..=180.0).contains(&x1)
                && (-90.0..=90.0).contains(&y1) =>
        {
            Ok([x0, y0, x1, y1])
        }
        _ => Err(format!("{s}: want XMIN,YMIN,XMAX,YMAX in degrees (min ≤ max, lon in ±180, lat in ±90)")),
    }
}

/// `NAME=LOCATION`.
fn parse_named_index(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((n, l))
            if !n.is_empty() && !l.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) =>
        {
            Ok((n.to_string(), l.to_string()))
        }
        _ => Err(format!("{s:?}: want NAME=LOCATION, NAME of letters, digits, '-', '_' or '.'")),
    }
}

fn parse_xy(s: &str) -> std::result::Result<(f64, f64), String> {
    let bad = || format!("{s:?}: expected pixel coordinates X,Y (e.g. 400,350)");
    let (x, y) = s.split_once(',').ok_or_else(bad)?;
    let (x, y): (f64, f64) = (x.trim().parse().map_err(|_| bad())?, y.trim().parse().map_err(|_| bad())?);
    if !(x.is_finite() && y.is_finite()) {
        return Err(bad());
    }
    Ok((x, y))
}

fn map(a: MapArgs) -> Result<()> {
    let opts = geossl_serve::archive::map::MapOptions {
        embeddings: a.embeddings,
        scene: a.scene,
        out: a.out,
        query: a.query,
        neighbours: a.neighbours,
        neighbours_from: match &a.index {
            None => None,
            Some(at) => {
                use geossl_serve::search::query::{Example, Filters, Query};
                let index = std::sync::Arc::new(geossl_serve::search::index::Index::open(at)?);
                Some(geossl_serve::archive::map::NeighbourFn(std::sync::Arc::new(move |id: &str, k: usize| {
                    let q = Query::Example(Example::Chip(id.to_string()));
                    let hits = index.search(&q, k.max(1), &Filters::default()).map_err(|e| e.to_string())?;
                    Ok(hits.iter().map(|h| (index.chip_id(h.key).to_string(), h.score)).collect())
                })))
            }
        },
    };
    let s = geossl_serve::archive::map::run(&opts)?;
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
        return Ok(());
    }
    let [a1, a2, a3] = s.explained_variance.map(|v| v * 100.0);
    println!("wrote {}: {} windows of {}", s.out.display(), s.windows, s.source);
    println!("  left: the scene; right: each window coloured by the first three principal components of its");
    println!("  embedding (red/green/blue = PC1/PC2/PC3, {a1:.0}/{a2:.0}/{a3:.0}% of the variance): similar colour, similar embedding");
    let q = &s.query;
    println!("  red outline: query window at pixel ({}, {}), {:.5}°, {:.5}°", q.x, q.y, q.lat, q.lon);
    println!("  cyan outlines: its {} nearest neighbours by cosine similarity:", s.neighbours.len());
    for (w, sim) in &s.neighbours {
        println!("    ({:>5}, {:>5})  {:.5}°, {:.5}°  cos {sim:.3}", w.x, w.y, w.lat, w.lon);
    }
    if !s.neighbours_elsewhere.is_empty() {
        println!("  and {} in other scenes of the index (not drawn):", s.neighbours_elsewhere.len());
        for (id, sim) in &s.neighbours_elsewhere {
            println!("    chip {id}  cos {sim:.3}");
        }
    }
    Ok(())
}

fn embed(a: EmbedArgs) -> Result<()> {
    use geossl_serve::archive::shard;
    use geossl_serve::archive::store::Location;
    init_logs(&a.log, LogFormat::Text)?;
    if !(a.retry_timeout_s.is_finite() && a.retry_timeout_s >= 0.0) {
        bail!("--retry-timeout-s {} (must be 0 or more seconds)", a.retry_timeout_s);
    }
    geossl_serve::archive::store::set_retry_time(std::time::Duration::from_secs_f64(a.retry_timeout_s));
    let loc = |s: &str| Location::parse(s).map_err(anyhow::Error::new);
    match a.sub {
        Some(EmbedSub::Plan(p)) => {
            let at = loc(&p.out)?;
            if p.keep_existing && at.exists()? {
                let (plan, sha) = shard::read_plan(&at)?;
                println!("kept {at} ({} inputs, sha256 {sha})", plan.inputs.len());
                return Ok(());
            }
            let plan = shard::make_plan(&p.input, p.band_groups)?;
            let (sha, wrote) = shard::write_plan(&plan, &at, p.keep_existing)?;
            let verb = if wrote { "wrote" } else { "kept" };
            println!("{verb} {at} ({} inputs, sha256 {sha})", plan.inputs.len());
            return Ok(());
        }
        Some(EmbedSub::Verify(v)) => {
            let dataset = loc(&v.dataset)?;
            let r = shard::verify(&loc(&v.plan)?, &dataset)?;
            for f in &r.failed_inputs {
                eprintln!("failed input: {f}");
            }
            println!(
                "{dataset}: {} shards complete, {} rows, no duplicate chip ids ({} inputs failed)",
                r.shards,
                r.rows,
                r.failed_inputs.len()
            );
            // The verified dataset as STAC: a Collection with one Item per part.
            let parts = r
                .parts
                .iter()
                .map(|p| {
                    let at = dataset.join(p);
                    geossl_serve::archive::collection::summarize_part(&at).map(|s| (at, s))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let collection_at = dataset.join("collection.json");
            let id = dataset.file_name();
            geossl_serve::archive::collection::write(&id, &parts, &collection_at, std::slice::from_ref(&v.plan))
                .with_context(|| format!("writing the dataset's STAC Collection {collection_at}"))?;
            println!("wrote {collection_at} ({} items)", parts.len());
            if !r.failed_inputs.is_empty() && !v.allow_failed {
                bail!(
                    "{} input(s) failed (listed above): redo them with `embed --retry-failed` on each shard, or pass \
                     --allow-failed to accept the dataset without them",
                    r.failed_inputs.len()
                );
            }
            return Ok(());
        }
        None => {}
    }
    let (model, out) = (a.model.context("--model is required")?, a.out.context("--out is required")?);
    let out = loc(&out)?;
    let opts = geossl_serve::archive::embed::EmbedOptions {
        model,
        inputs: a.input,
        // The rows are made in a spool file and published when complete (a rename, or one upload).
        out: out.spool("embed"),
        stride: a.stride,
        band_groups: a.band_groups,
        bands: a.bands,
        row_group_rows: a.row_group_rows,
        planned: None,
        bbox: a.bbox,
        batch_size: a.batch_size,
        max_nodata: a.max_nodata,
        session: SessionOptions { ep: a.execution_provider, device_id: a.cuda_device, ..SessionOptions::default() },
        ort_lib: a.ort_lib,
        model_name: a.model_name,
        model_version: a.model_version,
        dtype: a.dtype,
        level: a.level,
    };
    let failed = |s: &geossl_serve::archive::embed::Summary| {
        for f in &s.failed {
            eprintln!("failed {}", f.error);
        }
    };
    if let Some(plan) = &a.plan {
        use geossl_serve::archive::shard::ShardOutcome;
        let (i, n) = (a.shard_index, a.shard_count);
        let plan = loc(plan)?;
        let outcome = if a.retry_failed {
            shard::retry_failed(&opts, &plan, &out, i, n)
        } else {
            shard::run_shard(&opts, &plan, &out, i, n)
        };
        match outcome.with_context(|| format!("shard {i} of {n} published nothing"))? {
            ShardOutcome::AlreadyDone(m) if a.retry_failed => {
                println!("shard {i} of {n}: no failed input to redo ({} rows)", m.rows)
            }
            ShardOutcome::AlreadyDone(m) => println!("shard {i} of {n} already done ({} rows); nothing redone", m.rows),
            ShardOutcome::Done(m, s) => {
                failed(&s);
                println!(
                    "shard {i} of {n}: {} parts, {} rows in all; this run: {}",
                    m.part_names().len(),
                    m.rows,
                    s.line()
                );
            }
        }
        return Ok(());
    }
    if a.retry_failed {
        bail!("--retry-failed redoes the failed inputs of a sharded dataset: give --plan too");
    }
    let s = geossl_serve::archive::embed::run(&opts).context("nothing was written")?;
    failed(&s);
    if s.files == 0 {
        let _ = std::fs::remove_file(&opts.out);
        bail!("no input could be embedded ({} failed); nothing was written", s.failed.len());
    }
    // The file as STAC (`<stem>.collection.json` with one Item, `<stem>.item.json`, beside it), summarized
    // from the spool while it is local: a published object is not read back.
    let summary = geossl_serve::archive::collection::summarize_part(&Location::local(&opts.out));
    out.publish(&opts.out)?;
    println!("wrote {out}: {}", s.line());
    let summary = summary.with_context(|| format!("{out} is written; its rows could not be summarized as STAC"))?;
    let stem = out.file_name().trim_end_matches(".parquet").to_string();
    let collection_at = out.resolve(&format!("{stem}.collection.json"))?;
    geossl_serve::archive::collection::write(&stem, &[(out.clone(), summary)], &collection_at, &opts.inputs)
        .with_context(|| format!("{out} is written; its STAC Collection {collection_at} is not"))?;
    println!("wrote {collection_at}");
    Ok(())
}

#[derive(Debug, Args)]
struct IndexArgs {
    #[command(subcommand)]
    sub: IndexSub,
}

#[derive(Debug, Subcommand)]
enum IndexSub {
    /// Build an HNSW index over a GeoParquet dataset (a file, or a sharded run's directory/prefix), or add the
    /// dataset's new parts to the index already at --out.
    Build(IndexBuildArgs),
}

#[derive(Debug, Args)]
struct IndexBuildArgs {
    /// The embeddings: a GeoParquet file from `embed`, or a dataset directory/prefix (a sharded run's parts, by
    /// its success markers; else every .parquet file in it). A path or URL.
    #[arg(long, env = "GEOSSL_DATASET")]
    dataset: String,
    /// The index directory or prefix (index.json, vectors.hnsw, rows-NNNNN.parquet). A path or URL.
    #[arg(long, env = "GEOSSL_INDEX_OUT")]
    out: String,
    /// How the index stores vectors: f32, f16 (half the memory) or i8 (a quarter).
    #[arg(long, env = "GEOSSL_INDEX_QUANTIZATION", value_enum, default_value = "f32")]
    quantization: geossl_serve::search::index::Quantization,
    /// Keep a float32 copy of the vectors (vectors.f32, on disk) to re-score each search's candidates: an i8
    /// index then answers with f32's recall. Default: true for i8, false otherwise; an index keeps its choice.
    #[arg(long, env = "GEOSSL_INDEX_RERANK")]
    rerank: Option<bool>,
    /// HNSW graph degree (links per vector).
    #[arg(long, env = "GEOSSL_HNSW_CONNECTIVITY", default_value_t = geossl_serve::search::index::Hnsw::default().connectivity)]
    connectivity: usize,
    /// HNSW candidate list length while adding.
    #[arg(long, env = "GEOSSL_HNSW_EXPANSION_ADD", default_value_t = geossl_serve::search::index::Hnsw::default().expansion_add)]
    expansion_add: usize,
    /// HNSW candidate list length while searching (at least k is used).
    #[arg(long, env = "GEOSSL_HNSW_EXPANSION_SEARCH", default_value_t = geossl_serve::search::index::Hnsw::default().expansion_search)]
    expansion_search: usize,
    /// Threads adding vectors (0 = one per core).
    #[arg(long, env = "GEOSSL_INDEX_THREADS", default_value_t = 0)]
    threads: usize,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "GEOSSL_LOG", default_value = "info")]
    log: String,
}

/// Filters and output shared by `search` and `classify`.
#[derive(Debug, Args)]
struct AnswerArgs {
    /// The index directory or prefix (from `index build`). A path or URL.
    #[arg(long, env = "GEOSSL_INDEX")]
    index: String,
    /// Only answers whose footprint meets this box, XMIN,YMIN,XMAX,YMAX in longitude/latitude.
    #[arg(long = "bbox", env = "GEOSSL_SEARCH_BBOX", allow_hyphen_values = true)]
    bbox: Option<String>,
    /// Only answers dated in this RFC 3339 datetime or interval START/END (`..` for an open end).
    #[arg(long, env = "GEOSSL_SEARCH_DATETIME")]
    datetime: Option<String>,
    /// Write the answers here: .geojson/.json (a FeatureCollection) or .parquet (GeoParquet).
    #[arg(long, env = "GEOSSL_SEARCH_OUT")]
    out: Option<PathBuf>,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "GEOSSL_LOG", default_value = "warn")]
    log: String,
}

#[derive(Debug, Args)]
struct SearchArgs {
    #[command(flatten)]
    common: AnswerArgs,
    /// Query chip id(s) of the index (several: their mean direction).
    #[arg(long, env = "GEOSSL_QUERY_CHIP", value_delimiter = ',')]
    chip: Vec<String>,
    /// Query point(s) LON,LAT: the chip containing each (several, `;`-separated: their mean direction).
    #[arg(long, env = "GEOSSL_QUERY_POINT", value_delimiter = ';', allow_hyphen_values = true)]
    point: Vec<String>,
    /// How many answers.
    #[arg(short, long, env = "GEOSSL_K", default_value_t = 10)]
    k: usize,
    /// Leave out answers from the query chips' own scenes (source files).
    #[arg(long, env = "GEOSSL_EXCLUDE_OWN_SCENE")]
    exclude_own_scene: bool,
    /// Keep answers whose footprint overlaps a query chip's (left out by default: the same pixels).
    #[arg(long, env = "GEOSSL_KEEP_OVERLAPPING")]
    keep_overlapping: bool,
}

#[derive(Debug, Args)]
struct ClassifyArgs {
    #[command(flatten)]
    common: AnswerArgs,
    /// Positive examples: chip ids or LON,LAT points, `;`-separated.
    #[arg(long, env = "GEOSSL_POSITIVE", value_delimiter = ';', required = true, allow_hyphen_values = true)]
    positive: Vec<String>,
    /// Negative examples: chip ids or LON,LAT points, `;`-separated.
    #[arg(long, env = "GEOSSL_NEGATIVE", value_delimiter = ';', required = true, allow_hyphen_values = true)]
    negative: Vec<String>,
    /// Inverse regularization strength (scikit-learn's C).
    #[arg(long, env = "GEOSSL_CLASSIFY_C", default_value_t = 1.0)]
    c: f64,
    /// How many of the best-scoring chips.
    #[arg(long, env = "GEOSSL_TOP", default_value_t = 100)]
    top: usize,
}

fn index(a: IndexArgs) -> Result<()> {
    let IndexSub::Build(b) = a.sub;
    init_logs(&b.log, LogFormat::Text)?;
    use geossl_serve::search::index::{build, BuildOptions, Hnsw};
    let hnsw =
        Hnsw { connectivity: b.connectivity, expansion_add: b.expansion_add, expansion_search: b.expansion_search };
    if hnsw.connectivity < 2 || hnsw.expansion_add == 0 || hnsw.expansion_search == 0 {
        bail!("--connectivity must be at least 2, and the expansions positive");
    }
    let opts = BuildOptions {
        dataset: b.dataset,
        out: b.out,
        quantization: b.quantization,
        rerank: b.rerank,
        hnsw,
        threads: b.threads,
    };
    let s = build(&opts).with_context(|| format!("indexing {} into {}", opts.dataset, opts.out))?;
    if s.added_parts.is_empty() {
        println!(
            "{}: already holds every part of {} ({} rows, {} parts); nothing added",
            opts.out, opts.dataset, s.rows, s.parts
        );
    } else {
        println!(
            "{}: added {} rows from {} part(s) in {:.1} s (graph {:.1} s); {} rows, {} parts, vectors file {:.1} MiB",
            opts.out,
            s.added_rows,
            s.added_parts.len(),
            s.seconds,
            s.graph_seconds,
            s.rows,
            s.parts,
            s.vector_file_bytes as f64 / f64::from(1 << 20)
        );
    }
    Ok(())
}

fn example(s: &str) -> Result<geossl_serve::search::query::Example> {
    use geossl_serve::search::query::{parse_point, Example};
    if s.contains(',') {
        let (lon, lat) = parse_point(s)?;
        Ok(Example::Point { lon, lat })
    } else {
        Ok(Example::Chip(s.trim().to_string()))
    }
}

fn filters(a: &AnswerArgs) -> Result<geossl_serve::search::query::Filters> {
    use geossl_serve::search::query::{parse_bbox, parse_datetime, Filters};
    Ok(Filters {
        bbox: a.bbox.as_deref().map(parse_bbox).transpose()?,
        datetime: a.datetime.as_deref().map(parse_datetime).transpose()?,
        ..Filters::default()
    })
}

/// Prints the answers and writes them to --out.
fn answers(
    a: &AnswerArgs,
    index: &geossl_serve::search::index::Index,
    hits: &[geossl_serve::search::query::Hit],
    about: serde_json::Value,
    score: &str,
) -> Result<()> {
    use geossl_serve::search::answers;
    println!("{:>4}  {:>9}  {:<32}  {:>10}  {:>11}  source", "rank", score, "chip_id", "lat", "lon");
    for (i, h) in hits.iter().enumerate() {
        let (lon, lat) = index.center_of(h.key);
        let source = index.source_of(h.key);
        let short = source.rsplit('/').next().unwrap_or(source);
        println!("{:>4}  {:>9.5}  {:<32}  {lat:>10.5}  {lon:>11.5}  {short}", i + 1, h.score, index.chip_id(h.key));
    }
    if let Some(out) = &a.out {
        let bytes = match out.extension().and_then(|e| e.to_str()) {
            Some("parquet") => answers::geoparquet(index, hits)?,
            Some("geojson" | "json") => serde_json::to_vec_pretty(&answers::geojson(index, hits, about))?,
            _ => bail!("--out {}: name a .geojson, .json or .parquet file", out.display()),
        };
        std::fs::write(out, bytes).with_context(|| format!("writing {}", out.display()))?;
        println!("wrote {} ({} answers)", out.display(), hits.len());
    }
    Ok(())
}

fn search(a: SearchArgs) -> Result<()> {
    use geossl_serve::search::query::{Filters, Query};
    init_logs(&a.common.log, LogFormat::Text)?;
    let mut examples = a.chip.iter().map(|c| example(c)).collect::<Result<Vec<_>>>()?;
    for p in &a.point {
        let (lon, lat) = geossl_serve::search::query::parse_point(p)?;
        examples.push(geossl_serve::search::query::Example::Point { lon, lat });
    }
    let query = match examples.len() {
        0 => bail!("give a query: --chip ID or --point LON,LAT"),
        1 => Query::Example(examples.remove(0)),
        _ => Query::Examples(examples),
    };
    let f =
        Filters { exclude_own_scene: a.exclude_own_scene, keep_overlapping: a.keep_overlapping, ..filters(&a.common)? };
    let index = geossl_serve::search::index::Index::open(&a.common.index)?;
    let hits = index.search(&query, a.k, &f)?;
    let about = serde_json::json!({"index": a.common.index, "model": index.manifest.model, "k": a.k,
        "query": {"chips": a.chip, "points": a.point}});
    answers(&a.common, &index, &hits, about, "cosine")
}

fn classify(a: ClassifyArgs) -> Result<()> {
    init_logs(&a.common.log, LogFormat::Text)?;
    let pos = a.positive.iter().map(|s| example(s)).collect::<Result<Vec<_>>>()?;
    let neg = a.negative.iter().map(|s| example(s)).collect::<Result<Vec<_>>>()?;
    if !(a.c > 0.0 && a.c.is_finite()) {
        bail!("--c {}: the inverse regularization strength must be a positive number", a.c);
    }
    let f = filters(&a.common)?;
    let index = geossl_serve::search::index::Index::open(&a.common.index)?;
    let r = index.classify(&pos, &neg, a.c, a.top, &f)?;
    eprintln!(
        "logistic regression on {} positive and {} negative chips (C = {}): {} iterations{}",
        r.positives.len(),
        r.negatives.len(),
        a.c,
        r.model.iterations,
        if r.model.converged { "" } else { " (not converged)" }
    );
    let about = serde_json::json!({"index": a.common.index, "model": index.manifest.model, "top": a.top,
        "classifier": {"c": a.c, "positives": a.positive, "negatives": a.negative, "intercept": r.model.intercepts[0]}});
    answers(&a.common, &index, &r.hits, about, "decision")
}
