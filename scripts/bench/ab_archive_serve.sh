#!/usr/bin/env bash
# A/B of the archive and serving benchmarks (docs/benchmarks/restructure_ab.md): OLD (default 4340784, before
# #20/#21) against NEW, each built in its own worktree and target directory under AB_DIR; the same ONNX models
# and scene for both; rounds alternate the order. Results: AB_DIR/results.jsonl, one JSON line per run.
#   bash scripts/bench/ab_archive_serve.sh NEW_COMMIT      (after scripts/setup.sh and a debug build)
set -euo pipefail
NEW=${1:?new commit}
OLD=${OLD:-4340784}
ROUNDS=${ROUNDS:-3}
A=${AB_DIR:-/tmp/ab}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
git worktree prune
for v in old new; do
  c=$OLD; [ $v = new ] && c=$NEW
  [ -d $A/$v ] || git worktree add -f --detach $A/$v $c
  for l in .venv .libtorch .ort; do ln -sfn "$ROOT/$l" "$A/$v/$l"; done
  (cd $A/$v && CARGO_TARGET_DIR=$A/target-$v cargo bench --locked -p geossl-serve --bench archive_embed --bench serve_http --no-run 2>&1 | tail -3)
done
W=$A/work; mkdir -p $W
if [ ! -f $W/mosaic.tif ]; then
  .venv/bin/python scripts/reference/mosaic_cog.py tests/fixtures/rasterio/RGB.byte.tif $W/mosaic.tif
  target/debug/geossl-train init --arch resnet18 --input-size 64 --out $W/ck18 >/dev/null
  target/debug/geossl-export onnx --checkpoint $W/ck18 --head embed --out $W/resnet18.onnx >/dev/null
  target/debug/geossl-train init --arch resnet50 --input-size 224 --out $W/ck50 >/dev/null
  mkdir -p $W/repo/resnet50/1
  target/debug/geossl-export onnx --checkpoint $W/ck50 --head embed --out $W/repo/resnet50/1/model.onnx >/dev/null
  printf 'max_batch_size = 8\nmax_queue_delay_ms = 5\nqueue_capacity = 256\n' > $W/repo/resnet50/config.toml
fi
bin() { ls -t $A/target-$1/release/deps/$2-* | grep -v '\.d$' | head -1; }
for r in $(seq $ROUNDS); do
  for v in old new; do
    [ $((r % 2)) = 0 ] && v=$([ $v = old ] && echo new || echo old)
    cd "$A/$v"
    line=$(GEOSSL_BENCH_MODEL=$W/resnet18.onnx GEOSSL_BENCH_SCENE=$W/mosaic.tif GEOSSL_BENCH_BATCH=32 \
      GEOSSL_BENCH_COPIES=6 GEOSSL_BENCH_SPINNING=0 ORT_DYLIB_PATH="$ROOT/.ort/libonnxruntime.so.1.31.1" \
      $(bin $v archive_embed) --bench 2>/dev/null | grep '^{' | head -1)
    echo "{\"round\":$r,\"version\":\"$v\",\"bench\":\"archive\",\"report\":$line}" >> $A/results.jsonl
    rep=$(GEOSSL_BENCH_REPO=$W/repo GEOSSL_BENCH_MODEL=resnet50 GEOSSL_BENCH_BATCH=8 GEOSSL_BENCH_SECONDS=10 \
      ORT_DYLIB_PATH="$ROOT/.ort/libonnxruntime.so.1.31.1" $(bin $v serve_http) --bench 2>/dev/null | tr -d '\n')
    echo "{\"round\":$r,\"version\":\"$v\",\"bench\":\"serve\",\"report\":$rep}" >> $A/results.jsonl
    echo "round $r $v done $(date +%T)"
  done
done
