"""Layers that own parameters: recurrent layers, one-step cells, Linear, Embedding.

Every layer has PyTorch's parameter names and layouts, an explicit
``forward`` and a hand-written ``backward`` (BPTT for the recurrent layers),
and accumulates parameter gradients into ``layer.grads`` (same keys as the
state dict). The math lives in :mod:`xrnn.functional` (and its fast paths in
:mod:`xrnn.kernels`); this module adds parameters, input checks, caching for
backward, and the device handling.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from . import functional as F
from ._typing import Array
from .backend import (
    Device,
    check_id_range,
    dtype_name,
    format_bytes,
    host_rng,
    oom_guard,
    resolve_device,
    resolve_dtype,
    to_device,
)
from .backend import int_shape as _shape
from .errors import CheckpointCorruptError, ConfigError, DTypeError, ShapeError, StateError
from .kernels import scans_for
from .segments import SegmentPlan, check_lengths

__all__ = [
    "Module",
    "no_grad",
    "RNN",
    "LSTM",
    "GRU",
    "RNNCell",
    "LSTMCell",
    "GRUCell",
    "Linear",
    "Embedding",
    "IncompatibleKeys",
    "parameter_budget",
]

# ---------------------------------------------------------------------------
# no_grad: forward passes that keep nothing for backward
# ---------------------------------------------------------------------------

_local = threading.local()


class IncompatibleKeys(NamedTuple):
    """What ``load_state_dict`` could not match, as torch's ``_IncompatibleKeys``:
    ``missing_keys`` (the model's names absent from the state dict) and
    ``unexpected_keys`` (the state dict's names the model does not have)."""

    missing_keys: list
    unexpected_keys: list

    def __repr__(self) -> str:
        if not self.missing_keys and not self.unexpected_keys:
            return "<All keys matched successfully>"
        return f"IncompatibleKeys(missing_keys={self.missing_keys}, unexpected_keys={self.unexpected_keys})"


def _grad_enabled() -> bool:
    return getattr(_local, "grad", True)


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Within this block, forward passes keep nothing for backward (inference, sampling)."""
    previous = _grad_enabled()
    _local.grad = False
    try:
        yield
    finally:
        _local.grad = previous


def dropout_mask(dev: Device, rng: np.random.Generator, shape: tuple, p: float, dtype: str) -> Array:
    """Inverted-dropout multiplier of ``shape``: 0 (dropped, probability ``p``) or ``1 / (1 - p)``.

    Drawn on the host from ``rng`` (the same draws on every backend); only the
    boolean keep-mask crosses to the device (one byte per element), where it
    becomes ``dtype`` and is scaled.
    """
    keep = rng.random(shape, dtype=np.float32) >= p  # host (shape) bool
    with dev:
        return dev.xp.astype(dev.asarray(keep), dev.dtype(dtype)) * (1.0 / (1.0 - p))


@contextlib.contextmanager
def inference(model: Any) -> Iterator[None]:
    """``no_grad`` and eval mode for a model call, restoring every module's own mode afterwards.

    Enter it around each call, never across a ``yield``: a suspended
    generator must not leave the caller in no_grad or the model in eval.
    """
    modes = [(m, m.training) for _, m in model.named_modules()] if hasattr(model, "named_modules") else []
    try:
        model.eval()
        with no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def parameter_budget(nbytes: int, dtype: Any = "float32", source: str = "the checkpoint") -> Iterator[None]:
    """Within this block, building modules with more parameters in total than ``nbytes`` of
    weights hold in ``dtype`` raises CheckpointCorruptError *before* their memory is allocated.

    Checkpoint loaders build a model from sizes declared in a file and then
    fill it with the file's tensors; the budget is twice the number of
    elements of ``dtype`` (the dtype the model will allocate, whatever the
    file's tensors are) that those tensors' bytes hold, plus 4096 (layers may
    build a few parameters they do not save, such as the unused second bias
    of a Keras LSTM), so a forged config (``hidden_size=10**9``, or float64
    declared over uint8 data) cannot make xrnn allocate more than a small
    multiple of the bytes the file itself contains.
    """
    try:
        itemsize = int(np.dtype(dtype).itemsize) if isinstance(dtype, str) else 8
    except TypeError:
        itemsize = 8  # not a dtype: the loader will say so; count as the widest
    previous = getattr(_local, "budget", None)
    limit = 2 * (int(nbytes) // max(itemsize, 1)) + 4096
    _local.budget = [limit, limit, source]
    try:
        yield
    finally:
        _local.budget = previous


def _reserve(count: int, what: str) -> None:
    """Take ``count`` parameter elements from the active :func:`parameter_budget` (if any)."""
    budget = getattr(_local, "budget", None)
    if budget is None:
        return
    if count > budget[0]:
        raise CheckpointCorruptError(
            f"{budget[2]} declares a model whose {what} alone needs {count:,} parameters, far more than the "
            f"file's weights hold; its configuration does not match its weights (damaged or forged)"
        )
    budget[0] -= count


# ---------------------------------------------------------------------------
# argument checks shared by the constructors
# ---------------------------------------------------------------------------

def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _probability(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= v < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
    return v


# ---------------------------------------------------------------------------
# Module: parameters, gradients, state dicts, devices
# ---------------------------------------------------------------------------

class Module:
    """Base class: a tree of named parameters with gradients on one device.

    Attributes:
        device: the :class:`~xrnn.backend.Device` holding every parameter.
        dtype: the parameters' dtype name (``"float32"``, ``"float64"``, ...).
        training: True in training mode (dropout active), False after ``eval()``.
    """

    _cache: Any  # what backward needs from the last forward (layer-specific), None when nothing is kept

    def __init__(self, device: Any = "cpu", dtype: Any = "float32"):
        dev = resolve_device(device)
        resolve_dtype(dev, dtype)  # validates the name on this device
        object.__setattr__(self, "_params", {})
        object.__setattr__(self, "_grads", {})
        object.__setattr__(self, "_children", {})
        self.device: Device = dev
        self.dtype: str = dtype_name(dtype)
        self.training = True

    # -- registration -------------------------------------------------------
    def _add_param(self, name: str, host_value: np.ndarray) -> None:
        dev = self.device
        self._params[name] = dev.asarray(host_value, dtype=self.dtype)
        self._grads[name] = dev.zeros(tuple(host_value.shape), self.dtype)

    def add_module(self, name: str, module: Module) -> Module:
        if module.device != self.device:
            raise StateError(f"submodule {name!r} is on {module.device.name}, parent on {self.device.name}")
        self._children[name] = module
        return module

    def __getattr__(self, name: str):
        # Called only when normal lookup fails: expose parameters and children
        # as attributes (layer.weight_ih_l0, model.rnn), as PyTorch does.
        d = self.__dict__
        if name in d.get("_params", {}):
            return d["_params"][name]
        if name in d.get("_children", {}):
            return d["_children"][name]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    # -- traversal ------------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        yield prefix, self
        for name, child in self._children.items():
            yield from child.named_modules(f"{prefix}{name}.")

    def parameters(self) -> dict:
        """All parameters, ``{name: array}`` in state-dict order (arrays, not copies)."""
        out = {}
        for prefix, m in self.named_modules():
            for k, v in m._params.items():
                out[prefix + k] = v
        return out

    named_parameters = parameters

    @property
    def grads(self) -> dict:
        """Accumulated gradients, ``{name: array}`` with the same keys as :meth:`parameters`."""
        out = {}
        for prefix, m in self.named_modules():
            for k, v in m._grads.items():
                out[prefix + k] = v
        return out

    def num_parameters(self) -> int:
        return sum(math.prod(_shape(v)) for v in self.parameters().values())

    def _set_param(self, full_name: str, value) -> None:
        """Replace a parameter (by its full dotted name) with an array already on the device."""
        *path, leaf = full_name.split(".")
        m = self
        for p in path:
            m = m._children[p]
        m._params[leaf] = value

    def zero_grad(self) -> None:
        """Set every accumulated gradient to zero (in place)."""
        with self.device:
            for _, m in self.named_modules():
                for k in m._grads:
                    m._grads[k][...] = 0

    # -- modes ----------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        for _, m in self.named_modules():
            m.training = bool(mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    # -- state dicts ----------------------------------------------------------
    def state_dict(self) -> dict:
        """``{name: array}`` with PyTorch's names and layouts, on this module's device."""
        return dict(self.parameters())

    def load_state_dict(self, state: dict, strict: bool = True) -> IncompatibleKeys:
        """Load parameter values from any supported library (NumPy, torch tensors, ...).

        Values are copied onto this module's device and cast to its dtype.
        As ``torch.nn.Module.load_state_dict``: returns ``(missing_keys,
        unexpected_keys)`` (an :class:`IncompatibleKeys`, lists of names);
        ``strict=True`` raises ShapeError naming the missing and unexpected
        keys, ``strict=False`` loads the entries that match and reports the
        rest. A mis-shaped entry is a ShapeError either way, and nothing is
        loaded when any check fails.
        """
        if not hasattr(state, "items"):
            raise ShapeError(f"load_state_dict expects a mapping of name -> array, got {type(state).__name__}")
        params = self.parameters()
        missing = [k for k in params if k not in state]
        unexpected = [k for k in state if k not in params]
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append("missing keys: " + ", ".join(missing))
            if unexpected:
                parts.append("unexpected keys: " + ", ".join(str(k) for k in unexpected))
            raise ShapeError("state dict does not match the model: " + "; ".join(parts))
        staged = {}
        for k, current in params.items():
            if k not in state:
                continue
            v = state[k]
            try:
                v_shape = tuple(int(s) for s in v.shape)
            except AttributeError:
                v = np.asarray(v)
                v_shape = v.shape
            if v_shape != _shape(current):
                raise ShapeError(f"state dict entry {k!r} has shape {v_shape}, the model expects {_shape(current)}")
            if getattr(v, "requires_grad", False) and callable(getattr(v, "detach", None)):
                v = v.detach()  # a torch parameter: the values only, not its autograd history
            staged[k] = to_device(v, self.device, dtype=self.dtype)  # with a dtype: always a private copy
        for k, v in staged.items():  # all validated: now commit
            self._set_param(k, v)
        return IncompatibleKeys(missing, [str(k) for k in unexpected])

    # -- devices ----------------------------------------------------------------
    def to(self, device: Any = None, dtype: Any = None) -> Module:
        """Move (and optionally cast) every parameter and gradient; returns self."""
        dev = self.device if device is None else resolve_device(device)
        new_dtype = self.dtype if dtype is None else dtype_name(dtype)
        resolve_dtype(dev, new_dtype)
        for _, m in self.named_modules():
            for store in (m._params, m._grads):
                for k in store:
                    store[k] = to_device(store[k], dev, dtype=new_dtype)
            m.device = dev
            m.dtype = new_dtype
            m._drop_cache()
        return self

    def _drop_cache(self) -> None:
        pass

    # -- calling --------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        return f"device={self.device.name!r}, dtype={self.dtype!r}"

    # -- shared input checks ----------------------------------------------------
    def _check_float(self, x, what: str):
        self.device.check(x, what)
        xp = self.device.xp
        if not xp.isdtype(x.dtype, "real floating"):
            raise DTypeError(
                f"{what} has dtype {dtype_name(x.dtype)} but the layer computes in {self.dtype}; "
                f"pass floating-point values (integer token ids go to an Embedding or CharLM)"
            )
        if dtype_name(x.dtype) != self.dtype:
            raise DTypeError(
                f"{what} has dtype {dtype_name(x.dtype)} but the layer's parameters are {self.dtype}; "
                f"cast the input (xp.astype(x, xp.{self.dtype})) or the layer (.to(dtype={dtype_name(x.dtype)!r}))"
            )


# ---------------------------------------------------------------------------
# recurrent layers
# ---------------------------------------------------------------------------

class _RNNBase(Module):
    _mode = "RNN"  # "RNN", "LSTM", "GRU"
    _gates = 1

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: Any = "cpu",
        dtype: Any = "float32",
        seed: Any = None,
        forget_bias: float | None = None,
        proj_size: int = 0,
    ):
        super().__init__(device, dtype)
        self.input_size = _positive_int("input_size", input_size)
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        self.num_layers = _positive_int("num_layers", num_layers)
        if nonlinearity not in ("tanh", "relu"):
            raise ConfigError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        if isinstance(proj_size, bool) or not isinstance(proj_size, (int, np.integer)) or proj_size < 0:
            raise ConfigError(f"proj_size must be a non-negative integer (0: no projection), got {proj_size!r}")
        if proj_size and self._mode != "LSTM":
            raise ConfigError(f"proj_size is only supported for LSTM, not {self._mode} (as in torch.nn)")
        if proj_size >= self.hidden_size:
            raise ConfigError(
                f"proj_size={proj_size} must be smaller than hidden_size={self.hidden_size} "
                "(the projection maps the H cell outputs to fewer units)"
            )
        self.proj_size = int(proj_size)
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = _probability("dropout", dropout)
        if self.dropout > 0 and self.num_layers == 1:
            warnings.warn(
                "dropout acts between recurrent layers only; with num_layers=1 it has no effect",
                stacklevel=3,
            )
        self.bidirectional = bool(bidirectional)
        if forget_bias is not None and not self.bias:
            raise ConfigError(
                f"forget_bias={forget_bias!r} sets the forget-gate bias, but bias=False gives the layer no "
                "biases; drop forget_bias or use bias=True"
            )
        self.forget_bias = None if forget_bias is None else float(forget_bias)
        self.rng = host_rng(seed)
        self._cache = None
        # the largest buffers (gates, cell states) of the last no_grad forward, kept for the next call
        # where the scans allow it (see _take_buffer); one per (kind, layer, direction)
        self._workspace: dict = {}
        self._lent: dict = {}  # key -> the whole kept buffer whose leading rows a call is using
        self._init_parameters()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def output_size(self) -> int:
        """Units of ``h`` per direction: ``proj_size`` when projected, else ``hidden_size``."""
        return self.proj_size or self.hidden_size

    def _param_names(self, layer: int, direction: int) -> tuple[str, str, str, str]:
        sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        return (f"weight_ih{sfx}", f"weight_hh{sfx}", f"bias_ih{sfx}", f"bias_hh{sfx}")

    def _proj_name(self, layer: int, direction: int) -> str:
        return f"weight_hr_l{layer}" + ("_reverse" if direction == 1 else "")

    def _init_parameters(self) -> None:
        """PyTorch's init: every parameter ~ U(-1/sqrt(H), 1/sqrt(H)) (the projection
        ``weight_hr`` too), drawn on the host in state-dict order so one seed gives
        the same weights on every backend."""
        H, G, D, P = self.hidden_size, self._gates, self.num_directions, self.proj_size
        W = self.output_size
        per_bias = 2 if self.bias else 0  # closed form: num_layers may come from an untrusted file
        _reserve(D * (G * H * ((self.input_size + W + per_bias) + (self.num_layers - 1) * (W * D + W + per_bias))
                      + self.num_layers * P * H), type(self).__name__)
        k = 1.0 / math.sqrt(H)
        for layer in range(self.num_layers):
            in_size = self.input_size if layer == 0 else W * D
            for d in range(D):
                w_ih, w_hh, b_ih, b_hh = self._param_names(layer, d)
                shapes: list[tuple[str, tuple[int, ...]]] = [(w_ih, (G * H, in_size)), (w_hh, (G * H, W))]
                if self.bias:
                    shapes += [(b_ih, (G * H,)), (b_hh, (G * H,))]
                if P:
                    shapes.append((self._proj_name(layer, d), (P, H)))  # torch's order: after the biases
                for name, shape in shapes:
                    value = self.rng.uniform(-k, k, size=shape)
                    if self.forget_bias is not None and name in (b_ih, b_hh):
                        # total forget-gate bias = forget_bias (char-rnn, Keras' unit_forget_bias)
                        value[H:2 * H] = self.forget_bias if name == b_ih else 0.0
                    self._add_param(name, value)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self._mode == "RNN" and self.nonlinearity != "tanh":
            s += f", nonlinearity={self.nonlinearity!r}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        return s + ", " + super().extra_repr()

    def _drop_cache(self) -> None:
        self._cache = None
        self.release_workspace()

    def release_workspace(self) -> None:
        """Free the buffers kept between calls (see :meth:`_take_buffer`); the next call allocates anew."""
        self._workspace = {}
        self._lent = {}

    def _take_buffer(self, sc, key: tuple, shape: tuple, dt):
        """A kept buffer of ``shape`` and ``dt`` for ``key``, or None.

        On NumPy, every forward used to get its gate buffer A (T*B, G*H) and cell states fresh from
        the operating system: arrays that large are mapped anew on each allocation and every page
        faults in on first write, which cost a fifth of a medium LSTM forward (benchmarks/README.md).
        So a forward under ``no_grad`` (inference, validation, ``predict``) keeps its gate and
        cell-state buffers for the next call, with the scans that say they may (``reuse_buffers``:
        the NumPy ones, whose returned states are copies, never views into these buffers); a training
        step's backward hands them back instead (the optimizer's temporaries come next and would
        stack on them, raising the step's peak), though its forward uses kept ones. Other backends
        have their own pools (CuPy) or keep the plain path. A kept buffer serves any call with as
        many rows or fewer (its leading rows: a smaller last batch, a ``lengths=`` batch), so the
        largest recent one is what stays, one per (kind, layer, direction);
        :meth:`release_workspace` frees them.
        """
        if not getattr(sc, "reuse_buffers", False) or self.proj_size:
            return None
        buf = self._workspace.pop(key, None)
        if buf is None:
            return None
        if buf.dtype != dt or _shape(buf)[1:] != shape[1:] or _shape(buf)[0] < shape[0]:
            self._workspace[key] = buf  # does not fit this call: kept for one it fits
            return None
        self._lent[key] = buf
        return buf[0:shape[0], ...]  # (rows, ...) leading rows, contiguous

    def _keep_buffer(self, sc, key: tuple, buf) -> None:
        """Keep ``buf`` (or the whole buffer it was lent from) for a later :meth:`_take_buffer`;
        nothing may still use it. The larger of it and a buffer kept meanwhile stays."""
        if buf is None or not getattr(sc, "reuse_buffers", False) or self.proj_size:
            return
        whole = self._lent.pop(key, None)
        if whole is not None:
            buf = whole
        old = self._workspace.get(key)
        if old is None or old.dtype != buf.dtype or _shape(old)[1:] != _shape(buf)[1:] \
                or _shape(old)[0] <= _shape(buf)[0]:
            self._workspace[key] = buf

    def _memory_note(self, T: int, B: int) -> str:
        """The sizes of one forward, for out-of-memory messages: T, B, H, layers, dtype and an estimate."""
        L, D, H, G, W = self.num_layers, self.num_directions, self.hidden_size, self._gates, self.output_size
        per_layer = D * (G * H + W + (H if self._mode != "RNN" else 0)) + (D * W if self.dropout else 0)
        itemsize = np.dtype(self.dtype).itemsize
        kept = T * B * L * per_layer * itemsize  # gate pre-activations, outputs, cell/candidate states, masks
        return (f"T={T} steps, B={B} sequences, hidden size {H}, {L} layer(s)"
                + (", bidirectional" if D == 2 else "") + f", {self.dtype}: the forward keeps about "
                f"{format_bytes(kept)} for backward")

    # -- input checks -----------------------------------------------------------
    def _check_x(self, x):
        self._check_float(x, "x")
        if x.ndim not in (2, 3):
            layout = "(B, T, I)" if self.batch_first else "(T, B, I)"
            raise ShapeError(
                f"x must be 3-D {layout} (or 2-D (T, I) for one unbatched sequence), got shape {_shape(x)}"
            )
        if _shape(x)[-1] != self.input_size:
            raise ShapeError(
                f"x has feature size {_shape(x)[-1]} (last axis of shape {_shape(x)}) but the layer "
                f"was built with input_size={self.input_size}"
            )
        if 0 in _shape(x):
            raise ShapeError(f"x has an empty axis: shape {_shape(x)}; "
                             "sequences need at least one step and one batch row")

    def _check_state_part(self, s, what: str, B: int | None, batched: bool, T: int):
        self._check_float(s, what)
        # h has proj_size units when projected; c always hidden_size
        LD, H = self.num_layers * self.num_directions, (self.hidden_size if what.endswith("c") else self.output_size)
        size_name = "proj_size" if self.proj_size and not what.endswith("c") else "hidden_size"
        expected = (LD, B, H) if batched else (LD, H)
        if _shape(s) != expected:
            hint = ""
            if batched and s.ndim == 3 and _shape(s)[0] == LD and _shape(s)[2] == H and _shape(s)[1] != B:
                hint = (
                    f"; its batch size {_shape(s)[1]} differs from x's batch size {B}"
                    + (
                        f" (x is read as {'(B, T, I)' if self.batch_first else '(T, B, I)'} because "
                        f"batch_first={self.batch_first}; is that the layout you meant?)"
                        if _shape(s)[1] == T
                        else ""
                    )
                )
            raise ShapeError(
                f"{what} must have shape (num_layers*num_directions, B, {size_name}) = {expected}, "
                f"got {_shape(s)}{hint}"
            )

    def _split_state(self, state, B, batched, T, plan):
        """Validate ``state`` and return per-(layer, direction) lists of (h0, c0), rows in ``plan``'s order."""
        LD = self.num_layers * self.num_directions
        if state is None:
            return None, None
        if self._mode == "LSTM":
            if not isinstance(state, (tuple, list)) or len(state) != 2:
                raise ShapeError("LSTM state must be a tuple (h, c) of two arrays, or None for zeros")
            h, c = state
            self._check_state_part(h, "state h", B, batched, T)
            self._check_state_part(c, "state c", B, batched, T)
        else:
            if isinstance(state, (tuple, list)):
                raise ShapeError(f"{self._mode} state must be a single array h, not a {type(state).__name__}")
            h, c = state, None
            self._check_state_part(h, "state h", B, batched, T)
        if not batched:
            h = h[:, None, :]
            c = None if c is None else c[:, None, :]
        h = plan.sort_rows(self.device, h, axis=1)  # (L*D, B, W) in length order
        c = None if c is None else plan.sort_rows(self.device, c, axis=1)
        hs = [h[i, ...] for i in range(LD)]
        cs = None if c is None else [c[i, ...] for i in range(LD)]
        return hs, cs

    # -- forward ----------------------------------------------------------------
    def forward(self, x, state=None, lengths=None):
        """Run the whole sequence.

        Args:
            x: (T, B, I), or (B, T, I) with ``batch_first``, or (T, I) unbatched;
                floating point, on the layer's device, in its dtype.
            state: None (zeros), ``h`` (L*D, B, H) for RNN/GRU, ``(h, c)`` for
                LSTM (with ``proj_size`` P: h (L*D, B, P), c (L*D, B, H)).
            lengths: None (every sequence has T steps) or the valid steps of
                each sequence of a right-padded batch, integers in [1, T], shape
                (B,), sorted or not: a list, a host NumPy array or a device
                array (read to the host: one synchronisation per call; the
                segment plan lives there). PyTorch's ``pack_padded_sequence``
                semantics without the packing: outputs past each length are
                zero, the final state of each sequence is taken at its own last
                step, the reverse direction starts at each sequence's own end,
                and padded steps are never computed (:mod:`xrnn.segments`).
        Returns:
            ``(out, state)``: out (T, B, D*H) (D*P with ``proj_size``; or the
            batch_first/unbatched layout of x), the top layer's outputs with
            both directions concatenated; state the final ``h`` (or ``(h, c)``),
            (L*D, B, H).

        The result is also kept for :meth:`backward` (not under ``no_grad``);
        don't modify ``out`` in place before calling backward.
        """
        return self._forward(x, state, lengths, 1)

    def _forward(self, x, state, lengths, min_length: int):
        """:meth:`forward` with lengths allowed from ``min_length`` (0: Keras masks may empty a row)."""
        dev = self.device
        xp = dev.xp
        self._check_x(x)
        batched = x.ndim == 3
        if lengths is not None and not batched:
            raise ShapeError(f"lengths need a batched x {'(B, T, I)' if self.batch_first else '(T, B, I)'}; "
                             f"x has shape {_shape(x)} (one unbatched sequence needs no lengths)")
        with dev:
            if batched and self.batch_first:
                B, T = _shape(x)[0], _shape(x)[1]
            else:
                T, B = _shape(x)[0], (_shape(x)[1] if batched else 1)
            host = check_lengths(lengths, B, T, min_length)
            plan = SegmentPlan.full(B, T) if host is None else SegmentPlan(host, T)
            padded = not plan.whole
            if padded:
                X = plan.pack(dev, x, self.batch_first)  # (N, I) valid positions only
            else:
                if not batched:
                    x = x[:, None, :]  # (T, 1, I)
                elif self.batch_first:
                    x = xp.permute_dims(x, (1, 0, 2))  # (T, B, I)
                X = xp.reshape(x, (T * B, self.input_size))  # (T*B, I)
            hs, cs = self._split_state(state, B, batched, T, plan)
            with oom_guard(dev, f"the forward pass of {type(self).__name__}", lambda: self._memory_note(T, B)):
                out, hn, cn, cache = self._forward_tm(X, plan, hs, cs)
            self._cache = cache if _grad_enabled() else None
            if self._cache is None:  # nothing will read the gates and cell states again
                self._recycle(cache)
            if cache is not None:
                cache["batched"] = batched
            W = _shape(out)[-1]
            hN = plan.unsort_rows(dev, xp.stack(hn, axis=0), axis=1)  # (L*D, B, W)
            cN = None if cn is None else plan.unsort_rows(dev, xp.stack(cn, axis=0), axis=1)  # (L*D, B, H)
            if padded:
                out = plan.unpack(dev, out, self.batch_first)  # zero past each length
            else:
                out = xp.reshape(out, (T, B, W))  # (T, B, D*W)
                if not batched:
                    out = out[:, 0, :]  # (T, D*W)
                    hN = hN[:, 0, :]
                    cN = None if cN is None else cN[:, 0, :]
                elif self.batch_first:
                    out = xp.permute_dims(out, (1, 0, 2))  # (B, T, D*W)
            return out, ((hN, cN) if self._mode == "LSTM" else hN)

    def _recycle(self, cache) -> None:
        """Keep a forward's gate and cell-state buffers for the next call (they are dead)."""
        sc = scans_for(self.device)
        for layer, lc in enumerate(cache["layers"]):
            for d, e_ in enumerate(lc["dirs"]):
                self._keep_buffer(sc, ("A", layer, d), e_.get("A"))
                self._keep_buffer(sc, ("C", layer, d), e_.get("C", e_.get("NH")))
                e_.clear()

    def _forward_tm(self, X, plan, hs, cs):
        """Forward on packed rows X (N, I) (time-major, rows in length order; a full batch is
        one segment); returns (out (N, D*W), hn, cn, cache) with states in length order."""
        dev = self.device
        xp = dev.xp
        sc = scans_for(dev)
        segs, B = plan.segments, plan.B
        L, D, H, W = self.num_layers, self.num_directions, self.hidden_size, self.output_size
        p = self._params
        dt = dev.dtype(self.dtype)
        cd = dev._create_device()
        layers = []
        hn: list = []
        cn: list | None = [] if self._mode == "LSTM" else None
        layer_in = X
        for layer in range(L):
            N = plan.N
            Y = xp.empty((N, D * W), dtype=dt, device=cd)  # (N, D*W) packed outputs
            Ys = _segment_views(xp, Y, segs)  # (len, n, D*W) each, written by the scans
            dirs = []
            for d in range(D):
                w_ih, w_hh, b_ih, b_hh = self._param_names(layer, d)
                idx = layer * D + d
                col = slice(d * W, (d + 1) * W)
                reverse = d == 1
                buf = self._take_buffer(sc, ("A", layer, d), (N, self._gates * H), dt)
                b_in = (p[b_ih] if self._mode == "GRU" else p[b_ih] + p[b_hh]) if self.bias else None  # (G*H,)
                project = getattr(sc, "project", None)
                if project is not None:  # NumPy: into a kept buffer, the bias inside the product
                    A = project(layer_in, p[w_ih], buf, b_in)  # (N, G*H)
                else:
                    A = layer_in @ p[w_ih].T  # (N, G*H)
                    if b_in is not None:
                        A += b_in  # in place: A is the largest array of the step; a copy would double it
                As = _segment_views(xp, A, segs)  # (len, n, G*H) each
                h0 = hs[idx] if hs is not None else xp.zeros((B, W), dtype=dt, device=cd)  # (B, W)
                c0 = None
                if self._mode == "LSTM":
                    c0 = cs[idx] if cs is not None else xp.zeros((B, H), dtype=dt, device=cd)  # (B, H)
                entry = {"A": A, "As": As, "h0": [None] * len(segs), "c0": [None] * len(segs)}
                if self._mode != "RNN":  # LSTM: cell states; GRU: W_hn h + b_hn
                    buf = self._take_buffer(sc, ("C", layer, d), (N, H), dt)
                    entry["C" if self._mode == "LSTM" else "NH"] = (
                        xp.empty((N, H), dtype=dt, device=cd) if buf is None else buf)  # (N, H)
                    entry["Cs" if self._mode == "LSTM" else "NHs"] = _segment_views(
                        xp, entry["C" if self._mode == "LSTM" else "NH"], segs)

                # the recurrent weight as the forward products want it, laid out once for all segments (one
                # segment, a full batch, lets its scan make and free that copy itself: it holds no memory after)
                prep = getattr(sc, "forward_weight", None)
                several = not self.proj_size and len(segs) > 1
                w_fwd = prep(p[w_hh], plan.T) if prep is not None and several else p[w_hh]  # (G*H, W)

                # _run_segments calls run within this iteration; the defaults bind this layer's and direction's values
                def run(k, h, c, *, entry=entry, As=As, Ys=Ys, w_hh=w_hh, w_fwd=w_fwd, b_hh=b_hh, layer=layer, d=d,
                        col=col, reverse=reverse):
                    """Scan segment k from state (h, c) (its n rows); returns the state after it."""
                    s, e, n, _ = segs[k]
                    entry["h0"][k], entry["c0"][k] = h, c
                    if self._mode == "LSTM":
                        C = entry["Cs"][k]  # (len, n, H)
                        if self.proj_size:
                            scan = getattr(sc, "lstmp_scan", F.lstmp_scan)  # portable unless a fast one exists
                            return scan(xp, As[k], p[w_hh], p[self._proj_name(layer, d)], h, c, Ys[k], col, C,
                                        reverse)
                        return sc.lstm_scan(xp, As[k], w_fwd, h, c, Ys[k], col, C, reverse)
                    if self._mode == "GRU":
                        NH = entry["NHs"][k]  # (len, n, H)
                        return sc.gru_scan(xp, As[k], w_fwd, p[b_hh] if self.bias else None, h, Ys[k], col, NH,
                                           reverse), None
                    return sc.rnn_scan(xp, As[k], w_fwd, h, Ys[k], col, reverse, self.nonlinearity), None

                entry["h0_all"], entry["c0_all"] = h0, c0  # (B, W) / (B, H): what the ragged backward starts from
                if several and self._scan_ragged(sc, entry, A, Y, w_fwd, b_hh, h0, c0, col, reverse, plan):
                    hT, cT = _ragged_states(xp, segs, B, reverse, entry, Ys, col, h0, c0)
                else:
                    hT, cT = _run_segments(xp, segs, B, reverse, h0, c0, run)
                del run, w_fwd  # the laid-out weight copy is not needed after this direction's scans
                hn.append(hT)
                if cn is not None:
                    cn.append(cT)
                dirs.append(entry)
            mask = None
            out = Y
            if self.dropout > 0 and self.training and layer < L - 1:
                # drawn for the whole padded batch, (T, B, D*W) as always (data-parallel
                # replicas draw their rows of it), then its valid rows are kept
                mask = dropout_mask(dev, self.rng, (plan.T, B, D * W), self.dropout, self.dtype)  # (T, B, D*W)
                mask = xp.reshape(mask, (N, D * W)) if plan.whole else plan.pack(dev, mask, False)  # (N, D*W)
                out = Y * mask  # (N, D*W)
            layers.append({"x": layer_in, "Y": Ys, "Y_packed": Y, "mask": mask, "dirs": dirs})
            layer_in = out
        return layer_in, hn, cn, {"layers": layers, "plan": plan}

    def _scan_ragged(self, sc, entry, A, Y, w_fwd, b_hh, h0, c0, col, reverse, plan) -> bool:
        """Every segment of one layer and direction in one call, where the scans have such a call
        (the C kernels, :mod:`xrnn.kernels.numpy_fast`) and take these arrays: A (N, G*H) packed
        gates, Y (N, D*W) packed outputs (columns ``col``), h0/c0 (B, .) in length order. False:
        the caller runs the segments one by one."""
        if self.proj_size:
            return False
        steps = plan.steps()
        if self._mode == "LSTM":
            fn = getattr(sc, "lstm_scan_ragged", None)
            return fn is not None and bool(fn(A, w_fwd, h0, c0, Y, col, entry["C"], reverse, steps))
        if self._mode == "GRU":
            fn = getattr(sc, "gru_scan_ragged", None)
            b = self._params[b_hh] if self.bias else None
            return fn is not None and bool(fn(A, w_fwd, b, h0, Y, col, entry["NH"], reverse, steps))
        fn = getattr(sc, "rnn_scan_ragged", None)
        return fn is not None and bool(fn(A, w_fwd, h0, Y, col, reverse, self.nonlinearity, steps))

    def _scan_backward_ragged(self, sc, e_, Y, w_bwd, dY, col, dh_last, dc_last, reverse, plan):
        """The backward of :meth:`_scan_ragged` (``e_`` its entry, Y (N, D*W) the layer's packed
        outputs): ``(dh0, dc0)`` (B rows; dc0 None but for the LSTM), or None: the caller runs the
        segments one by one."""
        if self.proj_size:
            return None
        steps = plan.steps()
        if self._mode == "LSTM":
            fn = getattr(sc, "lstm_scan_backward_ragged", None)
            return None if fn is None else fn(e_["A"], e_["C"], e_["c0_all"], w_bwd, dY, col, dh_last, dc_last,
                                              reverse, steps)
        if self._mode == "GRU":
            fn = getattr(sc, "gru_scan_backward_ragged", None)
            dh = None if fn is None else fn(e_["A"], e_["NH"], Y, col, e_["h0_all"], w_bwd, dY, dh_last,
                                            reverse, steps)
        else:
            fn = getattr(sc, "rnn_scan_backward_ragged", None)
            dh = None if fn is None else fn(e_["A"], Y, col, w_bwd, dY, dh_last, reverse, self.nonlinearity,
                                            steps, plan.B)
        return None if dh is None else (dh, None)

    # -- backward ---------------------------------------------------------------
    def backward(self, dout, dstate=None, *, input_grad: bool = True):
        """Backpropagate through the whole last forward (BPTT).

        Args:
            dout: gradient of ``out``, same shape as ``out`` (with ``lengths``,
                its values past each length are ignored: those outputs are
                constant zeros).
            dstate: gradient of the final state (same structure as the state
                forward returned: ``h`` or ``(h, c)``; parts may be None), or None.
            input_grad: False skips computing the input gradient (returns None for it).
        Returns:
            ``(dx, dstate0)``: gradient of x (same layout as x; zero past each
            length) and of the initial state (``dh0`` or ``(dh0, dc0)``,
            shaped like the state).
        Parameter gradients are added to ``self.grads``. The forward cache is
        consumed: call forward again before the next backward.
        """
        cache = self._cache
        if cache is None:
            raise StateError(
                f"{type(self).__name__}.backward() needs a preceding forward() in gradient mode "
                "(each forward allows one backward; forwards under xrnn.no_grad() keep nothing)"
            )
        dev = self.device
        xp = dev.xp
        plan = cache["plan"]
        T, B = plan.T, plan.B
        D, W = self.num_directions, self.output_size
        batched = cache["batched"]
        expected: tuple[int, ...]
        if batched:
            expected = (B, T, D * W) if self.batch_first else (T, B, D * W)
        else:
            expected = (T, D * W)
        self._check_float(dout, "dout")
        if _shape(dout) != expected:
            raise ShapeError(f"dout must have the shape of the forward output {expected}, got {_shape(dout)}")
        dhT, dcT = self._split_dstate(dstate, B, batched, plan)
        self._cache = None
        with dev:
            padded = not plan.whole
            if padded:
                dY = plan.pack(dev, dout, self.batch_first)  # (N, D*W)
            else:
                if not batched:
                    dout = dout[:, None, :]
                elif self.batch_first:
                    dout = xp.permute_dims(dout, (1, 0, 2))  # (T, B, D*W)
                dY = xp.reshape(dout, (T * B, D * W))  # (T*B, D*W)
            with oom_guard(dev, f"the backward pass of {type(self).__name__}", lambda: self._memory_note(T, B)):
                dx, dh0, dc0 = self._backward_tm(cache, dY, dhT, dcT, input_grad)
            if dx is not None:
                if padded:
                    dx = plan.unpack(dev, dx, self.batch_first)  # zero past each length
                else:
                    dx = xp.reshape(dx, (T, B, self.input_size))
                    if not batched:
                        dx = dx[:, 0, :]
                    elif self.batch_first:
                        dx = xp.permute_dims(dx, (1, 0, 2))
            dH0 = plan.unsort_rows(dev, xp.stack(dh0, axis=0), axis=1)
            dC0 = None if dc0 is None else plan.unsort_rows(dev, xp.stack(dc0, axis=0), axis=1)
            if not batched:
                dH0 = dH0[:, 0, :]
                dC0 = None if dC0 is None else dC0[:, 0, :]
            return dx, ((dH0, dC0) if self._mode == "LSTM" else dH0)

    def _split_dstate(self, dstate, B, batched, plan):
        LD = self.num_layers * self.num_directions
        if dstate is None:
            return None, None
        if self._mode == "LSTM":
            if not isinstance(dstate, (tuple, list)) or len(dstate) != 2:
                raise ShapeError("LSTM dstate must be a tuple (dh, dc) (either may be None), or None")
            dh, dc = dstate
        else:
            dh, dc = dstate, None
        out: list[list[Array] | None] = []
        for v, what in ((dh, "dstate h"), (dc, "dstate c")):
            if v is None:
                out.append(None)
                continue
            self._check_state_part(v, what, B, batched, -1)
            if not batched:
                v = v[:, None, :]
            with self.device:
                v = plan.sort_rows(self.device, v, axis=1)
            out.append([v[i, ...] for i in range(LD)])
        return out[0], out[1]

    def _backward_tm(self, cache, dY, dhT, dcT, input_grad):
        """Backward of :meth:`_forward_tm`: dY (N, D*W) packed; returns (dX (N, I) or None, dh0, dc0)."""
        dev = self.device
        xp = dev.xp
        sc = scans_for(dev)
        plan = cache["plan"]
        segs, B = plan.segments, plan.B
        L, D, H, W, P = self.num_layers, self.num_directions, self.hidden_size, self.output_size, self.proj_size
        p, g = self._params, self._grads
        dt = dev.dtype(self.dtype)
        cd = dev._create_device()
        dh0 = [None] * (L * D)
        dc0 = [None] * (L * D) if self._mode == "LSTM" else None
        dX = None
        for layer in range(L - 1, -1, -1):
            lc = cache["layers"][layer]
            X = lc["x"]  # (N, I)
            Ys = lc["Y"]
            dYs = _segment_views(xp, dY, segs)  # (len, n, D*W) each
            need_dx = layer > 0 or input_grad
            dX = None
            for d in range(D):
                w_ih, w_hh, b_ih, b_hh = self._param_names(layer, d)
                idx = layer * D + d
                col = slice(d * W, (d + 1) * W)
                reverse = d == 1
                e_ = lc["dirs"][d]
                As = e_["As"]
                DH = xp.empty((plan.N, P), dtype=dt, device=cd) if P else None  # (N, P) gradients of h
                DHs = _segment_views(xp, DH, segs) if P else None

                # the recurrent weight as the backward products want it, laid out once for all segments
                prep = getattr(sc, "backward_weight", None)
                several = not P and len(segs) > 1
                G = self._gates * H
                w_bwd = prep(p[w_hh], plan.N * G, (plan.T * B - plan.N) * G) if prep is not None and several \
                    else p[w_hh]

                # _run_segments_backward calls run within this iteration; the defaults bind this iteration's values
                def run(k, dh, dc, *, e_=e_, As=As, Ys=Ys, dYs=dYs, DHs=DHs, w_hh=w_hh, w_bwd=w_bwd, layer=layer, d=d,
                        col=col, reverse=reverse):
                    """BPTT through segment k given the gradient of the state after it; returns that of
                    the state it started from."""
                    s, e, n, _ = segs[k]
                    h0k, c0k = e_["h0"][k], e_["c0"][k]
                    if self._mode == "LSTM":
                        if P:
                            scan = getattr(sc, "lstmp_scan_backward", F.lstmp_scan_backward)
                            return scan(xp, As[k], e_["Cs"][k], c0k, p[w_hh], p[self._proj_name(layer, d)], dYs[k],
                                        col, dh, dc, reverse, DHs[k])
                        return sc.lstm_scan_backward(xp, As[k], e_["Cs"][k], c0k, w_bwd, dYs[k], col, dh, dc,
                                                     reverse)
                    if self._mode == "GRU":
                        return sc.gru_scan_backward(xp, As[k], e_["NHs"][k], Ys[k], col, h0k, w_bwd, dYs[k], dh,
                                                    reverse), None
                    return sc.rnn_scan_backward(xp, As[k], Ys[k], col, w_bwd, dYs[k], dh, reverse,
                                                self.nonlinearity), None

                dh_last = None if dhT is None else dhT[idx]
                dc_last = None if dcT is None else dcT[idx]
                got = self._scan_backward_ragged(sc, e_, lc["Y_packed"], w_bwd, dY, col, dh_last, dc_last, reverse,
                                                 plan) if several else None
                if got is None:
                    got = _run_segments_backward(xp, segs, B, reverse, dh_last, dc_last, W, H, dt, cd, run,
                                                 self._mode == "LSTM")
                dh0[idx], dc_first = got
                del run, w_bwd  # the laid-out weight is not needed after this direction's scans
                if dc0 is not None:
                    dc0[idx] = dc_first
                if not P:  # the cell states are spent: free them before the weight products (keeping them
                    e_["C"] = e_["Cs"] = None  # would raise the step's peak by their size; the gates are kept)
                Z = e_["A"]  # (N, G*H) gate gradients, written through the segment views
                g[w_ih] += Z.T @ X  # (G*H, I)
                if self._mode == "GRU":
                    gw = g[w_hh]  # (3H, W): r and z rows from Z, n rows from NH
                    NH = e_["NH"]  # (N, H) grad of W_hn h + b_hn
                    _add_times_previous_segments(xp, gw[0:2 * H, :], Z[:, 0:2 * H], Ys, col, e_["h0"], reverse, segs)
                    _add_times_previous_segments(xp, gw[2 * H:3 * H, :], NH, Ys, col, e_["h0"], reverse, segs)
                    if self.bias:
                        db = xp.sum(Z, axis=0)  # (3H,)
                        g[b_ih] += db
                        gb = g[b_hh]  # (3H,): r and z like the input side, n from NH
                        gb[0:2 * H] += db[0:2 * H]
                        gb[2 * H:3 * H] += xp.sum(NH, axis=0)
                else:
                    _add_times_previous_segments(xp, g[w_hh], Z, Ys, col, e_["h0"], reverse, segs)  # (G*H, W)
                    if self.bias:
                        db = xp.sum(Z, axis=0)  # (G*H,)
                        g[b_ih] += db
                        g[b_hh] += db
                    if P:  # projection: dW_hr += dh_t^T (o_t * tanh(c_t)), the latter now held in C
                        assert DH is not None  # made above whenever P
                        g[self._proj_name(layer, d)] += DH.T @ e_["C"]  # (P, H)
                if need_dx:
                    dXd = Z @ p[w_ih]  # (N, I)
                    if dX is None:
                        dX = dXd
                    else:
                        dX += dXd  # (N, I) both directions
                # A now holds gradients; nothing is kept for the next call: the optimizer's step comes next,
                # and its temporaries would stack on kept buffers and raise the training step's peak
                e_.clear()
                self._lent.pop(("A", layer, d), None)
                self._lent.pop(("C", layer, d), None)
                del Z
            if layer > 0:
                mask = cache["layers"][layer - 1]["mask"]
                if mask is not None:
                    dX *= mask  # dX is this backward's own array
                dY = dX
        return dX, dh0, dc0


def _segment_views(xp, packed, segs):
    """Views (len, n, F) of each segment's rows of ``packed`` (N, F).

    The scans write through them into ``packed`` (basic slices and reshapes of
    contiguous rows are views in NumPy, CuPy, PyTorch and array-api-strict,
    as the gradient views elsewhere in this module assume), so the weight
    products afterwards are one GEMM over all packed rows.
    """
    F_ = _shape(packed)[-1]
    return [xp.reshape(packed[o:o + (e - s) * n, :], (e - s, n, F_)) for s, e, n, o in segs]


def _add_times_previous_segments(xp, G, Z, Ys, col, h0s, reverse, segs):
    """``G += Z.T @ Hp`` over every segment, Hp (N, W) the state entering each packed row.

    One segment (a full batch) goes through :func:`_add_times_previous` without
    building Hp; several build Hp once (a copy of N*W values) so the product
    stays one large GEMM instead of one thin, memory-bound GEMM per segment.
    Z: (N, K); Ys: segment outputs (len, n, D*W); h0s: each segment's starting state (n, W).
    """
    if not segs:  # every sequence is empty (masks may empty a whole batch): no step, nothing to add
        return
    if len(segs) == 1:
        s, e, n, _ = segs[0]
        _add_times_previous(xp, G, Z, Ys[0], col, h0s[0], reverse, e - s, n)
        return
    parts = []
    for (s, e, n, _), Y, h0 in zip(segs, Ys, h0s):
        W = _shape(h0)[-1]
        if e - s == 1:
            parts.append(h0)
            continue
        if reverse:  # the state entering step t is the output of step t+1; the last step starts from h0
            parts += [xp.reshape(Y[1:e - s, :, col], ((e - s - 1) * n, W)), h0]
        else:
            parts += [h0, xp.reshape(Y[0:e - s - 1, :, col], ((e - s - 1) * n, W))]
    G += Z.T @ xp.concat(parts, axis=0)  # (K, W)


def _ragged_states(xp, segs, B, reverse, entry, Ys, col, h0, c0):
    """After a scan that ran every segment in one call (:meth:`_RNNBase._scan_ragged`): fills
    ``entry["h0"]``/``["c0"]`` with the state entering each segment (as :func:`_run_segments` would
    have passed it) and returns the final states (B, W) / (B, H) or None, rows in length order."""
    K = len(segs)
    has_c = c0 is not None
    Cs = entry["Cs"] if has_c else []  # (len, n, H) cell-state views of each segment (LSTM)

    def cat(parts):
        parts = [q for q in parts if _shape(q)[0] > 0]
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)

    def h_at(k, step, a, b):  # rows [a, b) of segment k's output at its step `step` (0 or -1)
        return Ys[k][step, a:b, col]

    n0 = segs[0][2]
    if not reverse:
        for k, (_, _, n, _) in enumerate(segs):
            entry["h0"][k] = h0[0:n, :] if k == 0 else h_at(k - 1, -1, 0, n)
            if has_c:
                entry["c0"][k] = c0[0:n, :] if k == 0 else Cs[k - 1][-1, 0:n, :]
        # a row's final state is its output at its segment's last step; rows of length 0 keep h0
        ends = [(k, segs[k + 1][2] if k + 1 < K else 0, segs[k][2]) for k in range(K - 1, -1, -1)]
        hT = cat([h_at(k, -1, a, b) for k, a, b in ends] + [h0[n0:B, :]])
        cT = cat([Cs[k][-1, a:b, :] for k, a, b in ends] + [c0[n0:B, :]]) if has_c else None
        return hT, cT
    for k, (_, _, n, _) in enumerate(segs):
        n_next = segs[k + 1][2] if k + 1 < K else 0  # rows [0, n_next) carry on from segment k + 1
        entry["h0"][k] = cat([h_at(k + 1, 0, 0, n_next), h0[n_next:n, :]]) if n_next else h0[0:n, :]
        if has_c:
            entry["c0"][k] = cat([Cs[k + 1][0, 0:n_next, :], c0[n_next:n, :]]) if n_next else c0[0:n, :]
    hT = cat([h_at(0, 0, 0, n0), h0[n0:B, :]])
    cT = cat([Cs[0][0, 0:n0, :], c0[n0:B, :]]) if has_c else None
    return hT, cT


def _run_segments(xp, segs, B, reverse, h0, c0, run):
    """Carry a recurrence through the segments of a plan (:mod:`xrnn.segments`).

    ``run(k, h, c)`` scans segment k from its rows' state and returns the
    state after it. Forwards, the batch shrinks: a row leaves, with its
    final state, at the end of its last segment. In reverse, segments run
    last to first and the batch grows: a row joins, from its own initial
    state, at its last valid step. h0 (B, W) / c0 (B, H) or None; rows in
    length order. Returns the final states (B, W) / (B, H) (a row of length 0
    keeps its initial state).
    """
    def cat(parts):
        parts = [q for q in parts if q is not None and _shape(q)[0] > 0]
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)

    if not segs:
        return h0, c0
    has_c = c0 is not None
    if not reverse:
        h, c = h0, c0
        done_h, done_c = [], []  # rows that ended, latest-ending first
        n_prev = B
        for k, (_, _, n, _) in enumerate(segs):
            if n < n_prev:  # rows [n, n_prev) ended before this segment
                done_h.append(h[n:n_prev, :])
                h = h[0:n, :]
                if has_c:
                    done_c.append(c[n:n_prev, :])
                    c = c[0:n, :]
            h, c = run(k, h, c)
            n_prev = n
        hT = cat([h] + done_h[::-1])
        return hT, (cat([c] + done_c[::-1]) if has_c else None)
    h = c = None
    for k in range(len(segs) - 1, -1, -1):
        n = segs[k][2]
        n_next = segs[k + 1][2] if k + 1 < len(segs) else 0
        if n > n_next:  # rows [n_next, n) start here, at their own last step
            h = cat([h, h0[n_next:n, :]])
            if has_c:
                c = cat([c, c0[n_next:n, :]])
        h, c = run(k, h, c)
    n0 = segs[0][2]
    if n0 < B:  # rows of length 0 never ran
        h = cat([h, h0[n0:B, :]])
        if has_c:
            c = cat([c, c0[n0:B, :]])
    return h, c


