"""Sequential: equal to the same layers composed by hand, PyTorch training steps, losses by
finite differences, fit on a learnable task, predict batching, masks vs per-sequence runs,
stateful TBPTT vs a hand-written chunked loop, summary counts, checkpoints, misuse."""

import math
import re

import numpy as np
import pytest

import xrnn
from xrnn import layers as K
from xrnn import optim
from xrnn.errors import ConfigError, DTypeError, NonFiniteError, ShapeError, StateError
from xrnn.gradcheck import parameter_gradients
from xrnn.keras_optim import KerasAdam, KerasRMSprop
from xrnn.sequential import History, Sequential

from conftest import assert_on, put, to_np

T, F_IN = 5, 2


def _sub_state(model, prefix):
    return {k[len(prefix) + 1:]: v for k, v in model.state_dict().items() if k.startswith(prefix + ".")}


# ---------------------------------------------------------------------------
# a Sequential is its layers composed by hand
# ---------------------------------------------------------------------------

def _stack_plain(dev):
    model = Sequential([K.Input((T, F_IN)), K.LSTM(4, return_sequences=True), K.GRU(3),
                        K.Dense(2, activation="tanh")], device=dev, dtype="float64", seed=0)
    hand = [K.LSTM(4, return_sequences=True), K.GRU(3), K.Dense(2, activation="tanh")]
    return model, hand, None


def _stack_masked(dev):
    model = Sequential([K.Masking(input_shape=(T, F_IN)),
                        K.Bidirectional(K.LSTM(3, return_sequences=True), merge_mode="ave"),
                        K.TimeDistributed(K.Dense(2, activation="sigmoid"))], device=dev, dtype="float64", seed=0)
    hand = [K.Bidirectional(K.LSTM(3, return_sequences=True), merge_mode="ave"),
            K.TimeDistributed(K.Dense(2, activation="sigmoid"))]
    return model, hand, np.array([5, 2, 3, 1])


@pytest.mark.parametrize("make", [_stack_plain, _stack_masked], ids=["plain", "masked"])
def test_matches_hand_composition(device, make):
    model, hand, lengths = make(device)
    names = [l.name for l in model.layers if not isinstance(l, K.Masking)]
    shape = (T, F_IN)
    for layer, name in zip(hand, names):
        layer.to(device, "float64")
        for _, m in layer.named_modules():
            m.device, m.dtype = device, "float64"
        layer.build(shape)
        layer.load_state_dict(_sub_state(model, name))
        shape = layer.output_shape
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, T, F_IN))
    if lengths is not None:
        x[np.arange(T)[None, :] >= lengths[:, None]] = 0.0  # right padding the Masking layer finds
    xd = put(device, x)
    y = model(xd)
    h = xd
    for layer in hand:
        h = layer(h, lengths=lengths)
    np.testing.assert_allclose(to_np(y), to_np(h), rtol=1e-13, atol=1e-14)
    R = put(device, rng.standard_normal(tuple(y.shape)))
    model.zero_grad()
    dx = model.backward(R)
    d = R
    for layer in reversed(hand):
        layer.zero_grad()
        d = layer.backward(d)
    assert_on(device, dx, *model.grads.values())
    np.testing.assert_allclose(to_np(dx), to_np(d), rtol=1e-13, atol=1e-14)
    for layer, name in zip(hand, names):
        for k, g in layer.grads.items():
            np.testing.assert_allclose(to_np(model.grads[f"{name}.{k}"]), to_np(g), rtol=1e-13, atol=1e-14)


def test_training_steps_match_torch():
    """Keras' vanilla LSTM (LSTM -> Dense) trained with Adam on MSE takes PyTorch's steps."""
    torch = pytest.importorskip("torch")
    model = Sequential([K.Input((T, F_IN)), K.LSTM(6), K.Dense(1)], dtype="float64", seed=3)
    model.compile(optimizer=lambda m: optim.Adam(m, lr=0.05), loss="mse")
    lstm = torch.nn.LSTM(F_IN, 6, batch_first=True, dtype=torch.float64)
    head = torch.nn.Linear(6, 1, dtype=torch.float64)
    sd = {k: torch.from_numpy(np.array(v)) for k, v in _sub_state(model, "lstm").items()}
    sd["bias_hh_l0"] = torch.zeros(24, dtype=torch.float64)
    lstm.load_state_dict(sd)
    lstm.bias_hh_l0.requires_grad_(False)  # the Keras LSTM has one bias
    head.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in _sub_state(model, "dense").items()})
    topt = torch.optim.Adam([p for p in list(lstm.parameters()) + list(head.parameters()) if p.requires_grad], lr=0.05)
    rng = np.random.default_rng(4)
    for _ in range(3):
        x, y = rng.standard_normal((7, T, F_IN)), rng.standard_normal((7, 1))
        ours = model.train_on_batch(x, y)
        topt.zero_grad()
        out, _ = lstm(torch.tensor(x))
        loss = torch.nn.functional.mse_loss(head(out[:, -1, :]), torch.tensor(y))
        loss.backward()
        topt.step()
        assert ours == pytest.approx(loss.item(), rel=1e-12)
    for k in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0"):
        np.testing.assert_allclose(to_np(model.lstm.parameters()[k]), getattr(lstm, k).detach().numpy(), rtol=1e-10)
    np.testing.assert_allclose(to_np(model.dense.weight), head.weight.detach().numpy(), rtol=1e-10)


# ---------------------------------------------------------------------------
# losses: values against NumPy, gradients by finite differences
# ---------------------------------------------------------------------------

def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


