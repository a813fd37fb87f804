"""Corpus reading, vocabularies, splitting and truncated-BPTT stream batching."""

import json
import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xrnn.data import (
    UNK,
    Corpus,
    StreamBatcher,
    Vocabulary,
    default_corpus_path,
    read_corpus,
    split,
    tokenize_words,
)
from xrnn.errors import ConfigError, DataError, VocabularyError

# text with 1-, 2-, 3- and 4-byte UTF-8 characters, a final-sigma word, CRLF, tabs
MIXED = "Ωmega café — naïve 😀 emoji\r\nΟΔΟΣ don't STOP!\tYes, yes.\n\n“Quoted” end 中文 😀😀"


def write(tmp_path, data, name="c.txt"):
    p = tmp_path / name
    if isinstance(data, str):
        data = data.encode("utf-8")
    p.write_bytes(data)
    return p


# ---------------------------------------------------------------------------
# vocabulary
# ---------------------------------------------------------------------------

def test_char_vocabulary_is_sorted_and_round_trips():
    v = Vocabulary.build("hello world")
    assert v.tokens == [" ", "d", "e", "h", "l", "o", "r", "w"]  # sorted by code point, like char-rnn
    ids = v.encode("hello world")
    assert ids.dtype == np.int64
    assert ids.tolist() == [3, 2, 4, 4, 5, 0, 7, 5, 6, 4, 1]
    assert v.decode(ids) == "hello world"
    assert v.decode([]) == ""
    assert v.dtype == np.uint8 and len(v) == 8


def test_unknown_characters_are_named():
    v = Vocabulary.build("abc")
    with pytest.raises(VocabularyError) as ei:
        v.encode("abzc\x00é")
    msg = str(ei.value)
    assert "3 characters" in msg and "'z'" in msg and "'\\x00'" in msg and "'é'" in msg
    assert isinstance(ei.value, DataError)
    with pytest.raises(VocabularyError, match="outside the vocabulary"):
        Vocabulary.build("abc", level="word").encode("abc xyz")


def test_unknown_characters_map_to_unk_when_there_is_one():
    v = Vocabulary(["a", "b", "?"], unk="?")
    assert v.encode("abcx").tolist() == [0, 1, 2, 2]
    assert v.encode("\ud800").tolist() == [2]  # a lone surrogate is just another unknown


def test_vocabulary_config_round_trip_through_json():
    for v in (Vocabulary.build(MIXED), Vocabulary.build(MIXED, level="word", max_vocab=3, lowercase=True)):
        back = Vocabulary.from_config(json.loads(json.dumps(v.to_config())))
        assert back == v and back.tokens == v.tokens and back.unk == v.unk and back.lowercase == v.lowercase
        np.testing.assert_array_equal(back.encode(MIXED), v.encode(MIXED))


@pytest.mark.parametrize(
    "config",
    [None, [], {"tokens": "abc"}, {"tokens": ["a", "a"]}, {"tokens": ["ab"]}, {"tokens": []},
     {"tokens": ["a"], "unk": "b"}, {"tokens": ["a"], "level": "byte"}, {"tokens": ["a"], "lowercase": "yes"},
     {"tokens": ["a", 3]}, {"tokens": ["a"], "unk": 0}],
)
def test_malformed_vocabulary_config(config):
    with pytest.raises(DataError):
        Vocabulary.from_config(config)


def test_decode_rejects_out_of_range_ids():
    v = Vocabulary.build("ab")
    with pytest.raises(VocabularyError, match=r"\[0, 2\)"):
        v.decode([0, 2])
    with pytest.raises(VocabularyError):
        v.decode(np.array([-1]))
    with pytest.raises(DataError, match="integer"):
        v.decode(np.array([0.0]))


def test_word_tokens_and_decoding():
    assert tokenize_words("Nay, don't go!\nStay.  O'er   the (hill).") == [
        "Nay", ",", "don't", "go", "!", "\n", "Stay", ".", "O'er", "the", "(", "hill", ")", ".",
    ]
    v = Vocabulary.build("Nay, don't go!\nStay. (hill)", level="word")
    text = "Nay, don't go!\nStay. (hill)"
    assert v.decode(v.encode(text)) == text


