"""Summarise `twotower compare` reports of the negative-sampling study into one results file and Markdown
rows (docs/negatives.md).

    .venv/bin/python benchmarks/negatives_summary.py reports/gowalla-negatives reports/gowalla-bank \\
        reports/grocery-negatives reports/ml-100k-negatives --out benchmarks/results/negatives.json

Per report and variant: validation and test Recall@20 (and @10, @50, NDCG@20, the popularity buckets,
coverage, tail share), the relative change against the report's in-batch + logQ baseline (validation
and test), the best epoch, seconds per epoch, and what each source logged per epoch: the mining
rounds' windows, sizes and validation-positive rates (before and after the co-occurrence filter), the
share of hard negatives the margin filter masked, the memory bank's staleness (cosine of stored and
current vectors).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

KEYS = ["recall@10", "recall@20", "recall@50", "ndcg@20", "recall@20/head", "recall@20/torso", "recall@20/tail",
        "coverage@20", "tail_share@20", "popularity@20"]
EPOCH_KEYS = ["mining_round", "mining_window", "mined_negatives", "mined_valid_rate", "kept_valid_rate",
              "hard_margin_masked", "bank_cosine", "bank_cosine_oldest", "bank_cosine_newest"]


def summarise(report: Path) -> dict:
    results = json.loads((report / "results.json").read_text())
    base = max((r for r in results if r.get("baseline")), key=lambda r: r["valid"].get("recall@20", 0), default=None)
    out = {}
    for r in results:
        safe = "".join(c if c.isalnum() or c in "=.,-_" else "_" for c in r["name"])
        run = report / "runs" / safe
        final = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
        epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] \
            if (run / "metrics.jsonl").is_file() else []
        row = {"valid_recall@20": r["valid"].get("recall@20"), **{f"test_{k}": r["test"].get(k) for k in KEYS},
               "seconds_per_epoch": r["seconds_per_epoch"], "best_epoch": final.get("best_epoch"),
               "epochs_run": final.get("epochs_run"), "baseline": r.get("baseline", False)}
        if base is not None and base is not r:
            for split, key in (("valid", "valid_recall@20"), ("test", "test_recall@20")):
                mine, theirs = row[key], (base["valid"] if split == "valid" else base["test"]).get("recall@20")
                if mine is not None and theirs:
                    row[f"{split}_change_vs_{base['name']}"] = mine / theirs - 1
        row["epochs"] = [{k: e[k] for k in ["epoch", "valid/recall@20", *EPOCH_KEYS] if k in e} for e in epochs]
        out[r["name"]] = row
    return {"report": str(report), "baseline": None if base is None else base["name"], "variants": out}


def markdown(summary: dict) -> str:
    lines = ["| variant | valid R@20 | vs base | test R@20 | vs base | head / torso / tail | s/epoch | best epoch |",
             "|---|---|---|---|---|---|---|---|"]
    b = summary["baseline"]
    for name, r in summary["variants"].items():
        dv = r.get(f"valid_change_vs_{b}")
        dt = r.get(f"test_change_vs_{b}")
        pct = lambda x: "" if x is None else f"{100 * x:+.1f} %"  # noqa: E731
        lines.append(f"| {name} | {r['valid_recall@20']:.4f} | {pct(dv)} | {r['test_recall@20']:.4f} | {pct(dt)} | "
                     f"{r['test_recall@20/head']:.3f} / {r['test_recall@20/torso']:.3f} / {r['test_recall@20/tail']:.3f} | "
                     f"{r['seconds_per_epoch']:.1f} | {r['best_epoch']} of {r['epochs_run']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+")
    ap.add_argument("--out", default="benchmarks/results/negatives.json")
    args = ap.parse_args()
    summaries = [summarise(Path(r)) for r in args.reports if (Path(r) / "results.json").is_file()]
    Path(args.out).write_text(json.dumps(summaries, indent=1))
    for s in summaries:
        print(f"\n## {s['report']} (baseline: {s['baseline']})\n\n{markdown(s)}")
        for name, r in s["variants"].items():
            extra = [e for e in r["epochs"] if len(e) > 2]
            if extra:
                print(f"\n{name}: " + "; ".join(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                                             for k, v in e.items()}) for e in extra))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
