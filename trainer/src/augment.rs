//! Augmentations of the paper (MoCo-v2 recipe), split where each pays:
//!
//! * geometric ops, per image on the loader threads (CPU): RandomResizedCrop,
//!   and for the temporal path Resize(448) → CenterCrop(448) → RandomResizedCrop;
//!   they apply to every band;
//! * photometric ops, batched on the training device: ColorJitter(0.4, 0.4,
//!   0.4, 0.1) with p = 0.8, RandomGrayscale p = 0.2, GaussianBlur σ ∈ [0.1, 2]
//!   p = 0.5 (on the RGB bands only), HorizontalFlip p = 0.5 (all bands), then
//!   normalization.
//!
//! Images are `[C, H, W]` float in the data's stored units; `scale` of the
//! model's normalization maps them to [0, 1] for the photometric ops.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::rng::Rng;

/// Augmentation settings (the paper's by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugConfig {
    /// RandomResizedCrop area range.
    pub crop_scale: [f64; 2],
    /// RandomResizedCrop aspect-ratio range.
    pub crop_ratio: [f64; 2],
    /// Temporal path: resize/center-crop side before the random crop (448 in the paper, scaled to the input size).
    pub tp_resize: Option<usize>,
    pub jitter_p: f64,
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
    pub hue: f64,
    pub grayscale_p: f64,
    pub blur_p: f64,
    pub blur_sigma: [f64; 2],
    pub flip_p: f64,
    /// Where the geometric views are cut: `loader` (per image, on the loader threads), `device` (a whole
    /// batch at once on the training device, from raw chips: needs a chip pack), `auto` (device for a
    /// pack, loader otherwise).
    pub geometric: Geometric,
}

/// Where the geometric views (RandomResizedCrop and the temporal path's resize/crop) are cut.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Geometric {
    #[default]
    Auto,
    Loader,
    Device,
}

impl Default for AugConfig {
    fn default() -> Self {
        Self {
            crop_scale: [0.2, 1.0],
            crop_ratio: [3.0 / 4.0, 4.0 / 3.0],
            tp_resize: None,
            jitter_p: 0.8,
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.4,
            hue: 0.1,
            grayscale_p: 0.2,
            blur_p: 0.5,
            blur_sigma: [0.1, 2.0],
            flip_p: 0.5,
            geometric: Geometric::Auto,
        }
    }
}

/// A crop window in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crop {
    pub top: i64,
    pub left: i64,
    pub h: i64,
    pub w: i64,
}

/// torchvision's `RandomResizedCrop.get_params`: ten tries at a random area
/// and log-uniform aspect ratio, then a clamped center crop.
pub fn rrc_params(h: i64, w: i64, scale: [f64; 2], ratio: [f64; 2], rng: &mut Rng) -> Crop {
    let area = (h * w) as f64;
    let (lr0, lr1) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target = area * (scale[0] + rng.next_f64() * (scale[1] - scale[0]));
        let ar = (lr0 + rng.next_f64() * (lr1 - lr0)).exp();
        let cw = (target * ar).sqrt().round() as i64;
        let ch = (target / ar).sqrt().round() as i64;
        if 0 < cw && cw <= w && 0 < ch && ch <= h {
            let top = rng.below((h - ch + 1) as usize) as i64;
            let left = rng.below((w - cw + 1) as usize) as i64;
            return Crop { top, left, h: ch, w: cw };
        }
    }
    let in_ratio = w as f64 / h as f64;
    let (cw, ch) = if in_ratio < ratio[0] {
        (w, ((w as f64 / ratio[0]).round() as i64).min(h))
    } else if in_ratio > ratio[1] {
        (((h as f64 * ratio[1]).round() as i64).min(w), h)
    } else {
        (w, h)
    };
    Crop { top: (h - ch) / 2, left: (w - cw) / 2, h: ch, w: cw }
}

/// Crops `img [C, H, W]` and resizes to `[C, out, out]` (bilinear, antialiased).
pub fn crop_resize(img: &Tensor, c: Crop, out: i64) -> Tensor {
    let dst = Tensor::empty([1, img.size()[0], out, out], (img.kind(), img.device()));
    crop_resize_into(img, c, &dst);
    dst.squeeze_dim(0)
}

