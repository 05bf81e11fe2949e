"""The tables of docs/tuning.md from the folder of benchmarks/tune_acceptance.sh (Markdown on stdout),
and their figures as one JSON file (``--json``, e.g. benchmarks/results/tune-acceptance.json: the
baselines, each tune's best trial, its test figures and what the budget bought, the time-to-quality
summaries), small enough to commit where the run folders are not.

    .venv/bin/python benchmarks/tune_tables.py reports/tune-acceptance [--json benchmarks/results/tune-acceptance.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DATASETS = ("ml-100k", "grocery", "gowalla")


def _read(p: Path) -> dict | None:
    return json.loads(p.read_text()) if p.is_file() else None


def main(out: Path) -> int:
    print("### Baselines and the tuned two-tower (test scored once; selection on validation)\n")
    print("| data | model | settings (chosen on validation) | valid Recall@20 | test Recall@20 | test NDCG@20 | "
          "seconds |")
    print("|---|---|---|---|---|---|---|")
    for name in DATASETS:
        for method in ("popularity", "als", "ease"):
            m = _read(out / f"{name}-{method}" / "metrics.json")
            if m is None:
                continue
            fit = m.get("fit_seconds")
            print(f"| {name} | {method} | {m.get('settings') or '-'} | {m['valid'].get('recall@20', float('nan')):.4f} | "
                  f"{m['test']['recall@20']:.4f} | {m['test']['ndcg@20']:.4f} | "
                  f"{'' if fit is None else f'{fit:.1f} (final fit)'} |")
        t = _read(out / f"tune-{name}" / "tune.json")
        if t is not None and t.get("best"):
            b = t["best"]
            settings = ", ".join(f"{k.split('.')[-1]}={v:.4g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                                 for k, v in b["params"].items())
            print(f"| {name} | **tune --budget {t['budget'] / 60:.0f}m** (trial {b['number']}, {b['state']}) | {settings} | "
                  f"{t['valid'].get('recall@20', float('nan')):.4f} | **{t['test']['recall@20']:.4f}** | "
                  f"**{t['test']['ndcg@20']:.4f}** | {t['seconds']:.0f} (whole tune) |")
    print("\n### What the budget buys: the best validation Recall@20 reached by each time, in one tune\n")
    rows = {}
    for name in DATASETS:
        t = _read(out / f"tune-{name}" / "tune.json")
        if t is not None:
            rows[name] = t
    if rows:
        print("| data | trials (complete / cut / pruned / failed) | " + " | ".join(
            f"{m:.0f} s" for m, _ in next(iter(rows.values()))["best_by_time"]) + " | load at start / end |")
        print("|---|---|" + "---|" * len(next(iter(rows.values()))["best_by_time"]) + "---|")
        for name, t in rows.items():
            states = [tr["state"] for tr in t["trials"]]
            counts = " / ".join(str(states.count(s)) for s in ("complete", "cut", "pruned", "failed"))
            cells = " | ".join("" if v is None else f"{v:.4f}" for _, v in t["best_by_time"])
            load = t.get("load", {})
            print(f"| {name} | {len(states)} ({counts}) | {cells} | {load.get('start', [0])[0]:.1f} / "
                  f"{load.get('end', [0])[0]:.1f} |")
    for path in sorted(out.glob("time_to_quality-gowalla*.json")):
        ttq_table(_read(path), path.stem)
    return 0


def summary(out: Path) -> dict:
    """The figures behind the tables, per data set and per time-to-quality run."""
    res: dict = {"datasets": {}, "time_to_quality": {}}
    for name in DATASETS:
        d: dict = {"baselines": {}}
        for method in ("popularity", "als", "ease"):
            m = _read(out / f"{name}-{method}" / "metrics.json")
            if m is not None:
                d["baselines"][method] = {"settings": m.get("settings"), "valid_recall@20": m["valid"].get("recall@20"),
                                          "test": {k: m["test"][k] for k in ("recall@20", "ndcg@20")},
                                          "fit_seconds": m.get("fit_seconds")}
        t = _read(out / f"tune-{name}" / "tune.json")
        if t is not None and t.get("best"):
            states = [tr["state"] for tr in t["trials"]]
            d["tune"] = {"budget": t["budget"], "seconds": t["seconds"], "best_trial": t["best"]["number"],
                         "params": t["best"]["params"], "valid_recall@20": t["valid"].get("recall@20"),
                         "test": {k: t["test"][k] for k in ("recall@20", "ndcg@20")},
                         "trials": {s: states.count(s) for s in ("complete", "cut", "pruned", "failed")},
                         "best_by_time": t["best_by_time"], "load": t.get("load")}
        if d["baselines"] or "tune" in d:
            res["datasets"][name] = d
    for path in sorted(out.glob("time_to_quality-gowalla*.json")):
        r = _read(path)
        res["time_to_quality"][path.stem] = {k: r.get(k) for k in ("config", "overrides", "train_on", "als", "summary", "load")}
        res["time_to_quality"][path.stem]["curves"] = {n: [{k: q.get(k) for k in ("epoch", "seconds", "valid", "test")}
                                                          for q in pts] for n, pts in r["curves"].items()}
    return res


def ttq_table(ttq: dict, stem: str) -> None:
    if ttq is not None:
        als = ttq["als"]
        full = als.get("train_and_valid_fit", {})
        on = ttq.get("train_on", "train")
        print(f"\n### Time to quality on Gowalla (one run: {stem}, curves and ALS fit {on.replace('+', ' + ')})\n")
        fits = ", ".join(f"{a['seconds']:.1f}" for a in als["fits"])
        print(f"ALS {als['settings']}: fit on training {als['median_fit_seconds']:.1f} s (median of "
              f"{fits}), test Recall@20 {als['test_target']:.4f}; "
              f"on training + validation {full.get('seconds', float('nan')):.1f} s, test {full.get('test', float('nan')):.4f}. "
              f"Load average at start / end: {ttq['load']['start'][0]:.1f} / {ttq['load']['end'][0]:.1f}.\n")
        print("| curve | reaches ALS (training) test Recall@20 at | x ALS fit | reaches ALS (training + validation) at | "
              "x its fit | best valid | last test |")
        print("|---|---|---|---|---|---|---|")
        for name, s in ttq["summary"].items():
            def f(v, unit=""):
                return "not reached" if v is None else f"{v:.1f}{unit}"
            print(f"| {name} | {f(s['reaches_als_test_at_seconds'], ' s')} | {f(s['multiple_of_als_fit'])} | "
                  f"{f(s.get('reaches_als_full_test_at_seconds'), ' s')} | {f(s.get('multiple_of_als_full_fit'))} | "
                  f"{'-' if s['best_valid'] is None else format(s['best_valid'], '.4f')} | {s['last_test']:.4f} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, nargs="?", default=Path("reports/tune-acceptance"))
    p.add_argument("--json", type=Path, help="also write the figures behind the tables to this file")
    args = p.parse_args()
    code = main(args.folder)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary(args.folder), indent=1) + "\n")
    sys.exit(code)
