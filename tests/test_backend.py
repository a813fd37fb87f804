"""Device resolution, moving data, and the errors that guard device plumbing."""

import numpy as np
import pytest

import xrnn
from xrnn.backend import device_of, resolve_device
from xrnn.errors import BackendUnavailableError, DeviceError, DTypeError

from conftest import assert_on, put, to_np


def test_cpu_aliases_resolve_to_numpy():
    for spec in ("cpu", "numpy", "CPU", " numpy:cpu ", None):
        d = resolve_device(spec)
        assert d.library == "numpy" and d.name == "cpu"
    assert resolve_device("cpu") == resolve_device("numpy")


def test_strict_devices_resolve_and_round_trip_by_name():
    xs = pytest.importorskip("array_api_strict")
    d = resolve_device("array_api_strict:device1")
    assert d.library == "array_api_strict" and d.native == xs.Device("device1")
    assert resolve_device(d.name) == d
    assert resolve_device("array_api_strict").name == "array_api_strict:CPU_DEVICE"
    assert resolve_device(xs.Device("device2")).name == "array_api_strict:device2"


def test_torch_cpu_resolves():
    torch = pytest.importorskip("torch")
    d = resolve_device("torch:cpu")
    assert d.library == "torch" and d.native == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == d


def test_array_and_array_device_are_accepted(device):
    a = put(device, np.ones((2, 3)), "float32")
    assert resolve_device(a) == device
    assert device_of(a) == device
    if device.library != "numpy":  # NumPy's .device is the string "cpu", handled above
        assert resolve_device(a.device) == device
    m = xrnn.GRU(3, 2, device=a.device if device.library != "numpy" else a, seed=0)
    assert m.device == device


def test_unknown_device_lists_accepted_forms():
    for bad in ("tpu", "cuda:x", "torch:mps", "array_api_strict:nope", 3.5, object()):
        with pytest.raises(DeviceError) as e:
            resolve_device(bad)
        msg = str(e.value)
        if not str(bad).startswith("array_api_strict"):
            assert '"cuda:N"' in msg and '"cpu"' in msg and "array_api_strict" in msg


def test_strict_unknown_device_names_the_real_ones():
    pytest.importorskip("array_api_strict")
    with pytest.raises(DeviceError, match="device1"):
        resolve_device("array_api_strict:gpu7")


def test_cuda_without_cupy_or_gpu_names_the_fix():
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("a GPU is present: cuda resolves")
    except Exception:
        pass
    for spec in ("cuda", "cuda:0", "cupy:1", "gpu"):
        with pytest.raises(BackendUnavailableError) as e:
            resolve_device(spec)
        assert 'pip install "xrnn-array[cuda12]"' in str(e.value) or "no CUDA GPU" in str(e.value)
        assert isinstance(e.value, RuntimeError) and isinstance(e.value, DeviceError)
    with pytest.raises(BackendUnavailableError):
        xrnn.LSTM(3, 4, device="cuda")


# ---------------------------------------------------------------------------
# first contact with CuPy: a stand-in CuPy module reaches every branch without a GPU
# ---------------------------------------------------------------------------

