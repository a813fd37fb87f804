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

import os
import sys

from ._blas import THREAD_VARS, _loaded_blas, available_cores, blas_threads, environment_threads
from .errors import ConfigError

__all__ = ["THREAD_VARS", "available_cores", "environment_threads", "set_threads", "blas_threads"]


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
