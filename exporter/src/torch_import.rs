//! Import of PyTorch checkpoints (`torch.save` zip files: `.pth`, `.pth.tar`)
//! and torchvision-layout safetensors into a geossl checkpoint directory, in
//! pure Rust (no Python at run time).
//!
//! Layouts recognised:
//! * the paper's released MoCo checkpoints: `{"state_dict": {"module.encoder_q.<torchvision name>",
//!   "module.encoder_q.fc.0/fc.2.*" (MLP projection), "module.encoder_k.*", "module.queue", ...}, ...}`;
//! * plain torchvision state dicts (optionally under `state_dict`/`model`, optionally with `module.`);
//! * safetensors in torchvision layout (e.g. TorchGeo's GASSL ResNet-50).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use geossl_models::checkpoint::{commit_dir, spec_to_json, staging_dir, CheckpointPaths};
use geossl_models::{
    Arch, ClassifierHead, EmbeddingHead, HeadSpec, ModelSpec, NamedTensor, ProjectionSpec, StateDict, TensorData,
    TrainingInfo,
};

use crate::pickle::{parse, Value};
use crate::ExportError;

fn bad(path: &Path, msg: impl std::fmt::Display) -> ExportError {
    ExportError::Unsupported(format!("{}: {msg}", path.display()))
}

/// Every tensor of a `torch.save` zip file, by its key path (`state_dict.module.encoder_q.conv1.weight`).
pub fn read_torch_zip(path: &Path) -> Result<BTreeMap<String, NamedTensor>, ExportError> {
    let f = std::fs::File::open(path).map_err(|error| ExportError::Io { path: path.to_owned(), error })?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| {
        bad(path, format!("not a PyTorch zip checkpoint ({e}); legacy non-zip torch.save files are not supported"))
    })?;
    let pkl_name = (0..zip.len())
        .filter_map(|i| zip.by_index(i).ok().map(|f| f.name().to_string()))
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| bad(path, "no data.pkl inside: not a torch.save file"))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let mut pkl = Vec::new();
    zip.by_name(&pkl_name).map_err(|e| bad(path, e))?.read_to_end(&mut pkl).map_err(|e| bad(path, e))?;
    let root = parse(&pkl).map_err(|e| bad(path, e))?;
    let mut out = BTreeMap::new();
    let mut storages: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    walk(&root, String::new(), &mut |key, v| {
        let Some((storage, offset, size, stride)) = as_tensor(v) else { return Ok(false) };
        let (dtype, skey) = storage;
        if !storages.contains_key(&skey) {
            let mut b = Vec::new();
            zip.by_name(&format!("{prefix}data/{skey}"))
                .map_err(|e| bad(path, format!("storage {skey}: {e}")))?
                .read_to_end(&mut b)
                .map_err(|e| bad(path, format!("storage {skey}: {e}")))?;
            storages.insert(skey.clone(), b);
        }
        let t = materialize(&storages[&skey], &dtype, offset, &size, &stride)
            .map_err(|e| bad(path, format!("{key}: {e}")))?;
        out.insert(key.to_string(), NamedTensor { name: key.to_string(), shape: size, data: t });
        Ok(true)
    })?;
    if out.is_empty() {
        return Err(bad(path, "no tensors found"));
    }
    Ok(out)
}

type TensorRef = ((String, String), usize, Vec<usize>, Vec<usize>);

/// `_rebuild_tensor_v2(storage, offset, size, stride, ...)` with a persistent storage.
fn as_tensor(v: &Value) -> Option<TensorRef> {
    let Value::Call(f, args, _) = v else { return None };
    let Value::Global(m, n) = f.as_ref() else { return None };
    if m != "torch._utils" || !n.starts_with("_rebuild_tensor") {
        return None;
    }
    let a = args.items()?;
    let Value::Persistent(pid) = a.first()? else { return None };
    let p = pid.items()?;
    let dtype = match p.get(1)? {
        Value::Global(_, n) => n.clone(),
        _ => return None,
    };
    let key = p.get(2)?.as_str()?.to_string();
    let offset = a.get(1)?.as_int()? as usize;
    let size = a.get(2)?.items()?.iter().map(|x| x.as_int().map(|v| v as usize)).collect::<Option<Vec<_>>>()?;
    let stride = a.get(3)?.items()?.iter().map(|x| x.as_int().map(|v| v as usize)).collect::<Option<Vec<_>>>()?;
    Some(((dtype, key), offset, size, stride))
}

