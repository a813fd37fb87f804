"""What the benchmark scripts do before NumPy is imported, and the machine's CPU name.

Imports only the standard library: the BLAS reads its thread count once,
when NumPy loads, so ``pin_threads`` must run before any NumPy, xrnn or
torch import.
"""

from __future__ import annotations

import os
import platform
import sys

#: the thread-count variables of the BLAS and OpenMP builds NumPy and torch may use
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
               "NUMEXPR_NUM_THREADS", "BLIS_NUM_THREADS")

#: the repository root, put on the path so the scripts import this checkout's xrnn
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def early_arg(name: str, default: str) -> str:
    """The value of ``name`` (``--x V`` or ``--x=V``) in ``sys.argv``, before argparse runs."""
    argv = sys.argv[1:]
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return default


def pin_threads(default: str = "2") -> str:
    """Set every thread-count variable from ``--threads`` (or ``default``); returns the value."""
    threads = early_arg("--threads", default)
    for var in THREAD_VARS:
        os.environ[var] = threads
    return threads


def use_this_checkout() -> None:
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
