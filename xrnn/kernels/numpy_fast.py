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
* the Elman RNN, whose step has a single element-wise op, takes this path
  only from ``_RNN_FAST_MIN`` elements per step; below it the portable scans
  are faster and run instead;
* optional: ``set_num_threads(n)`` splits each step's element-wise work over
  ``n`` threads by batch rows (off by default; see :func:`set_num_threads`).

This module is the NumPy backend's own kernel, so it calls ``numpy``
directly on the arrays (they are NumPy arrays: ``scans_for`` only hands
this path to NumPy devices). The ``xp`` argument is kept for the shared
signature.
"""

from __future__ import annotations

import functools
import os
import threading
import types

import numpy as np

from .. import functional as F

__all__ = [
    "SCANS",
    "set_num_threads",
    "get_num_threads",
    "rnn_scan",
    "rnn_scan_backward",
    "lstm_scan",
    "lstm_scan_backward",
    "gru_scan",
    "gru_scan_backward",
]


def _quiet(fn):
    """Run ``fn`` with exp's overflow/underflow ignored: ``exp(-x)`` is ``inf`` for very
    negative ``x``, which gives the exact limits (sigmoid 0, tanh -1), not an error."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with np.errstate(over="ignore", under="ignore"):
            return fn(*args, **kwargs)

    return wrapped


def _order(T: int, reverse: bool):
    return range(T - 1, -1, -1) if reverse else range(T)


#: below this many elements ``np.tanh`` wins: the exp form's five extra ufunc
#: calls cost more than its cheaper arithmetic (measured: 4x slower at B*H = 100,
#: 20% faster at 32768)
_EXP_TANH_MIN = 4096


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


# ---------------------------------------------------------------------------
# element-wise work split over threads
# ---------------------------------------------------------------------------

#: a step's element-wise work is split over threads only when B*H reaches this:
#: below it the hand-over (two lock releases per step, a few microseconds each)
#: and the GIL held between ufunc calls cost more than the second core gives
#: (element-wise work alone on 2 idle cores: 1.6x faster at B*H = 32768, 1.3x
#: slower at 6400)
_PARALLEL_MIN = 16384
#: the most threads used for element-wise work: each ufunc call holds the GIL
#: for its Python part, so returns shrink with more threads (measured at 2 only)
_MAX_THREADS = 4

_num_threads: int | None = None  # None: from XRNN_NUM_THREADS at first use, else 1


def _default_threads() -> int:
    v = os.environ.get("XRNN_NUM_THREADS", "").strip()
    return int(v) if v.isdigit() and int(v) > 0 else 1


def get_num_threads() -> int:
    """Threads the NumPy fast path uses for element-wise work (matrix products use the BLAS's own)."""
    global _num_threads
    if _num_threads is None:
        _num_threads = max(1, min(_MAX_THREADS, _default_threads()))
    return _num_threads


def set_num_threads(n: int) -> None:
    """Split each step's element-wise work over ``n`` threads (1, the default: the caller's only).

    Off by default: on its own the split makes the gate math of a big step
    1.6x faster on two idle cores, but within a training step it competes
    with the BLAS's threads (OpenBLAS keeps its workers spinning after each
    product): on the 2-core benchmark machine the medium LSTM step took
    about 5 % longer with 2 threads; see ``benchmarks/README.md``.
    ``XRNN_NUM_THREADS`` sets the default.
    """
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        from ..errors import ConfigError

        raise ConfigError(f"the number of threads must be a positive integer, got {n!r}")
    _num_threads = min(n, _MAX_THREADS)


class _Worker:
    """One helper thread that runs ``fn(lo, hi)`` on request; hand-over through two locks."""

    def __init__(self):
        self._go = threading.Lock()
        self._go.acquire()
        self._done = threading.Lock()
        self._done.acquire()
        self._job = None
        self._error = None
        self._thread = threading.Thread(target=self._loop, name="xrnn-numpy-worker", daemon=True)
        self._thread.start()

    def _loop(self):
        with np.errstate(over="ignore", under="ignore"):  # errstate is per thread
            while True:
                self._go.acquire()
                fn, lo, hi = self._job
                try:
                    fn(lo, hi)
                except BaseException as e:  # handed to the caller in wait()
                    self._error = e
                finally:
                    self._done.release()

    def submit(self, fn, lo: int, hi: int) -> None:
        self._job = (fn, lo, hi)
        self._go.release()

    def wait(self) -> None:
        self._done.acquire()
        err, self._error = self._error, None
        if err is not None:
            raise err


_workers: list = []
_workers_lock = threading.Lock()  # one scan at a time uses the workers; others run serially


