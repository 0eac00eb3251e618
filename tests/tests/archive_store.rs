//! Archive embedding from and to object storage, against a real
//! S3-compatible server (moto's, started here on 127.0.0.1) reached through a
//! TCP proxy that counts the bytes it sends back; HTTP inputs are read from the
//! same server's plain URLs (it honours `Range`). Real pixels: the Landsat 7
//! scene and the aerial COG of rasterio's test data.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, TimestampMicrosecondType, UInt32Type};
use arrow_array::Array;
use geossl_tests::objstore::{CountingProxy, Moto};
use geossl_tests::server::make_repository;
use geossl_tests::{python, text};

/// A row's key: its source's file name and window.
type Key = (String, [u32; 4]);
/// A row's footprint WKB, embedding bits, datetime.
type Row = (Vec<u8>, Vec<u32>, Option<i64>);
/// Rows by key.
type Rows = BTreeMap<Key, Row>;

/// Every row of a GeoParquet file: its key, chip id, and footprint/embedding bits/datetime.
fn read_rows(parquet: &[u8]) -> Vec<(Key, String, Row)> {
    let b =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(parquet.to_vec()))
            .unwrap()
            .build()
            .unwrap();
    let mut out = Vec::new();
    for batch in b {
        let b = batch.unwrap();
        let ids = b.column_by_name("chip_id").unwrap().as_string::<i32>();
        let src = b.column_by_name("source").unwrap().as_string::<i32>();
        let win = b.column_by_name("window").unwrap().as_struct();
        let w = |k: &str| win.column_by_name(k).unwrap().as_primitive::<UInt32Type>().clone();
        let (x, y, ww, hh) = (w("x"), w("y"), w("w"), w("h"));
        let geom = b.column_by_name("geometry").unwrap().as_binary::<i32>();
        let emb = b.column_by_name("embedding").unwrap().as_fixed_size_list();
        let dt = b.column_by_name("datetime").unwrap().as_primitive::<TimestampMicrosecondType>();
        for i in 0..b.num_rows() {
            let name = src.value(i).rsplit(['/', '#']).next().unwrap().to_string();
            let bits = emb.value(i).as_primitive::<Float32Type>().values().iter().map(|v| v.to_bits()).collect();
            let key = (name, [x.value(i), y.value(i), ww.value(i), hh.value(i)]);
            let dt = dt.is_valid(i).then(|| dt.value(i));
            out.push((key, ids.value(i).to_string(), (geom.value(i).to_vec(), bits, dt)));
        }
    }
    out
}

fn rows(parquet: &[u8]) -> Rows {
    let mut out = Rows::new();
    for (key, _, row) in read_rows(parquet) {
        assert!(out.insert(key.clone(), row).is_none(), "{key:?} twice");
    }
    out
}

/// Chip id of every row, by source file name and window.
fn chip_ids(parquet: &[u8]) -> BTreeMap<Key, String> {
    read_rows(parquet).into_iter().map(|(key, id, _)| (key, id)).collect()
}

/// Renames every row's source file name (the same pixels under another name).
fn renamed(r: &Rows, from: &str, to: &str) -> Rows {
    r.iter().filter(|((n, _), _)| n == from).map(|((_, w), v)| ((to.to_string(), *w), v.clone())).collect()
}

fn without_dates(r: &Rows) -> Rows {
    r.iter().map(|(k, (g, e, _))| (k.clone(), (g.clone(), e.clone(), None))).collect()
}

