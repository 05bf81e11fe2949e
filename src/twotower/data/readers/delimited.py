"""CSV/TSV files with a header row (optionally gzip compressed): the wanted columns as strings,
with every line checked to hold no more fields than the header."""
from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from twotower.errors import DataError

from .files import decode_text, first_nonblank_line, read_raw, sniff_sep
from .table import Table, duplicate_column_error, missing_column_error, parser_error, text_locator


def load_delimited(
    path: Path,
    wanted: list[tuple[str, str, str]],
    names: list[str],
    *,
    sep: str | None,
    encoding: str,
) -> Table:
    """Load the columns ``wanted`` = [(column name, role, parameter name)] of a CSV/TSV file with a
    header row (gzip compressed or not); ``names`` are the distinct column names."""
    raw = read_raw(path)
    text = decode_text(path, raw, encoding)
    header_line = first_nonblank_line(text)
    if not header_line:
        raise DataError(
            path, "file has no lines, only whitespace", "recreate it with a header row and data"
        )
    if sep is None:
        sep = sniff_sep(path, header_line)
    try:
        # header=None: the names as written (pandas renames a repeated "user" to "user.1")
        header = pd.read_csv(io.StringIO(text), sep=sep, header=None, nrows=1, dtype=str, index_col=False,
                             keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise DataError(
            path, f"cannot parse the header row ({exc})", "check the separator", where="line 1"
        ) from None
    found = [str(c).strip() for c in header.iloc[0].tolist()]
    positions: dict[str, int] = {}
    for col, role, param in wanted:
        if col not in found:
            raise missing_column_error(path, col, role, param, found, "header (line 1)", sep)
        if found.count(col) > 1:
            raise duplicate_column_error(path, col, [i for i, c in enumerate(found) if c == col], "header (line 1)")
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
        raise parser_error(path, exc) from None
    locate = text_locator(text, header=True)
    if len(df) == 0:
        raise DataError(
            path,
            "file has a header but no data rows",
            "add rows below the header, or check that the right file was given",
            where="line 2",
        )
    by_pos = {pos: df.iloc[:, i] for i, pos in enumerate(usecols)}
    columns = {col: by_pos[positions[col]] for col in names}
    return Table(path, columns, len(df), locate, found)


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
            raise parser_error(path, exc) from None
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
