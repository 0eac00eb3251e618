//! ONNX Runtime sessions behind the [`Backend`] contract.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use geossl_models::mlm::CardContract;
use ort::ep::{ArenaExtendStrategy, ExecutionProviderDispatch, CUDA};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session};
use ort::value::{TensorElementType, TensorRef, ValueType};

use crate::infer::backend::{Backend, BackendError, ModelInfo, TensorSpec};

/// Why a model could not be loaded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    /// ONNX Runtime itself: its library is missing or does not start.
    #[error("{0}")]
    Runtime(String),
    /// The model file: missing, unreadable, or not a model geossl serves (one `[N, C, H, W]` input; uint8,
    /// uint16 or float32 tensors).
    #[error("{0}")]
    Model(String),
    /// The execution provider asked for (CUDA) could not be had.
    #[error("{0}")]
    Provider(String),
}
use crate::infer::tensor::{DType, Data, Tensor};

/// Which execution provider a model should get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EpPreference {
    /// CUDA when it registers, CPU otherwise.
    #[default]
    Auto,
    /// CUDA or fail.
    Cuda,
    /// CPU only.
    Cpu,
}

/// Whether inference goes through an ONNX Runtime IO binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum IoBindingMode {
    /// On for CUDA sessions (inputs staged in pinned host memory, copied to the
    /// device asynchronously; outputs copied back into pinned memory), off on CPU.
    #[default]
    Auto,
    /// Always (on CPU: staged in ONNX Runtime's CPU allocator; for tests).
    On,
    /// Never: plain `run` over borrowed host buffers.
    Off,
}

/// Session options.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub ep: EpPreference,
    pub device_id: i32,
    /// Intra-op threads of a CPU session (0 = ONNX Runtime's default).
    pub intra_threads: usize,
    /// CUDA arena limit in bytes (0 = no limit).
    pub gpu_mem_limit: usize,
    /// Let idle intra-op threads spin (ONNX Runtime's default); off frees
    /// cores for HTTP and decoding at some latency cost.
    pub spinning: bool,
    /// CUDA: prefer NHWC (channels-last) convolution kernels, which keep fp16
    /// tensor cores busy without per-layer layout transposes.
    pub cuda_nhwc: bool,
    pub io_binding: IoBindingMode,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            ep: EpPreference::Auto,
            device_id: 0,
            intra_threads: 0,
            gpu_mem_limit: 0,
            spinning: true,
            cuda_nhwc: true,
            io_binding: IoBindingMode::Auto,
        }
    }
}

static ENV: OnceLock<Result<ort::environment::Environment, LoadError>> = OnceLock::new();

