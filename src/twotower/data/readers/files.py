"""A data file's bytes: existence checks, gzip, text decoding, and format detection (Parquet or
delimited text, and which separator)."""
from __future__ import annotations

import difflib
import zlib
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

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


@dataclass(frozen=True)
class ReadLimits:
    """How much a compressed input may expand (``data.max_decompressed_mb``,
    ``data.max_compression_ratio``): past ``max_bytes`` in all, or past ``max_ratio`` output bytes
    per input byte once ``ratio_after`` bytes came out, the reader stops and refuses the file."""

    max_bytes: int = 8192 << 20
    max_ratio: int = 256
    ratio_after: int = 64 << 20


_LIMITS: ContextVar[ReadLimits] = ContextVar("twotower_read_limits", default=ReadLimits())


def read_limits_now() -> ReadLimits:
    return _LIMITS.get()


@contextmanager
def read_limits(max_decompressed_mb: int, max_compression_ratio: int) -> Iterator[ReadLimits]:
    """The limits for the readers called inside the block (``load_dataset`` sets the config's)."""
    limits = ReadLimits(int(max_decompressed_mb) << 20, int(max_compression_ratio))
    token = _LIMITS.set(limits)
    try:
        yield limits
    finally:
        _LIMITS.reset(token)


def gunzip(path: Path, raw: bytes) -> bytes:
    """Decompress gzip data (every member of a multi-member file), counting as it goes: refused as
    soon as the output passes the limits (``ReadLimits``), so a decompression bomb costs what came
    out before the limit, not the whole expansion."""
    limits = read_limits_now()
    out = bytearray()
    view = memoryview(raw)
    pos, step = 0, 1 << 16
    d = zlib.decompressobj(wbits=31)
    try:
        while True:
            if d.eof:
                rest = d.unused_data
                pos = len(raw) - len(rest)
                if not rest.strip(b"\x00"):  # trailing zero padding after the last member is allowed
                    break
                if rest[:2] != _GZIP_MAGIC:
                    raise zlib.error("trailing garbage after the gzip data")
                d = zlib.decompressobj(wbits=31)
            if pos >= len(raw) and not d.unconsumed_tail:
                raise EOFError("compressed data ended before the end-of-stream marker")
            chunk = d.unconsumed_tail or view[pos:pos + step]
            if not d.unconsumed_tail:
                pos += len(chunk)
            out += d.decompress(chunk, 1 << 20)
            consumed = pos - len(d.unconsumed_tail)
            if len(out) > limits.max_bytes:
                raise _too_large(path, f"decompresses to more than {limits.max_bytes >> 20:,} MiB",
                                 "if the file is genuine, raise data.max_decompressed_mb")
            if len(out) > limits.ratio_after and len(out) > limits.max_ratio * max(consumed, 1):
                raise _too_large(path, f"expands more than {limits.max_ratio}-fold ({len(out) >> 20:,} MiB out of the "
                                       f"first {consumed / 1024:,.0f} KiB): a decompression bomb, or not a table",
                                 "if the file is genuine, raise data.max_compression_ratio")
    except (EOFError, zlib.error) as exc:
        raise DataError(
            path,
            f"gzip data is truncated or corrupt ({exc})",
            "the file was cut short (interrupted download or copy); fetch or compress it again",
            where="gzip stream",
        ) from None
    return bytes(out)


def _too_large(path: Path, problem: str, fix: str) -> DataError:
    return DataError(path, f"gzip data {problem}", fix, where="gzip stream")


# Read as text these were refused as "not valid UTF-8", which sent the user to iconv.
_OTHER_COMPRESSIONS = ((b"\xfd7zXZ\x00", "xz"), (b"PK\x03\x04", "zip"), (b"\x28\xb5\x2f\xfd", "zstd"),
                       (b"7z\xbc\xaf\x27\x1c", "7-zip"))


def _other_compression(raw: bytes) -> str | None:
    """The compression other than gzip that ``raw`` starts with, if any (bzip2: ``BZh``, a level
    digit and a block or end-of-stream magic, so a text header that starts with ``BZh`` is text)."""
    if raw[:3] == b"BZh" and raw[3:4].isdigit() and raw[4:10] in (b"1AY&SY", b"\x17\x72\x45\x38\x50\x90"):
        return "bzip2"
    return next((kind for magic, kind in _OTHER_COMPRESSIONS if raw.startswith(magic)), None)


def read_raw(path: Path) -> bytes:
    """Read a file's bytes, decompressing gzip (by magic bytes or a ``.gz`` suffix) within the
    limits of ``read_limits``."""
    try:
        raw = path.read_bytes()
    except OSError as exc:  # pragma: no cover
        raise DataError(path, f"cannot read the file ({exc.strerror})", "check its permissions")
    if raw[:2] == _GZIP_MAGIC:
        raw = gunzip(path, raw)
        if not raw.strip():
            raise DataError(
                path, "file is empty after decompression", "recreate the file with its rows"
            )
    elif kind := _other_compression(raw):
        raise DataError(
            path,
            f"the file is {kind} compressed; the readers open gzip only",
            "decompress it, or compress it with gzip instead",
            where="byte 0",
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
