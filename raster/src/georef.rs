//! Georeferencing of rasters: pixel → map coordinates (GeoTIFF ModelTiepoint +
//! ModelPixelScale, or ModelTransformation, with PixelIsArea/PixelIsPoint) →
//! WGS84 latitude/longitude through `proj4rs` (pure Rust PROJ.4) and the EPSG
//! definitions of `crs-definitions`: UTM north and south, national grids
//! (EPSG:2154, 27700, 3035, …), polar stereographic (3031, 3413), Web Mercator.
//! GeoTIFFs with a user-defined projection (GeoKeys with parameters instead of an
//! EPSG code, as older GIS exports write) get a PROJ.4 string built from those
//! keys for the common methods (transverse Mercator, Lambert conformal conic,
//! Albers, Lambert azimuthal, polar stereographic, Mercator). An EPSG code without
//! a definition, or a method outside these, is an error naming it and the file.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use proj4rs::proj::Proj;
use serde::{Deserialize, Serialize};

/// An affine georeference: map `x = t[0] + px·t[1] + py·t[2]`,
/// `y = t[3] + px·t[4] + py·t[5]` (GDAL's geotransform), pixel corners at
/// integer positions, in the CRS `epsg`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Georef {
    pub transform: [f64; 6],
    /// EPSG code of the CRS (32767 when the file defines its own projection).
    pub epsg: u32,
    /// The projection as a PROJ.4 string when the file defines its own (user-defined GeoKeys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proj4: Option<String>,
    /// The GeoKey tags it was read from, written again as they were by [`crate::write_geotiff`] (so a
    /// user-defined projection survives); `None` for a georeference made in code.
    #[serde(skip)]
    pub keys: Option<GeoKeyTags>,
}

/// A GeoTIFF's GeoKey directory and its parameter tags, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct GeoKeyTags {
    pub directory: Vec<u16>,
    pub doubles: Vec<f64>,
    pub ascii: Option<String>,
}

geossl_models::message_error!(
    /// A georeference that cannot be read or used (the tags are missing or malformed, the CRS has no
    /// definition, a transform fails); the message says which.
    GeorefError
);

/// Projections by PROJ.4 string, built once.
fn projection_of(def: &str) -> Result<Arc<Proj>, GeorefError> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<Proj>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut m = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = m.get(def) {
        return Ok(p.clone());
    }
    let p = Arc::new(
        Proj::from_proj_string(def)
            .map_err(|e| GeorefError::from(format!("projection `{def}` is not supported: {e}")))?,
    );
    m.insert(def.to_string(), p.clone());
    Ok(p)
}

/// Projections by EPSG code, built once.
fn projection(epsg: u32) -> Result<Arc<Proj>, GeorefError> {
    static CACHE: OnceLock<Mutex<HashMap<u32, Arc<Proj>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut m = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = m.get(&epsg) {
        return Ok(p.clone());
    }
    let code = u16::try_from(epsg).map_err(|_| GeorefError::from(format!("EPSG:{epsg} is not a known CRS")))?;
    let p = Arc::new(
        Proj::from_epsg_code(code)
            .map_err(|e| GeorefError::from(format!("EPSG:{epsg} is not supported (no projection definition: {e})")))?,
    );
    m.insert(epsg, p.clone());
    Ok(p)
}

impl Georef {
    /// A north-up georeference from a tiepoint (pixel `tie_pixel` at map `tie_map`) and pixel size.
    pub fn north_up(tie_pixel: [f64; 2], tie_map: [f64; 2], scale: [f64; 2], epsg: u32) -> Self {
        let x0 = tie_map[0] - tie_pixel[0] * scale[0];
        let y0 = tie_map[1] + tie_pixel[1] * scale[1];
        Georef { transform: [x0, scale[0], 0.0, y0, 0.0, -scale[1]], epsg, proj4: None, keys: None }
    }

    fn source(&self) -> Result<Arc<Proj>, GeorefError> {
        match &self.proj4 {
            Some(def) => projection_of(def),
            None => projection(self.epsg),
        }
    }

    /// Whether [`Georef::to_latlon`] can convert this CRS; the error names the EPSG code.
    pub fn check_supported(&self) -> Result<(), GeorefError> {
        if self.epsg == 4326 && self.proj4.is_none() {
            return Ok(());
        }
        self.source().map(|_| ())
    }

    /// Whether `other` maps pixels to the same places: same CRS, transforms equal to 1e-9 relative.
    pub fn same_grid(&self, other: &Georef) -> bool {
        self.epsg == other.epsg
            && self.proj4 == other.proj4
            && self.transform.iter().zip(&other.transform).all(|(a, b)| (a - b).abs() <= 1e-9 * a.abs().max(1.0))
    }

