//! Frozen-feature evaluation without libtorch: what the trainer's `eval` and the search service's quick
//! classifier share. One logistic regression (scikit-learn's objective, L-BFGS), the weighted kNN of the
//! self-supervised literature, top-1 and macro-F1 with bootstrap intervals, and train/validation/test
//! splits by spatial blocks.
//!
//! Features are row-major `[N, D]` `f32` slices; labels are class indices.

pub mod knn;
pub mod logistic;
pub mod metrics;
pub mod split;

pub use knn::{knn_predict, knn_scores, KnnOptions};
pub use logistic::{fit, FitError, FitOptions, Logistic};
pub use metrics::{accuracy, bootstrap, macro_f1, Interval};
pub use split::{spatial_split, Split, SplitOptions};