def _run_segments_backward(xp, segs, B, reverse, dhT, dcT, W, H, dt, cd, run, has_c):
    """Backward of :func:`_run_segments`: ``run(k, dh, dc)`` backpropagates through segment k
    from the gradient of the state after it (None: zero) and returns that of the state it
    started from. dhT (B, W) / dcT (B, H) or None, rows in length order. Returns
    (dh0 (B, W), dc0 (B, H) or None)."""
    def part(v, a, b, width):
        return xp.zeros((b - a, width), dtype=dt, device=cd) if v is None else v[a:b, :]

    def cat(parts):
        parts = [q for q in parts if _shape(q)[0] > 0]
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)

    if not segs:
        return part(dhT, 0, B, W), (part(dcT, 0, B, H) if has_c else None)
    K = len(segs)
    if not reverse:
        n = segs[-1][2]
        dh = None if dhT is None else dhT[0:n, :]
        dc = None if dcT is None else dcT[0:n, :]
        for k in range(K - 1, -1, -1):
            dh, dc = run(k, dh, dc)  # (n_k rows)
            n = segs[k][2]
            n_before = segs[k - 1][2] if k > 0 else B
            if n_before > n:  # rows [n, n_before) ended before segment k: their final-state gradient enters
                dh = cat([dh, part(dhT, n, n_before, W)])
                if has_c:
                    dc = cat([dc, part(dcT, n, n_before, H)])
        return dh, (dc if has_c else None)
    n0 = segs[0][2]
    dh = None if dhT is None else dhT[0:n0, :]
    dc = None if dcT is None else dcT[0:n0, :]
    starts_h, starts_c = [], []  # initial-state gradients of the rows that started in each segment
    for k in range(K):
        dh, dc = run(k, dh, dc)  # (n_k rows)
        n = segs[k][2]
        n_next = segs[k + 1][2] if k + 1 < K else 0
        starts_h.append(dh[n_next:n, :])
        dh = dh[0:n_next, :]
        if has_c:
            starts_c.append(dc[n_next:n, :])
            dc = dc[0:n_next, :]
    dh0 = cat(starts_h[::-1] + [part(dhT, n0, B, W)])
    dc0 = cat(starts_c[::-1] + [part(dcT, n0, B, H)]) if has_c else None
    return dh0, dc0