# name, loss, head activation, units, return_sequences, masked, target maker, numpy loss(output, logits, y, w)
LOSS_CASES = [
    ("mse", "mse", None, 2, False, False, lambda r, s: r.standard_normal(s),
     lambda o, z, y, w: np.mean((o - y) ** 2)),
    ("mae_tanh", "mae", "tanh", 2, False, False, lambda r, s: r.standard_normal(s),
     lambda o, z, y, w: np.mean(np.abs(o - y))),
    ("mse_masked_seq", "mean_squared_error", None, 2, True, True, lambda r, s: r.standard_normal(s),
     lambda o, z, y, w: np.sum(w[..., None] * (o - y) ** 2) / (w.sum() * o.shape[-1])),
    ("bce_sigmoid", "binary_crossentropy", "sigmoid", 3, False, False, lambda r, s: r.integers(0, 2, s) * 1.0,
     lambda o, z, y, w: np.mean(-(y * np.log(_sigmoid(z)) + (1 - y) * np.log(1 - _sigmoid(z))))),
    ("bce_logits_masked", "binary_cross_entropy", None, 1, True, True, lambda r, s: r.uniform(0, 1, s),
     lambda o, z, y, w: np.sum(w[..., None] * -(y * np.log(_sigmoid(z)) + (1 - y) * np.log(1 - _sigmoid(z))))
     / w.sum()),
    ("ce_softmax_sparse", "sparse_categorical_crossentropy", "softmax", 3, False, False,
     lambda r, s: r.integers(0, 3, s[:-1]),
     lambda o, z, y, w: -np.mean(np.take_along_axis(_log_softmax(z), y[..., None], -1))),
    ("ce_logits_onehot", "categorical_crossentropy", None, 3, False, False,
     lambda r, s: np.eye(3)[r.integers(0, 3, s[:-1])],
     lambda o, z, y, w: -np.mean(np.sum(y * _log_softmax(z), -1))),
    ("ce_softmax_masked_seq", "cross_entropy", "softmax", 3, True, True, lambda r, s: r.integers(0, 3, s[:-1]),
     lambda o, z, y, w: -np.sum(w * np.take_along_axis(_log_softmax(z), y[..., None], -1)[..., 0]) / w.sum()),
]


@pytest.mark.parametrize("case", LOSS_CASES, ids=[c[0] for c in LOSS_CASES])
def test_losses_values_and_gradients(case):
    _, loss, act, units, seqs, masked, make_y, ref = case
    first = [K.Masking(input_shape=(4, 2))] if masked else [K.Input((4, 2))]
    model = Sequential(first + [K.SimpleRNN(3, return_sequences=seqs), K.Dense(units, activation=act)],
                       dtype="float64", seed=2)
    model.compile(loss=loss)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 4, 2))
    lengths = np.array([4, 2, 3, 1, 4])
    if masked:
        x[np.arange(4)[None, :] >= lengths[:, None]] = 0.0
    y = make_y(rng, (5, 4, units) if seqs else (5, units))
    if masked and y.dtype.kind == "f":
        y[np.arange(4)[None, :] >= lengths[:, None]] = 99.0  # padded targets must not count
    w = (np.arange(4)[None, :] < lengths[:, None]).astype(float)
    model.zero_grad()
    value = float(model.loss_and_gradients(x, y.astype(np.int64) if y.dtype.kind == "i" else y))
    out = model.predict(x)
    z = to_np(model.dense.logits)
    assert value == pytest.approx(ref(out, z, y, w), rel=1e-12)
    assert model.evaluate(x, y, batch_size=5) == pytest.approx(value, rel=1e-12)
    analytic = {k: np.array(to_np(v)) for k, v in model.grads.items()}
    num = parameter_gradients(model, lambda: model.evaluate(x, y, batch_size=5))
    for k in num:
        np.testing.assert_allclose(analytic[k], num[k], rtol=1e-6, atol=1e-9, err_msg=k)


def test_accuracy_metric():
    model = Sequential([K.Input((3, 2)), K.GRU(4), K.Dense(3, activation="softmax")], dtype="float64", seed=0)
    model.compile(loss="cross_entropy", metrics=["accuracy"])
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 3, 2)), rng.integers(0, 3, 40)
    loss, acc = model.evaluate(x, y, batch_size=16)
    assert acc == pytest.approx(np.mean(np.argmax(to_np(model.predict(x)), -1) == y))
    h = model.fit(x, y, epochs=2, verbose=0, validation_split=0.25)
    assert set(h.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}


# ---------------------------------------------------------------------------
# fit / predict / evaluate
# ---------------------------------------------------------------------------

def _sine(n_windows=290, window=8):
    s = np.sin(np.arange(n_windows + window + 2) * 0.2)
    x = np.stack([s[i:i + window] for i in range(n_windows)])[..., None]  # (N, window, 1)
    return x, s[window:window + n_windows][:, None]  # next value, (N, 1)


def test_fit_learns_next_value_of_a_sine():
    """Vanilla LSTM(16) -> Dense(1), Adam(0.01), 20 epochs: MSE from ~0.4 to below 1e-3
    (predicting the mean scores 0.5), on training and held-out data."""
    x, y = _sine()
    model = Sequential([K.Input((8, 1)), K.LSTM(16), K.Dense(1)], seed=0)
    model.compile(optimizer="adam", loss="mse", learning_rate=0.01)
    lines = []
    history = model.fit(x, y, epochs=20, batch_size=32, validation_split=0.2, print_fn=lines.append)
    assert isinstance(history, History) and history.epoch == list(range(20))
    assert len(history["loss"]) == len(history["val_loss"]) == 20
    assert history["loss"][0] > 0.1
    assert history["loss"][-1] < 1e-3 and history["val_loss"][-1] < 1e-3
    assert re.match(r"Epoch 20/20 - 8 steps - [0-9.]+s - loss: 0\.000\d - val_loss: 0\.000\d", lines[-1])
    assert model.optimizer.steps == 20 * 8  # 232 training samples in batches of 32
    # Keras holds out the last 20% before shuffling
    assert model.evaluate(x[232:], y[232:]) == pytest.approx(history["val_loss"][-1], rel=1e-5)


