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

/* The portable copy: the compiler's baseline target (SSE2 on x86-64, NEON on arm64). */
#define XRNN_NAME(f) f##_base
#include "recurrent_kernels.h"
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

/* The kernels' version, so the loader can refuse a library built from other source. */
XRNN_EXPORT int xrnn_cpu_abi(void) { return 2; }

#ifdef XRNN_PYTHON_MODULE
static struct PyModuleDef xrnn_cpu_module = {
    PyModuleDef_HEAD_INIT, "_xrnn_cpu",
    "xrnn's fused CPU kernels, loaded with ctypes by xrnn.kernels.native (no Python functions).", -1, NULL,
};

PyMODINIT_FUNC PyInit__xrnn_cpu(void) { return PyModule_Create(&xrnn_cpu_module); }
#endif
