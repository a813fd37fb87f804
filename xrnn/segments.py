"""Variable-length batches: length checks, the length-sorted segment plan, ``pad_sequences``.

A right-padded batch of B sequences with lengths ``l_b <= T`` runs as
PyTorch runs a packed sequence. The rows are sorted by length (longest
first, stable) and time is cut into *segments* between distinct lengths: in
segment ``[s, e)`` only the first ``n`` sorted rows (those with length
``>= e``) are active, so the recurrence runs on a shrinking batch prefix and
no padded step is ever computed. The valid positions in time-major order
(time, then sorted row) are the *packed* rows, ``N = sum(l_b)`` of them;
segment ``k`` is the packed rows ``[off, off + (e - s) * n)``, which reshape
to ``(e - s, n, F)``.

:class:`SegmentPlan` holds that plan on the host (it needs the lengths
there: a device array of lengths costs one host read per call) and the
gather indices that move a padded batch into packed rows and back on the
device. :class:`xrnn.modules.RNN`/``LSTM``/``GRU`` run their scans segment by
segment on packed rows (``forward(x, lengths=...)``); :mod:`xrnn.layers`
(``Masking``, ``Embedding(mask_zero=True)``) and so ``Sequential`` go through
those same modules.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._typing import Array
from .backend import Device, dtype_name, resolve_device, to_numpy
from .backend import int_shape as _shape
from .errors import DTypeError, ShapeError

__all__ = ["check_lengths", "SegmentPlan", "pad_sequences"]


def check_lengths(lengths: Any, B: int, T: int, minimum: int = 0) -> np.ndarray | None:
    """Validate sequence lengths; returns a host int64 array (B,) or None.

    ``lengths`` may be None, a list, a NumPy array or a device array of any
    supported library (copied to the host: one synchronisation per call).
    Every length must be an integer in ``[minimum, T]``; None means no
    padding. ``minimum=1`` is PyTorch's rule (``pack_padded_sequence``
    refuses empty sequences); Keras' masks allow 0.
    """
    if lengths is None:
        return None
    host = np.asarray(to_numpy(lengths))
    if host.shape != (B,):
        raise ShapeError(f"lengths must have shape (batch,) = ({B},), one length per sequence, got {host.shape}")
    if host.dtype.kind not in "iu":
        raise DTypeError(f"lengths must be integers (valid steps per sequence), got dtype {host.dtype}")
    host = host.astype(np.int64)
    if B and (host.min() < minimum or host.max() > T):
        what = "empty sequences are not allowed (as in torch's pack_padded_sequence); " if host.min() < minimum \
            and minimum > 0 else ""
        raise ShapeError(f"lengths must lie in [{minimum}, timesteps={T}]: {what}got values from {host.min()} "
                         f"to {host.max()}")
    return host


class SegmentPlan:
    """The length-sorted segments of a right-padded batch (see the module docstring).

    Attributes (host):
        B, T: batch size and padded length.
        order: (B,) sorted row -> original row (longest first, stable);
            ``inv`` its inverse.
        segments: list of ``(s, e, n, off)``: steps ``[s, e)`` run on the
            first ``n`` sorted rows, whose packed rows start at ``off``.
        N: number of packed rows (valid positions).
        identity: True when ``order`` is ``arange(B)`` (no row gather needed).
    """

    def __init__(self, lengths: np.ndarray, T: int):
        lengths = np.asarray(lengths, dtype=np.int64)
        self.B, self.T = int(lengths.shape[0]), int(T)
        self.order = np.argsort(-lengths, kind="stable")
        self.inv = np.argsort(self.order, kind="stable")
        self.sorted_lengths = lengths[self.order]
        self.identity = bool(np.all(self.order == np.arange(self.B)))
        self.whole = bool(np.all(lengths == T))
        segs, s, off = [], 0, 0
        for e in sorted({int(v) for v in self.sorted_lengths if v > 0}):
            n = int(np.sum(self.sorted_lengths >= e))
            segs.append((s, e, n, off))
            off += (e - s) * n
            s = e
        self.segments = segs
        self.N = off
        self._device_arrays: dict = {}
        self._steps: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def full(cls, B: int, T: int) -> SegmentPlan:
        """The plan of a batch without padding: one segment of B rows over T steps.

        Plans are not changed after they are built, so one per (B, T) is kept and shared:
        building it (sorts and scans of the lengths) cost more than a batch-1 step's scan."""
        return _full_plan(int(B), int(T))

    # -- host indices ---------------------------------------------------------
    def steps(self) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, offs)``, two host ``np.intp`` arrays over the steps up to the longest length:
        step t runs on the first ``rows[t]`` sorted rows, which are the packed rows from
        ``offs[t]`` on (what the C scans take to run every segment in one call)."""
        if self._steps is None:
            T_ = self.segments[-1][1] if self.segments else 0
            rows, offs = np.zeros(T_, dtype=np.intp), np.zeros(T_, dtype=np.intp)
            for s, e, n, off in self.segments:
                rows[s:e] = n
                offs[s:e] = off + n * np.arange(e - s)
            self._steps = (rows, offs)
        return self._steps

    def _valid(self):
        """(t, j) of every packed row, time-major: time, then sorted row."""
        t = np.arange(self.T)[:, None]  # (T, 1)
        return np.nonzero(self.sorted_lengths[None, :] > t)  # two (N,) arrays

    def _index(self, dev, key: str):
        """Device int64 index arrays, built once per plan and device."""
        k = (key, dev.name)
        if k not in self._device_arrays:
            B, T = self.B, self.T
            if key in ("order", "inv"):
                host = getattr(self, key)
            else:
                tt, jj = self._valid()
                rows = self.order[jj]  # (N,) original row of each packed row
                if key == "pack_tm":
                    host = tt * B + rows  # flat row of (T*B, F)
                elif key == "pack_bm":
                    host = rows * T + tt  # flat row of (B*T, F)
                else:  # unpack_tm / unpack_bm: packed row of each padded position, N for padding (a zero row)
                    pos = np.full((T, B), self.N, dtype=np.int64)  # (T, B)
                    pos[tt, rows] = np.arange(self.N)
                    host = pos.reshape(-1) if key == "unpack_tm" else pos.T.reshape(-1)
            self._device_arrays[k] = dev.asarray(np.asarray(host, dtype=np.int64), dtype="int64")
        return self._device_arrays[k]

    # -- device moves -----------------------------------------------------------
    def pack(self, dev: Device, x: Array, batch_first: bool) -> Array:
        """Padded x (T, B, F), or (B, T, F) with ``batch_first``, -> packed rows (N, F)."""
        xp = dev.xp
        flat = xp.reshape(x, (self.T * self.B, _shape(x)[-1]))  # (T*B, F)
        return xp.take(flat, self._index(dev, "pack_bm" if batch_first else "pack_tm"), axis=0)  # (N, F)

    def unpack(self, dev: Device, y: Array, batch_first: bool) -> Array:
        """Packed rows (N, W) -> padded (T, B, W) (or (B, T, W)), zero at padded positions."""
        xp = dev.xp
        W = _shape(y)[-1]
        yz = xp.concat([y, xp.zeros((1, W), dtype=y.dtype, device=dev._create_device())], axis=0)  # (N+1, W)
        out = xp.take(yz, self._index(dev, "unpack_bm" if batch_first else "unpack_tm"), axis=0)  # (T*B, W)
        return xp.reshape(out, (self.B, self.T, W) if batch_first else (self.T, self.B, W))

    def sort_rows(self, dev: Device, a: Array, axis: int = 0) -> Array:
        """``a`` with its batch axis in sorted order (no copy for an already sorted batch)."""
        return a if self.identity else dev.xp.take(a, self._index(dev, "order"), axis=axis)

    def unsort_rows(self, dev: Device, a: Array, axis: int = 0) -> Array:
        """Inverse of :meth:`sort_rows`."""
        return a if self.identity else dev.xp.take(a, self._index(dev, "inv"), axis=axis)


@functools.lru_cache(maxsize=64)
def _full_plan(B: int, T: int) -> SegmentPlan:
    return SegmentPlan(np.full((B,), T, dtype=np.int64), T)


def pad_sequences(sequences: Sequence[Any], *, batch_first: bool = False, padding_value: float = 0.0,
                  dtype: Any = None, device: Any = "cpu") -> tuple[Array, np.ndarray]:
    """Right-pad variable-length sequences into one batch on ``device``; returns ``(padded, lengths)``.

    The name is Keras' (``keras.utils.pad_sequences``); the result is
    PyTorch's ``pad_sequence`` plus the lengths, ready for
    ``lstm(padded, lengths=lengths)``. Unlike Keras' default, padding goes at
    the *end* of each sequence (right padding, the only kind the recurrent
    layers take).

    Args:
        sequences: a non-empty list of arrays (T_i, *features) of any supported
            library (device arrays are read to the host) or nested lists; all
            with the same feature shape.
        batch_first: False gives (T, B, *features) (``xrnn.LSTM``'s default
            layout), True gives (B, T, *features) (Keras', ``batch_first=True``).
        padding_value: the value at padded positions.
        dtype: the result's dtype name (``"float32"``, ``"int64"``, ...);
            None keeps the sequences' common dtype.
        device: where the padded batch goes (one host-to-device copy).
    Returns:
        ``padded`` on ``device`` with T = max(T_i), and ``lengths``, a host
        NumPy int64 array (B,): the recurrent layers need the lengths on the
        host to plan their segments, so keeping them there saves a device
        read per call.
    """
    if isinstance(sequences, (str, bytes)) or not hasattr(sequences, "__len__") or len(sequences) == 0:
        raise ShapeError("pad_sequences takes a non-empty list of arrays (T_i, *features)")
    host = [np.asarray(to_numpy(s)) for s in sequences]
    for i, s in enumerate(host):
        if s.ndim < 1:
            raise ShapeError(f"sequence {i} is a scalar; each sequence must be an array (T_i, *features)")
        if s.shape[1:] != host[0].shape[1:]:
            raise ShapeError(
                f"sequence {i} has feature shape {s.shape[1:]} but sequence 0 has {host[0].shape[1:]}; "
                "all sequences need the same shape after the time axis"
            )
    dev = resolve_device(device)
    lengths = np.array([s.shape[0] for s in host], dtype=np.int64)  # (B,)
    T = int(lengths.max())
    np_dtype = np.result_type(*host)
    if dtype is not None and np_dtype.kind in "iub" and np.dtype(dtype_name(dtype)).kind == "f":
        np_dtype = np.dtype(np.float64)  # integer data into a float batch: pad in float (exact padding_value)
    out = np.full((len(host), T) + host[0].shape[1:], padding_value, dtype=np_dtype)  # (B, T, *features) host
    for b, s in enumerate(host):
        out[b, : s.shape[0], ...] = s
    if not batch_first:
        out = np.ascontiguousarray(np.moveaxis(out, 0, 1))  # (T, B, *features)
    return dev.asarray(out, dtype=np_dtype.name if dtype is None else dtype), lengths
