"""xrnn: recurrent neural networks with exact hand-written BPTT on any Array API backend.

The same model, optimizer, training loop and sampler run on NumPy (``device="cpu"``)
or CuPy (``device="cuda"``), chosen by one ``device=`` argument.
"""

from . import errors, functional
from .backend import Device, available_devices, resolve_device, to_device, to_numpy
from .functional import softmax_cross_entropy
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

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "errors",
    "functional",
    "Device",
    "available_devices",
    "resolve_device",
    "to_device",
    "to_numpy",
    "softmax_cross_entropy",
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
]
