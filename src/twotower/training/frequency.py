"""Item probabilities ``p(j)`` behind the logQ correction that are estimated while training runs.

Two ways to know ``p(j)``: exact counts over the training positives
(``twotower.data.popularity.counted_probabilities``), or the streaming estimator of Yi et al.
(``StreamingFrequency``, here) for data that arrives as a stream and is never counted in full.
``NegPosRatio`` tracks the other form of the correction: how often each item has been scored as a
negative against how often it has been a positive.
"""
from __future__ import annotations

import torch

# Knuth's multiplicative hash: spreads consecutive item indices over the buckets.
_HASH_MULT = 2654435761


class StreamingFrequency:
    """Streaming frequency estimate of Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large
    Corpus Item Recommendations" (RecSys 2019), Algorithm 2.

    Per hashed item ``h = hash(j) mod H``: ``A[h]`` the last step it was seen and ``G[h]`` the
    estimated number of steps between two sightings, updated on each sighting at step ``t`` by

        G[h] <- (1 - a) * G[h] + a * (t - A[h]);   A[h] <- t

    so ``1 / G[h]`` estimates the probability that ``j`` is in a batch. As a per-example share
    ``p(j) = 1 / (B * G[h])`` (B the batch size) it plugs into the same expected-count correction
    as exact counts. Before its first gap an item gets ``G = init_gap`` (the caller's prior; the
    trainer uses ``n_items / B``, the gap of a uniformly drawn item).
    """

    def __init__(self, buckets: int, lr: float, init_gap: float, device: torch.device | str = "cpu"):
        if buckets < 1 or not 0 < lr <= 1 or init_gap <= 0:
            raise ValueError("need buckets >= 1, 0 < lr <= 1 and init_gap > 0")
        self.buckets, self.lr = int(buckets), float(lr)
        self.last = torch.full((self.buckets,), -1, dtype=torch.int64, device=device)
        self.gap = torch.full((self.buckets,), float(init_gap), dtype=torch.float64, device=device)

    def bucket(self, items: torch.Tensor) -> torch.Tensor:
        return (items.to(torch.int64) * _HASH_MULT) % self.buckets

    def update(self, items: torch.Tensor, step: int) -> None:
        """Record that ``items`` (a batch's positives, repeats allowed) were seen at ``step``."""
        h = torch.unique(self.bucket(items))  # one sighting per bucket per step
        seen = self.last[h] >= 0
        hs = h[seen]
        self.gap[hs] = (1 - self.lr) * self.gap[hs] + self.lr * (step - self.last[hs]).to(torch.float64)
        self.last[h] = step

    def probabilities(self, items: torch.Tensor, batch_size: int) -> torch.Tensor:
        """``p(j) = 1 / (B * G[hash(j)])`` for ``items``, float32."""
        return (1.0 / (batch_size * self.gap[self.bucket(items)])).to(torch.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"last": self.last, "gap": self.gap}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.last.copy_(state["last"])
        self.gap.copy_(state["gap"])


class NegPosRatio:
    """Counts, per item, how many rows scored it as a negative and how many had it as their positive;
    the correction is ``c(j) = log((neg(j) + 1) / (pos(j) + 1))``.

    The expected-count form corrects by how often an item *is offered* as a candidate; this form by
    how often it *was pushed down* relative to how often it was pulled up, whatever the sources. With
    in-batch negatives alone the ratio tends to ``B - 1`` for every item (a constant: no correction);
    sampled and bank negatives make it grow for the items they over-represent.
    """

    def __init__(self, n_items: int, device: torch.device | str = "cpu"):
        self.neg = torch.zeros(n_items, dtype=torch.float64, device=device)
        self.pos = torch.zeros(n_items, dtype=torch.float64, device=device)

    def correction(self, ids: torch.Tensor) -> torch.Tensor:
        return (torch.log1p(self.neg[ids]) - torch.log1p(self.pos[ids])).to(torch.float32)

    def update(self, positives: torch.Tensor, candidate_ids: torch.Tensor, negative_rows: torch.Tensor) -> None:
        """``negative_rows[c]``: how many rows scored candidate ``c`` as an (unmasked) negative."""
        self.pos.index_add_(0, positives, torch.ones_like(positives, dtype=torch.float64))
        self.neg.index_add_(0, candidate_ids, negative_rows.to(torch.float64))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"neg": self.neg, "pos": self.pos}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.neg.copy_(state["neg"])
        self.pos.copy_(state["pos"])
