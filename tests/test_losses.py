"""Every loss term, correction and mask against tiny hand-computed cases."""
import math

import pytest
import torch
import torch.nn.functional as F

from twotower import native
from twotower.training import losses
from twotower.training.losses import CandidateSet, LogitInputs


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


def reference_loss(query, vectors, logits: LogitInputs, mask=None):
    """The test reference: the ``[B, C + K]`` logits of ``LogitInputs`` built explicitly, excluded
    entries -inf, and ``F.cross_entropy``, in plain autograd. ``mask``: the excluded entries as a dense
    ``[B, C]`` mask, in place of ``logits.excluded``'s coordinates."""
    z = query @ vectors.T
    if logits.offset is not None:
        z = z + logits.offset
    if logits.positive_shift is not None:
        z = z - F.one_hot(logits.target, z.shape[1]).to(z.dtype) * logits.positive_shift[:, None].to(z.dtype)
    if mask is None and logits.excluded is not None:
        mask = torch.zeros(z.shape, dtype=torch.bool)
        mask[logits.excluded] = True
    if mask is not None:
        z = z.masked_fill(mask, float("-inf"))
    if logits.extra is not None:
        x = logits.extra.to(z.dtype)
        if logits.extra_mask is not None:
            x = x.masked_fill(logits.extra_mask, float("-inf"))
        z = torch.cat([z, x], 1)
    return F.cross_entropy(z, logits.target)


def _scores_as_loss_inputs(scores):
    """Queries and candidate vectors whose products are ``scores``: the rows of ``scores`` against
    the identity, so a hand-written ``[B, C]`` score matrix goes through the fused loss."""
    return scores, torch.eye(scores.shape[1], dtype=scores.dtype)


def _coordinates(mask):
    return losses.mask_coordinates(mask)


def test_logq_correction_positive_and_negatives_by_hand():
    scores = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    log_q = torch.tensor([0.5, -1.0])
    target = torch.tensor([0, 1])
    q, v = _scores_as_loss_inputs(scores)
    cand = CandidateSet(v, torch.tensor([7, 8]), log_q, target)
    both = losses.shared_softmax_loss(q, v, losses.logit_inputs(cand))
    assert math.isclose(float(both), _ce([([0.5, 3.0], 0), ([2.5, 5.0], 1)]), rel_tol=1e-6)
    neg_only = losses.shared_softmax_loss(q, v, losses.logit_inputs(cand, correct_positive=False))
    assert math.isclose(float(neg_only), _ce([([1.0, 3.0], 0), ([2.5, 4.0], 1)]), rel_tol=1e-6)
    half = losses.shared_softmax_loss(q, v, losses.logit_inputs(cand, logq_weight=0.5))
    assert math.isclose(float(half), _ce([([0.75, 2.5], 0), ([2.75, 4.5], 1)]), rel_tol=1e-6)


def test_fused_gradient_matches_composed_autograd():
    torch.manual_seed(0)
    scores = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, 2, 8, 4, 5])
    corr = torch.randn(9, dtype=torch.float64)
    mask = torch.rand(6, 9) < 0.3
    mask[torch.arange(6), target] = False
    eye = torch.eye(9, dtype=torch.float64)
    for correct_positive in (True, False):
        cand = CandidateSet(eye, torch.arange(9), corr, target, excluded=_coordinates(mask))
        got = losses.shared_softmax_loss(scores, eye, losses.logit_inputs(cand, correct_positive=correct_positive))
        (g_got,) = torch.autograd.grad(got, scores)
        z = scores - corr
        if not correct_positive:
            z = z + F.one_hot(target, 9) * corr[target][:, None]
        ref = F.cross_entropy(z.masked_fill(mask, float("-inf")), target)
        (g_ref,) = torch.autograd.grad(ref, scores)
        assert torch.allclose(got, ref) and torch.allclose(g_got, g_ref)
        assert (g_got[mask] == 0).all()  # masked candidates get no gradient


