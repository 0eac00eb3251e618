//! Labelled evaluation data shared by `probe` and `finetune`: manifests with a
//! label on every row, a validation split (given, or held out by location so
//! no place is on both sides), class indices, the eval-time input transform
//! and per-split results. Model selection uses the validation split only; the
//! test split is scored once, at the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use geossl_models::{ClassifierHead, HeadKind, HeadSpec, ModelSpec};
use serde::Serialize;
use tch::nn;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{CheckpointError, Loaded};
use crate::data::{read_manifest, DataError, Format, Sample};
use crate::image_io::{self, DecodeError};
use crate::model::Model;
use crate::optim::Sgd;
use crate::rng::Rng;

/// Errors of a probe or fine-tuning run; each names what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
}

impl EvalError {
    /// For `map_err`: an I/O failure on `path`.
    pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EvalError {
        let path = path.to_owned();
        move |error| EvalError::Io { path, error }
    }
}

pub fn invalid(msg: impl Into<String>) -> EvalError {
    EvalError::Invalid(msg.into())
}

/// Sizes and accuracy of one split.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SplitResult {
    pub images: usize,
    /// Images that could not be read (skipped, named in the log).
    pub unreadable: usize,
    pub top1: f64,
    /// Top-1 of always answering the most frequent training class.
    pub majority_top1: f64,
}

/// Where the data come from and how validation is made.
#[derive(Debug, Clone)]
pub struct DataOptions {
    /// Labelled manifests (`label` column filled on every row).
    pub train: PathBuf,
    pub val: Option<PathBuf>,
    pub test: Option<PathBuf>,
    pub format: Format,
    /// Share of training locations held out for validation when `val` is not given.
    pub val_fraction: f64,
    pub seed: u64,
}

/// The three splits and their classes.
#[derive(Debug, Clone)]
pub struct Labelled {
    /// Classes of the training split, sorted; index = class id.
    pub classes: Vec<String>,
    index: BTreeMap<String, i64>,
    pub train: Vec<Sample>,
    pub val: Vec<Sample>,
    pub test: Option<Vec<Sample>>,
    /// How the validation split was made, for reports.
    pub validation: String,
}

fn read_labelled(path: &Path, format: Format) -> Result<Vec<Sample>, EvalError> {
    let samples = read_manifest(path, format)?;
    let missing = samples.iter().filter(|s| s.label.is_none()).count();
    if missing > 0 {
        return Err(invalid(format!(
            "{}: {missing} of {} rows have no label; a `label` column filled on every row is needed",
            path.display(),
            samples.len()
        )));
    }
    Ok(samples)
}

impl Labelled {
    /// Reads and checks the manifests: every row labelled, two classes or
    /// more in training, no validation or test label unknown to training.
    pub fn load(o: &DataOptions) -> Result<Self, EvalError> {
        let all = read_labelled(&o.train, o.format)?;
        let (train, val, validation) = match &o.val {
            Some(v) => (all, read_labelled(v, o.format)?, format!("given ({})", v.display())),
            None => split_by_location(all, o.val_fraction, o.seed, |s| s.location_id.as_str())?,
        };
        let test = o.test.as_ref().map(|p| read_labelled(p, o.format)).transpose()?;
        if train.is_empty() || val.is_empty() {
            return Err(invalid(format!(
                "{} training and {} validation images: both splits need images (several labelled locations)",
                train.len(),
                val.len()
            )));
        }
        let mut classes: Vec<String> = train.iter().filter_map(|s| s.label.clone()).collect();
        classes.sort();
        classes.dedup();
        if classes.len() < 2 {
            return Err(invalid(format!("{}: one class ({classes:?}); at least two are needed", o.train.display())));
        }
        let index: BTreeMap<String, i64> = classes.iter().cloned().zip(0..).collect();
        for (name, split) in [("validation", Some(&val)), ("test", test.as_ref())] {
            if let Some(bad) =
                split.and_then(|s| s.iter().find(|s| !index.contains_key(s.label.as_deref().unwrap_or(""))))
            {
                return Err(invalid(format!(
                    "{name} label {:?} ({}) does not occur in the training split; classes: {classes:?}",
                    bad.label.as_deref().unwrap_or(""),
                    bad.path.display()
                )));
            }
        }
        Ok(Self { classes, index, train, val, test, validation })
    }

