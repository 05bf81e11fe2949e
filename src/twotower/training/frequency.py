"""Item probabilities ``p(j)`` behind the logQ correction.

Exact counts over the training positives: ``p(j) = count(j) / sum_k count(k)``. (The streaming
estimator of Yi et al. 2019 plugs in here for data that arrives as a stream.)
"""
from __future__ import annotations

import numpy as np
import torch


def counted_probabilities(counts: np.ndarray, smoothing: float = 0.0) -> torch.Tensor:
    """``p(j) = (count(j) + smoothing) / sum_k (count(k) + smoothing)`` as a float tensor.

    Items never seen in training get probability ``smoothing / total`` (0 by default): they are
    never in-batch candidates, so their correction is never used during training.
    """
    c = torch.as_tensor(np.asarray(counts, dtype=np.float64)) + smoothing
    total = c.sum()
    if total <= 0:
        raise ValueError("item counts are all zero: no training positives")
    return (c / total).to(torch.float32)
