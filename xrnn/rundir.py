"""A training run's output folder (``--out``): its lock, its checkpoint files and its temporaries.

One folder holds one run::

    out/
      .lock        the run's lock file: an exclusive fcntl.flock held for the whole life of the
                   process training there, which writes its PID into the file
      last.ckpt    the latest state of the run (resume from it)
      best.ckpt    the state at the best validation loss so far
      .last.ckpt.<pid>.<random>.tmp, .best.ckpt.<pid>.<random>.tmp
                   a save in progress (checkpoint.write_container), or one killed mid-way

The lock makes a second run, a ``--resume`` or an ``--overwrite`` of a live
folder fail at once with one line naming the PID that holds it, instead of
two processes overwriting each other's checkpoints. The operating system
releases an ``flock`` when its process dies, ``kill -9`` included, so a
crashed run never leaves a stale lock behind. Locks are re-entrant within a
process (:func:`xrnn.train` takes it, then :meth:`Trainer.fit` takes it
again). Where ``fcntl`` does not exist (Windows) there is no lock.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Iterator

from .checkpoint import _process_exists
from .errors import SaveError, StateError

try:  # POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LAST", "BEST", "LOCK", "lock", "holder", "last_path", "best_path", "holds_run",
           "clean_temporaries", "clear"]

#: file names of the checkpoints a run keeps in its folder
LAST = "last.ckpt"
BEST = "best.ckpt"
#: the lock file
LOCK = ".lock"

_held: dict = {}  # real path of a folder -> [fd, count]: the locks this process holds
_guard = threading.Lock()


def last_path(out_dir: str) -> str:
    return os.path.join(os.fspath(out_dir), LAST)


def best_path(out_dir: str) -> str:
    return os.path.join(os.fspath(out_dir), BEST)


def holds_run(out_dir: str) -> bool:
    """True when the folder holds a run's ``last.ckpt``."""
    return os.path.exists(last_path(out_dir))


def holder(out_dir: str) -> int | None:
    """The PID written in the folder's lock file (the last process that held it), or None."""
    try:
        with open(os.path.join(os.fspath(out_dir), LOCK), "rb") as f:
            text = f.read(32).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _make_dir(out_dir: str) -> None:
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise SaveError(f"cannot create the checkpoint directory {out_dir!r}: {e.strerror or e}") from e


def _acquire(out_dir: str) -> int | None:
    _make_dir(out_dir)
    path = os.path.join(out_dir, LOCK)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # not inherited by child processes
    except OSError as e:
        raise SaveError(f"cannot create the lock file {path!r}: {e.strerror or e}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = holder(out_dir)
        who = f"PID {pid}" if pid is not None else "another process"
        raise StateError(
            f"{out_dir!r} is in use by another training run ({who} holds {path!r}); wait for it to finish or "
            "stop it, or choose another --out"
        ) from None
    except OSError:  # a filesystem without flock (some network mounts): go on unlocked
        os.close(fd)
        return None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    except OSError:
        pass  # the lock holds without the PID in it
    return fd


@contextlib.contextmanager
def lock(out_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the folder's exclusive lock inside this block (creating the folder when needed).

    Raises:
        StateError: another process holds it (the message names its PID).
        SaveError: the folder or its lock file cannot be created.
    """
    out_dir = os.fspath(out_dir)
    if fcntl is None:  # pragma: no cover - Windows
        _make_dir(out_dir)
        yield
        return
    created = not os.path.isdir(out_dir)
    _make_dir(out_dir)
    key = os.path.realpath(out_dir)
    with _guard:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
        else:
            entry = _held[key] = [_acquire(out_dir), 1]
    try:
        yield
    finally:
        with _guard:
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                if entry[0] is not None:
                    try:
                        if created:  # a run refused or failed before writing anything leaves no empty folder
                            _remove_if_only_lock(out_dir)
                        fcntl.flock(entry[0], fcntl.LOCK_UN)
                    finally:
                        os.close(entry[0])


def _remove_if_only_lock(out_dir: str) -> None:
    """Remove a folder this run created when it holds nothing but the lock file (best effort)."""
    try:
        if os.listdir(out_dir) == [LOCK]:
            os.unlink(os.path.join(out_dir, LOCK))
            os.rmdir(out_dir)
    except OSError:
        pass


def _temporaries(out_dir: str) -> Iterator[tuple[str, int]]:
    pattern = re.compile(r"\.(?:" + re.escape(LAST) + "|" + re.escape(BEST) + r")\.(\d+)\.[0-9a-f]{12}\.tmp")
    try:
        names = os.listdir(out_dir)
    except OSError:
        return
    for name in names:
        m = pattern.fullmatch(name)
        if m is not None:
            yield os.path.join(out_dir, name), int(m.group(1))


def clean_temporaries(out_dir: str | os.PathLike) -> list[str]:
    """Remove the temporaries of saves to ``last.ckpt``/``best.ckpt`` that were killed mid-way.

    Called at the start of a run, under the lock: no other run writes here
    then, so every temporary whose writer is gone (or is this very process,
    whose saves are not running yet) is a leftover. Returns the paths removed.
    """
    out_dir = os.fspath(out_dir)
    removed = []
    for path, pid in _temporaries(out_dir):
        if pid != os.getpid() and _process_exists(pid):
            continue
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def clear(out_dir: str | os.PathLike) -> list[str]:
    """Remove an old run's files (``last.ckpt``, ``best.ckpt``, temporaries) before a new run there
    (``--overwrite``); call it under the lock. Returns the paths removed.

    Raises:
        SaveError: a file could not be removed.
    """
    out_dir = os.fspath(out_dir)
    removed = clean_temporaries(out_dir)
    for path in (last_path(out_dir), best_path(out_dir)):
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise SaveError(f"--overwrite cannot remove the old run's {path!r}: {e.strerror or e}") from e
        removed.append(path)
    return removed
