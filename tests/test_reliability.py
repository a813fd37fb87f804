"""Reliability: clear errors for every bad input, training that survives faults, no saved work lost.

One test (or table row) per promise of the reliability issue; promises that
other test files already prove are listed in ``COVERED_ELSEWHERE`` at the end.
"""

import contextlib
import errno
import importlib
import inspect
import os
import re
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import xrnn
import xrnn.errors as E
import xrnn.layers as K
from xrnn import checkpoint as ck
from xrnn.backend import OOM_HINT, assert_finite, is_out_of_memory, oom_guard
from xrnn.cli import main
from xrnn.data import Corpus, default_corpus_path
from xrnn.errors import (
    BackendUnavailableError,
    CheckpointCorruptError,
    CheckpointError,
    ConfigError,
    DataError,
    DeviceError,
    DeviceMemoryError,
    DTypeError,
    NonFiniteError,
    SaveError,
    ShapeError,
    VocabularyError,
    XRNNError,
)
from xrnn.models import CharLM
from xrnn.sampling import sample
from xrnn.sequential import Sequential
from xrnn.train import LAST, Trainer, load_model, train

from conftest import SLOW_CLI

T_MOD = importlib.import_module("xrnn.train")  # the module (xrnn.train may be the function)
M_MOD = importlib.import_module("xrnn.modules")
ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = open(default_corpus_path(), encoding="utf-8").read()
SMALL = ["--hidden-size", "8", "--num-layers", "1", "--batch-size", "4", "--seq-len", "8"]


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["PYTHONUNBUFFERED"] = "1"
    e.setdefault("OPENBLAS_NUM_THREADS", "1")
    return e


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("xrnn: error: "), err
    assert "Traceback" not in err
    return lines[0]


# fake out-of-memory errors of the GPU libraries, recognised by class name and module (never imported)
CupyOOM = type("OutOfMemoryError", (MemoryError,), {"__module__": "cupy.cuda.memory"})
TorchOOM = type("OutOfMemoryError", (RuntimeError,), {"__module__": "torch"})
CudaRuntimeError = type("CUDARuntimeError", (RuntimeError,), {"__module__": "cupy_backends.cuda.api.runtime"})


def numpy_oom():
    """A real NumPy out-of-memory error (numpy._core._exceptions._ArrayMemoryError)."""
    try:
        np.empty((2**45,), np.float32)  # 128 TiB: refused at once, nothing is touched
    except MemoryError as e:
        return e
    pytest.skip("this machine can allocate 128 TiB")


# ---------------------------------------------------------------------------
# the hierarchy
# ---------------------------------------------------------------------------

def _documented_tree():
    """``{class name: (built-in name or None, parent name)}`` from the tree in xrnn.errors' docstring."""
    out = {}
    stack = []  # (column of the name, name)
    for line in E.__doc__.splitlines():
        m = re.match(r"^(\s*(?:[│ ]*[├└]── )?)(\w+Error)(?: \((\w+)\))?(\s|$)", line)
        if not m or not (line.strip().startswith(("├", "└", "│")) or line.strip() == "XRNNError"):
            continue
        col = len(m.group(1))
        while stack and stack[-1][0] >= col:
            stack.pop()
        out[m.group(2)] = (m.group(3), stack[-1][1] if stack else None)
        stack.append((col, m.group(2)))
    return out


def test_every_error_is_an_xrnn_error_and_the_documented_builtin():
    import builtins

    tree = _documented_tree()
    classes = {n: getattr(E, n) for n in E.__all__}
    assert set(tree) == set(classes), "the docstring tree and __all__ disagree"
    defined = {n for n, v in vars(E).items() if isinstance(v, type) and issubclass(v, BaseException)}
    assert defined == set(classes), "every exception class is exported"
    assert tree["XRNNError"] == (None, None) and tree["VocabularyError"] == (None, "DataError")
    for name, cls in classes.items():
        builtin, parent = tree[name]
        assert issubclass(cls, XRNNError)
        if parent is not None:
            assert cls.__bases__[0] is classes[parent], name  # nested as drawn
        if builtin is not None:
            assert issubclass(cls, getattr(builtins, builtin)), name
        if name == "XRNNError":
            continue
        # instances are both the xrnn class and a built-in more specific than Exception
        specific = [b for b in cls.__mro__ if b.__module__ == "builtins" and b not in (Exception, BaseException,
                                                                                       object)]
        assert specific, name
        err = cls("message")
        assert isinstance(err, XRNNError) and isinstance(err, specific[0]) and str(err) == "message"
        with pytest.raises(specific[0]):
            raise cls("x")


def test_hierarchy_matches_the_issue():
    assert issubclass(E.ConfigError, ValueError) and issubclass(E.ShapeError, ValueError)
    assert issubclass(E.DTypeError, TypeError) and issubclass(E.StateError, RuntimeError)
    assert issubclass(E.BackendUnavailableError, RuntimeError) and issubclass(E.BackendUnavailableError, DeviceError)
    assert issubclass(E.CheckpointVersionError, CheckpointError) and issubclass(E.SaveError, OSError)
    assert issubclass(E.DeviceMemoryError, MemoryError) and issubclass(E.NonFiniteError, FloatingPointError)
    assert issubclass(E.VocabularyError, DataError)


# ---------------------------------------------------------------------------
# bad input, clear errors: what was expected and what came
# ---------------------------------------------------------------------------

f32 = np.float32


def _strict(a, dtype=None):
    pytest.importorskip("array_api_strict")
    return xrnn.to_device(np.asarray(a), "array_api_strict:device1", dtype=dtype)


def _torch(a):
    torch = pytest.importorskip("torch")
    return torch.as_tensor(np.asarray(a))


