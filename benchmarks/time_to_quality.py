"""Time to quality: validation (and test) Recall@20 against wall clock, one curve per setting,
beside ALS fitted on the same training data in the same run (docs/tuning.md, "Time to quality").

    flock /tmp/twotower-bench.lock flock /tmp/twotower-heavy.lock \\
        .venv/bin/python benchmarks/time_to_quality.py configs/gowalla.toml --out benchmarks/results/time_to_quality-gowalla

Each curve trains ``Trainer.fit`` from scratch with one setting's overrides of the base config; its
clock starts before the model is built (so an SVD or ALS initialisation is paid for) and counts
training and the trainer's own per-epoch validation. After each epoch the test split is scored too,
with the clock stopped: test is a measurement here, never a choice (nothing is selected on it).
ALS (implicit, the settings given, fitted on the same training pairs) is timed before the first
curve and after the last, so that a drift of the machine shows; its test Recall@20 is the line a
curve has to reach, and the figure of merit is the first time a curve reaches it, as a multiple of
ALS's fit time (the median of its fits). ALS is also fitted on training + validation, as `twotower
baseline` does for its test figure: a higher line for curves that train on training alone.
``--train-on train+valid`` makes that the comparison itself: the curves and ALS (timed before and
after) all fit training + validation, as a refit does (no validation curve then; every setting of
the curves comes from the base config). Writes ``OUT.json`` and ``OUT.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from twotower.config import RunConfig, apply_overrides  # noqa: E402
from twotower.data.sources import load_dataset  # noqa: E402
from twotower.evaluation.evaluator import evaluate, evaluate_ranker  # noqa: E402
from twotower.training.baselines import als_ranker  # noqa: E402
from twotower.training.trainer import Trainer  # noqa: E402

SETTINGS = {
    "normal": [],
    "svd": ["model.init=\"svd\""],
    "svd+warmup": ["model.init=\"svd\"", "train.warmup_steps=100"],
    "svd+early-batch": ["model.init=\"svd\"", "train.early_batch_size=8192", "train.early_batch_epochs=2"],
}


def curve(cfg: RunConfig, ds, max_seconds: float, k: int, log) -> list[dict]:
    points: list[dict] = []
    paused = [0.0]
    t0 = time.perf_counter()
    test_cfg = cfg.eval.model_copy(update={"ks": [k]})

    def on_epoch(record: dict) -> bool:
        now = time.perf_counter()
        elapsed = now - t0 - paused[0]
        test = evaluate(trainer.model, ds, "test", test_cfg, cfg.model.history_length)[f"recall@{k}"]
        trainer.model.train()
        points.append({"epoch": record["epoch"], "seconds": elapsed, "train_seconds": record["seconds"],
                       "valid": record.get(f"valid/recall@{k}"), "test": test})
        v = points[-1]["valid"]
        log(f"  epoch {record['epoch']}: {elapsed:.1f}s  valid {'-' if v is None else f'{v:.4f}'}  test {test:.4f}")
        paused[0] += time.perf_counter() - now
        return elapsed >= max_seconds

    trainer = Trainer(cfg, ds, None, quiet=True, log=lambda m: None)
    points.append({"epoch": 0, "seconds": time.perf_counter() - t0, "train_seconds": 0.0, "valid": None, "test": None,
                   "note": "model built (initialisation included)"})
    trainer.fit(on_epoch=on_epoch)
    return points


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="base config (its [data] split, model and training settings)")
    p.add_argument("--out", required=True, help="results path without extension: OUT.json and OUT.png")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"curves to draw, of {', '.join(SETTINGS)}")
    p.add_argument("--set", action="append", default=[], help="override applied to every curve")
    p.add_argument("--als", default="factors=256,regularization=0.1,alpha=5,iterations=15",
                   help="ALS settings (chosen on validation by `twotower baseline`)")
    p.add_argument("--max-multiple", type=float, default=4.0, help="stop a curve at this multiple of ALS's fit time")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--train-on", choices=["train", "train+valid"], default="train",
                   help="what the curves and ALS fit: the training pairs (validation curves drawn), or training + "
                   "validation, as a refit and `twotower baseline`'s test figure do")
    args = p.parse_args()

    def log(m):
        print(m, file=sys.stderr, flush=True)

    load = {"start": list(os.getloadavg())}
    base = RunConfig.load(args.config, args.set)
    ds = load_dataset(base.data)
    if args.train_on == "train+valid":
        ds = ds.with_valid_in_train()
    als_cfg = {k: float(v) for k, v in (kv.split("=") for kv in args.als.split(","))}
    k = args.k
    ev = base.eval.model_copy(update={"ks": [k]})

    def als_fit(data=ds) -> dict:
        t = time.perf_counter()
        ranker = als_ranker(data, int(als_cfg["factors"]), als_cfg["regularization"], als_cfg["alpha"],
                            int(als_cfg["iterations"]), base.train.seed, base.train.threads)
        seconds = time.perf_counter() - t
        out = {"seconds": seconds, "test": evaluate_ranker(ranker, ds, "test", ev)[f"recall@{k}"]}
        if data is ds and len(ds.valid):
            out["valid"] = evaluate_ranker(ranker, ds, "valid", ev)[f"recall@{k}"]
        on = "training" if data is ds and args.train_on == "train" else "training + validation"
        log(f"ALS {args.als} on {on}: fit {seconds:.1f}s, "
            f"test {out['test']:.4f}")
        return out

    # One-time costs of the process (loading the compiled kernels, first allocations) are paid
    # here, not by whichever curve comes first.
    Trainer(base, ds, None, quiet=True, log=lambda m: None)
    als = [als_fit()]
    als_seconds = float(np.median([a["seconds"] for a in als]))
    curves = {}
    for name in args.settings.split(","):
        d = base.to_dict()
        apply_overrides(d, SETTINGS[name])
        cfg = RunConfig.from_dict(d, source=name)
        log(f"{name}: {SETTINGS[name] or 'the base config'}")
        curves[name] = curve(cfg, ds, args.max_multiple * als_seconds, k, log)
    als.append(als_fit())
    # ALS as `twotower baseline` scores it: fitted on training + validation (the curves train on
    # training alone, so this is the harder line to reach); with --train-on train+valid, the line itself
    als_seconds = float(np.median([a["seconds"] for a in als]))
    target = float(np.mean([a["test"] for a in als]))
    full = als_fit(ds.with_valid_in_train()) if args.train_on == "train" else {"seconds": als_seconds, "test": target}
    load["end"] = list(os.getloadavg())
    summary = {}
    for name, pts in curves.items():
        hit = next((q for q in pts if q["test"] is not None and q["test"] >= target), None)
        hit_full = next((q for q in pts if q["test"] is not None and q["test"] >= full["test"]), None)
        summary[name] = {"reaches_als_test_at_seconds": None if hit is None else hit["seconds"],
                         "multiple_of_als_fit": None if hit is None else hit["seconds"] / als_seconds,
                         "reaches_als_full_test_at_seconds": None if hit_full is None else hit_full["seconds"],
                         "multiple_of_als_full_fit": None if hit_full is None else hit_full["seconds"] / full["seconds"],
                         "best_valid": max((q["valid"] for q in pts if q["valid"] is not None), default=None),
                         "last_test": pts[-1]["test"]}
        log(f"{name}: " + json.dumps(summary[name]))
    result = {"config": args.config, "overrides": args.set, "train_on": args.train_on,
              "settings": {n: SETTINGS[n] for n in curves},
              "als": {"settings": als_cfg, "fits": als, "median_fit_seconds": als_seconds, "test_target": target,
                      "train_and_valid_fit": full},
              "curves": curves, "summary": summary, "load": load, "machine": platform.machine(),
              "cpus": os.cpu_count(), "threads": base.train.threads}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"), k)
    print(json.dumps(summary, indent=2))
    return 0


def plot(result: dict, path: Path, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharex=True)
    als = result["als"]
    for ax, split in zip(axes, ("valid", "test")):
        for name, pts in result["curves"].items():
            q = [p for p in pts if p[split] is not None]
            ax.plot([p["seconds"] for p in q], [p[split] for p in q], marker="o", ms=3, label=name)
        levels = [a[split] for a in als["fits"] if a.get(split) is not None]
        if not levels:  # --train-on train+valid: no validation figures
            ax.set_ylabel(f"{split} Recall@{k} (none: validation is trained on)")
            continue
        level = float(np.mean(levels))
        if split == "test" and result.get("train_on", "train") == "train":
            f = als["train_and_valid_fit"]
            ax.axhline(f["test"], color="black", ls="--", lw=1)
            ax.annotate(f"ALS on train + valid {f['test']:.4f} in {f['seconds']:.0f}s", (0, f["test"]), fontsize=8,
                        va="bottom")
        ax.axhline(level, color="gray", ls="--", lw=1)
        ax.axvline(als["median_fit_seconds"], color="gray", ls=":", lw=1)
        ax.axvline(3 * als["median_fit_seconds"], color="red", ls=":", lw=1)
        ax.annotate(f"ALS {level:.4f} in {als['median_fit_seconds']:.0f}s (dotted: 1x and 3x its fit)",
                    (0, level), fontsize=8, va="bottom")
        ax.set_xlabel("wall clock (s): initialisation, training, per-epoch validation")
        ax.set_ylabel(f"{split} Recall@{k}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Time to quality: {result['config']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
