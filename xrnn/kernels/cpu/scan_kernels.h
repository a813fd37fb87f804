/* Whole-sequence scans: each time step's recurrent product and its element-wise math, for all
 * T steps, in one call. recurrent.c includes this file after recurrent_kernels.h, once per
 * instruction set (XRNN_NAME adds the suffix), like that file.
 *
 * Why: with one NumPy product per step, OpenBLAS packs the whole recurrent weight (4 MB for the
 * medium LSTM) into its own layout on every step, and each step returns to Python twice. Here
 * the weight is packed once per call (xrnn_pack, in recurrent.c) and the batch's rows are
 * split between threads (xrnn_pool_run): rows of an RNN never meet, so each thread carries
 * its rows through all T steps with no synchronisation, and computes its steps' products on
 * its rows alone, followed by the element-wise kernels of recurrent_kernels.h on the same rows
 * while they are in cache. numpy_fast runs every float32 forward scan here, and a backward scan
 * where the packed copy of W_hh is small next to the gate buffer (numpy_fast._backward_packed:
 * a larger copy would raise a training step's peak memory).
 *
 * The product kernel: C (m, N) = A (m, K) @ B (K, N), with B packed as panels of 16 columns
 * (B[k, 16p + j] at P[(p K + k) 16 + j], zero past N). A tile of 6 rows by 16 columns is held
 * in 12 vector registers of 8 floats; each k adds a broadcast element of A times two vectors
 * of the panel (12 multiply-adds for 8 loads). K runs in blocks of XRNN_KC so that a panel's
 * block (32 KB) and the rows' block stay in L1 and L2 cache. */

#ifndef XRNN_SCAN_CONSTANTS
#define XRNN_SCAN_CONSTANTS
#define XRNN_NR 16  /* columns of a packed panel and of a tile */
#define XRNN_MR 6   /* rows of a tile */
#ifndef XRNN_KC
#define XRNN_KC 512 /* k of one block (measured on the AMD EPYC: 256 to 512 within noise, 128 slower) */
#endif
#endif

typedef float XRNN_NAME(xrnn_v8) __attribute__((vector_size(32)));
#define V8 XRNN_NAME(xrnn_v8)

/* 8-float vectors: loads and stores through memcpy (any alignment; one instruction), and a
 * broadcast. Macros, not functions: GCC warns about passing such vectors by value where the
 * target has no 256-bit registers (the base copy), even to functions it always inlines. */
#define XRNN_LD8(v, p) memcpy(&(v), (p), sizeof(V8))
#define XRNN_ST8(p, v) memcpy((p), &(v), sizeof(V8))
#define XRNN_BC8(x) ((V8){(x), (x), (x), (x), (x), (x), (x), (x)})

/* One tile: C[0:m, 0:nc] (+)= A[0:m, 0:kc] @ panel block b (kc, 16); m <= 6 is a constant after
 * inlining, so that the rows past it cost nothing. acc: add to C (a later k block) or store. */
