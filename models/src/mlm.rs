//! Model cards in the field's format: a STAC Item with the Machine Learning Model extension (MLM,
//! pinned to [`MLM_VERSION`]). `geossl-export onnx` writes one beside each model ([`card_for_export`]);
//! the server and the archive embedder read one ([`Item::contract`]) to serve an ONNX model made
//! elsewhere — band order, input type and per-band scaling from `mlm:input`, which output is the
//! embedding (or the class scores, or the mask) from `mlm:output`.
//!
//! What MLM's fields mean here (its README, "Model Input Object"): `mlm:input[].input.data_type` is the
//! type of the tensor the model takes; `value_scaling` is what a user does to the stored samples to make
//! it. So a geossl model exported with `--input float32` carries per-band `z-score` scaling in stored
//! units (`(x − mean′) / stddev′` with `mean′ = (mean − offset) / scale`, `stddev′ = std / scale`, the
//! input contract's one normalization rewritten), and one exported with integer input carries
//! `value_scaling: null`: its graph normalizes. The stored sample type is the `data_type` of the
//! STAC 1.1 `bands` in the Item's properties.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::heads::{HeadKind, HeadSpec};
use crate::io::{Dim, ElemType, InputDType, IoContract};
use crate::sample::SampleType;
use crate::spec::ModelSpec;
use crate::ContractError;

/// The MLM version written (and the schema named in `stac_extensions`).
pub const MLM_VERSION: &str = "1.6.0";
/// Its JSON schema's identifier.
pub const MLM_SCHEMA: &str = "https://stac-extensions.github.io/mlm/v1.6.0/schema.json";
/// The file extension (`file:size`, `file:checksum` of the model asset).
pub const FILE_SCHEMA: &str = "https://stac-extensions.github.io/file/v2.1.0/schema.json";
/// The classification extension (`classification:classes` of class outputs).
pub const CLASSIFICATION_SCHEMA: &str = "https://stac-extensions.github.io/classification/v2.0.0/schema.json";
/// STAC version of the Items written.
pub const STAC_VERSION: &str = "1.1.0";
/// Asset role of the model artifact (MLM: required).
pub const MODEL_ROLE: &str = "mlm:model";
/// `mlm:artifact_type` of an ONNX file.
pub const ONNX_ARTIFACT: &str = "onnx";
/// Media type of an ONNX file (MLM's `application/octet-stream; framework=…` convention).
pub const ONNX_MEDIA_TYPE: &str = "application/octet-stream; framework=onnx";

/// The card of `model` (`model.onnx` → `model.item.json`): where the exporter writes it and where the
/// model repository looks for it.
pub fn card_path(model: &Path) -> PathBuf {
    model.with_extension("item.json")
}

/// A STAC Item (the fields a model card uses; anything else is kept in `extra`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    #[serde(rename = "type")]
    pub kind: String,
    pub stac_version: String,
    #[serde(default)]
    pub stac_extensions: Vec<String>,
    pub id: String,
    /// A model has no footprint: `null`.
    pub geometry: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bbox: Option<Vec<f64>>,
    pub properties: Properties,
    #[serde(default)]
    pub links: Vec<Value>,
    pub assets: BTreeMap<String, Asset>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// Item properties: STAC's datetime, MLM's fields, STAC 1.1 `bands`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Properties {
    pub datetime: Option<String>,
    #[serde(rename = "mlm:name")]
    pub name: String,
    #[serde(rename = "mlm:architecture")]
    pub architecture: String,
    #[serde(rename = "mlm:tasks")]
    pub tasks: Vec<String>,
    #[serde(rename = "mlm:framework", default, skip_serializing_if = "Option::is_none")]
    pub framework: Option<String>,
    #[serde(rename = "mlm:framework_version", default, skip_serializing_if = "Option::is_none")]
    pub framework_version: Option<String>,
    #[serde(rename = "mlm:total_parameters", default, skip_serializing_if = "Option::is_none")]
    pub total_parameters: Option<u64>,
    #[serde(rename = "mlm:pretrained", default, skip_serializing_if = "Option::is_none")]
    pub pretrained: Option<bool>,
    #[serde(rename = "mlm:pretrained_source", default, skip_serializing_if = "Option::is_none")]
    pub pretrained_source: Option<String>,
    /// `null`: any accelerator (ONNX Runtime on CPU or CUDA).
    #[serde(rename = "mlm:accelerator", default)]
    pub accelerator: Option<String>,
    #[serde(rename = "mlm:accelerator_constrained", default, skip_serializing_if = "Option::is_none")]
    pub accelerator_constrained: Option<bool>,
    #[serde(rename = "mlm:accelerator_summary", default, skip_serializing_if = "Option::is_none")]
    pub accelerator_summary: Option<String>,
    #[serde(rename = "mlm:input")]
    pub input: Vec<ModelInput>,
    #[serde(rename = "mlm:output")]
    pub output: Vec<ModelOutput>,
    /// STAC 1.1 band objects (read: a card may summarize its model asset's bands here).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bands: Vec<Band>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// A STAC 1.1 band object (common metadata).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Band {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_type: Option<String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// MLM Model Input Object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInput {
    pub name: String,
    /// Band names (or Model Band Objects `{"name": …}`), in channel order.
    #[serde(default)]
    pub bands: Vec<Value>,
    pub input: Structure,
    /// One object per channel, or one for all; `null` when the model takes the stored values as they are.
    #[serde(default)]
    pub value_scaling: Option<Vec<Value>>,
    #[serde(default)]
    pub resize_type: Option<String>,
    #[serde(default)]
    pub pre_processing_function: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// MLM Input/Result Structure Object: shape (`-1` variable), dimension names, data type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Structure {
    pub shape: Vec<i64>,
    pub dim_order: Vec<String>,
    pub data_type: String,
}

