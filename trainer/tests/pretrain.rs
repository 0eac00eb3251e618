//! Pretraining on real imagery (chips cut from the committed fixtures, tests/fixtures): each preset
//! runs, checkpoints, resumes exactly, and survives SIGKILL mid-checkpoint.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use geossl_models::StateDict;

/// A tiny, CPU-sized variant of a preset.
fn small_config(dir: &Path, preset: &str) -> PathBuf {
    common::small_config(dir, preset, preset, 32, 2)
}

/// Runs `pretrain` up to step `stop` of the 4-step schedule.
fn train(
    config: &Path,
    data: &Path,
    out: &Path,
    stop: u64,
    resume: bool,
    kill_at: Option<&str>,
) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_geossl-train"));
    c.args(["pretrain", "--no-progress", "--config"]).arg(config).arg("--data").arg(data).arg("--out").arg(out);
    c.args(["--stop-after", &stop.to_string()]);
    if resume {
        c.arg("--resume");
    }
    if let Some(k) = kill_at {
        c.env("GEOSSL_TEST_KILL_AT", k);
    }
    c.output().unwrap()
}

fn state(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("checkpoint/state.json")).unwrap()).unwrap()
}

fn weights(out: &Path, file: &str) -> StateDict {
    StateDict::read(&out.join("checkpoint").join(file)).unwrap()
}

#[test]
fn every_preset_trains_checkpoints_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest =
        geossl_trainer::fixtures::real_chips(&geossl_tests::data::fixtures(), &tmp.path().join("chips")).unwrap();
    for preset in ["moco", "moco-tp", "moco-geo", "moco-tp-geo"] {
        let cfg = small_config(tmp.path(), preset);
        // Straight run of 4 steps.
        let a = tmp.path().join(format!("{preset}-a"));
        let o = train(&cfg, &manifest, &a, 4, false, None);
        assert!(o.status.success(), "{preset}: {}", String::from_utf8_lossy(&o.stderr));
        let st = state(&a);
        assert_eq!(st["step"], 4);
        let metrics = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
        let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
        assert!(last["loss"].as_f64().unwrap().is_finite(), "{preset}: {last}");
        let rate = last["temporal_partner_rate"].as_f64().unwrap();
        if preset.contains("tp") {
            assert!(rate > 0.0, "{preset}: real temporal partners were used: {last}");
        } else {
            assert_eq!(rate, 0.0, "{preset}: no temporal partners without TP");
        }
        assert_eq!(last["geo_ce"].is_null(), !preset.contains("geo"), "{preset}: {last}");

        // 2 steps, then resume to 4: identical to the straight run.
        let b = tmp.path().join(format!("{preset}-b"));
        assert!(train(&cfg, &manifest, &b, 2, false, None).status.success());
        assert_eq!(state(&b)["step"], 2);
        let o = train(&cfg, &manifest, &b, 4, true, None);
        assert!(o.status.success(), "{preset} resume: {}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(state(&b)["step"], 4);
        for file in ["model.safetensors", "key.safetensors", "optimizer.safetensors", "queue.safetensors"] {
            let (x, y) = (weights(&a, file), weights(&b, file));
            for t in &x.tensors {
                let u = y.get(&t.name).unwrap();
                assert_eq!(t.data, u.data, "{preset}: {file}:{} differs between straight and resumed runs", t.name);
            }
        }
    }

    // The four straight runs' curves in one picture, one colour each (geo top-1 only from the geo presets).
    let png = tmp.path().join("curves.png");
    let mut c = Command::new(env!("CARGO_BIN_EXE_geossl-train"));
    c.arg("plot");
    for preset in ["moco", "moco-tp", "moco-geo", "moco-tp-geo"] {
        c.arg(tmp.path().join(format!("{preset}-a")));
    }
    let o = c.arg("--out").arg(&png).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("4 runs"), "{}", String::from_utf8_lossy(&o.stdout));
    let img = image::open(&png).unwrap().to_rgb8();
    for (i, (r, g, b)) in geossl_trainer::plot::COLOURS.iter().take(5).enumerate() {
        let n = img.pixels().filter(|p| p.0 == [*r, *g, *b]).count();
        assert_eq!(n > 0, i < 4, "colour {i}: {n} pixels");
    }
}

#[test]
fn sigkill_mid_checkpoint_resumes_from_the_previous_one() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest =
        geossl_trainer::fixtures::real_chips(&geossl_tests::data::fixtures(), &tmp.path().join("chips")).unwrap();
    let cfg = small_config(tmp.path(), "moco-tp-geo");
    let out = tmp.path().join("run");
    assert!(train(&cfg, &manifest, &out, 2, false, None).status.success());
    let before = weights(&out, "model.safetensors");
    // The next checkpoint (step 4) is killed after its weights are staged.
    let o = train(&cfg, &manifest, &out, 4, true, Some("after-weights"));
    assert!(!o.status.success(), "the process should have been killed");
    assert_eq!(state(&out)["step"], 2, "the previous complete checkpoint is still in place");
    assert_eq!(weights(&out, "model.safetensors"), before);
    let o = train(&cfg, &manifest, &out, 4, true, None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(state(&out)["step"], 4);
    // A staging directory left by the killed run does not confuse anything.
    let leftovers: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint."))
        .collect();
    assert!(leftovers.iter().all(|n| n.starts_with("checkpoint.tmp-")), "{leftovers:?}");
}

