"""Devices and array namespaces: the one module that knows which library holds the arrays.

A :class:`Device` pairs an Array API namespace (from ``array_api_compat``) with a
place inside that library. Everything else in xrnn asks its ``Device`` for the
namespace (``dev.xp``), creates arrays through it (``dev.asarray``,
``dev.zeros``), checks inputs against it (``dev.check``), and runs public
operations inside ``with dev:`` (which selects the GPU for CuPy, whose creation
functions ignore ``device=``).

Accepted device specifications (see :data:`DEVICE_FORMS`)::

    "auto"                              the first usable CUDA GPU, else the CPU (:func:`auto_device`)
    "cpu", "numpy"                      NumPy on the host
    "cuda", "cuda:N", "cupy", "cupy:N"  CuPy on GPU N (default 0)
    "torch:cpu", "torch:cuda:N"         PyTorch tensors through array-api-compat
    "array_api_strict[:NAME]"           array-api-strict, any of its devices
    an array, or an array's ``.device``  the library and device of that array
    a Device                            itself

Random numbers never come from a device library: :func:`host_rng` makes a
seeded NumPy ``Generator`` and values are moved with ``dev.asarray``, so one
seed gives identical weights on every backend.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import array_api_compat
import numpy as np

from ._typing import Array, ArrayNamespace
from .errors import BackendUnavailableError, DeviceError, DeviceMemoryError, DTypeError, NonFiniteError, XRNNError

__all__ = [
    "Device",
    "DEVICE_FORMS",
    "resolve_device",
    "auto_device",
    "available_devices",
    "to_numpy",
    "to_device",
    "device_of",
    "host_rng",
    "resolve_dtype",
    "dtype_name",
    "is_out_of_memory",
    "oom_guard",
    "assert_finite",
    "trusted_ids",
    "ids_trusted",
    "check_id_range",
]

DEVICE_FORMS = (
    '"auto"',
    '"cpu"',
    '"numpy"',
    '"cuda"',
    '"cuda:N"',
    '"cupy"',
    '"cupy:N"',
    '"torch:cpu"',
    '"torch:cuda:N"',
    '"array_api_strict"',
    '"array_api_strict:NAME" (NAME one of its devices, e.g. device1)',
    "an array or an array's .device",
)

CUDA_HINT = (
    'install CuPy for your CUDA version: pip install "xrnn-array[cuda12]" '
    '(CUDA 12) or pip install "xrnn-array[cuda13]" (CUDA 13)'
)

_FLOAT_NAMES = ("float16", "float32", "float64")


class Device:
    """A library plus a device inside it; the handle every xrnn object is built on.

    Attributes:
        library: ``"numpy"``, ``"cupy"``, ``"torch"`` or ``"array_api_strict"``.
        xp: the Array API namespace (``array_api_compat.numpy``, ...).
        native: the library's own device object (``"cpu"``, ``cupy.cuda.Device``,
            ``torch.device``, ``array_api_strict.Device``).
        name: the canonical string, e.g. ``"cpu"``, ``"cuda:0"``, ``"torch:cpu"``,
            ``"array_api_strict:device1"``; ``resolve_device(name)`` gives back
            an equal Device.
    """

    __slots__ = ("library", "_xp", "native", "name")

    def __init__(self, library: str, xp: Any, native: Any, name: str):
        self.library = library
        self._xp = xp  # None: the NumPy device's namespace, imported on first use
        self.native = native
        self.name = name

    @property
    def xp(self) -> Any:
        xp = self._xp
        if xp is None:  # array_api_compat.numpy: what `xrnn sample` never needs (its start-up)
            xp = self._xp = _import_numpy_namespace()
        return xp

    # -- identity ---------------------------------------------------------
    def __repr__(self) -> str:
        return f"Device({self.name!r})"

    def __str__(self) -> str:
        return self.name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    @property
    def is_gpu(self) -> bool:
        return self.library == "cupy" or (self.library == "torch" and self.name.startswith("torch:cuda"))

    @property
    def has_current_device(self) -> bool:
        """True for libraries that run every operation on a *current* device (CuPy): ``with dev:`` selects it."""
        return self.library in _CURRENT_DEVICE_LIBRARIES

    # -- context ----------------------------------------------------------
    def __enter__(self):
        if self.library in _CURRENT_DEVICE_LIBRARIES:
            self.native.__enter__()
        return self

    def __exit__(self, *exc):
        if self.library in _CURRENT_DEVICE_LIBRARIES:
            return self.native.__exit__(*exc)
        return False

    # -- creation ---------------------------------------------------------
    def dtype(self, name: Any) -> Any:
        """The namespace's dtype object for a float dtype name or object."""
        return resolve_dtype(self, name)

    def asarray(self, value: Any, dtype: Any = None) -> Array:
        """Copy host data (NumPy array, Python scalars/lists) onto this device.

        ``dtype`` is a name (``"float32"``) or a dtype object; None keeps the
        value's own dtype.
        """
        if dtype is not None:
            dtype = resolve_dtype(self, dtype, floating_only=False)
        if not isinstance(value, np.ndarray):
            value = np.asarray(value)
        with self:
            if self.library == "numpy":
                out = np.array(value, dtype=dtype, copy=True)
                return out
            if self.library in _CURRENT_DEVICE_LIBRARIES:
                return self.xp.asarray(value, dtype=dtype)  # on the current device, selected above
            return self.xp.asarray(value, dtype=dtype, device=self.native)

    def zeros(self, shape: Any, dtype: Any) -> Array:
        with self:
            dt = resolve_dtype(self, dtype, floating_only=False)
            if self.library == "numpy":
                return np.zeros(shape, dtype=dt)
            return self.xp.zeros(shape, dtype=dt, device=self._create_device())

    def _create_device(self):
        # CuPy's creation functions ignore device= (they use the current
        # device, selected by `with self:`); the others need it.
        return None if self.library in _CURRENT_DEVICE_LIBRARIES else self.native

    # -- checks -----------------------------------------------------------
    def holds(self, x: Any) -> bool:
        """True when ``x`` is an array of this library on this device."""
        try:
            return device_of(x) == self
        except DeviceError:
            return False

    def check(self, x: Any, what: str = "input") -> None:
        """Raise DeviceError unless ``x`` is an array on this device."""
        if self.holds(x):
            return
        try:
            other = device_of(x).name
        except DeviceError:
            other = f"not an array (a {type(x).__name__})"
            raise DeviceError(
                f"{what} must be an array on {self.name}, got {other}; "
                f"convert it with xrnn.to_device(value, {self.name!r})"
            ) from None
        raise DeviceError(
            f"{what} is on {other} but the model is on {self.name}; nothing is moved "
            f"silently: move the array with xrnn.to_device(array, {self.name!r}) "
            f"or the model with model.to({other!r})"
        )