def _add_times_previous(xp, G, Z, Y, col, h0, reverse, T, B):
    """``G += Z.T @ Hp`` in place, where ``Hp`` (T*B, H) holds the state entering
    each step (:func:`xrnn.functional.previous_states`), without building ``Hp``:
    the rows of ``Z`` for the first processed step meet ``h0``, the others meet
    the outputs ``Y[:, :, col]`` one step earlier (later, in reverse).

    G: (K, H) gradient accumulator (a view into the gradient is fine); Z: (T*B, K);
    Y: (T, B, D*H); h0: (B, H).
    """
    first = slice((T - 1) * B, T * B) if reverse else slice(0, B)  # rows of the step that starts from h0
    G += Z[first, :].T @ h0  # (K, H)
    if T > 1:
        H = _shape(h0)[-1]
        if reverse:
            Zr, Yr = Z[0:(T - 1) * B, :], Y[1:T, :, col]
        else:
            Zr, Yr = Z[B:T * B, :], Y[0:T - 1, :, col]
        # a view on NumPy (the (T-1, B) axes merge even for one direction's columns)
        Yr = xp.reshape(Yr, ((T - 1) * B, H))  # ((T-1)*B, H)
        G += Zr.T @ Yr


class RNN(_RNNBase):
    """Elman RNN, ``h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)``, act tanh or relu.

    Same arguments, parameter names and semantics as ``torch.nn.RNN``, plus
    ``device``, ``dtype`` and ``seed``.
    """

    _mode = "RNN"
    _gates = 1

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device: Any = "cpu", dtype: Any = "float32", seed: Any = None, proj_size: int = 0):
        # proj_size is accepted only to be refused clearly, as torch.nn.RNN does
        super().__init__(input_size, hidden_size, num_layers, nonlinearity, bias, batch_first, dropout,
                         bidirectional, device, dtype, seed, proj_size=proj_size)


