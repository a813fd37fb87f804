"""The defaults of a training run, in a module of their own so that ``xrnn``'s command-line
parser can show them without importing the training code (see :data:`xrnn.train.DEFAULTS`)."""

from __future__ import annotations

from typing import Any

#: defaults of :class:`xrnn.Trainer`, :func:`xrnn.train` and ``xrnn train``: char-rnn's
#: model (a 2-layer LSTM of 128 units, one-hot input, 50 streams x 50 steps,
#: clipping at 5) with Adam at 4e-3 (twice char-rnn's rate: on the shipped
#: corpus it reaches in 1000 steps the validation loss 2e-3 reaches in 2000)
#: and a budget of 2000 steps: a few minutes on a laptop CPU, ending near
#: 1.73 nats (2.5 bits) per character with text that has speaker names,
#: verse lines and mostly real words.
DEFAULTS: dict[str, Any] = {
    "model": "lstm",
    "hidden_size": 128,
    "num_layers": 2,
    "embedding_dim": None,
    "dropout": 0.0,
    "dtype": "float32",
    "batch_size": 50,
    "seq_len": 50,
    "optimizer": "adam",
    "lr": 4e-3,
    "clip": 5.0,
    "clip_value": None,
    "val_fraction": 0.05,
    "seed": 1337,
    "steps": 2000,
    "eval_every": 250,
    "sample_every": 500,
    "save_every": 250,
    "log_every": 10,
    "level": "char",
}
