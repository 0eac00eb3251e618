//! `geossl-train`: pretraining, probes and fine-tuning on tch.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use geossl_models::Arch;
use geossl_trainer::{checkpoint, device};

/// Geography-aware self-supervised learning for satellite imagery: training.
///
/// Every flag can also be set through the environment variable named in its help.
#[derive(Debug, Parser)]
#[command(name = "geossl-train", version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `geossl_trainer=debug`.
    #[arg(long, env = "GEOSSL_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Self-supervised pretraining (MoCo-v2, temporal positives, geo pretext).
    Pretrain(PretrainArgs),
    /// Linear probe of a frozen backbone on labelled data: hyper-parameters chosen on a validation split
    /// (given, or held out by location), the test split evaluated once; writes probe.json, predictions.csv and
    /// checkpoint/ (backbone + the probe as classifier head).
    Probe(ProbeArgs),
    /// Fine-tune a backbone end to end with a new classifier head (RandomResizedCrop + flip, SGD, cosine); the
    /// epoch is chosen on validation, the test split scored once; writes finetune.json, predictions.csv and
    /// checkpoint/.
    Finetune(FinetuneArgs),
    /// Train an FCN segmentation head with its backbone on image/mask pairs (manifest: path,mask[,location_id]);
    /// the epoch is chosen on validation mIoU, the test split scored once; writes segment.json and checkpoint/.
    Segment(SegmentArgs),
    /// Frozen-backbone evaluation on labelled georeferenced chips: a spatial-block split (no train chip within
    /// a chip of a test chip), weighted kNN (k 20, cosine) and a logistic-regression probe (C chosen on
    /// validation), top-1 and macro-F1 with bootstrap 95 % intervals; writes eval.json and the features, and
    /// appends a row to --report.
    Eval(EvalArgs),
    /// Draw the training curves of one or several pretraining runs (loss, positive and geo top-1, learning
    /// rate, alignment and the collapse measures against the step; one panel each, one colour per run) into one
    /// PNG.
    Plot(PlotArgs),
    /// Create a checkpoint directory from an architecture (random init) or from
    /// a torchvision state dict saved as safetensors.
    Init(InitArgs),
    /// Describe a checkpoint directory and the libtorch runtime.
    Info(InfoArgs),
    /// Tile georeferenced GeoTIFF scenes into chips and a training manifest: any band count and sample
    /// type, kept as stored (GeoTIFF chips with bands, names, nodata and georeference; PNG for 8-bit RGB);
    /// lat/lon from the georeference, so co-registered scenes share location ids.
    Chips(ChipsArgs),
    /// Pack a manifest's chips into shard files made for training reads (fixed-size arrays, no decoding;
    /// location, date and bands inside; a CRC-32 per chip): pretraining reads the folder with `--data`, and
    /// cuts the views on the training device. `--verify PACK` reads every chip and names damaged ones.
    Pack(PackArgs),
    /// Per-band mean and standard deviation of a manifest's images (in physical units: stored value ×
    /// --scale + --offset), printed as the `[model.normalization]` table of a pretraining config.
    Stats(StatsArgs),
}

#[derive(Debug, Args)]
struct PlotArgs {
    /// Run directories (each holds the metrics.jsonl `pretrain` writes); each run gets one colour.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// The PNG to write (replaced whole).
    #[arg(long, env = "GEOSSL_PLOT", default_value = "curves.png")]
    out: PathBuf,
    /// Picture width in pixels.
    #[arg(long, env = "GEOSSL_PLOT_WIDTH", default_value_t = 1500)]
    width: u32,
    /// Picture height in pixels.
    #[arg(long, env = "GEOSSL_PLOT_HEIGHT", default_value_t = 1000)]
    height: u32,
}

