//! GeoTIFF reading for geossl: the one decoder that the trainer, the server and
//! the archive embedder share.
//!
//! - any band count; samples kept as stored (`uint8`, `int8`, `uint16`,
//!   `int16`, `uint32`, `int32`, `float32`, `float64`), never rescaled;
//! - chunky (pixel-interleaved) and planar (band-sequential) layouts, strips
//!   and tiles; the compressions of the `tiff` crate (deflate, LZW, zstd,
//!   PackBits, JPEG — YCbCr-JPEG as GDAL writes it comes out as RGB) with
//!   horizontal and floating-point predictors;
//! - **windowed reads**: [`Raster::read_window`] decodes only the strips or
//!   tiles that a window touches, keeping recently used ones in a bounded cache,
//!   so memory follows the windows, not the scene;
//! - the GDAL nodata tag;
//! - any [`Source`] of bytes: a local file, memory, or a remote object read
//!   by range requests — before decoding a window's strips/tiles, the raster
//!   tells its source which byte ranges it is about to read
//!   ([`Source::will_read`]), so a remote source fetches exactly those, in one
//!   round of requests, and never the whole file.
//!
//! - georeferencing ([`georef`]) from the same header parse: pixel → map →
//!   WGS84 through `proj4rs`.
//!
//! Blocks are planar: `data[band * h * w + y * w + x]`.

use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, Cursor, Read, Seek};
use std::path::Path;
use std::sync::Arc;

use tiff::decoder::{ChunkType, Decoder, DecodingResult, Limits};
use tiff::tags::Tag;

pub use geossl_models::SampleType;

pub mod georef;
pub mod grid;
pub mod image;
pub mod write;
pub use georef::{GeoKeyTags, Georef, GeorefError};
pub use grid::{hilbert_index, nodata_fraction, WindowGrid};
pub use image::{decode_bytes, decode_path, Image, ImageError, ImageErrorKind, Layout, Want};
pub use write::{write_geotiff, GeoTiffMeta};

/// Bytes a [`Raster`] reads from: seekable, and told ahead which byte ranges a
/// window needs (a remote source fetches them together; a local one ignores it).
pub trait Source: Read + Seek {
    /// The byte ranges `[start, end)` about to be read, in file order.
    fn will_read(&mut self, _ranges: &[std::ops::Range<u64>]) -> std::io::Result<()> {
        Ok(())
    }

    /// Byte ranges a later read will need: start fetching them without waiting (errors surface at the read).
    fn prefetch(&mut self, _ranges: &[std::ops::Range<u64>]) {}
}

impl Source for BufReader<std::fs::File> {}
impl Source for std::fs::File {}
impl Source for Cursor<Vec<u8>> {}
impl Source for Cursor<&[u8]> {}
impl<S: Source + ?Sized> Source for Box<S> {
    fn will_read(&mut self, ranges: &[std::ops::Range<u64>]) -> std::io::Result<()> {
        (**self).will_read(ranges)
    }

    fn prefetch(&mut self, ranges: &[std::ops::Range<u64>]) {
        (**self).prefetch(ranges)
    }
}

/// Errors name the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum RasterError {
    #[error("{file}: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: not a readable TIFF: {message}")]
    Decode { file: String, message: String },
    #[error("{file}: {what} is not supported")]
    Unsupported { file: String, what: String },
    #[error("{file}: band {band} does not exist (the file has {bands} band(s), numbered from 0)")]
    NoSuchBand { file: String, band: usize, bands: usize },
    #[error("{file}: band {name} is missing (the file's bands: {available})")]
    MissingBand { file: String, name: String, available: String },
    #[error("{file}: the model takes {want} band(s) ({names}); the file has {have} ({sample_type} samples)")]
    BandCount { file: String, want: usize, names: String, have: usize, sample_type: SampleType },
    #[error("band group {group}: {message}")]
    Group { group: String, message: String },
    #[error("{file}: {reason}")]
    NotGeoreferenced { file: String, reason: String },
    #[error("{0}")]
    Grid(String),
    #[error("writing {file}: {message}")]
    Write { file: String, message: String },
    #[error("{file}: window x={x} y={y} {w}×{h} is not inside the {width}×{height} raster")]
    Window { file: String, x: usize, y: usize, w: usize, h: usize, width: usize, height: usize },
}

