"""Every error the core layers promise: what was wrong, what was expected."""

import numpy as np
import pytest

import xrnn
from xrnn.errors import ConfigError, DTypeError, ShapeError, StateError, XRNNError


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"input_size": 0}, "input_size must be a positive integer"),
        ({"hidden_size": -3}, "hidden_size must be a positive integer"),
        ({"hidden_size": 2.5}, "hidden_size must be a positive integer"),
        ({"num_layers": 0}, "num_layers"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"dropout": "x"}, "dropout must be a number"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    args = {"input_size": 3, "hidden_size": 4, "num_layers": 2}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        xrnn.LSTM(**args)


def test_bad_nonlinearity():
    with pytest.raises(ConfigError, match="'tanh' or 'relu'"):
        xrnn.RNN(3, 4, nonlinearity="sigmoid")


def test_errors_are_builtin_subclasses_too():
    with pytest.raises(ValueError):
        xrnn.GRU(0, 4)
    with pytest.raises(XRNNError):
        xrnn.GRU(0, 4)


def test_wrong_rank():
    m = xrnn.LSTM(3, 4)
    with pytest.raises(ShapeError, match=r"3-D \(T, B, I\).*got shape \(3,\)"):
        m(np.ones(3, np.float32))
    with pytest.raises(ShapeError, match=r"\(B, T, I\)"):
        xrnn.LSTM(3, 4, batch_first=True)(np.ones((1, 1, 1, 3), np.float32))


def test_wrong_feature_size():
    with pytest.raises(ShapeError, match="feature size 5.*input_size=3"):
        xrnn.GRU(3, 4)(np.ones((2, 2, 5), np.float32))


def test_empty_sequence():
    with pytest.raises(ShapeError, match="empty axis"):
        xrnn.GRU(3, 4)(np.ones((0, 2, 3), np.float32))


def test_state_of_wrong_shape():
    m = xrnn.GRU(3, 4, num_layers=2)
    x = np.ones((5, 2, 3), np.float32)
    with pytest.raises(ShapeError, match=r"\(2, 2, 4\), got \(1, 2, 4\)"):
        m(x, np.zeros((1, 2, 4), np.float32))
    with pytest.raises(ShapeError, match="single array"):
        m(x, (np.zeros((2, 2, 4), np.float32),))
    lstm = xrnn.LSTM(3, 4)
    with pytest.raises(ShapeError, match=r"tuple \(h, c\)"):
        lstm(x, np.zeros((1, 2, 4), np.float32))


def test_batch_mismatch_hints_batch_first():
    m = xrnn.LSTM(3, 4)  # time-major
    x = np.ones((8, 5, 3), np.float32)  # user meant (B=8, T=5)
    h = np.zeros((1, 8, 4), np.float32)
    with pytest.raises(ShapeError) as e:
        m(x, (h, h))
    msg = str(e.value)
    assert "batch size 8 differs from x's batch size 5" in msg and "batch_first=False" in msg


def test_integer_and_mismatched_float_inputs():
    m = xrnn.RNN(3, 4)
    with pytest.raises(DTypeError, match="int64.*Embedding"):
        m(np.ones((2, 1, 3), np.int64))
    with pytest.raises(DTypeError, match="complex"):
        m(np.ones((2, 1, 3), np.complex64))
    with pytest.raises(DTypeError, match=r"float64 but the layer's parameters are float32"):
        m(np.ones((2, 1, 3), np.float64))


def test_backward_misuse():
    m = xrnn.LSTM(3, 4)
    with pytest.raises(StateError, match="preceding forward"):
        m.backward(np.ones((2, 1, 4), np.float32))
    out, _ = m(np.ones((2, 1, 3), np.float32))
    with pytest.raises(ShapeError, match=r"shape of the forward output \(2, 1, 4\)"):
        m.backward(np.ones((2, 1, 5), np.float32))
    m.backward(out)
    with pytest.raises(StateError, match="one backward"):
        m.backward(out)


def test_dstate_shape_checked():
    m = xrnn.GRU(3, 4)
    out, h = m(np.ones((2, 1, 3), np.float32))
    with pytest.raises(ShapeError, match="dstate h"):
        m.backward(out, np.zeros((1, 3, 4), np.float32))


def test_load_state_dict_names_the_bad_key():
    m = xrnn.LSTM(3, 4, num_layers=2)
    sd = {k: np.asarray(v) for k, v in m.state_dict().items()}
    missing = dict(sd)
    del missing["weight_hh_l1"]
    with pytest.raises(ShapeError, match="missing keys: weight_hh_l1"):
        m.load_state_dict(missing)
    extra = dict(sd, weight_ih_l2=np.zeros((16, 4)))
    with pytest.raises(ShapeError, match="unexpected keys: weight_ih_l2"):
        m.load_state_dict(extra)
    bad = dict(sd, bias_ih_l0=np.zeros(12))
    with pytest.raises(ShapeError, match=r"'bias_ih_l0' has shape \(12,\), the model expects \(16,\)"):
        m.load_state_dict(bad)
    # a failed load changes nothing
    before = {k: v.copy() for k, v in sd.items()}
    bad2 = {k: np.full_like(v, 7.0) for k, v in sd.items()}
    bad2["weight_ih_l1"] = np.zeros((1, 1))
    with pytest.raises(ShapeError):
        m.load_state_dict(bad2)
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    # non-strict loading skips missing keys
    m.load_state_dict({"bias_ih_l0": np.ones(16)}, strict=False)
    np.testing.assert_array_equal(m.bias_ih_l0, 1.0)


def test_loaded_values_are_private_copies():
    m = xrnn.RNN(2, 2)
    w = np.zeros((2, 2), np.float32)
    m.load_state_dict({"weight_hh_l0": w}, strict=False)
    w[...] = 5
    assert not np.any(m.weight_hh_l0)
