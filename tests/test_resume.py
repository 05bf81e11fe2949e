"""Crash safety: a run killed with SIGKILL and resumed ends exactly where an uninterrupted run ends."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--set", "model.dim=16", "--set", "train.epochs=6", "--set", "train.patience=0",
        "--set", "eval.ks=[20]", "--set", "model.user_history=false", "--quiet"]


def _train(out: Path, data_dir: Path, extra=()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "twotower.cli", "train", str(ROOT / "configs" / "ml-100k.toml"), "--out", str(out),
           "--data-dir", str(data_dir), *ARGS, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, data_dir):
    ref = _train(tmp_path / "ref", data_dir)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()

    crashed = tmp_path / "crashed"
    p = _train(crashed, data_dir)
    deadline = time.time() + 300
    # kill it mid-run: after its first checkpoint, before it finishes
    while time.time() < deadline:
        jl = crashed / "metrics.jsonl"
        if jl.exists() and len(jl.read_text().splitlines()) >= 1:
            break
        assert p.poll() is None, "training finished before it could be killed"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (crashed / "metrics.json").exists()

    r = _train(crashed, data_dir, ["--resume"])
    assert r.wait(timeout=300) == 0, r.stderr.read()
    a = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    b = json.loads((crashed / "metrics.json").read_text())
    assert b["epochs_run"] == a["epochs_run"] == 6
    assert b["test"] == a["test"]  # bit-for-bit: training is deterministic on the CPU
    assert b["valid"] == a["valid"]
    lines = (crashed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2, 3, 4, 5, 6]
    assert not list(crashed.glob("**/.*.tmp"))
