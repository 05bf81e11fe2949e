/* DeferredAdam's two per-row passes (training/optim.py), compiled.
 *
 * The PyTorch path spends ~30 tensor operations per table per step on ~2,000 rows, each with its
 * own dispatch and its own pass over the rows. Here each pass is one loop that reads a row's clock,
 * moments and values once, with the next rows prefetched (they are scattered over tables larger
 * than the cache) and the per-row powers looked up in tables built once per call. The formulas are
 * DeferredAdam's, in the same float32/float64 split; the PyTorch path remains the reference and the
 * tests compare the two.
 *
 * Layout (all C-contiguous, CPU): p [n_rows, dim] float32; moments [n_rows, 2, dim] float32 (m, v);
 * clock [n_rows, 2] int64 (last, moved); tail [tail_len] float64 with tail[k - base - 1] = R_k.
 * Pointers arrive as integers (torch.Tensor.data_ptr()); the Python side checks dtypes and layout.
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
#include "_native.h"

enum { OK = 0, BAD_ROW = 1, BAD_CLOCK = 2, NO_MEMORY = 3 };
#ifndef AHEAD
#define AHEAD 8 /* rows prefetched ahead of the one being updated */
#endif

typedef struct {
    float *p, *moments;
    int64_t *clock;
    const double *tail;
    int64_t tail_len, base, n_rows, dim;
    double beta1, beta2, eps;
    /* powers by integer exponent, k = 0 .. tail_len + 1 (every exponent a consistent state gives;
     * others fall back to pow): rho^k, b2^(-k/2), and sqrt(1 - b2^(base+1+k)) */
    double *rho_k, *b2_half_k, *sqrt_c2_k;
    int64_t n_k;
} table_t;

/* threads for a pass over n rows: all of OpenMP's (PyTorch's setting) when there is enough work */
static int threads_for(int64_t n) {
#ifdef _OPENMP
    return n >= 512 ? omp_get_max_threads() : 1;
#else
    (void)n;
    return 1;
#endif
}

/* max(x, lo) as a plain comparison: libm's fmaxf is a call, which stops the loop vectorising */
static inline float floor_at(float x, float lo) { return x > lo ? x : lo; }

/* The element loops, compiled twice: for AVX2 (8 floats a vector: the square roots and divisions
 * bound them) and for any x86-64, the right one picked when the module loads. */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define ELEMENT_LOOP __attribute__((target_clones("avx2", "default")))
#else
#define ELEMENT_LOOP
#endif

ELEMENT_LOOP static void deferred_move(float *restrict row, const float *restrict m, const float *restrict v,
                                       float s, float eps_row, int64_t dim) {
    for (int64_t j = 0; j < dim; j++)
        row[j] -= (m[j] * s) / floor_at(sqrtf(v[j]) + eps_row, 1e-30f);
}

ELEMENT_LOOP static void adam_update(float *restrict row, float *restrict m, float *restrict v,
                                     const float *restrict g, float d1, float d2, float one_b1, float one_b2,
                                     float step_size, float sqrt_c2, float eps, int64_t dim) {
    for (int64_t j = 0; j < dim; j++) {
        float mj = m[j] * d1 + g[j] * one_b1;
        float vj = v[j] * d2 + g[j] * g[j] * one_b2;
        m[j] = mj;
        v[j] = vj;
        row[j] += step_size * (mj / (sqrtf(vj) / sqrt_c2 + eps));
    }
}

static int make_powers(table_t *t) {
    t->n_k = t->tail_len + 2;
    t->rho_k = malloc(3 * (size_t)t->n_k * sizeof(double));
    if (!t->rho_k)
        return NO_MEMORY;
    t->b2_half_k = t->rho_k + t->n_k;
    t->sqrt_c2_k = t->b2_half_k + t->n_k;
    double rho = t->beta1 / sqrt(t->beta2);
    for (int64_t k = 0; k < t->n_k; k++) {
        t->rho_k[k] = pow(rho, (double)k);
        t->b2_half_k[k] = pow(t->beta2, -(double)k / 2.0);
        t->sqrt_c2_k[k] = sqrt(1.0 - pow(t->beta2, (double)(t->base + 1 + k)));
    }
    return OK;
}

static void prefetch_row(const table_t *t, int64_t r) {
    const char *p = (const char *)(t->p + r * t->dim), *m = (const char *)(t->moments + 2 * r * t->dim);
    __builtin_prefetch(t->clock + 2 * r, 1);
    for (int64_t b = 0; b < t->dim * (int64_t)sizeof(float); b += 64) {
        __builtin_prefetch(p + b, 1);
        __builtin_prefetch(m + b, 1);
        __builtin_prefetch(m + t->dim * sizeof(float) + b, 1);
    }
}

/* Move row r from step `moved` to `upto` with the moments of its last gradient (step `last`):
 *   p -= m / (sqrt(v) + eps') * rho^(moved+1-last) R_{moved+1},  rho = b1 / sqrt(b2),
 *   eps' = eps sqrt(1 - b2^(moved+1)) b2^((last-moved-1)/2).
 * A row with no gradient yet has m = v = 0 and does not move. */
