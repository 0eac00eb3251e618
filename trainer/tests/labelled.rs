//! `geossl-train probe` and `finetune` on real imagery with real labels:
//! Sentinel-2 chips of the committed 5-date series (tests/fixtures), each labelled with the
//! majority class of the patch's land-cover map. Checks model selection on
//! validation only, the location split, the saved classifier checkpoints, and
//! bad inputs.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use geossl_models::{Arch, HeadSpec, ModelSpec};
use geossl_trainer::data::{read_manifest, write_manifest, Format, Sample};
use geossl_trainer::fixtures::sentinel2_landcover_chips;
use geossl_trainer::load_checkpoint;
use geossl_trainer::supervised::eval_input;
use serde_json::Value;
use tch::{Device, Tensor};

/// A random-init ResNet-18 checkpoint at 32 px (the mechanics don't depend on pretraining).
fn checkpoint(dir: &Path) -> PathBuf {
    common::random_checkpoint(dir, ModelSpec::rgb(Arch::Resnet18, 32))
}

/// Labelled chips split by location: (train manifest, test manifest, test chips).
fn data(dir: &Path) -> (PathBuf, PathBuf, Vec<Sample>) {
    let chips = sentinel2_landcover_chips(&geossl_tests::data::fixtures(), &dir.join("s2"), 16, 8).unwrap();
    let (test, train): (Vec<Sample>, Vec<Sample>) = chips.into_iter().partition(|c| {
        let h = c.location_id.bytes().fold(7u32, |a, b| a.wrapping_mul(31).wrapping_add(u32::from(b)));
        h % 5 == 0
    });
    let tr = write_manifest(&train, &dir.join("s2/train.csv")).unwrap();
    let te = write_manifest(&test, &dir.join("s2/test.csv")).unwrap();
    (tr, te, test)
}

fn probe(ck: &Path, train: &Path, test: Option<&Path>, out: &Path, extra: &[&str]) -> Output {
    train_cmd("probe", ck, train, test, out, &[&["--epochs", "60"], extra].concat())
}

