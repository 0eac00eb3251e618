//! Image decoding: 8-bit images keep their samples as decoded (interleaved
//! `u8`), other sample types become planar float `[C, H, W]` in the file's
//! stored units (0..65535 for 16-bit, as-is for float TIFF). TIFFs go through
//! `geossl_raster` (the decoder geossl-serve uses too: any band count and
//! sample type, planar or chunky, stripped or tiled); JPEG and PNG through
//! `image`.

use std::path::Path;
use std::sync::Arc;

use geossl_models::SampleType;
use geossl_raster::{BandGroup, Samples};
use image::{DynamicImage, ImageReader, Limits};
use tch::{Kind, Tensor};

/// Largest accepted side and decoded size: guards against decompression bombs.
pub const MAX_SIDE: u32 = 20_000;
pub const MAX_ALLOC: u64 = 1 << 30;

/// Samples of a decoded image.
#[derive(Debug, Clone)]
pub enum Pixels {
    /// 8-bit samples, interleaved `[H, W, C]` as the decoder gave them.
    U8(Arc<Vec<u8>>),
    /// Other sample types as f32 in stored units, planar `[C, H, W]`.
    F32(Arc<Vec<f32>>),
}

/// A decoded image of `c` bands, `h × w` pixels.
#[derive(Debug, Clone)]
pub struct Image {
    pub pixels: Pixels,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    /// How the file stored its samples.
    pub stored: SampleType,
}

impl Image {
    pub fn bytes(&self) -> usize {
        match &self.pixels {
            Pixels::U8(d) => d.len(),
            Pixels::F32(d) => d.len() * 4,
        }
    }

    /// The window `[x, y, w, h]`, clamped to the image; empty windows are errors.
    pub fn crop(&self, [x, y, w, h]: [u32; 4]) -> Result<Image, String> {
        let (x0, y0) = ((x as usize).min(self.w), (y as usize).min(self.h));
        let (x1, y1) = ((x as usize + w as usize).min(self.w), (y as usize + h as usize).min(self.h));
        if x1 <= x0 || y1 <= y0 {
            return Err(format!("crop window {x},{y} {w}×{h} is outside the {}×{} image", self.w, self.h));
        }
        let (cw, ch, c) = (x1 - x0, y1 - y0, self.c);
        let pixels = match &self.pixels {
            Pixels::U8(d) => {
                let mut out = Vec::with_capacity(c * cw * ch);
                for row in y0..y1 {
                    out.extend_from_slice(&d[(row * self.w + x0) * c..(row * self.w + x1) * c]);
                }
                Pixels::U8(Arc::new(out))
            }
            Pixels::F32(d) => {
                let mut out = Vec::with_capacity(c * cw * ch);
                for band in 0..c {
                    for row in y0..y1 {
                        let base = (band * self.h + row) * self.w;
                        out.extend_from_slice(&d[base + x0..base + x1]);
                    }
                }
                Pixels::F32(Arc::new(out))
            }
        };
        Ok(Image { pixels, c, h: ch, w: cw, stored: self.stored })
    }

    /// `[C, H, W]` in the samples' own type: `uint8` (a channels-last view of
    /// the interleaved samples, which libtorch's uint8 resampling is fastest
    /// on) or `float`.
    pub fn raw_tensor(&self) -> Tensor {
        let (c, h, w) = (self.c as i64, self.h as i64, self.w as i64);
        match &self.pixels {
            Pixels::U8(d) => Tensor::from_slice(d).reshape([h, w, c]).permute([2, 0, 1]),
            Pixels::F32(d) => Tensor::from_slice(d).reshape([c, h, w]),
        }
    }

    /// As a contiguous float tensor `[C, H, W]` in stored units (copies).
    pub fn tensor(&self) -> Tensor {
        let t = self.raw_tensor();
        if t.kind() == Kind::Float {
            t
        } else {
            // Reorder the bytes first: one float pass instead of two.
            t.contiguous().to_kind(Kind::Float)
        }
    }
}

/// Interleaved `[H, W, c_in]` samples → planar `[c_out, H, W]` f32 (the first
/// `c_out` channels), channel by channel.
fn planar<T: Copy + Into<f32>>(raw: &[T], c_in: usize, c_out: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(c_out * h * w);
    for c in 0..c_out {
        out.extend(raw[c..].iter().step_by(c_in).take(h * w).map(|&v| v.into()));
    }
    out
}