INPUT_ERRORS = [
    # shapes
    ("rank", lambda: xrnn.LSTM(3, 4)(np.ones(3, f32)), ShapeError, [r"3-D \(T, B, I\)", r"got shape \(3,\)"]),
    ("feature size", lambda: xrnn.GRU(3, 4)(np.ones((2, 2, 5), f32)), ShapeError, ["feature size 5", "input_size=3"]),
    ("state shape", lambda: xrnn.GRU(3, 4, num_layers=2)(np.ones((5, 2, 3), f32), np.zeros((1, 2, 4), f32)),
     ShapeError, [r"\(2, 2, 4\), got \(1, 2, 4\)"]),
    ("batch mismatch / batch_first", lambda: xrnn.LSTM(3, 4)(np.ones((8, 5, 3), f32), (np.zeros((1, 8, 4), f32),) * 2),
     ShapeError, ["batch size 8 differs from x's batch size 5", "batch_first=False"]),
    ("ids rank", lambda: CharLM(5, 3, 1, seed=0)(np.zeros(3, np.int64)), ShapeError, [r"\(B, T\)", r"ids\[None, :\]"]),
    ("keras rank", lambda: K.LSTM(2)(np.ones((4, 5), f32)), ShapeError, ["add a feature axis"]),
    # types and devices
    ("integer input", lambda: xrnn.RNN(3, 4)(np.ones((2, 1, 3), np.int64)), DTypeError, ["int64", "Embedding"]),
    ("complex input", lambda: xrnn.RNN(3, 4)(np.ones((2, 1, 3), np.complex64)), DTypeError, ["complex64"]),
    ("float ids", lambda: CharLM(5, 3, 1, seed=0)(np.zeros((2, 3), f32)), DTypeError, ["integer token ids"]),
    ("ids out of range", lambda: CharLM(5, 3, 1, seed=0)(np.array([[0, 5]])), ShapeError,
     [r"contains 5, outside the vocabulary range \[0, 5\)", "model.vocab.encode"]),
    ("embedding ids out of range", lambda: xrnn.Embedding(5, 2)(np.array([[-1]])), ShapeError, ["contains -1"]),
    ("another device", lambda: xrnn.LSTM(3, 4)(_strict(np.ones((2, 1, 3)), "float32")), DeviceError,
     ["array_api_strict:device1", "'cpu'", r"xrnn.to_device\(array, 'cpu'\)", r"model.to\("]),
    ("another library", lambda: xrnn.LSTM(3, 4)(_torch(np.ones((2, 1, 3), f32))), DeviceError,
     ["torch:cpu", "to_device"]),
    ("not an array", lambda: CharLM(5, 3, 1, seed=0)([[0, 1]]), DeviceError, ["list", "to_device"]),
    # values
    ("zero size", lambda: xrnn.LSTM(3, 0), ConfigError, ["hidden_size must be a positive integer, got 0"]),
    ("negative size", lambda: CharLM(5, hidden_size=-1), ConfigError, ["hidden_size", "-1"]),
    ("zero layers", lambda: xrnn.GRU(3, 4, num_layers=0), ConfigError, ["num_layers"]),
    ("dropout 1.5", lambda: CharLM(5, 4, dropout=1.5), ConfigError, [r"\[0, 1\)", "1.5"]),
    ("dropout 1", lambda: xrnn.LSTM(3, 4, 2, dropout=1.0), ConfigError, [r"\[0, 1\)"]),
    ("keras dropout", lambda: K.Dropout(-0.1), ConfigError, [r"\[0, 1\)"]),
    ("temperature 0", lambda: sample(CharLM(2, 3, vocab=_vocab2()), temperature=0), ConfigError,
     ["temperature", "> 0", "greedy"]),
    ("temperature -1", lambda: sample(CharLM(2, 3, vocab=_vocab2()), temperature=-1.0), ConfigError, ["temperature"]),
    ("top-p 1.5", lambda: sample(CharLM(2, 3, vocab=_vocab2()), top_p=1.5), ConfigError, [r"\(0, 1\]"]),
    ("top-p 0", lambda: sample(CharLM(2, 3, vocab=_vocab2()), top_p=0.0), ConfigError, [r"\(0, 1\]"]),
    ("top-k 0", lambda: sample(CharLM(2, 3, vocab=_vocab2()), top_k=0), ConfigError, ["top_k", ">= 1"]),
    ("unknown optimizer", lambda: Trainer(CharLM(2, 3), Corpus.from_text("ab" * 200), optimizer="adamax",
                                          progress=False), ConfigError, ["unknown optimizer 'adamax'", "adam"]),
    ("unknown optimizer (keras)", lambda: Sequential([K.Dense(1)]).compile(optimizer="adamax"), ConfigError,
     ["unknown optimizer 'adamax'"]),
    ("unknown cell", lambda: CharLM(5, cell="transformer"), ConfigError, ["'lstm'", "'transformer'"]),
    ("unknown nonlinearity", lambda: xrnn.RNN(3, 4, nonlinearity="sigmoid"), ConfigError, ["'tanh' or 'relu'"]),
    ("unknown device", lambda: CharLM(5, device="tpu"), DeviceError, ["unknown device 'tpu'", '"cuda"']),
]


def _vocab2():
    return Corpus.from_text("ab").vocab


@pytest.mark.parametrize("name, call, cls, fragments", INPUT_ERRORS, ids=[r[0] for r in INPUT_ERRORS])
def test_bad_input_gives_a_clear_error(name, call, cls, fragments):
    with pytest.raises(cls) as e:
        call()
    msg = str(e.value)
    for f in fragments:
        assert re.search(f, msg), f"{f!r} not in {msg!r}"


def test_cuda_without_cupy_names_the_fix():
    try:
        import cupy  # noqa: F401

        pytest.skip("CuPy is installed here")
    except Exception:
        pass
    with pytest.raises(BackendUnavailableError, match=r"pip install \"xrnn-array\[cuda12\]\""):
        CharLM(5, device="cuda")


# ---------------------------------------------------------------------------
# values: NaN/inf reported before they reach the weights
# ---------------------------------------------------------------------------

def _seq(device="cpu"):
    m = Sequential([K.Input((4, 2)), K.LSTM(3), K.Dense(1)], device=device, dtype="float64", seed=0)
    m.compile(optimizer="adam", loss="mse")
    return m


def _params(m):
    return {k: xrnn.to_numpy(v).copy() for k, v in m.parameters().items()}


@pytest.mark.parametrize("where", ["x", "y", "validation x"])
def test_fit_reports_nan_and_inf_in_the_data_before_any_update(where):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 4, 2)), rng.standard_normal((6, 1))
    xv, yv = x.copy(), y.copy()
    target = {"x": x, "y": y, "validation x": xv}[where]
    idx = (4, 1, 0) if target.ndim == 3 else (4, 0)
    target[idx] = np.nan
    target[(5,) + idx[1:]] = -np.inf
    m = _seq()
    before = _params(m)
    with pytest.raises(NonFiniteError) as e:
        m.fit(x, y, epochs=2, batch_size=2, verbose=0, validation_data=(xv, yv))
    msg = str(e.value)
    assert f"{where} holds 1 NaN and 1 infinite value(s)" in msg
    assert f"{where}[{', '.join(map(str, idx))}] = nan" in msg
    assert "before epoch 1" in msg and "check_finite=False" in msg
    assert m.optimizer.steps == 0
    for k, v in _params(m).items():
        np.testing.assert_array_equal(v, before[k])  # the weights never saw the bad value


def test_fit_checks_device_arrays_too():
    dev = "array_api_strict:device1"
    pytest.importorskip("array_api_strict")
    x = np.ones((4, 4, 2))
    x[2, 3, 1] = np.inf
    m = _seq(dev)
    with pytest.raises(NonFiniteError, match=r"x\[2, 3, 1\] = inf"):
        m.fit(xrnn.to_device(x, dev, "float64"), xrnn.to_device(np.zeros((4, 1)), dev, "float64"), verbose=0)
    assert m.optimizer.steps == 0


def test_without_the_check_a_nan_reaches_the_weights_and_the_epoch_loss_reports_it():
    x = np.ones((4, 4, 2))
    x[0, 0, 0] = np.nan
    m = _seq()
    with pytest.raises(NonFiniteError, match="epoch 1"):
        m.fit(x, np.zeros((4, 1)), verbose=0, check_finite=False)
    assert not all(np.isfinite(v).all() for v in _params(m).values())  # poisoned: why the check is on
    m2 = _seq()
    with pytest.raises(NonFiniteError, match=r"train_on_batch stopped before the step.*x\[0, 0, 0\]"):
        m2.train_on_batch(x, np.zeros((4, 1)))
    assert m2.optimizer.steps == 0


def test_check_finite_defaults():
    assert inspect.signature(Sequential.fit).parameters["check_finite"].default is True
    assert inspect.signature(Trainer.__init__).parameters["check_finite"].default is True
    # raw layer calls do not check (no host synchronisation): NaN in, NaN out
    out, _ = xrnn.LSTM(2, 3, seed=0)(np.full((2, 1, 2), np.nan, f32))
    assert np.isnan(out).all()


