"""Readers for interaction and feature files.

Every reader returns raw ids exactly as read: a column whose ids are all integer literals
(``0``, ``17``, ``-3``; no leading zeros, no decimals) becomes ``int64``, any other id column stays
``str``. Mapping raw ids to dense indices is the dataset's job, not the reader's; so is
deduplication.

Supported inputs
----------------
* ``read_interactions`` / ``read_features``: CSV or TSV with a header row (optionally gzip
  compressed, ``.gz``), or Parquet (``.parquet`` / ``.pq``).
* ``read_lightgcn_file`` / ``read_lightgcn``: the LightGCN text format, one line per user,
  ``user item item ...`` (a user with no items is allowed).
* ``read_movielens_100k``: the MovieLens 100K folder as GroupLens ships it.

Every problem with the input raises :class:`twotower.errors.DataError` naming the file, the place
(line, row, column, byte offset), what is wrong and what to do about it.
"""
from __future__ import annotations

import csv
import difflib
import gzip
import io
import re
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from twotower.errors import DataError

__all__ = [
    "Interactions",
    "Features",
    "read_interactions",
    "read_features",
    "read_movielens_100k",
    "read_lightgcn",
    "read_lightgcn_file",
]

_GZIP_MAGIC = b"\x1f\x8b"
_PARQUET_MAGIC = b"PAR1"
_PARQUET_SUFFIXES = (".parquet", ".pq")
_INT_ID_RE = r"^(0|-?[1-9][0-9]*)$"
_MISSING_MARKERS = pa.array(["nan", "-nan", "na", "n/a", "#n/a", "null", "none", "<na>"])


# --------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Bytes, decoding and format detection
# --------------------------------------------------------------------------------------------


def _check_file(path: Path) -> None:
    if not path.exists():
        parent = path.parent
        hint = ""
        if parent.is_dir():
            near = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=3)
            if near:
                hint = f" (similar names there: {near})"
        raise DataError(
            path,
            f"file not found{hint}",
            "check the path (relative paths in a config are under the data directory: --data-dir, "
            "else $TWOTOWER_DATA), or download the data first",
        )
    if path.is_dir():
        raise DataError(path, "is a directory, not a file", "give the path of the data file itself")
    try:
        size = path.stat().st_size
    except OSError as exc:  # pragma: no cover - permission problems etc.
        raise DataError(path, f"cannot read the file ({exc.strerror})", "check its permissions")
    if size == 0:
        raise DataError(
            path, "file is empty (0 bytes)", "the download or export probably failed; recreate it"
        )


