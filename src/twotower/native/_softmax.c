/* The fused softmax (training/losses.py), compiled: its element-wise pass on its own, and its whole
 * block loop with the three score products run by PyTorch's MKL.
 *
 * exp2_colsum: E = 2^(z + offset) in place over a [rows, cols] float32 block (offset: one value per
 * row), and each column's sum of E. PyTorch's exp2 followed by a sum reads the block twice (three
 * times with the offset added first); here one pass does all, with 2^x computed as 2^round(x)
 * (exponent bits) times a degree-7 polynomial for 2^f on [-1/2, 1/2] (within a float32 ulp or two
 * of exp2). Arguments below -126 give 0 (masked entries hold -inf), so the result never holds a
 * subnormal; arguments above 127 are taken as 127 (the caller keeps them at or below 64:
 * losses._row_shift). Without AVX2 and FMA at run time the scalar loop computes the same formula.
 *
 * forward: losses._SharedSoftmax.forward's loop over blocks of rows, the blocks shared out between
 * OpenMP threads, each thread running its blocks' products as single-threaded MKL sgemm calls.
 * On the 2-core CPU the same products run ~35 % faster this way than as two-threaded MKL calls
 * on one block at a time: no fork and join per product, and a block small enough for one core's
 * cache (losses.py has the measurement).
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

/* Rows r0..r1 of a [rows, cols] block: z <- 2^((z - col_shift[c]) + offset[r]), sums[c] += z. The
 * shift (one per column, or NULL) is subtracted first, as PyTorch's path does. */