    /// Class ids of `samples` (all labelled with known classes, see [`Labelled::load`]).
    pub fn targets(&self, samples: &[Sample]) -> Vec<i64> {
        samples.iter().map(|s| self.index.get(s.label.as_deref().unwrap_or("")).copied().unwrap_or(-1)).collect()
    }

    /// The most frequent training class (ties: the first).
    pub fn majority(&self) -> i64 {
        let mut counts = vec![0usize; self.classes.len()];
        for t in self.targets(&self.train) {
            counts[t as usize] += 1;
        }
        counts.iter().enumerate().max_by_key(|&(i, n)| (n, std::cmp::Reverse(i))).map_or(0, |(i, _)| i as i64)
    }

    /// Accuracy of `pred` against the classes of `samples`.
    pub fn result(&self, samples: &[Sample], pred: &[i64], unreadable: usize) -> SplitResult {
        let y = self.targets(samples);
        let n = y.len().max(1) as f64;
        let m = self.majority();
        SplitResult {
            images: y.len(),
            unreadable,
            top1: if y.is_empty() { f64::NAN } else { y.iter().zip(pred).filter(|(a, b)| a == b).count() as f64 / n },
            majority_top1: if y.is_empty() { f64::NAN } else { y.iter().filter(|&&a| a == m).count() as f64 / n },
        }
    }
}

/// Deterministic validation split by location: about `fraction` of the
/// locations of `items` (by `location`), with all their items, go to
/// validation. Returns `(train, val, how)`, `how` for reports.
pub fn split_by_location<T>(
    items: Vec<T>,
    fraction: f64,
    seed: u64,
    location: impl Fn(&T) -> &str,
) -> Result<(Vec<T>, Vec<T>, String), EvalError> {
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(invalid(format!("--val-fraction {fraction} must be between 0 and 1")));
    }
    let mut locations: Vec<&str> = items.iter().map(&location).collect();
    locations.sort_unstable();
    locations.dedup();
    if locations.len() < 2 {
        return Err(invalid(format!("{} location(s): give a validation manifest or more places", locations.len())));
    }
    Rng::new(seed ^ 0x9e37_79b9_7f4a_7c15).shuffle(&mut locations);
    let n_val = ((locations.len() as f64 * fraction).round() as usize).clamp(1, locations.len() - 1);
    let val: std::collections::HashSet<String> = locations.iter().take(n_val).map(|l| l.to_string()).collect();
    let (train, val): (Vec<T>, Vec<T>) = items.into_iter().partition(|x| !val.contains(location(x)));
    Ok((train, val, format!("{:.0} % of the training locations held out", fraction * 100.0)))
}

/// Decodes `s` (its window when it has one) in stored units, `[C, H, W]`.
pub fn decode(s: &Sample, spec: &ModelSpec) -> Result<Tensor, DecodeError> {
    let mut img = image_io::decode_for(&s.path, spec)?;
    if let Some(w) = s.crop {
        img = img.crop(w)?;
    }
    Ok(img.tensor())
}

/// `[C, H, W]` or `[N, C, H, W]` in stored units → normalized with the spec.
pub fn normalize(x: &Tensor, spec: &ModelSpec) -> Tensor {
    let (mul, add) = spec.normalization.affine();
    let c = spec.bands.len() as i64;
    let shape: &[i64] = if x.dim() == 4 { &[1, c, 1, 1] } else { &[c, 1, 1] };
    let mul = Tensor::from_slice(&mul).reshape(shape).to_device(x.device());
    let add = Tensor::from_slice(&add).reshape(shape).to_device(x.device());
    x * mul + add
}

/// Normalized model input `[C, S, S]` of one image: the window, shorter side
/// resized to `S` (antialiased bilinear), centre crop — what the image
/// endpoints of geossl-serve do.
pub fn eval_input(s: &Sample, spec: &ModelSpec) -> Result<Tensor, DecodeError> {
    let img = decode(s, spec)?;
    let size = spec.input_size[0] as i64;
    let (h, w) = (img.size()[1] as f64, img.size()[2] as f64);
    let k = size as f64 / h.min(w);
    let (nh, nw) = (((h * k).round() as i64).max(size), ((w * k).round() as i64).max(size));
    let x = img.unsqueeze(0).internal_upsample_bilinear2d_aa([nh, nw], false, None, None);
    let x = x.narrow(2, (nh - size) / 2, size).narrow(3, (nw - size) / 2, size).squeeze_dim(0);
    Ok(normalize(&x, spec))
}

