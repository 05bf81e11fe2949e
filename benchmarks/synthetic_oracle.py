"""Ground-truth rankings on the synthetic data set, scored by the same evaluator as a model.

The synthetic generator knows each user's true ``p(item | user) ∝ popularity(item) *
affinity(cluster(user), category(item))`` (``twotower.data.synthetic``). Ranking every item by it
is the best any model can do on the test split ("oracle"); ranking by the affinity alone (the
popularity factor divided out) is the popularity-debiased relevance. A logQ-corrected model
should approach the first, an uncorrected in-batch model the second (docs/negatives.md).

    .venv/bin/python benchmarks/synthetic_oracle.py [--config configs/synthetic.toml]

Prints test Recall@20 (overall and per popularity bucket) of both rankings and writes
``benchmarks/results/synthetic-oracle.json``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from twotower.config import RunConfig
from twotower.data.sources import load_dataset
from twotower.data.synthetic import make_synthetic
from twotower.evaluation.evaluator import evaluate_split
from twotower.model.towers import TwoTowerModel


def fixed_score_model(scores: np.ndarray, cfg: RunConfig) -> TwoTowerModel:
    """A model whose ranking is exactly ``scores`` [users, items]: the item table is the identity
    and the user table holds the score rows, so the cosine is ``scores[u, j] / ||scores[u]||``, a
    positive rescaling of each user's row that keeps the order (the evaluator ranks by cosine)."""
    n_users, n_items = scores.shape
    mcfg = cfg.model.model_copy(update={"dim": n_items, "user_history": False, "item_features": [],
                                        "user_features": [], "mlp": [], "item_bias": False})
    model = TwoTowerModel(n_users, n_items, mcfg)
    with torch.no_grad():
        model.user_tower.id_embedding.weight.copy_(torch.from_numpy(scores).float())
        model.item_tower.id_embedding.weight.copy_(torch.eye(n_items))
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/synthetic.toml")
    ap.add_argument("--out", default="benchmarks/results/synthetic-oracle.json")
    args = ap.parse_args()
    cfg = RunConfig.load(args.config)
    d = cfg.data
    ds = load_dataset(d)
    syn = make_synthetic(n_users=d.synthetic_users, n_items=d.synthetic_items, seed=d.seed)
    # Dataset indices -> generator ids (raw ids are the generator's ids).
    users = np.asarray(ds.users.ids, dtype=np.int64)
    items = np.asarray(ds.items.ids, dtype=np.int64)
    results = {}
    for name, with_pop in (("oracle p(item | user)", True), ("oracle affinity only (popularity divided out)", False)):
        scores = syn.true_scores(users, include_popularity=with_pop)[:, items]
        m = evaluate_split(fixed_score_model(scores, cfg), ds.test, ds.history("valid"), ds.item_counts(), cfg.eval)
        results[name] = {k: m[k] for k in ("recall@20", "recall@20/head", "recall@20/torso", "recall@20/tail",
                                           "ndcg@20", "tail_share@20", "popularity@20", "coverage@20")}
        r = results[name]
        print(f"{name}: recall@20 {r['recall@20']:.4f}  head / torso / tail "
              f"{r['recall@20/head']:.4f} / {r['recall@20/torso']:.4f} / {r['recall@20/tail']:.4f}  "
              f"tail share {r['tail_share@20']:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "results": results}, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
