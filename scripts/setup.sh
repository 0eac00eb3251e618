#!/usr/bin/env bash
# One-command setup for geossl, idempotent.
#
# Creates the project venv `.venv/` with the pinned packages of
# scripts/requirements.lock (scripts/requirements.txt resolved) and links the
# two native libraries the Rust build needs to stable paths inside the repository:
#   .libtorch -> .venv/.../site-packages/torch   (LIBTORCH for tch, see .cargo/config.toml)
#   .ort      -> .venv/.../site-packages/onnxruntime/capi (libonnxruntime for ort)
# After this, `cargo build` / `cargo test` work without activating anything.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

py="${PYTHON:-python3}"
missing=()
# Prerequisites this script cannot install (or installs only as root with apt): each named with its
# install command. The README lists the same.
if ! command -v "$py" >/dev/null || ! "$py" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  missing+=("Python ≥ 3.11 with venv and pip (the lock needs 3.11+): sudo apt-get install python3 python3-venv (or set PYTHON=/path/to/python3.11)")
fi
command -v cargo >/dev/null || missing+=("Rust (cargo; rust-toolchain.toml pins the version): curl --proto '=https' -sSf https://sh.rustup.rs | sh")
command -v cc >/dev/null && command -v c++ >/dev/null \
  || missing+=("a C and C++ compiler (tch's and distributed/'s C++ shims): sudo apt-get install build-essential")
# gloo's headers for the c10d shim of distributed/ (the torch wheel has gloo's code but not its headers).
if [ ! -f /usr/include/gloo/config.h ] && [ ! -f /usr/local/include/gloo/config.h ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing libgloo-dev (gloo's headers for distributed/)"
    apt-get install -y --no-install-recommends libgloo-dev >/dev/null 2>&1 \
      || { apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends libgloo-dev >/dev/null; } \
      || missing+=("gloo's headers (apt-get could not install libgloo-dev): sudo apt-get install libgloo-dev")
  else
    missing+=("gloo's headers for distributed/: sudo apt-get install libgloo-dev")
  fi
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: missing prerequisites:" >&2
  printf '  - %s\n' "${missing[@]}" >&2
  exit 1
fi
# Only the tests need kubectl (they render and validate k8s/ with its kustomize); they fail naming it.
command -v kubectl >/dev/null || echo "setup: note: the tests need kubectl ≥ 1.14 (kustomize built in): see https://kubernetes.io/docs/tasks/tools/install-kubectl-linux/ (e.g. sudo apt-get install kubectl from the Kubernetes apt repository)" >&2

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$py" --version)"
  "$py" -m venv .venv
fi

stamp=.venv/.geossl-requirements
lock=scripts/requirements.lock
if [ ! -f "$stamp" ] || ! cmp -s "$lock" "$stamp"; then
  # The venv takes ~4.9 GB; pip briefly needs room for one download beside it.
  need_mb=6200
  free_mb=$(df -Pm . | awk 'NR==2 {print $4}')
  if [ -n "$free_mb" ] && [ "$free_mb" -lt "$need_mb" ]; then
    echo "setup: only ${free_mb} MB free on the disk of $root; installing the venv needs about ${need_mb} MB" >&2
    exit 1
  fi
  echo "setup: installing $lock into .venv (torch is large; first run takes minutes)"
  # --no-compile: Python compiles what it imports on first use; byte-compiling all of torch up front took ~6 s.
  pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps --no-compile)
  # Large wheels (over ~100 MB installed) one pip call each: a call keeps its
  # downloads until it ends, and all of them at once would need ~3 GB more.
  big='^(torch|nvidia-[a-z0-9-]+)=='
  grep -E "$big" "$lock" | while read -r req; do
    "${pip[@]}" "$req" || { echo "setup: pip could not install $req" >&2; exit 1; }
  done
  "${pip[@]}" -r <(grep -Ev "^#|^$|$big" "$lock") || { echo "setup: pip could not install $lock" >&2; exit 1; }
  cp "$lock" "$stamp"
else
  echo "setup: .venv already has $lock"
fi

site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
[ -f "$site/torch/lib/libtorch.so" ] || { echo "setup: libtorch not found under $site/torch" >&2; exit 1; }
ln -sfn "$site/torch" .libtorch
ort_lib="$(ls "$site"/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null | head -n1)"
[ -n "$ort_lib" ] || { echo "setup: libonnxruntime not found under $site/onnxruntime/capi" >&2; exit 1; }
ln -sfn "$site/onnxruntime/capi" .ort

echo "setup: done (libtorch: .libtorch, onnxruntime: $ort_lib)"
