"""Keras-flavoured optimizers (xrnn.keras_optim) step for step against Keras 3's own optimizers,
their defaults against ``keras.optimizers.<Name>().get_config()``, and the config mapping."""

from __future__ import annotations

import os

import numpy as np
import pytest

from xrnn import keras_optim as KO
from xrnn import optim
from xrnn.backend import resolve_device, to_numpy
from xrnn.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # keras' own, on NumPy 2

class _Params:
    """The smallest model an optimizer takes: parameters() and grads, dicts of arrays."""

    def __init__(self, arrays: dict, dtype="float32"):
        dev = resolve_device("cpu")
        self._p = {k: dev.asarray(v, dtype=dtype) for k, v in arrays.items()}
        self.grads = {k: dev.zeros(v.shape, dtype) for k, v in arrays.items()}

    def parameters(self):
        return self._p


def _keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:  # not importorskip: keras without a usable torch backend raises ImportError, not ModuleNotFoundError
        import keras
    except ImportError as e:
        pytest.skip(f"keras is needed: {e}")
    if keras.backend.backend() != "torch":
        pytest.skip("keras was imported with another backend")
    return keras


CASES = [
    ("SGD", {}),
    ("SGD", {"learning_rate": 0.1, "momentum": 0.9}),
    ("SGD", {"learning_rate": 0.1, "momentum": 0.8, "nesterov": True, "weight_decay": 0.1}),
    ("RMSprop", {}),
    ("RMSprop", {"learning_rate": 0.01, "momentum": 0.5, "centered": True, "weight_decay": 0.05}),
    ("Adagrad", {}),
    ("Adagrad", {"learning_rate": 0.1, "initial_accumulator_value": 0.0, "epsilon": 1e-8}),
    ("Adam", {}),
    ("Adam", {"learning_rate": 0.01, "amsgrad": True, "epsilon": 1e-3, "weight_decay": 0.01}),
    ("AdamW", {}),
    ("AdamW", {"learning_rate": 0.05, "weight_decay": 0.1}),
]


@pytest.mark.parametrize("cname,kw", CASES)
def test_keras_optimizers_step_as_keras_does(cname, kw):
    """Five steps from the same weights with the same gradients: Keras' optimizer and xrnn's agree to float32
    rounding, where torch's rule (xrnn.optim) would not (different epsilon placement / decay / defaults)."""
    keras = _keras()
    rng = np.random.default_rng(0)
    w0 = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(4) * 1e-3}
    grads = [{k: rng.standard_normal(v.shape) * (1e-3 if k == "b" else 1.0) for k, v in w0.items()} for _ in range(5)]
    kopt = getattr(keras.optimizers, cname)(**kw)
    kvars = {k: keras.Variable(v.astype(np.float32)) for k, v in w0.items()}
    model = _Params(w0)
    cls, kwargs, _ = KO.from_keras({"class_name": cname, "config": kopt.get_config()})
    ours = cls(model, **kwargs)
    for g in grads:
        kopt.apply_gradients([(keras.ops.convert_to_tensor(g[k].astype(np.float32)), kvars[k]) for k in w0])
        for k in w0:
            model.grads[k][...] = g[k].astype(np.float32)
        ours.step()
    for k in w0:
        want = keras.ops.convert_to_numpy(kvars[k])
        got = to_numpy(model.parameters()[k])
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6, err_msg=f"{cname} {kw} {k}")
        assert np.abs(got - w0[k]).max() > 1e-6  # it moved


@pytest.mark.parametrize("name", sorted(KO.KERAS_OPTIMIZERS))
def test_defaults_are_keras_defaults(name):
    keras = _keras()
    cfg = keras.optimizers.get(name).get_config()
    opt = KO.make_keras_optimizer(name, _Params({"a": np.zeros(2)}))
    h = opt.hyper
    assert h["lr"] == pytest.approx(cfg["learning_rate"], rel=1e-7)
    assert h["weight_decay"] == pytest.approx(cfg["weight_decay"] or 0.0)
    for k, v in cfg.items():
        if k in h and k != "weight_decay":
            assert h[k] == pytest.approx(v), (name, k)
    spelled = {"sgd": (0.01,), "rmsprop": (1e-3, 0.9, 1e-7), "adagrad": (1e-3, 0.1, 1e-7),
               "adam": (1e-3, 1e-7), "adamw": (1e-3, 1e-7, 0.004)}[name]
    vals = [h["lr"]] + [h[k] for k in ("rho", "initial_accumulator_value", "epsilon", "weight_decay")
                        if k in h and h[k]]
    assert tuple(vals) == spelled


def test_learning_rate_and_lr_are_one_argument():
    m = _Params({"a": np.zeros(2)})
    assert KO.KerasAdam(m, lr=0.5).lr == 0.5 == KO.KerasAdam(m, learning_rate=0.5).lr
    with pytest.raises(ConfigError, match="not both"):
        KO.KerasSGD(m, lr=0.1, learning_rate=0.1)
    for cls in (optim.SGD, optim.Adagrad, optim.RMSprop, optim.Adam, optim.AdamW):
        assert cls(m, learning_rate=0.25).lr == 0.25 == cls(m, lr=0.25).lr
        with pytest.raises(ConfigError, match="not both"):
            cls(m, lr=0.1, learning_rate=0.1)
    assert optim.make_optimizer("adam", m, learning_rate=0.3).lr == 0.3
    assert optim.SGD(m).lr == 1e-3 and optim.RMSprop(m).alpha == 0.99  # torch's defaults stay


def test_keras_configs_map_and_unknown_keys_are_refused():
    cls, kw, clip = KO.from_keras({"module": "keras.optimizers", "class_name": "RMSprop",
                                   "config": {"name": "rmsprop", "learning_rate": 0.01, "rho": 0.8,
                                              "global_clipnorm": 1.0, "clipvalue": None, "use_ema": False}})
    assert cls is KO.KerasRMSprop and kw == {"learning_rate": 0.01, "rho": 0.8}
    assert clip == {"clipnorm": 1.0, "clipvalue": None}
    with pytest.raises(ConfigError, match="unknown config key.*'foo'"):
        KO.from_keras({"class_name": "Adam", "config": {"foo": 1}})
    with pytest.raises(ConfigError, match="'Nadam' is not supported"):
        KO.from_keras({"class_name": "Nadam", "config": {}})
    with pytest.raises(ConfigError, match="clipnorm=1.0 is not supported.*global_clipnorm"):
        KO.from_keras({"class_name": "SGD", "config": {"clipnorm": 1.0}})
    with pytest.raises(ConfigError, match="use_ema"):
        KO.from_keras({"class_name": "SGD", "config": {"use_ema": True}})
    with pytest.raises(ConfigError, match="schedule"):
        KO.from_keras({"class_name": "SGD", "config": {"learning_rate": {"class_name": "ExponentialDecay"}}})
    with pytest.raises(ConfigError, match="unknown optimizer 'adamax'"):
        KO.from_keras("adamax")
