"""Training: one loop for the Python API and the ``xrnn train`` command.

:class:`Trainer` owns a model, a corpus, an optimizer and everything else a
run needs, and :func:`train` builds one from options (corpus, vocabulary,
:class:`~xrnn.models.CharLM`) and runs it. The command line calls
:func:`train`, so both share one loop::

    for each step:
        x, y = next window of B streams x T steps     (host ids -> device)
        logits, state = model(x, state carried from the previous window)
        loss, dlogits = softmax_cross_entropy(logits, y)
        model.backward(dlogits)                       (truncated BPTT)
        reduce gradients across ranks                 (one allreduce; no-op: one process)
        clip (value, then global norm)
        optimizer step (after a snapshot of weights and optimizer state)
        check loss, gradient norm and the updated weights and state are finite
                                                      (one host read of 3 scalars; undo the step if not)
        keep the final state for the next window

Determinism. Everything that decides the next step is saved in a trainer
checkpoint: weights, the model's dropout RNG, the optimizer state and step
count, the learning-rate schedule (a pure function of the step), the data
position, the hidden state carried between windows, the sample seed, the
loss history and the best validation loss. Resuming therefore reproduces the
uninterrupted run bit for bit on the same backend (validation and sampling
draw nothing from the model's RNG, so they do not perturb it either).

Host synchronisation. With ``check_finite=True`` (default) each step reads
ONE triple of scalars from the device: the loss, the gradient norm, and an
all-finite reduction over the updated weights and optimizer state (finite
gradients times a huge learning rate can still overflow the weights). If
any is not finite the step is undone exactly from a snapshot taken into
buffers allocated once (one copy of weights and optimizer state per step,
about 0.1% of a default CPU step) and training stops. With
``check_finite=False`` the triples stay on the device and are read together
every ``log_every`` steps (and before every evaluation and save): faster on a
GPU, but a divergence is noticed up to ``log_every`` steps late, after the
poisoned update (the checkpoint on disk is still from before it, because no
save happens without the check, and a trainer never writes non-finite
weights).

Files in ``out_dir``: ``last.ckpt`` (every ``save_every`` steps, at the end
of :meth:`Trainer.fit` and on interrupt) and ``best.ckpt`` (whenever the
validation loss improves). Both are full trainer checkpoints: ``xrnn.load``
gives a :class:`Trainer` whose ``.model`` samples, and
:meth:`Trainer.resume` continues either of them.

Data-parallel training (``distributed=True`` under ``mpirun -n N``, see
:mod:`xrnn.distributed`): each rank trains on its B/N streams; the one
allreduce of a step carries the gradients, the loss and a vote to stop (a
signal on any rank), so every rank clips, checks, steps and stops alike and
the run equals one process with B streams up to float rounding. Rank 0
alone prints and writes checkpoints; they hold the carried state of all B
streams, so a run resumes on any number of ranks.

Failures:

* a non-finite loss, gradient or updated weight raises
  :class:`~xrnn.errors.NonFiniteError` naming the step; the update is undone
  and no checkpoint is written, so the last one on disk is the last good
  state. A NaN validation loss is never the best.
* SIGINT (Ctrl-C) or SIGTERM during :meth:`Trainer.fit` says at once (on
  stderr) that the run stops after the current step, finishes it (and a
  sample due at it), writes ``last.ckpt`` and returns (``trainer.interrupted``
  names the signal); a second signal aborts at once without saving, naming
  the checkpoint kept.
* ``out_dir`` is locked for the run (:mod:`xrnn.rundir`): another process
  training there raises :class:`~xrnn.errors.StateError` naming its PID.
* the device running out of memory in a step raises
  :class:`~xrnn.errors.DeviceMemoryError` naming the step, the sizes
  (batch, window, vocabulary, model, dtype, an estimate of the bytes) and
  what to lower; the data position and dropout RNG are rolled back as for
  a non-finite loss, so the trainer is still at its last completed step.
* a checkpoint that cannot be written (:class:`~xrnn.errors.SaveError`) in
  the middle of a run prints a warning on stderr and training goes on (the
  previous file is intact; the next save tries again) until
  ``MAX_FAILED_SAVES`` fail in a row, which raise SaveError; if the save at
  the end of ``fit`` or on interrupt fails, ``fit`` raises the SaveError,
  since then no file holds the final state.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import inspect
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, overload

import numpy as np

from . import rundir
from ._defaults import DEFAULTS
from ._typing import Array
from .backend import Device, format_bytes, host_rng, oom_guard, resolve_device, to_numpy, trusted_ids
from .checkpoint import check_finite, read_container, register_kind, register_tensor_limit
from .checkpoint import save as _save_checkpoint
from .data import Corpus, StreamBatcher, Vocabulary, default_corpus_path, read_corpus, split
from .distributed import (
    Communicator,
    DataParallel,
    SingleProcess,
    check_replicas,
    device_for_rank,
    init_distributed,
    install_abort_hook,
    shard_rows,
)
from .errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointKindError,
    ConfigError,
    DataError,
    DeviceMemoryError,
    NonFiniteError,
    SaveError,
    StateError,
    VocabularyError,
    plural,
)
from .functional import softmax_cross_entropy
from .models import TRAINER_KIND, CharLM, load_language_model, max_tensors
from .modules import inference
from .optim import OPTIMIZERS, Constant, Schedule, clip_grad_norm, clip_grad_value, grad_norm, make_optimizer
from .rundir import BEST, LAST

__all__ = ["Trainer", "train", "load_model", "init_from_checkpoint", "extend_vocabulary", "DEFAULTS", "LAST", "BEST"]

# LAST and BEST, the checkpoints a run keeps in its ``out_dir``, come from xrnn.rundir, which owns the
# folder (its lock, files and temporaries)
_LOCKS: contextvars.ContextVar = contextvars.ContextVar("xrnn_train_locks", default=None)


def _holding_locks(fn):
    """Run ``fn`` with a scope in which :func:`_hold_out_dir` takes run-folder locks; they are released
    when ``fn`` returns or raises."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            token = _LOCKS.set(stack)
            try:
                return fn(*args, **kwargs)
            finally:
                _LOCKS.reset(token)
    return wrapper


def _hold_out_dir(out_dir: str) -> None:
    """Take ``out_dir``'s exclusive lock until the enclosing :func:`_holding_locks` call ends."""
    _LOCKS.get().enter_context(rundir.lock(out_dir))

#: this many failed saves in a row (disk full, ...) stop a run instead of training on unsaved
MAX_FAILED_SAVES = 3

# Options that decide the trajectory of a run: a resumed run must use the
# saved values. Everything else (logging, sampling, saving, out_dir) may change.
_TRAJECTORY = ("batch_size", "seq_len", "optimizer", "lr", "optimizer_kwargs", "clip", "clip_value",
               "schedule", "val_fraction")
_RUNTIME = ("eval_every", "eval_batches", "sample_every", "sample_length", "sample_temperature",
            "sample_prime", "log_every", "save_every", "out_dir", "check_finite", "progress", "file")


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------

@overload
def _int(name: str, v: Any, minimum: int = 1, allow_none: Literal[False] = False) -> int: ...
@overload
def _int(name: str, v: Any, minimum: int = 1, allow_none: bool = False) -> int | None: ...
def _int(name: str, v: Any, minimum: int = 1, allow_none: bool = False) -> int | None:
    if v is None and allow_none:
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < minimum:
        extra = " or None" if allow_none else ""
        raise ConfigError(f"{name} must be an integer >= {minimum}{extra}, got {v!r}")
    return int(v)


@overload
def _float(name: str, v: Any, *, positive: bool = False, allow_none: Literal[False] = False) -> float: ...
@overload
def _float(name: str, v: Any, *, positive: bool = False, allow_none: bool = False) -> float | None: ...
def _float(name: str, v: Any, *, positive: bool = False, allow_none: bool = False) -> float | None:
    if v is None and allow_none:
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{name} must be a number, got {v!r}")
    f = float(v)
    if not math.isfinite(f) or f < 0 or (positive and f == 0):
        bound = "> 0" if positive else ">= 0"
        extra = " (or None to turn it off)" if allow_none else ""
        raise ConfigError(f"{name} must be a finite number {bound}{extra}, got {v!r}")
    return f


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _tokens(n: Any) -> str:
    return plural(n, "token") if isinstance(n, int) else f"{n} tokens"


def _bits_unit(vocab: Any) -> str:
    return "bpc" if getattr(vocab, "level", "char") == "char" else "bits/token"


# ---------------------------------------------------------------------------
# corpus identity: a resumed run must see the same text
# ---------------------------------------------------------------------------

def _ids_digest(corpus: Corpus) -> str:
    h = hashlib.sha256()
    h.update(repr(corpus.vocab.to_config()).encode("utf-8", "surrogatepass"))
    ids = np.asarray(corpus.ids)
    ids = ids.astype(ids.dtype.newbyteorder("<"), copy=False)
    chunk = 1 << 22
    for i in range(0, ids.shape[0], chunk):
        h.update(np.ascontiguousarray(ids[i: i + chunk]).view(np.uint8).data)
    return h.hexdigest()


def _same_path(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _is_default_path(path: str | None) -> bool:
    return path is not None and _same_path(path, str(default_corpus_path()))


# ---------------------------------------------------------------------------
# progress output
# ---------------------------------------------------------------------------

class _Progress:
    """A tqdm bar (stderr) when available and wanted, else plain lines (``file``), or nothing."""

    def __init__(self, mode: Any, file: Any):
        self.file = file
        self.bar = None
        self.mode = None
        # called once when the reader of ``file`` goes away (a closed pipe)
        self.on_closed: Callable[[], None] | None = None
        self.closed = False
        if mode is False or mode is None:
            return
        if mode not in (True, "auto", "tqdm", "plain"):
            raise ConfigError(f"progress must be True, False, 'auto', 'tqdm' or 'plain', got {mode!r}")
        if mode in (True, "auto", "tqdm"):
            try:
                from tqdm.auto import tqdm  # noqa: F401
            except Exception:
                tqdm = None
            stream_tty = bool(getattr(sys.stderr, "isatty", lambda: False)())
            if tqdm is not None and (mode == "tqdm" or stream_tty):
                self.mode = "tqdm"
                self._tqdm = tqdm
                return
        self.mode = "plain"

    def start(self, initial: int, total: int) -> None:
        if self.mode == "tqdm":
            self.bar = self._tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                                  file=sys.stderr, smoothing=0.05, leave=True)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, total: int, loss: float, lr: float, tok_s: float, eta: float) -> None:
        if self.mode == "tqdm" and self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}, {tok_s:,.0f} tok/s", refresh=False)
        elif self.mode == "plain":
            pct = 100.0 * step / total if total else 100.0
            self.write(f"step {step}/{total} ({pct:.1f}%) | loss {loss:.4f} | lr {lr:.3g} | "
                       f"{tok_s:,.0f} tok/s | ETA {_fmt_time(eta)}")

    def write(self, msg: str) -> None:
        if self.mode is None:
            return
        try:
            if self.bar is not None:
                self.bar.write(msg, file=self.file)
            else:
                print(msg, file=self.file, flush=True)
        except BrokenPipeError:  # ``xrnn train | head``: the output is gone, the run is not
            self._closed()

    def _closed(self) -> None:
        self.closed = True
        self.mode = None
        try:  # what is still buffered for the dead pipe would fail again at exit
            fd = self.file.fileno()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass
        if self.bar is not None:
            try:
                self.bar.close()
            except Exception:
                pass
            self.bar = None
        if self.on_closed is not None:
            self.on_closed()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---------------------------------------------------------------------------
