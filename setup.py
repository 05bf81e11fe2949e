"""The compiled part of twotower: one optional C extension (everything else is in pyproject.toml).

``twotower.training._rowadam`` runs DeferredAdam's per-row passes. It is optional: where no C
compiler is found the install goes on without it and the optimizer takes its PyTorch path.
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "twotower.training._rowadam",
            sources=["src/twotower/training/_rowadam.c"],
            # -fno-math-errno lets sqrtf vectorise (the results are the same); strict C99 keeps
            # a * b + c unfused, as PyTorch's element-wise kernels compute it
            # OpenMP: two threads keep more of the scattered row reads in flight
            extra_compile_args=["-O3", "-std=c99", "-fno-math-errno", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]
)
