"""Writes a 13-band Sentinel-2 ResNet-50 checkpoint in the layout TorchGeo distributes SSL4EO-S12 MoCo
weights in (timm/torchvision names, conv1.weight [64, 13, 7, 7]) with PyTorch itself (torch.save of the
state dict), plus a uint16 input batch (reflectance x 10000) and the pooled features PyTorch computes
for it after x * 1e-4 and per-band mean/std (used by tests).
"""
import argparse
import json
import pathlib

import torch
import torchvision
from safetensors.torch import save_file

# Per-band statistics in reflectance units (B01..B12 with B8A); any fixed values serve the test.
MEAN = [0.136, 0.117, 0.110, 0.102, 0.123, 0.187, 0.211, 0.204, 0.228, 0.062, 0.002, 0.165, 0.104]
STD = [0.032, 0.039, 0.040, 0.055, 0.054, 0.056, 0.063, 0.066, 0.067, 0.019, 0.001, 0.074, 0.061]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=pathlib.Path)
    a = ap.parse_args()
    torch.manual_seed(2)
    m = torchvision.models.resnet50(weights=None)
    m.conv1 = torch.nn.Conv2d(13, 64, kernel_size=7, stride=2, padding=3, bias=False)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.3, 0.3)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    a.out.mkdir(parents=True, exist_ok=True)
    torch.save(m.state_dict(), a.out / "ssl4eo_s12_rn50_13band.pth")
    m.fc = torch.nn.Identity()
    m.eval()
    x = torch.randint(0, 10000, (2, 13, 64, 64)).float()
    mean = torch.tensor(MEAN).view(1, 13, 1, 1)
    std = torch.tensor(STD).view(1, 13, 1, 1)
    with torch.no_grad():
        feats = m((x * 1e-4 - mean) / std)
    save_file({"input": x.contiguous(), "features": feats.contiguous()}, str(a.out / "io.safetensors"))
    (a.out / "stats.json").write_text(json.dumps({"mean": MEAN, "std": STD}))


if __name__ == "__main__":
    main()
