#![allow(clippy::unwrap_used)]
//! STAC MLM model cards: the cards `geossl-export onnx` writes validate with the field's own packages
//! (stac-model's pydantic models, pystac's core schemas) and say what the model is; an ONNX model made
//! elsewhere (PyTorch's exporter, no geossl metadata) with a card written by stac-model is embedded and
//! served as geossl's own export of the same weights, on a real Landsat scene.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, UInt32Type};
use geossl_models::{ModelSpec, StateDict};
use geossl_tests::http::post;
use geossl_tests::server::{make_repository, Server};
use geossl_tests::{embed, python, read_parquet, run, text, workspace};
use serde_json::Value;

/// Each card as `scripts/reference/mlm_validate.py` reads it (it fails the test on an invalid card).
fn validate(cards: &[&Path]) -> Vec<Value> {
    geossl_tests::reference_json("mlm_validate.py", cards)
}

fn sha256_file(p: &Path) -> String {
    geossl_models::sha256_hex(&std::fs::read(p).unwrap())
}

#[test]
fn exported_cards_are_valid_mlm_and_carry_the_input_contract() {
    let d = tempfile::tempdir().unwrap();
    make_repository(
        d.path(),
        64,
        &[
            ("embed", "embed", &[]),
            ("embed_f32", "embed", &["--input", "float32"]),
            ("classify", "classify", &[]),
            ("segment", "segment", &[]),
            ("features", "features", &[]),
        ],
    );
    let names = ["embed", "embed_f32", "classify", "segment", "features"];
    let cards: Vec<PathBuf> = names.iter().map(|n| d.path().join(n).join("1/model.item.json")).collect();
    let read: Vec<&Path> = cards.iter().map(PathBuf::as_path).collect();
    let got = validate(&read);
    let spec: ModelSpec =
        serde_json::from_str(&std::fs::read_to_string(d.path().join(".checkpoint/spec.json")).unwrap()).unwrap();
    let backbone = 11_176_512u64; // torchvision resnet18 without fc
    for (n, v) in names.iter().zip(&got) {
        let model = d.path().join(n).join("1/model.onnx");
        assert_eq!(v["mlm_schema"], geossl_models::mlm::MLM_SCHEMA, "{n}");
        assert_eq!(v["architecture"], "ResNet-18");
        assert_eq!(v["input"]["bands"], serde_json::json!(spec.bands));
        assert_eq!(v["input"]["dim_order"], serde_json::json!(["batch", "channel", "height", "width"]));
        assert_eq!(v["asset"]["artifact_type"], "onnx");
        assert_eq!(v["asset"]["size"], std::fs::metadata(&model).unwrap().len());
        assert_eq!(v["asset"]["checksum"], format!("1220{}", sha256_file(&model)));
        assert!(v["asset"]["roles"].as_array().unwrap().contains(&Value::from("mlm:model")));
    }
    let [embed, embed_f32, classify, segment, features] = got.as_slice() else { unreachable!() };
    assert_eq!(
        features["outputs"],
        serde_json::json!([{"name": "feature_map", "tasks": ["similarity-search"], "shape": [-1, 512, 2, 2]}])
    );
    assert_eq!(embed["tasks"], serde_json::json!(["similarity-search"]));
    assert_eq!(embed["input"]["data_type"], "uint8");
    assert_eq!(embed["input"]["shape"], serde_json::json!([-1, 3, 64, 64]));
    assert_eq!(embed["input"]["value_scaling"], Value::Null, "the uint8 graph normalizes");
    assert_eq!(
        embed["outputs"],
        serde_json::json!([{"name": "embedding", "tasks": ["similarity-search"], "shape": [-1, 512]}])
    );
    assert_eq!(embed["total_parameters"], backbone);
    // float32 input: the z-score in stored units is the spec's normalization (to float32 rounding of
    // the spec's own arithmetic, `(x·scale + offset − mean) / std` in f32: a few ulps of values ≤ 3).
    assert_eq!(embed_f32["input"]["data_type"], "float32");
    let vs = embed_f32["input"]["value_scaling"].as_array().unwrap();
    assert_eq!(vs.len(), 3);
    for (c, z) in vs.iter().enumerate() {
        assert_eq!(z["type"], "z-score");
        let (m, s) = (z["mean"].as_f64().unwrap(), z["stddev"].as_f64().unwrap());
        for x in [0.0f64, 77.0, 255.0] {
            let card = (x - m) / s;
            let ours = f64::from(spec.normalization.apply(c, x as f32));
            assert!(
                (card - ours).abs() <= 8.0 * f64::from(f32::EPSILON) * (1.0 + card.abs()),
                "band {c} x {x}: {card} {ours}"
            );
        }
    }
    assert_eq!(classify["tasks"], serde_json::json!(["classification", "scene-classification"]));
    assert_eq!(
        classify["outputs"].as_array().unwrap().iter().map(|o| o["name"].clone()).collect::<Vec<_>>(),
        ["logits", "probabilities"]
    );
    assert_eq!(classify["total_parameters"], backbone + 512 * 3 + 3);
    let item: Value = serde_json::from_str(&std::fs::read_to_string(&cards[2]).unwrap()).unwrap();
    assert_eq!(
        item["properties"]["mlm:output"][0]["classification:classes"],
        serde_json::json!([{"value": 0, "name": "water"}, {"value": 1, "name": "forest"}, {"value": 2, "name": "urban"}])
    );
    assert_eq!(segment["input"]["shape"], serde_json::json!([-1, 3, -1, -1]));
    assert_eq!(segment["outputs"][0]["shape"], serde_json::json!([-1, 3, -1, -1]));
    assert_eq!(segment["tasks"], serde_json::json!(["segmentation", "semantic-segmentation"]));

    // A refused export leaves neither a model nor a card.
    let out = d.path().join("refused/model.onnx");
    let ck = d.path().join(".checkpoint");
    let o = run(
        "geossl-export",
        &["onnx", "--checkpoint", ck.to_str().unwrap(), "--out", out.to_str().unwrap(), "--opset", "9"],
    );
    assert!(!o.status.success());
    assert!(!out.exists() && !geossl_models::mlm::card_path(&out).exists());
}

