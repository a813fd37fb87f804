"""CharLM: finite-difference gradients, PyTorch parity, seeds, dropout, checkpoints, errors."""

import json

import numpy as np
import pytest

import xrnn
from xrnn.data import Vocabulary
from xrnn.errors import (
    CheckpointCorruptError,
    CheckpointError,
    ConfigError,
    DeviceError,
    DTypeError,
    ShapeError,
    StateError,
)
from xrnn.functional import softmax_cross_entropy
from xrnn.gradcheck import numerical_gradient, parameter_gradients
from xrnn.models import CharLM

from conftest import assert_on, put, to_np


def CharVocab(chars):
    """The library's character vocabulary, symbols in the given order."""
    return Vocabulary(list(chars), level="char")


# tiny sizes: every gradcheck perturbs each parameter twice
V, H, E, B, T = 4, 2, 2, 2, 3


def _ids(dev, seed=0, b=B, t=T, v=V):
    return dev.asarray(np.random.default_rng(seed).integers(0, v, size=(b, t)), dtype="int64")


def _state(dev, cell, layers, seed=1, b=B, dtype="float64"):
    rng = np.random.default_rng(seed)
    h = put(dev, rng.standard_normal((layers, b, H)) * 0.5, dtype)
    if cell == "lstm":
        return (h, put(dev, rng.standard_normal((layers, b, H)) * 0.5, dtype))
    return h


def _state_parts(state):
    return list(state) if isinstance(state, tuple) else [state]


def _check_gradients(dev, cell, emb, layers, with_state, dropout=0.0):
    """Analytic gradients of CE(logits) + <final state, R> against central differences."""
    model = CharLM(V, H, layers, cell, embedding_dim=E if emb else None, dropout=dropout,
                   device=dev, dtype="float64", seed=3)
    ids, targets = _ids(dev, 0), _ids(dev, 1)
    state0 = _state(dev, cell, layers) if with_state else None
    R = _state_parts(_state(dev, cell, layers, seed=2))  # weights of the final-state term
    rng_state = model.rng.bit_generator.state  # replayed so every forward draws the same masks
    xp = dev.xp

    def loss_value(state=state0):
        model.rng.bit_generator.state = rng_state
        with xrnn.no_grad():
            logits, st = model.forward(ids, state)
        loss, _ = softmax_cross_entropy(logits, targets)
        with model.device:
            extra = sum(float(xp.sum(s * r)) for s, r in zip(_state_parts(st), R))
        return float(loss) + extra

    numeric = parameter_gradients(model, loss_value)
    model.zero_grad()
    model.rng.bit_generator.state = rng_state
    logits, st = model.forward(ids, state0)
    assert_on(dev, logits, *_state_parts(st))
    assert tuple(logits.shape) == (B, T, V)
    _, dlogits = softmax_cross_entropy(logits, targets)
    dstate = tuple(R) if cell == "lstm" else R[0]
    dstate0 = model.backward(dlogits, dstate)
    grads = model.grads
    assert set(grads) == set(numeric)
    for name, g in grads.items():
        assert_on(dev, g)
        np.testing.assert_allclose(to_np(g), numeric[name], rtol=1e-5, atol=1e-7, err_msg=name)
    if with_state:
        parts = _state_parts(state0)
        for i, (d_analytic, s_value) in enumerate(zip(_state_parts(dstate0), parts)):
            def f(v, i=i):
                new = [put(dev, v) if j == i else p for j, p in enumerate(parts)]
                return loss_value(tuple(new) if cell == "lstm" else new[0])

            np.testing.assert_allclose(to_np(d_analytic), numerical_gradient(f, to_np(s_value)),
                                       rtol=1e-5, atol=1e-7, err_msg=f"initial state part {i}")


GRID = [(cell, emb, layers, st) for cell in ("lstm", "gru", "rnn") for emb in (False, True)
        for layers in (1, 2) for st in (False, True)]


@pytest.mark.parametrize("cell,emb,layers,with_state", GRID)
def test_gradcheck_full_grid_numpy(cell, emb, layers, with_state):
    _check_gradients(xrnn.resolve_device("cpu"), cell, emb, layers, with_state)


