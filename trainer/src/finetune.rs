//! Fine-tuning: the whole backbone plus a new classifier head trained end to
//! end on labelled data (RandomResizedCrop + horizontal flip, SGD with
//! momentum, cosine schedule). The epoch is chosen on the validation split
//! (see [`crate::supervised`]); the test split is scored once, with it.
//!
//! Writes `finetune.json` (report with the validation curve),
//! `predictions.csv` and `checkpoint/` (the fine-tuned model with its
//! classifier head).

use std::path::PathBuf;

use serde::Serialize;
use tch::{Device, Tensor};

use crate::augment::{random_view, AugConfig};
use crate::checkpoint::{load_checkpoint, save_checkpoint};
use crate::data::Sample;
use crate::model::Model;
use crate::supervised::{
    check_training, decode, eval_batches, eval_inputs, invalid, model_from, normalize, sgd, train_best_epoch,
    with_classifier, write_json, write_predictions, DataOptions, EvalError, Labelled, Schedule, SplitResult,
};
use geossl_models::ModelSpec;

/// What [`run`] needs.
#[derive(Debug, Clone)]
pub struct FinetuneOptions {
    pub checkpoint: PathBuf,
    pub data: DataOptions,
    pub out: PathBuf,
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// RandomResizedCrop area range.
    pub crop_scale: [f64; 2],
    pub device: Device,
    /// Threads decoding and augmenting images while the model trains.
    pub workers: usize,
}

/// One epoch of the validation curve.
#[derive(Debug, Clone, Serialize)]
pub struct Epoch {
    pub epoch: usize,
    pub train_loss: f64,
    pub val_top1: f64,
}

/// `finetune.json`.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneReport {
    pub checkpoint: PathBuf,
    pub classes: Vec<String>,
    pub validation: String,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub batch_size: usize,
    pub curve: Vec<Epoch>,
    /// The epoch whose weights were kept (best validation top-1).
    pub chosen_epoch: usize,
    /// Training images that could not be read (skipped every epoch).
    pub unreadable_train: usize,
    pub train: SplitResult,
    pub val: SplitResult,
    pub test: Option<SplitResult>,
}

/// Class ids `[n]` (CPU) predicted for a batch of eval inputs `[n, C, S, S]`, eval mode.
fn predict_batch(model: &Model, x: &Tensor, dev: Device) -> Tensor {
    tch::no_grad(|| model.classify(&x.to_device(dev), false))
        .map_or_else(|| Tensor::zeros([x.size()[0]], (tch::Kind::Int64, Device::Cpu)), |l| l.argmax(1, false))
        .to_device(Device::Cpu)
}

/// Class ids predicted for eval inputs `[C, S, S]` each, 64 at a time.
fn predict(model: &Model, xs: &[Tensor], dev: Device) -> Vec<i64> {
    xs.chunks(64)
        .flat_map(|c| Vec::<i64>::try_from(predict_batch(model, &Tensor::stack(c, 0), dev)).unwrap_or_default())
        .collect()
}

/// Predictions for the readable `samples`, decoded on `workers` threads:
/// `(kept samples, class ids, unreadable)`.
fn predict_samples(
    model: &Model,
    samples: &[Sample],
    spec: &ModelSpec,
    workers: usize,
    dev: Device,
) -> (Vec<Sample>, Vec<i64>, usize) {
    let (kept, p, bad) = eval_batches(samples, spec, workers, 64, |x| predict_batch(model, x, dev));
    (kept, p.and_then(|p| Vec::<i64>::try_from(p).ok()).unwrap_or_default(), bad)
}

fn accuracy(pred: &[i64], y: &[i64]) -> f64 {
    if y.is_empty() {
        return f64::NAN;
    }
    pred.iter().zip(y).filter(|(a, b)| a == b).count() as f64 / y.len() as f64
}

