//! The pretraining run: MoCo-v2 ([`crate::moco`]), optionally with temporal positives and the geo-location
//! pretext (Ayush et al., ICCV 2021), over a run directory ([`RunDir`]): the data and its checks, the geo
//! clusters, the loader, and a short loop of steps, logs and checkpoints.

use std::io::Write;
use std::path::{Path, PathBuf};

use geossl_models::checkpoint::{recover_dir, CheckpointPaths};
use geossl_models::{sha256_hex, EmbeddingHead, GeoHead, HeadSpec, ModelSpec, ProjectionSpec, TrainingInfo};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::amp::LossScale;
use crate::augment::Geometric;
use crate::checkpoint::{save_checkpoint, CheckpointError};
use crate::config::PretrainConfig;
use crate::data::{read_manifest, PairStats, Sample, TemporalIndex};
use crate::geo::{assign, kmeans_sphere, to_unit};
use crate::loader::{Loader, LoaderConfig};
use crate::moco::{Moco, StepOut};
use crate::optim::cosine_lr;
use crate::pack::Pack;

pub const CONFIG_FILE: &str = "config.toml";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const CHECKPOINT_DIR: &str = "checkpoint";

/// Errors of a pretraining run.
#[derive(Debug, thiserror::Error)]
pub enum PretrainError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Loader(#[from] crate::loader::LoaderError),
    #[error(transparent)]
    Dist(#[from] geossl_dist::DistError),
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error(
        "loss became {loss} at step {step}; stopped. The last good checkpoint ({checkpoint}) is kept: lower the learning rate or check the data"
    )]
    NonFinite { step: u64, loss: f64, checkpoint: String },
    #[error(
        "the embeddings collapsed at step {step}: {why}; stopped (--stop-on-collapse). The last checkpoint \
         ({checkpoint}) is kept: lower the learning rate, check the augmentations and the data"
    )]
    Collapsed { step: u64, why: String, checkpoint: String },
}

/// Trainer state saved with each checkpoint (`state.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    pub step: u64,
    pub total_steps: u64,
    pub config_sha256: String,
    pub queue_ptr: i64,
    pub pairs: PairStats,
    pub bad_images: u64,
    /// fp16 dynamic loss scale (absent without fp16 autocast).
    #[serde(default)]
    pub loss_scale: Option<LossScale>,
    /// Ranks the run trains on (data-parallel); 1 for one process.
    #[serde(default = "one")]
    pub world_size: usize,
}

/// What a run reports when it ends.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub steps: u64,
    pub final_loss: f64,
    pub partner_rate: f64,
    pub bad_images: u64,
    pub images_per_sec: f64,
    pub checkpoint: PathBuf,
}

fn one() -> usize {
    1
}

/// Options of one run beyond the config.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub manifest: PathBuf,
    pub out: PathBuf,
    pub resume: bool,
    pub device: Device,
    /// Overrides `optim.max_steps` (the length of the schedule).
    pub max_steps: Option<u64>,
    /// Stop (with a checkpoint) after this step, without changing the schedule.
    pub stop_after: Option<u64>,
    pub progress: bool,
    /// Stop (with an error, keeping the last checkpoint) when the health measures say the run collapses.
    pub stop_on_collapse: bool,
    /// Train data-parallel with these ranks (torchrun's variables); `None`: one process.
    pub dist: Option<geossl_dist::Rendezvous>,
}