/// Decodes a TIFF with `geossl_raster`: the model's `bands` (by name where the
/// file names its bands, else by position), 8-bit as interleaved `u8`, others
/// as planar f32 in stored units.
fn decode_tiff(path: &Path, bands: &[String]) -> Result<Image, String> {
    // A directory is a band group: its GeoTIFFs, one file per band (sorted by name).
    let files = if path.is_dir() {
        geossl_raster::group_files(path).map_err(|e| e.to_string())?
    } else {
        vec![path.to_path_buf()]
    };
    let mut r = BandGroup::open(&path.display().to_string(), &files).map_err(|e| e.to_string())?;
    let info = r.info().clone();
    if info.width as u32 > MAX_SIDE || info.height as u32 > MAX_SIDE {
        return Err(format!(
            "{}: {}×{} is larger than {MAX_SIDE} pixels a side",
            path.display(),
            info.width,
            info.height
        ));
    }
    let picked = r.select_bands(bands).map_err(|e| e.to_string())?;
    let c = picked.len();
    let block = r.read_window(0, 0, info.width, info.height, &picked).map_err(|e| e.to_string())?;
    let (h, w) = (info.height, info.width);
    let pixels = match block.samples {
        Samples::U8(planar) => {
            let n = h * w;
            let mut hwc = vec![0u8; planar.len()];
            for (k, plane) in planar.chunks_exact(n).enumerate() {
                for (i, &v) in plane.iter().enumerate() {
                    hwc[i * c + k] = v;
                }
            }
            Pixels::U8(Arc::new(hwc))
        }
        other => finite(path, other.to_f32())?,
    };
    Ok(Image { pixels, c, h, w, stored: info.sample_type })
}

/// Decodes `path` for a model of `spec`: its bands, and the sample type its
/// normalization was made for (when the spec records one).
pub fn decode_for(path: &Path, spec: &geossl_models::ModelSpec) -> Result<Image, String> {
    let img = decode(path, &spec.bands)?;
    match spec.sample_type {
        Some(t) if t != img.stored => Err(format!(
            "{}: stores {} samples; the model's normalization is for {t} (model.sample_type)",
            path.display(),
            img.stored
        )),
        _ => Ok(img),
    }
}

fn is_tiff(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok()
        && (magic == *b"II*\0" || magic == *b"MM\0*" || magic == *b"II+\0" || magic == *b"MM\0+")
}

/// Generic names `band1..bandN` for `n` bands matched by position.
pub use geossl_raster::positional_names as positional;

/// Decodes `path` (JPEG, PNG, TIFF, or a directory of one-band GeoTIFFs read as
/// one image, a band group) for a model of `band_names` (TIFF bands picked by
/// these names where the files name their bands, else by position; JPEG/PNG by
/// position); an alpha channel is dropped. Errors say what is wrong with the file.
pub fn decode(path: &Path, band_names: &[String]) -> Result<Image, String> {
    let bands = band_names.len();
    if path.is_dir() || is_tiff(path) {
        return decode_tiff(path, band_names);
    }
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
    let stored = match &img {
        DynamicImage::ImageLuma8(_)
        | DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageRgb8(_)
        | DynamicImage::ImageRgba8(_) => SampleType::U8,
        DynamicImage::ImageRgb32F(_) | DynamicImage::ImageRgba32F(_) => SampleType::F32,
        _ => SampleType::U16,
    };
    let pixels = match img {
        DynamicImage::ImageLuma8(_)
        | DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageRgb8(_)
        | DynamicImage::ImageRgba8(_) => {
            let raw = img.into_bytes();
            Pixels::U8(Arc::new(if c_in == c_out {
                raw
            } else {
                raw.chunks_exact(c_in).flat_map(|px| &px[..c_out]).copied().collect()
            }))
        }
        DynamicImage::ImageLuma16(b) => Pixels::F32(Arc::new(planar(b.as_raw(), c_in, c_out, h, w))),
        DynamicImage::ImageLumaA16(b) => Pixels::F32(Arc::new(planar(b.as_raw(), c_in, c_out, h, w))),
        DynamicImage::ImageRgb16(b) => Pixels::F32(Arc::new(planar(b.as_raw(), c_in, c_out, h, w))),
        DynamicImage::ImageRgba16(b) => Pixels::F32(Arc::new(planar(b.as_raw(), c_in, c_out, h, w))),
        DynamicImage::ImageRgb32F(b) => finite(path, planar(b.as_raw(), c_in, c_out, h, w))?,
        DynamicImage::ImageRgba32F(b) => finite(path, planar(b.as_raw(), c_in, c_out, h, w))?,
        other => return Err(format!("{}: unsupported pixel format {:?}", path.display(), other.color())),
    };
    Ok(Image { pixels, c: c_out, h, w, stored })
}

