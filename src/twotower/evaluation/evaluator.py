"""Full-corpus evaluation (docs/design.md, "Evaluation protocol").

Every item is ranked for every user with held-out items; the user's known items are masked
(training items when scoring validation; training and validation items when scoring test). A user
tower that reads context is given the context of the user's first held-out interaction of the split
(by time; with leave-last-one splits, the held-out interaction's own).

What ranks is a ``Ranker``: the two towers (``ModelRanker``), or any other model that gives each
block of users its top-k items with the known items excluded: factor models (``FactorRanker``:
user and item vectors, e.g. ALS, popularity) and block scorers (``BlockRanker``: e.g. EASE, a
user's row times a matrix). The protocol, the metrics and the buckets are the same for all.

With a cold split (docs/features.md, "Cold start") the withheld items and users are scored as new
ones (``TwoTowerModel.new_entities``), the ranking is still over every item, and the metrics are
also reported per group of held-out pairs: ``cold_items/`` (pairs of a withheld item),
``warm_items/`` (the others), ``cold_users/`` and ``warm_users/`` alike. A group's metric is the
plain one restricted to the group's pairs: for user ``u`` with ``T_g(u)`` held-out items in group
``g`` (users with none are left out) and hits counted only on them, e.g.
``Recall@K_g(u) = |top-K(u) ∩ T_g(u)| / |T_g(u)|``, averaged over the group's users.
"""
from __future__ import annotations

from typing import Callable, Iterator, Protocol

import numpy as np
import torch

from ..config import EvalConfig
from ..data.dataset import CSR, Dataset, Split
from ..data.popularity import log_popularity
from ..errors import DataError
from ..model.scoring import ServedScore
from ..model.towers import ContextTable, TwoTowerModel, embed_items
from . import metrics as M
from .ranking import top_k_blocks, top_k_scores, top_k_vectors


class Ranker(Protocol):
    """Anything the protocol can score: ``top_k`` yields ``(block_users, top_scores, top_items)``
    block by block for ``users``, each user's ``known`` items (a CSR over user indices) excluded;
    ``known`` is also what a model reads as the user's input (history, EASE's row)."""

    n_items: int

    def top_k(self, users: np.ndarray, known: CSR, k: int, batch_users: int
              ) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]: ...


class ModelRanker:
    """The two towers, ranking by the served score (with ``- alpha log p(j)`` when ``alpha``)."""

    def __init__(self, model: TwoTowerModel, history_length: int = 50, item_counts: np.ndarray | None = None,
                 alpha: float = 0.0, context: ContextTable | None = None, new_items: np.ndarray | None = None,
                 new_users: np.ndarray | None = None):
        self.model, self.history_length, self.n_items = model, history_length, model.n_items
        self.item_counts, self.alpha, self.context = item_counts, alpha, context
        self.new_items, self.new_users = new_items, new_users

    def top_k(self, users, known, k, batch_users):
        item_vecs = embed_items(self.model, new=self.new_items)
        # The served score, with its popularity correction - alpha * log p(j): evaluated without a server.
        score = ServedScore.of(self.model, log_popularity(self.item_counts) if self.alpha else None, self.alpha)
        return top_k_blocks(self.model, users, known, known, k, self.history_length, batch_users, item_vecs, score,
                            self.context, new_users=self.new_users)


class FactorRanker:
    """A factor model: ``score(u, j) = <U[u], V[j]> (+ bias[j])`` from precomputed matrices
    (ALS's factors; popularity as ``U = 1``, ``V = count``)."""

    def __init__(self, user_vectors: torch.Tensor, item_vectors: torch.Tensor, bias: torch.Tensor | None = None):
        self.user_vectors = torch.as_tensor(user_vectors, dtype=torch.float32)
        self.item_vectors = torch.as_tensor(item_vectors, dtype=torch.float32).contiguous()
        self.bias = None if bias is None else torch.as_tensor(bias, dtype=torch.float32)
        self.n_items = self.item_vectors.shape[0]

    def top_k(self, users, known, k, batch_users):
        rows = lambda block: self.user_vectors[torch.from_numpy(np.asarray(block, dtype=np.int64))]  # noqa: E731
        return top_k_vectors(users, rows, self.item_vectors, known, k, batch_users, self.bias)


class BlockRanker:
    """Any scorer of a block of users against every item: ``scores_of(block, known)`` gives a
    fresh ``[b, n_items]`` float tensor (EASE: the users' rows of ``known`` times its matrix)."""

    def __init__(self, n_items: int, scores_of: Callable[[np.ndarray, CSR], torch.Tensor]):
        self.n_items, self.scores_of = n_items, scores_of

    def top_k(self, users, known, k, batch_users):
        return top_k_scores(users, lambda block: self.scores_of(block, known), known, k, batch_users)