/// MLM Model Output Object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelOutput {
    pub name: String,
    pub tasks: Vec<String>,
    pub result: Structure,
    #[serde(rename = "classification:classes", default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<Class>,
    #[serde(default)]
    pub post_processing_function: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Classification extension Class Object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Class {
    pub value: i64,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A STAC Asset (the model file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Asset {
    pub href: String,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(rename = "mlm:artifact_type", default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(rename = "file:size", default, skip_serializing_if = "Option::is_none")]
    pub file_size: Option<u64>,
    /// Multihash of the file: `1220` + SHA-256 hex.
    #[serde(rename = "file:checksum", default, skip_serializing_if = "Option::is_none")]
    pub file_checksum: Option<String>,
    /// STAC 1.1 band objects of the stored data the model reads (name, stored `data_type`): on the model
    /// asset, since STAC 1.1 allows `bands` in Item properties only when an asset has them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bands: Vec<Band>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// What one model output is to geossl (MLM task → head), whatever the output is named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputRole {
    /// `[N, D]` features (`similarity-search`).
    Embedding,
    /// `[N, K]` class scores before softmax (`classification`, `scene-classification`).
    Logits,
    /// `[N, K]` class probabilities.
    Probabilities,
    /// `[N, K, H, W]` per-pixel class scores (`segmentation`, `semantic-segmentation`).
    MaskLogits,
    /// `[N, D, h, w]` one embedding per cell of the backbone's last feature map (`similarity-search`, 4-D).
    FeatureMap,
}

impl OutputRole {
    /// The role of an output named by geossl's I/O contract (`embedding`, `logits`, …).
    pub fn of_name(name: &str) -> Option<Self> {
        use crate::io::{
            OUTPUT_EMBEDDING, OUTPUT_FEATURE_MAP, OUTPUT_LOGITS, OUTPUT_MASK_LOGITS, OUTPUT_PROBABILITIES,
        };
        match name {
            OUTPUT_FEATURE_MAP => Some(Self::FeatureMap),
            OUTPUT_EMBEDDING => Some(Self::Embedding),
            OUTPUT_LOGITS => Some(Self::Logits),
            OUTPUT_PROBABILITIES => Some(Self::Probabilities),
            OUTPUT_MASK_LOGITS => Some(Self::MaskLogits),
            _ => None,
        }
    }

    /// The MLM tasks an output of this role serves.
    fn tasks(self) -> Vec<String> {
        let t: &[&str] = match self {
            Self::Embedding | Self::FeatureMap => &["similarity-search"],
            Self::Logits | Self::Probabilities => &["scene-classification", "classification"],
            Self::MaskLogits => &["semantic-segmentation", "segmentation"],
        };
        t.iter().map(|s| s.to_string()).collect()
    }

    /// The role of an output from its MLM tasks (its geossl name first, when it has one).
    fn of_output(o: &ModelOutput) -> Option<Self> {
        if let Some(r) = Self::of_name(&o.name) {
            return Some(r);
        }
        let has = |t: &[&str]| o.tasks.iter().any(|x| t.contains(&x.as_str()));
        if has(&["similarity-search", "feature-extraction", "embedding"]) {
            // A 4-D result is a map of embeddings, one per cell.
            Some(if o.result.shape.len() == 4 { Self::FeatureMap } else { Self::Embedding })
        } else if has(&["semantic-segmentation", "segmentation"]) {
            Some(Self::MaskLogits)
        } else if has(&["scene-classification", "classification"]) {
            Some(Self::Logits)
        } else {
            None
        }
    }
}

/// MLM Value Scaling Object types geossl applies: each is `x * mul + add`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueScaling {
    /// `(x − mean) / stddev`
    ZScore { mean: f64, stddev: f64 },
    /// `(x − minimum) / (maximum − minimum)`
    MinMax { minimum: f64, maximum: f64 },
    /// `x − value`
    Offset { value: f64 },
    /// `x / value`
    Scale { value: f64 },
    /// `type: null` (or a `null` entry): the channel as it is.
    None,
}

impl ValueScaling {
    /// The object as MLM writes it.
    pub fn to_value(self) -> Value {
        match self {
            Self::ZScore { mean, stddev } => serde_json::json!({"type": "z-score", "mean": mean, "stddev": stddev}),
            Self::MinMax { minimum, maximum } => {
                serde_json::json!({"type": "min-max", "minimum": minimum, "maximum": maximum})
            }
            Self::Offset { value } => serde_json::json!({"type": "offset", "value": value}),
            Self::Scale { value } => serde_json::json!({"type": "scale", "value": value}),
            Self::None => serde_json::json!({"type": null}),
        }
    }

    /// Reads one Value Scaling Object; types that are not an affine map of the channel (`clip`,
    /// `clip-min`, `clip-max`, `processing`) are refused by name.
    pub fn parse(v: &Value) -> Result<Self, ContractError> {
        if v.is_null() {
            return Ok(Self::None);
        }
        let num = |k: &str| {
            v.get(k).and_then(Value::as_f64).ok_or_else(|| ContractError(format!("value_scaling {v}: no number `{k}`")))
        };
        match v.get("type") {
            None | Some(Value::Null) => Ok(Self::None),
            Some(Value::String(t)) => match t.as_str() {
                "z-score" => Ok(Self::ZScore { mean: num("mean")?, stddev: num("stddev")? }),
                "min-max" => Ok(Self::MinMax { minimum: num("minimum")?, maximum: num("maximum")? }),
                "offset" => Ok(Self::Offset { value: num("value")? }),
                "scale" => Ok(Self::Scale { value: num("value")? }),
                other => Err(ContractError(format!(
                    "value_scaling type `{other}` is not supported (geossl applies z-score, min-max, offset and scale, \
                     each an affine map of the channel)"
                ))),
            },
            Some(other) => Err(ContractError(format!("value_scaling type {other} is not a string"))),
        }
    }

    /// `(mul, add)` with `scaled = x * mul + add`.
    pub fn affine(self) -> Result<(f64, f64), ContractError> {
        let positive = |what: &str, d: f64| {
            if d.is_finite() && d > 0.0 {
                Ok(d)
            } else {
                Err(ContractError(format!("value_scaling {what} must be > 0, got {d}")))
            }
        };
        Ok(match self {
            Self::ZScore { mean, stddev } => {
                let s = positive("stddev", stddev)?;
                (1.0 / s, -mean / s)
            }
            Self::MinMax { minimum, maximum } => {
                let r = positive("maximum − minimum", maximum - minimum)?;
                (1.0 / r, -minimum / r)
            }
            Self::Offset { value } => (1.0, -value),
            Self::Scale { value } => {
                if value == 0.0 || !value.is_finite() {
                    return Err(ContractError(format!(
                        "value_scaling scale value must be finite and ≠ 0, got {value}"
                    )));
                }
                (1.0 / value, 0.0)
            }
            Self::None => (1.0, 0.0),
        })
    }
}

/// The model file a card describes.
#[derive(Debug, Clone)]
pub struct ModelFile {
    /// The asset's `href` (relative to the card: the file name when written beside it).
    pub href: String,
    pub size: u64,
    pub sha256_hex: String,
}

fn dtype_name(t: ElemType) -> &'static str {
    match t {
        ElemType::Uint8 => "uint8",
        ElemType::Uint16 => "uint16",
        ElemType::Float32 => "float32",
    }
}

