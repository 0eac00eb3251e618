//! `geossl-train eval`: the standard frozen-backbone evaluation, rerunnable on any labelled chips and any
//! checkpoint (pretrained, imported or random).
//!
//! The chips (a labelled manifest of georeferenced GeoTIFF chips, e.g. from `geossl-train chips --labels`)
//! are split by **spatial blocks** ([`geossl_eval::split`]): whole blocks of `block × chip extent` go to
//! train, validation or test, and train/validation chips within one chip extent of a test chip are dropped,
//! so no neighbouring window leaks into the test. The backbone's pooled features (eval mode) are then
//! scored two ways:
//! - **kNN**: k = 20 nearest training chips by cosine similarity, votes weighted by `exp(sim / 0.07)`;
//! - **logistic-regression probe** ([`geossl_eval::logistic`], scikit-learn's objective) on features
//!   standardized with the fitting set's statistics: `C` chosen on validation top-1 over a grid, then
//!   refitted on train + validation.
//!
//! The test split is used once, by both. Top-1 and macro-F1 come with 95 % percentile-bootstrap intervals
//! over the test chips. Outputs in `out/`: `eval.json` (the whole record: options, split sizes, data and
//! checkpoint SHA-256, scores), `split.csv` (each chip's side: train, val, test or dropped) and
//! `features/{train,val,test}_{x,y}.npy` (the features and labels scored, for reference tools) with the test
//! predictions `features/test_pred_{knn,probe}.npy`; with
//! `report`, a row is appended to that Markdown table.

use std::path::{Path, PathBuf};

use geossl_eval::{Interval, KnnOptions};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::load_checkpoint;
use crate::data::{read_manifest, Format, Sample};
use crate::supervised::{frozen_features, invalid, EvalError};

/// What [`run`] needs.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub checkpoint: PathBuf,
    /// Labelled manifest of georeferenced chips (`label` filled on every row).
    pub data: PathBuf,
    pub out: PathBuf,
    /// A Markdown table to append this evaluation's row to (created with its header).
    pub report: Option<PathBuf>,
    /// The row's name in the report (default: the checkpoint path).
    pub name: Option<String>,
    /// Block side, in chip extents.
    pub block: f64,
    /// Shares of the blocks for validation and test.
    pub val: f64,
    pub test: f64,
    pub seed: u64,
    pub knn: KnnOptions,
    /// Inverse regularization strengths tried on validation.
    pub c_grid: Vec<f64>,
    /// Bootstrap resamples of the test chips.
    pub resamples: usize,
    pub device: Device,
    pub workers: usize,
}

/// How the chips were split.
#[derive(Debug, Clone, Serialize)]
pub struct SplitReport {
    /// CRS of the footprints (their unit is this CRS's).
    pub epsg: u32,
    /// Chip extent, block side and buffer in CRS units.
    pub chip_extent: f64,
    pub block: f64,
    pub buffer: f64,
    pub blocks: usize,
    pub train: usize,
    pub val: usize,
    pub test: usize,
    /// Chips within the buffer of a test chip, left out.
    pub dropped: usize,
    /// Chips whose image could not be read.
    pub unreadable: usize,
    pub seed: u64,
}

/// A classifier's test scores.
#[derive(Debug, Clone, Serialize)]
pub struct Scores {
    pub top1: Interval,
    pub macro_f1: Interval,
}

/// The probe's choice of `C` and its test scores.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeScores {
    pub c_grid: Vec<f64>,
    /// Validation top-1 of each grid point.
    pub val_top1: Vec<f64>,
    pub c: f64,
    pub iterations: usize,
    pub converged: bool,
    #[serde(flatten)]
    pub scores: Scores,
}

/// `eval.json`.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub name: String,
    pub checkpoint: PathBuf,
    /// SHA-256 of the checkpoint's weights (`model.safetensors`).
    pub checkpoint_sha256: String,
    pub data: PathBuf,
    /// SHA-256 over the manifest and every chip file, in manifest order.
    pub data_sha256: String,
    pub classes: Vec<String>,
    /// Test chips per class.
    pub test_counts: Vec<usize>,
    pub feature_dim: usize,
    pub split: SplitReport,
    pub knn_k: usize,
    pub knn_temperature: f64,
    pub knn: Scores,
    pub probe: ProbeScores,
    /// Predicting the most frequent training class for every test chip.
    pub majority_top1: Interval,
    pub resamples: usize,
    pub geossl_version: String,
}

