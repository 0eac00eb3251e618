//! `model.safetensors` as a plain state dict, read and written in pure Rust so
//! the trainer, the exporter and the tests share one implementation and one
//! set of error messages.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::{tensor::TensorView, Dtype, SafeTensors};

use crate::param::ParamSpec;

/// Element data of one tensor. Float types are widened to f32 and int32 to
/// int64 on read; writes use f32 and int64.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

impl TensorData {
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::I64(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The f32 data, or `None` for an integer tensor.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            TensorData::F32(v) => Some(v),
            TensorData::I64(_) => None,
        }
    }
}

/// One named tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

/// An ordered collection of named tensors.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StateDict {
    pub tensors: Vec<NamedTensor>,
    /// The file's `__metadata__` entries.
    pub metadata: BTreeMap<String, String>,
}

/// Errors reading, writing or matching weights; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: not found")]
    Missing { path: PathBuf },
    #[error("{path}: cannot read or write: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: not a valid safetensors file ({msg}); the file is corrupt or truncated")]
    Corrupt { path: PathBuf, msg: String },
    #[error("{path}: tensor `{name}` has unsupported dtype {dtype}")]
    Dtype { path: PathBuf, name: String, dtype: String },
    #[error("{path}: weights do not match the model spec: {detail}")]
    Mismatch { path: PathBuf, detail: String },
}

impl StateDict {
    pub fn get(&self, name: &str) -> Option<&NamedTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Name → tensor index, for many look-ups.
    pub fn index(&self) -> HashMap<&str, &NamedTensor> {
        self.tensors.iter().map(|t| (t.name.as_str(), t)).collect()
    }

    /// Reads a safetensors file.
    pub fn read(path: &Path) -> Result<Self, WeightsError> {
        let bytes = std::fs::read(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                WeightsError::Missing { path: path.to_owned() }
            } else {
                WeightsError::Io { path: path.to_owned(), error: source }
            }
        })?;
        Self::from_bytes(&bytes, path)
    }

    /// Parses safetensors bytes; `path` is only used in messages.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, WeightsError> {
        let corrupt = |msg: String| WeightsError::Corrupt { path: path.to_owned(), msg };
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| corrupt(format!("{e:?}")))?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| corrupt(format!("{e:?}")))?;
        let mut names: Vec<(String, usize)> =
            meta.tensors().into_iter().map(|(n, info)| (n, info.data_offsets.0)).collect();
        names.sort_by_key(|(_, off)| *off);
        let mut tensors = Vec::with_capacity(names.len());
        for (name, _) in names {
            let view = st.tensor(&name).map_err(|e| corrupt(format!("{e:?}")))?;
            let data = decode(&view).ok_or_else(|| WeightsError::Dtype {
                path: path.to_owned(),
                name: name.clone(),
                dtype: format!("{:?}", view.dtype()),
            })?;
            tensors.push(NamedTensor { name, shape: view.shape().to_vec(), data });
        }
        let metadata = meta.metadata().clone().map(|m| m.into_iter().collect()).unwrap_or_default();
        Ok(Self { tensors, metadata })
    }

    /// Serializes to safetensors bytes; the error names the tensor safetensors refused.
    fn to_bytes(&self) -> Result<Vec<u8>, String> {
        let raw: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|t| {
                let (dtype, bytes) = match &t.data {
                    TensorData::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                    TensorData::I64(v) => (Dtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                };
                (t.name.clone(), dtype, t.shape.clone(), bytes)
            })
            .collect();
        let mut views = Vec::with_capacity(raw.len());
        for (name, dtype, shape, bytes) in &raw {
            let v = TensorView::new(*dtype, shape.clone(), bytes).map_err(|e| format!("tensor `{name}`: {e:?}"))?;
            views.push((name.as_str(), v));
        }
        let meta: HashMap<String, String> = self.metadata.clone().into_iter().collect();
        safetensors::serialize(views, if meta.is_empty() { None } else { Some(meta) }).map_err(|e| format!("{e:?}"))
    }

    /// Writes to `path` through a temporary sibling and a rename, so `path`
    /// is either absent, the previous file, or the complete new file.
    pub fn write(&self, path: &Path) -> Result<(), WeightsError> {
        let bytes = self.to_bytes().map_err(|msg| WeightsError::Corrupt { path: path.to_owned(), msg })?;
        write_atomic(path, &bytes).map_err(|source| WeightsError::Io { path: path.to_owned(), error: source })
    }

    /// Checks names, shapes and kinds against `expected`; lists every problem.
    pub fn check(&self, expected: &[ParamSpec], path: &Path) -> Result<(), WeightsError> {
        let have = self.index();
        let want: HashMap<&str, &ParamSpec> = expected.iter().map(|p| (p.name.as_str(), p)).collect();
        let mut missing = Vec::new();
        let mut bad = Vec::new();
        for p in expected {
            match have.get(p.name.as_str()) {
                None => missing.push(p.name.clone()),
                Some(t) if t.shape != p.shape => {
                    bad.push(format!("{} is {:?}, expected {:?}", p.name, t.shape, p.shape))
                }
                Some(t) if p.role.is_int64() != matches!(t.data, TensorData::I64(_)) => {
                    bad.push(format!("{} has the wrong element type", p.name))
                }
                Some(_) => {}
            }
        }
        let unexpected: Vec<String> =
            self.tensors.iter().filter(|t| !want.contains_key(t.name.as_str())).map(|t| t.name.clone()).collect();
        if missing.is_empty() && unexpected.is_empty() && bad.is_empty() {
            return Ok(());
        }
        let mut parts = Vec::new();
        if !missing.is_empty() {
            parts.push(format!("missing {} tensors: {}", missing.len(), list(&missing)));
        }
        if !unexpected.is_empty() {
            parts.push(format!("{} unexpected tensors: {}", unexpected.len(), list(&unexpected)));
        }
        if !bad.is_empty() {
            parts.push(format!("{} shape/type mismatches: {}", bad.len(), list(&bad)));
        }
        Err(WeightsError::Mismatch { path: path.to_owned(), detail: parts.join("; ") })
    }
}

