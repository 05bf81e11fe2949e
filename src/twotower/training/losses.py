"""The logit of the sampled softmax, its corrections and masks, and the fused loss, as small pure functions.

Shapes: ``B`` rows (positive pairs), ``C`` shared candidates (scored by every row), ``K`` per-row
candidates. ``target[b]`` is the column of row ``b``'s positive. Masks are boolean, ``True`` = excluded.

A step's logit is assembled in one place, ``logit_inputs``: it takes the step's ``CandidateSet``
(which the trainer's candidate-set builder, ``candidates.CandidateBuilder``, fills: ids, vectors, log
expected counts, masks) and composes the corrections, each a small function returning a
``LogitTerm``, into ``LogitInputs``. ``shared_softmax_loss`` takes those with the query and candidate
vectors; it knows nothing of where a column came from or which correction shifted it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import native

_NEG_INF = float("-inf")
_LOG2E = 1.4426950408889634  # log2(e)
_LN2 = 0.6931471805599453    # ln(2)


def log_expected_count(p: torch.Tensor, batch_size: int, n_sampled: int = 0, r: torch.Tensor | None = None,
                       bank_size: int = 0) -> torch.Tensor:
    """Log of the expected number of times each candidate appears in the shared candidate set.

    ``c(j) = log(B * p(j) + M * r(j) + Q * p(j))`` (Yi et al., "Sampling-Bias-Corrected Neural
    Modeling for Large Corpus Item Recommendations", RecSys 2019; docs/design.md), where ``p(j)`` is the
    item's share of training positives (in-batch positives and memory-bank entries are drawn from
    it), ``B`` the batch size, ``M`` items sampled from the proposal ``r`` (Yang et al., WWW 2020)
    and ``Q`` the memory-bank size (Wang et al., SIGIR 2021). With in-batch only this is
    ``log p(j) + log B``: the constant does not change the softmax.
    """
    expected = (batch_size + bank_size) * p
    if n_sampled:
        if r is None:
            raise ValueError("n_sampled > 0 needs the proposal probabilities r")
        expected = expected + n_sampled * r
    return torch.log(expected.clamp_min(1e-30))


def accidental_hit_mask(positive_ids: torch.Tensor, candidate_ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[B, C]`` True where candidate ``c`` is row ``b``'s positive item but is not its target column
    (the same item twice in a batch, or again in a memory bank): scoring it as a negative would push
    the positive away from itself."""
    hit = positive_ids[:, None] == candidate_ids[None, :]
    hit[torch.arange(len(target), device=target.device), target] = False
    return hit


def seen_item_mask(row_users: torch.Tensor, candidate_ids: torch.Tensor, target: torch.Tensor | None,
                   seen_keys: torch.Tensor, n_items: int) -> torch.Tensor:
    """``[B, C]`` True where candidate ``c`` is one of user ``u_b``'s training items (a false negative),
    except the row's own target column. ``candidate_ids`` is ``[C]`` (shared by all rows) or ``[B, C]``
    (per row; ``target`` None when no column is a target). ``seen_keys`` is the sorted tensor of
    ``user * n_items + item`` over the training data."""
    ids = candidate_ids if candidate_ids.dim() == 2 else candidate_ids[None, :]
    keys = row_users[:, None] * n_items + ids
    pos = torch.searchsorted(seen_keys, keys).clamp_max(len(seen_keys) - 1)
    seen = seen_keys[pos] == keys
    if target is not None:
        seen[torch.arange(len(target), device=target.device), target] = False
    return seen


