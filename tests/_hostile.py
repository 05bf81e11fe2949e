"""Helpers of the hostile suites (``test_hostile_*.py``): a tiny interactions file and config, the
command line run in this process or as a real subprocess, and the refusal contract (exit code 2,
one message naming the place and the fix, no traceback)."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

FAST = ["--quiet", "--set", "train.threads=1"]


def interactions_csv(n_users: int = 60, per_user: int = 8, n_items: int = 40, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    rows = ["user,item,time"]
    for u in range(1, n_users + 1):
        for t, i in enumerate(rng.choice(np.arange(1, n_items + 1), size=per_user, replace=False)):
            rows.append(f"{u},{i},{1000 + t}")
    return "\n".join(rows) + "\n"


def tiny_config(folder: Path, inter: str | None = None, extra: str = "") -> Path:
    """A config over ``folder/inter.csv`` (written when ``inter`` is None) that trains in a second."""
    data = folder / "inter.csv"
    if inter is None and not data.exists():
        data.write_text(interactions_csv())
    elif inter is not None:
        data.write_text(inter)
    cfg = folder / "tiny.toml"
    cfg.write_text(f'[data]\ndataset = "files"\ninteractions = "{data}"\ntime_col = "time"\n'
                   "[model]\ndim = 8\n[train]\nepochs = 2\nbatch_size = 64\nthreads = 1\n[eval]\nks = [5, 20]\n" + extra)
    return cfg


def cli(*args) -> tuple[int, str, str]:
    """``twotower ARGS`` in this process: (exit code, stdout, stderr)."""
    from twotower.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def env(**extra) -> dict:
    e = dict(os.environ)
    e.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")})
    e.update({k: str(v) for k, v in extra.items()})
    return e


def spawn(*args, prelude: str = "", **popen) -> subprocess.Popen:
    """``twotower ARGS`` as a real process; ``prelude`` is Python run before the command (to slow a
    step down, or to kill the process at a chosen point)."""
    code = f"import sys\n{prelude}\nfrom twotower.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *[str(a) for a in args]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=popen.pop("env", env()), **popen)


def run(*args, prelude: str = "", timeout: float = 300, **popen) -> tuple[int, str, str]:
    p = spawn(*args, prelude=prelude, **popen)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def assert_refused(result: tuple[int, str, str], *fragments: str) -> str:
    """Exit code 2, no traceback, exactly one error message (the last thing on stderr; a config's
    message lists its bad fields on the lines below it), holding every fragment. Returns it."""
    rc, _, err = result
    assert "Traceback" not in err, err
    assert rc == 2, (rc, err)
    lines = err.rstrip("\n").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("twotower") and ": error: " in line]
    assert len(starts) == 1, err
    message = "\n".join(lines[starts[0]:])
    assert all(line.startswith("  ") for line in lines[starts[0] + 1:]), err  # only a field list follows
    for f in fragments:
        assert f in message, (f, message)
    return message


def no_temporaries(folder: Path) -> list[Path]:
    """Temporary files of the atomic writer, and lock files, anywhere under ``folder``."""
    return [p for p in Path(folder).rglob(".*") if p.name.endswith((".tmp", ".lock"))]


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A small tmpfs mounted at ``path`` (root only; the caller skips elsewhere)."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def can_mount() -> str | None:
    """Why a tmpfs cannot be mounted here (``None`` when it can)."""
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs (full-disk and read-only file-system cases)"
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", d], capture_output=True)
        if r.returncode != 0:
            return f"cannot mount a tmpfs here ({r.stderr.decode().strip()})"
        subprocess.run(["umount", d], capture_output=True)
    return None
