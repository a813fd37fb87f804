// Fused optimizer updates and global gradient-norm clipping over all parameters.
//
// Multi-tensor: one launch updates every parameter. The arrays are named by a
// device table of pointers, ptrs[slot * ntensors + k] (slot 0 the parameters,
// 1 the gradients, then the optimizer's state slots), and the concatenation of
// all tensors is indexed by idx in [0, offsets[ntensors]); offsets[k] is where
// tensor k starts. The update rules are xrnn.optim's (torch.optim's single-tensor
// rules), in the same order of operations; scalars that depend on the step
// (bias corrections, Adagrad's decayed rate) are computed on the host from Python
// numbers, so a step reads nothing back from the device.
#include "common.cuh"

namespace xrnn {

template <typename T>
__host__ __device__ inline T* slot_ptr(const long long* ptrs, long long ntensors, long long slot, long long k) {
    return (T*)ptrs[slot * ntensors + k];
}

// SGD: g += wd p; momentum: b = g (first step) or b = mu b + (1 - dampening) g;
// nesterov: g + mu b, else b; p -= lr g.   slots: p, g, momentum_buffer
template <typename T>
__host__ __device__ inline void sgd_step_elem(long long idx, long long ntensors, const long long* offsets,
                                              const long long* ptrs, T lr, T wd, long long has_wd, T mu,
                                              T one_minus_damp, long long momentum, long long first,
                                              long long nesterov) {
    long long k = tensor_of(idx, ntensors, offsets), i = idx - offsets[k];
    T* p = slot_ptr<T>(ptrs, ntensors, 0, k);
    T g = slot_ptr<T>(ptrs, ntensors, 1, k)[i];
    T pv = p[i];
    if (has_wd) g = g + wd * pv;
    if (momentum) {
        T* buf = slot_ptr<T>(ptrs, ntensors, 2, k);
        T bv = first ? g : buf[i] * mu + one_minus_damp * g;
        buf[i] = bv;
        g = nesterov ? g + mu * bv : bv;
    }
    p[i] = pv - lr * g;
}
#define sgd_step_PARAMS(T) (long long n, long long ntensors, const long long* offsets, const long long* ptrs, T lr, \
                            T wd, long long has_wd, T mu, T one_minus_damp, long long momentum, long long first, \
                            long long nesterov)
#define sgd_step_ARGS (idx, ntensors, offsets, ptrs, lr, wd, has_wd, mu, one_minus_damp, momentum, first, nesterov)
XRNN_ELEMENTWISE(sgd_step)

// Adagrad: g += wd p; s += g^2; p -= clr g / (sqrt(s) + eps).   slots: p, g, sum
template <typename T>
__host__ __device__ inline void adagrad_step_elem(long long idx, long long ntensors, const long long* offsets,
                                                  const long long* ptrs, T clr, T wd, long long has_wd, T eps) {
    long long k = tensor_of(idx, ntensors, offsets), i = idx - offsets[k];
    T* p = slot_ptr<T>(ptrs, ntensors, 0, k);
    T* s = slot_ptr<T>(ptrs, ntensors, 2, k);
    T g = slot_ptr<T>(ptrs, ntensors, 1, k)[i];
    T pv = p[i];
    if (has_wd) g = g + wd * pv;
    T sv = s[i] + g * g;
    s[i] = sv;
    p[i] = pv - (clr * g) / (x_sqrt(sv) + eps);
}
#define adagrad_step_PARAMS(T) (long long n, long long ntensors, const long long* offsets, const long long* ptrs, \
                                T clr, T wd, long long has_wd, T eps)
#define adagrad_step_ARGS (idx, ntensors, offsets, ptrs, clr, wd, has_wd, eps)
XRNN_ELEMENTWISE(adagrad_step)

