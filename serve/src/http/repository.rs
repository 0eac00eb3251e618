//! The model repository: `DIR/<model>/<version>/model.onnx` with an optional
//! `config.toml` in the model directory (all versions) or a version directory
//! (that version only), and an optional STAC MLM model card `model.item.json`
//! beside the model (its input contract and output roles are served; its asset
//! href is not followed: the version's model is `model.onnx`). Model names are `[a-z0-9_.-]+`, versions positive
//! integers; anything else is refused by name.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::infer::batcher::BatchConfig;
use crate::infer::ort::EpPreference;

geossl_models::message_error!(
    /// What is wrong with a model repository; the message names the directory or file.
    RepositoryError
);

/// Contents of a `config.toml`. Every field is optional.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Most rows per backend call and per request (default 32).
    pub max_batch_size: Option<usize>,
    /// How long a batch waits to fill, in milliseconds (default 5).
    pub max_queue_delay_ms: Option<u64>,
    /// Requests that may wait in the queue (default 64).
    pub queue_capacity: Option<usize>,
    /// Sessions (worker threads) for this model (default 1).
    pub instances: Option<usize>,
    /// `auto`, `cuda` or `cpu` (default: the server's `--execution-provider`).
    pub execution_provider: Option<EpPreference>,
    /// CPU intra-op threads per session (default: the server's `--intra-threads`).
    pub intra_threads: Option<usize>,
    /// Class names, overriding the exporter's metadata.
    pub labels: Option<Vec<String>>,
}

/// Largest values a config may set; beyond them a typo is more likely than intent.
const MAX_BATCH: usize = 4096;
const MAX_INSTANCES: usize = 64;
const MAX_QUEUE: usize = 1 << 20;

impl ModelConfig {
    /// Batching settings with defaults filled in, checked for sanity.
    pub fn batch_config(&self) -> Result<BatchConfig, RepositoryError> {
        let d = BatchConfig::default();
        let c = BatchConfig {
            max_batch_size: self.max_batch_size.unwrap_or(d.max_batch_size),
            max_queue_delay: self.max_queue_delay_ms.map_or(d.max_queue_delay, Duration::from_millis),
            queue_capacity: self.queue_capacity.unwrap_or(d.queue_capacity),
            instances: self.instances.unwrap_or(d.instances),
        };
        if !(1..=MAX_BATCH).contains(&c.max_batch_size) {
            return Err(RepositoryError(format!("max_batch_size = {} (must be 1..={MAX_BATCH})", c.max_batch_size)));
        }
        if !(1..=MAX_INSTANCES).contains(&c.instances) {
            return Err(RepositoryError(format!("instances = {} (must be 1..={MAX_INSTANCES})", c.instances)));
        }
        if !(1..=MAX_QUEUE).contains(&c.queue_capacity) {
            return Err(RepositoryError(format!("queue_capacity = {} (must be 1..={MAX_QUEUE})", c.queue_capacity)));
        }
        if c.max_queue_delay > Duration::from_secs(10) {
            return Err(RepositoryError(format!(
                "max_queue_delay_ms = {} (must be at most 10000)",
                c.max_queue_delay.as_millis()
            )));
        }
        Ok(c)
    }

    fn read(path: &Path) -> Result<Option<Self>, RepositoryError> {
        match std::fs::read_to_string(path) {
            Ok(s) => toml::from_str(&s).map(Some).map_err(|e| RepositoryError(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RepositoryError(format!("{}: {e}", path.display()))),
        }
    }
}

/// True for a valid model name: `[a-z0-9_.-]+`, not `.` or `..`.
pub fn valid_model_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= 128
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-'))
}

/// Parses a version: a positive integer without sign or leading zeros' ambiguity.
pub fn parse_version(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 18 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|&v| v > 0)
}

/// One model version found in the repository.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub name: String,
    pub version: u64,
    pub model_path: PathBuf,
    /// `model.item.json` beside the model, when there is one.
    pub card: Option<PathBuf>,
    pub config: ModelConfig,
}

