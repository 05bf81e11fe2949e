"""Item popularity from training counts: the probabilities that training, evaluation and serving
all correct for.

These are facts about the training data (how often each item is a positive), so they live in the
data stage and every later stage can use them: the logQ correction of training takes
``counted_probabilities`` and the proposal of sampled negatives ``proposal_probabilities``;
evaluation, the index and the service subtract ``alpha * log_popularity``. The estimates that
change while training runs (the streaming estimator, the negative/positive ratio) are in
``twotower.training.frequency``.
"""
from __future__ import annotations

import numpy as np
import torch


def log_popularity(counts: np.ndarray) -> np.ndarray:
    """``log p(j)`` with add-one smoothing: ``p(j) = (n_j + 1) / (N + n_items)`` (float64).

    ``counts`` are the training positives per item. This is the popularity that serving and
    evaluation subtract, ``score - alpha * log p(j)`` (docs/design.md, "The served score");
    items never seen in training get a finite value."""
    c = np.asarray(counts, dtype=np.float64) + 1.0
    return np.log(c) - np.log(c.sum())


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


def proposal_probabilities(counts: np.ndarray, kind: str, beta: float = 0.75) -> torch.Tensor:
    """The proposal ``r`` of sampled negatives: ``uniform`` (``1 / N``) or ``frequency``
    (``r(j) = count(j)^beta / sum_k count(k)^beta``, word2vec's unigram^0.75 by default; Yang et al.
    2020 compare both)."""
    c = np.asarray(counts, dtype=np.float64)
    if kind == "uniform":
        return torch.full((len(c),), 1.0 / len(c), dtype=torch.float32)
    w = np.power(c, beta)
    if w.sum() <= 0:
        raise ValueError("item counts are all zero: no frequency proposal")
    return torch.from_numpy(w / w.sum()).to(torch.float32)
