"""Scenes for the archive-embedding benchmark, built from real imagery with GDAL (rasterio).

  big OUT       10980 x 10980 x 13 uint16, the size of a Sentinel-2 L1C tile: a mosaic of the five real
                eo-learn acquisitions (101 x 100 px each, reflectance x 10000), flipped by tile parity so that
                neighbouring tiles differ; tiled 512 x 512, deflate, EPSG:32633 at 10 m.
  rgb OUT SIZE  SIZE x SIZE x 3 uint8 mosaic of the real Landsat RGB scene, stripped, uncompressed, EPSG:32618.
"""
import os
import sys

import numpy as np
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures")


def mosaic(tiles, h, w, y0, rows):
    """Rows y0..y0+rows of an h x w mosaic of `tiles` ((C, th, tw) arrays), flipped by tile parity."""
    c, th, tw = tiles[0].shape
    out = np.empty((c, rows, w), dtype=tiles[0].dtype)
    ys = np.arange(y0, y0 + rows)
    for j in range(0, w, tw):
        for ty in np.unique(ys // th):
            sel = ys[(ys // th) == ty]
            k = int(ty + j // tw) % len(tiles)
            t = tiles[k]
            if (ty + j // tw) % 2:
                t = t[:, ::-1, :]
            if ty % 3 == 1:
                t = t[:, :, ::-1]
            part = t[:, sel % th, : min(tw, w - j)]
            out[:, sel - y0, j:j + part.shape[2]] = part
    return out


def big(out):
    scenes = np.load(os.path.join(FIXTURES, "eolearn", "REFERENCE_SCENES.npy"))
    tiles = [np.clip(np.round(s * 10000), 0, 65535).astype(np.uint16).transpose(2, 0, 1) for s in scenes]
    n = 10980
    profile = dict(driver="GTiff", width=n, height=n, count=13, dtype="uint16", crs="EPSG:32633",
                   transform=from_origin(399960, 5100000, 10, 10), tiled=True, blockxsize=512, blockysize=512,
                   compress="deflate", predictor=2, BIGTIFF="YES")
    with rasterio.open(out, "w", **profile) as d:
        for y0 in range(0, n, 512):
            rows = min(512, n - y0)
            d.write(mosaic(tiles, n, n, y0, rows), window=Window(0, y0, n, rows))


def rgb(out, size):
    with rasterio.open(os.path.join(FIXTURES, "rasterio", "RGB.byte.tif")) as s:
        tile = s.read(window=Window(100, 100, 500, 450))
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32618",
                   transform=from_origin(101985, 2826915, 30, 30))
    with rasterio.open(out, "w", **profile) as d:
        d.write(mosaic([tile], size, size, 0, size))


if __name__ == "__main__":
    if sys.argv[1] == "big":
        big(sys.argv[2])
    else:
        rgb(sys.argv[2], int(sys.argv[3]))
