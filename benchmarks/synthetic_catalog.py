"""A synthetic-but-clustered catalog for the serving benchmarks, and a run directory around it.

Item vectors are a Gaussian mixture on the unit sphere: ``n / 100`` random unit centres, each
item a centre plus isotropic noise (0.8 times the centre's norm), L2-normalised, as a
trained item tower's outputs are. Users are drawn the same way with more noise (a user's taste
sits between clusters). Popularity is Zipf-like and correlated with nothing, so ``alpha`` has work
to do. This is not real data: real embeddings have lower intrinsic dimension, which makes ANN
search easier, so these figures are on the conservative side.

``write_run`` turns such a catalog into a run directory that ``twotower index`` and ``twotower
serve`` accept: a matrix-factorisation model (ids only, ``dim`` = 64) whose item-id embeddings are
the item vectors and whose user-id embeddings are the user vectors, each user with known items
(so that excluding seen items is exercised), and the item counts behind ``p(j)``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def clustered(n: int, d: int = 64, n_clusters: int | None = None, noise: float = 0.8, seed: int = 0,
              centres: np.ndarray | None = None, chunk: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors from a Gaussian mixture (float32 ``[n, d]``) and the mixture's centres
    (``n_clusters`` default ``n / 100``: about 100 items per cluster at any catalog size)."""
    rng = np.random.default_rng(seed)
    if centres is None:
        n_clusters = n_clusters or max(10, n // 100)
        centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        x = centres[rng.integers(0, len(centres), e - s)] + (noise / np.sqrt(d)) * rng.standard_normal((e - s, d), dtype=np.float32)
        out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, centres


def catalog(n_items: int = 1_000_000, n_users: int = 10_000, d: int = 64, seed: int = 0):
    """Items, users (both unit vectors from the same mixture; users noisier) and Zipf item counts."""
    items, centres = clustered(n_items, d, seed=seed)
    users, _ = clustered(n_users, d, noise=1.0, seed=seed + 1, centres=centres)
    rng = np.random.default_rng(seed + 2)
    counts = np.minimum(rng.zipf(1.3, n_items) - 1, 1_000_000).astype(np.int64)
    return items, users, counts


def write_run(out: str | Path, n_items: int = 1_000_000, n_users: int = 10_000, d: int = 64, history: int = 20,
              seed: int = 0) -> Path:
    """Write a run directory around a synthetic catalog (see the module docstring)."""
    import torch

    from twotower.config import RunConfig
    from twotower.data.dataset import CSR
    from twotower.data.vocab import Vocabulary
    from twotower.model.towers import TwoTowerModel
    from twotower.run_dir import RunDir

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items, users, counts = catalog(n_items, n_users, d, seed)
    cfg = RunConfig.from_dict({"data": {"dataset": "synthetic", "synthetic_users": n_users, "synthetic_items": n_items},
                               "model": {"dim": d, "user_history": False, "temperature": 0.1}})
    model = TwoTowerModel(n_users, n_items, cfg.model)
    with torch.no_grad():
        model.item_tower.id_embedding.weight.copy_(torch.from_numpy(items))
        model.user_tower.id_embedding.weight.copy_(torch.from_numpy(users))
    rng = np.random.default_rng(seed + 3)
    # each user's known items: drawn by popularity (what a log looks like), `history` per user
    p = (counts + 1) / (counts + 1).sum()
    known_items = rng.choice(n_items, size=n_users * history, p=p)
    known = CSR.from_pairs(np.repeat(np.arange(n_users), history), known_items, n_users)
    d = RunDir(out)
    d.write_description(cfg, Vocabulary(np.arange(n_users, dtype=np.int64), name="user"),
                        Vocabulary(np.arange(n_items, dtype=np.int64), name="item"), known, counts, np.arange(n_users),
                        model.feature_state())
    d.save_weights(model.state_dict())
    d.finish({"synthetic": True, "valid": {}, "test": None})
    return out
