"""Per-row hard negatives: K items for each training pair, chosen to be harder than random.

Two samplers cover the three sources of hard negatives (docs/design.md, "The candidate set"):
- ``CategorySampler``: items sharing a category with the row's positive (any of its categories when
  the feature is multi-valued), never the positive itself;
- ``ListSampler``: items from a per-user list, either shown-but-not-engaged impressions (exposure)
  or the model's own near misses (``mining.mine_negatives``).

Hard negatives are not drawn from a known distribution, so they get no logQ correction; a
curriculum (``hard_schedule``) decides when they start and how fast they ramp up. Samplers return
``-1`` where a row has nothing to offer; the trainer masks those columns.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def hard_schedule(step: int, k: int, warmup_steps: int, ramp_steps: int, ramp: str, weight: float) -> tuple[int, float]:
    """Curriculum: ``(hard negatives per row, their weight)`` at ``step``.

    Nothing before ``warmup_steps``; then over ``ramp_steps`` a linear ramp ``f = (step - warmup + 1) / ramp``
    (capped at 1) of either the count (``ceil(f * k)`` at full weight) or the weight (``f * weight``
    with all ``k``). A hard negative of weight ``w`` enters the softmax as ``exp(s + log w)``: ``w``
    copies of it, in expectation.
    """
    if k == 0 or step < warmup_steps:
        return 0, 0.0
    f = 1.0 if ramp_steps == 0 else min(1.0, (step - warmup_steps + 1) / ramp_steps)
    if ramp == "count":
        return int(math.ceil(f * k)), float(weight)
    return int(k), float(weight) * f


def margin_mask(hard_scores: torch.Tensor, positive_scores: torch.Tensor, margin: float) -> torch.Tensor:
    """``[B, K]`` True where hard negative ``k`` of row ``b`` scores within ``margin`` of the row's
    positive, ``s(u_b, h_bk) > s(u_b, i_b) - margin``: a negative the model already ranks with (or
    above) the positive is as likely an unlabelled positive as a hard negative, and training against
    it hurts (the false negatives of implicit feedback; Huang et al., "Embedding-based Retrieval in
    Facebook Search", KDD 2020, skip the top ranks for the same reason)."""
    return hard_scores > (positive_scores[:, None] - margin)


class CategorySampler:
    """Uniform over one of the positive's categories (chosen uniformly), then uniform over that
    category's items; a draw that hits the positive moves to the next item of the category (so the
    positive is never returned), and a category holding only the positive yields ``-1``."""

    def __init__(self, item_indptr: np.ndarray, item_categories: np.ndarray, n_categories: int,
                 device: torch.device | str = "cpu"):
        item_indptr = np.asarray(item_indptr, dtype=np.int64)
        item_categories = np.asarray(item_categories, dtype=np.int64)
        n_items = len(item_indptr) - 1
        owner = np.repeat(np.arange(n_items), np.diff(item_indptr))
        order = np.lexsort((owner, item_categories))  # category -> its items, in item order
        cat_counts = np.bincount(item_categories, minlength=n_categories)
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        self.item_indptr, self.item_categories = t(item_indptr), t(item_categories)
        self.cat_indptr = t(np.concatenate([[0], np.cumsum(cat_counts)]))
        self.cat_items = t(owner[order])

    def sample(self, positives: torch.Tensor, k: int, gen: torch.Generator | None = None) -> torch.Tensor:
        """``[B, k]`` item indices (``-1``: none available)."""
        b = len(positives)
        dev = positives.device
        start = self.item_indptr[positives]
        n_cats = (self.item_indptr[positives + 1] - start)[:, None]
        has = n_cats > 0
        pick = (torch.rand(b, k, generator=gen, device=dev) * n_cats).long().clamp_max((n_cats - 1).clamp_min(0))
        cat = self.item_categories[(start[:, None] + pick).clamp_max(max(len(self.item_categories) - 1, 0))]
        c0 = self.cat_indptr[cat]
        size = self.cat_indptr[cat + 1] - c0
        r = (torch.rand(b, k, generator=gen, device=dev) * size).long().clamp_max((size - 1).clamp_min(0))
        item = self.cat_items[c0 + r]
        hit = item == positives[:, None]
        item = torch.where(hit, self.cat_items[c0 + (r + 1) % size.clamp_min(1)], item)
        bad = ~has | (item == positives[:, None])
        return item.masked_fill(bad, -1)


class ListSampler:
    """Uniform over a per-user list of items (CSR ``indptr``/``indices`` over user indices)."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, device: torch.device | str = "cpu"):
        self.indptr = torch.from_numpy(np.asarray(indptr, dtype=np.int64)).to(device)
        self.indices = torch.from_numpy(np.asarray(indices, dtype=np.int64)).to(device)

    @property
    def n_entries(self) -> int:
        return len(self.indices)

    def sample(self, users: torch.Tensor, k: int, gen: torch.Generator | None = None) -> torch.Tensor:
        """``[B, k]`` item indices from each row user's list (``-1``: the list is empty)."""
        start = self.indptr[users][:, None]
        size = self.indptr[users + 1][:, None] - start
        r = (torch.rand(len(users), k, generator=gen, device=users.device) * size).long().clamp_max((size - 1).clamp_min(0))
        if len(self.indices) == 0:
            return torch.full((len(users), k), -1, dtype=torch.int64, device=users.device)
        item = self.indices[(start + r).clamp_max(len(self.indices) - 1)]
        return item.masked_fill(size == 0, -1)
