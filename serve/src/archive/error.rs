//! Failures of the archive path, sorted by what a run does about them. Transient ones (timeouts,
//! connection resets, 429/5xx, throttling) never reach here: the store retries them
//! ([`crate::archive::store`]) and reports only what outlasted the retries, which is run-level.

use geossl_raster::RasterError;

use crate::archive::store::{StoreError, StoreErrorKind};

/// A failure, by its consequence.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// This input cannot be embedded: corrupt or truncated data, a missing band or object, an unsupported
    /// layout, no georeference. The run skips it, names it and goes on; none of its rows are kept, and
    /// `embed --retry-failed` redoes it.
    #[error("{0}")]
    Input(String),
    /// The run cannot go on: credentials refused or expired, a missing bucket, an output that cannot be
    /// written, a store unreachable through every retry, a model that does not run, a bad option. A shard
    /// fails and publishes nothing, so a retried Job redoes it.
    #[error("{0}")]
    Run(String),
}

impl ArchiveError {
    /// Whether only this input is lost (the run goes on).
    pub fn is_input(&self) -> bool {
        matches!(self, ArchiveError::Input(_))
    }

    /// A store failure while reading an input: a missing object or an unusable location is the input's
    /// problem; refused credentials, an unreachable store and anything else end the run.
    pub fn reading(e: StoreError) -> Self {
        match e.kind {
            StoreErrorKind::NotFound | StoreErrorKind::Invalid => ArchiveError::Input(e.to_string()),
            StoreErrorKind::Denied | StoreErrorKind::Unavailable | StoreErrorKind::Other => {
                ArchiveError::Run(e.to_string())
            }
        }
    }

    /// A raster failure while reading an input: the store's failure underneath decides (see
    /// [`ArchiveError::reading`]); anything the data itself causes (not a TIFF, truncated, a missing band,
    /// an unsupported layout, no georeference) is the input's.
    pub fn raster(e: RasterError) -> Self {
        if let RasterError::Io { source, .. } = &e {
            if let Some(s) = StoreError::from_io(source) {
                let inner = ArchiveError::reading(StoreError::new(s.kind, &s.location, &s.message));
                return match inner {
                    ArchiveError::Input(_) => ArchiveError::Input(e.to_string()),
                    ArchiveError::Run(_) => ArchiveError::Run(e.to_string()),
                };
            }
        }
        ArchiveError::Input(e.to_string())
    }

    /// A failure that ends the run whatever it is (the plan, the dataset, the output, the model).
    pub fn run(e: impl std::fmt::Display) -> Self {
        ArchiveError::Run(e.to_string())
    }

    /// The same failure with `context` before its message.
    pub fn context(self, context: impl std::fmt::Display) -> Self {
        match self {
            ArchiveError::Input(m) => ArchiveError::Input(format!("{context}: {m}")),
            ArchiveError::Run(m) => ArchiveError::Run(format!("{context}: {m}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_sort_by_consequence() {
        let store = |kind| StoreError::new(kind, "s3://b/x.tif", "…");
        assert!(ArchiveError::reading(store(StoreErrorKind::NotFound)).is_input());
        assert!(!ArchiveError::reading(store(StoreErrorKind::Denied)).is_input());
        assert!(!ArchiveError::reading(store(StoreErrorKind::Unavailable)).is_input());
        // Through the decoder: an I/O error carrying a store failure keeps its class; others are the input's.
        let via = |kind| RasterError::Io { file: "x.tif".into(), source: std::io::Error::other(store(kind)) };
        assert!(!ArchiveError::raster(via(StoreErrorKind::Unavailable)).is_input());
        assert!(ArchiveError::raster(via(StoreErrorKind::NotFound)).is_input());
        let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "truncated");
        assert!(ArchiveError::raster(RasterError::Io { file: "x.tif".into(), source: eof }).is_input());
        let e = ArchiveError::raster(RasterError::Decode { file: "x.tif".into(), message: "bad".into() });
        assert!(e.is_input() && e.to_string().contains("x.tif"));
    }
}
