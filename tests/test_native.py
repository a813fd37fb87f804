"""The fused CPU kernels (xrnn/kernels/cpu/recurrent.c, loaded by xrnn.kernels.native).

Each kernel is checked against the step's formulas evaluated in float64 by NumPy here (an
independent reference), in both compiled copies (baseline and AVX2); whole layers with the
kernels are checked against the NumPy code they replace and the portable scans, forward and
every gradient, for every cell option, ``lengths=`` and saturated gates. conftest.py compiles
the source for the session; without a C compiler these tests skip and say why.
"""

import ctypes.util
import os
import subprocess
import sys

import numpy as np
import pytest

import xrnn
from xrnn.kernels import native, numpy_fast, use_fast_paths

from conftest import NATIVE_LIB, NATIVE_WHY
from conftest import native_kernels as _kernels

pytestmark = pytest.mark.skipif(NATIVE_LIB is None, reason=f"no fused CPU kernels: {NATIVE_WHY}")

ISAS = ["base", "avx2", "wide", "avx512"]  # a copy this CPU lacks skips
TOL32 = dict(rtol=2e-4, atol=2e-5)


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def _rows(rng, n, width, pad=3, scale=1.0):
    """(n, width) float32 view with a row stride of width + pad (as in a (T, B, D*H) output)."""
    full = (rng.standard_normal((n, width + pad)) * scale).astype(np.float32)
    return full[:, :width]


def _ld(x):
    return x.strides[0] // 4


