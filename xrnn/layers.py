"""Keras-style layers: ``Dense``, ``LSTM``, ``GRU``, ``SimpleRNN``, ``Bidirectional``, ...

These are the building blocks of :class:`xrnn.sequential.Sequential`, and
also usable on their own. They follow Keras' conventions:

* inputs are batch-major, ``(batch, timesteps, features)``;
* layers take ``units`` and infer their input size when they are *built*:
  from ``input_shape=`` (without the batch axis, as in Keras 2 tutorials:
  ``LSTM(50, input_shape=(3, 1))``), from an :class:`Input` at the head of a
  ``Sequential``, or from the first batch they see;
* recurrent layers take ``return_sequences`` (all steps or only the last),
  ``return_state`` (the final states as extra outputs, Keras' order: LSTM
  ``[out, h, c]``, GRU/SimpleRNN ``[out, h]``), ``go_backwards`` and
  ``stateful``.

Every layer is an :class:`xrnn.Module` with an explicit ``forward`` and a
hand-written ``backward``; the recurrences themselves (and their BPTT) are
:mod:`xrnn.modules`' layers, run with ``batch_first=True``, so nothing of the
scans is rewritten here. Parameters keep PyTorch's names and layouts
(``weight_ih_l0`` (G*units, features), ``weight_hh_l0``, ``bias_ih_l0``; Dense:
``weight`` (units, features), ``bias``).

Parameter sets and counts are Keras': the LSTM and SimpleRNN have one bias
vector (``bias_ih_l0``; PyTorch's second, redundant ``bias_hh`` is held at
zero inside and is not a parameter), the GRU has two (Keras' default
``reset_after=True`` GRU is exactly PyTorch's GRU). So ``LSTM(u)`` on ``f``
features has ``4 * (u * (f + u) + u)`` parameters, ``GRU(u)``
``3 * (u * (f + u) + 2 * u)``, ``SimpleRNN(u)`` ``u * (f + u) + u``,
``Dense(u)`` ``f * u + u``, as in ``model.summary()`` of Keras. To load an
LSTM/SimpleRNN layer into ``torch.nn.LSTM``/``RNN`` set ``bias_hh_l0`` to zeros.
``get_weights()``/``set_weights()`` speak Keras' layouts instead (kernel
(features, G*units), recurrent_kernel, bias; Keras' gate orders), so
``keras_model.get_weights()`` loads as it is (see :meth:`Layer.get_weights`).

Initialisation is PyTorch's (U(-1/sqrt(units), 1/sqrt(units)) for the
recurrent layers, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for Dense, N(0, 1) for
Embedding), drawn on the host in a fixed order so a seed gives the same
weights on every backend. ``LSTM(unit_forget_bias=True)`` (Keras' default)
starts the forget-gate bias at exactly 1.

Masking (variable-length batches, *right* padding only): a ``Masking`` first
layer (or ``Embedding(mask_zero=True)``) turns each sequence's trailing
padding into a length; recurrent layers then compute exactly what they
would compute on each sequence alone: padded steps affect neither the
outputs at valid steps nor any gradient, ``return_sequences=False`` gives
each sequence's last valid output, and ``return_state``/``stateful`` states
are those at each sequence's last valid step. Outputs at padded steps are
Keras' (which keeps the previous step's output at a masked step): with
``return_sequences`` each padded step repeats the sequence's last valid
output (a copy on the device; in backward the gradients arriving at the
copies are added to the output they copy); they are zeros with
``zero_output_for_mask=True``, in ``Bidirectional`` with
``return_sequences`` (Keras forces that option there), and before a
``go_backwards`` sequence (its reversed order puts the padding first). A
sequence of length 0 outputs zeros, also as its last output, whatever its
initial state (its states stay the initial ones). PyTorch-style
``xrnn.LSTM(...)(x, lengths=...)`` keeps ``pad_packed_sequence``'s zeros
instead. Internally a batch is sorted by
length and run in segments between distinct lengths with shrinking batch
size (PyTorch's packed sequences), so padding costs no computation: the
plan is :mod:`xrnn.segments`', run by the inner :mod:`xrnn.modules` layer
(``forward(x, lengths=...)``), the same code as ``xrnn.LSTM``'s.
Unlike Keras, only the *trailing* run of masked steps is padding: a step
equal to ``mask_value`` inside a sequence is ordinary data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import functional as F
from . import modules as M
from ._typing import Array
from .backend import dtype_name, host_rng, to_device, to_numpy
from .backend import int_shape as _shape
from .errors import ConfigError, DTypeError, ShapeError, StateError
from .modules import Module, _grad_enabled, _positive_int, dropout_mask
from .segments import check_lengths  # noqa: F401  (re-exported: Sequential and callers import it from here)

__all__ = [
    "Input",
    "Layer",
    "Dense",
    "Dropout",
    "Embedding",
    "Masking",
    "SimpleRNN",
    "LSTM",
    "GRU",
    "Bidirectional",
    "TimeDistributed",
    "ACTIVATIONS",
    "MERGE_MODES",
    "LAYERS",
    "layer_from_config",
]

#: activations of :class:`Dense`
ACTIVATIONS = (None, "linear", "tanh", "relu", "sigmoid", "softmax")
#: ways :class:`Bidirectional` combines its two directions
MERGE_MODES = ("concat", "sum", "mul", "ave")


def _fmt_shape(shape) -> str:
    return "(" + ", ".join("None" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _shape_arg(shape, what: str) -> tuple | None:
    """Validate a Keras shape without the batch axis: a tuple of positive ints or None."""
    if shape is None:
        return None
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (int(shape),)
    try:
        out = tuple(shape)
    except TypeError:
        raise ConfigError(f"{what} must be a tuple like (timesteps, features), got {shape!r}") from None
    if not out:
        raise ConfigError(f"{what} must have at least one axis (the batch axis is left out), got {shape!r}")
    for s in out:
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1):
            raise ConfigError(f"{what} entries must be positive integers or None, got {shape!r}")
    return tuple(None if s is None else int(s) for s in out)


def _rate(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= v < 1.0:  # also rejects NaN
        raise ConfigError(f"{name} must be in [0, 1) (the fraction of units dropped), got {value!r}")
    return v


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name} must be True or False, got {value!r}")
    return bool(value)


# ---------------------------------------------------------------------------
# Input and the Layer base
# ---------------------------------------------------------------------------

class Input:
    """The input specification at the head of a :class:`~xrnn.sequential.Sequential`.

    ``Input(shape=(timesteps, features))`` (the batch axis left out; timesteps
    may be None) builds the model at once, so ``summary()`` works before
    ``fit``. For token ids use ``Input(shape=(timesteps,))`` before an
    :class:`Embedding`. Not a layer: it has no parameters and does not appear
    in the summary (as in Keras 3).
    """

    def __init__(self, shape: Any, name: str | None = None):
        self.shape = _shape_arg(shape, "Input shape")
        if self.shape is None:
            raise ConfigError("Input needs a shape, e.g. Input(shape=(timesteps, features))")
        self.name = name

    def __repr__(self) -> str:
        return f"Input(shape={_fmt_shape(self.shape)})"


class Layer(Module):
    """Base class of the Keras-style layers.

    Attributes:
        name: the layer's name (set by ``Sequential`` when not given:
            ``lstm``, ``lstm_1``, ``dense``, ...).
        built: True once the parameters exist.
        input_shape / output_shape: shapes without the batch axis (None for
            an unknown number of timesteps), set by :meth:`build`.
        rng: host generator for initial weights and dropout masks (the
            model's generator inside a ``Sequential``).

    Subclasses implement ``_build(input_shape)``, ``compute_output_shape``,
    ``forward(x, lengths=None)`` and ``backward(dout, *, input_grad=True)``.
    """

    _keras_name = "layer"
    _min_rank = 1  # rank of the input without the batch axis
    _max_rank: int | None = None
    input_shape: Any  # tuple[int | None, ...] without the batch axis once built, None before
    output_shape: Any  # likewise

    def __init__(self, *, name: str | None = None, input_shape: Any = None, device: Any = "cpu",
                 dtype: Any = "float32", seed: Any = None):
        super().__init__(device, dtype)
        if name is not None and (not isinstance(name, str) or not name or "." in name):
            raise ConfigError(f"layer name must be a non-empty string without dots, got {name!r}")
        self.name = name
        self.built = False
        self.input_shape = None
        self.output_shape = None
        self._input_shape_arg = _shape_arg(input_shape, "input_shape")
        self.rng = host_rng(seed)

    # -- building ---------------------------------------------------------------
    def _check_input_shape(self, shape: tuple) -> None:
        r = len(shape)
        if r < self._min_rank or (self._max_rank is not None and r > self._max_rank):
            want = (f"{self._min_rank}" if self._max_rank == self._min_rank
                    else f"{self._min_rank} or more" if self._max_rank is None
                    else f"{self._min_rank} to {self._max_rank}")
            raise ShapeError(
                f"{type(self).__name__} {self.name or ''} takes inputs with {want} axes after the batch axis, "
                f"got input shape {_fmt_shape((None,) + tuple(shape))}{self._rank_hint(shape)}"
            )

    def _rank_hint(self, shape) -> str:
        return ""

    def build(self, input_shape: Any) -> Layer:
        """Create the parameters for inputs of ``input_shape`` (without the batch axis)."""
        shape = tuple(None if s is None else int(s) for s in input_shape)
        self._check_input_shape(shape)
        if self.built:
            if not self._same_build(shape):
                raise ShapeError(
                    f"layer {self.name or type(self).__name__} was built for inputs "
                    f"{_fmt_shape((None,) + self.input_shape)}, "
                    f"got {_fmt_shape((None,) + shape)}"
                )
            return self
        self._build(shape)
        self.input_shape = shape
        self.output_shape = self.compute_output_shape(shape)
        self.built = True
        return self

    def _build(self, input_shape: tuple) -> None:
        pass

    def _same_build(self, shape: tuple) -> bool:
        """Whether parameters built for ``self.input_shape`` also fit ``shape``."""
        return len(shape) == len(self.input_shape) and shape[-1] == self.input_shape[-1]

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape)

    def _attach(self, device, dtype, rng) -> None:
        """Put an unbuilt layer on the model's device/dtype and generator (Sequential)."""
        for _, m in self.named_modules():
            m.device, m.dtype = device, dtype_name(dtype)
            if isinstance(m, Layer):
                m.rng = rng

    def _require_built(self) -> None:
        if not self.built:
            raise StateError(
                f"layer {self.name or type(self).__name__} has no weights yet: call it on a batch, or build it "
                "with layer.build(input_shape) / input_shape=... first"
            )

    def __call__(self, x: Array, *args: Any, **kwargs: Any) -> Any:
        if not self.built:
            self.build(_shape(x)[1:])
        return self.forward(x, *args, **kwargs)

    # -- description --------------------------------------------------------------
    def _config(self) -> dict:
        return {}

    def get_config(self) -> dict:
        """Constructor arguments as a JSON-able dict (Keras' ``get_config``)."""
        cfg: dict[str, Any] = {"name": self.name}
        cfg.update(self._config())
        if self._input_shape_arg is not None:
            cfg["input_shape"] = list(self._input_shape_arg)
        return cfg

    @classmethod
    def from_config(cls, config: dict) -> Layer:
        return cls(**config)

    def count_params(self) -> int:
        """Number of parameters (Keras' name for :meth:`num_parameters`)."""
        return self.num_parameters()

    # -- Keras weights ------------------------------------------------------------
    def _keras_specs(self) -> list:
        """``[(name, shape), ...]`` of the Keras weights, in Keras' order (none by default)."""
        return []

    def _to_keras(self, own: dict) -> list:
        """This layer's host parameters (PyTorch names and layouts) -> Keras' list."""
        return []

    def _from_keras(self, weights: list) -> dict:
        """Keras' list (host arrays, shapes checked) -> ``{parameter name: host array}``."""
        return {}

    def get_weights(self) -> list:
        """The weights as Keras lays them out (``keras.layers.<Layer>.get_weights()``): host NumPy arrays.

        Recurrent layers: ``[kernel (features, G*units), recurrent_kernel
        (units, G*units), bias]`` with Keras' gate order (LSTM i, f, c, o; GRU
        z, r, h) and bias ``(G*units,)`` (GRU: ``(2, 3*units)``, input bias
        then recurrent bias); Dense ``[kernel (features, units), bias]``;
        Embedding ``[embeddings (input_dim, output_dim)]``; Bidirectional the
        forward layer's then the backward layer's; TimeDistributed the wrapped
        layer's; Dropout and Masking ``[]``. ``use_bias=False`` drops the bias.
        """
        self._require_built()
        return self._to_keras({k: np.asarray(to_numpy(v)) for k, v in self._params.items()})

    def _stage_keras(self, weights) -> list:
        """Validate Keras weights for this layer; returns ``[(module, state_dict), ...]`` to load."""
        self._require_built()
        specs = self._keras_specs()
        label = f"layer {self.name or self._keras_name!r} ({type(self).__name__})"
        expected = ", ".join(f"{n} {_fmt_shape(sh)}" for n, sh in specs) or "none"
        try:
            weights = list(weights)
        except TypeError:
            raise ShapeError(
                f"{label} takes a list of weight arrays ({expected}), got {type(weights).__name__}"
            ) from None
        if len(weights) != len(specs):
            raise ShapeError(
                f"{label} takes {len(specs)} weight array(s) in Keras' order: {expected}; got {len(weights)}"
            )
        host = []
        for (n, shape), w in zip(specs, weights):
            a = np.asarray(to_numpy(w)) if not isinstance(w, np.ndarray) else w
            if a.shape != tuple(shape):
                raise ShapeError(f"{label}: {n} must have shape {_fmt_shape(shape)}, got {_fmt_shape(a.shape)}")
            if a.dtype.kind not in "fiu":
                raise DTypeError(f"{label}: {n} must hold real numbers, got dtype {a.dtype}")
            host.append(a)
        return self._stage_own(host)

    def _stage_own(self, host: list) -> list:
        return [(self, self._from_keras(host))]

    def set_weights(self, weights: Any) -> None:  # any iterable of arrays
        """Load weights given in Keras' layout and order (see :meth:`get_weights`); any array library.

        Everything is checked before anything changes. Raises ShapeError
        naming the layer and the expected shapes for a wrong count or shape,
        DTypeError for arrays that do not hold real numbers.
        """
        for module, state in self._stage_keras(weights):
            module.load_state_dict(state)

    def extra_repr(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{cfg}, name={self.name!r}"

    # -- masks and losses ---------------------------------------------------------
    def output_lengths(self, lengths: Any) -> Any:
        """Lengths describing this layer's output (None: the output has no time axis)."""
        if lengths is None or self.output_shape is None or len(self.output_shape) < 2:
            return None
        return lengths

    @property
    def output_kind(self) -> str:
        """What the output is, for the losses: "linear", "softmax", "sigmoid" or "other"."""
        return "other"

    # -- input checks ---------------------------------------------------------------
    def _check_x(self, x, what: str = "x"):
        self._check_float(x, what)
        shape = _shape(x)
        self._check_input_shape(shape[1:])
        if shape[-1] != self.input_shape[-1]:
            raise ShapeError(
                f"{what} has {shape[-1]} features (last axis of shape {shape}) but layer "
                f"{self.name or type(self).__name__} was built for {self.input_shape[-1]}"
            )
        if 0 in shape:
            raise ShapeError(f"{what} has an empty axis: shape {shape}")

    def _check_grad(self, d, expected: tuple, what: str = "dout"):
        self._check_float(d, what)
        if _shape(d) != tuple(expected):
            raise ShapeError(f"{what} must have the shape of the forward output {tuple(expected)}, got {_shape(d)}")


# ---------------------------------------------------------------------------
# Dense, Dropout, Masking, Embedding, TimeDistributed
# ---------------------------------------------------------------------------

def _activation_arg(activation):
    if activation == "linear":
        activation = None
    if activation not in ACTIVATIONS:
        names = ", ".join(repr(a) for a in ACTIVATIONS)
        raise ConfigError(f"unknown activation {activation!r}; expected one of {names}")
    return activation


class Dense(Layer):
    """``y = activation(x W^T + b)`` over the last axis (Keras ``Dense``).

    Args:
        units: output size.
        activation: None (or "linear"), "tanh", "relu", "sigmoid", "softmax"
            (over the last axis).
        use_bias: add ``b``.

    Input ``(batch, ..., features)``; a 3-D input is transformed at every
    step (as Keras' Dense, and the same as ``TimeDistributed(Dense)``).
    Parameters: ``weight`` (units, features), ``bias`` (units,): PyTorch's
    ``Linear`` (the layer is one inside), initialised as PyTorch does.
    """

    _keras_name = "dense"
    _linear: Any  # the M.Linear once built, None before

    def __init__(self, units: int, activation: str | None = None, use_bias: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        self.units = _positive_int("units", units)
        self.activation = _activation_arg(activation)
        self.use_bias = _flag("use_bias", use_bias)
        self._linear = None
        self._cache = None
        self._z = None

    def _config(self) -> dict:
        return {"units": self.units, "activation": self.activation, "use_bias": self.use_bias}

    def _build(self, shape):
        lin = M.Linear(shape[-1], self.units, bias=self.use_bias, device=self.device, dtype=self.dtype, seed=self.rng)
        # The Linear's dicts *are* this layer's: names "weight"/"bias", no copies.
        self._linear = lin
        object.__setattr__(self, "_params", lin._params)
        object.__setattr__(self, "_grads", lin._grads)

    def compute_output_shape(self, shape: Any) -> tuple:
        return tuple(shape[:-1]) + (self.units,)

    def _keras_specs(self):
        return [("kernel", (self.input_shape[-1], self.units))] + ([("bias", (self.units,))] if self.use_bias else [])

    def _to_keras(self, own):
        return [own["weight"].T.copy()] + ([own["bias"]] if self.use_bias else [])

    def _from_keras(self, w):
        return {"weight": w[0].T, **({"bias": w[1]} if self.use_bias else {})}

    def _drop_cache(self) -> None:
        self._cache = None
        self._z = None
        if self._linear is not None:
            self._linear.device, self._linear.dtype = self.device, self.dtype
            self._linear._drop_cache()

    @property
    def output_kind(self) -> str:
        return {None: "linear", "softmax": "softmax", "sigmoid": "sigmoid"}.get(self.activation, "other")

    @property
    def logits(self) -> Array:
        """The pre-activation ``x W^T + b`` of the last forward (what fused losses read)."""
        if self._z is None:
            raise StateError("Dense.logits needs a preceding forward()")
        return self._z

    def forward(self, x: Array, lengths: Any = None) -> Array:
        """x (B, ..., features) -> (B, ..., units)."""
        self._require_built()
        self._check_x(x)
        dev, xp = self.device, self.device.xp
        lin = self._linear
        lin.device, lin.dtype = self.device, self.dtype
        with dev:
            z = lin.forward(x)  # (B, ..., units)
            y = _activate(xp, z, self.activation)
            self._z = z
            self._cache = (z, y) if _grad_enabled() else None
            return y

    def backward(self, dy: Array, *, input_grad: bool = True, from_logits: bool = False) -> Array | None:
        """Gradient of the output -> gradient of the input (None when ``input_grad`` is False).

        With ``from_logits=True`` ``dy`` is the gradient of the pre-activation
        (what a fused softmax/sigmoid cross-entropy gives).
        """
        if self._cache is None:
            raise StateError("Dense.backward() needs a preceding forward() in gradient mode")
        z, y = self._cache
        self._check_grad(dy, _shape(y), "dy")
        self._cache = None
        xp = self.device.xp
        with self.device:
            dz = dy if from_logits else _activate_backward(xp, y, dy, self.activation)
            return self._linear.backward(dz, input_grad=input_grad)


def _activate(xp, z, activation):
    if activation is None:
        return z
    if activation in ("tanh", "relu"):
        return F._activate(xp, z, activation)
    if activation == "sigmoid":
        return F.sigmoid(xp, z)
    return F.softmax(xp, z)


def _activate_backward(xp, y, dy, activation):
    """Gradient of the pre-activation from the output ``y`` and its gradient (Chainer style)."""
    if activation is None:
        return dy
    if activation in ("tanh", "relu"):
        return F._activate_backward(xp, y, dy, activation)
    if activation == "sigmoid":
        return dy * y * (1.0 - y)
    return y * (dy - xp.sum(dy * y, axis=-1, keepdims=True))  # softmax


def _trailing_lengths(dev, x, keep_of) -> np.ndarray:
    """Host int64 (B,): 1 + the last step t where ``keep_of(xp)[b, t]`` (a (B, T) bool), else 0.

    NumPy data is measured on the host; device data on ``dev``, then the (B,)
    result is copied to the host (one synchronisation).
    """
    T = _shape(x)[1]
    if isinstance(x, np.ndarray):
        return np.max(np.where(keep_of(np), np.arange(1, T + 1), 0), axis=1).astype(np.int64)
    xp = dev.xp
    with dev:
        steps = xp.arange(1, T + 1, dtype=xp.int64, device=dev._create_device())  # (T,)
        last = xp.max(xp.where(keep_of(xp), steps, xp.zeros_like(steps)), axis=1)  # (B,)
        return np.asarray(to_numpy(last), dtype=np.int64)


class Dropout(Layer):
    """Inverted dropout (Keras ``Dropout``): in training mode each element is zeroed
    with probability ``rate`` and the rest scaled by ``1 / (1 - rate)``; in
    eval mode (``predict``/``evaluate``) the layer is the identity.
    Masks are drawn from the layer's host generator (the model's)."""

    _keras_name = "dropout"

    def __init__(self, rate: float, **kwargs: Any):
        super().__init__(**kwargs)
        self.rate = _rate("rate", rate)
        self._cache = None

    def _config(self):
        return {"rate": self.rate}

    def _drop_cache(self):
        self._cache = None

    def forward(self, x: Array, lengths: Any = None) -> Array:
        self._require_built()
        self._check_x(x)
        mask = None
        if self.training and self.rate > 0.0:
            mask = dropout_mask(self.device, self.rng, _shape(x), self.rate, self.dtype)
            with self.device:
                x = x * mask
        self._cache = (_shape(x), mask) if _grad_enabled() else None
        return x

    def backward(self, dout: Array, *, input_grad: bool = True) -> Array | None:
        if self._cache is None:
            raise StateError("Dropout.backward() needs a preceding forward() in gradient mode")
        shape, mask = self._cache
        self._check_grad(dout, shape)
        self._cache = None
        if not input_grad:
            return None
        if mask is None:
            return dout
        with self.device:
            return dout * mask


class Masking(Layer):
    """Marks right padding (Keras ``Masking``): the trailing timesteps whose
    features all equal ``mask_value`` are padding for every later layer.

    The output is the input unchanged; what the layer adds is each
    sequence's length (``compute_lengths``), which a ``Sequential`` passes on
    to the recurrent layers and the loss. Only *trailing* masked steps count:
    a step equal to ``mask_value`` inside a sequence is data (Keras would skip
    it), so a real zero in a series cannot be mistaken for padding.
    """

    _keras_name = "masking"
    _shape_out: Any  # the last forward's input shape
    _min_rank = 2
    _max_rank = 2
    produces_lengths = True

    def __init__(self, mask_value: float = 0.0, **kwargs: Any):
        super().__init__(**kwargs)
        try:
            self.mask_value = float(mask_value)
        except (TypeError, ValueError):
            raise ConfigError(f"mask_value must be a number, got {mask_value!r}") from None
        self._shape_out = None

    def _config(self):
        return {"mask_value": self.mask_value}

    def compute_lengths(self, x: Array) -> np.ndarray:
        """Valid steps per sequence, host int64 (B,): 1 + the last step that is not all ``mask_value``.

        A NumPy batch is measured on the host; a device batch on the device,
        then the (B,) result is copied to the host (one synchronisation).
        """
        if not isinstance(x, np.ndarray):
            self.device.check(x, "x")
        if x.ndim != 3:
            raise ShapeError(f"Masking takes (batch, timesteps, features), got shape {_shape(x)}")
        return _trailing_lengths(self.device, x, lambda xp: xp.any(x != self.mask_value, axis=-1))

    def forward(self, x: Array, lengths: Any = None) -> Array:
        self._require_built()
        self._check_x(x)
        self._shape_out = _shape(x)
        return x

    def backward(self, dout: Array, *, input_grad: bool = True) -> Array | None:
        if self._shape_out is None:
            raise StateError("Masking.backward() needs a preceding forward()")
        self._check_grad(dout, self._shape_out)
        return dout if input_grad else None


class Embedding(Layer):
    """Token ids -> vectors (Keras ``Embedding(input_dim, output_dim)``).

    Input ``(batch, timesteps)`` integer ids in ``[0, input_dim)``; output
    ``(batch, timesteps, output_dim)``. Parameter ``weight`` (input_dim,
    output_dim), N(0, 1) as ``torch.nn.Embedding``. With ``mask_zero=True``
    id 0 is padding: each sequence's trailing zeros are masked for the
    later layers (so 0 must not be a real token, as in Keras).
    """

    _keras_name = "embedding"
    _emb: Any  # the M.Embedding once built, None before
    _shape_in: Any  # the last forward's id shape
    _min_rank = 1

    def __init__(self, input_dim: int, output_dim: int, mask_zero: bool = False, input_length: int | None = None,
                 **kwargs: Any):
        if input_length is not None and kwargs.get("input_shape") is None:
            kwargs["input_shape"] = (input_length,)  # Keras 2's spelling
        super().__init__(**kwargs)
        self.input_dim = _positive_int("input_dim", input_dim)
        self.output_dim = _positive_int("output_dim", output_dim)
        self.mask_zero = _flag("mask_zero", mask_zero)
        self._emb = None
        self._shape_in = None

    @property
    def produces_lengths(self) -> bool:
        return self.mask_zero

    def _config(self):
        return {"input_dim": self.input_dim, "output_dim": self.output_dim, "mask_zero": self.mask_zero}

    def _build(self, shape):
        emb = M.Embedding(self.input_dim, self.output_dim, device=self.device, dtype=self.dtype, seed=self.rng)
        self._emb = emb
        object.__setattr__(self, "_params", emb._params)
        object.__setattr__(self, "_grads", emb._grads)

    def compute_output_shape(self, shape: Any) -> tuple:
        return tuple(shape) + (self.output_dim,)

    def _keras_specs(self):
        return [("embeddings", (self.input_dim, self.output_dim))]

    def _to_keras(self, own):
        return [own["weight"]]

    def _from_keras(self, w):
        return {"weight": w[0]}

    def _drop_cache(self):
        if self._emb is not None:
            self._emb.device, self._emb.dtype = self.device, self.dtype
            self._emb._drop_cache()

    def _same_build(self, shape):
        return len(shape) == len(self.input_shape)

    def compute_lengths(self, ids: Array) -> np.ndarray:
        """Host int64 (B,): 1 + the last position whose id is not 0 (see :meth:`Masking.compute_lengths`)."""
        if not isinstance(ids, np.ndarray):
            self.device.check(ids, "ids")
        return _trailing_lengths(self.device, ids, lambda xp: ids != 0)

    def forward(self, ids: Array, lengths: Any = None) -> Array:
        self._require_built()
        self.device.check(ids, "ids")
        if not self.device.xp.isdtype(ids.dtype, "integral"):
            raise DTypeError(
                f"Embedding takes integer token ids, got dtype {dtype_name(ids.dtype)}; "
                "cast the ids to int64 (floating inputs go straight to a recurrent or Dense layer)"
            )
        self._check_input_shape(_shape(ids)[1:])
        self._emb.device, self._emb.dtype = self.device, self.dtype
        self._shape_in = _shape(ids)
        return self._emb.forward(ids)

    def backward(self, dout: Array, *, input_grad: bool = True) -> None:
        """Adds into the gradient of the looked-up rows; returns None (ids have no gradient)."""
        if self._shape_in is None:
            raise StateError("Embedding.backward() needs a preceding forward() in gradient mode")
        self._check_grad(dout, self._shape_in + (self.output_dim,))
        self._emb.backward(dout)
        return None


class TimeDistributed(Layer):
    """Apply ``layer`` (e.g. ``Dense``) to every timestep of ``(batch, timesteps, ...)``.

    The time axis is folded into the batch, so the wrapped layer sees
    ``(batch * timesteps, ...)``. Its parameters appear under its own name
    (``time_distributed.dense.weight``).
    """

    _keras_name = "time_distributed"
    _min_rank = 2
    _lead: Any  # (B, T) of the last forward

    def __init__(self, layer: Layer, **kwargs: Any):
        super().__init__(**kwargs)
        if not isinstance(layer, Layer) or isinstance(layer, (Bidirectional, _Recurrent, TimeDistributed)):
            raise ConfigError(
                f"TimeDistributed wraps a per-step layer such as Dense, got {type(layer).__name__}"
            )
        if layer.built:
            raise ConfigError("TimeDistributed needs an unbuilt layer (it builds it for the per-step shape)")
        self.layer = layer
        if self._input_shape_arg is None and layer._input_shape_arg is not None:
            raise ConfigError(
                "give input_shape to TimeDistributed (the whole (timesteps, features) input), not to the wrapped layer"
            )
        if layer.name is None:
            layer.name = layer._keras_name
        layer._attach(self.device, self.dtype, self.rng)
        self.add_module(layer.name, layer)
        self._lead = None

    def _config(self):
        return {"layer": {"class_name": type(self.layer).__name__, "config": self.layer.get_config()}}

    @classmethod
    def from_config(cls, config: dict) -> TimeDistributed:
        config = dict(config)
        config["layer"] = layer_from_config(config["layer"])
        return cls(**config)

    def _build(self, shape):
        self.layer.build(shape[1:])

    def _keras_specs(self):
        return self.layer._keras_specs()

    def get_weights(self) -> list:
        self._require_built()
        return self.layer.get_weights()

    def _stage_own(self, host):
        return self.layer._stage_own(host)

    def compute_output_shape(self, shape: Any) -> tuple:
        return (shape[0],) + tuple(self.layer.compute_output_shape(shape[1:]))

    @property
    def output_kind(self) -> str:
        return self.layer.output_kind

    @property
    def logits(self) -> Array:
        lg = self.layer.logits
        with self.device:
            return self.device.xp.reshape(lg, self._lead + _shape(lg)[1:])

    def forward(self, x: Array, lengths: Any = None) -> Array:
        self._require_built()
        self._check_x(x)
        xp = self.device.xp
        with self.device:
            B, T = _shape(x)[0], _shape(x)[1]
            y = self.layer.forward(xp.reshape(x, (B * T,) + _shape(x)[2:]))  # (B*T, ...)
            self._lead = (B, T)
            return xp.reshape(y, (B, T) + _shape(y)[1:])

    def backward(self, dout: Array, *, input_grad: bool = True, from_logits: bool = False) -> Array | None:
        if self._lead is None:
            raise StateError("TimeDistributed.backward() needs a preceding forward()")
        xp = self.device.xp
        B, T = self._lead
        with self.device:
            d = xp.reshape(dout, (B * T,) + _shape(dout)[2:])
            kw = {"from_logits": from_logits} if from_logits else {}
            dx = self.layer.backward(d, input_grad=input_grad, **kw)
            if dx is None:
                return None
            return xp.reshape(dx, (B, T) + _shape(dx)[1:])


# ---------------------------------------------------------------------------
# recurrent layers
# ---------------------------------------------------------------------------

class _Recurrent(Layer):
    """Shared machinery of SimpleRNN / LSTM / GRU (one direction, one layer).

    The recurrence is an :mod:`xrnn.modules` layer (``self._inner``, built
    with ``batch_first=True``); this class adds Keras' options, masking,
    state handling and the parameter mapping. The inner module is not a
    child: its arrays *are* this layer's parameters and gradients, re-linked
    before every use (so ``load_state_dict``, ``.to()`` and in-place
    optimizer updates all reach it).
    """

    _module_cls: type[M._RNNBase] = M.RNN
    _inner: Any  # the _module_cls instance once built, None before
    _states: Any  # stateful: the carried states (list of arrays), else None
    _zero_bias: Any  # GRU without bias: ((device, dtype), zeros, scratch) for the fixed b_hh
    _n_states = 1
    _two_biases = False
    _min_rank = 2
    _max_rank = 2

    def __init__(self, units: int, *, use_bias: bool = True, return_sequences: bool = False,
                 return_state: bool = False, go_backwards: bool = False, stateful: bool = False,
                 dropout: float = 0.0, recurrent_dropout: float = 0.0, zero_output_for_mask: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        self.units = _positive_int("units", units)
        self.zero_output_for_mask = _flag("zero_output_for_mask", zero_output_for_mask)
        self.use_bias = _flag("use_bias", use_bias)
        self.return_sequences = _flag("return_sequences", return_sequences)
        self.return_state = _flag("return_state", return_state)
        self.go_backwards = _flag("go_backwards", go_backwards)
        self.stateful = _flag("stateful", stateful)
        self.dropout = _rate("dropout", dropout)
        if recurrent_dropout:
            raise ConfigError(
                f"recurrent_dropout={recurrent_dropout!r} is not supported (it would need masks inside the "
                "fused recurrence); use dropout= (on the inputs) or a Dropout layer between layers"
            )
        self._inner = None
        self._zero_bias = None
        self._states = None
        self._cache = None
        self.initial_state_grad = None

    def _rank_hint(self, shape) -> str:
        if len(shape) == 1:
            return "; recurrent layers take (batch, timesteps, features): add a feature axis, e.g. X[..., None]"
        return ""

    def _config(self):
        return {
            "units": self.units, "use_bias": self.use_bias, "return_sequences": self.return_sequences,
            "return_state": self.return_state, "go_backwards": self.go_backwards, "stateful": self.stateful,
            "dropout": self.dropout,
            **({"zero_output_for_mask": True} if self.zero_output_for_mask else {}),
        }

    def _module_kwargs(self) -> dict:
        return {}

    def _build(self, shape):
        inner = self._module_cls(shape[-1], self.units, bias=self.use_bias, batch_first=True, device=self.device,
                                 dtype=self.dtype, seed=self.rng, **self._module_kwargs())
        self._inner = inner
        w_ih, w_hh, b_ih, b_hh = inner._param_names(0, 0)
        names = [w_ih, w_hh]
        if self.use_bias:
            names.append(b_ih)
            if self._two_biases:
                names.append(b_hh)
        for k in names:
            self._params[k] = inner._params[k]
            self._grads[k] = inner._grads[k]
        self._link()

    def compute_output_shape(self, shape):
        if self.return_sequences:
            return (shape[0], self.units)
        return (self.units,)

    #: Keras' gate blocks in terms of PyTorch's (GRU: Keras z, r, h = PyTorch blocks 1, 0, 2)
    _keras_gates: tuple = (0,)

    def _keras_specs(self):
        G, U = len(self._keras_gates), self.units
        specs: list[tuple[str, tuple[int, ...]]] = [("kernel", (self.input_shape[-1], G * U)),
                                                    ("recurrent_kernel", (U, G * U))]
        if self.use_bias:
            specs.append(("bias", (2, G * U) if self._two_biases else (G * U,)))
        return specs

    def _reorder(self, a, inverse: bool = False):
        """Permute the gate blocks along axis 0 of a (G*units, ...) array: PyTorch -> Keras (or back)."""
        perm = np.asarray(self._keras_gates)
        if inverse:
            perm = np.argsort(perm)
        G = len(perm)
        return a.reshape((G, self.units) + a.shape[1:])[perm].reshape(a.shape)

    def _to_keras(self, own):
        w_ih, w_hh, b_ih, b_hh = self._inner._param_names(0, 0)
        out = [self._reorder(own[w_ih]).T.copy(), self._reorder(own[w_hh]).T.copy()]
        if self.use_bias:
            b = self._reorder(own[b_ih])
            out.append(np.stack([b, self._reorder(own[b_hh])]) if self._two_biases else b)
        return out

    def _from_keras(self, w):
        w_ih, w_hh, b_ih, b_hh = self._inner._param_names(0, 0)
        out = {w_ih: self._reorder(w[0].T, inverse=True), w_hh: self._reorder(w[1].T, inverse=True)}
        if self.use_bias:
            if self._two_biases:
                out[b_ih], out[b_hh] = self._reorder(w[2][0], inverse=True), self._reorder(w[2][1], inverse=True)
            else:
                out[b_ih] = self._reorder(w[2], inverse=True)
        return out

    @property
    def state_shapes(self) -> list:
        """Shapes (without batch) of the extra outputs when ``return_state`` is True."""
        return [(self.units,)] * self._n_states

    def _link(self) -> None:
        """Point the inner module at this layer's arrays (and the held-at-zero hidden bias)."""
        inner = self._inner
        inner.device, inner.dtype = self.device, self.dtype
        for k, v in self._params.items():
            inner._params[k] = v
            inner._grads[k] = self._grads[k]
        if self.use_bias and not self._two_biases:
            b_hh = inner._param_names(0, 0)[3]
            zb = self._zero_bias
            if zb is None or zb[0] != (self.device, self.dtype):
                G = inner._gates
                zeros = self.device.zeros((G * self.units,), self.dtype)
                scratch = self.device.zeros((G * self.units,), self.dtype)
                self._zero_bias = ((self.device, self.dtype), zeros, scratch)
                zb = self._zero_bias
            inner._params[b_hh] = zb[1]
            inner._grads[b_hh] = zb[2]  # receives the (unused) gradient of the fixed zero bias

    def _drop_cache(self) -> None:
        self._cache = None
        if self._inner is not None:
            self._inner._drop_cache()
            self._link()
        if self._states is not None:
            self._states = [to_device(s, self.device, dtype=self.dtype) for s in self._states]

    # -- state ------------------------------------------------------------------
    @property
    def states(self):
        """The carried states of a stateful layer (list of (batch, units) arrays), or None."""
        return None if self._states is None else list(self._states)

    def reset_states(self, states=None) -> None:
        """Forget the carried states (next batch starts from zeros), or set them to ``states``."""
        if states is None:
            self._states = None
            return
        self._states = list(self._check_initial(states, _shape(states[0])[0] if states else 0, "states"))

    reset_state = reset_states

    def _check_initial(self, states, B: int, what: str):
        if not isinstance(states, (list, tuple)) or len(states) != self._n_states:
            parts = "[h, c]" if self._n_states == 2 else "[h]"
            raise ShapeError(f"{what} of {type(self).__name__} must be a list {parts} of (batch, units) arrays")
        for i, s in enumerate(states):
            self._check_float(s, f"{what}[{i}]")
            if _shape(s) != (B, self.units):
                raise ShapeError(f"{what}[{i}] must have shape (batch, units) = {(B, self.units)}, got {_shape(s)}")
        return list(states)

    def _pack(self, state):
        if state is None:
            return None
        if self._n_states == 2:
            return (state[0][None, ...], state[1][None, ...])
        return state[0][None, ...]

    def _unpack(self, st):
        if self._n_states == 2:
            return [st[0][0, ...], st[1][0, ...]]
        return [st[0, ...]]

    def _pack_grad(self, parts):
        if parts is None or all(p is None for p in parts):
            return None
        if self._n_states == 2:
            return tuple(None if p is None else p[None, ...] for p in parts)
        return parts[0][None, ...]

    # -- the sequence, in original time order --------------------------------------
    def _sequence(self, x, lengths, initial):
        """Run over x (B, T, F) with host lengths (or None) and initial states (list or None).

        Returns ``(aligned, finals)``: outputs (B, T, units) in the original
        time order (zero at padded steps) and the final states, each (B, units),
        taken at each sequence's last valid step (for ``go_backwards``: after
        step 0). Keeps what :meth:`_sequence_backward` needs.
        """
        self._link()
        dev = self.device
        B, T = _shape(x)[0], _shape(x)[1]
        keep_cache = _grad_enabled()
        cache = {"B": B, "T": T, "F": _shape(x)[2], "lengths": lengths}
        if self.dropout > 0 and self.training:
            mask = dropout_mask(dev, self.rng, (B, 1, _shape(x)[2]), self.dropout, self.dtype)  # (B, 1, F)
            x = x * mask
            cache["drop"] = mask
        if self.go_backwards:
            rev = _RowReverser(dev, B, T, lengths)
            x = rev(x)
            cache["rev"] = rev
        out, finals, plan = self._segments(x, lengths, initial, keep_cache)
        if self.go_backwards:
            out = cache["rev"](out)
        cache["plan"] = plan
        self._cache = cache if keep_cache else None
        return out, finals

    def _sequence_backward(self, d_aligned, dfinals, input_grad: bool):
        """Backward of :meth:`_sequence`; returns (dx (B, T, F) or None, dinitial list)."""
        cache = self._cache
        if cache is None:
            raise StateError(
                f"{type(self).__name__}.backward() needs a preceding forward() in gradient mode "
                "(one backward per forward; forwards under xrnn.no_grad() keep nothing)"
            )
        self._cache = None
        self._link()
        if d_aligned is not None and self.go_backwards:
            d_aligned = cache["rev"](d_aligned)
        dx, dinit = self._segments_backward(cache, d_aligned, dfinals, input_grad)
        if dx is not None:
            if self.go_backwards:
                dx = cache["rev"](dx)
            if "drop" in cache:
                dx = dx * cache["drop"]
        return dx, dinit

    def _zeros(self, *shape):
        return self.device.zeros(shape, self.dtype)

    def _segments(self, x, lengths, initial, keep_cache):
        """Forward direction over x (B, T, F); see the module docstring for the masked plan.

        The inner module runs the length-sorted segments (:mod:`xrnn.segments`,
        the machinery of ``xrnn.LSTM(...)(x, lengths=...)``); Keras masks may
        empty a row entirely, so lengths start at 0 here.
        """
        inner = self._inner
        T = _shape(x)[1]
        if lengths is not None and bool(np.all(lengths == T)):
            lengths = None
        out, st = inner._forward(x, self._pack(initial), lengths, 0)  # (B, T, U), zero past each length
        cache = inner._cache
        inner._cache = None
        return out, self._unpack(st), ({"cache": cache} if keep_cache else None)

    def _segments_backward(self, cache, d_aligned, dfinals, input_grad):
        inner = self._inner
        B, T, U = cache["B"], cache["T"], self.units
        if d_aligned is None:
            d_aligned = self._zeros(B, T, U)
        inner._cache = cache["plan"]["cache"]
        dx, ds0 = inner.backward(d_aligned, self._pack_grad(dfinals), input_grad=input_grad)
        return dx, self._unpack(ds0)

    # -- public forward / backward --------------------------------------------------
    def _initial(self, initial_state, B: int):
        if initial_state is not None:
            return self._check_initial(list(initial_state), B, "initial_state")
        if self.stateful and self._states is not None:
            if _shape(self._states[0])[0] != B:
                raise ShapeError(
                    f"stateful layer {self.name or type(self).__name__} carries states for batch size "
                    f"{_shape(self._states[0])[0]} but got a batch of {B}; stateful layers need the same batch "
                    "size every call (call reset_states() to start over with another size)"
                )
            return list(self._states)
        return None

    def forward(self, x, lengths=None, initial_state=None):
        """Run the layer.

        Args:
            x: (B, T, features) floating point, on the layer's device, in its dtype.
            lengths: None, or (B,) valid steps per sequence (right padding).
            initial_state: None (zeros, or the carried states when stateful),
                or a list ``[h]`` / ``[h, c]`` of (B, units) arrays.
        Returns:
            (B, T, units) with ``return_sequences`` else (B, units); with
            ``return_state`` a list ``[output, h]`` (``[output, h, c]`` for LSTM).
        """
        self._require_built()
        self._check_x(x)
        B, T = _shape(x)[0], _shape(x)[1]
        lengths = check_lengths(lengths, B, T)
        init = self._initial(initial_state, B)
        with self.device:
            aligned, finals = self._sequence(x, lengths, init)
            if self._cache is not None:
                self._cache["given_init"] = initial_state is not None
            if self.stateful:
                self._states = list(finals)
            pad = _PaddedOutputs(lengths, T, carry=not (self.go_backwards or self.zero_output_for_mask),
                                 last_needs_all=self.zero_output_for_mask and not self.go_backwards)
            if self._cache is not None:
                self._cache["pad"] = pad
            if self.return_sequences:
                # go_backwards: Keras' order, the reversed padded sequence (padding first, zeros there)
                out = self.device.xp.flip(aligned, axis=1) if self.go_backwards else pad.carry(self.device, aligned)
            else:
                out = pad.last(self.device, finals[0])
            return [out] + list(finals) if self.return_state else out

    def output_lengths(self, lengths):
        return lengths if self.return_sequences else None

    def backward(self, dout, dstates=None, *, input_grad: bool = True):
        """Backpropagate through the last forward (BPTT).

        Args:
            dout: gradient of the output (shape of the output).
            dstates: with ``return_state``, gradients of the returned states
                (list, entries may be None), or None.
            input_grad: False skips the input gradient (returns None).
        Returns:
            dx (B, T, features) or None. The gradients of a given
            ``initial_state`` are left in ``self.initial_state_grad``.
            The carried states of a stateful layer get no gradient
            (truncated BPTT).
        """
        cache = self._cache
        if cache is None:
            raise StateError(
                f"{type(self).__name__}.backward() needs a preceding forward() in gradient mode "
                "(one backward per forward; forwards under xrnn.no_grad() keep nothing)"
            )
        B, T, U = cache["B"], cache["T"], self.units
        expected = (B, T, U) if self.return_sequences else (B, U)
        self._check_grad(dout, expected)
        dfinals = [None] * self._n_states
        if dstates is not None:
            if not isinstance(dstates, (list, tuple)) or len(dstates) != self._n_states:
                raise ShapeError(f"dstates must be a list of {self._n_states} gradients (entries may be None)")
            for i, v in enumerate(dstates):
                if v is not None:
                    self._check_grad(v, (B, U), f"dstates[{i}]")
                    dfinals[i] = v
        pad = cache.get("pad") or _PaddedOutputs(None, T)
        with self.device:
            if self.return_sequences:
                d_aligned = self.device.xp.flip(dout, axis=1) if self.go_backwards \
                    else pad.carry_backward(self.device, dout)
            else:
                d_aligned = None
                dlast = pad.last(self.device, dout)
                dfinals[0] = dlast if dfinals[0] is None else dfinals[0] + dlast
            given = cache.get("given_init", False)
            dx, dinit = self._sequence_backward(d_aligned, dfinals, input_grad)
            self.initial_state_grad = dinit if given else None
            return dx


class SimpleRNN(_Recurrent):
    """Elman RNN (Keras ``SimpleRNN``): ``h_t = activation(x_t W_ih^T + h_{t-1} W_hh^T + b)``.

    ``activation``: "tanh" (default) or "relu". Parameters ``weight_ih_l0``
    (units, features), ``weight_hh_l0`` (units, units), ``bias_ih_l0`` (units,).
    """

    _keras_name = "simple_rnn"
    _module_cls = M.RNN

    def __init__(self, units: int, activation: str = "tanh", **kwargs: Any):
        if activation not in ("tanh", "relu"):
            raise ConfigError(f"SimpleRNN activation must be 'tanh' or 'relu', got {activation!r}")
        self.activation = activation
        super().__init__(units, **kwargs)

    def _config(self):
        return {**super()._config(), "activation": self.activation}

    def _module_kwargs(self):
        return {"nonlinearity": self.activation}


class LSTM(_Recurrent):
    """Long short-term memory (Keras ``LSTM``) with PyTorch's gate layout (i, f, g, o).

    Args:
        units: hidden size.
        return_sequences, return_state, go_backwards, stateful: as in Keras.
        dropout: fraction of the *inputs* dropped in training, one mask per
            sequence shared by all steps (Keras' input dropout).
        zero_output_for_mask: with a mask, output zeros at padded steps
            (and as the last output of a padded sequence) instead of Keras'
            default, the last valid output repeated (see the module docstring).
        unit_forget_bias: start the forget-gate bias at 1 (Keras' default True).
        activation / recurrent_activation: only Keras' defaults "tanh" /
            "sigmoid" (the fused recurrence is the standard LSTM).

    Parameters ``weight_ih_l0`` (4*units, features), ``weight_hh_l0``
    (4*units, units), ``bias_ih_l0`` (4*units,): ``4 * (units * (features +
    units) + units)`` values, Keras' count.
    """

    _keras_name = "lstm"
    _module_cls = M.LSTM
    _n_states = 2
    _keras_gates = (0, 1, 2, 3)  # Keras i, f, c, o = PyTorch i, f, g, o

    def __init__(self, units: int, activation: str = "tanh", recurrent_activation: str = "sigmoid",
                 unit_forget_bias: bool = True, **kwargs: Any):
        _check_standard_activations("LSTM", activation, recurrent_activation)
        self.unit_forget_bias = _flag("unit_forget_bias", unit_forget_bias)
        super().__init__(units, **kwargs)

    def _config(self):
        return {**super()._config(), "unit_forget_bias": self.unit_forget_bias}

    def _module_kwargs(self):
        return {"forget_bias": 1.0 if (self.unit_forget_bias and self.use_bias) else None}


class GRU(_Recurrent):
    """Gated recurrent unit (Keras ``GRU`` with its default ``reset_after=True``,
    which is PyTorch's GRU: ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``).

    Parameters ``weight_ih_l0`` (3*units, features), ``weight_hh_l0``,
    ``bias_ih_l0``, ``bias_hh_l0``: ``3 * (units * (features + units) + 2 *
    units)`` values, Keras' count. Other arguments as :class:`LSTM`.
    """

    _keras_name = "gru"
    _module_cls = M.GRU
    _two_biases = True
    _keras_gates = (1, 0, 2)  # Keras z, r, h = PyTorch blocks z (1), r (0), n (2)

    def __init__(self, units: int, activation: str = "tanh", recurrent_activation: str = "sigmoid",
                 reset_after: bool = True, **kwargs: Any):
        _check_standard_activations("GRU", activation, recurrent_activation)
        if reset_after is not True:
            raise ConfigError("GRU supports reset_after=True only (Keras' default, PyTorch's formulation)")
        super().__init__(units, **kwargs)


def _check_standard_activations(cls: str, activation, recurrent_activation) -> None:
    if activation != "tanh" or recurrent_activation != "sigmoid":
        raise ConfigError(
            f"{cls} supports activation='tanh' and recurrent_activation='sigmoid' only (got {activation!r}, "
            f"{recurrent_activation!r}): the fused recurrence is the standard {cls}. For a ReLU recurrence use "
            "SimpleRNN(units, activation='relu')"
        )


class _PaddedOutputs:
    """What Keras outputs at masked (padded) steps, from the outputs that skip them; forward and backward.

    Keras' RNN loop keeps, at a masked step, the previous step's output and
    state (``zero_output_for_mask=False``, its default): with
    ``return_sequences`` each padded step repeats the sequence's last valid
    output, and an empty sequence's outputs stay at their initial zeros.
    With ``zero_output_for_mask=True`` (and in ``Bidirectional`` with
    ``return_sequences``, which forces it) padded outputs are zeros. The last
    output (``return_sequences=False``) is the sequence's last valid output,
    zeros for an empty sequence; with ``zero_output_for_mask`` (forward
    direction) zeros for every padded sequence, because its last step is masked.

    Built from host lengths (B,) or None; the device work is one gather
    (forward) and a masked sum over time (backward: the gradients at the
    padded steps add into the output they copy), with index and mask arrays
    moved to the device once per call. Nothing is computed at padded steps.
    """

    def __init__(self, lengths, T: int, *, carry: bool = False, last_needs_all: bool = False):
        self.lengths, self.T = lengths, T
        self.copies = carry and lengths is not None and bool(np.any((lengths < T) & (lengths > 0)))
        keep = None
        if lengths is not None:
            keep = lengths == T if last_needs_all else lengths > 0  # (B,) rows whose last output is kept
            keep = None if bool(np.all(keep)) else keep
        self.keep = keep

    def carry(self, dev, aligned):
        """aligned (B, T, U), zero at padded steps -> Keras' outputs: each padded step a copy of the last valid."""
        if not self.copies:
            return aligned
        B, T, U = _shape(aligned)
        L = self.lengths[:, None]  # (B, 1) host
        t = np.arange(T)[None, :]  # (1, T)
        src = np.where((t >= L) & (L > 0), L - 1, t)  # (B, T) step each output copies (empty rows: own zeros)
        flat = (np.arange(B)[:, None] * T + src).reshape(-1)  # (B*T,) rows of the flattened outputs
        xp = dev.xp
        out = xp.take(xp.reshape(aligned, (B * T, U)), dev.asarray(flat, dtype="int64"), axis=0)  # (B*T, U)
        return xp.reshape(out, (B, T, U))

    def carry_backward(self, dev, dout):
        """Gradient of Keras' outputs (B, T, U) -> gradient of the aligned outputs: each padded step's
        gradient added to its row's last valid step (padded entries of the result are left as they are;
        the recurrence ignores them)."""
        if not self.copies:
            return dout
        T = _shape(dout)[1]
        L = self.lengths[:, None]  # (B, 1) host
        t = np.arange(T)[None, :]  # (1, T)
        dt = dout.dtype
        copied = dev.asarray(((t >= L) & (L > 0))[..., None], dtype=dt)  # (B, T, 1) 1 at copying padded steps
        last = dev.asarray((t == L - 1)[..., None], dtype=dt)  # (B, T, 1) 1 at each row's last valid step
        xp = dev.xp
        tail = xp.sum(dout * copied, axis=1, keepdims=True)  # (B, 1, U) gradient arriving at the copies
        return dout + last * tail  # (B, T, U)

    def last(self, dev, h):
        """h (B, U) (or its gradient) with the rows whose last output is zero set to exactly zero."""
        if self.keep is None:
            return h
        xp = dev.xp
        keep = dev.asarray(self.keep[:, None])  # (B, 1) bool
        return xp.where(keep, h, xp.zeros_like(h))


class _RowReverser:
    """Reverse each sequence's valid part in time, leaving its padding in place.

    Without lengths this is ``flip(x, axis=1)``. It is an involution (its own
    inverse), so the same object maps gradients back.
    """

    def __init__(self, dev, B: int, T: int, lengths):
        self.dev, self.B, self.T = dev, B, T
        self.idx = None
        if lengths is not None and not bool(np.all(lengths == T)):
            t = np.arange(T)[None, :]
            L = lengths[:, None]
            src = np.where(t < L, L - 1 - t, t)  # (B, T)
            flat = (np.arange(B)[:, None] * T + src).reshape(-1)
            self.idx = dev.asarray(flat, dtype="int64")

    def __call__(self, a):
        xp = self.dev.xp
        if self.idx is None:
            return xp.flip(a, axis=1)
        rest = _shape(a)[2:]
        flat = xp.reshape(a, (self.B * self.T,) + rest)
        return xp.reshape(xp.take(flat, self.idx, axis=0), (self.B, self.T) + rest)


class Bidirectional(Layer):
    """Run a recurrent layer forwards and a copy of it backwards, and merge (Keras ``Bidirectional``).

    Args:
        layer: an unbuilt ``LSTM``/``GRU``/``SimpleRNN``; its copy with
            ``go_backwards`` flipped is the backward direction. The two have
            separate weights, children ``forward_<name>`` and ``backward_<name>``.
        merge_mode: "concat" (default; equals PyTorch's ``bidirectional=True``
            output), "sum", "mul" or "ave".

    With ``return_sequences`` the backward outputs are re-aligned with the
    input's time order before merging; without it, the merged values are the
    forward direction's last step and the backward direction's output at
    t = 0 (each direction's final state), as Keras. ``return_state`` adds
    ``[h_fw, (c_fw,) h_bw, (c_bw)]``. Masks: each direction sees each sequence's
    valid part only (the backward one starts at its last valid step); as in
    Keras (which forces ``zero_output_for_mask=return_sequences`` on both
    directions) padded steps output zeros, and a sequence of length 0 has
    zero last outputs. The wrapped layer's own ``zero_output_for_mask`` is
    not used.
    """

    _keras_name = "bidirectional"
    _min_rank = 2
    _max_rank = 2

    def __init__(self, layer: _Recurrent, merge_mode: str = "concat", **kwargs: Any):
        super().__init__(**kwargs)
        if not isinstance(layer, _Recurrent):
            raise ConfigError(f"Bidirectional wraps an LSTM, GRU or SimpleRNN layer, got {type(layer).__name__}")
        if layer.built:
            raise ConfigError("Bidirectional needs an unbuilt recurrent layer (it builds both directions)")
        if merge_mode not in MERGE_MODES:
            raise ConfigError(
                f"unknown merge_mode {merge_mode!r}; expected one of {', '.join(repr(m) for m in MERGE_MODES)}"
            )
        self.merge_mode = merge_mode
        if self._input_shape_arg is None:
            self._input_shape_arg = layer._input_shape_arg  # Bidirectional(LSTM(8, input_shape=(T, F)))
        base = layer.name or layer._keras_name
        cfg = layer.get_config()
        cfg.pop("input_shape", None)
        layer.name = "forward_" + base
        cfg.update(name="backward_" + base, go_backwards=not layer.go_backwards)
        back = type(layer)(**cfg)
        self.forward_layer = layer
        self.backward_layer = back
        for sub in (layer, back):
            sub._attach(self.device, self.dtype, self.rng)
        self.add_module(layer.name, layer)
        self.add_module("backward_" + base, back)  # back.name
        self.return_sequences = layer.return_sequences
        self.return_state = layer.return_state
        self.stateful = layer.stateful
        self._cache = None

    def _config(self):
        cfg = self.forward_layer.get_config()
        cfg["name"] = cfg["name"][len("forward_"):]
        cfg.pop("input_shape", None)
        return {"layer": {"class_name": type(self.forward_layer).__name__, "config": cfg},
                "merge_mode": self.merge_mode}

    @classmethod
    def from_config(cls, config: dict) -> Bidirectional:
        config = dict(config)
        config["layer"] = layer_from_config(config["layer"])
        return cls(**config)

    def _build(self, shape):
        self.forward_layer.build(shape)
        self.backward_layer.build(shape)

    def _keras_specs(self):
        return ([("forward " + n, sh) for n, sh in self.forward_layer._keras_specs()]
                + [("backward " + n, sh) for n, sh in self.backward_layer._keras_specs()])

    def get_weights(self) -> list:
        self._require_built()
        return self.forward_layer.get_weights() + self.backward_layer.get_weights()

    def _stage_own(self, host):
        n = len(self.forward_layer._keras_specs())
        return self.forward_layer._stage_own(host[:n]) + self.backward_layer._stage_own(host[n:])

    def compute_output_shape(self, shape: Any) -> tuple:
        u = self.forward_layer.units * (2 if self.merge_mode == "concat" else 1)
        return (shape[0], u) if self.return_sequences else (u,)

    @property
    def state_shapes(self) -> list:
        return self.forward_layer.state_shapes + self.backward_layer.state_shapes

    def _drop_cache(self):
        self._cache = None

    def reset_states(self, states: Any = None) -> None:
        n = self.forward_layer._n_states
        if states is None:
            self.forward_layer.reset_states()
            self.backward_layer.reset_states()
        else:
            self.forward_layer.reset_states(list(states[:n]))
            self.backward_layer.reset_states(list(states[n:]))

    reset_state = reset_states

    @property
    def states(self) -> list[Array] | None:
        f, b = self.forward_layer.states, self.backward_layer.states
        return None if f is None or b is None else f + b

    @property
    def initial_state_grad(self) -> list[Array] | None:
        f, b = self.forward_layer.initial_state_grad, self.backward_layer.initial_state_grad
        return None if f is None else f + b

    def _merge(self, xp, a, b):
        m = self.merge_mode
        if m == "concat":
            return xp.concat([a, b], axis=-1)
        if m == "sum":
            return a + b
        if m == "ave":
            return (a + b) * 0.5
        return a * b

    def _unmerge(self, xp, d, a, b):
        m = self.merge_mode
        if m == "concat":
            U = _shape(a)[-1]
            return d[..., :U], d[..., U:]
        if m == "sum":
            return d, d
        if m == "ave":
            h = d * 0.5
            return h, h
        return d * b, d * a

    def forward(self, x: Array, lengths: Any = None, initial_state: Any = None) -> Any:
        """Like the wrapped layer's forward; ``initial_state`` lists the forward states then the backward ones."""
        self._require_built()
        self._check_x(x)
        B, T = _shape(x)[0], _shape(x)[1]
        lengths = check_lengths(lengths, B, T)
        fl, bl = self.forward_layer, self.backward_layer
        n = fl._n_states
        init_f = init_b = None
        if initial_state is not None:
            if not isinstance(initial_state, (list, tuple)) or len(initial_state) != 2 * n:
                raise ShapeError(
                    f"Bidirectional initial_state must list {2 * n} arrays: the forward states, then the backward ones"
                )
            init_f = fl._initial(list(initial_state[:n]), B)
            init_b = bl._initial(list(initial_state[n:]), B)
        else:
            init_f, init_b = fl._initial(None, B), bl._initial(None, B)
        xp = self.device.xp
        with self.device:
            yf, ff = fl._sequence(x, lengths, init_f)
            yb, fb = bl._sequence(x, lengths, init_b)
            for sub in (fl, bl):
                if sub._cache is not None:
                    sub._cache["given_init"] = initial_state is not None
            if self.stateful:
                fl._states, bl._states = list(ff), list(fb)
            # Keras forces zero_output_for_mask=return_sequences on both directions: zeros at padded steps
            # with return_sequences, else each direction's last output (zeros for an empty sequence)
            pad = _PaddedOutputs(lengths, T)
            a, b = (yf, yb) if self.return_sequences else (pad.last(self.device, ff[0]), pad.last(self.device, fb[0]))
            out = self._merge(xp, a, b)
            self._cache = {"a": a, "b": b, "B": B, "T": T, "pad": pad} if _grad_enabled() else None
            return [out] + list(ff) + list(fb) if self.return_state else out

    def output_lengths(self, lengths: Any) -> Any:
        return lengths if self.return_sequences else None

    def backward(self, dout: Array, dstates: Any = None, *, input_grad: bool = True) -> Array | None:
        cache = self._cache
        if cache is None:
            raise StateError("Bidirectional.backward() needs a preceding forward() in gradient mode")
        fl, bl = self.forward_layer, self.backward_layer
        n, U = fl._n_states, fl.units
        B, T = cache["B"], cache["T"]
        uo = U * (2 if self.merge_mode == "concat" else 1)
        self._check_grad(dout, (B, T, uo) if self.return_sequences else (B, uo))
        ds = [None] * (2 * n)
        if dstates is not None:
            if not isinstance(dstates, (list, tuple)) or len(dstates) != 2 * n:
                raise ShapeError(f"dstates must be a list of {2 * n} gradients (entries may be None)")
            for i, v in enumerate(dstates):
                if v is not None:
                    self._check_grad(v, (B, U), f"dstates[{i}]")
                    ds[i] = v
        self._cache = None
        xp = self.device.xp
        with self.device:
            da, db = self._unmerge(xp, dout, cache["a"], cache["b"])
            df, dbk = ds[:n], ds[n:]
            if self.return_sequences:
                sf, sb = da, db
            else:
                sf = sb = None
                da, db = cache["pad"].last(self.device, da), cache["pad"].last(self.device, db)
                df[0] = da if df[0] is None else df[0] + da
                dbk[0] = db if dbk[0] is None else dbk[0] + db
            given = fl._cache is not None and fl._cache.get("given_init", False)
            dxf, dinf = fl._sequence_backward(sf, df, input_grad)
            dxb, dinb = bl._sequence_backward(sb, dbk, input_grad)
            fl.initial_state_grad = dinf if given else None
            bl.initial_state_grad = dinb if given else None
            return None if dxf is None else dxf + dxb


# ---------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------

#: layer classes by Keras class name, for :func:`layer_from_config`
LAYERS = {
    c.__name__: c
    for c in (Dense, Dropout, Masking, Embedding, TimeDistributed, SimpleRNN, LSTM, GRU, Bidirectional)
}


def layer_from_config(spec: dict) -> Layer:
    """Rebuild an (unbuilt) layer from ``{"class_name": ..., "config": layer.get_config()}``."""
    if not isinstance(spec, dict) or "class_name" not in spec or "config" not in spec:
        raise ConfigError(f"a layer spec is a dict with 'class_name' and 'config', got {spec!r}")
    cls = LAYERS.get(spec["class_name"])
    if cls is None:
        raise ConfigError(f"unknown layer class {spec['class_name']!r}; known: {', '.join(LAYERS)}")
    config = dict(spec["config"])
    try:
        return cls.from_config(config)
    except TypeError as e:
        raise ConfigError(f"invalid config for {spec['class_name']}: {e}") from None