macro_rules! samples {
    ($($v:ident($t:ty)),*) => {
        /// Samples of one type, as stored.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Samples {
            $($v(Vec<$t>)),*
        }

        impl Samples {
            /// `n` zeros of type `t`.
            pub fn zeros(t: SampleType, n: usize) -> Samples {
                match t {
                    $(SampleType::$v => Samples::$v(vec![<$t>::default(); n])),*
                }
            }

            pub fn sample_type(&self) -> SampleType {
                match self {
                    $(Samples::$v(_) => SampleType::$v),*
                }
            }

            pub fn len(&self) -> usize {
                match self {
                    $(Samples::$v(v) => v.len()),*
                }
            }

            pub fn is_empty(&self) -> bool {
                self.len() == 0
            }

            /// Every sample as f64 (exact for every stored type).
            pub fn to_f64(&self) -> Vec<f64> {
                match self {
                    $(Samples::$v(v) => v.iter().map(|&x| x as f64).collect()),*
                }
            }

            /// Every sample as f32 (exact up to 24-bit integers).
            pub fn to_f32(&self) -> Vec<f32> {
                match self {
                    $(Samples::$v(v) => v.iter().map(|&x| x as f32).collect()),*
                }
            }

            /// Sample `i` as f64.
            pub fn get(&self, i: usize) -> f64 {
                match self {
                    $(Samples::$v(v) => v[i] as f64),*
                }
            }

            /// Pixels of a planar block of `bands` planes where every band equals `value`
            /// (nodata pixels), counted with one typed pass per band.
            pub fn count_all_equal(&self, bands: usize, value: f64) -> usize {
                match self {
                    $(Samples::$v(v) => {
                        let n = v.len() / bands.max(1);
                        let mut all = vec![true; n];
                        for plane in v.chunks_exact(n.max(1)).take(bands) {
                            for (a, &x) in all.iter_mut().zip(plane) {
                                *a &= (x as f64) == value;
                            }
                        }
                        all.iter().filter(|&&a| a).count()
                    })*
                }
            }

            /// Appends `other`'s samples; false (nothing appended) when its type differs.
            pub fn extend_from(&mut self, other: &Samples) -> bool {
                match (self, other) {
                    $((Samples::$v(a), Samples::$v(b)) => { a.extend_from_slice(b); true })*
                    _ => false,
                }
            }

            /// Interleaved samples of `bands` channels (`[(y * w + x) * bands + band]`) band by band.
            pub fn interleaved_to_planar(self, bands: usize) -> Samples {
                match self {
                    $(Samples::$v(v) => {
                        if bands <= 1 {
                            return Samples::$v(v);
                        }
                        let n = v.len() / bands;
                        let mut out = Vec::with_capacity(v.len());
                        for b in 0..bands {
                            out.extend(v[b..].iter().step_by(bands).take(n));
                        }
                        Samples::$v(out)
                    })*
                }
            }

            /// Band-by-band samples of `bands` channels interleaved (`[(y * w + x) * bands + band]`): the
            /// inverse of [`Samples::interleaved_to_planar`].
            pub fn planar_to_interleaved(self, bands: usize) -> Samples {
                match self {
                    $(Samples::$v(v) => {
                        if bands <= 1 {
                            return Samples::$v(v);
                        }
                        let n = v.len() / bands;
                        Samples::$v((0..n * bands).map(|i| v[(i % bands) * n + i / bands]).collect())
                    })*
                }
            }

            /// The samples at `indices`, in that order.
            pub fn gather(&self, indices: &[usize]) -> Samples {
                match self {
                    $(Samples::$v(v) => Samples::$v(indices.iter().map(|&i| v[i]).collect())),*
                }
            }

            /// Every sample `k` times in a row (one interleaved channel made `k`).
            pub fn repeat_each(self, k: usize) -> Samples {
                match self {
                    $(Samples::$v(v) => Samples::$v(v.iter().flat_map(|&x| std::iter::repeat_n(x, k)).collect())),*
                }
            }

            /// No samples of type `t`, with room for `n`.
            pub fn with_capacity(t: SampleType, n: usize) -> Samples {
                match t {
                    $(SampleType::$v => Samples::$v(Vec::with_capacity(n))),*
                }
            }
        }

        /// Copies `rows` rows of `cols` samples from a decoded chunk (stride
        /// `src_stride` samples, every `step`-th sample from `src_start`) into
        /// `dst` (stride `dst_stride`, from `dst_start`).
        #[allow(clippy::too_many_arguments)]
        fn copy_block(
            dst: &mut Samples, dst_start: usize, dst_stride: usize,
            src: &DecodingResult, src_start: usize, src_stride: usize, step: usize,
            rows: usize, cols: usize,
        ) -> bool {
            match (dst, src) {
                $((Samples::$v(d), DecodingResult::$v(s)) => {
                    for r in 0..rows {
                        let (di, si) = (dst_start + r * dst_stride, src_start + r * src_stride);
                        if step == 1 {
                            d[di..di + cols].copy_from_slice(&s[si..si + cols]);
                        } else {
                            for (k, v) in d[di..di + cols].iter_mut().enumerate() {
                                *v = s[si + k * step];
                            }
                        }
                    }
                    true
                })*
                _ => false,
            }
        }
    };
}

samples!(U8(u8), I8(i8), U16(u16), I16(i16), U32(u32), I32(i32), F32(f32), F64(f64));

/// A planar block of samples: `samples[band * height * width + y * width + x]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    pub bands: usize,
    pub height: usize,
    pub width: usize,
    pub samples: Samples,
}

