//! ONNX export (pure Rust, no libtorch) against the tch training forward of the
//! same checkpoint, run in Python onnxruntime after onnx.checker's full check.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::path::Path;

use geossl_exporter::{export_checkpoint, ExportOptions};
use geossl_models::{
    Arch, ClassifierHead, EmbeddingHead, HeadKind, HeadSpec, InputDType, ModelSpec, NamedTensor, ProjectionSpec,
    SegmentationHead, StateDict, TensorData,
};
use geossl_trainer::{save_checkpoint, Model};
use tch::{nn, Device, Kind, Tensor};

/// Batch `[n, 3, 64, 64]` of real pixels (Landsat chips) or uniform random bytes, as float 0..255.
fn images(n: i64, real: bool, dir: &Path) -> Tensor {
    if !real {
        return Tensor::randint(256, [n, 3, 64, 64], (Kind::Float, Device::Cpu));
    }
    let data = geossl_tests::data::fixtures();
    let opt = geossl_trainer::chips::TileOptions { size: 64, stride: 64, max_nodata: 0.0, ..Default::default() };
    let chips = geossl_trainer::chips::tile_scene(&data.join("rasterio/RGB.byte.tif"), dir, &opt).unwrap();
    let t: Vec<Tensor> = chips
        .iter()
        .take(n as usize)
        .map(|c| geossl_trainer::image_io::decode(&c.path, &geossl_trainer::image_io::positional(3)).unwrap().tensor())
        .collect();
    assert_eq!(t.len() as i64, n);
    Tensor::stack(&t, 0)
}

fn run_ort(model: &Path, x: &Tensor, dir: &Path) -> StateDict {
    let inp = dir.join("in.safetensors");
    let data = Vec::<f32>::try_from(x.reshape([-1])).unwrap();
    let shape = x.size().iter().map(|&d| d as usize).collect();
    StateDict {
        tensors: vec![NamedTensor { name: "input".into(), shape, data: TensorData::F32(data) }],
        ..Default::default()
    }
    .write(&inp)
    .unwrap();
    let out = dir.join("out.safetensors");
    let m = model.to_str().unwrap();
    common::run_reference("ort_run.py", &["--model", m, "--input", &common::tmp(&inp), "--out", &common::tmp(&out)]);
    StateDict::read(&out).unwrap()
}

/// ONNX Runtime from Rust (`ort`, the library the server uses), loaded from the venv's onnxruntime.
fn ort_env() -> &'static ort::environment::Environment {
    static ENV: std::sync::OnceLock<ort::environment::Environment> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let lib = std::env::var("ORT_DYLIB_PATH").unwrap_or_else(|_| env!("ORT_DYLIB_PATH").to_string());
        ort::init_from(&lib).unwrap_or_else(|e| panic!("{lib}: {e}")).build().unwrap()
    })
}

/// Runs `model` with Rust `ort` on `x` (as uint8 when `uint8`); returns output `name`'s shape and data.
fn run_ort_rust(model: &Path, x: &Tensor, uint8: bool, name: &str) -> (Vec<usize>, Vec<f32>) {
    let mut session = ort::session::Session::builder(ort_env()).unwrap().commit_from_file(model).unwrap();
    let shape: Vec<i64> = x.size();
    let data = Vec::<f32>::try_from(x.reshape([-1])).unwrap();
    let outputs = if uint8 {
        let v: Vec<u8> = data.iter().map(|&f| f as u8).collect();
        session.run(ort::inputs!["images" => ort::value::Tensor::from_array((shape, v)).unwrap()]).unwrap()
    } else {
        session.run(ort::inputs!["images" => ort::value::Tensor::from_array((shape, data)).unwrap()]).unwrap()
    };
    let (s, d) = outputs[name].try_extract_tensor::<f32>().unwrap();
    (s.iter().map(|&v| v as usize).collect(), d.to_vec())
}

