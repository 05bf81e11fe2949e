"""A uniform view of a table file's columns (CSV/TSV or Parquet), and the messages that name a place
in it: the row's line or row index, a missing column with the nearest name, a parser error."""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from twotower.errors import DataError


class Table:
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


def text_locator(text: str, header: bool) -> Callable[[int], str]:
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
CONFIG_KEYS = {("item id", "id_col"): "item_id_col", ("user id", "id_col"): "user_id_col",
                ("item feature", "columns"): "item_feature_cols", ("user feature", "columns"): "user_feature_cols",
                ("item title", "title_col"): "item_title_col",
                ("item feature", "column"): "features.item, its column", ("user feature", "column"): "features.user, its column",
                ("context feature", "column"): "features.context, its column"}


def missing_column_error(
    path: Path, wanted: str, role: str, param: str, found: list[str], where: str, sep: str | None
) -> DataError:
    key = CONFIG_KEYS.get((role, param), param)
    fix = f"map the {role} column with {param}=... (config: {key if '.' in key else 'data.' + key})"
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


def parser_error(path: Path, exc: Exception) -> DataError:
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
