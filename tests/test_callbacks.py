"""Keras-style callbacks: each one's decisions compared with Keras 3's own callback driven by the
same scripted logs (when Keras is installed), and their effect inside Sequential.fit."""

import csv
import os
import types

import numpy as np
import pytest

import xrnn
from xrnn import callbacks as cb
from xrnn.errors import ConfigError
from xrnn.layers import LSTM, Dense, Input

os.environ.setdefault("KERAS_BACKEND", "torch")


def keras_callbacks():
    if os.environ.get("KERAS_BACKEND") != "torch":
        pytest.skip("keras is only imported with KERAS_BACKEND=torch here")
    keras = pytest.importorskip("keras")
    return keras.callbacks


class FakeModel:
    """What both libraries' callbacks touch: stop_training, the weights, the optimizer's rate.
    The "weights" are the epoch they were set at, so a restore shows which epoch it picked."""

    def __init__(self, lr=0.1):
        self.stop_training = False
        self.current = -1
        self.optimizer = types.SimpleNamespace(learning_rate=lr, lr=lr)

    # Keras
    def get_weights(self):
        return [np.array(self.current)]

    def set_weights(self, w):
        self.current = int(w[0])

    # xrnn
    def state_dict(self):
        return {"w": np.array(self.current)}

    def load_state_dict(self, sd):
        self.current = int(sd["w"])


def drive(callback, values, key="val_loss", lr_attr=None):
    """Run ``callback`` over scripted epochs; returns (epochs run, logs per epoch, model)."""
    model = FakeModel()
    callback.set_model(model)
    callback.on_train_begin()
    seen = []
    for epoch, v in enumerate(values):
        model.current = epoch
        callback.on_epoch_begin(epoch)
        logs = {"loss": 1.0, key: v}
        callback.on_epoch_end(epoch, logs)
        if lr_attr:  # the two libraries name the rate differently
            other = "lr" if lr_attr == "learning_rate" else "learning_rate"
            setattr(model.optimizer, other, getattr(model.optimizer, lr_attr))
        seen.append(dict(logs))
        if model.stop_training:
            break
    callback.on_train_end()
    return len(seen), seen, model


SCRIPTS = [
    [1.0, 0.9, 0.95, 0.97, 0.99, 0.98, 0.5, 0.4],
    [1.0, 1.0, 1.0, 1.0, 1.0],
    [3.0, 2.0, 1.99, 1.985, 1.5, 1.6, 1.7, 1.8, 1.9],
    [0.5, 0.6, 0.4, 0.45, 0.41, 0.39, 0.5, 0.6, 0.7, 0.8],
]
EARLY = [
    dict(),
    dict(patience=2),
    dict(patience=2, min_delta=0.02),
    dict(patience=1, restore_best_weights=True),
    dict(patience=3, restore_best_weights=True, start_from_epoch=2),
    dict(patience=2, baseline=0.45),
    dict(patience=2, baseline=0.45, restore_best_weights=True),
]


@pytest.mark.parametrize("opts", EARLY)
@pytest.mark.parametrize("values", SCRIPTS)
def test_early_stopping_stops_and_restores_as_keras(opts, values):
    kc = keras_callbacks()
    ours = cb.EarlyStopping(**opts)
    theirs = kc.EarlyStopping(**opts)
    n_ours, _, m_ours = drive(ours, values)
    n_theirs, _, m_theirs = drive(theirs, values)
    assert n_ours == n_theirs
    assert ours.stopped_epoch == theirs.stopped_epoch
    assert (ours.best, ours.best_epoch, ours.wait) == (theirs.best, theirs.best_epoch, theirs.wait)
    assert m_ours.current == m_theirs.current  # the weights of the same epoch were restored (or kept)


@pytest.mark.parametrize("values,mode", [([0.1, 0.5, 0.4, 0.45, 0.5, 0.3], "max"), ([0.1, 0.5, 0.4, 0.45], "auto")])
def test_early_stopping_on_an_accuracy_maximises_it(values, mode):
    kc = keras_callbacks()
    ours, theirs = cb.EarlyStopping("val_accuracy", patience=1, mode="max"), kc.EarlyStopping(
        "val_accuracy", patience=1, mode="max")
    if mode == "auto":
        ours = cb.EarlyStopping("val_accuracy", patience=1)  # auto: an accuracy goes up
    assert drive(ours, values, "val_accuracy")[0] == drive(theirs, values, "val_accuracy")[0]
    assert ours.stopped_epoch == theirs.stopped_epoch == 2 and ours.best == theirs.best == 0.5