/// Loads the ONNX Runtime library once (`lib`, e.g. `libonnxruntime.so.1.31.1`).
pub fn init(lib: &Path) -> Result<&'static ort::environment::Environment, LoadError> {
    ENV.get_or_init(|| {
        if !lib.exists() {
            return Err(LoadError::Runtime(format!(
                "ONNX Runtime library {} not found (run scripts/setup.sh, or pass --ort-lib / ORT_DYLIB_PATH)",
                lib.display()
            )));
        }
        ort::init_from(lib)
            .map_err(|e| LoadError::Runtime(format!("cannot load ONNX Runtime from {}: {e}", lib.display())))?
            .with_name("geossl-serve")
            .build()
            .map_err(|e| LoadError::Runtime(format!("cannot initialise ONNX Runtime: {e}")))
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// One ONNX Runtime session.
#[derive(Debug)]
pub struct OrtBackend {
    session: Session,
    input_name: String,
    output_names: Vec<String>,
    binding: Option<Binding>,
}

/// An IO binding with its staging allocator (pinned host memory under CUDA).
#[derive(Debug)]
struct Binding {
    io: IoBinding,
    input: Allocator,
    output: MemoryInfo<'static>,
    outputs: Vec<String>,
}

impl Binding {
    fn new(session: &Session, cuda: bool, outputs: &[String]) -> ort::Result<Self> {
        let (input, output) = if cuda {
            // Pinned host memory is a host allocation: ONNX Runtime registers it as device 0.
            let pinned = |t| MemoryInfo::new(AllocationDevice::CUDA_PINNED, 0, AllocatorType::Device, t);
            (Allocator::new(session, pinned(MemoryType::CPUInput)?)?, pinned(MemoryType::CPUOutput)?)
        } else {
            let cpu = MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default)?;
            (Allocator::default(), cpu)
        };
        Ok(Self { io: session.create_binding()?, input, output, outputs: outputs.to_vec() })
    }

    /// Copies `input` into staging memory and binds it as `name`; outputs are
    /// bound afresh (to the output device, shape unknown) because a binding
    /// keeps the previous run's outputs, whose batch size may differ.
    fn stage(&mut self, name: &str, input: &Tensor) -> ort::Result<()> {
        self.io.clear_outputs();
        for o in &self.outputs {
            self.io.bind_output_to_device(o.as_str(), &self.output)?;
        }
        let shape: Vec<i64> = input.shape.iter().map(|&d| d as i64).collect();
        match &input.data {
            Data::U8(v) => {
                let mut t = ort::value::Tensor::<u8>::new(&self.input, shape)?;
                t.extract_tensor_mut().1.copy_from_slice(v);
                self.io.bind_input(name, &t)
            }
            Data::U16(v) => {
                let mut t = ort::value::Tensor::<u16>::new(&self.input, shape)?;
                t.extract_tensor_mut().1.copy_from_slice(v);
                self.io.bind_input(name, &t)
            }
            Data::F32(v) => {
                let mut t = ort::value::Tensor::<f32>::new(&self.input, shape)?;
                t.extract_tensor_mut().1.copy_from_slice(v);
                self.io.bind_input(name, &t)
            }
        }
    }
}

fn dtype(t: TensorElementType) -> Option<DType> {
    match t {
        TensorElementType::Uint8 => Some(DType::U8),
        TensorElementType::Uint16 => Some(DType::U16),
        TensorElementType::Float32 => Some(DType::F32),
        _ => None,
    }
}

fn spec_of(name: &str, ty: &ValueType) -> Result<TensorSpec, LoadError> {
    let ValueType::Tensor { ty, shape, .. } = ty else {
        return Err(LoadError::Model(format!("`{name}` is not a tensor")));
    };
    let datatype = dtype(*ty).ok_or_else(|| {
        LoadError::Model(format!("`{name}` has element type {ty:?}; served models use uint8, uint16 or float32"))
    })?;
    Ok(TensorSpec { name: name.to_string(), datatype, shape: shape.iter().copied().collect() })
}

fn build(
    env: &ort::environment::Environment,
    path: &Path,
    opts: &SessionOptions,
    cuda: bool,
) -> Result<Session, LoadError> {
    let e = |e: ort::Error| {
        let m = format!("{}: {e}", path.display());
        if cuda {
            LoadError::Provider(m)
        } else {
            LoadError::Model(m)
        }
    };
    let mut b = Session::builder(env).map_err(e)?;
    if opts.intra_threads > 0 {
        b = b.with_intra_threads(opts.intra_threads).map_err(|err| e(err.into()))?;
    }
    if !opts.spinning {
        b = b.with_config_entry("session.intra_op.allow_spinning", "0").map_err(|err| e(err.into()))?;
        b = b.with_config_entry("session.inter_op.allow_spinning", "0").map_err(|err| e(err.into()))?;
    }
    if cuda {
        let mut ep = CUDA::default()
            .with_device_id(opts.device_id)
            .with_prefer_nhwc(opts.cuda_nhwc)
            .with_arena_extend_strategy(ArenaExtendStrategy::SameAsRequested);
        if opts.gpu_mem_limit > 0 {
            ep = ep.with_memory_limit(opts.gpu_mem_limit);
        }
        let eps: [ExecutionProviderDispatch; 1] = [ep.build().error_on_failure()];
        b = b.with_execution_providers(eps).map_err(|err| e(err.into()))?;
    }
    b.commit_from_file(path).map_err(e)
}

/// A CUDA session; when NHWC kernels were asked for and the provider refuses
/// them, once more without (speed is lost, the GPU is not).
fn build_cuda(env: &ort::environment::Environment, path: &Path, opts: &SessionOptions) -> Result<Session, LoadError> {
    match build(env, path, opts, true) {
        Err(e) if opts.cuda_nhwc => {
            tracing::warn!(model = %path.display(), reason = %e, "CUDA with NHWC kernels failed; retrying without");
            build(env, path, &SessionOptions { cuda_nhwc: false, ..opts.clone() }, true)
        }
        r => r,
    }
}

impl OrtBackend {
    /// Opens `path` with the execution provider `opts` asks for. Returns the
    /// session, what it accepts and produces, and the provider it got.
    pub fn load(
        env: &ort::environment::Environment,
        path: &Path,
        opts: &SessionOptions,
    ) -> Result<(Self, ModelSignature), LoadError> {
        let model = |m: String| LoadError::Model(m);
        if !path.is_file() {
            return Err(model(format!("{}: model file not found", path.display())));
        }
        let (session, ep) = match opts.ep {
            EpPreference::Cpu => (build(env, path, opts, false)?, "CPU"),
            EpPreference::Cuda => {
                (build_cuda(env, path, opts).map_err(|e| LoadError::Provider(format!("CUDA requested: {e}")))?, "CUDA")
            }
            EpPreference::Auto => match build_cuda(env, path, opts) {
                Ok(s) => (s, "CUDA"),
                Err(err) => {
                    tracing::info!(model = %path.display(), reason = %err, "CUDA execution provider unavailable; using CPU");
                    (build(env, path, opts, false)?, "CPU")
                }
            },
        };
        let inputs = session.inputs();
        if inputs.len() != 1 {
            return Err(model(format!(
                "{}: {} inputs; served models take one (`images`)",
                path.display(),
                inputs.len()
            )));
        }
        let input =
            spec_of(inputs[0].name(), inputs[0].dtype()).map_err(|e| model(format!("{}: {e}", path.display())))?;
        if input.shape.len() != 4 {
            return Err(model(format!(
                "{}: input `{}` has rank {}; expected [N, C, H, W]",
                path.display(),
                input.name,
                input.shape.len()
            )));
        }
        let outputs = session
            .outputs()
            .iter()
            .map(|o| spec_of(o.name(), o.dtype()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| model(format!("{}: {e}", path.display())))?;
        let mut metadata = BTreeMap::new();
        if let Ok(m) = session.metadata() {
            for k in m.custom_keys().unwrap_or_default() {
                if let Some(v) = m.custom(&k) {
                    metadata.insert(k, v);
                }
            }
        }
        let output_names: Vec<String> = outputs.iter().map(|o| o.name.clone()).collect();
        let cuda = ep == "CUDA";
        let binding = match (opts.io_binding, cuda) {
            (IoBindingMode::Off, _) | (IoBindingMode::Auto, false) => None,
            (IoBindingMode::On, _) => Some(
                Binding::new(&session, cuda, &output_names)
                    .map_err(|e| LoadError::Provider(format!("{}: IO binding: {e}", path.display())))?,
            ),
            // Auto under CUDA: a binding that can't be made costs speed, not service.
            (IoBindingMode::Auto, true) => match Binding::new(&session, cuda, &output_names) {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::warn!(model = %path.display(), reason = %e, "IO binding unavailable; plain run");
                    None
                }
            },
        };
        let execution_provider = if binding.is_some() { format!("{ep}+iobinding") } else { ep.to_string() };
        let sig = ModelSignature { input: input.clone(), outputs, metadata, execution_provider };
        Ok((Self { session, input_name: input.name, output_names, binding }, sig))
    }
}

/// What a loaded session accepts and produces.
#[derive(Debug, Clone)]
pub struct ModelSignature {
    pub input: TensorSpec,
    pub outputs: Vec<TensorSpec>,
    pub metadata: BTreeMap<String, String>,
    pub execution_provider: String,
}

impl ModelSignature {
    /// The model description for `name`/`version`: its input contract (bands, stored sample type,
    /// normalization), labels and output roles from a model card when there is one (checked against the
    /// session: input name, type and channels, output names), else from the exporter's metadata; labels
    /// from the repository's config first.
    pub fn into_info(
        self,
        name: &str,
        version: u64,
        labels_override: Option<Vec<String>>,
        card: Option<&CardContract>,
    ) -> Result<ModelInfo, LoadError> {
        use geossl_models::io::metadata as md;
        let spec = self.metadata.get(md::SPEC).and_then(|s| serde_json::from_str::<geossl_models::ModelSpec>(s).ok());
        let (labels, normalization, sample_type, bands, roles) = match card {
            Some(c) => {
                check_card(c, &self.input, &self.outputs)
                    .map_err(|m| LoadError::Model(format!("model {name}: {m}")))?;
                let roles = self
                    .outputs
                    .iter()
                    .map(|o| c.outputs.iter().find(|(n, _)| *n == o.name).map(|(_, r)| *r))
                    .collect();
                (c.labels.clone(), c.affine.clone(), c.sample_type, c.bands.clone(), roles)
            }
            None => (
                self.metadata.get(md::LABELS).and_then(|s| serde_json::from_str(s).ok()).unwrap_or_default(),
                spec.as_ref().map(|spec| spec.normalization.affine()),
                spec.as_ref().and_then(|spec| spec.sample_type),
                spec.as_ref().map(|spec| spec.bands.clone()).unwrap_or_default(),
                ModelInfo::roles_from_names(&self.outputs),
            ),
        };
        let task = ModelInfo::task_from_roles(&roles);
        Ok(ModelInfo {
            name: name.into(),
            version,
            input: self.input,
            outputs: self.outputs,
            roles,
            task,
            labels: labels_override.unwrap_or(labels),
            normalization,
            sample_type,
            bands,
            metadata: self.metadata,
            execution_provider: self.execution_provider,
        })
    }
}

/// Whether the card describes this session's model: input name, type and channel count, output names.
fn check_card(c: &CardContract, input: &TensorSpec, outputs: &[TensorSpec]) -> Result<(), String> {
    if c.input_name != input.name {
        return Err(format!("the model card's input is {:?}; the model's is {:?}", c.input_name, input.name));
    }
    let want = match c.input {
        geossl_models::InputDType::Uint8 => DType::U8,
        geossl_models::InputDType::Uint16 => DType::U16,
        geossl_models::InputDType::Float32 => DType::F32,
    };
    if want != input.datatype {
        return Err(format!(
            "the model card says input {:?} is {}; the model takes {}",
            input.name,
            want.oip_name(),
            input.datatype.oip_name()
        ));
    }
    let (card_c, model_c) = (c.shape.get(1).copied().unwrap_or(-1), input.shape.get(1).copied().unwrap_or(-1));
    if card_c > 0 && model_c > 0 && card_c != model_c {
        return Err(format!("the model card says {card_c} channels; the model takes {model_c}"));
    }
    if !c.bands.is_empty() && model_c > 0 && c.bands.len() as i64 != model_c {
        return Err(format!("the model card names {} bands; the model takes {model_c} channels", c.bands.len()));
    }
    for (n, _) in &c.outputs {
        if !outputs.iter().any(|o| o.name == *n) {
            return Err(format!(
                "the model card's output {n:?} is not one of the model's ({:?})",
                outputs.iter().map(|o| &o.name).collect::<Vec<_>>()
            ));
        }
    }
    Ok(())
}

/// Reads the model card at `path` into the contract a server takes from it.
pub fn read_card(path: &Path) -> Result<(geossl_models::mlm::Item, CardContract), LoadError> {
    let bad = |m: String| LoadError::Model(format!("{}: {m}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let item = geossl_models::mlm::Item::from_json(&text).map_err(|e| bad(e.to_string()))?;
    let contract = item.contract().map_err(|e| bad(e.to_string()))?;
    Ok((item, contract))
}

impl Backend for OrtBackend {
    fn infer(&mut self, input: &Tensor) -> Result<Vec<Tensor>, BackendError> {
        let err = |e: ort::Error| BackendError(e.to_string());
        let outputs = if let Some(b) = &mut self.binding {
            b.stage(&self.input_name, input).map_err(err)?;
            self.session.run_binding(&b.io).map_err(err)?
        } else {
            let shape: Vec<i64> = input.shape.iter().map(|&d| d as i64).collect();
            let value = match &input.data {
                Data::U8(v) => TensorRef::from_array_view((shape, v.as_slice())).map_err(err)?.into_dyn(),
                Data::U16(v) => TensorRef::from_array_view((shape, v.as_slice())).map_err(err)?.into_dyn(),
                Data::F32(v) => TensorRef::from_array_view((shape, v.as_slice())).map_err(err)?.into_dyn(),
            };
            self.session.run(vec![(self.input_name.as_str(), value)]).map_err(err)?
        };
        let mut out = Vec::with_capacity(self.output_names.len());
        for name in &self.output_names {
            let (shape, data) = outputs[name.as_str()].try_extract_tensor::<f32>().map_err(err)?;
            let shape = shape.iter().map(|&d| usize::try_from(d).unwrap_or(0)).collect();
            out.push(Tensor::f32(shape, data.to_vec()));
        }
        Ok(out)
    }
}
