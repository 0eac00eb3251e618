//! Queries over an [`Index`]: nearest neighbours of a chip, a point, an embedding or several positive
//! examples, under exact filters; and the quick classifier.
//!
//! Filters are exact: a row is an answer only if it passes every filter. A filter that admits few rows
//! (at most [`EXACT_BUDGET`] vector elements in all) is answered by brute force over the admitted rows;
//! otherwise the HNSW graph is searched with the filter as a predicate, and when that finds fewer than k
//! answers while k pass the filter, by brute force over them — so a filtered query returns k answers when k
//! exist.

use serde::Serialize;

use super::index::{normalized, Index};
use super::{simd, SearchError};

/// The most answers one query returns.
pub const MAX_K: usize = 10_000;
/// Admitted rows × dimensions at or below which a filtered query is answered by brute force (by default:
/// 32 768 rows of 512 dimensions, a few milliseconds).
pub const EXACT_BUDGET: usize = 1 << 24;

/// A chip named by its id, or by a lon/lat point inside it.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    Chip(String),
    Point { lon: f64, lat: f64 },
}

/// What to search for.
#[derive(Debug, Clone, PartialEq)]
pub enum Query {
    /// A chip of the index, or the chip containing a point.
    Example(Example),
    /// An embedding of the index's model (any norm).
    Embedding(Vec<f32>),
    /// The mean direction of several chips.
    Examples(Vec<Example>),
}

/// `[start, end]` in µs since 1970 (UTC); an open end is `None`.
pub type Interval = (Option<i64>, Option<i64>);

/// Exact filters on the answers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filters {
    /// `[xmin, ymin, xmax, ymax]` (lon/lat): answers whose footprint's bbox intersects it (`xmin > xmax`
    /// crosses the antimeridian).
    pub bbox: Option<[f64; 4]>,
    /// Answers whose datetime lies in it (rows without one are left out).
    pub datetime: Option<Interval>,
    /// Leave out answers from the query chips' scenes (their `source`).
    pub exclude_own_scene: bool,
    /// Keep answers whose footprint overlaps a query chip's (left out by default: the same pixels).
    pub keep_overlapping: bool,
}

/// One answer: its key and score (cosine similarity for searches, the classifier's decision value for
/// classifications).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Hit {
    pub key: u64,
    pub score: f64,
}

/// A classifier and its ranking.
#[derive(Debug, Clone)]
pub struct Classified {
    pub model: geossl_eval::logistic::Logistic,
    /// By decision value `w·x + b` (x the normalized embedding), highest first.
    pub hits: Vec<Hit>,
    pub positives: Vec<u64>,
    pub negatives: Vec<u64>,
}

/// `"xmin,ymin,xmax,ymax"`.
pub fn parse_bbox(s: &str) -> Result<[f64; 4], SearchError> {
    let v: Vec<f64> = s
        .split(',')
        .map(|x| x.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|_| SearchError::BadQuery(format!("bbox {s:?}: want four numbers xmin,ymin,xmax,ymax")))?;
    let b: [f64; 4] = v
        .try_into()
        .map_err(|_| SearchError::BadQuery(format!("bbox {s:?}: want four numbers xmin,ymin,xmax,ymax")))?;
    check_bbox(b)
}

/// Checks a bbox in lon/lat.
pub fn check_bbox(b: [f64; 4]) -> Result<[f64; 4], SearchError> {
    let lon = |x: f64| (-180.0..=180.0).contains(&x);
    let lat = |y: f64| (-90.0..=90.0).contains(&y);
    if !(lon(b[0]) && lon(b[2]) && lat(b[1]) && lat(b[3])) {
        return Err(SearchError::BadQuery(format!(
            "bbox {b:?}: longitudes must lie in [-180, 180] and latitudes in [-90, 90]"
        )));
    }
    if b[1] > b[3] {
        return Err(SearchError::BadQuery(format!("bbox {b:?}: ymin {} is above ymax {}", b[1], b[3])));
    }
    Ok(b)
}

