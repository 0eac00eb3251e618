//! Checkpoint directories: exact round trip, clear errors, nothing lost on failure.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::path::Path;

use geossl_models::{
    Arch, ClassifierHead, EmbeddingHead, GeoHead, HeadSpec, ModelSpec, ProjectionSpec, SegmentationHead,
};
use geossl_trainer::{checkpoint, load_checkpoint, save_checkpoint, Model};
use tch::{nn, Device, Kind, Tensor};

fn full_spec(arch: Arch) -> ModelSpec {
    let mut s = ModelSpec::rgb(arch, 64);
    let d = arch.feature_dim();
    s.heads = vec![
        HeadSpec::Embedding(EmbeddingHead { projection: Some(ProjectionSpec::moco_v2(d)), l2_normalize: true }),
        HeadSpec::Classifier(ClassifierHead { num_classes: 5, labels: (0..5).map(|i| format!("c{i}")).collect() }),
        HeadSpec::Segmentation(SegmentationHead { num_classes: 3, hidden: 32, labels: vec![] }),
        HeadSpec::Geo(GeoHead { num_clusters: 4, centroids: vec![[1.0, 0.0, 0.0]; 4] }),
    ];
    s
}

fn trained_model(spec: &ModelSpec) -> (nn::VarStore, Model) {
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let m = Model::new(&vs.root(), spec);
    // A training-mode forward moves BN running stats and num_batches_tracked off their init.
    let x = Tensor::randn([2, 3, 64, 64], (Kind::Float, Device::Cpu));
    let _ = m.segment(&x, true);
    let _ = m.embed(&x, true);
    (vs, m)
}

#[test]
fn save_load_round_trip_is_exact() {
    let spec = full_spec(Arch::Resnet18);
    let (vs, m) = trained_model(&spec);
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    save_checkpoint(&ck, &spec, &vs, |_| Ok(())).unwrap();
    let loaded = load_checkpoint(&ck, Device::Cpu).unwrap();
    assert_eq!(loaded.spec, spec);
    let a = vs.variables();
    let b = loaded.vs.variables();
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let u = &b[name];
        assert_eq!(t.kind(), u.kind(), "{name}");
        assert!(t.equal(u), "{name} differs after save → load");
    }
    let nbt = &b["layer1.0.bn1.num_batches_tracked"];
    assert_eq!(nbt.int64_value(&[]), 2, "num_batches_tracked counts training forwards");
    let x = Tensor::randn([2, 3, 64, 64], (Kind::Float, Device::Cpu));
    tch::no_grad(|| {
        assert!(m.embed(&x, false).equal(&loaded.model.embed(&x, false)));
        assert!(m.segment(&x, false).unwrap().equal(&loaded.model.segment(&x, false).unwrap()));
    });
}

fn expect_err(dir: &Path, needles: &[&str]) {
    let e = load_checkpoint(dir, Device::Cpu).unwrap_err().to_string();
    for n in needles {
        assert!(e.contains(n), "error `{e}` should mention `{n}`");
    }
}

#[test]
fn broken_checkpoints_name_the_file() {
    let spec = full_spec(Arch::Resnet18);
    let (vs, _) = trained_model(&spec);
    let root = tempfile::tempdir().unwrap();
    let ck = root.path().join("ck");
    save_checkpoint(&ck, &spec, &vs, |_| Ok(())).unwrap();
    let weights = std::fs::read(ck.join("model.safetensors")).unwrap();
    let spec_json = std::fs::read(ck.join("spec.json")).unwrap();

    expect_err(&root.path().join("absent"), &["absent", "not found"]);

    std::fs::remove_file(ck.join("spec.json")).unwrap();
    expect_err(&ck, &["spec.json", "not found"]);
    std::fs::write(ck.join("spec.json"), &spec_json[..spec_json.len() / 2]).unwrap();
    expect_err(&ck, &["spec.json", "not a valid"]);
    std::fs::write(ck.join("spec.json"), &spec_json).unwrap();

    std::fs::remove_file(ck.join("model.safetensors")).unwrap();
    expect_err(&ck, &["model.safetensors", "not found"]);
    std::fs::write(ck.join("model.safetensors"), &weights[..weights.len() - 1000]).unwrap();
    expect_err(&ck, &["model.safetensors", "corrupt or truncated"]);
    std::fs::write(ck.join("model.safetensors"), b"").unwrap();
    expect_err(&ck, &["model.safetensors", "corrupt or truncated"]);

    // Weights of another architecture: every mismatch is listed.
    let other = full_spec(Arch::Resnet34);
    let (vs34, _) = trained_model(&other);
    let sd34 = checkpoint::state_dict(&vs34, &other).unwrap();
    sd34.write(&ck.join("model.safetensors")).unwrap();
    expect_err(&ck, &["model.safetensors", "do not match", "96 unexpected tensors: layer1.2."]);
}

#[test]
fn failed_save_keeps_the_previous_checkpoint() {
    let spec = full_spec(Arch::Resnet18);
    let (vs, _) = trained_model(&spec);
    let root = tempfile::tempdir().unwrap();
    let ck = root.path().join("ck");
    save_checkpoint(&ck, &spec, &vs, |_| Ok(())).unwrap();
    let before = std::fs::read(ck.join("model.safetensors")).unwrap();
    // An invalid spec and a failing extra-file writer both abort the save.
    let mut bad = spec.clone();
    bad.bands.clear();
    assert!(save_checkpoint(&ck, &bad, &vs, |_| Ok(())).unwrap_err().to_string().contains("bands"));
    let err = save_checkpoint(&ck, &spec, &vs, |p| {
        Err(checkpoint::CheckpointError::Io { path: p.join("state.json"), error: std::io::Error::other("disk full") })
    })
    .unwrap_err();
    assert!(err.to_string().contains("disk full"));
    assert_eq!(std::fs::read(ck.join("model.safetensors")).unwrap(), before);
    load_checkpoint(&ck, Device::Cpu).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("ck")], "staging directories are cleaned up");
}
