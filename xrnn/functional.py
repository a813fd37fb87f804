"""Stateless math: one time step and whole-sequence scans, forward and backward.

Everything here takes the array namespace ``xp`` as its first argument and
touches arrays only through it, so it runs unchanged on NumPy, CuPy, PyTorch
and array-api-strict. This module is the *reference* implementation; the
backend fast paths in :mod:`xrnn.kernels` compute the same functions and are
tested against these.

Conventions (PyTorch's):

* weights are ``(G*H, I)`` / ``(G*H, H)`` (``y = x @ W.T``), gate order
  ``i, f, g, o`` for the LSTM and ``r, z, n`` for the GRU;
* a *projection* ``A`` holds ``x_t @ W_ih.T`` plus the biases that can be
  folded in (both biases for RNN/LSTM, ``b_ih`` and the r,z part of ``b_hh``
  for the GRU) for every step: shape ``(T, B, G*H)``;
* derivatives are written from outputs (``s * (1 - s)`` for a sigmoid,
  ``1 - t * t`` for tanh), as in Chainer.

What the scans keep for backward (and nothing else): the LSTM keeps its
activated gates (written over ``A``) and its cell states ``C``; the GRU keeps
``r, z, n`` (over ``A``) and the hidden part of its candidate pre-activation
``NH = h_prev @ W_hn.T + b_hn``; the plain RNN keeps only its outputs. Each
backward scan then writes the gate gradients over ``A`` so that the weight
gradients are one matrix product each after the loop. The projected LSTM
(``proj_size``, LSTMP) keeps what the LSTM keeps; its backward also writes
each step's unprojected output ``o * tanh(c)`` over ``C`` and the gradient
of each projected output into ``DH``, for the projection's weight gradient.

Variable-length batches call these same scans once per length-sorted
segment on a shrinking batch prefix (:mod:`xrnn.segments`).
"""

from __future__ import annotations

import math
from typing import Any

from ._typing import Array, ArrayNamespace

__all__ = [
    "sigmoid",
    "one_hot",
    "rnn_step",
    "rnn_step_backward",
    "lstm_step",
    "lstm_step_backward",
    "gru_step",
    "gru_step_backward",
    "rnn_scan",
    "rnn_scan_backward",
    "lstm_scan",
    "lstm_scan_backward",
    "lstmp_scan",
    "lstmp_scan_backward",
    "gru_scan",
    "gru_scan_backward",
    "previous_states",
    "log_softmax",
    "softmax",
    "softmax_cross_entropy",
]


# ---------------------------------------------------------------------------
# elementary functions
# ---------------------------------------------------------------------------

def sigmoid(xp: ArrayNamespace, x: Array) -> Array:
    """Logistic function through tanh: exact, and free of exp overflow."""
    return 0.5 * (xp.tanh(0.5 * x) + 1.0)


def one_hot(xp: ArrayNamespace, ids: Array, n: int, dtype: Any, device: Any = None) -> Array:
    """``(..., n)`` array with 1 at ``ids`` and 0 elsewhere."""
    classes = xp.arange(n, dtype=ids.dtype, device=device)  # (n,)
    return xp.astype(ids[..., None] == classes, dtype)  # (..., n)


def _activate(xp, z, nonlinearity: str):
    if nonlinearity == "tanh":
        return xp.tanh(z)
    return xp.maximum(z, xp.zeros_like(z))


def _activate_backward(xp, h, dh, nonlinearity: str):
    if nonlinearity == "tanh":
        return dh * (1.0 - h * h)
    return dh * xp.astype(h > 0, h.dtype)


# ---------------------------------------------------------------------------
# one time step
# ---------------------------------------------------------------------------

def rnn_step(xp: ArrayNamespace, z: Array, nonlinearity: str = "tanh") -> Array:
    """Elman step from pre-activation ``z = x W_ih^T + b_ih + h W_hh^T + b_hh`` (B, H)."""
    return _activate(xp, z, nonlinearity)  # (B, H)


def rnn_step_backward(xp: ArrayNamespace, h: Array, dh: Array, nonlinearity: str = "tanh") -> Array:
    """Gradient of the pre-activation (B, H) given the step output ``h`` and its gradient."""
    return _activate_backward(xp, h, dh, nonlinearity)  # (B, H)


