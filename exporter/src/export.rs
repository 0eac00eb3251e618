//! Checkpoint directory → ONNX model, built from the spec and the weights
//! (no tracing, no libtorch): BatchNorm folded into the convolutions,
//! normalization inside the graph for uint8 input, dynamic batch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use geossl_models::checkpoint::CheckpointPaths;
use geossl_models::io::{metadata, INPUT_NAME};
use geossl_models::mlm;
use geossl_models::{
    BlockKind, Dim, ElemType, HeadKind, HeadSpec, InputDType, IoContract, ModelSpec, SpecError, StateDict, TensorData,
    WeightsError,
};
use prost::Message;

use crate::graph::{value_info, Attr, Graph, D};
use crate::onnx_pb::{tensor_proto::DataType, ModelProto, OperatorSetIdProto, StringStringEntryProto};

/// BatchNorm epsilon of torchvision/tch.
pub const BN_EPS: f32 = 1e-5;

/// Errors of an export; each names the file or the problem.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{0}")]
    Unsupported(String),
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
}

/// What to export.
#[derive(Debug, Clone, Copy)]
pub struct ExportOptions {
    pub head: HeadKind,
    pub input: InputDType,
    /// fp16 weights and compute, fp32 inputs/outputs.
    pub fp16: bool,
    pub opset: i64,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self { head: HeadKind::Embedding, input: InputDType::Uint8, fp16: false, opset: 17 }
    }
}

/// Graph under construction plus the weights it reads.
struct Builder<'a> {
    g: Graph,
    weights: HashMap<&'a str, &'a [f32]>,
    shapes: HashMap<String, Vec<usize>>,
    fp16: bool,
}