/// Footprint box `[x0, y0, x1, y1]` (CRS units), the CRS and the chip's extent.
fn footprint(path: &Path) -> Result<([f64; 4], u32, f64), EvalError> {
    let hint = |e: geossl_raster::RasterError| {
        invalid(format!(
            "{} ({e}): spatial-block splits need georeferenced chips (GeoTIFF: geossl-train chips --format tiff)",
            path.display()
        ))
    };
    let r = geossl_raster::Raster::open(path).map_err(hint)?;
    let (w, h) = (r.info().width as f64, r.info().height as f64);
    let g = r.georef().map_err(hint)?;
    let corners = [g.pixel_to_map(0.0, 0.0), g.pixel_to_map(w, 0.0), g.pixel_to_map(0.0, h), g.pixel_to_map(w, h)];
    let (xs, ys): (Vec<f64>, Vec<f64>) = corners.iter().copied().unzip();
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = |v: &[f64]| v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let b = [min(&xs), min(&ys), max(&xs), max(&ys)];
    Ok((b, g.epsg, (b[2] - b[0]).max(b[3] - b[1])))
}

/// SHA-256 over the manifest's bytes and each chip file's, in order.
fn data_sha256(manifest: &Path, samples: &[Sample]) -> Result<String, EvalError> {
    let mut acc = geossl_models::sha256_hex(&std::fs::read(manifest).map_err(EvalError::io(manifest))?);
    for s in samples {
        acc.push_str(&geossl_models::sha256_hex(&std::fs::read(&s.path).map_err(EvalError::io(&s.path))?));
    }
    Ok(geossl_models::sha256_hex(acc.as_bytes()))
}

/// `[N, D]` features as row-major f32 on the CPU.
fn rows(x: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(x.to_device(Device::Cpu).to_kind(Kind::Float).contiguous().view([-1])).unwrap_or_default()
}

/// Features standardized with the mean and (population) std of `fit` rows, as scikit-learn's
/// `StandardScaler` does (a constant feature is centred and left unscaled).
fn standardize(fit: &[f32], dim: usize, xs: &[&[f32]]) -> Vec<Vec<f32>> {
    let n = (fit.len() / dim).max(1) as f64;
    let mut mean = vec![0f64; dim];
    let mut var = vec![0f64; dim];
    for r in fit.chunks_exact(dim) {
        r.iter().zip(&mut mean).for_each(|(v, m)| *m += f64::from(*v) / n);
    }
    for r in fit.chunks_exact(dim) {
        r.iter().zip(&mean).zip(&mut var).for_each(|((v, m), s)| *s += (f64::from(*v) - m).powi(2) / n);
    }
    let scale: Vec<f64> = var.iter().map(|v| if *v > 0.0 { v.sqrt() } else { 1.0 }).collect();
    xs.iter()
        .map(|x| {
            x.chunks_exact(dim)
                .flat_map(|r| r.iter().zip(&mean).zip(&scale).map(|((v, m), s)| ((f64::from(*v) - m) / s) as f32))
                .collect()
        })
        .collect()
}

fn scores(truth: &[usize], pred: &[usize], classes: usize, o: &EvalOptions) -> Scores {
    Scores {
        top1: geossl_eval::bootstrap(truth, pred, o.resamples, o.seed, geossl_eval::accuracy),
        macro_f1: geossl_eval::bootstrap(truth, pred, o.resamples, o.seed, |t, p| geossl_eval::macro_f1(t, p, classes)),
    }
}

