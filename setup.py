"""The compiled part of twotower: three optional C extensions in ``twotower.native`` (everything else
is in pyproject.toml).

``_rowadam`` runs DeferredAdam's per-row passes; ``_softmax`` the fused softmax's block loop and its
exp2-and-sum pass; ``_topk`` full-catalog top-k without the score matrix (both with products by
PyTorch's own MKL, ``native/_blas.py``). All are optional: where no C compiler is found the install
goes on without them and the same computations take their PyTorch paths. Python reaches them only
through ``twotower/native/__init__.py`` (checked wrappers, one off switch: ``TWOTOWER_NATIVE=0``);
``twotower info`` says which are built and active.
"""
from setuptools import Extension, setup

# -fno-math-errno lets sqrtf vectorise (the results are the same); strict C99 keeps a * b + c
# unfused, as PyTorch's element-wise kernels compute it; OpenMP: two threads keep more of the
# scattered row reads in flight
FLAGS = dict(extra_compile_args=["-O3", "-std=c99", "-fno-math-errno", "-fopenmp"], extra_link_args=["-fopenmp"])

NATIVE = "src/twotower/native/_native.h"  # what the passes share


def native(name: str) -> Extension:
    return Extension(f"twotower.native.{name}", sources=[f"src/twotower/native/{name}.c"], depends=[NATIVE],
                     optional=True, **FLAGS)


setup(ext_modules=[native("_rowadam"), native("_softmax"), native("_topk")])
