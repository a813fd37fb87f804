"""xrnn against PyTorch: speed, achieved FLOP rate, memory and scaling, in one process and one run.

Run from the repository root::

    python benchmarks/bench.py                 # full CPU run, 2 threads (about 5-10 minutes)
    python benchmarks/bench.py --threads 4     # another thread count
    python benchmarks/bench.py --smoke         # tiny shapes, a few seconds, writes to a temp dir
    python benchmarks/bench.py --device cuda   # GPU rows: xrnn fused and portable (CuPy) vs torch cuDNN vs NumPy
    python benchmarks/bench.py --device cuda --dry-run --smoke   # the GPU rows' code with the CPU standing in
    python benchmarks/bench.py --targets       # only the rows of the speed targets (about 5-8 minutes)
    python benchmarks/bench.py --only startup  # only the start-up row (seconds); writes to a temp dir

What it measures (see benchmarks/README.md for the method and the formulas):

* for each cell (LSTM, GRU, RNN) and shape (seed, char-rnn, medium, large): the
  forward pass alone and a full training step (forward, loss, backward,
  optimizer step), for xrnn and for ``torch.nn.LSTM/GRU/RNN`` with the same
  shapes, dtype (float32), weights, loss, optimizer and thread count;
* tokens per second, achieved GFLOP/s, the fraction of this machine's
  matrix-multiply peak (measured in the same run), the speed ratio
  xrnn / PyTorch, and the peak memory of a training step;
* the memory of training the medium shape against the minimum its backward
  needs, and the time per token of the medium LSTM as T grows to 1000;
* sampling: ``xrnn.sample`` against torch's step loop under
  ``torch.inference_mode()`` (2,000 characters, 2-layer LSTM of 128 and 512
  units, batch 1 and 32), and the start-up of the whole ``xrnn sample``
  process against ``python -c "import numpy"`` plus the sampling time.

It writes ``benchmarks/results/<cpu>-<cores>cpu-<date>.json`` (with the
machine: CPU model, cores, threads, library versions, BLAS, GPU) and
``benchmarks/results/latest.md``; ``--smoke`` writes to a temporary directory.

The thread count must reach the BLAS before NumPy is imported, so this
script sets ``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``
(and friends) from ``--threads`` at the very top, before any import of NumPy,
xrnn or torch, and calls ``torch.set_num_threads``; the thread count NumPy's
OpenBLAS actually uses is read back and recorded.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _setup, also when loaded by path (tests)
import _setup  # noqa: E402  (standard library only)

_NUMPY_WAS_IMPORTED = "numpy" in sys.modules
_THREADS = _setup.pin_threads()
_setup.use_this_checkout()  # `python benchmarks/bench.py` imports this checkout's xrnn
_ROOT = _setup.ROOT

import argparse  # noqa: E402
import ctypes  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402

import xrnn  # noqa: E402
from xrnn import kernels  # noqa: E402
from xrnn.kernels import native  # noqa: E402


def _native_kernels_for_this_checkout() -> None:
    """This checkout has no built extension module: compile the fused CPU kernels the way the
    tests do (cached in the temp dir), so that the rows measure what an installed xrnn runs.
    ``XRNN_NATIVE=0`` measures the NumPy code alone; ``XRNN_NATIVE_LIB`` names a library."""
    if "XRNN_NATIVE" in os.environ or "XRNN_NATIVE_LIB" in os.environ or native.library_path() is not None:
        return
    try:
        os.environ["XRNN_NATIVE_LIB"] = str(native.compile_library(os.path.join(tempfile.gettempdir(),
                                                                                "xrnn-native-bench")))
    except OSError as e:
        print(f"bench: the fused CPU kernels could not be compiled; measuring the NumPy code ({e})", file=sys.stderr)


_native_kernels_for_this_checkout()
from xrnn.modules import Module, no_grad  # noqa: E402

try:  # noqa: E402
    import torch
except ImportError:  # the benchmark still runs xrnn alone
    torch = None

try:  # the optimizer module, when present; else an inline SGD on both sides
    from xrnn.optim import Adam as _XAdam  # type: ignore
except ImportError:  # pragma: no cover - depends on the checkout
    _XAdam = None

GATES = {"RNN": 1, "LSTM": 4, "GRU": 3}
CELLS = ("LSTM", "GRU", "RNN")
LR = 1e-3


# ---------------------------------------------------------------------------
# shapes and FLOP counts
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """One benchmark shape. ``V`` > 0: one-hot inputs of size V, a Linear(H, V)
    head and softmax cross-entropy (a character model); ``V`` = 0: dense
    inputs of size I and a mean-squared-error loss on the outputs."""

    name: str
    T: int
    B: int
    I: int  # noqa: E741
    H: int
    L: int = 1
    V: int = 0

    def label(self) -> str:
        s = f"T={self.T} B={self.B} I={self.I} H={self.H}"
        return s + (f" L={self.L}" if self.L > 1 else "") + (f" V={self.V}" if self.V else "")


SHAPES = [
    Shape("seed", T=25, B=1, I=65, H=100, V=65),  # min-char-rnn
    Shape("char-rnn", T=50, B=50, I=65, H=128, L=2, V=65),  # char-rnn's defaults
    Shape("medium", T=100, B=64, I=128, H=512),
    Shape("large", T=100, B=128, I=512, H=512),
]
SMOKE_SHAPES = [
    Shape("seed", T=4, B=1, I=7, H=6, V=7),
    Shape("char-rnn", T=5, B=3, I=7, H=8, L=2, V=7),
    Shape("medium", T=6, B=4, I=5, H=8),
]
SCALING_T = (50, 100, 200, 500, 1000)
SMOKE_SCALING_T = (4, 8)


def flops(cell: str, s: Shape) -> tuple[float, float]:
    """Multiply-add FLOPs (2 per multiply-add) of the matrix products of one
    forward and one training-step backward; element-wise math is not counted.

    Per layer (input size I_l = I, then H), with G gates:
      forward  2 T B G H (I_l + H)            input projection + recurrence
      backward 2 T B G H (2 H + I_l)          dW_hh, dh_{t-1}, dW_ih
               + 2 T B G H I_l for layers > 0 the input gradient (layer 0's
                                               input is data: neither library computes it)
    Head (V > 0): forward 2 T B H V, backward 4 T B H V.
    """
    G, T, B, H = GATES[cell], s.T, s.B, s.H
    fwd = bwd = 0.0
    for layer in range(s.L):
        i_l = s.I if layer == 0 else H
        fwd += 2.0 * T * B * G * H * (i_l + H)
        bwd += 2.0 * T * B * G * H * (2 * H + i_l) + (2.0 * T * B * G * H * i_l if layer > 0 else 0.0)
    if s.V:
        fwd += 2.0 * T * B * H * s.V
        bwd += 4.0 * T * B * H * s.V
    return fwd, bwd


def min_step_bytes(cell: str, s: Shape, itemsize: int = 4) -> int:
    """The least memory a training step must add on top of what exists before it
    (inputs, targets, parameters, gradients and optimizer state):

      per layer   gates  T B G H    (activated gates kept for backward)
                  states T B H      (outputs h_t: the next step's and the next layer's input)
                  + LSTM cells T B H, or GRU's W_hn h + b_hn T B H
      top         dY T B H          (the gradient of the outputs the loss hands back)
      head V > 0  dlogits T B V     (softmax minus one-hot)
    """
    G, TB, H = GATES[cell], s.T * s.B, s.H
    per_layer = TB * G * H + TB * H + (TB * H if cell in ("LSTM", "GRU") else 0)
    n = s.L * per_layer + TB * H + (TB * s.V if s.V else 0)
    return n * itemsize


# ---------------------------------------------------------------------------
# the machine
# ---------------------------------------------------------------------------

def _physical_cores() -> int | None:
    try:
        pairs = set()
        phys = core = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    pairs.add((phys, core))
        return len(pairs) or None
    except OSError:
        return None


def _openblas_call(symbols: tuple, restype):
    """Call the first of ``symbols`` (no arguments) found in an OpenBLAS loaded into this
    process (Linux: /proc/self/maps), with the given ctypes result type; None if none is."""
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return None
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in symbols:
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn.restype = restype
                return fn()
    return None


def _openblas_threads() -> int | None:
    """Threads NumPy's OpenBLAS will use, read back from the loaded library."""
    n = _openblas_call(("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
                        "openblas_get_num_threads"), ctypes.c_int)
    return None if n is None else int(n)


