//! Training data: manifests of geo-located (and optionally time-stamped)
//! images, temporal partner sampling, and image decoding.
//!
//! Manifest formats:
//! * **CSV** (`format = "csv"`): header `path,lat,lon,timestamp,location_id[,label]`, one row per image.
//!   Images of one place share a `location_id`; that is what temporal positives use (never file names).
//! * **Geo-tagged images** (`format = "geo"`, GeoImageNet style): `path,lat,lon[,label]`, no timestamps;
//!   every image is its own location.
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
}

/// Reads a manifest. Rows with a bad latitude/longitude or an empty path are errors (with their line).
pub fn read_manifest(path: &Path, format: Format) -> Result<Vec<Sample>, DataError> {
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
        Format::Geo => (None, None),
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
        out.push(Sample { path: full, lat, lon, timestamp, location_id, label });
    }
    if out.is_empty() {
        return Err(DataError::Manifest { path: path.to_owned(), msg: "no rows".into() });
    }
    Ok(out)
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
