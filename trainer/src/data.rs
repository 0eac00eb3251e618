//! Training data: manifests of geo-located (and optionally time-stamped)
//! images, temporal partner sampling, and image decoding.
//!
//! Manifest formats:
//! * **CSV** (`format = "csv"`): header `path,lat,lon,timestamp,location_id[,label]`, one row per image.
//!   Images of one place share a `location_id`; that is what temporal positives use (never file names).
//! * **Geo-tagged images** (`format = "geo"`, GeoImageNet style): `path,lat,lon[,label]`, no timestamps;
//!   every image is its own location.
//! * **fMoW-RGB** (`format = "fmow"`, the manifest path is the dataset folder):
//!   `<split>/<category>/<category>_<id>/<category>_<id>_<n>_rgb.{jpg,json}`. Each JSON gives the
//!   timestamp, the bounding box and the location polygon (lat/lon = its vertex mean); the location id is
//!   the folder name `<category>_<id>`, the label the box's category, and the box is cut with context
//!   as the fMoW baseline does.
//!
//! Relative paths are resolved against the manifest's directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::rng::Rng;

/// One training image.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub path: PathBuf,
    pub lat: f64,
    pub lon: f64,
    /// ISO-8601 acquisition time, when known.
    pub timestamp: Option<String>,
    pub location_id: String,
    pub label: Option<String>,
    /// Pixel window `[x, y, w, h]` to cut before augmentation (fMoW boxes with context).
    pub crop: Option<[u32; 4]>,
}

/// Errors reading a manifest; each names the file and, where it applies, the line.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}:{line}: {msg}")]
    Row { path: PathBuf, line: u64, msg: String },
    #[error("{path}: {msg}")]
    Manifest { path: PathBuf, msg: String },
}

/// Manifest format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    Geo,
    Fmow,
}

/// Writes a CSV manifest (`path,lat,lon,timestamp,location_id[,label]`) with paths relative to its folder
/// (the label column when any sample has a label), atomically; returns its path.
pub fn write_manifest(samples: &[Sample], path: &Path) -> Result<PathBuf, DataError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let labelled = samples.iter().any(|c| c.label.is_some());
    let mut s = String::from(if labelled {
        "path,lat,lon,timestamp,location_id,label\n"
    } else {
        "path,lat,lon,timestamp,location_id\n"
    });
    for c in samples {
        let rel = c.path.strip_prefix(dir).unwrap_or(&c.path);
        s.push_str(&format!(
            "{},{:.7},{:.7},{},{}",
            rel.display(),
            c.lat,
            c.lon,
            c.timestamp.as_deref().unwrap_or(""),
            c.location_id
        ));
        if labelled {
            s.push(',');
            s.push_str(c.label.as_deref().unwrap_or(""));
        }
        s.push('\n');
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, s).and_then(|()| std::fs::rename(&tmp, path)).map_err(|error| {
        let _ = std::fs::remove_file(&tmp);
        DataError::Io { path: path.to_owned(), error }
    })?;
    Ok(path.to_owned())
}

/// Reads a manifest. Rows with a bad latitude/longitude or an empty path are errors (with their line).
pub fn read_manifest(path: &Path, format: Format) -> Result<Vec<Sample>, DataError> {
    if format == Format::Fmow {
        return read_fmow(path);
    }
    let base = path.parent().unwrap_or(Path::new(".")).to_owned();
    let mut rdr = csv::ReaderBuilder::new().trim(csv::Trim::All).from_path(path).map_err(|e| match e.into_kind() {
        csv::ErrorKind::Io(error) => DataError::Io { path: path.to_owned(), error },
        other => DataError::Manifest { path: path.to_owned(), msg: format!("{other:?}") },
    })?;
    let header = rdr.headers().map_err(|e| DataError::Manifest { path: path.to_owned(), msg: e.to_string() })?.clone();
    let col = |name: &str| header.iter().position(|h| h.eq_ignore_ascii_case(name));
    let need = |name: &str| {
        col(name).ok_or_else(|| DataError::Manifest {
            path: path.to_owned(),
            msg: format!("missing column `{name}` (header is `{}`)", header.iter().collect::<Vec<_>>().join(",")),
        })
    };
    let (c_path, c_lat, c_lon) = (need("path")?, need("lat")?, need("lon")?);
    let (c_time, c_loc) = match format {
        Format::Csv => (Some(need("timestamp")?), Some(need("location_id")?)),
        Format::Geo | Format::Fmow => (None, None),
    };
    let c_label = col("label");
    let mut out = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| DataError::Manifest { path: path.to_owned(), msg: e.to_string() })?;
        let line = rec.position().map_or(0, |p| p.line());
        let row = |msg: String| DataError::Row { path: path.to_owned(), line, msg };
        let get = |c: usize| rec.get(c).unwrap_or("").to_string();
        let p = get(c_path);
        if p.is_empty() {
            return Err(row("empty path".into()));
        }
        let num = |c: usize, what: &str, lim: f64| -> Result<f64, DataError> {
            let s = get(c);
            let v: f64 = s.parse().map_err(|_| row(format!("{what} `{s}` is not a number")))?;
            if !v.is_finite() || v.abs() > lim {
                return Err(row(format!("{what} {v} is outside ±{lim}")));
            }
            Ok(v)
        };
        let lat = num(c_lat, "lat", 90.0)?;
        let lon = num(c_lon, "lon", 180.0)?;
        let full = if Path::new(&p).is_absolute() { PathBuf::from(&p) } else { base.join(&p) };
        let timestamp = c_time.map(get).filter(|s| !s.is_empty());
        let location_id = match c_loc.map(get) {
            Some(l) if !l.is_empty() => l,
            Some(_) => return Err(row("empty location_id".into())),
            None => p.clone(),
        };
        let label = c_label.map(get).filter(|s| !s.is_empty());
        out.push(Sample { path: full, lat, lon, timestamp, location_id, label, crop: None });
    }
    if out.is_empty() {
        return Err(DataError::Manifest { path: path.to_owned(), msg: "no rows".into() });
    }
    Ok(out)
}