/// Runs fine-tuning and writes its outputs into `opts.out`.
pub fn run(opts: &FinetuneOptions) -> Result<FinetuneReport, EvalError> {
    check_training(opts.epochs, opts.batch_size, opts.learning_rate, opts.weight_decay)?;
    let [lo, hi] = opts.crop_scale;
    if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
        return Err(invalid(format!("crop scale [{lo}, {hi}] must satisfy 0 < min ≤ max ≤ 1")));
    }
    let data = Labelled::load(&opts.data)?;
    let dev = opts.device;
    let source = load_checkpoint(&opts.checkpoint, Device::Cpu)?;
    let spec = with_classifier(&source.spec, &data.classes);
    let (vs, model) = model_from(&source, &spec, "fc.", opts.data.seed, dev);
    drop(source);
    let mut sgd = sgd(&vs, opts.weight_decay);

    // Evaluation inputs are fixed: prepared once.
    let (val_s, val_x, val_bad) = eval_inputs(&data.val, &spec, opts.workers);
    let val_y = data.targets(&val_s);
    if val_s.is_empty() {
        return Err(invalid("no readable image in the validation split"));
    }
    let aug = AugConfig { crop_scale: opts.crop_scale, ..AugConfig::default() };
    let size = spec.input_size[0] as i64;
    let train_y = data.targets(&data.train);
    let schedule = Schedule {
        epochs: opts.epochs,
        batch_size: opts.batch_size,
        learning_rate: opts.learning_rate,
        seed: opts.data.seed,
        workers: opts.workers,
    };
    let trained = train_best_epoch(
        &vs,
        &spec,
        &mut sgd,
        schedule,
        data.train.len(),
        |i, rng| {
            let mut v = random_view(&decode(&data.train[i], &spec)?, size, &aug, rng);
            if rng.next_f64() < aug.flip_p {
                v = v.flip([2]);
            }
            Ok((normalize(&v, &spec), train_y[i]))
        },
        |batch| {
            let (xs, ys): (Vec<Tensor>, Vec<i64>) = batch.into_iter().unzip();
            let x = Tensor::stack(&xs, 0).to_device(dev);
            let y = Tensor::from_slice(&ys).to_device(dev);
            let logits = model.classify(&x, true).ok_or_else(|| invalid("model has no classifier"))?;
            Ok(logits.cross_entropy_for_logits(&y))
        },
        || accuracy(&predict(&model, &val_x, dev), &val_y),
    )?;

    let (train_s, p_train, _) = predict_samples(&model, &data.train, &spec, opts.workers, dev);
    let p_val = predict(&model, &val_x, dev);
    let test = data.test.as_deref().map(|t| predict_samples(&model, t, &spec, opts.workers, dev));
    let report = FinetuneReport {
        checkpoint: opts.checkpoint.clone(),
        classes: data.classes.clone(),
        validation: data.validation.clone(),
        learning_rate: opts.learning_rate,
        weight_decay: opts.weight_decay,
        batch_size: opts.batch_size,
        curve: trained
            .curve
            .iter()
            .map(|&(epoch, train_loss, val_top1)| Epoch { epoch, train_loss, val_top1 })
            .collect(),
        chosen_epoch: trained.chosen_epoch,
        unreadable_train: trained.skipped,
        train: data.result(&train_s, &p_train, trained.skipped),
        val: data.result(&val_s, &p_val, val_bad),
        test: test.as_ref().map(|(s, p, bad)| data.result(s, p, *bad)),
    };
    std::fs::create_dir_all(&opts.out).map_err(|error| EvalError::Io { path: opts.out.clone(), error })?;
    let mut rows: Vec<(&str, &[Sample], Vec<i64>)> = vec![("train", &train_s, p_train), ("val", &val_s, p_val)];
    if let Some((s, p, _)) = &test {
        rows.push(("test", s, p.clone()));
    }
    write_predictions(&opts.out.join("predictions.csv"), &rows, &data.classes)?;
    save_checkpoint(&opts.out.join("checkpoint"), &spec, &vs, |_| Ok(()))?;
    write_json(&opts.out.join("finetune.json"), &report)?;
    Ok(report)
}
