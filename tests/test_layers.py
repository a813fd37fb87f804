"""Keras-style layers: finite differences on every backend, PyTorch (packed sequences
for masks), per-sequence runs for masked batches, stateful carry, Keras parameter
counts, dropout, misuse errors."""

import numpy as np
import pytest

from xrnn import layers as K
from xrnn.errors import ConfigError, DTypeError, ShapeError, StateError

from conftest import assert_on, put, to_np
from conftest import check_gradients as _check_gradients

F_IN, U, T = 2, 3, 4

CELLS = {
    "rnn_tanh": (K.SimpleRNN, {"activation": "tanh"}),
    "rnn_relu": (K.SimpleRNN, {"activation": "relu"}),
    "lstm": (K.LSTM, {}),
    "gru": (K.GRU, {}),
}

# name -> (layer options, lengths or None, give initial state, give state gradients)
CONFIGS = {
    "seq": ({"return_sequences": True}, None, False, False),
    "last": ({}, None, False, False),
    "backwards_seq": ({"go_backwards": True, "return_sequences": True}, None, False, False),
    "state": ({"return_sequences": True, "return_state": True}, None, True, True),
    "no_bias": ({"use_bias": False, "return_sequences": True}, None, False, False),
    "masked_state": ({"return_sequences": True, "return_state": True}, [4, 2, 0, 3], True, True),
    "masked_last_backwards": ({"go_backwards": True}, [1, 4, 2, 3], False, False),
    "masked_backwards_state": ({"go_backwards": True, "return_sequences": True, "return_state": True},
                               [3, 4, 1, 2], True, True),
    # Keras' padded outputs: copies of the last valid output (their gradients flow to it), zeros
    "masked_seq": ({"return_sequences": True}, [4, 1, 0, 2], False, False),
    "masked_last_init": ({}, [2, 4, 0, 1], True, False),
    "masked_seq_zero_output": ({"return_sequences": True, "zero_output_for_mask": True}, [3, 1, 4, 0], True, False),
    "masked_last_zero_output": ({"zero_output_for_mask": True, "return_state": True}, [4, 2, 0, 3], True, True),
}


def _layer(cell, opts, dev, seed=0):
    cls, extra = CELLS[cell]
    layer = cls(U, **extra, **opts, device=dev, dtype="float64", seed=seed)
    return layer.build((T, F_IN))


def _case(cell, cfg, dev, seed=0):
    opts, lengths, give_init, give_ds = CONFIGS[cfg]
    layer = _layer(cell, opts, dev, seed)
    rng = np.random.default_rng(seed + 10)
    B = 4
    x = rng.standard_normal((B, T, F_IN))
    n_states = 2 if cell == "lstm" else 1
    init = [rng.standard_normal((B, U)) for _ in range(n_states)] if give_init else None
    out_shape = (B, T, U) if layer.return_sequences else (B, U)
    R = rng.standard_normal(out_shape)  # random weights at padded steps too (Keras' copies of the last valid output)
    S = [rng.standard_normal((B, U)) for _ in range(n_states)] if give_ds else None
    return layer, x, (None if lengths is None else np.array(lengths)), init, R, S


def _loss(layer, dev, x, lengths, init, R, S):
    out = layer(put(dev, x), lengths=lengths, initial_state=None if init is None else [put(dev, s) for s in init])
    states = []
    if layer.return_state:
        out, *states = out
    val = float(np.sum(to_np(out) * R))
    if S is not None:
        val += sum(float(np.sum(to_np(s) * w)) for s, w in zip(states, S))
    return val


def _analytic(layer, dev, x, lengths, init, R, S):
    init_d = None if init is None else [put(dev, s) for s in init]
    out = layer(put(dev, x), lengths=lengths, initial_state=init_d)
    layer.zero_grad()
    dstates = None if S is None else [put(dev, s) for s in S]
    dx = layer.backward(put(dev, R), dstates)
    assert_on(dev, dx, *(out if isinstance(out, list) else [out]))
    return out, dx