# ---- the logit: each correction, and their composition ------------------------------------------
def test_each_correction_term_by_hand():
    log_q = torch.tensor([1.0, 2.0])
    t = losses.logq_correction(log_q, weight=0.5)
    assert t.column.tolist() == [-0.5, -1.0] and t.positive is None and t.per_row is None
    assert losses.logq_correction(log_q, correct_positive=False).positive == 0.0  # the positive stays uncorrected
    assert losses.logq_correction(None) == losses.LogitTerm()                     # logQ off
    t = losses.merged_copies(torch.tensor([math.log(3.0), 0.0]))
    assert t.column.tolist() == pytest.approx([math.log(3.0), 0.0]) and t.positive == 0.0
    assert losses.merged_copies(None) == losses.LogitTerm()
    assert losses.hard_negative_weight(math.log(0.25)) == losses.LogitTerm(per_row=math.log(0.25))
    bias = torch.tensor([0.1, 0.2])
    assert losses.learned_bias(bias).column is bias and losses.learned_bias(None) == losses.LogitTerm()


def test_sum_terms_by_hand():
    """Columns add up; each term with a positive shifts the target by column[t] - positive; a term
    may touch the positive alone; per-row parts add to the per-row scores (none without them)."""
    target = torch.tensor([1, 0])
    terms = [losses.LogitTerm(column=torch.tensor([1.0, 2.0, 3.0])),                      # on every column
             losses.LogitTerm(column=torch.tensor([0.5, 0.25, 0.0]), positive=0.0),         # not on the positive
             losses.LogitTerm(positive=torch.tensor([0.125, -1.0]), per_row=0.5),           # the positive alone
             losses.LogitTerm(per_row=torch.tensor([[1.0], [2.0]]))]
    offset, shift, extra = losses.sum_terms(target, terms, torch.tensor([[10.0], [20.0]]))
    assert offset.tolist() == [1.5, 2.25, 3.0]
    # row 0 (target column 1): (0.25 - 0) + (0 - 0.125); row 1 (column 0): (0.5 - 0) + (0 - -1)
    assert shift.tolist() == [0.125, 1.5]
    # the positives' logits: offset[t] - shift = 2 + 0.125 and 1 - 1 (the first term, and the third's positive)
    assert (offset[target] - shift).tolist() == [2.125, 0.0]
    assert extra.flatten().tolist() == [11.5, 22.5]
    assert losses.sum_terms(target, terms)[2] is None
    assert losses.sum_terms(target, []) == (None, None, None)


def test_logit_inputs_compose_every_correction_by_hand():
    """Two rows, three shared columns (column 0 two merged copies of item 10), two hard columns:
    bias, half-weight logQ on the negatives only, the copies' log 2, the hard weight 1/2, an
    excluded entry and a masked hard column; the offsets, the positive shift and the loss by hand."""
    ln2 = math.log(2.0)
    target = torch.tensor([0, 1])
    cand = CandidateSet(torch.eye(3), torch.tensor([10, 11, 12]), torch.tensor([1.0, 2.0, 3.0]), target,
                        hard_ids=torch.tensor([[20, 21], [22, 23]]), hard_log_weight=math.log(0.5),
                        log_count=torch.tensor([ln2, 0.0, 0.0]),
                        excluded=(torch.tensor([1]), torch.tensor([2])),
                        hard_mask=torch.tensor([[False, True], [False, False]]))
    bias = torch.tensor([0.1, 0.2, 0.3])
    hard_scores = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    got = losses.logit_inputs(cand, item_bias=bias, hard_scores=hard_scores, logq_weight=0.5, correct_positive=False)
    # offset = b - w log q + log k; the positive takes back -w log q_t and log k_t: only its bias stays
    assert got.offset.tolist() == pytest.approx([0.1 - 0.5 + ln2, 0.2 - 1.0, 0.3 - 1.5])
    assert got.positive_shift.tolist() == pytest.approx([-0.5 + ln2, -1.0])
    assert got.extra.flatten().tolist() == pytest.approx([1.0 - ln2, 2.0 - ln2, 3.0 - ln2, 4.0 - ln2])
    assert got.extra_mask is cand.hard_mask and got.excluded is cand.excluded and got.target is target

    scores = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.5, -1.0]])
    q, v = _scores_as_loss_inputs(scores)
    loss = losses.shared_softmax_loss(q, v, got)
    row0 = [1.0 + 0.1, 0.0 + 0.2 - 1.0, 2.0 + 0.3 - 1.5, 1.0 - ln2]          # hard column 2 masked
    row1 = [0.5 + 0.1 - 0.5 + ln2, 1.5 + 0.2, 3.0 - ln2, 4.0 - ln2]          # shared column 2 excluded
    assert math.isclose(float(loss), _ce([(row0, 0), (row1, 1)]), rel_tol=1e-6)
    assert math.isclose(float(reference_loss(q, v, got)), float(loss), rel_tol=1e-6)


