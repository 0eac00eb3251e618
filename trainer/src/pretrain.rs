//! The pretraining loop: MoCo-v2, optionally with temporal positives and the
//! geo-location pretext (Ayush et al., ICCV 2021).
//!
//! A run directory holds `config.toml` (the exact config), `metrics.jsonl`
//! (one line per logged step) and `checkpoint/` (the latest complete
//! checkpoint: model, key encoder, optimizer, queue and trainer state).

use std::io::Write;
use std::path::{Path, PathBuf};

use geossl_models::checkpoint::{recover_dir, CheckpointPaths};
use geossl_models::{sha256_hex, EmbeddingHead, GeoHead, HeadSpec, ModelSpec, ProjectionSpec, StateDict, TrainingInfo};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::amp::{AmpDtype, LossScale};
use crate::checkpoint::{copy_into, load_state_dict, save_checkpoint, state_dict, to_named, CheckpointError};
use crate::config::PretrainConfig;
use crate::data::{read_manifest, PairStats, TemporalIndex};
use crate::geo::{assign, kmeans_sphere, to_unit};
use crate::loader::{Loader, LoaderConfig};
use crate::moco::{info_nce, momentum_update, positive_top1, Queue};
use crate::model::{l2_normalize, Model};

pub const KEY_FILE: &str = "key.safetensors";
pub const QUEUE_FILE: &str = "queue.safetensors";
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
    Dist(#[from] geossl_dist::DistError),
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error(
        "loss became {loss} at step {step}; stopped. The last good checkpoint ({checkpoint}) is kept: lower the learning rate or check the data"
    )]
    NonFinite { step: u64, loss: f64, checkpoint: String },
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

/// SGD with momentum and weight decay, PyTorch semantics, with saveable state.
#[derive(Debug)]
pub struct Sgd {
    pub names: Vec<String>,
    params: Vec<Tensor>,
    bufs: Vec<Tensor>,
    momentum: f64,
    weight_decay: f64,
}

impl Sgd {
    pub fn new(vs: &nn::VarStore, spec: &ModelSpec, momentum: f64, weight_decay: f64) -> Self {
        let vars = vs.variables();
        let names: Vec<String> = spec.parameters().into_iter().filter(|p| p.role.trainable()).map(|p| p.name).collect();
        let params: Vec<Tensor> = names.iter().map(|n| vars[n].shallow_clone()).collect();
        let bufs = params.iter().map(|p| p.zeros_like().detach()).collect();
        Self { names, params, bufs, momentum, weight_decay }
    }

    /// The parameters, in `names` order.
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// `g += wd·p; buf = m·buf + g; p -= lr·buf` with gradients `grads` (one per
    /// parameter, undefined for unused ones) — PyTorch's SGD; zero buffers make
    /// the first step `buf = g`, as PyTorch. All in place, no temporaries.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) {
        tch::no_grad(|| {
            let dev = self.params.first().map_or(Device::Cpu, |p| p.device());
            let wd = Tensor::from(self.weight_decay as f32).to_device(dev);
            let neg_lr = Tensor::from(-lr as f32).to_device(dev);
            for ((p, buf), g) in self.params.iter().zip(&self.bufs).zip(grads) {
                if !g.defined() {
                    continue;
                }
                let mut g = g.shallow_clone();
                let _ = g.addcmul_(p, &wd);
                let mut b = buf.shallow_clone();
                let _ = b.g_mul_scalar_(self.momentum);
                let _ = b.g_add_(&g);
                let _ = p.shallow_clone().addcmul_(&b, &neg_lr);
            }
        });
    }

    pub fn state(&self) -> Result<StateDict, CheckpointError> {
        tensors_to_state(self.names.iter().cloned().zip(self.bufs.iter().map(|b| b.shallow_clone())))
    }

    pub fn load(&mut self, sd: &StateDict, path: &Path) -> Result<(), CheckpointError> {
        let idx = sd.index();
        for (n, b) in self.names.iter().zip(&self.bufs) {
            let t = idx.get(n.as_str()).ok_or_else(|| {
                CheckpointError::Weights(geossl_models::WeightsError::Mismatch {
                    path: path.to_owned(),
                    detail: format!("optimizer state has no `{n}`"),
                })
            })?;
            copy_into(b, t, path)?;
        }
        Ok(())
    }
}

fn tensors_to_state(items: impl Iterator<Item = (String, Tensor)>) -> Result<StateDict, CheckpointError> {
    let tensors = items.map(|(name, t)| to_named(&name, &t)).collect::<Result<_, _>>()?;
    Ok(StateDict { tensors, metadata: Default::default() })
}

/// Rank 0's values of `tensors` on every rank, in one broadcast per dtype (one flat buffer each).
fn broadcast_flat(pg: &mut geossl_dist::ProcessGroup, tensors: &[Tensor]) -> Result<(), geossl_dist::DistError> {
    let mut kinds: Vec<Kind> = tensors.iter().map(Tensor::kind).collect();
    kinds.sort_by_key(|k| format!("{k:?}"));
    kinds.dedup();
    for kind in kinds {
        let group: Vec<&Tensor> = tensors.iter().filter(|t| t.kind() == kind).collect();
        let mut flat = Tensor::cat(&group.iter().map(|t| t.flatten(0, -1)).collect::<Vec<_>>(), 0);
        pg.broadcast(&mut flat, 0)?;
        let mut at = 0;
        for t in group {
            let n = t.numel() as i64;
            t.shallow_clone().copy_(&flat.narrow(0, at, n).view(t.size().as_slice()));
            at += n;
        }
    }
    Ok(())
}

/// The start of a timed collective. On NCCL with a blocking wait the GPU's queued work is finished first, so
/// the time measured is the collective's (and the wait for the other ranks), not the compute the CUDA stream
/// still had queued (the blocking wait holds the host for that anyway, so nothing is lost). Without a blocking
/// wait nothing is drained and the time is only that of queuing the collective.
fn comm_clock(pg: &geossl_dist::ProcessGroup) -> std::time::Instant {
    if let (geossl_dist::Backend::Nccl { device }, true) = (pg.backend(), pg.host_waits()) {
        tch::Cuda::synchronize(device as i64);
    }
    std::time::Instant::now()
}

