#!/usr/bin/env bash
# Prepared GPU check for the server (see ../shared/gpu/README.md for the host).
#
# Here (CPU machine):   bash scripts/gpu/serve_bench.sh build
#   builds release geossl-serve, geossl-train, geossl-export and the serve_http
#   bench into .gpus/ (git-ignored), and the ONNX Runtime GPU parts .ortc1..4
#   (../shared/gpu/ort-gpu-parts.sh).
# There: carry .ortc1 .. .ortc4 in four back-to-back calls, each copying its part to
#   /tmp/ortchunks/partN; then, carrying .gpus:   bash scripts/gpu/serve_bench.sh run
#   1. unpacks ONNX Runtime GPU into /tmp/ortgpu;
#   2. makes a ResNet-50 224² model repository there (random init; speed does not
#      depend on the weights): fp16 compute, uint8 input, max_batch_size 256;
#   3. runs the serve_http bench with the CUDA EP (error_on_failure: no silent CPU
#      fallback): the raw ORT session with NHWC kernels and pinned-memory IO binding
#      each on and off, then raw ORT (defaults: both on) vs geossl-serve over HTTP, same batch;
#      target ≥ 20,000 img/s ResNet-50 embeddings on an H200.
#   Output: $OUT/serve-gpu.json (or docs/benchmarks/serve-gpu.json).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
case "${1:-}" in
  build)
    cargo build --locked --release -p geossl-serve -p geossl-exporter --bins
    cargo build --locked --release -p geossl-trainer --bin geossl-train
    cargo bench --locked -p geossl-serve --bench serve_http --no-run 2>&1 | tee /tmp/geossl-serve-bench-build.log
    bench=$(ls -t target/release/deps/serve_http-* | grep -v '\.d$' | head -n1)
    rm -rf .gpus && mkdir -p .gpus/release
    cp target/release/geossl-serve target/release/geossl-export target/release/geossl-train .gpus/release/
    cp "$bench" .gpus/release/serve_http
    strip .gpus/release/* || true
    du -sh .gpus
    [ -f .ortc1 ] || bash ../shared/gpu/ort-gpu-parts.sh .
    echo "built .gpus/; carry .ortc1..4 (one per call) then .gpus"
    ;;
  run)
    TL=/opt/torch/.venv/lib/python3.12/site-packages
    mkdir -p /tmp/ortgpu && cat /tmp/ortchunks/part{1,2,3,4} | xz -dc | tar xf - -C /tmp/ortgpu
    export LD_LIBRARY_PATH=/tmp/ortgpu:$TL/torch/lib:$TL/nvidia/cu13/lib:$TL/nvidia/cudnn/lib:${LD_LIBRARY_PATH:-}
    export ORT_DYLIB_PATH=/tmp/ortgpu/libonnxruntime.so.1.31.1
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
    W=/tmp/gserve && rm -rf $W && mkdir -p $W/repo/resnet50/1
    .gpus/release/geossl-train init --arch resnet50 --input-size 224 --out $W/ck
    .gpus/release/geossl-export onnx --checkpoint $W/ck --head embed --fp16 --out $W/repo/resnet50/1/model.onnx
    printf 'max_batch_size = 256\nmax_queue_delay_ms = 2\nqueue_capacity = 1024\ninstances = 2\n' \
      > $W/repo/resnet50/config.toml
    # The bench finds geossl-serve next to itself (target/<profile>/ layout).
    mkdir -p $W/target/release/deps && cp .gpus/release/* $W/target/release/ && mv $W/target/release/serve_http $W/target/release/deps/
    out=${OUT:-docs/benchmarks}/serve-gpu.json
    GEOSSL_BENCH_REPO=$W/repo GEOSSL_BENCH_MODEL=resnet50 GEOSSL_BENCH_BATCH=256 GEOSSL_BENCH_SECONDS=10 \
    GEOSSL_BENCH_EP=cuda GEOSSL_BENCH_RAW_VARIANTS=1 $W/target/release/deps/serve_http | tee "$out"
    ;;
  *) echo "usage: $0 build|run" >&2; exit 2 ;;
esac
