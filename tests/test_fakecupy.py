"""CuPy's hazards caught without a GPU: the test tool ``tests/fakecupy.py`` and xrnn run on it.

First the tool itself (it must catch what it claims, or the tests that run
on it prove nothing), then xrnn on ``fakecupy:1``, its *second* device: any
operation xrnn runs outside ``with dev:`` runs under device 0 and fails, and
the host reads of a training step and of a sampled token are counted
exactly. Last, end-to-end runs on ``fakecupy:1`` and on a real GPU where
there is one (``cuda:0``), checked against NumPy.
"""

import numpy as np
import pytest

import xrnn
from xrnn.backend import device_of, resolve_device
from xrnn.models import CharLM

from conftest import _resolve, assert_on, to_np

fakecupy = pytest.importorskip("fakecupy")
fxp = fakecupy.xp
Device = fakecupy.Device


# ---------------------------------------------------------------------------
# the tool: what it must catch
# ---------------------------------------------------------------------------

def test_creation_ignores_device_and_uses_the_current_one():
    """As array_api_compat.cupy: zeros/ones/full/arange/..._like allocate on the current device whatever
    ``device=`` says; asarray honours ``device=`` (it enters the device)."""
    assert fakecupy.current() == 0
    a = fxp.zeros((2,), dtype=fxp.float32, device=Device(1))
    assert a.device == Device(0)
    with Device(1):
        assert fakecupy.current() == 1
        b = fxp.full((2,), 3.0, dtype=fxp.float32, device=Device(0))
        c = fxp.zeros_like(b)
        with Device(0):
            assert fakecupy.current() == 0
        assert fakecupy.current() == 1
    assert b.device == Device(1) and c.device == Device(1) and fakecupy.current() == 0
    d = fxp.asarray(np.ones(2), device=1)
    assert d.device == Device(1) and fxp.asarray(np.ones(2)).device == Device(0)
    with pytest.raises(TypeError):
        hash(Device(0))  # unhashable, as CuPy's devices


def test_operations_under_the_wrong_current_device_raise():
    with Device(1):
        a = fxp.asarray(np.arange(4.0))
    b = fxp.asarray(np.arange(4.0))  # device 0
    for op in (lambda: a + 1.0, lambda: -a, lambda: fxp.sum(a), lambda: fxp.exp(a), lambda: a @ a,
               lambda: a.__setitem__(0, 2.0), lambda: a[fxp.asarray(np.array([0, 1]), device=1)],
               lambda: fxp.astype(a, fxp.float32), lambda: fxp.stack([a, a])):
        with pytest.raises(fakecupy.WrongDeviceError, match="device 1 while device 0 is current"):
            op()
    with Device(1):
        with pytest.raises(fakecupy.WrongDeviceError):
            a + b  # mixing devices, even under one of them
        np.testing.assert_array_equal((a * 2.0).get(), np.arange(4.0) * 2)
    v = a[1:3]  # a view launches nothing: allowed anywhere, as on CuPy
    with Device(1):
        m = fxp.reshape(a, (2, 2))
    assert v.device == Device(1) and m.T.device == Device(1) and m[0, :].device == Device(1)


def test_host_reads_are_counted():
    reads = fakecupy.reads
    with Device(1):
        a = fxp.asarray(np.array([1.5, -2.0, 0.0]))
        s = fxp.sum(a)
        reads.clear()
        float(s), bool(s > 0), int(fxp.astype(s, fxp.int64)), np.asarray(a), a.get(), xrnn.to_numpy(a)
        assert reads.kinds() == ["__float__", "__bool__", "__int__", "__array__", "get", "get"]
        reads.clear()
        a[a > 0]  # boolean-mask indexing reads the count
        fxp.nonzero(a)
        fxp.unique_values(a)
        assert reads.kinds() == ["boolean mask index", "nonzero", "unique_values"]
        reads.clear()
        fxp.clip(a, -1.0, 1.0)  # array-api-compat's generic CuPy clip: a mask assignment per bound
        fxp.clip(a, max=1.0)
        fxp.sign(a)  # array-api-compat's CuPy sign: a NaN-mask assignment
        assert len(reads) == 4
        reads.clear()
        fxp.minimum(fxp.maximum(a, fxp.full((), -1.0, dtype=a.dtype)), fxp.ones_like(s))  # no read
        fxp.where(a > 0, a, 0.0), fxp.cumulative_sum(a), fxp.sort(a), fxp.argmax(a)
        assert reads == []


