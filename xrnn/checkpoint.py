"""Checkpoints: one safe, self-checking file per model or training run.

``save(obj, path)`` writes everything an object reports through its
checkpoint protocol (for a trainer: config, vocabulary, weights, optimizer
state, step, data position, RNG state, loss history) into one file;
``load(path, device=...)`` rebuilds it on any backend. Arrays are stored as
raw little-endian bytes, never as library objects, so a checkpoint written
from CuPy loads on a NumPy-only machine and vice versa with no conversion.

File layout (format version 1)::

    offset 0   b"XRNNCKPT"                       magic, 8 bytes
    offset 8   format version                    uint32, little-endian
    offset 12  header length H                   uint64, little-endian
    offset 20  header                            H bytes of UTF-8 JSON
               zero padding                      to a multiple of 64 bytes
    data       tensor bytes                      little-endian, C order, each
                                                 tensor starting 64-byte aligned
    last 32    SHA-256 of every byte before it

The header is ``{"format": 1, "kind": str, "xrnn_version": str, "meta": {...},
"tensors": {name: {"dtype", "shape", "offset", "nbytes"}}}`` with offsets
relative to the start of the data region. The magic, the 20-byte prefix and
the SHA-256 trailer are frozen for all future versions: that lets every
reader verify the checksum before looking at the version, so a damaged file
is always reported as damaged and a genuine newer file as newer.

Safety: loading never executes code. There is no pickle anywhere; the header
is parsed with :mod:`json` only; every declared size is checked against the
file's real size before anything is allocated, so memory use while loading
is bounded by the file size. Every way a file can be unreadable raises a
subclass of :class:`~xrnn.errors.CheckpointError` naming the file:

* :class:`~xrnn.errors.CheckpointError` itself: the file cannot be opened
  (missing, a directory, no permission); the OSError is chained.
* :class:`~xrnn.errors.CheckpointCorruptError`: not an xrnn checkpoint
  (e.g. a pickle or ``torch.save`` file), truncated, checksum mismatch,
  malformed header, or contents that do not describe a valid object.
* :class:`~xrnn.errors.CheckpointVersionError`: written by a newer format.
* :class:`~xrnn.errors.CheckpointKindError`: holds another kind of object
  than was asked for, or a kind nobody has registered.

Saving is atomic: the bytes go to a unique temporary file in the target's
directory (``.<name>.<pid>.<random>.tmp``), which is flushed, fsynced and
renamed over the target with :func:`os.replace`. Any failure (disk full
included) removes the temporary file and raises
:class:`~xrnn.errors.SaveError`; the previous checkpoint is untouched. A
process killed outright (SIGKILL, power cut) mid-save leaves the previous
checkpoint intact and its temporary file behind; the next successful save
to the same path removes such leftovers once their writer is gone (POSIX).

The checkpoint protocol keeps this module ignorant of model classes. An
object is saveable when it has ``checkpoint_kind: str`` and
``checkpoint_state() -> (meta, tensors)``; a kind is loadable once its
defining module has called ``register_kind(kind, loader)`` with
``loader(meta, tensors, device) -> object``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import stat
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np

from .backend import Device, format_bytes, oom_guard, resolve_device, to_numpy
from .errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointKindError,
    CheckpointVersionError,
    ConfigError,
    DeviceError,
    DeviceMemoryError,
    DTypeError,
    SaveError,
    XRNNError,
)

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "SUFFIX",
    "TENSOR_DTYPES",
    "Container",
    "TensorInfo",
    "CheckpointInfo",
    "write_container",
    "read_container",
    "peek",
    "register_kind",
    "registered_kinds",
    "save",
    "load",
    "check_finite",
    "nonfinite_tensors",
    "register_tensor_limit",
]

MAGIC = b"XRNNCKPT"
FORMAT_VERSION = 1
SUFFIX = ".xrnn"  # conventional file suffix; not enforced

#: dtypes a tensor may have, by NumPy name.
TENSOR_DTYPES = (
    "bool",
    "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
)

_PREFIX = struct.Struct("<8sIQ")  # magic, format version, header length
_PREFIX_LEN = _PREFIX.size  # 20
_DIGEST_LEN = 32
_ALIGN = 64
_CHUNK = 1 << 20
_MAX_HEADER = 1 << 26  # 64 MiB of JSON: far above any real vocabulary (the loss history is a tensor)
_MAX_DEPTH = 64  # nesting of the header's JSON (a real one nests about 6 deep)
# Parsed JSON costs Python objects: up to about this many bytes per value (a dict, a list slot, a
# string, an int) on top of the text itself. The header may cost at most _HEADER_COST_FACTOR x the
# file's size, or _HEADER_COST_FLOOR for small files, so a forged header of ``[{},{},...]`` (3 bytes
# of text, ~70 of objects per value) is refused before it is parsed. A real header is small next to
# its weights: its vocabulary also sizes the model's input and output layers.
_BYTES_PER_VALUE = 200
_HEADER_COST_FACTOR = 4
_HEADER_COST_FLOOR = 4 << 20
_MAX_NDIM = 32
_MAX_NBYTES = 1 << 62  # guards NumPy's own size arithmetic for 0-size arrays


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _xrnn_version() -> str:
    from ._version import __version__

    return __version__


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    """What the header declares about one tensor (no data)."""

    dtype: str
    shape: tuple
    nbytes: int


@dataclass
class Container:
    """The decoded contents of a checkpoint file.

    Unpacks as ``kind, meta, tensors = read_container(path)``.

    Attributes:
        kind: what the file holds, e.g. ``"charlm"`` or ``"trainer"``.
        meta: the JSON metadata (dicts, lists, str, int of any size, float
            including NaN/inf, bool, None).
        tensors: ``{name: numpy.ndarray}`` in native byte order, C order.
        format_version: the file format version (1).
        xrnn_version: the xrnn version that wrote the file.
        path: the file it was read from.
    """

    kind: str
    meta: dict
    tensors: dict
    format_version: int = FORMAT_VERSION
    xrnn_version: str = "unknown"
    path: str = ""

    def __iter__(self):
        return iter((self.kind, self.meta, self.tensors))


@dataclass
class CheckpointInfo:
    """A checkpoint's header without its tensor data (see :func:`peek`).

    Attributes:
        kind, meta, format_version, xrnn_version, path: as in :class:`Container`.
        tensors: ``{name: TensorInfo}`` (dtype, shape, nbytes).
        file_size: bytes on disk.
        checksum_ok: True when the SHA-256 trailer was verified (peek's default).
    """

    kind: str
    meta: dict
    tensors: dict
    format_version: int
    xrnn_version: str
    path: str
    file_size: int
    checksum_ok: bool = field(default=False)

    @property
    def num_elements(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors.values())


# ---------------------------------------------------------------------------
# JSON metadata
# ---------------------------------------------------------------------------

def _jsonable(value: Any, where: str):
    """A JSON-ready copy of ``value``; ConfigError for what would not round-trip."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)  # plain int of any size (NumPy bit-generator states)
    if isinstance(value, float):
        return float(value)  # NaN and +-inf are written as NaN / Infinity
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(
                    f"checkpoint meta key {k!r} at {where} is a {type(k).__name__}; keys must be str "
                    "(JSON would silently turn it into a string and it would not load back equal)"
                )
            out[k] = _jsonable(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray) or hasattr(value, "__array_namespace__"):
        raise ConfigError(
            f"checkpoint meta value at {where} is an array; put arrays in the tensors dict, "
            "meta holds JSON values only"
        )
    raise ConfigError(
        f"checkpoint meta value at {where} is a {type(value).__name__}, which JSON cannot hold; "
        "use dict (str keys), list, str, int, float, bool or None"
    )


# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------

def _open_for_write(path: str):
    """A new, uniquely named binary file next to ``path``: (temp path, file object).

    Created with mode 0o666 so the process umask applies, as for any file the
    user creates (mkstemp would force 0o600).
    """
    directory, base = os.path.split(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(directory, f".{base}.{os.getpid()}.{os.urandom(6).hex()}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        return tmp, os.fdopen(fd, "wb")
    raise FileExistsError(errno.EEXIST, "could not create a unique temporary file", directory)


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable. Not possible on every platform or
    # filesystem; the new file is already in place, so failures are ignored.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _prepare_tensors(tensors: Mapping) -> dict:
    if not isinstance(tensors, Mapping):
        raise ConfigError(f"checkpoint tensors must be a dict of name -> array, got {type(tensors).__name__}")
    out = {}
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise ConfigError(f"checkpoint tensor names must be str, got {name!r}")
        a = to_numpy(value)
        if not isinstance(a, np.ndarray):
            a = np.asarray(a)
        dt = a.dtype.name
        if dt not in TENSOR_DTYPES:
            raise DTypeError(
                f"checkpoint tensor {name!r} has dtype {a.dtype}; checkpoints hold "
                + ", ".join(TENSOR_DTYPES)
            )
        # np.ascontiguousarray would turn a 0-d array into shape (1,)
        out[name] = np.asarray(a, dtype=a.dtype.newbyteorder("<"), order="C")
    return out


def _encode_container(kind: str, meta: Mapping, tensors: Mapping) -> Iterable[bytes | memoryview]:
    """The bytes of a checkpoint, as a sequence of pieces (without the trailer).

    Validates everything first: ConfigError for a bad kind or meta,
    DTypeError for an unsupported tensor dtype.
    """
    if not isinstance(kind, str) or not kind:
        raise ConfigError(f"checkpoint kind must be a non-empty str, got {kind!r}")
    if not isinstance(meta, Mapping):
        raise ConfigError(f"checkpoint meta must be a dict, got {type(meta).__name__}")
    try:
        meta = _jsonable(meta, "meta")
    except RecursionError:
        raise ConfigError("checkpoint meta is nested too deeply (or contains itself)") from None
    arrays = _prepare_tensors(tensors)
    entries, offset = {}, 0
    for name, a in arrays.items():
        entries[name] = {"dtype": a.dtype.name, "shape": list(a.shape), "offset": offset, "nbytes": int(a.nbytes)}
        offset = _align(offset + a.nbytes)
    header = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "xrnn_version": _xrnn_version(),
        "meta": meta,
        "tensors": entries,
    }
    try:
        # ensure_ascii: lone surrogates in strings survive as \udXXX escapes
        hbytes = json.dumps(header, allow_nan=True, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    except (ValueError, RecursionError) as e:  # e.g. an int beyond sys.get_int_max_str_digits()
        raise ConfigError(f"checkpoint meta cannot be written as JSON: {e}") from None
    pieces: list = [_PREFIX.pack(MAGIC, FORMAT_VERSION, len(hbytes)), hbytes]
    pos = _PREFIX_LEN + len(hbytes)
    pieces.append(bytes(_align(pos) - pos))
    pos = 0
    for name, a in arrays.items():
        start = entries[name]["offset"]
        if start > pos:
            pieces.append(bytes(start - pos))
        if a.nbytes:
            pieces.append(memoryview(a.reshape(-1).view(np.uint8)))
        pos = start + a.nbytes
    return pieces


def write_container(path: str | os.PathLike, kind: str, meta: Mapping, tensors: Mapping) -> None:
    """Atomically write a checkpoint file (see the module docstring for the layout).

    Args:
        path: destination; its directory must exist. An existing file there is
            replaced only once the new one is complete and on disk.
        kind: what the file holds (``load`` dispatches on it).
        meta: JSON-able dict (str keys; int of any size; float incl. NaN/inf;
            NumPy scalars are converted; tuples become lists).
        tensors: ``{name: array}`` from any supported library; stored as
            little-endian C-order bytes with the dtype (one of
            :data:`TENSOR_DTYPES`) and shape.

    Raises:
        ConfigError / DTypeError: ``meta`` or ``tensors`` cannot be stored
            (nothing is written).
        SaveError: writing failed (disk full, permission, missing directory, ...);
            the temporary file is removed and any previous file is untouched.
    """
    path = os.fspath(path)
    pieces = _encode_container(kind, meta, tensors)
    _check_replaceable(path)
    tmp = None
    f = None
    try:
        tmp, f = _open_for_write(path)
        h = hashlib.sha256()
        for p in pieces:
            h.update(p)
            f.write(p)
        f.write(h.digest())
        f.flush()
        os.fsync(f.fileno())
        f.close()
        f = None
        os.replace(tmp, path)
        tmp = None
    except BaseException as e:
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: cleaned up, re-raised as is
            raise
        raise SaveError(_save_message(path, e)) from e
    _fsync_directory(os.path.dirname(os.path.abspath(path)))
    _remove_stale_temporaries(path)


#: a temporary file older than this (seconds since its last write) whose writer is gone is removed
_STALE_AFTER = 60.0


def _remove_stale_temporaries(path: str) -> None:
    """Delete temporary files that earlier saves to ``path`` left behind when they were killed.

    A save killed by SIGKILL (or a power cut) cannot remove its
    ``.<name>.<pid>.<random>.tmp`` file. After each successful save, such
    files next to ``path`` are removed when the process that wrote them no
    longer exists on this machine and they have not been written to for
    ``_STALE_AFTER`` seconds (the age guards a writer on another machine
    sharing the directory). POSIX only; every failure is ignored.
    """
    if os.name != "posix":
        return
    directory, base = os.path.split(os.path.abspath(path))
    pattern = re.compile(r"\." + re.escape(base) + r"\.(\d+)\.[0-9a-f]{12}\.tmp")
    try:
        names = os.listdir(directory)
    except OSError:
        return
    now = time.time()
    for name in names:
        m = pattern.fullmatch(name)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _process_exists(pid):
            continue
        tmp = os.path.join(directory, name)
        try:
            if now - os.lstat(tmp).st_mtime >= _STALE_AFTER:
                os.unlink(tmp)
        except OSError:
            pass


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists (POSIX)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError, ValueError):
        return True  # exists but belongs to someone else, or cannot tell: keep the file
    return True


def _check_replaceable(path: str) -> None:
    """Refuse to replace an existing file that is not an xrnn checkpoint.

    Guards against a slip such as saving over the training text; an empty
    file (e.g. from ``touch``) may be replaced.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
    except (FileNotFoundError, IsADirectoryError):
        return  # nothing to protect; a directory fails at the rename with a clear message
    except OSError:
        return  # unreadable: let the write itself report the problem
    if head and head != MAGIC:
        raise SaveError(
            f"refusing to save over {path!r}: it exists and is not an xrnn checkpoint "
            f"(it starts with {head!r}); choose another path or delete that file first"
        )


def _save_message(path: str, e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        cause = "the disk is full (ENOSPC); free some space or save elsewhere"
    elif isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM):
        cause = "permission denied; choose a directory you can write to"
    elif isinstance(e, OSError) and e.errno == errno.ENOENT:
        cause = f"the directory {os.path.dirname(os.path.abspath(path))!r} does not exist; create it first"
    elif isinstance(e, OSError) and e.errno in (errno.EISDIR,):
        cause = "the path is a directory; give a file name"
    else:
        cause = f"{type(e).__name__}: {e}"
    prev = "the previous checkpoint there is untouched" if os.path.exists(path) else "no file was created"
    return f"could not save checkpoint {path!r}: {cause}; {prev}"


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------

def _not_a_checkpoint(path: str, head: bytes) -> CheckpointCorruptError:
    if not head:
        what = "it is empty"
    elif head[:1] == b"\x80" or head[:2] in (b"(d", b"(l", b"}q", b"]q"):
        what = "it looks like a Python pickle; xrnn never unpickles files, since unpickling can run arbitrary code"
    elif head[:4] == b"PK\x03\x04":
        what = "it looks like a zip archive (e.g. torch.save or np.savez); xrnn reads only its own format"
    elif head.startswith(b"\x93NUMPY"):
        what = "it looks like a NumPy .npy file"
    elif MAGIC.startswith(head[:8]):
        what = f"it is only {len(head)} bytes long (truncated)"
    else:
        what = f"it starts with {head[:8]!r}, not {MAGIC!r}"
    return CheckpointCorruptError(f"{path!r} is not an xrnn checkpoint: {what}")


def _open(path: str):
    # A FIFO or device would block or stream forever: refuse anything but a
    # regular file before opening it.
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path!r} does not exist ({e.strerror})") from e
    except OSError as e:
        raise CheckpointError(f"cannot open checkpoint {path!r}: {e.strerror or e}") from e
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"checkpoint {path!r} is a directory; give the checkpoint file inside it")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"checkpoint {path!r} is not a regular file (a pipe or device?)")
    try:
        f = open(path, "rb")
        size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise CheckpointError(f"cannot open checkpoint {path!r}: {e.strerror or e}") from e
    return f, size


@contextlib.contextmanager
def _reading(path: str):
    """Open ``path``; an OSError while reading (EIO, ...) becomes a CheckpointError."""
    f, size = _open(path)
    try:
        with f:
            yield f, size
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {e.strerror or e}") from e


# The readers below run inside _reading, which turns an OSError into a CheckpointError.

def _read_exact(f, n: int, path: str, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise CheckpointCorruptError(f"checkpoint {path!r} is truncated: {what} ends past the end of the file")
    return data


def _verify_digest(f, size: int, path: str) -> None:
    """Stream the SHA-256 of everything but the last 32 bytes and compare."""
    h = hashlib.sha256()
    f.seek(0)
    remaining = size - _DIGEST_LEN
    buf = bytearray(min(_CHUNK, max(remaining, 1)))
    view = memoryview(buf)
    while remaining > 0:
        n = f.readinto(view[: min(len(buf), remaining)])
        if not n:
            raise CheckpointCorruptError(f"checkpoint {path!r} shrank while it was being read")
        h.update(view[:n])
        remaining -= n
    stored = f.read(_DIGEST_LEN)
    if stored != h.digest():
        raise CheckpointCorruptError(
            f"checkpoint {path!r} is damaged: its SHA-256 checksum does not match its contents "
            "(truncated by an interrupted copy, or modified); use an earlier checkpoint"
        )


def _read_header(f, size: int, path: str, verify: bool) -> tuple[dict, int, int]:
    """Check prefix, checksum and header; return (header, data start, data length)."""
    head = f.read(_PREFIX_LEN)
    if len(head) < 8 or head[:8] != MAGIC:
        raise _not_a_checkpoint(path, head)
    if size < _PREFIX_LEN + _DIGEST_LEN:
        raise CheckpointCorruptError(
            f"checkpoint {path!r} is truncated: {size} bytes, shorter than the smallest possible checkpoint "
            f"({_PREFIX_LEN + _DIGEST_LEN} bytes)"
        )
    _, version, hlen = _PREFIX.unpack(head)
    if verify:
        try:
            _verify_digest(f, size, path)
        except CheckpointCorruptError as e:
            if version > FORMAT_VERSION:
                raise CheckpointCorruptError(
                    f"{e}. (Its version field says format {version}; this xrnn reads format "
                    f"{FORMAT_VERSION}. If a newer xrnn wrote it, upgrade xrnn: pip install -U xrnn-array)"
                ) from None
            raise
    if version > FORMAT_VERSION:
        raise CheckpointVersionError(
            f"checkpoint {path!r} has format version {version}, written by a newer xrnn; this xrnn "
            f"({_xrnn_version()}) reads format versions up to {FORMAT_VERSION}: "
            "upgrade xrnn (pip install -U xrnn-array)"
        )
    if version == 0:
        raise CheckpointCorruptError(f"checkpoint {path!r} declares format version 0, which does not exist")
    if hlen > size - _PREFIX_LEN - _DIGEST_LEN:
        raise CheckpointCorruptError(
            f"checkpoint {path!r} declares a {hlen}-byte header but the file has only {size} bytes"
        )
    if hlen > _MAX_HEADER:
        raise CheckpointCorruptError(
            f"checkpoint {path!r} declares a {hlen}-byte header, more than the {_MAX_HEADER}-byte limit"
        )
    data_start = _align(_PREFIX_LEN + hlen)
    data_len = size - _DIGEST_LEN - data_start
    if data_len < 0:
        raise CheckpointCorruptError(f"checkpoint {path!r} is truncated: it ends inside the header padding")
    f.seek(_PREFIX_LEN)
    raw = _read_exact(f, hlen, path, "the header")
    _check_header_cost(raw, size, path)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointCorruptError(f"checkpoint {path!r} has a malformed header: {type(e).__name__}: {e}") from None
    _check_header(header, version, path)
    return header, data_start, data_len


def _check_header_cost(raw: bytes, size: int, path: str) -> None:
    """Refuse a header whose parsed form would cost far more memory than the file's size, or that
    nests deeper than any real one, before :func:`json.loads` builds it.

    Counts commas and opening brackets in the raw text, strings included: an upper bound on the
    number of values that costs no memory (a real header has few of them inside its strings).
    """
    opening = raw.count(b"[") + raw.count(b"{")
    values = raw.count(b",") + opening + 1
    cost = values * _BYTES_PER_VALUE + len(raw)
    allowed = max(_HEADER_COST_FLOOR, _HEADER_COST_FACTOR * size)
    if cost > allowed:
        raise CheckpointCorruptError(
            f"checkpoint {path!r} has a header of up to {values:,} JSON values in {len(raw):,} bytes, which "
            f"would take about {format_bytes(cost)} of memory to read, more than the file's size allows "
            f"({format_bytes(allowed)}); the header is forged or damaged"
        )
    if opening > _MAX_DEPTH:  # only then can it nest too deep
        _check_depth(raw, path)


def _check_depth(raw: bytes, path: str) -> None:
    """The nesting depth of JSON text, measured on its brackets alone without building anything
    (brackets inside strings count too: an upper bound)."""
    depth = deepest = 0
    for c in raw.translate(None, _NOT_BRACKETS):
        if c in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > _MAX_DEPTH:
                    raise CheckpointCorruptError(
                        f"checkpoint {path!r} has a header nested more than {_MAX_DEPTH} levels deep; "
                        "the header is forged or damaged"
                    )
        else:
            depth = max(depth - 1, 0)


_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _bad(path: str, what: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(f"checkpoint {path!r} has an invalid header: {what}")


def _is_int(x: Any) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_header(header: Any, version: int, path: str) -> None:
    if not isinstance(header, dict):
        raise _bad(path, f"expected a JSON object, got {type(header).__name__}")
    if header.get("format") != version:
        raise _bad(path, f"format {header.get('format')!r} disagrees with the version field {version}")
    if not isinstance(header.get("kind"), str) or not header["kind"]:
        raise _bad(path, "'kind' must be a non-empty string")
    if not isinstance(header.get("xrnn_version", ""), str):
        raise _bad(path, "'xrnn_version' must be a string")
    if not isinstance(header.get("meta"), dict):
        raise _bad(path, "'meta' must be a JSON object")
    if not isinstance(header.get("tensors"), dict):
        raise _bad(path, "'tensors' must be a JSON object")


def _tensor_table(header: dict, data_len: int, path: str) -> dict:
    """Validate every tensor entry against the data region; nothing is allocated here."""
    table = {}
    spans = []
    end = 0
    for name, e in header["tensors"].items():
        where = f"tensor {name!r}"
        if not isinstance(e, dict):
            raise _bad(path, f"{where}: entry must be an object")
        dt = e.get("dtype")
        if dt not in TENSOR_DTYPES:
            raise _bad(path, f"{where}: dtype {dt!r} is not one of {', '.join(TENSOR_DTYPES)}")
        shape = e.get("shape")
        if not isinstance(shape, list) or len(shape) > _MAX_NDIM or not all(_is_int(s) and s >= 0 for s in shape):
            raise _bad(path, f"{where}: shape must be a list of at most {_MAX_NDIM} non-negative integers, "
                             f"got {shape!r}"[:300])
        offset, nbytes = e.get("offset"), e.get("nbytes")
        if not (_is_int(offset) and offset >= 0 and _is_int(nbytes) and nbytes >= 0):
            raise _bad(path, f"{where}: offset and nbytes must be non-negative integers")
        itemsize = np.dtype(dt).itemsize
        if math.prod(s for s in shape if s) * itemsize > _MAX_NBYTES:
            raise _bad(path, f"{where}: shape {shape} is impossibly large")
        if math.prod(shape) * itemsize != nbytes:
            raise _bad(path, f"{where}: shape {shape} of {dt} needs {math.prod(shape) * itemsize} bytes, "
                             f"the entry says {nbytes}")
        if offset + nbytes > data_len:
            raise CheckpointCorruptError(
                f"checkpoint {path!r}: tensor {name!r} ({nbytes} bytes at data offset {offset}) extends past "
                f"the end of the data region ({data_len} bytes); the file is truncated or the header is forged"
            )
        table[name] = (dt, tuple(shape), offset, nbytes)
        end = max(end, offset + nbytes)  # the writer pads up to every offset, empty tensors' included
        if nbytes:
            spans.append((offset, offset + nbytes, name))
    spans.sort()
    for (_, a1, an), (b0, _, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise _bad(path, f"tensors {an!r} and {bn!r} overlap")
    if end != data_len:  # the writer leaves no bytes after the last tensor
        raise CheckpointCorruptError(
            f"checkpoint {path!r}: its tensors end at data byte {end:,} but its data region holds {data_len:,} "
            "bytes; the declared sizes disagree with the file's size (forged or damaged)"
        )
    return table


def _check_entry_count(header: dict, path: str) -> None:
    """Refuse more tensor entries than the declared object can have (see :func:`register_tensor_limit`)."""
    n = len(header["tensors"])
    if n <= 64:
        return
    _register_builtin(header["kind"])
    limit_of = _TENSOR_LIMITS.get(header["kind"])
    if limit_of is None:
        return
    try:
        limit = limit_of(header["meta"])
    except Exception:  # a malformed meta is reported by the loader, which reads it properly
        return
    if limit is not None and n > limit:
        raise CheckpointCorruptError(
            f"checkpoint {path!r} declares {n:,} tensors, but the {header['kind']!r} it describes can have at "
            f"most {limit:,}; the header is forged or damaged"
        )


def _read_tensors(f, table: dict, data_start: int, path: str) -> dict:
    out = {}
    for name, (dt, shape, offset, nbytes) in table.items():
        a = np.empty(shape, dtype=np.dtype(dt).newbyteorder("<"))
        if nbytes:
            f.seek(data_start + offset)
            view = a.reshape(-1).view(np.uint8).data  # a writable memoryview of a's bytes
            got = 0
            while got < nbytes:
                n = f.readinto(view[got:])
                if not n:
                    raise CheckpointCorruptError(f"checkpoint {path!r} shrank while tensor {name!r} was read")
                got += n
        if dt == "bool" and nbytes and bool(np.any(a.reshape(-1).view(np.uint8) > 1)):
            raise CheckpointCorruptError(f"checkpoint {path!r}: bool tensor {name!r} holds bytes other than 0 and 1")
        if not a.dtype.isnative:
            a = a.astype(a.dtype.newbyteorder("="))
        out[name] = a
    return out


def read_container(path: str | os.PathLike) -> Container:
    """Read and verify a checkpoint file; tensors come back as host NumPy arrays.

    Order of checks: magic, size, SHA-256 over the whole file, version,
    header bounds, JSON, every tensor entry (dtype, shape, size, bounds,
    overlaps) — all before any tensor memory is allocated.

    Raises:
        CheckpointError: the file cannot be opened (OSError chained).
        CheckpointCorruptError: not a checkpoint, truncated, tampered, malformed.
        CheckpointVersionError: written by a newer format version.
    """
    path = os.fspath(path)
    with _reading(path) as (f, size):
        header, data_start, data_len = _read_header(f, size, path, verify=True)
        _check_entry_count(header, path)
        table = _tensor_table(header, data_len, path)
        tensors = _read_tensors(f, table, data_start, path)
    return Container(
        kind=header["kind"],
        meta=header["meta"],
        tensors=tensors,
        format_version=header["format"],
        xrnn_version=header.get("xrnn_version", "unknown"),
        path=path,
    )


def peek(path: str | os.PathLike, verify: bool = True) -> CheckpointInfo:
    """A checkpoint's kind, meta and tensor table without loading tensor data.

    With ``verify`` (default) the whole file is checksummed first, so a
    damaged file is reported here too; ``verify=False`` reads only the
    header (fast for huge files). Raises as :func:`read_container`.
    """
    path = os.fspath(path)
    with _reading(path) as (f, size):
        header, _, data_len = _read_header(f, size, path, verify=verify)
        _check_entry_count(header, path)
        table = _tensor_table(header, data_len, path)
    return CheckpointInfo(
        kind=header["kind"],
        meta=header["meta"],
        tensors={k: TensorInfo(dt, shape, nb) for k, (dt, shape, _, nb) in table.items()},
        format_version=header["format"],
        xrnn_version=header.get("xrnn_version", "unknown"),
        path=path,
        file_size=size,
        checksum_ok=verify,
    )


# ---------------------------------------------------------------------------
# the object level: registry, save, load
# ---------------------------------------------------------------------------

Loader = Callable[[dict, dict, Device], Any]
_LOADERS: dict[str, Loader] = {}
_TENSOR_LIMITS: dict[str, Callable[[dict], Any]] = {}

#: the kinds xrnn itself defines, and the module that registers each one's loader and tensor limit
#: when it is imported; ``import xrnn`` imports submodules only on first use, so :func:`load`,
#: :func:`read_container` and :func:`registered_kinds` import the module when the kind comes up
_BUILTIN_KINDS = {"xrnn.CharLM": "xrnn.models", "xrnn.Trainer": "xrnn.train", "xrnn.Sequential": "xrnn.sequential"}


def _register_builtin(kind: Any) -> None:
    """Import the xrnn module that registers ``kind`` if it is one of xrnn's own and not registered yet."""
    module = _BUILTIN_KINDS.get(kind) if isinstance(kind, str) else None
    if module is not None and kind not in _LOADERS:
        import importlib

        importlib.import_module(module)


def register_tensor_limit(kind: str, limit: Callable[[dict], Any]) -> None:
    """Bound the number of tensors a file of ``kind`` may declare: ``limit(meta)`` returns the most
    the object its meta describes can have (or None: no bound). Checked before any tensor is read,
    so a header listing myriad empty tensors is refused instead of costing memory for each."""
    if not callable(limit):
        raise ConfigError(f"tensor limit for kind {kind!r} must be callable, got {type(limit).__name__}")
    _TENSOR_LIMITS[kind] = limit


def register_kind(kind: str, loader: Loader, *, replace: bool = False) -> None:
    """Teach :func:`load` to rebuild objects of ``kind``.

    ``loader(meta, tensors, device)`` gets the saved meta dict, the tensors as
    host NumPy arrays and a resolved :class:`~xrnn.Device`, and returns the
    object. Registering a kind twice with a different loader raises
    ConfigError unless ``replace=True`` (re-registering the same loader, as a
    module reload does, is fine).
    """
    if not isinstance(kind, str) or not kind:
        raise ConfigError(f"checkpoint kind must be a non-empty str, got {kind!r}")
    if not callable(loader):
        raise ConfigError(f"loader for kind {kind!r} must be callable, got {type(loader).__name__}")
    old = _LOADERS.get(kind)
    same = old is not None and (old is loader or _loader_id(old) == _loader_id(loader))
    if old is not None and not same and not replace:
        raise ConfigError(f"checkpoint kind {kind!r} is already registered (by {old!r}); pass replace=True")
    _LOADERS[kind] = loader


def _loader_id(fn) -> tuple:
    return (getattr(fn, "__module__", None), getattr(fn, "__qualname__", None))


def registered_kinds() -> list[str]:
    """Kinds :func:`load` can rebuild now, sorted (xrnn's own kinds always among them)."""
    for kind in _BUILTIN_KINDS:
        _register_builtin(kind)
    return sorted(_LOADERS)


def save(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` (a model or trainer) to ``path`` as one atomic, self-checking file.

    ``obj`` must follow the checkpoint protocol: a ``checkpoint_kind`` str and
    a ``checkpoint_state()`` method returning ``(meta, tensors)``.

    Raises:
        ConfigError: ``obj`` is not saveable, or its meta is not JSON-able.
        DTypeError: a tensor has a dtype checkpoints do not hold.
        SaveError: the file could not be written; the previous one is untouched.
    """
    kind = getattr(obj, "checkpoint_kind", None)
    state = getattr(obj, "checkpoint_state", None)
    if not isinstance(kind, str) or not callable(state):
        raise ConfigError(
            f"xrnn.save() takes a model or trainer (an object with checkpoint_kind and "
            f"checkpoint_state()); got a {type(obj).__name__}"
        )
    result = state()
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ConfigError(f"{type(obj).__name__}.checkpoint_state() must return (meta, tensors)")
    meta, tensors = result
    write_container(path, kind, meta, tensors)


def _kind_names(kind) -> tuple:
    if kind is None:
        return ()
    if isinstance(kind, str):
        return (kind,)
    return tuple(kind)


_LOAD_OOM_HINT = "load it on another device (device='cpu', --device cpu), or free memory on this one"


def _tensor_bytes(tensors: Mapping) -> str:
    return f"{len(tensors)} tensors, {format_bytes(sum(int(a.nbytes) for a in tensors.values()))}"


#: tensors that may hold NaN legitimately (a run's loss records), by name prefix
_RECORD_PREFIXES = ("history/",)


def nonfinite_tensors(tensors: Mapping) -> list[str]:
    """Names of the floating tensors (weights, optimizer state, carried state) holding NaN or infinity.

    Loss records (``history/...``) are not weights and may hold NaN; they are skipped.
    """
    out = []
    for name, a in tensors.items():
        if name.startswith(_RECORD_PREFIXES) or a.dtype.kind != "f" or not a.size:
            continue
        if not np.isfinite(a).all():
            out.append(name)
    return out


def check_finite(c: Container, allow_nonfinite: bool = False) -> Container:
    """``c`` itself when its weights are all finite (or ``allow_nonfinite``); else CheckpointCorruptError.

    A checkpoint with NaN/inf weights can only come from a diverged run or a
    forged file; loading it would train or sample garbage. ``allow_nonfinite``
    is the explicit override for inspecting such a file.
    """
    if allow_nonfinite:
        return c
    bad = nonfinite_tensors(c.tensors)
    if bad:
        raise CheckpointCorruptError(
            f"checkpoint {c.path!r} holds non-finite weights (NaN or infinity in {', '.join(bad[:4])}"
            f"{' and more' if len(bad) > 4 else ''}), so it is not a usable model; use an earlier checkpoint, "
            "or pass allow_nonfinite=True (--allow-nonfinite) to load it anyway for inspection"
        )
    return c


def load(path: str | os.PathLike, device: Any = "cpu", kind: str | Iterable[str] | None = None, *,
         allow_nonfinite: bool = False) -> Any:
    """Rebuild the object saved in ``path`` on ``device`` (any backend, whatever wrote it).

    Args:
        path: a file written by :func:`save`.
        device: where the arrays go (``"cpu"``, ``"cuda:0"``, ...); resolved
            before the file is read, so a missing GPU fails fast.
        kind: expected kind(s); None accepts any registered kind.
        allow_nonfinite: load a file whose weights hold NaN or infinity
            (refused by default; for inspecting a diverged run).

    Raises:
        BackendUnavailableError / DeviceError: ``device`` cannot be used.
        CheckpointError and subclasses: see the module docstring.
        CheckpointCorruptError: also for non-finite weights (unless ``allow_nonfinite``).
        CheckpointKindError: the kind differs from ``kind`` or is not registered.
    """
    dev = resolve_device(device)
    c = check_finite(read_container(path), allow_nonfinite)
    wanted = _kind_names(kind)
    if wanted and c.kind not in wanted:
        raise CheckpointKindError(
            f"checkpoint {c.path!r} holds a {c.kind!r}, expected " + " or ".join(repr(k) for k in wanted)
        )
    _register_builtin(c.kind)
    loader = _LOADERS.get(c.kind)
    if loader is None:
        known = ", ".join(repr(k) for k in registered_kinds()) or "none"
        raise CheckpointKindError(
            f"checkpoint {c.path!r} holds a {c.kind!r}, which this xrnn cannot rebuild (known kinds: {known}); "
            "import the module that defines it, or upgrade xrnn"
        )
    try:
        with oom_guard(dev, f"loading checkpoint {c.path!r}", _tensor_bytes(c.tensors), _LOAD_OOM_HINT):
            return loader(c.meta, c.tensors, dev)
    except (CheckpointError, DeviceError, DeviceMemoryError, MemoryError):
        raise
    except (XRNNError, KeyError, IndexError, TypeError, ValueError, AttributeError, ArithmeticError) as e:
        raise CheckpointCorruptError(
            f"checkpoint {c.path!r} does not describe a valid {c.kind!r}: {type(e).__name__}: {e}"
        ) from e