def protocol(dataset: Dataset, split: str) -> tuple[Split, CSR]:
    """The held-out items of ``split`` and what is known when scoring it: 'valid' is scored with
    the training items known, 'test' with training and validation items known."""
    if split == "valid":
        return dataset.valid, dataset.history("train")
    if split == "test":
        return dataset.test, dataset.history("valid")
    raise ValueError(f"split must be 'valid' or 'test', got {split!r}")


def evaluate(model: TwoTowerModel, dataset: Dataset, split: str, cfg: EvalConfig, history_length: int = 50,
             progress=None) -> dict[str, float]:
    """Metrics of ``model`` on ``split`` ('valid' or 'test'), averaged over users with held-out items."""
    truth_split, known = protocol(dataset, split)
    new_items, new_users = model.new_entities(dataset)
    return evaluate_split(model, truth_split, known, dataset.item_counts(), cfg, history_length, progress,
                          heldout_context(model, truth_split, known.n_rows), new_items=new_items,
                          new_users=new_users, groups=cold_groups(dataset))


def evaluate_ranker(ranker: Ranker, dataset: Dataset, split: str, cfg: EvalConfig, progress=None) -> dict[str, float]:
    """Metrics of any ``Ranker`` on ``split`` under the same protocol as the towers'."""
    truth_split, known = protocol(dataset, split)
    return ranker_metrics(ranker, truth_split, known, dataset.item_counts(), cfg, progress, cold_groups(dataset))


def cold_groups(dataset: Dataset) -> dict[str, tuple[str, np.ndarray]]:
    """The warm and cold groups of a cold split: ``name -> ("item" or "user", membership mask)``
    (empty without one)."""
    groups = {}
    if dataset.cold_items is not None:
        groups.update({"warm_items": ("item", ~dataset.cold_items), "cold_items": ("item", dataset.cold_items)})
    if dataset.cold_users is not None:
        groups.update({"warm_users": ("user", ~dataset.cold_users), "cold_users": ("user", dataset.cold_users)})
    return groups


