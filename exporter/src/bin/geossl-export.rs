//! `geossl-export`: checkpoints → ONNX, and PyTorch checkpoint import.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use geossl_models::{Arch, InputDType};

/// Geography-aware self-supervised learning for satellite imagery: export.
///
/// Every flag can also be set through the environment variable named in its help.
#[derive(Debug, Parser)]
#[command(name = "geossl-export", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Head {
    Embed,
    Classify,
    Segment,
    /// The backbone's last feature map `[N, D, H/32, W/32]`: patch-level embeddings (`embed --level spatial`).
    Features,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Export a checkpoint directory to an ONNX model (embedding, classifier or segmentation head), with its
    /// STAC MLM model card beside it (`model.onnx` → `model.item.json`).
    Onnx(OnnxArgs),
    /// Import a PyTorch `.pth`/`.pth.tar` (the paper's released MoCo checkpoints, torchvision
    /// state dicts) or torchvision-layout safetensors into a checkpoint directory.
    Import(ImportArgs),
}

#[derive(Debug, Args)]
struct OnnxArgs {
    /// Checkpoint directory (spec.json + model.safetensors).
    #[arg(long, env = "GEOSSL_CHECKPOINT")]
    checkpoint: PathBuf,
    /// Which head the graph ends in.
    #[arg(long, env = "GEOSSL_HEAD", value_enum, default_value = "embed")]
    head: Head,
    /// Output ONNX file.
    #[arg(long, env = "GEOSSL_OUT")]
    out: PathBuf,
    /// Input element type: uint8 or uint16 (stored samples; scale, offset and normalization inside the graph,
    /// the type the checkpoint was trained on) or float32 (pre-normalized).
    #[arg(long, env = "GEOSSL_INPUT_TYPE", value_enum, default_value = "uint8")]
    input: InputArg,
    /// fp16 weights and compute with fp32 inputs/outputs.
    #[arg(long, env = "GEOSSL_FP16")]
    fp16: bool,
    /// ONNX opset.
    #[arg(long, env = "GEOSSL_OPSET", default_value_t = 17)]
    opset: u32,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum InputArg {
    Uint8,
    Uint16,
    Float32,
}

impl From<InputArg> for InputDType {
    fn from(a: InputArg) -> Self {
        match a {
            InputArg::Uint8 => InputDType::Uint8,
            InputArg::Uint16 => InputDType::Uint16,
            InputArg::Float32 => InputDType::Float32,
        }
    }
}

#[derive(Debug, Args)]
struct ImportArgs {
    /// Source checkpoint file.
    #[arg(long, env = "GEOSSL_FROM")]
    from: PathBuf,
    /// Backbone architecture of the source.
    #[arg(long, env = "GEOSSL_ARCH")]
    arch: Arch,
    /// Output checkpoint directory.
    #[arg(long, env = "GEOSSL_OUT")]
    out: PathBuf,
    /// Input size (square) of the imported model, in pixels.
    #[arg(long, env = "GEOSSL_INPUT_SIZE", default_value_t = 224)]
    input_size: usize,
    /// Keep a MoCo MLP projection (`fc.0`/`fc.2`) as the embedding head's projection
    /// (default: the embedding is the pooled backbone features, what downstream tasks use).
    #[arg(long, env = "GEOSSL_KEEP_PROJECTION")]
    keep_projection: bool,
    /// Input contract of a non-RGB checkpoint as JSON: {"bands": [...], "sample_type": "uint16",
    /// "normalization": {"preset": "per_band", "scale": 0.0001, "offset": [...], "mean": [...], "std": [...]}}.
    #[arg(long, env = "GEOSSL_INPUT_CONTRACT", conflicts_with = "bands")]
    input_contract: Option<PathBuf>,
    /// Band names in conv1's channel order (e.g. B01,B02,…,B12 with B8A), instead of --input-contract.
    #[arg(long, env = "GEOSSL_BANDS", value_delimiter = ',', requires_all = ["sample_type", "mean", "std"])]
    bands: Option<Vec<String>>,
    /// Stored sample type the weights were trained on (uint8, uint16, int16, float32, …).
    #[arg(long, env = "GEOSSL_SAMPLE_TYPE", value_parser = geossl_models::SampleType::parse)]
    sample_type: Option<geossl_models::SampleType>,
    /// Stored value × scale (+ offset) = the units of --mean/--std (1e-4 for Sentinel-2 L1C).
    #[arg(long, env = "GEOSSL_SCALE", default_value_t = 1.0)]
    scale: f32,
    /// Per-band offset added after --scale.
    #[arg(long, env = "GEOSSL_OFFSET", value_delimiter = ',')]
    offset: Vec<f32>,
    /// Per-band means, in physical units.
    #[arg(long, env = "GEOSSL_MEAN", value_delimiter = ',')]
    mean: Option<Vec<f32>>,
    /// Per-band standard deviations, in physical units.
    #[arg(long, env = "GEOSSL_STD", value_delimiter = ',')]
    std: Option<Vec<f32>>,
}

fn main() -> std::process::ExitCode {
    // GEOSSL_INPUT names input files (geossl-train chips, geossl-serve embed); the input type was it here.
    geossl_models::env_renamed("geossl-export", "GEOSSL_INPUT", "GEOSSL_INPUT_TYPE", |v| {
        matches!(v, "uint8" | "uint16" | "float32")
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
    match cli.command {
        Command::Onnx(a) => {
            let head = match a.head {
                Head::Embed => geossl_models::HeadKind::Embedding,
                Head::Classify => geossl_models::HeadKind::Classifier,
                Head::Segment => geossl_models::HeadKind::Segmentation,
                Head::Features => geossl_models::HeadKind::Features,
            };
            let opts =
                geossl_exporter::ExportOptions { head, input: a.input.into(), fp16: a.fp16, opset: a.opset as i64 };
            let n = geossl_exporter::export_checkpoint(&a.checkpoint, &a.out, &opts)
                .with_context(|| format!("exporting {} to {}", a.checkpoint.display(), a.out.display()))?;
            println!(
                "wrote {} ({n} bytes) and its STAC MLM card {}",
                a.out.display(),
                geossl_models::mlm::card_path(&a.out).display()
            );
            Ok(())
        }
        Command::Import(a) => {
            let input = match (&a.input_contract, a.bands.clone()) {
                (Some(path), _) => {
                    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
                    Some(
                        serde_json::from_str::<geossl_exporter::InputContract>(&text)
                            .with_context(|| format!("{}: not an input contract", path.display()))?,
                    )
                }
                (None, Some(bands)) => {
                    let mut normalization = geossl_models::Normalization::per_band(
                        a.scale,
                        a.mean.clone().unwrap_or_default(),
                        a.std.clone().unwrap_or_default(),
                    );
                    normalization.offset = a.offset.clone();
                    let sample_type = a.sample_type.context("--bands needs --sample-type")?;
                    Some(geossl_exporter::InputContract { bands, sample_type, normalization })
                }
                (None, None) => None,
            };
            let opts = geossl_exporter::ImportOptions {
                arch: a.arch,
                input_size: a.input_size,
                keep_projection: a.keep_projection,
                input,
            };
            let spec = geossl_exporter::import_checkpoint(&a.from, &a.out, opts)
                .with_context(|| format!("importing {}", a.from.display()))?;
            let heads: Vec<&str> = spec.heads.iter().map(|h| h.kind().name()).collect();
            println!("wrote {} ({}, heads: {})", a.out.display(), spec.backbone.arch, heads.join(", "));
            Ok(())
        }
    }
}