/// At most 12 items, then a count of the rest.
fn list(items: &[String]) -> String {
    let shown: Vec<&str> = items.iter().take(12).map(String::as_str).collect();
    let mut s = shown.join(", ");
    if items.len() > shown.len() {
        s.push_str(&format!(", … and {} more", items.len() - shown.len()));
    }
    s
}

fn decode(view: &TensorView<'_>) -> Option<TensorData> {
    let b = view.data();
    Some(match view.dtype() {
        Dtype::F32 => {
            TensorData::F32(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        }
        Dtype::F64 => TensorData::F32(
            b.chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
                .collect(),
        ),
        Dtype::F16 => {
            TensorData::F32(b.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect())
        }
        Dtype::BF16 => TensorData::F32(
            b.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect(),
        ),
        Dtype::I64 => TensorData::I64(
            b.chunks_exact(8).map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])).collect(),
        ),
        Dtype::I32 => {
            TensorData::I64(b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect())
        }
        _ => return None,
    })
}

/// IEEE half → single precision.
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: normalize.
            let mut e = 127 - 15 + 1;
            let mut m = m;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | ((e as u32) << 23) | ((m & 0x3ff) << 13)
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// Writes `bytes` to a temporary sibling of `path` (its directory made if missing), syncs it, renames it
/// over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp_name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Arch, ModelSpec};

    fn random_state(spec: &ModelSpec) -> StateDict {
        let mut seed = 1u32;
        let tensors = spec
            .parameters()
            .into_iter()
            .map(|p| {
                let n = p.numel();
                let data = if p.role.is_int64() {
                    TensorData::I64(vec![3; n])
                } else {
                    TensorData::F32(
                        (0..n)
                            .map(|_| {
                                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                                (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
                            })
                            .collect(),
                    )
                };
                NamedTensor { name: p.name, shape: p.shape, data }
            })
            .collect();
        StateDict { tensors, metadata: BTreeMap::new() }
    }

    #[test]
    fn write_read_round_trip_is_exact_and_checks_pass() {
        let spec = ModelSpec::rgb(Arch::Resnet18, 64);
        let sd = random_state(&spec);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        sd.write(&path).unwrap();
        let back = StateDict::read(&path).unwrap();
        // safetensors stores tensors in its own order; contents must be identical.
        let sorted = |s: &StateDict| {
            let mut t = s.tensors.clone();
            t.sort_by(|a, b| a.name.cmp(&b.name));
            t
        };
        assert_eq!(sorted(&back), sorted(&sd));
        back.check(&spec.parameters(), &path).unwrap();
    }

    #[test]
    fn mismatches_and_corruption_are_named() {
        let spec = ModelSpec::rgb(Arch::Resnet18, 64);
        let mut sd = random_state(&spec);
        sd.tensors.retain(|t| t.name != "layer1.0.conv1.weight");
        sd.tensors[0].shape = vec![64, 4, 7, 7];
        sd.tensors.push(NamedTensor { name: "extra".into(), shape: vec![1], data: TensorData::F32(vec![0.0]) });
        let e = sd.check(&spec.parameters(), Path::new("w.safetensors")).unwrap_err().to_string();
        assert!(e.contains("w.safetensors"), "{e}");
        assert!(e.contains("missing 1 tensors: layer1.0.conv1.weight"), "{e}");
        assert!(e.contains("unexpected tensors: extra"), "{e}");
        assert!(e.contains("conv1.weight is [64, 4, 7, 7], expected [64, 3, 7, 7]"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        random_state(&spec).write(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let e = StateDict::read(&path).unwrap_err().to_string();
        assert!(e.contains("model.safetensors") && e.contains("corrupt or truncated"), "{e}");
        std::fs::write(&path, b"garbage").unwrap();
        assert!(matches!(StateDict::read(&path), Err(WeightsError::Corrupt { .. })));
        let e = StateDict::read(&dir.path().join("nope.safetensors")).unwrap_err().to_string();
        assert!(e.contains("nope.safetensors: not found"), "{e}");
    }

    #[test]
    fn half_precision_decodes() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert!(f16_to_f32(0x7c00).is_infinite());
    }
}
