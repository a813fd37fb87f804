"""The backend fast paths equal the portable reference scans.

Every fast path in :mod:`xrnn.kernels` must compute the same function as the
portable scans of :mod:`xrnn.functional` (which the recurrent-layer tests
prove against PyTorch and finite differences). Here each layer option is
run twice from the same seed, once with ``use_fast_paths(False)`` and once
with the fast path, and every result is compared: outputs, final states,
input and initial-state gradients and every parameter gradient. A scan-level
test checks the side effects the layers rely on (what is written over ``A``,
``Y``, ``C`` and ``NH``), and one PyTorch comparison checks the fast path
against an independent implementation directly.
"""

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

import xrnn
from xrnn import functional as F
from xrnn.kernels import PORTABLE, fast_paths_enabled, native, numpy_fast, scans_for, use_fast_paths

TOL = {"float64": dict(rtol=1e-10, atol=1e-12), "float32": dict(rtol=2e-4, atol=2e-5)}

MODES = [("RNN", "tanh"), ("RNN", "relu"), ("LSTM", None), ("GRU", None)]
# (T, B): a typical shape, one step, one sequence, and the unbatched (T, I) layout
SHAPES = [(5, 3), (1, 3), (4, 1), (4, None)]


def _flat(state):
    if state is None:
        return []
    if isinstance(state, tuple):
        return [s for s in state if s is not None]
    return [state]


def _make(mode, nonlinearity, dtype, **kw):
    cls = getattr(xrnn, mode)
    if mode == "RNN":
        kw["nonlinearity"] = nonlinearity
    return cls(4, 5, dtype=dtype, seed=3, **kw)


def _run(fast, mode, nonlinearity, dtype, T, B, layers, bidirectional, batch_first, bias, with_state,
         dropout=0.0):
    """One forward and backward; returns every array the caller can observe."""
    rng = np.random.default_rng(7)
    D = 2 if bidirectional else 1
    m = _make(mode, nonlinearity, dtype, num_layers=layers, bidirectional=bidirectional,
              batch_first=batch_first, bias=bias, dropout=dropout)
    dev = m.device
    if B is None:
        x_shape, out_shape, st_shape = (T, 4), (T, D * 5), (layers * D, 5)
    elif batch_first:
        x_shape, out_shape, st_shape = (B, T, 4), (B, T, D * 5), (layers * D, B, 5)
    else:
        x_shape, out_shape, st_shape = (T, B, 4), (T, B, D * 5), (layers * D, B, 5)
    x = dev.asarray(rng.standard_normal(x_shape), dtype)
    dout = dev.asarray(rng.standard_normal(out_shape), dtype)
    state = dstate = None
    if with_state:
        h0, dh = (dev.asarray(rng.standard_normal(st_shape), dtype) for _ in range(2))
        if mode == "LSTM":
            c0, dc = (dev.asarray(rng.standard_normal(st_shape), dtype) for _ in range(2))
            state, dstate = (h0, c0), (dh, dc)
        else:
            state, dstate = h0, dh
    with use_fast_paths(fast):
        assert scans_for(dev) is (numpy_fast.SCANS if fast else PORTABLE)
        out, st = m(x, state)
        dx, dst = m.backward(dout, dstate)
    return [out, dx, *_flat(st), *_flat(dst), *m.grads.values()], list(m.grads)


def _compare(dtype, *args, **kw):
    ref, names = _run(False, *args, **kw)
    got, _ = _run(True, *args, **kw)
    labels = ["out", "dx"] + [f"state/dstate[{i}]" for i in range(len(ref) - 2 - len(names))] + names
    assert len(ref) == len(got)
    for label, a, b in zip(labels, ref, got):
        assert a.shape == b.shape and a.dtype == b.dtype, label
        np.testing.assert_allclose(b, a, err_msg=label, **TOL[dtype])


