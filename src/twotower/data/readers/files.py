"""A data file's bytes: existence checks, gzip, text decoding, and format detection (Parquet or
delimited text, and which separator)."""
from __future__ import annotations

import difflib
import gzip
import zlib
from pathlib import Path

from twotower.errors import DataError

_GZIP_MAGIC = b"\x1f\x8b"
_PARQUET_MAGIC = b"PAR1"
_PARQUET_SUFFIXES = (".parquet", ".pq")


def check_file(path: Path) -> None:
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


def read_raw(path: Path) -> bytes:
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


def decode_text(path: Path, raw: bytes, encoding: str = "utf-8") -> str:
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 1]
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(
            path,
            f"byte 0x{bad.hex()} at byte offset {exc.start} is not valid {encoding}",
            "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8); from Python, "
            "pass the file's real encoding, e.g. encoding='latin-1'",
            where=f"line {line}, column {col}",
        ) from None
    except LookupError:
        raise DataError(
            path, f"unknown text encoding {encoding!r}", "use e.g. encoding='utf-8' or 'latin-1'"
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return text


def is_parquet(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(_PARQUET_SUFFIXES):
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == _PARQUET_MAGIC
    except OSError:  # pragma: no cover
        return False


def first_nonblank_line(text: str) -> str:
    for line in text.split("\n"):
        if line.strip():
            return line.rstrip("\r")
    return ""


def sniff_sep(path: Path, header: str) -> str:
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