fn train_cmd(cmd: &str, ck: &Path, train: &Path, test: Option<&Path>, out: &Path, extra: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_geossl-train"));
    c.arg(cmd).arg("--checkpoint").arg(ck).arg("--train").arg(train).arg("--out").arg(out);
    if let Some(t) = test {
        c.arg("--test").arg(t);
    }
    c.args(["--device", "cpu"]).args(extra);
    c.output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// location id of a chip file `s2_{gy}_{gx}_{date}.png`.
fn location(path: &str) -> String {
    let name = Path::new(path).file_name().unwrap().to_string_lossy().to_string();
    name.rsplit_once('_').unwrap().0.to_string()
}

#[test]
fn probe_selects_on_validation_and_saves_a_classifier_that_predicts_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let ck = checkpoint(dir.path());
    let (train, test, test_chips) = data(dir.path());
    let out = dir.path().join("probe");
    let o = probe(&ck, &train, Some(&test), &out, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let r = json(&out.join("probe.json"));

    // Real land-cover classes, chosen on validation: the chosen point is the grid's best val top-1.
    let classes: Vec<String> = serde_json::from_value(r["classes"].clone()).unwrap();
    assert!(classes.len() >= 2, "{r}");
    let grid = r["grid"].as_array().unwrap();
    assert_eq!(grid.len(), 6, "3 learning rates × 2 weight decays");
    let best = grid.iter().map(|g| g["val_top1"].as_f64().unwrap()).fold(f64::MIN, f64::max);
    assert_eq!(r["chosen"]["val_top1"].as_f64().unwrap(), best);
    assert!((r["val"]["top1"].as_f64().unwrap() - best).abs() < 1e-6, "{r}");
    assert_eq!(r["test"]["images"].as_u64().unwrap() as usize, test_chips.len());
    // The probe learns something from the features: better than always answering the commonest class.
    let (t1, tm) = (r["train"]["top1"].as_f64().unwrap(), r["train"]["majority_top1"].as_f64().unwrap());
    assert!(t1 > tm, "train top-1 {t1} vs majority {tm}");

    // Validation locations are held out whole: no place on both sides.
    let preds = std::fs::read_to_string(out.join("predictions.csv")).unwrap();
    let mut by_split: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in preds.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        by_split.entry(f[0].to_string()).or_default().insert(location(f[1]));
    }
    assert!(by_split["train"].is_disjoint(&by_split["val"]), "{by_split:?}");
    assert!(!by_split["val"].is_empty() && !by_split["test"].is_empty());

    // The test split never takes part in the choice: shuffled test labels change the test score only.
    let mut shuffled = test_chips.clone();
    let labels: Vec<Option<String>> = shuffled.iter().map(|c| c.label.clone()).collect();
    for (i, c) in shuffled.iter_mut().enumerate() {
        c.label = labels[(i + 7) % labels.len()].clone();
    }
    let test2 = write_manifest(&shuffled, &dir.path().join("s2/test_shuffled.csv")).unwrap();
    let out2 = dir.path().join("probe2");
    let o = probe(&ck, &train, Some(&test2), &out2, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let r2 = json(&out2.join("probe.json"));
    assert_eq!(r2["chosen"], r["chosen"]);
    assert_eq!(r2["grid"], r["grid"]);
    assert_eq!(r2["val"], r["val"]);

    // checkpoint/ = backbone + the probe as classifier: it predicts what predictions.csv says.
    saved_model_predicts(&out, &test, &classes);
}

/// `out/checkpoint` classifies the images of `manifest` as `out/predictions.csv` says, with `classes` as labels.
fn saved_model_predicts(out: &Path, manifest: &Path, classes: &[String]) {
    let preds = std::fs::read_to_string(out.join("predictions.csv")).unwrap();
    let loaded = load_checkpoint(&out.join("checkpoint"), Device::Cpu).unwrap();
    let samples = read_manifest(manifest, Format::Csv).unwrap();
    let x = Tensor::stack(&samples.iter().map(|s| eval_input(s, &loaded.spec).unwrap()).collect::<Vec<_>>(), 0);
    let logits = tch::no_grad(|| loaded.model.classify(&x, false)).unwrap();
    let pred: Vec<i64> = Vec::try_from(logits.argmax(1, false)).unwrap();
    let labels = match loaded.spec.heads.iter().find_map(|h| match h {
        HeadSpec::Classifier(c) => Some(c.labels.clone()),
        _ => None,
    }) {
        Some(l) => l,
        None => panic!("no classifier head in {:?}", loaded.spec.heads),
    };
    assert_eq!(labels, classes);
    let expected: BTreeMap<String, String> = preds
        .lines()
        .filter(|l| l.starts_with("test,"))
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[1].to_string(), f[3].to_string())
        })
        .collect();
    for (s, p) in samples.iter().zip(pred) {
        assert_eq!(expected[&s.path.display().to_string()], labels[p as usize], "{}", s.path.display());
    }
}

