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
 * A batch of sequences of different lengths (lengths=) runs as one ragged scan (the rows and
 * offs of xrnn_scan_args): rows sorted longest first, each step on the rows still running, and
 * the threads' rows chosen for equal row-steps. One call for the whole batch, where a call per
 * segment of equal lengths paid a return to Python and a start of the threads each, and ran
 * the last segments' few rows on one thread.
 *
 * The product kernel: C (m, N) = A (m, K) @ B (K, N), with B packed as panels of 16 columns
 * (B[k, 16p + j] at P[(p K + k) 16 + j], zero past N). A tile of 6 rows by two vectors of
 * columns is held in 12 vector registers; each k adds a broadcast element of A times the two
 * vectors (12 multiply-adds for 8 loads). The vectors hold XRNN_VW floats: 8 (AVX2, and the
 * baseline copy, where the compiler splits them), so that a tile is one panel, or 16 (the
 * AVX-512 copy), a tile then spanning two panels. K runs in blocks of XRNN_KC so that the
 * tile's block of the panels (32 KB) stays in L1 cache and the rows' block in L2. */

#ifndef XRNN_SCAN_CONSTANTS
#define XRNN_SCAN_CONSTANTS
#define XRNN_NR 16  /* columns of a packed panel */
#define XRNN_MR 6   /* rows of a tile */
#endif
#ifndef XRNN_VW
#define XRNN_VW 8 /* floats in a vector: 8 or 16 */
#endif
#if XRNN_VW == 16
#define XRNN_KC 256 /* two panels: 32 KB a block */
#else
#define XRNN_KC 512 /* k of one block (measured on the AMD EPYC: 256 to 512 within noise, 128 slower) */
#endif
#define XRNN_TW (2 * XRNN_VW) /* columns of a tile */

typedef float XRNN_NAME(xrnn_vec) __attribute__((vector_size(4 * XRNN_VW)));
#define VEC XRNN_NAME(xrnn_vec)

/* Vector loads and stores through memcpy (any alignment; one instruction). Macros, not
 * functions: GCC warns about passing such vectors by value where the target has no registers
 * that wide (the baseline copy), even to functions it always inlines. */
#define XRNN_LDV(v, p) memcpy(&(v), (p), sizeof(VEC))
#define XRNN_STV(p, v) memcpy((p), &(v), sizeof(VEC))

/* One tile: C[0:m, 0:nc] (+)= A[0:m, 0:kc] @ the (kc, 2 XRNN_VW) block whose two vectors of row
 * k are at b0 + 16 k and b1 + 16 k (nv = 1: b0 alone, the tile's right half is past N); m <= 6
 * and nv are constants after inlining, so that the rows and vector past them cost nothing.
 * acc: add to C (a later k block) or store. */
