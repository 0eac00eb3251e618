//! L2-regularized logistic regression with scikit-learn's objective, solved by L-BFGS.
//!
//! For `K > 2` classes (multinomial, softmax), with weights `W [K, D]` and unpenalized intercepts `b [K]`:
//! `½‖W‖² + C Σᵢ (logsumexp(W xᵢ + b) − (W xᵢ + b)_{yᵢ})`. For two classes one weight vector `w [D]` and
//! intercept scores class 1: `½‖w‖² + C Σᵢ log(1 + exp(−sᵢ (w·xᵢ + b)))` with `sᵢ = ±1`. These are the
//! objectives of `sklearn.linear_model.LogisticRegression(C=C)` (lbfgs; its mean form is this one divided
//! by `C·n`), so at convergence both give the same model. Features `x [N, D]` are row-major.

use serde::Serialize;

/// Why a model cannot be fitted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FitError {
    #[error("{0}")]
    Input(String),
}

/// Fitting options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FitOptions {
    /// Inverse regularization strength (scikit-learn's `C`), > 0.
    pub c: f64,
    /// Stop when the largest gradient component of the mean objective (scikit-learn's scale: the objective
    /// above divided by `C·n`) is at most this.
    pub tol: f64,
    pub max_iter: usize,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self { c: 1.0, tol: 1e-6, max_iter: 1000 }
    }
}

/// A fitted model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Logistic {
    /// Classes (`K ≥ 2`).
    pub classes: usize,
    /// Feature width `D`.
    pub dim: usize,
    /// `[K', D]` row-major, `K' = 1` for two classes (scores class 1), else `K`.
    pub weights: Vec<f64>,
    /// `[K']`.
    pub intercepts: Vec<f64>,
    /// L-BFGS iterations taken, and whether the tolerance was met.
    pub iterations: usize,
    pub converged: bool,
}

/// Fits `x [N, D]` (row-major) with labels `y` in `0..classes`.
pub fn fit(x: &[f32], dim: usize, y: &[usize], classes: usize, o: FitOptions) -> Result<Logistic, FitError> {
    let n = y.len();
    if dim == 0 || x.len() != n * dim {
        return Err(FitError::Input(format!("{} feature values for {n} labels of width {dim}", x.len())));
    }
    if classes < 2 {
        return Err(FitError::Input(format!("logistic regression needs at least 2 classes, got {classes}")));
    }
    if let Some(&bad) = y.iter().find(|&&c| c >= classes) {
        return Err(FitError::Input(format!("label {bad} is not below the class count {classes}")));
    }
    if !(o.c > 0.0 && o.c.is_finite()) {
        return Err(FitError::Input(format!("C must be a positive number, got {}", o.c)));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(FitError::Input(format!("feature {} of example {} is not finite", i % dim, i / dim)));
    }
    let k = if classes == 2 { 1 } else { classes };
    let problem = Problem { x, dim, y, k, c: o.c };
    let (theta, iterations, converged) = lbfgs(&problem, o.tol * o.c * n as f64, o.max_iter);
    let (weights, intercepts) = theta.split_at(k * dim);
    Ok(Logistic { classes, dim, weights: weights.to_vec(), intercepts: intercepts.to_vec(), iterations, converged })
}

impl Logistic {
    /// Decision scores `[N, K']` (two classes: one score, class 1's log-odds).
    pub fn decision(&self, x: &[f32]) -> Vec<f64> {
        let k = self.intercepts.len();
        x.chunks_exact(self.dim)
            .flat_map(|row| {
                (0..k).map(move |c| {
                    let w = &self.weights[c * self.dim..(c + 1) * self.dim];
                    self.intercepts[c] + w.iter().zip(row).map(|(a, b)| a * f64::from(*b)).sum::<f64>()
                })
            })
            .collect()
    }

    /// Class probabilities `[N, K]`.
    pub fn probabilities(&self, x: &[f32]) -> Vec<f64> {
        let k = self.intercepts.len();
        let z = self.decision(x);
        if k == 1 {
            return z.iter().flat_map(|s| [1.0 / (1.0 + s.exp()), 1.0 / (1.0 + (-s).exp())]).collect();
        }
        z.chunks_exact(k).flat_map(softmax).collect()
    }

    /// The most probable class of each row.
    pub fn predict(&self, x: &[f32]) -> Vec<usize> {
        let k = self.intercepts.len();
        let z = self.decision(x);
        if k == 1 {
            return z.iter().map(|&s| usize::from(s > 0.0)).collect();
        }
        z.chunks_exact(k).map(argmax).collect()
    }
}

/// Index of the largest value (the first on ties).
pub fn argmax(v: &[f64]) -> usize {
    v.iter().enumerate().fold((0, f64::NEG_INFINITY), |best, (i, &x)| if x > best.1 { (i, x) } else { best }).0
}

