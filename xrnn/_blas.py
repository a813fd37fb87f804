"""Which BLAS libraries this process has loaded and how many threads they and the machine give
(Linux: found in ``/proc/self/maps``). Shared by :mod:`xrnn.threads` (``set_threads``) and the C
scans' thread count (:func:`xrnn.kernels.native.threads`), which the sampler uses without loading
the training modules."""

from __future__ import annotations

import ctypes
import os

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