def check_gradients(dev, module, loss_at, analytic, inputs, elementwise=None):
    """conftest's check, one random direction per array off NumPy, parameter names checked too."""
    _check_gradients(dev, module, loss_at, analytic, inputs, elementwise=elementwise, directions=1, seed=5,
                     same_keys=True)


def _inputs_and_analytic(layer, x, init, dx):
    analytic = {k: to_np(v) for k, v in layer.grads.items()}
    analytic["x"] = to_np(dx)
    inputs = {"x": x}
    if init is not None:
        for i, (s, g) in enumerate(zip(init, layer.initial_state_grad)):
            inputs[f"s{i}"] = s
            analytic[f"s{i}"] = to_np(g)
    return analytic, inputs


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("cell", list(CELLS))
def test_recurrent_finite_differences(device, cell, cfg):
    layer, x, lengths, init, R, S = _case(cell, cfg, device)
    _, dx = _analytic(layer, device, x, lengths, init, R, S)
    analytic, inputs = _inputs_and_analytic(layer, x, init, dx)

    def loss_at(x=x, s0=None, s1=None):
        st = None
        if init is not None:
            st = [init[0] if s0 is None else s0] + ([] if len(init) == 1 else [init[1] if s1 is None else s1])
        return _loss(layer, device, x, lengths, st, R, S)

    check_gradients(device, layer, loss_at, analytic, inputs)
    if lengths is not None:  # padded input steps get exactly zero gradient
        pad = np.arange(T)[None, :] >= lengths[:, None]
        assert np.all(analytic["x"][pad] == 0.0)


BIDIR = [
    ("concat_seq", "concat", {"return_sequences": True}, None),
    ("sum_last", "sum", {}, None),
    ("mul_seq_masked", "mul", {"return_sequences": True, "return_state": True}, [3, 4, 1, 2]),
    ("ave_last_masked", "ave", {}, [2, 4, 0, 3]),
]


@pytest.mark.parametrize("case", BIDIR, ids=[c[0] for c in BIDIR])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bidirectional_finite_differences(light_device, cell, case):
    device = light_device
    _, mode, opts, lengths = case
    cls, extra = CELLS[cell]
    layer = K.Bidirectional(cls(U, **extra, **opts), merge_mode=mode, device=device, dtype="float64", seed=1)
    layer.build((T, F_IN))
    rng = np.random.default_rng(2)
    B = 4
    x = rng.standard_normal((B, T, F_IN))
    uo = U * (2 if mode == "concat" else 1)
    R = rng.standard_normal((B, T, uo) if layer.return_sequences else (B, uo))
    n_states = (2 if cell == "lstm" else 1) * 2
    S = [rng.standard_normal((B, U)) for _ in range(n_states)] if layer.return_state else None
    lengths = None if lengths is None else np.array(lengths)
    _, dx = _analytic(layer, device, x, lengths, None, R, S)
    analytic, inputs = _inputs_and_analytic(layer, x, None, dx)
    check_gradients(device, layer, lambda x=x: _loss(layer, device, x, lengths, None, R, S), analytic, inputs,
                    elementwise=False)


# ---------------------------------------------------------------------------
# PyTorch references (packed sequences for masks)
# ---------------------------------------------------------------------------

def _torch_rnn(torch, layer, bidirectional=False):
    """A torch.nn.{LSTM,GRU,RNN} holding the layer's weights (the Keras layer's hidden bias is zero)."""
    fl = layer.forward_layer if bidirectional else layer
    kw = dict(batch_first=True, bidirectional=bidirectional, bias=fl.use_bias, dtype=torch.float64)
    if isinstance(fl, K.LSTM):
        t = torch.nn.LSTM(F_IN, U, **kw)
    elif isinstance(fl, K.GRU):
        t = torch.nn.GRU(F_IN, U, **kw)
    else:
        t = torch.nn.RNN(F_IN, U, nonlinearity=fl.activation, **kw)
    subs = [(layer.forward_layer, ""), (layer.backward_layer, "_reverse")] if bidirectional else [(layer, "")]
    sd = {}
    for sub, sfx in subs:
        for k, v in sub.state_dict().items():
            sd[k + sfx] = torch.from_numpy(np.array(to_np(v)))
        if fl.use_bias and "bias_hh_l0" not in sub.state_dict():
            sd["bias_hh_l0" + sfx] = torch.zeros_like(sd["bias_ih_l0" + sfx])
    t.load_state_dict(sd)
    return t