/// [`crop_resize`] writing into `dst` `[1, C, S, S]` (e.g. a row of a batch:
/// no intermediate view to allocate and copy).
pub fn crop_resize_into(img: &Tensor, c: Crop, dst: &Tensor) {
    let x = img.narrow(1, c.top, c.h).narrow(2, c.left, c.w).unsqueeze(0);
    let s = [dst.size()[2], dst.size()[3]];
    // Antialiasing only changes a downsampling: where both sides grow, its
    // kernel is plain bilinear (same values to float rounding), ~4× cheaper.
    // (The `_out` ops return `dst` itself.)
    let _ = if c.h <= s[0] && c.w <= s[1] {
        x.upsample_bilinear2d_out(dst, s, false, None, None)
    } else {
        x.internal_upsample_bilinear2d_aa_out(dst, s, false, None, None)
    };
}

/// The crop of one random view of an `h × w` image.
///
/// Baseline: RandomResizedCrop. Temporal path (`cfg.tp_resize` set):
/// Resize(shorter side → R) → CenterCrop(R) → RandomResizedCrop; the resize
/// and the final crop are fused into one resampling of the original.
pub fn view_crop(h: i64, w: i64, cfg: &AugConfig, rng: &mut Rng) -> Crop {
    match cfg.tp_resize {
        None => rrc_params(h, w, cfg.crop_scale, cfg.crop_ratio, rng),
        Some(_) => {
            // Center square of the original, then a random crop inside it.
            let side = h.min(w);
            let (top0, left0) = ((h - side) / 2, (w - side) / 2);
            let c = rrc_params(side, side, cfg.crop_scale, cfg.crop_ratio, rng);
            Crop { top: top0 + c.top, left: left0 + c.left, h: c.h, w: c.w }
        }
    }
}

/// One random view `[C, out, out]` of `img [C, H, W]` (see [`view_crop`]).
pub fn random_view(img: &Tensor, out: i64, cfg: &AugConfig, rng: &mut Rng) -> Tensor {
    let s = img.size();
    crop_resize(img, view_crop(s[1], s[2], cfg, rng), out)
}

/// [`random_view`] written into `dst` `[1, C, S, S]`.
pub fn random_view_into(img: &Tensor, dst: &Tensor, cfg: &AugConfig, rng: &mut Rng) {
    let s = img.size();
    crop_resize_into(img, view_crop(s[1], s[2], cfg, rng), dst);
}

/// The views of a whole batch at once: row `i` of `chips [B, C, H, W]` (any sample type) cut at
/// `boxes[i]` and resized to `[C, out, out]`, on the chips' device. Returns `[B, C, out, out]` in the
/// chips' units: uint8 for uint8 chips on the CPU, float otherwise.
///
/// On a GPU: one batched bilinear resampling ([`crop_resize_grid`]). On the CPU: libtorch's vectorized
/// kernel per row ([`crop_resize_rows`]), the per-image path's own, which costs a sixth to a twelfth of a
/// batched `grid_sampler_2d` there (`docs/benchmarks/loader.md`).
pub fn crop_resize_batch(chips: &Tensor, boxes: &[Crop], out: i64) -> Tensor {
    match chips.device() {
        Device::Cpu => crop_resize_rows(chips, boxes, out),
        _ => crop_resize_grid(chips, boxes, out),
    }
}

/// [`crop_resize_batch`] row by row with [`crop_resize_into`]: exactly the views the loader threads cut
/// (uint8 chips stay uint8 and are fastest as a channels-last view, which a pack's batch is).
pub fn crop_resize_rows(chips: &Tensor, boxes: &[Crop], out: i64) -> Tensor {
    let (shape, kind) = rows_array(chips, out);
    let dst = Tensor::empty(shape, (kind, chips.device())).permute([0, 3, 1, 2]);
    crop_resize_rows_into(chips, boxes, &dst);
    dst
}

