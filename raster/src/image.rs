//! The one image decoder of geossl: what the trainer, the image endpoints, `chips` and `embed` read, by one
//! policy.
//!
//! - Formats: JPEG and PNG (through `image`), TIFF/GeoTIFF (through [`crate::Raster`]: any band count and
//!   sample type), and, from paths, a directory of one-band GeoTIFFs read as one image (a band group).
//! - **Samples keep their stored type**: 8-bit stays `u8`, 16-bit stays `u16` (PNG as TIFF), float stays
//!   float; converting to the model's units is the input contract's job, downstream.
//! - **Bands**: the model's bands by name where a TIFF names its bands, else by position with the counts
//!   equal. A count the model does not take is refused naming both counts; a grey image is replicated to
//!   RGB only when asked ([`Want::grey_to_rgb`], an explicit flag). An alpha channel is dropped and the log
//!   says so.
//! - The pixel count is checked from the header, before anything is decoded (a decompression bomb costs
//!   nothing); float samples must be finite; a JPEG must be complete.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageFormat};

use crate::{RasterError, Samples};

/// How a decoded image's samples lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `samples[band * height * width + y * width + x]` (TIFFs, band groups).
    Planar,
    /// `samples[(y * width + x) * bands + band]` (JPEG, PNG: as their decoders give them).
    Interleaved,
}

/// A decoded image: its samples as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub bands: usize,
    pub height: usize,
    pub width: usize,
    pub layout: Layout,
    pub samples: Samples,
    /// The stored value that marks missing pixels, where the file declares one (GeoTIFF's GDAL_NODATA).
    pub nodata: Option<f64>,
}

impl Image {
    /// The samples band by band (`samples[band * h * w + y * w + x]`), as a [`crate::Block`].
    pub fn into_planar(self) -> crate::Block {
        let (bands, height, width) = (self.bands, self.height, self.width);
        let samples = match self.layout {
            Layout::Planar => self.samples,
            Layout::Interleaved => self.samples.interleaved_to_planar(bands),
        };
        crate::Block { bands, height, width, samples }
    }
}

/// What the caller's model takes.
#[derive(Debug, Clone)]
pub struct Want<'a> {
    /// The model's band names in channel order (`band1..bandN` for bands matched by position).
    pub bands: &'a [String],
    /// Replicate a one-band (grey) image into three bands for a three-band model.
    pub grey_to_rgb: bool,
    /// Largest image, in pixels (refused from its header, before decoding).
    pub max_pixels: u64,
}

/// Why an image cannot be decoded for a model. [`ImageError::kind`] says whose fault it is.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{0}: empty: expected a JPEG, PNG or TIFF image")]
    Empty(String),
    #[error("{label}: {what} (expected JPEG, PNG or TIFF)")]
    Format { label: String, what: String },
    #[error("{label}: {width}×{height} = {pixels} pixels; the limit is {limit}")]
    TooLarge { label: String, width: u64, height: u64, pixels: u64, limit: u64 },
    #[error("{label}: corrupt {format} image: {message}")]
    Corrupt { label: String, format: String, message: String },
    #[error("{label}: has non-finite sample values (NaN or infinity)")]
    NonFinite { label: String },
    #[error(transparent)]
    Raster(#[from] RasterError),
}

/// Whose fault an [`ImageError`] is, for callers that answer clients (HTTP status) or skip inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageErrorKind {
    /// The bytes are not a readable image (empty, truncated, corrupt).
    Malformed,
    /// Not an image format geossl reads.
    Format,
    /// Over the pixel limit.
    TooLarge,
    /// A readable image the model cannot take (bands, sample type, layout, values).
    Unprocessable,
}

impl ImageError {
    pub fn kind(&self) -> ImageErrorKind {
        match self {
            ImageError::Empty(_) | ImageError::Corrupt { .. } => ImageErrorKind::Malformed,
            ImageError::Format { .. } => ImageErrorKind::Format,
            ImageError::TooLarge { .. } => ImageErrorKind::TooLarge,
            ImageError::NonFinite { .. } => ImageErrorKind::Unprocessable,
            ImageError::Raster(e) => match e {
                RasterError::Unsupported { .. }
                | RasterError::MissingBand { .. }
                | RasterError::BandCount { .. }
                | RasterError::NoSuchBand { .. }
                | RasterError::Group { .. } => ImageErrorKind::Unprocessable,
                _ => ImageErrorKind::Malformed,
            },
        }
    }
}

fn too_large(label: &str, w: u64, h: u64, limit: u64) -> Result<(), ImageError> {
    let pixels = w.saturating_mul(h);
    if pixels > limit {
        return Err(ImageError::TooLarge { label: label.into(), width: w, height: h, pixels, limit });
    }
    if pixels == 0 {
        return Err(ImageError::Corrupt {
            label: label.into(),
            format: "empty".into(),
            message: format!("{w}×{h} pixels"),
        });
    }
    Ok(())
}

