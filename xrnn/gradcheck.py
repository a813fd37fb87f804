"""Finite-difference gradients, shipped with the library (as Chainer's gradient_check).

Used by xrnn's own tests to prove every hand-written backward, and by users
who write their own layers. Work in float64: central differences have error
O(eps^2) from truncation plus O(ulp/eps) from rounding, so float64 with
eps=1e-6 gives about 1e-9 absolute accuracy on well-scaled functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .backend import to_numpy

__all__ = [
    "numerical_gradient",
    "parameter_gradients",
    "directional_derivative",
    "parameter_directional_derivatives",
]


def numerical_gradient(fn: Callable[[np.ndarray], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central-difference gradient of the scalar ``fn`` at host array ``x``.

    ``fn`` receives a float64 NumPy array of ``x``'s shape (perturbed in one
    element at a time) and returns a number. ``x`` itself is not modified.
    """
    x = np.array(to_numpy(x), dtype=np.float64, copy=True)
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        orig = flat[i]
        flat[i] = orig + eps
        fp = float(fn(x))
        flat[i] = orig - eps
        fm = float(fn(x))
        flat[i] = orig
        gflat[i] = (fp - fm) / (2.0 * eps)
    return g


def parameter_gradients(module: Any, loss: Callable[[], float], eps: float = 1e-6) -> dict:
    """Numerical gradient of ``loss()`` with respect to every parameter of ``module``.

    ``loss`` must run the module's forward with its current parameters and
    return a number. Parameters are perturbed one element at a time (through
    the device, so the check exercises the backend) and restored afterwards.
    """
    return {name: _with_parameter_varied(module, name, loss, lambda f, x: numerical_gradient(f, x, eps))
            for name in module.parameters()}


def _with_parameter_varied(module, name: str, loss: Callable[[], float], probe: Callable):
    """``probe(f, x)`` where ``x`` is parameter ``name`` on the host and ``f(v)`` is ``loss()`` with
    that parameter set to ``v`` (through the device); the parameter is restored afterwards."""
    original = module.parameters()[name]

    def f(v):
        module._set_param(name, module.device.asarray(v, dtype=module.dtype))
        return loss()

    try:
        return probe(f, to_numpy(original))
    finally:
        module._set_param(name, original)


def directional_derivative(fn: Callable[[np.ndarray], float], x: np.ndarray, v: np.ndarray, eps: float = 1e-6) -> float:
    """Central difference of ``fn`` at ``x`` along direction ``v``: about ``<grad fn(x), v>``.

    Two evaluations per check instead of two per element: a cheaper, still
    independent, test of a whole gradient array (pair it with an element-wise
    check on a fast backend).
    """
    x = np.asarray(to_numpy(x), dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    return (float(fn(x + eps * v)) - float(fn(x - eps * v))) / (2.0 * eps)


def parameter_directional_derivatives(module: Any, loss: Callable[[], float], directions: dict,
                                      eps: float = 1e-6) -> dict:
    """For each parameter name in ``directions``, the derivative of ``loss()`` along it."""
    return {name: _with_parameter_varied(module, name, loss,
                                         lambda f, x, v=v: directional_derivative(f, x, v, eps))
            for name, v in directions.items()}
