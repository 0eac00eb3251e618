"""Writes a 3×3 mosaic of a GeoTIFF's pixels as a cloud-optimized GeoTIFF (GDAL's COG driver: 256-pixel tiles,
deflate, overviews), same CRS and pixel size: a larger real-pixel COG for range-read tests and benchmarks.

    python mosaic_cog.py SRC DST
"""
import sys

import numpy as np
import rasterio


def main():
    src, dst = sys.argv[1], sys.argv[2]
    with rasterio.open(src) as s:
        a, t, crs, nodata = s.read(), s.transform, s.crs, s.nodata
    big = np.tile(a, (1, 3, 3))
    with rasterio.open(dst, "w", driver="COG", width=big.shape[2], height=big.shape[1], count=big.shape[0],
                       dtype=big.dtype, crs=crs, transform=t, nodata=nodata, BLOCKSIZE=256,
                       COMPRESS="DEFLATE") as d:
        d.write(big)


if __name__ == "__main__":
    main()
