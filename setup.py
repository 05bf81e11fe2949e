"""The compiled part of twotower: three optional C extensions (everything else is in pyproject.toml).

``twotower.training._rowadam`` runs DeferredAdam's per-row passes; ``twotower.training._softmax``
the fused softmax's block loop and its exp2-and-sum pass; ``twotower.evaluation._topk`` full-catalog
top-k without the score matrix (both with products by PyTorch's own MKL, ``twotower/_blas.py``).
All are optional: where no C compiler is found the install goes on without them and the same
computations take their PyTorch paths.
"""
from setuptools import Extension, setup

# -fno-math-errno lets sqrtf vectorise (the results are the same); strict C99 keeps a * b + c
# unfused, as PyTorch's element-wise kernels compute it; OpenMP: two threads keep more of the
# scattered row reads in flight
FLAGS = dict(extra_compile_args=["-O3", "-std=c99", "-fno-math-errno", "-fopenmp"], extra_link_args=["-fopenmp"])

NATIVE = "src/twotower/_native.h"  # what the two passes that call MKL share

setup(
    ext_modules=[
        Extension("twotower.training._rowadam", sources=["src/twotower/training/_rowadam.c"], optional=True, **FLAGS),
        Extension("twotower.training._softmax", sources=["src/twotower/training/_softmax.c"], depends=[NATIVE],
                  optional=True, **FLAGS),
        Extension("twotower.evaluation._topk", sources=["src/twotower/evaluation/_topk.c"], depends=[NATIVE],
                  optional=True, **FLAGS),
    ]
)
