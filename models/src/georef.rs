//! Georeferencing of north-up rasters: pixel → map coordinates (GeoTIFF
//! tiepoint + pixel scale) → WGS84 latitude/longitude, for EPSG:4326,
//! EPSG:3857 and UTM zones on WGS84 (EPSG:326xx north, 327xx south).

use serde::{Deserialize, Serialize};

/// An affine north-up georeference.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Georef {
    /// Raster pixel (i, j) of the tiepoint.
    pub tie_pixel: [f64; 2],
    /// Map coordinates (x, y) of the tiepoint.
    pub tie_map: [f64; 2],
    /// Pixel size (x, y), both positive for north-up rasters.
    pub scale: [f64; 2],
    pub epsg: u32,
}

const WGS84_A: f64 = 6_378_137.0;
const WGS84_F: f64 = 1.0 / 298.257_223_563;

impl Georef {
    /// Whether [`Georef::to_latlon`] can convert this CRS.
    pub fn check_supported(&self) -> Result<(), String> {
        match self.epsg {
            4326 | 3857 | 32601..=32660 | 32701..=32760 => Ok(()),
            e => Err(format!("EPSG:{e} is not supported (supported: 4326, 3857, UTM 326xx/327xx)")),
        }
    }

    /// Map coordinates of pixel position `(px, py)` (pixel corners at integers; centres at +0.5).
    pub fn pixel_to_map(&self, px: f64, py: f64) -> (f64, f64) {
        (
            self.tie_map[0] + (px - self.tie_pixel[0]) * self.scale[0],
            self.tie_map[1] - (py - self.tie_pixel[1]) * self.scale[1],
        )
    }

    /// WGS84 (lat, lon) in degrees of pixel position `(px, py)`.
    pub fn to_latlon(&self, px: f64, py: f64) -> Result<(f64, f64), String> {
        let (x, y) = self.pixel_to_map(px, py);
        match self.epsg {
            4326 => Ok((y, x)),
            3857 => Ok((
                (2.0 * (y / WGS84_A).exp().atan() - std::f64::consts::FRAC_PI_2).to_degrees(),
                (x / WGS84_A).to_degrees(),
            )),
            e @ 32601..=32660 => Ok(utm_to_latlon(x, y, e - 32600, true)),
            e @ 32701..=32760 => Ok(utm_to_latlon(x, y, e - 32700, false)),
            _ => self.check_supported().map(|_| (f64::NAN, f64::NAN)),
        }
    }
}

/// Reads the georeference of a GeoTIFF (ModelTiepoint, ModelPixelScale, EPSG
/// from the GeoKey directory). `name` labels errors.
pub fn georef_from_tiff<R: std::io::Read + std::io::Seek>(r: R, name: &str) -> Result<Georef, String> {
    use tiff::decoder::Decoder;
    use tiff::tags::Tag;
    let err = |m: String| format!("{name}: {m}");
    let mut d = Decoder::new(r).map_err(|e| err(format!("not a TIFF: {e}")))?;
    let tie =
        d.get_tag_f64_vec(Tag::ModelTiepointTag).map_err(|_| err("no ModelTiepoint tag: not georeferenced".into()))?;
    let scale = d
        .get_tag_f64_vec(Tag::ModelPixelScaleTag)
        .map_err(|_| err("no ModelPixelScale tag: not georeferenced".into()))?;
    let keys = d.get_tag_u16_vec(Tag::GeoKeyDirectoryTag).map_err(|_| err("no GeoKeyDirectory tag".into()))?;
    if tie.len() < 6 || scale.len() < 2 {
        return Err(err("malformed tiepoint or pixel scale".into()));
    }
    // Key entries are (id, location, count, value) after a 4-value header.
    let key = |id: u16| keys.chunks_exact(4).skip(1).find(|k| k[0] == id && k[1] == 0).map(|k| k[3] as u32);
    let epsg = key(3072).or_else(|| key(2048)).ok_or_else(|| err("GeoKey directory has no EPSG code".into()))?;
    let g = Georef { tie_pixel: [tie[0], tie[1]], tie_map: [tie[3], tie[4]], scale: [scale[0], scale[1]], epsg };
    g.check_supported().map_err(err)?;
    Ok(g)
}