def test_word_vocabulary_max_vocab_and_unk():
    text = "b a c a b a d d e"
    v = Vocabulary.build(text, level="word", max_vocab=2)
    # a: 3, b: 2, d: 2 -> b and d tie; code-point order keeps b
    assert v.tokens == ["a", "b", UNK] and v.unk == UNK and v.unk_id == 2
    assert v.encode(text).tolist() == [1, 0, 2, 0, 1, 0, 2, 2, 2]
    assert v.decode(v.encode("a zzz b")) == f"a {UNK} b"
    full = Vocabulary.build(text, level="word")
    assert full.tokens == ["a", "b", "d", "c", "e"] and full.unk is None
    with pytest.raises(ConfigError):
        Vocabulary.build(text, level="word", max_vocab=0)
    with pytest.raises(ConfigError, match="level='word'"):
        Vocabulary.build(text, level="char", max_vocab=5)


def test_lowercase_is_remembered_for_encoding():
    v = Vocabulary.build("ABC abc", lowercase=True)
    assert v.tokens == [" ", "a", "b", "c"]
    assert v.decode(v.encode("CAB")) == "cab"


# ---------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("level", ["char", "word"])
@pytest.mark.parametrize("lowercase", [False, True])
def test_tiny_chunks_give_the_same_result(tmp_path, level, lowercase):
    p = write(tmp_path, MIXED)
    ref = Corpus.from_text(MIXED, level=level, lowercase=lowercase)  # in memory, no chunking
    for chunk_size in (1, 2, 3, 5, 7, 64, 1 << 20):
        c = read_corpus(p, level=level, lowercase=lowercase, chunk_size=chunk_size)
        assert c.vocab == ref.vocab, chunk_size
        np.testing.assert_array_equal(c.ids, ref.ids)
        assert c.ids.dtype == np.uint8
    if level == "char":
        assert c.vocab.decode(c.ids) == (MIXED.lower() if lowercase else MIXED)
        assert len(c) == len(MIXED)
    else:
        # hand count: 24 tokens; '\n' and '😀' 3 times each (tie: code-point order), then 'yes' twice
        # once lowercased; '\r' and '\t' only separate
        assert len(c) == 24
        assert c.vocab.tokens[:2] == ["\n", "😀"]
        assert (c.vocab.tokens[2] == "yes") == lowercase
        assert c.vocab.decode(c.ids[:9]) == ("ωmega" if lowercase else "Ωmega") + " café — naïve 😀 emoji\n" + (
            "οδος don't" if lowercase else "ΟΔΟΣ don't")


def test_final_sigma_survives_chunking(tmp_path):
    # str.lower() maps a word-final capital sigma to 'ς' and any other to 'σ': context that a
    # chunk boundary must not cut
    p = write(tmp_path, "ΟΔΟΣ ΣΑΣ")
    for cs in (1, 2, 3, 9):
        c = read_corpus(p, lowercase=True, chunk_size=cs)
        assert c.vocab.decode(c.ids) == "οδος σας"


def test_byte_order_mark_is_dropped(tmp_path):
    p = write(tmp_path, "\ufeffab")
    for cs in (1, 2, 100):
        c = read_corpus(p, chunk_size=cs)
        assert c.vocab.tokens == ["a", "b"] and c.ids.tolist() == [0, 1]


def test_ids_use_the_smallest_dtype(tmp_path):
    text = "".join(chr(0x4E00 + i) for i in range(300))  # 300 distinct CJK characters
    c = read_corpus(write(tmp_path, text))
    assert len(c.vocab) == 300 and c.ids.dtype == np.uint16
    assert c.vocab.decode(c.ids) == text