/// What a file holds, read from its header.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RasterInfo {
    pub width: usize,
    pub height: usize,
    pub bands: usize,
    pub sample_type: SampleType,
    /// Band-sequential (PlanarConfiguration = 2).
    pub planar: bool,
    pub tiled: bool,
    /// Strip or tile size in pixels (a strip spans the width).
    pub chunk_width: usize,
    pub chunk_height: usize,
    /// The GDAL_NODATA value, if any.
    pub nodata: Option<f64>,
    /// The last band is an alpha channel (ExtraSamples 1 or 2).
    pub alpha: bool,
    /// Band names from GDAL's band descriptions (GDAL_METADATA), where the file gives them.
    pub band_names: Vec<Option<String>>,
    /// The TIFF `DateTime` tag as written ("YYYY:MM:DD HH:MM:SS"), if any.
    pub datetime: Option<String>,
}

/// Default bytes of decoded strips/tiles kept for the next windows.
pub const DEFAULT_CACHE_BYTES: usize = 256 << 20;

/// A TIFF opened for reading windows.
pub struct Raster<R: Source> {
    dec: Decoder<R>,
    info: RasterInfo,
    file: String,
    chunks_across: usize,
    chunks_per_plane: usize,
    cache: HashMap<u32, Arc<DecodingResult>>,
    order: VecDeque<u32>,
    cached_bytes: usize,
    cache_limit: usize,
    /// JPEG-compressed YCbCr: chunks are converted to RGB as they are decoded.
    ycbcr: bool,
    /// Each chunk's byte range in the file (from the offsets and byte counts tags).
    ranges: Vec<std::ops::Range<u64>>,
    /// The georeference from the same header, or why there is none.
    georef: Result<Georef, georef::GeorefError>,
}

impl<R: Source> std::fmt::Debug for Raster<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Raster").field("file", &self.file).field("info", &self.info).finish()
    }
}

impl Raster<BufReader<std::fs::File>> {
    /// Opens `path` and reads its header.
    pub fn open(path: &Path) -> Result<Self, RasterError> {
        let file = path.display().to_string();
        let f = std::fs::File::open(path).map_err(|source| RasterError::Io { file: file.clone(), source })?;
        Raster::new(BufReader::with_capacity(1 << 16, f), file)
    }
}

impl Raster<Cursor<Vec<u8>>> {
    /// A TIFF held in memory (an HTTP body); `label` names it in errors.
    pub fn from_bytes(bytes: Vec<u8>, label: &str) -> Result<Self, RasterError> {
        Raster::new(Cursor::new(bytes), label.to_string())
    }
}

fn decode_err(file: &str) -> impl Fn(tiff::TiffError) -> RasterError + '_ {
    move |e| match e {
        tiff::TiffError::UnsupportedError(u) => {
            RasterError::Unsupported { file: file.to_string(), what: u.to_string() }
        }
        tiff::TiffError::IoError(source) => RasterError::Io { file: file.to_string(), source },
        other => RasterError::Decode { file: file.to_string(), message: other.to_string() },
    }
}

