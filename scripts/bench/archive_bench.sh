#!/usr/bin/env bash
# Archive-embedding benchmark on this machine: chips/s of `geossl-serve embed` end to end, from local files and
# from a loopback S3-compatible store (moto), vs the raw ONNX Runtime session at the same batch size.
# Scene: a 3×3 mosaic of rasterio's real Landsat 7 test scene written as a COG (256-px tiles, deflate).
# Writes docs/benchmarks/archive_embed.json (one JSON object per configuration).
#   bash scripts/bench/archive_bench.sh        (after scripts/setup.sh; real pixels from tests/fixtures)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-docs/benchmarks/archive_embed.json}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cargo build --locked -p geossl-trainer -p geossl-exporter --bins
.venv/bin/python scripts/reference/mosaic_cog.py tests/fixtures/rasterio/RGB.byte.tif "$WORK/mosaic.tif"
: > "$OUT"
# Configurations "arch input-size batch copies", separated by ';'; idle ORT threads sleeping (0) or spinning (1).
CONFIGS=${CONFIGS:-"resnet18 64 32 6;resnet50 224 8 2"}
SPINS=${SPINS:-"0 1"}
IFS=';' read -ra cfgs <<< "$CONFIGS"
for cfg in "${cfgs[@]}"; do
  set -- $cfg
  target/debug/geossl-train init --arch "$1" --input-size "$2" --out "$WORK/ck-$1" >/dev/null
  target/debug/geossl-export onnx --checkpoint "$WORK/ck-$1" --head embed --out "$WORK/$1.onnx" >/dev/null
  for spin in $SPINS; do
    GEOSSL_BENCH_MODEL="$WORK/$1.onnx" GEOSSL_BENCH_SCENE="$WORK/mosaic.tif" GEOSSL_BENCH_BATCH="$3" \
      GEOSSL_BENCH_COPIES="$4" GEOSSL_BENCH_SPINNING="$spin" \
      cargo bench --locked -p geossl-serve --bench archive_embed 2>/dev/null | grep '^{' | tee -a "$OUT"
  done
done