@pytest.mark.parametrize(
    "mode,nonlinearity,layers,bidirectional,batch_first,bias",
    [(m, nl, L, bi, bf, b) for (m, nl), L, bi, bf, b in
     itertools.product(MODES, (1, 2), (False, True), (False, True), (True, False))],
)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("tanh_form", ["np_tanh", "exp_tanh"])
def test_fast_equals_portable_every_layer_option(mode, nonlinearity, layers, bidirectional, batch_first, bias,
                                                  dtype, tanh_form, monkeypatch):
    # the fast path switches tanh's formula by size; force each choice on these small shapes
    monkeypatch.setattr(numpy_fast, "_EXP_TANH_MIN", 0 if tanh_form == "exp_tanh" else 1 << 62)
    monkeypatch.setattr(numpy_fast, "_RNN_FAST_MIN", 0)  # the RNN's in-place scans on every size
    # two sets of the fast path's size switches: exp-form tanh and gates, the recurrent products' rows
    # padded (B = 3 runs as 4) and the per-step LSTM backward; or tanh-form gates, rows as given and
    # the factored LSTM backward of small steps (one step per chunk, so every chunk edge is crossed)
    exp_form = tanh_form == "exp_tanh"
    monkeypatch.setattr(numpy_fast, "_ROW_MULTIPLE", 2 if exp_form else 8)
    monkeypatch.setattr(numpy_fast, "_LSTM_FACTORED_MAX", 0 if exp_form else 1 << 62)
    monkeypatch.setattr(numpy_fast, "_FACTOR_CHUNK", 1 << 20 if exp_form else 1)
    monkeypatch.setattr(numpy_fast, "_STRIP_TRANSPOSE_MIN", 0 if exp_form else 1 << 62)  # W^T in strips or not
    for (T, B), with_state in itertools.product(SHAPES, (False, True)):
        _compare(dtype, mode, nonlinearity, dtype, T, B, layers, bidirectional, batch_first, bias, with_state)