fn softmax(z: &[f64]) -> Vec<f64> {
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// `log(1 + exp(t))` without overflow.
fn softplus(t: f64) -> f64 {
    if t > 0.0 {
        t + (-t).exp().ln_1p()
    } else {
        t.exp().ln_1p()
    }
}

struct Problem<'a> {
    x: &'a [f32],
    dim: usize,
    y: &'a [usize],
    /// Score rows: 1 (binary) or the class count.
    k: usize,
    c: f64,
}

impl Problem<'_> {
    fn len(&self) -> usize {
        self.k * (self.dim + 1)
    }

    /// The objective and its gradient at `theta` (`[K', D]` weights then `[K']` intercepts).
    fn value_grad(&self, theta: &[f64], grad: &mut [f64]) -> f64 {
        let (d, k) = (self.dim, self.k);
        let (w, b) = theta.split_at(k * d);
        grad.fill(0.0);
        let mut loss = 0.0;
        let mut z = vec![0.0; k];
        let mut r = vec![0.0; k];
        for (i, row) in self.x.chunks_exact(d).enumerate() {
            for c in 0..k {
                z[c] = b[c] + w[c * d..(c + 1) * d].iter().zip(row).map(|(a, v)| a * f64::from(*v)).sum::<f64>();
            }
            let y = self.y[i];
            if k == 1 {
                let s = if y == 1 { 1.0 } else { -1.0 };
                loss += softplus(-s * z[0]);
                // d/dz log(1 + exp(−s z)) = −s σ(−s z).
                r[0] = -s / (1.0 + (s * z[0]).exp());
            } else {
                let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = z.iter().map(|v| (v - m).exp()).sum();
                loss += m + sum.ln() - z[y];
                for c in 0..k {
                    r[c] = (z[c] - m).exp() / sum - f64::from(u8::from(c == y));
                }
            }
            for c in 0..k {
                let rc = r[c] * self.c;
                for (g, v) in grad[c * d..(c + 1) * d].iter_mut().zip(row) {
                    *g += rc * f64::from(*v);
                }
                grad[k * d + c] += rc;
            }
        }
        let mut penalty = 0.0;
        for (g, wi) in grad[..k * d].iter_mut().zip(w) {
            *g += wi;
            penalty += wi * wi;
        }
        0.5 * penalty + self.c * loss
    }
}

