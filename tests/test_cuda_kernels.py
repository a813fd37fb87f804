"""The fused CUDA kernels (xrnn/kernels/cuda/*.cu, driven by xrnn/kernels/cupy_fast.py).

Three layers of evidence, from the CPU up:

1. **Compile**: every shipped ``.cu`` file, and the text CuPy hands to NVRTC
   (the header pasted in), compiles with ``nvcc --ptx`` for sm_90 and defines
   every kernel the Python side launches (skipped where nvcc is missing).
2. **Host harness**: the same ``.cu`` files compiled for the CPU with
   ``-DXRNN_HOST_HARNESS`` (nvcc's host compiler, or g++ with the CUDA
   qualifiers defined empty) into a shared library. :class:`HostLauncher`
   runs each kernel's per-element function over every index through ctypes,
   and gives NumPy buffers and ``np.matmul`` for cuBLAS. The fused scans,
   cross-entropy, optimizer steps and clipping of ``cupy_fast`` then run
   **unchanged** on NumPy arrays and are compared with the portable path in
   float64 and float32: results, every buffer they write (``A``, ``Y``,
   ``C``, ``NH``), optimizer state, and arguments they must leave alone. What
   this cannot see: the GPU's parallel schedule and its math library's last
   bits, which the GPU tests below cover.
3. **GPU**: fused vs portable on CuPy for every scan, the loss, each
   optimizer, clipping and whole training steps; skipped without CuPy and a GPU.
"""

import ctypes
import itertools
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import xrnn
from xrnn import functional as F
from xrnn import optim as O
from xrnn.kernels import PORTABLE, cupy_fast, scans_for, use_fast_paths

SRC = cupy_fast.SOURCE_DIR
TOL = {"float64": dict(rtol=1e-12, atol=1e-13), "float32": dict(rtol=2e-5, atol=2e-6)}


# ---------------------------------------------------------------------------
# 1. compile with nvcc
# ---------------------------------------------------------------------------

def _nvcc():
    path = shutil.which("nvcc")
    if path is None:
        pytest.skip("nvcc is not on PATH (CI has it; the GPU machine compiles with NVRTC)")
    return path


def test_every_shipped_cu_file_is_package_data():
    shipped = sorted(f for f in os.listdir(SRC) if f.endswith((".cu", ".cuh")))
    assert shipped == sorted(cupy_fast.SOURCES + (cupy_fast.HEADER,))
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")) as f:
        text = f.read()
    assert '"kernels/cuda/*.cu"' in text and '"kernels/cuda/*.cuh"' in text


