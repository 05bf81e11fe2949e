"""What the readers return: interactions and features with raw ids."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass
class Interactions:
    """User-item interactions with raw ids.

    ``frame`` has columns ``user`` and ``item`` (int64 or str), optionally ``timestamp``
    (int64 or float64) and ``weight`` (float32), and a RangeIndex. Row order is file order.
    """

    frame: pd.DataFrame
    source: str

    @property
    def has_timestamps(self) -> bool:
        return "timestamp" in self.frame.columns

    def __len__(self) -> int:
        return len(self.frame)


@dataclass
class Features:
    """Features of items or users, keyed by raw id."""

    ids: np.ndarray
    categorical: dict[str, list[list[str]]]
    titles: np.ndarray | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.ids)
