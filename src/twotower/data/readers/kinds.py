"""A feature column read as its declared kind (``config.FeatureSpec``): the cells of one column of a
table become what the kind's encoder reads, and a cell that does not fit the kind is refused with
the file, the row, the value and what to do. Nothing here guesses a kind from the values.

- categorical: one value per row (a string; numbers are written as they read, ``3.0`` as ``3``);
- multi_categorical: several (a list cell, or a text cell split at ``separator``, default ``|``);
- numeric: a finite number; an empty cell, NaN or an infinite value is missing;
- vector: a list of numbers (a Parquet list cell, or ``"0.1 0.2 ..."`` / ``"[0.1, 0.2, ...]"`` in a
  text file), every row of one length;
- text: a string (undecodable bytes refused); an empty cell is missing.

Missing values are kept as such (``[]``, NaN, a NaN row, ``None``) unless the declaration says
``missing = "error"``, when they are refused here.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from twotower.errors import DataError

from .columns import cell_missing
from .table import Table

WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MISSING_TEXT = {"", "nan", "-nan", "na", "n/a", "#n/a", "null", "none", "<na>"}
_LIST_LIKE = (list, tuple, np.ndarray)


def _where(spec, source: str) -> str:
    return f"features.{source} {spec.name!r}"


def _missing_error(table: Table, spec, source: str, rows: np.ndarray, col: str) -> DataError:
    row = int(rows[0])
    return DataError(table.path, f"{spec.kind} feature {spec.name!r} is missing in column {col!r} ({len(rows)} row(s) "
                                 f"like it) and its declaration says missing = \"error\"",
                     f"fill in the value, or declare {_where(spec, source)} with missing = \"learn\" (a missing value "
                     "then gets a learned embedding of its own)", where=table.locate(row))


def _category(value) -> str:
    """A value as a category label: a float that is an integer reads as one (Parquet turns an integer
    column with nulls into floats)."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8")
    return str(value).strip()


def categorical_column(table: Table, spec, source: str) -> list[list[str]]:
    """Per row the list of the feature's values (``[]``: missing)."""
    col = spec.source_column
    sep = (spec.separator or "|") if spec.kind == "multi_categorical" else None
    out: list[list[str]] = []
    for row, value in enumerate(table.columns[col].to_numpy(dtype=object)):
        try:
            if isinstance(value, _LIST_LIKE):
                vals = [_category(v) for v in value if not cell_missing(v)]
            elif cell_missing(value):
                vals = []
            elif sep is not None:
                vals = [v.strip() for v in _category(value).split(sep) if v.strip()]
            else:
                vals = [_category(value)]
        except UnicodeDecodeError:
            raise DataError(table.path, f"column {col!r} holds bytes that are not UTF-8 text", "write the column as text "
                            "(UTF-8)", where=table.locate(row)) from None
        vals = [v for v in vals if v]
        if sep is None and len(vals) > 1:
            raise DataError(table.path, f"column {col!r} holds {len(vals)} values in one row ({vals[:3]}) but feature "
                                        f"{spec.name!r} is declared categorical (one value per row)",
                            f"declare {_where(spec, source)} with kind = \"multi_categorical\"", where=table.locate(row))
        out.append(vals)
    if spec.missing == "error":
        empty = np.flatnonzero([not v for v in out])
        if len(empty):
            raise _missing_error(table, spec, source, empty, col)
    return out


def _numbers(table: Table, spec, source: str, col: str) -> np.ndarray:
    """A column as float64, NaN where missing or not finite; a cell that is not a number is refused."""
    series = table.columns[col]
    if pd.api.types.is_bool_dtype(series.dtype):
        raise DataError(table.path, f"column {col!r} holds true/false values, not numbers, but feature {spec.name!r} is "
                                    "declared numeric", f"declare {_where(spec, source)} with kind = \"categorical\"",
                        where="schema")
    if pd.api.types.is_numeric_dtype(series.dtype):
        return np.array(series.to_numpy(dtype=np.float64, na_value=np.nan), dtype=np.float64)  # a copy: set below
    values = series.to_numpy(dtype=object)
    out = np.full(len(values), np.nan)
    for row, v in enumerate(values):
        if cell_missing(v) or v is pd.NA:
            continue
        if isinstance(v, (bool, np.bool_)) or isinstance(v, _LIST_LIKE) or isinstance(v, (bytes, bytearray)):
            bad = True
        elif isinstance(v, (int, float, np.integer, np.floating)):
            out[row] = float(v)
            continue
        else:
            text = str(v).strip()
            if text.lower() in _MISSING_TEXT:
                continue
            try:
                out[row] = float(text)
                continue
            except ValueError:
                bad = True
        if bad:
            shown = repr(v) if not isinstance(v, _LIST_LIKE) else f"a list of {len(v)} values"
            raise DataError(table.path, f"value {shown[:60]} in column {col!r} is not a number, but feature "
                                        f"{spec.name!r} is declared numeric",
                            f"fix the value, or declare {_where(spec, source)} with the column's kind (categorical "
                            "for labels, text for free text)", where=table.locate(row))
    return out