class _StandInCuPy:
    """Installs stand-ins for ``cupy`` and ``array_api_compat.cupy`` (no GPU code at all).

    ``fail``: ``(stage, exception)`` with stage ``"alloc"``, ``"elementwise"``,
    ``"matmul"`` or ``"read"``: that step of the first-contact probe raises.
    ``wrong``: the matrix product returns a wrong value. Records which device
    was current during each operation and how often the device count was read.
    """

    def __init__(self, monkeypatch, *, count=1, count_error=None, driver=13000, runtime=13000, fail=None,
                 wrong=False):
        import sys
        import types

        import array_api_compat

        from xrnn import backend

        self.count_calls = 0
        self.current = [0]
        self.ops = []  # (operation, current device)
        self.freed = []
        outer = self

        def get_count():
            outer.count_calls += 1
            if count_error is not None:
                raise count_error
            return count

        class Device:
            def __init__(self, i=0):
                self.id = i

            def __enter__(self):
                outer.current.append(self.id)
                return self

            def __exit__(self, *exc):
                outer.current.pop()

        def stage(name):
            outer.ops.append((name, outer.current[-1]))
            if fail is not None and fail[0] == name:
                raise fail[1]

        class Arr:
            def __init__(self, a):
                self.a = a

            def __mul__(self, other):
                stage("elementwise")
                return Arr(self.a * other.a)

            def __add__(self, other):
                stage("elementwise")
                return Arr(self.a + other)

            def get(self):
                stage("read")
                return self.a + (1 if wrong else 0)

        class Pool:
            def total_bytes(self):
                return 3 << 20

            def used_bytes(self):
                return 1 << 20

            def free_all_blocks(self):
                outer.freed.append(outer.current[-1])

        def asarray(host, dtype=None):
            stage("alloc")
            return Arr(np.asarray(host))

        def matmul(a, b):
            stage("matmul")
            return Arr(a.a @ b.a)

        runtime_ns = types.SimpleNamespace(getDeviceCount=get_count, driverGetVersion=lambda: driver,
                                           runtimeGetVersion=lambda: runtime,
                                           memGetInfo=lambda: (1 << 30, 8 << 30))
        cupy = types.ModuleType("cupy")
        cupy.cuda = types.SimpleNamespace(runtime=runtime_ns, Device=Device)
        cupy.get_default_memory_pool = Pool
        cupy.get_default_pinned_memory_pool = Pool
        xcp = types.ModuleType("array_api_compat.cupy")
        xcp.asarray = asarray
        xcp.matmul = matmul
        xcp.reshape = lambda a, shape: Arr(np.reshape(a.a, shape))
        monkeypatch.setitem(sys.modules, "cupy", cupy)
        monkeypatch.setitem(sys.modules, "array_api_compat.cupy", xcp)
        # `import array_api_compat.cupy` reads the package attribute first (set if the real one was imported)
        monkeypatch.setattr(array_api_compat, "cupy", xcp, raising=False)
        # a fresh process as far as xrnn's caches go
        monkeypatch.setattr(backend, "_CUPY_DEVICES", {})
        monkeypatch.setattr(backend, "_CUPY_COUNT", [])


def _named(name, module, base=RuntimeError):
    """An exception class that looks like the library's own (name and module)."""
    return type(name, (base,), {"__module__": module})


NVRTC_MISSING = _named("DynamicLibNotFoundError", "cuda.pathfinder._dynamic_libs.load_dl_common")(
    'Failure finding "libnvrtc.so.13 or libnvrtc.so.12": No such file: libnvrtc.so.13 or libnvrtc.so.12')
HEADERS_MISSING = _named("CompileException", "cupy.cuda.compiler", Exception)(
    '/tmp/tmpabc/kern.cu(1): catastrophic error: cannot open source file "cuda_fp16.h"')
CUBLAS_MISSING = ImportError('Failure finding "libcublasLt.so.13 or libcublasLt.so.12": No such file')
INSUFFICIENT = _named("CUDARuntimeError", "cupy_backends.cuda.api.runtime")(
    "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version")
NO_DEVICE = _named("CUDARuntimeError", "cupy_backends.cuda.api.runtime")(
    "cudaErrorNoDevice: no CUDA-capable device is detected")
PTX_TOO_NEW = _named("CUDADriverError", "cupy_backends.cuda.api.driver")(
    "CUDA_ERROR_UNSUPPORTED_PTX_VERSION: the provided PTX was compiled with an unsupported toolchain.")