@pytest.mark.parametrize("opts", [
    dict(patience=1, factor=0.5),
    dict(patience=2, factor=0.1, min_lr=0.0005),
    dict(patience=1, factor=0.5, cooldown=2),
    dict(patience=1, factor=0.5, min_delta=0.05),
    dict(patience=0, factor=0.2, min_lr=0.01),
])
@pytest.mark.parametrize("values", SCRIPTS)
def test_reduce_lr_on_plateau_gives_keras_rate_sequence(opts, values):
    kc = keras_callbacks()
    _, logs_ours, m_ours = drive(cb.ReduceLROnPlateau(**opts), values, lr_attr="lr")
    _, logs_theirs, m_theirs = drive(kc.ReduceLROnPlateau(**opts), values, lr_attr="learning_rate")
    ours = [d["learning_rate"] for d in logs_ours]
    theirs = [d["learning_rate"] for d in logs_theirs]
    np.testing.assert_allclose(ours, theirs, rtol=1e-7)
    np.testing.assert_allclose(m_ours.optimizer.lr, m_theirs.optimizer.learning_rate, rtol=1e-7)
    assert ours[0] == 0.1


def test_reduce_lr_on_plateau_refuses_a_growing_factor():
    with pytest.raises(ConfigError, match="factor >= 1.0"):
        cb.ReduceLROnPlateau(factor=2.0)


@pytest.mark.parametrize("with_val", [True, False])
def test_csv_logger_writes_what_keras_writes(tmp_path, with_val):
    kc = keras_callbacks()
    epochs = [{"loss": 1.5, "mae": 0.5, **({"val_loss": 1.75, "val_mae": 0.25} if with_val else {})},
              {"loss": 1.25, "mae": float("nan"), **({"val_loss": 1.5, "val_mae": 0.2} if with_val else {})}]
    files = {}
    for name, cls in (("ours", cb.CSVLogger), ("keras", kc.CSVLogger)):
        path = tmp_path / f"{name}.csv"
        for append in (False, True):  # a second fit appends rows under the same header
            c = cls(str(path), separator=";", append=append)
            c.set_model(FakeModel())
            c.on_train_begin()
            for e, logs in enumerate(epochs):
                c.on_epoch_end(e, dict(logs))
            c.on_train_end()
        files[name] = path.read_text()
    assert files["ours"] == files["keras"]
    rows = list(csv.reader(files["ours"].splitlines(), delimiter=";"))
    assert rows[0] == ["epoch", "loss", "mae", "val_loss", "val_mae"] and len(rows) == 5
    assert rows[2][2] == "nan" and (with_val or rows[1][3] == "NA")


# ---------------------------------------------------------------------------
# inside Sequential.fit
# ---------------------------------------------------------------------------

def _data(n=48, T=5):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, T, 1)).astype(np.float32)
    return X, X.sum(axis=1)


def _model(lr=0.01):
    m = xrnn.Sequential([Input(shape=(5, 1)), LSTM(4), Dense(1)], seed=0)
    m.compile(optimizer="adam", loss="mse", metrics=["mae"], learning_rate=lr)
    return m


class Recorder(cb.Callback):
    """The hooks fit calls, in order, and the weights at the end of every epoch."""

    def __init__(self):
        super().__init__()
        self.calls, self.weights, self.batch_losses = [], [], []

    def on_train_begin(self, logs=None):
        self.calls.append("train_begin")

    def on_epoch_begin(self, epoch, logs=None):
        self.calls.append(f"epoch_begin {epoch}")

    def on_train_batch_end(self, batch, logs=None):
        self.batch_losses.append((batch, logs["loss"]))

    def on_epoch_end(self, epoch, logs=None):
        self.calls.append(f"epoch_end {epoch} {sorted(logs)}")
        self.weights.append({k: np.array(xrnn.to_numpy(v)) for k, v in self.model.state_dict().items()})

    def on_train_end(self, logs=None):
        self.calls.append("train_end")


