//! Serving benchmark (run by `scripts/bench/serve_bench.sh`, not a test):
//! images/s of a raw ONNX Runtime session vs the same model served over HTTP
//! by geossl-serve, and vs a FastAPI + onnxruntime server; p50/p99 latency
//! at 50% load. Prints one JSON object.
//!
//! Env: GEOSSL_BENCH_REPO (model repository with GEOSSL_BENCH_MODEL, default
//! `resnet50`), GEOSSL_BENCH_BATCH (8), GEOSSL_BENCH_SECONDS (20),
//! GEOSSL_BENCH_FASTAPI (host:port of a running FastAPI server, optional),
//! GEOSSL_BENCH_EP (cpu), GEOSSL_BENCH_SERVER_ARGS (extra `serve` flags),
//! GEOSSL_BENCH_RAW_VARIANTS (1: also time the raw session with CUDA NHWC
//! kernels and IO binding each on and off).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use geossl_serve::infer::ort::{self, EpPreference, IoBindingMode, OrtBackend, SessionOptions};
use geossl_serve::infer::{Backend, Tensor};
use geossl_tests::http::{oip_u8_binary_request, request};
use geossl_tests::server::Server;
use serde_json::json;

fn env<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

struct Load {
    model: String,
    shape: [usize; 3],
}

impl Load {
    fn body(&self, n: usize) -> (String, Vec<u8>) {
        let numel = n * self.shape.iter().product::<usize>();
        let px: Vec<u8> = (0..numel).map(|i| (i * 7 % 251) as u8).collect();
        oip_u8_binary_request(&[n, self.shape[0], self.shape[1], self.shape[2]], &px)
    }

    fn send(&self, addr: SocketAddr, p: &(String, Vec<u8>)) -> u16 {
        request(
            addr,
            "POST",
            &format!("/v2/models/{}/infer", self.model),
            &[("Inference-Header-Content-Length", &p.0)],
            &p.1,
        )
        .map_or(0, |r| r.status)
    }

