//! One decoder, one policy: the same files fed to the trainer's decoder (`image_io::decode`, from a path)
//! and to the image endpoints' (`decode_images`, from a request body) give the same samples bit for bit,
//! or the same refusal. Real pixels: windows of the committed Landsat scene, written as a grey PNG, an
//! RGBA PNG, a 16-bit PNG, a JPEG and a planar GeoTIFF.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use geossl_raster::{Block, Samples};
use geossl_serve::http::ServeError;
use geossl_serve::infer::{DType, ModelInfo, Task, TensorSpec};
use geossl_trainer::image_io::{decode, positional};

/// A float-input model of `c` bands at `h × w` (no resize: the endpoint's samples are the decoder's).
fn model(c: usize, h: usize, w: usize) -> ModelInfo {
    let spec = |name: &str, shape: Vec<i64>| TensorSpec { name: name.into(), datatype: DType::F32, shape };
    ModelInfo {
        name: "m".into(),
        version: 1,
        input: spec("images", vec![-1, c as i64, h as i64, w as i64]),
        outputs: vec![spec("embedding", vec![-1, 8])],
        roles: vec![Some(geossl_serve::infer::backend::OutputRole::Embedding)],
        task: Task::Embedding,
        labels: Vec::new(),
        normalization: None,
        sample_type: None,
        bands: Vec::new(),
        metadata: Default::default(),
        execution_provider: "none".into(),
    }
}

/// The trainer's decoding of `path` for a `c`-band model, planar; or its refusal.
fn trainer(path: &Path, c: usize) -> Result<Block, String> {
    let img = decode(path, &positional(c)).map_err(|e| e.to_string())?;
    let r = geossl_raster::Image {
        bands: img.c,
        height: img.h,
        width: img.w,
        layout: img.layout,
        samples: (*img.samples).clone(),
        nodata: img.nodata,
    };
    Ok(r.into_planar())
}

/// The image endpoint's decoding of the same bytes; or its refusal (with the HTTP status it answers).
fn endpoint(path: &Path, c: usize, h: usize, w: usize) -> Result<Block, (u16, String)> {
    let body = std::fs::read(path).unwrap();
    match geossl_serve::http::images::decode_images(&[body], &model(c, h, w), u64::MAX, false) {
        Ok(mut v) => Ok(v.remove(0)),
        Err(e) => {
            let status = e.status();
            let ServeError::Unprocessable(m) = e else { return Err((status, e.to_string())) };
            Err((status, m))
        }
    }
}

/// A message without its leading `label: ` (the trainer names the file, the endpoint the image).
fn unlabelled(m: &str) -> &str {
    m.split_once(": ").map_or(m, |(_, rest)| rest)
}

#[test]
fn the_trainer_and_the_image_endpoints_decode_alike() {
    let d = tempfile::tempdir().unwrap();
    let mut r = geossl_raster::Raster::open(&geossl_tests::data::fixtures().join("rasterio/RGB.byte.tif")).unwrap();
    let (x, y, s) = (300, 300, 48);
    let Samples::U8(rgb) = r.read_window(x, y, s, s, &[0, 1, 2]).unwrap().samples else { panic!("8-bit scene") };
    let n = s * s;
    let interleaved: Vec<u8> = (0..n).flat_map(|i| [rgb[i], rgb[n + i], rgb[2 * n + i]]).collect();
    let (w32, h32) = (s as u32, s as u32);
    let files: Vec<(&str, std::path::PathBuf)> = vec![
        ("grey", d.path().join("grey.png")),
        ("rgba", d.path().join("rgba.png")),
        ("rgb16", d.path().join("rgb16.png")),
        ("jpeg", d.path().join("rgb.jpg")),
        ("tiff", d.path().join("planar.tif")),
    ];
    image::GrayImage::from_raw(w32, h32, rgb[..n].to_vec()).unwrap().save(&files[0].1).unwrap();
    let rgba: Vec<u8> = interleaved.chunks(3).flat_map(|p| [p[0], p[1], p[2], 200]).collect();
    image::RgbaImage::from_raw(w32, h32, rgba).unwrap().save(&files[1].1).unwrap();
    let wide: Vec<u16> = interleaved.iter().map(|&v| u16::from(v) * 256 + 3).collect();
    image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_raw(w32, h32, wide).unwrap().save(&files[2].1).unwrap();
    image::RgbImage::from_raw(w32, h32, interleaved.clone()).unwrap().save(&files[3].1).unwrap();
    let block = Block { bands: 3, height: s, width: s, samples: Samples::U8(rgb.clone()) };
    geossl_raster::write_geotiff(&files[4].1, &block, &Default::default()).unwrap();

    for (what, path) in &files {
        for c in [1, 3] {
            let (t, e) = (trainer(path, c), endpoint(path, c, s, s));
            match (&t, &e) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a, b, "{what}, {c}-band model: the two decoders differ");
                    assert_eq!(a.bands, c);
                }
                (Err(a), Err((status, b))) => {
                    assert_eq!(*status, 422, "{what}, {c}-band model: {b}");
                    assert_eq!(unlabelled(a), unlabelled(b), "{what}, {c}-band model: different refusals");
                    assert!(a.contains(&format!("takes {c} band(s)")), "{a}");
                }
                _ => panic!("{what}, {c}-band model: one decodes, the other refuses: {t:?} / {e:?}"),
            }
        }
    }
    // What the policy is: grey decodes for one band only, the others for three; alpha dropped; 16-bit kept.
    assert!(trainer(&files[0].1, 3).is_err() && trainer(&files[0].1, 1).is_ok());
    assert_eq!(trainer(&files[1].1, 3).unwrap().samples, Samples::U8(rgb.clone()), "RGBA: alpha dropped");
    assert!(matches!(trainer(&files[2].1, 3).unwrap().samples, Samples::U16(_)), "16-bit stays 16-bit");
    assert_eq!(trainer(&files[4].1, 3).unwrap(), block, "planar TIFF as written");
    assert!(trainer(&files[3].1, 1).unwrap_err().contains("has 3"));
}
