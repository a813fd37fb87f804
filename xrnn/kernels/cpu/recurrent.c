/* Fused point-wise steps of the Elman RNN, LSTM and GRU scans on the CPU (float32).
 *
 * xrnn/kernels/numpy_fast.py runs a scan as one matrix product per time step (NumPy's BLAS)
 * followed by the step's element-wise math. In NumPy that math is 10 to 25 separate calls,
 * each a pass over a (B, 4H) or (B, H) array; here it is one pass per step, with the gates,
 * cell state and output of an element computed in registers. Each function below is the
 * element-wise part of one step of one scan, with the same inputs, outputs and in-place
 * side effects as the NumPy code it replaces (named at each function); the matrix product
 * stays in NumPy. Loaded with ctypes by xrnn/kernels/native.py; no Python objects here.
 *
 * Arrays are row-major float32 with unit stride along a row; every 2-D argument comes with
 * its row stride in elements (ld*). n is the number of rows (the batch), H the hidden size.
 *
 * Activations: sigmoid(x) = 1 / (1 + exp(-x)) and tanh(x) = 2 / (1 + exp(-2x)) - 1, the
 * formulas of the NumPy fast path, with exp from a polynomial that the compiler vectorizes
 * (range reduction by ln 2, degree-6 polynomial; relative error about 2 ulp on the clamped
 * range [-87.3, 88.7], outside which sigmoid and tanh are at their limits to float32 precision).
 *
 * Built by setup.py as the extension module xrnn.kernels._xrnn_cpu (XRNN_PYTHON_MODULE
 * defined: an empty module, so that the wheel carries the library for this platform); the
 * tests compile the same file with the system's C compiler into a plain shared library.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef XRNN_PYTHON_MODULE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#endif

#if defined(_MSC_VER)
#define XRNN_EXPORT __declspec(dllexport)
#define XRNN_RESTRICT __restrict
#else
#define XRNN_EXPORT __attribute__((visibility("default")))
#define XRNN_RESTRICT restrict
#endif

typedef ptrdiff_t idx;

/* ---- the arguments of a whole-sequence scan (scan_kernels.h) ----
 * Arrays are float32 with unit stride along rows; s* are step strides and ld* row strides, in
 * elements. The same fields as xrnn.kernels.native.ScanArgs, in the same order. */
typedef struct {
    idx T, n, H, reverse, relu;
    float *A;
    idx sA, lda;      /* (T, n, G*H) gates (the scans' A) */
    const float *P;   /* the recurrent weight, packed by xrnn_pack */
    const float *bh;  /* GRU: b_hh (3H,) or NULL */
    const float *h0;  /* (n, H) h entering the first step */
    idx ldh0;
    const float *c0;  /* LSTM: (n, H) c entering the first step */
    idx ldc0;
    float *C;         /* LSTM: (T, n, H) cell states; GRU: (T, n, H) W_hn h + b_hn */
    idx sC, ldc;
    float *Y;         /* (T, n, H) outputs */
    idx sY, ldy;
    const float *dY;  /* backward: (T, n, H) gradients of the outputs */
    idx sdY, lddy;
    const float *dhT; /* backward: (n, H) gradient arriving after the last step, or NULL */
    idx lddhT;
    float *w1;        /* (n, G*H) forward products; backward: (n, H) dh, the result */
    idx ldw1;
    float *w2;        /* backward: (n, H) LSTM dc (in and out); GRU dh z (zeros in) */
    idx ldw2;
    float *w3;        /* GRU backward: (n, 3H) hidden-side gradients */
    idx ldw3;
    /* A ragged scan (a batch of sequences of different lengths, rows sorted longest first), or
     * NULL, NULL: step t runs on the first rows[t] rows only (non-increasing in t), and every
     * step array (A, C, Y, dY) holds step t's rows from row offs[t] on (the s* strides are then
     * unused). A row that starts later in the scan's order (a reverse scan's shorter rows)
     * starts from its row of h0, c0. Forward scans leave each row's final state in its last
     * step's row; backward scans take each row's incoming gradient in w1 (dh; LSTM dc in w2,
     * GRU zeros in w2), not dhT, and leave w1 (and w2) holding every row's gradient of h0. */
    const idx *rows;
    const idx *offs;
} xrnn_scan_args;

