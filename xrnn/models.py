"""Ready-made models: :class:`CharLM`, a character- (or word-) level language model.

``CharLM`` is char-rnn's model written with :mod:`xrnn.modules`: token ids go
in as one-hot vectors (char-rnn) or through an :class:`~xrnn.modules.Embedding`,
through a stack of RNN/LSTM/GRU layers, then a :class:`~xrnn.modules.Linear`
head gives next-token logits. Its children are named ``embedding`` (only when
``embedding_dim`` is set), ``rnn`` and ``head``, so the state dict has
PyTorch's names::

    embedding.weight                                    (V, E)
    rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0, ...
    head.weight                                         (V, H)
    head.bias                                           (V,)

and loads into ``torch.nn.Embedding`` + ``torch.nn.LSTM`` + ``torch.nn.Linear``
after stripping the prefixes.

Word-level models (Denny Britz's RNNLM: the N most frequent words plus an
unknown token) are the same model with a word vocabulary; give them an
``embedding_dim``, since a one-hot input of a large vocabulary costs a
``(T*B, V) @ (V, G*H)`` product per layer-0 projection.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from . import functional as F
from ._typing import Array
from .backend import dtype_name, format_bytes, host_rng, oom_guard, resolve_device, to_numpy
from .backend import int_shape as _shape
from .data import Vocabulary
from .errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointKindError,
    ConfigError,
    DTypeError,
    ShapeError,
    StateError,
    plural,
)
from .modules import (
    GRU,
    LSTM,
    RNN,
    Embedding,
    Linear,
    Module,
    _grad_enabled,
    _positive_int,
    check_ids,
    dropout_mask,
    parameter_budget,
)

__all__ = ["CharLM", "CELLS"]

#: recurrent layer class for each ``cell=`` name
CELLS = {"lstm": LSTM, "gru": GRU, "rnn": RNN}


class CharLM(Module):
    """Next-token language model: (one-hot | embedding) -> stacked RNN/LSTM/GRU -> linear head.

    Args:
        vocab_size: number of tokens V (characters, or words plus an unknown token).
        hidden_size: units per recurrent layer H.
        num_layers: stacked recurrent layers L.
        cell: ``"lstm"``, ``"gru"`` or ``"rnn"`` (Elman, tanh).
        embedding_dim: None feeds one-hot vectors (char-rnn); an int E adds an
            ``Embedding(V, E)`` in front.
        dropout: probability of zeroing a unit, in ``[0, 1)``; applied in
            training mode between recurrent layers (the recurrent layer's own
            dropout) and, as in char-rnn, on the top layer's output before the
            head. Inverted dropout: kept units are scaled by ``1/(1-p)`` so
            ``eval()`` needs no rescaling.
        device, dtype: where the parameters live and their float dtype.
        seed: int, None (fresh entropy) or a ``numpy.random.Generator``.
        vocab: optional vocabulary object (``__len__``, ``encode``, ``decode``,
            ``to_config``) kept as ``model.vocab`` for sampling and
            checkpoints; its length must equal ``vocab_size``.
        proj_size: LSTM only: project each layer's output to this many units
            (``torch.nn.LSTM(proj_size=...)``, LSTMP); the head then reads
            ``proj_size`` features. 0 (default): no projection.

    Randomness: one host generator, ``model.rng``, draws the initial weights in
    a fixed order (embedding, recurrent layers in state-dict order, head; the
    same distributions as PyTorch's defaults), so one seed gives identical
    weights on every backend; dropout masks continue from it. Checkpoints
    store its state so a resumed run draws the same masks.

    Attributes:
        config: JSON-able dict of the constructor arguments (without device,
            seed and vocab); ``CharLM(**config)`` rebuilds the architecture.
        vocab: the attached vocabulary or None.
        rng: the model's ``numpy.random.Generator``.
    """

    checkpoint_kind = "xrnn.CharLM"

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int = 256,
        num_layers: int = 2,
        cell: str = "lstm",
        embedding_dim: int | None = None,
        dropout: float = 0.0,
        device: Any = "cpu",
        dtype: Any = "float32",
        seed: Any = None,
        *,
        vocab: Any = None,
        proj_size: int = 0,
    ):
        super().__init__(device, dtype)
        self.vocab_size = _positive_int("vocab_size", vocab_size)
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        self.num_layers = _positive_int("num_layers", num_layers)
        if not isinstance(cell, str) or cell.lower() not in CELLS:
            raise ConfigError(f"cell must be one of {', '.join(repr(c) for c in CELLS)}, got {cell!r}")
        self.cell = cell.lower()
        self.embedding_dim = None if embedding_dim is None else _positive_int("embedding_dim", embedding_dim)
        try:
            p = float(dropout)
        except (TypeError, ValueError):
            raise ConfigError(f"dropout must be a number in [0, 1), got {dropout!r}") from None
        if not 0.0 <= p < 1.0:  # also rejects NaN
            raise ConfigError(f"dropout must be in [0, 1) (the probability of zeroing a unit), got {dropout!r}")
        self.dropout = p
        object.__setattr__(self, "_rng", host_rng(seed))
        dev, dt = self.device, self.dtype

        # Children draw their initial weights from the shared generator, in order.
        if self.embedding_dim is not None:
            self.add_module("embedding", Embedding(self.vocab_size, self.embedding_dim, dev, dt, seed=self._rng))
            in_size = self.embedding_dim
        else:
            in_size = self.vocab_size
        # The recurrent layer's own dropout acts between its layers only; with
        # one layer it would be a no-op (and warn), the top-output dropout below
        # still applies.
        rnn_dropout = self.dropout if self.num_layers > 1 else 0.0
        self.add_module(
            "rnn",
            CELLS[self.cell](in_size, self.hidden_size, self.num_layers, dropout=rnn_dropout,
                             device=dev, dtype=dt, seed=self._rng, proj_size=proj_size),
        )
        self.proj_size = self.rnn.proj_size
        self.add_module("head", Linear(self.rnn.output_size, self.vocab_size, device=dev, dtype=dt, seed=self._rng))
        self._cache = None
        self.vocab: Any = None
        if vocab is not None:
            self.attach_vocab(vocab)

    # -- randomness ---------------------------------------------------------
    @property
    def rng(self) -> np.random.Generator:
        """The host generator for dropout masks (shared with the recurrent layer)."""
        return self._rng

    @rng.setter
    def rng(self, value: Any) -> None:
        g = host_rng(value)
        object.__setattr__(self, "_rng", g)
        self.rnn.rng = g

    # -- description --------------------------------------------------------
    @property
    def config(self) -> dict:
        """Constructor arguments as a JSON-able dict (no device, seed or vocab)."""
        config = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "cell": self.cell,
            "embedding_dim": self.embedding_dim,
            "dropout": self.dropout,
            "dtype": self.dtype,
        }
        if self.proj_size:  # only when used: configs without it stay readable by older xrnn
            config["proj_size"] = self.proj_size
        return config

    def extra_repr(self) -> str:
        s = (f"vocab_size={self.vocab_size}, hidden_size={self.hidden_size}, "
             f"num_layers={self.num_layers}, cell={self.cell!r}")
        if self.embedding_dim is not None:
            s += f", embedding_dim={self.embedding_dim}"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        return s + ", " + super().extra_repr()

    def attach_vocab(self, vocab: Any) -> CharLM:
        """Keep ``vocab`` as ``model.vocab`` (checked against ``vocab_size``); returns self."""
        try:
            n = len(vocab)
        except TypeError:
            raise ConfigError(
                f"vocab must be a vocabulary object with a length, got a {type(vocab).__name__}"
            ) from None
        if n != self.vocab_size:
            raise ConfigError(
                f"the vocabulary has {plural(n, 'token')} but the model was built with vocab_size={self.vocab_size}; "
                f"build the model with vocab_size=len(vocab)"
            )
        self.vocab = vocab
        return self

    def _drop_cache(self) -> None:
        self._cache = None

    # -- forward / backward -------------------------------------------------
    def _check_ids(self, ids):
        self.device.check(ids, "ids")
        if not self.device.xp.isdtype(ids.dtype, "integral"):
            raise DTypeError(
                f"ids must be integer token ids, got dtype {dtype_name(ids.dtype)}; "
                "encode text with the vocabulary and pass an int32/int64 array of shape (B, T)"
            )
        if ids.ndim != 2:
            hint = " (add a batch axis: ids[None, :])" if ids.ndim == 1 else ""
            raise ShapeError(f"ids must be 2-D (B, T) = (batch, time), got shape {_shape(ids)}{hint}")
        if 0 in _shape(ids):
            raise ShapeError(f"ids has an empty axis: shape {_shape(ids)}; need at least one sequence of one step")

    def forward(self, ids: Array, state: Any = None, lengths: Any = None) -> tuple[Array, Any]:
        """Next-token logits for every position.

        Args:
            ids: (B, T) integer token ids in ``[0, vocab_size)`` on the model's device.
            state: None (zeros) or the state returned by a previous call:
                ``h`` (L, B, H) for rnn/gru, ``(h, c)`` for lstm.
            lengths: None, or the valid tokens of each row of a right-padded
                batch, (B,) integers in [1, T] (see :meth:`xrnn.LSTM.forward`):
                the recurrence never runs on padding and the returned state is
                each row's state after its own last token. Logits at padded
                positions are the head's bias; leave them out of the loss
                (``softmax_cross_entropy(..., ignore_index=...)`` with padded
                targets set to that index).
        Returns:
            ``(logits, state)``: logits (B, T, V) in the model's dtype (position
            t predicts token t+1), state the final recurrent state.

        In gradient mode (not under :func:`xrnn.no_grad`) the forward keeps
        what :meth:`backward` needs; one backward per forward.
        """
        self._check_ids(ids)
        dev = self.device
        xp = dev.xp
        B, T = _shape(ids)
        V, H = self.vocab_size, self.rnn.output_size
        with dev:
            ids_tm = xp.permute_dims(xp.astype(ids, xp.int64), (1, 0))  # (T, B)
            if self.embedding_dim is not None:
                x = self.embedding.forward(ids_tm)  # (T, B, E); checks the id range
            else:
                check_ids(dev, ids_tm, V, "ids")
                x = F.one_hot(xp, ids_tm, V, dev.dtype(self.dtype), device=dev._create_device())  # (T, B, V)
            out, state = self.rnn.forward(x, state, lengths=lengths)  # (T, B, H), zero past each length
            mask = None
            if self.dropout > 0 and self.training:
                mask = dropout_mask(dev, self._rng, (T, B, H), self.dropout, self.dtype)  # (T, B, H)
                out = out * mask
            logits = self.head.forward(xp.reshape(out, (T * B, H)))  # (T*B, V)
            logits = xp.permute_dims(xp.reshape(logits, (T, B, V)), (1, 0, 2))  # (B, T, V)
            self._cache = {"B": B, "T": T, "mask": mask} if _grad_enabled() else None
            return logits, state

    def backward(self, dlogits: Array, dstate: Any = None) -> Any:
        """Backpropagate through the last forward; parameter gradients add into ``grads``.

        Args:
            dlogits: (B, T, V) gradient of the loss with respect to the logits
                (e.g. the second result of :func:`xrnn.softmax_cross_entropy`).
            dstate: gradient of the final state forward returned (``h`` or
                ``(h, c)``, parts may be None), or None (truncated BPTT).
        Returns:
            the gradient of the initial state (``dh0`` or ``(dh0, dc0)``,
            each (L, B, H)); zeros-state gradients when forward got None.
        """
        cache = self._cache
        if cache is None:
            raise StateError(
                "CharLM.backward() needs a preceding forward() in gradient mode "
                "(one backward per forward; forwards under xrnn.no_grad() keep nothing)"
            )
        dev = self.device
        xp = dev.xp
        B, T, V, H = cache["B"], cache["T"], self.vocab_size, self.rnn.output_size
        self._check_float(dlogits, "dlogits")
        if _shape(dlogits) != (B, T, V):
            raise ShapeError(f"dlogits must have the logits' shape (B, T, V) = {(B, T, V)}, got {_shape(dlogits)}")
        self._cache = None
        with dev:
            d = xp.reshape(xp.permute_dims(dlogits, (1, 0, 2)), (T * B, V))  # (T*B, V)
            dout = xp.reshape(self.head.backward(d), (T, B, H))  # (T, B, H)
            if cache["mask"] is not None:
                dout = dout * cache["mask"]
            has_emb = self.embedding_dim is not None
            # a one-hot input needs no gradient: skip the (T*B, G*H) @ (G*H, V) product
            dx, dstate0 = self.rnn.backward(dout, dstate, input_grad=has_emb)
            if has_emb:
                self.embedding.backward(dx)  # (T, B, E)
            return dstate0

    # -- sampling (convenience) ---------------------------------------------
    def sample(self, length: int = 200, prime: str = "", **kwargs: Any) -> Any:
        """``xrnn.sampling.sample(self, length=..., prime=..., **kwargs)``."""
        from .sampling import sample

        return sample(self, length=length, prime=prime, **kwargs)

    def generate(self, length: int = 200, prime: str = "", **kwargs: Any) -> Iterator[Any]:
        """``xrnn.sampling.generate(self, ...)``: a generator of text pieces."""
        from .sampling import generate

        return generate(self, length=length, prime=prime, **kwargs)

    # -- checkpoints --------------------------------------------------------
    def checkpoint_state(self) -> tuple[dict, dict]:
        """``(meta, tensors)`` for the checkpoint layer.

        meta: JSON-able ``{"config": self.config, "vocab": vocab.to_config()
        or None, "rng_state": self.rng.bit_generator.state, "training": bool}``.
        tensors: ``{state-dict name: host NumPy array}`` (copies).
        """
        meta = {
            "config": self.config,
            "vocab": None if self.vocab is None else self.vocab.to_config(),
            "rng_state": self._rng.bit_generator.state,
            "training": bool(self.training),
        }
        tensors = {k: np.array(to_numpy(v), copy=True) for k, v in self.state_dict().items()}
        return meta, tensors

    @classmethod
    def from_checkpoint(
        cls,
        meta: dict,
        tensors: dict,
        device: Any = "cpu",
        vocab_from_config: Callable[[Any], Any] | None = None,
    ) -> CharLM:
        """Rebuild a model written by :meth:`checkpoint_state` on any device.

        ``vocab_from_config`` turns ``meta["vocab"]`` back into a vocabulary
        object; when None, ``xrnn.data.Vocabulary.from_config`` is used.

        Raises:
            CheckpointError: the config is missing or has arguments this
                version does not know.
            CheckpointCorruptError: the tensors do not match the config.
        """
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise CheckpointCorruptError("CharLM checkpoint metadata has no 'config' dict")
        config = dict(meta["config"])
        known = {"vocab_size", "hidden_size", "num_layers", "cell", "embedding_dim", "dropout", "dtype", "proj_size"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise CheckpointError(
                f"CharLM checkpoint config has arguments this xrnn does not know: {', '.join(unknown)}; "
                "it was probably written by a newer xrnn"
            )
        try:
            # the file's own tensors bound what the config may make us allocate
            # counted in elements of the dtype the model allocates: 8 MB of uint8 is 1M float64 weights, not 8M
            with parameter_budget(sum(int(np.asarray(v).nbytes) for v in tensors.values()),
                                  config.get("dtype", "float32"), "the CharLM checkpoint"):
                model = cls(**config, device=device, seed=0)
        except (ConfigError, TypeError) as e:
            raise CheckpointCorruptError(f"CharLM checkpoint config {config!r} is invalid: {e}") from None
        try:
            model.load_state_dict(tensors)
        except ShapeError as e:
            raise CheckpointCorruptError(f"CharLM checkpoint weights do not match its config: {e}") from None
        if meta.get("rng_state") is not None:
            model.rng.bit_generator.state = meta["rng_state"]
        model.train(bool(meta.get("training", True)))
        vocab_config = meta.get("vocab")
        if vocab_config is not None:
            model.attach_vocab((vocab_from_config or Vocabulary.from_config)(vocab_config))
        return model


def _load_charlm(meta: dict, tensors: dict, device) -> CharLM:
    return CharLM.from_checkpoint(meta, tensors, device)


def max_tensors(config: Any) -> int | None:
    """The most tensors a CharLM of ``config`` holds: 4 per recurrent layer, the head's 2, an embedding."""
    layers = config.get("num_layers") if isinstance(config, dict) else None
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        return None
    return 4 * layers + 3


