"""The compiled kernels: one off switch, one checked wrapper per kernel, one report of what runs.

Three optional C extensions, built by ``setup.py`` where a C compiler is found:

========  ==========================================================  ====================
kernel    what it computes                                            its PyTorch path
========  ==========================================================  ====================
softmax   the fused in-batch softmax's block loop, its exp2-and-sum   ``training/losses.py``
          pass and its row shift (``_softmax.c``)                     (``_blocks_python``)
topk      full-catalog top-k without the score matrix (``_topk.c``)   ``evaluation/ranking.py``
rowadam   DeferredAdam's per-row passes (``_rowadam.c``)              ``training/optim.py``
========  ==========================================================  ====================

``softmax`` and ``topk`` call ``sgemm_`` and ``mkl_set_num_threads_local`` found by name in
PyTorch's own CPU library (``_blas.py``): not a public interface, so they also need that lookup to
succeed. Each PyTorch path is the reference: the tests hold each kernel to it. Each kernel is kept
because it beats the best library path by 1.3x to 1.6x on the workload it serves (FAISS exact
search, PyTorch eager and ``torch.compile``: ``benchmarks/native_vs_library.py``,
docs/benchmarks.md "C against the library alternative"); one that would not, goes.

The switch: ``TWOTOWER_NATIVE=0`` in the environment turns every compiled path off, whatever the
config; otherwise ``train.native`` decides (``configure``, called by the trainer; default on).
Library code asks ``active(kernel)`` before taking a compiled path; ``report()`` (``twotower
info``, the first lines of ``train``, the ``native`` entry of a run's ``metrics.json``) says for
each kernel whether it runs and why not.

Every call into C goes through a wrapper below, which checks each buffer it passes (a tensor, on
the CPU, of the dtype, shape and layout the C reads, and indices within range where the C would
write through them) and raises ``NativeArgumentError`` naming the argument: a bug in the caller,
caught before anything is written. The wrappers run whenever the kernel is built, whatever the
switch (the tests call them with it off): the switch decides what the library calls.
"""
from __future__ import annotations

import os

import torch

from .. import openmp
from ..errors import ConfigError
from . import _blas

try:  # each extension is optional (no C compiler at install: the PyTorch paths)
    from . import _softmax
except ImportError:  # pragma: no cover - depends on the install
    _softmax = None
try:
    from . import _topk
except ImportError:  # pragma: no cover - depends on the install
    _topk = None
try:
    from . import _rowadam
except ImportError:  # pragma: no cover - depends on the install
    _rowadam = None

ENV = "TWOTOWER_NATIVE"
KERNELS = ("softmax", "topk", "rowadam")
_MODULES = {"softmax": _softmax, "topk": _topk, "rowadam": _rowadam}
_NEEDS_BLAS = {"softmax": True, "topk": True, "rowadam": False}
_OFF, _ON = ("0", "false", "off", "no"), ("", "1", "true", "on", "yes")

_configured = True  # train.native of the latest trainer in this process


class NativeArgumentError(ValueError):
    """A buffer handed to a compiled kernel is not what the kernel reads (dtype, device, layout,
    shape, or an index out of range). A bug in the calling code, not a user error: raised before
    the kernel runs, so nothing has been written."""


# ---- the switch ------------------------------------------------------------------------------------
def configure(enabled: bool) -> None:
    """Set the config's side of the switch (``train.native``) for this process; ``TWOTOWER_NATIVE=0``
    still wins. Refuses a ``TWOTOWER_NATIVE`` value that is neither on nor off (``ConfigError``)."""
    global _configured
    env_off()
    _configured = bool(enabled)


def env_off() -> bool:
    """Whether ``TWOTOWER_NATIVE`` turns the compiled paths off (``0``, ``false``, ``off``, ``no``)."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in _OFF:
        return True
    if value in _ON:
        return False
    raise ConfigError(f"{ENV}={os.environ[ENV]!r}: expected 0 (compiled paths off) or 1 (on, the default)")


def enabled() -> bool:
    """The switch: on unless ``TWOTOWER_NATIVE=0`` or ``train.native = false``."""
    return _configured and not env_off()


def built(kernel: str) -> bool:
    """Whether ``kernel``'s extension was compiled at install (and imports)."""
    return _module(kernel) is not None


def available(kernel: str) -> bool:
    """Whether ``kernel`` can run: built, and its BLAS entry points found where it needs them
    (whatever the switch)."""
    return built(kernel) and (not _NEEDS_BLAS[kernel] or _blas.mkl() is not None)