/// Eval inputs of the readable samples, decoded on `workers` threads (the
/// others are skipped, logged and counted): `(kept samples, inputs [C, S, S]
/// each, unreadable)`.
pub fn eval_inputs(samples: &[Sample], spec: &ModelSpec, workers: usize) -> (Vec<Sample>, Vec<Tensor>, usize) {
    let (mut kept, mut xs, mut bad) = (Vec::new(), Vec::new(), 0);
    let decoded = samples.iter().zip(crate::pipeline::map_ordered(samples, workers, |s| eval_input(s, spec)));
    keep_readable(decoded, &mut kept, &mut xs, &mut bad);
    (kept, xs, bad)
}

/// Sorts decoded samples: readable ones into `kept` and `xs`, the others
/// logged and counted in `bad`.
fn keep_readable<'a>(
    decoded: impl IntoIterator<Item = (&'a Sample, Result<Tensor, DecodeError>)>,
    kept: &mut Vec<Sample>,
    xs: &mut Vec<Tensor>,
    bad: &mut usize,
) {
    for (s, x) in decoded {
        match x {
            Ok(x) => {
                kept.push(s.clone());
                xs.push(x);
            }
            Err(e) => {
                tracing::warn!("skipping unreadable image: {e}");
                *bad += 1;
            }
        }
    }
}

/// `forward` over the eval inputs of `samples`, `batch` at a time (inputs
/// `[n, C, S, S]` on the CPU), while `workers` threads decode the next batches;
/// memory holds a few batches of pixels, never the whole split. Returns the
/// readable samples, `forward`'s outputs concatenated along dim 0 (`None`
/// when no sample was readable) and the number of unreadable samples
/// (skipped and logged).
pub fn eval_batches(
    samples: &[Sample],
    spec: &ModelSpec,
    workers: usize,
    batch: usize,
    mut forward: impl FnMut(&Tensor) -> Tensor,
) -> (Vec<Sample>, Option<Tensor>, usize) {
    let batch = batch.max(1);
    let (mut kept, mut outs, mut bad) = (Vec::new(), Vec::new(), 0);
    let decode_chunk = |b: usize| {
        let chunk = &samples[b * batch..((b + 1) * batch).min(samples.len())];
        chunk.iter().map(|s| (s, eval_input(s, spec))).collect::<Vec<_>>()
    };
    let run = crate::pipeline::pipeline(samples.len().div_ceil(batch), workers, decode_chunk, |_, decoded| {
        let mut xs = Vec::with_capacity(decoded.len());
        keep_readable(decoded, &mut kept, &mut xs, &mut bad);
        if !xs.is_empty() {
            outs.push(forward(&Tensor::stack(&xs, 0)));
        }
        Ok::<(), std::convert::Infallible>(())
    });
    let Ok(()) = run;
    let out = (!outs.is_empty()).then(|| Tensor::cat(&outs, 0));
    (kept, out, bad)
}

/// Pooled backbone features `[N, D]` of the readable `samples`, in eval mode, 32 at a time, decoded on
/// `workers` threads: `(kept samples, features on dev, unreadable)`.
pub fn frozen_features(
    model: &crate::model::Model,
    samples: &[Sample],
    spec: &ModelSpec,
    workers: usize,
    dev: Device,
) -> (Vec<Sample>, Tensor, usize) {
    let (kept, x, bad) =
        eval_batches(samples, spec, workers, 32, |x| tch::no_grad(|| model.backbone.pooled(&x.to_device(dev), false)));
    let d = spec.backbone.feature_dim() as i64;
    (kept, x.unwrap_or_else(|| Tensor::zeros([0, d], (Kind::Float, dev))), bad)
}

/// Top-1 accuracy of logits `[N, K]` against class ids `[N]`.
pub fn top1(logits: &Tensor, y: &Tensor) -> f64 {
    if y.size()[0] == 0 {
        return f64::NAN;
    }
    logits.argmax(1, false).eq_tensor(y).to_kind(Kind::Float).mean(Kind::Float).double_value(&[])
}