# committing an update only when it is finite
# ---------------------------------------------------------------------------

def _all_finite(xp, arrays: list):
    """A 0-d bool device array: every element of every array is finite (no host read)."""
    flags = [xp.all(xp.isfinite(a)) for a in arrays]  # each ()
    return xp.all(xp.stack(flags)) if flags else xp.asarray(True)


class _UpdateSnapshot:
    """The parameters and optimizer state before a step, kept so a step can be undone exactly.

    The optimizers update in place, so an update whose result is not finite
    can only be undone from a copy. The copy goes into buffers allocated
    once (same shape, dtype and device) and rewritten each step: one read
    and one write of the parameters and optimizer state per step, no
    allocation, no host transfer. On the CPU path that is a small fraction
    of a step (the step itself reads every weight several times in the
    forward and backward passes).
    """

    def __init__(self):
        self._bufs: dict = {}
        self._slots: dict = {}
        self._steps = 0

    def _copy_into(self, xp, key, a) -> None:
        b = self._bufs.get(key)
        if b is None or b.shape != a.shape or b.dtype != a.dtype:
            self._bufs[key] = xp.asarray(a, copy=True)
        else:
            b[...] = a

    def take(self, xp, params: Mapping, optimizer: Any) -> None:
        """Copy ``params`` and ``optimizer``'s state and step count (inside ``with dev:``)."""
        for name, p in params.items():
            self._copy_into(xp, ("p", name), p)
        state = optimizer.state
        self._slots = {name: tuple(slots) for name, slots in state.items()}
        for name, slots in state.items():
            for slot, a in slots.items():
                self._copy_into(xp, ("s", name, slot), a)
        self._steps = optimizer.steps

    def restore(self, params: Mapping, optimizer: Any) -> None:
        for name, p in params.items():
            p[...] = self._bufs[("p", name)]
        for name, slots in optimizer.state.items():
            kept = self._slots.get(name, ())
            for slot in list(slots):
                if slot in kept:
                    slots[slot][...] = self._bufs[("s", name, slot)]
                else:  # created by the undone step (e.g. SGD's first momentum buffer)
                    del slots[slot]
        optimizer.steps = self._steps


class _RecentRate:
    """Seconds per step, as an exponential moving average over the last ``horizon`` steps or so.

    The ETA follows the recent speed: when another process starts sharing
    the CPU (or stops), the estimate moves to the new rate within about
    ``horizon`` steps instead of averaging over the whole run.
    """

    def __init__(self, horizon: float = 50.0):
        self.horizon = float(horizon)
        self.seconds_per_step = float("nan")

    def update(self, seconds: float, steps: int) -> float:
        if steps <= 0:
            return self.seconds_per_step
        recent = seconds / steps
        if math.isnan(self.seconds_per_step):
            self.seconds_per_step = recent
        else:  # an interval of n steps weighs 1 - exp(-n / horizon), whatever log_every is
            w = 1.0 - math.exp(-steps / self.horizon)
            self.seconds_per_step += w * (recent - self.seconds_per_step)
        return self.seconds_per_step


# ---------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------