impl Builder<'_> {
    fn w(&self, name: &str) -> Result<&[f32], ExportError> {
        self.weights.get(name).copied().ok_or_else(|| ExportError::Unsupported(format!("weight `{name}` is missing")))
    }

    fn shape(&self, name: &str) -> Result<Vec<i64>, ExportError> {
        self.shapes
            .get(name)
            .map(|s| s.iter().map(|&d| d as i64).collect())
            .ok_or_else(|| ExportError::Unsupported(format!("no shape for `{name}`")))
    }

    fn init(&mut self, name: &str, dims: &[i64], data: &[f32]) -> String {
        if self.fp16 {
            self.g.init_f16(name, dims, data)
        } else {
            self.g.init_f32(name, dims, data)
        }
    }

    /// `Conv(x)` with the BatchNorm `bn` folded in: `W·s`, `β − μ·s`, `s = γ/√(σ²+ε)`.
    fn conv_bn(&mut self, x: &str, conv: &str, bn: &str, stride: i64, pad: i64) -> Result<String, ExportError> {
        let wname = format!("{conv}.weight");
        let dims = self.shape(&wname)?;
        let mut w = self.w(&wname)?.to_vec();
        let gamma = self.w(&format!("{bn}.weight"))?;
        let beta = self.w(&format!("{bn}.bias"))?;
        let mean = self.w(&format!("{bn}.running_mean"))?;
        let var = self.w(&format!("{bn}.running_var"))?;
        let o = dims[0] as usize;
        let per = w.len() / o;
        let mut b = vec![0f32; o];
        for c in 0..o {
            let s = gamma[c] / (var[c] + BN_EPS).sqrt();
            w[c * per..(c + 1) * per].iter_mut().for_each(|v| *v *= s);
            b[c] = beta[c] - mean[c] * s;
        }
        let wn = self.init(&wname, &dims, &w);
        let bn_ = self.init(&format!("{conv}.bias"), &[o as i64], &b);
        Ok(self.g.node(
            "Conv",
            &[x, &wn, &bn_],
            &[
                ("kernel_shape", Attr::Ints(vec![dims[2], dims[3]])),
                ("strides", Attr::Ints(vec![stride, stride])),
                ("pads", Attr::Ints(vec![pad, pad, pad, pad])),
            ],
            None,
        ))
    }

    /// `Conv(x)` with the layer's own bias (no BN), stride 1.
    fn conv_bias(&mut self, x: &str, conv: &str, pad: i64) -> Result<String, ExportError> {
        let (wn, bn) = (format!("{conv}.weight"), format!("{conv}.bias"));
        let (wd, bd) = (self.shape(&wn)?, self.shape(&bn)?);
        let (w, b) = (self.w(&wn)?.to_vec(), self.w(&bn)?.to_vec());
        let wi = self.init(&wn, &wd, &w);
        let bi = self.init(&bn, &bd, &b);
        Ok(self.g.node(
            "Conv",
            &[x, &wi, &bi],
            &[("kernel_shape", Attr::Ints(vec![wd[2], wd[3]])), ("pads", Attr::Ints(vec![pad, pad, pad, pad]))],
            None,
        ))
    }

    /// `x · Wᵀ + b` for a linear layer `prefix`.
    fn linear(&mut self, x: &str, prefix: &str, out: Option<&str>) -> Result<String, ExportError> {
        let (wn, bn) = (format!("{prefix}.weight"), format!("{prefix}.bias"));
        let (wd, bd) = (self.shape(&wn)?, self.shape(&bn)?);
        let (w, b) = (self.w(&wn)?.to_vec(), self.w(&bn)?.to_vec());
        let wi = self.init(&wn, &wd, &w);
        let bi = self.init(&bn, &bd, &b);
        Ok(self.g.node("Gemm", &[x, &wi, &bi], &[("transB", Attr::Int(1))], out))
    }

    fn relu(&mut self, x: &str) -> String {
        self.g.node("Relu", &[x], &[], None)
    }

    /// Backbone from normalized float input to the last feature map.
    fn backbone(&mut self, spec: &ModelSpec, x: &str) -> Result<String, ExportError> {
        let mut y = self.conv_bn(x, "conv1", "bn1", 2, 3)?;
        y = self.relu(&y);
        y = self.g.node(
            "MaxPool",
            &[&y],
            &[
                ("kernel_shape", Attr::Ints(vec![3, 3])),
                ("strides", Attr::Ints(vec![2, 2])),
                ("pads", Attr::Ints(vec![1, 1, 1, 1])),
            ],
            None,
        );
        for b in spec.backbone.blocks() {
            let p = &b.prefix;
            let s = b.stride as i64;
            let mut z = match b.kind {
                BlockKind::Basic => {
                    let z = self.conv_bn(&y, &format!("{p}.conv1"), &format!("{p}.bn1"), s, 1)?;
                    let z = self.relu(&z);
                    self.conv_bn(&z, &format!("{p}.conv2"), &format!("{p}.bn2"), 1, 1)?
                }
                BlockKind::Bottleneck => {
                    let z = self.conv_bn(&y, &format!("{p}.conv1"), &format!("{p}.bn1"), 1, 0)?;
                    let z = self.relu(&z);
                    let z = self.conv_bn(&z, &format!("{p}.conv2"), &format!("{p}.bn2"), s, 1)?;
                    let z = self.relu(&z);
                    self.conv_bn(&z, &format!("{p}.conv3"), &format!("{p}.bn3"), 1, 0)?
                }
            };
            let skip = if b.downsample {
                self.conv_bn(&y, &format!("{p}.downsample.0"), &format!("{p}.downsample.1"), s, 0)?
            } else {
                y.clone()
            };
            z = self.g.node("Add", &[&z, &skip], &[], None);
            y = self.relu(&z);
        }
        Ok(y)
    }
}

fn dims(c: &[Dim]) -> Vec<D> {
    c.iter()
        .map(|d| match d {
            Dim::Fixed(v) => D::Fixed(*v as i64),
            Dim::Dynamic(s) => D::Sym(s.clone()),
        })
        .collect()
}

fn elem(e: ElemType) -> DataType {
    match e {
        ElemType::Uint8 => DataType::Uint8,
        ElemType::Uint16 => DataType::Uint16,
        ElemType::Float32 => DataType::Float,
    }
}

