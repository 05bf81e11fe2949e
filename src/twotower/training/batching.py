"""Batches of positive pairs for one epoch, as index arrays (one shuffle, no Python loop per example)."""
from __future__ import annotations

import numpy as np

from ..data.splits import rank_within_user


def epoch_batches(n_pairs: int, batch_size: int, rng: np.random.Generator, users: np.ndarray | None = None) -> list[np.ndarray]:
    """Shuffle ``n_pairs`` pair indices into batches of ``batch_size``.

    With ``users`` given, each user appears at most once per batch: pairs are ranked within their
    user at random, ordered by that rank, and no batch crosses from one rank to the next (so the
    last batch of each rank may be smaller). That keeps a user's other positives from becoming
    in-batch false negatives for the user's own rows.
    """
    if users is None:
        perm = rng.permutation(n_pairs)
        return [perm[s : s + batch_size] for s in range(0, n_pairs, batch_size)]
    rank, _ = rank_within_user(users, rng.random(n_pairs))
    order = np.lexsort((rng.random(n_pairs), rank))
    r = rank[order]
    block_start = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
    block_len = np.diff(np.r_[block_start, n_pairs])
    pos_in_block = np.arange(n_pairs) - np.repeat(block_start, block_len)
    batches_per_block = -(-block_len // batch_size)
    first_batch = np.r_[0, np.cumsum(batches_per_block)[:-1]]
    batch_id = np.repeat(first_batch, block_len) + pos_in_block // batch_size
    cuts = np.flatnonzero(np.diff(batch_id)) + 1
    return np.split(order, cuts)