def test_xrnn_sees_a_library_with_a_current_device():
    dev = resolve_device("fakecupy:1")
    assert dev.library == "fakecupy" and dev.has_current_device and dev.name == "fakecupy:1"
    assert resolve_device(dev.name) is dev and resolve_device(Device(1)) is dev
    assert dev._create_device() is None  # as CuPy: creation relies on `with dev:`
    x = dev.asarray(np.ones((2, 3)), dtype="float32")
    assert x.device == Device(1) and device_of(x) is dev and resolve_device(x) is dev
    with dev:
        assert fakecupy.current() == 1
    y = xrnn.to_device(x, "fakecupy:0")
    assert device_of(y).name == "fakecupy:0"
    np.testing.assert_array_equal(xrnn.to_numpy(y), np.ones((2, 3)))
    with pytest.raises(xrnn.errors.BackendUnavailableError, match="fakecupy has devices 0..1"):
        resolve_device("fakecupy:2")
    assert "fakecupy" not in " ".join(xrnn.available_devices())  # a test tool, never listed


def test_the_hook_registers_and_unregisters():
    fakecupy.unregister()
    try:
        with pytest.raises(xrnn.errors.DeviceError, match="unknown device"):
            resolve_device("fakecupy:1")
        with pytest.raises(xrnn.errors.DeviceError, match="not supported"):
            device_of(fxp.zeros((1,), dtype=fxp.float32))
    finally:
        fakecupy.register()
    assert resolve_device("fakecupy:1").has_current_device


# ---------------------------------------------------------------------------
# xrnn on fakecupy:1: host reads per training step and per sampled token
# ---------------------------------------------------------------------------

SHAKESPEARE = None


def _corpus(n=1500):
    global SHAKESPEARE
    from xrnn.data import Corpus, default_corpus_path

    if SHAKESPEARE is None:
        SHAKESPEARE = open(default_corpus_path(), encoding="utf-8").read()
    return Corpus.from_text(SHAKESPEARE[:n])


def _trainer(c, device, *, cell="lstm", embedding_dim=None, dropout=0.1, dtype="float32", seed=0, **kw):
    model = CharLM(len(c.vocab), 8, 2, cell=cell, embedding_dim=embedding_dim, dropout=dropout, dtype=dtype,
                   device=device, seed=seed, vocab=c.vocab)
    opts = dict(batch_size=3, seq_len=5, val_fraction=0.1, progress=False, seed=1, log_every=1000)
    opts.update(kw)
    return xrnn.Trainer(model, c, **opts)


STEP_CASES = [
    dict(cell="lstm", optimizer="adam", clip=1.0),
    dict(cell="gru", embedding_dim=6, optimizer="sgd", clip_value=0.5, clip=None),
    dict(cell="rnn", optimizer="rmsprop", clip=5.0, clip_value=1.0),
    dict(cell="lstm", embedding_dim=4, optimizer="adagrad"),
    dict(cell="gru", optimizer="adamw", dropout=0.0),
]


@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_a_training_step_reads_only_what_the_nan_guard_needs(host_reads, case):
    """A Trainer step on the device's second device: no operation under the wrong device, and exactly
    one host read (loss, gradient norm and the finite-update flag: 3 numbers) with check_finite; none without."""
    c = _corpus()
    for check_finite in (True, False):
        t = _trainer(c, "fakecupy:1", check_finite=check_finite, **case)
        t.train_step()  # the first step builds the optimizer state
        host_reads.clear()
        for _ in range(3):
            t.train_step()
        if check_finite:
            assert host_reads == [("get", 3)] * 3
        else:
            assert host_reads == []
            assert len(t.history["train_loss"]) == 4  # the deferred triples: read together ...
            assert host_reads == [("get", 12)]  # ... in one read of (4, 3): loss, norm, finite flag
        host_reads.clear()
        t.evaluate()
        assert len(host_reads) == 1  # validation: the summed loss, once


@pytest.mark.parametrize("opts", [dict(), dict(top_k=3), dict(top_p=0.8, temperature=0.7), dict(greedy=True)],
                         ids=["plain", "top_k", "top_p", "greedy"])