#[derive(Debug, Args)]
struct EvalArgs {
    /// Checkpoint directory of the backbone (pretrained, imported or `init`'s random one).
    #[arg(long, env = "GEOSSL_CHECKPOINT")]
    checkpoint: PathBuf,
    /// Labelled manifest of georeferenced GeoTIFF chips (geossl-train chips --labels … --format tiff).
    #[arg(long, env = "GEOSSL_DATA")]
    data: PathBuf,
    /// Output directory: eval.json and features/{train,val,test}_{x,y}.npy.
    #[arg(long, env = "GEOSSL_OUT")]
    out: PathBuf,
    /// Markdown table to append this evaluation's row to (created with its header).
    #[arg(long, env = "GEOSSL_REPORT")]
    report: Option<PathBuf>,
    /// The row's name in the report (default: the checkpoint path).
    #[arg(long, env = "GEOSSL_RUN_NAME")]
    name: Option<String>,
    /// Side of the spatial blocks, in chip extents.
    #[arg(long, env = "GEOSSL_BLOCK", default_value_t = 4.0)]
    block: f64,
    /// Share of the blocks for validation (the probe's C).
    #[arg(long, env = "GEOSSL_VAL_SHARE", default_value_t = 0.15)]
    val_share: f64,
    /// Share of the blocks for the test.
    #[arg(long, env = "GEOSSL_TEST_SHARE", default_value_t = 0.25)]
    test_share: f64,
    /// Neighbours voting in kNN.
    #[arg(long, env = "GEOSSL_KNN_K", default_value_t = 20)]
    knn_k: usize,
    /// Temperature of the kNN votes' weights exp(similarity / T).
    #[arg(long, env = "GEOSSL_KNN_TEMPERATURE", default_value_t = 0.07)]
    knn_temperature: f64,
    /// Inverse regularization strengths of the probe tried on validation (scikit-learn's C).
    #[arg(long, env = "GEOSSL_PROBE_C", value_delimiter = ',', default_value = "0.0001,0.001,0.01,0.1,1,10,100")]
    probe_c: Vec<f64>,
    /// Bootstrap resamples of the test chips for the intervals.
    #[arg(long, env = "GEOSSL_RESAMPLES", default_value_t = 1000)]
    resamples: usize,
    /// Seed of the split and the bootstrap.
    #[arg(long, env = "GEOSSL_SEED", default_value_t = 0)]
    seed: u64,
    /// Device: auto, cpu, cuda, cuda:N.
    #[arg(long, env = "GEOSSL_DEVICE", default_value = "auto")]
    device: String,
    /// Threads decoding chips.
    #[arg(long, env = "GEOSSL_WORKERS", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    workers: u16,
}

#[derive(Debug, Args)]
struct StatsArgs {
    /// Manifest CSV (path,lat,lon,timestamp,location_id[,label]); paths relative to it.
    #[arg(long, env = "GEOSSL_DATA")]
    data: PathBuf,
    /// Number of bands of the images.
    #[arg(long, env = "GEOSSL_BAND_COUNT", default_value_t = 3)]
    bands: usize,
    /// Stored value × scale (+ offset) = physical units (1e-4 for Sentinel-2 L1C digital numbers).
    #[arg(long, env = "GEOSSL_SCALE", default_value_t = 1.0)]
    scale: f32,
    /// Per-band offset added after --scale (Sentinel-2 L2A since baseline 04.00: -0.1 with --scale 1e-4).
    #[arg(long, env = "GEOSSL_OFFSET", value_delimiter = ',')]
    offset: Vec<f32>,
    /// Stored value that marks missing pixels (skipped when every band has it); default: each file's own
    /// nodata value, where it declares one (GeoTIFF chips keep their scene's).
    #[arg(long, env = "GEOSSL_NODATA")]
    nodata: Option<f64>,
    /// Use at most this many images (evenly spread over the manifest; 0 = all).
    #[arg(long, env = "GEOSSL_MAX_IMAGES", default_value_t = 0)]
    max_images: usize,
}

