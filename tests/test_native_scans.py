"""The whole-sequence C scans (xrnn/kernels/cpu/scan_kernels.h) and what they stand on: the
packed product kernel, the weight packing, and the threads that split a batch's rows.

The product is checked against float64 products by NumPy (an independent reference) at edge
sizes: rows not a multiple of the 6-row tile, columns not a multiple of the 16-column panel, k
over one 512 block, any strides. Whole layers on the scans are checked against the NumPy code
and the portable scans in test_native.py; here, that a row's result does not depend on how
the rows are split (bit for bit, for 1 to 5 threads, on OpenBLAS's threads and on xrnn's own
pool, from two Python threads at once, and in a forked child).
"""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xrnn
from xrnn import threads as xthreads
from xrnn.kernels import native, numpy_fast

from conftest import NATIVE_LIB, NATIVE_WHY
from conftest import native_kernels as _kernels

pytestmark = pytest.mark.skipif(NATIVE_LIB is None, reason=f"no fused CPU kernels: {NATIVE_WHY}")

ISAS = ["base", "avx2", "wide", "avx512"]  # a copy this CPU lacks skips
CELLS = ["LSTM", "GRU", "RNN_tanh", "RNN_relu"]


def _p(x):
    return x.ctypes.data


@pytest.fixture
def restore_threads():
    """Put the scans' thread count and pool back after a test that changes them."""
    before = native.threads()
    blas = xthreads.blas_threads()
    k = native.kernels()
    yield
    native.set_threads(before)
    if blas is not None:
        for _, setter, _ in xthreads._loaded_blas():
            setter(blas)
    if k is not None:
        k.use_blas_threads(True)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,N,K", [(1, 1, 1), (5, 16, 7), (6, 33, 40), (7, 48, 512), (13, 20, 1100), (2, 7, 28)])
@pytest.mark.parametrize("backward", [False, True])
def test_packed_product_matches_float64(isa, m, N, K, backward):
    """C = A @ B for B packed from W (forward: B = W^T, W (N, K); backward: B = W, W (K, N)), A with
    a padded row stride, C written in its (m, N) block only."""
    k = _kernels(isa)
    rng = np.random.default_rng(m * 1000 + N * 10 + K)
    A_full = rng.standard_normal((m, K + 3)).astype(np.float32)
    A = A_full[:, :K]  # (m, K), row stride K + 3
    W = rng.standard_normal((K, N) if backward else (N, K)).astype(np.float32)
    B = W.astype(np.float64) if backward else W.T.astype(np.float64)  # (K, N)
    P = numpy_fast.pack_weight(k, W, backward=backward)
    C_full = np.full((m + 2, N + 5), 7.0, dtype=np.float32)  # a border that must stay 7
    k.gemm_packed(m, N, K, _p(A), K + 3, _p(P), _p(C_full), N + 5)
    want = A.astype(np.float64) @ B
    np.testing.assert_allclose(C_full[:m, :N], want, rtol=1e-5, atol=1e-6 * K)
    assert (C_full[:m, N:] == 7.0).all() and (C_full[m:] == 7.0).all()


@pytest.mark.parametrize("layout", ["C", "F", "strided"])
def test_packing_takes_any_strides(layout):
    k = native.kernels()
    rng = np.random.default_rng(4)
    W = rng.standard_normal((50, 37)).astype(np.float32)
    Wl = {"C": W, "F": np.asfortranarray(W), "strided": np.repeat(W, 2, axis=1)[:, ::2]}[layout]
    assert np.array_equal(Wl, W)
    for backward in (False, True):
        np.testing.assert_array_equal(numpy_fast.pack_weight(k, Wl, backward), numpy_fast.pack_weight(k, W, backward))
    # the panels hold W^T: panel p, row k, column j is W[16 p + j, k], zero past the 50 rows
    P = numpy_fast.pack_weight(k, W).reshape(4, 37, 16)  # ceil(50/16) panels of (K, 16)
    Bt = np.zeros((64, 37), dtype=np.float32)
    Bt[:50] = W
    np.testing.assert_array_equal(P, Bt.reshape(4, 16, 37).transpose(0, 2, 1))


