"""Ranking metrics as pure functions of a hit matrix.

``hits[u, r]`` is True when the item ranked ``r`` (0-based) for user ``u`` is one of the user's
held-out items; ``n_relevant[u]`` is how many held-out items the user has (> 0). Every function
returns per-user values; the evaluator averages them over users (the LightGCN convention,
He et al. SIGIR 2020, used by the published Gowalla figures).
"""
from __future__ import annotations

import torch


def recall_at_k(hits: torch.Tensor, n_relevant: torch.Tensor, k: int) -> torch.Tensor:
    """``|top-k ∩ held-out| / |held-out|`` (the denominator is the user's held-out count, not min(k, .))."""
    return hits[:, :k].sum(1).double() / n_relevant.double()


def precision_at_k(hits: torch.Tensor, k: int) -> torch.Tensor:
    """``|top-k ∩ held-out| / k``."""
    return hits[:, :k].sum(1).double() / k


def hit_rate_at_k(hits: torch.Tensor, k: int) -> torch.Tensor:
    """1 if any held-out item is in the top k, else 0."""
    return hits[:, :k].any(1).double()


def ndcg_at_k(hits: torch.Tensor, n_relevant: torch.Tensor, k: int) -> torch.Tensor:
    """Binary-relevance NDCG: ``DCG = sum_r hits[r] / log2(r + 2)`` over the top k, divided by the
    ideal DCG of ``min(k, |held-out|)`` hits at the top ranks."""
    discount = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64) + 2.0)
    dcg = (hits[:, :k].double() * discount[: hits[:, :k].shape[1]]).sum(1)
    ideal_cum = torch.cumsum(discount, 0)
    idcg = ideal_cum[(n_relevant.clamp(max=k) - 1).long()]
    return dcg / idcg


def mrr_at_k(hits: torch.Tensor, k: int) -> torch.Tensor:
    """``1 / (rank of the first held-out item, 1-based)`` if it is in the top k, else 0."""
    h = hits[:, :k]
    first = torch.argmax(h.to(torch.int8), dim=1)
    return torch.where(h.any(1), 1.0 / (first.double() + 1.0), torch.zeros((), dtype=torch.float64))


def popularity_buckets(counts: torch.Tensor, cuts: list[float]) -> torch.Tensor:
    """Bucket of each item by popularity rank: items sorted by training count (most popular first)
    and cut at the cumulative item shares ``cuts`` (e.g. [0.2, 0.5] -> head = top 20 % of items,
    torso = next 30 %, tail = the rest). Returns a bucket index per item (0 = head)."""
    n = len(counts)
    order = torch.argsort(counts, descending=True, stable=True)
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    bounds = torch.tensor([int(round(c * n)) for c in cuts], dtype=torch.long)
    return torch.bucketize(rank, bounds, right=True)


def bucket_names(n_buckets: int) -> list[str]:
    return ["head", "torso", "tail"] if n_buckets == 3 else ["head", "tail"] if n_buckets == 2 else [f"b{i}" for i in range(n_buckets)]
