//! Train / validation / test splits by spatial blocks.
//!
//! Neighbouring windows of a scene share pixels and land cover, so a random split of chips puts near-copies
//! on both sides and inflates every score. Here chips are grouped by the square block their centre falls in
//! (a grid from the lower-left corner of all footprints, so a small area is not cut into slivers);
//! whole blocks go to one side; and a train or validation chip whose footprint comes within `buffer` of a
//! test chip's is dropped, so no training pixel is closer than that to a test pixel.
//!
//! Footprints are boxes `[x0, y0, x1, y1]` in any one planar unit (pixels of one scene, or metres).

use geossl_models::rng::Rng;
use serde::Serialize;

/// How to split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SplitOptions {
    /// Block side, in the footprints' unit.
    pub block: f64,
    /// Shares of the blocks for validation and test (the rest trains).
    pub val: f64,
    pub test: f64,
    /// Train and validation chips closer than this to a test chip are dropped (the footprints' gap, the
    /// larger of the horizontal and vertical one).
    pub buffer: f64,
    pub seed: u64,
}

/// Indices of the chips on each side.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Split {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
    pub test: Vec<usize>,
    /// Chips left out because they lie within the buffer of a test chip.
    pub dropped: usize,
    pub blocks: usize,
}

/// The gap between two boxes: 0 when they touch or overlap, else the larger of the horizontal and
/// vertical distances between their edges.
pub fn gap(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    let dx = (b[0] - a[2]).max(a[0] - b[2]).max(0.0);
    let dy = (b[1] - a[3]).max(a[1] - b[3]).max(0.0);
    dx.max(dy)
}

/// Splits the chips of `footprints` by blocks (see the module). Blocks are dealt in a seeded random order:
/// the first `test` share to test, the next `val` share to validation (each at least one block when the
/// share is positive and there are blocks to spare), the rest to training.
pub fn spatial_split(footprints: &[[f64; 4]], o: &SplitOptions) -> Split {
    let x0 = footprints.iter().map(|f| f[0]).fold(f64::INFINITY, f64::min);
    let y0 = footprints.iter().map(|f| f[1]).fold(f64::INFINITY, f64::min);
    let key = |f: &[f64; 4]| {
        (((f[0] + f[2]) / 2.0 - x0).div_euclid(o.block) as i64, ((f[1] + f[3]) / 2.0 - y0).div_euclid(o.block) as i64)
    };
    let mut blocks: Vec<(i64, i64)> = footprints.iter().map(key).collect();
    blocks.sort_unstable();
    blocks.dedup();
    Rng::new(o.seed).shuffle(&mut blocks);
    let nb = blocks.len();
    let count = |share: f64, left: usize| {
        let n = (share * nb as f64).round() as usize;
        (if share > 0.0 { n.max(1) } else { 0 }).min(left.saturating_sub(1))
    };
    let n_test = count(o.test, nb);
    let n_val = count(o.val, nb - n_test);
    let side: std::collections::HashMap<(i64, i64), u8> = blocks
        .iter()
        .enumerate()
        .map(|(i, b)| {
            (
                *b,
                if i < n_test {
                    2
                } else if i < n_test + n_val {
                    1
                } else {
                    0
                },
            )
        })
        .collect();
    let (mut train, mut val, mut test) = (vec![], vec![], vec![]);
    for (i, f) in footprints.iter().enumerate() {
        match side[&key(f)] {
            2 => test.push(i),
            1 => val.push(i),
            _ => train.push(i),
        }
    }
    let near_test = |i: &usize| test.iter().any(|&t| gap(&footprints[*i], &footprints[t]) < o.buffer);
    let before = train.len() + val.len();
    train.retain(|i| !near_test(i));
    val.retain(|i| !near_test(i));
    let dropped = before - train.len() - val.len();
    Split { train, val, test, dropped, blocks: nb }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_training_chip_within_the_buffer_of_a_test_chip() {
        // A 40 × 40 grid of 16-px windows at stride 8 (overlapping neighbours).
        let fp: Vec<[f64; 4]> = (0..40 * 40)
            .map(|i| {
                let (x, y) = ((i % 40) as f64 * 8.0, (i / 40) as f64 * 8.0);
                [x, y, x + 16.0, y + 16.0]
            })
            .collect();
        let o = SplitOptions { block: 64.0, val: 0.15, test: 0.25, buffer: 16.0, seed: 7 };
        let s = spatial_split(&fp, &o);
        // Centres at 8 + 8i, i < 40: 8 … 320 → blocks 0 … 5 on each axis.
        assert_eq!(s.blocks, 36);
        assert!(!s.train.is_empty() && !s.val.is_empty() && !s.test.is_empty(), "{s:?}");
        assert_eq!(s.train.len() + s.val.len() + s.test.len() + s.dropped, fp.len());
        for &a in s.train.iter().chain(&s.val) {
            for &t in &s.test {
                assert!(gap(&fp[a], &fp[t]) >= 16.0, "chip {a} is within a window of test chip {t}");
            }
        }
        assert_eq!(spatial_split(&fp, &o), s, "seeded");
        assert_ne!(spatial_split(&fp, &SplitOptions { seed: 8, ..o }).test, s.test);
    }

    #[test]
    fn gaps_between_boxes() {
        let a = [0.0, 0.0, 10.0, 10.0];
        assert_eq!(gap(&a, &[5.0, 5.0, 15.0, 15.0]), 0.0);
        assert_eq!(gap(&a, &[13.0, 0.0, 20.0, 10.0]), 3.0);
        assert_eq!(gap(&a, &[13.0, 20.0, 20.0, 30.0]), 10.0);
        assert_eq!(gap(&[13.0, 20.0, 20.0, 30.0], &a), 10.0);
    }
}