/// The model spec a run trains: backbone + projection (+ geo head with centroids).
pub fn run_spec(
    cfg: &PretrainConfig,
    centroids: Option<Vec<[f64; 3]>>,
) -> Result<ModelSpec, geossl_models::ContractError> {
    let mut spec = ModelSpec::rgb(cfg.model.arch, cfg.model.input_size);
    spec.backbone.in_channels = cfg.model.bands.len();
    spec.bands = cfg.model.bands.clone();
    spec.normalization = cfg.normalization()?;
    spec.sample_type = Some(cfg.model.sample_type);
    let d = cfg.model.arch.feature_dim();
    spec.heads.push(HeadSpec::Embedding(EmbeddingHead {
        projection: Some(ProjectionSpec { hidden: cfg.moco.hidden.unwrap_or(d), out: cfg.moco.dim }),
        l2_normalize: false,
    }));
    if let Some(c) = centroids {
        spec.heads.push(HeadSpec::Geo(GeoHead { num_clusters: c.len(), centroids: c }));
    }
    spec.validate()?;
    Ok(spec)
}

/// A run directory: `config.toml` (the exact config), `metrics.jsonl` (one line per logged step) and
/// `checkpoint/` (the latest complete checkpoint: model, key encoder, optimizer, queue, trainer state).
/// Only rank 0 of a data-parallel run writes to it.
#[derive(Debug)]
pub struct RunDir {
    pub out: PathBuf,
    pub checkpoint: PathBuf,
    cfg_text: String,
    pub cfg_hash: String,
    /// Open on rank 0 only.
    metrics: Option<std::fs::File>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PretrainError {
    let path = path.to_owned();
    move |error| PretrainError::Io { path, error }
}

impl RunDir {
    /// Opens (creating) the run directory `out` for a run of `cfg_text`; on rank 0, a checkpoint left half
    /// written by a crash is recovered.
    pub fn open(out: &Path, cfg_text: &str, rank: usize) -> Result<Self, PretrainError> {
        std::fs::create_dir_all(out).map_err(io(out))?;
        let checkpoint = out.join(CHECKPOINT_DIR);
        if rank == 0 {
            recover_dir(&checkpoint).map_err(io(&checkpoint))?;
        }
        Ok(RunDir {
            out: out.to_owned(),
            checkpoint,
            cfg_text: cfg_text.to_owned(),
            cfg_hash: sha256_hex(cfg_text.as_bytes()),
            metrics: None,
        })
    }

    /// Starts the run's records once it is known to go ahead (after the resume and rendezvous checks): on
    /// rank 0, the config is written and the metrics file opened for appending.
    pub fn start(&mut self, rank: usize) -> Result<(), PretrainError> {
        if rank == 0 {
            let c = self.out.join(CONFIG_FILE);
            std::fs::write(&c, &self.cfg_text).map_err(io(&c))?;
            let m = self.out.join(METRICS_FILE);
            self.metrics = Some(std::fs::OpenOptions::new().create(true).append(true).open(&m).map_err(io(&m))?);
        }
        Ok(())
    }

    /// The checkpoint's spec and trainer state, checked against this run: the same config and world size.
    pub fn resume_state(&self, world: usize) -> Result<(ModelSpec, TrainState), PretrainError> {
        let ck = &self.checkpoint;
        let paths = CheckpointPaths::new(ck);
        let spec = paths.read_spec().map_err(CheckpointError::from)?;
        let st: TrainState = serde_json::from_slice(&std::fs::read(paths.state()).map_err(io(&paths.state()))?)
            .map_err(|e| PretrainError::Invalid(format!("{}: {e}", paths.state().display())))?;
        if st.config_sha256 != self.cfg_hash {
            return Err(PretrainError::Invalid(format!(
                "{}: the checkpoint was trained with another config (sha256 {}); resume needs the same config",
                ck.display(),
                st.config_sha256
            )));
        }
        if st.world_size != world {
            return Err(PretrainError::Invalid(format!(
                "{}: the checkpoint was trained on {} rank(s); this run has {world}: the global batch, the queue's \
                 order and the data order would change (resume with WORLD_SIZE={})",
                ck.display(),
                st.world_size,
                st.world_size
            )));
        }
        Ok((spec, st))
    }

    /// Appends one line to `metrics.jsonl` (rank 0; other ranks write nothing).
    pub fn log(&mut self, line: &serde_json::Value) -> Result<(), PretrainError> {
        let path = self.out.join(METRICS_FILE);
        match &mut self.metrics {
            Some(f) => writeln!(f, "{line}").map_err(io(&path)),
            None => Ok(()),
        }
    }