fn check(arch: Arch) {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = ModelSpec::rgb(arch, 64);
    let d = arch.feature_dim();
    spec.heads = vec![
        HeadSpec::Embedding(EmbeddingHead { projection: Some(ProjectionSpec::moco_v2(d)), l2_normalize: true }),
        HeadSpec::Classifier(ClassifierHead { num_classes: 7, labels: vec![] }),
        HeadSpec::Segmentation(SegmentationHead { num_classes: 3, hidden: 32, labels: vec![] }),
    ];
    tch::manual_seed(11);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Model::new(&vs.root(), &spec);
    // Train-mode forwards give the BN running statistics non-trivial values.
    for _ in 0..3 {
        let _ = model.segment(&(Tensor::randn([4, 3, 64, 64], (Kind::Float, Device::Cpu)) * 2.0 + 0.5), true);
    }
    let ck = dir.path().join("ck");
    save_checkpoint(&ck, &spec, &vs, |_| Ok(())).unwrap();
    let n = &spec.normalization;
    let mean = Tensor::from_slice(&n.mean).reshape([1, 3, 1, 1]);
    let std = Tensor::from_slice(&n.std).reshape([1, 3, 1, 1]);

    for (head, input, fp16) in [
        (HeadKind::Embedding, InputDType::Uint8, false),
        (HeadKind::Embedding, InputDType::Float32, false),
        (HeadKind::Classifier, InputDType::Uint8, false),
        (HeadKind::Classifier, InputDType::Float32, false),
        (HeadKind::Embedding, InputDType::Uint8, true),
        (HeadKind::Segmentation, InputDType::Uint8, false),
        (HeadKind::Segmentation, InputDType::Float32, false),
        (HeadKind::Classifier, InputDType::Uint8, true),
    ] {
        let onnx = dir.path().join(format!("{arch}-{}-{input:?}-{fp16}.onnx", head.name()));
        export_checkpoint(&ck, &onnx, &ExportOptions { head, input, fp16, opset: 17 }).unwrap();
        for (batch, real, size) in [(1, true, 64), (3, false, 64), (8, true, 64), (2, false, 96)] {
            if size != 64 && head != HeadKind::Segmentation {
                continue; // fixed input size except for segmentation
            }
            let raw = images(batch, real, &dir.path().join("chips"));
            let raw =
                if size == 64 { raw } else { Tensor::randint(256, [batch, 3, size, 80], (Kind::Float, Device::Cpu)) };
            let normalized = (&raw * n.scale as f64 - &mean) / &std;
            let fed = if input == InputDType::Uint8 { raw } else { normalized.shallow_clone() };
            // Python onnxruntime after onnx.checker (external validators) on the first batch,
            // Rust `ort` on every batch.
            let got = (batch == 1).then(|| run_ort(&onnx, &fed, dir.path()));
            let (name, want) = tch::no_grad(|| match head {
                HeadKind::Embedding => ("embedding", model.embed(&normalized, false)),
                HeadKind::Segmentation => ("mask_logits", model.segment(&normalized, false).unwrap()),
                _ => ("logits", model.classify(&normalized, false).unwrap()),
            });
            let want_shape: Vec<usize> = want.size().iter().map(|&d| d as usize).collect();
            let want = Vec::<f32>::try_from(want.reshape([-1])).unwrap();
            let (rust_shape, rust_out) = run_ort_rust(&onnx, &fed, input == InputDType::Uint8, name);
            assert_eq!(rust_shape, want_shape, "{arch} {}: output shape", head.name());
            let err = common::max_rel_err(&rust_out, &want);
            let tol = if fp16 { 1e-2 } else { 1e-4 };
            if let Some(py) = &got {
                let py_err = common::max_rel_err(py.get(name).unwrap().data.as_f32().unwrap(), &want);
                assert!(py_err <= tol, "{arch} {} python onnxruntime: error {py_err:e}", head.name());
            }
            println!(
                "{arch} {} {input:?} fp16={fp16} batch {batch} {size}px: max relative error {err:.2e}",
                head.name()
            );
            assert!(err <= tol, "{arch} {} {input:?} fp16={fp16} batch {batch}: error {err:e} > {tol}", head.name());
            if head == HeadKind::Classifier {
                let (_, p) = run_ort_rust(&onnx, &fed, input == InputDType::Uint8, "probabilities");
                let s: f32 = p[..7].iter().sum();
                assert!((s - 1.0).abs() < 1e-4, "probabilities sum to {s}");
            }
        }
    }
}

#[test]
fn resnet18_export_matches_tch() {
    check(Arch::Resnet18);
}

#[test]
fn resnet50_export_matches_tch() {
    check(Arch::Resnet50);
}

