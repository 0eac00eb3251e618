#!/usr/bin/env bash
# One-command setup for geossl, idempotent.
#
# Creates the project venv `.venv/` with the pinned packages of
# scripts/requirements.txt and links the two native libraries the Rust build
# needs to stable paths inside the repository:
#   .libtorch -> .venv/.../site-packages/torch   (LIBTORCH for tch, see .cargo/config.toml)
#   .ort      -> .venv/.../site-packages/onnxruntime/capi (libonnxruntime for ort)
# After this, `cargo build` / `cargo test` work without activating anything.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

py="${PYTHON:-python3}"
if ! command -v "$py" >/dev/null; then
  echo "setup: $py not found; install Python 3.10+ first" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$py" --version)"
  "$py" -m venv .venv
fi

stamp=.venv/.geossl-requirements
if [ ! -f "$stamp" ] || ! cmp -s scripts/requirements.txt "$stamp"; then
  echo "setup: installing scripts/requirements.txt into .venv (torch is large; first run takes minutes)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r scripts/requirements.txt
  cp scripts/requirements.txt "$stamp"
else
  echo "setup: .venv already has scripts/requirements.txt"
fi

site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
[ -f "$site/torch/lib/libtorch.so" ] || { echo "setup: libtorch not found under $site/torch" >&2; exit 1; }
ln -sfn "$site/torch" .libtorch
ort_lib="$(ls "$site"/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null | head -n1)"
[ -n "$ort_lib" ] || { echo "setup: libonnxruntime not found under $site/onnxruntime/capi" >&2; exit 1; }
ln -sfn "$site/onnxruntime/capi" .ort

echo "setup: done (libtorch: .libtorch, onnxruntime: $ort_lib)"