/// `predictions.csv`: `split,path,label,predicted` for each `(split, samples, predicted class ids)`.
pub fn write_predictions(
    path: &Path,
    rows: &[(&str, &[Sample], Vec<i64>)],
    classes: &[String],
) -> Result<(), EvalError> {
    let mut out = String::from("split,path,label,predicted\n");
    for (name, samples, pred) in rows {
        for (s, &p) in samples.iter().zip(pred) {
            let predicted = usize::try_from(p).ok().and_then(|p| classes.get(p)).map_or("", String::as_str);
            out.push_str(&format!("{name},{},{},{predicted}\n", s.path.display(), s.label.as_deref().unwrap_or("")));
        }
    }
    std::fs::write(path, out).map_err(|error| EvalError::Io { path: path.to_owned(), error })
}

/// `spec` with a classifier over `classes` in place of any it had.
pub fn with_classifier(spec: &ModelSpec, classes: &[String]) -> ModelSpec {
    let mut s = spec.clone();
    s.heads.retain(|h| h.kind() != HeadKind::Classifier);
    s.heads.push(HeadSpec::Classifier(ClassifierHead { num_classes: classes.len(), labels: classes.to_vec() }));
    s
}

/// Writes `value` as pretty JSON to `path`.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<(), EvalError> {
    let json = serde_json::to_vec_pretty(value).map_err(|e| invalid(e.to_string()))?;
    std::fs::write(path, json).map_err(|error| EvalError::Io { path: path.to_owned(), error })
}

/// Positive epochs and batch size, a positive finite learning rate, a finite
/// non-negative weight decay.
pub fn check_training(epochs: usize, batch_size: usize, lr: f64, wd: f64) -> Result<(), EvalError> {
    let lr_ok = lr.is_finite() && lr > 0.0;
    let wd_ok = wd.is_finite() && wd >= 0.0;
    if epochs == 0 || batch_size == 0 || !lr_ok || !wd_ok {
        return Err(invalid(format!(
            "epochs ({epochs}) and batch size ({batch_size}) must be positive, the learning rate ({lr}) positive, \
             weight decay ({wd}) ≥ 0"
        )));
    }
    Ok(())
}

/// A model of `spec` on `dev` holding `source`'s weights for every parameter
/// except those under `new_head` (e.g. `fc.`), which keep their initialisation
/// (drawn from `seed`).
pub fn model_from(source: &Loaded, spec: &ModelSpec, new_head: &str, seed: u64, dev: Device) -> (nn::VarStore, Model) {
    // The new head's initialization follows the run's seed: runs repeat exactly.
    tch::manual_seed(seed as i64);
    let vs = nn::VarStore::new(dev);
    let model = Model::new(&vs.root(), spec);
    let src = source.vs.variables();
    tch::no_grad(|| {
        for (name, mut v) in vs.variables() {
            if let Some(t) = src.get(&name).filter(|_| !name.starts_with(new_head)) {
                v.copy_(&t.to_device(dev));
            }
        }
    });
    (vs, model)
}

/// SGD with momentum 0.9 and weight decay `wd` over the trainable variables of `vs`.
pub fn sgd(vs: &nn::VarStore, wd: f64) -> Sgd {
    Sgd::over(vs, 0.9, wd)
}

/// Length, batch size, peak learning rate, seed and data workers of an
/// end-to-end training run.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub seed: u64,
    /// Threads preparing training batches while the current one trains.
    pub workers: usize,
}

/// What [`train_best_epoch`] reports: per epoch `(epoch, mean training loss,
/// validation score)`, the chosen epoch, and the training examples skipped.
#[derive(Debug, Clone)]
pub struct Trained {
    pub curve: Vec<(usize, f64, f64)>,
    pub chosen_epoch: usize,
    pub skipped: usize,
}

