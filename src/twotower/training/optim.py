"""Row-wise Adam for embedding tables with sparse gradients.

A step of in-batch softmax touches about ``2B`` rows of tables that hold every user and item.
Dense Adam reads and writes all of them (parameter, gradient and both moments) every step, which
costs more than the rows that changed, and at millions of rows dominates the step. Two row-wise
updates:

- ``DeferredAdam``: dense Adam's trajectory. The moves of a row without gradient are summed in
  closed form and applied when the row is next read (or at ``flush``).
- ``RowAdam``: lazy Adam, as ``torch.optim.SparseAdam``: the moments of an untouched row neither
  decay nor move it (a different optimizer, and on in-batch softmax a worse one).

``benchmarks/optimizer.py`` measures both against fused dense Adam by table size.
"""
from __future__ import annotations

import math

import torch

from .. import native


def _rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    # a copy of the rows; embedding's gather runs ~1.7x faster than index_select on the CPU
    return torch.nn.functional.embedding(rows, table)


def _flat(t: torch.Tensor) -> torch.Tensor:
    # [rows, ...] as [rows, k]: row gathers and copies run several times faster on 2-D tensors
    return t.view(t.shape[0], -1)


def _sparse_parts(grad: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse gradient's row indices (repeats allowed) and their values."""
    if not grad.is_sparse:
        raise RuntimeError(f"{name} needs sparse gradients: build the embedding with sparse=True")
    return grad._indices()[0], grad._values()


def _summed_rows(grad: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of a sparse gradient, each once, and their summed gradients (cheaper than
    ``grad.coalesce()``)."""
    indices, values = _sparse_parts(grad, name)
    rows, where = torch.unique(indices, return_inverse=True)
    summed = torch.zeros(len(rows), *values.shape[1:], dtype=values.dtype, device=values.device)
    return rows, summed.index_add_(0, where, values)


class RowAdam(torch.optim.Optimizer):
    """``torch.optim.SparseAdam``'s update (bias-corrected step size, ``eps`` after the square root),
    done with one gather and one scatter per moment instead of masked sparse additions. Gowalla's two
    tables, B = 2048, d = 64, sparse backward + update: 3.1 ms against ``SparseAdam``'s 4.9 and
    dense fused Adam's 5.1 with dense gradients (same run, interleaved).
    State keys are ``SparseAdam``'s, so checkpoints of either load in the other."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if lr < 0 or eps < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid RowAdam hyper-parameters: lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, grad = _summed_rows(p.grad, "RowAdam")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = float(state["step"])
                if rows.numel() == 0:
                    continue
                m = state["exp_avg"].index_select(0, rows).lerp_(grad, 1 - beta1)
                v = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
                step_size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
                # Rows are unique: a gather, an update and a copy beat index_add_ into the whole table.
                p.index_copy_(0, rows, p.index_select(0, rows).addcdiv_(m, v.sqrt_().add_(group["eps"]), value=-step_size))
        return loss


class DeferredAdam(torch.optim.Optimizer):
    """Dense Adam's trajectory for embedding tables, paid for on the rows a step reads.

    A row that gets no gradient at step ``s`` still moves under dense Adam, because its moments are
    not zero (Kingma & Ba 2015, with ``torch.optim.Adam``'s placement of ``eps``)::

        m_s = b1 m_{s-1},   v_s = b2 v_{s-1},
        p_s = p_{s-1} - (lr_s / c1_s) m_s / (sqrt(v_s / c2_s) + eps),   c1_s = 1 - b1^s, c2_s = 1 - b2^s.

    After its last gradient at step ``a`` the moments are ``m_a b1^(s-a)`` and ``v_a b2^(s-a)``, so
    the moves of the steps ``a+1 .. t`` sum in closed form::

        p_t = p_a - m_a / (sqrt(v_a) + eps') * sum_{s=a+1..t} H_s rho^(s-a),
        H_s = lr_s sqrt(c2_s) / c1_s,   rho = b1 / sqrt(b2),

    with ``eps`` in the sum taken as it stands at the first deferred step, ``eps sqrt(c2_s)
    b2^((a-s)/2)`` at ``s = moved+1`` (exact for one deferred step; it drifts only where ``sqrt(v)``
    is as small as ``eps``). The sums are kept for every start at
    once, ``R_k = sum_{s=k..t} H_s rho^(s-k)``, updated by one vectorised pass over the last
    ``window`` steps each step (older terms are below ``rho^window``, 1e-93 at the default).

    Per row the state holds both moments as of the last gradient (``moments[:, 0]`` and
    ``moments[:, 1]``, side by side so that one gather reads both) and a ``clock``: the step of that
    gradient (``last``) and the step the row has been moved to (``moved``). A move from ``moved`` to
    ``t`` is ``m_a / (sqrt(v_a) + eps) * rho^(moved+1-a) R_{moved+1}``. A row must be current when it
    is read, since its gradient is taken there: ``attach(module)`` hooks every embedding table of the
    module that this optimizer updates, so that a lookup first moves the rows it reads (without it
    the update is only approximately Adam's: gradients are taken at stale rows). The rows, moments
    and clock a lookup gathered are kept for the step that follows, which then reads nothing more
    from the tables when its gradient covers exactly those rows (one lookup per table per step; any
    other gradient takes the general path). ``flush()`` brings every row and moment up to date, and
    must be called before the tables are read whole (the trainer does at the end of each epoch).
    Unlike lazy Adam (``torch.optim.SparseAdam``, ``RowAdam``), rare rows keep the momentum dense
    Adam gives them. No weight decay: it would move every row every step.

    ``compiled``: the per-row passes (a lookup's moves, the step) run in a small C extension
    (``native/_rowadam.c``, the same formulas in one loop over the rows; 2.3x fewer milliseconds per
    step than the PyTorch path on a 70,000-row table, ``benchmarks/optimizer.py``) for float32 tables
    on the CPU, when it was built at install. None uses it where the ``rowadam`` kernel is active
    (``native.active``: built, not switched off); False keeps the PyTorch path, which is the
    reference; True requires it to be built (an explicit request, taken even with the switch off).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 window: int = 2048, compiled: bool | None = None):
        if lr < 0 or eps < 0 or not all(0 <= b < 1 for b in betas) or window < 1:
            raise ValueError(f"invalid DeferredAdam hyper-parameters: lr={lr}, betas={betas}, eps={eps}, window={window}")
        if compiled and not native.built("rowadam"):
            raise RuntimeError("DeferredAdam(compiled=True): the C extension twotower.native._rowadam was not built "
                               "(reinstall twotower where a C compiler is available)")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        self.window = int(window)
        self.compiled = native.active("rowadam") if compiled is None else bool(compiled)
        self._read: dict[torch.Tensor, tuple] = {}  # parameter -> what its latest lookup gathered
        self._slots: dict[torch.Tensor, torch.Tensor] = {}  # parameter -> the C step's scratch, -1 everywhere
        self._powers: dict[tuple, torch.Tensor] = {}  # (rho, device) -> rho^window .. rho^1

    def attach(self, module: torch.nn.Module) -> list:
        """Hook the embedding tables of ``module`` whose weights this optimizer updates; returns the
        hook handles."""
        handles = []
        for m in module.modules():
            if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and self._group(m.weight) is not None:
                handles.append(m.register_forward_pre_hook(self._on_read))
        return handles

    def _group(self, p: torch.Tensor) -> dict | None:
        # looked up each time: load_state_dict replaces the group dicts
        return next((g for g in self.param_groups if any(q is p for q in g["params"])), None)

    def _on_read(self, module, args) -> None:
        p = module.weight
        state = self.state.get(p)
        if not state:
            return
        rows = args[0].reshape(-1)
        g = self._group(p)
        if self._use_kernel(p, state):
            native.rowadam_catch_up(self._table(p, state, g), rows.to(torch.int64).contiguous(), int(state["step"]))
            torch.autograd.graph.increment_version(p)  # written in place, as index_copy_ would count
            return
        # Kept only for a lookup whose gradient will follow; one per table (a second lookup in the
        # same step replaces it, and the step then finds no match and takes the general path).
        keep = torch.is_grad_enabled()
        with torch.no_grad():
            read = self._catch_up(p, state, rows, int(state["step"]), *g["betas"], g["eps"])
        if keep:
            self._read[p] = (rows, *read)
        else:
            self._read.pop(p, None)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._read.clear()
        # torch casts every non-step state tensor to the parameter's dtype; the step bookkeeping
        # must keep its own (integer steps, float64 sums)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, saved in state_dict["state"].items():
            st, p = self.state[params[int(i)]], params[int(i)]
            for key, dtype in (("clock", torch.int64), ("base", torch.int64), ("tail", torch.float64)):
                if key in saved:
                    st[key] = saved[key].to(dtype=dtype, device=p.device if key != "base" else "cpu")

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["moments"] = torch.zeros(p.shape[0], 2, *p.shape[1:], dtype=p.dtype, device=p.device)  # m, v
            state["clock"] = torch.zeros(p.shape[0], 2, dtype=torch.int64, device=p.device)  # last, moved
            state["base"] = torch.tensor(0)  # R_k is tail[k - base - 1], for k = base+1 .. step
            state["tail"] = torch.zeros(1, dtype=torch.float64, device=p.device)  # [R_{base+1} .. R_step, 0]
        return state

    @staticmethod
    def _catch_up(p, state, rows: torch.Tensor, upto: int, beta1: float, beta2: float, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Move ``rows`` (repeats allowed) through the steps after ``moved`` up to ``upto``, with the
        moments they hold since their last gradient (``last``):
        ``sum_{s=moved+1..upto} H_s rho^(s-last) = rho^(moved+1-last) R_{moved+1}``. The moments
        stay as of ``last`` (``step`` decays them), so a read writes the rows only. Rows already
        current move by 0: the sum is read from the sentinel ``R_{upto+1} = 0``.

        Returns what it gathered, for the step: the distinct rows (ascending), each of ``rows``'
        position among them, their current values, their moments (a copy) and ``last``."""
        unique, where = torch.unique(rows, return_inverse=True)
        clock = state["clock"].index_select(0, unique)
        last, moved = clock[:, 0], clock[:, 1]
        values, moments = _rows(p, unique), _rows(_flat(state["moments"]), unique).view(-1, *state["moments"].shape[1:])
        if bool((moved < upto).any()):
            rho = beta1 / math.sqrt(beta2)
            # moved >= base (a flush moves every row to base): R_{moved+1} is tail[moved - base].
            s = state["tail"].index_select(0, moved - int(state["base"])).mul_(torch.pow(rho, (moved + 1 - last).double())).to(p.dtype)
            # eps as it stands in the first deferred step's denominator: eps sqrt(c2_s) b2^((a-s)/2)
            first = (moved + 1).double()
            eps_row = (eps * torch.sqrt(1 - torch.pow(beta2, first)) * torch.pow(beta2, (last - first) / 2)).to(p.dtype)
            # clamp: a row with no gradient yet has m = v = 0 (and no move), even with eps = 0
            denom = moments[:, 1].sqrt().add_(eps_row[:, None]).clamp_min_(1e-30)
            values.addcdiv_(moments[:, 0] * s[:, None], denom, value=-1.0)
            p.index_copy_(0, unique, values)
            state["clock"][:, 1].index_fill_(0, unique, upto)
        return unique, where, values, moments, last

    def _use_kernel(self, p: torch.Tensor, state: dict) -> bool:
        return (self.compiled and p.device.type == "cpu" and p.dtype == torch.float32 and p.dim() == 2
                and p.is_contiguous() and state["moments"].is_contiguous() and state["clock"].is_contiguous()
                and state["tail"].is_contiguous())

    @staticmethod
    def _table(p: torch.Tensor, state: dict, group: dict) -> native.RowAdamTable:
        """What the C functions start from: the table, its state and the hyper-parameters."""
        return native.RowAdamTable(p.detach(), state["moments"], state["clock"], state["tail"], int(state["base"]),
                                   group["betas"], group["eps"])

    def _kernel_step(self, p: torch.Tensor, state: dict, group: dict, t: int) -> None:
        index, values = _sparse_parts(p.grad, "DeferredAdam")
        index, values = index.contiguous(), values.to(p.dtype).contiguous()
        slot = self._slots.get(p)
        if slot is None or len(slot) != p.shape[0]:
            slot = self._slots[p] = torch.full((p.shape[0],), -1, dtype=torch.int32)
        native.rowadam_step(self._table(p, state, group), index, values, t, group["lr"], slot)
        torch.autograd.graph.increment_version(p)

    def _advance(self, state, h: float, rho: float) -> None:
        """Add the step just taken (``H_t = h``) to every ``R_k`` within the window, start ``R_t``
        (in the sentinel's place) and append a new zero sentinel."""
        tail = state["tail"]
        n = len(tail) - 1
        lo = max(0, n - self.window)
        if n > lo:  # R_k += H_t rho^(t-k), for k = t-n+lo .. t-1
            key = (rho, tail.device)
            if key not in self._powers:  # rho^window .. rho^1, computed once
                exponents = torch.arange(self.window, 0, -1, dtype=torch.float64, device=tail.device)
                self._powers[key] = torch.pow(torch.tensor(rho, dtype=torch.float64, device=tail.device), exponents)
            tail[lo:n].add_(self._powers[key][self.window - (n - lo):], alpha=h)
        tail[n] = h
        state["tail"] = torch.cat([tail, tail.new_zeros(1)])

    def _gathered(self, p, state, grad, beta1, beta2, eps):
        """The distinct rows of ``grad``, their summed gradients, current values, moments and ``last``:
        from the lookup just made when its rows are the gradient's, else gathered (and brought up
        to the previous step: rows this process did not read, another rank's in an all-reduced
        gradient, are moved here as every rank does alike)."""
        indices, values = _sparse_parts(grad, "DeferredAdam")
        read = self._read.pop(p, None)
        if read is not None and read[0].shape == indices.shape and torch.equal(read[0], indices):
            unique, where, rows, moments, last = read[1:]
        else:
            unique, where, rows, moments, last = self._catch_up(p, state, indices, int(state["step"]), beta1, beta2, eps)
        summed = torch.zeros(len(unique), *values.shape[1:], dtype=values.dtype, device=values.device)
        return unique, summed.index_add_(0, where, values), rows, moments, last

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps = group["lr"], group["eps"]
            for p in group["params"]:
                state = self._state(p)
                t = int(state["step"]) + 1
                c1, c2 = 1 - beta1**t, 1 - beta2**t
                if p.grad is not None and self._use_kernel(p, state):
                    self._kernel_step(p, state, group, t)
                elif p.grad is not None:
                    unique, grad, rows, moments, last = self._gathered(p, state, p.grad, beta1, beta2, eps)
                    if unique.numel():
                        gap = (t - last).to(p.dtype)[:, None]  # moments decayed from their last gradient
                        m, v = moments[:, 0], moments[:, 1]
                        m.mul_(torch.pow(beta1, gap)).add_(grad, alpha=1 - beta1)
                        v.mul_(torch.pow(beta2, gap)).addcmul_(grad, grad, value=1 - beta2)
                        _flat(state["moments"]).index_copy_(0, unique, _flat(moments))
                        denom = v.sqrt_().div_(math.sqrt(c2)).add_(eps)
                        p.index_copy_(0, unique, rows.addcdiv_(m, denom, value=-lr / c1))
                        state["clock"].index_fill_(0, unique, t)
                state["step"] += 1
                self._advance(state, lr * math.sqrt(c2) / c1, beta1 / math.sqrt(beta2))
        self._read.clear()
        return loss

    @torch.no_grad()
    def flush(self) -> None:
        """Bring every row up to the current step (call before reading the tables whole)."""
        self._read.clear()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                t = int(state["step"])
                self._catch_up(p, state, torch.arange(p.shape[0], device=p.device), t, beta1, beta2, group["eps"])
                gap = (t - state["clock"][:, 0]).to(p.dtype)[:, None]  # the moments too, once per flush
                state["moments"][:, 0].mul_(torch.pow(beta1, gap))
                state["moments"][:, 1].mul_(torch.pow(beta2, gap))
                state["clock"].fill_(t)
                state["base"] = torch.tensor(t)
                state["tail"] = state["tail"].new_zeros(1)
