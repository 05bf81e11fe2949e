"""Run directories written without training: an ids-only model whose item and user vectors are
given (the layout of the synthetic runs of `benchmarks/synthetic_catalog.py`), for tests of the
index and of serving that need runs in seconds, or two runs that differ in known ways."""
import numpy as np
import torch


def clustered(n, d=16, q=200, seed=0):
    """``n`` unit item vectors around 60 centres and ``q`` user vectors near the same centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(60, d))
    x = centres[rng.integers(0, 60, n)] + 0.5 * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    users = centres[rng.integers(0, 60, q)] + 0.7 * rng.normal(size=(q, d))
    return x.astype(np.float32), users.astype(np.float32)


def write_mf_run(path, items, users, counts, seed=0, history=5):
    """A complete run directory (manifest included) at ``path``: raw item ids ``10 * i``, raw user ids
    ``1000 + u``, ``history`` known items per user among the first 1,000 items."""
    from twotower.config import RunConfig
    from twotower.data.dataset import CSR
    from twotower.data.vocab import Vocabulary
    from twotower.model.towers import TwoTowerModel
    from twotower.run_dir import RunDir

    n_items, d = items.shape
    n_users = len(users)
    rng = np.random.default_rng(seed)
    cfg = RunConfig.from_dict({"data": {"dataset": "synthetic", "synthetic_users": n_users, "synthetic_items": n_items},
                               "model": {"dim": d, "user_history": False, "temperature": 0.1}})
    model = TwoTowerModel(n_users, n_items, cfg.model)
    with torch.no_grad():
        model.item_tower.id_embedding.weight.copy_(torch.from_numpy(items))
        model.user_tower.id_embedding.weight.copy_(torch.from_numpy(users))
    known = CSR.from_pairs(np.repeat(np.arange(n_users), history), rng.integers(0, min(n_items, 1000), n_users * history),
                           n_users)
    rd = RunDir(path)
    rd.write_description(cfg, Vocabulary(np.arange(n_users, dtype=np.int64) + 1000, name="user"),
                         Vocabulary(np.arange(n_items, dtype=np.int64) * 10, name="item"), known, counts,
                         np.arange(n_users), model.feature_state())
    rd.save_weights(model.state_dict())
    rd.finish({"valid": {}, "test": None})
    return path