/// Float samples, refused when any is NaN or infinite.
fn finite(path: &Path, data: Vec<f32>) -> Result<Pixels, String> {
    if data.iter().any(|x| !x.is_finite()) {
        return Err(format!("{}: image has non-finite pixel values", path.display()));
    }
    Ok(Pixels::F32(Arc::new(data)))
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
        let d = decode(&p, &positional(3)).unwrap();
        assert_eq!((d.c, d.h, d.w), (3, 2, 3));
        assert!(matches!(d.pixels, Pixels::U8(_)), "8-bit samples stay 8-bit");
        let t = d.tensor();
        assert_eq!((t.size(), t.kind()), (vec![3, 2, 3], Kind::Float));
        assert_eq!(
            Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()[..],
            {
                let mut want = vec![0.0; 18];
                (want[1], want[6 + 1], want[12 + 1]) = (10.0, 20.0, 30.0); // alpha dropped, planar
                want
            }[..]
        );
        assert_eq!(d.raw_tensor().kind(), Kind::Uint8);
        // 16-bit samples become float in stored units.
        let mut img16 = image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::new(2, 1);
        img16.put_pixel(1, 0, image::Rgb([1000, 40000, 65535]));
        let p16 = dir.path().join("b.png");
        img16.save(&p16).unwrap();
        let d16 = decode(&p16, &positional(3)).unwrap();
        assert!(matches!(d16.pixels, Pixels::F32(_)));
        let t16 = Vec::<f32>::try_from(d16.tensor().flatten(0, -1)).unwrap();
        assert_eq!(t16, vec![0.0, 1000.0, 0.0, 40000.0, 0.0, 65535.0]);
        assert!(decode(&p, &positional(4)).unwrap_err().contains("has 3 bands, the model expects 4"));
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        assert!(decode(&p, &positional(3)).unwrap_err().contains("a.png"));
        std::fs::write(&p, b"").unwrap();
        assert!(decode(&p, &positional(3)).is_err());
        assert!(decode(&dir.path().join("missing.png"), &positional(3)).unwrap_err().contains("missing.png"));
        // Crops: planar float and interleaved u8 cut the same window.
        let img = Image {
            pixels: Pixels::F32(Arc::new((0..24).map(|x| x as f32).collect())),
            c: 2,
            h: 3,
            w: 4,
            stored: SampleType::F32,
        };
        let c = img.crop([1, 1, 2, 5]).unwrap();
        assert_eq!((c.c, c.h, c.w), (2, 2, 2));
        let want = vec![5.0, 6.0, 9.0, 10.0, 17.0, 18.0, 21.0, 22.0];
        assert_eq!(Vec::<f32>::try_from(c.tensor().flatten(0, -1)).unwrap(), want);
        assert!(img.crop([9, 0, 2, 2]).unwrap_err().contains("outside"));
        let hwc: Vec<u8> = (0..12).flat_map(|p| [p as u8, 12 + p as u8]).collect();
        let img8 = Image { pixels: Pixels::U8(Arc::new(hwc)), c: 2, h: 3, w: 4, stored: SampleType::U8 };
        assert!(img.tensor().equal(&img8.tensor()));
        let c8 = img8.crop([1, 1, 2, 5]).unwrap();
        assert_eq!((c8.c, c8.h, c8.w), (2, 2, 2));
        assert_eq!(Vec::<f32>::try_from(c8.tensor().flatten(0, -1)).unwrap(), want);
    }
}
