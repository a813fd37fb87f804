"""Property-based tests: hostile checkpoints of real models and mutated text files raise only documented errors.

``tests/test_checkpoint.py`` fuzzes the container (random bytes, mutated
files, forged headers). Here the files are *valid* containers (correct
checksum) of the real kinds -- a CharLM, a training run, a Sequential --
whose metadata or tensors a forger changed: every loader (``xrnn.load``,
``load_model``, ``Trainer.resume``, ``xrnn info``/``sample``) must answer
with an :class:`~xrnn.errors.XRNNError` (a one-line ``xrnn: error:`` with
exit status 2 on the command line) or load something, never crash with
another exception, allocate what the file does not hold, or hang.
"""

import contextlib
import functools
import io
import os
import re
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xrnn
from xrnn import checkpoint as ck
from xrnn.cli import main
from xrnn.data import Corpus, DataError, default_corpus_path, read_corpus
from xrnn.errors import XRNNError
from xrnn.models import CharLM
from xrnn.sequential import Sequential
from xrnn.sequential import load_model as load_sequential
from xrnn.train import Trainer, load_model

# XRNN_FUZZ_EXAMPLES raises the example count for a longer hunt (e.g. 2000 in a nightly job)
_FUZZ = settings(max_examples=int(os.environ.get("XRNN_FUZZ_EXAMPLES", "60")), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])

TEXT = open(default_corpus_path(), encoding="utf-8").read()[:1500]


# ---------------------------------------------------------------------------
# valid files of every kind (built once)
# ---------------------------------------------------------------------------

@functools.cache
def _originals():
    """``{name: (kind, meta, tensors)}`` for a CharLM (one-hot and embedding), a trainer and a Sequential."""
    import xrnn.layers as K

    c = Corpus.from_text(TEXT)
    out = {}
    d = tempfile.mkdtemp()
    for name, emb in (("charlm", None), ("charlm_emb", 5)):
        m = CharLM(len(c.vocab), 6, 2, cell="gru", embedding_dim=emb, seed=0, vocab=c.vocab)
        p = os.path.join(d, name)
        xrnn.save(m, p)
        out[name] = p
    t = Trainer(CharLM(len(c.vocab), 6, 1, seed=0, vocab=c.vocab), c, batch_size=2, seq_len=5,
                val_fraction=0.1, progress=False, eval_every=2)
    t.fit(3)
    p = os.path.join(d, "trainer")
    t.save(p)
    out["trainer"] = p
    s = Sequential([K.Input((4, 2)), K.LSTM(3, return_sequences=True), K.Dropout(0.1),
                    K.TimeDistributed(K.Dense(2))], seed=0)
    s.compile(optimizer="adam", loss="mse", clipnorm=1.0)
    s.fit(np.ones((4, 4, 2)), np.zeros((4, 4, 2)), epochs=1, verbose=0)
    p = os.path.join(d, "sequential")
    s.save(p)
    out["sequential"] = p
    res = {}
    for name, p in out.items():
        cont = ck.read_container(p)
        res[name] = (cont.kind, cont.meta, cont.tensors)
        os.remove(p)
    os.rmdir(d)
    return res


def _paths(tree, prefix=()):
    """Every path (tuple of keys/indices) into a JSON tree, the root's children first."""
    out = []
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree[:4])  # long lists (tokens, rng words) differ little entry to entry
    else:
        return out
    for k, v in items:
        out.append(prefix + (k,))
        out.extend(_paths(v, prefix + (k,)))
    return out


_hostile_scalar = st.one_of(
    st.none(), st.booleans(), st.sampled_from([0, -1, 1, 2, 3, 10**12, 2**64, -(10**12)]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["", "x", "lstm", "float32", "adam", "nan"]),
)
_hostile = st.recursive(
    _hostile_scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["a", "lr", "n", "tokens"]), inner,
                                                               max_size=2),
    max_leaves=5,
)


