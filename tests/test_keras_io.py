"""Keras 3 interoperability against real Keras (torch backend): weights both ways, ``.keras`` files read by
``xrnn.load_keras``, and ``compile`` by name training as Keras trains. Skipped without keras / h5py."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest

import xrnn
from xrnn import keras_optim as KO
from xrnn import layers as X
from xrnn.errors import ConfigError, ShapeError
from xrnn.sequential import Sequential

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # keras' own, on NumPy 2

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported (here or by another test module)


@pytest.fixture(scope="module")
def keras():
    try:  # not importorskip: keras without a usable torch backend raises ImportError, not ModuleNotFoundError
        import h5py  # noqa: F401
        import keras as k
    except ImportError as e:
        pytest.skip(f"keras and h5py are needed: {e}")
    if k.backend.backend() != "torch":
        pytest.skip(f"keras runs on {k.backend.backend()!r}; these tests need KERAS_BACKEND=torch")
    return k


def _np(a):
    return np.asarray(xrnn.to_numpy(a))


def _data(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _save_and_load(keras, km, tmp_path, x, name="m.keras", **kw):
    """Save km, load with xrnn, compare predict on x at every step (padded steps of masked inputs too)."""
    path = tmp_path / name
    km.save(path)
    xm = xrnn.load_keras(path, **kw)
    want = km.predict(x, verbose=0)
    got = _np(xm.predict(x))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    return xm


def _padded(shape, lengths, seed):
    """Float data (B, T, F), zero (Masking's mask_value) past each length; no valid step is all zero."""
    x = _data(shape, seed)
    x[np.arange(shape[1])[None, :] >= np.asarray(lengths)[:, None]] = 0.0
    return x


# ---------------------------------------------------------------------------
# .keras files
# ---------------------------------------------------------------------------

def test_lstm_and_stacked_lstm_files(keras, tmp_path):
    L = keras.layers
    keras.utils.set_random_seed(0)
    x = _data((5, 6, 3))
    km = keras.Sequential([keras.Input((6, 3)), L.LSTM(4), L.Dense(2)])
    xm = _save_and_load(keras, km, tmp_path, x, "lstm.keras")
    assert [type(l) for l in xm.layers] == [X.LSTM, X.Dense] and xm.num_parameters() == km.count_params()
    km = keras.Sequential([keras.Input((6, 3)), L.LSTM(4, return_sequences=True), L.LSTM(3, return_sequences=True),
                           L.LSTM(2), L.Dense(1)])
    xm = _save_and_load(keras, km, tmp_path, x, "stacked.keras")
    assert [l.name for l in xm.layers] == [l.name for l in km.layers]
    for a, b in zip(xm.get_weights(), km.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["concat", "sum", "ave", "mul"])
def test_bidirectional_files(keras, tmp_path, mode):
    L = keras.layers
    keras.utils.set_random_seed(1)
    x = _data((4, 5, 3), 1)
    km = keras.Sequential([keras.Input((5, 3)), L.Bidirectional(L.LSTM(3, return_sequences=True), merge_mode=mode),
                           L.Bidirectional(L.GRU(2), merge_mode=mode), L.Dense(1)])
    _save_and_load(keras, km, tmp_path, x, f"bi_{mode}.keras")


def test_gru_simple_rnn_dense_dropout_files(keras, tmp_path):
    L = keras.layers
    keras.utils.set_random_seed(2)
    x = _data((4, 5, 3), 2)
    km = keras.Sequential([keras.Input((5, 3)), L.GRU(4, return_sequences=True, dropout=0.2), L.Dropout(0.3),
                           L.SimpleRNN(3, activation="relu", return_sequences=True), L.SimpleRNN(3, go_backwards=True),
                           L.Dense(3, activation="tanh"), L.Dense(2, activation="sigmoid", use_bias=False)])
    xm = _save_and_load(keras, km, tmp_path, x, "mix.keras")
    assert xm.layers[0].dropout == 0.2 and xm.layers[1].rate == 0.3


def test_embedding_masking_time_distributed_files(keras, tmp_path):
    L = keras.layers
    keras.utils.set_random_seed(3)
    ids = np.random.default_rng(3).integers(1, 9, size=(4, 6))
    ids[1, 4:] = 0  # trailing padding
    ids[3, 2:] = 0
    km = keras.Sequential([keras.Input((6,), dtype="int32"), L.Embedding(9, 4, mask_zero=True), L.LSTM(3),
                           L.Dense(5, activation="softmax")])
    km.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    xm = _save_and_load(keras, km, tmp_path, ids, "emb.keras")
    assert isinstance(xm.optimizer, KO.KerasAdam) and xm._compiled["loss"] == "cross_entropy"
    assert xm._compiled["metrics"] == ["accuracy"]
    x = _padded((5, 6, 2), [3, 6, 5, 0, 1], 4)
    km = keras.Sequential([keras.Input((6, 2)), L.Masking(0.0), L.LSTM(3, return_sequences=True),
                           L.TimeDistributed(L.Dense(2))])
    y = km.predict(x, verbose=0)
    assert np.all(y[0, 3:] == y[0, 2]) and np.all(y[3] == y[3, 0])  # Keras repeats the last valid output
    _save_and_load(keras, km, tmp_path, x, "mask.keras")  # every step, padded ones too
    km = keras.Sequential([keras.Input((6, 2)), L.Masking(0.0), L.Bidirectional(L.GRU(3)), L.Dense(1)])
    _save_and_load(keras, km, tmp_path, x, "mask_bi.keras")


@pytest.mark.parametrize("zero_output", [False, True], ids=["keras_default", "zero_output_for_mask"])
def test_masked_sequences_files_every_step(keras, tmp_path, zero_output):
    """Padded steps after every kind of recurrent layer: repeated last outputs, zeros (Bidirectional,
    go_backwards, zero_output_for_mask), empty sequences; predict agrees at every step."""
    L = keras.layers
    keras.utils.set_random_seed(8)
    x = _padded((5, 6, 2), [4, 6, 1, 0, 2], 8)
    z = {"zero_output_for_mask": zero_output}
    km = keras.Sequential([keras.Input((6, 2)), L.Masking(0.0), L.GRU(3, return_sequences=True, **z),
                           L.Bidirectional(L.LSTM(2, return_sequences=True), merge_mode="sum"),
                           L.SimpleRNN(3, return_sequences=True, go_backwards=True, **z),
                           L.LSTM(3, return_sequences=True, **z), L.Dense(2)])
    xm = _save_and_load(keras, km, tmp_path, x, "seq.keras")
    assert xm.layers[1].zero_output_for_mask is zero_output
    km = keras.Sequential([keras.Input((6, 2)), L.Masking(0.0), L.LSTM(3, return_sequences=True),
                           L.GRU(2, **z)])  # the last output: zeros for padded rows with zero_output_for_mask
    _save_and_load(keras, km, tmp_path, x, "last.keras")


def test_compile_config_maps_optimizer_and_loss(keras, tmp_path):
    L = keras.layers
    km = keras.Sequential([keras.Input((3, 2)), L.LSTM(2), L.Dense(1)])
    km.compile(optimizer=keras.optimizers.RMSprop(learning_rate=0.01, rho=0.8, global_clipnorm=2.0), loss="mae")
    km.save(tmp_path / "c.keras")
    xm = Sequential.from_keras(tmp_path / "c.keras", device="torch:cpu")
    opt = xm.optimizer
    assert isinstance(opt, KO.KerasRMSprop) and opt.rho == pytest.approx(0.8) and opt.lr == pytest.approx(0.01)
    assert xm._compiled["loss"] == "mae" and xm._compiled["clipnorm"] == 2.0 and xm.device.name.startswith("torch")
    assert xrnn.load_keras(tmp_path / "c.keras", compile=False)._compiled is None
    xm.compile(optimizer=keras.optimizers.Adam(0.02, beta_2=0.99), loss="mse")  # a Keras optimizer object
    assert isinstance(xm.optimizer, KO.KerasAdam)
    assert (xm.optimizer.lr, xm.optimizer.beta_2) == pytest.approx((0.02, 0.99))
    km.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    km.save(tmp_path / "d.keras")
    xm = xrnn.load_keras(tmp_path / "d.keras")  # from_logits=True on a linear head: xrnn's cross_entropy
    assert xm._compiled["loss"] == "cross_entropy" and isinstance(xm.optimizer, KO.KerasAdam)


def test_compile_config_refuses_probabilities_read_as_logits(keras, tmp_path):
    L = keras.layers
    km = keras.Sequential([keras.Input((3, 2)), L.LSTM(2), L.Dense(3)])
    km.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")  # Keras: outputs are probabilities
    km.save(tmp_path / "p.keras")
    with pytest.raises(ConfigError, match="from_logits=False.*probabilities.*'linear'"):
        xrnn.load_keras(tmp_path / "p.keras")
    assert xrnn.load_keras(tmp_path / "p.keras", compile=False).built


def _refused(keras, tmp_path, km, match):
    km.save(tmp_path / "r.keras")
    with pytest.raises(ConfigError, match=match):
        xrnn.load_keras(tmp_path / "r.keras")


def test_unsupported_layers_and_options_are_refused_by_name(keras, tmp_path):
    L = keras.layers
    inp = (4, 2)
    cases = [
        ([L.LSTM(2, unroll=True)], r"LSTM 'lstm.*unroll=True"),
        ([L.GRU(2, recurrent_dropout=0.1)], r"GRU.*recurrent_dropout=0.1"),
        ([L.GRU(2, reset_after=False)], r"reset_after=False"),
        ([L.LSTM(2), L.Dense(1, activation="selu")], r"Dense.*unknown activation 'selu'"),
        ([L.LSTM(2, recurrent_activation="hard_sigmoid")], r"LSTM.*recurrent_activation='sigmoid'"),
        ([L.Conv1D(2, 2)], r"Keras layer 'Conv1D' is not supported"),
        ([L.LSTM(2, kernel_regularizer="l2")], r"kernel_regularizer.*not supported"),
        ([L.Bidirectional(L.LSTM(2), merge_mode=None)], r"merge_mode=None"),
    ]
    for layers, match in cases:
        _refused(keras, tmp_path, keras.Sequential([keras.Input(inp)] + layers), match)
    frozen = keras.Sequential([keras.Input(inp), L.LSTM(2)])
    frozen.layers[0].trainable = False
    _refused(keras, tmp_path, frozen, r"trainable=False")
    i = keras.Input(inp)
    _refused(keras, tmp_path, keras.Model(i, L.Dense(1)(L.LSTM(2)(i))), r"'Functional' model.*Sequential models only")


def test_bad_files_and_missing_h5py(keras, tmp_path, monkeypatch):
    (tmp_path / "not.keras").write_bytes(b"hello")
    with pytest.raises(ConfigError, match="not a .keras file"):
        xrnn.load_keras(tmp_path / "not.keras")
    with zipfile.ZipFile(tmp_path / "half.keras", "w") as z:
        z.writestr("config.json", json.dumps({"class_name": "Sequential"}))
    with pytest.raises(ConfigError, match="lacks model.weights.h5"):
        xrnn.load_keras(tmp_path / "half.keras")
    km = keras.Sequential([keras.Input((3, 2)), keras.layers.LSTM(2)])
    km.save(tmp_path / "w.keras")
    with zipfile.ZipFile(tmp_path / "w.keras") as z:
        cfg = json.loads(z.read("config.json"))
        h5 = z.read("model.weights.h5")
    cfg["config"]["layers"][1]["config"]["units"] = 3  # the config no longer matches the weights
    with zipfile.ZipFile(tmp_path / "bad.keras", "w") as z:
        z.writestr("config.json", json.dumps(cfg))
        z.writestr("model.weights.h5", h5)
    with pytest.raises(ShapeError, match=r"layer 'lstm\w*' \(LSTM\): kernel .* has shape \(2, 8\).*\(2, 12\)"):
        xrnn.load_keras(tmp_path / "bad.keras")
    import builtins

    real = builtins.__import__

    def no_h5py(name, *a, **k):
        if name == "h5py":
            raise ImportError("No module named 'h5py'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_h5py)
    with pytest.raises(ImportError, match=r'xrnn-array\[keras\]'):
        xrnn.load_keras(tmp_path / "w.keras")


# ---------------------------------------------------------------------------
# weights both ways
# ---------------------------------------------------------------------------

def test_weights_both_ways_every_layer(keras):
    L = keras.layers
    keras.utils.set_random_seed(5)
    km = keras.Sequential([keras.Input((5, 3)), L.LSTM(4, return_sequences=True),
                           L.Bidirectional(L.GRU(3, return_sequences=True)), L.SimpleRNN(2, return_sequences=True),
                           L.TimeDistributed(L.Dense(3)), L.GRU(2, use_bias=False), L.Dense(2, activation="softmax")])
    xm = Sequential([X.Input((5, 3)), X.LSTM(4, return_sequences=True),
                     X.Bidirectional(X.GRU(3, return_sequences=True)), X.SimpleRNN(2, return_sequences=True),
                     X.TimeDistributed(X.Dense(3)), X.GRU(2, use_bias=False), X.Dense(2, activation="softmax")],
                    seed=0)
    assert [w.shape for w in xm.get_weights()] == [w.shape for w in km.get_weights()]
    x = _data((3, 5, 3), 5)
    xm.set_weights(km.get_weights())  # Keras -> xrnn
    np.testing.assert_allclose(_np(xm.predict(x)), km.predict(x, verbose=0), atol=1e-6)
    for a, b in zip(xm.get_weights(), km.get_weights()):
        np.testing.assert_array_equal(a, b)
    xm2 = Sequential.from_config(xm.get_config(), seed=7)  # other weights
    km.set_weights(xm2.get_weights())  # xrnn -> Keras
    np.testing.assert_allclose(km.predict(x, verbose=0), _np(xm2.predict(x)), atol=1e-6)
    ids = np.array([[1, 2, 0], [3, 1, 2]])
    ke = keras.Sequential([keras.Input((3,), dtype="int32"), L.Embedding(4, 2)])
    xe = Sequential([X.Input((3,)), X.Embedding(4, 2)], seed=0)
    xe.set_weights(ke.get_weights())
    np.testing.assert_array_equal(_np(xe.predict(ids)), ke.predict(ids, verbose=0))


def test_weights_both_ways_masked_every_step(keras):
    """Keras <-> xrnn weights on a masked stack (Embedding(mask_zero=True)): predict agrees at every step."""
    L = keras.layers
    keras.utils.set_random_seed(9)
    km = keras.Sequential([keras.Input((5,), dtype="int32"), L.Embedding(7, 3, mask_zero=True),
                           L.LSTM(4, return_sequences=True), L.Bidirectional(L.GRU(3, return_sequences=True)),
                           L.SimpleRNN(2, return_sequences=True, go_backwards=True), L.GRU(3, return_sequences=True),
                           L.TimeDistributed(L.Dense(2))])
    xm = Sequential([X.Input((5,)), X.Embedding(7, 3, mask_zero=True), X.LSTM(4, return_sequences=True),
                     X.Bidirectional(X.GRU(3, return_sequences=True)),
                     X.SimpleRNN(2, return_sequences=True, go_backwards=True), X.GRU(3, return_sequences=True),
                     X.TimeDistributed(X.Dense(2))], seed=0)
    ids = np.random.default_rng(9).integers(1, 7, size=(5, 5))
    ids[np.arange(5)[None, :] >= np.array([5, 2, 0, 3, 1])[:, None]] = 0  # trailing padding; one empty row
    xm.set_weights(km.get_weights())  # Keras -> xrnn
    np.testing.assert_allclose(_np(xm.predict(ids)), km.predict(ids, verbose=0), atol=1e-5, rtol=1e-5)
    xm2 = Sequential.from_config(xm.get_config(), seed=7)  # xrnn -> Keras
    km.set_weights(xm2.get_weights())
    np.testing.assert_allclose(km.predict(ids, verbose=0), _np(xm2.predict(ids)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", ["LSTM", "GRU", "SimpleRNN"])
def test_masked_layer_outputs_and_states_match_keras(keras, cls):
    """One layer called with an explicit mask and initial state, every option that changes padded outputs:
    return_sequences, go_backwards, zero_output_for_mask; outputs and return_state states at every step
    (an empty row: zero outputs, its states the initial ones)."""
    lengths = np.array([4, 1, 0, 3])
    x = _data((4, 4, 2), 10)
    mask = np.arange(4)[None, :] < lengths[:, None]
    n = 2 if cls == "LSTM" else 1
    init = [_data((4, 3), 11 + i) for i in range(n)]
    keras.utils.set_random_seed(10)
    for rs in (True, False):
        for back in (False, True):
            for zero in (False, True):
                opts = {"return_sequences": rs, "go_backwards": back, "zero_output_for_mask": zero,
                        "return_state": True}
                kl = getattr(keras.layers, cls)(3, **opts)
                want = [keras.ops.convert_to_numpy(a) for a in kl(x, initial_state=init, mask=mask)]
                xl = getattr(X, cls)(3, **opts).build((4, 2))
                xl.set_weights(kl.get_weights())
                got = [_np(a) for a in xl(x, lengths=lengths, initial_state=init)]
                for g, w in zip(got, want):
                    np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5, err_msg=str(opts))


@pytest.mark.parametrize("layer", ["lstm", "bidirectional_gru"])
def test_masked_training_on_all_steps_as_keras(keras, layer):
    """SGD on a masked model with an mse loss on all steps (padded targets nonzero): Keras masks the loss at
    padded steps (mean over valid steps), as Sequential.fit does; after 3 batches the weights agree to float32
    rounding."""
    L = keras.layers
    keras.utils.set_random_seed(12)
    x = _padded((9, 5, 2), [5, 2, 3, 1, 4, 5, 2, 3, 1], 12)
    y = _data((9, 5, 2), 13)  # the padded steps' targets too: a loss there would change the gradients

    def stack(M):
        rec = (M.Bidirectional(M.GRU(3, return_sequences=True)) if layer.startswith("bi")
               else M.LSTM(3, return_sequences=True))
        return [M.Masking(0.0), M.LSTM(4, return_sequences=True), rec, M.Dense(2)]

    km = keras.Sequential([keras.Input((5, 2))] + stack(L))
    xm = Sequential([X.Input((5, 2))] + stack(X), seed=0)
    w0 = km.get_weights()
    xm.set_weights(w0)
    km.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    xm.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    km.fit(x, y, epochs=1, batch_size=3, shuffle=False, verbose=0)
    xm.fit(x, y, epochs=1, batch_size=3, shuffle=False, verbose=0)
    for a, b in zip(xm.get_weights(), km.get_weights()):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)
    assert max(np.abs(a - b).max() for a, b in zip(xm.get_weights(), w0)) > 1e-3  # it trained
    np.testing.assert_allclose(_np(xm.predict(x)), km.predict(x, verbose=0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["sgd", "rmsprop", "adagrad", "adam", "adamw"])
def test_compile_by_name_trains_as_keras(keras, name):
    """The same weights, data, batches and compile(optimizer=name, loss="mse"): after 2 epochs of 3 batches
    the weights agree to float32 rounding (torch's defaults and rules would not)."""
    L = keras.layers
    keras.utils.set_random_seed(6)
    x, y = _data((12, 4, 2), 6), _data((12, 1), 7)
    km = keras.Sequential([keras.Input((4, 2)), L.LSTM(3), L.Dense(1)])
    xm = Sequential([X.Input((4, 2)), X.LSTM(3), X.Dense(1)], seed=0)
    w0 = km.get_weights()
    xm.set_weights(w0)
    km.compile(optimizer=name, loss="mse")
    xm.compile(optimizer=name, loss="mse")
    km.fit(x, y, epochs=2, batch_size=4, shuffle=False, verbose=0)
    xm.fit(x, y, epochs=2, batch_size=4, shuffle=False, verbose=0)
    for a, b in zip(xm.get_weights(), km.get_weights()):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)
    assert max(np.abs(a - b).max() for a, b in zip(xm.get_weights(), w0)) > 1e-4  # it trained
