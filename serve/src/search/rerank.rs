//! A float32 copy of every vector (`vectors.f32`) beside a quantized graph, to re-score the graph's
//! candidates: an i8 index keeps a quarter of f32's graph memory and answers with f32's recall. The copy is
//! memory-mapped, not read into memory: a search touches one row per candidate, and the page cache keeps the
//! rows asked for often (reading each row with a `pread` instead cost ~2.7 µs a row on the benchmark's VM,
//! a third of an i8 search; docs/benchmarks/search.md, "int8 with a float32 re-rank").
//!
//! File (little-endian): `GSSLF32\0`, format (u32, 1), dimensions (u32), then the rows' unit vectors as D
//! f32 each, key `k` at byte `16 + k·4·D`. Rows past the manifest's are a build's that did not finish:
//! reading ignores them and appending cuts them first, so what a finished build saved is never rewritten.
//!
//! Mapping a file is this module's one `unsafe`: the mapping's bytes must not change or vanish while it lives.
//! An opened index maps the rows its manifest lists, and geossl never rewrites or cuts those: appending only
//! adds rows after them (and cuts rows no manifest lists), and a new build writes a new file and renames it
//! over the old one (whose mappings keep the old file). What remains is what any memory-mapped index (FAISS's,
//! usearch's) asks of its users: no other program truncates the file of an index being served.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use super::SearchError;
use crate::archive::store::Location;

/// Candidates re-scored per answer asked for, by default (docs/benchmarks/search.md, "int8 with a float32
/// re-rank").
pub const PER_ANSWER: usize = 4;

/// The copy's file name in an index.
pub const FILE: &str = "vectors.f32";
const MAGIC: &[u8; 8] = b"GSSLF32\0";
const FORMAT: u32 = 1;
const HEADER: u64 = 16;

fn header(dimensions: usize) -> [u8; HEADER as usize] {
    let mut h = [0u8; HEADER as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&FORMAT.to_le_bytes());
    h[12..].copy_from_slice(&(dimensions as u32).to_le_bytes());
    h
}

fn row_bytes(dimensions: usize) -> u64 {
    4 * dimensions as u64
}

/// The bytes of a copy holding `rows` rows: its header and the rows.
fn extent(dimensions: usize, rows: usize) -> u64 {
    HEADER + rows as u64 * row_bytes(dimensions)
}

fn io_err(at: impl std::fmt::Display, what: &'static str) -> impl Fn(std::io::Error) -> SearchError {
    let at = at.to_string();
    move |e| SearchError::Index(format!("{at}: {what}: {e}"))
}

/// The error for an index whose manifest keeps a copy that is not there.
fn missing(at: &Location) -> SearchError {
    SearchError::Index(format!("{at}: the manifest keeps a float32 copy of the vectors; there is none"))
}

/// Opens the local copy at `path` (read and written with `write`), telling a missing file from one that
/// cannot be opened.
fn open_local(path: &std::path::Path, at: &Location, write: bool) -> Result<std::fs::File, SearchError> {
    std::fs::OpenOptions::new().read(true).write(write).open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => missing(at),
        _ => SearchError::Index(format!("{at}: opening the float32 copy: {e}")),
    })
}

/// Checks that `file` is a copy of `dimensions`-dimensional rows holding at least `rows` of them.
fn check(file: &std::fs::File, at: &Location, dimensions: usize, rows: usize) -> Result<(), SearchError> {
    let mut h = [0u8; HEADER as usize];
    let len = file.metadata().map_err(io_err(at, "reading the float32 copy"))?.len();
    if len < HEADER || file.read_exact_at(&mut h, 0).is_err() || h[..8] != MAGIC[..] {
        return Err(SearchError::Index(format!("{at}: not a float32 vector copy (no GSSLF32 header)")));
    }
    let format = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    let d = u32::from_le_bytes(h[12..].try_into().expect("4 bytes")) as usize;
    if format != FORMAT || d != dimensions {
        return Err(SearchError::Index(format!(
            "{at}: a format {format} copy of {d}-dimensional rows; this build reads format {FORMAT} and the index \
             holds {dimensions}-dimensional rows"
        )));
    }
    let held = (len - HEADER) / row_bytes(dimensions);
    if held < rows as u64 {
        return Err(SearchError::Index(format!("{at}: holds {held} rows; the manifest counts {rows}")));
    }
    Ok(())
}

