//! Image decoding into planar float `[C, H, W]` in the file's stored units
//! (0..255 for 8-bit, 0..65535 for 16-bit, as-is for float TIFF).

use std::path::Path;
use std::sync::Arc;

use image::{DynamicImage, ImageReader, Limits};

/// Largest accepted side and decoded size: guards against decompression bombs.
pub const MAX_SIDE: u32 = 20_000;
pub const MAX_ALLOC: u64 = 1 << 30;

/// A decoded image, planar `[C, H, W]`.
#[derive(Debug, Clone)]
pub struct Image {
    pub data: Arc<Vec<f32>>,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Image {
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }

    /// The window `[x, y, w, h]`, clamped to the image; empty windows are errors.
    pub fn crop(&self, [x, y, w, h]: [u32; 4]) -> Result<Image, String> {
        let (x0, y0) = ((x as usize).min(self.w), (y as usize).min(self.h));
        let (x1, y1) = ((x as usize + w as usize).min(self.w), (y as usize + h as usize).min(self.h));
        if x1 <= x0 || y1 <= y0 {
            return Err(format!("crop window {x},{y} {w}×{h} is outside the {}×{} image", self.w, self.h));
        }
        let (cw, ch) = (x1 - x0, y1 - y0);
        let mut data = Vec::with_capacity(self.c * cw * ch);
        for c in 0..self.c {
            for row in y0..y1 {
                let base = (c * self.h + row) * self.w;
                data.extend_from_slice(&self.data[base + x0..base + x1]);
            }
        }
        Ok(Image { data: Arc::new(data), c: self.c, h: ch, w: cw })
    }

    /// As a tensor `[C, H, W]` (copies).
    pub fn tensor(&self) -> tch::Tensor {
        tch::Tensor::from_slice(&self.data).reshape([self.c as i64, self.h as i64, self.w as i64])
    }
}

fn planar<T: Copy + Into<f64>>(raw: &[T], c_in: usize, c_out: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0f32; c_out * h * w];
    for (p, px) in raw.chunks_exact(c_in).enumerate() {
        for c in 0..c_out {
            out[c * h * w + p] = px[c].into() as f32;
        }
    }
    out
}

/// Decodes `path` (JPEG, PNG, TIFF) and checks it has `bands` bands; an alpha
/// channel is dropped. Errors say what is wrong with the file.
pub fn decode(path: &Path, bands: usize) -> Result<Image, String> {
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_ALLOC);
    let mut reader = ImageReader::open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .with_guessed_format()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    reader.limits(limits);
    let img = reader.decode().map_err(|e| format!("{}: cannot decode: {e}", path.display()))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return Err(format!("{}: empty image", path.display()));
    }
    let c_in = img.color().channel_count() as usize;
    let c_out = if img.color().has_alpha() { c_in - 1 } else { c_in };
    if c_out != bands {
        return Err(format!("{}: image has {c_out} bands, the model expects {bands}", path.display()));
    }
    let data = match &img {
        DynamicImage::ImageLuma8(_)
        | DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageRgb8(_)
        | DynamicImage::ImageRgba8(_) => planar(img.as_bytes(), c_in, c_out, h, w),
        DynamicImage::ImageLuma16(b) => planar(b.as_raw(), c_in, c_out, h, w),
        DynamicImage::ImageLumaA16(b) => planar(b.as_raw(), c_in, c_out, h, w),
        DynamicImage::ImageRgb16(b) => planar(b.as_raw(), c_in, c_out, h, w),
        DynamicImage::ImageRgba16(b) => planar(b.as_raw(), c_in, c_out, h, w),
        DynamicImage::ImageRgb32F(b) => planar(b.as_raw(), c_in, c_out, h, w),
        DynamicImage::ImageRgba32F(b) => planar(b.as_raw(), c_in, c_out, h, w),
        other => return Err(format!("{}: unsupported pixel format {:?}", path.display(), other.color())),
    };
    if data.iter().any(|x| !x.is_finite()) {
        return Err(format!("{}: image has non-finite pixel values", path.display()));
    }
    Ok(Image { data: Arc::new(data), c: c_out, h, w })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_png_planar_and_rejects_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.png");
        let mut img = image::RgbaImage::new(3, 2);
        img.put_pixel(1, 0, image::Rgba([10, 20, 30, 255]));
        img.save(&p).unwrap();
        let d = decode(&p, 3).unwrap();
        assert_eq!((d.c, d.h, d.w), (3, 2, 3));
        assert_eq!([d.data[1], d.data[6 + 1], d.data[12 + 1]], [10.0, 20.0, 30.0]);
        assert!(decode(&p, 4).unwrap_err().contains("has 3 bands, the model expects 4"));
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        assert!(decode(&p, 3).unwrap_err().contains("a.png"));
        std::fs::write(&p, b"").unwrap();
        assert!(decode(&p, 3).is_err());
        assert!(decode(&dir.path().join("missing.png"), 3).unwrap_err().contains("missing.png"));
        let img = Image { data: Arc::new((0..24).map(|x| x as f32).collect()), c: 2, h: 3, w: 4 };
        let c = img.crop([1, 1, 2, 5]).unwrap();
        assert_eq!((c.c, c.h, c.w), (2, 2, 2));
        assert_eq!(*c.data, vec![5.0, 6.0, 9.0, 10.0, 17.0, 18.0, 21.0, 22.0]);
        assert!(img.crop([9, 0, 2, 2]).unwrap_err().contains("outside"));
    }
}