def _read_raw(path: Path) -> bytes:
    """Read a file's bytes, decompressing gzip (by magic bytes or a ``.gz`` suffix)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:  # pragma: no cover
        raise DataError(path, f"cannot read the file ({exc.strerror})", "check its permissions")
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:
            raise DataError(
                path,
                f"gzip data is truncated or corrupt ({exc})",
                "the file was cut short (interrupted download or copy); fetch or compress it again",
                where="gzip stream",
            ) from None
        if not raw.strip():
            raise DataError(
                path, "file is empty after decompression", "recreate the file with its rows"
            )
    elif path.name.lower().endswith(".gz"):
        raise DataError(
            path,
            "name ends in .gz but the file is not gzip compressed",
            "rename it without .gz, or compress it with gzip",
            where="byte 0",
        )
    return raw


def _decode(path: Path, raw: bytes, encoding: str = "utf-8") -> str:
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 1]
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(
            path,
            f"byte 0x{bad.hex()} at byte offset {exc.start} is not valid {encoding}",
            f"save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8); from Python, "
            f"pass the file's real encoding, e.g. encoding='latin-1'",
            where=f"line {line}, column {col}",
        ) from None
    except LookupError:
        raise DataError(
            path, f"unknown text encoding {encoding!r}", "use e.g. encoding='utf-8' or 'latin-1'"
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return text


def _is_parquet(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(_PARQUET_SUFFIXES):
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == _PARQUET_MAGIC
    except OSError:  # pragma: no cover
        return False


def _first_nonblank_line(text: str) -> str:
    for line in text.split("\n"):
        if line.strip():
            return line.rstrip("\r")
    return ""


def _sniff_sep(path: Path, header: str) -> str:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(".tsv"):
        return "\t"
    counts = {sep: header.count(sep) for sep in ("\t", ",")}
    if counts["\t"] or counts[","]:
        return "\t" if counts["\t"] >= counts[","] else ","
    for sep in ("|", ";"):
        if sep in header:
            return sep
    return ","


# --------------------------------------------------------------------------------------------
# Tables: a uniform view of CSV/TSV and Parquet inputs
# --------------------------------------------------------------------------------------------


class _Table:
    """Selected columns of a file plus a way to name the place of a row in messages."""

    def __init__(
        self,
        path: Path,
        columns: dict[str, pd.Series],
        n_rows: int,
        locate: Callable[[int], str],
        found: list[str],
    ):
        self.path = path
        self.columns = columns
        self.n_rows = n_rows
        self.locate = locate
        self.found = found


def _text_locator(text: str, header: bool) -> Callable[[int], str]:
    """Return row index -> "line N" (1-based, header counts as line 1, blank lines skipped)."""
    cache: list[int] = []

    def locate(row: int) -> str:
        if not cache:
            seen_header = not header
            for number, line in enumerate(text.split("\n"), start=1):
                if not line.strip():
                    continue
                if not seen_header:
                    seen_header = True
                    continue
                cache.append(number)
        if 0 <= row < len(cache):
            return f"line {cache[row]}"
        return f"line {row + (2 if header else 1)}"

    return locate


def _column_hint(wanted: str, found: Sequence[str]) -> str:
    lower = {c.lower(): c for c in found}
    if wanted.lower() in lower:
        return f" (did you mean {lower[wanted.lower()]!r}? names are case-sensitive)"
    near = difflib.get_close_matches(wanted, list(found), n=1, cutoff=0.6)
    if near:
        return f" (did you mean {near[0]!r}?)"
    return ""


# (role, reader parameter) -> the DataConfig field that sets it, where the names differ
_CONFIG_KEYS = {("item id", "id_col"): "item_id_col", ("user id", "id_col"): "user_id_col",
                ("item feature", "columns"): "item_feature_cols", ("user feature", "columns"): "user_feature_cols",
                ("item title", "title_col"): "item_title_col"}


def _missing_column_error(
    path: Path, wanted: str, role: str, param: str, found: list[str], where: str, sep: str | None
) -> DataError:
    key = _CONFIG_KEYS.get((role, param), param)
    fix = f"map the {role} column with {param}=... (config: data.{key})"
    if sep is not None and len(found) == 1:
        fix += (
            f"; only one column was found with separator {sep!r}: write the file with tabs or commas "
            f"(the separator is taken from the header line), or pass sep=... from Python"
        )
    if found and all(re.fullmatch(r"-?\d+(\.\d+)?", c.strip() or "x") for c in found):
        fix += "; the first line looks like data: csv/tsv files need a header row naming columns"
    return DataError(
        path,
        f"column {wanted!r} is missing{_column_hint(wanted, found)}; found columns {found}",
        fix,
        where=where,
    )


def _load_table(
    path: Path,
    wanted: list[tuple[str, str, str]],
    *,
    sep: str | None,
    encoding: str,
) -> _Table:
    """Load the columns ``wanted`` = [(column name, role, parameter name)] from a file."""
    _check_file(path)
    names = list(dict.fromkeys(col for col, _, _ in wanted))
    if _is_parquet(path):
        return _load_parquet(path, wanted, names)

    raw = _read_raw(path)
    text = _decode(path, raw, encoding)
    header_line = _first_nonblank_line(text)
    if not header_line:
        raise DataError(
            path, "file has no lines, only whitespace", "recreate it with a header row and data"
        )
    if sep is None:
        sep = _sniff_sep(path, header_line)
    try:
        header = pd.read_csv(io.StringIO(text), sep=sep, nrows=0, dtype=str, index_col=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise DataError(
            path, f"cannot parse the header row ({exc})", "check the separator", where="line 1"
        ) from None
    found = [str(c).strip() for c in header.columns]
    positions: dict[str, int] = {}
    for col, role, param in wanted:
        if col not in found:
            raise _missing_column_error(path, col, role, param, found, "header (line 1)", sep)
        positions[col] = found.index(col)
    usecols = sorted(set(positions.values()))
    _check_field_counts(path, raw, text, sep, len(found), encoding)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pd.errors.ParserWarning)
            df = pd.read_csv(
                io.StringIO(text),
                sep=sep,
                header=0,
                usecols=usecols,
                dtype=str,
                keep_default_na=False,
                na_filter=False,
                index_col=False,
                skipinitialspace=True,
            )
    except pd.errors.ParserError as exc:
        raise _parser_error(path, exc) from None
    locate = _text_locator(text, header=True)
    if len(df) == 0:
        raise DataError(
            path,
            "file has a header but no data rows",
            "add rows below the header, or check that the right file was given",
            where="line 2",
        )
    by_pos = {pos: df.iloc[:, i] for i, pos in enumerate(usecols)}
    columns = {col: by_pos[positions[col]] for col in names}
    return _Table(path, columns, len(df), locate, found)


_ASCII_COMPATIBLE = {"utf8", "utf8sig", "latin1", "iso88591", "ascii", "cp1252", "l1"}


def _check_field_counts(path: Path, raw: bytes, text: str, sep: str, n_fields: int, encoding: str) -> None:
    """Refuse a line with more fields than the header. Reading only the needed columns would drop
    the extra fields silently, and an unquoted separator inside a value (a comma in a title) shifts
    every later field of its row into the wrong column."""
    if len(sep) != 1:  # a regex separator: pandas' python engine checks nothing here either
        return
    if ('"' in text or re.sub(r"[-_]", "", encoding.lower()) not in _ASCII_COMPATIBLE
            or raw.count(b"\r") != raw.count(b"\r\n")):
        # quoted values may hold the separator (or lines end in a bare CR): the tokenizer counts
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", pd.errors.ParserWarning)
                pd.read_csv(io.StringIO(text), sep=sep, header=0, dtype=str, keep_default_na=False,
                            na_filter=False, index_col=False)
        except pd.errors.ParserError as exc:
            raise _parser_error(path, exc) from None
        return
    # separators per physical line, counted on the bytes (ASCII-compatible encodings only)
    buf = np.frombuffer(raw, dtype=np.uint8)
    newlines = np.flatnonzero(buf == 10)
    per_line = np.bincount(np.searchsorted(newlines, np.flatnonzero(buf == ord(sep))),
                           minlength=len(newlines) + 1)
    over = np.flatnonzero(per_line > n_fields - 1)
    if over.size:
        line = int(over[0])
        raise DataError(
            path,
            f"line has {int(per_line[line]) + 1} fields, the header has {n_fields} "
            f"({over.size} such line(s))",
            f"a separator {sep!r} inside a value (e.g. in a title) shifts the fields after it: quote "
            f"that value (\"...\") or remove the extra separator",
            where=f"line {line + 1}",
        )


def _parser_error(path: Path, exc: Exception) -> DataError:
    msg = str(exc).replace("Error tokenizing data. C error: ", "").strip()
    where = None
    m = re.search(r"\bline (\d+)", msg)
    if m:
        where = f"line {m.group(1)}"
    else:
        m = re.search(r"\brow (\d+)", msg)
        if m:
            where = f"line {int(m.group(1)) + 1}"
    if "EOF inside string" in msg:
        msg = "a quoted field starts on this line and is never closed"
        fix = "a quote (\") opened there is never closed: close it or remove it"
    else:
        fix = "every line needs as many fields as the header; check the separator and quoting there"
    return DataError(path, f"cannot parse the file: {msg.rstrip('.')}", fix, where=where)


def _load_parquet(path: Path, wanted: list[tuple[str, str, str]], names: list[str]) -> _Table:
    try:
        with open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            found = list(pf.schema_arrow.names)
            for col, role, param in wanted:
                if col not in found:
                    raise _missing_column_error(path, col, role, param, found, "schema", None)
            try:
                table = pf.read(columns=names)
            except (pa.ArrowException, OSError) as exc:
                raise DataError(
                    path,
                    f"cannot read the Parquet data ({exc})",
                    "the file is truncated or corrupt; write it again",
                    where="data pages",
                ) from None
    except DataError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            path,
            f"cannot read the Parquet file ({exc})",
            "the file is truncated or not Parquet (interrupted copy?); write or fetch it again",
            where="footer",
        ) from None
    if table.num_rows == 0:
        raise DataError(
            path,
            "Parquet file has columns but no rows",
            "check that the right file was given",
            where="row index 0",
        )
    columns = {}
    for col in names:
        columns[col] = table.column(col).to_pandas()
    return _Table(path, columns, table.num_rows, lambda row: f"row index {row}", found)


# --------------------------------------------------------------------------------------------
# Column conversions
# --------------------------------------------------------------------------------------------


def _is_text(series: pd.Series) -> bool:
    return series.dtype == object or pd.api.types.is_string_dtype(series.dtype)


def _strings(series: pd.Series) -> pa.Array:
    """A text column as a pyarrow string array with surrounding whitespace trimmed."""
    values = series.to_numpy(dtype=object)
    try:
        arr = pa.array(values, type=pa.string(), from_pandas=True)
    except (pa.ArrowException, TypeError):
        arr = pa.array(
            [None if _cell_missing(v) else str(v) for v in values], type=pa.string()
        )
    return pc.utf8_trim_whitespace(arr)


def _missing_mask(arr: pa.Array) -> np.ndarray:
    empty = pc.or_kleene(pc.is_null(arr), pc.equal(pc.utf8_length(arr), 0))
    return pc.fill_null(empty, True).to_numpy(zero_copy_only=False)


def _to_ids(
    table: _Table, col: str, role: str, param: str, *, require_int: bool = False
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
            f"(config: data.{_CONFIG_KEYS.get((f'{role} id', param), param)})",
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
                f"{role} id {_show(values[row])} in column {col!r} is not an integer",
                "ids must be integers or strings; fix the id column",
                where=table.locate(row),
            )
        return values.astype(np.int64)
    arr = _strings(series)
    missing = _missing_mask(arr)
    if missing.any():
        raise empty_error(missing)
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


def _to_numbers(table: _Table, col: str, role: str, fix: str) -> np.ndarray:
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
    arr = _strings(series)
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


# --------------------------------------------------------------------------------------------
# Public readers
# --------------------------------------------------------------------------------------------


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
) -> Interactions:
    """Read user-item interactions from CSV/TSV (header row required; ``.gz`` ok) or Parquet.

    The separator is a tab for ``.tsv``; otherwise it is sniffed from the header line (tab or
    comma) unless ``sep`` is given. Extra columns are ignored; duplicate rows are kept.
    """
    path = Path(path)
    wanted = [(user_col, "user", "user_col"), (item_col, "item", "item_col")]
    if time_col is not None:
        wanted.append((time_col, "timestamp", "time_col"))
    if weight_col is not None:
        wanted.append((weight_col, "weight", "weight_col"))
    table = _load_table(path, wanted, sep=sep, encoding=encoding)
    data = {
        "user": _to_ids(table, user_col, "user", "user_col"),
        "item": _to_ids(table, item_col, "item", "item_col"),
    }
    if time_col is not None:
        data["timestamp"] = _to_numbers(table, time_col, "timestamp", _TIME_FIX)
    if weight_col is not None:
        weights = _to_numbers(table, weight_col, "weight", _WEIGHT_FIX)
        data["weight"] = weights.astype(np.float32)
    return Interactions(_frame(data), str(path))


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
) -> Features:
    """Read a table of item (or user) features keyed by ``id_col``.

    ``columns`` are categorical features kept as strings; ``multi_valued`` maps a column to the
    separator between values inside its cells (e.g. ``{"genres": "|"}``); columns named only in
    ``multi_valued`` are read as well. Empty cells give ``[]``. Ids must be unique. If
    ``known_ids`` is given, every id must be among them.
    """
    path = Path(path)
    multi_valued = dict(multi_valued or {})
    feature_cols = list(dict.fromkeys(list(columns) + list(multi_valued)))
    wanted = [(id_col, f"{kind} id", "id_col")]
    wanted += [(c, f"{kind} feature", "columns") for c in feature_cols]
    if title_col is not None:
        wanted.append((title_col, f"{kind} title", "title_col"))
    table = _load_table(path, wanted, sep=sep, encoding=encoding)
    ids = _to_ids(table, id_col, kind, "id_col")

    # Unique ids.
    dup = pd.Series(ids).duplicated(keep=False).to_numpy()
    if dup.any():
        rows = np.flatnonzero(dup)
        first_val = ids[rows[0]]
        same = rows[ids[rows] == first_val]
        places = " and ".join(table.locate(int(r)) for r in same[:2])
        raise DataError(
            path,
            f"{kind} id {_show(first_val)} appears more than once ({places}); "
            f"repeated ids in all: {int(pd.Series(ids[rows]).nunique())}",
            f"keep one row per {kind} id",
            where=table.locate(int(same[1])),
        )

    if known_ids is not None:
        _check_known(table, ids, known_ids, kind, id_col)

    categorical: dict[str, list[list[str]]] = {}
    for col in feature_cols:
        categorical[col] = _feature_lists(table.columns[col], multi_valued.get(col))

    titles = None
    if title_col is not None:
        t = table.columns[title_col]
        titles = np.asarray(
            [("" if _cell_missing(v) else str(v)) for v in t.to_numpy(dtype=object)],
            dtype=object,
        )
    return Features(ids=ids, categorical=categorical, titles=titles, source=str(path))


def _show(value) -> str:
    """repr of an id for messages, without numpy's ``np.int64(...)`` wrapper."""
    if isinstance(value, np.generic):
        value = value.item()
    return repr(value)