    /// Map coordinates of pixel position `(px, py)` (pixel corners at integers; centres at +0.5).
    pub fn pixel_to_map(&self, px: f64, py: f64) -> (f64, f64) {
        let t = &self.transform;
        (t[0] + px * t[1] + py * t[2], t[3] + px * t[4] + py * t[5])
    }

    /// The georeference of a raster cut from this one at pixel `(x, y)` (a chip or window): the same CRS
    /// and pixel size, its origin moved there.
    pub fn window(&self, x: f64, y: f64) -> Georef {
        let (x0, y0) = self.pixel_to_map(x, y);
        let mut g = self.clone();
        g.transform[0] = x0;
        g.transform[3] = y0;
        g
    }

    /// The footprint of the pixel window at `(x, y)` of `w × h`: a closed counter-clockwise ring of
    /// (lon, lat) corners (as GeoParquet and GeoJSON want it for north-up rasters).
    pub fn footprint(&self, x: f64, y: f64, w: f64, h: f64) -> Result<Vec<(f64, f64)>, GeorefError> {
        [(x, y), (x, y + h), (x + w, y + h), (x + w, y), (x, y)]
            .iter()
            .map(|&(px, py)| self.to_latlon(px, py).map(|(lat, lon)| (lon, lat)))
            .collect()
    }

    /// Pixel position `(px, py)` of map coordinates `(x, y)` (the inverse of [`Georef::pixel_to_map`]).
    pub fn map_to_pixel(&self, x: f64, y: f64) -> (f64, f64) {
        let t = &self.transform;
        let det = t[1] * t[5] - t[2] * t[4];
        let (dx, dy) = (x - t[0], y - t[3]);
        ((dx * t[5] - dy * t[2]) / det, (dy * t[1] - dx * t[4]) / det)
    }

    /// Pixel position `(px, py)` of WGS84 `(lat, lon)` in degrees (the inverse of [`Georef::to_latlon`]).
    pub fn from_latlon(&self, lat: f64, lon: f64) -> Result<(f64, f64), GeorefError> {
        if self.epsg == 4326 && self.proj4.is_none() {
            return Ok(self.map_to_pixel(lon, lat));
        }
        let (src, dst) = (projection(4326)?, self.source()?);
        let mut p = (lon.to_radians(), lat.to_radians(), 0.0);
        proj4rs::transform::transform(&src, &dst, &mut p)
            .map_err(|e| GeorefError::from(format!("WGS84 → EPSG:{} failed at ({lat}, {lon}): {e}", self.epsg)))?;
        Ok(self.map_to_pixel(p.0, p.1))
    }

    /// WGS84 (lat, lon) in degrees of pixel position `(px, py)`.
    pub fn to_latlon(&self, px: f64, py: f64) -> Result<(f64, f64), GeorefError> {
        let (x, y) = self.pixel_to_map(px, py);
        if self.epsg == 4326 && self.proj4.is_none() {
            return Ok((y, x));
        }
        let src = self.source()?;
        let dst = projection(4326)?;
        let mut p = (x, y, 0.0);
        proj4rs::transform::transform(&src, &dst, &mut p)
            .map_err(|e| GeorefError::from(format!("EPSG:{} → WGS84 failed at ({x}, {y}): {e}", self.epsg)))?;
        Ok((p.1.to_degrees(), p.0.to_degrees()))
    }
}

