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

# However the script ends: the working containers of the checks (one per image: under vfs each is a whole
# copy of the image) and a temporary directory in memory (room_for) go.
containers=()
cleanup() {
  [ ${#containers[@]} = 0 ] || buildah "${store[@]}" rm "${containers[@]}" >/dev/null 2>&1 || true
  [ -z "$shm_tmp" ] || rm -rf "$shm_tmp"
}
shm_tmp=
trap cleanup EXIT
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
  # What a program linking libtorch never loads (the links go, the venv's files stay): headers, CMake files
  # and static archives; torch's Python bindings (they need libpython); the wheels' libraries that neither
  # torch's libraries nor theirs name or open: NVRTC's "alt" variant (torch opens libnvrtc.so.13), the
  # multi-GPU cuSOLVER, NVBLAS and the FFTW interface of cuFFT (4.04 → 3.76 GB).
  rm -rf "$ctx/site/torch/lib/libtorch_python.so" "$ctx"/site/nvidia/*/include "$ctx/site/nvidia/cu13/lib/cmake"
  find "$ctx/site/nvidia" \( -name '*.a' -o -name 'libnvrtc*.alt.so*' -o -name 'libcusolverMg.so*' \
    -o -name 'libnvblas.so*' -o -name 'libcufftw.so*' \) -delete
  cp trainer/Dockerfile "$ctx/Dockerfile"
  local d
  for d in serve train; do du -shL "target/image/$d" >&2; done
}

# Bytes under a build context, each file counted (the contexts share hard links with the venv and each other).
bytes() { find "$1" -type f -printf '%s\n' | awk '{n += $1} END {printf "%.0f\n", n}'; }

# $1, or its nearest existing parent.
existing() { local p=$1; until [ -e "$p" ]; do p=$(dirname "$p"); done; echo "$p"; }

# Free bytes of the file system holding $1.
free_bytes() { df --output=avail -B1 "$(existing "$1")" | tail -n1 | tr -d ' '; }

# Building an image from context $1 with the vfs driver holds its files four times at the peak (measured
# with the train image): copied into the build container, twice in the temporary directory ($TMPDIR, else
# /var/tmp) while the layer's blob is written, and as the committed layer. Where the disk holds two copies
# but not four and TMPDIR is not set, the blob goes through memory (/dev/shm) when memory holds it (measured:
# the train image's disk peak 13 → 6.5 GB). Otherwise stop with the numbers, before buildah fails deep in a
# commit.
room_for() {
  local dir=$1 name=$2
  local size; size=$(bytes "$dir")
  local graph; graph=$(buildah "${store[@]}" info --format '{{.store.GraphRoot}}' 2>/dev/null || echo /var/lib/containers)
  local tmp=${TMPDIR:-/var/tmp} margin=$(( 1 << 30 ))
  local free; free=$(free_bytes "$graph")
  local two=$(( 2 * size + margin )) need
  need=$two
  if [ "$(stat -c %d "$(existing "$graph")")" = "$(stat -c %d "$(existing "$tmp")")" ]; then
    need=$(( 4 * size + margin ))
    local mem; mem=$(awk '/^MemAvailable:/ {printf "%.0f\n", $2 * 1024}' /proc/meminfo)
    if [ "$free" -lt "$need" ] && [ "$free" -ge "$two" ] && [ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] \
      && [ "$(free_bytes /dev/shm)" -ge "$two" ] && [ "$mem" -ge $(( two + margin )) ]; then
      shm_tmp=$(mktemp -d /dev/shm/geossl-images.XXXXXX)
      export TMPDIR=$shm_tmp
      need=$two
      say "the disk holds two copies of $name's files but not four: its layer's blob goes through memory ($shm_tmp)"
    fi
  else
    local ft; ft=$(free_bytes "$tmp")
    [ "$ft" -ge $(( 2 * size )) ] || die "building $name ($(( size >> 20 )) MiB of files) needs $(( 2 * size >> 20 )) MiB free in $tmp while its layer is committed; $(( ft >> 20 )) MiB are free"
  fi
  [ "$free" -ge "$need" ] || die "building $name ($(( size >> 20 )) MiB of files) needs ~$(( need >> 20 )) MiB free under $graph (the files held $(( (need - margin) / size )) times while the layer is committed, + 1 GiB); $(( free >> 20 )) MiB are free. Free disk (e.g. target/debug) or point TMPDIR at another file system"
  say "building $name: $(( size >> 20 )) MiB of files, $(( free >> 20 )) MiB free under $graph (~$(( need >> 20 )) MiB needed)"
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
    if [ "$t" = buildah ]; then
      room_for "target/image/$dir" "$name"
      buildah "${store[@]}" bud --isolation chroot --layers=false -q "${args[@]}" -t "$name" \
        -f "target/image/$dir/Dockerfile" "target/image/$dir" >/dev/null
    else
      say "building $name (target/image/$dir)"
      docker build -q "${args[@]}" -t "$name" -f "target/image/$dir/Dockerfile" "target/image/$dir" >/dev/null
    fi
  done
}

# Runs `cmd…` in working container $1 as the image's configured user.
inside() { local c=$1; shift; buildah "${store[@]}" run --isolation chroot "$c" -- "$@"; }

# Every shared library of each file under the image's paths resolves (the driver aside).
check_ldd() {
  local c=$1 image=$2; shift 2
  local out
  out=$(inside "$c" sh -c 'for f in "$@"; do echo "== $f"; ldd "$f"; done' sh "$@") || die "$image: ldd failed: $out"
  local missing
  missing=$(echo "$out" | awk '/^== /{f=$2} /not found/{print f": "$1}' | grep -v ': libcuda.so.1$' || true)
  [ -z "$missing" ] || die "$image: libraries not found inside the image:
$missing"
  local n; n=$(echo "$out" | grep -c '^== ')
  say "$image: ldd resolves every library of $n files (libcuda.so.1 is the driver's, mounted by the NVIDIA runtime)"
}

check() {
  command -v buildah >/dev/null || die "check runs inside the images with buildah"
  local name c
  for name in "$serve_image" "$train_image"; do
    local bin=geossl-${name#geossl/}; bin=${bin%%:*}
    [ "$bin" = geossl-train ] || [ "$bin" = geossl-serve ] || die "unexpected image $name"
    c=$(buildah "${store[@]}" from -q "$name"); containers+=("$c")
    local v; v=$(inside "$c" "$bin" --version) || die "$name: $bin --version failed"
    [ "$v" = "$bin $version" ] || die "$name: --version says '$v', wanted '$bin $version'"
    inside "$c" "$bin" --help >/dev/null || die "$name: $bin --help failed"
    local uid; uid=$(inside "$c" id -u)
    [ "$uid" != 0 ] || die "$name runs as root"
    say "$name: '$v', --help runs, user id $uid"
    if [ "$bin" = geossl-serve ]; then
      # The binary, ONNX Runtime with its providers, and the CUDA/cuDNN libraries they name or open.
      local libs; libs=$(cd target/image/serve && find onnxruntime nvidia -name '*.so*' -type f | sed 's|^|/opt/|' | sort)
      # shellcheck disable=SC2086
      check_ldd "$c" "$name" /usr/local/bin/geossl-serve $libs
      # The image's ONNX Runtime loads and runs: the serve image embeds a real Landsat scene (tests/fixtures)
      # with a ResNet-18 made by this checkout's release binaries, on the CPU.
      local m=target/image-cache/check
      rm -rf "$m" && mkdir -p "$m"
      target/release/geossl-train init --arch resnet18 --input-size 64 --seed 7 --out "$m/ck" >/dev/null
      target/release/geossl-export onnx --checkpoint "$m/ck" --out "$m/model.onnx" >/dev/null
      buildah "${store[@]}" copy -q --chown 10001 "$c" "$m/model.onnx" tests/fixtures/rasterio/RGB.byte.tif /tmp/ >/dev/null
      local o
      o=$(inside "$c" geossl-serve embed --model /tmp/model.onnx --input /tmp/RGB.byte.tif --out /tmp/out.parquet \
            --execution-provider cpu 2>&1) && echo "$o" | grep -q "95 rows" \
        || die "$name: embedding the Landsat scene failed: $o"
      say "$name: embedded the Landsat scene inside the image ($(echo "$o" | grep -o '95 rows[^;]*'))"
    else
      # The binary, every library of torch's, and the wheels' libraries those name or open (not the plugins
      # that need the cluster's fabric libraries: NVSHMEM's bootstrap and transports (MPI, PMIx, UCX…) and
      # cuFile's RDMA (verbs)).
      local libs; libs=$(cd target/image/train/site && find torch/lib nvidia/cu13/lib nvidia/cudnn nvidia/nccl \
        nvidia/cusparselt nvidia/nvshmem/lib/libnvshmem_host.so.3 -name '*.so*' -type f ! -name 'libcufile_rdma*' \
        | sed 's|^|/opt/site/|' | sort)
      # shellcheck disable=SC2086
      check_ldd "$c" "$name" /usr/local/bin/geossl-train $libs
    fi
    buildah "${store[@]}" rm "$c" >/dev/null
    containers=()
  done
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