@pytest.mark.parametrize("name", cupy_fast.SOURCES)
def test_cu_file_compiles_with_nvcc(name, tmp_path):
    """The file as shipped and the text NVRTC gets (header pasted in) both compile, with every kernel."""
    nvcc = _nvcc()
    pasted = tmp_path / ("nvrtc_" + name)
    pasted.write_text(cupy_fast.source(name))
    for src in (os.path.join(SRC, name), str(pasted)):
        out = tmp_path / "k.ptx"
        r = subprocess.run([nvcc, "-arch=sm_90", "--ptx", "-fmad=false", "-std=c++14", "-I", SRC, src, "-o", str(out)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        ptx = out.read_text()
        entries = [line for line in ptx.splitlines() if ".entry" in line]
        for expr in cupy_fast.KERNEL_NAMES[name]:
            base = expr.split("<")[0].split("::")[-1]
            for ctype in ("float", "double"):
                # Itanium mangling: the name's length and text, then the type's code
                mangled = f"{len(base)}{base}I{'f' if ctype == 'float' else 'd'}E"
                assert any(mangled in e for e in entries), f"{name}: no kernel {base}<{ctype}> in the PTX"


def _nvrtc():
    """libnvrtc (from the CUDA toolkit, or the nvidia-cuda-nvrtc wheel CuPy's CUDA 13 extra brings), or skip."""
    import ctypes.util
    import glob
    import sys

    paths = [ctypes.util.find_library("nvrtc")]
    for base in sys.path:
        paths += sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib", "libnvrtc.so*")))
        paths += sorted(glob.glob(os.path.join(base, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*")))
    for p in paths:
        if p and "builtins" not in p and ".alt." not in p:
            try:
                # NVRTC opens its builtins library by name: load the one beside it first
                for b in sorted(glob.glob(os.path.join(os.path.dirname(p), "libnvrtc-builtins.so*"))):
                    if ".alt." not in b:
                        ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
                return ctypes.CDLL(p)
            except OSError:
                continue
    pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc, or a CUDA toolkit)")


@pytest.mark.parametrize("name", cupy_fast.SOURCES)
def test_nvrtc_compiles_the_text_cupy_compiles(name):
    """What CupyLauncher hands cupy.RawModule (source text, options, name expressions) compiles with NVRTC,
    and every name expression it launches resolves to a kernel; no GPU needed to compile."""
    lib = _nvrtc()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), cupy_fast.source(name).encode(), name.encode(), 0, None,
                                  None) == 0
    exprs = [n.format(T=t) for n in cupy_fast.KERNEL_NAMES[name] for t in ("float", "double")]
    try:
        for e in exprs:
            assert lib.nvrtcAddNameExpression(prog, e.encode()) == 0
        # the options CuPy 14's RawModule adds to ours: the GPU's architecture, flush-to-zero, device default
        cupy_adds = ("--gpu-architecture=compute_90", "-ftz=true", "--device-as-default-execution-space")
        opts = [o.encode() for o in cupy_fast.NVRTC_OPTIONS + cupy_adds]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        assert rc == 0, log.value.decode(errors="replace")
        for e in exprs:
            lowered = ctypes.c_char_p()
            assert lib.nvrtcGetLoweredName(prog, e.encode(), ctypes.byref(lowered)) == 0, e
            assert lowered.value, e
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


# ---------------------------------------------------------------------------
# 2. the host harness
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """The three .cu files compiled for the CPU into one shared library."""
    out = str(tmp_path_factory.mktemp("cuda_host") / "libxrnn_host.so")
    srcs = [os.path.join(SRC, s) for s in cupy_fast.SOURCES]
    tried = []  # a plain C++ compiler first (quicker; CUDA's qualifiers defined empty), else nvcc's host pass
    for cxx in ("g++", "clang++", "c++"):
        if shutil.which(cxx):
            tried.append([cxx, "-x", "c++", "-std=c++14", "-O2", "-ffp-contract=off", "-shared", "-fPIC",
                          "-DXRNN_HOST_HARNESS", "-I", SRC, *srcs, "-o", out])
            break
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        tried.append([nvcc, "-shared", "-Xcompiler", "-fPIC,-ffp-contract=off", "-fmad=false", "-O2",
                      "-DXRNN_HOST_HARNESS", "-I", SRC, *srcs, "-o", out])
    if not tried:
        pytest.skip("no nvcc and no C++ compiler to build the host harness")
    errors = []
    for cmd in tried:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode == 0:
            return ctypes.CDLL(out)
        errors.append(f"{' '.join(cmd[:1])}: {r.stderr[-2000:]}")
    pytest.fail("the host harness did not compile:\n" + "\n".join(errors))


class HostLauncher:
    """cupy_fast's launcher interface over NumPy and the host-compiled kernels."""

    def __init__(self, lib):
        self.lib = lib
        self.launches = []

    def empty(self, shape, dtype):
        return np.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype=dtype)

    def copy(self, x):
        return np.array(x, copy=True, order="C")

    def contiguous(self, x):
        return np.ascontiguousarray(x)

    def matmul(self, a, b, out):
        np.matmul(a, b, out=out)

    @staticmethod
    def ptr(x):
        return x.ctypes.data

    def table(self, values):
        return np.asarray(values, dtype=np.int64)

    def _call(self, fname, dtype, args):
        real = ctypes.c_float if dtype == "float32" else ctypes.c_double
        conv = []
        for a in args:
            if isinstance(a, np.ndarray):
                conv.append(ctypes.c_void_p(a.ctypes.data))
            elif isinstance(a, (bool, int, np.integer)):
                conv.append(ctypes.c_longlong(int(a)))
            else:
                conv.append(real(float(a)))
        fn = getattr(self.lib, f"{fname}_{'f32' if dtype == 'float32' else 'f64'}")
        fn.restype = None
        self.launches.append(fname)
        fn(*conv)

    def elementwise(self, name, dtype, n, *args):
        if n > 0:
            self._call(name, dtype, (n, *args))

    def ce_rows(self, dtype, N, V, *args):
        self._call("ce_rows", dtype, (N, V, *args))

    def norm_clip(self, dtype, n, ntensors, offsets, ptrs, inf, max_norm, total_out):
        self._call("norm_clip", dtype, (n, ntensors, offsets, ptrs, inf, max_norm, total_out))


@pytest.fixture
def host(harness):
    return HostLauncher(harness)


XP = xrnn.resolve_device("cpu").xp


def _both(scans, fn_name, base, written, dtype):
    """Run the portable and the fused scan on identical copies; compare returns and written buffers,
    and check that the other array arguments are untouched."""
    results = []
    for impl in (PORTABLE, scans):
        args = [a.copy() if isinstance(a, np.ndarray) else a for a in base]
        ret = getattr(impl, fn_name)(XP, *args)
        rets = list(ret) if isinstance(ret, tuple) else [ret]
        results.append((rets, [args[i] for i in written], args))
    (r0, w0, a0), (r1, w1, a1) = results
    assert len(r0) == len(r1)
    for k, (a, b) in enumerate(zip(r0 + w0, r1 + w1)):
        assert b.shape == a.shape and b.dtype == a.dtype, (fn_name, k)
        np.testing.assert_allclose(b, a, err_msg=f"{fn_name} output {k}", **TOL[dtype])
    for i, (a, b) in enumerate(zip(a0, a1)):
        if isinstance(a, np.ndarray) and i not in written:
            np.testing.assert_array_equal(a, b, err_msg=f"{fn_name} argument {i}")
    return a0


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T,B", [(4, 3), (1, 2), (3, 1)])
def test_fused_scans_equal_portable_on_the_host(host, dtype, reverse, T, B):
    """All six fused scans (the cupy_fast code itself) against the portable scans, every buffer written."""
    scans = cupy_fast.make_scans(lambda: host)
    rng = np.random.default_rng(0)
    H, D = 5, 2
    col = slice(H, 2 * H) if reverse else slice(0, H)

    def arr(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(dtype)

    for nl in ("tanh", "relu"):
        A, W, h0, Y = arr(T, B, H), arr(H, H), arr(B, H), np.zeros((T, B, D * H), dtype)
        fwd = _both(scans, "rnn_scan", [A, W, h0, Y, col, reverse, nl], [3], dtype)
        for dhT in (arr(B, H), None):
            _both(scans, "rnn_scan_backward", [A, fwd[3], col, W, arr(T, B, D * H), dhT, reverse, nl], [0], dtype)

    A, W, h0, c0 = arr(T, B, 4 * H, scale=2.0), arr(4 * H, H), arr(B, H), arr(B, H)
    Y, C = np.zeros((T, B, D * H), dtype), np.zeros((T, B, H), dtype)
    fwd = _both(scans, "lstm_scan", [A, W, h0, c0, Y, col, C, reverse], [0, 4, 6], dtype)
    for dhT, dcT in ((arr(B, H), arr(B, H)), (None, None), (None, arr(B, H)), (arr(B, H), None)):
        _both(scans, "lstm_scan_backward", [fwd[0], fwd[6], c0, W, arr(T, B, D * H), col, dhT, dcT, reverse], [0],
              dtype)

    A, W, b, h0 = arr(T, B, 3 * H, scale=2.0), arr(3 * H, H), arr(3 * H), arr(B, H)
    Y, NH = np.zeros((T, B, D * H), dtype), np.zeros((T, B, H), dtype)
    for bias in (b, None):
        fwd = _both(scans, "gru_scan", [A, W, bias, h0, Y, col, NH, reverse], [0, 4, 6], dtype)
        for dhT in (arr(B, H), None):
            _both(scans, "gru_scan_backward", [fwd[0], fwd[6], fwd[4], col, h0, W, arr(T, B, D * H), dhT, reverse],
                  [0, 1], dtype)
    # one fused kernel and one matrix product per step and direction: the launch count the GPU gets
    assert host.launches.count("lstm_fwd") == T and host.launches.count("gru_fwd") == 2 * T


def test_fused_scans_handle_a_strided_gradient_and_fall_back_for_float16(host):
    scans = cupy_fast.make_scans(lambda: host)
    rng = np.random.default_rng(3)
    T, B, H = 3, 2, 4
    A, W, h0, c0 = (rng.standard_normal(s) for s in ((T, B, 4 * H), (4 * H, H), (B, H), (B, H)))
    Y, C = np.zeros((T, B, H)), np.zeros((T, B, H))
    fwd = _both(scans, "lstm_scan", [A, W, h0, c0, Y, slice(0, H), C, False], [0, 4, 6], "float64")
    dY = np.transpose(rng.standard_normal((B, T, H)), (1, 0, 2))  # batch_first's gradient: rows not unit-spaced
    _both(scans, "lstm_scan_backward", [fwd[0], fwd[6], c0, W, dY, slice(0, H), None, None, False], [0], "float64")
    n = len(host.launches)
    h16 = [x.astype("float16") for x in (A, W, h0, c0)]
    scans.lstm_scan(XP, h16[0], h16[1], h16[2], h16[3], Y.astype("float16"), slice(0, H), C.astype("float16"), False)
    assert len(host.launches) == n  # float16: the portable scan ran, no kernel


def test_fused_lstm_saturated_gates(host):
    """Pre-activations far outside exp's range: the gates are exactly 0 or 1, nothing overflows."""
    scans = cupy_fast.make_scans(lambda: host)
    rng = np.random.default_rng(1)
    T, B, H = 3, 2, 4
    A = (rng.standard_normal((T, B, 4 * H)) * 200).astype("float32")
    W = rng.standard_normal((4 * H, H)).astype("float32")
    z = np.zeros((B, H), "float32")
    out = _both(scans, "lstm_scan", [A, W, z, z, np.zeros((T, B, H), "float32"), slice(0, H),
                                     np.zeros((T, B, H), "float32"), False], [0, 4, 6], "float32")
    assert np.all(np.isfinite(out[0]))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("ignore", [None, -1, 2])
def test_fused_cross_entropy_equals_portable_on_the_host(host, dtype, ignore):
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((3, 4, 7)) * 3).astype(dtype)
    targets = rng.integers(0, 7, size=(3, 4))
    if ignore is not None:
        targets[0, 1] = targets[2, 3] = ignore
    ref_loss, ref_grad = F.softmax_cross_entropy(logits, targets, ignore_index=ignore)
    loss, grad = cupy_fast.softmax_cross_entropy(host, XP, logits, targets, ignore)
    assert host.launches == ["ce_rows"]
    assert grad.shape == logits.shape and grad.dtype == logits.dtype
    np.testing.assert_allclose(grad, ref_grad, **TOL[dtype])
    np.testing.assert_allclose(loss, ref_loss, **TOL[dtype])
    # the loss against an independent float64 computation
    lp = logits.astype("float64") - np.log(np.sum(np.exp(logits.astype("float64")), axis=-1, keepdims=True))
    keep = np.ones(targets.shape, bool) if ignore is None else targets != ignore
    nll = -np.take_along_axis(lp, np.where(keep, targets, 0)[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(loss, nll[keep].mean(), rtol=1e-5 if dtype == "float32" else 1e-12)


def test_fused_cross_entropy_all_ignored_and_huge_logits(host):
    logits = np.array([[1e30, -1e30, 0.0], [3.0, 2.0, 1.0]], "float32")
    t = np.array([0, 1])
    ref = F.softmax_cross_entropy(logits, t)
    got = cupy_fast.softmax_cross_entropy(host, XP, logits, t, None)
    for a, b in zip(ref, got):
        np.testing.assert_allclose(b, a, rtol=1e-6)
    t_ign = np.array([-1, -1])
    loss, grad = cupy_fast.softmax_cross_entropy(host, XP, logits, t_ign, -1)
    assert float(loss) == 0.0 and not np.any(grad)


class _Model:
    """parameters() and grads for the optimizers: a few arrays of different shapes."""

    def __init__(self, rng, dtype):
        shapes = {"w": (4, 3), "b": (4,), "v": (2, 5), "s": (1,)}
        self.p = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
        self.grads = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}

    def parameters(self):
        return self.p


OPTIMIZERS = [
    (O.SGD, dict(lr=0.1)),
    (O.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    (O.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (O.Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.2)),
    (O.RMSprop, dict(lr=0.01, alpha=0.9)),
    (O.RMSprop, dict(lr=0.01, alpha=0.9, centered=True, momentum=0.5, weight_decay=0.1)),
    (O.Adam, dict(lr=0.01)),
    (O.Adam, dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True)),
    (O.AdamW, dict(lr=0.01)),
    (O.AdamW, dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(OPTIMIZERS)])
def test_fused_optimizers_equal_portable_on_the_host(host, cls, kw, dtype):
    """Three steps with fresh gradients each: parameters and every state slot, bit for bit in float64."""
    models = [_Model(np.random.default_rng(6), dtype) for _ in range(2)]
    opts = [cls(m, **kw) for m in models]
    rng = np.random.default_rng(8)
    for step in range(1, 4):
        new = {k: rng.standard_normal(g.shape).astype(dtype) for k, g in models[0].grads.items()}
        for m in models:
            for k in m.grads:
                m.grads[k][...] = new[k]
        opts[0].step()  # portable (NumPy device)
        params = models[1].parameters()
        assert cupy_fast.optimizer_step(host, opts[1], params, models[1].grads, step)
        opts[1].steps = step
        assert host.launches[-1].endswith("_step") and len(host.launches) == step  # one launch for all parameters
        for k in models[0].p:
            a, b = models[0].p[k], models[1].p[k]
            if dtype == "float64":
                np.testing.assert_array_equal(b, a, err_msg=f"step {step} {k}")
            else:
                np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7, err_msg=f"step {step} {k}")
        assert opts[0].state.keys() == opts[1].state.keys()
        for k in opts[0].state:
            assert opts[0].state[k].keys() == opts[1].state[k].keys()
            for s in opts[0].state[k]:
                np.testing.assert_allclose(opts[1].state[k][s], opts[0].state[k][s], rtol=1e-6, atol=1e-7)
    sd = opts[1].state_dict()  # the fused state round-trips through the portable state dict
    opts[0].load_state_dict(sd)


def test_fused_optimizer_declines_subclasses_and_mixed_dtypes(host):
    class MyAdam(O.Adam):
        pass

    m = _Model(np.random.default_rng(0), "float64")
    assert not cupy_fast.optimizer_step(host, MyAdam(m), m.p, m.grads, 1)
    m.grads["w"] = m.grads["w"].astype("float32")
    assert not cupy_fast.optimizer_step(host, O.Adam(m), m.p, m.grads, 1)
    assert host.launches == []


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("p", [2.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_fused_clip_grad_norm_equals_portable_on_the_host(host, dtype, p, max_norm):
    rng = np.random.default_rng(9)
    grads = [rng.standard_normal(s).astype(dtype) for s in ((3, 4), (5,), (2, 2, 2))]
    ref = [g.copy() for g in grads]
    total_ref = O.clip_grad_norm(ref, max_norm, p)
    total = cupy_fast.clip_grad_norm(host, XP, grads, max_norm, p)
    assert host.launches == ["norm_clip"] and total.shape == () and total.dtype == grads[0].dtype
    np.testing.assert_allclose(total, total_ref, **TOL[dtype])
    expected = np.sqrt(sum(np.sum(g.astype("float64") ** 2) for g in ref)) if p == 2 else None
    if expected is not None and max_norm > 1:  # unclipped: the total is the plain 2-norm
        np.testing.assert_allclose(total, expected, rtol=1e-6)
    for a, b in zip(ref, grads):
        np.testing.assert_allclose(b, a, **TOL[dtype])
    assert cupy_fast.clip_grad_norm(host, XP, grads, 1.0, 3.0) is None  # other p: portable


@pytest.fixture
def fused_on_cpu(host, monkeypatch):
    """Route NumPy devices through the CuPy path's code (scans, loss, optimizer, clipping) over the host
    harness, by the same hooks modules/functional/optim call on CuPy; ``use_fast_paths(False)`` still
    selects the portable path."""
    import types

    import xrnn.kernels as K
    import xrnn.modules as M

    scans = cupy_fast.make_scans(lambda: host)
    shim = types.SimpleNamespace(launcher=lambda: host, softmax_cross_entropy=cupy_fast.softmax_cross_entropy,
                                 optimizer_step=cupy_fast.optimizer_step, clip_grad_norm=cupy_fast.clip_grad_norm)
    monkeypatch.setattr(K, "fused_for", lambda dev: shim if K.fast_paths_enabled() and dev.library == "numpy" else None)
    monkeypatch.setattr(M, "scans_for", lambda dev: scans if K.fast_paths_enabled() else PORTABLE)
    return host


def _layer_results(mode, nl, dtype, layers, bidirectional, batch_first, with_state, T, B, device="cpu"):
    """One forward and backward of a layer from fixed seeds: every array the caller can observe."""
    rng = np.random.default_rng(7)
    I, H = 4, 6
    D = 2 if bidirectional else 1
    kw = {"nonlinearity": nl} if mode == "RNN" else {}
    m = getattr(xrnn, mode)(I, H, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first,
                            dtype=dtype, seed=3, device=device, **kw)
    dev = m.device
    if B is None:
        xs, outs, st = (T, I), (T, D * H), (layers * D, H)
    elif batch_first:
        xs, outs, st = (B, T, I), (B, T, D * H), (layers * D, B, H)
    else:
        xs, outs, st = (T, B, I), (T, B, D * H), (layers * D, B, H)
    x = dev.asarray(rng.standard_normal(xs), dtype)
    dout = dev.asarray(rng.standard_normal(outs), dtype)
    state = dstate = None
    if with_state:
        h0, dh = (dev.asarray(rng.standard_normal(st), dtype) for _ in range(2))
        if mode == "LSTM":
            c0, dc = (dev.asarray(rng.standard_normal(st), dtype) for _ in range(2))
            state, dstate = (h0, c0), (dh, dc)
        else:
            state, dstate = h0, dh
    out, stN = m(x, state)
    dx, dst = m.backward(dout, dstate)

    def flat(v):
        return [] if v is None else ([a for a in v if a is not None] if isinstance(v, tuple) else [v])

    return [xrnn.to_numpy(a) for a in [out, dx, *flat(stN), *flat(dst), *m.grads.values()]]


@pytest.mark.parametrize("mode,nl", [("RNN", "tanh"), ("RNN", "relu"), ("LSTM", None), ("GRU", None)])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fused_path_inside_the_layers_equals_portable(fused_on_cpu, mode, nl, dtype):
    """Every layer option through modules.py with the CuPy path's scans (host-compiled kernels) vs portable:
    bidirectional columns, batch_first's strided gradients, unbatched input, given states, 1 and 2 layers."""
    for layers, bi, bf, ws, (T, B) in itertools.product((1, 2), (False, True), (False, True), (False, True),
                                                        ((5, 3), (1, 2), (3, None))):
        with use_fast_paths(False):
            ref = _layer_results(mode, nl, dtype, layers, bi, bf, ws, T, B)
        n = len(fused_on_cpu.launches)
        got = _layer_results(mode, nl, dtype, layers, bi, bf, ws, T, B)
        assert len(fused_on_cpu.launches) > n  # the fused kernels ran
        for a, b in zip(ref, got):
            np.testing.assert_allclose(b, a, **TOL[dtype])


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_whole_training_steps_on_the_fused_path_equal_portable(fused_on_cpu, cell):
    """CharLM steps (forward, loss, BPTT, clipping, Adam) through the public API, fused vs portable, float64;
    and the launch budget: one kernel per layer and time step each way, one for the loss, one for the
    clipping and one for the optimizer."""
    from xrnn.backend import trusted_ids

    T, B, L = 6, 3, 2
    results = []
    for fast in (False, True):
        model = xrnn.CharLM(vocab_size=11, hidden_size=8, num_layers=L, cell=cell, seed=0, dtype="float64")
        opt = O.Adam(model, lr=1e-2)
        rng = np.random.default_rng(0)
        losses = []
        with use_fast_paths(fast), trusted_ids():
            for _ in range(3):
                x = model.device.asarray(rng.integers(0, 11, size=(B, T)), "int64")
                y = model.device.asarray(rng.integers(0, 11, size=(B, T)), "int64")
                fused_on_cpu.launches.clear()
                opt.zero_grad()
                logits, _ = model(x)
                loss, dlogits = F.softmax_cross_entropy(logits, y)
                model.backward(dlogits)
                norm = O.clip_grad_norm(model, 0.5)  # small: the clipping really scales
                opt.step()
                losses.append((float(loss), float(norm)))
        results.append((losses, [np.array(p) for p in model.parameters().values()]))
        if fast:
            kinds = {"lstm": "lstm", "gru": "gru", "rnn": "rnn"}[cell]
            launched = fused_on_cpu.launches
            assert launched.count(f"{kinds}_fwd") == L * T and launched.count(f"{kinds}_bwd") == L * T
            assert launched.count("ce_rows") == 1 and launched.count("norm_clip") == 1
            assert launched.count("adam_step") == 1
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(b, a, rtol=1e-11, atol=1e-13)


def test_every_kernel_the_python_side_launches_has_a_name_expression(host):
    """CupyLauncher finds each launched kernel's file and NVRTC name expression (the names the host run used)."""
    m = _Model(np.random.default_rng(0), "float32")
    for cls, kw in OPTIMIZERS:
        cupy_fast.optimizer_step(host, cls(m, **kw), m.p, m.grads, 1)
    cupy_fast.softmax_cross_entropy(host, XP, np.zeros((2, 3), "float32"), np.zeros(2, "int64"), None)
    scans = cupy_fast.make_scans(lambda: host)
    z = np.zeros
    scans.gru_scan_backward(XP, z((2, 1, 6)), z((2, 1, 2)), z((2, 1, 2)), slice(0, 2), z((1, 2)), z((6, 2)),
                            z((2, 1, 2)), None, False)
    scans.lstm_scan(XP, z((2, 1, 8)), z((8, 2)), z((1, 2)), z((1, 2)), z((2, 1, 2)), slice(0, 2), z((2, 1, 2)), False)
    launched = set(host.launches) - {"norm_clip"} | {"norm_partials", "norm_clip", "rnn_fwd", "rnn_bwd", "lstm_bwd",
                                                     "gru_fwd"}
    assert {"sgd_step", "adagrad_step", "rmsprop_step", "adam_step", "ce_rows", "gru_bwd", "add",
            "lstm_fwd"} <= launched
    for name in launched:
        for dt, ctype in (("float32", "float"), ("float64", "double")):
            file, expr = cupy_fast.expression(name, dt)
            assert expr in [n.format(T=ctype) for n in cupy_fast.KERNEL_NAMES[file]]
            assert f"{name}<{ctype}>" in expr


def test_dispatch_sends_only_cupy_to_the_fused_path():
    from xrnn.kernels import fused_clip_grad_norm, fused_for, fused_optimizer_step

    cpu = xrnn.resolve_device("cpu")
    assert fused_for(cpu) is None and scans_for(cpu) is not cupy_fast.SCANS
    assert fused_clip_grad_norm([np.ones(3)], 1.0, 2.0) is None
    m = _Model(np.random.default_rng(0), "float64")
    assert fused_optimizer_step(O.Adam(m), m.p, m.grads, 1) is False


def test_cuda_fused_signatures_match_portable():
    import inspect

    for name in ("rnn_scan", "rnn_scan_backward", "lstm_scan", "lstm_scan_backward", "gru_scan", "gru_scan_backward"):
        assert inspect.signature(getattr(cupy_fast.SCANS, name)).parameters.keys() == \
            inspect.signature(getattr(F, name)).parameters.keys(), name


def test_gpu_check_script_dry_run(tmp_path):
    """benchmarks/gpu_check.sh: valid bash, and its four stages' plumbing runs with the CPU standing in."""
    pytest.importorskip("torch")  # the bench stage's torch rows
    if shutil.which("timeout") is None:
        pytest.skip("coreutils' timeout is missing")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    header = open(script).read()
    for needed in ("pip download", "--no-index", "--find-links", "array-api-compat", "array-api-strict", "8 minutes"):
        assert needed in header, needed
    env = dict(os.environ, PYTHON=sys.executable, XRNN_GPU_CHECK_OUT=str(tmp_path))
    r = subprocess.run(["bash", script, "--dry-run"], capture_output=True, text=True, env=env, cwd=root, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    (run,) = list(tmp_path.iterdir())
    summary = (run / "summary.md").read_text()
    for stage in ("1-tests", "2-equality", "3-train", "4-bench"):
        assert f"| {stage} | passed |" in summary, summary
    assert "DRY RUN" in summary and "validation loss" in summary
    md = (run / "bench" / "latest-gpu.md").read_text()
    assert "| xrnn fused | xrnn portable | torch cuDNN | xrnn NumPy (CPU) |" in md
    assert md.count("| LSTM | train |") == 2 and md.count("| GRU | forward |") == 2  # the dry run's 2 shapes


# ---------------------------------------------------------------------------
# 3. on a GPU: fused against portable, both on CuPy
# ---------------------------------------------------------------------------

@pytest.fixture
def cuda():
    """cuda:0; skipped without CuPy or a GPU, unless XRNN_REQUIRE_GPU=1 (benchmarks/gpu_check.sh) makes that a
    failure."""
    required = os.environ.get("XRNN_REQUIRE_GPU", "") not in ("", "0")
    try:
        import cupy  # noqa: F401

        return xrnn.resolve_device("cuda:0")
    except (ImportError, xrnn.errors.BackendUnavailableError) as e:
        if required:
            pytest.fail(f"XRNN_REQUIRE_GPU is set but there is no usable GPU: {e}")
        pytest.skip(f"no CuPy/CUDA GPU: {e}")


@pytest.mark.parametrize("mode,nl", [("RNN", "tanh"), ("RNN", "relu"), ("LSTM", None), ("GRU", None)])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gpu_fused_layers_equal_portable(cuda, mode, nl, dtype):
    assert scans_for(cuda) is cupy_fast.SCANS
    for layers, bi, bf, ws, (T, B) in itertools.product((1, 2), (False, True), (False, True), (False, True),
                                                        ((5, 3), (1, 2), (3, None))):
        with use_fast_paths(False):
            ref = _layer_results(mode, nl, dtype, layers, bi, bf, ws, T, B, device=cuda.name)
        got = _layer_results(mode, nl, dtype, layers, bi, bf, ws, T, B, device=cuda.name)
        for a, b in zip(ref, got):
            np.testing.assert_allclose(b, a, rtol=1e-5 if dtype == "float32" else 1e-11,
                                       atol=1e-6 if dtype == "float32" else 1e-12)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("reverse", [False, True])
def test_gpu_fused_scans_write_the_portable_caches(cuda, dtype, reverse):
    """Scan level on the GPU: returns and every buffer written (A, Y, C, NH) equal the portable scans';
    arguments that are not outputs stay untouched."""
    import cupy

    rng = np.random.default_rng(0)
    T, B, H, D = 4, 3, 5, 2
    col = slice(H, 2 * H) if reverse else slice(0, H)
    tol = dict(rtol=1e-11, atol=1e-12) if dtype == "float64" else dict(rtol=1e-5, atol=1e-6)

    def arr(*shape, scale=1.0):
        return cupy.asarray((rng.standard_normal(shape) * scale).astype(dtype))

    def both(fn, base, written):
        res = []
        for impl in (PORTABLE, cupy_fast.SCANS):
            args = [a.copy() if isinstance(a, cupy.ndarray) else a for a in base]
            with cuda:
                ret = getattr(impl, fn)(cuda.xp, *args)
            rets = list(ret) if isinstance(ret, tuple) else [ret]
            res.append((rets, [args[i] for i in written], args))
        (r0, w0, a0), (r1, w1, a1) = res
        for k, (a, b) in enumerate(zip(r0 + w0, r1 + w1)):
            np.testing.assert_allclose(cupy.asnumpy(b), cupy.asnumpy(a), err_msg=f"{fn} output {k}", **tol)
        for i, (a, b) in enumerate(zip(a0, a1)):
            if isinstance(a, cupy.ndarray) and i not in written:
                np.testing.assert_array_equal(cupy.asnumpy(b), cupy.asnumpy(a), err_msg=f"{fn} argument {i}")
        return a0

    for nl in ("tanh", "relu"):
        A, W, h0, Y = arr(T, B, H), arr(H, H), arr(B, H), cupy.zeros((T, B, D * H), dtype)
        fwd = both("rnn_scan", [A, W, h0, Y, col, reverse, nl], [3])
        for dhT in (arr(B, H), None):
            both("rnn_scan_backward", [A, fwd[3], col, W, arr(T, B, D * H), dhT, reverse, nl], [0])
    A, W, h0, c0 = arr(T, B, 4 * H, scale=2.0), arr(4 * H, H), arr(B, H), arr(B, H)
    Y, C = cupy.zeros((T, B, D * H), dtype), cupy.zeros((T, B, H), dtype)
    fwd = both("lstm_scan", [A, W, h0, c0, Y, col, C, reverse], [0, 4, 6])
    for dhT, dcT in ((arr(B, H), arr(B, H)), (None, None), (None, arr(B, H))):
        both("lstm_scan_backward", [fwd[0], fwd[6], c0, W, arr(T, B, D * H), col, dhT, dcT, reverse], [0])
    A, W, b, h0 = arr(T, B, 3 * H, scale=2.0), arr(3 * H, H), arr(3 * H), arr(B, H)
    Y, NH = cupy.zeros((T, B, D * H), dtype), cupy.zeros((T, B, H), dtype)
    for bias in (b, None):
        fwd = both("gru_scan", [A, W, bias, h0, Y, col, NH, reverse], [0, 4, 6])
        for dhT in (arr(B, H), None):
            both("gru_scan_backward", [fwd[0], fwd[6], fwd[4], col, h0, W, arr(T, B, D * H), dhT, reverse], [0, 1])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("ignore", [None, -1])
def test_gpu_fused_cross_entropy_equals_portable(cuda, dtype, ignore):
    rng = np.random.default_rng(2)
    logits_h = (rng.standard_normal((6, 5, 300)) * 4).astype(dtype)  # V above one block of threads
    t_h = rng.integers(0, 300, size=(6, 5))
    if ignore is not None:
        t_h[1, 2] = ignore
    logits, t = cuda.asarray(logits_h, dtype), cuda.asarray(t_h, "int64")
    res = []
    for fast in (False, True):
        with use_fast_paths(fast):
            res.append(F.softmax_cross_entropy(logits, t, ignore_index=ignore))
    tol = TOL[dtype] if dtype == "float64" else dict(rtol=1e-5, atol=1e-7)
    for a, b in zip(*res):
        np.testing.assert_allclose(xrnn.to_numpy(b), xrnn.to_numpy(a), **tol)


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(OPTIMIZERS)])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gpu_fused_optimizers_and_clipping_equal_portable(cuda, cls, kw, dtype):
    runs = []
    for fast in (False, True):
        m = xrnn.LSTM(3, 4, num_layers=2, device=cuda.name, dtype=dtype, seed=1)
        opt = cls(m, **kw)
        rng = np.random.default_rng(5)
        totals = []
        with use_fast_paths(fast):
            for _ in range(3):
                for g in m.grads.values():
                    g[...] = cuda.asarray(rng.standard_normal(tuple(g.shape)) * 3, dtype)
                totals.append(O.clip_grad_norm(m, 1.0))
                opt.step()
        runs.append(([xrnn.to_numpy(p) for p in m.parameters().values()], totals))
    tol = dict(rtol=1e-11, atol=1e-12) if dtype == "float64" else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(runs[0][0], runs[1][0]):
        np.testing.assert_allclose(b, a, **tol)
    for a, b in zip(runs[0][1], runs[1][1]):
        np.testing.assert_allclose(xrnn.to_numpy(b), xrnn.to_numpy(a), **tol)


def test_gpu_fused_training_steps_equal_portable_and_do_not_sync(cuda):
    """Whole CharLM training steps through the Trainer's step code: fused vs portable."""
    import cupyx

    from xrnn.backend import trusted_ids

    losses = []
    for fast in (False, True):
        model = xrnn.CharLM(vocab_size=11, hidden_size=16, num_layers=2, cell="lstm", device=cuda.name, seed=0,
                            dtype="float64")
        opt = O.Adam(model, lr=1e-2)
        rng = np.random.default_rng(0)
        x = cuda.asarray(rng.integers(0, 11, size=(8, 4)), "int64")
        y = cuda.asarray(rng.integers(0, 11, size=(8, 4)), "int64")
        out = []
        with use_fast_paths(fast):
            for step in range(3):
                opt.zero_grad()
                with trusted_ids():
                    if fast and step == 2:  # warmed up: the fused step reads nothing back from the GPU
                        with cupyx.allow_synchronize(False):
                            loss = _charlm_step(model, opt, x, y)
                    else:
                        loss = _charlm_step(model, opt, x, y)
                out.append(xrnn.to_numpy(loss))
        losses.append((out, [xrnn.to_numpy(p) for p in model.parameters().values()]))
    np.testing.assert_allclose(losses[1][0], losses[0][0], rtol=1e-11)
    for a, b in zip(losses[0][1], losses[1][1]):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12)


def _charlm_step(model, opt, x, y):
    logits, _ = model(x)
    loss, dlogits = F.softmax_cross_entropy(logits, y)
    model.backward(dlogits)
    O.clip_grad_norm(model, 5.0)
    opt.step()
    return loss
