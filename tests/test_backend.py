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


@pytest.mark.parametrize("count,spec,match", [
    (0, "cuda", "CuPy is installed but no CUDA GPU is visible; use device='cpu'"),
    (RuntimeError("cudaErrorNoDevice"), "cuda:0", "sees no CUDA GPU .*check the NVIDIA driver"),
    (1, "cuda:1", r"this machine has 1 GPU\(s\), cuda:0..cuda:0"),
])
def test_cuda_with_cupy_but_no_usable_gpu_says_what_is_wrong(monkeypatch, count, spec, match):
    """The branches a GPU-less CI cannot reach with a real CuPy: a stand-in CuPy module."""
    import sys
    import types

    def get_count():
        if isinstance(count, Exception):
            raise count
        return count

    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_count))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setitem(sys.modules, "array_api_compat.cupy", types.ModuleType("array_api_compat.cupy"))
    with pytest.raises(BackendUnavailableError, match=match):
        resolve_device(spec)


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
