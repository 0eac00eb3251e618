//! A backbone plus the heads its spec lists, as tch modules.

use geossl_models::{HeadKind, HeadSpec, ModelSpec};
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

use crate::backbone::{conv, Backbone, BatchNorm};

/// MoCo-v2 projection `Linear → ReLU → Linear` (`proj.0`, `proj.2`).
#[derive(Debug)]
pub struct Projection {
    fc0: nn::Linear,
    fc2: nn::Linear,
}

impl Projection {
    /// `[N, D]` → `[N, out]`, not normalized.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        xs.apply(&self.fc0).relu().apply(&self.fc2)
    }
}

/// FCN head: 3×3 conv → BN → ReLU → dropout(0.1) → 1×1 conv, then bilinear
/// upsampling to the input size.
#[derive(Debug)]
pub struct SegHead {
    conv0: nn::Conv2D,
    bn1: BatchNorm,
    conv4: nn::Conv2D,
}

impl SegHead {
    /// Feature map `[N, D, h, w]` → logits `[N, K, out_h, out_w]`.
    pub fn forward_t(&self, fm: &Tensor, out_hw: [i64; 2], train: bool) -> Tensor {
        let y = self.bn1.forward_t(&fm.apply(&self.conv0), train).relu().dropout(0.1, train);
        y.apply(&self.conv4).upsample_bilinear2d(out_hw, false, None, None)
    }
}

/// A model built from a [`ModelSpec`]. Variables live in the `VarStore` whose
/// root path was given to [`Model::new`].
#[derive(Debug)]
pub struct Model {
    pub spec: ModelSpec,
    pub backbone: Backbone,
    pub projection: Option<Projection>,
    pub l2_normalize: bool,
    pub classifier: Option<nn::Linear>,
    pub segmentation: Option<SegHead>,
    pub geo: Option<nn::Linear>,
}

impl Model {
    /// Builds every module of `spec` under `p`. The spec must be valid.
    pub fn new(p: &nn::Path, spec: &ModelSpec) -> Self {
        let backbone = Backbone::new(p, spec.backbone);
        let d = spec.backbone.feature_dim() as i64;
        let mut m = Self {
            spec: spec.clone(),
            backbone,
            projection: None,
            l2_normalize: false,
            classifier: None,
            segmentation: None,
            geo: None,
        };
        for h in &spec.heads {
            match h {
                HeadSpec::Embedding(e) => {
                    m.l2_normalize = e.l2_normalize;
                    m.projection = e.projection.map(|pr| {
                        let q = p / "proj";
                        Projection {
                            fc0: nn::linear(&q / "0", d, pr.hidden as i64, Default::default()),
                            fc2: nn::linear(&q / "2", pr.hidden as i64, pr.out as i64, Default::default()),
                        }
                    });
                }
                HeadSpec::Classifier(c) => {
                    m.classifier = Some(nn::linear(p / "fc", d, c.num_classes as i64, Default::default()))
                }
                HeadSpec::Segmentation(s) => {
                    let q = p / "seg";
                    let bias = nn::ConvConfig { bias: true, ..Default::default() };
                    m.segmentation = Some(SegHead {
                        conv0: conv(&q / "0", d as usize, s.hidden, 3, 1, 1),
                        bn1: BatchNorm::new(&q / "1", s.hidden),
                        conv4: nn::conv2d(&q / "4", s.hidden as i64, s.num_classes as i64, 1, bias),
                    })
                }
                HeadSpec::Geo(g) => {
                    let inp = spec.projection_out().unwrap_or(spec.backbone.feature_dim()) as i64;
                    m.geo = Some(nn::linear(p / "geo", inp, g.num_clusters as i64, Default::default()))
                }
            }
        }
        m
    }

    /// Normalized images `[N, C, H, W]` → embedding `[N, E]`: pooled features,
    /// projected when the embedding head has a projection, L2-normalized when
    /// it says so. This is what the exported `embed` graph computes.
    pub fn embed(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut y = self.backbone.pooled(xs, train);
        if let Some(p) = &self.projection {
            y = p.forward(&y);
        }
        if self.l2_normalize {
            y = l2_normalize(&y);
        }
        y
    }

    /// Normalized images `[N, C, H, W]` → logits `[N, K]`, if there is a classifier.
    pub fn classify(&self, xs: &Tensor, train: bool) -> Option<Tensor> {
        let c = self.classifier.as_ref()?;
        Some(self.backbone.pooled(xs, train).apply(c))
    }

    /// Normalized images `[N, C, H, W]` → mask logits `[N, K, H, W]`, if there is a segmentation head.
    pub fn segment(&self, xs: &Tensor, train: bool) -> Option<Tensor> {
        let s = self.segmentation.as_ref()?;
        let size = xs.size();
        let fm = self.backbone.feature_map(xs, train);
        Some(s.forward_t(&fm, [size[2], size[3]], train))
    }

    /// Geo-cluster logits `[N, K]` from an un-normalized projection `[N, P]`
    /// (ReLU → Linear, as in the paper).
    pub fn geo_logits(&self, projection: &Tensor) -> Option<Tensor> {
        Some(projection.relu().apply(self.geo.as_ref()?))
    }

    pub fn has_head(&self, kind: HeadKind) -> bool {
        self.spec.head(kind).is_some()
    }
}

impl Module for Projection {
    fn forward(&self, xs: &Tensor) -> Tensor {
        Projection::forward(self, xs)
    }
}

/// Row-wise L2 normalization `[N, D]` → `[N, D]` (F.normalize, eps 1e-12).
pub fn l2_normalize(x: &Tensor) -> Tensor {
    let n = x.norm_scalaropt_dim(2.0, [1i64], true).clamp_min(1e-12);
    x / n
}

/// `[N, C, H, W]` with channels-last (NHWC) strides: same values and shape,
/// the layout cuDNN's tensor-core convolutions use without transposes.
pub fn channels_last(x: &Tensor) -> Tensor {
    if x.dim() != 4 {
        return x.shallow_clone();
    }
    x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// Re-lays every 4-D variable of `vs` (the convolution weights) channels-last,
/// in place: shallow clones (optimizer, momentum lists) see the new layout.
pub fn to_channels_last(vs: &nn::VarStore) {
    tch::no_grad(|| {
        for (_, mut v) in vs.variables() {
            if v.dim() == 4 {
                let cl = channels_last(&v);
                v.set_data(&cl);
            }
        }
    });
}