fn shape_of(dims: &[Dim]) -> Vec<i64> {
    dims.iter()
        .map(|d| match d {
            Dim::Fixed(n) => *n as i64,
            Dim::Dynamic(_) => -1,
        })
        .collect()
}

/// `resnet50` → `ResNet-50` (the literature's name, as MLM asks).
fn architecture(spec: &ModelSpec) -> String {
    let n = spec.backbone.arch.name();
    format!("ResNet-{}", n.trim_start_matches("resnet"))
}

/// The card of `spec` exported with `head` and `input` as `file` (`contract` is the export's I/O
/// contract; `datetime` the export time, RFC 3339; `opset` the ONNX opset).
pub fn card_for_export(
    spec: &ModelSpec,
    contract: &IoContract,
    head: HeadKind,
    input: InputDType,
    file: &ModelFile,
    datetime: &str,
    opset: i64,
) -> Item {
    let method = spec.training.as_ref().map(|t| t.method.clone()).unwrap_or_else(|| "untrained".into());
    let name = format!("geossl-{}-{method}", spec.backbone.arch.name());
    let stored = spec.sample_type.or(input.samples());
    let [h, w] = spec.input_size;
    let (value_scaling, how) = match input {
        InputDType::Float32 => {
            // The input contract's normalization in stored units: (x − mean′) / stddev′.
            let (mul, add) = spec.normalization.affine_f64();
            let per: Vec<Value> = mul
                .iter()
                .zip(&add)
                .map(|(&m, &a)| ValueScaling::ZScore { mean: -a / m, stddev: 1.0 / m }.to_value())
                .collect();
            (Some(per), "float32 input: apply value_scaling (per band, in stored units) to the stored samples")
        }
        InputDType::Uint8 | InputDType::Uint16 => (
            None,
            "stored samples as they are: scale, offset and per-band normalization are inside the graph \
             (value_scaling null)",
        ),
    };
    let model_input = ModelInput {
        name: contract.inputs[0].name.clone(),
        bands: spec.bands.iter().map(|b| Value::String(b.clone())).collect(),
        input: Structure {
            shape: shape_of(&contract.inputs[0].dims),
            dim_order: ["batch", "channel", "height", "width"].map(String::from).to_vec(),
            data_type: dtype_name(contract.inputs[0].dtype).into(),
        },
        value_scaling,
        resize_type: None,
        pre_processing_function: None,
        description: Some(format!("{} bands at {h}×{w} pixels; {how}", spec.bands.len())),
    };
    let labels: &[String] = match spec.head(head) {
        Some(HeadSpec::Classifier(c)) => &c.labels,
        Some(HeadSpec::Segmentation(s)) => &s.labels,
        _ => &[],
    };
    let classes: Vec<Class> =
        labels.iter().enumerate().map(|(i, l)| Class { value: i as i64, name: l.clone(), description: None }).collect();
    let outputs: Vec<ModelOutput> = contract
        .outputs
        .iter()
        .filter_map(|o| {
            let role = OutputRole::of_name(&o.name)?;
            let dim_order: &[&str] = match role {
                OutputRole::Embedding => &["batch", "embedding"],
                OutputRole::Logits | OutputRole::Probabilities => &["batch", "class"],
                OutputRole::MaskLogits => &["batch", "class", "height", "width"],
                OutputRole::FeatureMap => &["batch", "embedding", "height", "width"],
            };
            let description = match role {
                OutputRole::Embedding => "pooled backbone features (projected and L2-normalized when the head says so)",
                OutputRole::Logits => "class scores before softmax",
                OutputRole::Probabilities => "softmax of the logits",
                OutputRole::MaskLogits => "per-pixel class scores at the input's size",
                OutputRole::FeatureMap => "the backbone's last feature map: one embedding per 32×32-pixel cell",
            };
            Some(ModelOutput {
                name: o.name.clone(),
                tasks: role.tasks(),
                result: Structure {
                    shape: shape_of(&o.dims),
                    dim_order: dim_order.iter().map(|s| s.to_string()).collect(),
                    data_type: dtype_name(o.dtype).into(),
                },
                classes: if matches!(role, OutputRole::Embedding | OutputRole::FeatureMap) {
                    Vec::new()
                } else {
                    classes.clone()
                },
                post_processing_function: None,
                description: Some(description.into()),
            })
        })
        .collect();
    let mut tasks: Vec<String> = Vec::new();
    for o in &outputs {
        for t in &o.tasks {
            if !tasks.contains(t) {
                tasks.push(t.clone());
            }
        }
    }
    // Parameters of what was exported: the backbone and this head (BatchNorm statistics are buffers,
    // not parameters, as torch counts them).
    let d = spec.backbone.feature_dim();
    let mut params = spec.backbone.parameters();
    if let Some(hs) = spec.head(head) {
        params.extend(hs.parameters(d, spec.projection_out()));
    }
    let total: u64 =
        params.iter().filter(|p| p.role.trainable()).map(|p| p.shape.iter().product::<usize>() as u64).sum();
    let mut extensions = vec![MLM_SCHEMA.to_string(), FILE_SCHEMA.to_string()];
    if !classes.is_empty() {
        extensions.push(CLASSIFICATION_SCHEMA.to_string());
    }
    let source = spec.training.as_ref().map(|t| {
        let mut s = format!("geossl {}", t.method);
        if let Some(p) = &t.preset {
            s.push_str(&format!(" (preset {p})"));
        }
        if let Some(src) = &t.source {
            s.push_str(&format!(", from {src}"));
        }
        s
    });
    let mut extra = BTreeMap::new();
    extra.insert("created".to_string(), Value::String(datetime.to_string()));
    extra.insert(
        "description".to_string(),
        Value::String(format!(
            "{} {} exported by geossl {} ({} head)",
            architecture(spec),
            method,
            crate::GEOSSL_VERSION,
            head.name()
        )),
    );
    let asset = Asset {
        href: file.href.clone(),
        media_type: Some(ONNX_MEDIA_TYPE.into()),
        title: Some(format!("ONNX model ({} head, {} input)", head.name(), dtype_name(contract.inputs[0].dtype))),
        roles: vec![MODEL_ROLE.into(), "mlm:compiled".into(), "model".into()],
        artifact_type: Some(ONNX_ARTIFACT.into()),
        file_size: Some(file.size),
        file_checksum: Some(format!("1220{}", file.sha256_hex)),
        bands: spec
            .bands
            .iter()
            .map(|b| Band { name: b.clone(), data_type: stored.map(|t| t.name().to_string()), extra: BTreeMap::new() })
            .collect(),
        extra: BTreeMap::new(),
    };
    let id = format!("{name}-{}", head.name());
    Item {
        kind: "Feature".into(),
        stac_version: STAC_VERSION.into(),
        stac_extensions: extensions,
        id,
        geometry: None,
        bbox: None,
        properties: Properties {
            datetime: Some(datetime.into()),
            name,
            architecture: architecture(spec),
            tasks,
            framework: Some("ONNX".into()),
            framework_version: Some(format!("opset {opset}")),
            total_parameters: Some(total),
            pretrained: Some(spec.training.is_some()),
            pretrained_source: source,
            accelerator: None,
            accelerator_constrained: Some(false),
            accelerator_summary: Some("ONNX Runtime: CPU, or the CUDA execution provider on NVIDIA GPUs".into()),
            input: vec![model_input],
            output: outputs,
            bands: Vec::new(),
            extra,
        },
        links: Vec::new(),
        assets: BTreeMap::from([("model".to_string(), asset)]),
        extra: BTreeMap::new(),
    }
}