def test_logit_inputs_of_a_bare_candidate_set_add_nothing():
    """In-batch, no bias, logQ off: nothing to add, and no positive shift (rows with one query can
    then be scored once, ``query_ids``); the default correction keeps the positive corrected too."""
    cand = CandidateSet(torch.eye(2), torch.tensor([3, 4]), None, torch.tensor([0, 1]))
    assert losses.logit_inputs(cand) == LogitInputs(cand.target)
    cand.log_q = torch.tensor([0.5, 1.0])
    got = losses.logit_inputs(cand)
    assert got.positive_shift is None and got.offset.tolist() == [-0.5, -1.0]
    assert got.extra is None and got.extra_mask is None  # no hard columns this step


def test_gradients_of_the_composed_logit_reach_the_bias_and_the_hard_scores():
    torch.manual_seed(2)
    B, C, K, d = 5, 7, 2, 3
    dt = torch.float64
    target = torch.randperm(C)[:B]
    seen = torch.rand(B, C) < 0.3
    seen[torch.arange(B), target] = False
    cand = CandidateSet(torch.randn(C, d, dtype=dt), torch.arange(C), torch.rand(C, dtype=dt), target,
                        hard_log_weight=math.log(0.3), log_count=torch.rand(C, dtype=dt), excluded=_coordinates(seen),
                        hard_mask=torch.rand(B, K) < 0.4)
    q = torch.randn(B, d, dtype=dt, requires_grad=True)
    bias = torch.randn(C, dtype=dt, requires_grad=True)
    hard = torch.randn(B, K, dtype=dt, requires_grad=True)
    for correct_positive in (True, False):
        logits = losses.logit_inputs(cand, item_bias=bias, hard_scores=hard, logq_weight=0.7,
                                     correct_positive=correct_positive)
        got = losses.shared_softmax_loss(q, cand.vectors, logits)
        ref = reference_loss(q, cand.vectors, logits, seen)
        assert torch.allclose(got, ref)
        for a, b in zip(torch.autograd.grad(got, [q, bias, hard]), torch.autograd.grad(ref, [q, bias, hard])):
            assert torch.allclose(a, b)


# ---- the corrected logQ (Khrylchenko et al., RecSys 2025) -------------------------------------------
def paper_corrected_loss(scores, log_q, target, n_draws, mask):
    """The loss of "Correcting the LogQ Correction" written as the paper's argument gives it, in
    plain float64 autograd: for row ``b`` with positive ``i``, negatives ``N_b`` (the unmasked
    non-target columns, ``n_b`` of them), ``q(j) = E[count of j] / n_draws`` and
    ``Q'(j) = q(j) / (1 - q(i))``::

        P_b = e^{s_i} / (e^{s_i} + sum_{j in N_b} e^{s_j - log(n_b Q'(j))})
        l_b = - sg(1 - P_b) ( s_i - log sum_{j in N_b} e^{s_j - log Q'(j)} )

    the positive absent from the sum it is compared with, the weight a constant."""
    B, C = scores.shape
    rows = []
    for b in range(B):
        t = int(target[b])
        neg = [c for c in range(C) if c != t and not mask[b, c]]
        q = torch.exp(log_q.double()) / n_draws
        log_q_prime = torch.log(q[neg]) - torch.log1p(-q[t])
        z = scores[b, neg] - log_q_prime
        n_b = len(neg)
        p = torch.softmax(torch.cat([scores[b, t:t + 1], z - math.log(n_b)]), 0)[0]
        rows.append((1 - p).detach() * -(scores[b, t] - torch.logsumexp(z, 0)))
    return torch.stack(rows).mean()


