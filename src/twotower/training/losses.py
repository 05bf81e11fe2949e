"""Sampled-softmax loss, its sampling-bias correction and its masks, as small pure functions.

Shapes: ``B`` rows (positive pairs) and ``C`` candidates. ``scores[b, c] = s(u_b, j_c)``;
``target[b]`` is the column of row ``b``'s positive. Masks are boolean, ``True`` = excluded.
None of these functions knows where candidates came from: the trainer's candidate-set builder
assembles ids, log expected counts and masks; these functions only do the arithmetic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_NEG_INF = float("-inf")


def log_expected_count(p: torch.Tensor, batch_size: int, n_sampled: int = 0, r: torch.Tensor | None = None,
                       bank_size: int = 0) -> torch.Tensor:
    """Log of the expected number of times each candidate appears in the shared candidate set.

    ``c(j) = log(B * p(j) + M * r(j) + Q * p(j))`` (Yi et al., "Sampling-Bias-Corrected Neural
    Modeling for Large Corpus Item Recommendations", RecSys 2019; DESIGN.md), where ``p(j)`` is the
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


def sampled_softmax_loss(scores: torch.Tensor, target: torch.Tensor, correction: torch.Tensor | None = None,
                         mask: torch.Tensor | None = None, positive_correction: torch.Tensor | None = None) -> torch.Tensor:
    """Sampled softmax cross-entropy, averaged over rows:

        z[b, c] = scores[b, c] - correction[c]         (logQ: correction = weight * log E[count], else 0)
        z[b, target[b]] = scores[b, target[b]] - positive_correction[b]   (default: the same correction)
        z[b, c] = -inf where mask[b, c]                (accidental hits, false negatives)
        loss = mean_b( logsumexp_c z[b, c] - z[b, target[b]] )

    ``positive_correction = zeros`` gives the variant that corrects only the negatives. The target
    itself must not be masked. Forward and backward are fused by hand (the gradient is
    ``softmax(z) - onehot(target)``): on a CPU the ``[B, C]`` element-wise passes, not the matrix
    products, dominate a step, and this does about half as many as the composed operators.
    """
    return _SampledSoftmax.apply(scores, target, correction, mask, positive_correction)


class _SampledSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, target, correction, mask, positive_correction):
        rows = torch.arange(scores.shape[0], device=scores.device)
        z = scores.detach().clone() if correction is None else scores.detach() - correction.to(scores.dtype)
        if positive_correction is not None:
            shift = positive_correction.to(scores.dtype) - (correction[target].to(scores.dtype) if correction is not None else 0.0)
            z[rows, target] -= shift
        if mask is not None:
            z.masked_fill_(mask, _NEG_INF)
        lse = torch.logsumexp(z, dim=1)
        loss = (lse - z[rows, target]).mean()
        ctx.save_for_backward(z, lse, target)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        z, lse, target = ctx.saved_tensors
        p = z.sub_(lse[:, None]).exp_()  # softmax, in the buffer the forward pass left behind
        rows = torch.arange(p.shape[0], device=p.device)
        p[rows, target] -= 1.0
        p.mul_(grad / p.shape[0])
        return p, None, None, None, None