@pytest.mark.parametrize("mode,nonlinearity", MODES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fast_equals_portable_with_dropout(mode, nonlinearity, dtype):
    # same seed, same host RNG draws: both runs use the same dropout masks
    _compare(dtype, mode, nonlinearity, dtype, 6, 3, 3, True, False, True, True, dropout=0.5)


@pytest.mark.parametrize("mode,nonlinearity", MODES)
def test_fast_equals_portable_at_a_realistic_size(mode, nonlinearity):
    """B * H above the sizes where the fast path changes formulas, as in real training."""
    rng = np.random.default_rng(2)
    T, B, I, H = 3, 64, 16, 256  # B*H above every size switch of the fast path
    x, dout = rng.standard_normal((T, B, I)), rng.standard_normal((T, B, H))
    res = []
    for fast in (False, True):
        kw = {"nonlinearity": nonlinearity} if mode == "RNN" else {}
        m = getattr(xrnn, mode)(I, H, seed=4, dtype="float32", **kw)
        with use_fast_paths(fast):
            out, st = m(m.device.asarray(x, "float32"))
            dx, _ = m.backward(m.device.asarray(dout, "float32"))
        res.append([out, dx, *_flat(st), *m.grads.values()])
    for a, b in zip(*res):
        np.testing.assert_allclose(b, a, **TOL["float32"])


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_scan_side_effects_match(reverse, dtype):
    """Scan level: the buffers each scan writes (A, Y, C, NH) and its returns match."""
    rng = np.random.default_rng(0)
    xp = xrnn.resolve_device("cpu").xp
    T, B, H, D = 4, 3, 5, 2
    col = slice(H, 2 * H) if reverse else slice(0, H)
    tol = TOL[dtype]

    def arr(*shape):
        return rng.standard_normal(shape).astype(dtype)

    def both(fn_name, make_args, written):
        """Run the portable and fast scan on identical copies; compare returns and written buffers."""
        base = make_args()
        results = []
        for impl in (PORTABLE, numpy_fast.SCANS):
            args = [a.copy() if isinstance(a, np.ndarray) else a for a in base]
            ret = getattr(impl, fn_name)(xp, *args)
            rets = list(ret) if isinstance(ret, tuple) else [ret]
            results.append((rets, [args[i] for i in written], args))
        (r0, w0, a0), (r1, w1, a1) = results
        for a, b in zip(r0 + w0, r1 + w1):
            np.testing.assert_allclose(b, a, err_msg=fn_name, **tol)
        # inputs that are not documented outputs stay untouched
        for i, (a, b) in enumerate(zip(a0, a1)):
            if isinstance(a, np.ndarray) and i not in written:
                np.testing.assert_array_equal(a, b, err_msg=f"{fn_name} argument {i}")
        return a0

    for nl in ("tanh", "relu"):
        A, W, h0, Y = arr(T, B, H), arr(H, H), arr(B, H), np.zeros((T, B, D * H), dtype)
        fwd = both("rnn_scan", lambda: [A, W, h0, Y, col, reverse, nl], written=[3])
        both("rnn_scan_backward", lambda: [A, fwd[3], col, W, arr(T, B, D * H), arr(B, H), reverse, nl],
             written=[0])
        both("rnn_scan_backward", lambda: [A, fwd[3], col, W, arr(T, B, D * H), None, reverse, nl], written=[0])

    A, W, h0, c0 = arr(T, B, 4 * H), arr(4 * H, H), arr(B, H), arr(B, H)
    Y, C = np.zeros((T, B, D * H), dtype), np.zeros((T, B, H), dtype)
    fwd = both("lstm_scan", lambda: [A, W, h0, c0, Y, col, C, reverse], written=[0, 4, 6])
    for dhT, dcT in ((arr(B, H), arr(B, H)), (None, None), (None, arr(B, H))):
        both("lstm_scan_backward", lambda: [fwd[0], fwd[6], c0, W, arr(T, B, D * H), col, dhT, dcT, reverse],
             written=[0])

    A, W, b, h0 = arr(T, B, 3 * H), arr(3 * H, H), arr(3 * H), arr(B, H)
    Y, NH = np.zeros((T, B, D * H), dtype), np.zeros((T, B, H), dtype)
    for bias in (b, None):
        fwd = both("gru_scan", lambda: [A, W, bias, h0, Y, col, NH, reverse], written=[0, 4, 6])
        for dhT in (arr(B, H), None):
            both("gru_scan_backward",
                 lambda: [fwd[0], fwd[6], fwd[4], col, h0, W, arr(T, B, D * H), dhT, reverse], written=[0, 1])


def test_fast_lstm_saturated_gates_match():
    """Pre-activations far beyond float32 exp's range: exp overflows to inf, the gate is exactly 0 or 1."""
    xp = xrnn.resolve_device("cpu").xp
    T, B, H = 3, 2, 4
    rng = np.random.default_rng(1)
    A = (rng.standard_normal((T, B, 4 * H)) * 200).astype("float32")
    W = rng.standard_normal((4 * H, H)).astype("float32")
    h0, c0 = np.zeros((B, H), "float32"), np.zeros((B, H), "float32")
    outs = []
    for impl in (PORTABLE, numpy_fast.SCANS):
        a, Y, C = A.copy(), np.zeros((T, B, H), "float32"), np.zeros((T, B, H), "float32")
        with np.errstate(all="raise"):  # the fast path must not leak an overflow warning/error
            impl.lstm_scan(xp, a, W, h0, c0, Y, slice(0, H), C, False)
        outs.append((a, Y, C))
    for x, y in zip(*outs):
        assert np.all(np.isfinite(y))
        np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-7)