def test_corrected_logq_term_by_hand():
    """Three columns, two rows; row 1 excludes column 0. E[count] = (2, 1, 1) of 4 draws (column 0
    two merged copies): q = (1/2, 1/4, 1/4). Row 0 (positive column 0): negatives 1, 2, n = 2;
    row 1 (positive column 1): negative 2 only (column 0 excluded, both its copies), n = 1."""
    log_q = torch.log(torch.tensor([2.0, 1.0, 1.0]))
    target = torch.tensor([0, 1])
    copies = losses.column_copies(torch.log(torch.tensor([2.0, 1.0, 1.0])), 3)
    n = losses.negatives_per_row(target, copies, (torch.tensor([1]), torch.tensor([0])))
    assert n.tolist() == [2.0, 1.0]
    t = losses.corrected_logq(log_q, target, n, n_draws=4.0)
    assert t.column.tolist() == pytest.approx([-math.log(2.0), 0.0, 0.0])
    # positive[b] = log n_b - log n_draws - log(1 - q(i_b))
    assert t.positive.tolist() == pytest.approx([math.log(2 / 4 / (1 - 0.5)), math.log(1 / 4 / (1 - 0.25))], abs=1e-6)
    # row 0's logits (scores s): positive s_0 + 0, negatives s_j - log E c_j: relative to the positive,
    # negative j sits at s_j - log(n_0 q(j) / (1 - q(0))) = s_j - log(2 * 0.25 / 0.5) = s_j
    assert losses.corrected_logq(None, target, n, 4.0) == losses.LogitTerm()


@pytest.mark.parametrize("merged", [False, True])
def test_corrected_logq_has_the_gradients_of_the_papers_weighted_loss(merged):
    """The fused loss with ``corrected=True`` against the paper's loss written out (weight
    sg(1 - P), positive out of the sum): the same gradients with respect to every score, excluded
    entries and merged copies included. The values differ by design: the composed form is the
    cross-entropy whose gradient that loss has."""
    torch.manual_seed(5)
    B, C = 6, 9
    dt = torch.float64
    target = torch.randperm(C)[:B]
    log_count = None
    if merged:
        log_count = torch.zeros(C, dtype=dt)
        log_count[target[:2]] = math.log(3.0)       # two targets stand for three draws each
    seen = torch.rand(B, C) < 0.25
    seen[torch.arange(B), target] = False
    log_q = torch.log(torch.rand(C, dtype=dt) * 2 + 0.2)
    cand = CandidateSet(torch.eye(C, dtype=dt), torch.arange(C), log_q, target, log_count=log_count,
                        excluded=_coordinates(seen))
    scores = torch.randn(B, C, dtype=dt, requires_grad=True)
    got = losses.shared_softmax_loss(scores, torch.eye(C, dtype=dt), losses.logit_inputs(cand, corrected=True))
    copies = losses.column_copies(log_count, C)
    # the paper's loss over draws: a merged column is k draws of one item, so its copies beyond the
    # target's own are accidental hits (masked) for the row whose positive it is, and k copies of a
    # negative for the others
    expand = torch.repeat_interleave(torch.arange(C), copies.round().long())
    draws = scores[:, expand]
    d_target = torch.tensor([int((expand == t).nonzero()[0]) for t in target])
    d_mask = seen[:, expand] | ((expand[None, :] == target[:, None]) & (torch.arange(len(expand))[None, :] != d_target[:, None]))
    ref = paper_corrected_loss(draws, log_q[expand], d_target, float(copies.sum()), d_mask)
    (g_got,) = torch.autograd.grad(got, scores)
    (g_ref,) = torch.autograd.grad(ref, scores)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-9, atol=1e-12)
    # the standard forms do not have these gradients
    for cp in (True, False):
        std = losses.shared_softmax_loss(scores, torch.eye(C, dtype=dt), losses.logit_inputs(cand, correct_positive=cp))
        assert not torch.allclose(torch.autograd.grad(std, scores)[0], g_ref)


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


