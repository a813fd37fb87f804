"""Text corpora: reading, vocabularies, train/validation split and stream batching.

The pipeline, all on the host (NumPy), before a window's ids are moved to the
device by the trainer::

    read_corpus(path) ──► Corpus(ids, vocab)         two streaming passes
    split(ids, 0.05)   ──► train ids, validation ids  contiguous, train first
    StreamBatcher(train, B, T).next_batch()
                       ──► x, y (B, T) int64           y is x shifted by one

:func:`read_corpus` reads UTF-8 text of any size in chunks: pass 1 counts
symbols, pass 2 encodes into a preallocated array of the smallest unsigned
dtype that fits the vocabulary (uint8 for up to 256 symbols), so memory is
the ids plus one chunk. Chunk boundaries never split a multi-byte character
or a word.

:class:`StreamBatcher` implements truncated BPTT the way char-rnn and
PyTorch's word_language_model do: the tokens are cut into B contiguous
streams; window ``w`` holds steps ``w*T .. w*T+T-1`` of every stream, so the
hidden state at the end of one window is the right initial state for the
next. After the last full window it wraps around and flags a new epoch.

Errors are :class:`~xrnn.errors.DataError` (missing, empty, binary, non-UTF-8
files, too little text) and :class:`~xrnn.errors.VocabularyError` (text with
symbols the vocabulary lacks), each saying what to change.
"""

from __future__ import annotations

import atexit
import codecs
import contextlib
import math
import os
import re
import stat
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from .errors import ConfigError, DataError, VocabularyError, plural

if TYPE_CHECKING:
    from pathlib import Path  # imported where used: a Vocabulary (all xrnn sample needs) does without it

__all__ = [
    "UNK",
    "Vocabulary",
    "Corpus",
    "read_corpus",
    "default_corpus_path",
    "split",
    "StreamBatcher",
    "tokenize_words",
]

#: the unknown-word token of word-level vocabularies built with ``max_vocab``.
UNK = "<unk>"

_LEVELS = ("char", "word")

# A word is a run of letters/digits with inner apostrophes ("don't", "o'er");
# every other non-space character is a token of its own; a newline is a token
# (it carries the layout of verse and dialogue); other whitespace separates.
_WORD_RE = re.compile(r"\n|\w+(?:['\u2019]\w+)*|[^\w\s]")
# decode() spacing: no space before closing punctuation or after opening.
_NO_SPACE_BEFORE = frozenset(".,;:!?)]}'\"\u2019\u201d%")
_NO_SPACE_AFTER = frozenset("([{\u2018\u201c$")


def tokenize_words(text: str) -> list[str]:
    """Split text into word-level tokens (see the module's word rules).

    >>> tokenize_words("Nay, don't go!\\nStay.")
    ['Nay', ',', "don't", 'go', '!', '\\n', 'Stay', '.']
    """
    return _WORD_RE.findall(text)


def _check_level(level: Any) -> str:
    if level not in _LEVELS:
        raise ConfigError(f"level must be 'char' or 'word', got {level!r}")
    return level


