//! Specs and file contracts shared by every geossl crate.
//!
//! This crate knows *what* a model is — backbone architecture, heads, parameter
//! names and shapes, normalization, the ONNX input/output contract and the
//! checkpoint-directory layout — but nothing about *how* it runs: it links
//! neither libtorch nor ONNX Runtime, so the exporter and the server can depend
//! on it cheaply.
//!
//! Parameter names follow torchvision's `state_dict()` exactly (including the
//! batch-norm buffers `running_mean`, `running_var`, `num_batches_tracked`), so
//! weights move between PyTorch, the tch trainer and the ONNX exporter without
//! renaming. Heads live under their own prefixes (`fc.`, `proj.`, `geo.`, `seg.`).

pub mod arch;
pub mod checkpoint;
pub mod heads;
pub mod io;
pub mod mlm;
pub mod norm;
pub mod param;
pub mod rng;
pub mod sample;
pub mod spec;
pub mod weights;

pub use arch::{Arch, BackboneSpec, BlockKind, BlockSpec};
pub use checkpoint::{CheckpointPaths, SpecError};
pub use heads::{ClassifierHead, EmbeddingHead, GeoHead, HeadKind, HeadSpec, ProjectionSpec, SegmentationHead};
pub use io::{Dim, ElemType, InputDType, IoContract, SampleType, TensorContract};
pub use norm::{BandStats, Normalization};
pub use spec::{ModelSpec, ParamRole, ParamSpec, TrainingInfo};
pub use weights::{NamedTensor, StateDict, TensorData, WeightsError};

/// Defines an error type that is one kind of failure with a message naming what failed (a struct around
/// the message, `Display`ed as it, built from `String`/`&str` so that `?` and `.into()` make it).
#[macro_export]
macro_rules! message_error {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name(pub String);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::error::Error for $name {}

        impl From<String> for $name {
            fn from(m: String) -> Self {
                $name(m)
            }
        }

        impl From<&str> for $name {
            fn from(m: &str) -> Self {
                $name(m.to_string())
            }
        }
    };
}

message_error!(
    /// A spec or input contract that is not valid (an unknown name, counts that disagree, a value out of
    /// range); the message says which field and why.
    ContractError
);

/// The version of geossl that wrote a file (stored in specs and ONNX metadata).
pub const GEOSSL_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Lower-case hex SHA-256 of `bytes` (config hashes, checkpoint hashes).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether the binaries' log lines on stderr get ANSI colour: only when stderr
/// is a terminal, and never when `NO_COLOR` is set to a non-empty value
/// (<https://no-color.org>), so logs piped to files or CI stay plain text.
pub fn stderr_colour() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// A renamed environment variable keeps working for a while: when `new` is unset and `old` holds a value
/// `accept` recognises as the old meaning, `new` takes that value and a warning on stderr names both.
/// (Values of another meaning are left alone: the old name may mean something else in another tool now.)
/// Call it first thing in `main`, before any thread starts.
pub fn env_renamed(tool: &str, old: &str, new: &str, accept: impl Fn(&str) -> bool) {
    if std::env::var_os(new).is_some() {
        return;
    }
    if let Ok(v) = std::env::var(old) {
        if accept(&v) {
            eprintln!(
                "warning: {tool}: {old} is deprecated here (it has one meaning across geossl's tools now); set \
                 {new} instead (see docs/environment.md)"
            );
            std::env::set_var(new, v);
        }
    }
}
