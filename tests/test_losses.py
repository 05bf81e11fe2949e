"""Every loss term, correction and mask against tiny hand-computed cases."""
import math

import pytest
import torch

from twotower import native
from twotower.training import losses


def test_log_expected_count_in_batch_only_is_log_B_p():
    p = torch.tensor([0.5, 0.25, 0.25])
    got = losses.log_expected_count(p, batch_size=4)
    assert torch.allclose(got, torch.log(torch.tensor([2.0, 1.0, 1.0])))


def test_log_expected_count_mixed_proposal_and_bank():
    # B=2 in-batch, M=3 sampled from r, Q=4 bank entries: E[count] = (B + Q) p + M r
    p = torch.tensor([0.5, 0.3, 0.2])
    r = torch.tensor([1 / 3, 1 / 3, 1 / 3])
    got = losses.log_expected_count(p, batch_size=2, n_sampled=3, r=r, bank_size=4)
    expected = torch.log(torch.tensor([6 * 0.5 + 1.0, 6 * 0.3 + 1.0, 6 * 0.2 + 1.0]))
    assert torch.allclose(got, expected)


def _ce(rows):
    """Mean of -log softmax for rows given as (logits list, target index)."""
    return sum(-(z[t] - math.log(sum(math.exp(x) for x in z))) for z, t in rows) / len(rows)


def test_logq_correction_positive_and_negatives_by_hand():
    scores = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    log_q = torch.tensor([0.5, -1.0])
    target = torch.tensor([0, 1])
    both = losses.sampled_softmax_loss(scores, target, correction=log_q)
    assert math.isclose(float(both), _ce([([0.5, 3.0], 0), ([2.5, 5.0], 1)]), rel_tol=1e-6)
    neg_only = losses.sampled_softmax_loss(scores, target, correction=log_q, positive_correction=torch.zeros(2))
    assert math.isclose(float(neg_only), _ce([([1.0, 3.0], 0), ([2.5, 4.0], 1)]), rel_tol=1e-6)
    half = losses.sampled_softmax_loss(scores, target, correction=0.5 * log_q)
    assert math.isclose(float(half), _ce([([0.75, 2.5], 0), ([2.75, 4.5], 1)]), rel_tol=1e-6)


def test_fused_gradient_matches_composed_autograd():
    torch.manual_seed(0)
    scores = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, 2, 8, 4, 5])
    corr = torch.randn(9, dtype=torch.float64)
    mask = torch.rand(6, 9) < 0.3
    mask[torch.arange(6), target] = False
    for pos in (None, torch.zeros(6, dtype=torch.float64)):
        got = losses.sampled_softmax_loss(scores, target, corr, mask, pos)
        (g_got,) = torch.autograd.grad(got, scores)
        z = scores - corr
        if pos is not None:
            z = z + torch.nn.functional.one_hot(target, 9) * corr[target][:, None]
        ref = torch.nn.functional.cross_entropy(z.masked_fill(mask, float("-inf")), target)
        (g_ref,) = torch.autograd.grad(ref, scores)
        assert torch.allclose(got, ref) and torch.allclose(g_got, g_ref)
        assert (g_got[mask] == 0).all()  # masked candidates get no gradient


def test_accidental_hit_mask_masks_duplicates_not_target():
    pos = torch.tensor([7, 3, 7])
    cand = torch.tensor([7, 3, 7])
    m = losses.accidental_hit_mask(pos, cand, torch.arange(3))
    assert m.tolist() == [[False, False, True], [False, False, False], [True, False, False]]


def test_accidental_hit_mask_against_bank_candidates():
    pos = torch.tensor([1, 2])
    cand = torch.tensor([1, 2, 2, 5, 1])  # in-batch (0, 1) then bank (2..4)
    m = losses.accidental_hit_mask(pos, cand, torch.tensor([0, 1]))
    assert m.tolist() == [[False, False, False, False, True], [False, False, True, False, False]]


def test_seen_item_mask():
    n_items = 10
    # user 0 has items {1, 4}; user 1 has {4}
    keys = torch.tensor(sorted([0 * n_items + 1, 0 * n_items + 4, 1 * n_items + 4]))
    users = torch.tensor([0, 1])
    cand = torch.tensor([1, 4, 6])
    target = torch.tensor([0, 1])
    m = losses.seen_item_mask(users, cand, target, keys, n_items)
    # row 0: item 1 is its target (kept), item 4 is seen (masked); row 1: item 4 is its target
    assert m.tolist() == [[False, True, False], [False, False, False]]