def numeric_column(table: Table, spec, source: str) -> np.ndarray:
    """float64 per row; NaN where the value is missing or not finite (a value of its own)."""
    col = spec.source_column
    values = _numbers(table, spec, source, col)
    values[~np.isfinite(values)] = np.nan
    if spec.missing == "error":
        missing = np.flatnonzero(np.isnan(values))
        if len(missing):
            raise _missing_error(table, spec, source, missing, col)
    if spec.transform == "log1p":
        low = np.flatnonzero(values <= -1)
        if len(low):
            raise DataError(table.path, f"value {values[low[0]]!r} in column {col!r}: log1p needs values above -1 "
                                        f"({len(low)} row(s) at or below)",
                            f"use transform = \"standardize\" or \"quantile\" for {_where(spec, source)}, or fix the value",
                            where=table.locate(int(low[0])))
    return values


def _vector_cell(value) -> np.ndarray | None:
    """A cell as a float vector, ``None`` when missing; ``ValueError`` when it is not a list of numbers."""
    if isinstance(value, _LIST_LIKE):
        return np.asarray(value, dtype=np.float64) if len(value) else None
    if cell_missing(value):
        return None
    text = str(value).strip().strip("[]()")
    if not text.strip():
        return None
    return np.asarray([float(x) for x in re.split(r"[\s,;]+", text.strip()) if x], dtype=np.float64)


def vector_column(table: Table, spec, source: str) -> np.ndarray:
    """float32 ``[n, D]``; a missing row is all NaN. Every vector must have one length: the declared
    ``length``, else the first vector's."""
    col = spec.source_column
    values = table.columns[col].to_numpy(dtype=object)
    rows: list[np.ndarray | None] = []
    length, first = spec.length, None
    for row, v in enumerate(values):
        try:
            vec = _vector_cell(v)
        except (TypeError, ValueError):
            raise DataError(table.path, f"value {str(v)[:60]!r} in column {col!r} is not a list of numbers, but feature "
                                        f"{spec.name!r} is declared a vector",
                            "write each vector as a list of numbers (a Parquet list column, or \"0.1 0.2 ...\" in a "
                            "CSV/TSV cell)", where=table.locate(row)) from None
        if vec is not None:
            if length is None:
                length, first = len(vec), row
            if len(vec) != length:
                said = f"the declared length of {_where(spec, source)}" if spec.length else \
                    f"the length of the first vector, at {table.locate(first)}"
                raise DataError(table.path, f"vector of length {len(vec)} in column {col!r}, expected {length} ({said})",
                                "give every row a vector of the same length (or leave the cell empty: missing)",
                                where=table.locate(row))
            if not np.isfinite(vec).all():
                raise DataError(table.path, f"vector in column {col!r} holds a non-finite number (NaN or infinity)",
                                "fix the vector, or leave the cell empty (a missing vector)", where=table.locate(row))
        rows.append(vec)
    out = np.full((len(rows), length or 0), np.nan, dtype=np.float32)
    present = [r for r, v in enumerate(rows) if v is not None]
    if present:
        out[present] = np.stack([rows[r] for r in present]).astype(np.float32)
    if not present:
        raise DataError(table.path, f"column {col!r} holds no vector (feature {spec.name!r})",
                        "check the column, or remove the declaration")
    if spec.missing == "error":
        missing = np.flatnonzero([v is None for v in rows])
        if len(missing):
            raise _missing_error(table, spec, source, missing, col)
    return out


def text_column(table: Table, spec, source: str) -> np.ndarray:
    """object ``[n]``: the text of each row, ``None`` when missing."""
    col = spec.source_column
    series = table.columns[col]
    if pd.api.types.is_numeric_dtype(series.dtype) or pd.api.types.is_bool_dtype(series.dtype):
        raise DataError(table.path, f"column {col!r} holds {series.dtype} values, not text, but feature {spec.name!r} is "
                                    "declared text", f"declare {_where(spec, source)} with the column's kind (numeric "
                                                     "or categorical), or point column at a text column", where="schema")
    values = series.to_numpy(dtype=object)
    out = np.empty(len(values), dtype=object)
    for row, v in enumerate(values):
        if isinstance(v, (bytes, bytearray)):
            try:
                v = bytes(v).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(table.path, f"text in column {col!r} holds bytes that are not UTF-8 (byte 0x"
                                            f"{bytes(v)[exc.start:exc.start + 1].hex()} at offset {exc.start})",
                                "write the column as UTF-8 text", where=table.locate(row)) from None
        if isinstance(v, _LIST_LIKE) or isinstance(v, (bool, np.bool_)):
            raise DataError(table.path, f"value {str(v)[:60]!r} in column {col!r} is not text, but feature {spec.name!r} "
                                        "is declared text", "write the column as strings", where=table.locate(row))
        out[row] = None if cell_missing(v) or v is pd.NA else str(v)
    if spec.missing == "error":
        missing = np.flatnonzero([x is None for x in out])
        if len(missing):
            raise _missing_error(table, spec, source, missing, col)
    return out


