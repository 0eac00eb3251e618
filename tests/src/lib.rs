//! Helpers for geossl's end-to-end tests, which drive the built binaries
//! (`make test` builds them with `cargo build --workspace --bins` first, next
//! to the test executables).

use std::path::PathBuf;
use std::process::{Command, Output};

/// Path of a workspace binary in the same target directory as the running test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>");
    let p = dir.join(name);
    assert!(p.exists(), "{} not built: run `cargo build --workspace --bins` first (as `make test` does)", p.display());
    p
}

/// Runs `name args…` and returns its output.
pub fn run(name: &str, args: &[&str]) -> Output {
    Command::new(bin(name)).args(args).env_remove("RUST_BACKTRACE").output().expect("spawn binary")
}

/// A `geossl-serve ARGS…` command on the CPU provider, with no AWS credentials, endpoint or profile from the
/// caller's environment (tests that use object storage give `env`: e.g. [`objstore::Moto::env`]).
pub fn serve_command(args: &[&str], env: &[(&'static str, String)]) -> Command {
    let mut c = Command::new(bin("geossl-serve"));
    c.args(args).env("GEOSSL_EXECUTION_PROVIDER", "cpu");
    for k in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT", "AWS_SESSION_TOKEN", "AWS_PROFILE"] {
        c.env_remove(k);
    }
    c.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    c
}

/// `geossl-serve embed --model MODEL --input INPUT --out OUT --execution-provider cpu EXTRA…`.
pub fn embed(model: &std::path::Path, input: &std::path::Path, out: &std::path::Path, extra: &[&str]) -> Output {
    let path = |p: &std::path::Path| p.to_str().expect("utf-8 path").to_owned();
    let mut a = vec!["embed".to_owned(), "--model".into(), path(model), "--input".into(), path(input), "--out".into()];
    a.extend([path(out), "--execution-provider".into(), "cpu".into()]);
    a.extend(extra.iter().map(|s| s.to_string()));
    run("geossl-serve", &a.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Stdout and stderr as one string.
pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A Parquet file's rows as one batch, and its footer's key-value metadata (`geo`, `geossl`).
pub fn read_parquet(p: &std::path::Path) -> (arrow_array::RecordBatch, std::collections::HashMap<String, String>) {
    let f = std::fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let b = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f).expect("a Parquet file");
    let kv = b
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|v| v.iter().map(|k| (k.key.clone(), k.value.clone().unwrap_or_default())).collect())
        .unwrap_or_default();
    let batches: Vec<_> = b.build().expect("reader").collect::<Result<_, _>>().expect("batches");
    let schema = batches[0].schema();
    (arrow_select::concat::concat_batches(&schema, &batches).expect("one batch"), kv)
}

/// One chip the trainer's tiler cut: its window's top-left pixel, its PNG and its centre.
#[derive(Debug, Clone)]
pub struct TilerChip {
    /// `(x, y)` of the window in the scene, in pixels.
    pub window: (u32, u32),
    pub png: PathBuf,
    pub lat: f64,
    pub lon: f64,
}

/// `geossl-train chips --input scene --size size --max-nodata 0.5 --out dir`: the windows `geossl-serve
/// embed` reads (the same grid and nodata rule), in manifest order.
pub fn tiler_chips(scene: &std::path::Path, size: usize, dir: &std::path::Path) -> Vec<TilerChip> {
    let path = |p: &std::path::Path| p.to_str().expect("utf-8 path").to_owned();
    let s = size.to_string();
    let o = run(
        "geossl-train",
        &["chips", "--input", &path(scene), "--size", &s, "--out", &path(dir), "--max-nodata", "0.5"],
    );
    assert!(o.status.success(), "chips: {}", text(&o));
    let manifest = std::fs::read_to_string(dir.join("manifest.csv")).expect("manifest.csv");
    manifest
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            // `…_{y}_{x}.png`
            let mut it = f[0].trim_end_matches(".png").rsplit('_');
            let x: u32 = it.next().and_then(|v| v.parse().ok()).expect("x in the chip's name");
            let y: u32 = it.next().and_then(|v| v.parse().ok()).expect("y in the chip's name");
            TilerChip {
                window: (x, y),
                png: dir.join(f[0]),
                lat: f[1].parse().expect("lat"),
                lon: f[2].parse().expect("lon"),
            }
        })
        .collect()
}

/// Runs the reference tool `scripts/reference/{script}` with `args` in the project venv's Python and
/// returns what it printed, one JSON value per line; fails the test, with its output, when it fails.
pub fn reference_json<S: AsRef<std::ffi::OsStr>>(script: &str, args: &[S]) -> Vec<serde_json::Value> {
    let o = Command::new(python())
        .arg(workspace().join("scripts/reference").join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{script}: {e}"));
    assert!(o.status.success(), "{script}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{script} printed {l:?}: {e}")))
        .collect()
}

/// The project venv's Python (`GEOSSL_PYTHON` overrides), for reference tools.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("GEOSSL_PYTHON") {
        return PathBuf::from(p);
    }
    workspace().join(".venv/bin/python")
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

pub mod data;
pub mod http;
pub mod objstore;
pub mod server;
