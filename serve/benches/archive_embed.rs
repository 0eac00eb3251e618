//! Archive-embedding benchmark (run by `scripts/bench/archive_bench.sh`, not a
//! test): chips/s of `geossl-serve embed` end to end (decode, georeference,
//! inference, GeoParquet) from local files and from a loopback S3-compatible
//! store (moto), against chips/s of the raw ONNX Runtime session alone at the
//! same batch size and session options. Prints one JSON object.
//!
//! Env: GEOSSL_BENCH_MODEL (ONNX embedding model with a fixed input size),
//! GEOSSL_BENCH_SCENE (a GeoTIFF, copied GEOSSL_BENCH_COPIES times, default 6),
//! GEOSSL_BENCH_BATCH (32), GEOSSL_BENCH_SPINNING (0: idle ORT threads sleep,
//! as `embed` sets them), GEOSSL_BENCH_RAW_SECONDS (10).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Instant;

use geossl_serve::archive::embed::EmbedOptions;
use geossl_serve::infer::ort::{self, EpPreference, OrtBackend, SessionOptions};
use geossl_serve::infer::{Backend, Tensor};
use geossl_tests::objstore::Moto;
use serde_json::json;

fn env<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

fn main() {
    let model = PathBuf::from(std::env::var("GEOSSL_BENCH_MODEL").expect("GEOSSL_BENCH_MODEL"));
    let scene = PathBuf::from(std::env::var("GEOSSL_BENCH_SCENE").expect("GEOSSL_BENCH_SCENE"));
    let copies: usize = env("GEOSSL_BENCH_COPIES", 6);
    let batch: usize = env("GEOSSL_BENCH_BATCH", 32);
    let spinning = env("GEOSSL_BENCH_SPINNING", 0u8) == 1;
    let raw_seconds: f64 = env("GEOSSL_BENCH_RAW_SECONDS", 10.0);
    let lib = std::env::var("ORT_DYLIB_PATH").unwrap_or_else(|_| "libonnxruntime.so.1.31.1".into());
    let session = SessionOptions { ep: EpPreference::Cpu, spinning, ..SessionOptions::default() };

    // The raw session: batches of the model's input shape, back to back.
    let envr = ort::init(std::path::Path::new(&lib)).expect("onnxruntime");
    let (mut b, sig) = OrtBackend::load(envr, &model, &session).expect("model");
    let info = sig.into_info("bench", 1, None, None).expect("model info");
    let (c, Some(h), Some(w)) = info.input_chw() else { panic!("the model's input size is not fixed") };
    let x = Tensor::u8(vec![batch, c, h, w], (0..batch * c * h * w).map(|i| (i * 7 % 251) as u8).collect());
    for _ in 0..3 {
        b.infer(&x).unwrap();
    }
    let t = Instant::now();
    let mut n = 0;
    while t.elapsed().as_secs_f64() < raw_seconds {
        b.infer(&x).unwrap();
        n += batch;
    }
    let raw = n as f64 / t.elapsed().as_secs_f64();
    drop(b);

    // The archive: `copies` copies of the scene, locally and in the loopback store.
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(&scene).unwrap();
    let moto = Moto::start();
    moto.bucket("bench");
    for i in 0..copies {
        std::fs::write(dir.path().join(format!("scene{i}.tif")), &bytes).unwrap();
        moto.put("bench", &format!("scenes/scene{i}.tif"), &bytes);
    }
    for (k, v) in Moto::env(moto.addr) {
        std::env::set_var(k, v);
    }
    let me = || geossl_tests::server::process_cpu_seconds("self");
    let run = |input: String| {
        let (cpu0, store0) = (me(), moto.cpu_seconds());
        let opts = EmbedOptions {
            model: model.clone(),
            inputs: vec![input],
            out: dir.path().join("out.parquet"),
            stride: None,
            batch_size: batch,
            max_nodata: 1.0, // every window, as the raw session sees
            session: session.clone(),
            ort_lib: PathBuf::from(&lib),
            band_groups: false,
            bands: None,
            row_group_rows: geossl_serve::archive::embed::ROW_GROUP_ROWS,
            planned: None,
            bbox: None,
            model_name: None,
            model_version: None,
            dtype: Default::default(),
            level: Default::default(),
        };
        let s = geossl_serve::archive::embed::run(&opts).unwrap();
        let (cpu, store_cpu) = (me() - cpu0, moto.cpu_seconds() - store0);
        json!({
            "embed_cpu_s": cpu, "store_server_cpu_s": store_cpu,
            "rows": s.rows, "seconds": s.seconds, "chips_per_s": s.rows as f64 / s.seconds,
            "ratio_to_raw": s.rows as f64 / s.seconds / raw,
            "fetched_bytes": s.fetched_bytes, "fetch_requests": s.fetch_requests,
        })
    };
    let local = run(dir.path().display().to_string());
    let s3 = run("s3://bench/scenes/".into());
    println!(
        "{}",
        json!({
            "model": model.display().to_string(), "input": [c, h, w], "batch": batch, "spinning": spinning,
            "scene": scene.display().to_string(), "scene_bytes": bytes.len(), "copies": copies,
            "raw_ort_chips_per_s": raw, "local": local, "s3_loopback": s3,
            "cpu": std::fs::read_to_string("/proc/cpuinfo").ok()
                .and_then(|t| t.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())),
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        })
    );
}
