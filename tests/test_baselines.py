"""Baselines (popularity, EASE, ALS) through the towers' evaluator: hand-computed cases."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from twotower import native
from twotower.config import EvalConfig, RunConfig, TuneConfig
from twotower.data.dataset import Dataset, Split
from twotower.data.vocab import Vocabulary
from twotower.errors import ConfigError
from twotower.evaluation.evaluator import FactorRanker, evaluate_ranker
from twotower.training import baselines as B

# 4 users x 5 items. Training rows (X), then each user's held-out test items.
X = np.array([[1, 1, 0, 0, 1],
              [1, 0, 1, 0, 1],
              [0, 0, 1, 0, 1],
              [1, 0, 0, 0, 1]], dtype=float)
TEST = {0: [2], 1: [1, 3], 2: [0], 3: [3, 2]}


def _dataset(x=X, test=TEST) -> Dataset:
    u, i = np.nonzero(x)
    tu = np.array([k for k, v in test.items() for _ in v])
    ti = np.array([j for v in test.values() for j in v])
    empty = Split(np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    return Dataset("hand", Vocabulary(np.arange(x.shape[0])), Vocabulary(np.arange(x.shape[1])),
                   Split(u.astype(np.int64), i.astype(np.int64)), empty, Split(tu, ti))


def _metrics_by_hand(scores: np.ndarray, x: np.ndarray, test: dict, k: int) -> tuple[float, float]:
    """Recall@k and NDCG@k written out: rank unseen items by score (ties to the lower index)."""
    recalls, ndcgs = [], []
    for u, held in test.items():
        order = [j for j in sorted(range(x.shape[1]), key=lambda j: (-scores[u, j], j)) if not x[u, j]][:k]
        hits = [1.0 if j in held else 0.0 for j in order]
        recalls.append(sum(hits) / len(held))
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
        idcg = sum(1 / math.log2(r + 2) for r in range(min(k, len(held))))
        ndcgs.append(dcg / idcg)
    return float(np.mean(recalls)), float(np.mean(ndcgs))


@pytest.fixture(params=["compiled", "pytorch"])
def topk_path(request, monkeypatch):
    if request.param == "pytorch":
        monkeypatch.setenv(native.ENV, "0")
    elif not native.available("topk"):
        pytest.skip("C extension not built, or no MKL")
    else:
        monkeypatch.delenv(native.ENV, raising=False)
        monkeypatch.setattr(native, "_configured", True)
    return request.param


@pytest.mark.usefixtures("topk_path")
def test_popularity_by_hand():
    # training counts per item: 3, 1, 2, 0, 4 -> order 4, 0, 2, 1, 3
    ds = _dataset()
    m = evaluate_ranker(B.popularity_ranker(ds.item_counts(), ds.n_users), ds, "test", EvalConfig(ks=[1, 2]))
    # user 0 (knows 0, 1, 4): 2, 3 -> hit at rank 1. user 1 (knows 0, 2, 4): 1, 3 -> both held out.
    # user 2 (knows 2, 4): 0, 1 -> hit at rank 1. user 3 (knows 0, 4): 2, 1 -> 2 is held out (1 of 2).
    assert m["recall@1"] == pytest.approx((1 + 0.5 + 1 + 0.5) / 4)
    assert m["recall@2"] == pytest.approx((1 + 1 + 1 + 0.5) / 4)
    ndcg2_u3 = 1.0 / (1 + 1 / math.log2(3))
    assert m["ndcg@2"] == pytest.approx((1 + 1 + 1 + ndcg2_u3) / 4)
    assert m["users"] == 4


def test_ease_weights_follow_the_closed_form():
    lam = 2.0
    b = B.ease_weights(B.binary_matrix(_dataset()), lam).double().numpy()
    p = np.linalg.inv(X.T @ X + lam * np.eye(5))
    expected = -p / np.diag(p)[None, :]
    np.fill_diagonal(expected, 0.0)
    assert np.allclose(b, expected, atol=1e-6)
    assert np.all(np.diag(b) == 0)
    # B is the least-squares solution with a zero diagonal: X B = X - X P diag(1/diag P) + X ... the
    # off-diagonal stationarity (X^T X + lam I) B = X^T X - diag(mu) holds with mu = 1 / diag(P) - lam
    g = X.T @ X
    lhs = (g + lam * np.eye(5)) @ b
    off = ~np.eye(5, dtype=bool)
    assert np.allclose(lhs[off], g[off], atol=1e-5)


@pytest.mark.usefixtures("topk_path")
@pytest.mark.parametrize("lam", [0.5, 2.0, 50.0])
def test_ease_metrics_equal_the_hand_computed_ones(lam):
    ds = _dataset()
    p = np.linalg.inv(X.T @ X + lam * np.eye(5))
    bb = -p / np.diag(p)[None, :]
    np.fill_diagonal(bb, 0.0)
    scores = X @ bb
    m = evaluate_ranker(B.ease_ranker(ds, lam), ds, "test", EvalConfig(ks=[1, 2, 3]))
    for k in (1, 2, 3):
        recall, ndcg = _metrics_by_hand(scores, X, TEST, k)
        assert m[f"recall@{k}"] == pytest.approx(recall, abs=1e-9)
        assert m[f"ndcg@{k}"] == pytest.approx(ndcg, abs=1e-9)


@pytest.mark.usefixtures("topk_path")
def test_factor_ranker_equals_the_product_ranked_by_hand():
    rng = np.random.default_rng(3)
    u, v = rng.normal(size=(4, 3)), rng.normal(size=(5, 3))
    ds = _dataset()
    m = evaluate_ranker(FactorRanker(torch.tensor(u), torch.tensor(v)), ds, "test", EvalConfig(ks=[1, 2, 3]))
    for k in (1, 2, 3):
        recall, ndcg = _metrics_by_hand(u @ v.T, X, TEST, k)
        assert m[f"recall@{k}"] == pytest.approx(recall, abs=1e-6)
        assert m[f"ndcg@{k}"] == pytest.approx(ndcg, abs=1e-6)


def test_ease_refuses_a_catalog_too_large_and_says_what_it_needs():
    with pytest.raises(ConfigError) as e:
        B.check_ease_fits(60_000, 50_000)
    msg = str(e.value)
    assert "60,000 items" in msg and "GiB" in msg and "als" in msg
    assert f"{B.ease_memory_bytes(60_000) / 2**30:.1f} GiB" in msg
    B.check_ease_fits(100, 50_000)  # small: no error


def test_coordinate_search_scores_each_point_once_and_climbs():
    calls = []

    def score(p):
        calls.append(tuple(sorted(p.items())))
        return -(p["a"] - 3) ** 2 - (p["b"] - 10) ** 2

    best, table = B.coordinate_search({"a": [1, 2, 3], "b": [1, 10, 100]}, score)
    assert best == {"a": 3, "b": 10}
    assert len(calls) == len(set(calls)) == len(table)
    assert table[0]["settings"] == {"a": 2, "b": 10}  # the start: the middle of each list


def test_als_ranks_by_its_factors():
    pytest.importorskip("implicit")
    ds = _dataset()
    ranker = B.als_ranker(ds, factors=3, regularization=0.1, alpha=2.0, iterations=5, seed=0, threads=1)
    scores = (ranker.user_vectors @ ranker.item_vectors.T).double().numpy()
    m = evaluate_ranker(ranker, ds, "test", EvalConfig(ks=[2]))
    recall, ndcg = _metrics_by_hand(scores, X, TEST, 2)
    assert m["recall@2"] == pytest.approx(recall, abs=1e-6)
    assert m["ndcg@2"] == pytest.approx(ndcg, abs=1e-6)


def test_run_baseline_chooses_on_validation_and_scores_test_after_a_refit(tmp_path):
    cfg = RunConfig.from_dict({"data": {"dataset": "synthetic", "synthetic_users": 300, "synthetic_items": 120},
                               "eval": {"ks": [10, 20]}, "tune": {"ease_lambda": [1.0, 30.0, 1000.0]}})
    from twotower.data.sources import load_dataset

    ds = load_dataset(cfg.data)
    res = B.run_baseline(cfg, "ease", ds, log=lambda m: None)
    values = {row["settings"]["lambda"]: row["value"] for row in res.search}
    assert set(values) == {1.0, 30.0, 1000.0}
    assert res.settings["lambda"] == max(values, key=values.get)
    # the chosen model's validation figure is the search's; test comes from a fit on train + valid
    assert res.valid["recall@20"] == pytest.approx(values[res.settings["lambda"]])
    full = ds.with_valid_in_train()
    again = evaluate_ranker(B.ease_ranker(full, res.settings["lambda"]), ds, "test", cfg.eval)
    assert res.test["recall@20"] == pytest.approx(again["recall@20"])
    B.write_baseline(tmp_path / "ease", cfg, res)
    m = json.loads((tmp_path / "ease" / "metrics.json").read_text())
    assert m["baseline"] == "ease" and m["test"]["recall@20"] == pytest.approx(res.test["recall@20"])


@pytest.mark.slow
def test_baseline_cli_and_compare_with_it(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text('[data]\ndataset = "synthetic"\nsynthetic_users = 200\nsynthetic_items = 80\n'
                   '[model]\ndim = 8\n[train]\nepochs = 1\nbatch_size = 256\n[eval]\nks = [10, 20]\n')
    run = [sys.executable, "-m", "twotower"]
    out = subprocess.run(run + ["baseline", str(cfg), "--method", "popularity", "--out", str(tmp_path / "pop"),
                                "--quiet"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rep = subprocess.run(run + ["compare", str(cfg), "--out", str(tmp_path / "cmp"), "--with", str(tmp_path / "pop"),
                                "--quiet"], capture_output=True, text=True)
    assert rep.returncode == 0, rep.stderr
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "pop (popularity)" in report and "| base |" in report
    bad = subprocess.run(run + ["baseline", str(cfg), "--method", "ease", "--out", str(tmp_path / "e"),
                                "--set", "tune.ease_max_items=10"], capture_output=True, text=True)
    assert bad.returncode == 2 and "tune.ease_max_items" in bad.stderr and not (tmp_path / "e").exists()


def test_tune_section_is_bounded():
    with pytest.raises(ValueError):
        TuneConfig(lr=[0.1, 0.01])
    with pytest.raises(ValueError):
        TuneConfig(temperature=[0.0, 0.1])
    with pytest.raises(ValueError):
        TuneConfig(batch_size=[1, 64])
    with pytest.raises(ValueError):
        TuneConfig(ease_lambda=[])