class LSTM(_RNNBase):
    """LSTM with PyTorch's gates (i, f, g, o), names and semantics (``torch.nn.LSTM``).

    ``forget_bias``: if given, the forget-gate biases start at ``forget_bias``
    in total (``bias_ih`` gets it, ``bias_hh`` gets 0) instead of the uniform
    draw; char-rnn and Keras use 1.0.

    ``proj_size`` P > 0 (torch's LSTMP, keyword): ``h_t = W_hr (o_t * tanh(c_t))``
    with ``weight_hr_l{k}[_reverse]`` (P, H); h has P units, c keeps H;
    ``weight_hh`` is (4H, P), the output (T, B, D*P), the next layer's input
    D*P wide. ``0 < P < hidden_size``.
    """

    _mode = "LSTM"
    _gates = 4

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, device: Any = "cpu",
                 dtype: Any = "float32", seed: Any = None, forget_bias: float | None = None, proj_size: int = 0):
        super().__init__(input_size, hidden_size, num_layers, "tanh", bias, batch_first, dropout,
                         bidirectional, device, dtype, seed, forget_bias, proj_size)


class GRU(_RNNBase):
    """GRU with PyTorch's gates (r, z, n) and ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``."""

    _mode = "GRU"
    _gates = 3

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, device: Any = "cpu",
                 dtype: Any = "float32", seed: Any = None, proj_size: int = 0):
        # proj_size is accepted only to be refused clearly, as torch.nn.GRU does
        super().__init__(input_size, hidden_size, num_layers, "tanh", bias, batch_first, dropout,
                         bidirectional, device, dtype, seed, proj_size=proj_size)


