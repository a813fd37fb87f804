"""Sampling: the on-device draw against a host inverse-CDF reference, and text generation
against teacher-forced replays of the model."""

import numpy as np
import pytest

import xrnn
from xrnn.data import Vocabulary
from xrnn.errors import ConfigError, DeviceError, DTypeError, ShapeError, VocabularyError
from xrnn.models import CharLM
from xrnn.modules import _grad_enabled
from xrnn.sampling import draw, generate, sample

from conftest import assert_on, put, to_np


def CharVocab(chars):
    """The library's character vocabulary, symbols in the given order."""
    return Vocabulary(list(chars), level="char")


def WordVocab(words):
    """The library's word vocabulary (RNNLM): the words plus an unknown token."""
    return Vocabulary(["<unk>"] + list(words), level="word", unk="<unk>")


class KeyErrorVocab:
    """A user-written vocabulary whose encode raises a bare KeyError on unknown symbols."""

    def __init__(self, chars):
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self):
        return len(self.chars)

    def encode(self, text):
        return np.array([self.index[c] for c in text], dtype=np.int64)  # KeyError on unknowns

    def decode(self, ids):
        return "".join(self.chars[int(i)] for i in ids)

    def to_config(self):
        return {"chars": "".join(self.chars)}


# ---------------------------------------------------------------------------
# host reference for one draw
# ---------------------------------------------------------------------------

def ref_draw(logits, u, temperature=1.0, top_k=None, top_p=None, greedy=False):
    """Straightforward float64 NumPy version of the documented draw, one row at a time."""
    logits = np.asarray(logits, dtype=np.float64)
    out = []
    for b in range(logits.shape[0]):
        z = logits[b] / temperature
        if greedy:
            out.append(int(np.argmax(z)))
            continue
        if top_k is not None and top_k < z.size:
            kth = np.sort(z)[::-1][top_k - 1]
            z = np.where(z >= kth, z, -np.inf)
        prob = np.exp(z - z.max())
        prob /= prob.sum()
        if top_p is not None and top_p < 1:
            order = np.argsort(-prob, kind="stable")
            n = int(np.searchsorted(np.cumsum(prob[order]), top_p, side="left")) + 1
            kept = np.zeros(z.size, dtype=bool)
            kept[order[:n]] = True
            kept |= prob >= prob[order[n - 1]]  # ties with the last kept token
            prob = np.where(kept, prob, 0.0)
        cdf = np.cumsum(prob)
        # token j for cdf[j-1] <= u * total < cdf[j]; never past the last token of nonzero probability
        out.append(min(int(np.searchsorted(cdf, u[b] * cdf[-1], side="right")),
                       int(np.searchsorted(cdf, cdf[-1], side="left"))))
    return np.array(out)


