"""Sampling text from a language model, on the model's device.

Two layers:

* :func:`draw` is the pure, batched draw: logits ``(B, V)`` and uniform
  numbers ``u`` ``(B,)`` on the device in, token ids ``(B,)`` out, with
  temperature, top-k, top-p (nucleus) or greedy selection. It uses only
  Array API operations (``sort``, ``cumulative_sum``, comparisons and sums):
  no distribution is copied to the host.
* :func:`generate` / :func:`sample` drive a model: the prime text goes
  through the model in one forward, then one step per new token. Per step
  one tiny transfer goes to the device (the ``B`` uniform numbers, drawn by a
  seeded host ``numpy.random.Generator`` so a seed gives the same text on
  every backend) and one comes back (the ``B`` chosen ids, needed to print
  them). :func:`generate` streams the text piece by piece as it is produced.

Conventions (char-rnn's):

* the returned text starts with the prime (``include_prime=True``), as
  char-rnn prints it before the continuation; ``length`` counts the new
  tokens only;
* without a prime, the first token is drawn uniformly from the vocabulary
  with the same seeded generator (char-rnn's "no prime: uniform first
  character") and counts as the first of the ``length`` new tokens;
* ``greedy=True`` takes the most likely token at each step (ties: the lowest
  id); it is a separate flag, not ``temperature=0``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from ._typing import Array
from .backend import device_of, dtype_name, host_rng, oom_guard, resolve_device, to_numpy, trusted_ids
from .data import Vocabulary
from .errors import ConfigError, DeviceError, DTypeError, ShapeError, VocabularyError, XRNNError, plural
from .modules import inference

__all__ = ["draw", "generate", "sample", "check_sampling_options"]


# ---------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------

def check_sampling_options(temperature: Any = 1.0, top_k: Any = None, top_p: Any = None,
                           greedy: bool = False) -> tuple[float, int | None, float | None, bool]:
    """Validate sampling options; returns ``(temperature, top_k, top_p, greedy)`` normalized.

    Raises:
        ConfigError: temperature not a finite number > 0, top_k not an
            integer >= 1, top_p outside (0, 1].
    """
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise ConfigError(f"temperature must be a number > 0, got {temperature!r}") from None
    if not (t > 0 and math.isfinite(t)):
        raise ConfigError(
            f"temperature must be a finite number > 0, got {temperature!r}; "
            "for the most likely token at every step use greedy=True"
        )
    k = None
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ConfigError(f"top_k must be an integer >= 1 (or None for no top-k filter), got {top_k!r}")
        k = int(top_k)
    p = None
    if top_p is not None:
        try:
            p = float(top_p)
        except (TypeError, ValueError):
            raise ConfigError(f"top_p must be a number in (0, 1], got {top_p!r}") from None
        if not 0.0 < p <= 1.0:  # also rejects NaN
            raise ConfigError(
                f"top_p must be in (0, 1] (the probability mass of the nucleus kept), got {top_p!r}; "
                "top_p=1 disables the filter"
            )
    return t, k, p, bool(greedy)


# ---------------------------------------------------------------------------
# the draw
# ---------------------------------------------------------------------------

def draw(logits: Array, u: Array | None = None, temperature: float = 1.0, top_k: int | None = None,
         top_p: float | None = None, greedy: bool = False) -> Array:
    """Draw one token per row from ``softmax(logits / temperature)``, filtered.

    Args:
        logits: (B, V) floating scores on any supported device.
        u: (B,) uniform numbers in [0, 1) on the same device (any float
            dtype); ignored (may be None) when ``greedy``.
        temperature: > 0; below 1 sharpens, above 1 flattens.
        top_k: keep the ``k`` largest logits of each row (all tokens tied
            with the k-th largest are kept too, so a row can keep more than
            ``k`` on exact ties). ``k >= V`` keeps everything.
        top_p: keep the smallest set of most likely tokens whose probability
            (after temperature and top-k) reaches ``top_p`` (a mass within 16
            ulps of ``top_p`` counts as reaching it, so rounding cannot add a
            token at an exact boundary); the most likely token is always kept,
            and tokens tied with the least likely kept one are kept too. 1
            keeps everything.
        greedy: return the argmax of each row (lowest id on ties); temperature,
            top-k and top-p do not change it.
    Returns:
        (B,) int64 token ids on the logits' device.

    The draw is inverse-CDF sampling on the device: ``cdf = cumulative_sum(p)``
    and the id is the number of entries with ``cdf <= u * cdf[-1]`` (at most the
    index of the last token of nonzero probability), so token j is chosen for
    ``cdf[j-1] <= u * cdf[-1] < cdf[j]`` and a token of probability 0 is never
    chosen, not even for u = 0. float16 logits are promoted to float32 for the
    arithmetic.
    """
    t, k, p_nucleus, greedy = check_sampling_options(temperature, top_k, top_p, greedy)
    dev = device_of(logits)
    xp = dev.xp
    if not xp.isdtype(logits.dtype, "real floating"):
        raise DTypeError(f"logits must be floating point, got dtype {dtype_name(logits.dtype)}")
    if logits.ndim != 2 or 0 in tuple(logits.shape):
        raise ShapeError(f"logits must be 2-D (B, V) with B, V >= 1, got shape {tuple(int(s) for s in logits.shape)}")
    B, V = (int(s) for s in logits.shape)
    with dev:
        if greedy:
            return xp.astype(xp.argmax(logits, axis=-1), xp.int64)  # (B,)
        if u is None:
            raise ShapeError("draw needs u, (B,) uniform numbers in [0, 1) on the logits' device, unless greedy=True")
        dev.check(u, "u")
        if not xp.isdtype(u.dtype, "real floating") or tuple(int(s) for s in u.shape) != (B,):
            raise ShapeError(
                f"u must be a floating (B,) = ({B},) array of uniform numbers, got shape "
                f"{tuple(int(s) for s in u.shape)} and dtype {dtype_name(u.dtype)}"
            )
        z = logits
        if dtype_name(z.dtype) == "float16":
            z = xp.astype(z, xp.float32)
        if t != 1.0:
            z = z / t  # (B, V)
        neg_inf = -math.inf
        if k is not None and k < V:
            zs = xp.sort(z, axis=-1, descending=True)  # (B, V)
            kth = zs[:, k - 1:k]  # (B, 1)
            z = xp.where(z >= kth, z, neg_inf)
        z = z - xp.max(z, axis=-1, keepdims=True)
        e = xp.exp(z)  # (B, V), 0 where masked
        if p_nucleus is not None and p_nucleus < 1.0:
            prob = e / xp.sum(e, axis=-1, keepdims=True)  # (B, V)
            ps = xp.sort(prob, axis=-1, descending=True)  # (B, V)
            # mass strictly before each sorted position; keep while it is < top_p.
            # A mass within a few ulps of top_p counts as reaching it, so that
            # rounding in softmax/cumsum does not add a token at an exact boundary.
            before = xp.cumulative_sum(ps, axis=-1, include_initial=True)[:, 0:V]  # (B, V)
            slack = 16.0 * float(xp.finfo(ps.dtype).eps)
            keep_sorted = before < p_nucleus - slack  # (B, V), position 0 always kept
            smallest = xp.min(xp.where(keep_sorted, ps, math.inf), axis=-1, keepdims=True)  # (B, 1)
            e = xp.where(prob >= smallest, e, 0.0)
        cdf = xp.cumulative_sum(e, axis=-1)  # (B, V), unnormalized
        threshold = xp.astype(u, cdf.dtype)[:, None] * cdf[:, V - 1:V]  # (B, 1)
        idx = xp.sum(xp.astype(cdf <= threshold, xp.int64), axis=-1)  # (B,)
        # the last token of nonzero weight: where a rounded-up threshold reaches the total (minimum, not
        # clip: array-api-compat's CuPy clip syncs, a boolean-mask assignment)
        last = xp.sum(xp.astype(cdf < cdf[:, V - 1:V], xp.int64), axis=-1)  # (B,)
        return xp.minimum(idx, last)  # (B,)


# ---------------------------------------------------------------------------
# driving a model
# ---------------------------------------------------------------------------

def _piece(vocab, prev: int | None, tok: int) -> str:
    """Text that token ``tok`` adds after token ``prev``.

    Decoding the pair and removing the decoding of ``prev`` keeps the
    separators a word vocabulary puts between tokens, so the pieces
    concatenate to ``vocab.decode(all ids)``.
    """
    if prev is None:
        return vocab.decode([tok])
    before = vocab.decode([prev])
    both = vocab.decode([prev, tok])
    if both.startswith(before):
        return both[len(before):]
    return vocab.decode([tok])


def _encode_prime(vocab, prime: str) -> np.ndarray:
    try:
        ids = vocab.encode(prime)
    except XRNNError:
        raise  # VocabularyError and friends already say which symbols are unknown
    except (KeyError, ValueError, IndexError) as e:
        raise VocabularyError(f"the prime text {prime!r} cannot be encoded with the model's vocabulary: {e}") from None
    ids = np.asarray(to_numpy(ids)).reshape(-1)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise VocabularyError(f"vocab.encode returned dtype {ids.dtype} for the prime; expected integer ids")
    return ids.astype(np.int64)


def _positive(name: str, value: Any, allow_zero: bool = False) -> int:
    lo = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def generate(
    model: Any,
    vocab: Any = None,
    length: int = 200,
    prime: str = "",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    seed: Any = None,
    device: Any = None,
    *,
    num_samples: int = 1,
    include_prime: bool = True,
) -> Iterator[Any]:
    """Stream text from ``model``: a generator of pieces, one per produced token.

    Args:
        model: a language model with ``forward(ids (B, T), state) -> (logits
            (B, T, V), state)`` (e.g. :class:`xrnn.models.CharLM`).
        vocab: ``encode(text) -> ids``, ``decode(ids) -> str``, ``__len__``;
            None uses ``model.vocab``.
        length: number of new tokens (>= 0).
        prime: text fed to the model first (one forward over all of it).
        temperature, top_k, top_p, greedy: see :func:`draw`.
        seed: int, None or a ``numpy.random.Generator`` for the uniform numbers.
        device: run on this device; None (default) uses the model's. A
            different device samples with a copy of the model made there
            (``checkpoint_state``/``from_checkpoint``); the model itself is
            not moved.
        num_samples: B independent samples drawn in parallel.
        include_prime: yield the (decoded) prime first, when there is one.
    Yields:
        with ``num_samples=1``, strings; otherwise tuples of B strings. The
        pieces concatenate to :func:`sample`'s result for the same arguments.

    All arguments are checked when ``generate`` is called (not at the first
    ``next``). Each model call runs under :func:`xrnn.no_grad` with the model
    in eval mode, and the previous modes are restored before each piece is
    yielded, so a half-consumed generator leaves the caller in its own mode.
    Sampling calls the model's forward, which replaces any forward cache: do
    not sample between a training forward and its backward.

    Raises:
        ConfigError: bad sampling options, lengths, or no vocabulary.
        VocabularyError: the prime contains symbols outside the vocabulary.
    """
    t, k, p, greedy = check_sampling_options(temperature, top_k, top_p, greedy)
    length = _positive("length", length, allow_zero=True)
    B = _positive("num_samples", num_samples)
    if not isinstance(prime, str):
        raise ConfigError(f"prime must be a string, got a {type(prime).__name__}")
    vocab = vocab if vocab is not None else getattr(model, "vocab", None)
    if vocab is None:
        raise ConfigError(
            "sampling needs a vocabulary to encode the prime and decode tokens: pass vocab=..., "
            "or attach one to the model (model.attach_vocab(vocab), or CharLM(..., vocab=vocab))"
        )
    V = len(vocab)
    model_v = getattr(model, "vocab_size", V)
    if V != model_v:
        raise ConfigError(
            f"the vocabulary has {plural(V, 'token')} but the model predicts {model_v}; use the model's own vocabulary"
        )
    prime_ids = _encode_prime(vocab, prime)
    if prime_ids.size and (prime_ids.min() < 0 or prime_ids.max() >= V):
        raise VocabularyError(f"vocab.encode returned ids outside [0, {V}) for the prime {prime!r}")
    if device is not None:
        dev = resolve_device(device)
        if dev != model.device:
            if not hasattr(model, "checkpoint_state"):
                raise DeviceError(
                    f"the model is on {model.device.name}; move it with model.to({dev.name!r}) to sample on {dev.name}"
                )
            meta, tensors = model.checkpoint_state()
            copy = type(model).from_checkpoint(meta, tensors, dev, vocab_from_config=lambda _c: vocab)
            model = copy
    rng = host_rng(seed)
    return _stream(model, vocab, length, prime_ids, t, k, p, greedy, rng, B, include_prime)


_OOM_HINT = ("sample fewer sequences at once (num_samples=), use a shorter prime, or sample on another device "
             "(device=..., --device cpu)")


def _sizes(model, B: int, T: int) -> str:
    return (f"{B} sequence(s) x {T} step(s), vocabulary {getattr(model, 'vocab_size', '?')}, "
            f"hidden size {getattr(model, 'hidden_size', '?')}, {getattr(model, 'dtype', '?')}")


def _stream(model, vocab, length, prime_ids, t, k, p, greedy, rng, B, include_prime):
    dev = model.device
    u_dtype = "float64" if model.dtype == "float64" else "float32"
    V = len(vocab)

    def out(pieces):
        return pieces[0] if B == 1 else tuple(pieces)

    prev: list = [None] * B
    logits = state = None
    if prime_ids.size:
        if include_prime:
            yield out([vocab.decode(prime_ids.tolist())] * B)
        ids = dev.asarray(np.tile(prime_ids, (B, 1)), dtype="int64")  # (B, P)
        # generate() range-checked the prime's ids on the host: no device read for it
        with dev, inference(model), trusted_ids(), oom_guard(dev, "sampling (the prime)",
                                                             _sizes(model, B, int(prime_ids.size)), _OOM_HINT):
            logits, state = model.forward(ids, None)  # (B, P, V)
        P = int(prime_ids.size)
        last = logits[:, P - 1, :]  # (B, V)
        prev = [int(prime_ids[-1])] * B
    # NumPy: one token per step through a prepared step (pre-transposed weights, buffers
    # allocated once), the model's arithmetic without its per-call checks and caches
    fast = None
    fast_draw: Any = None
    chars = vocab.tokens if isinstance(vocab, Vocabulary) and vocab.level == "char" else None
    if length > 1:
        from .kernels import numpy_step

        fast = numpy_step.stepper_for(model, B, state)
        if fast is not None:  # NumPy: the same draw without the Array API wrappers and checks
            fast_draw = numpy_step.draw
    for step in range(length):
        if logits is None:
            # no prime: the first token is uniform over the vocabulary
            host = rng.integers(0, V, size=B)
            tok = dev.asarray(host, dtype="int64")  # (B,)
        elif fast_draw is not None:
            u = None if greedy else rng.random(B).astype(u_dtype)  # (B,)
            host = tok = fast_draw(last, u, t, k, p, greedy)  # (B,)
        else:
            u = None if greedy else dev.asarray(rng.random(B), dtype=u_dtype)  # (B,)
            tok = draw(last, u, t, k, p, greedy)  # (B,)
            host = to_numpy(tok)  # the only device -> host copy per step
        host = np.asarray(host).reshape(-1).tolist()  # Python ints
        if chars is not None:  # a character vocabulary: each token's piece is its symbol
            pieces = [chars[i] for i in host]
        else:
            pieces = [_piece(vocab, prev[b], host[b]) for b in range(B)]
        prev = host
        if step + 1 < length and fast is not None:
            logits = last = fast(tok)  # (B, V)
        elif step + 1 < length:
            # draw() returns ids in [0, V) by construction: skip the range check's host read
            # the sizes are formatted only if memory runs out
            with dev, inference(model), trusted_ids(), oom_guard(dev, "sampling", lambda: _sizes(model, B, 1),
                                                                  _OOM_HINT):
                logits, state = model.forward(dev.xp.reshape(tok, (B, 1)), state)  # (B, 1, V)
            last = logits[:, 0, :]  # (B, V)
        yield out(pieces)


def sample(
    model: Any,
    vocab: Any = None,
    length: int = 200,
    prime: str = "",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    seed: Any = None,
    device: Any = None,
    *,
    num_samples: int = 1,
    include_prime: bool = True,
) -> Any:
    """The whole text :func:`generate` streams: a string (prime first, then
    ``length`` new tokens), or a list of ``num_samples`` strings."""
    gen = generate(model, vocab, length, prime, temperature, top_k, top_p, greedy, seed, device,
                   num_samples=num_samples, include_prime=include_prime)
    if num_samples == 1:
        return "".join(gen)
    parts: list[list[str]] = [[] for _ in range(num_samples)]
    for pieces in gen:
        for b, s in enumerate(pieces):
            parts[b].append(s)
    return ["".join(ps) for ps in parts]