#[test]
fn bad_inputs_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest =
        geossl_trainer::fixtures::real_chips(&geossl_tests::data::fixtures(), &tmp.path().join("chips")).unwrap();
    let cfg = small_config(tmp.path(), "moco");
    // A corrupt image among the data is skipped and counted, not fatal.
    let first =
        std::fs::read_to_string(&manifest).unwrap().lines().nth(1).unwrap().split(',').next().unwrap().to_string();
    std::fs::write(manifest.parent().unwrap().join(&first), b"not a png").unwrap();
    let out = tmp.path().join("run");
    let o = train(&cfg, &manifest, &out, 4, false, None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let st = state(&out);
    assert!(st["bad_images"].as_u64().unwrap() >= 1, "{st}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("skipping unreadable image"));
    // Missing manifest, bad config, resume without checkpoint: one clear line each.
    let (cfg_s, manifest_s) = (cfg.to_str().unwrap(), manifest.to_str().unwrap());
    for (config, data, needle) in [(cfg_s, "/nope.csv", "/nope.csv"), ("/nope.toml", manifest_s, "not a preset")] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_geossl-train"));
        c.args(["pretrain", "--config", config, "--data", data, "--out"]).arg(tmp.path().join("x"));
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(needle), "{err}");
    }
    let o = train(&cfg, &manifest, &tmp.path().join("fresh"), 2, true, None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("spec.json") && err.contains("not found"), "{err}");
}

/// A run whose embeddings are collapsed — the projection's last layer (weights, bias, momentum buffers, the
/// key encoder's copy) and the queue zeroed in its checkpoint, so every embedding is the zero vector and no
/// gradient can move it — is warned about by name and goes on; with `--stop-on-collapse` it stops with an
/// error at the first measurement and the checkpoint on disk stays the one it resumed from.
#[test]
fn a_collapsed_run_is_named_and_stopped_on_request() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest =
        geossl_trainer::fixtures::real_chips(&geossl_tests::data::fixtures(), &tmp.path().join("chips")).unwrap();
    // Embeddings of width 16 so that 3 steps of 8 keys are more rows than dimensions; measured every step.
    let cfg = common::small_config(tmp.path(), "collapse", "moco", 64, 2);
    let text = std::fs::read_to_string(&cfg).unwrap().replace("dim = 128", "dim = 16");
    let text = text.replace("health_every = 100", "health_every = 1").replace("max_steps = 4", "max_steps = 6");
    assert!(text.contains("dim = 16") && text.contains("health_every = 1") && text.contains("max_steps = 6"), "{text}");
    std::fs::write(&cfg, text).unwrap();
    let run = tmp.path().join("run");
    let o = train(&cfg, &manifest, &run, 2, false, None);
    let log = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{log}");
    // A healthy start: measured from step 3 (24 keys > 16 dimensions) on, never flagged.
    assert!(!log.contains("collaps"), "{log}");
    let ck = run.join("checkpoint");
    for file in ["model.safetensors", "key.safetensors", "optimizer.safetensors", "queue.safetensors"] {
        let mut sd = StateDict::read(&ck.join(file)).unwrap();
        let mut zeroed = 0;
        for t in sd.tensors.iter_mut().filter(|t| t.name.starts_with("proj.2.") || t.name == "queue") {
            if let geossl_models::TensorData::F32(v) = &mut t.data {
                v.fill(0.0);
                zeroed += 1;
            }
        }
        assert!(zeroed > 0, "{file}: nothing to zero");
        sd.write(&ck.join(file)).unwrap();
    }
    let saved = tmp.path().join("collapsed-checkpoint");
    std::fs::create_dir(&saved).unwrap();
    for e in std::fs::read_dir(&ck).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), saved.join(e.file_name())).unwrap();
    }

    // Warned by name, the run goes on to its end.
    let o = train(&cfg, &manifest, &run, 6, true, None);
    let log = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{log}");
    assert!(log.contains("the embeddings are collapsing: embedding std 0.000"), "{log}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let health: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["step"].as_u64().unwrap() > 2)
        .map(|r| r["health"].clone())
        .collect();
    assert_eq!(health.len(), 4, "{metrics}");
    for h in &health {
        assert_eq!((h["std"].as_f64(), h["effective_rank"].as_f64()), (Some(0.0), Some(0.0)), "{h}");
        assert_eq!(h["mean_cosine"].as_f64(), Some(0.0), "zero vectors: {h}");
    }

    // Stopped on request at the first measurement; the checkpoint it resumed from is untouched.
    let stopped = tmp.path().join("stopped");
    std::fs::create_dir_all(stopped.join("checkpoint")).unwrap();
    for e in std::fs::read_dir(&saved).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), stopped.join("checkpoint").join(e.file_name())).unwrap();
    }
    std::fs::copy(run.join("config.toml"), stopped.join("config.toml")).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_geossl-train"));
    c.args(["pretrain", "--no-progress", "--resume", "--stop-on-collapse", "--config"]).arg(&cfg);
    c.arg("--data").arg(&manifest).arg("--out").arg(&stopped);
    let o = c.output().unwrap();
    let log = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "{log}");
    assert!(
        log.contains("the embeddings collapsed at step 3: embedding std 0.000") && log.contains("is kept"),
        "{log}"
    );
    assert_eq!(state(&stopped)["step"], 2);
    for file in ["model.safetensors", "queue.safetensors", "state.json"] {
        let (a, b) =
            (std::fs::read(saved.join(file)).unwrap(), std::fs::read(stopped.join("checkpoint").join(file)).unwrap());
        assert!(a == b, "{file} changed");
    }
}