/// The array [`crop_resize_rows_into`] writes the views of `chips` into: `[B, out, out, C]` (its
/// `[B, C, out, out]` view is channels-last, like the chips: libtorch's uint8 kernel writes such rows in
/// place, where a `[C, S, S]` row would take a temporary and a copy per view), uint8 for uint8 chips, else
/// float.
pub fn rows_array(chips: &Tensor, out: i64) -> ([i64; 4], Kind) {
    let s = chips.size();
    let kind = if chips.kind() == Kind::Uint8 { Kind::Uint8 } else { Kind::Float };
    ([s[0], out, out, s[1]], kind)
}

/// [`crop_resize_rows`] into `dst [B, C, S, S]`: uint8 for uint8 chips, else float (chips of other kinds
/// are widened to float first).
pub fn crop_resize_rows_into(chips: &Tensor, boxes: &[Crop], dst: &Tensor) {
    assert_eq!(boxes.len() as i64, chips.size()[0], "one crop per chip");
    let x = match chips.kind() {
        Kind::Uint8 | Kind::Float => chips.shallow_clone(),
        _ => chips.to_kind(Kind::Float),
    };
    // One view is too small to share between threads: libtorch's threads would mostly wait (spinning,
    // which costs CPU time the step could use), so the rows run on this thread alone.
    let threads = tch::get_num_threads();
    tch::set_num_threads(1);
    for (r, b) in boxes.iter().enumerate() {
        crop_resize_into(&x.get(r as i64), *b, &dst.narrow(0, r as i64, 1));
    }
    tch::set_num_threads(threads);
}

/// [`crop_resize_batch`] as one batched bilinear resampling (`grid_sampler_2d`), returning float.
///
/// Each output pixel samples the source at the position [`crop_resize`] uses (`top + (y + ½)·h/out − ½`,
/// clamped to the crop, likewise for x), so where the crop grows to the output the two agree to float
/// rounding. Where it shrinks, [`crop_resize`] widens its triangle kernel (antialiasing) and this does
/// not: their difference is bounded by the two kernels' weights (see the tests), and is zero on flat
/// areas.
pub fn crop_resize_grid(chips: &Tensor, boxes: &[Crop], out: i64) -> Tensor {
    let dev = chips.device();
    let s = chips.size();
    let (b, h, w) = (s[0], s[2], s[3]);
    assert_eq!(boxes.len() as i64, b, "one crop per chip");
    let col = |f: fn(&Crop) -> i64| {
        let v: Vec<f32> = boxes.iter().map(|c| f(c) as f32).collect();
        Tensor::from_slice(&v).to_device(dev).reshape([b, 1])
    };
    let d = (Tensor::arange(out, (Kind::Float, dev)) + 0.5).reshape([1, out]);
    // Source positions [B, out] in pixels of the whole chip, then normalized for align_corners = true.
    let pos = |start: Tensor, len: Tensor, full: i64| {
        let p = (&d * (&len / out as f64) - 0.5).clamp_min(0.0).minimum(&(len - 1.0)) + start;
        p * (2.0 / (full - 1).max(1) as f64) - 1.0
    };
    let gy = pos(col(|c| c.top), col(|c| c.h), h);
    let gx = pos(col(|c| c.left), col(|c| c.w), w);
    let grid =
        Tensor::stack(&[gx.unsqueeze(1).expand([b, out, out], false), gy.unsqueeze(2).expand([b, out, out], false)], 3);
    let x = if chips.kind() == Kind::Float { chips.shallow_clone() } else { chips.to_kind(Kind::Float) };
    // Bilinear (0), border padding (1; never reached: positions are inside the crop), align_corners.
    x.grid_sampler_2d(&grid, 0, 1, true)
}

/// Per-sample uniform in `[lo, hi]`, shaped `[B, 1, 1, 1]`.
fn uniform(b: i64, lo: f64, hi: f64, dev: Device) -> Tensor {
    Tensor::rand([b, 1, 1, 1], (Kind::Float, dev)) * (hi - lo) + lo
}

/// Per-sample Bernoulli(p) mask `[B, 1, 1, 1]` as float.
fn coin(b: i64, p: f64, dev: Device) -> Tensor {
    Tensor::rand([b, 1, 1, 1], (Kind::Float, dev)).lt(p).to_kind(Kind::Float)
}