/// Builds the ONNX model of `spec` + `weights` for `opts`. `source_sha256`
/// identifies the checkpoint in the metadata.
pub fn build_model(
    spec: &ModelSpec,
    weights: &StateDict,
    opts: &ExportOptions,
    source_sha256: &str,
) -> Result<ModelProto, ExportError> {
    let contract =
        IoContract::for_export(spec, opts.head, opts.input).map_err(|e| ExportError::Unsupported(e.to_string()))?;
    // Integer inputs carry stored samples: their type must be the one the normalization was made for.
    if let (Some(want), Some(trained)) = (opts.input.samples(), spec.sample_type) {
        if want != trained {
            return Err(ExportError::Unsupported(format!(
                "the checkpoint's normalization is for {trained} samples; export with --input {trained} or float32, not {want}"
            )));
        }
    }
    let mut w = HashMap::new();
    for t in &weights.tensors {
        if let TensorData::F32(v) = &t.data {
            w.insert(t.name.as_str(), v.as_slice());
        }
    }
    let shapes = spec.parameters().into_iter().map(|p| (p.name, p.shape)).collect();
    let mut b = Builder { g: Graph::default(), weights: w, shapes, fp16: opts.fp16 };

    // Input → normalized float (fp16 when asked).
    let mut x = INPUT_NAME.to_string();
    let c = spec.backbone.in_channels as i64;
    match opts.input {
        InputDType::Uint8 | InputDType::Uint16 => {
            // x * (scale / std) + (offset - mean) / std: the spec's one normalization.
            x = b.g.node("Cast", &[&x], &[("to", Attr::Int(DataType::Float as i64))], None);
            let (mul, add) = spec.normalization.affine();
            let m = b.g.init_f32("normalize.mul", &[1, c, 1, 1], &mul);
            let a = b.g.init_f32("normalize.add", &[1, c, 1, 1], &add);
            x = b.g.node("Mul", &[&x, &m], &[], None);
            x = b.g.node("Add", &[&x, &a], &[], None);
        }
        InputDType::Float32 => {}
    }
    if opts.fp16 {
        x = b.g.node("Cast", &[&x], &[("to", Attr::Int(DataType::Float16 as i64))], None);
    }
    let fm = b.backbone(spec, &x)?;
    let pooled = b.g.node("GlobalAveragePool", &[&fm], &[], None);
    let pooled = b.g.node("Flatten", &[&pooled], &[("axis", Attr::Int(1))], None);

    // Heads; the final values are cast back to float32 under fp16.
    let mut finals: Vec<(String, String)> = Vec::new(); // (value, output name)
    match (opts.head, spec.head(opts.head)) {
        (HeadKind::Embedding, head) => {
            let mut y = pooled;
            if let Some(HeadSpec::Embedding(e)) = head {
                if e.projection.is_some() {
                    y = b.linear(&y, "proj.0", None)?;
                    y = b.relu(&y);
                    y = b.linear(&y, "proj.2", None)?;
                }
                if e.l2_normalize {
                    y = b.g.node("LpNormalization", &[&y], &[("axis", Attr::Int(1)), ("p", Attr::Int(2))], None);
                }
            }
            finals.push((y, contract.outputs[0].name.clone()));
        }
        (HeadKind::Segmentation, Some(HeadSpec::Segmentation(_))) => {
            // FCN head on the last feature map, then bilinear upsampling to the input's H×W
            // (half_pixel = torch's align_corners=False).
            let y = b.conv_bn(&fm, "seg.0", "seg.1", 1, 1)?;
            let y = b.relu(&y);
            let y = b.conv_bias(&y, "seg.4", 0)?;
            let s_in = b.g.node("Shape", &[INPUT_NAME], &[], None);
            let s_y = b.g.node("Shape", &[&y], &[], None);
            let (i0, i2, i4) = (
                b.g.init_i64("const.0", &[1], &[0]),
                b.g.init_i64("const.2", &[1], &[2]),
                b.g.init_i64("const.4", &[1], &[4]),
            );
            let nk = b.g.node("Slice", &[&s_y, &i0, &i2], &[], None);
            let hw = b.g.node("Slice", &[&s_in, &i2, &i4], &[], None);
            let sizes = b.g.node("Concat", &[&nk, &hw], &[("axis", Attr::Int(0))], None);
            let up = b.g.node(
                "Resize",
                &[&y, "", "", &sizes],
                &[("mode", Attr::Str("linear")), ("coordinate_transformation_mode", Attr::Str("half_pixel"))],
                None,
            );
            finals.push((up, contract.outputs[0].name.clone()));
        }
        (HeadKind::Classifier, Some(HeadSpec::Classifier(_))) => {
            let logits = b.linear(&pooled, "fc", None)?;
            let probs = b.g.node("Softmax", &[&logits], &[("axis", Attr::Int(1))], None);
            finals.push((logits, contract.outputs[0].name.clone()));
            finals.push((probs, contract.outputs[1].name.clone()));
        }
        // Patch-level embeddings: the last feature map as it is.
        (HeadKind::Features, _) => finals.push((fm, contract.outputs[0].name.clone())),
        (k, _) => return Err(ExportError::Unsupported(format!("cannot export head {}", k.name()))),
    }
    for (v, name) in &finals {
        if opts.fp16 {
            b.g.node("Cast", &[v], &[("to", Attr::Int(DataType::Float as i64))], Some(name));
        } else {
            b.g.node("Identity", &[v], &[], Some(name));
        }
    }

    let inputs = contract.inputs.iter().map(|t| value_info(&t.name, elem(t.dtype), &dims(&t.dims))).collect();
    let outputs = contract.outputs.iter().map(|t| value_info(&t.name, elem(t.dtype), &dims(&t.dims))).collect();
    let graph = b.g.finish("geossl", inputs, outputs);

    let labels: Vec<String> = match spec.head(opts.head) {
        Some(HeadSpec::Classifier(c)) => c.labels.clone(),
        Some(HeadSpec::Segmentation(s)) => s.labels.clone(),
        _ => Vec::new(),
    };
    let kv = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
    let spec_json = serde_json::to_string(spec).map_err(|e| ExportError::Unsupported(e.to_string()))?;
    let mut meta = vec![
        kv(metadata::VERSION, geossl_models::GEOSSL_VERSION.into()),
        kv(metadata::SPEC, spec_json),
        kv(metadata::HEAD, opts.head.name().into()),
        kv(
            metadata::INPUT_DTYPE,
            match opts.input {
                InputDType::Uint8 => "uint8".into(),
                InputDType::Uint16 => "uint16".into(),
                InputDType::Float32 => "float32".into(),
            },
        ),
        kv(metadata::LABELS, serde_json::to_string(&labels).unwrap_or_default()),
        kv(metadata::SOURCE_SHA256, source_sha256.into()),
    ];
    if let Some(t) = &spec.training {
        meta.push(kv(metadata::PRESET, t.preset.clone().unwrap_or_else(|| t.method.clone())));
    }
    Ok(ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(opts.opset) }],
        producer_name: Some("geossl".into()),
        producer_version: Some(geossl_models::GEOSSL_VERSION.into()),
        graph: Some(graph),
        metadata_props: meta,
        ..Default::default()
    })
}

