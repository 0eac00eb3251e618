//! A picture of what a model sees in a scene: the scene beside the same scene
//! with each embedded window coloured by the first three principal components of
//! the window embeddings (similar colour = similar embedding), and one query
//! window outlined with its nearest neighbours by cosine similarity.
//!
//! Input: a GeoParquet file written by [`crate::archive::embed`] (its `source`, `window`,
//! `center_lat`/`center_lon` and `embedding` columns) and the scene it came from.

use std::path::{Path, PathBuf};

use arrow_array::{Float64Array, StringArray};
use image::{Rgb, RgbImage};

use crate::archive::error::ArchiveError;

/// What to draw.
#[derive(Debug, Clone)]
pub struct MapOptions {
    /// GeoParquet from `geossl-serve embed`.
    pub embeddings: PathBuf,
    /// The scene the rows came from (an RGB GeoTIFF, PNG or JPEG).
    pub scene: PathBuf,
    /// PNG to write (atomically).
    pub out: PathBuf,
    /// Pixel `(x, y)` of the scene; the query is the window whose centre is
    /// nearest to it (default: the scene's centre).
    pub query: Option<(f64, f64)>,
    /// How many nearest neighbours to outline.
    pub neighbours: usize,
    /// Where the neighbours come from: the scene's own rows by brute force (`None`), or this (e.g. a search
    /// index over a whole archive, whose answers may lie in other scenes).
    pub neighbours_from: Option<NeighbourFn>,
}

/// Neighbours from elsewhere: given the query window's chip id and a count, the neighbours' chip ids with their
/// similarity, most similar first.
#[derive(Clone)]
pub struct NeighbourFn(pub std::sync::Arc<Neighbours>);

/// `(query chip id, count) → [(chip id, similarity)]`, or why not.
pub type Neighbours = dyn Fn(&str, usize) -> Result<Vec<(String, f64)>, String> + Send + Sync;

impl std::fmt::Debug for NeighbourFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NeighbourFn")
    }
}

/// One embedded window.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Window {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
    pub lat: f64,
    pub lon: f64,
}

/// What the picture shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MapSummary {
    pub out: PathBuf,
    pub source: String,
    pub windows: usize,
    /// Share of the embeddings' variance along each of the three components.
    pub explained_variance: [f64; 3],
    pub query: Window,
    /// Nearest windows to the query in this scene (outlined), most similar first, with their cosine similarity.
    pub neighbours: Vec<(Window, f64)>,
    /// With neighbours from elsewhere: those in other scenes (chip id, similarity), not drawn.
    pub neighbours_elsewhere: Vec<(String, f64)>,
}

/// Rows of one source: windows and embeddings (`n × d`, row-major).
struct Rows {
    ids: Vec<String>,
    windows: Vec<Window>,
    d: usize,
    emb: Vec<f32>,
}

/// Reads the rows of `source` (a canonical path as `embed` records it).
fn read_rows(path: &Path, source: &str) -> Result<Rows, ArchiveError> {
    use crate::archive::geoparquet::{col, column, embedding_values, read_columns, window_columns};
    let label = path.display().to_string();
    // (`cell` only to refuse patch-level files: their rows are cells, several per window.)
    let cols = [col::CHIP_ID, col::SOURCE, col::WINDOW, col::CENTER_LAT, col::CENTER_LON, col::EMBEDDING, col::CELL];
    let batches = read_columns(&crate::archive::store::Location::local(path), &cols)?;
    if batches.iter().any(|b| b.column_by_name(col::CELL).is_some()) {
        return Err(ArchiveError::Run(format!(
            "{label}: its rows are patch-level (`embed --level spatial`: a row per feature-map cell); map draws \
             one row per window (`--level pooled`)"
        )));
    }
    let mut rows = Rows { ids: Vec::new(), windows: Vec::new(), d: 0, emb: Vec::new() };
    let mut sources = std::collections::BTreeSet::new();
    for batch in &batches {
        let src: &StringArray = column(batch, col::SOURCE, &label)?;
        let ids: &StringArray = column(batch, col::CHIP_ID, &label)?;
        let [x, y, w, h] = window_columns(batch, &label)?;
        let lat: &Float64Array = column(batch, col::CENTER_LAT, &label)?;
        let lon: &Float64Array = column(batch, col::CENTER_LON, &label)?;
        let (values, d) = embedding_values(batch, &label)?;
        rows.d = d;
        for i in 0..batch.num_rows() {
            if src.value(i) != source {
                sources.insert(src.value(i).to_string());
                continue;
            }
            rows.ids.push(ids.value(i).to_string());
            rows.windows.push(Window {
                x: x.value(i),
                y: y.value(i),
                w: w.value(i),
                h: h.value(i),
                lat: lat.value(i),
                lon: lon.value(i),
            });
            rows.emb.extend_from_slice(&values[i * d..(i + 1) * d]);
        }
    }
    if rows.windows.is_empty() {
        let others: Vec<_> = sources.into_iter().take(5).collect();
        return Err(ArchiveError::Run(format!(
            "{label} has no rows of {source} (its sources include: {})",
            others.join(", ")
        )));
    }
    Ok(rows)
}

