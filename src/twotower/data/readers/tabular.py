"""``read_interactions`` and ``read_features``: a table file (CSV/TSV or Parquet) to raw-id columns."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from twotower.errors import DataError

from .columns import cell_missing, show_id, to_ids, to_numbers
from .delimited import load_delimited
from .files import check_file, is_parquet
from .kinds import context_column, feature_column
from .parquet import load_parquet
from .records import Features, Interactions
from .table import Table


def load_table(
    path: Path,
    wanted: list[tuple[str, str, str]],
    *,
    sep: str | None,
    encoding: str,
) -> Table:
    """Load the columns ``wanted`` = [(column name, role, parameter name)] from a file."""
    check_file(path)
    names = list(dict.fromkeys(col for col, _, _ in wanted))
    if is_parquet(path):
        return load_parquet(path, wanted, names)
    return load_delimited(path, wanted, names, sep=sep, encoding=encoding)


_TIME_FIX = "timestamps must be numbers (e.g. unix seconds); convert dates or drop the row"
_WEIGHT_FIX = "weights must be finite numbers; fix or drop the row"


def read_interactions(
    path,
    user_col: str = "user",
    item_col: str = "item",
    time_col: str | None = None,
    weight_col: str | None = None,
    sep: str | None = None,
    encoding: str = "utf-8",
    context=(),
) -> Interactions:
    """Read user-item interactions from CSV/TSV (header row required; ``.gz`` ok) or Parquet.

    The separator is a tab for ``.tsv``; otherwise it is sniffed from the header line (tab or
    comma) unless ``sep`` is given. Extra columns are ignored; duplicate rows are kept.
    ``context``: declarations of context features (``config.FeatureSpec``), read per interaction
    into columns ``context:NAME`` (``context_frame``); one with ``derive`` and no column reads
    ``time_col``.
    """
    path = Path(path)
    wanted = [(user_col, "user", "user_col"), (item_col, "item", "item_col")]
    if time_col is not None:
        wanted.append((time_col, "timestamp", "time_col"))
    if weight_col is not None:
        wanted.append((weight_col, "weight", "weight_col"))
    context = [with_time_column(s, time_col) for s in context]
    wanted += [(s.source_column, "context feature", "column") for s in context]
    table = load_table(path, wanted, sep=sep, encoding=encoding)
    data = {
        "user": to_ids(table, user_col, "user", "user_col"),
        "item": to_ids(table, item_col, "item", "item_col"),
    }
    if time_col is not None:
        data["timestamp"] = to_numbers(table, time_col, "timestamp", _TIME_FIX)
    if weight_col is not None:
        weights = to_numbers(table, weight_col, "weight", _WEIGHT_FIX)
        data["weight"] = weights.astype(np.float32)
    data.update(context_frame(table, context))
    return Interactions(_frame(data), str(path))


def with_time_column(spec, time_col: str | None):
    """A context declaration that derives from the time and names no column reads ``time_col``."""
    if spec.derive is not None and spec.column is None:
        if time_col is None:
            from twotower.errors import ConfigError

            raise ConfigError(f"features.context {spec.name!r}: derive = {spec.derive!r} reads the timestamp; set "
                              "data.time_col, or the feature's column")
        return spec.model_copy(update={"column": time_col})
    return spec


def context_frame(table: Table, context) -> dict[str, np.ndarray]:
    """The columns ``context:NAME`` of the interactions frame: each context feature read from ``table``
    (``kinds.context_column``), row for row."""
    return {f"context:{s.name}": context_column(table, s) for s in context}


def _frame(data: dict[str, np.ndarray]) -> pd.DataFrame:
    """Build the frame keeping str ids as object dtype (pandas 3 would infer its "str" dtype)."""
    return pd.DataFrame(
        {k: pd.Series(v, dtype=object) if v.dtype == object else v for k, v in data.items()}
    )


def read_features(
    path,
    id_col: str,
    columns: list[str],
    multi_valued: dict[str, str] | None = None,
    title_col: str | None = None,
    known_ids=None,
    kind: str = "item",
    sep: str | None = None,
    encoding: str = "utf-8",
    specs=None,
) -> Features:
    """Read a table of item (or user) features keyed by ``id_col``.

    ``specs`` (``config.FeatureSpec`` declarations): each feature's column read as its kind
    (``kinds.feature_column``; a vector with its own ``file`` is not in the table). Without them,
    the older form: ``columns`` are categorical features kept as strings; ``multi_valued`` maps a
    column to the separator between values inside its cells (e.g. ``{"genres": "|"}``); columns
    named only in ``multi_valued`` are read as well. Empty cells give ``[]``. Ids must be unique.
    If ``known_ids`` is given, every id must be among them.
    """
    path = Path(path)
    param = "column"  # the message for a missing column names the declaration's key
    if specs is None:
        from twotower.config import FeatureSpec

        param = "columns"

        multi_valued = dict(multi_valued or {})
        specs = [FeatureSpec(name=c, kind="multi_categorical" if c in multi_valued else "categorical",
                             **({"separator": multi_valued[c]} if c in multi_valued else {}))
                 for c in dict.fromkeys(list(columns) + list(multi_valued))]
    specs = [s for s in specs if not (s.kind == "vector" and s.file)]
    wanted = [(id_col, f"{kind} id", "id_col")]
    wanted += [(s.source_column, f"{kind} feature", param) for s in specs]
    if title_col is not None:
        wanted.append((title_col, f"{kind} title", "title_col"))
    table = load_table(path, wanted, sep=sep, encoding=encoding)
    ids = to_ids(table, id_col, kind, "id_col")

    # Unique ids.
    dup = pd.Series(ids).duplicated(keep=False).to_numpy()
    if dup.any():
        rows = np.flatnonzero(dup)
        first_val = ids[rows[0]]
        same = rows[ids[rows] == first_val]
        places = " and ".join(table.locate(int(r)) for r in same[:2])
        raise DataError(
            path,
            f"{kind} id {show_id(first_val)} appears more than once ({places}); "
            f"repeated ids in all: {int(pd.Series(ids[rows]).nunique())}",
            f"keep one row per {kind} id",
            where=table.locate(int(same[1])),
        )

    if known_ids is not None:
        _check_known(table, ids, known_ids, kind, id_col)

    titles = None
    if title_col is not None:
        t = table.columns[title_col]
        titles = np.asarray(
            [("" if cell_missing(v) else str(v)) for v in t.to_numpy(dtype=object)],
            dtype=object,
        )
    return features_from_table(table, ids, specs, kind, titles)


def features_from_table(table: Table, ids: np.ndarray, specs, source: str, titles: np.ndarray | None = None) -> Features:
    """The declared features of a table's rows (``ids``), each read as its kind."""
    categorical: dict[str, list[list[str]]] = {}
    dense: dict[str, np.ndarray] = {}
    for s in specs:
        col = feature_column(table, s, source)
        (categorical if s.kind in ("categorical", "multi_categorical") else dense)[s.name] = col
    return Features(ids=ids, categorical=categorical, titles=titles, source=str(table.path), dense=dense,
                    specs={s.name: s for s in specs})


def _check_known(table: Table, ids: np.ndarray, known_ids, kind: str, id_col: str) -> None:
    known = np.asarray(known_ids if not isinstance(known_ids, pd.Index) else known_ids.to_numpy())
    if known.dtype.kind in "iu" and ids.dtype.kind in "iu":
        ok = np.isin(ids, known)
    else:
        ok = np.isin(ids.astype(str), known.astype(str))
    if not ok.all():
        bad = np.flatnonzero(~ok)
        row = int(bad[0])
        raise DataError(
            table.path,
            f"{kind} id {show_id(ids[row])} is not among the known {kind} ids "
            f"(unknown ids in all: {len(bad)})",
            f"drop rows of {kind}s that are not in the interactions, or check the id column "
            f"(id_col={id_col!r})",
            where=table.locate(row),
        )