/// A JPEG ends with FF D9 (trailing padding aside); decoders tolerate a missing tail by inventing pixels,
/// which geossl must not.
fn jpeg_complete(bytes: &[u8]) -> bool {
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    end >= 2 && bytes[end - 2] == 0xFF && bytes[end - 1] == 0xD9
}

fn finite(label: &str, s: &Samples) -> Result<(), ImageError> {
    let ok = match s {
        Samples::F32(v) => v.iter().all(|x| x.is_finite()),
        Samples::F64(v) => v.iter().all(|x| x.is_finite()),
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(ImageError::NonFinite { label: label.into() })
    }
}

/// Decodes an image held in memory (a request body); `label` names it in errors.
pub fn decode_bytes(bytes: &[u8], label: &str, want: &Want) -> Result<Image, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty(label.into()));
    }
    match image::guess_format(bytes) {
        Ok(ImageFormat::Tiff) => {
            let r = crate::Raster::from_bytes(bytes.to_vec(), label)?;
            decode_raster(RasterLike::One(Box::new(r)), label, want)
        }
        Ok(f @ (ImageFormat::Jpeg | ImageFormat::Png)) => decode_image(bytes, f, label, want),
        Ok(f) => Err(ImageError::Format { label: label.into(), what: format!("{f:?} images are not read") }),
        Err(_) => Err(ImageError::Format { label: label.into(), what: "not a recognised image".into() }),
    }
}

/// Decodes the image at `path`: a JPEG, PNG or TIFF file, or a directory of one-band GeoTIFFs read as one
/// image (a band group, bands named by their descriptions or the file names' last `_` part).
pub fn decode_path(path: &Path, want: &Want) -> Result<Image, ImageError> {
    let label = path.display().to_string();
    if path.is_dir() {
        let files = crate::group_files(path)?;
        return decode_raster(RasterLike::Group(crate::BandGroup::open(&label, &files)?), &label, want);
    }
    let io = |source| ImageError::Raster(RasterError::Io { file: label.clone(), source });
    let mut magic = [0u8; 4];
    let n = std::io::Read::read(&mut std::fs::File::open(path).map_err(io)?, &mut magic).map_err(io)?;
    if n == 4 && (magic == *b"II*\0" || magic == *b"MM\0*" || magic == *b"II+\0" || magic == *b"MM\0+") {
        return decode_raster(RasterLike::One(Box::new(crate::Raster::open(path)?)), &label, want);
    }
    decode_bytes(&std::fs::read(path).map_err(io)?, &label, want)
}

/// A TIFF or a band group, read whole.
enum RasterLike<R: crate::Source> {
    One(Box<crate::Raster<R>>),
    Group(crate::BandGroup<R>),
}

fn decode_raster<R: crate::Source>(r: RasterLike<R>, label: &str, want: &Want) -> Result<Image, ImageError> {
    let info = match &r {
        RasterLike::One(r) => r.info().clone(),
        RasterLike::Group(g) => g.info().clone(),
    };
    too_large(label, info.width as u64, info.height as u64, want.max_pixels)?;
    let grey = want.grey_to_rgb && want.bands.len() == 3 && info.bands - usize::from(info.alpha) == 1;
    let bands = if grey {
        vec![0, 0, 0]
    } else {
        match &r {
            RasterLike::One(r) => r.select_bands(want.bands)?,
            RasterLike::Group(g) => g.select_bands(want.bands)?,
        }
    };
    if bands.len() < info.bands && info.alpha {
        tracing::info!(image = label, "alpha band dropped");
    }
    let (w, h) = (info.width, info.height);
    let block = match r {
        RasterLike::One(mut r) => r.read_window(0, 0, w, h, &bands)?,
        RasterLike::Group(mut g) => g.read_window(0, 0, w, h, &bands)?,
    };
    finite(label, &block.samples)?;
    Ok(Image {
        bands: block.bands,
        height: h,
        width: w,
        layout: Layout::Planar,
        samples: block.samples,
        nodata: info.nodata,
    })
}

