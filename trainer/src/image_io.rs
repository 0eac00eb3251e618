//! Images for training: decoded by `geossl_raster`'s one decoder (the one the server, `chips` and `embed`
//! use, with its policy for grey, alpha, 16-bit and band counts), kept in their stored sample type, and
//! turned into tensors here: 8-bit samples as `uint8` (interleaved images as a channels-last view, which
//! libtorch's uint8 resampling is fastest on), any other type as float in stored units. Mapping stored
//! units to the model's is the input contract's job (`geossl_models::Normalization`), on the device.

use std::path::Path;
use std::sync::Arc;

use geossl_models::SampleType;
use geossl_raster::{ImageError, Layout, Samples, Want};
use tch::{Kind, Tensor};

/// Why an image could not be decoded for a model.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The file: unreadable, corrupt, another band count (the one decoder's refusal).
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{path}: stores {stored} samples; the model's normalization is for {want} (model.sample_type)")]
    SampleType { path: std::path::PathBuf, stored: SampleType, want: SampleType },
    /// A window that is not inside the image.
    #[error("{0}")]
    Window(String),
    /// A chip pack's record that cannot be read or fails its checksum (named by shard, record and chip).
    #[error("{0}")]
    Record(String),
    /// A segmentation mask that does not fit its image or its classes.
    #[error("{0}")]
    Mask(String),
}

/// Largest decoded image, in pixels (20,000² : guards against decompression bombs).
pub const MAX_PIXELS: u64 = 20_000 * 20_000;

/// A decoded image of `c` bands, `h × w` pixels, samples as stored.
#[derive(Debug, Clone)]
pub struct Image {
    pub samples: Arc<Samples>,
    pub layout: Layout,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    /// The stored value marking missing pixels, where the file declares one.
    pub nodata: Option<f64>,
}

impl Image {
    /// How the file stored its samples.
    pub fn stored(&self) -> SampleType {
        self.samples.sample_type()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.samples.len() * self.stored().bytes()
    }

    /// The window `[x, y, w, h]`, clamped to the image; empty windows are errors.
    pub fn crop(&self, [x, y, w, h]: [u32; 4]) -> Result<Image, DecodeError> {
        let (x0, y0) = ((x as usize).min(self.w), (y as usize).min(self.h));
        let (x1, y1) = ((x as usize + w as usize).min(self.w), (y as usize + h as usize).min(self.h));
        if x1 <= x0 || y1 <= y0 {
            return Err(DecodeError::Window(format!(
                "crop window {x},{y} {w}×{h} is outside the {}×{} image",
                self.w, self.h
            )));
        }
        let (c, iw, ih) = (self.c, self.w, self.h);
        let idx: Vec<usize> = match self.layout {
            Layout::Interleaved => (y0..y1).flat_map(|r| (r * iw + x0) * c..(r * iw + x1) * c).collect(),
            Layout::Planar => (0..c)
                .flat_map(|b| (y0..y1).flat_map(move |r| (b * ih + r) * iw + x0..(b * ih + r) * iw + x1))
                .collect(),
        };
        Ok(Image {
            samples: Arc::new(self.samples.gather(&idx)),
            layout: self.layout,
            c,
            h: y1 - y0,
            w: x1 - x0,
            nodata: self.nodata,
        })
    }

    /// `[C, H, W]` as the training views want it: 8-bit samples as `uint8` (a channels-last view of
    /// interleaved samples), every other type as `float` in stored units.
    pub fn raw_tensor(&self) -> Tensor {
        let (c, h, w) = (self.c as i64, self.h as i64, self.w as i64);
        match (&*self.samples, self.layout) {
            (Samples::U8(d), Layout::Interleaved) => Tensor::from_slice(d).reshape([h, w, c]).permute([2, 0, 1]),
            (Samples::U8(d), Layout::Planar) => Tensor::from_slice(d).reshape([c, h, w]),
            (s, Layout::Planar) => Tensor::from_slice(&s.to_f32()).reshape([c, h, w]),
            (s, Layout::Interleaved) => Tensor::from_slice(&s.to_f32()).reshape([h, w, c]).permute([2, 0, 1]),
        }
    }

    /// As a contiguous float tensor `[C, H, W]` in stored units (copies).
    pub fn tensor(&self) -> Tensor {
        let t = self.raw_tensor();
        if t.kind() == Kind::Float {
            t.contiguous()
        } else {
            // Reorder the bytes first: one float pass instead of two.
            t.contiguous().to_kind(Kind::Float)
        }
    }
}

