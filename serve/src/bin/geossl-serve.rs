//! `geossl-serve`: the inference service and the archive embedder.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};

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
    /// Serve a model repository over HTTP (not implemented yet, issue #5).
    Serve(ServeArgs),
    /// Embed a GeoTIFF archive into GeoParquet (not implemented yet, issue #5).
    Embed(EmbedArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Model repository: DIR/<model>/<version>/model.onnx.
    #[arg(long, env = "GEOSSL_MODEL_REPOSITORY")]
    model_repository: PathBuf,
    /// HTTP port for inference and health.
    #[arg(long, env = "GEOSSL_PORT", default_value_t = 8080)]
    port: u16,
    /// Port of the Prometheus /metrics endpoint.
    #[arg(long, env = "GEOSSL_METRICS_PORT", default_value_t = 9090)]
    metrics_port: u16,
}

#[derive(Debug, Args)]
struct EmbedArgs {
    /// ONNX embedding model.
    #[arg(long, env = "GEOSSL_MODEL")]
    model: PathBuf,
    /// GeoTIFF files or directories to embed.
    #[arg(long, env = "GEOSSL_INPUT", num_args = 1..)]
    input: Vec<PathBuf>,
    /// Output GeoParquet file.
    #[arg(long, env = "GEOSSL_OUT")]
    out: PathBuf,
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
        Command::Serve(_) => bail!("`geossl-serve serve` is not implemented yet (tracked in issue #5)"),
        Command::Embed(_) => bail!("`geossl-serve embed` is not implemented yet (tracked in issue #5)"),
    }
}
