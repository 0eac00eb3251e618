//! Helpers shared by the trainer's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Repository root (set by `.cargo/config.toml`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("GEOSSL_ROOT"))
}

/// The project venv's Python (`GEOSSL_PYTHON` overrides). Tests that use
/// PyPI packages as external references fail loudly when it is missing:
/// `scripts/setup.sh` creates it.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("GEOSSL_PYTHON") {
        return p.into();
    }
    let p = repo_root().join(".venv/bin/python");
    assert!(p.exists(), "{} not found: run scripts/setup.sh first", p.display());
    p
}

/// Runs a reference script under `scripts/reference/` with `args`.
pub fn run_reference(script: &str, args: &[&str]) {
    let path = repo_root().join("scripts/reference").join(script);
    let out = Command::new(python()).arg(&path).args(args).output().expect("run python");
    assert!(out.status.success(), "{} failed:\n{}", path.display(), String::from_utf8_lossy(&out.stderr));
}

/// `max|a - b| / max|b|`: the error relative to the reference's scale (an
/// element-wise ratio explodes where the reference is near zero).
pub fn max_rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs() as f64)).max(1e-30);
    let diff = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()));
    diff / scale
}

pub fn tmp(path: &Path) -> String {
    path.to_str().expect("utf-8 temp path").to_owned()
}

/// Saves a random-init model of `spec` (plus a plain embedding head) as `dir/ck`
/// and returns that path.
pub fn random_checkpoint(dir: &Path, mut spec: geossl_models::ModelSpec) -> PathBuf {
    use geossl_models::{EmbeddingHead, HeadSpec};
    spec.heads.push(HeadSpec::Embedding(EmbeddingHead { projection: None, l2_normalize: false }));
    tch::manual_seed(0);
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _m = geossl_trainer::Model::new(&vs.root(), &spec);
    let ck = dir.join("ck");
    if let Err(e) = geossl_trainer::save_checkpoint(&ck, &spec, &vs, |_| Ok(())) {
        panic!("saving {}: {e}", ck.display());
    }
    ck
}

/// A tiny, CPU-sized variant of `preset` (ResNet-18 at 32², batch 8, 4 steps, checkpoints every 2, queue
/// `queue`, `workers` loader threads), written as `dir/<name>.toml`.
pub fn small_config(dir: &Path, name: &str, preset: &str, queue: usize, workers: usize) -> PathBuf {
    let (mut cfg, _) = geossl_trainer::config::PretrainConfig::load(Path::new(preset)).expect("preset");
    cfg.model.arch = geossl_models::Arch::Resnet18;
    cfg.model.input_size = 32;
    cfg.moco.queue_size = queue;
    cfg.moco.shuffle_bn_groups = 2;
    cfg.geo.clusters = 3;
    cfg.optim.batch_size = 8;
    cfg.optim.epochs = 1;
    cfg.optim.max_steps = Some(4);
    cfg.run.checkpoint_every = 2;
    cfg.run.log_every = 1;
    cfg.run.workers = workers;
    cfg.run.device = "cpu".into();
    if cfg.aug.tp_resize.is_some() {
        cfg.aug.tp_resize = Some(64);
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml::to_string(&cfg).expect("toml")).expect("write config");
    path
}