def test_same_seed_same_run_on_every_backend(device):
    """Init, shuffles and dropout masks come from one host generator: identical histories."""
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((12, 3, 2)), rng.standard_normal((12, 1))

    def run(dev):
        model = Sequential([K.GRU(4, return_sequences=True), K.Dropout(0.3), K.LSTM(3), K.Dense(1)],
                           device=dev, dtype="float64", seed=7)
        model.compile(optimizer="rmsprop", loss="mae")
        h = model.fit(x, y, epochs=2, batch_size=5, verbose=0)
        return h["loss"], model

    ref, _ = run("cpu")
    losses, model = run(device)
    np.testing.assert_allclose(losses, ref, rtol=1e-10)
    assert_on(device, *model.parameters().values(), model.predict(x))


@pytest.mark.parametrize("masked", [False, True])
def test_predict_batches_equal_one_call(device, masked):
    layers = [K.Masking(input_shape=(T, F_IN))] if masked else [K.Input((T, F_IN))]
    model = Sequential(layers + [K.LSTM(4, return_sequences=True), K.Dense(2)], device=device, dtype="float64",
                       seed=1)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((11, T, F_IN))
    if masked:
        x[np.arange(T)[None, :] >= rng.integers(1, T + 1, 11)[:, None]] = 0.0
    whole = to_np(model.predict(x, batch_size=11))
    np.testing.assert_allclose(to_np(model.predict(x, batch_size=4)), whole, rtol=1e-13, atol=1e-14)
    # device inputs, and inputs from another library, are moved batch by batch
    np.testing.assert_allclose(to_np(model.predict(put(device, x), batch_size=3)), whole, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(to_np(model.predict(x.tolist())), whole,
                               rtol=1e-13)
    assert model.training  # predict restores the mode


def test_inputs_from_torch_for_a_numpy_model():
    torch = pytest.importorskip("torch")
    model = Sequential([K.Input((T, F_IN)), K.SimpleRNN(3), K.Dense(1)], seed=0)
    model.compile(loss="mse")
    x = np.random.default_rng(0).standard_normal((6, T, F_IN)).astype(np.float32)
    y = np.zeros((6, 1), np.float32)
    np.testing.assert_allclose(model.predict(torch.from_numpy(x)), model.predict(x), rtol=1e-6)
    assert model.evaluate(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(model.evaluate(x, y), rel=1e-6)


def test_return_state_model_predicts_a_list():
    model = Sequential([K.Input((T, F_IN)), K.LSTM(3, return_state=True)], dtype="float64", seed=0)
    x = np.random.default_rng(0).standard_normal((5, T, F_IN))
    out, h, c = model.predict(x, batch_size=2)
    assert out.shape == h.shape == c.shape == (5, 3)
    np.testing.assert_array_equal(out, h)
    model.compile(loss="mse")
    with pytest.raises(ConfigError, match="return_state=True"):
        model.fit(x, np.zeros((5, 3)))


# ---------------------------------------------------------------------------
# masks: a padded batch trains exactly like its sequences one by one
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["seq_mse", "last_ce", "embedding_seq_ce"])
def test_masked_batch_loss_and_gradients_equal_per_sequence(light_device, task):
    dev = light_device
    rng = np.random.default_rng(6)
    lengths = np.array([5, 2, 4, 1, 3])
    B = len(lengths)
    pad = np.arange(T)[None, :] >= lengths[:, None]
    if task == "embedding_seq_ce":
        layers = [K.Embedding(6, 3, mask_zero=True), K.GRU(4, return_sequences=True), K.Dense(6)]
        x = rng.integers(1, 6, (B, T))
        x[pad] = 0
        y = rng.integers(0, 6, (B, T))
        loss = "cross_entropy"
    elif task == "seq_mse":
        layers = [K.Masking(), K.LSTM(4, return_sequences=True), K.Dense(2)]
        x = rng.uniform(0.5, 1.5, (B, T, F_IN))
        x[pad] = 0.0
        y = rng.standard_normal((B, T, 2))
        y[pad] = 1e3
        loss = "mse"
    else:
        layers = [K.Masking(), K.Bidirectional(K.LSTM(3)), K.Dense(3, activation="softmax")]
        x = rng.uniform(0.5, 1.5, (B, T, F_IN))
        x[pad] = 0.0
        y = rng.integers(0, 3, B)
        loss = "cross_entropy"
    model = Sequential(layers, device=dev, dtype="float64", seed=4)
    model.compile(loss=loss)
    model.build((None,) + x.shape[1:])
    xin = put(dev, x, "int64" if x.dtype.kind == "i" else "float64")
    yin = put(dev, y, "int64" if y.dtype.kind == "i" else "float64")
    model.zero_grad()
    batch_loss = float(model.loss_and_gradients(xin, yin))
    batch_grads = {k: np.array(to_np(v)) for k, v in model.grads.items()}  # copies: the arrays are live

    # one sequence at a time, unpadded; the batch loss is the mean over valid positions (or sequences)
    weights = lengths / lengths.sum() if task != "last_ce" else np.full(B, 1.0 / B)
    model.zero_grad()
    total = 0.0
    acc = {k: np.zeros_like(v) for k, v in batch_grads.items()}
    for b, n in enumerate(lengths):
        xb = x[b:b + 1, :n]
        yb = y[b:b + 1] if task == "last_ce" else y[b:b + 1, :n]
        model.zero_grad()
        lb = float(model.loss_and_gradients(put(dev, xb, "int64" if x.dtype.kind == "i" else "float64"),
                                            put(dev, yb, "int64" if y.dtype.kind == "i" else "float64")))
        total += weights[b] * lb
        for k, v in model.grads.items():
            acc[k] += weights[b] * to_np(v)
    assert batch_loss == pytest.approx(total, rel=1e-12)
    for k in acc:
        np.testing.assert_allclose(batch_grads[k], acc[k], rtol=1e-10, atol=1e-13, err_msg=k)


# ---------------------------------------------------------------------------
# stateful: truncated BPTT across batches
# ---------------------------------------------------------------------------

def test_stateful_fit_equals_hand_written_chunked_loop():
    """Rows of batch k+1 continue rows of batch k; no gradient crosses a batch (TBPTT)."""
    rng = np.random.default_rng(8)
    B, chunk, n_chunks = 2, 3, 3
    series = rng.standard_normal((B, chunk * n_chunks, F_IN))
    target = rng.standard_normal((B, chunk * n_chunks, 1))
    # Keras' layout: sample k*B + r is chunk k of row r
    X = np.concatenate([series[:, k * chunk:(k + 1) * chunk] for k in range(n_chunks)])
    Y = np.concatenate([target[:, k * chunk:(k + 1) * chunk] for k in range(n_chunks)])
    model = Sequential([K.Input((chunk, F_IN)), K.LSTM(4, return_sequences=True, stateful=True), K.Dense(1)],
                       dtype="float64", seed=9)
    lstm = K.LSTM(4, return_sequences=True, return_state=True, dtype="float64").build((chunk, F_IN))
    dense = K.Dense(1, dtype="float64").build((chunk, 4))
    lstm.load_state_dict(_sub_state(model, "lstm"))
    dense.load_state_dict(_sub_state(model, "dense"))
    model.compile(optimizer=lambda m: optim.SGD(m, lr=0.1), loss="mse")
    with pytest.raises(ConfigError, match="shuffle=False"):
        model.fit(X, Y, batch_size=B)
    with pytest.raises(ShapeError, match="multiple of batch_size"):
        model.fit(X[:5], Y[:5], batch_size=B, shuffle=False)
    h = model.fit(X, Y, epochs=1, batch_size=B, shuffle=False, verbose=0)

    state, losses = None, []
    for k in range(n_chunks):
        xk, yk = series[:, k * chunk:(k + 1) * chunk], target[:, k * chunk:(k + 1) * chunk]
        out, hT, cT = lstm(xk, initial_state=state)
        pred = dense(out)
        losses.append(np.mean((pred - yk) ** 2))
        lstm.zero_grad()
        dense.zero_grad()
        d = dense.backward(2 * (pred - yk) / pred.size)
        lstm.backward(d)  # the gradient of the carried-in state is dropped: truncated BPTT
        for layer in (lstm, dense):
            for name, p in layer.parameters().items():
                p -= 0.1 * layer.grads[name]
        state = [hT, cT]
    assert h["loss"][0] == pytest.approx(np.mean(losses), rel=1e-12)
    for name, p in lstm.parameters().items():
        np.testing.assert_allclose(to_np(model.parameters()["lstm." + name]), p, rtol=1e-12, err_msg=name)
    for a, b in zip(model.lstm.states, state):
        np.testing.assert_allclose(to_np(a), b, rtol=1e-12)
    model.reset_states()
    assert model.lstm.states is None


def test_stateful_predict_in_chunks_equals_whole_sequence():
    x = np.random.default_rng(1).standard_normal((3, 8, F_IN))
    whole = Sequential([K.Input((None, F_IN)), K.GRU(5, return_sequences=True), K.Dense(2)], dtype="float64", seed=2)
    chunked = Sequential([K.Input((None, F_IN)), K.GRU(5, return_sequences=True, stateful=True), K.Dense(2)],
                         dtype="float64", seed=2)
    ref = whole.predict(x)
    parts = [chunked.predict(x[:, s:s + 2]) for s in range(0, 8, 2)]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), ref, rtol=1e-12)


