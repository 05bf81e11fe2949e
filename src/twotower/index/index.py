"""FAISS index over the augmented item vectors: kinds, parameters, ``auto``, build, search, save,
load, and the recall/latency measurement against exact search.

The index stores the items' augmented vectors (``model.scoring.augment_items``), so that an inner
product with an augmented query is the served score, ``alpha`` included. Kinds, all with the
inner-product metric:

- ``flat``: exact search (``IndexFlatIP``);
- ``hnsw``: a neighbour graph (``IndexHNSWFlat``), ``M`` links per node, ``ef_search`` candidates;
- ``ivf``: ``nlist`` k-means lists, ``nprobe`` of them scanned per query (``IndexIVFFlat``);
- ``ivfpq``: IVF with product-quantised codes, the best ``refine * k`` re-ranked exactly
  (``IndexRefineFlat`` over ``IndexIVFPQ``; with ``fast_scan``, 4-bit codes scanned through SIMD
  lookup tables, ``IndexIVFPQFastScan``, several times faster per scanned code).

Why inner product directly and not the reduction of maximum inner product to nearest neighbours
(Bachrach et al. 2014): the layout (``model.scoring.ScoreLayout.fit``) keeps the appended popularity
coordinate within +-0.25, so item norms stay within a few percent of 1 and graphs and lists built
on inner products are sound; and under the reduction a query with a large ``alpha`` is normalised
onto its popularity axis, after which list and graph navigation lose the user's direction
(measured on the 200k-item synthetic catalog of ``benchmarks/``, ``alpha = 1``, ``nprobe = 16``,
popularity coordinate within +-0.1: IVF recall@100 0.07 with the reduction, 0.71 without). Exact, IVF-Flat and HNSW-Flat return exact inner
products; IVF-PQ's are exact after refinement.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from .. import artifacts
from ..errors import ArtifactError, ConfigError
from ..model.scoring import ScoreLayout

KINDS = ("auto", "flat", "ivf", "hnsw", "ivfpq")
INDEX_FILE = "index.faiss"
META_FILE = "index.json"
EF_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def auto_kind(n_items: int) -> str:
    """The index kind for a catalog of ``n_items``, after FAISS's guidelines ("Guidelines to choose
    an index"): below ~50k vectors exact search costs well under a millisecond and needs no
    training, so ``flat``; up to a few million, when memory is not the constraint, ``hnsw`` (the
    fastest at high recall); beyond, ``ivf`` (memory and build time grow gently with ``n``)."""
    if n_items < 50_000:
        return "flat"
    if n_items <= 5_000_000:
        return "hnsw"
    return "ivf"


def default_nlist(n_items: int) -> int:
    """FAISS's rule of thumb, ``4 sqrt(n)`` to ``16 sqrt(n)`` lists (the low end: fewer lists, higher
    recall per probe), capped so that k-means has at least 39 training points per list."""
    return int(max(1, min(4 * math.sqrt(n_items), n_items // 39)))


# The most each index knob may be: beyond any useful setting, below what FAISS would try to allocate
# or refuse with an assertion (pq_bits above 16, HNSW graphs of thousands of links per node).
PARAM_MAX = {"nlist": 1 << 24, "nprobe": 1 << 24, "M": 1024, "ef_construction": 1 << 16, "ef_search": 1 << 16,
             "pq_m": 4096, "pq_bits": 16, "refine": 1000, "train_size": 1 << 31}


@dataclass
class IndexParams:
    """Every kind's parameters. ``None`` means: default (``auto`` kind, ``nlist``) or tuned at build
    on real users to reach ``target_recall`` at k = 10 and 100 (``nprobe``, ``ef_search``)."""

    kind: str = "auto"
    nlist: int | None = None          # IVF: number of lists (default 4 sqrt(n))
    nprobe: int | None = None         # IVF: lists visited per query (default: tuned)
    M: int = 32                       # HNSW: neighbours per node
    ef_construction: int = 80         # HNSW: candidate list while building
    ef_search: int | None = None      # HNSW: candidate list while searching (default: tuned); at least k is used
    pq_m: int = 16                    # IVF-PQ: sub-quantizers (vectors are zero-padded to a multiple)
    pq_bits: int = 8                  # IVF-PQ: bits per sub-quantizer code
    refine: int = 4                   # IVF-PQ: candidates re-ranked exactly = refine * k
    fast_scan: bool = False           # IVF-PQ: 4-bit codes scanned with SIMD lookup tables (needs pq_bits = 4)
    target_recall: float = 0.95       # tuning target for recall@10 and recall@100 against exact
    train_size: int | None = None     # IVF: k-means sample (default 64 points per list)
    exact_subset_max: int = 100_000   # filters that leave at most this many items are searched exactly

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"index kind {self.kind!r}: choose one of {', '.join(KINDS)}")
        for name, hi in PARAM_MAX.items():
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 1 <= v <= hi):
                raise ConfigError(f"index parameter {name} must be a positive integer, at most {hi:,}; got {v!r}")
        if self.fast_scan and (self.kind not in ("ivfpq", "auto") or self.pq_bits != 4):
            raise ConfigError(f"fast_scan is an IVF-PQ option with 4-bit codes: use kind 'ivfpq' and pq_bits 4 "
                              f"(got kind {self.kind!r}, pq_bits {self.pq_bits})")
        if not 0.0 < self.target_recall <= 1.0:
            raise ConfigError(f"target_recall must be in (0, 1], got {self.target_recall}")

    def resolved(self, n_items: int) -> "IndexParams":
        """``auto`` replaced by a concrete kind and ``nlist`` filled in (search knobs stay ``None``
        until tuned)."""
        kind = auto_kind(n_items) if self.kind == "auto" else self.kind
        nlist = self.nlist
        if kind in ("ivf", "ivfpq"):
            nlist = min(nlist or default_nlist(n_items), max(n_items, 1))
        p = replace(self, kind=kind, nlist=nlist)
        if kind in ("ivf", "ivfpq"):  # what k-means can train on this catalog (FAISS asserts otherwise)
            m = train_size(p, n_items)
            if m < nlist:
                raise ConfigError(f"{kind}: k-means would train {nlist:,} lists on {m:,} items; raise --train-size "
                                  f"(at least --nlist) or lower --nlist")
            if kind == "ivfpq" and m < 2 ** p.pq_bits:
                raise ConfigError(f"ivfpq with {p.pq_bits}-bit codes trains {2 ** p.pq_bits:,} centroids per "
                                  f"sub-quantizer and needs at least that many items to train on ({m:,} here): "
                                  "lower --pq-bits, or use --kind flat or hnsw for a catalog this small")
        return p

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "IndexParams":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def new_faiss_index(p: IndexParams, d: int):
    """An empty FAISS index of the resolved parameters ``p`` (no ``auto``) over ``d``-dimensional
    vectors, inner-product metric. Its ``d`` is the dimension vectors must be zero-padded to before
    ``train``/``add``/``search`` (IVF-PQ: a multiple of the sub-quantizers; no change to products)."""
    import faiss

    ip = faiss.METRIC_INNER_PRODUCT
    if p.kind == "flat":
        return faiss.IndexFlatIP(d)
    if p.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, p.M, ip)
        index.hnsw.efConstruction = p.ef_construction
        return index
    if p.kind == "ivf":
        return faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, p.nlist, ip)
    if p.kind == "ivfpq":
        dp = -(-d // p.pq_m) * p.pq_m
        cls = faiss.IndexIVFPQFastScan if p.fast_scan else faiss.IndexIVFPQ
        return faiss.IndexRefineFlat(cls(faiss.IndexFlatIP(dp), dp, p.nlist, p.pq_m, p.pq_bits, ip))
    raise ConfigError(f"index kind {p.kind!r} is not resolved; call IndexParams.resolved(n_items) first")


def train_size(p: IndexParams, n_items: int) -> int:
    """How many vectors the IVF kinds' k-means trains on: ``train_size``, else 64 per list (at
    least 10,000), at most the catalog."""
    return int(min(n_items, p.train_size or max(64 * (p.nlist or 1), 10_000)))


def with_search_defaults(p: IndexParams) -> IndexParams:
    """``p`` with the search knobs left ``None`` given their untuned defaults."""
    return replace(p, nprobe=p.nprobe or (min(16, p.nlist) if p.nlist else None),
                   ef_search=p.ef_search or (128 if p.kind == "hnsw" else None))


def vectors_digest(vectors: np.ndarray, rows: int = 1 << 16) -> str:
    """sha256 of the float32 C-order bytes of ``vectors``, hashed ``rows`` rows at a time (the same
    digest as hashing ``tobytes()``, without a copy of the whole array: ``vectors`` may be a memory map)."""
    h = hashlib.sha256()
    for s in range(0, len(vectors), rows):
        h.update(np.ascontiguousarray(vectors[s : s + rows], dtype=np.float32).tobytes())
    return h.hexdigest()


def zero_pad(x: np.ndarray, d: int) -> np.ndarray:
    """``x`` with zero columns appended up to width ``d`` (IVF-PQ codes need a width that is a
    multiple of ``pq_m``; zeros change no inner product)."""
    return x if x.shape[1] == d else np.ascontiguousarray(np.hstack([x, np.zeros((len(x), d - x.shape[1]), np.float32)]))


def recall_at(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean over queries of ``|approx top-k ∩ exact top-k| / k`` (ids ``-1`` never match)."""
    if len(exact) == 0:
        return float("nan")
    a, e = approx[:, :k], exact[:, :k]
    rows = np.arange(len(a), dtype=np.int64)[:, None]
    span = int(max(a.max(initial=0), e.max(initial=0))) + 2
    hits = np.isin(rows * span + a, (rows * span + e)[e >= 0]) & (a >= 0)
    return float(hits.sum(1).mean() / e.shape[1])


