//! Semantic segmentation: an FCN head (see `geossl_models::SegmentationHead`)
//! on a pretrained backbone, trained end to end on image/mask pairs (random
//! crops of the input size, shared flips, per-pixel cross-entropy with an
//! ignore value). The epoch is chosen on the validation split's mean IoU; the
//! test split is scored once, with it. Evaluation runs on whole images, as
//! geossl-serve's `/segment` does.
//!
//! Manifest: CSV with a header naming `path` and `mask` (and optionally
//! `location_id`, used to hold out validation places; paths relative to the
//! manifest). A mask is a one-band 8-bit PNG/TIFF of class ids, aligned with
//! its image; `ignore_index` marks pixels without a label.
//!
//! Writes `segment.json` (curve, chosen epoch, pixel accuracy, per-class IoU
//! and mIoU per split) and `checkpoint/` (for `geossl-export onnx --head segment`).

use std::path::{Path, PathBuf};

use geossl_models::{HeadKind, HeadSpec, ModelSpec, SegmentationHead};
use serde::Serialize;
use tch::{Device, Kind, Reduction, Tensor};

use crate::checkpoint::{load_checkpoint, save_checkpoint};
use crate::image_io::{self, DecodeError};
use crate::model::Model;
use crate::rng::Rng;
use crate::supervised::{
    check_training, invalid, model_from, normalize, sgd, split_by_location, train_best_epoch, write_json, EvalError,
    Schedule,
};

/// What [`run`] needs.
#[derive(Debug, Clone)]
pub struct SegmentOptions {
    pub checkpoint: PathBuf,
    pub train: PathBuf,
    pub val: Option<PathBuf>,
    pub test: Option<PathBuf>,
    /// Share of training locations held out for validation when `val` is not given.
    pub val_fraction: f64,
    pub seed: u64,
    pub out: PathBuf,
    /// Class names; their number is the number of classes (mask values 0..K-1).
    pub classes: Vec<String>,
    /// Mask value of unlabelled pixels.
    pub ignore_index: u8,
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub device: Device,
    /// Threads decoding and cropping images while the model trains.
    pub workers: usize,
}

/// One image/mask pair.
#[derive(Debug, Clone)]
pub struct Pair {
    pub image: PathBuf,
    pub mask: PathBuf,
    pub location_id: String,
}

/// Segmentation quality of one split.
#[derive(Debug, Clone, Serialize)]
pub struct SegResult {
    pub images: usize,
    pub unreadable: usize,
    /// Labelled pixels scored.
    pub pixels: u64,
    pub pixel_accuracy: f64,
    /// Per class, `NaN` (JSON null) when the class is absent from both truth and prediction.
    pub iou: Vec<f64>,
    /// Mean over classes that occur.
    pub miou: f64,
}

/// One epoch of the validation curve.
#[derive(Debug, Clone, Serialize)]
pub struct Epoch {
    pub epoch: usize,
    pub train_loss: f64,
    pub val_miou: f64,
}

/// `segment.json`.
#[derive(Debug, Clone, Serialize)]
pub struct SegmentReport {
    pub checkpoint: PathBuf,
    pub classes: Vec<String>,
    pub validation: String,
    pub curve: Vec<Epoch>,
    pub chosen_epoch: usize,
    pub train: SegResult,
    pub val: SegResult,
    pub test: Option<SegResult>,
}

