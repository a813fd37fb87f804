"""How many CPU threads the math libraries under xrnn use (``xrnn train --threads N``).

On the CPU, NumPy's matrix products run in its BLAS (OpenBLAS in NumPy's
wheels, MKL or BLIS in some builds), which starts one thread per core of the
*machine* by default. On a shared or small machine that is too many: with
another busy process on two cores, BLAS threads that wait for each other can
make a step 30x slower. :func:`set_threads` sets the count four ways:

* the environment variables every BLAS and OpenMP build reads when it loads
  (``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ...), for
  libraries not loaded yet and for child processes;
* at run time, each BLAS already loaded into this process (found in
  ``/proc/self/maps`` on Linux) through its own ``*_set_num_threads`` call,
  since NumPy is imported before the command line is parsed;
* torch's intra-op threads (``torch.set_num_threads``) when torch is loaded;
* the fused C kernels' scans (:func:`xrnn.kernels.native.set_threads`), which
  split a batch's rows over threads of their own (by default as many as the
  BLAS has).

The default is a count the user set in the environment (kept as
it is), else :func:`available_cores`: the cores this process may run on
(``os.sched_getaffinity``, which honours ``taskset`` and container CPU sets),
not the machine's count.
"""

from __future__ import annotations

import ctypes
import os
import sys

from .errors import ConfigError

__all__ = ["THREAD_VARS", "available_cores", "environment_threads", "set_threads", "blas_threads"]

#: the thread-count variables of the BLAS and OpenMP builds NumPy and torch may use
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
               "NUMEXPR_NUM_THREADS", "BLIS_NUM_THREADS")

# (set, get) entry points of the BLAS libraries, by the name they export
_BLAS_CALLS = (
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
    ("MKL_Set_Num_Threads", "MKL_Get_Max_Threads"),
    ("bli_thread_set_num_threads", "bli_thread_get_num_threads"),
)
_BLAS_NAMES = ("openblas", "mkl_rt", "libblis", "libblas")


def available_cores() -> int:
    """The number of CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows: no affinity masks
        return max(1, os.cpu_count() or 1)


def _loaded_blas() -> list:
    """``[(path, set_fn, get_fn)]`` for each BLAS library loaded into this process (Linux)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
    except OSError:
        return []
    out = []
    for path in sorted(paths):
        base = os.path.basename(path).lower()
        if not base.startswith("lib") or not any(n in base for n in _BLAS_NAMES) or ".so" not in base:
            continue
        try:
            lib = ctypes.CDLL(path)  # already loaded: this only looks its symbols up
        except OSError:
            continue
        for set_name, get_name in _BLAS_CALLS:
            setter, getter = getattr(lib, set_name, None), getattr(lib, get_name, None)
            if setter is not None:
                setter.argtypes, setter.restype = [ctypes.c_int], None
                if getter is not None:
                    getter.argtypes, getter.restype = [], ctypes.c_int
                out.append((path, setter, getter))
                break
    return out


def blas_threads() -> int | None:
    """The thread count of the first BLAS loaded into this process, or None when none can be asked."""
    for _, _, getter in _loaded_blas():
        if getter is not None:
            return int(getter())
    return None


def environment_threads() -> int | None:
    """The thread count the user set in the environment (the first of :data:`THREAD_VARS` holding a
    positive integer, in that order), or None."""
    for var in THREAD_VARS:
        try:
            n = int(os.environ.get(var, ""))
        except ValueError:
            continue
        if n >= 1:
            return n
    return None


def set_threads(n: int | None = None) -> int:
    """Use ``n`` threads in the BLAS and torch; returns the count in force.

    With ``n=None``: a count the user already set in the environment
    (``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ...) is kept as it is;
    otherwise :func:`available_cores`.

    Raises:
        ConfigError: ``n`` is not a positive integer.
    """
    if n is None:
        preset = environment_threads()
        if preset is not None:  # the user's OMP_NUM_THREADS=1 (say, one per MPI rank) stands: the BLAS
            return preset  # read it when it loaded, and overriding it would oversubscribe the cores
        n = available_cores()
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"threads must be a positive integer, got {n!r}")
    for var in THREAD_VARS:
        os.environ[var] = str(n)
    for _, setter, _ in _loaded_blas():
        setter(n)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads"):
        torch.set_num_threads(n)
    from .kernels import native

    native.set_threads(n)
    return n