def test_missing_directory_empty(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_corpus(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="directory"):
        read_corpus(tmp_path)
    with pytest.raises(DataError, match="empty"):
        read_corpus(write(tmp_path, b""))
    with pytest.raises(DataError, match="no text"):
        read_corpus(write(tmp_path, "\ufeff"))
    with pytest.raises(DataError, match="no words"):
        read_corpus(write(tmp_path, " \t \r "), level="word")


@pytest.mark.parametrize("chunk_size", [1, 3, 1 << 20])
def test_binary_file(tmp_path, chunk_size):
    p = write(tmp_path, b"hello\x00\x01\x02")
    with pytest.raises(DataError, match="binary.*offset 5"):
        read_corpus(p, chunk_size=chunk_size)


@pytest.mark.parametrize("chunk_size", [1, 2, 4, 1 << 20])
def test_invalid_utf8_gives_the_byte_offset(tmp_path, chunk_size):
    good = "aé中".encode()  # 1 + 2 + 3 bytes
    p = write(tmp_path, good + b"\xff" + b"tail")
    with pytest.raises(DataError, match="not valid UTF-8.*byte offset 6"):
        read_corpus(p, chunk_size=chunk_size)
    latin1 = write(tmp_path, "naïve".encode("latin-1"), "l1.txt")
    with pytest.raises(DataError, match="byte offset 2"):
        read_corpus(latin1, chunk_size=chunk_size)
    cut = write(tmp_path, good[:-1], "cut.txt")  # file ends inside a 3-byte character
    with pytest.raises(DataError, match="byte offset 3"):
        read_corpus(cut, chunk_size=chunk_size)


def test_bad_arguments(tmp_path):
    p = write(tmp_path, "abc")
    with pytest.raises(ConfigError):
        read_corpus(p, level="byte")
    with pytest.raises(ConfigError):
        read_corpus(p, chunk_size=0)
    with pytest.raises(ConfigError):
        read_corpus(p, max_vocab=10)  # char level


def test_word_corpus_with_max_vocab(tmp_path):
    text = "the cat the dog\nthe cat, a bird!"
    c = read_corpus(write(tmp_path, text), level="word", max_vocab=3, chunk_size=4)
    # counts: the 3, cat 2, then 1 each for '\n' ',' '!' 'a' 'bird' 'dog': code-point order picks '\n'
    assert c.vocab.tokens == ["the", "cat", "\n", UNK]
    assert c.vocab.decode(c.ids) == f"the cat the {UNK}\nthe cat {UNK} {UNK} {UNK} {UNK}"


_FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(blob=st.binary(max_size=300), level=st.sampled_from(["char", "word"]), chunk_size=st.integers(1, 8))
def test_fuzz_read_corpus_random_bytes(blob, level, chunk_size):
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "f.txt")
        with open(p, "wb") as f:
            f.write(blob)
        try:
            c = read_corpus(p, level=level, chunk_size=chunk_size)
        except DataError:
            return
    text = blob.decode("utf-8")  # success implies valid UTF-8 ...
    assert "\x00" not in text  # ... without NUL bytes
    if level == "char":
        assert c.vocab.decode(c.ids) == text.removeprefix("\ufeff")
    else:
        assert len(c) == len(tokenize_words(text.removeprefix("\ufeff")))


@_FUZZ
@given(text=st.text(max_size=60), chunk_size=st.integers(1, 6), level=st.sampled_from(["char", "word"]),
       lowercase=st.booleans())
def test_fuzz_chunking_never_changes_the_result(text, chunk_size, level, lowercase):
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "f.txt")
        with open(p, "wb") as f:
            f.write(text.encode("utf-8", "surrogatepass"))
        try:
            whole = read_corpus(p, level=level, lowercase=lowercase, chunk_size=1 << 20)
        except DataError:
            with pytest.raises(DataError):
                read_corpus(p, level=level, lowercase=lowercase, chunk_size=chunk_size)
            return
        small = read_corpus(p, level=level, lowercase=lowercase, chunk_size=chunk_size)
    assert small.vocab == whole.vocab
    np.testing.assert_array_equal(small.ids, whole.ids)