def _torch_run(torch, t, x, lengths):
    xt = torch.tensor(x, requires_grad=True)
    if lengths is None:
        out, st = t(xt)
    else:
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

        packed = pack_padded_sequence(xt, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
        out_p, st = t(packed)
        out, _ = pad_packed_sequence(out_p, batch_first=True, total_length=x.shape[1])
    return xt, out, st


@pytest.mark.parametrize("lengths", [None, [4, 1, 3, 2, 4]], ids=["full", "packed"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_recurrent_matches_torch(device, cell, lengths):
    torch = pytest.importorskip("torch")
    layer = _layer(cell, {"return_sequences": True, "return_state": True}, device, seed=4)
    t = _torch_rnn(torch, layer)
    rng = np.random.default_rng(6)
    B = 5
    x = rng.standard_normal((B, T, F_IN))
    L = None if lengths is None else np.array(lengths)
    R = rng.standard_normal((B, T, U))  # padded steps too: Keras' copies of the last valid output
    S = [rng.standard_normal((B, U)) for _ in range(2 if cell == "lstm" else 1)]
    out, dx = _analytic(layer, device, x, L, None, R, S)

    xt, ot, st = _torch_run(torch, t, x, L)
    if L is not None:  # torch's zeros past each length -> Keras': each padded step repeats the last valid one
        ot = ot[np.arange(B)[:, None], np.minimum(np.arange(T)[None, :], L[:, None] - 1)]
    states_t = list(st) if cell == "lstm" else [st]
    loss = (ot * torch.tensor(R)).sum() + sum((s[0] * torch.tensor(w)).sum() for s, w in zip(states_t, S))
    loss.backward()
    tol = dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_np(out[0]), ot.detach().numpy(), **tol)
    for ours, theirs in zip(out[1:], states_t):
        np.testing.assert_allclose(to_np(ours), theirs[0].detach().numpy(), **tol)
    np.testing.assert_allclose(to_np(dx), xt.grad.numpy(), **tol)
    for k, g in layer.grads.items():
        np.testing.assert_allclose(to_np(g), getattr(t, k).grad.numpy(), err_msg=k, **tol)


@pytest.mark.parametrize("lengths", [None, [4, 1, 3, 2, 4]], ids=["full", "packed"])
@pytest.mark.parametrize("return_sequences", [True, False], ids=["seq", "last"])
@pytest.mark.parametrize("mode", list(K.MERGE_MODES))
def test_bidirectional_matches_torch(light_device, mode, return_sequences, lengths):
    """Every merge mode is the same function of torch's bidirectional halves (concat: torch's output)."""
    torch = pytest.importorskip("torch")
    dev = light_device
    layer = K.Bidirectional(K.LSTM(U, return_sequences=return_sequences, return_state=True), merge_mode=mode,
                            device=dev, dtype="float64", seed=7).build((T, F_IN))
    t = _torch_rnn(torch, layer, bidirectional=True)
    rng = np.random.default_rng(8)
    B = 5
    x = rng.standard_normal((B, T, F_IN))
    L = None if lengths is None else np.array(lengths)
    uo = U * (2 if mode == "concat" else 1)
    R = rng.standard_normal((B, T, uo) if return_sequences else (B, uo))
    if L is not None and return_sequences:
        R = R * (np.arange(T)[None, :] < L[:, None])[..., None]
    S = [rng.standard_normal((B, U)) for _ in range(4)]
    out, dx = _analytic(layer, dev, x, L, None, R, S)

    xt, ot, (hn, cn) = _torch_run(torch, t, x, L)
    if return_sequences:
        a, b = ot[..., :U], ot[..., U:]
    else:  # Keras: forward direction's final state, backward direction's output at t=0 (its final state)
        a, b = hn[0], hn[1]
    merged = {"concat": lambda: torch.cat([a, b], -1), "sum": lambda: a + b, "ave": lambda: (a + b) / 2,
              "mul": lambda: a * b}[mode]()
    states_t = [hn[0], cn[0], hn[1], cn[1]]
    loss = (merged * torch.tensor(R)).sum() + sum((s * torch.tensor(w)).sum() for s, w in zip(states_t, S))
    loss.backward()
    tol = dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_np(out[0]), merged.detach().numpy(), **tol)
    for ours, theirs in zip(out[1:], states_t):
        np.testing.assert_allclose(to_np(ours), theirs.detach().numpy(), **tol)
    np.testing.assert_allclose(to_np(dx), xt.grad.numpy(), **tol)
    for sub, sfx in ((layer.forward_layer, ""), (layer.backward_layer, "_reverse")):
        for k, g in sub.grads.items():
            np.testing.assert_allclose(to_np(g), getattr(t, k + sfx).grad.numpy(), err_msg=k + sfx, **tol)


# ---------------------------------------------------------------------------
# masks: a padded batch equals each sequence run alone
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh", "bidir_lstm_concat", "bidir_gru_mul", "lstm_backwards"])
def test_masked_batch_equals_per_sequence_runs(light_device, kind):
    dev = light_device
    lengths = np.array([4, 2, 3, 1, 4])
    B = len(lengths)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((B, T, F_IN))
    x[np.arange(T)[None, :] >= lengths[:, None]] = 123.0  # padding content must not matter

    def make():
        opts = {"return_sequences": True, "return_state": True}
        if kind.startswith("bidir"):
            _, cell, mode = kind.split("_")
            cls, extra = CELLS[cell]
            return K.Bidirectional(cls(U, **extra, **opts), merge_mode=mode, device=dev, dtype="float64",
                                   seed=3).build((T, F_IN))
        cell = kind.split("_")[0] if kind != "rnn_tanh" else "rnn_tanh"
        return _layer(cell, {**opts, "go_backwards": kind.endswith("backwards")}, dev, seed=3)

    layer = make()
    out = layer(put(dev, x), lengths=lengths)
    y, states = to_np(out[0]), [to_np(s) for s in out[1:]]
    R = rng.standard_normal(y.shape)
    S = [rng.standard_normal(s.shape) for s in states]
    layer.zero_grad()
    dx = to_np(layer.backward(put(dev, R), [put(dev, s) for s in S]))
    grads = {k: to_np(v) for k, v in layer.grads.items()}

    single = make()  # same seed: same weights
    single.zero_grad()
    for b, n in enumerate(lengths):
        o = single(put(dev, x[b:b + 1, :n, :]))
        yb = to_np(o[0])
        go_back = kind.endswith("backwards")
        # go_backwards returns the reversed padded sequence: the valid part comes last
        valid = y[b, T - n:, :] if go_back else y[b, :n, :]
        np.testing.assert_allclose(valid, yb[0], rtol=1e-12, atol=1e-13)
        pad = y[b, :T - n, :] if go_back else y[b, n:, :]
        # Keras: zeros before a reversed sequence and in Bidirectional, else copies of the last valid output
        zeros = go_back or kind.startswith("bidir")
        np.testing.assert_array_equal(pad, 0.0 * pad if zeros else np.broadcast_to(y[b, n - 1], pad.shape))
        for s_batch, s_one in zip(states, o[1:]):
            np.testing.assert_allclose(s_batch[b], to_np(s_one)[0], rtol=1e-12, atol=1e-13)
        Rb = R[b:b + 1, T - n:, :] if go_back else R[b:b + 1, :n, :].copy()
        if not zeros:  # the gradients at the copies reach the output they copy
            Rb[0, -1] += R[b, n:, :].sum(axis=0)
        dxb = to_np(single.backward(put(dev, Rb), [put(dev, s[b:b + 1]) for s in S]))
        np.testing.assert_allclose(dx[b, :n, :], dxb[0], rtol=1e-10, atol=1e-12)
        assert np.all(dx[b, n:, :] == 0.0)
    for k, v in single.grads.items():
        np.testing.assert_allclose(grads[k], to_np(v), rtol=1e-10, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_padded_outputs_are_keras(device, cell):
    """Hand-checked cases of Keras' rule (a masked step keeps the previous output and state): padded steps
    repeat the last valid output exactly; an empty row outputs zeros whatever its initial state, which it
    keeps; go_backwards puts zeros first; zero_output_for_mask gives zeros, and a zero last output for
    every padded row."""
    lengths = np.array([2, 4, 0])
    rng = np.random.default_rng(13)
    x = rng.standard_normal((3, T, F_IN))
    init = [rng.standard_normal((3, U)) for _ in range(2 if cell == "lstm" else 1)]
    runs = {}
    for name, opts in {"seq": {"return_sequences": True}, "last": {},
                       "back": {"return_sequences": True, "go_backwards": True},
                       "zero": {"return_sequences": True, "zero_output_for_mask": True},
                       "zero_last": {"zero_output_for_mask": True}}.items():
        layer = _layer(cell, {**opts, "return_state": True}, device, seed=6)
        out = layer(put(device, x), lengths=lengths, initial_state=[put(device, s) for s in init])
        runs[name] = [to_np(a) for a in out]
    y, h = runs["seq"][0], runs["seq"][1]
    np.testing.assert_array_equal(y[0, 2:], np.broadcast_to(y[0, 1], (T - 2, U)))
    np.testing.assert_array_equal(y[2], 0.0 * y[2])
    np.testing.assert_array_equal(h[0], y[0, 1])
    for name in runs:
        for s_out, s0 in zip(runs[name][1:], init):  # the empty row keeps its initial states
            np.testing.assert_array_equal(s_out[2], s0[2])
    np.testing.assert_array_equal(runs["last"][0], np.stack([y[0, 1], y[1, 3], 0.0 * y[2, 0]]))
    yb = runs["back"][0]
    assert np.all(yb[0, :2] == 0.0) and np.all(yb[2] == 0.0) and np.all(yb[0, 2:] != 0.0)
    np.testing.assert_array_equal(runs["zero"][0], y * (np.arange(T)[None, :] < lengths[:, None])[..., None])
    np.testing.assert_array_equal(runs["zero_last"][0], np.stack([0.0 * y[0, 1], y[1, 3], 0.0 * y[2, 0]]))


def test_masking_lengths_trailing_only(device):
    """Only the trailing run of mask_value steps is padding; host and device measurements agree."""
    x = np.ones((3, 5, 2))
    x[0, 3:] = 0.0          # length 3
    x[1, 1, :] = 0.0        # an interior all-zero step is data: length 5
    x[2, :, :] = 0.0        # all padding: length 0
    x[2, 0, 1] = 0.5        # ... except the first step: length 1
    m = K.Masking(device=device, dtype="float64").build((5, 2))
    np.testing.assert_array_equal(m.compute_lengths(x), [3, 5, 1])
    np.testing.assert_array_equal(m.compute_lengths(put(device, x)), [3, 5, 1])
    m7 = K.Masking(mask_value=7.0).build((5, 2))
    np.testing.assert_array_equal(m7.compute_lengths(np.full((1, 5, 2), 7.0)), [0])
    ids = np.array([[3, 0, 2, 0, 0], [1, 1, 1, 1, 1]])
    e = K.Embedding(4, 2, mask_zero=True, device=device, dtype="float64").build((5,))
    np.testing.assert_array_equal(e.compute_lengths(ids), [3, 5])
    np.testing.assert_array_equal(e.compute_lengths(put(device, ids, "int64")), [3, 5])


# ---------------------------------------------------------------------------
# stateful carry
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_stateful_chunks_equal_one_long_run(device, cell):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 6, F_IN))
    whole = _layer(cell, {"return_sequences": True, "return_state": True}, device, seed=2)
    out = whole(put(device, x))
    chunked = _layer(cell, {"return_sequences": True, "stateful": True}, device, seed=2)
    parts = [to_np(chunked(put(device, x[:, s:s + 2, :]))) for s in (0, 2, 4)]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), to_np(out[0]), rtol=1e-12, atol=1e-13)
    for a, b in zip(chunked.states, out[1:]):
        np.testing.assert_allclose(to_np(a), to_np(b), rtol=1e-12, atol=1e-13)
    chunked.reset_states()
    assert chunked.states is None
    np.testing.assert_allclose(to_np(chunked(put(device, x[:, 0:2, :]))), parts[0], rtol=1e-12)
    with pytest.raises(ShapeError, match="same batch size"):
        chunked(put(device, x[:1, 0:2, :]))


