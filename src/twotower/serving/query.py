"""The one query code path: raw ids in, the user tower online, one index search per batch, seen
items and categories filtered, raw ids and served scores out. ``twotower recommend`` and the HTTP
service both call ``Recommender``.

Served score (docs/design.md, "The served score"; ``model.scoring``), the scale of
every face (this service, ``twotower recommend``, ``Run.recommend``)::

    score(u, j) = <f(u), g(j)> / tau + b_j - alpha * log p(j)

computed exactly through the index's appended dimensions, so a per-request ``alpha`` changes which
items are retrieved, not only their order in a short list. Every user, known or new, goes through
the user tower's own forward (``TwoTowerModel.user_inputs`` / ``user_vectors``), with the request's
context when the model reads one (a context feature left out takes its default: docs/features.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import FeatureInputError, TwotowerError
from ..index.index import ItemIndex
from ..index.run_index import exact_run_index, load_run_index

MAX_K = 1000
MAX_HISTORY = 10_000


class RequestError(TwotowerError):
    """A request the caller can fix (HTTP 422): the message says what to change."""

    status = 422


class UnknownUserError(RequestError):
    """The user id is not in the model's vocabulary (HTTP 404)."""

    status = 404


class UnknownItemError(RequestError):
    """The item id is not in the model's vocabulary (HTTP 404)."""

    status = 404


@dataclass
class Query:
    """One recommendation request. Either ``user`` (a known raw user id), or a new user: ``history``
    (raw item ids, oldest first; unknown ones are ignored and reported), user ``features``
    (``{name: value}``: a label or a list of labels, a number, a text, a vector, as each feature's
    kind takes), or both. ``context``: the request's context features (``{name: value}``; one left
    out takes its default). ``category``: only items with this value of the item feature
    ``category_feature`` (default: the recommender's)."""

    user: Any = None
    history: Sequence | None = None
    features: dict[str, Any] | None = None
    k: int = 10
    alpha: float = 0.0
    exclude_seen: bool = True
    category: str | None = None
    context: dict[str, Any] | None = None
    category_feature: str | None = None


@dataclass
class Recommendation:
    """Top items (raw ids, best first) with served scores, and what the service did with the request."""

    items: np.ndarray
    scores: np.ndarray
    user: Any = None
    k: int = 10
    alpha: float = 0.0
    exclude_seen: bool = True
    category: str | None = None
    unknown_items: list = field(default_factory=list)
    unknown_features: dict = field(default_factory=dict)
    fallback: str | None = None
    fallback_reason: str | None = None
    category_feature: str | None = None