/* The arguments of a threaded product (xrnn_gemm_packed_threads). */
typedef struct {
    idx n, N, K, lda, ldc, by_columns;
    const float *A, *P;
    float *C;
} xrnn_gemm_args;

typedef void (*xrnn_task)(void *arg, idx part, idx parts);
static void xrnn_pool_run(xrnn_task fn, void *arg, idx parts);

/* Rows per thread below which a scan runs on fewer threads: every thread reads the whole
 * packed weight each step, which pays only over enough rows. Medium LSTM step (H = 512, two
 * threads, AMD EPYC): 8 rows took 0.29 ms on one thread and 0.14 ms on two; 4 rows 0.11 ms on
 * one (the step is then the weight's read from cache). */
#ifndef XRNN_MIN_ROWS
#define XRNN_MIN_ROWS 4
#endif

static idx xrnn_scan_parts(idx n, idx threads) {
    idx parts = n / XRNN_MIN_ROWS;
    parts = parts < threads ? parts : threads;
    return parts < 1 ? 1 : parts;
}

static inline idx xrnn_min(idx a, idx b) { return a < b ? a : b; }

/* The rows step t of a scan runs on. */
static inline idx xrnn_active(const xrnn_scan_args *s, idx t) { return s->rows != NULL ? s->rows[t] : s->n; }

/* Where step t starts in a step array with step stride st and row stride ld (elements). */
static inline idx xrnn_at(const xrnn_scan_args *s, idx t, idx st, idx ld) {
    return s->offs != NULL ? s->offs[t] * ld : t * st;
}

/* The gradient arriving at a backward step: dhT at the first step of a full batch's scan
 * (NULL: none), else (and always in a ragged scan) w1, the last product. */
static inline const float *xrnn_incoming(const xrnn_scan_args *s, idx k, idx *ld) {
    if (k == 0 && s->rows == NULL) {
        *ld = s->lddhT;
        return s->dhT;
    }
    *ld = s->ldw1;
    return s->w1;
}

/* The rows [0, r) of a ragged scan hold this many row-steps. */
static idx xrnn_row_steps(const xrnn_scan_args *s, idx r) {
    idx w = 0;
    for (idx t = 0; t < s->T; t++)
        w += xrnn_min(s->rows[t], r);
    return w;
}

/* Which rows part `part` of `parts` takes: [*r0, *r1), equal shares of the rows, or of a ragged
 * scan's row-steps (its rows are sorted longest first: the first parts take fewer rows). */
static void xrnn_scan_rows(const xrnn_scan_args *s, idx part, idx parts, idx *r0, idx *r1) {
    idx n = s->n, b[2];
    for (int i = 0; i < 2; i++) {
        idx p = part + i;
        if (s->rows == NULL || p == 0 || p == parts) {
            b[i] = n * p / parts;
            continue;
        }
        idx goal = xrnn_row_steps(s, n) * p / parts, lo = 0, hi = n; /* the least r holding goal */
        while (lo < hi) {
            idx mid = (lo + hi) / 2;
            if (xrnn_row_steps(s, mid) < goal)
                lo = mid + 1;
            else
                hi = mid;
        }
        b[i] = lo;
    }
    *r0 = b[0], *r1 = b[1];
}

/* ---- a pool of worker threads, for the scans ----
 * xrnn_pool_run(fn, arg, parts) calls fn(arg, p, parts) for p = 0 .. parts-1, part 0 on the
 * calling thread, the others on workers started on first use and kept. Workers wait for the
 * next job spinning for XRNN_SPIN_NS, then sleep on a condition variable. One job at a time: a
 * call made while another thread's job runs (two Python threads) runs its parts itself, in turn.
 * After fork() the child has no workers; it starts its own. */
#if defined(_WIN32)
static void xrnn_pool_run(xrnn_task fn, void *arg, idx parts) {
    for (idx p = 0; p < parts; p++)
        fn(arg, p, parts);
}
XRNN_EXPORT idx xrnn_pool_workers(void) { return 0; }
XRNN_EXPORT void xrnn_use_blas_threads(void *run, void *count) { (void)run, (void)count; }
#else
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define XRNN_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define XRNN_PAUSE() __asm__ __volatile__("yield")
#else
#define XRNN_PAUSE() ((void)0)
#endif

