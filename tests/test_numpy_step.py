"""The NumPy sampling step (:mod:`xrnn.kernels.numpy_step`) equals the model's forward.

``CharLM.forward`` is proven against PyTorch and finite differences elsewhere;
here the prepared one-token step is run next to it from the same state, for
every cell, with one-hot and embedded inputs, in float32 and float64, and the
logits and states are compared. Sampling with the fast step on and off
(``use_fast_paths(False)``) must give the same text.
"""

import numpy as np
import pytest

import xrnn
from xrnn.kernels import native, use_fast_paths
from xrnn.kernels.numpy_step import Stepper, stepper_for

TOL = {"float64": dict(rtol=1e-10, atol=1e-12), "float32": dict(rtol=2e-5, atol=2e-6)}


def _parts(state, cell):
    return list(state) if cell == "lstm" else [state]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("embedding_dim", [None, 5])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("kernels", ["numpy", "fused"])
def test_step_equals_forward(cell, embedding_dim, dtype, layers, kernels):
    """The reference forward runs on the NumPy code; the step on it or on the fused C kernels
    (float32 LSTM; the other cases run the NumPy step either way)."""
    if kernels == "fused" and native.kernels() is None:
        pytest.skip(native.describe())
    V, H, B = 11, 8, 3
    m = xrnn.CharLM(V, H, num_layers=layers, cell=cell, embedding_dim=embedding_dim, dtype=dtype, seed=0)
    m.eval()
    ids = np.random.default_rng(1).integers(0, V, size=(B, 7))
    with xrnn.no_grad(), native.use(None):
        _, state = m.forward(ids[:, :3], None)  # a prime
        ref, ref_state = m.forward(ids[:, 3:], state)  # (B, 4, V)
    with native.use(native.kernels() if kernels == "fused" else None):
        step = stepper_for(m, B, state)
    assert isinstance(step, Stepper)
    assert (step.nat is not None) == (kernels == "fused" and cell == "lstm" and dtype == "float32")
    got = np.stack([step(ids[:, t]) for t in range(3, 7)], axis=1)  # (B, 4, V)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_allclose(got, ref, **TOL[dtype])
    for a, b in zip(_parts(step.state(), cell), _parts(ref_state, cell)):
        np.testing.assert_allclose(a, b, **TOL[dtype])


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_step_from_zero_state(cell):
    m = xrnn.CharLM(7, 6, num_layers=2, cell=cell, seed=3)
    ids = np.array([[4, 0, 6]])
    with xrnn.no_grad():
        ref, _ = m.forward(ids, None)  # (1, 3, V)
    step = stepper_for(m, 1)
    got = np.stack([step(ids[:, t]) for t in range(3)], axis=1)
    np.testing.assert_allclose(got, ref, **TOL["float32"])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("num_samples", [1, 3])
def test_sampling_text_is_the_same_with_the_fast_step_off(cell, num_samples):
    vocab = xrnn.Vocabulary(list("abcdefgh \n"))
    m = xrnn.CharLM(len(vocab), 16, num_layers=2, cell=cell, seed=2, vocab=vocab)
    kw = dict(length=60, prime="ab", temperature=0.9, top_k=5, seed=7, num_samples=num_samples)
    fast = xrnn.sample(m, **kw)
    with use_fast_paths(False):
        assert stepper_for(m, num_samples) is None
        slow = xrnn.sample(m, **kw)
    assert fast == slow
    greedy = xrnn.sample(m, length=30, greedy=True, seed=4, num_samples=num_samples)
    with use_fast_paths(False):
        assert xrnn.sample(m, length=30, greedy=True, seed=4, num_samples=num_samples) == greedy


def test_word_vocabulary_pieces_unchanged():
    vocab = xrnn.Vocabulary(["the", "cat", "sat", ".", "\n"], level="word")
    m = xrnn.CharLM(len(vocab), 8, num_layers=1, cell="lstm", seed=0, vocab=vocab)
    pieces = list(xrnn.generate(m, length=20, seed=3))
    with use_fast_paths(False):
        assert list(xrnn.generate(m, length=20, seed=3)) == pieces
    ids = vocab.encode("".join(pieces))
    assert "".join(pieces) == vocab.decode(ids)


def test_no_fast_step_for_other_models():
    class NotALM:
        device = xrnn.resolve_device("cpu")

    assert stepper_for(NotALM(), 1) is None
