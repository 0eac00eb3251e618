//! Chip packs: pre-cut chips in shard files made for training reads — fixed-size arrays read with one
//! positioned read each, no image decoding.
//!
//! A pack is a folder: `pack.json` (the index: band names, sample type, chip shape, the shards in order
//! with their record counts and sizes) and `shard-NNNNN.gcp` files. A shard is self-describing:
//!
//! ```text
//! "GSSLPACK" (8 bytes) | version u32 LE | 52 zero bytes      (64-byte preamble)
//! record 0 | record 1 | …                                    (each `stride` bytes apart, from byte 64)
//! footer: JSON (bands, sample type, shape, stride, one entry per record: location id, timestamp,
//!         lat, lon, label, source file, CRC-32 of its bytes)
//! footer length u64 LE | "GSSLPACK"                           (16-byte trailer)
//! ```
//!
//! A record is one chip `[H, W, C]` (pixel-interleaved, as decoders give 8-bit images and GDAL's
//! pixel-interleaved files hold them), samples little-endian as stored: uint8, uint16, int16 or float32.
//! A batch of records is then `[B, H, W, C]`, whose `[B, C, H, W]` view is channels-last: the layout
//! libtorch's vectorized uint8 resampling runs on. Every chip of a pack has the same shape and sample type (that is what lets a
//! batch be one array); `geossl-train chips` makes such chips. Records keep the manifest's order, so a
//! loader over the pack draws the same anchors and temporal partners as one over the manifest.
//!
//! Reads check each record's CRC-32: a corrupted record is named (shard, record, source chip) and the
//! loader replaces it like an unreadable image; the other records of the shard stay usable. A shard whose
//! preamble, trailer or footer is damaged, or that is shorter than its footer says, is named when the pack
//! is opened. Shards are written to a temporary name and renamed when complete; `pack.json` comes last.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use geossl_models::SampleType;
use geossl_raster::{Layout, Samples};
use serde::{Deserialize, Serialize};

use crate::data::Sample;
use crate::image_io::{DecodeError, Image};

const MAGIC: &[u8; 8] = b"GSSLPACK";
const VERSION: u32 = 1;
const PREAMBLE: u64 = 64;
const TRAILER: u64 = 16;
/// Records start on 64-byte boundaries (cache lines; SIMD loads).
const ALIGN: u64 = 64;
/// The index file's name inside a pack folder.
pub const INDEX: &str = "pack.json";

/// Why a pack could not be written or read; each names the file (and record) it is about.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    /// A damaged or foreign file: bad magic, version, footer, or a shard shorter than its footer says.
    #[error("{path}: {msg}")]
    Corrupt { path: PathBuf, msg: String },
    /// One record whose bytes do not match their checksum (or cannot be read); the rest are usable.
    #[error("{shard}: record {record} (chip {source_path}): {msg}")]
    Record { shard: PathBuf, record: usize, source_path: String, msg: String },
    /// Chips that cannot share a pack (another shape or sample type), or a pack that does not fit the model.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PackError + '_ {
    move |error| PackError::Io { path: path.to_owned(), error }
}

/// Chip shape and sample type, shared by every record of a pack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChipShape {
    pub bands: Vec<String>,
    pub sample_type: SampleType,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl ChipShape {
    /// The shape and sample type of `img`, read for `bands`.
    fn of(img: &Image, bands: &[String]) -> Self {
        ChipShape { bands: bands.to_vec(), sample_type: img.stored(), channels: img.c, height: img.h, width: img.w }
    }

    /// Bytes of one chip.
    pub fn record_bytes(&self) -> u64 {
        (self.channels * self.height * self.width * self.sample_type.bytes()) as u64
    }

    fn stride(&self) -> u64 {
        self.record_bytes().div_ceil(ALIGN) * ALIGN
    }

    fn describe(&self) -> String {
        format!("{} band(s) of {}×{} {:?}", self.channels, self.width, self.height, self.sample_type)
    }
}

