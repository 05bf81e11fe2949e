"""LightFM (WARP) on an exported split; run by benchmarks/cold_start.py with the Python of LightFM's
own virtual environment (it imports nothing from twotower).

    python lightfm_worker.py SPLIT.npz GRID.json OUT.npz

``SPLIT.npz`` holds the training pairs, the item and user feature matrices (CSR parts) and, for
validation and test, the users to rank and each one's known items (CSR over those users).
``GRID.json``: ``{"configs": [{"no_components", "learning_rate", "item_alpha", "identity"}, ...]`` (identity:
"none", "all" or "trained"),
"epochs": [5, 10, ...], "k": 50, "seed": 0, "threads": 1}``. For every configuration LightFM is
trained with ``fit_partial`` up to each epoch count in turn; at each the top ``k`` items of every
validation user (known items masked) are written, and the training seconds so far; ``--test``
mode (``GRID.json`` with one configuration and one epoch count) ranks the test users instead.
The ranking is over every item; the score is LightFM's, ``<u, i> + b_u + b_i`` from the feature
representations.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np
import scipy.sparse as sp


def features(prefix: str, z, n: int, identity: str) -> sp.csr_matrix:
    """The entity-by-feature matrix: one column per feature value, and per entity an identity
    column (``identity = "all"``), none (``"none"``), or only for the entities that have training
    interactions (``"trained"``: a new item has no identity of its own, only its features); each
    row normalised to sum to one (LightFM's advice when mixing the two)."""
    m = sp.csr_matrix((np.ones(len(z[f"{prefix}_indices"]), np.float32), z[f"{prefix}_indices"], z[f"{prefix}_indptr"]),
                      shape=(n, int(z[f"{prefix}_width"])))
    if identity != "none":
        ident = sp.identity(n, dtype=np.float32, format="csr")
        if identity == "trained":
            ident = sp.diags(np.isin(np.arange(n), z[f"train_{prefix}s"]).astype(np.float32), format="csr")
        m = sp.hstack([ident, m], format="csr")
    sums = np.asarray(m.sum(1)).ravel()
    sums[sums == 0] = 1.0
    return sp.csr_matrix(sp.diags(1.0 / sums) @ m, dtype=np.float32)


def top_k(model, uf, itf, users: np.ndarray, known_indptr: np.ndarray, known_indices: np.ndarray, k: int) -> np.ndarray:
    ub, ue = model.get_user_representations(uf)
    ib, ie = model.get_item_representations(itf)
    s = ue[users] @ ie.T + ib[None, :] + ub[users][:, None]
    rows = np.repeat(np.arange(len(users)), np.diff(known_indptr))
    s[rows, known_indices] = -np.inf
    part = np.argpartition(-s, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(s, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1).astype(np.int64)


def main() -> None:
    from lightfm import LightFM

    split, grid_path, out = sys.argv[1:4]
    test = "--test" in sys.argv
    z = np.load(split)
    grid = json.loads(open(grid_path).read())
    n_users, n_items = int(z["n_users"]), int(z["n_items"])
    inter = sp.coo_matrix((np.ones(len(z["train_users"]), np.float32), (z["train_users"], z["train_items"])),
                          shape=(n_users, n_items))
    part = "test" if test else "valid"
    users, kp, ki = z[f"{part}_users"], z[f"{part}_known_indptr"], z[f"{part}_known_indices"]
    result = {}
    for c, cfg in enumerate(grid["configs"]):
        itf = features("item", z, n_items, cfg["identity"])
        uf = features("user", z, n_users, cfg["identity"])
        model = LightFM(loss="warp", no_components=cfg["no_components"], learning_rate=cfg["learning_rate"],
                        item_alpha=cfg["item_alpha"], user_alpha=cfg["item_alpha"], random_state=grid["seed"])
        done, seconds = 0, 0.0
        for epochs in grid["epochs"]:
            t = time.perf_counter()
            model.fit_partial(inter, user_features=uf, item_features=itf, epochs=epochs - done, num_threads=grid["threads"])
            seconds += time.perf_counter() - t
            done = epochs
            result[f"top_{c}_{epochs}"] = top_k(model, uf, itf, users, kp, ki, grid["k"])
            result[f"seconds_{c}_{epochs}"] = np.array(seconds)
            print(f"lightfm config {c} {cfg} epochs {epochs}: {seconds:.1f}s", file=sys.stderr, flush=True)
    np.savez(out, **result)


if __name__ == "__main__":
    main()
