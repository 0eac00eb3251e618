//! Classification scores with bootstrap confidence intervals.

use geossl_models::rng::Rng;
use serde::Serialize;

/// Share of predictions equal to the truth.
pub fn accuracy(truth: &[usize], pred: &[usize]) -> f64 {
    if truth.is_empty() {
        return f64::NAN;
    }
    truth.iter().zip(pred).filter(|(a, b)| a == b).count() as f64 / truth.len() as f64
}

/// Unweighted mean over classes of F1 (scikit-learn's `f1_score(average="macro")`): the classes are those
/// present in the truth or the predictions; a class never predicted or never true scores 0.
pub fn macro_f1(truth: &[usize], pred: &[usize], classes: usize) -> f64 {
    let (mut tp, mut fp, mut fneg) = (vec![0usize; classes], vec![0usize; classes], vec![0usize; classes]);
    for (&t, &p) in truth.iter().zip(pred) {
        if t == p {
            tp[t] += 1;
        } else {
            fp[p] += 1;
            fneg[t] += 1;
        }
    }
    let present: Vec<usize> = (0..classes).filter(|&c| tp[c] + fp[c] + fneg[c] > 0).collect();
    if present.is_empty() {
        return f64::NAN;
    }
    present.iter().map(|&c| 2.0 * tp[c] as f64 / (2 * tp[c] + fp[c] + fneg[c]) as f64).sum::<f64>()
        / present.len() as f64
}

/// A score and its bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Interval {
    /// On the whole test set.
    pub value: f64,
    /// 2.5th and 97.5th percentiles over the resamples (a 95 % percentile interval).
    pub low: f64,
    pub high: f64,
}

/// Resamples drawn for an interval.
pub const RESAMPLES: usize = 1000;

/// `score(truth, pred)` on the test set and its 95 % percentile-bootstrap interval over `resamples` draws
/// of the test examples with replacement (seeded: the same inputs give the same interval).
pub fn bootstrap(
    truth: &[usize],
    pred: &[usize],
    resamples: usize,
    seed: u64,
    score: impl Fn(&[usize], &[usize]) -> f64,
) -> Interval {
    let value = score(truth, pred);
    let n = truth.len();
    if n == 0 || resamples == 0 {
        return Interval { value, low: f64::NAN, high: f64::NAN };
    }
    let mut rng = Rng::new(seed);
    let (mut t, mut p) = (vec![0; n], vec![0; n]);
    let mut scores: Vec<f64> = (0..resamples)
        .map(|_| {
            for i in 0..n {
                let j = rng.below(n);
                (t[i], p[i]) = (truth[j], pred[j]);
            }
            score(&t, &p)
        })
        .collect();
    scores.sort_by(f64::total_cmp);
    Interval { value, low: percentile(&scores, 2.5), high: percentile(&scores, 97.5) }
}

/// Linear-interpolated percentile of sorted values (numpy's default).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    let pos = q / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macro_f1_as_scikit_learn_defines_it() {
        // sklearn.metrics.f1_score([0,0,1,1,2], [0,1,1,1,0], average="macro") = (0.5 + 0.8 + 0) / 3.
        let f = macro_f1(&[0, 0, 1, 1, 2], &[0, 1, 1, 1, 0], 4);
        assert!((f - 1.3 / 3.0).abs() < 1e-12, "{f}");
        assert_eq!(accuracy(&[0, 0, 1, 1, 2], &[0, 1, 1, 1, 0]), 0.6);
    }

    #[test]
    fn a_constant_classifiers_interval_is_the_class_frequencys() {
        // Predicting class 0 for all: accuracy on a resample is its share of class 0, binomial(n, p) / n;
        // its 95 % interval is p ± 1.96 √(p(1 − p)/n) (normal approximation, good at n p (1 − p) ≫ 1).
        let n = 2000;
        let p = 0.3;
        let truth: Vec<usize> = (0..n).map(|i| usize::from(i as f64 >= p * n as f64)).collect();
        let pred = vec![0; n];
        let iv = bootstrap(&truth, &pred, 4000, 1, accuracy);
        let half = 1.96 * (p * (1.0 - p) / n as f64).sqrt();
        assert!((iv.value - p).abs() < 1e-12, "{iv:?}");
        // The percentiles of 4,000 resamples estimate the quantiles to about ±0.1 of a half-width.
        assert!((iv.low - (p - half)).abs() < 0.15 * half, "{iv:?} vs {}", p - half);
        assert!((iv.high - (p + half)).abs() < 0.15 * half, "{iv:?} vs {}", p + half);
        assert_eq!(bootstrap(&truth, &pred, 4000, 1, accuracy), iv, "seeded");
    }

    #[test]
    fn percentile_interpolates() {
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), 2.5);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 100.0), 4.0);
    }
}
