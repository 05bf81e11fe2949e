"""Errors a user can act on.

Every error raised for bad input names the place (file, line or column), what was wrong, and what
to do about it. The CLI turns any ``TwotowerError`` into one message on stderr and exit code 2.
"""
from __future__ import annotations


class TwotowerError(Exception):
    """Base class for errors caused by the user's input, config or artifacts (not by a bug)."""


class DataError(TwotowerError):
    """A data file is missing, malformed or inconsistent.

    ``str(err)`` reads: ``<path>, <where>: <problem>. <fix>``
    """

    def __init__(self, path, problem: str, fix: str = "", where: str | None = None):
        self.path = str(path)
        self.where = where
        self.problem = problem
        self.fix = fix
        place = self.path if where is None else f"{self.path}, {where}"
        msg = f"{place}: {problem}"
        if fix:
            msg += f". {fix}" if not problem.endswith(".") else f" {fix}"
        super().__init__(msg)


class ConfigError(TwotowerError):
    """A configuration value is missing or invalid."""


class ArtifactError(TwotowerError):
    """A run directory or one of its files is missing, corrupted or from another run."""


class TrainingError(TwotowerError, FloatingPointError):
    """Training diverged (a non-finite loss): the config's learning rate or temperature does not work."""


class StorageError(TwotowerError):
    """The file system refused a read or a write: permission, read-only, full, a file where a folder
    is needed (or the reverse). ``str(err)`` reads ``<path>: <what happened>. <fix>``."""

    def __init__(self, path, problem: str, fix: str, errno_: int | None = None):
        self.path, self.problem, self.fix, self.errno = str(path), problem, fix, errno_
        super().__init__(f"{self.path}: {problem}. {fix[:1].upper()}{fix[1:]}")


class LockedError(TwotowerError):
    """Another process holds the lock of what this command would write."""


def _errno_of(exc: BaseException) -> int | None:
    """The errno behind ``exc``: an ``OSError``'s own, or one named in the text of the errors that
    libraries raise in its place (FAISS's ``RuntimeError``, PyTorch's writer, safetensors' error)."""
    import errno as _e
    import os

    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    text = str(exc)
    if isinstance(exc, TwotowerError):
        return None
    for code in (_e.ENOSPC, _e.EDQUOT, _e.EROFS, _e.EACCES, _e.EIO, _e.EFBIG):
        if os.strerror(code) in text:
            return code
    return None


def _full(path) -> bool:
    """The file system of ``path`` (or of its nearest existing parent) has (almost) no space left:
    some writers (PyTorch's zip writer) report a short write without its errno."""
    import os
    from pathlib import Path

    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20) or st.f_favail == 0


def storage_error(exc: BaseException, path=None, doing: str = "write", fix: str | None = None) -> StorageError | None:
    """The project's error for a file-system failure: one line naming the path, what the system said,
    and what to do. ``None`` when ``exc`` is not a file-system failure (a bug to let through).

    This is the one place that turns ``OSError`` (and library errors that carry an errno in their
    text) into a message; the atomic writer, the lock and the command line all come here."""
    import errno as _e

    code = _errno_of(exc)
    if code is None and doing == "write" and path is not None and not isinstance(exc, TwotowerError) and _full(path):
        code = _e.ENOSPC
    if code is None:
        return None
    path = path or getattr(exc, "filename", None) or "(unknown path)"
    where = f"cannot {doing}"
    known = {
        _e.ENOSPC: ("no space left on the device", "free space on that file system (or choose another place) and "
                    "run the command again; a training run continues with --resume"),
        _e.EDQUOT: ("the disk quota is exhausted", "free space within your quota (or choose another place) and run "
                    "the command again"),
        _e.EFBIG: ("the file would exceed the file system's size limit", "choose another file system"),
        _e.EROFS: ("the file system is read-only", "choose a writable place (another --out), or remount it writable"),
        _e.EACCES: ("permission denied", "check the permissions of that path (or choose another place)"),
        _e.EPERM: ("operation not permitted", "check the permissions and attributes of that path (or choose another place)"),
        _e.ENOTDIR: ("a part of the path is a file, not a folder", "choose a path whose parents are folders"),
        _e.EISDIR: ("is a folder, not a file", "give a file name"),
        _e.ENAMETOOLONG: ("the name is too long for the file system", "choose a shorter path"),
        _e.ENOENT: ("no such file or folder", "check the path"),
        _e.EIO: ("input/output error from the device", "check the disk (dmesg); the file system may be failing"),
    }
    problem, default_fix = known.get(code, (getattr(exc, "strerror", None) or str(exc).splitlines()[0], "check that path"))
    return StorageError(path, f"{where}: {problem}", fix or default_fix, code)


class FeatureInputError(TwotowerError, ValueError):
    """A feature value given at request time (a new user's features, an item's, a request's context)
    that its encoder cannot take: the wrong kind of value, a missing value where the declaration
    refuses them, a vector of the wrong length. The service answers 422 with the message."""

    def __init__(self, feature: str, problem: str, fix: str = "", row: int | None = None):
        self.feature, self.problem, self.fix, self.row = feature, problem, fix, row
        super().__init__(f"feature {feature!r}: {problem}" + (f"; {fix}" if fix else ""))
