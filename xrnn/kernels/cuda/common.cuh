// xrnn CUDA prelude: shared by every .cu file of xrnn.kernels (see cupy_fast.py).
//
// The same text compiles three ways:
//   * NVRTC (CuPy's RawModule, at run time on the GPU): __CUDACC__ and __CUDACC_RTC__
//     are defined; templates are instantiated by name ("lstm_fwd<float>");
//   * nvcc (tests/test_cuda_kernels.py, in CI without a GPU): explicit float and
//     double instantiations make every kernel body compile to PTX;
//   * a plain C++ compiler, or nvcc's host pass, with -DXRNN_HOST_HARNESS: the
//     per-element math (the __host__ __device__ functions below) runs on the CPU
//     through extern "C" loops, which the tests call with ctypes and compare with
//     the portable NumPy path.
//
// Each element-wise kernel is a grid-stride loop whose body is one call of its
// NAME_elem function, and the host harness runs exactly that call for every index:
// what the CPU test checks is what the GPU runs, except the parallel schedule (no
// kernel here reads an element another thread of the same launch writes).
#pragma once

#if !defined(__CUDACC_RTC__)
#include <math.h>
#endif

#if !defined(__CUDACC__)
#define __host__
#define __device__
#endif

namespace xrnn {

// float and double overloads of the C math functions (NVRTC needs no header for these)
__host__ __device__ inline float x_tanh(float x) { return tanhf(x); }
__host__ __device__ inline double x_tanh(double x) { return tanh(x); }
__host__ __device__ inline float x_exp(float x) { return expf(x); }
__host__ __device__ inline double x_exp(double x) { return exp(x); }
__host__ __device__ inline float x_log(float x) { return logf(x); }
__host__ __device__ inline double x_log(double x) { return log(x); }
__host__ __device__ inline float x_sqrt(float x) { return sqrtf(x); }
__host__ __device__ inline double x_sqrt(double x) { return sqrt(x); }

// The portable path's logistic function: 0.5 (tanh(x / 2) + 1), exact and overflow-free.
template <typename T>
__host__ __device__ inline T sigmoid(T x) {
    return T(0.5) * (x_tanh(T(0.5) * x) + T(1));
}

// max that keeps a NaN (NumPy's maximum propagates NaN; fmax would drop it)
template <typename T>
__host__ __device__ inline T nan_max(T a, T b) {
    return (a != a || a > b) ? a : b;
}

// ids of the multi-tensor kernels: which of `ntensors` arrays element `idx` of the
// concatenation falls in, given offsets[0..ntensors] (offsets[0] = 0), by bisection
__host__ __device__ inline long long tensor_of(long long idx, long long ntensors, const long long* offsets) {
    long long lo = 0, hi = ntensors - 1;
    while (lo < hi) {
        long long mid = (lo + hi + 1) / 2;
        if (offsets[mid] <= idx) lo = mid; else hi = mid - 1;
    }
    return lo;
}

}  // namespace xrnn

#define XRNN_GRID_LOOP(idx, n) \
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < (n); \
         idx += (long long)gridDim.x * blockDim.x)

// XRNN_ELEMENTWISE(NAME) needs NAME_PARAMS(T) (the parameter list, starting with
// `long long n`) and NAME_ARGS (the argument list of NAME_elem, starting with idx).
#if defined(__CUDACC__)
#if defined(__CUDACC_RTC__)
#define XRNN_INSTANTIATE(NAME)
#else
#define XRNN_INSTANTIATE(NAME) \
    template __global__ void NAME<float> NAME##_PARAMS(float); \
    template __global__ void NAME<double> NAME##_PARAMS(double);
#endif
#define XRNN_KERNEL(NAME) \
    template <typename T> __global__ void NAME NAME##_PARAMS(T) { \
        XRNN_GRID_LOOP(idx, n) xrnn::NAME##_elem<T> NAME##_ARGS; \
    } \
    XRNN_INSTANTIATE(NAME)
#else
#define XRNN_KERNEL(NAME)
#endif

#if defined(XRNN_HOST_HARNESS)
#define XRNN_HOST_EXPORT(NAME) \
    extern "C" void NAME##_f32 NAME##_PARAMS(float) { \
        for (long long idx = 0; idx < n; ++idx) xrnn::NAME##_elem<float> NAME##_ARGS; \
    } \
    extern "C" void NAME##_f64 NAME##_PARAMS(double) { \
        for (long long idx = 0; idx < n; ++idx) xrnn::NAME##_elem<double> NAME##_ARGS; \
    }
#else
#define XRNN_HOST_EXPORT(NAME)
#endif

#define XRNN_ELEMENTWISE(NAME) XRNN_KERNEL(NAME) XRNN_HOST_EXPORT(NAME)