/// What a card says a server needs to run its model: everything `geossl.spec` metadata would have given.
#[derive(Debug, Clone, PartialEq)]
pub struct CardContract {
    /// `mlm:name`.
    pub name: String,
    /// The `mlm:model` asset's `href` (relative to the card, or absolute, or a `file://` URL).
    pub model_href: String,
    /// The model input's name (`mlm:input[0].name`).
    pub input_name: String,
    /// The tensor type the model takes.
    pub input: InputDType,
    /// `[N, C, H, W]`, `-1` where variable.
    pub shape: Vec<i64>,
    /// Band names in channel order.
    pub bands: Vec<String>,
    /// The stored sample type the scaling was made for (the bands' `data_type`, when they agree).
    pub sample_type: Option<SampleType>,
    /// `x * mul + add` per channel (float32 input only: integer inputs go as they are).
    pub affine: Option<(Vec<f32>, Vec<f32>)>,
    /// Output name → role, for the outputs the card gives one.
    pub outputs: Vec<(String, OutputRole)>,
    /// Class names of the class/mask output (`classification:classes`, by value).
    pub labels: Vec<String>,
}

impl Item {
    /// Reads a card from JSON; the message names what is wrong.
    pub fn from_json(text: &str) -> Result<Self, ContractError> {
        let item: Item = serde_json::from_str(text).map_err(|e| ContractError(format!("not a STAC MLM Item: {e}")))?;
        if item.kind != "Feature" {
            return Err(ContractError(format!("type {:?}: a STAC Item is a \"Feature\"", item.kind)));
        }
        Ok(item)
    }

