"""Shared fixtures: every test that takes ``device`` runs once per available backend.

Backends: NumPy; array-api-strict on its default device and on ``device1``
(a forgotten ``device=`` anywhere shows up there as a mixed-device error);
PyTorch CPU through array-api-compat; CuPy on GPU 0. A missing library or GPU
is a skip, never a failure.
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

BACKENDS = [
    "cpu",
    "array_api_strict:CPU_DEVICE",
    "array_api_strict:device1",
    "torch:cpu",
    "cuda:0",
]


def _resolve(name):
    try:
        return xrnn.resolve_device(name)
    except BackendUnavailableError as e:
        pytest.skip(f"backend {name} unavailable: {e}")


@pytest.fixture(params=BACKENDS)
def device(request):
    """An :class:`xrnn.Device` for each available backend."""
    return _resolve(request.param)


@pytest.fixture(params=["cpu", "array_api_strict:device1"])
def light_device(request):
    """NumPy plus one strict non-default device: for slower, end-to-end tests."""
    return _resolve(request.param)


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
    for name in ("__bool__", "__float__", "__int__", "__index__", "__complex__", "__array__", "__dlpack__"):
        orig = getattr(xs._array_object.Array, name, None)
        if orig is None:
            continue

        def counting(self, *a, _orig=orig, _name=name, **k):
            calls.append(_name)
            sizes.append(self.size)
            return _orig(self, *a, **k)

        monkeypatch.setattr(xs._array_object.Array, name, counting)
    return calls
