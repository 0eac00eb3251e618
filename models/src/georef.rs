//! Georeferencing of rasters: pixel → map coordinates (GeoTIFF ModelTiepoint +
//! ModelPixelScale, or ModelTransformation, with PixelIsArea/PixelIsPoint) →
//! WGS84 latitude/longitude through `proj4rs` (pure Rust PROJ.4) and the EPSG
//! definitions of `crs-definitions`: UTM north and south, national grids
//! (EPSG:2154, 27700, 3035, …), polar stereographic (3031, 3413), Web Mercator.
//! An EPSG code without a definition is an error naming it and the file.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use proj4rs::proj::Proj;
use serde::{Deserialize, Serialize};

/// An affine georeference: map `x = t[0] + px·t[1] + py·t[2]`,
/// `y = t[3] + px·t[4] + py·t[5]` (GDAL's geotransform), pixel corners at
/// integer positions, in the CRS `epsg`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Georef {
    pub transform: [f64; 6],
    pub epsg: u32,
}

/// Projections by EPSG code, built once.
fn projection(epsg: u32) -> Result<Arc<Proj>, String> {
    static CACHE: OnceLock<Mutex<HashMap<u32, Arc<Proj>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut m = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = m.get(&epsg) {
        return Ok(p.clone());
    }
    let code = u16::try_from(epsg).map_err(|_| format!("EPSG:{epsg} is not a known CRS"))?;
    let p = Arc::new(
        Proj::from_epsg_code(code)
            .map_err(|e| format!("EPSG:{epsg} is not supported (no projection definition: {e})"))?,
    );
    m.insert(epsg, p.clone());
    Ok(p)
}

impl Georef {
    /// A north-up georeference from a tiepoint (pixel `tie_pixel` at map `tie_map`) and pixel size.
    pub fn north_up(tie_pixel: [f64; 2], tie_map: [f64; 2], scale: [f64; 2], epsg: u32) -> Self {
        let x0 = tie_map[0] - tie_pixel[0] * scale[0];
        let y0 = tie_map[1] + tie_pixel[1] * scale[1];
        Georef { transform: [x0, scale[0], 0.0, y0, 0.0, -scale[1]], epsg }
    }

    /// Whether [`Georef::to_latlon`] can convert this CRS; the error names the EPSG code.
    pub fn check_supported(&self) -> Result<(), String> {
        if self.epsg == 4326 {
            return Ok(());
        }
        projection(self.epsg).map(|_| ())
    }

    /// Map coordinates of pixel position `(px, py)` (pixel corners at integers; centres at +0.5).
    pub fn pixel_to_map(&self, px: f64, py: f64) -> (f64, f64) {
        let t = &self.transform;
        (t[0] + px * t[1] + py * t[2], t[3] + px * t[4] + py * t[5])
    }

    /// WGS84 (lat, lon) in degrees of pixel position `(px, py)`.
    pub fn to_latlon(&self, px: f64, py: f64) -> Result<(f64, f64), String> {
        let (x, y) = self.pixel_to_map(px, py);
        if self.epsg == 4326 {
            return Ok((y, x));
        }
        let src = projection(self.epsg)?;
        let dst = projection(4326)?;
        let mut p = (x, y, 0.0);
        proj4rs::transform::transform(&src, &dst, &mut p)
            .map_err(|e| format!("EPSG:{} → WGS84 failed at ({x}, {y}): {e}", self.epsg))?;
        Ok((p.1.to_degrees(), p.0.to_degrees()))
    }
}

