"""Per-user hold-out splits, vectorised (one sort, no Python loop per user).

Each function returns a boolean mask over the interactions: ``True`` = held out.
"""
from __future__ import annotations

import numpy as np


def rank_within_user(users: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank of each interaction among its user's interactions when ordered by ``key`` (ties keep
    input order), and the user's interaction count, both aligned with the input."""
    users = np.asarray(users)
    order = np.lexsort((np.arange(len(users)), key, users))
    su = users[order]
    starts = np.flatnonzero(np.r_[True, su[1:] != su[:-1]])
    lengths = np.diff(np.r_[starts, len(su)])
    group = np.repeat(np.arange(len(starts)), lengths)
    rank_sorted = np.arange(len(su)) - starts[group]
    rank = np.empty(len(users), dtype=np.int64)
    count = np.empty(len(users), dtype=np.int64)
    rank[order] = rank_sorted
    count[order] = lengths[group]
    return rank, count


def random_holdout(users: np.ndarray, fraction: float, rng: np.random.Generator, min_keep: int = 1) -> np.ndarray:
    """Hold out ``round(fraction * n_u)`` random interactions of each user ``u``, keeping at least
    ``min_keep`` of them (a user with too few interactions holds out nothing)."""
    if fraction <= 0 or len(users) == 0:
        return np.zeros(len(users), dtype=bool)
    rank, count = rank_within_user(users, rng.random(len(users)))
    n_hold = np.minimum(np.floor(count * fraction + 0.5).astype(np.int64), np.maximum(count - min_keep, 0))
    return rank < n_hold


def last_n_holdout(users: np.ndarray, time: np.ndarray, n: int, min_keep: int = 1) -> np.ndarray:
    """Hold out each user's last ``n`` interactions by ``time`` (ties: later rows count as later),
    keeping at least ``min_keep`` of them."""
    if n <= 0 or len(users) == 0:
        return np.zeros(len(users), dtype=bool)
    rank, count = rank_within_user(users, np.asarray(time))
    n_hold = np.minimum(n, np.maximum(count - min_keep, 0))
    return rank >= count - n_hold


def withhold(present: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """A seeded ``round(share * n)`` of the ``n`` entities ``present`` (sorted indices), sorted: the
    entities a cold split withholds from training."""
    present = np.unique(np.asarray(present, dtype=np.int64))
    n = int(np.floor(share * len(present) + 0.5))
    return np.sort(rng.choice(present, n, replace=False)) if n else np.empty(0, np.int64)


def most_recent(users: np.ndarray, key: np.ndarray, n: int) -> np.ndarray:
    """Each user's last ``n`` interactions by ``key`` (ties: later rows count as later), as a mask."""
    rank, count = rank_within_user(users, key)
    return rank >= count - n
