#!/usr/bin/env bash
# Prepared GPU check for data-parallel pretraining on NCCL (see ../shared/gpu/README.md for the host).
#
# Here (CPU machine):   bash scripts/gpu/ddp_gpu.sh build
#   builds geossl-train (release, with ProcessGroupNCCL) into .gpu/ (git-ignored) with real chips cut from
#   the committed Landsat scene (tests/fixtures/rasterio) and the two configs below.
# There (GPU host, repo root, .gpu carried):   bash scripts/gpu/ddp_gpu.sh run [N]
#   N = GPUs to use (default: all `nvidia-smi -L` lists). Writes $OUT/ddp_gpu.json (or /tmp) and the logs.
#   1. equality: a small fp32 run (ResNet-18, 64 px, batch 64, 20 steps) twice as one process and once as
#      1 rank through c10d on NCCL (WORLD_SIZE=1, MASTER_ADDR set): per-step losses and final weights of
#      the NCCL run vs the single process, beside the single process's own run-to-run difference (cuDNN's
#      kernels are not bit-deterministic, so that is the yardstick for "within fp rounding");
#   2. throughput: the end-to-end moco-tp-geo step (scripts/gpu/pretrain_e2e.toml: ResNet-50, 224 px,
#      global batch 256, queue 65536, bf16) as one process, as 1 rank on NCCL, and as 1 rank with NCCL's
#      wait() blocking the host (TORCH_NCCL_BLOCKING_WAIT=1): steady pairs/s and the time in collectives;
#   3. with N > 1: the same global batch on N ranks (`--nproc-per-node N`, 256/N per GPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
case "${1:-}" in
  build)
    cargo build --locked --release -p geossl-trainer --bin geossl-train
    mkdir -p .gpu
    cp target/release/geossl-train .gpu/
    strip .gpu/geossl-train   # 98 MB with line tables, 8 MB without: the carried tree is limited to 64 MiB
    if [ ! -f .gpu/chips/manifest.csv ]; then
      # Real imagery: 256 px chips of the Landsat scene, each listed at two dates so temporal pairs exist.
      .gpu/geossl-train chips --input tests/fixtures/rasterio/RGB.byte.tif --timestamp 2020-01-01 \
          --size 256 --stride 32 --out .gpu/chips
      { cat .gpu/chips/manifest.csv; tail -n +2 .gpu/chips/manifest.csv | sed 's/,2020-01-01,/,2021-01-01,/'; } \
          > .gpu/chips/manifest2.csv && mv .gpu/chips/manifest2.csv .gpu/chips/manifest.csv
    fi
    # The equality config: MoCo-v2 small enough that 4 runs take seconds; fp32, no channels-last.
    sed -e 's/^arch = .*/arch = "resnet18"/' -e 's/^input_size = .*/input_size = 64/' \
        -e 's/^queue_size = .*/queue_size = 4096/' -e 's/^batch_size = .*/batch_size = 64/' \
        -e 's/^log_every = .*/log_every = 1/' -e 's/^workers = .*/workers = 6/' \
        -e 's/^device = .*/device = "cuda"/' configs/moco.toml > .gpu/ddp_eq.toml
    printf 'amp = false\nchannels_last = false\n' >> .gpu/ddp_eq.toml
    sed -e 's/^log_every = .*/log_every = 5/' scripts/gpu/pretrain_e2e.toml > .gpu/ddp_e2e.toml
    du -sh .gpu
    echo "built .gpu/; carry .gpu to the GPU host and run: bash scripts/gpu/ddp_gpu.sh run"
    ;;
  run)
    TL=/opt/torch/.venv/lib/python3.12/site-packages
    export LD_LIBRARY_PATH=$TL/torch/lib:$TL/nvidia/cu13/lib:$TL/nvidia/cudnn/lib:$TL/nvidia/nccl/lib:${LD_LIBRARY_PATH:-}
    PY=${GEOSSL_PYTHON:-/opt/torch/.venv/bin/python3}
    N=${2:-$(nvidia-smi -L 2>/dev/null | wc -l)}
    # DDP_DEVICE=cpu STEPS_EQ=3 STEPS_E2E=4 E2E_CONFIG=.gpu/ddp_eq.toml rehearses the script on a CPU
    # machine (Gloo instead of NCCL).
    dev=${DDP_DEVICE:-cuda} se=${STEPS_EQ:-20} s2=${STEPS_E2E:-40} e2e=${E2E_CONFIG:-.gpu/ddp_e2e.toml}
    R=${OUT:-/tmp}
    W=/tmp/ddp_gpu
    rm -rf "$W" && mkdir -p "$W"
    bin=.gpu/geossl-train
    data=.gpu/chips/manifest.csv
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no GPU"; } \
      | tee "$R/ddp_gpu_env.txt"
    unset WORLD_SIZE RANK LOCAL_RANK MASTER_ADDR MASTER_PORT
    port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
    single() { # name config steps
      $bin pretrain --no-progress --config "$2" --data "$data" --out "$W/$1" --max-steps "$3" --device "$dev" >"$W/$1.log" 2>&1 \
        || { tail -n 30 "$W/$1.log"; return 1; }
    }
    c10d() { # name config steps : one rank through c10d on NCCL
      WORLD_SIZE=1 RANK=0 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$(port) \
        $bin pretrain --no-progress --config "$2" --data "$data" --out "$W/$1" --max-steps "$3" --device "$dev" >"$W/$1.log" 2>&1 \
        || { tail -n 30 "$W/$1.log"; return 1; }
    }
    ranks() { # name config steps n
      local cfg="$W/$1.toml"
      local b; b=$(sed -n 's/^batch_size = //p' "$2")
      sed -e "s/^batch_size = .*/batch_size = $((b / $4))/" "$2" > "$cfg"
      $bin pretrain --no-progress --config "$cfg" --data "$data" --out "$W/$1" --max-steps "$3" --device "$dev" \
        --nproc-per-node "$4" >"$W/$1.log" 2>&1 || { tail -n 30 "$W/$1.log"; return 1; }
    }
    export NCCL_DEBUG=${NCCL_DEBUG:-VERSION}   # NCCL's version line in the rank logs
    set -x
    single eq-single-a .gpu/ddp_eq.toml "$se"
    single eq-single-b .gpu/ddp_eq.toml "$se"
    c10d eq-nccl-1 .gpu/ddp_eq.toml "$se"
    single e2e-single "$e2e" "$s2"
    c10d e2e-nccl-1 "$e2e" "$s2"
    # The same with NCCL's wait() blocking the host (TORCH_NCCL_BLOCKING_WAIT=1: a lost rank is then an error
    # naming it, instead of NCCL's watchdog ending the process; and rank 0's time in collectives is measured):
    # what the blocking wait costs.
    TORCH_NCCL_BLOCKING_WAIT=1 c10d e2e-nccl-1-blocking "$e2e" "$s2"
    if [ "$N" -gt 1 ]; then ranks "e2e-nccl-$N" "$e2e" "$s2" "$N"; fi
    set +x
    grep -h "data-parallel\|cuda devices" "$W"/eq-nccl-1.log "$W"/e2e-nccl-1.log | head -n 4 || true
    "$PY" - "$W" "$N" "$(sed -n 's/^batch_size = //p' "$e2e")" <<'PY' | tee "$R/ddp_gpu.json"