#: the kind of a training run's checkpoint (:attr:`xrnn.Trainer.checkpoint_kind`); its ``model/``
#: tensors and ``model`` meta are a CharLM's, which :func:`load_language_model` reads without
#: importing the training code
TRAINER_KIND = "xrnn.Trainer"


def load_language_model(path: str | os.PathLike, device: Any = "cpu", *, allow_nonfinite: bool = False) -> CharLM:
    """The CharLM in a CharLM or trainer checkpoint (what ``xrnn sample`` needs).

    Reads the file once and builds only the model (no optimizer state).

    Raises:
        CheckpointKindError: the file holds something else (e.g. a Sequential).
        CheckpointCorruptError: its weights hold NaN or infinity (unless ``allow_nonfinite``).
        CheckpointError and subclasses, as :func:`xrnn.load`.
    """
    from .checkpoint import check_finite, read_container

    dev = resolve_device(device)
    c = read_container(path)
    if c.kind == CharLM.checkpoint_kind:
        meta, tensors = c.meta, c.tensors
    elif c.kind == TRAINER_KIND:
        if not isinstance(c.meta.get("model"), dict):
            raise CheckpointCorruptError(f"checkpoint {c.path!r} is a trainer checkpoint without a model section")
        meta = c.meta["model"]
        tensors = {k[len("model/"):]: v for k, v in c.tensors.items() if k.startswith("model/")}
    else:
        raise CheckpointKindError(
            f"checkpoint {c.path!r} holds a {c.kind!r}; expected a language model "
            f"({CharLM.checkpoint_kind!r}) or a training run ({TRAINER_KIND!r})"
        )
    check_finite(c, allow_nonfinite)
    try:
        with oom_guard(dev, f"loading the model of checkpoint {c.path!r}", f"{len(tensors)} tensors, "
                       f"{format_bytes(sum(int(a.nbytes) for a in tensors.values()))}",
                       "load it on another device (device='cpu', --device cpu), or free memory on this one"):
            return CharLM.from_checkpoint(meta, tensors, dev)
    except CheckpointError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, ArithmeticError) as e:
        raise CheckpointCorruptError(f"checkpoint {c.path!r} does not describe a valid model: {e}") from e


def _register() -> None:
    from .checkpoint import register_kind, register_tensor_limit

    register_kind(CharLM.checkpoint_kind, _load_charlm)
    register_tensor_limit(CharLM.checkpoint_kind, lambda meta: max_tensors(meta.get("config")))


_register()