#define XRNN_MAX_WORKERS 255
#define XRNN_SPIN_NS 200000 /* 0.2 ms: longer than the gaps between a layer's scans */

static struct {
    pthread_mutex_t busy;  /* held by the thread whose job runs */
    pthread_mutex_t sleep; /* with wake: where idle workers wait */
    pthread_cond_t wake;
    idx workers;           /* started */
    atomic_ulong job;      /* job number: a worker runs each new one */
    unsigned long start;   /* the job number when the newest worker was started (it runs the next) */
    atomic_long pending;   /* workers yet to finish the current job */
    atomic_long sleepers;
    xrnn_task fn;
    void *arg;
    idx parts;
    int atfork;
} xrnn_pool = {.busy = PTHREAD_MUTEX_INITIALIZER, .sleep = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static double xrnn_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return 1e9 * (double)ts.tv_sec + (double)ts.tv_nsec;
}

static void *xrnn_worker(void *arg) {
    idx id = (idx)(intptr_t)arg; /* 1 .. workers */
    unsigned long seen = xrnn_pool.start; /* not the job number now: the job it was started for may have begun */
    for (;;) {
        unsigned long job = atomic_load_explicit(&xrnn_pool.job, memory_order_acquire);
        if (job == seen) {
            double until = xrnn_now_ns() + XRNN_SPIN_NS;
            for (int i = 1; (job = atomic_load_explicit(&xrnn_pool.job, memory_order_acquire)) == seen; i++) {
                XRNN_PAUSE();
                if ((i & 255) == 0 && xrnn_now_ns() > until)
                    break;
            }
            if (job == seen) {
                pthread_mutex_lock(&xrnn_pool.sleep);
                atomic_fetch_add(&xrnn_pool.sleepers, 1);
                while ((job = atomic_load(&xrnn_pool.job)) == seen)
                    pthread_cond_wait(&xrnn_pool.wake, &xrnn_pool.sleep);
                atomic_fetch_sub(&xrnn_pool.sleepers, 1);
                pthread_mutex_unlock(&xrnn_pool.sleep);
            }
        }
        seen = job;
        if (id < xrnn_pool.parts)
            xrnn_pool.fn(xrnn_pool.arg, id, xrnn_pool.parts);
        atomic_fetch_sub_explicit(&xrnn_pool.pending, 1, memory_order_release);
    }
    return NULL;
}

static void xrnn_pool_after_fork(void) {
    /* the child has only the thread that forked: no workers, nothing held */
    pthread_mutex_init(&xrnn_pool.busy, NULL);
    pthread_mutex_init(&xrnn_pool.sleep, NULL);
    pthread_cond_init(&xrnn_pool.wake, NULL);
    xrnn_pool.workers = 0;
    atomic_store(&xrnn_pool.sleepers, 0);
    atomic_store(&xrnn_pool.pending, 0);
}

/* OpenBLAS's own threads, when NumPy's BLAS is OpenBLAS (xrnn_use_blas_threads): its
 * gotoblas_pthread(n, f, args, stride) runs f(args + i stride) for i < n, the first on the
 * calling thread and the others on its worker threads. The scans run there rather than on a
 * second pool, because OpenBLAS's idle workers spin for about 0.1 s after each of its calls:
 * on a machine with as many cores as threads, two pools take turns on the cores (the medium
 * LSTM forward scan: 92 ms alone, 141 ms right after a NumPy product, on its own pool). */
typedef int (*xrnn_blas_pthread_fn)(int, void *, void *, int);
typedef int (*xrnn_blas_threads_fn)(void);
static xrnn_blas_pthread_fn xrnn_blas_pthread;
static xrnn_blas_threads_fn xrnn_blas_threads;

typedef struct {
    xrnn_task fn;
    void *arg;
    idx part, parts;
} xrnn_part;

static void xrnn_blas_part(void *p) {
    const xrnn_part *q = (const xrnn_part *)p;
    q->fn(q->arg, q->part, q->parts);
}

/* Run the scans' parts on OpenBLAS's threads: run (gotoblas_pthread) and count (its
 * *_get_num_threads) from the OpenBLAS library NumPy loaded; NULL, NULL: on xrnn's own pool. */
