"""One writer at a time: the lock of what a command writes (a run directory, an index folder, an
output file).

Two ``twotower train --out SAME`` started together both found the directory empty and then wrote
into it at once (interleaved epoch lines, a config of one run beside the metrics of the other).
Every command that writes now holds the lock of its target for as long as it writes:

- a folder's lock is ``FOLDER/.twotower.lock`` (a folder that did not exist is created for it, and
  removed again on release if the command left it empty, so a refused command leaves nothing);
- a file's lock is ``.NAME.lock`` beside it, and so is the lock of a folder that is swapped in whole
  (``beside``: ``twotower export`` renames its folder, which would carry a lock inside it away).

The lock file holds the owner's pid, host, command and start time, which the refusal quotes. The
exclusion itself is ``flock`` on the open lock file: the kernel drops it when its holder dies, even
by SIGKILL, so a lock file whose ``flock`` is free was left by a dead process: it is taken over (and
the take-over is logged). Where the file system has no ``flock``, the recorded pid decides: a lock
of this host whose process is gone (or is another process by now: its start time differs) is stale;
a lock of another host is honoured, and the message says which file to remove once that process
is known to be gone. The lock is re-entrant within a process (the CLI takes it before checking
that ``--out`` is empty, ``api.train`` takes it again).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import LockedError, StorageError, storage_error

FOLDER_LOCK = ".twotower.lock"
_HELD: dict[str, int] = {}  # lock files this process holds -> depth (re-entrant)


def lock_path(target: str | Path, folder: bool = True, name: str | None = None) -> Path:
    """Where the lock of ``target`` lives: inside a folder (``name``, default ``.twotower.lock``), or
    ``.NAME.lock`` beside a file."""
    target = Path(target)
    if folder:
        return target / (name or FOLDER_LOCK)
    return target.with_name(f".{target.name}.lock")


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22): with the pid,
    it tells a live holder from a later process that reused its pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the process recorded in a lock file may still run (``True`` when it cannot be told:
    another host, or no pid)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True
    pid = holder["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another account's process: alive
    recorded, now = holder.get("proc_start"), _proc_start(pid)
    return recorded is None or now is None or recorded == now


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 4096)
        holder = json.loads(data.decode("utf-8")) if data.strip() else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


def describe(holder: dict) -> str:
    """``twotower train (pid 123 on host, since 2025-01-01T10:00:00)``, from a lock file's content."""
    if not holder:
        return "another process"
    return (f"{holder.get('command', 'another process')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"since {holder.get('started', '?')})")


def _refusal(target: Path, lock: Path, holder: dict, what: str) -> LockedError:
    fix = "wait for it to finish, or choose another --out"
    if holder.get("host") not in (None, socket.gethostname()):
        fix += f"; if that process is gone, remove {lock}"
    return LockedError(f"{target}: {describe(holder)} is writing this {what}. One writer at a time: {fix}")


class Lock:
    """A held lock (``exclusive``): its file, what it protects and who held it before, if it was stale."""

    def __init__(self, path: Path, target: Path, taken_over: dict | None):
        self.path, self.target, self.taken_over = path, target, taken_over


@contextmanager
def exclusive(target: str | Path, command: str, folder: bool = True, name: str | None = None,
              log: Callable[[str], None] | None = None, beside: bool = False) -> Iterator[Lock]:
    """Hold the lock of ``target`` (a folder, or a file when ``folder`` is false) while the block runs;
    refuse with ``LockedError`` naming the holder when another live process holds it. Released on
    exit, on error and (by the kernel) when the process dies. ``beside``: a folder's lock is
    ``.NAME.lock`` next to it (for a folder replaced by renames), and the folder is not created."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    target = Path(target)
    what = "folder" if folder else "file"
    created: list[Path] = []
    try:
        if folder:
            if target.exists() and not target.is_dir():
                raise StorageError(target, "is a file, not a folder", "choose a folder (a new or empty one) for --out")
            created = _make_dirs(target.parent if beside else target)
        else:
            if target.is_dir():
                raise StorageError(target, "is a folder, not a file", "give a file name, e.g. --out recs.parquet")
            created = _make_dirs(target.parent)
    except OSError as e:
        raise storage_error(e, target) from None
    path = lock_path(target, folder and not beside, name)
    key = os.path.realpath(path)
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield Lock(path, target, None)
        finally:
            _HELD[key] -= 1
        return
    fd = None
    try:
        fd, taken_over = _acquire(path, target, command, what)
        if taken_over:
            log(f"{target}: took over the lock left by {describe(taken_over)}, which is no longer running")
        _HELD[key] = 1
        try:
            yield Lock(path, target, taken_over)
        finally:
            _HELD.pop(key, None)
            _unlink_quietly(path)
    finally:
        if fd is not None:
            os.close(fd)  # drops the flock, after the file is gone: a waiter finds a new file
        for d in reversed(created):  # made only for this lock and left empty: a refused command writes nothing
            try:
                d.rmdir()
            except OSError:
                break


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _make_dirs(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, outermost first."""
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    made = []
    for d in reversed(missing):
        try:
            d.mkdir()
            made.append(d)
        except FileExistsError:
            if not d.is_dir():
                raise
    return made


def _acquire(path: Path, target: Path, command: str, what: str) -> tuple[int, dict | None]:
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "proc_start": _proc_start(os.getpid())}
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:  # named by what the user gave (--out), not by our lock file
            raise storage_error(e, target) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flocked = True
            except BlockingIOError:
                raise _refusal(target, path, _read_holder(fd), what) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise storage_error(e, path) from None
                flocked = False  # no flock here: the recorded pid decides
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # released (and unlinked) between our open and our flock: take the new file
                os.close(fd)
                continue
            before = _read_holder(fd)
            if before and not flocked and _alive(before) and before.get("pid") != os.getpid():
                raise _refusal(target, path, before, what)
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode("utf-8"), 0)
            except OSError as e:  # a full disk: the lock is ours, so is removing it
                _unlink_quietly(path)
                raise storage_error(e, path) from None
            return fd, (before or None)
        except BaseException:
            os.close(fd)
            raise
    raise LockedError(f"{target}: the lock {path} keeps changing hands; try again")
