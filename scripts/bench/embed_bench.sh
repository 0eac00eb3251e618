#!/usr/bin/env bash
# Archive embedding benchmark (report: docs/benchmarks/embed_memory.md):
#  1. peak RSS and windows/s of `geossl-serve embed` on a 10980 x 10980 x 13 uint16 scene (the size of a
#     Sentinel-2 tile, 3.1 GB of samples) built from the real eo-learn series: windows are read through
#     geossl-raster, so memory should follow the windows, not the scene;
#  2. windows/s against a reference binary (GEOSSL_SERVE_REF, e.g. a build of an earlier commit that read
#     whole scenes) on an RGB uint8 scene that fits in memory, alternated REPEATS times.
# Usage: bash scripts/bench/embed_bench.sh  (release binaries; GEOSSL_SERVE, GEOSSL_SERVE_REF, GEOSSL_BENCH_DIR)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
work="${GEOSSL_BENCH_DIR:-/tmp/geossl-embed-bench}"
serve="${GEOSSL_SERVE:-target/release/geossl-serve}"
ref="${GEOSSL_SERVE_REF:-}"
repeats="${REPEATS:-3}"
rgb_size="${RGB_SIZE:-4096}"
py=.venv/bin/python
mkdir -p "$work"
[ -f "$work/big.tif" ] || $py scripts/bench/embed_scenes.py big "$work/big.tif"
[ -f "$work/rgb$rgb_size.tif" ] || $py scripts/bench/embed_scenes.py rgb "$work/rgb$rgb_size.tif" "$rgb_size"

# Only to make the two models: debug builds do.
cargo build --locked -p geossl-trainer --bin geossl-train -p geossl-exporter --bin geossl-export
train=target/debug/geossl-train
export_=target/debug/geossl-export
if [ ! -f "$work/m13/1/model.onnx" ]; then
  $train init --arch resnet18 --bands 13 --sample-type uint16 --input-size 64 --seed 1 --out "$work/ck13" >/dev/null
  mkdir -p "$work/m13/1" "$work/rgb/1"
  $export_ onnx --checkpoint "$work/ck13" --head embed --input uint16 --out "$work/m13/1/model.onnx" >/dev/null
  $train init --arch resnet18 --input-size 64 --seed 1 --out "$work/ck3" >/dev/null
  $export_ onnx --checkpoint "$work/ck3" --head embed --input uint8 --out "$work/rgb/1/model.onnx" >/dev/null
fi

# Runs `embed` with BIN on SCENE with MODEL; prints "rows seconds max_rss_mb".
run() {
  local bin=$1 model=$2 scene=$3 out="$work/out.parquet"
  rm -f "$out"
  /usr/bin/time -f "%e %M" -o "$work/time.txt" "$bin" embed --model "$model" --input "$scene" --out "$out" \
    --execution-provider cpu --batch-size 64 >"$work/embed.log" 2>&1 || { cat "$work/embed.log" >&2; exit 1; }
  local rows
  rows=$(sed -n 's/^wrote .* (\([0-9]*\) rows.*/\1/p' "$work/embed.log")
  read -r secs kb <"$work/time.txt"
  echo "$rows $secs $((kb / 1024))"
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%Y-%m-%dT%H:%MZ)"
echo "big scene: $(du -h "$work/big.tif" | cut -f1) on disk, 10980 x 10980 x 13 uint16 (3.1 GB of samples)"
if [ -z "${SKIP_BIG:-}" ]; then
read -r rows secs mb < <(run "$serve" "$work/m13/1/model.onnx" "$work/big.tif")
echo "| big 13-band uint16 | $rows windows | $secs s | $(echo "$rows / $secs" | bc -l | xargs printf '%.0f') windows/s | peak RSS $mb MB |"
fi
if [ -n "$ref" ]; then
  for i in $(seq 1 "$repeats"); do
    for b in "$ref" "$serve"; do
      read -r rows secs mb < <(run "$b" "$work/rgb/1/model.onnx" "$work/rgb$rgb_size.tif")
      echo "| rgb ${rgb_size}² uint8 | $(basename "$(dirname "$(dirname "$b")")")/$(basename "$b") | $rows windows | $secs s | $(echo "$rows / $secs" | bc -l | xargs printf '%.0f') windows/s | peak RSS $mb MB |"
    done
  done
fi
