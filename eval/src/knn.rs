//! Weighted k-nearest-neighbour classification of frozen features, as in the self-supervised literature
//! (Wu et al. 2018; DINO, Caron et al. 2021): cosine similarity between L2-normalized features, the `k`
//! most similar training examples vote for their class with weight `exp(similarity / T)`.

/// kNN options (the usual `k = 20`, `T = 0.07`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KnnOptions {
    pub k: usize,
    pub temperature: f64,
}

impl Default for KnnOptions {
    fn default() -> Self {
        Self { k: 20, temperature: 0.07 }
    }
}

/// Rows of `x [N, D]` scaled to unit length (a zero row stays zero).
pub fn l2_normalized(x: &[f32], dim: usize) -> Vec<f32> {
    x.chunks_exact(dim)
        .flat_map(|r| {
            let n = r.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>().sqrt();
            let s = if n > 0.0 { 1.0 / n } else { 0.0 };
            r.iter().map(move |v| (f64::from(*v) * s) as f32)
        })
        .collect()
}

/// Class scores `[M, classes]` of each query row of `test [M, D]` from the labelled `train [N, D]`
/// (`labels` in `0..classes`); features are normalized here. Ties in similarity keep the earlier
/// training row.
pub fn knn_scores(
    train: &[f32],
    labels: &[usize],
    test: &[f32],
    dim: usize,
    classes: usize,
    o: KnnOptions,
) -> Vec<f64> {
    let (tr, te) = (l2_normalized(train, dim), l2_normalized(test, dim));
    let k = o.k.min(labels.len());
    let mut out = Vec::with_capacity(te.len() / dim * classes);
    let mut sims: Vec<(f64, usize)> = Vec::with_capacity(labels.len());
    for q in te.chunks_exact(dim) {
        sims.clear();
        for (j, r) in tr.chunks_exact(dim).enumerate() {
            sims.push((q.iter().zip(r).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>(), j));
        }
        let by_sim = |a: &(f64, usize), b: &(f64, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if k < sims.len() {
            sims.select_nth_unstable_by(k, by_sim);
        }
        let mut scores = vec![0.0; classes];
        for &(s, j) in &sims[..k] {
            scores[labels[j]] += (s / o.temperature).exp();
        }
        out.extend(scores);
    }
    out
}

/// The kNN prediction of each query row.
pub fn knn_predict(
    train: &[f32],
    labels: &[usize],
    test: &[f32],
    dim: usize,
    classes: usize,
    o: KnnOptions,
) -> Vec<usize> {
    knn_scores(train, labels, test, dim, classes, o).chunks_exact(classes).map(crate::logistic::argmax).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn votes_of_the_nearest_weighted_by_similarity() {
        // Train: two rows of class 0 along e0, one of class 1 along e1, one of class 1 along −e0.
        let train = [1.0, 0.0, 2.0, 0.1, 0.0, 1.0, -1.0, 0.0];
        let labels = [0, 0, 1, 1];
        let test = [1.0, 0.2, 0.1, 1.0];
        let o = KnnOptions { k: 2, temperature: 0.5 };
        let s = knn_scores(&train, &labels, &test, 2, 2, o);
        // Query 0 ≈ e0: its two nearest are the class-0 rows.
        let cos = |a: [f64; 2], b: [f64; 2]| (a[0] * b[0] + a[1] * b[1]) / (a[0].hypot(a[1]) * b[0].hypot(b[1]));
        let want = (cos([1.0, 0.2], [1.0, 0.0]) / 0.5).exp() + (cos([1.0, 0.2], [2.0, 0.1]) / 0.5).exp();
        assert!((s[0] - want).abs() < 1e-6 * want && s[1] == 0.0, "{s:?}");
        // Query 1 ≈ e1: the class-1 row along e1 and the nearer class-0 row.
        assert!(s[3] > s[2] && s[2] > 0.0, "{s:?}");
        assert_eq!(knn_predict(&train, &labels, &test, 2, 2, o), [0, 1]);
        // k larger than the training set: all rows vote.
        let all = knn_scores(&train, &labels, &test, 2, 2, KnnOptions { k: 50, temperature: 1.0 });
        assert!(all.iter().all(|v| *v > 0.0));
    }
}
