"""Starting points of the id tables from the interaction matrix, for a faster start than random.

A random start spends the first epochs finding the coarse structure of the data that a few
matrix products give directly. Two starts (``model.init``):

- ``svd``: the top ``d`` singular vectors of the degree-normalised interaction matrix
  ``X~ = D_u^{-1/2} X D_i^{-1/2}`` (``X`` binary users x items, ``D`` the degrees), the
  normalisation of spectral collaborative filtering (GF-CF, Shen et al., CIKM 2021; LightGCN's
  propagation matrix, He et al., SIGIR 2020): popular items do not take every direction.
  ``X~ ~ U S V^T`` gives users ``U S^(1/2)`` and items ``V S^(1/2)``;
- ``als``: a few sweeps of implicit-feedback ALS (Hu, Koren and Volinsky, ICDM 2008) through the
  ``implicit`` package.

Both are cosine models in disguise once each row is normalised, and the towers normalise anyway;
each row is put on the sphere of radius ``init_std * sqrt(d)``, the expected norm of a normal
row, so that the optimiser's steps have the same angular size as from a random start. Rows
with no training interaction keep a random direction.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .towers import TwoTowerModel


def on_sphere(rows: torch.Tensor, radius: float, generator: torch.Generator) -> torch.Tensor:
    """``rows`` scaled to norm ``radius``; a zero row gets a random direction of that norm."""
    norms = rows.norm(dim=1, keepdim=True)
    empty = (norms <= 1e-12).squeeze(1)
    if bool(empty.any()):
        rows = rows.clone()
        rows[empty] = torch.randn(int(empty.sum()), rows.shape[1], generator=generator, dtype=rows.dtype)
        norms = rows.norm(dim=1, keepdim=True)
    return rows / norms * radius


def interaction_matrix(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> torch.Tensor:
    """The binary users x items matrix of the pairs, sparse (repeats counted once)."""
    keys = np.unique(np.asarray(users, dtype=np.int64) * n_items + np.asarray(items, dtype=np.int64))
    idx = torch.from_numpy(np.stack([keys // n_items, keys % n_items]))
    return torch.sparse_coo_tensor(idx, torch.ones(len(keys)), (n_users, n_items), check_invariants=False).coalesce()


def svd_factors(x: torch.Tensor, dim: int, seed: int = 0, niter: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(users [n_users, dim], items [n_items, dim])`` = ``(U S^(1/2), V S^(1/2))`` of the top ``dim``
    singular triplets of ``D_u^{-1/2} X D_i^{-1/2}`` (randomised SVD, Halko et al. 2011:
    ``torch.svd_lowrank`` with ``niter`` power iterations). Missing components (``dim`` above the
    matrix's rank) are zero columns."""
    n_users, n_items = x.shape
    idx, val = x.indices(), x.values().double()
    du = torch.zeros(n_users, dtype=torch.float64).index_add_(0, idx[0], val)
    di = torch.zeros(n_items, dtype=torch.float64).index_add_(0, idx[1], val)
    norm = val / (du[idx[0]].clamp_min(1).sqrt() * di[idx[1]].clamp_min(1).sqrt())
    xn = torch.sparse_coo_tensor(idx, norm.float(), x.shape, check_invariants=False).coalesce()
    q = min(dim, n_users, n_items)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # svd_lowrank draws its random projection from the global generator
    try:
        u, s, v = torch.svd_lowrank(xn, q=q, niter=niter)
    finally:
        torch.random.set_rng_state(state)
    root = s.clamp_min(0).sqrt()
    users, items = torch.zeros(n_users, dim), torch.zeros(n_items, dim)
    users[:, :q], items[:, :q] = u * root, v * root
    return users, items


def als_factors(x: torch.Tensor, dim: int, seed: int = 0, iterations: int = 3, regularization: float = 0.01,
                alpha: float = 1.0, threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(users, items)`` factors after ``iterations`` sweeps of implicit-feedback ALS (Hu, Koren and
    Volinsky, ICDM 2008: confidence ``c = 1 + alpha`` on the binary matrix ``x``, L2
    ``regularization``) through ``implicit``, on ``threads`` threads (default: PyTorch's). The ALS
    baseline (``training/baselines.py``) and ``model.init = "als"`` both fit through here."""
    from ..errors import ConfigError

    try:
        from implicit.cpu.als import AlternatingLeastSquares
    except ImportError:
        raise ConfigError("ALS (the baseline, or model.init = \"als\") needs the `implicit` package: "
                          "pip install -e \".[als]\" (or use model.init = \"svd\")") from None
    import scipy.sparse as sp

    idx = x.indices().numpy()
    m = sp.csr_matrix((np.ones(idx.shape[1], dtype=np.float32), (idx[0], idx[1])), shape=tuple(x.shape))
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # an older implicit without it: its warning about BLAS threads stays
        import contextlib
        threadpool_limits = lambda *a: contextlib.nullcontext()  # noqa: E731
    with threadpool_limits(1, "blas"):  # implicit parallelises itself
        als = AlternatingLeastSquares(factors=int(dim), regularization=float(regularization), alpha=float(alpha),
                                      iterations=int(iterations), random_state=seed,
                                      num_threads=int(threads or torch.get_num_threads()))
        als.fit(m, show_progress=False)
    return torch.from_numpy(np.asarray(als.user_factors)).float(), torch.from_numpy(np.asarray(als.item_factors)).float()


@torch.no_grad()
def start_id_tables(model: TwoTowerModel, users: np.ndarray, items: np.ndarray, method: str, seed: int) -> None:
    """Start the user-id and item-id tables (and a separate history table) of ``model`` from the
    factors of the training pairs ``(users, items)`` (``method``: ``svd`` or ``als``), each row on
    the sphere of a normal row's expected norm, ``init_std * sqrt(d)``."""
    cfg = model.cfg
    x = interaction_matrix(users, items, model.n_users, model.n_items)
    factors = svd_factors if method == "svd" else als_factors
    u, v = factors(x, cfg.dim, seed)
    gen = torch.Generator().manual_seed(seed)
    radius = cfg.init_std * math.sqrt(cfg.dim)
    u, v = on_sphere(u, radius, gen), on_sphere(v, radius, gen)
    for table, rows in ((model.user_tower.id_embedding, u), (model.item_tower.id_embedding, v),
                        (model.user_tower.history_table, v)):
        if table is not None:
            table.weight.copy_(rows.to(table.weight.dtype))