/// Downloads the object's first `bytes` bytes into `file`.
fn download(at: &Location, bytes: u64, file: &mut std::fs::File) -> Result<(), SearchError> {
    let mut src = at.open()?;
    let copied = std::io::copy(&mut (&mut src).take(bytes), file).map_err(io_err(at, "downloading"))?;
    if copied < bytes.min(HEADER) {
        return Err(SearchError::Index(format!("{at}: not a float32 vector copy ({copied} bytes)")));
    }
    Ok(())
}

/// The float32 copy of an opened index, read by key.
#[derive(Debug)]
pub struct Vectors {
    map: memmap2::Mmap,
    dimensions: usize,
    rows: usize,
    label: String,
}

/// Maps the first `bytes` bytes of `file` (checked to hold them) for reading.
#[allow(unsafe_code)]
fn map(file: &std::fs::File, bytes: u64, at: &Location) -> Result<memmap2::Mmap, SearchError> {
    let len = usize::try_from(bytes).map_err(|_| SearchError::Index(format!("{at}: too large to map")))?;
    // SAFETY: the mapped bytes (a header and the rows a published manifest lists) are never rewritten or cut
    // by geossl while an index maps them (see the module's documentation); the mapping is read-only.
    let map = unsafe { memmap2::MmapOptions::new().len(len).map(file) }.map_err(io_err(at, "mapping"))?;
    // Candidates are scattered rows: read-ahead would fetch rows no search asked for.
    let _ = map.advise(memmap2::Advice::Random);
    Ok(map)
}

impl Vectors {
    /// Opens the copy at `at` for an index of `rows` rows of `dimensions`; an object is downloaded to a
    /// temporary file first.
    pub fn open(at: &Location, dimensions: usize, rows: usize) -> Result<Vectors, SearchError> {
        let bytes = extent(dimensions, rows);
        let file = match at.as_local() {
            Some(p) => open_local(p, at, false)?,
            None => {
                if !at.exists()? {
                    return Err(missing(at));
                }
                // An anonymous temporary file: deleted when the index is dropped.
                let mut f = tempfile::tempfile().map_err(io_err(at, "a temporary file for the float32 copy"))?;
                download(at, bytes, &mut f)?;
                f
            }
        };
        check(&file, at, dimensions, rows)?;
        let map = map(&file, bytes, at)?;
        Ok(Vectors { map, dimensions, rows, label: at.as_str().to_string() })
    }

    /// Row `key`: a unit vector of `dimensions` values.
    pub fn row(&self, key: u64) -> Result<&[f32], SearchError> {
        if key as usize >= self.rows {
            return Err(SearchError::Index(format!("{}: no row {key} of {}", self.label, self.rows)));
        }
        let from = extent(self.dimensions, key as usize) as usize;
        let bytes = &self.map[from..from + 4 * self.dimensions];
        // The map is page-aligned and rows start at 16 + 4·D·k: always 4-byte aligned.
        bytemuck::try_cast_slice(bytes).map_err(|e| SearchError::Index(format!("{}: row {key}: {e}", self.label)))
    }
}

/// Adds rows to the copy of an index that holds `rows` rows: in place for a local file (after cutting rows
/// an unfinished build left); for a new copy (`rows` 0) or an object, in a local spool that
/// [`Appender::finish`] publishes (renamed over a local file, so a server mapping the old one keeps it).
#[derive(Debug)]
pub struct Appender {
    file: std::fs::File,
    at: Location,
    /// The spool of an object, published by `finish`.
    spool: Option<PathBuf>,
}

