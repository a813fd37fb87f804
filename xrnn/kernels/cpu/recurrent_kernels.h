/* The kernels of recurrent.c, compiled once per instruction set: recurrent.c includes this
 * file with XRNN_NAME(f) defined to add a suffix to every name (f_base, f_avx2), the second
 * time under a target pragma, so that each copy, helpers included, is compiled and inlined
 * for its instruction set. Nothing here is meant to be included elsewhere. */

static inline float XRNN_NAME(xrnn_exp)(float x) {
    x = x < -87.33654f ? -87.33654f : x;
    x = x > 88.72283f ? 88.72283f : x;
    /* n = round(x / ln 2): adding and removing 1.5 * 2^23 rounds to the nearest integer */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f; /* ln 2 in two parts (Cody and Waite) */
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = ((int32_t)n + 127) * 8388608; /* 2^n as float bits: (n + 127) << 23 */
    float s;
    memcpy(&s, &e, sizeof s);
    return p * s;
}

static inline float XRNN_NAME(xrnn_sigmoid)(float x) { return 1.0f / (1.0f + XRNN_NAME(xrnn_exp)(-x)); }

static inline float XRNN_NAME(xrnn_tanh)(float x) { return 2.0f / (1.0f + XRNN_NAME(xrnn_exp)(-2.0f * x)) - 1.0f; }

/* One LSTM forward step (numpy_fast.lstm_scan, after the product).
 * a:  (n, 4H) pre-activations x W_ih^T + b, in: plus hw; out: activated [i, f, g, o]
 * hw: (n, 4H) h_prev @ W_hh^T
 * cp: (n, H) c_prev;  cn: (n, H) out c;  h: (n, H) out h = o * tanh(c) */
XRNN_EXPORT void XRNN_NAME(xrnn_lstm_step)(idx n, idx H, float *XRNN_RESTRICT a, idx lda,
                                            const float *XRNN_RESTRICT hw, idx ldhw,
                                            const float *XRNN_RESTRICT cp, idx ldcp,
                                            float *XRNN_RESTRICT cn, idx ldcn, float *XRNN_RESTRICT h, idx ldh) {
    for (idx r = 0; r < n; r++) {
        float *XRNN_RESTRICT ar = a + r * lda;
        const float *XRNN_RESTRICT wr = hw + r * ldhw;
        const float *XRNN_RESTRICT cpr = cp + r * ldcp;
        float *XRNN_RESTRICT cnr = cn + r * ldcn;
        float *XRNN_RESTRICT hr = h + r * ldh;
        for (idx j = 0; j < H; j++) {
            float i = XRNN_NAME(xrnn_sigmoid)(ar[j] + wr[j]);
            float f = XRNN_NAME(xrnn_sigmoid)(ar[H + j] + wr[H + j]);
            float g = XRNN_NAME(xrnn_tanh)(ar[2 * H + j] + wr[2 * H + j]);
            float o = XRNN_NAME(xrnn_sigmoid)(ar[3 * H + j] + wr[3 * H + j]);
            float c = f * cpr[j] + i * g;
            ar[j] = i;
            ar[H + j] = f;
            ar[2 * H + j] = g;
            ar[3 * H + j] = o;
            cnr[j] = c;
            hr[j] = o * XRNN_NAME(xrnn_tanh)(c);
        }
    }
}

/* One LSTM backward step (numpy_fast.lstm_scan_backward, before the product).
 * a:   (n, 4H) activated [i, f, g, o] in, gate gradients [di, df, dg, do] out
 * c:   (n, H) c_t;  cp: (n, H) c_{t-1}
 * dy:  (n, H) gradient of the output at t;  dhn: (n, H) gradient from step t+1, or NULL
 * dc:  (n, H) in: gradient of c_t from step t+1; out: gradient of c_{t-1} */
static inline void XRNN_NAME(xrnn_lstm_row_backward)(idx H, int has_next, float *XRNN_RESTRICT ar,
                                                      const float *XRNN_RESTRICT cr,
                                                      const float *XRNN_RESTRICT cpr,
                                                      const float *XRNN_RESTRICT dyr,
                                                      const float *XRNN_RESTRICT dnr, float *XRNN_RESTRICT dcr) {
    for (idx j = 0; j < H; j++) {
        float dh = has_next ? dyr[j] + dnr[j] : dyr[j];
        float i = ar[j], f = ar[H + j], g = ar[2 * H + j], o = ar[3 * H + j];
        float tc = XRNN_NAME(xrnn_tanh)(cr[j]);
        float d = dcr[j] + dh * o * (1.0f - tc * tc);
        ar[j] = d * g * i * (1.0f - i);
        ar[H + j] = d * cpr[j] * f * (1.0f - f);
        ar[2 * H + j] = d * i * (1.0f - g * g);
        ar[3 * H + j] = dh * tc * o * (1.0f - o);
        dcr[j] = d * f;
    }
}

