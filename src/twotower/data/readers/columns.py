"""Column conversions: raw ids (int64 when every id is an integer literal, else str) and numbers
(timestamps, weights), with every empty, missing or non-finite value reported at its row."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from twotower.errors import DataError

from .table import CONFIG_KEYS, Table

_INT_ID_RE = r"^(0|-?[1-9][0-9]*)$"
_MISSING_MARKERS = pa.array(["nan", "-nan", "na", "n/a", "#n/a", "null", "none", "<na>"])


def trimmed_strings(series: pd.Series) -> pa.Array:
    """A text column as a pyarrow string array with surrounding whitespace trimmed."""
    values = series.to_numpy(dtype=object)
    try:
        arr = pa.array(values, type=pa.string(), from_pandas=True)
    except (pa.ArrowException, TypeError):
        arr = pa.array(
            [None if cell_missing(v) else str(v) for v in values], type=pa.string()
        )
    return pc.utf8_trim_whitespace(arr)


def _missing_mask(arr: pa.Array) -> np.ndarray:
    empty = pc.or_kleene(pc.is_null(arr), pc.equal(pc.utf8_length(arr), 0))
    return pc.fill_null(empty, True).to_numpy(zero_copy_only=False)


def to_ids(
    table: Table, col: str, role: str, param: str, *, require_int: bool = False
) -> np.ndarray:
    """Convert an id column: int64 when every id is an integer literal, else object str."""
    path, series = table.path, table.columns[col]
    dtype = series.dtype

    def empty_error(missing: np.ndarray) -> DataError:
        row = int(np.flatnonzero(missing)[0])
        return DataError(
            path,
            f"{role} id is empty in column {col!r} ({int(missing.sum())} empty in all)",
            f"fill in the {role} id or drop the row(s)",
            where=table.locate(row),
        )

    if pd.api.types.is_bool_dtype(dtype):
        raise DataError(
            path,
            f"column {col!r} holds true/false values, not {role} ids",
            f"map the {role} id column with {param}=... "
            f"(config: data.{CONFIG_KEYS.get((f'{role} id', param), param)})",
            where="schema",
        )
    if pd.api.types.is_integer_dtype(dtype):
        return series.to_numpy().astype(np.int64, copy=False)
    if pd.api.types.is_float_dtype(dtype):
        values = series.to_numpy().astype(np.float64, copy=False)
        missing = np.isnan(values)
        if missing.any():
            raise empty_error(missing)
        bad = ~np.isfinite(values) | (values != np.floor(values))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(
                path,
                f"{role} id {show_id(values[row])} in column {col!r} is not an integer",
                "ids must be integers or strings; fix the id column",
                where=table.locate(row),
            )
        return values.astype(np.int64)
    arr = trimmed_strings(series)
    missing = _missing_mask(arr)
    if missing.any():
        raise empty_error(missing)
    # A NUL byte is damage (a binary or half-written file), and numpy's text arrays drop trailing
    # NULs: "1\x00" and "1" would share one vocabulary entry while encoding to different indices.
    nul = pc.fill_null(pc.match_substring(arr, "\x00"), False).to_numpy(zero_copy_only=False)
    if nul.any():
        row = int(np.flatnonzero(nul)[0])
        raise DataError(
            path,
            f"{role} id {arr[row].as_py()!r} in column {col!r} holds a NUL byte ({int(nul.sum())} row(s) like it)",
            "the file is binary or damaged: write it again, or remove the NUL bytes",
            where=table.locate(row),
        )
    is_int = pc.match_substring_regex(arr, _INT_ID_RE)
    if not pc.all(is_int).as_py():
        # integer ids but for a few NaN / NA / null: missing values written out as text, not ids
        marker = pc.is_in(pc.utf8_lower(arr), value_set=_MISSING_MARKERS).to_numpy(zero_copy_only=False)
        if marker.any() and (is_int.to_numpy(zero_copy_only=False) | marker).all():
            row = int(np.flatnonzero(marker)[0])
            raise DataError(
                path,
                f"{role} id {arr[row].as_py()!r} in column {col!r} is a missing value (the other ids are "
                f"integers; {int(marker.sum())} row(s) like it)",
                f"fill in the {role} id or drop the row(s)",
                where=table.locate(row),
            )
    if pc.all(is_int).as_py():
        try:
            return pc.cast(arr, pa.int64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, OverflowError):
            if require_int:
                bad = _first_overflow(arr)
                raise DataError(
                    path,
                    f"{role} id {arr[bad].as_py()!r} in column {col!r} does not fit in 64 bits",
                    "ids must be integers below 2**63",
                    where=table.locate(bad),
                ) from None
    elif require_int:
        row = int(np.flatnonzero(~is_int.to_numpy(zero_copy_only=False))[0])
        raise DataError(
            path,
            f"{role} id {arr[row].as_py()!r} in column {col!r} is not an integer",
            "this format needs integer ids; fix or drop that line",
            where=table.locate(row),
        )
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=object)


def _first_overflow(arr: pa.Array) -> int:
    for i, v in enumerate(arr.to_pylist()):
        if abs(int(v)) >= 2**63:
            return i
    return 0  # pragma: no cover


def to_numbers(table: Table, col: str, role: str, fix: str) -> np.ndarray:
    """Convert a numeric column (timestamp or weight): int64 if every value is an integer,
    else float64. Empty, non-numeric and non-finite values raise DataError."""
    path, series = table.path, table.columns[col]
    dtype = series.dtype

    def empty_error(missing: np.ndarray) -> DataError:
        row = int(np.flatnonzero(missing)[0])
        return DataError(
            path,
            f"{role} is empty in column {col!r} ({int(missing.sum())} empty in all)",
            fix,
            where=table.locate(row),
        )

    if pd.api.types.is_datetime64_any_dtype(dtype):
        missing = series.isna().to_numpy()
        if missing.any():
            raise empty_error(missing)
        if getattr(series.dt, "tz", None) is not None:
            series = series.dt.tz_convert("UTC").dt.tz_localize(None)
        return series.to_numpy().astype("datetime64[s]").astype(np.int64)
    if pd.api.types.is_bool_dtype(dtype):
        raise DataError(
            path, f"column {col!r} holds true/false values, not a {role}", fix, where="schema"
        )
    if pd.api.types.is_integer_dtype(dtype):
        return series.to_numpy().astype(np.int64, copy=False)
    if pd.api.types.is_float_dtype(dtype):
        values = series.to_numpy().astype(np.float64, copy=False)
        missing = np.isnan(values)
        if missing.any():
            raise empty_error(missing)
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(
                path,
                f"{role} {values[row]!r} in column {col!r} is not a finite number",
                fix,
                where=table.locate(row),
            )
        return values
    arr = trimmed_strings(series)
    missing = _missing_mask(arr)
    if missing.any():
        raise empty_error(missing)
    strings = pd.Series(arr.to_numpy(zero_copy_only=False), dtype=object)
    values = pd.to_numeric(strings, errors="coerce").to_numpy()
    if values.dtype.kind in "iu":
        return values.astype(np.int64, copy=False)
    try:
        values = values.astype(np.float64)
    except (TypeError, ValueError):  # pragma: no cover - exotic objects
        values = np.array([np.nan] * len(values))
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        what = "not a number" if np.isnan(values[row]) else "not a finite number"
        raise DataError(
            path,
            f"{role} {strings.iloc[row]!r} in column {col!r} is {what}",
            fix,
            where=table.locate(row),
        )
    return values


def show_id(value) -> str:
    """repr of an id for messages, without numpy's ``np.int64(...)`` wrapper."""
    if isinstance(value, np.generic):
        value = value.item()
    return repr(value)


def cell_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()
