"""PyTorch's own MKL, for the compiled passes (``_softmax.c``, ``_topk.c``).

They call single-threaded ``sgemm`` from several OpenMP threads at once, each on its own block:
on the 2-core CPU that runs the thin (K = 64) products of the loss and of full-catalog ranking
faster than two-threaded products one block at a time. Linking MKL again would mean a second copy
and a second thread pool; PyTorch's CPU library exports the Fortran entry points, so they are
looked up there. That is not a public interface of PyTorch: on a build without them the lookup
finds nothing, the two kernels stay off, and ``twotower info`` says so.
"""
from __future__ import annotations

import ctypes
import functools
import os

import torch

ENTRY_POINTS = ("sgemm_", "mkl_set_num_threads_local")


def library_path() -> str:
    return os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")


@functools.cache
def lookup() -> dict[str, int | None]:
    """The address of each of ``ENTRY_POINTS`` in PyTorch's CPU library (None where not found:
    PyTorch built without MKL, or its library elsewhere)."""
    found: dict[str, int | None] = dict.fromkeys(ENTRY_POINTS)
    if not torch.backends.mkl.is_available():
        return found
    try:
        lib = ctypes.CDLL(library_path())
    except OSError:  # pragma: no cover - depends on the PyTorch build
        return found
    for name in ENTRY_POINTS:
        try:
            found[name] = ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
        except AttributeError:  # pragma: no cover - depends on the PyTorch build
            pass
    return found


def mkl() -> tuple[int, int] | None:
    """``(sgemm_, mkl_set_num_threads_local)``, or None unless both were found."""
    found = lookup()
    return None if None in found.values() else tuple(found[name] for name in ENTRY_POINTS)
