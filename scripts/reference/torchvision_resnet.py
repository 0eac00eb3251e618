"""Reference data from torchvision for geossl's parity tests.

Writes into --out:
  state_dict.json          [[name, shape, dtype], ...] of torchvision's state_dict(), in order
  torchvision.safetensors  that state dict (random init, BN statistics randomised so they matter)
  io.safetensors           `input` [N, C, H, W] and `features` [N, D] = torchvision forward with fc = Identity, eval mode
"""
import argparse
import json
import pathlib

import torch
import torchvision
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", required=True, choices=["resnet18", "resnet34", "resnet50"])
    ap.add_argument("--in-channels", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, type=pathlib.Path)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    m = getattr(torchvision.models, a.arch)(weights=None)
    if a.in_channels != 3:
        m.conv1 = torch.nn.Conv2d(a.in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
                mod.running_mean.uniform_(-0.3, 0.3)
                mod.running_var.uniform_(0.5, 2.0)
                mod.num_batches_tracked.fill_(7)
    sd = m.state_dict()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "state_dict.json").write_text(
        json.dumps([[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in sd.items()])
    )
    save_file({k: v.contiguous() for k, v in sd.items()}, str(a.out / "torchvision.safetensors"))

    m.fc = torch.nn.Identity()
    m.eval()
    x = torch.randn(a.batch, a.in_channels, a.size, a.size)
    with torch.no_grad():
        feats = m(x)
    save_file({"input": x.contiguous(), "features": feats.contiguous()}, str(a.out / "io.safetensors"))


if __name__ == "__main__":
    main()