static void rows_scalar(float *z, const float *offset, const float *col_shift, int64_t r0, int64_t r1, int64_t cols,
                        float *sums) {
    for (int64_t r = r0; r < r1; r++) {
        float *row = z + r * cols, off = offset ? offset[r] : 0.0f;
        for (int64_t c = 0; c < cols; c++) {
            float e = exp2_scalar((col_shift ? row[c] - col_shift[c] : row[c]) + off);
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

__attribute__((target("avx2,fma"))) static void rows_avx2(float *z, const float *offset, const float *col_shift,
                                                          int64_t r0, int64_t r1, int64_t cols, float *sums) {
    int64_t vec = cols - cols % 8;
    for (int64_t r = r0; r < r1; r++) {
        float *row = z + r * cols, off = offset ? offset[r] : 0.0f;
        __m256 off8 = _mm256_set1_ps(off);
        for (int64_t c = 0; c < vec; c += 8) {
            __m256 x = _mm256_loadu_ps(row + c);
            if (col_shift)
                x = _mm256_sub_ps(x, _mm256_loadu_ps(col_shift + c));
            __m256 e = exp2_avx2(_mm256_add_ps(x, off8));
            _mm256_storeu_ps(row + c, e);
            _mm256_storeu_ps(sums + c, _mm256_add_ps(_mm256_loadu_ps(sums + c), e));
        }
        for (int64_t c = vec; c < cols; c++) {
            float e = exp2_scalar((col_shift ? row[c] - col_shift[c] : row[c]) + off);
            row[c] = e;
            sums[c] += e;
        }
    }
}
#endif

static void rows_exp2(int avx2, float *z, const float *offset, const float *col_shift, int64_t r0, int64_t r1,
                      int64_t cols, float *sums) {
#ifdef HAVE_X86
    if (avx2) {
        rows_avx2(z, offset, col_shift, r0, r1, cols, sums);
        return;
    }
#endif
    (void)avx2;
    rows_scalar(z, offset, col_shift, r0, r1, cols, sums);
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
        rows_exp2(avx2, z, offset, NULL, r0, r1, cols, mine);
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


static int64_t lower_bound(const int64_t *a, int64_t n, int64_t x) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (a[mid] < x)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* |x|^2 over d floats, in double, in eight independent sums (one running sum would be a chain of
 * dependent additions, ~4x slower) */
static double squared_norm(const float *x, int64_t d) {
    double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    int64_t j = 0;
    for (; j + 8 <= d; j += 8)
        for (int l = 0; l < 8; l++)
            acc[l] += (double)x[j + l] * (double)x[j + l];
    for (; j < d; j++)
        acc[0] += (double)x[j] * (double)x[j];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* row_shift(q2, B, d, v, C, offset2, shift) -> 0, 1 or 2: losses._row_shift in one pass. Writes
 * shift[B], a shift m_b per row such that every base-2 logit z2[b, c] - m_b = <q2_b, v_c> +
 * offset2[c] - m_b lies within [LO, HI], from the bound |<q2_b, v_c>| <= |q2_b| max_c |v_c|;
 * returns 2 if some m_b is not 0, 1 if all are, 0 if some row's bound spreads wider than HI - LO
 * (or is not finite): then no shift is safe and the caller takes the row maxima. */
static PyObject *row_shift(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long p_q2, p_v, p_off, p_shift;
    long long B, d, C;
    double LO, HI;
    if (!PyArg_ParseTuple(args, "KLLKLKKdd", &p_q2, &B, &d, &p_v, &C, &p_off, &p_shift, &LO, &HI))
        return NULL;
    const float *q2 = (const float *)(uintptr_t)p_q2, *v = (const float *)(uintptr_t)p_v;
    const float *off = (const float *)(uintptr_t)p_off;
    float *shift = (float *)(uintptr_t)p_shift;
    int status = 1;
    Py_BEGIN_ALLOW_THREADS
    double vmax = 0.0, omin = 0.0, omax = 0.0;
    for (int64_t c = 0; c < C; c++) {
        double n = squared_norm(v + c * d, d);
        if (n > vmax)
            vmax = n;
        if (off) {
            if (c == 0 || off[c] < omin)
                omin = off[c];
            if (c == 0 || off[c] > omax)
                omax = off[c];
        }
    }
    vmax = sqrt(vmax);
    for (int64_t b = 0; b < B && status; b++) {
        double reach = sqrt(squared_norm(q2 + b * d, d)) * vmax, lo = omin - reach, hi = omax + reach;
        if (!isfinite(hi) || !isfinite(lo) || hi - lo > HI - LO) {
            status = 0;
        } else if (hi <= HI && lo >= LO) {
            shift[b] = 0.0f;
        } else {
            shift[b] = (float)(hi - HI);
            status = 2;
        }
    }
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(status);
}

/* Rows that can share one score row: equal query ids (so equal queries: the caller says so), no
 * positive shift, no excluded coordinate, no per-row columns. Their logits are then the same for
 * every column, so are E and its sums; only the targets differ. Fills group[B] (each row's group,
 * numbered in order of first row) and returns the number of groups; with no ids, every row is
 * its own group. */
static int64_t query_groups(const int64_t *ids, const float *pos, const int64_t *hit_rows, int64_t n_hits, int64_t B,
                            int64_t *group, int64_t *scratch) {
    if (!ids) {
        for (int64_t b = 0; b < B; b++)
            group[b] = b;
        return B;
    }
    /* open addressing on the ids of mergeable rows: a table of 2^k slots, k the least with 2^k >= 2B */
    int64_t size = 1;
    while (size < 2 * B)
        size <<= 1;
    int64_t *slot_row = scratch; /* first row of the id in this slot, or -1 */
    for (int64_t i = 0; i < size; i++)
        slot_row[i] = -1;
    char *lone = (char *)(scratch + size); /* rows that must stay alone */
    memset(lone, 0, (size_t)B);
    for (int64_t h = 0; h < n_hits; h++)
        lone[hit_rows[h]] = 1;
    int64_t groups = 0;
    for (int64_t b = 0; b < B; b++) {
        if (lone[b] || (pos && pos[b] != 0.0f)) {
            group[b] = groups++;
            continue;
        }
        uint64_t hsh = (uint64_t)ids[b] * 0x9E3779B97F4A7C15ull;
        int64_t i = (int64_t)(hsh >> 20) & (size - 1);
        while (slot_row[i] >= 0 && ids[slot_row[i]] != ids[b])
            i = (i + 1) & (size - 1);
        if (slot_row[i] < 0) {
            slot_row[i] = b;
            group[b] = groups++;
        } else {
            group[b] = group[slot_row[i]];
        }
    }
    return groups;
}

/* forward(sgemm, threads_local, threads, block, vectorised,
 *         v, C, q2, q, B, d,
 *         offset2, shift, target, positive_shift2, hit_rows, hit_cols, n_hits, extra_sum, query_ids,
 *         grad_q, grad_v, grad_offset, denom) -> the sum of the rows' losses in base 2
 *
 * Pointers are addresses of contiguous float32 (int64 for target, hits and ids) arrays; 0 for an
 * absent optional one (offset2 [C], shift [B], positive_shift2 [B], extra_sum [B], query_ids [B],
 * grad_offset [C]). In base-2 units, with row b's shift m_b (losses._row_shift):
 *
 *   z[b, c]        = <q2_b, v_c>,  less positive_shift2[b] at c = target[b]; -inf at the hits
 *   z_target[b]    = z[b, target[b]] + offset2[target[b]]
 *   E[b, c]        = 2^((z[b, c] - m_b) + offset2[c]),   denom[b] = sum_c E[b, c] + extra_sum[b]
 *   grad_q[b]      = ((E @ v)[b] - v[target[b]] denom[b]) / denom[b]
 *   grad_v         = E^T @ (q / denom) - sum_{b: target[b] = c} (q_b / denom_b) denom_b
 *   grad_offset[c] = sum_b E[b, c] / denom[b] - sum_{b: target[b] = c} (1 / denom_b) denom_b
 *
 * Rows of a query group (query_groups) are scored once: their shared row of E enters grad_v and
 * grad_offset with weight k / denom for k rows, and each row takes its own target's terms. Groups
 * are processed in blocks of `block`, the blocks going to the threads round-robin (block i to
 * thread i % threads), each thread summing its grad_v and grad_offset into its own buffer; the
 * buffers are added in thread order. The same thread count gives the same sums, run after run. */
static PyObject *forward(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long f_sgemm, f_local, p_v, p_q2, p_q, p_off, p_shift, p_target, p_pos, p_hr, p_hc, p_xsum, p_ids;
    unsigned long long p_gq, p_gv, p_goff, p_denom;
    long long C, B, d, block, n_hits;
    int threads, vectorised;
    if (!PyArg_ParseTuple(args, "KKiLpKLKKLLKKKKKKLKKKKKK", &f_sgemm, &f_local, &threads, &block, &vectorised, &p_v,
                          &C, &p_q2, &p_q, &B, &d, &p_off, &p_shift, &p_target, &p_pos, &p_hr, &p_hc, &n_hits, &p_xsum,
                          &p_ids, &p_gq, &p_gv, &p_goff, &p_denom))
        return NULL;
    if (!f_sgemm || !f_local || C <= 0 || B <= 0 || d <= 0 || block <= 0 || threads <= 0 || C * block > INT_MAX ||
        C * d > INT_MAX || B * d > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "forward: sizes must be positive, their products below 2^31, and both "
                                          "BLAS entry points given");
        return NULL;
    }
    sgemm_fn sgemm = (sgemm_fn)(uintptr_t)f_sgemm;
    threads_local_fn threads_local = (threads_local_fn)(uintptr_t)f_local;
    const float *v = (const float *)(uintptr_t)p_v, *q2_rows = (const float *)(uintptr_t)p_q2;
    const float *q_rows = (const float *)(uintptr_t)p_q, *off = (const float *)(uintptr_t)p_off;
    const float *shift = (const float *)(uintptr_t)p_shift, *pos = (const float *)(uintptr_t)p_pos;
    const float *xsum = (const float *)(uintptr_t)p_xsum;
    const int64_t *target = (const int64_t *)(uintptr_t)p_target, *ids = (const int64_t *)(uintptr_t)p_ids;
    const int64_t *hit_rows = (const int64_t *)(uintptr_t)p_hr, *hit_cols = (const int64_t *)(uintptr_t)p_hc;
    float *grad_q = (float *)(uintptr_t)p_gq, *grad_v = (float *)(uintptr_t)p_gv;
    float *grad_off = (float *)(uintptr_t)p_goff, *denom = (float *)(uintptr_t)p_denom;
    int avx2 = vectorised && use_avx2();
    if (xsum) /* per-row columns: no two rows share a softmax */
        ids = NULL;

    /* the groups: each row's group, and each group's rows (CSR, in row order) */
    int64_t table = 1;
    while (table < 2 * B)
        table <<= 1;
    int64_t *index = malloc(sizeof(int64_t) * (size_t)(3 * B + 1 + n_hits + table) + (size_t)B);
    if (!index)
        return PyErr_NoMemory();
    int64_t *group = index, *start = index + B, *rows = start + B + 1, *hit_groups = rows + B;
    int64_t G = query_groups(ids, pos, hit_rows, n_hits, B, group, hit_groups + n_hits);
    memset(start, 0, sizeof(int64_t) * (size_t)(G + 1));
    for (int64_t b = 0; b < B; b++)
        start[group[b] + 1]++;
    for (int64_t g = 0; g < G; g++)
        start[g + 1] += start[g];
    for (int64_t b = 0; b < B; b++) /* filled in row order, each group's start advancing to its end */
        rows[start[group[b]]++] = b;
    for (int64_t g = G; g > 0; g--) /* and moved back */
        start[g] = start[g - 1];
    start[0] = 0;
    /* rows with hits are alone, so their groups ascend as their rows do */
    for (int64_t h = 0; h < n_hits; h++)
        hit_groups[h] = group[hit_rows[h]];

    int64_t blocks = (G + block - 1) / block;
    if (threads > blocks)
        threads = (int)blocks;
#ifndef _OPENMP
    threads = 1;
#endif
    /* Shared: the groups' queries, contiguous (copies only where rows were merged). Per thread: the
     * block's scores [C, block], (E @ v) and q / denom [block, d], the sums, 1 / sums, the
     * weights k / sums and the shifts, and its share of grad_v [C, d] and grad_offset [C]; then
     * each row's one-hot part of grad_v. */
    size_t at_gv = (size_t)C * block + 2 * (size_t)block * d + 4 * (size_t)block, at_goff = at_gv + (size_t)C * d;
    size_t per = at_goff + (grad_off ? (size_t)C : 0);
    size_t shared = G < B ? 2 * (size_t)G * d : 0;
    float *work = malloc(sizeof(float) * ((size_t)threads * per + (size_t)B * (d + 1) + shared));
    if (!work) {
        free(index);
        return PyErr_NoMemory();
    }
    float *hit_q = work + (size_t)threads * per, *z_target = hit_q + (size_t)B * d;
    const float *q2 = q2_rows, *q = q_rows;
    if (G < B) {
        float *q2g = z_target + B, *qg = q2g + (size_t)G * d;
        for (int64_t g = 0; g < G; g++) {
            memcpy(q2g + g * d, q2_rows + rows[start[g]] * d, sizeof(float) * (size_t)d);
            memcpy(qg + g * d, q_rows + rows[start[g]] * d, sizeof(float) * (size_t)d);
        }
        q2 = q2g;
        q = qg;
    }
    double total = 0.0;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(threads)
    {
        int k = 0;
#ifdef _OPENMP
        k = omp_get_thread_num();
#endif
        float *zt = work + (size_t)k * per, *eq = zt + (size_t)C * block, *w = eq + (size_t)block * d;
        float *sums = w + (size_t)block * d, *inv = sums + block, *weight = inv + block;
        float *row_shift = shift ? weight + block : NULL, *gv = zt + at_gv, *goff = zt + at_goff;
        memset(gv, 0, sizeof(float) * (per - at_gv));
        int one_thread = 1, before = threads_local(&one_thread);
        const int Ci = (int)C, di = (int)d, unit = 1;
        const float one = 1.0f, zero = 0.0f;
        for (int64_t i = k; i < blocks; i += threads) {
            int64_t s = i * block;
            int n = (int)(s + block <= G ? block : G - s);
            /* zt[c * n + u] = <v_c, q2_{s+u}>: column-major [n, C] is row-major [C, n] */
            sgemm("T", "N", &n, &Ci, &di, &one, q2 + s * d, &di, v, &di, &zero, zt, &n);
            for (int u = 0; u < n; u++) {
                for (int64_t r = start[s + u]; r < start[s + u + 1]; r++) {
                    int64_t b = rows[r], t = target[b];
                    float *zp = zt + t * n + u;
                    if (pos) /* 0 in a group of several rows */
                        *zp -= pos[b];
                    z_target[b] = off ? *zp + off[t] : *zp;
                }
                if (row_shift)
                    row_shift[u] = shift[rows[start[s + u]]];
            }
            if (n_hits) {
                int64_t h0 = lower_bound(hit_groups, n_hits, s), h1 = lower_bound(hit_groups, n_hits, s + n);
                for (int64_t h = h0; h < h1; h++)
                    zt[hit_cols[h] * n + (hit_groups[h] - s)] = -INFINITY;
            }
            memset(sums, 0, sizeof(float) * (size_t)n);
            rows_exp2(avx2, zt, off, row_shift, 0, C, n, sums);
            for (int u = 0; u < n; u++) {
                int64_t first = start[s + u], count = start[s + u + 1] - first;
                float den = xsum ? sums[u] + xsum[rows[first]] : sums[u];
                sums[u] = den;
                inv[u] = 1.0f / den;
                weight[u] = inv[u] * (float)count;
            }
            sgemm("N", "T", &di, &n, &Ci, &one, v, &di, zt, &n, &zero, eq, &di); /* eq[u] = (E^T v)[u] */
            for (int u = 0; u < n; u++) {
                const float *qu = q + (s + u) * d, *e = eq + (int64_t)u * d;
                float den = sums[u], iv = inv[u], *wu = w + (int64_t)u * d;
                for (int64_t j = 0; j < d; j++)
                    wu[j] = qu[j] * iv;
                for (int64_t r = start[s + u]; r < start[s + u + 1]; r++) {
                    int64_t b = rows[r];
                    const float *vt = v + target[b] * d;
                    float *g = grad_q + b * d, *hq = hit_q + b * d;
                    denom[b] = den;
                    for (int64_t j = 0; j < d; j++) {
                        g[j] = (e[j] - vt[j] * den) * iv;
                        hq[j] = wu[j] * den;
                    }
                }
                if (start[s + u + 1] - start[s + u] > 1)
                    for (int64_t j = 0; j < d; j++)
                        wu[j] *= (float)(start[s + u + 1] - start[s + u]);
            }
            sgemm("N", "N", &di, &Ci, &n, &one, w, &di, zt, &n, &one, gv, &di); /* gv += E (k q / denom) */
            if (grad_off)
                sgemm("N", "N", &unit, &Ci, &n, &one, weight, &unit, zt, &n, &one, goff, &unit); /* goff += E^T k/den */
        }
        threads_local(&before);
        /* the threads' shares of grad_v added, each thread a slice, in thread order */
#pragma omp barrier
        for (int64_t j = C * d * k / threads, j1 = C * d * (k + 1) / threads; j < j1; j++) {
            float acc = 0.0f;
            for (int t = 0; t < threads; t++)
                acc += work[(size_t)t * per + at_gv + j];
            grad_v[j] = acc;
        }
    }
    for (int64_t b = 0; b < B; b++) {
        float *g = grad_v + target[b] * d;
        const float *hq = hit_q + b * d;
        for (int64_t j = 0; j < d; j++)
            g[j] -= hq[j];
    }
    if (grad_off) {
        for (int64_t c = 0; c < C; c++) {
            float acc = 0.0f;
            for (int k = 0; k < threads; k++)
                acc += work[(size_t)k * per + at_goff + c];
            grad_off[c] = acc;
        }
        for (int64_t b = 0; b < B; b++)
            grad_off[target[b]] -= (1.0f / denom[b]) * denom[b];
    }
    /* row b's loss, ln(sum_c e^z) - z_target, is (log2(denom_b) + m_b - z2_target) ln 2 */
    for (int64_t b = 0; b < B; b++)
        total += (double)(log2f(denom[b]) + (shift ? shift[b] : 0.0f) - z_target[b]);
    Py_END_ALLOW_THREADS
    free(work);
    free(index);
    return PyFloat_FromDouble(total);
}

static PyMethodDef methods[] = {
    CPU_FEATURES_METHOD,
    {"exp2_colsum", exp2_colsum, METH_VARARGS, "2^z in place over a float32 block, and its column sums."},
    {"forward", forward, METH_VARARGS, "The fused softmax's block loop: loss terms and gradients (see the source)."},
    {"row_shift", row_shift, METH_VARARGS, "A safe exp2 shift per row from a Cauchy-Schwarz bound (see the source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_softmax", "The fused softmax's block loop, compiled.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__softmax(void) { return PyModule_Create(&module); }