// RMSprop: g += wd p; v = alpha v + (1 - alpha) g^2; centered: m = lerp(m, g, 1 - alpha),
// d = sqrt(v - m^2) + eps, else d = sqrt(v) + eps; momentum: b = mu b + g / d, p -= lr b;
// else p -= lr g / d.   slots: p, g, square_avg, grad_avg, momentum_buffer
template <typename T>
__host__ __device__ inline void rmsprop_step_elem(long long idx, long long ntensors, const long long* offsets,
                                                  const long long* ptrs, T lr, T alpha, T one_minus_alpha, T eps,
                                                  T wd, long long has_wd, long long centered, T mu,
                                                  long long momentum) {
    long long k = tensor_of(idx, ntensors, offsets), i = idx - offsets[k];
    T* p = slot_ptr<T>(ptrs, ntensors, 0, k);
    T* v = slot_ptr<T>(ptrs, ntensors, 2, k);
    T g = slot_ptr<T>(ptrs, ntensors, 1, k)[i];
    T pv = p[i];
    if (has_wd) g = g + wd * pv;
    T vv = v[i] * alpha;
    vv = vv + one_minus_alpha * g * g;
    v[i] = vv;
    T d;
    if (centered) {
        T* m = slot_ptr<T>(ptrs, ntensors, 3, k);
        T mv = m[i] + one_minus_alpha * (g - m[i]);
        m[i] = mv;
        d = x_sqrt(vv - mv * mv) + eps;
    } else {
        d = x_sqrt(vv) + eps;
    }
    if (momentum) {
        T* b = slot_ptr<T>(ptrs, ntensors, 4, k);
        T bv = b[i] * mu;
        bv = bv + g / d;
        b[i] = bv;
        p[i] = pv - lr * bv;
    } else {
        p[i] = pv - (lr * g) / d;
    }
}
#define rmsprop_step_PARAMS(T) (long long n, long long ntensors, const long long* offsets, const long long* ptrs, \
                                T lr, T alpha, T one_minus_alpha, T eps, T wd, long long has_wd, long long centered, \
                                T mu, long long momentum)
#define rmsprop_step_ARGS (idx, ntensors, offsets, ptrs, lr, alpha, one_minus_alpha, eps, wd, has_wd, centered, mu, \
                           momentum)
XRNN_ELEMENTWISE(rmsprop_step)

// Adam / AdamW: decay 1: g += wd p (L2); decay 2: p *= 1 - lr wd (decoupled);
// m = lerp(m, g, 1 - b1); v = b2 v + (1 - b2) g^2; amsgrad: vmax = max(vmax, v), used for v;
// p -= step_size m / (sqrt(v) / bc2_sqrt + eps).   slots: p, g, exp_avg, exp_avg_sq, max_exp_avg_sq
template <typename T>
__host__ __device__ inline void adam_step_elem(long long idx, long long ntensors, const long long* offsets,
                                               const long long* ptrs, long long decay, T wd, T keep,
                                               T one_minus_b1, T b2, T one_minus_b2, T step_size, T bc2_sqrt, T eps,
                                               long long amsgrad) {
    long long k = tensor_of(idx, ntensors, offsets), i = idx - offsets[k];
    T* p = slot_ptr<T>(ptrs, ntensors, 0, k);
    T* m = slot_ptr<T>(ptrs, ntensors, 2, k);
    T* v = slot_ptr<T>(ptrs, ntensors, 3, k);
    T g = slot_ptr<T>(ptrs, ntensors, 1, k)[i];
    T pv = p[i];
    if (decay == 2) pv = pv * keep;
    else if (decay == 1) g = g + wd * pv;
    T mv = m[i] + one_minus_b1 * (g - m[i]);
    T vv = v[i] * b2;
    vv = vv + one_minus_b2 * g * g;
    m[i] = mv;
    v[i] = vv;
    if (amsgrad) {
        T* vmax = slot_ptr<T>(ptrs, ntensors, 4, k);
        T mx = nan_max(vmax[i], vv);
        vmax[i] = mx;
        vv = mx;
    }
    T denom = x_sqrt(vv) / bc2_sqrt + eps;
    p[i] = pv - (step_size * mv) / denom;
}
#define adam_step_PARAMS(T) (long long n, long long ntensors, const long long* offsets, const long long* ptrs, \
                             long long decay, T wd, T keep, T one_minus_b1, T b2, T one_minus_b2, T step_size, \
                             T bc2_sqrt, T eps, long long amsgrad)
#define adam_step_ARGS (idx, ntensors, offsets, ptrs, decay, wd, keep, one_minus_b1, b2, one_minus_b2, step_size, \
                        bc2_sqrt, eps, amsgrad)
XRNN_ELEMENTWISE(adam_step)

// ---------------------------------------------------------------- clipping
// the norm's per-element contribution and its combination (2-norm: squares, summed in
// double; inf-norm: absolute values, max keeping NaN)
template <typename T>
__host__ __device__ inline double norm_term(T x, long long inf) {
    double d = (double)x;
    return inf ? (d < 0 ? -d : d) : d * d;
}
__host__ __device__ inline double norm_combine(double a, double b, long long inf) {
    return inf ? nan_max(a, b) : a + b;
}
// the total norm from the combined terms, and torch's factor min(1, max_norm / (total + 1e-6))
template <typename T>
__host__ __device__ inline T norm_total(double acc, long long inf) {
    return inf ? T(acc) : T(sqrt(acc));
}
template <typename T>
__host__ __device__ inline T clip_coef(T total, T max_norm) {
    T c = max_norm / (total + T(1e-6));
    return c > T(1) ? T(1) : c;
}

}  // namespace xrnn

