//! MoCo-v2 (He et al.; Chen et al.) as the paper trains it: the query encoder (trained) and the key encoder
//! (its momentum copy), the negative-key queue, InfoNCE, the optional geo-location head's loss, and one
//! training step — on one process or data-parallel over `geossl_dist` ([`Moco::join`]).

use std::path::Path;

use geossl_models::checkpoint::CheckpointPaths;
use geossl_models::{ModelSpec, StateDict};
use serde::Serialize;
use tch::{nn, Device, Kind, Tensor};

use crate::amp::{AmpDtype, LossScale};
use crate::checkpoint::{copy_into, load_state_dict, state_dict, CheckpointError};
use crate::config::PretrainConfig;
use crate::model::{l2_normalize, Model};
use crate::optim::{tensors_to_state, Sgd};

/// The key encoder's weights, beside a checkpoint's `model.safetensors`.
pub const KEY_FILE: &str = "key.safetensors";
/// The negative queue, beside them.
pub const QUEUE_FILE: &str = "queue.safetensors";

geossl_models::message_error!(
    /// A batch of keys the queue cannot take (its size must divide the queue's).
    QueueError
);

/// A FIFO of L2-normalized keys `[K, D]` used as negatives.
#[derive(Debug)]
pub struct Queue {
    /// `[K, D]`.
    pub keys: Tensor,
    /// Row where the next batch is written.
    pub ptr: i64,
}

impl Queue {
    /// `k` random unit vectors of width `dim` (MoCo's initial queue).
    pub fn new(k: i64, dim: i64, device: tch::Device) -> Self {
        let keys = Tensor::randn([k, dim], (Kind::Float, device));
        Self { keys: crate::model::l2_normalize(&keys), ptr: 0 }
    }