def test_sampled_softmax_loss_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    target = torch.tensor([0, 2])
    mask = torch.tensor([[False, False, True], [True, False, False]])
    got = losses.sampled_softmax_loss(logits, target, mask=mask)
    row0 = -(2.0 - math.log(math.exp(2.0) + math.exp(1.0)))
    row1 = -(3.0 - math.log(math.exp(1.0) + math.exp(3.0)))
    assert math.isclose(float(got), (row0 + row1) / 2, rel_tol=1e-6)
    unmasked = losses.sampled_softmax_loss(logits, target)
    row0u = -(2.0 - math.log(math.exp(2.0) + math.exp(1.0) + 1.0))
    row1u = -(3.0 - math.log(1.0 + math.exp(1.0) + math.exp(3.0)))
    assert math.isclose(float(unmasked), (row0u + row1u) / 2, rel_tol=1e-6)


def test_logq_shifts_gradient_toward_popular_negatives():
    # A popular negative (high p) gets its logit lowered by log(B p): the corrected loss is smaller,
    # i.e. the model is penalised less for scoring popular items high.
    scores = torch.tensor([[1.0, 1.0]])
    log_q = losses.log_expected_count(torch.tensor([0.1, 0.9]), batch_size=1)
    plain = losses.sampled_softmax_loss(scores, torch.tensor([0]))
    corrected = losses.sampled_softmax_loss(scores, torch.tensor([0]), log_q, positive_correction=torch.zeros(1))
    assert math.isclose(float(plain), math.log(2), rel_tol=1e-6)
    assert math.isclose(float(corrected), -math.log(math.exp(1) / (math.exp(1) + math.exp(1 - math.log(0.9)))), rel_tol=1e-6)


def test_accidental_hits_are_the_dense_masks_true_entries():
    torch.manual_seed(1)
    pos = torch.randint(0, 6, (9,))
    cand = torch.cat([pos, torch.randint(0, 6, (5,))])  # in-batch columns, then sampled/bank ones
    target = torch.arange(9)
    rows, cols = losses.accidental_hits(pos, cand, target)
    dense = losses.accidental_hit_mask(pos, cand, target)
    assert rows.tolist() == sorted(rows.tolist())
    assert sorted(zip(rows.tolist(), cols.tolist())) == [tuple(x) for x in dense.nonzero().tolist()]


def _composed(query, vectors, target, offset, mask, shift, extra, extra_mask):
    scores = query @ vectors.T + (offset if offset is not None else 0)
    full = scores if extra is None else torch.cat([scores, extra], 1)
    m = mask if extra is None else torch.cat([mask, extra_mask], 1)
    pos = None
    if shift is not None:  # positive_correction - correction[target] = shift, with correction 0
        pos = shift
    return losses.sampled_softmax_loss(full, target, None if pos is None else torch.zeros(full.shape[1], dtype=full.dtype),
                                       m, pos)


def test_shared_softmax_loss_matches_the_composed_loss_in_value_and_gradients():
    torch.manual_seed(0)
    B, C, d, K = 13, 17, 5, 3
    dt = torch.float64
    ids = torch.randint(0, 8, (C,))
    target = torch.randperm(C)[:B]
    pos_ids = ids[target]
    hits = losses.accidental_hits(pos_ids, ids, target)
    mask = losses.accidental_hit_mask(pos_ids, ids, target)
    seen = torch.rand(B, C) < 0.2
    seen[torch.arange(B), target] = False
    mask |= seen
    excluded = losses.merge_coordinates(hits, losses.mask_coordinates(seen), n_cols=C)
    for with_extra in (False, True):
        for block in (1, 4, 64):
            q = torch.randn(B, d, dtype=dt, requires_grad=True)
            v = torch.randn(C, d, dtype=dt, requires_grad=True)
            off = torch.randn(C, dtype=dt, requires_grad=True)
            shift = torch.randn(B, dtype=dt)
            extra = torch.randn(B, K, dtype=dt, requires_grad=True) if with_extra else None
            extra_mask = torch.rand(B, K) < 0.3 if with_extra else None
            got = losses.shared_softmax_loss(q, v, target, off, excluded, shift, extra, extra_mask, block_rows=block)
            ins = [q, v, off] + ([extra] if with_extra else [])
            g_got = torch.autograd.grad(3 * got, ins)
            ref = _composed(q, v, target, off, mask, shift, extra, extra_mask)
            g_ref = torch.autograd.grad(3 * ref, ins)
            assert torch.allclose(got, ref)
            for a, b in zip(g_got, g_ref):
                assert torch.allclose(a, b)


