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
if ! command -v "$py" >/dev/null; then
  echo "setup: $py not found; install Python 3.10+ first" >&2
  exit 1
fi

# gloo's headers for the c10d shim of dist/ (the torch wheel has gloo's code but not its headers).
if [ ! -f /usr/include/gloo/config.h ] && [ ! -f /usr/local/include/gloo/config.h ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing libgloo-dev (gloo's headers for dist/)"
    apt-get install -y --no-install-recommends libgloo-dev >/dev/null 2>&1 \
      || { apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends libgloo-dev >/dev/null; } \
      || { echo "setup: apt-get could not install libgloo-dev" >&2; exit 1; }
  else
    echo "setup: gloo's headers are missing: install libgloo-dev (e.g. sudo apt-get install libgloo-dev)" >&2
    exit 1
  fi
fi

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
  pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps)
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