def _id_dtype(n: int) -> np.dtype:
    """The smallest unsigned dtype holding ids 0..n-1."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if n <= np.iinfo(dt).max + 1:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def _show(symbols: Iterable[str], limit: int = 8) -> str:
    symbols = list(symbols)
    shown = ", ".join(repr(s) for s in symbols[:limit])
    return shown + (f", ... ({len(symbols)} in all)" if len(symbols) > limit else "")


# ---------------------------------------------------------------------------
# vocabulary
# ---------------------------------------------------------------------------

class Vocabulary:
    """A bijection between symbols and integer ids 0..V-1.

    Args:
        tokens: the symbols in id order, unique. At ``level="char"`` each is
            one character (only ``unk`` may be longer).
        level: ``"char"`` or ``"word"`` (words as :func:`tokenize_words` makes them).
        unk: a token from ``tokens`` that stands for any symbol outside the
            vocabulary; None makes unknown symbols an error.
        lowercase: lowercase text before encoding (set when the vocabulary
            was built from lowercased text, so prompts match it).

    ``len(vocab)`` is V; ``encode`` gives int64 ids, ``decode`` text.
    """

    def __init__(self, tokens: Sequence[str], level: str = "char", unk: str | None = None, lowercase: bool = False):
        self.level = _check_level(level)
        tokens = list(tokens)
        if not tokens:
            raise DataError("a vocabulary needs at least one token")
        if not all(isinstance(t, str) and t for t in tokens):
            bad = next(t for t in tokens if not (isinstance(t, str) and t))
            raise DataError(f"vocabulary tokens must be non-empty strings, got {bad!r}")
        if len(set(tokens)) != len(tokens):
            dup = [t for t, c in Counter(tokens).items() if c > 1]
            raise DataError(f"vocabulary tokens must be unique; repeated: {_show(dup)}")
        if unk is not None and unk not in tokens:
            raise DataError(f"the unknown token {unk!r} must be one of the vocabulary's tokens")
        if level == "char":
            long = [t for t in tokens if len(t) != 1 and t != unk]
            if long:
                raise DataError(f"a character vocabulary holds single characters; got {_show(long)}")
        self._itos = tokens
        self._stoi = {t: i for i, t in enumerate(tokens)}
        self.unk = unk
        self.lowercase = bool(lowercase)
        self.unk_id = None if unk is None else self._stoi[unk]
        if level == "char":
            pairs = sorted((ord(t), i) for i, t in enumerate(tokens) if len(t) == 1 and t != unk)
            self._cps = np.array([p[0] for p in pairs], dtype=np.uint32)
            self._cp_ids = np.array([p[1] for p in pairs], dtype=np.int64)

    # -- building -------------------------------------------------------------
    @classmethod
    def build(cls, text: str, level: str = "char", max_vocab: int | None = None, lowercase: bool = False) -> Vocabulary:
        """The vocabulary of ``text`` (see :func:`read_corpus` for the rules)."""
        _check_level(level)
        if lowercase:
            text = text.lower()
        counts = _count_chars(text) if level == "char" else Counter(tokenize_words(text))
        return cls._from_counts(counts, level, max_vocab, lowercase, source="the text")

    @classmethod
    def _from_counts(cls, counts: Counter, level: str, max_vocab, lowercase: bool, source: str) -> Vocabulary:
        if level == "char":
            if max_vocab is not None:
                raise ConfigError("max_vocab applies to level='word'; a character vocabulary keeps every character")
            if not counts:
                raise DataError(f"{source} contains no characters")
            return cls(sorted(counts), level="char", lowercase=lowercase)
        if not counts:
            raise DataError(f"{source} contains no words (only whitespace); use level='char' or another file")
        # most frequent first; ties in code-point order, so the result is deterministic
        ranked = sorted(counts, key=lambda w: (-counts[w], w))
        if max_vocab is None:
            return cls(ranked, level="word", lowercase=lowercase)
        if isinstance(max_vocab, bool) or not isinstance(max_vocab, int) or max_vocab < 1:
            raise ConfigError(f"max_vocab must be a positive int (words kept besides {UNK!r}), got {max_vocab!r}")
        return cls(ranked[:max_vocab] + [UNK], level="word", unk=UNK, lowercase=lowercase)

    # -- mapping ----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._itos)

    def __contains__(self, token) -> bool:
        return token in self._stoi

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.to_config() == other.to_config()

    def __repr__(self) -> str:
        extra = f", unk={self.unk!r}" if self.unk is not None else ""
        extra += ", lowercase=True" if self.lowercase else ""
        return f"Vocabulary({len(self)} {self.level}s{extra})"

    @property
    def tokens(self) -> list[str]:
        """The symbols in id order (a copy)."""
        return list(self._itos)

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned dtype holding every id (uint8 for V <= 256)."""
        return _id_dtype(len(self))

    def token(self, i: int) -> str:
        return self._itos[i]

    def id(self, token: str) -> int:
        try:
            return self._stoi[token]
        except KeyError:
            raise VocabularyError(f"{token!r} is not in the vocabulary") from None

    def encode(self, text: str) -> np.ndarray:
        """Ids of ``text``: (N,) int64.

        Unknown symbols map to ``unk`` when the vocabulary has one; otherwise
        VocabularyError names them.
        """
        if not isinstance(text, str):
            raise DataError(f"encode takes a str, got {type(text).__name__}")
        if self.lowercase:
            text = text.lower()
        if self.level == "char":
            cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")  # (N,)
            if len(self._cps):
                pos = np.minimum(np.searchsorted(self._cps, cps), len(self._cps) - 1)
                known = self._cps[pos] == cps
                ids = self._cp_ids[pos]
            else:
                known = np.zeros(cps.shape, dtype=bool)
                ids = np.zeros(cps.shape, dtype=np.int64)
            if not known.all():
                if self.unk_id is None:
                    missing = [chr(c) for c in np.unique(cps[~known])]
                    self._raise_unknown(missing, "characters")
                ids[~known] = self.unk_id
            return ids
        words = tokenize_words(text)
        if self.unk_id is None:
            missing = [w for w in dict.fromkeys(words) if w not in self._stoi]
            if missing:
                self._raise_unknown(missing, "words")
            return np.fromiter(map(self._stoi.__getitem__, words), dtype=np.int64, count=len(words))
        return np.fromiter(map(self._stoi.get, words, repeat(self.unk_id)), dtype=np.int64, count=len(words))

    def _raise_unknown(self, missing: list, what: str) -> NoReturn:
        raise VocabularyError(
            f"the text contains {plural(len(missing), what[:-1])} outside the vocabulary: {_show(missing)}; "
            f"the vocabulary has {plural(len(self), 'character' if self.level == 'char' else 'word')}. "
            "Remove or replace them (a model can only be fed symbols it was trained on)"
        )

    def decode(self, ids: Any) -> str:
        """Text of ids (any integer array or sequence, any library).

        Word-level text is joined with spaces except around punctuation and
        newlines, so it reads naturally but is not byte-identical to the source.
        """
        from .backend import to_numpy

        a = np.asarray(to_numpy(ids)).reshape(-1)
        if a.size == 0:
            return ""
        if a.dtype.kind not in "iu":
            raise DataError(f"decode takes integer ids, got dtype {a.dtype}")
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= len(self):
            raise VocabularyError(f"ids must be in [0, {len(self)}), got values in [{lo}, {hi}]")
        toks = [self._itos[i] for i in a.tolist()]
        if self.level == "char":
            return "".join(toks)
        out: list[str] = []
        prev = None
        for t in toks:
            if (prev is not None and prev != "\n" and t != "\n" and t not in _NO_SPACE_BEFORE
                    and prev not in _NO_SPACE_AFTER):
                out.append(" ")
            out.append(t)
            prev = t
        return "".join(out)

    # -- persistence ---------------------------------------------------------------
    def to_config(self) -> dict:
        """A JSON-able dict; ``Vocabulary.from_config`` rebuilds an equal vocabulary."""
        return {"level": self.level, "tokens": list(self._itos), "unk": self.unk, "lowercase": self.lowercase}

    @classmethod
    def from_config(cls, config: Any) -> Vocabulary:
        """Inverse of :meth:`to_config`; DataError if ``config`` is malformed."""
        if not isinstance(config, dict):
            raise DataError(f"a vocabulary config is a dict, got {type(config).__name__}")
        tokens = config.get("tokens")
        if not isinstance(tokens, list):
            raise DataError("a vocabulary config needs a 'tokens' list")
        unk = config.get("unk")
        if unk is not None and not isinstance(unk, str):
            raise DataError(f"a vocabulary config's 'unk' must be a str or null, got {unk!r}")
        lowercase = config.get("lowercase", False)
        if not isinstance(lowercase, bool):
            raise DataError(f"a vocabulary config's 'lowercase' must be true or false, got {lowercase!r}")
        level = config.get("level", "char")
        if level not in _LEVELS:
            raise DataError(f"a vocabulary config's level must be 'char' or 'word', got {level!r}")
        return cls(tokens, level=level, unk=unk, lowercase=lowercase)