def _numpy_blas() -> dict:
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        return {k: blas.get(k) for k in ("name", "version", "openblas configuration") if blas.get(k)}
    except Exception as e:  # pragma: no cover - old NumPy
        return {"error": repr(e)}


def _simd_level() -> str:
    """The widest vector extension of this CPU: AVX-512, AVX2, AVX, SSE4.2 (x86, from
    /proc/cpuinfo's flags), NEON/ASIMD (ARM), else the machine name."""
    flags: set = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    machine = platform.machine().lower()
    if "avx512f" in flags:
        extra = [x for x in ("avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16") if x in flags]
        return "AVX-512 (" + ", ".join(["avx512f"] + extra) + ")"
    for flag, name in (("avx2", "AVX2" + (" + FMA" if "fma" in flags else "")), ("avx", "AVX"), ("sse4_2", "SSE4.2")):
        if flag in flags:
            return name
    if "asimd" in flags or machine in ("arm64", "aarch64"):
        return "NEON (ASIMD)"
    return machine or "unknown"


def _openblas_corename() -> str | None:
    """The kernel family NumPy's OpenBLAS picked for this CPU (e.g. Haswell, SkylakeX, Zen)."""
    name = _openblas_call(("scipy_openblas_get_corename64_", "openblas_get_corename64_", "openblas_get_corename"),
                          ctypes.c_char_p)
    return None if name is None else name.decode()


def _torch_backend() -> str | None:
    """torch's CPU math libraries: BLAS (MKL, OpenBLAS, ...) and oneDNN, from its build config."""
    if torch is None:
        return None
    try:
        cfg = torch.__config__.show()
    except Exception:  # pragma: no cover - old torch
        cfg = ""
    m = re.search(r"BLAS_INFO=([^,\s]+)", cfg)
    parts = [f"BLAS {m.group(1)}" if m else ("BLAS MKL" if torch.backends.mkl.is_available() else "BLAS ?")]
    if torch.backends.mkldnn.is_available():
        parts.append("oneDNN")
    return " + ".join(parts)


def _version(mod_name: str) -> str | None:
    try:
        mod = __import__(mod_name)
        return getattr(mod, "__version__", None)
    except ImportError:
        return None


def _gpu_info() -> str | None:
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        import cupy  # noqa: F401

        return cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception:
        return None


def _loadavg() -> list | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def machine_info(threads: int) -> dict:
    info = {
        "hostname": socket.gethostname(),
        "cpu_model": _setup.cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": threads,
        "numpy_blas_threads_read_back": _openblas_threads(),
        "numpy_imported_before_thread_setting": _NUMPY_WAS_IMPORTED,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numpy_blas": _numpy_blas(),
        "simd": _simd_level(),
        "openblas_corename": _openblas_corename(),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE"),
        "xrnn": getattr(xrnn, "__version__", None),
        "xrnn_numpy_scans": kernels.scans_for(xrnn.resolve_device("cpu")).name,
        "xrnn_cpu_kernels": native.describe(),
        "array_api_compat": _version("array_api_compat"),
        "torch": None if torch is None else torch.__version__,
        "gpu": _gpu_info(),
        "cupy": _version("cupy"),
    }
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        info["torch_mkldnn"] = bool(torch.backends.mkldnn.is_available())
        info["torch_mkl"] = bool(torch.backends.mkl.is_available())
        info["torch_backend"] = _torch_backend()
    return info


# ---------------------------------------------------------------------------
# timing and memory helpers
# ---------------------------------------------------------------------------

def _median_time(fn, repeats: int, sync=None) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        out.append(time.perf_counter() - t0)
    return out


class _OthersLoad:
    """CPU time other processes used while the block ran, as a share of all CPUs
    (from /proc/stat's busy jiffies minus this process's own CPU time).

    A clean measurement reads about 0; 0.5 on two CPUs means one whole core
    went to other work. None where /proc/stat is missing."""

    _tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                vals = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        busy = sum(vals) - vals[3] - vals[4]  # all but idle and iowait
        t = os.times()
        return busy / _OthersLoad._tick, t.user + t.system, time.perf_counter()

    def __enter__(self):
        self.start = self._sample()
        return self

    def __exit__(self, *exc):
        end = self._sample()
        self.busy = self.own = self.wall = 0.0
        if self.start is not None and end is not None:
            self.busy = end[0] - self.start[0]
            self.own = end[1] - self.start[1]
            self.wall = end[2] - self.start[2]
        return False


def _share(meters) -> float | None:
    busy = sum(m.busy for m in meters)
    own = sum(m.own for m in meters)
    wall = sum(m.wall for m in meters)
    if wall < 0.25:  # /proc/stat counts in 10 ms ticks: too short a block to tell
        return None
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(1.0, max(0.0, busy - own) / (wall * ncpu))


def _interleaved(fns: dict, warmup: int, repeats: int, sync=None, rounds: int = 2) -> dict:
    """Time each function ``repeats`` times in all, in blocks: ``rounds`` rounds
    that visit the libraries in alternating order (A B, B A, ...), each block
    starting with ``warmup`` untimed calls. Returns wall-clock seconds per name.

    Blocks, not call-by-call alternation: with as many threads as cores, the
    worker threads of one library (OpenMP in torch, OpenBLAS in NumPy) spin for
    a while after each call and starve the other library's threads; alternating
    single calls measured a 25-step batch-1 LSTM 8x slower for both libraries.
    """
    names = list(fns)
    per_block = max(1, math.ceil(repeats / rounds))
    times = {k: [] for k in fns}
    meters = {k: [] for k in fns}
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            for _ in range(max(1, warmup) if r == 0 else 1):
                fns[k]()
                if sync is not None:
                    sync()
            with _OthersLoad() as m:
                times[k] += _median_time(fns[k], per_block, sync)
            meters[k].append(m)
    times["_others_share"] = {k: _share(v) for k, v in meters.items()}
    return times


_WAIT_QUIET = 0.0  # seconds to wait for other processes to calm down before each measurement (--wait-quiet)
_WAIT_BUDGET = math.inf  # seconds of waiting left for the whole run (--wait-budget)


def wait_for_quiet(limit: float, max_seconds: float, log=None, what: str = "") -> float | None:
    """Sleep in 1 s windows until other processes use at most ``limit`` of the CPUs
    (this process is idle meanwhile, so all busy time is theirs), at most
    ``max_seconds``. Returns the last window's share (None without /proc/stat)."""
    global _WAIT_BUDGET
    waited, share = 0.0, None
    while True:
        with _OthersLoad() as m:
            time.sleep(0.5 if max_seconds <= 0 else 1.0)
        share = _share([m])
        if share is None or share <= limit or waited >= min(max_seconds, _WAIT_BUDGET):
            break
        if log is not None and waited == 0.0:
            log(f"  {what}: waiting for other processes ({100 * share:.0f}% of the CPUs)")
        waited += m.wall
    _WAIT_BUDGET = max(0.0, _WAIT_BUDGET - waited)
    return share


def _measure(fns: dict, warmup: int, repeats: int, retries: int, limit: float, sync=None, rounds: int = 2,
             log=None, what: str = ""):
    """:func:`_interleaved`, repeated up to ``retries`` more times while other
    processes took more than ``limit`` of the CPUs; keeps the least disturbed
    attempt. Returns (times per name, others' share per name, attempts)."""
    best = None
    for attempt in range(1 + max(0, retries)):
        if _WAIT_QUIET > 0:
            wait_for_quiet(limit, _WAIT_QUIET, log, what)
        times = _interleaved(fns, warmup, repeats, sync, rounds)
        shares = times.pop("_others_share")
        worst = max((v for v in shares.values() if v is not None), default=0.0)
        if best is None or worst < best[2]:
            best = (times, shares, worst, attempt + 1)
        if worst <= limit:
            break
        if log is not None and attempt < retries:
            log(f"  {what}: other processes used {100 * worst:.0f}% of the CPUs; measuring again")
    return best[0], best[1], best[3]



def _rss_kib() -> tuple[int, int] | None:
    try:
        vals = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":")
                    vals[k] = int(v.split()[0])
        return vals["VmRSS"], vals["VmHWM"]
    except (OSError, KeyError):
        return None