fn gray(rgb: &Tensor) -> Tensor {
    // ITU-R 601-2 luma, as torchvision.
    let w = Tensor::from_slice(&[0.299f32, 0.587, 0.114]).to_device(rgb.device()).reshape([1, 3, 1, 1]);
    (rgb * w).sum_dim_intlist([1i64].as_slice(), true, Kind::Float)
}

/// Blend `a` and `b` per sample: `mask * a + (1 - mask) * b`.
fn pick(mask: &Tensor, a: &Tensor, b: &Tensor) -> Tensor {
    mask * a + (1.0 - mask) * b
}

/// Hue shift by a fraction of a full turn (per sample, `[B,1,1,1]`), as a
/// rotation of the chroma plane in YIQ space.
fn hue_shift(rgb: &Tensor, turns: &Tensor) -> Tensor {
    let dev = rgb.device();
    let to_yiq = Tensor::from_slice(&[0.299f32, 0.587, 0.114, 0.596, -0.274, -0.322, 0.211, -0.523, 0.312])
        .to_device(dev)
        .reshape([3, 3]);
    let from_yiq = to_yiq.inverse();
    let yiq = Tensor::einsum("ij,bjhw->bihw", &[&to_yiq, rgb], None::<i64>);
    let theta = turns * (2.0 * std::f64::consts::PI);
    let (c, s) = (theta.cos(), theta.sin());
    let y = yiq.narrow(1, 0, 1);
    let i = yiq.narrow(1, 1, 1);
    let q = yiq.narrow(1, 2, 1);
    let i2 = &i * &c - &q * &s;
    let q2 = &i * &s + &q * &c;
    let rot = Tensor::cat(&[y, i2, q2], 1);
    Tensor::einsum("ij,bjhw->bihw", &[&from_yiq, &rot], None::<i64>)
}

/// Gaussian blur with a per-sample σ `[B]`, as separable depthwise convolutions.
fn blur(x: &Tensor, sigma: &Tensor, max_sigma: f64) -> Tensor {
    let s = x.size();
    let (b, c) = (s[0], s[1]);
    let r = (3.0 * max_sigma).ceil() as i64;
    let k = 2 * r + 1;
    let pos = Tensor::arange_start(-r, r + 1, (Kind::Float, x.device())).reshape([1, k]);
    let sig = sigma.reshape([b, 1]);
    let two_var: Tensor = &sig * &sig * 2.0;
    let g = (-(&pos * &pos) / two_var).exp();
    let g = &g / g.sum_dim_intlist([1i64].as_slice(), true, Kind::Float); // [B, k]
    let g = g.unsqueeze(1).expand([b, c, k], false).reshape([b * c, 1, 1, k]);
    let y = x.reshape([1, b * c, s[2], s[3]]).reflection_pad2d([r, r, 0, 0]);
    let y = y.conv2d(&g, None::<Tensor>, [1, 1], [0, 0], [1, 1], b * c);
    let y = y.reflection_pad2d([0, 0, r, r]);
    let y = y.conv2d(&g.reshape([b * c, 1, k, 1]), None::<Tensor>, [1, 1], [0, 0], [1, 1], b * c);
    y.reshape([b, c, s[2], s[3]])
}