def test_sampling_reads_only_the_chosen_ids(host_reads, opts):
    c = _corpus()
    m = _trainer(c, "fakecupy:1").model
    B, n = 3, 6
    for prime, draws in (("Fir", n), ("", n - 1)):  # without a prime the first token is drawn on the host
        host_reads.clear()
        text = xrnn.sample(m, length=n, prime=prime, num_samples=B, seed=0, **opts)
        assert host_reads == [("get", B)] * draws  # the B chosen ids per token, nothing else
        assert all(len(s) == len(prime) + n for s in text)


def _sequential(device):
    from xrnn import layers as K

    model = xrnn.Sequential([K.Input((5, 2)), K.Masking(0.0), K.Bidirectional(K.LSTM(3, return_sequences=True)),
                             K.Dropout(0.2), K.GRU(4), K.Dense(3)], device=device, seed=0, dtype="float64")
    model.compile("adam", "cross_entropy", metrics=["accuracy"], clipnorm=1.0, clipvalue=0.5)
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1.0, (8, 5, 2))
    x[np.arange(5)[None, :] >= rng.integers(1, 6, 8)[:, None]] = 0.0  # right padding
    y = rng.integers(0, 3, 8)
    return model, x, y


SEQ_CASES = {
    "ids-embedding-mse-mae": lambda K: ([K.Input((4,)), K.Embedding(6, 3, mask_zero=True),
                                         K.SimpleRNN(3, return_sequences=True), K.TimeDistributed(K.Dense(2)),
                                         K.Dropout(0.3)], "mse", ["mae"]),
    "stateless-lstm-bce": lambda K: ([K.Input((4, 2)), K.LSTM(3), K.Dense(1)], "binary_cross_entropy",
                                     ["accuracy"]),
    "gru-mae": lambda K: ([K.Input((4, 2)), K.GRU(2, return_sequences=True), K.Dense(2)], "mae", []),
}


@pytest.mark.parametrize("case", sorted(SEQ_CASES))
def test_sequential_layers_and_losses_read_once_per_epoch(host_reads, case):
    from xrnn import layers as K

    stack, loss, metrics = SEQ_CASES[case](K)
    model = xrnn.Sequential(stack, device="fakecupy:1", seed=0, dtype="float32")
    model.compile("rmsprop", loss, metrics=metrics, clipvalue=1.0)
    rng = np.random.default_rng(1)
    if case.startswith("ids"):
        x = rng.integers(1, 6, (6, 4))
        x[0, 2:] = 0  # padding, masked
        y = rng.standard_normal((6, 4, 2))
    else:
        x = rng.standard_normal((6, 4, 2))
        y = rng.integers(0, 2, (6, 1)) if loss == "binary_cross_entropy" else rng.standard_normal((6, 4, 2))
    host_reads.clear()
    model.fit(x, y, epochs=3, batch_size=2, verbose=0)
    assert len(host_reads) == 3, host_reads  # loss (and metrics) once per epoch, nothing per batch
    host_reads.clear()
    model.evaluate(x, y, batch_size=2)
    assert len(host_reads) == 1


def test_sequential_steps_read_nothing_and_an_epoch_reads_once(host_reads):
    model, x, y = _sequential("fakecupy:1")
    h = model.fit(x, y, epochs=2, batch_size=3, validation_split=0.25, verbose=0)
    # per epoch: the training loss and accuracy in one read, the validation loss and accuracy in another
    assert host_reads.kinds() == ["get"] * 4 and [s for _, s in host_reads] == [2] * 4
    assert len(h["loss"]) == len(h["val_accuracy"]) == 2
    dev = model.device
    xb, yb = dev.asarray(x[:4]), dev.asarray(y[:4], dtype="int64")
    lengths = np.array([(np.abs(r).sum(-1) > 0).sum() for r in x[:4]])  # host lengths: nothing to read
    host_reads.clear()
    model.zero_grad()
    with xrnn.backend.trusted_ids():  # else the class ids' range check reads their min and max
        model.loss_and_gradients(xb, yb, lengths)
    model.optimizer.step()
    out = model.predict(x[:4])
    assert host_reads == []
    assert_on(dev, out)
    model.train_on_batch(x[:4], y[:4])
    assert host_reads.kinds() == ["__float__"]  # it returns a float


