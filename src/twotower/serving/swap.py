"""Moving a running service to a new run and index without dropping a request.

The handlers of ``service.py`` read the model they answer with from one place, ``ModelSlot.current``
(a ``Served``: the ``Recommender``, its ``Catalog`` and its metadata), once per request or per
micro-batch, and keep that reference until they have answered. A swap loads the new run and index
on a thread of its own, warms them (a few queries of every kind, so the first requests after the
swap do not pay for first use), and only then replaces ``current`` in one assignment: requests
being computed finish on the old model, the next ones use the new one, and nothing is refused or
paused. A load that fails (a corrupted manifest, a missing index, weights that do not match) leaves
the old model serving and says why in the log and the admin response (``/metadata`` says that the
last swap failed, not why: the reason names files on the server).

Two ways to ask for a swap, both off unless ``twotower serve`` is told:

- ``POST /admin/swap`` ``{"run": PATH, "index": PATH}`` (both optional: the run being served and its
  default index folder), with ``Authorization: Bearer TOKEN``; the token comes from a file
  (``--admin-token-file``) or from ``TWOTOWER_ADMIN_TOKEN`` (``--admin-token-from-env``) and is
  compared in constant time. The answer comes once the new model serves (200), or says why it
  does not (422: the run cannot be loaded; 409: another swap is loading).
- ``--watch``: the run path is polled every ``--watch-interval`` seconds. Point it at a symbolic
  link (``runs/current -> runs/v7``) and switch the link atomically (``ln -s v8 runs/tmp && mv -T
  runs/tmp runs/current``); a new manifest or a new index in the run directory triggers a reload
  as well. A target that fails to load is not tried again until it changes.
"""
from __future__ import annotations

import gc
import hashlib
import hmac
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError, TwotowerError
from .catalog import Catalog
from .query import MAX_K, Query, Recommender

TOKEN_ENV = "TWOTOWER_ADMIN_TOKEN"
MIN_TOKEN_CHARS = 16
LOAD_NICE = 10  # how much lower the loading thread's priority is than the server's