def test_row_shift_bounds_each_row_without_reading_the_logits():
    q2 = torch.tensor([[3.0, 4.0], [15.0, 20.0], [0.0, 0.0]])  # |q2_b| = 5, 25, 0
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0]])                  # max |v_c| = 2
    off2 = torch.tensor([-1.0, 20.0])
    # rows' logits lie in [-|q2| 2 - 1, |q2| 2 + 20]: [-11, 30], [-51, 70], [-1, 20]; the second
    # reaches above 64 and is shifted down by 70 - 64
    shift = losses._row_shift(q2, v, off2)
    assert torch.equal(shift, torch.tensor([0.0, 6.0, 0.0]))
    # a row spreading over more than 184 (base-2 units) has no safe shift: the row maxima are used
    assert losses._row_shift(q2 * 4, v, off2) is None
    assert losses._row_shift(torch.tensor([[float("inf"), 0.0]]), v, None) is None
    if native.available("softmax"):  # the compiled loop's own pass: the same bound
        assert losses._compiled_row_shift(q2, v, off2)[0]
        assert torch.allclose(losses._compiled_row_shift(q2, v, off2)[1], torch.tensor([0.0, 6.0, 0.0]))
        assert losses._compiled_row_shift(q2, v, -off2.abs()) == (True, None)  # [-51, 50] at most: no shift
        assert not losses._compiled_row_shift(q2 * 4, v, off2)[0]
        assert not losses._compiled_row_shift(torch.tensor([[float("inf"), 0.0]]), v, None)[0]


def test_shared_softmax_loss_is_exact_with_any_shift_and_with_the_row_maxima():
    """Logits at three scales: no shift needed, shifted rows, and too wide (each row's maximum)."""
    torch.manual_seed(1)
    B, C, d = 9, 11, 4
    target = torch.randperm(C)[:B]
    mask = torch.zeros(B, C, dtype=torch.bool)
    for scale, off_top, expected in ((1.0, 1.0, "zero"), (1.0, 70.0, "shifted"), (40.0, 1.0, "maxima")):
        q = (torch.randn(B, d, dtype=torch.float64) * scale).requires_grad_()
        v = torch.randn(C, d, dtype=torch.float64, requires_grad=True)
        off = torch.linspace(0.0, off_top, C, dtype=torch.float64)[torch.randperm(C)].requires_grad_()
        shift = losses._row_shift(q.detach() * losses._LOG2E, v.detach(), off.detach() * losses._LOG2E)
        kind = "maxima" if shift is None else ("zero" if not shift.any() else "shifted")
        assert kind == expected
        got = losses.shared_softmax_loss(q, v, target, off, block_rows=4)
        ref = _composed(q, v, target, off, mask, None, None, None)
        assert torch.allclose(got, ref)
        for a, b in zip(torch.autograd.grad(got, [q, v, off]), torch.autograd.grad(ref, [q, v, off])):
            assert torch.allclose(a, b)


def test_shared_softmax_loss_of_an_empty_batch_gives_no_gradient():
    v = torch.randn(4, 3, requires_grad=True)
    q = torch.zeros(0, 3, requires_grad=True)
    loss = losses.shared_softmax_loss(q, v, torch.zeros(0, dtype=torch.long))
    (loss * 0.0).backward()
    assert torch.equal(v.grad, torch.zeros(4, 3))


@pytest.mark.skipif(not native.available("softmax"), reason="C extension not built, or no MKL")
def test_compiled_block_loop_scores_the_rows_of_one_query_id_once(native_on):
    """What ``query_ids`` promises is taken at its word: rows said to share a query are scored with
    the first one's, unless a positive shift or an excluded coordinate keeps them apart. Claiming
    that every row is one query gives the composed loss of that reading, value and gradients."""
    torch.manual_seed(4)
    B, C, d = 40, 50, 8
    q = torch.nn.functional.normalize(torch.randn(B, d), dim=1) * 10
    v = torch.nn.functional.normalize(torch.randn(C, d), dim=1)
    target = torch.randint(0, C, (B,))
    shift = torch.zeros(B)
    shift[[3, 7]] = 0.5                        # apart: a positive shift
    hits = (torch.tensor([5, 9]), torch.tensor([(target[5] + 1) % C, (target[9] + 1) % C]))  # apart: hits
    mask = torch.zeros(B, C, dtype=torch.bool)
    mask[hits] = True
    alone = torch.zeros(B, dtype=torch.bool)
    alone[[3, 7, 5, 9]] = True
    read = torch.where(alone[:, None], q, q[0])  # row 0 is the first row of the shared group
    got_q, got_v = q.clone().requires_grad_(), v.clone().requires_grad_()
    got = losses.shared_softmax_loss(got_q, got_v, target, None, hits, shift, query_ids=torch.zeros(B, dtype=torch.long))
    ref_q, ref_v = read.double().requires_grad_(), v.double().requires_grad_()
    ref = _composed(ref_q, ref_v, target, None, mask, shift.double(), None, None)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got, [got_q, got_v]), torch.autograd.grad(ref, [ref_q, ref_v])):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=2e-6)