def _stateful_regressor():
    model = Sequential([K.Input((3, F_IN)), K.LSTM(4, stateful=True), K.Dense(1)], dtype="float64", seed=3)
    return model.compile(optimizer=lambda m: optim.SGD(m, lr=0.1), loss="mse")


def _snapshot(model):
    """Host copies of everything a refused call must leave alone: weights, optimizer steps, carried states."""
    weights = {k: np.array(to_np(v), copy=True) for k, v in model.state_dict().items()}
    states = model.lstm.states
    return weights, model.optimizer.steps, None if states is None else [np.array(to_np(s), copy=True) for s in states]


def _assert_unchanged(model, snap):
    weights, steps, states = _snapshot(model)
    assert steps == snap[1]
    assert weights.keys() == snap[0].keys()
    for k in weights:
        np.testing.assert_array_equal(weights[k], snap[0][k], err_msg=k)
    if snap[2] is None:
        assert states is None
    else:
        assert states is not None and len(states) == len(snap[2])
        for a, b in zip(states, snap[2]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("how", ["validation_split", "validation_data"])
def test_stateful_fit_refuses_ragged_validation_before_training(how):
    """16 training + 6 validation samples in batches of 4: refused before epoch 1, not after it."""
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((22, 3, F_IN)), rng.standard_normal((22, 1))
    model = _stateful_regressor()
    model.fit(x[:8], y[:8], batch_size=4, shuffle=False, verbose=0)  # 2 steps, carries batch-4 states
    snap = _snapshot(model)
    assert snap[1] == 2 and snap[2][0].shape == (4, 4)
    kw = {"validation_split": 0.25} if how == "validation_split" else {"validation_data": (x[16:], y[16:])}
    xt, yt = (x, y) if how == "validation_split" else (x[:16], y[:16])
    with pytest.raises(ShapeError) as e:
        model.fit(xt, yt, epochs=2, batch_size=4, shuffle=False, verbose=0, **kw)
    msg = str(e.value)
    assert "6 validation samples" in msg and "batch_size=4" in msg and "last batch would have 2" in msg
    assert "batch_size=2" in msg  # divides both 16 and 6
    _assert_unchanged(model, snap)
    # the hinted batch size works: it divides both sets, after reset_states() (states of batch 4 are carried)
    model.reset_states()
    h = model.fit(xt, yt, epochs=1, batch_size=2, shuffle=False, verbose=0, **kw)
    assert model.optimizer.steps == 2 + 8 and math.isfinite(h["val_loss"][0])


def test_stateful_predict_and_evaluate_refuse_a_ragged_last_batch():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((20, 3, F_IN)), rng.standard_normal((20, 1))
    model = _stateful_regressor()
    for carried in (None, 5):
        if carried:
            model.predict(x[:carried], batch_size=carried)
        snap = _snapshot(model)
        with pytest.raises(ShapeError) as e:
            model.predict(x, batch_size=6)
        assert "20 samples" in str(e.value) and "batch_size=6" in str(e.value) and "batch_size=5" in str(e.value)
        _assert_unchanged(model, snap)
        with pytest.raises(ShapeError, match="20 samples"):
            model.evaluate(x, y, batch_size=6)
        _assert_unchanged(model, snap)
    # batches of 5 continue the carried batch-5 states: rows of batch k+1 continue rows of batch k
    lstm = K.LSTM(4, return_state=True, dtype="float64").build((3, F_IN))
    dense = K.Dense(1, dtype="float64").build((4,))
    lstm.load_state_dict(_sub_state(model, "lstm"))
    dense.load_state_dict(_sub_state(model, "dense"))
    state = list(snap[2])
    ref = []
    for s in range(0, 20, 5):
        out, h, c = lstm(x[s:s + 5], initial_state=state)
        ref.append(dense(out))
        state = [h, c]
    np.testing.assert_allclose(to_np(model.predict(x, batch_size=5)), np.concatenate(ref), rtol=1e-12)


def test_stateful_calls_refuse_batches_unlike_the_carried_states():
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((8, 3, F_IN)), rng.standard_normal((8, 1))
    model = _stateful_regressor()
    model.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    snap = _snapshot(model)
    calls = {
        "predict": (lambda: model.predict(x[:6], batch_size=6), "6 samples"),
        "evaluate": (lambda: model.evaluate(x[:6], y[:6], batch_size=6), "6 samples"),
        "fit": (lambda: model.fit(x, y, batch_size=2, shuffle=False, verbose=0), "8 training samples"),
    }
    for what, (call, count) in calls.items():
        with pytest.raises(ShapeError) as e:
            call()
        msg = str(e.value)
        assert msg.startswith(what + ":") and "carries states for batch size 4" in msg, msg
        assert count in msg and "reset_states()" in msg, msg
        _assert_unchanged(model, snap)
    # batches are min(samples, batch_size): 4 samples with batch_size=32 is one batch of 4, as carried
    twin = _stateful_regressor()
    twin.load_state_dict(model.state_dict())
    twin.lstm.reset_states(list(snap[2]))
    model.fit(x[4:], y[4:], batch_size=32, shuffle=False, verbose=0)
    twin.fit(x[4:], y[4:], batch_size=4, shuffle=False, verbose=0)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(to_np(v), to_np(twin.state_dict()[k]), err_msg=k)
    model.reset_states()  # starting over takes any size
    model.fit(x, y, batch_size=2, shuffle=False, verbose=0)
    assert model.optimizer.steps == 2 + 1 + 4 and model.lstm.states[0].shape == (2, 4)


def test_stateful_single_sample_forecast_step_by_step():
    """predict(x[:1]) one step at a time continues the batch-1 states: equal to the whole sequence."""
    seq = np.random.default_rng(7).standard_normal((1, 6, F_IN))
    whole = Sequential([K.Input((None, F_IN)), K.GRU(5), K.Dense(1)], dtype="float64", seed=2)
    stepwise = Sequential([K.Input((None, F_IN)), K.GRU(5, stateful=True), K.Dense(1)], dtype="float64", seed=2)
    for t in range(6):
        step = stepwise.predict(seq[:1, t:t + 1])  # (1, 1): carried states have batch 1
        np.testing.assert_allclose(to_np(step), to_np(whole.predict(seq[:, :t + 1])), rtol=1e-12)
    assert stepwise.gru.states[0].shape == (1, 5)


# ---------------------------------------------------------------------------
# summary, names, configs
# ---------------------------------------------------------------------------

def test_summary_counts_match_keras_formulas_and_num_parameters():
    model = Sequential([K.Input((10, 3)), K.Bidirectional(K.LSTM(8, return_sequences=True)), K.Dropout(0.1),
                        K.GRU(4), K.Dense(2, activation="softmax")], seed=0)
    text = model.summary(print_fn=None)
    keras = {
        "bidirectional": 2 * 4 * (8 * (3 + 8) + 8),
        "dropout": 0,
        "gru": 3 * (4 * (16 + 4) + 2 * 4),
        "dense": 4 * 2 + 2,
    }
    shapes = {"bidirectional": "(None, 10, 16)", "dropout": "(None, 10, 16)", "gru": "(None, 4)", "dense": "(None, 2)"}
    for layer in model.layers:
        assert layer.num_parameters() == keras[layer.name]
        row = next(line for line in text.splitlines() if line.startswith(f"{layer.name} ("))
        assert shapes[layer.name] in row
        assert row.split()[-1] == f"{keras[layer.name]:,}"
    assert model.num_parameters() == sum(keras.values())
    assert f"Total params: {sum(keras.values()):,}" in text
    assert [l.name for l in model.layers] == list(keras)


def test_keras_layer_names_and_state_dict_keys():
    model = Sequential([K.LSTM(2, return_sequences=True, input_shape=(3, 1)), K.LSTM(2, return_sequences=True),
                        K.TimeDistributed(K.Dense(1)), K.Dense(1, name="head")])
    assert [l.name for l in model.layers] == ["lstm", "lstm_1", "time_distributed", "head"]
    assert list(model.state_dict()) == [
        "lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0",
        "lstm_1.weight_ih_l0", "lstm_1.weight_hh_l0", "lstm_1.bias_ih_l0",
        "time_distributed.dense.weight", "time_distributed.dense.bias", "head.weight", "head.bias"]
    assert model.lstm_1 is model.layers[1]
    with pytest.raises(ConfigError, match="named 'head'"):
        model.add(K.Dense(1, name="head"))


def test_config_round_trip_rebuilds_the_architecture():
    model = Sequential([K.Masking(input_shape=(None, 2)), K.Bidirectional(K.GRU(3, return_sequences=True), "sum"),
                        K.TimeDistributed(K.Dense(2, activation="relu"))], dtype="float64", seed=0)
    again = Sequential.from_config(model.get_config(), seed=1)
    assert again.get_config() == model.get_config()
    assert list(again.state_dict()) == list(model.state_dict())
    assert again.output_shape == model.output_shape == (None, None, 2)


def test_keras2_shape_spellings_build_at_once():
    bi = Sequential([K.Bidirectional(K.LSTM(4, input_shape=(6, 3))), K.Dense(1)])
    assert bi.built and bi.input_shape == (None, 6, 3) and bi.output_shape == (None, 1)
    emb = Sequential([K.Embedding(10, 4, input_length=7), K.GRU(2)])
    assert emb.built and emb.input_shape == (None, 7)
    with pytest.raises(ShapeError, match="built for inputs"):
        bi.build((None, 6, 5))
    assert bi.input_shape == (None, 6, 3)
    with pytest.raises(ConfigError, match="give input_shape to TimeDistributed"):
        K.TimeDistributed(K.Dense(2, input_shape=(3,)))


def test_binary_accuracy_and_move_between_backends():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 4, 2))
    y = (x[:, -1, :1] > 0).astype(np.float64)
    model = Sequential([K.Input((4, 2)), K.SimpleRNN(4), K.Dense(1, activation="sigmoid")], dtype="float64", seed=1)
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["acc"])
    model.fit(x, y, epochs=2, batch_size=10, verbose=0)
    loss, acc = model.evaluate(x, y)
    assert acc == pytest.approx(np.mean((to_np(model.predict(x)) > 0.5) == (y > 0.5)))
    dev = xrnn.resolve_device("array_api_strict:device1")
    model.to(dev)  # parameters, optimizer state (at its next step) and layers follow
    h = model.fit(x, y, epochs=1, batch_size=10, verbose=0)
    assert_on(dev, *model.parameters().values(), *model.grads.values())
    assert math.isfinite(h["loss"][0])
    assert model.evaluate(x, y)[0] == pytest.approx(h["loss"][0], rel=0.5)


