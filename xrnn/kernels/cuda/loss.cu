// Fused softmax cross-entropy and its gradient: one block per row of (N, V) logits.
//
// As xrnn.functional.softmax_cross_entropy: z = x - max(x); s = sum(exp(z));
// nll = log(s) - z[t]; grad = (exp(z) / s - onehot(t)) / count, or, with an ignored
// target value, (exp(z) / s - onehot(t)) * (w / count) with w = 0 at ignored rows
// (whose target counts as class 0, like the portable path). The kernel writes the
// gradient and each row's weighted nll; the loss is their sum over count (one
// deterministic reduction by CuPy afterwards: no atomics, so runs repeat bit for bit).
#include "common.cuh"

namespace xrnn {

// weight of a row: 0 for an ignored target, else 1
template <typename T>
__host__ __device__ inline T ce_weight(long long t, long long has_ignore, long long ignore) {
    return (has_ignore && t == ignore) ? T(0) : T(1);
}

// the class a row's gradient subtracts 1 from (ignored rows: class 0, weight 0)
__host__ __device__ inline long long ce_class(long long t, long long has_ignore, long long ignore) {
    return (has_ignore && t == ignore) ? 0 : t;
}

// -log softmax(x)[t] from the row max mx, s = sum(exp(x - mx)) and the target's logit xt
template <typename T>
__host__ __device__ inline T ce_nll(T mx, T s, T xt) {
    return x_log(s) - (xt - mx);
}

// gradient element: (exp(x - mx) / s - onehot) / count, or * (w / count) when `scale_mul`
template <typename T>
__host__ __device__ inline T ce_grad(T x, T mx, T s, bool is_target, T scale, long long scale_mul) {
    T p = x_exp(x - mx) / s - (is_target ? T(1) : T(0));
    return scale_mul ? p * scale : p / scale;
}

}  // namespace xrnn

#define XRNN_CE_BLOCK 256

#if defined(__CUDACC__)
// count: scalar count (no ignore) or, when count_ptr_used, read from count_ptr[0] (a device
// scalar: the number of kept rows, at least 1), so that no host read is needed
template <typename T>
__global__ void ce_rows(long long N, long long V, const T* x, const long long* tgt, long long has_ignore,
                        long long ignore, T count, const T* count_ptr, long long count_ptr_used, T* grad, T* nllw) {
    __shared__ T red[XRNN_CE_BLOCK];
    for (long long row = blockIdx.x; row < N; row += gridDim.x) {
        const T* xr = x + row * V;
        T* gr = grad + row * V;
        T mx = xr[0];
        for (long long k = threadIdx.x; k < V; k += blockDim.x) mx = xrnn::nan_max(mx, xr[k]);
        red[threadIdx.x] = mx;
        __syncthreads();
        for (int w = blockDim.x / 2; w > 0; w /= 2) {
            if (threadIdx.x < w) red[threadIdx.x] = xrnn::nan_max(red[threadIdx.x], red[threadIdx.x + w]);
            __syncthreads();
        }
        mx = red[0];
        __syncthreads();
        T s = T(0);
        for (long long k = threadIdx.x; k < V; k += blockDim.x) s += xrnn::x_exp(xr[k] - mx);
        red[threadIdx.x] = s;
        __syncthreads();
        for (int w = blockDim.x / 2; w > 0; w /= 2) {
            if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
            __syncthreads();
        }
        s = red[0];
        __syncthreads();
        long long t = tgt[row];
        T w = xrnn::ce_weight<T>(t, has_ignore, ignore);
        long long cls = xrnn::ce_class(t, has_ignore, ignore);
        T cnt = count_ptr_used ? count_ptr[0] : count;
        T scale = has_ignore ? w / cnt : cnt;
        for (long long k = threadIdx.x; k < V; k += blockDim.x)
            gr[k] = xrnn::ce_grad<T>(xr[k], mx, s, k == cls, scale, has_ignore);
        if (threadIdx.x == 0) {
            T nll = xrnn::ce_nll<T>(mx, s, xr[cls]);
            nllw[row] = has_ignore ? nll * w : nll;
        }
    }
}
#if !defined(__CUDACC_RTC__)
template __global__ void ce_rows<float>(long long, long long, const float*, const long long*, long long, long long,
                                        float, const float*, long long, float*, float*);
template __global__ void ce_rows<double>(long long, long long, const double*, const long long*, long long, long long,
                                         double, const double*, long long, double*, double*);
#endif
#endif

#if defined(XRNN_HOST_HARNESS)
// the same per-row computation, rows and classes in sequence
template <typename T>
static void ce_rows_host(long long N, long long V, const T* x, const long long* tgt, long long has_ignore,
                         long long ignore, T count, const T* count_ptr, long long count_ptr_used, T* grad, T* nllw) {
    for (long long row = 0; row < N; ++row) {
        const T* xr = x + row * V;
        T mx = xr[0];
        for (long long k = 0; k < V; ++k) mx = xrnn::nan_max(mx, xr[k]);
        T s = T(0);
        for (long long k = 0; k < V; ++k) s += xrnn::x_exp(xr[k] - mx);
        long long t = tgt[row];
        T w = xrnn::ce_weight<T>(t, has_ignore, ignore);
        long long cls = xrnn::ce_class(t, has_ignore, ignore);
        T cnt = count_ptr_used ? count_ptr[0] : count;
        T scale = has_ignore ? w / cnt : cnt;
        for (long long k = 0; k < V; ++k) grad[row * V + k] = xrnn::ce_grad<T>(xr[k], mx, s, k == cls, scale, has_ignore);
        T nll = xrnn::ce_nll<T>(mx, s, xr[cls]);
        nllw[row] = has_ignore ? nll * w : nll;
    }
}
extern "C" void ce_rows_f32(long long N, long long V, const float* x, const long long* tgt, long long has_ignore,
                            long long ignore, float count, const float* count_ptr, long long count_ptr_used,
                            float* grad, float* nllw) {
    ce_rows_host<float>(N, V, x, tgt, has_ignore, ignore, count, count_ptr, count_ptr_used, grad, nllw);
}
extern "C" void ce_rows_f64(long long N, long long V, const double* x, const long long* tgt, long long has_ignore,
                            long long ignore, double count, const double* count_ptr, long long count_ptr_used,
                            double* grad, double* nllw) {
    ce_rows_host<double>(N, V, x, tgt, has_ignore, ignore, count, count_ptr, count_ptr_used, grad, nllw);
}
#endif
