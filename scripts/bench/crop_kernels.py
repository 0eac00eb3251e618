"""CPU cost of cutting 224² views from 256² uint8 chips, one libtorch thread: libtorch's uint8 bilinear kernel
per row (channels-last, what the CPU device crop runs) vs one batched grid_sampler_2d in float (what a GPU
runs). Random crop boxes of RandomResizedCrop's sizes; CPU ms per view.

    .venv/bin/python scripts/bench/crop_kernels.py
"""
import random
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(1)
random.seed(0)
B, C, H, W, S = 64, 3, 256, 256, 224
raw = torch.randint(0, 256, (B, H, W, C), dtype=torch.uint8).permute(0, 3, 1, 2)  # channels-last, like a pack
boxes = []
for _ in range(B):
    ch, cw = random.randint(114, 256), random.randint(114, 256)
    boxes.append((random.randint(0, H - ch), random.randint(0, W - cw), ch, cw))


def rows():
    out = torch.empty((B, S, S, C), dtype=torch.uint8).permute(0, 3, 1, 2)
    for i, (t, l, h, w) in enumerate(boxes):
        x = raw[i : i + 1, :, t : t + h, l : l + w]
        out[i : i + 1] = F.interpolate(x, size=(S, S), mode="bilinear", antialias=h > S or w > S, align_corners=False)
    return out


def grid():
    tb = torch.tensor(boxes, dtype=torch.float32)
    d = torch.arange(S, dtype=torch.float32) + 0.5

    def pos(start, size, full):
        p = torch.minimum((d[None] * (size / S) - 0.5).clamp(min=0), size - 1) + start
        return p * 2 / (full - 1) - 1

    gy, gx = pos(tb[:, 0:1], tb[:, 2:3], H), pos(tb[:, 1:2], tb[:, 3:4], W)
    g = torch.stack([gx[:, None, :].expand(B, S, S), gy[:, :, None].expand(B, S, S)], -1)
    return F.grid_sample(raw.float(), g, mode="bilinear", padding_mode="border", align_corners=True)


for name, f in [("uint8 kernel per row (channels-last)", rows), ("batched grid_sample (float)", grid)]:
    f()
    t = time.process_time()
    for _ in range(5):
        f()
    print(f"{name}: {(time.process_time() - t) / 5 / B * 1e3:.3f} CPU-ms per view")