def test_fast_path_matches_torch():
    """The NumPy fast path against PyTorch directly (independent of the portable scans)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    T, B, I, H = 6, 3, 4, 5
    x = rng.standard_normal((T, B, I))
    dout = rng.standard_normal((T, B, 2 * H))
    for mode in ("RNN", "LSTM", "GRU"):
        m = getattr(xrnn, mode)(I, H, num_layers=2, bidirectional=True, dtype="float64", seed=1)
        tm = getattr(torch.nn, mode)(I, H, num_layers=2, bidirectional=True, dtype=torch.float64)
        with torch.no_grad():
            for k, v in m.parameters().items():
                getattr(tm, k).copy_(torch.from_numpy(np.asarray(v)))
        xt = torch.tensor(x, requires_grad=True)
        out_t, _ = tm(xt)
        out_t.backward(torch.from_numpy(dout))
        assert fast_paths_enabled()
        out, _ = m(m.device.asarray(x, "float64"))
        dx, _ = m.backward(m.device.asarray(dout, "float64"))
        np.testing.assert_allclose(out, out_t.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
        for k, g in m.grads.items():
            np.testing.assert_allclose(g, getattr(tm, k).grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=k)


def test_dispatch_and_switches():
    dev = xrnn.resolve_device("cpu")
    assert scans_for(dev) is numpy_fast.SCANS
    with use_fast_paths(False):
        assert scans_for(dev) is PORTABLE
        with use_fast_paths(True):
            assert scans_for(dev) is numpy_fast.SCANS
        assert scans_for(dev) is PORTABLE
    assert scans_for(dev) is numpy_fast.SCANS
    strict = xrnn.resolve_device("array_api_strict:device1")
    assert scans_for(strict) is PORTABLE  # other backends keep the reference
    code = ("import xrnn; from xrnn.kernels import scans_for, PORTABLE; "
            "print(scans_for(xrnn.resolve_device('cpu')) is PORTABLE)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XRNN_PORTABLE="1", PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "True"


def test_fast_scans_have_the_portable_signatures():
    import inspect

    for name in ("rnn_scan", "rnn_scan_backward", "lstm_scan", "lstm_scan_backward", "gru_scan", "gru_scan_backward"):
        assert inspect.signature(getattr(numpy_fast.SCANS, name)).parameters.keys() == \
            inspect.signature(getattr(F, name)).parameters.keys(), name


def test_strip_transpose_equals_transpose():
    """W^T copied in 16-row strips (large weights) is W^T exactly, remainder strip included."""
    rng = np.random.default_rng(5)
    for shape, dtype in (((1000, 70), np.float32), ((2048, 512), np.float32), ((300, 250), np.float64)):
        W = rng.standard_normal(shape).astype(dtype)
        assert W.size >= numpy_fast._STRIP_TRANSPOSE_MIN
        got = numpy_fast._transpose_copy(W)
        assert got.flags.c_contiguous and got.dtype == dtype
        np.testing.assert_array_equal(got, W.T)
        with native.use(None):  # without the C kernels: a column-major copy
            fw = numpy_fast.forward_weight(W, 10)  # (M, K) values, column-major storage
        assert fw.shape == W.shape and fw.T.flags.c_contiguous
        np.testing.assert_array_equal(fw, W)


def _fresh_run(mode, nonlinearity, x, lengths=None, dout=None):
    """out, final state, and (with dout) dx and every gradient, from a new layer (same seed)."""
    m = _make(mode, nonlinearity, "float64", num_layers=2, bidirectional=True)
    if dout is None:
        with xrnn.no_grad():
            out, st = m(x, lengths=lengths)
        return [out, *_flat(st)]
    out, st = m(x, lengths=lengths)
    dx, _ = m.backward(dout)
    return [out, *_flat(st), dx, *m.grads.values()]


@pytest.mark.parametrize("mode,nonlinearity", MODES)
def test_kept_buffers_change_no_result(mode, nonlinearity, monkeypatch):
    """On NumPy a layer keeps its gate and cell-state buffers between calls instead of allocating
    them anew (modules._RNNBase._take_buffer). No sequence of calls may see that: no_grad forwards
    one after another, a no_grad forward between a training forward and its backward, lengths=
    batches and new batch sizes all give what a fresh layer gives, and nothing returned earlier
    changes afterwards. (A no_grad forward between a forward and its backward discards the
    cache, as it always has: that order is refused, with or without kept buffers.)"""
    monkeypatch.setattr(numpy_fast, "_RNN_FAST_MIN", 0)  # the Elman RNN's NumPy scans at this size too
    rng = np.random.default_rng(11)
    T, B, D = 6, 4, 2
    xs = [rng.standard_normal((T, B, 4)) for _ in range(4)]
    dout = rng.standard_normal((T, B, D * 5))
    m = _make(mode, nonlinearity, "float64", num_layers=2, bidirectional=True)
    assert scans_for(m.device).reuse_buffers

    with xrnn.no_grad():
        first = [o.copy() for o in [m(xs[0])[0], *_flat(m(xs[0])[1])]]
        kept = {k: id(v) for k, v in m._workspace.items()}
        assert len(kept) == (2 if mode == "RNN" else 4) * 2  # A (and C or NH) per layer and direction
        out1, st1 = m(xs[1])
        assert {k: id(v) for k, v in m._workspace.items()} == kept  # the same buffers came back
    returned = [out1, *_flat(st1)]
    snapshot = [a.copy() for a in returned]
    for a, b in zip(first, _fresh_run(mode, nonlinearity, xs[0])):
        np.testing.assert_array_equal(a, b)

    # a training forward that is never backpropagated, then one that is (both on kept buffers)
    m(xs[3])
    out2, st2 = m(xs[2])
    m.zero_grad()
    dx2, _ = m.backward(dout)
    for a, b in zip([out2, *_flat(st2), dx2, *m.grads.values()], _fresh_run(mode, nonlinearity, xs[2], dout=dout)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(returned, snapshot):  # what the second call returned is untouched by later calls
        np.testing.assert_array_equal(a, b)

    # lengths= (packed rows: other buffer shapes), then a smaller batch, then the full batch again
    lengths = np.array([6, 2, 5, 3])
    for x, lens in ((xs[1], lengths), (xs[2][:, :3], None), (xs[3], None)):
        m.zero_grad()
        out, st = m(x, lengths=lens)
        dx, _ = m.backward(dout[:, :x.shape[1]])
        got = [out, *_flat(st), dx, *m.grads.values()]
        for a, b in zip(got, _fresh_run(mode, nonlinearity, x, lens, dout[:, :x.shape[1]])):
            np.testing.assert_array_equal(a, b)

    # a training step hands its buffers back to the allocator (the optimizer's temporaries come next and
    # must not stack on them); a no_grad call keeps them again
    assert not m._workspace and not m._lent
    with xrnn.no_grad():
        m(xs[2][:, :3])  # a smaller batch, then the full one: the larger buffer is the one that stays
        m(xs[0])
        small = {k: id(v) for k, v in m._workspace.items()}
        m(xs[2][:, :3])  # borrows the leading rows
    assert {k: id(v) for k, v in m._workspace.items()} == small and len(small) == len(kept)
    assert all(v.shape[0] == T * B for v in m._workspace.values())
    m.release_workspace()
    assert not m._workspace
    with xrnn.no_grad():
        m(xs[0])
    m.to(dtype="float32")  # new dtype: nothing kept from before
    assert not m._workspace


def test_buffers_are_not_kept_where_scans_return_views():
    """The portable scans (every backend but NumPy's fast path) and the projected LSTM keep nothing."""
    m = xrnn.LSTM(4, 5, num_layers=2, dtype="float64", seed=1)
    x = np.random.default_rng(0).standard_normal((3, 2, 4))
    with use_fast_paths(False), xrnn.no_grad():
        m(x)
    assert not m._workspace
    p = xrnn.LSTM(4, 5, proj_size=3, dtype="float64", seed=1)
    with xrnn.no_grad():
        p(x)
    assert not p._workspace


@pytest.mark.parametrize("I", [1, 7, 8, 128])
@pytest.mark.parametrize("with_out", [False, True])
def test_projection_with_the_bias_inside_the_product(I, with_out):
    """numpy_fast.project adds the bias inside the product ([X, 1, 0...] @ [W, b, 0...]^T): the same
    as X @ W^T + b to rounding (float64: 1e-12), into the given buffer or a new array."""
    rng = np.random.default_rng(I)
    X, W, b = rng.standard_normal((37, I)), rng.standard_normal((12, I)), rng.standard_normal(12)
    out = np.full((37, 12), np.nan) if with_out else None
    got = numpy_fast.project(X, W, out, b)
    np.testing.assert_allclose(got, X @ W.T + b, rtol=1e-12, atol=1e-12)
    assert (got is out) if with_out else got.shape == (37, 12)
    np.testing.assert_allclose(numpy_fast.project(X, W, None), X @ W.T, rtol=1e-12, atol=1e-12)
