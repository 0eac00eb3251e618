//! How a raster stores its samples: the type the input contract names, from decoding to the model.

use serde::{Deserialize, Serialize};

/// How samples are stored in a raster (and, for integer model inputs, how the
/// model takes them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SampleType {
    #[serde(rename = "uint8")]
    U8,
    #[serde(rename = "int8")]
    I8,
    #[serde(rename = "uint16")]
    U16,
    #[serde(rename = "int16")]
    I16,
    #[serde(rename = "uint32")]
    U32,
    #[serde(rename = "int32")]
    I32,
    #[serde(rename = "float32")]
    F32,
    #[serde(rename = "float64")]
    F64,
}

impl SampleType {
    /// The name numpy, GDAL and ONNX users know (`uint16`, `float32`, …).
    pub fn name(self) -> &'static str {
        match self {
            SampleType::U8 => "uint8",
            SampleType::I8 => "int8",
            SampleType::U16 => "uint16",
            SampleType::I16 => "int16",
            SampleType::U32 => "uint32",
            SampleType::I32 => "int32",
            SampleType::F32 => "float32",
            SampleType::F64 => "float64",
        }
    }

    /// Bytes per sample.
    pub fn bytes(self) -> usize {
        match self {
            SampleType::U8 | SampleType::I8 => 1,
            SampleType::U16 | SampleType::I16 => 2,
            SampleType::U32 | SampleType::I32 | SampleType::F32 => 4,
            SampleType::F64 => 8,
        }
    }

    /// Parses `uint8`, `uint16`, … as written by [`SampleType::name`].
    pub fn parse(s: &str) -> Result<Self, crate::ContractError> {
        [
            SampleType::U8,
            SampleType::I8,
            SampleType::U16,
            SampleType::I16,
            SampleType::U32,
            SampleType::I32,
            SampleType::F32,
            SampleType::F64,
        ]
        .into_iter()
        .find(|t| t.name() == s)
        .ok_or_else(|| {
            crate::ContractError(format!(
                "unknown sample type `{s}` (expected uint8, int8, uint16, int16, uint32, int32, float32, float64)"
            ))
        })
    }
}

impl std::fmt::Display for SampleType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