impl Appender {
    pub fn open(at: &Location, dimensions: usize, rows: usize) -> Result<Appender, SearchError> {
        if cfg!(target_endian = "big") {
            return Err(SearchError::Index("index files are little-endian; this host is big-endian".into()));
        }
        let keep = extent(dimensions, rows);
        let (mut file, spool) = match at.as_local() {
            // An index with rows has its copy: appended to, never made here (a missing one is named).
            Some(p) if rows > 0 => (open_local(p, at, true)?, None),
            _ => {
                let spool = at.spool("index");
                let mut f = std::fs::File::options()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&spool)
                    .map_err(io_err(spool.display(), "spooling the float32 copy"))?;
                if rows > 0 {
                    // Only an object gets here with rows: a local file is appended to in place.
                    download(at, keep, &mut f)?;
                }
                (f, Some(spool))
            }
        };
        if rows == 0 {
            file.set_len(0).and_then(|()| file.write_all_at(&header(dimensions), 0)).map_err(io_err(at, "writing"))?;
        } else {
            check(&file, at, dimensions, rows)?;
            file.set_len(keep).map_err(io_err(at, "cutting an unfinished build's rows"))?;
        }
        file.seek(SeekFrom::End(0)).map_err(io_err(at, "writing"))?;
        Ok(Appender { file, at: at.clone(), spool })
    }

    /// Appends unit vectors, row after row.
    pub fn push(&mut self, values: &[f32]) -> Result<(), SearchError> {
        self.file.write_all(bytemuck::cast_slice(values)).map_err(io_err(&self.at, "writing"))
    }

    /// Makes the rows durable (and publishes the spool).
    pub fn finish(mut self) -> Result<(), SearchError> {
        self.file.sync_all().map_err(io_err(&self.at, "writing"))?;
        match self.spool.take() {
            Some(spool) => Ok(self.at.publish(&spool)?),
            None => Ok(()),
        }
    }
}

impl Drop for Appender {
    /// An unfinished spool is removed (an in-place append's rows stay, unlisted, until the next append cuts them).
    fn drop(&mut self) {
        if let Some(spool) = self.spool.take() {
            let _ = std::fs::remove_file(spool);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_read_back_by_key_and_an_unfinished_append_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let at = Location::local(&dir.path().join(FILE));
        let rows: Vec<f32> = (0..5 * 3).map(|i| i as f32 / 10.0).collect();
        let mut a = Appender::open(&at, 3, 0).unwrap();
        a.push(&rows[..6]).unwrap();
        a.push(&rows[6..]).unwrap();
        a.finish().unwrap();
        let c = Vectors::open(&at, 3, 5).unwrap();
        assert_eq!(c.row(4).unwrap(), [1.2, 1.3, 1.4]);
        assert!(c.row(5).unwrap_err().to_string().contains("no row 5"));
        // A build that wrote 2 rows and stopped before its manifest: the index still holds 5.
        let mut a = Appender::open(&at, 3, 5).unwrap();
        a.push(&[9.0; 6]).unwrap();
        drop(a);
        let mut a = Appender::open(&at, 3, 5).unwrap();
        a.push(&[7.0; 3]).unwrap();
        a.finish().unwrap();
        let c6 = Vectors::open(&at, 3, 6).unwrap();
        assert_eq!(c6.row(5).unwrap(), [7.0; 3]);
        assert_eq!(c6.row(1).unwrap(), [0.3, 0.4, 0.5]);
        assert_eq!(std::fs::metadata(dir.path().join(FILE)).unwrap().len(), HEADER + 6 * 12);
        // A new build writes a new file: the copy mapped before keeps its rows.
        let mut a = Appender::open(&at, 3, 0).unwrap();
        a.push(&[5.0; 3]).unwrap();
        a.finish().unwrap();
        assert_eq!(c.row(4).unwrap(), [1.2, 1.3, 1.4]);
        assert_eq!(Vectors::open(&at, 3, 1).unwrap().row(0).unwrap(), [5.0; 3]);
        // A build that fails before finishing leaves no spool behind.
        let mut a = Appender::open(&at, 3, 0).unwrap();
        a.push(&[6.0; 3]).unwrap();
        drop(a);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [FILE], "only the copy");
    }

    #[test]
    fn a_wrong_or_short_copy_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let at = Location::local(&dir.path().join(FILE));
        let mut a = Appender::open(&at, 3, 0).unwrap();
        a.push(&[0.5; 6]).unwrap();
        a.finish().unwrap();
        assert!(Vectors::open(&at, 4, 2).unwrap_err().to_string().contains("3-dimensional rows"));
        assert!(Vectors::open(&at, 3, 3).unwrap_err().to_string().contains("holds 2 rows; the manifest counts 3"));
        std::fs::write(dir.path().join(FILE), b"not a copy at all").unwrap();
        assert!(Vectors::open(&at, 3, 1).unwrap_err().to_string().contains("no GSSLF32 header"));
        let gone = Location::local(&dir.path().join("none.f32"));
        assert!(Vectors::open(&gone, 3, 1).unwrap_err().to_string().contains("there is none"));
        // Appending to an index whose copy is missing names it, and makes no file.
        assert!(Appender::open(&gone, 3, 1).unwrap_err().to_string().contains("there is none"));
        assert!(!dir.path().join("none.f32").exists());
    }
}
