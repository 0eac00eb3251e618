//! The HTTP service: routes and lifecycle ([`server`]), the Open Inference Protocol v2 ([`oip`]) and the
//! image endpoints ([`images`]), similarity search ([`search`]), the model repository ([`repository`]), shared state ([`state`]), metrics
//! ([`metrics`]) and the one table from error kind to HTTP status ([`error`]).

pub mod error;
pub mod images;
pub mod metrics;
pub mod oip;
pub mod repository;
pub mod search;
pub mod server;
pub mod state;

pub use error::ServeError;
pub use state::{AppState, Limits};