XRNN_EXPORT void xrnn_use_blas_threads(void *run, void *count) {
    xrnn_blas_pthread = (run != NULL && count != NULL) ? (xrnn_blas_pthread_fn)run : NULL;
    xrnn_blas_threads = (run != NULL && count != NULL) ? (xrnn_blas_threads_fn)count : NULL;
}

static void xrnn_pool_run(xrnn_task fn, void *arg, idx parts) {
    if (parts > XRNN_MAX_WORKERS + 1)
        parts = XRNN_MAX_WORKERS + 1;
    if (parts > 1 && xrnn_blas_pthread != NULL) {
        idx most = (idx)xrnn_blas_threads();
        parts = parts < most ? parts : most;
        if (parts > 1) {
            xrnn_part q[XRNN_MAX_WORKERS + 1];
            for (idx p = 0; p < parts; p++)
                q[p] = (xrnn_part){fn, arg, p, parts};
            xrnn_blas_pthread((int)parts, (void *)xrnn_blas_part, q, (int)sizeof(xrnn_part));
            return;
        }
    }
    if (parts <= 1 || pthread_mutex_trylock(&xrnn_pool.busy) != 0) {
        for (idx p = 0; p < parts; p++)
            fn(arg, p, parts);
        return;
    }
    if (!xrnn_pool.atfork) {
        xrnn_pool.atfork = 1;
        pthread_atfork(NULL, NULL, xrnn_pool_after_fork);
    }
    while (xrnn_pool.workers < parts - 1) { /* a worker starts waiting for the job after the current one */
        pthread_t tid;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        xrnn_pool.start = atomic_load(&xrnn_pool.job);
        int err = pthread_create(&tid, &attr, xrnn_worker, (void *)(intptr_t)(xrnn_pool.workers + 1));
        pthread_attr_destroy(&attr);
        if (err != 0)
            break;
        xrnn_pool.workers++;
    }
    if (parts > xrnn_pool.workers + 1)
        parts = xrnn_pool.workers + 1; /* fewer threads than asked: the parts are rows, any count works */
    xrnn_pool.fn = fn;
    xrnn_pool.arg = arg;
    xrnn_pool.parts = parts;
    atomic_store(&xrnn_pool.pending, (long)xrnn_pool.workers);
    atomic_fetch_add_explicit(&xrnn_pool.job, 1, memory_order_seq_cst);
    if (atomic_load(&xrnn_pool.sleepers) > 0) {
        pthread_mutex_lock(&xrnn_pool.sleep);
        pthread_cond_broadcast(&xrnn_pool.wake);
        pthread_mutex_unlock(&xrnn_pool.sleep);
    }
    fn(arg, 0, parts);
    for (int i = 1; atomic_load_explicit(&xrnn_pool.pending, memory_order_acquire) > 0; i++) {
        XRNN_PAUSE();
        if ((i & 1023) == 0)
            sched_yield();
    }
    pthread_mutex_unlock(&xrnn_pool.busy);
}

/* The worker threads started so far (for the tests). */
XRNN_EXPORT idx xrnn_pool_workers(void) { return xrnn_pool.workers; }
#endif

/* ---- packing a recurrent weight for the scans' products ----
 * W is (N, K) with element (i, k) at W[i sn + k sk]; P gets B = W^T (K, N) as ceil(N/16) panels
 * of (K, 16), zero past N: what scan_kernels.h multiplies by. P holds xrnn_packed_size floats. */
XRNN_EXPORT idx xrnn_packed_size(idx N, idx K) { return (N + 15) / 16 * 16 * K; }

typedef struct {
    idx N, K, sn, sk;
    const float *W;
    float *P;
} xrnn_pack_args;

static void xrnn_pack_part(void *arg, idx part, idx parts) {
    const xrnn_pack_args *s = (const xrnn_pack_args *)arg;
    idx panels = (s->N + 15) / 16, p0 = panels * part / parts, p1 = panels * (part + 1) / parts;
    for (idx p = p0; p < p1; p++) {
        float *out = s->P + p * s->K * 16;
        idx cols = s->N - 16 * p < 16 ? s->N - 16 * p : 16;
        if (s->sk == 1) { /* rows of W contiguous: one row of W is one column of the panel */
            for (idx j = 0; j < 16; j++) {
                const float *w = s->W + (16 * p + j) * s->sn;
                for (idx k = 0; k < s->K; k++)
                    out[k * 16 + j] = j < cols ? w[k] : 0.0f;
            }
        } else {
            for (idx k = 0; k < s->K; k++) {
                const float *w = s->W + k * s->sk + 16 * p * s->sn;
                for (idx j = 0; j < 16; j++)
                    out[k * 16 + j] = j < cols ? w[j * s->sn] : 0.0f;
            }
        }
    }
}

