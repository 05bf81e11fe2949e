/* What the compiled passes share: the BLAS entry points they call (found by the caller in
 * PyTorch's own library: twotower/native/_blas.py), the run-time check for the AVX2 + FMA loops,
 * and the module function that reports that check (twotower info). */
#ifndef TWOTOWER_NATIVE_H
#define TWOTOWER_NATIVE_H

#include <Python.h>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_X86 1
#endif

/* Fortran sgemm (column-major, arguments by reference), and MKL's thread count for the calling
 * thread only */
typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *, const int *);
typedef int (*threads_local_fn)(const int *);

/* whether this CPU runs AVX2 and FMA instructions (checked once) */
static inline int use_avx2(void) {
#ifdef HAVE_X86
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
    return cached;
#else
    return 0;
#endif
}

/* cpu_features() -> (avx2, fma): what this CPU runs, as the compiled loops see it at run time */
static PyObject *cpu_features(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
#ifdef HAVE_X86
    __builtin_cpu_init();
    return Py_BuildValue("(OO)", __builtin_cpu_supports("avx2") ? Py_True : Py_False,
                         __builtin_cpu_supports("fma") ? Py_True : Py_False);
#else
    return Py_BuildValue("(OO)", Py_False, Py_False);
#endif
}
#define CPU_FEATURES_METHOD {"cpu_features", cpu_features, METH_NOARGS, "(avx2, fma) as the compiled loops see them."}

#endif
