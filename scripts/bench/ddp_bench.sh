#!/usr/bin/env bash
# Data-parallel pretraining on this machine's CPUs: 1 rank × 2 threads vs 2 ranks × 1 thread (Gloo over
# 127.0.0.1), the same global batch (32), ResNet-18 at 64², on chips of rasterio's real Landsat scene.
# Reports steps/s and the seconds rank 0 spent in collectives (waiting for the other rank included).
# Writes docs/benchmarks/ddp_cpu.json (or $OUT).   bash scripts/bench/ddp_bench.sh   (after scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-docs/benchmarks/ddp_cpu.json}
STEPS=${STEPS:-40}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# GEOSSL_TRAIN_BIN=path runs another build (an A/B of two versions); default: this checkout's release build.
bin=${GEOSSL_TRAIN_BIN:-target/release/geossl-train}
[ -n "${GEOSSL_TRAIN_BIN:-}" ] || cargo build --locked --release -p geossl-trainer --bin geossl-train
$bin chips --input tests/fixtures/rasterio/RGB.byte.tif --size 64 --out "$WORK/chips" >/dev/null
config() { # per-rank batch, file
  sed -e 's/^arch = .*/arch = "resnet18"/' -e 's/^input_size = .*/input_size = 64/' \
      -e 's/^queue_size = .*/queue_size = 4096/' -e 's/^shuffle_bn_groups = .*/shuffle_bn_groups = 2/' \
      -e "s/^batch_size = .*/batch_size = $1/" -e 's/^workers = .*/workers = 1/' \
      -e 's/^log_every = .*/log_every = 10/' -e 's/^checkpoint_every = .*/checkpoint_every = 100000/' \
      -e 's/^device = .*/device = "cpu"/' configs/moco.toml > "$2"
}
config 32 "$WORK/one.toml"
config 16 "$WORK/two.toml"
run() { # name config threads extra...
  local name=$1 cfg=$2 threads=$3; shift 3
  local t0=$(date +%s.%N)
  OMP_NUM_THREADS=$threads $bin pretrain --no-progress --config "$cfg" --data "$WORK/chips/manifest.csv" \
    --out "$WORK/$name" --max-steps "$STEPS" "$@" >/dev/null 2>"$WORK/$name.log"
  local t1=$(date +%s.%N)
  .venv/bin/python - "$WORK/$name/metrics.jsonl" "$name" "$threads" "$t0" "$t1" "$STEPS" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
first, last = lines[0], lines[-1]
steps = last["step"] - first["step"]
wall = float(sys.argv[5]) - float(sys.argv[4])
print(json.dumps({
    "run": sys.argv[2], "threads_per_rank": int(sys.argv[3]), "world_size": last.get("world_size", 1),
    "global_batch": 32, "steps": int(sys.argv[6]), "wall_s_incl_start": round(wall, 2),
    "img_per_s_rank0": round(last["img_per_s"], 1),
    "steps_per_s": round(last["img_per_s"] / (32 / last.get("world_size", 1)), 3),
    "comm_s_rank0": round(last.get("comm_s", 0.0), 3),
}))
PY
}
{
  run one-rank-2-threads "$WORK/one.toml" 2
  run two-ranks-1-thread "$WORK/two.toml" 1 --nproc-per-node 2
} | tee "$OUT"
