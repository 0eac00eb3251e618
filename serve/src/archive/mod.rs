//! Archive embedding: what a run reads ([`inputs`]: paths, globs, object-store prefixes, STAC items, with
//! [`stac`]'s types), where things live ([`store`]: local paths and object-store URLs, COGs read by range
//! requests), how scenes become rows ([`embed`]), the GeoParquet schema and sink ([`geoparquet`]),
//! plan/shard/verify at scale ([`shard`]), the dataset as a STAC Collection ([`collection`]) and a picture of one scene's embeddings ([`map`]).

pub mod collection;
pub mod embed;
pub mod error;
pub mod geoparquet;
pub mod inputs;
pub mod map;
pub mod shard;
pub mod stac;
pub mod store;
