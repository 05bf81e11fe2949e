"""Download MovieLens 100K, verified and extracted atomically.

Being offline is a normal case: :func:`fetch_movielens_100k` then logs one line and returns
``None`` so the caller can fall back (e.g. to synthetic data). Tests never touch the network: they
patch ``urllib.request.urlopen``, which is looked up at call time.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from twotower.data.paths import default_data_dir
from twotower.errors import DataError

log = logging.getLogger(__name__)

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
ML100K_MD5 = "0e33842e24a9c977be4e0107933c0723"
ML100K_DIRNAME = "ml-100k"
_CHUNK = 1 << 16

__all__ = ["ML100K_URL", "ML100K_MD5", "ML100K_DIRNAME", "fetch_movielens_100k", "default_data_dir"]


def fetch_movielens_100k(data_dir=None, timeout: float = 10.0, progress: bool = True) -> Path | None:
    """Return the directory holding MovieLens 100K (``<data_dir>/ml-100k``), downloading it if needed.

    * ``<data_dir>/ml-100k/u.data`` exists: return that directory; no network.
    * Otherwise download :data:`ML100K_URL` (``timeout`` seconds per socket operation), check its
      MD5 against :data:`ML100K_MD5`, extract it into a temporary directory inside ``data_dir``
      and rename it into place, then return the path.
    * No network (``URLError``, timeout, any ``OSError`` or broken HTTP response while
      downloading): log one line and return ``None``; nothing is left behind.
    * Checksum mismatch or an unreadable archive: raise :class:`DataError`; nothing is left behind.

    ``data_dir`` defaults to :func:`default_data_dir`. ``progress`` reports download progress on
    stderr (a rewritten line on a terminal, otherwise only a start and end line).
    """
    data_dir = Path(default_data_dir() if data_dir is None else data_dir).expanduser()
    target = data_dir / ML100K_DIRNAME
    if (target / "u.data").is_file():
        return target

    created = not data_dir.exists()
    data_dir.mkdir(parents=True, exist_ok=True)
    archive = None
    try:
        archive = _download(data_dir, timeout, progress)
        if archive is None:
            return None
        return _extract(archive, data_dir, target)
    finally:
        if archive is not None:
            archive.unlink(missing_ok=True)
        if created:
            try:
                data_dir.rmdir()  # only succeeds if we created it and left it empty
            except OSError:
                pass


def _download(data_dir: Path, timeout: float, progress: bool) -> Path | None:
    """Stream the zip into a temp file in ``data_dir``, verify its MD5; None when offline."""
    fd, name = tempfile.mkstemp(prefix=".ml-100k-", suffix=".zip.part", dir=data_dir)
    part = Path(name)
    md5 = hashlib.md5()
    report = _Progress(progress)
    try:
        with os.fdopen(fd, "wb") as out:
            with urllib.request.urlopen(ML100K_URL, timeout=timeout) as response:
                total = _content_length(response)
                report.start(total)
                done = 0
                while True:
                    chunk = response.read(_CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    md5.update(chunk)
                    done += len(chunk)
                    report.update(done, total)
                report.finish(done)
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        part.unlink(missing_ok=True)
        report.abort()
        reason = getattr(exc, "reason", None) or exc
        log.warning("could not download %s (%s); falling back", ML100K_URL, reason)
        return None
    except BaseException:
        part.unlink(missing_ok=True)
        raise

    got = md5.hexdigest()
    expected = ML100K_MD5.lower()
    if got != expected:
        part.unlink(missing_ok=True)
        raise DataError(
            ML100K_URL,
            f"checksum mismatch for the downloaded ml-100k.zip: expected MD5 {expected}, got {got}",
            fix=(f"Nothing was kept. Delete {data_dir / ML100K_DIRNAME} if it exists and retry; if it "
                 f"persists, download the zip by hand and unzip it into {data_dir}"),
        )
    return part


def _extract(archive: Path, data_dir: Path, target: Path) -> Path:
    """Extract ``archive`` into a temp dir in ``data_dir`` and rename ``ml-100k`` into place."""
    staging = Path(tempfile.mkdtemp(prefix=".ml-100k-extract-", dir=data_dir))
    try:
        try:
            with zipfile.ZipFile(archive) as zf:
                root = staging.resolve()
                for member in zf.namelist():
                    dest = (staging / member).resolve()
                    if dest != root and root not in dest.parents:
                        raise DataError(ML100K_URL, f"archive member {member!r} points outside the "
                                        "extraction directory", fix="Do not use this archive")
                zf.extractall(staging)
        except zipfile.BadZipFile as exc:
            raise DataError(ML100K_URL, f"the downloaded archive is not a valid zip file ({exc})",
                            fix="Retry the download") from None
        extracted = staging / ML100K_DIRNAME
        if not (extracted / "u.data").is_file():
            raise DataError(ML100K_URL, f"the archive has no {ML100K_DIRNAME}/u.data",
                            fix="Retry the download; if it persists the upstream archive has changed")
        if target.exists():
            if (target / "u.data").is_file():  # another process won the race
                return target
            # A leftover without u.data (e.g. an interrupted manual copy): move it aside and drop it.
            aside = Path(tempfile.mkdtemp(prefix=".ml-100k-old-", dir=data_dir))
            os.replace(target, aside / ML100K_DIRNAME)
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(extracted, target)
        log.info("MovieLens 100K is in %s", target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _content_length(response) -> int | None:
    try:
        value = response.headers.get("Content-Length")
        return int(value) if value else None
    except (AttributeError, TypeError, ValueError):
        return None


class _Progress:
    """Minimal download progress on stderr."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tty = enabled and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        self._last = -1

    def start(self, total):
        if self.enabled:
            size = f" ({total / 1e6:.1f} MB)" if total else ""
            end = "" if self.tty else "\n"
            sys.stderr.write(f"downloading {ML100K_URL}{size}{end}")
            sys.stderr.flush()

    def update(self, done, total):
        if self.tty and total:
            pct = int(100 * done / total)
            if pct != self._last:
                self._last = pct
                sys.stderr.write(f"\rdownloading {ML100K_URL}: {pct:3d}%")
                sys.stderr.flush()

    def finish(self, done):
        if self.enabled:
            prefix = "\r" if self.tty else ""
            sys.stderr.write(f"{prefix}downloaded {ML100K_URL} ({done / 1e6:.1f} MB)\n")
            sys.stderr.flush()

    def abort(self):
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()
