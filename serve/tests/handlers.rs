#![allow(clippy::unwrap_used)]
//! Handler tests: the real routes, batcher and error table over fake
//! backends (plain Rust arithmetic), in-process.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{test, web};
use geossl_serve::http::metrics::Metrics;
use geossl_serve::http::server::app;
use geossl_serve::http::{AppState, Limits};
use geossl_serve::infer::{Backend, BackendError, BatchConfig, DType, ModelInfo, Task, Tensor, TensorSpec, Worker};
use serde_json::{json, Value};

/// Embedding = per-channel mean of each row (D = C); classifier logits =
/// [mean, 128 - mean, 0]; segmentation = [x, 128] per pixel of channel 0.
#[derive(Debug)]
struct Fake {
    task: Task,
    delay: Duration,
    calls: Arc<Mutex<Vec<usize>>>,
}

fn as_f32(t: &Tensor) -> Vec<f32> {
    match &t.data {
        geossl_serve::infer::Data::U8(v) => v.iter().map(|&x| f32::from(x)).collect(),
        geossl_serve::infer::Data::U16(v) => v.iter().map(|&x| f32::from(x)).collect(),
        geossl_serve::infer::Data::F32(v) => v.clone(),
    }
}

impl Backend for Fake {
    fn infer(&mut self, input: &Tensor) -> Result<Vec<Tensor>, BackendError> {
        std::thread::sleep(self.delay);
        let [n, c, h, w] = input.shape[..] else { return Err(BackendError("rank".into())) };
        self.calls.lock().unwrap().push(n);
        let x = as_f32(input);
        let hw = h * w;
        let means: Vec<f32> = (0..n * c).map(|i| x[i * hw..(i + 1) * hw].iter().sum::<f32>() / hw as f32).collect();
        Ok(match self.task {
            Task::Embedding => vec![Tensor::f32(vec![n, c], means)],
            Task::Classification => {
                let logits: Vec<f32> = (0..n).flat_map(|i| [means[i * c], 128.0 - means[i * c], 0.0]).collect();
                vec![Tensor::f32(vec![n, 3], logits)]
            }
            _ => {
                let mut m = Vec::with_capacity(n * 2 * hw);
                for i in 0..n {
                    m.extend_from_slice(&x[i * c * hw..i * c * hw + hw]);
                    m.extend(std::iter::repeat_n(128.0, hw));
                }
                vec![Tensor::f32(vec![n, 2, h, w], m)]
            }
        })
    }
}

struct Model {
    name: &'static str,
    task: Task,
    dtype: DType,
    batch: BatchConfig,
    delay: Duration,
}

fn info(m: &Model) -> ModelInfo {
    let (input_shape, outputs) = match m.task {
        Task::Embedding => (vec![-1, 3, 8, 8], vec![("embedding", vec![-1, 3])]),
        Task::Classification => (vec![-1, 3, 8, 8], vec![("logits", vec![-1, 3])]),
        _ => (vec![-1, 3, -1, -1], vec![("mask_logits", vec![-1, 2, -1, -1])]),
    };
    let outputs: Vec<TensorSpec> =
        outputs.into_iter().map(|(n, s)| TensorSpec { name: n.into(), datatype: DType::F32, shape: s }).collect();
    ModelInfo {
        name: m.name.into(),
        version: 1,
        input: TensorSpec { name: "images".into(), datatype: m.dtype, shape: input_shape },
        roles: ModelInfo::roles_from_names(&outputs),
        outputs,
        task: m.task,
        labels: vec!["bright".into(), "dark".into(), "never".into()],
        normalization: Some((vec![1.0; 3], vec![0.0; 3])),
        sample_type: None,
        bands: Vec::new(),
        metadata: BTreeMap::new(),
        execution_provider: "fake".into(),
    }
}

fn model(name: &'static str, task: Task) -> Model {
    Model { name, task, dtype: DType::U8, batch: BatchConfig::default(), delay: Duration::ZERO }
}

struct Harness {
    state: web::Data<AppState>,
    calls: BTreeMap<&'static str, Arc<Mutex<Vec<usize>>>>,
}

fn harness(models: Vec<Model>, limits: Limits, key: Option<&str>) -> Harness {
    let metrics = Arc::new(Metrics::new());
    let mut calls = BTreeMap::new();
    let workers = models
        .iter()
        .map(|m| {
            let c = Arc::new(Mutex::new(Vec::new()));
            calls.insert(m.name, c.clone());
            let b: Box<dyn Backend> = Box::new(Fake { task: m.task, delay: m.delay, calls: c });
            Worker::start(info(m), m.batch, vec![b], metrics.infer.clone()).unwrap()
        })
        .collect();
    Harness { state: web::Data::new(AppState::new(workers, metrics, limits, key.map(String::from))), calls }
}