def lower_priority(by: int) -> None:
    """Raise the calling thread's nice value by ``by`` (Linux: niceness is per thread; elsewhere,
    or without permission, nothing changes)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except (AttributeError, OSError):
        pass


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass(frozen=True)
class Served:
    """One loaded model as the handlers see it; never changed after it is made. ``path`` is the run
    path as given (what a reload loads again); ``serving`` what ``/metadata`` says of it: names, not
    where they lie on the server."""

    recommender: Recommender
    catalog: Catalog
    metadata: dict
    serving: dict
    path: str

    @classmethod
    def of(cls, recommender: Recommender, run_arg: str | Path | None = None, index_arg: str | Path | None = None,
           generation: int = 0) -> "Served":
        run = recommender.run
        info = recommender.index.info
        path = str(run_arg if run_arg is not None else run.path)
        serving = {
            "run": Path(path).name,
            "run_resolved": Path(os.path.realpath(run.path)).name,  # where a symbolic link points
            "index": None if index_arg is None else Path(index_arg).name,
            "weights_sha256": run.dir.model_digest(),
            "index_sha256": info.get("index_sha256"),
            "index_saved": info.get("saved", True),
            "loaded_at": now(),
            "generation": generation,
        }
        return cls(recommender, Catalog(recommender), recommender.metadata(), serving, path)


@dataclass
class SwapSettings:
    """How ``twotower serve`` may move to another model: the run path as given (a symbolic link
    stays one: reloads and the watcher follow it), the admin token (``None``: no admin route),
    watching and its poll interval (off by default), and what every load uses (the category
    feature, ``max_k``, whether a saved index is required)."""

    run: str | Path | None = None
    token: str | None = None
    watch: bool = False
    interval: float = 2.0
    category_feature: str | None = None
    max_k: int = MAX_K
    require_index: bool | None = None   # None: required when the model served at start has a saved index
    log: Callable[[str], None] | None = None

    def __post_init__(self):
        if self.token is not None:
            check_token(self.token)
        if self.watch and self.run is None:
            raise ConfigError("watching needs the run path to watch (SwapSettings.run)")
        if not 0.05 <= float(self.interval) <= 3600:
            raise ConfigError(f"watch interval must be between 0.05 and 3600 seconds, got {self.interval}")


def check_token(token: str) -> str:
    if len(token) < MIN_TOKEN_CHARS or token != token.strip():
        raise ConfigError(f"the admin token must be at least {MIN_TOKEN_CHARS} characters without surrounding spaces; "
                          "make one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return token


def read_token(file: str | Path | None = None, from_env: bool = False) -> str | None:
    """The admin token: the first line of ``file``, or ``$TWOTOWER_ADMIN_TOKEN`` with ``from_env``;
    ``None`` when neither is asked for (no admin route)."""
    if file is not None and from_env:
        raise ConfigError("give the admin token either in a file (--admin-token-file) or in the environment "
                          "(--admin-token-from-env), not both")
    if file is not None:
        p = Path(file)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{p}: admin token file not found; write the token on its first line") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot read the admin token ({e}); write it as UTF-8 text on the first line") from None
        if p.stat().st_mode & 0o077:
            print(f"warning: {p} can be read by other accounts; `chmod 600 {p}`", file=sys.stderr, flush=True)
        return check_token(text.splitlines()[0].strip() if text.strip() else "")
    if from_env:
        value = os.environ.get(TOKEN_ENV)
        if not value:
            raise ConfigError(f"--admin-token-from-env: the environment variable {TOKEN_ENV} is not set")
        return check_token(value)
    return None


def token_matches(given: str | None, token: str) -> bool:
    """Constant-time comparison (``hmac.compare_digest``) of the bearer token a request sent."""
    return given is not None and hmac.compare_digest(given.encode("utf-8", "surrogatepass"), token.encode("utf-8"))


class SwapBusy(Exception):
    """Another swap is loading."""


@dataclass
class SwapRecord:
    at: str
    run: str
    by: str
    ok: bool
    seconds: float
    error: str | None = None
    generation: int | None = None

    def to_dict(self, public: bool = False) -> dict:
        """The record; ``public``: for ``/metadata``, the run by name and without the error text
        (which names files on the server: the log and the admin response have it)."""
        out = {k: getattr(self, k) for k in ("at", "run", "by", "ok", "seconds", "error", "generation")}
        if public:
            out["run"] = Path(self.run).name
            del out["error"]
        return out


@dataclass
class ModelSlot:
    """The model the handlers read (``current``), replaced whole by ``Swapper``; and the record of
    the swaps so far."""

    current: Served
    swaps: int = 0
    last: SwapRecord | None = None
    history: list = field(default_factory=list)

    def describe(self, public: bool = True) -> dict:
        """The ``serving`` block of ``/metadata``: what serves now, and how the last swap went
        (``public=False``: with the failure's reason, for the admin response)."""
        last = None if self.last is None else self.last.to_dict(public)
        return {**self.current.serving, "swaps": self.swaps, "last_swap": last}


def warm(recommender: Recommender, users: int = 32) -> None:
    """A few requests of every kind through ``recommender`` before it serves: known users, a new
    user by history, similar items (first use builds caches; the index's pages are read)."""
    run = recommender.run
    k = min(100, recommender.max_k)
    active = np.flatnonzero(run.known.lengths() > 0)[:users]
    queries = [Query(user=u, k=k) for u in run.users.decode(active).tolist()]
    items = run.items.decode(recommender.index.contains(np.arange(min(recommender.index.n_items, 64))).nonzero()[0][:4])
    if len(items):
        queries.append(Query(history=items.tolist(), k=k))
        recommender.similar(items[0], k=min(10, k))
    for r in recommender.recommend_many(queries):
        if isinstance(r, Exception):  # a known user refused by the model it was drawn from: a broken run
            raise r


class Swapper:
    """Loads a run and its index, warms it and puts it in ``slot``; one swap at a time."""

    HISTORY = 100  # swap records kept

    def __init__(self, slot: ModelSlot, settings: SwapSettings):
        self.slot = slot
        self.settings = settings
        self._lock = threading.Lock()
        self.loading: tuple[str, str] | None = None
        self.log = settings.log or (lambda m: print(m, file=sys.stderr, flush=True))
        require = settings.require_index
        self.require_index = slot.current.serving["index_saved"] if require is None else bool(require)

    def load(self, run: str | Path, index: str | Path | None = None) -> Recommender:
        """A warmed ``Recommender`` over ``run`` (and ``index``, else ``RUN/index``), built on a
        thread of its own at a lower scheduling priority (``LOAD_NICE``): on a core shared with the
        event loop, the loop runs first and the load takes what is left (measured on one core, a
        100k-item run loading beside a thread that needs 40 % of the core: that thread's wake-ups
        late by 120 to 210 ms at the median at equal priority, 1 to 2 ms with the loader at nice 10;
        the load takes twice as long)."""
        from ..run import Run

        out: dict[str, Any] = {}

        def work():
            lower_priority(LOAD_NICE)
            try:
                rec = Recommender.load(Run(run), index, category_feature=self.settings.category_feature,
                                       require_index=self.require_index, max_k=self.settings.max_k)
                warm(rec)
                out["rec"] = rec
            except BaseException as e:  # handed to the caller's thread
                out["error"] = e

        t = threading.Thread(target=work, name="twotower-load", daemon=True)
        t.start()
        t.join()
        if "error" in out:
            raise out["error"]
        return out["rec"]

    def _record(self, record: SwapRecord) -> SwapRecord:
        self.slot.last = record
        self.slot.history = (self.slot.history + [record])[-self.HISTORY:]
        return record

    def swap_to(self, run: str | Path | None = None, index: str | Path | None = None, by: str = "admin") -> SwapRecord:
        """Load ``run`` (default: the run path being served) and serve it. Raises ``SwapBusy`` while
        another swap loads; any other failure is recorded, logged and returned (``ok`` false) and
        the old model keeps serving."""
        run = str(run if run is not None else self.slot.current.path)
        if not self._lock.acquire(blocking=False):
            raise SwapBusy(f"a swap is already loading {self.loading[0]} (since {self.loading[1]}); try again when it ends")
        t0 = time.perf_counter()
        try:
            self.loading = (run, now())
            old = self.slot.current
            try:
                new = Served.of(self.load(run, index), run, index, generation=old.serving["generation"] + 1)
            except Exception as e:  # whatever went wrong, the old model keeps serving
                reason = str(e) if isinstance(e, (TwotowerError, OSError)) else f"{type(e).__name__}: {e}"
                record = self._record(SwapRecord(now(), run, by, False, time.perf_counter() - t0, reason))
                self.log(f"swap to {run} failed, still serving {old.path} "
                         f"(generation {old.serving['generation']}): {reason}")
                return record
            self.slot.current = new  # the one assignment the handlers see
            self.slot.swaps += 1
            record = self._record(SwapRecord(now(), run, by, True, time.perf_counter() - t0, None, new.serving["generation"]))
            del old
            refreeze()
            self.log(f"now serving {run} (generation {new.serving['generation']}, weights "
                     f"{(new.serving['weights_sha256'] or '?')[:12]}), loaded and warmed in {record.seconds:.1f}s")
            return record
        finally:
            self.loading = None
            self._lock.release()


def refreeze() -> None:
    """Keep the garbage collector away from the new model, as ``serving.service.serve`` does for the
    first one (``gc.freeze``), when the process froze its objects. No collection first: it would
    hold the interpreter lock for about 0.1 s (measured on Gowalla) while requests wait, and it
    finds nothing: a model holds no reference cycles, so the old one is freed by reference counting
    as soon as the last request using it has answered (measured: 0 objects collected after four
    swaps, resident memory flat after the second)."""
    if gc.get_freeze_count():
        gc.freeze()


def watch_signature(path: str | Path) -> tuple:
    """What the watcher compares: where ``path`` points, and the bytes of its manifest and of its
    index record (both written last by the commands that change them)."""
    from ..index.index import META_FILE
    from ..run_dir import MANIFEST, RunDir

    real = os.path.realpath(path)

    def digest(p: Path) -> str | None:
        try:
            return hashlib.sha256(p.read_bytes()).hexdigest()
        except OSError:
            return None

    index = RunDir(real).index_dir
    from ..artifacts import committed_dir

    index = committed_dir(index, META_FILE) or index
    return real, digest(Path(real) / MANIFEST), digest(index / META_FILE)


class Watcher:
    """Polls ``path`` and swaps when ``watch_signature`` changes (a thread; ``stop`` ends it)."""

    def __init__(self, swapper: Swapper, path: str | Path, interval: float = 2.0):
        self.swapper, self.path, self.interval = swapper, str(path), float(interval)
        self.seen = watch_signature(self.path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="twotower-watch", daemon=True)

    def start(self) -> "Watcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def check(self) -> SwapRecord | None:
        """One poll: swap when the signature changed (once per change, whether the load works or not)."""
        sig = watch_signature(self.path)
        if sig == self.seen:
            return None
        try:
            rec = self.swapper.swap_to(self.path, by="watch")
        except SwapBusy:
            return None  # an admin swap is loading: look again at the next poll
        self.seen = sig
        return rec

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception as e:  # never let the watcher die
                self.swapper.log(f"watch: {type(e).__name__}: {e}")


__all__ = ["ModelSlot", "Served", "SwapSettings", "Swapper", "SwapBusy", "SwapRecord", "Watcher", "read_token",
           "token_matches", "warm", "TOKEN_ENV"]