/// Minimizes `p` from zero by L-BFGS (10 pairs) with a backtracking Armijo line search; stops when the
/// largest gradient component is at most `gtol`. Returns the point, iterations and convergence.
fn lbfgs(p: &Problem<'_>, gtol: f64, max_iter: usize) -> (Vec<f64>, usize, bool) {
    const M: usize = 10;
    let n = p.len();
    let mut x = vec![0.0; n];
    let mut g = vec![0.0; n];
    let mut f = p.value_grad(&x, &mut g);
    let (mut s_hist, mut y_hist, mut rho): (Vec<Vec<f64>>, Vec<Vec<f64>>, Vec<f64>) = (vec![], vec![], vec![]);
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(u, v)| u * v).sum::<f64>();
    let inf_norm = |a: &[f64]| a.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let (mut xn, mut gn) = (vec![0.0; n], vec![0.0; n]);
    for it in 0..max_iter {
        if inf_norm(&g) <= gtol {
            return (x, it, true);
        }
        // Two-loop recursion: d = −H g.
        let mut q = g.clone();
        let mut alpha = vec![0.0; s_hist.len()];
        for j in (0..s_hist.len()).rev() {
            alpha[j] = rho[j] * dot(&s_hist[j], &q);
            q.iter_mut().zip(&y_hist[j]).for_each(|(qi, yi)| *qi -= alpha[j] * yi);
        }
        let gamma = match (s_hist.last(), y_hist.last()) {
            (Some(s), Some(y)) => dot(s, y) / dot(y, y),
            _ => 1.0 / inf_norm(&g).max(1.0),
        };
        q.iter_mut().for_each(|v| *v *= gamma);
        for j in 0..s_hist.len() {
            let beta = rho[j] * dot(&y_hist[j], &q);
            q.iter_mut().zip(&s_hist[j]).for_each(|(qi, si)| *qi += (alpha[j] - beta) * si);
        }
        let mut d: Vec<f64> = q.into_iter().map(|v| -v).collect();
        let mut slope = dot(&g, &d);
        if slope >= 0.0 {
            // Not a descent direction (numerical trouble): restart from steepest descent.
            s_hist.clear();
            y_hist.clear();
            rho.clear();
            d = g.iter().map(|v| -v / inf_norm(&g).max(1.0)).collect();
            slope = dot(&g, &d);
        }
        let mut t = 1.0;
        let mut fn_ = f;
        let mut accepted = false;
        for _ in 0..60 {
            xn.iter_mut().zip(&x).zip(&d).for_each(|((a, xi), di)| *a = xi + t * di);
            fn_ = p.value_grad(&xn, &mut gn);
            if fn_ <= f + 1e-4 * t * slope {
                accepted = true;
                break;
            }
            t *= 0.5;
        }
        if !accepted {
            // No decrease along the direction at any step size: as good as floating point allows.
            return (x, it, inf_norm(&g) <= gtol);
        }
        let s: Vec<f64> = xn.iter().zip(&x).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = gn.iter().zip(&g).map(|(a, b)| a - b).collect();
        let sy = dot(&s, &y);
        if sy > 1e-12 * dot(&y, &y).sqrt() * dot(&s, &s).sqrt() {
            if s_hist.len() == M {
                s_hist.remove(0);
                y_hist.remove(0);
                rho.remove(0);
            }
            s_hist.push(s);
            y_hist.push(y);
            rho.push(1.0 / sy);
        }
        std::mem::swap(&mut x, &mut xn);
        std::mem::swap(&mut g, &mut gn);
        f = fn_;
    }
    let ok = inf_norm(&g) <= gtol;
    (x, max_iter, ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three separated Gaussian-ish clusters in 2-D (deterministic).
    fn blobs() -> (Vec<f32>, Vec<usize>) {
        let mut rng = geossl_models::rng::Rng::new(3);
        let centres = [[0.0, 0.0], [3.0, 0.5], [1.0, 3.0]];
        let (mut x, mut y) = (vec![], vec![]);
        for i in 0..150 {
            let c = i % 3;
            for centre in centres[c] {
                x.push((centre + rng.next_f64() * 2.0 - 1.0) as f32);
            }
            y.push(c);
        }
        (x, y)
    }

    fn grad_norm(m: &Logistic, x: &[f32], y: &[usize], c: f64) -> f64 {
        let k = m.intercepts.len();
        let p = Problem { x, dim: m.dim, y, k, c };
        let theta: Vec<f64> = m.weights.iter().chain(&m.intercepts).copied().collect();
        let mut g = vec![0.0; theta.len()];
        p.value_grad(&theta, &mut g);
        g.iter().fold(0.0f64, |a, v| a.max(v.abs())) / (c * y.len() as f64)
    }

    #[test]
    fn converges_to_a_stationary_point_and_separates_blobs() {
        let (x, y) = blobs();
        for c in [0.01, 1.0, 100.0] {
            let m = fit(&x, 2, &y, 3, FitOptions { c, tol: 1e-8, max_iter: 5000 }).unwrap();
            assert!(m.converged, "C={c}: {m:?}");
            assert!(grad_norm(&m, &x, &y, c) <= 1e-8, "C={c}");
            let acc = m.predict(&x).iter().zip(&y).filter(|(a, b)| a == b).count() as f64 / y.len() as f64;
            assert!(acc > 0.9 || c < 0.1, "C={c}: accuracy {acc}");
            let p = m.probabilities(&x);
            assert!(p.chunks(3).all(|r| (r.iter().sum::<f64>() - 1.0).abs() < 1e-12));
        }
    }

    #[test]
    fn the_gradient_is_the_objectives() {
        let (x, y) = blobs();
        for k in [1usize, 3] {
            let yk: Vec<usize> = if k == 1 { y.iter().map(|&c| usize::from(c == 2)).collect() } else { y.clone() };
            let p = Problem { x: &x, dim: 2, y: &yk, k, c: 0.7 };
            let theta: Vec<f64> = (0..p.len()).map(|i| 0.1 * i as f64 - 0.3).collect();
            let mut g = vec![0.0; theta.len()];
            p.value_grad(&theta, &mut g);
            for i in 0..theta.len() {
                let h = 1e-6;
                let (mut a, mut b) = (theta.clone(), theta.clone());
                a[i] += h;
                b[i] -= h;
                let mut scratch = vec![0.0; theta.len()];
                let fd = (p.value_grad(&a, &mut scratch) - p.value_grad(&b, &mut scratch)) / (2.0 * h);
                assert!((fd - g[i]).abs() <= 1e-5 * (1.0 + g[i].abs()), "k={k} i={i}: {fd} vs {}", g[i]);
            }
        }
    }

    #[test]
    fn binary_scores_class_one_and_refuses_bad_input() {
        let (x, y) = blobs();
        let yb: Vec<usize> = y.iter().map(|&c| usize::from(c == 1)).collect();
        let m = fit(&x, 2, &yb, 2, FitOptions::default()).unwrap();
        assert_eq!((m.weights.len(), m.intercepts.len()), (2, 1));
        // Class 1 is the blob at x ≈ 3: the first weight is positive.
        assert!(m.weights[0] > 0.0, "{m:?}");
        assert!(fit(&x, 2, &y, 2, FitOptions::default()).unwrap_err().to_string().contains("label 2"));
        assert!(fit(&x[..5], 2, &y, 3, FitOptions::default()).unwrap_err().to_string().contains("width 2"));
        assert!(fit(&x, 2, &y, 3, FitOptions { c: 0.0, ..Default::default() }).is_err());
        let mut nan = x.clone();
        nan[7] = f32::NAN;
        assert!(fit(&nan, 2, &y, 3, FitOptions::default()).unwrap_err().to_string().contains("example 3"));
    }
}