def _layer(mode, *, B=37, T=9, I=11, H=45, lengths=None, seed=5):
    """Every array one forward and backward of a bidirectional 2-layer layer produces."""
    extra = {}
    if mode.startswith("RNN"):
        mode, extra = "RNN", {"nonlinearity": mode.split("_")[1]}
    m = getattr(xrnn, mode)(I, H, num_layers=2, bidirectional=True, seed=seed, **extra)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    dout = rng.standard_normal((T, B, 2 * H)).astype(np.float32)
    out, hn = m(x, lengths=lengths)
    dx, dst = m.backward(dout)
    flat = lambda s: list(s) if isinstance(s, tuple) else [s]  # noqa: E731
    return [out, dx, *flat(hn), *flat(dst), *m.grads.values()]


@pytest.mark.parametrize("mode", CELLS)
def test_scans_equal_for_every_thread_count_and_pool(mode, restore_threads):
    """Rows are independent and each row's arithmetic is the same wherever it runs: every split
    gives the same bits, with and without lengths= (whose segments have fewer rows)."""
    k = native.kernels()
    lengths = np.random.default_rng(1).integers(1, 10, size=37)
    for lens in (None, lengths):
        native.set_threads(1)
        ref = _layer(mode, lengths=lens)
        k.use_blas_threads(False)  # xrnn's own pool, any thread count
        for n in (2, 3, 5):
            native.set_threads(n)
            for a, b in zip(_layer(mode, lengths=lens), ref):
                np.testing.assert_array_equal(a, b)
        assert k.pool_workers() >= 1  # the pool did start workers
        if k.use_blas_threads(True) == "OpenBLAS":  # OpenBLAS's threads (the suite runs its BLAS on 1)
            xthreads.set_threads(2)  # NumPy's own products on 2 threads may round differently: a new reference
            native.set_threads(1)
            ref2 = _layer(mode, lengths=lens)
            native.set_threads(2)
            for a, b in zip(_layer(mode, lengths=lens), ref2):
                np.testing.assert_array_equal(a, b)
            for _, setter, _ in xthreads._loaded_blas():
                setter(1)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("isa", ["avx2", "wide", "avx512"])
def test_scans_in_every_instruction_set_agree(mode, isa):
    base, other = _kernels("base"), _kernels(isa)
    with native.use(base):
        a = _layer(mode)
    with native.use(other):
        b = _layer(mode)
    for u, v in zip(a, b):
        np.testing.assert_allclose(u, v, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("mode", CELLS)
def test_sixteen_float_vectors_compute_each_element_as_eight_do(mode):
    """The AVX-512 copy's source (tiles of 6 rows by 32 columns over two panels, 16-float vectors),
    compiled for AVX2 ("wide"), runs every multiply-add of every element in the order the AVX2 copy
    does: whole layers, lengths= batches and products at panel edges agree bit for bit (for k up to
    256, its block; 512 in the AVX2 copy). Where the CPU has AVX-512 its own copy is held to float32
    rounding."""
    avx2, wide = _kernels("avx2"), _kernels("wide")
    lengths = np.random.default_rng(7).integers(1, 10, size=37)
    for lens in (None, lengths):
        with native.use(avx2):
            a = _layer(mode, lengths=lens, H=53)  # 4H = 212: 13 panels and a partial one, an odd count
        with native.use(wide):
            b = _layer(mode, lengths=lens, H=53)
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
    rng = np.random.default_rng(3)
    for m, N, K in ((1, 16, 5), (7, 33, 200), (13, 48, 256), (6, 80, 256), (5, 49, 600)):
        A = rng.standard_normal((m, K)).astype(np.float32)
        P = numpy_fast.pack_weight(avx2, rng.standard_normal((N, K)).astype(np.float32))
        out = [np.full((m, N), np.nan, np.float32) for _ in range(2)]
        avx2.gemm_packed(m, N, K, _p(A), K, _p(P), _p(out[0]), N)
        wide.gemm_packed(m, N, K, _p(A), K, _p(P), _p(out[1]), N)
        if K <= 256:
            np.testing.assert_array_equal(out[0], out[1])
        else:  # k blocks of 256 against 512: the partial sums meet in another order
            np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=1e-5)
    try:
        avx512 = native.load(NATIVE_LIB, isa="avx512")
    except OSError:
        return
    with native.use(avx512):
        c = _layer(mode, H=53)
    with native.use(avx2):
        a = _layer(mode, H=53)
    for u, v in zip(a, c):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