    /// Replaces the checkpoint with `moco`'s state at `st` (spec `spec`, trained by `preset`), atomically.
    pub fn save(&self, spec: &ModelSpec, preset: &str, moco: &Moco, st: &TrainState) -> Result<(), CheckpointError> {
        let mut s = spec.clone();
        s.training = Some(TrainingInfo {
            method: preset.to_string(),
            preset: Some(preset.to_string()),
            config_sha256: Some(self.cfg_hash.clone()),
            step: st.step,
            source: None,
        });
        save_checkpoint(&self.checkpoint, &s, &moco.vs_q, |dir| {
            let p = CheckpointPaths::new(dir);
            moco.save_extra(dir)?;
            std::fs::write(dir.join(CONFIG_FILE), &self.cfg_text)
                .map_err(|error| CheckpointError::Io { path: dir.join(CONFIG_FILE), error })?;
            test_hook_kill("after-weights");
            std::fs::write(p.state(), serde_json::to_vec_pretty(st).unwrap_or_default())
                .map_err(|error| CheckpointError::Io { path: p.state(), error })
        })
    }
}

/// Refuses data a run cannot train on: fewer images than one global batch, a queue the global batch does
/// not divide, or images of another sample type than the config's normalization is for (checked on the
/// first readable image; unreadable ones are skipped and counted by the loader).
fn check_data(
    cfg: &PretrainConfig,
    samples: &[Sample],
    pack: Option<&Pack>,
    manifest: &Path,
    world: usize,
) -> Result<(), PretrainError> {
    let b = cfg.optim.batch_size;
    let global = b * world;
    if samples.len() < global {
        return Err(PretrainError::Invalid(format!(
            "{}: {} images for a global batch of {global} ({world} rank(s) × {b}); need at least one full batch",
            manifest.display(),
            samples.len()
        )));
    }
    if !cfg.moco.queue_size.is_multiple_of(global) {
        return Err(PretrainError::Invalid(format!(
            "moco.queue_size {} is not a multiple of the global batch {global} ({world} rank(s) × {b}): every \
             step enqueues the keys of all ranks",
            cfg.moco.queue_size
        )));
    }
    let bands = &cfg.model.bands;
    let first = match pack {
        Some(p) => {
            p.check_bands(bands).map_err(|e| PretrainError::Invalid(e.to_string()))?;
            Some((p.dir.clone(), p.shape.sample_type))
        }
        None => samples
            .iter()
            .take(64)
            .find_map(|s| crate::image_io::decode(&s.path, bands).ok().map(|i| (s.path.clone(), i.stored()))),
    };
    if let Some((path, stored)) = first {
        if stored != cfg.model.sample_type {
            return Err(PretrainError::Invalid(format!(
                "{}: stores {} samples; the config's model.sample_type is {} (set it, with a normalization for that type)",
                path.display(),
                stored,
                cfg.model.sample_type
            )));
        }
    }
    Ok(())
}

/// Geo-cluster centroids on the unit sphere (`None` without the geo pretext).
type Centroids = Option<Vec<[f64; 3]>>;

/// The geo clusters (k-means on the training locations, or the resumed checkpoint's) and each image's
/// cluster; `None` and zeros without the geo pretext.
fn geo_clusters(
    cfg: &PretrainConfig,
    samples: &[Sample],
    resumed: Option<&ModelSpec>,
) -> Result<(Centroids, Vec<i64>), PretrainError> {
    let points: Vec<[f64; 3]> = samples.iter().map(|s| to_unit(s.lat, s.lon)).collect();
    let centroids = match (resumed, cfg.geo.enabled) {
        (_, false) => None,
        (Some(spec), true) => match spec.head(geossl_models::HeadKind::Geo) {
            Some(HeadSpec::Geo(g)) => Some(g.centroids.clone()),
            _ => return Err(PretrainError::Invalid("the checkpoint has no geo head".into())),
        },
        (None, true) => Some(
            kmeans_sphere(&points, cfg.geo.clusters, cfg.geo.kmeans_iters, cfg.run.seed)
                .map_err(|e| PretrainError::Invalid(e.to_string()))?,
        ),
    };
    let labels = match &centroids {
        Some(c) => points.iter().map(|p| assign(c, *p) as i64).collect(),
        None => vec![0; samples.len()],
    };
    Ok((centroids, labels))
}

/// Stored samples → model input on the device: physical units (the spec's scale and offset), the
/// photometric augmentations there, then the spec's normalization.
struct Preprocess {
    scale: f64,
    offset: Tensor,
    mean: Tensor,
    std: Tensor,
    rgb: Option<[i64; 3]>,
    aug: crate::augment::AugConfig,
    dev: Device,
}

impl Preprocess {
    fn new(spec: &ModelSpec, cfg: &PretrainConfig, dev: Device) -> Self {
        let norm = &spec.normalization;
        let nb = norm.bands() as i64;
        let (scale, offsets) = norm.physical();
        let band = |n: &str| cfg.model.bands.iter().position(|b| b.eq_ignore_ascii_case(n)).map(|i| i as i64);
        let rgb = match (band("red"), band("green"), band("blue")) {
            (Some(r), Some(g), Some(b)) => Some([r, g, b]),
            _ => None,
        };
        Preprocess {
            scale: f64::from(scale),
            offset: Tensor::from_slice(&offsets).reshape([1, nb, 1, 1]).to_device(dev),
            mean: Tensor::from_slice(&norm.mean).reshape([1, nb, 1, 1]).to_device(dev),
            std: Tensor::from_slice(&norm.std).reshape([1, nb, 1, 1]).to_device(dev),
            rgb,
            aug: cfg.aug.clone(),
            dev,
        }
    }

