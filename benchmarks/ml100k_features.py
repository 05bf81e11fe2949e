"""MovieLens 100K with every kind of feature against ids only (docs/features.md, "MovieLens 100K with
every kind"): the feature settings of configs/ml-100k-features.toml chosen on VALIDATION Recall@20
among variants that keep every kind, then the chosen variant and configs/ml-100k.toml each trained
once more with the test split scored once. Results: benchmarks/results/ml100k-features.json.

    TWOTOWER_DATA=... flock /tmp/twotower-heavy.lock .venv/bin/python benchmarks/ml100k_features.py
    ... --ablations      also the validation figures without the context / user features / title
                         (reported, never candidates: the config must keep every kind)

The variants override only the title and year declarations (the shipped config holds the choice).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from twotower.api import train
from twotower.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
FEATURES = ROOT / "configs" / "ml-100k-features.toml"
IDS = ROOT / "configs" / "ml-100k.toml"
G = '{name="genre", kind="multi_categorical"}'
Y = '{name="year", kind="numeric"}'
YQ = '{name="year", kind="numeric", transform="quantile"}'
T = '{name="title", kind="text"}'
T3 = '{name="title", kind="text", hash_buckets=4096, char_ngrams=[3]}'
TW = '{name="title", kind="text", hash_buckets=4096, char_ngrams=[]}'
VARIANTS = {
    "title: defaults; year: standardised": [f"features.item=[{G}, {T}, {Y}]"],
    "title: 4096 buckets, 3-character n-grams": [f"features.item=[{G}, {T3}, {Y}]"],
    "year: quantile buckets": [f"features.item=[{G}, {T}, {YQ}]"],
    "title: 4096 buckets, 3-character n-grams; year: quantile": [f"features.item=[{G}, {T3}, {YQ}]"],
    "title: 4096 buckets, words only": [f"features.item=[{G}, {TW}, {Y}]"],
}
# around the first variant (the title's default settings), as docs/features.md reports them
ABLATIONS = {
    "without the context": [f"features.item=[{G}, {T}, {Y}]", "features.context=[]"],
    "without the user features": [f"features.item=[{G}, {T}, {Y}]", "features.user=[]"],
    "without the title": [f"features.item=[{G}, {Y}]"],
}


def _valid(cfg: RunConfig) -> dict:
    t = time.perf_counter()
    r = train(cfg, None, quiet=True, evaluate_test=False, log=lambda m: None)
    return {"valid_recall@20": r.valid["recall@20"], "valid_ndcg@20": r.valid["ndcg@20"],
            "best_epoch": r.trainer.state.best_epoch, "seconds": round(time.perf_counter() - t, 1)}


def _tested(cfg: RunConfig) -> dict:
    r = train(cfg, None, quiet=True, log=lambda m: None)
    return {"valid_recall@20": r.valid["recall@20"], "test_recall@20": r.test["recall@20"],
            "test_ndcg@20": r.test["ndcg@20"], "best_epoch": r.trainer.state.best_epoch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ablations", action="store_true", help="also the ablations' validation figures")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ml100k-features.json"))
    args = ap.parse_args()
    valid = {}
    for name, sets in VARIANTS.items():
        valid[name] = _valid(RunConfig.load(FEATURES, sets))
        print("valid", name, json.dumps(valid[name]), flush=True)
    ablations = {}
    for name, sets in (ABLATIONS.items() if args.ablations else []):
        ablations[name] = _valid(RunConfig.load(FEATURES, sets))
        print("ablation (valid)", name, json.dumps(ablations[name]), flush=True)
    chosen = max(valid, key=lambda n: valid[n]["valid_recall@20"])
    print("chosen on validation:", chosen, flush=True)
    test = {"configs/ml-100k.toml": _tested(RunConfig.load(IDS, [])),
            f"configs/ml-100k-features.toml with {chosen}": _tested(RunConfig.load(FEATURES, VARIANTS[chosen]))}
    for name, rec in test.items():
        print("test (scored once)", name, json.dumps(rec), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"variants": VARIANTS, "valid": valid, "ablations": ablations,
                                          "chosen": chosen, "test": test}, indent=1) + "\n")


if __name__ == "__main__":
    main()