def test_scans_from_two_python_threads_at_once(restore_threads):
    """Two Python threads (the GIL is released in the kernels): one runs on the pool, the other,
    finding it busy, runs its parts itself; both get the single-threaded results."""
    k = native.kernels()
    native.set_threads(1)
    ref = {mode: _layer(mode, B=40) for mode in ("LSTM", "GRU")}
    k.use_blas_threads(False)
    native.set_threads(3)
    bad = []

    def work(mode):
        for _ in range(15):
            for a, b in zip(_layer(mode, B=40), ref[mode]):
                if not np.array_equal(a, b):
                    bad.append(mode)
                    return

    ts = [threading.Thread(target=work, args=(m,)) for m in ("LSTM", "GRU")]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not bad


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_pool_starts_again_in_a_forked_child():
    """A child forked after the pool started has no workers; its scans start its own."""
    code = r"""
import os, sys, numpy as np
sys.path.insert(0, "tests")
from xrnn.kernels import native
from test_native_scans import _layer
k = native.kernels(); k.use_blas_threads(False); native.set_threads(3)
ref = _layer("LSTM")
assert k.pool_workers() >= 1
pid = os.fork()
if pid == 0:
    ok = all(np.array_equal(a, b) for a, b in zip(_layer("LSTM"), ref)) and k.pool_workers() >= 1
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    env = dict(os.environ, XRNN_NATIVE_LIB=str(NATIVE_LIB), PYTHONPATH=os.getcwd())
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_thread_count_follows_set_threads(restore_threads):
    xthreads.set_threads(3)
    assert native.threads() == 3
    native.set_threads(0)
    assert native.threads() == 1  # at least one


def test_a_layers_segments_share_one_packed_weight():
    """forward_weight / backward_weight attach the packed weight that every segment's scan uses
    (packed once per layer and direction); a plain array, or a view of one, is packed on the spot."""
    k = native.kernels()
    W = np.random.default_rng(2).standard_normal((4 * 9, 9)).astype(np.float32)
    fw, bw = numpy_fast.forward_weight(W, 10), numpy_fast.backward_weight(W)
    np.testing.assert_array_equal(fw, W)
    np.testing.assert_array_equal(numpy_fast._packed_for(k, fw), numpy_fast.pack_weight(k, W))
    np.testing.assert_array_equal(numpy_fast._packed_for(k, bw, backward=True), numpy_fast.pack_weight(k, W, True))
    assert numpy_fast._packed_for(k, fw) is fw.packed[False]
    assert numpy_fast._packed_for(k, fw, backward=True) is not fw.packed[False]  # the other direction's layout
    assert getattr(fw[1:], "packed", None) is None


@pytest.mark.parametrize("m,N,K", [(1, 2048, 64), (3, 200, 33), (8, 512, 100), (40, 130, 70)])
def test_threaded_product_equals_the_single_threaded_one(m, N, K, restore_threads):
    """The sampler's product: rows split over the threads, or (too few rows) the 16-column panels;
    either way each element is computed as on one thread, so the bits agree."""
    k = native.kernels()
    rng = np.random.default_rng(m + N + K)
    A = rng.standard_normal((m, K)).astype(np.float32)
    W = rng.standard_normal((N, K)).astype(np.float32)
    P = numpy_fast.pack_weight(k, W)
    want = np.zeros((m, N), dtype=np.float32)
    k.gemm_packed(m, N, K, _p(A), K, _p(P), _p(want), N)
    np.testing.assert_allclose(want, A.astype(np.float64) @ W.T.astype(np.float64), rtol=1e-5, atol=1e-6 * K)
    for pool in (False, True):
        k.use_blas_threads(pool)
        for threads in (1, 2, 3):
            got = np.full((m, N), np.nan, dtype=np.float32)
            k.gemm_packed_threads(m, N, K, _p(A), K, _p(P), _p(got), N, threads)
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mode", CELLS)
def test_backward_without_a_packed_copy_agrees(mode, monkeypatch):
    """Where packing the recurrent weight would raise a training step's peak memory the backward runs
    one BLAS product per step with the step kernels instead; both ways give the same gradients, with
    and without lengths= (whose segments share the layer's decision)."""
    lengths = np.random.default_rng(3).integers(1, 10, size=37)
    for lens in (None, lengths):
        packed = _layer(mode, lengths=lens)
        with monkeypatch.context() as mp:
            mp.setattr(numpy_fast, "_PACK_SMALL", 0)
            mp.setattr(numpy_fast, "_PACK_SHARE", 1 << 40)
            mp.setattr(numpy_fast, "_PACK_PADDING_SHARE", 1 << 40)
            W = np.zeros((4 * 45, 45), dtype=np.float32)
            assert numpy_fast._backward_packed(native.kernels(), W, 10**6) is None  # the per-step path
            per_step = _layer(mode, lengths=lens)
        with native.use(None):
            plain = _layer(mode, lengths=lens)
        for a, b, c in zip(per_step, packed, plain):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
            np.testing.assert_allclose(a, c, rtol=2e-4, atol=2e-5)


def _layer_any(mode, lengths, *, B, T, I=6, H=21, min_length=1, bidirectional=True, seed=2):
    """out, dx, final states, their gradients and the parameter gradients of a 2-layer layer
    with initial states and final-state gradients (so that every input of a scan is used)."""
    extra = {}
    if mode.startswith("RNN"):
        mode, extra = "RNN", {"nonlinearity": mode.split("_")[1]}
    D = 2 if bidirectional else 1
    m = getattr(xrnn, mode)(I, H, num_layers=2, bidirectional=bidirectional, seed=seed, **extra)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = rng.standard_normal((2 * D, B, H)).astype(np.float32)
    dh = rng.standard_normal((2 * D, B, H)).astype(np.float32)
    state, dstate = ((h0, 0.5 * h0), (dh, 0.5 * dh)) if mode == "LSTM" else (h0, dh)
    out, hn = m._forward(x, state, lengths, min_length)
    dx, dst = m.backward(rng.standard_normal(out.shape).astype(np.float32), dstate)
    flat = lambda s: list(s) if isinstance(s, tuple) else [s]  # noqa: E731
    return [out, dx, *flat(hn), *flat(dst), *m.grads.values()]


def _without_ragged(monkeypatch):
    """Make the layers run a lengths= batch segment by segment (one C scan each)."""
    for name in list(vars(numpy_fast.SCANS)):
        if name.endswith("_ragged"):
            monkeypatch.setattr(numpy_fast.SCANS, name, None)


@pytest.mark.parametrize("mode", CELLS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_ragged_scans_equal_the_segments_one_by_one(mode, bidirectional, monkeypatch, restore_threads):
    """One C call over every segment of a lengths= batch (rows sorted longest first, each step on
    its active prefix, a reverse scan's rows joining at their own last step) computes each row as
    the segment-by-segment scans do: the same bits, for any thread count, with rows of length 0
    (Keras masks allow them) and unsorted lengths."""
    calls = {}
    for name in list(vars(numpy_fast.SCANS)):
        if name.endswith("_ragged"):
            fn = getattr(numpy_fast.SCANS, name)

            def counted(*a, _fn=fn, _name=name, **k):
                r = _fn(*a, **k)
                calls[_name] = calls.get(_name, 0) + (r is not None)
                return r
            monkeypatch.setattr(numpy_fast.SCANS, name, counted)
    T, B = 13, 29
    lengths = np.random.default_rng(4).integers(0, T + 1, size=B)
    lengths[[3, 17]] = T, 0
    native.set_threads(1)
    ragged = {th: None for th in (1, 2, 3, 5)}
    for th in ragged:
        native.set_threads(th)
        ragged[th] = _layer_any(mode, lengths, B=B, T=T, min_length=0, bidirectional=bidirectional)
    cell = mode.split("_")[0].lower()
    assert calls.get(f"{cell}_scan_ragged", 0) >= 2 * len(ragged) and calls.get(f"{cell}_scan_backward_ragged")
    with monkeypatch.context() as mp:
        _without_ragged(mp)
        native.set_threads(1)
        segments = _layer_any(mode, lengths, B=B, T=T, min_length=0, bidirectional=bidirectional)
    for got in ragged.values():
        for a, b in zip(got, segments):
            np.testing.assert_array_equal(a, b)


@settings(max_examples=int(os.environ.get("XRNN_FUZZ_EXAMPLES", "25")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), mode=st.sampled_from(CELLS), bidirectional=st.booleans(), threads=st.integers(1, 4))
def test_ragged_scans_equal_the_segments_for_any_shape(data, mode, bidirectional, threads, restore_threads):
    """The same bits as segment by segment for any batch, length, hidden size (tile and panel
    edges: H from 1) and thread count."""
    B, T, H = data.draw(st.integers(1, 19)), data.draw(st.integers(1, 11)), data.draw(st.integers(1, 37))
    lengths = np.array(data.draw(st.lists(st.integers(0, T), min_size=B, max_size=B)))
    native.set_threads(threads)
    ragged = _layer_any(mode, lengths, B=B, T=T, H=H, I=3, min_length=0, bidirectional=bidirectional)
    with pytest.MonkeyPatch.context() as mp:
        _without_ragged(mp)
        segments = _layer_any(mode, lengths, B=B, T=T, H=H, I=3, min_length=0, bidirectional=bidirectional)
    for a, b in zip(ragged, segments):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_tanh"])
def test_ragged_scans_match_the_numpy_code(mode):
    """Against the NumPy scans (no C kernels), float32 rounding apart."""
    lengths = np.array([5, 9, 1, 9, 3, 7, 2, 9, 8, 4, 6])
    fast = _layer_any(mode, lengths, B=11, T=9)
    with native.use(None):
        plain = _layer_any(mode, lengths, B=11, T=9)
    for a, b in zip(fast, plain):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("lengths", [[4, 4, 4], [9, 1], [6, 5, 5, 2, 2, 2, 1], [3, 0, 0], [8] + [1] * 30,
                                     list(range(40, 0, -1))])
def test_ragged_rows_split_by_row_steps(lengths, restore_threads):
    """xrnn_scan_rows splits a ragged scan's rows so that each thread gets about the same number of
    row-steps; every row is computed once, whatever the split: a forward's Y shows which rows ran."""
    from xrnn.segments import SegmentPlan
    lengths = np.array(lengths)
    plan = SegmentPlan(lengths, int(lengths.max()))
    B, H, N = len(lengths), 16, plan.N
    rng = np.random.default_rng(len(lengths))
    W = (0.5 / np.sqrt(H) * rng.standard_normal((H, H))).astype(np.float32)  # contracting: errors do not grow
    A = rng.standard_normal((N, H)).astype(np.float32)
    h0 = rng.standard_normal((B, H)).astype(np.float32)  # rows in length order, as the scans take them
    ref = None
    for threads in (1, 2, 3, 4, 7):
        native.set_threads(threads)
        Y = np.full((N, H), np.nan, dtype=np.float32)
        assert numpy_fast.rnn_scan_ragged(A, W, h0, Y, slice(0, H), False, "tanh", plan.steps())
        assert not np.isnan(Y).any()  # every packed row written
        if ref is None:
            ref = Y
        np.testing.assert_array_equal(Y, ref)
    native.set_threads(1)
    # the reference: the recurrence row by row in float64
    rows, offs = plan.steps()
    h = h0.astype(np.float64)
    for t in range(len(rows)):
        n = rows[t]
        h[:n] = np.tanh(A[offs[t]:offs[t] + n] + h[:n] @ W.T.astype(np.float64))
        np.testing.assert_allclose(ref[offs[t]:offs[t] + n], h[:n], rtol=1e-5, atol=1e-5)


def test_lengths_batches_pack_in_the_memory_their_padding_saves():
    """A lengths= batch packs the recurrent weight for its backward when the copy is at most half of
    the gate memory its padding does not hold, so that its step holds less than the full batch's."""
    k = native.kernels()
    big = np.zeros((4 * 512, 512), dtype=np.float32)  # 4 MB packed
    gates = 4752 * 2048  # the benchmark's lengths row: 0.74 of the medium LSTM's 6400 rows
    assert numpy_fast._backward_packed(k, big, gates) is None
    assert numpy_fast._backward_packed(k, big, gates, (6400 - 4752) * 2048) is not None  # 13 MB saved
    assert numpy_fast._backward_packed(k, big, gates, 256 * 2048) is None  # 2 MB saved: not enough
    w = numpy_fast.backward_weight(big, gates, (6400 - 4752) * 2048)
    assert not isinstance(w.packed[True], str)


def test_backward_packs_small_weights_and_long_sequences():
    k = native.kernels()
    small = np.zeros((4 * 64, 64), dtype=np.float32)  # 64 KB packed
    big = np.zeros((4 * 512, 512), dtype=np.float32)  # 4 MB packed
    assert numpy_fast._backward_packed(k, small, 1) is not None
    assert numpy_fast._backward_packed(k, big, 6400 * 2048) is None  # the medium LSTM: 1/13 of its gates
    assert numpy_fast._backward_packed(k, big, 12800 * 2048) is not None  # B = 128: 1/25
    assert numpy_fast._backward_packed(k, big, 100000 * 2048) is not None  # T = 1000: 1/98
