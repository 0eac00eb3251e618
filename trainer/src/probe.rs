//! Linear probe: the paper's evaluation of a pretrained backbone. Features of
//! the frozen backbone (eval mode, resize shorter side + centre crop to the
//! input size, the checkpoint's normalization) train a linear classifier;
//! learning rate, weight decay and epoch are chosen on a **validation** split
//! (given, or held out from the training manifest by location, so no place is
//! on both sides); the test split is evaluated once, with the chosen model,
//! and never takes part in the choice.
//!
//! Writes `probe.json` (report), `predictions.csv` and `checkpoint/` (the
//! backbone plus the probe as its classifier head, ready for
//! `geossl-export onnx --head classify` and `/classify`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use geossl_models::{ClassifierHead, HeadKind, HeadSpec, ModelSpec};
use serde::Serialize;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{load_checkpoint, save_checkpoint, CheckpointError};
use crate::data::{read_manifest, DataError, Format, Sample};
use crate::image_io;
use crate::model::Model;
use crate::rng::Rng;

/// What [`run`] needs.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    pub checkpoint: PathBuf,
    /// Labelled manifests (`label` column required).
    pub train: PathBuf,
    pub val: Option<PathBuf>,
    pub test: Option<PathBuf>,
    pub format: Format,
    pub out: PathBuf,
    /// Share of training locations held out for validation when `val` is not given.
    pub val_fraction: f64,
    pub epochs: usize,
    pub batch_size: usize,
    /// Grid searched on the validation split.
    pub learning_rates: Vec<f64>,
    pub weight_decays: Vec<f64>,
    pub seed: u64,
    pub device: Device,
}

/// Errors of a probe run; each names what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
}

/// One grid point: its best validation top-1 and the epoch it was reached at.
#[derive(Debug, Clone, Serialize)]
pub struct GridPoint {
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub best_epoch: usize,
    pub val_top1: f64,
}

/// Sizes and accuracy of one split.
#[derive(Debug, Clone, Serialize)]
pub struct SplitResult {
    pub images: usize,
    /// Images that could not be read (skipped, named in the log).
    pub unreadable: usize,
    pub top1: f64,
    /// Top-1 of always answering the most frequent training class.
    pub majority_top1: f64,
}

/// `probe.json`.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    pub checkpoint: PathBuf,
    pub classes: Vec<String>,
    pub feature_dim: usize,
    pub validation: String,
    pub chosen: GridPoint,
    pub grid: Vec<GridPoint>,
    pub train: SplitResult,
    pub val: SplitResult,
    pub test: Option<SplitResult>,
}

/// Frozen features of one split.
struct Split {
    samples: Vec<Sample>,
    /// `[N, D]` float, on the probe device.
    x: Tensor,
    /// `[N]` int64 class indices.
    y: Tensor,
    unreadable: usize,
}

fn invalid(msg: impl Into<String>) -> ProbeError {
    ProbeError::Invalid(msg.into())
}

fn labelled(path: &Path, format: Format) -> Result<Vec<Sample>, ProbeError> {
    let samples = read_manifest(path, format)?;
    let missing = samples.iter().filter(|s| s.label.is_none()).count();
    if missing > 0 {
        return Err(invalid(format!(
            "{}: {missing} of {} rows have no label; a probe needs a `label` column filled on every row",
            path.display(),
            samples.len()
        )));
    }
    Ok(samples)
}

/// Deterministic split of `samples` by location: about `fraction` of the
/// locations (and all their images) go to validation.
pub fn split_by_location(samples: Vec<Sample>, fraction: f64, seed: u64) -> (Vec<Sample>, Vec<Sample>) {
    let mut locations: Vec<String> = samples.iter().map(|s| s.location_id.clone()).collect();
    locations.sort();
    locations.dedup();
    Rng::new(seed ^ 0x9e37_79b9_7f4a_7c15).shuffle(&mut locations);
    let n_val = ((locations.len() as f64 * fraction).round() as usize).clamp(1, locations.len().saturating_sub(1));
    let val: std::collections::HashSet<&String> = locations.iter().take(n_val).collect();
    samples.into_iter().partition(|s| !val.contains(&s.location_id))
}

