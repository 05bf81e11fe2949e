"""Full-corpus evaluation (docs/design.md, "Evaluation protocol").

Every item is ranked for every user with held-out items; the user's known items are masked
(training items when scoring validation; training and validation items when scoring test). A user
tower that reads context is given the context of the user's first held-out interaction of the split
(by time; with leave-last-one splits, the held-out interaction's own).
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
    return evaluate_split(model, truth_split, known, dataset.item_counts(), cfg, history_length, progress,
                          heldout_context(model, truth_split, known.n_rows))


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
                   history_length: int = 50, progress=None, context: ContextTable | None = None) -> dict[str, float]:
    """Metrics over the users with items in ``truth_split``; ``context``: the user tower's context per
    user index (``heldout_context``; ``None``: the defaults)."""
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
    item_vecs = embed_items(model)
    # The served score, with its popularity correction - alpha * log p(j): evaluated without a server.
    score = ServedScore.of(model, log_popularity(item_counts) if cfg.alpha else None, cfg.alpha)
    for block, _, top in top_k_blocks(model, users, known, known, max_k, history_length, cfg.batch_users, item_vecs,
                                      score, context):
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
        if progress is not None:
            progress(len(block))

    n = len(users)
    out = {key: value / n for key, value in sums.items()}
    for k in ks:
        out[f"coverage@{k}"] = float(covered[k].double().mean())
        for b, name in enumerate(names):
            out[f"recall@{k}/{name}"] = float(bucket_hits[k][b] / bucket_total[b]) if bucket_total[b] > 0 else float("nan")
    out["users"] = float(n)
    return out
