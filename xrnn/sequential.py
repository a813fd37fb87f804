"""``Sequential``: Keras' stack-of-layers model with compile / fit / predict / evaluate / summary.

    import numpy as np
    from xrnn.sequential import Sequential
    from xrnn.layers import Input, LSTM, Dense

    model = Sequential([Input(shape=(3, 1)), LSTM(50), Dense(1)], device="cpu", seed=0)
    model.compile(optimizer="adam", loss="mse")
    history = model.fit(X, y, epochs=200, batch_size=32, verbose=0)   # X (N, 3, 1), y (N, 1)
    yhat = model.predict(X_new)                                       # on the model's device
    model.summary()

Conventions (Keras'): inputs are batch-major ``(samples, timesteps,
features)``; the model is built (its weights created) from an
:class:`~xrnn.layers.Input` first element, an ``input_shape=`` on the first
layer, an explicit ``build((None, timesteps, features))``, or else the first
``fit`` batch. Data may be NumPy arrays or arrays of any supported library;
``fit``/``evaluate``/``predict`` move them to the model's device one batch at
a time (floats cast to the model's dtype, token ids to int64).

The model is an :class:`xrnn.Module` whose children are its layers, named as
Keras names them (``lstm``, ``lstm_1``, ``dense``, ...), so ``parameters()``,
``grads``, ``state_dict()``, ``.to(device)``, ``zero_grad()``, ``train()``
and ``eval()`` work as for every xrnn model, and ``forward``/``backward`` can
be called by hand. One host generator (``model.rng``, from ``seed``) draws
the initial weights layer by layer in order, the shuffling and the dropout
masks, so one seed gives the same run on every backend.

Training loop (``fit``): per batch, move x and y, forward, loss and its
gradient, backward through every layer, optional ``clipnorm``/``clipvalue``,
optimizer step. The loss is accumulated on the device and read once per
epoch (no host synchronisation per batch). ``history.history`` holds one
host float per epoch for ``loss`` (and ``val_loss``, metrics). Masked
batches (a :class:`~xrnn.layers.Masking` or ``Embedding(mask_zero=True)``
first layer) measure the padding on the host when the batch is a NumPy
array; for device arrays the (batch,) lengths are copied to the host.

Stateful models (``LSTM(..., stateful=True)``) carry each sample row's
state from one batch to the next, with truncated backpropagation (no
gradient crosses a batch boundary): give ``shuffle=False`` and a sample
count divisible by ``batch_size`` (row i of batch k+1 continues row i of
batch k), and call ``reset_states()`` between independent series.
``fit``/``evaluate``/``predict`` check before running any batch that all
their batches have one size (``min(samples, batch_size)``; for ``fit`` the
validation set too) and that it is the batch size of the states the
layers carry, and raise ShapeError otherwise with the model untouched.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from . import keras_optim, optim
from . import losses as L
from ._typing import Array
from .backend import assert_finite, check_id_range, device_of, dtype_name, host_rng, to_device, to_numpy, trusted_ids
from .backend import int_shape as _shape
from .errors import (
    CheckpointCorruptError,
    CheckpointError,
    ConfigError,
    DeviceError,
    DTypeError,
    NonFiniteError,
    ShapeError,
    StateError,
    plural,
)
from .layers import Embedding, Input, Layer, _fmt_shape, check_lengths, layer_from_config
from .modules import Module, no_grad, parameter_budget

__all__ = ["Sequential", "History", "METRICS", "load_model"]

#: metrics ``compile(metrics=[...])`` accepts
METRICS = ("accuracy", "mse", "mae")

_META_VERSION = 1


class History:
    """What ``fit`` returns (as Keras): ``history.history`` maps "loss", "val_loss",
    metric names (and "learning_rate" with ReduceLROnPlateau) to one float per epoch;
    ``history.epoch`` lists the epochs, ``history.params`` fit's ``{"verbose", "epochs",
    "steps"}``, ``history.model`` the model."""

    def __init__(self):
        self.history: dict[str, list[float]] = {}
        self.epoch: list[int] = []
        self.params: dict = {}
        self.model = None

    def _add(self, key: str, value: float) -> None:
        self.history.setdefault(key, []).append(float(value))

    def __getitem__(self, key: str) -> list[float]:
        return self.history[key]

    def __repr__(self) -> str:
        last = ", ".join(f"{k}={v[-1]:.4g}" for k, v in self.history.items() if v)
        return f"History(epochs={len(self.epoch)}, {last})"


def _as_data(a: Any, what: str):
    """Arrays of any supported library stay as they are; lists and scalars become NumPy."""
    if isinstance(a, np.ndarray):
        return a
    try:
        device_of(a)
        return a
    except DeviceError:
        pass
    try:
        return np.asarray(a)
    except Exception:
        raise ShapeError(
            f"{what} must be an array (NumPy or a supported device library), got {type(a).__name__}"
        ) from None


def _rows(a, idx):
    """Rows ``idx`` (a slice or a host int array) of a NumPy or device array, in its own library."""
    if isinstance(a, np.ndarray):
        return a[idx]
    if isinstance(idx, slice):
        return a[idx, ...]
    dev = device_of(a)
    with dev:
        return dev.xp.take(a, dev.asarray(idx, dtype="int64"), axis=0)


def _check_finite_data(x, y, kind: str, when: str) -> None:
    """NonFiniteError naming the first NaN/inf of float x or y (see ``fit(check_finite=...)``)."""
    hint = ("remove or repair those samples (e.g. numpy.nan_to_num, or drop the rows) before training, "
            "or pass check_finite=False to skip this check")
    try:
        assert_finite(x, f"{kind}x", hint)
        assert_finite(y, f"{kind}y", hint)
    except NonFiniteError as e:
        raise NonFiniteError(f"{when}, with the weights untouched: {e}") from None


#: most layers :meth:`Sequential.from_config` (and so a checkpoint) may declare
_MAX_CONFIG_LAYERS = 4096


def _largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is at most ``limit`` (1 at worst)."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _integral(a) -> bool:
    if isinstance(a, np.ndarray):
        return a.dtype.kind in "iu"
    return device_of(a).xp.isdtype(a.dtype, "integral")


def _check_range(a, n: int, what: str, fix: str, kind: str) -> None:
    """:func:`~xrnn.backend.check_id_range` over a whole array: on the host for NumPy data, else with
    one host read on its device."""
    if isinstance(a, np.ndarray):
        check_id_range(np, a.reshape(-1), n, what, fix, kind)
        return
    dev = device_of(a)
    with dev:
        check_id_range(dev.xp, dev.xp.reshape(a, (-1,)), n, what, fix, kind)


def _read_sums(dev, total, mtot: dict) -> dict:
    """The summed loss and metrics (0-d device arrays) as Python floats, in one host read."""
    if not mtot:
        return {"loss": float(total)}
    names = ["loss"] + list(mtot)
    with dev:
        host = to_numpy(dev.xp.stack([total] + [dev.xp.astype(mtot[k], total.dtype) for k in mtot]))  # (1 + m,)
    return {k: float(v) for k, v in zip(names, host)}


def _n_rows(a) -> int:
    if not a.shape:
        raise ShapeError("data must have a samples axis, got a 0-d array")
    return int(a.shape[0])


class Sequential(Module):
    """A linear stack of :mod:`xrnn.layers` with Keras' training API.

    Args:
        layers: list of layers, optionally headed by an :class:`~xrnn.layers.Input`.
        device: where every parameter lives (``"cpu"``, ``"cuda"``, ``"torch:cpu"``, ...).
        dtype: the parameters' float dtype (default ``"float32"``).
        seed: int, None (fresh entropy) or a ``numpy.random.Generator``.
        name: the model's name (shown by ``summary``).

    Attributes:
        layers: the layers in order.
        optimizer: the optimizer after ``compile`` (created when the model is
            built, for a name such as ``"adam"``).
        rng: the model's host generator (shared with every layer).
    """

    checkpoint_kind = "xrnn.Sequential"
    _input_shape: Any  # tuple without the batch axis once known, None before
    _compiled: Any  # compile()'s settings (a dict), None before
    optimizer: Any  # an xrnn.optim.Optimizer once compiled and built, None before

    def __init__(self, layers: Any = None, device: Any = "cpu", dtype: Any = "float32", seed: Any = None,
                 name: str = "sequential"):
        super().__init__(device, dtype)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name must be a non-empty string, got {name!r}")
        self.name = name
        object.__setattr__(self, "_rng", host_rng(seed))
        self.layers: list[Layer] = []
        self._input_shape = None
        self._compiled = None
        self.optimizer = None
        self._out_lengths = None
        for layer in list(layers or []):
            self.add(layer)

    # -- randomness ---------------------------------------------------------
    @property
    def rng(self) -> np.random.Generator:
        return self._rng

    @rng.setter
    def rng(self, value: Any) -> None:
        g = host_rng(value)
        object.__setattr__(self, "_rng", g)
        for layer in self.layers:
            for _, m in layer.named_modules():
                if isinstance(m, Layer):
                    m.rng = g

    # -- construction -------------------------------------------------------
    def _unique_name(self, layer: Layer) -> str:
        taken = set(self._children)
        if layer.name is not None:
            if layer.name in taken:
                raise ConfigError(f"the model already has a layer named {layer.name!r}; layer names must be unique")
            return layer.name
        base = layer._keras_name
        if base not in taken:
            return base
        i = 1
        while f"{base}_{i}" in taken:
            i += 1
        return f"{base}_{i}"

    def add(self, layer: Any) -> Sequential:
        """Append a layer (or, first, an :class:`~xrnn.layers.Input`); returns self."""
        if isinstance(layer, Input):
            if self.layers or self._input_shape is not None:
                raise ConfigError("Input(...) must be the first element of a Sequential")
            self._input_shape = layer.shape
            return self
        if not isinstance(layer, Layer):
            raise ConfigError(
                f"Sequential takes xrnn.layers layers (Dense, LSTM, ...), got {type(layer).__name__}; "
                "xrnn.modules layers (torch-style) are composed by hand instead"
            )
        if any(layer is other for other in self.layers):
            raise ConfigError(f"layer {layer.name!r} is already in this model")
        if self.layers and getattr(self.layers[-1], "return_state", False):
            raise ConfigError(
                f"layer {self.layers[-1].name!r} has return_state=True, which returns a list [output, states...]; "
                "in a Sequential only the last layer may return states (the next layer takes one array). "
                "Set return_state=False, or use the layers by hand"
            )
        if self.layers and getattr(layer, "produces_lengths", False) and not isinstance(layer, Embedding):
            raise ConfigError(
                "Masking must be the first layer (after Input): it marks the padding of the model's input"
            )
        if not self.layers and self._input_shape is None and layer._input_shape_arg is not None:
            self._input_shape = layer._input_shape_arg
        name = self._unique_name(layer)
        if layer.built:
            layer.to(self.device, self.dtype)
            for _, m in layer.named_modules():
                if isinstance(m, Layer):
                    m.rng = self._rng
        else:
            layer._attach(self.device, self.dtype, self._rng)
        layer.name = name
        self.add_module(name, layer)
        self.layers.append(layer)
        if self._input_shape is not None:
            try:
                self._build_layers()
            except Exception:  # leave the model as it was
                self.layers.pop()
                del self._children[name]
                raise
        return self

    def pop(self) -> Layer:
        """Remove and return the last layer."""
        if not self.layers:
            raise StateError("the model has no layers to pop")
        layer = self.layers.pop()
        del self._children[layer.name]
        return layer

    @property
    def built(self) -> bool:
        return bool(self.layers) and self._input_shape is not None and all(l.built for l in self.layers)

    def build(self, input_shape: Any) -> Sequential:
        """Create every layer's weights for inputs of ``input_shape``, batch axis included
        (Keras: ``model.build((None, timesteps, features))``)."""
        try:
            shape = tuple(None if s is None else int(s) for s in input_shape)
        except TypeError:
            raise ConfigError(
                f"input_shape must be a tuple like (None, timesteps, features), got {input_shape!r}"
            ) from None
        if len(shape) < 2:
            raise ShapeError(
                "build() takes the input shape with its batch axis, e.g. (None, timesteps, features); "
                f"got {input_shape!r}"
            )
        previous = self._input_shape
        self._input_shape = shape[1:]
        try:
            self._build_layers()  # built layers check that the new shape fits their weights
        except ShapeError:
            self._input_shape = previous
            raise
        return self

    def _build_layers(self) -> None:
        shape = self._input_shape
        for layer in self.layers:
            layer.build(shape)
            shape = layer.output_shape

    @property
    def input_shape(self) -> Any:
        return None if self._input_shape is None else (None,) + tuple(self._input_shape)

    @property
    def output_shape(self) -> Any:
        if not self.built:
            return None
        return (None,) + tuple(self.layers[-1].output_shape)

    def _require_built(self, what: str) -> None:
        if not self.layers:
            raise StateError(f"{what}: the model has no layers; add some first")
        if not self.built:
            raise StateError(
                f"{what}: the model has no weights yet. It is built by fit(), by model.build((None, timesteps, "
                "features)), or by starting it with Input(shape=(timesteps, features))"
            )

    # -- forward / backward ---------------------------------------------------
    def forward(self, x: Array, lengths: Any = None) -> Any:
        """Run every layer in order (building the model from ``x`` if needed).

        Args:
            x: (B, T, F) floats (or (B, T) ids for an Embedding first layer),
                on the model's device in its dtype.
            lengths: optional (B,) valid steps per sequence (right padding);
                by default a Masking / ``Embedding(mask_zero=True)`` first layer
                measures them.
        Returns:
            the last layer's output (a list ``[output, states...]`` when it
            has ``return_state``).
        """
        if not self.layers:
            raise StateError("the model has no layers; add some first")
        if not self.built:
            self.build((None,) + _shape(x)[1:])
        if lengths is not None:
            if x.ndim < 2:
                raise ShapeError("lengths need inputs with a time axis (batch, timesteps, ...)")
            lengths = check_lengths(lengths, _shape(x)[0], _shape(x)[1])
        for layer in self.layers:
            if lengths is None and getattr(layer, "produces_lengths", False):
                lengths = layer.compute_lengths(x)
            x = layer.forward(x, lengths=lengths)
            lengths = layer.output_lengths(lengths)
        self._out_lengths = lengths
        return x

    def __call__(self, x: Array, lengths: Any = None) -> Any:
        return self.forward(x, lengths)

    def backward(self, dout: Array, *, from_logits: bool = False, input_grad: bool = True) -> Array | None:
        """Backpropagate through every layer of the last forward; parameter gradients add into ``grads``.

        Args:
            dout: gradient of the output (a list ``[dout, dstates...]`` when
                the last layer has ``return_state``).
            from_logits: ``dout`` is the gradient of the last Dense layer's
                pre-activation (fused softmax/sigmoid cross-entropy).
            input_grad: False skips the gradient of the input.
        Returns:
            the gradient of the input (None for token ids or ``input_grad=False``).
        """
        if not self.layers:
            raise StateError("the model has no layers")
        d = dout
        n = len(self.layers)
        for i in range(n - 1, -1, -1):
            layer = self.layers[i]
            kw = {}
            if i == n - 1 and from_logits:
                kw["from_logits"] = True
            if i == 0:
                kw["input_grad"] = input_grad
            if i == n - 1 and getattr(layer, "return_state", False):
                if not isinstance(d, (list, tuple)):
                    d = [d]
                d = layer.backward(d[0], list(d[1:]) if len(d) > 1 else None, **kw)
            else:
                d = layer.backward(d, **kw)
            if d is None and i > 0:
                raise StateError(
                    f"layer {self.layers[i].name!r} returned no input gradient; it must be the first layer"
                )
        return d

    def reset_states(self) -> None:
        """Zero the carried states of every stateful layer (Keras' ``reset_states``)."""
        for layer in self.layers:
            if hasattr(layer, "reset_states"):
                layer.reset_states()

    reset_state = reset_states

    @property
    def stateful(self) -> bool:
        return any(getattr(layer, "stateful", False) for layer in self.layers)

    def _states_snapshot(self):
        return [(layer, layer.states) for layer in self.layers if getattr(layer, "stateful", False)]

    def _states_restore(self, snap) -> None:
        for layer, states in snap:
            layer.reset_states(states)

    # -- compile ----------------------------------------------------------------
    def compile(self, optimizer: Any = "adam", loss: str = "mse", metrics: Any = None, *,
                learning_rate: float | None = None, clipnorm: float | None = None,
                clipvalue: float | None = None) -> Sequential:
        """Choose the loss and the optimizer (Keras' ``compile``).

        Args:
            optimizer: a name (``"adam"``, ``"sgd"``, ``"rmsprop"``, ``"adagrad"``,
                ``"adamw"``) built as Keras 3 builds it: Keras' defaults *and*
                update rules (:mod:`xrnn.keras_optim`; e.g. ``"sgd"`` has lr
                0.01, ``"rmsprop"`` rho 0.9 and epsilon 1e-7 inside the square
                root); a Keras optimizer config ``{"class_name": "Adam",
                "config": {...}}`` (what a ``.keras`` file's ``compile_config``
                holds) or a Keras optimizer object, mapped onto the same
                classes (its ``global_clipnorm``/``clipvalue`` become
                ``clipnorm``/``clipvalue`` here); an optimizer object built on
                this model (:mod:`xrnn.optim` for torch's rules); or a
                callable ``model -> optimizer`` (for other hyperparameters
                before the model is built).
            loss: ``"mse"``, ``"mae"``, ``"cross_entropy"`` or
                ``"binary_cross_entropy"`` (or Keras' names, see
                :mod:`xrnn.losses`). The cross-entropies take the last layer's
                logits: ``Dense(activation=None)`` outputs are logits,
                ``Dense(activation="softmax")`` / ``"sigmoid"`` outputs are
                probabilities whose loss is computed from their logits.
            metrics: optional list of ``"accuracy"``, ``"mse"``, ``"mae"``
                reported per epoch (``"accuracy"`` for the cross-entropies).
            learning_rate: with an optimizer name or config, its learning rate
                (a config that sets one too is an error).
            clipnorm: clip the global gradient norm to this value each step.
            clipvalue: clip every gradient element to ``[-clipvalue, clipvalue]``.
        """
        loss = L.resolve_loss(loss)
        spec: str | dict | optim.Optimizer | Callable[..., Any]  # a name, a Keras config, an optimizer, a factory
        if isinstance(optimizer, str):
            key = optimizer.lower()
            if key not in keras_optim.KERAS_OPTIMIZERS:
                raise ConfigError(
                    f"unknown optimizer {optimizer!r}; expected one of: {', '.join(keras_optim.KERAS_OPTIMIZERS)}"
                )
            spec = key
        elif isinstance(optimizer, dict) or (
                callable(getattr(optimizer, "get_config", None)) and not isinstance(optimizer, optim.Optimizer)):
            cls, kwargs, clip = keras_optim.from_keras(optimizer)
            if learning_rate is not None and "learning_rate" in kwargs:
                raise ConfigError("the optimizer config sets learning_rate already; do not give learning_rate= too")
            for nm, v in clip.items():
                given = clipnorm if nm == "clipnorm" else clipvalue
                if v is not None and given is not None and float(v) != float(given):
                    raise ConfigError(f"the optimizer config sets {nm}={v}, compile() got {nm}={given}; give one")
            clipnorm = clipnorm if clip["clipnorm"] is None else float(clip["clipnorm"])
            clipvalue = clipvalue if clip["clipvalue"] is None else float(clip["clipvalue"])
            spec = {"class_name": cls.keras_name, "config": kwargs}
        elif isinstance(optimizer, optim.Optimizer):
            if optimizer.model is not self:
                raise ConfigError("the optimizer was built for another model; build it on this one: Adam(model, ...)")
            if learning_rate is not None:
                raise ConfigError("learning_rate= goes with an optimizer name; set it on the optimizer object instead")
            spec = optimizer
        elif callable(optimizer):
            spec = optimizer
        else:
            raise ConfigError(
                f"optimizer must be a name ({', '.join(keras_optim.KERAS_OPTIMIZERS)}), a Keras optimizer config, "
                f"an xrnn optimizer or a callable model -> optimizer, got {type(optimizer).__name__}"
            )
        if learning_rate is not None:
            if not isinstance(spec, (str, dict)):
                raise ConfigError("learning_rate= goes with an optimizer name; a callable sets its own")
            lr = float(learning_rate)
            if not lr >= 0:
                raise ConfigError(f"learning_rate must be >= 0, got {learning_rate!r}")
            learning_rate = lr
        for nm, v in (("clipnorm", clipnorm), ("clipvalue", clipvalue)):
            bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v)
            if v is not None and bad:
                raise ConfigError(f"{nm} must be a positive number or None, got {v!r}")
        mets = []
        for m in list(metrics or []):
            mkey = m.lower() if isinstance(m, str) else None
            mkey = {"acc": "accuracy", "mean_squared_error": "mse", "mean_absolute_error": "mae"}.get(mkey or "", mkey)
            if mkey not in METRICS:
                raise ConfigError(f"unknown metric {m!r}; expected some of {', '.join(METRICS)}")
            if mkey == "accuracy" and loss not in ("cross_entropy", "binary_cross_entropy"):
                raise ConfigError(
                    "metric 'accuracy' needs a classification loss (cross_entropy or binary_cross_entropy), "
                    f"not {loss!r}"
                )
            mets.append(mkey)
        previous = (self._compiled, self.optimizer)
        self._compiled = {"loss": loss, "optimizer": spec, "learning_rate": learning_rate,
                          "clipnorm": clipnorm, "clipvalue": clipvalue, "metrics": mets}
        self.optimizer = spec if isinstance(spec, optim.Optimizer) else None
        try:
            if self.layers:
                self._loss_source()  # validates the loss against the last layer
            if self.built:
                self._ensure_optimizer()
        except Exception:
            self._compiled, self.optimizer = previous
            raise
        return self

    def _require_compiled(self, what: str) -> dict:
        if self._compiled is None:
            raise StateError(f"{what} needs a compiled model: call model.compile(optimizer='adam', loss='mse') first")
        return self._compiled

    def _ensure_optimizer(self):
        c = self._compiled
        if self.optimizer is None:
            spec = c["optimizer"]
            if isinstance(spec, (str, dict)):
                kw = dict(spec["config"]) if isinstance(spec, dict) else {}
                if c["learning_rate"] is not None:
                    kw["learning_rate"] = c["learning_rate"]
                self.optimizer = _optimizer_class(spec)(self, **kw)
            else:
                opt = spec(self)
                if not isinstance(opt, optim.Optimizer) or opt.model is not self:
                    raise ConfigError(
                        "the optimizer callable must return an xrnn.optim optimizer built on the model it is given"
                    )
                self.optimizer = opt
        return self.optimizer

    def _loss_source(self) -> bool:
        """Whether the loss reads the last layer's logits (fused softmax/sigmoid); validates the pairing."""
        loss = self._compiled["loss"]
        last = self.layers[-1]
        if getattr(last, "return_state", False):
            return False  # fit refuses such models; predict is fine
        kind = last.output_kind
        what = {"softmax": " (softmax probabilities)", "sigmoid": " (sigmoid probabilities)"}.get(kind, "")
        if loss == "cross_entropy":
            if kind not in ("linear", "softmax"):
                raise ConfigError(
                    f"loss 'cross_entropy' needs the last layer to give class scores: Dense(n_classes) (logits) or "
                    f"Dense(n_classes, activation='softmax'); the last layer is {type(last).__name__} "
                    f"{last.name!r}{what}"
                    + ("; for independent yes/no targets use binary_cross_entropy" if kind == "sigmoid" else "")
                )
            return kind == "softmax"
        if loss == "binary_cross_entropy":
            if kind not in ("linear", "sigmoid"):
                raise ConfigError(
                    "loss 'binary_cross_entropy' needs the last layer to be Dense(n) (logits) or "
                    f"Dense(n, activation='sigmoid'); the last layer is {type(last).__name__} {last.name!r}{what}"
                )
            return kind == "sigmoid"
        return False

    # -- moving data --------------------------------------------------------------
    def _move_x(self, xb):
        if isinstance(self.layers[0], Embedding):
            if isinstance(xb, np.ndarray):
                if xb.dtype.kind not in "iu":
                    raise DTypeError(f"an Embedding first layer takes integer token ids, got dtype {xb.dtype}")
            else:
                d = device_of(xb)
                if not d.xp.isdtype(xb.dtype, "integral"):
                    raise DTypeError(
                        f"an Embedding first layer takes integer token ids, got dtype {dtype_name(xb.dtype)}"
                    )
            return to_device(xb, self.device, dtype="int64")
        if isinstance(xb, np.ndarray):
            if xb.dtype.kind not in "fiub":
                raise DTypeError(f"inputs must be numbers, got dtype {xb.dtype}")
        return to_device(xb, self.device, dtype=self.dtype)

    def _move_y(self, yb):
        if self._compiled["loss"] == "cross_entropy" and _integral(yb):
            return to_device(yb, self.device, dtype="int64")
        return to_device(yb, self.device, dtype=self.dtype)

    def _prepare(self, x, y=None):
        """Once per fit/evaluate/predict/train_on_batch call, before any batch: the valid lengths of
        masked data (host int64 (N,), or None) and the range checks of the ids the batches will read
        (an Embedding first layer's token ids; a cross_entropy loss's class ids, padded steps
        excluded), so that the batches run inside ``trusted_ids()`` with no per-batch device read.
        """
        first = self.layers[0]
        lengths = first.compute_lengths(x) if getattr(first, "produces_lengths", False) else None
        if isinstance(first, Embedding) and _integral(x):
            _check_range(x, first.input_dim, "ids", "encode text with the model's own vocabulary "
                         "(model.vocab.encode), or build the model for a larger vocabulary", "vocabulary")
        c = self._compiled
        if y is None or c is None or c["loss"] != "cross_entropy" or not _integral(y) or not y.shape[0]:
            return lengths
        out_lengths = lengths
        for layer in self.layers:
            out_lengths = layer.output_lengths(out_lengths)
        classes = self.layers[-1].output_shape[-1]
        if out_lengths is not None and y.ndim >= 2:  # padded steps may hold anything: count them as class 0
            T = _shape(y)[1]
            if isinstance(y, np.ndarray):
                valid = np.arange(T)[None, :] < out_lengths[:, None]  # (N, T)
                y = np.where(valid.reshape(valid.shape + (1,) * (y.ndim - 2)), y, 0)
            else:
                dev = device_of(y)
                with dev:
                    valid = dev.asarray(np.arange(T)[None, :] < out_lengths[:, None])  # (N, T)
                    y = dev.xp.where(dev.xp.reshape(valid, _shape(valid) + (1,) * (y.ndim - 2)), y,
                                     dev.xp.zeros_like(y))
        _check_range(y, classes, "targets", f"targets are class ids for the {classes} outputs of the last "
                     "layer", "class")
        return lengths

    def _mask(self, lengths, T: int):
        host = (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.float64)  # (B, T)
        return self.device.asarray(host, dtype=self.dtype)

    # -- one batch --------------------------------------------------------------------
    def _loss_terms(self, out, yb):
        """(loss, grad, metric values) for the last forward's output; all on the device."""
        c = self._compiled
        fused = self._loss_source()
        pred = self.layers[-1].logits if fused else out
        mask = None
        lengths = self._out_lengths
        if lengths is not None and pred.ndim >= 3:
            mask = self._mask(lengths, _shape(pred)[1])
        fn = L.get(c["loss"])
        with self.device:  # the metrics' operations too
            value, grad = fn(pred, yb, mask)
            mets = {}
            for m in c["metrics"]:
                mets[m] = self._metric(m, c["loss"], out, pred, yb, mask)
        return value, grad, fused, mets

    def _metric(self, name, loss, out, pred, yb, mask):
        xp = self.device.xp
        if name in ("mse", "mae"):
            return L.get(name)(out, yb, mask)[0]
        if loss == "binary_cross_entropy":
            # pred holds logits: predicted 1 where sigmoid(logit) > 0.5, i.e. logit > 0
            t = yb if _shape(yb) == _shape(pred) else xp.reshape(yb, _shape(pred))
            hit = xp.astype((pred > 0.0) == (t > 0.5), pred.dtype)
        else:
            p = xp.argmax(pred, axis=-1)
            if xp.isdtype(yb.dtype, "integral"):
                t = yb if _shape(yb) == _shape(p) else xp.reshape(yb, _shape(p))
            else:
                t = xp.argmax(yb, axis=-1)
            hit = xp.astype(p == xp.astype(t, p.dtype), pred.dtype)
        if mask is None:
            return xp.mean(hit)
        w, n = L._weights(self.device, hit, mask)
        return xp.sum(hit * w) / n

    def loss_and_gradients(self, x: Array, y: Array, lengths: Any = None) -> Array:
        """Forward, compiled loss and backward on one batch already on the model's device.

        Gradients *add* into ``model.grads`` (call ``zero_grad()`` first for a
        fresh step); for custom training loops. Returns the loss, a 0-d
        array on the device (no host synchronisation).
        """
        self._require_compiled("loss_and_gradients")
        self._check_trainable("loss_and_gradients")
        value, _ = self._forward_backward(x, y, lengths)
        return value

    def _forward_backward(self, xb, yb, lengths):
        out = self.forward(xb, lengths)
        value, grad, fused, mets = self._loss_terms(out, yb)
        self.backward(grad, from_logits=fused, input_grad=False)
        return value, mets

    def _train_step(self, xb, yb, lengths):
        c = self._compiled
        opt = self.optimizer
        self.zero_grad()
        value, mets = self._forward_backward(xb, yb, lengths)
        if c["clipnorm"] is not None:
            optim.clip_grad_norm(self, c["clipnorm"])
        if c["clipvalue"] is not None:
            optim.clip_grad_value(self, c["clipvalue"])
        opt.step()
        return value, mets

    def _check_trainable(self, what: str) -> None:
        if getattr(self.layers[-1], "return_state", False):
            raise ConfigError(
                f"{what}: the last layer returns [output, states...] (return_state=True); such a model can predict "
                "but has no single output to compute a loss on"
            )

    def train_on_batch(self, x: Array, y: Array, *, check_finite: bool = True) -> float:
        """One optimizer step on one batch; returns its loss as a float (one host sync).

        ``check_finite``: as in :meth:`fit`, NaN/inf in ``x`` or ``y`` raise
        NonFiniteError before the step.
        """
        self._require_compiled("train_on_batch")
        x, y = _as_data(x, "x"), _as_data(y, "y")
        if check_finite:
            _check_finite_data(x, y, "", "train_on_batch stopped before the step")
        if not self.built:
            self.build((None,) + tuple(x.shape[1:]))
        self._check_trainable("train_on_batch")
        self._ensure_optimizer()
        self.train()
        lengths = self._prepare(x, y)
        with trusted_ids():
            value, _ = self._train_step(self._move_x(x), self._move_y(y), lengths)
        return float(value)

    # -- fit / evaluate / predict -------------------------------------------------------
    def _check_stateful_batches(self, what: str, n: int, bs: int, *, data: str = "samples",
                                carried: bool = True, others: tuple = ()) -> None:
        """Refuse, before any batch runs, a call whose batches would break a stateful model.

        ``n`` samples in batches of ``bs`` run as batches of ``min(n, bs)``; a
        stateful model needs every one of them at that size (``n`` a multiple
        of it) and, with ``carried``, at the batch size of the states its
        stateful layers carry now. ``others``: sample counts of the same call
        that share ``bs`` (fit's training and validation sets), for the hint.
        """
        if not self.stateful:
            return
        size = min(n, bs)
        if n % size:
            good = _largest_divisor(math.gcd(n, *others), bs)
            shared = " and ".join(str(k) for k in (n,) + tuple(others))
            raise ShapeError(
                f"{what}: a stateful model needs the same batch size every step, but the {n} {data} do not split "
                f"evenly: {n} is not a multiple of batch_size={bs} (the last batch would have {n % size}); nothing "
                f"was run. Pass a batch_size "
                f"that divides {shared} (e.g. batch_size={good}), or give a multiple of {bs} {data}"
            )
        if not carried:
            return
        for layer in self.layers:
            states = layer.states if getattr(layer, "stateful", False) else None
            if states:
                have = _shape(states[0])[0]
                if have != size:
                    raise ShapeError(
                        f"{what}: stateful layer {layer.name!r} carries states for batch size {have}, but {n} "
                        f"{data} with batch_size={bs} run in batches of {size}; nothing was run. Continue the "
                        f"series in batches of {have} (batch_size={have} and a multiple of {have} {data}), or call "
                        f"model.reset_states() first to start over with batches of {size}"
                    )

    def _check_xy(self, x, y):
        x, y = _as_data(x, "x"), _as_data(y, "y")
        if _n_rows(x) != _n_rows(y):
            raise ShapeError(f"x has {plural(_n_rows(x), 'sample')} but y has {plural(_n_rows(y), 'sample')}; "
                             "they must pair up row by row")
        if _n_rows(x) == 0:
            raise ShapeError("x has no samples")
        return x, y

    @staticmethod
    def _batch_size(batch_size) -> int:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        return int(batch_size)

    def fit(self, x: Array, y: Array, epochs: int = 1, batch_size: int = 32, verbose: int = 1,
            validation_split: float = 0.0, validation_data: Any = None, shuffle: bool = True,
            print_fn: Callable[[str], Any] = print, *, check_finite: bool = True, callbacks: Any = None) -> History:
        """Train for ``epochs`` passes over the data (Keras' ``fit``).

        Args:
            x: (N, T, F) inputs (or (N, T) token ids); y: targets with the
                output's shape ((N,) is accepted for outputs (N, 1); integer
                class ids for cross_entropy).
            epochs, batch_size: passes and samples per step (the last batch may be smaller).
            verbose: 0 silent, 1 or 2 one line per epoch (loss read once per epoch).
            validation_split: fraction of the samples, taken from the *end*
                before shuffling (as Keras), held out and evaluated after each epoch.
            validation_data: ``(x_val, y_val)``, overrides ``validation_split``.
            shuffle: reshuffle the training samples every epoch (model.rng).
            check_finite: before training, scan x, y and the validation data
                for NaN/inf and raise NonFiniteError naming the first bad
                sample, so bad data never reaches the weights. One pass over
                the data per ``fit`` call: on the host for NumPy data, one
                reduction and one host read per array for device arrays.
                False skips it (a bad value then shows as a non-finite epoch
                loss, after the weights took it).
            callbacks: Keras-style callbacks (:mod:`xrnn.callbacks`:
                EarlyStopping, ModelCheckpoint, ReduceLROnPlateau, CSVLogger,
                or a ``Callback`` subclass), called with Keras's hooks and
                logs; ``model.stop_training = True`` ends training after the
                current epoch.
        Returns:
            a :class:`History`; ``history.history["loss"]`` has one float per epoch.
        Raises:
            NonFiniteError: NaN/inf in the data (``check_finite``), or the
                epoch's loss is NaN or infinite (the run diverged: the
                loss is read once per epoch, so the weights already took
                the bad updates).
            ShapeError: a stateful model whose training or validation
                batches would not all have one size, or whose training batch
                size is not that of its carried states (checked before epoch 1).
        """
        self._require_compiled("fit")
        x, y = self._check_xy(x, y)
        if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
            raise ConfigError(f"epochs must be a non-negative integer, got {epochs!r}")
        bs = self._batch_size(batch_size)
        try:
            vs = float(validation_split)
        except (TypeError, ValueError):
            vs = float("nan")
        if not 0.0 <= vs < 1.0:
            raise ConfigError(f"validation_split must be in [0, 1), got {validation_split!r}")
        n = _n_rows(x)
        if check_finite:
            _check_finite_data(x, y, "", "fit stopped before epoch 1")
        xv = yv = None
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise ConfigError("validation_data must be a tuple (x_val, y_val)")
            xv, yv = self._check_xy(*validation_data)
            if check_finite:
                _check_finite_data(xv, yv, "validation ", "fit stopped before epoch 1")
        elif vs > 0:
            split = int(n * (1.0 - vs))
            if split < 1 or split >= n:
                raise ConfigError(
                    f"validation_split={validation_split} of {plural(n, 'sample')} leaves {split} for training and "
                    f"{n - split} for validation; both need at least one"
                )
            xv, yv = _rows(x, slice(split, n)), _rows(y, slice(split, n))
            x, y = _rows(x, slice(0, split)), _rows(y, slice(0, split))
            n = split
        if self.stateful and epochs:
            # checked before anything runs: a refusal after an epoch would leave updated weights and lost states
            if shuffle:
                raise ConfigError(
                    "a stateful model carries each row's state to the next batch, so batches must follow each "
                    "other in time: pass shuffle=False"
                )
            nv = None if xv is None else _n_rows(xv)
            self._check_stateful_batches("fit", n, bs, data="training samples",
                                         others=() if nv is None else (nv,))
            if nv is not None:  # validation runs after reset_states(): only its own batches must agree
                self._check_stateful_batches("fit", nv, bs, data="validation samples", carried=False, others=(n,))
        if not self.built:
            self.build((None,) + tuple(x.shape[1:]))
        self._check_trainable("fit")
        self._ensure_optimizer()
        history = History()
        steps = -(-n // bs)
        lengths_all = self._prepare(x, y) if epochs else None
        from .callbacks import CallbackList

        history.params, history.model = {"verbose": verbose, "epochs": epochs, "steps": steps}, self
        cbs = CallbackList(callbacks, self, history.params)
        batch_logs = cbs.wants_batch_logs  # then the loss is read every batch, as Keras does
        self.stop_training = False
        cbs.on_train_begin()
        logs: dict = {}
        for epoch in range(epochs):
            cbs.on_epoch_begin(epoch)
            self.train()
            t0 = time.perf_counter()
            order = self._rng.permutation(n) if shuffle else None
            total: Any = None  # an array scalar on the device
            mtot: dict = {}
            for s in range(0, n, bs):
                e = min(s + bs, n)
                idx = order[s:e] if order is not None else slice(s, e)
                xb_raw, yb_raw = _rows(x, idx), _rows(y, idx)
                lengths = None if lengths_all is None else lengths_all[idx]
                if batch_logs:
                    cbs.on_train_batch_begin(s // bs)
                with trusted_ids():  # the ids were checked above, for all batches at once
                    value, mets = self._train_step(self._move_x(xb_raw), self._move_y(yb_raw), lengths)
                with self.device:
                    total = value * (e - s) if total is None else total + value * (e - s)
                    for k, v in mets.items():
                        mtot[k] = v * (e - s) if k not in mtot else mtot[k] + v * (e - s)
                if batch_logs:  # a callback asked for per-batch logs: one host read per batch
                    bsums = _read_sums(self.device, total, mtot)
                    cbs.on_train_batch_end(s // bs, {k: v / e for k, v in bsums.items()})
            sums = _read_sums(self.device, total, mtot)  # the epoch's one host synchronisation
            loss = sums.pop("loss") / n
            if not math.isfinite(loss):
                raise NonFiniteError(
                    f"the training loss became {loss} in epoch {epoch + 1}; lower the learning rate, clip "
                    "gradients (compile(clipnorm=1.0)), or check the data for NaN/inf"
                )
            logs = {"loss": loss, **{k: v / n for k, v in sums.items()}}
            if xv is not None:
                snap = self._states_snapshot()
                self.reset_states()
                cbs.on_test_begin()
                val = self.evaluate(xv, yv, batch_size=bs, verbose=0)
                self._states_restore(snap)
                if isinstance(val, list):
                    logs["val_loss"] = val[0]
                    for k, v in zip(self._compiled["metrics"], val[1:]):
                        logs["val_" + k] = v
                else:
                    logs["val_loss"] = val
                cbs.on_test_end({k[4:]: v for k, v in logs.items() if k.startswith("val_")})
            cbs.on_epoch_end(epoch, logs)  # may add keys (ReduceLROnPlateau: learning_rate), as in Keras
            history.epoch.append(epoch)
            for k, v in logs.items():
                history._add(k, v)
            if verbose:
                parts = [f"Epoch {epoch + 1}/{epochs}", f"{steps} steps", f"{time.perf_counter() - t0:.2f}s"]
                parts += [f"{k}: {v[-1]:.4f}" for k, v in history.history.items()]
                print_fn(" - ".join(parts))
            if self.stop_training:
                break
        cbs.on_train_end(logs)
        return history

    def evaluate(self, x: Array, y: Array, batch_size: int = 32, verbose: int = 0) -> Any:
        """Mean loss over (x, y) in eval mode (Keras' ``evaluate``): a float, or
        ``[loss, metric...]`` when metrics were compiled. Batches are weighted by size."""
        c = self._require_compiled("evaluate")
        x, y = self._check_xy(x, y)
        self._require_built("evaluate")
        self._check_trainable("evaluate")
        bs = self._batch_size(batch_size)
        n = _n_rows(x)
        self._check_stateful_batches("evaluate", n, bs)
        lengths_all = self._prepare(x, y)
        was = self.training
        self.eval()
        total: Any = None  # an array scalar on the device
        mtot: dict = {}
        try:
            with no_grad(), trusted_ids():
                for s in range(0, n, bs):
                    e = min(s + bs, n)
                    xb_raw, yb_raw = _rows(x, slice(s, e)), _rows(y, slice(s, e))
                    lengths = None if lengths_all is None else lengths_all[s:e]
                    out = self.forward(self._move_x(xb_raw), lengths)
                    value, _, _, mets = self._loss_terms(out, self._move_y(yb_raw))
                    with self.device:
                        total = value * (e - s) if total is None else total + value * (e - s)
                        for k, v in mets.items():
                            mtot[k] = v * (e - s) if k not in mtot else mtot[k] + v * (e - s)
        finally:
            self.train(was)
        sums = _read_sums(self.device, total, mtot)  # one host read
        loss = sums["loss"] / n
        if verbose:
            print(f"evaluate - loss: {loss:.4f}")
        if c["metrics"]:
            return [loss] + [sums[k] / n for k in c["metrics"]]
        return loss

    def predict(self, x: Array, batch_size: int = 32, verbose: int = 0) -> Any:
        """The model's outputs for x in eval mode, batch by batch, without keeping anything for backward.

        Returns an array on the model's device (``xrnn.to_numpy(...)`` copies
        it to the host), or a list ``[output, states...]`` when the last layer
        has ``return_state``. Outputs at padded steps of masked inputs are
        Keras' (after a recurrent layer with ``return_sequences``: the last
        valid output repeated, see :mod:`xrnn.layers`); the losses ignore them.
        """
        x = _as_data(x, "x")
        self._require_built("predict")
        bs = self._batch_size(batch_size)
        n = _n_rows(x)
        if n == 0:
            raise ShapeError("x has no samples")
        self._check_stateful_batches("predict", n, bs)
        lengths_all = self._prepare(x)
        was = self.training
        self.eval()
        outs = []
        try:
            with no_grad(), trusted_ids():
                for s in range(0, n, bs):
                    e = min(s + bs, n)
                    xb_raw = _rows(x, slice(s, e))
                    lengths = None if lengths_all is None else lengths_all[s:e]
                    outs.append(self.forward(self._move_x(xb_raw), lengths))
        finally:
            self.train(was)
        xp = self.device.xp
        with self.device:
            if isinstance(outs[0], list):
                return [xp.concat([o[i] for o in outs], axis=0) if len(outs) > 1 else outs[0][i]
                        for i in range(len(outs[0]))]
            return xp.concat(outs, axis=0) if len(outs) > 1 else outs[0]

    def predict_on_batch(self, x: Array) -> Any:
        """``predict`` of one batch."""
        x = _as_data(x, "x")
        return self.predict(x, batch_size=max(_n_rows(x), 1))

    # -- description --------------------------------------------------------------
    def summary(self, print_fn: Callable[[str], Any] | None = print) -> str:
        """Print (and return) a Keras-like table: layer (type), output shape, parameter count."""
        self._require_built("summary")
        rows = []
        for layer in self.layers:
            shape = (None,) + tuple(layer.output_shape)
            text = _fmt_shape(shape)
            if getattr(layer, "return_state", False):
                text = "[" + ", ".join([text] + [_fmt_shape((None,) + tuple(s)) for s in layer.state_shapes]) + "]"
            rows.append((f"{layer.name} ({type(layer).__name__})", text, f"{layer.num_parameters():,}"))
        w0 = max([29] + [len(r[0]) + 2 for r in rows])
        w1 = max([26] + [len(r[1]) + 2 for r in rows])
        w2 = max([10] + [len(r[2]) for r in rows])
        width = w0 + w1 + w2
        total = self.num_parameters()
        lines = [f'Model: "{self.name}"', "_" * width,
                 "Layer (type)".ljust(w0) + "Output Shape".ljust(w1) + "Param #".ljust(w2), "=" * width]
        for i, (a, b, c) in enumerate(rows):
            lines.append(a.ljust(w0) + b.ljust(w1) + c.ljust(w2))
            if i < len(rows) - 1:
                lines.append("")
        lines += ["=" * width, f"Total params: {total:,}", f"Trainable params: {total:,}", "Non-trainable params: 0",
                  "_" * width]
        text = "\n".join(lines)
        if print_fn is not None:
            print_fn(text)
        return text

    # -- Keras weights --------------------------------------------------------------
    def get_weights(self) -> list:
        """Every layer's weights in Keras' layouts and order, as ``keras_model.get_weights()``
        gives them: host NumPy arrays (see :meth:`xrnn.layers.Layer.get_weights`)."""
        self._require_built("get_weights")
        return [w for layer in self.layers for w in layer.get_weights()]

    def set_weights(self, weights: Iterable[Array]) -> None:
        """Load ``keras_model.get_weights()`` (NumPy or any array library) into this model.

        The list is split layer by layer in Keras' order; every count and
        shape is checked before anything changes. Raises ShapeError naming
        the layer and the expected shapes.
        """
        self._require_built("set_weights")
        try:
            weights = list(weights)
        except TypeError:
            raise ShapeError(f"set_weights takes a list of arrays, got {type(weights).__name__}") from None
        counts = [len(layer._keras_specs()) for layer in self.layers]
        if len(weights) != sum(counts):
            per = "; ".join(
                f"{layer.name} ({type(layer).__name__}): " + (", ".join(
                    f"{n} {_fmt_shape(sh)}" for n, sh in layer._keras_specs()) or "none")
                for layer in self.layers)
            raise ShapeError(f"model {self.name!r} takes {sum(counts)} weight arrays in Keras' order ({per}); "
                             f"got {len(weights)}")
        staged, i = [], 0
        for layer, n in zip(self.layers, counts):
            staged += layer._stage_keras(weights[i:i + n])
            i += n
        for module, state in staged:  # all checked: now load
            module.load_state_dict(state)

    def extra_repr(self) -> str:
        names = ", ".join(str(layer.name) for layer in self.layers)
        return f"name={self.name!r}, layers=[{names}], " + super().extra_repr()

    def get_config(self) -> dict:
        """JSON-able description: name, dtype, input shape and each layer's class and config."""
        return {
            "name": self.name,
            "dtype": self.dtype,
            "input_shape": None if self._input_shape is None else list(self._input_shape),
            "layers": [{"class_name": type(l).__name__, "config": l.get_config()} for l in self.layers],
        }

    @classmethod
    def from_config(cls, config: dict, device: Any = "cpu", seed: Any = None) -> Sequential:
        """A new (freshly initialised) model from :meth:`get_config`'s dict."""
        if not isinstance(config, dict) or not isinstance(config.get("layers"), list):
            raise ConfigError("a Sequential config is a dict with a 'layers' list")
        if len(config["layers"]) > _MAX_CONFIG_LAYERS:
            # checked before building: a small hostile file could otherwise declare enough layers
            # to keep the loader busy for hours (adding a layer checks the ones before it)
            raise ConfigError(
                f"a Sequential config with {len(config['layers']):,} layers; at most {_MAX_CONFIG_LAYERS:,} are "
                "supported when building from a config or checkpoint"
            )
        layers = [layer_from_config(spec) for spec in config["layers"]]
        model = cls(layers, device=device, dtype=config.get("dtype", "float32"), seed=seed,
                    name=config.get("name", "sequential"))
        shape = config.get("input_shape")
        if shape is not None:
            model.build((None,) + tuple(shape))
        return model

    @classmethod
    def from_keras(cls, path: str | os.PathLike, device: Any = "cpu", *, compile: bool = True,
                   seed: Any = None) -> Sequential:
        """A model read from a Keras 3 ``.keras`` file: :func:`xrnn.keras_io.load_keras`."""
        from .keras_io import load_keras

        return load_keras(path, device=device, compile=compile, seed=seed)

    # -- checkpoints -------------------------------------------------------------------
    def checkpoint_state(self) -> tuple[dict, dict]:
        """``(meta, tensors)`` for :mod:`xrnn.checkpoint`.

        meta: the config (layers, input shape, dtype), the generator's state,
        the training flag and the compile settings with the optimizer's name,
        hyperparameters and step count. tensors: every parameter by its
        state-dict name, and the optimizer's state as
        ``optimizer/<parameter>/<slot>`` (host copies). The carried states of
        stateful layers are not saved (a loaded model starts from zeros).
        """
        meta = {
            "version": _META_VERSION,
            "config": self.get_config(),
            "rng_state": self._rng.bit_generator.state,
            "training": bool(self.training),
            "compile": None,
        }
        tensors = {k: np.array(to_numpy(v), copy=True) for k, v in self.state_dict().items()}
        c = self._compiled
        if c is not None:
            comp = {"loss": c["loss"], "clipnorm": c["clipnorm"], "clipvalue": c["clipvalue"],
                    "metrics": list(c["metrics"]), "optimizer": None, "learning_rate": c["learning_rate"],
                    "hyper": None, "steps": 0}
            opt = self.optimizer
            if opt is not None:
                sd = opt.state_dict()
                comp.update(optimizer=sd["name"].lower(), hyper=sd["hyper"], steps=sd["steps"])
                for pname, slots in sd["state"].items():
                    for slot, arr in slots.items():
                        tensors[f"optimizer/{pname}/{slot}"] = np.array(to_numpy(arr), copy=True)
            elif isinstance(c["optimizer"], (str, dict)):
                comp["optimizer"] = c["optimizer"]
            else:
                raise StateError(
                    "the model was compiled with an optimizer callable that has not run yet (the model is not "
                    "built); build the model before saving, or compile with an optimizer name"
                )
            meta["compile"] = comp
        return meta, tensors

    @classmethod
    def from_checkpoint(cls, meta: dict, tensors: dict, device: Any = "cpu") -> Sequential:
        """Rebuild a model written by :meth:`checkpoint_state` on any device (optimizer included)."""
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise CheckpointCorruptError("Sequential checkpoint metadata has no 'config' dict")
        if meta.get("version", 1) > _META_VERSION:
            raise CheckpointError("this Sequential checkpoint was written by a newer xrnn; upgrade to load it")
        weights = {k: v for k, v in tensors.items() if not k.startswith("optimizer/")}
        try:
            # the file's own weights bound what the config may make us allocate
            # counted in elements of the dtype the model allocates (bytes in the file / its item size)
            with parameter_budget(sum(int(np.asarray(v).nbytes) for v in weights.values()),
                                  meta["config"].get("dtype", "float32"), "the Sequential checkpoint"):
                model = cls.from_config(meta["config"], device=device, seed=0)
        except (ConfigError, ShapeError, TypeError, KeyError) as e:
            raise CheckpointCorruptError(f"Sequential checkpoint config is invalid: {e}") from None
        if model.built:
            try:
                model.load_state_dict(weights)
            except ShapeError as e:
                raise CheckpointCorruptError(f"Sequential checkpoint weights do not match its config: {e}") from None
        elif weights:
            raise CheckpointCorruptError("Sequential checkpoint has weights but no input shape to build the model")
        if meta.get("rng_state") is not None:
            model._rng.bit_generator.state = meta["rng_state"]
        model.train(bool(meta.get("training", True)))
        comp = meta.get("compile")
        if comp:
            name = comp.get("optimizer") or "adam"
            # a built optimizer is rebuilt below from its class name and hyperparameters
            model.compile(optimizer=name if comp.get("hyper") is None else "adam", loss=comp["loss"],
                          metrics=comp.get("metrics") or None,
                          learning_rate=comp.get("learning_rate") if comp.get("hyper") is None else None,
                          clipnorm=comp.get("clipnorm"), clipvalue=comp.get("clipvalue"))
            if comp.get("hyper") is not None and model.built:
                model.optimizer = None
                model._compiled["learning_rate"] = None
                try:
                    opt = _optimizer_class(name, saved=True)(model, **comp["hyper"])
                except (ConfigError, TypeError) as e:
                    raise CheckpointCorruptError(f"Sequential checkpoint optimizer is invalid: {e}") from None
                state: dict[str, dict] = {}  # parameter name -> slot -> host array
                prefix = "optimizer/"
                for k, v in tensors.items():
                    if k.startswith(prefix):
                        pname, slot = k[len(prefix):].rsplit("/", 1)
                        state.setdefault(pname, {})[slot] = v
                for pname in model.parameters():
                    state.setdefault(pname, {})
                try:
                    opt.load_state_dict({"name": type(opt).__name__, "hyper": comp["hyper"], "steps": comp["steps"],
                                         "state": state})
                except (ConfigError, ShapeError) as e:
                    raise CheckpointCorruptError(f"Sequential checkpoint optimizer state is invalid: {e}") from None
                model.optimizer = opt
                model._compiled["optimizer"] = name
        return model

    def save(self, path: str | os.PathLike) -> None:
        """Write a checkpoint (``xrnn.checkpoint.save(model, path)``)."""
        from . import checkpoint

        checkpoint.save(self, path)


_TORCH_OPTIMIZERS = {"sgd": optim.SGD, "adagrad": optim.Adagrad, "rmsprop": optim.RMSprop, "adam": optim.Adam,
                     "adamw": optim.AdamW}


def _optimizer_class(spec, saved: bool = False) -> type:
    """The optimizer class of a compile spec (a Keras name: Keras' rules; a ``{"class_name": ...}`` spec) or,
    with ``saved``, of a built optimizer's class name in a checkpoint ("kerasadam"; "adam" is ``optim.Adam``,
    torch's rules: a model compiled with that object, or a checkpoint from before Keras' rules)."""
    if isinstance(spec, dict):
        spec = spec.get("class_name")
    key = spec.lower() if isinstance(spec, str) else None
    if saved and key in _TORCH_OPTIMIZERS:
        return _TORCH_OPTIMIZERS[key]
    by_class = {c.__name__.lower(): c for c in keras_optim.KERAS_OPTIMIZERS.values()}
    if key in by_class:
        return by_class[key]
    if key in keras_optim.KERAS_OPTIMIZERS:
        return keras_optim.KERAS_OPTIMIZERS[key]
    raise ConfigError(f"unknown optimizer {spec!r}")


def load_model(path: str | os.PathLike, device: Any = "cpu") -> Sequential:
    """Load a Sequential saved with ``model.save(path)`` / ``xrnn.checkpoint.save`` onto ``device``.

    Raises:
        CheckpointKindError: the file holds another kind of object (e.g. a CharLM).
        CheckpointError and subclasses: unreadable files (see :mod:`xrnn.checkpoint`).
    """
    from . import checkpoint

    return checkpoint.load(path, device=device, kind=Sequential.checkpoint_kind)


def _load_sequential(meta: dict, tensors: dict, device) -> Sequential:
    return Sequential.from_checkpoint(meta, tensors, device)


def _register() -> None:
    from .checkpoint import register_kind

    register_kind(Sequential.checkpoint_kind, _load_sequential)


_register()
