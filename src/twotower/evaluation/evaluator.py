"""Full-corpus evaluation (docs/design.md, "Evaluation protocol").

Every item is ranked for every user with held-out items; the user's known items are masked
(training items when scoring validation; training and validation items when scoring test). A user
tower that reads context is given the context of the user's first held-out interaction of the split
(by time; with leave-last-one splits, the held-out interaction's own).

With a cold split (docs/features.md, "Cold start") the withheld items and users are scored as new
ones (``TwoTowerModel.new_entities``), the ranking is still over every item, and the metrics are
also reported per group of held-out pairs: ``cold_items/`` (pairs of a withheld item),
``warm_items/`` (the others), ``cold_users/`` and ``warm_users/`` alike. A group's metric is the
plain one restricted to the group's pairs: for user ``u`` with ``T_g(u)`` held-out items in group
``g`` (users with none are left out) and hits counted only on them, e.g.
``Recall@K_g(u) = |top-K(u) ∩ T_g(u)| / |T_g(u)|``, averaged over the group's users.
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import EvalConfig
from ..data.dataset import CSR, Dataset, Split
from ..data.popularity import log_popularity
from ..model.scoring import ServedScore
from ..model.towers import ContextTable, TwoTowerModel, embed_items
from . import metrics as M
from .ranking import top_k_blocks


def evaluate(model: TwoTowerModel, dataset: Dataset, split: str, cfg: EvalConfig, history_length: int = 50,
             progress=None) -> dict[str, float]:
    """Metrics of ``model`` on ``split`` ('valid' or 'test'), averaged over users with held-out items."""
    if split == "valid":
        truth_split, known = dataset.valid, dataset.history("train")
    elif split == "test":
        truth_split, known = dataset.test, dataset.history("valid")
    else:
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    new_items, new_users = model.new_entities(dataset)
    groups = {}
    if dataset.cold_items is not None:
        groups.update({"warm_items": ("item", ~dataset.cold_items), "cold_items": ("item", dataset.cold_items)})
    if dataset.cold_users is not None:
        groups.update({"warm_users": ("user", ~dataset.cold_users), "cold_users": ("user", dataset.cold_users)})
    return evaluate_split(model, truth_split, known, dataset.item_counts(), cfg, history_length, progress,
                          heldout_context(model, truth_split, known.n_rows), new_items=new_items,
                          new_users=new_users, groups=groups)


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


@torch.no_grad()
def evaluate_split(model: TwoTowerModel, truth_split: Split, known: CSR, item_counts: np.ndarray, cfg: EvalConfig,
                   history_length: int = 50, progress=None, context: ContextTable | None = None,
                   new_items: np.ndarray | None = None,
                   new_users: np.ndarray | None = None,
                   groups: dict[str, tuple[str, np.ndarray]] | None = None) -> dict[str, float]:
    """Metrics of ``model`` on ``truth_split`` with each user's ``known`` items masked.
    ``context``: the user tower's context per user index (``heldout_context``; ``None``: the
    defaults). ``new_items`` / ``new_users``: bool masks of the entities scored as new (id ``-1``);
    ``groups``: ``name -> ("item" or "user", membership mask)``, metrics per group (module docstring)."""
    groups = groups or {}
    n_items = model.n_items
    truth = truth_split.csr(known.n_rows)
    users = np.flatnonzero(truth.lengths() > 0)
    if len(users) == 0:
        raise ValueError("no user has held-out items in this split")
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
    item_vecs = embed_items(model, new=new_items)
    # The served score, with its popularity correction - alpha * log p(j): evaluated without a server.
    score = ServedScore.of(model, log_popularity(item_counts) if cfg.alpha else None, cfg.alpha)
    group_users = dict.fromkeys(groups, 0)
    for block, _, top in top_k_blocks(model, users, known, known, max_k, history_length, cfg.batch_users, item_vecs,
                                      score, context, new_users=new_users):
        n_rel = torch.from_numpy(truth.lengths()[block])
        keys = torch.from_numpy(block)[:, None] * n_items + top
        pos = torch.searchsorted(truth_keys, keys).clamp_max(len(truth_keys) - 1)
        hits = truth_keys[pos] == keys
        top_bucket = bucket[top]
        bucket_total += torch.bincount(bucket[torch.from_numpy(truth.gather(block)[0])], minlength=n_buckets).double()
        for k in ks:
            kk = min(k, max_k)
            add(f"recall@{k}", M.recall_at_k(hits, n_rel, kk))
            add(f"ndcg@{k}", M.ndcg_at_k(hits, n_rel, kk))
            add(f"hr@{k}", M.hit_rate_at_k(hits, kk))
            add(f"precision@{k}", M.precision_at_k(hits, kk))
            add(f"mrr@{k}", M.mrr_at_k(hits, kk))
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
                add(f"{name}/recall@{k}", M.recall_at_k(g_hits, g_rel, kk))
                add(f"{name}/ndcg@{k}", M.ndcg_at_k(g_hits, g_rel, kk))
                add(f"{name}/hr@{k}", M.hit_rate_at_k(g_hits, kk))
                add(f"{name}/precision@{k}", M.precision_at_k(g_hits, kk))
                add(f"{name}/mrr@{k}", M.mrr_at_k(g_hits, kk))
        if progress is not None:
            progress(len(block))

    n = len(users)
    out = {key: value / n for key, value in sums.items() if key.partition("/")[0] not in groups}
    for name, n_g in group_users.items():  # a group without users in this split has no figure (nan)
        for k in ks:
            for metric in ("recall", "ndcg", "hr", "precision", "mrr"):
                key = f"{name}/{metric}@{k}"
                out[key] = sums.get(key, 0.0) / n_g if n_g else float("nan")
        out[f"{name}/users"] = float(n_g)
    for k in ks:
        out[f"coverage@{k}"] = float(covered[k].double().mean())
        for b, name in enumerate(names):
            out[f"recall@{k}/{name}"] = float(bucket_hits[k][b] / bucket_total[b]) if bucket_total[b] > 0 else float("nan")
    out["users"] = float(n)
    return out
