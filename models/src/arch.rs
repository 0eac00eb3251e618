//! ResNet backbones with torchvision-compatible structure and parameter names.

use serde::{Deserialize, Serialize};

use crate::param::{ParamRole, ParamSpec};

/// A supported backbone architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Resnet18,
    Resnet34,
    Resnet50,
}

impl Arch {
    /// All supported architectures.
    pub const ALL: [Arch; 3] = [Arch::Resnet18, Arch::Resnet34, Arch::Resnet50];

    /// The torchvision name (`resnet18`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Arch::Resnet18 => "resnet18",
            Arch::Resnet34 => "resnet34",
            Arch::Resnet50 => "resnet50",
        }
    }

    /// Residual block type.
    pub fn block(self) -> BlockKind {
        match self {
            Arch::Resnet18 | Arch::Resnet34 => BlockKind::Basic,
            Arch::Resnet50 => BlockKind::Bottleneck,
        }
    }

    /// Number of blocks in `layer1..layer4`.
    pub fn layers(self) -> [usize; 4] {
        match self {
            Arch::Resnet18 => [2, 2, 2, 2],
            Arch::Resnet34 | Arch::Resnet50 => [3, 4, 6, 3],
        }
    }

    /// Width of the pooled feature vector (`fc.in_features` in torchvision): 512 or 2048.
    pub fn feature_dim(self) -> usize {
        512 * self.block().expansion()
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Arch::ALL
            .into_iter()
            .find(|a| a.name() == s.to_ascii_lowercase())
            .ok_or_else(|| format!("unknown architecture `{s}` (expected resnet18, resnet34 or resnet50)"))
    }
}

/// Residual block type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// Two 3×3 convolutions (ResNet-18/34), expansion 1.
    Basic,
    /// 1×1 → 3×3 (strided, torchvision "v1.5") → 1×1 convolutions (ResNet-50), expansion 4.
    Bottleneck,
}

impl BlockKind {
    /// Output channels ÷ `planes`.
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// One residual block with everything a graph builder needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSpec {
    /// Parameter-name prefix, e.g. `layer2.0`.
    pub prefix: String,
    pub kind: BlockKind,
    pub in_channels: usize,
    /// `planes` in torchvision: width of the 3×3 convolution.
    pub planes: usize,
    pub out_channels: usize,
    /// Stride of the block's 3×3 convolution and of its downsample branch.
    pub stride: usize,
    /// Whether the block has a `downsample` projection (1×1 conv + BN) on the skip path.
    pub downsample: bool,
}

/// A backbone: architecture plus number of input bands.
///
/// Forward contract: images `[N, in_channels, H, W]` (normalized float) →
/// pooled features `[N, feature_dim]`; the spatial map before pooling is
/// `[N, feature_dim, ceil(H/32), ceil(W/32)]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackboneSpec {
    pub arch: Arch,
    /// Input channels/bands: 3 for RGB, up to 13 for Sentinel-2.
    pub in_channels: usize,
}

/// Stem width (`conv1` output channels).
pub const STEM_CHANNELS: usize = 64;

impl BackboneSpec {
    pub fn new(arch: Arch, in_channels: usize) -> Self {
        Self { arch, in_channels }
    }

    /// Width of the pooled features.
    pub fn feature_dim(&self) -> usize {
        self.arch.feature_dim()
    }

    /// The blocks of `layer1..layer4`, in forward order.
    pub fn blocks(&self) -> Vec<BlockSpec> {
        let kind = self.arch.block();
        let mut in_ch = STEM_CHANNELS;
        let mut out = Vec::new();
        for (li, &n) in self.arch.layers().iter().enumerate() {
            let planes = STEM_CHANNELS << li;
            let out_ch = planes * kind.expansion();
            for bi in 0..n {
                let stride = if li > 0 && bi == 0 { 2 } else { 1 };
                out.push(BlockSpec {
                    prefix: format!("layer{}.{}", li + 1, bi),
                    kind,
                    in_channels: in_ch,
                    planes,
                    out_channels: out_ch,
                    stride,
                    downsample: stride != 1 || in_ch != out_ch,
                });
                in_ch = out_ch;
            }
        }
        out
    }