static inline __attribute__((always_inline)) void XRNN_NAME(xrnn_tile)(const int m, idx kc, const float *a, idx lda,
                                                                       const float *b, float *c, idx ldc, int acc,
                                                                       idx nc) {
    V8 c0a = {0}, c0b = {0}, c1a = {0}, c1b = {0}, c2a = {0}, c2b = {0};
    V8 c3a = {0}, c3b = {0}, c4a = {0}, c4b = {0}, c5a = {0}, c5b = {0};
    const float *a0 = a, *a1 = a + (m > 1 ? lda : 0), *a2 = a + (m > 2 ? 2 * lda : 0), *a3 = a + (m > 3 ? 3 * lda : 0);
    const float *a4 = a + (m > 4 ? 4 * lda : 0), *a5 = a + (m > 5 ? 5 * lda : 0);
    for (idx k = 0; k < kc; k++) {
        V8 b0, b1, x;
        float e;
        XRNN_LD8(b0, b + XRNN_NR * k);
        XRNN_LD8(b1, b + XRNN_NR * k + 8);
#define XRNN_TILE_FMA(i, ai, va, vb)                                                                                 \
    if (m > i) {                                                                                                     \
        e = ai[k];                                                                                                   \
        x = XRNN_BC8(e);                                                                                             \
        va += x * b0;                                                                                                \
        vb += x * b1;                                                                                                \
    }
        XRNN_TILE_FMA(0, a0, c0a, c0b)
        XRNN_TILE_FMA(1, a1, c1a, c1b)
        XRNN_TILE_FMA(2, a2, c2a, c2b)
        XRNN_TILE_FMA(3, a3, c3a, c3b)
        XRNN_TILE_FMA(4, a4, c4a, c4b)
        XRNN_TILE_FMA(5, a5, c5a, c5b)
#undef XRNN_TILE_FMA
    }
#define XRNN_TILE_ROW(i, va, vb)                                                                                     \
    if (m > i) {                                                                                                     \
        float *r = c + i * ldc;                                                                                      \
        if (nc == XRNN_NR) {                                                                                         \
            if (acc) {                                                                                               \
                V8 o0, o1;                                                                                           \
                XRNN_LD8(o0, r);                                                                                     \
                XRNN_LD8(o1, r + 8);                                                                                 \
                va += o0;                                                                                            \
                vb += o1;                                                                                            \
            }                                                                                                        \
            XRNN_ST8(r, va);                                                                                         \
            XRNN_ST8(r + 8, vb);                                                                                     \
        } else {                                                                                                     \
            float t[XRNN_NR];                                                                                        \
            XRNN_ST8(t, va);                                                                                         \
            XRNN_ST8(t + 8, vb);                                                                                     \
            for (idx j = 0; j < nc; j++)                                                                             \
                r[j] = acc ? r[j] + t[j] : t[j];                                                                     \
        }                                                                                                            \
    }
    XRNN_TILE_ROW(0, c0a, c0b)
    XRNN_TILE_ROW(1, c1a, c1b)
    XRNN_TILE_ROW(2, c2a, c2b)
    XRNN_TILE_ROW(3, c3a, c3b)
    XRNN_TILE_ROW(4, c4a, c4b)
    XRNN_TILE_ROW(5, c5a, c5b)
#undef XRNN_TILE_ROW
}

/* C (m, N) = A (m, K) @ B, B packed by xrnn_pack from a (N, K) matrix (B = W^T). */
static void XRNN_NAME(xrnn_gemm_rows)(idx m, idx N, idx K, const float *XRNN_RESTRICT A, idx lda,
                                      const float *XRNN_RESTRICT P, float *XRNN_RESTRICT C, idx ldc) {
    idx panels = (N + XRNN_NR - 1) / XRNN_NR;
    for (idx k0 = 0; k0 < K; k0 += XRNN_KC) {
        idx kc = K - k0 < XRNN_KC ? K - k0 : XRNN_KC;
        int acc = k0 > 0;
        for (idx p = 0; p < panels; p++) {
            const float *b = P + (p * K + k0) * XRNN_NR;
            idx nc = N - p * XRNN_NR < XRNN_NR ? N - p * XRNN_NR : XRNN_NR;
            float *c = C + p * XRNN_NR;
            for (idx i = 0; i < m; i += XRNN_MR) {
                const float *a = A + i * lda + k0;
                switch (m - i < XRNN_MR ? m - i : XRNN_MR) {
                case 6: XRNN_NAME(xrnn_tile)(6, kc, a, lda, b, c + i * ldc, ldc, acc, nc); break;
                case 5: XRNN_NAME(xrnn_tile)(5, kc, a, lda, b, c + i * ldc, ldc, acc, nc); break;
                case 4: XRNN_NAME(xrnn_tile)(4, kc, a, lda, b, c + i * ldc, ldc, acc, nc); break;
                case 3: XRNN_NAME(xrnn_tile)(3, kc, a, lda, b, c + i * ldc, ldc, acc, nc); break;
                case 2: XRNN_NAME(xrnn_tile)(2, kc, a, lda, b, c + i * ldc, ldc, acc, nc); break;
                default: XRNN_NAME(xrnn_tile)(1, kc, a, lda, b, c + i * ldc, ldc, acc, nc); break;
                }
            }
        }
    }
}

/* C (n, N) = A (n, K) @ B (B packed as above): the product alone, for the tests. */
XRNN_EXPORT void XRNN_NAME(xrnn_gemm_packed)(idx n, idx N, idx K, const float *A, idx lda, const float *P, float *C,
                                             idx ldc) {
    XRNN_NAME(xrnn_gemm_rows)(n, N, K, A, lda, P, C, ldc);
}