class Recommender:
    """Recommendations from a run and its item index; the code path of the CLI and the service.

    ``recommend_many`` answers a batch with one user-tower pass per kind of user (known, new) and
    one index search per category in the batch.

    A new user goes through the one user tower with whatever it brings: history, features, or both
    (so features always change the result). Only a request with nothing the model can use (no
    known history item and no feature value the encoders place) gets the popularity list, flagged
    ``fallback = "popularity"`` with the reason."""

    def __init__(self, run, index: ItemIndex, category_feature: str | None = None, max_k: int = MAX_K):
        self.run = run
        self.index = index
        self.max_k = int(max_k)
        self.model = run.model
        self.dim = int(run.config.model.dim)
        self.history_length = int(run.config.model.history_length)
        self.log_p = run.log_popularity
        order = np.argsort(-run.item_counts, kind="stable")
        self._pop_order = order[index.contains(order)]  # items retired from the index are not recommended
        feats = run.item_feature_values()
        if category_feature is not None and category_feature not in feats:
            raise RequestError(f"category feature {category_feature!r} is not a categorical item feature of this model "
                               f"(with a vocabulary); known: {sorted(feats) or 'none'}")
        # The filter is chosen by the feature's name; without one, only a model with a single
        # categorical item feature has an obvious one.
        self.category_feature = category_feature or (next(iter(feats)) if len(feats) == 1 else None)
        self.category_values = [str(v) for v in feats.get(self.category_feature, [])] if self.category_feature else []
        self._feature_values = {name: [str(v) for v in values] for name, values in feats.items()}
        self._categories: dict[tuple[str, str], tuple[np.ndarray, Any]] = {}
        user_feats = self.model.user_tower.features
        self.user_feature_names = list(user_feats.names) if user_feats is not None else []
        context = self.model.user_tower.context
        self.context_names = list(context.names) if context is not None else []
        self._item_vecs_t: torch.Tensor | None = None  # g(j) as a tensor, for folding in new users of an ids-only tower
        # Retired users (update.retire_after) lost their id rows: a tower that also reads features or
        # the history still answers for them from those; one of ids alone has nothing left to say.
        ut = self.model.user_tower
        ids_only = ut.features is None and not ut.use_history
        self._unanswerable = run.activity.users_retired if ids_only and run.activity.users_retired.any() else None

    @classmethod
    def load(cls, run, index_dir: str | Path | None = None, category_feature: str | None = None,
             require_index: bool = False, max_k: int = MAX_K) -> "Recommender":
        """A recommender over ``run`` (a ``Run`` or its path) with its saved index (``RUN/index``
        or ``index_dir``); without one, exact search over the run's items unless ``require_index``."""
        from ..run import Run

        run = run if not isinstance(run, (str, Path)) else Run(run)
        index = load_run_index(run, index_dir, required=require_index or index_dir is not None)
        return cls(run, index if index is not None else exact_run_index(run), category_feature, max_k)

    # ---- requests --------------------------------------------------------------------------------
    def recommend(self, query: Query) -> Recommendation:
        """One request; a mistake in it raises ``RequestError`` (``UnknownUserError`` for an unknown user)."""
        out = self.recommend_many([query])[0]
        if isinstance(out, RequestError):
            raise out
        return out

    def recommend_many(self, queries: Sequence[Query]) -> list[Recommendation | RequestError]:
        """A batch of requests: per request a ``Recommendation`` or the ``RequestError`` that says
        what to fix (one bad request does not fail the others)."""
        n = len(queries)
        results: list[Any] = [None] * n
        plans = [self._plan(q) for q in queries]
        user_rows, new_rows = [], []
        for i, p in enumerate(plans):
            if isinstance(p, RequestError):
                results[i] = p
            elif p["kind"] == "user":
                user_rows.append(i)
            else:
                new_rows.append(i)
        if user_rows:  # known users: one vectorised vocabulary lookup
            raw = self.run.users.coerce([queries[i].user for i in user_rows])
            idx = self.run.users.encode(raw)
            for i, u in zip(user_rows, idx):
                if u < 0:
                    results[i] = UnknownUserError(
                        f"user {queries[i].user!r} is not known to this model ({len(self.run.users):,} users). "
                        "For a new user send {\"history\": [item ids, oldest first]} instead of \"user\"")
                elif self._unanswerable is not None and self._unanswerable[u]:
                    results[i] = UnknownUserError(
                        f"user {queries[i].user!r} was retired by an update (no interactions in "
                        f"{self.run.config.update.retire_after} update(s) in a row) and this model's user tower reads ids alone. "
                        "Send {\"history\": [its item ids, oldest first]} to be answered as a new user")
                else:
                    plans[i]["uidx"] = int(u)
            user_rows = [i for i in user_rows if results[i] is None]
        new_vecs = np.empty((0, self.dim), dtype=np.float32)
        if new_rows:  # new users: one user-tower pass (its feature encoders report what they cannot place)
            new_vecs = self._new_user_vectors([queries[i] for i in new_rows], [plans[i] for i in new_rows])
        usable = [self._usable(queries[i], plans[i]) for i in new_rows]
        hist_rows = [i for i, ok in zip(new_rows, usable) if ok]
        pop_rows = [i for i, ok in zip(new_rows, usable) if not ok]
        vec_rows = user_rows + hist_rows
        vecs = np.empty((len(vec_rows), self.dim), dtype=np.float32)
        if user_rows:
            vecs[: len(user_rows)] = self._known_user_vectors(np.array([plans[i]["uidx"] for i in user_rows], dtype=np.int64),
                                                              [queries[i].context for i in user_rows])
        vecs[len(user_rows):] = new_vecs[np.asarray(usable, dtype=bool)]
        if vec_rows:
            self._search(vec_rows, vecs, queries, plans, results)
        if pop_rows:
            self._popular(pop_rows, queries, plans, results)
        return results

    def recommend_frame(self, users, k: int = 10, exclude_seen: bool = True, alpha: float = 0.0, category: str | None = None,
                        chunk: int = 1024, context: dict | None = None, category_feature: str | None = None):
        """Offline candidates for many known users (``twotower recommend --all-users``): a DataFrame
        ``user, item, score, rank`` in raw ids, ``chunk`` users per index search; every user with
        ``context`` (``None``: the context features' defaults)."""
        import pandas as pd

        frames = []
        users = list(users)
        for s in range(0, len(users), chunk):
            block = users[s : s + chunk]
            res = self.recommend_many([Query(user=u, k=k, alpha=alpha, exclude_seen=exclude_seen, category=category,
                                             context=context, category_feature=category_feature) for u in block])
            bad = next((r for r in res if isinstance(r, RequestError)), None)
            if bad is not None:
                raise bad
            lens = np.array([len(r.items) for r in res], dtype=np.int64)
            if lens.sum() == 0:
                continue
            frames.append(pd.DataFrame({
                "user": np.repeat(np.asarray([r.user for r in res], dtype=object if not self.run.users.is_integer else np.int64), lens),
                "item": np.concatenate([r.items for r in res]),
                "score": np.concatenate([r.scores for r in res]),
                "rank": np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens) + 1,
            }))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["user", "item", "score", "rank"])

    def similar(self, item, k: int = 10, alpha: float = 0.0, category: str | None = None,
                category_feature: str | None = None) -> Recommendation:
        """Items nearest to ``item`` by ``<g(i), g(j)> / tau`` (plus the learned bias and
        ``- alpha log p(j)``, as for users), the item itself excluded."""
        self._check_k(k)
        self._check_alpha(alpha)
        cat = self._category_key(category, category_feature) if category is not None else None
        raw = self.run.items.coerce([item])
        idx = int(self.run.items.encode(raw)[0])
        if idx < 0:
            raise UnknownItemError(f"item {item!r} is not known to this model ({len(self.run.items):,} items); "
                                   "pass an item id from the training data")
        if idx >= self.index.n_items:
            raise UnknownItemError(f"item {item!r} is not in the index yet (added to the run after the index was built); "
                                   "add it with `twotower index RUN --update --add-new`")
        subset = self._category(cat)[0] if cat is not None else None
        q = self.index.layout.queries(self.index.vectors[idx : idx + 1, : self.dim], float(alpha))
        inner, ids = self.index.search(q, k + 1, subset=subset)
        keep = (ids[0] >= 0) & (ids[0] != idx)
        ids, inner = ids[0][keep][:k], inner[0][keep][:k]
        scores = self.index.layout.scores(inner[None, :], float(alpha))[0]
        return Recommendation(self.run.items.decode(ids), scores, None, k, float(alpha), True, category,
                              category_feature=None if cat is None else cat[0])

    # ---- the steps -------------------------------------------------------------------------------
    def _check_k(self, k) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.max_k:
            raise RequestError(f"k must be an integer between 1 and {self.max_k}, got {k!r}")

    @staticmethod
    def _check_alpha(alpha) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)) or not math.isfinite(alpha) \
                or abs(alpha) > 1e4:
            raise RequestError(f"alpha must be a finite number (|alpha| <= 10000; 0 means no popularity correction), got {alpha!r}")

    def _category_key(self, value, feature: str | None = None) -> tuple[str, str]:
        """``(feature, value)`` of a category filter, checked: the feature named in the request, else
        the recommender's (``category_feature``)."""
        if feature is not None and not isinstance(feature, str):
            raise RequestError(f"category_feature must be the name of an item feature, got {feature!r}")
        feature = feature or self.category_feature
        if feature is None:
            if not self._feature_values:
                raise RequestError("this model has no item categories (its item tower uses no categorical feature with a "
                                   "vocabulary); remove \"category\" from the request")
            raise RequestError(f"this model has several categorical item features ({sorted(self._feature_values)}): name the "
                               "one the category belongs to with \"category_feature\" (or serve --category-feature)")
        if feature not in self._feature_values:
            raise RequestError(f"category_feature {feature!r} is not a categorical item feature of this model; use one of "
                               f"{sorted(self._feature_values) or 'none'}")
        values = self._feature_values[feature]
        if str(value) not in values:
            shown = ", ".join(values[:30]) + (" ..." if len(values) > 30 else "")
            raise RequestError(f"category {value!r} is not a value of item feature {feature!r}; "
                               f"use one of: {shown} (GET /metadata lists them)")
        return feature, str(value)

    def _category(self, cat: tuple[str, str]) -> tuple[np.ndarray, Any]:
        """Sorted item indices of a checked ``(feature, value)`` (``_category_key``) and a FAISS
        selector over them (built once)."""
        key = cat
        if key not in self._categories:
            subset = self.run.item_category_items(*cat)
            sel = None
            if self.index.kind != "flat" and len(subset) > self.index.params.exact_subset_max:
                sel = self.index.selector(subset)
            self._categories[key] = (subset, sel)
        return self._categories[key]

    def _plan(self, q: Query) -> dict | RequestError:
        """Check one request and decide how to answer it (known user, new user, or popularity)."""
        try:
            self._check_k(q.k)
            self._check_alpha(q.alpha)
            if not isinstance(q.exclude_seen, (bool, np.bool_)):
                raise RequestError(f"exclude_seen must be true or false, got {q.exclude_seen!r}")
            cat = self._category_key(q.category, q.category_feature) if q.category is not None else None
            if q.category is None and q.category_feature is not None:
                raise RequestError("\"category_feature\" names the feature of \"category\": send both, or neither")
            self._check_context(q.context)
            has_user, has_hist = q.user is not None, q.history is not None
            if has_user and has_hist:
                raise RequestError("send either \"user\" (a known user id) or \"history\" (a list of item ids, oldest "
                                   "first) and/or \"features\" (a new user), not both")
            if has_user:
                if q.features:
                    raise RequestError("\"features\" go with a new user (\"history\" and/or \"features\", no \"user\"); "
                                       "a known user's features are already in the model")
                return {"kind": "user", "category": cat}
            if not has_hist and q.features is None:
                raise RequestError("send either \"user\" (a known user id) or a new user's \"history\" (a list of item "
                                   "ids, oldest first) and/or \"features\" ({name: value}); one of them is required")
            history = [] if q.history is None else q.history
            if isinstance(history, (str, bytes)) or not isinstance(history, (list, tuple, np.ndarray)):
                raise RequestError(f"history must be a list of item ids, got {type(history).__name__}")
            if len(history) > MAX_HISTORY:
                raise RequestError(f"history has {len(history):,} items; send at most {MAX_HISTORY:,} (the most recent)")
            hist = self.run.items.encode(self.run.items.coerce(list(history))) if len(history) else np.empty(0, np.int64)
            unknown = [x for x, i in zip(history, hist) if i < 0] if (hist < 0).any() else []
            hist = hist[hist >= 0]
            self._check_features(q.features)
            return {"kind": "new", "hist": hist, "unknown": unknown, "category": cat}
        except RequestError as e:
            return e

    def _check_features(self, features) -> None:
        """A new user's features name features of the user tower, with values their encoders take
        (each kind checks its own: a number, a label, a text, a vector of the right length)."""
        if not features:
            return
        if not isinstance(features, dict):
            raise RequestError("features must be an object {feature: value or [values]}")
        extra = sorted(set(features) - set(self.user_feature_names))
        if extra:
            raise RequestError(f"unknown user feature(s) {extra}; this model's user features: {self.user_feature_names or 'none'}")
        try:
            self.model.user_tower.features.encode([features])
        except FeatureInputError as e:
            raise RequestError(f"features.{e.feature}: {e.problem}" + (f"; {e.fix}" if e.fix else "")) from None

    def _usable(self, q: Query, plan: dict) -> bool:
        """Whether a new user brought anything the user tower can use: a known history item, or a
        feature value its encoders placed. If not, ``plan`` gets the reason for the popularity list."""
        if len(plan["hist"]):
            return True
        placed = [name for name, v in (q.features or {}).items()
                  if v is not None and len(v if isinstance(v, (list, tuple)) else [v]) >
                  len(plan.get("unknown_features", {}).get(name, []))]
        if placed:
            return True
        said = []
        said.append("none of the history items is known to this model" if plan["unknown"] else "no history items")
        if q.features:
            said.append("no feature value is known to this model (see unknown_features)")
        elif self.user_feature_names:
            said.append(f"no user features (this model takes {', '.join(self.user_feature_names)})")
        else:
            said.append("no user features (this model's user tower takes none)")
        plan["fallback_reason"] = "; ".join(said)
        return False

    def _check_context(self, context) -> None:
        """The request's context names context features of the user tower, with values they take."""
        if context is None:
            return
        if not isinstance(context, dict):
            raise RequestError("context must be an object {context feature: value}")
        extra = sorted(set(context) - set(self.context_names))
        if extra:
            known = self.context_names or "none (it reads no context: leave \"context\" out)"
            raise RequestError(f"unknown context feature(s) {extra}; this model's context features: {known}")
        if context:
            try:
                self.model.user_tower.context.encode([context], absent_default=True)
            except FeatureInputError as e:
                raise RequestError(f"context.{e.feature}: {e.problem}" + (f"; {e.fix}" if e.fix else "")) from None

    def _contexts(self, contexts: Sequence[dict | None]) -> list[dict] | None:
        """Per user the context mapping for the user tower (``None`` when the model reads none)."""
        return [c or {} for c in contexts] if self.context_names else None

    def _known_user_vectors(self, users: np.ndarray, contexts: Sequence[dict | None]) -> np.ndarray:
        with torch.no_grad():
            f = self.model.user_vectors(self.model.user_inputs(users, self.run.known, context=self._contexts(contexts)))
        return f.float().numpy()

    def _new_user_vectors(self, queries: list[Query], plans: list[dict]) -> np.ndarray:
        """``f(u)`` of new users (id ``-1``) from their history and features, through the user
        tower; each plan gets the feature values the encoders could not place."""
        if self._item_vecs_t is None and not self.model.user_tower.use_history:
            covered = self.index.n_items >= len(self.run.items)  # else: items admitted to the run since the index
            self._item_vecs_t = torch.from_numpy(np.ascontiguousarray(self.index.vectors[: len(self.run.items), : self.dim])) \
                if covered else self.run.item_vectors.float()
        features = [q.features for q in queries] if self.user_feature_names else None
        with torch.no_grad():
            x = self.model.user_inputs(np.full(len(plans), -1), [p["hist"] for p in plans], features,
                                       context=self._contexts([q.context for q in queries]))
            f = self.model.user_vectors(x, self._item_vecs_t)
        for p, unknown in zip(plans, x.unknown_features or [{}] * len(plans)):
            p["unknown_features"] = unknown
        return f.float().numpy()

    def _seen(self, rows: list[int], plans: list[dict], queries: Sequence[Query]) -> tuple[np.ndarray, np.ndarray]:
        """``(row position, item)`` pairs to exclude, for the rows that exclude seen items."""
        pos_parts, item_parts = [], []
        known = [(r, plans[i]["uidx"]) for r, i in enumerate(rows) if queries[i].exclude_seen and "uidx" in plans[i]]
        if known:
            r, u = np.array(known, dtype=np.int64).T
            vals, _ = self.run.known.gather(u)
            pos_parts.append(np.repeat(r, self.run.known.indptr[u + 1] - self.run.known.indptr[u]))
            item_parts.append(vals)
        for r, i in enumerate(rows):
            if queries[i].exclude_seen and "hist" in plans[i]:
                pos_parts.append(np.full(len(plans[i]["hist"]), r, dtype=np.int64))
                item_parts.append(plans[i]["hist"])
        if not pos_parts:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate(pos_parts), np.concatenate(item_parts).astype(np.int64)

    def _search(self, rows: list[int], vecs: np.ndarray, queries: Sequence[Query], plans: list[dict], results: list) -> None:
        """One index search per category among ``rows``: over-fetch by the number of seen items
        that are candidates, drop them, keep each request's top k."""
        seen_pos, seen_items = self._seen(rows, plans, queries)
        alphas = np.array([float(queries[i].alpha) for i in rows])
        ks = np.array([int(queries[i].k) for i in rows], dtype=np.int64)
        cats = [plans[i]["category"] for i in rows]
        n_items = max(self.index.n_items, len(self.run.items))  # the key space of (row, item) pairs
        for cat in dict.fromkeys(cats):
            g = np.array([r for r, c in enumerate(cats) if c == cat], dtype=np.int64)
            subset, sel = self._category(cat) if cat is not None else (None, None)
            in_g = np.isin(seen_pos, g)
            gp, gi = seen_pos[in_g], seen_items[in_g]
            if subset is not None and len(gi):
                ok = np.isin(gi, subset)
                gp, gi = gp[ok], gi[ok]
            n_seen = np.bincount(gp, minlength=len(rows))[g]
            fetch = int((ks[g] + n_seen).max())
            q = self.index.layout.queries(vecs[g], alphas[g])
            inner, ids = self.index.search(q, fetch, subset=subset, selector=sel)
            scores = self.index.layout.scores(inner, alphas[g])
            drop = ids < 0
            if len(gp):  # seen items of each row, as keys row * n_items + item
                local = np.searchsorted(g, gp)
                keys = np.arange(len(g), dtype=np.int64)[:, None] * n_items + np.where(ids >= 0, ids, 0)
                drop |= np.isin(keys, local * n_items + gi)
            order = np.argsort(drop, axis=1, kind="stable")
            ids, scores, drop = (np.take_along_axis(a, order, 1) for a in (ids, scores, drop))
            for j, r in enumerate(g):
                i = rows[r]
                k = int(ks[r])
                keep = ~drop[j, :k]
                results[i] = self._result(queries[i], plans[i], ids[j, :k][keep], scores[j, :k][keep])

    def _popular(self, rows: list[int], queries: Sequence[Query], plans: list[dict], results: list) -> None:
        """A new user with nothing usable (``_usable``): the most popular items (of the category),
        scored by ``log p(j)``, flagged ``fallback = "popularity"`` with the reason."""
        for cat in dict.fromkeys(plans[i]["category"] for i in rows):
            order = self._pop_order
            if cat is not None:
                subset = self._category(cat)[0]
                member = np.zeros(len(self.run.items), dtype=bool)
                member[subset] = True
                order = order[member[order]]
            for i in rows:
                if plans[i]["category"] == cat:
                    top = order[: int(queries[i].k)]
                    results[i] = self._result(queries[i], plans[i], top, self.log_p[top].astype(np.float32), fallback="popularity")

    def _result(self, q: Query, plan: dict, ids: np.ndarray, scores: np.ndarray, fallback: str | None = None) -> Recommendation:
        cat = plan.get("category")
        return Recommendation(self.run.items.decode(ids), np.asarray(scores, dtype=np.float32), q.user, int(q.k), float(q.alpha),
                              bool(q.exclude_seen), None if q.category is None else str(q.category),
                              list(plan.get("unknown", [])), dict(plan.get("unknown_features", {})), fallback,
                              plan.get("fallback_reason") if fallback else None, None if cat is None else cat[0])

    # ---- description -----------------------------------------------------------------------------
    def metadata(self) -> dict:
        """Model, dataset, index (kind, parameters, measured recall and latency), counts."""
        cfg = self.run.config
        idx = self.index
        info = {k: v for k, v in idx.info.items() if k not in ("vectors_sha256", "index_sha256")}
        return {
            "run": self.run.path.name,  # the folder's name only: where it lies on the server is no client's business
            "model": {**cfg.model.model_dump(mode="json"), "temperature": float(self.model.temperature),
                      "learned_item_bias": idx.layout.bias_scale is not None},
            "dataset": {"name": cfg.data.dataset, "split": cfg.data.split},
            "counts": {"users": len(self.run.users), "items": len(self.run.items),
                       "known_interactions": int(len(self.run.known.indices)),
                       # retired by updates (update.retire_after): out of every recommendation
                       "retired_users": int(self.run.activity.users_retired.sum()),
                       "retired_items": int(self.run.activity.items_retired.sum())},
            "index": {"kind": idx.kind, "params": idx.params.to_dict(), "dim": idx.dim, "layout": idx.layout.to_dict(),
                      "saved": info.pop("saved", True), **info},
            "score": "<f(u), g(j)> / temperature + b_j - alpha * log p(j), p(j) = (count_j + 1) / (N + n_items)",
            "category_feature": self.category_feature, "categories": self.category_values,
            "category_features": self._feature_values,
            "user_features": self.user_feature_names, "max_k": self.max_k, "max_history": MAX_HISTORY,
            "features": self._feature_descriptions(),
        }

    def _feature_descriptions(self) -> dict:
        """What a request can send, per tower: each feature's kind and, for context, its default."""
        out = {}
        for tower, feats in (("item", self.model.item_tower.features), ("user", self.model.user_tower.features),
                             ("context", self.model.user_tower.context)):
            if feats is None:
                out[tower] = []
                continue
            out[tower] = [{"name": e.name, "kind": e.kind, **({"length": e.length} if e.kind == "vector" else {}),
                           **({"default": e.meta.get("default")} if tower == "context" else {})} for e in feats.encoders]
        return out


__all__ = ["Query", "Recommendation", "Recommender", "RequestError", "UnknownUserError", "UnknownItemError", "MAX_K"]
