//! Writing GeoTIFFs that [`crate::Raster`] and GDAL read back exactly: any band count and sample type,
//! band-sequential (planar) strips, deflate, with the georeference, band names (GDAL band descriptions),
//! the GDAL nodata value and the TIFF `DateTime`. The `tiff` crate writes the container; this module only
//! chooses the tags.

use std::io::{BufWriter, Seek, Write};
use std::path::Path;

use tiff::encoder::compression::{CompressionAlgorithm, Deflate};
use tiff::encoder::{DirectoryEncoder, TiffEncoder, TiffKindStandard};
use tiff::tags::Tag;

use crate::{Block, GeoKeyTags, Georef, RasterError, SampleType, Samples};

/// What a GeoTIFF records besides its samples.
#[derive(Debug, Clone, Default)]
pub struct GeoTiffMeta<'a> {
    /// Where pixel (0, 0) lies and the CRS; `None` writes a plain TIFF.
    pub georef: Option<&'a Georef>,
    /// A name per band (GDAL band descriptions), or none.
    pub band_names: &'a [Option<String>],
    pub nodata: Option<f64>,
    /// The TIFF `DateTime` as it reads ("YYYY:MM:DD HH:MM:SS").
    pub datetime: Option<&'a str>,
}

fn sample_format(t: SampleType) -> (u16, u16) {
    match t {
        SampleType::U8 => (1, 8),
        SampleType::I8 => (2, 8),
        SampleType::U16 => (1, 16),
        SampleType::I16 => (2, 16),
        SampleType::U32 => (1, 32),
        SampleType::I32 => (2, 32),
        SampleType::F32 => (3, 32),
        SampleType::F64 => (3, 64),
    }
}

/// GDAL's band descriptions as its `GDAL_METADATA` XML.
fn gdal_metadata(names: &[Option<String>]) -> Option<String> {
    let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;");
    let items: String = names
        .iter()
        .enumerate()
        .filter_map(|(i, n)| {
            n.as_ref()
                .map(|n| format!("<Item name=\"DESCRIPTION\" sample=\"{i}\" role=\"description\">{}</Item>", esc(n)))
        })
        .collect();
    (!items.is_empty()).then(|| format!("<GDALMetadata>{items}</GDALMetadata>"))
}

/// The GeoKey tags of `g`: as read from its file (PixelIsPoint turned into PixelIsArea, since the
/// transform written is for pixel corners), or made from its EPSG code.
fn geokeys(g: &Georef) -> Result<GeoKeyTags, String> {
    if let Some(k) = &g.keys {
        let mut directory = k.directory.clone();
        for e in directory.chunks_exact_mut(4).skip(1) {
            if e[0] == 1025 && e[1] == 0 {
                e[3] = 1;
            }
        }
        return Ok(GeoKeyTags { directory, ..k.clone() });
    }
    if g.proj4.is_some() {
        return Err("a georeference defined by a PROJ.4 string only cannot be written as GeoKeys".into());
    }
    let code = u16::try_from(g.epsg).map_err(|_| format!("EPSG:{} does not fit a GeoKey", g.epsg))?;
    // GTModelType (1 projected, 2 geographic), GTRasterType PixelIsArea, then the CRS key.
    let (model, key) = if g.epsg == 4326 { (2, 2048) } else { (1, 3072) };
    Ok(GeoKeyTags {
        directory: vec![1, 1, 0, 3, 1024, 0, 1, model, 1025, 0, 1, 1, key, 0, 1, code],
        doubles: Vec::new(),
        ascii: None,
    })
}

