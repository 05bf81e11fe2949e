"""History encoders: a user's past items, oldest first, as one vector of the tower's width.

Each encoder reads the history items' embeddings ``e [B, L, d]`` and which of the ``L`` places are
real (``mask [B, L]``), and returns ``[B, d]``; a row without history gives zero, so that a user
without history is placed by its other inputs alone. Histories may be padded on either side (the
trainer's leakage-free pair histories are right-aligned, a new user's left-aligned): every encoder
reads an item's place from the mask, as its *age*, the number of real items after it (0 for the
most recent), never from its column.

What the encoders see is what ``Dataset.pair_history`` (training) or the user's known items
(evaluation, serving) put in the history; none of them can reach a pair's target or anything later,
so each is as leakage-free as the history it is given.

Plain tensor operations only (no fused attention kernels, no nested tensors): the towers can be
exported as they are.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig


def history_ages(mask: torch.Tensor) -> torch.Tensor:
    """Age of each place of a history: how many real items come after it (0 for the most recent;
    padding places get the age of the next real item, and are masked anyway). ``[B, L]`` int64."""
    m = mask.to(torch.int64)
    return m.sum(1, keepdim=True) - m.cumsum(1)


def most_recent(mask: torch.Tensor) -> torch.Tensor:
    """One-hot ``[B, L]`` of each row's most recent real item (the last real place: histories are
    oldest first); all zero for a row without history."""
    L = mask.shape[1]
    place = torch.arange(1, L + 1, device=mask.device).expand_as(mask)
    last = (place * mask.to(place.dtype)).argmax(1, keepdim=True)
    # a comparison, not an in-place scatter of a bool (which TorchScript cannot trace)
    return (torch.arange(L, device=mask.device).unsqueeze(0) == last) & mask


class MeanHistory(nn.Module):
    """``h = (1 / n) sum_k e_k`` over the ``n`` real items (the pooling of YouTube's candidate
    generator, Covington et al., RecSys 2016); zero for an empty history."""

    def forward(self, e: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(e.dtype).unsqueeze(-1)
        return (e * m).sum(1) / m.sum(1).clamp_min(1.0)


def recency_weights(ages: torch.Tensor, mask: torch.Tensor, half_life: torch.Tensor) -> torch.Tensor:
    """``w_k = 2^(-a_k / h)`` for the real items (``a_k``: age, ``h``: half-life), normalised to sum
    to one per row: exponential time decay over positions, as in time-decayed pooling of session
    items; zero for padding and for a row without history."""
    w = torch.exp2(-ages.to(half_life.dtype) / half_life) * mask.to(half_life.dtype)
    return w / w.sum(1, keepdim=True).clamp_min(1e-30)


class RecencyHistory(nn.Module):
    """``h = sum_k w_k e_k`` with ``w = recency_weights``: the most recent items count most, an item
    ``h`` places older half as much. The half-life is fixed (``model.history_half_life``) or
    learned (``model.learn_half_life``, as ``log h``)."""

    def __init__(self, half_life: float, learn: bool):
        super().__init__()
        log_h = torch.tensor(math.log(half_life))
        if learn:
            self.log_half_life = nn.Parameter(log_h)
        else:
            self.register_buffer("log_half_life", log_h, persistent=False)  # the config's value

    @property
    def half_life(self) -> float:
        return float(self.log_half_life.detach().exp())

    def forward(self, e: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = recency_weights(history_ages(mask), mask, self.log_half_life.exp().to(e.dtype))
        return (w.unsqueeze(-1) * e).sum(1)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
                     sqrt_dh: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention, ``softmax(q k^T / sqrt(d_h) + M) v`` with ``M = -1e9`` on the
    keys that are padding (Vaswani et al., NeurIPS 2017). ``q``: ``[B, H, Q, d_h]``, ``k, v``:
    ``[B, H, L, d_h]``, ``key_mask``: ``[B, L]``, True for real items. A finite mask keeps a row
    without any real key finite (its output is discarded by the caller). ``sqrt_dh``: ``sqrt(d_h)``
    given as a number (a traced export reads no shape as a float; default: from ``q``'s shape)."""
    s = q @ k.transpose(-1, -2) / (math.sqrt(q.shape[-1]) if sqrt_dh is None else sqrt_dh)
    s = s.masked_fill(~key_mask[:, None, None, :], -1e9)
    return torch.softmax(s, dim=-1) @ v


class _Block(nn.Module):
    """One pre-norm transformer layer: ``x + Attn(LN(x))``, then ``x + FFN(LN(x))`` (FFN: two
    linear maps with a ReLU, as SASRec's point-wise feed-forward), dropout on both branches."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.sqrt_dh = math.sqrt(dim // heads)  # a number, not read from a shape (TorchScript traces it as a constant)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.drop = nn.Dropout(dropout) if dropout else None

    def _dropped(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.drop is None else self.drop(x)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        return x.view(B, L, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, L, d]`` updated at every place, or, with ``queries [B, Q, d]`` (places of ``x``
        picked out), only at those: the last layer needs the output at one place, and computing
        only that one costs ``1 / L`` of the attention and of the feed-forward."""
        h = self.norm1(x)
        k, v = self.k(h), self.v(h)
        x_q = x if queries is None else queries
        q = self.q(h if queries is None else self.norm1(queries))
        B, Q, d = x_q.shape
        a = masked_attention(self._heads(q), self._heads(k), self._heads(v), mask, self.sqrt_dh).transpose(1, 2).reshape(B, Q, d)
        x_q = x_q + self._dropped(self.out(a))
        return x_q + self._dropped(self.ffn(self.norm2(x_q)))


class AttentionHistory(nn.Module):
    """A small transformer over the last ``L`` history items, SASRec-style (Kang and McAuley, ICDM
    2018): ``x_k = e_k + P[a_k]`` (a learned embedding per age, so the most recent item always has
    the same position whatever the padding), ``layers`` pre-norm blocks of ``heads``-head
    self-attention over the real items (bidirectional: the history is all in the past of what is
    predicted), and the user summary is the output at the most recent item (the last layer computes
    only that place). Zero for an empty history.
    """

    def __init__(self, dim: int, length: int, layers: int, heads: int, dropout: float, init_std: float):
        super().__init__()
        self.positions = nn.Parameter(torch.randn(length, dim) * init_std)
        self.blocks = nn.ModuleList([_Block(dim, heads, dropout) for _ in range(layers)])

    def forward(self, e: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ages = history_ages(mask).clamp_max(self.positions.shape[0] - 1)
        x = e + self.positions.to(e.dtype)[ages]
        for block in self.blocks[:-1]:
            x = block(x, mask)
        last = most_recent(mask).unsqueeze(-1).to(x.dtype)
        summary = self.blocks[-1](x, mask, queries=(x * last).sum(1, keepdim=True))
        return summary.squeeze(1) * last.sum(1)  # zero where there is no history


def make_history_encoder(cfg: ModelConfig) -> nn.Module:
    """The encoder ``model.history_encoder`` names."""
    if cfg.history_encoder == "recency":
        return RecencyHistory(cfg.history_half_life, cfg.learn_half_life)
    if cfg.history_encoder == "attention":
        return AttentionHistory(cfg.dim, cfg.history_length, cfg.history_layers, cfg.history_heads,
                                cfg.history_dropout, cfg.init_std)
    return MeanHistory()