/// Reads an fMoW-RGB folder (any split folders below `root`); see the module docs.
pub fn read_fmow(root: &Path) -> Result<Vec<Sample>, DataError> {
    let mut jsons = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let rd = std::fs::read_dir(&dir).map_err(|error| DataError::Io { path: dir.clone(), error })?;
        for e in rd {
            let p = e.map_err(|error| DataError::Io { path: dir.clone(), error })?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with("_rgb.json") {
                jsons.push(p);
            }
        }
    }
    jsons.sort();
    let mut out = Vec::with_capacity(jsons.len());
    for j in jsons {
        out.push(fmow_sample(&j)?);
    }
    if out.is_empty() {
        return Err(DataError::Manifest {
            path: root.to_owned(),
            msg: "no *_rgb.json files: not an fMoW-RGB folder".into(),
        });
    }
    Ok(out)
}

fn fmow_sample(json: &Path) -> Result<Sample, DataError> {
    let bad = |msg: String| DataError::Manifest { path: json.to_owned(), msg };
    let text = std::fs::read_to_string(json).map_err(|error| DataError::Io { path: json.to_owned(), error })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let bb = v["bounding_boxes"].as_array().and_then(|a| a.first()).ok_or_else(|| bad("no bounding_boxes".into()))?;
    let bx: Vec<u32> = bb["box"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_f64()).map(|x| x.max(0.0) as u32).collect())
        .unwrap_or_default();
    if bx.len() != 4 || bx[2] == 0 || bx[3] == 0 {
        return Err(bad("bounding box is not [x, y, w, h]".into()));
    }
    let wkt = bb["raw_location"]
        .as_str()
        .or(v["raw_location"].as_str())
        .ok_or_else(|| bad("no raw_location polygon".into()))?;
    let (lat, lon) = polygon_centre(wkt).ok_or_else(|| bad(format!("cannot read location polygon `{wkt}`")))?;
    let (iw, ih) = (v["img_width"].as_u64().unwrap_or(0) as u32, v["img_height"].as_u64().unwrap_or(0) as u32);
    let crop = fmow_context_box([bx[0], bx[1], bx[2], bx[3]], iw, ih);
    let stem = json.to_string_lossy().trim_end_matches(".json").to_string();
    let path = ["jpg", "png", "tif"]
        .iter()
        .map(|e| PathBuf::from(format!("{stem}.{e}")))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(format!("{stem}.jpg")));
    let location_id = json
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| bad("no parent folder".into()))?;
    Ok(Sample {
        path,
        lat,
        lon,
        timestamp: v["timestamp"].as_str().map(str::to_string),
        location_id,
        label: bb["category"].as_str().map(str::to_string),
        crop: Some(crop),
    })
}

/// Mean of a WKT polygon's vertices (without the closing repeat) as (lat, lon).
fn polygon_centre(wkt: &str) -> Option<(f64, f64)> {
    let inner = wkt.split('(').next_back()?.split(')').next()?;
    let mut pts: Vec<(f64, f64)> = inner
        .split(',')
        .filter_map(|p| {
            let mut it = p.split_whitespace().map(|x| x.parse::<f64>());
            Some((it.next()?.ok()?, it.next()?.ok()?))
        })
        .collect();
    if pts.len() > 1 && pts.first() == pts.last() {
        pts.pop();
    }
    if pts.is_empty() {
        return None;
    }
    let n = pts.len() as f64;
    let (lon, lat) = pts.iter().fold((0.0, 0.0), |a, p| (a.0 + p.0 / n, a.1 + p.1 / n));
    ((-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon)).then_some((lat, lon))
}