def _p(x):
    return x.ctypes.data


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("relu", [False, True])
def test_rnn_step_and_backward_match_float64_formulas(isa, relu):
    k = _kernels(isa)
    n, H = 4, 45
    rng = np.random.default_rng(21)
    z, a = _rows(rng, n, H, scale=3.0), _rows(rng, n, H, scale=3.0)
    h = _rows(rng, n, H)
    pre = z.astype(np.float64) + a
    want = np.maximum(pre, 0.0) if relu else np.tanh(pre)
    a_before = a.copy()
    k.rnn_step(n, H, _p(z), _ld(z), _p(a), _ld(a), _p(h), _ld(h), int(relu))
    np.testing.assert_allclose(h, want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(a, a_before)  # the forward leaves A alone
    dy, dhn, dz = (_rows(rng, n, H) for _ in range(3))
    for nxt in (None, dhn):
        dh = dy.astype(np.float64) + (0.0 if nxt is None else nxt)
        want_dz = dh * (h > 0) if relu else dh * (1 - h.astype(np.float64) ** 2)
        k.rnn_step_backward(n, H, _p(dz), _ld(dz), _p(h), _ld(h), _p(dy), _ld(dy),
                            0 if nxt is None else _p(nxt), _ld(dhn), int(relu))
        np.testing.assert_allclose(dz, want_dz, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,H", [(1, 1), (3, 7), (5, 33), (2, 64)])
def test_lstm_step_matches_float64_formulas(isa, n, H):
    k = _kernels(isa)
    rng = np.random.default_rng(n * 100 + H)
    a, hw = _rows(rng, n, 4 * H, scale=3.0), _rows(rng, n, 4 * H, scale=3.0)
    cp = _rows(rng, n, H)
    cn, h = _rows(rng, n, H), _rows(rng, n, H)
    z = a.astype(np.float64) + hw
    i, f, g, o = _sig(z[:, :H]), _sig(z[:, H:2 * H]), np.tanh(z[:, 2 * H:3 * H]), _sig(z[:, 3 * H:])
    c = f * cp + i * g
    k.lstm_step(n, H, _p(a), _ld(a), _p(hw), _ld(hw), _p(cp), _ld(cp), _p(cn), _ld(cn), _p(h), _ld(h))
    np.testing.assert_allclose(a, np.concatenate([i, f, g, o], axis=1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(cn, c, rtol=0, atol=3e-6)
    np.testing.assert_allclose(h, o * np.tanh(c), rtol=0, atol=2e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("with_next", [False, True])
def test_lstm_step_backward_matches_float64_formulas(isa, with_next):
    k = _kernels(isa)
    n, H = 4, 37
    rng = np.random.default_rng(5)
    gates = np.concatenate([_sig(rng.standard_normal((n, H))), _sig(rng.standard_normal((n, H))),
                            np.tanh(rng.standard_normal((n, H))), _sig(rng.standard_normal((n, H)))], axis=1)
    a = _rows(rng, n, 4 * H)
    a[...] = gates
    c, cp, dy, dhn, dc = (_rows(rng, n, H) for _ in range(5))
    i, f, g, o = (a[:, j * H:(j + 1) * H].astype(np.float64) for j in range(4))
    dh = dy.astype(np.float64) + (dhn if with_next else 0.0)
    tc = np.tanh(c.astype(np.float64))
    d = dc + dh * o * (1 - tc ** 2)
    want = np.concatenate([d * g * i * (1 - i), d * cp * f * (1 - f), d * i * (1 - g ** 2),
                           dh * tc * o * (1 - o)], axis=1)
    want_dc = d * f
    k.lstm_step_backward(n, H, _p(a), _ld(a), _p(c), _ld(c), _p(cp), _ld(cp), _p(dy), _ld(dy),
                         _p(dhn) if with_next else 0, _ld(dhn), _p(dc), _ld(dc))
    np.testing.assert_allclose(a, want, rtol=0, atol=2e-6)
    np.testing.assert_allclose(dc, want_dc, rtol=0, atol=2e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bias", [False, True])
def test_gru_step_matches_float64_formulas(isa, bias):
    k = _kernels(isa)
    n, H = 3, 41
    rng = np.random.default_rng(9)
    a, gh = _rows(rng, n, 3 * H, scale=3.0), _rows(rng, n, 3 * H, scale=3.0)
    bh = rng.standard_normal(3 * H).astype(np.float32)
    hp, nh, h = (_rows(rng, n, H) for _ in range(3))
    g = gh.astype(np.float64) + (bh if bias else 0.0)
    r = _sig(a[:, :H] + g[:, :H])
    z = _sig(a[:, H:2 * H] + g[:, H:2 * H])
    nn = np.tanh(a[:, 2 * H:] + r * g[:, 2 * H:])
    k.gru_step(n, H, _p(a), _ld(a), _p(gh), _ld(gh), _p(bh) if bias else 0, _p(hp), _ld(hp), _p(nh), _ld(nh),
               _p(h), _ld(h))
    np.testing.assert_allclose(a, np.concatenate([r, z, nn], axis=1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(nh, g[:, 2 * H:], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(h, (1 - z) * nn + z * hp, rtol=0, atol=2e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("with_next", [False, True])
def test_gru_step_backward_matches_float64_formulas(isa, with_next):
    k = _kernels(isa)
    n, H = 5, 19
    rng = np.random.default_rng(11)
    a = _rows(rng, n, 3 * H)
    a[...] = np.concatenate([_sig(rng.standard_normal((n, H))), _sig(rng.standard_normal((n, H))),
                             np.tanh(rng.standard_normal((n, H)))], axis=1)
    nh, hp, dy, dhn, direct = (_rows(rng, n, H) for _ in range(5))
    d = _rows(rng, n, 3 * H)
    r, z, nn = (a[:, j * H:(j + 1) * H].astype(np.float64) for j in range(3))
    dh = dy.astype(np.float64) + ((dhn.astype(np.float64) + direct) if with_next else 0.0)
    dn = dh * (1 - z) * (1 - nn ** 2)
    dz = dh * (hp - nn) * z * (1 - z)
    dr = dn * nh * r * (1 - r)
    k.gru_step_backward(n, H, _p(a), _ld(a), _p(nh), _ld(nh), _p(hp), _ld(hp), _p(dy), _ld(dy),
                        _p(dhn) if with_next else 0, _ld(dhn), _p(direct), _ld(direct), _p(d), _ld(d))
    np.testing.assert_allclose(a, np.concatenate([dr, dz, dn], axis=1), rtol=0, atol=2e-6)
    np.testing.assert_allclose(d, np.concatenate([dr, dz, dn * r], axis=1), rtol=0, atol=2e-6)
    np.testing.assert_allclose(nh, dn * r, rtol=0, atol=2e-6)
    np.testing.assert_allclose(direct, dh * z, rtol=0, atol=2e-6)


@pytest.mark.parametrize("isa", ["avx2", "wide", "avx512"])
def test_every_copy_agrees_with_the_baseline_on_saturated_and_tiny_inputs(isa):
    base, other = _kernels("base"), _kernels(isa)
    n, H = 2, 50
    x = np.concatenate([np.linspace(-200, 200, 4 * H), np.linspace(-1e-6, 1e-6, 4 * H)]).astype(np.float32)
    out = {}
    for name, k in (("base", base), ("other", other)):
        a = x.reshape(n, 4 * H).copy()
        hw = np.zeros_like(a)
        cp = np.full((n, H), 3.0, np.float32)
        cn, h = np.empty((n, H), np.float32), np.empty((n, H), np.float32)
        k.lstm_step(n, H, _p(a), 4 * H, _p(hw), 4 * H, _p(cp), H, _p(cn), H, _p(h), H)
        assert np.isfinite(a).all() and np.isfinite(cn).all() and np.isfinite(h).all()
        out[name] = (a, cn, h)
    for u, v in zip(out["base"], out["other"]):
        np.testing.assert_allclose(u, v, rtol=0, atol=2e-7)
    a = out["base"][0]
    # the limits at the ends of the first row (-200 ... 200): sigmoid(-200) = 0, sigmoid(200) = 1,
    # tanh(100) = 1, exactly
    assert a[0, 0] == 0.0 and a[0, 4 * H - 1] == 1.0 and a[0, 3 * H - 1] == 1.0


# ---------------------------------------------------------------------------
# whole layers: the kernels against the NumPy code and the portable scans
# ---------------------------------------------------------------------------

def _layer_run(mode, path, *, layers=1, bidirectional=False, batch_first=False, bias=True, with_state=False,
               T=6, B=5, I=4, H=7, lengths=None, scale=1.0, seed=3, dtype="float32"):
    """One forward and backward through the path ("native", "numpy" or "portable"); every
    array the caller can observe. ``dtype="float64"`` runs on the same (float32) draws."""
    rng = np.random.default_rng(seed)
    D = 2 if bidirectional else 1
    extra = {}
    if mode.startswith("RNN"):  # "RNN_tanh", "RNN_relu"
        mode, extra = "RNN", {"nonlinearity": mode.split("_")[1]}
    m = getattr(xrnn, mode)(I, H, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first,
                            bias=bias, seed=seed, dtype=dtype, **extra)
    x = (rng.standard_normal((B, T, I) if batch_first else (T, B, I)) * scale).astype(np.float32).astype(dtype)
    dout = rng.standard_normal((B, T, D * H) if batch_first else (T, B, D * H)).astype(np.float32).astype(dtype)
    state = dstate = None
    if with_state:
        st = [rng.standard_normal((layers * D, B, H)).astype(np.float32).astype(dtype) for _ in range(4)]
        state, dstate = ((st[0], st[1]), (st[2], st[3])) if mode == "LSTM" else (st[0], st[2])
    kernels = native.kernels() if path == "native" else None
    with use_fast_paths(path != "portable"), native.use(kernels):
        out, hn = m(x, state, lengths=lengths) if lengths is not None else m(x, state)
        dx, dst = m.backward(dout, dstate)
    flat = lambda s: [] if s is None else (list(s) if isinstance(s, tuple) else [s])  # noqa: E731
    return [out, dx, *flat(hn), *flat(dst), *m.grads.values()]


def _agree(mode, **kw):
    if native.kernels() is None:
        pytest.skip(f"fused kernels not in use: {native.describe()}")
    nat, num, port = (_layer_run(mode, p, **kw) for p in ("native", "numpy", "portable"))
    assert len(nat) == len(num) == len(port)
    for k, (a, b, c) in enumerate(zip(nat, num, port)):
        np.testing.assert_allclose(a, c, err_msg=f"native vs portable, array {k}", **TOL32)
        np.testing.assert_allclose(b, c, err_msg=f"numpy vs portable, array {k}", **TOL32)


CELLS = ["LSTM", "GRU", "RNN_tanh", "RNN_relu"]


@pytest.mark.parametrize("mode", CELLS)
@pytest.mark.parametrize("layers,bidirectional,batch_first,bias,with_state", [
    (1, False, False, True, False),
    (2, True, False, True, True),
    (2, False, True, False, True),
    (1, True, True, False, False),
])
def test_layers_with_kernels_equal_numpy_and_portable(mode, layers, bidirectional, batch_first, bias, with_state):
    _agree(mode, layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias,
           with_state=with_state)


@pytest.mark.parametrize("mode", CELLS)
@pytest.mark.parametrize("B,H", [(13, 40), (64, 96)])  # 13 rows: products on 16 padded rows
def test_kernels_at_realistic_sizes(mode, B, H):
    _agree(mode, T=12, B=B, I=16, H=H, with_state=True)


@pytest.mark.parametrize("mode", CELLS)
def test_kernels_with_lengths(mode):
    lengths = np.array([6, 2, 5, 1, 6, 3, 4])
    _agree(mode, B=7, lengths=lengths, bidirectional=True, layers=2)


@pytest.mark.parametrize("mode", CELLS)
def test_kernels_with_saturated_gates(mode):
    """Inputs 60x the usual size: most gates sit at 0 or 1, where float32 paths differ from the
    exact result (and from each other) by up to 1e-4 in the weight gradients. So each path is
    measured against the float64 result of the same draws, and the kernels may be off by no
    more than twice the portable float32 path's own error."""
    if native.kernels() is None:
        pytest.skip(f"fused kernels not in use: {native.describe()}")
    kw = dict(scale=60.0, B=9, H=20)
    truth = _layer_run(mode, "portable", dtype="float64", **kw)
    nat, port = _layer_run(mode, "native", **kw), _layer_run(mode, "portable", **kw)
    for k, (a, p, t) in enumerate(zip(nat, port, truth)):
        assert np.isfinite(a).all(), k
        err_nat, err_port = np.abs(a - t).max(), np.abs(p - t).max()
        assert err_nat <= 2 * err_port + 2e-6, (k, err_nat, err_port)


def test_kernels_used_for_float32_only():
    k = native.kernels()
    if k is None:
        pytest.skip(native.describe())
    f32 = np.zeros((3, 4, 8), np.float32)
    assert numpy_fast._native_for(f32) is k
    assert numpy_fast._native_for(f32.astype(np.float64)) is None  # float64 keeps the NumPy code
    assert numpy_fast._native_for(f32[:, :, ::2]) is None  # rows not unit-stride
    with native.use(None):
        assert numpy_fast._native_for(f32) is None


def test_load_refuses_a_foreign_library():
    libm = ctypes.util.find_library("m")
    if libm is None:
        pytest.skip("no libm to try")
    with pytest.raises(OSError, match="not a library built from"):
        native.load(libm)
    with pytest.raises(ValueError, match="isa must be"):
        native.load(NATIVE_LIB, isa="sse9")


def test_compile_library_reuses_a_build_of_the_same_source(tmp_path):
    if not os.environ.get("CC") and subprocess.run(["which", "cc"], capture_output=True).returncode:
        pytest.skip("no cc")
    first = native.compile_library(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.compile_library(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert native.load(first).isa in ("base", "avx2", "avx512")  # never "wide" unless asked
    with pytest.raises(OSError, match="no C compiler"):
        native.compile_library(tmp_path / "x", cc="no-such-compiler-xrnn")


def _fresh(env_extra, code):
    env = {k: v for k, v in os.environ.items() if k not in ("XRNN_NATIVE", "XRNN_NATIVE_LIB")}
    env.update(env_extra)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    return r.stdout


RUN = ("import numpy as np, xrnn; from xrnn.kernels import native; "
       "m = xrnn.LSTM(3, 4, seed=0); y, _ = m(np.ones((2, 1, 3), np.float32)); "
       "print(native.describe()); print(repr(y.sum()))")


def test_switches_and_fallbacks_in_fresh_processes():
    on = _fresh({"XRNN_NATIVE_LIB": str(NATIVE_LIB)}, RUN).splitlines()
    off = _fresh({"XRNN_NATIVE": "0"}, RUN).splitlines()
    broken = _fresh({"XRNN_NATIVE_LIB": "/nonexistent/libxrnn.so"}, RUN).splitlines()
    assert on[0].startswith("fused C kernels") and str(NATIVE_LIB) in on[0]
    assert off[0].startswith("NumPy kernels") and "XRNN_NATIVE=0" in off[0]
    assert broken[0].startswith("NumPy kernels") and "could not be loaded" in broken[0]
    # the same numbers either way, to float32 rounding
    vals = [float(r[1].replace("np.float32(", "").rstrip(")")) for r in (on, off, broken)]
    assert vals[1] == vals[2] and abs(vals[0] - vals[1]) < 1e-5


def test_native_isa_picks_a_copy_or_says_why_not():
    """XRNN_NATIVE_ISA picks one of the library's copies (to compare them on one machine); a name
    that is not a copy, or a copy this CPU lacks, leaves the NumPy code running and says why."""
    lib = {"XRNN_NATIVE_LIB": str(NATIVE_LIB)}
    base = _fresh({**lib, "XRNN_NATIVE_ISA": "base"}, RUN).splitlines()
    assert base[0].startswith("fused C kernels (base)")
    bad = _fresh({**lib, "XRNN_NATIVE_ISA": "sse9"}, RUN).splitlines()
    assert bad[0].startswith("NumPy kernels") and "isa must be one of avx512, avx2, base, wide" in bad[0]
    if not native.load(NATIVE_LIB).isa == "avx512":  # a CPU without AVX-512: asking for it is refused
        lacks = _fresh({**lib, "XRNN_NATIVE_ISA": "avx512"}, RUN).splitlines()
        assert lacks[0].startswith("NumPy kernels") and "no avx512 copy" in lacks[0]
