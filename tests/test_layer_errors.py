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


@pytest.mark.parametrize("cls", [xrnn.RNNCell, xrnn.LSTMCell, xrnn.GRUCell])
@pytest.mark.parametrize("batched", [True, False])
def test_cell_backward_checks_the_gradient_shape_and_keeps_the_step(cls, batched):
    """A gradient that is not the step output's shape is refused (broadcasting would
    silently give wrong gradients), and the refused call leaves the step on the tape."""
    cell = cls(3, 4, seed=0)
    x = np.ones((2, 3) if batched else (3,), np.float32)
    cell(x)
    good = np.ones((2, 4) if batched else (4,), np.float32)
    bads = [np.ones((1, 4), np.float32), np.ones((4,) if batched else (2, 4), np.float32),
            np.ones((2, 5) if batched else (5,), np.float32)]
    args = (lambda d: (d, good)) if cls is xrnn.LSTMCell else (lambda d: (d,))
    for bad in bads:
        with pytest.raises(ShapeError, match=r"dh must have the shape of the step's output"):
            cell.backward(*args(bad))
    if cls is xrnn.LSTMCell:
        with pytest.raises(ShapeError, match=r"dc must have the shape"):
            cell.backward(good, bads[0])
    with pytest.raises(DTypeError):
        cell.backward(*args(np.ones(good.shape, np.int64)))
    dx, _ = cell.backward(*args(good))  # the step is still there
    assert dx.shape == x.shape
    with pytest.raises(StateError):
        cell.backward(*args(good))


def test_linear_backward_checks_the_gradient_shape():
    lin = xrnn.Linear(3, 4, seed=0)
    lin(np.ones((2, 5, 3), np.float32))
    for bad in ((2, 5, 5), (2, 5), (10, 5), (3, 4)):
        with pytest.raises(ShapeError, match=r"dy must have the shape of the forward output"):
            lin.backward(np.ones(bad, np.float32))
    assert lin.backward(np.ones((2, 5, 4), np.float32)).shape == (2, 5, 3)  # cache kept until a good call


def test_embedding_backward_checks_the_gradient_shape():
    emb = xrnn.Embedding(6, 2, seed=0)
    emb(np.array([[1, 2, 3]]))
    for bad in ((1, 4), (1, 3, 3), (3, 2), (2, 3, 2)):
        with pytest.raises(ShapeError, match=r"dout must have the shape of the forward output \(1, 3, 2\)"):
            emb.backward(np.ones(bad, np.float32))
    emb.backward(np.ones((1, 3, 2), np.float32))
    np.testing.assert_array_equal(emb.grads["weight"][:, 0], [0, 1, 1, 1, 0, 0])


@pytest.mark.parametrize("bad", [5, 3, -1])
def test_cross_entropy_refuses_targets_outside_the_classes(bad):
    """One-hot of an out-of-range id is all zeros: without the check the loss and gradient are silently wrong."""
    logits = np.zeros((2, 3), np.float32)
    with pytest.raises(ShapeError, match=rf"targets contains {bad}, outside the class range \[0, 3\)"):
        xrnn.softmax_cross_entropy(logits, np.array([0, bad]))
    # the ignored value may lie outside the classes; the rest is still checked
    loss, d = xrnn.softmax_cross_entropy(logits, np.array([0, -100]), ignore_index=-100)
    np.testing.assert_allclose(float(loss), np.log(3), rtol=1e-6)
    with pytest.raises(ShapeError):
        xrnn.softmax_cross_entropy(logits, np.array([bad, -100]), ignore_index=-100)
    with xrnn.backend.trusted_ids():  # callers that validated their ids skip the two host reads
        xrnn.softmax_cross_entropy(logits, np.array([0, bad]))


@pytest.mark.parametrize("make", [lambda: xrnn.LSTM(3, 4, bias=False, forget_bias=1.0),
                                  lambda: xrnn.LSTMCell(3, 4, bias=False, forget_bias=1.0)])
def test_forget_bias_without_biases_is_refused(make):
    with pytest.raises(ConfigError, match=r"forget_bias=1.0 .* bias=False"):
        make()


def test_a_device_without_the_dtype_says_so():
    """array-api-strict's no_float64 device (listed by available_devices) has no float64."""
    pytest.importorskip("array_api_strict")
    with pytest.raises(DTypeError, match=r"'float64' is not supported on array_api_strict:no_float64"):
        xrnn.LSTM(3, 4, dtype="float64", device="array_api_strict:no_float64")
    m = xrnn.LSTM(3, 4, dtype="float64")
    with pytest.raises(DTypeError, match="not supported"):
        m.to("array_api_strict:no_float64")
    assert xrnn.LSTM(3, 4, device="array_api_strict:no_float64").dtype == "float32"
