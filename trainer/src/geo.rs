//! Geo-location clusters: k-means on 3-D unit vectors, so distances are
//! great-circle-like and clusters that straddle ±180° longitude stay whole
//! (k-means on raw lat/lon would cut them in two).

use crate::rng::Rng;

/// Latitude/longitude in degrees → unit vector `[x, y, z]`.
pub fn to_unit(lat: f64, lon: f64) -> [f64; 3] {
    let (la, lo) = (lat.to_radians(), lon.to_radians());
    [la.cos() * lo.cos(), la.cos() * lo.sin(), la.sin()]
}

/// Unit vector → (latitude, longitude) in degrees.
pub fn to_latlon(v: [f64; 3]) -> (f64, f64) {
    let n = norm(v).max(1e-300);
    ((v[2] / n).clamp(-1.0, 1.0).asin().to_degrees(), v[1].atan2(v[0]).to_degrees())
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn norm(v: [f64; 3]) -> f64 {
    dot(v, v).sqrt()
}

/// Index of the centroid nearest to `p` (largest cosine).
pub fn assign(centroids: &[[f64; 3]], p: [f64; 3]) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, c) in centroids.iter().enumerate() {
        let d = dot(*c, p);
        if d > best.1 {
            best = (i, d);
        }
    }
    best.0
}

geossl_models::message_error!(
    /// Locations that cannot be clustered (fewer distinct points than clusters, a non-finite coordinate).
    KmeansError
);

/// Spherical k-means with k-means++ seeding. Returns `k` unit centroids.
/// Errors when there are fewer distinct points than clusters or a coordinate is not finite.
pub fn kmeans_sphere(points: &[[f64; 3]], k: usize, iters: usize, seed: u64) -> Result<Vec<[f64; 3]>, KmeansError> {
    if k == 0 {
        return Err("k-means needs at least one cluster".into());
    }
    if points.iter().any(|p| p.iter().any(|x| !x.is_finite())) {
        return Err("k-means got a non-finite coordinate".into());
    }
    let mut distinct: Vec<[f64; 3]> = points.to_vec();
    distinct.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    distinct.dedup();
    if distinct.len() < k {
        return Err(
            format!("{k} geo clusters requested but the data has only {} distinct locations", distinct.len()).into()
        );
    }
    let mut rng = Rng::new(seed);
    // k-means++ on the chord distance 1 - cos.
    let mut cents = vec![points[rng.below(points.len())]];
    let mut d2: Vec<f64> = points.iter().map(|p| 1.0 - dot(*p, cents[0])).collect();
    while cents.len() < k {
        let total: f64 = d2.iter().map(|d| d.max(0.0)).sum();
        let next = if total <= 0.0 {
            distinct.iter().copied().find(|p| !cents.contains(p)).unwrap_or(points[0])
        } else {
            let mut r = rng.next_f64() * total;
            let mut pick = points.len() - 1;
            for (i, d) in d2.iter().enumerate() {
                r -= d.max(0.0);
                if r <= 0.0 {
                    pick = i;
                    break;
                }
            }
            points[pick]
        };
        cents.push(next);
        for (d, p) in d2.iter_mut().zip(points) {
            *d = d.min(1.0 - dot(*p, next));
        }
    }
    let mut labels = vec![usize::MAX; points.len()];
    for _ in 0..iters {
        let mut changed = false;
        for (l, p) in labels.iter_mut().zip(points) {
            let a = assign(&cents, *p);
            changed |= *l != a;
            *l = a;
        }
        let mut sums = vec![[0.0f64; 3]; k];
        let mut counts = vec![0usize; k];
        for (l, p) in labels.iter().zip(points) {
            for j in 0..3 {
                sums[*l][j] += p[j];
            }
            counts[*l] += 1;
        }
        for c in 0..k {
            let n = norm(sums[c]);
            if counts[c] == 0 || n < 1e-12 {
                // Empty cluster: re-seed at the point farthest from its centroid.
                let far = (0..points.len())
                    .max_by(|&i, &j| {
                        let di = 1.0 - dot(points[i], cents[labels[i]]);
                        let dj = 1.0 - dot(points[j], cents[labels[j]]);
                        di.partial_cmp(&dj).unwrap_or(std::cmp::Ordering::Equal)
                    })
                    .unwrap_or(0);
                cents[c] = points[far];
                changed = true;
            } else {
                cents[c] = [sums[c][0] / n, sums[c][1] / n, sums[c][2] / n];
            }
        }
        if !changed {
            break;
        }
    }
    Ok(cents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_vectors_round_trip() {
        for (lat, lon) in [(0.0, 0.0), (45.5, -120.25), (-33.9, 151.2), (10.0, 179.9), (10.0, -179.9)] {
            let v = to_unit(lat, lon);
            assert!((norm(v) - 1.0).abs() < 1e-12);
            let (a, b) = to_latlon(v);
            assert!((a - lat).abs() < 1e-9 && (b - lon).abs() < 1e-9, "{lat},{lon} → {a},{b}");
        }
    }

    #[test]
    fn dateline_cluster_stays_whole() {
        let mut rng = Rng::new(1);
        let mut pts = Vec::new();
        let mut truth = Vec::new();
        // Fiji-like cluster straddling ±180°, and one near Greenwich.
        for _ in 0..200 {
            let lon = 178.0 + rng.next_f64() * 4.0; // 178..182 → wraps to -178
            let lon = if lon > 180.0 { lon - 360.0 } else { lon };
            pts.push(to_unit(-17.0 + rng.next_f64() * 2.0, lon));
            truth.push(0);
            pts.push(to_unit(51.0 + rng.next_f64() * 2.0, -1.0 + rng.next_f64() * 2.0));
            truth.push(1);
        }
        let c = kmeans_sphere(&pts, 2, 50, 7).unwrap();
        let labels: Vec<usize> = pts.iter().map(|p| assign(&c, *p)).collect();
        let a = labels[0];
        for (l, t) in labels.iter().zip(&truth) {
            assert_eq!(*l == a, *t == 0, "a cluster was split");
        }
        let (lat, lon) = to_latlon(c[a]);
        assert!((lat + 16.0).abs() < 0.5 && lon.abs() > 179.0, "centroid {lat},{lon} should sit on the dateline");
    }

    #[test]
    fn errors_are_clear() {
        let p = vec![to_unit(0.0, 0.0); 5];
        assert!(kmeans_sphere(&p, 2, 10, 0).unwrap_err().to_string().contains("only 1 distinct"));
        assert!(kmeans_sphere(&[[f64::NAN, 0.0, 0.0]], 1, 10, 0).unwrap_err().to_string().contains("non-finite"));
    }
}