XRNN_EXPORT void XRNN_NAME(xrnn_lstm_step_backward)(idx n, idx H, float *XRNN_RESTRICT a, idx lda,
                                                     const float *XRNN_RESTRICT c, idx ldc,
                                                     const float *XRNN_RESTRICT cp, idx ldcp,
                                                     const float *XRNN_RESTRICT dy, idx lddy,
                                                     const float *XRNN_RESTRICT dhn, idx lddhn,
                                                     float *XRNN_RESTRICT dc, idx lddc) {
    /* one row loop, specialised (inlined with a constant) for "a gradient from step t+1" or not,
     * as the GRU's below */
    for (idx r = 0; r < n; r++) {
        if (dhn != NULL)
            XRNN_NAME(xrnn_lstm_row_backward)(H, 1, a + r * lda, c + r * ldc, cp + r * ldcp, dy + r * lddy,
                                              dhn + r * lddhn, dc + r * lddc);
        else
            XRNN_NAME(xrnn_lstm_row_backward)(H, 0, a + r * lda, c + r * ldc, cp + r * ldcp, dy + r * lddy,
                                              dy + r * lddy, dc + r * lddc);
    }
}

/* One GRU forward step (numpy_fast.gru_scan, after the product).
 * a:  (n, 3H) x W_ih^T + b_ih in, activated [r, z, n] out
 * gh: (n, 3H) h_prev @ W_hh^T;  bh: (3H,) b_hh or NULL
 * hp: (n, H) h_prev;  nh: (n, H) out W_hn h_prev + b_hn;  h: (n, H) out */
XRNN_EXPORT void XRNN_NAME(xrnn_gru_step)(idx n, idx H, float *XRNN_RESTRICT a, idx lda,
                                           const float *XRNN_RESTRICT gh, idx ldgh, const float *XRNN_RESTRICT bh,
                                           const float *XRNN_RESTRICT hp, idx ldhp,
                                           float *XRNN_RESTRICT nh, idx ldnh, float *XRNN_RESTRICT h, idx ldh) {
    for (idx r = 0; r < n; r++) {
        float *XRNN_RESTRICT ar = a + r * lda;
        const float *XRNN_RESTRICT gr = gh + r * ldgh;
        const float *XRNN_RESTRICT hpr = hp + r * ldhp;
        float *XRNN_RESTRICT nhr = nh + r * ldnh;
        float *XRNN_RESTRICT hr = h + r * ldh;
        if (bh != NULL) {
            for (idx j = 0; j < H; j++) {
                float rr = XRNN_NAME(xrnn_sigmoid)(ar[j] + (gr[j] + bh[j]));
                float z = XRNN_NAME(xrnn_sigmoid)(ar[H + j] + (gr[H + j] + bh[H + j]));
                float hn = gr[2 * H + j] + bh[2 * H + j];
                float nn = XRNN_NAME(xrnn_tanh)(ar[2 * H + j] + rr * hn);
                ar[j] = rr;
                ar[H + j] = z;
                ar[2 * H + j] = nn;
                nhr[j] = hn;
                hr[j] = nn + (hpr[j] - nn) * z;
            }
        } else {
            for (idx j = 0; j < H; j++) {
                float rr = XRNN_NAME(xrnn_sigmoid)(ar[j] + gr[j]);
                float z = XRNN_NAME(xrnn_sigmoid)(ar[H + j] + gr[H + j]);
                float hn = gr[2 * H + j];
                float nn = XRNN_NAME(xrnn_tanh)(ar[2 * H + j] + rr * hn);
                ar[j] = rr;
                ar[H + j] = z;
                ar[2 * H + j] = nn;
                nhr[j] = hn;
                hr[j] = nn + (hpr[j] - nn) * z;
            }
        }
    }
}

/* One GRU backward step (numpy_fast.gru_scan_backward, before the product).
 * a:   (n, 3H) activated [r, z, n] in, input-side gradients [dr, dz, dn] out
 * nh:  (n, H) W_hn h_prev + b_hn in, its gradient dn * r out
 * hp:  (n, H) h_prev;  dy: (n, H);  dhn: (n, H) (d @ W_hh) from step t+1, or NULL
 * direct: (n, H) in: dh * z of step t+1 (read only with dhn); out: dh * z of this step
 * d:   (n, 3H) out: hidden-side gradients [dr, dz, dn * r] (the next product's operand) */
