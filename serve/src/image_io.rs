//! Image bodies → model input rows, and segmentation masks → PNG / RLE.
//!
//! Formats: JPEG, PNG, TIFF/GeoTIFF (8- or 16-bit, any band count for TIFF).
//! The pixel count is read from the header and checked before anything is
//! decoded, so a decompression bomb costs nothing.

use std::io::Cursor;

use image::{imageops::FilterType, ImageBuffer, ImageFormat, Luma};

use crate::error::ServeError;

/// Decoded pixels, channel-major: `data[c * h * w + y * w + x]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Planes {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub data: Vec<u8>,
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

/// Decodes `bytes` into `channels` planes. RGB models get RGB (gray is
/// replicated, alpha dropped); one-band models get luminance; other band
/// counts need a TIFF with exactly that many samples. 16-bit data is scaled
/// to 8 bits. Fails with 413 over `max_pixels`, 400 on corrupt data, 415 on
/// other formats, 422 when the bands don't match.
pub fn decode(bytes: &[u8], channels: usize, max_pixels: u64) -> Result<Planes, ServeError> {
    let format = sniff(bytes)?;
    let (w, h) = header_dims(bytes, format)?;
    let pixels = u64::from(w) * u64::from(h);
    if pixels > max_pixels {
        return Err(ServeError::TooLarge(format!("image is {w}×{h} = {pixels} pixels; the limit is {max_pixels}")));
    }
    if w == 0 || h == 0 {
        return Err(ServeError::BadRequest(format!("image is {w}×{h}")));
    }
    if format == ImageFormat::Jpeg && !jpeg_complete(bytes) {
        return Err(ServeError::BadRequest("truncated JPEG (no end-of-image marker)".into()));
    }
    if format == ImageFormat::Tiff && channels != 1 && channels != 3 {
        return decode_tiff_bands(bytes, channels);
    }
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(pixels.saturating_mul(8).saturating_add(1 << 20));
    reader.limits(limits);
    let img = reader.decode().map_err(|e| ServeError::BadRequest(format!("corrupt {format:?} image: {e}")))?;
    let (w, h) = (w as usize, h as usize);
    match channels {
        3 => {
            let rgb = img.to_rgb8().into_raw();
            let mut data = vec![0u8; 3 * h * w];
            for (i, px) in rgb.chunks_exact(3).enumerate() {
                data[i] = px[0];
                data[h * w + i] = px[1];
                data[2 * h * w + i] = px[2];
            }
            Ok(Planes { c: 3, h, w, data })
        }
        1 => Ok(Planes { c: 1, h, w, data: img.to_luma8().into_raw() }),
        c => {
            Err(ServeError::Unprocessable(format!("the model takes {c} bands; send a {c}-band TIFF (got {format:?})")))
        }
    }
}

/// A JPEG ends with FF D9 (trailing padding aside); decoders tolerate a
/// missing tail by inventing pixels, which a service must not.
fn jpeg_complete(bytes: &[u8]) -> bool {
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    end >= 2 && bytes[end - 2] == 0xFF && bytes[end - 1] == 0xD9
}

fn decode_tiff_bands(bytes: &[u8], channels: usize) -> Result<Planes, ServeError> {
    use tiff::decoder::{Decoder, DecodingResult};
    let bad = |e: tiff::TiffError| ServeError::BadRequest(format!("corrupt TIFF: {e}"));
    let mut dec = Decoder::new(Cursor::new(bytes)).map_err(bad)?;
    let (w, h) = dec.dimensions().map_err(bad)?;
    let (w, h) = (w as usize, h as usize);
    let samples = match dec.colortype().map_err(bad)? {
        tiff::ColorType::Gray(_) => 1,
        tiff::ColorType::RGB(_) => 3,
        tiff::ColorType::RGBA(_) => 4,
        tiff::ColorType::Multiband { num_samples, .. } => num_samples as usize,
        other => return Err(ServeError::Unprocessable(format!("TIFF colour type {other:?} is not supported"))),
    };
    if samples != channels {
        return Err(ServeError::Unprocessable(format!("the model takes {channels} bands; the TIFF has {samples}")));
    }
    let px = dec.read_image().map_err(bad)?;
    let n = w * h;
    let interleaved: Vec<u8> = match px {
        DecodingResult::U8(v) => v,
        DecodingResult::U16(v) => v.iter().map(|&x| (x >> 8) as u8).collect(),
        _ => return Err(ServeError::Unprocessable("TIFF sample type must be 8- or 16-bit unsigned".into())),
    };
    if interleaved.len() != n * channels {
        return Err(ServeError::Unprocessable(
            "planar-configuration TIFFs are not supported; use interleaved samples".into(),
        ));
    }
    let mut data = vec![0u8; n * channels];
    for (i, px) in interleaved.chunks_exact(channels).enumerate() {
        for (c, &v) in px.iter().enumerate() {
            data[c * n + i] = v;
        }
    }
    Ok(Planes { c: channels, h, w, data })
}