OPTIONS = [
    {},
    {"temperature": 0.5},
    {"temperature": 2.0},
    {"top_k": 1},
    {"top_k": 3},
    {"top_k": 50},  # k >= V keeps everything
    {"top_p": 0.5},
    {"top_p": 0.9},
    {"top_p": 1.0},
    {"top_k": 4, "top_p": 0.6, "temperature": 0.7},
    {"greedy": True},
    {"greedy": True, "temperature": 3.0, "top_k": 2},
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_draw_equals_host_inverse_cdf(device, opts):
    rng = np.random.default_rng(0)
    logits_np = rng.standard_normal((64, 9)) * 2.0
    u_np = rng.random(64)
    logits, u = put(device, logits_np), put(device, u_np)
    ids = draw(logits, u, **opts)
    assert_on(device, ids)
    assert device.xp.isdtype(ids.dtype, "integral") and tuple(ids.shape) == (64,)
    np.testing.assert_array_equal(to_np(ids), ref_draw(logits_np, u_np, **opts))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("opts", OPTIONS + [{"temperature": 0.7}, {"temperature": 1.3}],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_numpy_samplers_draw_equals_the_portable_draw(dtype, opts):
    """The NumPy sampler's draw (kernels.numpy_step.draw: NumPy's functions called directly) picks
    the ids of the portable draw through the Array API namespace, on rows with ties, masked
    tokens and nearly flat or peaked distributions, and u at the ends of [0, 1)."""
    from xrnn.kernels.numpy_step import draw as numpy_draw
    from xrnn.sampling import check_sampling_options

    rng = np.random.default_rng(5)
    n, V = 3000, 11
    z = rng.standard_normal((n, V)) * rng.choice([0.01, 1.0, 8.0], size=(n, 1))
    z[::7] = np.round(z[::7])  # ties
    z[3::9, :4] = -30.0
    logits = z.astype(dtype)
    # u within a few ulps of a step of each row's CDF (from float64), so that a rounding
    # difference in the draw's arithmetic would change ids
    udt = np.float64 if dtype == "float64" else np.float32
    zt = logits.astype(np.float64) / opts.get("temperature", 1.0)
    cdf = np.cumsum(np.exp(zt - zt.max(axis=1, keepdims=True)), axis=1)
    step = (cdf[np.arange(n), rng.integers(0, V, n)] / cdf[:, -1]).astype(udt)
    u = step
    for _ in range(3):
        u = np.where(rng.random(n) < 0.5, np.nextafter(u, udt(0.0)), np.nextafter(u, udt(1.0)))
    u = np.minimum(np.where(rng.random(n) < 0.3, step, u), np.nextafter(udt(1.0), udt(0.0))).astype(udt)
    u[:3] = [0.0, np.nextafter(udt(1.0), udt(0.0)), 0.5]
    t, k, p, greedy = check_sampling_options(**{"temperature": 1.0, **opts})
    np.testing.assert_array_equal(numpy_draw(logits, u, t, k, p, greedy), draw(logits, u, **opts))


@pytest.mark.parametrize("opts", [{"top_k": 3}, {"top_p": 0.5}])
def test_a_token_of_probability_zero_is_never_drawn(light_device, opts):
    """Not at u = 0, where the CDF's leading entries of masked tokens equal the threshold, nor at
    the largest u below 1, whose threshold may round up to the total past trailing masked tokens."""
    logits_np = np.array([[-5.0, -4.0, 3.0, 2.5, 2.0, -6.0], [3.0, -9.0, -8.0, 2.9, -9.5, -9.6]])
    first = {"top_k": [2, 0], "top_p": [2, 0]}[next(iter(opts))]  # the first kept token of each row
    last = {"top_k": [4, 3], "top_p": [2, 0]}[next(iter(opts))]  # the last
    for dtype in ("float32", "float64"):
        udt = np.float32 if dtype == "float32" else np.float64
        for u0, want in ((0.0, first), (np.nextafter(udt(1.0), udt(0.0)), last)):
            u = put(light_device, np.full(2, u0, dtype=udt))
            ids = to_np(draw(put(light_device, logits_np, dtype), u, **opts))
            assert ids.tolist() == want, (dtype, u0)
            assert ref_draw(logits_np, np.full(2, float(u0)), **opts).tolist() == want


def _counts(device, logits_row, n, seed=0, dtype="float32", **opts):
    """Draw n times from one distribution (as one batch of n rows)."""
    logits = put(device, np.tile(np.asarray(logits_row, dtype=np.float64), (n, 1)), dtype)
    u = put(device, np.random.default_rng(seed).random(n), dtype)
    ids = to_np(draw(logits, u, **opts))
    return np.bincount(ids, minlength=len(logits_row))


def _chi2(counts, p):
    n = counts.sum()
    keep = p > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was drawn"
    e = n * p[keep]
    return float(((counts[keep] - e) ** 2 / e).sum())


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_draw_frequencies_match_softmax(light_device, temperature):
    logits = np.array([1.0, 0.2, -0.5, 2.0, 0.0, -2.0])
    counts = _counts(light_device, logits, 20000, temperature=temperature)
    p = np.exp(logits / temperature)
    p /= p.sum()
    # chi-square with 5 degrees of freedom: 30 is beyond the 99.998th percentile
    assert _chi2(counts, p) < 30, (counts, p * counts.sum())


def test_top_k_never_leaves_the_k_largest(light_device):
    logits = np.array([0.3, 2.0, -1.0, 1.5, 0.9, 1.2, -0.2, 0.0])
    counts = _counts(light_device, logits, 20000, top_k=3)
    top3 = np.argsort(-logits)[:3]
    assert set(np.nonzero(counts)[0]) == set(top3)
    p = np.where(np.isin(np.arange(8), top3), np.exp(logits), 0.0)
    assert _chi2(counts, p / p.sum()) < 25


def test_top_k_keeps_ties_with_the_kth_value(light_device):
    counts = _counts(light_device, [1.0, 0.0, 1.0, 1.0, -1.0], 3000, top_k=1)
    assert set(np.nonzero(counts)[0]) == {0, 2, 3}


@pytest.mark.parametrize("top_p,nucleus", [
    (0.3, {1}),  # the top token alone already reaches 0.3
    (0.45, {1}),  # 0.45 reaches 0.45 exactly: the top token alone
    (0.65, {1, 3}),  # 0.45 < 0.65 <= 0.70
    (0.71, {1, 3, 4}),  # 0.70 < 0.71 <= 0.85
    (0.9, {1, 3, 4, 0}),
    (1.0, {0, 1, 2, 3, 4}),
])
def test_top_p_keeps_exactly_the_minimal_nucleus(light_device, top_p, nucleus):
    probs = np.array([0.10, 0.45, 0.05, 0.25, 0.15])  # deliberately not sorted
    n = 4000
    logits = put(light_device, np.tile(np.log(probs), (n, 1)), "float64")
    u = put(light_device, (np.arange(n) + 0.5) / n, "float64")  # a uniform grid: exact frequencies
    counts = np.bincount(to_np(draw(logits, u, top_p=top_p)), minlength=5)
    assert set(np.nonzero(counts)[0]) == nucleus
    kept = np.array([i in nucleus for i in range(5)])
    expected = n * np.where(kept, probs, 0) / probs[kept].sum()
    assert np.all(np.abs(counts - expected) <= 1.0), (counts, expected)


def test_greedy_is_argmax_and_ignores_u(device):
    logits_np = np.random.default_rng(3).standard_normal((5, 7))
    ids = draw(put(device, logits_np), None, greedy=True)
    np.testing.assert_array_equal(to_np(ids), logits_np.argmax(axis=1))


def test_draw_float16_logits():
    counts = _counts(xrnn.resolve_device("cpu"), [0.0, 1.0, 0.5], 6000, dtype="float16")
    p = np.exp([0.0, 1.0, 0.5])
    assert _chi2(counts, p / p.sum()) < 20


@pytest.mark.parametrize("opts,match", [
    ({"temperature": 0}, "greedy=True"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0.0}, r"\(0, 1\]"),
    ({"top_p": 1.5}, r"\(0, 1\]"),
    ({"top_p": float("nan")}, r"\(0, 1\]"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_k": True}, "top_k"),
])
def test_draw_rejects_bad_options(opts, match):
    logits, u = np.zeros((2, 3)), np.zeros(2)
    with pytest.raises(ConfigError, match=match):
        draw(logits, u, **opts)


def test_draw_rejects_bad_arrays():
    with pytest.raises(DTypeError):
        draw(np.zeros((2, 3), dtype=np.int64), np.zeros(2))
    with pytest.raises(ShapeError, match=r"\(B, V\)"):
        draw(np.zeros(3), np.zeros(1))
    with pytest.raises(ShapeError, match="u must be"):
        draw(np.zeros((2, 3)), np.zeros(3))
    with pytest.raises(ShapeError, match="needs u"):
        draw(np.zeros((2, 3)), None)
    strict = xrnn.resolve_device("array_api_strict:device1")
    with pytest.raises(DeviceError):
        draw(put(strict, np.zeros((2, 3))), np.zeros(2))


# ---------------------------------------------------------------------------
# generation with a model
# ---------------------------------------------------------------------------

VOCAB = CharVocab("abcdefg\n ")


def _model(dev="cpu", cell="lstm", dtype="float64", seed=5, **kw):
    m = CharLM(len(VOCAB), 12, 2, cell, device=dev, dtype=dtype, seed=seed, vocab=VOCAB, **kw)
    # larger weights than the init: the next token then depends strongly on the
    # whole history, so a mishandled prime or state changes the text
    m.load_state_dict({k: 4.0 * to_np(v) for k, v in m.state_dict().items()})
    return m


def _replay(model, texts, prime, length, seed, **opts):
    """Check generated texts by teacher forcing: one forward over each full text and the
    host reference draw with the documented uniform numbers (one rng.random(B) per step)."""
    B = len(texts)
    rng = np.random.default_rng(seed)
    ids = np.stack([VOCAB.encode(t) for t in texts])  # (B, P + length)
    P = len(prime)
    assert ids.shape[1] == P + length
    start = P
    if P == 0:
        np.testing.assert_array_equal(ids[:, 0], rng.integers(0, len(VOCAB), size=B))
        start = 1
    dev = model.device
    with xrnn.no_grad():
        logits = to_np(model.forward(dev.asarray(ids, dtype="int64"))[0])  # (B, T, V)
    for pos in range(start, P + length):
        u = None if opts.get("greedy") else rng.random(B)
        expected = ref_draw(logits[:, pos - 1, :], u, **opts)
        np.testing.assert_array_equal(ids[:, pos], expected, err_msg=f"position {pos}")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_greedy_equals_teacher_forced_argmax_chain(light_device, cell):
    m = _model(light_device, cell)
    text = sample(m, length=25, prime="bad cab", greedy=True)
    assert text.startswith("bad cab") and len(text) == len("bad cab") + 25
    _replay(m, [text], "bad cab", 25, seed=None, greedy=True)


@pytest.mark.parametrize("opts", [{}, {"temperature": 0.6, "top_k": 4}, {"top_p": 0.8}])
def test_sampled_text_replays_with_the_documented_randomness(light_device, opts):
    m = _model(light_device)
    text = sample(m, length=30, prime="fed", seed=123, **opts)
    _replay(m, [text], "fed", 30, seed=123, **opts)


def test_no_prime_starts_from_a_uniform_token_and_replays():
    m = _model()
    text = sample(m, length=20, seed=9)
    assert len(text) == 20
    _replay(m, [text], "", 20, seed=9)


def test_parallel_samples_replay_row_by_row(light_device):
    m = _model(light_device)
    texts = sample(m, length=15, prime="ab", seed=4, num_samples=3)
    assert isinstance(texts, list) and len(texts) == 3 and len(set(texts)) > 1
    _replay(m, texts, "ab", 15, seed=4)
    greedy = sample(m, length=15, prime="ab", greedy=True, num_samples=2)
    assert greedy == [sample(m, length=15, prime="ab", greedy=True)] * 2


def test_same_seed_same_text_on_numpy_and_strict_device1():
    a = sample(_model("cpu", dtype="float32"), length=60, prime="ace", seed=17, top_p=0.95)
    b = sample(_model("array_api_strict:device1", dtype="float32"), length=60, prime="ace", seed=17, top_p=0.95)
    assert a == b
    c = sample(_model("cpu", dtype="float32"), length=60, prime="ace", seed=18, top_p=0.95)
    assert c != a


def test_streaming_pieces_concatenate_to_the_sample(light_device):
    m = _model(light_device)
    pieces = list(generate(m, length=12, prime="gag", seed=2))
    assert pieces[0] == "gag" and len(pieces) == 13 and all(len(p) == 1 for p in pieces[1:])
    assert "".join(pieces) == sample(m, length=12, prime="gag", seed=2)
    without = sample(m, length=12, prime="gag", seed=2, include_prime=False)
    assert without == "".join(pieces[1:])
    assert list(generate(m, length=0, prime="gag")) == ["gag"]
    assert sample(m, length=0) == ""


@pytest.mark.parametrize("opts", [{}, {"top_k": 3}, {"top_p": 0.8, "temperature": 0.7}, {"greedy": True}])
def test_each_token_costs_one_read_of_the_chosen_ids_only(sync_counter, opts):
    """The draw runs on the device: per produced token the host reads the B chosen ids and
    nothing else (never a (B, V) distribution)."""
    m = _model("array_api_strict:device1")
    B = 3
    counts = {}
    for length in (5, 15):
        sync_counter.clear()
        sample(m, length=length, prime="ga", seed=1, num_samples=B, **opts)
        counts[length] = list(zip(sync_counter, sync_counter.sizes))
    extra = len(counts[15]) - len(counts[5])
    assert extra == 10, counts[15]  # one conversion per token
    assert all(size <= B for _, size in counts[15]), counts[15]


def test_generator_does_not_leak_no_grad_or_eval_mode():
    m = _model(dropout=0.3)
    m.head.train(False)  # a mixed mode must come back as it was
    gen = generate(m, length=5, prime="ab", seed=0)
    next(gen)
    next(gen)
    assert _grad_enabled(), "a suspended sampler must not keep the caller in no_grad"
    assert m.training and m.rnn.training and not m.head.training
    rest = list(gen)
    assert len(rest) == 4
    assert m.training and not m.head.training
    m.eval()
    sample(m, length=3, prime="a")
    assert not m.training


def test_sampling_uses_eval_mode_and_leaves_the_model_rng_alone():
    m = _model(dropout=0.5, seed=1)
    ref = _model(dropout=0.0, seed=1)  # same weights, no dropout
    state = m.rng.bit_generator.state
    assert sample(m, length=20, prime="abc", seed=3) == sample(ref, length=20, prime="abc", seed=3)
    assert m.rng.bit_generator.state == state


def test_device_argument_samples_with_a_copy():
    m = _model("cpu", dtype="float32")
    text = sample(m, length=20, prime="a", seed=1, device="array_api_strict:device1")
    assert m.device.name == "cpu"
    assert text == sample(m, length=20, prime="a", seed=1)


def test_model_convenience_methods_and_explicit_vocab():
    m = _model()
    assert m.sample(10, prime="a", seed=0) == sample(m, length=10, prime="a", seed=0)
    assert "".join(m.generate(10, prime="a", seed=0)) == m.sample(10, prime="a", seed=0)
    bare = CharLM(len(VOCAB), 12, 2, dtype="float64", seed=5)
    bare.load_state_dict(m.state_dict())
    assert sample(bare, VOCAB, length=10, prime="a", seed=0) == m.sample(10, prime="a", seed=0)


def test_word_level_pieces_keep_separators():
    vocab = WordVocab(["the", "cat", "sat", "on", "mat", "a", "dog"])
    m = CharLM(len(vocab), 10, 1, "gru", embedding_dim=6, seed=0, vocab=vocab)
    pieces = list(generate(m, length=8, prime="the zebra", seed=1))
    assert pieces[0] == "the <unk>"  # the decoded prime: unknown words map to <unk>
    assert all(p.startswith(" ") for p in pieces[1:])
    words = "".join(pieces).split(" ")
    assert len(words) == 2 + 8 and all(w in vocab for w in words)
    assert "".join(pieces) == sample(m, length=8, prime="the zebra", seed=1)


def test_prime_outside_the_vocabulary():
    m = _model()
    with pytest.raises(VocabularyError, match=r"'x'.*'z'"):
        generate(m, length=5, prime="axbz")  # raised at the call, before the first next()
    with pytest.raises(VocabularyError, match="'q'"):
        sample(m, length=5, prime="q")
    with pytest.raises(VocabularyError, match="cannot be encoded.*'x'"):
        sample(m, KeyErrorVocab(VOCAB.tokens), length=5, prime="ax")


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": 0.0}, "greedy"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"length": -1}, "length"),
    ({"length": 2.5}, "length"),
    ({"num_samples": 0}, "num_samples"),
    ({"prime": 5}, "prime"),
])
def test_generate_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        generate(_model(), **kwargs)


def test_vocabulary_required_and_matching():
    bare = CharLM(len(VOCAB), 4, 1, seed=0)
    with pytest.raises(ConfigError, match="attach"):
        sample(bare, length=3)
    with pytest.raises(ConfigError, match="predicts"):
        sample(bare, CharVocab("ab"), length=3)
