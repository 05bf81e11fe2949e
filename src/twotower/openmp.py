"""How long OpenMP's waiting threads spin, chosen before PyTorch loads its OpenMP runtime.

PyTorch's CPU operators, MKL inside them and the compiled kernels (``twotower.native``) share one
OpenMP runtime, GNU libgomp (PyTorch's Linux wheels; FAISS's wheels carry their own copy). Without
``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` a libgomp thread that waits for the others (at the end of
every parallel operator, and for the next one) spins 300,000 times, about 3 ms, before it sleeps.
On a machine that runs other work, the thread it waits for is often off the CPU for a whole time
slice while the spinning one keeps a core from it: every small parallel operator of an epoch can
then cost milliseconds. Sleeping at once (``OMP_WAIT_POLICY=PASSIVE``) is safe under load, but on
an idle machine each operator then pays a wake-up (an epoch 40 % slower or more). A bounded spin,
``GOMP_SPINCOUNT=30000`` (~0.3 ms), keeps an idle machine's Gowalla epoch within a few per cent
and cuts the cost of a machine shared with a 2-thread job from 12x-23x to 4x-5x; 10,000 (~0.1 ms)
would cost about its share (2x-2.7x) but an idle Gowalla epoch ~10 % (``benchmarks/busy_machine.py``;
docs/benchmarks.md, "A busy machine").

``import twotower`` sets ``DEFAULTS`` unless ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is already
set (a choice made in the environment wins). libgomp reads its environment once, when it is loaded:
the setting takes effect where twotower is imported before torch (the ``twotower`` command always
is); ``status()`` (and ``twotower info``) says whether it did. Other OpenMP runtimes (LLVM's libomp,
Intel's) ignore ``GOMP_SPINCOUNT``.
"""
from __future__ import annotations

import os
import sys

DEFAULTS = {"GOMP_SPINCOUNT": "30000"}
VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
_in_time: bool | None = None  # None: twotower set nothing; else whether before PyTorch (so OpenMP) loaded


def apply_defaults() -> None:
    """Set ``DEFAULTS`` in the environment unless the user chose a wait policy (idempotent)."""
    global _in_time
    if any(name in os.environ for name in VARIABLES):
        return
    os.environ.update(DEFAULTS)
    _in_time = "torch" not in sys.modules


def status() -> dict:
    """``OMP_WAIT_POLICY`` and ``GOMP_SPINCOUNT`` as set, who set them (``"twotower"``,
    ``"environment"``, or None: libgomp's ~3 ms spin) and whether in effect (False: twotower set
    them after PyTorch had loaded OpenMP)."""
    values = {name: os.environ.get(name) for name in VARIABLES}
    set_by = "twotower" if _in_time is not None else ("environment" if any(values.values()) else None)
    return {**values, "set_by": set_by, "in_effect": _in_time is not False}