fn write_tags<W: Write + Seek>(
    dir: &mut DirectoryEncoder<'_, W, TiffKindStandard>,
    block: &Block,
    meta: &GeoTiffMeta,
    strips: &[(u64, u64)],
) -> Result<(), String> {
    let e = |e: tiff::TiffError| e.to_string();
    let n = block.bands;
    let (format, bits) = sample_format(block.samples.sample_type());
    let rgb = n == 3 && block.samples.sample_type() == SampleType::U8;
    dir.write_tag(Tag::ImageWidth, block.width as u32).map_err(e)?;
    dir.write_tag(Tag::ImageLength, block.height as u32).map_err(e)?;
    dir.write_tag(Tag::BitsPerSample, &vec![bits; n][..]).map_err(e)?;
    dir.write_tag(Tag::Compression, 8u16).map_err(e)?; // deflate
    dir.write_tag(Tag::PhotometricInterpretation, if rgb { 2u16 } else { 1u16 }).map_err(e)?;
    dir.write_tag(Tag::StripOffsets, &strips.iter().map(|s| s.0 as u32).collect::<Vec<_>>()[..]).map_err(e)?;
    dir.write_tag(Tag::SamplesPerPixel, n as u16).map_err(e)?;
    dir.write_tag(Tag::RowsPerStrip, block.height as u32).map_err(e)?;
    dir.write_tag(Tag::StripByteCounts, &strips.iter().map(|s| s.1 as u32).collect::<Vec<_>>()[..]).map_err(e)?;
    dir.write_tag(Tag::PlanarConfiguration, 2u16).map_err(e)?;
    let colour = if rgb { 3 } else { 1 };
    if n > colour {
        // Bands beyond the photometric's are unspecified data (not alpha).
        dir.write_tag(Tag::ExtraSamples, &vec![0u16; n - colour][..]).map_err(e)?;
    }
    dir.write_tag(Tag::SampleFormat, &vec![format; n][..]).map_err(e)?;
    if let Some(d) = meta.datetime {
        dir.write_tag(Tag::DateTime, d).map_err(e)?;
    }
    if let Some(g) = meta.georef {
        let t = &g.transform;
        if t[2] == 0.0 && t[4] == 0.0 {
            dir.write_tag(Tag::ModelPixelScaleTag, &[t[1], -t[5], 0.0][..]).map_err(e)?;
            dir.write_tag(Tag::ModelTiepointTag, &[0.0, 0.0, 0.0, t[0], t[3], 0.0][..]).map_err(e)?;
        } else {
            let m = [t[1], t[2], 0.0, t[0], t[4], t[5], 0.0, t[3], 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0];
            dir.write_tag(Tag::ModelTransformationTag, &m[..]).map_err(e)?;
        }
        let keys = geokeys(g)?;
        dir.write_tag(Tag::GeoKeyDirectoryTag, &keys.directory[..]).map_err(e)?;
        if !keys.doubles.is_empty() {
            dir.write_tag(Tag::GeoDoubleParamsTag, &keys.doubles[..]).map_err(e)?;
        }
        if let Some(a) = &keys.ascii {
            dir.write_tag(Tag::GeoAsciiParamsTag, a.as_str()).map_err(e)?;
        }
    }
    if let Some(xml) = gdal_metadata(meta.band_names) {
        dir.write_tag(Tag::Unknown(42112), xml.as_str()).map_err(e)?;
    }
    if let Some(v) = meta.nodata {
        dir.write_tag(Tag::GdalNodata, format!("{v}").as_str()).map_err(e)?;
    }
    Ok(())
}

/// Native-endian bytes of samples `range` (one band's plane).
fn plane_bytes(s: &Samples, range: std::ops::Range<usize>) -> Vec<u8> {
    macro_rules! bytes {
        ($($v:ident),*) => {
            match s {
                $(Samples::$v(v) => v[range].iter().flat_map(|x| x.to_ne_bytes()).collect(),)*
            }
        };
    }
    bytes!(U8, I8, U16, I16, U32, I32, F32, F64)
}