/// Runs the evaluation and writes its outputs (see the module).
pub fn run(o: &EvalOptions) -> Result<EvalReport, EvalError> {
    let positive = |x: f64| x > 0.0 && x.is_finite();
    if o.c_grid.is_empty() || o.c_grid.iter().any(|c| !positive(*c)) {
        return Err(invalid(format!("--probe-c must be positive numbers, got {:?}", o.c_grid)));
    }
    if !positive(o.block) || !(0.0..1.0).contains(&o.val) || !(0.0..1.0).contains(&o.test) || o.val + o.test >= 1.0 {
        return Err(invalid(format!(
            "block {} chip extents, validation share {}, test share {}: the block must be positive and the shares \
             below 1 together",
            o.block, o.val, o.test
        )));
    }
    if o.knn.k == 0 || !positive(o.knn.temperature) {
        return Err(invalid(format!("kNN k {} and temperature {} must be positive", o.knn.k, o.knn.temperature)));
    }
    let samples = read_manifest(&o.data, Format::Csv)?;
    if let Some(s) = samples.iter().find(|s| s.label.is_none()) {
        return Err(invalid(format!(
            "{}: {} has no label; eval needs a label on every row (geossl-train chips --labels makes them)",
            o.data.display(),
            s.path.display()
        )));
    }
    let mut classes: Vec<String> = samples.iter().filter_map(|s| s.label.clone()).collect();
    classes.sort();
    classes.dedup();
    let class_of = |s: &Sample| classes.binary_search(s.label.as_ref().expect("labelled")).unwrap_or(0);

    // Spatial blocks over the chips' footprints.
    let mut boxes = Vec::with_capacity(samples.len());
    let (mut epsg, mut extent) = (None, 0f64);
    for s in &samples {
        let (b, e, x) = footprint(&s.path)?;
        if *epsg.get_or_insert(e) != e {
            return Err(invalid(format!(
                "{}: EPSG:{e}, other chips EPSG:{}; a spatial split needs the chips in one CRS",
                s.path.display(),
                epsg.unwrap_or(e)
            )));
        }
        extent = extent.max(x);
        boxes.push(b);
    }
    let so =
        geossl_eval::SplitOptions { block: o.block * extent, val: o.val, test: o.test, buffer: extent, seed: o.seed };
    let split = geossl_eval::spatial_split(&boxes, &so);
    let pick = |idx: &[usize]| idx.iter().map(|&i| samples[i].clone()).collect::<Vec<_>>();
    let (train_s, val_s, test_s) = (pick(&split.train), pick(&split.val), pick(&split.test));
    if train_s.is_empty() || val_s.is_empty() || test_s.is_empty() {
        return Err(invalid(format!(
            "{} train, {} validation and {} test chips from {} blocks: each side needs chips (more chips, a \
             smaller --block or other shares)",
            train_s.len(),
            val_s.len(),
            test_s.len(),
            split.blocks
        )));
    }

    let loaded = load_checkpoint(&o.checkpoint, o.device)?;
    let spec = &loaded.spec;
    let dim = spec.backbone.feature_dim();
    tracing::info!(
        train = train_s.len(),
        val = val_s.len(),
        test = test_s.len(),
        dropped = split.dropped,
        blocks = split.blocks,
        "spatial split; extracting frozen features"
    );
    let mut unreadable = 0;
    let mut feats = |s: &[Sample]| {
        let (kept, x, bad) = frozen_features(&loaded.model, s, spec, o.workers, o.device);
        unreadable += bad;
        let y: Vec<usize> = kept.iter().map(class_of).collect();
        (rows(&x), y)
    };
    let (xtr, ytr) = feats(&train_s);
    let (xva, yva) = feats(&val_s);
    let (xte, yte) = feats(&test_s);
    if ytr.is_empty() || yva.is_empty() || yte.is_empty() {
        return Err(invalid("no readable chip in the training, validation or test split"));
    }
    let k = classes.len();
    if ytr.iter().collect::<std::collections::BTreeSet<_>>().len() < 2 {
        return Err(invalid("the training split holds one class; at least two are needed"));
    }

    // kNN on the raw features (cosine).
    let knn_pred = geossl_eval::knn_predict(&xtr, &ytr, &xte, dim, k, o.knn);
    let knn = scores(&yte, &knn_pred, k, o);

    // Probe: C on validation, then train + validation.
    let fit_opts = |c: f64| geossl_eval::FitOptions { c, tol: 1e-6, max_iter: 2000 };
    let s = standardize(&xtr, dim, &[&xtr, &xva]);
    let mut val_top1 = Vec::with_capacity(o.c_grid.len());
    for &c in &o.c_grid {
        let m = geossl_eval::fit(&s[0], dim, &ytr, k, fit_opts(c)).map_err(|e| invalid(e.to_string()))?;
        let acc = geossl_eval::accuracy(&yva, &m.predict(&s[1]));
        tracing::info!(c, val_top1 = acc, iterations = m.iterations, "probe grid point");
        val_top1.push(acc);
    }
    // The best validation top-1; on a tie, the stronger regularization (smaller C).
    let best = (0..o.c_grid.len())
        .max_by(|&a, &b| val_top1[a].total_cmp(&val_top1[b]).then(o.c_grid[b].total_cmp(&o.c_grid[a])))
        .unwrap_or(0);
    let c = o.c_grid[best];
    let xfit: Vec<f32> = xtr.iter().chain(&xva).copied().collect();
    let yfit: Vec<usize> = ytr.iter().chain(&yva).copied().collect();
    let s = standardize(&xfit, dim, &[&xfit, &xte]);
    let m = geossl_eval::fit(&s[0], dim, &yfit, k, fit_opts(c)).map_err(|e| invalid(e.to_string()))?;
    if !m.converged {
        tracing::warn!(c, iterations = m.iterations, "the probe did not reach its tolerance");
    }
    let probe_pred = m.predict(&s[1]);
    let probe = ProbeScores {
        c_grid: o.c_grid.clone(),
        val_top1,
        c,
        iterations: m.iterations,
        converged: m.converged,
        scores: scores(&yte, &probe_pred, k, o),
    };
    let mut train_counts = vec![0usize; k];
    ytr.iter().for_each(|&y| train_counts[y] += 1);
    let majority = (0..k).max_by_key(|&c| (train_counts[c], std::cmp::Reverse(c))).unwrap_or(0);
    let majority_top1 =
        geossl_eval::bootstrap(&yte, &vec![majority; yte.len()], o.resamples, o.seed, geossl_eval::accuracy);
    let mut test_counts = vec![0usize; k];
    yte.iter().for_each(|&y| test_counts[y] += 1);

    let weights = o.checkpoint.join("model.safetensors");
    let checkpoint_sha256 = geossl_models::sha256_hex(&std::fs::read(&weights).map_err(EvalError::io(&weights))?);
    let report = EvalReport {
        name: o.name.clone().unwrap_or_else(|| o.checkpoint.display().to_string()),
        checkpoint: o.checkpoint.clone(),
        checkpoint_sha256,
        data: o.data.clone(),
        data_sha256: data_sha256(&o.data, &samples)?,
        classes: classes.clone(),
        test_counts,
        feature_dim: dim,
        split: SplitReport {
            epsg: epsg.unwrap_or(0),
            chip_extent: extent,
            block: so.block,
            buffer: so.buffer,
            blocks: split.blocks,
            train: ytr.len(),
            val: yva.len(),
            test: yte.len(),
            dropped: split.dropped,
            unreadable,
            seed: o.seed,
        },
        knn_k: o.knn.k,
        knn_temperature: o.knn.temperature,
        knn,
        probe,
        majority_top1,
        resamples: o.resamples,
        geossl_version: geossl_models::GEOSSL_VERSION.to_string(),
    };
    write_outputs(o, &report, [(&xtr, &ytr), (&xva, &yva), (&xte, &yte)], dim)?;
    for (name, pred) in [("test_pred_knn", &knn_pred), ("test_pred_probe", &probe_pred)] {
        let p: Vec<i64> = pred.iter().map(|&v| v as i64).collect();
        crate::npy::write_npy(&o.out.join("features").join(format!("{name}.npy")), &[p.len()], &p)
            .map_err(|e| invalid(e.to_string()))?;
    }
    let mut side = vec!["dropped"; samples.len()];
    for (idx, name) in [(&split.train, "train"), (&split.val, "val"), (&split.test, "test")] {
        idx.iter().for_each(|&i| side[i] = name);
    }
    let csv: String = std::iter::once("path,side\n".to_string())
        .chain(samples.iter().zip(&side).map(|(s, side)| format!("{},{side}\n", s.path.display())))
        .collect();
    let path = o.out.join("split.csv");
    geossl_models::weights::write_atomic(&path, csv.as_bytes()).map_err(EvalError::io(&path))?;
    Ok(report)
}