# ---------------------------------------------------------------------------
# resolution
# ---------------------------------------------------------------------------

def _unknown(spec: Any) -> DeviceError:
    return DeviceError(
        f"unknown device {spec!r}; expected one of: " + ", ".join(DEVICE_FORMS)
    )


#: Devices resolved so far, by canonical name: resolving is a dictionary lookup after the first time
_RESOLVED: dict = {}


#: NumPy submodules that ``array_api_compat.numpy`` would import only to copy them into its
#: namespace (its ``from numpy import *`` and ``dir(numpy)`` touch every lazy submodule);
#: xrnn uses none of them through ``xp``, and numpy.testing and numpy.f2py alone cost more
#: start-up time than ``import numpy`` (``python -X importtime``)
_UNUSED_NUMPY_SUBMODULES = frozenset({"testing", "f2py", "ma", "polynomial", "ctypeslib", "test", "matlib", "char",
                                      "rec", "strings", "core"})


def _import_numpy_namespace():
    """``array_api_compat.numpy``, imported without NumPy's unused lazy submodules.

    While it is first imported, ``numpy.__all__`` and ``dir(numpy)`` leave out
    :data:`_UNUSED_NUMPY_SUBMODULES` (restored right after, so ``numpy.testing``
    and friends import as usual for whoever asks for them). The namespace then
    lacks only those attributes.
    """
    import sys

    if "array_api_compat.numpy" in sys.modules:
        return sys.modules["array_api_compat.numpy"]
    g = vars(np)
    saved_all, saved_dir = g.get("__all__"), g.get("__dir__")
    skip = _UNUSED_NUMPY_SUBMODULES.difference(g)  # already imported ones cost nothing
    try:
        if saved_all is not None and skip:
            g["__all__"] = [n for n in saved_all if n not in skip]
        if callable(saved_dir) and skip:
            g["__dir__"] = lambda: [n for n in saved_dir() if n not in skip]
        import array_api_compat.numpy as xnp
    finally:
        if saved_all is not None:
            g["__all__"] = saved_all
        if saved_dir is not None:
            g["__dir__"] = saved_dir
    return xnp


def _numpy_device() -> Device:
    dev = _RESOLVED.get("cpu")
    if dev is None:
        dev = _RESOLVED["cpu"] = Device("numpy", None, "cpu", "cpu")  # its namespace on first use of .xp
    return dev


# -- CuPy: resolved once per GPU, after a first-contact probe ------------------

#: the CUDA major version each CuPy extra of xrnn is built for
_CUDA_EXTRAS = {12: "cuda12", 13: "cuda13"}
#: Devices that passed the first-contact probe, by GPU index (CuPy devices are not hashable: keep the Device)
_CUPY_DEVICES: dict = {}
#: the number of GPUs CuPy sees, read once per process
_CUPY_COUNT: list = []


def _cupy_major(cupy: Any) -> int | None:
    """The CUDA major version the installed CuPy is built for (13 for cupy-cuda13x), or None."""
    try:
        return int(cupy.cuda.runtime.runtimeGetVersion()) // 1000
    except Exception:
        pass
    import importlib.metadata

    for major, extra in sorted(_CUDA_EXTRAS.items(), reverse=True):
        try:
            importlib.metadata.version(f"cupy-{extra}x")
            return major
        except Exception:
            pass
    return None


