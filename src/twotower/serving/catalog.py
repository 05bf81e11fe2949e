"""Look-ups over a served run for people and pages: item details (title, categories, popularity),
item and user search, a user's history and held-out items, the training curves.

Everything a request returns is bounded (``MAX_LIST`` records at most) and computed from arrays
already in memory, so it stays cheap on a catalog of millions of items. The search indexes are
built on first use, not at start-up, so ``twotower serve`` starts as fast as before.
"""
from __future__ import annotations

import math
import random
import threading
from typing import Any

import numpy as np
import torch

from ..errors import ArtifactError
from ..evaluation.metrics import bucket_names, popularity_buckets
from .query import RequestError, UnknownItemError, UnknownUserError

MAX_LIST = 1000   # records in one answer (a top-k list of MAX_K items can be looked up at once)
MAX_SEARCH = 100  # matches of one search
MAX_QUERY = 200   # characters of a search string


class TextIndex:
    """Case-insensitive substring search over one line of text per entity, answered in a fixed
    order of entities (most popular first), so the first ``limit`` matches are the best ones.

    The lines live in one string; ``str.find`` scans it in C from one match to the next, and the
    scan stops at the ``limit``-th match: a common query costs a few microseconds, a query that
    matches nothing one pass over the text (about 10 ms for a million titles).
    """

    def __init__(self, lines: list[str], order: np.ndarray):
        self.order = np.asarray(order, dtype=np.int64)
        # lower-cased before measuring (lower() may change a line's length: "İ"), and a newline
        # inside a line (a title can hold one) made a space, so that lines stay lines
        lines = [s.lower().replace("\n", " ") for s in lines]
        self.text = "\n".join(lines)
        lengths = np.fromiter((len(s) + 1 for s in lines), dtype=np.int64, count=len(lines))
        self.starts = np.zeros(len(lines) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.starts[1:])

    def find(self, query: str, limit: int) -> np.ndarray:
        """Entity indices whose line contains ``query`` (case-insensitive), at most ``limit``, in index order."""
        q = query.lower()
        found: list[int] = []
        pos, text, starts = 0, self.text, self.starts
        while len(found) < limit:
            pos = text.find(q, pos)
            if pos < 0:
                break
            line = int(np.searchsorted(starts, pos, side="right")) - 1
            found.append(line)
            pos = int(starts[line + 1])  # one match per line
        return self.order[np.asarray(found, dtype=np.int64)]


def _finite(x) -> float | None:
    """JSON has no NaN: a metric that could not be computed (an empty bucket) is ``null``."""
    x = float(x)
    return x if math.isfinite(x) else None


