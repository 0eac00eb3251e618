"""Validates an embeddings dataset's STAC Collection and Items offline, and checks them against the rows.

For COLLECTION.json: pystac reads the Collection and follows its `item` links (relative hrefs resolve beside
it); the Collection and every Item are validated against the STAC core JSON schemas pystac bundles (v1.1.0,
no network). The embeddings extension (geo-embeddings/embeddings-stac-specification, on no registry) is
checked by its published text: a Collection's required `emb:type` (pixel|chip), `emb:dimensions`,
`data_type`, its required `emb:model` and `emb:source-data` links; each Item's `embeddings` asset. Then
each Item against its GeoParquet part, read by geopandas: footprint = shapely's union of the rows'
footprints (symmetric difference ≤ 1e-9 of the area), bbox = the rows' bounds, `table:row_count` = rows,
datetime (or start/end) = the rows' time range. Prints one JSON line: the collection and per-item findings.
Exits 1 naming the first failure.
"""
import json
import pathlib

import geopandas
import pandas
import pystac
import shapely
from pystac.validation.stac_validator import JsonSchemaSTACValidator
from validation_cli import run

STAC_DATA_TYPES = {
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "cint16", "cint32", "cfloat32", "cfloat64", "other",
}


def fail(msg):
    raise ValueError(msg)


def check(path: pathlib.Path) -> dict:
    v = JsonSchemaSTACValidator()
    d = json.loads(path.read_text())
    v.validate_core(d, pystac.STACObjectType.COLLECTION, d["stac_version"], href=str(path))
    col = pystac.Collection.from_file(str(path))
    if d.get("emb:type") not in ("pixel", "chip"):
        fail(f"emb:type {d.get('emb:type')!r}")
    if not isinstance(d.get("emb:dimensions"), int) or d["emb:dimensions"] <= 0:
        fail(f"emb:dimensions {d.get('emb:dimensions')!r}")
    if d.get("data_type") not in STAC_DATA_TYPES:
        fail(f"data_type {d.get('data_type')!r}")
    rels = {l["rel"] for l in d["links"]}
    for r in ("emb:model", "emb:source-data"):
        if r not in rels:
            fail(f"the collection has no {r} link")
    items = list(col.get_items())
    if len(items) != sum(1 for l in d["links"] if l["rel"] == "item"):
        fail("not every item link resolves")
    found = []
    for item in items:
        href = item.get_self_href()
        raw = json.loads(pathlib.Path(href).read_text())
        v.validate_core(raw, pystac.STACObjectType.ITEM, raw["stac_version"], href=href)
        if "embeddings" not in raw["assets"]:
            fail(f"item {item.id} has no embeddings asset")
        part = pathlib.Path(href).parent / raw["assets"]["embeddings"]["href"]
        rows = geopandas.read_parquet(part)
        union = shapely.union_all(rows.geometry.values)
        footprint = shapely.geometry.shape(raw["geometry"])
        sym = footprint.symmetric_difference(union).area
        if sym > 1e-9 * union.area:
            fail(f"item {item.id}: footprint differs from the union of its rows' footprints by {sym}")
        bounds = list(rows.total_bounds)
        if max(abs(a - b) for a, b in zip(raw["bbox"], bounds)) > 1e-12:
            fail(f"item {item.id}: bbox {raw['bbox']} vs rows {bounds}")
        if raw["properties"]["table:row_count"] != len(rows):
            fail(f"item {item.id}: table:row_count {raw['properties']['table:row_count']} vs {len(rows)} rows")
        p = raw["properties"]
        times = rows["datetime"].dropna()
        if len(times):
            lo, hi = times.min(), times.max()
            if lo == hi:
                if pandas.Timestamp(p["datetime"]) != lo:
                    fail(f"item {item.id}: datetime {p['datetime']} vs rows {lo}")
            elif (pandas.Timestamp(p["start_datetime"]), pandas.Timestamp(p["end_datetime"])) != (lo, hi):
                fail(f"item {item.id}: {p['start_datetime']}..{p['end_datetime']} vs rows {lo}..{hi}")
        found.append({
            "id": item.id,
            "rows": len(rows),
            "footprint_area": footprint.area,
            "union_area": union.area,
            "geometry_type": raw["geometry"]["type"],
            "sources": sorted(l["href"] for l in raw["links"] if l["rel"] == "emb:source-data"),
            "quantization": p.get("emb:quantization"),
        })
    return {
        "collection": d["id"],
        "emb:type": d["emb:type"],
        "emb:dimensions": d["emb:dimensions"],
        "data_type": d["data_type"],
        "chip_layout": d.get("emb:chip_layout"),
        "model": next(l["href"] for l in d["links"] if l["rel"] == "emb:model"),
        "rows": d.get("table:row_count"),
        "items": found,
    }


if __name__ == "__main__":
    run(check)