import json, struct, sys
import numpy as np
w, n, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def metrics(name):
    return [json.loads(l) for l in open(f"{w}/{name}/metrics.jsonl")]
def weights(name):
    f = open(f"{w}/{name}/checkpoint/model.safetensors", "rb").read()
    k = struct.unpack("<Q", f[:8])[0]
    head = json.loads(f[8:8 + k])
    out = {}
    for t, v in head.items():
        if t == "__metadata__" or v["dtype"] != "F32":
            continue
        a, b = v["data_offsets"]
        out[t] = np.frombuffer(f[8 + k + a:8 + k + b], dtype=np.float32).astype(np.float64)
    return out
def compare(x, y):
    lx, ly = [m["loss"] for m in metrics(x)], [m["loss"] for m in metrics(y)]
    wx, wy = weights(x), weights(y)
    rel = max(np.abs(wx[t] - wy[t]).max() / max(np.abs(wx[t]).max(), 1e-30) for t in wx)
    return {"steps": len(lx), "max_abs_loss_diff": max(abs(a - b) for a, b in zip(lx, ly)),
            "bit_identical_losses": lx == ly, "max_rel_weight_diff": float(rel),
            "final_loss": [lx[-1], ly[-1]]}
def rate(name, per_rank_batch):
    m = metrics(name)
    # img_per_s in metrics.jsonl is cumulative from the first step: recover each log line's time, then the
    # steady rate between the second and the last line (the first interval holds cuDNN's warm-up).
    t = [l["step"] * per_rank_batch / l["img_per_s"] for l in m]
    a, b = (1, len(m) - 1) if len(m) >= 3 else (0, len(m) - 1)
    steady = (m[b]["step"] - m[a]["step"]) * per_rank_batch / (t[b] - t[a])
    world = m[-1].get("world_size", 1)
    comm = m[-1].get("comm_s", 0.0)
    return {"world_size": world, "global_batch": per_rank_batch * world, "steps": m[-1]["step"],
            "pairs_per_s_steady": round(steady * world, 1),
            "pairs_per_s_incl_warmup": round(m[-1]["img_per_s"] * world, 1),
            # null where the collectives are not timed (NCCL without a blocking wait returns before they ran)
            "comm_s_rank0": None if comm is None else round(comm, 3),
            "comm_share": None if comm is None else round(comm / t[-1], 4), "loss_last": m[-1]["loss"]}
out = {
    "equality_single_vs_single": compare("eq-single-a", "eq-single-b"),
    "equality_single_vs_nccl_1_rank": compare("eq-single-a", "eq-nccl-1"),
    "e2e_single": rate("e2e-single", batch),
    "e2e_nccl_1_rank": rate("e2e-nccl-1", batch),
    "e2e_nccl_1_rank_blocking_wait": rate("e2e-nccl-1-blocking", batch),
}
if n > 1:
    out[f"e2e_nccl_{n}_ranks"] = rate(f"e2e-nccl-{n}", batch // n)
print(json.dumps(out, indent=1))
PY
    cp "$W"/eq-nccl-1.log "$R/ddp_gpu_eq_nccl.log"; cp "$W"/e2e-nccl-1.log "$R/ddp_gpu_e2e_nccl.log"
    ;;
  *) echo "usage: $0 build | run [N]" >&2; exit 2 ;;
esac