fn serve(args: &[&str], env: &[(&'static str, String)]) -> Command {
    geossl_tests::serve_command(args, env)
}

fn out(mut c: impl std::borrow::BorrowMut<Command>) -> Output {
    c.borrow_mut().output().unwrap()
}

/// Runs Python (with rasterio) on `code`, with `args`.
fn py(code: &str, args: &[&Path]) {
    let o = Command::new(python()).arg("-c").arg(code).args(args).output().unwrap();
    assert!(o.status.success(), "python: {}", text(&o));
}

/// A 3×3 mosaic of the Landsat scene (2373×2154×3 uint8) written as a COG
/// (256-pixel tiles, deflate, overviews) by GDAL's COG driver.
fn mosaic_cog(to: &Path) {
    let o = Command::new(python())
        .arg(geossl_tests::workspace().join("scripts/reference/mosaic_cog.py"))
        .arg(geossl_tests::data::fixtures().join("rasterio/RGB.byte.tif"))
        .arg(to)
        .output()
        .unwrap();
    assert!(o.status.success(), "mosaic_cog.py: {}", text(&o));
}

fn model(dir: &Path) -> PathBuf {
    make_repository(dir, 64, &[("embed", "embed", &[])]);
    dir.join("embed/1/model.onnx")
}

/// `n` copies of rasterio's Landsat scene as `s3://archive/scenes/s{i}.tif` and `dir/scenes/s{i}.tif`;
/// returns the scene's bytes and the local folder.
fn scenes_in_s3_and_local(moto: &Moto, dir: &Path, n: usize) -> (Vec<u8>, PathBuf) {
    moto.bucket("archive");
    let scene = std::fs::read(geossl_tests::data::fixtures().join("rasterio/RGB.byte.tif")).unwrap();
    let local_dir = dir.join("scenes");
    std::fs::create_dir_all(&local_dir).unwrap();
    for i in 0..n {
        moto.put("archive", &format!("scenes/s{i}.tif"), &scene);
        std::fs::write(local_dir.join(format!("s{i}.tif")), &scene).unwrap();
    }
    (scene, local_dir)
}

/// A COG read over S3 and over HTTP gives the local file's rows, its header fetched once; for a small
/// area, the bytes fetched are a small fraction of the file.
#[test]
fn cog_over_s3_and_http_reads_by_ranges() {
    let d = tempfile::tempdir().unwrap();
    let model = model(d.path());
    let cog = d.path().join("mosaic.tif");
    mosaic_cog(&cog);
    let size = std::fs::metadata(&cog).unwrap().len();
    let moto = Moto::start();
    moto.bucket("archive");
    moto.put("archive", "cog/mosaic.tif", &std::fs::read(&cog).unwrap());
    let proxy = CountingProxy::start(moto.addr);
    let env = Moto::env(proxy.addr);
    let m = model.to_str().unwrap();
    let local_out = d.path().join("local.parquet");
    let o = out(serve(&["embed", "--model", m, "--input", cog.to_str().unwrap(), "--out"], &[]).arg(&local_out));
    assert!(o.status.success(), "{}", text(&o));
    let local = rows(&std::fs::read(&local_out).unwrap());
    assert!(local.len() > 500, "{} rows", local.len());

    // The whole scene over S3, the output written to S3 too.
    let before = proxy.received();
    let o = out(serve(
        &[
            "embed",
            "--model",
            m,
            "--input",
            "s3://archive/cog/mosaic.tif",
            "--out",
            "s3://archive/out/whole.parquet",
            "--log",
            "geossl_serve=debug",
        ],
        &env,
    ));
    assert!(o.status.success(), "{}", text(&o));
    // The header is fetched once (its first 16 KiB): georeference, date and tile index come from that one
    // parse, and the spatial ordering's look at it is cached for the read that follows.
    let header_reads = text(&o).lines().filter(|l| l.contains("fetch") && l.contains("start=0 ")).count();
    assert_eq!(header_reads, 1, "header reads of one COG in one run: {}", text(&o));
    assert!(text(&o).contains("requests"), "the summary counts fetched bytes: {}", text(&o));
    assert_eq!(rows(&moto.get("archive", "out/whole.parquet").unwrap()), local, "S3 rows differ from local rows");
    let whole = proxy.received() - before;
    // Every full-resolution tile once (the overviews, ~1/4 of a COG, are not read), nothing twice.
    assert!(whole > size / 2 && whole < size, "reading every window fetched {whole} bytes of {size}");

    // A small area: the box of one window well inside the scene, shrunk so that it meets only that window.
    let ((_, w0), (g0, _, _)) = local.iter().find(|((_, w), _)| w[0] >= 1024 && w[1] >= 1024).unwrap();
    let xy: Vec<f64> = g0[13..].chunks(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect();
    let (xs, ys): (Vec<f64>, Vec<f64>) =
        (xy.iter().step_by(2).copied().collect(), xy.iter().skip(1).step_by(2).copied().collect());
    let (x0, x1) = (xs.iter().cloned().fold(f64::MAX, f64::min), xs.iter().cloned().fold(f64::MIN, f64::max));
    let (y0, y1) = (ys.iter().cloned().fold(f64::MAX, f64::min), ys.iter().cloned().fold(f64::MIN, f64::max));
    let (dx, dy) = ((x1 - x0) * 0.3, (y1 - y0) * 0.3);
    let bbox = format!("{},{},{},{}", x0 + dx, y0 + dy, x1 - dx, y1 - dy);
    for (input, label) in [
        (format!("http://{}/archive/cog/mosaic.tif", proxy.addr), "HTTP"),
        ("s3://archive/cog/mosaic.tif".to_string(), "S3"),
    ] {
        let small = d.path().join(format!("small-{label}.parquet"));
        let before = proxy.received();
        let o = out(serve(&["embed", "--model", m, "--input", &input, "--bbox", &bbox, "--out"], &env).arg(&small));
        let fetched = proxy.received() - before;
        assert!(o.status.success(), "{label}: {}", text(&o));
        let got = rows(&std::fs::read(&small).unwrap());
        assert!(got.contains_key(&("mosaic.tif".to_string(), *w0)), "{label}: the window in the box is missing");
        assert!(!got.is_empty() && got.len() <= 4, "{label}: {} rows for a box inside one window", got.len());
        for (k, v) in &got {
            assert_eq!(Some(v), local.get(k), "{label}: row {k:?} differs from the local file's");
        }
        assert!(fetched * 20 < size, "{label}: {fetched} bytes fetched for one window of a {size}-byte COG (over 5 %)");
        eprintln!("{label}: {fetched} of {size} bytes ({:.2} %) for one window", 100.0 * fetched as f64 / size as f64);
    }
}

/// Waits for `child`'s first "embedded" log line (one input done: the shard is under way), then returns it.
fn wait_until_embedding(child: &mut std::process::Child) -> BufReader<std::process::ChildStderr> {
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(err.read_line(&mut line).unwrap() > 0, "the shard ended before embedding anything: {seen}");
        seen.push_str(&line);
        if line.contains("embedded") {
            return err;
        }
    }
}

/// Plan → 3 shards as 3 processes (JOB_COMPLETION_INDEX 0..2) reading scenes from S3 and writing the dataset
/// to S3; one is killed with SIGKILL mid-shard and rerun; verify passes; the union equals the unsharded local
/// run row for row. A plan replaced while a shard runs makes that shard publish nothing.
#[test]
fn sharded_embedding_in_object_storage_resumes_and_equals_local() {
    let d = tempfile::tempdir().unwrap();
    let model = model(d.path());
    let m = model.to_str().unwrap();
    let moto = Moto::start();
    let (_, local_dir) = scenes_in_s3_and_local(&moto, d.path(), 5);
    let env = Moto::env(moto.addr);
    let o = out(serve(&["embed", "plan", "--input", "s3://archive/scenes/", "--out", "s3://archive/plan.json"], &env));
    assert!(o.status.success() && text(&o).contains("5 inputs"), "{}", text(&o));
    let shard = |i: usize| {
        let mut c =
            serve(&["embed", "--model", m, "--plan", "s3://archive/plan.json", "--out", "s3://archive/ds"], &env);
        c.args(["--shard-count", "3"]).env("JOB_COMPLETION_INDEX", i.to_string());
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        c.spawn().unwrap()
    };
    // Shard 0 (inputs 0 and 3) is killed after its first input, before it can publish.
    let mut k = shard(0);
    let _log = wait_until_embedding(&mut k);
    k.kill().unwrap();
    k.wait().unwrap();
    assert!(moto.keys("archive", "ds/").is_empty(), "a killed shard published {:?}", moto.keys("archive", "ds/"));
    let kids: Vec<_> = (0..3).map(shard).collect();
    for k in kids {
        let o = k.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
    }
    let verify = |dataset: &str| {
        out(serve(&["embed", "verify", "--plan", "s3://archive/plan.json", "--dataset", dataset], &env))
    };
    let o = verify("s3://archive/ds");
    assert!(o.status.success() && text(&o).contains("3 shards complete"), "{}", text(&o));
    let mut union = Rows::new();
    for i in 0..3 {
        union.extend(rows(&moto.get("archive", &format!("ds/part-{i:05}.parquet")).unwrap()));
    }
    // Verify wrote the dataset's STAC Collection beside the parts, one Item per part: a copy of the prefix
    // validates (relative links) and each Item's footprint is the union of its part's rows' footprints.
    let copy = d.path().join("ds-copy");
    moto.download("archive", "ds/", &copy);
    let v = stac_dataset(&copy.join("collection.json"));
    assert_eq!(v["items"].as_array().unwrap().len(), 3);
    assert_eq!(v["rows"], union.len());
    assert_eq!(
        v["chip_layout"],
        serde_json::json!({"layout_type": "regular_grid", "chip_size": [64, 64], "stride": [64, 64]})
    );
    let sources: std::collections::BTreeSet<String> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|i| i["sources"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()))
        .collect();
    assert_eq!(sources, (0..5).map(|i| format!("s3://archive/scenes/s{i}.tif")).collect());
    let local_out = d.path().join("local.parquet");
    let o = out(serve(&["embed", "--model", m, "--input", local_dir.to_str().unwrap(), "--out"], &[]).arg(&local_out));
    assert!(o.status.success(), "{}", text(&o));
    let local = rows(&std::fs::read(&local_out).unwrap());
    assert!(local.len() > 100);
    assert_eq!(union, local, "the shards in S3 differ from the local run");
    // And against the unsharded run over the same S3 inputs, chip ids too (they hash model, source and window).
    let o = out(serve(&["embed", "--model", m, "--input", "s3://archive/scenes/", "--out"], &env).arg(&local_out));
    assert!(o.status.success(), "{}", text(&o));
    let unsharded = std::fs::read(&local_out).unwrap();
    let mut shard_ids = chip_ids(&moto.get("archive", "ds/part-00000.parquet").unwrap());
    for i in 1..3 {
        shard_ids.extend(chip_ids(&moto.get("archive", &format!("ds/part-{i:05}.parquet")).unwrap()));
    }
    assert_eq!(shard_ids, chip_ids(&unsharded), "chip ids of the shards vs the unsharded S3 run");
    assert_eq!(union, rows(&unsharded), "rows of the shards vs the unsharded S3 run");
    // A rerun skips finished shards.
    let o = shard(1).wait_with_output().unwrap();
    assert!(o.status.success() && text(&o).contains("already done"), "{}", text(&o));

    // The plan is replaced while a shard runs: the shard refuses to publish, the dataset is untouched.
    let o = out(serve(&["embed", "plan", "--input", "s3://archive/scenes/", "--out", "s3://archive/plan2.json"], &env));
    assert!(o.status.success(), "{}", text(&o));
    let mut c = serve(&["embed", "--model", m, "--plan", "s3://archive/plan2.json", "--out", "s3://archive/ds2"], &env);
    c.args(["--shard-count", "1"]).env("JOB_COMPLETION_INDEX", "0").stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut running = c.spawn().unwrap();
    let mut log = wait_until_embedding(&mut running);
    let o = out(serve(
        &["embed", "plan", "--input", "s3://archive/scenes/s1.tif", "--out", "s3://archive/plan2.json"],
        &env,
    ));
    assert!(o.status.success(), "{}", text(&o));
    let status = running.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut log, &mut rest).unwrap();
    assert!(!status.success() && rest.contains("changed while shard 0 ran"), "{rest}");
    assert!(moto.keys("archive", "ds2/").is_empty(), "published: {:?}", moto.keys("archive", "ds2/"));
}