fn resize_plane(p: &[u8], w: usize, h: usize, nw: usize, nh: usize) -> Vec<u8> {
    let img: ImageBuffer<Luma<u8>, &[u8]> = ImageBuffer::from_raw(w as u32, h as u32, p).expect("plane size");
    image::imageops::resize(&img, nw as u32, nh as u32, FilterType::Triangle).into_raw()
}

impl Planes {
    /// Resizes the shorter side to cover `th`×`tw`, then centre-crops to it
    /// (what torchvision's Resize + CenterCrop do). Unchanged at that size.
    pub fn fit(self, th: usize, tw: usize) -> Planes {
        if self.h == th && self.w == tw {
            return self;
        }
        let scale = (th as f64 / self.h as f64).max(tw as f64 / self.w as f64);
        let nh = ((self.h as f64 * scale).round() as usize).max(th);
        let nw = ((self.w as f64 * scale).round() as usize).max(tw);
        let (y0, x0) = ((nh - th) / 2, (nw - tw) / 2);
        let n = self.h * self.w;
        let mut data = Vec::with_capacity(self.c * th * tw);
        for c in 0..self.c {
            let r = resize_plane(&self.data[c * n..(c + 1) * n], self.w, self.h, nw, nh);
            for y in y0..y0 + th {
                data.extend_from_slice(&r[y * nw + x0..y * nw + x0 + tw]);
            }
        }
        Planes { c: self.c, h: th, w: tw, data }
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
        let p = decode(&png(4, 3), 3, 1 << 20).unwrap();
        assert_eq!((p.c, p.h, p.w), (3, 3, 4));
        assert_eq!(p.data[1], 1); // R plane, x = 1
        assert_eq!(p.data[12 + 4], 1); // G plane, y = 1
        assert_eq!(p.data[24], 7);
    }

    #[test]
    fn refuses_what_it_should_by_kind() {
        assert!(matches!(decode(b"", 3, 100), Err(ServeError::BadRequest(_))));
        assert!(matches!(decode(b"hello world, not an image", 3, 100), Err(ServeError::UnsupportedMediaType(_))));
        assert!(matches!(decode(&png(20, 20), 3, 100), Err(ServeError::TooLarge(_))));
        let mut jpg = Vec::new();
        image::RgbImage::new(16, 16).write_to(&mut Cursor::new(&mut jpg), ImageFormat::Jpeg).unwrap();
        assert!(decode(&jpg, 3, 1000).is_ok());
        assert!(matches!(decode(&jpg[..jpg.len() / 2], 3, 1000), Err(ServeError::BadRequest(_))));
        assert!(matches!(decode(&png(4, 4), 5, 1000), Err(ServeError::Unprocessable(_))));
    }

    #[test]
    fn fit_resizes_short_side_and_centre_crops() {
        let p = Planes { c: 1, h: 4, w: 8, data: (0..32).map(|v| v as u8).collect() };
        let f = p.clone().fit(2, 2);
        assert_eq!((f.h, f.w, f.data.len()), (2, 2, 4));
        assert_eq!(p.clone().fit(4, 8), p);
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
