"""The fused CPU kernels of ``xrnn/kernels/cpu/recurrent.c``, loaded with ctypes.

The NumPy fast path (:mod:`xrnn.kernels.numpy_fast`) runs each time step as one BLAS product
and then the step's element-wise math: 5 to 25 NumPy calls, each a pass over the step's
arrays. With these kernels that math is one C call and one pass, in float32 (float64 keeps
the NumPy code); the products stay in NumPy's BLAS. Results equal the NumPy path's to float32
rounding (same formulas; ``tests/test_native.py``).

Where the library comes from:

* an installed xrnn carries it as the extension module ``xrnn.kernels._xrnn_cpu``, built by
  ``setup.py`` when the machine that builds the wheel has a C compiler; where the build fails
  (no compiler) the package installs without it and everything runs on the NumPy code;
* ``XRNN_NATIVE_LIB=/path/to/lib.so`` names a library built from ``recurrent.c`` by hand
  (what the tests do: they compile the source with the system's ``cc``);
* ``XRNN_NATIVE=0`` turns the kernels off (as does ``XRNN_PORTABLE=1``, for every fast path);
  :func:`use` swaps them at run time.

The library holds each kernel in copies for instruction sets (:data:`ISAS`): the baseline,
AVX2 + FMA and AVX-512 (x86-64); :func:`load` takes the best copy the CPU runs
(``XRNN_NATIVE_ISA=avx2``, or ``isa=`` here, picks another: to compare them on one machine, and
for the tests, which also run the AVX-512 copy's source compiled for AVX2, ``"wide"``, where the
CPU has no AVX-512). ``xrnn train`` says in its first line which is in use.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.machinery
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["Kernels", "ScanArgs", "threads", "set_threads", "load", "kernels", "use", "library_path", "describe",
           "compile_library", "SOURCE", "ABI", "ISAS"]

#: the C source of the kernels (shipped with the package; the headers it includes beside it)
SOURCE = Path(__file__).resolve().parent / "cpu" / "recurrent.c"

#: the flags setup.py builds with on GCC and clang: no errno or trap bookkeeping, so that the
#: element-wise loops vectorize; fused multiply-adds where the target has them
CFLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast", "-pthread")

#: the version :c:func:`xrnn_cpu_abi` must return: a library built from other source is refused
ABI = 4

_KERNELS = ("xrnn_rnn_step", "xrnn_rnn_step_backward", "xrnn_lstm_step", "xrnn_lstm_step_backward", "xrnn_gru_step",
            "xrnn_gru_step_backward")
_NARGS = {"xrnn_rnn_step": 9, "xrnn_rnn_step_backward": 11, "xrnn_lstm_step": 12, "xrnn_lstm_step_backward": 14,
          "xrnn_gru_step": 13, "xrnn_gru_step_backward": 16}


_SCANS = ("xrnn_rnn_scan", "xrnn_rnn_scan_backward", "xrnn_lstm_scan", "xrnn_lstm_scan_backward", "xrnn_gru_scan",
          "xrnn_gru_scan_backward")


class ScanArgs(ctypes.Structure):
    """The arguments of a whole-sequence scan (``xrnn_scan_args`` in ``recurrent.c``, field by
    field): sizes and strides in elements, arrays as addresses (0 for NULL)."""

    _fields_ = [(name, ctypes.c_ssize_t) for name in (
        "T", "n", "H", "reverse", "relu", "A", "sA", "lda", "P", "bh", "h0", "ldh0", "c0", "ldc0", "C", "sC", "ldc",
        "Y", "sY", "ldy", "dY", "sdY", "lddy", "dhT", "lddhT", "w1", "ldw1", "w2", "ldw2", "w3", "ldw3", "rows",
        "offs")]


class Kernels:
    """The kernels of one library, as ctypes functions taking integers (pointers, sizes and row
    strides in elements; see ``recurrent.c`` and ``scan_kernels.h`` for each argument): six step
    kernels (``lstm_step``, ...), six whole-sequence scans (``lstm_scan(args, threads)``, ...;
    ``args`` a :class:`ScanArgs`), ``pack`` for their weights, and ``gemm_packed``."""

    rnn_step: Any
    rnn_step_backward: Any
    lstm_step: Any
    lstm_step_backward: Any
    gru_step: Any
    gru_step_backward: Any

    def __init__(self, lib: ctypes.CDLL, path: str, isa: str):
        self.path, self.isa = path, isa
        self._lib = lib  # keeps the library loaded while its functions are in use
        for name in _KERNELS:
            fn = getattr(lib, f"{name}_{isa}")
            fn.argtypes = [ctypes.c_ssize_t] * _NARGS[name]
            fn.restype = None
            setattr(self, name[len("xrnn_"):], fn)
        for name in _SCANS:
            fn = getattr(lib, f"{name}_{isa}")
            fn.argtypes = [ctypes.POINTER(ScanArgs), ctypes.c_ssize_t]
            fn.restype = None
            setattr(self, name[len("xrnn_"):], fn)
        self.gemm_packed = getattr(lib, f"xrnn_gemm_packed_{isa}")
        self.gemm_packed.argtypes = [ctypes.c_ssize_t] * 8
        self.gemm_packed.restype = None
        self.gemm_packed_threads = getattr(lib, f"xrnn_gemm_packed_threads_{isa}")
        self.gemm_packed_threads.argtypes = [ctypes.c_ssize_t] * 9
        self.gemm_packed_threads.restype = None
        self.pack = lib.xrnn_pack
        self.pack.argtypes = [ctypes.c_ssize_t] * 7
        self.pack.restype = None
        self.packed_size = lib.xrnn_packed_size
        self.packed_size.argtypes = [ctypes.c_ssize_t] * 2
        self.packed_size.restype = ctypes.c_ssize_t
        self.pool_workers = lib.xrnn_pool_workers
        self.pool_workers.argtypes = []
        self.pool_workers.restype = ctypes.c_ssize_t
        self._use_blas_threads = lib.xrnn_use_blas_threads
        self._use_blas_threads.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self._use_blas_threads.restype = None
        self.threads_from: str | None = None  # set on the first scan (scan_threads): the sampler never asks

    def scan_threads(self) -> int:
        """The thread count for a scan (:func:`threads`); the first call also picks whose threads
        run them (:meth:`use_blas_threads`), which looks through the loaded libraries."""
        if self.threads_from is None:
            self.use_blas_threads(True)
        return threads()

    def use_blas_threads(self, on: bool) -> str:
        """Run the scans' threads on OpenBLAS's own worker threads (``on``, where NumPy's BLAS is an
        OpenBLAS that exports ``gotoblas_pthread``) or on a pool of the library's own; returns whose
        threads run them ("OpenBLAS" or "xrnn"). OpenBLAS's idle workers spin for about 0.1 s after
        each of its calls, so with as many threads as cores a second pool would share the cores with
        them right after every NumPy product."""
        hooks = _openblas_hooks() if on else None
        self._use_blas_threads(*(hooks or (None, None)))
        self.threads_from = "OpenBLAS" if hooks else "xrnn"
        return self.threads_from

    def __repr__(self) -> str:
        return f"Kernels({self.path!r}, isa={self.isa!r})"


_OPENBLAS: dict = {}


def _openblas_hooks() -> tuple[int, int] | None:
    """Addresses of ``gotoblas_pthread`` and of the thread-count getter of the OpenBLAS NumPy
    loaded (Linux), or None (another BLAS, or one that does not export them)."""
    if "hooks" not in _OPENBLAS:
        _OPENBLAS["hooks"] = None
        import numpy  # noqa: F401  (its BLAS must be loaded to be found)

        from .. import _blas

        for path, _, getter in _blas._loaded_blas():
            try:
                lib = ctypes.CDLL(path)
                run = lib.gotoblas_pthread
            except (OSError, AttributeError):
                continue
            if getter is None:
                continue
            _OPENBLAS["lib"] = lib  # kept loaded
            _OPENBLAS["hooks"] = (ctypes.cast(run, ctypes.c_void_p).value, ctypes.cast(getter, ctypes.c_void_p).value)
            break
    return _OPENBLAS["hooks"]


def library_path() -> Path | None:
    """The extension module built with the installed package, if there is one."""
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = here / f"_xrnn_cpu{suffix}"
        if p.is_file():
            return p
    return None


def compile_library(directory: str | os.PathLike[str], cc: str | None = None) -> Path:
    """Compile :data:`SOURCE` into a shared library in ``directory`` with the C compiler ``cc``
    (default: ``$CC``, else ``cc``), for :func:`load` or ``XRNN_NATIVE_LIB``: what the tests do
    in a checkout, where no extension module was built. The file name carries a hash of the
    source and flags, so an existing library is reused only if it was built from the same.
    Raises ``OSError`` when there is no compiler or it fails (with its messages)."""
    import hashlib
    import shutil
    import subprocess
    import tempfile

    cc = cc or os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise OSError(f"no C compiler: {cc!r} is not on the PATH")
    src = SOURCE.read_bytes() + b"".join(h.read_bytes() for h in sorted(SOURCE.parent.glob("*.h")))
    tag = hashlib.sha256(src + " ".join((cc, *CFLAGS)).encode()).hexdigest()[:16]
    out = Path(directory) / f"xrnn_cpu_{tag}{'.dll' if sys.platform == 'win32' else '.so'}"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=out.suffix)  # then renamed: never half a library
    os.close(fd)
    try:
        r = subprocess.run([cc, *CFLAGS, "-shared", "-fPIC", "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        if r.returncode != 0:
            raise OSError(f"{cc} could not compile {SOURCE}:\n{r.stderr.strip()}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


#: the copies of the kernels in a library, best first: AVX-512 (16-float vectors), AVX2 + FMA,
#: the compiler's baseline; and "wide", the AVX-512 copy's source compiled for AVX2 (what the
#: tests check that source with on CPUs without AVX-512; never picked by default)
ISAS = ("avx512", "avx2", "base", "wide")


def load(path: str | os.PathLike[str], isa: str | None = None) -> Kernels:
    """Load the kernels from the library at ``path``; ``isa`` (one of :data:`ISAS`) picks a copy,
    by default the best one this CPU runs. Raises ``OSError`` for a library that cannot be
    loaded or was built from other source, or a copy this CPU or build does not have."""
    lib = ctypes.CDLL(os.fspath(path))
    try:
        abi = lib.xrnn_cpu_abi
        has = {"avx2": lib.xrnn_cpu_has_avx2, "avx512": lib.xrnn_cpu_has_avx512}
    except AttributeError as e:
        raise OSError(f"{path} is not a library built from xrnn/kernels/cpu/recurrent.c") from e
    abi.restype = ctypes.c_int
    if abi() != ABI:
        raise OSError(f"{path} was built from another version of recurrent.c (ABI {abi()}, expected {ABI})")
    runs = {"base": True}
    for name, fn in has.items():
        fn.restype = ctypes.c_int
        runs[name] = bool(fn())
    runs["wide"] = runs["avx2"] and hasattr(lib, "xrnn_lstm_scan_wide")
    if isa is None:
        isa = next(i for i in ISAS if runs[i])
    elif isa not in ISAS:
        raise ValueError(f"isa must be one of {', '.join(ISAS)}; got {isa!r}")
    elif not runs[isa]:
        raise OSError(f"{path}: this CPU or build has no {isa} copy of the kernels")
    return Kernels(lib, os.fspath(path), isa)


_state: dict = {"loaded": False, "kernels": None, "why": "", "threads": None}


def threads() -> int:
    """The threads the whole-sequence scans split a batch's rows over: the count set by
    :func:`set_threads` (``xrnn.threads.set_threads`` and ``xrnn train --threads`` call it), else
    that of NumPy's BLAS (which follows ``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS``), else the
    cores this process may run on."""
    if _state["threads"] is None:
        from .. import _blas

        _state["threads"] = _blas.blas_threads() or _blas.environment_threads() or _blas.available_cores()
    return _state["threads"]


def set_threads(n: int) -> None:
    """Split the scans over ``n`` threads from now on (at least 1)."""
    _state["threads"] = max(1, int(n))


def _load_default() -> None:
    _state["loaded"] = True
    if os.environ.get("XRNN_NATIVE", "") == "0":
        _state["why"] = "turned off by XRNN_NATIVE=0"
        return
    env = os.environ.get("XRNN_NATIVE_LIB", "")
    path = Path(env) if env else library_path()
    if path is None:
        _state["why"] = "not built at install (no C compiler)"
        return
    try:
        _state["kernels"] = load(path, os.environ.get("XRNN_NATIVE_ISA") or None)
    except (OSError, ValueError) as e:  # a broken or foreign library: the NumPy code runs, and `xrnn info` says why
        _state["why"] = f"could not be loaded: {e}"


def kernels() -> Kernels | None:
    """The kernels in use, or None (then the NumPy code runs)."""
    if not _state["loaded"]:
        _load_default()
    return _state["kernels"]


@contextlib.contextmanager
def use(k: Kernels | None) -> Iterator[None]:
    """Run the block with the kernels ``k`` (None: the NumPy code), then restore."""
    kernels()
    previous = _state["kernels"]
    _state["kernels"] = k
    try:
        yield
    finally:
        _state["kernels"] = previous


def describe(short: bool = False) -> str:
    """Which code runs the CPU scans' element-wise math, and why (``short``: without the
    library's path; ``xrnn train`` prints it in its first line)."""
    k = kernels()
    if k is None:
        why = _state["why"] or "turned off"
        return f"NumPy kernels (fused C kernels {why})" if short else f"NumPy kernels: fused C kernels {why}"
    return f"fused C kernels, {k.isa}" if short else f"fused C kernels ({k.isa}) from {k.path}"
