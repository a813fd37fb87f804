"""xrnn: recurrent neural networks with exact hand-written BPTT on any Array API backend.

The same model, optimizer, training loop and sampler run on NumPy (``device="cpu"``)
or CuPy (``device="cuda"``), chosen by one ``device=`` argument.
"""

from . import callbacks, distributed, errors, functional, keras_optim, layers, losses, optim
from ._version import __version__
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
