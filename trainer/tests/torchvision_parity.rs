//! The tch backbone against torchvision itself (generated in the venv, not typed by hand).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::collections::BTreeMap;

use geossl_models::{Arch, ClassifierHead, HeadSpec, ModelSpec, StateDict};
use geossl_trainer::{checkpoint, Model};
use tch::{nn, Device, Tensor};

fn parity(arch: Arch, size: usize) {
    let dir = tempfile::tempdir().unwrap();
    let out = common::tmp(dir.path());
    common::run_reference(
        "torchvision_resnet.py",
        &["--arch", arch.name(), "--batch", "3", "--size", &size.to_string(), "--out", &out],
    );

    // Our spec + tch model, with torchvision's classifier so the whole state dict is covered.
    let mut spec = ModelSpec::rgb(arch, size);
    spec.heads.push(HeadSpec::Classifier(ClassifierHead { num_classes: 1000, labels: vec![] }));
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Model::new(&vs.root(), &spec);

    // 1. Names, shapes and dtypes: torchvision's state_dict() == the tch var store == the spec.
    let tv: Vec<(String, Vec<usize>, String)> =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("state_dict.json")).unwrap()).unwrap();
    let ours: BTreeMap<String, (Vec<usize>, String)> = vs
        .variables()
        .into_iter()
        .map(|(k, t)| {
            let dtype = if t.kind() == tch::Kind::Int64 { "int64" } else { "float32" };
            (k, (t.size().iter().map(|&d| d as usize).collect(), dtype.to_string()))
        })
        .collect();
    let theirs: BTreeMap<String, (Vec<usize>, String)> =
        tv.iter().map(|(k, s, d)| (k.clone(), (s.clone(), d.clone()))).collect();
    assert_eq!(ours, theirs, "{arch}: tch var store differs from torchvision state_dict()");
    let spec_names: Vec<(String, Vec<usize>)> = spec.parameters().into_iter().map(|p| (p.name, p.shape)).collect();
    let tv_names: Vec<(String, Vec<usize>)> = tv.iter().map(|(k, s, _)| (k.clone(), s.clone())).collect();
    assert_eq!(spec_names, tv_names, "{arch}: spec order differs from torchvision state_dict() order");

    // 2. torchvision weights load and give the same pooled features (eval mode, fp32, CPU).
    let wpath = dir.path().join("torchvision.safetensors");
    let sd = StateDict::read(&wpath).unwrap();
    checkpoint::load_state_dict(&vs, &spec, &sd, &wpath).unwrap();
    let io = StateDict::read(&dir.path().join("io.safetensors")).unwrap();
    let input = io.get("input").unwrap();
    let x = Tensor::from_slice(input.data.as_f32().unwrap())
        .reshape(input.shape.iter().map(|&d| d as i64).collect::<Vec<_>>());
    let feats = tch::no_grad(|| model.backbone.pooled(&x, false));
    assert_eq!(feats.size(), vec![3, arch.feature_dim() as i64]);
    let ours = Vec::<f32>::try_from(feats.reshape([-1])).unwrap();
    let reference = io.get("features").unwrap().data.as_f32().unwrap();
    let err = common::max_rel_err(&ours, reference);
    println!("{arch}: max relative error of pooled features vs torchvision = {err:.3e}");
    assert!(err <= 1e-5, "{arch}: pooled features differ from torchvision: max relative error {err:e}");
}

#[test]
fn resnet18_matches_torchvision() {
    parity(Arch::Resnet18, 64);
}

#[test]
fn resnet50_matches_torchvision() {
    parity(Arch::Resnet50, 64);
}

#[test]
fn libtorch_cuda_is_linked() {
    // True wherever libtorch_cuda is loaded, GPU or not: without the
    // --no-as-needed link flags this would be false and CUDA silently unusable.
    assert!(tch::utils::has_cudart(), "libtorch_cuda is not loaded: check trainer/build.rs link flags");
}
