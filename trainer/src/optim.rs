//! Optimization: SGD with momentum and weight decay (PyTorch's semantics, state saved with checkpoints), for
//! pretraining and the supervised commands alike, and the cosine learning-rate schedule.

use std::path::Path;

use geossl_models::{ModelSpec, StateDict};
use tch::{nn, Device, Tensor};

use crate::checkpoint::{copy_into, to_named, CheckpointError};

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
    /// Over the trainable parameters of `spec` in `vs`, in the spec's order (which names the saved state and
    /// orders data-parallel gradient buckets).
    pub fn new(vs: &nn::VarStore, spec: &ModelSpec, momentum: f64, weight_decay: f64) -> Self {
        let names: Vec<String> = spec.parameters().into_iter().filter(|p| p.role.trainable()).map(|p| p.name).collect();
        Self::with_names(vs, names, momentum, weight_decay)
    }

    /// Over every trainable variable of `vs`, by name.
    pub fn over(vs: &nn::VarStore, momentum: f64, weight_decay: f64) -> Self {
        let mut names: Vec<String> =
            vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).map(|(n, _)| n).collect();
        names.sort();
        Self::with_names(vs, names, momentum, weight_decay)
    }

    fn with_names(vs: &nn::VarStore, names: Vec<String>, momentum: f64, weight_decay: f64) -> Self {
        let vars = vs.variables();
        let params: Vec<Tensor> = names.iter().map(|n| vars[n].shallow_clone()).collect();
        let bufs = params.iter().map(|p| p.zeros_like().detach()).collect();
        Self { names, params, bufs, momentum, weight_decay }
    }

    /// PyTorch's `zero_grad(); loss.backward(); step()` at learning rate `lr`.
    pub fn backward_step(&mut self, loss: &Tensor, lr: f64) {
        for p in &mut self.params {
            p.zero_grad();
        }
        loss.backward();
        let grads: Vec<Tensor> = self.params.iter().map(Tensor::grad).collect();
        self.step(&grads, lr);
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

pub(crate) fn tensors_to_state(items: impl Iterator<Item = (String, Tensor)>) -> Result<StateDict, CheckpointError> {
    let tensors = items.map(|(name, t)| to_named(&name, &t)).collect::<Result<_, _>>()?;
    Ok(StateDict { tensors, metadata: Default::default() })
}

/// Cosine learning-rate schedule over `total` steps (no restarts), as MoCo's `--cos`.
pub fn cosine_lr(base: f64, step: u64, total: u64) -> f64 {
    base * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total.max(1) as f64).cos())
}
