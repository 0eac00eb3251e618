"""Reads a geossl GeoParquet file as common readers do (used by tests): pyarrow and GeoPandas.

Prints JSON: whether pyarrow's schema metadata and the file's key-value metadata carry `geo`; the number
of row groups, and how many pyarrow's dataset keeps (by their statistics) for a filter on the bbox covering
column with XMIN,YMIN,XMAX,YMAX; the rows GeoPandas returns
for that bbox, and the rows whose covering bbox intersects it (computed here from every row); the CRS.
"""
import json
import sys

import geopandas as gpd
import pyarrow.dataset as ds
import pyarrow.parquet as pq


def main():
    f = sys.argv[1]
    xmin, ymin, xmax, ymax = (float(v) for v in sys.argv[2].split(","))
    schema_meta = pq.read_table(f).schema.metadata or {}
    file_meta = pq.read_metadata(f).metadata or {}
    frag = next(iter(ds.dataset(f, format="parquet").get_fragments()))
    c = lambda k: ds.field("bbox", k)  # noqa: E731 (nested field reference)
    flt = (c("xmin") <= xmax) & (c("xmax") >= xmin) & (c("ymin") <= ymax) & (c("ymax") >= ymin)
    kept = frag.split_by_row_group(flt)
    everything = gpd.read_parquet(f)
    inside = gpd.read_parquet(f, bbox=(xmin, ymin, xmax, ymax))
    t = pq.read_table(f, columns=["bbox"]).column("bbox").to_pylist()
    expected = sum(1 for r in t if r["xmin"] <= xmax and r["xmax"] >= xmin and r["ymin"] <= ymax and r["ymax"] >= ymin)
    print(json.dumps({
        "pyarrow_geo": b"geo" in schema_meta,
        "file_geo": b"geo" in file_meta,
        "compression": pq.ParquetFile(f).metadata.row_group(0).column(0).compression,
        "row_groups": pq.ParquetFile(f).num_row_groups,
        "kept_row_groups": len(kept),
        "rows": len(everything),
        "geopandas_rows": len(inside),
        "expected_rows": expected,
        "crs": str(everything.crs),
    }))


if __name__ == "__main__":
    main()