/// [`georef_from_tiff`] of a file.
pub fn read_georef(path: &std::path::Path) -> Result<Georef, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    georef_from_tiff(std::io::BufReader::new(f), &path.display().to_string())
}

/// Inverse transverse Mercator (Snyder 1987, eqs. 8-18 ff.), WGS84 ellipsoid.
pub fn utm_to_latlon(easting: f64, northing: f64, zone: u32, north: bool) -> (f64, f64) {
    let k0 = 0.9996;
    let e2 = WGS84_F * (2.0 - WGS84_F);
    let ep2 = e2 / (1.0 - e2);
    let x = easting - 500_000.0;
    let y = if north { northing } else { northing - 10_000_000.0 };
    let m = y / k0;
    let mu = m / (WGS84_A * (1.0 - e2 / 4.0 - 3.0 * e2 * e2 / 64.0 - 5.0 * e2.powi(3) / 256.0));
    let e1 = (1.0 - (1.0 - e2).sqrt()) / (1.0 + (1.0 - e2).sqrt());
    let phi1 = mu
        + (3.0 * e1 / 2.0 - 27.0 * e1.powi(3) / 32.0) * (2.0 * mu).sin()
        + (21.0 * e1 * e1 / 16.0 - 55.0 * e1.powi(4) / 32.0) * (4.0 * mu).sin()
        + (151.0 * e1.powi(3) / 96.0) * (6.0 * mu).sin()
        + (1097.0 * e1.powi(4) / 512.0) * (8.0 * mu).sin();
    let (s, c, t) = (phi1.sin(), phi1.cos(), phi1.tan());
    let n1 = WGS84_A / (1.0 - e2 * s * s).sqrt();
    let t1 = t * t;
    let c1 = ep2 * c * c;
    let r1 = WGS84_A * (1.0 - e2) / (1.0 - e2 * s * s).powf(1.5);
    let d = x / (n1 * k0);
    let lat = phi1
        - (n1 * t / r1)
            * (d * d / 2.0 - (5.0 + 3.0 * t1 + 10.0 * c1 - 4.0 * c1 * c1 - 9.0 * ep2) * d.powi(4) / 24.0
                + (61.0 + 90.0 * t1 + 298.0 * c1 + 45.0 * t1 * t1 - 252.0 * ep2 - 3.0 * c1 * c1) * d.powi(6) / 720.0);
    let lon0 = (zone as f64 - 1.0) * 6.0 - 180.0 + 3.0;
    let lon = lon0.to_radians()
        + (d - (1.0 + 2.0 * t1 + c1) * d.powi(3) / 6.0
            + (5.0 - 2.0 * c1 + 28.0 * t1 - 3.0 * c1 * c1 + 8.0 * ep2 + 24.0 * t1 * t1) * d.powi(5) / 120.0)
            / c;
    (lat.to_degrees(), lon.to_degrees())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utm_inverse_matches_known_points() {
        // Central meridian on the equator.
        let (lat, lon) = utm_to_latlon(500_000.0, 0.0, 31, true);
        assert!(lat.abs() < 1e-9 && (lon - 3.0).abs() < 1e-9);
        // Reference point: 48.8566 N 2.3522 E (Paris) ≈ E 452 484, N 5 411 718, zone 31N.
        let (lat, lon) = utm_to_latlon(452_484.0, 5_411_718.0, 31, true);
        assert!((lat - 48.8566).abs() < 1e-4 && (lon - 2.3522).abs() < 1e-4, "{lat} {lon}");
        // Southern hemisphere: 33.8688 S 151.2093 E (Sydney) ≈ E 334 369, N 6 250 948, zone 56S.
        let (lat, lon) = utm_to_latlon(334_369.0, 6_250_948.0, 56, false);
        assert!((lat + 33.8688).abs() < 1e-4 && (lon - 151.2093).abs() < 1e-4, "{lat} {lon}");
    }

    #[test]
    fn unsupported_crs_is_named() {
        let g = Georef { tie_pixel: [0.0; 2], tie_map: [0.0; 2], scale: [1.0; 2], epsg: 2154 };
        assert!(g.to_latlon(0.0, 0.0).unwrap_err().contains("EPSG:2154"));
    }
}
