//! Checkpoint directories (see `geossl_models::checkpoint`) from and into tch
//! variable stores.

use std::path::{Path, PathBuf};

use geossl_models::checkpoint::{commit_dir, spec_to_json, staging_dir, CheckpointPaths, WEIGHTS_FILE};
use geossl_models::{ModelSpec, NamedTensor, SpecError, StateDict, TensorData, WeightsError};
use tch::{nn, Device, Kind, Tensor};

use crate::model::Model;

/// Errors saving or loading a checkpoint; each names the file or directory.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: invalid spec: {msg}")]
    InvalidSpec { path: PathBuf, msg: String },
    #[error("tensor `{name}`: {error}")]
    Tch { name: String, error: tch::TchError },
}

/// A tch tensor as a named host tensor (int64 stays int64, everything else becomes f32).
pub fn to_named(name: &str, t: &Tensor) -> Result<NamedTensor, CheckpointError> {
    let flat = t.detach().to_device(Device::Cpu).reshape([-1]);
    let tch_err = |error| CheckpointError::Tch { name: name.to_string(), error };
    let data = if t.kind() == Kind::Int64 {
        TensorData::I64(Vec::<i64>::try_from(&flat).map_err(tch_err)?)
    } else {
        TensorData::F32(Vec::<f32>::try_from(&flat.to_kind(Kind::Float)).map_err(tch_err)?)
    };
    Ok(NamedTensor { name: name.to_string(), shape: t.size().iter().map(|&d| d as usize).collect(), data })
}

/// Copies `src` into `dst` (same shape; converted to `dst`'s kind and device); `path` is for messages.
pub fn copy_into(dst: &Tensor, src: &NamedTensor, path: &Path) -> Result<(), CheckpointError> {
    let want: Vec<usize> = dst.size().iter().map(|&d| d as usize).collect();
    if want != src.shape {
        return Err(CheckpointError::Weights(WeightsError::Mismatch {
            path: path.to_owned(),
            detail: format!("`{}` is {:?}, expected {:?}", src.name, src.shape, want),
        }));
    }
    let t = match &src.data {
        TensorData::F32(v) => Tensor::from_slice(v),
        TensorData::I64(v) => Tensor::from_slice(v),
    };
    let shape: Vec<i64> = want.iter().map(|&d| d as i64).collect();
    let mut d = dst.shallow_clone();
    tch::no_grad(|| d.f_copy_(&t.reshape(&shape[..]).to_kind(dst.kind()).to_device(dst.device())))
        .map_err(|error| CheckpointError::Tch { name: src.name.clone(), error })
}

/// The variables of `vs` as a state dict in the spec's (torchvision's) order.
pub fn state_dict(vs: &nn::VarStore, spec: &ModelSpec) -> Result<StateDict, CheckpointError> {
    let vars = vs.variables();
    let mut tensors = Vec::new();
    for p in spec.parameters() {
        let t = vars.get(&p.name).ok_or_else(|| CheckpointError::Tch {
            name: p.name.clone(),
            error: tch::TchError::TensorNameNotFound(p.name.clone(), "var store".into()),
        })?;
        tensors.push(to_named(&p.name, t)?);
    }
    Ok(StateDict { tensors, metadata: Default::default() })
}

/// Copies `sd` into the variables of `vs` after checking every name, shape
/// and element type against `spec`; `path` is used in messages.
pub fn load_state_dict(
    vs: &nn::VarStore,
    spec: &ModelSpec,
    sd: &StateDict,
    path: &Path,
) -> Result<(), CheckpointError> {
    sd.check(&spec.parameters(), path)?;
    let vars = vs.variables();
    let index = sd.index();
    for p in spec.parameters() {
        if let (Some(src), Some(dst)) = (index.get(p.name.as_str()), vars.get(&p.name)) {
            copy_into(dst, src, path)?;
        }
    }
    Ok(())
}

/// Writes `spec.json` + `model.safetensors` for `vs` into `dir`, atomically:
/// the directory is staged beside `dir` and renamed into place, so `dir` is
/// always the previous or the new complete checkpoint. `extra` may add files
/// (optimizer state, trainer state) to the staged directory before the rename.
pub fn save_checkpoint(
    dir: &Path,
    spec: &ModelSpec,
    vs: &nn::VarStore,
    extra: impl FnOnce(&Path) -> Result<(), CheckpointError>,
) -> Result<(), CheckpointError> {
    spec.validate().map_err(|e| CheckpointError::InvalidSpec { path: dir.to_owned(), msg: e.to_string() })?;
    let sd = state_dict(vs, spec)?;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| CheckpointError::Io { path, error: source }
    };
    let staged = staging_dir(dir).map_err(io(dir))?;
    let result = (|| {
        let paths = CheckpointPaths::new(&staged);
        std::fs::write(paths.spec(), spec_to_json(spec)).map_err(io(&paths.spec()))?;
        sd.write(&paths.weights())?;
        extra(&staged)?;
        commit_dir(&staged, dir).map_err(io(dir))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staged);
    }
    result
}