/// Reads a `path,mask[,location_id]` manifest.
pub fn read_pairs(manifest: &Path) -> Result<Vec<Pair>, EvalError> {
    let text = std::fs::read_to_string(manifest).map_err(|error| EvalError::Io { path: manifest.to_owned(), error })?;
    let dir = manifest.parent().unwrap_or(Path::new("."));
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines.next().unwrap_or("").split(',').map(str::trim).collect();
    let col = |n: &str| header.iter().position(|h| *h == n);
    let (Some(ci), Some(cm)) = (col("path"), col("mask")) else {
        return Err(invalid(format!("{}: the header must name `path` and `mask` columns", manifest.display())));
    };
    let cl = col("location_id");
    let mut out = Vec::new();
    for (n, line) in lines.enumerate() {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let get = |i: usize| f.get(i).copied().filter(|s| !s.is_empty());
        let (Some(i), Some(m)) = (get(ci), get(cm)) else {
            return Err(invalid(format!("{} line {}: empty path or mask", manifest.display(), n + 2)));
        };
        out.push(Pair {
            image: dir.join(i),
            mask: dir.join(m),
            location_id: cl.and_then(get).unwrap_or(i).to_string(),
        });
    }
    if out.is_empty() {
        return Err(invalid(format!("{}: no rows", manifest.display())));
    }
    Ok(out)
}

/// Image `[C, H, W]` (stored units) and mask `[H, W]` (int64 class ids) of a pair.
fn load_pair(p: &Pair, spec: &ModelSpec, k: usize, ignore: u8) -> Result<(Tensor, Tensor), DecodeError> {
    let img = image_io::decode_for(&p.image, spec)?;
    let m = image_io::decode(&p.mask, &image_io::positional(1)).map_err(|e| DecodeError::Mask(format!("mask {e}")))?;
    if (m.h, m.w) != (img.h, img.w) {
        return Err(DecodeError::Mask(format!(
            "{}: mask is {}×{}, image {} is {}×{}",
            p.mask.display(),
            m.w,
            m.h,
            p.image.display(),
            img.w,
            img.h
        )));
    }
    let m = m.tensor();
    let values =
        Vec::<f32>::try_from(m.flatten(0, -1)).map_err(|e| DecodeError::Mask(format!("{}: {e}", p.mask.display())))?;
    if let Some(v) = values.iter().find(|&&v| v != f32::from(ignore) && (v < 0.0 || v >= k as f32 || v.fract() != 0.0))
    {
        return Err(DecodeError::Mask(format!(
            "{}: mask value {v} is not a class id (0..{}) or {ignore}",
            p.mask.display(),
            k - 1
        )));
    }
    let mask = m.squeeze_dim(0).to_kind(Kind::Int64);
    Ok((img.tensor(), mask))
}

/// [`load_pair`] with the image normalized for the model: what evaluation scores.
fn load_normalized(p: &Pair, spec: &ModelSpec, k: usize, ignore: u8) -> Result<(Tensor, Tensor), DecodeError> {
    load_pair(p, spec, k, ignore).map(|(img, mask)| (normalize(&img, spec), mask))
}

/// Confusion-matrix scores of predicted `[H, W]` class ids against `truth`.
#[derive(Debug, Clone)]
struct Confusion {
    k: usize,
    m: Vec<u64>,
}

impl Confusion {
    fn new(k: usize) -> Self {
        Self { k, m: vec![0; k * k] }
    }

    fn add(&mut self, pred: &Tensor, truth: &Tensor, ignore: u8) {
        let keep = truth.ne(i64::from(ignore));
        let t = truth.masked_select(&keep);
        let p = pred.masked_select(&keep);
        let idx = (t * self.k as i64 + p).bincount::<Tensor>(None, (self.k * self.k) as i64);
        let counts = Vec::<i64>::try_from(idx.to_device(Device::Cpu)).unwrap_or_default();
        for (c, n) in self.m.iter_mut().zip(counts) {
            *c += n as u64;
        }
    }

    fn result(&self, images: usize, unreadable: usize) -> SegResult {
        let k = self.k;
        let total: u64 = self.m.iter().sum();
        let correct: u64 = (0..k).map(|i| self.m[i * k + i]).sum();
        let iou: Vec<f64> = (0..k)
            .map(|c| {
                let tp = self.m[c * k + c] as f64;
                let fn_: f64 = (0..k).map(|j| self.m[c * k + j] as f64).sum::<f64>() - tp;
                let fp: f64 = (0..k).map(|i| self.m[i * k + c] as f64).sum::<f64>() - tp;
                if tp + fn_ + fp == 0.0 {
                    f64::NAN
                } else {
                    tp / (tp + fn_ + fp)
                }
            })
            .collect();
        let present: Vec<f64> = iou.iter().copied().filter(|v| !v.is_nan()).collect();
        SegResult {
            images,
            unreadable,
            pixels: total,
            pixel_accuracy: if total == 0 { f64::NAN } else { correct as f64 / total as f64 },
            miou: if present.is_empty() { f64::NAN } else { present.iter().sum::<f64>() / present.len() as f64 },
            iou,
        }
    }
}

