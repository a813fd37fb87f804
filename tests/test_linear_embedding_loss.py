"""Linear, Embedding and softmax cross-entropy against finite differences and torch."""

import numpy as np
import pytest

import xrnn
from xrnn.errors import DTypeError, ShapeError, StateError
from xrnn.gradcheck import numerical_gradient, parameter_gradients

from conftest import assert_on, put, to_np


def test_linear_gradients(device):
    lin = xrnn.Linear(3, 4, device=device, dtype="float64", seed=0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 3))
    R = rng.standard_normal((2, 5, 4))
    y = lin(put(device, x))
    assert_on(device, y)
    np.testing.assert_allclose(to_np(y), x @ to_np(lin.weight).T + to_np(lin.bias), rtol=1e-12)
    lin.zero_grad()
    dx = lin.backward(put(device, R))
    loss = lambda x=x: float(np.sum(to_np(lin(put(device, x))) * R))  # noqa: E731
    num = parameter_gradients(lin, loss)
    for k, v in lin.grads.items():
        np.testing.assert_allclose(to_np(v), num[k], rtol=1e-6, atol=1e-8, err_msg=k)
    np.testing.assert_allclose(to_np(dx), numerical_gradient(lambda v: loss(v), x), rtol=1e-6, atol=1e-8)


def test_linear_init_matches_pytorch_bounds():
    lin = xrnn.Linear(25, 7, seed=0)
    k = 1 / 5
    for v in (lin.weight, lin.bias):
        assert np.abs(v).max() <= k and np.abs(v).max() > 0.5 * k


def test_embedding_lookup_and_gradient(device):
    emb = xrnn.Embedding(6, 3, device=device, dtype="float64", seed=0)
    ids = np.array([[0, 5, 2], [2, 2, 1]])
    R = np.random.default_rng(0).standard_normal((2, 3, 3))
    out = emb(put(device, ids, "int64"))
    W = to_np(emb.weight)
    np.testing.assert_array_equal(to_np(out), W[ids])
    emb.zero_grad()
    assert emb.backward(put(device, R)) is None
    expected = np.zeros_like(W)
    np.add.at(expected, ids.reshape(-1), R.reshape(-1, 3))  # independent scatter-add
    np.testing.assert_allclose(to_np(emb.grads["weight"]), expected, rtol=1e-12)


def test_embedding_chunked_scatter_equals_single_chunk(monkeypatch):
    emb = xrnn.Embedding(7, 2, dtype="float64", seed=0)
    ids = np.random.default_rng(0).integers(0, 7, size=50)
    R = np.random.default_rng(1).standard_normal((50, 2))
    emb(ids)
    emb.backward(R)
    full = emb.grads["weight"].copy()
    emb.zero_grad()
    monkeypatch.setattr(xrnn.Embedding, "_CHUNK", 7 * 3)  # 3 rows per chunk
    emb(ids)
    emb.backward(R)
    np.testing.assert_allclose(emb.grads["weight"], full, rtol=1e-12)


def test_embedding_errors():
    emb = xrnn.Embedding(5, 2, seed=0)
    with pytest.raises(DTypeError, match="integer"):
        emb(np.ones(3, np.float32))
    with pytest.raises(ShapeError, match=r"5.*\[0, 5\)"):
        emb(np.array([1, 5]))
    with pytest.raises(ShapeError, match=r"-1"):
        emb(np.array([-1, 0]))
    with pytest.raises(StateError):
        xrnn.Embedding(5, 2).backward(np.ones((1, 2), np.float32))


def test_embedding_init_is_standard_normal():
    w = xrnn.Embedding(200, 50, seed=0).weight
    assert abs(w.mean()) < 0.02 and abs(w.std() - 1) < 0.02


@pytest.mark.parametrize("ignore", [None, 3])
def test_softmax_cross_entropy_matches_torch(device, ignore):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 5, 7)) * 3
    targets = rng.integers(0, 7, size=(4, 5))
    targets[0, :2] = 3
    loss, d = xrnn.softmax_cross_entropy(put(device, logits), put(device, targets, "int64"), ignore_index=ignore)
    assert_on(device, loss, d)
    lt = torch.tensor(logits, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(
        lt.reshape(-1, 7), torch.tensor(targets).reshape(-1), ignore_index=-100 if ignore is None else ignore
    )
    ref.backward()
    np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-12)
    np.testing.assert_allclose(to_np(d), lt.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_softmax_cross_entropy_is_stable_and_exact_by_hand():
    # huge logits: a naive exp would overflow
    logits = np.array([[1000.0, 0.0, -1000.0]])
    loss, d = xrnn.softmax_cross_entropy(logits, np.array([1]))
    assert float(loss) == pytest.approx(1000.0)
    np.testing.assert_allclose(d, [[1.0, -1.0, 0.0]], atol=1e-12)
    # uniform logits: loss is log(V) exactly
    loss, _ = xrnn.softmax_cross_entropy(np.zeros((2, 3, 65)), np.zeros((2, 3), np.int64))
    assert float(loss) == pytest.approx(np.log(65))


def test_softmax_cross_entropy_gradient_finite_differences():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((3, 4))
    t = np.array([0, 3, 1])
    _, d = xrnn.softmax_cross_entropy(logits, t)
    num = numerical_gradient(lambda z: float(xrnn.softmax_cross_entropy(z, t)[0]), logits)
    np.testing.assert_allclose(d, num, rtol=1e-6, atol=1e-9)


def test_softmax_cross_entropy_errors():
    with pytest.raises(DTypeError, match="integer class ids"):
        xrnn.softmax_cross_entropy(np.zeros((2, 3)), np.zeros(2))
    with pytest.raises(ShapeError, match="targets shape"):
        xrnn.softmax_cross_entropy(np.zeros((2, 3)), np.zeros(3, np.int64))
    with pytest.raises(DTypeError, match="floating"):
        xrnn.softmax_cross_entropy(np.zeros((2, 3), np.int64), np.zeros(2, np.int64))