@pytest.mark.parametrize("cell,emb,layers,with_state", [
    ("lstm", True, 2, True),
    ("gru", False, 2, False),
    ("rnn", True, 1, True),
])
def test_gradcheck_every_backend(device, cell, emb, layers, with_state):
    _check_gradients(device, cell, emb, layers, with_state)


@pytest.mark.parametrize("dev_name,cell", [("cpu", "gru"), ("cpu", "rnn"), ("array_api_strict:device1", "lstm")])
def test_gradcheck_train_mode_dropout(dev_name, cell):
    # masks fixed by replaying the model's generator before every forward;
    # both the between-layer and the top-output masks are then part of the function
    _check_gradients(xrnn.resolve_device(dev_name), cell, True, 2, True, dropout=0.4)


# ---------------------------------------------------------------------------
# PyTorch parity
# ---------------------------------------------------------------------------

def _torch_copy(model):
    torch = pytest.importorskip("torch")
    sd = {k: torch.tensor(to_np(v)) for k, v in model.state_dict().items()}
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[model.cell]
    in_size = model.embedding_dim or model.vocab_size
    rnn = cls(in_size, model.hidden_size, model.num_layers, batch_first=True, dtype=torch.float64)
    rnn.load_state_dict({k[len("rnn."):]: v for k, v in sd.items() if k.startswith("rnn.")})
    head = torch.nn.Linear(model.hidden_size, model.vocab_size, dtype=torch.float64)
    head.load_state_dict({k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")})
    emb = None
    if model.embedding_dim is not None:
        emb = torch.nn.Embedding(model.vocab_size, model.embedding_dim, dtype=torch.float64)
        emb.load_state_dict({"weight": sd["embedding.weight"]})
    return emb, rnn, head


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("emb", [False, True])
def test_matches_pytorch_logits_and_gradients(light_device, cell, emb):
    torch = pytest.importorskip("torch")
    dev = light_device
    Vb, Hb, Eb, Bb, Tb, L = 7, 5, 4, 3, 6, 2
    model = CharLM(Vb, Hb, L, cell, embedding_dim=Eb if emb else None, device=dev, dtype="float64", seed=11)
    emb_t, rnn_t, head_t = _torch_copy(model)
    rng = np.random.default_rng(5)
    ids_np = rng.integers(0, Vb, size=(Bb, Tb))
    tgt_np = rng.integers(0, Vb, size=(Bb, Tb))
    h0_np = rng.standard_normal((L, Bb, Hb)) * 0.3
    c0_np = rng.standard_normal((L, Bb, Hb)) * 0.3

    state = (put(dev, h0_np), put(dev, c0_np)) if cell == "lstm" else put(dev, h0_np)
    logits, _ = model.forward(dev.asarray(ids_np, dtype="int64"), state)
    _, dlogits = softmax_cross_entropy(logits, dev.asarray(tgt_np, dtype="int64"))
    dstate0 = model.backward(dlogits)

    ids_t = torch.tensor(ids_np)
    x = emb_t(ids_t) if emb else torch.nn.functional.one_hot(ids_t, Vb).double()
    h0_t = torch.tensor(h0_np, requires_grad=True)
    c0_t = torch.tensor(c0_np, requires_grad=True)
    out, _ = rnn_t(x, (h0_t, c0_t) if cell == "lstm" else h0_t)
    logits_t = head_t(out)
    loss_t = torch.nn.functional.cross_entropy(logits_t.reshape(-1, Vb), torch.tensor(tgt_np).reshape(-1))
    loss_t.backward()

    np.testing.assert_allclose(to_np(logits), logits_t.detach().numpy(), rtol=1e-10, atol=1e-12)
    torch_grads = {f"rnn.{k}": p.grad for k, p in rnn_t.named_parameters()}
    torch_grads.update({f"head.{k}": p.grad for k, p in head_t.named_parameters()})
    if emb:
        torch_grads["embedding.weight"] = emb_t.weight.grad
    grads = model.grads
    assert set(grads) == set(torch_grads)
    for k, g in grads.items():
        np.testing.assert_allclose(to_np(g), torch_grads[k].numpy(), rtol=1e-9, atol=1e-12, err_msg=k)
    dh0 = dstate0[0] if cell == "lstm" else dstate0
    np.testing.assert_allclose(to_np(dh0), h0_t.grad.numpy(), rtol=1e-9, atol=1e-12)
    if cell == "lstm":
        np.testing.assert_allclose(to_np(dstate0[1]), c0_t.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_dropout_placement_matches_pytorch_with_the_same_masks():
    """Masks between layers and on the top output (char-rnn), scaled by 1/(1-p).

    The masks are rebuilt from a copy of the model's generator in the documented
    order (between-layer masks layer by layer, then the top-output mask), and the
    same network is assembled from single-layer torch LSTMs.
    """
    torch = pytest.importorskip("torch")
    p, L, Vb, Hb, Bb, Tb = 0.3, 3, 6, 4, 2, 5
    model = CharLM(Vb, Hb, L, "lstm", embedding_dim=3, dropout=p, dtype="float64", seed=4)
    replay = np.random.default_rng()
    replay.bit_generator.state = model.rng.bit_generator.state
    masks = [torch.tensor((replay.random((Tb, Bb, Hb), dtype=np.float32) >= p).astype(np.float64) / (1 - p))
             for _ in range(L)]  # L-1 between layers, then the top one
    rng = np.random.default_rng(0)
    ids_np, tgt_np = rng.integers(0, Vb, (Bb, Tb)), rng.integers(0, Vb, (Bb, Tb))
    logits, _ = model.forward(np.asarray(ids_np))
    _, dlogits = softmax_cross_entropy(logits, np.asarray(tgt_np))
    model.backward(dlogits)

    emb_t, rnn_full, head_t = _torch_copy(model)
    layers = []
    for i in range(L):
        cell = torch.nn.LSTM(3 if i == 0 else Hb, Hb, 1, dtype=torch.float64)  # time-major
        cell.load_state_dict({f"{n}_l0": getattr(rnn_full, f"{n}_l{i}").detach().clone()
                              for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")})
        layers.append(cell)
    x = emb_t(torch.tensor(ids_np)).transpose(0, 1)  # (T, B, E)
    for i, cell in enumerate(layers):
        x, _ = cell(x)
        x = x * masks[i]
    logits_t = head_t(x).transpose(0, 1)  # (B, T, V)
    loss_t = torch.nn.functional.cross_entropy(logits_t.reshape(-1, Vb), torch.tensor(tgt_np).reshape(-1))
    loss_t.backward()

    np.testing.assert_allclose(to_np(logits), logits_t.detach().numpy(), rtol=1e-10, atol=1e-12)
    g = model.grads
    for i, cell in enumerate(layers):
        for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            np.testing.assert_allclose(to_np(g[f"rnn.{n}_l{i}"]), getattr(cell, f"{n}_l0").grad.numpy(),
                                       rtol=1e-9, atol=1e-12, err_msg=f"{n}_l{i}")
    np.testing.assert_allclose(to_np(g["head.weight"]), head_t.weight.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(to_np(g["embedding.weight"]), emb_t.weight.grad.numpy(), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------
# structure, seeds, modes, devices
# ---------------------------------------------------------------------------

def test_state_dict_keys_and_shapes():
    m = CharLM(10, 8, 2, "lstm", seed=0)
    expected = [f"rnn.{n}_l{i}" for i in range(2) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    assert list(m.state_dict()) == expected + ["head.weight", "head.bias"]
    m = CharLM(10, 8, 1, "gru", embedding_dim=5, seed=0)
    sd = m.state_dict()
    assert list(sd) == ["embedding.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0",
                        "rnn.bias_hh_l0", "head.weight", "head.bias"]
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes == {"embedding.weight": (10, 5), "rnn.weight_ih_l0": (24, 5), "rnn.weight_hh_l0": (24, 8),
                      "rnn.bias_ih_l0": (24,), "rnn.bias_hh_l0": (24,), "head.weight": (10, 8), "head.bias": (10,)}
    assert list(m.grads) == list(sd) == list(m.parameters())


def test_state_dict_loads_into_pytorch_modules():
    torch = pytest.importorskip("torch")
    m = CharLM(9, 6, 2, "rnn", embedding_dim=4, seed=0)
    sd = {k: torch.tensor(to_np(v)) for k, v in m.state_dict().items()}
    torch.nn.RNN(4, 6, 2).load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("rnn.")})
    torch.nn.Linear(6, 9).load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("head.")})
    torch.nn.Embedding(9, 4).load_state_dict({"weight": sd["embedding.weight"]})


@pytest.mark.parametrize("emb", [None, 3])
def test_same_seed_same_weights_and_logits_on_every_backend(emb):
    ref = CharLM(V, 5, 2, "lstm", embedding_dim=emb, seed=42)
    ids = np.random.default_rng(0).integers(0, V, size=(2, 4))
    ref_logits = to_np(ref.forward(ids)[0])
    for name in ("array_api_strict:device1", "torch:cpu"):
        try:
            dev = xrnn.resolve_device(name)
        except xrnn.errors.BackendUnavailableError:
            continue
        m = CharLM(V, 5, 2, "lstm", embedding_dim=emb, device=dev, seed=42)
        for k, v in m.state_dict().items():
            np.testing.assert_array_equal(to_np(v), to_np(ref.state_dict()[k]), err_msg=k)
        logits, _ = m.forward(dev.asarray(ids, dtype="int64"))
        assert_on(dev, logits)
        np.testing.assert_allclose(to_np(logits), ref_logits, rtol=1e-5, atol=1e-6)
    other = CharLM(V, 5, 2, "lstm", embedding_dim=emb, seed=43)
    assert not np.array_equal(to_np(other.state_dict()["head.weight"]), to_np(ref.state_dict()["head.weight"]))


def test_initial_weights_follow_pytorch_default_distributions():
    m = CharLM(50, 100, 1, "lstm", embedding_dim=40, seed=0)
    sd = {k: to_np(v) for k, v in m.state_dict().items()}
    k = 1 / np.sqrt(100)
    for name in ("rnn.weight_ih_l0", "rnn.weight_hh_l0", "head.weight", "head.bias"):
        assert np.abs(sd[name]).max() <= k + 1e-7 and np.abs(sd[name]).max() > 0.9 * k, name
    assert abs(sd["embedding.weight"].std() - 1.0) < 0.05  # N(0, 1), as torch.nn.Embedding


def test_truncated_bptt_state_carry_equals_one_forward(light_device):
    dev = light_device
    m = CharLM(V, 5, 2, "gru", device=dev, dtype="float64", seed=1)
    ids = _ids(dev, 3, b=2, t=7)
    with xrnn.no_grad():
        full, s_full = m.forward(ids)
        a, s = m.forward(ids[:, 0:3])
        b, s2 = m.forward(ids[:, 3:7], s)
    np.testing.assert_allclose(to_np(full), np.concatenate([to_np(a), to_np(b)], axis=1), rtol=1e-12)
    np.testing.assert_allclose(to_np(s_full), to_np(s2), rtol=1e-12)


def test_dropout_only_in_training_and_reproducible(light_device):
    dev = light_device
    ids = _ids(dev, 0, b=3, t=6)
    plain = CharLM(V, 8, 2, "lstm", device=dev, dtype="float64", seed=7)
    drop = CharLM(V, 8, 2, "lstm", dropout=0.5, device=dev, dtype="float64", seed=7)
    with xrnn.no_grad():
        base = to_np(plain.forward(ids)[0])
        drop.eval()
        np.testing.assert_allclose(to_np(drop.forward(ids)[0]), base, rtol=1e-12)  # eval: no dropout
        drop.train()
        first = to_np(drop.forward(ids)[0])
        second = to_np(drop.forward(ids)[0])  # the generator moved on: new masks
        twin = CharLM(V, 8, 2, "lstm", dropout=0.5, device=dev, dtype="float64", seed=7)
        twin_first = to_np(twin.forward(ids)[0])
    assert not np.allclose(first, base)
    assert not np.allclose(first, second)
    np.testing.assert_array_equal(first, twin_first)
    # same seed on numpy gives the same masks as on this device
    ref = CharLM(V, 8, 2, "lstm", dropout=0.5, dtype="float64", seed=7)
    with xrnn.no_grad():
        np.testing.assert_allclose(to_np(ref.forward(np.asarray(to_np(ids)))[0]), first, rtol=1e-12)


def test_top_dropout_with_one_layer_and_no_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = CharLM(V, 6, 1, "rnn", dropout=0.5, dtype="float64", seed=0)
    ids = np.zeros((1, 4), dtype=np.int64)
    with xrnn.no_grad():
        train_out = to_np(m.forward(ids)[0])
        m.eval()
        eval_out = to_np(m.forward(ids)[0])
    assert not np.allclose(train_out, eval_out)  # the top-output dropout acts with one layer


def test_to_moves_everything_and_keeps_results(light_device):
    m = CharLM(V, 5, 2, "lstm", embedding_dim=3, dtype="float64", seed=0)
    ids = np.random.default_rng(0).integers(0, V, (2, 3))
    with xrnn.no_grad():
        before = to_np(m.forward(ids)[0])
    dev = light_device
    assert m.to(dev) is m
    assert m.device == dev and m.rnn.device == dev and m.head.device == dev and m.embedding.device == dev
    assert_on(dev, *m.parameters().values(), *m.grads.values())
    logits, _ = m.forward(dev.asarray(ids, dtype="int64"))
    np.testing.assert_allclose(to_np(logits), before, rtol=1e-12)
    _, d = softmax_cross_entropy(logits, dev.asarray(ids, dtype="int64"))
    m.backward(d)
    assert any(np.abs(to_np(g)).sum() > 0 for g in m.grads.values())
    m.zero_grad()
    assert all(np.abs(to_np(g)).sum() == 0 for g in m.grads.values())


def test_gradients_accumulate_across_backwards():
    m = CharLM(V, 4, 1, "gru", dtype="float64", seed=0)
    ids = np.random.default_rng(0).integers(0, V, (2, 3))
    for _ in range(2):
        logits, _ = m.forward(ids)
        m.backward(softmax_cross_entropy(logits, ids)[1])
    twice = {k: to_np(v).copy() for k, v in m.grads.items()}
    m.zero_grad()
    logits, _ = m.forward(ids)
    m.backward(softmax_cross_entropy(logits, ids)[1])
    for k, v in m.grads.items():
        np.testing.assert_allclose(twice[k], 2 * to_np(v), rtol=1e-12, err_msg=k)


# ---------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------

def test_checkpoint_round_trip_across_devices(light_device):
    vocab = CharVocab("abcd")
    m = CharLM(4, 5, 2, "lstm", embedding_dim=3, dropout=0.25, dtype="float64", seed=9, vocab=vocab)
    ids = np.random.default_rng(0).integers(0, 4, (2, 5))
    with xrnn.no_grad():
        m.forward(ids)  # advance the generator past init
    meta, tensors = m.checkpoint_state()
    json.dumps(meta)  # JSON-able as promised
    assert meta["config"] == m.config == {"vocab_size": 4, "hidden_size": 5, "num_layers": 2, "cell": "lstm",
                                          "embedding_dim": 3, "dropout": 0.25, "dtype": "float64"}
    assert meta["vocab"] == vocab.to_config() and meta["vocab"]["tokens"] == ["a", "b", "c", "d"]
    assert all(isinstance(v, np.ndarray) for v in tensors.values()) and list(tensors) == list(m.state_dict())
    tensors["head.bias"][...] = 123.0  # a copy: the model is unaffected
    assert not np.any(to_np(m.head.bias) == 123.0)
    meta, tensors = m.checkpoint_state()

    dev = light_device
    r = CharLM.from_checkpoint(meta, tensors, dev, vocab_from_config=Vocabulary.from_config)
    assert r.device == dev and r.config == m.config and r.vocab == vocab
    with xrnn.no_grad():
        # train mode: identical logits need identical dropout masks, i.e. the restored generator
        a = to_np(m.forward(ids)[0])
        b = to_np(r.forward(dev.asarray(ids, dtype="int64"))[0])
    np.testing.assert_allclose(b, a, rtol=1e-12)
    assert r.rnn.rng is r.rng


def test_checkpoint_without_vocab_and_bad_checkpoints():
    m = CharLM(4, 3, 1, "rnn", seed=0)
    meta, tensors = m.checkpoint_state()
    assert meta["vocab"] is None
    r = CharLM.from_checkpoint(meta, tensors, "cpu")
    assert r.vocab is None
    np.testing.assert_array_equal(to_np(r.head.weight), to_np(m.head.weight))
    with pytest.raises(CheckpointError, match="newer xrnn"):
        CharLM.from_checkpoint({**meta, "config": {**meta["config"], "attention": True}}, tensors, "cpu")
    with pytest.raises(CheckpointCorruptError, match="head.bias"):
        CharLM.from_checkpoint(meta, {k: v for k, v in tensors.items() if k != "head.bias"}, "cpu")
    with pytest.raises(CheckpointCorruptError, match="config"):
        CharLM.from_checkpoint({"rng_state": None}, tensors, "cpu")
    assert CharLM.checkpoint_kind == "xrnn.CharLM"


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------

def test_bad_ids():
    m = CharLM(5, 3, 1, seed=0)
    with pytest.raises(DTypeError, match="integer token ids"):
        m.forward(np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ShapeError, match=r"\(B, T\).*ids\[None, :\]"):
        m.forward(np.zeros(3, dtype=np.int64))
    with pytest.raises(ShapeError, match=r"\(B, T\)"):
        m.forward(np.zeros((1, 2, 3), dtype=np.int64))
    with pytest.raises(ShapeError, match=r"contains 5, outside the vocabulary range \[0, 5\)"):
        m.forward(np.array([[0, 5]]))
    with pytest.raises(ShapeError, match=r"contains -1"):
        m.forward(np.array([[-1, 2]]))
    e = CharLM(5, 3, 1, embedding_dim=2, seed=0)
    with pytest.raises(ShapeError, match=r"contains 7, outside the vocabulary range \[0, 5\)"):
        e.forward(np.array([[7, 1]]))
    with pytest.raises(ShapeError, match="empty"):
        m.forward(np.zeros((2, 0), dtype=np.int64))


def test_ids_on_another_device():
    strict = xrnn.resolve_device("array_api_strict:device1")
    m = CharLM(5, 3, 1, device=strict, seed=0)
    with pytest.raises(DeviceError, match="to_device"):
        m.forward(np.zeros((1, 2), dtype=np.int64))
    with pytest.raises(DeviceError):
        m.forward([[0, 1]])


def test_bad_state_is_reported_by_the_layer():
    m = CharLM(5, 3, 2, "lstm", seed=0)
    ids = np.zeros((2, 4), dtype=np.int64)
    with pytest.raises(ShapeError, match="tuple"):
        m.forward(ids, np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ShapeError, match=r"\(2, 2, 3\)"):
        m.forward(ids, (np.zeros((2, 4, 3), np.float32), np.zeros((2, 2, 3), np.float32)))


@pytest.mark.parametrize("kwargs,match", [
    ({"cell": "transformer"}, "'lstm', 'gru', 'rnn'"),
    ({"cell": None}, "cell must be one of"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"num_layers": 0}, "num_layers"),
    ({"embedding_dim": 0}, "embedding_dim"),
    ({"vocab_size": -1}, "vocab_size"),
    ({"vocab_size": 2.5}, "vocab_size"),
    ({"dropout": 1.0}, r"\[0, 1\)"),
    ({"dropout": -0.1}, r"\[0, 1\)"),
    ({"dropout": float("nan")}, r"\[0, 1\)"),
    ({"dropout": "a lot"}, "dropout"),
    ({"dtype": "int32"}, None),
])
def test_bad_config(kwargs, match):
    args = {"vocab_size": 5, **kwargs}
    err = xrnn.errors.DTypeError if "dtype" in kwargs else ConfigError
    with pytest.raises(err, match=match):
        CharLM(**args)


def test_cell_names_are_case_insensitive():
    assert CharLM(5, 3, 1, "LSTM", seed=0).cell == "lstm"


def test_vocab_must_match():
    with pytest.raises(ConfigError, match="vocab_size=len"):
        CharLM(5, 3, 1, vocab=CharVocab("abc"))


def test_backward_misuse():
    m = CharLM(5, 3, 1, seed=0)
    with pytest.raises(StateError, match="forward"):
        m.backward(np.zeros((1, 2, 5), np.float32))
    ids = np.zeros((1, 2), dtype=np.int64)
    with xrnn.no_grad():
        m.forward(ids)
    with pytest.raises(StateError, match="no_grad"):
        m.backward(np.zeros((1, 2, 5), np.float32))
    m.forward(ids)
    with pytest.raises(ShapeError, match=r"\(1, 2, 5\)"):
        m.backward(np.zeros((2, 1, 5), np.float32))
    m.forward(ids)
    m.backward(np.zeros((1, 2, 5), np.float32))
    with pytest.raises(StateError):
        m.backward(np.zeros((1, 2, 5), np.float32))  # one backward per forward
