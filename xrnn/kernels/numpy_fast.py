"""NumPy fast path: the six sequence scans of :mod:`xrnn.functional`, in place.

Same signatures, results and side effects as the portable scans (``A`` is
overwritten with the activated gates in the LSTM/GRU forward and with the
gate gradients in every backward; ``Y``, ``C`` and ``NH`` are written; the
RNN forward leaves ``A`` alone), so :class:`xrnn.modules.LSTM` and friends
cannot tell them apart except by speed. ``tests/test_kernels.py`` checks
every layer option against the portable path.

What makes them faster (profile and numbers in ``benchmarks/README.md``):

* no temporaries inside the time loop: every element-wise step writes into
  buffers allocated once per call, with ``out=`` and in-place operators (the
  portable step builds about a dozen (B, H) temporaries and a ``concat``);
* the recurrent product goes straight into a buffer,
  ``np.matmul(h, W_hh.T, out=...)``, then is added in place;
* ``exp`` instead of ``tanh``: NumPy's float32 ``exp`` costs less than half
  of its ``tanh`` (1.4 vs 3.1 ns per element on the benchmark machine). All
  four LSTM gates are activated by one pass of ``1 / (1 + exp(-s x))`` over
  the row (s = 1, or 2 for g, with ``tanh(g) = 2 sigmoid(2 g) - 1``); other
  sigmoids are ``1 / (1 + exp(-x))``; ``tanh`` of arrays with at least
  ``_EXP_TANH_MIN`` elements is ``2 / (1 + exp(-2 x)) - 1``. ``exp``
  overflows to ``inf`` for very negative arguments, which gives the exact
  limits (0 and -1); its overflow/underflow warnings are silenced. Absolute
  error: a few ulp of 1;
* rows of fewer than ``_EXP_TANH_MIN`` elements (batch-1 character models)
  activate the LSTM gates with one ``tanh`` (``sigmoid(x) = tanh(x/2)/2 +
  1/2``): there a step's cost is its number of NumPy calls. For the same
  reason the LSTM backward of small steps computes every factor that depends
  only on the forward's values for many steps at once and keeps 7 calls per
  step (``_LSTM_FACTORED_MAX``);
* the recurrent products run on row counts rounded up to a multiple of 8
  (zero rows, results dropped): OpenBLAS's float32 kernels take as long for
  61 rows as for 64 (``_ROW_MULTIPLE``; this matters for ``lengths=``
  batches, whose steps run on every row count);
* float32 scans run whole in the fused C kernels when they are loaded
  (:mod:`xrnn.kernels.native`, ``cpu/scan_kernels.h``): one call for all T
  steps, each step's product on a recurrent weight packed once per call and
  its element-wise math in one pass with the same formulas (the ``exp`` forms
  above), the batch's rows split over threads; everything below is the NumPy
  code that runs without them (and for float64);
* the Elman RNN, whose step has a single element-wise op, takes this path
  only from ``_RNN_FAST_MIN`` elements per step when the kernels are not
  loaded; below it the portable scans are faster and run instead.

This module is the NumPy backend's own kernel, so it calls ``numpy``
directly on the arrays (they are NumPy arrays: ``scans_for`` only hands
this path to NumPy devices). The ``xp`` argument is kept for the shared
signature.
"""

from __future__ import annotations

import ctypes
import functools
import types

import numpy as np

from .. import functional as F
from .._typing import Array, ArrayNamespace
from . import native as _native

__all__ = [
    "SCANS",
    "rnn_scan",
    "rnn_scan_backward",
    "lstm_scan",
    "lstm_scan_backward",
    "gru_scan",
    "gru_scan_backward",
    "forward_weight",
]


