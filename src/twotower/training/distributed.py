"""Multi-process training under ``torchrun``: the process group, this rank's rows, the global batch.

``torchrun --nproc-per-node N -m twotower train CONFIG --out RUN`` starts N copies of the same
command; each finds its rank in the environment torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and joins one process group: gloo on CPU, NCCL on
CUDA (one GPU per rank). Launched without torchrun, everything here is the identity.

The semantics, so that N ranks train the model one process trains:
- ``train.batch_size`` is the **global** batch. Every rank draws the same epoch permutation (same
  seed) and takes its contiguous slice of each global batch (sizes differ by at most one row).
- Each rank encodes its own rows; the item vectors of the positives are all-gathered with an
  autograd-aware gather, so every row is scored against the global batch, and the accidental-hit
  mask and the logQ correction see the global candidate set (the global item ids are known on
  every rank without communication: all ranks hold the same batch indices).
- The model is wrapped in ``DistributedDataParallel``, which averages gradients over ranks. Each
  rank's loss is its rows' share of the global mean (``loss_weight``), so the average is the
  gradient of the global-batch loss, exactly as one process with the whole batch computes it.
- Sampled negatives come from a generator seeded by (seed, step): all ranks draw the same items,
  so they need no broadcast (and one process draws the same ones).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

# Rank 0 evaluates while the others wait in a collective: give slow evaluations room.
_TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("TWOTOWER_DIST_TIMEOUT", "3600")))


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if _initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def is_main() -> bool:
    """Rank 0 (also before the group exists: torchrun's ``RANK``), or a plain single process."""
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group when launched with more than one rank; return this rank's device
    (``cuda:LOCAL_RANK`` for CUDA). Idempotent: a second trainer (the refit) reuses the group."""
    if env_world_size() <= 1 and not _initialized():
        return device
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not _initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=_TIMEOUT)
    return device


def shutdown() -> None:
    if _initialized():
        dist.barrier()
        dist.destroy_process_group()


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A batch array as a tensor on ``device``; on CUDA through pinned memory, so the copy is async."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    out = t.clone()
    if _initialized():
        dist.all_reduce(out)
    return out


class _GatherRows(torch.autograd.Function):
    """All-gather of row blocks of unequal sizes (rank order), with the gradient sent back to the
    rank that owns each row.

    Every rank's loss depends on every rank's rows, so the gradient of row ``i`` is the sum over
    ranks of each rank's gradient for it: an all-reduce of the global gradient, then this rank's
    slice. (``torch.distributed.nn.functional.all_gather`` does the same sum but needs equal sizes,
    and a batch's last slice can be one row shorter; gloo has no reduce-scatter.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple[int, ...], me: int) -> torch.Tensor:
        ctx.sizes, ctx.me = sizes, me
        m = max(sizes)
        padded = x.contiguous()
        if len(x) != m:
            padded = x.new_zeros((m, *x.shape[1:]))
            padded[: len(x)] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        g = grad.contiguous().clone()
        dist.all_reduce(g)
        start = sum(ctx.sizes[: ctx.me])
        return g[start : start + ctx.sizes[ctx.me]], None, None


def gather_rows(x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """``cat`` over ranks of each rank's ``x`` (``sizes[r]`` rows on rank ``r``), differentiable."""
    if world_size() == 1:
        return x
    return _GatherRows.apply(x, tuple(int(s) for s in sizes), rank())


@dataclass
class GlobalBatch:
    """The shared part of a step, identical on every rank: the positives of all ranks (in rank
    order), this rank's first row among them, and the generator of shared random draws."""

    items: torch.Tensor                 # [G] item indices of the global batch's positives
    vectors: torch.Tensor               # [G, d] their item-tower outputs (gradients reach their rank)
    offset: int                         # this rank's rows are offset .. offset + B_local - 1
    generator: torch.Generator          # seeded by (seed, step): the same draws on every rank
    sum: Callable[[torch.Tensor], torch.Tensor]  # element-wise sum over ranks (identity on one process)


class _Towers(nn.Module):
    """The differentiable encoders of a step, as one module so that ``DistributedDataParallel`` sees
    one forward call per backward. bf16 autocast on CUDA; the vectors come back float32 so that the
    logits, their corrections and the softmax stay in full precision."""

    def __init__(self, model: nn.Module, bf16: bool):
        super().__init__()
        self.model, self.bf16 = model, bf16

    def forward(self, users, items, history, history_mask, context=None):
        m = self.model
        if not self.bf16:
            return m.encode_users(users, history, history_mask, context), m.encode_items(items)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            u, v = m.encode_users(users, history, history_mask, context), m.encode_items(items)
        return u.float(), v.float()


class Parallel:
    """The trainer's view of the other ranks. On one process: no wrapper, the whole batch, identity
    gathers. Under torchrun: DDP over the towers, this rank's slice of each batch, gathers."""

    def __init__(self, model: nn.Module, device: torch.device, seed: int, sparse: bool = False):
        self.device = device
        self.rank, self.world = rank(), world_size()
        self.seed = int(seed)
        towers: nn.Module = _Towers(model, bf16=device.type == "cuda")
        if self.world > 1:
            if sparse and dist.get_backend() == "nccl":
                from ..errors import ConfigError

                raise ConfigError("train.optimizer = \"deferred_adam\" or \"sparse_adam\" under torchrun on GPUs: NCCL cannot all-reduce "
                                  "sparse gradients; use \"adam\" (or gloo on CPU)")
            # Parameters other than the towers' (the item bias, a learned temperature) are used after
            # the forward call; with find_unused_parameters off DDP waits for every gradient anyway.
            # Buffers are constants or follow the (synchronised) parameters: no per-step broadcast.
            towers = nn.parallel.DistributedDataParallel(
                towers, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
        self.towers = towers
        self.generator = torch.Generator(device=device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def encode(self, users, items, history=None, history_mask=None, context=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.towers(users, items, history, history_mask, context)

    def shard(self, pairs: np.ndarray) -> "Shard":
        """This rank's contiguous slice of a global batch (all of it on one process)."""
        if self.world == 1:
            return Shard(self, pairs, pairs, (len(pairs),), 0)
        parts = np.array_split(pairs, self.world)
        sizes = tuple(len(p) for p in parts)
        return Shard(self, pairs, parts[self.rank], sizes, sum(sizes[: self.rank]))

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0 only (evaluation, mining), its result sent to every rank; an exception on
        rank 0 is raised on every rank instead of leaving the others waiting."""
        if self.world == 1:
            return fn()
        box: list[Any] = [None]
        error = None
        if self.main:
            try:
                box[0] = ("ok", fn())
            except Exception as e:  # noqa: BLE001 - re-raised below, after the others are told
                error, box[0] = e, ("error", f"{type(e).__name__}: {e}")
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        status, value = box[0]
        if status == "error":
            raise RuntimeError(f"rank 0 failed: {value}")
        return value

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


@dataclass
class Shard:
    par: Parallel
    pairs: np.ndarray           # the global batch (indices into the training pairs)
    rows: np.ndarray            # this rank's part of it
    sizes: tuple[int, ...]      # every rank's part size
    offset: int                 # where this rank's part starts

    @property
    def loss_weight(self) -> float:
        """DDP averages gradients over ranks; weighting each rank's mean by ``world * B_r / G`` makes
        that average the gradient of the mean over all ``G`` rows, also when the slices are uneven."""
        if self.par.world == 1:
            return 1.0
        return self.par.world * len(self.rows) / max(len(self.pairs), 1)

    def global_batch(self, items: torch.Tensor, vectors: torch.Tensor, pair_items: np.ndarray, step: int) -> GlobalBatch:
        """``items``/``vectors``: this rank's positives and their item vectors; ``pair_items``: the item
        of every training pair (every rank holds the global batch's indices, so its ids need no
        communication)."""
        par = self.par
        par.generator.manual_seed(par.seed * 1_000_003 + step)
        if par.world == 1:
            return GlobalBatch(items, vectors, 0, par.generator, lambda t: t)
        return GlobalBatch(to_device(pair_items[self.pairs], items.device), gather_rows(vectors, self.sizes), self.offset,
                           par.generator, all_reduce_sum)

    def mean_loss(self, loss: torch.Tensor) -> float:
        """The loss over the global batch (this rank's mean on one process)."""
        if self.par.world == 1:
            return float(loss.detach())
        n = len(self.rows)
        # A rank can hold no row of a tiny last batch: its mean is NaN, its share nothing.
        t = torch.tensor([float(loss.detach()) * n if n else 0.0], dtype=torch.float64, device=self.par.device)
        return float(all_reduce_sum(t)) / max(len(self.pairs), 1)