def _cell_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _feature_lists(series: pd.Series, multi_sep: str | None) -> list[list[str]]:
    out: list[list[str]] = []
    for value in series.to_numpy(dtype=object):
        if isinstance(value, (list, tuple, np.ndarray)):
            out.append([str(v).strip() for v in value if not _cell_missing(v)])
            continue
        if _cell_missing(value):
            out.append([])
            continue
        if isinstance(value, float) and value.is_integer():
            value = str(int(value))  # e.g. Parquet int with nulls -> float
        text = str(value).strip()
        if multi_sep is None:
            out.append([text])
        else:
            out.append([v.strip() for v in text.split(multi_sep) if v.strip()])
    return out


def _check_known(table: _Table, ids: np.ndarray, known_ids, kind: str, id_col: str) -> None:
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
            f"{kind} id {_show(ids[row])} is not among the known {kind} ids "
            f"(unknown ids in all: {len(bad)})",
            f"drop rows of {kind}s that are not in the interactions, or check the id column "
            f"(id_col={id_col!r})",
            where=table.locate(row),
        )


# --------------------------------------------------------------------------------------------
# LightGCN format
# --------------------------------------------------------------------------------------------


_NOT_ID_BYTE = re.compile(rb"[^0-9 \t\r\n]")


def read_lightgcn_file(path) -> Interactions:
    """Read one LightGCN-format file: each line ``user item item ...`` with integer ids >= 0.

    A line with a user and no items is valid (that user has no interactions here); blank lines
    are skipped. Returns int64 ``user``/``item`` columns in file order.
    """
    path = Path(path)
    _check_file(path)
    raw = _read_raw(path)
    m = _NOT_ID_BYTE.search(raw)
    if m is not None:
        raise _lightgcn_bad_token(path, raw, m.start())
    text = raw.decode("ascii")
    lines = text.splitlines()
    users: list[str] = []
    counts: list[int] = []
    items: list[str] = []
    extend = items.extend
    for line in lines:
        tokens = line.split()
        if not tokens:
            continue
        users.append(tokens[0])
        counts.append(len(tokens) - 1)
        extend(tokens[1:])
    if not users:
        raise DataError(
            path, "file has no lines with ids, only whitespace", "recreate it: `user item item ...`"
        )
    try:
        user_ids = np.array(users, dtype=np.int64)
        item_ids = np.array(items, dtype=np.int64) if items else np.zeros(0, dtype=np.int64)
    except (OverflowError, ValueError):
        raise _lightgcn_overflow(path, lines) from None
    frame = pd.DataFrame(
        {"user": np.repeat(user_ids, np.asarray(counts, dtype=np.int64)), "item": item_ids}
    )
    return Interactions(frame, str(path))