@pytest.mark.skipif(not native.built("softmax"), reason="C extension not built")
@pytest.mark.parametrize("vectorised", [True, False])
def test_compiled_exp2_pass_matches_exp2_and_sum(vectorised):
    """The C pass (AVX2, and its scalar loop), 2^(z + row offset): within 2 float32 ulps of exp2
    everywhere from -126 to 64, exactly 0 for masked (-inf) entries and for what would be
    subnormal; column sums to float rounding. 13 columns: the vector loop's tail is exercised."""
    torch.manual_seed(0)
    z = torch.empty(300, 13).uniform_(-140.0, 60.0)
    z[::7, 3] = float("-inf")
    offset = torch.empty(300).uniform_(-4.0, 4.0)  # one per row, added before the exp2
    offset[0] = 0.0
    z[0, :4] = torch.tensor([-126.0, -125.5, 0.5, 64.0])
    shifted = z + offset[:, None]
    exact = torch.exp2(shifted.double())
    exact[shifted < -126] = 0.0
    got = z.clone()
    sums = native.exp2_column_sums(got, offset, vectorised=vectorised)
    normal = shifted >= -126
    rel = (got.double() - exact).abs()[normal] / exact[normal]
    assert rel.max() < 2.5e-7
    assert torch.equal(got[~normal], torch.zeros(int((~normal).sum())))
    torch.testing.assert_close(sums.double(), exact.sum(0), rtol=1e-6, atol=0)


@pytest.mark.skipif(not native.available("softmax"), reason="C extension not built, or no MKL")
@pytest.mark.parametrize("block", [1, 5, 32, None])
@pytest.mark.parametrize("regime", ["plain", "everything", "shifted rows", "shared queries", "shared, shifted rows"])
def test_compiled_block_loop_matches_the_composed_loss(monkeypatch, native_on, block, regime):
    """The C block loop (float32, MKL products, blocks shared between threads) against the composed
    loss in float64: accidental hits and seen items excluded, a positive shift, a learnt offset,
    per-row columns with a mask, rows whose logits need a shift; blocks that do not divide B; rows
    of one query (``query_ids``) scored once, some of them kept apart by a positive shift or a hit."""
    calls, compiled = [], losses._blocks_compiled
    monkeypatch.setattr(losses, "_blocks_compiled", lambda *a: calls.append(1) or compiled(*a))
    torch.manual_seed(3)
    B, C, d, K = 70, 90, 8, 3
    shifted = regime.endswith("shifted rows")
    scale = 60.0 if shifted else 10.0  # |q| * log2(e) * max|v| > 64: a shift per row
    q = torch.nn.functional.normalize(torch.randn(B, d), dim=1) * scale
    v = torch.nn.functional.normalize(torch.randn(C, d), dim=1)
    off, target = torch.randn(C), torch.randperm(C)[:B]
    mask = torch.zeros(B, C, dtype=torch.bool)
    excluded = shift = extra = extra_mask = users = None
    if regime.startswith("shared"):
        users = torch.randint(0, 12, (B,))
        q = q[users]  # rows of one user have one query
        ids = torch.randint(0, 60, (C,))
        mask = losses.accidental_hit_mask(ids[target], ids, target)
        excluded = losses.accidental_hits(ids[target], ids, target)
        shift = torch.where(torch.rand(B) < 0.3, torch.rand(B), torch.zeros(B))
    if regime == "everything":
        ids = torch.randint(0, 30, (C,))
        seen = torch.rand(B, C) < 0.2
        seen[torch.arange(B), target] = False
        mask = losses.accidental_hit_mask(ids[target], ids, target) | seen
        excluded = losses.merge_coordinates(losses.accidental_hits(ids[target], ids, target),
                                            losses.mask_coordinates(seen), n_cols=C)
        shift = torch.rand(B)
        extra, extra_mask = torch.randn(B, K) * 3, torch.rand(B, K) < 0.3
    shift2 = losses._row_shift(q * losses._LOG2E, v, off * losses._LOG2E)
    assert (shift2 is not None and bool(shift2.any())) == shifted
    ins = [q, v, off] + ([extra] if extra is not None else [])
    got_in = [t.clone().requires_grad_() for t in ins]
    got = losses.shared_softmax_loss(got_in[0], got_in[1], target, got_in[2], excluded, shift,
                                     got_in[3] if extra is not None else None, extra_mask, block_rows=block,
                                     query_ids=users)
    assert calls, "the compiled loop was not taken"
    ref_in = [t.double().requires_grad_() for t in ins]
    ref = _composed(ref_in[0], ref_in[1], target, ref_in[2], mask, None if shift is None else shift.double(),
                    ref_in[3] if extra is not None else None, extra_mask)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got, got_in), torch.autograd.grad(ref, ref_in)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=2e-6)