fn materialize(
    bytes: &[u8],
    dtype: &str,
    offset: usize,
    size: &[usize],
    stride: &[usize],
) -> Result<TensorData, String> {
    let n: usize = size.iter().product();
    // Element indices in row-major order of `size`, through `stride`.
    let mut idx = Vec::with_capacity(n);
    let mut pos = vec![0usize; size.len()];
    for _ in 0..n {
        idx.push(offset + pos.iter().zip(stride).map(|(p, s)| p * s).sum::<usize>());
        for d in (0..size.len()).rev() {
            pos[d] += 1;
            if pos[d] < size[d] {
                break;
            }
            pos[d] = 0;
        }
    }
    let get = |w: usize, i: usize| -> Result<&[u8], String> {
        bytes.get(i * w..(i + 1) * w).ok_or_else(|| "storage is shorter than the tensor (truncated file?)".to_string())
    };
    Ok(match dtype {
        "FloatStorage" => TensorData::F32(
            idx.iter()
                .map(|&i| get(4, i).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                .collect::<Result<_, _>>()?,
        ),
        "DoubleStorage" => TensorData::F32(
            idx.iter()
                .map(|&i| {
                    get(8, i).map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
                })
                .collect::<Result<_, _>>()?,
        ),
        "HalfStorage" => TensorData::F32(
            idx.iter()
                .map(|&i| get(2, i).map(|b| geossl_models::weights::f16_to_f32(u16::from_le_bytes([b[0], b[1]]))))
                .collect::<Result<_, _>>()?,
        ),
        "BFloat16Storage" => TensorData::F32(
            idx.iter()
                .map(|&i| get(2, i).map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)))
                .collect::<Result<_, _>>()?,
        ),
        "LongStorage" => TensorData::I64(
            idx.iter()
                .map(|&i| get(8, i).map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])))
                .collect::<Result<_, _>>()?,
        ),
        other => return Err(format!("unsupported storage type {other}")),
    })
}

/// Visits every value with its dotted key path; `f` returns whether it consumed the value.
fn walk(
    v: &Value,
    key: String,
    f: &mut dyn FnMut(&str, &Value) -> Result<bool, ExportError>,
) -> Result<(), ExportError> {
    if f(&key, v)? {
        return Ok(());
    }
    if let Some(entries) = v.entries() {
        for (k, child) in entries {
            let name = match k {
                Value::Str(s) => s.clone(),
                Value::Int(i) => i.to_string(),
                _ => continue,
            };
            walk(child, if key.is_empty() { name } else { format!("{key}.{name}") }, f)?;
        }
    }
    Ok(())
}

/// Maps the tensors of a checkpoint onto geossl names; returns the state dict
/// and whether an MLP projection and a classifier were found.
fn to_geossl(
    tensors: BTreeMap<String, NamedTensor>,
    spec: &ModelSpec,
    keep_projection: bool,
) -> (StateDict, Vec<String>, bool, bool) {
    let backbone: std::collections::HashSet<String> = spec.backbone.parameters().into_iter().map(|p| p.name).collect();
    // Strip the longest known wrapper prefix.
    let strip = |k: &str| -> Option<String> {
        for p in [
            "state_dict.module.encoder_q.",
            "module.encoder_q.",
            "state_dict.module.",
            "state_dict.",
            "model.",
            "module.",
            "",
        ] {
            if let Some(rest) = k.strip_prefix(p) {
                return Some(rest.to_string());
            }
        }
        None
    };
    let moco = tensors.keys().any(|k| k.contains("encoder_q."));
    let mut out = Vec::new();
    let mut unknown = Vec::new();
    let (mut has_proj, mut has_fc) = (false, false);
    for (k, mut t) in tensors {
        // MoCo checkpoints: only the query encoder counts; the key encoder, queue and optimizer are training state.
        if moco && !k.contains("encoder_q.") {
            continue;
        }
        if k.starts_with("optimizer.") || k.ends_with("queue") || k.ends_with("queue_ptr") {
            continue;
        }
        let Some(name) = strip(&k) else { continue };
        let mapped = if backbone.contains(&name) {
            Some(name.clone())
        } else if moco && (name.starts_with("fc.0.") || name.starts_with("fc.2.")) {
            has_proj = true;
            keep_projection.then(|| name.replacen("fc.", "proj.", 1))
        } else if !moco && (name == "fc.weight" || name == "fc.bias") {
            has_fc = true;
            Some(name.clone())
        } else {
            unknown.push(k.clone());
            None
        };
        if let Some(n) = mapped {
            t.name = n;
            out.push(t);
        }
    }
    (StateDict { tensors: out, metadata: Default::default() }, unknown, has_proj && keep_projection, has_fc)
}

/// Options of [`import_checkpoint`].
#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub arch: Arch,
    /// Input size (square) recorded in the spec; the exported graph's fixed H and W.
    pub input_size: usize,
    /// Keep a MoCo MLP projection as the embedding head's projection (default: backbone features only).
    pub keep_projection: bool,
    /// The input contract of a checkpoint that is not 8-bit RGB with ImageNet statistics (e.g.
    /// SSL4EO-S12's 13-band Sentinel-2 ResNet-50): band names in channel order, the stored sample
    /// type and the normalization the weights were trained with. Required when `conv1` does not take 3 bands.
    pub input: Option<InputContract>,
}

