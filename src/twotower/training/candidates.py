"""The candidate-set builder: the one place that decides which items every row is scored against.

For now the candidate set is the batch's own positives (in-batch negatives). Each source adds
candidate vectors, their ids and their log expected counts; masks are derived from the ids, so a
new source (sampled, memory bank, hard) plugs in here without touching the loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import losses


@dataclass
class CandidateSet:
    vectors: torch.Tensor   # [C, d] item-tower outputs
    ids: torch.Tensor       # [C] item indices
    log_q: torch.Tensor     # [C] log expected count of each candidate in the shared set
    target: torch.Tensor    # [B] column of each row's positive


def in_batch(item_vecs: torch.Tensor, item_ids: torch.Tensor, p: torch.Tensor) -> CandidateSet:
    """The batch's positives as shared candidates; row ``b``'s positive is column ``b``."""
    b = len(item_ids)
    return CandidateSet(item_vecs, item_ids, losses.log_expected_count(p[item_ids], b),
                        torch.arange(b, device=item_ids.device))