def feature_column(table: Table, spec, source: str):
    """The column of ``spec`` read as its kind: a list of value lists (categorical kinds) or an array."""
    if spec.kind in ("categorical", "multi_categorical"):
        return categorical_column(table, spec, source)
    return {"numeric": numeric_column, "vector": vector_column, "text": text_column}[spec.kind](table, spec, source)


# ---- context: per interaction ----------------------------------------------------------------------
def derived_time(seconds: np.ndarray, derive: str) -> np.ndarray:
    """The hour of day (``"0"`` ... ``"23"``) or day of week (``"Mon"`` ... ``"Sun"``) of unix seconds
    (UTC), ``None`` where the time is missing."""
    out = np.full(len(seconds), None, dtype=object)
    ok = np.isfinite(seconds)
    s = np.floor(seconds[ok]).astype(np.int64)
    if derive == "hour":
        labels = np.array([str(h) for h in range(24)], dtype=object)
        out[ok] = labels[(s // 3600) % 24]
    else:  # 1970-01-01 was a Thursday
        out[ok] = np.array(WEEKDAYS, dtype=object)[(s // 86400 + 3) % 7]
    return out


def context_column(table: Table, spec) -> np.ndarray:
    """A context feature of every interaction: ``object [n]`` of one label or ``None`` (categorical,
    derived included), or ``float64 [n]`` with NaN (numeric)."""
    if spec.derive is not None:
        seconds = _numbers(table, spec, "context", spec.source_column)
        out = derived_time(seconds, spec.derive)
        if spec.missing == "error":
            missing = np.flatnonzero([x is None for x in out])
            if len(missing):
                raise _missing_error(table, spec, "context", missing, spec.source_column)
        return out
    if spec.kind == "numeric":
        return numeric_column(table, spec, "context")
    lists = categorical_column(table, spec, "context")
    out = np.empty(len(lists), dtype=object)
    out[:] = [v[0] if v else None for v in lists]
    return out


# ---- vectors keyed by id: a .npy file of records -------------------------------------------------------
def read_vector_file(path: Path, spec, source: str) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, vectors float32 [n, D])`` from a ``.npy`` file holding a structured array with fields
    ``id`` (integer or string) and ``vector`` (``D`` floats), e.g.::

        rec = np.zeros(n, dtype=[("id", np.int64), ("vector", np.float32, (D,))])
        rec["id"], rec["vector"] = ids, vectors
        np.save("item_vectors.npy", rec)
    """
    from .files import check_file

    check_file(path)
    layout = ("save a structured array with fields 'id' and 'vector': rec = np.zeros(n, dtype=[('id', np.int64), "
              "('vector', np.float32, (D,))]); rec['id'], rec['vector'] = ids, vectors; np.save(path, rec)")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(path, f"cannot read it as a .npy array ({str(exc)[:120]})", layout) from None
    names = arr.dtype.names or ()
    if "id" not in names or "vector" not in names:
        raise DataError(path, f"holds an array of dtype {arr.dtype} and shape {arr.shape}, not records with fields "
                              "'id' and 'vector'", layout)
    vec_dtype = arr.dtype["vector"]
    if vec_dtype.subdtype is None or vec_dtype.subdtype[0].kind not in "fiu" or len(vec_dtype.subdtype[1]) != 1:
        raise DataError(path, f"field 'vector' has dtype {vec_dtype}, not a fixed-length vector of numbers", layout)
    length = int(vec_dtype.subdtype[1][0])
    if spec.length is not None and length != spec.length:
        raise DataError(path, f"vectors of length {length}, expected {spec.length} (the declared length of "
                              f"{_where(spec, source)})", "write vectors of the declared length, or change length",
                        where="every row (field 'vector')")
    vectors = np.asarray(arr["vector"], dtype=np.float32).reshape(len(arr), length)
    bad = np.flatnonzero(~np.isfinite(vectors).all(1))
    if len(bad):
        raise DataError(path, f"the vector of id {arr['id'][bad[0]]!r} holds a non-finite number ({len(bad)} such rows)",
                        "fix those vectors, or leave their ids out (a missing vector)", where=f"row {int(bad[0])}")
    ids = arr["id"]
    ids = ids.astype(np.int64) if ids.dtype.kind in "iu" else ids.astype(str).astype(object)
    dup = pd.Series(ids).duplicated().to_numpy()
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        raise DataError(path, f"id {ids[row]!r} has two vectors", "keep one row per id", where=f"row {row}")
    return ids, vectors
