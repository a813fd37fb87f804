"""fakecupy: a TEST-ONLY array namespace that behaves like CuPy where xrnn can go wrong.

It is not a GPU and not an accelerator: every array is an array-api-strict
array on the host. It exists so that the hazards of CuPy's programming model,
which NumPy and array-api-strict cannot show, fail the test suite on a
machine without a GPU:

* **a current device.** ``Device(n)`` is a context manager, as
  ``cupy.cuda.Device``; outside any ``with`` block device 0 is current.
  Devices compare with ``==`` and are not hashable, as CuPy's.
* **creation on the current device.** ``zeros``, ``ones``, ``empty``,
  ``full``, ``arange``, ``eye``, ``linspace`` and the ``*_like`` functions
  ignore ``device=`` and allocate on the current device, as
  ``array_api_compat.cupy``'s do; ``asarray`` honours ``device=`` (an int or
  a ``Device``) by entering it, as array-api-compat's CuPy ``asarray`` does.
* **kernels run on the current device.** Every operation that launches a
  kernel on CuPy (operators, assignment, indexing with arrays, namespace
  functions) raises :class:`WrongDeviceError` when one of its arrays is not
  on the current device (CuPy refuses it, or copies peer to peer), or when
  its arrays are on different devices. Views (basic indexing, ``.T``,
  ``.mT``) launch nothing and are allowed anywhere, as on CuPy.
* **host reads are counted.** ``__bool__``, ``__float__``, ``__int__``,
  ``__index__``, ``__complex__``, ``__array__``, ``__dlpack__``, ``get()``,
  ``tolist()``, ``to_device("cpu")``, ``repr`` and the operations that
  synchronise on CuPy (boolean-mask indexing and assignment, ``nonzero``,
  the ``unique_*`` family, ``repeat`` with array repeats, and
  array-api-compat's generic CuPy ``clip`` and ``sign``, which assign through
  a boolean mask) append an entry to :data:`reads`. A training step may read
  the host only where xrnn says it does.

Devices 0 and 1 exist (array-api-strict's ``CPU_DEVICE`` and ``device1``
underneath, so mixing devices is also caught by array-api-strict itself).
:func:`register` plugs the namespace into :mod:`xrnn.backend` through its
test-facing hook, so ``xrnn.resolve_device("fakecupy:1")`` gives a
:class:`xrnn.Device` that xrnn treats as a library with a current device
(``with dev:`` enters ``Device(1)``, creation passes no ``device=``).
"""

from __future__ import annotations

import functools
import threading
import types
from typing import Any

import array_api_strict as xs
import numpy as np

__all__ = ["Device", "WrongDeviceError", "current", "ndarray", "reads", "register", "unregister", "xp"]

NAME = "fakecupy"
_STRICT = (xs.Device("CPU_DEVICE"), xs.Device("device1"))
COUNT = len(_STRICT)


class WrongDeviceError(RuntimeError):
    """An operation touched an array that is not on the current device (or mixed devices)."""


# ---------------------------------------------------------------------------
# host reads
# ---------------------------------------------------------------------------

class Reads(list):
    """The host reads seen, as ``(kind, size)`` pairs (``size``: elements of the array read)."""

    def kinds(self) -> list:
        return [k for k, _ in self]


#: every host read since the last ``reads.clear()``
reads = Reads()


def _read(kind: str, a: ndarray) -> None:
    reads.append((kind, int(a._a.size)))


# ---------------------------------------------------------------------------
# devices and the current device
# ---------------------------------------------------------------------------

_state = threading.local()


def _stack() -> list:
    s = getattr(_state, "stack", None)
    if s is None:
        s = _state.stack = []
    return s


def current() -> int:
    """The index of the current device (0 outside any ``with Device(n):``)."""
    s = _stack()
    return s[-1] if s else 0


class Device:
    """Like ``cupy.cuda.Device``: an index, ``==`` by index, unhashable, a context that makes it current."""

    __hash__ = None  # type: ignore[assignment]  # CuPy's devices are not hashable either

    def __init__(self, device: Any = None):
        if isinstance(device, Device):
            device = device.id
        n = current() if device is None else device
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < COUNT:
            raise ValueError(f"fakecupy has devices 0..{COUNT - 1}, got {device!r}")
        self.id = n

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and other.id == self.id

    def __enter__(self) -> Device:
        _stack().append(self.id)
        return self

    def __exit__(self, *exc) -> bool:
        _stack().pop()
        return False

    def __repr__(self) -> str:
        return f"<fakecupy Device {self.id}>"


def _check(arrays: list, what: str) -> int:
    """The current device, after checking that every array is on it."""
    cur = current()
    for a in arrays:
        if a._dev != cur:
            raise WrongDeviceError(
                f"fakecupy: {what} on an array of device {a._dev} while device {cur} is current "
                f"(on CuPy this runs on the wrong GPU); run it inside `with <its device>:`"
            )
    return cur


