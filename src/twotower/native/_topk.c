/* Full-catalog top-k, compiled (evaluation/ranking.py): scores and selection in one pass per block
 * of users, the [users, items] score matrix never written whole.
 *
 * PyTorch's path writes a [1024, n_items] score block (168 MB for Gowalla's 40,981 items), then
 * reads it again in topk: 4.5 s for Gowalla's test ranking on the 2-core CPU, the product at
 * ~55 GFLOP/s. Here each thread takes USERS users at a time and walks the items in chunks of
 * ITEMS: a single-threaded MKL product writes the chunk's scores, which stay in the core's cache
 * while the excluded items are set to -inf and each user's running top-k (a min-heap) takes the
 * few scores above its current k-th best. Ties go to the lower item index, so the result does not
 * depend on the chunking.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "_native.h"


/* 128 x 1024 scores (512 KB) per thread: on the 2-core CPU, Gowalla's test ranking took 1.67 s
 * against 2.1 s at 32 x 2048 and 1.87 s at 96 x 1024 (thin products run faster with more users
 * per call) */
#ifndef USERS
#define USERS 128
#endif
#ifndef ITEMS
#define ITEMS 1024
#endif

/* a entry ranks below b: a lower score, or the same score at a higher item index */
static inline int below(float av, int64_t ai, float bv, int64_t bi) { return av < bv || (av == bv && ai > bi); }

static inline void swap(float *val, int64_t *idx, int64_t a, int64_t b) {
    float tv = val[a];
    int64_t ti = idx[a];
    val[a] = val[b];
    idx[a] = idx[b];
    val[b] = tv;
    idx[b] = ti;
}

/* restore the min-heap (worst entry at the root) below position i */
static void sift_down(float *val, int64_t *idx, int64_t n, int64_t i) {
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, w = i;
        if (l < n && below(val[l], idx[l], val[w], idx[w]))
            w = l;
        if (r < n && below(val[r], idx[r], val[w], idx[w]))
            w = r;
        if (w == i)
            return;
        swap(val, idx, i, w);
        i = w;
    }
}

static void push(float *val, int64_t *idx, int64_t n, float v, int64_t j) { /* heap of n, room for n + 1 */
    int64_t i = n;
    val[i] = v;
    idx[i] = j;
    while (i > 0) {
        int64_t p = (i - 1) / 2;
        if (!below(val[i], idx[i], val[p], idx[p]))
            return;
        swap(val, idx, i, p);
        i = p;
    }
}

/* a better entry takes the worst one's place in a full heap of k */
static inline void replace_worst(float *val, int64_t *idx, int64_t k, float v, int64_t j) {
    val[0] = v;
    idx[0] = j;
    sift_down(val, idx, k, 0);
}

/* heap of k -> best first: repeatedly move the worst to the end */
static void sort_heap(float *val, int64_t *idx, int64_t n) {
    for (int64_t end = n - 1; end > 0; end--) {
        swap(val, idx, 0, end);
        sift_down(val, idx, end, 0);
    }
}

/* One user's chunk of scores (items c0 .. c0 + nc - 1) into its heap of h entries (k at most):
 * the first k items fill it, then only a score above the k-th best enters (items come in
 * ascending order, so an equal score loses the tie). Returns the heap's new size. */
static int64_t scan_scalar(const float *row, int nc, int64_t c0, float *val, int64_t *idx, int64_t h, int64_t k) {
    int j = 0;
    for (; j < nc && h < k; j++)
        push(val, idx, h++, row[j], c0 + j);
    for (; j < nc; j++)
        if (row[j] > val[0])
            replace_worst(val, idx, k, row[j], c0 + j);
    return h;
}

#ifdef HAVE_X86
/* the same, comparing eight scores at a time with the k-th best: most chunks of eight have none
 * above it once the heap holds good items */
__attribute__((target("avx2"))) static int64_t scan_avx2(const float *row, int nc, int64_t c0, float *val,
                                                         int64_t *idx, int64_t h, int64_t k) {
    int j = 0;
    for (; j < nc && h < k; j++)
        push(val, idx, h++, row[j], c0 + j);
    __m256 worst = _mm256_set1_ps(val[0]);
    for (; j + 8 <= nc; j += 8) {
        int above = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + j), worst, _CMP_GT_OQ));
        while (above) {
            int l = __builtin_ctz(above);
            above &= above - 1;
            if (row[j + l] > val[0]) /* the k-th best may have risen within these eight */
                replace_worst(val, idx, k, row[j + l], c0 + j + l);
            worst = _mm256_set1_ps(val[0]);
        }
    }
    for (; j < nc; j++)
        if (row[j] > val[0])
            replace_worst(val, idx, k, row[j], c0 + j);
    return h;
}
#endif

