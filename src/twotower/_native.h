/* What the compiled passes share: the BLAS entry points they call (found by the caller in
 * PyTorch's own library: twotower/_blas.py) and the run-time check for the AVX2 + FMA loops. */
#ifndef TWOTOWER_NATIVE_H
#define TWOTOWER_NATIVE_H

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
static int use_avx2(void) {
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

#endif
