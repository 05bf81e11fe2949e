"""Each metric against hand-computed values."""
import math

import torch

from twotower.evaluation import metrics as M

# user 0: held-out {a, b, c} (3 items), hits at ranks 1 and 3 (0-based 0 and 2) in a top-4 list
# user 1: held-out {x} (1 item), hit at rank 2 (0-based 1)
# user 2: held-out 2 items, no hit
HITS = torch.tensor([[True, False, True, False], [False, True, False, False], [False, False, False, False]])
NREL = torch.tensor([3, 1, 2])


def test_recall():
    assert M.recall_at_k(HITS, NREL, 2).tolist() == [1 / 3, 1.0, 0.0]
    assert M.recall_at_k(HITS, NREL, 4).tolist() == [2 / 3, 1.0, 0.0]


def test_precision_and_hit_rate():
    assert M.precision_at_k(HITS, 2).tolist() == [0.5, 0.5, 0.0]
    assert M.hit_rate_at_k(HITS, 1).tolist() == [1.0, 0.0, 0.0]
    assert M.hit_rate_at_k(HITS, 2).tolist() == [1.0, 1.0, 0.0]


def test_ndcg_ideal_over_min_k_heldout():
    got = M.ndcg_at_k(HITS, NREL, 2).tolist()
    # user 0: DCG = 1/log2(2) = 1; IDCG over min(2, 3) = 2 hits: 1 + 1/log2(3)
    assert math.isclose(got[0], 1 / (1 + 1 / math.log2(3)), rel_tol=1e-9)
    # user 1: DCG = 1/log2(3); IDCG over min(2, 1) = 1 hit: 1
    assert math.isclose(got[1], 1 / math.log2(3), rel_tol=1e-9)
    assert got[2] == 0.0
    got4 = M.ndcg_at_k(HITS, NREL, 4).tolist()
    assert math.isclose(got4[0], (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3) + 1 / math.log2(4)), rel_tol=1e-9)


def test_mrr():
    assert M.mrr_at_k(HITS, 4).tolist() == [1.0, 0.5, 0.0]
    assert M.mrr_at_k(HITS, 1).tolist() == [1.0, 0.0, 0.0]


def test_popularity_buckets_by_item_share():
    counts = torch.tensor([5.0, 100.0, 1.0, 50.0, 0.0, 10.0, 2.0, 3.0, 4.0, 20.0])
    b = M.popularity_buckets(counts, [0.2, 0.5])
    # by count: items 1, 3 (head, top 20 %) | 9, 5, 0 (torso, next 30 %) | 8, 7, 6, 2, 4 (tail)
    assert b[1] == 0 and b[3] == 0
    assert b[9] == 1 and b[5] == 1 and b[0] == 1
    assert b[8] == 2 and b[7] == 2 and b[4] == 2
    assert M.bucket_names(3) == ["head", "torso", "tail"]
