#!/usr/bin/env bash
# Container images of geossl-serve and geossl-train: the release binaries this checkout builds plus the
# native libraries from Python wheels (no Rust toolchain inside an image), built and checked from inside.
#
#   scripts/images.sh names           the image names and tags the build makes (the k8s manifests use them)
#   scripts/images.sh stage           release binaries + libraries → build contexts target/image/{serve,train}
#   scripts/images.sh build [BASE]    stage, then build both images with buildah (no daemon needed) or docker,
#                                     FROM BASE (default: each Dockerfile's public base, debian:bookworm-slim)
#   scripts/images.sh check           inside each image: --version and --help run, ldd finds every library
#                                     (but the GPU driver's libcuda.so.1, which the NVIDIA runtime mounts),
#                                     the user is not root; prints the sizes
#   scripts/images.sh ci              what CI runs: a base image made from Debian's packages (mmdebstrap; no
#                                     registry is reachable), build on it, check, time the stage
#
# Libraries: geossl-serve loads ONNX Runtime at run time; the image carries onnxruntime-gpu 1.31.1's library
# and CUDA provider (its PyPI wheel, SHA-256 checked) and the CUDA 13 / cuDNN 9 libraries the provider needs,
# from the nvidia-* wheels in the project venv. geossl-train links libtorch: the image carries torch's lib/
# and the nvidia-* wheels' libraries in the wheels' own layout (libtorch_cuda finds them by its RUNPATH).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
serve_image="geossl/serve:$version"
train_image="geossl/train:$version"
ort_wheel=onnxruntime_gpu-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl
ort_sha256=e26c475fe361b2015f45b4b824bd13f0bb20204e59b62814e6f0acd5f3d491a6
ort_lib=libonnxruntime.so.1.31.1
store=(--storage-driver vfs)

say() { echo "images: $*" >&2; }
die() { say "$*"; exit 1; }

# Hard links where the tree allows (same file system), copies otherwise.
link() { cp -al "$1" "$2" 2>/dev/null || cp -a "$1" "$2"; }

site() {
  [ -e .libtorch ] || die "no .libtorch link: run scripts/setup.sh first"
  (cd "$(readlink -f .libtorch)/.." && pwd)
}

stage() {
  for b in geossl-serve geossl-train; do
    [ -x "target/release/$b" ] || die "target/release/$b is not built (cargo build --release --locked -p geossl-serve --bin geossl-serve -p geossl-trainer --bin geossl-train)"
  done
  local s; s=$(site)
  local ctx=target/image/serve
  rm -rf target/image && mkdir -p "$ctx/bin" "$ctx/onnxruntime" "$ctx/nvidia/cu13/lib" "$ctx/nvidia/cudnn"
  strip -o "$ctx/bin/geossl-serve" target/release/geossl-serve
  local wheels=target/image-cache
  mkdir -p "$wheels"
  if ! echo "$ort_sha256  $wheels/$ort_wheel" | sha256sum -c --status 2>/dev/null; then
    say "downloading $ort_wheel from PyPI"
    .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
      --platform manylinux_2_28_x86_64 onnxruntime-gpu==1.31.1 -d "$wheels"
    echo "$ort_sha256  $wheels/$ort_wheel" | sha256sum -c --status || die "$ort_wheel: SHA-256 differs from $ort_sha256"
  fi
  .venv/bin/python - "$wheels/$ort_wheel" "$ctx/onnxruntime" "$ort_lib" <<'EOF'
import sys, zipfile, pathlib
wheel, out, lib = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
want = {lib, "libonnxruntime_providers_shared.so", "libonnxruntime_providers_cuda.so"}
with zipfile.ZipFile(wheel) as z:
    for n in z.namelist():
        if n.startswith("onnxruntime/capi/") and n.rsplit("/", 1)[1] in want:
            (out / n.rsplit("/", 1)[1]).write_bytes(z.read(n))
            want.discard(n.rsplit("/", 1)[1])
if want:
    sys.exit(f"{wheel} lacks {sorted(want)}")
EOF
  # What libonnxruntime_providers_cuda.so needs (readelf NEEDED), and cuDNN, which it opens at run time.
  for l in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13; do
    link "$s/nvidia/cu13/lib/$l" "$ctx/nvidia/cu13/lib/$l"
  done
  link "$s/nvidia/cudnn/lib" "$ctx/nvidia/cudnn/lib"
  cp serve/Dockerfile "$ctx/Dockerfile"

  ctx=target/image/train
  mkdir -p "$ctx/bin" "$ctx/site/torch"
  strip -o "$ctx/bin/geossl-train" target/release/geossl-train
  link "$s/torch/lib" "$ctx/site/torch/lib"
  link "$s/nvidia" "$ctx/site/nvidia"
  cp trainer/Dockerfile "$ctx/Dockerfile"
  du -sh target/image/serve target/image/train >&2
}

# buildah without a daemon; docker where an engine answers.
tool() {
  if command -v buildah >/dev/null; then echo buildah
  elif docker info >/dev/null 2>&1; then echo docker
  else die "neither buildah nor a docker engine: apt-get install buildah (Debian) builds without a daemon"
  fi
}