def _mutate(data, meta, tensors):
    meta = _deep_copy(meta)
    tensors = dict(tensors)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        what = data.draw(st.sampled_from(["meta", "meta", "meta", "tensor"]), label="target")
        if what == "meta":
            paths = _paths(meta)
            path = paths[data.draw(st.integers(0, len(paths) - 1), label="path")]
            parent = meta
            for k in path[:-1]:
                parent = parent[k]
            if isinstance(parent, dict) and data.draw(st.booleans(), label="delete"):
                del parent[path[-1]]
            else:
                parent[path[-1]] = data.draw(_hostile, label="value")
        elif tensors:
            names = sorted(tensors)
            name = names[data.draw(st.integers(0, len(names) - 1), label="tensor")]
            op = data.draw(st.sampled_from(["drop", "reshape", "dtype", "grow", "nan"]), label="op")
            a = tensors[name]
            if op == "drop":
                del tensors[name]
            elif op == "reshape":
                tensors[name] = a.reshape(-1)
            elif op == "dtype":
                with np.errstate(invalid="ignore", over="ignore"):
                    tensors[name] = a.astype(data.draw(st.sampled_from(["int8", "bool", "float16", "uint64"])))
            elif op == "grow":
                tensors[name] = np.concatenate([a.reshape(-1), a.reshape(-1)])
            else:
                tensors[name] = np.full(a.shape, np.nan) if a.dtype.kind == "f" else a
    return meta, tensors


def _deep_copy(tree):
    if isinstance(tree, dict):
        return {k: _deep_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_deep_copy(v) for v in tree]
    return tree


@contextlib.contextmanager
def _forged(data, name):
    kind, meta, tensors = _originals()[name]
    meta, tensors = _mutate(data, meta, tensors)
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "forged.ckpt")
        try:
            ck.write_container(p, kind, meta, tensors)
        except XRNNError:  # e.g. a float NaN inside an int position is fine, but some values are unwritable
            yield None
            return
        yield p


def _documented(fn, *args, **kwargs):
    """Call fn; an XRNNError is a documented answer, anything else fails the test."""
    try:
        return fn(*args, **kwargs)
    except XRNNError:
        return None


def _cli_is_one_line(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    if rc != 0:
        lines = err.getvalue().strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("xrnn: error: "), err.getvalue()


@_FUZZ
@given(data=st.data(), name=st.sampled_from(["charlm", "charlm_emb", "trainer"]))
def test_forged_language_model_checkpoints(data, name):
    with _forged(data, name) as p:
        if p is None:
            return
        _documented(xrnn.load, p)
        _documented(load_model, p)
        _cli_is_one_line(["info", p])
        _cli_is_one_line(["sample", p, "--length", "3", "--seed", "0"])
        if name == "trainer":
            t = _documented(Trainer.resume, p, corpus=Corpus.from_text(TEXT), out_dir=None)
            if t is not None:
                _documented(t.fit, t.step + 1)
            _resume_and_plot_are_one_line(p)


def _resume_and_plot_are_one_line(p):
    """``xrnn train --resume`` (reads the file before any option check) and ``xrnn plot``."""
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(p, os.path.join(d, "last.ckpt"))
        _cli_is_one_line(["train", "--out", d, "--resume", "--steps", "1", "--progress", "off"])
        _cli_is_one_line(["plot", p, "-o", os.path.join(d, "loss.png")])


@pytest.mark.parametrize("where,value", [
    (("meta", "trainer"), 5), (("meta", "data"), 5), (("meta", "data", "corpus"), 5), (("meta", "model"), 5),
    (("meta", "model", "config"), [1]), (("meta", "model", "vocab"), [1]),
    (("tensors", "history/train_loss"), np.ones((2, 2))), (("tensors", "history/val_step"), np.arange(7)),
])
def test_malformed_training_runs_are_one_line_for_resume_and_plot(where, value):
    """Forgeries an audit found crashing ``--resume`` (AttributeError in the option check) and
    ``plot`` (AttributeError, ValueError from NumPy and matplotlib) with tracebacks."""
    kind, meta, tensors = _originals()["trainer"]
    meta, tensors = _deep_copy(meta), dict(tensors)
    tree = meta if where[0] == "meta" else tensors
    for k in where[1:-1]:
        tree = tree[k]
    tree[where[-1]] = value
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "forged.ckpt")
        ck.write_container(p, kind, meta, tensors)
        _resume_and_plot_are_one_line(p)