#define XRNN_NORM_BLOCK 256

#if defined(__CUDACC__)
// pass 1: each block combines the terms of its grid-stride share into partials[blockIdx.x]
template <typename T>
__global__ void norm_partials(long long n, long long ntensors, const long long* offsets, const long long* ptrs,
                              long long inf, double* partials) {
    __shared__ double red[XRNN_NORM_BLOCK];
    double acc = 0.0;
    XRNN_GRID_LOOP(idx, n) {
        long long k = xrnn::tensor_of(idx, ntensors, offsets);
        const T* g = xrnn::slot_ptr<T>(ptrs, ntensors, 1, k);
        acc = xrnn::norm_combine(acc, xrnn::norm_term<T>(g[idx - offsets[k]], inf), inf);
    }
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w /= 2) {
        if (threadIdx.x < w) red[threadIdx.x] = xrnn::norm_combine(red[threadIdx.x], red[threadIdx.x + w], inf);
        __syncthreads();
    }
    if (threadIdx.x == 0) partials[blockIdx.x] = red[0];
}

// pass 2: every block combines all partials in the same order (so all agree on the total),
// block 0 stores the total, and every block scales its share of the gradients by the factor
template <typename T>
__global__ void norm_clip(long long n, long long ntensors, const long long* offsets, const long long* ptrs,
                          long long inf, const double* partials, long long nparts, T max_norm, T* total_out) {
    __shared__ double red[XRNN_NORM_BLOCK];
    double acc = 0.0;
    for (long long q = threadIdx.x; q < nparts; q += blockDim.x) acc = xrnn::norm_combine(acc, partials[q], inf);
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w /= 2) {
        if (threadIdx.x < w) red[threadIdx.x] = xrnn::norm_combine(red[threadIdx.x], red[threadIdx.x + w], inf);
        __syncthreads();
    }
    T total = xrnn::norm_total<T>(red[0], inf);
    T coef = xrnn::clip_coef<T>(total, max_norm);
    if (blockIdx.x == 0 && threadIdx.x == 0) total_out[0] = total;
    XRNN_GRID_LOOP(idx, n) {
        long long k = xrnn::tensor_of(idx, ntensors, offsets);
        T* g = xrnn::slot_ptr<T>(ptrs, ntensors, 1, k);
        g[idx - offsets[k]] *= coef;
    }
}
#if !defined(__CUDACC_RTC__)
template __global__ void norm_partials<float>(long long, long long, const long long*, const long long*, long long,
                                              double*);
template __global__ void norm_partials<double>(long long, long long, const long long*, const long long*, long long,
                                               double*);
template __global__ void norm_clip<float>(long long, long long, const long long*, const long long*, long long,
                                          const double*, long long, float, float*);
template __global__ void norm_clip<double>(long long, long long, const long long*, const long long*, long long,
                                           const double*, long long, double, double*);
#endif
#endif

#if defined(XRNN_HOST_HARNESS)
// both passes in sequence, with one partial: the total, the factor and the scaling
template <typename T>
static void norm_clip_host(long long n, long long ntensors, const long long* offsets, const long long* ptrs,
                           long long inf, T max_norm, T* total_out) {
    double acc = 0.0;
    for (long long idx = 0; idx < n; ++idx) {
        long long k = xrnn::tensor_of(idx, ntensors, offsets);
        acc = xrnn::norm_combine(acc, xrnn::norm_term<T>(xrnn::slot_ptr<T>(ptrs, ntensors, 1, k)[idx - offsets[k]], inf), inf);
    }
    T total = xrnn::norm_total<T>(acc, inf);
    T coef = xrnn::clip_coef<T>(total, max_norm);
    total_out[0] = total;
    for (long long idx = 0; idx < n; ++idx) {
        long long k = xrnn::tensor_of(idx, ntensors, offsets);
        xrnn::slot_ptr<T>(ptrs, ntensors, 1, k)[idx - offsets[k]] *= coef;
    }
}
extern "C" void norm_clip_f32(long long n, long long ntensors, const long long* offsets, const long long* ptrs,
                              long long inf, float max_norm, float* total_out) {
    norm_clip_host<float>(n, ntensors, offsets, ptrs, inf, max_norm, total_out);
}
extern "C" void norm_clip_f64(long long n, long long ntensors, const long long* offsets, const long long* ptrs,
                              long long inf, double max_norm, double* total_out) {
    norm_clip_host<double>(n, ntensors, offsets, ptrs, inf, max_norm, total_out);
}
#endif