/// What `scripts/reference/stac_embeddings_validate.py` found in a dataset's STAC Collection (pystac's core
/// schemas, the embeddings extension's required fields, each Item against its part's rows); fails the test
/// on an invalid document.
fn stac_dataset(collection: &Path) -> serde_json::Value {
    geossl_tests::reference_json("stac_embeddings_validate.py", &[collection]).remove(0)
}

/// Writes the Landsat scene's bands as single-band files and as a reversed 3-band file.
fn split_bands(dir: &Path) {
    py(
        r#"
import sys, rasterio
src, d = sys.argv[1], sys.argv[2]
with rasterio.open(src) as s:
    a, p = s.read(), s.profile
p1 = dict(p, count=1)
for i, name in enumerate(["red", "green", "blue"]):
    with rasterio.open(f"{d}/LE07_{name}.tif", "w", **p1) as o:
        o.write(a[i:i + 1])
with rasterio.open(f"{d}/LE07_bgr.tif", "w", **p) as o:
    o.write(a[::-1])
"#,
        &[&geossl_tests::data::fixtures().join("rasterio/RGB.byte.tif"), dir],
    );
}

/// A STAC ItemCollection written here, its assets on the HTTP server: bands picked by name from single-band
/// assets and from a multi-band asset in another band order give the local scene's rows, dated by the items.
/// Failures by class: inputs that cannot be embedded (an item without a wanted band, a truncated COG) fail
/// alone, named, keeping none of their rows; run-level failures (a store unreachable through its retries, S3
/// without credentials) stop the run, which writes nothing.
#[test]
fn stac_items_and_bad_inputs() {
    let d = tempfile::tempdir().unwrap();
    let model = model(d.path());
    let m = model.to_str().unwrap();
    let moto = Moto::start();
    moto.bucket("archive");
    let bands = d.path().join("bands");
    std::fs::create_dir_all(&bands).unwrap();
    split_bands(&bands);
    for f in ["LE07_red.tif", "LE07_green.tif", "LE07_blue.tif", "LE07_bgr.tif"] {
        moto.put("archive", &format!("stac/assets/{f}"), &std::fs::read(bands.join(f)).unwrap());
    }
    let band = |name: &str| serde_json::json!({"name": name, "common_name": name});
    let item = |id: &str, date: &str, assets: serde_json::Value| {
        serde_json::json!({
            "type": "Feature", "stac_version": "1.0.0", "id": id,
            "stac_extensions": ["https://stac-extensions.github.io/eo/v1.1.0/schema.json"],
            "geometry": null, "bbox": [-78.96, 23.56, -76.57, 25.55],
            "properties": {"datetime": date}, "links": [], "assets": assets,
        })
    };
    let tif = "image/tiff; application=geotiff";
    let single = |f: &str, b: &str| serde_json::json!({"href": f, "type": tif, "eo:bands": [band(b)]});
    let collection = serde_json::json!({
        "type": "FeatureCollection",
        "features": [
            item("bands", "2001-02-03T04:05:06Z", serde_json::json!({
                "thumbnail": {"href": "assets/none.png", "type": "image/png"},
                "B1": single("assets/LE07_blue.tif", "blue"),
                "B2": single("assets/LE07_green.tif", "green"),
                "B3": single("assets/LE07_red.tif", "red"),
            })),
            item("stack", "2001-02-03T04:05:06Z", serde_json::json!({
                "visual": {"href": "assets/LE07_bgr.tif", "type": tif, "eo:bands": [band("blue"), band("green"), band("red")]},
            })),
            item("no-blue", "2001-02-03T04:05:06Z", serde_json::json!({
                "B2": single("assets/LE07_green.tif", "green"),
                "B3": single("assets/LE07_red.tif", "red"),
            })),
        ],
    });
    moto.put("archive", "stac/items.json", collection.to_string().as_bytes());
    // A COG cut short: its header is whole, its tiles are not.
    let cog = d.path().join("mosaic.tif");
    mosaic_cog(&cog);
    let bytes = std::fs::read(&cog).unwrap();
    moto.put("archive", "cut/mosaic.tif", &bytes[..bytes.len() * 6 / 10]);

    let local_out = d.path().join("local.parquet");
    let scene = geossl_tests::data::fixtures().join("rasterio/RGB.byte.tif");
    let o = out(serve(&["embed", "--model", m, "--input", scene.to_str().unwrap(), "--out"], &[]).arg(&local_out));
    assert!(o.status.success(), "{}", text(&o));
    let local = rows(&std::fs::read(&local_out).unwrap());

    let env = Moto::env(moto.addr);
    let stac = format!("http://{}/archive/stac/items.json", moto.addr);
    let got_out = d.path().join("stac.parquet");
    let inputs = format!("{stac},s3://archive/cut/mosaic.tif");
    let o = out(serve(&["embed", "--model", m, "--input", &inputs, "--out"], &env).arg(&got_out));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let got = rows(&std::fs::read(&got_out).unwrap());
    let date = 981_173_106_000_000i64; // 2001-02-03T04:05:06Z
                                       // The file's STAC Collection: one Item, dated by the rows (the STAC items' datetime), its sources the
                                       // items' assets.
    let v = stac_dataset(&d.path().join("stac.collection.json"));
    let item: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("stac.item.json")).unwrap()).unwrap();
    assert_eq!(item["properties"]["datetime"], "2001-02-03T04:05:06Z");
    assert_eq!(v["items"][0]["rows"], got.len());
    for id in ["bands", "stack"] {
        let mine = renamed(&got, id, "RGB.byte.tif");
        assert_eq!(without_dates(&mine), without_dates(&local), "STAC item {id} differs from the local scene");
        assert!(mine.values().all(|(_, _, dt)| *dt == Some(date)), "item {id}: rows not dated by the item");
    }
    assert!(t.contains("2 inputs failed"), "{t}");
    assert!(t.contains("no-blue") && t.contains("no asset has band blue"), "{t}");
    assert!(t.contains("s3://archive/cut/mosaic.tif") && t.contains("truncated"), "{t}");
    // The truncated COG's first windows were embedded before its tiles ran out; none of them is kept.
    assert_eq!(got.keys().filter(|(n, _)| n == "mosaic.tif").count(), 0, "rows of a failed input were kept");

    // A store that does not answer through its retries ends the run: named, nothing written.
    let unreachable = d.path().join("unreachable.parquet");
    let inputs = format!("{stac},http://127.0.0.1:1/unreachable.tif");
    let o =
        out(serve(&["embed", "--model", m, "--input", &inputs, "--retry-timeout-s", "1", "--out"], &env)
            .arg(&unreachable));
    let t = text(&o);
    assert!(!o.status.success() && t.contains("http://127.0.0.1:1/unreachable.tif"), "{t}");
    assert!(t.contains("nothing was written") && !unreachable.exists(), "{t}");
    assert!(t.contains("transient store failure; retrying"), "retried before giving up: {t}");

    // S3 without credentials ends the run too (every object of that store would fail alike).
    let nocreds = d.path().join("nocreds.parquet");
    let o = out(serve(
        &["embed", "--model", m, "--input", &format!("s3://archive/cut/mosaic.tif,{}", scene.display()), "--out"],
        &[("AWS_ENDPOINT", format!("http://{}", moto.addr)), ("AWS_ALLOW_HTTP", "true".into())],
    )
    .arg(&nocreds));
    let t = text(&o);
    assert!(!o.status.success() && t.contains("no AWS credentials") && !nocreds.exists(), "{t}");
    let leftovers: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("spool"))
        .collect();
    assert!(leftovers.is_empty(), "spool files left behind: {leftovers:?}");
}

