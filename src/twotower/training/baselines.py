"""The baselines a practitioner tries first, on the same split and through the same evaluator.

- **popularity**: every user gets the most-interacted items (their own known ones excluded);
- **ALS**: implicit-feedback matrix factorisation (Hu, Koren and Volinsky, ICDM 2008) through the
  ``implicit`` package (the ``als`` extra): confidence ``c = 1 + alpha r`` on the binary matrix,
  user and item factors by alternating least squares with L2 ``regularization``;
- **EASE**: the closed-form linear item-item model of Steck (WWW 2019, "Embarrassingly Shallow
  Autoencoders for Sparse Data"), ``B = I - P diag(1 / diag(P))`` with
  ``P = (X^T X + lambda I)^-1``, so ``diag(B) = 0``; a user's scores are their known-items row
  times ``B``. The inverse is dense, ``n_items x n_items``: catalogs above
  ``tune.ease_max_items`` (or the memory available) are refused with what it would need.

Each baseline is a ``Ranker`` of ``evaluation.evaluator`` (factor vectors, or a block scorer), so
its metrics come from the very code that scores the towers. Settings are chosen on validation
(fit on training, rank validation with the training items known) by a coordinate search over
``[tune]``'s lists; the chosen ones are then fitted on training + validation and test is scored
once, with training and validation items known, as ``train.refit`` does for the towers.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import RunConfig, TuneConfig
from ..data.dataset import CSR, Dataset
from ..errors import ConfigError
from ..evaluation.evaluator import BlockRanker, FactorRanker, Ranker, evaluate_ranker
from ..model import init
from ..run_dir import RunDir

METHODS = ("popularity", "als", "ease")


# ---- the models ------------------------------------------------------------------------------------
def popularity_ranker(item_counts: np.ndarray, n_users: int) -> FactorRanker:
    """``score(u, j) = count(j)``: a factor model with ``U = 1`` and ``V = count``."""
    counts = torch.as_tensor(np.asarray(item_counts, dtype=np.float32)).reshape(-1, 1)
    return FactorRanker(torch.ones(n_users, 1), counts)


def binary_matrix(ds: Dataset):
    """The training pairs of ``ds`` as a binary users x items ``scipy.sparse`` CSR matrix (float32)."""
    import scipy.sparse as sp

    keys = np.unique(ds.train.users.astype(np.int64) * ds.n_items + ds.train.items)
    return sp.csr_matrix((np.ones(len(keys), dtype=np.float32), (keys // ds.n_items, keys % ds.n_items)),
                         shape=(ds.n_users, ds.n_items))


def als_ranker(ds: Dataset, factors: int, regularization: float, alpha: float, iterations: int, seed: int = 0,
               threads: int | None = None) -> FactorRanker:
    """Implicit ALS fitted on ``ds``'s training pairs (``model.init.als_factors``); ranks by ``<x_u, y_j>``."""
    x = init.interaction_matrix(ds.train.users, ds.train.items, ds.n_users, ds.n_items)
    users, items = init.als_factors(x, factors, seed, iterations, regularization, alpha, threads)
    return FactorRanker(users, items)


def ease_memory_bytes(n_items: int) -> int:
    """The dense arrays EASE holds at once: two float64 ``n x n`` (the Gram matrix and its Cholesky
    factor, then the factor and the inverse) and ``B`` in float32, with room to spare."""
    return 20 * n_items * n_items


def check_ease_fits(n_items: int, max_items: int) -> None:
    """Refuse a catalog whose dense inverse is too large, saying what it would need."""
    need = ease_memory_bytes(n_items)
    avail = _available_memory()
    if n_items > max_items or (avail is not None and need > avail):
        have = f", {avail / 2**30:.1f} GiB available" if avail is not None else ""
        raise ConfigError(
            f"EASE: the catalog has {n_items:,} items; its closed form inverts a dense {n_items:,} x {n_items:,} matrix, "
            f"about {need / 2**30:.1f} GiB of memory{have} and ~{n_items ** 3 / 3:.1e} multiply-adds "
            f"(tune.ease_max_items = {max_items:,}). Use --method als or popularity, or raise tune.ease_max_items on a "
            f"machine that has the memory")


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def ease_weights(x, lam: float) -> torch.Tensor:
    """``B = I - P diag(1 / diag(P))``, ``P = (X^T X + lam I)^-1`` (Steck 2019): ``B_ij = -P_ij / P_jj``
    off the diagonal and ``B_jj = 0``. ``x``: the binary users x items matrix (scipy sparse).
    Returns ``B`` as float32 ``[n_items, n_items]``."""
    g = torch.from_numpy((x.T @ x).toarray().astype(np.float64))
    g.diagonal().add_(float(lam))
    chol = torch.linalg.cholesky(g)  # G + lam I is symmetric positive definite
    del g
    p = torch.cholesky_inverse(chol)
    del chol
    b = p.div_(-torch.diagonal(p).clone()[None, :])
    b.diagonal().zero_()
    return b.float()


def ease_ranker(ds: Dataset, lam: float) -> BlockRanker:
    """EASE fitted on ``ds``'s training pairs: a user's scores are their known-items row times ``B``."""
    b = ease_weights(binary_matrix(ds), lam)

    def scores_of(block: np.ndarray, known: CSR) -> torch.Tensor:
        # the users' rows as a sparse matrix: a row holds a user's few known items, not the catalog
        vals, _ = known.gather(block)
        rows = np.repeat(np.arange(len(block)), known.lengths()[block])
        idx = torch.from_numpy(np.stack([rows, vals]).astype(np.int64))
        x = torch.sparse_coo_tensor(idx, torch.ones(len(vals)), (len(block), b.shape[0]), check_invariants=False)
        return torch.sparse.mm(x.coalesce(), b)

    return BlockRanker(b.shape[0], scores_of)