fn standard() -> Harness {
    let mut f = model("floaty", Task::Embedding);
    f.dtype = DType::F32;
    harness(
        vec![model("emb", Task::Embedding), model("cls", Task::Classification), model("seg", Task::Segmentation), f],
        Limits { max_body_bytes: 1 << 20, max_pixels: 1 << 20, ..Limits::default() },
        None,
    )
}

async fn body_json(resp: actix_web::dev::ServiceResponse) -> (StatusCode, Value) {
    let status = resp.status();
    let bytes = test::read_body(resp).await;
    (status, serde_json::from_slice(&bytes).unwrap_or_else(|_| json!({ "raw": String::from_utf8_lossy(&bytes) })))
}

fn ramp(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

fn png(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

fn multipart(parts: &[Vec<u8>]) -> (String, Vec<u8>) {
    let b = "geosslboundary42";
    let mut body = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        body.extend_from_slice(
            format!("--{b}\r\nContent-Disposition: form-data; name=\"image{i}\"; filename=\"{i}.png\"\r\nContent-Type: image/png\r\n\r\n")
                .as_bytes(),
        );
        body.extend_from_slice(p);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{b}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={b}"), body)
}

#[actix_web::test]
async fn health_metadata_and_openapi() {
    let h = standard();
    let app = test::init_service(app(h.state.clone())).await;
    for (path, want) in [("/v2/health/live", 200), ("/v2/health/ready", 200), ("/v2", 200), ("/openapi.json", 200)] {
        let r = test::call_service(&app, test::TestRequest::get().uri(path).to_request()).await;
        assert_eq!(r.status().as_u16(), want, "{path}");
    }
    let (s, m) =
        body_json(test::call_service(&app, test::TestRequest::get().uri("/v2/models/emb").to_request()).await).await;
    assert_eq!(s, 200);
    assert_eq!(m["inputs"][0], json!({ "name": "images", "datatype": "UINT8", "shape": [-1, 3, 8, 8] }));
    assert_eq!(m["versions"], json!(["1"]));
    let (s, m) = body_json(
        test::call_service(&app, test::TestRequest::get().uri("/v2/models/emb/versions/1/ready").to_request()).await,
    )
    .await;
    assert_eq!((s.as_u16(), &m["ready"]), (200, &json!(true)));
    for path in [
        "/v2/models/nope",
        "/v2/models/emb/versions/2",
        "/v2/models/emb/versions/x/ready",
        "/v2/models/..%2f/ready",
        "/v3",
    ] {
        let (s, m) = body_json(test::call_service(&app, test::TestRequest::get().uri(path).to_request()).await).await;
        assert_eq!(s, 404, "{path}");
        assert!(m["error"].is_string(), "{path}: {m}");
    }
    // The OpenAPI document lists every route the app serves.
    let doc: Value = serde_json::from_str(geossl_serve::http::server::OPENAPI).unwrap();
    for p in [
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{m}",
        "/v2/models/{m}/versions/{v}",
        "/v2/models/{m}/ready",
        "/v2/models/{m}/versions/{v}/ready",
        "/v2/models/{m}/infer",
        "/v2/models/{m}/versions/{v}/infer",
        "/v1/models",
        "/v1/models/{m}/embed",
        "/v1/models/{m}/classify",
        "/v1/models/{m}/segment",
        "/v1/indexes",
        "/v1/indexes/{index}/search",
        "/v1/indexes/{index}/classify",
    ] {
        assert!(doc["paths"].get(p).is_some(), "{p} missing from openapi.json");
    }
    // Draining: readiness goes 503, liveness stays.
    h.state.set_ready(false);
    let r = test::call_service(&app, test::TestRequest::get().uri("/v2/health/ready").to_request()).await;
    assert_eq!(r.status(), 503);
    let r = test::call_service(&app, test::TestRequest::get().uri("/v2/health/live").to_request()).await;
    assert_eq!(r.status(), 200);
}

#[actix_web::test]
async fn oip_json_and_binary_tensors() {
    let h = standard();
    let app = test::init_service(app(h.state.clone())).await;
    let px = ramp(2 * 3 * 64);
    let expect = |i: usize, c: usize| {
        px[(i * 3 + c) * 64..(i * 3 + c + 1) * 64].iter().map(|&v| f32::from(v)).sum::<f32>() / 64.0
    };

    // JSON in, JSON out, id echoed.
    let req =
        json!({ "id": "r1", "inputs": [{ "name": "images", "shape": [2, 3, 8, 8], "datatype": "UINT8", "data": px }] });
    let (s, r) = body_json(
        test::call_service(&app, test::TestRequest::post().uri("/v2/models/emb/infer").set_json(&req).to_request())
            .await,
    )
    .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["id"], "r1");
    assert_eq!(r["model_version"], "1");
    assert_eq!(r["outputs"][0]["shape"], json!([2, 3]));
    let got: Vec<f32> = serde_json::from_value(r["outputs"][0]["data"].clone()).unwrap();
    let want: Vec<f32> = (0..2).flat_map(|i| (0..3).map(move |c| (i, c))).map(|(i, c)| expect(i, c)).collect();
    assert_eq!(got, want);

    // Nested JSON data is accepted too.
    let nested: Vec<Vec<u8>> = px.chunks(64).map(<[u8]>::to_vec).collect();
    let req = json!({ "inputs": [{ "name": "images", "shape": [2, 3, 8, 8], "datatype": "UINT8", "data": nested }] });
    let (s, r) = body_json(
        test::call_service(
            &app,
            test::TestRequest::post().uri("/v2/models/emb/versions/1/infer").set_json(&req).to_request(),
        )
        .await,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(serde_json::from_value::<Vec<f32>>(r["outputs"][0]["data"].clone()).unwrap(), want);

    // Binary in, binary out (Triton extension).
    let head = serde_json::to_vec(&json!({
        "inputs": [{ "name": "images", "shape": [2, 3, 8, 8], "datatype": "UINT8", "parameters": { "binary_data_size": px.len() } }],
        "outputs": [{ "name": "embedding", "parameters": { "binary_data": true } }],
    }))
    .unwrap();
    let mut body = head.clone();
    body.extend_from_slice(&px);
    let resp = test::call_service(
        &app,
        test::TestRequest::post()
            .uri("/v2/models/emb/infer")
            .insert_header(("Inference-Header-Content-Length", head.len().to_string()))
            .insert_header(("content-type", "application/octet-stream"))
            .set_payload(body)
            .to_request(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let n: usize = resp.headers().get("inference-header-content-length").unwrap().to_str().unwrap().parse().unwrap();
    let bytes = test::read_body(resp).await;
    let head: Value = serde_json::from_slice(&bytes[..n]).unwrap();
    assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 24);
    let got: Vec<f32> = bytes[n..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(got, want);
}

async fn post(
    app: &impl actix_web::dev::Service<
        actix_http::Request,
        Response = actix_web::dev::ServiceResponse,
        Error = actix_web::Error,
    >,
    uri: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let mut r = test::TestRequest::post().uri(uri).set_payload(body);
    for (k, v) in headers {
        r = r.insert_header((*k, *v));
    }
    body_json(test::call_service(app, r.to_request()).await).await
}

#[actix_web::test]
async fn bad_inputs_get_the_documented_4xx() {
    let h = standard();
    let app = test::init_service(app(h.state.clone())).await;
    let j = |v: Value| serde_json::to_vec(&v).unwrap();
    let u8in = |shape: Value, data: Value| {
        j(json!({ "inputs": [{ "name": "images", "shape": shape, "datatype": "UINT8", "data": data }] }))
    };
    let nan_head = j(
        json!({ "inputs": [{ "name": "images", "shape": [1, 3, 8, 8], "datatype": "FP32", "parameters": { "binary_data_size": 768 } }] }),
    );
    let mut nan_body = nan_head.clone();
    for i in 0..192 {
        nan_body.extend_from_slice(&(if i == 5 { f32::NAN } else { 0.5 }).to_le_bytes());
    }
    let nan_len = nan_head.len().to_string();
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, Vec<u8>, u16);
    let cases: Vec<Case> = vec![
        ("empty body", "/v2/models/emb/infer", vec![], vec![], 400),
        ("not json", "/v2/models/emb/infer", vec![], b"{nope".to_vec(), 400),
        ("unknown model", "/v2/models/ghost/infer", vec![], u8in(json!([1, 3, 8, 8]), json!(vec![0; 192])), 404),
        (
            "unknown version",
            "/v2/models/emb/versions/7/infer",
            vec![],
            u8in(json!([1, 3, 8, 8]), json!(vec![0; 192])),
            404,
        ),
        (
            "wrong input name",
            "/v2/models/emb/infer",
            vec![],
            j(json!({ "inputs": [{ "name": "x", "shape": [1], "datatype": "UINT8", "data": [1] }] })),
            400,
        ),
        ("wrong shape", "/v2/models/emb/infer", vec![], u8in(json!([1, 3, 4, 4]), json!(vec![0; 48])), 422),
        ("wrong rank", "/v2/models/emb/infer", vec![], u8in(json!([192]), json!(vec![0; 192])), 422),
        ("count mismatch", "/v2/models/emb/infer", vec![], u8in(json!([1, 3, 8, 8]), json!(vec![0; 191])), 422),
        ("value out of range", "/v2/models/emb/infer", vec![], u8in(json!([1, 3, 8, 8]), json!(vec![300; 192])), 422),
        (
            "wrong datatype",
            "/v2/models/emb/infer",
            vec![],
            j(
                json!({ "inputs": [{ "name": "images", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": vec![0.0; 192] }] }),
            ),
            422,
        ),
        (
            "unknown datatype",
            "/v2/models/emb/infer",
            vec![],
            j(
                json!({ "inputs": [{ "name": "images", "shape": [1, 3, 8, 8], "datatype": "BF16", "data": vec![0; 192] }] }),
            ),
            422,
        ),
        ("batch over max", "/v2/models/emb/infer", vec![], u8in(json!([33, 3, 8, 8]), json!(vec![0; 33 * 192])), 422),
        (
            "absurd shape",
            "/v2/models/seg/infer",
            vec![],
            u8in(json!([1, 3, 4000000000u64, 4000000000u64]), json!([0])),
            413,
        ),
        (
            "NaN input",
            "/v2/models/floaty/infer",
            vec![("Inference-Header-Content-Length", nan_len.as_str())],
            nan_body,
            422,
        ),
        (
            "header length past body",
            "/v2/models/emb/infer",
            vec![("Inference-Header-Content-Length", "99999")],
            b"{}".to_vec(),
            400,
        ),
        ("oversize body", "/v2/models/emb/infer", vec![], vec![b' '; 2 << 20], 413),
        (
            "unknown output",
            "/v2/models/emb/infer",
            vec![],
            j(
                json!({ "inputs": [{ "name": "images", "shape": [1, 3, 8, 8], "datatype": "UINT8", "data": vec![0; 192] }], "outputs": [{ "name": "nope" }] }),
            ),
            400,
        ),
        ("zero-byte image", "/v1/models/emb/embed", vec![("content-type", "image/png")], vec![], 400),
        (
            "random bytes",
            "/v1/models/emb/embed",
            vec![("content-type", "image/jpeg")],
            (0..5000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect(),
            415,
        ),
        (
            "wrong content type",
            "/v1/models/emb/embed",
            vec![("content-type", "text/plain")],
            png(8, 8, |_, _| [1, 2, 3]),
            415,
        ),
        ("wrong task", "/v1/models/emb/classify", vec![], png(8, 8, |_, _| [1, 2, 3]), 422),
        ("bad query", "/v1/models/emb/embed?colour=red", vec![], png(8, 8, |_, _| [1, 2, 3]), 400),
        ("image too many pixels", "/v1/models/emb/embed", vec![], png(1100, 1000, |_, _| [0, 0, 0]), 413),
    ];
    for (what, uri, headers, body, want) in cases {
        let (s, v) = post(&app, uri, &headers, body).await;
        assert_eq!(s.as_u16(), want, "{what}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{what}: {v}");
    }
    // Still serving.
    let (s, _) = post(&app, "/v1/models/emb/embed", &[], png(8, 8, |_, _| [1, 2, 3])).await;
    assert_eq!(s, 200);
}

#[actix_web::test]
async fn image_endpoints_decode_fit_and_answer() {
    let h = standard();
    let app = test::init_service(app(h.state.clone())).await;
    // 16×8 image, left half red-ish: resize short side to 8 → 16×8, centre crop 8×8.
    let img = png(16, 8, |x, _| if x < 8 { [200, 0, 0] } else { [0, 0, 100] });
    let (s, r) = post(&app, "/v1/models/emb/embed", &[("content-type", "image/png")], img.clone()).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["dim"], 3);
    let e: Vec<f32> = serde_json::from_value(r["embeddings"][0].clone()).unwrap();
    // Centre crop keeps x in 4..12: half red (200), half blue (100), bilinear-free since no resize needed.
    assert_eq!(e, vec![100.0, 0.0, 50.0]);

    // Multipart batch of three; each equals its single-image answer.
    let imgs = vec![img.clone(), png(8, 8, |_, _| [10, 20, 30]), png(8, 8, |x, y| [x as u8, y as u8, 0])];
    let (ct, body) = multipart(&imgs);
    let (s, r) = post(&app, "/v1/models/emb/embed", &[("content-type", ct.as_str())], body).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["embeddings"].as_array().unwrap().len(), 3);
    for (i, one) in imgs.iter().enumerate() {
        let (_, single) = post(&app, "/v1/models/emb/embed", &[], one.clone()).await;
        assert_eq!(r["embeddings"][i], single["embeddings"][0], "image {i}");
    }

    // Classify: mean red 100 → logits [100, 28, 0]; top-2 with labels.
    let (s, r) = post(&app, "/v1/models/cls/classify?top_k=2", &[], img).await;
    assert_eq!(s, 200, "{r}");
    let p = &r["predictions"][0];
    assert_eq!(p.as_array().unwrap().len(), 2);
    assert_eq!((p[0]["label"].as_str(), p[0]["index"].as_u64()), (Some("bright"), Some(0)));
    assert!(p[0]["score"].as_f64().unwrap() > 0.99);

    // Segment: native size, class 0 where red > 128.
    let seg = png(5, 3, |x, _| if x >= 2 { [250, 0, 0] } else { [3, 0, 0] });
    let resp = test::call_service(
        &app,
        test::TestRequest::post().uri("/v1/models/seg/segment").set_payload(seg.clone()).to_request(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers().get("content-type").unwrap(), "image/png");
    let mask = image::load_from_memory(&test::read_body(resp).await).unwrap().to_luma8();
    assert_eq!(mask.dimensions(), (5, 3));
    assert_eq!(mask.get_pixel(0, 0).0[0], 1);
    assert_eq!(mask.get_pixel(4, 2).0[0], 0);
    let (s, r) = post(&app, "/v1/models/seg/segment?format=rle", &[], seg).await;
    assert_eq!(s, 200);
    assert_eq!(r["masks"][0]["rle"], json!([[1, 2], [0, 3], [1, 2], [0, 3], [1, 2], [0, 3]]));
}

#[actix_web::test]
async fn api_key_guards_model_routes_only() {
    let h = harness(vec![model("emb", Task::Embedding)], Limits::default(), Some("s3cret"));
    let app = test::init_service(app(h.state.clone())).await;
    let img = png(8, 8, |_, _| [1, 2, 3]);
    assert_eq!(post(&app, "/v1/models/emb/embed", &[], img.clone()).await.0, 401);
    assert_eq!(post(&app, "/v1/models/emb/embed", &[("authorization", "Bearer nope")], img.clone()).await.0, 401);
    assert_eq!(post(&app, "/v1/models/emb/embed", &[("authorization", "Bearer s3cret")], img).await.0, 200);
    let r = test::call_service(&app, test::TestRequest::get().uri("/v2/models/emb").to_request()).await;
    assert_eq!(r.status(), 401);
    let r = test::call_service(&app, test::TestRequest::get().uri("/v2/health/ready").to_request()).await;
    assert_eq!(r.status(), 200);
}

#[actix_web::test]
async fn concurrent_requests_are_batched_and_equal_single_results() {
    let mut m = model("emb", Task::Embedding);
    m.batch = BatchConfig {
        max_batch_size: 16,
        max_queue_delay: Duration::from_millis(200),
        queue_capacity: 64,
        instances: 1,
    };
    m.delay = Duration::from_millis(20);
    let h = harness(vec![m], Limits::default(), None);
    let app = test::init_service(app(h.state.clone())).await;
    let bodies: Vec<Vec<u8>> = (0..8).map(|i| png(8, 8, move |x, y| [(x * y + i) as u8, i as u8, 9])).collect();
    let mut singles = Vec::new();
    for b in &bodies {
        singles.push(post(&app, "/v1/models/emb/embed", &[], b.clone()).await.1["embeddings"][0].clone());
    }
    h.calls["emb"].lock().unwrap().clear();
    let together =
        futures_util::future::join_all(bodies.iter().map(|b| post(&app, "/v1/models/emb/embed", &[], b.clone()))).await;
    for (i, (s, r)) in together.iter().enumerate() {
        assert_eq!(*s, 200);
        assert_eq!(r["embeddings"][0], singles[i], "request {i}");
    }
    let calls = h.calls["emb"].lock().unwrap().clone();
    assert_eq!(calls.iter().sum::<usize>(), 8);
    assert!(calls.iter().any(|&n| n > 1), "no batching happened: {calls:?}");
    let text = h.state.metrics.render();
    assert!(text.contains("geossl_batch_size_bucket"), "{text}");
}

#[actix_web::test]
async fn full_queue_and_expired_deadline_answer_429() {
    let mut m = model("slow", Task::Embedding);
    m.batch = BatchConfig { max_batch_size: 1, max_queue_delay: Duration::ZERO, queue_capacity: 1, instances: 1 };
    m.delay = Duration::from_millis(300);
    let h = harness(vec![m], Limits { request_timeout: Duration::from_millis(150), ..Limits::default() }, None);
    let app = test::init_service(app(h.state.clone())).await;
    let img = png(8, 8, |_, _| [1, 2, 3]);
    let results = futures_util::future::join_all((0..6).map(|_| async {
        let r = test::call_service(
            &app,
            test::TestRequest::post().uri("/v1/models/slow/embed").set_payload(img.clone()).to_request(),
        )
        .await;
        let retry = r.headers().get("retry-after").is_some();
        (r.status().as_u16(), retry)
    }))
    .await;
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let busy: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert!(ok >= 1, "{results:?}");
    assert!(!busy.is_empty() && busy.iter().all(|r| r.1), "{results:?}");
    assert_eq!(ok + busy.len(), 6, "{results:?}");
    let text = h.state.metrics.render();
    assert!(text.contains("geossl_rejected_total"), "{text}");
}

fn long_window(name: &'static str, max_batch_size: usize) -> Harness {
    let mut m = model(name, Task::Embedding);
    m.batch =
        BatchConfig { max_batch_size, max_queue_delay: Duration::from_secs(20), queue_capacity: 64, instances: 1 };
    harness(vec![m], Limits::default(), None)
}

#[actix_web::test]
async fn lone_request_does_not_wait_out_the_batching_window() {
    let h = long_window("emb", 16);
    let app = test::init_service(app(h.state.clone())).await;
    let started = std::time::Instant::now();
    let (status, _) = post(&app, "/v1/models/emb/embed", &[], png(8, 8, |_, _| [1, 2, 3])).await;
    assert_eq!(status, 200);
    // Nothing else was announced, so the worker ran it without waiting out its 20 s window.
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert_eq!(*h.calls["emb"].lock().unwrap(), vec![1]);
}

#[actix_web::test]
async fn worker_waits_for_announced_requests_and_under_load() {
    // Batches of two: a full batch runs without waiting out the 20 s window.
    let h = long_window("emb", 2);
    let worker = h.state.models["emb"][&1].clone();
    let x = || Tensor::u8(vec![1, 3, 8, 8], vec![7; 192]);
    let timeout = Duration::from_secs(60);
    let calls = || h.calls["emb"].lock().unwrap().clone();
    // An announced request that gives up (dropped, e.g. a bad body) stops the wait.
    let (c, d) = (worker.announce(), worker.announce());
    let started = std::time::Instant::now();
    let w = worker.clone();
    let lone = tokio::spawn(async move { w.infer(x(), timeout, Some(&c)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(calls().is_empty(), "ran before the announced request gave up");
    drop(d);
    lone.await.unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert_eq!(calls(), vec![1]);
    // Two requests announced; the first is queued, the second arrives 300 ms later:
    // the worker holds the first for it and runs both in one call.
    let (a, b) = (worker.announce(), worker.announce());
    let w = worker.clone();
    let first = tokio::spawn(async move { w.infer(x(), timeout, Some(&a)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(calls(), vec![1], "ran before the announced request arrived");
    worker.infer(x(), timeout, Some(&b)).await.unwrap();
    first.await.unwrap().unwrap();
    assert_eq!(calls(), vec![1, 2]);
    // After a merged batch the worker expects company: a lone request now waits for
    // the window (or a batch-mate), here a second request sent 500 ms later.
    let w = worker.clone();
    let third = tokio::spawn(async move { w.infer(x(), timeout, None).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(calls(), vec![1, 2], "did not wait under load");
    worker.infer(x(), timeout, None).await.unwrap();
    third.await.unwrap().unwrap();
    assert_eq!(calls(), vec![1, 2, 2]);
}