/// Writes `block` as a GeoTIFF at `path`, atomically (a temporary file beside it, renamed when complete):
/// one deflated strip per band, the tags of `meta`.
pub fn write_geotiff(path: &Path, block: &Block, meta: &GeoTiffMeta) -> Result<(), RasterError> {
    let file = path.display().to_string();
    let fail = |message: String| RasterError::Write { file: file.clone(), message };
    let plane = block.width * block.height;
    if block.bands == 0 || plane == 0 || block.samples.len() != block.bands * plane {
        return Err(fail(format!(
            "{} samples for {} band(s) of {}×{}",
            block.samples.len(),
            block.bands,
            block.width,
            block.height
        )));
    }
    if !meta.band_names.is_empty() && meta.band_names.len() != block.bands {
        return Err(fail(format!("{} band names for {} bands", meta.band_names.len(), block.bands)));
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> Result<(), String> {
        let f = std::fs::File::create(&tmp).map_err(|e| e.to_string())?;
        let mut enc = TiffEncoder::new(BufWriter::new(f)).map_err(|e| e.to_string())?;
        let mut dir = enc.image_directory().map_err(|e| e.to_string())?;
        let mut strips = Vec::with_capacity(block.bands);
        for b in 0..block.bands {
            let mut z = Vec::new();
            Deflate::default()
                .write_to(&mut z, &plane_bytes(&block.samples, b * plane..(b + 1) * plane))
                .map_err(|e| e.to_string())?;
            let at = dir.write_data(&z[..]).map_err(|e| e.to_string())?;
            strips.push((at, z.len() as u64));
        }
        write_tags(&mut dir, block, meta, &strips)?;
        dir.finish().map_err(|e| e.to_string())?;
        drop(enc);
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, path).map_err(|e| e.to_string())
    };
    write().map_err(|m| {
        let _ = std::fs::remove_file(&tmp);
        fail(m)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Raster;

    #[test]
    fn what_is_written_reads_back_the_same() {
        let d = tempfile::tempdir().unwrap();
        let (w, h, n) = (7usize, 5usize, 4usize);
        let px: Vec<u16> = (0..w * h * n).map(|i| (i * 7919 % 65521) as u16).collect();
        let block = Block { bands: n, height: h, width: w, samples: Samples::U16(px) };
        let g = Georef::north_up([0.0; 2], [500_000.0, 5_000_000.0], [10.0, 10.0], 32633);
        let names: Vec<Option<String>> = vec![Some("B02".into()), Some("B03".into()), None, Some("B<8>&".into())];
        let p = d.path().join("c.tif");
        let meta = GeoTiffMeta {
            georef: Some(&g),
            band_names: &names,
            nodata: Some(0.0),
            datetime: Some("2020:05:18 10:00:00"),
        };
        write_geotiff(&p, &block, &meta).unwrap();
        let mut r = Raster::open(&p).unwrap();
        let i = r.info().clone();
        assert_eq!((i.width, i.height, i.bands, i.sample_type, i.planar), (w, h, n, SampleType::U16, true));
        assert_eq!(i.band_names, names);
        assert_eq!(i.nodata, Some(0.0));
        assert!(!i.alpha);
        assert_eq!(i.datetime.as_deref(), Some("2020:05:18 10:00:00"));
        assert_eq!(r.read_all().unwrap(), block);
        let back = r.georef().unwrap();
        assert!(back.same_grid(&g), "{back:?}");
        // Float samples, no georeference, a rotated transform.
        let f = Block { bands: 1, height: 2, width: 2, samples: Samples::F32(vec![0.5, -1.0, f32::MAX, 3.0]) };
        let rot = Georef { transform: [10.0, 1.0, 0.5, 20.0, 0.5, -1.0], ..g.clone() };
        let q = d.path().join("f.tif");
        write_geotiff(&q, &f, &GeoTiffMeta { georef: Some(&rot), ..Default::default() }).unwrap();
        let mut r = Raster::open(&q).unwrap();
        assert_eq!(r.read_all().unwrap(), f);
        assert!(r.georef().unwrap().same_grid(&rot));
        write_geotiff(&q, &f, &GeoTiffMeta::default()).unwrap();
        assert!(Raster::open(&q).unwrap().georef().is_err());
        // Wrong sizes are refused and leave nothing behind.
        let bad = Block { bands: 2, ..f.clone() };
        assert!(write_geotiff(&d.path().join("bad.tif"), &bad, &GeoTiffMeta::default()).is_err());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2);
    }
}
