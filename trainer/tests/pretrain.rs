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