def lstm_step(xp: ArrayNamespace, z: Array, c_prev: Array) -> tuple[Array, Array, Array]:
    """LSTM step from pre-activation gates.

    Args:
        z: (B, 4H) ``x W_ih^T + h W_hh^T + biases``, gate order i, f, g, o.
        c_prev: (B, H) previous cell state.
    Returns:
        acts (B, 4H) activated gates ``[i, f, g, o]``, c (B, H), h (B, H).
    """
    H = c_prev.shape[-1]
    i = sigmoid(xp, z[..., 0:H])  # (B, H)
    f = sigmoid(xp, z[..., H:2 * H])  # (B, H)
    g = xp.tanh(z[..., 2 * H:3 * H])  # (B, H)
    o = sigmoid(xp, z[..., 3 * H:4 * H])  # (B, H)
    c = f * c_prev + i * g  # (B, H)
    h = o * xp.tanh(c)  # (B, H)
    return xp.concat([i, f, g, o], axis=-1), c, h


def lstm_step_backward(xp: ArrayNamespace, acts: Array, c: Array, c_prev: Array, dh: Array,
                       dc: Array) -> tuple[Array, Array]:
    """Backward of :func:`lstm_step`.

    Args:
        acts: (B, 4H) activated gates from the forward step.
        c, c_prev: (B, H) cell state after and before the step.
        dh, dc: (B, H) gradients of the step's h and c outputs (dc may be None).
    Returns:
        dz (B, 4H) gradient of the pre-activation gates, dc_prev (B, H).
    """
    H = c.shape[-1]
    i = acts[..., 0:H]
    f = acts[..., H:2 * H]
    g = acts[..., 2 * H:3 * H]
    o = acts[..., 3 * H:4 * H]
    tc = xp.tanh(c)  # (B, H)
    dc = dh * o * (1.0 - tc * tc) if dc is None else dc + dh * o * (1.0 - tc * tc)  # (B, H)
    di = dc * g * i * (1.0 - i)
    df = dc * c_prev * f * (1.0 - f)
    dg = dc * i * (1.0 - g * g)
    do = dh * tc * o * (1.0 - o)
    return xp.concat([di, df, dg, do], axis=-1), dc * f


def gru_step(xp: ArrayNamespace, gi: Array, gh: Array, h_prev: Array) -> tuple[Array, Array]:
    """GRU step, PyTorch's formulation ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``.

    Args:
        gi: (B, 3H) input part ``x W_ih^T + b_ih`` (r, z, n).
        gh: (B, 3H) hidden part ``h W_hh^T + b_hh`` (r, z, n).
        h_prev: (B, H).
    Returns:
        acts (B, 3H) ``[r, z, n]`` and h (B, H).
    """
    H = h_prev.shape[-1]
    r = sigmoid(xp, gi[..., 0:H] + gh[..., 0:H])  # (B, H)
    z = sigmoid(xp, gi[..., H:2 * H] + gh[..., H:2 * H])  # (B, H)
    n = xp.tanh(gi[..., 2 * H:3 * H] + r * gh[..., 2 * H:3 * H])  # (B, H)
    h = n + z * (h_prev - n)  # (B, H)  == (1 - z) * n + z * h_prev
    return xp.concat([r, z, n], axis=-1), h


def gru_step_backward(xp: ArrayNamespace, acts: Array, gh_n: Array, h_prev: Array,
                      dh: Array) -> tuple[Array, Array, Array]:
    """Backward of :func:`gru_step`.

    Args:
        acts: (B, 3H) ``[r, z, n]``; gh_n: (B, H) ``h W_hn^T + b_hn``;
        h_prev: (B, H); dh: (B, H) gradient of the step output.
    Returns:
        dgi (B, 3H) gradient of the input part, dgh_n (B, H) gradient of
        ``gh_n`` (the r and z parts of the hidden gradient equal dgi's),
        dh_direct (B, H) the part of dh_prev that bypasses ``W_hh``.
    """
    H = h_prev.shape[-1]
    r = acts[..., 0:H]
    z = acts[..., H:2 * H]
    n = acts[..., 2 * H:3 * H]
    dn = dh * (1.0 - z) * (1.0 - n * n)  # (B, H) grad of n's pre-activation
    dz = dh * (h_prev - n) * z * (1.0 - z)
    dr = dn * gh_n * r * (1.0 - r)
    return xp.concat([dr, dz, dn], axis=-1), dn * r, dh * z


# ---------------------------------------------------------------------------
# whole sequences (one layer, one direction)
# ---------------------------------------------------------------------------

def _order(T: int, reverse: bool):
    return range(T - 1, -1, -1) if reverse else range(T)


