"""Id vocabularies: raw id <-> contiguous index.

Raw ids go in and come out everywhere a user sees ids; indices are internal. Integer raw ids stay
integers (so ``--user 196`` finds MovieLens user 196), anything else is a string.
"""
from __future__ import annotations

import json
from typing import Iterable

import numpy as np
import pandas as pd


class Vocabulary:
    """An ordered set of raw ids; index ``i`` is the ``i``-th id."""

    def __init__(self, ids: Iterable, name: str = "id"):
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        if arr.dtype.kind in "iu":
            arr = arr.astype(np.int64)
        elif arr.dtype.kind != "O":
            arr = arr.astype(object)
        self.ids = arr
        self.name = name
        self._index = pd.Index(arr)
        if not self._index.is_unique:
            raise ValueError(f"{name} vocabulary has duplicate ids")

    @classmethod
    def from_values(cls, values: np.ndarray, name: str = "id") -> "Vocabulary":
        """Vocabulary of the distinct values, sorted (so it does not depend on row order)."""
        return cls(np.unique(np.asarray(values)), name=name)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def is_integer(self) -> bool:
        return self.ids.dtype.kind in "iu"

    def coerce(self, raw) -> np.ndarray:
        """Convert user-supplied raw ids (maybe strings from a CLI or JSON) to this vocabulary's type."""
        arr = np.asarray(raw if isinstance(raw, (list, tuple, np.ndarray)) else [raw], dtype=object)
        if self.is_integer:
            out = np.empty(len(arr), dtype=np.int64)
            ok = np.ones(len(arr), dtype=bool)
            for k, v in enumerate(arr):  # small inputs only (request-sized)
                try:
                    out[k] = int(v)
                except (TypeError, ValueError, OverflowError):  # not an integer, or beyond int64: unknown
                    ok[k], out[k] = False, -1
            return np.where(ok, out, np.iinfo(np.int64).min)
        return np.array([str(v) for v in arr], dtype=object)

    def encode(self, raw, strict: bool = False) -> np.ndarray:
        """Raw ids -> indices; unknown ids give -1 (or raise KeyError when ``strict``)."""
        values = np.asarray(raw)
        if values.dtype.kind not in "iu" or not self.is_integer:
            values = self.coerce(values)
        idx = self._index.get_indexer(values)
        if strict and (idx < 0).any():
            unknown = values[idx < 0][:5].tolist()
            raise KeyError(f"unknown {self.name} id(s): {unknown}")
        return idx.astype(np.int64)

    def decode(self, idx) -> np.ndarray:
        return self.ids[np.asarray(idx, dtype=np.int64)]

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "ids": self.ids.tolist()})

    @classmethod
    def from_json(cls, text: str) -> "Vocabulary":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, d: dict) -> "Vocabulary":
        ids = d["ids"]
        if ids and all(isinstance(x, int) for x in ids):
            arr = np.asarray(ids, dtype=np.int64)
        else:
            arr = np.asarray(ids, dtype=object)
        return cls(arr, name=d.get("name", "id"))

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and len(self) == len(other) and bool(np.all(self.ids == other.ids))