/// One record's metadata (the manifest row it came from, and its checksum).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordMeta {
    pub location_id: String,
    pub timestamp: Option<String>,
    pub lat: f64,
    pub lon: f64,
    pub label: Option<String>,
    /// The chip file it was read from (as the manifest named it).
    pub source: String,
    pub crc32: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Footer {
    version: u32,
    #[serde(flatten)]
    shape: ChipShape,
    stride: u64,
    records: Vec<RecordMeta>,
}

/// `pack.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PackIndex {
    pub format: String,
    pub version: u32,
    #[serde(flatten)]
    pub shape: ChipShape,
    pub records: usize,
    pub shards: Vec<ShardEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardEntry {
    pub file: String,
    pub records: usize,
    pub bytes: u64,
}

/// True when `path` is a pack folder (or its `pack.json`).
pub fn is_pack(path: &Path) -> bool {
    path.join(INDEX).is_file() || path.file_name().is_some_and(|n| n == INDEX)
}

/// How to write a pack.
#[derive(Debug, Clone)]
pub struct PackOptions {
    /// Band names the chips are decoded for (the one decoder's policy: by name, else by position).
    pub bands: Vec<String>,
    /// Target shard size in bytes (a shard holds at least one chip).
    pub shard_bytes: u64,
    /// Threads decoding chips.
    pub workers: usize,
}

/// The chip's samples, pixel-interleaved, as little-endian bytes.
fn record_bytes(img: &Image) -> Result<Vec<u8>, String> {
    let samples = match img.layout {
        Layout::Interleaved => (*img.samples).clone(),
        Layout::Planar => (*img.samples).clone().planar_to_interleaved(img.c),
    };
    Ok(match samples {
        Samples::U8(v) => v,
        Samples::U16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Samples::I16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Samples::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        other => {
            return Err(format!(
                "stores {:?} samples; packs hold uint8, uint16, int16 and float32 chips",
                other.sample_type()
            ))
        }
    })
}