/* Which of n rows part p of `parts` takes: [r0, r1). */
static inline void XRNN_NAME(xrnn_rows)(idx n, idx part, idx parts, idx *r0, idx *r1);

static void XRNN_NAME(xrnn_gemm_part)(void *arg, idx part, idx parts) {
    const xrnn_gemm_args *g = (const xrnn_gemm_args *)arg;
    idx r0, r1;
    if (g->by_columns) { /* panels [r0, r1) of every row */
        XRNN_NAME(xrnn_rows)((g->N + XRNN_NR - 1) / XRNN_NR, part, parts, &r0, &r1);
        idx c0 = r0 * XRNN_NR, c1 = r1 * XRNN_NR < g->N ? r1 * XRNN_NR : g->N;
        if (c1 > c0)
            XRNN_NAME(xrnn_gemm_rows)(g->n, c1 - c0, g->K, g->A, g->lda, g->P + c0 * g->K, g->C + c0, g->ldc);
        return;
    }
    XRNN_NAME(xrnn_rows)(g->n, part, parts, &r0, &r1);
    if (r1 > r0)
        XRNN_NAME(xrnn_gemm_rows)(r1 - r0, g->N, g->K, g->A + r0 * g->lda, g->lda, g->P, g->C + r0 * g->ldc, g->ldc);
}

/* The same product over up to `threads` threads (the sampler's step): the rows split between
 * them, or with too few rows for that the columns (each thread then reads only its share of the
 * weight: a product of one row is that read). */
XRNN_EXPORT void XRNN_NAME(xrnn_gemm_packed_threads)(idx n, idx N, idx K, const float *A, idx lda, const float *P,
                                                     float *C, idx ldc, idx threads) {
    idx parts = xrnn_scan_parts(n, threads), by_columns = 0;
    if (parts == 1 && threads > 1) {
        idx panels = (N + XRNN_NR - 1) / XRNN_NR;
        parts = panels / 8 < threads ? panels / 8 : threads; /* at least 8 panels a thread */
        parts = parts < 1 ? 1 : parts;
        by_columns = parts > 1;
    }
    xrnn_gemm_args g = {n, N, K, lda, ldc, by_columns, A, P, C};
    xrnn_pool_run(XRNN_NAME(xrnn_gemm_part), &g, parts);
}

static inline void XRNN_NAME(xrnn_rows)(idx n, idx part, idx parts, idx *r0, idx *r1) {
    *r0 = n * part / parts;
    *r1 = n * (part + 1) / parts;
}

/* LSTM forward over all steps (numpy_fast.lstm_scan). Per step t, on rows [r0, r1):
 * w1 = h_prev @ W_hh^T, then xrnn_lstm_step. */
static void XRNN_NAME(xrnn_lstm_scan_part)(void *arg, idx part, idx parts) {
    const xrnn_scan_args *s = (const xrnn_scan_args *)arg;
    idx r0, r1, H = s->H;
    XRNN_NAME(xrnn_rows)(s->n, part, parts, &r0, &r1);
    if (r1 <= r0)
        return;
    const float *hp = s->h0 + r0 * s->ldh0, *cp = s->c0 + r0 * s->ldc0;
    idx ldhp = s->ldh0, ldcp = s->ldc0;
    float *w = s->w1 + r0 * s->ldw1;
    for (idx k = 0; k < s->T; k++) {
        idx t = s->reverse ? s->T - 1 - k : k;
        float *a = s->A + t * s->sA + r0 * s->lda, *c = s->C + t * s->sC + r0 * s->ldc;
        float *y = s->Y + t * s->sY + r0 * s->ldy;
        XRNN_NAME(xrnn_gemm_rows)(r1 - r0, 4 * H, H, hp, ldhp, s->P, w, s->ldw1);
        XRNN_NAME(xrnn_lstm_step)(r1 - r0, H, a, s->lda, w, s->ldw1, cp, ldcp, c, s->ldc, y, s->ldy);
        hp = y, ldhp = s->ldy, cp = c, ldcp = s->ldc;
    }
}

/* LSTM backward (numpy_fast.lstm_scan_backward). Per step: xrnn_lstm_step_backward (gate
 * gradients over A, dc carried in w2), then w1 = gate gradients @ W_hh, the next step's dh. */