@pytest.mark.parametrize("spec,kw,fragments", [
    ("cuda", dict(count=0), ["no CUDA GPU is visible", "CUDA_VISIBLE_DEVICES", "device='cpu'"]),
    ("cuda:0", dict(count_error=NO_DEVICE), ["sees no CUDA GPU", "cudaErrorNoDevice", "no GPU is visible",
                                             "CUDA_VISIBLE_DEVICES", "--gpus all"]),
    ("cuda:0", dict(count_error=INSUFFICIENT, driver=0), ["no NVIDIA driver was found", "nvidia-smi", "--gpus all"]),
    ("cuda:0", dict(count_error=INSUFFICIENT, driver=12040, runtime=13020),
     ["the NVIDIA driver supports CUDA up to 12.4", "built for CUDA 13", "update the NVIDIA driver",
      "pip uninstall -y cupy-cuda13x", r'pip install "xrnn-array\[cuda12\]"']),
    ("cuda:0", dict(count_error=INSUFFICIENT, driver=11080, runtime=12090),
     ["supports CUDA up to 11.8", "built for CUDA 12", "update the NVIDIA driver, or use device='cpu'"]),
    ("cuda:1", dict(count=1), [r"this machine has 1 GPU\(s\), cuda:0..cuda:0"]),
    ("cuda:3", dict(count=2), [r"2 GPU\(s\), cuda:0..cuda:1"]),
    ("cuda", dict(fail=("elementwise", NVRTC_MISSING)),
     ["an element-wise kernel", "NVRTC", "libnvrtc", r'pip install "xrnn-array\[cuda13\]"', r"cupy-cuda13x\[ctk\]",
      "CUDA_PATH", "-devel"]),
    ("cuda", dict(fail=("elementwise", HEADERS_MISSING)),
     ["the CUDA headers are missing", "cuda_fp16.h", r'pip install "xrnn-array\[cuda13\]"']),
    ("cuda", dict(fail=("elementwise", HEADERS_MISSING), runtime=12080),
     ["the CUDA headers are missing", r'pip install "xrnn-array\[cuda12\]"', r"cupy-cuda12x\[ctk\]"]),
    ("cuda", dict(fail=("matmul", CUBLAS_MISSING)),
     [r"a matrix product \(cuBLAS\) failed", "cuBLAS", "libcublasLt", r'pip install "xrnn-array\[cuda13\]"']),
    ("cuda", dict(fail=("elementwise", PTX_TOO_NEW)), ["driver is older than the NVRTC", "update the NVIDIA driver"]),
    ("cuda", dict(fail=("alloc", MemoryError("Out of memory allocating 512 bytes"))),
     ["the first allocation failed", "out of memory", "nvidia-smi"]),
    ("cuda", dict(wrong=True), [r"instead of \[\[54.0, 95.0\], \[190.0, 339.0\]\]", "broken"]),
])
def test_first_contact_with_cupy_names_the_missing_piece_and_the_fix(monkeypatch, spec, kw, fragments):
    """Every way a GPU stack can be incomplete becomes a BackendUnavailableError saying what and how to fix it."""
    import re

    _StandInCuPy(monkeypatch, **kw)
    with pytest.raises(BackendUnavailableError) as e:
        resolve_device(spec)
    msg = str(e.value)
    for f in fragments:
        assert re.search(f, msg), f"{f!r} not in {msg!r}"
    assert isinstance(e.value, RuntimeError) and isinstance(e.value, DeviceError)
    with pytest.raises(BackendUnavailableError):  # a model asks the same question
        xrnn.LSTM(3, 4, device=spec)


def test_first_contact_probe_runs_once_per_device_on_that_device(monkeypatch):
    """The probe (element-wise kernel, matrix product, one read) runs under ``with Device(n)``, once per
    GPU; later resolutions and ``device_of`` are dictionary lookups (the device count is read once)."""
    from xrnn import backend

    cp = _StandInCuPy(monkeypatch, count=2)
    d1 = resolve_device("cuda:1")
    assert d1.name == "cuda:1" and d1.library == "cupy" and d1.has_current_device
    assert cp.ops == [("alloc", 1), ("elementwise", 1), ("elementwise", 1), ("matmul", 1), ("read", 1)]
    for _ in range(5):
        assert resolve_device("cupy:1") is d1 and backend._cupy_device(1) is d1
    d0 = resolve_device("cuda")
    assert d0.name == "cuda:0" and {dev for _, dev in cp.ops[5:]} == {0} and len(cp.ops) == 10
    assert resolve_device("gpu:0") is d0
    assert cp.count_calls == 1


