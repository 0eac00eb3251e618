"""Real Sentinel-2 L1C test data as archives store it (used by tests).

From eo-learn's REFERENCE_SCENES.npy (5 acquisitions of one 1 km spot in Slovenia,
13 bands B01..B12 with B8A, reflectance 0..1), writes with GDAL (rasterio):
  OUT/scenes/s2_<date>.tif   13-band uint16 (reflectance x 10000) GeoTIFFs, EPSG:32633,
                             chunky, deflate, with the TIFF DateTime tag;
  OUT/chips/<date>_<x>_<y>.tif  SIZE-px windows (stride STRIDE) of each date, planar (band-sequential),
                             georeferenced; OUT/chips/manifest.csv (path,lat,lon,timestamp,location_id);
  OUT/variants/reversed.tif  the first date with its bands (and their descriptions) in reverse order;
  OUT/variants/no_b8a.tif    the first date without band B8A;
  OUT/scenes/lulc.tif        eo-learn's land-cover classes (LULC, uint16, 0 = no data) on the same grid;
and prints {"bands", "mean", "std" (reflectance units over the chips), "scenes", "chips"} as JSON.
"""
import argparse
import json
import os

import numpy as np
import pyproj
import rasterio
from rasterio.transform import from_bounds
from rasterio.windows import Window

BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]
DATES = ["2015-08-20", "2015-07-31", "2015-09-09", "2015-08-30", "2015-07-11"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="the eolearn folder of the test fixtures (tests/fixtures/eolearn)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--stride", type=int, default=17)
    a = ap.parse_args()
    scenes = np.load(os.path.join(a.data, "REFERENCE_SCENES.npy"))  # (5, H, W, 13) float32
    with open(os.path.join(a.data, "TestEOPatch", "bbox.geojson")) as f:
        ring = json.load(f)["coordinates"][0]
    xs, ys = [p[0] for p in ring], [p[1] for p in ring]
    t, h, w, c = scenes.shape
    transform = from_bounds(min(xs), min(ys), max(xs), max(ys), w, h)
    to_wgs84 = pyproj.Transformer.from_crs(32633, 4326, always_xy=True)
    os.makedirs(os.path.join(a.out, "scenes"), exist_ok=True)
    os.makedirs(os.path.join(a.out, "chips"), exist_ok=True)
    profile = dict(driver="GTiff", height=h, width=w, count=c, dtype="uint16", crs="EPSG:32633",
                   transform=transform)
    rows, chips, scene_paths = [], [], []
    for k in range(t):
        dn = np.clip(np.round(scenes[k] * 10000.0), 0, 65535).astype(np.uint16).transpose(2, 0, 1)
        path = os.path.join(a.out, "scenes", f"s2_{DATES[k]}.tif")
        with rasterio.open(path, "w", compress="deflate", interleave="pixel", **profile) as d:
            d.write(dn)
            d.update_tags(TIFFTAG_DATETIME=DATES[k].replace("-", ":") + " 10:00:00")
            for i, b in enumerate(BANDS):
                d.set_band_description(i + 1, b)
        scene_paths.append(path)
        for y in range(0, h - a.size + 1, a.stride):
            for x in range(0, w - a.size + 1, a.stride):
                win = Window(x, y, a.size, a.size)
                name = f"{DATES[k]}_{x}_{y}.tif"
                cp = dict(profile, height=a.size, width=a.size,
                          transform=rasterio.windows.transform(win, transform))
                chip = dn[:, y:y + a.size, x:x + a.size]
                with rasterio.open(os.path.join(a.out, "chips", name), "w", interleave="band", **cp) as d:
                    d.write(chip)
                cx, cy = rasterio.transform.xy(transform, y + a.size / 2, x + a.size / 2, offset="ul")
                lon, lat = to_wgs84.transform(cx, cy)
                rows.append(f"{name},{lat:.7f},{lon:.7f},{DATES[k]}T10:00:00Z,s2_{x}_{y}")
                chips.append(chip.astype(np.float64) / 10000.0)
    os.makedirs(os.path.join(a.out, "variants"), exist_ok=True)
    first = np.clip(np.round(scenes[0] * 10000.0), 0, 65535).astype(np.uint16).transpose(2, 0, 1)
    keep = [i for i, b in enumerate(BANDS) if b != "B8A"]
    for name, order in [("reversed", list(range(c))[::-1]), ("no_b8a", keep)]:
        p = dict(profile, count=len(order))
        with rasterio.open(os.path.join(a.out, "variants", f"{name}.tif"), "w", **p) as d:
            d.write(first[order])
            for k, i in enumerate(order):
                d.set_band_description(k + 1, BANDS[i])
    lulc = np.load(os.path.join(a.data, "TestEOPatch", "mask_timeless", "LULC.npy"))[:, :, 0].astype(np.uint16)
    with rasterio.open(os.path.join(a.out, "scenes", "lulc.tif"), "w", **dict(profile, count=1, nodata=0)) as d:
        d.write(lulc[None])
    with open(os.path.join(a.out, "chips", "manifest.csv"), "w") as f:
        f.write("path,lat,lon,timestamp,location_id\n" + "\n".join(rows) + "\n")
    stack = np.stack(chips)  # (n, 13, s, s)
    print(json.dumps({
        "bands": BANDS,
        "mean": stack.mean(axis=(0, 2, 3)).tolist(),
        "std": stack.std(axis=(0, 2, 3)).tolist(),
        "scenes": scene_paths,
        "chips": len(rows),
    }))


if __name__ == "__main__":
    main()
