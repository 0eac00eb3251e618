//! Linear probe: the paper's evaluation of a pretrained backbone. Features of
//! the frozen backbone (eval mode, [`eval_input`](crate::supervised::eval_input))
//! train a linear classifier; learning rate, weight decay and epoch are chosen
//! on the validation split (see [`crate::supervised`]); the test split is
//! scored once, with the chosen model.
//!
//! Writes `probe.json` (report), `predictions.csv` and `checkpoint/` (the
//! backbone plus the probe as its classifier head, ready for
//! `geossl-export onnx --head classify` and `/classify`).

use std::path::{Path, PathBuf};

use serde::Serialize;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{load_checkpoint, save_checkpoint, Loaded};
use crate::model::Model;
use crate::rng::Rng;
use crate::supervised::{
    check_training, frozen_features, invalid, top1, with_classifier, write_json, write_predictions, DataOptions,
    EvalError, Labelled, SplitResult,
};

/// What [`run`] needs.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    pub checkpoint: PathBuf,
    pub data: DataOptions,
    pub out: PathBuf,
    pub epochs: usize,
    pub batch_size: usize,
    /// Grid searched on the validation split.
    pub learning_rates: Vec<f64>,
    pub weight_decays: Vec<f64>,
    pub device: Device,
    /// Threads decoding images ahead of feature extraction.
    pub workers: usize,
}

/// One grid point: its best validation top-1 and the epoch it was reached at.
#[derive(Debug, Clone, Serialize)]
pub struct GridPoint {
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub best_epoch: usize,
    pub val_top1: f64,
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
    samples: Vec<crate::data::Sample>,
    /// `[N, D]` float, on the probe device.
    x: Tensor,
    /// `[N]` int64 class indices.
    y: Tensor,
    unreadable: usize,
}

/// Trains `[D → K]` on standardized features for `epochs` (SGD, momentum 0.9,
/// cosine schedule, zero init) and returns the grid point with the weights of
/// its best validation epoch `(W [K, D], b [K])`.
fn fit(train: &Split, val: &Split, k: i64, lr: f64, wd: f64, opts: &ProbeOptions) -> (GridPoint, Tensor, Tensor) {
    let d = train.x.size()[1];
    let vs = nn::VarStore::new(train.x.device());
    let zero = nn::LinearConfig { ws_init: nn::Init::Const(0.0), bs_init: Some(nn::Init::Const(0.0)), bias: true };
    let lin = nn::linear(vs.root() / "fc", d, k, zero);
    let mut sgd = crate::optim::Sgd::over(&vs, 0.9, wd);
    let mut rng = Rng::new(opts.data.seed);
    let mut order: Vec<i64> = (0..train.x.size()[0]).collect();
    let mut best = GridPoint { learning_rate: lr, weight_decay: wd, best_epoch: 0, val_top1: -1.0 };
    let mut weights = (lin.ws.detach().copy(), Tensor::zeros([k], (Kind::Float, train.x.device())));
    for epoch in 0..opts.epochs {
        let epoch_lr = crate::optim::cosine_lr(lr, epoch as u64, opts.epochs as u64);
        rng.shuffle(&mut order);
        for idx in order.chunks(opts.batch_size) {
            let i = Tensor::from_slice(idx).to_device(train.x.device());
            let loss = lin.forward(&train.x.index_select(0, &i)).cross_entropy_for_logits(&train.y.index_select(0, &i));
            sgd.backward_step(&loss, epoch_lr);
        }
        let acc = tch::no_grad(|| top1(&lin.forward(&val.x), &val.y));
        if acc > best.val_top1 {
            best.val_top1 = acc;
            best.best_epoch = epoch + 1;
            let b = lin.bs.as_ref().map_or_else(|| weights.1.copy(), |b| b.detach().copy());
            weights = (lin.ws.detach().copy(), b);
        }
    }
    (best, weights.0, weights.1)
}

/// Checks the grid and sizes of a run: every grid point as a training run.
fn check(opts: &ProbeOptions) -> Result<(), EvalError> {
    if opts.learning_rates.is_empty() || opts.weight_decays.is_empty() {
        return Err(invalid("the learning-rate and weight-decay grids must be non-empty"));
    }
    for &lr in &opts.learning_rates {
        for &wd in &opts.weight_decays {
            check_training(opts.epochs, opts.batch_size, lr, wd).map_err(|e| {
                invalid(format!(
                    "grid of learning rates {:?} × weight decays {:?}: {e}",
                    opts.learning_rates, opts.weight_decays
                ))
            })?;
        }
    }
    Ok(())
}

