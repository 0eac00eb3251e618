//! Image bodies → model input rows, and segmentation masks → PNG / RLE.
//!
//! Formats: JPEG, PNG (8- or 16-bit), TIFF/GeoTIFF through `geossl_raster`
//! (any band count and sample type, planar or chunky, stripped or tiled,
//! JPEG-YCbCr). Samples keep their stored type: a 16-bit image is never
//! squeezed into 8 bits; whether a model can take it is decided against the
//! model's contract ([`crate::backend::ModelInfo::check_samples`]). The pixel
//! count is read from the header and checked before anything is decoded, so a
//! decompression bomb costs nothing.

use std::io::Cursor;

use geossl_raster::{Raster, SampleType, Samples};
use image::{imageops::FilterType, DynamicImage, ImageBuffer, ImageFormat, Luma};

use crate::error::ServeError;

/// Decoded samples, channel-major: `data[c * h * w + y * w + x]`. `stored` is
/// the type the image stored (resizing may have turned other integer types
/// into float32 samples).
#[derive(Debug, Clone, PartialEq)]
pub struct Planes {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub stored: SampleType,
    pub data: Samples,
}

impl Planes {
    /// 8-bit planes.
    pub fn u8(c: usize, h: usize, w: usize, data: Vec<u8>) -> Self {
        Planes { c, h, w, stored: SampleType::U8, data: Samples::U8(data) }
    }
}

fn sniff(bytes: &[u8]) -> Result<ImageFormat, ServeError> {
    if bytes.is_empty() {
        return Err(ServeError::BadRequest("empty body: expected a JPEG, PNG or TIFF image".into()));
    }
    match image::guess_format(bytes) {
        Ok(f @ (ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::Tiff)) => Ok(f),
        Ok(f) => {
            Err(ServeError::UnsupportedMediaType(format!("{f:?} images are not accepted; send JPEG, PNG or TIFF")))
        }
        Err(_) => {
            Err(ServeError::UnsupportedMediaType("body is not a recognised image (expected JPEG, PNG or TIFF)".into()))
        }
    }
}

fn header_dims(bytes: &[u8], format: ImageFormat) -> Result<(u32, u32), ServeError> {
    // PNG: the size is in the first chunk (IHDR); read it directly so that a
    // bomb is refused by its size even before the decoder looks further.
    if format == ImageFormat::Png && bytes.len() >= 24 && &bytes[12..16] == b"IHDR" {
        let be = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        return Ok((be(16), be(20)));
    }
    let reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    reader.into_dimensions().map_err(|e| ServeError::BadRequest(format!("unreadable {format:?} header: {e}")))
}

fn check_pixels(w: u64, h: u64, max_pixels: u64) -> Result<(), ServeError> {
    let pixels = w * h;
    if pixels > max_pixels {
        return Err(ServeError::TooLarge(format!("image is {w}×{h} = {pixels} pixels; the limit is {max_pixels}")));
    }
    if w == 0 || h == 0 {
        return Err(ServeError::BadRequest(format!("image is {w}×{h}")));
    }
    Ok(())
}

/// Decodes `bytes` into `channels` planes of the stored sample type. JPEG and
/// PNG: RGB models get RGB (8-bit gray is replicated, alpha dropped), one-band
/// models get luminance. TIFF: the model's bands `names` (when given, one per
/// channel) by name where the file names its bands, else by position with the
/// counts equal (an alpha band beyond them is dropped). Fails with 413 over
/// `max_pixels`, 400 on corrupt data, 415 on other formats, 422 when the bands
/// don't match.
pub fn decode(bytes: &[u8], channels: usize, names: &[String], max_pixels: u64) -> Result<Planes, ServeError> {
    let format = sniff(bytes)?;
    if format == ImageFormat::Tiff {
        return decode_tiff(bytes, channels, names, max_pixels);
    }
    let (w, h) = header_dims(bytes, format)?;
    check_pixels(u64::from(w), u64::from(h), max_pixels)?;
    if format == ImageFormat::Jpeg && !jpeg_complete(bytes) {
        return Err(ServeError::BadRequest("truncated JPEG (no end-of-image marker)".into()));
    }
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_alloc = Some((u64::from(w) * u64::from(h)).saturating_mul(16).saturating_add(1 << 20));
    reader.limits(limits);
    let img = reader.decode().map_err(|e| ServeError::BadRequest(format!("corrupt {format:?} image: {e}")))?;
    let (w, h) = (w as usize, h as usize);
    let sixteen = matches!(
        img,
        DynamicImage::ImageLuma16(_)
            | DynamicImage::ImageLumaA16(_)
            | DynamicImage::ImageRgb16(_)
            | DynamicImage::ImageRgba16(_)
    );
    let gray = !img.color().has_color();
    if sixteen && gray && channels == 3 {
        return Err(ServeError::Unprocessable(
            "the model takes 3 bands; the image has 1 band of 16-bit samples".into(),
        ));
    }
    match (channels, sixteen) {
        (3, false) => Ok(Planes::u8(3, h, w, to_planar(&img.to_rgb8().into_raw(), 3))),
        (1, false) => Ok(Planes::u8(1, h, w, img.to_luma8().into_raw())),
        (3, true) => Ok(u16_planes(3, h, w, to_planar(&img.to_rgb16().into_raw(), 3))),
        (1, true) => Ok(u16_planes(1, h, w, img.to_luma16().into_raw())),
        (c, _) => {
            Err(ServeError::Unprocessable(format!("the model takes {c} bands; send a {c}-band TIFF (got {format:?})")))
        }
    }
}

