//! Is a self-supervised run learning or collapsing? Measures of a set of L2-normalized embeddings: how far
//! they spread over the sphere and over how many directions.
//!
//! A run can collapse while its loss falls: every image maps to (nearly) one point, or to a few directions.
//! These measures see it where the loss does not. They are computed over many embeddings at once — the MoCo
//! queue's keys, more rows than dimensions — since one batch of `B < D` rows caps the rank at `B`.
//!
//! Shapes: embeddings `[N, D]`, rows of unit length.

use serde::Serialize;
use tch::{Kind, Tensor};

/// Most rows measured: more spread the pairwise terms over `N²` entries (64 MiB of f32 at 4,096).
pub const MAX_ROWS: i64 = 4096;

/// The health of `N` unit embeddings of width `D`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Health {
    /// Embeddings measured (`N`).
    pub samples: usize,
    /// Their width (`D`).
    pub dim: usize,
    /// Mean over the dimensions of each one's standard deviation, times `√D`. For unit vectors spread
    /// evenly over the sphere each coordinate has variance `1/D`, so this is ≈ 1; it is 0 when every
    /// embedding is the same (the collapse measure of SimSiam, Chen & He 2021, scaled by `√D`).
    pub std: f64,
    /// `exp` of the entropy of the singular values normalized to sum 1 (Roy & Vetterli 2007; RankMe,
    /// Garrido et al. 2023): 1 when every embedding lies on one line, `min(N, D)` when they fill every
    /// direction equally; the number of directions in use.
    pub effective_rank: f64,
    /// `log E exp(−2‖x − y‖²)` over distinct pairs (Wang & Isola 2020, t = 2): 0 when all are equal; −4 for
    /// orthogonal vectors; ≈ −4 + 8/D for vectors uniform on the sphere. Lower is more uniform.
    pub uniformity: f64,
    /// Mean cosine over distinct pairs: 1 when all are equal, ≈ 0 when spread evenly.
    pub mean_cosine: f64,
}

/// The measures of `z` (`[N, D]`, unit rows, `N ≥ 2`; at most [`MAX_ROWS`] evenly spaced rows are used).
/// Computed in f64 on `z`'s device.
pub fn health(z: &Tensor) -> Health {
    tch::no_grad(|| {
        let n_all = z.size()[0];
        let z = if n_all > MAX_ROWS {
            let idx = Tensor::arange(MAX_ROWS, (Kind::Int64, z.device())) * n_all / MAX_ROWS;
            z.index_select(0, &idx)
        } else {
            z.shallow_clone()
        };
        let z = z.to_kind(Kind::Double);
        let (n, d) = (z.size()[0], z.size()[1]);
        let std = z.std_dim(0i64, false, false).mean(Kind::Double).double_value(&[]) * (d as f64).sqrt();
        // Singular values as the square roots of the eigenvalues of the `[D, D]` Gram matrix (f64: the
        // smallest lose precision, and with it nothing, since they add ~0 to the entropy).
        let s = z.transpose(0, 1).matmul(&z).linalg_eigvalsh("L").clamp_min(0.0).sqrt();
        let total = s.sum(Kind::Double).double_value(&[]);
        let effective_rank = if total > 0.0 {
            let p = &s / total;
            // 0·ln 0 = 0.
            let h = -(&p * p.clamp_min(1e-300).log()).sum(Kind::Double).double_value(&[]);
            h.exp()
        } else {
            0.0
        };
        let g = z.matmul(&z.transpose(0, 1));
        let sq_norm = g.diagonal(0, 0, 1);
        // ‖x − y‖² = ‖x‖² + ‖y‖² − 2 x·y (exact for the zero vector too).
        let sq = (sq_norm.unsqueeze(1) + sq_norm.unsqueeze(0) - &g * 2.0).clamp_min(0.0);
        let pairs = (n * (n - 1)) as f64;
        // The diagonal adds exp(0) = 1 per row to the sum, and ‖x‖² per row to the trace.
        let kernel = ((sq * -2.0).exp().sum(Kind::Double).double_value(&[]) - n as f64) / pairs;
        let uniformity = kernel.ln();
        let mean_cosine = (g.sum(Kind::Double) - g.trace()).double_value(&[]) / pairs;
        Health { samples: n as usize, dim: d as usize, std, effective_rank, uniformity, mean_cosine }
    })
}

/// Below this `std` (see [`Health::std`]) the embeddings are collapsing: their spread is a tenth of
/// what evenly spread embeddings have — for embeddings scattered around one direction, a cone of about
/// 6° (√D·std ≈ sin of the spread angle).
pub const COLLAPSE_STD: f64 = 0.1;

/// Below this effective rank the embeddings are collapsing onto a line: fewer than two directions carry
/// them (a single direction gives exactly 1).
pub const COLLAPSE_EFFECTIVE_RANK: f64 = 2.0;

impl Health {
    /// The measure that says the embeddings are collapsing, and why; `None` when none does.
    pub fn collapse(&self) -> Option<String> {
        if self.std < COLLAPSE_STD {
            return Some(format!(
                "embedding std {:.3} (×√D; evenly spread embeddings have ≈ 1, a collapsed run 0; below {COLLAPSE_STD} \
                 they are within a few degrees of one direction)",
                self.std
            ));
        }
        if self.effective_rank < COLLAPSE_EFFECTIVE_RANK {
            return Some(format!(
                "effective rank {:.2} of {} dimensions (below {COLLAPSE_EFFECTIVE_RANK}: the embeddings lie on about \
                 one line)",
                self.effective_rank, self.dim
            ));
        }
        None
    }