impl<R: Source> Raster<R> {
    /// Reads the header of the first image in `reader`; `file` names it in errors.
    pub fn new(reader: R, file: String) -> Result<Self, RasterError> {
        let err = decode_err(&file);
        let mut limits = Limits::default();
        // One strip or tile is decoded at a time; a file written as a single strip needs it whole.
        limits.decoding_buffer_size = 2 << 30;
        let mut dec = Decoder::new(reader).map_err(&err)?.with_limits(limits);
        let (w, h) = dec.dimensions().map_err(&err)?;
        let unsupported = |what: String| RasterError::Unsupported { file: file.clone(), what };
        let spp: usize = dec.find_tag_unsigned::<u16>(Tag::SamplesPerPixel).map_err(&err)?.unwrap_or(1).into();
        let bits = dec.find_tag_unsigned_vec::<u16>(Tag::BitsPerSample).map_err(&err)?.unwrap_or_else(|| vec![1]);
        let format = dec.find_tag_unsigned_vec::<u16>(Tag::SampleFormat).map_err(&err)?.unwrap_or_else(|| vec![1]);
        if bits.iter().any(|&b| b != bits[0]) || format.iter().any(|&f| f != format[0]) {
            return Err(unsupported(format!("bands of different sample types (bits {bits:?}, formats {format:?})")));
        }
        let sample_type = match (format[0], bits[0]) {
            (1, 8) => SampleType::U8,
            (2, 8) => SampleType::I8,
            (1, 16) => SampleType::U16,
            (2, 16) => SampleType::I16,
            (1, 32) => SampleType::U32,
            (2, 32) => SampleType::I32,
            (3, 32) => SampleType::F32,
            (3, 64) => SampleType::F64,
            (f, b) => {
                let kind = match f {
                    1 => "unsigned integer",
                    2 => "signed integer",
                    3 => "floating-point",
                    5 | 6 => "complex",
                    _ => "untyped",
                };
                return Err(unsupported(format!("{b}-bit {kind} samples")));
            }
        };
        let photometric = dec.find_tag_unsigned::<u16>(Tag::PhotometricInterpretation).map_err(&err)?.unwrap_or(1);
        let compression = dec.find_tag_unsigned::<u16>(Tag::Compression).map_err(&err)?.unwrap_or(1);
        if photometric == 3 {
            return Err(unsupported("palette (colour-mapped) images".into()));
        }
        if photometric == 6 && compression != 7 {
            return Err(unsupported("YCbCr samples outside JPEG compression".into()));
        }
        let planar = dec.find_tag_unsigned::<u16>(Tag::PlanarConfiguration).map_err(&err)?.unwrap_or(1) == 2;
        let tiled = dec.get_chunk_type() == ChunkType::Tile;
        let (cw, ch) = dec.chunk_dimensions();
        let (cw, ch) = (cw as usize, (ch as usize).min(h as usize).max(1));
        let (width, height) = (w as usize, h as usize);
        let nodata = match dec.find_tag(Tag::GdalNodata) {
            Ok(Some(v)) => {
                v.into_string().ok().and_then(|s| s.trim_matches(|c: char| c == '\0' || c.is_whitespace()).parse().ok())
            }
            _ => None,
        };
        let extra = dec.find_tag_unsigned_vec::<u16>(Tag::ExtraSamples).map_err(&err)?.unwrap_or_default();
        let alpha = matches!(extra.last(), Some(1 | 2));
        let mut band_names = vec![None; spp];
        if let Ok(Some(v)) = dec.find_tag(Tag::Unknown(42112)) {
            if let Ok(xml) = v.into_string() {
                for (i, name) in gdal_descriptions(&xml) {
                    if i < spp {
                        band_names[i] = Some(name);
                    }
                }
            }
        }
        let datetime = match dec.find_tag(Tag::DateTime) {
            Ok(Some(v)) => v.into_string().ok().map(|s| s.trim_end_matches('\0').trim().to_string()),
            _ => None,
        };
        let georef = georef::from_tags(&mut dec);
        let chunks_across = if tiled { width.div_ceil(cw) } else { 1 };
        let chunks_per_plane = chunks_across * height.div_ceil(ch);
        let (offsets_tag, counts_tag) =
            if tiled { (Tag::TileOffsets, Tag::TileByteCounts) } else { (Tag::StripOffsets, Tag::StripByteCounts) };
        let offsets = dec.get_tag_u64_vec(offsets_tag).map_err(&err)?;
        let counts = dec.get_tag_u64_vec(counts_tag).map_err(&err)?;
        let planes = if planar { spp } else { 1 };
        if offsets.len() < chunks_per_plane * planes || counts.len() != offsets.len() {
            return Err(RasterError::Decode {
                file: file.clone(),
                message: format!(
                    "{} chunk offsets and {} byte counts for {} chunks",
                    offsets.len(),
                    counts.len(),
                    chunks_per_plane * planes
                ),
            });
        }
        let ranges = offsets.iter().zip(&counts).map(|(&o, &n)| o..o.saturating_add(n)).collect();
        let info = RasterInfo {
            width,
            height,
            bands: spp,
            sample_type,
            planar,
            tiled,
            chunk_width: if tiled { cw } else { width },
            chunk_height: ch,
            nodata,
            alpha,
            band_names,
            datetime,
        };
        drop(err);
        Ok(Raster {
            dec,
            info,
            file,
            chunks_across,
            chunks_per_plane,
            cache: HashMap::new(),
            order: VecDeque::new(),
            cached_bytes: 0,
            cache_limit: DEFAULT_CACHE_BYTES,
            ycbcr: photometric == 6,
            ranges,
            georef,
        })
    }

    pub fn info(&self) -> &RasterInfo {
        &self.info
    }

    /// Its georeference (read with the header); the error names the file and what is missing.
    pub fn georef(&self) -> Result<&Georef, RasterError> {
        self.georef
            .as_ref()
            .map_err(|reason| RasterError::NotGeoreferenced { file: self.file.clone(), reason: reason.to_string() })
    }

    /// The file's name, as errors give it.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// Bytes of decoded strips/tiles to keep between windows (at least one chunk is always kept).
    pub fn set_cache_limit(&mut self, bytes: usize) {
        self.cache_limit = bytes;
        self.evict(0);
    }

    /// Bytes of decoded chunks held now.
    pub fn cached_bytes(&self) -> usize {
        self.cached_bytes
    }

    fn evict(&mut self, incoming: usize) {
        while self.cached_bytes + incoming > self.cache_limit {
            let Some(old) = self.order.pop_front() else { break };
            if let Some(c) = self.cache.remove(&old) {
                self.cached_bytes -= c.len_bytes();
            }
        }
    }

    fn chunk(&mut self, index: u32) -> Result<Arc<DecodingResult>, RasterError> {
        if let Some(c) = self.cache.get(&index) {
            return Ok(c.clone());
        }
        let mut data = self.dec.read_chunk(index).map_err(decode_err(&self.file))?;
        if self.ycbcr {
            match &mut data {
                DecodingResult::U8(px) if !self.info.planar && self.info.bands == 3 => ycbcr_to_rgb(px),
                _ => {
                    return Err(RasterError::Unsupported {
                        file: self.file.clone(),
                        what: "YCbCr other than 3 interleaved 8-bit samples".into(),
                    })
                }
            }
        }
        let data = Arc::new(data);
        let bytes = data.len_bytes();
        self.evict(bytes);
        self.cache.insert(index, data.clone());
        self.order.push_back(index);
        self.cached_bytes += bytes;
        Ok(data)
    }