# ---------------------------------------------------------------------------
# one-step cells
# ---------------------------------------------------------------------------

class _CellBase(Module):
    """A single time step with a tape: each forward pushes what its backward
    needs, each backward pops the most recent step, so T forwards followed by
    T backwards (in reverse order) is BPTT. Forwards under ``no_grad`` push
    nothing; ``clear()`` drops pending steps.
    """

    _gates = 1
    _mode = "RNN"

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", device="cpu",
                 dtype="float32", seed=None, forget_bias=None):
        super().__init__(device, dtype)
        self.input_size = _positive_int("input_size", input_size)
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        if nonlinearity not in ("tanh", "relu"):
            raise ConfigError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        self.bias = bool(bias)
        if forget_bias is not None and not self.bias:
            raise ConfigError(
                f"forget_bias={forget_bias!r} sets the forget-gate bias, but bias=False gives the layer no "
                "biases; drop forget_bias or use bias=True"
            )
        self.rng = host_rng(seed)
        H, G = self.hidden_size, self._gates
        _reserve(G * H * (self.input_size + H + (2 if self.bias else 0)), type(self).__name__)
        k = 1.0 / math.sqrt(H)
        shapes: list[tuple[str, tuple[int, ...]]] = [("weight_ih", (G * H, self.input_size)), ("weight_hh", (G * H, H))]
        if self.bias:
            shapes += [("bias_ih", (G * H,)), ("bias_hh", (G * H,))]
        for name, shape in shapes:
            value = self.rng.uniform(-k, k, size=shape)
            if forget_bias is not None and name.startswith("bias"):
                value[H:2 * H] = float(forget_bias) if name == "bias_ih" else 0.0
            self._add_param(name, value)
        self._tape: list = []

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, " + super().extra_repr()

    def clear(self) -> None:
        """Forget the steps kept for backward."""
        self._tape.clear()

    def _drop_cache(self) -> None:
        self._tape = []

    def _check_step_input(self, x, state_parts):
        self._check_float(x, "x")
        if x.ndim not in (1, 2) or _shape(x)[-1] != self.input_size:
            raise ShapeError(
                f"x must be (B, input_size) = (B, {self.input_size}) or ({self.input_size},) unbatched, "
                f"got {_shape(x)}"
            )
        batched = x.ndim == 2
        B = _shape(x)[0] if batched else None
        for s, what in state_parts:
            if s is None:
                continue
            self._check_float(s, what)
            expected = (B, self.hidden_size) if batched else (self.hidden_size,)
            if _shape(s) != expected:
                raise ShapeError(f"{what} must have shape {expected} to match x {_shape(x)}, got {_shape(s)}")
        return batched

    def _zeros_like_state(self, x):
        dev = self.device
        shape = (_shape(x)[0], self.hidden_size) if x.ndim == 2 else (self.hidden_size,)
        return dev.zeros(shape, self.dtype)

    def _pop(self):
        if not self._tape:
            raise StateError(
                f"{type(self).__name__}.backward() has no forward step left to backpropagate through "
                "(one backward per forward, in reverse order; forwards under no_grad keep nothing)"
            )
        return self._tape.pop()

    def _take(self, grads):
        """Check the gradients ``[(array or None, name), ...]`` of the latest step's
        outputs (dtype, device, shape) and only then pop that step off the tape,
        so a refused gradient leaves the step to backpropagate through."""
        entry = self._tape[-1] if self._tape else None
        if entry is not None:
            x, batched = entry[0], entry[-1]  # x (B, I), batched even for an unbatched call
            H = self.hidden_size
            expected = (_shape(x)[0], H) if batched else (H,)
            for g, what in grads:
                if g is None:
                    continue
                self._check_float(g, what)
                if _shape(g) != expected:
                    raise ShapeError(
                        f"{what} must have the shape of the step's output {expected} (the latest forward "
                        f"took x of shape {(_shape(x)[0], _shape(x)[1]) if batched else (_shape(x)[1],)}), "
                        f"got {_shape(g)}"
                    )
        return self._pop()

    def _accumulate(self, x, h_prev, dz_i, dz_h):
        """Add this step's parameter gradients; dz_i/dz_h (B, G*H) are the input/hidden-side gate grads."""
        xp = self.device.xp
        g = self._grads
        g["weight_ih"] += dz_i.T @ x  # (G*H, I)
        g["weight_hh"] += dz_h.T @ h_prev  # (G*H, H)
        if self.bias:
            g["bias_ih"] += xp.sum(dz_i, axis=0)
            g["bias_hh"] += xp.sum(dz_h, axis=0)

    def _as_batch(self, *arrays):
        return [None if a is None else a[None, :] for a in arrays]