# ---------------------------------------------------------------------------
# the array
# ---------------------------------------------------------------------------

def _wrap(out: Any, dev: int) -> Any:
    if type(out).__name__ == "Array" and type(out).__module__.startswith("array_api_strict"):
        return ndarray(out, dev)
    if isinstance(out, tuple):
        items = [_wrap(o, dev) for o in out]
        return type(out)(*items) if hasattr(out, "_fields") else tuple(items)
    if isinstance(out, list):
        return [_wrap(o, dev) for o in out]
    return out


def _unwrap(obj: Any, found: list) -> Any:
    if isinstance(obj, ndarray):
        found.append(obj)
        return obj._a
    if isinstance(obj, tuple):
        return tuple(_unwrap(o, found) for o in obj)
    if isinstance(obj, list):
        return [_unwrap(o, found) for o in obj]
    if isinstance(obj, dict):
        return {k: _unwrap(v, found) for k, v in obj.items()}
    return obj


def _has_bool_mask(key: Any) -> bool:
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, ndarray) and k._a.dtype == xs.bool for k in keys)


class ndarray:  # lower case: CuPy's name
    """An array on one fakecupy device (an array-api-strict array underneath)."""

    __slots__ = ("_a", "_dev")
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, a: Any, dev: int):
        self._a = a
        self._dev = dev

    # -- metadata: no kernel, no read --------------------------------------
    @property
    def shape(self) -> tuple:
        return self._a.shape

    @property
    def dtype(self):
        return self._a.dtype

    @property
    def ndim(self) -> int:
        return self._a.ndim

    @property
    def size(self) -> int:
        return self._a.size

    @property
    def device(self) -> Device:
        return Device(self._dev)

    def __array_namespace__(self, *, api_version: Any = None):
        return xp

    # -- host reads ---------------------------------------------------------
    def _host(self) -> np.ndarray:
        return np.array(self._a.to_device(_STRICT[0]), copy=True) if self._dev else np.array(self._a, copy=True)

    def get(self) -> np.ndarray:
        """The values on the host (``cupy.ndarray.get``): a read."""
        _read("get", self)
        return self._host()

    def tolist(self):
        _read("tolist", self)
        return self._host().tolist()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        _read("__array__", self)
        h = self._host()
        return h if dtype is None else h.astype(dtype)

    def __dlpack__(self, *a, **k):
        _read("__dlpack__", self)
        return self._host().__dlpack__(*a, **k)

    def __bool__(self) -> bool:
        _read("__bool__", self)
        return bool(self._host())

    def __float__(self) -> float:
        _read("__float__", self)
        return float(self._host())

    def __int__(self) -> int:
        _read("__int__", self)
        return int(self._host())

    def __index__(self) -> int:
        _read("__index__", self)
        h = self._host()
        if h.ndim or h.dtype.kind not in "iu":
            raise TypeError("only integer 0-d arrays can be used as an index")
        return int(h)

    def __complex__(self) -> complex:
        _read("__complex__", self)
        return complex(self._host())

    def __repr__(self) -> str:
        _read("__repr__", self)
        return f"fakecupy.ndarray({self._host()!r}, device={self._dev})"

    __str__ = __repr__

    # -- moving -------------------------------------------------------------
    def to_device(self, device: Any, /, stream: Any = None):
        """``"cpu"``: a NumPy copy (a read); a fakecupy device: an explicit copy there."""
        if isinstance(device, str) and device == "cpu":
            _read("to_device('cpu')", self)
            return self._host()
        target = Device(device)
        return ndarray(self._a.to_device(_STRICT[target.id]), target.id)

    # -- indexing -------------------------------------------------------------
    def __getitem__(self, key):
        found = [self]
        k = _unwrap(key, found)
        if len(found) > 1:  # array indices launch a gather kernel (basic indexing makes a view: no kernel)
            _check(found, "indexing with arrays")
        if _has_bool_mask(key):
            _read("boolean mask index", self)
        return ndarray(self._a[k], self._dev)

    def __setitem__(self, key, value):
        found = [self]
        k = _unwrap(key, found)
        v = _unwrap(value, found)
        _check(found, "assignment")
        if _has_bool_mask(key):
            _read("boolean mask assignment", self)
        self._a[k] = v

    def __iter__(self):
        raise TypeError("fakecupy: iterating over a device array reads it element by element; index it instead")

    @property
    def T(self):  # a view: no kernel
        return ndarray(self._a.T, self._dev)

    @property
    def mT(self):
        return ndarray(self._a.mT, self._dev)