@_FUZZ
@given(data=st.data())
def test_forged_sequential_checkpoints(data):
    with _forged(data, "sequential") as p:
        if p is None:
            return
        m = _documented(load_sequential, p)
        _cli_is_one_line(["info", p])
        if m is not None and m.built and m._compiled is not None:
            _documented(m.fit, np.ones((2, 4, 2)), np.zeros((2, 4, 2)), verbose=0)


def test_the_originals_load():
    """The unmutated files load (so the properties above are not vacuous)."""
    for kind, meta, tensors in _originals().values():
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "f.ckpt")
            ck.write_container(p, kind, meta, tensors)
            assert xrnn.load(p) is not None
            _cli_is_one_line(["info", p])


# ---------------------------------------------------------------------------
# memory: loading any file costs a small multiple of its size (plus the real model's size)
# ---------------------------------------------------------------------------

_MEMORY_FUZZ = settings(max_examples=int(os.environ.get("XRNN_FUZZ_EXAMPLES", "15")), deadline=None,
                        suppress_health_check=[HealthCheck.too_slow])
_ATOMS = {"dict": {}, "list": [], "int": 0, "str": "ab", "float": 1.5, "null": None}


def _peak(fn, *args):
    """``(peak bytes traced while fn(*args) ran, the XRNNError it raised or None)``; NumPy's arrays are traced."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn(*args)
        err = None
    except XRNNError as e:
        err = e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, err


@functools.cache
def _warm():
    """Load a real file once, so what loading imports is not counted in the first measured example."""
    kind, meta, tensors = _originals()["trainer"]
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "f.ckpt")
        ck.write_container(p, kind, meta, tensors)
        for fn in (xrnn.load, load_model, ck.peek):
            fn(p)
    return True


@_MEMORY_FUZZ
@given(family=st.sampled_from(["values", "entries", "nesting", "dtype", "string"]),
       atom=st.sampled_from(sorted(_ATOMS)), n=st.integers(0, 150_000), hidden=st.integers(1, 3000),
       filler=st.integers(0, 1_000_000))
def test_the_memory_to_load_a_forged_file_is_bounded_by_its_size(family, atom, n, hidden, filler):
    """Forged checkpoints of a real training run with a valid checksum, in the shapes the audit found
    costing 30x their size (a header of myriad empty dicts, myriad tensor entries, float64 weights
    declared over uint8 bytes) and more: the traced peak of xrnn.load, load_model and peek stays under
    8x the file's size plus twice the real model's bytes plus 8 MiB, refused or not."""
    _warm()
    kind, meta, tensors = _originals()["trainer"]
    meta, tensors = _deep_copy(meta), dict(tensors)
    real = sum(int(a.nbytes) for a in tensors.values())
    if family == "values":
        meta["junk"] = [_ATOMS[atom]] * n
    elif family == "entries":
        tensors.update({f"optim/x{i}/exp_avg": np.zeros(0, np.float32) for i in range(n // 20)})
    elif family == "nesting":
        junk: list = []
        for _ in range(n // 1000):  # up to 150 deep (the limit is 64)
            junk = [junk]
        meta["junk"] = junk
    elif family == "dtype":
        cfg = meta["model"]["config"]
        cfg["dtype"], cfg["hidden_size"] = "float64", hidden
        tensors["model/filler"] = np.zeros(filler, np.uint8)
    else:
        meta["junk"] = "x" * (n * 5)
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "forged.ckpt")
        ck.write_container(p, kind, meta, tensors)
        size = os.path.getsize(p)
        peaks = [_peak(fn, p)[0] for fn in (xrnn.load, load_model, ck.peek)]
    assert max(peaks) <= 8 * size + 2 * real + (8 << 20), (family, size, peaks)


def test_the_forgeries_of_the_audit_are_refused_before_they_cost_memory():
    """The three files of the audit, at a third of their size (to keep the suite fast): refused, each
    costing about its own size, where the originals cost 270 MB for 9 MB, 294 MB for 8 MB and 312 MB
    (and 4-10 s) for 19 MB."""
    _warm()
    kind, meta, tensors = _originals()["trainer"]
    junk_meta = _deep_copy(meta)
    junk_meta["junk"] = [{}] * 1_000_000  # a 3 MB header of [{},...]
    cfg_meta = _deep_copy(meta)
    cfg_meta["model"]["config"].update(dtype="float64", hidden_size=600)  # 2.9M float64 weights (23 MB)
    filler = {**tensors, "model/filler": np.zeros(2_700_000, np.uint8)}  # over 2.7 MB of uint8
    many = {**tensors, **{f"optim/x{i}/s": np.zeros(0, np.float32) for i in range(100_000)}}
    for m, t, words in ((junk_meta, tensors, "JSON values"), (cfg_meta, filler, "far more than"),
                        (meta, many, "JSON values")):
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "forged.ckpt")
            ck.write_container(p, kind, m, t)
            size = os.path.getsize(p)
            for fn in (xrnn.load, load_model):
                peak, err = _peak(fn, p)
                assert isinstance(err, ck.CheckpointCorruptError) and re.search(words, str(err)), err
                assert peak <= 2 * size + (4 << 20), (words, size, peak)


def test_a_few_hundred_extra_tensor_entries_are_refused_by_what_the_model_can_hold():
    """Entries too few to cost much are still bounded by the declared model (a 1-layer CharLM in a run:
    at most 4 x 7 + 5 tensors)."""
    kind, meta, tensors = _originals()["trainer"]
    many = {**tensors, **{f"optim/x{i}/s": np.zeros(0, np.float32) for i in range(300)}}
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "forged.ckpt")
        ck.write_container(p, kind, meta, many)
        for fn in (xrnn.load, ck.peek):
            with pytest.raises(ck.CheckpointCorruptError, match=r"declares 3\d\d tensors, but the 'xrnn.Trainer' "
                                                                r"it describes can have at most 33"):
                fn(p)


# ---------------------------------------------------------------------------
# text files: mutations of real text
# ---------------------------------------------------------------------------

_SOURCE = TEXT[:400].encode("utf-8") + "héllo wörld — ✓ 𝄞\n".encode()


@_FUZZ
@given(data=st.data(), level=st.sampled_from(["char", "word"]), chunk_size=st.integers(1, 64))
def test_mutated_text_files_read_or_raise_data_errors(data, level, chunk_size):
    blob = bytearray(_SOURCE)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate", "nul", "bom"]))
        i = data.draw(st.integers(0, max(len(blob) - 1, 0)))
        if op == "flip" and blob:
            blob[i] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            blob[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and blob:
            del blob[i: i + data.draw(st.integers(1, 8))]
        elif op == "truncate":
            del blob[i:]
        elif op == "nul":
            blob[i:i] = b"\x00"
        elif op == "bom":
            blob[0:0] = b"\xef\xbb\xbf"
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "t.txt")
        with open(p, "wb") as f:
            f.write(bytes(blob))
        try:
            c = read_corpus(p, level=level, chunk_size=chunk_size)
        except DataError as e:
            assert p in str(e) or "empty" in str(e) or "binary" in str(e) or "UTF-8" in str(e), str(e)
            return
    text = bytes(blob).decode("utf-8").removeprefix("\ufeff")  # success means valid UTF-8
    if level == "char":
        assert c.vocab.decode(c.ids) == text