    /// The file's bands that feed a model's `wanted` bands, in the model's order:
    /// - by name, where the file names its bands (GDAL band descriptions) and
    ///   any of them is among `wanted` (case-insensitive); every wanted band must
    ///   then be there, else the error names the missing one and what the file has;
    /// - by position otherwise (unnamed bands, or names of another vocabulary):
    ///   the counts must match (an alpha band beyond them is dropped).
    pub fn select_bands(&self, wanted: &[String]) -> Result<Vec<usize>, RasterError> {
        select(&self.info, &self.file, wanted)
    }

    /// Every band of the whole raster.
    pub fn read_all(&mut self) -> Result<Block, RasterError> {
        let bands: Vec<usize> = (0..self.info.bands).collect();
        let (w, h) = (self.info.width, self.info.height);
        self.read_window(0, 0, w, h, &bands)
    }

    /// The strip/tile holding band `band` at chunk column `cx`, row `cy` (planar files: one plane per band).
    fn chunk_index(&self, band: usize, cx: usize, cy: usize) -> u32 {
        let plane = if self.info.planar { band } else { 0 };
        (plane * self.chunks_per_plane + cy * self.chunks_across + cx) as u32
    }

    /// Byte ranges of the strips/tiles (not decoded yet) that a window of `bands` needs, sorted.
    fn chunk_ranges(&self, x: usize, y: usize, w: usize, h: usize, bands: &[usize]) -> Vec<std::ops::Range<u64>> {
        let info = &self.info;
        let (cw, ch) = (info.chunk_width, info.chunk_height);
        if w == 0 || h == 0 || x + w > info.width || y + h > info.height {
            return Vec::new();
        }
        let mut wanted: Vec<std::ops::Range<u64>> = Vec::new();
        for cy in y / ch..=(y + h - 1) / ch {
            for cx in x / cw..=(x + w - 1) / cw {
                for &band in bands.iter().filter(|&&b| b < info.bands) {
                    let i = self.chunk_index(band, cx, cy);
                    if !self.cache.contains_key(&i) {
                        wanted.extend(self.ranges.get(i as usize).cloned());
                    }
                }
            }
        }
        wanted.sort_by_key(|r| r.start);
        wanted.dedup();
        wanted
    }

    /// Starts fetching what later windows (top-left corners, all `w × h`) will need, in one request per run
    /// of nearby byte ranges: a remote source fetches in the background, so reading overlaps decoding; a local
    /// one does nothing. Windows outside the raster are ignored.
    pub fn prefetch_windows(&mut self, windows: &[(usize, usize)], w: usize, h: usize, bands: &[usize]) {
        let mut wanted: Vec<std::ops::Range<u64>> =
            windows.iter().flat_map(|&(x, y)| self.chunk_ranges(x, y, w, h, bands)).collect();
        wanted.sort_by_key(|r| r.start);
        wanted.dedup();
        if !wanted.is_empty() {
            self.dec.inner().prefetch(&wanted);
        }
    }

    /// Bands `bands` (0-based, in that order) of the window at `x, y` of
    /// `w × h` pixels, decoding only the strips/tiles it touches.
    pub fn read_window(
        &mut self,
        x: usize,
        y: usize,
        w: usize,
        h: usize,
        bands: &[usize],
    ) -> Result<Block, RasterError> {
        let info = self.info.clone();
        if w == 0 || h == 0 || x + w > info.width || y + h > info.height {
            return Err(RasterError::Window {
                file: self.file.clone(),
                x,
                y,
                w,
                h,
                width: info.width,
                height: info.height,
            });
        }
        if let Some(&band) = bands.iter().find(|&&b| b >= info.bands) {
            return Err(RasterError::NoSuchBand { file: self.file.clone(), band, bands: info.bands });
        }
        let (cw, ch) = (info.chunk_width, info.chunk_height);
        // Tell the source which chunks (not yet decoded) come next.
        let wanted = self.chunk_ranges(x, y, w, h, bands);
        if !wanted.is_empty() {
            self.dec
                .inner()
                .will_read(&wanted)
                .map_err(|source| RasterError::Io { file: self.file.clone(), source })?;
        }
        let mut out = Samples::zeros(info.sample_type, bands.len() * w * h);
        for cy in y / ch..=(y + h - 1) / ch {
            for cx in x / cw..=(x + w - 1) / cw {
                // The chunk's pixels and their overlap with the window.
                let (x0, y0) = (cx * cw, cy * ch);
                let chunk_w = cw.min(info.width - x0);
                let (ox0, ox1) = (x.max(x0), (x + w).min(x0 + chunk_w));
                let (oy0, oy1) = (y.max(y0), (y + h).min(y0 + ch).min(info.height));
                for (k, &band) in bands.iter().enumerate() {
                    let (sample, spp) = if info.planar { (0, 1) } else { (band, info.bands) };
                    let data = self.chunk(self.chunk_index(band, cx, cy))?;
                    let copied = copy_block(
                        &mut out,
                        k * w * h + (oy0 - y) * w + (ox0 - x),
                        w,
                        &data,
                        ((oy0 - y0) * chunk_w + (ox0 - x0)) * spp + sample,
                        chunk_w * spp,
                        spp,
                        oy1 - oy0,
                        ox1 - ox0,
                    );
                    if !copied {
                        return Err(RasterError::Decode {
                            file: self.file.clone(),
                            message: format!("a chunk decoded to another sample type than {}", info.sample_type),
                        });
                    }
                }
            }
        }
        Ok(Block { bands: bands.len(), height: h, width: w, samples: out })
    }
}