def _quiet(fn):
    """Run ``fn`` with exp's overflow/underflow ignored: ``exp(-x)`` is ``inf`` for very
    negative ``x``, which gives the exact limits (sigmoid 0, tanh -1), not an error."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with np.errstate(over="ignore", under="ignore"):
            return fn(*args, **kwargs)

    return wrapped


_order = F._order  # time steps in processing order


#: below this many elements ``np.tanh`` wins: the exp form's five extra ufunc
#: calls cost more than its cheaper arithmetic (measured: 4x slower at B*H = 100,
#: 20% faster at 32768)
_EXP_TANH_MIN = 4096


#: from this many steps the forward scans copy ``W_hh^T`` into a contiguous array once:
#: OpenBLAS multiplies ``h @ Wt`` about 10 % faster from it than from the transposed view
#: (the product alone; medium and large shapes, one thread, minima of 300 interleaved
#: calls; the issue measured 20 % on an Intel Xeon), which repays the copy (one pass over
#: the weights) after a few steps. Across a whole forward on the AMD EPYC the gain is
#: within noise (benchmarks/README.md)
_CONTIGUOUS_WT_MIN_STEPS = 4


#: from this many elements ``W^T`` is copied in strips of 16 rows: NumPy's one-call transposed copy
#: walks the destination across cache lines (4.4 ms for (2048, 512) float32 on the AMD EPYC; in
#: strips 0.95 ms; below this size the single call wins)
_STRIP_TRANSPOSE_MIN = 1 << 16


def _transpose_copy(W):
    """A C-contiguous copy of ``W.T`` (W: (M, K) -> (K, M))."""
    if W.size < _STRIP_TRANSPOSE_MIN or W.ndim != 2:
        return np.ascontiguousarray(W.T)
    M = W.shape[0]
    out = np.empty((W.shape[1], M), dtype=W.dtype)  # (K, M)
    for i in range(0, M, 16):
        out[:, i:i + 16] = W[i:i + 16].T
    return out


def _recurrent_weight(W_hh, T: int):
    """``W_hh^T`` (H, G*H) for the forward products: a contiguous copy for sequences of
    ``_CONTIGUOUS_WT_MIN_STEPS`` steps or more, else the transposed view (no copy either way
    when ``W_hh`` came from :func:`forward_weight`)."""
    if T >= _CONTIGUOUS_WT_MIN_STEPS:
        return W_hh.T if W_hh.T.flags.c_contiguous else _transpose_copy(W_hh)
    return W_hh.T


class _PackedWeight(np.ndarray):
    """``W_hh`` with its packed forms for the C scans attached (``packed[backward]``,
    :func:`pack_weight`): what :func:`forward_weight` and :func:`backward_weight` return when the
    kernels are loaded. Views of it (slices, ``.T``) carry none."""

    packed: dict | None = None


def _with_packed(W, P, backward: bool):
    w = W.view(_PackedWeight)
    w.packed = {backward: P}
    return w


def _packed_for(nat, W_hh, backward: bool = False):
    """The packed ``W_hh`` a scan multiplies by: the one attached by :func:`forward_weight` /
    :func:`backward_weight` (the layer's segments share it), else packed now."""
    P = (getattr(W_hh, "packed", None) or {}).get(backward)
    return P if P is not None and not isinstance(P, str) else pack_weight(nat, W_hh, backward)


#: the C backward scans pack the recurrent weight when the copy is at most this many bytes, or at
#: most 1/_PACK_SHARE of the gate buffer (the gates are half or more of what a training step holds,
#: so the copy stays under 4 % of it). Above both, the copy would raise the step's peak memory past
#: its target, which the backward sets (the medium LSTM's 4 MB, 1/13 of its gates: 1.009 -> 1.054
#: times the least its backward needs), and the backward runs one product per step in NumPy's BLAS
#: (which packs into a buffer of its own) with the step kernels.
#: A ``lengths=`` batch also packs when the copy is at most half of the gate memory its padding
#: does not hold (``padding``): its step then holds less than the same batch at full length would,
#: and its shorter steps, where NumPy's BLAS packs the whole weight again for a few rows, are
#: where the per-step path loses most (a step of 22 rows of the medium LSTM took 1.8 times its
#: share of a full step's time; in the one ragged C call, 1.1)
_PACK_SMALL = 1 << 18
_PACK_SHARE = 16
_PACK_PADDING_SHARE = 2
_PER_STEP = "per-step"  # attached by backward_weight: the layer's segments take the per-step path


def _backward_packed(nat, W_hh, gates: int, padding: int = 0):
    """The packed weight a C backward scan over a gate buffer of ``gates`` elements (and ``padding``
    more that a ``lengths=`` batch's padding does not hold) multiplies by, or None: the per-step path
    runs (:data:`_PACK_SMALL`). The one :func:`backward_weight` attached (or its decision) wins."""
    P = (getattr(W_hh, "packed", None) or {}).get(True)
    if P is not None:
        return None if isinstance(P, str) else P
    size = 4 * nat.packed_size(W_hh.shape[1], W_hh.shape[0])  # bytes
    if size <= _PACK_SMALL or size * _PACK_SHARE <= 4 * gates or size * _PACK_PADDING_SHARE <= 4 * padding:
        return pack_weight(nat, W_hh, backward=True)
    return None


def forward_weight(W_hh: Array, T: int) -> Array:
    """``W_hh`` (G*H, H) laid out for the forward products of ``T`` steps, made once per layer and
    direction: a batch with ``lengths=`` scans segment by segment, and with this weight no segment
    lays the weight out again (one pass over it each). With the C kernels loaded: ``W_hh`` with its
    packed form attached (:class:`_PackedWeight`). Else the transpose of a contiguous ``W_hh^T``
    copy (same shape and values, column-major), which short segments, which would take the strided
    view, get too."""
    nat = _native_for(W_hh)
    if nat is not None:
        return _with_packed(W_hh, pack_weight(nat, W_hh), False)
    if T >= _CONTIGUOUS_WT_MIN_STEPS:
        return _transpose_copy(W_hh).T
    return W_hh


def backward_weight(W_hh: Array, gates: int | None = None, padding: int = 0) -> Array:
    """``W_hh`` (G*H, H) for the backward products of a layer's segments, whose gate buffers hold
    ``gates`` elements in all (``padding``: the gate elements of the padded positions, which no
    buffer holds): with the C kernels loaded, with its packed form attached (packed once, not once
    per segment) or the decision that every segment takes the per-step path
    (:func:`_backward_packed`); else ``W_hh`` itself."""
    nat = _native_for(W_hh)
    if nat is None:
        return W_hh
    P = _backward_packed(nat, W_hh, gates if gates is not None else 0, padding)
    return _with_packed(W_hh, _PER_STEP if P is None else P, True)


#: the recurrent products run on a row count rounded up to a multiple of this: OpenBLAS's
#: float32 kernels work on blocks of rows, and a step of 50 or 63 rows costs as much as one
#: of 56 or 64 (and more than 48: 865 vs 677 us for (n, 512) @ (512, 2048), one thread, on
#: the AMD EPYC). The extra rows are zeros whose products are thrown away. It matters most
#: for ``lengths=`` batches, whose steps run on every row count from B down to 1: the
#: recurrent products of the forward took 0.87 of the full batch's time unrounded and 0.79
#: rounded (lengths uniform in [T/2, T], 0.74 of the steps; benchmarks/README.md)
_ROW_MULTIPLE = 8


def _gemm_rows(n: int) -> int:
    """The rows a recurrent product of ``n`` rows runs on: ``n`` itself when it is a multiple of
    ``_ROW_MULTIPLE`` or at most that, else the next multiple (padding rows are zero)."""
    m = _ROW_MULTIPLE
    if n <= m or n % m == 0:
        return n
    return (n + m - 1) // m * m


class _RowPad:
    """The left operand of the per-step product ``x @ W`` (x: (n, K)), padded to
    :func:`_gemm_rows` rows with zeros.

    ``rows`` is the padded count; :meth:`product` writes ``x @ W`` into a (rows, N) ``out`` and
    returns its first n rows. ``operand()`` is the (n, K) part of the padded buffer, for a caller
    that can write its next ``x`` there and so save the copy (then pass ``copy=False``).
    """

    def __init__(self, n: int, K: int, dtype):
        self.n, self.rows = n, _gemm_rows(n)
        self.buf = np.zeros((self.rows, K), dtype=dtype) if self.rows != n else None  # (rows, K)

    def operand(self):
        return None if self.buf is None else self.buf[:self.n]

    def out(self, N: int, dtype):
        """A (rows, N) result buffer for :meth:`product`."""
        return np.empty((self.rows, N), dtype=dtype)

    def product(self, x, W, out, copy: bool = True):
        """``x @ W`` (n, N), computed as ``[x; 0] @ W`` into ``out`` (rows, N) when padded."""
        if self.buf is None:
            np.matmul(x, W, out=out)
            return out
        if copy:
            self.buf[:self.n] = x
        np.matmul(self.buf, W, out=out)
        return out[:self.n]


def project(X: Array, W: Array, out: Array | None, bias: Array | None = None) -> Array:
    """``X @ W^T + bias`` (N, G*H): the input projection, into ``out`` when given (a buffer the
    layer kept from its last call, :meth:`xrnn.modules._RNNBase._take_buffer`).

    With a bias the product runs on ``[X, 1, 0...]`` (N, K) and ``[W, bias, 0...]`` (G*H, K),
    K = I + 1 rounded up to a multiple of 8: the bias is added inside the product, where a separate
    ``A += bias`` is one more pass over the largest array of the step (52 MB for the medium LSTM:
    30.5-33.8 ms for product plus add, 27.6-29.1 ms as one product, 2 threads, AMD EPYC). The
    copy of X this needs is I/(G*H) of that pass's size."""
    if bias is None:
        return X @ W.T if out is None else np.matmul(X, W.T, out=out)
    N, I = X.shape
    K = (I + 1 + 7) // 8 * 8
    Xa = np.empty((N, K), dtype=X.dtype)  # (N, K) [X, 1, 0...]
    Xa[:, :I] = X
    Xa[:, I] = 1.0
    Xa[:, I + 1:] = 0.0
    Wa = np.zeros((W.shape[0], K), dtype=W.dtype)  # (G*H, K) [W, bias, 0...]
    Wa[:, :I] = W
    Wa[:, I] = bias
    if out is None:
        return Xa @ Wa.T
    return np.matmul(Xa, Wa.T, out=out)


def _sigmoid_(x, out):
    """``out = 1 / (1 + exp(-x))`` in place (``out`` may be ``x``)."""
    np.negative(x, out=out)
    np.exp(out, out=out)
    out += 1.0
    np.reciprocal(out, out=out)
    return out


def _tanh_(x, out):
    """``out = tanh(x)``; for large arrays as ``2 / (1 + exp(-2x)) - 1`` (float32 ``exp``
    costs less than half of ``tanh`` in NumPy). Absolute error a few ulp of 1."""
    if x.size < _EXP_TANH_MIN:
        return np.tanh(x, out=out)
    np.multiply(x, -2.0, out=out)
    np.exp(out, out=out)
    out += 1.0
    np.divide(2.0, out, out=out)
    out -= 1.0
    return out


def _lstm_scale(H: int, dtype):
    """(4H,) factors that turn the gate pre-activations into the argument of one
    ``exp`` for all four gates: -1 for i, f, o (sigmoid) and -2 for g, whose
    ``tanh(g) = 2 sigmoid(2 g) - 1``."""
    scale = np.full((4 * H,), -1.0, dtype=dtype)
    scale[2 * H:3 * H] = -2.0
    return scale


def _lstm_gates_(a, H: int, scale):
    """Activate LSTM pre-activations ``a`` (B, 4H) in place: sigmoid i, f, o and tanh g,
    with four passes over the whole row instead of three sigmoids and a tanh."""
    np.multiply(a, scale, out=a)
    np.exp(a, out=a)
    a += 1.0
    np.reciprocal(a, out=a)
    g = a[:, 2 * H:3 * H]
    g *= 2.0
    g -= 1.0
    return a


def _lstm_tanh_consts(H: int, dtype):
    """(4H,) factor and offset of the small-step gate formula: sigmoid(x) = tanh(x/2)/2 + 1/2
    for i, f, o, and tanh itself for g (factor 1, offset 0)."""
    half = np.full((4 * H,), 0.5, dtype=dtype)
    half[2 * H:3 * H] = 1.0
    off = np.full((4 * H,), 0.5, dtype=dtype)
    off[2 * H:3 * H] = 0.0
    return half, off


def _lstm_gates_tanh_(a, half, off):
    """Activate LSTM pre-activations ``a`` (B, 4H) in place with one ``tanh`` and three passes:
    for rows below ``_EXP_TANH_MIN`` elements, where each NumPy call costs more than its
    arithmetic (4 calls instead of the exp form's 6)."""
    a *= half
    np.tanh(a, out=a)
    a *= half
    a += off
    return a


# ---------------------------------------------------------------------------
# fused C kernels (xrnn/kernels/native.py): one call per step for the element-wise math
# ---------------------------------------------------------------------------

def _kernel_layout(x) -> bool:
    """Whether the kernels can take ``x`` as it is: float32, unit stride along its rows, whole
    elements between rows and steps."""
    return x.dtype == np.float32 and x.strides[-1] == 4 and all(st % 4 == 0 for st in x.strides)


def _native_for(*arrays):
    """The fused kernels (:func:`xrnn.kernels.native.kernels`) when they are loaded and every
    array has :func:`_kernel_layout`, else None (the NumPy code runs)."""
    k = _native.kernels()
    if k is None or not all(_kernel_layout(x) for x in arrays):
        return None
    return k


def _addr(x) -> int:
    """The address of ``x``'s first element."""
    return x.__array_interface__["data"][0]


class _Rows:
    """A (T, B, N) float32 array's columns ``col`` as the C scans take them: the address of
    ``[0, 0, col.start]`` (``base``), the step stride in bytes (``step``) and the row stride in
    elements (``ld``). A 2-D array (N_rows, N) is the packed rows of a ragged scan (step 0: the
    scan finds each step's rows from its offsets)."""

    def __init__(self, X, col: slice | None = None):
        self.array = X  # kept alive with its address
        off = 0 if col is None or col.start is None else col.start
        self.base = _addr(X) + 4 * off
        self.step = X.strides[0] if X.ndim == 3 else 0
        self.ld = X.strides[-2] // 4

    def at(self, t: int) -> int:
        """The address of step t's first row."""
        return self.base + t * self.step


def _incoming(dhT):
    """(array kept alive, address, row stride) of the gradient arriving from after the last step,
    or (None, 0, 0) (NULL: the kernels then read none) when nothing arrives."""
    return (None, 0, 0) if dhT is None else _matrix(dhT)


def _matrix(x):
    """(address, row stride) of a 2-D float32 array with unit stride along rows (else a copy)."""
    if not _kernel_layout(x):
        x = np.ascontiguousarray(x, dtype=np.float32)
    return x, _addr(x), x.strides[0] // 4


# ---------------------------------------------------------------------------
# whole-sequence scans in C (scan_kernels.h): every step's product and element-wise math in one call
# ---------------------------------------------------------------------------

def pack_weight(nat: _native.Kernels, W: Array, backward: bool = False) -> Array:
    """``W_hh`` (G*H, H) packed for the C scans' products (float32, :c:func:`xrnn_pack`): the
    forward's ``h @ W_hh^T`` (N = G*H, K = H) or, with ``backward``, the backward's ``d @ W_hh``
    (N = H, K = G*H). Any strides; one pass over the weight, split over the scans' threads."""
    if W.dtype != np.float32 or any(st <= 0 or st % 4 for st in W.strides):
        W = np.ascontiguousarray(W, dtype=np.float32)
    rs, cs = W.strides[0] // 4, W.strides[1] // 4
    N, K, sn, sk = (W.shape[1], W.shape[0], cs, rs) if backward else (W.shape[0], W.shape[1], rs, cs)
    P = np.empty(nat.packed_size(N, K), dtype=np.float32)  # ceil(N/16) panels of (K, 16)
    nat.pack(N, K, _addr(W), sn, sk, _addr(P), nat.scan_threads())
    return P


def _scan_args(T: int, B: int, H: int, reverse: bool, A, P, **arrays):
    """:class:`xrnn.kernels.native.ScanArgs` for a scan of ``T`` steps of ``B`` rows over the (T, B, G*H)
    gates ``A`` with the packed weight ``P``. ``arrays`` name the others: 3-D step arrays ``C``, ``Y``,
    ``dY`` as :class:`_Rows`, 2-D ones (``h0``, ``c0``, ``dhT``, ``w1``..``w3``) as arrays with
    :func:`_kernel_layout`, ``bh`` as a contiguous float32 vector, ``relu`` as an int."""
    a = _Rows(A)
    args = _native.ScanArgs(T=T, n=B, H=H, reverse=int(reverse), A=a.base, sA=a.step // 4, lda=a.ld, P=_addr(P))
    args.keep = (A, P, arrays)  # the arrays behind the addresses live as long as the arguments
    for name, v in arrays.items():
        if v is None:
            continue
        if name == "relu":
            args.relu = v
        elif name == "bh":
            args.bh = _addr(v)
        elif isinstance(v, _Rows):
            setattr(args, name, v.base)
            setattr(args, "s" + name, v.step // 4)
            setattr(args, "ld" + name.lower(), v.ld)
        else:
            setattr(args, name, _addr(v))
            setattr(args, "ld" + name, v.strides[0] // 4)
    return args


#: a segment plan's steps for a ragged scan: (rows, offs), host np.intp arrays (SegmentPlan.steps)
_Steps = tuple[np.ndarray, np.ndarray]


def _ragged(args, steps: _Steps, B: int):
    """Make ``args`` a ragged scan (``xrnn_scan_args.rows``/``offs``) over the steps of a segment plan
    (:meth:`xrnn.segments.SegmentPlan.steps`: ``(rows, offs)``, host ``np.intp``) of ``B`` rows."""
    rows, offs = (np.ascontiguousarray(v, dtype=np.intp) for v in steps)
    args.T, args.n = rows.shape[0], B
    args.rows, args.offs = rows.ctypes.data, offs.ctypes.data
    args.keep = (args.keep, rows, offs)
    return args


def _start(v, B: int, H: int, dtype=np.float32):
    """A (B, H) buffer of its own holding ``v`` (a gradient arriving from after the last step, which
    the backward then updates in place), zeros for None."""
    return np.zeros((B, H), dtype=dtype) if v is None else np.array(v, dtype=dtype, copy=True)


# ragged scans: every segment of a ``lengths=`` batch in one C call (xrnn.modules runs them when
# these return a result; None means this layer runs segment by segment instead). A, C/NH, Y, dY
# are the packed rows (N, F) of xrnn.segments; h0, c0, dhT, dcT hold all B sorted rows; the
# forwards leave each row's final state in its last step's row.

def rnn_scan_ragged(A: Array, W_hh: Array, h0: Array, Y: Array, col: slice, reverse: bool, nonlinearity: str,
                    steps: _Steps) -> bool | None:
    """The forward of every segment (:func:`rnn_scan` on packed rows): True, or None where the C
    kernels do not take these arrays."""
    nat = _native_for(A, Y)
    if nat is None:
        return None
    B, H = h0.shape
    args = _scan_args(0, B, H, reverse, A, _packed_for(nat, W_hh), relu=int(nonlinearity != "tanh"),
                      h0=_matrix(h0)[0], Y=_Rows(Y, col), w1=np.empty((B, H), dtype=np.float32))
    nat.rnn_scan(ctypes.byref(_ragged(args, steps, B)), nat.scan_threads())
    return True


def rnn_scan_backward_ragged(A: Array, Y: Array, col: slice, W_hh: Array, dY: Array, dhT: Array | None,
                             reverse: bool, nonlinearity: str, steps: _Steps, B: int) -> Array | None:
    """The backward of every segment of ``B`` rows: the gradient of h0 (B, H), or None where the C
    kernels do not take these arrays or the weight's packed copy is refused (:func:`_backward_packed`)."""
    nat = _native_for(A, Y, dY)
    P = None if nat is None else _backward_packed(nat, W_hh, A.size)
    if P is None:
        return None
    H = A.shape[-1]
    dh = _start(dhT, B, H)  # (B, H) each row's incoming gradient in, its gradient of h0 out
    args = _scan_args(0, B, H, reverse, A, P, relu=int(nonlinearity != "tanh"), Y=_Rows(Y, col),
                      dY=_Rows(dY, col), w1=dh)
    nat.rnn_scan_backward(ctypes.byref(_ragged(args, steps, B)), nat.scan_threads())
    return dh


# ---------------------------------------------------------------------------
# Elman RNN
# ---------------------------------------------------------------------------

#: the Elman step has a single element-wise op, so the in-place version only
#: pays on big steps: below this B*H its extra Python calls and views cost more
#: than the temporaries they save, and the portable scan runs (measured, one
#: thread: 19 % slower at B*H = 100, 4 % at 6400, 2 % faster at 32768)
_RNN_FAST_MIN = 16384


@_quiet
def rnn_scan(xp: ArrayNamespace, A: Array, W_hh: Array, h0: Array, Y: Array, col: slice, reverse: bool,
             nonlinearity: str) -> Array:
    """See :func:`xrnn.functional.rnn_scan`. ``A`` is left unchanged."""
    B, H = h0.shape
    nat = _native_for(A, Y)
    if nat is not None:
        T = A.shape[0]
        args = _scan_args(T, B, H, reverse, A, _packed_for(nat, W_hh), relu=int(nonlinearity != "tanh"),
                          h0=_matrix(h0)[0], Y=_Rows(Y, col), w1=np.empty((B, H), dtype=np.float32))
        nat.rnn_scan(ctypes.byref(args), nat.scan_threads())
        return Y[0 if reverse else T - 1, :, col].copy()
    if B * H < _RNN_FAST_MIN:
        return F.rnn_scan(xp, A, W_hh, h0, Y, col, reverse, nonlinearity)
    pad = _RowPad(B, H, A.dtype)
    zb = pad.out(H, A.dtype)  # (rows, H) pre-activation of the step
    Wt = _recurrent_weight(W_hh, A.shape[0])  # (H, H)
    h = h0
    for t in _order(A.shape[0], reverse):
        z = pad.product(h, Wt, zb)  # (B, H)
        z += A[t, ...]
        h = Y[t, :, col]  # (B, H) view, written here
        if nonlinearity == "tanh":
            _tanh_(z, h)
        else:
            np.maximum(z, 0.0, out=h)
    return h.copy()


@_quiet
def rnn_scan_backward(xp: ArrayNamespace, A: Array, Y: Array, col: slice, W_hh: Array, dY: Array, dhT: Array,
                      reverse: bool, nonlinearity: str) -> Array:
    """See :func:`xrnn.functional.rnn_scan_backward`; writes dz over ``A``."""
    T = A.shape[0]
    B, H = A.shape[1], A.shape[2]
    nat = _native_for(A, Y, dY)
    P = None if nat is None else _backward_packed(nat, W_hh, A.size)
    if P is not None:
        dh = np.empty((B, H), dtype=np.float32)  # (B, H) the result
        dhT = None if dhT is None else _matrix(dhT)[0]
        args = _scan_args(T, B, H, reverse, A, P, relu=int(nonlinearity != "tanh"), Y=_Rows(Y, col),
                          dY=_Rows(dY, col), dhT=dhT, w1=dh)
        nat.rnn_scan_backward(ctypes.byref(args), nat.scan_threads())
        return dh
    if B * H < _RNN_FAST_MIN and nat is None:
        return F.rnn_scan_backward(xp, A, Y, col, W_hh, dY, dhT, reverse, nonlinearity)
    dt = A.dtype
    pad = _RowPad(B, H, dt)
    db = pad.out(H, dt)  # (rows, H) dz @ W_hh
    if nat is not None:  # one product per step in NumPy's BLAS, the element-wise math in the step kernel
        a_, y_, dy_ = _Rows(A), _Rows(Y, col), _Rows(dY, col)
        relu = int(nonlinearity != "tanh")
        dhT, pdn, lddn = _incoming(dhT)
        pdb = _addr(db)  # (rows, H) the product's output: the next step's dh_next
        for t in _order(T, not reverse):
            nat.rnn_step_backward(B, H, a_.at(t), a_.ld, y_.at(t), y_.ld, dy_.at(t), dy_.ld, pdn, lddn, relu)
            dh_next = pad.product(A[t, ...], W_hh, db)  # (B, H)
            pdn, lddn = pdb, H
        return dh_next
    dh_next = np.empty((B, H), dtype=dt)
    tmp = np.empty((B, H), dtype=dt)
    first = dhT is None  # no gradient arrives from after the last step
    if not first:
        dh_next[...] = dhT
    for t in _order(T, not reverse):
        dz = A[t, ...]  # (B, H) written in place
        if first:
            dz[...] = dY[t, :, col]
        else:
            np.add(dY[t, :, col], dh_next, out=dz)  # dh
        y = Y[t, :, col]  # (B, H)
        if nonlinearity == "tanh":
            np.multiply(y, y, out=tmp)
            np.subtract(1.0, tmp, out=tmp)  # 1 - y^2
        else:
            np.greater(y, 0.0, out=tmp, casting="unsafe")
        dz *= tmp
        dh_next = pad.product(dz, W_hh, db)  # (B, H)
        first = False
    return dh_next


# ---------------------------------------------------------------------------
# LSTM
# ---------------------------------------------------------------------------

@_quiet
def lstm_scan(xp: ArrayNamespace, A: Array, W_hh: Array, h0: Array, c0: Array, Y: Array, col: slice, C: Array,
              reverse: bool) -> tuple[Array, Array]:
    """See :func:`xrnn.functional.lstm_scan`; ``A`` becomes ``[i, f, g, o]``."""
    B, H = h0.shape
    dt = A.dtype
    nat = _native_for(A, C, Y)
    if nat is not None:
        T = A.shape[0]
        hw = np.empty((B, 4 * H), dtype=np.float32)  # (B, 4H) each step's h_prev @ W_hh^T
        args = _scan_args(T, B, H, reverse, A, _packed_for(nat, W_hh), h0=_matrix(h0)[0], c0=_matrix(c0)[0],
                          C=_Rows(C), Y=_Rows(Y, col), w1=hw)
        nat.lstm_scan(ctypes.byref(args), nat.scan_threads())
        last = 0 if reverse else T - 1
        return Y[last, :, col].copy(), C[last, ...].copy()
    pad = _RowPad(B, H, dt)
    hwb = pad.out(4 * H, dt)  # (rows, 4H) h_prev @ W_hh^T
    Wt = _recurrent_weight(W_hh, A.shape[0])  # (H, 4H)
    tmp = np.empty((B, H), dtype=dt)
    small = B * 4 * H < _EXP_TANH_MIN
    scale = None if small else _lstm_scale(H, dt)
    half, off = _lstm_tanh_consts(H, dt) if small else (None, None)
    h, c = h0, c0
    for t in _order(A.shape[0], reverse):
        hw = pad.product(h, Wt, hwb)  # (B, 4H)
        a = A[t, ...]  # (B, 4H)
        a += hw
        if small:
            _lstm_gates_tanh_(a, half, off)
        else:
            _lstm_gates_(a, H, scale)
        c_new = C[t, ...]  # (B, H)
        np.multiply(a[:, H:2 * H], c, out=c_new)  # f * c_prev
        np.multiply(a[:, 0:H], a[:, 2 * H:3 * H], out=tmp)  # i * g
        c_new += tmp
        _tanh_(c_new, tmp)
        h = Y[t, :, col]  # (B, H) view, written here
        np.multiply(a[:, 3 * H:4 * H], tmp, out=h)  # h = o * tanh(c)
        c = c_new
    return h.copy(), c.copy()


@_quiet
def lstm_scan_backward(xp: ArrayNamespace, A: Array, C: Array, c0: Array, W_hh: Array, dY: Array, col: slice,
                       dhT: Array, dcT: Array, reverse: bool) -> tuple[Array, Array]:
    """See :func:`xrnn.functional.lstm_scan_backward`; writes the gate gradients over ``A``."""
    T = A.shape[0]
    B, H = A.shape[1], A.shape[2] // 4
    nat = _native_for(A, C, dY)
    dt = A.dtype
    if nat is not None:
        dc = _start(dcT, B, H, dt)  # (B, H) in and out
        P = _backward_packed(nat, W_hh, A.size)
        if P is None:
            pad = _RowPad(B, 4 * H, dt)
            return _lstm_scan_backward_native(nat, A, C, c0, W_hh, dY, col, dhT, dc, reverse, pad, pad.out(H, dt))
        dh = np.empty((B, H), dtype=np.float32)  # (B, H) the result
        dhT = None if dhT is None else _matrix(dhT)[0]
        args = _scan_args(T, B, H, reverse, A, P, c0=_matrix(c0)[0], C=_Rows(C), dY=_Rows(dY, col), dhT=dhT,
                          w1=dh, w2=dc)
        nat.lstm_scan_backward(ctypes.byref(args), nat.scan_threads())
        return dh, dc
    if B * H < _LSTM_FACTORED_MAX:
        return _lstm_scan_backward_factored(A, C, c0, W_hh, dY, col, dhT, dcT, reverse)
    dc = _start(dcT, B, H, dt)  # (B, H)
    pad = _RowPad(B, 4 * H, dt)
    db = pad.out(H, dt)  # (rows, H) gate gradients @ W_hh
    dh = np.empty((B, H), dtype=dt)
    dh_next = np.empty((B, H), dtype=dt)
    first = dhT is None
    if not first:
        dh_next[...] = dhT
    tc = np.empty((B, H), dtype=dt)  # tanh(c_t)
    u = np.empty((B, H), dtype=dt)
    v = np.empty((B, H), dtype=dt)
    step = -1 if reverse else 1  # the previous step is t - step
    for t in _order(T, not reverse):
        tp = t - step
        c_prev = c0 if (tp < 0 or tp >= T) else C[tp, ...]  # (B, H)
        if first:
            dh[...] = dY[t, :, col]
        else:
            np.add(dY[t, :, col], dh_next, out=dh)
        a = A[t, ...]  # (B, 4H) activated gates in, gate gradients out
        i, f, g, o = a[:, 0:H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:4 * H]
        _tanh_(C[t, ...], tc)
        # dc += dh * o * (1 - tc^2)
        np.multiply(tc, tc, out=u)
        np.subtract(1.0, u, out=u)
        u *= o
        u *= dh
        dc += u
        # do = dh * tc * o * (1 - o)  (o feeds nothing else, so it is overwritten first)
        np.subtract(1.0, o, out=u)
        u *= o
        u *= tc
        np.multiply(u, dh, out=o)
        # dg = dc * i * (1 - g^2); needs i and g before either is overwritten
        np.multiply(g, g, out=u)
        np.subtract(1.0, u, out=u)
        u *= i
        np.multiply(dc, g, out=v)  # dc * g, kept for di
        np.multiply(u, dc, out=g)
        # di = dc * g * i * (1 - i)
        np.subtract(1.0, i, out=u)
        u *= i
        np.multiply(u, v, out=i)
        # dc_prev = dc * f, then df = dc * c_prev * f * (1 - f) = dc_prev * c_prev * (1 - f)
        np.subtract(1.0, f, out=u)
        u *= c_prev
        dc *= f
        np.multiply(u, dc, out=f)
        dh_next = pad.product(a, W_hh, db)  # (B, H)
        first = False
    return dh_next, dc


def _lstm_scan_backward_native(nat, A, C, c0, W_hh, dY, col, dhT, dc, reverse, pad, db):
    """:func:`lstm_scan_backward` with one product per step in NumPy's BLAS and each step's
    element-wise math in one kernel call (where the C scan would need a packed copy of the weight
    too large for the memory the step holds, :func:`_backward_packed`)."""
    T = A.shape[0]
    B, H = dc.shape
    a_, c_, dy_ = _Rows(A), _Rows(C), _Rows(dY, col)
    c0, pc0, ldc0 = _matrix(c0)
    dhT, pdn, lddn = _incoming(dhT)
    pdc, pdb = _addr(dc), _addr(db)
    step = -1 if reverse else 1  # the previous step is t - step
    dh_next = None
    for t in _order(T, not reverse):
        tp = t - step
        pcp, ldcp = (pc0, ldc0) if (tp < 0 or tp >= T) else (c_.at(tp), c_.ld)
        nat.lstm_step_backward(B, H, a_.at(t), a_.ld, c_.at(t), c_.ld, pcp, ldcp, dy_.at(t), dy_.ld,
                               pdn, lddn, pdc, H)
        dh_next = pad.product(A[t, ...], W_hh, db)  # (B, H)
        pdn, lddn = pdb, H
    return dh_next, dc


#: below this many elements per step (B*H) the LSTM backward precomputes its gate factors for
#: many steps at once (:func:`_lstm_scan_backward_factored`): at such sizes a step's cost is its
#: number of NumPy calls, 7 instead of 25 there. Above it the per-step code, whose working set
#: stays in cache, runs
_LSTM_FACTORED_MAX = 16384

#: elements (K*B*H) of each (K, B, H) scratch buffer of the factored backward; K steps per chunk
_FACTOR_CHUNK = 1 << 16


def _lstm_scan_backward_factored(A, C, c0, W_hh, dY, col, dhT, dcT, reverse):
    """:func:`lstm_scan_backward` for small steps, in chunks of K steps: what depends only on the
    forward's values is computed for the whole chunk in a few vectorized calls,

    * ``k1 = o (1 - tanh(c)^2)`` (dc += dh k1), ``o <- tanh(c) o (1 - o)`` (do = dh o'),
    * ``i <- g i (1 - i)``, ``g <- i (1 - g^2)``, ``f <- c_prev f (1 - f)`` (di, dg, df = dc i', g', f'),
    * ``F = f`` (the cell gradient's carry, dc_prev = dc F),

    and each step keeps 7 calls: dh, dc, do, [di df dg] in one broadcast multiply, the carry, and
    the product with ``W_hh``. Same values as the per-step code up to rounding (products in another
    order)."""
    T = A.shape[0]
    B, H = A.shape[1], A.shape[2] // 4
    dt = A.dtype
    A4 = A.reshape(T, B, 4, H)  # (T, B, 4, H) view: gates [i, f, g, o] on axis 2
    if not np.shares_memory(A4, A):  # pragma: no cover - A comes from contiguous packed rows
        raise AssertionError("the LSTM backward needs A as a (T, B, 4H) view it can write through")
    K = max(1, min(T, _FACTOR_CHUNK // max(1, B * H)))
    k1b, Fb, ub = (np.empty((K, B, H), dtype=dt) for _ in range(3))  # (K, B, H) each
    dh = np.empty((B, H), dtype=dt)
    tmp = np.empty((B, H), dtype=dt)
    dc = _start(dcT, B, H, dt)
    dh_next = np.empty((B, H), dtype=dt)
    first = dhT is None
    if not first:
        dh_next[...] = dhT
    pad = _RowPad(B, 4 * H, dt)
    db = pad.out(H, dt)  # (rows, H) gate gradients @ W_hh
    order = list(_order(T, not reverse))  # processing order: last step first (forward direction)
    for c in range(0, T, K):
        steps = order[c:c + K]
        lo, hi = min(steps), max(steps) + 1  # the chunk's time range [lo, hi)
        n = hi - lo
        a = A4[lo:hi]  # (n, B, 4, H)
        i, f, g, o = a[:, :, 0], a[:, :, 1], a[:, :, 2], a[:, :, 3]  # (n, B, H) each
        k1, F_, u = k1b[:n], Fb[:n], ub[:n]
        np.tanh(C[lo:hi], out=u)  # tanh(c_t)
        np.multiply(u, u, out=k1)
        np.subtract(1.0, k1, out=k1)
        k1 *= o  # o (1 - tanh(c)^2)
        F_[...] = 1.0
        F_ -= o
        F_ *= o
        np.multiply(F_, u, out=o)  # o' = tanh(c) o (1 - o)
        np.subtract(1.0, i, out=u)
        u *= i
        u *= g  # g i (1 - i), for i
        np.multiply(g, g, out=F_)
        np.subtract(1.0, F_, out=F_)
        np.multiply(F_, i, out=g)  # g' = i (1 - g^2)
        i[...] = u  # i' = g i (1 - i)
        F_[...] = f  # the carry, before f is overwritten
        np.subtract(1.0, f, out=u)
        u *= f  # f (1 - f)
        # f' = c_prev f (1 - f), c_prev the cell state entering each step (c0 at the sequence's start)
        if not reverse:  # step t follows t - 1
            if lo == 0:
                np.multiply(u[0], c0, out=f[0])
                np.multiply(u[1:], C[0:hi - 1], out=f[1:])
            else:
                np.multiply(u, C[lo - 1:hi - 1], out=f)
        else:  # step t follows t + 1
            if hi == T:
                np.multiply(u[n - 1], c0, out=f[n - 1])
                np.multiply(u[:n - 1], C[lo + 1:hi], out=f[:n - 1])
            else:
                np.multiply(u, C[lo + 1:hi + 1], out=f)
        for t in steps:
            j = t - lo
            if first:
                dh[...] = dY[t, :, col]
                first = False
            else:
                np.add(dY[t, :, col], dh_next, out=dh)
            np.multiply(dh, k1[j], out=tmp)
            dc += tmp  # (B, H) gradient of c_t
            at = A4[t]  # (B, 4, H)
            at[:, 3] *= dh  # do
            at[:, 0:3] *= dc[:, None, :]  # di, df, dg
            dc *= F_[j]  # gradient of c_{t-1}
            dh_next = pad.product(A[t], W_hh, db)  # (B, H)
    return dh_next, dc


def lstm_scan_ragged(A: Array, W_hh: Array, h0: Array, c0: Array, Y: Array, col: slice, C: Array, reverse: bool,
                     steps: _Steps) -> bool | None:
    """The forward of every segment (:func:`lstm_scan` on packed rows): True, or None where the C
    kernels do not take these arrays."""
    nat = _native_for(A, C, Y)
    if nat is None:
        return None
    B, H = h0.shape
    args = _scan_args(0, B, H, reverse, A, _packed_for(nat, W_hh), h0=_matrix(h0)[0], c0=_matrix(c0)[0],
                      C=_Rows(C), Y=_Rows(Y, col), w1=np.empty((B, 4 * H), dtype=np.float32))
    nat.lstm_scan(ctypes.byref(_ragged(args, steps, B)), nat.scan_threads())
    return True


def lstm_scan_backward_ragged(A: Array, C: Array, c0: Array, W_hh: Array, dY: Array, col: slice, dhT: Array | None,
                              dcT: Array | None, reverse: bool, steps: _Steps) -> tuple[Array, Array] | None:
    """The backward of every segment: the gradients of h0 and c0 (B, H) each, or None (see
    :func:`rnn_scan_backward_ragged`)."""
    nat = _native_for(A, C, dY)
    P = None if nat is None else _backward_packed(nat, W_hh, A.size)
    if P is None:
        return None
    B, H = c0.shape
    dh, dc = _start(dhT, B, H), _start(dcT, B, H)  # (B, H) each: incoming gradients in, those of h0, c0 out
    args = _scan_args(0, B, H, reverse, A, P, c0=_matrix(c0)[0], C=_Rows(C), dY=_Rows(dY, col), w1=dh, w2=dc)
    nat.lstm_scan_backward(ctypes.byref(_ragged(args, steps, B)), nat.scan_threads())
    return dh, dc


# ---------------------------------------------------------------------------
# GRU
# ---------------------------------------------------------------------------

@_quiet
def gru_scan(xp: ArrayNamespace, A: Array, W_hh: Array, b_hh: Array, h0: Array, Y: Array, col: slice, NH: Array,
             reverse: bool) -> Array:
    """See :func:`xrnn.functional.gru_scan`; ``A`` becomes ``[r, z, n]``."""
    B, H = h0.shape
    dt = A.dtype
    nat = _native_for(A, NH, Y)
    if nat is not None:
        T = A.shape[0]
        bh = None if b_hh is None else np.ascontiguousarray(b_hh, dtype=np.float32)  # (3H,)
        args = _scan_args(T, B, H, reverse, A, _packed_for(nat, W_hh), bh=bh, h0=_matrix(h0)[0], C=_Rows(NH),
                          Y=_Rows(Y, col), w1=np.empty((B, 3 * H), dtype=np.float32))
        nat.gru_scan(ctypes.byref(args), nat.scan_threads())
        return Y[0 if reverse else T - 1, :, col].copy()
    pad = _RowPad(B, H, dt)
    ghb = pad.out(3 * H, dt)  # (rows, 3H) h_prev @ W_hh^T + b_hh
    Wt = _recurrent_weight(W_hh, A.shape[0])  # (H, 3H)
    tmp = np.empty((B, H), dtype=dt)
    h = h0
    for t in _order(A.shape[0], reverse):
        gh = pad.product(h, Wt, ghb)  # (B, 3H)
        if b_hh is not None:
            gh += b_hh
        a = A[t, ...]  # (B, 3H)
        rz = a[:, 0:2 * H]
        rz += gh[:, 0:2 * H]
        _sigmoid_(rz, rz)
        nh = NH[t, ...]  # (B, H)
        nh[...] = gh[:, 2 * H:3 * H]
        n = a[:, 2 * H:3 * H]
        np.multiply(a[:, 0:H], nh, out=tmp)  # r * (W_hn h + b_hn)
        n += tmp
        _tanh_(n, n)
        # h = n + z * (h_prev - n)
        np.subtract(h, n, out=tmp)
        tmp *= a[:, H:2 * H]
        h = Y[t, :, col]  # (B, H) view, written here
        np.add(n, tmp, out=h)
    return h.copy()


@_quiet
def gru_scan_backward(xp: ArrayNamespace, A: Array, NH: Array, Y: Array, col: slice, h0: Array, W_hh: Array, dY: Array,
                      dhT: Array, reverse: bool) -> Array:
    """See :func:`xrnn.functional.gru_scan_backward`; writes over ``A`` and ``NH``."""
    T = A.shape[0]
    B, H = h0.shape
    dt = A.dtype
    nat = _native_for(A, NH, Y, dY)
    P = None if nat is None else _backward_packed(nat, W_hh, A.size)
    if P is not None:
        dh = np.empty((B, H), dtype=np.float32)  # (B, H) d @ W_hh of the last step processed
        direct = np.zeros((B, H), dtype=np.float32)  # dh * z: the part of dh_prev that bypasses W_hh
        dhT = None if dhT is None else _matrix(dhT)[0]
        args = _scan_args(T, B, H, reverse, A, P, h0=_matrix(h0)[0],
                          C=_Rows(NH), Y=_Rows(Y, col), dY=_Rows(dY, col), dhT=dhT, w1=dh, w2=direct,
                          w3=np.empty((B, 3 * H), dtype=np.float32))
        nat.gru_scan_backward(ctypes.byref(args), nat.scan_threads())
        dh += direct
        return dh
    dh = np.empty((B, H), dtype=dt)
    pad = _RowPad(B, 3 * H, dt)
    d = pad.operand()  # (B, 3H) gradient of h_prev @ W_hh^T + b_hh, in the padded operand's rows
    if d is None:
        d = np.empty((B, 3 * H), dtype=dt)
    db = pad.out(H, dt)  # (rows, H) d @ W_hh
    if nat is not None:
        return _gru_scan_backward_native(nat, A, NH, Y, col, h0, W_hh, dY, dhT, reverse, pad, d, db)
    dr, dz, dn = d[:, 0:H], d[:, H:2 * H], d[:, 2 * H:3 * H]
    dh_next = np.empty((B, H), dtype=dt)
    first = dhT is None
    if not first:
        dh_next[...] = dhT
    direct = np.empty((B, H), dtype=dt)  # dh * z: the part of dh_prev that bypasses W_hh
    u = np.empty((B, H), dtype=dt)
    step = -1 if reverse else 1
    for t in _order(T, not reverse):
        tp = t - step
        h_prev = h0 if (tp < 0 or tp >= T) else Y[tp, :, col]  # (B, H)
        if first:
            dh[...] = dY[t, :, col]
        else:
            np.add(dY[t, :, col], dh_next, out=dh)
        a = A[t, ...]  # (B, 3H)
        r, z, n = a[:, 0:H], a[:, H:2 * H], a[:, 2 * H:3 * H]
        # dn_pre = dh * (1 - z) * (1 - n^2)
        np.multiply(n, n, out=u)
        np.subtract(1.0, u, out=u)
        np.subtract(1.0, z, out=dn)
        dn *= u
        dn *= dh
        # dz = dh * (h_prev - n) * z * (1 - z)
        np.subtract(1.0, z, out=u)
        u *= z
        np.subtract(h_prev, n, out=dz)
        dz *= u
        dz *= dh
        # dr = dn * gh_n * r * (1 - r)
        nh = NH[t, ...]  # (B, H) W_hn h_prev + b_hn in, its gradient dn * r out
        np.subtract(1.0, r, out=u)
        u *= r
        u *= nh
        np.multiply(u, dn, out=dr)
        np.multiply(dn, r, out=nh)
        np.multiply(dh, z, out=direct)
        # the input side gets [dr, dz, dn], the hidden side [dr, dz, dn * r]
        a[...] = d
        dn[...] = nh
        dh_next = pad.product(d, W_hh, db, copy=False)  # (B, H)
        dh_next += direct
        first = False
    return dh_next


def _gru_scan_backward_native(nat, A, NH, Y, col, h0, W_hh, dY, dhT, reverse, pad, d, db):
    """:func:`gru_scan_backward` with one product per step in NumPy's BLAS and each step's element-wise
    math in one kernel call (see :func:`_backward_packed`)."""
    T = A.shape[0]
    B, H = h0.shape
    a_, nh_, y_, dy_ = _Rows(A), _Rows(NH), _Rows(Y, col), _Rows(dY, col)
    h0, ph0, ldh0 = _matrix(h0)
    direct = np.zeros((B, H), dtype=np.float32)  # dh * z: the part of dh_prev that bypasses W_hh
    dhT, pdn, lddn = _incoming(dhT)
    pdir, pd, ldd, pdb = _addr(direct), _addr(d), d.strides[0] // 4, _addr(db)
    step = -1 if reverse else 1
    for t in _order(T, not reverse):
        tp = t - step
        php, ldhp = (ph0, ldh0) if (tp < 0 or tp >= T) else (y_.at(tp), y_.ld)
        nat.gru_step_backward(B, H, a_.at(t), a_.ld, nh_.at(t), nh_.ld, php, ldhp, dy_.at(t), dy_.ld,
                              pdn, lddn, pdir, H, pd, ldd)
        pad.product(d, W_hh, db, copy=False)  # (B, H) in the first rows of db
        pdn, lddn = pdb, H
    return db[:B] + direct


def gru_scan_ragged(A: Array, W_hh: Array, b_hh: Array | None, h0: Array, Y: Array, col: slice, NH: Array,
                    reverse: bool, steps: _Steps) -> bool | None:
    """The forward of every segment (:func:`gru_scan` on packed rows): True, or None where the C
    kernels do not take these arrays."""
    nat = _native_for(A, NH, Y)
    if nat is None:
        return None
    B, H = h0.shape
    bh = None if b_hh is None else np.ascontiguousarray(b_hh, dtype=np.float32)  # (3H,)
    args = _scan_args(0, B, H, reverse, A, _packed_for(nat, W_hh), bh=bh, h0=_matrix(h0)[0], C=_Rows(NH),
                      Y=_Rows(Y, col), w1=np.empty((B, 3 * H), dtype=np.float32))
    nat.gru_scan(ctypes.byref(_ragged(args, steps, B)), nat.scan_threads())
    return True


def gru_scan_backward_ragged(A: Array, NH: Array, Y: Array, col: slice, h0: Array, W_hh: Array, dY: Array,
                             dhT: Array | None, reverse: bool, steps: _Steps) -> Array | None:
    """The backward of every segment: the gradient of h0 (B, H), or None (see
    :func:`rnn_scan_backward_ragged`)."""
    nat = _native_for(A, NH, Y, dY)
    P = None if nat is None else _backward_packed(nat, W_hh, A.size)
    if P is None:
        return None
    B, H = h0.shape
    dh = _start(dhT, B, H)  # (B, H) incoming gradients in; d @ W_hh of each row's last step out
    direct = np.zeros((B, H), dtype=np.float32)  # dh * z: the part of dh_prev that bypasses W_hh
    args = _scan_args(0, B, H, reverse, A, P, h0=_matrix(h0)[0], C=_Rows(NH), Y=_Rows(Y, col), dY=_Rows(dY, col),
                      w1=dh, w2=direct, w3=np.empty((B, 3 * H), dtype=np.float32))
    nat.gru_scan_backward(ctypes.byref(_ragged(args, steps, B)), nat.scan_threads())
    dh += direct
    return dh


SCANS = types.SimpleNamespace(
    name="numpy",
    rnn_scan=rnn_scan,
    rnn_scan_backward=rnn_scan_backward,
    lstm_scan=lstm_scan,
    lstm_scan_backward=lstm_scan_backward,
    gru_scan=gru_scan,
    gru_scan_backward=gru_scan_backward,
    rnn_scan_ragged=rnn_scan_ragged,
    rnn_scan_backward_ragged=rnn_scan_backward_ragged,
    lstm_scan_ragged=lstm_scan_ragged,
    lstm_scan_backward_ragged=lstm_scan_backward_ragged,
    gru_scan_ragged=gru_scan_ragged,
    gru_scan_backward_ragged=gru_scan_backward_ragged,
    forward_weight=forward_weight,
    backward_weight=backward_weight,
    project=project,
    reuse_buffers=True,  # the scans return copies of the final states, never views into A, C or NH
)