#[derive(Debug, Args)]
struct PackArgs {
    /// Manifest of the chips (path,lat,lon,timestamp,location_id[,label]); every chip of one shape and
    /// sample type (as `chips` cuts them).
    #[arg(long, env = "GEOSSL_DATA", required_unless_present = "verify")]
    data: Option<PathBuf>,
    /// Manifest format: csv, geo (path,lat,lon,label) or fmow (an fMoW-RGB split folder).
    #[arg(long, env = "GEOSSL_FORMAT", default_value = "csv")]
    format: String,
    /// The pretraining config whose `model.bands` the chips are read for (band names picked from
    /// multi-band GeoTIFFs); without it, --band-count bands by position.
    #[arg(long, env = "GEOSSL_CONFIG")]
    config: Option<PathBuf>,
    /// Number of bands of the chips, matched by position (without --config).
    #[arg(long, env = "GEOSSL_BAND_COUNT", default_value_t = 3)]
    band_count: usize,
    /// Output folder (pack.json and shard-*.gcp); must not hold a pack already.
    #[arg(long, env = "GEOSSL_OUT", required_unless_present = "verify")]
    out: Option<PathBuf>,
    /// Shard size in MiB.
    #[arg(long, env = "GEOSSL_SHARD_MIB", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    shard_mib: u64,
    /// Threads decoding chips.
    #[arg(long, env = "GEOSSL_WORKERS", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    workers: u16,
    /// Instead of packing: read every chip of this pack, check its CRC-32 and name each damaged one
    /// (non-zero exit when any is).
    #[arg(long, env = "GEOSSL_VERIFY", conflicts_with_all = ["data", "out"])]
    verify: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ChipsArgs {
    /// Georeferenced GeoTIFF scenes: any band count and sample type, any CRS with an EPSG definition.
    #[arg(long, env = "GEOSSL_INPUT", num_args = 1.., required = true)]
    input: Vec<PathBuf>,
    /// Acquisition time of each scene (ISO-8601), in the order of --input.
    #[arg(long, env = "GEOSSL_TIMESTAMPS", num_args = 1..)]
    timestamp: Vec<String>,
    /// Chip side in pixels.
    #[arg(long, env = "GEOSSL_CHIP_SIZE", default_value_t = 224)]
    size: u32,
    /// Step between chips in pixels (default: the chip size).
    #[arg(long, env = "GEOSSL_CHIP_STRIDE")]
    stride: Option<u32>,
    /// Drop chips with more than this fraction of nodata pixels (every band at the file's nodata value, or 0).
    #[arg(long, env = "GEOSSL_MAX_NODATA", default_value_t = 0.05)]
    max_nodata: f64,
    /// Chip files: auto (PNG for 8-bit RGB scenes, GeoTIFF otherwise), png, tiff.
    #[arg(long, env = "GEOSSL_CHIP_FORMAT", value_enum, default_value = "auto")]
    format: geossl_trainer::chips::ChipFormat,
    /// Labels for the manifest's label column, one for all scenes or one per --input: a class raster (any
    /// grid and CRS; a chip takes the class most of its pixels have) or GeoJSON polygons (with
    /// --label-field; a chip takes the class of the polygon holding its centre). Unlabelled chips are left out.
    #[arg(long, env = "GEOSSL_CHIP_LABELS", num_args = 1..)]
    labels: Vec<PathBuf>,
    /// The GeoJSON property holding a polygon's class.
    #[arg(long, env = "GEOSSL_LABEL_FIELD")]
    label_field: Option<String>,
    /// With a class raster: the least share of a chip's pixels its majority class must cover.
    #[arg(long, env = "GEOSSL_MIN_LABEL_SHARE", default_value_t = 0.5)]
    min_label_share: f64,
    /// Output folder (chips and manifest.csv).
    #[arg(long, env = "GEOSSL_OUT")]
    out: PathBuf,
}

/// Labelled data of `probe` and `finetune`.
#[derive(Debug, Args)]
struct DataArgs {
    /// Labelled training manifest (path,lat,lon,timestamp,location_id,label).
    #[arg(long, env = "GEOSSL_TRAIN")]
    train: PathBuf,
    /// Labelled validation manifest; without it, --val-fraction of the training locations are held out.
    #[arg(long, env = "GEOSSL_VAL")]
    val: Option<PathBuf>,
    /// Labelled test manifest: scored once, with the model chosen on validation.
    #[arg(long, env = "GEOSSL_TEST")]
    test: Option<PathBuf>,
    /// Manifest format: csv, geo (path,lat,lon,label) or fmow (an fMoW-RGB split folder).
    #[arg(long, env = "GEOSSL_FORMAT", default_value = "csv")]
    format: String,
    /// Share of training locations held out for validation when --val is not given.
    #[arg(long, env = "GEOSSL_VAL_FRACTION", default_value_t = 0.2)]
    val_fraction: f64,
    /// Seed of the validation split and the data order.
    #[arg(long, env = "GEOSSL_SEED", default_value_t = 0)]
    seed: u64,
}

#[derive(Debug, Args)]
struct ProbeArgs {
    /// Checkpoint directory of the backbone (e.g. a pretraining run's checkpoint/).
    #[arg(long, env = "GEOSSL_CHECKPOINT")]
    checkpoint: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Output directory: probe.json, predictions.csv, checkpoint/.
    #[arg(long, env = "GEOSSL_OUT")]
    out: PathBuf,
    /// Epochs per grid point (the best validation epoch is kept).
    #[arg(long, env = "GEOSSL_EPOCHS", default_value_t = 100)]
    epochs: usize,
    /// Images per batch (features are computed once per image; the probe trains on them in batches).
    #[arg(long, env = "GEOSSL_BATCH_SIZE", default_value_t = 256)]
    batch_size: usize,
    /// Learning rates searched (comma-separated).
    #[arg(long, env = "GEOSSL_LRS", value_delimiter = ',', default_value = "0.1,0.03,0.01")]
    lr: Vec<f64>,
    /// Weight decays searched (comma-separated).
    #[arg(long, env = "GEOSSL_WEIGHT_DECAYS", value_delimiter = ',', default_value = "0,0.0001")]
    weight_decay: Vec<f64>,
    /// Device: auto, cpu, cuda, cuda:N.
    #[arg(long, env = "GEOSSL_DEVICE", default_value = "auto")]
    device: String,
    /// Threads decoding (and augmenting) images while the model works.
    #[arg(long, env = "GEOSSL_WORKERS", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    workers: u16,
}

#[derive(Debug, Args)]
struct FinetuneArgs {
    /// Checkpoint directory of the backbone (e.g. a pretraining run's checkpoint/).
    #[arg(long, env = "GEOSSL_CHECKPOINT")]
    checkpoint: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Output directory: finetune.json, predictions.csv, checkpoint/.
    #[arg(long, env = "GEOSSL_OUT")]
    out: PathBuf,
    /// Training epochs (the best validation epoch is kept).
    #[arg(long, env = "GEOSSL_EPOCHS", default_value_t = 30)]
    epochs: usize,
    /// Images per batch.
    #[arg(long, env = "GEOSSL_BATCH_SIZE", default_value_t = 64)]
    batch_size: usize,
    /// Peak learning rate (cosine schedule).
    #[arg(long, env = "GEOSSL_LR", default_value_t = 0.01)]
    lr: f64,
    /// SGD weight decay.
    #[arg(long, env = "GEOSSL_WEIGHT_DECAY", default_value_t = 1e-4)]
    weight_decay: f64,
    /// RandomResizedCrop area range, min,max.
    #[arg(long, env = "GEOSSL_CROP_SCALE", value_delimiter = ',', default_value = "0.2,1.0")]
    crop_scale: Vec<f64>,
    /// Device: auto, cpu, cuda, cuda:N.
    #[arg(long, env = "GEOSSL_DEVICE", default_value = "auto")]
    device: String,
    /// Threads decoding (and augmenting) images while the model works.
    #[arg(long, env = "GEOSSL_WORKERS", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    workers: u16,
}

#[derive(Debug, Args)]
struct SegmentArgs {
    /// Checkpoint directory of the backbone (e.g. a pretraining run's checkpoint/).
    #[arg(long, env = "GEOSSL_CHECKPOINT")]
    checkpoint: PathBuf,
    /// Training manifest: CSV with `path` and `mask` columns (optional `location_id`), paths relative to it.
    #[arg(long, env = "GEOSSL_TRAIN")]
    train: PathBuf,
    /// Validation manifest; without it, --val-fraction of the training locations are held out.
    #[arg(long, env = "GEOSSL_VAL")]
    val: Option<PathBuf>,
    /// Test manifest: scored once, with the epoch chosen on validation.
    #[arg(long, env = "GEOSSL_TEST")]
    test: Option<PathBuf>,
    /// Share of training locations held out for validation when --val is not given.
    #[arg(long, env = "GEOSSL_VAL_FRACTION", default_value_t = 0.2)]
    val_fraction: f64,
    /// Seed of the validation split and the data order.
    #[arg(long, env = "GEOSSL_SEED", default_value_t = 0)]
    seed: u64,
    /// Class names, comma-separated; mask value i is class i.
    #[arg(long, env = "GEOSSL_CLASSES", value_delimiter = ',', required = true)]
    classes: Vec<String>,
    /// Mask value of unlabelled pixels (not scored, no loss).
    #[arg(long, env = "GEOSSL_IGNORE_INDEX", default_value_t = 255)]
    ignore_index: u8,
    /// Output directory: segment.json, checkpoint/.
    #[arg(long, env = "GEOSSL_OUT")]
    out: PathBuf,
    /// Training epochs (the best validation epoch is kept).
    #[arg(long, env = "GEOSSL_EPOCHS", default_value_t = 30)]
    epochs: usize,
    /// Images per batch.
    #[arg(long, env = "GEOSSL_BATCH_SIZE", default_value_t = 16)]
    batch_size: usize,
    /// Peak learning rate (cosine schedule).
    #[arg(long, env = "GEOSSL_LR", default_value_t = 0.01)]
    lr: f64,
    /// SGD weight decay.
    #[arg(long, env = "GEOSSL_WEIGHT_DECAY", default_value_t = 1e-4)]
    weight_decay: f64,
    /// Device: auto, cpu, cuda, cuda:N.
    #[arg(long, env = "GEOSSL_DEVICE", default_value = "auto")]
    device: String,
    /// Threads decoding (and augmenting) images while the model works.
    #[arg(long, env = "GEOSSL_WORKERS", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    workers: u16,
}

#[derive(Debug, Args)]
struct PretrainArgs {
    /// Config file, or a built-in preset: moco, moco-tp, moco-geo, moco-tp-geo, quickstart.
    #[arg(long, env = "GEOSSL_CONFIG")]
    config: PathBuf,
    /// Manifest CSV (path,lat,lon,timestamp,location_id[,label]) or a chip pack folder (`geossl-train
    /// pack`); overrides `data.manifest`.
    #[arg(long, env = "GEOSSL_DATA")]
    data: Option<PathBuf>,
    /// Run directory: config.toml, metrics.jsonl, checkpoint/.
    #[arg(long, env = "GEOSSL_OUT")]
    out: PathBuf,
    /// Continue from DIR/checkpoint exactly where it stopped.
    #[arg(long, env = "GEOSSL_RESUME")]
    resume: bool,
    /// Resume when DIR/checkpoint holds one, else start (for jobs that are retried: every attempt runs the
    /// same command).
    #[arg(long, env = "GEOSSL_AUTO_RESUME", conflicts_with = "resume")]
    auto_resume: bool,
    /// Device: auto, cpu, cuda, cuda:N (overrides `run.device`).
    #[arg(long, env = "GEOSSL_DEVICE")]
    device: Option<String>,
    /// Length of the run in steps; the learning-rate schedule spans it (overrides `optim.max_steps`).
    #[arg(long, env = "GEOSSL_MAX_STEPS")]
    max_steps: Option<u64>,
    /// Stop after this step with a checkpoint, keeping the schedule (continue later with --resume).
    #[arg(long, env = "GEOSSL_STOP_AFTER")]
    stop_after: Option<u64>,
    /// Hide the progress bar (logs still report every `run.log_every` steps).
    #[arg(long, env = "GEOSSL_NO_PROGRESS")]
    no_progress: bool,
    /// Stop with an error when the embeddings collapse (health measures every `run.health_every` steps; the
    /// last checkpoint is kept). Without it the run warns and goes on.
    #[arg(long, env = "GEOSSL_STOP_ON_COLLAPSE")]
    stop_on_collapse: bool,
    /// Data-parallel on this machine: start this many ranks (one per GPU where there are GPUs), like
    /// `torchrun --nproc-per-node`. Without it, WORLD_SIZE > 1 with RANK, MASTER_ADDR and MASTER_PORT (as
    /// torchrun and Kubernetes set them) makes this process one rank of a larger run.
    #[arg(long, env = "GEOSSL_NPROC_PER_NODE", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    nproc_per_node: u16,
    /// How long a rank waits for the others (rendezvous, each collective) before failing with an error.
    #[arg(long, env = "GEOSSL_DIST_TIMEOUT_S", default_value_t = 300)]
    dist_timeout_s: u64,
}

#[derive(Debug, Args)]
struct InitArgs {
    /// Backbone architecture: resnet18, resnet34 or resnet50.
    #[arg(long, env = "GEOSSL_ARCH", default_value = "resnet18")]
    arch: Arch,
    /// Number of input bands (3 for RGB).
    #[arg(long, env = "GEOSSL_BAND_COUNT", default_value_t = 3)]
    bands: usize,
    /// Input size (square) in pixels.
    #[arg(long, env = "GEOSSL_INPUT_SIZE", default_value_t = 224)]
    input_size: usize,
    /// Sample type of the images the model will take (uint8, uint16, int16, float32, …); default uint8
    /// for 3 bands, unrecorded otherwise.
    #[arg(long, env = "GEOSSL_SAMPLE_TYPE", value_parser = geossl_models::SampleType::parse)]
    sample_type: Option<geossl_models::SampleType>,
    /// Add the MoCo-v2 projection head (D → D → 128) to the embedding head.
    #[arg(long, env = "GEOSSL_PROJECTION")]
    projection: bool,
    /// Add a classifier with this many classes (1000 with torchvision weights).
    #[arg(long, env = "GEOSSL_NUM_CLASSES")]
    num_classes: Option<usize>,
    /// Add an FCN segmentation head with this many classes.
    #[arg(long, env = "GEOSSL_SEGMENTATION_CLASSES")]
    segmentation_classes: Option<usize>,
    /// Class names for the classifier/segmentation head, comma-separated.
    #[arg(long, env = "GEOSSL_LABELS", value_delimiter = ',')]
    labels: Vec<String>,
    /// torchvision state dict as safetensors to load (names must match the spec).
    #[arg(long, env = "GEOSSL_FROM_SAFETENSORS")]
    from_safetensors: Option<PathBuf>,
    /// Random seed for initialisation.
    #[arg(long, env = "GEOSSL_SEED", default_value_t = 0)]
    seed: i64,
    /// Output checkpoint directory (replaced atomically if it exists).
    #[arg(long, env = "GEOSSL_OUT")]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct InfoArgs {
    /// Checkpoint directory to describe; without it, only the runtime is described.
    #[arg(long, env = "GEOSSL_CHECKPOINT")]
    checkpoint: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    // GEOSSL_BANDS names bands (geossl-export import, geossl-serve embed); the band count was it here.
    geossl_models::env_renamed("geossl-train", "GEOSSL_BANDS", "GEOSSL_BAND_COUNT", |v| {
        v.trim().parse::<usize>().is_ok()
    });
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
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).context("--log")?)
        .with_writer(std::io::stderr)
        .with_ansi(geossl_models::stderr_colour())
        .init();
    match cli.command {
        Command::Pretrain(a) => pretrain(a),
        Command::Probe(a) => probe(a),
        Command::Eval(a) => eval(a),
        Command::Plot(a) => plot(a),
        Command::Finetune(a) => finetune(a),
        Command::Segment(a) => segment(a),
        Command::Init(a) => init(a),
        Command::Info(a) => info(a),
        Command::Chips(a) => chips(a),
        Command::Pack(a) => pack(a),
        Command::Stats(a) => stats(a),
    }
}

