"""xrnn: recurrent neural networks with exact hand-written BPTT on any Array API backend.

The same model, optimizer, training loop and sampler run on NumPy (``device="cpu"``)
or CuPy (``device="cuda"``), chosen by one ``device=`` argument.

Submodules load on first use (PEP 562): ``import xrnn`` reads only this file and
``_version``; ``xrnn.LSTM``, ``from xrnn import train`` or ``xrnn.layers`` import the
module that defines the name then, so ``xrnn sample`` does not pay for training, Keras
or MPI code it never runs. Every name in ``__all__`` is the defining module's own object.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on first use
    from . import callbacks, distributed, errors, functional, keras_optim, layers, losses, optim
    from .backend import (
        Device,
        assert_finite,
        auto_device,
        available_devices,
        oom_guard,
        resolve_device,
        to_device,
        to_numpy,
    )
    from .checkpoint import load, peek, register_kind, save
    from .data import Corpus, StreamBatcher, Vocabulary, default_corpus_path, read_corpus, split
    from .functional import softmax_cross_entropy
    from .keras_io import load_keras
    from .models import CharLM
    from .modules import (
        GRU,
        LSTM,
        RNN,
        Embedding,
        GRUCell,
        Linear,
        LSTMCell,
        Module,
        RNNCell,
        no_grad,
    )
    from .optim import clip_grad_norm, clip_grad_value
    from .sampling import draw, generate, sample
    from .segments import pad_sequences
    from .sequential import History, Sequential
    from .train import Trainer, init_from_checkpoint, load_model, train

__all__ = [
    "__version__",
    # submodules
    "errors",
    "distributed",
    "functional",
    "optim",
    "layers",
    "losses",
    "keras_optim",
    "callbacks",
    # devices
    "Device",
    "available_devices",
    "resolve_device",
    "auto_device",
    "to_device",
    "to_numpy",
    "assert_finite",
    "oom_guard",
    # layers
    "Module",
    "no_grad",
    "RNN",
    "LSTM",
    "GRU",
    "RNNCell",
    "LSTMCell",
    "GRUCell",
    "Linear",
    "Embedding",
    "softmax_cross_entropy",
    "pad_sequences",
    # language models
    "CharLM",
    "sample",
    "generate",
    "draw",
    # training
    "Trainer",
    "train",
    "init_from_checkpoint",
    "clip_grad_norm",
    "clip_grad_value",
    # data
    "Vocabulary",
    "Corpus",
    "read_corpus",
    "default_corpus_path",
    "split",
    "StreamBatcher",
    # Keras-style models (layers live in xrnn.layers)
    "Sequential",
    "load_model",
    "History",
    "load_keras",
    # checkpoints
    "save",
    "load",
    "peek",
    "register_kind",
]

#: submodules that load on first access as ``xrnn.<name>`` (``xrnn.train`` is the function, see _Package)
_SUBMODULES = frozenset({"backend", "callbacks", "checkpoint", "cli", "data", "distributed", "errors", "functional",
                         "gradcheck", "keras_io", "keras_optim", "kernels", "layers", "losses", "models", "modules",
                         "optim", "rundir", "sampling", "segments", "sequential", "threads"})
#: the module that defines each public name of ``__all__`` that is not a submodule
_ORIGIN: dict[str, str] = {}
for _module, _names in {
    "backend": ("Device", "available_devices", "resolve_device", "auto_device", "to_device", "to_numpy",
                "assert_finite", "oom_guard"),
    "modules": ("Module", "no_grad", "RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell", "Linear", "Embedding"),
    "functional": ("softmax_cross_entropy",),
    "segments": ("pad_sequences",),
    "models": ("CharLM",),
    "sampling": ("sample", "generate", "draw"),
    "train": ("Trainer", "train", "init_from_checkpoint", "load_model"),
    "optim": ("clip_grad_norm", "clip_grad_value"),
    "data": ("Vocabulary", "Corpus", "read_corpus", "default_corpus_path", "split", "StreamBatcher"),
    "sequential": ("Sequential", "History"),
    "keras_io": ("load_keras",),
    "checkpoint": ("save", "load", "peek", "register_kind"),
}.items():
    _ORIGIN.update(dict.fromkeys(_names, _module))
del _module, _names


def _import_on_first_use(name: str) -> Any:
    """The module ``__getattr__`` (PEP 562): import the module that defines the public ``name``."""
    if name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    elif name in _ORIGIN:
        value = getattr(importlib.import_module(f"{__name__}.{_ORIGIN[name]}"), name)
    else:
        raise AttributeError(f"module 'xrnn' has no attribute {name!r} (its public names are listed in "
                             "xrnn.__all__)")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)


if not TYPE_CHECKING:  # type checkers see the names imported above, and report any other as missing
    __getattr__ = _import_on_first_use


class _Package(types.ModuleType):
    """The ``xrnn`` module object: it keeps ``xrnn.train`` the function.

    Loading the submodule ``xrnn.train`` makes the import system set the package's attribute
    ``train`` to that submodule; the public ``xrnn.train`` is the function of the same name
    (as it was when this file imported everything eagerly), so that attribute gets the function.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _ORIGIN:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
