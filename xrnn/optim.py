"""Optimizers, gradient clipping and learning-rate schedules.

Optimizers (update rules and defaults of ``torch.optim``, single-tensor path,
``maximize=False``; a model with the same initial weights and gradients
follows PyTorch's trajectory step for step, up to rounding)::

    SGD(model, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False)
    Adagrad(model, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10)
    RMSprop(model, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False)
    Adam(model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False)
    AdamW(model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False)

These are torch's defaults, not Keras': ``Sequential.compile(optimizer="adam")``
builds :mod:`xrnn.keras_optim`'s classes instead (Keras 3's defaults and update
rules). Every optimizer here also takes ``learning_rate=`` as another name for
``lr=`` (giving both is an error).

``model`` is anything with ``parameters()`` and ``grads``, both dicts
``name -> array`` (an :class:`xrnn.Module`, or a small object of your own).
The optimizer looks the arrays up by name on every :meth:`Optimizer.step`
and updates the parameters in place, so the arrays keep their identity and
a model whose parameters were replaced (``load_state_dict``) is still
trained. State (moments, accumulators) lives on the parameters' device in
their dtype; a step never synchronises with the host (the step count and
the learning rate are Python numbers, every array operation runs on the
device). ``opt.lr`` is a plain float that schedules set; the other
hyperparameters are fixed at construction.

Typical loop::

    opt = xrnn.optim.Adam(model, lr=2e-3)
    sched = xrnn.optim.Warmup(xrnn.optim.Cosine(2e-3, total_steps=10_000), 200)
    for step in range(10_000):
        sched(opt, step)                      # sets opt.lr for this step
        opt.zero_grad()
        loss = ...forward/backward...
        xrnn.optim.clip_grad_norm(model, 5.0)
        opt.step()

Schedules are pure functions of the number of steps already taken, so a run
resumed from a checkpoint (which stores ``opt.steps`` and
``sched.to_config()``) gets exactly the learning rates of the uninterrupted
run.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._typing import Array
from .backend import Device, device_of, dtype_name, to_device
from .backend import int_shape as _shape
from .errors import ConfigError, DeviceError, ShapeError, StateError
from .kernels import fused_clip_grad_norm, fused_optimizer_step

__all__ = [
    "Optimizer",
    "SGD",
    "Adagrad",
    "RMSprop",
    "Adam",
    "AdamW",
    "OPTIMIZERS",
    "make_optimizer",
    "clip_grad_norm",
    "grad_norm",
    "clip_grad_value",
    "Schedule",
    "Constant",
    "StepDecay",
    "Cosine",
    "Warmup",
    "SCHEDULES",
    "make_schedule",
]


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------

def _number(owner: str, name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{owner}: {name} must be a real number, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v):
        raise ConfigError(f"{owner}: {name} must be finite, got {value!r}")
    return v


def _non_negative(owner: str, name: str, value: Any) -> float:
    v = _number(owner, name, value)
    if v < 0.0:
        raise ConfigError(f"{owner}: {name} must be >= 0, got {value!r}")
    return v


def _in_unit(owner: str, name: str, value: Any, *, closed: bool = False) -> float:
    v = _number(owner, name, value)
    if not (0.0 <= v <= 1.0 if closed else 0.0 <= v < 1.0):
        interval = "[0, 1]" if closed else "[0, 1)"
        raise ConfigError(f"{owner}: {name} must be in {interval}, got {value!r}")
    return v


def _flag(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{owner}: {name} must be True or False, got {value!r}")
    return bool(value)


def _count(owner: str, name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _lr_alias(owner: str, lr: Any, learning_rate: Any, default: float) -> Any:
    """``learning_rate=`` (Keras' spelling) is another name for ``lr=``; giving both is an error."""
    if lr is not None and learning_rate is not None:
        raise ConfigError(f"{owner}: give lr= or learning_rate= (the same thing), not both")
    v = lr if lr is not None else learning_rate
    return default if v is None else v


def _params_of(model: Any) -> Mapping[str, Any]:
    p = getattr(model, "parameters", None)
    if p is None:
        raise ConfigError(
            f"optimizers take a model with .parameters() and .grads (e.g. an xrnn.Module), "
            f"got a {type(model).__name__}"
        )
    params = p() if callable(p) else p
    if not isinstance(params, Mapping):
        raise ConfigError(
            f"model.parameters() must return a dict name -> array, got a {type(params).__name__}"
        )
    return params


def _unbuilt_hint(model: Any, opt: str) -> str:
    """Why a model that will have parameters has none yet, and how to give it some (else "")."""
    if getattr(model, "built", True) is not False:
        return ""
    if hasattr(model, "layers") and hasattr(model, "compile"):  # a Sequential
        if not model.layers:
            return "; the Sequential has no layers yet: add them first"
        by_name = f"compile(optimizer='{opt.lower()}', learning_rate=...) or " if opt.lower() in OPTIMIZERS else ""
        return (
            "; the Sequential is not built yet (its weights are created once it knows the input shape). Build "
            "it first with model.build((None, timesteps, features)), or start it with "
            "Input(shape=(timesteps, features)) or give input_shape= to the first layer; or let compile() build "
            f"the optimizer when fit() builds the model: {by_name}compile(optimizer=lambda m: {opt}(m, ...))"
        )
    return f"; the {type(model).__name__} is not built yet: call its build(input_shape) first"


def _grads_of(model: Any) -> Mapping:
    g = getattr(model, "grads", None)
    if g is None:
        raise ConfigError(f"{type(model).__name__} has no .grads: optimizers need a dict name -> gradient array")
    grads = g() if callable(g) else g
    if not isinstance(grads, Mapping):
        raise ConfigError(f"model.grads must be a dict name -> array, got a {type(grads).__name__}")
    return grads


# ---------------------------------------------------------------------------
# optimizers
# ---------------------------------------------------------------------------

class Optimizer:
    """Base class: hyperparameters, per-parameter state slots, steps, state dicts.

    Subclasses define ``_HYPER`` (names in signature order), ``_check_hyper``
    (validation and normalisation), ``_slots`` (state slot names a parameter
    has after ``steps`` steps), ``_init_slot`` and ``_update``.

    Attributes:
        model: the object whose ``parameters()`` are trained.
        device: the :class:`~xrnn.backend.Device` of the parameters (and of the state).
        dtype: the parameters' dtype name; the state has the same dtype.
        steps: number of :meth:`step` calls taken (a Python int).
        lr: the learning rate (a Python float, settable; schedules set it).
    """

    _HYPER: tuple = ()

    def __init__(self, model: Any, **hyper: Any):
        object.__setattr__(self, "_hyper", {})
        self.model = model
        self._set_hyper(hyper)
        params = _params_of(model)
        self.device, self.dtype = self._check_params(params)
        self.steps = 0
        self._state: dict = {}
        with self.device:
            for name, p in params.items():
                self._state[name] = {s: self._init_slot(s, p) for s in self._slots(0)}

    # -- hyperparameters ------------------------------------------------------
    def _set_hyper(self, hyper: Mapping) -> None:
        names = set(self._HYPER)
        missing = [k for k in self._HYPER if k not in hyper]
        unexpected = [k for k in hyper if k not in names]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append("missing " + ", ".join(missing))
            if unexpected:
                parts.append("unexpected " + ", ".join(map(str, unexpected)))
            raise ConfigError(
                f"{type(self).__name__} hyperparameters do not match ({'; '.join(parts)}); "
                f"expected exactly: {', '.join(self._HYPER)}"
            )
        checked = self._check_hyper(dict(hyper))
        checked["lr"] = _non_negative(type(self).__name__, "lr", hyper["lr"])
        object.__setattr__(self, "_hyper", checked)

    def _check_hyper(self, h: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def lr(self) -> float:
        return self._hyper["lr"]

    @lr.setter
    def lr(self, value: Any) -> None:
        self._hyper["lr"] = _non_negative(type(self).__name__, "lr", value)

    @property
    def hyper(self) -> dict:
        """The hyperparameters as a JSON-able dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self._hyper.items()}

    def __getattr__(self, name: str):
        # Read access to the hyperparameters as attributes (opt.betas, opt.momentum).
        hyper = self.__dict__.get("_hyper", {})
        if name in hyper:
            return hyper[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in type(self)._HYPER and name != "lr":
            raise ConfigError(
                f"{type(self).__name__}.{name} is fixed at construction (its state depends on it); "
                f"only lr can change during training: build a new optimizer to change {name}"
            )
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._hyper.items())
        return f"{type(self).__name__}({args})"

    # -- parameters and state ---------------------------------------------------
    def _check_params(self, params: Mapping) -> tuple[Device, str]:
        if not params:
            raise ConfigError(f"{type(self).__name__}: the model has no parameters to optimize"
                              + _unbuilt_hint(self.model, type(self).__name__))
        first_name, first = next(iter(params.items()))
        try:
            dev = device_of(first)
        except DeviceError as e:
            raise ConfigError(f"parameter {first_name!r} is not an array: {e}") from None
        dt = dtype_name(first.dtype)
        for name, p in params.items():
            dev.check(p, f"parameter {name!r}")
            if dtype_name(p.dtype) != dt:
                raise ConfigError(
                    f"parameter {name!r} is {dtype_name(p.dtype)} but {first_name!r} is {dt}; "
                    "an optimizer needs every parameter in one dtype"
                )
            if not dev.xp.isdtype(p.dtype, "real floating"):
                raise ConfigError(f"parameter {name!r} has dtype {dt}; only real floating parameters can be trained")
        return dev, dt

    def _slots(self, steps: int) -> tuple:
        """Names of the state slots each parameter holds after ``steps`` steps."""
        return ()

    def _init_slot(self, slot: str, p):
        """A fresh slot for parameter ``p``: zeros on its device in its dtype."""
        return self.device.zeros(_shape(p), self.dtype)

    @property
    def state(self) -> dict:
        """``{param_name: {slot_name: array}}``: the live state (not copies)."""
        return self._state

    def _follow_model(self, params: Mapping) -> None:
        # A model moved or cast with .to() after the optimizer was built: move
        # the state along (once, at the next step), as torch does on load.
        first = next(iter(params.values()))
        dev, dt = device_of(first), dtype_name(first.dtype)
        if dev == self.device and dt == self.dtype:
            return
        self._check_params(params)
        for slots in self._state.values():
            for k in slots:
                slots[k] = to_device(slots[k], dev, dtype=dt)
        self.device, self.dtype = dev, dt

    # -- the step -------------------------------------------------------------
    def step(self) -> None:
        """Apply one update to every parameter, in place, from ``model.grads``.

        No host synchronisation: every array operation is queued on the device.
        """
        params = _params_of(self.model)
        grads = _grads_of(self.model)
        if params.keys() != self._state.keys():
            new = [k for k in params if k not in self._state]
            gone = [k for k in self._state if k not in params]
            raise StateError(
                f"the model's parameters changed since {type(self).__name__} was built "
                f"(new: {new or 'none'}; gone: {gone or 'none'}); build a new optimizer"
            )
        missing = [k for k in params if k not in grads]
        if missing:
            raise StateError(f"model.grads has no gradient for {', '.join(missing)}")
        self._follow_model(params)
        t = self.steps + 1
        with self.device:
            if not fused_optimizer_step(self, params, grads, t):  # CuPy: one launch for all parameters
                xp = self.device.xp
                for name, p in params.items():
                    self._update(xp, p, grads[name], self._state[name], t)
        self.steps = t

    def _update(self, xp, p, g, st: dict, t: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def zero_grad(self) -> None:
        """Zero the model's gradients (``model.zero_grad()`` when it has one, else in place)."""
        zg = getattr(self.model, "zero_grad", None)
        if callable(zg):
            zg()
            return
        with self.device:
            for g in _grads_of(self.model).values():
                g[...] = 0

    # -- state dicts ------------------------------------------------------------
    def state_dict(self) -> dict:
        """``{"name", "hyper", "steps", "state"}``; arrays are copies on the device.

        ``state`` maps each parameter name to ``{slot_name: array}``; ``hyper``
        holds Python floats, bools and lists only (JSON-able).
        """
        xp = self.device.xp
        with self.device:
            state = {n: {k: xp.asarray(v, copy=True) for k, v in slots.items()} for n, slots in self._state.items()}
        return {"name": type(self).__name__, "hyper": self.hyper, "steps": int(self.steps), "state": state}

    def load_state_dict(self, d: Mapping) -> Optimizer:
        """Restore hyperparameters, step count and state from :meth:`state_dict` output.

        Arrays may come from any library (host NumPy arrays from a checkpoint
        included); they are copied onto the model's device in its dtype.
        Everything is validated before anything changes.

        Raises:
            ConfigError: not a state dict, another optimizer's, or bad hyperparameters/steps.
            ShapeError: parameters or slots missing, unexpected, or of the wrong shape.
        """
        cls = type(self).__name__
        if not isinstance(d, Mapping):
            raise ConfigError(f"{cls}.load_state_dict expects the dict from state_dict(), got a {type(d).__name__}")
        absent = [k for k in ("name", "hyper", "steps", "state") if k not in d]
        if absent:
            raise ConfigError(f"{cls}.load_state_dict: the dict lacks {', '.join(absent)} "
                              "(is it an optimizer state dict?)")
        if d["name"] != cls:
            raise ConfigError(f"this state dict belongs to a {d['name']!r} optimizer, not {cls!r}; "
                              f"build a {d['name']} to load it")
        if not isinstance(d["hyper"], Mapping):
            raise ConfigError(f"{cls}.load_state_dict: 'hyper' must be a dict, got a {type(d['hyper']).__name__}")
        steps = _count(cls, "steps", d["steps"])
        params = _params_of(self.model)
        dev, dt = self._check_params(params)

        # Validate the hyperparameters on a scratch copy, then the state against them.
        saved_hyper = self._hyper
        try:
            self._set_hyper(d["hyper"])
            new_hyper = self._hyper
            slots_needed = self._slots(steps)
        finally:
            object.__setattr__(self, "_hyper", saved_hyper)

        state = d["state"]
        if not isinstance(state, Mapping):
            raise ConfigError(f"{cls}.load_state_dict: 'state' must be a dict, got a {type(state).__name__}")
        missing = [k for k in params if k not in state]
        unexpected = [str(k) for k in state if k not in params]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append("no state for " + ", ".join(missing))
            if unexpected:
                parts.append("state for unknown parameters " + ", ".join(unexpected))
            raise ShapeError(f"{cls} state dict does not match the model: " + "; ".join(parts))
        staged: dict[str, dict[str, Any]] = {}
        for name, p in params.items():
            slots = state[name]
            if not isinstance(slots, Mapping):
                raise ShapeError(f"state for {name!r} must be a dict slot -> array, got a {type(slots).__name__}")
            lacking = [s for s in slots_needed if s not in slots]
            extra = [str(s) for s in slots if s not in slots_needed]
            if lacking or extra:
                raise ShapeError(
                    f"state for {name!r} has slots {sorted(map(str, slots))} but {cls} with "
                    f"{self._describe(new_hyper)} after {steps} steps needs {list(slots_needed)}"
                )
            staged[name] = {}
            for s in slots_needed:
                v = slots[s]
                try:
                    shape = _shape(v)
                except AttributeError:
                    v = np.asarray(v)
                    shape = v.shape
                if shape != _shape(p):
                    raise ShapeError(f"state {name!r}/{s!r} has shape {shape}, the parameter has {_shape(p)}")
                # with a dtype, to_device always copies: the step mutates the state in place
                staged[name][s] = to_device(v, dev, dtype=dt)

        object.__setattr__(self, "_hyper", new_hyper)
        self.steps = steps
        self._state = staged
        self.device, self.dtype = dev, dt
        return self

    def _describe(self, h: dict) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in h.items() if k != "lr")


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, Nesterov and L2 weight decay.

    As ``torch.optim.SGD``: ``g <- g + wd p``; with momentum ``b <- g`` on the
    first step, then ``b <- mu b + (1 - dampening) g``; Nesterov uses
    ``g + mu b``, plain momentum ``b``; ``p <- p - lr g``.
    State: ``momentum_buffer`` (after the first step, when momentum != 0).
    """

    _HYPER = ("lr", "momentum", "dampening", "weight_decay", "nesterov")

    def __init__(self, model: Any, lr: float | None = None, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, learning_rate: float | None = None):
        lr = _lr_alias("SGD", lr, learning_rate, 1e-3)
        super().__init__(model, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov)

    def _check_hyper(self, h):
        o = "SGD"
        h["momentum"] = _non_negative(o, "momentum", h["momentum"])
        h["dampening"] = _number(o, "dampening", h["dampening"])
        h["weight_decay"] = _non_negative(o, "weight_decay", h["weight_decay"])
        h["nesterov"] = _flag(o, "nesterov", h["nesterov"])
        if h["nesterov"] and (h["momentum"] <= 0 or h["dampening"] != 0):
            raise ConfigError(
                f"SGD: nesterov=True needs momentum > 0 and dampening == 0, got momentum={h['momentum']}, "
                f"dampening={h['dampening']}"
            )
        return h

    def _slots(self, steps):
        return ("momentum_buffer",) if self._hyper["momentum"] != 0 and steps > 0 else ()

    def _update(self, xp, p, g, st, t):
        h = self._hyper
        lr, mu, wd = h["lr"], h["momentum"], h["weight_decay"]
        if wd != 0:
            g = g + wd * p
        if mu != 0:
            buf = st.get("momentum_buffer")
            if buf is None:  # torch: the buffer starts as a copy of the first gradient
                buf = st["momentum_buffer"] = xp.asarray(g, copy=True)
            else:
                buf *= mu
                buf += (1.0 - h["dampening"]) * g
            g = g + mu * buf if h["nesterov"] else buf
        p -= lr * g


class Adagrad(Optimizer):
    """Adagrad (min-char-rnn's optimizer), as ``torch.optim.Adagrad``.

    ``g <- g + wd p``; ``clr = lr / (1 + (t - 1) lr_decay)``; ``s <- s + g^2``;
    ``p <- p - clr g / (sqrt(s) + eps)``. State: ``sum`` (starts at
    ``initial_accumulator_value``). min-char-rnn's loop is ``Adagrad(lr=0.1)``
    after ``clip_grad_value(model, 5)``, except that it adds its 1e-8 inside the
    square root (``sqrt(s + 1e-8)``) where torch adds eps outside it.
    """

    _HYPER = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")

    def __init__(self, model: Any, lr: float | None = None, lr_decay: float = 0, weight_decay: float = 0,
                 initial_accumulator_value: float = 0, eps: float = 1e-10, *, learning_rate: float | None = None):
        lr = _lr_alias("Adagrad", lr, learning_rate, 1e-2)
        super().__init__(model, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                         initial_accumulator_value=initial_accumulator_value, eps=eps)

    def _check_hyper(self, h):
        o = "Adagrad"
        for k in ("lr_decay", "weight_decay", "initial_accumulator_value", "eps"):
            h[k] = _non_negative(o, k, h[k])
        return h

    def _slots(self, steps):
        return ("sum",)

    def _init_slot(self, slot, p):
        s = self.device.zeros(_shape(p), self.dtype)
        v = self._hyper["initial_accumulator_value"]
        if v != 0:
            s += v
        return s

    def _update(self, xp, p, g, st, t):
        h = self._hyper
        if h["weight_decay"] != 0:
            g = g + h["weight_decay"] * p
        clr = h["lr"] / (1 + (t - 1) * h["lr_decay"])
        s = st["sum"]
        s += g * g
        p -= (clr * g) / (xp.sqrt(s) + h["eps"])


class RMSprop(Optimizer):
    """RMSprop (char-rnn's optimizer), as ``torch.optim.RMSprop``.

    ``g <- g + wd p``; ``v <- alpha v + (1 - alpha) g^2``; centered:
    ``m <- lerp(m, g, 1 - alpha)``, ``d = sqrt(v - m^2) + eps``, else
    ``d = sqrt(v) + eps``; with momentum ``b <- mu b + g / d``, ``p <- p - lr b``,
    else ``p <- p - lr g / d``. char-rnn's defaults are ``RMSprop(lr=2e-3,
    alpha=0.95)`` with gradients clipped to [-5, 5].
    State: ``square_avg``, ``grad_avg`` (centered), ``momentum_buffer`` (momentum > 0).
    """

    _HYPER = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered")

    def __init__(self, model: Any, lr: float | None = None, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0, momentum: float = 0, centered: bool = False, *,
                 learning_rate: float | None = None):
        lr = _lr_alias("RMSprop", lr, learning_rate, 1e-2)
        super().__init__(model, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                         momentum=momentum, centered=centered)

    def _check_hyper(self, h):
        o = "RMSprop"
        h["alpha"] = _in_unit(o, "alpha", h["alpha"], closed=True)
        for k in ("eps", "weight_decay", "momentum"):
            h[k] = _non_negative(o, k, h[k])
        h["centered"] = _flag(o, "centered", h["centered"])
        return h

    def _slots(self, steps):
        out: tuple[str, ...] = ("square_avg",)
        if self._hyper["centered"]:
            out += ("grad_avg",)
        if self._hyper["momentum"] > 0:
            out += ("momentum_buffer",)
        return out

    def _update(self, xp, p, g, st, t):
        h = self._hyper
        alpha = h["alpha"]
        if h["weight_decay"] != 0:
            g = g + h["weight_decay"] * p
        v = st["square_avg"]
        v *= alpha
        v += (1.0 - alpha) * g * g
        if h["centered"]:
            m = st["grad_avg"]
            m += (1.0 - alpha) * (g - m)  # torch: grad_avg.lerp_(grad, 1 - alpha)
            d = xp.sqrt(v - m * m) + h["eps"]
        else:
            d = xp.sqrt(v) + h["eps"]
        if h["momentum"] > 0:
            b = st["momentum_buffer"]
            b *= h["momentum"]
            b += g / d
            p -= h["lr"] * b
        else:
            p -= (h["lr"] * g) / d


class Adam(Optimizer):
    """Adam, as ``torch.optim.Adam`` (L2 weight decay added to the gradient).

    ``m <- lerp(m, g, 1 - b1)``; ``v <- b2 v + (1 - b2) g^2``; amsgrad:
    ``vmax <- max(vmax, v)`` is used for ``v``; ``p <- p - (lr / (1 - b1^t)) m /
    (sqrt(v) / sqrt(1 - b2^t) + eps)``. State: ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq`` (amsgrad).
    """

    _HYPER = ("lr", "betas", "eps", "weight_decay", "amsgrad")
    _decoupled = False

    def __init__(self, model: Any, lr: float | None = None, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, amsgrad: bool = False, *,
                 learning_rate: float | None = None):
        lr = _lr_alias("Adam", lr, learning_rate, 1e-3)
        super().__init__(model, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)

    def _check_hyper(self, h):
        o = type(self).__name__
        betas = h["betas"]
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
            raise ConfigError(f"{o}: betas must be a pair (beta1, beta2), got {betas!r}")
        h["betas"] = (_in_unit(o, "betas[0]", betas[0]), _in_unit(o, "betas[1]", betas[1]))
        h["eps"] = _non_negative(o, "eps", h["eps"])
        h["weight_decay"] = _non_negative(o, "weight_decay", h["weight_decay"])
        h["amsgrad"] = _flag(o, "amsgrad", h["amsgrad"])
        return h

    def _slots(self, steps):
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if self._hyper["amsgrad"] else ())

    def _update(self, xp, p, g, st, t):
        h = self._hyper
        lr, (b1, b2), wd = h["lr"], h["betas"], h["weight_decay"]
        if wd != 0:
            if self._decoupled:
                p *= 1.0 - lr * wd
            else:
                g = g + wd * p
        m, v = st["exp_avg"], st["exp_avg_sq"]
        m += (1.0 - b1) * (g - m)  # torch: exp_avg.lerp_(grad, 1 - beta1)
        v *= b2
        v += (1.0 - b2) * g * g
        step_size = lr / (1.0 - b1 ** t)
        bc2_sqrt = (1.0 - b2 ** t) ** 0.5
        if h["amsgrad"]:
            vmax = st["max_exp_avg_sq"]
            vmax[...] = xp.maximum(vmax, v)
            v = vmax
        denom = xp.sqrt(v) / bc2_sqrt + h["eps"]
        p -= (step_size * m) / denom


class AdamW(Adam):
    """AdamW, as ``torch.optim.AdamW``: Adam with decoupled weight decay ``p <- p (1 - lr wd)``."""

    _decoupled = True

    def __init__(self, model: Any, lr: float | None = None, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 learning_rate: float | None = None):
        lr = _lr_alias("AdamW", lr, learning_rate, 1e-3)
        super().__init__(model, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


_OPTIMIZER_CLASSES = {"sgd": SGD, "adagrad": Adagrad, "rmsprop": RMSprop, "adam": Adam, "adamw": AdamW}
OPTIMIZERS = tuple(_OPTIMIZER_CLASSES)


def _kwargs_for(cls, owner: str, kwargs: Mapping) -> None:
    accepted = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "model")]
    bad = [k for k in kwargs if k not in accepted]
    if bad:
        raise ConfigError(f"{owner} does not take {', '.join(map(repr, bad))}; it takes {', '.join(accepted)}")


def make_optimizer(name: str, model: Any, **kwargs: Any) -> Optimizer:
    """Build an optimizer by name (``"sgd"``, ``"adagrad"``, ``"rmsprop"``, ``"adam"``, ``"adamw"``; any case)."""
    key = name.lower() if isinstance(name, str) else None
    if key not in _OPTIMIZER_CLASSES:
        raise ConfigError(f"unknown optimizer {name!r}; expected one of: {', '.join(OPTIMIZERS)}")
    cls = _OPTIMIZER_CLASSES[key]
    _kwargs_for(cls, cls.__name__, kwargs)
    return cls(model, **kwargs)


# ---------------------------------------------------------------------------
# gradient clipping
# ---------------------------------------------------------------------------

def _grad_list(model: Any) -> list:
    if isinstance(model, Mapping):
        grads = list(model.values())
    elif hasattr(model, "grads"):
        grads = list(_grads_of(model).values())
    elif isinstance(model, (list, tuple)):
        grads = list(model)
    else:
        raise ConfigError(
            f"clipping takes a model with .grads, a dict of gradients or a list of arrays, got a {type(model).__name__}"
        )
    if not grads:
        raise ConfigError("there are no gradients to clip (the model has no parameters)")
    return grads


def clip_grad_norm(model: Any, max_norm: float, norm_type: float = 2.0) -> Array:
    """Scale all gradients in place so that their global norm is at most ``max_norm``.

    As ``torch.nn.utils.clip_grad_norm_``: ``total`` is the ``norm_type``-norm of
    the per-array norms (the norm of all gradients as one vector; ``inf`` gives
    the largest absolute value) and every gradient is multiplied by
    ``min(1, max_norm / (total + 1e-6))``. The factor is computed on the device,
    so there is no host synchronisation.

    Args:
        model: an object with ``.grads``, a dict of gradients, or a list of arrays.
        max_norm: positive float.
        norm_type: p of the p-norm (> 0), or ``float("inf")`` / ``"inf"``.

    Returns:
        the total norm before clipping: a 0-d array on the gradients' device in
        their dtype (``float(total)`` syncs, when you want to log it).
    """
    max_norm = _number("clip_grad_norm", "max_norm", max_norm)
    if max_norm <= 0:
        raise ConfigError(f"clip_grad_norm: max_norm must be > 0, got {max_norm!r}")
    try:
        p = float(norm_type)
    except (TypeError, ValueError):
        p = float("nan")
    if not p > 0:
        raise ConfigError(f"clip_grad_norm: norm_type must be a positive number or 'inf', got {norm_type!r}")
    grads = _grad_list(model)
    fused = fused_clip_grad_norm(grads, max_norm, p)  # CuPy: two launches for all, the factor stays on the device
    if fused is not None:
        return fused
    total = _total_norm(grads, p)  # ()
    dev = device_of(grads[0])
    xp = dev.xp
    with dev:
        ratio = max_norm / (total + 1e-6)  # ()
        # minimum with a 0-d one, not clip: array-api-compat's CuPy clip assigns through a boolean
        # mask, which reads a count back to the host (a sync per call)
        coef = xp.minimum(ratio, xp.ones_like(ratio))  # ()
        for g in grads:
            g *= coef
    return total


def grad_norm(model: Any, norm_type: float = 2.0) -> Array:
    """The global ``norm_type``-norm of all gradients (what :func:`clip_grad_norm` returns), without clipping.

    A 0-d array on the gradients' device, in their dtype; no host synchronisation.
    """
    return _total_norm(_grad_list(model), float(norm_type))


def _total_norm(grads: list, p: float):
    """The p-norm of the per-array p-norms of ``grads``: a 0-d device array."""
    dev = device_of(grads[0])
    for i, g in enumerate(grads):
        dev.check(g, f"gradient {i}")
    xp = dev.xp
    with dev:
        norms = xp.stack([xp.linalg.vector_norm(g, ord=p) for g in grads])  # (n,)
        # NumPy reductions return scalars, not arrays: asarray keeps it a 0-d array.
        return xp.asarray(xp.linalg.vector_norm(norms, ord=p))  # ()


def clip_grad_value(model: Any, clip: float) -> None:
    """Clamp every gradient element in place to ``[-clip, clip]`` (min-char-rnn uses 5)."""
    clip = _number("clip_grad_value", "clip", clip)
    if clip <= 0:
        raise ConfigError(f"clip_grad_value: clip must be > 0, got {clip!r}")
    grads = _grad_list(model)
    dev = device_of(grads[0])
    xp = dev.xp
    bounds: dict = {}  # dtype name -> (-clip, clip) as 0-d device arrays
    with dev:
        for i, g in enumerate(grads):
            dev.check(g, f"gradient {i}")
            key = dtype_name(g.dtype)
            if key not in bounds:
                hi = xp.full((), clip, dtype=g.dtype, device=dev._create_device())  # ()
                bounds[key] = (-hi, hi)
            lo, hi = bounds[key]
            # maximum/minimum, not clip: array-api-compat's CuPy clip syncs with the host (boolean masks)
            g[...] = xp.minimum(xp.maximum(g, lo), hi)


# ---------------------------------------------------------------------------
# learning-rate schedules
# ---------------------------------------------------------------------------

def _step_arg(step: Any) -> int:
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ConfigError(f"a schedule's step must be an integer >= 0 (steps already taken), got {step!r}")
    return int(step)


class Schedule:
    """A learning rate as a pure function of the step count.

    ``lr_at(step)`` is the rate for the update with index ``step`` (0-based:
    the number of optimizer steps already taken). ``schedule(opt, step)``
    sets ``opt.lr`` to it and returns it; call it before ``opt.step()``
    (``schedule(opt, opt.steps)``). ``to_config()`` gives a JSON-able dict
    and :meth:`Schedule.from_config` rebuilds the schedule from it.
    """

    name = ""

    def lr_at(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, optimizer: Any, step: int) -> float:
        lr = self.lr_at(step)
        optimizer.lr = lr
        return lr

    def to_config(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def from_config(config: Mapping) -> Schedule:
        """Rebuild a schedule from :meth:`to_config` output."""
        if not isinstance(config, Mapping) or "name" not in config:
            raise ConfigError(f"a schedule config is a dict with a 'name', got {config!r}")
        kwargs = {k: v for k, v in config.items() if k != "name"}
        name = config["name"]
        if name == "warmup":
            if "schedule" not in kwargs:
                raise ConfigError("a 'warmup' schedule config needs the inner 'schedule'")
            kwargs["schedule"] = Schedule.from_config(kwargs["schedule"])
            _kwargs_for(Warmup, "Warmup", kwargs)
            return Warmup(**kwargs)
        return make_schedule(name, **kwargs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and type(other) is type(self) and other.to_config() == self.to_config()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_config().items() if k != "name")
        return f"{type(self).__name__}({args})"


class Constant(Schedule):
    """``lr`` at every step."""

    name = "constant"

    def __init__(self, lr: float):
        self.lr = _non_negative("Constant", "lr", lr)

    def lr_at(self, step: int) -> float:
        _step_arg(step)
        return self.lr

    def to_config(self) -> dict:
        return {"name": self.name, "lr": self.lr}


class StepDecay(Schedule):
    """Multiply the rate by ``factor`` at step ``start``, then every ``every`` steps.

    ``lr_at(step) = lr * factor ** n`` with ``n = 0`` before ``start`` and
    ``n = (step - start) // every + 1`` from ``start`` on. ``start`` defaults
    to ``every``, which is ``torch.optim.lr_scheduler.StepLR(step_size=every,
    gamma=factor)`` stepped once per optimizer step.

    char-rnn (``learning_rate_decay=0.97`` applied at the end of every epoch
    from epoch ``learning_rate_decay_after=10`` on) is
    ``StepDecay(lr, 0.97, every=steps_per_epoch, start=10 * steps_per_epoch)``,
    or :meth:`from_epochs`.
    """

    name = "step"

    def __init__(self, lr: float, factor: float = 0.97, every: int = 1, start: int | None = None):
        o = "StepDecay"
        self.lr = _non_negative(o, "lr", lr)
        self.factor = _non_negative(o, "factor", factor)
        self.every = _count(o, "every", every, minimum=1)
        self.start = self.every if start is None else _count(o, "start", start)

    @classmethod
    def from_epochs(cls, lr: float, steps_per_epoch: int, factor: float = 0.97,
                    decay_after_epochs: int = 10) -> StepDecay:
        """char-rnn's decay: ``factor`` at the end of each epoch ``>= decay_after_epochs``.

        char-rnn checks ``epoch >= decay_after`` after the last step of an epoch,
        so ``decay_after_epochs=0`` acts like 1 (the first decay ends epoch 1).
        """
        spe = _count("StepDecay.from_epochs", "steps_per_epoch", steps_per_epoch, minimum=1)
        after = _count("StepDecay.from_epochs", "decay_after_epochs", decay_after_epochs)
        return cls(lr, factor, every=spe, start=max(1, after) * spe)

    def lr_at(self, step: int) -> float:
        step = _step_arg(step)
        if step < self.start:
            return self.lr
        return self.lr * self.factor ** ((step - self.start) // self.every + 1)

    def to_config(self) -> dict:
        return {"name": self.name, "lr": self.lr, "factor": self.factor, "every": self.every, "start": self.start}


class Cosine(Schedule):
    """Cosine annealing from ``lr`` to ``min_lr`` over ``total_steps`` steps.

    ``lr_at(step) = min_lr + (lr - min_lr) (1 + cos(pi step / total_steps)) / 2``
    for ``step <= total_steps`` (``torch.optim.lr_scheduler.CosineAnnealingLR``
    with ``T_max=total_steps``, ``eta_min=min_lr``, closed form) and ``min_lr``
    after it (torch's would rise again: it is periodic).
    """

    name = "cosine"

    def __init__(self, lr: float, total_steps: int, min_lr: float = 0.0):
        o = "Cosine"
        self.lr = _non_negative(o, "lr", lr)
        self.total_steps = _count(o, "total_steps", total_steps, minimum=1)
        self.min_lr = _non_negative(o, "min_lr", min_lr)
        if self.min_lr > self.lr:
            raise ConfigError(f"Cosine: min_lr={min_lr!r} is above lr={lr!r}; the schedule anneals downwards")

    def lr_at(self, step: int) -> float:
        step = _step_arg(step)
        if step >= self.total_steps:
            return self.min_lr
        return self.min_lr + (self.lr - self.min_lr) * (1 + math.cos(math.pi * step / self.total_steps)) / 2

    def to_config(self) -> dict:
        return {"name": self.name, "lr": self.lr, "total_steps": self.total_steps, "min_lr": self.min_lr}


class Warmup(Schedule):
    """Linear warm-up over the first ``warmup_steps`` steps of another schedule.

    ``lr_at(step) = schedule.lr_at(step) * min(1, (step + 1) / warmup_steps)``:
    the first update uses ``1/warmup_steps`` of the rate, update
    ``warmup_steps - 1`` the full rate (torch's ``LinearLR(start_factor=1/W,
    total_iters=W-1)``). The inner schedule runs on the same global step (it
    is not delayed), so ``Warmup(Cosine(lr, total), W)`` still ends at
    ``total``. ``warmup_steps=0`` is no warm-up. ``schedule`` may be a float
    (a :class:`Constant`).
    """

    name = "warmup"

    def __init__(self, schedule: Schedule | float, warmup_steps: int):
        if not isinstance(schedule, Schedule):
            schedule = Constant(schedule)
        self.schedule = schedule
        self.warmup_steps = _count("Warmup", "warmup_steps", warmup_steps)

    def lr_at(self, step: int) -> float:
        step = _step_arg(step)
        lr = self.schedule.lr_at(step)
        if step + 1 < self.warmup_steps:
            return lr * (step + 1) / self.warmup_steps
        return lr

    def to_config(self) -> dict:
        return {"name": self.name, "warmup_steps": self.warmup_steps, "schedule": self.schedule.to_config()}


_SCHEDULE_CLASSES = {"constant": Constant, "step": StepDecay, "cosine": Cosine}
SCHEDULES = tuple(_SCHEDULE_CLASSES)


def make_schedule(name: str, warmup_steps: int = 0, **kwargs: Any) -> Schedule:
    """Build a schedule by name: ``"constant"``, ``"step"`` or ``"cosine"`` (any case).

    ``kwargs`` go to the class (:class:`Constant`, :class:`StepDecay`,
    :class:`Cosine`); ``warmup_steps > 0`` wraps the result in :class:`Warmup`.
    """
    key = name.lower() if isinstance(name, str) else None
    if key not in _SCHEDULE_CLASSES:
        raise ConfigError(f"unknown learning-rate schedule {name!r}; expected one of: {', '.join(SCHEDULES)}")
    cls = _SCHEDULE_CLASSES[key]
    _kwargs_for(cls, cls.__name__, kwargs)
    required = [n for n, prm in inspect.signature(cls).parameters.items()
                if n != "self" and prm.default is inspect.Parameter.empty and n not in kwargs]
    if required:
        raise ConfigError(f"schedule {key!r} needs {', '.join(required)}")
    sched = cls(**kwargs)
    warmup_steps = _count("make_schedule", "warmup_steps", warmup_steps)
    return Warmup(sched, warmup_steps) if warmup_steps > 0 else sched