def _lightgcn_bad_token(path: Path, raw: bytes, pos: int) -> DataError:
    line_start = raw.rfind(b"\n", 0, pos) + 1
    line_no = raw.count(b"\n", 0, pos) + 1
    line_end = raw.find(b"\n", pos)
    line = raw[line_start : line_end if line_end >= 0 else len(raw)]
    # the whitespace-delimited token around pos
    s = pos
    while s > line_start and raw[s - 1 : s] not in (b" ", b"\t"):
        s -= 1
    e = pos
    while e < len(raw) and raw[e : e + 1] not in (b" ", b"\t", b"\r", b"\n"):
        e += 1
    token = raw[s:e].decode("latin-1")
    field = len(raw[line_start:s].split()) + 1
    where = f"line {line_no}, field {field}"
    if re.fullmatch(r"-\d+", token):
        return DataError(
            path,
            f"negative id {token!r}",
            "LightGCN ids start at 0; fix or drop that line",
            where=where,
        )
    byte = raw[pos]
    if byte >= 0x80:
        problem = (
            f"byte 0x{byte:02x} at byte offset {pos} is not ASCII (in token {token!r})"
        )
    else:
        problem = f"{token!r} is not an integer id"
    del line
    return DataError(
        path,
        problem,
        "each line must be `user item item ...` with integer ids >= 0 separated by spaces",
        where=where,
    )