#[test]
fn bad_checkpoints_leave_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.onnx");
    let opts = ExportOptions::default();
    let e = export_checkpoint(&dir.path().join("none"), &out, &opts).unwrap_err().to_string();
    assert!(e.contains("spec.json") && e.contains("not found"), "{e}");
    // Truncated weights.
    let spec = ModelSpec::rgb(Arch::Resnet18, 64);
    let vs = nn::VarStore::new(Device::Cpu);
    let _m = Model::new(&vs.root(), &spec);
    let ck = dir.path().join("ck");
    save_checkpoint(&ck, &spec, &vs, |_| Ok(())).unwrap();
    let w = std::fs::read(ck.join("model.safetensors")).unwrap();
    std::fs::write(ck.join("model.safetensors"), &w[..w.len() / 3]).unwrap();
    let e = export_checkpoint(&ck, &out, &opts).unwrap_err().to_string();
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
    // Wrong architecture in the spec.
    std::fs::write(ck.join("model.safetensors"), &w).unwrap();
    let mut s = spec.clone();
    s.backbone.arch = Arch::Resnet34;
    std::fs::write(ck.join("spec.json"), geossl_models::checkpoint::spec_to_json(&s)).unwrap();
    let e = export_checkpoint(&ck, &out, &opts).unwrap_err().to_string();
    assert!(e.contains("do not match") && e.contains("missing"), "{e}");
    // An opset the graph cannot be expressed in.
    let e = export_checkpoint(&ck, &out, &ExportOptions { opset: 9, ..opts }).unwrap_err().to_string();
    assert!(e.contains("opset 9"), "{e}");
    // A head the checkpoint lacks.
    std::fs::write(ck.join("spec.json"), geossl_models::checkpoint::spec_to_json(&spec)).unwrap();
    let e = export_checkpoint(&ck, &out, &ExportOptions { head: HeadKind::Classifier, ..opts }).unwrap_err();
    assert!(e.to_string().contains("no classifier head"), "{e}");
    assert!(!out.exists(), "no partial output");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("ck")], "no temporary files left behind");
}

/// The paper's released checkpoint layout, written by PyTorch itself, imports in
/// pure Rust and its exported embedding equals torchvision's pooled features.
#[test]
fn released_gassl_checkpoint_imports_and_exports_torchvision_features() {
    let dir = tempfile::tempdir().unwrap();
    common::run_reference("gassl_checkpoint.py", &["--arch", "resnet50", "--out", &common::tmp(dir.path())]);
    let io = StateDict::read(&dir.path().join("io.safetensors")).unwrap();
    let want = io.get("features").unwrap().data.as_f32().unwrap().to_vec();
    for src in ["checkpoint_0199.pth.tar", "torchvision.pth"] {
        let ck = dir.path().join(format!("{src}.ck"));
        let opts = geossl_exporter::ImportOptions {
            arch: Arch::Resnet50,
            input_size: 64,
            keep_projection: false,
            input: None,
        };
        let spec = geossl_exporter::import_checkpoint(&dir.path().join(src), &ck, opts).unwrap();
        assert_eq!(spec.projection_out(), None, "{src}: backbone features by default");
        let onnx = dir.path().join(format!("{src}.onnx"));
        export_checkpoint(&ck, &onnx, &ExportOptions::default()).unwrap();
        let x = Tensor::from_slice(io.get("input").unwrap().data.as_f32().unwrap()).reshape([3, 3, 64, 64]);
        let got = run_ort(&onnx, &x, dir.path());
        let py_err = common::max_rel_err(got.get("embedding").unwrap().data.as_f32().unwrap(), &want);
        assert!(py_err <= 1e-4, "{src}: python onnxruntime {py_err:e}");
        let (_, rust) = run_ort_rust(&onnx, &x, true, "embedding");
        let err = common::max_rel_err(&rust, &want);
        println!("{src}: exported embedding vs torchvision pooled features: max relative error {err:.2e}");
        assert!(err <= 1e-4, "{src}: {err:e}");
    }
    // The MLP can be kept as the projection head.
    let ck = dir.path().join("proj.ck");
    let opts =
        geossl_exporter::ImportOptions { arch: Arch::Resnet50, input_size: 64, keep_projection: true, input: None };
    let spec = geossl_exporter::import_checkpoint(&dir.path().join("checkpoint_0199.pth.tar"), &ck, opts).unwrap();
    assert_eq!(spec.projection_out(), Some(128));
    // Wrong architecture, corrupt file: clear errors, no output directory.
    let bad = dir.path().join("bad.ck");
    let opts =
        geossl_exporter::ImportOptions { arch: Arch::Resnet18, input_size: 64, keep_projection: false, input: None };
    let e =
        geossl_exporter::import_checkpoint(&dir.path().join("torchvision.pth"), &bad, opts).unwrap_err().to_string();
    assert!(e.contains("torchvision.pth") && e.contains("unknown keys"), "{e}");
    let bytes = std::fs::read(dir.path().join("torchvision.pth")).unwrap();
    std::fs::write(dir.path().join("cut.pth"), &bytes[..bytes.len() / 2]).unwrap();
    let opts =
        geossl_exporter::ImportOptions { arch: Arch::Resnet50, input_size: 64, keep_projection: false, input: None };
    let e = geossl_exporter::import_checkpoint(&dir.path().join("cut.pth"), &bad, opts).unwrap_err().to_string();
    assert!(e.contains("cut.pth"), "{e}");
    assert!(!bad.exists(), "no partial checkpoint");
}