# ---- choosing settings on validation ---------------------------------------------------------------
def search_space(method: str, tune: TuneConfig) -> dict[str, list]:
    """Each setting of ``method`` and the values tried on validation."""
    if method == "als":
        return {"alpha": tune.als_alpha, "regularization": tune.als_regularization, "factors": tune.als_factors,
                "iterations": tune.als_iterations}
    if method == "ease":
        return {"lambda": tune.ease_lambda}
    return {}


def make_ranker(method: str, ds: Dataset, settings: dict, seed: int = 0, threads: int | None = None) -> Ranker:
    if method == "popularity":
        return popularity_ranker(ds.item_counts(), ds.n_users)
    if method == "als":
        return als_ranker(ds, settings["factors"], settings["regularization"], settings["alpha"],
                          settings["iterations"], seed, threads)
    if method == "ease":
        return ease_ranker(ds, settings["lambda"])
    raise ConfigError(f"unknown baseline {method!r}: choose one of {', '.join(METHODS)}")


def coordinate_search(space: dict[str, list], score: Callable[[dict], float], passes: int = 3) -> tuple[dict, list[dict]]:
    """Coordinate ascent: start every setting at the middle of its list, then, setting by setting,
    try each value with the others at their best so far and keep the best; repeat the pass (at most
    ``passes``) while it changes something, since the best of one setting moves with another (ALS's
    regularisation with its factors). Each distinct point is scored once. Returns the best settings
    and every scored point (``{"settings", "value"}``, in order)."""
    best = {k: v[len(v) // 2] for k, v in space.items()}
    seen: dict[tuple, float] = {}
    table: list[dict] = []

    def value(point: dict) -> float:
        key = tuple(point[k] for k in space)
        if key not in seen:
            seen[key] = score(dict(point))
            table.append({"settings": dict(point), "value": seen[key]})
        return seen[key]

    best_value = value(best)
    for _ in range(passes):
        start = dict(best)
        for k, values in space.items():
            for v in values:
                point = {**best, k: v}
                got = value(point)
                if got > best_value:
                    best, best_value = point, got
        if best == start:
            break
    return best, table


@dataclass
class BaselineResult:
    method: str
    settings: dict
    valid: dict[str, float]
    test: dict[str, float] | None
    fit_seconds: float        # the final fit (training + validation)
    valid_fit_seconds: float  # the chosen settings' fit on training alone
    seconds: float            # everything: the search, the final fit, both evaluations
    search: list[dict]


def run_baseline(cfg: RunConfig, method: str, ds: Dataset, evaluate_test: bool = True, log=None) -> BaselineResult:
    """Choose ``method``'s settings on validation, fit them on training + validation, score test once."""
    if method not in METHODS:
        raise ConfigError(f"unknown baseline {method!r}: choose one of {', '.join(METHODS)}")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if method == "ease":
        check_ease_fits(ds.n_items, cfg.tune.ease_max_items)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    t0 = time.perf_counter()
    monitor, seed, threads = cfg.train.monitor, cfg.train.seed, cfg.train.threads
    k = int(monitor.split("@")[1])
    quick = cfg.eval.model_copy(update={"ks": [k]})
    fit_times: dict[tuple, float] = {}

    def score(settings: dict) -> float:
        s0 = time.perf_counter()
        ranker = make_ranker(method, ds, settings, seed, threads)
        fit_times[tuple(sorted(settings.items()))] = time.perf_counter() - s0
        value = evaluate_ranker(ranker, ds, "valid", quick)[monitor]
        log(f"{method} {settings or ''}: valid {monitor} {value:.4f} (fit {fit_times[tuple(sorted(settings.items()))]:.1f}s)")
        return value

    space = search_space(method, cfg.tune)
    if len(ds.valid):
        settings, table = coordinate_search(space, score)
        for row in table:
            row["fit_seconds"] = fit_times[tuple(sorted(row["settings"].items()))]
        valid = evaluate_ranker(make_ranker(method, ds, settings, seed, threads), ds, "valid", cfg.eval)
    else:
        settings, table, valid = {k: v[len(v) // 2] for k, v in space.items()}, [], {}
    valid_fit = fit_times.get(tuple(sorted(settings.items())), float("nan"))
    test, fit_seconds = None, float("nan")
    if evaluate_test and len(ds.test):
        full = ds.with_valid_in_train() if len(ds.valid) else ds
        s0 = time.perf_counter()
        ranker = make_ranker(method, full, settings, seed, threads)
        fit_seconds = time.perf_counter() - s0
        test = evaluate_ranker(ranker, ds, "test", cfg.eval)
    seconds = time.perf_counter() - t0
    log(f"{method}: chose {settings or 'no settings'} on validation; fit on training + validation in {fit_seconds:.1f}s")
    return BaselineResult(method, settings, valid, test, fit_seconds, valid_fit, seconds, table)


def write_baseline(out: str | Path, cfg: RunConfig, res: BaselineResult) -> None:
    """The baseline's folder: its config and metrics (``metrics.json``: ``valid``, ``test`` and the
    settings), in the run directory's format so that ``compare`` reads it like a run."""
    RunDir(out).write_baseline(cfg, {
        "baseline": res.method, "settings": res.settings, "valid": res.valid, "test": res.test,
        "fit_seconds": res.fit_seconds, "valid_fit_seconds": res.valid_fit_seconds, "seconds": res.seconds,
        "search": res.search})