fn u16_planes(c: usize, h: usize, w: usize, data: Vec<u16>) -> Planes {
    Planes { c, h, w, stored: SampleType::U16, data: Samples::U16(data) }
}

/// Interleaved `[H, W, c]` → channel-major.
fn to_planar<T: Copy + Default>(px: &[T], c: usize) -> Vec<T> {
    let n = px.len() / c;
    let mut data = vec![T::default(); px.len()];
    for (i, p) in px.chunks_exact(c).enumerate() {
        for (k, &v) in p.iter().enumerate() {
            data[k * n + i] = v;
        }
    }
    data
}

/// A JPEG ends with FF D9 (trailing padding aside); decoders tolerate a
/// missing tail by inventing pixels, which a service must not.
fn jpeg_complete(bytes: &[u8]) -> bool {
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    end >= 2 && bytes[end - 2] == 0xFF && bytes[end - 1] == 0xD9
}

/// The model's band names, or `band1..bandN` (matched by position) when unknown.
pub fn band_names(channels: usize, names: &[String]) -> Vec<String> {
    if names.len() == channels {
        names.to_vec()
    } else {
        geossl_raster::positional_names(channels)
    }
}

fn decode_tiff(bytes: &[u8], channels: usize, names: &[String], max_pixels: u64) -> Result<Planes, ServeError> {
    use geossl_raster::RasterError as E;
    let to_serve = |e: E| {
        let m = e.to_string().trim_start_matches("TIFF body: ").to_string();
        match e {
            E::Unsupported { .. } | E::MissingBand { .. } | E::BandCount { .. } => ServeError::Unprocessable(m),
            _ => ServeError::BadRequest(format!("corrupt TIFF: {m}")),
        }
    };
    let mut r = Raster::from_bytes(bytes.to_vec(), "TIFF body").map_err(to_serve)?;
    let info = r.info().clone();
    check_pixels(info.width as u64, info.height as u64, max_pixels)?;
    let bands = r.select_bands(&band_names(channels, names)).map_err(to_serve)?;
    let block = r.read_window(0, 0, info.width, info.height, &bands).map_err(to_serve)?;
    Ok(Planes { c: channels, h: info.height, w: info.width, stored: info.sample_type, data: block.samples })
}

fn resize_plane<P>(p: &[P::Subpixel], w: usize, h: usize, nw: usize, nh: usize) -> Vec<P::Subpixel>
where
    P: image::Pixel + 'static,
    P::Subpixel: 'static,
{
    let img: ImageBuffer<P, &[P::Subpixel]> = ImageBuffer::from_raw(w as u32, h as u32, p).expect("plane size");
    image::imageops::resize(&img, nw as u32, nh as u32, FilterType::Triangle).into_raw()
}

impl Planes {
    /// Resizes the shorter side to cover `th`×`tw`, then centre-crops to it
    /// (what torchvision's Resize + CenterCrop do). Unchanged at that size.
    /// 8- and 16-bit samples stay so; other types are resized as float32.
    pub fn fit(self, th: usize, tw: usize) -> Planes {
        if self.h == th && self.w == tw {
            return self;
        }
        let scale = (th as f64 / self.h as f64).max(tw as f64 / self.w as f64);
        let nh = ((self.h as f64 * scale).round() as usize).max(th);
        let nw = ((self.w as f64 * scale).round() as usize).max(tw);
        let (y0, x0) = ((nh - th) / 2, (nw - tw) / 2);
        let n = self.h * self.w;
        fn crop<T: Copy>(r: &[T], out: &mut Vec<T>, y0: usize, x0: usize, th: usize, tw: usize, nw: usize) {
            for y in y0..y0 + th {
                out.extend_from_slice(&r[y * nw + x0..y * nw + x0 + tw]);
            }
        }
        let data = match &self.data {
            Samples::U8(v) => {
                let mut out = Vec::with_capacity(self.c * th * tw);
                for c in 0..self.c {
                    let r = resize_plane::<Luma<u8>>(&v[c * n..(c + 1) * n], self.w, self.h, nw, nh);
                    crop(&r, &mut out, y0, x0, th, tw, nw);
                }
                Samples::U8(out)
            }
            Samples::U16(v) => {
                let mut out = Vec::with_capacity(self.c * th * tw);
                for c in 0..self.c {
                    let r = resize_plane::<Luma<u16>>(&v[c * n..(c + 1) * n], self.w, self.h, nw, nh);
                    crop(&r, &mut out, y0, x0, th, tw, nw);
                }
                Samples::U16(out)
            }
            other => {
                let v = other.to_f32();
                let mut out = Vec::with_capacity(self.c * th * tw);
                for c in 0..self.c {
                    let r = resize_plane::<Luma<f32>>(&v[c * n..(c + 1) * n], self.w, self.h, nw, nh);
                    crop(&r, &mut out, y0, x0, th, tw, nw);
                }
                Samples::F32(out)
            }
        };
        Planes { c: self.c, h: th, w: tw, stored: self.stored, data }
    }
}