static int move_row(const table_t *t, int64_t r, int64_t upto) {
    int64_t last = t->clock[2 * r], moved = t->clock[2 * r + 1];
    if (moved >= upto)
        return OK;
    int64_t i = moved - t->base, k = moved + 1 - last;
    if (i < 0 || i >= t->tail_len)
        return BAD_CLOCK;
    double rho_k, b2_half_k;
    if (k >= 0 && k < t->n_k) {
        rho_k = t->rho_k[k];
        b2_half_k = t->b2_half_k[k];
    } else {
        rho_k = pow(t->beta1 / sqrt(t->beta2), (double)k);
        b2_half_k = pow(t->beta2, -(double)k / 2.0);
    }
    float s = (float)(t->tail[i] * rho_k);
    float eps_row = (float)(t->eps * t->sqrt_c2_k[i] * b2_half_k);
    const float *m = t->moments + 2 * r * t->dim;
    deferred_move(t->p + r * t->dim, m, m + t->dim, s, eps_row, t->dim);
    t->clock[2 * r + 1] = upto;
    return OK;
}

/* The arguments every function starts with: the table, its state and the hyper-parameters. */
#define TABLE_FORMAT "KKKKLLLLddd"
#define TABLE_ARGS(t, pp, pm, pc, pt) \
    &pp, &pm, &pc, &pt, &t.tail_len, &t.base, &t.n_rows, &t.dim, &t.beta1, &t.beta2, &t.eps

static void set_pointers(table_t *t, unsigned long long p, unsigned long long m, unsigned long long c,
                         unsigned long long tail) {
    t->p = (float *)(uintptr_t)p;
    t->moments = (float *)(uintptr_t)m;
    t->clock = (int64_t *)(uintptr_t)c;
    t->tail = (const double *)(uintptr_t)tail;
    t->rho_k = NULL;
}

/* the position of the first row index outside [0, n_rows), or -1 */
static int64_t out_of_range(const int64_t *rows, int64_t n, int64_t n_rows) {
    for (int64_t i = 0; i < n; i++)
        if (rows[i] < 0 || rows[i] >= n_rows)
            return i;
    return -1;
}

static PyObject *report(int status, int64_t row, int64_t n_rows) {
    if (status == BAD_ROW)
        PyErr_Format(PyExc_IndexError, "row %lld is out of range for a table of %lld rows", (long long)row,
                     (long long)n_rows);
    else if (status == NO_MEMORY)
        PyErr_NoMemory();
    else
        PyErr_SetString(PyExc_RuntimeError,
                        "DeferredAdam state is inconsistent (a row's step lies outside the kept sums); "
                        "load the optimizer state that belongs to these tables");
    return NULL;
}

/* catch_up(<table>, rows, n, upto): move every row of rows[0..n) (repeats allowed) to step `upto`. */
static PyObject *catch_up(PyObject *self, PyObject *args) {
    (void)self;
    table_t t;
    unsigned long long pp, pm, pc, pt, rows_ptr;
    long long n, upto;
    if (!PyArg_ParseTuple(args, TABLE_FORMAT "KLL", TABLE_ARGS(t, pp, pm, pc, pt), &rows_ptr, &n, &upto))
        return NULL;
    set_pointers(&t, pp, pm, pc, pt);
    const int64_t *rows = (const int64_t *)(uintptr_t)rows_ptr;
    int64_t bad = out_of_range(rows, n, t.n_rows);
    if (bad >= 0)
        return report(BAD_ROW, rows[bad], t.n_rows);
    int status = make_powers(&t);
    Py_BEGIN_ALLOW_THREADS
    /* Rows repeat, so threads split them by row number, not by position: thread k of T moves the
     * rows r with r % T == k, each once. The work is memory-bound (rows scattered over tables
     * larger than the cache): a second thread keeps more of it in flight. */
#pragma omp parallel num_threads(threads_for(n)) if (status == OK)
    {
        int64_t k = 0, T = 1;
#ifdef _OPENMP
        k = omp_get_thread_num();
        T = omp_get_num_threads();
#endif
        int mine = OK;
        for (int64_t i = 0; i < n && mine == OK; i++) {
            if (rows[i] % T != k)
                continue;
            for (int64_t j = i + AHEAD; j < n && j < i + 2 * AHEAD; j++)
                if (rows[j] % T == k) {
                    prefetch_row(&t, rows[j]);
                    break;
                }
            mine = move_row(&t, rows[i], upto);
        }
        if (mine != OK) {
#pragma omp atomic write
            status = mine;
        }
    }
    Py_END_ALLOW_THREADS
    free(t.rho_k);
    if (status != OK)
        return report(status, 0, t.n_rows);
    Py_RETURN_NONE;
}