    pub fn len(&self) -> i64 {
        self.keys.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replaces the oldest `B` rows by `keys [B, D]`. `K` must be a multiple of `B`.
    pub fn enqueue(&mut self, keys: &Tensor) -> Result<(), QueueError> {
        let b = keys.size()[0];
        let k = self.len();
        if b == 0 || k % b != 0 {
            return Err(format!("queue size {k} is not a multiple of the batch size {b}").into());
        }
        tch::no_grad(|| {
            self.keys.narrow(0, self.ptr, b).copy_(&keys.detach().to_kind(self.keys.kind()));
        });
        self.ptr = (self.ptr + b) % k;
        Ok(())
    }
}

/// InfoNCE over one positive and the queue's negatives.
///
/// `q`, `k`: `[B, D]` L2-normalized; `queue`: `[K, D]`. Returns the mean
/// cross-entropy loss (scalar) and the logits `[B, 1 + K]` (positive first),
/// divided by `temperature`.
pub fn info_nce(q: &Tensor, k: &Tensor, queue: &Tensor, temperature: f64) -> (Tensor, Tensor) {
    let l_pos = (q * k).sum_dim_intlist([1i64].as_slice(), true, Kind::Float);
    let l_neg = q.mm(&queue.detach().tr());
    let logits = Tensor::cat(&[l_pos, l_neg], 1) / temperature;
    let labels = Tensor::zeros([q.size()[0]], (Kind::Int64, q.device()));
    (logits.cross_entropy_for_logits(&labels), logits)
}

/// Top-1 accuracy of the positive among `logits [B, 1 + K]`.
pub fn positive_top1(logits: &Tensor) -> f64 {
    let hits = logits.argmax(1, false).eq(0).to_kind(Kind::Float).mean(Kind::Float);
    hits.double_value(&[])
}

/// `key = m · key + (1 − m) · query` for every pair of parameters.
pub fn momentum_update(key: &[Tensor], query: &[Tensor], m: f64) {
    tch::no_grad(|| {
        for (k, q) in key.iter().zip(query) {
            let _ = k.shallow_clone().lerp_(&q.detach(), 1.0 - m);
        }
    });
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

/// Result of one MoCo step.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StepOut {
    pub loss: f64,
    pub info_nce: f64,
    pub geo_ce: Option<f64>,
    /// Share of queries whose positive key scores above every negative.
    pub positive_top1: f64,
    /// Mean `‖q − k‖²` of the batch's positive pairs (Wang & Isola's alignment; 0: they coincide).
    pub alignment: f64,
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
                let acc = (positive_top1(&logits.detach()), crate::health::alignment(&q.detach(), &k));
                Ok((loss, nce, (geo_loss, geo_acc), acc, all_keys))
            })?;
        let (geo_loss, geo_top1) = geo_loss;
        let mut out = StepOut {
            loss: loss.double_value(&[]),
            info_nce: nce.double_value(&[]),
            geo_ce: geo_loss.as_ref().map(|g| g.double_value(&[])),
            positive_top1: acc.0,
            alignment: acc.1,
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn v(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.reshape([-1])).unwrap()
    }

    #[test]
    fn queue_is_fifo_and_checks_sizes() {
        let mut q = Queue::new(6, 2, Device::Cpu);
        let a = Tensor::from_slice(&[1f32, 1., 2., 2.]).reshape([2, 2]);
        let b = Tensor::from_slice(&[3f32, 3., 4., 4.]).reshape([2, 2]);
        q.enqueue(&a).unwrap();
        q.enqueue(&b).unwrap();
        assert_eq!(q.ptr, 4);
        assert_eq!(v(&q.keys.narrow(0, 0, 4)), [1., 1., 2., 2., 3., 3., 4., 4.]);
        q.enqueue(&a).unwrap();
        q.enqueue(&b).unwrap(); // wraps: overwrites the oldest rows
        assert_eq!(q.ptr, 2);
        assert_eq!(v(&q.keys.narrow(0, 0, 2)), [3., 3., 4., 4.]);
        let three = Tensor::zeros([4, 2], (Kind::Float, Device::Cpu));
        assert!(q.enqueue(&three).unwrap_err().to_string().contains("multiple"));
    }

    #[test]
    fn info_nce_equals_direct_computation() {
        // Fixed inputs: the global RNG is shared with concurrently running tests.
        let n = |rows: i64, phase: f64| {
            let t = (Tensor::arange(rows * 4, (Kind::Float, Device::Cpu)) * 1.7 + phase).sin().reshape([rows, 4]);
            crate::model::l2_normalize(&t)
        };
        let (q, k, queue) = (n(3, 0.0), n(3, 0.5), n(5, 2.0));
        let t = 0.2;
        let (loss, logits) = info_nce(&q, &k, &queue, t);
        assert_eq!(logits.size(), [3, 6]);
        let (qv, kv, nv) = (v(&q), v(&k), v(&queue));
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum::<f64>();
        let mut total = 0.0;
        for i in 0..3 {
            let qi = &qv[i * 4..i * 4 + 4];
            let pos = dot(qi, &kv[i * 4..i * 4 + 4]) / t;
            let negs: Vec<f64> = (0..5).map(|j| dot(qi, &nv[j * 4..j * 4 + 4]) / t).collect();
            let lse = (pos.exp() + negs.iter().map(|x| x.exp()).sum::<f64>()).ln();
            total += lse - pos;
        }
        let direct = total / 3.0;
        assert!((loss.double_value(&[]) - direct).abs() < 1e-5, "{} vs {direct}", loss.double_value(&[]));
    }

    #[test]
    fn momentum_update_moves_keys_toward_queries() {
        let k = Tensor::from_slice(&[1f32, 2.]);
        let q = Tensor::from_slice(&[3f32, -2.]);
        momentum_update(std::slice::from_ref(&k), std::slice::from_ref(&q), 0.9);
        let got = v(&k);
        assert!((got[0] - 1.2).abs() < 1e-6 && (got[1] - 1.6).abs() < 1e-6, "{got:?}");
        assert_eq!(v(&q), [3., -2.], "query untouched");
    }
}

#[cfg(test)]
mod step_tests {
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
