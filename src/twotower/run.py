"""A trained run directory, loaded: config, vocabularies, model, known items per user.

``Run`` is what evaluation, offline recommendation (and serving) start from; it needs no data
files, only the run directory, which it reads through ``run_dir.RunDir`` (the owner of the format).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .data.dataset import CSR
from .errors import ArtifactError
from .evaluation.ranking import top_k_blocks
from .model.scoring import ServedScore
from .model.towers import TwoTowerModel, embed_items
from .run_dir import RunDir
from .data.popularity import log_popularity


class Run:
    """A run directory written by ``twotower train``.

    Scores, here as in the CLI and the HTTP service, are the served score
    ``<f(u), g(j)> / tau + b_j - alpha * log p(j)`` (``model.scoring``; ``alpha = 0`` here)."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.dir = RunDir(path)
        self.path = self.dir.path
        self.dir.check_is_dir()
        if verify:
            self.dir.verify()
        self.config = self.dir.read_config()
        self.users, self.items = self.dir.read_vocabularies()
        known = self.dir.read_known()
        self.known, self.item_counts, self.test_users = known.history, known.item_counts, known.test_users
        self.titles = self.dir.read_titles()
        weights = self.dir.read_weights()
        features = self.dir.read_features()
        if any("spec" not in entry for entries in features.meta.values() for entry in entries):
            raise ArtifactError(f"{self.path}: its feature state was written by an earlier version of twotower (before "
                                "feature declarations, out-of-vocabulary and missing values); train the run again")
        self.model = TwoTowerModel.from_state(len(self.users), len(self.items), self.config.model, features)
        try:
            self.model.load_state_dict(weights)
        except RuntimeError as e:
            raise ArtifactError(f"{self.dir.weights_path}: weights do not match the run's config "
                                f"({str(e).splitlines()[0]})") from None
        self.model.eval()
        self._item_vecs: torch.Tensor | None = None
        self._log_p: np.ndarray | None = None

    @property
    def item_vectors(self) -> torch.Tensor:
        """``g(j)`` of every item (computed once)."""
        if self._item_vecs is None:
            self._item_vecs = embed_items(self.model)
        return self._item_vecs

    @property
    def activity(self):
        """When each user and item was last touched by new interactions, and which are retired
        (``run_dir.Activity``; ``twotower update`` with ``update.retire_after``)."""
        if not hasattr(self, "_activity"):
            self._activity = self.dir.read_activity(len(self.users), len(self.items))
        return self._activity

    @property
    def log_popularity(self) -> np.ndarray:
        """``log p(j)`` of every item, the popularity the served score corrects by (add-one
        smoothed share of training positives)."""
        if self._log_p is None:
            self._log_p = log_popularity(self.item_counts)
        return self._log_p

    def metrics(self) -> dict:
        return self.dir.read_metrics()

    def recommend(self, users, k: int = 10, exclude_seen: bool = True, batch_users: int = 1024) -> pd.DataFrame:
        """Top-k items for known users (raw ids in, raw ids out): columns ``user, item, score, rank``,
        ``score`` the served score (``<f(u), g(j)> / tau + b_j``, as ``twotower recommend`` and the
        service report it).

        Every item the user has in the training data (validation part included) is excluded, and
        so is every retired item (``update.retire_after``). Unknown user ids raise ``KeyError``.
        """
        idx = self.users.encode(np.asarray(users), strict=True)
        frames = []
        hist_len = self.config.model.history_length
        score = ServedScore.of(self.model).without(self.activity.items_retired, len(self.items))
        for block, scores, items in top_k_blocks(self.model, idx, self.known, self.known if exclude_seen else None, k,
                                                hist_len, batch_users, self.item_vectors, score=score):
            kk = items.shape[1]
            s = scores.numpy().ravel()
            ok = np.isfinite(s)  # a user who has seen almost everything gets fewer than k items
            frames.append(pd.DataFrame({
                "user": np.repeat(self.users.decode(block), kk)[ok],
                "item": self.items.decode(items.numpy().ravel())[ok],
                "score": s[ok],
                "rank": np.tile(np.arange(1, kk + 1), len(block))[ok],
            }))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["user", "item", "score", "rank"])

    # ---- for the page of `twotower serve` ----------------------------------------------------------
    def heldout(self) -> tuple[CSR, CSR] | None:
        """Each user's validation and test items as two CSRs over the user vocabulary, or ``None``
        for a run trained before they were stored."""
        if not hasattr(self, "_heldout"):
            self._heldout = self.dir.read_heldout()
        return self._heldout

    def epoch_records(self) -> list[dict]:
        """The per-epoch records (loss, seconds, ``valid/<metric>``), oldest first."""
        return self.dir.read_epochs()

    def title(self, item_raw) -> str | None:
        if self.titles is None:
            return None
        i = self.items.encode([item_raw])[0]
        return None if i < 0 else self.titles[i]

    def history_of(self, user_raw) -> np.ndarray:
        u = self.users.encode([user_raw], strict=True)[0]
        return self.items.decode(self.known.row(u))

    # ---- item categories (serving-time filters) ---------------------------------------------------
    def item_feature_values(self) -> dict[str, list]:
        """The values of each item feature of the item tower that has a vocabulary (a category
        filter can name them); ``{}`` when the item tower has none."""
        feats = self.model.item_tower.features
        return {} if feats is None else feats.categories()

    def item_category_items(self, feature: str, value) -> np.ndarray:
        """Sorted indices of the items whose ``feature`` includes ``value`` (multi-valued features
        such as genres count every value). Raises ``KeyError`` naming the known features or values."""
        values = self.item_feature_values()
        if feature not in values:
            raise KeyError(f"item feature {feature!r} is not in this model; known: {sorted(values) or 'none'}")
        return self.model.item_tower.features[feature].entities_with(value)
