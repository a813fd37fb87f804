// Fused point-wise steps of the Elman RNN, LSTM and GRU, forward and backward.
//
// One launch per time step and direction; the matrix products stay with cuBLAS
// (cupy.matmul) in cupy_fast.py. Every formula is the portable path's
// (xrnn/functional.py), written in the same order of operations, so that in
// float64 the results agree to rounding and the forward caches hold the same
// values: the LSTM writes its activated gates [i, f, g, o] over A and its cell
// state to C; the GRU writes [r, z, n] over A and h W_hn^T + b_hn to NH; the
// backward kernels write the pre-activation gradients over A.
//
// Layouts (row-major; one thread per (b, j), idx = b H + j, n = B H):
//   a       (B, G H) this step's slice of A, contiguous
//   hw, gh  (B, G H) h_prev W_hh^T from cuBLAS
//   h, c    (B, H) contiguous state buffers
//   y, dy   rows of Y[t, :, col] / dY[t, :, col]: element (b, j) at b * ld + j
#include "common.cuh"

namespace xrnn {

// ---------------------------------------------------------------- Elman RNN
// h = act(a + h_prev W_hh^T); relu != 0 selects max(z, 0), else tanh
template <typename T>
__host__ __device__ inline void rnn_fwd_elem(long long idx, long long H, const T* a, const T* hw, long long relu,
                                             T* h, T* y, long long ldy) {
    long long b = idx / H, j = idx - b * H;
    T z = a[idx] + hw[idx];
    T v = relu ? (z < T(0) ? T(0) : z) : x_tanh(z);
    h[idx] = v;
    y[b * ldy + j] = v;
}
#define rnn_fwd_PARAMS(T) (long long n, long long H, const T* a, const T* hw, long long relu, T* h, T* y, long long ldy)
#define rnn_fwd_ARGS (idx, H, a, hw, relu, h, y, ldy)
XRNN_ELEMENTWISE(rnn_fwd)

// dz = act'(y) (dy + dh_next), written over a
template <typename T>
__host__ __device__ inline void rnn_bwd_elem(long long idx, long long H, T* a, const T* y, long long ldy,
                                             const T* dy, long long lddy, const T* dh_next, long long relu) {
    long long b = idx / H, j = idx - b * H;
    T dh = dy[b * lddy + j] + dh_next[idx];
    T h = y[b * ldy + j];
    a[idx] = relu ? dh * (h > T(0) ? T(1) : T(0)) : dh * (T(1) - h * h);
}
#define rnn_bwd_PARAMS(T) (long long n, long long H, T* a, const T* y, long long ldy, const T* dy, long long lddy, \
                           const T* dh_next, long long relu)
#define rnn_bwd_ARGS (idx, H, a, y, ldy, dy, lddy, dh_next, relu)
XRNN_ELEMENTWISE(rnn_bwd)

// ---------------------------------------------------------------- LSTM
// gates from a + hw (order i, f, g, o), c = f c_prev + i g, h = o tanh(c)
template <typename T>
__host__ __device__ inline void lstm_fwd_elem(long long idx, long long H, T* a, const T* hw, const T* c_prev,
                                              T* c_out, T* h, T* y, long long ldy) {
    long long b = idx / H, j = idx - b * H;
    T* ar = a + b * 4 * H;
    const T* hr = hw + b * 4 * H;
    T i = sigmoid(ar[j] + hr[j]);
    T f = sigmoid(ar[H + j] + hr[H + j]);
    T g = x_tanh(ar[2 * H + j] + hr[2 * H + j]);
    T o = sigmoid(ar[3 * H + j] + hr[3 * H + j]);
    T c = f * c_prev[idx] + i * g;
    T hv = o * x_tanh(c);
    ar[j] = i;
    ar[H + j] = f;
    ar[2 * H + j] = g;
    ar[3 * H + j] = o;
    c_out[idx] = c;
    h[idx] = hv;
    y[b * ldy + j] = hv;
}
#define lstm_fwd_PARAMS(T) (long long n, long long H, T* a, const T* hw, const T* c_prev, T* c_out, T* h, T* y, \
                            long long ldy)
#define lstm_fwd_ARGS (idx, H, a, hw, c_prev, c_out, h, y, ldy)
XRNN_ELEMENTWISE(lstm_fwd)