/// Exports the checkpoint directory `dir` to `out`, with its STAC MLM model card beside it
/// ([`mlm::card_path`]); both are written through temporary files and renamed: on any error no
/// model is left at `out`.
pub fn export_checkpoint(dir: &Path, out: &Path, opts: &ExportOptions) -> Result<usize, ExportError> {
    if !(13..=21).contains(&opts.opset) {
        return Err(ExportError::Unsupported(format!(
            "opset {} is not supported (13..=21: Resize and Slice take their sizes as inputs; default 17)",
            opts.opset
        )));
    }
    let paths = CheckpointPaths::new(dir);
    let spec = paths.read_spec()?;
    let bytes = std::fs::read(paths.weights()).map_err(|error| {
        if error.kind() == std::io::ErrorKind::NotFound {
            ExportError::Weights(WeightsError::Missing { path: paths.weights() })
        } else {
            ExportError::Io { path: paths.weights(), error }
        }
    })?;
    let sd = StateDict::from_bytes(&bytes, &paths.weights())?;
    sd.check(&spec.parameters(), &paths.weights())?;
    let model = build_model(&spec, &sd, opts, &geossl_models::sha256_hex(&bytes))?;
    let buf = model.encode_to_vec();
    // The model card beside it (`model.onnx` → `model.item.json`): the same contract for the field's tools.
    let contract =
        IoContract::for_export(&spec, opts.head, opts.input).map_err(|e| ExportError::Unsupported(e.to_string()))?;
    let href = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model.onnx".into());
    let file = mlm::ModelFile { href, size: buf.len() as u64, sha256_hex: geossl_models::sha256_hex(&buf) };
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let card = mlm::card_for_export(&spec, &contract, opts.head, opts.input, &file, &now, opts.opset);
    let card_json = serde_json::to_vec_pretty(&card).map_err(|e| ExportError::Unsupported(e.to_string()))?;
    let card_out = mlm::card_path(out);
    geossl_models::weights::write_atomic(out, &buf).map_err(|error| ExportError::Io { path: out.to_owned(), error })?;
    if let Err(error) = geossl_models::weights::write_atomic(&card_out, &card_json) {
        // Both or neither: a model without its card would be served from its metadata alone, silently.
        let _ = std::fs::remove_file(out);
        return Err(ExportError::Io { path: card_out, error });
    }
    Ok(buf.len())
}