    /// The model asset: the one with role `mlm:model`.
    pub fn model_asset(&self) -> Result<(&str, &Asset), ContractError> {
        let mut m = self.assets.iter().filter(|(_, a)| a.roles.iter().any(|r| r == MODEL_ROLE));
        match (m.next(), m.next()) {
            (Some((k, a)), None) => Ok((k, a)),
            (None, _) => Err(ContractError(format!("item {}: no asset with role {MODEL_ROLE}", self.id))),
            (Some(_), Some(_)) => {
                Err(ContractError(format!("item {}: more than one asset with role {MODEL_ROLE}", self.id)))
            }
        }
    }

    /// The contract a server takes from this card (one NCHW input of uint8, uint16 or float32; affine
    /// value scaling). Each refusal names the field.
    pub fn contract(&self) -> Result<CardContract, ContractError> {
        let id = &self.id;
        let err = |m: String| ContractError(format!("item {id}: {m}"));
        let (_, asset) = self.model_asset()?;
        if let Some(t) = &asset.artifact_type {
            if t != ONNX_ARTIFACT && !t.starts_with("torch.onnx") {
                return Err(err(format!("mlm:artifact_type {t:?}: geossl serves ONNX models (\"{ONNX_ARTIFACT}\")")));
            }
        }
        let p = &self.properties;
        let [input] = p.input.as_slice() else {
            return Err(err(format!("mlm:input has {} inputs; geossl serves models with one", p.input.len())));
        };
        let s = &input.input;
        if s.shape.len() != 4 || s.dim_order.len() != 4 {
            return Err(err(format!(
                "input {:?} has shape {:?} ({:?}); geossl serves [batch, channel, height, width]",
                input.name, s.shape, s.dim_order
            )));
        }
        let channel_dim = s.dim_order[1].as_str();
        if !matches!(channel_dim, "channel" | "channels" | "band" | "bands") {
            return Err(err(format!(
                "input {:?}: dim_order {:?} has no channel dimension second",
                input.name, s.dim_order
            )));
        }
        let dtype = match s.data_type.as_str() {
            "uint8" => InputDType::Uint8,
            "uint16" => InputDType::Uint16,
            "float32" => InputDType::Float32,
            t => {
                return Err(err(format!(
                    "input {:?}: data_type {t} (geossl feeds uint8, uint16 or float32)",
                    input.name
                )))
            }
        };
        let bands: Vec<String> = input
            .bands
            .iter()
            .map(|b| match b {
                Value::String(n) => Ok(n.clone()),
                Value::Object(o) if o.get("expression").is_none() => o
                    .get("name")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| err(format!("input band {b} has no name"))),
                _ => Err(err(format!("input band {b}: derived bands (expressions) are not supported"))),
            })
            .collect::<Result<_, _>>()?;
        let c = match (s.shape[1], bands.len()) {
            (n, 0) if n > 0 => n as usize,
            (n, b) if n == b as i64 || n == -1 => b,
            (n, b) => return Err(err(format!("input {:?}: {b} bands for {n} channels", input.name))),
        };
        if input.pre_processing_function.as_ref().is_some_and(|f| !f.is_null()) {
            return Err(err(format!(
                "input {:?}: a pre_processing_function is not something geossl can run; express the scaling as \
                 value_scaling",
                input.name
            )));
        }
        let affine = match (&input.value_scaling, dtype) {
            (None, InputDType::Float32) => Some((vec![1.0; c], vec![0.0; c])),
            (None, _) => None,
            (Some(v), InputDType::Float32) => {
                let per = match v.len() {
                    1 => vec![ValueScaling::parse(&v[0])?; c],
                    n if n == c => v.iter().map(ValueScaling::parse).collect::<Result<Vec<_>, _>>()?,
                    n => return Err(err(format!("value_scaling has {n} objects for {c} channels (1 or {c})"))),
                };
                let (mut mul, mut add) = (Vec::with_capacity(c), Vec::with_capacity(c));
                for (i, vs) in per.iter().enumerate() {
                    let (m, a) = vs.affine().map_err(|e| err(format!("channel {i}: {e}")))?;
                    mul.push(m as f32);
                    add.push(a as f32);
                }
                Some((mul, add))
            }
            (Some(v), _) if v.iter().all(|x| matches!(ValueScaling::parse(x), Ok(ValueScaling::None))) => None,
            (Some(_), t) => {
                return Err(err(format!(
                    "input {:?} takes {} values and has a value_scaling: scaled values are not integers",
                    input.name,
                    match t {
                        InputDType::Uint8 => "uint8",
                        _ => "uint16",
                    }
                )))
            }
        };
        // The model asset's bands, else the properties' (STAC 1.1 puts them on either).
        let by_name: BTreeMap<&str, Option<&str>> =
            p.bands.iter().chain(&asset.bands).map(|b| (b.name.as_str(), b.data_type.as_deref())).collect();
        let mut types = bands.iter().filter_map(|b| by_name.get(b.as_str()).copied().flatten());
        let sample_type = match types.next() {
            Some(first) => {
                if types.any(|t| t != first) {
                    return Err(err("the input's bands have different data types".into()));
                }
                Some(SampleType::parse(first).map_err(|e| err(format!("band data_type: {e}")))?)
            }
            None => dtype.samples(),
        };
        let outputs: Vec<(String, OutputRole)> =
            p.output.iter().filter_map(|o| OutputRole::of_output(o).map(|r| (o.name.clone(), r))).collect();
        if outputs.is_empty() {
            return Err(err(format!(
                "no output has a task geossl serves (similarity-search, classification, segmentation): {:?}",
                p.output.iter().map(|o| (&o.name, &o.tasks)).collect::<Vec<_>>()
            )));
        }
        let mut classes: Vec<&Class> = p.output.iter().flat_map(|o| &o.classes).collect();
        classes.sort_by_key(|c| c.value);
        classes.dedup_by_key(|c| c.value);
        Ok(CardContract {
            name: p.name.clone(),
            model_href: asset.href.clone(),
            input_name: input.name.clone(),
            input: dtype,
            shape: s.shape.clone(),
            bands,
            sample_type,
            affine,
            outputs,
            labels: classes.iter().map(|c| c.name.clone()).collect(),
        })
    }
}