    /// `clients` closed-loop clients sending `n`-image requests for `secs`: images/s.
    fn closed(&self, addr: SocketAddr, clients: usize, n: usize, secs: f64) -> f64 {
        let p = Arc::new(self.body(n));
        let images = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        std::thread::scope(|s| {
            for _ in 0..clients {
                let (p, images, stop) = (p.clone(), images.clone(), stop.clone());
                s.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if self.send(addr, &p) == 200 {
                            images.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                });
            }
            // Warm-up second, then measure.
            std::thread::sleep(Duration::from_secs(1));
            let start_images = images.load(Ordering::Relaxed);
            let t = Instant::now();
            std::thread::sleep(Duration::from_secs_f64(secs));
            let got = images.load(Ordering::Relaxed) - start_images;
            stop.store(true, Ordering::Relaxed);
            got as f64 / t.elapsed().as_secs_f64()
        })
    }

    /// Open-loop single-image requests at `rate`/s for `secs`: (p50, p99) ms
    /// from the scheduled send time, and the fraction answered 200.
    fn open(&self, addr: SocketAddr, rate: f64, secs: f64) -> (f64, f64, f64) {
        let p = Arc::new(self.body(1));
        let (tx, rx) = mpsc::channel::<Instant>();
        let rx = Arc::new(Mutex::new(rx));
        let lat = Arc::new(Mutex::new(Vec::new()));
        let ok = Arc::new(AtomicU64::new(0));
        let mut sent = 0u64;
        std::thread::scope(|s| {
            for _ in 0..64 {
                let (rx, p, lat, ok) = (rx.clone(), p.clone(), lat.clone(), ok.clone());
                s.spawn(move || loop {
                    let Ok(at) = rx.lock().unwrap().recv() else { return };
                    if self.send(addr, &p) == 200 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    lat.lock().unwrap().push(at.elapsed().as_secs_f64() * 1000.0);
                });
            }
            let start = Instant::now();
            while start.elapsed().as_secs_f64() < secs {
                let due = (start.elapsed().as_secs_f64() * rate) as u64;
                while sent < due {
                    tx.send(start + Duration::from_secs_f64(sent as f64 / rate)).unwrap();
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            drop(tx);
        });
        let mut l = lat.lock().unwrap().clone();
        l.sort_by(f64::total_cmp);
        let q = |f: f64| l.get(((l.len() as f64 - 1.0) * f).round() as usize).copied().unwrap_or(f64::NAN);
        (q(0.5), q(0.99), ok.load(Ordering::Relaxed) as f64 / sent.max(1) as f64)
    }

    fn all(&self, addr: SocketAddr, batch: usize, secs: f64) -> serde_json::Value {
        let batched = self.closed(addr, 2, batch, secs);
        let singles = self.closed(addr, 2 * batch, 1, secs);
        let rate = 0.5 * singles;
        let (p50, p99, ok) = self.open(addr, rate, secs);
        json!({
            "images_per_s_batch_requests": batched,
            "images_per_s_single_image_requests": singles,
            "half_load_rate": rate, "p50_ms": p50, "p99_ms": p99, "half_load_ok_fraction": ok,
        })
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` / `cargo test --benches` probes
    }
    let Ok(repo) = std::env::var("GEOSSL_BENCH_REPO") else {
        eprintln!("GEOSSL_BENCH_REPO not set; run scripts/bench/serve_bench.sh");
        return;
    };
    let repo = PathBuf::from(repo);
    let name: String = env("GEOSSL_BENCH_MODEL", "resnet50".to_string());
    let batch: usize = env("GEOSSL_BENCH_BATCH", 8);
    let secs: f64 = env("GEOSSL_BENCH_SECONDS", 20.0);
    let ep = match env("GEOSSL_BENCH_EP", "cpu".to_string()).as_str() {
        "cuda" => EpPreference::Cuda,
        _ => EpPreference::Cpu,
    };
    let model = repo.join(&name).join("1/model.onnx");

    // Raw ONNX Runtime session, same model and batch, same process kind of options.
    let lib = std::env::var("ORT_DYLIB_PATH").unwrap_or_else(|_| env!("ORT_DYLIB_PATH").to_string());
    let envr = ort::init(std::path::Path::new(&lib)).expect("onnxruntime");
    let opts = SessionOptions { ep, ..SessionOptions::default() };
    let (mut b, sig) = OrtBackend::load(envr, &model, &opts).expect("model");
    let c = sig.input.shape[1] as usize;
    let (h, w) = (sig.input.shape[2] as usize, sig.input.shape[3] as usize);
    let x = Tensor::u8(vec![batch, c, h, w], (0..batch * c * h * w).map(|i| (i * 7 % 251) as u8).collect());
    let raw_phase = |b: &mut OrtBackend| {
        for _ in 0..3 {
            b.infer(&x).unwrap();
        }
        let t = Instant::now();
        let mut n = 0usize;
        while t.elapsed().as_secs_f64() < secs {
            b.infer(&x).unwrap();
            n += batch;
        }
        n as f64 / t.elapsed().as_secs_f64()
    };
    // Which session options matter (on a GPU: NHWC kernels, pinned-memory IO binding).
    let mut variants = Vec::new();
    if env("GEOSSL_BENCH_RAW_VARIANTS", 0) == 1 {
        for nhwc in [false, true] {
            for io in [IoBindingMode::Off, IoBindingMode::On] {
                let o = SessionOptions { cuda_nhwc: nhwc, io_binding: io, ..opts.clone() };
                let (mut v, sig) = OrtBackend::load(envr, &model, &o).expect("model");
                let ips = raw_phase(&mut v);
                eprintln!("raw ORT, nhwc {nhwc}, io binding {io:?} ({}): {ips:.1} images/s", sig.execution_provider);
                variants.push(json!({ "cuda_nhwc": nhwc, "io_binding": format!("{io:?}"),
                    "execution_provider": sig.execution_provider, "images_per_s": ips }));
            }
        }
    }
    // Raw ORT before and after the served phases (this machine's speed drifts); the mean is the reference.
    let raw_before = raw_phase(&mut b);
    eprintln!("raw ORT: {raw_before:.1} images/s");
    let load = Load { model: name.clone(), shape: [c, h, w] };
    let ep_flag = if ep == EpPreference::Cuda { "cuda" } else { "cpu" };
    let extra: String = env("GEOSSL_BENCH_SERVER_ARGS", String::new());
    let mut server_args = vec!["--execution-provider", ep_flag];
    server_args.extend(extra.split_whitespace());
    let served = {
        let s = Server::start(&repo, &server_args);
        load.all(s.addr, batch, secs)
    };
    eprintln!("served: {served}");
    let raw_after = raw_phase(&mut b);
    drop(b);
    let raw = 0.5 * (raw_before + raw_after);
    eprintln!("raw ORT again: {raw_after:.1} images/s");
    let fastapi = std::env::var("GEOSSL_BENCH_FASTAPI").ok().map(|a| {
        let load = Load { model: name.clone(), shape: [c, h, w] };
        let mut v = load.all(a.parse().expect("host:port"), batch, secs);
        eprintln!("fastapi: {v}");
        // Latency of geossl-serve at the FastAPI server's half-load rate (same offered load).
        let rate = v["half_load_rate"].as_f64().unwrap_or(1.0);
        let s = Server::start(&repo, &server_args);
        let (p50, p99, ok) = load.open(s.addr, rate, secs);
        v["served_at_this_half_load_rate"] = json!({ "p50_ms": p50, "p99_ms": p99, "ok_fraction": ok });
        eprintln!("served at the same rate: p50 {p50:.1} ms, p99 {p99:.1} ms");
        v
    });
    let ratio = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let report = json!({
        "model": name, "input": [c, h, w], "batch": batch, "seconds_per_phase": secs,
        "execution_provider": sig.execution_provider, "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "raw_ort_images_per_s": raw, "raw_ort_before_after": [raw_before, raw_after], "raw_ort_variants": variants,
        "served": served,
        "served_over_raw": ratio(&served, "images_per_s_batch_requests") / raw,
        "fastapi": fastapi,
        "served_over_fastapi_single_image": fastapi.as_ref().map(|f| ratio(&served, "images_per_s_single_image_requests") / ratio(f, "images_per_s_single_image_requests")),
        "served_over_fastapi_batch_requests": fastapi.as_ref().map(|f| ratio(&served, "images_per_s_batch_requests") / ratio(f, "images_per_s_batch_requests")),
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}