/// Normalized model input `[C, S, S]` of one image: the window, shorter side
/// resized to `S` (antialiased bilinear), centre crop — what the image
/// endpoints of geossl-serve do.
pub fn eval_input(s: &Sample, spec: &ModelSpec) -> Result<Tensor, String> {
    let mut img = image_io::decode(&s.path, spec.bands.len())?;
    if let Some(w) = s.crop {
        img = img.crop(w)?;
    }
    let size = spec.input_size[0] as i64;
    let (h, w) = (img.h as f64, img.w as f64);
    let k = size as f64 / h.min(w);
    let (nh, nw) = (((h * k).round() as i64).max(size), ((w * k).round() as i64).max(size));
    let x = img.tensor().unsqueeze(0).internal_upsample_bilinear2d_aa([nh, nw], false, None, None);
    let x = x.narrow(2, (nh - size) / 2, size).narrow(3, (nw - size) / 2, size).squeeze_dim(0);
    let n = &spec.normalization;
    let c = spec.bands.len() as i64;
    let mean = Tensor::from_slice(&n.mean).reshape([c, 1, 1]);
    let std = Tensor::from_slice(&n.std).reshape([c, 1, 1]);
    Ok((x * f64::from(n.scale) - mean) / std)
}

/// Pooled backbone features `[N, D]` of the readable samples (the others are
/// dropped and counted), batch by batch, in eval mode.
fn features(model: &Model, spec: &ModelSpec, samples: Vec<Sample>, dev: Device) -> (Vec<Sample>, Tensor, usize) {
    let mut kept = Vec::with_capacity(samples.len());
    let mut feats = Vec::new();
    let mut unreadable = 0;
    for chunk in samples.chunks(32) {
        let mut xs = Vec::with_capacity(chunk.len());
        for s in chunk {
            match eval_input(s, spec) {
                Ok(x) => {
                    xs.push(x);
                    kept.push(s.clone());
                }
                Err(e) => {
                    tracing::warn!("skipping unreadable image: {e}");
                    unreadable += 1;
                }
            }
        }
        if !xs.is_empty() {
            let x = Tensor::stack(&xs, 0).to_device(dev);
            feats.push(tch::no_grad(|| model.backbone.pooled(&x, false)));
        }
    }
    let d = spec.backbone.feature_dim() as i64;
    let x = if feats.is_empty() { Tensor::zeros([0, d], (Kind::Float, dev)) } else { Tensor::cat(&feats, 0) };
    (kept, x, unreadable)
}

fn top1(logits: &Tensor, y: &Tensor) -> f64 {
    if y.size()[0] == 0 {
        return f64::NAN;
    }
    logits.argmax(1, false).eq_tensor(y).to_kind(Kind::Float).mean(Kind::Float).double_value(&[])
}

/// Trains `[D → K]` on standardized features for `epochs` (SGD, momentum 0.9,
/// cosine schedule, zero init) and returns the grid point with the weights of
/// its best validation epoch `(W [K, D], b [K])`.
fn fit(train: &Split, val: &Split, k: i64, lr: f64, wd: f64, opts: &ProbeOptions) -> (GridPoint, Tensor, Tensor) {
    let d = train.x.size()[1];
    let vs = nn::VarStore::new(train.x.device());
    let lin = nn::linear(
        vs.root() / "fc",
        d,
        k,
        nn::LinearConfig { ws_init: nn::Init::Const(0.0), bs_init: Some(nn::Init::Const(0.0)), bias: true },
    );
    let mut sgd = match (nn::Sgd { momentum: 0.9, dampening: 0.0, wd, nesterov: false }).build(&vs, lr) {
        Ok(o) => o,
        Err(e) => panic!("building SGD over a linear layer cannot fail: {e}"),
    };
    let n = train.x.size()[0] as usize;
    let mut rng = Rng::new(opts.seed);
    let mut order: Vec<i64> = (0..n as i64).collect();
    let mut best = (GridPoint { learning_rate: lr, weight_decay: wd, best_epoch: 0, val_top1: -1.0 }, None);
    for epoch in 0..opts.epochs {
        sgd.set_lr(crate::pretrain::cosine_lr(lr, epoch as u64, opts.epochs as u64));
        rng.shuffle(&mut order);
        for idx in order.chunks(opts.batch_size.max(1)) {
            let i = Tensor::from_slice(idx).to_device(train.x.device());
            let loss = lin.forward(&train.x.index_select(0, &i)).cross_entropy_for_logits(&train.y.index_select(0, &i));
            sgd.backward_step(&loss);
        }
        let acc = tch::no_grad(|| top1(&lin.forward(&val.x), &val.y));
        if acc > best.0.val_top1 {
            best.0.val_top1 = acc;
            best.0.best_epoch = epoch + 1;
            best.1 = Some((lin.ws.detach().copy(), lin.bs.as_ref().map(|b| b.detach().copy())));
        }
    }
    let (w, b) = best.1.unwrap_or_else(|| (lin.ws.detach().copy(), None));
    let b = b.unwrap_or_else(|| Tensor::zeros([k], (Kind::Float, w.device())));
    (best.0, w, b)
}

