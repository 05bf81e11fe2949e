"""Training under torchrun (2 gloo processes on the CPU) against one process.

- Equivalence: 2 ranks, each with its half of every global batch, give the loss and the gradients
  of 1 process with the whole batch (in-batch negatives gathered across ranks, logQ and masks on the
  global candidate set), also with sampled negatives, a memory bank, the streaming frequency
  estimate, the neg/pos-ratio correction, row-wise tables with deferred Adam (sparse gradients),
  uneven halves and a rank left with no row.
- Only rank 0 writes the run directory.
- ``torchrun -m twotower train`` end to end on MovieLens 100K, stopped after its first epoch and
  resumed under torchrun.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from twotower.config import RunConfig

pytestmark = pytest.mark.slow  # torchrun subprocesses

ROOT = Path(__file__).resolve().parents[1]
SYNTH = {"dataset": "synthetic", "synthetic_users": 200, "synthetic_items": 120}


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]


def _env() -> dict:
    # One thread per rank (what torchrun would pick), and no torchrun variables leaking in from outside.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def _cases() -> list[dict]:
    base = {"data": SYNTH, "model": {"dim": 8}, "train": {"batch_size": 64, "logq": True, "seed": 3}}
    composed = {"data": SYNTH,
                "model": {"dim": 8, "user_history": True, "history_length": 500, "item_bias": True,
                          "learn_temperature": True, "mlp": [16]},
                "train": {"batch_size": 64, "optimizer": "sgd", "lr": 0.5, "mask_user_history": True,
                          "frequency": "streaming", "streaming_buckets": 64},
                "negatives": {"sampled": 7, "bank_size": 40, "bank_warmup_steps": 1}}
    ratio = {"data": SYNTH, "model": {"dim": 8},
             "train": {"batch_size": 64, "logq_form": "neg_pos_ratio"},
             "negatives": {"sampled": 5, "proposal": "frequency", "bank_size": 16}}
    # row-wise tables: sparse gradients all-reduced by gloo, deferred Adam moves on every rank
    deferred = {"data": SYNTH, "model": {"dim": 8, "item_bias": True},
                "train": {"batch_size": 64, "optimizer": "deferred_adam", "lr": 0.05}}
    rng = np.random.default_rng(7)
    perm = rng.permutation(5008)
    # Global batches of 64 (even halves), 33 (17 + 16), 1 (a rank with no row) and 64 again.
    uneven = [perm[:64], perm[64:97], perm[97:98], perm[98:162]]
    even = [perm[s : s + 64] for s in range(0, 256, 64)]
    return [{"name": "logq", "config": base, "batches": [b.tolist() for b in even]},
            {"name": "composed", "config": composed, "batches": [b.tolist() for b in uneven]},
            {"name": "ratio", "config": ratio, "batches": [b.tolist() for b in uneven]},
            {"name": "deferred", "config": deferred, "batches": [b.tolist() for b in uneven]}]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One torchrun of the worker for every case (process start-up dominates; pay it once)."""
    out = tmp_path_factory.mktemp("ranks")
    fit = {"data": SYNTH, "model": {"dim": 8}, "train": {"epochs": 2, "batch_size": 256, "patience": 0},
           "eval": {"ks": [20]}}
    spec = {"cases": _cases(), "fit": {"config": fit}}
    (out / "spec.json").write_text(json.dumps(spec))
    p = subprocess.run(_torchrun(str(ROOT / "tests" / "_distributed_worker.py"), str(out / "spec.json"), str(out)),
                       capture_output=True, text=True, timeout=240, env=_env(), cwd=out)
    assert p.returncode == 0, p.stderr[-4000:]
    return out, spec


@pytest.mark.parametrize("case", ["logq", "composed", "ratio", "deferred"])
def test_two_ranks_with_half_batches_match_one_process_with_the_whole_batch(two_ranks, case):
    from _distributed_worker import run_steps

    out, spec = two_ranks
    c = next(c for c in spec["cases"] if c["name"] == case)
    one = run_steps(RunConfig.from_dict(c["config"]), [np.asarray(b) for b in c["batches"]])
    ranks = [torch.load(out / f"{case}.rank{r}.pt") for r in (0, 1)]
    for r in ranks:
        np.testing.assert_allclose(r["losses"], one["losses"], rtol=1e-5)
        for step, (g2, g1) in enumerate(zip(r["grads"], one["grads"])):
            assert g2.keys() == g1.keys()
            for name in g1:
                torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-6, msg=f"step {step}, {name}")
        for name, t in one["params"].items():
            torch.testing.assert_close(r["params"][name], t, rtol=1e-4, atol=1e-6, msg=name)
    # Negative-source state (memory bank, streaming frequencies, neg/pos counts) is the same on
    # every rank and equals one process's: each rank saw the global batch.
    assert ranks[0]["negatives"].keys() == one["negatives"].keys()
    for name, t in one["negatives"].items():
        torch.testing.assert_close(ranks[0]["negatives"][name], ranks[1]["negatives"][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["negatives"][name].to(t.dtype), t, rtol=1e-4, atol=1e-6, msg=name)


def test_only_rank_0_writes_the_run_directory(two_ranks):
    from twotower.run import Run

    out, _ = two_ranks
    assert json.loads((out / "rank1-writes.json").read_text()) == []
    run = Run(out / "run")  # complete and consistent: the manifest checks every file
    lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2]  # one line per epoch: one writer
    m = json.loads((out / "run" / "metrics.json").read_text())
    assert m["test"]["recall@20"] > 20 / 120 and len(run.items) == 120


ML_ARGS = ["--set", "model.dim=16", "--set", "train.epochs=4", "--set", "train.patience=0", "--set", "eval.ks=[20]",
           "--set", "model.user_history=false", "--quiet"]


def _train(out: Path, data_dir: Path, extra=()) -> subprocess.Popen:
    cmd = _torchrun("-m", "twotower", "train", str(ROOT / "configs" / "ml-100k.toml"), "--out", str(out),
                    "--data-dir", str(data_dir), *ML_ARGS, *extra)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)


def test_torchrun_train_on_movielens_stops_and_resumes(tmp_path, data_dir):
    from twotower.api import train

    out = tmp_path / "run"
    p = _train(out, data_dir)
    deadline = time.time() + 180
    while time.time() < deadline:  # stop it after its first checkpoint, before it finishes
        jl = out / "metrics.jsonl"
        if (out / "checkpoint" / "state.json").exists() and jl.exists() and len(jl.read_text().splitlines()) >= 1:
            break
        assert p.poll() is None, "training finished before it could be stopped: " + p.stderr.read()[-2000:]
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGTERM)  # torchrun and both ranks, as a scheduler would
    p.communicate(timeout=60)
    assert not (out / "metrics.json").exists()
    done = len((out / "metrics.jsonl").read_text().splitlines())
    assert 1 <= done < 4

    r = _train(out, data_dir, ["--resume"])
    stdout, stderr = r.communicate(timeout=180)
    assert r.returncode == 0, stderr[-4000:]
    assert stdout.count("recall@20") == 1  # one rank printed the table
    assert stderr.count(f"resuming {out}") == 1
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs_run"] == 4
    assert [json.loads(l)["epoch"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert not list(out.glob("**/.*.tmp"))

    # The same global batch in one process reaches the same model, up to float summation order.
    cfg = RunConfig.load(ROOT / "configs" / "ml-100k.toml", [a for a in ML_ARGS[1::2] if "=" in a])
    ref = train(cfg, data_dir=data_dir, quiet=True, log=lambda msg: None)
    assert m["test"]["recall@20"] == pytest.approx(ref.test["recall@20"], abs=2e-3)
