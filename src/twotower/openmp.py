"""OpenMP's wait policy for this process, chosen before PyTorch loads its OpenMP runtime.

PyTorch's CPU operators, MKL inside them and the compiled kernels (``twotower.native``) share one
OpenMP runtime, GNU libgomp. Without ``OMP_WAIT_POLICY`` a libgomp thread that waits for the others
(at the end of every parallel operator) spins for about 3 ms before it sleeps. On a machine that
runs other work the thread it waits for is often off the CPU for a whole time slice, while the
spinning one keeps a core from it: each of the thousands of small parallel operators of an
epoch then costs milliseconds. ``PASSIVE`` sleeps at once: a loaded machine costs about its share
of the cores. Measured (``benchmarks/busy_machine.py``, docs/benchmarks.md "A busy machine").

``import twotower`` sets ``OMP_WAIT_POLICY=PASSIVE`` unless ``OMP_WAIT_POLICY`` or
``GOMP_SPINCOUNT`` is already set (a choice made in the environment wins). libgomp reads its
environment once, when it is loaded: the setting takes effect where twotower is imported before
torch (the ``twotower`` command always is); ``status()`` (and ``twotower info``) says whether it did.
"""
from __future__ import annotations

import os
import sys

DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}
_USER_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
_applied: dict[str, bool] = {}  # variable -> whether set before PyTorch (so OpenMP) was loaded


def apply_defaults() -> None:
    """Set ``DEFAULTS`` in the environment unless the user chose a wait policy (idempotent)."""
    if any(name in os.environ for name in _USER_VARS):
        return
    loaded = "torch" in sys.modules
    for name, value in DEFAULTS.items():
        os.environ[name] = value
        _applied[name] = not loaded


def status() -> dict:
    """The wait policy in the environment, who set it (``"twotower"``, ``"environment"`` or None:
    libgomp's spinning default) and whether it is in effect (False: twotower set it after PyTorch
    had loaded OpenMP)."""
    policy = os.environ.get("OMP_WAIT_POLICY")
    by_us = "OMP_WAIT_POLICY" in _applied
    return {"OMP_WAIT_POLICY": policy, "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT"),
            "set_by": "twotower" if by_us else ("environment" if policy or "GOMP_SPINCOUNT" in os.environ else None),
            "in_effect": _applied.get("OMP_WAIT_POLICY", True)}