/// `eval.json`, the features, and the report row.
fn write_outputs(
    o: &EvalOptions,
    r: &EvalReport,
    splits: [(&Vec<f32>, &Vec<usize>); 3],
    dim: usize,
) -> Result<(), EvalError> {
    let fdir = o.out.join("features");
    std::fs::create_dir_all(&fdir).map_err(EvalError::io(&fdir))?;
    for ((x, y), name) in splits.into_iter().zip(["train", "val", "test"]) {
        let npy = |e: crate::npy::NpyError| invalid(e.to_string());
        crate::npy::write_npy(&fdir.join(format!("{name}_x.npy")), &[y.len(), dim], x).map_err(npy)?;
        let labels: Vec<i64> = y.iter().map(|&v| v as i64).collect();
        crate::npy::write_npy(&fdir.join(format!("{name}_y.npy")), &[y.len()], &labels).map_err(npy)?;
    }
    crate::supervised::write_json(&o.out.join("eval.json"), r)?;
    if let Some(path) = &o.report {
        let iv = |i: &Interval| format!("{:.3} [{:.3}, {:.3}]", i.value, i.low, i.high);
        let mut text = if path.exists() {
            std::fs::read_to_string(path).map_err(EvalError::io(path))?
        } else {
            "| run | kNN top-1 [95 % CI] | kNN macro-F1 | probe top-1 | probe macro-F1 | probe C | majority top-1 | \
             train/val/test chips | data sha256 | checkpoint sha256 |\n|---|---|---|---|---|---|---|---|---|---|\n"
                .to_string()
        };
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {}/{}/{} | {} | {} |\n",
            r.name.replace('|', "/"),
            iv(&r.knn.top1),
            iv(&r.knn.macro_f1),
            iv(&r.probe.scores.top1),
            iv(&r.probe.scores.macro_f1),
            r.probe.c,
            iv(&r.majority_top1),
            r.split.train,
            r.split.val,
            r.split.test,
            &r.data_sha256[..12],
            &r.checkpoint_sha256[..12]
        );
        geossl_models::weights::write_atomic(path, text.as_bytes()).map_err(EvalError::io(path))?;
    }
    Ok(())
}