def _reset_peak_rss() -> bool:
    """Free what the allocator holds, then reset the kernel's resident high-water mark
    (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    gc.collect(1)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_growth(fn) -> int | None:
    """Bytes by which the resident set's high-water mark rises above the current
    resident size while ``fn()`` runs (None where Linux's clear_refs is missing)."""
    if not _reset_peak_rss():
        return None
    before = _rss_kib()
    fn()
    after = _rss_kib()
    if before is None or after is None:
        return None
    return max(0, after[1] - before[0]) * 1024


def tracemalloc_peak(fn) -> int:
    """Peak bytes of Python/NumPy allocations made during ``fn()`` above those live before it."""
    gc.collect(1)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def matmul_peak(threads: int, n: int, repeats: int) -> dict:
    """Float32 GEMM rate (GFLOP/s) of NumPy's BLAS and of torch at ``threads`` threads."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), dtype=np.float32)
    np.matmul(a, b, out=c)
    t_np = min(_median_time(lambda: np.matmul(a, b, out=c), repeats))
    out = {"n": n, "numpy": 2.0 * n ** 3 / t_np / 1e9}
    if torch is not None:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        tc = torch.empty((n, n), dtype=torch.float32)
        torch.mm(ta, tb, out=tc)
        t_t = min(_median_time(lambda: torch.mm(ta, tb, out=tc), repeats))
        out["torch"] = 2.0 * n ** 3 / t_t / 1e9
    out["peak"] = max(v for k, v in out.items() if k in ("numpy", "torch"))
    return out


# ---------------------------------------------------------------------------
# the two models (same weights, loss and optimizer)
# ---------------------------------------------------------------------------

class _XModel(Module):
    """xrnn recurrent layer plus, for character shapes, a Linear head."""

    def __init__(self, cell: str, s: Shape, device: str, seed: int):
        super().__init__(device, "float32")
        self.add_module("rnn", getattr(xrnn, cell)(s.I, s.H, num_layers=s.L, device=device, seed=seed))
        if s.V:
            self.add_module("head", xrnn.Linear(s.H, s.V, device=device, seed=seed + 1))


def _data(s: Shape, seed: int = 0) -> dict:
    """Host inputs and targets: one-hot characters for V > 0, else Gaussian inputs and targets."""
    rng = np.random.default_rng(seed)
    if s.V:
        ids = rng.integers(0, s.V, size=(s.T, s.B))
        x = np.eye(s.V, dtype=np.float32)[ids]  # (T, B, V) one-hot
        y = rng.integers(0, s.V, size=(s.T, s.B)).astype(np.int64)  # next-character targets
    else:
        x = rng.standard_normal((s.T, s.B, s.I), dtype=np.float32)
        y = rng.standard_normal((s.T, s.B, s.H), dtype=np.float32)
    return {"x": x, "y": y}


class XrnnRunner:
    """Forward and training step of xrnn on one device; optimizer: xrnn.optim.Adam if present, else SGD.

    ``clip``: a global gradient-norm bound applied before the optimizer step (None: no clipping;
    the GPU rows clip at ``GPU_CLIP``, as a real training step does)."""

    clip = None

    def __init__(self, cell: str, s: Shape, data: dict, device: str = "cpu", seed: int = 0):
        self.s = s
        self.model = _XModel(cell, s, device, seed)
        dev = self.model.device
        self.dev = dev
        self.xp = dev.xp
        self.x = dev.asarray(data["x"], "float32")
        self.y = dev.asarray(data["y"], "int64" if s.V else "float32")
        self.n_out = s.T * s.B * s.H
        self.opt = _XAdam(self.model, lr=LR) if _XAdam is not None else None

    def release_kept_buffers(self):
        """Free the buffers the recurrent layers keep between calls (xrnn.LSTM.release_workspace)."""
        for _, mod in self.model.named_modules():
            if hasattr(mod, "release_workspace"):
                mod.release_workspace()

    def forward(self):
        with no_grad():
            out, _ = self.model.rnn(self.x)
            if self.s.V:
                out = self.model.head(out)
        return out

    def _sgd(self):
        grads = self.model.grads
        with self.dev:
            for k, p in self.model.parameters().items():
                p -= LR * grads[k]

    def train_step(self):
        m, xp = self.model, self.xp
        m.zero_grad()
        out, _ = m.rnn(self.x)  # (T, B, H)
        if self.s.V:
            logits = m.head(out)  # (T, B, V)
            with xrnn.backend.trusted_ids():  # targets drawn in range at setup, as the Trainer's corpus ids
                loss, dlogits = xrnn.softmax_cross_entropy(logits, self.y)
            dout = m.head.backward(dlogits)
        else:
            with self.dev:
                diff = out - self.y  # (T, B, H)
                flat = xp.reshape(diff, (-1,))
                loss = xp.vecdot(flat, flat) / self.n_out
                diff *= 2.0 / self.n_out  # d(mean squared error)/d(out), in place
                dout = diff
        m.rnn.backward(dout, input_grad=False)
        if self.clip is not None:
            xrnn.optim.clip_grad_norm(m, self.clip)
        if self.opt is not None:
            self.opt.step()
        else:
            self._sgd()
        return loss


class TorchRunner:
    """The same model in PyTorch: torch.nn.LSTM/GRU/RNN (+ Linear), same weights, loss and optimizer."""

    clip = None  # as XrnnRunner.clip: torch.nn.utils.clip_grad_norm_ before the step

    def __init__(self, cell: str, s: Shape, data: dict, xmodel: Module, device: str = "cpu"):
        self.s = s
        dev = torch.device(device)
        self.rnn = getattr(torch.nn, cell)(s.I, s.H, num_layers=s.L).to(dev)
        self.head = torch.nn.Linear(s.H, s.V).to(dev) if s.V else None
        with torch.no_grad():  # xrnn's weights, so both libraries do the same arithmetic
            for k, v in xmodel.parameters().items():
                mod, name = k.split(".", 1)
                target = getattr(self.rnn if mod == "rnn" else self.head, name)
                target.copy_(torch.from_numpy(np.asarray(xrnn.to_numpy(v))))
        params = list(self.rnn.parameters()) + (list(self.head.parameters()) if self.head is not None else [])
        self.params = params
        self.opt = torch.optim.Adam(params, lr=LR) if _XAdam is not None else torch.optim.SGD(params, lr=LR)
        self.x = torch.from_numpy(data["x"]).to(dev)
        self.y = torch.from_numpy(data["y"]).to(dev)

    def forward(self):
        with torch.no_grad():
            out, _ = self.rnn(self.x)
            if self.head is not None:
                out = self.head(out)
        return out

    def train_step(self):
        # set_to_none=False keeps the gradient buffers between steps, as xrnn does,
        # so neither side's peak memory counts re-allocating them
        self.opt.zero_grad(set_to_none=False)
        out, _ = self.rnn(self.x)
        if self.head is not None:
            logits = self.head(out)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, self.s.V), self.y.reshape(-1))
        else:
            loss = torch.nn.functional.mse_loss(out, self.y)
        loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        return loss


# ---------------------------------------------------------------------------
# the runs
# ---------------------------------------------------------------------------

def _row(lib, cell, s, phase, times, flop, peak, device="cpu"):
    t = statistics.median(times)
    return {
        "lib": lib,
        "device": device,
        "cell": cell,
        "shape": s.name,
        "dims": s.label(),
        "T": s.T, "B": s.B, "I": s.I, "H": s.H, "L": s.L, "V": s.V,
        "phase": phase,
        "seconds_median": t,
        "seconds_all": [round(v, 6) for v in times],
        "tokens_per_s": s.T * s.B / t,
        "gflop": flop / 1e9,
        "gflops": flop / t / 1e9,
        "fraction_of_peak": flop / t / 1e9 / peak if peak else None,
    }


def _repeats_for(fn, base: int, smoke: bool, budget: float = 1.0) -> tuple[int, int]:
    """(warm-up calls, timed calls): at least ``base`` timed calls, more for quick
    steps (about ``budget`` seconds per library, at most 200) so that the timer
    and the load meter have something to measure."""
    if smoke:
        return 1, 2
    fn()
    t0 = time.perf_counter()
    fn()
    t = time.perf_counter() - t0
    return 1, int(min(200, max(base, budget / max(t, 1e-6))))


def bench_cpu(args, peak: float, log) -> tuple[list, list]:
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    rows, mem = [], []
    for s in shapes:
        if args.shapes and s.name not in args.shapes:
            continue
        for cell in CELLS:
            if args.cells and cell not in args.cells:
                continue
            data = _data(s)
            xr = XrnnRunner(cell, s, data)
            tr = TorchRunner(cell, s, data, xr.model) if torch is not None else None
            f_fwd, f_bwd = flops(cell, s)
            for phase, flop in (("forward", f_fwd), ("train", f_fwd + f_bwd)):
                fns = {"xrnn": getattr(xr, "forward" if phase == "forward" else "train_step")}
                warm, reps = _repeats_for(fns["xrnn"], args.repeats, args.smoke)
                if args.portable and phase == "train":
                    def portable_step(xr=xr):
                        with kernels.use_fast_paths(False):
                            xr.train_step()
                    fns["xrnn-portable"] = portable_step
                if tr is not None:
                    fns["torch"] = getattr(tr, "forward" if phase == "forward" else "train_step")
                times, shares, attempts = _measure(fns, warm, reps, args.retries, args.busy_limit, log=log,
                                                   what=f"{s.name} {cell} {phase}")
                got = {lib: _row(lib, cell, s, phase, t, flop, peak) for lib, t in times.items()}
                for lib in got:
                    got[lib]["others_cpu_share"] = shares[lib]
                    got[lib]["attempts"] = attempts
                if "torch" in got:
                    for lib in got:
                        got[lib]["speed_ratio_vs_torch"] = got["torch"]["seconds_median"] / got[lib]["seconds_median"]
                if phase == "train" and not args.no_memory:
                    need = min_step_bytes(cell, s)
                    # layers keep their gate and cell-state buffers between steps: released first, so
                    # the measured step allocates (and counts) them as a first step would
                    xr.release_kept_buffers()
                    got["xrnn"]["peak_bytes_tracemalloc"] = tracemalloc_peak(xr.train_step)
                    xr.release_kept_buffers()
                    got["xrnn"]["peak_bytes_rss"] = peak_rss_growth(xr.train_step)
                    got["xrnn"]["min_step_bytes"] = need
                    if "torch" in got:
                        got["torch"]["peak_bytes_rss"] = peak_rss_growth(tr.train_step)
                        got["torch"]["min_step_bytes"] = need
                    mem.append({
                        "cell": cell, "shape": s.name, "dims": s.label(), "min_step_bytes": need,
                        "xrnn_tracemalloc": got["xrnn"]["peak_bytes_tracemalloc"],
                        "xrnn_rss": got["xrnn"]["peak_bytes_rss"],
                        "torch_rss": got.get("torch", {}).get("peak_bytes_rss"),
                    })
                rows += list(got.values())
                msg = " ".join(f"{lib} {r['seconds_median'] * 1e3:8.2f} ms" for lib, r in got.items())
                ratio = got["xrnn"].get("speed_ratio_vs_torch")
                log(f"{s.name:9s} {cell:4s} {phase:7s} {msg}" + (f"  xrnn/torch {ratio:5.2f}" if ratio else ""))
            del xr, tr
            gc.collect(1)
    return rows, mem


def bench_scaling(args, log) -> list:
    """Medium LSTM training step as T grows: time per token must stay flat."""
    base = SMOKE_SHAPES[-1] if args.smoke else SHAPES[2]
    out = []
    for T in (SMOKE_SCALING_T if args.smoke else SCALING_T):
        s = Shape(base.name, T=T, B=base.B, I=base.I, H=base.H)
        data = _data(s)
        xr = XrnnRunner("LSTM", s, data)
        fns = {"xrnn": xr.train_step}
        if torch is not None and not args.smoke:
            tr = TorchRunner("LSTM", s, data, xr.model)
            fns["torch"] = tr.train_step
        reps = 2 if args.smoke else (5 if T <= 200 else 3 if T <= 500 else 2)
        times, shares, attempts = _measure(fns, 1, reps, args.retries, args.busy_limit, rounds=1, log=log,
                                           what=f"scaling T={T}")
        row = {"T": T, "B": s.B, "I": s.I, "H": s.H, "attempts": attempts,
               "others_cpu_share": max((v for v in shares.values() if v is not None), default=None)}
        for lib, t in times.items():
            med = statistics.median(t)
            row[f"{lib}_seconds"] = med
            row[f"{lib}_us_per_token"] = med / (T * s.B) * 1e6
        out.append(row)
        log(f"scaling T={T:5d} " + " ".join(f"{lib} {row[f'{lib}_us_per_token']:.2f} us/token" for lib in times))
        del xr, fns
        gc.collect(1)
    return out


def bench_lengths(args, log) -> list:
    """Variable-length batches: an LSTM forward+backward on the medium shape with lengths
    drawn uniformly from [T/2, T], against the same batch at full length (the target:
    at most 80% of the time; the padded work is about 75%, never computed)."""
    s = SMOKE_SHAPES[-1] if args.smoke else SHAPES[2]
    data = _data(s)
    lengths = np.random.default_rng(1).integers(s.T // 2, s.T + 1, size=s.B)  # (B,) host
    lstm = xrnn.LSTM(s.I, s.H, num_layers=s.L, seed=0)
    dev = lstm.device
    x = dev.asarray(data["x"], "float32")  # (T, B, I)
    dout = dev.asarray(np.random.default_rng(2).standard_normal((s.T, s.B, s.H)), "float32")  # (T, B, H)

    def step(lens):
        lstm.forward(x, lengths=lens)
        lstm.backward(dout, input_grad=False)

    fns = {"full": lambda: step(None), "lengths": lambda: step(lengths)}
    reps = 2 if args.smoke else args.repeats * 2
    times, shares, attempts = _measure(fns, 1, reps, args.retries, args.busy_limit, rounds=2 if args.smoke else 4,
                                       log=log, what="lengths")
    full, var = statistics.median(times["full"]), statistics.median(times["lengths"])
    row = {"cell": "LSTM", "shape": s.name, "dims": s.label(), "lengths": f"uniform [{s.T // 2}, {s.T}]",
           "work_ratio": float(lengths.sum()) / (s.T * s.B), "full_seconds": full, "lengths_seconds": var,
           "time_ratio": var / full, "attempts": attempts,
           "others_cpu_share": max((v for v in shares.values() if v is not None), default=None)}
    log(f"lengths {s.name} LSTM forward+backward: full {full * 1e3:.2f} ms, lengths {var * 1e3:.2f} ms, "
        f"ratio {row['time_ratio']:.2f} (valid steps {row['work_ratio']:.2f} of the padded batch)")
    return [row]


def lengths_markdown(rows: list) -> str:
    if not rows:
        return ""
    out = ["", "## Variable-length batches (`lengths=`)", "",
           "| cell | shape | lengths | valid share | full | with lengths | time ratio (target <= 0.80) |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['cell']} | {r['dims']} | {r['lengths']} | {r['work_ratio']:.2f} | "
                   f"{r['full_seconds'] * 1e3:.1f} ms | {r['lengths_seconds'] * 1e3:.1f} ms | {r['time_ratio']:.2f} |")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------
# sampling and start-up
# ---------------------------------------------------------------------------

#: (hidden size, batch): a 2-layer LSTM character model, V = 65, 2,000 new characters
SAMPLE_CASES = ((128, 1), (128, 32), (512, 1), (512, 32))
SMOKE_SAMPLE_CASES = ((8, 1), (8, 3))
SAMPLE_V = 65
SAMPLE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # 65 symbols


def _sample_model(H: int, seed: int = 0):
    vocab = xrnn.Vocabulary(list(SAMPLE_CHARS[:SAMPLE_V]))
    return xrnn.CharLM(SAMPLE_V, H, num_layers=2, cell="lstm", seed=seed, vocab=vocab), vocab


class TorchSampler:
    """torch's step-by-step sampling loop for the same model: one-hot input, ``nn.LSTM`` with the
    state carried, ``Linear`` head, ``softmax`` and ``multinomial``, the ids back to the host and
    decoded, all under ``torch.inference_mode()``."""

    def __init__(self, xmodel, vocab):
        H, V = xmodel.hidden_size, xmodel.vocab_size
        self.V = V
        self.itos = [vocab.decode([i]) for i in range(V)]
        self.lstm = torch.nn.LSTM(V, H, num_layers=xmodel.num_layers)
        self.head = torch.nn.Linear(H, V)
        with torch.no_grad():
            for k, v in xmodel.parameters().items():
                mod, name = k.split(".", 1)
                target = getattr(self.lstm if mod == "rnn" else self.head, name)
                target.copy_(torch.from_numpy(np.asarray(xrnn.to_numpy(v))))
        self.eye = torch.eye(V)

    def sample(self, length: int, batch: int, seed: int = 1, temperature: float = 1.0):
        itos = self.itos
        with torch.inference_mode():
            g = torch.Generator().manual_seed(seed)
            tok = torch.randint(self.V, (batch,), generator=g)  # (B,) uniform first character
            parts = [[] for _ in range(batch)]
            state = None
            for step in range(length):
                host = tok.tolist()
                for b in range(batch):
                    parts[b].append(itos[host[b]])
                if step + 1 < length:
                    y, state = self.lstm(self.eye[tok].unsqueeze(0), state)  # (1, B, H)
                    p = torch.softmax(self.head(y[0]) / temperature, dim=-1)  # (B, V)
                    tok = torch.multinomial(p, 1, generator=g).squeeze(1)  # (B,)
        return ["".join(ps) for ps in parts]


def bench_sampling(args, log) -> list:
    """xrnn.sample against torch's step loop: 2,000 characters from a 2-layer LSTM (H, B)."""
    cases = SMOKE_SAMPLE_CASES if args.smoke else SAMPLE_CASES
    length = 20 if args.smoke else 2000
    rows = []
    for H, B in cases:
        xm, vocab = _sample_model(H)
        fns = {"xrnn": lambda xm=xm, B=B: xrnn.sample(xm, length=length, seed=1, num_samples=B)}
        if torch is not None:
            ts = TorchSampler(xm, vocab)
            fns["torch"] = lambda ts=ts, B=B: ts.sample(length, B)
        reps = 2 if args.smoke else 5
        times, shares, attempts = _measure(fns, 1, reps, args.retries, args.busy_limit, log=log,
                                           what=f"sampling H={H} B={B}")
        row = {"H": H, "B": B, "L": 2, "V": SAMPLE_V, "length": length, "attempts": attempts,
               "others_cpu_share": max((v for v in shares.values() if v is not None), default=None)}
        for lib, t in times.items():
            row[f"{lib}_seconds"] = statistics.median(t)
            row[f"{lib}_seconds_min"] = min(t)
            row[f"{lib}_seconds_all"] = [round(v, 6) for v in t]
            row[f"{lib}_chars_per_s"] = length * B / statistics.median(t)
        if "torch" in times:
            row["speed_ratio_vs_torch"] = row["torch_seconds"] / row["xrnn_seconds"]
        rows.append(row)
        log(f"sampling H={H:4d} B={B:3d} " + " ".join(f"{lib} {row[f'{lib}_seconds'] * 1e3:8.1f} ms" for lib in times)
            + (f"  xrnn/torch {row['speed_ratio_vs_torch']:5.2f}" if "speed_ratio_vs_torch" in row else ""))
    return rows


def _run_seconds(cmd: list, env: dict) -> float:
    import subprocess

    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def bench_startup(args, log) -> dict:
    """The whole process ``xrnn sample CKPT --length 200`` against ``python -c "import numpy"``
    plus the in-process time of the same sampling (H = 128, 2 layers, batch 1); minima over
    alternating runs. Target: start-up <= 1.5 x (import numpy + sampling)."""
    H, length = (8, 20) if args.smoke else (128, 200)
    xm, _ = _sample_model(H)
    tmp = tempfile.mkdtemp(prefix="xrnn-startup-")
    ckpt = os.path.join(tmp, "model.ckpt")
    xrnn.save(xm, ckpt)
    env = dict(os.environ)
    env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
    # as after an install, compiled bytecode is reused (in a cache folder of this run, not the checkout)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = os.path.join(tmp, "pycache")
    sample_cmd = [sys.executable, "-m", "xrnn", "sample", ckpt, "--length", str(length), "--seed", "1"]
    numpy_cmd = [sys.executable, "-c", "import numpy"]
    reps = 2 if args.smoke else 15  # minima of 7 still moved by 0.3 between runs on a shared host
    _run_seconds(numpy_cmd, env)  # fills the bytecode cache
    _run_seconds(sample_cmd, env)
    if _WAIT_QUIET > 0:
        wait_for_quiet(args.busy_limit, _WAIT_QUIET, log, "start-up")
    t_sample, t_numpy, t_in = [], [], []
    with _OthersLoad() as m:
        for _ in range(reps):
            t_numpy.append(_run_seconds(numpy_cmd, env))
            t_sample.append(_run_seconds(sample_cmd, env))
            t0 = time.perf_counter()
            xrnn.sample(xm, length=length, seed=1)
            t_in.append(time.perf_counter() - t0)
    budget = 1.5 * (min(t_numpy) + min(t_in))
    row = {"H": H, "L": 2, "length": length, "command": f"xrnn sample CKPT --length {length:d}",
           "xrnn_sample_process_seconds": min(t_sample), "import_numpy_process_seconds": min(t_numpy),
           "sampling_in_process_seconds": min(t_in), "budget_seconds": budget,
           "ratio_to_numpy_plus_sampling": min(t_sample) / (min(t_numpy) + min(t_in)),
           "all": {"sample": t_sample, "numpy": t_numpy, "in_process": t_in}, "others_cpu_share": _share([m]),
           "bytecode_cached": True}
    log(f"start-up: xrnn sample {row['xrnn_sample_process_seconds'] * 1e3:.0f} ms, import numpy "
        f"{row['import_numpy_process_seconds'] * 1e3:.0f} ms + sampling {row['sampling_in_process_seconds'] * 1e3:.0f}"
        f" ms: ratio {row['ratio_to_numpy_plus_sampling']:.2f} (target <= 1.5)")
    return row


# ---------------------------------------------------------------------------
# GPU: CuPy against torch CUDA (cuDNN), and xrnn's NumPy path
# ---------------------------------------------------------------------------

def gpu_available() -> tuple[bool, str]:
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return False, f"CuPy/GPU unavailable ({type(e).__name__}: {e})"
    if torch is None or not torch.cuda.is_available():
        return False, "torch CUDA unavailable"
    return True, ""


def gpu_stub(shapes, why: str) -> dict:
    return {"status": "not yet measured", "reason": why,
            "rows": [{"cell": c, "shape": s.name, "dims": s.label(), "status": "not yet measured"}
                     for s in shapes for c in CELLS]}


#: cells of the GPU rows (RNN with --cells RNN) and the clipping bound of their training step
GPU_CELLS = ("LSTM", "GRU")
GPU_CLIP = 5.0
#: the libraries of a GPU row: xrnn's fused CuPy kernels, xrnn's portable scans on CuPy,
#: torch on CUDA (cuDNN's fused RNN), xrnn's NumPy path on this machine's CPU
GPU_LIBS = ("xrnn-fused", "xrnn-portable", "torch-cudnn", "xrnn-numpy")


def gpu_properties() -> dict:
    """The GPU as CuPy sees it: name, memory, multiprocessors, compute capability, CUDA versions."""
    import cupy

    p = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = p["name"].decode() if isinstance(p["name"], bytes) else str(p["name"])
    return {"name": name, "total_memory_bytes": int(p["totalGlobalMem"]),
            "multiprocessors": int(p["multiProcessorCount"]), "compute_capability": f"{p['major']}.{p['minor']}",
            "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(), "cuda_driver": cupy.cuda.runtime.driverGetVersion(),
            "cupy": cupy.__version__, "torch_cudnn": torch.backends.cudnn.version() if torch is not None else None}


def host_syncs(fn):
    """0 when ``fn()`` ran without CuPy synchronising the host with the GPU, else a string
    '>=1: ...' naming the first synchronisation (``cupyx.allow_synchronize(False)`` raises at it;
    it sees CuPy's own host reads: ``.get()``, ``float()``, ``bool()``, boolean-mask indexing)."""
    import cupyx

    try:
        with cupyx.allow_synchronize(False):
            fn()
    except Exception as e:  # cupyx.DeviceSynchronized; anything else is a real error
        if type(e).__name__ != "DeviceSynchronized":
            raise
        return f">=1: {e}"
    return 0


def bench_gpu(args, log) -> dict:
    """GPU rows: for each shape and cell, the forward and the training step (forward, loss, BPTT,
    clipping at ``GPU_CLIP``, Adam) of xrnn fused, xrnn portable and torch cuDNN on the GPU and xrnn's
    NumPy path on the CPU; peak GPU memory of a training step and its host synchronisations."""
    ok, why = gpu_available()
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    dry = getattr(args, "dry_run", False)  # the CPU stands in for the GPU: checks this code, measures nothing
    if not ok and not dry:
        log(f"GPU: not yet measured ({why})")
        return gpu_stub(shapes, why)
    if dry:
        gdev, props = "cpu", {"name": "DRY RUN: the CPU stood in for the GPU (numbers meaningless)"}

        def sync():
            pass
    else:
        import cupy

        gdev = "cuda"

        def sync():
            cupy.cuda.Device().synchronize()
            torch.cuda.synchronize()

        props = gpu_properties()
        log(f"GPU: {props['name']}, {props['total_memory_bytes'] / 2 ** 30:.0f} GiB, CuPy {props['cupy']}")
    cells = args.cells or GPU_CELLS
    rows = []
    for s in shapes:
        if args.shapes and s.name not in args.shapes:
            continue
        for cell in cells:
            data = _data(s)
            xg = XrnnRunner(cell, s, data, device=gdev)
            xc = XrnnRunner(cell, s, data, device="cpu")
            tg = TorchRunner(cell, s, data, xc.model, device=gdev)
            xg.clip = xc.clip = tg.clip = GPU_CLIP
            f_fwd, f_bwd = flops(cell, s)
            for phase, flop in (("forward", f_fwd), ("train", f_fwd + f_bwd)):
                name = "forward" if phase == "forward" else "train_step"
                fused = getattr(xg, name)

                def portable(fn=fused):
                    with kernels.use_fast_paths(False):
                        fn()

                warm, reps = _repeats_for(fused, args.repeats, args.smoke)
                times = _measure({"xrnn-fused": fused, "torch-cudnn": getattr(tg, name)}, warm, reps, 0, 1.0, sync)[0]
                if args.portable:
                    w, r = _repeats_for(portable, 2, args.smoke)
                    times.update(_measure({"xrnn-portable": portable}, w, r, 0, 1.0, sync, rounds=1)[0])
                w, r = _repeats_for(getattr(xc, name), 2, args.smoke)
                times.update(_measure({"xrnn-numpy": getattr(xc, name)}, w, min(r, 5), 0, 1.0, rounds=1)[0])
                row = {"cell": cell, "shape": s.name, "dims": s.label(), "phase": phase, "dtype": "float32"}
                for lib, t in times.items():
                    med = statistics.median(t)
                    row[f"{lib}_seconds"] = med
                    row[f"{lib}_tokens_per_s"] = s.T * s.B / med
                    row[f"{lib}_gflops"] = flop / med / 1e9
                row["fused_vs_torch"] = row["torch-cudnn_seconds"] / row["xrnn-fused_seconds"]
                row["fused_vs_numpy"] = row["xrnn-numpy_seconds"] / row["xrnn-fused_seconds"]
                if "xrnn-portable_seconds" in row:
                    row["fused_vs_portable"] = row["xrnn-portable_seconds"] / row["xrnn-fused_seconds"]
                if phase == "train" and not dry:
                    torch.cuda.reset_peak_memory_stats()
                    tg.train_step()
                    sync()
                    row["torch-cudnn_peak_bytes"] = int(torch.cuda.max_memory_allocated())
                    pool = cupy.get_default_memory_pool()
                    for lib, fn in (("xrnn-fused", fused), ("xrnn-portable", portable)):
                        sync()
                        pool.free_all_blocks()
                        before = pool.total_bytes()
                        fn()
                        sync()
                        # the pool keeps what the step needed: its growth bounds the step's peak
                        row[f"{lib}_pool_growth_bytes"] = int(pool.total_bytes() - before)
                        row[f"{lib}_host_syncs"] = host_syncs(fn)
                        sync()
                rows.append(row)
                log(f"gpu {s.name:9s} {cell:4s} {phase:7s} " + " ".join(
                    f"{lib} {row[f'{lib}_seconds'] * 1e3:.2f} ms" for lib in GPU_LIBS if f"{lib}_seconds" in row)
                    + (f" syncs fused {row['xrnn-fused_host_syncs']}" if phase == "train" and not dry else ""))
            del xg, xc, tg
            gc.collect(1)
            if not dry:
                cupy.get_default_memory_pool().free_all_blocks()
    return {"status": "measured", "device": props["name"], "properties": props, "clip": GPU_CLIP, "rows": rows}


# ---------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------

def _mib(b) -> str:
    return "n/a" if b is None else f"{b / 2 ** 20:.1f}"


def _fmt_rate(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


#: the CPU speed targets (issue 16): (phase, shapes, least xrnn/torch ratio)
SPEED_TARGETS = (("train", ("medium", "large"), 1.2), ("train", ("seed",), 1.0),
                 ("forward", ("medium", "large"), 1.0))
SAMPLING_TARGET = 1.0  # xrnn.sample / torch's step loop
STARTUP_TARGET = 1.5  # xrnn sample process / (import numpy + sampling)


def targets(rows: list, scaling: list, mem: list, sampling: list | None = None, startup: dict | None = None) -> list:
    """The issue's CPU targets, each with the measured number and pass/miss."""
    out = []
    by = {(r["lib"], r["cell"], r["shape"], r["phase"]): r for r in rows}
    for phase, shapes, least in SPEED_TARGETS:
        for cell in CELLS:
            for shape in shapes:
                r = by.get(("xrnn", cell, shape, phase))
                if r and "speed_ratio_vs_torch" in r:
                    v = r["speed_ratio_vs_torch"]
                    what = "training step" if phase == "train" else "forward"
                    label = "seed (batch 1)" if shape == "seed" else shape
                    out.append({"target": f"{cell} {label} {what} xrnn/torch >= {least}", "value": round(v, 3),
                                "met": v >= least})
    for r in sampling or []:
        if "speed_ratio_vs_torch" in r:
            v = r["speed_ratio_vs_torch"]
            out.append({"target": f"sampling {r['length']} chars, 2-layer LSTM H={r['H']} B={r['B']}, xrnn/torch "
                                  f">= {SAMPLING_TARGET}", "value": round(v, 3), "met": v >= SAMPLING_TARGET})
    if startup:
        v = startup["ratio_to_numpy_plus_sampling"]
        out.append({"target": f"start-up of `{startup['command']}` / (import numpy + sampling) <= {STARTUP_TARGET}",
                    "value": round(v, 3), "met": v <= STARTUP_TARGET})
    for m in mem:
        if m["shape"] == "medium":
            v = m["xrnn_tracemalloc"] / m["min_step_bytes"]
            out.append({"target": f"{m['cell']} medium training peak / backward minimum (<= 1.05)",
                        "value": round(v, 3), "met": v <= 1.05})
    if scaling:
        us = [r["xrnn_us_per_token"] for r in scaling]
        v = max(us) / min(us)
        out.append({"target": "medium LSTM time per token, max/min over T in " + str([r["T"] for r in scaling])
                    + " (flat: <= 1.25)", "value": round(v, 3), "met": v <= 1.25})
    return out


def markdown(rec: dict) -> str:
    m = rec["machine"]
    pk = rec["matmul_peak_gflops"]
    lines = [
        f"# xrnn vs PyTorch: {m['cpu_model']}, {rec['threads']} threads, float32",
        "",
        f"Recorded {rec['created']} by `{rec['command']}`"
        + (" (SMOKE: tiny shapes, numbers meaningless)" if rec["smoke"] else "") + ".",
        "",
        f"- Machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs ({m['cpus_available']} available), "
        f"threads used {rec['threads']} (NumPy's OpenBLAS reports {m['numpy_blas_threads_read_back']}, "
        f"torch {m.get('torch_threads')}).",
        f"- CPU: SIMD {m.get('simd', '?')}; NumPy's OpenBLAS kernels: {m.get('openblas_corename') or '?'} "
        f"(OPENBLAS_CORETYPE={m.get('OPENBLAS_CORETYPE') or 'unset'}); torch: {m.get('torch_backend') or 'n/a'}.",
        f"- Libraries: Python {m['python']}, NumPy {m['numpy']} ({m['numpy_blas'].get('name', '?')} "
        f"{m['numpy_blas'].get('version', '')}), torch {m['torch']}, xrnn {m['xrnn']} "
        f"(NumPy scans: {m['xrnn_numpy_scans']}; {m.get('xrnn_cpu_kernels', 'NumPy kernels')}), "
        f"array-api-compat {m['array_api_compat']}; GPU: {m['gpu'] or 'none'}.",
        (f"- Matrix-multiply peak measured in this run (float32 {pk['n']}x{pk['n']}): NumPy "
         f"{pk['numpy']:.1f} GFLOP/s"
         + (f", torch {pk['torch']:.1f} GFLOP/s" if "torch" in pk else "")
         + f"; fractions below are of {pk['peak']:.1f} GFLOP/s.") if pk else
        "- Matrix-multiply peak: not measured (--only).",
        f"- Load average at start/end: {rec['loadavg_start']} / {rec['loadavg_end']} "
        "(other work on the machine inflates times; see the README).",
        f"- Optimizer in the training step: {rec['optimizer']}; loss: softmax cross-entropy over a Linear head "
        "for the character shapes (one-hot inputs), mean squared error for medium/large.",
        "",
        "Speed ratio = PyTorch time / xrnn time (above 1: xrnn faster). Times are medians over repeats run in "
        "alternating blocks per library. Other load = the largest share of the CPUs that other processes used "
        "while a row was measured (a row above the limit was measured again, up to twice, and the least "
        "disturbed attempt kept).",
        "",
    ]
    cpu_phases = () if rec["device"] == "cuda" or not rec["results"] else (
        ("train", "Training step (forward, loss, backward, optimizer step)"),
        ("forward", "Forward only (no gradient bookkeeping)"))
    for phase, title in cpu_phases:
        lines += [f"## {title}", ""]
        hdr = ("| shape | cell | xrnn tok/s | torch tok/s | xrnn/torch | xrnn GFLOP/s (peak %) "
               "| torch GFLOP/s (peak %) |")
        sep = "|---|---|---:|---:|---:|---:|---:|"
        if phase == "train":
            hdr += " xrnn portable xrnn/torch | xrnn peak MiB (RSS) | torch peak MiB (RSS) | minimum MiB |"
            sep += "---:|---:|---:|---:|"
        hdr += " other load |"
        sep += "---:|"
        lines += [hdr, sep]
        by = {(r["lib"], r["cell"], r["shape"], r["phase"]): r for r in rec["results"]}
        for r in rec["results"]:
            if r["lib"] != "xrnn" or r["phase"] != phase:
                continue
            t = by.get(("torch", r["cell"], r["shape"], phase))
            pr = by.get(("xrnn-portable", r["cell"], r["shape"], phase))
            frac = r["fraction_of_peak"]
            cells = [f"{r['shape']} ({r['dims']})", r["cell"], _fmt_rate(r["tokens_per_s"]),
                     _fmt_rate(t["tokens_per_s"]) if t else "n/a",
                     f"**{r['speed_ratio_vs_torch']:.2f}**" if t else "n/a",
                     f"{r['gflops']:.1f} ({100 * frac:.0f}%)",
                     f"{t['gflops']:.1f} ({100 * t['fraction_of_peak']:.0f}%)" if t else "n/a"]
            if phase == "train":
                cells += [f"{pr['speed_ratio_vs_torch']:.2f}" if pr and t else "-",
                          f"{_mib(r.get('peak_bytes_tracemalloc'))} ({_mib(r.get('peak_bytes_rss'))})",
                          _mib(t.get("peak_bytes_rss")) if t else "n/a",
                          _mib(r.get("min_step_bytes"))]
            loads = [x.get("others_cpu_share") for x in (r, t, pr) if x]
            loads = [v for v in loads if v is not None]
            cells.append(f"{100 * max(loads):.0f}%" if loads else "n/a")
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
    lines += [] if not cpu_phases else [
        "Peak memory: what one training step adds above what existed before it (inputs, targets, weights, "
        "gradients, optimizer state). xrnn's layers keep their gate and cell-state buffers between calls; "
        "they are released before the measured step, so it allocates and counts them. "
        "xrnn: NumPy allocations traced by `tracemalloc` (in brackets: growth of "
        "the process's resident high-water mark, the same measure as torch's). torch: resident high-water mark "
        "growth (Linux `clear_refs`), which also counts allocator and thread-pool overheads. Minimum: gates + "
        "hidden states (+ LSTM cells / GRU's `W_hn h + b_hn`) per layer, the output gradient, and the "
        "softmax gradient for character shapes (README).",
        "",
    ]
    if rec["scaling"]:
        lines += ["## Scaling: medium LSTM training step as T grows", "",
                  "| T | xrnn us/token | torch us/token | other load |", "|---:|---:|---:|---:|"]
        for r in rec["scaling"]:
            tt = r.get("torch_us_per_token")
            ol = r.get("others_cpu_share")
            lines.append(f"| {r['T']} | {r['xrnn_us_per_token']:.2f} | {'n/a' if tt is None else f'{tt:.2f}'} | "
                         f"{'n/a' if ol is None else f'{100 * ol:.0f}%'} |")
        lines.append("")
    if rec.get("sampling"):
        lines += ["## Sampling: `xrnn.sample` against torch's step loop under `torch.inference_mode()`", "",
                  "2-layer LSTM character model (V = 65, one-hot input), characters generated per call as below, "
                  "temperature 1; torch: `nn.LSTM` step with the state carried, `Linear`, `softmax`, "
                  "`multinomial`, ids to the host and decoded. Medians of alternating blocks.", "",
                  "| H | batch | chars | xrnn chars/s | torch chars/s | xrnn/torch | other load |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rec["sampling"]:
            ol = r.get("others_cpu_share")
            tc = r.get("torch_chars_per_s")
            ratio = r.get("speed_ratio_vs_torch")
            lines.append(f"| {r['H']} | {r['B']} | {r['length']} | {_fmt_rate(r['xrnn_chars_per_s'])} | "
                         f"{'n/a' if tc is None else _fmt_rate(tc)} | "
                         f"{'n/a' if ratio is None else f'**{ratio:.2f}**'} | "
                         f"{'n/a' if ol is None else f'{100 * ol:.0f}%'} |")
        lines.append("")
    su = rec.get("startup")
    if su:
        ol = su.get("others_cpu_share")
        lines += ["## Start-up: the whole `xrnn sample` process", "",
                  f"`{su['command']}` (2-layer LSTM, H = {su['H']}; bytecode cached as after an install): "
                  f"{su['xrnn_sample_process_seconds'] * 1e3:.0f} ms; `python -c \"import numpy\"` "
                  f"{su['import_numpy_process_seconds'] * 1e3:.0f} ms; the same sampling in-process "
                  f"{su['sampling_in_process_seconds'] * 1e3:.0f} ms; ratio "
                  f"**{su['ratio_to_numpy_plus_sampling']:.2f}** (target <= {STARTUP_TARGET}); minima of alternating "
                  f"runs; other load {'n/a' if ol is None else f'{100 * ol:.0f}%'}.", ""]
    if rec["targets"]:
        lines += ["## Targets (CPU, float32)", "", "| target | measured | met |", "|---|---:|:---:|"]
        for t in rec["targets"]:
            lines.append(f"| {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |")
        lines.append("")
    g = rec["gpu"]
    if g is None:  # --only: no GPU section
        return "\n".join(lines)
    lines += ["## GPU: xrnn on CuPy vs torch CUDA (cuDNN), and the speed-up over xrnn's NumPy path", ""]
    if g["status"] != "measured":
        lines += [f"Not yet measured: {g['reason']}.", "",
                  "| shape | cell | xrnn CuPy tok/s | torch cuDNN tok/s | xrnn/torch | GPU speed-up over NumPy |",
                  "|---|---|---|---|---|---|"]
        for r in g["rows"]:
            lines.append(f"| {r['shape']} ({r['dims']}) | {r['cell']} | not yet measured | not yet measured "
                         "| not yet measured | not yet measured |")
    else:
        p = g.get("properties", {})
        lines += [f"Device: {g['device']} ({p.get('multiprocessors', '?')} SMs, compute capability "
                  f"{p.get('compute_capability', '?')}, CuPy {p.get('cupy', '?')}, cuDNN {p.get('torch_cudnn', '?')}); "
                  f"float32; training step = forward, loss, BPTT, global-norm clipping at {g.get('clip')}, Adam.",
                  "",
                  "Tokens per second (T·B / median time). fused/torch above 1: xrnn's fused kernels beat cuDNN; "
                  "fused/portable: what the fused kernels buy over the portable Array API scans on the same GPU; "
                  "fused/NumPy: the GPU's speed-up over xrnn's NumPy path on this machine's CPU. Memory: CuPy pool "
                  "growth during one step (xrnn) and `torch.cuda.max_memory_allocated` (torch). Host syncs: "
                  "`cupyx.allow_synchronize(False)` around one step (0, or where the first one happened).",
                  "",
                  "| shape | cell | phase | xrnn fused | xrnn portable | torch cuDNN | xrnn NumPy (CPU) | fused/torch "
                  "| fused/portable | fused/NumPy | peak MiB fused / portable / torch | host syncs fused / portable |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]

        def rate(r, lib):
            v = r.get(f"{lib}_tokens_per_s")
            return "-" if v is None else _fmt_rate(v)

        for r in g["rows"]:
            mem = syncs = "-"
            if r["phase"] == "train":
                mem = " / ".join(_mib(r.get(k)) for k in ("xrnn-fused_pool_growth_bytes",
                                                           "xrnn-portable_pool_growth_bytes",
                                                           "torch-cudnn_peak_bytes"))
                syncs = " / ".join(str(r.get(k, "-")).split(":")[0] for k in ("xrnn-fused_host_syncs",
                                                                               "xrnn-portable_host_syncs"))
            fp = r.get("fused_vs_portable")
            lines.append(f"| {r['shape']} ({r['dims']}) | {r['cell']} | {r['phase']} | {rate(r, 'xrnn-fused')} | "
                         f"{rate(r, 'xrnn-portable')} | {rate(r, 'torch-cudnn')} | {rate(r, 'xrnn-numpy')} | "
                         f"{r['fused_vs_torch']:.2f} | {'-' if fp is None else f'{fp:.1f}'} | "
                         f"{r['fused_vs_numpy']:.1f} | {mem} | {syncs} |")
    lines.append("")
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "machine"


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2,
                   help="threads for NumPy's BLAS and torch (set before NumPy is imported; default 2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: xrnn (NumPy) vs torch CPU; cuda: xrnn (CuPy) vs torch CUDA/cuDNN and xrnn's NumPy path")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and few repeats (seconds); writes to a temp dir")
    p.add_argument("--out", default=None,
                   help="output directory (default benchmarks/results, or a temp dir with --smoke)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed repeats per measurement for the big shapes (default 5)")
    p.add_argument("--shapes", nargs="*", default=None, help="only these shapes (seed char-rnn medium large)")
    p.add_argument("--cells", nargs="*", default=None, help="only these cells (LSTM GRU RNN)")
    p.add_argument("--dry-run", action="store_true",
                   help="with --device cuda: run the GPU rows' code with the CPU standing in for the GPU (checks "
                        "the plumbing where no GPU is; numbers meaningless; writes to a temp dir unless --out)")
    p.add_argument("--no-scaling", action="store_true", help="skip the T-scaling run")
    p.add_argument("--no-lengths", action="store_true", help="skip the variable-length (lengths=) row")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument("--no-portable", dest="portable", action="store_false",
                   help="skip the training-step rows of xrnn's portable path (fast paths off)")
    p.add_argument("--busy-limit", type=float, default=0.10,
                   help="share of the CPUs other processes may use during a measurement before it is "
                        "repeated (default 0.10)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each measurement, wait up to this long for other processes to use at most "
                        "--busy-limit of the CPUs (default 0: do not wait); for shared machines")
    p.add_argument("--retries", type=int, default=2,
                   help="how often a disturbed measurement is repeated; the least disturbed is kept (default 2)")
    p.add_argument("--wait-budget", type=float, default=None, metavar="SECONDS",
                   help="the most time the whole run spends waiting for quiet (default: no bound, or 240 s "
                        "with --targets); after it is spent, rows are measured without waiting")
    p.add_argument("--targets", action="store_true",
                   help="only the rows of the speed targets: seed, medium and large (training step and forward, "
                        "every cell), sampling and start-up; no memory, scaling or portable rows "
                        "(about 5-8 minutes on 2 cores); waits up to 60 s for quiet per row")
    p.add_argument("--no-sampling", action="store_true", help="skip the sampling rows")
    p.add_argument("--no-startup", action="store_true", help="skip the start-up row")
    p.add_argument("--only", choices=("startup",), default=None,
                   help="measure only this row (startup: the whole `xrnn sample` process against import numpy + "
                        "sampling; no matmul peak, training, sampling or GPU rows); the partial record goes to a "
                        "temp dir unless --out")
    args = p.parse_args(argv)
    if args.only and args.no_startup:
        p.error("--only startup and --no-startup contradict each other")
    if args.targets:
        args.shapes = args.shapes or ["seed", "medium", "large"]
        args.no_scaling = args.no_memory = True
        args.portable = False
        if args.wait_quiet == 0.0:
            args.wait_quiet = 60.0
        if args.wait_budget is None:
            args.wait_budget = 240.0
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if torch is not None:
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
    if args.smoke:
        args.retries = 0
    global _WAIT_QUIET, _WAIT_BUDGET
    _WAIT_QUIET = 0.0 if args.smoke else args.wait_quiet
    _WAIT_BUDGET = math.inf if args.wait_budget is None else args.wait_budget

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    rec = {
        "schema": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python benchmarks/bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "smoke": args.smoke,
        "device": args.device,
        "threads": args.threads,
        "loadavg_start": _loadavg(),
        "machine": machine_info(args.threads),
        "optimizer": "Adam (xrnn.optim / torch.optim), lr 1e-3" if _XAdam is not None
        else "SGD lr 1e-3 (inline for xrnn, torch.optim.SGD)",
    }
    log(f"machine: {rec['machine']['cpu_model']}, threads {args.threads} "
        f"(OpenBLAS reports {rec['machine']['numpy_blas_threads_read_back']})")
    if args.only == "startup":  # the one row, and nothing that takes minutes (no matmul peak either)
        rec["matmul_peak_gflops"], rec["gpu"] = None, None
        rec["results"], rec["memory"], rec["scaling"], rec["sampling"] = [], [], [], []
        rec["startup"] = bench_startup(args, log)
    else:
        if _WAIT_QUIET > 0:
            wait_for_quiet(args.busy_limit, _WAIT_QUIET, log, "matmul peak")
        with _OthersLoad() as m:
            rec["matmul_peak_gflops"] = matmul_peak(args.threads, 256 if args.smoke else 2048, 2 if args.smoke else 5)
        rec["matmul_peak_gflops"]["others_cpu_share"] = _share([m])
        log("matmul peak GFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in rec["matmul_peak_gflops"].items()
                                                if k in ("numpy", "torch", "peak")))
    if args.only:
        pass
    elif args.device == "cuda":
        rec["results"], rec["memory"], rec["scaling"], rec["sampling"], rec["startup"] = [], [], [], [], None
        rec["gpu"] = bench_gpu(args, log)
    else:
        rec["results"], rec["memory"] = bench_cpu(args, rec["matmul_peak_gflops"]["peak"], log)
        rec["scaling"] = [] if args.no_scaling else bench_scaling(args, log)
        rec["lengths"] = [] if args.no_lengths else bench_lengths(args, log)
        rec["sampling"] = [] if args.no_sampling else bench_sampling(args, log)
        rec["startup"] = None if args.no_startup else bench_startup(args, log)
        ok, why = gpu_available()
        rec["gpu"] = gpu_stub(SMOKE_SHAPES if args.smoke else SHAPES,
                              "this run used --device cpu; run with --device cuda" if ok else why)
    rec["targets"] = targets(rec["results"], rec["scaling"], rec["memory"], rec["sampling"], rec["startup"])
    rec["loadavg_end"] = _loadavg()
    rec["wall_seconds"] = time.perf_counter() - t_start

    out_dir = args.out or (tempfile.mkdtemp(prefix="xrnn-bench-") if args.smoke or args.dry_run or args.only
                           else os.path.join(_ROOT, "benchmarks", "results"))
    os.makedirs(out_dir, exist_ok=True)
    m = rec["machine"]
    stem = f"{_slug(m['cpu_model'])}-{m['logical_cpus']}cpu-{args.device}-{args.threads}t-{rec['created'][:10]}"
    if args.device == "cuda" and rec["gpu"] and rec["gpu"]["status"] == "measured" and not args.dry_run:
        stem = f"{_slug(rec['gpu']['device'])}-cuda-{args.threads}t-{rec['created'][:10]}"
    json_path = os.path.join(out_dir, stem + ".json")
    # a --targets run is partial (no memory, scaling or portable rows): it keeps its own table
    md_name = ("latest-targets.md" if args.targets else "latest.md") if args.device == "cpu" else "latest-gpu.md"
    if args.only:
        md_name = f"latest-{args.only}.md"
    md_path = os.path.join(out_dir, md_name)
    with open(json_path, "w") as f:
        json.dump(rec, f, indent=1, default=float)
    with open(md_path, "w") as f:
        f.write(markdown(rec) + lengths_markdown(rec.get("lengths", [])))
    log(f"wrote {json_path} and {md_path}")
    for t in rec["targets"]:
        log(f"target {'met ' if t['met'] else 'MISS'} {t['target']}: {t['value']}")
    rec["paths"] = {"json": json_path, "markdown": md_path}
    return rec


if __name__ == "__main__":
    main()
