"""PyTorch's own MKL, for the compiled passes (``training/_softmax.c``, ``evaluation/_topk.c``).

They call single-threaded ``sgemm`` from several OpenMP threads at once, each on its own block:
on the 2-core CPU that runs the thin (K = 64) products of the loss and of full-catalog ranking
faster than two-threaded products one block at a time. Linking MKL again would mean a second copy
and a second thread pool; PyTorch's CPU library exports the Fortran entry points, so they are
looked up there.
"""
from __future__ import annotations

import ctypes
import functools
import os

import torch


@functools.cache
def mkl() -> tuple[int, int] | None:
    """Addresses of ``sgemm_`` and ``mkl_set_num_threads_local`` in PyTorch's CPU library; None where
    PyTorch was built without MKL (or its library is elsewhere): the callers then take their
    PyTorch paths."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        return tuple(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
                     for name in ("sgemm_", "mkl_set_num_threads_local"))
    except (OSError, AttributeError):  # pragma: no cover - depends on the PyTorch build
        return None