# ---------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------

def _trained(dev="cpu"):
    model = Sequential([K.Input((T, F_IN)), K.LSTM(4, return_sequences=True), K.Dropout(0.2), K.GRU(3),
                        K.Dense(1)], device=dev, dtype="float64", seed=3)
    model.compile(optimizer="adam", loss="mse", learning_rate=0.02, clipnorm=1.0)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((20, T, F_IN)), rng.standard_normal((20, 1))
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    return model, x, y


def test_checkpoint_state_round_trip_resumes_exactly(light_device):
    model, x, y = _trained()
    meta, tensors = model.checkpoint_state()
    import json

    meta = json.loads(json.dumps(meta))  # the meta must survive JSON
    assert all(isinstance(v, np.ndarray) for v in tensors.values())
    loaded = Sequential.from_checkpoint(meta, tensors, device=light_device)
    assert_on(light_device, *loaded.parameters().values())
    np.testing.assert_allclose(to_np(loaded.predict(x)), to_np(model.predict(x)), rtol=1e-13)
    assert loaded.optimizer.steps == model.optimizer.steps == 3
    assert loaded.optimizer.lr == 0.02 and loaded._compiled["clipnorm"] == 1.0
    # the generator state travels too: the next epoch (shuffles, dropout, Adam moments) is identical
    h1 = model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    h2 = loaded.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert h2["loss"][0] == pytest.approx(h1["loss"][0], rel=1e-12)
    for k, v in model.parameters().items():
        np.testing.assert_allclose(to_np(loaded.parameters()[k]), to_np(v), rtol=1e-11, err_msg=k)