/// Scores `pairs` on whole images, one at a time, in eval mode (`k` classes,
/// `ignore` = the unlabelled mask value), while `workers` threads decode the
/// next pairs.
pub fn evaluate(
    model: &Model,
    spec: &ModelSpec,
    pairs: &[Pair],
    k: usize,
    ignore: u8,
    workers: usize,
    dev: Device,
) -> SegResult {
    let mut conf = Confusion::new(k);
    let (mut n, mut unreadable) = (0, 0);
    let decode = |i: usize| load_normalized(&pairs[i], spec, k, ignore);
    let run = crate::pipeline::pipeline(pairs.len(), workers, decode, |_, pair| {
        match pair {
            Ok((img, mask)) => n += usize::from(score_one(model, &img, &mask, &mut conf, ignore, dev)),
            Err(e) => {
                tracing::warn!("skipping unreadable pair: {e}");
                unreadable += 1;
            }
        }
        Ok::<(), std::convert::Infallible>(())
    });
    let Ok(()) = run;
    conf.result(n, unreadable)
}

/// Adds the prediction for one normalized image `[C, H, W]` against its mask
/// `[H, W]` to `conf`; false when the model has no segmentation head.
fn score_one(model: &Model, img: &Tensor, mask: &Tensor, conf: &mut Confusion, ignore: u8, dev: Device) -> bool {
    let Some(logits) = tch::no_grad(|| model.segment(&img.unsqueeze(0).to_device(dev), false)) else { return false };
    conf.add(&logits.argmax(1, false).squeeze_dim(0), &mask.to_device(dev), ignore);
    true
}

/// Evaluation pairs decoded once (on `workers` threads): normalized images
/// `[C, H, W]` and masks `[H, W]`.
struct Decoded {
    items: Vec<(Tensor, Tensor)>,
    unreadable: usize,
}

impl Decoded {
    fn new(pairs: &[Pair], spec: &ModelSpec, k: usize, ignore: u8, workers: usize) -> Self {
        let (mut items, mut unreadable) = (Vec::with_capacity(pairs.len()), 0);
        for pair in crate::pipeline::map_ordered(pairs, workers, |p| load_normalized(p, spec, k, ignore)) {
            match pair {
                Ok(item) => items.push(item),
                Err(e) => {
                    tracing::warn!("skipping unreadable pair: {e}");
                    unreadable += 1;
                }
            }
        }
        Self { items, unreadable }
    }
}

fn score(model: &Model, data: &Decoded, k: usize, ignore: u8, dev: Device) -> SegResult {
    let mut conf = Confusion::new(k);
    let n = data.items.iter().filter(|(img, mask)| score_one(model, img, mask, &mut conf, ignore, dev)).count();
    conf.result(n, data.unreadable)
}

/// A random `size`×`size` window of image and mask, flipped together half the time.
fn random_crop(img: &Tensor, mask: &Tensor, size: i64, rng: &mut Rng) -> Option<(Tensor, Tensor)> {
    let (h, w) = (img.size()[1], img.size()[2]);
    if h < size || w < size {
        return None;
    }
    let y = rng.below((h - size + 1) as usize) as i64;
    let x = rng.below((w - size + 1) as usize) as i64;
    let (mut i, mut m) = (img.narrow(1, y, size).narrow(2, x, size), mask.narrow(0, y, size).narrow(1, x, size));
    if rng.next_f64() < 0.5 {
        i = i.flip([2]);
        m = m.flip([1]);
    }
    Some((i, m))
}

