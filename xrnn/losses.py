"""Losses for :class:`~xrnn.sequential.Sequential`: value and gradient in one call.

Each loss takes the model's output (or, for the cross-entropies, its
logits), the targets, and an optional mask of valid positions, and returns
``(loss, grad)``: ``loss`` a 0-d array on the output's device (no host
synchronisation), ``grad`` the gradient of that mean with the output's
shape. All math goes through the output's array namespace.

=========================  ==========================================================
name (aliases)             definition
=========================  ==========================================================
``"mse"``                  mean of ``(y - t)**2`` over all elements
(mean_squared_error)
``"mae"``                  mean of ``|y - t|`` (gradient ``sign(y - t)``, 0 at 0, as torch)
(mean_absolute_error)
``"binary_cross_entropy"`` mean of ``-(t log s + (1 - t) log(1 - s))``, ``s = sigmoid(z)``,
(binary_crossentropy)      computed from the logits ``z`` (stable for any ``z``)
``"cross_entropy"``        mean over positions of ``-log softmax(z)[t]`` for integer
(sparse_categorical_…,     targets (Keras' sparse form; reuses
categorical_crossentropy)  :func:`xrnn.functional.softmax_cross_entropy`), or of
                           ``-sum(t * log softmax(z))`` for one-hot/probability targets
=========================  ==========================================================

Masks: ``mask`` is a (B, T) array of 1 (valid) and 0 (padding) for outputs
``(B, T, ...)``; padded positions count neither in the sum nor in the
number the mean divides by, and their gradient is exactly zero (their
targets may hold anything).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from . import functional as F
from ._typing import Array
from .backend import device_of, dtype_name
from .backend import int_shape as _shape
from .errors import ConfigError, DTypeError, ShapeError

__all__ = [
    "LOSSES",
    "resolve_loss",
    "mse",
    "mae",
    "binary_cross_entropy",
    "cross_entropy",
]

_ALIASES = {
    "mse": "mse",
    "mean_squared_error": "mse",
    "mae": "mae",
    "mean_absolute_error": "mae",
    "binary_cross_entropy": "binary_cross_entropy",
    "binary_crossentropy": "binary_cross_entropy",
    "bce": "binary_cross_entropy",
    "cross_entropy": "cross_entropy",
    "crossentropy": "cross_entropy",
    "sparse_categorical_crossentropy": "cross_entropy",
    "categorical_crossentropy": "cross_entropy",
}

#: canonical loss names
LOSSES = ("mse", "mae", "binary_cross_entropy", "cross_entropy")


def resolve_loss(name: Any) -> str:
    """The canonical name for ``name`` or one of its Keras aliases (any case)."""
    key = name.lower() if isinstance(name, str) else None
    if key not in _ALIASES:
        raise ConfigError(
            f"unknown loss {name!r}; expected one of {', '.join(LOSSES)} "
            f"(Keras names {', '.join(k for k in _ALIASES if k not in LOSSES)} also work)"
        )
    return _ALIASES[key]


def _prepare(pred, target, what: str):
    """Device/dtype/shape checks shared by the element-wise losses; returns (dev, target)."""
    dev = device_of(pred)
    dev.check(target, "targets")
    xp = dev.xp
    if not xp.isdtype(pred.dtype, "real floating"):
        raise DTypeError(f"{what}: predictions must be floating point, got {dtype_name(pred.dtype)}")
    ps, ts = _shape(pred), _shape(target)
    if ts != ps and not (ps and ps[-1] == 1 and ts == ps[:-1]):
        raise ShapeError(
            f"{what}: targets have shape {ts} but the model's outputs have shape {ps}; "
            "they must match (a (batch,) target is accepted for a (batch, 1) output)"
        )
    with dev:
        if ts != ps:
            target = xp.reshape(target, ps)  # y (B,) for outputs (B, 1), as Keras accepts
        if dtype_name(target.dtype) != dtype_name(pred.dtype):
            target = xp.astype(target, pred.dtype)
    return dev, target


def _weights(dev, pred, mask):
    """(weights broadcastable to pred, number of counted elements as an array or int)."""
    xp = dev.xp
    if mask is None:
        return None, max(math.prod(_shape(pred)), 1)
    if _shape(mask) != _shape(pred)[:2]:
        raise ShapeError(f"mask must have shape (batch, timesteps) = {_shape(pred)[:2]}, got {_shape(mask)}")
    w = xp.astype(mask, pred.dtype)
    w = xp.reshape(w, _shape(w) + (1,) * (pred.ndim - 2))
    per = math.prod(_shape(pred)[2:])
    count = xp.maximum(xp.sum(w) * per, xp.ones_like(xp.sum(w)))
    return w, count


def mse(pred: Array, target: Array, mask: Array | None = None) -> tuple[Array, Array]:
    """Mean squared error and its gradient ``2 (y - t) / N``."""
    dev, target = _prepare(pred, target, "mse")
    xp = dev.xp
    with dev:
        w, n = _weights(dev, pred, mask)
        r = pred - target
        if w is not None:
            r = r * w
        return xp.sum(r * r) / n, r * (2.0 / n)


def mae(pred: Array, target: Array, mask: Array | None = None) -> tuple[Array, Array]:
    """Mean absolute error and its gradient ``sign(y - t) / N``."""
    dev, target = _prepare(pred, target, "mae")
    xp = dev.xp
    with dev:
        w, n = _weights(dev, pred, mask)
        r = pred - target
        # sign(r) by comparisons: array-api-compat's CuPy sign assigns through a NaN mask (a host sync)
        g = xp.astype(r > 0, r.dtype) - xp.astype(r < 0, r.dtype)
        g = xp.where(xp.isnan(r), r, g)  # NaN stays NaN, as torch's sign
        a = xp.abs(r)
        if w is not None:
            a, g = a * w, g * w
        return xp.sum(a) / n, g / n


def binary_cross_entropy(logits: Array, target: Array, mask: Array | None = None) -> tuple[Array, Array]:
    """Binary cross-entropy of targets in [0, 1] under ``sigmoid(logits)``; gradient ``(s - t) / N``.

    ``max(z, 0) - z t + log(1 + exp(-|z|))`` per element: exact and finite
    for any logit.
    """
    dev, target = _prepare(logits, target, "binary_cross_entropy")
    xp = dev.xp
    with dev:
        w, n = _weights(dev, logits, mask)
        z = logits
        loss_el = xp.maximum(z, xp.zeros_like(z)) - z * target + xp.log1p(xp.exp(-xp.abs(z)))
        g = F.sigmoid(xp, z) - target
        if w is not None:
            loss_el, g = loss_el * w, g * w
        return xp.sum(loss_el) / n, g / n


def cross_entropy(logits: Array, target: Array, mask: Array | None = None) -> tuple[Array, Array]:
    """Softmax cross-entropy over the last axis, mean over positions.

    Args:
        logits: (..., V) floating.
        target: integer class ids (...) in [0, V) (sparse), or floating
            (..., V) one-hot / probability rows (categorical).
        mask: optional (B, T) validity mask for logits (B, T, V).
    """
    dev = device_of(logits)
    dev.check(target, "targets")
    xp = dev.xp
    ls, ts = _shape(logits), _shape(target)
    if xp.isdtype(target.dtype, "integral"):
        if ts != ls[:-1] and ts != ls[:-1] + (1,):
            raise ShapeError(
                f"cross_entropy: integer targets have shape {ts} but the outputs have shape {ls}; "
                f"class-id targets must have shape {ls[:-1]} (one id per position)"
            )
        with dev:
            if ts != ls[:-1]:
                target = xp.reshape(target, ls[:-1])
            if mask is None:
                return F.softmax_cross_entropy(logits, target)
            if _shape(mask) != ls[:2]:
                raise ShapeError(f"mask must have shape (batch, timesteps) = {ls[:2]}, got {_shape(mask)}")
            keep = xp.astype(mask, xp.bool) if not xp.isdtype(mask.dtype, "bool") else mask
            t = xp.where(keep, target, xp.full_like(target, -1))
            return F.softmax_cross_entropy(logits, t, ignore_index=-1)
    if ts != ls:
        raise ShapeError(
            f"cross_entropy: one-hot/probability targets have shape {ts} but the outputs have shape {ls}; "
            f"they must match, or pass integer class ids of shape {ls[:-1]}"
        )
    with dev:
        if dtype_name(target.dtype) != dtype_name(logits.dtype):
            target = xp.astype(target, logits.dtype)
        logp = F.log_softmax(xp, logits)  # (..., V)
        nll = -xp.sum(target * logp, axis=-1)  # (...)
        tsum = xp.sum(target, axis=-1, keepdims=True)  # (..., 1)
        g = xp.exp(logp) * tsum - target  # (..., V)
        w, n = _weights(dev, nll, mask)  # weights shaped like nll (B, T, ...), counted positions
        if w is None:
            return xp.sum(nll) / n, g / n
        return xp.sum(nll * w) / n, g * (w[..., None] / n)


_FUNCTIONS = {"mse": mse, "mae": mae, "binary_cross_entropy": binary_cross_entropy, "cross_entropy": cross_entropy}


def get(name: Any) -> Callable[..., tuple[Array, Array]]:
    """The loss function for a name or alias."""
    return _FUNCTIONS[resolve_loss(name)]