def test_an_oom_on_fakecupy_rolls_back_like_on_cupy(monkeypatch):
    """The step's out-of-memory handling does not depend on the library (a MemoryError mid-step)."""
    c = _corpus()
    t = _trainer(c, "fakecupy:1")
    t.train_step()
    before = {k: to_np(v).copy() for k, v in t.model.state_dict().items()}
    step = t.step

    def boom(*a, **k):
        raise MemoryError("out of memory")

    monkeypatch.setattr(t.optimizer, "step", boom)
    with pytest.raises(xrnn.errors.DeviceMemoryError, match="fakecupy:1"):
        t.train_step()
    assert t.step == step
    for k, v in t.model.state_dict().items():
        np.testing.assert_array_equal(to_np(v), before[k])


# ---------------------------------------------------------------------------
# end to end on a device with a current device: fakecupy:1 here, cuda:0 on a GPU
# ---------------------------------------------------------------------------

@pytest.fixture(params=["fakecupy:1", "cuda:0"])
def current_device(request):
    """A device of a library with a current device: the test namespace's second device, CuPy where present."""
    return _resolve(request.param)


def _weights(model):
    return {k: to_np(v).copy() for k, v in model.state_dict().items()}


def test_fit_checkpoint_device_cpu_device_and_resume(tmp_path, current_device):
    """Train on the device (validation, samples and saves included) as NumPy does; its checkpoint goes to
    the CPU and back with identical weights and samples; training resumes on the device from either copy."""
    dev = current_device
    c = _corpus(2500)
    kw = dict(out_dir=str(tmp_path / "dev"), eval_every=3, sample_every=3, save_every=3)
    t = _trainer(c, dev, **kw)
    ref = _trainer(c, "cpu", **dict(kw, out_dir=str(tmp_path / "cpu")))
    t.fit(6)
    ref.fit(6)
    np.testing.assert_allclose(t.train_losses, ref.train_losses, rtol=1e-4)
    for k, v in _weights(ref.model).items():
        np.testing.assert_allclose(_weights(t.model)[k], v, rtol=1e-3, atol=1e-5)
    text = t.model.sample(length=40, prime="First", seed=3)

    on_cpu = xrnn.load(tmp_path / "dev" / "last.ckpt", device="cpu")
    assert on_cpu.device.name == "cpu" and on_cpu.step == 6
    for k, v in _weights(t.model).items():
        np.testing.assert_array_equal(_weights(on_cpu.model)[k], v)
    on_cpu.save(tmp_path / "cpu.ckpt")
    back = xrnn.load(tmp_path / "cpu.ckpt", device=dev)
    assert back.device == dev
    assert_on(dev, *back.model.parameters().values())
    for k, v in _weights(t.model).items():
        np.testing.assert_array_equal(_weights(back.model)[k], v)
    assert back.model.sample(length=40, prime="First", seed=3) == text
    pieces = list(xrnn.generate(back.model, length=40, prime="First", seed=3))
    assert "".join(pieces) == text and len(pieces) == 41  # the prime, then one piece per token

    back.attach_corpus(c)
    t.fit(9)
    back.fit(9)
    np.testing.assert_allclose(back.train_losses, t.train_losses, rtol=1e-6)


def test_sequential_fit_predict_and_checkpoint_on_the_device(tmp_path, current_device):
    dev = current_device
    model, x, y = _sequential(dev)
    ref, _, _ = _sequential("cpu")
    h = model.fit(x, y, epochs=3, batch_size=4, verbose=0, shuffle=False)
    h_ref = ref.fit(x, y, epochs=3, batch_size=4, verbose=0, shuffle=False)
    np.testing.assert_allclose(h["loss"], h_ref["loss"], rtol=1e-6)
    out = model.predict(x)
    assert_on(dev, out)
    np.testing.assert_allclose(to_np(out), to_np(ref.predict(x)), rtol=1e-6, atol=1e-9)
    model.save(tmp_path / "s.ckpt")
    host = xrnn.load_model(tmp_path / "s.ckpt", device="cpu")
    host.save(tmp_path / "h.ckpt")
    again = xrnn.load_model(tmp_path / "h.ckpt", device=dev)
    assert again.device == dev
    np.testing.assert_array_equal(to_np(again.predict(x)), to_np(out))