static inline __attribute__((always_inline)) void XRNN_NAME(xrnn_tile)(const int m, const int nv, idx kc,
                                                                       const float *a, idx lda, const float *b0,
                                                                       const float *b1, float *c, idx ldc, int acc,
                                                                       idx nc) {
    VEC c0a = {0}, c0b = {0}, c1a = {0}, c1b = {0}, c2a = {0}, c2b = {0};
    VEC c3a = {0}, c3b = {0}, c4a = {0}, c4b = {0}, c5a = {0}, c5b = {0};
    const float *a0 = a, *a1 = a + (m > 1 ? lda : 0), *a2 = a + (m > 2 ? 2 * lda : 0), *a3 = a + (m > 3 ? 3 * lda : 0);
    const float *a4 = a + (m > 4 ? 4 * lda : 0), *a5 = a + (m > 5 ? 5 * lda : 0);
    for (idx k = 0; k < kc; k++) {
        VEC v0, v1 = {0};
        float e;
        XRNN_LDV(v0, b0 + XRNN_NR * k);
        if (nv > 1)
            XRNN_LDV(v1, b1 + XRNN_NR * k);
#define XRNN_TILE_FMA(i, ai, va, vb)                                                                                 \
    if (m > i) {                                                                                                     \
        e = ai[k];                                                                                                   \
        va += e * v0;                                                                                                \
        if (nv > 1)                                                                                                  \
            vb += e * v1;                                                                                            \
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
        if (nc == XRNN_TW) {                                                                                         \
            if (acc) {                                                                                               \
                VEC o0, o1;                                                                                          \
                XRNN_LDV(o0, r);                                                                                     \
                XRNN_LDV(o1, r + XRNN_VW);                                                                           \
                va += o0;                                                                                            \
                vb += o1;                                                                                            \
            }                                                                                                        \
            XRNN_STV(r, va);                                                                                         \
            XRNN_STV(r + XRNN_VW, vb);                                                                               \
        } else {                                                                                                     \
            float t[XRNN_TW];                                                                                        \
            XRNN_STV(t, va);                                                                                         \
            XRNN_STV(t + XRNN_VW, vb);                                                                               \
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

/* The tiles of rows [0, m) on one block of columns (nv vectors, b0/b1 as in xrnn_tile). */
static inline __attribute__((always_inline)) void XRNN_NAME(xrnn_tile_rows)(const int nv, idx m, idx kc,
                                                                            const float *A, idx lda,
                                                                            const float *b0, const float *b1,
                                                                            float *c, idx ldc, int acc, idx nc) {
    for (idx i = 0; i < m; i += XRNN_MR) {
        const float *a = A + i * lda;
        float *ci = c + i * ldc;
        switch (m - i < XRNN_MR ? m - i : XRNN_MR) {
        case 6: XRNN_NAME(xrnn_tile)(6, nv, kc, a, lda, b0, b1, ci, ldc, acc, nc); break;
        case 5: XRNN_NAME(xrnn_tile)(5, nv, kc, a, lda, b0, b1, ci, ldc, acc, nc); break;
        case 4: XRNN_NAME(xrnn_tile)(4, nv, kc, a, lda, b0, b1, ci, ldc, acc, nc); break;
        case 3: XRNN_NAME(xrnn_tile)(3, nv, kc, a, lda, b0, b1, ci, ldc, acc, nc); break;
        case 2: XRNN_NAME(xrnn_tile)(2, nv, kc, a, lda, b0, b1, ci, ldc, acc, nc); break;
        default: XRNN_NAME(xrnn_tile)(1, nv, kc, a, lda, b0, b1, ci, ldc, acc, nc); break;
        }
    }
}

/* C (m, N) = A (m, K) @ B, B packed by xrnn_pack from a (N, K) matrix (B = W^T). */
static void XRNN_NAME(xrnn_gemm_rows)(idx m, idx N, idx K, const float *XRNN_RESTRICT A, idx lda,
                                      const float *XRNN_RESTRICT P, float *XRNN_RESTRICT C, idx ldc) {
    idx panels = (N + XRNN_NR - 1) / XRNN_NR, step = XRNN_TW / XRNN_NR; /* panels a tile spans */
    for (idx k0 = 0; k0 < K; k0 += XRNN_KC) {
        idx kc = K - k0 < XRNN_KC ? K - k0 : XRNN_KC;
        int acc = k0 > 0;
        for (idx p = 0; p < panels; p += step) {
            const float *b0 = P + (p * K + k0) * XRNN_NR;
            idx nc = N - p * XRNN_NR < XRNN_TW ? N - p * XRNN_NR : XRNN_TW;
            if (step == 1) /* one panel: its two halves */
                XRNN_NAME(xrnn_tile_rows)(2, m, kc, A + k0, lda, b0, b0 + XRNN_VW, C + p * XRNN_NR, ldc, acc, nc);
            else if (p + 1 < panels) /* two panels */
                XRNN_NAME(xrnn_tile_rows)(2, m, kc, A + k0, lda, b0, b0 + K * XRNN_NR, C + p * XRNN_NR, ldc, acc, nc);
            else /* the last panel alone */
                XRNN_NAME(xrnn_tile_rows)(1, m, kc, A + k0, lda, b0, b0, C + p * XRNN_NR, ldc, acc, nc);
        }
    }
}

/* C (n, N) = A (n, K) @ B (B packed as above): the product alone, for the tests. */
XRNN_EXPORT void XRNN_NAME(xrnn_gemm_packed)(idx n, idx N, idx K, const float *A, idx lda, const float *P, float *C,
                                             idx ldc) {
    XRNN_NAME(xrnn_gemm_rows)(n, N, K, A, lda, P, C, ldc);
}

static void XRNN_NAME(xrnn_gemm_part)(void *arg, idx part, idx parts) {
    const xrnn_gemm_args *g = (const xrnn_gemm_args *)arg;
    if (g->by_columns) { /* panels [p0, p1) of every row */
        idx panels = (g->N + XRNN_NR - 1) / XRNN_NR, p0 = panels * part / parts, p1 = panels * (part + 1) / parts;
        idx c0 = p0 * XRNN_NR, c1 = xrnn_min(p1 * XRNN_NR, g->N);
        if (c1 > c0)
            XRNN_NAME(xrnn_gemm_rows)(g->n, c1 - c0, g->K, g->A, g->lda, g->P + c0 * g->K, g->C + c0, g->ldc);
        return;
    }
    idx r0 = g->n * part / parts, r1 = g->n * (part + 1) / parts;
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

/* Every scan below runs a part's rows [r0, r1) through all steps (xrnn_scan_rows). At step t
 * (previous step tp) its active rows are [r0, m), m = min(r1, rows at t); of them, [r0, q)
 * carry on from their rows of step tp and [q, m) start from h0, c0: all of them at the first
 * step, none at later steps of a full batch, and in a ragged reverse scan the rows whose
 * sequences end at t (xrnn_scan_args). */
static inline void XRNN_NAME(xrnn_step_rows)(const xrnn_scan_args *s, idx t, idx tp, idx r0, idx r1, idx *m,
                                             idx *q) {
    *m = xrnn_min(r1, xrnn_active(s, t));
    idx carry = (tp < 0 || tp >= s->T) ? r0 : xrnn_min(xrnn_active(s, tp), *m);
    *q = carry > r0 ? carry : r0;
}

/* LSTM forward over all steps (numpy_fast.lstm_scan). Per step t, on rows [i0, i1) with h_prev
 * at hp and c_prev at cp (row i0): w1 = h_prev @ W_hh^T, then xrnn_lstm_step. */
static inline void XRNN_NAME(xrnn_lstm_piece)(const xrnn_scan_args *s, idx i0, idx i1, float *a, float *c, float *y,
                                              const float *hp, idx ldhp, const float *cp, idx ldcp) {
    idx H = s->H;
    float *w = s->w1 + i0 * s->ldw1;
    XRNN_NAME(xrnn_gemm_rows)(i1 - i0, 4 * H, H, hp + i0 * ldhp, ldhp, s->P, w, s->ldw1);
    XRNN_NAME(xrnn_lstm_step)(i1 - i0, H, a + i0 * s->lda, s->lda, w, s->ldw1, cp + i0 * ldcp, ldcp, c + i0 * s->ldc,
                              s->ldc, y + i0 * s->ldy, s->ldy);
}

static void XRNN_NAME(xrnn_lstm_scan_part)(void *arg, idx part, idx parts) {
    const xrnn_scan_args *s = (const xrnn_scan_args *)arg;
    idx r0, r1, m, q, T = s->T;
    xrnn_scan_rows(s, part, parts, &r0, &r1);
    for (idx k = 0; k < T && r1 > r0; k++) {
        idx t = s->reverse ? T - 1 - k : k, tp = s->reverse ? t + 1 : t - 1;
        XRNN_NAME(xrnn_step_rows)(s, t, tp, r0, r1, &m, &q);
        float *a = s->A + xrnn_at(s, t, s->sA, s->lda), *c = s->C + xrnn_at(s, t, s->sC, s->ldc);
        float *y = s->Y + xrnn_at(s, t, s->sY, s->ldy);
        if (q > r0)
            XRNN_NAME(xrnn_lstm_piece)(s, r0, q, a, c, y, s->Y + xrnn_at(s, tp, s->sY, s->ldy), s->ldy,
                                       s->C + xrnn_at(s, tp, s->sC, s->ldc), s->ldc);
        if (m > q)
            XRNN_NAME(xrnn_lstm_piece)(s, q, m, a, c, y, s->h0, s->ldh0, s->c0, s->ldc0);
    }
}

/* LSTM backward (numpy_fast.lstm_scan_backward). Per step: xrnn_lstm_step_backward (gate
 * gradients over A, dc carried in w2), then w1 = gate gradients @ W_hh, the next step's dh. */
static void XRNN_NAME(xrnn_lstm_scan_backward_part)(void *arg, idx part, idx parts) {
    const xrnn_scan_args *s = (const xrnn_scan_args *)arg;
    idx r0, r1, m, q, H = s->H, T = s->T, lddn;
    xrnn_scan_rows(s, part, parts, &r0, &r1);
    for (idx k = 0; k < T && r1 > r0; k++) {
        idx t = s->reverse ? k : T - 1 - k, tp = s->reverse ? t + 1 : t - 1;
        XRNN_NAME(xrnn_step_rows)(s, t, tp, r0, r1, &m, &q);
        if (m <= r0)
            continue;
        const float *dn = xrnn_incoming(s, k, &lddn);
        float *a = s->A + xrnn_at(s, t, s->sA, s->lda);
        const float *c = s->C + xrnn_at(s, t, s->sC, s->ldc), *dy = s->dY + xrnn_at(s, t, s->sdY, s->lddy);
        for (int from_c0 = 0; from_c0 < 2; from_c0++) { /* rows [r0, q) after step tp, then [q, m) after c0 */
            idx i0 = from_c0 ? q : r0, i1 = from_c0 ? m : q;
            if (i1 <= i0)
                continue;
            const float *cp = from_c0 ? s->c0 : s->C + xrnn_at(s, tp, s->sC, s->ldc);
            idx ldcp = from_c0 ? s->ldc0 : s->ldc;
            XRNN_NAME(xrnn_lstm_step_backward)(i1 - i0, H, a + i0 * s->lda, s->lda, c + i0 * s->ldc, s->ldc,
                                               cp + i0 * ldcp, ldcp, dy + i0 * s->lddy, s->lddy,
                                               dn != NULL ? dn + i0 * lddn : NULL, lddn, s->w2 + i0 * s->ldw2, s->ldw2);
        }
        XRNN_NAME(xrnn_gemm_rows)(m - r0, H, 4 * H, a + r0 * s->lda, s->lda, s->P, s->w1 + r0 * s->ldw1, s->ldw1);
    }
}

/* GRU forward (numpy_fast.gru_scan): w1 = h_prev @ W_hh^T, then xrnn_gru_step. */
static inline void XRNN_NAME(xrnn_gru_piece)(const xrnn_scan_args *s, idx i0, idx i1, float *a, float *nh, float *y,
                                             const float *hp, idx ldhp) {
    idx H = s->H;
    float *w = s->w1 + i0 * s->ldw1;
    hp += i0 * ldhp;
    XRNN_NAME(xrnn_gemm_rows)(i1 - i0, 3 * H, H, hp, ldhp, s->P, w, s->ldw1);
    XRNN_NAME(xrnn_gru_step)(i1 - i0, H, a + i0 * s->lda, s->lda, w, s->ldw1, s->bh, hp, ldhp, nh + i0 * s->ldc,
                             s->ldc, y + i0 * s->ldy, s->ldy);
}

static void XRNN_NAME(xrnn_gru_scan_part)(void *arg, idx part, idx parts) {
    const xrnn_scan_args *s = (const xrnn_scan_args *)arg;
    idx r0, r1, m, q, T = s->T;
    xrnn_scan_rows(s, part, parts, &r0, &r1);
    for (idx k = 0; k < T && r1 > r0; k++) {
        idx t = s->reverse ? T - 1 - k : k, tp = s->reverse ? t + 1 : t - 1;
        XRNN_NAME(xrnn_step_rows)(s, t, tp, r0, r1, &m, &q);
        float *a = s->A + xrnn_at(s, t, s->sA, s->lda), *nh = s->C + xrnn_at(s, t, s->sC, s->ldc);
        float *y = s->Y + xrnn_at(s, t, s->sY, s->ldy);
        if (q > r0)
            XRNN_NAME(xrnn_gru_piece)(s, r0, q, a, nh, y, s->Y + xrnn_at(s, tp, s->sY, s->ldy), s->ldy);
        if (m > q)
            XRNN_NAME(xrnn_gru_piece)(s, q, m, a, nh, y, s->h0, s->ldh0);
    }
}

/* GRU backward (numpy_fast.gru_scan_backward): xrnn_gru_step_backward (hidden-side gradients
 * in w3, dh z in w2), then w1 = w3 @ W_hh. The caller adds w2 to w1 after the last step. */
static void XRNN_NAME(xrnn_gru_scan_backward_part)(void *arg, idx part, idx parts) {
    const xrnn_scan_args *s = (const xrnn_scan_args *)arg;
    idx r0, r1, m, q, H = s->H, T = s->T, lddn;
    xrnn_scan_rows(s, part, parts, &r0, &r1);
    for (idx k = 0; k < T && r1 > r0; k++) {
        idx t = s->reverse ? k : T - 1 - k, tp = s->reverse ? t + 1 : t - 1;
        XRNN_NAME(xrnn_step_rows)(s, t, tp, r0, r1, &m, &q);
        if (m <= r0)
            continue;
        const float *dn = xrnn_incoming(s, k, &lddn);
        float *a = s->A + xrnn_at(s, t, s->sA, s->lda), *nh = s->C + xrnn_at(s, t, s->sC, s->ldc);
        const float *dy = s->dY + xrnn_at(s, t, s->sdY, s->lddy);
        for (int from_h0 = 0; from_h0 < 2; from_h0++) { /* rows [r0, q) after step tp, then [q, m) after h0 */
            idx i0 = from_h0 ? q : r0, i1 = from_h0 ? m : q;
            if (i1 <= i0)
                continue;
            const float *hp = from_h0 ? s->h0 : s->Y + xrnn_at(s, tp, s->sY, s->ldy);
            idx ldhp = from_h0 ? s->ldh0 : s->ldy;
            XRNN_NAME(xrnn_gru_step_backward)(i1 - i0, H, a + i0 * s->lda, s->lda, nh + i0 * s->ldc, s->ldc,
                                              hp + i0 * ldhp, ldhp, dy + i0 * s->lddy, s->lddy,
                                              dn != NULL ? dn + i0 * lddn : NULL, lddn, s->w2 + i0 * s->ldw2, s->ldw2,
                                              s->w3 + i0 * s->ldw3, s->ldw3);
        }
        XRNN_NAME(xrnn_gemm_rows)(m - r0, H, 3 * H, s->w3 + r0 * s->ldw3, s->ldw3, s->P, s->w1 + r0 * s->ldw1,
                                  s->ldw1);
    }
}

/* Elman RNN forward (numpy_fast.rnn_scan): w1 = h_prev @ W_hh^T, then xrnn_rnn_step. */
static inline void XRNN_NAME(xrnn_rnn_piece)(const xrnn_scan_args *s, idx i0, idx i1, float *a, float *y,
                                             const float *hp, idx ldhp) {
    idx H = s->H;
    float *w = s->w1 + i0 * s->ldw1;
    XRNN_NAME(xrnn_gemm_rows)(i1 - i0, H, H, hp + i0 * ldhp, ldhp, s->P, w, s->ldw1);
    XRNN_NAME(xrnn_rnn_step)(i1 - i0, H, w, s->ldw1, a + i0 * s->lda, s->lda, y + i0 * s->ldy, s->ldy, s->relu);
}

static void XRNN_NAME(xrnn_rnn_scan_part)(void *arg, idx part, idx parts) {
    const xrnn_scan_args *s = (const xrnn_scan_args *)arg;
    idx r0, r1, m, q, T = s->T;
    xrnn_scan_rows(s, part, parts, &r0, &r1);
    for (idx k = 0; k < T && r1 > r0; k++) {
        idx t = s->reverse ? T - 1 - k : k, tp = s->reverse ? t + 1 : t - 1;
        XRNN_NAME(xrnn_step_rows)(s, t, tp, r0, r1, &m, &q);
        float *a = s->A + xrnn_at(s, t, s->sA, s->lda), *y = s->Y + xrnn_at(s, t, s->sY, s->ldy);
        if (q > r0)
            XRNN_NAME(xrnn_rnn_piece)(s, r0, q, a, y, s->Y + xrnn_at(s, tp, s->sY, s->ldy), s->ldy);
        if (m > q)
            XRNN_NAME(xrnn_rnn_piece)(s, q, m, a, y, s->h0, s->ldh0);
    }
}

/* Elman RNN backward (numpy_fast.rnn_scan_backward): xrnn_rnn_step_backward (dz over A), then
 * w1 = dz @ W_hh. */
static void XRNN_NAME(xrnn_rnn_scan_backward_part)(void *arg, idx part, idx parts) {
    const xrnn_scan_args *s = (const xrnn_scan_args *)arg;
    idx r0, r1, m, q, H = s->H, T = s->T, lddn;
    xrnn_scan_rows(s, part, parts, &r0, &r1);
    for (idx k = 0; k < T && r1 > r0; k++) {
        idx t = s->reverse ? k : T - 1 - k;
        XRNN_NAME(xrnn_step_rows)(s, t, -1, r0, r1, &m, &q);
        if (m <= r0)
            continue;
        const float *dn = xrnn_incoming(s, k, &lddn);
        float *a = s->A + xrnn_at(s, t, s->sA, s->lda) + r0 * s->lda;
        XRNN_NAME(xrnn_rnn_step_backward)(m - r0, H, a, s->lda, s->Y + xrnn_at(s, t, s->sY, s->ldy) + r0 * s->ldy,
                                          s->ldy, s->dY + xrnn_at(s, t, s->sdY, s->lddy) + r0 * s->lddy, s->lddy,
                                          dn != NULL ? dn + r0 * lddn : NULL, lddn, s->relu);
        XRNN_NAME(xrnn_gemm_rows)(m - r0, H, H, a, s->lda, s->P, s->w1 + r0 * s->ldw1, s->ldw1);
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
#undef XRNN_LDV
#undef XRNN_STV
#undef VEC
#undef XRNN_TW
#undef XRNN_KC
#undef XRNN_VW