def group_pairs(truth: CSR, block: np.ndarray, top: torch.Tensor, hits: torch.Tensor, axis: str,
                member: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """A group's view of a block: ``(hits_g [b, K], n_relevant_g [b])``, the hits and held-out
    counts of the pairs whose item (``axis = "item"``) or user (``"user"``) is a ``member``."""
    if axis == "item":
        items, _ = truth.gather(block)
        rows = np.repeat(np.arange(len(block)), truth.lengths()[block])
        n_rel = np.bincount(rows, weights=member[items], minlength=len(block)).astype(np.int64)
        return hits & torch.from_numpy(member)[top], torch.from_numpy(n_rel)
    mine = torch.from_numpy(member[block])
    return hits & mine[:, None], torch.from_numpy(truth.lengths()[block]) * mine


def heldout_context(model: TwoTowerModel, truth_split: Split, n_users: int) -> ContextTable | None:
    """Each user's context when ranking for a held-out split: that of the user's first held-out
    interaction (``Split.first_per_user``), as a table over user indices; ``None`` when the user
    tower reads no context."""
    if model.user_tower.context is None:
        return None
    if truth_split.context is None:
        raise ValueError("the model reads context features but the split has no context values; load the dataset "
                         "with the run's config (load_dataset(run_config))")
    first = truth_split.first_per_user(n_users)
    columns = {}
    for name, col in truth_split.context.items():
        out = np.full(n_users, None if col.dtype == object else np.nan, dtype=col.dtype)
        out[first >= 0] = col[first[first >= 0]]
        columns[name] = out
    return model.context_table(columns)


def evaluate_split(model: TwoTowerModel, truth_split: Split, known: CSR, item_counts: np.ndarray, cfg: EvalConfig,
                   history_length: int = 50, progress=None, context: ContextTable | None = None,
                   new_items: np.ndarray | None = None, new_users: np.ndarray | None = None,
                   groups: dict[str, tuple[str, np.ndarray]] | None = None) -> dict[str, float]:
    """Metrics of ``model`` on the held-out ``truth_split``, ``known`` items masked and fed as history;
    ``context``: the user tower's context per user index (``heldout_context``; ``None``: the defaults).
    ``new_items`` / ``new_users``: bool masks of the entities scored as new (id ``-1``); ``groups``:
    ``name -> ("item" or "user", membership mask)``, metrics per group (module docstring)."""
    ranker = ModelRanker(model, history_length, item_counts, cfg.alpha, context, new_items, new_users)
    return ranker_metrics(ranker, truth_split, known, item_counts, cfg, progress, groups)


HIT_METRICS = ("recall", "ndcg", "hr", "precision", "mrr")


def hit_metrics(hits: torch.Tensor, n_rel: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Each user's metrics at ``k`` from the hit matrix (``HIT_METRICS``, formulas in ``metrics``)."""
    return {"recall": M.recall_at_k(hits, n_rel, k), "ndcg": M.ndcg_at_k(hits, n_rel, k),
            "hr": M.hit_rate_at_k(hits, k), "precision": M.precision_at_k(hits, k), "mrr": M.mrr_at_k(hits, k)}


@torch.no_grad()
def ranker_metrics(ranker: Ranker, truth_split: Split, known: CSR, item_counts: np.ndarray, cfg: EvalConfig,
                   progress=None, groups: dict[str, tuple[str, np.ndarray]] | None = None) -> dict[str, float]:
    """Rank every item for every user of ``truth_split`` (``known`` items excluded) and average
    the metrics at each cut-off over those users; coverage, popularity, tail share and recall by
    popularity bucket beside them; the same metrics per group of ``groups`` (``cold_groups``)."""
    groups = groups or {}
    n_items = ranker.n_items
    truth = truth_split.csr(known.n_rows)
    users = np.flatnonzero(truth.lengths() > 0)
    if len(users) == 0:
        raise DataError("evaluation", "no user has held-out items in this split",
                        "score a split that holds interactions (a run trained without validation data has no valid split)")
    ks = sorted(cfg.ks)
    max_k = min(max(ks), n_items)
    counts = torch.from_numpy(np.asarray(item_counts, dtype=np.float64))  # CPU: top-k blocks come back on CPU
    bucket = M.popularity_buckets(counts, cfg.popularity_buckets)
    n_buckets = len(cfg.popularity_buckets) + 1
    names = M.bucket_names(n_buckets)
    tail = n_buckets - 1

    sums: dict[str, float] = {}
    covered = {k: torch.zeros(n_items, dtype=torch.bool) for k in ks}
    bucket_hits = {k: torch.zeros(n_buckets, dtype=torch.float64) for k in ks}
    bucket_total = torch.zeros(n_buckets, dtype=torch.float64)

    def add(key: str, values: torch.Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + float(values.sum())

    # Held-out (user, item) pairs as sorted keys: a hit is a binary-search match, no dense mask.
    truth_keys = torch.from_numpy(np.sort(np.repeat(np.arange(truth.n_rows), truth.lengths()) * n_items + truth.indices))
    group_users = dict.fromkeys(groups, 0)
    for block, _, top in ranker.top_k(users, known, max_k, cfg.batch_users):
        n_rel = torch.from_numpy(truth.lengths()[block])
        keys = torch.from_numpy(block)[:, None] * n_items + top
        pos = torch.searchsorted(truth_keys, keys).clamp_max(len(truth_keys) - 1)
        hits = truth_keys[pos] == keys
        top_bucket = bucket[top]
        bucket_total += torch.bincount(bucket[torch.from_numpy(truth.gather(block)[0])], minlength=n_buckets).double()
        for k in ks:
            kk = min(k, max_k)
            for metric, values in hit_metrics(hits, n_rel, kk).items():
                add(f"{metric}@{k}", values)
            add(f"popularity@{k}", counts[top[:, :kk]].mean(1))
            add(f"tail_share@{k}", (top_bucket[:, :kk] == tail).double().mean(1))
            covered[k][top[:, :kk].reshape(-1)] = True
            bucket_hits[k] += torch.bincount(top_bucket[:, :kk][hits[:, :kk]], minlength=n_buckets).double()
        for name, (axis, member) in groups.items():
            g_hits, g_rel = group_pairs(truth, block, top, hits, axis, member)
            rows = g_rel > 0
            g_hits, g_rel = g_hits[rows], g_rel[rows]
            group_users[name] += int(rows.sum())
            for k in ks:
                kk = min(k, max_k)
                for metric, values in hit_metrics(g_hits, g_rel, kk).items():
                    add(f"{name}/{metric}@{k}", values)
        if progress is not None:
            progress(len(block))

    n = len(users)
    out = {key: value / n for key, value in sums.items() if key.partition("/")[0] not in groups}
    for name, n_g in group_users.items():  # a group without users in this split has no figure (nan)
        for k in ks:
            for metric in HIT_METRICS:
                key = f"{name}/{metric}@{k}"
                out[key] = sums.get(key, 0.0) / n_g if n_g else float("nan")
        out[f"{name}/users"] = float(n_g)
    for k in ks:
        out[f"coverage@{k}"] = float(covered[k].double().mean())
        for b, name in enumerate(names):
            out[f"recall@{k}/{name}"] = float(bucket_hits[k][b] / bucket_total[b]) if bucket_total[b] > 0 else float("nan")
    out["users"] = float(n)
    return out