# ---------------------------------------------------------------------------
# Dense, TimeDistributed, Embedding, Dropout
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("activation", [None, "tanh", "relu", "sigmoid", "softmax"])
@pytest.mark.parametrize("rank", [2, 3])
def test_dense_finite_differences(device, activation, rank):
    d = K.Dense(4, activation=activation, device=device, dtype="float64", seed=0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5) if rank == 2 else (2, 3, 5))
    R = rng.standard_normal(x.shape[:-1] + (4,))
    y = d(put(device, x))
    d.zero_grad()
    dx = d.backward(put(device, R))
    assert_on(device, y, dx)
    # independent NumPy forward
    W, b = to_np(d.weight), to_np(d.bias)
    z = x @ W.T + b
    ref = {None: z, "tanh": np.tanh(z), "relu": np.maximum(z, 0), "sigmoid": 1 / (1 + np.exp(-z)),
           "softmax": np.exp(z) / np.exp(z).sum(-1, keepdims=True)}[activation]
    np.testing.assert_allclose(to_np(y), ref, rtol=1e-12)
    np.testing.assert_allclose(to_np(d.logits), z, rtol=1e-12)
    analytic = {k: to_np(v) for k, v in d.grads.items()}
    analytic["x"] = to_np(dx)
    check_gradients(device, d, lambda x=x: float(np.sum(to_np(d(put(device, x))) * R)), analytic, {"x": x})


