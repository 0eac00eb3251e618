//! The checkpoint directory contract.
//!
//! ```text
//! DIR/spec.json            ModelSpec (arch, bands, input size, normalization, heads, training info)
//! DIR/model.safetensors    weights, torchvision names for the backbone, heads under their prefixes
//! DIR/optimizer.safetensors  optional: optimizer state (resume)
//! DIR/state.json           optional: trainer state (step, RNG, queue pointer, ...)
//! ```
//! A directory is written next to its final place and renamed into it, so a
//! reader sees either the previous complete checkpoint or the new one.

use std::path::{Path, PathBuf};

use crate::spec::ModelSpec;

pub const SPEC_FILE: &str = "spec.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";

/// Errors reading a checkpoint directory's manifest.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{path}: not found (a checkpoint directory needs {SPEC_FILE} and {WEIGHTS_FILE})")]
    Missing { path: PathBuf },
    #[error("{path}: cannot read: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: not a valid geossl spec: {error}")]
    Parse { path: PathBuf, error: serde_json::Error },
    #[error("{path}: invalid spec: {msg}")]
    Invalid { path: PathBuf, msg: String },
}

/// Paths of the files of one checkpoint directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointPaths {
    pub dir: PathBuf,
}

impl CheckpointPaths {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn spec(&self) -> PathBuf {
        self.dir.join(SPEC_FILE)
    }
    pub fn weights(&self) -> PathBuf {
        self.dir.join(WEIGHTS_FILE)
    }
    pub fn optimizer(&self) -> PathBuf {
        self.dir.join(OPTIMIZER_FILE)
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// Reads and validates `spec.json`.
    pub fn read_spec(&self) -> Result<ModelSpec, SpecError> {
        let path = self.spec();
        let bytes = std::fs::read(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                SpecError::Missing { path: path.clone() }
            } else {
                SpecError::Io { path: path.clone(), error: source }
            }
        })?;
        let spec: ModelSpec =
            serde_json::from_slice(&bytes).map_err(|source| SpecError::Parse { path: path.clone(), error: source })?;
        spec.validate().map_err(|e| SpecError::Invalid { path, msg: e.to_string() })?;
        Ok(spec)
    }
}

/// Serializes a spec as it is stored (pretty JSON with a trailing newline).
pub fn spec_to_json(spec: &ModelSpec) -> String {
    let mut s = serde_json::to_string_pretty(spec).unwrap_or_else(|e| unreachable!("spec serializes: {e}"));
    s.push('\n');
    s
}

/// Replaces `dst` by the complete directory `staged` (a sibling of `dst`):
/// the old directory is moved aside, the new one renamed in, the old one removed.
/// At every instant `dst` or its `.old` sibling is a complete checkpoint.
pub fn commit_dir(staged: &Path, dst: &Path) -> std::io::Result<()> {
    let old = sibling(dst, ".old");
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    let had_old = dst.exists();
    if had_old {
        std::fs::rename(dst, &old)?;
    }
    std::fs::rename(staged, dst)?;
    if had_old {
        std::fs::remove_dir_all(&old)?;
    }
    sync_parent(dst);
    Ok(())
}

/// A fresh staging directory next to `dst` (same filesystem, so rename is atomic).
pub fn staging_dir(dst: &Path) -> std::io::Result<PathBuf> {
    let parent = dst.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let tmp = sibling(dst, &format!(".tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir(&tmp)?;
    Ok(tmp)
}

/// If a previous writer died between moving `dst` aside and renaming the new
/// directory in, `dst` is missing and `dst.old` is the last complete
/// checkpoint: put it back. Returns whether something was recovered.
pub fn recover_dir(dst: &Path) -> std::io::Result<bool> {
    let old = sibling(dst, ".old");
    if !dst.exists() && old.exists() {
        std::fs::rename(&old, dst)?;
        return Ok(true);
    }
    Ok(false)
}

fn sibling(dst: &Path, suffix: &str) -> PathBuf {
    let mut name = dst.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "checkpoint".into());
    name.push(suffix);
    dst.with_file_name(name)
}

fn sync_parent(dst: &Path) {
    if let Some(parent) = dst.parent() {
        if let Ok(f) = std::fs::File::open(if parent.as_os_str().is_empty() { Path::new(".") } else { parent }) {
            let _ = f.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Arch;

    #[test]
    fn read_spec_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cp = CheckpointPaths::new(dir.path());
        let e = cp.read_spec().unwrap_err().to_string();
        assert!(e.contains("spec.json") && e.contains("not found"), "{e}");
        std::fs::write(cp.spec(), b"{\"format\": 1, \"backbone\": ").unwrap();
        let e = cp.read_spec().unwrap_err().to_string();
        assert!(e.contains("spec.json") && e.contains("not a valid"), "{e}");
        let mut s = ModelSpec::rgb(Arch::Resnet18, 64);
        s.bands.pop();
        std::fs::write(cp.spec(), spec_to_json(&s)).unwrap();
        let e = cp.read_spec().unwrap_err().to_string();
        assert!(e.contains("invalid spec") && e.contains("bands"), "{e}");
    }

    #[test]
    fn commit_replaces_and_recovers() {
        let root = tempfile::tempdir().unwrap();
        let dst = root.path().join("ckpt");
        for gen in 0..2 {
            let st = staging_dir(&dst).unwrap();
            std::fs::write(st.join("x"), format!("{gen}")).unwrap();
            commit_dir(&st, &dst).unwrap();
            assert_eq!(std::fs::read_to_string(dst.join("x")).unwrap(), gen.to_string());
        }
        // Simulate a crash after moving the old one aside.
        std::fs::rename(&dst, root.path().join("ckpt.old")).unwrap();
        assert!(recover_dir(&dst).unwrap());
        assert_eq!(std::fs::read_to_string(dst.join("x")).unwrap(), "1");
        assert!(!recover_dir(&dst).unwrap());
    }
}
