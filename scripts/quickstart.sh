#!/usr/bin/env bash
# The smallest end-to-end path that exists today: build the trainer, create a
# ResNet-18 checkpoint directory (spec.json + model.safetensors) and load it
# back. Later issues grow this into pretrain → export → serve on real imagery.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${GEOSSL_QUICKSTART_DIR:-runs/quickstart}"
cargo build --locked -p geossl-trainer --bin geossl-train
train=target/debug/geossl-train
$train init --arch resnet18 --input-size 224 --projection --out "$out/resnet18-init"
$train info --checkpoint "$out/resnet18-init"
echo "quickstart: checkpoint directory in $out/resnet18-init"
