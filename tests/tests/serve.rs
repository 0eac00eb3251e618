#![allow(clippy::unwrap_used)]
//! End-to-end: the real `geossl-serve` on 127.0.0.1:0 over real exported
//! ONNX models and real imagery (tests/fixtures), driven over HTTP.

use std::io::Cursor;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Barrier, OnceLock};

use geossl_tests::http::{get, oip_u8_binary_request, post};
use geossl_tests::python;
use geossl_tests::server::{histogram, make_repository, Server};
use serde_json::{json, Value};

const SIZE: u32 = 64;

/// One repository for the whole file: embedding (batching tuned to merge),
/// classifier, segmentation, and a float32-input embedding model.
fn repo() -> &'static Path {
    static REPO: OnceLock<tempfile::TempDir> = OnceLock::new();
    REPO.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        make_repository(
            d.path(),
            SIZE as usize,
            &[
                ("embed", "embed", &[]),
                ("classify", "classify", &[]),
                ("segment", "segment", &[]),
                ("embed_f32", "embed", &["--input", "float32"]),
            ],
        );
        std::fs::write(
            d.path().join("embed/config.toml"),
            "max_batch_size = 16\nmax_queue_delay_ms = 150\nqueue_capacity = 64\n",
        )
        .unwrap();
        d
    })
    .path()
}

/// The Landsat RGB scene (committed fixture).
fn scene() -> image::RgbImage {
    let p = geossl_tests::data::fixtures().join("rasterio/RGB.byte.tif");
    image::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).to_rgb8()
}

fn crop(img: &image::RgbImage, x: u32, y: u32, w: u32, h: u32) -> image::RgbImage {
    image::imageops::crop_imm(img, x, y, w, h).to_image()
}

fn encode(img: &image::RgbImage, f: image::ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), f).unwrap();
    out
}

/// `[1, 3, H, W]` uint8, channel-major, from an RGB image.
fn chw(img: &image::RgbImage) -> Vec<u8> {
    let n = (img.width() * img.height()) as usize;
    let mut v = vec![0u8; 3 * n];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            v[c * n + i] = p.0[c];
        }
    }
    v
}