/// Runs the probe and writes its outputs into `opts.out`.
pub fn run(opts: &ProbeOptions) -> Result<ProbeReport, ProbeError> {
    if opts.epochs == 0 || opts.batch_size == 0 || opts.learning_rates.is_empty() || opts.weight_decays.is_empty() {
        return Err(invalid("epochs, batch size and the learning-rate and weight-decay grids must be non-empty"));
    }
    if opts.learning_rates.iter().chain(&opts.weight_decays).any(|v| !v.is_finite() || *v < 0.0)
        || opts.learning_rates.contains(&0.0)
    {
        return Err(invalid("learning rates must be positive and weight decays non-negative"));
    }
    if opts.val.is_none() && !(opts.val_fraction > 0.0 && opts.val_fraction < 1.0) {
        return Err(invalid(format!("--val-fraction {} must be between 0 and 1", opts.val_fraction)));
    }
    let loaded = load_checkpoint(&opts.checkpoint, opts.device)?;
    let spec = loaded.spec.clone();
    let train_all = labelled(&opts.train, opts.format)?;
    let (train_s, val_s, validation) = match &opts.val {
        Some(v) => (train_all, labelled(v, opts.format)?, format!("given ({})", v.display())),
        None => {
            let (t, v) = split_by_location(train_all, opts.val_fraction, opts.seed);
            let how = format!("{:.0} % of the training locations held out", opts.val_fraction * 100.0);
            (t, v, how)
        }
    };
    let test_s = opts.test.as_ref().map(|p| labelled(p, opts.format)).transpose()?;
    if train_s.is_empty() || val_s.is_empty() {
        return Err(invalid(format!(
            "{} training and {} validation images: both splits need images (several locations with labels)",
            train_s.len(),
            val_s.len()
        )));
    }
    // Classes: those of the training split, sorted; other labels are errors, not silent misses.
    let classes: Vec<String> = {
        let mut c: Vec<String> = train_s.iter().filter_map(|s| s.label.clone()).collect();
        c.sort();
        c.dedup();
        c
    };
    if classes.len() < 2 {
        return Err(invalid(format!(
            "{}: one class ({:?}); a probe needs at least two",
            opts.train.display(),
            classes
        )));
    }
    let index: BTreeMap<&str, i64> = classes.iter().enumerate().map(|(i, c)| (c.as_str(), i as i64)).collect();
    for (name, split) in [("validation", Some(&val_s)), ("test", test_s.as_ref())] {
        if let Some(bad) = split.and_then(|s| s.iter().find(|s| !index.contains_key(s.label.as_deref().unwrap_or(""))))
        {
            return Err(invalid(format!(
                "{name} label {:?} ({}) does not occur in the training split; classes: {classes:?}",
                bad.label.as_deref().unwrap_or(""),
                bad.path.display()
            )));
        }
    }

    tracing::info!(
        train = train_s.len(),
        val = val_s.len(),
        test = test_s.as_ref().map_or(0, Vec::len),
        classes = classes.len(),
        "extracting frozen features"
    );
    let dev = opts.device;
    let mk = |samples: Vec<Sample>| -> Split {
        let (samples, x, unreadable) = features(&loaded.model, &spec, samples, dev);
        let y: Vec<i64> = samples.iter().map(|s| index[s.label.as_deref().unwrap_or("")]).collect();
        Split { samples, x, y: Tensor::from_slice(&y).to_device(dev), unreadable }
    };
    let (mut train, mut val) = (mk(train_s), mk(val_s));
    let mut test = test_s.map(mk);
    if train.samples.is_empty() || val.samples.is_empty() {
        return Err(invalid("no readable image in the training or validation split"));
    }
    // Standardize with training statistics (folded into the saved head below).
    let mu = train.x.mean_dim([0i64].as_slice(), true, Kind::Float);
    let sigma = train.x.std_dim([0i64].as_slice(), false, true).clamp_min(1e-6);
    for s in [Some(&mut train), Some(&mut val), test.as_mut()].into_iter().flatten() {
        s.x = (&s.x - &mu) / &sigma;
    }

    let k = classes.len() as i64;
    let mut grid = Vec::new();
    let mut chosen: Option<(GridPoint, Tensor, Tensor)> = None;
    for &lr in &opts.learning_rates {
        for &wd in &opts.weight_decays {
            let (g, w, b) = fit(&train, &val, k, lr, wd, opts);
            tracing::info!(lr, wd, epoch = g.best_epoch, val_top1 = g.val_top1, "grid point");
            if chosen.as_ref().is_none_or(|c| g.val_top1 > c.0.val_top1) {
                chosen = Some((g.clone(), w, b));
            }
            grid.push(g);
        }
    }
    let Some((chosen, w, b)) = chosen else { return Err(invalid("empty grid")) };

    // Majority baseline from the training labels.
    let mut counts = vec![0usize; classes.len()];
    for s in &train.samples {
        counts[index[s.label.as_deref().unwrap_or("")] as usize] += 1;
    }
    let majority =
        counts.iter().enumerate().max_by_key(|&(i, n)| (n, std::cmp::Reverse(i))).map_or(0, |(i, _)| i) as i64;
    let logits = |s: &Split| s.x.matmul(&w.tr()) + &b;
    let result = |s: &Split| SplitResult {
        images: s.samples.len(),
        unreadable: s.unreadable,
        top1: top1(&logits(s), &s.y),
        majority_top1: s.y.eq(majority).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]),
    };
    let report = ProbeReport {
        checkpoint: opts.checkpoint.clone(),
        classes: classes.clone(),
        feature_dim: spec.backbone.feature_dim(),
        validation,
        chosen,
        grid,
        train: result(&train),
        val: result(&val),
        test: test.as_ref().map(result),
    };

    std::fs::create_dir_all(&opts.out).map_err(|error| ProbeError::Io { path: opts.out.clone(), error })?;
    write_predictions(
        &opts.out.join("predictions.csv"),
        &[("train", &train), ("val", &val)],
        test.as_ref(),
        &logits,
        &classes,
    )?;
    // The probe on raw features: logits = W·(f − μ)/σ + b = (W/σ)·f + (b − (W/σ)·μ).
    let w_raw = &w / &sigma;
    let b_raw = &b - w_raw.matmul(&mu.squeeze_dim(0));
    save_with_classifier(&loaded, &spec, &classes, &w_raw, &b_raw, &opts.out.join("checkpoint"))?;
    let path = opts.out.join("probe.json");
    let json = serde_json::to_vec_pretty(&report).map_err(|e| invalid(e.to_string()))?;
    std::fs::write(&path, json).map_err(|error| ProbeError::Io { path, error })?;
    Ok(report)
}