/// Trains the model of `vs` (spec `spec`) with `sgd` on a cosine schedule over
/// shuffled batches of the training indices `0..n`: `example(i, rng)`
/// prepares one training example on one of `s.workers` threads (an error
/// skips it, logged once per example; each example draws from its own RNG,
/// so results do not depend on the number of workers), `loss(batch)` gives a
/// batch's loss, `score()` the validation score after each epoch. The weights
/// of the best-scoring epoch (the first of equals) are restored at the end. A
/// non-finite loss, or an epoch without a batch, stops with an error; nothing
/// is saved then.
#[allow(clippy::too_many_arguments)]
pub fn train_best_epoch<E: Send>(
    vs: &nn::VarStore,
    spec: &ModelSpec,
    sgd: &mut Sgd,
    s: Schedule,
    n: usize,
    example: impl Fn(usize, &mut Rng) -> Result<E, DecodeError> + Sync,
    mut loss: impl FnMut(Vec<E>) -> Result<Tensor, EvalError>,
    mut score: impl FnMut() -> f64,
) -> Result<Trained, EvalError> {
    let mut rng = Rng::new(s.seed);
    let mut order: Vec<usize> = (0..n).collect();
    let mut skipped = std::collections::BTreeSet::new();
    let mut curve = Vec::with_capacity(s.epochs);
    let mut best: Option<(usize, f64, geossl_models::StateDict)> = None;
    for epoch in 1..=s.epochs {
        let lr = crate::optim::cosine_lr(s.learning_rate, epoch as u64 - 1, s.epochs as u64);
        rng.shuffle(&mut order);
        let seeds: Vec<u64> = order.iter().map(|_| rng.next_u64()).collect();
        let (order, seeds) = (&order, &seeds);
        let batches = order.len().div_ceil(s.batch_size.max(1));
        let (mut loss_sum, mut stepped) = (0.0, 0usize);
        let prepare = |b: usize| {
            let range = b * s.batch_size..((b + 1) * s.batch_size).min(order.len());
            range.map(|k| (order[k], example(order[k], &mut Rng::new(seeds[k])))).collect::<Vec<_>>()
        };
        crate::pipeline::pipeline(batches, s.workers, prepare, |_, prepared| {
            let mut batch = Vec::with_capacity(prepared.len());
            for (i, e) in prepared {
                match e {
                    Ok(e) => batch.push(e),
                    Err(e) => {
                        if skipped.insert(i) {
                            tracing::warn!("skipping training example: {e}");
                        }
                    }
                }
            }
            if batch.len() < 2 {
                return Ok(()); // BatchNorm needs two samples; the next epoch reshuffles
            }
            let l = loss(batch)?;
            let v = l.double_value(&[]);
            if !v.is_finite() {
                return Err(invalid(format!(
                    "loss became {v} in epoch {epoch}; stopped (lower the learning rate, check the data); nothing was saved"
                )));
            }
            sgd.backward_step(&l, lr);
            loss_sum += v;
            stepped += 1;
            Ok(())
        })?;
        if stepped == 0 {
            return Err(invalid(format!(
                "no training batch in epoch {epoch}: {} of {n} training examples unusable (see the warnings)",
                skipped.len()
            )));
        }
        let sc = score();
        let train_loss = loss_sum / stepped as f64;
        tracing::info!(epoch, train_loss, score = sc, "epoch");
        curve.push((epoch, train_loss, sc));
        if best.as_ref().is_none_or(|b| sc > b.1 || b.1.is_nan()) {
            best = Some((epoch, sc, crate::checkpoint::state_dict(vs, spec)?));
        }
    }
    let Some((chosen_epoch, _, weights)) = best else { return Err(invalid("no epoch ran")) };
    crate::checkpoint::load_state_dict(vs, spec, &weights, std::path::Path::new("<best epoch>"))?;
    Ok(Trained { curve, chosen_epoch, skipped: skipped.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_by_location_keeps_places_whole_and_refuses_one_place() {
        let items: Vec<(String, usize)> = (0..50).map(|i| (format!("loc{}", i % 10), i)).collect();
        let (train, val, how) = match split_by_location(items, 0.2, 3, |x| x.0.as_str()) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        let places = |v: &[(String, usize)]| v.iter().map(|x| x.0.clone()).collect::<std::collections::BTreeSet<_>>();
        assert_eq!((places(&train).len(), places(&val).len()), (8, 2), "{how}");
        assert!(places(&train).is_disjoint(&places(&val)));
        assert_eq!(train.len() + val.len(), 50);
        let one: Vec<(String, usize)> = (0..5).map(|i| ("same".to_string(), i)).collect();
        let err = split_by_location(one, 0.2, 3, |x| x.0.as_str()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("1 location"), "{err}");
        let err = split_by_location(vec![("a".to_string(), 0)], 1.5, 0, |x| x.0.as_str()).err().map(|e| e.to_string());
        assert!(err.unwrap_or_default().contains("--val-fraction 1.5"));
    }
}
