#!/usr/bin/env bash
# Similarity-search benchmark (docs/benchmarks/search.md): geossl's index (its own HNSW) against FAISS (faiss-cpu:
# exact and HNSW) on the same real-pixel embeddings, machine and queries; see scripts/bench/search_bench.py.
#   bash scripts/bench/search_bench.sh            (after scripts/setup.sh; SIZES=100000,300000,1000000 by default)
# GEOSSL_BENCH_SERVER_CPUS=0 GEOSSL_BENCH_CLIENT_CPUS=1 (taskset lists) serve with the load generator on CPUs of
# its own (serve/benches/search.rs). Writes docs/benchmarks/search.json; scripts/bench/search_interleaved.py
# rechecks one size back to back. Work files in SEARCH_BENCH_DIR (default /tmp/search-bench; the pool of
# embeddings is kept between runs).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
W=${SEARCH_BENCH_DIR:-/tmp/search-bench}
SIZES=${SIZES:-100000,300000,1000000}
# The peers, pinned (not in the project venv: only this benchmark uses them).
.venv/bin/pip install -q faiss-cpu==1.15.1
cargo build --release --locked -p geossl-serve --bin geossl-serve
cargo build --locked --workspace --bins
bench=$(cargo bench --locked -p geossl-serve --bench search --no-run 2>&1 | grep -o 'target/release/deps/search-[0-9a-f]*' | tail -1)
# The bench binary finds geossl-serve beside its deps/ directory (target/release).
.venv/bin/python scripts/bench/search_bench.py --work "$W" --sizes "$SIZES" --serve target/release/geossl-serve \
  --train target/debug/geossl-train --export target/debug/geossl-export --bench "$bench" ${STRIDE:+--stride $STRIDE} \
  > docs/benchmarks/search.json
echo "wrote docs/benchmarks/search.json"
