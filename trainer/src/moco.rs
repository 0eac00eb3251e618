//! MoCo-v2 pieces: the negative-key queue, InfoNCE, and the momentum update.

use tch::{Kind, Tensor};

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
    pub fn enqueue(&mut self, keys: &Tensor) -> Result<(), String> {
        let b = keys.size()[0];
        let k = self.len();
        if b == 0 || k % b != 0 {
            return Err(format!("queue size {k} is not a multiple of the batch size {b}"));
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
        assert!(q.enqueue(&three).unwrap_err().contains("multiple"));
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