/// Where the card's model file is: its `href` resolved against the card's directory (a relative path or
/// a `file://` URL; other schemes are refused: geossl loads models from files).
pub fn resolve_href(card: &Path, href: &str) -> Result<PathBuf, ContractError> {
    let p = if let Some(rest) = href.strip_prefix("file://") {
        PathBuf::from(rest)
    } else if href.contains("://") {
        return Err(ContractError(format!(
            "model href {href}: geossl loads model files from paths (download it and point href at the file)"
        )));
    } else {
        PathBuf::from(href)
    };
    Ok(if p.is_absolute() { p } else { card.parent().unwrap_or(Path::new(".")).join(p) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Arch, ClassifierHead, EmbeddingHead, Normalization};

    fn file() -> ModelFile {
        ModelFile { href: "model.onnx".into(), size: 10, sha256_hex: "ab".repeat(32) }
    }

    /// The float32 card's z-score scaling is the spec's normalization: the contract read back gives the
    /// same affine map, to float32 rounding.
    #[test]
    fn float32_cards_carry_the_normalization_and_read_back() {
        let mut spec = ModelSpec::rgb(Arch::Resnet18, 64);
        spec.sample_type = Some(SampleType::U16);
        spec.bands = vec!["B04".into(), "B03".into(), "B02".into()];
        spec.normalization = Normalization::per_band(1e-4, vec![0.1, 0.12, 0.14], vec![0.05, 0.06, 0.07]);
        spec.normalization.offset = vec![-0.1, -0.1, -0.1];
        spec.heads.push(HeadSpec::Embedding(EmbeddingHead::default()));
        let io = IoContract::for_export(&spec, HeadKind::Embedding, InputDType::Float32).unwrap();
        let item =
            card_for_export(&spec, &io, HeadKind::Embedding, InputDType::Float32, &file(), "2026-12-02T00:00:00Z", 17);
        let text = serde_json::to_string_pretty(&item).unwrap();
        let back = Item::from_json(&text).unwrap();
        assert_eq!(back, item);
        let c = back.contract().unwrap();
        assert_eq!(c.bands, spec.bands);
        assert_eq!(c.sample_type, Some(SampleType::U16));
        assert_eq!(c.input, InputDType::Float32);
        assert_eq!(c.shape, vec![-1, 3, 64, 64]);
        assert_eq!(c.outputs, vec![("embedding".to_string(), OutputRole::Embedding)]);
        let (mul, add) = c.affine.unwrap();
        let (wm, wa) = spec.normalization.affine();
        for i in 0..3 {
            assert!((mul[i] - wm[i]).abs() <= wm[i].abs() * 1e-6, "{mul:?} {wm:?}");
            assert!((add[i] - wa[i]).abs() <= wa[i].abs() * 1e-6 + 1e-7, "{add:?} {wa:?}");
        }
        assert!(text.contains("\"mlm:artifact_type\": \"onnx\"") && text.contains("\"z-score\""));
    }

    #[test]
    fn integer_cards_scale_nothing_and_classifiers_name_classes() {
        let mut spec = ModelSpec::rgb(Arch::Resnet50, 224);
        spec.heads.push(HeadSpec::Classifier(ClassifierHead {
            num_classes: 2,
            labels: vec!["water".into(), "forest".into()],
        }));
        let io = IoContract::for_export(&spec, HeadKind::Classifier, InputDType::Uint8).unwrap();
        let item =
            card_for_export(&spec, &io, HeadKind::Classifier, InputDType::Uint8, &file(), "2026-12-02T00:00:00Z", 17);
        assert_eq!(item.properties.architecture, "ResNet-50");
        assert_eq!(item.properties.total_parameters, Some(23_508_032 + 2048 * 2 + 2));
        assert!(item.stac_extensions.contains(&CLASSIFICATION_SCHEMA.to_string()));
        let c = item.contract().unwrap();
        assert_eq!(c.affine, None);
        assert_eq!(c.sample_type, Some(SampleType::U8));
        assert_eq!(c.labels, vec!["water", "forest"]);
        assert_eq!(
            c.outputs,
            vec![("logits".to_string(), OutputRole::Logits), ("probabilities".to_string(), OutputRole::Probabilities)]
        );
    }

    #[test]
    fn cards_geossl_cannot_serve_are_refused_by_field() {
        let spec = ModelSpec::rgb(Arch::Resnet18, 64);
        let io = IoContract::for_export(&spec, HeadKind::Embedding, InputDType::Float32).unwrap();
        let base =
            card_for_export(&spec, &io, HeadKind::Embedding, InputDType::Float32, &file(), "2026-12-02T00:00:00Z", 17);
        let refused = |f: &dyn Fn(&mut Item), want: &str| {
            let mut i = base.clone();
            f(&mut i);
            let e = i.contract().unwrap_err().to_string();
            assert!(e.contains(want), "{e} (wanted {want})");
        };
        refused(
            &|i| {
                i.properties.input[0].value_scaling =
                    Some(vec![serde_json::json!({"type": "clip", "minimum": 0, "maximum": 1})])
            },
            "clip",
        );
        refused(
            &|i| i.properties.input[0].value_scaling = Some(vec![ValueScaling::Scale { value: 2.0 }.to_value(); 2]),
            "2 objects for 3 channels",
        );
        refused(
            &|i| {
                i.properties.input[0].value_scaling =
                    Some(vec![ValueScaling::ZScore { mean: 0.0, stddev: 0.0 }.to_value()])
            },
            "stddev must be > 0",
        );
        refused(&|i| i.properties.input[0].input.data_type = "float64".into(), "data_type float64");
        refused(
            &|i| {
                i.properties.input[0].input.dim_order =
                    ["batch", "height", "width", "channel"].map(String::from).to_vec()
            },
            "no channel dimension",
        );
        refused(&|i| i.assets.values_mut().for_each(|a| a.roles = vec!["data".into()]), "no asset with role mlm:model");
        refused(
            &|i| {
                i.properties.output[0].name = "out".into();
                i.properties.output[0].tasks = vec!["regression".into()]
            },
            "no output has a task",
        );
        // One object for all channels broadcasts; min-max, offset and scale are affine.
        let mut i = base.clone();
        i.properties.input[0].value_scaling =
            Some(vec![ValueScaling::MinMax { minimum: 0.0, maximum: 255.0 }.to_value()]);
        let (m, a) = i.contract().unwrap().affine.unwrap();
        assert_eq!((m, a), (vec![1.0 / 255.0; 3], vec![0.0; 3]));
        assert_eq!(
            resolve_href(Path::new("/m/1/model.item.json"), "model.onnx").unwrap(),
            PathBuf::from("/m/1/model.onnx")
        );
        assert!(resolve_href(Path::new("card.json"), "https://x/model.onnx")
            .unwrap_err()
            .to_string()
            .contains("paths"));
    }
}