/// Reads the georeference of a GeoTIFF (ModelTransformation, or ModelTiepoint +
/// ModelPixelScale; PixelIsPoint rasters shifted by half a pixel; the EPSG code
/// from the GeoKey directory). `name` labels errors.
pub fn georef_from_tiff<R: std::io::Read + std::io::Seek>(r: R, name: &str) -> Result<Georef, String> {
    use tiff::decoder::Decoder;
    use tiff::tags::Tag;
    let err = |m: String| format!("{name}: {m}");
    let mut d = Decoder::new(r).map_err(|e| err(format!("not a TIFF: {e}")))?;
    let keys = d
        .get_tag_u16_vec(Tag::GeoKeyDirectoryTag)
        .map_err(|_| err("no GeoKeyDirectory tag: not georeferenced".into()))?;
    // Key entries are (id, location, count, value) after a 4-value header.
    let key = |id: u16| keys.chunks_exact(4).skip(1).find(|k| k[0] == id && k[1] == 0).map(|k| k[3] as u32);
    let epsg = key(3072).or_else(|| key(2048)).ok_or_else(|| err("GeoKey directory has no EPSG code".into()))?;
    if epsg == 32767 {
        return Err(err("a user-defined CRS (no EPSG code) is not supported".into()));
    }
    let mut g = if let Ok(m) = d.get_tag_f64_vec(Tag::ModelTransformationTag) {
        if m.len() < 16 {
            return Err(err("malformed ModelTransformation".into()));
        }
        Georef { transform: [m[3], m[0], m[1], m[7], m[4], m[5]], epsg }
    } else {
        let tie = d
            .get_tag_f64_vec(Tag::ModelTiepointTag)
            .map_err(|_| err("no ModelTiepoint or ModelTransformation tag: not georeferenced".into()))?;
        let scale = d
            .get_tag_f64_vec(Tag::ModelPixelScaleTag)
            .map_err(|_| err("no ModelPixelScale tag: not georeferenced".into()))?;
        if tie.len() < 6 || scale.len() < 2 {
            return Err(err("malformed tiepoint or pixel scale".into()));
        }
        Georef::north_up([tie[0], tie[1]], [tie[3], tie[4]], [scale[0], scale[1]], epsg)
    };
    // GTRasterTypeGeoKey 2 = PixelIsPoint: the georeference names pixel centres.
    if key(1025) == Some(2) {
        let (x, y) = g.pixel_to_map(-0.5, -0.5);
        g.transform[0] = x;
        g.transform[3] = y;
    }
    g.check_supported().map_err(err)?;
    Ok(g)
}

/// [`georef_from_tiff`] of a file.
pub fn read_georef(path: &std::path::Path) -> Result<Georef, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    georef_from_tiff(std::io::BufReader::new(f), &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utm_and_web_mercator_match_known_points() {
        // Central meridian on the equator.
        let g = |e: f64, n: f64, epsg| Georef::north_up([0.0; 2], [e, n], [1.0; 2], epsg).to_latlon(0.0, 0.0).unwrap();
        let (lat, lon) = g(500_000.0, 0.0, 32631);
        assert!(lat.abs() < 1e-9 && (lon - 3.0).abs() < 1e-9, "{lat} {lon}");
        // 48.8566 N 2.3522 E (Paris) ≈ E 452 484, N 5 411 718, zone 31N.
        let (lat, lon) = g(452_484.0, 5_411_718.0, 32631);
        assert!((lat - 48.8566).abs() < 1e-4 && (lon - 2.3522).abs() < 1e-4, "{lat} {lon}");
        // 33.8688 S 151.2093 E (Sydney) ≈ E 334 369, N 6 250 948, zone 56S.
        let (lat, lon) = g(334_369.0, 6_250_948.0, 32756);
        assert!((lat + 33.8688).abs() < 1e-4 && (lon - 151.2093).abs() < 1e-4, "{lat} {lon}");
        // Web Mercator: x = R·λ.
        let (lat, lon) = g(6_378_137.0 * 10f64.to_radians(), 0.0, 3857);
        assert!(lat.abs() < 1e-9 && (lon - 10.0).abs() < 1e-9, "{lat} {lon}");
    }

    #[test]
    fn unknown_crs_is_named() {
        let g = Georef::north_up([0.0; 2], [0.0; 2], [1.0; 2], 999_999);
        assert!(g.to_latlon(0.0, 0.0).unwrap_err().contains("EPSG:999999"));
        assert!(g.check_supported().unwrap_err().contains("EPSG:999999"));
    }
}