fn pack(a: PackArgs) -> Result<()> {
    use geossl_trainer::data::read_manifest;
    use geossl_trainer::pack::{write_pack, Pack, PackOptions};
    if let Some(dir) = a.verify {
        let p = Pack::open(&dir)?;
        let (n, bad) = p.verify();
        for e in &bad {
            eprintln!("damaged: {e}");
        }
        if !bad.is_empty() {
            bail!("{}: {} of {n} chips damaged (named above); the others read correctly", dir.display(), bad.len());
        }
        println!("{}: {n} chips, every checksum correct", dir.display());
        return Ok(());
    }
    let (Some(data), Some(out)) = (a.data, a.out) else { bail!("--data and --out are required to pack") };
    let format = manifest_format(&a.format)?;
    let bands = match &a.config {
        Some(c) => geossl_trainer::config::PretrainConfig::load(c)?.0.model.bands,
        None => geossl_trainer::image_io::positional(a.band_count),
    };
    let samples = read_manifest(&data, format)?;
    let bar = indicatif::ProgressBar::new(samples.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("packing {bar:30} {pos}/{len} chips {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let opt = PackOptions { bands, shard_bytes: a.shard_mib << 20, workers: a.workers as usize };
    let index = write_pack(&samples, &out, &opt, &bar)?;
    bar.finish_and_clear();
    let bytes: u64 = index.shards.iter().map(|s| s.bytes).sum();
    println!(
        "packed {} chips ({} band(s) of {}×{} {:?}) into {} shard(s), {:.1} MiB, in {}",
        index.records,
        index.shape.channels,
        index.shape.width,
        index.shape.height,
        index.shape.sample_type,
        index.shards.len(),
        bytes as f64 / (1u64 << 20) as f64,
        out.display()
    );
    Ok(())
}

fn stats(a: StatsArgs) -> Result<()> {
    use geossl_trainer::stats::{band_stats, StatsOptions};
    let o = StatsOptions {
        manifest: a.data,
        bands: a.bands,
        scale: a.scale,
        offset: a.offset,
        nodata: a.nodata,
        max_images: a.max_images,
    };
    let st = band_stats(&o)?;
    eprintln!("{} images ({} unreadable skipped), {} pixels per band", st.images, st.unreadable, st.pixels);
    print!("{}", st.config_toml());
    Ok(())
}

fn pretrain(a: PretrainArgs) -> Result<()> {
    use geossl_trainer::config::PretrainConfig;
    use geossl_trainer::pretrain::{pretrain, RunOptions};
    if a.nproc_per_node > 1 {
        // Each rank is one process: the same command as ranks 0..N of one run on this machine.
        let ranks = a.nproc_per_node as usize;
        return Ok(geossl_dist::launch_local_ranks(ranks, "--nproc-per-node", &[("GEOSSL_NPROC_PER_NODE", "1")])?);
    }
    let (cfg, text) = PretrainConfig::load(&a.config)?;
    let manifest = a
        .data
        .or_else(|| cfg.data.manifest.clone())
        .context("no training data: pass --data MANIFEST.csv or set data.manifest in the config")?;
    let device_arg = a.device.as_deref().unwrap_or(&cfg.run.device);
    let timeout = std::time::Duration::from_secs(a.dist_timeout_s);
    let dist = geossl_dist::rendezvous_from_env(timeout)?;
    // One GPU per rank, as torchrun does it: under a rendezvous, `cuda` (or `auto` with a GPU) means
    // cuda:LOCAL_RANK. Whether that device can run NCCL is checked just below, with the reason.
    let gpu_per_rank = dist.is_some() && (device_arg == "cuda" || (device_arg == "auto" && tch::Cuda::is_available()));
    let dev =
        if gpu_per_rank { tch::Device::Cuda(geossl_dist::local_rank()?) } else { device::parse_device(device_arg)? };
    if dist.is_some() {
        // Gloo for the CPU, NCCL for a GPU: refused here, before any model is built, where it cannot run.
        geossl_dist::Backend::for_device(dev)?;
    }
    tracing::info!("{}", device::describe());
    use geossl_trainer::pretrain::CHECKPOINT_DIR;
    let opts = RunOptions {
        resume: a.resume || (a.auto_resume && a.out.join(CHECKPOINT_DIR).join("state.json").exists()),
        manifest,
        out: a.out,
        device: dev,
        max_steps: a.max_steps,
        stop_after: a.stop_after,
        progress: !a.no_progress && dist.as_ref().is_none_or(|d| d.rank == 0),
        stop_on_collapse: a.stop_on_collapse,
        dist,
    };
    let s = pretrain(&cfg, &text, &opts)?;
    if opts.dist.as_ref().is_none_or(|d| d.rank == 0) {
        println!("{}", serde_json::to_string_pretty(&s)?);
    }
    Ok(())
}

/// A `--format` flag's manifest format.
fn manifest_format(f: &str) -> Result<geossl_trainer::data::Format> {
    use geossl_trainer::data::Format;
    Ok(match f {
        "csv" => Format::Csv,
        "geo" => Format::Geo,
        "fmow" => Format::Fmow,
        f => bail!("--format {f}: csv, geo or fmow"),
    })
}

fn data_options(d: DataArgs) -> Result<geossl_trainer::supervised::DataOptions> {
    let format = manifest_format(&d.format)?;
    Ok(geossl_trainer::supervised::DataOptions {
        train: d.train,
        val: d.val,
        test: d.test,
        format,
        val_fraction: d.val_fraction,
        seed: d.seed,
    })
}

fn probe(a: ProbeArgs) -> Result<()> {
    use geossl_trainer::probe::{run, ProbeOptions};
    let opts = ProbeOptions {
        checkpoint: a.checkpoint,
        device: device::parse_device(&a.device)?,
        data: data_options(a.data)?,
        out: a.out,
        epochs: a.epochs,
        batch_size: a.batch_size,
        learning_rates: a.lr,
        weight_decays: a.weight_decay,
        workers: a.workers.into(),
    };
    let r = run(&opts)?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    use geossl_trainer::evaluate::{run, EvalOptions};
    let opts = EvalOptions {
        checkpoint: a.checkpoint,
        data: a.data,
        out: a.out,
        report: a.report,
        name: a.name,
        block: a.block,
        val: a.val_share,
        test: a.test_share,
        seed: a.seed,
        knn: geossl_eval::KnnOptions { k: a.knn_k, temperature: a.knn_temperature },
        c_grid: a.probe_c,
        resamples: a.resamples,
        device: device::parse_device(&a.device)?,
        workers: a.workers.into(),
    };
    let r = run(&opts)?;
    let iv = |i: &geossl_eval::Interval| format!("{:.3} [{:.3}, {:.3}]", i.value, i.low, i.high);
    eprintln!(
        "kNN top-1 {}  probe top-1 {} (C {})  majority {}  ({} test chips)",
        iv(&r.knn.top1),
        iv(&r.probe.scores.top1),
        r.probe.c,
        iv(&r.majority_top1),
        r.split.test
    );
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}

fn finetune(a: FinetuneArgs) -> Result<()> {
    use geossl_trainer::finetune::{run, FinetuneOptions};
    let [lo, hi] = a.crop_scale[..] else { bail!("--crop-scale takes two numbers: min,max") };
    let opts = FinetuneOptions {
        checkpoint: a.checkpoint,
        device: device::parse_device(&a.device)?,
        data: data_options(a.data)?,
        out: a.out,
        epochs: a.epochs,
        batch_size: a.batch_size,
        learning_rate: a.lr,
        weight_decay: a.weight_decay,
        crop_scale: [lo, hi],
        workers: a.workers.into(),
    };
    let r = run(&opts)?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}

fn segment(a: SegmentArgs) -> Result<()> {
    use geossl_trainer::segment::{run, SegmentOptions};
    let opts = SegmentOptions {
        checkpoint: a.checkpoint,
        device: device::parse_device(&a.device)?,
        train: a.train,
        val: a.val,
        test: a.test,
        val_fraction: a.val_fraction,
        seed: a.seed,
        out: a.out,
        classes: a.classes,
        ignore_index: a.ignore_index,
        epochs: a.epochs,
        batch_size: a.batch_size,
        learning_rate: a.lr,
        weight_decay: a.weight_decay,
        workers: a.workers.into(),
    };
    let r = run(&opts)?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}

fn plot(a: PlotArgs) -> Result<()> {
    use geossl_trainer::plot;
    let runs = plot::read_runs(&a.runs)?;
    let drawn = plot::plot(&runs, &a.out, a.width, a.height)?;
    println!("wrote {} ({} panels, {} runs)", a.out.display(), drawn.panels.len(), drawn.colours.len());
    Ok(())
}

fn init(a: InitArgs) -> Result<()> {
    use geossl_trainer::checkpoint::{init_checkpoint, InitOptions};
    let o = InitOptions {
        arch: a.arch,
        bands: a.bands,
        input_size: a.input_size,
        sample_type: a.sample_type,
        projection: a.projection,
        num_classes: a.num_classes,
        segmentation_classes: a.segmentation_classes,
        labels: a.labels,
        from_safetensors: a.from_safetensors,
        seed: a.seed,
    };
    let spec = init_checkpoint(&o, &a.out).with_context(|| format!("writing checkpoint {}", a.out.display()))?;
    println!("wrote {} ({} parameter tensors, {})", a.out.display(), spec.parameters().len(), a.arch);
    Ok(())
}

fn chips(a: ChipsArgs) -> Result<()> {
    use geossl_trainer::chips::{tile_scenes, LabelSource, TileOptions};
    let opt = TileOptions {
        size: a.size,
        stride: a.stride.unwrap_or(a.size),
        max_nodata: a.max_nodata,
        timestamp: None,
        format: a.format,
        labels: None,
        min_label_share: a.min_label_share,
    };
    if a.label_field.is_some() && a.labels.is_empty() {
        bail!("--label-field names the class property of --labels polygons: give --labels too");
    }
    let labels =
        a.labels.iter().map(|p| LabelSource::from_path(p, a.label_field.as_deref())).collect::<Result<Vec<_>, _>>()?;
    let (manifest, n) = tile_scenes(&a.input, &a.timestamp, &labels, &a.out, &opt)?;
    println!("wrote {n} chips and {}", manifest.display());
    Ok(())
}

fn info(a: InfoArgs) -> Result<()> {
    println!("{}", device::describe());
    if let Some(dir) = a.checkpoint {
        let loaded = checkpoint::load_checkpoint(&dir, tch::Device::Cpu)
            .with_context(|| format!("loading checkpoint {}", dir.display()))?;
        let s = &loaded.spec;
        let n: usize = s.parameters().iter().filter(|p| p.role.trainable()).map(|p| p.numel()).sum();
        println!(
            "{}: {} with {} bands {:?}, input {}x{}, {} trainable parameters, heads: [{}], training: {}",
            dir.display(),
            s.backbone.arch,
            s.backbone.in_channels,
            s.bands,
            s.input_size[0],
            s.input_size[1],
            n,
            s.heads.iter().map(|h| h.kind().name()).collect::<Vec<_>>().join(", "),
            s.training.as_ref().map_or("none".to_string(), |t| format!("{} (step {})", t.method, t.step)),
        );
    }
    Ok(())
}
