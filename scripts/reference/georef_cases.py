"""GeoTIFFs in the projections archives use, and where GDAL + PROJ put their pixels (used by tests).

Writes OUT/<name>.tif from real pixels (a 64 x 48 crop of SRC) for each case below — national
grids, equal-area and polar projections, UTM south, a rotated raster (ModelTransformation) and a
PixelIsPoint raster — then reads each back with rasterio and prints, as JSON, the WGS84
(lat, lon) that pyproj gives for a few pixel positions.
"""
import argparse
import json
import os

import pyproj
import rasterio
from affine import Affine
from rasterio.windows import Window

CASES = [
    # name, EPSG, upper-left x, y, pixel size, rotation (degrees), area_or_point
    ("lambert93", 2154, 652_000.0, 6_862_000.0, 10.0, 0.0, "Area"),
    ("british-national-grid", 27700, 530_000.0, 180_000.0, 5.0, 0.0, "Area"),
    ("laea-europe", 3035, 4_321_000.0, 3_210_000.0, 20.0, 0.0, "Area"),
    ("antarctic-polar-stereographic", 3031, -1_000_000.0, 500_000.0, 100.0, 0.0, "Area"),
    ("arctic-polar-stereographic", 3413, -200_000.0, -2_000_000.0, 100.0, 0.0, "Area"),
    ("utm-33-south", 32733, 400_000.0, 7_000_000.0, 30.0, 0.0, "Area"),
    ("web-mercator", 3857, 1_113_194.9, 6_446_275.8, 50.0, 0.0, "Area"),
    ("rotated-utm-33-north", 32633, 465_000.0, 5_080_000.0, 10.0, 15.0, "Area"),
    ("pixel-is-point-utm-18-north", 32618, 101_985.0, 2_826_915.0, 300.0, 0.0, "Point"),
]
PIXELS = [(0.0, 0.0), (32.0, 24.0), (64.0, 48.0), (10.5, 40.5)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("out")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    with rasterio.open(a.src) as s:
        px = s.read(window=Window(300, 300, 64, 48))
    results = []
    for name, epsg, x0, y0, size, rot, aop in CASES:
        transform = Affine.translation(x0, y0) * Affine.rotation(rot) * Affine.scale(size, -size)
        path = os.path.join(a.out, f"{name}.tif")
        with rasterio.open(path, "w", driver="GTiff", width=64, height=48, count=px.shape[0], dtype=px.dtype,
                           crs=f"EPSG:{epsg}", transform=transform) as d:
            d.update_tags(AREA_OR_POINT=aop)
            d.write(px)
        with rasterio.open(path) as d:
            t = d.transform
            to_wgs84 = pyproj.Transformer.from_crs(d.crs, "EPSG:4326", always_xy=True)
            points = []
            for (c, r) in PIXELS:
                x, y = t * (c, r)
                lon, lat = to_wgs84.transform(x, y)
                points.append({"pixel": [c, r], "lat": lat, "lon": lon})
        results.append({"name": name, "epsg": epsg, "file": path, "points": points})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
