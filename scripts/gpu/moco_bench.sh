#!/usr/bin/env bash
# Prepared GPU check for the trainer (see ../shared/gpu/README.md for the host).
#
# Here (CPU machine):   bash scripts/gpu/moco_bench.sh build
#   builds the release bench binary and copies it to .gpu/ (git-ignored), with
#   the Python reference script.
# There (GPU host, repo root, .gpu carried):   bash scripts/gpu/moco_bench.sh run
#   1. runs geossl's MoCo step vs PyTorch eager on ResNet-50, 224 px, batch 256,
#      queue 65536, bf16 autocast, channels-last, ABAB rounds, and appends to docs/benchmarks/moco_step.md
#      ($OUT/moco_step.md when $OUT is set);
#   2. times the input pipeline alone with 14 threads, PNG chips cut by the loader vs a chip pack cut on
#      the GPU, alternated (appends to docs/benchmarks/loader_ab.md);
#   3. runs `geossl-train pretrain` end to end (scripts/gpu/pretrain_e2e.toml) on real chips cut here
#      from tests/fixtures: once from the PNG chips (decoding + views on the loader threads), once from
#      their pack (views cut on the GPU); reports pairs/s from the metrics (goal: ≥ 0.95× the step alone).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
case "${1:-}" in
  build)
    cargo bench --locked -p geossl-trainer --bench moco_step --no-run 2>&1 | tee /tmp/geossl-bench-build.log
    bin=$(ls -t target/release/deps/moco_step-* | grep -v '\.d$' | head -n1)
    mkdir -p .gpu && cp "$bin" .gpu/moco_step
    cargo bench --locked -p geossl-trainer --bench loader --no-run 2>&1 | tail -n 2
    cp "$(ls -t target/release/deps/loader-* | grep -v '\.d$' | head -n1)" .gpu/loader
    cargo build --locked --release -p geossl-trainer --bin geossl-train
    cp target/release/geossl-train .gpu/
    rm -rf .gpu/chips
    # Real imagery: 256 px chips of the committed Landsat scene (tests/fixtures); each chip is listed
    # twice with two timestamps so temporal pairing runs (the same pixels are then decoded twice).
    .gpu/geossl-train chips --input tests/fixtures/rasterio/RGB.byte.tif --timestamp 2020-01-01 \
        --size 256 --stride 32 --out .gpu/chips
    { cat .gpu/chips/manifest.csv; tail -n +2 .gpu/chips/manifest.csv | sed 's/,2020-01-01,/,2021-01-01,/'; } \
        > .gpu/chips/manifest2.csv && mv .gpu/chips/manifest2.csv .gpu/chips/manifest.csv
    # Line tables make these ~100 MB each; the tree carried to the GPU host is limited to 64 MiB.
    strip .gpu/moco_step .gpu/loader .gpu/geossl-train
    du -sh .gpu
    echo "built .gpu/ (bench, geossl-train, chips); carry .gpu to the GPU host"
    ;;
  run)
    TL=/opt/torch/.venv/lib/python3.12/site-packages
    export LD_LIBRARY_PATH=$TL/torch/lib:$TL/nvidia/cu13/lib:$TL/nvidia/cudnn/lib:${LD_LIBRARY_PATH:-}
    export GEOSSL_PYTHON=/opt/torch/.venv/bin/python3 GEOSSL_ROOT="$PWD"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
    report=${OUT:-docs/benchmarks}/moco_step.md
    .gpu/moco_step --device cuda --arch resnet50 --size 224 --batch 256 --queue 65536 --groups 8 \
      --amp --amp-dtype bf16 --channels-last --warmup 5 --steps 20 --rounds 3 --report "$report"
    # The pack is made here (54 MB would not fit the carried tree); a few seconds.
    rm -rf /tmp/gpu-pack && .gpu/geossl-train pack --data .gpu/chips/manifest.csv --out /tmp/gpu-pack
    # The input pipeline alone with the e2e run's 14 threads: files cut by the loader vs the pack cut on the GPU.
    .gpu/loader --manifest .gpu/chips/manifest.csv --pack /tmp/gpu-pack --modes files,pack-device \
      --device cuda --batch 256 --batches 24 --workers 14 --rounds 2 --report "${OUT:-docs/benchmarks}/loader_ab.md"
    .gpu/geossl-train pretrain --config scripts/gpu/pretrain_e2e.toml --data .gpu/chips/manifest.csv \
      --out /tmp/e2e --no-progress
    tail -n 3 /tmp/e2e/metrics.jsonl | tee "${OUT:-/tmp}/e2e_metrics.jsonl"
    .gpu/geossl-train pretrain --config scripts/gpu/pretrain_e2e.toml --data /tmp/gpu-pack \
      --out /tmp/e2e-pack --no-progress
    tail -n 3 /tmp/e2e-pack/metrics.jsonl | tee "${OUT:-/tmp}/e2e_pack_metrics.jsonl"
    ;;
  *) echo "usage: $0 build|run" >&2; exit 2 ;;
esac
