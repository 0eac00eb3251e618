//! GeoTIFF georeferencing against the centres published with the test data (tests/fixtures/README.md, scripts/data.py)
//! (computed independently from each file's tiepoint, pixel scale and CRS).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use geossl_trainer::chips::{read_georef, tile_scene, TileOptions};

#[test]
fn scene_centres_match_the_published_ones() {
    for (file, w, h, lat, lon) in [
        ("rasterio/RGB.byte.tif", 791.0, 718.0, 24.56158, -77.75791), // EPSG:32618
        ("rasterio/cogeo.tif", 1024.0, 1024.0, 37.66860, 128.65814),  // EPSG:3857
        ("spacenet/sample_geotiff.tif", 900.0, 900.0, 33.63840, -84.47894), // EPSG:32616
        ("spacenet/road_mask_input.tif", 1300.0, 1300.0, 36.14058, -115.23205), // EPSG:4326
        ("spacenet/ms1.tif", 300.0, 300.0, 51.87052, 4.35693),        // EPSG:32631
    ] {
        let g = read_georef(&geossl_tests::data::file(file)).unwrap();
        let (a, b) = g.to_latlon(w / 2.0, h / 2.0).unwrap();
        assert!((a - lat).abs() < 2e-5 && (b - lon).abs() < 2e-5, "{file}: {a:.6},{b:.6} vs {lat},{lon}");
    }
    let e = read_georef(&geossl_tests::data::file("spacenet/sample_fp_mask.tif")).unwrap_err().to_string();
    assert!(e.contains("sample_fp_mask.tif") && e.contains("not georeferenced"), "{e}");
}

#[test]
fn tiling_writes_georeferenced_chips_and_drops_nodata() {
    let data = geossl_tests::data::fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let opt = TileOptions { size: 64, stride: 64, timestamp: Some("2000-01-01".into()), ..Default::default() };
    let chips = tile_scene(&data.join("rasterio/RGB.byte.tif"), tmp.path(), &opt).unwrap();
    // The scene is a rotated footprint in a nodata frame: corner chips are dropped.
    let all = (791 / 64) * (718 / 64);
    assert!(chips.len() > 20 && chips.len() < all, "{} of {all}", chips.len());
    for c in &chips {
        let img = image::open(&c.path).unwrap();
        assert_eq!((img.width(), img.height()), (64, 64));
        assert!((c.lat - 24.56).abs() < 1.2 && (c.lon + 77.76).abs() < 1.2, "{c:?}");
    }
    let ids: std::collections::HashSet<_> = chips.iter().map(|c| &c.location_id).collect();
    assert_eq!(ids.len(), chips.len(), "one location per window");
    // The same scene tiled again (another "date") gives the same location ids.
    let again = tile_scene(&data.join("rasterio/RGB.byte.tif"), &tmp.path().join("b"), &opt).unwrap();
    assert_eq!(
        again.iter().map(|c| &c.location_id).collect::<Vec<_>>(),
        chips.iter().map(|c| &c.location_id).collect::<Vec<_>>()
    );
}