class RNNCell(_CellBase):
    """One Elman step, ``h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh)`` (``torch.nn.RNNCell``)."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device: Any = "cpu", dtype: Any = "float32", seed: Any = None):
        super().__init__(input_size, hidden_size, bias, nonlinearity, device, dtype, seed)

    def forward(self, x: Array, state: Any = None) -> Array:
        """x (B, I) or (I,); state h (B, H) or None. Returns h' (B, H)."""
        batched = self._check_step_input(x, [(state, "state h")])
        xp, p = self.device.xp, self._params
        with self.device:
            h = self._zeros_like_state(x) if state is None else state
            if not batched:
                x, h = self._as_batch(x, h)
            z = x @ p["weight_ih"].T + h @ p["weight_hh"].T  # (B, H)
            if self.bias:
                z = z + p["bias_ih"] + p["bias_hh"]
            h_new = F.rnn_step(xp, z, self.nonlinearity)
            if _grad_enabled():
                self._tape.append((x, h, h_new, batched))
            return h_new if batched else h_new[0, :]

    def backward(self, dh: Array) -> tuple[Array, Array]:
        """dh: gradient of the most recent step's output. Returns (dx, dh_prev)."""
        x, h_prev, h_new, batched = self._take([(dh, "dh")])
        xp, p = self.device.xp, self._params
        with self.device:
            if not batched:
                dh = dh[None, :]
            dz = F.rnn_step_backward(xp, h_new, dh, self.nonlinearity)  # (B, H)
            self._accumulate(x, h_prev, dz, dz)
            dx, dhp = dz @ p["weight_ih"], dz @ p["weight_hh"]
            return (dx, dhp) if batched else (dx[0, :], dhp[0, :])


