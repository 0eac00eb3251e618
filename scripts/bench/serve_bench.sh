#!/usr/bin/env bash
# Serving benchmark on this machine: raw ONNX Runtime vs geossl-serve over HTTP
# vs a FastAPI + onnxruntime server, same ResNet-50 (224², uint8 input) and
# batch. Writes the JSON report to docs/benchmarks/serve-cpu.json.
#   bash scripts/bench/serve_bench.sh        (after scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
ARCH=${ARCH:-resnet50}
SIZE=${SIZE:-224}
BATCH=${BATCH:-8}
SECONDS_PER_PHASE=${SECONDS_PER_PHASE:-20}
OUT=${OUT:-docs/benchmarks/serve-cpu.json}
WORK=$(mktemp -d)
trap 'kill ${FAPI_PID:-} 2>/dev/null || true; rm -rf "$WORK"' EXIT

.venv/bin/pip install -q fastapi==0.165.0 uvicorn==0.54.0
cargo build --locked -p geossl-trainer -p geossl-exporter --bins
cargo build --locked --release -p geossl-serve --bins
target/debug/geossl-train init --arch "$ARCH" --input-size "$SIZE" --out "$WORK/ck" >/dev/null
mkdir -p "$WORK/repo/$ARCH/1"
target/debug/geossl-export onnx --checkpoint "$WORK/ck" --head embed --out "$WORK/repo/$ARCH/1/model.onnx"
printf 'max_batch_size = %s\nmax_queue_delay_ms = 5\nqueue_capacity = 256\n' "$BATCH" > "$WORK/repo/$ARCH/config.toml"

PORT=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
(cd scripts/bench && MODEL="$WORK/repo/$ARCH/1/model.onnx" "$ROOT/.venv/bin/python" -m uvicorn fastapi_server:app \
    --host 127.0.0.1 --port "$PORT" --log-level warning) &
FAPI_PID=$!
for _ in $(seq 120); do curl -sf "127.0.0.1:$PORT/v2/health/ready" >/dev/null && break; sleep 0.5; done

mkdir -p "$(dirname "$OUT")"
GEOSSL_BENCH_REPO="$WORK/repo" GEOSSL_BENCH_MODEL="$ARCH" GEOSSL_BENCH_BATCH="$BATCH" \
GEOSSL_BENCH_SECONDS="$SECONDS_PER_PHASE" GEOSSL_BENCH_FASTAPI="127.0.0.1:$PORT" \
    cargo bench --locked -p geossl-serve --bench serve_http | tee "$OUT.tmp"
{ echo "{\"machine\": \"$(nproc) CPUs, $(uname -m)\", \"date\": \"$(date -u +%FT%TZ)\", \"report\":"; cat "$OUT.tmp"; echo "}"; } > "$OUT"
rm -f "$OUT.tmp"
echo "wrote $OUT"