def _count_chars(text: str) -> Counter:
    cps, counts = np.unique(np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4"), return_counts=True)
    return Counter({chr(c): n for c, n in zip(cps.tolist(), counts.tolist())})


# ---------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------

@dataclass
class Corpus:
    """A tokenized text.

    Attributes:
        ids: (N,) unsigned ints, the smallest dtype that fits the vocabulary.
        vocab: the :class:`Vocabulary`.
        path: the file it came from (None for :meth:`from_text`).
    """

    ids: np.ndarray
    vocab: Vocabulary
    path: str | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @classmethod
    def from_text(cls, text: str, level: str = "char", max_vocab: int | None = None, lowercase: bool = False) -> Corpus:
        """Tokenize an in-memory string (same rules as :func:`read_corpus`)."""
        vocab = Vocabulary.build(text, level=level, max_vocab=max_vocab, lowercase=lowercase)
        return cls(vocab.encode(text).astype(vocab.dtype), vocab, None)


def _open_text(path: str):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"corpus file {path!r} does not exist; check the path") from None
    except OSError as e:
        raise DataError(f"cannot read corpus file {path!r}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"corpus path {path!r} is a directory; give a UTF-8 text file")
    if not stat.S_ISREG(st.st_mode):
        raise DataError(
            f"corpus path {path!r} is not a regular file (a pipe or device?); the corpus is read twice "
            "(count, then encode), so save the stream to a file first"
        )
    try:
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read corpus file {path!r}: {e.strerror or e}") from None


def _pieces(path: str, chunk_size: int, whole_words: bool) -> Iterator[str]:
    """Decoded text of ``path`` in pieces of about ``chunk_size`` bytes.

    With ``whole_words`` a piece ends at whitespace (the rest is carried to the
    next), so words, and the context of case mappings, are never split.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0  # bytes read so far
    carry = ""
    at_start = True  # no text decoded yet (a byte-order mark may still come)
    with _open_text(path) as f:
        while True:
            try:
                chunk = f.read(chunk_size)
            except OSError as e:
                raise DataError(f"cannot read corpus file {path!r}: {e.strerror or e}") from None
            final = not chunk
            if final and offset == 0:
                raise DataError(f"corpus file {path!r} is empty (0 bytes); give a file with some text")
            nul = chunk.find(b"\x00")
            if nul >= 0:
                raise DataError(
                    f"corpus file {path!r} looks binary, not text: it has a NUL byte at offset {offset + nul}; "
                    "xrnn trains on UTF-8 text files"
                )
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(chunk, final=final)
            except UnicodeDecodeError as e:
                where = offset - pending + e.start
                raise DataError(
                    f"corpus file {path!r} is not valid UTF-8: {e.reason} at byte offset {where}; "
                    "convert it first (e.g. iconv -f latin1 -t utf-8 in.txt > out.txt)"
                ) from None
            offset += len(chunk)
            if at_start and text:
                at_start = False
                if text[0] == "\ufeff":  # a UTF-8 byte-order mark is not text
                    text = text[1:]
            if whole_words:
                text = carry + text
                carry = ""
                if not final and text and not text[-1].isspace():
                    # keep the trailing run of non-space characters for the next piece
                    parts = text.rsplit(None, 1)
                    cut = len(text) - len(parts[-1]) if parts else 0
                    carry, text = text[cut:], text[:cut]
            if text:
                yield text
            if final:
                return


def read_corpus(
    path: str | os.PathLike,
    level: str = "char",
    max_vocab: int | None = None,
    lowercase: bool = False,
    chunk_size: int = 1 << 20,
) -> Corpus:
    """Read a UTF-8 text file into ids and a vocabulary, streaming.

    Args:
        path: a UTF-8 text file (a leading byte-order mark is dropped; line
            endings are kept as they are).
        level: ``"char"``: every character is a symbol, vocabulary sorted by
            code point (as char-rnn). ``"word"``: tokens from
            :func:`tokenize_words`, vocabulary most frequent first (ties in
            code-point order).
        max_vocab: word level only: keep the ``max_vocab`` most frequent
            words plus :data:`UNK`, which every other word becomes (Britz's
            RNNLM). None keeps every word and adds no unknown token.
        lowercase: lowercase the text first (remembered by the vocabulary).
        chunk_size: bytes read at a time; memory is the ids plus a few chunks.

    Returns:
        A :class:`Corpus` whose ``ids`` use the smallest unsigned dtype that fits.

    Raises:
        DataError: the file is missing, a directory, empty, binary (NUL bytes),
            not valid UTF-8 (the message gives the byte offset), or has no
            words at word level.
        ConfigError: bad ``level``, ``max_vocab`` or ``chunk_size``.
    """
    _check_level(level)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive int (bytes), got {chunk_size!r}")
    if max_vocab is not None and level == "char":
        raise ConfigError("max_vocab applies to level='word'; a character vocabulary keeps every character")
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"path must be the text file's path (a str or os.PathLike), got {type(path).__name__}")
    path = os.fspath(path)
    whole = level == "word" or bool(lowercase)

    counts: Counter = Counter()
    total = 0
    for piece in _pieces(path, chunk_size, whole):
        if lowercase:
            piece = piece.lower()
        if level == "char":
            counts.update(_count_chars(piece))
            total += len(piece)
        else:
            toks = tokenize_words(piece)
            counts.update(toks)
            total += len(toks)
    if total == 0 and level == "char":
        raise DataError(f"corpus file {path!r} holds no text (only a byte-order mark)")
    vocab = Vocabulary._from_counts(counts, level, max_vocab, bool(lowercase), source=f"corpus file {path!r}")

    ids = np.empty(total, dtype=vocab.dtype)  # (N,)
    pos = 0
    for piece in _pieces(path, chunk_size, whole):
        try:
            enc = vocab.encode(piece)
        except VocabularyError:
            enc = None
        if enc is None or pos + len(enc) > total:
            raise DataError(f"corpus file {path!r} changed while it was being read; try again")
        ids[pos: pos + len(enc)] = enc
        pos += len(enc)
    if pos != total:
        raise DataError(f"corpus file {path!r} changed while it was being read; try again")
    return Corpus(ids, vocab, path)


_resource_stack = contextlib.ExitStack()
atexit.register(_resource_stack.close)


def default_corpus_path() -> Path:
    """Path of the tiny Shakespeare corpus shipped with xrnn (1,115,394 characters, 65 symbols)."""
    from importlib import resources
    from pathlib import Path

    res = resources.files("xrnn") / "corpus" / "tinyshakespeare.txt"
    if isinstance(res, Path):
        return res
    # installed inside a zip: extract once for the life of the process
    return Path(_resource_stack.enter_context(resources.as_file(res)))


# ---------------------------------------------------------------------------
# splitting and batching
# ---------------------------------------------------------------------------

def split(ids: np.ndarray, val_fraction: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Split ids into (train, validation): contiguous views, train first.

    The validation part has ``round(N * val_fraction)`` tokens, at least one
    when ``val_fraction > 0`` (char-rnn's default split is 0.95 / 0.05).

    Raises:
        ConfigError: ``val_fraction`` not in [0, 1).
        DataError: too few tokens to leave both parts non-empty.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float, np.floating)) \
            or not math.isfinite(val_fraction) or not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise DataError(f"split takes a 1-D array of ids, got shape {ids.shape}")
    n = int(ids.shape[0])
    n_val = 0 if val_fraction == 0 else max(1, int(round(n * val_fraction)))
    if n - n_val < 1:
        raise DataError(
            f"{plural(n, 'token')} cannot be split with val_fraction={val_fraction}: nothing would be left to "
            "train on"
        )
    return ids[: n - n_val], ids[n - n_val:]


def _positive(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ConfigError(f"{name} must be a positive int, got {v!r}")
    return int(v)


class StreamBatcher:
    """B parallel token streams read in windows of T steps (truncated BPTT).

    The first ``B*S + 1`` tokens (``S = (N - 1) // B``) are cut into B
    contiguous streams of S input steps; stream ``b`` reads tokens
    ``b*S .. b*S + S`` (its last target is the next stream's first input).
    Window ``w`` is steps ``w*T .. w*T + T - 1`` of every stream, for
    ``w < S // T``; the remainder shorter than T is not used.

    Args:
        ids: (N,) integer token ids (host array; not copied).
        batch_size: B, the number of streams.
        seq_len: T, steps per window.
        rows: stream indices this batcher returns (a slice, range or sequence
            of ints in [0, B)); None for all. N data-parallel workers with
            ``rows=slice(r*B//N, (r+1)*B//N)`` together see exactly the rows
            of one batcher with B streams.

    Raises:
        DataError: fewer than ``B*T + 1`` tokens (the message says what to lower).
        ConfigError: bad sizes or rows.
    """

    def __init__(self, ids: Any, batch_size: int, seq_len: int, rows: Any = None):
        from .backend import to_numpy

        self.batch_size = B = _positive("batch_size", batch_size)
        self.seq_len = T = _positive("seq_len", seq_len)
        a = np.asarray(to_numpy(ids))
        if a.ndim != 1 or a.dtype.kind not in "iu":
            raise DataError(f"StreamBatcher takes a 1-D integer array of token ids, got {a.dtype} of shape {a.shape}")
        self.ids = a
        self.num_tokens = N = int(a.shape[0])
        need = B * T + 1
        if N < need:
            raise DataError(
                f"{plural(N, 'token')} {'is' if N == 1 else 'are'} too few for batch_size={B} streams of "
                f"seq_len={T}: one window needs "
                f"batch_size*seq_len+1 = {need} tokens; lower batch_size or seq_len (--batch-size, --seq-len), "
                "or give more text"
            )
        self.stream_length = S = (N - 1) // B
        self.windows_per_epoch = S // T
        self.rows = self._rows(rows, B)
        self._starts = self.rows.astype(np.int64) * S  # (b,) first token of each stream
        self._steps = np.arange(T + 1, dtype=np.int64)  # (T+1,)
        self.position = 0  # the window next_batch returns next
        self.epoch = 0  # completed passes over the streams

    @staticmethod
    def _rows(rows: Any, B: int) -> np.ndarray:
        if rows is None:
            return np.arange(B, dtype=np.int64)
        if isinstance(rows, slice):
            r = np.arange(B, dtype=np.int64)[rows]
        else:
            try:
                r = np.asarray(list(rows))
            except TypeError:
                raise ConfigError(f"rows must be a slice, range or sequence of ints, got {rows!r}") from None
            if r.size and r.dtype.kind not in "iu":
                raise ConfigError(f"rows must hold integers, got {rows!r}")
            r = r.astype(np.int64).reshape(-1)
            if r.size and (r.min() < 0 or r.max() >= B):
                raise ConfigError(f"rows must be stream indices in [0, {B}), got {rows!r}")
        if r.size == 0:
            raise ConfigError(f"rows={rows!r} selects no stream out of batch_size={B}")
        return r

    def __repr__(self) -> str:
        return (f"StreamBatcher(tokens={self.num_tokens}, batch_size={self.batch_size}, seq_len={self.seq_len}, "
                f"rows={len(self.rows)}, windows_per_epoch={self.windows_per_epoch}, "
                f"epoch={self.epoch}, position={self.position})")

    def __len__(self) -> int:
        return self.windows_per_epoch

    @property
    def tokens_per_epoch(self) -> int:
        """Target tokens one pass over all B streams covers."""
        return self.batch_size * self.windows_per_epoch * self.seq_len

    def window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Window ``w`` of this batcher's rows: x, y of shape (b, T), int64."""
        if not 0 <= w < self.windows_per_epoch:
            raise ConfigError(f"window index must be in [0, {self.windows_per_epoch}), got {w}")
        idx = self._starts[:, None] + (w * self.seq_len + self._steps)[None, :]  # (b, T+1)
        g = self.ids[idx].astype(np.int64)  # (b, T+1)
        return g[:, :-1], g[:, 1:]

    def next_batch(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """The next window: ``(x, y, new_epoch)``.

        x, y: (b, T) int64 host arrays, ``y[:, t] == x[:, t+1]`` within a
        window and each stream continues exactly where the previous call
        ended. ``new_epoch`` is True when this window is the first of a pass
        (including the very first call): reset the hidden state then.
        """
        w = self.position
        x, y = self.window(w)
        self.position += 1
        if self.position == self.windows_per_epoch:
            self.position = 0
            self.epoch += 1
        return x, y, w == 0

    def iterate_once(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All windows of one pass in order, as ``(x, y)``; the position is not changed.

        For validation: start from a zero state and carry it from window to window.
        """
        for w in range(self.windows_per_epoch):
            yield self.window(w)

    def state_dict(self) -> dict:
        """JSON-able position, for exact resumption with :meth:`load_state_dict`."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "num_tokens": self.num_tokens,
        }

    def load_state_dict(self, state: Any) -> StreamBatcher:
        """Continue from a :meth:`state_dict`; DataError if it was taken on another layout."""
        if not isinstance(state, dict):
            raise DataError(f"a batcher state is a dict, got {type(state).__name__}")
        for key in ("batch_size", "seq_len", "num_tokens"):
            if state.get(key) != getattr(self, key):
                raise DataError(
                    f"cannot resume: the saved data position was taken with {key}={state.get(key)!r}, "
                    f"this batcher has {key}={getattr(self, key)}; use the same data and batch settings"
                )
        epoch, position = state.get("epoch"), state.get("position")
        if not (isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0):
            raise DataError(f"a batcher state's epoch must be a non-negative int, got {epoch!r}")
        if not (isinstance(position, int) and not isinstance(position, bool)
                and 0 <= position < self.windows_per_epoch):
            raise DataError(
                f"a batcher state's position must be an int in [0, {self.windows_per_epoch}), got {position!r}"
            )
        self.epoch, self.position = epoch, position
        return self