/* top_k(sgemm, threads_local, threads, vectorised, users, n, items, m, d, bias, rows, indptr, indices, k, values,
 *       index)
 *
 * users [n, d] and items [m, d] float32; bias [m] float32 or 0 (added to every user's scores);
 * rows [n] int64, the CSR row of each user in (indptr, indices), the items to exclude (int64;
 * all three 0 for none); values [n, k] float32 and index [n, k] int64 receive each user's k best
 * items by score <users_u, items_j> + bias_j, best first. vectorised: the AVX2 scan where the CPU
 * has it (the same result). */
static PyObject *top_k(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long f_sgemm, f_local, p_u, p_v, p_bias, p_rows, p_ptr, p_idx, p_val, p_out;
    long long n, m, d, k;
    int threads, vectorised;
    if (!PyArg_ParseTuple(args, "KKipKLKLLKKKKLKK", &f_sgemm, &f_local, &threads, &vectorised, &p_u, &n, &p_v, &m, &d,
                          &p_bias, &p_rows, &p_ptr, &p_idx, &k, &p_val, &p_out))
        return NULL;
    if (!f_sgemm || !f_local || n <= 0 || m <= 0 || d <= 0 || k <= 0 || k > m || d > INT_MAX || threads <= 0) {
        PyErr_SetString(PyExc_ValueError, "top_k: sizes must be positive, k at most the item count, and both BLAS "
                                          "entry points given");
        return NULL;
    }
    sgemm_fn sgemm = (sgemm_fn)(uintptr_t)f_sgemm;
    threads_local_fn threads_local = (threads_local_fn)(uintptr_t)f_local;
    const float *U = (const float *)(uintptr_t)p_u, *V = (const float *)(uintptr_t)p_v;
    const float *bias = (const float *)(uintptr_t)p_bias;
    const int64_t *rows = (const int64_t *)(uintptr_t)p_rows, *indptr = (const int64_t *)(uintptr_t)p_ptr;
    const int64_t *indices = (const int64_t *)(uintptr_t)p_idx;
    float *values = (float *)(uintptr_t)p_val;
    int64_t *index = (int64_t *)(uintptr_t)p_out;
    int64_t blocks = (n + USERS - 1) / USERS;
    if (threads > blocks)
        threads = (int)blocks;
#ifndef _OPENMP
    threads = 1;
#endif
    int avx2 = vectorised && use_avx2();
    float *buf = malloc(sizeof(float) * (size_t)threads * USERS * ITEMS);
    if (!buf)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(threads)
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        float *s = buf + (size_t)t * USERS * ITEMS;
        int one_thread = 1, before = threads_local(&one_thread);
        const int di = (int)d;
        const float one = 1.0f, zero = 0.0f;
        int64_t filled[USERS];
        for (int64_t b = t; b < blocks; b += threads) {
            int64_t u0 = b * USERS;
            int nu = (int)(u0 + USERS <= n ? USERS : n - u0);
            for (int u = 0; u < nu; u++)
                filled[u] = 0;
            for (int64_t c0 = 0; c0 < m; c0 += ITEMS) {
                int nc = (int)(c0 + ITEMS <= m ? ITEMS : m - c0);
                /* s[u * nc + j] = <users_{u0+u}, items_{c0+j}>: column-major [nc, nu] is row-major [nu, nc] */
                sgemm("T", "N", &nc, &nu, &di, &one, V + c0 * d, &di, U + u0 * d, &di, &zero, s, &nc);
                for (int u = 0; u < nu; u++) {
                    float *row = s + (int64_t)u * nc, *val = values + (u0 + u) * k;
                    int64_t *idx = index + (u0 + u) * k;
                    if (bias)
                        for (int j = 0; j < nc; j++)
                            row[j] += bias[c0 + j];
                    if (rows)
                        for (int64_t e = indptr[rows[u0 + u]]; e < indptr[rows[u0 + u] + 1]; e++)
                            if (indices[e] >= c0 && indices[e] < c0 + nc)
                                row[indices[e] - c0] = -INFINITY;
                    int64_t h = filled[u];
#ifdef HAVE_X86
                    if (avx2)
                        h = scan_avx2(row, nc, c0, val, idx, h, k);
                    else
#endif
                        h = scan_scalar(row, nc, c0, val, idx, h, k);
                    filled[u] = h;
                }
            }
            for (int u = 0; u < nu; u++)
                sort_heap(values + (u0 + u) * k, index + (u0 + u) * k, k);
        }
        threads_local(&before);
    }
    Py_END_ALLOW_THREADS
    free(buf);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    CPU_FEATURES_METHOD,
    {"top_k", top_k, METH_VARARGS, "Each user's k best items over the whole catalog (see the source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_topk", "Full-catalog top-k, compiled.", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__topk(void) { return PyModule_Create(&module); }
