/* The fused softmax's one element-wise pass (training/losses.py), compiled: E = 2^(z + offset) in
 * place over a [rows, cols] float32 block (offset: one value per row), and each column's sum of E.
 *
 * PyTorch's exp2 followed by a sum reads the block twice (three times with the offset added
 * first); here one pass does all, with 2^x
 * computed as 2^round(x) (exponent bits) times a degree-7 polynomial for 2^f on [-1/2, 1/2]
 * (within a float32 ulp or two of exp2). Arguments below -126 give 0 (masked entries hold -inf),
 * so the result never holds a subnormal; arguments above 127 are taken as 127 (the caller keeps
 * them at or below 64: losses._row_shift). Without AVX2 and FMA at run time the scalar loop computes the same formula.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_X86 1
#endif

/* 2^f, f in [-1/2, 1/2]: Taylor coefficients of e^(f ln 2); the first term left out is below
 * 1e-8 relative at degree 7 */
#define C1 0.6931471805599453f
#define C2 0.2402265069591007f
#define C3 0.05550410866482158f
#define C4 0.009618129107628477f
#define C5 0.0013333558146428443f
#define C6 0.00015403530393381609f
#define C7 1.525273380405984e-05f

static inline float exp2_scalar(float x) {
    if (!(x >= -126.0f))
        return 0.0f; /* -inf (masked entries), and what would be subnormal */
    if (x > 127.0f)
        x = 127.0f;
    float n = nearbyintf(x), f = x - n;
    float p = C7;
    p = p * f + C6;
    p = p * f + C5;
    p = p * f + C4;
    p = p * f + C3;
    p = p * f + C2;
    p = p * f + C1;
    p = p * f + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static void rows_scalar(float *z, const float *offset, int64_t r0, int64_t r1, int64_t cols, float *sums) {
    for (int64_t r = r0; r < r1; r++) {
        float *row = z + r * cols, off = offset ? offset[r] : 0.0f;
        for (int64_t c = 0; c < cols; c++) {
            float e = exp2_scalar(row[c] + off);
            row[c] = e;
            sums[c] += e;
        }
    }
}

#ifdef HAVE_X86
__attribute__((target("avx2,fma"))) static inline __m256 exp2_avx2(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-126.0f);
    __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ); /* false for -inf and NaN */
    x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(127.0f));
    __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_sub_ps(x, n);
    __m256 p = _mm256_set1_ps(C7);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(C6));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(C5));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(C4));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(C3));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(C2));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(C1));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(bits)), keep);
}

__attribute__((target("avx2,fma"))) static void rows_avx2(float *z, const float *offset, int64_t r0, int64_t r1,
                                                          int64_t cols, float *sums) {
    int64_t vec = cols - cols % 8;
    for (int64_t r = r0; r < r1; r++) {
        float *row = z + r * cols, off = offset ? offset[r] : 0.0f;
        __m256 off8 = _mm256_set1_ps(off);
        for (int64_t c = 0; c < vec; c += 8) {
            __m256 e = exp2_avx2(_mm256_add_ps(_mm256_loadu_ps(row + c), off8));
            _mm256_storeu_ps(row + c, e);
            _mm256_storeu_ps(sums + c, _mm256_add_ps(_mm256_loadu_ps(sums + c), e));
        }
        for (int64_t c = vec; c < cols; c++) {
            float e = exp2_scalar(row[c] + off);
            row[c] = e;
            sums[c] += e;
        }
    }
}
#endif

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

/* exp2_colsum(z, rows, cols, sums, vectorised, offset): z[r, c] <- 2^(z[r, c] + offset[r]) (offset a
 * float32 [rows] pointer, or 0 for none); sums[cols] <- column sums. Rows are split between OpenMP
 * threads, each summing into its own buffer. */
static PyObject *exp2_colsum(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long z_ptr, sums_ptr, offset_ptr = 0;
    long long rows, cols;
    int vectorised;
    if (!PyArg_ParseTuple(args, "KLLKp|K", &z_ptr, &rows, &cols, &sums_ptr, &vectorised, &offset_ptr))
        return NULL;
    float *z = (float *)(uintptr_t)z_ptr, *sums = (float *)(uintptr_t)sums_ptr;
    const float *offset = (const float *)(uintptr_t)offset_ptr;
    int avx2 = vectorised && use_avx2();
    int threads = 1;
#ifdef _OPENMP
    if (rows * cols >= (1 << 16))
        threads = omp_get_max_threads();
#endif
    float *part = calloc((size_t)threads * (size_t)cols, sizeof(float));
    if (!part)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(threads)
    {
        int k = 0, T = 1;
#ifdef _OPENMP
        k = omp_get_thread_num();
        T = omp_get_num_threads();
#endif
        int64_t r0 = rows * k / T, r1 = rows * (k + 1) / T;
        float *mine = part + (int64_t)k * cols;
#ifdef HAVE_X86
        if (avx2)
            rows_avx2(z, offset, r0, r1, cols, mine);
        else
#endif
            rows_scalar(z, offset, r0, r1, cols, mine);
    }
    for (int64_t c = 0; c < cols; c++) {
        float s = 0.0f;
        for (int k = 0; k < threads; k++)
            s += part[(int64_t)k * cols + c];
        sums[c] = s;
    }
    Py_END_ALLOW_THREADS
    free(part);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"exp2_colsum", exp2_colsum, METH_VARARGS, "2^z in place over a float32 block, and its column sums."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_expsum", "The fused softmax's exp2 pass, compiled.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__expsum(void) { return PyModule_Create(&module); }