def test_dense_from_logits_skips_activation():
    d = K.Dense(3, activation="softmax", dtype="float64", seed=0)
    x = np.random.default_rng(0).standard_normal((2, 4))
    d(x)
    g = np.random.default_rng(1).standard_normal((2, 3))
    d.zero_grad()
    dx = d.backward(g, from_logits=True)
    np.testing.assert_allclose(dx, g @ to_np(d.weight), rtol=1e-12)
    np.testing.assert_allclose(to_np(d.grads["weight"]), g.T @ x, rtol=1e-12)


def test_time_distributed_equals_dense_per_step(device):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 5))
    td = K.TimeDistributed(K.Dense(3, activation="tanh"), device=device, dtype="float64", seed=4)
    y = td(put(device, x))
    assert td.output_shape == (4, 3)
    dense = td.layer
    for t in range(4):
        np.testing.assert_allclose(to_np(y)[:, t, :], to_np(dense(put(device, x[:, t, :]))), rtol=1e-12)
    R = rng.standard_normal((2, 4, 3))
    y = td(put(device, x))
    td.zero_grad()
    dx = td.backward(put(device, R))
    analytic = {k: to_np(v) for k, v in td.grads.items()}
    analytic["x"] = to_np(dx)
    assert set(analytic) == {"dense.weight", "dense.bias", "x"}
    check_gradients(device, td, lambda x=x: float(np.sum(to_np(td(put(device, x))) * R)), analytic, {"x": x})