/// Decodes `path` (JPEG, PNG, TIFF, or a directory of one-band GeoTIFFs read as one image) for a model of
/// `band_names`, by the one decoder's policy: TIFF bands by name where the file names them, else by
/// position with the counts equal; another band count is refused naming both; alpha is dropped.
pub fn decode(path: &Path, band_names: &[String]) -> Result<Image, ImageError> {
    let want = Want { bands: band_names, grey_to_rgb: false, max_pixels: MAX_PIXELS };
    let img = geossl_raster::decode_path(path, &want)?;
    Ok(Image {
        c: img.bands,
        h: img.height,
        w: img.width,
        layout: img.layout,
        samples: Arc::new(img.samples),
        nodata: img.nodata,
    })
}

/// Decodes `path` for a model of `spec`: its bands, and the sample type its normalization was made for
/// (when the spec records one).
pub fn decode_for(path: &Path, spec: &geossl_models::ModelSpec) -> Result<Image, DecodeError> {
    let img = decode(path, &spec.bands)?;
    match spec.sample_type {
        Some(want) if want != img.stored() => {
            Err(DecodeError::SampleType { path: path.to_owned(), stored: img.stored(), want })
        }
        _ => Ok(img),
    }
}

/// Generic names `band1..bandN` for `n` bands matched by position.
pub use geossl_raster::positional_names as positional;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_png_and_rejects_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.png");
        let mut img = image::RgbaImage::new(3, 2);
        img.put_pixel(1, 0, image::Rgba([10, 20, 30, 255]));
        img.save(&p).unwrap();
        let d = decode(&p, &positional(3)).unwrap();
        assert_eq!((d.c, d.h, d.w, d.stored()), (3, 2, 3, SampleType::U8));
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
        // 16-bit samples stay 16-bit; the tensor is float in stored units.
        let mut img16 = image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::new(2, 1);
        img16.put_pixel(1, 0, image::Rgb([1000, 40000, 65535]));
        let p16 = dir.path().join("b.png");
        img16.save(&p16).unwrap();
        let d16 = decode(&p16, &positional(3)).unwrap();
        assert_eq!(d16.stored(), SampleType::U16);
        let t16 = Vec::<f32>::try_from(d16.tensor().flatten(0, -1)).unwrap();
        assert_eq!(t16, vec![0.0, 1000.0, 0.0, 40000.0, 0.0, 65535.0]);
        let e = decode(&p, &positional(4)).unwrap_err().to_string();
        assert!(e.contains("takes 4 band(s)") && e.contains("has 3"), "{e}");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        assert!(decode(&p, &positional(3)).unwrap_err().to_string().contains("a.png"));
        std::fs::write(&p, b"").unwrap();
        assert!(decode(&p, &positional(3)).is_err());
        assert!(decode(&dir.path().join("missing.png"), &positional(3))
            .unwrap_err()
            .to_string()
            .contains("missing.png"));
        // Crops: planar float and interleaved u8 cut the same window.
        let img = Image {
            samples: Arc::new(Samples::F32((0..24).map(|x| x as f32).collect())),
            layout: Layout::Planar,
            c: 2,
            h: 3,
            w: 4,
            nodata: None,
        };
        let c = img.crop([1, 1, 2, 5]).unwrap();
        assert_eq!((c.c, c.h, c.w), (2, 2, 2));
        let want = vec![5.0, 6.0, 9.0, 10.0, 17.0, 18.0, 21.0, 22.0];
        assert_eq!(Vec::<f32>::try_from(c.tensor().flatten(0, -1)).unwrap(), want);
        assert!(img.crop([9, 0, 2, 2]).unwrap_err().to_string().contains("outside"));
        let hwc: Vec<u8> = (0..12).flat_map(|p| [p as u8, 12 + p as u8]).collect();
        let img8 =
            Image { samples: Arc::new(Samples::U8(hwc)), layout: Layout::Interleaved, c: 2, h: 3, w: 4, nodata: None };
        assert!(img.tensor().equal(&img8.tensor()));
        let c8 = img8.crop([1, 1, 2, 5]).unwrap();
        assert_eq!((c8.c, c8.h, c8.w), (2, 2, 2));
        assert_eq!(Vec::<f32>::try_from(c8.tensor().flatten(0, -1)).unwrap(), want);
    }
}
