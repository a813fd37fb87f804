"""Keras layouts of the weights (get_weights/set_weights) on every backend, without Keras itself: the
layouts derived by hand from PyTorch's, round trips, error messages; and Sequential checkpoints with
Keras' optimizers resuming exactly. (Against real Keras: tests/test_keras_io.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from xrnn import keras_optim as KO
from xrnn import layers as X
from xrnn import optim
from xrnn.errors import ConfigError, ShapeError
from xrnn.sequential import Sequential, load_model

from conftest import to_np


def _np(a):
    return np.asarray(to_np(a))


def _model(dev, seed):
    return Sequential([X.Input((5, 3)), X.LSTM(4, return_sequences=True),
                       X.Bidirectional(X.GRU(3, return_sequences=True), merge_mode="sum"),
                       X.SimpleRNN(2, return_sequences=True), X.TimeDistributed(X.Dense(3)),
                       X.Dropout(0.2), X.GRU(2, use_bias=False), X.Dense(2, activation="softmax")],
                      device=dev, dtype="float64", seed=seed)


def test_keras_shapes_and_round_trip_on_every_backend(device):
    a, b = _model(device, 0), _model(device, 1)
    w = a.get_weights()
    assert all(isinstance(v, np.ndarray) for v in w)
    assert [v.shape for v in w] == [
        (3, 16), (4, 16), (16,),                                  # LSTM: kernel, recurrent_kernel, bias
        (4, 9), (3, 9), (2, 9), (4, 9), (3, 9), (2, 9),           # Bidirectional(GRU): forward, backward
        (3, 2), (2, 2), (2,),                                     # SimpleRNN
        (2, 3), (3,),                                             # TimeDistributed(Dense)
        (3, 6), (2, 6),                                           # GRU(use_bias=False)
        (2, 2), (2,),                                             # Dense
    ]
    x = np.random.default_rng(0).standard_normal((3, 5, 3))
    assert np.abs(_np(a.predict(x)) - _np(b.predict(x))).max() > 1e-6
    b.set_weights([device.asarray(v, dtype="float64") for v in w])  # device arrays are taken too
    np.testing.assert_array_equal(_np(b.predict(x)), _np(a.predict(x)))
    for u, v in zip(b.get_weights(), w):
        np.testing.assert_array_equal(u, v)
    for name, p in b.parameters().items():
        device.check(p, name)


def test_lstm_and_dense_layouts_are_transposes():
    """Keras' LSTM gates i, f, c, o are PyTorch's i, f, g, o: kernel = weight_ih.T; Dense kernel = weight.T."""
    m = Sequential([X.Input((2, 3)), X.LSTM(2), X.Dense(4), X.Dense(1, use_bias=False)], seed=0)
    sd = {k: _np(v) for k, v in m.state_dict().items()}
    k, r, bias, dk, db, k2 = m.get_weights()
    np.testing.assert_array_equal(k, sd["lstm.weight_ih_l0"].T)
    np.testing.assert_array_equal(r, sd["lstm.weight_hh_l0"].T)
    np.testing.assert_array_equal(bias, sd["lstm.bias_ih_l0"])
    np.testing.assert_array_equal(dk, sd["dense.weight"].T)
    np.testing.assert_array_equal(db, sd["dense.bias"])
    np.testing.assert_array_equal(k2, sd["dense_1.weight"].T)
    e = Sequential([X.Input((3,)), X.Embedding(5, 2)], seed=0)
    np.testing.assert_array_equal(e.get_weights()[0], _np(e.state_dict()["embedding.weight"]))
    assert Sequential([X.Input((2, 3)), X.Masking(), X.Dropout(0.1)]).get_weights() == []


def test_set_weights_errors_name_the_layer_and_shape():
    xm = Sequential([X.Input((5, 3)), X.LSTM(4), X.Dense(2)], seed=0)
    w = xm.get_weights()
    with pytest.raises(ShapeError, match=r"takes 5 weight arrays.*lstm \(LSTM\): kernel \(3, 16\), "
                                         r"recurrent_kernel \(4, 16\), bias \(16,\).*got 4"):
        xm.set_weights(w[:4])
    with pytest.raises(ShapeError, match=r"layer 'dense' \(Dense\): kernel must have shape \(4, 2\), got \(2, 4\)"):
        xm.set_weights(w[:3] + [w[3].T, w[4]])
    with pytest.raises(ShapeError, match=r"layer 'lstm' \(LSTM\) takes 3 weight array\(s\)"):
        xm.layers[0].set_weights(w[:2])
    before = [a.copy() for a in xm.get_weights()]
    with pytest.raises(ShapeError):
        xm.set_weights([a + 1 for a in w[:4]] + [w[4][:1]])  # the last one is wrong: nothing changes
    for a, b in zip(xm.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    gru = Sequential([X.Input((2, 3)), X.GRU(2)], seed=0).layers[0]
    with pytest.raises(ShapeError, match=r"bias must have shape \(2, 6\)"):
        gru.set_weights(gru.get_weights()[:2] + [np.zeros(12)])


def test_gru_keras_layout_is_z_r_h_with_two_bias_rows():
    """Keras' GRU blocks z, r, h are PyTorch's blocks 1, 0, 2; the (2, 3u) bias is [input bias, recurrent bias]."""
    xm = Sequential([X.Input((2, 3)), X.GRU(2)], seed=0)
    layer = xm.layers[0]
    sd = {k: _np(v) for k, v in layer.parameters().items()}
    kernel, rec, bias = layer.get_weights()
    U = 2
    for kb, tb in ((0, 1), (1, 0), (2, 2)):
        np.testing.assert_array_equal(kernel[:, kb * U:(kb + 1) * U], sd["weight_ih_l0"][tb * U:(tb + 1) * U].T)
        np.testing.assert_array_equal(rec[:, kb * U:(kb + 1) * U], sd["weight_hh_l0"][tb * U:(tb + 1) * U].T)
        np.testing.assert_array_equal(bias[0, kb * U:(kb + 1) * U], sd["bias_ih_l0"][tb * U:(tb + 1) * U])
        np.testing.assert_array_equal(bias[1, kb * U:(kb + 1) * U], sd["bias_hh_l0"][tb * U:(tb + 1) * U])


def test_checkpoint_with_keras_optimizer_resumes_exactly(tmp_path):
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((8, 4, 2)), rng.standard_normal((8, 1))
    for spec in ("adam", "rmsprop", {"class_name": "SGD", "config": {"learning_rate": 0.05, "momentum": 0.9}}):
        a = Sequential([X.Input((4, 2)), X.LSTM(3), X.Dense(1)], dtype="float64", seed=0)
        a.compile(optimizer=spec, loss="mse")
        a.fit(x, y, epochs=2, batch_size=4, shuffle=False, verbose=0)
        a.save(tmp_path / "a.ckpt")
        b = load_model(tmp_path / "a.ckpt")
        assert type(b.optimizer) is type(a.optimizer) and type(a.optimizer).__name__.startswith("Keras")
        assert b.optimizer.hyper == a.optimizer.hyper and b.optimizer.steps == 4
        for m in (a, b):
            m.fit(x, y, epochs=1, batch_size=4, shuffle=False, verbose=0)
        for u, v in zip(a.get_weights(), b.get_weights()):
            np.testing.assert_array_equal(u, v)
    u = Sequential([X.LSTM(3), X.Dense(1)], seed=0)  # not built: the config itself is saved
    u.compile(optimizer={"class_name": "RMSprop", "config": {"learning_rate": 0.02, "rho": 0.5}}, loss="mse")
    u.save(tmp_path / "u.ckpt")
    v = load_model(tmp_path / "u.ckpt")
    v.fit(x, y, epochs=1, verbose=0)
    assert isinstance(v.optimizer, KO.KerasRMSprop) and (v.optimizer.lr, v.optimizer.rho) == (0.02, 0.5)
    c = Sequential([X.Input((4, 2)), X.LSTM(3), X.Dense(1)], seed=0)
    c.compile(optimizer=optim.Adam(c, learning_rate=0.01), loss="mse")  # torch's Adam stays torch's Adam
    c.fit(x, y, epochs=1, verbose=0)
    c.save(tmp_path / "c.ckpt")
    assert type(load_model(tmp_path / "c.ckpt").optimizer) is optim.Adam


def test_compile_maps_keras_optimizer_configs():
    m = Sequential([X.Input((4, 2)), X.LSTM(3), X.Dense(1)], seed=0)
    m.compile(optimizer={"class_name": "AdamW", "config": {"learning_rate": 0.01, "clipvalue": 0.5}}, loss="mse")
    assert isinstance(m.optimizer, KO.KerasAdamW) and m.optimizer.weight_decay == 0.004
    assert m.optimizer.lr == 0.01 and m._compiled["clipvalue"] == 0.5
    m.compile(optimizer="sgd", loss="mse")
    assert isinstance(m.optimizer, KO.KerasSGD) and m.optimizer.lr == 0.01
    m.compile(optimizer="adagrad", loss="mse", learning_rate=0.2)
    assert m.optimizer.lr == 0.2 and m.optimizer.initial_accumulator_value == 0.1 and m.optimizer.epsilon == 1e-7
    with pytest.raises(ConfigError, match="unknown config key"):
        m.compile(optimizer={"class_name": "Adam", "config": {"betas": [0.9, 0.99]}})
    with pytest.raises(ConfigError, match="sets learning_rate already"):
        m.compile(optimizer={"class_name": "Adam", "config": {"learning_rate": 0.1}}, learning_rate=0.2)
