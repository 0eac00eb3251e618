"""Back-to-back check of search_bench.py's comparison, against this machine's drift (docs/benchmarks/search.md).

search_bench.py measures every size's FAISS side first and geossl's tens of minutes later; this machine's speed
drifts by up to ~40% between such moments. This script takes one size's kept files (base.parquet, queries.npy,
truth.npy and geossl's built indexes, from a search_bench.py run) and measures FAISS HNSW, geossl (each index
given, in process), FAISS again and geossl again, minutes apart, at every ef: the rounds show the drift, and
the ratios are taken within each round. Prints one JSON object.

    python search_interleaved.py --dir WORK/s3/n100000 --bench BIN --index index --index index-f16 [--rounds 2]
"""

import argparse
import json
import os
import subprocess
import sys
import time

import faiss
import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from search_bench import EFS, closed, unit  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--bench", required=True)
    ap.add_argument("--index", action="append", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0)
    a = ap.parse_args()
    cores = os.cpu_count()
    col = pq.read_table(os.path.join(a.dir, "base.parquet"), columns=["embedding"]).column("embedding").combine_chunks()
    x = unit(col.flatten().to_numpy().reshape(len(col), -1))
    q = np.load(os.path.join(a.dir, "queries.npy"))
    truth = np.load(os.path.join(a.dir, "truth.npy"))
    faiss.omp_set_num_threads(cores)
    h = faiss.IndexHNSWFlat(x.shape[1], 16, faiss.METRIC_INNER_PRODUCT)
    h.hnsw.efConstruction = 128
    h.add(x)
    faiss.omp_set_num_threads(1)
    one = lambda i: h.search(q[i:i + 1], 10)
    rounds = []
    for r in range(a.rounds):
        rnd = {"faiss_hnsw": [], "at": time.strftime("%H:%M:%S")}
        for ef in EFS:
            h.hnsw.efSearch = ef
            _, got = h.search(q, 10)
            rec = float(np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, truth)]))
            rnd["faiss_hnsw"].append({"ef": ef, "recall_at_10": rec, "qps_1": closed(1, a.seconds, one, len(q)),
                                      "qps_8": closed(8, a.seconds, one, len(q))})
        for name in a.index:
            env = dict(os.environ, GEOSSL_BENCH_INDEX=os.path.join(a.dir, name),
                       GEOSSL_BENCH_QUERIES=os.path.join(a.dir, "queries.npy"),
                       GEOSSL_BENCH_TRUTH=os.path.join(a.dir, "truth.npy"), GEOSSL_BENCH_EF=",".join(map(str, EFS)),
                       GEOSSL_BENCH_SECONDS=str(a.seconds), GEOSSL_BENCH_HTTP="0")
            g = json.loads(subprocess.run([a.bench, "--bench"], env=env, check=True, capture_output=True,
                                          text=True).stdout)
            rnd[name] = g["in_process"]
        for ef_i, ef in enumerate(EFS):
            f = rnd["faiss_hnsw"][ef_i]
            line = f"round {r} ef {ef}: faiss {f['recall_at_10']:.4f} {f['qps_1']:.0f}/{f['qps_8']:.0f}"
            for name in a.index:
                g = rnd[name][ef_i]
                line += f"; {name} {g['recall_at_10']:.4f} {g['qps_1']:.0f}/{g['qps_8']:.0f}" \
                        f" ({g['qps_1'] / f['qps_1']:.2f}x/{g['qps_8'] / f['qps_8']:.2f}x)"
            print(line, file=sys.stderr)
        rounds.append(rnd)
    print(json.dumps({"dir": a.dir, "rows": len(x), "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