def _ctk_fix(major: int | None) -> str:
    """How to get NVRTC, the CUDA headers and cuBLAS for the installed CuPy."""
    if major in _CUDA_EXTRAS:
        extra = _CUDA_EXTRAS[major]
        return (f'pip install "xrnn-array[{extra}]" (it installs cupy-{extra}x[ctk]: NVRTC, the CUDA headers and '
                f"cuBLAS from PyPI), or install the CUDA {major} toolkit and set CUDA_PATH; in Docker, use "
                "docker/Dockerfile.cuda or an nvidia/cuda -devel image (a -runtime image has no headers)")
    return ('install the CUDA toolkit matching your CuPy (pip install "xrnn-array[cuda12]" or "xrnn-array[cuda13]" '
            "brings it from PyPI) or set CUDA_PATH")


def _driver_message(cupy: Any, index: int, e: BaseException) -> str:
    """Why CuPy sees no usable GPU, from the error of ``getDeviceCount``."""
    text = f"{type(e).__name__}: {e}"
    head = f"device 'cuda:{index}': CuPy is installed but sees no CUDA GPU ({text})"
    if "InsufficientDriver" in text or "driver version is insufficient" in text:
        major = _cupy_major(cupy)
        try:
            driver = int(cupy.cuda.runtime.driverGetVersion())
        except Exception:
            driver = 0
        if driver <= 0:
            return (head + "; no NVIDIA driver was found (libcuda): install the NVIDIA driver and check nvidia-smi; "
                    "in a container, run it with --gpus all (the NVIDIA Container Toolkit); or use device='cpu'")
        have = f"{driver // 1000}.{driver % 1000 // 10}"
        built = f"CUDA {major}" if major else "a newer CUDA"
        # an older CUDA major that this driver runs, with its own extra (cuda12 for a cupy-cuda13x wheel)
        older = [m for m in sorted(_CUDA_EXTRAS) if major is not None and m < major and driver // 1000 >= m]
        if older:
            alt = (f"or install the CUDA {older[-1]} build instead: pip uninstall -y cupy-cuda{major}x "
                   f'&& pip install "xrnn-array[{_CUDA_EXTRAS[older[-1]]}]"')
        else:
            alt = "or use device='cpu'"
        return (head + f"; the NVIDIA driver supports CUDA up to {have} but this CuPy is built for {built}: "
                f"update the NVIDIA driver, {alt}")
    if "NoDevice" in text or "no CUDA-capable device" in text:
        return (head + "; no GPU is visible: check nvidia-smi and CUDA_VISIBLE_DEVICES (in a container: "
                "--gpus all), or use device='cpu'")
    return head + "; check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES, or use device='cpu'"


#: the probe's result: reshape([1, 2, 3, 4] ** 2 + 1, (2, 2)) squared
_PROBE_EXPECTED = np.array([[54.0, 95.0], [190.0, 339.0]])


def _probe_message(index: int, stage: str, e: BaseException, major: int | None) -> str:
    """The BackendUnavailableError text for a failure of the first-contact probe."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    low = text.lower()
    head = f"device 'cuda:{index}': CuPy cannot run on this GPU yet"
    if is_out_of_memory(e):
        what = ("the GPU is out of memory at the first allocation (another process may hold it: see nvidia-smi); "
                "free it or pick another GPU (cuda:N)")
    elif "nvrtc" in low and any(t in low for t in ("failure finding", "not found", "no such file",
                                                     "cannot open shared object", "could not load", "failed to load")):
        what = ("NVRTC (libnvrtc, the run-time compiler CuPy builds its element-wise kernels with) is missing; "
                + _ctk_fix(major))
    elif (".h" in low and any(t in low for t in ("cannot open source file", "could not open source file",
                                                  "no such file", "not found"))) or "catastrophic error" in low:
        what = ("the CUDA headers are missing (NVRTC could not open one, e.g. cuda_fp16.h or vector_types.h); "
                + _ctk_fix(major))
    elif "cublas" in low:
        what = "cuBLAS (libcublas, for matrix products) is missing or could not be loaded; " + _ctk_fix(major)
    elif "ptx" in low and ("unsupported" in low or "version" in low):
        what = ("the NVIDIA driver is older than the NVRTC that compiled the kernel; update the NVIDIA driver, or "
                "install the CUDA toolkit packages of the driver's CUDA version (nvidia-smi shows it)")
    elif "no kernel image" in low or "nokernelimage" in low:
        what = "this CuPy build has no code for this GPU's architecture; install a CuPy build that supports it"
    else:
        what = f"check the CUDA installation (python -c 'import cupy; cupy.show_config()'); {_ctk_fix(major)}"
    return f"{head}: {stage} failed ({text}); {what}"


def _probe_cupy(cupy: Any, xcp: Any, native: Any, index: int) -> None:
    """Run a tiny element-wise kernel and a tiny matrix product on GPU ``index``; raise a clear error if not.

    The element-wise kernel needs NVRTC and the CUDA headers (CuPy compiles
    it at first use), the product needs cuBLAS; neither ships with the plain
    CuPy wheel. One read of 4 numbers checks the result.
    """
    stage = "the first allocation"
    try:
        with native:
            a = xcp.asarray(np.arange(1.0, 5.0, dtype=np.float32))  # (4,)
            stage = "an element-wise kernel (NVRTC and the CUDA headers)"
            b = xcp.reshape(a * a + 1.0, (2, 2))  # (2, 2)
            stage = "a matrix product (cuBLAS)"
            c = xcp.matmul(b, b)  # (2, 2)
            stage = "reading the result back"
            host = np.asarray(c.get(), dtype=np.float64)
    except Exception as e:
        raise BackendUnavailableError(_probe_message(index, stage, e, _cupy_major(cupy))) from e
    if host.shape != _PROBE_EXPECTED.shape or not np.allclose(host, _PROBE_EXPECTED):
        raise BackendUnavailableError(
            f"device 'cuda:{index}': a test matrix product gave {host.tolist()} instead of "
            f"{_PROBE_EXPECTED.tolist()}; the GPU or its CUDA installation is broken (see nvidia-smi)"
        )


def _cupy_count(cupy: Any) -> int:
    """CuPy's GPU count, read once per process (a failure is not cached: it raises each time)."""
    if not _CUPY_COUNT:
        _CUPY_COUNT.append(int(cupy.cuda.runtime.getDeviceCount()))
    return _CUPY_COUNT[0]


def _cupy_device(index: int) -> Device:
    dev = _CUPY_DEVICES.get(index)
    if dev is not None:
        return dev
    try:
        import array_api_compat.cupy as xcp
        import cupy  # noqa: F401
    except Exception as e:  # ImportError, or a CUDA library failing to load
        raise BackendUnavailableError(
            f"device 'cuda:{index}' needs CuPy, which could not be imported ({e}); {CUDA_HINT}"
        ) from None
    try:
        count = _cupy_count(cupy)
    except Exception as e:
        raise BackendUnavailableError(_driver_message(cupy, index, e)) from None
    if count == 0:
        raise BackendUnavailableError(
            f"device 'cuda:{index}': CuPy is installed but no CUDA GPU is visible; check nvidia-smi and "
            "CUDA_VISIBLE_DEVICES (in a container: --gpus all), or use device='cpu'"
        )
    if not 0 <= index < count:
        raise BackendUnavailableError(
            f"device 'cuda:{index}' does not exist: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}"
            + (" (CUDA_VISIBLE_DEVICES hides the others)" if os.environ.get("CUDA_VISIBLE_DEVICES") else "")
        )
    native = cupy.cuda.Device(index)
    _probe_cupy(cupy, xcp, native, index)
    dev = _CUPY_DEVICES[index] = Device("cupy", xcp, native, f"cuda:{index}")
    return dev


def _cached(key: str, make: Callable[[], Device]) -> Device:
    """The Device resolved under ``key`` before, else ``make()``'s, kept for next time."""
    dev = _RESOLVED.get(key)
    if dev is None:
        dev = _RESOLVED[key] = make()
    return dev


def _torch_device(kind: str) -> Device:
    return _cached(f"torch:{kind}", lambda: _torch_device_uncached(kind))


def _torch_device_uncached(kind: str) -> Device:
    try:
        import array_api_compat.torch as xt
        import torch
    except Exception as e:
        raise BackendUnavailableError(
            f"device 'torch:{kind}' needs PyTorch, which could not be imported ({e}); "
            "pip install torch, or use device='cpu' (NumPy)"
        ) from None
    dev = torch.device(kind)
    if dev.type == "cuda":
        index = 0 if dev.index is None else dev.index
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise BackendUnavailableError(
                f"device 'torch:cuda:{index}' is not available: PyTorch sees "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
        dev = torch.device("cuda", index)
        return Device("torch", xt, dev, f"torch:cuda:{index}")
    if dev.type != "cpu":
        raise _unknown(f"torch:{kind}")
    return Device("torch", xt, dev, "torch:cpu")


def _strict_device(name: str) -> Device:
    return _cached(f"array_api_strict:{name}", lambda: _strict_device_uncached(name))


def _strict_device_uncached(name: str) -> Device:
    try:
        import array_api_strict as xs
    except Exception as e:
        raise BackendUnavailableError(
            f"device 'array_api_strict:{name}' needs array-api-strict ({e}); pip install array-api-strict"
        ) from None
    names = [d._device for d in xs.__array_namespace_info__().devices()]
    if name not in names:
        raise DeviceError(
            f"array_api_strict has no device {name!r}; its devices are {', '.join(names)}"
        )
    return Device("array_api_strict", xs, xs.Device(name), f"array_api_strict:{name}")


def _strict_name(native: Any) -> str:
    """The name of an array_api_strict device (compared through its public ==)."""
    import array_api_strict as xs

    name = getattr(native, "_device", None)
    if isinstance(name, str) and native == xs.Device(name):
        return name
    for d in xs.__array_namespace_info__().devices():
        if d == native:
            return d._device
    raise DeviceError(f"unknown array_api_strict device {native!r}")


def _parse_int(text: str, spec: str) -> int:
    if not text.isdigit():
        raise _unknown(spec)
    return int(text)


def _from_string(spec: str) -> Device:
    s = spec.strip()
    low = s.lower()
    if low in ("cpu", "numpy", "numpy:cpu"):
        return _numpy_device()
    if low == "auto":
        return _resolve_auto()
    if low in ("cuda", "cupy", "gpu"):
        return _cupy_device(0)
    for prefix in ("cuda:", "cupy:", "gpu:"):
        if low.startswith(prefix):
            return _cupy_device(_parse_int(low[len(prefix):], spec))
    if low == "torch" or low == "torch:cpu":
        return _torch_device("cpu")
    if low == "torch:cuda":
        return _torch_device("cuda:0")
    if low.startswith("torch:cuda:"):
        return _torch_device(f"cuda:{_parse_int(low[len('torch:cuda:'):], spec)}")
    if low in ("array_api_strict", "array-api-strict", "strict"):
        return _strict_device("CPU_DEVICE")
    for prefix in ("array_api_strict:", "array-api-strict:", "strict:"):
        if low.startswith(prefix):
            return _strict_device(s[len(prefix):])
    lib, _, rest = low.partition(":")
    if lib in _TEST_LIBRARIES:
        return _test_device(lib, _parse_int(rest or "0", spec))
    raise _unknown(spec)


def auto_device() -> tuple[Device, str]:
    """What ``device="auto"`` picks, and why, in words: ``(device, reason)``.

    The first CUDA GPU (CuPy) on which a one-element array can be made, else
    the NumPy CPU device. ``reason`` is one line for the user, e.g.
    ``"using GPU cuda:0"`` or ``"no usable GPU (CuPy is not installed); using
    the CPU"``. The library itself prints nothing: ``resolve_device("auto")``
    logs the reason at INFO level on the ``"xrnn"`` logger, and the ``xrnn``
    command prints it.
    """
    try:
        import cupy
    except ImportError:
        return _numpy_device(), "no usable GPU (CuPy is not installed); using the CPU"
    try:
        count = _cupy_count(cupy)
    except Exception as e:  # a CUDA library failing to load, no driver, ...
        return _numpy_device(), f"no usable GPU (CuPy sees no CUDA GPU: {_first_line(e)}); using the CPU"
    if count <= 0:
        return _numpy_device(), "no usable GPU (CuPy is installed but no CUDA GPU is visible); using the CPU"
    failures = []
    for i in range(count):
        try:
            dev = _cupy_device(i)  # runs the first-contact probe: a kernel, a matrix product, a read
        except Exception as e:
            failures.append(f"cuda:{i}: {_first_line(e)}")
            continue
        skipped = f" ({'; '.join(failures)})" if failures else ""
        return dev, f"using GPU {dev.name}{skipped}"
    return _numpy_device(), f"no usable GPU ({'; '.join(failures)}); using the CPU"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _resolve_auto() -> Device:
    import logging

    dev, reason = auto_device()
    logging.getLogger("xrnn").info("device='auto': %s", reason)
    return dev


def _from_native(obj: Any) -> Device | None:
    """Device objects of the supported libraries (what ``array.device`` returns)."""
    mod = type(obj).__module__ or ""
    if mod.startswith("cupy"):
        return _cupy_device(int(obj.id))
    if mod.startswith("torch"):
        return _torch_device(str(obj))
    if mod.startswith("array_api_strict"):
        return _strict_device(_strict_name(obj))
    for name, lib in _TEST_LIBRARIES.items():
        if lib["owns_device"](obj):
            return _test_device(name, lib["index_of"](obj))
    return None


def resolve_device(spec: Any = "cpu") -> Device:
    """Turn a device specification into a :class:`Device` (see module docstring).

    Raises:
        DeviceError: the specification is not one of :data:`DEVICE_FORMS`.
        BackendUnavailableError: the library or GPU it names is missing here.
    """
    if isinstance(spec, Device):
        return spec
    if spec is None:
        return _numpy_device()
    if isinstance(spec, str):
        return _from_string(spec)
    if array_api_compat.is_array_api_obj(spec) and not isinstance(spec, (int, float, complex, bool)):
        return device_of(spec)
    native = _from_native(spec)
    if native is not None:
        return native
    raise _unknown(spec)


def device_of(x: Any) -> Device:
    """The Device holding array ``x`` (DeviceError if ``x`` is not an array)."""
    if isinstance(x, (np.ndarray, np.generic)):  # NumPy reductions return np.generic scalars
        return _numpy_device()
    if isinstance(x, (int, float, complex, bool, list, tuple)) or x is None:
        raise DeviceError(f"expected an array, got a {type(x).__name__}")
    if array_api_compat.is_cupy_array(x):
        return _cupy_device(int(x.device.id))
    if array_api_compat.is_torch_array(x):
        return _torch_device(str(x.device))
    mod = type(x).__module__ or ""
    if mod.startswith("array_api_strict"):
        return _strict_device(_strict_name(x.device))
    for name, lib in _TEST_LIBRARIES.items():
        if lib["owns"](x):
            return _test_device(name, lib["index_of"](x.device))
    raise DeviceError(
        f"arrays of type {type(x).__module__}.{type(x).__name__} are not supported; "
        "xrnn runs on numpy, cupy, torch and array_api_strict arrays"
    )


def available_devices() -> list[str]:
    """Canonical names of every device that works on this machine, CPU first."""
    out = ["cpu"]
    try:
        import cupy

        for i in range(cupy.cuda.runtime.getDeviceCount()):
            try:
                out.append(_cupy_device(i).name)  # only GPUs that pass the first-contact probe
            except XRNNError:
                pass
    except Exception:
        pass
    try:
        import array_api_compat.torch  # noqa: F401
        import torch

        out.append("torch:cpu")
        if torch.cuda.is_available():
            out.extend(f"torch:cuda:{i}" for i in range(torch.cuda.device_count()))
    except Exception:
        pass
    try:
        import array_api_strict as xs

        out.extend(f"array_api_strict:{d._device}" for d in xs.__array_namespace_info__().devices())
    except Exception:
        pass
    return out


# ---------------------------------------------------------------------------
# test-facing hook: an extra array library for the test suite
# ---------------------------------------------------------------------------

#: libraries whose operations run on a *current* device, selected by ``with dev:`` (CuPy, and test stand-ins)
_CURRENT_DEVICE_LIBRARIES = {"cupy"}
_TEST_LIBRARIES: dict = {}


def register_test_library(name: str, *, xp: Any, make_native: Any, count: int, owns: Any, owns_device: Any,
                          index_of: Any, to_host: Any) -> None:
    """FOR TESTS ONLY: make ``resolve_device(f"{name}:N")`` give a Device of a test array library.

    xrnn treats it as a library with a current device, like CuPy: ``with
    dev:`` enters ``make_native(N)`` and creation passes no ``device=``. The
    test suite registers ``tests/fakecupy.py`` (a host-only namespace that
    catches CuPy's hazards: wrong current device, host reads) with it.

    Args:
        name: the library name and spec prefix (lower case, e.g. ``"fakecupy"``).
        xp: its Array API namespace.
        make_native: ``N -> device object`` (a context manager that makes device N current).
        count: number of devices (0..count-1).
        owns / owns_device: whether an object is one of its arrays / device objects.
        index_of: ``device object -> N``.
        to_host: ``array -> numpy.ndarray``.
    """
    _TEST_LIBRARIES[name] = dict(xp=xp, make_native=make_native, count=int(count), owns=owns,
                                 owns_device=owns_device, index_of=index_of, to_host=to_host)
    _CURRENT_DEVICE_LIBRARIES.add(name)


def unregister_test_library(name: str) -> None:
    """Undo :func:`register_test_library` (FOR TESTS ONLY)."""
    _TEST_LIBRARIES.pop(name, None)
    _CURRENT_DEVICE_LIBRARIES.discard(name)
    for key in [k for k in _RESOLVED if k.startswith(f"{name}:")]:
        del _RESOLVED[key]


def _test_device(name: str, index: int) -> Device:
    key = f"{name}:{index}"
    dev = _RESOLVED.get(key)
    if dev is None:
        lib = _TEST_LIBRARIES[name]
        if not 0 <= index < lib["count"]:
            raise BackendUnavailableError(f"device {key!r} does not exist: {name} has devices 0..{lib['count'] - 1}")
        dev = _RESOLVED[key] = Device(name, lib["xp"], lib["make_native"](index), key)
    return dev


# ---------------------------------------------------------------------------
# moving data
# ---------------------------------------------------------------------------

def to_numpy(a: Any) -> np.ndarray:
    """Bring any supported array (or scalar, or nested list) to a host NumPy array."""
    if isinstance(a, np.ndarray):
        return a
    if array_api_compat.is_cupy_array(a):
        return a.get()
    if array_api_compat.is_torch_array(a):
        return a.detach().cpu().numpy()
    mod = type(a).__module__ or ""
    if mod.startswith("array_api_strict"):
        import array_api_strict as xs

        return np.asarray(a.to_device(xs.Device("CPU_DEVICE")))
    for lib in _TEST_LIBRARIES.values():
        if lib["owns"](a):
            return lib["to_host"](a)
    return np.asarray(a)


def to_device(a: Any, device: Any, dtype: Any = None) -> Array:
    """Move (copy) array ``a`` from any supported library onto ``device``.

    The explicit way to move data between libraries or devices; xrnn itself
    never moves an input silently. With ``dtype`` the result is always a new
    array; without it, an array already on ``device`` is returned as is.
    """
    dev = resolve_device(device)
    try:
        src = device_of(a)
    except DeviceError:
        src = None
    if src == dev:
        if dtype is None:
            return a
        dt = resolve_dtype(dev, dtype, floating_only=False)
        if dev.library == "numpy":
            return a.astype(dt, copy=True)
        with dev:
            return dev.xp.astype(a, dt, copy=True)
    if src is not None and src.library == dev.library == "cupy":
        with dev:
            if dtype is None:
                return dev.xp.asarray(a)
            return dev.xp.asarray(a, dtype=resolve_dtype(dev, dtype, floating_only=False))
    return dev.asarray(to_numpy(a), dtype=dtype)


def int_shape(x: Any) -> tuple:
    """``x.shape`` as a tuple of Python ints, whatever the library's shape type (torch.Size, ...)."""
    return tuple(int(s) for s in x.shape)


def host_rng(seed: Any = None) -> np.random.Generator:
    """A NumPy Generator for ``seed`` (an int, None for fresh entropy, or a Generator)."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------

def dtype_name(dtype: Any) -> str:
    """``"float32"`` for any library's float32 (or the string itself)."""
    if isinstance(dtype, str):
        return dtype
    try:
        return np.dtype(dtype).name
    except TypeError:
        pass
    text = str(dtype)
    return text.rsplit(".", 1)[-1]


def resolve_dtype(dev: Device, dtype: Any, floating_only: bool = True) -> Any:
    """The namespace's dtype object for ``dtype`` on ``dev``.

    With ``floating_only`` only float16/float32/float64 are accepted (model
    parameters); float16 only where the library has it.
    """
    name = dtype_name(dtype)
    if floating_only and name not in _FLOAT_NAMES:
        raise DTypeError(
            f"dtype {name!r} is not supported for parameters; expected 'float32' (default), 'float64' or 'float16'"
        )
    # NumPy's dtypes are array_api_compat.numpy's own objects; taking them from NumPy leaves that
    # namespace unimported where nothing else needs it
    dt = getattr(np if dev.library == "numpy" else dev.xp, name, None)
    if dt is None:
        raise DTypeError(f"dtype {name!r} is not available on {dev.name}")
    if dev.library == "array_api_strict" and not _strict_supports(dev, name):
        raise DTypeError(
            f"dtype {name!r} is not supported on {dev.name} (that array-api-strict device has no such dtype); "
            "use float32, or another device"
        )
    return dt


_STRICT_DTYPES: dict = {}


def _strict_supports(dev: Device, name: str) -> bool:
    """Whether an array-api-strict device has dtype ``name`` (some, like ``no_float64``, lack one)."""
    key = dev.name
    if key not in _STRICT_DTYPES:
        try:
            _STRICT_DTYPES[key] = set(dev.xp.__array_namespace_info__().dtypes(device=dev.native))
        except Exception:  # an older array-api-strict without per-device dtypes: assume all
            _STRICT_DTYPES[key] = None
    names = _STRICT_DTYPES[key]
    return names is None or name in names


# ---------------------------------------------------------------------------
# faults: out of memory, non-finite values
# ---------------------------------------------------------------------------

#: what to try after an out-of-memory error (the Python option and the command-line flag)
OOM_HINT = (
    "use a smaller batch (batch_size=, --batch-size), a shorter window (seq_len=, --seq-len) "
    "or a smaller model (hidden_size=, --hidden-size; num_layers=, --num-layers)"
)

# Messages of backend errors that are out-of-memory errors without saying so in
# their class: CUDA runtime/driver and cuBLAS allocation failures (CuPy), and
# PyTorch's CPU allocator.
_OOM_TEXT = ("out of memory", "OUT_OF_MEMORY", "ALLOC_FAILED", "cudaErrorMemoryAllocation",
             "can't allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True when ``exc`` is a backend's out-of-memory error (not an xrnn error, e.g. a DeviceMemoryError).

    Recognised without importing any GPU library: every ``MemoryError``
    (NumPy's ``_ArrayMemoryError``, CuPy's ``cupy.cuda.memory.OutOfMemoryError``),
    PyTorch's ``torch.OutOfMemoryError`` (a RuntimeError) by class name and
    module, and CuPy/PyTorch errors whose message reports a failed allocation
    (``cudaErrorMemoryAllocation``, ``CUBLAS_STATUS_ALLOC_FAILED``, ...).
    """
    if isinstance(exc, XRNNError):  # classified already (DeviceMemoryError from an inner guard, ...)
        return False
    if isinstance(exc, MemoryError):
        return True
    for cls in type(exc).__mro__:
        top = (cls.__module__ or "").split(".")[0]
        if cls.__name__ == "OutOfMemoryError" and top in ("torch", "cupy", "cupy_backends"):
            return True
    top = (type(exc).__module__ or "").split(".")[0]
    if top in ("torch", "cupy", "cupy_backends") or type(exc) is RuntimeError:  # torch's CPU allocator
        text = str(exc)
        return any(t in text for t in _OOM_TEXT)
    return False


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"`` (binary units)."""
    n = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _release_pool(dev: Device) -> str:
    """After an out-of-memory error on CuPy: give the memory pool's cached blocks back to the GPU.

    CuPy keeps freed blocks in its pool for reuse; after a failed step they
    would stay reserved, so a retry with a smaller batch (or anything else on
    the GPU) would fail too. Returns a note for the message (empty if none).
    """
    if dev.library != "cupy":
        return ""
    try:
        import cupy

        with dev:
            pool = cupy.get_default_memory_pool()
            held = pool.total_bytes() - pool.used_bytes()
            pool.free_all_blocks()
            cupy.get_default_pinned_memory_pool().free_all_blocks()
        return f"freed {format_bytes(held)} of cached blocks from CuPy's memory pool" if held > 0 else ""
    except Exception:
        return ""


def _memory_status(dev: Device) -> str:
    """Free/total memory of a GPU device, best effort (empty when unknown)."""
    try:
        if dev.library == "cupy":
            import cupy

            with dev:
                free, total = cupy.cuda.runtime.memGetInfo()
                pool = cupy.get_default_memory_pool().total_bytes()
            return (f"{dev.name} has {format_bytes(free)} free of {format_bytes(total)} "
                    f"(CuPy's pool holds {format_bytes(pool)})")
        if dev.library == "torch" and dev.is_gpu:
            import torch

            free, total = torch.cuda.mem_get_info(dev.native)
            return f"{dev.name} has {format_bytes(free)} free of {format_bytes(total)}"
    except Exception:
        pass
    return ""


_guards = threading.local()


@contextlib.contextmanager
def oom_guard(device: Any, what: str, sizes: Any = None, hint: str = OOM_HINT) -> Iterator[None]:
    """Re-raise a backend's out-of-memory error inside the block as :class:`~xrnn.errors.DeviceMemoryError`.

    Args:
        device: the Device (or spec) the block allocates on; named in the message.
        what: the operation, e.g. ``"the forward pass of LSTM(65, 128)"``.
        sizes: the sizes being allocated, as a string or a callable returning
            one (called only after a failure), e.g. ``"T=50, B=50, H=128, 2
            layers, float32: about 12.3 MiB"``.
        hint: how to use less memory.

    Errors that are not out-of-memory errors (see :func:`is_out_of_memory`)
    pass through unchanged; the original error is chained (``__cause__``).
    On CuPy the memory pool's cached blocks are freed before the error is
    raised, so that memory is usable again by whatever runs next.
    Guards nest: only the outermost one converts, since it knows the most
    about what the user asked for (a training step rather than one layer).
    """
    if getattr(_guards, "depth", 0):
        yield
        return
    _guards.depth = 1
    try:
        yield
    except BaseException as e:
        if not is_out_of_memory(e):
            raise
        try:
            dev = resolve_device(device)
            name = dev.name
        except Exception:
            dev, name = None, str(device)
        detail = sizes() if callable(sizes) else sizes
        parts = [f"out of memory on {name} during {what}"]
        if detail:
            parts[0] += f" ({detail})"
        original = " ".join(str(e).split())
        if original:
            parts.append(f"the backend said: {type(e).__name__}: {original}")
        freed = _release_pool(dev) if dev is not None else ""
        if freed:
            parts.append(freed)
        status = _memory_status(dev) if dev is not None else ""
        if status:
            parts.append(status)
        if hint:
            parts.append(hint)
        raise DeviceMemoryError("; ".join(parts)) from e
    finally:
        _guards.depth = 0


def assert_finite(x: Any, what: str = "input", hint: str = "") -> None:
    """Raise :class:`~xrnn.errors.NonFiniteError` when floating array ``x`` holds NaN or infinity.

    ``x`` may be a NumPy array (checked on the host) or an array of any
    supported library (one reduction on its device and one host read of the
    result: a device synchronisation). Integer and boolean arrays pass. The
    message counts the NaN and infinite values and gives the index of the
    first one; ``hint`` is appended.
    """
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "fc":
            return
        with np.errstate(all="ignore"):
            if bool(np.isfinite(x).all()):
                return
        host = x
    else:
        dev = device_of(x)
        xp = dev.xp
        if not xp.isdtype(x.dtype, ("real floating", "complex floating")):
            return
        with dev:
            if bool(xp.all(xp.isfinite(x))):
                return
        host = to_numpy(x)
    bad = ~np.isfinite(host)
    n_nan = int(np.count_nonzero(np.isnan(host)))
    n_inf = int(np.count_nonzero(bad)) - n_nan
    first = np.unravel_index(int(np.argmax(bad.reshape(-1))), host.shape) if host.ndim else ()
    where = f"{what}[{', '.join(str(int(i)) for i in first)}]" if host.ndim else what
    counts = " and ".join(s for s in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} infinite" if n_inf else "") if s)
    msg = f"{what} holds {counts} value(s); the first is {where} = {host[first]}"
    raise NonFiniteError(msg + (f"; {hint}" if hint else ""))


# ---------------------------------------------------------------------------
# integer ids: the range check and the callers that may skip it
# ---------------------------------------------------------------------------

_trust = threading.local()


def ids_trusted() -> bool:
    """True inside a :func:`trusted_ids` block (of this thread)."""
    return getattr(_trust, "ids", False)


@contextlib.contextmanager
def trusted_ids() -> Iterator[None]:
    """Within this block, id range checks (:func:`check_id_range`, used by
    ``Embedding``, ``CharLM`` and ``softmax_cross_entropy``) are skipped.

    For callers that validated the ids on the host already (the trainer's
    corpus is encoded by the model's own vocabulary; the sampler draws ids in
    range by construction): the check reads the min and max back from the
    device, a host synchronisation per call. Dtype, shape and device are
    still checked.
    """
    previous = ids_trusted()
    _trust.ids = True
    try:
        yield
    finally:
        _trust.ids = previous


def check_id_range(xp: ArrayNamespace, flat: Any, n: int, what: str, fix: str, kind: str = "vocabulary") -> None:
    """Raise :class:`~xrnn.errors.ShapeError` unless every id of ``flat`` (N,) is in ``[0, n)``.

    One host read (min and max together); skipped inside :func:`trusted_ids` and for empty arrays.
    """
    from .errors import ShapeError

    if ids_trusted() or not flat.shape[0]:
        return
    with device_of(flat):
        lo, hi = (int(v) for v in to_numpy(xp.stack([xp.min(flat), xp.max(flat)])))  # one host read
    if lo < 0 or hi >= n:
        bad = lo if lo < 0 else hi
        raise ShapeError(f"{what} contains {bad}, outside the {kind} range [0, {n}); {fix}")