def test_embedding_gradient(device):
    e = K.Embedding(5, 3, device=device, dtype="float64", seed=0)
    ids = np.array([[1, 4, 1], [0, 2, 4]])
    out = e(put(device, ids, "int64"))
    np.testing.assert_allclose(to_np(out), to_np(e.weight)[ids], rtol=0)
    R = np.random.default_rng(2).standard_normal((2, 3, 3))
    e.zero_grad()
    assert e.backward(put(device, R)) is None
    ref = np.zeros((5, 3))
    np.add.at(ref, ids, R)
    np.testing.assert_allclose(to_np(e.grads["weight"]), ref, rtol=1e-12)
    with pytest.raises(DTypeError, match="integer token ids"):
        e(put(device, ids.astype(float)))


def test_dropout_train_and_eval(device):
    drop = K.Dropout(0.5, device=device, dtype="float64", seed=0)
    x = np.ones((4, 50, 10))
    y = to_np(drop(put(device, x)))
    kept = y != 0
    assert 0.4 < kept.mean() < 0.6
    np.testing.assert_allclose(y[kept], 2.0)  # inverted dropout scales the kept units
    g = to_np(drop.backward(put(device, np.full(x.shape, 3.0))))
    np.testing.assert_array_equal(g, np.where(kept, 6.0, 0.0))  # the forward's mask
    drop.eval()
    np.testing.assert_array_equal(to_np(drop(put(device, x))), x)
    np.testing.assert_array_equal(to_np(drop.backward(put(device, x))), x)


