"""CuPy fast path: fused CUDA kernels behind the portable signatures.

The portable scans launch a dozen or more small array operations per time
step (about 8,000 per default training step); on a GPU such a step is bound
by Python and launch overhead, not by arithmetic. Here each time step is one
cuBLAS product (``cupy.matmul``) plus **one** fused point-wise kernel, for
the Elman RNN (tanh and relu), the LSTM and the GRU, forward and backward.
Softmax cross-entropy is one kernel plus one reduction, an optimizer step
one kernel for all parameters, and global-norm clipping two kernels for all
gradients, with the clip factor kept on the device (no host read).

The CUDA C lives in ``kernels/cuda/*.cu`` (package data; see its header
comments). CuPy compiles it at first use with NVRTC (``cupy.RawModule``,
``-fmad=false`` so that products and sums round as NumPy's do; CuPy adds
``-ftz=true``, so float32 subnormals flush to zero), once per GPU. The
per-element math is ``__host__ __device__`` code: the test suite compiles the
same files for the CPU (``-DXRNN_HOST_HARNESS``) and runs the orchestration
below on NumPy arrays through :class:`HostLauncher`-style launchers, against
the portable path (``tests/test_cuda_kernels.py``).

Every function computes what its portable counterpart computes, with the
same side effects and forward caches (``A`` gets the activated gates, ``C``
the cell states, ``NH`` the GRU's ``h W_hn^T + b_hn``; the backward scans
write the gate gradients over ``A`` and ``NH``), so :mod:`xrnn.modules` and
:mod:`xrnn.optim` cannot tell the paths apart except by speed. Inputs this
path does not handle (float16, a non-contiguous ``A``/``C``/``NH``, ``Y``
with a strided last axis, empty sequences, optimizer subclasses, p-norms
other than 2 and inf) run the portable code instead.

The orchestration talks to the array library only through a *launcher*
(buffers, matrix products, kernel launches, pointer tables): :class:`CupyLauncher`
on the GPU, a ctypes launcher over the host-compiled kernels in the tests.
"""

from __future__ import annotations

import math
import os
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .. import functional as F
from .._typing import Array, ArrayNamespace

__all__ = [
    "SOURCE_DIR",
    "SOURCES",
    "NVRTC_OPTIONS",
    "KERNEL_NAMES",
    "source",
    "expression",
    "CupyLauncher",
    "launcher",
    "make_scans",
    "SCANS",
    "softmax_cross_entropy",
    "optimizer_step",
    "clip_grad_norm",
]

#: the CUDA C sources (package data) and the shared prelude they include
SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda")
SOURCES = ("recurrent.cu", "loss.cu", "optim.cu")
HEADER = "common.cuh"

#: NVRTC options: no fused multiply-add contraction, so that ``a * b + c`` rounds
#: twice as in NumPy (the kernels are bound by memory, not arithmetic)
NVRTC_OPTIONS = ("-fmad=false",)

#: kernel names per source file, as NVRTC name expressions take them (``{T}``: float or double)
KERNEL_NAMES = {
    "recurrent.cu": ("xrnn::rnn_fwd<{T}>", "xrnn::rnn_bwd<{T}>", "xrnn::lstm_fwd<{T}>", "xrnn::lstm_bwd<{T}>",
                     "xrnn::gru_fwd<{T}>", "xrnn::gru_bwd<{T}>", "xrnn::add<{T}>"),
    "loss.cu": ("ce_rows<{T}>",),
    "optim.cu": ("xrnn::sgd_step<{T}>", "xrnn::adagrad_step<{T}>", "xrnn::rmsprop_step<{T}>",
                 "xrnn::adam_step<{T}>", "norm_partials<{T}>", "norm_clip<{T}>"),
}
_FILE_OF = {n.split("<")[0].split("::")[-1]: f for f, names in KERNEL_NAMES.items() for n in names}

_CTYPES = {"float32": "float", "float64": "double"}
_BLOCK = 256  # threads per block; ce_rows and the norm kernels reduce over exactly this many
_MAX_BLOCKS = 65535
_NORM_PARTS = 1024  # at most this many partial norms (one per block of the first pass)


def source(name: str) -> str:
    """The text of one ``.cu`` file with ``common.cuh`` pasted in place of its ``#include``
    (so that CuPy's compile cache, keyed by the source text, sees every line)."""
    with open(os.path.join(SOURCE_DIR, HEADER)) as f:
        header = "".join(line for line in f if line.strip() != "#pragma once")
    with open(os.path.join(SOURCE_DIR, name)) as f:
        text = f.read()
    return text.replace(f'#include "{HEADER}"', header, 1)