// gate gradients over a; dc (in: gradient of c_t from step t+1, out: of c_{t-1})
template <typename T>
__host__ __device__ inline void lstm_bwd_elem(long long idx, long long H, T* a, const T* c, const T* c_prev,
                                              const T* dy, long long lddy, const T* dh_next, T* dc) {
    long long b = idx / H, j = idx - b * H;
    T* ar = a + b * 4 * H;
    T i = ar[j], f = ar[H + j], g = ar[2 * H + j], o = ar[3 * H + j];
    T dh = dy[b * lddy + j] + dh_next[idx];
    T tc = x_tanh(c[idx]);
    T dcv = dc[idx] + dh * o * (T(1) - tc * tc);
    ar[j] = dcv * g * i * (T(1) - i);
    ar[H + j] = dcv * c_prev[idx] * f * (T(1) - f);
    ar[2 * H + j] = dcv * i * (T(1) - g * g);
    ar[3 * H + j] = dh * tc * o * (T(1) - o);
    dc[idx] = dcv * f;
}
#define lstm_bwd_PARAMS(T) (long long n, long long H, T* a, const T* c, const T* c_prev, const T* dy, \
                            long long lddy, const T* dh_next, T* dc)
#define lstm_bwd_ARGS (idx, H, a, c, c_prev, dy, lddy, dh_next, dc)
XRNN_ELEMENTWISE(lstm_bwd)

// ---------------------------------------------------------------- GRU
// PyTorch's GRU: r, z = sigmoid(a + gh (+ b_hh)), n = tanh(a_n + r (gh_n + b_hn)),
// h = n + z (h_prev - n); h is updated in place, NH gets gh_n + b_hn
template <typename T>
__host__ __device__ inline void gru_fwd_elem(long long idx, long long H, T* a, const T* gh, const T* bias,
                                             long long has_bias, T* h, T* nh, T* y, long long ldy) {
    long long b = idx / H, j = idx - b * H;
    T* ar = a + b * 3 * H;
    const T* gr = gh + b * 3 * H;
    T ghr = gr[j], ghz = gr[H + j], ghn = gr[2 * H + j];
    if (has_bias) {
        ghr = ghr + bias[j];
        ghz = ghz + bias[H + j];
        ghn = ghn + bias[2 * H + j];
    }
    T r = sigmoid(ar[j] + ghr);
    T z = sigmoid(ar[H + j] + ghz);
    T nv = x_tanh(ar[2 * H + j] + r * ghn);
    T hv = nv + z * (h[idx] - nv);
    ar[j] = r;
    ar[H + j] = z;
    ar[2 * H + j] = nv;
    nh[idx] = ghn;
    h[idx] = hv;
    y[b * ldy + j] = hv;
}
#define gru_fwd_PARAMS(T) (long long n, long long H, T* a, const T* gh, const T* bias, long long has_bias, T* h, \
                           T* nh, T* y, long long ldy)
#define gru_fwd_ARGS (idx, H, a, gh, bias, has_bias, h, nh, y, ldy)
XRNN_ELEMENTWISE(gru_fwd)

// dh = dy + (direct + mm), where mm = d_{t+1} W_hh and direct = dh_{t+1} z_{t+1} (the part
// of dh_t that bypasses W_hh); writes [dr, dz, dn] over a, dn r over nh, the hidden-side
// gradient [dr, dz, dn r] to d and the new direct part dh z
template <typename T>
__host__ __device__ inline void gru_bwd_elem(long long idx, long long H, T* a, T* nh, const T* h_prev,
                                             long long ldh, const T* dy, long long lddy, const T* mm, T* direct,
                                             T* d) {
    long long b = idx / H, j = idx - b * H;
    T* ar = a + b * 3 * H;
    T* dr_row = d + b * 3 * H;
    T r = ar[j], z = ar[H + j], nv = ar[2 * H + j];
    T dh = dy[b * lddy + j] + (direct[idx] + mm[idx]);
    T hp = h_prev[b * ldh + j];
    T dn = dh * (T(1) - z) * (T(1) - nv * nv);
    T dz = dh * (hp - nv) * z * (T(1) - z);
    T dr = dn * nh[idx] * r * (T(1) - r);
    T dnr = dn * r;
    ar[j] = dr;
    ar[H + j] = dz;
    ar[2 * H + j] = dn;
    nh[idx] = dnr;
    direct[idx] = dh * z;
    dr_row[j] = dr;
    dr_row[H + j] = dz;
    dr_row[2 * H + j] = dnr;
}
#define gru_bwd_PARAMS(T) (long long n, long long H, T* a, T* nh, const T* h_prev, long long ldh, const T* dy, \
                           long long lddy, const T* mm, T* direct, T* d)
#define gru_bwd_ARGS (idx, H, a, nh, h_prev, ldh, dy, lddy, mm, direct, d)
XRNN_ELEMENTWISE(gru_bwd)

// out = x + y (the GRU's last dh_direct + d W_hh, in the portable order)
template <typename T>
__host__ __device__ inline void add_elem(long long idx, const T* x, const T* y, T* out) {
    out[idx] = x[idx] + y[idx];
}
#define add_PARAMS(T) (long long n, const T* x, const T* y, T* out)
#define add_ARGS (idx, x, y, out)
XRNN_ELEMENTWISE(add)

}  // namespace xrnn
