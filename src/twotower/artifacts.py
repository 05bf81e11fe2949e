"""Files of a run directory, written atomically and read without unpickling.

Every write goes to a temporary file in the same folder and is renamed over the target, so a crash
leaves either the old file or the new one, never half of one. Tensors are stored as safetensors;
the optimizer state goes through ``torch.save`` and is read back with ``weights_only=True``.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import ArtifactError, storage_error


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    A file-system failure (full disk, read-only, permission, a file where a folder should be) becomes
    a ``StorageError`` naming ``path`` (``errors.storage_error``), with the temporary file gone."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        tmp = new_temp_file(path)
    except OSError as e:
        raise storage_error(e, path) from None
    try:
        yield Path(tmp)
        # Writers that replace the prepared file rather than write into it (safetensors) leave the
        # 0600 of their own temporary file; the artifact gets what a plain open() would give.
        _give_umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        _remove_quietly(tmp)
        err = storage_error(e, path) if isinstance(e, Exception) else None
        if err is not None:
            raise err from None
        raise


def umask() -> int:
    """The process's umask, read without changing it (``os.umask`` sets it to read it, which races
    with threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _give_umask_mode(path: str | Path) -> None:
    try:
        os.chmod(path, 0o666 & ~umask())
    except OSError:  # a file system without modes (vfat): whatever it gives is what a plain open() gives
        pass


def _remove_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


def remove_stale_temporaries(folder: str | Path, names: list[str] | None = None) -> list[Path]:
    """Remove the temporary files that writers killed mid-write left in ``folder`` (``.NAME.XXXX.tmp``
    of ``atomic_path``); only those of the targets ``names`` when given. Call it holding the folder's
    lock (``locks``): no live writer owns them then. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        if not _TEMPORARY.match(p.name) or (names is not None and p.name[1:].rsplit(".", 2)[0] not in names):
            continue
        if p.is_file() and not p.is_symlink():
            _remove_quietly(p)
            removed.append(p)
    return removed


def reserve(path: str | Path, nbytes: int) -> None:
    """Allocate ``nbytes`` for a file about to be written through a memory map: a full disk is then an
    error here, not a SIGBUS in the middle of the writes (tmpfs and most file systems)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # the file system cannot reserve: write and hope
            return
        raise storage_error(e, path) from None
    finally:
        os.close(fd)


