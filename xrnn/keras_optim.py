"""Keras 3's optimizers: Keras' names, defaults and update rules, on xrnn's optimizer machinery.

``Sequential.compile(optimizer="<name>")`` builds these, so a Keras script
copied over trains as it does in Keras; :mod:`xrnn.optim`'s classes keep
``torch.optim``'s defaults and rules (they are torch-exact). Defaults are
those of ``keras.optimizers.<Name>().get_config()`` in Keras 3.15::

    KerasSGD(model, learning_rate=0.01, momentum=0.0, nesterov=False)
    KerasRMSprop(model, learning_rate=1e-3, rho=0.9, momentum=0.0, epsilon=1e-7, centered=False)
    KerasAdagrad(model, learning_rate=1e-3, initial_accumulator_value=0.1, epsilon=1e-7)
    KerasAdam(model, learning_rate=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False)
    KerasAdamW(model, learning_rate=1e-3, weight_decay=0.004, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
               amsgrad=False)

Every class also takes ``weight_decay`` (None = off) and ``lr=`` as another
name for ``learning_rate`` (giving both is an error).

Where Keras' rules differ from torch's (and so from :mod:`xrnn.optim`):

* **weight decay** is decoupled in every Keras optimizer: before the update,
  ``p <- p (1 - wd lr)`` (torch's SGD/RMSprop/Adagrad/Adam add ``wd * p`` to
  the gradient instead; torch's AdamW decays as Keras does).
* **RMSprop**: ``v <- rho v + (1 - rho) g^2``; ``p <- p - lr g / sqrt(v + eps)``
  (epsilon *inside* the square root; torch: ``sqrt(v) + eps``). Centered:
  ``sqrt(v - a^2 + eps)``. Momentum ``m <- mu m + lr g / sqrt(...)``, ``p <- p - m``.
* **Adagrad**: the accumulator starts at ``initial_accumulator_value`` (0.1),
  ``p <- p - lr g / sqrt(acc + eps)`` (epsilon inside the square root, as in
  min-char-rnn; torch: ``sqrt(acc) + eps``) and no ``lr_decay``.
* **Adam/AdamW**: ``p <- p - alpha m / (sqrt(v) + eps)`` with ``alpha = lr
  sqrt(1 - b2^t) / (1 - b1^t)``; torch divides by ``sqrt(v) / sqrt(1 - b2^t) +
  eps``, which is Keras' rule with ``eps / sqrt(1 - b2^t)`` in place of ``eps``.
* **SGD** with momentum keeps ``m <- mu m - lr g``, ``p <- p + m`` (Nesterov:
  ``p <- p + mu m - lr g``): torch's rule for a constant learning rate.

Slots are named as Keras names them (``momentum``, ``velocity``,
``velocity_hat``, ``accumulator``, ``average_gradient``). Each step's
arithmetic runs in the parameters' dtype on their device (no host
synchronisation); ``tests/test_keras_optim.py`` checks several steps against
Keras' own optimizers on the same weights and gradients.

:func:`from_keras` maps a Keras optimizer spelled as a name, a
``{"class_name": ..., "config": {...}}`` dict (what a ``.keras`` file's
``compile_config`` holds) or a live Keras optimizer object onto these classes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError
from .optim import Optimizer, _flag, _in_unit, _lr_alias, _non_negative, _number

__all__ = [
    "KerasSGD",
    "KerasRMSprop",
    "KerasAdagrad",
    "KerasAdam",
    "KerasAdamW",
    "KERAS_OPTIMIZERS",
    "make_keras_optimizer",
    "from_keras",
]


def _decay(owner: str, wd: Any) -> float:
    return 0.0 if wd is None else _non_negative(owner, "weight_decay", wd)


class _KerasOptimizer(Optimizer):
    """Keras' step order: decoupled weight decay ``p *= 1 - wd * lr``, then the rule's update."""

    keras_name: str  # the class name in Keras, set by each subclass

    def _update(self, xp, p, g, st, t):
        h = self._hyper
        wd = h["weight_decay"]
        if wd != 0:
            p *= 1.0 - wd * h["lr"]  # Keras' torch backend: one factor (others: p - p * wd * lr, the same math)
        self._rule(xp, p, g, st, t)

    def _rule(self, xp, p, g, st, t):  # pragma: no cover - abstract
        raise NotImplementedError


class KerasSGD(_KerasOptimizer):
    """``keras.optimizers.SGD``: ``p <- p - lr g``; momentum ``m <- mu m - lr g``, ``p <- p + m``
    (Nesterov ``p <- p + mu m - lr g``). State: ``momentum`` (when momentum != 0)."""

    keras_name = "SGD"  # the class name in Keras

    _HYPER = ("lr", "momentum", "nesterov", "weight_decay")

    def __init__(self, model: Any, learning_rate: float | None = None, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float | None = None, *, lr: float | None = None):
        super().__init__(model, lr=_lr_alias("KerasSGD", lr, learning_rate, 0.01), momentum=momentum,
                         nesterov=nesterov, weight_decay=weight_decay)

    def _check_hyper(self, h):
        o = "KerasSGD"
        h["momentum"] = _in_unit(o, "momentum", h["momentum"], closed=True)
        h["nesterov"] = _flag(o, "nesterov", h["nesterov"])
        h["weight_decay"] = _decay(o, h["weight_decay"])
        return h

    def _slots(self, steps):
        return ("momentum",) if self._hyper["momentum"] != 0 else ()

    def _rule(self, xp, p, g, st, t):
        h = self._hyper
        lr, mu = h["lr"], h["momentum"]
        if mu == 0:
            p -= g * lr
            return
        m = st["momentum"]
        m[...] = m * mu - g * lr
        if h["nesterov"]:
            p += m * mu - g * lr
        else:
            p += m


class KerasRMSprop(_KerasOptimizer):
    """``keras.optimizers.RMSprop``: ``v <- rho v + (1 - rho) g^2``, ``p <- p - lr g / sqrt(v + eps)``.

    State: ``velocity``; ``average_gradient`` (centered); ``momentum`` (momentum > 0).
    """

    keras_name = "RMSprop"  # the class name in Keras

    _HYPER = ("lr", "rho", "momentum", "epsilon", "centered", "weight_decay")

    def __init__(self, model: Any, learning_rate: float | None = None, rho: float = 0.9, momentum: float = 0.0,
                 epsilon: float = 1e-7, centered: bool = False, weight_decay: float | None = None, *,
                 lr: float | None = None):
        super().__init__(model, lr=_lr_alias("KerasRMSprop", lr, learning_rate, 1e-3), rho=rho, momentum=momentum,
                         epsilon=epsilon, centered=centered, weight_decay=weight_decay)

    def _check_hyper(self, h):
        o = "KerasRMSprop"
        h["rho"] = _in_unit(o, "rho", h["rho"], closed=True)
        h["momentum"] = _non_negative(o, "momentum", h["momentum"])
        h["epsilon"] = _non_negative(o, "epsilon", h["epsilon"])
        h["centered"] = _flag(o, "centered", h["centered"])
        h["weight_decay"] = _decay(o, h["weight_decay"])
        return h

    def _slots(self, steps):
        h = self._hyper
        return (("velocity",) + (("average_gradient",) if h["centered"] else ())
                + (("momentum",) if h["momentum"] > 0 else ()))

    def _rule(self, xp, p, g, st, t):
        h = self._hyper
        rho, eps = h["rho"], h["epsilon"]
        v = st["velocity"]
        v[...] = v * rho + (g * g) * (1.0 - rho)
        if h["centered"]:
            a = st["average_gradient"]
            a[...] = a * rho + g * (1.0 - rho)
            den = v - a * a + eps
        else:
            den = v + eps
        inc = (g * h["lr"]) / xp.sqrt(den)
        if h["momentum"] > 0:
            m = st["momentum"]
            m[...] = m * h["momentum"] + inc
            p -= m
        else:
            p -= inc


class KerasAdagrad(_KerasOptimizer):
    """``keras.optimizers.Adagrad``: ``acc <- acc + g^2``, ``p <- p - lr g / sqrt(acc + eps)``.

    State: ``accumulator`` (starts at ``initial_accumulator_value``). With
    ``initial_accumulator_value=0, epsilon=1e-8, learning_rate=0.1`` this is
    min-char-rnn's update, ``param += -lr * dparam / np.sqrt(mem + 1e-8)``.
    """

    keras_name = "Adagrad"  # the class name in Keras

    _HYPER = ("lr", "initial_accumulator_value", "epsilon", "weight_decay")

    def __init__(self, model: Any, learning_rate: float | None = None, initial_accumulator_value: float = 0.1,
                 epsilon: float = 1e-7, weight_decay: float | None = None, *, lr: float | None = None):
        super().__init__(model, lr=_lr_alias("KerasAdagrad", lr, learning_rate, 1e-3),
                         initial_accumulator_value=initial_accumulator_value, epsilon=epsilon,
                         weight_decay=weight_decay)

    def _check_hyper(self, h):
        o = "KerasAdagrad"
        h["initial_accumulator_value"] = _non_negative(o, "initial_accumulator_value", h["initial_accumulator_value"])
        h["epsilon"] = _non_negative(o, "epsilon", h["epsilon"])
        h["weight_decay"] = _decay(o, h["weight_decay"])
        return h

    def _slots(self, steps):
        return ("accumulator",)

    def _init_slot(self, slot, p):
        s = super()._init_slot(slot, p)
        v = self._hyper["initial_accumulator_value"]
        if v != 0:
            s += v
        return s

    def _rule(self, xp, p, g, st, t):
        acc = st["accumulator"]
        acc += g * g
        p -= (g * self._hyper["lr"]) / xp.sqrt(acc + self._hyper["epsilon"])


class KerasAdam(_KerasOptimizer):
    """``keras.optimizers.Adam``: ``m += (g - m)(1 - b1)``, ``v += (g^2 - v)(1 - b2)``,
    ``p <- p - alpha m / (sqrt(v) + eps)``, ``alpha = lr sqrt(1 - b2^t) / (1 - b1^t)``.

    State: ``momentum``, ``velocity``, ``velocity_hat`` (amsgrad).
    """

    keras_name = "Adam"  # the class name in Keras

    _HYPER = ("lr", "beta_1", "beta_2", "epsilon", "amsgrad", "weight_decay")
    _default_decay: float | None = None

    def __init__(self, model: Any, learning_rate: float | None = None, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-7, amsgrad: bool = False, weight_decay: float | None = None, *,
                 lr: float | None = None):
        super().__init__(model, lr=_lr_alias(type(self).__name__, lr, learning_rate, 1e-3), beta_1=beta_1,
                         beta_2=beta_2, epsilon=epsilon, amsgrad=amsgrad,
                         weight_decay=self._default_decay if weight_decay is None else weight_decay)

    def _check_hyper(self, h):
        o = type(self).__name__
        h["beta_1"] = _in_unit(o, "beta_1", h["beta_1"])
        h["beta_2"] = _in_unit(o, "beta_2", h["beta_2"])
        h["epsilon"] = _non_negative(o, "epsilon", h["epsilon"])
        h["amsgrad"] = _flag(o, "amsgrad", h["amsgrad"])
        h["weight_decay"] = _decay(o, h["weight_decay"])
        return h

    def _slots(self, steps):
        return ("momentum", "velocity") + (("velocity_hat",) if self._hyper["amsgrad"] else ())

    def _rule(self, xp, p, g, st, t):
        h = self._hyper
        b1, b2 = h["beta_1"], h["beta_2"]
        alpha = h["lr"] * math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
        m, v = st["momentum"], st["velocity"]
        m += (g - m) * (1.0 - b1)
        v += (g * g - v) * (1.0 - b2)
        if h["amsgrad"]:
            vh = st["velocity_hat"]
            vh[...] = xp.maximum(vh, v)
            v = vh
        p -= (m * alpha) / (xp.sqrt(v) + h["epsilon"])


class KerasAdamW(KerasAdam):
    """``keras.optimizers.AdamW``: :class:`KerasAdam` with decoupled weight decay, default 0.004."""

    keras_name = "AdamW"  # the class name in Keras

    _default_decay = 0.004

    def __init__(self, model: Any, learning_rate: float | None = None, weight_decay: float | None = None,
                 beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7, amsgrad: bool = False, *,
                 lr: float | None = None):
        super().__init__(model, learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                         amsgrad=amsgrad, weight_decay=weight_decay, lr=lr)


#: Keras' optimizer names (lower case, as ``compile(optimizer=...)`` spells them) -> class
KERAS_OPTIMIZERS: dict[str, type[_KerasOptimizer]] = {
    "sgd": KerasSGD, "rmsprop": KerasRMSprop, "adagrad": KerasAdagrad, "adam": KerasAdam, "adamw": KerasAdamW}

#: Keras class names -> ours
_BY_CLASS = {c.keras_name: c for c in KERAS_OPTIMIZERS.values()}

# keys of every Keras 3 optimizer config, and the values xrnn can honour
_BASE_KEYS = ("name", "learning_rate", "weight_decay", "clipnorm", "global_clipnorm", "clipvalue", "use_ema",
              "ema_momentum", "ema_overwrite_frequency", "loss_scale_factor", "gradient_accumulation_steps")
_OWN_KEYS = {
    KerasSGD: ("momentum", "nesterov"),
    KerasRMSprop: ("rho", "momentum", "epsilon", "centered"),
    KerasAdagrad: ("initial_accumulator_value", "epsilon"),
    KerasAdam: ("beta_1", "beta_2", "epsilon", "amsgrad"),
    KerasAdamW: ("beta_1", "beta_2", "epsilon", "amsgrad"),
}


def make_keras_optimizer(name: str, model: Any, **kwargs: Any) -> Optimizer:
    """A Keras optimizer by its Keras name (``"sgd"``, ``"rmsprop"``, ``"adagrad"``, ``"adam"``, ``"adamw"``)."""
    key = name.lower() if isinstance(name, str) else None
    cls = KERAS_OPTIMIZERS.get(key)
    if cls is None:
        raise ConfigError(f"unknown optimizer {name!r}; expected one of: {', '.join(KERAS_OPTIMIZERS)}")
    return cls(model, **kwargs)


def from_keras(spec: Any) -> tuple[type[_KerasOptimizer], dict, dict]:
    """Map a Keras optimizer description onto ``(class, kwargs, clipping)``.

    Args:
        spec: a name (``"adam"``), a ``{"class_name": "Adam", "config": {...}}``
            dict (``module``/``registered_name`` keys allowed), or a Keras
            optimizer object (its ``get_config()`` is read; nothing else of it
            is used).
    Returns:
        the optimizer class, its keyword arguments, and ``{"clipnorm": ...,
        "clipvalue": ...}`` for ``compile`` (Keras' ``global_clipnorm`` is
        xrnn's global ``clipnorm``; values None when not set).
    Raises:
        ConfigError: an optimizer xrnn does not have, a key it does not know,
            or an option it cannot honour (per-variable ``clipnorm``, EMA,
            loss scaling, gradient accumulation, a learning-rate schedule),
            naming it.
    """
    if isinstance(spec, str):
        key = spec.lower()
        if key not in KERAS_OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {spec!r}; expected one of: {', '.join(KERAS_OPTIMIZERS)}")
        return KERAS_OPTIMIZERS[key], {}, {"clipnorm": None, "clipvalue": None}
    if isinstance(spec, Mapping):
        extra = [k for k in spec if k not in ("class_name", "config", "module", "registered_name")]
        if "class_name" not in spec or extra:
            raise ConfigError(
                "a Keras optimizer config is a dict {'class_name': 'Adam', 'config': {...}}"
                + (f"; unexpected keys {', '.join(map(repr, extra))}" if extra else "")
            )
        cname, config = spec["class_name"], spec.get("config") or {}
    elif callable(getattr(spec, "get_config", None)):
        cname, config = type(spec).__name__, spec.get_config()
    else:
        raise ConfigError(f"a Keras optimizer is a name, a config dict or a Keras optimizer, got {type(spec).__name__}")
    cls = _BY_CLASS.get(cname)
    if cls is None:
        raise ConfigError(f"Keras optimizer {cname!r} is not supported; xrnn has: {', '.join(_BY_CLASS)}")
    if not isinstance(config, Mapping):
        raise ConfigError(f"the config of Keras optimizer {cname} must be a dict, got {type(config).__name__}")
    allowed = _BASE_KEYS + _OWN_KEYS[cls]
    unknown = [k for k in config if k not in allowed]
    if unknown:
        raise ConfigError(
            f"Keras optimizer {cname}: unknown config key(s) {', '.join(map(repr, unknown))}; "
            f"xrnn maps: {', '.join(allowed)}"
        )
    for k in ("clipnorm", "ema_overwrite_frequency", "loss_scale_factor", "gradient_accumulation_steps", "use_ema"):
        if config.get(k) not in (None, False):
            hint = (" (Keras clips each variable's norm on its own; xrnn clips the global norm: use "
                    "global_clipnorm)" if k == "clipnorm" else "")
            raise ConfigError(f"Keras optimizer {cname}: {k}={config[k]!r} is not supported{hint}")
    kwargs = {k: config[k] for k in _OWN_KEYS[cls] if k in config}
    lr = config.get("learning_rate")
    if lr is not None:
        if isinstance(lr, Mapping):
            raise ConfigError(
                f"Keras optimizer {cname}: a learning-rate schedule ({lr.get('class_name', 'dict')}) is not "
                "supported; use a number, and xrnn.optim schedules in your own loop"
            )
        kwargs["learning_rate"] = _number(cname, "learning_rate", lr)
    if config.get("weight_decay") is not None:
        kwargs["weight_decay"] = config["weight_decay"]
    clip = {"clipnorm": config.get("global_clipnorm"), "clipvalue": config.get("clipvalue")}
    return cls, kwargs, clip