def test_checkpoint_file_round_trip(tmp_path, light_device):
    from xrnn import checkpoint
    from xrnn.errors import CheckpointKindError
    from xrnn.sequential import load_model

    model, x, y = _trained()
    path = tmp_path / "model.xrnn"
    model.save(path)
    assert checkpoint.peek(path).kind == "xrnn.Sequential"
    for loaded in (checkpoint.load(path, device=light_device), load_model(path, device=light_device)):
        assert isinstance(loaded, Sequential) and loaded.device == light_device
        np.testing.assert_allclose(to_np(loaded.predict(x)), model.predict(x), rtol=1e-13)
        assert loaded.optimizer.steps == 3
        assert loaded.evaluate(x, y) == pytest.approx(model.evaluate(x, y), rel=1e-12)
    lm = xrnn.models.CharLM(5, 4, num_layers=1, seed=0)
    checkpoint.save(lm, tmp_path / "lm.xrnn")
    with pytest.raises(CheckpointKindError, match="xrnn.Sequential"):
        load_model(tmp_path / "lm.xrnn")


def test_unbuilt_compiled_model_saves_its_settings(tmp_path):
    model = Sequential([K.LSTM(3), K.Dense(1)], seed=0)
    model.compile(optimizer="rmsprop", loss="mae", learning_rate=0.5)
    model.save(tmp_path / "m.xrnn")
    from xrnn.sequential import load_model

    loaded = load_model(tmp_path / "m.xrnn")
    assert not loaded.built and loaded.get_config() == model.get_config()
    x, y = np.ones((4, 3, 2), np.float32), np.zeros((4, 1), np.float32)
    loaded.fit(x, y, verbose=0)
    # compile("rmsprop") is Keras' RMSprop (defaults and rule), also after a reload
    assert isinstance(loaded.optimizer, KerasRMSprop) and loaded.optimizer.lr == 0.5 and loaded.optimizer.rho == 0.9