static void XRNN_NAME(xrnn_lstm_scan_backward_part)(void *arg, idx part, idx parts) {
    const xrnn_scan_args *s = (const xrnn_scan_args *)arg;
    idx r0, r1, H = s->H, T = s->T;
    XRNN_NAME(xrnn_rows)(s->n, part, parts, &r0, &r1);
    if (r1 <= r0)
        return;
    const float *dn = s->dhT != NULL ? s->dhT + r0 * s->lddhT : NULL;
    idx lddn = s->lddhT;
    float *dh = s->w1 + r0 * s->ldw1, *dc = s->w2 + r0 * s->ldw2;
    for (idx k = 0; k < T; k++) {
        idx t = s->reverse ? k : T - 1 - k, tp = s->reverse ? t + 1 : t - 1;
        float *a = s->A + t * s->sA + r0 * s->lda;
        const float *cp = (tp < 0 || tp >= T) ? s->c0 + r0 * s->ldc0 : s->C + tp * s->sC + r0 * s->ldc;
        idx ldcp = (tp < 0 || tp >= T) ? s->ldc0 : s->ldc;
        XRNN_NAME(xrnn_lstm_step_backward)(r1 - r0, H, a, s->lda, s->C + t * s->sC + r0 * s->ldc, s->ldc, cp, ldcp,
                                           s->dY + t * s->sdY + r0 * s->lddy, s->lddy, dn, lddn, dc, s->ldw2);
        XRNN_NAME(xrnn_gemm_rows)(r1 - r0, H, 4 * H, a, s->lda, s->P, dh, s->ldw1);
        dn = dh, lddn = s->ldw1;
    }
}

/* GRU forward (numpy_fast.gru_scan): w1 = h_prev @ W_hh^T, then xrnn_gru_step. */
static void XRNN_NAME(xrnn_gru_scan_part)(void *arg, idx part, idx parts) {
    const xrnn_scan_args *s = (const xrnn_scan_args *)arg;
    idx r0, r1, H = s->H;
    XRNN_NAME(xrnn_rows)(s->n, part, parts, &r0, &r1);
    if (r1 <= r0)
        return;
    const float *hp = s->h0 + r0 * s->ldh0;
    idx ldhp = s->ldh0;
    float *w = s->w1 + r0 * s->ldw1;
    for (idx k = 0; k < s->T; k++) {
        idx t = s->reverse ? s->T - 1 - k : k;
        float *y = s->Y + t * s->sY + r0 * s->ldy;
        XRNN_NAME(xrnn_gemm_rows)(r1 - r0, 3 * H, H, hp, ldhp, s->P, w, s->ldw1);
        XRNN_NAME(xrnn_gru_step)(r1 - r0, H, s->A + t * s->sA + r0 * s->lda, s->lda, w, s->ldw1, s->bh, hp, ldhp,
                                 s->C + t * s->sC + r0 * s->ldc, s->ldc, y, s->ldy);
        hp = y, ldhp = s->ldy;
    }
}

/* GRU backward (numpy_fast.gru_scan_backward): xrnn_gru_step_backward (hidden-side gradients
 * in w3, dh z in w2), then w1 = w3 @ W_hh. The caller adds w2 to w1 after the last step. */
static void XRNN_NAME(xrnn_gru_scan_backward_part)(void *arg, idx part, idx parts) {
    const xrnn_scan_args *s = (const xrnn_scan_args *)arg;
    idx r0, r1, H = s->H, T = s->T;
    XRNN_NAME(xrnn_rows)(s->n, part, parts, &r0, &r1);
    if (r1 <= r0)
        return;
    const float *dn = s->dhT != NULL ? s->dhT + r0 * s->lddhT : NULL;
    idx lddn = s->lddhT;
    float *dh = s->w1 + r0 * s->ldw1, *dir = s->w2 + r0 * s->ldw2, *d = s->w3 + r0 * s->ldw3;
    for (idx k = 0; k < T; k++) {
        idx t = s->reverse ? k : T - 1 - k, tp = s->reverse ? t + 1 : t - 1;
        const float *hp = (tp < 0 || tp >= T) ? s->h0 + r0 * s->ldh0 : s->Y + tp * s->sY + r0 * s->ldy;
        idx ldhp = (tp < 0 || tp >= T) ? s->ldh0 : s->ldy;
        XRNN_NAME(xrnn_gru_step_backward)(r1 - r0, H, s->A + t * s->sA + r0 * s->lda, s->lda,
                                          s->C + t * s->sC + r0 * s->ldc, s->ldc, hp, ldhp,
                                          s->dY + t * s->sdY + r0 * s->lddy, s->lddy, dn, lddn, dir, s->ldw2, d,
                                          s->ldw3);
        XRNN_NAME(xrnn_gemm_rows)(r1 - r0, H, 3 * H, d, s->ldw3, s->P, dh, s->ldw1);
        dn = dh, lddn = s->ldw1;
    }
}