def _binary(name: str):
    def op(self, other):
        found = [self]
        o = _unwrap(other, found)
        dev = _check(found, f"operator {name}")
        res = getattr(self._a, name)(o)
        if res is NotImplemented:
            return res
        if name.startswith("__i") and name not in ("__invert__",):
            self._a = res
            return self
        return ndarray(res, dev)

    op.__name__ = name
    return op


def _unary(name: str):
    def op(self):
        dev = _check([self], f"operator {name}")
        return ndarray(getattr(self._a, name)(), dev)

    op.__name__ = name
    return op


for _n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
           "lshift", "rshift"):
    for _form in (f"__{_n}__", f"__r{_n}__", f"__i{_n}__"):
        setattr(ndarray, _form, _binary(_form))
for _n in ("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__"):
    setattr(ndarray, _n, _binary(_n))
for _n in ("__neg__", "__pos__", "__abs__", "__invert__"):
    setattr(ndarray, _n, _unary(_n))


# ---------------------------------------------------------------------------
# the namespace
# ---------------------------------------------------------------------------

#: allocate on the current device whatever ``device=`` says (array_api_compat.cupy)
_CREATION = {"arange", "empty", "empty_like", "eye", "full", "full_like", "linspace", "ones", "ones_like",
             "zeros", "zeros_like", "tril", "triu"}
#: dtype and shape helpers: no kernel
_NO_KERNEL = {"finfo", "iinfo", "isdtype", "result_type", "can_cast", "broadcast_shapes",
              "__array_namespace_info__"}
#: operations whose output size depends on the data: CuPy reads a count back to the host
_SYNCING = {"nonzero", "unique_all", "unique_counts", "unique_inverse", "unique_values"}


def _function(name: str, fn: Any):
    @functools.wraps(fn)
    def f(*args, **kwargs):
        if name in _NO_KERNEL:
            return fn(*_unwrap(args, []), **_unwrap(kwargs, []))
        if name == "asarray" and kwargs.get("device") is not None:
            with Device(kwargs.pop("device")):  # array_api_compat.cupy.asarray enters the device
                return f(*args, **kwargs)
        found: list = []
        a, k = _unwrap(args, found), _unwrap(kwargs, found)
        dev = _check(found, f"{name}()")
        if name in _CREATION or name == "asarray":
            k["device"] = _STRICT[dev]
        elif "device" in k:
            k.pop("device")  # astype(..., device=) and friends: the current device
        if name in _SYNCING or (name == "repeat" and isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"),
                                                                ndarray)):
            _read(name, found[0])
        if name == "clip":  # array-api-compat's generic CuPy clip: one boolean-mask assignment per bound
            for bound in list(args[1:3]) + [kwargs.get("min"), kwargs.get("max")]:
                if bound is not None:
                    _read("clip (boolean mask assignment)", found[0])
        if name == "sign" and xs.isdtype(found[0]._a.dtype, "real floating"):
            _read("sign (NaN mask assignment)", found[0])  # array-api-compat's CuPy sign
        return _wrap(fn(*a, **k), dev)

    return f


def _namespace(src: Any, names: list, label: str) -> types.SimpleNamespace:
    out = {}
    for n in names:
        obj = getattr(src, n)
        if callable(obj) and not isinstance(obj, type) and type(obj).__name__ != "DType":
            out[n] = _function(n, obj)
        else:
            out[n] = obj
    ns = types.SimpleNamespace(**out)
    ns.__name__ = label
    return ns


def _build():
    names = [n for n in xs.__all__ if n not in ("fft", "linalg", "Device", "set_array_api_strict_flags",
                                                 "get_array_api_strict_flags", "reset_array_api_strict_flags",
                                                 "ArrayAPIStrictFlags", "__version__")]
    ns = _namespace(xs, names, "fakecupy.xp")
    ns.linalg = _namespace(xs.linalg, [n for n in xs.linalg.__all__], "fakecupy.xp.linalg")
    ns.Device = Device
    ns.ndarray = ndarray
    return ns


#: the Array API namespace of fakecupy arrays (what ``dev.xp`` is)
xp = _build()


# ---------------------------------------------------------------------------
# plugging into xrnn (tests only)
# ---------------------------------------------------------------------------

def _owns(x: Any) -> bool:
    return isinstance(x, ndarray)


def _owns_device(d: Any) -> bool:
    return isinstance(d, Device)


def _to_host(x: ndarray) -> np.ndarray:
    return x.get()


def register() -> None:
    """Make ``xrnn.resolve_device("fakecupy:N")`` work (through xrnn.backend's test-facing hook)."""
    from xrnn import backend

    backend.register_test_library(NAME, xp=xp, make_native=Device, count=COUNT, owns=_owns,
                                  owns_device=_owns_device, index_of=lambda d: d.id, to_host=_to_host)


def unregister() -> None:
    from xrnn import backend

    backend.unregister_test_library(NAME)