fn write_predictions(
    path: &Path,
    splits: &[(&str, &Split)],
    test: Option<&Split>,
    logits: &dyn Fn(&Split) -> Tensor,
    classes: &[String],
) -> Result<(), ProbeError> {
    let mut out = String::from("split,path,label,predicted\n");
    for (name, s) in splits.iter().copied().chain(test.map(|t| ("test", t))) {
        let pred = Vec::<i64>::try_from(logits(s).argmax(1, false).to_device(Device::Cpu)).unwrap_or_default();
        for (sample, p) in s.samples.iter().zip(pred) {
            out.push_str(&format!(
                "{name},{},{},{}\n",
                sample.path.display(),
                sample.label.as_deref().unwrap_or(""),
                classes[p as usize]
            ));
        }
    }
    std::fs::write(path, out).map_err(|error| ProbeError::Io { path: path.to_owned(), error })
}

/// The checkpoint's model with `[K, D]` weights `w` and `[K]` bias `b` as its
/// classifier head (replacing any), saved atomically in `dir`.
fn save_with_classifier(
    loaded: &crate::checkpoint::Loaded,
    spec: &ModelSpec,
    classes: &[String],
    w: &Tensor,
    b: &Tensor,
    dir: &Path,
) -> Result<(), ProbeError> {
    let mut out_spec = spec.clone();
    out_spec.heads.retain(|h| h.kind() != HeadKind::Classifier);
    out_spec.heads.push(HeadSpec::Classifier(ClassifierHead { num_classes: classes.len(), labels: classes.to_vec() }));
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = Model::new(&vs.root(), &out_spec);
    let src = loaded.vs.variables();
    tch::no_grad(|| -> Result<(), ProbeError> {
        for (name, mut v) in vs.variables() {
            let value = match name.as_str() {
                "fc.weight" => w.shallow_clone(),
                "fc.bias" => b.shallow_clone(),
                n => {
                    src.get(n).map(Tensor::shallow_clone).ok_or_else(|| invalid(format!("checkpoint has no `{n}`")))?
                }
            };
            v.copy_(&value.to_device(Device::Cpu));
        }
        Ok(())
    })?;
    save_checkpoint(dir, &out_spec, &vs, |_| Ok(()))?;
    Ok(())
}