fn decode_image(bytes: &[u8], format: ImageFormat, label: &str, want: &Want) -> Result<Image, ImageError> {
    let corrupt = |message: String| ImageError::Corrupt { label: label.into(), format: format!("{format:?}"), message };
    // PNG: the size is in the first chunk (IHDR); read it directly so that a bomb is refused by its size.
    let (w, h) = if format == ImageFormat::Png && bytes.len() >= 24 && &bytes[12..16] == b"IHDR" {
        let be = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        (be(16), be(20))
    } else {
        image::ImageReader::with_format(Cursor::new(bytes), format)
            .into_dimensions()
            .map_err(|e| corrupt(format!("unreadable header: {e}")))?
    };
    too_large(label, u64::from(w), u64::from(h), want.max_pixels)?;
    if format == ImageFormat::Jpeg && !jpeg_complete(bytes) {
        return Err(corrupt("truncated (no end-of-image marker)".into()));
    }
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_alloc = Some((u64::from(w) * u64::from(h)).saturating_mul(16).saturating_add(1 << 20));
    reader.limits(limits);
    let img = reader.decode().map_err(|e| corrupt(e.to_string()))?;
    let (c_in, alpha) = (img.color().channel_count() as usize, img.color().has_alpha());
    let have = c_in - usize::from(alpha);
    if alpha {
        tracing::info!(image = label, "alpha band dropped");
    }
    let samples = match img {
        DynamicImage::ImageLuma8(_)
        | DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageRgb8(_)
        | DynamicImage::ImageRgba8(_) => Samples::U8(without_alpha(img.into_bytes(), c_in, alpha)),
        DynamicImage::ImageLuma16(b) => Samples::U16(b.into_raw()),
        DynamicImage::ImageLumaA16(b) => Samples::U16(without_alpha(b.into_raw(), c_in, alpha)),
        DynamicImage::ImageRgb16(b) => Samples::U16(b.into_raw()),
        DynamicImage::ImageRgba16(b) => Samples::U16(without_alpha(b.into_raw(), c_in, alpha)),
        DynamicImage::ImageRgb32F(b) => Samples::F32(b.into_raw()),
        DynamicImage::ImageRgba32F(b) => Samples::F32(without_alpha(b.into_raw(), c_in, alpha)),
        other => return Err(corrupt(format!("unsupported pixel format {:?}", other.color()))),
    };
    finite(label, &samples)?;
    let want_n = want.bands.len();
    let (bands, samples) = if have == want_n {
        (have, samples)
    } else if have == 1 && want_n == 3 && want.grey_to_rgb {
        (3, samples.repeat_each(3))
    } else {
        return Err(ImageError::Raster(RasterError::BandCount {
            file: label.into(),
            want: want_n,
            names: want.bands.join(", "),
            have,
            sample_type: samples.sample_type(),
        }));
    };
    Ok(Image { bands, height: h as usize, width: w as usize, layout: Layout::Interleaved, samples, nodata: None })
}

/// Interleaved samples of `c` channels, less the last one when it is alpha.
fn without_alpha<T: Copy>(raw: Vec<T>, c: usize, alpha: bool) -> Vec<T> {
    if !alpha {
        return raw;
    }
    raw.chunks_exact(c).flat_map(|px| px[..c - 1].iter().copied()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(img: DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png).unwrap();
        out
    }

    fn names(n: usize) -> Vec<String> {
        crate::positional_names(n)
    }

    #[test]
    fn samples_keep_their_type_and_bands_their_count() {
        let want3 = names(3);
        let w3 = Want { bands: &want3, grey_to_rgb: false, max_pixels: 1 << 20 };
        let rgba = png(DynamicImage::ImageRgba8(image::RgbaImage::from_fn(3, 2, |x, y| {
            image::Rgba([x as u8, y as u8, 7, 9])
        })));
        let i = decode_bytes(&rgba, "a.png", &w3).unwrap();
        assert_eq!((i.bands, i.height, i.width, i.layout), (3, 2, 3, Layout::Interleaved));
        let p = i.into_planar();
        assert_eq!(p.samples, Samples::U8(vec![0, 1, 2, 0, 1, 2, 0, 0, 0, 1, 1, 1, 7, 7, 7, 7, 7, 7]), "alpha dropped");
        // 16-bit stays 16-bit.
        let g16 =
            png(DynamicImage::ImageLuma16(image::ImageBuffer::from_fn(2, 1, |x, _| image::Luma([40000 + x as u16]))));
        let want1 = names(1);
        let i = decode_bytes(&g16, "g.png", &Want { bands: &want1, ..w3.clone() }).unwrap();
        assert_eq!(i.samples, Samples::U16(vec![40000, 40001]));
        // Grey for an RGB model: refused naming both counts, replicated only when asked.
        let e = decode_bytes(&g16, "g.png", &w3).unwrap_err();
        assert_eq!(e.kind(), ImageErrorKind::Unprocessable);
        assert!(e.to_string().contains("takes 3 band(s)") && e.to_string().contains("has 1"), "{e}");
        let i = decode_bytes(&g16, "g.png", &Want { grey_to_rgb: true, ..w3.clone() }).unwrap();
        assert_eq!(i.into_planar().samples, Samples::U16(vec![40000, 40001, 40000, 40001, 40000, 40001]));
        // Limits and kinds.
        assert_eq!(decode_bytes(b"", "x", &w3).unwrap_err().kind(), ImageErrorKind::Malformed);
        assert_eq!(decode_bytes(b"hello world", "x", &w3).unwrap_err().kind(), ImageErrorKind::Format);
        let small = Want { max_pixels: 5, ..w3.clone() };
        assert_eq!(decode_bytes(&rgba, "a.png", &small).unwrap_err().kind(), ImageErrorKind::TooLarge);
        let mut jpg = Vec::new();
        image::RgbImage::new(16, 16).write_to(&mut Cursor::new(&mut jpg), ImageFormat::Jpeg).unwrap();
        assert!(decode_bytes(&jpg, "j.jpg", &w3).is_ok());
        assert_eq!(decode_bytes(&jpg[..jpg.len() / 2], "j.jpg", &w3).unwrap_err().kind(), ImageErrorKind::Malformed);
    }
}
