"""A model made elsewhere, as the field makes one: PyTorch exports ONNX, stac-model writes its MLM card.

From a geossl checkpoint directory (spec.json + model.safetensors, torchvision parameter names):
  OUT/pt.onnx           torchvision ResNet with the checkpoint's weights (fc = Identity, then the embedding
                        head's projection and L2 normalization when the spec has them), exported by
                        torch.onnx.export: float32 input `x` already normalized, output `features`; no geossl
                        metadata at all.
  OUT/pt.item.json      its STAC MLM card written with stac-model + pystac: bands, NCHW float32 input,
                        per-band z-score value_scaling in stored units (the spec's normalization rewritten:
                        mean' = (mean - offset) / scale, stddev' = std / scale), the stored bands' data type on
                        the model asset, output `features` for similarity-search.
  OUT/reference.safetensors
                        for each --chips PNG (in order): `f64` = the network in float64 on the chip scaled in
                        float64 (the higher-precision reference), `f32` = PyTorch eager in float32 on the same
                        input; [N, D] each.
"""
import argparse
import copy
import datetime
import json
import pathlib

import numpy as np
import pystac
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file, save_file
from stac_model.base import ModelBand
from stac_model.input import InputStructure, ModelInput, ValueScalingZScore
from stac_model.output import ModelOutput, ModelResult
from stac_model.schema import ItemMLModelExtension, MLModelExtension, MLModelProperties


class Embedder(torch.nn.Module):
    def __init__(self, backbone, proj, l2):
        super().__init__()
        self.backbone, self.proj, self.l2 = backbone, proj, l2

    def forward(self, x):
        y = self.backbone(x)
        if self.proj is not None:
            y = self.proj(y)
        if self.l2:
            y = torch.nn.functional.normalize(y, dim=1)
        return y


def build(spec, weights):
    arch = spec["backbone"]["arch"]
    c = spec["backbone"]["in_channels"]
    m = getattr(torchvision.models, arch)(weights=None)
    if c != 3:
        m.conv1 = torch.nn.Conv2d(c, 64, kernel_size=7, stride=2, padding=3, bias=False)
    m.fc = torch.nn.Identity()
    own = m.state_dict()
    m.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=True)
    head = next((h for h in spec.get("heads", []) if h["kind"] == "embedding"), {})
    proj = None
    if head.get("projection"):
        p = head["projection"]
        d = m.inplanes if hasattr(m, "inplanes") else 512
        proj = torch.nn.Sequential(
            torch.nn.Linear(d, p["hidden"]), torch.nn.ReLU(), torch.nn.Linear(p["hidden"], p["out"])
        )
        proj.load_state_dict({k[len("proj.") :]: v for k, v in weights.items() if k.startswith("proj.")})
    return Embedder(m, proj, bool(head.get("l2_normalize"))).eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, type=pathlib.Path)
    ap.add_argument("--out", required=True, type=pathlib.Path)
    ap.add_argument("--chips", nargs="*", default=[], type=pathlib.Path)
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec = json.loads((a.checkpoint / "spec.json").read_text())
    model = build(spec, load_file(str(a.checkpoint / "model.safetensors")))
    c = spec["backbone"]["in_channels"]
    h, w = spec["input_size"]
    norm = spec["normalization"]
    scale = float(norm["scale"])
    offset = [float(o) for o in (norm.get("offset") or [0.0] * c)]
    mean = [(float(m) - o) / scale for m, o in zip(norm["mean"], offset)]
    std = [float(s) / scale for s in norm["std"]]

    a.out.mkdir(parents=True, exist_ok=True)
    onnx_path = a.out / "pt.onnx"
    with torch.no_grad():
        y = model(torch.zeros(1, c, h, w))
        torch.onnx.export(
            model,
            (torch.zeros(1, c, h, w),),
            str(onnx_path),
            input_names=["x"],
            output_names=["features"],
            dynamic_axes={"x": {0: "n"}, "features": {0: "n"}},
            opset_version=17,
            dynamo=False,
        )
    d = y.shape[1]

    props = MLModelProperties(
        name=f"torchvision-{spec['backbone']['arch']}-from-geossl",
        architecture="ResNet",
        tasks={"similarity-search"},
        framework="PyTorch",
        framework_version=torch.__version__,
        accelerator=None,
        input=[
            ModelInput(
                name="x",
                bands=[ModelBand(name=b) for b in spec["bands"]],
                input=InputStructure(
                    shape=[-1, c, h, w], dim_order=["batch", "channel", "height", "width"], data_type="float32"
                ),
                value_scaling=[ValueScalingZScore(mean=m, stddev=s) for m, s in zip(mean, std)],
            )
        ],
        output=[
            ModelOutput(
                name="features",
                tasks={"similarity-search"},
                result=ModelResult(shape=[-1, d], dim_order=["batch", "embedding"], data_type="float32"),
            )
        ],
    )
    item = pystac.Item(
        id="torchvision-embedder",
        geometry=None,
        bbox=None,
        datetime=datetime.datetime.now(datetime.timezone.utc),
        properties={},
    )
    ext: ItemMLModelExtension = MLModelExtension.ext(item, add_if_missing=True)
    ext.apply(props)
    item.add_asset(
        "model",
        pystac.Asset(
            href="pt.onnx",
            media_type="application/octet-stream; framework=onnx",
            roles=["mlm:model"],
            extra_fields={
                "mlm:artifact_type": "onnx",
                "bands": [{"name": b, "data_type": spec.get("sample_type") or "uint8"} for b in spec["bands"]],
            },
        ),
    )
    card = item.to_dict(include_self_link=False, transform_hrefs=False)
    (a.out / "pt.item.json").write_text(json.dumps(card, indent=2))

    if a.chips:
        px = np.stack([np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1) for p in a.chips])
        x64 = torch.from_numpy(px.astype(np.float64))
        x64 = (x64 - torch.tensor(mean, dtype=torch.float64).view(1, c, 1, 1)) / torch.tensor(
            std, dtype=torch.float64
        ).view(1, c, 1, 1)
        with torch.no_grad():
            f64 = copy.deepcopy(model).double()(x64)
            f32 = model(x64.float())
        save_file({"f64": f64.contiguous(), "f32": f32.contiguous()}, str(a.out / "reference.safetensors"))


if __name__ == "__main__":
    main()