XRNN_EXPORT void xrnn_pack(idx N, idx K, const float *W, idx sn, idx sk, float *P, idx threads) {
    xrnn_pack_args s = {N, K, sn, sk, W, P};
    idx parts = (N + 15) / 16 / 8; /* at least 8 panels a thread */
    parts = parts < threads ? parts : threads;
    xrnn_pool_run(xrnn_pack_part, &s, parts < 1 ? 1 : parts);
}

/* The portable copy: the compiler's baseline target (SSE2 on x86-64, NEON on arm64). */
#define XRNN_NAME(f) f##_base
#include "recurrent_kernels.h"
#include "scan_kernels.h"
#undef XRNN_NAME

/* x86-64 with GCC or clang: a second copy for AVX2 + FMA machines (Haswell, 2013, and later;
 * AMD Zen), which the loader picks when xrnn_cpu_has_avx2() says the CPU has them. */
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(XRNN_NO_AVX2)
#define XRNN_HAVE_AVX2_COPY 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#endif
#define XRNN_NAME(f) f##_avx2
#include "recurrent_kernels.h"
#include "scan_kernels.h"
#undef XRNN_NAME
#ifdef __clang__
#pragma clang attribute pop
#endif
#pragma GCC pop_options
#endif

/* Two more copies with 16-float vectors (scan_kernels.h: a product tile of 6 rows by 32
 * columns): for AVX-512 machines (Intel Xeon since Skylake, AMD Zen 4), and "wide", the same
 * source compiled for AVX2, where the compiler splits each vector in two: slower than the AVX2
 * copy, but it runs on any AVX2 machine, so that the tests check the AVX-512 copy's code
 * where no AVX-512 CPU is at hand. */
#if defined(XRNN_HAVE_AVX2_COPY) && !defined(XRNN_NO_AVX512)
#define XRNN_HAVE_AVX512_COPY 1
#define XRNN_VW 16
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma"))), apply_to = function)
#endif
#define XRNN_NAME(f) f##_avx512
#include "recurrent_kernels.h"
#include "scan_kernels.h"
#undef XRNN_NAME
#ifdef __clang__
#pragma clang attribute pop
#endif
#pragma GCC pop_options

#define XRNN_VW 16
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#endif
#define XRNN_NAME(f) f##_wide
#include "recurrent_kernels.h"
#include "scan_kernels.h"
#undef XRNN_NAME
#ifdef __clang__
#pragma clang attribute pop
#endif
#pragma GCC pop_options
#endif

/* 1 when the AVX2 copy exists and this CPU runs it, else 0 (then the loader takes *_base). */
XRNN_EXPORT int xrnn_cpu_has_avx2(void) {
#ifdef XRNN_HAVE_AVX2_COPY
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* 1 when the AVX-512 copy exists and this CPU (and its operating system) runs it, else 0. */
XRNN_EXPORT int xrnn_cpu_has_avx512(void) {
#ifdef XRNN_HAVE_AVX512_COPY
    __builtin_cpu_init();
    return xrnn_cpu_has_avx2() && __builtin_cpu_supports("avx512f");
#else
    return 0;
#endif
}

/* The kernels' version, so the loader can refuse a library built from other source. */
XRNN_EXPORT int xrnn_cpu_abi(void) { return 4; }

#ifdef XRNN_PYTHON_MODULE
static struct PyModuleDef xrnn_cpu_module = {
    PyModuleDef_HEAD_INIT, "_xrnn_cpu",
    "xrnn's fused CPU kernels, loaded with ctypes by xrnn.kernels.native (no Python functions).", -1, NULL,
};

PyMODINIT_FUNC PyInit__xrnn_cpu(void) { return PyModule_Create(&xrnn_cpu_module); }
#endif
