"""PyTorch eager reference for geossl's MoCo step benchmark.

The identical step to geossl's `Moco::step`: query forward (train-mode BN) +
MLP projection, momentum update of the key encoder, key forward on the shuffled
batch in `groups` sub-batches, InfoNCE against the queue, backward, SGD
(momentum 0.9, wd 1e-4), enqueue. Inputs are random normalized tensors (no
augmentation, no data loading) on both sides. Prints one JSON line.
"""
import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F
import torchvision


class Encoder(torch.nn.Module):
    def __init__(self, arch):
        super().__init__()
        self.backbone = getattr(torchvision.models, arch)(weights=None)
        d = self.backbone.fc.in_features
        self.backbone.fc = torch.nn.Identity()
        self.proj = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.ReLU(), torch.nn.Linear(d, 128))

    def forward(self, x):
        return self.proj(self.backbone(x))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--queue", type=int, default=4096)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true", help="autocast (CUDA)")
    ap.add_argument("--amp-dtype", choices=["bf16", "fp16"], default="bf16", help="fp16 adds a GradScaler")
    ap.add_argument("--channels-last", action="store_true", help="channels-last weights and inputs (CUDA)")
    a = ap.parse_args()
    dev = torch.device(a.device)
    torch.manual_seed(0)
    q_enc = Encoder(a.arch).to(dev)
    k_enc = copy.deepcopy(q_enc)
    for p in k_enc.parameters():
        p.requires_grad = False
    amp_dtype = torch.bfloat16 if a.amp_dtype == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(dev.type, enabled=a.amp and a.amp_dtype == "fp16")
    if a.channels_last:
        q_enc = q_enc.to(memory_format=torch.channels_last)
        k_enc = k_enc.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(q_enc.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    queue = F.normalize(torch.randn(a.queue, 128, device=dev), dim=1)
    ptr = 0
    xq = torch.randn(a.batch, 3, a.size, a.size, device=dev)
    xk = torch.randn(a.batch, 3, a.size, a.size, device=dev)
    if a.channels_last:
        xq = xq.contiguous(memory_format=torch.channels_last)
        xk = xk.contiguous(memory_format=torch.channels_last)

    def step():
        nonlocal ptr
        with torch.autocast(device_type=dev.type, dtype=amp_dtype, enabled=a.amp):
            q = F.normalize(q_enc(xq).float(), dim=1)
            with torch.no_grad():
                for pk, pq in zip(k_enc.parameters(), q_enc.parameters()):
                    pk.mul_(0.999).add_(pq.detach(), alpha=0.001)
                perm = torch.randperm(a.batch, device=dev)
                k = torch.cat([k_enc(c) for c in xk[perm].chunk(a.groups)]).float()
                k = F.normalize(k, dim=1)
                k = torch.zeros_like(k).index_copy(0, perm, k)
            l_pos = (q * k).sum(1, keepdim=True)
            l_neg = q @ queue.t()
            logits = torch.cat([l_pos, l_neg], 1) / 0.2
            loss = F.cross_entropy(logits, torch.zeros(a.batch, dtype=torch.long, device=dev))
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        queue[ptr : ptr + a.batch] = k
        ptr = (ptr + a.batch) % a.queue
        return loss

    for _ in range(a.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    loss.item()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    print(json.dumps({"impl": "pytorch-eager", "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "steps_per_s": a.steps / dt, "pairs_per_s": a.steps * a.batch / dt}))


if __name__ == "__main__":
    main()
