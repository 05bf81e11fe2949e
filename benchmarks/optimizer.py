"""The embedding update per training step: dense fused Adam against the row-wise optimizers, by
table size.

    .venv/bin/python benchmarks/optimizer.py [--rows 70000 1000000 4000000] [--out benchmarks/results/optimizer.json]
    .venv/bin/python benchmarks/optimizer.py --gowalla [--data-dir ../shared/data]

One table of ``rows x 64`` float32; each step looks up ``2 x 2048`` random rows (an in-batch step's
users and items hit two such tables), takes a loss, backpropagates and updates:

- ``adam``: ``torch.optim.Adam(fused=True)`` on the dense gradient (every row read and written);
- ``deferred_adam``: ``training.optim.DeferredAdam``, dense Adam's trajectory on the touched rows
  (the table hooked so that a lookup applies its rows' deferred moves), its row passes in the C
  extension; ``deferred_adam_pytorch``: the same optimizer on its PyTorch path (``compiled=False``);
- ``sparse_adam``: ``training.optim.RowAdam``, lazy Adam (untouched rows frozen; a different rule).

The optimizers run interleaved in blocks of steps so that the machine's drift hits all alike; the
median block is reported (ms per step, forward and backward included). Prints a table and writes
the figures to ``--out``.

``--gowalla``: whole training steps instead (``Trainer.step`` on Gowalla, ``configs/gowalla.toml`` at
d = 64, B = 2048), one trainer per optimizer, taking the same batches in turn (each step of each
optimizer next to the others', so the machine's drift hits all alike), the median step in ms
printed (nothing written: a figure for the docs' prose, not a results table).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from twotower.training.optim import DeferredAdam, RowAdam

KINDS = ("adam", "deferred_adam", "deferred_adam_pytorch", "sparse_adam")


def make(kind: str, rows: int, dim: int, seed: int):
    torch.manual_seed(seed)
    emb = nn.Embedding(rows, dim, sparse=kind != "adam")
    if kind == "adam":
        opt = torch.optim.Adam(emb.parameters(), lr=1e-3, fused=True)
    elif kind.startswith("deferred_adam"):
        opt = DeferredAdam(emb.parameters(), lr=1e-3, compiled=kind == "deferred_adam")
        opt.attach(emb)
    else:
        opt = RowAdam(emb.parameters(), lr=1e-3)
    return emb, opt


def block(emb, opt, ids: list[torch.Tensor]) -> float:
    t = time.perf_counter()
    for ix in ids:
        opt.zero_grad(set_to_none=True)
        emb(ix).square().sum().backward()
        opt.step()
    return (time.perf_counter() - t) / len(ids) * 1e3


def measure(rows: int, dim: int = 64, touched: int = 4096, steps: int = 20, blocks: int = 6) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, rows, (touched,), generator=g) for _ in range(steps * (blocks + 1))]
    runs = {k: make(k, rows, dim, 0) for k in KINDS}
    ms = {k: [] for k in KINDS}
    for b in range(blocks + 1):  # block 0 warms up
        for k, (emb, opt) in runs.items():
            t = block(emb, opt, ids[b * steps : (b + 1) * steps])
            if b:
                ms[k].append(t)
    runs["deferred_adam"][1].flush()
    runs["deferred_adam_pytorch"][1].flush()
    return {k: {"ms_per_step": float(np.median(v)), "blocks": v} for k, v in ms.items()}


def gowalla_steps(data_dir: str | None, steps: int = 300, warmup: int = 20) -> dict:
    from twotower.api import load_dataset
    from twotower.config import RunConfig
    from twotower.training.batching import epoch_batches
    from twotower.training.trainer import Trainer

    trainers, ds = {}, None
    for kind in KINDS:
        optimizer = "deferred_adam" if kind.startswith("deferred_adam") else kind
        cfg = RunConfig.load("configs/gowalla.toml", ["model.dim=64", f'train.optimizer="{optimizer}"'])
        ds = ds or load_dataset(cfg.data, data_dir)
        trainers[kind] = Trainer(cfg, ds, None, quiet=True)
        trainers[kind].model.train()
        if kind == "deferred_adam_pytorch":
            trainers[kind].optimizer.opts[0].compiled = False
    batches = list(epoch_batches(len(ds.train), cfg.train.batch_size, np.random.default_rng(0), None))
    ms = {k: [] for k in KINDS}
    for i, pairs in enumerate(batches[: warmup + steps]):
        order = KINDS[i % len(KINDS):] + KINDS[: i % len(KINDS)]  # no optimizer always first
        for k in order:
            t = time.perf_counter()
            trainers[k].step(pairs, np.random.default_rng(i))
            if i >= warmup:
                ms[k].append((time.perf_counter() - t) * 1e3)
    return {k: float(np.median(v)) for k, v in ms.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[70_000, 1_000_000, 4_000_000])
    p.add_argument("--out", default="benchmarks/results/optimizer.json")
    p.add_argument("--gowalla", action="store_true", help="whole Gowalla training steps per optimizer instead")
    p.add_argument("--data-dir", default=None, help="datasets folder (default: $TWOTOWER_DATA)")
    args = p.parse_args(argv)
    if args.gowalla:
        r = gowalla_steps(args.data_dir)
        print("Gowalla training step, ms (median of 300, the optimizers in turn): "
              + ", ".join(f"{k} {v:.1f}" for k, v in r.items()))
        return 0
    res = {"command": "python benchmarks/optimizer.py", "machine": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "dim": 64, "touched_per_step": 4096, "tables": {}}
    print(f"{'rows':>10} " + " ".join(f"{k:>22}" for k in KINDS) + "   (ms per step, median of 6 interleaved blocks)")
    for n in args.rows:
        r = measure(n)
        res["tables"][str(n)] = r
        print(f"{n:>10,} " + " ".join(f"{r[k]['ms_per_step']:>22.2f}" for k in KINDS), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