/// A 13-band Sentinel-2 ResNet-50 in the layout TorchGeo distributes SSL4EO-S12 weights in (written
/// by PyTorch), imported through the CLI with its band list and normalization, exported with uint16
/// input: ONNX Runtime on uint16 reflectance × 10000 gives PyTorch's pooled features.
#[test]
fn ssl4eo_style_13_band_checkpoint_imports_with_its_input_contract() {
    use geossl_tests::{run, text};
    let dir = tempfile::tempdir().unwrap();
    common::run_reference("ssl4eo_checkpoint.py", &["--out", &common::tmp(dir.path())]);
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("stats.json")).unwrap()).unwrap();
    let join = |k: &str| {
        stats[k].as_array().unwrap().iter().map(|v| v.as_f64().unwrap().to_string()).collect::<Vec<_>>().join(",")
    };
    let bands = "B01,B02,B03,B04,B05,B06,B07,B08,B8A,B09,B10,B11,B12";
    let src = dir.path().join("ssl4eo_s12_rn50_13band.pth");
    let ck = dir.path().join("ck");
    let (mean, std) = (join("mean"), join("std"));
    let args = |bands: &str| -> Vec<String> {
        [
            "import",
            "--from",
            src.to_str().unwrap(),
            "--arch",
            "resnet50",
            "--input-size",
            "64",
            "--out",
            ck.to_str().unwrap(),
            "--bands",
            bands,
            "--sample-type",
            "uint16",
            "--scale",
            "0.0001",
            "--mean",
            &mean,
            "--std",
            &std,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    // Without the contract, or with a band list of the wrong length: refused, nothing written.
    let o = run(
        "geossl-export",
        &["import", "--from", src.to_str().unwrap(), "--arch", "resnet50", "--out", ck.to_str().unwrap()],
    );
    assert!(!o.status.success() && text(&o).contains("13 bands"), "{}", text(&o));
    let short = args("B02,B03,B04");
    let o = run("geossl-export", &short.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!o.status.success() && text(&o).contains("conv1 takes 13 bands"), "{}", text(&o));
    assert!(!ck.exists());
    let a = args(bands);
    let o = run("geossl-export", &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", text(&o));
    let spec: geossl_models::ModelSpec =
        serde_json::from_str(&std::fs::read_to_string(ck.join("spec.json")).unwrap()).unwrap();
    assert_eq!(spec.backbone.in_channels, 13);
    assert_eq!(spec.bands.join(","), bands);
    assert_eq!(spec.sample_type, Some(geossl_models::SampleType::U16));
    let onnx = dir.path().join("s2.onnx");
    let o = run(
        "geossl-export",
        &["onnx", "--checkpoint", ck.to_str().unwrap(), "--input", "uint16", "--out", onnx.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));
    let io = StateDict::read(&dir.path().join("io.safetensors")).unwrap();
    let x = Tensor::from_slice(io.get("input").unwrap().data.as_f32().unwrap()).reshape([2, 13, 64, 64]);
    let got = run_ort(&onnx, &x, dir.path());
    let want = io.get("features").unwrap().data.as_f32().unwrap();
    let err = common::max_rel_err(got.get("embedding").unwrap().data.as_f32().unwrap(), want);
    assert!(err <= 1e-4, "uint16 ONNX vs PyTorch on the same samples: {err:e}");
}