fn one() -> usize {
    1
}

/// Result of one MoCo step.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StepOut {
    pub loss: f64,
    pub info_nce: f64,
    pub geo_ce: Option<f64>,
    /// Share of queries whose positive key scores above every negative.
    pub positive_top1: f64,
    /// Share of queries whose geo head predicts their location cluster.
    pub geo_top1: Option<f64>,
    /// fp16 loss scale after this step (`None` without fp16 autocast).
    pub loss_scale: Option<f64>,
    /// The gradients overflowed at the current loss scale: no parameter moved.
    pub skipped: bool,
}

/// The query encoder (trained), the key encoder (momentum copy, no geo head),
/// the optimizer and the negative queue: one MoCo-v2 training step.
#[derive(Debug)]
pub struct Moco {
    pub spec: ModelSpec,
    pub key_spec: ModelSpec,
    pub vs_q: nn::VarStore,
    pub vs_k: nn::VarStore,
    pub query: Model,
    pub key: Model,
    pub sgd: Sgd,
    pub queue: Queue,
    key_params: Vec<Tensor>,
    query_params: Vec<Tensor>,
    momentum: f64,
    temperature: f64,
    groups: i64,
    geo_weight: f64,
    amp: bool,
    amp_dtype: AmpDtype,
    /// Dynamic loss scaling, with fp16 autocast only.
    pub loss_scale: Option<LossScale>,
    channels_last: bool,
    /// DDP's Reducer for the query encoder's gradients (with `dist`; declared first so it is dropped first).
    reducer: Option<geossl_dist::Reducer>,
    /// The data-parallel group this MoCo trains in (see [`Moco::join`]); `None`: one process.
    dist: Option<geossl_dist::ProcessGroup>,
    /// The query encoder's BatchNorm buffers, by name: rank 0's are broadcast before every step (DDP's
    /// `broadcast_buffers`). The key encoder's stay per rank, as in MoCo (each normalizes its own slice).
    query_buffers: Vec<Tensor>,
    /// Diagnostics: keep the last step's gradients (this rank's, and as applied: averaged over the ranks).
    pub keep_gradients: bool,
    /// The last step's (local, applied) gradients, when `keep_gradients` is set.
    pub gradients: Option<(Vec<Tensor>, Vec<Tensor>)>,
    /// Seconds spent in collectives (waiting for the other ranks included), since the start; see `comm_timed`.
    pub comm_seconds: f64,
}

impl Moco {
    /// Builds both encoders on `dev` (key = copy of query) and a random queue.
    pub fn new(spec: &ModelSpec, cfg: &PretrainConfig, dev: Device) -> Result<Self, CheckpointError> {
        let vs_q = nn::VarStore::new(dev);
        let query = Model::new(&vs_q.root(), spec);
        let mut key_spec = spec.clone();
        key_spec.heads.retain(|h| h.kind() != geossl_models::HeadKind::Geo);
        let vs_k = nn::VarStore::new(dev);
        let key = Model::new(&vs_k.root(), &key_spec);
        let sd = state_dict(&vs_q, &key_spec)?;
        load_state_dict(&vs_k, &key_spec, &sd, Path::new("<query encoder>"))?;
        let channels_last = cfg.run.channels_last && dev.is_cuda();
        if channels_last {
            // Before the optimizer exists, so its momentum buffers follow the layout.
            crate::model::to_channels_last(&vs_q);
            crate::model::to_channels_last(&vs_k);
        }
        let amp = cfg.run.amp && dev.is_cuda();
        let sgd = Sgd::new(&vs_q, spec, cfg.optim.momentum, cfg.optim.weight_decay);
        let queue = Queue::new(cfg.moco.queue_size as i64, cfg.moco.dim as i64, dev);
        let (qvars, kvars) = (vs_q.variables(), vs_k.variables());
        let names: Vec<String> =
            key_spec.parameters().into_iter().filter(|p| p.role.trainable()).map(|p| p.name).collect();
        let key_params: Vec<Tensor> = names.iter().map(|n| kvars[n].shallow_clone()).collect();
        let query_params: Vec<Tensor> = names.iter().map(|n| qvars[n].shallow_clone()).collect();
        for p in &key_params {
            let _ = p.shallow_clone().set_requires_grad(false);
        }
        Ok(Self {
            spec: spec.clone(),
            key_spec,
            vs_q,
            vs_k,
            query,
            key,
            sgd,
            queue,
            key_params,
            query_params,
            momentum: cfg.moco.momentum,
            temperature: cfg.moco.temperature,
            groups: cfg.moco.shuffle_bn_groups as i64,
            geo_weight: cfg.geo.loss_weight,
            amp,
            amp_dtype: cfg.run.amp_dtype,
            loss_scale: (amp && cfg.run.amp_dtype == AmpDtype::Fp16).then(LossScale::default),
            channels_last,
            reducer: None,
            dist: None,
            query_buffers: Vec::new(),
            keep_gradients: false,
            gradients: None,
            comm_seconds: 0.0,
        })
    }

    /// Trains data-parallel in `pg` from now on, as MoCo's DDP code does: every rank starts from rank 0's
    /// encoders (parameters and BatchNorm buffers) and queue; each step averages the gradients over the ranks
    /// with DDP's Reducer (buckets all-reduced while backward runs), encodes the keys with BatchNorm shuffled
    /// across ranks, and enqueues every rank's keys in rank order (the queue size must be a multiple of the
    /// global batch).
    pub fn join(&mut self, mut pg: geossl_dist::ProcessGroup) -> Result<(), geossl_dist::DistError> {
        let mut all = Vec::new();
        for vs in [&self.vs_q, &self.vs_k] {
            let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            all.extend(vars.into_iter().map(|(_, v)| v));
        }
        all.push(self.queue.keys.shallow_clone());
        tch::no_grad(|| broadcast_flat(&mut pg, &all))?;
        let vars = self.vs_q.variables();
        let mut names: Vec<String> =
            self.spec.parameters().into_iter().filter(|p| !p.role.trainable()).map(|p| p.name).collect();
        names.sort();
        self.query_buffers = names.iter().filter_map(|n| vars.get(n).map(Tensor::shallow_clone)).collect();
        self.reducer = Some(pg.reducer(self.sgd.params(), geossl_dist::BUCKET_BYTES)?);
        self.dist = Some(pg);
        Ok(())
    }

