#!/usr/bin/env bash
# int8 with a float32 re-rank (docs/benchmarks/search.md, "int8 with a float32 re-rank"): for each size, three
# indexes of the same vectors — f32, i8 with its float32 copy (`--rerank`, i8's default) and i8 without
# (`--rerank false`) — measured in process by serve/benches/search.rs (recall@10 against FAISS's exact answers,
# QPS at 1 and 8 threads) at each ef, the re-ranked one at each number of candidates per answer, in ROUNDS
# alternating rounds (this machine's speed drifts). Uses the files search_bench.sh keeps for each size
# (base.parquet, queries.npy, truth.npy in $SEARCH_BENCH_DIR/s$STRIDE/nN): run that first.
#   SIZES=100000,300000 EFS=64,128,256 RERANKS="2 4 8" bash scripts/bench/search_rerank.sh
# VARIANTS (default "f32 i8graph i8") picks the indexes. Writes OUT (default docs/benchmarks/search-rerank.json).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
W=${SEARCH_BENCH_DIR:-/tmp/search-bench}/s${STRIDE:-3}
cargo build --release --locked -p geossl-serve --bin geossl-serve
bench=$ROOT/$(cargo bench --locked -p geossl-serve --bench search --no-run 2>&1 | grep -o 'target/release/deps/search-[0-9a-f]*' | tail -1)
serve=$ROOT/target/release/geossl-serve
lines=$(mktemp)
run() { # size label index rerank
  local d=$W/n$1
  GEOSSL_BENCH_INDEX=$d/$3 GEOSSL_BENCH_QUERIES=$d/queries.npy GEOSSL_BENCH_TRUTH=$d/truth.npy \
    GEOSSL_BENCH_EF=${EFS:-64,128,256} GEOSSL_BENCH_SECONDS=${SECONDS_EACH:-3} GEOSSL_BENCH_HTTP=0 \
    GEOSSL_BENCH_RERANK=$4 "$bench" --bench 2>/dev/null |
    python3 -c "import json, sys; r = json.load(sys.stdin); print(json.dumps({'n': $1, 'variant': '$2', 'round': $round, **r}))" >> "$lines"
}
sizes=${SIZES:-100000,300000,1000000}
for n in ${sizes//,/ }; do
  for v in ${VARIANTS:-f32 i8graph i8}; do
    idx=$W/n$n/idx-$v
    rm -rf "$idx"
    case $v in f32) a=(--quantization f32) ;; i8graph) a=(--quantization i8 --rerank false) ;; i8) a=(--quantization i8) ;; esac
    t0=$(date +%s.%N)
    "$serve" index build --dataset "$W/n$n/base.parquet" --out "$idx" "${a[@]}" --log warn > /dev/null
    t1=$(date +%s.%N)
    copy=$(stat -c %s "$idx/vectors.f32" 2>/dev/null || echo 0)
    echo "{\"n\": $n, \"variant\": \"$v\", \"build_s\": $(python3 -c "print($t1 - $t0)"), \"graph_bytes\": $(stat -c %s "$idx/vectors.hnsw"), \"copy_bytes\": $copy}" >> "$lines"
  done
  for round in $(seq 1 "${ROUNDS:-2}"); do
    for v in ${VARIANTS:-f32 i8graph i8}; do
      if [ "$v" = i8 ]; then
        for r in ${RERANKS:-2 4 8}; do run "$n" i8 idx-i8 "$r"; done
      else
        run "$n" "$v" "idx-$v" 4
      fi
    done
  done
done
python3 -c "import json, sys; print(json.dumps([json.loads(l) for l in open(sys.argv[1])], indent=1))" "$lines" \
  > "${OUT:-docs/benchmarks/search-rerank.json}"
echo "wrote ${OUT:-docs/benchmarks/search-rerank.json}"
