"""What the readers return: interactions and features with raw ids."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from twotower.config import FeatureSpec

    from .table import Table


@dataclass
class Interactions:
    """User-item interactions with raw ids.

    ``frame`` has columns ``user`` and ``item`` (int64 or str), optionally ``timestamp``
    (int64 or float64) and ``weight`` (float32), and a RangeIndex. Row order is file order.
    """

    frame: pd.DataFrame
    source: str
    table: "Table | None" = None  # a named dataset's columns that context features can read (row = frame row)

    @property
    def has_timestamps(self) -> bool:
        return "timestamp" in self.frame.columns

    def __len__(self) -> int:
        return len(self.frame)


@dataclass
class Features:
    """Features of items or users, keyed by raw id, one entry per row of ``ids``, each feature in
    the form of its declared kind (``specs``; a feature without one is multi_categorical):

    - ``categorical`` (categorical, multi_categorical): per row a list of values as strings (``[]``:
      missing);
    - ``dense``: numeric ``float64 [n]`` (NaN: missing), vector ``float32 [n, D]`` (a row of NaN:
      missing), text ``object [n]`` of ``str`` (``None``: missing).
    """

    ids: np.ndarray
    categorical: dict[str, list[list[str]]]
    titles: np.ndarray | None = None
    source: str = ""
    dense: dict[str, np.ndarray] = field(default_factory=dict)
    specs: dict[str, "FeatureSpec"] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def names(self) -> list[str]:
        """The features in declaration order."""
        return list(self.specs) if self.specs else list(self.categorical) + list(self.dense)