/// The top `k` principal components of the rows of `x` (`n × d`): for each, the
/// scores of the rows (`n`) and the share of the total variance it carries.
/// Power iteration with deflation on the centred data, in f64.
pub fn principal_components(x: &[f32], n: usize, d: usize, k: usize) -> Vec<(Vec<f64>, f64)> {
    let mut c: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    for j in 0..d {
        let mean = (0..n).map(|i| c[i * d + j]).sum::<f64>() / n as f64;
        (0..n).for_each(|i| c[i * d + j] -= mean);
    }
    let total: f64 = c.iter().map(|v| v * v).sum::<f64>().max(f64::MIN_POSITIVE);
    let mut out = Vec::new();
    for comp in 0..k {
        // A fixed start that no component is orthogonal to in practice.
        let mut v: Vec<f64> = (0..d).map(|j| ((j * 7 + comp * 13 + 1) as f64).sin()).collect();
        let mut scores = vec![0.0; n];
        for _ in 0..300 {
            for (i, s) in scores.iter_mut().enumerate() {
                *s = (0..d).map(|j| c[i * d + j] * v[j]).sum();
            }
            let mut next = vec![0.0; d];
            for (i, s) in scores.iter().enumerate() {
                for (j, nj) in next.iter_mut().enumerate() {
                    *nj += c[i * d + j] * s;
                }
            }
            let norm = next.iter().map(|a| a * a).sum::<f64>().sqrt();
            if norm == 0.0 {
                break;
            }
            v = next.into_iter().map(|a| a / norm).collect();
        }
        for (i, s) in scores.iter_mut().enumerate() {
            *s = (0..d).map(|j| c[i * d + j] * v[j]).sum();
        }
        let var: f64 = scores.iter().map(|s| s * s).sum();
        for (i, s) in scores.iter().enumerate() {
            (0..d).for_each(|j| c[i * d + j] -= s * v[j]);
        }
        out.push((scores, var / total));
    }
    out
}

/// Indices of the `k` rows most similar to row `q` by cosine similarity
/// (excluding `q`), most similar first, with the similarity.
pub fn nearest(emb: &[f32], d: usize, q: usize, k: usize) -> Vec<(usize, f64)> {
    let row = |i: usize| &emb[i * d..(i + 1) * d];
    let norm = |r: &[f32]| r.iter().map(|&a| f64::from(a) * f64::from(a)).sum::<f64>().sqrt().max(1e-300);
    let qn = norm(row(q));
    let mut sims: Vec<(usize, f64)> = (0..emb.len() / d)
        .filter(|&i| i != q)
        .map(|i| {
            let dot: f64 = row(q).iter().zip(row(i)).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
            (i, dot / (qn * norm(row(i))))
        })
        .collect();
    sims.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    sims.truncate(k);
    sims
}

