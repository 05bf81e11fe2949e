"""Full-ranking evaluation on a hand-built model whose rankings are known."""
import math

import numpy as np
import pytest
import torch

from twotower import native
from twotower.config import EvalConfig, ModelConfig
from twotower.data.dataset import CSR, Split
from twotower.evaluation import ranking
from twotower.evaluation.evaluator import evaluate_split
from twotower.model.towers import TwoTowerModel


@pytest.fixture(params=["compiled", "pytorch"])
def ranking_path(request, monkeypatch):
    """The hand-computed cases run through both top-k paths: the compiled pass (where built) and
    matmul + topk."""
    if request.param == "pytorch":
        monkeypatch.setenv(native.ENV, "0")
    elif not native.available("topk"):
        pytest.skip("C extension not built, or no MKL")
    else:
        monkeypatch.delenv(native.ENV, raising=False)
        monkeypatch.setattr(native, "_configured", True)
    calls, compiled = [], native.top_k
    monkeypatch.setattr(native, "top_k", lambda *a, **k: calls.append(1) or compiled(*a, **k))
    yield request.param
    assert bool(calls) == (request.param == "compiled"), "the top-k path taken is not the one under test"


def _model():
    m = TwoTowerModel(2, 4, ModelConfig(dim=2, temperature=0.1))
    with torch.no_grad():
        m.user_tower.id_embedding.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        m.item_tower.id_embedding.weight.copy_(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]))
    return m


