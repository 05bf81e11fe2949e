"""Cross-batch memory bank of item embeddings (Wang, Zhu, He, "Cross-Batch Negative Sampling for
Training Two-Tower Recommenders", SIGIR 2021).

A FIFO of the item-tower outputs of the last ``Q`` positives, detached: later batches score them
as extra shared negatives at the cost of one matrix product, without encoding them again. The
embeddings were computed by an older model; the warm-up keeps the bank out of the first steps,
where the model (and so the staleness) changes fastest.
"""
from __future__ import annotations

import torch


class MemoryBank:
    def __init__(self, size: int, dim: int, warmup_steps: int = 0, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        if size < 1:
            raise ValueError("memory bank size must be >= 1")
        self.size, self.warmup_steps = int(size), int(warmup_steps)
        self._vecs = torch.zeros(self.size, dim, device=device, dtype=dtype)
        self._ids = torch.full((self.size,), -1, dtype=torch.int64, device=device)
        self._head = 0   # next slot to overwrite (the oldest entry once full)
        self.filled = 0

    def push(self, vecs: torch.Tensor, ids: torch.Tensor) -> None:
        """Enqueue a batch's positives (oldest entries leave first). A batch larger than the bank
        keeps only its last ``size`` rows."""
        vecs, ids = vecs.detach()[-self.size:], ids[-self.size:]
        n = len(ids)
        slots = (self._head + torch.arange(n, device=self._ids.device)) % self.size
        self._vecs[slots] = vecs.to(self._vecs.dtype)
        self._ids[slots] = ids
        self._head = (self._head + n) % self.size
        self.filled = min(self.size, self.filled + n)

    def active(self, step: int) -> bool:
        return self.filled > 0 and step >= self.warmup_steps

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(vectors [n, d], ids [n])`` of the filled entries, oldest first."""
        if self.filled < self.size:
            return self._vecs[: self.filled], self._ids[: self.filled]
        order = (self._head + torch.arange(self.size, device=self._ids.device)) % self.size
        return self._vecs[order], self._ids[order]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"vecs": self._vecs, "ids": self._ids, "head_filled": torch.tensor([self._head, self.filled])}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._vecs.copy_(state["vecs"])
        self._ids.copy_(state["ids"])
        self._head, self.filled = (int(x) for x in state["head_filled"].tolist())