def exact_top_k(q: np.ndarray, x: np.ndarray, k: int, max_block_bytes: int = 1 << 28) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-``k`` inner products of queries ``q`` against all of ``x``, in blocks of
    queries (one matrix product and one top-k each; scores of a block stay under ``max_block_bytes``)."""
    import torch

    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
    step = max(1, max_block_bytes // (4 * max(len(x), 1)))
    vals, ids = [], []
    with torch.no_grad():
        for s in range(0, len(q), step):
            top = torch.topk(qt[s : s + step] @ xt.T, k, dim=1)
            vals.append(top.values.numpy())
            ids.append(top.indices.numpy())
    if not vals:
        return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
    return np.concatenate(vals).astype(np.float32), np.concatenate(ids).astype(np.int64)


class ItemIndex:
    """A FAISS index over augmented item vectors (ids are vocabulary indices), the vectors
    themselves (for exact scores and exact filtered search), the score layout that forms queries,
    and what was measured at build."""

    def __init__(self, index, params: IndexParams, layout: ScoreLayout, vectors: np.ndarray, info: dict | None = None):
        self.faiss_index = index
        self.params = params
        self.layout = layout
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.info = dict(info or {})

    # ---- build ---------------------------------------------------------------------------------
    @classmethod
    def build(cls, vectors: np.ndarray, params: IndexParams, layout: ScoreLayout, seed: int = 0) -> "ItemIndex":
        """Build the index of ``params.kind`` (``auto`` resolved by catalog size) over the augmented
        ``vectors``. Search knobs left ``None`` get defaults here (``tune`` sets them from recall)."""
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        n, d = x.shape
        p = params.resolved(n)
        t0 = time.perf_counter()
        index = new_faiss_index(p, d)
        if p.kind in ("ivf", "ivfpq"):
            rng = np.random.default_rng(seed)
            m = train_size(p, n)
            index.train(zero_pad(x[np.sort(rng.choice(n, m, replace=False))] if m < n else x, index.d))
        index.add(zero_pad(x, index.d))
        p = with_search_defaults(p)
        out = cls(index, p, layout, x)
        out.info["build_seconds"] = time.perf_counter() - t0
        return out

    # ---- properties ----------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.params.kind

    @property
    def n_items(self) -> int:
        return len(self.vectors)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    # ---- search --------------------------------------------------------------------------------
    def _search_params(self, k: int, selector=None):
        import faiss

        p = self.params
        if p.kind == "flat":
            return faiss.SearchParameters(sel=selector) if selector is not None else None
        if p.kind == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=max(p.ef_search or 128, k), sel=selector)
        ivf = faiss.SearchParametersIVF(nprobe=p.nprobe or 16, sel=selector) if selector is not None else \
            faiss.SearchParametersIVF(nprobe=p.nprobe or 16)
        if p.kind == "ivf":
            return ivf
        return faiss.IndexRefineSearchParameters(k_factor=float(p.refine), base_index_params=ivf)

    def search(self, queries: np.ndarray, k: int, subset: np.ndarray | None = None, selector=None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items by inner product with the augmented ``queries``: ``(inner [B, k] float32,
        ids [B, k] int64)``, best first; missing places are ``(-inf, -1)``. With ``subset`` (sorted
        item indices) only those items are candidates: searched exactly when the subset is small
        (``exact_subset_max``) or the index is exact, else through the index with ``selector`` (a
        FAISS ``IDSelector`` over the subset; built here when not given)."""
        import faiss

        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = int(min(k, self.n_items if subset is None else len(subset)))
        if len(q) == 0 or k <= 0:
            return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
        if subset is not None and (self.kind == "flat" or len(subset) <= self.params.exact_subset_max):
            return self.exact_search(q, k, subset)
        if subset is not None and selector is None:
            selector = faiss.IDSelectorBatch(np.asarray(subset, dtype=np.int64))
        params = self._search_params(k, selector)
        if self.kind == "flat" and selector is None and len(q) >= 20:  # a batch: one matrix product beats FAISS's BLAS path here
            return exact_top_k(q, self.vectors, k)
        inner, ids = self.faiss_index.search(zero_pad(q, self.faiss_index.d), k, params=params)
        return np.where(ids >= 0, inner, -np.inf).astype(np.float32), ids

    def exact_search(self, queries: np.ndarray, k: int, subset: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force top-``k`` by inner product over all items or over ``subset``."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        cand = self.vectors if subset is None else self.vectors[subset]
        k = int(min(k, len(cand)))
        if k <= 0:
            return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
        if subset is None:
            return exact_top_k(q, cand, k)
        s = q @ cand.T
        part = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < s.shape[1] else np.tile(np.arange(s.shape[1]), (len(q), 1))
        top = np.take_along_axis(s, part, 1)
        order = np.argsort(-top, axis=1, kind="stable")
        local = np.take_along_axis(part, order, 1)
        return np.take_along_axis(top, order, 1).astype(np.float32), np.asarray(subset, np.int64)[local]

    # ---- measurement ---------------------------------------------------------------------------
    def measure(self, queries: np.ndarray, ks=(10, 100), latency_queries: int = 200, single_thread: bool = True) -> dict:
        """Recall@k of this index against exact search on the same ``queries`` (augmented user
        vectors), and per-query latency of this index and of exact search: single queries one at a
        time (one FAISS thread when ``single_thread``), and the whole set as one batch."""
        import faiss

        ks = [k for k in ks if k <= self.n_items] or [self.n_items]
        kmax = max(ks)
        _, exact = self.exact_search(queries, kmax)
        _, approx = self.search(queries, kmax)
        out = {f"recall@{k}": recall_at(approx, exact, k) for k in ks}
        lat = queries[:latency_queries]
        threads = faiss.omp_get_max_threads()
        if single_thread:
            faiss.omp_set_num_threads(1)
        try:
            for name, fn in (("ann", lambda x: self.search(x, kmax)), ("exact", lambda x: self.exact_search(x, kmax))):
                times = []
                fn(lat[:1])
                for i in range(len(lat)):
                    t = time.perf_counter()
                    fn(lat[i : i + 1])
                    times.append(time.perf_counter() - t)
                t = np.asarray(times) * 1e3
                out[f"{name}_ms_p50"] = float(np.percentile(t, 50)) if len(t) else float("nan")
                out[f"{name}_ms_p99"] = float(np.percentile(t, 99)) if len(t) else float("nan")
        finally:
            faiss.omp_set_num_threads(threads)
        t = time.perf_counter()
        self.search(queries, kmax)
        out["ann_batch_ms_per_query"] = (time.perf_counter() - t) * 1e3 / max(len(queries), 1)
        out["k"] = kmax
        out["queries"] = int(len(queries))
        out["latency_queries"] = int(len(lat))
        return out

    def recall(self, queries: np.ndarray, ks=(10, 100)) -> dict:
        """Recall@k of this index against exact search on ``queries``."""
        ks = [k for k in ks if k <= self.n_items] or [self.n_items]
        _, exact = self.exact_search(queries, max(ks))
        _, approx = self.search(queries, max(ks))
        return {f"recall@{k}": recall_at(approx, exact, k) for k in ks}

    def tune(self, queries: np.ndarray, ks=(10, 100)) -> dict:
        """Set the smallest ``ef_search`` (HNSW) or ``nprobe`` (IVF kinds) whose recall@k against
        exact reaches ``params.target_recall`` for every ``k`` in ``ks`` on ``queries``; returns
        the chosen value and the recall at each tried value."""
        if self.kind == "flat":
            return {}
        ks = [k for k in ks if k <= self.n_items] or [self.n_items]
        _, exact = self.exact_search(queries, max(ks))
        name = "ef_search" if self.kind == "hnsw" else "nprobe"
        grid = list(EF_GRID) if name == "ef_search" else sorted({min(2 ** i, self.params.nlist) for i in range(0, 17)})
        tried = {}
        for v in grid:
            self.params = replace(self.params, **{name: v})
            _, ids = self.search(queries, max(ks))
            r = {k: recall_at(ids, exact, k) for k in ks}
            tried[v] = r
            if min(r.values()) >= self.params.target_recall:
                break
        return {"param": name, "value": getattr(self.params, name),
                "tried": {str(v): {f"recall@{k}": x for k, x in r.items()} for v, r in tried.items()}}

    # ---- save / load ---------------------------------------------------------------------------
    def save(self, folder: str | Path, extra: dict | None = None) -> dict:
        """Write ``index.faiss`` and ``index.json`` (kind, parameters, layout, measured figures,
        the FAISS file's sha256) atomically into ``folder``; returns the metadata."""
        import faiss

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with artifacts.atomic_path(folder / INDEX_FILE) as tmp:
            faiss.write_index(self.faiss_index, str(tmp))
        meta = {
            "kind": self.kind, "params": self.params.to_dict(), "layout": self.layout.to_dict(),
            "n_items": self.n_items, "dim": self.dim,
            "vectors_sha256": vectors_digest(self.vectors),
            "index_sha256": artifacts.sha256_file(folder / INDEX_FILE),
            **self.info, **(extra or {}),
        }
        artifacts.write_json(folder / META_FILE, meta)
        self.info = {k: v for k, v in meta.items() if k not in ("kind", "params", "layout", "n_items", "dim")}
        return meta

    @staticmethod
    def read_meta(folder: str | Path) -> dict:
        return artifacts.read_json(Path(folder) / META_FILE)

    @classmethod
    def load(cls, folder: str | Path, vectors: np.ndarray) -> "ItemIndex":
        """Read an index written by ``save``; ``vectors`` are the augmented item vectors it was
        built from (checked against the recorded digest)."""
        import faiss

        folder = Path(folder)
        meta = cls.read_meta(folder)
        path = folder / INDEX_FILE
        if not path.is_file():
            raise ArtifactError(f"{path}: missing. Rebuild it with `twotower index RUN`")
        if artifacts.sha256_file(path) != meta.get("index_sha256"):
            raise ArtifactError(f"{path}: does not match the sha256 in {META_FILE} (corrupted or from another build). "
                                "Rebuild it with `twotower index RUN`")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors_digest(vectors) != meta.get("vectors_sha256"):
            raise ArtifactError(f"{folder}: the index was built from other item vectors than this run's "
                                "(weights, item counts or embeddings changed). Rebuild it with `twotower index RUN`")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:
            raise ArtifactError(f"{path}: cannot read ({str(e).splitlines()[0]}). Rebuild it with `twotower index RUN`") from None
        info = {k: v for k, v in meta.items() if k not in ("kind", "params", "layout", "n_items", "dim")}
        return cls(index, IndexParams.from_dict(meta["params"]), ScoreLayout(**meta["layout"]), vectors, info)