def _check_limit(limit, most: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or not 1 <= limit <= most:
        raise RequestError(f"limit must be an integer between 1 and {most}, got {limit!r}")
    return int(limit)


def _check_query(q: str) -> str:
    q = " ".join(str(q).split())  # the lines hold no newline or tab: a query with one would never match
    if len(q) > MAX_QUERY:
        raise RequestError(f"q is {len(q)} characters long; send at most {MAX_QUERY} (a few letters of a title or an id)")
    return q


class Catalog:
    """Read-only look-ups over the ``Run`` behind a ``Recommender``."""

    def __init__(self, recommender):
        self.recommender = recommender
        self.run = recommender.run
        self._lock = threading.Lock()  # for the per-item arrays
        self._text_lock = threading.Lock()  # for the search texts (a second or so to build on 1M items)
        self._items_text: TextIndex | None = None
        self._users_text: TextIndex | None = None
        self._user_order: np.ndarray | None = None
        self._bucket: np.ndarray | None = None
        self._features: dict[str, Any] | None = None
        self._item_rank: np.ndarray | None = None

    # ---- items -------------------------------------------------------------------------------------
    def _lazy_items(self) -> None:
        if self._bucket is not None:
            return
        with self._lock:
            if self._bucket is not None:
                return
            counts = self.run.item_counts
            cuts = list(self.run.config.eval.popularity_buckets)
            self._bucket_names = bucket_names(len(cuts) + 1)
            bucket = popularity_buckets(torch.from_numpy(np.asarray(counts, dtype=np.int64)), cuts).numpy()
            order = np.argsort(-counts, kind="stable")
            rank = np.empty(len(order), dtype=np.int64)
            rank[order] = np.arange(1, len(order) + 1)
            self._item_rank, self._pop_order = rank, order
            # the item tower's categorical features (those with a vocabulary)
            tower = self.run.model.item_tower.features
            self._features = {name: tower[name] for name in self.run.item_feature_values()}
            self._bucket = bucket  # last: a non-None bucket array says every array above is ready

    def items_at(self, idx: np.ndarray) -> list[dict]:
        """Records of the items at vocabulary positions ``idx``: ``item`` (raw id), ``title``,
        ``categories`` ({feature: [values]}), ``count`` (training interactions), ``rank`` (1 = most
        popular) and ``bucket`` (head / torso / tail, the cuts of the run's evaluation)."""
        self._lazy_items()
        idx = np.asarray(idx, dtype=np.int64)
        ids = self.run.items.decode(idx).tolist()
        titles = self.run.titles[idx].tolist() if self.run.titles is not None else [None] * len(idx)
        counts = self.run.item_counts[idx].tolist()
        ranks = self._item_rank[idx].tolist()
        buckets = [self._bucket_names[b] for b in self._bucket[idx].tolist()]
        cats: dict[str, list[list[str]]] = {name: feature.values_of(idx) for name, feature in self._features.items()}
        return [{"item": ids[i], "title": titles[i], "categories": {n: c[i] for n, c in cats.items()},
                 "count": int(counts[i]), "rank": int(ranks[i]), "bucket": buckets[i]} for i in range(len(idx))]

    def item(self, item) -> dict:
        idx = int(self.run.items.encode(self.run.items.coerce([item]))[0])
        if idx < 0:
            raise UnknownItemError(f"item {item!r} is not known to this model ({len(self.run.items):,} items); "
                                   "search for one with GET /items?q=TEXT")
        return self.items_at(np.array([idx]))[0]

    def lookup_items(self, ids: list) -> dict:
        """Records of the given raw item ids in their order; unknown ids are reported, not refused."""
        if len(ids) > MAX_LIST:
            raise RequestError(f"{len(ids):,} ids; send at most {MAX_LIST} per request")
        raw = self.run.items.coerce(list(ids))
        idx = self.run.items.encode(raw)
        ok = idx >= 0
        return {"items": self.items_at(idx[ok]), "unknown_items": [ids[i] for i in np.flatnonzero(~ok).tolist()]}

    def search_items(self, q: str = "", limit: int = 20) -> list[dict]:
        """Items whose id or title contains ``q`` (case-insensitive), most popular first; an exact
        id first of all. An empty ``q``: the most popular items."""
        limit = _check_limit(limit, MAX_SEARCH)
        q = _check_query(q)
        self._lazy_items()
        if not q:
            return self.items_at(self._pop_order[:limit])
        if self._items_text is None:
            with self._text_lock:
                if self._items_text is None:
                    order = self._pop_order
                    ids = self.run.items.ids[order].tolist()
                    if self.run.titles is not None:
                        titles = self.run.titles[order].tolist()
                        lines = [f"{i}\t{t}" if t is not None else str(i) for i, t in zip(ids, titles)]
                    else:
                        lines = [str(i) for i in ids]
                    self._items_text = TextIndex(lines, order)
        exact = self.run.items.encode(self.run.items.coerce([q]))
        found = self._items_text.find(q, limit)
        if exact[0] >= 0:
            found = np.r_[exact[:1], found[found != exact[0]]][:limit]
        return self.items_at(found)

    # ---- users -------------------------------------------------------------------------------------
    def _user_index(self, user) -> int:
        u = int(self.run.users.encode(self.run.users.coerce([user]))[0])
        if u < 0:
            raise UnknownUserError(f"user {user!r} is not known to this model ({len(self.run.users):,} users); "
                                   "search with GET /users?q=TEXT, or pick one with GET /users?random=true")
        return u

    def _summaries(self, idx: np.ndarray) -> list[dict]:
        lens = self.run.known.lengths()[idx].tolist()
        return [{"user": u, "interactions": int(n)} for u, n in zip(self.run.users.decode(idx).tolist(), lens)]

    def search_users(self, q: str = "", limit: int = 20, random_pick: bool = False, seed: int | None = None) -> list[dict]:
        """Users whose id contains ``q``, most active first (an exact id first of all); or, with
        ``random_pick``, ``limit`` users drawn at random among those with a history."""
        limit = _check_limit(limit, MAX_SEARCH)
        q = _check_query(q)
        lens = self.run.known.lengths()
        if random_pick:
            if q:
                raise RequestError("send either q (search) or random=true, not both")
            active = np.flatnonzero(lens > 0)
            if len(active) == 0:
                return []
            rng = random.Random(seed)
            return self._summaries(active[np.asarray(rng.sample(range(len(active)), min(limit, len(active))), dtype=np.int64)])
        if self._user_order is None:
            self._user_order = np.argsort(-lens, kind="stable")  # most active first (a benign race: same result)
        if not q:
            return self._summaries(self._user_order[:limit])
        if self._users_text is None:
            with self._text_lock:
                if self._users_text is None:
                    order = self._user_order
                    self._users_text = TextIndex([str(u) for u in self.run.users.ids[order].tolist()], order)
        exact = self.run.users.encode(self.run.users.coerce([q]))
        found = self._users_text.find(q, limit)
        if exact[0] >= 0:
            found = np.r_[exact[:1], found[found != exact[0]]][:limit]
        return self._summaries(found)

    def user(self, user, limit: int = 50) -> dict:
        """A known user: history newest first (up to ``limit`` records, each with ``split``: train or
        valid), and the raw ids of the validation and test items the user went on to interact with
        (up to ``MAX_LIST`` each; ``null`` when the run directory predates ``heldout.safetensors``)."""
        limit = _check_limit(limit, MAX_LIST)
        u = self._user_index(user)
        row = self.run.known.row(u)
        newest = row[::-1][:limit]
        held = self.run.heldout()
        valid = test = None
        split = ["train"] * len(newest)
        if held is not None:
            valid, test = held[0].row(u), held[1].row(u)
            split = np.where(np.isin(newest, valid), "valid", "train").tolist()
        history = self.items_at(newest)
        for rec, s in zip(history, split):
            rec["split"] = s
        return {
            "user": self.run.users.decode([u]).tolist()[0],
            "interactions": int(len(row)),
            "timestamps": bool(self._has_timestamps()),
            "history": history,
            "valid": None if valid is None else self.run.items.decode(valid[:MAX_LIST]).tolist(),
            "test": None if test is None else self.run.items.decode(test[:MAX_LIST]).tolist(),
            "valid_total": None if valid is None else int(len(valid)),
            "test_total": None if test is None else int(len(test)),
        }

    def _has_timestamps(self) -> bool:
        if not hasattr(self, "_timestamps"):
            try:
                from .. import artifacts

                self._timestamps = bool(artifacts.read_json(self.run.path / "dataset.json").get("timestamps", False))
            except ArtifactError:
                self._timestamps = False
        return self._timestamps

    # ---- the run's training curves -----------------------------------------------------------------
    def curves(self) -> dict:
        """Loss and validation metrics per epoch (``metrics.jsonl``) and the final recall per
        popularity bucket on validation and test (``metrics.json``)."""
        cfg = self.run.config
        epochs = []
        for r in self.run.epoch_records():
            valid = {k[len("valid/"):]: _finite(v) for k, v in r.items()
                     if k.startswith("valid/") and isinstance(v, (int, float)) and "/" not in k[len("valid/"):]}
            epochs.append({"epoch": int(r.get("epoch", len(epochs) + 1)), "loss": _finite(r.get("loss", float("nan"))),
                           "seconds": _finite(r.get("seconds", float("nan"))), "valid": valid})
        try:
            final = self.run.metrics()
        except ArtifactError:
            final = {}
        names = bucket_names(len(cfg.eval.popularity_buckets) + 1)
        buckets: dict[str, dict[str, Any]] = {}
        for split in ("valid", "test"):
            m = final.get(split) or {}
            for k in cfg.eval.ks:
                per = {b: _finite(m[f"recall@{k}/{b}"]) for b in names if f"recall@{k}/{b}" in m}
                if per:
                    buckets.setdefault(split, {})[f"recall@{k}"] = {"all": _finite(m.get(f"recall@{k}", float("nan"))), **per}
        return {"monitor": cfg.train.monitor, "best_epoch": final.get("best_epoch"), "epochs": epochs,
                "buckets": buckets, "bucket_names": names,
                "bucket_cuts": [float(c) for c in cfg.eval.popularity_buckets]}
