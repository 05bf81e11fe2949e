"""The neg/pos ratio estimator of a trained run against its predicted fixed point (docs/design.md, "The
negative/positive ratio form"; docs/negatives.md).

    .venv/bin/python benchmarks/neg_pos_ratio_check.py RUN [RUN ...] --out benchmarks/results/neg-pos-ratio-check.json

Reads each run's tracked counts (``checkpoint/negatives.safetensors``: how often each item was an unmasked
negative and a positive) and compares the correction ``c(j) = log((neg + 1) / (pos + 1))`` with
``log(B - 1 + M / (N p(j)))``, what it tends to with ``B`` in-batch and ``M`` uniform negatives over ``N``
items, ``p(j)`` the item's share of the training positives: by popularity rank, the mean absolute gap, the
spread of the correction and its correlation with ``log p(j)``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from twotower.config import RunConfig
from twotower.data.sources import load_dataset


def check(run: Path) -> dict:
    state = load_file(str(run / "checkpoint" / "negatives.safetensors"))
    neg, pos = state["ratio.neg"].astype(np.float64), state["ratio.pos"].astype(np.float64)
    cfg = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    ds = load_dataset(cfg.data)
    counts = ds.item_counts().astype(np.float64)
    seen = counts > 0
    p = counts / counts.sum()
    c = (np.log1p(neg) - np.log1p(pos))[seen]
    b, m, n = cfg.train.batch_size, cfg.negatives.sampled, ds.n_items
    predicted = np.log(b - 1 + m / (n * p[seen]))
    order = np.argsort(-counts[seen], kind="stable")
    ranks = [r for r in (0, 10, 100, 1000, 4000) if r < len(order)] + [len(order) - 1]
    return {
        "run": str(run), "batch_size": b, "sampled": m, "items": n, "epochs_counted": float(pos.sum() / len(ds.train)),
        "by_popularity_rank": [{"rank": int(r), "count": float(counts[seen][order[r]]), "c": float(c[order[r]]),
                                "predicted": float(predicted[order[r]])} for r in ranks],
        "mean_abs_gap": float(np.abs(c - predicted).mean()), "spread": float(c.max() - c.min()),
        "corr_with_log_p": float(np.corrcoef(c, np.log(p[seen]))[0, 1]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", default="benchmarks/results/neg-pos-ratio-check.json")
    args = ap.parse_args()
    out = [check(Path(r)) for r in args.runs]
    Path(args.out).write_text(json.dumps(out, indent=1))
    for r in out:
        print(f"{r['run']}: B = {r['batch_size']}, M = {r['sampled']}; mean |c - predicted| {r['mean_abs_gap']:.3f}, "
              f"spread {r['spread']:.3f}, corr(c, log p) {r['corr_with_log_p']:+.3f}")
        for x in r["by_popularity_rank"]:
            print(f"   rank {x['rank']:5d} (count {x['count']:5.0f}): c = {x['c']:.3f}, predicted {x['predicted']:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
