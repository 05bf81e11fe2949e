"""Exact top-k over the whole catalog, in blocks of users (one matrix product and one top-k per block)."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .. import native
from ..data.dataset import CSR
from ..model.scoring import ServedScore
from ..model.towers import ContextTable, TwoTowerModel, embed_items, embed_users


def mask_rows(scores: torch.Tensor, rows: np.ndarray, exclude: CSR) -> None:
    """Set ``scores[b, j] = -inf`` for every item ``j`` in ``exclude``'s row ``rows[b]`` (in place)."""
    vals, _ = exclude.gather(rows)
    lens = exclude.indptr[np.asarray(rows) + 1] - exclude.indptr[np.asarray(rows)]
    r = torch.from_numpy(np.repeat(np.arange(len(rows)), lens)).to(scores.device)
    scores[r, torch.from_numpy(vals).to(scores.device)] = float("-inf")


@torch.no_grad()
def top_k_blocks(model: TwoTowerModel, users: np.ndarray, history: CSR, exclude: CSR | None, k: int,
                 history_length: int, batch_users: int = 1024, item_vecs: torch.Tensor | None = None,
                 score: ServedScore | None = None, context: ContextTable | None = None
                 ) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """Yield ``(block_users, top_scores [b, k], top_items [b, k])`` (CPU tensors) block by block,
    excluding each user's ``exclude`` items, ranked and scored by the served score
    ``<f(u), g(j)>/tau + b_j - alpha log p(j)`` (``score``: default the model's, at ``alpha = 0``;
    ``model.scoring.ServedScore``). Each block's users go through the user tower once, with their
    rows of ``context`` (a table over user indices; ``None``: the context features' defaults)."""
    if item_vecs is None:
        item_vecs = embed_items(model)
    if score is None:
        score = ServedScore.of(model)
    bias = None if score.terms is None else score.terms.to(device=item_vecs.device, dtype=item_vecs.dtype)
    k = min(k, item_vecs.shape[0])
    # the product and the selection in one C pass where the topk kernel is active; else matmul and topk
    compiled = native.active("topk") and item_vecs.device.type == "cpu" and item_vecs.dtype == torch.float32 and k > 0
    if compiled:
        item_vecs = item_vecs.contiguous()
        bias = None if bias is None else bias.to(torch.float32).contiguous()
        if exclude is not None:  # int64 and contiguous, once for all blocks
            exclude = CSR(np.ascontiguousarray(exclude.indptr, dtype=np.int64),
                          np.ascontiguousarray(exclude.indices, dtype=np.int64))
    else:
        # One score buffer for all blocks: a fresh [block, n_items] allocation per block costs
        # about a third of the matrix product's time in page faults on a CPU.
        buf = torch.empty(min(batch_users, len(users)), item_vecs.shape[0], device=item_vecs.device, dtype=item_vecs.dtype)
    for s in range(0, len(users), batch_users):
        block = np.asarray(users[s : s + batch_users])
        u = score.query(embed_users(model, block, history, history_length, context=context))
        if compiled:
            values, index = _top_k_compiled(u, item_vecs, bias, block, exclude, k)
            yield block, score.finish(values), index
            continue
        scores = torch.mm(u, item_vecs.T, out=buf[: len(block)])
        if bias is not None:
            scores += bias
        if exclude is not None:
            mask_rows(scores, block, exclude)
        top = torch.topk(scores, k, dim=1)
        yield block, score.finish(top.values).cpu(), top.indices.cpu()


def _top_k_compiled(u: torch.Tensor, item_vecs: torch.Tensor, bias: torch.Tensor | None, rows: np.ndarray,
                    exclude: CSR | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk(u @ item_vecs.T + bias, k)`` with ``exclude``'s items of each row at -inf, in one C pass
    (``native.top_k``: 128 users x 1024 items of scores at a time, in cache, and a running top-k per
    user; ties go to the lower item index)."""
    u = u.to(torch.float32).contiguous()
    if exclude is None:
        return native.top_k(u, item_vecs, k, bias)
    return native.top_k(u, item_vecs, k, bias, torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)),
                        torch.from_numpy(exclude.indptr), torch.from_numpy(exclude.indices))