/// Band names, stored sample type and normalization of a model's input.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputContract {
    pub bands: Vec<String>,
    pub sample_type: geossl_models::SampleType,
    pub normalization: geossl_models::Normalization,
}

/// Imports `from` (`.pth`/`.pth.tar`/`.safetensors`) into the checkpoint directory `out`.
/// Unknown or missing keys are errors listing them; nothing is written then.
pub fn import_checkpoint(from: &Path, out: &Path, opts: ImportOptions) -> Result<ModelSpec, ExportError> {
    let bytes_hash = geossl_models::sha256_hex(
        &std::fs::read(from).map_err(|error| ExportError::Io { path: from.to_owned(), error })?,
    );
    let tensors: BTreeMap<String, NamedTensor> = if from.extension().is_some_and(|e| e == "safetensors") {
        StateDict::read(from)?.tensors.into_iter().map(|t| (t.name.clone(), t)).collect()
    } else {
        read_torch_zip(from)?
    };
    let mut spec = ModelSpec::rgb(opts.arch, opts.input_size);
    // The band count is conv1's: [64, C, 7, 7].
    let c = tensors
        .iter()
        .find(|(k, _)| k.ends_with("conv1.weight") && !k.contains("layer"))
        .and_then(|(_, t)| (t.shape.len() == 4).then(|| t.shape[1]))
        .ok_or_else(|| bad(from, "no conv1.weight of shape [64, C, 7, 7]"))?;
    match &opts.input {
        Some(contract) => {
            if contract.bands.len() != c {
                return Err(bad(
                    from,
                    format!(
                        "conv1 takes {c} bands; the input contract names {}: {:?}",
                        contract.bands.len(),
                        contract.bands
                    ),
                ));
            }
            contract.normalization.validate(c).map_err(|e| bad(from, format!("input contract: {e}")))?;
            spec.backbone.in_channels = c;
            spec.bands = contract.bands.clone();
            spec.sample_type = Some(contract.sample_type);
            spec.normalization = contract.normalization.clone();
        }
        None if c != 3 => {
            return Err(bad(
                from,
                format!(
                    "conv1 takes {c} bands, not RGB: give the input contract (band names, sample type, normalization)"
                ),
            ))
        }
        None => {}
    }
    let (mut sd, unknown, has_proj, has_fc) = to_geossl(tensors, &spec, opts.keep_projection);
    if !unknown.is_empty() {
        let shown: Vec<&str> = unknown.iter().take(12).map(String::as_str).collect();
        return Err(bad(
            from,
            format!(
                "{} unknown keys: {}{}",
                unknown.len(),
                shown.join(", "),
                if unknown.len() > 12 { ", …" } else { "" }
            ),
        ));
    }
    let d = opts.arch.feature_dim();
    let proj = has_proj.then(|| {
        let hidden = sd.get("proj.0.weight").map_or(d, |t| t.shape[0]);
        let out = sd.get("proj.2.weight").map_or(128, |t| t.shape[0]);
        ProjectionSpec { hidden, out }
    });
    spec.heads.push(HeadSpec::Embedding(EmbeddingHead { projection: proj, l2_normalize: false }));
    if has_fc {
        let k = sd.get("fc.weight").map_or(1000, |t| t.shape[0]);
        spec.heads.push(HeadSpec::Classifier(ClassifierHead { num_classes: k, labels: vec![] }));
    }
    // Checkpoints without BN step counters (older torchvision) get zeros, as torchvision would.
    for p in spec.parameters() {
        if p.role.is_int64() && sd.get(&p.name).is_none() {
            sd.tensors.push(NamedTensor { name: p.name, shape: vec![], data: TensorData::I64(vec![0]) });
        }
    }
    sd.check(&spec.parameters(), from)?;
    spec.training = Some(TrainingInfo {
        method: "import".into(),
        source: Some(format!(
            "{} sha256:{bytes_hash}",
            from.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        )),
        ..Default::default()
    });
    let staged = staging_dir(out).map_err(|error| ExportError::Io { path: out.to_owned(), error })?;
    let result = (|| {
        let p = CheckpointPaths::new(&staged);
        std::fs::write(p.spec(), spec_to_json(&spec)).map_err(|error| ExportError::Io { path: p.spec(), error })?;
        sd.write(&p.weights())?;
        commit_dir(&staged, out).map_err(|error| ExportError::Io { path: out.to_owned(), error })
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staged);
    }
    result.map(|_| spec)
}
