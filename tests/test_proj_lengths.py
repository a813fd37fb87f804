"""The rest of ``torch.nn.LSTM``: projections (``proj_size``) and variable-length batches (``lengths=``).

Proven three ways: PyTorch autograd (``torch.nn.LSTM(proj_size=...)`` with the
same weights, and ``pack_padded_sequence``/``pad_packed_sequence`` with
``enforce_sorted`` True and False), float64 finite differences on every
backend, and the NumPy fast scans against the portable ones.
"""

import numpy as np
import pytest

import xrnn
from xrnn.errors import ConfigError, DTypeError, ShapeError

from conftest import assert_on, check_gradients, put, to_np

torch = pytest.importorskip("torch")

I, H, P = 3, 4, 2
CLS = {"rnn": xrnn.RNN, "lstm": xrnn.LSTM, "gru": xrnn.GRU, "lstmp": xrnn.LSTM}
TORCH = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "lstmp": torch.nn.LSTM}


def _build(cell, dev="cpu", seed=0, **opts):
    extra = {"proj_size": P} if cell == "lstmp" else {}
    m = CLS[cell](I, H, dtype="float64", device=dev, seed=seed, **extra, **opts)
    t = TORCH[cell](I, H, dtype=torch.float64, **extra, **opts)
    with torch.no_grad():
        t.load_state_dict({k: torch.from_numpy(np.array(to_np(v))) for k, v in m.state_dict().items()})
    return m, t


def _data(m, cell, T, B, lengths, give_state, give_dstate, seed=1):
    rng = np.random.default_rng(seed)
    LD, W, H, I = m.num_layers * m.num_directions, m.output_size, m.hidden_size, m.input_size
    x = rng.standard_normal((B, T, I) if m.batch_first else (T, B, I))
    state = dstate = None
    if give_state:
        state = rng.standard_normal((LD, B, W))
        if cell.startswith("lstm"):
            state = (state, rng.standard_normal((LD, B, H)))
    if give_dstate:
        dstate = rng.standard_normal((LD, B, W))
        if cell.startswith("lstm"):
            dstate = (dstate, rng.standard_normal((LD, B, H)))
    R = rng.standard_normal(x.shape[:-1] + (W * m.num_directions,))
    return x, state, dstate, R


def _dev_state(dev, s):
    if s is None:
        return None
    return tuple(put(dev, v) for v in s) if isinstance(s, tuple) else put(dev, s)


def _flat(s):
    return [] if s is None else (list(s) if isinstance(s, tuple) else [s])


def _torch_run(t, x, state, dstate, R, lengths, enforce_sorted):
    """torch's result: out (padded, zero past each length), final state, and every gradient."""
    xt = torch.tensor(x, requires_grad=True)
    st = None
    if state is not None:
        st = tuple(torch.tensor(v, requires_grad=True) for v in _flat(state))
        st = st if len(st) == 2 else st[0]
    inp = xt
    if lengths is not None:
        inp = torch.nn.utils.rnn.pack_padded_sequence(xt, torch.tensor(lengths), batch_first=t.batch_first,
                                                      enforce_sorted=enforce_sorted)
    out, fin = t(inp, st)
    if lengths is not None:
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=t.batch_first,
                                                        total_length=x.shape[1 if t.batch_first else 0])
    loss = (out * torch.tensor(R)).sum()
    for f, g in zip(_flat(fin), _flat(dstate)):
        loss = loss + (f * torch.tensor(g)).sum()
    loss.backward()
    grads = {k: v.grad.numpy() for k, v in t.named_parameters()}
    dst = None if st is None else [v.grad.numpy() for v in _flat(st)]
    return out.detach().numpy(), [f.detach().numpy() for f in _flat(fin)], xt.grad.numpy(), dst, grads