/// Draws the picture and writes it atomically; the error names what is wrong.
pub fn run(opts: &MapOptions) -> Result<MapSummary, ArchiveError> {
    let scene_label = opts.scene.display().to_string();
    let source = std::fs::canonicalize(&opts.scene)
        .map_err(|e| ArchiveError::Run(format!("{scene_label}: {e}")))?
        .display()
        .to_string();
    let rows = read_rows(&opts.embeddings, &source)?;
    let n = rows.windows.len();
    if n < 2 {
        return Err(ArchiveError::Run(format!(
            "{}: {scene_label} has {n} embedded window; a map needs at least 2",
            opts.embeddings.display()
        )));
    }
    // Drawn in colour: a one-band scene as grey.
    let rgb = geossl_raster::positional_names(3);
    let want = geossl_raster::Want { bands: &rgb, grey_to_rgb: true, max_pixels: u64::MAX };
    let planes = geossl_raster::decode_path(&opts.scene, &want).map_err(ArchiveError::run)?.into_planar();
    let (sw, sh) = (planes.width, planes.height);
    if let Some(w) = rows.windows.iter().find(|w| (w.x + w.w) as usize > sw || (w.y + w.h) as usize > sh) {
        return Err(ArchiveError::Run(format!(
            "{}: window at ({}, {}) lies outside {scene_label} ({sw}×{sh}): is this the scene it was embedded from?",
            opts.embeddings.display(),
            w.x,
            w.y
        )));
    }
    let pcs = principal_components(&rows.emb, n, rows.d, 3);
    let (qx, qy) = opts.query.unwrap_or((sw as f64 / 2.0, sh as f64 / 2.0));
    let centre = |w: &Window| (f64::from(w.x) + f64::from(w.w) / 2.0, f64::from(w.y) + f64::from(w.h) / 2.0);
    let dist = |w: &Window| {
        let (cx, cy) = centre(w);
        (cx - qx).powi(2) + (cy - qy).powi(2)
    };
    let q = (0..n).min_by(|&a, &b| dist(&rows.windows[a]).total_cmp(&dist(&rows.windows[b]))).unwrap_or(0);
    let (near, elsewhere) = match &opts.neighbours_from {
        None => (nearest(&rows.emb, rows.d, q, opts.neighbours), Vec::new()),
        Some(f) => {
            let found = (f.0)(&rows.ids[q], opts.neighbours).map_err(ArchiveError::Run)?;
            let here: std::collections::HashMap<&str, usize> =
                rows.ids.iter().enumerate().map(|(i, id)| (id.as_str(), i)).collect();
            let (mut near, mut elsewhere) = (Vec::new(), Vec::new());
            for (id, sim) in found {
                match here.get(id.as_str()) {
                    Some(&i) => near.push((i, sim)),
                    None => elsewhere.push((id, sim)),
                }
            }
            (near, elsewhere)
        }
    };

    // Each window colours the stride × stride cell around its centre, so overlapping windows tile the
    // scene; pixels outside every cell (nodata windows, margins) stay dimmed.
    let scale = (1000 / sw.max(sh)).clamp(1, 8);
    let (pw, ph) = (sw * scale, sh * scale);
    let gap = 8;
    let mut img = RgbImage::from_pixel((2 * pw + gap) as u32, ph as u32, Rgb([255, 255, 255]));
    let hw = sw * sh;
    // 8-bit scenes as they are; others stretched per band from the 2nd to the 98th percentile.
    let stretch: Vec<(f64, f64)> = (0..3)
        .map(|c| {
            if planes.samples.sample_type() == geossl_raster::SampleType::U8 {
                return (0.0, 1.0);
            }
            let step = (hw / 100_000).max(1);
            let mut v: Vec<f64> = (0..hw).step_by(step).map(|i| planes.samples.get(c * hw + i)).collect();
            v.sort_by(f64::total_cmp);
            let (lo, hi) = (v[v.len() * 2 / 100], v[v.len() * 98 / 100]);
            (lo, if hi > lo { 255.0 / (hi - lo) } else { 1.0 })
        })
        .collect();
    let px = |x: usize, y: usize| -> [f64; 3] {
        [0, 1, 2].map(|c| {
            let (lo, k) = stretch[c];
            ((planes.samples.get(c * hw + y * sw + x) - lo) * k).clamp(0.0, 255.0)
        })
    };
    let mut put = |x: usize, y: usize, panel: usize, rgb: [f64; 3]| {
        let rgb = Rgb(rgb.map(|v| v.round().clamp(0.0, 255.0) as u8));
        for dy in 0..scale {
            for dx in 0..scale {
                img.put_pixel((panel + x * scale + dx) as u32, (y * scale + dy) as u32, rgb);
            }
        }
    };
    for y in 0..sh {
        for x in 0..sw {
            let p = px(x, y);
            put(x, y, 0, p);
            put(x, y, pw + gap, p.map(|v| 0.35 * v));
        }
    }
    let ranges: Vec<(f64, f64)> = pcs
        .iter()
        .map(|(s, _)| s.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v))))
        .collect();
    let stride = {
        let mut xs: Vec<u32> = rows.windows.iter().map(|w| w.x).collect();
        xs.sort_unstable();
        xs.dedup();
        let w0 = &rows.windows[0];
        xs.windows(2).map(|p| p[1] - p[0]).min().unwrap_or(w0.w).min(w0.w) as usize
    };
    for (i, w) in rows.windows.iter().enumerate() {
        let colour = [0, 1, 2].map(|c| {
            let (lo, hi) = ranges[c];
            if hi > lo {
                255.0 * (pcs[c].0[i] - lo) / (hi - lo)
            } else {
                128.0
            }
        });
        let x0 = w.x as usize + (w.w as usize).saturating_sub(stride) / 2;
        let y0 = w.y as usize + (w.h as usize).saturating_sub(stride) / 2;
        for y in y0..(y0 + stride).min(sh) {
            for x in x0..(x0 + stride).min(sw) {
                let p = px(x, y);
                put(x, y, pw + gap, [0, 1, 2].map(|c| 0.35 * p[c] + 0.65 * colour[c]));
            }
        }
    }
    let thick = (scale as u32).max(2);
    for panel in [0, pw + gap] {
        for (i, _) in &near {
            outline(&mut img, &rows.windows[*i], scale, panel, thick, Rgb([0, 230, 255]));
        }
        outline(&mut img, &rows.windows[q], scale, panel, thick + 1, Rgb([255, 40, 40]));
    }
    write_png(&img, &opts.out)?;
    let explained = [0, 1, 2].map(|c| pcs[c].1);
    Ok(MapSummary {
        out: opts.out.clone(),
        source,
        windows: n,
        explained_variance: explained,
        query: rows.windows[q].clone(),
        neighbours: near.into_iter().map(|(i, s)| (rows.windows[i].clone(), s)).collect(),
        neighbours_elsewhere: elsewhere,
    })
}