def accidental_hits(positive_ids: torch.Tensor, candidate_ids: torch.Tensor, target: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The True entries of ``accidental_hit_mask`` as ``(rows, cols)``, rows ascending.

    Hits are rare (a few per thousand entries), so finding them by sorting the candidate ids costs
    ``O((B + C) log C)`` instead of a ``[B, C]`` comparison and a ``[B, C]`` boolean pass later.
    """
    dev = candidate_ids.device
    order = torch.argsort(candidate_ids, stable=True)
    sorted_ids = candidate_ids[order]
    lo = torch.searchsorted(sorted_ids, positive_ids)
    n = torch.searchsorted(sorted_ids, positive_ids, right=True) - lo
    rows = torch.repeat_interleave(torch.arange(len(positive_ids), device=dev), n)
    first = torch.repeat_interleave(lo - (torch.cumsum(n, 0) - n), n)
    cols = order[first + torch.arange(len(rows), device=dev)]
    keep = cols != target[rows]
    return rows[keep], cols[keep]


def no_coordinates(device) -> tuple[torch.Tensor, torch.Tensor]:
    """An empty ``(rows, cols)`` set."""
    empty = torch.zeros(0, dtype=torch.long, device=device)
    return empty, empty


def mask_coordinates(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense ``[B, C]`` mask as ``(rows, cols)``, rows ascending (``shared_softmax_loss``'s form)."""
    rows, cols = mask.nonzero(as_tuple=True)
    return rows, cols


def merge_coordinates(*parts: tuple[torch.Tensor, torch.Tensor], n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Union of several ``(rows, cols)`` sets, rows ascending, each entry once."""
    keys = torch.unique(torch.cat([r * n_cols + c for r, c in parts]))
    return keys // n_cols, keys % n_cols


# ---- the logit: candidate set, corrections, the inputs of the softmax --------------------------------
@dataclass
class CandidateSet:
    """The columns a step scores every row against, and what the logit needs to know of them. Built by
    ``candidates.CandidateBuilder.build``; turned into the softmax's inputs by ``logit_inputs``."""

    vectors: torch.Tensor            # [C, d] shared candidates' item-tower outputs
    ids: torch.Tensor                # [C] their item indices
    log_q: torch.Tensor | None       # [C] log of each shared candidate's expected count (None: logQ off)
    target: torch.Tensor             # [B] column of each row's positive
    hard_ids: torch.Tensor | None = None      # [B, K] per-row hard negatives (-1: none)
    hard_vectors: torch.Tensor | None = None  # [B, K, d]
    hard_log_weight: float = 0.0              # log w of the curriculum's weight
    n_sampled: int = 0
    n_bank: int = 0
    log_count: torch.Tensor | None = None     # [C] log of the copies each column stands for (None: one each)
    # (rows, cols) of the shared entries no row may score (accidental hits, the user's own items),
    # rows ascending, each once; None: none
    excluded: tuple[torch.Tensor, torch.Tensor] | None = None
    hard_mask: torch.Tensor | None = None     # [B, K] True where a hard column must not count


@dataclass(frozen=True)
class LogitTerm:
    """One additive correction of the logit, in three parts (None: adds nothing there)::

        column[c]      added to shared column c in every row                       [C]
        positive[b]    what row b's own positive takes instead of column[target[b]] [B] or a number
        per_row[b, k]  added to row b's per-row column k                            [B, K] or a number

    ``positive`` None: the positive takes ``column[target[b]]`` like every other column.
    """

    column: torch.Tensor | None = None
    positive: torch.Tensor | float | None = None
    per_row: torch.Tensor | float | None = None


def learned_bias(bias: torch.Tensor | None) -> LogitTerm:
    """``+ b_j``: the model's learnt item bias on each shared column (None: the model has none). The
    per-row columns carry theirs in their scores (``TwoTowerModel.score_rows``)."""
    return LogitTerm(column=bias)


def logq_correction(log_q: torch.Tensor | None, weight: float = 1.0, correct_positive: bool = True) -> LogitTerm:
    """``- w log q_j`` on each shared column: the sampling-bias correction of Yi et al.,
    "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item Recommendations" (RecSys 2019).

    Shared candidates are drawn in proportion to how often items are positives, so a popular item is
    a negative far more often than the full softmax would weigh it; subtracting the log of its
    expected count among the candidates (``log_expected_count``, or the neg/pos ratio form of
    ``frequency.NegPosRatio``) undoes that. ``w`` is ``train.logq_weight``; ``correct_positive=False``
    leaves each row's own positive uncorrected (the variant that corrects only the negatives).
    ``log_q`` None (logQ off): no correction.
    """
    if log_q is None:
        return LogitTerm()
    correction = weight * log_q
    return LogitTerm(column=-correction, positive=None if correct_positive else 0.0)


def corrected_logq(log_q: torch.Tensor | None, target: torch.Tensor, n_negatives: torch.Tensor, n_draws: float,
                   weight: float = 1.0) -> LogitTerm:
    """The logQ correction of Khrylchenko et al., "Correcting the LogQ Correction: Revisiting Sampled
    Softmax for Large-Scale Retrieval" (RecSys 2025), which accounts for the positive being in the
    candidate set with probability 1 instead of as a Monte-Carlo draw (docs/design.md, "The corrected
    logQ"). Their loss for row ``b`` (positive ``i``, score ``s``)::

        l_b = - sg(1 - P_b) * ( s_i - log sum_{j in N_b} exp(s_j - log Q'_b(j)) )
        Q'_b(j) = q(j) / (1 - q(i)),    P_b = e^{s_i} / (e^{s_i} + sum_{j in N_b} e^{s_j - log(n_b Q'_b(j))})

    with ``N_b`` the row's unmasked shared negatives, ``n_b = |N_b|`` (``n_negatives``), ``q`` the
    per-draw proposal (``q(j) = E[count of j] / n_draws``, ``log_q`` being ``log E[count]``) and
    ``sg`` a stop-gradient. With ``S = sum_{j in N_b} e^{z_j}``, the positive-free term has gradient
    ``-grad s_i + grad S / S``, and ``1 - P_b = S / (e^{s_i} + S)`` turns it into
    ``-(1 - P_b) grad s_i + grad S / (e^{s_i} + S)``: the gradient of the plain softmax cross-entropy
    over ``{i} + N_b`` with the positive uncorrected and each negative at ``z_j = s_j - log(n_b Q'_b(j))``
    (design.md). That is what this term composes; the per-row constant between the two forms changes
    no softmax::

        column[c]    = - w log E[count of j_c]                   (every negative, as logq_correction)
        positive[b]  =   w ( log n_b - log n_draws - log(1 - q(i_b)) )

    ``w`` is ``train.logq_weight`` (1: the paper's form). ``log_q`` None (logQ off): nothing.
    """
    if log_q is None:
        return LogitTerm()
    log_draws = math.log(max(float(n_draws), 1.0))
    q_pos = torch.exp(log_q[target].to(torch.float64) - log_draws).clamp_max(1.0 - 1e-6)
    own = torch.log(n_negatives.to(torch.float64).clamp_min(1.0)) - log_draws - torch.log1p(-q_pos)
    return LogitTerm(column=-weight * log_q, positive=(weight * own).to(log_q.dtype))


def column_copies(log_count: torch.Tensor | None, n_cols: int, device=None) -> torch.Tensor:
    """``[C]`` how many draws each shared column stands for: ``k`` for ``k`` merged in-batch copies
    (``merged_copies``), else 1."""
    if log_count is None:
        return torch.ones(n_cols, dtype=torch.float64, device=device)
    return log_count.to(torch.float64).exp()


def negatives_per_row(target: torch.Tensor, copies: torch.Tensor,
                      excluded: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """``[B]`` the draws each row scores as negatives: every column's copies, less the target
    column's (the positive and its merged copies) and the excluded entries' (accidental hits, the
    user's own items)::

        n_b = sum_c k_c - k_{t_b} - sum_{(b, c) excluded} k_c
    """
    n = copies.sum() - copies[target]
    if excluded is not None and len(excluded[0]):
        rows, cols = excluded
        n = n - torch.zeros_like(n).index_add_(0, rows, copies[cols])
    return n


def merged_copies(log_count: torch.Tensor | None) -> LogitTerm:
    """``+ log k_c`` on a column standing for ``k`` in-batch copies of one item
    (``candidates.distinct_positives``): ``k e^z = e^(z + log k)``, so it weighs what the ``k`` columns
    would. For a row whose positive it is, the other ``k - 1`` copies are accidental hits (excluded):
    the positive takes ``0``. None: every column is one copy."""
    return LogitTerm() if log_count is None else LogitTerm(column=log_count, positive=0.0)


def hard_negative_weight(log_weight: float) -> LogitTerm:
    """``+ log w`` on every per-row (hard) column: a hard negative of weight ``w`` counts as ``w``
    copies of itself in the softmax sum (the curriculum of ``hard_negatives.hard_schedule``). Hard
    negatives are not drawn from a known distribution: no logQ correction."""
    return LogitTerm(per_row=log_weight)


@dataclass(frozen=True)
class LogitInputs:
    """What ``shared_softmax_loss`` takes besides the query and candidate vectors (``logit_inputs``
    makes it)::

        z[b, c]      = <query_b, vectors_c> + offset[c]        shared columns, c < C
        z[b, t_b]   -= positive_shift[b]                        t_b = target[b]
        z[b, c]      = -inf at the coordinates in excluded      (rows, cols); rows ascending, each once
        z[b, C + k]  = extra[b, k], -inf where extra_mask       per-row columns
        loss         = mean_b( logsumexp_c z[b, c] - z[b, t_b] )

    None: no offset, no shift, nothing excluded, no per-row columns, no per-row mask. The target must
    not be excluded.
    """

    target: torch.Tensor
    offset: torch.Tensor | None = None
    positive_shift: torch.Tensor | None = None
    excluded: tuple[torch.Tensor, torch.Tensor] | None = None
    extra: torch.Tensor | None = None
    extra_mask: torch.Tensor | None = None


def logit_inputs(cand: CandidateSet, item_bias: torch.Tensor | None = None, hard_scores: torch.Tensor | None = None,
                 logq_weight: float = 1.0, correct_positive: bool = True, corrected: bool = False) -> LogitInputs:
    """The logit of every (row, candidate) pair of a step, less the score product: the one place where
    the corrections are composed.

    Row ``b`` is user ``u_b`` with its positive in shared column ``t_b``; shared column ``c`` holds item
    ``j_c`` (tower output ``v_c``), hard column ``k`` of row ``b`` item ``h_bk``::

        z[b, c]      = <u_b, v_c> / tau + b_{j_c} - w log q_c + log k_c          c != t_b
        z[b, t_b]    = <u_b, v_t> / tau + b_{j_t} - [correct_positive] w log q_t
        z[b, c]      = -inf   j_c is u_b's positive in another column (an accidental hit), or one of
                              u_b's training items (train.mask_user_history)
        z[b, C + k]  = <u_b, v(h_bk)> / tau + b_{h_bk} + log w_hard
                       -inf   no hard negative drawn, the row's positive, or one of u_b's training items
        loss         = mean_b( logsumexp_c z[b, c] - z[b, t_b] )   over the C + K columns

    - ``b_j``: the learnt item bias (``item_bias``, the shared columns'; None without one).
    - ``log q_c = log(B p(j) + M r(j) + Q p(j))``: the expected count of item ``j = j_c`` among the
      shared candidates (``cand.log_q``, ``log_expected_count``), with ``p`` the items' share of the
      positives, ``B`` in-batch positives, ``M`` items sampled from the proposal ``r`` (Yang et al.,
      "Mixed Negative Sampling for Learning Two-tower Neural Networks in Recommendations", WWW 2020)
      and ``Q`` memory-bank entries (Wang, Zhu, He, "Cross-Batch Negative Sampling for Training
      Two-Tower Recommenders", SIGIR 2021); the correction is Yi et al.'s ("Sampling-Bias-Corrected
      Neural Modeling for Large Corpus Item Recommendations", RecSys 2019: ``logq_correction``), or
      the tracked neg/pos ratio. ``w`` is ``logq_weight``.
    - ``corrected``: the positive is no Monte-Carlo draw (Khrylchenko et al., RecSys 2025,
      ``corrected_logq``): the positive uncorrected, each negative of row ``b`` at
      ``s - w log(n_b q(j) / (1 - q(i_b)))`` with ``n_b`` the row's negatives (``negatives_per_row``);
      ``correct_positive`` is then not read.
    - ``log k_c``: the copies a merged in-batch column stands for (``merged_copies``); the positive's
      own column counts once.
    - ``log w_hard``: the curriculum's weight of the hard negatives (``hard_negative_weight``);
      ``hard_scores`` is ``<u_b, v(h_bk)> / tau + b_{h_bk}`` (``TwoTowerModel.score_rows``), None
      without hard negatives this step.
    - The masks come with the candidate set (``cand.excluded``, ``cand.hard_mask``).

    A new correction is one more small function returning a ``LogitTerm``, listed in ``terms`` below
    (``sum_terms`` adds them up); the loss does not change.
    """
    if corrected and cand.log_q is not None:
        copies = column_copies(cand.log_count, len(cand.ids), cand.target.device)
        logq = corrected_logq(cand.log_q, cand.target, negatives_per_row(cand.target, copies, cand.excluded),
                              float(copies.sum()), logq_weight)
    else:
        logq = logq_correction(cand.log_q, logq_weight, correct_positive)
    terms = (
        learned_bias(item_bias),
        logq,
        merged_copies(cand.log_count),
        hard_negative_weight(cand.hard_log_weight),
    )
    offset, shift, extra = sum_terms(cand.target, terms, hard_scores)
    return LogitInputs(cand.target, offset, shift, cand.excluded, extra, None if extra is None else cand.hard_mask)


def sum_terms(target: torch.Tensor, terms, per_row_scores: torch.Tensor | None = None
              ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(offset, positive_shift, extra)`` of ``LogitInputs`` from ``terms`` (``LogitTerm``), in order::

        offset[c]          = sum_terms column[c]
        positive_shift[b]  = sum over terms with a positive of ( column[target[b]] - positive[b] )
        extra[b, k]        = per_row_scores[b, k] + sum_terms per_row[b, k]

    so the positive's logit, ``offset[t] - positive_shift``, carries each term's ``positive`` in place
    of its column value. None where no term adds anything (and ``extra`` None without per-row scores).
    """
    offset = shift = None
    extra = per_row_scores
    for term in terms:
        if term.column is not None:
            offset = term.column if offset is None else offset + term.column
        if term.positive is not None:
            own = term.column[target] if term.column is not None else torch.zeros(target.shape, device=target.device)
            back = own - term.positive
            shift = back if shift is None else shift + back
        if term.per_row is not None and extra is not None:
            extra = extra + term.per_row
    return offset, shift, extra


# ---- the fused loss -------------------------------------------------------------------------------
def shared_softmax_loss(query: torch.Tensor, vectors: torch.Tensor, logits: LogitInputs, *,
                        block_rows: int | None = None, query_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The softmax cross-entropy of ``logits`` (``LogitInputs``: the formula is there), with the score
    product ``<query_b, vectors_c>`` inside; gradients reach ``query``, ``vectors``, ``logits.offset``
    and ``logits.extra``.

    Same value and gradients as building the ``[B, C + K]`` logits and taking ``F.cross_entropy``
    (the tests' reference), but the ``[B, C]`` matrix never exists: rows are processed in blocks
    that stay in cache (held transposed, ``[C, b]``), and each block's gradient is multiplied into
    the gradients of ``query``, ``vectors`` and ``offset`` as soon as it is known. Per block the
    only passes over its ``[C, b]`` scores are the product that writes them and one ``exp`` with the
    sums per row; the normalisation and the one-hot target are applied to the ``[b, d]`` products
    instead::

        E = exp(z - m)                                   (m: a per-row shift, see _row_shift)
        grad_query[b]  = (E @ vectors)[b] / sum_c E[b, c] - vectors[target[b]]
        grad_vectors   = E.T @ (query / sum_c E) - sum_{b: target[b] = c} query[b]
        grad_offset    = (1 / sum_c E) @ E - count of c among the targets

    Gradients are computed in the forward pass (the loss is a scalar, so they only need scaling
    afterwards); the target must not be excluded. Where the ``softmax`` kernel is active
    (``native.active``: built, MKL found, not switched off), float32 CPU batches run the whole loop
    in C (``_blocks_compiled``): the blocks are shared between the threads, each calling
    single-threaded MKL for its products, which on the 2-core CPU runs a Gowalla step's loss ~25 %
    faster than two-threaded products one block at a time (paired whole steps: 20.8 -> 17.4 ms).
    Elsewhere the same loop runs as PyTorch operations.

    ``query_ids`` (optional) says which rows have equal queries (a user tower that is a function of
    the user id: the trainer passes the users). The compiled loop then scores such rows once where
    nothing else tells them apart (no positive shift, no excluded coordinate, no per-row columns):
    their logits, ``E`` and sums are the same, so the shared row enters ``grad_vectors`` with weight
    ``k / sum_c E`` for its ``k`` rows, and each row keeps its own target. Same loss and gradients;
    the products shrink with the rows (Gowalla, B = 2048: ~1,880 distinct users).
    """
    hit_rows = hit_cols = None
    if logits.excluded is not None and len(logits.excluded[0]):
        hit_rows, hit_cols = logits.excluded
    return _SharedSoftmax.apply(query, vectors, logits.offset, logits.extra, logits.target, hit_rows, hit_cols,
                                logits.positive_shift, logits.extra_mask, block_rows, query_ids)


# The range kept for exp2's argument: above -120 its results are normal floats (subnormals are
# slow on x86 and would be multiplied into the gradient products), below 64 a row sum of up to
# 2^60 columns stays finite.
_EXP2_LO, _EXP2_HI = -120.0, 64.0


def _row_shift(q2: torch.Tensor, v: torch.Tensor, off2: torch.Tensor | None) -> torch.Tensor | None:
    """A shift ``m_b`` for each row of base-2 logits ``z2[b, c] = <q2_b, v_c> + off2_c`` such that
    every ``z2[b, c] - m_b`` lies within ``[-120, 64]``, found without reading the logits; None when
    some row's logits may spread wider.

    By Cauchy-Schwarz ``|<q2_b, v_c>| <= |q2_b| max_c |v_c|``, so row ``b``'s logits lie in
    ``[lo_b, hi_b] = [-|q2_b| V + min(off2), |q2_b| V + max(off2)]``. ``m_b = 0`` where that range
    fits, else ``hi_b - 64``. The softmax is the same for any shift; a bound in place of the row
    maximum saves a pass over the logits and another to subtract it. L2-normalised towers at
    temperature 0.1 have ``|q2_b| V = 14.4``: no shift at all.
    """
    reach = torch.linalg.vector_norm(q2, dim=1) * torch.linalg.vector_norm(v, dim=1).amax()
    lo, hi = -reach, reach.clone()
    if off2 is not None:
        lo += off2.amin()
        hi += off2.amax()
    if not bool(torch.isfinite(hi).all()) or float((hi - lo).amax()) > _EXP2_HI - _EXP2_LO:
        return None
    fits = (hi <= _EXP2_HI) & (lo >= _EXP2_LO)
    return torch.where(fits, torch.zeros_like(hi), hi - _EXP2_HI)


def _exp2_column_sums(zt: torch.Tensor, row_offset: torch.Tensor | None = None) -> torch.Tensor:
    """``zt <- 2^(zt + row_offset[:, None])`` in place; returns the column sums. One pass in C for a
    float32 CPU block (its own exp2, within a float32 ulp or two of PyTorch's: ``native/_softmax.c``)
    where the ``softmax`` kernel is active, else PyTorch's element-wise operations."""
    if native.active("softmax") and zt.dtype == torch.float32 and zt.device.type == "cpu" and zt.is_contiguous():
        return native.exp2_column_sums(zt, None if row_offset is None else row_offset.to(zt.dtype).contiguous())
    if row_offset is not None:
        zt.add_(row_offset[:, None])
    return zt.exp2_().sum(0)


def _blocks_python(q, q2, v, off2, shift, target, positive_shift, hit_rows, hit_cols, extra, extra_mask, block,
                   want_off, query_ids):
    """The block loop in PyTorch operations: any device and dtype, and the row-maxima shift (every
    row scored, ``query_ids`` unused)."""
    B, C = q.shape[0], v.shape[0]
    dev, dtype = q.device, q.dtype
    if block is None:
        # Measured on the 2-core CPU (B = 1024 to 4096, C = B): 512-row blocks run the products at
        # 150 to 165 GFLOP/s against 110 to 125 for the whole matrix at once, and smaller blocks lose
        # to per-operation overhead. Capped at 32 MB of scores for very wide candidate sets.
        block = max(64, min(512, (1 << 23) // max(C, 1)))
    grad_q = torch.empty_like(q)
    grad_v = torch.zeros_like(v)
    hit_q = torch.empty_like(q)  # row b's one-hot part of grad_vectors, added at row target[b] at the end
    grad_off = torch.zeros(C, dtype=dtype, device=dev) if want_off else None
    grad_extra = torch.empty_like(extra) if extra is not None else None
    buf = torch.empty(C * min(block, max(B, 1)), dtype=dtype, device=dev)
    total = torch.zeros((), dtype=torch.float64, device=dev)
    # the offset goes in with the exp2 pass, unless the row maxima are wanted first
    late_off = off2 if shift is not None else None
    starts = list(range(0, B, block))
    if hit_rows is not None:
        bounds = torch.searchsorted(hit_rows, torch.tensor(starts + [B], device=hit_rows.device)).tolist()
    for i, s in enumerate(starts):
        e = min(s + block, B)
        n = e - s
        # A block's logits are held transposed, zt[c, b] = z2[s + b, c]: with [C, n] the score
        # product and the item gradient's (zt @ q) run ~10 % faster on MKL than with [n, C], and
        # the query gradient's (v^T @ zt) ~10 % slower (paired whole steps: ~3 ms of ~30 faster).
        zt = torch.mm(v, q2[s:e].T, out=buf[: C * n].view(C, n))
        if off2 is not None and late_off is None:
            zt.add_(off2[:, None])
        r = torch.arange(n, device=dev)
        t = target[s:e]
        if positive_shift is not None:
            zt[t, r] -= positive_shift[s:e].to(dtype) * _LOG2E
        z_target = zt[t, r] if late_off is None else zt[t, r] + late_off[t]
        if hit_rows is not None and bounds[i + 1] > bounds[i]:
            a, b = bounds[i], bounds[i + 1]
            zt[hit_cols[a:b], hit_rows[a:b] - s] = _NEG_INF
        x = None
        if extra is not None:
            x = extra[s:e].detach().to(dtype) * _LOG2E
            if extra_mask is not None:
                x.masked_fill_(extra_mask[s:e], _NEG_INF)
        if shift is None:
            m = zt.amax(0)
            if x is not None:
                m = torch.maximum(m, x.amax(1))
            zt.sub_(m)
        else:
            m = shift[s:e]
            if x is not None:  # per-row columns are few: their own maxima, if higher
                m = torch.maximum(m, x.amax(1))
            if bool(m.any()):
                zt.sub_(m)
        denom = _exp2_column_sums(zt, late_off)
        if x is not None:
            x = x.sub_(m[:, None]).exp2_()
            denom += x.sum(1)
        # loss_b = ln(sum_c e^{z_c}) - z_t = (log2(denom) + m - z2_t) * ln 2
        total += (denom.log2() + m - z_target).sum() * _LN2
        inv = denom.reciprocal()
        # The one-hot target enters as (E - denom * onehot) / denom rather than E / denom - onehot:
        # the same value, and exactly 0 where the target is a row's only candidate.
        grad_q[s:e] = torch.mm(v.T, zt).T
        grad_q[s:e].sub_(v[t] * denom[:, None]).mul_(inv[:, None])
        w = q[s:e] * inv[:, None]
        grad_v.addmm_(zt, w)
        torch.mul(w, denom[:, None], out=hit_q[s:e])
        if grad_off is not None:
            grad_off.addmv_(zt, inv).index_add_(0, t, inv.mul_(denom), alpha=-1.0)
        if x is not None:
            grad_extra[s:e] = x.div_(denom[:, None])
    grad_v.index_add_(0, target, hit_q, alpha=-1.0)
    return total, grad_q, grad_v, grad_off, grad_extra


def _blocks_compiled(q, q2, v, off2, shift, target, positive_shift, hit_rows, hit_cols, extra, extra_mask, block,
                     want_off, query_ids):
    """The same block loop in C (``native.softmax_blocks``), for float32 on the CPU with a known shift:
    the blocks shared between the threads, each running its products as single-threaded MKL calls."""
    C = v.shape[0]
    if block is None:
        # Measured on the 2-core CPU (Gowalla, B = 2048, C ~ 1,900, d = 64): ~100-row blocks,
        # about 0.75 MB of scores each, stay in a core's cache; at least 16 rows for wide candidate sets.
        block = max(16, min(512, (3 << 16) // max(C, 1) // 16 * 16))
    m, xe, xsum = shift, None, None  # shift: None where all rows take 0
    if extra is not None:  # per-row columns are few: their own maxima, if higher, and their sums
        x = extra.detach().to(q.dtype) * _LOG2E
        if extra_mask is not None:
            x.masked_fill_(extra_mask, _NEG_INF)
        m = x.amax(1).clamp_min_(0.0) if m is None else torch.maximum(m, x.amax(1))
        xe = x.sub_(m[:, None]).exp2_()
        xsum = xe.sum(1)

    def flat(t, dtype=None):
        return None if t is None else t.to(dtype or t.dtype).contiguous()

    total, grad_q, grad_v, grad_off, denom = native.softmax_blocks(
        v.contiguous(), q2.contiguous(), q.contiguous(), target.contiguous(), int(block), offset2=flat(off2),
        shift=flat(m), positive_shift2=None if positive_shift is None else flat(positive_shift.to(q.dtype) * _LOG2E),
        hit_rows=flat(hit_rows), hit_cols=flat(hit_cols), extra_sum=flat(xsum), query_ids=flat(query_ids, torch.long),
        want_offset=want_off)
    # the sum over rows of loss_b = ln(sum_c e^{z_c}) - z_t = (log2(denom) + m - z2_t) * ln 2
    total = torch.tensor(_LN2 * total, dtype=torch.float64)
    grad_extra = None if xe is None else xe.div_(denom[:, None])
    return total, grad_q, grad_v, grad_off, grad_extra


def _compiled_loop(q: torch.Tensor, v: torch.Tensor) -> bool:
    return (native.active("softmax") and q.shape[0] > 0 and q.device.type == "cpu" and q.dtype == torch.float32
            and v.dtype == torch.float32)


def _compiled_row_shift(q2: torch.Tensor, v: torch.Tensor, off2: torch.Tensor | None) -> tuple[bool, torch.Tensor | None]:
    """``_row_shift`` in one C pass: ``(found, shift)``, the shift None where every row takes 0."""
    return native.softmax_row_shift(q2.contiguous(), v.contiguous(), None if off2 is None else off2.contiguous(),
                                    _EXP2_LO, _EXP2_HI)


class _SharedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, vectors, offset, extra, target, hit_rows, hit_cols, positive_shift, extra_mask, block,
                query_ids):
        q, v = query.detach(), vectors.detach()
        B = q.shape[0]
        # Logits are formed in base-2 units, z2 = z * log2(e), so that the softmax uses exp2: the
        # same probabilities, and on the 2-core CPU PyTorch's exp2 runs about twice as fast as its
        # exp (2048 x 2048: 1.6 ms against 3.0). The loss is converted back to natural log below.
        q2 = q * _LOG2E
        off2 = offset.detach().to(q.dtype) * _LOG2E if offset is not None else None
        want_off = offset is not None and ctx.needs_input_grad[2]
        if _compiled_loop(q, v):
            v = v.contiguous()
            found, shift = _compiled_row_shift(q2, v, None if off2 is None else off2.contiguous())
            # no safe shift: the PyTorch loop, each block taking its row maxima (shift None)
            loop, shift = (_blocks_compiled, shift) if found else (_blocks_python, None)
        else:
            loop, shift = _blocks_python, (_row_shift(q2, v, off2) if B else None)
        total, grad_q, grad_v, grad_off, grad_extra = loop(
            q, q2, v, off2, shift, target, positive_shift, hit_rows, hit_cols, extra, extra_mask, block, want_off,
            query_ids)
        ctx.save_for_backward(grad_q, grad_v, grad_off, grad_extra)
        ctx.rows = B
        return (total / B).to(q.dtype) if B else torch.full((), float("nan"), dtype=q.dtype, device=q.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        grad_q, grad_v, grad_off, grad_extra = ctx.saved_tensors
        # An empty batch (a rank with no rows of a tiny last batch) contributes nothing.
        scale = grad / ctx.rows if ctx.rows else torch.zeros_like(grad)
        return (grad_q * scale, grad_v * scale, None if grad_off is None else grad_off * scale,
                None if grad_extra is None else grad_extra * scale, None, None, None, None, None, None, None)