@pytest.mark.usefixtures("ranking_path")
def test_full_ranking_metrics_by_hand():
    # user 0 ranks items 0 > 1 > 2 > 3 and has seen item 0; held out: item 2 -> ranks 1, 2, 3 = items 1, 2, 3
    # user 1 ranks items 2 > 1 > 0 > 3 and has seen item 3; held out: items 1, 0 -> ranks 2 and 3
    known = CSR.from_pairs(np.array([0, 1]), np.array([0, 3]), 2)
    truth = Split(np.array([0, 1, 1]), np.array([2, 1, 0]))
    counts = np.array([5, 1, 2, 10])
    cfg = EvalConfig(ks=[1, 2, 3], popularity_buckets=[0.25, 0.5])  # head = item 3, torso = item 0, tail = 1, 2
    m = evaluate_split(_model(), truth, known, counts, cfg)
    assert m["users"] == 2
    assert m["recall@1"] == 0.0
    assert m["recall@2"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["recall@3"] == pytest.approx(1.0)
    assert m["hr@2"] == 1.0 and m["hr@1"] == 0.0
    assert m["precision@2"] == pytest.approx((0.5 + 0.5) / 2)
    assert m["mrr@3"] == pytest.approx((0.5 + 0.5) / 2)
    ndcg_u0 = (1 / math.log2(3)) / 1.0
    ndcg_u1 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert m["ndcg@2"] == pytest.approx((ndcg_u0 + ndcg_u1) / 2)
    # top-1 lists: user 0 -> item 1, user 1 -> item 2 (seen items never appear)
    assert m["coverage@1"] == pytest.approx(2 / 4)
    assert m["popularity@1"] == pytest.approx((1 + 2) / 2)
    assert m["tail_share@1"] == 1.0
    assert m["recall@2/tail"] == pytest.approx(1.0)   # items 2 (user 0) and 1 (user 1) found by rank 2
    assert m["recall@2/torso"] == 0.0                 # item 0 for user 1 is at rank 3
    assert m["recall@3/torso"] == 1.0
    assert math.isnan(m["recall@2/head"])              # no held-out item in the head


@pytest.mark.usefixtures("ranking_path")
def test_seen_items_are_masked_even_when_best():
    known = CSR.from_pairs(np.array([0, 0]), np.array([0, 1]), 2)
    truth = Split(np.array([0]), np.array([2]))
    m = evaluate_split(_model(), truth, known, np.ones(4), EvalConfig(ks=[1]))
    assert m["recall@1"] == 1.0  # items 0 and 1 score higher but are the user's training items


@pytest.mark.usefixtures("ranking_path")
def test_alpha_ranks_by_the_served_score_with_popularity_correction():
    # user 0 (vector [1, 0]) has seen item 0; logits cos/tau for items 1, 2, 3 are 8, 0, -10.
    # counts [5, 1, 2, 10] -> log p(j) = log((n_j + 1) / 22): items 1, 2, 3 -> log(2/22), log(3/22), log(11/22).
    known = CSR.from_pairs(np.array([0]), np.array([0]), 2)
    truth = Split(np.array([0]), np.array([3]))  # the held-out item is the most popular one
    counts = np.array([5, 1, 2, 10])
    plain = evaluate_split(_model(), truth, known, counts, EvalConfig(ks=[1, 2, 3]))
    assert plain["recall@2"] == 0.0 and plain["recall@3"] == 1.0
    # alpha = -50 promotes popular items: 8 + 50 log(2/22) = -111.9, 0 + 50 log(3/22) = -99.6,
    # -10 + 50 log(11/22) = -44.7, so item 3 comes first.
    pro_pop = evaluate_split(_model(), truth, known, counts, EvalConfig(ks=[1, 2, 3], alpha=-50.0))
    assert pro_pop["recall@1"] == 1.0 and pro_pop["popularity@1"] == 10.0
    # alpha = 5 demotes them: 8 + 5 * 2.398 = 19.99, 0 + 5 * 1.992 = 9.96, -10 + 5 * 0.693 = -6.53.
    damped = evaluate_split(_model(), truth, known, counts, EvalConfig(ks=[1, 2], alpha=5.0))
    assert damped["recall@2"] == 0.0 and damped["popularity@2"] == pytest.approx((1 + 2) / 2)


@pytest.mark.skipif(not native.available("topk"), reason="C extension not built, or no MKL")
@pytest.mark.parametrize("n, m, k", [(5, 7, 3), (300, 2500, 20), (130, 1500, 1200), (3, 40, 40)])
def test_compiled_top_k_is_topk_of_the_masked_scores(n, m, k):
    """Against ``torch.topk`` of the full score matrix: exclusions, an additive item term, users not
    a multiple of the compiled pass's 128, items across its 1024-item chunks, k above a chunk and
    k equal to the catalog (excluded items then come last, at -inf)."""
    torch.manual_seed(n)
    u, v = torch.randn(n, 8), torch.randn(m, 8)
    bias = torch.randn(m)
    rng = np.random.default_rng(n)
    users = rng.permutation(n + 4)[:n]  # CSR rows are user ids, not positions
    exclude = CSR.from_pairs(rng.integers(0, n + 4, 4 * n), rng.integers(0, m, 4 * n), n + 4)
    values, index = ranking._top_k_compiled(u, v, bias, users, exclude, k)
    scores = u @ v.T + bias
    ranking.mask_rows(scores, users, exclude)
    ref = torch.topk(scores, k, dim=1)
    torch.testing.assert_close(values, ref.values)
    # the items are those scores' items (equal scores may come in either order from topk), once each
    torch.testing.assert_close(scores.gather(1, index), values)
    assert all(len(set(row)) == k for row in index.tolist())
    # the excluded, tied at -inf, in ascending item order
    finite = torch.isfinite(values)
    for r in range(n):
        assert index[r][~finite[r]].tolist() == sorted(index[r][~finite[r]].tolist())


@pytest.mark.skipif(not native.available("topk"), reason="C extension not built, or no MKL")
def test_compiled_top_k_breaks_ties_by_the_lower_item_index():
    # items 0..2499 in pairs of equal vectors: each tie goes to the lower index, across chunks too
    base = torch.randn(1250, 4)
    v = base.repeat_interleave(2, dim=0)
    u = torch.randn(6, 4)
    values, index = ranking._top_k_compiled(u, v, None, np.arange(6), None, 10)
    assert torch.equal(index[:, 0::2] % 2, torch.zeros(6, 5, dtype=torch.long))
    assert torch.equal(index[:, 1::2], index[:, 0::2] + 1)
    torch.testing.assert_close(values[:, 0::2], values[:, 1::2])
    # every item scores the same: the first k items, in order
    _, index = ranking._top_k_compiled(u, torch.ones(2500, 4), None, np.arange(6), None, 10)
    assert torch.equal(index, torch.arange(10).repeat(6, 1))
