"""Wall time of a training step with the cross-batch memory bank against in-batch negatives alone, at the
same batch size (docs/negatives.md, "The memory bank"): what "the same wall time" means for the bank's
comparison.

    flock /tmp/twotower-bench.lock .venv/bin/python benchmarks/bank_wall_time.py [--config configs/gowalla-bank.toml]
        [--variants inbatch-256 bank-256] [--steps 200] [--reps 5] [--out benchmarks/results/bank-wall-time.json]

One trainer per variant of the config (the bank filled and past its warm-up before timing), taking the
same batches in turn: ``--reps`` rounds of ``--steps`` steps per variant, interleaved A, B, A, B, ... so
that a change of load on a shared machine hits both. Reports each variant's median seconds per step and
the median of the per-round ratios to the first variant, and, from the steps per epoch, how many epochs
of the first variant fit in the time the others take for the config's ``train.epochs``.
"""
from __future__ import annotations

import twotower  # noqa: F401  first, as the twotower command does: its OpenMP settings precede torch's

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from twotower.compare import load_variants
from twotower.config import RunConfig
from twotower.data.sources import load_dataset
from twotower.training.batching import epoch_batches
from twotower.training.trainer import Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/gowalla-bank.toml")
    ap.add_argument("--variants", nargs="+", default=["inbatch-256", "bank-256"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/bank-wall-time.json")
    args = ap.parse_args()

    variants = {v.name: v for v in load_variants([args.config], [], [])}
    cfgs = [RunConfig.from_dict(variants[n].config) for n in args.variants]
    ds = load_dataset(cfgs[0].data)
    trainers = []
    for cfg in cfgs:
        tr = Trainer(cfg, ds, None, quiet=True, log=lambda m: None)
        trainers.append(tr)
    rng = np.random.default_rng(0)
    batches = epoch_batches(len(ds.train), cfgs[0].train.batch_size, rng)
    warm = max(c.negatives.bank_warmup_steps for c in cfgs) + max(c.negatives.bank_size // c.train.batch_size for c in cfgs) + 20
    for tr in trainers:  # past the warm-up, the bank full
        for k in range(warm):
            tr.step(batches[k % len(batches)], rng)
    times = [[] for _ in trainers]
    pos = warm
    for _ in range(args.reps):
        for i, tr in enumerate(trainers):
            t0 = time.perf_counter()
            for k in range(args.steps):
                tr.step(batches[(pos + k) % len(batches)], rng)
            times[i].append((time.perf_counter() - t0) / args.steps)
        pos += args.steps
    per_step = [float(np.median(t)) for t in times]
    ratios = [float(np.median(np.array(t) / np.array(times[0]))) for t in times]
    epochs = cfgs[0].train.epochs
    same_time = [epochs * r for r in ratios]
    out = {
        "config": args.config, "variants": args.variants, "steps": args.steps, "reps": args.reps,
        "steps_per_epoch": trainers[0].steps_per_epoch, "seconds_per_step_median": dict(zip(args.variants, per_step)),
        "seconds_per_step_by_round": dict(zip(args.variants, times)),
        "ratio_to_first_median": dict(zip(args.variants, ratios)),
        "epochs_of_first_in_the_same_time": dict(zip(args.variants, same_time)),
        "machine": platform.platform(), "note": "interleaved rounds on a shared 2-core machine; read ratios, not seconds",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    for n, s, r in zip(args.variants, per_step, ratios):
        print(f"{n:>16}: {1000 * s:7.2f} ms/step (median), {r:.2f}x the first; {epochs * r:.1f} epochs of "
              f"{args.variants[0]} in the time of {epochs} of it")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