/// `(band, description)` pairs of GDAL's `<Item name="DESCRIPTION" sample="N" role="description">…</Item>`.
fn gdal_descriptions(xml: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for item in xml.split("<Item ").skip(1) {
        let Some((attrs, rest)) = item.split_once('>') else { continue };
        if !attrs.contains("name=\"DESCRIPTION\"") || !attrs.contains("role=\"description\"") {
            continue;
        }
        let sample = attrs.split("sample=\"").nth(1).and_then(|v| v.split('"').next()).and_then(|v| v.parse().ok());
        let value = rest.split("</Item>").next().unwrap_or("");
        let value = value.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"").replace("&amp;", "&");
        if let Some(i) = sample {
            out.push((i, value.trim().to_string()));
        }
    }
    out
}

/// JPEG's (JFIF, full-range ITU-R BT.601) YCbCr → RGB, in place, for
/// interleaved 8-bit triplets: what libjpeg and GDAL give for YCbCr TIFFs.
fn ycbcr_to_rgb(px: &mut [u8]) {
    for p in px.chunks_exact_mut(3) {
        let (y, cb, cr) = (f32::from(p[0]), f32::from(p[1]) - 128.0, f32::from(p[2]) - 128.0);
        let c = |v: f32| v.round().clamp(0.0, 255.0) as u8;
        p[0] = c(y + 1.402 * cr);
        p[1] = c(y - 0.344_136 * cb - 0.714_136 * cr);
        p[2] = c(y + 1.772 * cb);
    }
}

/// The georeference of the GeoTIFF at `path` (its header only).
pub fn read_georef(path: &Path) -> Result<Georef, RasterError> {
    Raster::open(path)?.georef().cloned()
}

/// A model's band names for `channels` channels: `names` when it has one per channel, else `band1..bandN`
/// (bands matched by position).
pub fn model_band_names(channels: usize, names: &[String]) -> Vec<String> {
    if names.len() == channels {
        names.to_vec()
    } else {
        positional_names(channels)
    }
}

/// Generic band names `band1..bandN`: bands of a model or file without names, matched by position.
pub fn positional_names(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("band{i}")).collect()
}

/// A single-band file's band name from its name: the last `_`-separated part
/// of the stem (`T33UUP_20240101_B04.tif` → `B04`, `s3://b/LC08_SR_B5.TIF` → `B5`).
pub fn band_name_from_file(name: &str) -> String {
    let file = name.rsplit('/').next().unwrap_or(name);
    let stem = Path::new(file).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    stem.rsplit('_').next().unwrap_or(&stem).to_string()
}

/// Whether `p` names a GeoTIFF (`.tif`/`.tiff`, any case).
pub fn is_tiff_path(p: &Path) -> bool {
    p.extension()
        .and_then(|x| x.to_str())
        .is_some_and(|x| x.eq_ignore_ascii_case("tif") || x.eq_ignore_ascii_case("tiff"))
}

