"""Data-parallel training over MPI (CPU) and NCCL (GPU).

Every process ("rank") holds a full replica of the model on its own device
and takes a disjoint share of the B parallel streams. After each backward the
gradients of all ranks are combined in **one flat buffer** and **one
collective call**, weighted by each rank's share of the tokens, so every rank
ends the reduction with the gradient of the whole batch. Clipping and the
optimizer step then run identically on every replica::

    rank r:  rows shard_rows(B, r, N) ──► forward/backward on (b_r, T)
             ──► GradientBuffer.reduce: flat = concat(grads) * b_r/B
             ──► allreduce(SUM) ──► grads = slices of flat
             ──► clip_grad_norm ──► optimizer.step   (same on every rank)

So N ranks with B/N streams each compute, up to float rounding, what one
process with B streams computes: the loss is a mean over B*T tokens, each
rank's loss a mean over its b_r*T tokens, and ``sum_r (b_r/B) * grad_r`` is
the full-batch gradient for any split, even or not (the weights are the
token counts). The mean loss travels in the same buffer, so logging and the
NaN guard see the global loss on every rank at no extra call.

Transports (engines clusters already run; no home-made transport):

* :class:`MPIComm`: mpi4py on the host. NumPy buffers are reduced in
  place; arrays of other libraries (torch, array-api-strict, CuPy without
  CUDA-aware MPI) are copied to the host and back, one device-to-host and
  one host-to-device copy of the flat buffer per step. With
  ``XRNN_CUDA_AWARE_MPI=1`` CuPy buffers are handed to MPI directly (the
  MPI library must be built with CUDA support).
* :class:`NCCLComm`: CuPy's NCCL binding (``cupy.cuda.nccl``) for CuPy
  arrays, one GPU per rank chosen from the local rank; the NCCL unique id is
  broadcast over MPI, which also stays the launcher and carries everything
  that is not a gradient. **Written against CuPy's documented API; it has
  not been run: this project has had no GPU to run it on.**
* :class:`SingleProcess`: the no-op communicator of a plain run.

Failures end the job instead of hanging it:

* MPI collectives are non-blocking (``Iallreduce``/``Ibcast``/``Ibarrier``)
  and polled with a deadline, ``XRNN_COLLECTIVE_TIMEOUT`` seconds (default
  300). A rank whose peer died, hangs or runs different code raises
  :class:`~xrnn.errors.DistributedError` naming the collective, the rank and
  the time waited; the error also goes to stderr at once.
* :func:`install_abort_hook` makes any uncaught exception on any rank (that
  error included) print its traceback with the rank and call
  ``MPI.COMM_WORLD.Abort(1)``, so the launcher ends every rank. A rank that
  exits with a non-zero status is ended by ``mpirun`` itself.
* NCCL collectives are asynchronous on the GPU; a watchdog thread polls their
  completion events and aborts the NCCL communicator and the MPI job when one
  is late, without a host synchronisation in the training step.

Exact dropout: the single process draws a (T, B, H) mask per dropout site
from the model's one host generator. :func:`shard_dropout` gives each replica
a generator (same bit generator, so the same stream and checkpoint state)
that draws the full (T, B, H) mask and keeps the rank's rows, so the masks
of N ranks are exactly the rows of the single-process masks. Each rank still
draws the whole mask: a host cost of T*B*H uniforms per site and window, as
in a single process.

Initial weights: every rank builds its model from the same seed; then
:func:`broadcast_parameters` copies rank 0's weights and dropout-generator
state to all ranks (bit-identical even with ``seed=None``), and
:func:`check_replicas` compares SHA-256 digests of every replica's weights,
raising on every rank if one differs.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterable
from typing import Any

import numpy as np

from .backend import Device, device_of, dtype_name, resolve_device, to_numpy
from .errors import BackendUnavailableError, ConfigError, DeviceError, DistributedError

__all__ = [
    "Communicator",
    "SingleProcess",
    "MPIComm",
    "NCCLComm",
    "GradientBuffer",
    "DataParallel",
    "init_distributed",
    "get_communicator",
    "device_for_rank",
    "launched_by_mpi",
    "launcher_world_size",
    "collective_timeout",
    "shard_rows",
    "shard_weight",
    "shard_dropout",
    "broadcast_parameters",
    "check_replicas",
    "install_abort_hook",
    "DEFAULT_TIMEOUT",
    "TIMEOUT_ENV",
]

#: seconds a collective may wait for the other ranks before the job is ended
DEFAULT_TIMEOUT = 300.0
#: environment variable overriding :data:`DEFAULT_TIMEOUT`
TIMEOUT_ENV = "XRNN_COLLECTIVE_TIMEOUT"
_CUDA_AWARE_ENV = "XRNN_CUDA_AWARE_MPI"
_SPIN_SECONDS = 1.0  # how long a waiting rank polls without sleeping
_yield = getattr(os, "sched_yield", lambda: None)

# Environment variables that MPI launchers set in every rank they start
# (Open MPI, PMIx, MPICH/Intel MPI's Hydra, MVAPICH2).
_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK", "MV2_COMM_WORLD_SIZE")

_MPI_HINT = (
    "install an MPI library and mpi4py (Debian/Ubuntu: apt-get install openmpi-bin libopenmpi-dev; "
    "then pip install mpi4py) and start the job with mpirun -n N"
)


# ---------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------

def launched_by_mpi() -> bool:
    """True when this process was started by an MPI launcher (mpirun, mpiexec, srun with PMI/PMIx)."""
    return any(v in os.environ for v in _LAUNCHER_VARS)


def launcher_world_size() -> int | None:
    """The number of ranks the MPI launcher started, read from its environment (None: not known/not MPI)."""
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
        v = os.environ.get(var, "")
        if v.isdigit():
            return int(v)
    if "PMIX_RANK" in os.environ and os.environ.get("SLURM_NTASKS", "").isdigit():
        return int(os.environ["SLURM_NTASKS"])
    return None


def collective_timeout(value: Any = None) -> float:
    """Seconds a collective may wait: ``value``, else ``$XRNN_COLLECTIVE_TIMEOUT``, else 300.

    Raises:
        ConfigError: not a positive number of seconds.
    """
    source = "timeout"
    if value is None:
        value = os.environ.get(TIMEOUT_ENV)
        source = f"${TIMEOUT_ENV}"
        if value is None or value == "":
            return DEFAULT_TIMEOUT
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = float("nan")
    if not t > 0 or t == float("inf"):
        raise ConfigError(
            f"{source} must be a positive, finite number of seconds, got {value!r} "
            f"(the default is {DEFAULT_TIMEOUT:g})"
        )
    return t


def _import_mpi():
    try:
        from mpi4py import MPI
    except Exception as e:  # ImportError, or the MPI shared library failing to load
        raise BackendUnavailableError(f"distributed training over MPI needs mpi4py ({e}); {_MPI_HINT}") from None
    return MPI


# ---------------------------------------------------------------------------
# data sharding
# ---------------------------------------------------------------------------

def _check_rank(rank: Any, size: Any) -> tuple[int, int]:
    for name, v in (("size", size), ("rank", rank)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ConfigError(f"{name} must be an int, got {v!r}")
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"rank must be in [0, size) with size >= 1, got rank={rank}, size={size}")
    return int(rank), int(size)


def shard_rows(batch_size: int, rank: int, size: int) -> slice:
    """The streams rank ``rank`` of ``size`` trains on: ``slice(rank*B//size, (rank+1)*B//size)``.

    Contiguous shares whose lengths differ by at most one; together they are
    exactly ``range(B)``. Pass the result as ``StreamBatcher(..., rows=...)``.

    Raises:
        ConfigError: fewer streams than ranks (a rank would get none).
    """
    rank, size = _check_rank(rank, size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    B = int(batch_size)
    if B < size:
        raise ConfigError(
            f"batch_size={B} streams cannot be shared by {size} ranks (each rank needs at least one); "
            f"use batch_size >= {size} (a multiple of {size} keeps the ranks equally busy) or fewer ranks"
        )
    return slice(rank * B // size, (rank + 1) * B // size)


def shard_weight(batch_size: int, rank: int, size: int) -> float:
    """This rank's share of the tokens, ``b_r / B``: the weight of its loss and gradient in the global mean."""
    s = shard_rows(batch_size, rank, size)
    return (s.stop - s.start) / int(batch_size)


class _RowsGenerator(np.random.Generator):
    """A Generator that draws dropout masks for all B streams and keeps some rows.

    It shares the bit generator of the generator it wraps, so it consumes the
    same random stream and its ``bit_generator.state`` is the single-process
    state (checkpoints are interchangeable). ``random((T, b, H), float32)``
    with ``b == len(rows)`` draws ``(T, B, H)`` and returns ``[:, rows, :]``;
    every other draw passes through unchanged.
    """

    def __init__(self, bit_generator, rows: np.ndarray, batch_size: int):
        super().__init__(bit_generator)
        self._rows = np.asarray(rows, dtype=np.int64)  # (b,)
        self._batch = int(batch_size)

    def random(self, size=None, dtype=np.float64, out=None):
        rows = self._rows
        if (out is None and isinstance(size, tuple) and len(size) == 3
                and int(size[1]) == rows.shape[0] and rows.shape[0] != self._batch):
            full = super().random((size[0], self._batch, size[2]), dtype=dtype)  # (T, B, H)
            return np.ascontiguousarray(full[:, rows, :])  # (T, b, H)
        return super().random(size, dtype=dtype, out=out)


def shard_dropout(model: Any, rows: Any, batch_size: int) -> None:
    """Make ``model``'s dropout masks the ``rows`` of the masks a B-stream run draws.

    ``model`` has an ``rng`` property (:class:`xrnn.CharLM`); its generator is
    replaced by one on the same bit generator that draws full (T, B, H) masks
    and keeps ``rows``. Calling it again (e.g. after loading a checkpoint,
    which sets the state of the same bit generator) is harmless.
    """
    from .data import StreamBatcher

    r = StreamBatcher._rows(rows, int(batch_size))
    gen = model.rng
    model.rng = _RowsGenerator(gen.bit_generator, r, int(batch_size))


# ---------------------------------------------------------------------------
# array helpers
# ---------------------------------------------------------------------------

def _is_array(x: Any) -> bool:
    if isinstance(x, (bool, int, float, complex, str, bytes, list, tuple, dict)) or x is None:
        return False
    try:
        device_of(x)
        return True
    except (DeviceError, BackendUnavailableError):
        return False


def _host_copy(x: Any) -> np.ndarray:
    """A C-contiguous host copy of any supported array."""
    return np.array(to_numpy(x), copy=True, order="C")


def _mpi_dtype_ok(a: np.ndarray) -> bool:
    return a.dtype in (np.float32, np.float64, np.int32, np.int64, np.uint8, np.int8, np.uint32, np.uint64)


def _back_like(host: np.ndarray, like: Any):
    """``host`` moved onto ``like``'s device in ``like``'s dtype."""
    dev = device_of(like)
    return dev.asarray(host, dtype=dtype_name(like.dtype))


# ---------------------------------------------------------------------------
# communicators
# ---------------------------------------------------------------------------

class Communicator:
    """What the trainer needs from a transport (one instance per process).

    Attributes:
        rank: this process's index in ``[0, size)``.
        size: number of processes in the job.
        local_rank: index among the processes on this node (picks the GPU).
        local_size: processes on this node.
        backend: ``"single"``, ``"mpi"`` or ``"nccl"``.
        timeout: seconds a collective may wait before the job is ended.

    All collectives must be called by every rank in the same order.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    backend: str = "single"
    timeout: float = DEFAULT_TIMEOUT

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that prints and writes checkpoints."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size}, local_rank={self.local_rank})"

    # -- collectives ------------------------------------------------------
    def allreduce_sum(self, x: Any) -> Any:
        """Element-wise sum over ranks of an array (any library) or a number.

        Returns an array on ``x``'s device with its dtype and shape (``x``
        itself, updated in place, where the transport can), or a float for a
        number.
        """
        raise NotImplementedError

    def allreduce_mean(self, x: Any) -> Any:
        """Element-wise mean over ranks (``allreduce_sum(x) / size``)."""
        s = self.allreduce_sum(x)
        if self.size == 1:
            return s
        if isinstance(s, float):
            return s / self.size
        dev = device_of(s)
        with dev:
            s *= 1.0 / self.size
        return s

    def broadcast(self, value: Any, root: int = 0) -> Any:
        """Rank ``root``'s value on every rank.

        ``value`` is an array (any library) or a JSON-able object (numbers,
        strings, lists, dicts; tuples come back as lists). Other ranks may
        pass None; an array they pass with the root's shape and dtype is
        filled (in place where possible) and returned on its device,
        otherwise a host NumPy array is returned.
        """
        raise NotImplementedError

    def barrier(self) -> None:
        """Wait until every rank got here (with the collective timeout)."""
        raise NotImplementedError

    def abort(self, message: str = "", code: int = 1) -> None:
        """Print ``message`` and end every rank of the job (does not return)."""
        if message:
            _print_err(f"[rank {self.rank}/{self.size}] {message}")
        raise SystemExit(code)


class SingleProcess(Communicator):
    """The communicator of a plain (non-distributed) run: every collective is the identity."""

    def __init__(self, timeout: Any = None):
        self.timeout = collective_timeout(timeout)

    def allreduce_sum(self, x: Any) -> Any:
        if isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool):
            return float(x)
        return x

    def broadcast(self, value: Any, root: int = 0) -> Any:
        if root != 0:
            raise ConfigError(f"root must be a rank in [0, 1), got {root!r}")
        if _is_array(value):
            return value
        try:
            return json.loads(json.dumps(value))  # the same JSON round trip as a real broadcast
        except (TypeError, ValueError) as e:
            raise DistributedError(
                f"broadcast takes an array or a JSON-able object, got {type(value).__name__}: {e}") from None

    def barrier(self) -> None:
        return None


def _print_err(text: str) -> None:
    try:
        sys.stderr.write(text.rstrip("\n") + "\n")
        sys.stderr.flush()
    except Exception:
        pass


class MPIComm(Communicator):
    """Collectives over mpi4py, each with a deadline.

    Args:
        comm: an ``mpi4py.MPI.Comm`` (default ``MPI.COMM_WORLD``).
        timeout: seconds a collective may wait (see :func:`collective_timeout`).

    NumPy arrays are reduced in place; other libraries' arrays go through the
    host (a copy each way; ``XRNN_CUDA_AWARE_MPI=1`` hands CuPy arrays to a
    CUDA-aware MPI directly). float16 is reduced in float32 on the host.
    """

    backend = "mpi"

    def __init__(self, comm: Any = None, timeout: Any = None):
        MPI = _import_mpi()
        self._MPI = MPI
        self._comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = int(self._comm.Get_rank())
        self.size = int(self._comm.Get_size())
        self.timeout = collective_timeout(timeout)
        self.broken = False  # a collective timed out: the job must be aborted at exit
        # Ranks sharing a node (one shared-memory domain) give the local rank,
        # whatever the launcher; the split is a blocking collective, done once
        # at start-up when every rank is alive.
        local = self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = int(local.Get_rank())
        self.local_size = int(local.Get_size())
        local.Free()
        self._cuda_aware = os.environ.get(_CUDA_AWARE_ENV, "") not in ("", "0")
        atexit.register(self._abort_if_broken)

    # -- waiting with a deadline -------------------------------------------
    def _wait(self, request: Any, what: str) -> None:
        """Poll ``request`` until it completes or the deadline passes.

        Non-blocking collectives advance only inside MPI calls, and a large
        buffer moves in many fragments, so the first second is a tight loop
        of ``Test`` (what a blocking MPI collective does internally), each
        poll followed by ``sched_yield`` so an oversubscribed peer on the
        same core still runs. A rank that has waited longer (its peer is
        writing a checkpoint, or is gone) sleeps between polls, up to 200 us,
        until the deadline.
        """
        start = time.monotonic()
        deadline = start + self.timeout
        spin_until = start + _SPIN_SECONDS
        polls = 0
        nap = 0.0
        test = request.Test
        while not test():
            polls += 1
            if polls & 63:
                _yield()
                continue
            now = time.monotonic()
            if now < spin_until:
                _yield()
                continue
            if now > deadline:
                self._timed_out(what, now - start)
            nap = min(2e-4, nap * 2 if nap else 1e-5)
            time.sleep(nap)

    def _timed_out(self, what: str, waited: float) -> None:
        self.broken = True
        msg = (
            f"xrnn.distributed: {what} timed out on rank {self.rank} of {self.size} after {waited:.1f} s: "
            f"at least one other rank did not join it (it crashed, hangs, or runs different code). "
            f"Ending the whole job. If a step legitimately takes longer (a slow first step, a large "
            f"checkpoint written by rank 0), raise {TIMEOUT_ENV} (now {self.timeout:g} s)."
        )
        _print_err(msg)
        raise DistributedError(msg)

    def _abort_if_broken(self) -> None:
        # A request that never completed would make MPI_Finalize wait for the
        # missing peer forever; end the job instead.
        if self.broken:
            self._MPI.COMM_WORLD.Abort(1)

    def abort(self, message: str = "", code: int = 1) -> None:
        if message:
            _print_err(f"[rank {self.rank}/{self.size}] {message}")
        self._MPI.COMM_WORLD.Abort(int(code))

    # -- collectives --------------------------------------------------------
    def _allreduce_host(self, a: np.ndarray, what: str) -> np.ndarray:
        """In-place SUM of a C-contiguous host array."""
        if a.dtype == np.float16:
            b = a.astype(np.float32)
            self._wait(self._comm.Iallreduce(self._MPI.IN_PLACE, b, op=self._MPI.SUM), what)
            a[...] = b
            return a
        if not _mpi_dtype_ok(a):
            raise DistributedError(f"{what}: MPI cannot reduce arrays of dtype {a.dtype}")
        self._wait(self._comm.Iallreduce(self._MPI.IN_PLACE, a, op=self._MPI.SUM), what)
        return a

    def allreduce_sum(self, x: Any) -> Any:
        what = "allreduce"
        if isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool):
            a = np.array([float(x)], dtype=np.float64)
            return float(self._allreduce_host(a, what)[0])
        if not _is_array(x):
            raise DistributedError(f"allreduce takes an array or a number, got a {type(x).__name__}")
        if isinstance(x, np.ndarray) and x.flags.c_contiguous and x.flags.writeable:
            return self._allreduce_host(x, what)
        dev = device_of(x)
        if dev.library == "cupy" and self._cuda_aware and x.flags.c_contiguous and dtype_name(x.dtype) != "float16":
            import cupy

            with dev:
                cupy.cuda.get_current_stream().synchronize()  # MPI reads the memory outside CuPy's stream
                self._wait(self._comm.Iallreduce(self._MPI.IN_PLACE, x, op=self._MPI.SUM), what)
            return x
        host = self._allreduce_host(_host_copy(x), what)
        return _back_like(host, x)

    def _bcast_json(self, obj: Any, root: int) -> Any:
        if self.rank == root:
            try:
                payload = json.dumps(obj, allow_nan=True).encode("utf-8")
            except (TypeError, ValueError) as e:
                # Tell the other ranks too, so that every rank raises instead of waiting.
                payload = json.dumps({"__xrnn_error__": f"a {type(obj).__name__} is not JSON-able: {e}"}).encode()
        else:
            payload = b""
        n = np.array([len(payload)], dtype=np.int64)
        self._wait(self._comm.Ibcast(n, root=root), "broadcast (size)")
        buf = np.frombuffer(payload, dtype=np.uint8).copy() if self.rank == root else np.empty(int(n[0]), np.uint8)
        self._wait(self._comm.Ibcast(buf, root=root), "broadcast (data)")
        out = json.loads(buf.tobytes().decode("utf-8"))
        if isinstance(out, dict) and "__xrnn_error__" in out:
            raise DistributedError(f"broadcast from rank {root}: {out['__xrnn_error__']}")
        return out

    def broadcast(self, value: Any, root: int = 0) -> Any:
        if isinstance(root, bool) or not isinstance(root, (int, np.integer)) or not 0 <= root < self.size:
            raise ConfigError(f"root must be a rank in [0, {self.size}), got {root!r}")
        root = int(root)
        mine = _is_array(value)
        if self.rank == root:
            if mine:
                host = _host_copy(value)
                header = {"array": True, "dtype": host.dtype.str, "shape": list(host.shape)}
            else:
                try:
                    json.dumps(value, allow_nan=True)
                    header = {"array": False, "value": value}
                except (TypeError, ValueError) as e:
                    header = {"__xrnn_error__": (
                        f"broadcast takes an array or a JSON-able object (numbers, strings, lists, dicts), "
                        f"got a {type(value).__name__}: {e}")}
        else:
            header = None
        header = self._bcast_json(header, root)
        if not header["array"]:
            return header["value"]
        dtype, shape = np.dtype(header["dtype"]), tuple(header["shape"])
        if self.rank != root:
            if (isinstance(value, np.ndarray) and value.flags.c_contiguous and value.flags.writeable
                    and value.dtype == dtype and value.shape == shape):
                host = value
            else:
                host = np.empty(shape, dtype=dtype)
        self._wait(self._comm.Ibcast(host.reshape(-1).view(np.uint8), root=root), "broadcast")
        if self.rank == root or host is value:
            return value
        if mine and tuple(int(s) for s in value.shape) == shape and dtype_name(value.dtype) == dtype.name:
            return _back_like(host, value)  # onto the device of the array this rank passed
        return host

    def barrier(self) -> None:
        self._wait(self._comm.Ibarrier(), "barrier")


class _Watchdog:
    """A thread that ends the job when an asynchronous collective is late.

    ``watch(done, what)`` registers a completion test (``done()`` returns
    True once finished, e.g. a CUDA event's ``done``); the thread checks the
    oldest pending one and calls ``on_timeout(what, waited)`` when it is
    older than ``timeout`` seconds, and ``on_error(exc)`` when ``poll``
    (e.g. NCCL's asynchronous error check) raises. Completions are in
    order (one stream), so only the oldest needs watching.
    """

    def __init__(self, timeout: float, on_timeout, on_error=None, poll=None, interval: float = 0.01):
        self.timeout = float(timeout)
        self._on_timeout = on_timeout
        self._on_error = on_error
        self._poll = poll
        self._interval = float(interval)
        self._pending: deque = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.fired = False
        self._thread = threading.Thread(target=self._run, name="xrnn-collective-watchdog", daemon=True)
        self._thread.start()

    def watch(self, done, what: str) -> None:
        with self._lock:
            self._pending.append((done, what, time.monotonic()))

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                if self._poll is not None:
                    self._poll()
                while True:
                    with self._lock:
                        if not self._pending:
                            break
                        done, what, started = self._pending[0]
                    if done():
                        with self._lock:
                            self._pending.popleft()
                        continue
                    waited = time.monotonic() - started
                    if waited > self.timeout:
                        self.fired = True
                        self._on_timeout(what, waited)
                        return
                    break
            except Exception as e:  # an asynchronous transport error
                self.fired = True
                if self._on_error is not None:
                    self._on_error(e)
                return


class NCCLComm(Communicator):
    """NCCL collectives for CuPy arrays, MPI for everything else.

    **Not run in this project (no GPU was available); written against CuPy's
    documented ``cupy.cuda.nccl`` API.**

    Args:
        mpi: the :class:`MPIComm` of the job (launcher, unique-id exchange,
            host-side collectives, the abort path).
        device: this rank's CuPy device (see :func:`device_for_rank`).

    Gradient allreduces run on the current CuPy stream of ``device`` and do
    not synchronise the host; a watchdog thread checks that each finishes
    within the timeout, and otherwise prints a message, aborts the NCCL
    communicator and ends the MPI job. Broadcasts and barriers (start-up
    only) go through MPI on the host.
    """

    backend = "nccl"

    def __init__(self, mpi: MPIComm, device: Any):
        dev = resolve_device(device)
        if dev.library != "cupy":
            raise DeviceError(f"NCCL moves CuPy arrays; the device is {dev.name}. Use backend='mpi' on the CPU")
        try:
            import cupy
            from cupy.cuda import nccl
        except Exception as e:
            raise BackendUnavailableError(f"NCCL through CuPy could not be imported ({e}); use backend='mpi'") from None
        if not getattr(nccl, "available", True):
            raise BackendUnavailableError(
                "CuPy was built without NCCL (cupy.cuda.nccl.available is False); install NCCL "
                "(pip install nvidia-nccl-cu12, or the CUDA image's libnccl2) or use backend='mpi'"
            )
        self._cupy, self._nccl_mod = cupy, nccl
        self._mpi = mpi
        self.device = dev
        self.rank, self.size = mpi.rank, mpi.size
        self.local_rank, self.local_size = mpi.local_rank, mpi.local_size
        self.timeout = mpi.timeout
        self._dtypes = {"float16": nccl.NCCL_FLOAT16, "float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64}
        # ncclCommInitRank blocks until all ranks join: check first (with the
        # MPI deadline) that every rank is alive and got this far.
        mpi.barrier()
        uid = mpi.broadcast(list(nccl.get_unique_id()) if mpi.rank == 0 else None)
        with dev:
            self._comm = nccl.NcclCommunicator(self.size, tuple(int(c) for c in uid), self.rank)
        self._watchdog = _Watchdog(self.timeout, self._late, self._async_error, poll=self._comm.check_async_error)
        atexit.register(self.close)  # stop the watchdog before the communicator goes away

    def close(self) -> None:
        """Wait for queued collectives, stop the watchdog, destroy the NCCL communicator (also run at exit)."""
        if getattr(self, "_comm", None) is not None:
            with self.device:  # while the watchdog still guards a collective that never ends
                self._cupy.cuda.get_current_stream().synchronize()
        wd, self._watchdog = getattr(self, "_watchdog", None), None  # type: ignore[assignment]  # closed
        if wd is not None:
            wd.close()
        comm, self._comm = getattr(self, "_comm", None), None
        if comm is not None:
            comm.destroy()

    def _late(self, what: str, waited: float) -> None:
        _print_err(
            f"xrnn.distributed: NCCL {what} did not finish on rank {self.rank} of {self.size} (GPU "
            f"{self.device.name}) after {waited:.1f} s: another rank crashed or hangs. Ending the whole job; "
            f"raise {TIMEOUT_ENV} (now {self.timeout:g} s) if steps legitimately take longer."
        )
        self._end()

    def _async_error(self, exc: Exception) -> None:
        _print_err(f"xrnn.distributed: NCCL reported an error on rank {self.rank} of {self.size}: {exc}. "
                   "Ending the whole job.")
        self._end()

    def _end(self) -> None:
        try:
            if self._comm is not None:
                self._comm.abort()
        finally:
            self._mpi._MPI.COMM_WORLD.Abort(1)

    def allreduce_sum(self, x: Any) -> Any:
        if not (_is_array(x) and device_of(x) == self.device and x.flags.c_contiguous):
            return self._mpi.allreduce_sum(x)  # host values (a loss, a count): MPI
        name = dtype_name(x.dtype)
        if name not in self._dtypes:
            raise DistributedError(f"NCCL allreduce takes float16/32/64 arrays, got {name}")
        if self._comm is None:
            raise DistributedError("this NCCL communicator was closed")
        with self.device:
            stream = self._cupy.cuda.get_current_stream()
            self._comm.allReduce(x.data.ptr, x.data.ptr, x.size, self._dtypes[name], self._nccl_mod.NCCL_SUM,
                                 stream.ptr)
            event = stream.record()
        self._watchdog.watch(lambda: event.done, "allreduce")
        return x

    def broadcast(self, value: Any, root: int = 0) -> Any:
        return self._mpi.broadcast(value, root)

    def barrier(self) -> None:
        self._mpi.barrier()

    def abort(self, message: str = "", code: int = 1) -> None:
        self._mpi.abort(message, code)


# ---------------------------------------------------------------------------
# choosing a communicator and a device
# ---------------------------------------------------------------------------

_WORLD: MPIComm | None = None
_NCCL: dict = {}


def _world(timeout: Any = None) -> MPIComm:
    global _WORLD
    if _WORLD is None:
        _WORLD = MPIComm(timeout=timeout)
    elif timeout is not None:
        _WORLD.timeout = collective_timeout(timeout)
    return _WORLD


def device_for_rank(device: Any, local_rank: int) -> Device:
    """The device of the rank with this local rank: one GPU per rank.

    ``"auto"`` is ``"cuda"`` when this node has a usable GPU, else ``"cpu"``.
    ``"cuda"``/``"gpu"``/``"cupy"`` without an index become
    ``cuda:{local_rank % GPUs on this node}``, ``"torch:cuda"`` likewise; an
    explicit index (``"cuda:1"``) and CPU devices are kept as given.
    """
    if isinstance(device, str):
        low = device.strip().lower()
        if low == "auto":  # a GPU per rank when this node has a usable one, else the CPU
            from .backend import auto_device

            low = device = "cuda" if auto_device()[0].library == "cupy" else "cpu"
        if low in ("cuda", "gpu", "cupy"):
            try:
                import cupy

                n = int(cupy.cuda.runtime.getDeviceCount())
            except Exception:
                return resolve_device(device)  # resolve_device gives the clear error
            return resolve_device(f"cuda:{local_rank % max(n, 1)}")
        if low == "torch:cuda":
            from .backend import available_devices  # torch is imported by backend.py only

            n = sum(1 for d in available_devices() if d.startswith("torch:cuda:"))
            if n == 0:
                return resolve_device(device)  # resolve_device gives the clear error
            return resolve_device(f"torch:cuda:{local_rank % n}")
    return resolve_device(device)


def get_communicator(device: Any = "cpu", backend: str = "auto", timeout: Any = None) -> Communicator:
    """The communicator for this process.

    Args:
        device: this rank's device (after :func:`device_for_rank`).
        backend: ``"auto"`` (NCCL for CuPy devices, MPI otherwise, a
            :class:`SingleProcess` when not started by an MPI launcher),
            ``"mpi"``, ``"nccl"`` or ``"single"``.
        timeout: collective timeout in seconds (default
            ``$XRNN_COLLECTIVE_TIMEOUT`` or 300).
    """
    if backend not in ("auto", "mpi", "nccl", "single"):
        raise ConfigError(f"backend must be 'auto', 'mpi', 'nccl' or 'single', got {backend!r}")
    if backend == "single" or (backend == "auto" and not launched_by_mpi()):
        return SingleProcess(timeout)
    world = _world(timeout)
    if backend == "auto" and world.size == 1:
        return SingleProcess(timeout)
    dev = resolve_device(device)
    if backend == "nccl" or (backend == "auto" and dev.library == "cupy"):
        comm = _NCCL.get(dev.name)
        if comm is None or comm._comm is None:
            comm = _NCCL[dev.name] = NCCLComm(world, dev)  # one NCCL communicator per device and process
        return comm
    return world


def init_distributed(device: Any = "cpu", backend: str = "auto", timeout: Any = None,
                     abort_hook: bool = True) -> tuple[Communicator, Device]:
    """Start data-parallel training in this process: ``(communicator, device)``.

    Picks the GPU from the local rank (:func:`device_for_rank`), builds the
    communicator (:func:`get_communicator`) and, for a job of more than one
    rank, installs :func:`install_abort_hook` so an uncaught exception on any
    rank ends the job. Outside an MPI launch this is
    ``(SingleProcess(), resolve_device(device))``.

    Raises:
        BackendUnavailableError: started by mpirun but mpi4py is missing, or
            NCCL/CuPy is missing for ``backend="nccl"``.
    """
    if backend in ("mpi", "nccl") or (backend == "auto" and launched_by_mpi()):
        world = _world(timeout)
        local_rank = world.local_rank
    else:
        local_rank = 0
    dev = device_for_rank(device, local_rank)
    comm = get_communicator(dev, backend, timeout)
    if comm.size > 1 and abort_hook:
        install_abort_hook(comm)
    return comm, dev


# ---------------------------------------------------------------------------
# ending the job on an uncaught exception
# ---------------------------------------------------------------------------

_HOOKED = False


def install_abort_hook(comm: Communicator) -> None:
    """On an uncaught exception (main thread or any thread) print it with the rank and end every rank.

    Without it, a rank that raises leaves Python, waits in ``MPI_Finalize``
    for the others, and they wait for it in their next collective until the
    timeout. Installing twice is harmless. KeyboardInterrupt is included
    (mpirun forwards Ctrl-C to every rank).
    """
    global _HOOKED
    if _HOOKED or comm.size == 1:
        return
    _HOOKED = True
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        try:
            tag = f"[rank {comm.rank}/{comm.size}] "
            lines = "".join(traceback.format_exception(exc_type, exc, tb)).rstrip("\n").split("\n")
            _print_err("\n".join(tag + line for line in lines))
            _print_err(f"xrnn.distributed: rank {comm.rank} of {comm.size} failed with "
                       f"{exc_type.__name__}; ending every rank of the job.")
        finally:
            try:
                comm.abort("", 1)
            except BaseException:
                previous(exc_type, exc, tb)
                os._exit(1)

    sys.excepthook = hook

    def thread_hook(args):
        if args.exc_type is SystemExit:
            return
        hook(args.exc_type, args.exc_value, args.exc_traceback)

    threading.excepthook = thread_hook


# ---------------------------------------------------------------------------
# gradients in one flat buffer
# ---------------------------------------------------------------------------

class GradientBuffer:
    """One contiguous buffer holding every gradient of a model (and a few extras).

    The buffer (model dtype, model device) is allocated once and reused each
    step: gradients are copied into consecutive slices, reduced with one
    collective, and copied back into the gradient arrays in place.

    Args:
        model: an object with ``parameters()`` and ``grads`` (dicts name ->
            array with the same keys), e.g. an :class:`xrnn.Module`.
        extras: number of extra scalars carried after the gradients (the
            loss, for example).
    """

    def __init__(self, model: Any, extras: int = 1):
        params = model.parameters()
        if not params:
            raise ConfigError("the model has no parameters to reduce")
        first = next(iter(params.values()))
        self.device: Device = device_of(first)
        self.dtype = dtype_name(first.dtype)
        self.names = list(params)
        self.shapes = [tuple(int(s) for s in p.shape) for p in params.values()]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.offsets = [int(o) for o in np.cumsum([0] + self.sizes)]
        self.numel = self.offsets[-1]
        self.extras = int(extras)
        self.model = model
        self.flat = self.device.zeros((self.numel + self.extras,), self.dtype)  # (P + extras,)

    def flatten(self, grads: dict | None = None, extras: Iterable[Any] = ()) -> Any:
        """Copy ``grads`` (default: the model's) and ``extras`` into the buffer; returns it."""
        grads = self.model.grads if grads is None else grads
        xp = self.device.xp
        flat = self.flat
        with self.device:
            for name, shape, o, n in zip(self.names, self.shapes, self.offsets, self.sizes):
                g = grads[name]
                if tuple(int(s) for s in g.shape) != shape:
                    raise DistributedError(f"gradient {name!r} has shape {tuple(g.shape)}, expected {shape}")
                flat[o:o + n] = xp.reshape(g, (n,))
            extras = list(extras)
            if len(extras) > self.extras:
                raise ConfigError(f"this buffer carries {self.extras} extra value(s), got {len(extras)}")
            for i, e in enumerate(extras):
                j = self.numel + i
                if _is_array(e):
                    flat[j:j + 1] = xp.reshape(xp.astype(e, flat.dtype), (1,))
                else:
                    flat[j:j + 1] = float(e)
        return flat

    def unflatten(self, flat: Any, grads: dict | None = None) -> list:
        """Copy the buffer's slices back into the gradient arrays (in place); returns the extras (0-d arrays)."""
        grads = self.model.grads if grads is None else grads
        xp = self.device.xp
        with self.device:
            for name, shape, o, n in zip(self.names, self.shapes, self.offsets, self.sizes):
                grads[name][...] = xp.reshape(flat[o:o + n], shape)
            return [flat[self.numel + i] for i in range(self.extras)]

    def reduce(self, comm: Communicator, weight: float | None = None, extras: Iterable[Any] = ()) -> list:
        """Replace every rank's gradients by ``sum over ranks of weight_r * grad_r``; one collective.

        Args:
            comm: the communicator.
            weight: this rank's share ``b_r / B`` (:func:`shard_weight`);
                None means ``1 / size`` (equal shares).
            extras: scalars reduced the same way (e.g. the rank's mean loss,
                giving the global mean loss).
        Returns:
            the reduced extras as 0-d arrays on the device (no host sync).
        """
        w = 1.0 / comm.size if weight is None else float(weight)
        flat = self.flatten(extras=extras)
        if comm.size == 1 and w == 1.0:
            return self.unflatten(flat)
        with self.device:
            flat *= w
        out = comm.allreduce_sum(flat)
        return self.unflatten(out)


# ---------------------------------------------------------------------------
# what a trainer needs, in one object
# ---------------------------------------------------------------------------

class DataParallel:
    """The data-parallel side of a training loop: rows, replicas, one reduction per step.

    Args:
        comm: the :class:`Communicator` (a :class:`SingleProcess` makes every
            method the single-process behaviour).
        batch_size: B, the streams of the whole job.

    Attributes:
        rows: this rank's streams (a slice of ``range(B)``), for
            ``StreamBatcher(..., rows=rows)``.
        weight: ``len(rows) / B``, this rank's share of every step's tokens.
    """

    def __init__(self, comm: Communicator, batch_size: int):
        self.comm = comm
        self.batch_size = int(batch_size)
        self.rows = shard_rows(self.batch_size, comm.rank, comm.size)
        self.weight = shard_weight(self.batch_size, comm.rank, comm.size)
        self._buffer: GradientBuffer | None = None
        self._model = None

    @property
    def active(self) -> bool:
        """More than one rank."""
        return self.comm.size > 1

    def prepare(self, model: Any, broadcast: bool = True) -> None:
        """Make every replica start equal (broadcast from rank 0, then verify) and shard its dropout."""
        self._model = model
        self._buffer = None
        if not self.active:
            return
        if broadcast:
            broadcast_parameters(model, self.comm)
        check_replicas(model, self.comm, "at the start of training")
        if isinstance(getattr(model, "rng", None), np.random.Generator):
            shard_dropout(model, self.rows, self.batch_size)

    def reduce(self, model: Any, loss: Any, stop: bool = False) -> tuple[Any, Any]:
        """Global gradient (in place), global mean loss and the OR of ``stop`` over ranks; one collective.

        Returns ``(loss, stop)``: the loss a 0-d device array (the mean over
        all B*T tokens), ``stop`` a 0-d device array, > 0 when any rank asked
        to stop. Without other ranks, ``(loss, None)`` and nothing is done.
        """
        if not self.active:
            return loss, None
        if self._buffer is None or self._buffer.model is not model:
            self._buffer = GradientBuffer(model, extras=2)
        # the stop flag is scaled by the weight like everything else: any rank's flag makes the sum > 0
        g_loss, g_stop = self._buffer.reduce(self.comm, self.weight, extras=[loss, 1.0 if stop else 0.0])
        return g_loss, g_stop

    def mean(self, value: float) -> float:
        """A per-rank mean over this rank's rows turned into the mean over all B rows (host float)."""
        if not self.active:
            return float(value)
        return float(self.comm.allreduce_sum(float(value) * self.weight))

    def gather_rows(self, arrays: Any) -> Any:
        """Assemble per-rank (..., b, ...) state arrays, batch on axis 1, into the full (..., B, ...) on every rank.

        ``arrays`` is an array, a tuple/list of arrays (LSTM's ``(h, c)``) or
        None. Exact: the other ranks contribute zeros.
        """
        if arrays is None or not self.active:
            return arrays
        if isinstance(arrays, (tuple, list)):
            return type(arrays)(self.gather_rows(a) for a in arrays)
        a = arrays
        dev = device_of(a)
        shape = tuple(int(s) for s in a.shape)
        if shape[1] != self.rows.stop - self.rows.start:
            raise DistributedError(f"state of shape {shape} does not hold this rank's {self.rows} rows on axis 1")
        with dev:
            full = dev.zeros((shape[0], self.batch_size) + shape[2:], dtype_name(a.dtype))  # (L, B, H)
            full[:, self.rows.start:self.rows.stop, ...] = a
        return self.comm.allreduce_sum(full)

    def take_rows(self, arrays: Any) -> Any:
        """This rank's rows (axis 1) of full (..., B, ...) state arrays (or a tuple of them, or None)."""
        if arrays is None or not self.active:
            return arrays
        if isinstance(arrays, (tuple, list)):
            return type(arrays)(self.take_rows(a) for a in arrays)
        a = arrays
        if int(a.shape[1]) != self.batch_size:
            raise DistributedError(
                f"a saved state with {int(a.shape[1])} streams cannot be shared as {self.batch_size} streams")
        dev = device_of(a)
        with dev:
            return dev.xp.asarray(a[:, self.rows.start:self.rows.stop, ...], copy=True)


# ---------------------------------------------------------------------------
# identical replicas
# ---------------------------------------------------------------------------

def broadcast_parameters(model: Any, comm: Communicator, root: int = 0) -> None:
    """Copy rank ``root``'s weights (one flat buffer) and dropout-generator state to every rank."""
    if comm.size == 1:
        return
    params = model.parameters()
    buf = GradientBuffer(model, extras=0)
    flat = buf.flatten(params)
    flat = comm.broadcast(flat, root)
    buf.unflatten(flat, params)
    rng = getattr(model, "rng", None)
    if isinstance(rng, np.random.Generator):
        state = comm.broadcast(rng.bit_generator.state if comm.rank == root else None, root)
        rng.bit_generator.state = state


def _digest(model: Any) -> str:
    h = hashlib.sha256()
    for name, p in model.parameters().items():
        a = np.ascontiguousarray(to_numpy(p))
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    rng = getattr(model, "rng", None)
    if isinstance(rng, np.random.Generator):
        h.update(json.dumps(rng.bit_generator.state, sort_keys=True).encode())
    return h.hexdigest()


def check_replicas(model: Any, comm: Communicator, when: str = "") -> None:
    """Raise DistributedError on every rank unless all replicas hold identical weights (and RNG state).

    Costs one host copy of the weights and three small collectives.
    """
    if comm.size == 1:
        return
    mine = _digest(model)
    ref = comm.broadcast(mine if comm.rank == 0 else None, 0)
    flags = np.zeros(comm.size, dtype=np.float64)  # (N,)
    flags[comm.rank] = float(mine != ref)
    flags = comm.allreduce_sum(flags)
    bad = [int(r) for r in np.nonzero(flags)[0]]
    if bad:
        raise DistributedError(
            f"the model replicas differ{(' ' + when) if when else ''}: rank(s) {bad} hold other weights "
            f"than rank 0 (checked by SHA-256 of every parameter and the dropout RNG state); "
            f"build the model the same way on every rank and broadcast it with broadcast_parameters"
        )
