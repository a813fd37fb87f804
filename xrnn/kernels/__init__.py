"""Backend fast paths behind the portable scans of :mod:`xrnn.functional`.

:func:`scans_for` returns, for a device, an object with the six sequence
scans (``rnn_scan``, ``rnn_scan_backward``, ``lstm_scan``, ...), all with the
signatures and results of the portable versions in :mod:`xrnn.functional`.
NumPy gets :mod:`~xrnn.kernels.numpy_fast` (in-place buffers, measured on
the CPU); CuPy gets :mod:`~xrnn.kernels.cupy_fast` (one fused CUDA kernel per
time step, the matrix products on cuBLAS). Each has tests that it equals the
portable path.

The CuPy path also fuses softmax cross-entropy, the optimizer updates and
global-norm clipping; :func:`fused_for`, :func:`fused_optimizer_step` and
:func:`fused_clip_grad_norm` are the small hooks :mod:`xrnn.functional` and
:mod:`xrnn.optim` call (they answer "not here" on every other backend).

``XRNN_PORTABLE=1`` in the environment, or :func:`use_fast_paths(False)
<use_fast_paths>`, forces the portable path everywhere.
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Mapping
from typing import Any

from .. import functional as F
from .._typing import Array
from ..backend import Device

__all__ = ["scans_for", "use_fast_paths", "fast_paths_enabled", "PORTABLE", "fused_for",
           "fused_optimizer_step", "fused_clip_grad_norm"]

PORTABLE = types.SimpleNamespace(
    name="portable",
    rnn_scan=F.rnn_scan,
    rnn_scan_backward=F.rnn_scan_backward,
    lstm_scan=F.lstm_scan,
    lstm_scan_backward=F.lstm_scan_backward,
    gru_scan=F.gru_scan,
    gru_scan_backward=F.gru_scan_backward,
)

_enabled = os.environ.get("XRNN_PORTABLE", "") in ("", "0")


def fast_paths_enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def _restore(previous: bool):
    global _enabled
    try:
        yield
    finally:
        _enabled = previous


def use_fast_paths(enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """Turn backend fast paths on or off; usable as a context manager too.

    ``with use_fast_paths(False): ...`` runs the block on the portable path
    and restores the previous setting afterwards.
    """
    global _enabled
    previous = _enabled
    _enabled = bool(enabled)
    return _restore(previous)


def scans_for(dev: Device) -> types.SimpleNamespace:
    """The scan implementations to use on ``dev`` (an :class:`xrnn.backend.Device`)."""
    if not _enabled:
        return PORTABLE
    if dev.library == "numpy":
        from . import numpy_fast

        return numpy_fast.SCANS
    if dev.library == "cupy":
        from . import cupy_fast

        return cupy_fast.SCANS
    return PORTABLE


def fused_for(dev: Device) -> types.ModuleType | None:
    """:mod:`~xrnn.kernels.cupy_fast` when ``dev`` is a CuPy device and fast paths are on, else None."""
    if not _enabled or dev.library != "cupy":
        return None
    from . import cupy_fast

    return cupy_fast


def fused_optimizer_step(opt: Any, params: Mapping[str, Array], grads: Mapping[str, Array], t: int) -> bool:
    """Run ``opt``'s step ``t`` as one fused launch when it can (CuPy); False: run the portable update."""
    fused = fused_for(opt.device)
    return fused is not None and fused.optimizer_step(fused.launcher(), opt, params, grads, t)


def fused_clip_grad_norm(grads: list, max_norm: float, p: float) -> Array | None:
    """Fused global-norm clipping on CuPy: the total norm (0-d device array), or None: run the portable code."""
    if not _enabled or not grads:
        return None
    from ..backend import device_of

    dev = device_of(grads[0])
    fused = fused_for(dev)
    if fused is None:
        return None
    for i, g in enumerate(grads):
        dev.check(g, f"gradient {i}")
    with dev:
        return fused.clip_grad_norm(fused.launcher(), dev.xp, grads, max_norm, p)
