"""The FAISS index reproduces the served score exactly, including the per-query popularity term."""
import numpy as np
import pytest

from twotower.index.index import (IndexParams, augment_items, augment_queries, auto_kind, build_index, extra_scale,
                                  measure, smoothed_log_p)


def _data(n=3000, d=16, q=50, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(20, d))
    items = centers[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, d))
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    users = rng.normal(size=(q, d))
    users /= np.linalg.norm(users, axis=1, keepdims=True)
    counts = rng.zipf(1.5, n).astype(np.float64)
    return items.astype(np.float32), users.astype(np.float32), counts


@pytest.mark.parametrize("alpha", [0.0, 0.5, 2.0])
def test_flat_index_equals_brute_force_served_score(alpha):
    items, users, counts = _data()
    tau = 0.1
    log_p = smoothed_log_p(counts)
    bias = np.random.default_rng(1).normal(size=len(items)).astype(np.float32)
    s = extra_scale(log_p, bias)
    index, _ = build_index(augment_items(items, log_p, bias, s), IndexParams(kind="flat"))
    scores, ids = index.search(augment_queries(users, tau, alpha, s), 10)
    brute = users @ items.T / tau + bias[None, :] - alpha * log_p[None, :]
    top = np.argsort(-brute, axis=1)[:, :10]
    assert (ids == top).all()
    assert np.allclose(scores, np.take_along_axis(brute, top, 1), atol=1e-3)


def test_larger_alpha_moves_results_to_less_popular_items():
    items, users, counts = _data()
    log_p = smoothed_log_p(counts)
    index, _ = build_index(augment_items(items, log_p), IndexParams(kind="flat"))
    mean_pop = []
    for alpha in (0.0, 0.05, 0.2):
        _, ids = index.search(augment_queries(users, 0.1, alpha), 20)
        mean_pop.append(log_p[ids].mean())
    assert mean_pop[0] > mean_pop[1] > mean_pop[2]


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfpq"])
def test_ann_kinds_reach_high_recall(kind):
    items, users, counts = _data(n=5000)
    log_p = smoothed_log_p(counts)
    s = extra_scale(log_p)
    aug = augment_items(items, log_p, scale=s)
    params = IndexParams(kind=kind, nprobe=32, pq_m=9, ef_search=128)
    index, resolved = build_index(aug, params)
    m = measure(index, aug, augment_queries(users, 0.1, 0.1, s), ks=(10, 100))
    assert resolved.kind == kind
    assert m["recall@10"] >= 0.9 and m["recall@100"] >= 0.85
    assert m["ms_per_query"] > 0


def test_auto_kind_by_catalog_size():
    assert auto_kind(1_000) == "flat" and auto_kind(1_000_000) == "hnsw" and auto_kind(50_000_000) == "ivf"
    assert IndexParams().resolved(40_981).kind == "flat"