def active(kernel: str) -> bool:
    """Whether the library takes ``kernel``'s compiled path: available and the switch on. The caller
    still checks that its tensors suit the kernel (float32 on the CPU), else takes its PyTorch path."""
    return available(kernel) and enabled()


def _module(kernel: str):
    if kernel not in _MODULES:
        raise ValueError(f"unknown kernel {kernel!r}; known: {', '.join(KERNELS)}")
    return _MODULES[kernel]


# ---- the report --------------------------------------------------------------------------------------
def cpu_features() -> dict[str, bool]:
    """AVX2 and FMA as the compiled loops see them (their vectorised loops need both; without them
    the same kernels run scalar loops); from ``/proc/cpuinfo`` where no extension is built."""
    for module in _MODULES.values():
        if module is not None:
            avx2, fma = module.cpu_features()
            return {"avx2": bool(avx2), "fma": bool(fma)}
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:  # pragma: no cover - not Linux
        pass
    return {"avx2": "avx2" in flags, "fma": "fma" in flags}


def report() -> dict:
    """For each kernel: built, BLAS entry points found (where needed), the switch, and so whether its
    compiled path or its PyTorch path runs, with the reason. JSON-serialisable."""
    blas = _blas.lookup()
    cpu = cpu_features()
    env = os.environ.get(ENV)
    try:
        switch_on, why_off = enabled(), None
        if env_off():
            why_off = f"{ENV}={env}"
        elif not _configured:
            why_off = "train.native = false"
    except ConfigError as e:
        switch_on, why_off = False, str(e)
    kernels = {}
    for kernel in KERNELS:
        needs = _NEEDS_BLAS[kernel]
        missing = [name for name, addr in blas.items() if addr is None] if needs else []
        if not built(kernel):
            why = "not built (no C compiler at install: reinstall with one)"
        elif missing:
            why = f"{', '.join(missing)} not found in {_blas.library_path()} (PyTorch built without MKL?)"
        elif not switch_on:
            why = f"switched off ({why_off})"
        else:
            why = "built, " + ("MKL entry points found, " if needs else "") + "switch on" + (
                "" if cpu["avx2"] and cpu["fma"] else " (scalar loops: this CPU lacks AVX2 or FMA)")
        kernels[kernel] = {"built": built(kernel), "blas_found": (not missing) if needs else None,
                           "path": "compiled" if why.startswith("built") else "pytorch", "why": why}
    return {
        "switch": {"on": switch_on, "env": env, "config": _configured},
        "blas": {"library": _blas.library_path(), **{name: addr is not None for name, addr in blas.items()}},
        "cpu": cpu,
        "threads": {"torch": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "wait": openmp.status()},
        "kernels": kernels,
    }


def summary(rep: dict | None = None) -> str:
    """``report()`` in one line, e.g. ``compiled: softmax, topk, rowadam (AVX2+FMA); switch on``."""
    rep = rep or report()
    k = rep["kernels"]
    on = [name for name in KERNELS if k[name]["path"] == "compiled"]
    off = [f"{name} ({k[name]['why']})" for name in KERNELS if k[name]["path"] != "compiled"]
    cpu = "AVX2+FMA" if rep["cpu"]["avx2"] and rep["cpu"]["fma"] else "no AVX2/FMA: scalar loops"
    parts = [f"compiled: {', '.join(on)} ({cpu})" if on else "compiled: none"]
    if off:
        parts.append(f"PyTorch path: {'; '.join(off)}")
    return "; ".join(parts) + f"; {_threads(rep['threads'])}"