def test_recurrent_input_dropout_one_mask_per_sequence():
    """LSTM(dropout=p): the same input mask at every step of a sequence (Keras), none in eval."""
    layer = K.LSTM(U, dropout=0.5, return_sequences=True, dtype="float64", seed=0).build((T, F_IN))
    ref = K.LSTM(U, return_sequences=True, dtype="float64", seed=0).build((T, F_IN))
    x = np.random.default_rng(0).standard_normal((6, T, F_IN))
    layer.rng = np.random.default_rng(42)
    keep = np.random.default_rng(42).random((6, 1, F_IN), dtype=np.float32) >= 0.5
    np.testing.assert_allclose(layer(x), ref(x * keep * 2.0), rtol=1e-12)
    layer.eval()
    np.testing.assert_allclose(layer(x), ref(x), rtol=1e-12)


# ---------------------------------------------------------------------------
# Keras parameter counts, configs, seeds
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("f,u", [(1, 50), (7, 3)])
def test_keras_parameter_counts(f, u):
    assert K.LSTM(u).build((None, f)).count_params() == 4 * (u * (f + u) + u)
    assert K.GRU(u).build((None, f)).count_params() == 3 * (u * (f + u) + 2 * u)
    assert K.SimpleRNN(u).build((None, f)).count_params() == u * (f + u) + u
    assert K.LSTM(u, use_bias=False).build((None, f)).count_params() == 4 * u * (f + u)
    assert K.Dense(u).build((f,)).count_params() == f * u + u
    assert K.Bidirectional(K.LSTM(u)).build((None, f)).count_params() == 2 * 4 * (u * (f + u) + u)
    assert K.Embedding(f, u).build((None,)).count_params() == f * u


def test_unit_forget_bias_and_init_range():
    lstm = K.LSTM(8, dtype="float64", seed=0).build((5, 3))
    b = to_np(lstm.bias_ih_l0)
    np.testing.assert_array_equal(b[8:16], 1.0)  # forget gate starts at exactly 1 (Keras' unit_forget_bias)
    k = 1 / np.sqrt(8)
    assert np.all(np.abs(to_np(lstm.weight_hh_l0)) <= k) and np.all(np.abs(b[:8]) <= k)
    plain = K.LSTM(8, unit_forget_bias=False, dtype="float64", seed=0).build((5, 3))
    assert np.all(np.abs(to_np(plain.bias_ih_l0)) <= k)