# ---------------------------------------------------------------------------
# misuse
# ---------------------------------------------------------------------------

def test_errors():
    model = Sequential([K.LSTM(3), K.Dense(1)])
    x = np.zeros((4, T, F_IN), np.float32)
    with pytest.raises(StateError, match="no weights yet"):
        model.predict(x)
    with pytest.raises(StateError, match="no weights yet"):
        model.summary()
    with pytest.raises(StateError, match="compile"):
        model.fit(x, np.zeros((4, 1)))
    with pytest.raises(ConfigError, match="unknown loss 'hinge'"):
        model.compile(loss="hinge")
    with pytest.raises(ConfigError, match="unknown optimizer 'adamax'"):
        model.compile(optimizer="adamax")
    with pytest.raises(ConfigError, match="unknown metric"):
        model.compile(metrics=["f1"])
    with pytest.raises(ConfigError, match="loss 'cross_entropy' needs the last layer"):
        Sequential([K.LSTM(3)]).compile(loss="cross_entropy")
    with pytest.raises(ConfigError, match="loss 'binary_cross_entropy' needs the last layer"):
        Sequential([K.LSTM(3), K.Dense(2, activation="softmax")]).compile(loss="bce")
    with pytest.raises(ConfigError, match="only the last layer may return states"):
        Sequential([K.LSTM(3, return_state=True), K.Dense(1)])
    with pytest.raises(ConfigError, match="Masking must be the first layer"):
        Sequential([K.Dense(2), K.Masking()])
    with pytest.raises(ConfigError, match="Input"):
        Sequential([K.Dense(2), K.Input((3,))])
    model.compile(loss="mse")
    with pytest.raises(ShapeError, match="add a feature axis"):
        model.fit(np.zeros((4, T)), np.zeros((4, 1)))
    with pytest.raises(ShapeError, match=r"targets have shape \(4, 2\) but the model's outputs have shape \(4, 1\)"):
        model.fit(x, np.zeros((4, 2)), verbose=0)
    with pytest.raises(ShapeError, match="x has 4 samples but y has 3"):
        model.fit(x, np.zeros((3, 1)))
    with pytest.raises(ConfigError, match="validation_split"):
        model.fit(x, np.zeros((4, 1)), validation_split=1.5)
    with pytest.raises(ConfigError, match="batch_size"):
        model.predict(x, batch_size=0)
    with pytest.raises(NonFiniteError, match="epoch 1"):
        model.fit(np.full((4, T, F_IN), np.nan), np.zeros((4, 1)), verbose=0)
    emb = Sequential([K.Embedding(5, 2), K.LSTM(2), K.Dense(1)])
    emb.compile(loss="mse")
    with pytest.raises(DTypeError, match="integer token ids"):
        emb.fit(np.zeros((2, 3)), np.zeros((2, 1)))
    other = Sequential([K.Input((T, F_IN)), K.Dense(1)])
    with pytest.raises(ConfigError, match="another model"):
        model.compile(optimizer=optim.Adam(other))


