"""Crash safety: a training process killed with SIGKILL, wherever it is, and run again with
``--resume`` ends bit-for-bit where an uninterrupted run with the same seed ends (MovieLens 100K,
CPU, one thread).

The run is configured so that every phase happens in a few seconds: training, early stopping,
refit on train + validation, final evaluation and the manifest. Two kinds of kill:

* at chosen places (``test_sigkill_at_each_critical_point_...``): the process SIGKILLs itself
  from inside the code, at the places a crash is most likely to corrupt a run: before its first
  checkpoint exists, between a checkpoint's weights and its state, after early stopping but before
  the final evaluation, inside the refit's checkpoint, while the manifest is written;
* at random times (``test_sigkill_at_random_times_...``): the test kills the process from outside
  at moments drawn at random over the length of a whole run (seed in the failure message;
  ``TWOTOWER_KILL_SEED`` replays one).
"""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--set", "model.dim=16", "--set", "model.user_history=false", "--set", "train.epochs=10",
        "--set", "train.patience=1", "--set", "train.refit=true", "--set", "eval.ks=[20]", "--quiet"]

# Runs the CLI after wrapping one function so that its n-th call SIGKILLs the process before the
# wrapped function runs: a real SIGKILL at an exact place, not an exception that cleanup code sees.
KILL_AT = """
import os, signal, sys
import twotower.api, twotower.artifacts
module = {"api": twotower.api, "artifacts": twotower.artifacts}[sys.argv[1]]
name, n = sys.argv[2], int(sys.argv[3])
original, calls = getattr(module, name), [0]
def wrapper(*args, **kwargs):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(module, name, wrapper)
from twotower.cli import main
sys.exit(main(sys.argv[4:]))
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _argv(out: Path, data_dir: Path, resume: bool) -> list[str]:
    return ["train", str(ROOT / "configs" / "ml-100k.toml"), "--out", str(out), "--data-dir", str(data_dir),
            *ARGS, *(["--resume"] if resume else [])]


def _start(out: Path, data_dir: Path, resume: bool, kill_at: tuple | None = None) -> subprocess.Popen:
    head = [sys.executable, "-c", KILL_AT, *map(str, kill_at)] if kill_at else [sys.executable, "-m", "twotower.cli"]
    return subprocess.Popen([*head, *_argv(out, data_dir, resume)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _outcome(run: Path) -> dict:
    """What must not depend on crashes: the final metrics, the per-epoch record (timings aside) and
    the bytes of the served artifacts."""
    metrics = json.loads((run / "metrics.json").read_text())
    for k in ("seconds", "seconds_per_epoch", "seconds_this_invocation"):  # the last: a finished run resumed
        metrics.pop(k, None)
    epochs = [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "examples_per_s", "eval_seconds")}
              for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"metrics": metrics, "epochs": epochs,
            **{name: _sha(run / name) for name in ("model.safetensors", "item_embeddings.npy", "known.safetensors")}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("resume") / "reference"
    t0 = time.monotonic()
    p = _start(out, data_dir, resume=False)
    assert p.wait(timeout=600) == 0, p.stderr.read()
    wall = time.monotonic() - t0
    ref = _outcome(out)
    # the configuration must exercise every phase, or the kills below prove less than they claim
    assert ref["metrics"]["stopped_early"] and ref["metrics"]["refit"], ref["metrics"]
    assert (out / "refit" / "checkpoint" / "state.json").is_file()
    return ref, wall


def _assert_finished_like(run: Path, ref: dict, context: str) -> None:
    from twotower.run import Run

    got = _outcome(run)
    assert got["metrics"] == ref["metrics"], context
    assert got["epochs"] == ref["epochs"], context
    assert got == ref, context
    Run(run)  # the manifest verifies
    leftovers = [p.relative_to(run) for p in run.rglob("*") if p.name.endswith((".tmp", ".new", ".old"))]
    assert not leftovers, f"{context}: {leftovers}"


# (what the place is, which function, which call of it in that process)
CRITICAL = [
    ("after epoch 1, before the first checkpoint exists", ("artifacts", "append_jsonl", 1)),
    ("epoch 3's checkpoint: weights written, optimizer and state not", ("artifacts", "save_torch_state", 3)),
    ("early stopping done, final evaluation not started", ("api", "evaluate", 1)),
    ("refit epoch 2's checkpoint: weights written, state not", ("artifacts", "save_torch_state", 2)),
    ("everything written but the manifest", ("artifacts", "write_manifest", 1)),
]


@pytest.mark.slow  # real data, killed and resumed in subprocesses
def test_sigkill_at_each_critical_point_then_resume_matches_uninterrupted_run(reference, tmp_path, data_dir):
    ref, _ = reference
    out = tmp_path / "crashed"
    for i, (place, kill_at) in enumerate(CRITICAL):
        p = _start(out, data_dir, resume=i > 0, kill_at=kill_at)
        rc = p.wait(timeout=600)
        assert rc == -signal.SIGKILL, f"kill {i + 1} ({place}) did not happen: exit {rc}; {p.stderr.read()[-2000:]}"
        assert not (out / "manifest.json").exists(), "a killed run must not look finished"
    p = _start(out, data_dir, resume=True)
    assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
    _assert_finished_like(out, ref, "killed at: " + "; ".join(place for place, _ in CRITICAL))


@pytest.mark.slow  # real data, killed and resumed in subprocesses
def test_sigkill_at_random_times_then_resume_matches_uninterrupted_run(reference, tmp_path, data_dir):
    ref, wall = reference
    seed = int(os.environ.get("TWOTOWER_KILL_SEED", random.SystemRandom().randrange(2**32)))
    rng = random.Random(seed)
    out = tmp_path / "crashed"
    kills = []
    for attempt in range(2):
        delay = rng.uniform(0.0, wall)
        p = _start(out, data_dir, resume=attempt > 0)
        try:
            p.wait(timeout=delay)
            kills.append(f"finished before {delay:.2f} s")  # possible on a resume that had little left
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills.append(f"killed at {delay:.2f} s")
    context = f"TWOTOWER_KILL_SEED={seed}: " + ", ".join(kills)
    p = _start(out, data_dir, resume=True)
    assert p.wait(timeout=600) == 0, f"{context}\n{p.stderr.read()[-3000:]}"
    _assert_finished_like(out, ref, context)


@pytest.mark.slow  # real data in subprocesses
def test_resume_refuses_a_different_config(tmp_path, data_dir):
    """--resume continues a run only with the config it was started with, even when it was killed
    before its first checkpoint (the run directory then holds only its config and vocabularies)."""
    out = tmp_path / "crashed"
    p = _start(out, data_dir, resume=False, kill_at=("artifacts", "append_jsonl", 1))
    assert p.wait(timeout=600) == -signal.SIGKILL
    r = subprocess.run([sys.executable, "-m", "twotower.cli", *_argv(out, data_dir, resume=True), "--set", "model.dim=8"],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 2 and "different config" in r.stderr, r.stderr
    assert not (out / "metrics.json").exists()