/// OIP binary request of one uint8 image; returns the first output as f32.
fn oip_binary(addr: SocketAddr, model: &str, img: &image::RgbImage) -> (Vec<usize>, Vec<f32>) {
    let shape = [1, 3, img.height() as usize, img.width() as usize];
    let (n, body) = oip_u8_binary_request(&shape, &chw(img));
    let r = post(addr, &format!("/v2/models/{model}/infer"), &[("Inference-Header-Content-Length", &n)], &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let hl: usize = r.header("inference-header-content-length").unwrap().parse().unwrap();
    let meta: Value = serde_json::from_slice(&r.body[..hl]).unwrap();
    let shape: Vec<usize> = serde_json::from_value(meta["outputs"][0]["shape"].clone()).unwrap();
    let size = meta["outputs"][0]["parameters"]["binary_data_size"].as_u64().unwrap() as usize;
    let data = r.body[hl..hl + size].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    (shape, data)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn f32s(v: &Value) -> Vec<f32> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn every_endpoint_on_real_models_and_imagery() {
    let mut s = Server::start(repo(), &[]);
    for p in ["/v2/health/live", "/v2/health/ready", "/v2", "/openapi.json", "/v1/models"] {
        assert_eq!(get(s.addr, p).status, 200, "{p}");
    }
    for m in ["embed", "classify", "segment", "embed_f32"] {
        let md = get(s.addr, &format!("/v2/models/{m}")).json();
        assert_eq!(md["name"], m);
        assert_eq!(md["platform"], "onnxruntime_onnx");
        assert_eq!(get(s.addr, &format!("/v2/models/{m}/versions/1/ready")).status, 200);
    }
    assert_eq!(
        get(s.addr, "/v2/models/embed").json()["inputs"][0],
        json!({ "name": "images", "datatype": "UINT8", "shape": [-1, 3, 64, 64] })
    );
    assert_eq!(get(s.addr, "/v2/models/classify").json()["parameters"]["labels"], json!(["water", "forest", "urban"]));

    let img = scene();
    let tile = crop(&img, 300, 300, SIZE, SIZE);

    // Image endpoint (PNG and TIFF) == OIP tensor endpoint on the same pixels.
    let (_, oip) = oip_binary(s.addr, "embed", &tile);
    assert_eq!(oip.len(), 512);
    for f in [image::ImageFormat::Png, image::ImageFormat::Tiff] {
        let r =
            post(s.addr, "/v1/models/embed/embed", &[("Content-Type", "application/octet-stream")], &encode(&tile, f));
        assert_eq!(r.status, 200, "{f:?}");
        let e = f32s(&r.json()["embeddings"][0]);
        assert!(max_abs_diff(&e, &oip) <= 1e-5 * oip.iter().fold(1.0f32, |a, x| a.max(x.abs())), "{f:?}");
    }
    // The float32-input model normalizes in the server what the uint8 model normalizes in its graph.
    let r = post(
        s.addr,
        "/v1/models/embed_f32/embed",
        &[("Content-Type", "image/png")],
        &encode(&tile, image::ImageFormat::Png),
    );
    assert_eq!(r.status, 200);
    assert!(max_abs_diff(&f32s(&r.json()["embeddings"][0]), &oip) < 1e-3);

    // The whole 791×718 GeoTIFF: resized and centre-cropped by the server.
    let tif = std::fs::read(geossl_tests::data::fixtures().join("rasterio/RGB.byte.tif")).unwrap();
    let r = post(s.addr, "/v1/models/embed/embed", &[("Content-Type", "image/tiff")], &tif);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["dim"], 512);

    // Classify: top-3 over labelled classes, probabilities sum to one.
    let r = post(
        s.addr,
        "/v1/models/classify/classify?top_k=3",
        &[("Content-Type", "image/jpeg")],
        &encode(&tile, image::ImageFormat::Jpeg),
    );
    assert_eq!(r.status, 200);
    let preds = r.json()["predictions"][0].as_array().unwrap().clone();
    let labels: Vec<&str> = preds.iter().map(|p| p["label"].as_str().unwrap()).collect();
    let mut sorted = labels.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, ["forest", "urban", "water"]);
    let total: f64 = preds.iter().map(|p| p["score"].as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-4, "{total}");

    // Segment at native size 96×80: PNG mask == argmax of the OIP logits.
    let piece = crop(&img, 200, 250, 96, 80);
    let r = post(
        s.addr,
        "/v1/models/segment/segment",
        &[("Content-Type", "image/png")],
        &encode(&piece, image::ImageFormat::Png),
    );
    assert_eq!((r.status, r.header("content-type")), (200, Some("image/png")));
    let mask = image::load_from_memory(&r.body).unwrap().to_luma8();
    assert_eq!(mask.dimensions(), (96, 80));
    let (shape, logits) = oip_binary(s.addr, "segment", &piece);
    assert_eq!(shape, vec![1, 3, 80, 96]);
    let n = 96 * 80;
    for (i, px) in mask.pixels().enumerate() {
        let l = [logits[i], logits[n + i], logits[2 * n + i]];
        let best = (0..3).fold(0, |b, k| if l[k] > l[b] { k } else { b });
        assert_eq!(px.0[0] as usize, best, "pixel {i}");
    }

    // Concurrent clients: batched (batch-size metric > 1), each equal to its single-request result.
    let tiles: Vec<image::RgbImage> = (0..12).map(|i| crop(&img, 100 + 40 * i, 200 + 17 * i, SIZE, SIZE)).collect();
    let singles: Vec<Vec<f32>> = tiles.iter().map(|t| oip_binary(s.addr, "embed", t).1).collect();
    let before = histogram(&get(s.metrics, "/metrics").text(), "geossl_batch_size", "model=\"embed/1\"");
    let barrier = Arc::new(Barrier::new(tiles.len()));
    let addr = s.addr;
    let handles: Vec<_> = tiles
        .iter()
        .cloned()
        .map(|t| {
            let b = barrier.clone();
            std::thread::spawn(move || {
                b.wait();
                oip_binary(addr, "embed", &t).1
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let got = h.join().unwrap();
        let scale = singles[i].iter().fold(1.0f32, |a, x| a.max(x.abs()));
        assert!(max_abs_diff(&got, &singles[i]) <= 1e-4 * scale, "request {i}");
    }
    let after = histogram(&get(s.metrics, "/metrics").text(), "geossl_batch_size", "model=\"embed/1\"");
    let (rows, calls) = (after.0 - before.0, after.1 - before.1);
    assert_eq!(rows, 12.0);
    assert!(calls < 12.0, "12 concurrent requests ran in {calls} backend calls: no batching");
    let metrics = get(s.metrics, "/metrics").text();
    for name in [
        "geossl_requests_total",
        "geossl_queue_duration_seconds",
        "geossl_decode_duration_seconds",
        "geossl_inference_duration_seconds",
        "geossl_queue_depth",
    ] {
        assert!(metrics.contains(name), "{name} missing");
    }
    assert!(!metrics.contains("status=\"5"), "5xx recorded:\n{metrics}");
    assert!(s.log().contains("execution_provider"), "the log names each model's execution provider");

    // SIGTERM: drains and exits cleanly.
    assert!(s.terminate(), "server did not exit cleanly on SIGTERM:\n{}", s.log());
}

#[test]
fn tritonclient_infers_with_json_and_binary_tensors() {
    // Plain `run` over borrowed buffers (the CPU default) and the IO-binding path (the CUDA default,
    // forced on here) must both give onnxruntime's outputs.
    for (flags, ep) in [(&[][..], "CPU"), (&["--io-binding", "on"][..], "CPU+iobinding")] {
        let s = Server::start(repo(), flags);
        let md = get(s.addr, "/v2/models/embed").json();
        assert_eq!(md["parameters"]["execution_provider"], ep, "{md}");
        tritonclient_conformance(&s);
    }
}

fn tritonclient_conformance(s: &Server) {
    for m in ["embed", "classify", "segment", "embed_f32"] {
        let o = std::process::Command::new(python())
            .arg(geossl_tests::workspace().join("scripts/reference/oip_client.py"))
            .args(["--url", &s.addr.to_string(), "--model", m, "--onnx"])
            .arg(repo().join(m).join("1/model.onnx"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{m}: {}", geossl_tests::text(&o));
        let r: Value = serde_json::from_slice(&o.stdout).unwrap();
        let errors = r["errors"].as_object().unwrap();
        assert!(errors.len() >= 3, "{m}: {r}");
        for (k, v) in errors {
            assert!(v.as_f64().unwrap() < 1e-4, "{m} {k}: |served - onnxruntime| = {v}");
        }
        assert!(r["unknown_model_error"].as_str().unwrap().contains("unknown model"), "{r}");
    }
}

/// A PNG whose header claims `w`×`h` (no pixel data): a decompression bomb.
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(&ihdr);
    out.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(b"IEND");
    out.extend_from_slice(&crc32(b"IEND").to_be_bytes());
    out
}

#[test]
fn bad_inputs_get_4xx_json_and_the_server_keeps_serving() {
    let s = Server::start(repo(), &["--max-body-mb", "2"]);
    let tile = crop(&scene(), 300, 300, SIZE, SIZE);
    let jpeg = encode(&tile, image::ImageFormat::Jpeg);
    let good = encode(&tile, image::ImageFormat::Png);
    let random: Vec<u8> = (0..20_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    let j = |v: Value| serde_json::to_vec(&v).unwrap();
    let u8_req = |shape: Value, n: usize| {
        j(json!({ "inputs": [{ "name": "images", "shape": shape, "datatype": "UINT8", "data": vec![1; n] }] }))
    };
    let nan_head = j(
        json!({ "inputs": [{ "name": "images", "shape": [1, 3, 64, 64], "datatype": "FP32", "parameters": { "binary_data_size": 3 * 64 * 64 * 4 } }] }),
    );
    let mut nan_body = nan_head.clone();
    for i in 0..3 * 64 * 64 {
        nan_body.extend_from_slice(&(if i == 77 { f32::NAN } else { 0.1 }).to_le_bytes());
    }
    let nan_len = nan_head.len().to_string();
    type Case<'a> = (&'a str, String, Vec<(&'a str, &'a str)>, Vec<u8>, u16);
    let cases: Vec<Case> = vec![
        (
            "truncated JPEG",
            "/v1/models/embed/embed".into(),
            vec![("Content-Type", "image/jpeg")],
            jpeg[..jpeg.len() * 2 / 3].to_vec(),
            400,
        ),
        ("zero-byte body", "/v1/models/embed/embed".into(), vec![("Content-Type", "image/png")], vec![], 400),
        ("random bytes", "/v1/models/embed/embed".into(), vec![("Content-Type", "image/jpeg")], random.clone(), 415),
        (
            "60000×60000 PNG header",
            "/v1/models/embed/embed".into(),
            vec![("Content-Type", "image/png")],
            png_header_only(60_000, 60_000),
            413,
        ),
        (
            "wrong content type",
            "/v1/models/embed/embed".into(),
            vec![("Content-Type", "application/json")],
            good.clone(),
            415,
        ),
        (
            "wrong tensor shape",
            "/v2/models/embed/infer".into(),
            vec![],
            u8_req(json!([1, 3, 32, 32]), 3 * 32 * 32),
            422,
        ),
        (
            "wrong datatype",
            "/v2/models/embed/infer".into(),
            vec![],
            j(
                json!({ "inputs": [{ "name": "images", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": vec![0.5; 3 * 64 * 64] }] }),
            ),
            422,
        ),
        ("unknown model", "/v2/models/nope/infer".into(), vec![], u8_req(json!([1, 3, 64, 64]), 3 * 64 * 64), 404),
        (
            "unknown version",
            "/v2/models/embed/versions/9/infer".into(),
            vec![],
            u8_req(json!([1, 3, 64, 64]), 3 * 64 * 64),
            404,
        ),
        ("unknown model (image)", "/v1/models/nope/embed".into(), vec![], good.clone(), 404),
        (
            "oversize body",
            "/v1/models/embed/embed".into(),
            vec![("Content-Type", "image/png")],
            vec![0u8; 3 << 20],
            413,
        ),
        (
            "NaN input",
            "/v2/models/embed_f32/infer".into(),
            vec![("Inference-Header-Content-Length", nan_len.as_str())],
            nan_body,
            422,
        ),
        ("random bytes as OIP", "/v2/models/embed/infer".into(), vec![], random, 400),
    ];
    for (what, path, headers, body, want) in &cases {
        let r = post(s.addr, path, headers, body);
        assert_eq!(r.status, *want, "{what}: {}", r.text());
        assert!(r.json()["error"].as_str().is_some_and(|e| !e.is_empty()), "{what}");
        // Still serving after each.
        assert_eq!(get(s.addr, "/v2/health/ready").status, 200, "after {what}");
    }
    let r = post(s.addr, "/v1/models/embed/embed", &[("Content-Type", "image/png")], &good);
    assert_eq!(r.status, 200);
    let metrics = get(s.metrics, "/metrics").text();
    assert!(!metrics.contains("status=\"5"), "a 5xx was recorded:\n{metrics}");
}