/// `"lon,lat"`.
pub fn parse_point(s: &str) -> Result<(f64, f64), SearchError> {
    let v: Vec<f64> = s.split(',').map(|x| x.trim().parse::<f64>()).collect::<Result<_, _>>().unwrap_or_default();
    match v[..] {
        [lon, lat] if (-180.0..=180.0).contains(&lon) && (-90.0..=90.0).contains(&lat) => Ok((lon, lat)),
        _ => Err(SearchError::BadQuery(format!(
            "point {s:?}: want lon,lat in degrees (lon in [-180, 180], lat in [-90, 90])"
        ))),
    }
}

/// An RFC 3339 datetime, or an interval `start/end` with `..` (or nothing) for an open end (STAC API).
pub fn parse_datetime(s: &str) -> Result<Interval, SearchError> {
    let one = |t: &str| -> Result<Option<i64>, SearchError> {
        let t = t.trim();
        if t.is_empty() || t == ".." {
            return Ok(None);
        }
        chrono::DateTime::parse_from_rfc3339(t).map(|d| Some(d.timestamp_micros())).map_err(|e| {
            SearchError::BadQuery(format!("datetime {t:?}: not RFC 3339 ({e}), e.g. 2020-06-01T00:00:00Z"))
        })
    };
    let (a, z) = match s.split_once('/') {
        Some((a, z)) => (one(a)?, one(z)?),
        None => {
            let t = one(s)?;
            if t.is_none() {
                return Err(SearchError::BadQuery(format!("datetime {s:?}: give a datetime or an interval start/end")));
            }
            (t, t)
        }
    };
    if let (Some(a), Some(z)) = (a, z) {
        if a > z {
            return Err(SearchError::BadQuery(format!("datetime {s:?}: the interval ends before it starts")));
        }
    }
    Ok((a, z))
}

fn check_k(k: usize) -> Result<(), SearchError> {
    if k == 0 || k > MAX_K {
        return Err(SearchError::BadQuery(format!("k = {k}: ask for 1 to {MAX_K} answers")));
    }
    Ok(())
}

fn overlaps(a: &[f64; 4], b: &[f64; 4]) -> bool {
    a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3]
}

/// Whether `p` lies inside the closed ring (even-odd rule; points on the boundary count).
fn in_ring(ring: &[(f64, f64)], (x, y): (f64, f64)) -> bool {
    let mut inside = false;
    for w in ring.windows(2) {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        // On an edge.
        let cross = (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0);
        if cross.abs() <= 1e-12 * (1.0 + x.abs() + y.abs())
            && x >= x0.min(x1)
            && x <= x0.max(x1)
            && y >= y0.min(y1)
            && y <= y0.max(y1)
        {
            return true;
        }
        if (y0 > y) != (y1 > y) && x < x0 + (y - y0) * (x1 - x0) / (y1 - y0) {
            inside = !inside;
        }
    }
    inside
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum()
}

/// The top `k` of `hits` by score (then key), highest first.
fn top(mut hits: Vec<Hit>, k: usize) -> Vec<Hit> {
    let order = |a: &Hit, b: &Hit| b.score.total_cmp(&a.score).then(a.key.cmp(&b.key));
    if hits.len() > k {
        hits.select_nth_unstable_by(k, order);
        hits.truncate(k);
    }
    hits.sort_by(order);
    hits
}

impl Index {
    /// The key of an example: a chip id of the index, or the chip whose footprint contains the point (of
    /// several overlapping windows, the one whose centre is nearest).
    pub fn resolve(&self, e: &Example) -> Result<u64, SearchError> {
        match e {
            Example::Chip(id) => self
                .key_of(id)
                .ok_or_else(|| SearchError::NotFound(format!("chip id {id:?} is not in index {}", self.location))),
            Example::Point { lon, lat } => {
                let p = (*lon, *lat);
                let mut best: Option<(f64, u64)> = None;
                for (key, b) in self.bbox.iter().enumerate() {
                    if p.0 < b[0] || p.0 > b[2] || p.1 < b[1] || p.1 > b[3] {
                        continue;
                    }
                    let key = key as u64;
                    if !in_ring(&self.ring(key), p) {
                        continue;
                    }
                    let c = self.center[key as usize];
                    let d = (c.0 - p.0).powi(2) + (c.1 - p.1).powi(2);
                    if best.is_none_or(|(bd, bk)| d < bd || (d == bd && key < bk)) {
                        best = Some((d, key));
                    }
                }
                best.map(|(_, k)| k).ok_or_else(|| {
                    SearchError::NotFound(format!(
                        "point ({lon}, {lat}) lies outside every chip of index {}",
                        self.location
                    ))
                })
            }
        }
    }