/// Embeddings by window `(x, y)` and the `geossl` provenance of an embed output.
fn rows(p: &Path) -> (HashMap<(u32, u32), Vec<f32>>, Value) {
    let (b, kv) = read_parquet(p);
    let w = b.column_by_name("window").unwrap().as_struct();
    let (x, y) = (
        w.column_by_name("x").unwrap().as_primitive::<UInt32Type>(),
        w.column_by_name("y").unwrap().as_primitive::<UInt32Type>(),
    );
    let e = b.column_by_name("embedding").unwrap().as_fixed_size_list();
    let m = (0..b.num_rows())
        .map(|i| ((x.value(i), y.value(i)), e.value(i).as_primitive::<Float32Type>().values().to_vec()))
        .collect();
    (m, serde_json::from_str(&kv["geossl"]).unwrap())
}

#[test]
fn a_pytorch_onnx_model_with_its_card_embeds_and_serves_like_geossls_export() {
    let d = tempfile::tempdir().unwrap();
    make_repository(d.path(), 64, &[("geo", "embed", &[])]);
    let ck = d.path().join(".checkpoint");
    let geo = d.path().join("geo/1/model.onnx");
    let scene = geossl_tests::data::fixtures().join("rasterio/RGB.byte.tif");

    // The scene's windows as the trainer's tiler cuts them (the same grid and nodata rule as embed).
    let windows: Vec<((u32, u32), PathBuf)> =
        geossl_tests::tiler_chips(&scene, 64, &d.path().join("chips")).into_iter().map(|c| (c.window, c.png)).collect();

    // PyTorch exports the same weights; stac-model writes the card; float64 and float32 references.
    let pt = d.path().join("pt");
    let mut cmd = std::process::Command::new(python());
    cmd.arg(workspace().join("scripts/reference/torch_onnx_card.py"))
        .args(["--checkpoint", ck.to_str().unwrap(), "--out", pt.to_str().unwrap(), "--chips"])
        .args(windows.iter().map(|(_, p)| p));
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let card = pt.join("pt.item.json");
    let v = validate(&[&card]);
    assert_eq!(v[0]["input"]["name"], "x");
    let onnx_meta = std::fs::read(pt.join("pt.onnx")).unwrap();
    assert!(!String::from_utf8_lossy(&onnx_meta).contains("geossl"), "the PyTorch model carries no geossl metadata");
    let r = StateDict::read(&pt.join("reference.safetensors")).unwrap();
    let (f64r, f32r) =
        (r.get("f64").unwrap().data.as_f32().unwrap().to_vec(), r.get("f32").unwrap().data.as_f32().unwrap().to_vec());
    let dim = 512;
    // Per window: the reference value and the float32 error PyTorch's own eager float32 makes on it; an
    // implementation computing in float32 in another order (ONNX Runtime, BatchNorm folded by the
    // exporter, scaling in the server) is held to 8× that error (+ 2⁻²⁰ of the row's largest value).
    let reference: HashMap<(u32, u32), (&[f32], f32)> = windows
        .iter()
        .enumerate()
        .map(|(i, (k, _))| {
            let w = &f64r[i * dim..(i + 1) * dim];
            let e32 = w.iter().zip(&f32r[i * dim..(i + 1) * dim]).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            let top = w.iter().fold(0.0f32, |a, x| a.max(x.abs()));
            (*k, (w, 8.0 * e32 + top / (1u32 << 20) as f32))
        })
        .collect();
    let close = |what: &str, k: &(u32, u32), got: &[f32]| {
        let (want, bound) = reference[k];
        let err = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(err <= bound, "{what} window {k:?}: error {err} > bound {bound}");
        err / bound
    };

    // The plain PyTorch file says neither which output is the embedding nor how to scale its input.
    let out = |n: &str| d.path().join(format!("out/{n}.parquet"));
    let o = embed(&pt.join("pt.onnx"), &scene, &out("plain"), &[]);
    assert!(!o.status.success() && text(&o).contains("model card"), "{}", text(&o));
    assert!(!out("plain").exists());

    let o = embed(&card, &scene, &out("pt"), &[]);
    assert!(o.status.success(), "{}", text(&o));
    let (pt_rows, prov) = rows(&out("pt"));
    assert_eq!(prov["model"]["name"], "torchvision-resnet18-from-geossl");
    assert_eq!(prov["model"]["card"], card.display().to_string());
    assert_eq!(prov["model"]["sha256"], sha256_file(&pt.join("pt.onnx")));
    assert_eq!(prov["sample_type"], "uint8");
    let o = embed(&geo, &scene, &out("geo"), &[]);
    assert!(o.status.success(), "{}", text(&o));
    let (geo_rows, _) = rows(&out("geo"));
    assert_eq!(pt_rows.len(), windows.len());
    assert_eq!(geo_rows.len(), windows.len());
    let mut worst = 0.0f32;
    for (k, _) in &windows {
        worst = worst.max(close("card (PyTorch ONNX)", k, &pt_rows[k]));
        worst = worst.max(close("geossl ONNX", k, &geo_rows[k]));
    }
    eprintln!("largest error / bound over {} windows: {worst:.3}", windows.len());
    // geossl's own export through its own card: the same bytes to the same session, the same rows.
    let o = embed(&geossl_models::mlm::card_path(&geo), &scene, &out("geo_card"), &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(rows(&out("geo_card")).0, geo_rows);

    // A card that does not describe its model is refused, naming both sides; nothing is written.
    let mut bad: Value = serde_json::from_str(&std::fs::read_to_string(&card).unwrap()).unwrap();
    bad["properties"]["mlm:input"][0]["name"] = "pixels".into();
    let bad_card = pt.join("bad.item.json");
    std::fs::write(&bad_card, serde_json::to_vec(&bad).unwrap()).unwrap();
    let o = embed(&bad_card, &scene, &out("bad"), &[]);
    let t = text(&o);
    assert!(!o.status.success() && t.contains("\"pixels\"") && t.contains("\"x\""), "{t}");
    assert!(!out("bad").exists());

    // Served from a model repository: the card beside model.onnx is the version's contract.
    let repo = d.path().join("repo");
    std::fs::create_dir_all(repo.join("pt/1")).unwrap();
    std::fs::copy(pt.join("pt.onnx"), repo.join("pt/1/model.onnx")).unwrap();
    std::fs::copy(&card, repo.join("pt/1/model.item.json")).unwrap();
    let s = Server::start(&repo, &["--execution-provider", "cpu"]);
    let meta = geossl_tests::http::get(s.addr, "/v2/models/pt").json();
    assert_eq!(meta["inputs"][0], serde_json::json!({"name": "x", "datatype": "FP32", "shape": [-1, 3, 64, 64]}));
    for (k, png) in windows.iter().step_by(windows.len() / 4) {
        let r = post(s.addr, "/v1/models/pt/embed", &[("Content-Type", "image/png")], &std::fs::read(png).unwrap());
        assert_eq!(r.status, 200, "{}", r.text());
        let e: Vec<f32> = serde_json::from_value(r.json()["embeddings"][0].clone()).unwrap();
        close("served card", k, &e);
    }
}