class LSTMCell(_CellBase):
    """One LSTM step (``torch.nn.LSTMCell``); state is ``(h, c)``."""

    _gates = 4

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device: Any = "cpu",
                 dtype: Any = "float32", seed: Any = None, forget_bias: float | None = None):
        super().__init__(input_size, hidden_size, bias, "tanh", device, dtype, seed, forget_bias)

    def forward(self, x: Array, state: Any = None) -> tuple[Array, Array]:
        """x (B, I) or (I,); state (h, c) each (B, H), or None. Returns (h', c')."""
        if state is not None and (not isinstance(state, (tuple, list)) or len(state) != 2):
            raise ShapeError("LSTMCell state must be a tuple (h, c), or None for zeros")
        h, c = (None, None) if state is None else state
        batched = self._check_step_input(x, [(h, "state h"), (c, "state c")])
        xp, p = self.device.xp, self._params
        with self.device:
            h = self._zeros_like_state(x) if h is None else h
            c = self._zeros_like_state(x) if c is None else c
            if not batched:
                x, h, c = self._as_batch(x, h, c)
            z = x @ p["weight_ih"].T + h @ p["weight_hh"].T  # (B, 4H)
            if self.bias:
                z = z + p["bias_ih"] + p["bias_hh"]
            acts, c_new, h_new = F.lstm_step(xp, z, c)
            if _grad_enabled():
                self._tape.append((x, h, c, acts, c_new, batched))
            return (h_new, c_new) if batched else (h_new[0, :], c_new[0, :])

    def backward(self, dh: Array, dc: Array | None = None) -> tuple[Array, tuple[Array, Array]]:
        """Gradients of the latest step's (h', c'). Returns (dx, (dh_prev, dc_prev))."""
        x, h_prev, c_prev, acts, c_new, batched = self._take([(dh, "dh"), (dc, "dc")])
        xp, p = self.device.xp, self._params
        with self.device:
            if not batched:
                dh, dc = self._as_batch(dh, dc)
            dz, dcp = F.lstm_step_backward(xp, acts, c_new, c_prev, dh, dc)  # (B, 4H), (B, H)
            self._accumulate(x, h_prev, dz, dz)
            dx, dhp = dz @ p["weight_ih"], dz @ p["weight_hh"]
            if batched:
                return dx, (dhp, dcp)
            return dx[0, :], (dhp[0, :], dcp[0, :])