def test_default_corpus_is_tiny_shakespeare():
    p = default_corpus_path()
    assert p.is_file() and p.name == "tinyshakespeare.txt"
    c = read_corpus(p)
    assert len(c.vocab) == 65 and len(c) == 1_115_394 and c.ids.dtype == np.uint8
    assert "".join(c.vocab.tokens) == "\n !$&',-.3:;?" + "".join(map(chr, range(65, 91))) + "".join(
        map(chr, range(97, 123)))
    assert c.vocab.decode(c.ids[:14]) == "First Citizen:"


# ---------------------------------------------------------------------------
# split
# ---------------------------------------------------------------------------

def test_split_sizes_and_contiguity():
    ids = np.arange(100)
    tr, va = split(ids)
    assert (len(tr), len(va)) == (95, 5)
    np.testing.assert_array_equal(np.concatenate([tr, va]), ids)
    tr, va = split(ids, 0.0)
    assert len(tr) == 100 and len(va) == 0
    tr, va = split(np.arange(10), 0.01)
    assert (len(tr), len(va)) == (9, 1)  # never empty when a fraction was asked for
    tr, va = split(np.arange(10), 0.26)
    assert (len(tr), len(va)) == (7, 3)


@pytest.mark.parametrize("frac", [-0.1, 1.0, 1.5, float("nan"), "0.1", True])
def test_split_bad_fraction(frac):
    with pytest.raises(ConfigError):
        split(np.arange(10), frac)


def test_split_too_short():
    with pytest.raises(DataError, match="nothing would be left"):
        split(np.arange(1), 0.5)
    with pytest.raises(DataError):
        split(np.zeros((2, 2), np.int64))


# ---------------------------------------------------------------------------
# stream batching
# ---------------------------------------------------------------------------

def test_batcher_hand_computed_windows():
    # 23 tokens, B=2, T=3: S = 22 // 2 = 11 steps per stream, 3 full windows
    b = StreamBatcher(np.arange(23), batch_size=2, seq_len=3)
    assert (b.stream_length, b.windows_per_epoch, len(b), b.tokens_per_epoch) == (11, 3, 3, 18)
    expect = [
        ([[0, 1, 2], [11, 12, 13]], [[1, 2, 3], [12, 13, 14]]),
        ([[3, 4, 5], [14, 15, 16]], [[4, 5, 6], [15, 16, 17]]),
        ([[6, 7, 8], [17, 18, 19]], [[7, 8, 9], [18, 19, 20]]),
    ]
    for epoch in range(2):
        for w, (ex, ey) in enumerate(expect):
            assert (b.epoch, b.position) == (epoch, w)
            x, y, new = b.next_batch()
            assert x.dtype == y.dtype == np.int64 and x.shape == (2, 3)
            assert x.tolist() == ex and y.tolist() == ey
            assert new == (w == 0)
    assert (b.epoch, b.position) == (2, 0)


@pytest.mark.parametrize("N, B, T", [(1000, 4, 7), (101, 10, 10), (57, 1, 56), (64, 3, 5)])
def test_streams_continue_across_windows(N, B, T):
    ids = np.random.default_rng(N).integers(0, 50, N).astype(np.uint8)
    b = StreamBatcher(ids, B, T)
    S, W = (N - 1) // B, b.windows_per_epoch
    xs, ys = [], []
    for w in range(W):
        x, y, new = b.next_batch()
        xs.append(x)
        ys.append(y)
        assert new == (w == 0)
    X, Y = np.concatenate(xs, axis=1), np.concatenate(ys, axis=1)  # (B, W*T)
    for r in range(B):
        np.testing.assert_array_equal(X[r], ids[r * S: r * S + W * T])  # one contiguous stream per row
        np.testing.assert_array_equal(Y[r], ids[r * S + 1: r * S + W * T + 1])  # shifted by one
    _, _, new = b.next_batch()
    assert new and b.epoch == (W + 1) // W  # completed passes after W + 1 calls


