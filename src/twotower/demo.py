"""``twotower demo``: the main job end to end in a few minutes on a laptop.

MovieLens 100K when it is in the data directory or can be downloaded (checksum verified; being
offline is normal), otherwise the project's deterministic synthetic dataset.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from .config import RunConfig


def demo_config(dataset: str) -> RunConfig:
    """MF-style towers plus pooled history and item features, in-batch softmax with logQ."""
    if dataset == "ml-100k":
        data = {"dataset": "ml-100k", "split": "random", "test_fraction": 0.2, "valid_fraction": 0.1}
        model = {"dim": 64, "user_history": True, "item_features": ["genre"], "temperature": 0.1}
    else:
        data = {"dataset": "synthetic", "split": "random", "test_fraction": 0.2, "valid_fraction": 0.1}
        model = {"dim": 32, "user_history": True, "item_features": ["category"], "temperature": 0.1}
    train = {"epochs": 30, "batch_size": 512, "lr": 0.005, "patience": 4, "seed": 0}
    return RunConfig.from_dict({"data": data, "model": model, "train": train, "eval": {"ks": [10, 20, 50, 100]}})


def run_demo(data_dir: Path | None = None, out: Path | None = None, quiet: bool = False, offline: bool = False,
             synthetic: bool = False, epochs: int | None = None) -> int:
    from .api import train
    from .display import format_metrics, item_label
    from .data.fetch import fetch_movielens_100k
    from .data.paths import default_data_dir
    from .run import Run

    data_dir = data_dir or default_data_dir()
    found = None
    if not synthetic:
        if (data_dir / "ml-100k" / "u.data").is_file():
            found = data_dir / "ml-100k"
        elif not offline:
            found = fetch_movielens_100k(data_dir)
    if found is not None:
        print(f"demo: MovieLens 100K from {found}")
        cfg = demo_config("ml-100k")
    else:
        print("demo: MovieLens 100K is not available (offline or --synthetic); using the generated synthetic dataset "
              "(2,000 users, 1,000 items, power-law popularity, 20 categories, 8 taste clusters)")
        cfg = demo_config("synthetic")
    if epochs is not None:
        cfg.train.epochs = epochs
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="twotower-demo-")
        out = Path(tmp.name) / "run"
    try:
        res = train(cfg, out, data_dir, quiet=quiet)
        print()
        print(format_metrics({"valid": res.valid, "test": res.test or {}}, [10, 20, 50, 100]))
        run = Run(out)
        users = run.users.decode(range(min(3, len(run.users))))
        recs = run.recommend(users, k=5)
        for u in users:
            hist = run.history_of(u)
            print(f"\nuser {u}: {len(hist)} known items, latest: " + "; ".join(item_label(run, i) for i in hist[-3:]))
            for r in recs[recs.user == u].itertuples():
                print(f"  {r.rank}. {item_label(run, r.item)}  (score {r.score:.3f})")
        print(f"\nrun directory: {out}" + (" (temporary; pass --out to keep it)" if tmp else ""))
        print(f"demo finished in {res.seconds:.0f}s")
    finally:
        if tmp is not None:
            tmp.cleanup()
    sys.stdout.flush()
    return 0