def test_compile_with_an_optimizer_object_trains_as_the_named_one():
    """compile(optimizer=KerasAdam(model, lr=...)) uses that object: same steps as
    compile("adam", learning_rate=...)."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((32, T, F_IN))
    y = x[:, -1, :1] - 0.5 * x[:, 0, 1:]  # (32, 1), learnable
    runs = {}
    for how in ("object", "name"):
        model = Sequential([K.Input((T, F_IN)), K.LSTM(6), K.Dense(1)], dtype="float64", seed=4)
        if how == "object":
            opt = KerasAdam(model, lr=0.02)
            model.compile(optimizer=opt, loss="mse")
            assert model.optimizer is opt
        else:
            model.compile(optimizer="adam", loss="mse", learning_rate=0.02)
        before = model.evaluate(x, y)
        h = model.fit(x, y, epochs=15, batch_size=8, shuffle=False, verbose=0)
        runs[how] = (before, h["loss"], model)
    before, losses, model = runs["object"]
    assert model.optimizer.steps == 15 * 4
    assert model.evaluate(x, y) < 0.5 * before and losses[-1] < losses[0]
    np.testing.assert_allclose(losses, runs["name"][1], rtol=1e-12)
    for k, v in model.state_dict().items():
        np.testing.assert_allclose(to_np(v), to_np(runs["name"][2].state_dict()[k]), rtol=1e-12, err_msg=k)


def test_optimizer_on_an_unbuilt_sequential_says_how_to_build_it():
    model = Sequential([K.LSTM(4), K.Dense(1)])  # no Input / input_shape: no weights yet
    with pytest.raises(ConfigError) as e:
        optim.Adam(model, lr=0.01)
    msg = str(e.value)
    assert "no parameters to optimize" in msg and "not built yet" in msg
    for way in ("model.build((None, timesteps, features))", "Input(shape=(timesteps, features))", "input_shape=",
                "compile(optimizer='adam'"):
        assert way in msg, way
    with pytest.raises(ConfigError, match="no layers yet"):
        optim.SGD(Sequential())
    # each way out works
    model.compile(optimizer="adam", loss="mse", learning_rate=0.01)  # built (and optimizer made) by fit
    model.fit(np.zeros((2, T, F_IN)), np.zeros((2, 1)), verbose=0)
    assert model.built and model.optimizer.steps == 1
    other = Sequential([K.LSTM(4), K.Dense(1)]).build((None, T, F_IN))
    assert optim.Adam(other, lr=0.01).model is other


# ---------------------------------------------------------------------------
# no host synchronisation per batch
# ---------------------------------------------------------------------------

def test_fit_reads_the_loss_once_per_epoch(monkeypatch):
    """On array-api-strict arrays that refuse every device->host conversion except a counted
    float(): a masked model trains and validates with one float() per epoch and per validation."""
    xs = pytest.importorskip("array_api_strict")
    calls = []

    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation inside fit")

    real_float = xs._array_object.Array.__float__

    def counted_float(self):
        calls.append(1)
        return real_float(self)

    dev = xrnn.resolve_device("array_api_strict:device1")
    model = Sequential([K.Masking(input_shape=(T, F_IN)), K.Bidirectional(K.GRU(3, return_sequences=True)),
                        K.Dropout(0.2), K.TimeDistributed(K.Dense(2))], device=dev, dtype="float64", seed=0)
    model.compile(optimizer="adam", loss="mse", clipnorm=1.0, clipvalue=2.0)
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1.0, (14, T, F_IN))
    x[np.arange(T)[None, :] >= rng.integers(1, T + 1, 14)[:, None]] = 0.0
    y = rng.standard_normal((14, T, 2))
    for name in ("__bool__", "__int__", "__index__", "__complex__", "__array__", "__dlpack__"):
        monkeypatch.setattr(xs._array_object.Array, name, refuse, raising=False)
    monkeypatch.setattr(xs._array_object.Array, "__float__", counted_float)
    h = model.fit(x, y, epochs=3, batch_size=4, validation_split=0.25, verbose=0)
    assert len(calls) == 3 * 2  # per epoch: the training loss, the validation loss
    assert all(math.isfinite(v) for v in h["loss"] + h["val_loss"])


def test_rejected_add_and_compile_leave_the_model_unchanged():
    model = Sequential([K.Input((T, F_IN)), K.LSTM(3), K.Dense(2)], seed=0)
    model.compile(loss="mse")
    with pytest.raises(ShapeError):
        model.add(K.LSTM(2))  # a recurrent layer after a (batch, features) output
    assert [l.name for l in model.layers] == ["lstm", "dense"] and "lstm_1" not in model._children
    before = model.optimizer
    with pytest.raises(ConfigError, match="cross_entropy"):
        model.add(K.Dense(2, activation="tanh"))
        model.compile(loss="cross_entropy")
    assert model.optimizer is before and model._compiled["loss"] == "mse"



def test_class_id_targets_are_range_checked_once_on_the_host(monkeypatch):
    """cross_entropy with out-of-range class ids is refused before any update (one_hot of such an id
    is all zeros: a silently wrong loss); NumPy targets are checked on the host, so the loss never
    reads ids back from the device; padded steps of masked batches may hold anything."""
    import xrnn.backend as B

    T, V = 4, 3
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, T, 2)).astype(np.float32)
    x[0, 2:, :] = 0.0  # sample 0 has 2 valid steps
    y = rng.integers(0, V, (6, T))

    def model():
        m = Sequential([K.Masking(input_shape=(T, 2)), K.LSTM(4, return_sequences=True), K.Dense(V)], seed=0)
        m.compile(optimizer="adam", loss="cross_entropy")
        return m

    device_reads = []
    real = B.check_id_range
    monkeypatch.setattr(B, "check_id_range",
                        lambda *a, **k: (device_reads.append(B.ids_trusted()), real(*a, **k))[1])
    m = model()
    before = {k: np.array(v) for k, v in m.state_dict().items()}
    bad = y.copy()
    bad[1, 1] = V  # in the first batch
    with pytest.raises(ShapeError, match=rf"targets contains {V}, outside the class range \[0, {V}\)"):
        m.fit(x, bad, epochs=1, batch_size=3, shuffle=False, verbose=0)
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)  # refused before that batch's step
    padded = y.copy()
    padded[0, 2:] = -1  # padding the masked loss ignores
    m.fit(x, padded, epochs=1, batch_size=3, shuffle=False, verbose=0)
    m.evaluate(x, padded, batch_size=3)
    assert all(device_reads), "the loss read class ids back from the device though they were checked on the host"
    with pytest.raises(ShapeError, match="outside the class range"):  # targets already on the device: checked there
        m.evaluate(x, m.device.asarray(bad))