class Trainer:
    """Trains a language model on a corpus with truncated BPTT; checkpoints and resumes exactly.

    Args:
        model: a :class:`~xrnn.models.CharLM` (any object with its
            forward/backward/parameters/grads/checkpoint protocol). Training
            runs on the model's device, in its dtype.
        corpus: a :class:`~xrnn.data.Corpus`, a path to a UTF-8 text file
            (read at character level), or None for the tiny Shakespeare
            corpus shipped with xrnn. Its vocabulary is attached to the
            model when the model has none, and must equal the model's otherwise.
        batch_size: B parallel streams per step.
        seq_len: T steps per window (the truncated-BPTT length).
        optimizer: ``"adam"``, ``"adamw"``, ``"sgd"``, ``"adagrad"`` or ``"rmsprop"``.
        lr: learning rate (the constant rate when ``schedule`` is None).
        optimizer_kwargs: other hyperparameters of the optimizer (``betas``,
            ``momentum``, ``weight_decay``, ...).
        clip: maximum global gradient norm (``clip_grad_norm``); None: no
            norm clipping.
        clip_value: clamp every gradient element to ``[-clip_value,
            clip_value]`` first (min-char-rnn and char-rnn use 5); None: off.
        schedule: an :class:`xrnn.optim.Schedule` (or its ``to_config()``
            dict) giving the rate of every step; None: ``Constant(lr)``.
        val_fraction: the last part of the corpus held out for validation
            (char-rnn's 0.05); 0 disables validation and ``best.ckpt``.
        eval_every: validate every this many steps and at the end of ``fit``
            (None or 0: only at the end).
        eval_batches: validation windows per evaluation (the first ones, the
            same every time); None: the whole validation split.
        sample_every: print a sample every this many steps and at the end
            (None or 0: never).
        sample_length, sample_temperature, sample_prime: the printed samples
            (prime None: a newline when the vocabulary has one, so samples
            start at the beginning of a line).
        log_every: progress line / loss read interval, in steps.
        save_every: write ``out_dir/last.ckpt`` every this many steps (None
            or 0: only at the end and on interrupt).
        out_dir: directory for checkpoints (created when needed); None: no files.
        check_finite: read the loss each step and stop before a non-finite
            update (see the module docstring for the cost).
        progress: True/"auto" (a tqdm bar on a terminal when tqdm is
            installed, plain lines otherwise), "tqdm", "plain", or False
            (silent).
        seed: base seed of the printed samples (the sample at step ``s``
            draws from ``default_rng([seed, s])``, so it does not depend on
            interruptions); the model's initial weights and dropout come
            from ``model.rng``.
        file: where progress lines, validation results and samples go
            (default ``sys.stdout``; the tqdm bar goes to ``sys.stderr``).
        distributed: data-parallel training over the ranks of an MPI job
            (see :mod:`xrnn.distributed`): True to join the job this process
            was started in (``mpirun -n N``), a
            :class:`~xrnn.distributed.Communicator`, or False/None for one
            process. Each rank takes ``batch_size / N`` of the streams and
            the gradients are averaged every step, so N ranks train like one
            process with ``batch_size`` streams; only rank 0 prints and
            writes checkpoints; every rank must call :meth:`fit`,
            :meth:`evaluate` and :meth:`save` (they are collective).

    Attributes:
        model, optimizer, schedule: the parts being trained.
        step: completed optimizer steps.
        train_losses: per-step training loss (nats/token), host floats.
        val_history: ``[(step, val_loss), ...]`` in nats/token.
        best_val_loss, best_step: the best validation so far (None before any).
        interrupted: None, or ``"SIGINT"``/``"SIGTERM"`` when the last
            ``fit`` stopped on a signal.

    Raises:
        ConfigError: an option is out of range or names an unknown optimizer.
        DataError: the corpus cannot be read or is too short for B and T.
    """

    checkpoint_kind = TRAINER_KIND

    def __init__(
        self,
        model: Any,
        corpus: Any = None,
        *,
        batch_size: int = DEFAULTS["batch_size"],
        seq_len: int = DEFAULTS["seq_len"],
        optimizer: str = DEFAULTS["optimizer"],
        lr: float = DEFAULTS["lr"],
        optimizer_kwargs: Mapping | None = None,
        clip: float | None = DEFAULTS["clip"],
        clip_value: float | None = None,
        schedule: Any = None,
        val_fraction: float = DEFAULTS["val_fraction"],
        eval_every: int | None = DEFAULTS["eval_every"],
        eval_batches: int | None = None,
        sample_every: int | None = DEFAULTS["sample_every"],
        sample_length: int = 200,
        sample_temperature: float = 0.8,
        sample_prime: str | None = None,
        log_every: int = DEFAULTS["log_every"],
        save_every: int | None = DEFAULTS["save_every"],
        out_dir: str | os.PathLike | None = None,
        check_finite: bool = True,
        progress: Any = True,
        seed: Any = None,
        file: Any = None,
        distributed: Any = False,
    ):
        self._configure(
            model,
            dict(batch_size=batch_size, seq_len=seq_len, optimizer=optimizer, lr=lr,
                 optimizer_kwargs=optimizer_kwargs, clip=clip, clip_value=clip_value, schedule=schedule,
                 val_fraction=val_fraction),
            dict(eval_every=eval_every, eval_batches=eval_batches, sample_every=sample_every,
                 sample_length=sample_length, sample_temperature=sample_temperature, sample_prime=sample_prime,
                 log_every=log_every, save_every=save_every, out_dir=out_dir, check_finite=check_finite,
                 progress=progress, file=file),
        )
        self._sample_seed = _sample_seed(seed)
        self._seed = int(seed) if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) else None
        self._setup_distributed(distributed)
        self.attach_corpus(corpus)

    # -- configuration ---------------------------------------------------------
    def _configure(self, model: Any, traj: dict, runtime: dict) -> None:
        for attr in ("forward", "backward", "parameters", "grads", "checkpoint_state"):
            if not hasattr(model, attr):
                raise ConfigError(
                    f"Trainer needs a model such as xrnn.CharLM (with forward, backward, parameters, grads and "
                    f"checkpoint_state); got a {type(model).__name__} without {attr}"
                )
        self.model = model
        self.batch_size = _int("batch_size", traj["batch_size"])
        self.seq_len = _int("seq_len", traj["seq_len"])
        name = traj["optimizer"]
        if not isinstance(name, str) or name.lower() not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {name!r}; expected one of: {', '.join(OPTIMIZERS)}")
        self.optimizer_name = name.lower()
        self.lr = _float("lr", traj["lr"])
        kw = traj["optimizer_kwargs"]
        if kw is None:
            kw = {}
        if not isinstance(kw, Mapping):
            raise ConfigError(f"optimizer_kwargs must be a dict, got {type(kw).__name__}")
        if "lr" in kw:
            raise ConfigError("give the learning rate as lr=..., not inside optimizer_kwargs")
        self.optimizer_kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}
        self.clip = _float("clip", traj["clip"], positive=True, allow_none=True)
        self.clip_value = _float("clip_value", traj["clip_value"], positive=True, allow_none=True)
        sched = traj["schedule"]
        if sched is None:
            sched = Constant(self.lr)
        elif isinstance(sched, Mapping):
            sched = Schedule.from_config(sched)
        elif not isinstance(sched, Schedule):
            raise ConfigError(
                f"schedule must be an xrnn.optim.Schedule (e.g. Cosine(lr, total_steps)), its config dict, "
                f"or None for a constant rate; got {sched!r}"
            )
        self.schedule = sched
        vf = traj["val_fraction"]
        if isinstance(vf, bool) or not isinstance(vf, (int, float, np.floating)) or not 0 <= vf < 1:
            raise ConfigError(f"val_fraction must be a number in [0, 1), got {vf!r}")
        self.val_fraction = float(vf)
        self.optimizer = make_optimizer(self.optimizer_name, model, lr=self.lr, **self.optimizer_kwargs)
        self._set_runtime(runtime)

        # run state
        self.step = 0
        self.target_steps: int | None = None  # the last fit()'s target, saved so a resume continues to it
        self.tokens_seen = 0
        self.elapsed = 0.0
        self.train_losses: list[float] = []
        self.val_history: list[tuple[int, float]] = []
        self.best_val_loss: float | None = None
        self.best_step: int | None = None
        self.interrupted: str | None = None
        self._carry: Any = None  # the recurrent state carried between steps: h or (h, c), or None
        self._pending: list = []  # device (loss, norm, weights finite) triples not yet read (check_finite=False)
        self._snapshot = _UpdateSnapshot()  # the state before the current step (check_finite=True)
        self._undo = None  # the parameters a step in progress is changing (to restore after an error)
        self._votes: list = []  # device stop votes not yet read (distributed, check_finite=False)
        self._stop_vote = None
        self._dp = DataParallel(SingleProcess(), self.batch_size)  # one process until _setup_distributed
        self._rows: slice | None = None  # the stream indices this process trains on (None: all)
        self._signal_pending: int | None = None  # a signal this rank got, not yet agreed on by all ranks
        self._corpus: Corpus | None = None
        self._corpus_identity: dict | None = None
        self._batcher: StreamBatcher | None = None
        self._val_ids: np.ndarray | None = None
        self._val_batcher: StreamBatcher | None = None
        self._val_weight = 1.0
        self._saved_position: dict | None = None  # batcher state waiting for the corpus (after load)
        self._stop_signal: int | None = None
        self._last_saved: tuple[str, int] | None = None
        self._failed_saves = 0  # saves in a row that failed (MAX_FAILED_SAVES of them stop the run)
        self._resume_hint: str | None = None
        self._read_options: dict[str, Any] = {"level": "char", "max_vocab": None, "lowercase": False}
        self._seed = None

    def _set_runtime(self, r: dict) -> None:
        self.eval_every = _int("eval_every", r["eval_every"] or None, allow_none=True)
        self.eval_batches = _int("eval_batches", r["eval_batches"], allow_none=True)
        self.sample_every = _int("sample_every", r["sample_every"] or None, allow_none=True)
        self.sample_length = _int("sample_length", r["sample_length"], minimum=0)
        from .sampling import check_sampling_options

        self.sample_temperature = check_sampling_options(r["sample_temperature"])[0]
        if r["sample_prime"] is not None and not isinstance(r["sample_prime"], str):
            raise ConfigError(f"sample_prime must be a string or None, got {r['sample_prime']!r}")
        self.sample_prime = r["sample_prime"]
        self.log_every = _int("log_every", r["log_every"])
        self.save_every = _int("save_every", r["save_every"] or None, allow_none=True)
        out = r["out_dir"]
        self.out_dir = None if out is None else os.fspath(out)
        if not isinstance(r["check_finite"], (bool, np.bool_)):
            raise ConfigError(f"check_finite must be True or False, got {r['check_finite']!r}")
        self.check_finite = bool(r["check_finite"])
        _Progress(r["progress"], None)  # validates
        self.progress = r["progress"]
        self.file = r["file"]

    def _runtime(self) -> dict:
        return {k: getattr(self, k) for k in _RUNTIME}

    def _trajectory(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "optimizer": self.optimizer_name,
            "lr": self.lr,
            "optimizer_kwargs": dict(self.optimizer_kwargs),
            "clip": self.clip,
            "clip_value": self.clip_value,
            "schedule": self.schedule.to_config(),
            "val_fraction": self.val_fraction,
        }

    @property
    def config(self) -> dict:
        """The options that decide the trajectory (JSON-able); a resume must keep them."""
        return self._trajectory()

    @property
    def device(self) -> Device:
        return self.model.device

    @property
    def is_main_process(self) -> bool:
        """True for the process that prints and saves: rank 0 (always True in one process)."""
        return self._dp.comm.is_main

    @property
    def communicator(self) -> Communicator:
        """The :class:`~xrnn.distributed.Communicator` of the run (a SingleProcess in one process)."""
        return self._dp.comm

    def _setup_distributed(self, distributed: Any) -> None:
        """Join the data-parallel job: rows, identical replicas, sharded dropout, this rank's carried state."""
        if distributed is None or distributed is False:
            return
        if distributed is True:
            comm, _ = init_distributed(self.model.device)
        elif isinstance(distributed, Communicator):
            comm = distributed
            if comm.size > 1:
                install_abort_hook(comm)
        else:
            raise ConfigError(
                f"distributed must be True (join the MPI job), a xrnn.distributed.Communicator, or False; "
                f"got {distributed!r}"
            )
        if comm.size == 1:
            self._dp = DataParallel(comm, self.batch_size)
            return
        if self._batcher is not None:
            raise StateError("join the data-parallel job before the corpus is attached")
        self._dp = dp = DataParallel(comm, self.batch_size)
        self._rows = dp.rows
        self._carry = dp.take_rows(self._carry)  # a resumed run's state of all B streams -> this rank's rows
        dp.prepare(self.model)

    def __repr__(self) -> str:
        return (f"Trainer(step={self.step}, batch_size={self.batch_size}, seq_len={self.seq_len}, "
                f"optimizer={self.optimizer!r}, clip={self.clip}, device={self.device.name!r})")

    # -- data --------------------------------------------------------------------
    def attach_corpus(self, corpus: Any = None) -> Trainer:
        """Use ``corpus`` (a Corpus, a path, or None for the shipped corpus) for training and validation.

        A trainer loaded from a checkpoint checks that the corpus is the one
        it was trained on (same tokens, same vocabulary) and continues at the
        saved position.

        Raises:
            DataError: the corpus differs from the checkpoint's, or is too
                short for ``batch_size`` x ``seq_len``.
            ConfigError: its vocabulary does not match the model's.
        """
        default = False
        if corpus is None:
            corpus = default_corpus_path()
            default = True
        if isinstance(corpus, (str, os.PathLike)):
            path = os.fspath(corpus)
            default = default or _is_default_path(path)
            corpus = read_corpus(path, **self._read_options)
            mv = getattr(self.model, "vocab", None)
            if isinstance(mv, Vocabulary) and mv != corpus.vocab and mv.level == corpus.vocab.level:
                # a run started from a checkpoint (init_from) numbers the text with that checkpoint's vocabulary
                corpus = _recode(corpus, mv, repr(path), "this run's model", extend_hint=False)
        if not isinstance(corpus, Corpus):
            raise ConfigError(
                f"corpus must be an xrnn.data.Corpus, a path to a text file, or None for the shipped corpus; "
                f"got a {type(corpus).__name__}"
            )
        identity: dict[str, Any] = {
            "path": None if corpus.path is None else os.path.abspath(corpus.path),
            "default": bool(default or _is_default_path(corpus.path)),
            "num_tokens": len(corpus),
            "sha256": _ids_digest(corpus),
            "level": getattr(corpus.vocab, "level", "char"),
            "max_vocab": None,
            "lowercase": bool(getattr(corpus.vocab, "lowercase", False)),
        }
        if getattr(corpus.vocab, "unk", None) is not None:
            identity["max_vocab"] = len(corpus.vocab) - 1
        old = self._corpus_identity
        if old is not None and (old.get("sha256") != identity["sha256"] or old.get("num_tokens") != len(corpus)):
            where = "the shipped corpus" if old.get("default") else repr(old.get("path"))
            got = "the shipped corpus" if identity["default"] else repr(identity["path"])
            raise DataError(
                f"this run was trained on {where} ({_tokens(old.get('num_tokens'))}, sha256 "
                f"{str(old.get('sha256'))[:12]}...), but the corpus given now is {got} "
                f"({plural(len(corpus), 'token')}, sha256 {identity['sha256'][:12]}...); "
                "resume with the same text, or start a new run"
            )
        mv = getattr(self.model, "vocab", None)
        if mv is None:
            if hasattr(self.model, "attach_vocab"):
                self.model.attach_vocab(corpus.vocab)
        elif mv != corpus.vocab:
            raise ConfigError(
                f"the corpus's vocabulary ({len(corpus.vocab)} symbols) differs from the model's "
                f"({len(mv)} symbols); encode the text with the model's vocabulary "
                "(Corpus(model.vocab.encode(text).astype(model.vocab.dtype), model.vocab)) or build a new model"
            )
        if len(corpus.vocab) != getattr(self.model, "vocab_size", len(corpus.vocab)):
            raise ConfigError(
                f"the corpus has {len(corpus.vocab)} symbols but the model predicts {self.model.vocab_size}; "
                "build the model with vocab_size=len(corpus.vocab)"
            )
        ids = np.asarray(corpus.ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise DataError(f"corpus ids must be a 1-D integer array, got {ids.dtype} of shape {ids.shape}")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= len(corpus.vocab)):
            raise DataError(f"corpus ids must be in [0, {len(corpus.vocab)}) (the vocabulary's ids), "
                            f"got values in [{int(ids.min())}, {int(ids.max())}]")
        train_ids, val_ids = split(ids, self.val_fraction)
        batcher = StreamBatcher(train_ids, self.batch_size, self.seq_len, rows=self._rows)
        if self._saved_position is not None:
            batcher.load_state_dict(self._saved_position)
        self._val_ids = val_ids if val_ids.shape[0] >= 2 else None
        if self.val_fraction > 0 and self._val_ids is None:
            raise DataError(
                f"the validation split of {plural(len(corpus), 'token')} with val_fraction={self.val_fraction} has "
                "fewer than 2 tokens; raise val_fraction or give more text"
            )
        self._val_batcher = None
        self._batcher = batcher
        self._corpus = corpus
        self._corpus_identity = identity
        self._saved_position = None
        return self

    def _ensure_data(self) -> None:
        """Attach the corpus a loaded checkpoint names, when none was attached yet."""
        if self._batcher is not None:
            return
        ident = self._corpus_identity or {}
        if ident.get("default"):
            self.attach_corpus(None)
            return
        path = ident.get("path")
        if path is None:
            raise DataError(
                "this trainer was trained on an in-memory corpus; give it again with "
                "trainer.attach_corpus(corpus) (or Trainer.resume(path, corpus=...))"
            )
        if not os.path.exists(path):
            raise DataError(
                f"the corpus this run was trained on, {path!r}, is not there any more; give the same text "
                "with trainer.attach_corpus(path) (or the TEXT_FILE argument of xrnn train --resume)"
            )
        self.attach_corpus(path)

    @property
    def corpus(self) -> Corpus | None:
        return self._corpus

    @property
    def batcher(self) -> StreamBatcher:
        """The training data stream (its position is the data position of the run)."""
        self._ensure_data()
        return self._batcher  # type: ignore[return-value]  # _ensure_data set it

    @property
    def epoch(self) -> float:
        """Passes over the training split so far (fractional)."""
        b = self.batcher
        return b.epoch + b.position / max(b.windows_per_epoch, 1)

    # -- one step ------------------------------------------------------------------
    def _reduce_gradients(self, loss):
        """Combine the gradients of all ranks (one allreduce); returns the global mean loss.

        Sits between backward and clipping, so clipping, the finite check and
        the optimizer see the gradient of all B streams, identical on every
        rank. The same collective carries the loss and each rank's vote to
        stop (a signal), so all ranks stop after the same step. One process:
        nothing to do.
        """
        if not self._dp.active:
            return loss
        loss, self._stop_vote = self._dp.reduce(self.model, loss, stop=self._signal_pending is not None)
        return loss

    def _agree_to_stop(self, vote) -> None:
        """Every rank stops after this step when any rank got a signal (``vote`` read on the host)."""
        if vote > 0 and self._stop_signal is None:
            self._stop_signal = self._signal_pending or signal.SIGTERM

    def train_step(self) -> Array:
        """One optimizer step on the next window; returns the loss (a 0-d device array, nats/token).

        The recurrent state carries over from the previous window (reset to
        zeros at the start of every pass over the data). With
        ``check_finite`` the loss and gradient norm are read (one transfer)
        and a non-finite value raises NonFiniteError before the update,
        with the data position and dropout RNG rolled back to before this
        step, so the trainer stays at its last good state.
        """
        self._ensure_data()
        model = self.model
        dev = model.device
        xp = dev.xp
        batcher = self._batcher
        assert batcher is not None  # _ensure_data set it
        position = batcher.state_dict()
        rng = getattr(model, "rng", None)
        rng_state = None if rng is None else rng.bit_generator.state
        t0 = time.perf_counter()
        x, y, new_epoch = batcher.next_batch()  # (b, T) int64 host
        state = None if new_epoch else self._carry
        lr = self.schedule(self.optimizer, self.step)
        model.train()
        # the finite check below reports overflow/NaN itself: NumPy's warnings would only add noise
        # ids were range-checked on the host when the corpus was attached: skip the device check
        with dev, np.errstate(all="ignore"), trusted_ids(), self._oom_rollback(position, rng_state, x.shape):
            xd = dev.asarray(x, dtype="int64")  # (b, T)
            yd = dev.asarray(y, dtype="int64")  # (b, T)
            self.optimizer.zero_grad()
            logits, new_state = model.forward(xd, state)  # (b, T, V)
            loss, dlogits = softmax_cross_entropy(logits, yd)  # (), (b, T, V)
            model.backward(dlogits)
            loss = self._reduce_gradients(loss)
            if self.clip_value is not None:
                clip_grad_value(model, self.clip_value)
            if self.clip is not None:
                norm = clip_grad_norm(model, self.clip)  # () before clipping
            else:
                norm = grad_norm(model)  # ()
            params = model.parameters()
            if self.check_finite:  # keep what the step overwrites, to undo a non-finite update exactly
                self._snapshot.take(xp, params, self.optimizer)
                self._undo = params
            self.optimizer.step()
            # the update is committed only when the new weights and optimizer state are all finite:
            # finite gradients times a huge learning rate can still overflow them
            updated = [*params.values(), *(a for slots in self.optimizer.state.values() for a in slots.values())]
            finite = xp.astype(_all_finite(xp, updated), loss.dtype)  # () 1.0 or 0.0
            checks = xp.stack([loss, xp.astype(norm, loss.dtype), finite])  # (3,)
            if self.check_finite:
                if self._dp.active:  # the stop vote rides along in the same read
                    host = to_numpy(xp.concat([checks, xp.reshape(xp.astype(self._stop_vote, loss.dtype), (1,))]))
                    self._agree_to_stop(float(host[3]))
                else:
                    host = to_numpy(checks)  # the one device -> host read of the step
                lf, nf, wf = float(host[0]), float(host[1]), float(host[2])
                self._undo = None
                if not (math.isfinite(lf) and math.isfinite(nf) and wf == 1.0):
                    self._snapshot.restore(params, self.optimizer)
                    self._roll_back(position, rng_state)
                    raise NonFiniteError(self._nonfinite_message(self.step + 1, lf, nf, lr, applied=False))
            else:
                self._pending.append(checks)
                if self._dp.active:
                    self._votes.append(self._stop_vote)
        self._carry = new_state  # plain arrays: nothing to detach, backward never reaches into them
        self.step += 1
        self.tokens_seen += self.batch_size * self.seq_len if self._dp.active else int(x.shape[0] * x.shape[1])
        if self.check_finite:
            self.train_losses.append(lf)
        self.elapsed += time.perf_counter() - t0
        return loss

    def _memory_note(self, b: int, T: int, training: bool = True) -> str:
        """The sizes of a step, for out-of-memory messages: batch, window, vocabulary, model, dtype, bytes."""
        m = self.model
        cfg = getattr(m, "config", {})
        V = int(getattr(m, "vocab_size", 0) or 0)
        per_token = V * ((3 if training else 1) + (1 if cfg.get("embedding_dim") is None else 0))  # logits, one-hot
        rnn: Any = getattr(m, "rnn", None)
        if training and hasattr(rnn, "_gates"):  # what BPTT keeps: gate pre-activations, outputs, states
            per_token += rnn.num_layers * rnn.num_directions * (rnn._gates + 3) * rnn.hidden_size
        total = b * T * per_token * np.dtype(getattr(m, "dtype", "float32")).itemsize
        return (f"batch_size={b} streams x seq_len={T} steps, vocabulary {V}, {cfg.get('num_layers', '?')}-layer "
                f"{str(cfg.get('cell', '?')).upper()} of hidden size {cfg.get('hidden_size', '?')}, "
                f"{getattr(m, 'dtype', '?')}: about {format_bytes(total)} of activations"
                + (" and gradients per step" if training else " per window"))

    @contextlib.contextmanager
    def _oom_rollback(self, position: dict, rng_state: Any, shape: tuple):
        """An :func:`~xrnn.backend.oom_guard` for one step that also rolls the data position and the
        dropout RNG back, so a trainer that ran out of memory is still at its last completed step."""
        try:
            with oom_guard(self.device, f"training step {self.step + 1}",
                           lambda: self._memory_note(int(shape[0]), int(shape[1]))):
                yield
        except DeviceMemoryError:
            if self._undo is not None:  # out of memory inside the optimizer step: undo what it wrote
                self._snapshot.restore(self._undo, self.optimizer)
                self._undo = None
            self._roll_back(position, rng_state)
            raise

    def _roll_back(self, position: dict, rng_state: Any) -> None:
        """Back to the last completed step: data position, dropout RNG, no gradients."""
        self.batcher.load_state_dict(position)
        if rng_state is not None:
            self.model.rng.bit_generator.state = rng_state
        self.optimizer.zero_grad()

    def _flush(self) -> None:
        """Read the losses kept on the device (check_finite=False) and check them."""
        if self._votes:
            votes, self._votes = self._votes, []
            xp = self.device.xp
            with self.device:
                self._agree_to_stop(float(to_numpy(xp.sum(xp.stack(votes)))))
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        xp = self.device.xp
        with self.device:
            vals = to_numpy(xp.stack(pending))  # (n, 3): loss, gradient norm, 1.0 when the new weights are finite
        first = self.step - len(pending) + 1
        ok = np.isfinite(vals).all(axis=1) & (vals[:, 2] == 1.0)
        if not ok.all():
            i = int(np.argmin(ok))
            self.train_losses.extend(float(v) for v in vals[:i, 0])
            raise NonFiniteError(self._nonfinite_message(first + i, float(vals[i, 0]), float(vals[i, 1]),
                                                         self.schedule.lr_at(first + i - 1), applied=True))
        self.train_losses.extend(float(v) for v in vals[:, 0])

    def _nonfinite_message(self, step: int, loss: float, norm: float, lr: float, applied: bool) -> str:
        if not math.isfinite(loss):
            what = f"the loss is {loss}"
        elif not math.isfinite(norm):
            what = f"the loss is {loss:.4g} but the gradient norm is {norm}"
        else:
            what = (f"the loss ({loss:.4g}) and gradient norm ({norm:.4g}) are finite but the update made "
                    "the weights or the optimizer state non-finite")
        if applied:
            state = ("check_finite=False found it late, so the weights in memory already took bad updates; "
                     "no checkpoint was written after it")
        else:
            state = "the update was not applied"
        if self._last_saved is not None:
            ck = f"the last good checkpoint is {self._last_saved[0]} (step {self._last_saved[1]})"
        elif self.out_dir is not None and os.path.exists(os.path.join(self.out_dir, LAST)):
            ck = f"the last good checkpoint is {os.path.join(self.out_dir, LAST)}"
        else:
            ck = "no checkpoint was written in this run"
        fix = f"lower the learning rate (now {lr:.3g}, e.g. {lr / 10:.3g})"
        fix += " or clip gradients harder (clip=..., --clip)" if self.clip is not None else \
            " or clip gradients (clip=5.0, --clip 5)"
        return f"training diverged at step {step}: {what}; {state}; {ck}. To fix it, {fix}."

    # -- validation and samples ------------------------------------------------------
    def evaluate(self, max_batches: int | None = None) -> float | None:
        """Mean validation loss in nats per token (None when there is no validation split).

        Windows of the validation split are read in order from a zero state,
        carrying the state from window to window, with dropout off and no
        gradients; ``max_batches`` (default ``eval_batches``) limits how many.
        The sum stays on the device and is read once. Neither the model's
        RNG nor the training state changes.
        """
        self._ensure_data()
        if self._val_ids is None:
            return None
        if self._val_batcher is None:
            n = int(self._val_ids.shape[0])
            T = min(self.seq_len, n - 1)
            B = max(1, min(self.batch_size, (n - 1) // T))
            # data-parallel: each rank takes its share of the validation streams (all of them
            # when there are fewer streams than ranks) and the means are combined by weight
            rows, self._val_weight = (None, 1.0)
            if self._dp.active and B >= self._dp.comm.size:
                rows = shard_rows(B, self._dp.comm.rank, self._dp.comm.size)
                self._val_weight = (rows.stop - rows.start) / B
            self._val_batcher = StreamBatcher(self._val_ids, B, T, rows=rows)
        limit = self.eval_batches if max_batches is None else _int("max_batches", max_batches)
        model = self.model
        dev = model.device
        total = None
        count = 0
        vb = self._val_batcher
        with inference(model), dev, np.errstate(all="ignore"), trusted_ids(), \
                oom_guard(dev, "validation", lambda: self._memory_note(len(vb.rows), vb.seq_len, False)):
            state = None
            for x, y in vb.iterate_once():
                logits, state = model.forward(dev.asarray(x, dtype="int64"), state)  # (b, T, V)
                loss, _ = softmax_cross_entropy(logits, dev.asarray(y, dtype="int64"))
                total = loss if total is None else total + loss
                count += 1
                if limit is not None and count >= limit:
                    break
            value = float(to_numpy(total)) / count
        if self._val_weight < 1.0:
            value = float(self._dp.comm.allreduce_sum(value * self._val_weight))
        return value

    def sample(self, length: int | None = None, prime: str | None = None, temperature: float | None = None,
               seed: Any = None, **kwargs: Any) -> str:
        """Sample text from the model (``xrnn.sampling.sample``) with the trainer's sample settings.

        ``seed=None`` draws from the trainer's sample stream for the current
        step: a pure function of the trainer's seed and ``step``, so the
        samples a run prints are the same whether or not it was interrupted
        and resumed (and printing them changes no other state).
        """
        from .sampling import sample

        prime = self._default_prime() if prime is None else prime
        if seed is None:
            seed = np.random.default_rng([self._sample_seed, self.step])
        return sample(self.model, length=self.sample_length if length is None else length, prime=prime,
                      temperature=self.sample_temperature if temperature is None else temperature,
                      seed=seed, **kwargs)

    def _default_prime(self) -> str:
        if self.sample_prime is not None:
            return self.sample_prime
        vocab = getattr(self.model, "vocab", None)
        return "\n" if vocab is not None and "\n" in vocab else ""

    # -- checkpoints ------------------------------------------------------------------
    def checkpoint_state(self) -> tuple[dict, dict]:
        """``(meta, tensors)`` for :func:`xrnn.save`: the whole state of the run (see the module docstring)."""
        self._flush()
        model_meta, model_tensors = self.model.checkpoint_state()
        tensors = {f"model/{k}": v for k, v in model_tensors.items()}
        od = self.optimizer.state_dict()
        for pname, slots in od["state"].items():
            for slot, arr in slots.items():
                tensors[f"optim/{pname}/{slot}"] = np.array(to_numpy(arr), copy=True)
        carry_kind = None
        if self._dp.active and self._carry is not None:
            h = self._carry[0] if isinstance(self._carry, (tuple, list)) else self._carry
            if int(h.shape[1]) != self.batch_size:
                raise StateError(
                    "in a data-parallel run a checkpoint needs the state of every rank's streams: call "
                    "trainer.save(path) on every rank (rank 0 writes the file), not xrnn.save on one rank"
                )
        if self._carry is not None:
            if isinstance(self._carry, (tuple, list)):
                carry_kind = "hc"
                tensors["carry/h"] = np.array(to_numpy(self._carry[0]), copy=True)
                tensors["carry/c"] = np.array(to_numpy(self._carry[1]), copy=True)
            else:
                carry_kind = "h"
                tensors["carry/h"] = np.array(to_numpy(self._carry), copy=True)
        bad = [k for k, a in tensors.items() if a.dtype.kind == "f" and not np.isfinite(a).all()]
        if bad:
            raise NonFiniteError(
                f"refusing to save a training checkpoint at step {self.step}: {', '.join(bad[:4])}"
                f"{' and more' if len(bad) > 4 else ''} hold NaN or infinity (the run diverged); the checkpoints "
                "already on disk are kept"
            )
        tensors["history/train_loss"] = np.asarray(self.train_losses, dtype=np.float64)
        tensors["history/val_step"] = np.asarray([s for s, _ in self.val_history], dtype=np.int64)
        tensors["history/val_loss"] = np.asarray([v for _, v in self.val_history], dtype=np.float64)
        runtime = self._runtime()
        runtime.pop("file")
        if self._batcher is not None:
            position: dict | None = self._batcher.state_dict()
        else:
            position = self._saved_position
        recent = self.train_losses[-100:]
        meta = {
            "model": model_meta,
            "trainer": self._trajectory(),
            "runtime": runtime,
            "optimizer": {"name": od["name"], "hyper": od["hyper"], "steps": od["steps"]},
            "step": self.step,
            "target_steps": self.target_steps,  # what fit() was asked to reach
            "tokens_seen": self.tokens_seen,
            "elapsed": self.elapsed,
            "data": {"corpus": self._corpus_identity, "position": position},
            "carry": carry_kind,
            "sample_seed": self._sample_seed,
            "seed": self._seed,
            "best": {"val_loss": self.best_val_loss, "step": self.best_step},
            "summary": {
                "train_loss_recent": float(np.mean(recent)) if recent else None,
                "val_loss_last": self.val_history[-1][1] if self.val_history else None,
                "num_parameters": int(sum(int(np.prod(v.shape)) for v in model_tensors.values())),
                "epoch": None if self._batcher is None else round(self.epoch, 4),
            },
        }
        return meta, tensors

    @contextlib.contextmanager
    def _all_streams(self):
        """(data-parallel) ``self._carry`` holds the state of all B streams while a checkpoint is taken.

        A collective: every rank must enter it at the same point.
        """
        if not self._dp.active:
            yield
            return
        # replicas that drifted apart (a faulty transport or node) would save one rank's view of a
        # run that no longer exists: check them at every save (a hash of the weights per rank)
        check_replicas(self.model, self._dp.comm, f"at step {self.step}")
        local = self._carry
        self._carry = self._dp.gather_rows(local)
        try:
            yield
        finally:
            self._carry = local

    def save(self, path: str | os.PathLike | None = None) -> str:
        """Write the whole run to ``path`` (default ``out_dir/last.ckpt``); returns the path.

        In a data-parallel run every rank must call it (the carried state of
        all streams is gathered); rank 0 writes the file.

        Raises:
            ConfigError: no path and no ``out_dir``.
            SaveError: the file could not be written (the previous one is intact).
        """
        if path is None:
            if self.out_dir is None:
                raise ConfigError("Trainer.save() needs a path when the trainer has no out_dir")
            if self.is_main_process:
                os.makedirs(self.out_dir, exist_ok=True)
            path = os.path.join(self.out_dir, LAST)
        path = os.fspath(path)
        with self._all_streams():
            if self.is_main_process:
                _save_checkpoint(self, path)
        return path

    @classmethod
    def from_checkpoint(cls, meta: dict, tensors: dict, device: Any = "cpu", distributed: Any = False,
                        **runtime: Any) -> Trainer:
        """Rebuild a trainer from :meth:`checkpoint_state` output on ``device``.

        ``runtime`` overrides the saved logging/sampling/saving options
        (``out_dir``, ``progress``, ``eval_every``, ...). The corpus is
        attached lazily: from the recorded path at the first step, or with
        :meth:`attach_corpus`. ``distributed`` as for :class:`Trainer`: the
        run may continue on another number of ranks than it was saved from.
        """
        dev = resolve_device(device)
        if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict) or \
                not isinstance(meta.get("trainer"), dict):
            raise CheckpointCorruptError("trainer checkpoint metadata lacks its 'model' or 'trainer' section")
        model_tensors = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        model = CharLM.from_checkpoint(meta["model"], model_tensors, dev)
        saved_runtime = dict(meta.get("runtime") or {})
        _check_runtime_keys(runtime)
        rt = {k: saved_runtime.get(k, v) for k, v in _runtime_defaults().items()}
        rt["out_dir"] = None  # a loaded trainer writes files only where it is told to
        rt.update(runtime)
        t = cls.__new__(cls)
        traj = dict(meta["trainer"])
        missing = [k for k in _TRAJECTORY if k not in traj]
        if missing:
            raise CheckpointCorruptError(f"trainer checkpoint lacks trainer options {', '.join(missing)}")
        t._configure(model, traj, rt)
        ss = meta.get("sample_seed")
        if not (isinstance(ss, int) and not isinstance(ss, bool) and ss >= 0):
            raise CheckpointCorruptError(f"trainer checkpoint has an invalid sample_seed {ss!r}")
        t._sample_seed = ss
        seed = meta.get("seed")
        t._seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
        om = meta.get("optimizer") or {}
        state = {}
        for pname in model.parameters():
            prefix = f"optim/{pname}/"
            state[pname] = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        t.optimizer.load_state_dict({"name": om.get("name"), "hyper": om.get("hyper"), "steps": om.get("steps"),
                                     "state": state})
        t.step = int(meta["step"])
        target = meta.get("target_steps")
        t.target_steps = target if isinstance(target, int) and not isinstance(target, bool) and target >= 0 else None
        t.tokens_seen = int(meta.get("tokens_seen", 0))
        t.elapsed = float(meta.get("elapsed", 0.0))
        t.train_losses = [float(v) for v in tensors.get("history/train_loss", np.zeros(0))]
        vs = tensors.get("history/val_step", np.zeros(0, np.int64))
        vl = tensors.get("history/val_loss", np.zeros(0))
        t.val_history = [(int(s), float(v)) for s, v in zip(vs, vl)]
        best = meta.get("best") or {}
        t.best_val_loss = best.get("val_loss")
        t.best_step = best.get("step")
        if not (t.best_val_loss is None or (isinstance(t.best_val_loss, (int, float))
                                            and not isinstance(t.best_val_loss, bool))) or \
                not (t.best_step is None or (isinstance(t.best_step, int) and not isinstance(t.best_step, bool))):
            raise CheckpointCorruptError(f"trainer checkpoint has an invalid best-validation record {best!r}"[:300])
        kind = meta.get("carry")
        if kind == "hc":
            t._carry = (dev.asarray(tensors["carry/h"], dtype=model.dtype),
                        dev.asarray(tensors["carry/c"], dtype=model.dtype))
        elif kind == "h":
            t._carry = dev.asarray(tensors["carry/h"], dtype=model.dtype)
        data = meta.get("data") or {}
        t._corpus_identity = data.get("corpus")
        t._saved_position = data.get("position")
        ident = t._corpus_identity
        if not (ident is None or (isinstance(ident, dict) and isinstance(ident.get("path"), (str, type(None))))) \
                or not isinstance(t._saved_position, (dict, type(None))):
            raise CheckpointCorruptError("trainer checkpoint has an invalid data section (corpus identity or position)")
        if t._corpus_identity:
            t._read_options = {k: t._corpus_identity.get(k, d) for k, d in t._read_options.items()}
        t._setup_distributed(distributed)
        return t

    @classmethod
    def resume(cls, path: str | os.PathLike, corpus: Any = None, device: Any = "cpu", distributed: Any = False,
               **runtime: Any) -> Trainer:
        """Load a trainer checkpoint to continue its run: ``Trainer.resume("out/last.ckpt").fit(steps)``.

        ``corpus`` defaults to the one recorded in the checkpoint (the
        shipped corpus, or the file at its path); either way it must hold the
        same tokens. ``runtime`` overrides logging/sampling/saving options,
        ``out_dir`` defaulting to the checkpoint's directory.

        Raises:
            CheckpointError and subclasses: the file is missing, damaged, or
                not a trainer checkpoint.
            DataError: the corpus differs from the one the run was trained on.
        """
        path = os.fspath(path)
        dev = resolve_device(device)
        c = _read_run(path)
        runtime.setdefault("out_dir", os.path.dirname(os.path.abspath(path)))
        t = _restore(c, dev, runtime, distributed)
        if corpus is not None:
            t.attach_corpus(corpus)
        else:
            t._ensure_data()
        return t

    # -- the loop -------------------------------------------------------------------------
    def _print(self, progress: _Progress, msg: str) -> None:
        if self.is_main_process:
            progress.write(msg)

    def _notice(self, progress: _Progress, msg: str) -> None:
        """A warning or notice the user must see even with progress output off: always on stderr
        (above the progress bar when there is one), so it never mixes into the output on stdout."""
        if not self.is_main_process:
            return
        try:
            if progress.bar is not None:
                progress.bar.write(msg, file=sys.stderr)
            else:
                print(msg, file=sys.stderr, flush=True)
        except (OSError, ValueError):  # stderr closed: nothing left to tell
            pass

    def _save_file(self, name: str, progress: _Progress, final: bool) -> str | None:
        if self.out_dir is None:
            return None
        with self._all_streams():  # every rank, at the same step
            return self._write_file(name, progress, final)

    def _write_file(self, name: str, progress: _Progress, final: bool) -> str | None:
        if not self.is_main_process or self.out_dir is None:  # (_save_file checked out_dir)
            return None
        path = os.path.join(self.out_dir, name)
        try:
            os.makedirs(self.out_dir, exist_ok=True)
            _save_checkpoint(self, path)
        except (SaveError, OSError) as e:
            err = e if isinstance(e, SaveError) else SaveError(f"could not save checkpoint {path!r}: {e}")
            if final:
                raise err from e
            self._failed_saves += 1
            if self._failed_saves >= MAX_FAILED_SAVES:
                raise SaveError(
                    f"stopping at step {self.step}: the last {self._failed_saves} saves all failed ({err}); "
                    f"{self._kept_checkpoint()}"
                ) from e
            self._notice(progress, f"warning: {err}; training goes on and the next save tries again "
                                   f"({MAX_FAILED_SAVES - self._failed_saves} more failure(s) in a row stop it)")
            return None
        self._failed_saves = 0
        if name == LAST:
            self._last_saved = (path, self.step)
        return path

    def _kept_checkpoint(self) -> str:
        """Which checkpoint on disk holds this run's latest saved state, in words."""
        if self._last_saved is not None:
            return f"the last checkpoint kept is {self._last_saved[0]} (step {self._last_saved[1]})"
        if self.out_dir is not None and os.path.exists(os.path.join(self.out_dir, LAST)):
            return f"the last checkpoint kept is {os.path.join(self.out_dir, LAST)} (written before this session)"
        return "no checkpoint of this run was written"

    def _validate(self, progress: _Progress) -> float | None:
        self._flush()
        v = self.evaluate()
        if v is None:
            return None
        self.val_history.append((self.step, v))
        # a NaN (or infinite) validation loss is never the best: nothing is written for it
        improved = math.isfinite(v) and (self.best_val_loss is None or v < self.best_val_loss)
        unit = _bits_unit(getattr(self.model, "vocab", None))
        line = f"step {self.step}: val loss {v:.4f} nats = {v / math.log(2):.4f} {unit}"
        if improved:
            self.best_val_loss, self.best_step = v, self.step
            line += " (best)"
        self._print(progress, line)
        if improved:
            self._save_file(BEST, progress, final=False)
        return v

    def _print_sample(self, progress: _Progress) -> None:
        if not self.is_main_process or progress.mode is None or self.sample_length == 0:
            return
        text = self.sample()
        bar = "-" * 20
        self._print(progress, f"{bar} sample at step {self.step} (temperature {self.sample_temperature:g}) {bar}\n"
                              f"{text}\n{bar * 2}")

    def _request_stop(self, sig) -> bool:
        """Stop after the current step and save (data-parallel: all ranks stop after the step in which
        they all learn of it). False when a stop was already requested."""
        if self._dp.active:
            if self._signal_pending is not None:
                return False
            self._signal_pending = sig
        else:
            if self._stop_signal is not None:
                return False
            self._stop_signal = sig
        return True

    def _output_closed(self) -> None:
        """The progress output's reader went away: stop after this step and save, as for SIGTERM."""
        self._request_stop(getattr(signal, "SIGPIPE", signal.SIGTERM))

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if not self._request_stop(signum):
            # second signal: abort now, without saving (data-parallel: the abort hook ends every rank)
            self._say_now(f"{name} again: quitting now without saving; {self._kept_checkpoint()}")
            raise KeyboardInterrupt
        where = f" and saving {os.path.join(self.out_dir, LAST)}" if self.out_dir is not None else ""
        again = "press Ctrl-C again" if signum == signal.SIGINT else f"a second {name}"
        self._say_now(f"{name}: stopping after the current step{where}; {again} quits at once without saving")

    def _say_now(self, msg: str) -> None:
        """One line on stderr from a signal handler: a raw write, which cannot collide with a print
        the handler interrupted."""
        if not self.is_main_process:
            return
        try:
            os.write(2, ("\n" + msg + "\n").encode("utf-8", "replace"))
        except OSError:
            pass

    @contextlib.contextmanager
    def _signals(self):
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    previous[sig] = signal.signal(sig, self._on_signal)
                except (ValueError, OSError):  # pragma: no cover - exotic embeddings
                    pass
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _describe(self, target: int) -> str:
        m = self.model
        cfg = getattr(m, "config", {})
        vocab = getattr(m, "vocab", None)
        ident = self._corpus_identity or {}
        src = "the shipped tiny Shakespeare" if ident.get("default") else (
            os.path.basename(ident["path"]) if ident.get("path") else "an in-memory corpus")
        n_par = m.num_parameters() if hasattr(m, "num_parameters") else "?"
        kind = f"{cfg.get('num_layers', '?')}-layer {str(cfg.get('cell', 'rnn')).upper()}, " \
               f"hidden {cfg.get('hidden_size', '?')}"
        level = getattr(vocab, "level", "char")
        return (f"training a {kind} ({n_par:,} parameters) on {src} ({ident.get('num_tokens', 0):,} "
                f"{level}s, vocabulary {len(vocab) if vocab is not None else '?'}) on {self.device.name}"
                f"{self._kernels_description()}: "
                f"steps {self.step}->{target} of {self.batcher.batch_size}x{self.seq_len} tokens, "
                f"{self.optimizer_name} lr {self.schedule.lr_at(self.step):.3g}"
                + self._dp_description()
                + (f", checkpoints in {self.out_dir}" if self.out_dir else ""))

    def _kernels_description(self) -> str:
        """`` (fused C kernels, avx2)`` or `` (NumPy kernels: ...)`` on a NumPy device with the
        fast paths on: which code runs the scans' element-wise math."""
        from .kernels import fast_paths_enabled, native

        if self.device.library != "numpy" or not fast_paths_enabled():
            return ""
        return f" ({native.describe(short=True)})"

    def _dp_description(self) -> str:
        if not self._dp.active:
            return ""
        comm, B = self._dp.comm, self.batch_size
        share = f"{B // comm.size}" if B % comm.size == 0 else f"{B // comm.size}-{B // comm.size + 1}"
        return f", data-parallel over {comm.size} {comm.backend.upper()} ranks ({share} streams each)"

    @_holding_locks
    def fit(self, steps: int) -> Trainer:
        """Train until ``self.step == steps`` (the total, like Keras's ``epochs``); returns self.

        ``steps`` is a target, not a count, so an interrupted run resumed
        with the same call ends where the uninterrupted one would. Validates
        every ``eval_every`` steps and at the end, prints samples, saves
        ``last.ckpt``/``best.ckpt`` in ``out_dir``, holding the folder's lock
        (:mod:`xrnn.rundir`) meanwhile. SIGINT/SIGTERM stop after
        the current step with a checkpoint (``self.interrupted`` is set);
        the previous signal handlers are restored on return.

        Raises:
            NonFiniteError: the loss, gradient or updated weights became NaN/inf (see the class doc).
            SaveError: the final checkpoint could not be written, or several saves in a row failed.
            StateError: another process is training in ``out_dir``.
        """
        target = _int("steps", steps, minimum=0)
        self.target_steps = target
        self._ensure_data()
        self.interrupted = None
        self._stop_signal = None
        self._signal_pending = None
        # other ranks are silent: rank 0 speaks for the job
        progress = _Progress(self.progress if self.is_main_process else False,
                             self.file if self.file is not None else sys.stdout)
        progress.on_closed = self._output_closed
        if self.out_dir is not None and self.is_main_process:
            _hold_out_dir(self.out_dir)  # creates the folder; one run at a time in it
            rundir.clean_temporaries(self.out_dir)  # saves of this folder killed mid-way
        if self.step >= target:
            self._print(progress, f"already at step {self.step} (the target is {target}); nothing to train")
            return self
        self._print(progress, self._describe(target))
        tokens_per_step = self.batch_size * self.seq_len  # all ranks together
        rate = _RecentRate()
        last_log_wall = time.perf_counter()
        last_log_step, last_log_elapsed = self.step, self.elapsed
        with self._signals():
            progress.start(self.step, target)
            try:
                while self.step < target and self._stop_signal is None:
                    self.train_step()
                    progress.step()
                    s = self.step
                    if s % self.log_every == 0 or s == target:
                        self._flush()
                        n = s - last_log_step
                        loss = float(np.mean(self.train_losses[-n:])) if n else float("nan")
                        dt = self.elapsed - last_log_elapsed
                        tok_s = n * tokens_per_step / dt if dt > 0 else float("inf")
                        now = time.perf_counter()
                        rate.update(now - last_log_wall, n)
                        eta = (target - s) * rate.seconds_per_step
                        progress.log(s, target, loss, self.optimizer.lr, tok_s, eta)
                        last_log_step, last_log_elapsed, last_log_wall = s, self.elapsed, now
                    if (self.eval_every and s % self.eval_every == 0) or s == target:
                        self._validate(progress)
                    # a sample due at this step is printed even when a signal asked to stop after it
                    if (self.sample_every and s % self.sample_every == 0) or (s == target and self.sample_every):
                        self._print_sample(progress)
                    if self.save_every and s % self.save_every == 0 and s != target and self._stop_signal is None:
                        self._flush()
                        self._save_file(LAST, progress, final=False)
            finally:
                progress.close()
            self._flush()
            path = self._save_file(LAST, progress, final=True)
        if self._stop_signal is not None:
            name = signal.Signals(self._stop_signal).name
            self.interrupted = name
            where = f"saved {path}" if path else "nothing saved (no out_dir)"
            hint = self._resume_hint or (
                f"Trainer.resume({path!r}).fit({target})" if path else "")
            msg = (f"interrupted by {name} at step {self.step} of {target}; {where}"
                   + (f"; resume with: {hint}" if path and hint else ""))
            self._notice(progress, ("the output was closed (SIGPIPE): " if progress.closed else "") + msg)
        else:
            msg = f"done: step {self.step}"
            if path:
                msg += f"; saved {path}"
                if self.best_val_loss is not None:
                    msg += (f" and {os.path.join(self.out_dir or '', BEST)} (val loss {self.best_val_loss:.4f} "
                            f"at step {self.best_step})")
            self._print(progress, msg)
        return self

    train = fit  # the name the issue uses; ``fit`` is canonical

    @property
    def history(self) -> dict:
        """``{"train_loss": [...per step...], "val_step": [...], "val_loss": [...]}`` (nats/token)."""
        self._flush()
        return {
            "train_loss": list(self.train_losses),
            "val_step": [s for s, _ in self.val_history],
            "val_loss": [v for _, v in self.val_history],
        }


def _check_runtime_keys(runtime: Mapping) -> None:
    bad = sorted(set(runtime) - set(_RUNTIME))
    if bad:
        raise ConfigError(
            f"cannot set {', '.join(bad)} when loading a trainer: only {', '.join(_RUNTIME)} may change "
            "(the other options decide the trajectory of the run and come from the checkpoint)"
        )


def _runtime_defaults() -> dict:
    sig = inspect.signature(Trainer.__init__).parameters
    return {k: sig[k].default for k in _RUNTIME}


def _sample_seed(seed: Any) -> int:
    """The base entropy (a non-negative int) of a trainer's sample stream from an int, None or a Generator."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        if seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, None or a numpy Generator, got {seed!r}")
        return int(seed)
    if seed is None or isinstance(seed, np.random.Generator):
        return int(host_rng(seed).integers(0, 2**63))
    raise ConfigError(f"seed must be a non-negative integer, None or a numpy Generator, got {seed!r}")


def _read_run(path: str):
    """The container of a trainer checkpoint (CheckpointKindError for any other kind; a run whose
    weights are not finite cannot be continued: CheckpointCorruptError)."""
    c = read_container(path)
    if c.kind != Trainer.checkpoint_kind:
        raise CheckpointKindError(
            f"checkpoint {path!r} holds a {c.kind!r}, not a training run; only trainer checkpoints "
            f"(last.ckpt / best.ckpt of a run) can be resumed"
        )
    return check_finite(c)


def _restore(c, dev, runtime: dict, distributed: Any = False) -> Trainer:
    """A Trainer from a read container, with malformed contents reported as CheckpointCorruptError."""
    _check_runtime_keys(runtime)
    try:
        return Trainer.from_checkpoint(c.meta, c.tensors, dev, distributed=distributed, **runtime)
    except CheckpointError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, ArithmeticError, StateError) as e:
        raise CheckpointCorruptError(f"checkpoint {c.path!r} does not describe a valid training run: "
                                     f"{type(e).__name__}: {e}") from e


def _load_trainer(meta: dict, tensors: dict, device) -> Trainer:
    return Trainer.from_checkpoint(meta, tensors, device)


def _max_trainer_tensors(meta: dict) -> int | None:
    """The most tensors a training run holds: its model's, up to 3 optimizer slots each, carry, history."""
    model = meta.get("model")
    n = max_tensors(model.get("config")) if isinstance(model, dict) else None
    return None if n is None else 4 * n + 5


register_kind(Trainer.checkpoint_kind, _load_trainer)
register_tensor_limit(Trainer.checkpoint_kind, _max_trainer_tensors)


def load_model(path: str | os.PathLike, device: Any = "cpu", *, allow_nonfinite: bool = False) -> Any:
    """The model in any checkpoint, on ``device``: a CharLM checkpoint, the model
    of a trainer checkpoint (without its optimizer state), or any other model
    kind (e.g. a Keras-style ``Sequential``).

    This is ``xrnn.load_model``; :func:`xrnn.load` returns a trainer
    checkpoint as the whole :class:`Trainer`. Weights holding NaN or
    infinity are refused unless ``allow_nonfinite=True`` (for inspection).

    Raises:
        CheckpointError and subclasses, as :func:`xrnn.load`.
    """
    from .checkpoint import load, peek

    if peek(path, verify=False).kind in (CharLM.checkpoint_kind, Trainer.checkpoint_kind):
        return load_language_model(path, device, allow_nonfinite=allow_nonfinite)
    return load(path, device=device, allow_nonfinite=allow_nonfinite)


# ---------------------------------------------------------------------------
# fine-tuning: a new run from a checkpoint's weights (char-rnn's -init_from)
# ---------------------------------------------------------------------------

def _recode(corpus: Corpus, vocab: Any, source: str, checkpoint: str, extend_hint: bool = True) -> Corpus:
    """``corpus`` with its ids in ``vocab``'s numbering (symbols outside it: VocabularyError naming them)."""
    from .data import _show

    own = corpus.vocab
    if own == vocab:
        return corpus
    table = np.empty(len(own), dtype=np.int64)  # (V_own,) own id -> vocab id
    missing = []
    for i, tok in enumerate(own.tokens):
        if tok in vocab:
            table[i] = vocab.id(tok)
        elif vocab.unk_id is not None:
            table[i] = vocab.unk_id
        else:
            missing.append(tok)
    if missing:
        noun = "character" if own.level == "char" else "word"
        fix = ("pass extend_vocab=True to add them (new rows initialised as a new model's), or " if extend_hint
               else "")
        raise VocabularyError(
            f"{source} has {plural(len(missing), noun)} outside the vocabulary of {checkpoint!r} "
            f"({plural(len(vocab), noun)}): {_show(missing)}; {fix}remove them from the text"
        )
    return Corpus(table[np.asarray(corpus.ids)].astype(vocab.dtype), vocab, corpus.path)


def extend_vocabulary(model: CharLM, vocab: Any, seed: Any = None) -> CharLM:
    """A copy of ``model`` that predicts ``vocab``, a vocabulary that starts with the model's own.

    Every existing id keeps its number and its weights bit for bit; the rows
    of the new tokens (embedding rows, or one-hot input columns of
    ``rnn.weight_ih_l0``; head rows and biases) are the ones a new
    ``CharLM(len(vocab), ..., seed=seed)`` draws. On old tokens the logits of
    the old ids are unchanged (up to the rounding of a longer one-hot product).

    Raises:
        ConfigError: ``vocab`` does not start with the model's tokens (same
            order, level and unknown token).
    """
    old = model.vocab
    V = model.vocab_size
    if old is None or not isinstance(vocab, type(old)) or vocab.tokens[:V] != old.tokens \
            or vocab.level != old.level or vocab.unk != old.unk or len(vocab) < V:
        raise ConfigError("extend_vocabulary needs a vocabulary that starts with the model's own tokens, in order "
                          "(Vocabulary(model.vocab.tokens + new_tokens, level=model.vocab.level, unk=model.vocab.unk))")
    cfg = dict(model.config, vocab_size=len(vocab))
    fresh = CharLM(**cfg, device=model.device, seed=seed, vocab=vocab)
    state = {k: np.array(to_numpy(v), copy=True) for k, v in fresh.state_dict().items()}
    rows = ("embedding.weight", "head.weight", "head.bias")  # (V, E), (V, H), (V,)
    for k, v in model.state_dict().items():
        a = np.asarray(to_numpy(v))
        if k in rows:
            state[k][:V] = a
        elif k == "rnn.weight_ih_l0" and model.embedding_dim is None:
            state[k][:, :V] = a  # (G*H, V): one column per one-hot input id
        else:
            state[k] = a
    fresh.load_state_dict(state)
    fresh.train(model.training)
    return fresh


def init_from_checkpoint(checkpoint: str | os.PathLike, text: Any = None, *, extend_vocab: bool = False,
                         device: Any = "cpu", seed: Any = None, _check: Any = None) -> tuple[CharLM, Corpus]:
    """The start of a new run on ``text`` from a checkpoint's weights: ``(model, corpus)``.

    char-rnn's ``-init_from``: ``Trainer(*init_from_checkpoint("out/best.ckpt",
    "new.txt"), ...)`` trains from step 0 with a new optimizer; ``xrnn.train(
    "new.txt", init_from=...)`` and ``xrnn train new.txt --init-from CKPT``
    do the same. The model (architecture, dtype and weights) is the
    checkpoint's (a CharLM or a training run's), on ``device``; the text is
    read at the checkpoint vocabulary's level and case, and its ids use the
    checkpoint's vocabulary.

    Args:
        checkpoint: a CharLM or trainer checkpoint file.
        text: a text file, a :class:`~xrnn.data.Corpus`, or None for the shipped corpus.
        extend_vocab: symbols of the text outside the checkpoint's vocabulary
            are appended to it (:func:`extend_vocabulary`); False refuses them.
            A vocabulary with an unknown token (word level, ``max_vocab``)
            maps them to that token instead, either way.
        seed: draws the new rows and, for the new run, the dropout masks
            (None: fresh entropy).

    Raises:
        VocabularyError: the text has symbols outside the vocabulary and
            ``extend_vocab`` is False (the message lists a few and the count).
        CheckpointError, DataError: as :func:`load_model`, :func:`read_corpus`.
    """
    checkpoint = os.fspath(checkpoint)
    model = load_language_model(checkpoint, device)
    old = model.vocab
    if not isinstance(old, Vocabulary):
        raise CheckpointKindError(f"checkpoint {checkpoint!r} has no vocabulary; a new run needs one to read text")
    if _check is not None:  # train()'s options against the model, before any text is read
        _check(model)
    if isinstance(text, Corpus):
        corpus, source = text, "the text"
    else:
        path = default_corpus_path() if text is None else os.fspath(text)
        corpus = read_corpus(path, level=old.level, lowercase=old.lowercase)
        source = "the shipped corpus" if text is None else repr(path)
    vocab = old
    if extend_vocab and old.unk_id is None:
        new = [t for t in corpus.vocab.tokens if t not in old]
        if new:
            vocab = Vocabulary(old.tokens + new, level=old.level, unk=old.unk, lowercase=old.lowercase)
            model = extend_vocabulary(model, vocab, seed=seed)
    corpus = _recode(corpus, vocab, source, checkpoint)
    model.rng = seed
    model.train(True)
    return model, corpus


def _init_conflicts(explicit: dict, model: CharLM) -> list[str]:
    """Model and text options given with init_from that disagree with the checkpoint's model."""
    saved = {"model": model.cell, "hidden_size": model.hidden_size, "num_layers": model.num_layers,
             "embedding_dim": model.embedding_dim, "dropout": model.dropout, "dtype": model.dtype,
             "level": model.vocab.level, "lowercase": model.vocab.lowercase}
    out = [f"{k}={explicit[k]!r} (the checkpoint has {saved[k]!r})" for k in saved
           if k in explicit and not (explicit[k] == saved[k] or str(explicit[k]).lower() == str(saved[k]).lower())]
    if "max_vocab" in explicit:
        out.append(f"max_vocab={explicit['max_vocab']!r} (the vocabulary is the checkpoint's)")
    return out


# ---------------------------------------------------------------------------
# xrnn.train(): everything from options
# ---------------------------------------------------------------------------

_MODEL_KEYS = ("model", "hidden_size", "num_layers", "embedding_dim", "dropout", "dtype")


def _is_epoch_schedule(schedule: Any) -> bool:
    """A schedule given as ``f(steps_per_epoch) -> Schedule`` (epochs known only once the data is)."""
    return callable(schedule) and not isinstance(schedule, (Schedule, Mapping))


def _conflicts(explicit: dict, meta: dict) -> list[str]:
    """Options given explicitly that disagree with a checkpoint, as 'name=given (the checkpoint has saved)'."""
    def part(d, key):  # a malformed checkpoint is reported by _restore, which reads it next
        v = d.get(key) if isinstance(d, Mapping) else None
        return v if isinstance(v, Mapping) else {}

    mc = part(part(meta, "model"), "config")
    traj = part(meta, "trainer")
    ident = part(part(meta, "data"), "corpus")
    saved = {
        "model": mc.get("cell"),
        "hidden_size": mc.get("hidden_size"),
        "num_layers": mc.get("num_layers"),
        "embedding_dim": mc.get("embedding_dim"),
        "dropout": mc.get("dropout"),
        "dtype": mc.get("dtype"),
        "seed": meta.get("seed"),
        "level": ident.get("level"),
        "max_vocab": ident.get("max_vocab"),
        "lowercase": ident.get("lowercase"),
    }
    saved.update({k: traj.get(k) for k in _TRAJECTORY})
    out = []
    for k, v in explicit.items():
        s = saved.get(k)
        if k == "schedule" and isinstance(v, Schedule):
            v = v.to_config()
        if k == "optimizer_kwargs" and isinstance(v, Mapping):
            v = {kk: list(vv) if isinstance(vv, tuple) else vv for kk, vv in v.items()}
        if isinstance(v, str) and isinstance(s, str):
            same = v.lower() == s.lower()
        elif isinstance(v, (int, float)) and isinstance(s, (int, float)) and not isinstance(v, bool) \
                and not isinstance(s, bool):
            same = float(v) == float(s)
        else:
            same = v == s
        if not same:
            out.append(f"{k}={v!r} (the checkpoint has {s!r})")
    return out


@_holding_locks
def train(
    text_file: str | os.PathLike | None = None,
    *,
    steps: int | None = None,
    model: str | None = None,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    embedding_dim: int | None = None,
    dropout: float | None = None,
    dtype: str | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    optimizer: str | None = None,
    lr: float | None = None,
    optimizer_kwargs: Mapping | None = None,
    clip: float | None | bool = None,
    clip_value: float | None = None,
    schedule: Any = None,
    val_fraction: float | None = None,
    seed: int | None = None,
    device: Any = "cpu",
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    level: str | None = None,
    max_vocab: int | None = None,
    lowercase: bool | None = None,
    distributed: Any = False,
    init_from: str | os.PathLike | None = None,
    extend_vocab: bool = False,
    _resume_hint: str | None = None,
    **trainer_options: Any,
) -> Trainer:
    """Train a character (or word) language model from options; returns the :class:`Trainer`.

    Builds the corpus (``text_file``, or the shipped tiny Shakespeare when
    None), its vocabulary and a :class:`~xrnn.models.CharLM`, then runs
    :meth:`Trainer.fit` to ``steps`` in total. Options left at None take the
    values in :data:`DEFAULTS` (char-rnn's shapes: a 2-layer LSTM of 128
    units on 50 streams x 50 characters, Adam at 4e-3, clipping at 5).
    ``clip=False`` turns norm clipping off.

    Args:
        text_file: a UTF-8 text file; None for the shipped corpus.
        steps: the total step target (a resumed run continues to it).
        model: ``"lstm"``, ``"gru"`` or ``"rnn"``; hidden_size, num_layers,
            embedding_dim (None: one-hot input), dropout, dtype: see CharLM.
        batch_size, seq_len, optimizer, lr, optimizer_kwargs, clip,
            clip_value, schedule, val_fraction: see :class:`Trainer`. Here
            ``schedule`` may also be a function ``steps_per_epoch ->
            Schedule``, for schedules counted in epochs (char-rnn's decay:
            ``lambda spe: StepDecay.from_epochs(lr, spe, 0.97, 10)``).
        seed: the model's initial weights and dropout masks, and the sample
            RNG (default 1337, so runs repeat).
        device: where to train (``"cpu"``, ``"cuda"``, ...).
        out_dir: where ``last.ckpt``/``best.ckpt`` go (None: no files).
        resume: continue ``out_dir/last.ckpt``. Options given here that
            decide the trajectory must equal the checkpoint's (ConfigError
            otherwise); ``steps``, ``device`` and the logging options may change.
        overwrite: start a new run even though ``out_dir`` holds a checkpoint
            (otherwise that is an error, so a run is never lost by accident).
        level, max_vocab, lowercase: how the text is read (see :func:`xrnn.data.read_corpus`).
        distributed: True for data-parallel training over the ranks of the
            MPI job this process was started in (``mpirun -n N``): each rank
            gets one device (``"cuda"`` becomes the GPU of its local rank),
            ``batch_size / N`` streams, and the gradients are averaged every
            step; only rank 0 prints and writes checkpoints. A
            :class:`~xrnn.distributed.Communicator` also works. Resuming on
            another number of ranks continues the same run.
        init_from: a checkpoint (CharLM or training run) whose model and
            weights start a new run on ``text_file``: step 0, a new optimizer
            (see :func:`init_from_checkpoint`). Model and text options that
            disagree with the checkpoint are a ConfigError.
        extend_vocab: with ``init_from``, add the text's symbols that the
            checkpoint's vocabulary lacks instead of refusing them.
        **trainer_options: the other :class:`Trainer` options (eval_every,
            sample_every, log_every, save_every, progress, check_finite, ...).

    Raises:
        ConfigError, DataError, CheckpointError, NonFiniteError, SaveError:
        see :class:`Trainer`.
    """
    bad = sorted(set(trainer_options) - set(_RUNTIME))
    if bad:
        known = sorted(set(_RUNTIME) - {"out_dir"})
        raise ConfigError(f"train() got unknown option(s) {', '.join(bad)}; the other options are {', '.join(known)}")
    if clip is True:
        raise ConfigError("clip must be a number > 0, or False/None to turn norm clipping off")
    steps = None if steps is None else _int("steps", steps, minimum=0)
    given = dict(model=model, hidden_size=hidden_size, num_layers=num_layers, embedding_dim=embedding_dim,
                 dropout=dropout, dtype=dtype, batch_size=batch_size, seq_len=seq_len, optimizer=optimizer,
                 lr=lr, optimizer_kwargs=optimizer_kwargs, clip=clip, clip_value=clip_value,
                 schedule=schedule, val_fraction=val_fraction, seed=seed, level=level, max_vocab=max_vocab,
                 lowercase=lowercase)
    # None means "not given"; clip=False means "given: no norm clipping"
    explicit = {k: v for k, v in given.items() if v is not None}
    if clip is False:
        explicit["clip"] = None
    runtime = dict(trainer_options)
    if out_dir is not None:
        runtime["out_dir"] = os.fspath(out_dir)
    last = None if out_dir is None else os.path.join(os.fspath(out_dir), LAST)
    if distributed is True:
        distributed, dev = init_distributed(device)
    elif isinstance(distributed, Communicator):
        dev = device_for_rank(device, distributed.local_rank)
    else:
        dev = resolve_device(device)
    main = not isinstance(distributed, Communicator) or distributed.is_main
    if out_dir is not None and main:  # before looking at the folder: no other run may be using it
        _hold_out_dir(os.fspath(out_dir))

    if init_from is not None and resume:
        raise ConfigError("init_from starts a new run from a checkpoint's weights and resume=True continues a "
                          "saved run; give one of them")
    if extend_vocab and init_from is None:
        raise ConfigError("extend_vocab=True applies to init_from (a new run from a checkpoint's weights)")
    if resume:
        if last is None:
            raise ConfigError("resume=True needs out_dir (the directory holding last.ckpt)")
        if not os.path.exists(last):
            raise CheckpointError(
                f"cannot resume: {last!r} does not exist (no run was saved in {str(out_dir)!r})")
        c = _read_run(last)
        per_epoch = explicit.pop("schedule") if _is_epoch_schedule(explicit.get("schedule")) else None
        t = _restore(c, dev, runtime, distributed)  # first: a malformed checkpoint is reported as such
        conflicts = _conflicts(explicit, c.meta)
        if conflicts:
            raise ConfigError(
                f"cannot resume {last!r} with different settings: {'; '.join(conflicts)}. Drop these options "
                "(the checkpoint's are used), or start a new run in another out_dir"
            )
        if text_file is not None:
            t.attach_corpus(text_file)
        else:
            t._ensure_data()
        t._resume_hint = _resume_hint
        if per_epoch is not None:
            wanted = per_epoch(t.batcher.windows_per_epoch).to_config()
            if wanted != t.schedule.to_config():
                raise ConfigError(
                    f"cannot resume {last!r} with a different schedule: schedule={wanted!r} (the checkpoint has "
                    f"{t.schedule.to_config()!r}). Drop the schedule options, or start a new run in another out_dir"
                )
        if steps is None:  # continue to the interrupted run's own target (older checkpoints: the default)
            steps = t.target_steps if t.target_steps is not None else DEFAULTS["steps"]
        return t.fit(steps)

    if last is not None and os.path.exists(last) and not overwrite:
        raise ConfigError(
            f"{str(out_dir)!r} already holds a run ({LAST}); continue it with resume=True (--resume), "
            "choose another out_dir (--out), or pass overwrite=True (--overwrite) to replace it"
        )
    opts: dict[str, Any] = {k: explicit.get(k, DEFAULTS.get(k)) for k in given}
    read_opts: dict[str, Any] = {"level": opts["level"] or "char", "max_vocab": opts["max_vocab"],
                 "lowercase": bool(opts["lowercase"])}
    if init_from is not None:
        net, corpus = _start_from(init_from, text_file, explicit, extend_vocab, dev, opts["seed"])
        read_opts = {"level": corpus.vocab.level, "max_vocab": None, "lowercase": corpus.vocab.lowercase}
    else:
        corpus = read_corpus(default_corpus_path() if text_file is None else os.fspath(text_file), **read_opts)
    if _is_epoch_schedule(opts["schedule"]):
        train_ids, _ = split(corpus.ids, opts["val_fraction"])
        windows = StreamBatcher(train_ids, opts["batch_size"], opts["seq_len"]).windows_per_epoch
        opts["schedule"] = opts["schedule"](windows)
    if init_from is None:
        net = CharLM(len(corpus.vocab), hidden_size=opts["hidden_size"], num_layers=opts["num_layers"],
                     cell=opts["model"], embedding_dim=opts["embedding_dim"], dropout=opts["dropout"],
                     device=dev, dtype=opts["dtype"], seed=opts["seed"], vocab=corpus.vocab)
    options = {**_runtime_defaults(), **runtime}
    t = Trainer(net, corpus, batch_size=opts["batch_size"], seq_len=opts["seq_len"], optimizer=opts["optimizer"],
                lr=opts["lr"], optimizer_kwargs=opts["optimizer_kwargs"], clip=opts["clip"],
                clip_value=opts["clip_value"], schedule=opts["schedule"], val_fraction=opts["val_fraction"],
                seed=opts["seed"], distributed=distributed, **options)
    t._read_options = read_opts
    t._resume_hint = _resume_hint
    if overwrite and out_dir is not None and main:  # once the new run is ready: the old run's files must go
        rundir.clear(out_dir)  # (an old best.ckpt beside the new last.ckpt would pass for this run's)
    return t.fit(DEFAULTS["steps"] if steps is None else steps)


def _start_from(init_from: Any, text_file: Any, explicit: dict, extend_vocab: bool, dev: Any, seed: Any):
    """train()'s init_from: the checkpoint's model (conflicting options refused) and the text in its ids."""
    def check(net: CharLM) -> None:
        conflicts = _init_conflicts(explicit, net)
        if conflicts:
            raise ConfigError(
                f"init_from={os.fspath(init_from)!r} takes the model and its vocabulary from the checkpoint; these "
                f"options disagree with it: {'; '.join(conflicts)}. Drop them"
            )

    return init_from_checkpoint(init_from, text_file, extend_vocab=extend_vocab, device=dev, seed=seed, _check=check)
