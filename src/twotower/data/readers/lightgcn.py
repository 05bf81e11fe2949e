"""The LightGCN text format: one line per user, ``user item item ...`` (e.g. the Gowalla split)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from twotower.errors import DataError

from .files import check_file, read_raw
from .records import Interactions


_NOT_ID_BYTE = re.compile(rb"[^0-9 \t\r\n]")


def read_lightgcn_file(path) -> Interactions:
    """Read one LightGCN-format file: each line ``user item item ...`` with integer ids >= 0.

    A line with a user and no items is valid (that user has no interactions here); blank lines
    are skipped. Returns int64 ``user``/``item`` columns in file order.
    """
    path = Path(path)
    check_file(path)
    raw = read_raw(path)
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