def previous_states(xp: ArrayNamespace, Y: Array, col: slice, h0: Array, reverse: bool) -> Array:
    """(T, B, H) state entering each step: ``h0`` then the outputs, in time order.

    ``Y[:, :, col]`` holds the direction's outputs; for the reverse direction the
    state entering step t is the output of step t+1.
    """
    T = Y.shape[0]
    Yd = Y[:, :, col]  # (T, B, H)
    if T == 1:
        return h0[None, ...]
    if reverse:
        return xp.concat([Yd[1:, ...], h0[None, ...]], axis=0)
    return xp.concat([h0[None, ...], Yd[:-1, ...]], axis=0)


def rnn_scan(xp: ArrayNamespace, A: Array, W_hh: Array, h0: Array, Y: Array, col: slice, reverse: bool,
             nonlinearity: str) -> Array:
    """Elman recurrence over a sequence.

    Args:
        A: (T, B, H) input projections with both biases folded in.
        W_hh: (H, H); h0: (B, H).
        Y: (T, B, D*H) output buffer; writes ``Y[t, :, col] = h_t``.
    Returns: h_T (B, H), the state after the last processed step.
    """
    h = h0
    for t in _order(A.shape[0], reverse):
        h = rnn_step(xp, A[t, ...] + h @ W_hh.T, nonlinearity)  # (B, H)
        Y[t, :, col] = h
    return h


def rnn_scan_backward(xp: ArrayNamespace, A: Array, Y: Array, col: slice, W_hh: Array, dY: Array, dhT: Array,
                      reverse: bool, nonlinearity: str) -> Array:
    """BPTT through :func:`rnn_scan`; writes the pre-activation gradients over ``A``.

    Args:
        dY: (T, B, D*H) gradient of the outputs (this direction's columns used);
        dhT: (B, H) gradient of the final state, or None.
    Returns: dh0 (B, H).
    """
    dh_next = dhT
    for t in _order(A.shape[0], not reverse):
        dh = dY[t, :, col] if dh_next is None else dY[t, :, col] + dh_next  # (B, H)
        dz = rnn_step_backward(xp, Y[t, :, col], dh, nonlinearity)  # (B, H)
        A[t, ...] = dz
        dh_next = dz @ W_hh  # (B, H)
    return dh_next


def lstm_scan(xp: ArrayNamespace, A: Array, W_hh: Array, h0: Array, c0: Array, Y: Array, col: slice, C: Array,
              reverse: bool) -> tuple[Array, Array]:
    """LSTM recurrence over a sequence.

    Args:
        A: (T, B, 4H) input projections with both biases; overwritten with the
            activated gates ``[i, f, g, o]`` of every step.
        W_hh: (4H, H); h0, c0: (B, H).
        Y: (T, B, D*H) output buffer, ``Y[t, :, col] = h_t``.
        C: (T, B, H) cell-state buffer, ``C[t] = c_t``.
    Returns: (h_T, c_T), each (B, H).
    """
    h, c = h0, c0
    for t in _order(A.shape[0], reverse):
        acts, c, h = lstm_step(xp, A[t, ...] + h @ W_hh.T, c)
        A[t, ...] = acts
        C[t, ...] = c
        Y[t, :, col] = h
    return h, c


def lstm_scan_backward(xp: ArrayNamespace, A: Array, C: Array, c0: Array, W_hh: Array, dY: Array, col: slice,
                       dhT: Array, dcT: Array, reverse: bool) -> tuple[Array, Array]:
    """BPTT through :func:`lstm_scan`; writes the gate gradients over ``A``.

    Returns: (dh0, dc0), each (B, H).
    """
    T = A.shape[0]
    dh_next, dc = dhT, dcT
    step = -1 if reverse else 1  # the previous step is t - step
    for t in _order(T, not reverse):
        tp = t - step
        c_prev = c0 if (tp < 0 or tp >= T) else C[tp, ...]  # (B, H)
        dh = dY[t, :, col] if dh_next is None else dY[t, :, col] + dh_next
        dz, dc = lstm_step_backward(xp, A[t, ...], C[t, ...], c_prev, dh, dc)
        A[t, ...] = dz
        dh_next = dz @ W_hh  # (B, H)
    return dh_next, dc


