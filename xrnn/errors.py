"""The exceptions xrnn raises on purpose.

Every error that xrnn raises because of something the caller passed in, a
file it was asked to read, or a fault it detected during training is an
instance of :class:`XRNNError`, and also of the built-in exception that fits
(``ValueError``, ``TypeError``, ``RuntimeError``, ...), so code that already
catches the built-in keeps working::

    XRNNError
    ├── ConfigError (ValueError)            bad sizes, rates, temperature/top-k/top-p, names of cells/optimizers
    ├── ShapeError (ValueError)             wrong rank, feature size, batch, state shape; ids outside [0, V)
    ├── DTypeError (TypeError)              integer/complex/mismatched float inputs, float token ids
    ├── DeviceError (ValueError)            unknown device strings, arrays on another device or library
    │   └── BackendUnavailableError (RuntimeError)   e.g. "cuda" without CuPy or a GPU
    ├── NonFiniteError (FloatingPointError) NaN/inf in inputs or in the loss
    ├── StateError (RuntimeError)           backward without forward, and similar misuse
    ├── DataError (ValueError)              corpus files: missing, empty, binary, not UTF-8, too short
    │   └── VocabularyError                 characters/words outside the vocabulary
    ├── CheckpointError (ValueError)        unreadable checkpoints (missing, a directory, I/O errors)
    │   ├── CheckpointCorruptError          truncated, tampered, forged, not a checkpoint (e.g. a pickle)
    │   ├── CheckpointVersionError          written by a newer xrnn
    │   └── CheckpointKindError             holds another kind of model
    ├── SaveError (OSError)                 a checkpoint could not be written (old one kept)
    ├── DeviceMemoryError (MemoryError)     the device ran out of memory (sizes and a hint in the message)
    └── DistributedError (RuntimeError)     a rank or the transport failed

Messages say what was wrong, what was expected, and where possible how to
fix it. The ``xrnn`` command prints any of them as one line ``xrnn: error:
...`` and exits with status 2 (``--debug`` shows the traceback instead).

Where they come from:

* Checks of arguments, shapes, dtypes and devices run on every call.
  Checks for NaN/inf cost a pass over the data or a host read, so they run
  where they protect the weights, on by default (``check_finite=True``):
  ``Trainer``/``xrnn.train`` read the loss and gradient norm of every step
  before applying it, ``Sequential.fit`` scans its float inputs and targets
  once before training. Raw layer calls never check.
* :class:`DeviceMemoryError` wraps the backend's own out-of-memory error
  (NumPy's ``MemoryError``, CuPy's ``OutOfMemoryError``, PyTorch's
  ``torch.OutOfMemoryError``), which stays available as ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "XRNNError",
    "ConfigError",
    "ShapeError",
    "DTypeError",
    "DeviceError",
    "BackendUnavailableError",
    "NonFiniteError",
    "StateError",
    "DataError",
    "VocabularyError",
    "CheckpointError",
    "CheckpointCorruptError",
    "CheckpointVersionError",
    "CheckpointKindError",
    "SaveError",
    "DeviceMemoryError",
    "DistributedError",
]


class XRNNError(Exception):
    """Base class of every error xrnn raises on purpose."""


class ConfigError(XRNNError, ValueError):
    """A hyperparameter or option has a value outside its allowed range."""


class ShapeError(XRNNError, ValueError):
    """An array has the wrong rank or size for where it was passed."""


class DTypeError(XRNNError, TypeError):
    """An array has a dtype the operation cannot take."""


class DeviceError(XRNNError, ValueError):
    """An unknown device, or an array on another device/library than expected."""


class BackendUnavailableError(DeviceError, RuntimeError):
    """The requested backend (library or GPU) is not available on this machine."""


class NonFiniteError(XRNNError, FloatingPointError):
    """NaN or infinity found in inputs, gradients or the loss."""


class StateError(XRNNError, RuntimeError):
    """An object was used out of order (e.g. backward before forward)."""


class DataError(XRNNError, ValueError):
    """A corpus or dataset cannot be used as given."""


class VocabularyError(DataError):
    """Text contains symbols outside the model's vocabulary."""


class CheckpointError(XRNNError, ValueError):
    """A checkpoint file cannot be read."""


class CheckpointCorruptError(CheckpointError):
    """The file is truncated, tampered with, or not an xrnn checkpoint."""


class CheckpointVersionError(CheckpointError):
    """The checkpoint was written by a newer format version than this xrnn reads."""


class CheckpointKindError(CheckpointError):
    """The checkpoint holds a different kind of model than was asked for."""


class SaveError(XRNNError, OSError):
    """A checkpoint could not be written; any previous file is left intact."""


class DeviceMemoryError(XRNNError, MemoryError):
    """The device ran out of memory; the message names the sizes that failed."""


class DistributedError(XRNNError, RuntimeError):
    """Another rank failed, or a collective operation timed out."""


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """``n`` and the noun in the right number, for messages: ``plural(1, "character")`` is
    ``"1 character"``, ``plural(1200, "token")`` is ``"1,200 tokens"``; ``nouns`` for an
    irregular plural."""
    return f"{n:,} {noun if n == 1 else (nouns or noun + 's')}"