    /// One line for the log.
    pub fn line(&self) -> String {
        format!(
            "health: std {:.3} effective rank {:.1}/{} uniformity {:.2} mean cosine {:.3} ({} embeddings)",
            self.std, self.effective_rank, self.dim, self.uniformity, self.mean_cosine, self.samples
        )
    }
}

/// Alignment of positive pairs (Wang & Isola 2020, α = 2): the mean of `‖q − k‖²` over the rows of `q`
/// and `k` (`[B, D]`, unit rows): 0 when every pair coincides, 2 for orthogonal pairs, 4 for opposite.
pub fn alignment(q: &Tensor, k: &Tensor) -> f64 {
    tch::no_grad(|| {
        (q.to_kind(Kind::Double) - k.to_kind(Kind::Double))
            .square()
            .sum_dim_intlist(1i64, false, Kind::Double)
            .mean(Kind::Double)
            .double_value(&[])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn identical_embeddings_have_rank_one_and_no_spread() {
        let v = crate::model::l2_normalize(&Tensor::randn([1, 16], (Kind::Float, tch::Device::Cpu)));
        let h = health(&v.repeat([40, 1]));
        assert_eq!((h.samples, h.dim), (40, 16));
        // f32 inputs: each unit row has ‖x‖² = 1 within a few f32 ulps.
        assert!(close(h.std, 0.0, 1e-6), "{h:?}");
        assert!(close(h.effective_rank, 1.0, 1e-6), "{h:?}");
        assert!(close(h.uniformity, 0.0, 1e-6), "{h:?}");
        assert!(close(h.mean_cosine, 1.0, 1e-6), "{h:?}");
        assert!(h.collapse().is_some_and(|m| m.contains("std")), "{h:?}");
    }

    #[test]
    fn orthonormal_embeddings_have_full_rank_and_derived_spread() {
        let d = 32;
        let h = health(&Tensor::eye(d, (Kind::Float, tch::Device::Cpu)));
        assert!(close(h.effective_rank, d as f64, 1e-9), "{h:?}");
        assert!(close(h.mean_cosine, 0.0, 1e-12), "{h:?}");
        // ‖x − y‖² = 2 for every pair: log exp(−4).
        assert!(close(h.uniformity, -4.0, 1e-12), "{h:?}");
        // Each dimension: one 1 among D rows, population std √(1/D − 1/D²); times √D: √(1 − 1/D).
        assert!(close(h.std, (1.0 - 1.0 / d as f64).sqrt(), 1e-12), "{h:?}");
        assert_eq!(h.collapse(), None);
    }

    #[test]
    fn two_directions_are_two_and_a_line_is_flagged() {
        // Half the rows along e0, half along e1: singular values √(N/2) twice → rank 2.
        let mut rows = vec![0f32; 20 * 8];
        for i in 0..20 {
            rows[i * 8 + i % 2] = 1.0;
        }
        let h = health(&Tensor::from_slice(&rows).view([20, 8]));
        assert!(close(h.effective_rank, 2.0, 1e-9), "{h:?}");
        // Pairs: of the 190, 90 share a direction (cosine 1), 100 are orthogonal.
        assert!(close(h.mean_cosine, 90.0 / 190.0, 1e-12), "{h:?}");
        // ±e0: spread along one line (std high, rank 1).
        let line: Vec<f32> = (0..20).flat_map(|i| [if i % 2 == 0 { 1.0 } else { -1.0 }, 0.0, 0.0, 0.0]).collect();
        let h = health(&Tensor::from_slice(&line).view([20, 4]));
        assert!(close(h.effective_rank, 1.0, 1e-9), "{h:?}");
        assert!(h.collapse().is_some_and(|m| m.contains("effective rank")), "{h:?}");
    }

    #[test]
    fn random_unit_vectors_are_healthy_and_near_the_sphere_values() {
        tch::manual_seed(0);
        let (n, d) = (2048, 64);
        let z = crate::model::l2_normalize(&Tensor::randn([n, d], (Kind::Float, tch::Device::Cpu)));
        let h = health(&z);
        assert_eq!(h.collapse(), None, "{h:?}");
        // Uniform on the sphere: std ≈ 1, uniformity ≈ −4 + 8/D, mean cosine ≈ 0 (±1/√(D·pairs)).
        assert!(close(h.std, 1.0, 0.05), "{h:?}");
        assert!(close(h.uniformity, -4.0 + 8.0 / d as f64, 0.05), "{h:?}");
        assert!(h.mean_cosine.abs() < 0.01, "{h:?}");
        assert!(h.effective_rank > 0.9 * d as f64, "{h:?}");
    }

    #[test]
    fn alignment_of_pairs() {
        let e = Tensor::eye(4, (Kind::Float, tch::Device::Cpu));
        assert!(close(alignment(&e, &e), 0.0, 0.0));
        assert!(close(alignment(&e, &e.roll([1], [0])), 2.0, 1e-12));
        assert!(close(alignment(&e, &(-&e)), 4.0, 1e-12));
    }
}
