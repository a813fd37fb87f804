"""Shared fixtures: every test that takes ``device`` runs once per available backend.

Backends: NumPy; array-api-strict on its default device and on ``device1``
(a forgotten ``device=`` anywhere shows up there as a mixed-device error);
``fakecupy:1``, the test-only namespace of ``tests/fakecupy.py`` that behaves
like CuPy where it matters (a current device, creation on it, host reads
counted), on its second device, so that anything run outside ``with dev:``
fails; PyTorch CPU through array-api-compat; CuPy on GPU 0. A missing
library or GPU is a skip, never a failure.
"""

import os
import sys

# Test arrays are tiny: one BLAS thread per process avoids oversubscribing the
# CI machine's two cores (benchmarks set their own thread counts). Must precede
# NumPy's first import to take effect.
if "numpy" not in sys.modules:
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import xrnn
from xrnn.errors import BackendUnavailableError
from xrnn.kernels import native

# The fused CPU kernels (xrnn/kernels/cpu/recurrent.c): a checkout has no built extension
# module, so the suite compiles the source with the system's C compiler once (cached in the
# temp dir by a hash of the source) and every float32 NumPy scan runs on it, as in an
# installed wheel. Without a compiler the suite runs on the NumPy code and the native tests
# skip, naming the reason. XRNN_NATIVE or XRNN_NATIVE_LIB set by the caller win.
NATIVE_LIB = None
NATIVE_WHY = ""
if "XRNN_NATIVE" not in os.environ and "XRNN_NATIVE_LIB" not in os.environ:
    import tempfile

    try:
        NATIVE_LIB = native.compile_library(os.path.join(tempfile.gettempdir(), "xrnn-native-tests"))
        os.environ["XRNN_NATIVE_LIB"] = str(NATIVE_LIB)
    except OSError as e:
        NATIVE_WHY = str(e)
elif os.environ.get("XRNN_NATIVE_LIB"):
    NATIVE_LIB = os.environ["XRNN_NATIVE_LIB"]
else:
    NATIVE_WHY = "XRNN_NATIVE=0 set by the caller"


def native_kernels(isa):
    """The session's kernel library with the copy for ``isa`` ("base" or "avx2"); a skip where
    this CPU or build has no such copy."""
    try:
        return native.load(NATIVE_LIB, isa=isa)
    except OSError as e:
        pytest.skip(str(e))

try:  # the CuPy-like test namespace needs array-api-strict
    import fakecupy

    fakecupy.register()
except ImportError:
    fakecupy = None

BACKENDS = [
    "cpu",
    "array_api_strict:CPU_DEVICE",
    "array_api_strict:device1",
    "fakecupy:1",
    "torch:cpu",
    "cuda:0",
]


def _resolve(name):
    if name.startswith("fakecupy") and fakecupy is None:
        pytest.skip("fakecupy needs array-api-strict")
    try:
        return xrnn.resolve_device(name)
    except BackendUnavailableError as e:
        pytest.skip(f"backend {name} unavailable: {e}")


@pytest.fixture(params=BACKENDS)
def device(request):
    """An :class:`xrnn.Device` for each available backend."""
    return _resolve(request.param)


@pytest.fixture(params=["cpu", "array_api_strict:device1", "fakecupy:1", "cuda:0"])
def light_device(request):
    """For slower, end-to-end tests: NumPy, one strict non-default device, the CuPy-like test namespace on
    its second device, and CuPy on GPU 0 where there is one."""
    return _resolve(request.param)


@pytest.fixture(params=["array_api_strict:device1", "fakecupy:1", "cuda:0"])
def e2e_device(request):
    """A device other than NumPy for end-to-end runs compared with NumPy (training, checkpoints across
    devices): strict's second device, the CuPy-like test namespace's second device, and CuPy where present."""
    return _resolve(request.param)


@pytest.fixture
def host_reads():
    """fakecupy's log of host reads, emptied: ``len(host_reads)`` counts the reads since (see tests/fakecupy.py)."""
    if fakecupy is None:
        pytest.skip("fakecupy needs array-api-strict")
    fakecupy.reads.clear()
    return fakecupy.reads