/// The georeference in the GeoTIFF tags of an opened decoder (ModelTransformation, or ModelTiepoint +
/// ModelPixelScale; PixelIsPoint rasters shifted by half a pixel; the EPSG code from the GeoKey
/// directory), read with the rest of the header by [`crate::Raster::new`]. The error says what is missing.
pub(crate) fn from_tags<R: std::io::Read + std::io::Seek>(
    d: &mut tiff::decoder::Decoder<R>,
) -> Result<Georef, GeorefError> {
    use tiff::tags::Tag;
    let keys = d
        .find_tag(Tag::GeoKeyDirectoryTag)
        .ok()
        .flatten()
        .and_then(|v| v.into_u16_vec().ok())
        .ok_or("no GeoKeyDirectory tag: not georeferenced")?;
    let f64s =
        |d: &mut tiff::decoder::Decoder<R>, t: Tag| d.find_tag(t).ok().flatten().and_then(|v| v.into_f64_vec().ok());
    let doubles = f64s(d, Tag::GeoDoubleParamsTag).unwrap_or_default();
    let geokeys = GeoKeys { keys: &keys, doubles: &doubles };
    let key = |id: u16| geokeys.short(id);
    let mut proj4 = None;
    let epsg = match key(3072) {
        Some(32767) => {
            proj4 = Some(geokeys.user_defined_proj4()?);
            32767
        }
        Some(code) => code,
        None => match key(2048) {
            // Geographic with a user-defined datum: latitude/longitude as they are.
            Some(32767) if key(1024) == Some(2) => 4326,
            Some(code) if code != 32767 && key(1024) != Some(1) => code,
            _ => return Err("GeoKey directory has no EPSG code".into()),
        },
    };
    let mut g = if let Some(m) = f64s(d, Tag::ModelTransformationTag) {
        if m.len() < 16 {
            return Err("malformed ModelTransformation".into());
        }
        Georef { transform: [m[3], m[0], m[1], m[7], m[4], m[5]], epsg, proj4: proj4.clone(), keys: None }
    } else {
        let tie =
            f64s(d, Tag::ModelTiepointTag).ok_or("no ModelTiepoint or ModelTransformation tag: not georeferenced")?;
        let scale = f64s(d, Tag::ModelPixelScaleTag).ok_or("no ModelPixelScale tag: not georeferenced")?;
        if tie.len() < 6 || scale.len() < 2 {
            return Err("malformed tiepoint or pixel scale".into());
        }
        Georef {
            proj4: proj4.clone(),
            ..Georef::north_up([tie[0], tie[1]], [tie[3], tie[4]], [scale[0], scale[1]], epsg)
        }
    };
    // GTRasterTypeGeoKey 2 = PixelIsPoint: the georeference names pixel centres.
    if key(1025) == Some(2) {
        let (x, y) = g.pixel_to_map(-0.5, -0.5);
        g.transform[0] = x;
        g.transform[3] = y;
    }
    g.check_supported()?;
    let ascii = d.find_tag(Tag::GeoAsciiParamsTag).ok().flatten().and_then(|v| v.into_string().ok());
    g.keys = Some(GeoKeyTags { directory: keys.clone(), doubles: doubles.clone(), ascii });
    Ok(g)
}

/// The GeoKey directory with its double parameters.
struct GeoKeys<'a> {
    keys: &'a [u16],
    doubles: &'a [f64],
}