static inline void XRNN_NAME(xrnn_gru_row_backward)(idx H, int has_next, float *XRNN_RESTRICT ar, float *XRNN_RESTRICT nhr,
                                         const float *XRNN_RESTRICT hpr, const float *XRNN_RESTRICT dyr,
                                         const float *XRNN_RESTRICT dnr, float *XRNN_RESTRICT dir,
                                         float *XRNN_RESTRICT dr) {
    for (idx j = 0; j < H; j++) {
        float dh = has_next ? dyr[j] + (dnr[j] + dir[j]) : dyr[j];
        float rr = ar[j], z = ar[H + j], nn = ar[2 * H + j];
        float dn = dh * (1.0f - z) * (1.0f - nn * nn);
        float dz = dh * (hpr[j] - nn) * z * (1.0f - z);
        float drr = dn * nhr[j] * rr * (1.0f - rr);
        float dnh = dn * rr;
        ar[j] = drr;
        ar[H + j] = dz;
        ar[2 * H + j] = dn;
        dr[j] = drr;
        dr[H + j] = dz;
        dr[2 * H + j] = dnh;
        nhr[j] = dnh;
        dir[j] = dh * z;
    }
}

XRNN_EXPORT void XRNN_NAME(xrnn_gru_step_backward)(idx n, idx H, float *XRNN_RESTRICT a, idx lda,
                                                    float *XRNN_RESTRICT nh, idx ldnh,
                                                    const float *XRNN_RESTRICT hp, idx ldhp,
                                                    const float *XRNN_RESTRICT dy, idx lddy,
                                                    const float *XRNN_RESTRICT dhn, idx lddhn,
                                                    float *XRNN_RESTRICT direct, idx lddir,
                                                    float *XRNN_RESTRICT d, idx ldd) {
    for (idx r = 0; r < n; r++) {
        if (dhn != NULL)
            XRNN_NAME(xrnn_gru_row_backward)(H, 1, a + r * lda, nh + r * ldnh, hp + r * ldhp, dy + r * lddy, dhn + r * lddhn,
                                  direct + r * lddir, d + r * ldd);
        else
            XRNN_NAME(xrnn_gru_row_backward)(H, 0, a + r * lda, nh + r * ldnh, hp + r * ldhp, dy + r * lddy, dy + r * lddy,
                                  direct + r * lddir, d + r * ldd);
    }
}

/* One Elman RNN forward step (numpy_fast.rnn_scan, after the product).
 * z: (n, H) h_prev @ W_hh^T;  a: (n, H) x W_ih^T + b (left unchanged)
 * h: (n, H) out tanh(z + a), or relu(z + a) when relu is nonzero */
XRNN_EXPORT void XRNN_NAME(xrnn_rnn_step)(idx n, idx H, const float *XRNN_RESTRICT z, idx ldz,
                                          const float *XRNN_RESTRICT a, idx lda, float *XRNN_RESTRICT h, idx ldh,
                                          idx relu) {
    for (idx r = 0; r < n; r++) {
        const float *XRNN_RESTRICT zr = z + r * ldz;
        const float *XRNN_RESTRICT ar = a + r * lda;
        float *XRNN_RESTRICT hr = h + r * ldh;
        if (relu) {
            for (idx j = 0; j < H; j++) {
                float v = zr[j] + ar[j];
                hr[j] = v > 0.0f ? v : 0.0f;
            }
        } else {
            for (idx j = 0; j < H; j++)
                hr[j] = XRNN_NAME(xrnn_tanh)(zr[j] + ar[j]);
        }
    }
}

/* One Elman RNN backward step (numpy_fast.rnn_scan_backward, before the product).
 * dz: (n, H) out (dy + dhn) * (1 - y^2), or * (y > 0) when relu is nonzero
 * y: (n, H) the step's output;  dy: (n, H);  dhn: (n, H) dz @ W_hh from step t+1, or NULL */
XRNN_EXPORT void XRNN_NAME(xrnn_rnn_step_backward)(idx n, idx H, float *XRNN_RESTRICT dz, idx lddz,
                                                   const float *XRNN_RESTRICT y, idx ldy,
                                                   const float *XRNN_RESTRICT dy, idx lddy,
                                                   const float *XRNN_RESTRICT dhn, idx lddhn, idx relu) {
    for (idx r = 0; r < n; r++) {
        float *XRNN_RESTRICT dr = dz + r * lddz;
        const float *XRNN_RESTRICT yr = y + r * ldy;
        const float *XRNN_RESTRICT dyr = dy + r * lddy;
        const float *XRNN_RESTRICT dnr = dhn != NULL ? dhn + r * lddhn : dyr;
        float keep = dhn != NULL ? 1.0f : 0.0f; /* dnr is a valid row either way */
        if (relu) {
            for (idx j = 0; j < H; j++)
                dr[j] = yr[j] > 0.0f ? dyr[j] + keep * dnr[j] : 0.0f;
        } else {
            for (idx j = 0; j < H; j++)
                dr[j] = (dyr[j] + keep * dnr[j]) * (1.0f - yr[j] * yr[j]);
        }
    }
}
