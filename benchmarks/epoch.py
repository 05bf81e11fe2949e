"""Seconds per Gowalla epoch, and per full-ranking evaluation, with the machine's matrix-multiply
rate measured around each.

    .venv/bin/python benchmarks/epoch.py [--epochs 6] [--evals 4] [--out benchmarks/results/gowalla-epochs.json]

The performance target's configuration: ``configs/gowalla.toml`` at d = 64 (in-batch softmax,
B = 2048, matrix factorisation, its optimizer ``deferred_adam``), trained on the 90 % training
part (``train.refit = false``, 727,869 pairs, 356 steps an epoch), ``--epochs`` epochs in one
process, timed as the trainer times them (``Trainer.train_epoch``: the steps and the end-of-epoch
flush; no validation). This machine is a shared VM whose float32 matrix-multiply rate moves by up
to 2x from one hour to the next, so each epoch is printed beside the 2048^3 rate measured just
before and just after it: epochs are comparable only at like rates. Then ``--evals`` full-ranking
evaluations of the test split (29,858 users x 40,981 items, training and validation items masked,
top 20), timed the same way.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from twotower.api import load_dataset
from twotower.config import RunConfig
from twotower.evaluation.evaluator import evaluate
from twotower.training.trainer import Trainer


def matmul_rate(n: int = 2048, repeat: int = 10) -> float:
    a = torch.randn(n, n)
    for _ in range(2):
        a @ a
    t = time.perf_counter()
    for _ in range(repeat):
        a @ a
    return 2 * n**3 * repeat / (time.perf_counter() - t) / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--evals", type=int, default=4)
    p.add_argument("--data-dir", default=None, help="datasets folder (default: $TWOTOWER_DATA)")
    p.add_argument("--out", default="benchmarks/results/gowalla-epochs.json")
    args = p.parse_args(argv)
    overrides = ["model.dim=64", "train.refit=false", f"train.epochs={args.epochs}"]
    cfg = RunConfig.load("configs/gowalla.toml", overrides)
    ds = load_dataset(cfg.data, args.data_dir)
    tr = Trainer(cfg, ds, None, quiet=True)
    rows = []
    for epoch in range(1, args.epochs + 1):
        before = matmul_rate()
        r = tr.train_epoch(epoch)
        after = matmul_rate()
        rows.append({"epoch": epoch, "seconds": r["seconds"], "loss": r["loss"], "examples_per_s": r["examples_per_s"],
                     "matmul_gflops_before": before, "matmul_gflops_after": after, "at": time.strftime("%Y-%m-%d %H:%M:%S")})
        print(f"epoch {epoch}: {r['seconds']:.2f} s ({r['examples_per_s']:,.0f} examples/s), loss {r['loss']:.4f}; "
              f"matmul {before:.0f} / {after:.0f} GFLOP/s before / after", flush=True)
    best = min(rows, key=lambda x: x["seconds"])
    print(f"fastest epoch {best['seconds']:.2f} s at {best['matmul_gflops_before']:.0f} / {best['matmul_gflops_after']:.0f} GFLOP/s")
    evals = []
    quick = cfg.eval.model_copy(update={"ks": [20]})
    for i in range(args.evals):
        before = matmul_rate()
        t = time.perf_counter()
        m = evaluate(tr.model, ds, "test", quick, cfg.model.history_length)
        seconds = time.perf_counter() - t
        after = matmul_rate()
        evals.append({"seconds": seconds, "test_recall@20": m["recall@20"], "matmul_gflops_before": before,
                      "matmul_gflops_after": after})
        print(f"evaluation {i + 1}: {seconds:.2f} s, test Recall@20 {m['recall@20']:.4f}; matmul {before:.0f} / {after:.0f} GFLOP/s",
              flush=True)
    out = {"command": "python benchmarks/epoch.py --epochs %d --evals %d" % (args.epochs, args.evals), "config": "configs/gowalla.toml",
           "overrides": overrides, "optimizer": cfg.train.optimizer, "train_pairs": len(ds.train),
           "steps_per_epoch": tr.steps_per_epoch, "machine": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "epochs": rows, "evaluations": evals}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