build() {
  local base=${1:-}
  stage
  local t; t=$(tool)
  local args=()
  [ -n "$base" ] && args+=(--build-arg "BASE_IMAGE=$base")
  for pair in "serve:$serve_image" "train:$train_image"; do
    local dir=${pair%%:*} name=${pair#*:}
    say "building $name (target/image/$dir)"
    if [ "$t" = buildah ]; then
      buildah "${store[@]}" bud --isolation chroot --layers=false -q "${args[@]}" -t "$name" \
        -f "target/image/$dir/Dockerfile" "target/image/$dir" >/dev/null
    else
      docker build -q "${args[@]}" -t "$name" -f "target/image/$dir/Dockerfile" "target/image/$dir" >/dev/null
    fi
  done
}

# Runs `cmd…` inside image $1 as its configured user.
inside() {
  local image=$1; shift
  local c; c=$(buildah "${store[@]}" from -q "$image")
  local rc=0
  buildah "${store[@]}" run --isolation chroot "$c" -- "$@" || rc=$?
  buildah "${store[@]}" rm "$c" >/dev/null
  return $rc
}

# Every shared library of each file under the image's paths resolves (the driver aside).
check_ldd() {
  local image=$1; shift
  local out
  out=$(inside "$image" sh -c 'for f in "$@"; do echo "== $f"; ldd "$f"; done' sh "$@") || die "$image: ldd failed: $out"
  local missing
  missing=$(echo "$out" | awk '/^== /{f=$2} /not found/{print f": "$1}' | grep -v ': libcuda.so.1$' || true)
  [ -z "$missing" ] || die "$image: libraries not found inside the image:
$missing"
  local n; n=$(echo "$out" | grep -c '^== ')
  say "$image: ldd resolves every library of $n files (libcuda.so.1 is the driver's, mounted by the NVIDIA runtime)"
}

check() {
  command -v buildah >/dev/null || die "check runs inside the images with buildah"
  for name in "$serve_image" "$train_image"; do
    local bin=geossl-${name#geossl/}; bin=${bin%%:*}
    [ "$bin" = geossl-train ] || [ "$bin" = geossl-serve ] || die "unexpected image $name"
    local v; v=$(inside "$name" "$bin" --version) || die "$name: $bin --version failed"
    [ "$v" = "$bin $version" ] || die "$name: --version says '$v', wanted '$bin $version'"
    inside "$name" "$bin" --help >/dev/null || die "$name: $bin --help failed"
    local uid; uid=$(inside "$name" id -u)
    [ "$uid" != 0 ] || die "$name runs as root"
    say "$name: '$v', --help runs, user id $uid"
  done
  check_ldd "$serve_image" /usr/local/bin/geossl-serve /opt/onnxruntime/$ort_lib \
    /opt/onnxruntime/libonnxruntime_providers_cuda.so /opt/onnxruntime/libonnxruntime_providers_shared.so
  # The image's ONNX Runtime loads and runs: the serve image embeds a real Landsat scene (tests/fixtures)
  # with a ResNet-18 made by this checkout's release binaries, on the CPU.
  local m=target/image-cache/check
  rm -rf "$m" && mkdir -p "$m"
  target/release/geossl-train init --arch resnet18 --input-size 64 --seed 7 --out "$m/ck" >/dev/null
  target/release/geossl-export onnx --checkpoint "$m/ck" --out "$m/model.onnx" >/dev/null
  local c; c=$(buildah "${store[@]}" from -q "$serve_image")
  buildah "${store[@]}" copy -q --chown 10001 "$c" "$m/model.onnx" tests/fixtures/rasterio/RGB.byte.tif /tmp/ >/dev/null
  local o rc=0
  o=$(buildah "${store[@]}" run --isolation chroot "$c" -- geossl-serve embed --model /tmp/model.onnx \
        --input /tmp/RGB.byte.tif --out /tmp/out.parquet --execution-provider cpu 2>&1) || rc=$?
  buildah "${store[@]}" rm "$c" >/dev/null
  [ $rc = 0 ] && echo "$o" | grep -q "95 rows" || die "$serve_image: embedding the Landsat scene failed: $o"
  say "$serve_image: embedded the Landsat scene inside the image ($(echo "$o" | grep -o '95 rows[^;]*'))"
  check_ldd "$train_image" /usr/local/bin/geossl-train /opt/site/torch/lib/libtorch_cuda.so /opt/site/torch/lib/libtorch_cpu.so
  buildah "${store[@]}" images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep -E "geossl/(serve|train):$version" | sed 's/^/images: size /' >&2
}

case "${1:-}" in
  names) echo "$serve_image $train_image" ;;
  stage) stage ;;
  build) build "${2:-}" ;;
  check) check ;;
  ci)
    t0=$(date +%s)
    command -v buildah >/dev/null && command -v mmdebstrap >/dev/null && command -v podman >/dev/null \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
             buildah podman mmdebstrap >/dev/null; }
    base=localhost/geossl-base:bookworm
    if ! podman "${store[@]}" image exists "$base"; then
      say "base image $base from Debian's packages (mmdebstrap minbase + ca-certificates)"
      mkdir -p target/image-cache
      mmdebstrap --quiet --variant=minbase --include=ca-certificates bookworm target/image-cache/base.tar
      podman "${store[@]}" import -q target/image-cache/base.tar "$base" >/dev/null
      rm -f target/image-cache/base.tar
    fi
    build "$base"
    check
    say "stage took $(( $(date +%s) - t0 )) s"
    ;;
  *) sed -n '2,18p' "$0"; exit 2 ;;
esac
