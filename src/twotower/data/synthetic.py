"""A seeded synthetic data set with known ground truth.

The generative model:

* item ``i`` has a power-law (Zipf) base popularity ``pop[i] ∝ rank(i) ** -popularity_exponent``,
  ranks being a random permutation of ``1..n_items``;
* item ``i`` has one category ``item_category[i]`` (categories are balanced over items);
* user ``u`` belongs to one taste cluster ``user_cluster[u]``;
* cluster ``c`` prefers a random subset ``cluster_categories[c]`` of categories:
  ``category_affinity[c, k]`` is ``1.0`` for a preferred category and ``background_affinity``
  otherwise;
* item ``i`` has a price-like number ``price[i] = exp(3 + z_i)``, ``z_i ~ N(0, 1)``, and a
  description: ``words_per_item`` words, two thirds drawn from its category's own words
  (``"c{k}w{j}"``) and the rest from words every category shares (``"any{j}"``);
* cluster ``c`` prefers a price level ``price_pref[c] ~ N(0, 1)`` (in ``z``'s units): with
  ``price_affinity = a > 0`` an item's affinity is multiplied by ``exp(-a (z_i - price_pref[c])^2 / 2)``
  (``a = 0``, the default, leaves it out: the data is then exactly what it was before prices);
* user ``u`` draws ``n_u ~ Uniform{lo..hi}`` distinct items from
  ``p(i | u) ∝ pop[i] * category_affinity[user_cluster[u], item_category[i]] * price_factor[cluster, i]``
  (sequential sampling without replacement, done as Gumbel-top-k over the log-probabilities),
  and the draws get strictly increasing timestamps in the order they were drawn.

So an item's appeal to a cluster is a function of features the data exposes (its category, which its
description reveals, and its price): a tower that reads them can place an item it never saw in
training, which an id embedding cannot (``tests/test_features.py``). Prices and descriptions come
from their own random stream, so the interactions of given arguments do not depend on them.

Everything is vectorised over blocks of users; the same arguments always give the same data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from twotower.errors import ConfigError

if TYPE_CHECKING:  # imported lazily at run time
    from twotower.data.readers import Features, Interactions

# 2001-01-01T00:00:00Z, so timestamps look like real Unix seconds.
_EPOCH = 978_307_200
_YEAR = 365 * 86_400
# Cap on the size of one block of Gumbel keys (users x items), in elements.
_BLOCK_ELEMENTS = 2_000_000


@dataclass
class SyntheticData:
    """A synthetic data set plus the ground truth that generated it.

    ``interactions.frame`` has int64 columns ``user``, ``item``, ``timestamp``, sorted by user and
    then by time. Users are ``0..n_users-1`` and items ``0..n_items-1`` (raw ids equal the
    positions in the arrays below). A user with no interactions cannot occur (``lo >= 1``).
    """

    interactions: Interactions
    item_features: Features
    true_item_popularity: np.ndarray  # (n_items,) float64, sums to 1
    user_cluster: np.ndarray  # (n_users,) int64
    item_category: np.ndarray  # (n_items,) int64
    cluster_categories: np.ndarray = field(repr=False, default=None)  # (n_clusters, m) int64
    category_affinity: np.ndarray = field(repr=False, default=None)  # (n_clusters, n_categories)
    item_price: np.ndarray = field(repr=False, default=None)  # (n_items,) float64
    item_description: np.ndarray = field(repr=False, default=None)  # (n_items,) object: space-separated words
    price_factor: np.ndarray = field(repr=False, default=None)  # (n_clusters, n_items): 1 when price_affinity = 0

    @property
    def n_users(self) -> int:
        return int(self.user_cluster.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.item_category.shape[0])

    def true_scores(self, user_ids, include_popularity: bool = True) -> np.ndarray:
        """Ground-truth ``p(item | user)`` for each user in ``user_ids``.

        Returns a float64 array of shape ``(len(user_ids), n_items)`` whose rows sum to 1: the
        distribution of a user's (first) draw. With ``include_popularity=False`` the popularity
        factor is dropped, i.e. rows are ``∝ category_affinity[cluster, category(item)]`` — the
        popularity-debiased relevance that a bias-corrected model should recover the ranking of.
        """
        users = np.asarray(user_ids, dtype=np.int64).reshape(-1)
        if users.size and (users.min() < 0 or users.max() >= self.n_users):
            raise IndexError(f"user ids must lie in [0, {self.n_users}), got {users.min()}..{users.max()}")
        scores = self.category_affinity[self.user_cluster[users]][:, self.item_category]
        if self.price_factor is not None:
            scores = scores * self.price_factor[self.user_cluster[users]]
        if include_popularity:
            scores = scores * self.true_item_popularity[None, :]
        return scores / scores.sum(axis=1, keepdims=True)

    def item_table(self):
        """The item table as a reader's ``Table``: ``item``, ``category`` (its label), ``price`` and
        ``description``, one row per item (what ``[features]`` declarations of the synthetic data
        can name)."""
        from pathlib import Path

        from twotower.data.readers.table import Table

        cols = {"item": pd.Series(np.arange(self.n_items, dtype=np.int64)),
                "category": pd.Series([f"cat {c}" for c in self.item_category.tolist()], dtype=object),
                "price": pd.Series(self.item_price), "description": pd.Series(self.item_description, dtype=object)}
        return Table(Path(self.interactions.source), cols, self.n_items, lambda row: f"item {row}", list(cols))


def _check_counts(interactions_per_user, n_items: int) -> tuple[int, int]:
    if isinstance(interactions_per_user, (int, np.integer)):
        lo = hi = int(interactions_per_user)
    else:
        try:
            lo, hi = (int(v) for v in interactions_per_user)
        except (TypeError, ValueError):
            raise ConfigError(
                f"interactions_per_user must be an int or a (low, high) pair, got {interactions_per_user!r}"
            ) from None
    if lo < 1 or hi < lo:
        raise ConfigError(f"interactions_per_user must satisfy 1 <= low <= high, got ({lo}, {hi})")
    if lo > n_items:
        raise ConfigError(
            f"interactions_per_user low={lo} exceeds n_items={n_items}: a user cannot have more "
            "distinct items than exist. Lower it or raise n_items"
        )
    return lo, min(hi, n_items)


def make_synthetic(
    n_users: int = 2000,
    n_items: int = 1000,
    n_categories: int = 20,
    n_clusters: int = 8,
    interactions_per_user=(10, 60),
    popularity_exponent: float = 1.0,
    seed: int = 0,
    *,
    categories_per_cluster: int | None = None,
    background_affinity: float = 0.05,
    price_affinity: float = 0.0,
    words_per_item: int = 6,
    words_per_category: int = 8,
) -> SyntheticData:
    """Generate a deterministic synthetic data set (see the module docstring for the model).

    ``categories_per_cluster`` defaults to ``ceil(n_categories / n_clusters)``;
    ``background_affinity`` (in ``(0, 1]``) is the weight of a non-preferred category relative to
    a preferred one. ``popularity_exponent=0`` gives uniform popularity. ``price_affinity`` (``>= 0``)
    is how strongly clusters prefer their price level; ``words_per_item`` and
    ``words_per_category`` shape the descriptions.
    """
    from twotower.data.readers import Features, Interactions

    for name, value in (("n_users", n_users), ("n_items", n_items),
                        ("n_categories", n_categories), ("n_clusters", n_clusters)):
        if int(value) < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    n_users, n_items, n_categories, n_clusters = map(int, (n_users, n_items, n_categories, n_clusters))
    if not popularity_exponent >= 0:
        raise ConfigError(f"popularity_exponent must be >= 0, got {popularity_exponent}")
    if not 0 < background_affinity <= 1:
        raise ConfigError(f"background_affinity must be in (0, 1], got {background_affinity}")
    if categories_per_cluster is None:
        categories_per_cluster = math.ceil(n_categories / n_clusters)
    m = int(categories_per_cluster)
    if not 1 <= m <= n_categories:
        raise ConfigError(f"categories_per_cluster must be in [1, {n_categories}], got {categories_per_cluster}")
    lo, hi = _check_counts(interactions_per_user, n_items)
    if not price_affinity >= 0:
        raise ConfigError(f"price_affinity must be >= 0, got {price_affinity}")
    if int(words_per_item) < 1 or int(words_per_category) < 1:
        raise ConfigError(f"words_per_item and words_per_category must be >= 1, got {words_per_item}, {words_per_category}")

    rng = np.random.default_rng(seed)
    frng = np.random.default_rng([seed, 2])  # prices and descriptions: their own stream

    # Items: power-law popularity over a random ranking, balanced categories.
    ranks = rng.permutation(n_items) + 1
    popularity = ranks.astype(np.float64) ** -float(popularity_exponent)
    popularity /= popularity.sum()
    item_category = rng.permutation(np.arange(n_items, dtype=np.int64) % n_categories)

    # Clusters: each prefers m categories.
    cluster_categories = np.sort(
        np.argsort(rng.random((n_clusters, n_categories)), axis=1)[:, :m], axis=1
    ).astype(np.int64)
    affinity = np.full((n_clusters, n_categories), float(background_affinity))
    np.put_along_axis(affinity, cluster_categories, 1.0, axis=1)

    # Users: cluster, number of interactions, first timestamp.
    user_cluster = rng.integers(0, n_clusters, size=n_users, dtype=np.int64)
    counts = rng.integers(lo, hi + 1, size=n_users, dtype=np.int64)
    starts = _EPOCH + rng.integers(0, _YEAR, size=n_users, dtype=np.int64)

    # Prices and descriptions (their own stream), and each cluster's price level.
    z = frng.standard_normal(n_items)
    price = np.round(np.exp(3.0 + z), 2)
    price_pref = frng.standard_normal(n_clusters)
    log_price_factor = -float(price_affinity) * (z[None, :] - price_pref[:, None]) ** 2 / 2  # (n_clusters, n_items)
    own = max(1, round(2 * int(words_per_item) / 3))
    own_words = frng.integers(0, int(words_per_category), size=(n_items, own))
    any_words = frng.integers(0, int(words_per_category), size=(n_items, int(words_per_item) - own))
    description = np.array([" ".join([f"c{k}w{j}" for j in ow] + [f"any{j}" for j in aw])
                            for k, ow, aw in zip(item_category.tolist(), own_words.tolist(), any_words.tolist())], dtype=object)

    log_pop = np.log(popularity)
    cluster_logits = np.log(affinity)[:, item_category] + log_pop[None, :]  # (n_clusters, n_items)
    if price_affinity:
        cluster_logits = cluster_logits + log_price_factor

    block = max(1, _BLOCK_ELEMENTS // n_items)
    users_out, items_out, times_out = [], [], []
    for b0 in range(0, n_users, block):  # loop over blocks of users, not users
        b1 = min(n_users, b0 + block)
        n_b = b1 - b0
        k = int(counts[b0:b1].max())
        keys = cluster_logits[user_cluster[b0:b1]] + rng.gumbel(size=(n_b, n_items))
        if k < n_items:
            top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
        else:
            top = np.broadcast_to(np.arange(n_items), (n_b, n_items))
        # Order the k winners by decreasing key: the order of sequential draws.
        order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        gaps = rng.integers(60, 7 * 86_400, size=(n_b, k), dtype=np.int64)
        times = starts[b0:b1, None] + np.cumsum(gaps, axis=1)
        keep = np.arange(k)[None, :] < counts[b0:b1, None]
        users_out.append(np.broadcast_to(np.arange(b0, b1, dtype=np.int64)[:, None], (n_b, k))[keep])
        items_out.append(top[keep].astype(np.int64))
        times_out.append(times[keep])

    frame = pd.DataFrame({
        "user": np.concatenate(users_out),
        "item": np.concatenate(items_out),
        "timestamp": np.concatenate(times_out),
    })
    source = (
        f"synthetic(n_users={n_users}, n_items={n_items}, n_categories={n_categories}, "
        f"n_clusters={n_clusters}, interactions_per_user=({lo}, {hi}), "
        f"popularity_exponent={popularity_exponent}, seed={seed})"
    )
    interactions = Interactions(frame=frame, source=source)

    cat_names = [f"cat {c}" for c in range(n_categories)]
    item_features = Features(
        ids=np.arange(n_items, dtype=np.int64),
        categorical={"category": [[cat_names[c]] for c in item_category.tolist()]},
        titles=np.array([f"item {i} (cat {c})" for i, c in enumerate(item_category.tolist())], dtype=object),
        source=source,
    )
    return SyntheticData(
        interactions=interactions,
        item_features=item_features,
        true_item_popularity=popularity,
        user_cluster=user_cluster,
        item_category=item_category,
        cluster_categories=cluster_categories,
        category_affinity=affinity,
        item_price=price,
        item_description=description,
        price_factor=np.exp(log_price_factor),
    )