def test_oom_guard_frees_cupys_memory_pool(monkeypatch):
    """After an out-of-memory error on CuPy the pool's cached blocks go back to the GPU (on the right device)."""
    from xrnn.errors import DeviceMemoryError

    cp = _StandInCuPy(monkeypatch, count=2)
    dev = resolve_device("cuda:1")
    oom = _named("OutOfMemoryError", "cupy.cuda.memory", MemoryError)("Out of memory allocating 1,024 bytes")
    with pytest.raises(DeviceMemoryError) as e:
        with xrnn.backend.oom_guard(dev, "a test step"):
            raise oom
    assert cp.freed == [1, 1]  # the device pool and the pinned pool, with cuda:1 current
    assert "freed 2.0 MiB of cached blocks from CuPy's memory pool" in str(e.value)
    with pytest.raises(ValueError):  # other errors pass through, nothing freed
        with xrnn.backend.oom_guard(dev, "a test step"):
            raise ValueError("not memory")
    assert cp.freed == [1, 1]


def test_available_devices_lists_what_resolves():
    devs = xrnn.available_devices()
    assert devs[0] == "cpu"
    for name in devs:
        assert resolve_device(name).name == name
    try:
        import array_api_strict  # noqa: F401

        assert "array_api_strict:device1" in devs
    except ImportError:
        pass


def test_to_numpy_and_to_device_round_trip(device):
    host = np.arange(12, dtype=np.float64).reshape(3, 4)
    a = xrnn.to_device(host, device)
    assert_on(device, a)
    back = xrnn.to_numpy(a)
    assert isinstance(back, np.ndarray)
    np.testing.assert_array_equal(back, host)
    f32 = xrnn.to_device(a, device, dtype="float32")
    assert to_np(f32).dtype == np.float32
    assert xrnn.to_numpy([1, 2]).tolist() == [1, 2]


def test_to_device_moves_between_libraries():
    pytest.importorskip("array_api_strict")
    a = xrnn.to_device(np.ones(3), "array_api_strict:device1")
    b = xrnn.to_device(a, "array_api_strict:device2")
    assert device_of(b).name == "array_api_strict:device2"
    np.testing.assert_array_equal(xrnn.to_numpy(b), np.ones(3))


def test_input_on_another_device_names_both():
    pytest.importorskip("array_api_strict")
    m = xrnn.LSTM(3, 4, seed=0)
    x = xrnn.to_device(np.ones((2, 1, 3), np.float32), "array_api_strict:device1")
    with pytest.raises(DeviceError) as e:
        m(x)
    msg = str(e.value)
    assert "array_api_strict:device1" in msg and "'cpu'" in msg and "to_device" in msg
    # nothing was moved: the model is still on the CPU and no cache was made
    assert m.device.name == "cpu"


def test_state_on_another_device_is_refused():
    pytest.importorskip("array_api_strict")
    m = xrnn.GRU(3, 4, seed=0, device="array_api_strict:device1")
    x = xrnn.to_device(np.ones((2, 1, 3), np.float32), m.device)
    h = xrnn.to_device(np.zeros((1, 1, 4), np.float32), "array_api_strict:device2")
    with pytest.raises(DeviceError, match="device2"):
        m(x, h)
    with pytest.raises(DeviceError, match="not an array"):
        m([[1.0, 2.0, 3.0]])


def test_dtypes_float32_default_and_float64(device):
    m = xrnn.RNN(2, 3, device=device, seed=0)
    assert m.dtype == "float32"
    assert to_np(m.weight_ih_l0).dtype == np.float32
    m64 = xrnn.RNN(2, 3, device=device, dtype="float64", seed=0)
    assert to_np(m64.weight_ih_l0).dtype == np.float64
    with pytest.raises(DTypeError, match="int32"):
        xrnn.RNN(2, 3, device=device, dtype="int32")


