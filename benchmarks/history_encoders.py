"""The cost of the history encoders in a training step, measured paired and interleaved.

    flock /tmp/twotower-bench.lock .venv/bin/python benchmarks/history_encoders.py [--config configs/ml-100k.toml]

One ``Trainer`` per encoder (mean, recency, attention with 1 and 2 layers) on the same data and
config (``model.user_history = true``, ``history_length`` 50), one thread. Each round times
``--steps`` training steps of every encoder in turn (A, B, C, D, A, B, ...) on the same batches;
the figure is the median over rounds of the milliseconds per step, and its ratio to mean pooling's
in the same round (median of the per-round ratios). Writes
``benchmarks/results/history-encoders.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ENCODERS = {"mean": {}, "recency (learned half-life)": {"model.history_encoder": "recency", "model.learn_half_life": True},
            "attention, 1 layer": {"model.history_encoder": "attention", "model.history_layers": 1},
            "attention, 2 layers": {"model.history_encoder": "attention", "model.history_layers": 2}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "ml-100k.toml"))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=str(HERE / "results" / "history-encoders.json"))
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite the table in docs/features.md")
    args = ap.parse_args()

    from twotower import RunConfig
    from twotower.data.sources import load_dataset
    from twotower.training.batching import epoch_batches
    from twotower.training.trainer import Trainer

    torch.set_num_threads(1)
    base = ["model.user_history=true", "train.threads=1"]
    cfg0 = RunConfig.load(args.config, base)
    ds = load_dataset(cfg0.data)
    trainers = {}
    for name, changes in ENCODERS.items():
        cfg = RunConfig.load(args.config, base + [f"{k}={json.dumps(v)}" for k, v in changes.items()])
        trainers[name] = Trainer(cfg, ds, quiet=True, log=lambda m: None)
        trainers[name].model.train()
    batches = epoch_batches(len(ds.train), cfg0.train.batch_size, np.random.default_rng(0))
    ms = {name: [] for name in trainers}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, tr in trainers.items():
            rng = np.random.default_rng(r)
            t = time.perf_counter()
            for k in range(args.steps):
                tr.step(batches[k % len(batches)], rng)
            if r:
                ms[name].append((time.perf_counter() - t) * 1e3 / args.steps)
    out = {"config": str(Path(args.config).relative_to(ROOT)) if Path(args.config).is_relative_to(ROOT) else args.config,
           "batch_size": cfg0.train.batch_size, "dim": cfg0.model.dim, "history_length": cfg0.model.history_length,
           "rounds": args.rounds, "steps_per_round": args.steps, "threads": 1, "torch": torch.__version__,
           "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"), "encoders": {}}
    for name in trainers:
        ratio = np.median(np.array(ms[name]) / np.array(ms["mean"]))
        out["encoders"][name] = {"ms_per_step_median": float(np.median(ms[name])), "ms_per_step": ms[name],
                                 "ratio_to_mean_median": float(ratio),
                                 "parameters": sum(p.numel() for p in trainers[name].model.user_tower.history_encoder.parameters())}
        print(f"{name:<28} {np.median(ms[name]):8.1f} ms/step   x{ratio:.2f} of mean pooling")
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    rows = ["| encoder | ms / step | x mean pooling | parameters |", "| --- | --- | --- | --- |"]
    rows += [f"| {name} | {r['ms_per_step_median']:.1f} | {r['ratio_to_mean_median']:.2f} | {r['parameters']:,} |"
             for name, r in out["encoders"].items()]
    docs = ROOT / "docs" / "features.md"
    text = docs.read_text(encoding="utf-8")
    begin, end = "<!-- history-cost:begin -->", "<!-- history-cost:end -->"
    if begin in text and end in text and not args.no_docs:
        docs.write_text(text[: text.index(begin) + len(begin)] + "\n" + "\n".join(rows) + "\n" + text[text.index(end):],
                        encoding="utf-8")


if __name__ == "__main__":
    main()
