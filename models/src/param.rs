//! The tensors of a state dict, as specs describe them: name, shape and role (what the optimizer does with
//! it). Architectures and heads list theirs; weights files are checked against them.

use serde::{Deserialize, Serialize};

/// What a tensor in the state dict is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamRole {
    Weight,
    Bias,
    RunningMean,
    RunningVar,
    /// BatchNorm's int64 scalar step counter.
    NumBatchesTracked,
}

impl ParamRole {
    /// Whether the optimizer updates it (false for BN buffers).
    pub fn trainable(self) -> bool {
        matches!(self, ParamRole::Weight | ParamRole::Bias)
    }

    /// Whether it is stored as int64 (else float32).
    pub fn is_int64(self) -> bool {
        self == ParamRole::NumBatchesTracked
    }
}

/// One named tensor of the state dict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub role: ParamRole,
}

impl ParamSpec {
    pub fn new(name: String, shape: Vec<usize>, role: ParamRole) -> Self {
        Self { name, shape, role }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}