class GRUCell(_CellBase):
    """One GRU step (``torch.nn.GRUCell``), ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``."""

    _gates = 3

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device: Any = "cpu",
                 dtype: Any = "float32", seed: Any = None):
        super().__init__(input_size, hidden_size, bias, "tanh", device, dtype, seed)

    def forward(self, x: Array, state: Any = None) -> Array:
        """x (B, I) or (I,); state h (B, H) or None. Returns h' (B, H)."""
        batched = self._check_step_input(x, [(state, "state h")])
        xp, p = self.device.xp, self._params
        H = self.hidden_size
        with self.device:
            h = self._zeros_like_state(x) if state is None else state
            if not batched:
                x, h = self._as_batch(x, h)
            gi = x @ p["weight_ih"].T  # (B, 3H)
            gh = h @ p["weight_hh"].T  # (B, 3H)
            if self.bias:
                gi = gi + p["bias_ih"]
                gh = gh + p["bias_hh"]
            acts, h_new = F.gru_step(xp, gi, gh, h)
            if _grad_enabled():
                self._tape.append((x, h, acts, gh[:, 2 * H:3 * H], batched))
            return h_new if batched else h_new[0, :]

    def backward(self, dh: Array) -> tuple[Array, Array]:
        """dh: gradient of the latest step's output. Returns (dx, dh_prev)."""
        x, h_prev, acts, gh_n, batched = self._take([(dh, "dh")])
        xp, p = self.device.xp, self._params
        H = self.hidden_size
        with self.device:
            if not batched:
                dh = dh[None, :]
            dgi, dghn, dh_direct = F.gru_step_backward(xp, acts, gh_n, h_prev, dh)
            dgh = xp.concat([dgi[:, 0:2 * H], dghn], axis=-1)  # (B, 3H)
            self._accumulate(x, h_prev, dgi, dgh)
            dx = dgi @ p["weight_ih"]
            dhp = dh_direct + dgh @ p["weight_hh"]
            return (dx, dhp) if batched else (dx[0, :], dhp[0, :])


# ---------------------------------------------------------------------------
# Linear and Embedding
# ---------------------------------------------------------------------------

class Linear(Module):
    """``y = x W^T + b`` over the last axis (``torch.nn.Linear``: weight (out, in), bias (out,)).

    Init as PyTorch: W and b ~ U(-1/sqrt(in), 1/sqrt(in)).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Any = "cpu",
                 dtype: Any = "float32", seed: Any = None):
        super().__init__(device, dtype)
        self.in_features = _positive_int("in_features", in_features)
        self.out_features = _positive_int("out_features", out_features)
        # no `self.bias` flag: as in PyTorch, `linear.bias` is the parameter
        _reserve(self.out_features * (self.in_features + (1 if bias else 0)), "Linear")
        rng = host_rng(seed)
        k = 1.0 / math.sqrt(self.in_features)
        self._add_param("weight", rng.uniform(-k, k, size=(self.out_features, self.in_features)))
        if bias:
            self._add_param("bias", rng.uniform(-k, k, size=(self.out_features,)))
        self._x = None

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, " + super().extra_repr()

    def _drop_cache(self) -> None:
        self._x = None

    def forward(self, x: Array) -> Array:
        """x (..., in_features) -> (..., out_features)."""
        self._check_float(x, "x")
        if x.ndim < 1 or _shape(x)[-1] != self.in_features:
            raise ShapeError(f"x must end in in_features={self.in_features}, got shape {_shape(x)}")
        xp, p = self.device.xp, self._params
        with self.device:
            lead = _shape(x)[:-1]
            x2 = xp.reshape(x, (-1, self.in_features))  # (N, in)
            y = x2 @ p["weight"].T  # (N, out)
            if "bias" in p:
                y += p["bias"]  # y is the product's fresh array
            self._x = x2 if _grad_enabled() else None
            return xp.reshape(y, lead + (self.out_features,))

    def backward(self, dy: Array, *, input_grad: bool = True) -> Array | None:
        """dy (..., out_features) -> dx (..., in_features); adds to grads."""
        if self._x is None:
            raise StateError("Linear.backward() needs a preceding forward() in gradient mode")
        self._check_float(dy, "dy")
        x2 = self._x
        n = _shape(x2)[0]
        lead = _shape(dy)[:-1]
        if dy.ndim < 1 or _shape(dy)[-1] != self.out_features or math.prod(lead) != n:
            raise ShapeError(
                f"dy must have the shape of the forward output: {n} rows of out_features="
                f"{self.out_features} (..., {self.out_features}), got shape {_shape(dy)}"
            )
        self._x = None
        xp, p, g = self.device.xp, self._params, self._grads
        with self.device:
            dy2 = xp.reshape(dy, (-1, self.out_features))  # (N, out)
            g["weight"] += dy2.T @ x2  # (out, in)
            if "bias" in p:
                g["bias"] += xp.sum(dy2, axis=0)
            if not input_grad:
                return None
            return xp.reshape(dy2 @ p["weight"], lead + (self.in_features,))


class Embedding(Module):
    """Lookup table ``(num_embeddings, embedding_dim)``, init N(0, 1) as ``torch.nn.Embedding``."""

    #: rows of one-hot per chunk in the portable backward (bounds its memory)
    _CHUNK = 1 << 22

    def __init__(self, num_embeddings: int, embedding_dim: int, device: Any = "cpu", dtype: Any = "float32",
                 seed: Any = None):
        super().__init__(device, dtype)
        self.num_embeddings = _positive_int("num_embeddings", num_embeddings)
        self.embedding_dim = _positive_int("embedding_dim", embedding_dim)
        _reserve(self.num_embeddings * self.embedding_dim, "Embedding")
        rng = host_rng(seed)
        self._add_param("weight", rng.standard_normal((self.num_embeddings, self.embedding_dim)))
        self._ids = None
        self._ids_shape = ()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, " + super().extra_repr()

    def _drop_cache(self) -> None:
        self._ids = None

    def forward(self, ids: Array) -> Array:
        """Integer ids (...) in [0, num_embeddings) -> vectors (..., embedding_dim)."""
        flat = check_ids(self.device, ids, self.num_embeddings, "ids")
        xp = self.device.xp
        with self.device:
            out = xp.take(self._params["weight"], flat, axis=0)  # (N, D)
            self._ids = flat if _grad_enabled() else None
            self._ids_shape = _shape(ids)
            return xp.reshape(out, _shape(ids) + (self.embedding_dim,))

    def backward(self, dout: Array) -> None:
        """Adds ``dout`` rows into the gradient of the rows that were looked up. Returns None."""
        if self._ids is None:
            raise StateError("Embedding.backward() needs a preceding forward() in gradient mode")
        self._check_float(dout, "dout")
        expected = self._ids_shape + (self.embedding_dim,)
        if _shape(dout) != expected:
            raise ShapeError(f"dout must have the shape of the forward output {expected}, got {_shape(dout)}")
        flat, self._ids = self._ids, None
        xp = self.device.xp
        with self.device:
            d2 = xp.reshape(dout, (-1, self.embedding_dim))  # (N, D)
            self._grads["weight"] += scatter_rows(self.device, flat, d2, self.num_embeddings)
        return None


def check_ids(dev: Device, ids: Array, n: int, what: str) -> Array:
    """Validate integer ids in [0, n) on ``dev``; returns them flattened (N,)."""
    dev.check(ids, what)
    xp = dev.xp
    if not xp.isdtype(ids.dtype, "integral"):
        raise DTypeError(
            f"{what} must be integer token ids, got dtype {dtype_name(ids.dtype)}; "
            "floating inputs go to the recurrent layers directly"
        )
    with dev:
        flat = xp.reshape(ids, (-1,))
        check_id_range(xp, flat, n, what, "encode text with the model's own vocabulary (model.vocab.encode), "
                       "or build the model for a larger vocabulary")
        return flat


def scatter_rows(dev: Device, ids: Array, rows: Array, n: int) -> Array:
    """``out[ids[k]] += rows[k]`` for an (n, D) result, as one-hot products in chunks.

    The standard has no scatter-add; ``one_hot(ids).T @ rows`` is exact and
    stays on the device. Chunks bound the one-hot's size to ``_CHUNK`` entries.
    """
    xp = dev.xp
    N, D = _shape(rows)
    dt = rows.dtype
    out = xp.zeros((n, D), dtype=dt, device=dev._create_device())
    step = max(1, Embedding._CHUNK // max(n, 1))
    for s in range(0, N, step):
        e = min(s + step, N)
        oh = F.one_hot(xp, ids[s:e], n, dt, device=dev._create_device())  # (chunk, n)
        out += oh.T @ rows[s:e, :]  # (n, D)
    return out