    /// This step's gradients of `loss` for the optimizer's parameters. In one process straight from autograd
    /// (nothing accumulates in `.grad`, nothing to zero); in a group through DDP's Reducer, which all-reduces
    /// them in buckets while backward runs and leaves the mean over the ranks. With `keep_gradients`, this
    /// rank's own gradients are kept beside the applied ones.
    fn backward(&mut self, loss: &Tensor) -> Result<Vec<Tensor>, geossl_dist::DistError> {
        let copy = |g: &Tensor| if g.defined() { g.copy() } else { g.shallow_clone() };
        let copies = |gs: &[Tensor]| gs.iter().map(copy).collect::<Vec<_>>();
        match (self.dist.as_mut(), self.reducer.as_mut()) {
            (Some(pg), Some(reducer)) => {
                let local =
                    self.keep_gradients.then(|| copies(&Tensor::run_backward(&[loss], self.sgd.params(), true, false)));
                reducer.backward(pg, loss)?;
                let grads = reducer.gradients();
                if let Some(local) = local {
                    self.gradients = Some((local, copies(&grads)));
                }
                Ok(grads)
            }
            _ => {
                let grads = Tensor::run_backward(&[loss], self.sgd.params(), false, false);
                if self.keep_gradients {
                    self.gradients = Some((copies(&grads), copies(&grads)));
                }
                Ok(grads)
            }
        }
    }

    /// Whether `comm_seconds` is the time the collectives took: yes in one process, with Gloo and with a
    /// blocking NCCL wait; no with NCCL's default (collectives queued on the CUDA stream return at once).
    pub fn comm_timed(&self) -> bool {
        self.dist.as_ref().is_none_or(geossl_dist::ProcessGroup::host_waits)
    }

    /// After a failed step: which ranks are gone (see [`geossl_dist::ProcessGroup::lost_ranks`]).
    pub fn lost_ranks(&self) -> Option<geossl_dist::Lost> {
        self.dist.as_ref().and_then(geossl_dist::ProcessGroup::lost_ranks)
    }

    /// The data-parallel group's (rank, world size); `(0, 1)` in one process.
    pub fn rank_world(&self) -> (usize, usize) {
        self.dist.as_ref().map_or((0, 1), |pg| (pg.rank(), pg.world_size()))
    }

    /// Every rank's `t` stacked in rank order (`t` itself, unsqueezed, in one process).
    pub fn gather(&mut self, t: &Tensor) -> Result<Tensor, geossl_dist::DistError> {
        match self.dist.as_mut() {
            Some(pg) => pg.all_gather(t),
            None => Ok(t.unsqueeze(0)),
        }
    }