/// The fMoW baseline's context around a box `[x, y, w, h]`: smaller boxes get
/// relatively more context; clamped to the image when its size is known.
pub fn fmow_context_box(b: [u32; 4], img_w: u32, img_h: u32) -> [u32; 4] {
    let mult = |ratio: f64| match ratio {
        r if r >= 0.5 => 0.15,
        r if r >= 0.4 => 0.2,
        r if r >= 0.3 => 0.3,
        r if r >= 0.2 => 0.5,
        r if r >= 0.1 => 1.0,
        _ => 2.0,
    };
    let (x, y, w, h) = (b[0] as f64, b[1] as f64, b[2] as f64, b[3] as f64);
    let wr = if img_w > 0 { w / img_w as f64 } else { 1.0 };
    let hr = if img_h > 0 { h / img_h as f64 } else { 1.0 };
    let (bw, bh) = ((w * mult(wr) / 2.0).floor(), (h * mult(hr) / 2.0).floor());
    let (x0, y0) = ((x - bw).max(0.0), (y - bh).max(0.0));
    let (mut x1, mut y1) = (x + w + bw, y + h + bh);
    if img_w > 0 {
        x1 = x1.min(img_w as f64);
    }
    if img_h > 0 {
        y1 = y1.min(img_h as f64);
    }
    [x0 as u32, y0 as u32, (x1 - x0).max(1.0) as u32, (y1 - y0).max(1.0) as u32]
}

/// Images grouped by location, for temporal positives.
#[derive(Debug, Clone)]
pub struct TemporalIndex {
    group_of: Vec<usize>,
    groups: Vec<Vec<usize>>,
}

impl TemporalIndex {
    pub fn new(samples: &[Sample]) -> Self {
        let mut ids: HashMap<&str, usize> = HashMap::new();
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut group_of = Vec::with_capacity(samples.len());
        for (i, s) in samples.iter().enumerate() {
            let g = *ids.entry(s.location_id.as_str()).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[g].push(i);
            group_of.push(g);
        }
        Self { group_of, groups }
    }

    pub fn num_locations(&self) -> usize {
        self.groups.len()
    }

    /// Fraction of images that have at least one partner taken at another time.
    pub fn partner_coverage(&self, samples: &[Sample]) -> f64 {
        let n = (0..samples.len()).filter(|&i| self.candidates(i, samples).next().is_some()).count();
        n as f64 / samples.len().max(1) as f64
    }

    fn candidates<'a>(&'a self, anchor: usize, samples: &'a [Sample]) -> impl Iterator<Item = usize> + 'a {
        let t = samples[anchor].timestamp.as_deref();
        self.groups[self.group_of[anchor]].iter().copied().filter(move |&j| {
            j != anchor
                && match (t, samples[j].timestamp.as_deref()) {
                    (Some(a), Some(b)) => a != b,
                    _ => true,
                }
        })
    }

    /// A partner of `anchor`: another image of the same location taken at a
    /// different time, drawn uniformly; `None` when there is none (the caller
    /// then uses a second augmentation of the anchor itself).
    pub fn partner(&self, anchor: usize, samples: &[Sample], rng: &mut Rng) -> Option<usize> {
        let c: Vec<usize> = self.candidates(anchor, samples).collect();
        (!c.is_empty()).then(|| c[rng.below(c.len())])
    }
}

/// Counts of anchors with a real temporal partner, for logging.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PairStats {
    pub anchors: u64,
    pub with_partner: u64,
}