def test_softmax_loss_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    target = torch.tensor([0, 2])
    mask = torch.tensor([[False, False, True], [True, False, False]])
    q, v = _scores_as_loss_inputs(logits)
    got = losses.shared_softmax_loss(q, v, LogitInputs(target, excluded=_coordinates(mask)))
    row0 = -(2.0 - math.log(math.exp(2.0) + math.exp(1.0)))
    row1 = -(3.0 - math.log(math.exp(1.0) + math.exp(3.0)))
    assert math.isclose(float(got), (row0 + row1) / 2, rel_tol=1e-6)
    unmasked = losses.shared_softmax_loss(q, v, LogitInputs(target))
    row0u = -(2.0 - math.log(math.exp(2.0) + math.exp(1.0) + 1.0))
    row1u = -(3.0 - math.log(1.0 + math.exp(1.0) + math.exp(3.0)))
    assert math.isclose(float(unmasked), (row0u + row1u) / 2, rel_tol=1e-6)


def test_logq_shifts_gradient_toward_popular_negatives():
    # A popular negative (high p) gets its logit lowered by log(B p): the corrected loss is smaller,
    # i.e. the model is penalised less for scoring popular items high.
    q, v = _scores_as_loss_inputs(torch.tensor([[1.0, 1.0]]))
    log_q = losses.log_expected_count(torch.tensor([0.1, 0.9]), batch_size=1)
    plain = losses.shared_softmax_loss(q, v, LogitInputs(torch.tensor([0])))
    cand = CandidateSet(v, torch.tensor([0, 1]), log_q, torch.tensor([0]))
    corrected = losses.shared_softmax_loss(q, v, losses.logit_inputs(cand, correct_positive=False))
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
            logits = LogitInputs(target, off, shift, excluded, extra, extra_mask)
            got = losses.shared_softmax_loss(q, v, logits, block_rows=block)
            ins = [q, v, off] + ([extra] if with_extra else [])
            g_got = torch.autograd.grad(3 * got, ins)
            ref = reference_loss(q, v, logits, mask)
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
        got = losses.shared_softmax_loss(q, v, LogitInputs(target, off), block_rows=4)
        ref = reference_loss(q, v, LogitInputs(target, off), mask)
        assert torch.allclose(got, ref)
        for a, b in zip(torch.autograd.grad(got, [q, v, off]), torch.autograd.grad(ref, [q, v, off])):
            assert torch.allclose(a, b)


def test_shared_softmax_loss_of_an_empty_batch_gives_no_gradient():
    v = torch.randn(4, 3, requires_grad=True)
    q = torch.zeros(0, 3, requires_grad=True)
    loss = losses.shared_softmax_loss(q, v, LogitInputs(torch.zeros(0, dtype=torch.long)))
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
    got = losses.shared_softmax_loss(got_q, got_v, LogitInputs(target, None, shift, hits),
                                     query_ids=torch.zeros(B, dtype=torch.long))
    ref_q, ref_v = read.double().requires_grad_(), v.double().requires_grad_()
    ref = reference_loss(ref_q, ref_v, LogitInputs(target, None, shift.double()), mask)
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
    got_logits = LogitInputs(target, got_in[2], shift, excluded, got_in[3] if extra is not None else None, extra_mask)
    got = losses.shared_softmax_loss(got_in[0], got_in[1], got_logits, block_rows=block, query_ids=users)
    assert calls, "the compiled loop was not taken"
    ref_in = [t.double().requires_grad_() for t in ins]
    ref_logits = LogitInputs(target, ref_in[2], None if shift is None else shift.double(), None,
                             ref_in[3] if extra is not None else None, extra_mask)
    ref = reference_loss(ref_in[0], ref_in[1], ref_logits, mask)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got, got_in), torch.autograd.grad(ref, ref_in)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=2e-6)