def expression(name: str, dtype: str) -> tuple[str, str]:
    """(source file, NVRTC name expression) of kernel ``name`` for dtype ``"float32"``/``"float64"``."""
    file = _FILE_OF[name]
    expr = next(n for n in KERNEL_NAMES[file] if n.split("<")[0].split("::")[-1] == name)
    return file, expr.format(T=_CTYPES[dtype])


def _dtype_name(dt) -> str | None:
    name = np.dtype(dt).name if not hasattr(dt, "name") else dt.name
    return name if name in _CTYPES else None


# ---------------------------------------------------------------------------
# the CuPy launcher
# ---------------------------------------------------------------------------

class CupyLauncher:
    """Buffers, cuBLAS products and kernel launches on the current CuPy device and stream.

    Modules are compiled once per GPU (NVRTC, then CuPy's on-disk cache) and
    looked up per (GPU, kernel, dtype). Pointer and offset tables are cached
    by content, so a training step whose arrays keep their memory (xrnn
    updates parameters, gradients and optimizer state in place) copies
    nothing to the device after its first step.
    """

    def __init__(self):
        import cupy

        self.cp = cupy
        self._modules: dict = {}
        self._functions: dict = {}
        self._tables: dict = {}

    # -- arrays ----------------------------------------------------------------
    def empty(self, shape: tuple[int, ...], dtype: Any) -> Array:
        return self.cp.empty(shape, dtype=dtype)

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Array:
        return self.cp.zeros(shape, dtype=dtype)

    def copy(self, x: Array) -> Array:
        """A C-contiguous copy of ``x``."""
        return self.cp.array(x, copy=True, order="C")

    def contiguous(self, x: Array) -> Array:
        return self.cp.ascontiguousarray(x)

    def matmul(self, a: Array, b: Array, out: Array) -> None:
        self.cp.matmul(a, b, out=out)

    @staticmethod
    def ptr(x: Array) -> int:
        return int(x.data.ptr)

    def table(self, values: Sequence[int]) -> Array:
        """A device int64 array holding ``values`` (pointers or offsets), cached by content."""
        key = (self.cp.cuda.Device().id, tuple(values))
        arr = self._tables.get(key)
        if arr is None:
            if len(self._tables) > 64:  # bounded: models rebuilt in a loop must not leak
                self._tables.clear()
            arr = self._tables[key] = self.cp.asarray(np.asarray(values, dtype=np.int64))
        return arr

    # -- kernels ---------------------------------------------------------------
    def _function(self, name: str, dtype: str):
        dev_id = self.cp.cuda.Device().id
        key = (dev_id, name, dtype)
        fn = self._functions.get(key)
        if fn is not None:
            return fn
        file, expr = expression(name, dtype)
        mod = self._modules.get((dev_id, file))
        if mod is None:
            exprs = [n.format(T=t) for n in KERNEL_NAMES[file] for t in _CTYPES.values()]
            try:
                mod = self.cp.RawModule(code=source(file), options=NVRTC_OPTIONS, name_expressions=exprs)
                mod.compile()
            except Exception as e:  # NVRTC missing or failing: say which file and how to go on
                from ..errors import BackendUnavailableError

                raise BackendUnavailableError(
                    f"xrnn's fused CUDA kernels ({file}) did not compile with NVRTC "
                    f"({type(e).__name__}: {e}); install the CUDA runtime headers for CuPy "
                    "(the xrnn-array[cuda12]/[cuda13] extra), or set XRNN_PORTABLE=1 to run the portable path"
                ) from e
            self._modules[(dev_id, file)] = mod
        fn = self._functions[key] = mod.get_function(expr)
        return fn

    def _args(self, dtype: str, args):
        scalar = np.dtype(dtype).type
        out = []
        for a in args:
            if isinstance(a, (bool, int, np.integer)):
                out.append(np.int64(a))
            elif isinstance(a, (float, np.floating)):
                out.append(scalar(a))
            else:
                out.append(a)
        return tuple(out)

    def _launch(self, name, dtype, blocks, args):
        self._function(name, dtype)((int(blocks),), (_BLOCK,), self._args(dtype, args))

    def elementwise(self, name: str, dtype: str, n: int, *args: Any) -> None:
        """One grid-stride launch of ``name<T>`` over ``n`` elements."""
        if n > 0:
            self._launch(name, dtype, min(_MAX_BLOCKS, -(-n // _BLOCK)), (n, *args))

    def ce_rows(self, dtype: str, N: int, V: int, *args: Any) -> None:
        self._launch("ce_rows", dtype, min(_MAX_BLOCKS, N), (N, V, *args))

    def norm_clip(self, dtype: str, n: int, ntensors: int, offsets: Array, ptrs: Array, inf: bool, max_norm: float,
                  total_out: Array) -> None:
        nparts = min(_NORM_PARTS, -(-n // _BLOCK))
        partials = self.cp.empty((nparts,), dtype=self.cp.float64)
        self._launch("norm_partials", dtype, nparts, (n, ntensors, offsets, ptrs, inf, partials))
        self._launch("norm_clip", dtype, min(_MAX_BLOCKS, -(-n // _BLOCK)),
                     (n, ntensors, offsets, ptrs, inf, partials, nparts, max_norm, total_out))


_LAUNCHER = None


def launcher() -> CupyLauncher:
    """The process's :class:`CupyLauncher` (created at first use)."""
    global _LAUNCHER
    if _LAUNCHER is None:
        _LAUNCHER = CupyLauncher()
    return _LAUNCHER


# ---------------------------------------------------------------------------
# the six scans
# ---------------------------------------------------------------------------

def _row_stride(x) -> int | None:
    """Elements between rows of ``x[t, :, cols]`` for a 3-D array whose last axis is
    unit-strided (what the kernels index as ``b * ld + j``), else None."""
    item = x.itemsize
    if x.ndim != 3 or x.strides[2] != item or x.strides[1] % item:
        return None
    return x.strides[1] // item


def _same_float(dt, *arrays) -> bool:
    return all(a is None or a.dtype == dt for a in arrays)


def _fits(A, W_hh, Y, *buffers, others=()) -> str | None:
    """The dtype name when the fused scans handle these arrays, else None (portable)."""
    dt = _dtype_name(A.dtype)
    if dt is None or A.shape[0] == 0 or not A.flags.c_contiguous or _row_stride(Y) is None:
        return None
    if not all(b.flags.c_contiguous for b in buffers):
        return None
    if not _same_float(A.dtype, W_hh, Y, *buffers, *others):
        return None
    return dt


def _readable(K, dY):
    """``dY`` itself when its rows are unit-strided, else a contiguous copy (read only here)."""
    return dY if _row_stride(dY) is not None else K.contiguous(dY)


def make_scans(get_launcher: Callable[[], Any]) -> types.SimpleNamespace:
    """The six scans over the launcher ``get_launcher()`` returns (see the module docstring)."""

    def rnn_scan(xp, A, W_hh, h0, Y, col: slice, reverse: bool, nonlinearity: str):
        """See :func:`xrnn.functional.rnn_scan`. ``A`` is left unchanged."""
        dt = _fits(A, W_hh, Y, others=(h0,))
        if dt is None:
            return F.rnn_scan(xp, A, W_hh, h0, Y, col, reverse, nonlinearity)
        K = get_launcher()
        T, B, H = A.shape
        z = K.empty((B, H), A.dtype)  # (B, H) h_prev @ W_hh^T
        h = K.copy(h0)  # (B, H)
        Wt = W_hh.T
        ldy, relu = _row_stride(Y), nonlinearity == "relu"
        for t in F._order(T, reverse):
            K.matmul(h, Wt, z)
            K.elementwise("rnn_fwd", dt, B * H, H, A[t, ...], z, relu, h, Y[t, :, col], ldy)
        return h

    def rnn_scan_backward(xp, A, Y, col: slice, W_hh, dY, dhT, reverse: bool, nonlinearity: str):
        """See :func:`xrnn.functional.rnn_scan_backward`; writes dz over ``A``."""
        dt = _fits(A, W_hh, Y, others=(dY, dhT))
        if dt is None:
            return F.rnn_scan_backward(xp, A, Y, col, W_hh, dY, dhT, reverse, nonlinearity)
        K = get_launcher()
        T, B, H = A.shape
        dY = _readable(K, dY)
        dh_next = K.zeros((B, H), A.dtype) if dhT is None else K.copy(dhT)  # dY + 0 is dY exactly
        ldy, lddy, relu = _row_stride(Y), _row_stride(dY), nonlinearity == "relu"
        for t in F._order(T, not reverse):
            K.elementwise("rnn_bwd", dt, B * H, H, A[t, ...], Y[t, :, col], ldy, dY[t, :, col], lddy, dh_next, relu)
            K.matmul(A[t, ...], W_hh, dh_next)
        return dh_next

    def lstm_scan(xp, A, W_hh, h0, c0, Y, col: slice, C, reverse: bool):
        """See :func:`xrnn.functional.lstm_scan`; ``A`` becomes ``[i, f, g, o]``, ``C`` the cell states."""
        dt = _fits(A, W_hh, Y, C, others=(h0, c0))
        if dt is None:
            return F.lstm_scan(xp, A, W_hh, h0, c0, Y, col, C, reverse)
        K = get_launcher()
        T, B, G = A.shape
        H = G // 4
        hw = K.empty((B, G), A.dtype)  # (B, 4H) h_prev @ W_hh^T
        h = K.copy(h0)  # (B, H)
        c_prev = K.copy(c0)  # (B, H)
        Wt = W_hh.T
        ldy = _row_stride(Y)
        for t in F._order(T, reverse):
            K.matmul(h, Wt, hw)
            K.elementwise("lstm_fwd", dt, B * H, H, A[t, ...], hw, c_prev, C[t, ...], h, Y[t, :, col], ldy)
            c_prev = C[t, ...]
        return h, K.copy(c_prev)

    def lstm_scan_backward(xp, A, C, c0, W_hh, dY, col: slice, dhT, dcT, reverse: bool):
        """See :func:`xrnn.functional.lstm_scan_backward`; writes the gate gradients over ``A``."""
        dt = _fits(A, W_hh, dY, C, others=(c0, dhT, dcT))
        if dt is None:
            return F.lstm_scan_backward(xp, A, C, c0, W_hh, dY, col, dhT, dcT, reverse)
        K = get_launcher()
        T, B, G = A.shape
        H = G // 4
        dY = _readable(K, dY)
        lddy = _row_stride(dY)
        dh_next = K.zeros((B, H), A.dtype) if dhT is None else K.copy(dhT)  # (B, H)
        dc = K.zeros((B, H), A.dtype) if dcT is None else K.copy(dcT)  # (B, H) 0 + x is x exactly
        c0 = K.copy(c0)
        step = -1 if reverse else 1  # the previous step is t - step
        for t in F._order(T, not reverse):
            tp = t - step
            c_prev = c0 if (tp < 0 or tp >= T) else C[tp, ...]
            K.elementwise("lstm_bwd", dt, B * H, H, A[t, ...], C[t, ...], c_prev, dY[t, :, col], lddy, dh_next, dc)
            K.matmul(A[t, ...], W_hh, dh_next)
        return dh_next, dc

    def gru_scan(xp, A, W_hh, b_hh, h0, Y, col: slice, NH, reverse: bool):
        """See :func:`xrnn.functional.gru_scan`; ``A`` becomes ``[r, z, n]``, ``NH`` gets ``h W_hn^T + b_hn``."""
        dt = _fits(A, W_hh, Y, NH, others=(b_hh, h0))
        if dt is None:
            return F.gru_scan(xp, A, W_hh, b_hh, h0, Y, col, NH, reverse)
        K = get_launcher()
        T, B, G = A.shape
        H = G // 3
        gh = K.empty((B, G), A.dtype)  # (B, 3H) h_prev @ W_hh^T
        h = K.copy(h0)  # (B, H) updated in place by each step
        bias = gh if b_hh is None else K.contiguous(b_hh)  # (3H,); unread without a bias
        Wt = W_hh.T
        ldy = _row_stride(Y)
        for t in F._order(T, reverse):
            K.matmul(h, Wt, gh)
            K.elementwise("gru_fwd", dt, B * H, H, A[t, ...], gh, bias, b_hh is not None, h, NH[t, ...],
                          Y[t, :, col], ldy)
        return h

    def gru_scan_backward(xp, A, NH, Y, col: slice, h0, W_hh, dY, dhT, reverse: bool):
        """See :func:`xrnn.functional.gru_scan_backward`; writes over ``A`` and ``NH``."""
        dt = _fits(A, W_hh, Y, NH, others=(h0, dY, dhT))
        if dt is None:
            return F.gru_scan_backward(xp, A, NH, Y, col, h0, W_hh, dY, dhT, reverse)
        K = get_launcher()
        T, B, G = A.shape
        H = G // 3
        dY = _readable(K, dY)
        ldy, lddy = _row_stride(Y), _row_stride(dY)
        mm = K.zeros((B, H), A.dtype) if dhT is None else K.copy(dhT)  # (B, H) d_{t+1} @ W_hh (dhT first)
        direct = K.zeros((B, H), A.dtype)  # (B, H) dh_{t+1} z_{t+1}: the part that bypasses W_hh
        d = K.empty((B, G), A.dtype)  # (B, 3H) hidden-side gradient [dr, dz, dn r]
        h0 = K.copy(h0)
        step = -1 if reverse else 1
        for t in F._order(T, not reverse):
            tp = t - step
            if tp < 0 or tp >= T:
                hp, ldh = h0, H
            else:
                hp, ldh = Y[tp, :, col], ldy
            K.elementwise("gru_bwd", dt, B * H, H, A[t, ...], NH[t, ...], hp, ldh, dY[t, :, col], lddy, mm,
                          direct, d)
            K.matmul(d, W_hh, mm)
        out = K.empty((B, H), A.dtype)
        K.elementwise("add", dt, B * H, direct, mm, out)  # dh_direct + d @ W_hh, the portable order
        return out

    return types.SimpleNamespace(
        name="cupy-fused",
        rnn_scan=rnn_scan,
        rnn_scan_backward=rnn_scan_backward,
        lstm_scan=lstm_scan,
        lstm_scan_backward=lstm_scan_backward,
        gru_scan=gru_scan,
        gru_scan_backward=gru_scan_backward,
    )


#: the scans :func:`xrnn.kernels.scans_for` hands to CuPy devices
SCANS = make_scans(launcher)


# ---------------------------------------------------------------------------
# softmax cross-entropy
# ---------------------------------------------------------------------------

def softmax_cross_entropy(K: Any, xp: ArrayNamespace, logits: Array, targets: Array,
                          ignore_index: int | None) -> tuple[Array, Array] | None:
    """The fused :func:`xrnn.functional.softmax_cross_entropy` after its checks.

    ``logits`` (..., V) floating, ``targets`` (...) integer (validated by the
    caller). Returns ``(loss, dlogits)`` as the portable function does, or None
    when this path does not apply (the caller then runs the portable code).
    """
    dt = _dtype_name(logits.dtype)
    V = logits.shape[-1]
    N = math.prod(logits.shape[:-1])
    if dt is None or N == 0 or V == 0:
        return None
    x = K.contiguous(xp.reshape(logits, (N, V)))  # (N, V)
    t = xp.reshape(targets, (N,))
    if t.dtype != xp.int64:
        t = xp.astype(t, xp.int64)
    t = K.contiguous(t)  # (N,)
    grad = K.empty((N, V), logits.dtype)  # (N, V)
    nllw = K.empty((N,), logits.dtype)  # (N,) each row's nll (times its weight)
    if ignore_index is None:
        count = max(N, 1)
        K.ce_rows(dt, N, V, x, t, False, 0, float(count), nllw, False, grad, nllw)
        loss = xp.sum(nllw) / count
    else:
        keep = xp.astype(t != ignore_index, logits.dtype)  # (N,)
        sw = xp.sum(keep)
        count = K.contiguous(xp.reshape(xp.maximum(sw, xp.ones_like(sw)), (1,)))  # (1,) on the device
        K.ce_rows(dt, N, V, x, t, True, int(ignore_index), 1.0, count, True, grad, nllw)
        loss = xp.sum(nllw) / count[0]
    return loss, xp.reshape(grad, tuple(logits.shape))


# ---------------------------------------------------------------------------
# optimizers and clipping
# ---------------------------------------------------------------------------

def _tensors_fit(dt_obj, arrays) -> bool:
    return all(a.dtype == dt_obj and a.flags.c_contiguous for a in arrays)


def _offsets(arrays) -> list:
    out = [0]
    for a in arrays:
        out.append(out[-1] + int(a.size))
    return out


def optimizer_step(K: Any, opt: Any, params: Mapping[str, Array], grads: Mapping[str, Array], t: int) -> bool:
    """Apply ``opt``'s update for step ``t`` to every parameter with one kernel launch.

    Returns False (nothing done) when this path does not handle the optimizer:
    a subclass of the built-in ones, another dtype, non-contiguous arrays, a
    gradient of another shape or dtype; the caller then runs the portable update.
    """
    from .. import optim as O

    kind = type(opt)
    if kind not in (O.SGD, O.Adagrad, O.RMSprop, O.Adam, O.AdamW):
        return False
    names = list(params)
    P = [params[k] for k in names]
    G = [grads[k] for k in names]
    dt = _dtype_name(P[0].dtype) if P else None
    if dt is None or not _tensors_fit(P[0].dtype, P + G):
        return False
    if any(tuple(p.shape) != tuple(g.shape) for p, g in zip(P, G)):
        return False
    n_el = sum(int(p.size) for p in P)
    if n_el == 0:
        return False
    h = opt._hyper
    state = opt._state
    lr = h["lr"]
    ntensors = len(names)
    offsets = K.table(_offsets(P))

    def slot(name):
        arrays = [state[k][name] for k in names]
        return arrays if _tensors_fit(P[0].dtype, arrays) else None

    def run(kernel, slots, *scalars):
        ptrs = [K.ptr(a) for group in slots for a in group]
        K.elementwise(kernel, dt, n_el, ntensors, offsets, K.table(ptrs), *scalars)

    wd = h.get("weight_decay", 0.0)
    if kind is O.SGD:
        mu = h["momentum"]
        slots = [P, G]
        first = False
        if mu != 0:
            have = [("momentum_buffer" in state[k]) for k in names]
            if any(have) and not all(have):
                return False
            first = not have[0]
            if first:  # torch: the buffer starts as the first (decayed) gradient, written by the kernel
                for k, p in zip(names, P):
                    state[k]["momentum_buffer"] = K.empty(tuple(p.shape), p.dtype)
            buf = slot("momentum_buffer")
            if buf is None:
                return False
            slots.append(buf)
        run("sgd_step", slots, lr, wd, wd != 0, mu, 1.0 - h["dampening"], mu != 0, first, h["nesterov"])
        return True
    if kind is O.Adagrad:
        s = slot("sum")
        if s is None:
            return False
        clr = lr / (1 + (t - 1) * h["lr_decay"])
        run("adagrad_step", [P, G, s], clr, wd, wd != 0, h["eps"])
        return True
    if kind is O.RMSprop:
        v = slot("square_avg")
        m = slot("grad_avg") if h["centered"] else P
        b = slot("momentum_buffer") if h["momentum"] > 0 else P  # P: a placeholder never read
        if v is None or m is None or b is None:
            return False
        alpha = h["alpha"]
        run("rmsprop_step", [P, G, v, m, b], lr, alpha, 1.0 - alpha, h["eps"], wd, wd != 0, h["centered"],
            h["momentum"], h["momentum"] > 0)
        return True
    # Adam / AdamW
    b1, b2 = h["betas"]
    m, v = slot("exp_avg"), slot("exp_avg_sq")
    vmax = slot("max_exp_avg_sq") if h["amsgrad"] else P
    if m is None or v is None or vmax is None:
        return False
    decay = 0 if wd == 0 else (2 if opt._decoupled else 1)
    step_size = lr / (1.0 - b1 ** t)
    bc2_sqrt = (1.0 - b2 ** t) ** 0.5
    run("adam_step", [P, G, m, v, vmax], decay, wd, 1.0 - lr * wd, 1.0 - b1, b2, 1.0 - b2, step_size, bc2_sqrt,
        h["eps"], h["amsgrad"])
    return True


def clip_grad_norm(K: Any, xp: ArrayNamespace, grads: list, max_norm: float, p: float) -> Array | None:
    """Global-norm clipping of ``grads`` in place: two launches, the factor stays on the device.

    Returns the total norm (a 0-d array in the gradients' dtype), or None when
    this path does not apply (``p`` not 2 or inf, mixed dtypes, non-contiguous
    or empty gradients).
    """
    if p not in (2.0, math.inf) or not grads:
        return None
    dt = _dtype_name(grads[0].dtype)
    if dt is None or not _tensors_fit(grads[0].dtype, grads):
        return None
    n_el = sum(int(g.size) for g in grads)
    if n_el == 0:
        return None
    ntensors = len(grads)
    ptrs = [0] * ntensors + [K.ptr(g) for g in grads]  # slot 1: the gradients
    total = K.empty((1,), grads[0].dtype)  # (1,)
    K.norm_clip(dt, n_el, ntensors, K.table(_offsets(grads)), K.table(ptrs), p == math.inf, max_norm, total)
    return xp.reshape(total, ())