def test_same_seed_same_weights_on_every_backend(device):
    a = K.Bidirectional(K.GRU(3), device=device, dtype="float64", seed=5).build((None, 2))
    b = K.Bidirectional(K.GRU(3), dtype="float64", seed=5).build((None, 2))
    for (ka, va), (kb, vb) in zip(a.parameters().items(), b.parameters().items()):
        assert ka == kb
        np.testing.assert_array_equal(to_np(va), to_np(vb))


def test_config_round_trip():
    for layer in [K.LSTM(4, return_sequences=True, go_backwards=True, dropout=0.25, unit_forget_bias=False),
                  K.LSTM(2, return_sequences=True, zero_output_for_mask=True),
                  K.GRU(2, stateful=True), K.SimpleRNN(3, activation="relu", return_state=True),
                  K.Dense(3, activation="softmax", use_bias=False), K.Dropout(0.3), K.Masking(-1.0),
                  K.Embedding(9, 4, mask_zero=True), K.TimeDistributed(K.Dense(2)),
                  K.Bidirectional(K.LSTM(2, return_sequences=True), merge_mode="ave")]:
        spec = {"class_name": type(layer).__name__, "config": layer.get_config()}
        again = K.layer_from_config(spec)
        assert type(again) is type(layer)
        assert again.get_config() == layer.get_config()


def test_to_moves_recurrent_layer_and_keeps_working(device):
    layer = K.LSTM(U, return_sequences=True, dtype="float64", seed=1).build((T, F_IN))
    x = np.random.default_rng(0).standard_normal((2, T, F_IN))
    ref = layer(x)
    layer.to(device)
    np.testing.assert_allclose(to_np(layer(put(device, x))), ref, rtol=1e-12)
    layer.zero_grad()
    layer.backward(put(device, np.ones((2, T, U))))
    assert_on(device, *layer.grads.values())


# ---------------------------------------------------------------------------
# misuse
# ---------------------------------------------------------------------------

def test_errors():
    with pytest.raises(ConfigError, match="unknown activation 'gelu'"):
        K.Dense(3, activation="gelu")
    with pytest.raises(ConfigError, match="activation='tanh'"):
        K.LSTM(3, activation="relu")
    with pytest.raises(ConfigError, match="recurrent_dropout"):
        K.GRU(3, recurrent_dropout=0.2)
    with pytest.raises(ConfigError, match="merge_mode"):
        K.Bidirectional(K.LSTM(3), merge_mode="max")
    with pytest.raises(ConfigError, match="Bidirectional wraps"):
        K.Bidirectional(K.Dense(3))
    with pytest.raises(ConfigError, match="units must be a positive integer"):
        K.LSTM(0)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        K.Dropout(1.0)
    lstm = K.LSTM(3)
    with pytest.raises(StateError, match="no weights yet"):
        lstm.forward(np.zeros((1, 2, 2), dtype=np.float32))
    lstm.build((None, 2))
    with pytest.raises(ShapeError, match=r"add a feature axis"):
        lstm(np.zeros((4, 5), dtype=np.float32))
    with pytest.raises(ShapeError, match="3 features .* built for 2"):
        lstm(np.zeros((4, 5, 3), dtype=np.float32))
    with pytest.raises(DTypeError):
        lstm(np.zeros((4, 5, 2), dtype=np.float64))
    with pytest.raises(ShapeError, match=r"lengths must lie in \[0, timesteps=5\]"):
        lstm(np.zeros((2, 5, 2), dtype=np.float32), lengths=[6, 1])
    with pytest.raises(StateError, match="needs a preceding forward"):
        K.LSTM(3).build((None, 2)).backward(np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(ShapeError, match=r"initial_state\[0\] must have shape"):
        lstm(np.zeros((2, 5, 2), dtype=np.float32),
             initial_state=[np.zeros((3, 3), dtype=np.float32), np.zeros((2, 3), dtype=np.float32)])