    /// One step on normalized, augmented views `q_in`, `k_in` `[B, C, S, S]`
    /// with optional geo-cluster labels `[B]`; `loss` is non-finite if training diverged
    /// (then nothing was updated).
    pub fn step(
        &mut self,
        q_in: &Tensor,
        k_in: &Tensor,
        geo: Option<&Tensor>,
        lr: f64,
    ) -> Result<StepOut, geossl_dist::DistError> {
        let (q_in, k_in) = if self.channels_last {
            (&crate::model::channels_last(q_in), &crate::model::channels_last(k_in))
        } else {
            (q_in, k_in)
        };
        if self.amp {
            // libtorch keeps the autocast type per thread: set it on the stepping thread.
            crate::amp::set_cuda_autocast_dtype(self.amp_dtype);
        }
        let has_geo = self.spec.heads.iter().any(|h| h.kind() == geossl_models::HeadKind::Geo);
        if self.reducer.is_some() && geo.is_some() != has_geo {
            // The Reducer needs a gradient for every parameter each step: the geo head gets one only with labels.
            return Err(geossl_dist::DistError::Config(format!(
                "a data-parallel step needs geo labels exactly when the model has a geo head (it has {}one; labels \
                 were {}given)",
                if has_geo { "" } else { "no " },
                if geo.is_some() { "" } else { "not " }
            )));
        }
        let mut comm = 0.0;
        if let Some(pg) = self.dist.as_mut() {
            let t = comm_clock(pg);
            tch::no_grad(|| broadcast_flat(pg, &self.query_buffers))?;
            comm += t.elapsed().as_secs_f64();
        }
        let (loss, nce, geo_loss, acc, keys) =
            crate::amp::autocast(self.amp, || -> Result<_, geossl_dist::DistError> {
                let feats = self.query.backbone.pooled(q_in, true);
                let q_proj =
                    self.query.projection.as_ref().map(|p| p.forward(&feats)).unwrap_or(feats).to_kind(Kind::Float);
                let q = l2_normalize(&q_proj);
                let (key, groups) = (&self.key, self.groups);
                let encode = |x: &Tensor| {
                    let parts: Vec<Tensor> = x
                        .chunk(groups, 0)
                        .iter()
                        .map(|c| {
                            let f = key.backbone.pooled(c, true);
                            key.projection.as_ref().map(|p| p.forward(&f)).unwrap_or(f)
                        })
                        .collect();
                    l2_normalize(&Tensor::cat(&parts, 0).to_kind(Kind::Float))
                };
                // (this rank's keys, every rank's keys in rank order)
                let (k, all_keys) = tch::no_grad(|| -> Result<(Tensor, Tensor), geossl_dist::DistError> {
                    momentum_update(&self.key_params, &self.query_params, self.momentum);
                    // Shuffled sub-batches: each has its own BN statistics and mixes samples,
                    // so BN cannot leak which key is the positive.
                    let n = k_in.size()[0];
                    match self.dist.as_mut() {
                        None => {
                            let perm = Tensor::randperm(n, (Kind::Int64, k_in.device()));
                            let k = encode(&k_in.index_select(0, &perm));
                            let k = k.zeros_like().index_copy(0, &perm, &k);
                            Ok((k.shallow_clone(), k))
                        }
                        Some(pg) => {
                            // Across ranks: gather every rank's key views, shuffle them all with rank 0's
                            // permutation, encode this rank's slice, gather the keys and unshuffle.
                            let (r, w) = (pg.rank() as i64, pg.world_size() as i64);
                            let t = comm_clock(pg);
                            let views = pg.all_gather(k_in)?.flatten(0, 1);
                            let mut perm = Tensor::randperm(w * n, (Kind::Int64, k_in.device()));
                            pg.broadcast(&mut perm, 0)?;
                            comm += t.elapsed().as_secs_f64();
                            let mine = encode(&views.index_select(0, &perm.narrow(0, r * n, n)));
                            let t = comm_clock(pg);
                            let shuffled = pg.all_gather(&mine)?.flatten(0, 1);
                            comm += t.elapsed().as_secs_f64();
                            let all = shuffled.zeros_like().index_copy(0, &perm, &shuffled);
                            Ok((all.narrow(0, r * n, n), all))
                        }
                    }
                })?;
                let (nce, logits) = info_nce(&q, &k, &self.queue.keys, self.temperature);
                let (geo_loss, geo_acc) = match (geo, self.query.geo_logits(&q_proj)) {
                    (Some(labels), Some(l)) => {
                        let l = l.to_kind(Kind::Float);
                        let hits = l.detach().argmax(1, false).eq_tensor(labels).to_kind(Kind::Float).mean(Kind::Float);
                        (Some(l.cross_entropy_for_logits(labels)), Some(hits.double_value(&[])))
                    }
                    _ => (None, None),
                };
                let loss = match &geo_loss {
                    Some(g) => &nce + g * self.geo_weight,
                    None => nce.shallow_clone(),
                };
                let acc = positive_top1(&logits.detach());
                Ok((loss, nce, (geo_loss, geo_acc), acc, all_keys))
            })?;
        let (geo_loss, geo_top1) = geo_loss;
        let mut out = StepOut {
            loss: loss.double_value(&[]),
            info_nce: nce.double_value(&[]),
            geo_ce: geo_loss.as_ref().map(|g| g.double_value(&[])),
            positive_top1: acc,
            geo_top1,
            loss_scale: None,
            skipped: false,
        };
        if !out.loss.is_finite() {
            return Ok(out);
        }
        match self.loss_scale.map(|ls| ls.scale) {
            None => {
                let grads = self.backward(&loss)?;
                self.sgd.step(&grads, lr);
            }
            Some(scale) => {
                let grads = self.backward(&(&loss * scale))?;
                let finite = crate::amp::all_finite(&grads);
                let ls = self.loss_scale.as_mut().expect("fp16 loss scaling is on");
                if ls.update(finite) {
                    tch::no_grad(|| {
                        for g in grads.iter().filter(|g| g.defined()) {
                            let _ = g.shallow_clone().g_mul_scalar_(1.0 / scale);
                        }
                    });
                    self.sgd.step(&grads, lr);
                } else {
                    out.skipped = true;
                }
                out.loss_scale = Some(ls.scale);
            }
        }
        // Keys join the queue after the optimizer step, as in MoCo; the batch
        // size divides the queue (checked by the config).
        if let Err(e) = self.queue.enqueue(&keys) {
            tracing::error!("{e}");
        }
        self.comm_seconds += comm;
        Ok(out)
    }

    /// Writes the key encoder, optimizer and queue next to the model weights in `dir`.
    pub fn save_extra(&self, dir: &Path) -> Result<(), CheckpointError> {
        state_dict(&self.vs_k, &self.key_spec)?.write(&dir.join(KEY_FILE))?;
        self.sgd.state()?.write(&CheckpointPaths::new(dir).optimizer())?;
        tensors_to_state(std::iter::once(("queue".to_string(), self.queue.keys.shallow_clone())))?
            .write(&dir.join(QUEUE_FILE))?;
        Ok(())
    }

    /// Loads everything [`Moco::save_extra`] and the checkpoint wrote.
    pub fn load(&mut self, dir: &Path, queue_ptr: i64) -> Result<(), CheckpointError> {
        let paths = CheckpointPaths::new(dir);
        load_state_dict(&self.vs_q, &self.spec, &StateDict::read(&paths.weights())?, &paths.weights())?;
        let kp = dir.join(KEY_FILE);
        load_state_dict(&self.vs_k, &self.key_spec, &StateDict::read(&kp)?, &kp)?;
        self.sgd.load(&StateDict::read(&paths.optimizer())?, &paths.optimizer())?;
        let qp = dir.join(QUEUE_FILE);
        let qsd = StateDict::read(&qp)?;
        let qt = qsd.get("queue").ok_or_else(|| {
            CheckpointError::Weights(geossl_models::WeightsError::Mismatch {
                path: qp.clone(),
                detail: "no `queue` tensor".into(),
            })
        })?;
        copy_into(&self.queue.keys, qt, &qp)?;
        self.queue.ptr = queue_ptr;
        Ok(())
    }
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
    /// Train data-parallel with these ranks (torchrun's variables); `None`: one process.
    pub dist: Option<geossl_dist::Rendezvous>,
}

/// Cosine learning-rate schedule over `total` steps (no restarts), as MoCo's `--cos`.
pub fn cosine_lr(base: f64, step: u64, total: u64) -> f64 {
    base * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total.max(1) as f64).cos())
}

