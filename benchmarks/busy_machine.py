"""Training on a machine that runs other work: OpenMP thread settings, quiet against loaded.

    flock /tmp/twotower-bench.lock .venv/bin/python benchmarks/busy_machine.py [--reps 3] [--workload ml-100k]
        [--out benchmarks/results/busy-machine.json]

Each setting trains in a fresh process (OpenMP reads its environment once, when PyTorch loads it):
one epoch of ``configs/<workload>.toml`` (ML-100K: 90,570 pairs at B = 512; Gowalla: ``--steps``
steps of B = 2048 at d = 64) and one validation pass, timed after loading. Each runs twice per
repetition, alone and beside a load generator: another process multiplying 512 x 512 matrices
in a loop on 2 threads with libgomp's own defaults (other work, not ours to tune). Settings and
loads are interleaved (setting A quiet, A loaded, B quiet, B loaded, ...; the order rotates every
repetition) and the median over repetitions is reported, with loaded / quiet.

Settings (``train.threads`` unset means all cores):

- ``libgomp default``: ``GOMP_SPINCOUNT=300000``, what libgomp does when ``OMP_WAIT_POLICY`` is not
  set (a waiting thread spins ~3 ms before it sleeps); the behaviour before twotower set its own;
- ``threads 1``: the same with ``train.threads = 1``;
- ``spin 1k``, ``spin 10k``, ``spin 20k``, ``spin 30k``: ``GOMP_SPINCOUNT`` = 1,000 / 10,000 /
  20,000 / 30,000 (about 0.01 / 0.1 / 0.2 / 0.3 ms of spinning, then sleep);
- ``passive``: ``OMP_WAIT_POLICY=PASSIVE`` (a waiting thread sleeps at once);
- ``twotower default``: nothing set: what ``import twotower`` sets before PyTorch loads
  (``twotower/openmp.py``: ``GOMP_SPINCOUNT=30000``; 10000 until the runs of 2026-12-02 19:45);
  and with ``train.threads = 1``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
SETTINGS = {
    "libgomp default": ({"GOMP_SPINCOUNT": "300000"}, []),
    "threads 1": ({"GOMP_SPINCOUNT": "300000"}, ["train.threads=1"]),
    "spin 1k": ({"GOMP_SPINCOUNT": "1000"}, []),
    "spin 10k": ({"GOMP_SPINCOUNT": "10000"}, []),
    "spin 20k": ({"GOMP_SPINCOUNT": "20000"}, []),
    "spin 30k": ({"GOMP_SPINCOUNT": "30000"}, []),
    "twotower default": ({}, []),
    "twotower default, threads 1": ({}, ["train.threads=1"]),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, []),
}
DEFAULT_SETTINGS = ["libgomp default", "threads 1", "spin 10k", "spin 30k", "twotower default", "passive"]

LOAD = """
import torch
torch.set_num_threads(2)
a, b = torch.randn(512, 512), torch.randn(512, 512)
while True:
    a @ b
"""


def child(workload: str, overrides: list[str], steps: int) -> dict:
    """In the fresh process: load, then time one epoch (or ``steps`` steps) and one validation."""
    t0 = time.perf_counter()
    import twotower  # noqa: F401  first, as the twotower command does: its OpenMP defaults precede torch's
    import torch

    from twotower.config import RunConfig
    from twotower.data.sources import load_dataset
    from twotower.training.trainer import Trainer

    if workload == "gowalla":
        overrides = ["model.dim=64"] + overrides
    cfg = RunConfig.load(str(ROOT / "configs" / f"{workload}.toml"), overrides)
    ds = load_dataset(cfg.data, None)
    trainer = Trainer(cfg, ds, None, quiet=True, log=lambda m: None)
    t1 = time.perf_counter()
    if workload == "gowalla":
        from twotower.training.batching import epoch_batches

        rng = np.random.default_rng(0)
        batches = epoch_batches(len(ds.train), cfg.train.batch_size, rng, None)[:steps]
        trainer.model.train()
        for pairs in batches:
            trainer.step(pairs, rng)
    else:
        trainer.train_epoch(1)
    t2 = time.perf_counter()
    trainer.validate()
    t3 = time.perf_counter()
    return {"load_s": t1 - t0, "epoch_s": t2 - t1, "valid_s": t3 - t2, "threads": torch.get_num_threads(),
            "env": {k: os.environ.get(k) for k in OMP_VARS}, "openmp": twotower.openmp.status()}


def run_setting(name: str, workload: str, steps: int) -> dict:
    env_set, overrides = SETTINGS[name]
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARS}
    env.update(env_set)
    cmd = [sys.executable, __file__, "--child", json.dumps([workload, overrides, steps])]
    out = subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workload", choices=["ml-100k", "gowalla"], default="ml-100k")
    p.add_argument("--steps", type=int, default=120, help="gowalla: training steps timed")
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=list(SETTINGS))
    p.add_argument("--loads", nargs="+", default=["quiet", "loaded"], choices=["quiet", "loaded"])
    p.add_argument("--out", default=None, help="results file (default benchmarks/results/busy-machine-<workload>.json)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return 0
    runs = {name: {load: [] for load in args.loads} for name in args.settings}
    for rep in range(args.reps):
        order = args.settings[rep % len(args.settings):] + args.settings[: rep % len(args.settings)]
        for name in order:
            for load in args.loads if rep % 2 == 0 else args.loads[::-1]:
                gen = None
                if load == "loaded":
                    env = {k: v for k, v in os.environ.items() if k not in OMP_VARS}
                    gen = subprocess.Popen([sys.executable, "-c", LOAD], env=env)
                    time.sleep(1.0)  # running before the training starts
                try:
                    r = run_setting(name, args.workload, args.steps)
                finally:
                    if gen is not None:
                        gen.kill()
                        gen.wait()
                r["loadavg_1min"] = os.getloadavg()[0]
                runs[name][load].append(r)
                print(f"rep {rep + 1}  {name:<17} {load:<7} epoch {r['epoch_s']:6.2f} s  valid {r['valid_s']:5.2f} s  "
                      f"threads {r['threads']}  loadavg {r['loadavg_1min']:.1f}", flush=True)
    res = {"command": "python benchmarks/busy_machine.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": f"{os.cpu_count()} cores {platform.machine()}", "workload": args.workload,
           "load_generator": "2-thread 512x512 float32 matmul loop, libgomp defaults", "settings": {}}
    print(f"\n{'setting':<18}{'quiet s':>9}{'loaded s':>10}{'loaded/quiet':>14}   (median epoch seconds)")
    for name, r in runs.items():
        q, lo = (float(np.median([x["epoch_s"] for x in r[load]])) if r.get(load) else float("nan")
                 for load in ("quiet", "loaded"))
        res["settings"][name] = {"env": SETTINGS[name][0], "overrides": SETTINGS[name][1], "quiet_epoch_s": q,
                                 "loaded_epoch_s": lo, "loaded_over_quiet": lo / q, "runs": r}
        print(f"{name:<18}{q:>9.2f}{lo:>10.2f}{lo / q:>14.2f}")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"busy-machine-{args.workload}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
