//! ResNet backbones in tch, built from a [`BackboneSpec`], with torchvision's
//! parameter names (so torchvision state dicts load without renaming).

use geossl_models::{BackboneSpec, BlockKind, BlockSpec};
use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

/// torchvision's conv initialisation: Kaiming normal, fan-out, ReLU gain.
pub(crate) const CONV_INIT: nn::Init = nn::Init::Kaiming {
    dist: nn::init::NormalOrUniform::Normal,
    fan: nn::init::FanInOut::FanOut,
    non_linearity: nn::init::NonLinearity::ReLU,
};

/// A bias-free convolution with torchvision initialisation.
pub(crate) fn conv(p: nn::Path, cin: usize, cout: usize, k: usize, stride: usize, padding: usize) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        stride: stride as i64,
        padding: padding as i64,
        bias: false,
        ws_init: CONV_INIT,
        ..Default::default()
    };
    nn::conv2d(p, cin as i64, cout as i64, k as i64, cfg)
}

/// BatchNorm2d with torchvision's buffers, `num_batches_tracked` included
/// (int64 scalar, incremented on each training forward like PyTorch's).
#[derive(Debug)]
pub struct BatchNorm {
    bn: nn::BatchNorm,
    num_batches_tracked: Tensor,
}

impl BatchNorm {
    pub fn new(p: nn::Path, c: usize) -> Self {
        // torchvision's ResNet init: γ = 1, β = 0 (tch's default draws γ from U(0, 1)).
        let cfg = nn::BatchNormConfig { ws_init: nn::Init::Const(1.0), ..Default::default() };
        let bn = nn::batch_norm2d(&p, c as i64, cfg);
        let nbt = Tensor::zeros([], (Kind::Int64, p.device()));
        let num_batches_tracked = p.add("num_batches_tracked", nbt, false);
        Self { bn, num_batches_tracked }
    }
}

impl ModuleT for BatchNorm {
    /// `[N, C, H, W]` → `[N, C, H, W]`.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        if train {
            let mut n = self.num_batches_tracked.shallow_clone();
            tch::no_grad(|| {
                let _ = n.f_add_scalar_(1);
            });
        }
        self.bn.forward_t(xs, train)
    }
}

#[derive(Debug)]
struct Block {
    convs: Vec<(nn::Conv2D, BatchNorm)>,
    downsample: Option<(nn::Conv2D, BatchNorm)>,
}

impl Block {
    fn new(p: &nn::Path, b: &BlockSpec) -> Self {
        let p = p / b.prefix.split('.').nth(1).unwrap_or("0");
        let convs = match b.kind {
            BlockKind::Basic => vec![
                (conv(&p / "conv1", b.in_channels, b.planes, 3, b.stride, 1), BatchNorm::new(&p / "bn1", b.planes)),
                (conv(&p / "conv2", b.planes, b.planes, 3, 1, 1), BatchNorm::new(&p / "bn2", b.planes)),
            ],
            BlockKind::Bottleneck => vec![
                (conv(&p / "conv1", b.in_channels, b.planes, 1, 1, 0), BatchNorm::new(&p / "bn1", b.planes)),
                (conv(&p / "conv2", b.planes, b.planes, 3, b.stride, 1), BatchNorm::new(&p / "bn2", b.planes)),
                (conv(&p / "conv3", b.planes, b.out_channels, 1, 1, 0), BatchNorm::new(&p / "bn3", b.out_channels)),
            ],
        };
        let downsample = b.downsample.then(|| {
            let d = &p / "downsample";
            (conv(&d / "0", b.in_channels, b.out_channels, 1, b.stride, 0), BatchNorm::new(&d / "1", b.out_channels))
        });
        Self { convs, downsample }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let last = self.convs.len() - 1;
        let mut y = xs.shallow_clone();
        for (i, (c, bn)) in self.convs.iter().enumerate() {
            y = bn.forward_t(&y.apply(c), train);
            if i != last {
                y = y.relu();
            }
        }
        let skip = match &self.downsample {
            Some((c, bn)) => bn.forward_t(&xs.apply(c), train),
            None => xs.shallow_clone(),
        };
        (y + skip).relu()
    }
}

/// A ResNet without its classifier.
#[derive(Debug)]
pub struct Backbone {
    pub spec: BackboneSpec,
    conv1: nn::Conv2D,
    bn1: BatchNorm,
    layers: Vec<Block>,
}

impl Backbone {
    /// Creates the variables under `p` (names `conv1.weight`, `layer1.0.bn1.running_mean`, ...).
    pub fn new(p: &nn::Path, spec: BackboneSpec) -> Self {
        let conv1 = conv(p / "conv1", spec.in_channels, geossl_models::arch::STEM_CHANNELS, 7, 2, 3);
        let bn1 = BatchNorm::new(p / "bn1", geossl_models::arch::STEM_CHANNELS);
        let layers = spec
            .blocks()
            .iter()
            .map(|b| {
                let layer = b.prefix.split('.').next().unwrap_or("layer1");
                Block::new(&(p / layer), b)
            })
            .collect();
        Self { spec, conv1, bn1, layers }
    }

    /// Normalized images `[N, C, H, W]` → last feature map `[N, D, ⌈H/32⌉, ⌈W/32⌉]`.
    pub fn feature_map(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut y = self.bn1.forward_t(&xs.apply(&self.conv1), train).relu();
        y = y.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        for b in &self.layers {
            y = b.forward_t(&y, train);
        }
        y
    }

    /// Normalized images `[N, C, H, W]` → pooled features `[N, D]` (torchvision's
    /// forward with `fc = Identity`).
    pub fn pooled(&self, xs: &Tensor, train: bool) -> Tensor {
        self.feature_map(xs, train).adaptive_avg_pool2d([1, 1]).flatten(1, -1)
    }
}
