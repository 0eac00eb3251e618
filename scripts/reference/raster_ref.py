"""GDAL (through rasterio) as the reference for geossl's GeoTIFF reading (used by tests).

  read SRC OUT [--window X,Y,W,H] [--bands 0,2]
      writes the samples (planar, little-endian, the file's own dtype) to OUT and
      prints {"dtype", "shape", "width", "height", "count", "nodata"} as JSON.
  variant SRC DST [--compress C] [--tiled --block N] [--interleave band|pixel]
                  [--predictor P] [--dtype T] [--nodata V]
      rewrites SRC's pixels and georeferencing into DST with those creation options.
"""
import argparse
import json
import sys

import numpy as np
import rasterio
from rasterio.windows import Window


def read(a):
    with rasterio.open(a.src) as d:
        bands = [int(b) + 1 for b in a.bands.split(",")] if a.bands else list(range(1, d.count + 1))
        win = None
        if a.window:
            x, y, w, h = (int(v) for v in a.window.split(","))
            win = Window(x, y, w, h)
        arr = d.read(bands, window=win)
        arr.astype(arr.dtype.newbyteorder("<")).tofile(a.out)
        print(json.dumps({"dtype": str(arr.dtype), "shape": list(arr.shape), "width": d.width,
                          "height": d.height, "count": d.count, "nodata": d.nodata}))


def variant(a):
    with rasterio.open(a.src) as d:
        arr = d.read()
        profile = d.profile.copy()
    profile.pop("blockxsize", None)
    profile.pop("blockysize", None)
    profile.pop("photometric", None)
    profile.update(driver="GTiff", compress=a.compress, interleave=a.interleave, tiled=a.tiled)
    if a.tiled:
        profile.update(blockxsize=a.block, blockysize=a.block)
    else:
        profile.update(blockysize=a.block)
    if a.predictor:
        profile.update(predictor=a.predictor)
    if a.dtype:
        info = np.iinfo(a.dtype) if np.dtype(a.dtype).kind in "iu" else None
        arr = np.clip(arr, info.min, info.max) if info else arr
        arr = arr.astype(a.dtype)
        profile.update(dtype=a.dtype)
    if a.nodata is not None:
        profile.update(nodata=a.nodata)
    if a.compress == "none":
        profile.pop("compress")
    with rasterio.open(a.dst, "w", **profile) as out:
        out.write(arr)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("read")
    r.add_argument("src")
    r.add_argument("out")
    r.add_argument("--window")
    r.add_argument("--bands")
    v = sub.add_parser("variant")
    v.add_argument("src")
    v.add_argument("dst")
    v.add_argument("--compress", default="none")
    v.add_argument("--tiled", action="store_true")
    v.add_argument("--block", type=int, default=64)
    v.add_argument("--interleave", default="pixel")
    v.add_argument("--predictor", type=int)
    v.add_argument("--dtype")
    v.add_argument("--nodata", type=float)
    a = ap.parse_args()
    {"read": read, "variant": variant}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