impl PairStats {
    pub fn rate(&self) -> f64 {
        self.with_partner as f64 / self.anchors.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(loc: &str, t: Option<&str>) -> Sample {
        Sample {
            path: format!("{loc}-{t:?}.png").into(),
            lat: 0.0,
            lon: 0.0,
            timestamp: t.map(str::to_string),
            location_id: loc.into(),
            label: None,
            crop: None,
        }
    }

    #[test]
    fn partner_is_another_time_of_the_same_place() {
        let samples = vec![
            s("a", Some("2015-01-01")),
            s("a", Some("2016-01-01")),
            s("a", Some("2017-01-01")),
            s("b", Some("2015-01-01")),
            s("c", Some("2015-01-01")),
            s("c", Some("2015-01-01")), // same time: not a temporal partner
        ];
        let idx = TemporalIndex::new(&samples);
        assert_eq!(idx.num_locations(), 3);
        let mut rng = Rng::new(0);
        let mut seen = [0usize; 3];
        for _ in 0..3000 {
            let p = idx.partner(0, &samples, &mut rng).unwrap();
            assert!(p == 1 || p == 2, "partner {p} of anchor 0");
            seen[p] += 1;
        }
        assert!(seen[1] > 1300 && seen[2] > 1300, "uniform over partners: {seen:?}");
        assert_eq!(idx.partner(3, &samples, &mut rng), None, "single image: fallback");
        assert_eq!(idx.partner(4, &samples, &mut rng), None, "same timestamp: fallback");
        assert!((idx.partner_coverage(&samples) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn fmow_layout_is_read_with_ids_times_and_context_boxes() {
        let dir = tempfile::tempdir().unwrap();
        let write = |cat: &str, id: u32, n: u32, t: &str| {
            let d = dir.path().join("train").join(cat).join(format!("{cat}_{id}"));
            std::fs::create_dir_all(&d).unwrap();
            let stem = d.join(format!("{cat}_{id}_{n}_rgb"));
            let j = serde_json::json!({
                "img_width": 1000, "img_height": 800, "timestamp": t,
                "bounding_boxes": [{"box": [400, 300, 50, 40], "category": cat, "ID": 1,
                    "raw_location": "POLYGON ((10.0 45.0, 10.2 45.0, 10.2 45.2, 10.0 45.2, 10.0 45.0))"}]
            });
            std::fs::write(stem.with_extension("json"), j.to_string()).unwrap();
            std::fs::write(stem.with_extension("jpg"), b"").unwrap();
        };
        write("airport", 7, 0, "2015-05-08T15:08:38Z");
        write("airport", 7, 1, "2016-05-08T15:08:38Z");
        write("port", 2, 0, "2017-01-01T00:00:00Z");
        let v = read_manifest(dir.path(), Format::Fmow).unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].location_id, "airport_7");
        assert_eq!(v[0].label.as_deref(), Some("airport"));
        assert!((v[0].lat - 45.1).abs() < 1e-9 && (v[0].lon - 10.1).abs() < 1e-9);
        assert!(v[0].path.to_string_lossy().ends_with("airport_7_0_rgb.jpg"));
        // 50 px of 1000 is < 10 %: twice the box as context, 50 px each side.
        assert_eq!(v[0].crop, Some([350, 260, 150, 120]));
        let idx = TemporalIndex::new(&v);
        assert_eq!(idx.partner(0, &v, &mut Rng::new(0)), Some(1));
        assert_eq!(idx.partner(2, &v, &mut Rng::new(0)), None);
        assert!(read_manifest(&dir.path().join("train/port"), Format::Fmow).is_ok());
        let e = read_fmow(tempfile::tempdir().unwrap().path()).unwrap_err().to_string();
        assert!(e.contains("not an fMoW-RGB folder"), "{e}");
    }

    #[test]
    fn context_box_is_clamped_to_the_image() {
        assert_eq!(fmow_context_box([0, 0, 900, 700], 1000, 800), [0, 0, 967, 752]);
        assert_eq!(fmow_context_box([990, 790, 10, 10], 1000, 800), [980, 780, 20, 20]);
    }

    #[test]
    fn manifest_parses_and_names_bad_rows() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("m.csv");
        std::fs::write(&m, "path,lat,lon,timestamp,location_id,label\nx/1.png,45.1,14.5,2015-07-11,loc1,forest\n/abs/2.png,-3,170,,loc2,\n").unwrap();
        let v = read_manifest(&m, Format::Csv).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].path, dir.path().join("x/1.png"));
        assert_eq!(v[0].label.as_deref(), Some("forest"));
        assert_eq!(v[1].timestamp, None);
        assert_eq!(v[1].path, PathBuf::from("/abs/2.png"));

        std::fs::write(&m, "path,lat,lon,timestamp,location_id\na.png,95,0,t,l\n").unwrap();
        let e = read_manifest(&m, Format::Csv).unwrap_err().to_string();
        assert!(e.contains("m.csv:2") && e.contains("lat 95"), "{e}");
        std::fs::write(&m, "path,lat,lon\na.png,1,x\n").unwrap();
        let e = read_manifest(&m, Format::Csv).unwrap_err().to_string();
        assert!(e.contains("missing column `timestamp`"), "{e}");
        let e = read_manifest(&m, Format::Geo).unwrap_err().to_string();
        assert!(e.contains("lon `x` is not a number"), "{e}");
        std::fs::write(&m, "path,lat,lon\n").unwrap();
        assert!(read_manifest(&m, Format::Geo).unwrap_err().to_string().contains("no rows"));
        let e = read_manifest(&dir.path().join("none.csv"), Format::Geo).unwrap_err().to_string();
        assert!(e.contains("none.csv"), "{e}");
    }
}