    /// The normalized query vector and the chips it came from.
    fn query_vector(&self, q: &Query) -> Result<(Vec<f32>, Vec<u64>), SearchError> {
        match q {
            Query::Example(e) => {
                let key = self.resolve(e)?;
                Ok((self.vector(key)?, vec![key]))
            }
            Query::Embedding(v) => {
                if v.len() != self.dimensions() {
                    return Err(SearchError::BadQuery(format!(
                        "the embedding has {} values; index {} holds {}-dimensional embeddings",
                        v.len(),
                        self.location,
                        self.dimensions()
                    )));
                }
                if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                    return Err(SearchError::BadQuery(format!("embedding value {i} is not a finite number")));
                }
                if v.iter().all(|&x| x == 0.0) {
                    return Err(SearchError::BadQuery("the embedding is all zeros: it has no direction".into()));
                }
                Ok((normalized(v), Vec::new()))
            }
            Query::Examples(es) => {
                if es.is_empty() {
                    return Err(SearchError::BadQuery("no examples given".into()));
                }
                let keys = es.iter().map(|e| self.resolve(e)).collect::<Result<Vec<_>, _>>()?;
                let mut sum = vec![0f32; self.dimensions()];
                for &k in &keys {
                    for (s, v) in sum.iter_mut().zip(self.vector(k)?) {
                        *s += v;
                    }
                }
                if sum.iter().all(|&x| x == 0.0) {
                    return Err(SearchError::BadQuery(
                        "the examples' embeddings cancel out: no direction to search".into(),
                    ));
                }
                Ok((normalized(&sum), keys))
            }
        }
    }

    /// Whether `key` passes `f` for a query from `anchors` (never one of the anchors).
    fn admits(&self, key: u64, f: &Filters, anchors: &[u64]) -> bool {
        let i = key as usize;
        if i >= self.len() || anchors.contains(&key) {
            return false;
        }
        if let Some(b) = &f.bbox {
            let r = &self.bbox[i];
            let lat = r[1] <= b[3] && b[1] <= r[3];
            let lon = if b[0] <= b[2] { r[0] <= b[2] && b[0] <= r[2] } else { r[2] >= b[0] || r[0] <= b[2] };
            if !(lat && lon) {
                return false;
            }
        }
        if let Some((a, z)) = f.datetime {
            match self.datetime_of(i as u64) {
                Some(t) if a.is_none_or(|a| t >= a) && z.is_none_or(|z| t <= z) => {}
                _ => return false,
            }
        }
        if f.exclude_own_scene && anchors.iter().any(|&a| self.source[a as usize] == self.source[i]) {
            return false;
        }
        if !f.keep_overlapping && anchors.iter().any(|&a| overlaps(&self.bbox[a as usize], &self.bbox[i])) {
            return false;
        }
        true
    }

    /// How many candidates a search for `k` answers keeps: `k`, or with a float32 copy to re-score them,
    /// `k` times the candidates per answer (at most the graph's expansion, at least `k`).
    fn candidates(&self, k: usize) -> usize {
        match self.copy {
            Some(_) => k.saturating_mul(self.rerank_per_answer).min(self.expansion).max(k),
            None => k,
        }
    }

    /// The best `k` of `hits` for the normalized `q`, re-scored by the float32 copy when the index keeps one.
    fn refine(&self, q: &[f32], mut hits: Vec<Hit>, k: usize) -> Result<Vec<Hit>, SearchError> {
        if let Some(copy) = &self.copy {
            for h in &mut hits {
                h.score = f64::from(simd::dot_f32(self.vectors.simd(), q, copy.row(h.key)?));
            }
        }
        Ok(top(hits, k))
    }

    /// Brute force: the top `k` of `keys` by cosine similarity to the normalized `q` (over the vectors as
    /// the graph stores them; the best candidates re-scored by the float32 copy when the index keeps one).
    pub fn exact(&self, q: &[f32], k: usize, keys: impl Iterator<Item = u64>) -> Result<Vec<Hit>, SearchError> {
        // One buffer for every row: the cosine is q · v / |v| (q is a unit vector), in f64.
        let mut v = vec![0f32; self.dimensions()];
        let mut hits = Vec::new();
        for key in keys {
            self.stored(key, &mut v)?;
            let norm = dot(&v, &v).sqrt();
            hits.push(Hit { key, score: if norm == 0.0 { 0.0 } else { dot(q, &v) / norm } });
        }
        self.refine(q, top(hits, self.candidates(k)), k)
    }

    /// The top `k` rows by cosine similarity to the normalized `q` that pass `f` (anchors: the query's
    /// chips).
    fn ranked(&self, q: &[f32], k: usize, f: &Filters, anchors: &[u64]) -> Result<Vec<Hit>, SearchError> {
        let n = self.len();
        let admit = |key: u64| self.admits(key, f, anchors);
        let selective = f.bbox.is_some() || f.datetime.is_some() || f.exclude_own_scene;
        let admitted: Option<Vec<u64>> = selective.then(|| (0..n as u64).filter(|&key| admit(key)).collect());
        if let Some(keys) = &admitted {
            if keys.len() <= k || keys.len() * self.dimensions() <= self.exact_budget {
                return self.exact(q, k, keys.iter().copied());
            }
        }
        // The graph search keeps max(k, expansion) candidates and gives back the best (to re-score).
        let count = self.candidates(k);
        let found = if anchors.is_empty() && !selective {
            self.graph_search(q, count, None)
        } else {
            self.graph_search(q, count, Some(&admit))
        };
        let hits: Vec<Hit> = found.into_iter().map(|(key, score)| Hit { key, score: f64::from(score) }).collect();
        if hits.len() < k {
            // The graph ran out before k passed: brute force over every admitted row.
            let keys: Vec<u64> = match admitted {
                Some(keys) => keys,
                None => (0..n as u64).filter(|&key| admit(key)).collect(),
            };
            if keys.len() > hits.len() {
                return self.exact(q, k, keys.into_iter());
            }
        }
        self.refine(q, hits, k)
    }

    /// The `k` nearest rows to `q` that pass `f`, highest cosine similarity first.
    pub fn search(&self, q: &Query, k: usize, f: &Filters) -> Result<Vec<Hit>, SearchError> {
        check_k(k)?;
        let (v, anchors) = self.query_vector(q)?;
        if f.exclude_own_scene && anchors.is_empty() {
            return Err(SearchError::BadQuery(
                "exclude_own_scene needs a query chip (an id or a point): an embedding has no scene".into(),
            ));
        }
        self.ranked(&v, k, f, &anchors)
    }

    /// Fits a logistic regression (scikit-learn's objective with inverse regularization `c`) on the
    /// normalized embeddings of `positives` (label 1) and `negatives` (label 0) and ranks the index's rows
    /// that pass `f` by its decision value, `n` best first. The labelled chips are never answers.
    pub fn classify(
        &self,
        positives: &[Example],
        negatives: &[Example],
        c: f64,
        n: usize,
        f: &Filters,
    ) -> Result<Classified, SearchError> {
        check_k(n)?;
        if f.exclude_own_scene {
            return Err(SearchError::BadQuery(
                "exclude_own_scene is a search filter: a classifier has no query scene".into(),
            ));
        }
        if positives.is_empty() || negatives.is_empty() {
            return Err(SearchError::BadQuery(format!(
                "the classifier needs positive and negative examples (got {} and {})",
                positives.len(),
                negatives.len()
            )));
        }
        let pos = positives.iter().map(|e| self.resolve(e)).collect::<Result<Vec<_>, _>>()?;
        let neg = negatives.iter().map(|e| self.resolve(e)).collect::<Result<Vec<_>, _>>()?;
        if let Some(k) = pos.iter().find(|k| neg.contains(k)) {
            return Err(SearchError::BadQuery(format!(
                "chip {} is both a positive and a negative example",
                self.chip_id(*k)
            )));
        }
        let d = self.dimensions();
        let mut x = Vec::with_capacity((pos.len() + neg.len()) * d);
        let mut y = Vec::new();
        for (&key, label) in pos.iter().map(|k| (k, 1)).chain(neg.iter().map(|k| (k, 0))) {
            x.extend(self.vector(key)?);
            y.push(label);
        }
        let options = geossl_eval::logistic::FitOptions { c, ..Default::default() };
        let model =
            geossl_eval::logistic::fit(&x, d, &y, 2, options).map_err(|e| SearchError::BadQuery(e.to_string()))?;
        let w: Vec<f32> = model.weights.iter().map(|&v| v as f32).collect();
        if w.iter().all(|&v| v == 0.0) {
            return Err(SearchError::BadQuery(
                "the classifier learned nothing (the examples' embeddings are identical)".into(),
            ));
        }
        // Rows by w·x + b: for unit x, the same order as cosine similarity to w.
        let anchors: Vec<u64> = pos.iter().chain(&neg).copied().collect();
        let f = Filters { keep_overlapping: true, ..f.clone() };
        let q = normalized(&w);
        let ranked = self.ranked(&q, n, &f, &anchors)?;
        let mut hits = Vec::with_capacity(ranked.len());
        for h in ranked {
            let v = self.vector(h.key)?;
            let score =
                model.weights.iter().zip(&v).map(|(&w, &x)| w * f64::from(x)).sum::<f64>() + model.intercepts[0];
            hits.push(Hit { key: h.key, score });
        }
        let hits = top(hits, n);
        Ok(Classified { model, hits, positives: pos, negatives: neg })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_by_name() {
        assert_eq!(parse_bbox("1,2,3,4").unwrap(), [1.0, 2.0, 3.0, 4.0]);
        assert!(parse_bbox("1,2,3").unwrap_err().to_string().contains("four numbers"));
        assert!(parse_bbox("0,5,1,4").unwrap_err().to_string().contains("ymin"));
        assert!(parse_bbox("0,0,200,1").unwrap_err().to_string().contains("[-180, 180]"));
        assert_eq!(parse_point("-78.5, 35.7").unwrap(), (-78.5, 35.7));
        assert!(parse_point("1").is_err() && parse_point("1,95").is_err());
        let (a, z) = parse_datetime("2020-01-01T00:00:00Z/..").unwrap();
        assert_eq!((a, z), (Some(1_577_836_800_000_000), None));
        assert!(parse_datetime("2021-01-01T00:00:00Z/2020-01-01T00:00:00Z")
            .unwrap_err()
            .to_string()
            .contains("ends before"));
        assert!(parse_datetime("yesterday").unwrap_err().to_string().contains("RFC 3339"));
        assert!(check_k(0).is_err() && check_k(MAX_K + 1).is_err() && check_k(1).is_ok());
    }

    #[test]
    fn points_on_and_inside_rings() {
        let sq = [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0), (0.0, 0.0)];
        assert!(in_ring(&sq, (0.5, 0.5)) && in_ring(&sq, (1.0, 0.5)) && in_ring(&sq, (0.0, 0.0)));
        assert!(!in_ring(&sq, (1.5, 0.5)) && !in_ring(&sq, (0.5, -0.01)));
    }

    #[test]
    fn top_orders_by_score_then_key() {
        let h = |key, score| Hit { key, score };
        let got = top(vec![h(3, 0.5), h(1, 0.9), h(2, 0.5), h(0, 0.1)], 3);
        assert_eq!(got, vec![h(1, 0.9), h(2, 0.5), h(3, 0.5)]);
    }
}
