//! The windows of one size over a raster, as `geossl-train chips` cuts them and `geossl-serve embed`
//! embeds them: top-left corners every `stride` pixels (a window never crosses the edge), in row-major or
//! Hilbert order, and the share of a window's pixels that are nodata.

use crate::{Block, RasterError};

/// Windows of `w × h` pixels every `stride` pixels over a `width × height` raster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowGrid {
    pub width: usize,
    pub height: usize,
    pub w: usize,
    pub h: usize,
    pub stride: usize,
}

impl WindowGrid {
    /// A grid; the window sides and the stride must be at least 1 (a raster smaller than one window has
    /// no windows, which is not an error).
    pub fn new(width: usize, height: usize, w: usize, h: usize, stride: usize) -> Result<Self, RasterError> {
        if w == 0 || h == 0 || stride == 0 {
            return Err(RasterError::Grid(format!(
                "windows of {w}×{h} every {stride} px: sides and stride must be ≥ 1"
            )));
        }
        Ok(WindowGrid { width, height, w, h, stride })
    }

    fn xs(&self) -> Vec<usize> {
        if self.width >= self.w {
            (0..=self.width - self.w).step_by(self.stride).collect()
        } else {
            Vec::new()
        }
    }

    fn ys(&self) -> Vec<usize> {
        if self.height >= self.h {
            (0..=self.height - self.h).step_by(self.stride).collect()
        } else {
            Vec::new()
        }
    }

    /// Top-left corners `(x, y)`, row by row.
    pub fn row_major(&self) -> Vec<(usize, usize)> {
        let xs = self.xs();
        self.ys().into_iter().flat_map(|y| xs.iter().map(move |&x| (x, y))).collect()
    }

    /// Top-left corners along the Hilbert curve over the window grid: consecutive windows are neighbours,
    /// so the strips/tiles they read, and the rows they make, stay close.
    pub fn hilbert(&self) -> Vec<(usize, usize)> {
        let (xs, ys) = (self.xs(), self.ys());
        let order = (xs.len().max(ys.len()).max(1) as u64).next_power_of_two().trailing_zeros();
        let mut cells: Vec<(u64, usize, usize)> = Vec::with_capacity(xs.len() * ys.len());
        for (iy, &y) in ys.iter().enumerate() {
            for (ix, &x) in xs.iter().enumerate() {
                cells.push((hilbert_index(order, ix as u64, iy as u64), x, y));
            }
        }
        cells.sort_unstable();
        cells.into_iter().map(|(_, x, y)| (x, y)).collect()
    }
}

/// Index of cell `(x, y)` along the Hilbert curve over a `2^order` square grid: cells close on the curve
/// are close in space.
pub fn hilbert_index(order: u32, mut x: u64, mut y: u64) -> u64 {
    let n = 1u64 << order;
    let mut d = 0;
    let mut s = n / 2;
    while s > 0 {
        let rx = u64::from(x & s > 0);
        let ry = u64::from(y & s > 0);
        d += s * s * ((3 * rx) ^ ry);
        // Rotate the quadrant so that the curve's pieces join.
        if ry == 0 {
            if rx == 1 {
                x = n - 1 - x;
                y = n - 1 - y;
            }
            std::mem::swap(&mut x, &mut y);
        }
        s /= 2;
    }
    d
}

/// The share of a window's pixels that are nodata: every band equal to `nodata` (the file's GDAL nodata
/// value; 0 when it declares none, the fill of most archives).
pub fn nodata_fraction(block: &Block, nodata: Option<f64>) -> f64 {
    let px = block.width * block.height;
    if px == 0 {
        return 0.0;
    }
    block.samples.count_all_equal(block.bands, nodata.unwrap_or(0.0)) as f64 / px as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Samples;

    #[test]
    fn hilbert_order_visits_every_cell_once_through_neighbours() {
        assert_eq!([(0, 0), (0, 1), (1, 1), (1, 0)].map(|(x, y)| hilbert_index(1, x, y)), [0, 1, 2, 3]);
        let mut cells: Vec<(u64, u64, u64)> =
            (0..8).flat_map(|x| (0..8).map(move |y| (hilbert_index(3, x, y), x, y))).collect();
        cells.sort();
        assert!(cells.iter().enumerate().all(|(i, c)| c.0 == i as u64), "a bijection onto 0..64");
        for p in cells.windows(2) {
            assert_eq!(p[0].1.abs_diff(p[1].1) + p[0].2.abs_diff(p[1].2), 1, "{p:?} are not neighbours");
        }
    }

    #[test]
    fn grids_cover_the_raster_without_crossing_its_edge() {
        let g = WindowGrid::new(5 * 64 + 10, 3 * 64, 64, 64, 64).unwrap();
        let rm = g.row_major();
        assert_eq!(rm.len(), 15);
        assert_eq!(rm[..6], [(0, 0), (64, 0), (128, 0), (192, 0), (256, 0), (0, 64)]);
        let mut h = g.hilbert();
        assert_eq!(h[..4], [(0, 0), (0, 64), (64, 64), (64, 0)], "the curve's first block");
        h.sort_by_key(|&(x, y)| (y, x));
        assert_eq!(h, rm, "the same windows");
        assert_eq!(WindowGrid::new(10, 10, 64, 64, 32).unwrap().row_major(), []);
        assert!(WindowGrid::new(10, 10, 4, 4, 0).is_err());
        // Overlapping windows: stride below the side.
        assert_eq!(WindowGrid::new(8, 4, 4, 4, 2).unwrap().row_major(), [(0, 0), (2, 0), (4, 0)]);
    }

    #[test]
    fn nodata_is_every_band_at_the_value() {
        // 2 bands of 4 pixels: pixel 0 all zero, pixel 3 all 7.
        let b = Block { bands: 2, height: 2, width: 2, samples: Samples::U16(vec![0, 5, 0, 7, 0, 0, 9, 7]) };
        assert_eq!(nodata_fraction(&b, None), 0.25);
        assert_eq!(nodata_fraction(&b, Some(7.0)), 0.25);
        assert_eq!(nodata_fraction(&b, Some(1.0)), 0.0);
    }
}