/// The GeoTIFFs directly in `dir`, sorted by name: a band group's files in band order.
pub fn group_files(dir: &Path) -> Result<Vec<std::path::PathBuf>, RasterError> {
    let io = |source| RasterError::Io { file: dir.display().to_string(), source };
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io)? {
        let p = e.map_err(io)?.path();
        if p.is_file() && is_tiff_path(&p) {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Co-registered files read as one raster (one file per band, as Sentinel-2
/// tiles and BigEarthNet patches ship them): each member's bands in order,
/// named by the member's band descriptions or, for an unnamed single band, by
/// its file name's last `_`-separated part (`…_B04.tif` → `B04`). Members must
/// share size, sample type and (where they have one) georeference.
#[derive(Debug)]
pub struct BandGroup<R: Source> {
    members: Vec<Raster<R>>,
    /// (member, band within it) of each band of the group.
    bands: Vec<(usize, usize)>,
    info: RasterInfo,
    name: String,
}

impl BandGroup<BufReader<std::fs::File>> {
    /// Opens `files` (in band order) as one raster named `name` in errors.
    pub fn open(name: &str, files: &[std::path::PathBuf]) -> Result<Self, RasterError> {
        let members = files.iter().map(|f| Raster::open(f)).collect::<Result<Vec<_>, _>>()?;
        let stems: Vec<String> = files.iter().map(|f| band_name_from_file(&f.to_string_lossy())).collect();
        BandGroup::new(name, members, &stems)
    }
}

impl<R: Source> BandGroup<R> {
    /// A group of opened `members`; `fallback_names[i]` names member i's band when it is a single unnamed one.
    pub fn new(name: &str, members: Vec<Raster<R>>, fallback_names: &[String]) -> Result<Self, RasterError> {
        let group = |message: String| RasterError::Group { group: name.to_string(), message };
        let first = members.first().ok_or_else(|| group("no files".into()))?.info.clone();
        let mut bands = Vec::new();
        let mut band_names = Vec::new();
        for (m, r) in members.iter().enumerate() {
            let i = &r.info;
            if (i.width, i.height) != (first.width, first.height) {
                return Err(group(format!(
                    "{} is {}×{}, {} is {}×{}: not co-registered (resample to one grid first)",
                    r.file, i.width, i.height, members[0].file, first.width, first.height
                )));
            }
            if i.sample_type != first.sample_type {
                return Err(group(format!(
                    "{} stores {} samples, {} stores {}: one sample type per input",
                    r.file, i.sample_type, members[0].file, first.sample_type
                )));
            }
            if let (Ok(a), Ok(b)) = (&members[0].georef, &r.georef) {
                if !a.same_grid(b) {
                    return Err(group(format!(
                        "{} is not co-registered with {} (georeference differs)",
                        r.file, members[0].file
                    )));
                }
            }
            for b in 0..i.bands {
                bands.push((m, b));
                let fallback = (i.bands == 1).then(|| fallback_names.get(m).cloned()).flatten();
                band_names.push(i.band_names[b].clone().or(fallback));
            }
        }
        let info = RasterInfo {
            bands: bands.len(),
            band_names,
            alpha: members.len() == 1 && first.alpha,
            nodata: members.iter().find_map(|r| r.info.nodata),
            ..first
        };
        Ok(BandGroup { members, bands, info, name: name.to_string() })
    }

    pub fn info(&self) -> &RasterInfo {
        &self.info
    }

    /// The group's georeference: every member's (they agree, [`BandGroup::new`] checked); the error names
    /// the first member that has none.
    pub fn georef(&self) -> Result<&Georef, RasterError> {
        for m in &self.members[1..] {
            m.georef()?;
        }
        self.members[0].georef()
    }

    /// The members' file names.
    pub fn files(&self) -> Vec<&str> {
        self.members.iter().map(|m| m.file()).collect()
    }

    /// As [`Raster::select_bands`], over the group's bands.
    pub fn select_bands(&self, wanted: &[String]) -> Result<Vec<usize>, RasterError> {
        select(&self.info, &self.name, wanted)
    }

    /// As [`Raster::prefetch_windows`], for each member's bands.
    pub fn prefetch_windows(&mut self, windows: &[(usize, usize)], w: usize, h: usize, bands: &[usize]) {
        for (m, member) in self.members.iter_mut().enumerate() {
            let mine: Vec<usize> =
                bands.iter().filter_map(|&b| self.bands.get(b).filter(|(mm, _)| *mm == m).map(|&(_, mb)| mb)).collect();
            if !mine.is_empty() {
                member.prefetch_windows(windows, w, h, &mine);
            }
        }
    }

    /// As [`Raster::read_window`]: each band from its member.
    pub fn read_window(
        &mut self,
        x: usize,
        y: usize,
        w: usize,
        h: usize,
        bands: &[usize],
    ) -> Result<Block, RasterError> {
        let mut out = Samples::with_capacity(self.info.sample_type, bands.len() * w * h);
        for &b in bands {
            let &(m, mb) = self.bands.get(b).ok_or_else(|| RasterError::NoSuchBand {
                file: self.name.clone(),
                band: b,
                bands: self.bands.len(),
            })?;
            let block = self.members[m].read_window(x, y, w, h, &[mb])?;
            out.extend_from(&block.samples);
        }
        Ok(Block { bands: bands.len(), height: h, width: w, samples: out })
    }
}

/// [`Raster::select_bands`] for a raster described by `info`, named `file` in errors.
fn select(info: &RasterInfo, file: &str, wanted: &[String]) -> Result<Vec<usize>, RasterError> {
    let named =
        |w: &String| info.band_names.iter().position(|n| n.as_deref().is_some_and(|n| n.eq_ignore_ascii_case(w)));
    if wanted.iter().any(|w| named(w).is_some()) {
        return wanted
            .iter()
            .map(|w| {
                named(w).ok_or_else(|| RasterError::MissingBand {
                    file: file.to_string(),
                    name: w.clone(),
                    available: info
                        .band_names
                        .iter()
                        .map(|n| n.as_deref().unwrap_or("(unnamed)"))
                        .collect::<Vec<_>>()
                        .join(", "),
                })
            })
            .collect();
    }
    let n = wanted.len();
    if info.bands == n || (info.bands == n + 1 && info.alpha) {
        return Ok((0..n).collect());
    }
    Err(RasterError::BandCount {
        file: file.to_string(),
        want: n,
        names: wanted.join(", "),
        have: info.bands,
        sample_type: info.sample_type,
    })
}

trait LenBytes {
    fn len_bytes(&self) -> usize;
}

impl LenBytes for DecodingResult {
    fn len_bytes(&self) -> usize {
        match self {
            DecodingResult::U8(v) => v.len(),
            DecodingResult::I8(v) => v.len(),
            DecodingResult::U16(v) => v.len() * 2,
            DecodingResult::I16(v) => v.len() * 2,
            DecodingResult::F16(v) => v.len() * 2,
            DecodingResult::U32(v) => v.len() * 4,
            DecodingResult::I32(v) => v.len() * 4,
            DecodingResult::F32(v) => v.len() * 4,
            DecodingResult::U64(v) => v.len() * 8,
            DecodingResult::I64(v) => v.len() * 8,
            DecodingResult::F64(v) => v.len() * 8,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn planar_and_interleaved_are_inverse() {
        // 3 bands of 2×2: band b, pixel p holds 10·b + p.
        let planar: Vec<u16> = (0..3).flat_map(|b| (0..4).map(move |p| 10 * b + p)).collect();
        let hwc = Samples::U16(planar.clone()).planar_to_interleaved(3);
        let Samples::U16(v) = &hwc else { panic!("type changed") };
        assert_eq!(v, &[0, 10, 20, 1, 11, 21, 2, 12, 22, 3, 13, 23]);
        assert!(matches!(hwc.interleaved_to_planar(3), Samples::U16(p) if p == planar));
        assert!(matches!(Samples::F32(vec![1.0, 2.0]).planar_to_interleaved(1), Samples::F32(p) if p == [1.0, 2.0]));
    }

    /// A small planar and a small chunky uint16 TIFF written with the `tiff`
    /// crate's encoder (strips of 3 rows), read back whole and by windows.
    #[test]
    fn windows_equal_the_whole_image_for_both_layouts() {
        use tiff::encoder::{colortype, TiffEncoder};
        let (w, h) = (7u32, 5u32);
        let px: Vec<u16> = (0..w * h * 3).map(|i| (i * 997 % 65521) as u16).collect();
        let mut buf = Cursor::new(Vec::new());
        {
            let mut enc = TiffEncoder::new(&mut buf).unwrap();
            let mut img = enc.new_image::<colortype::RGB16>(w, h).unwrap();
            img.rows_per_strip(3).unwrap();
            img.write_data(&px).unwrap();
        }
        let mut r = Raster::from_bytes(buf.into_inner(), "mem.tif").unwrap();
        let info = r.info().clone();
        assert_eq!((info.width, info.height, info.bands, info.sample_type), (7, 5, 3, SampleType::U16));
        assert!(!info.planar && !info.tiled && info.chunk_height == 3);
        let all = r.read_all().unwrap();
        let Samples::U16(all_px) = &all.samples else { panic!("{:?}", all.samples.sample_type()) };
        for c in 0..3 {
            for i in 0..(w * h) as usize {
                assert_eq!(all_px[c * 35 + i], px[i * 3 + c], "band {c} pixel {i}");
            }
        }
        // A window across the strip boundary, bands reordered.
        let win = r.read_window(2, 1, 4, 3, &[2, 0]).unwrap();
        for (k, band) in [2usize, 0].iter().enumerate() {
            for yy in 0..3 {
                for xx in 0..4 {
                    let want = px[((1 + yy) * 7 + 2 + xx) * 3 + band];
                    assert_eq!(win.samples.get(k * 12 + yy * 4 + xx), f64::from(want));
                }
            }
        }
        assert!(matches!(r.read_window(5, 0, 3, 1, &[0]), Err(RasterError::Window { .. })));
        let e = r.read_window(0, 0, 1, 1, &[3]).unwrap_err();
        assert!(e.to_string().contains("mem.tif: band 3 does not exist (the file has 3 band(s)"), "{e}");
        // Nodata pixels: every band equal to the value.
        let z = Samples::U16(vec![0, 5, 0, 0, 7, 0]); // 2 bands of 3 pixels
        assert_eq!((z.count_all_equal(2, 0.0), z.count_all_equal(2, 7.0)), (2, 0));
        // A cache smaller than one chunk still reads correctly.
        r.set_cache_limit(1);
        assert_eq!(r.read_window(2, 1, 4, 3, &[2, 0]).unwrap(), win);
        assert!(r.cached_bytes() <= 7 * 3 * 3 * 2);
    }

    #[test]
    fn not_a_tiff_is_named() {
        let e = Raster::from_bytes(b"GIF89a....".to_vec(), "x.gif").unwrap_err();
        assert!(e.to_string().starts_with("x.gif: "), "{e}");
        let e = Raster::open(Path::new("/no/such.tif")).unwrap_err();
        assert!(e.to_string().contains("/no/such.tif"), "{e}");
    }
}
