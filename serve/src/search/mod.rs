//! Similarity search over archive embeddings: "find places like this".
//!
//! - [`index`]: an index over a GeoParquet dataset (one file, or the parts of a sharded run, local or in
//!   object storage): the vectors in an HNSW graph of geossl's own ([`hnsw`], its kernels in [`simd`]), the rows'
//!   metadata (chip id, footprint, centre, datetime, source, window, cell) in GeoParquet files, one per
//!   indexed part, and a manifest with the dataset's model and plan. Adding parts extends it in place. A
//!   quantized index can keep a float32 copy of its vectors ([`rerank`]) to re-score its candidates.
//! - [`query`]: queries (a chip id, a lon/lat point, an embedding, several positive examples) with exact
//!   filters (bbox, datetime interval, the query's own scene, windows overlapping the query), and the quick
//!   classifier (a logistic regression on labelled chips ranking the whole index).
//! - [`answers`]: answers as a GeoJSON FeatureCollection or GeoParquet.
//!
//! Stands on [`crate::archive`] (locations, the GeoParquet readers) and `geossl_eval` (the logistic
//! regression the frozen evaluation uses); knows no HTTP status code: [`SearchError`] says what went wrong
//! and [`crate::http`] maps it.

pub mod answers;
pub mod hnsw;
pub mod index;
pub(crate) mod pages;
pub mod query;
pub mod rerank;
pub mod simd;

/// A failure of building, opening or querying an index, by what the caller does about it.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// The query is malformed (k out of range, a bad bbox or datetime, an embedding of the wrong length,
    /// no examples): the caller fixes the query.
    #[error("{0}")]
    BadQuery(String),
    /// The query names something the index does not hold (an unknown chip id, a point outside every chip).
    #[error("{0}")]
    NotFound(String),
    /// The query is well formed but cannot be answered by this index: an image for a model other than the
    /// index's, a level the index does not hold.
    #[error("{0}")]
    Mismatch(String),
    /// The index or the dataset cannot be read or written: a build or a load fails.
    #[error("{0}")]
    Index(String),
}

impl SearchError {
    pub fn index(e: impl std::fmt::Display) -> Self {
        SearchError::Index(e.to_string())
    }
}

impl From<crate::archive::error::ArchiveError> for SearchError {
    fn from(e: crate::archive::error::ArchiveError) -> Self {
        SearchError::Index(e.to_string())
    }
}

impl From<crate::archive::store::StoreError> for SearchError {
    fn from(e: crate::archive::store::StoreError) -> Self {
        SearchError::Index(e.to_string())
    }
}