    /// Parameters and buffers in torchvision `state_dict()` order, without `fc`.
    pub fn parameters(&self) -> Vec<ParamSpec> {
        let mut p = Vec::new();
        conv(&mut p, "conv1", STEM_CHANNELS, self.in_channels, 7);
        bn(&mut p, "bn1", STEM_CHANNELS);
        for b in self.blocks() {
            let pre = &b.prefix;
            match b.kind {
                BlockKind::Basic => {
                    conv(&mut p, &format!("{pre}.conv1"), b.planes, b.in_channels, 3);
                    bn(&mut p, &format!("{pre}.bn1"), b.planes);
                    conv(&mut p, &format!("{pre}.conv2"), b.planes, b.planes, 3);
                    bn(&mut p, &format!("{pre}.bn2"), b.planes);
                }
                BlockKind::Bottleneck => {
                    conv(&mut p, &format!("{pre}.conv1"), b.planes, b.in_channels, 1);
                    bn(&mut p, &format!("{pre}.bn1"), b.planes);
                    conv(&mut p, &format!("{pre}.conv2"), b.planes, b.planes, 3);
                    bn(&mut p, &format!("{pre}.bn2"), b.planes);
                    conv(&mut p, &format!("{pre}.conv3"), b.out_channels, b.planes, 1);
                    bn(&mut p, &format!("{pre}.bn3"), b.out_channels);
                }
            }
            if b.downsample {
                conv(&mut p, &format!("{pre}.downsample.0"), b.out_channels, b.in_channels, 1);
                bn(&mut p, &format!("{pre}.downsample.1"), b.out_channels);
            }
        }
        p
    }
}

/// A bias-free convolution weight `[out, in, k, k]`.
pub(crate) fn conv(p: &mut Vec<ParamSpec>, prefix: &str, out: usize, inp: usize, k: usize) {
    p.push(ParamSpec::new(format!("{prefix}.weight"), vec![out, inp, k, k], ParamRole::Weight));
}

/// A batch norm: affine parameters then running buffers, torchvision order.
pub(crate) fn bn(p: &mut Vec<ParamSpec>, prefix: &str, c: usize) {
    p.push(ParamSpec::new(format!("{prefix}.weight"), vec![c], ParamRole::Weight));
    p.push(ParamSpec::new(format!("{prefix}.bias"), vec![c], ParamRole::Bias));
    p.push(ParamSpec::new(format!("{prefix}.running_mean"), vec![c], ParamRole::RunningMean));
    p.push(ParamSpec::new(format!("{prefix}.running_var"), vec![c], ParamRole::RunningVar));
    p.push(ParamSpec::new(format!("{prefix}.num_batches_tracked"), vec![], ParamRole::NumBatchesTracked));
}

/// A linear layer `weight [out, in]`, `bias [out]`.
pub(crate) fn linear(p: &mut Vec<ParamSpec>, prefix: &str, out: usize, inp: usize) {
    p.push(ParamSpec::new(format!("{prefix}.weight"), vec![out, inp], ParamRole::Weight));
    p.push(ParamSpec::new(format!("{prefix}.bias"), vec![out], ParamRole::Bias));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(spec: BackboneSpec) -> usize {
        spec.parameters().iter().filter(|p| p.role.trainable()).map(|p| p.numel()).sum()
    }

    #[test]
    fn trainable_parameter_counts_match_torchvision_without_fc() {
        // torchvision parameter totals minus fc (512*1000+1000 / 2048*1000+1000).
        assert_eq!(count(BackboneSpec::new(Arch::Resnet18, 3)), 11_689_512 - 513_000);
        assert_eq!(count(BackboneSpec::new(Arch::Resnet34, 3)), 21_797_672 - 513_000);
        assert_eq!(count(BackboneSpec::new(Arch::Resnet50, 3)), 25_557_032 - 2_049_000);
    }

    #[test]
    fn in_channels_only_changes_the_stem() {
        let a = BackboneSpec::new(Arch::Resnet50, 3).parameters();
        let b = BackboneSpec::new(Arch::Resnet50, 13).parameters();
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.name, y.name);
            if x.name == "conv1.weight" {
                assert_eq!(y.shape, vec![64, 13, 7, 7]);
            } else {
                assert_eq!(x.shape, y.shape);
            }
        }
    }

    #[test]
    fn downsample_only_where_shape_changes() {
        let blocks = BackboneSpec::new(Arch::Resnet18, 3).blocks();
        let with: Vec<_> = blocks.iter().filter(|b| b.downsample).map(|b| b.prefix.as_str()).collect();
        assert_eq!(with, ["layer2.0", "layer3.0", "layer4.0"]);
        let blocks = BackboneSpec::new(Arch::Resnet50, 3).blocks();
        let with: Vec<_> = blocks.iter().filter(|b| b.downsample).map(|b| b.prefix.as_str()).collect();
        assert_eq!(with, ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]);
    }

    #[test]
    fn arch_parses_case_insensitively_and_rejects_unknown() {
        assert_eq!("ResNet50".parse::<Arch>(), Ok(Arch::Resnet50));
        assert!("vgg16".parse::<Arch>().unwrap_err().contains("vgg16"));
    }
}