/// Lists every model version in `dir`, sorted by name then version.
pub fn scan(dir: &Path) -> Result<Vec<Entry>, RepositoryError> {
    let rd = std::fs::read_dir(dir).map_err(|e| RepositoryError(format!("model repository {}: {e}", dir.display())))?;
    let mut names: Vec<(String, PathBuf)> = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| RepositoryError(format!("model repository {}: {e}", dir.display())))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !ent.path().is_dir() {
            continue;
        }
        if !valid_model_name(&name) {
            return Err(RepositoryError(format!(
                "model repository {}: invalid model name {name:?} (names are [a-z0-9_.-]+)",
                dir.display()
            )));
        }
        names.push((name, ent.path()));
    }
    names.sort();
    let mut out = Vec::new();
    for (name, mdir) in names {
        let model_cfg = ModelConfig::read(&mdir.join("config.toml"))?;
        let mut versions = Vec::new();
        for ent in std::fs::read_dir(&mdir).map_err(|e| RepositoryError(format!("{}: {e}", mdir.display())))? {
            let ent = ent.map_err(|e| RepositoryError(format!("{}: {e}", mdir.display())))?;
            let vname = ent.file_name().to_string_lossy().into_owned();
            if vname.starts_with('.') || !ent.path().is_dir() {
                continue;
            }
            let version = parse_version(&vname).ok_or_else(|| {
                RepositoryError(format!("{}: version directory {vname:?} is not a positive integer", mdir.display()))
            })?;
            let model_path = ent.path().join("model.onnx");
            if !model_path.is_file() {
                return Err(RepositoryError(format!("{}: missing model.onnx", ent.path().display())));
            }
            let config = match ModelConfig::read(&ent.path().join("config.toml"))? {
                Some(c) => c,
                None => model_cfg.clone().unwrap_or_default(),
            };
            config.batch_config().map_err(|e| RepositoryError(format!("{}: config: {e}", ent.path().display())))?;
            let card = Some(geossl_models::mlm::card_path(&model_path)).filter(|p| p.is_file());
            versions.push(Entry { name: name.clone(), version, model_path, card, config });
        }
        if versions.is_empty() {
            return Err(RepositoryError(format!(
                "{}: model {name:?} has no version directory (<model>/1/model.onnx)",
                mdir.display()
            )));
        }
        versions.sort_by_key(|e| e.version);
        out.extend(versions);
    }
    if out.is_empty() {
        return Err(RepositoryError(format!(
            "model repository {} has no models (<model>/<version>/model.onnx)",
            dir.display()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_versions() {
        for ok in ["resnet50", "geo_moco-tp.v2", "a"] {
            assert!(valid_model_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "../etc", "a/b", "Upper", "sp ace", "a%2e"] {
            assert!(!valid_model_name(bad), "{bad}");
        }
        assert_eq!(parse_version("3"), Some(3));
        for bad in ["0", "-1", "+1", "1.0", "", "abc", "99999999999999999999"] {
            assert_eq!(parse_version(bad), None, "{bad}");
        }
    }

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
    }

    #[test]
    fn scan_reads_versions_and_configs_and_names_problems() {
        let d = tempfile::tempdir().unwrap();
        touch(&d.path().join("emb/1/model.onnx"));
        touch(&d.path().join("emb/2/model.onnx"));
        std::fs::write(d.path().join("emb/config.toml"), "max_batch_size = 8\n").unwrap();
        std::fs::write(d.path().join("emb/2/config.toml"), "max_batch_size = 4\ninstances = 2\n").unwrap();
        let e = scan(d.path()).unwrap();
        assert_eq!(e.iter().map(|e| (e.name.as_str(), e.version)).collect::<Vec<_>>(), [("emb", 1), ("emb", 2)]);
        assert_eq!(e[0].config.max_batch_size, Some(8));
        assert_eq!(e[1].config.batch_config().unwrap().instances, 2);

        std::fs::write(d.path().join("emb/config.toml"), "max_batch = 8\n").unwrap();
        assert!(scan(d.path()).unwrap_err().to_string().contains("unknown field"));
        std::fs::write(d.path().join("emb/config.toml"), "max_batch_size = 0\n").unwrap();
        assert!(scan(d.path()).unwrap_err().to_string().contains("max_batch_size = 0"));
        std::fs::remove_file(d.path().join("emb/config.toml")).unwrap();

        touch(&d.path().join("emb/latest/model.onnx"));
        assert!(scan(d.path()).unwrap_err().to_string().contains("\"latest\" is not a positive integer"));
        std::fs::remove_dir_all(d.path().join("emb/latest")).unwrap();
        std::fs::create_dir_all(d.path().join("emb/3")).unwrap();
        assert!(scan(d.path()).unwrap_err().to_string().contains("missing model.onnx"));
        std::fs::remove_dir_all(d.path().join("emb/3")).unwrap();
        touch(&d.path().join("Bad Name/1/model.onnx"));
        assert!(scan(d.path()).unwrap_err().to_string().contains("invalid model name"));

        let empty = tempfile::tempdir().unwrap();
        assert!(scan(empty.path()).unwrap_err().to_string().contains("has no models"));
        assert!(scan(&empty.path().join("nope")).unwrap_err().to_string().contains("nope"));
    }
}