def _threads(th: dict) -> str:
    """``2 threads, GOMP_SPINCOUNT=30000 (set by twotower)``."""
    wait = th["wait"]
    if wait["set_by"] is None:
        policy = "OpenMP threads spin ~3 ms before sleeping (no OMP_WAIT_POLICY)"
    else:
        policy = ", ".join(f"{k}={wait[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if wait[k] is not None)
        policy += f" (set by {wait['set_by']}" + ("" if wait["in_effect"] else ", too late: torch was imported first") + ")"
    return f"{th['torch']} threads, {policy}"


# ---- argument checks -----------------------------------------------------------------------------------
class _Args:
    """Checks the buffers of one kernel call; named sizes (``"B"``, ``"d"``) bind on first use, so
    every buffer that shares a size must agree on it."""

    def __init__(self, kernel: str):
        self.kernel, self.sizes = kernel, {}

    def fail(self, name: str, problem: str):
        raise NativeArgumentError(f"native.{self.kernel}: argument {name!r} {problem}")

    def tensor(self, name: str, t, dtype: torch.dtype, shape: tuple, optional: bool = False) -> int:
        """Check ``t`` and return its address (0 for an absent optional one)."""
        if t is None:
            if optional:
                return 0
            self.fail(name, "is required, got None")
        if not isinstance(t, torch.Tensor):
            self.fail(name, f"must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            self.fail(name, f"must be on the CPU, got {t.device}")
        if t.dtype != dtype:
            self.fail(name, f"must be {dtype}, got {t.dtype}")
        want = [self.sizes.setdefault(s, n) if isinstance(s, str) else s for s, n in zip(shape, t.shape)]
        if t.dim() != len(shape) or any(w != n for w, n in zip(want, t.shape)):
            spec = ", ".join(f"{s}={self.sizes[s]}" if isinstance(s, str) and s in self.sizes else str(s) for s in shape)
            self.fail(name, f"must have shape [{spec}], got {list(t.shape)}")
        if not t.is_contiguous():
            self.fail(name, "must be contiguous (call .contiguous() first)")
        return t.data_ptr()

    def within(self, name: str, t: torch.Tensor | None, lo: int, hi: int) -> None:
        """Every entry of ``t`` in ``[lo, hi)`` (the C indexes buffers with them)."""
        if t is not None and t.numel():
            a, b = torch.aminmax(t)
            if int(a) < lo or int(b) >= hi:
                self.fail(name, f"holds {int(a) if int(a) < lo else int(b)}, outside [{lo}, {hi})")

    def ascending(self, name: str, t: torch.Tensor | None) -> None:
        if t is not None and t.numel() > 1 and bool((t[1:] < t[:-1]).any()):
            self.fail(name, "must be sorted in ascending order")

    def positive(self, name: str, value: int) -> int:
        if not isinstance(value, int) or value <= 0:
            self.fail(name, f"must be a positive int, got {value!r}")
        return value


def _require(kernel: str) -> tuple:
    """The kernel's module and, where it needs them, the BLAS addresses; a clear error where absent."""
    module = _module(kernel)
    if module is None:
        raise RuntimeError(f"native.{kernel}: the C extension twotower.native._{kernel} was not built "
                           "(reinstall twotower where a C compiler is available)")
    blas = _blas.mkl() if _NEEDS_BLAS[kernel] else ()
    if blas is None:
        raise RuntimeError(f"native.{kernel}: sgemm_ / mkl_set_num_threads_local not found in {_blas.library_path()}")
    return module, blas


# ---- softmax: losses.shared_softmax_loss's compiled block loop -----------------------------------------
def softmax_row_shift(q2: torch.Tensor, v: torch.Tensor, off2: torch.Tensor | None, lo: float, hi: float
                      ) -> tuple[bool, torch.Tensor | None]:
    """``losses._row_shift`` in one C pass: ``(found, shift)``, ``shift`` [B] float32 or None where
    every row takes 0; ``found`` False where no shift keeps some row's logits within ``[lo, hi]``.

    ``q2`` [B, d], ``v`` [C, d], ``off2`` [C] or None: float32, contiguous, on the CPU."""
    module, _ = _require("softmax")
    a = _Args("softmax_row_shift")
    p_q2 = a.tensor("q2", q2, torch.float32, ("B", "d"))
    p_v = a.tensor("v", v, torch.float32, ("C", "d"))
    p_off = a.tensor("off2", off2, torch.float32, ("C",), optional=True)
    shift = torch.empty(q2.shape[0], dtype=torch.float32)
    status = module.row_shift(p_q2, q2.shape[0], q2.shape[1], p_v, v.shape[0], p_off, shift.data_ptr(),
                              float(lo), float(hi))
    return status > 0, (shift if status == 2 else None)


def exp2_column_sums(zt: torch.Tensor, row_offset: torch.Tensor | None = None, vectorised: bool = True) -> torch.Tensor:
    """``zt <- 2^(zt + row_offset[:, None])`` in place; returns the column sums [cols].

    ``zt`` [rows, cols], ``row_offset`` [rows] or None: float32, contiguous, on the CPU.
    ``vectorised``: the AVX2 loop where the CPU has it (False: the scalar loop; the same formula)."""
    module, _ = _require("softmax")
    a = _Args("exp2_column_sums")
    p_z = a.tensor("zt", zt, torch.float32, ("rows", "cols"))
    p_off = a.tensor("row_offset", row_offset, torch.float32, ("rows",), optional=True)
    sums = torch.empty(zt.shape[1], dtype=torch.float32)
    module.exp2_colsum(p_z, zt.shape[0], zt.shape[1], sums.data_ptr(), bool(vectorised), p_off)
    return sums


def softmax_blocks(v: torch.Tensor, q2: torch.Tensor, q: torch.Tensor, target: torch.Tensor, block: int, *,
                   offset2: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                   positive_shift2: torch.Tensor | None = None, hit_rows: torch.Tensor | None = None,
                   hit_cols: torch.Tensor | None = None, extra_sum: torch.Tensor | None = None,
                   query_ids: torch.Tensor | None = None, want_offset: bool = False
                   ) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The fused softmax's block loop in C (``_softmax.c``'s ``forward``: the formulas are there and
    in ``losses.shared_softmax_loss``), blocks of ``block`` rows shared between PyTorch's threads.

    Inputs, all contiguous on the CPU: ``v`` [C, d], ``q2 = q * log2(e)`` and ``q`` [B, d],
    ``offset2`` [C], ``shift`` [B], ``positive_shift2`` [B], ``extra_sum`` [B] float32; ``target``
    [B] int64 in [0, C); ``hit_rows`` / ``hit_cols`` [H] int64, the excluded coordinates, rows
    ascending; ``query_ids`` [B] int64. Returns ``(sum over rows of the base-2 loss, grad_q [B, d],
    grad_v [C, d], grad_offset [C] or None, denom [B])``."""
    module, (sgemm, threads_local) = _require("softmax")
    a = _Args("softmax_blocks")
    p_v = a.tensor("v", v, torch.float32, ("C", "d"))
    p_q2 = a.tensor("q2", q2, torch.float32, ("B", "d"))
    p_q = a.tensor("q", q, torch.float32, ("B", "d"))
    p_target = a.tensor("target", target, torch.int64, ("B",))
    p_off = a.tensor("offset2", offset2, torch.float32, ("C",), optional=True)
    p_shift = a.tensor("shift", shift, torch.float32, ("B",), optional=True)
    p_pos = a.tensor("positive_shift2", positive_shift2, torch.float32, ("B",), optional=True)
    p_hr = a.tensor("hit_rows", hit_rows, torch.int64, ("H",), optional=True)
    p_hc = a.tensor("hit_cols", hit_cols, torch.int64, ("H",), optional=hit_rows is None)
    p_xsum = a.tensor("extra_sum", extra_sum, torch.float32, ("B",), optional=True)
    p_ids = a.tensor("query_ids", query_ids, torch.int64, ("B",), optional=True)
    a.positive("block", block)
    B, C, d = q.shape[0], v.shape[0], q.shape[1]
    for name, n in (("rows B", B), ("candidates C", C), ("width d", d)):
        a.positive(name, n)
    a.within("target", target, 0, C)
    a.within("hit_rows", hit_rows, 0, B)
    a.within("hit_cols", hit_cols, 0, C)
    a.ascending("hit_rows", hit_rows)
    grad_q, grad_v = torch.empty(B, d, dtype=torch.float32), torch.empty(C, d, dtype=torch.float32)
    grad_off = torch.empty(C, dtype=torch.float32) if want_offset else None
    denom = torch.empty(B, dtype=torch.float32)
    total = module.forward(sgemm, threads_local, torch.get_num_threads(), block, True, p_v, C, p_q2, p_q, B, d,
                           p_off, p_shift, p_target, p_pos, p_hr, p_hc, 0 if hit_rows is None else hit_rows.numel(),
                           p_xsum, p_ids, grad_q.data_ptr(), grad_v.data_ptr(),
                           0 if grad_off is None else grad_off.data_ptr(), denom.data_ptr())
    return total, grad_q, grad_v, grad_off, denom


# ---- topk: ranking.top_k_blocks's compiled pass --------------------------------------------------------
def top_k(users: torch.Tensor, items: torch.Tensor, k: int, bias: torch.Tensor | None = None,
          rows: torch.Tensor | None = None, indptr: torch.Tensor | None = None, indices: torch.Tensor | None = None,
          vectorised: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Each user's ``k`` best items by ``<users_u, items_j> + bias_j``, best first, ties to the lower
    item index, with the items of CSR row ``rows[u]`` of ``(indptr, indices)`` excluded (``_topk.c``).

    ``users`` [n, d], ``items`` [m, d], ``bias`` [m]: float32; ``rows`` [n], ``indptr`` [R + 1],
    ``indices`` [indptr[-1]]: int64 (all three or none); contiguous, on the CPU; 0 < k <= m.
    Returns ``values`` [n, k] float32 and ``index`` [n, k] int64."""
    module, (sgemm, threads_local) = _require("topk")
    a = _Args("top_k")
    p_u = a.tensor("users", users, torch.float32, ("n", "d"))
    p_v = a.tensor("items", items, torch.float32, ("m", "d"))
    p_bias = a.tensor("bias", bias, torch.float32, ("m",), optional=True)
    n, m, d = users.shape[0], items.shape[0], items.shape[1]
    a.positive("k", k)
    if k > m:
        a.fail("k", f"must be at most the item count {m}, got {k}")
    exclude = rows is not None or indptr is not None or indices is not None
    p_rows = a.tensor("rows", rows, torch.int64, ("n",), optional=not exclude)
    p_ptr = a.tensor("indptr", indptr, torch.int64, ("R+1",), optional=not exclude)
    p_idx = a.tensor("indices", indices, torch.int64, ("nnz",), optional=not exclude)
    if exclude:
        if indptr.numel() == 0 or int(indptr[0]) != 0 or int(indptr[-1]) != indices.numel():
            a.fail("indptr", f"must start at 0 and end at len(indices) = {indices.numel()}")
        if bool((indptr[1:] < indptr[:-1]).any()):
            a.fail("indptr", "must not decrease")
        a.within("rows", rows, 0, indptr.numel() - 1)
    values = torch.empty(n, k, dtype=torch.float32)
    index = torch.empty(n, k, dtype=torch.int64)
    if n == 0:
        return values, index
    a.positive("items' width d", d)
    module.top_k(sgemm, threads_local, torch.get_num_threads(), vectorised, p_u, n, p_v, m, d, p_bias,
                 p_rows, p_ptr, p_idx, k, values.data_ptr(), index.data_ptr())
    return values, index


# ---- rowadam: DeferredAdam's compiled row passes ----------------------------------------------------
class RowAdamTable:
    """One embedding table and its DeferredAdam state, checked once per call: ``p`` [N, D] float32,
    ``moments`` [N, 2, D] float32 (m, v), ``clock`` [N, 2] int64 (last, moved), ``tail`` [L] float64
    (``tail[k - base - 1] = R_k``), on the CPU and contiguous; ``optim.DeferredAdam`` holds the
    formulas."""

    def __init__(self, p: torch.Tensor, moments: torch.Tensor, clock: torch.Tensor, tail: torch.Tensor, base: int,
                 betas: tuple[float, float], eps: float, kernel: str = "rowadam"):
        self.module, _ = _require("rowadam")
        self.kernel = kernel
        a = _Args(kernel)
        addrs = (a.tensor("p", p, torch.float32, ("N", "D")), a.tensor("moments", moments, torch.float32, ("N", 2, "D")),
                 a.tensor("clock", clock, torch.int64, ("N", 2)), a.tensor("tail", tail, torch.float64, ("L",)))
        if tail.numel() == 0:
            a.fail("tail", "must hold at least the sentinel")
        self.p, self.sizes = p, a.sizes
        self.head = (*addrs, tail.numel(), int(base), p.shape[0], p.shape[1], float(betas[0]), float(betas[1]), float(eps))

    def args(self) -> _Args:
        """A check for one call's buffers, with the table's sizes (N, D) bound."""
        a = _Args(self.kernel)
        a.sizes.update(self.sizes)
        return a


def rowadam_catch_up(table: RowAdamTable, rows: torch.Tensor, upto: int) -> None:
    """Move ``rows`` [n] int64 (repeats allowed; each in [0, N), else IndexError from the C before any
    write) to step ``upto`` with their deferred Adam moves, in place."""
    p_rows = table.args().tensor("rows", rows, torch.int64, ("n",))
    table.module.catch_up(*table.head, p_rows, rows.numel(), int(upto))


def rowadam_step(table: RowAdamTable, index: torch.Tensor, grad: torch.Tensor, t: int, lr: float,
                 slot: torch.Tensor) -> int:
    """Adam step ``t`` on the rows of a sparse gradient (``index`` [n] int64, ``grad`` [n, D] float32,
    repeats summed), in place; ``slot`` [N] int32 scratch holding -1 everywhere (and again on
    return). Returns the number of distinct rows."""
    a = table.args()
    p_index = a.tensor("index", index, torch.int64, ("n",))
    p_grad = a.tensor("grad", grad, torch.float32, ("n", "D"))
    p_slot = a.tensor("slot", slot, torch.int32, ("N",))
    n = index.numel()
    acc, unique = torch.empty(n, table.p.shape[1], dtype=torch.float32), torch.empty(n, dtype=torch.int64)
    return table.module.step(*table.head, p_index, p_grad, n, int(t), float(lr), p_slot, acc.data_ptr(),
                             unique.data_ptr())
