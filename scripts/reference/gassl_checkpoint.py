"""Writes a checkpoint in the layout of the paper's released MoCo weights with
PyTorch itself (torch.save of {'epoch', 'arch', 'state_dict', 'optimizer'};
state_dict keys module.encoder_q.* / module.encoder_k.* with the MLP as fc.0/fc.2,
module.queue, module.queue_ptr), plus a plain torchvision state dict, an input
batch and torchvision's pooled features of the query encoder (fc = Identity).
"""
import argparse
import pathlib

import torch
import torchvision
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--out", required=True, type=pathlib.Path)
    a = ap.parse_args()
    torch.manual_seed(1)
    q = getattr(torchvision.models, a.arch)(weights=None)
    d = q.fc.in_features
    with torch.no_grad():
        for m in q.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    tv = q.state_dict()
    q.fc = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.ReLU(), torch.nn.Linear(d, 128))
    sd = {}
    for k, v in q.state_dict().items():
        sd["module.encoder_q." + k] = v
        sd["module.encoder_k." + k] = v.clone()
    sd["module.queue"] = torch.randn(128, 1024)
    sd["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    opt = torch.optim.SGD(q.parameters(), lr=0.03, momentum=0.9)
    a.out.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 200, "arch": a.arch, "state_dict": sd, "optimizer": opt.state_dict()},
               a.out / "checkpoint_0199.pth.tar")
    torch.save(tv, a.out / "torchvision.pth")
    q.fc = torch.nn.Identity()
    q.eval()
    x = torch.randint(0, 256, (3, 3, 64, 64)).float()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = q((x / 255.0 - mean) / std)
    save_file({"input": x.contiguous(), "features": feats.contiguous()}, str(a.out / "io.safetensors"))


if __name__ == "__main__":
    main()