@pytest.mark.parametrize("workers", [1, 2, 4, 8])
def test_rows_partition_equals_the_full_batch(workers):
    ids = np.random.default_rng(0).integers(0, 200, 5000)
    B = 8
    full = StreamBatcher(ids, B, 9)
    parts = [StreamBatcher(ids, B, 9, rows=slice(r * B // workers, (r + 1) * B // workers)) for r in range(workers)]
    for _ in range(full.windows_per_epoch + 3):  # across a wrap too
        x, y, new = full.next_batch()
        got = [p.next_batch() for p in parts]
        np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), x)
        np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), y)
        assert all(g[2] == new for g in got)
    odd = StreamBatcher(ids, B, 9, rows=range(1, 8, 3))
    full2 = StreamBatcher(ids, B, 9)
    np.testing.assert_array_equal(odd.next_batch()[0], full2.next_batch()[0][[1, 4, 7]])


@pytest.mark.parametrize("rows", [slice(8, 9), range(0), [0, 8], [-1], ["a"], 3])
def test_bad_rows(rows):
    with pytest.raises(ConfigError):
        StreamBatcher(np.arange(100), 8, 3, rows=rows)


def test_state_dict_resumes_exactly():
    ids = np.random.default_rng(1).integers(0, 65, 3000)
    a = StreamBatcher(ids, 5, 11)
    for _ in range(a.windows_per_epoch + 7):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # as it travels inside a checkpoint
    b = StreamBatcher(ids, 5, 11).load_state_dict(state)
    assert (b.epoch, b.position) == (a.epoch, a.position) == (1, 7)
    for _ in range(a.windows_per_epoch + 2):
        xa, ya, na = a.next_batch()
        xb, yb, nb = b.next_batch()
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        assert na == nb


@pytest.mark.parametrize(
    "change, words",
    [({"batch_size": 4}, "batch_size"), ({"seq_len": 3}, "seq_len"), ({"num_tokens": 5}, "num_tokens"),
     ({"position": 10**6}, "position"), ({"position": -1}, "position"), ({"epoch": "x"}, "epoch")],
)
def test_state_dict_mismatch(change, words):
    b = StreamBatcher(np.arange(3000), 5, 11)
    with pytest.raises(DataError, match=words):
        b.load_state_dict(dict(b.state_dict(), **change))


def test_iterate_once_covers_one_pass_without_moving():
    ids = np.arange(200)
    b = StreamBatcher(ids, 3, 4)
    b.next_batch()
    once = list(b.iterate_once())
    assert len(once) == b.windows_per_epoch and (b.epoch, b.position) == (0, 1)
    ref = StreamBatcher(ids, 3, 4)
    for x, y in once:
        rx, ry, _ = ref.next_batch()
        np.testing.assert_array_equal(x, rx)
        np.testing.assert_array_equal(y, ry)


def test_too_little_data():
    StreamBatcher(np.arange(13), 4, 3)  # exactly B*T + 1
    with pytest.raises(DataError) as ei:
        StreamBatcher(np.arange(12), 4, 3)
    msg = str(ei.value)
    assert "12 tokens" in msg and "13" in msg and "lower batch_size or seq_len" in msg


@pytest.mark.parametrize("kw", [{"batch_size": 0}, {"seq_len": -1}, {"batch_size": 2.0}, {"seq_len": True}])
def test_bad_sizes(kw):
    args = {"batch_size": 2, "seq_len": 2, **kw}
    with pytest.raises(ConfigError):
        StreamBatcher(np.arange(100), **args)


def test_bad_ids():
    with pytest.raises(DataError):
        StreamBatcher(np.zeros((10, 10), np.int64), 2, 2)
    with pytest.raises(DataError):
        StreamBatcher(np.zeros(100, np.float32), 2, 2)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_pipe_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)  # opening it for reading would block forever without a writer
    with pytest.raises(DataError, match="not a regular file"):
        read_corpus(fifo)


def test_a_path_that_is_not_a_path_is_a_config_error():
    for bad in (None, 5, ["a.txt"]):
        with pytest.raises(ConfigError, match="path must be the text file's path"):
            read_corpus(bad)