/// Writes the chips of `samples` (decoded by the one decoder, window crops applied) into a pack at `out`.
/// Every chip must have the first one's shape and sample type; the error names the first that does not.
pub fn write_pack(
    samples: &[Sample],
    out: &Path,
    opt: &PackOptions,
    progress: &indicatif::ProgressBar,
) -> Result<PackIndex, PackError> {
    if samples.is_empty() {
        return Err(PackError::Invalid("no chips to pack".into()));
    }
    if out.join(INDEX).exists() {
        return Err(PackError::Invalid(format!(
            "{} already holds a pack (pack.json): choose another --out or remove it",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(io(out))?;
    let load = |s: &Sample| -> Result<(Image, Vec<u8>), PackError> {
        let mut img = crate::image_io::decode(&s.path, &opt.bands).map_err(DecodeError::from)?;
        if let Some(c) = s.crop {
            img = img.crop(c).map_err(|e| DecodeError::Window(format!("{}: {e}", s.path.display())))?;
        }
        let bytes = record_bytes(&img).map_err(|m| PackError::Invalid(format!("{}: {m}", s.path.display())))?;
        Ok((img, bytes))
    };
    let (first, _) = load(&samples[0])?;
    let shape = ChipShape::of(&first, &opt.bands);
    let per_shard = (opt.shard_bytes / shape.stride()).max(1) as usize;
    let mut shards = Vec::new();
    for (n, chunk) in samples.chunks(per_shard).enumerate() {
        let file = format!("shard-{n:05}.gcp");
        let mut w = ShardWriter::create(&out.join(&file), &shape)?;
        // Decoded in parallel a block at a time, written in manifest order.
        for block in chunk.chunks(opt.workers.max(1) * 8) {
            for (s, r) in block.iter().zip(crate::pipeline::map_ordered(block, opt.workers, load)) {
                let (img, bytes) = r?;
                let got = ChipShape::of(&img, &opt.bands);
                if got != shape {
                    return Err(PackError::Invalid(format!(
                        "{}: {} but the pack's chips ({}) are {}: a pack holds chips of one shape and type \
                         (`geossl-train chips --size` cuts them)",
                        s.path.display(),
                        got.describe(),
                        samples[0].path.display(),
                        shape.describe()
                    )));
                }
                w.push(s, &bytes)?;
                progress.inc(1);
            }
        }
        let (records, bytes) = w.finish()?;
        shards.push(ShardEntry { file, records, bytes });
    }
    let index =
        PackIndex { format: "geossl-chip-pack".into(), version: VERSION, shape, records: samples.len(), shards };
    let text = serde_json::to_vec_pretty(&index).map_err(|e| PackError::Invalid(e.to_string()))?;
    geossl_models::weights::write_atomic(&out.join(INDEX), &text).map_err(io(&out.join(INDEX)))?;
    Ok(index)
}

struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: BufWriter<File>,
    shape: ChipShape,
    records: Vec<RecordMeta>,
    pad: Vec<u8>,
}

impl ShardWriter {
    fn create(path: &Path, shape: &ChipShape) -> Result<Self, PackError> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let mut file = BufWriter::with_capacity(1 << 22, File::create(&tmp).map_err(io(&tmp))?);
        let mut pre = [0u8; PREAMBLE as usize];
        pre[..8].copy_from_slice(MAGIC);
        pre[8..12].copy_from_slice(&VERSION.to_le_bytes());
        file.write_all(&pre).map_err(io(&tmp))?;
        let pad = vec![0u8; (shape.stride() - shape.record_bytes()) as usize];
        Ok(Self { path: path.to_owned(), tmp, file, shape: shape.clone(), records: Vec::new(), pad })
    }

    fn push(&mut self, s: &Sample, bytes: &[u8]) -> Result<(), PackError> {
        self.file.write_all(bytes).and_then(|()| self.file.write_all(&self.pad)).map_err(io(&self.tmp))?;
        self.records.push(RecordMeta {
            location_id: s.location_id.clone(),
            timestamp: s.timestamp.clone(),
            lat: s.lat,
            lon: s.lon,
            label: s.label.clone(),
            source: s.path.display().to_string(),
            crc32: crc32fast::hash(bytes),
        });
        Ok(())
    }

    fn finish(mut self) -> Result<(usize, u64), PackError> {
        let n = self.records.len();
        let records = std::mem::take(&mut self.records);
        let footer = Footer { version: VERSION, shape: self.shape.clone(), stride: self.shape.stride(), records };
        let json = serde_json::to_vec(&footer).map_err(|e| PackError::Invalid(e.to_string()))?;
        let done = (|| {
            self.file.write_all(&json)?;
            self.file.write_all(&(json.len() as u64).to_le_bytes())?;
            self.file.write_all(MAGIC)?;
            self.file.flush()?;
            self.file.get_ref().sync_all()?;
            std::fs::rename(&self.tmp, &self.path)?;
            std::fs::metadata(&self.path).map(|m| m.len())
        })();
        done.map(|bytes| (n, bytes)).map_err(|error| PackError::Io { path: self.tmp.clone(), error })
    }
}

impl Drop for ShardWriter {
    /// A shard left unfinished (an error, a refused chip) leaves no file behind; a finished one was renamed.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

#[derive(Debug)]
struct Shard {
    path: PathBuf,
    file: File,
    stride: u64,
    records: Vec<RecordMeta>,
}

/// An open pack: its records as training samples and positioned reads of their bytes.
#[derive(Debug)]
pub struct Pack {
    pub dir: PathBuf,
    pub shape: ChipShape,
    shards: Vec<Shard>,
    /// First global record index of each shard.
    starts: Vec<usize>,
}

impl Pack {
    /// Opens the pack at `path` (its folder or its `pack.json`), checking every shard's preamble, footer
    /// and length against the index.
    pub fn open(path: &Path) -> Result<Arc<Pack>, PackError> {
        let dir = if path.file_name().is_some_and(|n| n == INDEX) {
            path.parent().unwrap_or(Path::new(".")).to_owned()
        } else {
            path.to_owned()
        };
        let ip = dir.join(INDEX);
        let text = std::fs::read(&ip).map_err(io(&ip))?;
        let index: PackIndex = serde_json::from_slice(&text)
            .map_err(|e| PackError::Corrupt { path: ip.clone(), msg: format!("not a pack index: {e}") })?;
        if index.format != "geossl-chip-pack" || index.version != VERSION {
            return Err(PackError::Corrupt {
                path: ip,
                msg: format!(
                    "format {} version {}; this build reads geossl-chip-pack {VERSION}",
                    index.format, index.version
                ),
            });
        }
        let mut shards = Vec::new();
        let mut starts = Vec::new();
        let mut n = 0;
        for e in &index.shards {
            let shard = open_shard(&dir.join(&e.file), &index.shape)?;
            if shard.records.len() != e.records {
                return Err(PackError::Corrupt {
                    path: shard.path,
                    msg: format!("holds {} records, pack.json says {}", shard.records.len(), e.records),
                });
            }
            starts.push(n);
            n += shard.records.len();
            shards.push(shard);
        }
        if n != index.records || n == 0 {
            return Err(PackError::Corrupt {
                path: ip,
                msg: format!("{n} records in the shards, {} in the index", index.records),
            });
        }
        Ok(Arc::new(Pack { dir, shape: index.shape, shards, starts }))
    }

    /// Number of chips.
    pub fn len(&self) -> usize {
        self.starts.last().map_or(0, |s| s + self.shards.last().map_or(0, |x| x.records.len()))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn locate(&self, i: usize) -> (&Shard, usize) {
        let s = self.starts.partition_point(|&x| x <= i) - 1;
        (&self.shards[s], i - self.starts[s])
    }

    /// The records as training samples, in pack order (the manifest's). `path` is the chip's source file.
    pub fn samples(&self) -> Vec<Sample> {
        let base = &self.dir;
        self.shards
            .iter()
            .flat_map(|s| &s.records)
            .map(|r| Sample {
                path: base.join(&r.source),
                lat: r.lat,
                lon: r.lon,
                timestamp: r.timestamp.clone(),
                location_id: r.location_id.clone(),
                label: r.label.clone(),
                crop: None,
            })
            .collect()
    }

    /// Reads record `i` into `dst` (exactly [`ChipShape::record_bytes`] long) and checks its CRC-32.
    pub fn read_into(&self, i: usize, dst: &mut [u8]) -> Result<(), PackError> {
        let (shard, r) = self.locate(i);
        let meta = &shard.records[r];
        let bad = |msg: String| PackError::Record {
            shard: shard.path.clone(),
            record: r,
            source_path: meta.source.clone(),
            msg,
        };
        shard.file.read_exact_at(dst, PREAMBLE + r as u64 * shard.stride).map_err(|e| bad(e.to_string()))?;
        let crc = crc32fast::hash(dst);
        if crc != meta.crc32 {
            return Err(bad(format!("checksum {crc:08x}, written as {:08x}: the shard is damaged", meta.crc32)));
        }
        Ok(())
    }

    /// Record `i` as a decoded image (interleaved, samples as stored).
    pub fn image(&self, i: usize) -> Result<Image, PackError> {
        let sh = &self.shape;
        let mut buf = vec![0u8; sh.record_bytes() as usize];
        self.read_into(i, &mut buf)?;
        let n = sh.channels * sh.height * sh.width;
        let samples = match sh.sample_type {
            SampleType::U8 => Samples::U8(buf),
            SampleType::U16 => Samples::U16(buf.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect()),
            SampleType::I16 => Samples::I16(buf.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect()),
            SampleType::F32 => {
                Samples::F32(buf.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
            }
            t => return Err(PackError::Invalid(format!("{}: sample type {t:?} is not packable", self.dir.display()))),
        };
        debug_assert_eq!(samples.len(), n);
        Ok(Image {
            samples: Arc::new(samples),
            layout: Layout::Interleaved,
            c: sh.channels,
            h: sh.height,
            w: sh.width,
            nodata: None,
        })
    }

    /// Checks that the pack holds the bands a model of `bands` takes: the same names (any case), or
    /// positional names (`band1…`) with the same count.
    pub fn check_bands(&self, bands: &[String]) -> Result<(), PackError> {
        let have = &self.shape.bands;
        let positional =
            have.iter().zip(crate::image_io::positional(have.len())).all(|(a, b)| a.eq_ignore_ascii_case(&b));
        let same =
            have.len() == bands.len() && (positional || have.iter().zip(bands).all(|(a, b)| a.eq_ignore_ascii_case(b)));
        if same {
            Ok(())
        } else {
            Err(PackError::Invalid(format!(
                "{}: the pack holds bands [{}], the model takes [{}]",
                self.dir.display(),
                have.join(", "),
                bands.join(", ")
            )))
        }
    }

    /// Reads every record and names each whose checksum fails; returns the number checked.
    pub fn verify(&self) -> (usize, Vec<PackError>) {
        let mut buf = vec![0u8; self.shape.record_bytes() as usize];
        let bad = (0..self.len()).filter_map(|i| self.read_into(i, &mut buf).err()).collect();
        (self.len(), bad)
    }
}

fn open_shard(path: &Path, shape: &ChipShape) -> Result<Shard, PackError> {
    let corrupt = |msg: String| PackError::Corrupt { path: path.to_owned(), msg };
    let mut file = File::open(path).map_err(io(path))?;
    let len = file.metadata().map_err(io(path))?.len();
    if len < PREAMBLE + TRAILER {
        return Err(corrupt(format!("{len} bytes: too short for a shard (truncated?)")));
    }
    let mut pre = [0u8; 12];
    file.read_exact(&mut pre).map_err(io(path))?;
    if &pre[..8] != MAGIC {
        return Err(corrupt("does not start with GSSLPACK: not a chip shard".into()));
    }
    let version = u32::from_le_bytes([pre[8], pre[9], pre[10], pre[11]]);
    if version != VERSION {
        return Err(corrupt(format!("shard version {version}; this build reads {VERSION}")));
    }
    let mut tail = [0u8; TRAILER as usize];
    file.seek(SeekFrom::End(-(TRAILER as i64))).and_then(|_| file.read_exact(&mut tail)).map_err(io(path))?;
    if &tail[8..] != MAGIC {
        return Err(corrupt("does not end with GSSLPACK: truncated or still being written".into()));
    }
    let flen = u64::from_le_bytes(tail[..8].try_into().unwrap_or_default());
    if flen > len - PREAMBLE - TRAILER {
        return Err(corrupt(format!("footer of {flen} bytes does not fit in {len}")));
    }
    let mut json = vec![0u8; flen as usize];
    file.read_exact_at(&mut json, len - TRAILER - flen).map_err(io(path))?;
    let footer: Footer = serde_json::from_slice(&json).map_err(|e| corrupt(format!("unreadable footer: {e}")))?;
    if footer.shape != *shape || footer.stride != shape.stride() {
        return Err(corrupt(format!(
            "holds {} (stride {}), pack.json says {}",
            footer.shape.describe(),
            footer.stride,
            shape.describe()
        )));
    }
    let data_end = PREAMBLE + footer.records.len() as u64 * footer.stride;
    if data_end != len - TRAILER - flen {
        return Err(corrupt(format!(
            "{} records need {} bytes before the footer, the file has {}",
            footer.records.len(),
            data_end,
            len - TRAILER - flen
        )));
    }
    Ok(Shard { path: path.to_owned(), file, stride: footer.stride, records: footer.records })
}
