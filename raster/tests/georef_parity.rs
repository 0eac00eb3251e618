#![allow(clippy::unwrap_used)]
//! Georeferencing agrees with GDAL + PROJ (rasterio and pyproj in the venv) to
//! under a metre for GeoTIFFs written here from real pixels in the projections
//! archives use: Lambert-93, the British National Grid, LAEA Europe, both polar
//! stereographics, UTM south, Web Mercator, a rotated raster (ModelTransformation)
//! and a PixelIsPoint raster. A CRS without a definition is refused by code and file.

use std::process::Command;

use geossl_raster::read_georef;
use geossl_tests::{python, text, workspace};

#[test]
fn pixel_positions_agree_with_pyproj_within_a_metre() {
    let d = tempfile::tempdir().unwrap();
    let o = Command::new(python())
        .arg(workspace().join("scripts/reference/georef_cases.py"))
        .arg(geossl_tests::data::fixtures().join("rasterio/RGB.byte.tif"))
        .arg(d.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let cases: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let cases = cases.as_array().unwrap();
    assert_eq!(cases.len(), 9);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let g = read_georef(std::path::Path::new(case["file"].as_str().unwrap())).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(u64::from(g.epsg), case["epsg"].as_u64().unwrap(), "{name}");
        for p in case["points"].as_array().unwrap() {
            let (px, py) = (p["pixel"][0].as_f64().unwrap(), p["pixel"][1].as_f64().unwrap());
            let (lat, lon) = g.to_latlon(px, py).unwrap();
            let (want_lat, want_lon) = (p["lat"].as_f64().unwrap(), p["lon"].as_f64().unwrap());
            // Metres on the WGS84 sphere of mean radius: small differences only.
            let r = 6_371_008.8;
            let dy = (lat - want_lat).to_radians() * r;
            let dx = (lon - want_lon).to_radians() * r * want_lat.to_radians().cos();
            let m = dx.hypot(dy);
            assert!(m < 1.0, "{name} pixel ({px}, {py}): {lat}, {lon} vs pyproj {want_lat}, {want_lon}: {m:.3} m");
        }
    }
}

#[test]
fn unknown_crs_is_named_with_the_file() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("odd.tif");
    // EPSG:9822 (RGF93 v2 / CC42, a French conic zone) is known to PROJ but has no definition here.
    let script = format!(
        "import rasterio; from affine import Affine; import numpy as np\n\
         with rasterio.open({:?}, 'w', driver='GTiff', width=4, height=4, count=1, dtype='uint8', \
         crs='EPSG:9822', transform=Affine.translation(1.7e6, 1.2e6) * Affine.scale(10, -10)) as d:\n    \
         d.write(np.zeros((1, 4, 4), 'uint8'))",
        f.display().to_string()
    );
    let o = Command::new(python()).args(["-c", &script]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let e = read_georef(&f).unwrap_err().to_string();
    assert!(e.contains("odd.tif") && e.contains("EPSG:9822"), "{e}");
}