/// A model loaded from a checkpoint directory.
#[derive(Debug)]
pub struct Loaded {
    pub spec: ModelSpec,
    pub vs: nn::VarStore,
    pub model: Model,
}

/// Reads `dir/spec.json`, builds the model on `device` and loads `dir/model.safetensors`.
pub fn load_checkpoint(dir: &Path, device: Device) -> Result<Loaded, CheckpointError> {
    let paths = CheckpointPaths::new(dir);
    if !dir.is_dir() {
        return Err(CheckpointError::Io {
            path: dir.to_owned(),
            error: std::io::Error::new(std::io::ErrorKind::NotFound, "checkpoint directory not found"),
        });
    }
    let spec = paths.read_spec()?;
    let sd = StateDict::read(&paths.weights())?;
    let vs = nn::VarStore::new(device);
    let model = Model::new(&vs.root(), &spec);
    load_state_dict(&vs, &spec, &sd, &dir.join(WEIGHTS_FILE))?;
    Ok(Loaded { spec, vs, model })
}

/// A new checkpoint's architecture and heads (`geossl-train init`).
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub arch: geossl_models::Arch,
    /// Input bands (3: RGB with ImageNet's normalization; others: `band1..bandN`, identity normalization).
    pub bands: usize,
    pub input_size: usize,
    /// The sample type the model will take (default: uint8 for 3 bands, unrecorded otherwise).
    pub sample_type: Option<geossl_models::SampleType>,
    /// Add the MoCo-v2 projection (D → D → 128) to the embedding head.
    pub projection: bool,
    pub num_classes: Option<usize>,
    pub segmentation_classes: Option<usize>,
    /// Class names of the classifier/segmentation head.
    pub labels: Vec<String>,
    /// torchvision weights as safetensors to load (names must match the spec).
    pub from_safetensors: Option<PathBuf>,
    pub seed: i64,
}

/// Writes a checkpoint directory at `out` (replaced atomically) for `o`: random weights seeded by `o.seed`,
/// or `o.from_safetensors`'s; returns its spec.
pub fn init_checkpoint(o: &InitOptions, out: &Path) -> Result<ModelSpec, CheckpointError> {
    use geossl_models::{ClassifierHead, EmbeddingHead, HeadSpec, Normalization, ProjectionSpec, SegmentationHead};
    let mut spec = ModelSpec::rgb(o.arch, o.input_size);
    if o.bands != 3 {
        spec.backbone.in_channels = o.bands;
        spec.bands = (1..=o.bands).map(|i| format!("band{i}")).collect();
        spec.normalization = Normalization::identity(o.bands, 1.0);
        spec.sample_type = None;
    }
    if o.sample_type.is_some() {
        spec.sample_type = o.sample_type;
    }
    let d = o.arch.feature_dim();
    spec.heads.push(HeadSpec::Embedding(EmbeddingHead {
        projection: o.projection.then(|| ProjectionSpec::moco_v2(d)),
        l2_normalize: false,
    }));
    if let Some(k) = o.num_classes {
        spec.heads.push(HeadSpec::Classifier(ClassifierHead { num_classes: k, labels: o.labels.clone() }));
    }
    if let Some(k) = o.segmentation_classes {
        spec.heads.push(HeadSpec::Segmentation(SegmentationHead {
            num_classes: k,
            hidden: 64,
            labels: o.labels.clone(),
        }));
    }
    spec.validate().map_err(|msg| CheckpointError::InvalidSpec {
        path: out.to_owned(),
        msg: format!("invalid model options: {msg}"),
    })?;
    tch::manual_seed(o.seed);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let _model = crate::Model::new(&vs.root(), &spec);
    if let Some(src) = &o.from_safetensors {
        let sd = StateDict::read(src)?;
        load_state_dict(&vs, &spec, &sd, src)?;
        let bytes = std::fs::read(src).map_err(|error| CheckpointError::Io { path: src.clone(), error })?;
        spec.training = Some(geossl_models::TrainingInfo {
            method: "import".into(),
            source: Some(format!("{} sha256:{}", src.display(), geossl_models::sha256_hex(&bytes))),
            ..Default::default()
        });
    }
    save_checkpoint(out, &spec, &vs, |_| Ok(()))?;
    Ok(spec)
}