    /// `[B, C, H, W]` stored samples → normalized, augmented input.
    fn apply(&self, raw: &Tensor) -> Tensor {
        let x = raw.to_device(self.dev) * self.scale + &self.offset;
        let x = crate::augment::photometric(&x, self.rgb, &self.aug);
        (x - &self.mean) / &self.std
    }
}

/// Connects `moco` to the other ranks of `r`: every rank must run the same config (compared at the
/// rendezvous, before any step); Gloo for the CPU, NCCL for a GPU (one per rank).
fn join_ranks(moco: &mut Moco, r: &geossl_dist::Rendezvous, cfg_hash: &str, dev: Device) -> Result<(), PretrainError> {
    let mut pg = geossl_dist::ProcessGroup::connect(r, geossl_dist::Backend::for_device(dev)?)?;
    let hash = Tensor::from_slice(&cfg_hash.as_bytes()[..32]).to_device(dev);
    let all = pg.all_gather(&hash)?;
    for other in 0..r.world_size {
        if !all.get(other as i64).equal(&hash) {
            return Err(PretrainError::Invalid(format!(
                "rank {other} runs another config than rank {} (config sha256 differs): every rank needs the same \
                 config file and data",
                r.rank
            )));
        }
    }
    moco.join(pg)?;
    Ok(())
}

/// Why a data-parallel step failed: the ranks' heartbeats name who is gone; if all still beat (a timeout),
/// with two ranks it is the other one.
fn lost_rank(moco: &Moco, e: geossl_dist::DistError, step: u64) -> PretrainError {
    if let geossl_dist::DistError::Config(_) = e {
        return e.into();
    }
    let (rank, world) = moco.rank_world();
    let lost = match moco.lost_ranks() {
        Some(lost) => lost.to_string(),
        None if world == 2 => format!("rank {}", 1 - rank),
        None => "another rank".to_string(),
    };
    PretrainError::Invalid(format!(
        "rank {rank} of {world} lost {lost} at step {} (it stopped, or did not answer within the timeout): {e}",
        step + 1
    ))
}

fn progress_bar(show: bool, end: u64, step: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(end);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_position(step);
    pb
}

/// Runs (or resumes) pretraining. Returns when `total_steps` are done.
pub fn pretrain(cfg: &PretrainConfig, cfg_text: &str, opts: &RunOptions) -> Result<Summary, PretrainError> {
    // A chip pack (a folder with pack.json) or a manifest of image files.
    let (samples, pack) = if crate::pack::is_pack(&opts.manifest) {
        let pack = Pack::open(&opts.manifest).map_err(|e| PretrainError::Invalid(e.to_string()))?;
        (pack.samples(), Some(pack))
    } else {
        (read_manifest(&opts.manifest, cfg.data.format)?, None)
    };
    let device_crop = match (cfg.aug.geometric, &pack) {
        (Geometric::Auto, p) => p.is_some(),
        (Geometric::Loader, _) => false,
        (Geometric::Device, Some(_)) => true,
        (Geometric::Device, None) => {
            return Err(PretrainError::Invalid(format!(
                "aug.geometric = \"device\" cuts views from raw chips of one size: {} is not a chip pack \
                 (make one with `geossl-train pack`)",
                opts.manifest.display()
            )))
        }
    };
    let b = cfg.optim.batch_size;
    let (rank, world) = opts.dist.as_ref().map_or((0, 1), |r| (r.rank, r.world_size));
    check_data(cfg, &samples, pack.as_deref(), &opts.manifest, world)?;
    let steps_per_epoch = (samples.len() / (b * world)) as u64;
    let total = opts.max_steps.or(cfg.optim.max_steps).unwrap_or(cfg.optim.epochs as u64 * steps_per_epoch);
    let end = opts.stop_after.map_or(total, |s| s.min(total));
    let mut run = RunDir::open(&opts.out, cfg_text, rank)?;
    let resumed = if opts.resume { Some(run.resume_state(world)?) } else { None };
    let (centroids, geo_labels) = geo_clusters(cfg, &samples, resumed.as_ref().map(|r| &r.0))?;
    let spec = run_spec(cfg, centroids).map_err(|e| PretrainError::Invalid(e.to_string()))?;
    let index = TemporalIndex::new(&samples);
    let coverage = index.partner_coverage(&samples);
    tracing::info!(
        images = samples.len(),
        locations = index.num_locations(),
        temporal_partner_coverage = format!("{:.3}", coverage),
        steps = total,
        "pretraining {} ({}) on {:?}",
        cfg.preset,
        cfg.model.arch,
        opts.device
    );
    if cfg.temporal.enabled && coverage == 0.0 {
        tracing::warn!(
            "temporal positives are on but no image has a partner at another time: check location_id and timestamp"
        );
    }

    // Models: query (trained) and key (momentum copy, no geo head), seeded.
    let dev = opts.device;
    tch::manual_seed(cfg.run.seed as i64);
    let mut moco = Moco::new(&spec, cfg, dev)?;
    let mut st = TrainState {
        step: 0,
        total_steps: total,
        config_sha256: run.cfg_hash.clone(),
        queue_ptr: 0,
        pairs: PairStats::default(),
        bad_images: 0,
        loss_scale: None,
        world_size: world,
    };
    if let Some((_, saved)) = resumed {
        moco.load(&run.checkpoint, saved.queue_ptr)?;
        if let (Some(ls), Some(s)) = (moco.loss_scale.as_mut(), saved.loss_scale) {
            *ls = s;
        }
        st = TrainState { total_steps: total, ..saved };
        tracing::info!("resumed from {} at step {}", run.checkpoint.display(), st.step);
    }
    if let Some(r) = &opts.dist {
        join_ranks(&mut moco, r, &run.cfg_hash, dev)?;
        tracing::info!(
            rank,
            world,
            "data-parallel: global batch {}, rendezvous at {}:{}",
            b * world,
            r.master_addr,
            r.master_port
        );
    }
    run.start(rank)?;
    let prep = Preprocess::new(&spec, cfg, dev);
    let loader_cfg = LoaderConfig {
        batch_size: b,
        input_size: cfg.model.input_size as i64,
        bands: cfg.model.bands.clone(),
        temporal: cfg.temporal.enabled,
        seed: cfg.run.seed,
        workers: cfg.run.workers,
        prefetch: cfg.run.prefetch,
        cache_bytes: cfg.data.cache_mib << 20,
        aug: cfg.aug.clone(),
        rank,
        world,
        pack,
        device_crop,
    };
    let size = cfg.model.input_size as i64;
    let mut loader = Loader::start(samples, index, geo_labels, loader_cfg, st.step, end);
    let bar = progress_bar(opts.progress, end, st.step);
    // The learning rate scales with the global batch (base_lr × global batch / 256).
    let base_lr = cfg.lr() * world as f64;
    let (started, start_step) = (std::time::Instant::now(), st.step);
    let mut last_loss = f64::NAN;
    let mut skipped_steps = 0u64;
    explain_queue_fill(cfg, st.step);
    while st.step < end {
        let batch = loader.next_batch()?;
        // Augmentation randomness on the device is a function of (seed, step) too.
        let seed = (cfg.run.seed as i64).wrapping_mul(1_000_003).wrapping_add(st.step as i64);
        tch::manual_seed(seed.wrapping_add(rank as i64 * 7_919));
        let lr = cosine_lr(base_lr, st.step, total);
        let geo_t = batch.geo.to_device(dev);
        let out = moco
            .step(
                &batch.q.with_device(dev, size, |v| prep.apply(v)),
                &batch.k.with_device(dev, size, |v| prep.apply(v)),
                cfg.geo.enabled.then_some(&geo_t),
                lr,
            )
            .map_err(|e| lost_rank(&moco, e, st.step))?;
        if !out.loss.is_finite() {
            let checkpoint = run.checkpoint.display().to_string();
            return Err(PretrainError::NonFinite { step: st.step, loss: out.loss, checkpoint });
        }
        if out.skipped {
            skipped_steps += 1;
            tracing::warn!(step = st.step, scale = ?out.loss_scale, "fp16 gradients overflowed: step skipped, loss scale halved");
        }
        st.step += 1;
        last_loss = out.loss;
        st.pairs.anchors += b as u64;
        st.pairs.with_partner += batch.with_partner;
        st.bad_images += batch.bad_images;
        let ips = ((st.step - start_step) * b as u64) as f64 / started.elapsed().as_secs_f64().max(1e-9);
        bar.set_position(st.step);
        bar.set_message(progress_message(&out, ips));
        let health = queue_health(cfg, &moco, st.step, (b * world) as u64, end);
        if st.step.is_multiple_of(cfg.run.log_every) || st.step == end || health.is_some() {
            let mut record = serde_json::json!({
                "step": st.step, "loss": out.loss, "info_nce": out.info_nce,
                "geo_ce": out.geo_ce,
                "positive_top1": out.positive_top1, "alignment": out.alignment, "geo_top1": out.geo_top1, "lr": lr,
                "img_per_s": ips, "temporal_partner_rate": st.pairs.rate(), "bad_images": st.bad_images,
                "loss_scale": out.loss_scale, "overflow_skipped_steps": skipped_steps,
                "world_size": world, "comm_s": moco.comm_timed().then_some(moco.comm_seconds),
            });
            if let Some(h) = &health {
                record["health"] = serde_json::to_value(h).unwrap_or_default();
            }
            run.log(&record)?;
            if rank == 0 {
                tracing::info!(
                    "step {}/{total} {} lr {lr:.5} partner rate {:.3}",
                    st.step,
                    progress_message(&out, ips),
                    st.pairs.rate()
                );
            }
        }
        if let Some(why) = health.as_ref().and_then(|h| h.collapse()) {
            if opts.stop_on_collapse {
                let checkpoint = run.checkpoint.display().to_string();
                return Err(PretrainError::Collapsed { step: st.step, why, checkpoint });
            }
            if rank == 0 {
                tracing::warn!(step = st.step, "the embeddings are collapsing: {why}");
            }
        }
        // Rank 0 writes the checkpoint; every rank holds the same weights and queue.
        if rank == 0 && (st.step.is_multiple_of(cfg.run.checkpoint_every) || st.step == end) {
            st.queue_ptr = moco.queue.ptr;
            st.loss_scale = moco.loss_scale;
            run.save(&spec, &cfg.preset, &moco, &st)?;
        }
    }
    bar.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64();
    Ok(Summary {
        steps: st.step,
        final_loss: last_loss,
        partner_rate: st.pairs.rate(),
        bad_images: st.bad_images,
        images_per_sec: ((st.step - start_step) * b as u64) as f64 / elapsed.max(1e-9),
        checkpoint: run.checkpoint,
    })
}

/// The health of the queue's keys at `step` when it is due (every `run.health_every` steps and at the
/// end), over the keys that real images produced (the first `step × global_batch` rows, all once the queue
/// has turned over) when there are more of them than dimensions; logged on rank 0.
fn queue_health(
    cfg: &PretrainConfig,
    moco: &Moco,
    step: u64,
    global_batch: u64,
    end: u64,
) -> Option<crate::health::Health> {
    let every = cfg.run.health_every;
    if every == 0 || !(step.is_multiple_of(every) || step == end) {
        return None;
    }
    let keys = &moco.queue.keys;
    let (k, d) = (keys.size()[0], keys.size()[1]);
    let real = (step.saturating_mul(global_batch)).min(k as u64) as i64;
    if real <= d {
        return None;
    }
    let h = crate::health::health(&keys.narrow(0, 0, real));
    if moco.rank_world().0 == 0 {
        tracing::info!("step {step} {}", h.line());
    }
    Some(h)
}

/// Says, at the start, why the loss rises while the queue's random initial negatives are replaced.
fn explain_queue_fill(cfg: &PretrainConfig, step: u64) {
    let fill = (cfg.moco.queue_size as u64).div_ceil(cfg.optim.batch_size as u64);
    if step < fill {
        tracing::info!(
            "the loss rises while the queue's {} random initial negatives are replaced by real keys (first {fill} \
             steps; real negatives are harder): learning shows in pos-top1 (chance {:.1}%){}",
            cfg.moco.queue_size,
            100.0 / (1.0 + cfg.moco.queue_size as f64),
            if cfg.geo.enabled {
                format!(" and geo-acc (chance {:.0}%)", 100.0 / cfg.geo.clusters as f64)
            } else {
                String::new()
            }
        );
    }
}

/// What a step shows: the loss and what says whether the model learns — the
/// positive pair's top-1 among the queue's negatives (chance is 1/(1+K)) and the
/// geo head's cluster accuracy.
fn progress_message(out: &StepOut, ips: f64) -> String {
    let geo = out.geo_top1.map(|g| format!(" geo-acc {:.0}%", g * 100.0)).unwrap_or_default();
    format!("loss {:.3} pos-top1 {:.0}%{geo} {ips:.1} img/s", out.loss, out.positive_top1 * 100.0)
}

/// Test hook: `GEOSSL_TEST_KILL_AT=<point>` makes the process SIGKILL itself at
/// that point of a checkpoint write, to prove a crash there loses nothing.
fn test_hook_kill(point: &str) {
    if std::env::var("GEOSSL_TEST_KILL_AT").as_deref() == Ok(point) {
        let _ = std::process::Command::new("kill").args(["-KILL", &std::process::id().to_string()]).status();
        std::thread::sleep(std::time::Duration::from_secs(10));
    }
}