/* step(<table>, index, grad, n, t, lr, slot, acc, unique) -> number of distinct rows
 *
 * Adam step t on the rows of a sparse gradient (index[n], grad[n, dim]; repeats summed):
 *   rows behind step t-1 are first moved there (rows this process did not read);
 *   m = b1^(t-last) m + (1-b1) g,  v = b2^(t-last) v + (1-b2) g^2,
 *   p -= lr/c1 * m / (sqrt(v)/sqrt(c2) + eps),  c1 = 1 - b1^t, c2 = 1 - b2^t;  last = moved = t.
 * slot[n_rows] int32 must hold -1 everywhere (and does again on return); acc[n, dim] float32 and
 * unique[n] int64 are scratch. */
static PyObject *step(PyObject *self, PyObject *args) {
    (void)self;
    table_t t;
    unsigned long long pp, pm, pc, pt, index_ptr, grad_ptr, slot_ptr, acc_ptr, unique_ptr;
    long long n, step_t;
    double lr;
    if (!PyArg_ParseTuple(args, TABLE_FORMAT "KKLLdKKK", TABLE_ARGS(t, pp, pm, pc, pt), &index_ptr, &grad_ptr, &n,
                          &step_t, &lr, &slot_ptr, &acc_ptr, &unique_ptr))
        return NULL;
    set_pointers(&t, pp, pm, pc, pt);
    const int64_t *index = (const int64_t *)(uintptr_t)index_ptr;
    const float *grad = (const float *)(uintptr_t)grad_ptr;
    int32_t *slot = (int32_t *)(uintptr_t)slot_ptr;
    float *acc = (float *)(uintptr_t)acc_ptr;
    int64_t *unique = (int64_t *)(uintptr_t)unique_ptr;
    const int64_t dim = t.dim;
    int64_t bad = out_of_range(index, n, t.n_rows);
    if (bad >= 0)
        return report(BAD_ROW, index[bad], t.n_rows);
    int status = make_powers(&t);
    if (status != OK)
        return report(status, 0, t.n_rows);
    /* decays by gap = t - last, as float32 powers (PyTorch's pow of a float32 tensor) */
    float *decay1 = malloc(2 * (size_t)t.n_k * sizeof(float));
    if (!decay1) {
        free(t.rho_k);
        return report(NO_MEMORY, 0, t.n_rows);
    }
    float *decay2 = decay1 + t.n_k;
    for (int64_t k = 0; k < t.n_k; k++) {
        decay1[k] = powf((float)t.beta1, (float)k);
        decay2[k] = powf((float)t.beta2, (float)k);
    }
    int64_t n_unique = 0;
    Py_BEGIN_ALLOW_THREADS
    /* sum the gradient rows of each distinct row, in order of first appearance */
    for (int64_t i = 0; i < n; i++) {
        int64_t r = index[i];
        const float *g = grad + i * dim;
        if (slot[r] < 0) {
            slot[r] = (int32_t)n_unique;
            unique[n_unique] = r;
            memcpy(acc + n_unique * dim, g, (size_t)dim * sizeof(float));
            n_unique++;
        } else {
            float *restrict a = acc + (int64_t)slot[r] * dim;
            for (int64_t j = 0; j < dim; j++)
                a[j] += g[j];
        }
    }
    const double c1 = 1.0 - pow(t.beta1, (double)step_t), c2 = 1.0 - pow(t.beta2, (double)step_t);
    const float sqrt_c2 = (float)sqrt(c2), eps_f = (float)t.eps, step_size = (float)(-lr / c1);
    const float one_b1 = (float)(1.0 - t.beta1), one_b2 = (float)(1.0 - t.beta2);
    /* distinct rows: any split among threads is safe */
#pragma omp parallel for schedule(static) num_threads(threads_for(n_unique))
    for (int64_t u = 0; u < n_unique; u++) {
        int64_t r = unique[u];
        slot[r] = -1;
        if (u + AHEAD < n_unique)
            prefetch_row(&t, unique[u + AHEAD]);
        int moved = move_row(&t, r, step_t - 1);
        if (moved != OK) {
#pragma omp atomic write
            status = moved;
            continue; /* still clearing slot */
        }
        int64_t gap = step_t - t.clock[2 * r];
        float d1, d2;
        if (gap >= 0 && gap < t.n_k) {
            d1 = decay1[gap];
            d2 = decay2[gap];
        } else {
            d1 = powf((float)t.beta1, (float)gap);
            d2 = powf((float)t.beta2, (float)gap);
        }
        float *m = t.moments + 2 * r * dim;
        adam_update(t.p + r * dim, m, m + dim, acc + u * dim, d1, d2, one_b1, one_b2, step_size, sqrt_c2, eps_f, dim);
        t.clock[2 * r] = step_t;
        t.clock[2 * r + 1] = step_t;
    }
    Py_END_ALLOW_THREADS
    free(decay1);
    free(t.rho_k);
    if (status != OK)
        return report(status, 0, t.n_rows);
    return PyLong_FromLongLong(n_unique);
}

static PyMethodDef methods[] = {
    CPU_FEATURES_METHOD,
    {"catch_up", catch_up, METH_VARARGS, "Move rows to a step with their deferred Adam moves."},
    {"step", step, METH_VARARGS, "One Adam step on the rows of a sparse gradient."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rowadam", "DeferredAdam's row passes, compiled.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__rowadam(void) { return PyModule_Create(&module); }