#[test]
fn probe_refuses_bad_inputs_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let ck = checkpoint(dir.path());
    let (train, test, _) = data(dir.path());
    let out = dir.path().join("p");
    // No labels.
    let chips =
        geossl_trainer::fixtures::sentinel2_chips(&geossl_tests::data::fixtures(), &dir.path().join("nolabel"), 32, 32)
            .unwrap();
    let nolabel = write_manifest(&chips, &dir.path().join("nolabel/m.csv")).unwrap();
    let o = probe(&ck, &nolabel, None, &out, &[]);
    assert!(!o.status.success() && text(&o).contains("no label"), "{}", text(&o));
    // A test label the training split never had.
    let mut rows: Vec<String> = std::fs::read_to_string(&test).unwrap().lines().map(String::from).collect();
    let last = rows.len() - 1;
    rows[last] = format!("{},glacier", rows[last].rsplit_once(',').unwrap().0);
    let bad_test = dir.path().join("s2/bad_test.csv");
    std::fs::write(&bad_test, rows.join("\n") + "\n").unwrap();
    let o = probe(&ck, &train, Some(&bad_test), &out, &[]);
    assert!(!o.status.success() && text(&o).contains("\"glacier\""), "{}", text(&o));
    // Missing checkpoint, bad grid.
    let o = probe(&dir.path().join("nope"), &train, None, &out, &[]);
    assert!(!o.status.success() && text(&o).contains("nope"), "{}", text(&o));
    let o = probe(&ck, &train, None, &out, &["--lr", "0"]);
    assert!(!o.status.success() && text(&o).contains("learning rates"), "{}", text(&o));
    assert!(!out.join("probe.json").exists(), "a failed probe wrote a report");
}

#[test]
fn finetune_trains_the_backbone_chooses_on_validation_and_saves_it() {
    let dir = tempfile::tempdir().unwrap();
    let ck = checkpoint(dir.path());
    let (train, test, test_chips) = data(dir.path());
    let out = dir.path().join("ft");
    let args = ["--epochs", "3", "--batch-size", "32", "--lr", "0.05"];
    let o = train_cmd("finetune", &ck, &train, Some(&test), &out, &args);
    assert!(o.status.success(), "{}", text(&o));
    let r = json(&out.join("finetune.json"));
    let curve = r["curve"].as_array().unwrap();
    assert_eq!(curve.len(), 3, "{r}");
    assert!(curve.iter().all(|e| e["train_loss"].as_f64().unwrap().is_finite()), "{r}");
    // The kept epoch is the first with the best validation top-1, and its weights are what was saved.
    let vals: Vec<f64> = curve.iter().map(|e| e["val_top1"].as_f64().unwrap()).collect();
    let best = vals.iter().copied().fold(f64::MIN, f64::max);
    let chosen = r["chosen_epoch"].as_u64().unwrap() as usize;
    assert_eq!(chosen, vals.iter().position(|&v| v == best).unwrap() + 1, "{r}");
    assert!((r["val"]["top1"].as_f64().unwrap() - best).abs() < 1e-9, "{r}");
    assert_eq!(r["test"]["images"].as_u64().unwrap() as usize, test_chips.len());
    let classes: Vec<String> = serde_json::from_value(r["classes"].clone()).unwrap();
    saved_model_predicts(&out, &test, &classes);
    // The backbone itself was trained (unlike the probe's).
    let before = geossl_models::StateDict::read(&ck.join("model.safetensors")).unwrap();
    let after = geossl_models::StateDict::read(&out.join("checkpoint/model.safetensors")).unwrap();
    let (b, a) = (before.get("conv1.weight").unwrap(), after.get("conv1.weight").unwrap());
    assert_ne!(b.data, a.data, "conv1 did not move");
    // Batches are prepared on worker threads (default 4) with one RNG per example: one worker
    // gives the same first epoch (its learning rate does not depend on the number of epochs).
    let one = dir.path().join("ft1");
    let o = train_cmd(
        "finetune",
        &ck,
        &train,
        None,
        &one,
        &["--epochs", "1", "--batch-size", "32", "--lr", "0.05", "--workers", "1"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let r1 = json(&one.join("finetune.json"));
    assert_eq!(r1["curve"][0], curve[0], "{r1}\nvs\n{r}");
    // Bad hyper-parameters are refused by name, before anything is written.
    let o = train_cmd("finetune", &ck, &train, None, &dir.path().join("bad"), &["--crop-scale", "0.5,0.1"]);
    assert!(!o.status.success() && text(&o).contains("crop scale"), "{}", text(&o));
    assert!(!dir.path().join("bad").exists());
}