/// The model spec a run trains: backbone + projection (+ geo head with centroids).
pub fn run_spec(cfg: &PretrainConfig, centroids: Option<Vec<[f64; 3]>>) -> Result<ModelSpec, String> {
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

/// Runs (or resumes) pretraining. Returns when `total_steps` are done.
pub fn pretrain(cfg: &PretrainConfig, cfg_text: &str, opts: &RunOptions) -> Result<Summary, PretrainError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |error| PretrainError::Io { path, error }
    };
    let cfg_hash = sha256_hex(cfg_text.as_bytes());
    let samples = read_manifest(&opts.manifest, cfg.data.format)?;
    let b = cfg.optim.batch_size;
    let (rank, world) = opts.dist.as_ref().map_or((0, 1), |r| (r.rank, r.world_size));
    let global = b * world;
    if samples.len() < global {
        return Err(PretrainError::Invalid(format!(
            "{}: {} images for a global batch of {global} ({world} rank(s) × {b}); need at least one full batch",
            opts.manifest.display(),
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
    // The data must store the sample type the normalization is for (checked on the first readable
    // image; unreadable ones are skipped and counted by the loader).
    let bands = &cfg.model.bands;
    if let Some((path, img)) =
        samples.iter().take(64).find_map(|s| crate::image_io::decode(&s.path, bands).ok().map(|i| (&s.path, i)))
    {
        if img.stored() != cfg.model.sample_type {
            return Err(PretrainError::Invalid(format!(
                "{}: stores {} samples; the config's model.sample_type is {} (set it, with a normalization for that type)",
                path.display(),
                img.stored(),
                cfg.model.sample_type
            )));
        }
    }
    let steps_per_epoch = (samples.len() / global) as u64;
    let total = opts.max_steps.or(cfg.optim.max_steps).unwrap_or(cfg.optim.epochs as u64 * steps_per_epoch);
    let end = opts.stop_after.map_or(total, |s| s.min(total));
    std::fs::create_dir_all(&opts.out).map_err(io(&opts.out))?;
    let ck_dir = opts.out.join(CHECKPOINT_DIR);
    // Only rank 0 writes (and repairs) the checkpoint.
    if rank == 0 {
        recover_dir(&ck_dir).map_err(io(&ck_dir))?;
    }

    // Resume state, if any.
    let resumed: Option<(ModelSpec, TrainState)> = if opts.resume {
        let paths = CheckpointPaths::new(&ck_dir);
        let spec = paths.read_spec().map_err(CheckpointError::from)?;
        let st: TrainState = serde_json::from_slice(&std::fs::read(paths.state()).map_err(io(&paths.state()))?)
            .map_err(|e| PretrainError::Invalid(format!("{}: {e}", paths.state().display())))?;
        if st.config_sha256 != cfg_hash {
            return Err(PretrainError::Invalid(format!(
                "{}: the checkpoint was trained with another config (sha256 {}); resume needs the same config",
                ck_dir.display(),
                st.config_sha256
            )));
        }
        if st.world_size != world {
            return Err(PretrainError::Invalid(format!(
                "{}: the checkpoint was trained on {} rank(s); this run has {world}: the global batch, the queue's \
                 order and the data order would change (resume with WORLD_SIZE={})",
                ck_dir.display(),
                st.world_size,
                st.world_size
            )));
        }
        Some((spec, st))
    } else {
        None
    };

    // Geo clusters: k-means on the training locations, or the checkpoint's.
    let points: Vec<[f64; 3]> = samples.iter().map(|s| to_unit(s.lat, s.lon)).collect();
    let centroids = match (&resumed, cfg.geo.enabled) {
        (_, false) => None,
        (Some((spec, _)), true) => match spec.head(geossl_models::HeadKind::Geo) {
            Some(HeadSpec::Geo(g)) => Some(g.centroids.clone()),
            _ => return Err(PretrainError::Invalid("the checkpoint has no geo head".into())),
        },
        (None, true) => Some(
            kmeans_sphere(&points, cfg.geo.clusters, cfg.geo.kmeans_iters, cfg.run.seed)
                .map_err(PretrainError::Invalid)?,
        ),
    };
    let geo_labels: Vec<i64> = match &centroids {
        Some(c) => points.iter().map(|p| assign(c, *p) as i64).collect(),
        None => vec![0; samples.len()],
    };
    let spec = run_spec(cfg, centroids).map_err(PretrainError::Invalid)?;
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
    let (mut step, mut pairs, mut bad_images) = (0u64, PairStats::default(), 0u64);
    if let Some((_, st)) = &resumed {
        moco.load(&ck_dir, st.queue_ptr)?;
        if let (Some(ls), Some(saved)) = (moco.loss_scale.as_mut(), st.loss_scale) {
            *ls = saved;
        }
        step = st.step;
        pairs = st.pairs;
        bad_images = st.bad_images;
        tracing::info!("resumed from {} at step {step}", ck_dir.display());
    }
    if let Some(r) = &opts.dist {
        // Every rank must run the same config: compared at the rendezvous, before any step.
        // Gloo for the CPU, NCCL for a GPU (one per rank).
        let mut pg = geossl_dist::ProcessGroup::connect(r, geossl_dist::Backend::for_device(dev)?)?;
        let hash = Tensor::from_slice(&cfg_hash.as_bytes()[..32]).to_device(dev);
        let all = pg.all_gather(&hash)?;
        for other in 0..world {
            if !all.get(other as i64).equal(&hash) {
                return Err(PretrainError::Invalid(format!(
                    "rank {other} runs another config than rank {rank} (config sha256 differs): every rank needs \
                     the same config file and data"
                )));
            }
        }
        moco.join(pg)?;
        tracing::info!(
            rank,
            world,
            "data-parallel: global batch {global}, rendezvous at {}:{}",
            r.master_addr,
            r.master_port
        );
    }
    if rank == 0 {
        std::fs::write(opts.out.join(CONFIG_FILE), cfg_text).map_err(io(&opts.out.join(CONFIG_FILE)))?;
    }

    let norm = &spec.normalization;
    let nb = norm.bands() as i64;
    let mean = Tensor::from_slice(&norm.mean).reshape([1, nb, 1, 1]).to_device(dev);
    let std = Tensor::from_slice(&norm.std).reshape([1, nb, 1, 1]).to_device(dev);
    let (scale, offsets) = norm.physical();
    let scale = f64::from(scale);
    let offset = Tensor::from_slice(&offsets).reshape([1, nb, 1, 1]).to_device(dev);
    let rgb = {
        let f = |n: &str| cfg.model.bands.iter().position(|b| b.eq_ignore_ascii_case(n)).map(|i| i as i64);
        match (f("red"), f("green"), f("blue")) {
            (Some(r), Some(g), Some(b)) => Some([r, g, b]),
            _ => None,
        }
    };
    let prep = |raw: &Tensor| -> Tensor {
        // Stored samples → physical units (the spec's scale and offset), augmented there, then normalized.
        let x = raw.to_device(dev) * scale + &offset;
        let x = crate::augment::photometric(&x, rgb, &cfg.aug);
        (x - &mean) / &std
    };

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
    };
    let mut loader = Loader::start(samples, index, geo_labels, loader_cfg, step, end);
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(opts.out.join(METRICS_FILE))
        .map_err(io(&opts.out.join(METRICS_FILE)))?;
    let bar = if opts.progress {
        let pb = indicatif::ProgressBar::new(end);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.set_position(step);
        pb
    } else {
        indicatif::ProgressBar::hidden()
    };
    // The learning rate scales with the global batch (base_lr × global batch / 256).
    let base_lr = cfg.lr() * world as f64;
    let started = std::time::Instant::now();
    let start_step = step;
    let mut last_loss = f64::NAN;

    let save = |step: u64, pairs: PairStats, bad: u64, moco: &Moco| -> Result<(), CheckpointError> {
        let mut s = spec.clone();
        s.training = Some(TrainingInfo {
            method: cfg.preset.clone(),
            preset: Some(cfg.preset.clone()),
            config_sha256: Some(cfg_hash.clone()),
            step,
            source: None,
        });
        let st = TrainState {
            step,
            total_steps: total,
            config_sha256: cfg_hash.clone(),
            queue_ptr: moco.queue.ptr,
            pairs,
            bad_images: bad,
            loss_scale: moco.loss_scale,
            world_size: world,
        };
        save_checkpoint(&ck_dir, &s, &moco.vs_q, |dir| {
            let p = CheckpointPaths::new(dir);
            moco.save_extra(dir)?;
            std::fs::write(dir.join(CONFIG_FILE), cfg_text)
                .map_err(|error| CheckpointError::Io { path: dir.join(CONFIG_FILE), error })?;
            test_hook_kill("after-weights");
            std::fs::write(p.state(), serde_json::to_vec_pretty(&st).unwrap_or_default())
                .map_err(|error| CheckpointError::Io { path: p.state(), error })
        })
    };

    let mut skipped_steps = 0u64;
    let fill = (cfg.moco.queue_size as u64).div_ceil(b as u64);
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
    while step < end {
        let batch = loader.next_batch().map_err(PretrainError::Invalid)?;
        // Augmentation randomness on the device is a function of (seed, step) too.
        tch::manual_seed(
            (cfg.run.seed as i64).wrapping_mul(1_000_003).wrapping_add(step as i64).wrapping_add(rank as i64 * 7_919),
        );
        let lr = cosine_lr(base_lr, step, total);
        let geo_t = batch.geo.to_device(dev);
        let (q_in, k_in) = (prep(&batch.q), prep(&batch.k));
        let out = match moco.step(&q_in, &k_in, cfg.geo.enabled.then_some(&geo_t), lr) {
            Ok(out) => out,
            Err(e @ geossl_dist::DistError::Config(_)) => return Err(e.into()),
            Err(e) => {
                // The ranks' heartbeats name who is gone; if all still beat (a timeout), with two ranks it is
                // the other one.
                let lost = match moco.lost_ranks() {
                    Some(lost) => lost.to_string(),
                    None if world == 2 => format!("rank {}", 1 - rank),
                    None => "another rank".to_string(),
                };
                return Err(PretrainError::Invalid(format!(
                    "rank {rank} of {world} lost {lost} at step {} (it stopped, or did not answer within the \
                     timeout): {e}",
                    step + 1
                )));
            }
        };
        let loss_v = out.loss;
        if !loss_v.is_finite() {
            return Err(PretrainError::NonFinite { step, loss: loss_v, checkpoint: ck_dir.display().to_string() });
        }
        if out.skipped {
            skipped_steps += 1;
            tracing::warn!(step, scale = ?out.loss_scale, "fp16 gradients overflowed: step skipped, loss scale halved");
        }
        step += 1;
        last_loss = loss_v;
        pairs.anchors += b as u64;
        pairs.with_partner += batch.with_partner;
        bad_images += batch.bad_images;
        let ips = ((step - start_step) * b as u64) as f64 / started.elapsed().as_secs_f64().max(1e-9);
        bar.set_position(step);
        bar.set_message(progress_message(&out, ips));
        if rank == 0 && (step % cfg.run.log_every == 0 || step == end) {
            let line = serde_json::json!({
                "step": step, "loss": loss_v, "info_nce": out.info_nce,
                "geo_ce": out.geo_ce,
                "positive_top1": out.positive_top1, "geo_top1": out.geo_top1, "lr": lr, "img_per_s": ips,
                "temporal_partner_rate": pairs.rate(), "bad_images": bad_images,
                "loss_scale": out.loss_scale, "overflow_skipped_steps": skipped_steps,
                "world_size": world, "comm_s": moco.comm_timed().then_some(moco.comm_seconds),
            });
            writeln!(metrics, "{line}").map_err(io(&opts.out.join(METRICS_FILE)))?;
            tracing::info!(
                "step {step}/{total} {} lr {lr:.5} partner rate {:.3}",
                progress_message(&out, ips),
                pairs.rate()
            );
        }
        // Rank 0 writes the checkpoint; every rank holds the same weights and queue.
        if rank == 0 && (step % cfg.run.checkpoint_every == 0 || step == end) {
            save(step, pairs, bad_images, &moco)?;
        }
    }
    bar.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64();
    Ok(Summary {
        steps: step,
        final_loss: last_loss,
        partner_rate: pairs.rate(),
        bad_images,
        images_per_sec: ((step - start_step) * b as u64) as f64 / elapsed.max(1e-9),
        checkpoint: ck_dir,
    })
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tiny() -> (ModelSpec, PretrainConfig) {
        crate::fixtures::tiny_moco().unwrap()
    }

    /// A fresh MoCo, or one holding exactly `like`'s weights and queue (tests
    /// run in parallel and share libtorch's generator, so seeds can't make twins).
    fn moco(spec: &ModelSpec, cfg: &PretrainConfig, like: Option<&Moco>) -> Moco {
        let m = Moco::new(spec, cfg, Device::Cpu).unwrap();
        if let Some(src) = like {
            let p = Path::new("twin");
            load_state_dict(&m.vs_q, &m.spec, &state_dict(&src.vs_q, &src.spec).unwrap(), p).unwrap();
            load_state_dict(&m.vs_k, &m.key_spec, &state_dict(&src.vs_k, &src.key_spec).unwrap(), p).unwrap();
            tch::no_grad(|| m.queue.keys.shallow_clone().copy_(&src.queue.keys));
        }
        m
    }

    /// One step on fixed inputs. With one shuffle-BN group the random
    /// permutation cannot change the keys.
    fn step(m: &mut Moco) -> StepOut {
        let x = |phase: f64| {
            (Tensor::arange(8 * 3 * 32 * 32, (Kind::Float, Device::Cpu)) * 0.37 + phase).sin().view([8, 3, 32, 32])
        };
        m.step(&x(0.0), &x(1.0), None, 0.5).unwrap()
    }

    /// Largest difference between the trainable parameters of `a` and `b`
    /// (BN statistics move in every forward, trained or not).
    fn max_diff(a: &Moco, b: &Moco) -> f64 {
        a.sgd
            .params()
            .iter()
            .zip(b.sgd.params())
            .map(|(x, y)| (x - y).abs().max().double_value(&[]))
            .fold(0.0, f64::max)
    }

    #[test]
    fn loss_scaling_steps_like_no_scaling_and_skips_overflowing_steps() {
        let (spec, cfg) = tiny();
        let mut plain = moco(&spec, &cfg, None);
        let before = moco(&spec, &cfg, Some(&plain));
        let mut scaled = moco(&spec, &cfg, Some(&plain));
        scaled.loss_scale = Some(LossScale::default());
        let mut huge = moco(&spec, &cfg, Some(&plain));
        assert_eq!(max_diff(&plain, &scaled), 0.0);
        let (a, b) = (step(&mut plain), step(&mut scaled));
        assert!(!a.skipped && a.loss_scale.is_none(), "{a:?}");
        assert!(!b.skipped && b.loss_scale == Some(65536.0), "{b:?}");
        assert!((a.loss - b.loss).abs() < 1e-5, "{} vs {}", a.loss, b.loss);
        let moved = max_diff(&before, &plain);
        assert!(moved > 1e-4, "the step moved nothing: {moved}");
        // ×2^16 then ÷2^16 is exact: the scaled step lands where the plain one did.
        let d = max_diff(&plain, &scaled);
        assert!(d < 1e-3 * moved, "scaled step differs by {d}; the step moved {moved}");
        // A scale at which the gradients overflow: step skipped, nothing trained, scale halved.
        huge.loss_scale = Some(LossScale { scale: f64::MAX, ..LossScale::default() });
        let c = step(&mut huge);
        assert!(c.skipped && c.loss.is_finite(), "{c:?}");
        assert_eq!(c.loss_scale, Some(f64::MAX * 0.5));
        assert_eq!(max_diff(&before, &huge), 0.0);
    }

    /// A copy of `src`'s weights in a fresh model, in float64 when `double`, each
    /// floating-point parameter and buffer multiplied by `1 + u·r` (r a fixed
    /// pseudo-random pattern in [-1, 1] per `seed`) when `jitter` is `Some((u, seed))`.
    fn twin(spec: &ModelSpec, src: &nn::VarStore, double: bool, jitter: Option<(f64, f64)>) -> (nn::VarStore, Model) {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let m = Model::new(&vs.root(), spec);
        load_state_dict(&vs, spec, &state_dict(src, spec).unwrap(), Path::new("twin")).unwrap();
        if double {
            vs.double();
        }
        if let Some((u, seed)) = jitter {
            tch::no_grad(|| {
                for (_, mut v) in vs.variables().into_iter().filter(|(_, v)| v.is_floating_point()) {
                    let j = perturb(&v, u, seed);
                    v.copy_(&j);
                }
            });
        }
        (vs, m)
    }

    /// `x · (1 + u·r)` with `r` a fixed pseudo-random pattern in [-1, 1] (a hash of
    /// the element index and `seed`: no global RNG, which concurrent tests share).
    fn perturb(x: &Tensor, u: f64, seed: f64) -> Tensor {
        let i = Tensor::arange(x.numel() as i64, (Kind::Double, Device::Cpu)).reshape(x.size());
        let r = ((i * 12.9898 + seed * 78.233).sin().abs() * 43758.5453).frac() * 2.0 - 1.0;
        (x.to_kind(Kind::Double) * (r * u + 1.0)).to_kind(x.kind())
    }

    /// Pooled features `[N, 512]` of `m` on `x` `[N, 3, H, W]` and the gradient
    /// `[64, 3, 7, 7]` of a fixed weighting of them w.r.t. `conv1.weight`, as f64.
    /// (The plain feature sum would nearly cancel through train-mode BatchNorm.)
    fn features_and_grad(m: &Model, vs: &nn::VarStore, x: &Tensor, train: bool) -> (Tensor, Tensor) {
        let f = m.backbone.pooled(x, train);
        let probe = (Tensor::arange(f.numel() as i64, (Kind::Double, Device::Cpu)) * 0.91).cos();
        let l = (&f * probe.reshape(f.size()).to_kind(f.kind())).sum(f.kind());
        let g = Tensor::run_backward(&[l], &[&vs.variables()["conv1.weight"]], false, false);
        (f.detach().to_kind(Kind::Double), g[0].to_kind(Kind::Double))
    }

    /// `max|a - r| / max|r|`.
    fn rel_err(a: &Tensor, r: &Tensor) -> f64 {
        (a - r).abs().max().double_value(&[]) / r.abs().max().double_value(&[])
    }

    /// Both fp32 layouts are compared with a float64 reference, not with each
    /// other: which fp32 layout lands closer depends on the CPU's kernels. The
    /// tolerance follows from the reference too. `floor`: how far the f64 result
    /// moves when every weight, buffer and input is perturbed by one fp32 rounding
    /// (u = 2⁻²⁴, random signs) — the typical fp32 error as this computation's
    /// conditioning amplifies it. Kernels may sum in any order: the worst case of a
    /// K-term fp32 sum exceeds that typical error by √(3K) (γ_K = K·u against
    /// random rounding's √(K/3)·u), with K up to 3·3·512 = 4,608 here, and errors
    /// can compound through the network's 20 convolution/BatchNorm layers, so the
    /// tolerance is `√(3·4608)·20·floor` (≈ 2,350 floors). A broken conversion
    /// (strides changed, data not moved) must land far outside it.
    #[test]
    fn channels_last_layout_computes_the_same_forward_and_gradients() {
        const U: f64 = f32::EPSILON as f64 / 2.0;
        let factor = (3.0f64 * 4608.0).sqrt() * 20.0;
        let (spec, _) = tiny();
        let vs_a = nn::VarStore::new(Device::Cpu);
        let a = Model::new(&vs_a.root(), &spec);
        // Fixed Kaiming-uniform convolution weights (BatchNorm starts at γ = 1, β = 0): random ones
        // come from the global RNG, which concurrent tests share, so each run would test other
        // weights, and with them another conditioning.
        tch::no_grad(|| {
            let mut vars: Vec<_> = vs_a.variables().into_iter().filter(|(_, v)| v.dim() == 4).collect();
            vars.sort_by(|x, y| x.0.cmp(&y.0));
            for (k, (_, mut v)) in vars.into_iter().enumerate() {
                let (_, i, kh, kw) = v.size4().unwrap();
                let bound = (6.0 / (i * kh * kw) as f64).sqrt();
                let w = (perturb(&v.ones_like(), 1.0, 100.0 + k as f64) - 1.0) * bound;
                v.copy_(&w);
            }
        });
        let (vs_b, b) = twin(&spec, &vs_a, false, None);
        crate::model::to_channels_last(&vs_b);
        let w = &vs_b.variables()["conv1.weight"];
        let (o, i, kh, kw) = w.size4().unwrap();
        assert_eq!(w.stride(), vec![i * kh * kw, 1, kw * i, i], "not channels-last: {:?} {:?}", w.size(), w.stride());
        assert_eq!(o, 64);
        // A checkpoint of channels-last weights holds the same values in the same (logical) order.
        let (sa, sb) = (state_dict(&vs_a, &spec).unwrap(), state_dict(&vs_b, &spec).unwrap());
        assert!(sa.tensors == sb.tensors);
        // A deliberately broken conversion: channels-last strides over the unmoved data.
        let (vs_broken, broken) = twin(&spec, &vs_a, false, None);
        tch::no_grad(|| {
            for (_, mut v) in vs_broken.variables() {
                if v.dim() == 4 {
                    let (o, i, kh, kw) = v.size4().unwrap();
                    let wrong = v.contiguous().as_strided([o, i, kh, kw], [i * kh * kw, 1, kw * i, i], None);
                    v.set_data(&wrong);
                }
            }
        });
        let (vs_r, r) = twin(&spec, &vs_a, true, None);
        assert_eq!(vs_r.variables()["conv1.weight"].kind(), Kind::Double);
        let jittered: Vec<_> = [1.0, 2.0].iter().map(|&s| twin(&spec, &vs_a, true, Some((U, s)))).collect();
        // A fixed input (the global RNG is shared with concurrently running tests).
        // 8 samples of 64²: the deepest BatchNorm (layer4, 2×2) normalizes over 32 values per channel; over
        // the 4 values of 4 samples at 32² its statistics amplify rounding 10× more (measured).
        let (n, hw) = (8i64, 64i64);
        let x = (Tensor::arange(n * 3 * hw * hw, (Kind::Double, Device::Cpu)) * 0.37).sin().reshape([n, 3, hw, hw]);
        let x32 = x.to_kind(Kind::Float);
        let xl = crate::model::channels_last(&x32);
        assert_eq!(xl.stride(), vec![3 * hw * hw, 1, hw * 3, 3]);
        for train in [false, true] {
            let (fr, gr) = features_and_grad(&r, &vs_r, &x, train);
            let mut floor = (0f64, 0f64);
            for (k, (vs, m)) in jittered.iter().enumerate() {
                let (f, g) = features_and_grad(m, vs, &perturb(&x, U, 10.0 + k as f64), train);
                floor = (floor.0.max(rel_err(&f, &fr)), floor.1.max(rel_err(&g, &gr)));
            }
            let tol = (factor * floor.0, factor * floor.1);
            // The check can tell a broken layout from rounding only while the tolerance is small.
            assert!(tol.0 < 0.05 && tol.1 < 0.05, "train {train}: fp32 error floor {floor:?} too large to test");
            for (name, m, vs, x) in [("contiguous", &a, &vs_a, &x32), ("channels-last", &b, &vs_b, &xl)] {
                let (f, g) = features_and_grad(m, vs, x, train);
                let (ef, eg) = (rel_err(&f, &fr), rel_err(&g, &gr));
                eprintln!(
                    "train {train} {name}: features {ef:.2e} (tol {:.2e}), grad {eg:.2e} (tol {:.2e})",
                    tol.0, tol.1
                );
                assert!(ef <= tol.0, "train {train} {name}: features differ from f64 by {ef:e} > {:e}", tol.0);
                assert!(eg <= tol.1, "train {train} {name}: conv1 gradient differs from f64 by {eg:e} > {:e}", tol.1);
            }
            let (f, g) = features_and_grad(&broken, &vs_broken, &xl, train);
            let (ef, eg) = (rel_err(&f, &fr), rel_err(&g, &gr));
            assert!(ef > 10.0 * tol.0 && eg > 10.0 * tol.1, "train {train}: a broken layout passes ({ef:e}, {eg:e})");
        }
    }
}