def new_temp_file(path: Path) -> Path:
    """An empty ``.NAME.XXXXXXXXXXXX.tmp`` beside ``path``, mode 0666 minus the umask."""
    # Not tempfile.mkstemp: it creates mode 0600, and the rename would carry that onto the artifact,
    # so a run trained by one account could not be served by another. 0666 minus the umask is what
    # a plain open() gives.
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: cannot create a temporary file beside {path.name}")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Rewrite the JSON-lines file with one more record (atomic: a crash never leaves a torn line)."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    write_text(path, old + json.dumps(obj, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing. Is this a run directory written by `twotower train`?") from None
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{path}: corrupted (not UTF-8 at byte {e.start}). Re-run the command that wrote it") from None
    except OSError as e:
        raise storage_error(e, path, "read") from None
    return parse_json(text, path)


def parse_json(text: str, path: str | Path) -> Any:
    """JSON text of an artifact; nesting too deep for the parser (a hostile or damaged file) is
    refused like any other corruption, not a ``RecursionError``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: corrupted ({e}). Re-run the command that wrote it") from None
    except RecursionError:
        raise ArtifactError(f"{path}: corrupted (nested too deeply to be a twotower file). Re-run the command "
                            "that wrote it") from None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: missing. Is this a run directory written by `twotower train`?")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise ArtifactError(f"{path}: cannot read weights ({e}). The file is corrupted or truncated; re-run training") from None


def save_torch_state(path: str | Path, state: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_torch_state(path: str | Path) -> Any:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing") from None
    except Exception as e:
        raise ArtifactError(f"{path}: cannot read ({e}). The file is corrupted or not written by twotower") from None


def save_numpy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def committed_dir(final: str | Path, marker: str) -> Path | None:
    """The complete copy of a folder written with ``replace_dir``: ``final`` if it holds ``marker``,
    else the copy a crash left beside it mid-swap, else ``None``. Reads only, so every process of a
    multi-process run may call it."""
    final = Path(final)
    for d in (final, final.with_name(final.name + ".new"), final.with_name(final.name + ".old")):
        if (d / marker).is_file():
            return d
    return None


def settle_dir(final: str | Path, marker: str) -> Path | None:
    """Finish a ``replace_dir`` swap that a crash cut short: the complete copy put in place as
    ``final`` and the other copies removed. Returns ``final``, or ``None`` (nothing touched) when no
    copy is complete. Safe to be killed at any point: the complete copy is moved, never cleared."""
    final = Path(final)
    done = committed_dir(final, marker)
    if done is None:
        return None
    if done != final:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(done, final)
    for stale in (final.with_name(final.name + ".new"), final.with_name(final.name + ".old")):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def staging_dir(final: str | Path, marker: str) -> Path:
    """An empty ``FINAL.new`` to write the next version of ``final`` into, its ``marker`` file last.
    A swap cut short by a crash is finished first, so the one complete copy is never the one cleared."""
    final = Path(final)
    new, old = final.with_name(final.name + ".new"), final.with_name(final.name + ".old")
    settle_dir(final, marker)
    shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    new.mkdir(parents=True)
    return new


def replace_dir(new: str | Path, final: str | Path) -> None:
    """Put the completed folder ``new`` in place of ``final``. Folders cannot be renamed over one
    another, so this takes two renames; a crash between them leaves both copies beside ``final``
    and ``committed_dir`` finds the complete one."""
    new, final = Path(new), Path(final)
    old = final.with_name(final.name + ".old")
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def load_numpy(path: str | Path, fix: str = "re-run the command that wrote it") -> np.ndarray:
    """An ``.npy`` array, never unpickled: an object array (a pickle inside) is refused like a
    truncated or foreign file, with ``fix`` in the message."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; {fix}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ArtifactError(f"{path}: cannot read ({e}); the file is corrupted, truncated or holds Python "
                            f"objects, which are never unpickled. {fix[:1].upper()}{fix[1:]}") from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str | Path, name: str) -> dict[str, str]:
    """Record the sha256 of every file at the top of ``folder`` (not its subfolders, not hidden
    files) in the JSON file ``name`` there: ``{"sha256": {file: digest}}``."""
    folder = Path(folder)
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir())
             if p.is_file() and p.name != name and not p.name.startswith(".")}
    write_json(folder / name, {"sha256": files})
    return files


def verify_manifest(folder: str | Path, name: str) -> None:
    """Refuse a folder whose files do not match the manifest ``name`` written by ``write_manifest``
    (corrupted, truncated, or swapped in from another run)."""
    folder = Path(folder)
    m = read_json(folder / name)
    recorded = m.get("sha256") if isinstance(m, dict) else None
    if not isinstance(recorded, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in recorded.items()):
        raise ArtifactError(f"{folder / name}: not a manifest written by twotower (no table of sha256 digests). "
                            "Re-run training, or restore the run from a backup")
    bad = []
    for file, digest in recorded.items():
        f = folder / file
        if not is_plain_name(file):
            bad.append(f"{file!r} is not a file name of this folder (a manifest lists only the files beside it)")
        elif f.is_symlink():
            bad.append(f"{file} is a symbolic link (a run directory holds its own files)")
        elif not f.is_file():
            bad.append(f"{file} is missing")
        elif sha256_file(f) != digest:
            bad.append(f"{file} does not match its recorded sha256 (corrupted, truncated or from another run)")
    if bad:  # a damaged manifest may list thousands of names: the first few say enough
        more = f"; and {len(bad) - 5:,} more" if len(bad) > 6 else ""
        raise ArtifactError(f"{folder}: " + "; ".join(bad[:5] if more else bad) + more
                            + ". Re-run training, or restore the files from a backup")


def is_plain_name(name: str) -> bool:
    """A file name of the folder itself: not a path, not ``..``, not hidden, no NUL byte."""
    return (bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\x00" not in name
            and not name.startswith("."))


def _json_default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