/// Runs the probe and writes its outputs into `opts.out`.
pub fn run(opts: &ProbeOptions) -> Result<ProbeReport, EvalError> {
    check(opts)?;
    let data = Labelled::load(&opts.data)?;
    let loaded = load_checkpoint(&opts.checkpoint, opts.device)?;
    let spec = &loaded.spec;
    let d = spec.backbone.feature_dim() as i64;
    let dev = opts.device;
    tracing::info!(
        train = data.train.len(),
        val = data.val.len(),
        test = data.test.as_ref().map_or(0, Vec::len),
        classes = data.classes.len(),
        "extracting frozen features"
    );
    let mk = |samples: &[crate::data::Sample]| -> Split {
        let (samples, x, unreadable) = frozen_features(&loaded.model, samples, spec, opts.workers, dev);
        Split { y: Tensor::from_slice(&data.targets(&samples)).to_device(dev), samples, x, unreadable }
    };
    let (mut train, mut val) = (mk(&data.train), mk(&data.val));
    let mut test = data.test.as_deref().map(mk);
    if train.samples.is_empty() || val.samples.is_empty() {
        return Err(invalid("no readable image in the training or validation split"));
    }
    // Standardize with training statistics (folded into the saved head below).
    let mu = train.x.mean_dim([0i64].as_slice(), true, Kind::Float);
    let sigma = train.x.std_dim([0i64].as_slice(), false, true).clamp_min(1e-6);
    for s in [Some(&mut train), Some(&mut val), test.as_mut()].into_iter().flatten() {
        s.x = (&s.x - &mu) / &sigma;
    }

    let k = data.classes.len() as i64;
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
    let predict = |s: &Split| -> Vec<i64> {
        Vec::try_from((s.x.matmul(&w.tr()) + &b).argmax(1, false).to_device(Device::Cpu)).unwrap_or_default()
    };
    let (p_train, p_val) = (predict(&train), predict(&val));
    let p_test = test.as_ref().map(predict);
    let report = ProbeReport {
        checkpoint: opts.checkpoint.clone(),
        classes: data.classes.clone(),
        feature_dim: d as usize,
        validation: data.validation.clone(),
        chosen,
        grid,
        train: data.result(&train.samples, &p_train, train.unreadable),
        val: data.result(&val.samples, &p_val, val.unreadable),
        test: test.as_ref().zip(p_test.as_ref()).map(|(t, p)| data.result(&t.samples, p, t.unreadable)),
    };

    std::fs::create_dir_all(&opts.out).map_err(|error| EvalError::Io { path: opts.out.clone(), error })?;
    let mut rows = vec![("train", &train.samples[..], p_train), ("val", &val.samples[..], p_val)];
    if let (Some(t), Some(p)) = (&test, p_test) {
        rows.push(("test", &t.samples[..], p));
    }
    write_predictions(&opts.out.join("predictions.csv"), &rows, &data.classes)?;
    // The probe on raw features: logits = W·(f − μ)/σ + b = (W/σ)·f + (b − (W/σ)·μ).
    let w_raw = &w / &sigma;
    let b_raw = &b - w_raw.matmul(&mu.squeeze_dim(0));
    save_with_classifier(&loaded, &data.classes, &w_raw, &b_raw, &opts.out.join("checkpoint"))?;
    write_json(&opts.out.join("probe.json"), &report)?;
    Ok(report)
}

/// The checkpoint's model with `[K, D]` weights `w` and `[K]` bias `b` as its
/// classifier head (replacing any), saved atomically in `dir`.
fn save_with_classifier(
    loaded: &Loaded,
    classes: &[String],
    w: &Tensor,
    b: &Tensor,
    dir: &Path,
) -> Result<(), EvalError> {
    let spec = with_classifier(&loaded.spec, classes);
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = Model::new(&vs.root(), &spec);
    let src = loaded.vs.variables();
    tch::no_grad(|| -> Result<(), EvalError> {
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
    save_checkpoint(dir, &spec, &vs, |_| Ok(()))?;
    Ok(())
}