def test_float16_where_supported():
    m = xrnn.LSTM(3, 4, dtype="float16", seed=0)
    out, _ = m(np.ones((2, 1, 3), np.float16))
    assert out.dtype == np.float16
    ref, _ = xrnn.LSTM(3, 4, dtype="float64", seed=0)(np.ones((2, 1, 3)))
    np.testing.assert_allclose(out, ref, atol=5e-3)
    pytest.importorskip("array_api_strict")
    with pytest.raises(DTypeError, match="not available"):
        xrnn.LSTM(3, 4, dtype="float16", device="array_api_strict")


def _stand_in_cupy(monkeypatch, count, usable=True):
    """A stand-in CuPy with ``count`` GPUs (or an exception from getDeviceCount); ``usable=False``
    makes every allocation fail, as a driver/runtime mismatch does."""
    import sys
    import types

    def get_count():
        if isinstance(count, Exception):
            raise count
        return count

    class FakeGPU:
        def __init__(self, index):
            self.id = index

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def zeros(*a, **k):
        if not usable:
            raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")
        return np.zeros(*a)

    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_count), Device=FakeGPU)
    xcp = types.ModuleType("array_api_compat.cupy")
    xcp.zeros = zeros
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setitem(sys.modules, "array_api_compat.cupy", xcp)
    import array_api_compat

    from xrnn import backend

    monkeypatch.setattr(array_api_compat, "cupy", xcp, raising=False)
    # the first-contact probe (tested above) reduced to its first allocation; a fresh process's caches
    monkeypatch.setattr(backend, "_probe_cupy", lambda cupy, xp, native, index: xp.zeros(1))
    monkeypatch.setattr(backend, "_CUPY_DEVICES", {})
    monkeypatch.setattr(backend, "_CUPY_COUNT", [])


@pytest.mark.parametrize("count,usable,expected,reason", [
    (2, True, "cuda:0", "using GPU cuda:0"),
    (1, False, "cpu", "no usable GPU (cuda:0: cudaErrorInsufficientDriver"),
    (0, True, "cpu", "no usable GPU (CuPy is installed but no CUDA GPU is visible); using the CPU"),
    (RuntimeError("cudaErrorNoDevice"), True, "cpu", "no usable GPU (CuPy sees no CUDA GPU: cudaErrorNoDevice)"),
])
def test_auto_picks_the_first_usable_gpu_else_the_cpu_and_says_which(monkeypatch, caplog, count, usable,
                                                                     expected, reason):
    import logging

    _stand_in_cupy(monkeypatch, count, usable)
    dev, why = xrnn.auto_device()
    assert dev.name == expected and why.startswith(reason)
    with caplog.at_level(logging.INFO, logger="xrnn"):
        assert resolve_device("auto").name == expected
        assert resolve_device(" AUTO ").name == expected
    assert [r.getMessage() for r in caplog.records] == [f"device='auto': {why}"] * 2


def test_auto_without_cupy_is_the_cpu_and_quiet(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    dev, why = xrnn.auto_device()
    assert dev == resolve_device("cpu") and why == "no usable GPU (CuPy is not installed); using the CPU"
    m = xrnn.LSTM(3, 4, device="auto", seed=0)
    assert m.device == resolve_device("cpu")
    assert capsys.readouterr() == ("", "")  # the library prints nothing; the CLI does


def test_auto_on_a_data_parallel_rank_is_its_own_gpu(monkeypatch):
    from xrnn.distributed import device_for_rank

    _stand_in_cupy(monkeypatch, 2)
    assert device_for_rank("auto", 3).name == "cuda:1"
    _stand_in_cupy(monkeypatch, 2, usable=False)
    assert device_for_rank("auto", 3).name == "cpu"