/* Elman RNN forward (numpy_fast.rnn_scan): w1 = h_prev @ W_hh^T, then xrnn_rnn_step. */
static void XRNN_NAME(xrnn_rnn_scan_part)(void *arg, idx part, idx parts) {
    const xrnn_scan_args *s = (const xrnn_scan_args *)arg;
    idx r0, r1, H = s->H;
    XRNN_NAME(xrnn_rows)(s->n, part, parts, &r0, &r1);
    if (r1 <= r0)
        return;
    const float *hp = s->h0 + r0 * s->ldh0;
    idx ldhp = s->ldh0;
    float *w = s->w1 + r0 * s->ldw1;
    for (idx k = 0; k < s->T; k++) {
        idx t = s->reverse ? s->T - 1 - k : k;
        float *y = s->Y + t * s->sY + r0 * s->ldy;
        XRNN_NAME(xrnn_gemm_rows)(r1 - r0, H, H, hp, ldhp, s->P, w, s->ldw1);
        XRNN_NAME(xrnn_rnn_step)(r1 - r0, H, w, s->ldw1, s->A + t * s->sA + r0 * s->lda, s->lda, y, s->ldy, s->relu);
        hp = y, ldhp = s->ldy;
    }
}

/* Elman RNN backward (numpy_fast.rnn_scan_backward): xrnn_rnn_step_backward (dz over A), then
 * w1 = dz @ W_hh. */
static void XRNN_NAME(xrnn_rnn_scan_backward_part)(void *arg, idx part, idx parts) {
    const xrnn_scan_args *s = (const xrnn_scan_args *)arg;
    idx r0, r1, H = s->H, T = s->T;
    XRNN_NAME(xrnn_rows)(s->n, part, parts, &r0, &r1);
    if (r1 <= r0)
        return;
    const float *dn = s->dhT != NULL ? s->dhT + r0 * s->lddhT : NULL;
    idx lddn = s->lddhT;
    float *dh = s->w1 + r0 * s->ldw1;
    for (idx k = 0; k < T; k++) {
        idx t = s->reverse ? k : T - 1 - k;
        float *a = s->A + t * s->sA + r0 * s->lda;
        XRNN_NAME(xrnn_rnn_step_backward)(r1 - r0, H, a, s->lda, s->Y + t * s->sY + r0 * s->ldy, s->ldy,
                                          s->dY + t * s->sdY + r0 * s->lddy, s->lddy, dn, lddn, s->relu);
        XRNN_NAME(xrnn_gemm_rows)(r1 - r0, H, H, a, s->lda, s->P, dh, s->ldw1);
        dn = dh, lddn = s->ldw1;
    }
}

/* The exported scans: the batch's rows split between up to `threads` threads. */
#define XRNN_SCAN_ENTRY(name)                                                                                        \
    XRNN_EXPORT void XRNN_NAME(name)(const xrnn_scan_args *s, idx threads) {                                         \
        xrnn_pool_run(XRNN_NAME(name##_part), (void *)s, xrnn_scan_parts(s->n, threads));                            \
    }
XRNN_SCAN_ENTRY(xrnn_lstm_scan)
XRNN_SCAN_ENTRY(xrnn_lstm_scan_backward)
XRNN_SCAN_ENTRY(xrnn_gru_scan)
XRNN_SCAN_ENTRY(xrnn_gru_scan_backward)
XRNN_SCAN_ENTRY(xrnn_rnn_scan)
XRNN_SCAN_ENTRY(xrnn_rnn_scan_backward)
#undef XRNN_SCAN_ENTRY
#undef XRNN_LD8
#undef XRNN_ST8
#undef XRNN_BC8
#undef V8
