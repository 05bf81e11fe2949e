"""Does a better-built index reach recall@100 0.95 on the 1M synthetic catalog for less than
~1 ms per query? HNSW graphs (M, efConstruction, inner product or L2) and IVF fast-scan PQ with
exact re-ranking, each swept over its search knob.

    .venv/bin/python benchmarks/ann_graphs.py hnsw:ip:32:80 hnsw:l2:32:80 hnsw:ip:32:200 hnsw:ip:16:200 \\
        ivf:4096:32:n ivf:4096:32:r ivf:4096:64:n  > benchmarks/results/ann-graphs.txt

Specs: ``hnsw:METRIC:M:EFC`` (metric ip or l2; the vectors are unit-norm, so L2 order is inner
product order), ``ivf:NLIST:PQ_M:n|r`` (4-bit fast-scan codes of the vectors, or of their
residuals ``r``; re-ranked exactly). Truth: exact top-100 of the first 1,000 users. Latency: one
query per call, one FAISS thread, median of 300 (HNSW) or 200 (IVF) calls. Builds use 2 threads.
Prints one line per setting: spec, knob, recall@100, ms per query. Results of the run quoted in
docs/benchmarks.md ("Serving acceptance, measured"): benchmarks/results/ann-graphs.txt.
"""
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ann import single_query_ms  # noqa: E402
from synthetic_catalog import catalog  # noqa: E402

from twotower.index import recall_at  # noqa: E402
from twotower.index.index import exact_top_k  # noqa: E402


def hnsw(items, metric: str, M: int, efc: int):
    index = faiss.IndexHNSWFlat(64, M) if metric == "l2" else faiss.IndexHNSWFlat(64, M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = efc
    index.add(items)
    return index, [(f"efSearch {ef}", faiss.SearchParametersHNSW(efSearch=ef)) for ef in (100, 128, 160, 192, 256, 320)], 300


def ivf(items, nlist: int, m: int, residual: bool):
    base = faiss.IndexIVFPQFastScan(faiss.IndexFlatIP(64), 64, nlist, m, 4, faiss.METRIC_INNER_PRODUCT)
    base.by_residual = residual
    index = faiss.IndexRefineFlat(base)
    rng = np.random.default_rng(0)
    index.train(items[np.sort(rng.choice(len(items), 64 * nlist, replace=False))])
    index.add(items)
    knobs = [(f"nprobe {n} refine {kf}", faiss.IndexRefineSearchParameters(
        k_factor=float(kf), base_index_params=faiss.SearchParametersIVF(nprobe=n)))
        for n in (64, 128, 256, 384) for kf in (4, 8)]
    return index, knobs, 200


def main(specs: list[str]) -> None:
    items, users, _ = catalog(1_000_000)
    q = np.ascontiguousarray(users[:1000])
    _, gt = exact_top_k(q, items, 100)
    for spec in specs:
        kind, *a = spec.split(":")
        faiss.omp_set_num_threads(2)
        t = time.perf_counter()
        index, knobs, calls = (hnsw(items, a[0], int(a[1]), int(a[2])) if kind == "hnsw"
                               else ivf(items, int(a[0]), int(a[1]), a[2] == "r"))
        print(f"{spec} build {time.perf_counter() - t:.0f} s", flush=True)
        for name, params in knobs:
            def search(x, k, params=params):
                return index.search(x, k, params=params)

            ms = single_query_ms(search, q[:calls], 100)["ms_p50"]  # one FAISS thread
            print(f"{spec} {name} recall@100 {recall_at(search(q, 100)[1], gt, 100):.4f} ms {ms:.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["hnsw:ip:32:80"])