def lstmp_scan(xp: ArrayNamespace, A: Array, W_hh: Array, W_hr: Array, h0: Array, c0: Array, Y: Array, col: slice,
               C: Array, reverse: bool) -> tuple[Array, Array]:
    """Projected LSTM (LSTMP, ``torch.nn.LSTM(proj_size=P)``) over a sequence.

    ``h_t = (o_t * tanh(c_t)) @ W_hr.T``: the state fed back and output has
    P < H units, the cell keeps H.

    Args:
        A: (T, B, 4H) input projections with both biases; overwritten with the
            activated gates ``[i, f, g, o]``.
        W_hh: (4H, P); W_hr: (P, H); h0: (B, P); c0: (B, H).
        Y: (T, B, D*P) output buffer, ``Y[t, :, col] = h_t``; C: (T, B, H) cell states.
    Returns: (h_T (B, P), c_T (B, H)).
    """
    h, c = h0, c0
    for t in _order(A.shape[0], reverse):
        acts, c, r = lstm_step(xp, A[t, ...] + h @ W_hh.T, c)  # r = o * tanh(c) (B, H)
        h = r @ W_hr.T  # (B, P)
        A[t, ...] = acts
        C[t, ...] = c
        Y[t, :, col] = h
    return h, c


def lstmp_scan_backward(xp: ArrayNamespace, A: Array, C: Array, c0: Array, W_hh: Array, W_hr: Array, dY: Array,
                        col: slice, dhT: Array, dcT: Array, reverse: bool, DH: Array) -> tuple[Array, Array]:
    """BPTT through :func:`lstmp_scan`.

    Writes the gate gradients over ``A`` (T, B, 4H), each step's unprojected
    output ``r_t = o_t * tanh(c_t)`` over ``C`` (T, B, H) and the gradient of
    each projected output ``h_t`` into ``DH`` (T, B, P), so that the
    projection's weight gradient is ``DH.T @ C`` after the call.
    Returns: (dh0 (B, P), dc0 (B, H)).
    """
    T = A.shape[0]
    H = C.shape[-1]
    dh_next, dc = dhT, dcT
    step = -1 if reverse else 1  # the previous step is t - step
    for t in _order(T, not reverse):
        tp = t - step
        c_prev = c0 if (tp < 0 or tp >= T) else C[tp, ...]  # (B, H); C[tp] is still a cell state
        dh = dY[t, :, col] if dh_next is None else dY[t, :, col] + dh_next  # (B, P)
        DH[t, ...] = dh
        dr = dh @ W_hr  # (B, H) gradient of o * tanh(c)
        r = A[t, :, 3 * H:4 * H] * xp.tanh(C[t, ...])  # (B, H)
        dz, dc = lstm_step_backward(xp, A[t, ...], C[t, ...], c_prev, dr, dc)
        A[t, ...] = dz
        C[t, ...] = r  # c_t is spent: the steps still to go read only the cell states before t
        dh_next = dz @ W_hh  # (B, P)
    return dh_next, dc


def gru_scan(xp: ArrayNamespace, A: Array, W_hh: Array, b_hh: Array | None, h0: Array, Y: Array, col: slice, NH: Array,
             reverse: bool) -> Array:
    """GRU recurrence over a sequence.

    Args:
        A: (T, B, 3H) input projections ``x W_ih^T + b_ih`` (hidden biases NOT
            folded in); overwritten with ``[r, z, n]``.
        W_hh: (3H, H); b_hh: (3H,) or None; h0: (B, H).
        Y: (T, B, D*H) output buffer; NH: (T, B, H) receives ``h W_hn^T + b_hn``.
    Returns: h_T (B, H).
    """
    H = h0.shape[-1]
    h = h0
    for t in _order(A.shape[0], reverse):
        gh = h @ W_hh.T  # (B, 3H)
        if b_hh is not None:
            gh = gh + b_hh
        acts, h = gru_step(xp, A[t, ...], gh, h)
        A[t, ...] = acts
        NH[t, ...] = gh[:, 2 * H:3 * H]
        Y[t, :, col] = h
    return h