def _forget_workers() -> None:  # after fork the threads are gone in the child
    global _workers, _workers_lock
    _workers = []
    _workers_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)


class _Rows:
    """Runs a step's element-wise work ``fn(lo, hi)`` over the batch rows, split
    across threads when the step is big enough and the workers are free."""

    def __init__(self, B: int, H: int):
        self.B = B
        self.n = 1
        self.workers = []
        n = min(get_num_threads(), B)
        if n > 1 and B * H >= _PARALLEL_MIN and _workers_lock.acquire(blocking=False):
            while len(_workers) < n - 1:
                _workers.append(_Worker())
            self.workers = _workers[:n - 1]
            self.n = n
        self.bounds = [B * k // self.n for k in range(self.n + 1)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.n > 1:
            _workers_lock.release()
        return False

    def __call__(self, fn) -> None:
        if self.n == 1:
            fn(0, self.B)
            return
        b = self.bounds
        for k, w in enumerate(self.workers):
            w.submit(fn, b[k + 1], b[k + 2])
        try:
            fn(b[0], b[1])
        finally:
            errors = []
            for w in self.workers:
                try:
                    w.wait()
                except BaseException as e:
                    errors.append(e)
            if errors:
                raise errors[0]


# ---------------------------------------------------------------------------
# Elman RNN
# ---------------------------------------------------------------------------

#: the Elman step has a single element-wise op, so the in-place version only
#: pays on big steps: below this B*H its extra Python calls and views cost more
#: than the temporaries they save, and the portable scan runs (measured, one
#: thread: 19 % slower at B*H = 100, 4 % at 6400, 2 % faster at 32768)
_RNN_FAST_MIN = 16384


@_quiet
def rnn_scan(xp, A, W_hh, h0, Y, col: slice, reverse: bool, nonlinearity: str):
    """See :func:`xrnn.functional.rnn_scan`. ``A`` is left unchanged."""
    B, H = h0.shape
    if B * H < _RNN_FAST_MIN:
        return F.rnn_scan(xp, A, W_hh, h0, Y, col, reverse, nonlinearity)
    z = np.empty((B, H), dtype=A.dtype)  # (B, H) pre-activation of the step
    Wt = W_hh.T  # (H, H) view; BLAS reads the transpose in place
    t = 0

    def pointwise(lo, hi):
        zr = z[lo:hi, :]
        zr += A[t, lo:hi, :]
        if nonlinearity == "tanh":
            _tanh_(zr, Y[t, lo:hi, col])
        else:
            np.maximum(zr, 0.0, out=Y[t, lo:hi, col])

    h = h0
    with _Rows(B, H) as rows:
        for t in _order(A.shape[0], reverse):
            np.matmul(h, Wt, out=z)
            rows(pointwise)
            h = Y[t, :, col]  # (B, H) view
    return h.copy()


@_quiet
def rnn_scan_backward(xp, A, Y, col: slice, W_hh, dY, dhT, reverse: bool, nonlinearity: str):
    """See :func:`xrnn.functional.rnn_scan_backward`; writes dz over ``A``."""
    T = A.shape[0]
    B, H = A.shape[1], A.shape[2]
    if B * H < _RNN_FAST_MIN:
        return F.rnn_scan_backward(xp, A, Y, col, W_hh, dY, dhT, reverse, nonlinearity)
    dt = A.dtype
    dh_next = np.empty((B, H), dtype=dt)
    tmp = np.empty((B, H), dtype=dt)
    first = dhT is None  # no gradient arrives from after the last step
    if not first:
        dh_next[...] = dhT
    t = 0

    def pointwise(lo, hi):
        dz = A[t, lo:hi, :]  # written in place
        if first:
            dz[...] = dY[t, lo:hi, col]
        else:
            np.add(dY[t, lo:hi, col], dh_next[lo:hi, :], out=dz)  # dh
        y, tr = Y[t, lo:hi, col], tmp[lo:hi, :]
        if nonlinearity == "tanh":
            np.multiply(y, y, out=tr)
            np.subtract(1.0, tr, out=tr)  # 1 - y^2
        else:
            np.greater(y, 0.0, out=tr, casting="unsafe")
        dz *= tr

    with _Rows(B, H) as rows:
        for t in _order(T, not reverse):
            rows(pointwise)
            np.matmul(A[t, ...], W_hh, out=dh_next)
            first = False
    return dh_next


# ---------------------------------------------------------------------------
# LSTM
# ---------------------------------------------------------------------------

@_quiet
def lstm_scan(xp, A, W_hh, h0, c0, Y, col: slice, C, reverse: bool):
    """See :func:`xrnn.functional.lstm_scan`; ``A`` becomes ``[i, f, g, o]``."""
    B, H = h0.shape
    dt = A.dtype
    hw = np.empty((B, 4 * H), dtype=dt)  # (B, 4H) h_prev @ W_hh^T
    tmp = np.empty((B, H), dtype=dt)
    Wt = W_hh.T  # (H, 4H) view
    scale = _lstm_scale(H, dt)
    t, c = 0, c0

    def pointwise(lo, hi):
        a = A[t, lo:hi, :]  # (b, 4H)
        a += hw[lo:hi, :]
        _lstm_gates_(a, H, scale)
        c_new, tr = C[t, lo:hi, :], tmp[lo:hi, :]  # (b, H)
        np.multiply(a[:, H:2 * H], c[lo:hi, :], out=c_new)  # f * c_prev
        np.multiply(a[:, 0:H], a[:, 2 * H:3 * H], out=tr)  # i * g
        c_new += tr
        _tanh_(c_new, tr)
        np.multiply(a[:, 3 * H:4 * H], tr, out=Y[t, lo:hi, col])  # h = o * tanh(c)

    h = h0
    with _Rows(B, H) as rows:
        for t in _order(A.shape[0], reverse):
            np.matmul(h, Wt, out=hw)
            rows(pointwise)
            h, c = Y[t, :, col], C[t, ...]
    return h.copy(), c.copy()


@_quiet
def lstm_scan_backward(xp, A, C, c0, W_hh, dY, col: slice, dhT, dcT, reverse: bool):
    """See :func:`xrnn.functional.lstm_scan_backward`; writes the gate gradients over ``A``."""
    T = A.shape[0]
    B, H = A.shape[1], A.shape[2] // 4
    dt = A.dtype
    dh = np.empty((B, H), dtype=dt)
    dc = np.zeros((B, H), dtype=dt) if dcT is None else np.array(dcT, dtype=dt, copy=True)
    dh_next = np.empty((B, H), dtype=dt)
    first = dhT is None
    if not first:
        dh_next[...] = dhT
    tc = np.empty((B, H), dtype=dt)  # tanh(c_t)
    t1 = np.empty((B, H), dtype=dt)
    t2 = np.empty((B, H), dtype=dt)
    step = -1 if reverse else 1  # the previous step is t - step
    t = 0

    def pointwise(lo, hi):
        tp = t - step
        c_prev = c0[lo:hi, :] if (tp < 0 or tp >= T) else C[tp, lo:hi, :]  # (b, H)
        dhr, dcr, tcr, u, v = dh[lo:hi, :], dc[lo:hi, :], tc[lo:hi, :], t1[lo:hi, :], t2[lo:hi, :]
        if first:
            dhr[...] = dY[t, lo:hi, col]
        else:
            np.add(dY[t, lo:hi, col], dh_next[lo:hi, :], out=dhr)
        a = A[t, lo:hi, :]  # (b, 4H) activated gates in, gate gradients out
        i, f, g, o = a[:, 0:H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:4 * H]
        _tanh_(C[t, lo:hi, :], tcr)
        # dc += dh * o * (1 - tc^2)
        np.multiply(tcr, tcr, out=u)
        np.subtract(1.0, u, out=u)
        u *= o
        u *= dhr
        dcr += u
        # do = dh * tc * o * (1 - o)  (o feeds nothing else, so it is overwritten first)
        np.subtract(1.0, o, out=u)
        u *= o
        u *= tcr
        np.multiply(u, dhr, out=o)
        # dg = dc * i * (1 - g^2); needs i and g before either is overwritten
        np.multiply(g, g, out=u)
        np.subtract(1.0, u, out=u)
        u *= i
        np.multiply(dcr, g, out=v)  # dc * g, kept for di
        np.multiply(u, dcr, out=g)
        # di = dc * g * i * (1 - i)
        np.subtract(1.0, i, out=u)
        u *= i
        np.multiply(u, v, out=i)
        # dc_prev = dc * f, then df = dc * c_prev * f * (1 - f) = dc_prev * c_prev * (1 - f)
        np.subtract(1.0, f, out=u)
        u *= c_prev
        dcr *= f
        np.multiply(u, dcr, out=f)

    with _Rows(B, H) as rows:
        for t in _order(T, not reverse):
            rows(pointwise)
            np.matmul(A[t, ...], W_hh, out=dh_next)
            first = False
    return dh_next, dc


# ---------------------------------------------------------------------------
# GRU
# ---------------------------------------------------------------------------

@_quiet
def gru_scan(xp, A, W_hh, b_hh, h0, Y, col: slice, NH, reverse: bool):
    """See :func:`xrnn.functional.gru_scan`; ``A`` becomes ``[r, z, n]``."""
    B, H = h0.shape
    dt = A.dtype
    gh = np.empty((B, 3 * H), dtype=dt)  # (B, 3H) h_prev @ W_hh^T + b_hh
    tmp = np.empty((B, H), dtype=dt)
    Wt = W_hh.T
    t, h = 0, h0

    def pointwise(lo, hi):
        a, ghr, tr = A[t, lo:hi, :], gh[lo:hi, :], tmp[lo:hi, :]  # (b, 3H), (b, 3H), (b, H)
        if b_hh is not None:
            ghr += b_hh
        rz = a[:, 0:2 * H]
        rz += ghr[:, 0:2 * H]
        _sigmoid_(rz, rz)
        nh = NH[t, lo:hi, :]
        nh[...] = ghr[:, 2 * H:3 * H]
        n = a[:, 2 * H:3 * H]
        np.multiply(a[:, 0:H], nh, out=tr)  # r * (W_hn h + b_hn)
        n += tr
        _tanh_(n, n)
        # h = n + z * (h_prev - n)
        np.subtract(h[lo:hi, :], n, out=tr)
        tr *= a[:, H:2 * H]
        np.add(n, tr, out=Y[t, lo:hi, col])

    with _Rows(B, H) as rows:
        for t in _order(A.shape[0], reverse):
            np.matmul(h, Wt, out=gh)
            rows(pointwise)
            h = Y[t, :, col]
    return h.copy()


@_quiet
def gru_scan_backward(xp, A, NH, Y, col: slice, h0, W_hh, dY, dhT, reverse: bool):
    """See :func:`xrnn.functional.gru_scan_backward`; writes over ``A`` and ``NH``."""
    T = A.shape[0]
    B, H = h0.shape
    dt = A.dtype
    dh = np.empty((B, H), dtype=dt)
    dgh = np.empty((B, 3 * H), dtype=dt)  # (B, 3H) gradient of h_prev @ W_hh^T + b_hh
    dh_next = np.empty((B, H), dtype=dt)
    first = dhT is None
    if not first:
        dh_next[...] = dhT
    direct = np.empty((B, H), dtype=dt)  # dh * z: the part of dh_prev that bypasses W_hh
    t1 = np.empty((B, H), dtype=dt)
    step = -1 if reverse else 1
    t = 0

    def pointwise(lo, hi):
        tp = t - step
        h_prev = h0[lo:hi, :] if (tp < 0 or tp >= T) else Y[tp, lo:hi, col]
        dhr, u = dh[lo:hi, :], t1[lo:hi, :]
        if first:
            dhr[...] = dY[t, lo:hi, col]
        else:
            np.add(dY[t, lo:hi, col], dh_next[lo:hi, :], out=dhr)
        a, d = A[t, lo:hi, :], dgh[lo:hi, :]  # (b, 3H)
        r, z, n = a[:, 0:H], a[:, H:2 * H], a[:, 2 * H:3 * H]
        dr, dz, dn = d[:, 0:H], d[:, H:2 * H], d[:, 2 * H:3 * H]
        # dn_pre = dh * (1 - z) * (1 - n^2)
        np.multiply(n, n, out=u)
        np.subtract(1.0, u, out=u)
        np.subtract(1.0, z, out=dn)
        dn *= u
        dn *= dhr
        # dz = dh * (h_prev - n) * z * (1 - z)
        np.subtract(1.0, z, out=u)
        u *= z
        np.subtract(h_prev, n, out=dz)
        dz *= u
        dz *= dhr
        # dr = dn * gh_n * r * (1 - r)
        nh = NH[t, lo:hi, :]  # (b, H) W_hn h_prev + b_hn in, its gradient dn * r out
        np.subtract(1.0, r, out=u)
        u *= r
        u *= nh
        np.multiply(u, dn, out=dr)
        np.multiply(dn, r, out=nh)
        np.multiply(dhr, z, out=direct[lo:hi, :])
        # the input side gets [dr, dz, dn], the hidden side [dr, dz, dn * r]
        a[...] = d
        dn[...] = nh

    with _Rows(B, H) as rows:
        for t in _order(T, not reverse):
            rows(pointwise)
            np.matmul(dgh, W_hh, out=dh_next)
            dh_next += direct
            first = False
    return dh_next


SCANS = types.SimpleNamespace(
    name="numpy",
    rnn_scan=rnn_scan,
    rnn_scan_backward=rnn_scan_backward,
    lstm_scan=lstm_scan,
    lstm_scan_backward=lstm_scan_backward,
    gru_scan=gru_scan,
    gru_scan_backward=gru_scan_backward,
)
