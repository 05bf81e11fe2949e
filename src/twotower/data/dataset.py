"""The encoded dataset: vocabularies, splits, features and per-user histories.

Everything here is integer arrays indexed by vocabulary position; raw ids live only in the
vocabularies. The training split is stored in *history order* (grouped by user, by time within a
user when timestamps exist), so training pair ``k`` is position ``k`` of ``history("train")`` and its
leakage-free history is simply the positions before it (see ``pair_history``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .vocab import Vocabulary


@dataclass
class CSR:
    """Rows of variable-length integer lists: row ``r`` is ``indices[indptr[r]:indptr[r + 1]]``."""

    indptr: np.ndarray
    indices: np.ndarray

    @classmethod
    def from_pairs(cls, rows: np.ndarray, cols: np.ndarray, n_rows: int, key: np.ndarray | None = None) -> "CSR":
        """Group ``cols`` by ``rows``; within a row order by ``key`` (stable), else by input order."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.lexsort((np.arange(len(rows)), rows)) if key is None else np.lexsort((np.arange(len(rows)), key, rows))
        counts = np.bincount(rows, minlength=n_rows)
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return cls(indptr, np.asarray(cols, dtype=np.int64)[order])

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def row(self, r: int) -> np.ndarray:
        return self.indices[self.indptr[r] : self.indptr[r + 1]]

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Concatenated entries of ``rows`` and the ``offsets`` where each row starts (EmbeddingBag layout)."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, lens = self.indptr[rows], self.indptr[rows + 1] - self.indptr[rows]
        offsets = np.zeros(len(rows), dtype=np.int64)
        np.cumsum(lens[:-1], out=offsets[1:]) if len(rows) > 1 else None
        flat = np.repeat(starts - offsets, lens) + np.arange(lens.sum())
        return self.indices[flat], offsets

    def last(self, rows: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``length`` last entries of each row as a padded ``[len(rows), length]`` array and its mask."""
        rows = np.asarray(rows, dtype=np.int64)
        end = self.indptr[rows + 1]
        pos = end[:, None] - length + np.arange(length)[None, :]
        valid = pos >= self.indptr[rows][:, None]
        return np.where(valid, self.indices[np.clip(pos, 0, max(len(self.indices) - 1, 0))], 0), valid

    def union(self, other: "CSR") -> "CSR":
        """Row-wise concatenation (self's entries first)."""
        la, lb = self.lengths(), other.lengths()
        rows = np.r_[np.repeat(np.arange(self.n_rows), la), np.repeat(np.arange(other.n_rows), lb)]
        key = np.r_[np.zeros(len(self.indices)), np.ones(len(other.indices))]
        return CSR.from_pairs(rows, np.r_[self.indices, other.indices], self.n_rows, key=key)

    def to_dense_mask(self, rows: np.ndarray, n_cols: int) -> torch.Tensor:
        """Boolean ``[len(rows), n_cols]`` tensor, True where the column is in the row."""
        vals, offsets = self.gather(rows)
        lens = self.indptr[np.asarray(rows) + 1] - self.indptr[np.asarray(rows)]
        mask = torch.zeros(len(rows), n_cols, dtype=torch.bool)
        r = torch.from_numpy(np.repeat(np.arange(len(rows)), lens))
        mask[r, torch.from_numpy(vals)] = True
        return mask


@dataclass
class Split:
    """Interactions as vocabulary indices, with each interaction's context features (raw values:
    ``object`` labels or ``None``, ``float64`` numbers or NaN; ``readers.kinds.context_column``)."""

    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray | None = None
    context: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.users)

    def take(self, mask_or_idx) -> "Split":
        return Split(self.users[mask_or_idx], self.items[mask_or_idx],
                     None if self.timestamps is None else self.timestamps[mask_or_idx],
                     None if self.context is None else {k: v[mask_or_idx] for k, v in self.context.items()})

    def csr(self, n_users: int) -> CSR:
        return CSR.from_pairs(self.users, self.items, n_users, key=self.timestamps)

    def first_per_user(self, n_users: int) -> np.ndarray:
        """Each user's first interaction of the split (by time when there are timestamps, else in
        order), as a position into the split; ``-1`` for a user with none."""
        key = self.timestamps if self.timestamps is not None else np.zeros(len(self))
        order = np.lexsort((np.arange(len(self)), key, self.users))
        users = self.users[order]
        first = np.r_[True, users[1:] != users[:-1]] if len(users) else np.zeros(0, dtype=bool)
        out = np.full(n_users, -1, dtype=np.int64)
        out[users[first]] = order[first]
        return out


def concat_splits(a: Split, b: Split) -> Split:
    """``a``'s interactions, then ``b``'s (timestamps and context only when both have them)."""
    ts = None if a.timestamps is None or b.timestamps is None else np.r_[a.timestamps, b.timestamps]
    ctx = None
    if a.context is not None and b.context is not None:
        ctx = {k: np.concatenate([a.context[k], b.context[k]]) for k in a.context}
    return Split(np.r_[a.users, b.users], np.r_[a.items, b.items], ts, ctx)


def _missing_like(arr: np.ndarray, n: int) -> np.ndarray:
    """``n`` rows of the missing value of ``arr``'s form (NaN numbers and vectors, ``None`` texts)."""
    return np.full((n,) + arr.shape[1:], None if arr.dtype == object else np.nan, dtype=arr.dtype)


@dataclass
class EncodedFeatures:
    """Features of items (or users) aligned to the entity vocabulary: row ``i`` is entity ``i``, and
    an entity without a row in the features table has every feature missing.

    - ``values`` / ``rows``: the categorical kinds: every raw value of the table (a vocabulary) and
      per entity the CSR of its value indices (none: missing);
    - ``dense``: the other kinds, one array per feature in ``readers.Features.dense``'s forms;
    - ``specs``: each feature's declaration (``config.FeatureSpec``), in order; a feature without one
      is multi_categorical;
    - ``fit_rows``: the entities whose values fit vocabularies and statistics (the training data's;
      ``None``: all). The encoders fit from these alone (``features.encoders``).
    """

    values: dict[str, Vocabulary]
    rows: dict[str, CSR]
    dense: dict[str, np.ndarray] = field(default_factory=dict)
    specs: dict = field(default_factory=dict)
    fit_rows: np.ndarray | None = None

    @property
    def names(self) -> list[str]:
        return list(self.specs) if self.specs else list(self.values) + list(self.dense)

    def spec(self, name: str):
        """The declaration of ``name`` (a default multi_categorical one for a feature built without)."""
        if name in self.specs:
            return self.specs[name]
        from ..config import FeatureSpec

        return FeatureSpec(name=name, kind="multi_categorical")

    def column(self, name: str):
        """A feature's values per entity: ``(values, rows)`` for the categorical kinds, else its array."""
        return (self.values[name], self.rows[name]) if name in self.values else self.dense[name]

    def cardinalities(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.values.items()}

    def kinds(self) -> dict[str, str]:
        return {n: self.spec(n).kind for n in self.names}

    @classmethod
    def encode(cls, ids: np.ndarray, categorical: dict[str, list[list[str]]], vocab: Vocabulary,
               dense: dict[str, np.ndarray] | None = None, specs: dict | None = None,
               fit_rows: np.ndarray | None = None) -> "EncodedFeatures":
        """Encode a features table keyed by raw ``ids`` against the entity vocabulary ``vocab``;
        entities absent from the table get every feature missing."""
        ent = vocab.encode(ids)
        keep = ent >= 0
        values, rows = {}, {}
        for name, cells in categorical.items():
            lens = np.fromiter((len(c) for c in cells), dtype=np.int64, count=len(cells))
            flat = np.fromiter((str(x) for c in cells for x in c), dtype=object, count=int(lens.sum()))
            owner = np.repeat(ent, lens)
            ok = np.repeat(keep, lens)
            vv = Vocabulary.from_values(flat.astype(str) if len(flat) else np.array([], dtype=str), name=name)
            values[name] = vv
            rows[name] = CSR.from_pairs(owner[ok], vv.encode(flat[ok].astype(str)) if ok.any() else np.array([], np.int64), len(vocab))
        aligned = {}
        for name, arr in (dense or {}).items():
            out = _missing_like(arr, len(vocab))
            out[ent[keep]] = arr[keep]
            aligned[name] = out
        return cls(values, rows, aligned, dict(specs or {}), fit_rows)

    def select(self, names: list[str]) -> "EncodedFeatures":
        return EncodedFeatures({n: self.values[n] for n in names if n in self.values},
                               {n: self.rows[n] for n in names if n in self.rows},
                               {n: self.dense[n] for n in names if n in self.dense},
                               {n: self.specs[n] for n in names if n in self.specs}, self.fit_rows)


@dataclass
class Dataset:
    """Vocabularies, the three splits and the features of one dataset.

    ``train`` is what the model learns from; ``valid`` is carved from the training data for model
    selection; ``test`` is touched once, for the final figure.
    """

    name: str
    users: Vocabulary
    items: Vocabulary
    train: Split
    valid: Split
    test: Split
    item_features: EncodedFeatures | None = None
    user_features: EncodedFeatures | None = None
    item_titles: np.ndarray | None = None
    context: list = field(default_factory=list)  # the context features' declarations (config.FeatureSpec)
    fit_context: dict[str, np.ndarray] | None = None  # the context values that fit the encoders: the training split's
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def has_timestamps(self) -> bool:
        return self.train.timestamps is not None

    def __post_init__(self):
        # Store the training pairs in history order so pair k sits at position k of its user's row.
        order = np.lexsort((np.arange(len(self.train)), self.train.timestamps if self.has_timestamps else np.zeros(len(self.train)), self.train.users))
        self.train = self.train.take(order)
        if self.fit_context is None and self.train.context is not None:
            self.fit_context = self.train.context

    def item_counts(self) -> np.ndarray:
        """Training positives per item (the counts behind p(j) in the logQ correction)."""
        if "counts" not in self._cache:
            self._cache["counts"] = np.bincount(self.train.items, minlength=self.n_items)
        return self._cache["counts"]

    def history(self, upto: str = "train") -> CSR:
        """Per-user items known at a point of the protocol, in time order:
        ``"train"`` (what the model trains on; the input and mask when scoring validation) or
        ``"valid"`` (train + validation; the input and mask when scoring test, and at serving)."""
        if upto not in self._cache:
            tr = self.train.csr(self.n_users)
            if upto == "train":
                self._cache[upto] = tr
            elif upto == "valid":
                self._cache[upto] = concat_splits(self.train, self.valid).csr(self.n_users)
            else:
                raise ValueError(f"history upto must be 'train' or 'valid', got {upto!r}")
        return self._cache[upto]

    def pair_history(self, pairs: np.ndarray, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Leakage-free history of training pairs (indices into ``train``): ``[len(pairs), length]`` items and mask.

        With timestamps: the ``length`` most recent items strictly before the pair in time order.
        Without: up to ``length`` of the user's other training items, sampled at random.
        Either way the pair's own target item is never in it (also when the user repeats an item).
        """
        pairs = np.asarray(pairs, dtype=np.int64)
        h = self.history("train")
        u = self.train.users[pairs]
        start = h.indptr[u]
        pos = pairs - start  # the pair's position in its user's row
        n = h.indptr[u + 1] - start
        j = np.arange(length)[None, :]
        if self.has_timestamps:
            p = pos[:, None] - length + j
            valid = p >= 0
        else:
            others = (n - 1)[:, None]
            p = np.where(others <= length, j, np.floor(rng.random((len(pairs), length)) * np.maximum(others, 1)).astype(np.int64))
            p = p + (p >= pos[:, None])  # skip the pair itself
            valid = np.where(others <= length, j < others, others > 0)
        items = h.indices[np.clip(start[:, None] + p, 0, max(len(h.indices) - 1, 0))]
        valid = valid & (items != self.train.items[pairs][:, None])
        return np.where(valid, items, 0), valid

    def with_valid_in_train(self) -> "Dataset":
        """The same dataset with the validation part folded back into training (for a final refit
        once validation has chosen the number of epochs)."""
        merged = concat_splits(self.train, self.valid)
        empty = self.valid.take(np.zeros(len(self.valid), dtype=bool))
        # The features keep what fitted them (the training split's entities and context), so that the
        # refit's encoders are the ones the run directory already holds.
        return Dataset(self.name, self.users, self.items, merged, empty, self.test, self.item_features,
                       self.user_features, self.item_titles, self.context, self.fit_context)

    def summary(self) -> dict:
        return {
            "name": self.name, "users": self.n_users, "items": self.n_items,
            "train": len(self.train), "valid": len(self.valid), "test": len(self.test),
            "timestamps": self.has_timestamps,
            "item_features": self.item_features.cardinalities() if self.item_features else {},
            "user_features": self.user_features.cardinalities() if self.user_features else {},
            "feature_kinds": {"item": self.item_features.kinds() if self.item_features else {},
                              "user": self.user_features.kinds() if self.user_features else {},
                              "context": {s.name: s.kind for s in self.context}},
        }


def encode_interactions(frame: pd.DataFrame, users: Vocabulary, items: Vocabulary) -> Split:
    ts = frame["timestamp"].to_numpy(dtype=np.float64) if "timestamp" in frame else None
    ctx = {c[len("context:"):]: frame[c].to_numpy() for c in frame.columns if str(c).startswith("context:")}
    return Split(users.encode(frame["user"].to_numpy()), items.encode(frame["item"].to_numpy()), ts, ctx or None)