impl GeoKeys<'_> {
    /// Key entries are (id, location, count, value) after a 4-value header.
    fn entry(&self, id: u16) -> Option<&[u16]> {
        self.keys.chunks_exact(4).skip(1).find(|k| k[0] == id)
    }

    /// A SHORT key stored in the directory itself.
    fn short(&self, id: u16) -> Option<u32> {
        self.entry(id).filter(|k| k[1] == 0).map(|k| u32::from(k[3]))
    }

    /// A DOUBLE key (stored in GeoDoubleParams).
    fn double(&self, id: u16) -> Option<f64> {
        self.entry(id).filter(|k| k[1] == 34736).and_then(|k| self.doubles.get(usize::from(k[3])).copied())
    }

    fn doubles(&self, id: u16) -> Vec<f64> {
        self.entry(id)
            .filter(|k| k[1] == 34736)
            .and_then(|k| self.doubles.get(usize::from(k[3])..usize::from(k[3]) + usize::from(k[2])))
            .map(<[f64]>::to_vec)
            .unwrap_or_default()
    }

    /// The ellipsoid and datum shift of the geographic CRS, as PROJ.4 parameters.
    fn datum(&self) -> Result<String, GeorefError> {
        let t = self.doubles(2062);
        let towgs84 = if t.is_empty() {
            String::new()
        } else {
            format!(" +towgs84={}", t.iter().map(f64::to_string).collect::<Vec<_>>().join(","))
        };
        // Named geographic CRSs and ellipsoids (EPSG codes) that user-defined projections sit on.
        let named = match (self.short(2048), self.short(2056)) {
            (Some(4326), _) | (_, Some(7030)) => Some("+ellps=WGS84"),
            (Some(4269 | 4258 | 4283 | 4617 | 4619 | 4171), _) | (_, Some(7019)) => Some("+ellps=GRS80"),
            (Some(4267), _) | (_, Some(7008)) => Some("+ellps=clrk66"),
            (Some(4277), _) | (_, Some(7001)) => Some("+ellps=airy"),
            (_, Some(7022)) => Some("+ellps=intl"),
            _ => None,
        };
        if let Some(e) = named {
            return Ok(format!("{e}{towgs84}"));
        }
        let a = self.double(2057).ok_or("a user-defined ellipsoid without a semi-major axis")?;
        match (self.double(2059), self.double(2058)) {
            (Some(rf), _) if rf > 0.0 => Ok(format!("+a={a} +rf={rf}{towgs84}")),
            (_, Some(b)) => Ok(format!("+a={a} +b={b}{towgs84}")),
            _ => Ok(format!("+a={a} +b={a}{towgs84}")),
        }
    }

    /// PROJ.4 string of a user-defined projected CRS (ProjectedCSTypeGeoKey = 32767).
    fn user_defined_proj4(&self) -> Result<String, GeorefError> {
        let p = |id: u16| self.double(id).unwrap_or(0.0);
        // False origin (LCC 2SP), natural origin or centre keys, whichever the file uses.
        let lat0 = self.double(3085).or(self.double(3081)).or(self.double(3089)).unwrap_or(0.0);
        let lon0 = self.double(3084).or(self.double(3080)).or(self.double(3088)).unwrap_or(0.0);
        let x0 = self.double(3086).or(self.double(3082)).or(self.double(3090)).unwrap_or(0.0);
        let y0 = self.double(3087).or(self.double(3083)).or(self.double(3091)).unwrap_or(0.0);
        let k = self.double(3092).or(self.double(3093)).unwrap_or(1.0);
        let method = self.short(3075).ok_or("a user-defined projection without ProjCoordTransGeoKey")?;
        let proj = match method {
            1 => format!("+proj=tmerc +lat_0={lat0} +lon_0={lon0} +k={k} +x_0={x0} +y_0={y0}"),
            7 => format!("+proj=merc +lon_0={lon0} +k={k} +x_0={x0} +y_0={y0}"),
            8 => format!(
                "+proj=lcc +lat_1={} +lat_2={} +lat_0={lat0} +lon_0={lon0} +x_0={x0} +y_0={y0}",
                p(3078),
                p(3079)
            ),
            9 => format!("+proj=lcc +lat_1={lat0} +lat_0={lat0} +lon_0={lon0} +k_0={k} +x_0={x0} +y_0={y0}"),
            10 => format!("+proj=laea +lat_0={lat0} +lon_0={lon0} +x_0={x0} +y_0={y0}"),
            11 => format!(
                "+proj=aea +lat_1={} +lat_2={} +lat_0={lat0} +lon_0={lon0} +x_0={x0} +y_0={y0}",
                p(3078),
                p(3079)
            ),
            15 => {
                let lon = self.double(3095).unwrap_or(lon0);
                let lat_ts = self.double(3078).unwrap_or(lat0);
                let pole = if lat_ts < 0.0 || lat0 < 0.0 { -90 } else { 90 };
                format!("+proj=stere +lat_0={pole} +lat_ts={lat_ts} +lon_0={lon} +k={k} +x_0={x0} +y_0={y0}")
            }
            m => {
                return Err(GeorefError(format!(
                    "user-defined projection method {m} (ProjCoordTransGeoKey) is not supported"
                )))
            }
        };
        let units = match self.short(3076) {
            None | Some(9001) => "+units=m",
            Some(9002) => "+units=ft",
            Some(9003) => "+units=us-ft",
            Some(u) => return Err(GeorefError(format!("linear unit {u} (ProjLinearUnitsGeoKey) is not supported"))),
        };
        Ok(format!("{proj} {} {units} +no_defs", self.datum()?))
    }
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
    fn from_latlon_inverts_to_latlon() {
        // A rotated/sheared transform and a projected CRS, at several pixels.
        let mut g = Georef::north_up([0.0; 2], [452_484.0, 5_411_718.0], [10.0, 12.0], 32631);
        g.transform[2] = 0.5;
        g.transform[4] = -0.25;
        for (px, py) in [(0.0, 0.0), (17.5, 3.25), (1000.0, 800.0)] {
            let (lat, lon) = g.to_latlon(px, py).unwrap();
            let (x, y) = g.from_latlon(lat, lon).unwrap();
            assert!((x - px).abs() < 1e-6 && (y - py).abs() < 1e-6, "({px}, {py}) → ({x}, {y})");
        }
        let w = Georef::north_up([0.0; 2], [10.0, 50.0], [0.01, 0.01], 4326);
        assert_eq!(w.from_latlon(49.5, 10.25).unwrap(), (25.0, 50.0));
    }

    #[test]
    fn unknown_crs_is_named() {
        let g = Georef::north_up([0.0; 2], [0.0; 2], [1.0; 2], 999_999);
        assert!(g.to_latlon(0.0, 0.0).unwrap_err().to_string().contains("EPSG:999999"));
        assert!(g.check_supported().unwrap_err().to_string().contains("EPSG:999999"));
    }
}