/// A `thick`-pixel rectangle around window `w` (scene pixels × `scale`) in the panel starting at `x0`.
fn outline(img: &mut RgbImage, w: &Window, scale: usize, x0: usize, thick: u32, colour: Rgb<u8>) {
    let s = scale as u32;
    let (l, t) = (x0 as u32 + w.x * s, w.y * s);
    let (r, b) = (l + w.w * s - 1, t + w.h * s - 1);
    for k in 0..thick {
        for x in l..=r {
            for y in [t + k, b.saturating_sub(k)] {
                if x < img.width() && y < img.height() {
                    img.put_pixel(x, y, colour);
                }
            }
        }
        for y in t..=b {
            for x in [l + k, r.saturating_sub(k)] {
                if x < img.width() && y < img.height() {
                    img.put_pixel(x, y, colour);
                }
            }
        }
    }
}

/// Writes `img` as PNG beside `out`, then renames it there (an earlier file at
/// `out` stays until the new one is complete).
fn write_png(img: &RgbImage, out: &Path) -> Result<(), ArchiveError> {
    let name = out.file_name().ok_or_else(|| ArchiveError::Run(format!("{}: not a file path", out.display())))?;
    let tmp = out.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    let result = img
        .save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| e.to_string())
        .and_then(|()| std::fs::rename(&tmp, out).map_err(|e| e.to_string()))
        .map_err(|e| ArchiveError::Run(format!("{}: {e}", out.display())));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn principal_components_find_the_directions_of_largest_variance() {
        // 40 points in 5-D: large spread along e1 + e2, smaller along e4, a little noise.
        let (n, d) = (40, 5);
        let mut x = vec![0f32; n * d];
        for i in 0..n {
            let (a, b) = (((i as f64) * 0.7).sin() * 10.0, ((i as f64) * 1.3).cos() * 3.0);
            x[i * d] = (a / 2f64.sqrt()) as f32 + 5.0;
            x[i * d + 1] = (a / 2f64.sqrt()) as f32 - 2.0;
            x[i * d + 3] = b as f32;
            x[i * d + 2] = (((i as f64) * 2.9).sin() * 0.01) as f32;
        }
        let pcs = principal_components(&x, n, d, 3);
        // The first component's scores are ± the centred projections on (e1 + e2)/√2.
        let proj: Vec<f64> = (0..n).map(|i| (f64::from(x[i * d]) + f64::from(x[i * d + 1])) / 2f64.sqrt()).collect();
        let mean = proj.iter().sum::<f64>() / n as f64;
        let corr = proj.iter().zip(&pcs[0].0).map(|(p, s)| (p - mean) * s).sum::<f64>()
            / (proj.iter().map(|p| (p - mean).powi(2)).sum::<f64>().sqrt()
                * pcs[0].0.iter().map(|s| s * s).sum::<f64>().sqrt());
        // Over 40 samples the two signals are not exactly uncorrelated, so the first
        // component tilts slightly off (e1 + e2)/√2; it must still carry the most variance.
        assert!(corr.abs() > 0.9999, "first component correlation {corr}");
        let var_along = proj.iter().map(|p| (p - mean).powi(2)).sum::<f64>();
        let pc1_var: f64 = pcs[0].0.iter().map(|s| s * s).sum();
        assert!(pc1_var >= var_along * (1.0 - 1e-12), "{pc1_var} < {var_along}");
        assert!(pcs[0].1 > pcs[1].1 && pcs[1].1 > pcs[2].1, "{:?}", pcs.iter().map(|p| p.1).collect::<Vec<_>>());
        let total: f64 = pcs.iter().map(|p| p.1).sum();
        assert!(total > 0.999_99 && total <= 1.0 + 1e-9, "three components carry {total} of the variance");
    }

    #[test]
    fn nearest_ranks_by_cosine_and_skips_the_query() {
        let emb =
            [1.0f32, 0.0, /* 1 */ 0.0, 1.0, /* 2 */ 2.0, 0.1, /* 3 */ -1.0, 0.0, /* 4 */ 1.0, 1.0];
        let near = nearest(&emb, 2, 0, 3);
        assert_eq!(near.iter().map(|p| p.0).collect::<Vec<_>>(), vec![2, 4, 1]);
        assert!((near[1].1 - 0.5f64.sqrt()).abs() < 1e-12);
    }
}
