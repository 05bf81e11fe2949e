"""FAISS inner-product index over item embeddings, exact for the served score.

Served score (DESIGN.md, "Serving-time popularity correction"):

    score(u, j) = <f(u), g(j)> / tau + b_j - alpha * log p(j)

fits an inner-product index exactly by appending two dimensions: items carry ``[g(j), b_j,
-log p(j)]`` and queries ``[f(u) / tau, 1, alpha]`` (``augment_items``, ``augment_queries``), so a
per-request ``alpha`` changes the ranking through the index itself, not by re-ranking a short list.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError

KINDS = ("auto", "flat", "ivf", "hnsw", "ivfpq")


def extra_scale(log_p: np.ndarray, bias: np.ndarray | None = None) -> float:
    """Scale ``s`` for the two appended dimensions: items carry ``s * b_j`` and ``-s * log p(j)``,
    queries ``1 / s`` and ``alpha / s``, which leaves every inner product unchanged but keeps the
    appended values as small as the unit-norm item vectors, so that graph and cluster indexes
    still organise items by direction rather than by popularity."""
    m = float(np.abs(log_p).max()) if len(log_p) else 1.0
    if bias is not None and len(bias):
        m = max(m, float(np.abs(bias).max()))
    return 1.0 / max(m, 1.0)


def augment_items(vecs: np.ndarray, log_p: np.ndarray, bias: np.ndarray | None = None, scale: float = 1.0) -> np.ndarray:
    """``[g(j), s * b_j, -s * log p(j)]`` per item (``b_j = 0`` without a learned bias), float32."""
    n = len(vecs)
    b = np.zeros(n, dtype=np.float32) if bias is None else np.asarray(bias, dtype=np.float32).reshape(n)
    lp = np.asarray(log_p, np.float32)
    return np.ascontiguousarray(np.hstack([vecs.astype(np.float32), scale * b[:, None], -scale * lp[:, None]]).astype(np.float32))


def augment_queries(vecs: np.ndarray, tau: float, alpha: float | np.ndarray = 0.0, scale: float = 1.0) -> np.ndarray:
    """``[f(u) / tau, 1 / s, alpha / s]`` per query; ``alpha`` may differ per query."""
    n = len(vecs)
    a = np.broadcast_to(np.asarray(alpha, dtype=np.float32), (n,))
    return np.ascontiguousarray(np.hstack([vecs.astype(np.float32) / tau, np.full((n, 1), 1.0 / scale, np.float32),
                                           (a / scale)[:, None]]).astype(np.float32))


def smoothed_log_p(counts: np.ndarray) -> np.ndarray:
    """``log p(j)`` with add-one smoothing, so items never seen in training stay finite."""
    c = np.asarray(counts, dtype=np.float64) + 1.0
    return np.log(c / c.sum())


@dataclass
class IndexParams:
    kind: str = "auto"
    nlist: int | None = None          # IVF lists (default 4 * sqrt(n))
    nprobe: int = 16
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    pq_m: int = 16                    # IVF-PQ sub-quantizers (the dimension must divide by it)
    refine_k_factor: int = 4          # IVF-PQ: re-rank k * factor candidates exactly

    def resolved(self, n: int) -> "IndexParams":
        p = IndexParams(**asdict(self))
        if p.kind not in KINDS:
            raise ConfigError(f"index kind {p.kind!r}: choose one of {', '.join(KINDS)}")
        if p.kind == "auto":
            p.kind = auto_kind(n)
        if p.nlist is None:
            p.nlist = max(1, min(n // 39, int(4 * math.sqrt(n))))  # FAISS wants >= 39 training points per list
        return p


def auto_kind(n: int) -> str:
    """FAISS's guidelines, simplified: exact search is fast enough below ~50k vectors; HNSW is the
    fastest accurate choice while memory allows (up to a few million); IVF beyond."""
    if n < 50_000:
        return "flat"
    if n <= 5_000_000:
        return "hnsw"
    return "ivf"


def build_index(vectors: np.ndarray, params: IndexParams, seed: int = 0):
    """An inner-product FAISS index of ``vectors`` (already augmented)."""
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    p = params.resolved(n)
    ip = faiss.METRIC_INNER_PRODUCT
    if p.kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif p.kind == "hnsw":
        index = MipsHNSW(x, p)
        set_search_params(index.hnsw_index, p)
        return index, p
    elif p.kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, p.nlist, ip)
    else:
        if d % p.pq_m:
            raise ConfigError(f"ivfpq: the indexed dimension {d} is not divisible by pq_m={p.pq_m}")
        base = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, p.nlist, p.pq_m, 8, ip)
        index = faiss.IndexRefineFlat(base)
        index.k_factor = p.refine_k_factor
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = x[rng.choice(n, min(n, 256 * p.nlist), replace=False)]
        index.train(sample)
    index.add(x)
    set_search_params(index, p)
    return index, p


def set_search_params(index, p: IndexParams) -> None:
    import faiss

    space = faiss.ParameterSpace()  # reaches through wrappers such as IndexRefineFlat
    if "IVF" in type(faiss.downcast_index(index.base_index if isinstance(index, faiss.IndexRefineFlat) else index)).__name__:
        space.set_index_parameter(index, "nprobe", p.nprobe)
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = p.ef_search


class MipsHNSW:
    """HNSW for maximum inner product, through the reduction to nearest neighbours of
    Bachrach et al. (RecSys 2014): ``x' = [x, sqrt(R^2 - |x|^2)]``, ``q' = [q, 0]`` with ``R`` the
    largest item norm, so ``|q' - x'|^2 = |q|^2 + R^2 - 2 <q, x>``. An HNSW graph built directly on
    inner products degrades when norms vary, as they do once the popularity dimension is appended."""

    def __init__(self, x: np.ndarray, p: IndexParams):
        import faiss

        norms2 = (x.astype(np.float64) ** 2).sum(1)
        self.r2 = float(norms2.max())
        extra = np.sqrt(np.maximum(self.r2 - norms2, 0.0)).astype(np.float32)[:, None]
        self.hnsw_index = faiss.IndexHNSWFlat(x.shape[1] + 1, p.hnsw_m)
        self.hnsw_index.hnsw.efConstruction = p.ef_construction
        self.hnsw_index.add(np.ascontiguousarray(np.hstack([x, extra])))
        self.d = x.shape[1]
        self.ntotal = self.hnsw_index.ntotal

    def search(self, q: np.ndarray, k: int):
        q = np.ascontiguousarray(q, dtype=np.float32)
        dist, ids = self.hnsw_index.search(np.hstack([q, np.zeros((len(q), 1), np.float32)]), k)
        scores = ((q.astype(np.float64) ** 2).sum(1)[:, None] + self.r2 - dist) / 2
        return scores.astype(np.float32), ids


def recall_against_exact(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over queries of ``|ANN top-k ∩ exact top-k| / k``."""
    k = exact_ids.shape[1]
    hits = [(len(np.intersect1d(a, e)) / k) for a, e in zip(approx_ids, exact_ids)]  # per query; k small
    return float(np.mean(hits)) if hits else float("nan")


def measure(index, items: np.ndarray, queries: np.ndarray, ks=(10, 100)) -> dict[str, float]:
    """ANN recall@k against exact search over the same augmented vectors, and per-query latency."""
    import faiss

    exact = faiss.IndexFlatIP(items.shape[1])
    exact.add(items)
    kmax = min(max(ks), len(items))
    _, e = exact.search(queries, kmax)
    t = time.perf_counter()
    for q in queries:  # single-query latency, as a service sees it
        index.search(q[None, :], kmax)
    per_query = (time.perf_counter() - t) / max(len(queries), 1)
    _, a = index.search(queries, kmax)
    out = {f"recall@{k}": recall_against_exact(a[:, :k], e[:, :k]) for k in ks if k <= kmax}
    out["ms_per_query"] = per_query * 1e3
    return out


def save_index(index, path: Path) -> None:
    import faiss

    from ..artifacts import atomic_path

    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def load_index(path: Path):
    import faiss

    from ..errors import ArtifactError

    if not Path(path).is_file():
        raise ArtifactError(f"{path}: no index. Build it with `twotower index RUN`")
    return faiss.read_index(str(path))