/// Photometric augmentation + flip on a batch `[B, C, H, W]` in [0, 1] units.
/// `rgb` gives the indices of the red, green and blue bands, when the data has them;
/// without them, only the flip applies.
pub fn photometric(x: &Tensor, rgb: Option<[i64; 3]>, cfg: &AugConfig) -> Tensor {
    let dev = x.device();
    let b = x.size()[0];
    let mut out = x.shallow_clone();
    if let Some(idx) = rgb {
        let index = Tensor::from_slice(&idx).to_device(dev);
        let mut y = out.index_select(1, &index);
        // Color jitter (fixed order: brightness, contrast, saturation, hue).
        let j = coin(b, cfg.jitter_p, dev);
        let bf = uniform(b, (1.0 - cfg.brightness).max(0.0), 1.0 + cfg.brightness, dev);
        let jittered = (&y * bf).clamp(0.0, 1.0);
        let cf = uniform(b, (1.0 - cfg.contrast).max(0.0), 1.0 + cfg.contrast, dev);
        let m = gray(&jittered).mean_dim([1i64, 2, 3].as_slice(), true, Kind::Float);
        let jittered = ((&jittered - &m) * cf + &m).clamp(0.0, 1.0);
        let sf = uniform(b, (1.0 - cfg.saturation).max(0.0), 1.0 + cfg.saturation, dev);
        let g = gray(&jittered);
        let jittered = ((&jittered - &g) * sf + &g).clamp(0.0, 1.0);
        let hf = uniform(b, -cfg.hue, cfg.hue, dev);
        let jittered = hue_shift(&jittered, &hf).clamp(0.0, 1.0);
        y = pick(&j, &jittered, &y);
        // Grayscale.
        let gm = coin(b, cfg.grayscale_p, dev);
        y = pick(&gm, &gray(&y).expand([b, 3, -1, -1], false), &y);
        // Blur.
        let bm = coin(b, cfg.blur_p, dev);
        let sigma = Tensor::rand([b], (Kind::Float, dev)) * (cfg.blur_sigma[1] - cfg.blur_sigma[0]) + cfg.blur_sigma[0];
        y = pick(&bm, &blur(&y, &sigma, cfg.blur_sigma[1]), &y);
        out = out.index_copy(1, &index, &y);
    }
    let fm = coin(b, cfg.flip_p, dev);
    pick(&fm, &out.flip([3i64]), &out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rrc_params_stay_inside_and_respect_scale() {
        let mut rng = Rng::new(3);
        for _ in 0..500 {
            let c = rrc_params(100, 150, [0.2, 1.0], [0.75, 4.0 / 3.0], &mut rng);
            assert!(c.top >= 0 && c.left >= 0 && c.top + c.h <= 100 && c.left + c.w <= 150, "{c:?}");
            let frac = (c.h * c.w) as f64 / 15000.0;
            assert!((0.15..=1.0).contains(&frac), "{c:?} area fraction {frac}");
        }
    }

    #[test]
    fn views_have_the_requested_shape_for_any_band_count() {
        let mut rng = Rng::new(0);
        let img = Tensor::rand([13, 90, 120], (Kind::Float, Device::Cpu)) * 255.0;
        for tp in [None, Some(448)] {
            let cfg = AugConfig { tp_resize: tp, ..Default::default() };
            let v = random_view(&img, 64, &cfg, &mut rng);
            assert_eq!(v.size(), [13, 64, 64]);
            assert!(v.min().double_value(&[]) >= -1.0 && v.max().double_value(&[]) <= 256.0);
        }
    }

    #[test]
    fn photometric_keeps_range_and_touches_only_rgb_bands() {
        tch::manual_seed(1);
        let x = Tensor::rand([8, 4, 32, 32], (Kind::Float, Device::Cpu));
        let cfg = AugConfig { flip_p: 0.0, jitter_p: 1.0, grayscale_p: 0.5, blur_p: 1.0, ..Default::default() };
        let y = photometric(&x, Some([0, 1, 2]), &cfg);
        assert_eq!(y.size(), x.size());
        assert!(y.min().double_value(&[]) >= -1e-5 && y.max().double_value(&[]) <= 1.0 + 1e-5);
        assert!(y.narrow(1, 3, 1).equal(&x.narrow(1, 3, 1)), "non-RGB band changed");
        assert!(!y.narrow(1, 0, 3).allclose(&x.narrow(1, 0, 3), 1e-3, 1e-3, false), "RGB unchanged");
        // Flip only, always: exactly the mirrored image.
        let cfg = AugConfig { flip_p: 1.0, ..Default::default() };
        assert!(photometric(&x, None, &cfg).equal(&x.flip([3i64])));
        // Hue rotation by a full turn is the identity.
        let h = hue_shift(&x.narrow(1, 0, 3), &Tensor::ones([8, 1, 1, 1], (Kind::Float, Device::Cpu)));
        assert!(h.allclose(&x.narrow(1, 0, 3), 1e-4, 1e-4, false));
    }
}