def _lightgcn_overflow(path: Path, lines: list[str]) -> DataError:
    number = 0
    for number, line in enumerate(lines, start=1):
        for token in line.split():
            if int(token) >= 2**63:
                return DataError(
                    path,
                    f"id {token!r} does not fit in 64 bits",
                    "ids must be integers below 2**63",
                    where=f"line {number}",
                )
    return DataError(path, "cannot parse the ids", "check the file format")  # pragma: no cover


def read_lightgcn(directory) -> tuple[Interactions, Interactions]:
    """Read ``train.txt`` and ``test.txt`` of a LightGCN-format folder (e.g. Gowalla)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(
            directory,
            "folder not found" if not directory.exists() else "is not a folder",
            "give the folder holding train.txt and test.txt",
        )
    return read_lightgcn_file(directory / "train.txt"), read_lightgcn_file(directory / "test.txt")


# --------------------------------------------------------------------------------------------
# MovieLens 100K
# --------------------------------------------------------------------------------------------


_AGE_BUCKETS = [(18, "under 18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"),
                (56, "50-55")]


def _age_bucket(age: int) -> str:
    for upper, name in _AGE_BUCKETS:
        if age < upper:
            return name
    return "56+"


def _read_headerless(
    path: Path, sep: str, n_fields: int, encoding: str, fix: str
) -> tuple[pd.DataFrame, Callable[[int], str]]:
    """Read a header-less, unquoted file with exactly ``n_fields`` fields per line as strings."""
    _check_file(path)
    text = _decode(path, _read_raw(path), encoding)
    if not text.strip():
        raise DataError(path, "file has no lines, only whitespace", fix)
    locate = _text_locator(text, header=False)
    # pandas pads short lines and cuts or rejects long ones: check field counts first.
    lines = [ln for ln in text.split("\n") if ln.strip()]
    counts = np.fromiter((ln.count(sep) for ln in lines), dtype=np.int64, count=len(lines))
    wrong = np.flatnonzero(counts != n_fields - 1)
    if wrong.size:
        row = int(wrong[0])
        raise DataError(
            path,
            f"line has {int(counts[row]) + 1} fields, expected {n_fields} separated by {sep!r}",
            f"fix or drop that line; {fix}",
            where=locate(row),
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pd.errors.ParserWarning)
            df = pd.read_csv(
                io.StringIO(text),
                sep=sep,
                header=None,
                names=list(range(n_fields)),
                dtype=str,
                keep_default_na=False,
                na_filter=False,
                quoting=csv.QUOTE_NONE,
                index_col=False,
            )
    except pd.errors.ParserError as exc:  # pragma: no cover - field counts were checked
        raise _parser_error(path, exc) from None
    return df, locate


def read_movielens_100k(directory) -> tuple[Interactions, Features, Features]:
    """Read the MovieLens 100K folder as shipped by GroupLens.

    Returns ``(interactions, item_features, user_features)``: interactions from ``u.data`` with
    ``timestamp`` (int64 unix seconds) and ``weight`` = rating (float32); item features from
    ``u.item`` (latin-1) with ``categorical={"genre": [...]}`` (names from ``u.genre``) and
    titles; user features from ``u.user`` with ``age`` (bucket such as ``"25-34"``), ``gender``
    and ``occupation``.
    """
    directory = Path(directory)
    if not (directory / "u.data").exists() and (directory / "ml-100k" / "u.data").exists():
        directory = directory / "ml-100k"
    if not directory.is_dir():
        raise DataError(
            directory,
            "folder not found" if not directory.exists() else "is not a folder",
            "give the ml-100k folder holding u.data, u.item, u.user and u.genre",
        )
    fetch = "the file should match the GroupLens ml-100k release; fetch it again"

    # Genres.
    genre_path = directory / "u.genre"
    genre_df, genre_loc = _read_headerless(genre_path, "|", 2, "latin-1", fetch)
    genre_index = _int_column(genre_path, genre_df[1], genre_loc, "genre index", fetch)
    order = np.argsort(genre_index, kind="stable")
    if not np.array_equal(genre_index[order], np.arange(len(genre_index))):
        raise DataError(
            genre_path, "genre indices are not 0, 1, 2, ... in some order", fetch, where="column 2"
        )
    genre_names = [str(genre_df[0].iloc[i]).strip() for i in order]
    n_genres = len(genre_names)

    # Items.
    item_path = directory / "u.item"
    item_df, item_loc = _read_headerless(item_path, "|", 5 + n_genres, "latin-1", fetch)
    item_ids = _int_column(item_path, item_df[0], item_loc, "movie id", fetch)
    _check_unique(item_path, item_ids, item_loc, "movie id", fetch)
    flags = item_df.iloc[:, 5:].to_numpy(dtype=object)
    bad = ~np.isin(flags, ["0", "1"])
    if bad.any():
        row, col = (int(x[0]) for x in np.nonzero(bad))
        raise DataError(
            item_path,
            f"genre flag {flags[row, col]!r} for genre {genre_names[col]!r} is not 0 or 1",
            fetch,
            where=f"{item_loc(row)}, field {6 + col}",
        )
    on = flags == "1"
    names = np.asarray(genre_names, dtype=object)
    genres = [list(names[r]) for r in on]
    titles = item_df[1].to_numpy(dtype=object).astype(str).astype(object)
    items = Features(
        ids=item_ids, categorical={"genre": genres}, titles=titles, source=str(item_path)
    )

    # Users.
    user_path = directory / "u.user"
    user_df, user_loc = _read_headerless(user_path, "|", 5, "latin-1", fetch)
    user_ids = _int_column(user_path, user_df[0], user_loc, "user id", fetch)
    _check_unique(user_path, user_ids, user_loc, "user id", fetch)
    ages = _int_column(user_path, user_df[1], user_loc, "age", fetch)
    users = Features(
        ids=user_ids,
        categorical={
            "age": [[_age_bucket(int(a))] for a in ages],
            "gender": [[str(g).strip()] if str(g).strip() else [] for g in user_df[2]],
            "occupation": [[str(o).strip()] if str(o).strip() else [] for o in user_df[3]],
        },
        titles=None,
        source=str(user_path),
    )

    # Ratings.
    data_path = directory / "u.data"
    data_df, data_loc = _read_headerless(data_path, "\t", 4, "latin-1", fetch)
    u = _int_column(data_path, data_df[0], data_loc, "user id", fetch)
    i = _int_column(data_path, data_df[1], data_loc, "item id", fetch)
    rating = _int_column(data_path, data_df[2], data_loc, "rating", fetch)
    ts = _int_column(data_path, data_df[3], data_loc, "timestamp", fetch)
    for values, known, what, other in ((u, user_ids, "user", "u.user"),
                                       (i, item_ids, "item", "u.item")):
        unknown = ~np.isin(values, known)
        if unknown.any():
            row = int(np.flatnonzero(unknown)[0])
            raise DataError(
                data_path,
                f"{what} id {int(values[row])} is not listed in {other} "
                f"({int(unknown.sum())} such ratings)",
                fetch,
                where=data_loc(row),
            )
    frame = pd.DataFrame(
        {"user": u, "item": i, "timestamp": ts, "weight": rating.astype(np.float32)}
    )
    return Interactions(frame, str(data_path)), items, users


def _int_column(
    path: Path, series: pd.Series, locate: Callable[[int], str], what: str, fix: str
) -> np.ndarray:
    arr = _strings(series)
    ok = pc.match_substring_regex(arr, r"^-?[0-9]{1,18}$").to_numpy(zero_copy_only=False)
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        value = arr[row].as_py()
        problem = f"{what} is empty" if not value else f"{what} {value!r} is not an integer"
        raise DataError(path, problem, fix, where=locate(row))
    return pc.cast(arr, pa.int64()).to_numpy(zero_copy_only=False)


def _check_unique(
    path: Path, ids: np.ndarray, locate: Callable[[int], str], what: str, fix: str
) -> None:
    dup = pd.Series(ids).duplicated().to_numpy()
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        raise DataError(path, f"{what} {int(ids[row])} appears twice", fix, where=locate(row))