def gru_scan_backward(xp: ArrayNamespace, A: Array, NH: Array, Y: Array, col: slice, h0: Array, W_hh: Array, dY: Array,
                      dhT: Array, reverse: bool) -> Array:
    """BPTT through :func:`gru_scan`.

    Writes the input-side gate gradients over ``A`` (T, B, 3H) and the gradient
    of ``h W_hn^T + b_hn`` over ``NH`` (T, B, H); the hidden-side gradient is
    ``[A[..., :2H], NH]``.
    Returns: dh0 (B, H).
    """
    T = A.shape[0]
    H = h0.shape[-1]
    dh_next = dhT
    step = -1 if reverse else 1
    for t in _order(T, not reverse):
        tp = t - step
        h_prev = h0 if (tp < 0 or tp >= T) else Y[tp, :, col]
        dh = dY[t, :, col] if dh_next is None else dY[t, :, col] + dh_next
        dgi, dghn, dh_direct = gru_step_backward(xp, A[t, ...], NH[t, ...], h_prev, dh)
        A[t, ...] = dgi
        NH[t, ...] = dghn
        dgh = xp.concat([dgi[:, 0:2 * H], dghn], axis=-1)  # (B, 3H)
        dh_next = dh_direct + dgh @ W_hh  # (B, H)
    return dh_next


# ---------------------------------------------------------------------------
# softmax and the language-model loss
# ---------------------------------------------------------------------------

def log_softmax(xp: ArrayNamespace, logits: Array, axis: int = -1) -> Array:
    """Stable log-softmax along ``axis`` (max subtracted before exp)."""
    z = logits - xp.max(logits, axis=axis, keepdims=True)
    return z - xp.log(xp.sum(xp.exp(z), axis=axis, keepdims=True))


def softmax(xp: ArrayNamespace, logits: Array, axis: int = -1) -> Array:
    z = xp.exp(logits - xp.max(logits, axis=axis, keepdims=True))
    return z / xp.sum(z, axis=axis, keepdims=True)


def softmax_cross_entropy(logits: Any, targets: Any, ignore_index: int | None = None) -> tuple[Array, Array]:
    """Mean cross-entropy of integer targets under softmax(logits), and its gradient.

    Args:
        logits: (..., V) floating array (any supported library).
        targets: (...) integer class ids in ``[0, V)``, same device as logits.
        ignore_index: a target value whose positions count neither in the loss
            nor in the mean (PyTorch's ``ignore_index``); None uses all.
    Returns:
        ``(loss, dlogits)``: loss a 0-d array in nats per counted token (on the
        device, no host sync), dlogits ``(..., V)`` the gradient of that mean.
    """
    from .backend import check_id_range, device_of
    from .errors import DTypeError, ShapeError

    dev = device_of(logits)
    dev.check(targets, "targets")
    xp = dev.xp
    if not xp.isdtype(logits.dtype, "real floating"):
        raise DTypeError(f"logits must be floating point, got {logits.dtype}")
    if not xp.isdtype(targets.dtype, "integral"):
        raise DTypeError(
            f"targets must be integer class ids, got {targets.dtype}; cast with xp.astype(targets, xp.int64)"
        )
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ShapeError(
            f"targets shape {tuple(targets.shape)} must equal logits shape without the class axis "
            f"{tuple(logits.shape[:-1])}"
        )
    with dev:
        V = logits.shape[-1]
        safe_t = targets
        if ignore_index is not None:
            keep = targets != ignore_index  # (...)
            safe_t = xp.where(keep, targets, xp.zeros_like(targets))  # ignored positions count as class 0
        check_id_range(xp, xp.reshape(safe_t, (-1,)), V, "targets",
                       f"targets are class ids for the {V} logits of the last axis", kind="class")
        from .kernels import fused_for

        fused = fused_for(dev)  # CuPy: one fused kernel (xrnn/kernels/cuda/loss.cu), same results
        if fused is not None:
            out = fused.softmax_cross_entropy(fused.launcher(), xp, logits, targets, ignore_index)
            if out is not None:
                return out
        z = logits - xp.max(logits, axis=-1, keepdims=True)  # (..., V)
        e = xp.exp(z)
        s = xp.sum(e, axis=-1, keepdims=True)  # (..., 1)
        oh = one_hot(xp, safe_t, V, logits.dtype, device=dev._create_device())  # (..., V)
        nll = xp.log(s[..., 0]) - xp.vecdot(z, oh)  # (...) the target's shifted logit, without a (..., V) product
        grad = e  # becomes the gradient in place: softmax - one_hot, over the count
        grad /= s
        grad -= oh
        if ignore_index is None:
            count = max(math.prod(targets.shape), 1)
            grad /= count
            return xp.sum(nll) / count, grad
        w = xp.astype(keep, logits.dtype)  # (...)
        sw = xp.sum(w)
        count = xp.maximum(sw, xp.ones_like(sw))
        grad *= (w / count)[..., None]
        return xp.sum(nll * w) / count, grad