/// Per-pixel argmax of `logits` (`[K, H, W]`) → class ids (`[H, W]`).
pub fn argmax_mask(logits: &[f32], k: usize, h: usize, w: usize) -> Vec<u8> {
    let n = h * w;
    (0..n)
        .map(|i| {
            let mut best = 0usize;
            for c in 1..k {
                if logits[c * n + i] > logits[best * n + i] {
                    best = c;
                }
            }
            best.min(255) as u8
        })
        .collect()
}

/// Class mask as an 8-bit grayscale PNG (pixel value = class id).
pub fn mask_png(mask: &[u8], h: usize, w: usize) -> Result<Vec<u8>, ServeError> {
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(mask, w as u32, h as u32, image::ExtendedColorType::L8)
        .map_err(|e| ServeError::Internal(format!("PNG encoding failed: {e}")))?;
    Ok(out)
}

use image::ImageEncoder;

/// Row-major run-length encoding: `[[class, run], ...]`.
pub fn mask_rle(mask: &[u8]) -> Vec<[u32; 2]> {
    let mut runs: Vec<[u32; 2]> = Vec::new();
    for &v in mask {
        match runs.last_mut() {
            Some(r) if r[0] == u32::from(v) => r[1] += 1,
            _ => runs.push([u32::from(v), 1]),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn decodes_png_channel_major() {
        let p = decode(&png(4, 3), 3, &[], 1 << 20).unwrap();
        assert_eq!((p.c, p.h, p.w, p.stored), (3, 3, 4, SampleType::U8));
        assert_eq!(p.data.get(1), 1.0); // R plane, x = 1
        assert_eq!(p.data.get(12 + 4), 1.0); // G plane, y = 1
        assert_eq!(p.data.get(24), 7.0);
    }

    #[test]
    fn refuses_what_it_should_by_kind() {
        assert!(matches!(decode(b"", 3, &[], 100), Err(ServeError::BadRequest(_))));
        assert!(matches!(decode(b"hello world, not an image", 3, &[], 100), Err(ServeError::UnsupportedMediaType(_))));
        assert!(matches!(decode(&png(20, 20), 3, &[], 100), Err(ServeError::TooLarge(_))));
        let mut jpg = Vec::new();
        image::RgbImage::new(16, 16).write_to(&mut Cursor::new(&mut jpg), ImageFormat::Jpeg).unwrap();
        assert!(decode(&jpg, 3, &[], 1000).is_ok());
        assert!(matches!(decode(&jpg[..jpg.len() / 2], 3, &[], 1000), Err(ServeError::BadRequest(_))));
        assert!(matches!(decode(&png(4, 4), 5, &[], 1000), Err(ServeError::Unprocessable(_))));
    }

    #[test]
    fn fit_resizes_short_side_and_centre_crops() {
        let p = Planes::u8(1, 4, 8, (0..32).map(|v| v as u8).collect());
        let f = p.clone().fit(2, 2);
        assert_eq!((f.h, f.w, f.data.len()), (2, 2, 4));
        assert_eq!(p.clone().fit(4, 8), p);
        // 16-bit samples stay 16-bit and keep their range.
        let p16 = Planes {
            c: 1,
            h: 4,
            w: 8,
            stored: SampleType::U16,
            data: Samples::U16((0..32).map(|v| v * 2000).collect()),
        };
        let f16 = p16.fit(2, 2);
        assert!(matches!(&f16.data, Samples::U16(v) if v.iter().any(|&x| x > 20_000)), "{f16:?}");
    }

    #[test]
    fn masks_encode() {
        let logits = [0.0, 1.0, 0.0, 1.0, 0.0, 0.5]; // K=2, H=1, W=3
        let m = argmax_mask(&logits, 2, 1, 3);
        assert_eq!(m, vec![1, 0, 1]);
        assert_eq!(mask_rle(&[0, 0, 1, 1, 1, 0]), vec![[0, 2], [1, 3], [0, 1]]);
        let png = mask_png(&m, 1, 3).unwrap();
        let back = image::load_from_memory(&png).unwrap().to_luma8().into_raw();
        assert_eq!(back, m);
    }
}
