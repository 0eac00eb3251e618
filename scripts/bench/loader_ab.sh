#!/usr/bin/env bash
# The pretraining input pipeline, A/B: image files decoded and cut on the loader threads (the loader before
# chip packs, still the default for a manifest) against a chip pack whose views are cut on the device, on the
# same real chips and config: 145 256² RGB chips of rasterio's Landsat scene (tests/fixtures), each listed at
# two dates so every anchor has a temporal partner; 224² views, tp_resize 448, batch 128, decode cache off.
# Modes alternate within each round (files, pack-loader, pack-device, files, …) so the machine's drift hits
# each alike. Reports pairs/s delivered with the views ready on the device and the process's CPU-ms per pair
# (every thread, the device-side crop included when the device is this CPU).
#   bash scripts/bench/loader_ab.sh            (after scripts/setup.sh; DEVICE=cuda on a GPU host)
# Rows are appended to docs/benchmarks/loader_ab.md (or $REPORT); raw output in $WORK/loader_ab.log.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-3}
WORKERS=${WORKERS:-2}
BATCHES=${BATCHES:-8}
BATCH=${BATCH:-128}
DEVICE=${DEVICE:-cpu}
REPORT=${REPORT:-docs/benchmarks/loader_ab.md}
WORK=${WORK:-$(mktemp -d)}
# GEOSSL_TRAIN_BIN / GEOSSL_LOADER_BENCH: prebuilt binaries (a GPU host has no Rust); default: build here.
bin=${GEOSSL_TRAIN_BIN:-target/release/geossl-train}
if [ -z "${GEOSSL_LOADER_BENCH:-}" ]; then
  cargo build --locked --release -p geossl-trainer --bin geossl-train
  bench=$(cargo bench --locked -p geossl-trainer --bench loader --no-run --message-format=json 2>/dev/null |
    .venv/bin/python -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "loader" and m.get("executable"): print(m["executable"])')
else
  bench=$GEOSSL_LOADER_BENCH
fi
rm -rf "$WORK/chips" "$WORK/pack"
$bin chips --input tests/fixtures/rasterio/RGB.byte.tif --timestamp 2020-01-01 --size 256 --stride 32 \
  --out "$WORK/chips" >/dev/null
{ cat "$WORK/chips/manifest.csv"; tail -n +2 "$WORK/chips/manifest.csv" | sed 's/,2020-01-01,/,2021-01-01,/'; } \
  > "$WORK/m.csv" && mv "$WORK/m.csv" "$WORK/chips/manifest.csv"
$bin pack --data "$WORK/chips/manifest.csv" --out "$WORK/pack"
[ -f "$REPORT" ] || printf '%s\n' "| when | host | device | mode | views | batch | threads | round | pairs/s | CPU-ms per pair |" \
  "|---|---|---|---|---|---|---|---|---|---|" > "$REPORT"
GEOSSL_ROOT=$PWD "$bench" --manifest "$WORK/chips/manifest.csv" --pack "$WORK/pack" \
  --modes files,pack-loader,pack-device --rounds "$ROUNDS" --workers "$WORKERS" --batches "$BATCHES" \
  --batch "$BATCH" --size 224 --tp-resize 448 --cache-mib 0 --device "$DEVICE" --report "$REPORT" |
  tee "$WORK/loader_ab.log"