def test_fit_calls_the_hooks_in_keras_order_and_stops_when_asked():
    X, y = _data()
    rec = Recorder()

    class StopAfterTwo(cb.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                self.model.stop_training = True

    m = _model()
    h = m.fit(X, y, epochs=5, batch_size=16, validation_split=0.25, verbose=0, callbacks=[rec, StopAfterTwo()])
    keys = "['loss', 'mae', 'val_loss', 'val_mae']"
    assert rec.calls == ["train_begin", "epoch_begin 0", f"epoch_end 0 {keys}", "epoch_begin 1",
                         f"epoch_end 1 {keys}", "train_end"]
    assert h.epoch == [0, 1] and list(h.history) == ["loss", "mae", "val_loss", "val_mae"]
    assert rec.params == h.params == {"verbose": 0, "epochs": 5, "steps": 3} and rec.model is h.model is m
    assert [b for b, _ in rec.batch_losses] == [0, 1, 2, 0, 1, 2]  # 36 training samples in batches of 16
    # the running mean of the last batch is the epoch's loss
    np.testing.assert_allclose([rec.batch_losses[2][1], rec.batch_losses[5][1]], h.history["loss"], rtol=1e-6)


def test_early_stopping_in_fit_restores_the_best_epochs_weights():
    X, y = _data()
    rec = Recorder()
    stop = cb.EarlyStopping(monitor="val_loss", patience=2, min_delta=1e9, restore_best_weights=True)  # never improves
    m = _model()
    h = m.fit(X, y, epochs=10, batch_size=16, validation_split=0.25, verbose=0, callbacks=[rec, stop])
    assert stop.stopped_epoch == 2 and h.epoch == [0, 1, 2] and stop.best_epoch == 0
    for k, v in m.state_dict().items():  # back to the end of epoch 0, bit for bit
        np.testing.assert_array_equal(xrnn.to_numpy(v), rec.weights[0][k])
    assert any(not np.array_equal(rec.weights[0][k], rec.weights[2][k]) for k in rec.weights[0])  # it trained on


def test_reduce_lr_on_plateau_in_fit_sets_the_rate_and_history_has_keras_keys():
    X, y = _data()
    m = _model(lr=0.01)
    plateau = cb.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=1, min_delta=1e9)  # a plateau every epoch
    h = m.fit(X, y, epochs=4, batch_size=16, verbose=0, callbacks=[plateau])
    # epoch 0 sets the best; every later epoch is a plateau: the rate each epoch ran at, halved after it
    assert h.history["learning_rate"] == [0.01, 0.01, 0.005, 0.0025]
    assert m.optimizer.lr == 0.00125
    assert list(h.history) == ["loss", "mae", "learning_rate"]


def test_history_keys_are_keras_keys():
    kc = keras_callbacks()
    import keras

    X, y = _data(24)
    km = keras.Sequential([keras.Input(shape=(5, 1)), keras.layers.LSTM(4), keras.layers.Dense(1)])
    km.compile(optimizer="adam", loss="mse", metrics=["mae"])
    kh = km.fit(X, y, epochs=2, batch_size=8, validation_split=0.25, verbose=0,
                callbacks=[kc.ReduceLROnPlateau(patience=1)])
    h = _model().fit(X, y, epochs=2, batch_size=8, validation_split=0.25, verbose=0,
                     callbacks=[cb.ReduceLROnPlateau(patience=1)])
    assert sorted(h.history) == sorted(kh.history)
    assert h.epoch == kh.epoch


def test_model_checkpoint_formats_names_saves_best_only_and_weights_only(tmp_path):
    X, y = _data()
    rec = Recorder()
    best = cb.ModelCheckpoint(str(tmp_path / "best" / "m-{epoch:02d}-{val_loss:.4f}.ckpt"), save_best_only=True)
    every = cb.ModelCheckpoint(str(tmp_path / "w-{epoch}.ckpt"), save_weights_only=True, monitor="val_mae")
    m = _model(lr=0.05)
    h = m.fit(X, y, epochs=4, batch_size=16, validation_split=0.25, verbose=0, callbacks=[rec, best, every])
    vl = h.history["val_loss"]
    improved = [e for e in range(4) if vl[e] < min(vl[:e], default=np.inf)]
    expect = sorted(f"m-{e + 1:02d}-{vl[e]:.4f}.ckpt" for e in improved)
    assert sorted(os.listdir(tmp_path / "best")) == expect
    for e in improved:
        loaded = xrnn.load_model(tmp_path / "best" / f"m-{e + 1:02d}-{vl[e]:.4f}.ckpt")
        for k, v in loaded.state_dict().items():
            np.testing.assert_array_equal(xrnn.to_numpy(v), rec.weights[e][k])
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".ckpt")) == [f"w-{e}.ckpt" for e in (1, 2, 3, 4)]
    info = xrnn.peek(tmp_path / "w-4.ckpt")
    assert info.meta["compile"] is None and not any(k.startswith("optimizer/") for k in info.tensors)
    full = xrnn.peek(tmp_path / "best" / expect[-1])
    assert full.meta["compile"] is not None and any(k.startswith("optimizer/") for k in full.tensors)
    with pytest.raises(ConfigError, match="no log value 'acc'"):
        _model().fit(X, y, epochs=1, verbose=0, callbacks=[cb.ModelCheckpoint(str(tmp_path / "{acc}.ckpt"))])


def test_bad_callbacks_are_refused():
    X, y = _data(8)
    with pytest.raises(ConfigError, match="Callback instances"):
        _model().fit(X, y, epochs=1, verbose=0, callbacks=[print])
    with pytest.raises(ConfigError, match="pass mode='max'"):
        _model().fit(X, y, epochs=1, verbose=0, callbacks=[cb.EarlyStopping(monitor="f1")])