def test_assert_finite_counts_and_locates():
    assert_finite(np.arange(5))  # integers pass
    assert_finite(np.ones((2, 2)))
    a = np.zeros((3, 4))
    a[1, 2] = np.inf
    a[2, 0] = np.nan
    a[2, 1] = np.nan
    with pytest.raises(NonFiniteError, match=r"^a holds 2 NaN and 1 infinite value\(s\); the first is a\[1, 2\] = inf"
                                             r"; fix it$"):
        assert_finite(a, "a", "fix it")
    with pytest.raises(NonFiniteError, match="s holds 1 NaN"):
        assert_finite(np.float64("nan") * np.ones(()), "s")


# ---------------------------------------------------------------------------
# faults: out of memory
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("exc, expected", [
    (numpy_oom, True),
    (lambda: MemoryError(), True),
    (lambda: CupyOOM("Out of memory allocating 1,024 bytes"), True),
    (lambda: TorchOOM("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (lambda: CudaRuntimeError("cudaErrorMemoryAllocation: out of memory"), True),
    (lambda: RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried 9 bytes"), True),
    (lambda: CudaRuntimeError("cudaErrorIllegalAddress: an illegal memory access"), False),
    (lambda: RuntimeError("something else"), False),
    (lambda: ValueError("out of memory"), False),
    (lambda: DeviceMemoryError("already converted"), False),
    (lambda: E.DistributedError("rank 1: out of memory"), False),
])
def test_out_of_memory_errors_are_recognised_without_importing_gpu_libraries(exc, expected):
    assert is_out_of_memory(exc()) is expected


def test_oom_guard_converts_names_sizes_and_hints_and_chains():
    original = numpy_oom()
    with pytest.raises(DeviceMemoryError) as e:
        with oom_guard("cpu", "an experiment", lambda: "T=5, B=3"):
            raise original
    msg = str(e.value)
    assert msg.startswith("out of memory on cpu during an experiment (T=5, B=3)")
    assert "Unable to allocate 128. TiB" in msg and OOM_HINT in msg
    assert e.value.__cause__ is original and isinstance(e.value, MemoryError)
    with pytest.raises(KeyError):  # other errors pass unchanged
        with oom_guard("cpu", "x"):
            raise KeyError("k")
    with pytest.raises(DeviceMemoryError, match="during the outer operation"):  # the outermost guard names it
        with oom_guard("cpu", "the outer operation"):
            with oom_guard("cpu", "the inner operation"):
                raise CupyOOM("Out of memory allocating 8 bytes")


def test_oom_in_a_recurrent_layer_names_its_shapes(monkeypatch):
    m = xrnn.LSTM(3, 4, num_layers=2, seed=0)
    x = np.ones((7, 5, 3), f32)

    def explode(self, *a, **k):
        np.empty((2**45,), np.float32)

    monkeypatch.setattr(xrnn.LSTM, "_forward_tm", explode)
    with pytest.raises(DeviceMemoryError) as e:
        m(x)
    msg = str(e.value)
    assert "out of memory on cpu during the forward pass of LSTM" in msg
    assert "T=7 steps, B=5 sequences, hidden size 4, 2 layer(s), float32" in msg
    # what the forward keeps: per layer A (T,B,4H) + Y (T,B,H) + C (T,B,H) = 6H floats per token
    assert f"about {7 * 5 * 2 * 6 * 4 * 4 / 1024:.1f} KiB" in msg
    assert "--batch-size" in msg and "--seq-len" in msg
    monkeypatch.undo()
    out, _ = m(x)

    def explode_backward(self, *a, **k):
        raise CupyOOM("Out of memory allocating 1,048,576 bytes (allocated so far: 0 bytes).")

    monkeypatch.setattr(xrnn.LSTM, "_backward_tm", explode_backward)
    with pytest.raises(DeviceMemoryError, match=r"backward pass of LSTM.*Out of memory allocating 1,048,576 bytes"):
        m.backward(out)


def _make_trainer(c, dtype="float64", **kw):
    model = CharLM(len(c.vocab), 8, 1, dtype=dtype, seed=0, vocab=c.vocab)
    opts = dict(batch_size=4, seq_len=8, lr=1e-2, val_fraction=0.1, progress=False, seed=1, eval_every=None)
    opts.update(kw)
    return Trainer(model, c, **opts)


def test_oom_in_a_training_step_leaves_the_trainer_at_its_last_step(monkeypatch):
    c = Corpus.from_text(SHAKESPEARE[:1500])
    ref = _make_trainer(c)
    ref.fit(5)
    t = _make_trainer(c)
    t.fit(2)
    real = T_MOD.softmax_cross_entropy
    monkeypatch.setattr(T_MOD, "softmax_cross_entropy",
                        lambda *a: (_ for _ in ()).throw(CupyOOM("Out of memory allocating 4,096 bytes")))
    position, rng = t.batcher.state_dict(), t.model.rng.bit_generator.state
    with pytest.raises(DeviceMemoryError) as e:
        t.fit(5)
    msg = str(e.value)
    assert "out of memory on cpu during training step 3" in msg
    assert "batch_size=4 streams x seq_len=8 steps" in msg and "1-layer LSTM of hidden size 8" in msg
    assert "--batch-size" in msg
    assert t.step == 2 and t.batcher.state_dict() == position and t.model.rng.bit_generator.state == rng
    monkeypatch.setattr(T_MOD, "softmax_cross_entropy", real)
    t.fit(5)  # goes on as if nothing had happened
    assert t.train_losses == ref.train_losses
    for k, v in ref.model.state_dict().items():
        np.testing.assert_array_equal(xrnn.to_numpy(t.model.state_dict()[k]), xrnn.to_numpy(v))


def test_oom_while_sampling_and_validating(monkeypatch):
    c = Corpus.from_text(SHAKESPEARE[:1500])
    t = _make_trainer(c)
    m = t.model
    monkeypatch.setattr(m, "forward", lambda *a, **k: (_ for _ in ()).throw(TorchOOM("CUDA out of memory.")))
    with pytest.raises(DeviceMemoryError, match=r"during sampling \(the prime\) \(3 sequence\(s\) x 2 step\(s\)"
                                                r".*num_samples="):
        sample(m, length=5, prime="th", num_samples=3, seed=0)
    with pytest.raises(DeviceMemoryError, match="during validation.*per window"):
        t.evaluate()


def test_oom_while_loading_a_checkpoint_suggests_another_device(tmp_path, monkeypatch):
    c = Corpus.from_text(SHAKESPEARE[:500])
    p = tmp_path / "m.ckpt"
    xrnn.save(CharLM(len(c.vocab), 4, seed=0, vocab=c.vocab), p)
    monkeypatch.setattr(CharLM, "from_checkpoint",
                        classmethod(lambda *a, **k: (_ for _ in ()).throw(CupyOOM("Out of memory allocating 8 bytes"))))
    for load in (xrnn.load, load_model):
        with pytest.raises(DeviceMemoryError, match=r"loading .*m.ckpt.*\(\d+ tensors, .* KiB\).*device='cpu'"):
            load(p)


# ---------------------------------------------------------------------------
# the command line: every error is one line with exit status 2
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    f = {}
    tiny = d / "tiny.txt"
    tiny.write_text(SHAKESPEARE[:3000], encoding="utf-8")
    f["TINY"] = tiny
    f["MISSING"] = d / "missing.txt"
    (d / "empty.txt").write_bytes(b"")
    f["EMPTY"] = d / "empty.txt"
    (d / "binary.txt").write_bytes(b"ab\x00cd" * 50)
    f["BINARY"] = d / "binary.txt"
    (d / "latin1.txt").write_bytes("caf\u00e9 ".encode("latin-1") * 100)
    f["LATIN1"] = d / "latin1.txt"
    (d / "short.txt").write_text("hello\n" * 5)
    f["SHORT"] = d / "short.txt"
    run = d / "run"
    t = train(tiny, steps=2, hidden_size=8, num_layers=1, batch_size=4, seq_len=8, out_dir=run, progress=False,
              sample_every=0)
    f["CKPT"] = run / LAST
    data = (run / LAST).read_bytes()
    (d / "trunc.ckpt").write_bytes(data[: len(data) // 2])
    f["TRUNC"] = d / "trunc.ckpt"
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    (d / "tampered.ckpt").write_bytes(bytes(flipped))
    f["TAMPERED"] = d / "tampered.ckpt"
    newer = bytearray(data[:-32])
    newer[8:12] = (ck.FORMAT_VERSION + 1).to_bytes(4, "little")
    import hashlib

    (d / "newer.ckpt").write_bytes(bytes(newer) + hashlib.sha256(bytes(newer)).digest())
    f["NEWER"] = d / "newer.ckpt"
    seq = Sequential([K.Input((3, 1)), K.Dense(1)], seed=0)
    seq.save(d / "sequential.ckpt")
    f["WRONGKIND"] = d / "sequential.ckpt"
    charlm_run = d / "charlm_run"
    charlm_run.mkdir()
    xrnn.save(t.model, charlm_run / LAST)  # a model where a training run belongs
    f["CHARLM_RUN"] = charlm_run
    f["OUT"] = d / "out"
    return f


def _inject_oom(monkeypatch):
    monkeypatch.setattr(T_MOD, "softmax_cross_entropy",
                        lambda *a: (_ for _ in ()).throw(CupyOOM("Out of memory allocating 123,456 bytes")))


def _disk_full(monkeypatch):
    monkeypatch.setattr(ck.os, "replace", lambda s, d: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))


CLI_ERRORS = [
    # (id, argv, needle, setup)
    ("unknown device", ["train", "TINY", "--device", "tpu", "--out", "OUT"], "unknown device 'tpu'", None),
    ("cuda without CuPy", ["train", "TINY", "--device", "cuda", "--out", "OUT"], "needs CuPy", "nocupy"),
    ("zero size", ["train", "--hidden-size", "0"], "--hidden-size: expected a positive integer, got 0", None),
    ("negative batch", ["train", "--batch-size", "-3"], "--batch-size", None),
    ("dropout 1.5", ["train", "--dropout", "1.5"], "--dropout: expected a probability in [0, 1), got 1.5", None),
    ("temperature 0", ["sample", "CKPT", "--temperature", "0"], "--temperature: expected a temperature > 0", None),
    ("top-p 1.5", ["sample", "CKPT", "--top-p", "1.5"], "--top-p: expected a probability in (0, 1]", None),
    ("top-k 0", ["sample", "CKPT", "--top-k", "0"], "--top-k: expected a positive integer", None),
    ("unknown optimizer", ["train", "--optimizer", "adamax"], "invalid choice: 'adamax'", None),
    ("unknown model", ["train", "--model", "transformer"], "invalid choice: 'transformer'", None),
    ("missing corpus", ["train", "MISSING", "--out", "OUT"], "does not exist", None),
    ("empty corpus", ["train", "EMPTY", "--out", "OUT"], "is empty", None),
    ("binary corpus", ["train", "BINARY", "--out", "OUT"], "binary", None),
    ("non-UTF-8 corpus", ["train", "LATIN1", "--out", "OUT"], "UTF-8", None),
    ("corpus too short", ["train", "SHORT", "--out", "OUT"], "too few", None),
    ("truncated checkpoint", ["sample", "TRUNC"], "truncated", None),
    ("tampered checkpoint", ["info", "TAMPERED"], "checksum does not match", None),
    ("newer checkpoint", ["sample", "NEWER"], "newer xrnn", None),
    ("newer checkpoint (info)", ["info", "NEWER"], "upgrade xrnn", None),
    ("wrong-kind checkpoint", ["sample", "WRONGKIND"], "holds a 'xrnn.Sequential'", None),
    ("wrong-kind resume", ["train", "--resume", "--out", "CHARLM_RUN"], "not a training run", None),
    ("prime with unknown characters", ["sample", "CKPT", "--prime", "\u03a9\u20ac"], "\u03a9", None),
    ("missing checkpoint", ["sample", "MISSING"], "does not exist", None),
    ("out of memory", ["train", "TINY", *SMALL, "--steps", "3", "--out", "OUT", "--progress", "off"],
     "out of memory on cpu during training step 1", _inject_oom),
    ("disk full", ["train", "TINY", *SMALL, "--steps", "2", "--save-every", "0", "--val-fraction", "0",
                   "--sample-every", "0", "--out", "OUT", "--progress", "off"], "disk is full", _disk_full),
    ("diverging loss", ["train", "TINY", *SMALL, "--steps", "200", "--optimizer", "sgd", "--lr", "1e37",
                        "--clip", "0", "--out", "OUT", "--progress", "off", "--sample-every", "0",
                        "--eval-every", "0", "--dtype", "float32"], "training diverged at step", None),
]


@pytest.mark.parametrize("name, argv, needle, setup", CLI_ERRORS, ids=[r[0] for r in CLI_ERRORS])
def test_every_error_reaches_the_command_line_as_one_line(name, argv, needle, setup, files, capsys, monkeypatch,
                                                          tmp_path):
    if setup == "nocupy":
        if any(d.startswith("cuda") for d in xrnn.available_devices()):
            pytest.skip("a CUDA device is available here")
        try:
            import cupy  # noqa: F401

            needle = "CuPy is installed but"  # ... sees no CUDA GPU, and says why (driver, visibility)
        except Exception:
            pass
    elif setup is not None:
        setup(monkeypatch)
    args = [str(tmp_path / "out") if a == "OUT" else str(files[a]) if a in files else a for a in argv]
    assert main(args) == 2
    line = one_line_error(capsys.readouterr().err)
    assert needle in line, line


def test_debug_shows_the_traceback_of_an_injected_oom(files, monkeypatch, tmp_path):
    _inject_oom(monkeypatch)
    with pytest.raises(DeviceMemoryError) as e:
        main(["train", str(files["TINY"]), *SMALL, "--steps", "2", "--out", str(tmp_path / "o"), "--progress", "off",
              "--debug"])
    assert isinstance(e.value.__cause__, CupyOOM)


def test_raw_memory_errors_outside_the_guards_are_one_line(files, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(T_MOD, "read_corpus", lambda *a, **k: (_ for _ in ()).throw(numpy_oom()))
    assert main(["train", str(files["TINY"]), "--out", str(tmp_path / "o")]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "out of memory: Unable to allocate" in line and "--batch-size" in line


# ---------------------------------------------------------------------------
# faults: killed mid-save, stale temporary files, SIGTERM
# ---------------------------------------------------------------------------

_SAVER = """
import sys
import numpy as np
from xrnn import checkpoint as ck
path, n = sys.argv[1], int(sys.argv[2])
version = 0
while True:
    version += 1
    ck.write_container(path, "test", {"version": version}, {"w": np.full(n, float(version)), "v": np.arange(version)})
    if version == 1:
        print("saved", flush=True)
"""


def _tmp_leftovers(d, base):
    return [n for n in os.listdir(d) if n.startswith(f".{base}.") and n.endswith(".tmp")]


def test_sigkill_mid_save_leaves_a_complete_checkpoint(tmp_path):
    """A process saving over and over is killed with SIGKILL at random moments: the file always loads and is
    one of the complete versions; leftover temporary files are removed by the next save."""
    n = 1 << 20  # 8 MiB per save: most of the time is spent writing
    path = tmp_path / "run.ckpt"
    ck.write_container(path, "test", {"version": 0}, {"w": np.zeros(n), "v": np.arange(0)})
    rng = np.random.default_rng(0)
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path), str(n)], stdout=subprocess.PIPE,
                                text=True, env=env())
        try:
            assert proc.stdout.readline().strip() == "saved"
            time.sleep(float(rng.uniform(0.0, 0.4)))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            proc.stdout.close()
        c = ck.read_container(path)  # complete and verified (SHA-256), never partial
        v = c.meta["version"]
        assert v >= 1
        np.testing.assert_array_equal(c.tensors["w"], np.full(n, float(v)))
        np.testing.assert_array_equal(c.tensors["v"], np.arange(v))
    # temporary files of killed saves remain (the child spends nearly all its time writing, so at least one
    # kill landed mid-save: the loop above did test an interrupted write); once stale, the next save removes them
    leftovers = _tmp_leftovers(tmp_path, "run.ckpt")
    assert leftovers
    old = time.time() - 3600
    for name in leftovers:
        os.utime(tmp_path / name, (old, old))
    ck.write_container(path, "test", {"version": -1}, {"w": np.zeros(1)})
    assert _tmp_leftovers(tmp_path, "run.ckpt") == []


@pytest.mark.skipif(os.name != "posix", reason="stale temporary files are recognised by process id on POSIX")
def test_the_next_save_removes_only_stale_temporaries_of_dead_writers(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    old = time.time() - 3600
    names = {
        "stale": f".last.ckpt.{dead.pid}.0123456789ab.tmp",
        "fresh": f".last.ckpt.{dead.pid}.ba9876543210.tmp",  # its writer may be on another machine, still writing
        "alive": f".last.ckpt.{os.getppid()}.00000000000a.tmp",  # a live process's file
        "other": f".best.ckpt.{dead.pid}.0123456789ab.tmp",  # another target
        "user": "last.ckpt.0123456789ab.tmp",  # not our naming pattern
    }
    for key, name in names.items():
        (tmp_path / name).write_bytes(b"partial")
        if key != "fresh":
            os.utime(tmp_path / name, (old, old))
    ck.write_container(tmp_path / "last.ckpt", "test", {}, {})
    left = set(os.listdir(tmp_path))
    assert names["stale"] not in left
    assert {names[k] for k in ("fresh", "alive", "other", "user")} <= left
    assert ck.read_container(tmp_path / "last.ckpt").kind == "test"


def test_failed_saves_keep_the_previous_checkpoint_and_leave_no_temporaries(tmp_path, monkeypatch):
    path = tmp_path / "m.ckpt"
    ck.write_container(path, "test", {"v": 1}, {"w": np.ones(3)})

    class Failing:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    real = ck._open_for_write
    monkeypatch.setattr(ck, "_open_for_write", lambda p: (lambda t, f: (t, Failing(f)))(*real(p)))
    with pytest.raises(SaveError, match=r"disk is full \(ENOSPC\).*previous checkpoint there is untouched"):
        ck.write_container(path, "test", {"v": 2}, {"w": np.zeros(3)})
    assert ck.read_container(path).meta == {"v": 1}
    assert _tmp_leftovers(tmp_path, "m.ckpt") == []


def test_sigterm_during_cli_training_saves_exits_cleanly_and_resumes_exactly(tmp_path, files):
    args = ["train", str(files["TINY"]), *SMALL, "--steps", "40", "--eval-every", "20", "--sample-every", "0",
            "--save-every", "1000", "--log-every", "5", "--progress", "lines"]
    child = SLOW_CLI
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "-c", child, *args, "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env())
    try:
        deadline = time.time() + 60
        for line in proc.stdout:
            if line.startswith("step 10/40"):
                proc.send_signal(signal.SIGTERM)
                break
            assert time.time() < deadline
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "interrupted by SIGTERM" in err  # notices go to stderr
    assert "SIGTERM: stopping after the current step and saving" in err
    stopped = xrnn.load(out / LAST).step
    assert 10 <= stopped < 40
    assert main([*args, "--out", str(out), "--resume"]) == 0
    ref = tmp_path / "reference"
    assert main([*args, "--out", str(ref)]) == 0
    a, b = ck.read_container(out / LAST), ck.read_container(ref / LAST)
    assert a.meta["step"] == b.meta["step"] == 40
    for k in b.tensors:
        np.testing.assert_array_equal(a.tensors[k], b.tensors[k], err_msg=k)


# ---------------------------------------------------------------------------
# security: sizes declared in a checkpoint are checked before anything is allocated
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def _peak_allocation():
    tracemalloc.start()
    box = {}
    try:
        yield box
    finally:
        box["peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def test_a_forged_sequential_with_myriad_layers_is_refused_quickly(tmp_path):
    """A small checksum-valid file declaring 200,000 Dropout layers used to keep the loader busy for about
    20 minutes (building is quadratic in the layer count); the count is checked first."""
    m = Sequential([K.Input((3, 2)), K.LSTM(4), K.Dense(1)], seed=0)
    kind, (meta, tensors) = m.checkpoint_kind, m.checkpoint_state()
    drop = {"class_name": "Dropout", "config": {"rate": 0.1}}
    for count, words in ((4_200, "4,20[0-9] layers; at most 4,096"),  # the layer count is checked first
                         (200_000, "JSON values .* the header is forged")):  # too costly to parse at all
        meta["config"]["layers"] = meta["config"]["layers"][:3] + [drop] * count
        p = tmp_path / "forged.ckpt"
        ck.write_container(p, kind, meta, tensors)
        t0 = time.perf_counter()
        with pytest.raises(CheckpointError, match=words):
            xrnn.load(p)
        assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("what", ["charlm", "trainer", "sequential"])
def test_a_forged_config_cannot_make_xrnn_allocate_what_the_file_does_not_hold(tmp_path, what):
    """A checksum-valid file whose config declares a model of 4000 units (~400 MB of weights) but which holds a
    few kilobytes is refused before the weights are drawn."""
    c = Corpus.from_text(SHAKESPEARE[:500])
    if what == "sequential":
        m = Sequential([K.Input((3, 2)), K.LSTM(4), K.Dense(1)], seed=0)
        kind, (meta, tensors) = m.checkpoint_kind, m.checkpoint_state()
        meta["config"]["layers"][0]["config"]["units"] = 4000
    else:
        t = _make_trainer(c)
        obj = t if what == "trainer" else t.model
        kind, (meta, tensors) = obj.checkpoint_kind, obj.checkpoint_state()
        cfg = meta["model"]["config"] if what == "trainer" else meta["config"]
        cfg["hidden_size"] = 4000
    p = tmp_path / "forged.ckpt"
    ck.write_container(p, kind, meta, tensors)
    size = os.path.getsize(p)
    with _peak_allocation() as peak:
        with pytest.raises(CheckpointCorruptError, match="far more than the file's weights hold"):
            xrnn.load(p)
        if what != "sequential":
            with pytest.raises(CheckpointCorruptError, match="far more than"):
                load_model(p)
    assert peak["peak"] < 20 * size + (8 << 20)  # a small multiple of the file, not 400 MB


def test_a_planted_pickle_runs_nothing_through_any_entry_point(tmp_path, capsys):
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    p = tmp_path / "last.ckpt"
    p.write_bytes(pickle.dumps({"model": Payload()}))
    for call in (lambda: xrnn.load(p), lambda: load_model(p), lambda: ck.peek(p),
                 lambda: Trainer.resume(p), lambda: xrnn.sequential.load_model(p)):
        with pytest.raises(CheckpointCorruptError, match="pickle"):
            call()
    for cmd in ("info", "sample", "plot"):
        assert main([cmd, str(p)]) == 2
        assert "never unpickles" in one_line_error(capsys.readouterr().err)
    assert main(["train", "--resume", "--out", str(tmp_path)]) == 2
    assert "never unpickles" in one_line_error(capsys.readouterr().err)
    assert not marker.exists()


def test_vocabulary_errors_for_prime_text():
    c = Corpus.from_text("abc abc")
    m = CharLM(len(c.vocab), 4, seed=0, vocab=c.vocab)
    with pytest.raises(VocabularyError, match="'z'"):
        sample(m, prime="abz", length=2, seed=0)


# ---------------------------------------------------------------------------
# an update is committed only when the weights it makes are finite (issue 15, item 1)
# ---------------------------------------------------------------------------

def _run_state(t):
    """Copies of everything a step changes: weights, optimizer slots and step count, data position, RNG."""
    weights = {k: np.array(xrnn.to_numpy(v)) for k, v in t.model.parameters().items()}
    slots = {(p, s): np.array(xrnn.to_numpy(a)) for p, d in t.optimizer.state.items() for s, a in d.items()}
    return weights, slots, t.optimizer.steps, t.step, t.batcher.state_dict(), t.model.rng.bit_generator.state


def _assert_same_state(a, b):
    assert a[2:] == b[2:]
    assert a[0].keys() == b[0].keys() and a[1].keys() == b[1].keys()
    for k in a[0]:
        np.testing.assert_array_equal(a[0][k], b[0][k], err_msg=k)
    for k in a[1]:
        np.testing.assert_array_equal(a[1][k], b[1][k], err_msg=str(k))


@pytest.mark.parametrize("optimizer, kwargs", [("adam", {}), ("sgd", {"momentum": 0.9}), ("adagrad", {})])
def test_an_update_that_makes_the_weights_non_finite_is_undone_exactly(optimizer, kwargs):
    """Finite loss and gradients times a huge learning rate overflow the weights: the step is refused,
    everything is as before it, and the run then goes on exactly as one that never tried it."""
    c = Corpus.from_text(SHAKESPEARE[:1500])
    ref = _make_trainer(c, "float32", optimizer=optimizer, optimizer_kwargs=kwargs)
    ref.fit(4)
    t = _make_trainer(c, "float32", optimizer=optimizer, optimizer_kwargs=kwargs)
    t.fit(2)
    before = _run_state(t)
    good = t.schedule
    t.schedule = xrnn.optim.Constant(1e39)  # float32 weights overflow; loss and gradient norm stay finite
    with pytest.raises(NonFiniteError, match=r"training diverged at step 3: the loss \(.*\) and gradient norm "
                                             r"\(.*\) are finite but the update made the weights or the "
                                             r"optimizer state non-finite; the update was not applied"):
        t.train_step()
    _assert_same_state(_run_state(t), before)
    t.schedule = good
    t.fit(4)
    assert t.train_losses == ref.train_losses
    _assert_same_state(_run_state(t), _run_state(ref))


def test_the_finite_check_costs_one_host_read_per_step(monkeypatch):
    c = Corpus.from_text(SHAKESPEARE[:1500])
    t = _make_trainer(c)
    reads = []
    real = T_MOD.to_numpy
    monkeypatch.setattr(T_MOD, "to_numpy", lambda a: reads.append(a.shape) or real(a))
    for _ in range(3):
        t.train_step()
    assert reads == [(3,)] * 3  # loss, gradient norm and "the new weights are finite", together


def test_a_diverging_run_never_saves_non_finite_weights_eager_or_lazy(tmp_path):
    c = Corpus.from_text(SHAKESPEARE[:1500])
    for lazy in (False, True):
        out = tmp_path / f"lazy{lazy}"
        t = _make_trainer(c, "float32", out_dir=out, save_every=1, check_finite=not lazy, log_every=2)
        t.fit(2)
        t.schedule = xrnn.optim.Constant(1e39)
        with pytest.raises(NonFiniteError, match="made the weights or the optimizer state non-finite") as e:
            t.fit(6)
        assert "the last good checkpoint is" in str(e.value) and "(step 2)" in str(e.value)
        saved = xrnn.load(out / LAST)  # refuses non-finite weights: this one is finite
        assert saved.step == 2
        assert not ck.nonfinite_tensors(ck.read_container(out / LAST).tensors)


def test_the_command_line_reproducer_of_the_issue_leaves_no_poisoned_checkpoint(tmp_path, files, capsys):
    for lazy in ([], ["--lazy-nan-check"]):
        out = tmp_path / f"run{len(lazy)}"
        argv = ["train", str(files["TINY"]), *SMALL, "--steps", "60", "--seed", "1", "--lr", "1e39",
                "--save-every", "1", "--sample-every", "0", "--progress", "off", "--out", str(out), *lazy]
        assert main(argv) == 2
        err = one_line_error(capsys.readouterr().err)
        assert "training diverged at step 1" in err and "non-finite" in err
        for name in (LAST, "best.ckpt"):
            p = out / name
            assert not p.exists() or not ck.nonfinite_tensors(ck.read_container(p).tensors)


def test_a_nan_validation_loss_is_never_the_best(tmp_path, monkeypatch):
    c = Corpus.from_text(SHAKESPEARE[:1500])
    import io

    buf = io.StringIO()
    t = _make_trainer(c, out_dir=tmp_path, eval_every=1, save_every=None, progress="plain", file=buf)
    monkeypatch.setattr(t, "evaluate", lambda *a, **k: float("nan"))
    t.fit(2)
    assert t.best_val_loss is None and t.best_step is None
    assert not (tmp_path / "best.ckpt").exists()
    assert "val loss nan" in buf.getvalue() and "(best)" not in buf.getvalue()
    monkeypatch.setattr(t, "evaluate", lambda *a, **k: 2.5)
    t.fit(3)
    assert t.best_val_loss == 2.5 and (tmp_path / "best.ckpt").exists()


def test_saving_refuses_non_finite_weights_as_a_training_checkpoint(tmp_path):
    c = Corpus.from_text(SHAKESPEARE[:1500])
    t = _make_trainer(c)
    t.fit(1)
    w = t.model.parameters()["head.weight"]
    w[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"refusing to save a training checkpoint at step 1: model/head.weight"):
        xrnn.save(t, tmp_path / "t.ckpt")
    assert not os.listdir(tmp_path)


def _nonfinite_files(tmp_path):
    c = Corpus.from_text(SHAKESPEARE[:1500])
    t = _make_trainer(c)
    t.fit(1)
    m = tmp_path / "model.ckpt"
    t.model.parameters()["head.bias"][1] = float("nan")
    xrnn.save(t.model, m)  # a model checkpoint is written as it is
    run = tmp_path / "run"
    run.mkdir()
    t.model.parameters()["head.bias"][1] = 0.0
    xrnn.save(t, run / LAST)
    kind, meta, tensors = ck.read_container(run / LAST)
    tensors["optim/head.bias/exp_avg"][0] = float("inf")  # a forged (or pre-fix) run
    ck.write_container(run / LAST, kind, meta, tensors)
    return m, run / LAST


def test_load_and_sample_refuse_non_finite_weights_unless_told(tmp_path, capsys):
    model_file, run_file = _nonfinite_files(tmp_path)
    for p, where in ((model_file, "head.bias"), (run_file, "optim/head.bias/exp_avg")):
        for load in (xrnn.load, load_model):
            with pytest.raises(CheckpointCorruptError, match=f"holds non-finite weights .*{where}.*allow_nonfinite"):
                load(p)
        assert main(["sample", str(p), "--length", "5"]) == 2
        assert "--allow-nonfinite" in one_line_error(capsys.readouterr().err)
    with pytest.raises(CheckpointCorruptError, match="non-finite"):
        Trainer.resume(run_file)
    assert main(["train", "--resume", "--out", str(run_file.parent)]) == 2
    assert "non-finite" in one_line_error(capsys.readouterr().err)
    # the explicit override, for forensics
    m = xrnn.load(model_file, allow_nonfinite=True)
    assert np.isnan(xrnn.to_numpy(m.parameters()["head.bias"])[1])
    assert np.isinf(xrnn.to_numpy(xrnn.load(run_file, allow_nonfinite=True).optimizer.state["head.bias"]["exp_avg"])[0])
    assert load_model(model_file, allow_nonfinite=True) is not None
    assert main(["sample", str(model_file), "--length", "5", "--seed", "0", "--allow-nonfinite"]) == 0


# ---------------------------------------------------------------------------
# one run per output folder (issue 15, item 2): real processes
# ---------------------------------------------------------------------------

def _start_run(tmp_path, files, out, *extra):
    """A long CLI run in its own process; returns it once it holds the folder's lock."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "xrnn", "train", str(files["TINY"]), *SMALL, "--steps", "100000", "--progress",
         "off", "--sample-every", "0", "--save-every", "1", "--eval-every", "1", "--out", str(out), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env())
    deadline = time.time() + 60
    while not ((out / ".lock").exists() and (out / ".lock").read_text().strip() == str(proc.pid)
               and (out / LAST).exists() and (out / "best.ckpt").exists()):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.05)
    return proc


def test_a_second_run_resume_or_overwrite_of_a_live_folder_is_refused_naming_the_pid(tmp_path, files):
    out = tmp_path / "out"
    first = _start_run(tmp_path, files, out)
    try:
        for extra in ([], ["--resume"], ["--overwrite"]):
            r = subprocess.run([sys.executable, "-m", "xrnn", "train", str(files["TINY"]), *SMALL, "--steps", "3",
                                "--progress", "off", "--out", str(out), *extra],
                               capture_output=True, text=True, env=env(), timeout=120)
            assert r.returncode == 2, r.stderr
            line = one_line_error(r.stderr)
            assert f"is in use by another training run (PID {first.pid}" in line, line
        assert first.poll() is None  # the live run was not disturbed
        # the same refusal from the Python API
        with pytest.raises(E.StateError, match=f"PID {first.pid}"):
            train(files["TINY"], steps=3, hidden_size=8, num_layers=1, batch_size=4, seq_len=8, out_dir=out,
                  overwrite=True, progress=False)
    finally:
        first.kill()
        first.communicate()
    assert first.returncode == -signal.SIGKILL
    # kill -9 leaves no stale lock: the OS released it; --overwrite removes the old run's files first
    assert (out / "best.ckpt").exists()
    t = train(files["TINY"], steps=2, hidden_size=8, num_layers=1, batch_size=4, seq_len=8, out_dir=out,
              overwrite=True, progress=False, val_fraction=0, sample_every=0)
    assert t.step == 2 and xrnn.load(out / LAST).step == 2
    assert not (out / "best.ckpt").exists()  # the old run's best.ckpt does not pass for the new run's
    assert (out / ".lock").read_text().strip() == str(os.getpid())


def test_the_lock_is_reentrant_in_one_process_and_released_after(tmp_path):
    from xrnn import rundir

    with rundir.lock(tmp_path):
        with rundir.lock(tmp_path):  # train() takes it, then fit() again
            pass
        probe = subprocess.run([sys.executable, "-c", "import sys; from xrnn import rundir\n"
                                "try:\n    rundir.lock(sys.argv[1]).__enter__()\nexcept Exception as e:\n"
                                "    print(e); sys.exit(3)", str(tmp_path)],
                               capture_output=True, text=True, env=env(), timeout=60)
        assert probe.returncode == 3 and f"PID {os.getpid()}" in probe.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys; from xrnn import rundir\n"
                            "rundir.lock(sys.argv[1]).__enter__()", str(tmp_path)],
                           capture_output=True, text=True, env=env(), timeout=60)
    assert probe.returncode == 0, probe.stderr


def test_a_run_removes_every_temporary_of_killed_saves_at_start(tmp_path):
    from xrnn import rundir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    left = [tmp_path / f".{name}.{dead}.{'ab' * 6}.tmp" for name in (LAST, "best.ckpt")]
    alive = tmp_path / f".{LAST}.1.{'cd' * 6}.tmp"  # PID 1 exists: a writer that may still be running
    other = tmp_path / "notes.tmp"
    for p in (*left, alive, other):
        p.write_bytes(b"partial")
    c = Corpus.from_text(SHAKESPEARE[:1500])
    _make_trainer(c, out_dir=tmp_path, save_every=None).fit(1)
    assert not any(p.exists() for p in left)  # fresh ones too: no waiting for the next improvement
    assert alive.exists() and other.exists()
    assert rundir.clean_temporaries(tmp_path) == []


# ---------------------------------------------------------------------------
# smaller things (issue 15, item 4) and Ctrl-C (issue 14)
# ---------------------------------------------------------------------------

def test_several_failed_saves_in_a_row_stop_the_run_saying_so(tmp_path, monkeypatch, capsys):
    c = Corpus.from_text(SHAKESPEARE[:1500])
    t = _make_trainer(c, out_dir=tmp_path, save_every=1)
    t.fit(2)
    monkeypatch.setattr(ck.os, "replace", lambda s, d: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(SaveError, match=r"stopping at step 5: the last 3 saves all failed \(.*disk is full.*\); "
                                        r"the last checkpoint kept is .*last.ckpt \(step 2\)"):
        t.fit(60)
    err = capsys.readouterr().err
    assert err.count("warning: could not save") == 2 and "2 more failure(s) in a row stop it" in err
    assert xrnn.load(tmp_path / LAST).step == 2


def test_a_signal_at_a_sample_step_stops_after_the_sample_is_printed(monkeypatch, capfd):
    import io

    c = Corpus.from_text(SHAKESPEARE[:1500])
    buf = io.StringIO()
    t = _make_trainer(c, sample_every=2, sample_length=5, progress="plain", file=buf)
    step = Trainer.train_step

    def signalled(self):
        out = step(self)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "train_step", signalled)
    t.fit(10)
    assert t.interrupted == "SIGINT" and t.step == 2
    assert "sample at step 2" in buf.getvalue()
    err = capfd.readouterr().err
    assert "SIGINT: stopping after the current step" in err and "interrupted by SIGINT at step 2" in err


def test_ctrl_c_says_at_once_it_will_save_and_a_second_quits_naming_the_kept_checkpoint(tmp_path, capfd):
    c = Corpus.from_text(SHAKESPEARE[:1500])
    t = _make_trainer(c, out_dir=tmp_path, save_every=1)
    t.fit(3)
    t._stop_signal = None
    t._on_signal(signal.SIGINT, None)
    first = capfd.readouterr().err
    assert f"SIGINT: stopping after the current step and saving {tmp_path / LAST}; press Ctrl-C again quits at " \
           "once without saving" in first
    with pytest.raises(KeyboardInterrupt):
        t._on_signal(signal.SIGINT, None)
    second = capfd.readouterr().err
    assert f"SIGINT again: quitting now without saving; the last checkpoint kept is {tmp_path / LAST} (step 3)" \
        in second


def test_the_eta_follows_the_recent_rate():
    rate = T_MOD._RecentRate()
    for _ in range(10):
        rate.update(10.0, 10)  # 100 steps at 1 s/step (a busy machine)
    for _ in range(20):
        rate.update(1.0, 10)  # then 200 steps at 0.1 s/step
    # the whole-run average would say (100 + 20) / 300 = 0.4 s/step, four times too slow
    assert 0.1 <= rate.seconds_per_step < 0.15
    one_by_one = T_MOD._RecentRate()
    for _ in range(100):
        one_by_one.update(1.0, 1)
    for _ in range(200):
        one_by_one.update(0.1, 1)
    assert abs(one_by_one.seconds_per_step - rate.seconds_per_step) < 0.02  # whatever log_every is


def test_threads_default_to_the_cores_of_the_process_and_reach_the_blas(monkeypatch):
    from xrnn import threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert threads.available_cores() == 1  # the affinity mask, not os.cpu_count()
    for var in threads.THREAD_VARS:
        monkeypatch.setenv(var, "7")
    before = threads.blas_threads()
    try:
        assert threads.set_threads(1) == 1
        assert all(os.environ[v] == "1" for v in threads.THREAD_VARS)
        if before is not None:  # a BLAS NumPy uses was found and asked
            assert threads.blas_threads() == 1
    finally:
        if before is not None:
            threads.set_threads(before)
    with pytest.raises(ConfigError, match="threads must be a positive integer"):
        threads.set_threads(0)


def test_threads_set_in_the_environment_stand_when_no_count_is_given(monkeypatch):
    """README's `OMP_NUM_THREADS=1 mpirun -n 4 xrnn train` must keep one thread per rank: the default
    does not override a count the user set (it would oversubscribe the cores)."""
    from xrnn import threads

    for var in threads.THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    called = []
    monkeypatch.setattr(threads, "_loaded_blas", lambda: called.append(1) or [])
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    assert threads.set_threads() == 1
    assert called == [] and os.environ["OMP_NUM_THREADS"] == "1" and "OPENBLAS_NUM_THREADS" not in os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")  # not a count: the affinity default applies
    assert threads.set_threads() == 2 and called == [1]
    assert all(os.environ[v] == "2" for v in threads.THREAD_VARS)


def test_the_threads_option_of_the_command_line(tmp_path, files, monkeypatch):
    from xrnn import threads

    got = []
    monkeypatch.setattr(threads, "set_threads", lambda n=None: got.append(n))
    out = tmp_path / "o"
    for extra, want in ((["--threads", "1"], 1), ([], None)):
        assert main(["train", str(files["TINY"]), *SMALL, "--steps", "1", "--progress", "off", "--out", str(out),
                     "--overwrite", *extra]) == 0
        assert got[-1] == want  # None: set_threads keeps an environment count, else available_cores()


# ---------------------------------------------------------------------------
# promises proven in other test files (kept here as a map; each name is checked to exist)
# ---------------------------------------------------------------------------

COVERED_ELSEWHERE = {
    "empty sequences and dstate shapes": "tests/test_layer_errors.py::test_empty_sequence",
    "mismatched float dtype": "tests/test_layer_errors.py::test_integer_and_mismatched_float_inputs",
    "state on another device": "tests/test_backend.py::test_state_on_another_device_is_refused",
    "corpus: missing/empty/binary/non-UTF-8 with byte offset":
        "tests/test_data.py::test_invalid_utf8_gives_the_byte_offset",
    "checkpoint truncated at every length": "tests/test_checkpoint.py::test_every_truncation_is_reported_as_corrupt",
    "checkpoint every single-byte change":
        "tests/test_checkpoint.py::test_every_single_byte_change_is_reported_as_corrupt",
    "checkpoint newer version": "tests/test_checkpoint.py::test_newer_format_version",
    "checkpoint wrong kind": "tests/test_checkpoint.py::test_wrong_or_unknown_kind",
    "huge declared tensor shape": "tests/test_checkpoint.py::test_huge_declared_shape_is_refused_before_allocating",
    "planted pickle (container)": "tests/test_checkpoint.py::test_planted_pickle_is_never_unpickled",
    "fuzz: random/mutated/forged container bytes": "tests/test_checkpoint.py::test_fuzz_mutated_valid_files",
    "fuzz: forged headers with valid checksum":
        "tests/test_checkpoint.py::test_fuzz_forged_headers_with_valid_checksum",
    "fuzz: random bytes as a corpus": "tests/test_data.py::test_fuzz_read_corpus_random_bytes",
    "fuzz: forged real checkpoints": "tests/test_fuzz.py::test_forged_language_model_checkpoints",
    "fuzz: mutated text files": "tests/test_fuzz.py::test_mutated_text_files_read_or_raise_data_errors",
    "disk full mid-write (failing writer)":
        "tests/test_checkpoint.py::test_disk_full_mid_write_keeps_previous_checkpoint",
    "failure at fsync or rename": "tests/test_checkpoint.py::test_failure_at_fsync_or_rename_keeps_previous",
    "disk full during training: warning, then error":
        "tests/test_train.py::test_a_failed_save_warns_and_training_goes_on",
    "SIGINT/SIGTERM in fit, exact resume":
        "tests/test_train.py::test_a_signal_stops_after_the_step_saves_and_resumes_exactly",
    "SIGINT through the CLI, exact resume": "tests/test_cli.py::test_sigint_then_resume_equals_an_uninterrupted_run",
    "NaN loss: stop before the update, last good checkpoint":
        "tests/test_train.py::test_a_non_finite_loss_stops_before_the_update_and_keeps_the_last_good_checkpoint",
    "divergence message: lower lr, clip": "tests/test_train.py::test_divergence_with_a_huge_learning_rate_is_reported",
    "deferred NaN check": "tests/test_train.py::test_deferred_check_finds_the_first_bad_step_and_never_saves_after_it",
    "--debug traceback in a subprocess": "tests/test_cli.py::test_debug_shows_the_traceback",
}


def test_the_map_of_tests_elsewhere_is_accurate():
    for where in COVERED_ELSEWHERE.values():
        path, name = where.split("::")
        assert re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(encoding="utf-8"), re.M), where
