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

Updates without a rebuild (``ItemIndex.update``): items added, their vectors replaced, or removed.
Flat and IVF delete for real (``IndexIDMap2`` over the flat index, the IVF lists' own ids:
``remove_ids`` / ``add_with_ids``). HNSW graphs and IVF-PQ with exact re-ranking cannot delete:
their FAISS positions map to item ids (``labels``, ``-1`` for a removed or superseded entry), a
bitmap of live positions filters every search (a FAISS ``IDSelector``), and the index is rebuilt
from the live vectors when dead entries pass ``rebuild_share`` of it.
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
LABELS_FILE = "labels.npy"       # after an update of an HNSW / IVF-PQ index: item id per FAISS position, -1 dead
PRESENT_FILE = "present.npy"     # after any update: which item ids a search may return
MAX_UPDATE_RECORDS = 100         # updates remembered in index.json
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
    rebuild_share: float = 0.2        # HNSW / IVF-PQ updates: rebuild when removed or replaced entries pass this share

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"index kind {self.kind!r}: choose one of {', '.join(KINDS)}")
        for name in ("nlist", "nprobe", "M", "ef_construction", "ef_search", "pq_m", "pq_bits", "refine", "train_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, np.integer)) or v < 1):
                raise ConfigError(f"index parameter {name} must be a positive integer, got {v!r}")
        if self.fast_scan and (self.kind not in ("ivfpq", "auto") or self.pq_bits != 4):
            raise ConfigError(f"fast_scan is an IVF-PQ option with 4-bit codes: use kind 'ivfpq' and pq_bits 4 "
                              f"(got kind {self.kind!r}, pq_bits {self.pq_bits})")
        if not 0.0 < self.target_recall <= 1.0:
            raise ConfigError(f"target_recall must be in (0, 1], got {self.target_recall}")
        if isinstance(self.rebuild_share, bool) or not isinstance(self.rebuild_share, (int, float)) \
                or not 0.0 < self.rebuild_share <= 1.0:
            raise ConfigError(f"rebuild_share must be in (0, 1] (the share of dead entries in an HNSW or IVF-PQ index "
                              f"that triggers a rebuild; 1 never rebuilds), got {self.rebuild_share!r}")

    def resolved(self, n_items: int) -> "IndexParams":
        """``auto`` replaced by a concrete kind and ``nlist`` filled in (search knobs stay ``None``
        until tuned)."""
        kind = auto_kind(n_items) if self.kind == "auto" else self.kind
        nlist = self.nlist
        if kind in ("ivf", "ivfpq"):
            nlist = min(nlist or default_nlist(n_items), max(n_items, 1))
        return replace(self, kind=kind, nlist=nlist)

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


def exact_top_k(q: np.ndarray, x: np.ndarray, k: int, max_block_bytes: int = 1 << 28,
                exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-``k`` inner products of queries ``q`` against all of ``x``, in blocks of
    queries (one matrix product and one top-k each; scores of a block stay under ``max_block_bytes``).
    Rows of ``x`` where the boolean ``exclude`` is true are never returned (``k`` must not exceed
    the rows left)."""
    import torch

    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
    drop = None if exclude is None else torch.from_numpy(np.asarray(exclude, dtype=bool))
    step = max(1, max_block_bytes // (4 * max(len(x), 1)))
    vals, ids = [], []
    with torch.no_grad():
        for s in range(0, len(q), step):
            scores = qt[s : s + step] @ xt.T
            if drop is not None:
                scores.masked_fill_(drop, -math.inf)
            top = torch.topk(scores, k, dim=1)
            vals.append(top.values.numpy())
            ids.append(top.indices.numpy())
    if not vals:
        return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
    return np.concatenate(vals).astype(np.float32), np.concatenate(ids).astype(np.int64)


class ItemIndex:
    """A FAISS index over augmented item vectors (ids are vocabulary indices), the vectors
    themselves (row ``i`` is item ``i``: exact scores and exact filtered search), the score layout
    that forms queries, and what was measured at build.

    After an update (``update``), ``present`` marks the items a search may return (a removed item
    keeps its row, so that it can still be a query, but is never a result), and for the kinds that
    cannot delete (HNSW, IVF-PQ) ``labels`` gives the item id of every FAISS position (``-1``: an
    entry removed or superseded by a replacement). Both are ``None`` for an index as built."""

    def __init__(self, index, params: IndexParams, layout: ScoreLayout, vectors: np.ndarray, info: dict | None = None,
                 labels: np.ndarray | None = None, present: np.ndarray | None = None):
        self.faiss_index = index
        self.params = params
        self.layout = layout
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.info = dict(info or {})
        self.labels = None if labels is None else np.ascontiguousarray(labels, dtype=np.int64)
        self.present = None if present is None else np.ascontiguousarray(present, dtype=bool)
        self._refresh()

    def _refresh(self) -> None:
        """Derived state, recomputed after every change: the count of searchable items, the mask of
        the others, the dead FAISS entries; the live-entry selector and the item -> position map are
        rebuilt on first use."""
        self.size = len(self.vectors) if self.present is None else int(self.present.sum())
        self._absent = None if self.present is None or self.size == len(self.vectors) else ~self.present
        self.dead_entries = 0 if self.labels is None else int((self.labels < 0).sum())
        self._alive = None
        self._position = None

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
        """The size of the id space: one vector row per item id (``size`` counts the searchable ones)."""
        return len(self.vectors)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def contains(self, items) -> np.ndarray:
        """Which of ``items`` (item ids) a search may return, as a boolean array."""
        items = np.asarray(items, dtype=np.int64)
        ok = (items >= 0) & (items < len(self.vectors))
        if self.present is not None:
            ok[ok] = self.present[items[ok]]
        return ok

    def _positions(self) -> np.ndarray:
        """Item id -> live FAISS position (``-1`` when none), for an index with ``labels``."""
        if self._position is None:
            pos = np.full(len(self.vectors), -1, dtype=np.int64)
            live = np.flatnonzero(self.labels >= 0)
            pos[self.labels[live]] = live
            self._position = pos
        return self._position

    def _alive_selector(self):
        """A FAISS selector of the live positions (a bitmap), or ``None`` when no entry is dead."""
        if not self.dead_entries:
            return None
        if self._alive is None:
            import faiss

            bits = np.packbits(self.labels >= 0, bitorder="little")
            # the selector reads ``bits`` in place: both are kept together
            self._alive = (faiss.IDSelectorBitmap(len(self.labels), faiss.swig_ptr(bits)), bits)
        return self._alive[0]

    def selector(self, subset: np.ndarray):
        """A FAISS ``IDSelector`` limiting a search of this index to the items ``subset`` (those of
        them present), in the index's own id space (FAISS positions for an updated HNSW / IVF-PQ)."""
        import faiss

        subset = np.asarray(subset, dtype=np.int64)
        if self.present is not None:
            subset = subset[self.contains(subset)]
        ids = subset if self.labels is None else self._positions()[subset]
        return faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))

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
        (``exact_subset_max``) or the index is exact, else through the index with ``selector``
        (``selector(subset)``; built here when not given). Removed items are never returned."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if subset is not None and self.present is not None:
            subset = np.asarray(subset, dtype=np.int64)
            subset = subset[self.contains(subset)]
        k = int(min(k, self.size if subset is None else len(subset)))
        if len(q) == 0 or k <= 0:
            return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
        if subset is not None and (self.kind == "flat" or len(subset) <= self.params.exact_subset_max):
            return self.exact_search(q, k, subset)
        if subset is not None and selector is None:
            selector = self.selector(subset)
        if subset is None:
            selector = self._alive_selector()
        params = self._search_params(k, selector)
        if self.kind == "flat" and selector is None and len(q) >= 20:  # a batch: one matrix product beats FAISS's BLAS path here
            return exact_top_k(q, self.vectors, k, exclude=self._absent)
        inner, ids = self.faiss_index.search(zero_pad(q, self.faiss_index.d), k, params=params)
        if self.labels is not None:  # FAISS positions -> item ids
            ids = np.where(ids >= 0, self.labels[np.maximum(ids, 0)], -1)
        return np.where(ids >= 0, inner, -np.inf).astype(np.float32), ids

    def exact_search(self, queries: np.ndarray, k: int, subset: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force top-``k`` by inner product over all present items or over ``subset``."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if subset is None:
            k = int(min(k, self.size))
            if k <= 0:
                return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
            return exact_top_k(q, self.vectors, k, exclude=self._absent)
        if self.present is not None:
            subset = np.asarray(subset, dtype=np.int64)
            subset = subset[self.contains(subset)]
        cand = self.vectors[subset]
        k = int(min(k, len(cand)))
        if k <= 0:
            return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
        s = q @ cand.T
        part = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < s.shape[1] else np.tile(np.arange(s.shape[1]), (len(q), 1))
        top = np.take_along_axis(s, part, 1)
        order = np.argsort(-top, axis=1, kind="stable")
        local = np.take_along_axis(part, order, 1)
        return np.take_along_axis(top, order, 1).astype(np.float32), np.asarray(subset, np.int64)[local]

    # ---- updates -------------------------------------------------------------------------------
    def _checked_ids(self, what: str, ids) -> np.ndarray:
        a = np.asarray([] if ids is None else ids)
        if a.size and (a.dtype.kind not in "iu" or a.ndim != 1):
            raise ConfigError(f"{what}: item ids must be a 1-d array of integer vocabulary indices, got "
                              f"{a.dtype} of shape {a.shape}")
        a = a.astype(np.int64).reshape(-1)
        if a.size and a.min() < 0:
            raise ConfigError(f"{what}: item ids must be vocabulary indices (>= 0), got {int(a.min())}")
        return a

    def _checked_pairs(self, what: str, pair) -> tuple[np.ndarray, np.ndarray]:
        if pair is None:
            return np.empty(0, np.int64), np.empty((0, self.dim), np.float32)
        ids, vecs = pair
        ids = self._checked_ids(what, ids)
        vecs = np.asarray(vecs, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape != (len(ids), self.dim):
            raise ConfigError(f"{what}: {len(ids)} item ids need vectors of shape ({len(ids)}, {self.dim}) laid out as the "
                              f"index's (ScoreLayout.items), got shape {vecs.shape}")
        if not np.isfinite(vecs).all():
            raise ConfigError(f"{what}: the vectors hold NaN or infinite values")
        return ids, vecs

    def update(self, add: tuple[np.ndarray, np.ndarray] | None = None, replace: tuple[np.ndarray, np.ndarray] | None = None,
               remove: np.ndarray | None = None, seed: int = 0) -> dict:
        """Change the items without a rebuild: ``add`` and ``replace`` are ``(item ids, augmented
        vectors)`` (new items; items whose vectors changed), ``remove`` item ids. Ids are vocabulary
        indices; an added id may lie beyond the current rows (they grow; rows in between stay
        absent). Flat and IVF remove entries for real; HNSW and IVF-PQ mark them dead (searches
        skip them) and are rebuilt from the present vectors when dead entries pass
        ``params.rebuild_share`` of the FAISS index. The search knobs stay as tuned. Returns what
        was done, with the seconds it took."""
        import faiss

        t0 = time.perf_counter()
        add_ids, add_vecs = self._checked_pairs("add", add)
        rep_ids, rep_vecs = self._checked_pairs("replace", replace)
        rem_ids = self._checked_ids("remove", remove)
        every = np.concatenate([add_ids, rep_ids, rem_ids])
        uniq, counts = np.unique(every, return_counts=True)
        if (counts > 1).any():
            raise ConfigError(f"item {int(uniq[counts > 1][0])} is named twice in one update (add, replace and remove "
                              "take distinct items)")
        if self.contains(add_ids).any():
            raise ConfigError(f"add: item {int(add_ids[self.contains(add_ids)][0])} is already in the index; "
                              "replace its vector instead")
        for what, ids in (("replace", rep_ids), ("remove", rem_ids)):
            if not self.contains(ids).all():
                raise ConfigError(f"{what}: item {int(ids[~self.contains(ids)][0])} is not in the index")
        n_rows = max(len(self.vectors), int(every.max()) + 1 if len(every) else 0)
        # new arrays, never written in place: the vectors may be shared with the caller or memory-mapped
        vectors = np.zeros((n_rows, self.dim), np.float32)
        vectors[: len(self.vectors)] = self.vectors
        present = np.zeros(n_rows, bool)
        present[: len(self.vectors)] = True if self.present is None else self.present
        vectors[add_ids], vectors[rep_ids] = add_vecs, rep_vecs
        present[add_ids], present[rem_ids] = True, False
        new_ids, new_vecs = np.concatenate([add_ids, rep_ids]), np.concatenate([add_vecs, rep_vecs])
        gone = np.concatenate([rep_ids, rem_ids])
        rebuilt = False
        if self.kind == "flat":
            if not isinstance(self.faiss_index, faiss.IndexIDMap2):  # as built: positions are ids; now ids of their own
                live = np.flatnonzero(present)
                index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
                index.add_with_ids(np.ascontiguousarray(vectors[live]), live)
                self.faiss_index = index
            else:
                if len(gone):
                    self.faiss_index.remove_ids(faiss.IDSelectorBatch(gone))
                if len(new_ids):
                    self.faiss_index.add_with_ids(new_vecs, new_ids)
        elif self.kind == "ivf":  # the lists hold item ids (an index built by `add` numbered its rows 0..n-1)
            if len(gone):
                self.faiss_index.remove_ids(faiss.IDSelectorBatch(gone))
            if len(new_ids):
                self.faiss_index.add_with_ids(zero_pad(new_vecs, self.faiss_index.d), new_ids)
        else:
            labels = np.arange(self.faiss_index.ntotal, dtype=np.int64) if self.labels is None else self.labels.copy()
            if len(gone):
                labels[(self._positions() if self.labels is not None else np.arange(len(self.vectors)))[gone]] = -1
            if len(new_ids):
                self.faiss_index.add(zero_pad(new_vecs, self.faiss_index.d))
                labels = np.concatenate([labels, new_ids])
            self.labels = labels
        self.vectors, self.present = vectors, present
        self._refresh()
        if self.labels is not None and self.dead_entries > self.params.rebuild_share * len(self.labels):
            self._rebuild(seed)
            rebuilt = True
        out = {"added": int(len(add_ids)), "replaced": int(len(rep_ids)), "removed": int(len(rem_ids)), "rebuilt": rebuilt,
               "items": self.size, "dead_entries": self.dead_entries, "seconds": time.perf_counter() - t0}
        history = self.info.get("updates", [])[-(MAX_UPDATE_RECORDS - 1):]
        self.info["updates"] = history + [{**out, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
        return out

    def _rebuild(self, seed: int = 0) -> None:
        """A fresh FAISS index of the same parameters over the present vectors (dead entries gone)."""
        live = np.flatnonzero(self.contains(np.arange(len(self.vectors))))
        fresh = ItemIndex.build(self.vectors[live], self.params, self.layout, seed=seed)
        self.faiss_index = fresh.faiss_index
        self.labels = live
        self._refresh()

    # ---- measurement ---------------------------------------------------------------------------
    def measure(self, queries: np.ndarray, ks=(10, 100), latency_queries: int = 200, single_thread: bool = True) -> dict:
        """Recall@k of this index against exact search on the same ``queries`` (augmented user
        vectors), and per-query latency of this index and of exact search: single queries one at a
        time (one FAISS thread when ``single_thread``), and the whole set as one batch."""
        import faiss

        ks = [k for k in ks if k <= self.size] or [self.size]
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
        ks = [k for k in ks if k <= self.size] or [self.size]
        _, exact = self.exact_search(queries, max(ks))
        _, approx = self.search(queries, max(ks))
        return {f"recall@{k}": recall_at(approx, exact, k) for k in ks}

    def tune(self, queries: np.ndarray, ks=(10, 100)) -> dict:
        """Set the smallest ``ef_search`` (HNSW) or ``nprobe`` (IVF kinds) whose recall@k against
        exact reaches ``params.target_recall`` for every ``k`` in ``ks`` on ``queries``; returns
        the chosen value and the recall at each tried value."""
        if self.kind == "flat":
            return {}
        ks = [k for k in ks if k <= self.size] or [self.size]
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
        the FAISS file's sha256) atomically into ``folder``, with ``labels.npy`` / ``present.npy``
        after an update; returns the metadata."""
        import faiss

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with artifacts.atomic_path(folder / INDEX_FILE) as tmp:
            faiss.write_index(self.faiss_index, str(tmp))
        files = {}
        for name, array in ((LABELS_FILE, self.labels), (PRESENT_FILE, self.present)):
            if array is None:
                (folder / name).unlink(missing_ok=True)
            else:
                artifacts.save_numpy(folder / name, array)
                files[name] = artifacts.sha256_file(folder / name)
        meta = {
            **{k: v for k, v in self.info.items() if k != "update_files"},
            "kind": self.kind, "params": self.params.to_dict(), "layout": self.layout.to_dict(),
            "n_items": self.n_items, "dim": self.dim, "items_present": self.size, "dead_entries": self.dead_entries,
            "vectors_sha256": vectors_digest(self.vectors),
            "index_sha256": artifacts.sha256_file(folder / INDEX_FILE),
            "update_files": files,
            **(extra or {}),
        }
        artifacts.write_json(folder / META_FILE, meta)
        self.info = {k: v for k, v in meta.items() if k not in META_OWN}
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
        rebuild = "Rebuild it with `twotower index RUN`"
        if not path.is_file():
            raise ArtifactError(f"{path}: missing. {rebuild}")
        if artifacts.sha256_file(path) != meta.get("index_sha256"):
            raise ArtifactError(f"{path}: does not match the sha256 in {META_FILE} (corrupted or from another build). {rebuild}")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors_digest(vectors) != meta.get("vectors_sha256"):
            raise ArtifactError(f"{folder}: the index was built from other item vectors than this run's "
                                f"(weights, item counts or embeddings changed). {rebuild}")
        arrays = {}
        for name, digest in (meta.get("update_files") or {}).items():
            p = folder / name
            if name not in (LABELS_FILE, PRESENT_FILE) or not p.is_file() or artifacts.sha256_file(p) != digest:
                raise ArtifactError(f"{p}: missing or not the file {META_FILE} lists (corrupted, or left by another update). "
                                    f"{rebuild}")
            arrays[name] = artifacts.load_numpy(p, rebuild.lower())
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:
            raise ArtifactError(f"{path}: cannot read ({str(e).splitlines()[0]}). {rebuild}") from None
        info = {k: v for k, v in meta.items() if k not in META_OWN}
        out = cls(index, IndexParams.from_dict(meta["params"]), ScoreLayout(**meta["layout"]), vectors, info,
                  arrays.get(LABELS_FILE), arrays.get(PRESENT_FILE))
        entries = len(out.labels) if out.labels is not None else out.size
        if index.ntotal != entries or out.present is not None and len(out.present) != len(vectors) or \
                out.labels is not None and len(out.labels) - out.dead_entries != out.size:
            raise ArtifactError(f"{folder}: {index.ntotal:,} entries in {INDEX_FILE} where {entries:,} were expected "
                                f"(files of different updates). {rebuild}")
        return out


META_OWN = ("kind", "params", "layout", "n_items", "dim")  # index.json keys that are ItemIndex's fields, not its info