def to_np(a):
    return xrnn.to_numpy(a)


def put(dev, a, dtype="float64"):
    """Host data onto ``dev`` (test helper)."""
    return dev.asarray(np.asarray(a), dtype=dtype)


def assert_on(dev, *arrays):
    """Every array lives on ``dev`` (the device plumbing check)."""
    for a in arrays:
        if a is None:
            continue
        assert xrnn.backend.device_of(a) == dev, f"array on {xrnn.backend.device_of(a)}, expected {dev}"


class _Syncs(list):
    """Names of the host conversions seen; ``sizes``: elements of each converted array, in step."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def clear(self):
        super().clear()
        self.sizes.clear()


@pytest.fixture
def sync_counter(monkeypatch):
    """Counts conversions of array-api-strict arrays to host values (each is a device sync on a GPU)."""
    xs = pytest.importorskip("array_api_strict")
    calls = _Syncs()
    sizes = calls.sizes
    # __buffer__: how NumPy reads the host array on Python >= 3.12 (array-api-strict refuses __array__ there)
    for name in ("__bool__", "__float__", "__int__", "__index__", "__complex__", "__array__", "__buffer__",
                 "__dlpack__"):
        orig = getattr(xs._array_object.Array, name, None)
        if orig is None:
            continue

        def counting(self, *a, _orig=orig, _name=name, **k):
            calls.append(_name)
            sizes.append(self.size)
            return _orig(self, *a, **k)

        monkeypatch.setattr(xs._array_object.Array, name, counting)
    return calls


def check_gradients(dev, module, loss_at, analytic, inputs, *, elementwise=None, directions=1, seed=5,
                    same_keys=False):
    """Compare analytic gradients with float64 finite differences.

    ``loss_at(**overrides)`` evaluates the loss with some inputs replaced by
    host arrays; ``analytic`` maps parameter and input names to analytic
    gradients; ``inputs`` maps input names to their host values. Every
    element is differenced (by default on NumPy); on the slower backends
    each array is checked along ``directions`` random directions (a wrong
    gradient fails along a random direction with probability 1).
    ``same_keys``: also require the numeric parameter names to be exactly
    ``analytic``'s minus the inputs.
    """
    from xrnn.gradcheck import (
        directional_derivative,
        numerical_gradient,
        parameter_directional_derivatives,
        parameter_gradients,
    )

    tol = dict(rtol=1e-6, atol=1e-8)
    if elementwise is None:
        elementwise = dev.library == "numpy"
    if elementwise:
        num = parameter_gradients(module, loss_at)
        if same_keys:
            assert set(num) == set(analytic) - set(inputs)
        for k in num:
            np.testing.assert_allclose(analytic[k], num[k], err_msg=k, **tol)
        for k, x in inputs.items():
            num_x = numerical_gradient(lambda v, k=k: loss_at(**{k: v}), x)
            np.testing.assert_allclose(analytic[k], num_x, err_msg=k, **tol)
        return
    rng = np.random.default_rng(seed)
    for _ in range(directions):
        dirs = {k: rng.standard_normal(np.shape(to_np(v))) for k, v in module.parameters().items()}
        num = parameter_directional_derivatives(module, loss_at, dirs)
        for k, v in dirs.items():
            np.testing.assert_allclose(np.sum(analytic[k] * v), num[k], err_msg=k, **tol)
        for k, x in inputs.items():
            v = rng.standard_normal(np.shape(x))
            d = directional_derivative(lambda z, k=k: loss_at(**{k: z}), x, v)
            np.testing.assert_allclose(np.sum(analytic[k] * v), d, err_msg=k, **tol)


#: ``python -c`` source of the ``xrnn`` command with each training step slowed by 30 ms,
#: so that a signal sent after a progress line surely lands mid-run
SLOW_CLI = ("import importlib, sys, time\n"
            "T = importlib.import_module('xrnn.train')\n"
            "step = T.Trainer.train_step\n"
            "def slow(self):\n"
            "    time.sleep(0.03)\n"
            "    return step(self)\n"
            "T.Trainer.train_step = slow\n"
            "from xrnn.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
