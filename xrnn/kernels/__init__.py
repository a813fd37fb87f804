"""Backend fast paths behind the portable scans of :mod:`xrnn.functional`.

:func:`scans_for` returns, for a device, an object with the six sequence
scans (``rnn_scan``, ``rnn_scan_backward``, ``lstm_scan``, ...), all with the
signatures and results of the portable versions in :mod:`xrnn.functional`.
A backend gets its own implementation only when ``benchmarks/`` shows it pays;
each has a test that it equals the portable path.

``XRNN_PORTABLE=1`` in the environment, or :func:`use_fast_paths(False)
<use_fast_paths>`, forces the portable path everywhere.
"""

from __future__ import annotations

import contextlib
import os
import types

from .. import functional as F
from ..backend import Device

__all__ = ["scans_for", "use_fast_paths", "fast_paths_enabled", "PORTABLE"]

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
    return PORTABLE  # CuPy too, until a GPU benchmark shows a fused kernel pays
