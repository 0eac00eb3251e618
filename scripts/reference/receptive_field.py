"""Where each cell of a ResNet's last feature map looks, against the footprints `embed --level spatial` wrote.

The receptive-field centre of a cell is measured, not assumed: torchvision's ResNet with every convolution's
weights set equal (1/fan-in), BatchNorm as identity, and max-pool replaced by an average pool of the same kernel,
stride and padding (the same geometry; max-pool's gradient would pick one of several tied inputs), is
differentiated at an all-ones input; the centroid of |d cell / d input| is the cell's receptive-field centre
(continuous pixel coordinates: pixel k spans [k, k + 1)). A receptive field cut by the image's edge (ResNet-18's
spans ~430 pixels) pulls the centroid inward, so the centres are measured on a 768-pixel input for the cells
whose field lies wholly inside it, and the line through them (centre = stride × index + offset, per axis) is the
geometry: it does not depend on the input's size.

Each row of PARQUET (window x, y; cell row, col; centre lon/lat; footprint) is then compared with its cell's
receptive-field centre moved into the scene (x + offset + stride × col, …), mapped to lon/lat by rasterio (the
scene's transform) and pyproj (to CRS84): the error in pixels (the row's centre mapped back), and whether the
footprint polygon contains the centre. Prints one JSON object.
"""
import argparse
import json

import numpy as np
import pyarrow.parquet as pq
import pyproj
import rasterio
import shapely
import shapely.wkb
import torch
import torchvision


def geometry(arch: str, size: int = 768):
    m = getattr(torchvision.models, arch)(weights=None)
    m.maxpool = torch.nn.AvgPool2d(kernel_size=3, stride=2, padding=1, count_include_pad=True)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.weight.fill_(1.0 / mod.weight[0].numel())
            elif isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.fill_(1.0), mod.bias.fill_(0.0), mod.running_mean.fill_(0.0), mod.running_var.fill_(1.0)
    m.eval()
    body = torch.nn.Sequential(*list(m.children())[:-2])  # conv1 … layer4
    x = torch.ones(1, 3, size, size, requires_grad=True)
    fm = body(x)
    g = fm.shape[2]
    coord = torch.arange(size, dtype=torch.float64) + 0.5
    mid = g // 2
    # The field's extent: where the middle cell's gradient is non-zero.
    (gm,) = torch.autograd.grad(fm[0, :, mid, mid].sum(), x, retain_graph=True)
    nz = torch.nonzero(gm[0].abs().sum(0).sum(0)).flatten()
    radius = float(nz.max() - nz.min() + 1) / 2
    fit = {}
    for axis in ("x", "y"):
        idx, cen = [], []
        for k in range(g):
            i, j = (mid, k) if axis == "x" else (k, mid)
            (gr,) = torch.autograd.grad(fm[0, :, i, j].sum(), x, retain_graph=True)
            w = gr[0].abs().sum(0).double()
            prof = w.sum(0) if axis == "x" else w.sum(1)
            nzk = torch.nonzero(prof).flatten()
            if nzk.min() == 0 or nzk.max() == size - 1:
                continue  # cut by the edge
            idx.append(k)
            cen.append(float((prof * coord).sum() / prof.sum()))
        stride, offset = np.polyfit(idx, cen, 1)
        resid = float(np.max(np.abs(np.polyval([stride, offset], idx) - np.array(cen))))
        fit[axis] = {"stride": float(stride), "offset": float(offset), "cells": len(idx), "max_residual": resid}
    return fit, radius


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--parquet", required=True)
    ap.add_argument("--scene", required=True)
    a = ap.parse_args()
    fit, radius = geometry(a.arch)
    t = pq.read_table(a.parquet).to_pydict()
    with rasterio.open(a.scene) as src:
        tr, crs = src.transform, src.crs
    to84 = pyproj.Transformer.from_crs(crs, "OGC:CRS84", always_xy=True)
    err, outside = 0.0, 0
    for win, cell, lon, lat, geom in zip(t["window"], t["cell"], t["center_lon"], t["center_lat"], t["geometry"]):
        cx = fit["x"]["offset"] + fit["x"]["stride"] * cell["col"]
        cy = fit["y"]["offset"] + fit["y"]["stride"] * cell["row"]
        elon, elat = to84.transform(*(tr * (win["x"] + cx, win["y"] + cy)))
        rx, ry = to84.transform(lon, lat, direction="INVERSE")
        col, row = ~tr * (rx, ry)
        err = max(err, float(np.hypot(col - (win["x"] + cx), row - (win["y"] + cy))))
        if not shapely.wkb.loads(geom).contains(shapely.Point(elon, elat)):
            outside += 1
    print(json.dumps({
        "receptive_field": fit,
        "receptive_field_size_px": 2 * radius,
        "rows": len(t["window"]),
        "max_error_px": err,
        "centres_outside_their_footprint": outside,
    }))


if __name__ == "__main__":
    main()