/// Runs segmentation training and writes its outputs into `opts.out`.
pub fn run(opts: &SegmentOptions) -> Result<SegmentReport, EvalError> {
    let k = opts.classes.len();
    if k < 2 || usize::from(opts.ignore_index) < k {
        return Err(invalid(format!(
            "{k} classes with ignore value {}: name at least two classes (--classes), and the ignore value must not be a class id",
            opts.ignore_index
        )));
    }
    check_training(opts.epochs, opts.batch_size, opts.learning_rate, opts.weight_decay)?;
    let all = read_pairs(&opts.train)?;
    let (train, val, validation) = match &opts.val {
        Some(v) => (all, read_pairs(v)?, format!("given ({})", v.display())),
        None => split_by_location(all, opts.val_fraction, opts.seed, |p| p.location_id.as_str())?,
    };
    let test = opts.test.as_deref().map(read_pairs).transpose()?;

    let dev = opts.device;
    let source = load_checkpoint(&opts.checkpoint, Device::Cpu)?;
    let mut spec = source.spec.clone();
    spec.heads.retain(|h| h.kind() != HeadKind::Segmentation);
    spec.heads.push(HeadSpec::Segmentation(SegmentationHead {
        num_classes: k,
        hidden: 64,
        labels: opts.classes.clone(),
    }));
    spec.validate().map_err(|e| invalid(e.to_string()))?;
    let (vs, model) = model_from(&source, &spec, "seg.", opts.seed, dev);
    drop(source);
    let mut sgd = sgd(&vs, opts.weight_decay);
    let size = spec.input_size[0] as i64;
    // Validation is scored after every epoch: decoded once.
    let val_data = Decoded::new(&val, &spec, k, opts.ignore_index, opts.workers);
    let schedule = Schedule {
        epochs: opts.epochs,
        batch_size: opts.batch_size,
        learning_rate: opts.learning_rate,
        seed: opts.seed,
        workers: opts.workers,
    };
    let trained = train_best_epoch(
        &vs,
        &spec,
        &mut sgd,
        schedule,
        train.len(),
        |i, rng| {
            let (img, m) = load_pair(&train[i], &spec, k, opts.ignore_index)?;
            let (img, m) = random_crop(&img, &m, size, rng).ok_or_else(|| {
                DecodeError::Window(format!(
                    "{} is smaller than the {size}×{size} training crop",
                    train[i].image.display()
                ))
            })?;
            Ok((normalize(&img, &spec), m))
        },
        |batch| {
            let (xs, ms): (Vec<Tensor>, Vec<Tensor>) = batch.into_iter().unzip();
            let x = Tensor::stack(&xs, 0).to_device(dev);
            let m = Tensor::stack(&ms, 0).to_device(dev);
            let logits = model.segment(&x, true).ok_or_else(|| invalid("model has no segmentation head"))?;
            Ok(logits.cross_entropy_loss::<Tensor>(&m, None, Reduction::Mean, i64::from(opts.ignore_index), 0.0))
        },
        || score(&model, &val_data, k, opts.ignore_index, dev).miou,
    )?;
    let ev = |pairs: &[Pair]| evaluate(&model, &spec, pairs, k, opts.ignore_index, opts.workers, dev);
    let report = SegmentReport {
        checkpoint: opts.checkpoint.clone(),
        classes: opts.classes.clone(),
        validation,
        curve: trained
            .curve
            .iter()
            .map(|&(epoch, train_loss, val_miou)| Epoch { epoch, train_loss, val_miou })
            .collect(),
        chosen_epoch: trained.chosen_epoch,
        train: ev(&train),
        val: score(&model, &val_data, k, opts.ignore_index, dev),
        test: test.as_deref().map(ev),
    };
    std::fs::create_dir_all(&opts.out).map_err(|error| EvalError::Io { path: opts.out.clone(), error })?;
    save_checkpoint(&opts.out.join("checkpoint"), &spec, &vs, |_| Ok(()))?;
    write_json(&opts.out.join("segment.json"), &report)?;
    Ok(report)
}
