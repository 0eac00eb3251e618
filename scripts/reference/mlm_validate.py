"""Validates STAC MLM model cards offline with the field's own packages, the reference no one here wrote.

For each ITEM.json: pystac reads it as an Item and validates it against the STAC core JSON schemas it
bundles (v1.1.0; no network); stac-model's pydantic models (the MLM extension's own Python package)
validate the `mlm:` properties strictly; the MLM extension is read through pystac (stac-model's
MLModelExtension); the model asset must carry the `mlm:model` role (MLM: required) and its href must
name an existing file. Prints one JSON line per card: what the card says, as those packages read it.
Exits 1 naming the first card that fails.
"""
import json
import pathlib

import pystac
from pystac.validation.stac_validator import JsonSchemaSTACValidator
from stac_model.schema import SCHEMA_URI, MLModelExtension, MLModelProperties
from validation_cli import run


def check(path: pathlib.Path) -> dict:
    d = json.loads(path.read_text())
    item = pystac.Item.from_dict(d)
    JsonSchemaSTACValidator().validate_core(d, pystac.STACObjectType.ITEM, d["stac_version"], href=str(path))
    if SCHEMA_URI not in d.get("stac_extensions", []):
        raise ValueError(f"stac_extensions lacks {SCHEMA_URI}")
    props = MLModelProperties.model_validate(d["properties"])
    ext = MLModelExtension.ext(item)
    model_assets = [k for k, a in item.assets.items() if "mlm:model" in (a.roles or [])]
    if len(model_assets) != 1:
        raise ValueError(f"{len(model_assets)} assets with role mlm:model")
    asset = item.assets[model_assets[0]]
    target = (path.parent / asset.href).resolve()
    if not target.is_file():
        raise ValueError(f"model asset {asset.href} is not a file beside the card")
    inp = props.input[0]
    return {
        "card": str(path),
        "mlm_schema": ext.get_schema_uri(),
        "name": props.name,
        "architecture": props.architecture,
        "tasks": sorted(str(getattr(t, "value", t)) for t in props.tasks),
        "total_parameters": props.total_parameters,
        "input": {
            "name": inp.name,
            "bands": [b if isinstance(b, str) else b.name for b in inp.bands],
            "shape": inp.input.shape,
            "dim_order": inp.input.dim_order,
            "data_type": inp.input.data_type,
            "value_scaling": None
            if inp.value_scaling is None
            else [None if v is None else v.model_dump() for v in inp.value_scaling],
        },
        "outputs": [
            {"name": o.name, "tasks": sorted(str(getattr(t, "value", t)) for t in o.tasks), "shape": o.result.shape}
            for o in props.output
        ],
        "asset": {
            "href": asset.href,
            "roles": asset.roles,
            "artifact_type": asset.extra_fields.get("mlm:artifact_type"),
            "size": asset.extra_fields.get("file:size"),
            "checksum": asset.extra_fields.get("file:checksum"),
        },
    }


if __name__ == "__main__":
    run(check)