/// A store outage in the middle of a shard: a proxy in front of the S3 server drops and cuts every
/// connection for a few seconds once the shard is reading. Within the retry time the shard rides it out
/// and completes every input; with a retry time shorter than the outage it fails, publishing nothing, and a
/// rerun completes. Either way `verify` then reports no failed input and the rows equal a local run.
#[test]
fn a_store_outage_mid_shard_loses_nothing() {
    let d = tempfile::tempdir().unwrap();
    let model = model(d.path());
    let m = model.to_str().unwrap();
    let moto = Moto::start();
    let (scene, local_dir) = scenes_in_s3_and_local(&moto, d.path(), 6);
    let local_out = d.path().join("local.parquet");
    let o = out(serve(&["embed", "--model", m, "--input", local_dir.to_str().unwrap(), "--out"], &[]).arg(&local_out));
    assert!(o.status.success(), "{}", text(&o));
    let local = rows(&std::fs::read(&local_out).unwrap());
    let proxy = CountingProxy::start(moto.addr);
    let env = Moto::env(proxy.addr);
    let o = out(serve(&["embed", "plan", "--input", "s3://archive/scenes/", "--out", "s3://archive/plan.json"], &env));
    assert!(o.status.success() && text(&o).contains("6 inputs"), "{}", text(&o));
    // Runs the shard into `ds` with `retry_s`; once it has read its first scene's worth, the store is down for
    // `outage`. Returns the shard's output.
    let shard_through_outage = |ds: &str, retry_s: &str, outage: std::time::Duration| {
        let mut c = serve(
            &["embed", "--model", m, "--plan", "s3://archive/plan.json", "--out", ds, "--retry-timeout-s", retry_s],
            &env,
        );
        let child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let start = proxy.received();
        let t0 = std::time::Instant::now();
        while proxy.received() < start + scene.len() as u64 && t0.elapsed() < std::time::Duration::from_secs(120) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        proxy.set_down(true);
        std::thread::sleep(outage);
        proxy.set_down(false);
        child.wait_with_output().unwrap()
    };
    let verify = |ds: &str| out(serve(&["embed", "verify", "--plan", "s3://archive/plan.json", "--dataset", ds], &env));
    let union = |ds: &str| -> Rows {
        moto.keys("archive", &format!("{ds}/part-"))
            .iter()
            .filter(|k| k.ends_with(".parquet"))
            .flat_map(|k| rows(&moto.get("archive", k).unwrap()))
            .collect()
    };

    // Within the retry time: retried through the outage, every input embedded.
    let o = shard_through_outage("s3://archive/ds", "60", std::time::Duration::from_secs(4));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("transient store failure; retrying"), "the outage did not hit the shard: {t}");
    let v = verify("s3://archive/ds");
    assert!(v.status.success() && text(&v).contains("(0 inputs failed)"), "{}", text(&v));
    assert_eq!(union("ds"), local, "rows after riding out the outage differ from the local run");

    // Shorter retry time than the outage: the shard fails and publishes nothing; a rerun completes it.
    let o = shard_through_outage("s3://archive/ds2", "1", std::time::Duration::from_secs(6));
    let t = text(&o);
    assert!(!o.status.success() && t.contains("published nothing"), "{t}");
    assert!(moto.keys("archive", "ds2/").is_empty(), "a failed shard published {:?}", moto.keys("archive", "ds2/"));
    let o = out(serve(&["embed", "--model", m, "--plan", "s3://archive/plan.json", "--out", "s3://archive/ds2"], &env));
    assert!(o.status.success(), "{}", text(&o));
    let v = verify("s3://archive/ds2");
    assert!(v.status.success() && text(&v).contains("(0 inputs failed)"), "{}", text(&v));
    assert_eq!(union("ds2"), local, "rows after the rerun differ from the local run");
}