def _xrnn_run(m, dev, x, state, dstate, R, lengths, lengths_on_device=False):
    lens = None
    if lengths is not None:
        lens = dev.asarray(np.asarray(lengths), dtype="int64") if lengths_on_device else np.asarray(lengths)
    out, fin = m(put(dev, x), _dev_state(dev, state), lengths=lens)
    m.zero_grad()
    dx, ds0 = m.backward(put(dev, R), _dev_state(dev, dstate))
    assert_on(dev, out, dx, *_flat(fin), *_flat(ds0))
    return to_np(out), [to_np(f) for f in _flat(fin)], to_np(dx), [to_np(v) for v in _flat(ds0)], \
        {k: to_np(v) for k, v in m.grads.items()}


def _compare(mine, ref, with_state):
    out, fin, dx, ds0, grads = mine
    tout, tfin, tdx, tds0, tgrads = ref
    assert len(fin) == len(tfin) and (not with_state or len(ds0) == len(tds0))
    tol = dict(rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(out, tout, err_msg="out", **tol)
    for a, b in zip(fin, tfin):
        np.testing.assert_allclose(a, b, err_msg="final state", **tol)
    np.testing.assert_allclose(dx, tdx, err_msg="dx", **tol)
    if with_state:
        for a, b in zip(ds0, tds0):
            np.testing.assert_allclose(a, b, err_msg="initial-state gradient", **tol)
    assert set(grads) == set(tgrads)
    for k in grads:
        np.testing.assert_allclose(grads[k], tgrads[k], err_msg=k, **tol)


# (name, options, T, B, give initial state, give final-state gradient)
OPTIONS = [
    ("base", {}, 4, 3, False, False),
    ("two_layers", {"num_layers": 2}, 4, 3, True, True),
    ("bidirectional", {"bidirectional": True}, 4, 3, True, True),
    ("bidir_two_layers_batch_first", {"bidirectional": True, "num_layers": 2, "batch_first": True}, 5, 4, True, True),
    ("no_bias", {"bias": False, "bidirectional": True}, 3, 2, False, True),
]


# -- proj_size ------------------------------------------------------------------

@pytest.mark.parametrize("opt", OPTIONS, ids=[o[0] for o in OPTIONS])
def test_proj_matches_torch(opt):
    name, opts, T, B, gs, gd = opt
    m, t = _build("lstmp", **opts)
    dev = m.device
    x, state, dstate, R = _data(m, "lstmp", T, B, None, gs, gd)
    out, (h, c) = m(put(dev, x))
    assert to_np(out).shape[-1] == P * m.num_directions and to_np(h).shape[-1] == P and to_np(c).shape[-1] == H
    _compare(_xrnn_run(m, dev, x, state, dstate, R, None), _torch_run(t, x, state, dstate, R, None, True), gs)


def test_proj_names_shapes_init_and_state_dicts_both_ways():
    m = xrnn.LSTM(5, 6, num_layers=2, bidirectional=True, proj_size=3, seed=0, dtype="float64")
    t = torch.nn.LSTM(5, 6, num_layers=2, bidirectional=True, proj_size=3, dtype=torch.float64)
    assert list(m.state_dict()) == [k for k, _ in t.named_parameters()]  # names and torch's order
    for k, v in t.state_dict().items():
        assert to_np(m.state_dict()[k]).shape == tuple(v.shape), k
    assert to_np(m.weight_hr_l1_reverse).shape == (3, 6) and to_np(m.weight_hh_l0).shape == (24, 3)
    assert to_np(m.weight_ih_l1).shape == (24, 6)  # the next layer reads D * proj_size
    k = 1 / np.sqrt(6)  # torch's reset_parameters: U(-1/sqrt(hidden), 1/sqrt(hidden)) for all, weight_hr too
    for name, v in m.state_dict().items():
        assert np.all(np.abs(to_np(v)) <= k), name
    assert np.std(to_np(m.weight_hr_l0)) > k / 4
    # torch -> xrnn -> torch
    m.load_state_dict(t.state_dict())
    t2 = torch.nn.LSTM(5, 6, num_layers=2, bidirectional=True, proj_size=3, dtype=torch.float64)
    t2.load_state_dict({k: torch.from_numpy(np.array(to_np(v))) for k, v in m.state_dict().items()})
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    np.testing.assert_allclose(t2(x)[0].detach().numpy(), t(x)[0].detach().numpy())
    np.testing.assert_allclose(to_np(m(x.numpy())[0]), t(x)[0].detach().numpy(), rtol=1e-12, atol=1e-13)
    assert "proj_size=3" in repr(m)


def test_proj_gradcheck(device):
    m = xrnn.LSTM(2, 3, num_layers=2, bidirectional=True, proj_size=2, device=device, dtype="float64", seed=3)
    x, state, dstate, R = _data(m, "lstmp", 3, 2, None, True, True, seed=4)
    _gradcheck(device, m, x, state, dstate, R, None)


def test_proj_refused_as_torch_does():
    with pytest.raises(ConfigError, match="smaller than hidden_size"):
        xrnn.LSTM(3, 4, proj_size=4)
    with pytest.raises(ConfigError, match="non-negative"):
        xrnn.LSTM(3, 4, proj_size=-1)
    with pytest.raises(ConfigError, match="non-negative"):
        xrnn.LSTM(3, 4, proj_size=1.5)
    for cls in (xrnn.GRU, xrnn.RNN):
        with pytest.raises(ConfigError, match="only supported for LSTM"):
            cls(3, 4, proj_size=2)
    m = xrnn.LSTM(3, 4, proj_size=2)
    with pytest.raises(ShapeError, match="proj_size"):  # h is (L*D, B, P), not (L*D, B, H)
        m(np.zeros((2, 1, 3), np.float32), (np.zeros((1, 1, 4), np.float32), np.zeros((1, 1, 4), np.float32)))
    for v in (xrnn.LSTM(3, 4, proj_size=0), xrnn.GRU(3, 4, proj_size=0)):  # 0: no projection, as torch
        assert v.output_size == 4


# -- lengths ----------------------------------------------------------------------

def _lengths(T, B, sorted_):
    lens = np.random.default_rng(T * 10 + B).integers(1, T + 1, size=B)
    lens[0] = T  # pad_packed_sequence pads to the longest; total_length=T covers the rest anyway
    lens[-1] = 1
    return np.sort(lens)[::-1].copy() if sorted_ else lens


@pytest.mark.parametrize("sorted_", [True, False], ids=["enforce_sorted", "unsorted"])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru", "lstmp"])
@pytest.mark.parametrize("opt", OPTIONS, ids=[o[0] for o in OPTIONS])
def test_lengths_match_torch_packed(opt, cell, sorted_):
    name, opts, T, B, gs, gd = opt
    m, t = _build(cell, **opts)
    x, state, dstate, R = _data(m, cell, T, B, None, gs, gd)
    lens = _lengths(T, B, sorted_)
    mine = _xrnn_run(m, m.device, x, state, dstate, R, lens)
    _compare(mine, _torch_run(t, x, state, dstate, R, lens, sorted_), gs)
    # padding: zero outputs and zero input gradient past each length
    out, dx = mine[0], mine[2]
    if m.batch_first:
        out, dx = np.swapaxes(out, 0, 1), np.swapaxes(dx, 0, 1)
    for b, n in enumerate(lens):
        assert not np.any(out[n:, b, :]) and not np.any(dx[n:, b, :])


def test_lengths_gradcheck(device):
    """Finite differences through segments: unsorted lengths, both directions, 2 layers, states."""
    for cell in ("lstm", "gru"):
        m = CLS[cell](2, 2, num_layers=2, bidirectional=True, device=device, dtype="float64", seed=7)
        T, B = 4, 3
        x, state, dstate, R = _data(m, cell, T, B, None, True, True, seed=8)
        _gradcheck(device, m, x, state, dstate, R, np.array([2, 4, 1]))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("row_multiple", [8, 2], ids=["rows_as_given", "rows_padded"])
def test_lengths_on_device_and_fast_path_equal_portable(light_device, cell, row_multiple, monkeypatch):
    from xrnn.kernels import numpy_fast

    # NumPy's scans pad each product's rows to a multiple of _ROW_MULTIPLE: with 2, the segments'
    # 5, 3 and 1 rows... run as 6 and 4 (1 stays); with 8 none is padded
    monkeypatch.setattr(numpy_fast, "_ROW_MULTIPLE", row_multiple)
    monkeypatch.setattr(numpy_fast, "_RNN_FAST_MIN", 0)  # the Elman RNN's fast scans at this size too
    dev = light_device
    m = CLS[cell](I, H, num_layers=2, bidirectional=True, batch_first=True, device=dev, dtype="float64", seed=2)
    x, state, dstate, R = _data(m, cell, 6, 5, None, True, True)
    lens = np.array([3, 6, 1, 6, 4])
    a = _xrnn_run(m, dev, x, state, dstate, R, lens, lengths_on_device=True)
    with xrnn.kernels.use_fast_paths(False):
        b = _xrnn_run(m, dev, x, state, dstate, R, lens)
    # out, final states, dx, initial-state gradients, parameter gradients
    flat_a = [a[0], *a[1], a[2], *a[3]] + [a[4][k] for k in sorted(a[4])]
    flat_b = [b[0], *b[1], b[2], *b[3]] + [b[4][k] for k in sorted(b[4])]
    n_state = 2 if cell == "lstm" else 1
    assert len(flat_a) == len(flat_b) == 1 + n_state + 1 + n_state + len(m.parameters())
    for p, q in zip(flat_a, flat_b):
        np.testing.assert_allclose(p, q, rtol=1e-12, atol=1e-13)
    # all lengths equal T: the same numbers as no lengths at all
    full = _xrnn_run(m, dev, x, state, dstate, R, np.full(5, 6))
    none = _xrnn_run(m, dev, x, state, dstate, R, None)
    np.testing.assert_array_equal(full[0], none[0])
    np.testing.assert_array_equal(full[2], none[2])


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_a_batch_of_empty_sequences_passes_its_state_through(light_device, cell):
    """Masks may empty every row of a batch (lengths all 0, which the Keras-style layers allow): no
    step runs, the outputs and the input gradient are zero, the final state is the initial state
    and its gradient passes back unchanged, and no weight gets a gradient."""
    dev = light_device
    m = CLS[cell](I, H, bidirectional=True, device=dev, dtype="float64", seed=4)
    rng = np.random.default_rng(0)
    x = put(dev, rng.standard_normal((5, 3, I)))
    h0 = rng.standard_normal((2, 3, H))
    state = (put(dev, h0), put(dev, 2 * h0)) if cell == "lstm" else put(dev, h0)
    out, hn = m._forward(x, state, np.zeros(3, dtype=np.int64), 0)
    assert not to_np(out).any()
    for got, want in zip(hn if cell == "lstm" else (hn,), state if cell == "lstm" else (state,)):
        np.testing.assert_array_equal(to_np(got), to_np(want))
    dh = rng.standard_normal((2, 3, H))
    dstate = (put(dev, dh), put(dev, 3 * dh)) if cell == "lstm" else put(dev, dh)
    dx, d0 = m.backward(put(dev, rng.standard_normal((5, 3, 2 * H))), dstate)
    assert not to_np(dx).any()
    for got, want in zip(d0 if cell == "lstm" else (d0,), dstate if cell == "lstm" else (dstate,)):
        np.testing.assert_array_equal(to_np(got), to_np(want))
    assert not any(to_np(g).any() for g in m.grads.values())


def test_lengths_refused_clearly():
    m = xrnn.GRU(I, H)
    x = np.zeros((4, 2, I), np.float32)
    with pytest.raises(ShapeError, match=r"\[1, timesteps=4\].*empty sequences"):
        m(x, lengths=[0, 3])
    with pytest.raises(ShapeError, match=r"\[1, timesteps=4\]"):
        m(x, lengths=[5, 3])
    with pytest.raises(ShapeError, match=r"shape \(batch,\) = \(2,\)"):
        m(x, lengths=[4, 3, 1])
    with pytest.raises(DTypeError, match="integers"):
        m(x, lengths=np.array([4.0, 3.0]))
    with pytest.raises(ShapeError, match="batched"):
        m(x[:, 0, :], lengths=[3])


def _gradcheck(dev, m, x, state, dstate, R, lengths):
    flat_state = _flat(state)
    names = {f"s{i}": v for i, v in enumerate(flat_state)}

    def loss_at(x=x, **over):
        st = [over.get(f"s{i}", v) for i, v in enumerate(flat_state)]
        st = None if not st else (tuple(put(dev, v) for v in st) if len(st) == 2 else put(dev, st[0]))
        out, fin = m(put(dev, x), st, lengths=lengths)
        val = float(np.sum(to_np(out) * R))
        for f, g in zip(_flat(fin), _flat(dstate)):
            val += float(np.sum(to_np(f) * g))
        return val

    out, fin = m(put(dev, x), _dev_state(dev, state), lengths=lengths)
    m.zero_grad()
    dx, ds0 = m.backward(put(dev, R), _dev_state(dev, dstate))
    analytic = {k: to_np(v) for k, v in m.grads.items()}
    analytic["x"] = to_np(dx)
    for i, v in enumerate(_flat(ds0)):
        analytic[f"s{i}"] = to_np(v)
    check_gradients(dev, m, loss_at, analytic, {"x": x, **names}, directions=1, seed=11)


# -- pad_sequences ----------------------------------------------------------------

def test_pad_sequences(light_device):
    dev = light_device
    seqs = [np.arange(6.0).reshape(3, 2), np.ones((1, 2)), np.full((4, 2), 7.0)]
    padded, lens = xrnn.pad_sequences(seqs, batch_first=True, padding_value=-1.0, dtype="float32", device=dev)
    assert_on(dev, padded)
    assert isinstance(lens, np.ndarray) and lens.tolist() == [3, 1, 4]
    ref = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in seqs], batch_first=True, padding_value=-1.0)
    np.testing.assert_array_equal(to_np(padded), ref.numpy().astype(np.float32))
    assert xrnn.backend.dtype_name(padded.dtype) == "float32"
    tm, _ = xrnn.pad_sequences(seqs, device=dev, dtype="float32")  # time-major by default, as torch
    np.testing.assert_array_equal(to_np(tm), np.where(ref.numpy() == -1, 0, ref.numpy()).swapaxes(0, 1))
    ids, id_lens = xrnn.pad_sequences([[4, 5, 6], [7]], batch_first=True, device=dev)  # word ids stay integers
    assert id_lens.tolist() == [3, 1] and to_np(ids).tolist() == [[4, 5, 6], [7, 0, 0]]
    assert xrnn.backend.dtype_name(ids.dtype) == "int64"
    # straight into a layer: the same numbers as each sequence alone
    m = xrnn.LSTM(2, 3, batch_first=True, device=dev, seed=0)
    out, (h, c) = m(padded, lengths=lens)
    for b, s in enumerate(seqs):
        o1, (h1, _) = m(dev.asarray(s[None, ...], dtype="float32"))
        np.testing.assert_allclose(to_np(out)[b, : len(s)], to_np(o1)[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(to_np(h)[:, b], to_np(h1)[:, 0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ShapeError, match="non-empty list"):
        xrnn.pad_sequences([])
    with pytest.raises(ShapeError, match="feature shape"):
        xrnn.pad_sequences([np.zeros((2, 3)), np.zeros((2, 4))])


# -- CharLM -----------------------------------------------------------------------

def test_charlm_proj_size_checkpoint_round_trip(tmp_path):
    m = xrnn.CharLM(11, hidden_size=8, num_layers=2, embedding_dim=5, proj_size=3, seed=0, dtype="float64")
    assert m.config["proj_size"] == 3 and to_np(m.head.weight).shape == (11, 3)
    assert to_np(m.rnn.weight_hr_l1).shape == (3, 8)
    assert "proj_size" not in xrnn.CharLM(11, hidden_size=8).config  # older readers keep working
    ids = np.random.default_rng(0).integers(0, 11, size=(2, 5))
    logits, (h, c) = m(m.device.asarray(ids, dtype="int64"))
    assert to_np(h).shape == (2, 2, 3) and to_np(c).shape == (2, 2, 8)
    xrnn.save(m, tmp_path / "p.ckpt")
    m2 = xrnn.load(tmp_path / "p.ckpt")
    assert m2.proj_size == 3 and m2.config == m.config
    np.testing.assert_array_equal(to_np(m2(m2.device.asarray(ids, dtype="int64"))[0]), to_np(logits))
    with pytest.raises(ConfigError, match="only supported for LSTM"):
        xrnn.CharLM(11, hidden_size=8, cell="gru", proj_size=3)


def test_charlm_lengths_equal_each_sentence_alone():
    """A padded batch of sentences with lengths: each row's logits and final state are its own."""
    m = xrnn.CharLM(9, hidden_size=6, num_layers=2, embedding_dim=4, seed=1, dtype="float64")
    sents = [[1, 2, 3, 4, 5], [6, 7], [8, 1, 2]]
    ids, lens = xrnn.pad_sequences(sents, batch_first=True, device=m.device)
    logits, (h, c) = m(ids, lengths=lens)
    for b, s in enumerate(sents):
        one, (h1, c1) = m(m.device.asarray(np.array([s]), dtype="int64"))
        np.testing.assert_allclose(to_np(logits)[b, : len(s)], to_np(one)[0], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(to_np(h)[:, b], to_np(h1)[:, 0], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(to_np(c)[:, b], to_np(c1)[:, 0], rtol=1e-12, atol=1e-13)
    # the loss over valid positions only; its gradient reaches no padded position's recurrence
    logits, _ = m(ids, lengths=lens)
    targets = np.where(np.arange(5)[None, :] < lens[:, None], np.roll(to_np(ids), -1, axis=1), -1)
    loss, dlogits = xrnn.softmax_cross_entropy(logits, m.device.asarray(targets, dtype="int64"), ignore_index=-1)
    m.zero_grad()
    m.backward(dlogits)
    assert np.all(np.isfinite(to_np(m.grads["rnn.weight_hh_l0"])))


def test_word_example_scores_sentences_in_one_padded_batch(tmp_path):
    """examples/05_word_rnnlm.py: per-sentence perplexities from one batch equal a loop over sentences."""
    import importlib.util
    import math
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "05_word_rnnlm.py")
    spec = importlib.util.spec_from_file_location("word_rnnlm_for_lengths", path)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    text = tmp_path / "t.txt"
    text.write_text("the king is dead .\nno , my lord !\nwhat is the question ?\n" * 3, encoding="utf-8")
    corpus = xrnn.read_corpus(str(text), level="word", lowercase=True)
    vocab = corpus.vocab
    model = xrnn.CharLM(len(vocab), 6, num_layers=2, cell="lstm", embedding_dim=4, seed=0, dtype="float64",
                        vocab=vocab)
    sentences = ["the king is dead .", "no !", "what , my lord ?"]
    got = ex.sentence_perplexities(model, sentences)
    for s, p in zip(sentences, got):
        seq = vocab.encode("\n" + s)
        with xrnn.no_grad():
            logits, _ = model(np.array([seq]), None)
        lg = to_np(logits)[0, :-1]
        logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
        assert math.isclose(p, math.exp(-logp[np.arange(len(seq) - 1), seq[1:]].mean()), rel_tol=1e-10)


def test_lengths_dropout_masks_are_the_full_batch_masks():
    """Dropout between layers draws the padded batch's mask (as replicas and resumes expect) and keeps its
    valid rows: a forward-only stack then equals the full-length run at every valid step."""
    T, B = 5, 3
    x = np.random.default_rng(0).standard_normal((T, B, I))
    lens = np.array([2, 5, 3])
    outs = []
    for lengths in (lens, None):
        m = xrnn.LSTM(I, H, num_layers=3, dropout=0.5, seed=4, dtype="float64")
        outs.append(to_np(m(x, lengths=lengths)[0]))
    for b, n in enumerate(lens):
        np.testing.assert_allclose(outs[0][:n, b], outs[1][:n, b], rtol=1e-13, atol=1e-14)
        assert not np.any(outs[0][n:, b])
