"""Trainer: learning, PyTorch parity, exact resume, signals, NaN guard, saves, cross-backend checkpoints."""

import errno
import importlib
import io
import math
import os
import signal
from collections import Counter

import numpy as np
import pytest

import xrnn
from xrnn.checkpoint import peek, read_container
from xrnn.data import Corpus, StreamBatcher, default_corpus_path, split
from xrnn.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointKindError,
    ConfigError,
    DataError,
    NonFiniteError,
    SaveError,
)
from xrnn.models import CharLM
from xrnn.train import BEST, LAST, Trainer, load_model, train

T_MOD = importlib.import_module("xrnn.train")  # the module (xrnn.train may be the function)

SHAKESPEARE = open(default_corpus_path(), encoding="utf-8").read()


def corpus(n=3000, start=0):
    return Corpus.from_text(SHAKESPEARE[start:start + n])


def make(c, *, hidden=16, layers=1, cell="lstm", dropout=0.0, dtype="float64", device="cpu", seed=0, **kw):
    model = CharLM(len(c.vocab), hidden, layers, cell=cell, dropout=dropout, dtype=dtype, device=device,
                   seed=seed, vocab=c.vocab)
    opts = dict(batch_size=4, seq_len=8, lr=1e-2, val_fraction=0.0, progress=False, seed=1)
    opts.update(kw)
    return Trainer(model, c, **opts)


def weights(t):
    return {k: xrnn.to_numpy(v).copy() for k, v in t.model.state_dict().items()}


def opt_state(t):
    return {(p, s): xrnn.to_numpy(a).copy() for p, slots in t.optimizer.state.items() for s, a in slots.items()}


def carry(t):
    c = t._carry
    if c is None:
        return []
    return [xrnn.to_numpy(a).copy() for a in (c if isinstance(c, tuple) else (c,))]


def assert_same_run(a, b):
    assert a.step == b.step
    assert a.train_losses == b.train_losses  # bit-identical floats
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    oa, ob = opt_state(a), opt_state(b)
    assert oa.keys() == ob.keys()
    for k in oa:
        np.testing.assert_array_equal(oa[k], ob[k], err_msg=str(k))
    ca, cb = carry(a), carry(b)
    assert len(ca) == len(cb)
    for x, y in zip(ca, cb):
        np.testing.assert_array_equal(x, y)
    assert a.model.rng.bit_generator.state == b.model.rng.bit_generator.state
    assert a._sample_seed == b._sample_seed
    assert a.batcher.state_dict() == b.batcher.state_dict()


# ---------------------------------------------------------------------------
# it learns
# ---------------------------------------------------------------------------

def test_learns_well_below_the_unigram_entropy():
    text = SHAKESPEARE[:30000]
    c = Corpus.from_text(text)
    train_ids, val_ids = split(c.ids, 0.1)
    counts = np.array(list(Counter(train_ids.tolist()).values()), dtype=np.float64)
    p = counts / counts.sum()
    unigram = float(-(p * np.log(p)).sum())  # nats per character of the best context-free model
    assert 2.8 < unigram < 3.5
    model = CharLM(len(c.vocab), 64, 1, seed=0, vocab=c.vocab)
    t = Trainer(model, c, batch_size=32, seq_len=16, lr=1e-2, val_fraction=0.1, eval_every=None,
                sample_every=None, progress=False, seed=0)
    before = t.evaluate()
    assert before == pytest.approx(math.log(len(c.vocab)), abs=0.1)  # untrained: close to uniform
    t.fit(200)
    val = t.val_history[-1][1]
    assert t.val_history[-1][0] == 200
    assert val < unigram - 0.6, (val, unigram)


def test_evaluate_is_the_mean_cross_entropy_over_the_validation_windows():
    c = corpus(2000)
    t = make(c, val_fraction=0.2, batch_size=3, seq_len=7, dropout=0.5, layers=2)
    t.fit(3)
    _, val_ids = split(c.ids, 0.2)
    b = StreamBatcher(val_ids, 3, 7)
    m = t.model
    rng_before = m.rng.bit_generator.state
    nll, count, state = 0.0, 0, None
    with xrnn.no_grad():
        m.eval()
        for x, y in b.iterate_once():
            logits, state = m.forward(m.device.asarray(x, dtype="int64"), state)
            z = xrnn.to_numpy(logits).astype(np.float64)  # (B, T, V)
            z = z - z.max(-1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
            nll += -np.take_along_axis(logp, y[..., None], -1).sum()
            count += y.size
        m.train()
    assert t.evaluate() == pytest.approx(nll / count, rel=1e-12)
    assert m.rng.bit_generator.state == rng_before  # evaluation draws no dropout masks
    assert t.evaluate(max_batches=1) != pytest.approx(t.evaluate())


# ---------------------------------------------------------------------------
# PyTorch parity: the same init, batches, Adam and clipping give the same losses
# ---------------------------------------------------------------------------

@pytest.fixture
def torch1():
    """PyTorch limited to one thread for the test (tiny problems; avoids oversubscribing a busy machine)."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(n)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_training_matches_pytorch_step_by_step(cell, torch1):
    torch = torch1
    c = corpus(200)  # 6 windows per epoch: 25 steps cross 4 epoch boundaries (state resets)
    B, T, H, L, steps = 4, 8, 12, 2, 25
    t = make(c, hidden=H, layers=L, cell=cell, batch_size=B, seq_len=T, lr=2e-2, clip=0.5, seed=3)
    assert t.batcher.windows_per_epoch == 6
    V = len(c.vocab)

    rnn_cls = torch.nn.LSTM if cell == "lstm" else torch.nn.GRU
    rnn = rnn_cls(V, H, L, dtype=torch.float64)
    head = torch.nn.Linear(H, V, dtype=torch.float64)
    sd = {k: torch.tensor(v) for k, v in weights(t).items()}
    rnn.load_state_dict({k[len("rnn."):]: v for k, v in sd.items() if k.startswith("rnn.")})
    head.load_state_dict({k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")})
    params = list(rnn.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=2e-2)
    batcher = StreamBatcher(c.ids, B, T)

    ours, theirs, norms = [], [], []
    state = None
    for _ in range(steps):
        ours.append(float(t.train_step()))
        x, y, new_epoch = batcher.next_batch()
        if new_epoch:
            state = None
        xt = torch.nn.functional.one_hot(torch.tensor(x.T), V).to(torch.float64)  # (T, B, V)
        out, state = rnn(xt, state)
        logits = head(out)  # (T, B, V)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), torch.tensor(y.T).reshape(-1))
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, 0.5)))
        opt.step()
        state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
        theirs.append(float(loss.detach()))
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=0)
    assert max(norms) > 0.5  # clipping was active
    got = weights(t)
    for k, p in rnn.state_dict().items():
        np.testing.assert_allclose(got["rnn." + k], p.numpy(), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(got["head.weight"], head.weight.detach().numpy(), rtol=1e-8, atol=1e-12)
    # the carried state equals torch's after the last window
    hc = carry(t)
    tst = state if isinstance(state, tuple) else (state,)
    for a, b in zip(hc, tst):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------
# exact resume
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("check_finite", [True, False])
def test_resume_equals_uninterrupted_with_dropout_across_epochs(tmp_path, check_finite):
    c = corpus(170)  # 4 training windows per epoch at 4 x 8: the resumed part crosses epochs 2 and 3
    kw = dict(layers=2, dropout=0.3, hidden=10, eval_every=4, sample_every=5, sample_length=30,
              log_every=3, check_finite=check_finite, progress="plain", val_fraction=0.1)
    out_a, out_b = io.StringIO(), io.StringIO()
    a = make(c, file=out_a, **kw)
    assert a.batcher.windows_per_epoch == 4
    a.fit(13)

    b = make(c, file=out_b, **kw)
    b.fit(8)  # a multiple of eval_every, so the end-of-fit validation is one the full run also does
    path = tmp_path / "mid.ckpt"
    xrnn.save(b, path)
    assert peek(path).kind == "xrnn.Trainer"
    r = xrnn.load(path)  # the registered loader gives a Trainer (its corpus was in memory)
    assert isinstance(r, Trainer) and r.step == 8
    with pytest.raises(DataError, match="in-memory corpus"):
        r.fit(13)
    r.attach_corpus(c)
    r.file = out_b
    r.fit(13)
    assert_same_run(a, r)
    assert r.val_history == a.val_history
    assert (r.best_val_loss, r.best_step) == (a.best_val_loss, a.best_step)
    # the sample printed at step 10 depends only on the saved sample seed and the step
    sa = out_a.getvalue().split("sample at step 10")[1].split("-" * 40)[0]
    sb = out_b.getvalue().split("sample at step 10")[1].split("-" * 40)[0]
    assert sa == sb and len(sa.strip()) > 0


def test_trainer_resume_reads_the_recorded_corpus_file_and_checks_it(tmp_path):
    text_file = tmp_path / "text.txt"
    text_file.write_text(SHAKESPEARE[:1500], encoding="utf-8")
    out = tmp_path / "run"
    a = make(xrnn.read_corpus(text_file), out_dir=out, save_every=3)
    a.fit(5)
    r = Trainer.resume(out / LAST)
    assert r.step == 5 and r.corpus.path == str(text_file) and r.out_dir == str(out)
    ref = make(xrnn.read_corpus(text_file))
    ref.fit(9)
    r.fit(9)
    assert_same_run(ref, r)

    other = tmp_path / "other.txt"
    other.write_text(SHAKESPEARE[:1400], encoding="utf-8")
    with pytest.raises(DataError, match="same text"):
        Trainer.resume(out / LAST, corpus=other)
    text_file.write_text(SHAKESPEARE[100:1600], encoding="utf-8")  # the recorded file changed
    with pytest.raises((DataError, ConfigError)):
        Trainer.resume(out / LAST)
    os.remove(text_file)
    with pytest.raises(DataError, match="not there any more"):
        Trainer.resume(out / LAST)
    with pytest.raises(ConfigError, match="cannot set"):
        Trainer.resume(out / LAST, corpus=other, lr=0.1)


def test_train_function_resume_continues_and_refuses_conflicting_options(tmp_path):
    text_file = tmp_path / "t.txt"
    text_file.write_text(SHAKESPEARE[:3000], encoding="utf-8")
    opts = dict(hidden_size=12, num_layers=1, batch_size=4, seq_len=8, dropout=0.2, seed=5, progress=False,
                eval_every=0, sample_every=0, save_every=4)
    full = train(text_file, steps=10, out_dir=tmp_path / "full", **opts)
    part = train(text_file, steps=6, out_dir=tmp_path / "part", **opts)
    assert part.step == 6
    with pytest.raises(ConfigError, match="already holds a run"):
        train(text_file, steps=10, out_dir=tmp_path / "part", **opts)
    with pytest.raises(ConfigError, match=r"hidden_size=20 \(the checkpoint has 12\)"):
        train(text_file, steps=10, out_dir=tmp_path / "part", resume=True, **{**opts, "hidden_size": 20})
    with pytest.raises(ConfigError, match="lr="):
        train(text_file, steps=10, out_dir=tmp_path / "part", resume=True, lr=0.5, progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        train(text_file, steps=10, out_dir=tmp_path / "nothing", resume=True)
    resumed = train(steps=10, out_dir=tmp_path / "part", resume=True, **opts)  # corpus: the recorded file
    assert_same_run(full, resumed)
    fresh = train(text_file, steps=2, out_dir=tmp_path / "part", overwrite=True, **opts)
    assert fresh.step == 2
    with pytest.raises(ConfigError, match="unknown option"):
        train(text_file, steps=1, bogus=3)


# ---------------------------------------------------------------------------
# signals
# ---------------------------------------------------------------------------

def signal_after_step(monkeypatch, n, sig):
    """Make Trainer.train_step send a real ``sig`` to this process after step ``n`` (to the handler fit installs)."""
    original = Trainer.train_step

    def step_and_signal(self):
        loss = original(self)
        if self.step == n:
            os.kill(os.getpid(), sig)
        return loss

    monkeypatch.setattr(Trainer, "train_step", step_and_signal)
    return lambda: monkeypatch.setattr(Trainer, "train_step", original)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_after_the_step_saves_and_resumes_exactly(tmp_path, monkeypatch, sig):
    c = corpus(1200)
    ref = make(c, dropout=0.2, layers=2)
    ref.fit(12)

    t = make(c, dropout=0.2, layers=2, out_dir=tmp_path, save_every=None)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    restore = signal_after_step(monkeypatch, 5, sig)
    t.fit(12)
    restore()
    assert t.interrupted == signal.Signals(sig).name
    assert t.step == 5
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored
    saved = Trainer.resume(tmp_path / LAST, corpus=c)
    assert saved.step == 5
    saved.fit(12)
    assert saved.interrupted is None
    assert_same_run(ref, saved)


def test_train_with_a_generator_seed_saves_its_checkpoints(tmp_path):
    """Trainer keeps only int seeds in its checkpoint metadata; train() used to overwrite that with the
    Generator itself, so saving failed ('meta.seed is a Generator')."""
    text_file = tmp_path / "t.txt"
    text_file.write_text(SHAKESPEARE[:3000], encoding="utf-8")
    t = train(text_file, steps=2, hidden_size=8, num_layers=1, batch_size=2, seq_len=8,
              seed=np.random.default_rng(0), out_dir=tmp_path / "run", progress=False, eval_every=0, sample_every=0)
    assert t.step == 2 and Trainer.resume(tmp_path / "run" / LAST).step == 2


def test_a_resume_without_steps_continues_to_the_interrupted_runs_target(tmp_path, monkeypatch):
    """The checkpoint records fit()'s target: resuming with no step count ends where the
    uninterrupted run would (not at the library default), and equals it."""
    text_file = tmp_path / "t.txt"
    text_file.write_text(SHAKESPEARE[:3000], encoding="utf-8")
    opts = dict(hidden_size=12, num_layers=1, batch_size=4, seq_len=8, seed=5, progress=False,
                eval_every=0, sample_every=0)
    full = train(text_file, steps=9, **opts)
    restore = signal_after_step(monkeypatch, 4, signal.SIGINT)
    part = train(text_file, steps=9, out_dir=tmp_path / "run", **opts)
    restore()
    assert part.interrupted == "SIGINT" and part.step == 4
    resumed = train(out_dir=tmp_path / "run", resume=True, progress=False, eval_every=0, sample_every=0)
    assert resumed.step == 9 and resumed.target_steps == 9
    assert_same_run(full, resumed)
    again = train(steps=11, out_dir=tmp_path / "run", resume=True, progress=False, eval_every=0, sample_every=0)
    assert again.step == 11  # an explicit target still wins


def test_with_progress_off_an_interruption_still_says_where_it_saved(tmp_path, monkeypatch, capsys):
    t = make(corpus(1200), out_dir=tmp_path, progress=False)
    signal_after_step(monkeypatch, 2, signal.SIGTERM)
    t.fit(5)
    out, err = capsys.readouterr()
    assert out == ""
    assert "interrupted by SIGTERM at step 2 of 5; saved" in err and "resume with" in err


def test_a_second_signal_aborts_without_saving(tmp_path):
    t = make(corpus(1200), out_dir=tmp_path)
    t._on_signal(signal.SIGINT, None)
    assert t._stop_signal == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        t._on_signal(signal.SIGINT, None)


# ---------------------------------------------------------------------------
# determinism and backends
# ---------------------------------------------------------------------------

def test_same_seed_same_losses_and_backends_agree(e2e_device):
    c = corpus(1500)
    runs = []
    for device in ("cpu", "cpu", e2e_device):
        t = make(c, device=device, dropout=0.25, layers=2, seed=11)
        t.fit(8)
        runs.append(t)
    assert runs[0].train_losses == runs[1].train_losses
    assert weights(runs[0]).keys() == weights(runs[2]).keys()
    np.testing.assert_allclose(runs[2].train_losses, runs[0].train_losses, rtol=1e-10)
    for k, v in weights(runs[0]).items():
        np.testing.assert_allclose(weights(runs[2])[k], v, rtol=1e-8, atol=1e-12)
    assert xrnn.backend.device_of(runs[2].model.parameters()["head.weight"]) == e2e_device


def test_checkpoint_moves_between_backends_with_identical_samples(tmp_path, e2e_device):
    c = corpus(1500)
    t = make(c, dtype="float32", dropout=0.1, layers=2)
    t.fit(6)
    p_np = tmp_path / "np.ckpt"
    t.save(p_np)
    text = t.model.sample(length=60, prime="First", seed=42)

    strict = xrnn.load(p_np, device=e2e_device)
    assert isinstance(strict, Trainer)
    assert strict.device == e2e_device
    assert strict.model.sample(length=60, prime="First", seed=42) == text
    p_strict = tmp_path / "strict.ckpt"
    strict.save(p_strict)
    back = xrnn.load(p_strict, device="cpu")
    assert back.model.sample(length=60, prime="First", seed=42) == text
    for k, v in weights(t).items():
        np.testing.assert_array_equal(weights(back)[k], v)
    assert load_model(p_strict).sample(length=60, prime="First", seed=42) == text
    # continuing on the other backend follows the same trajectory (within float32 rounding)
    strict.attach_corpus(c)
    back.attach_corpus(c)
    strict.fit(9)
    back.fit(9)
    np.testing.assert_allclose(strict.train_losses, back.train_losses, rtol=1e-5)


def test_load_model_takes_model_and_trainer_checkpoints(tmp_path):
    c = corpus(1200)
    t = make(c)
    t.fit(2)
    xrnn.save(t.model, tmp_path / "m.ckpt")
    t.save(tmp_path / "t.ckpt")
    a = load_model(tmp_path / "m.ckpt").sample(length=30, seed=1)
    b = load_model(tmp_path / "t.ckpt").sample(length=30, seed=1)
    assert a == b
    from xrnn.checkpoint import write_container

    write_container(tmp_path / "other.ckpt", "something.else", {}, {})
    with pytest.raises(CheckpointKindError, match="something.else"):
        load_model(tmp_path / "other.ckpt")
    with pytest.raises(CheckpointKindError, match="not a training run"):
        Trainer.resume(tmp_path / "m.ckpt")


# ---------------------------------------------------------------------------
# non-finite losses
# ---------------------------------------------------------------------------

def test_a_non_finite_loss_stops_before_the_update_and_keeps_the_last_good_checkpoint(tmp_path):
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    c = corpus(1500)
    t = make(c, out_dir=tmp_path, save_every=2)
    t.fit(4)
    good = weights(t)
    position = t.batcher.state_dict()
    rng = t.model.rng.bit_generator.state
    t.model.parameters()["head.bias"][0] = np.inf  # poison: the next loss is NaN
    with pytest.raises(NonFiniteError, match="step 5") as e:
        t.fit(10)
    msg = str(e.value)
    assert "learning rate" in msg and "not applied" in msg and str(tmp_path / LAST) in msg
    assert t.step == 4 and len(t.train_losses) == 4
    assert t.batcher.state_dict() == position and t.model.rng.bit_generator.state == rng  # rolled back
    for k, v in weights(t).items():
        if k != "head.bias":
            np.testing.assert_array_equal(v, good[k])  # no update was applied
    r = xrnn.load(tmp_path / LAST)
    assert r.step == 4
    assert all(np.isfinite(v).all() for v in weights(r).values())
    assert signal.getsignal(signal.SIGINT) == before  # the handler fit() installed is gone


def test_deferred_check_finds_the_first_bad_step_and_never_saves_after_it(tmp_path):
    c = corpus(1500)
    t = make(c, out_dir=tmp_path, save_every=2, log_every=10, check_finite=False)
    t.fit(4)
    t.model.parameters()["head.bias"][0] = np.nan
    with pytest.raises(NonFiniteError, match="step 5") as e:
        t.fit(10)
    assert "check_finite=False" in str(e.value)
    assert xrnn.load(tmp_path / LAST).step == 4  # the save at step 6 did not happen


def test_divergence_with_a_huge_learning_rate_is_reported():
    t = make(corpus(1500), dtype="float32", optimizer="sgd", lr=1e37, clip=None)
    with pytest.raises(NonFiniteError, match="lower the learning rate.*clip gradients"):
        t.fit(50)
    assert t.step < 50


# ---------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------

def test_a_failed_save_warns_and_training_goes_on(tmp_path, monkeypatch, capsys):
    import xrnn.checkpoint as ck

    c = corpus(1500)
    out = io.StringIO()
    t = make(c, out_dir=tmp_path, save_every=2, progress="plain", file=out, log_every=100)
    real_replace = os.replace
    calls = {"n": 0}

    def flaky_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # the save at step 4 hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", flaky_replace)
    t.fit(5)
    assert t.step == 5
    err = capsys.readouterr().err  # warnings go to stderr, not into the progress output
    assert "warning: could not save checkpoint" in err and "disk is full" in err
    assert "warning" not in out.getvalue()
    assert xrnn.load(tmp_path / LAST).step == 5  # the final save worked
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]

    calls["n"] = 0
    monkeypatch.setattr(ck.os, "replace", lambda s, d: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(SaveError, match="disk is full"):
        t.fit(6)  # the final save failing is an error: no file holds the final state
    assert xrnn.load(tmp_path / LAST).step == 5  # the previous file is intact


def test_checkpoints_hold_the_whole_run(tmp_path):
    c = corpus(1500)
    t = make(c, out_dir=tmp_path, val_fraction=0.1, eval_every=2, schedule=xrnn.optim.Cosine(1e-2, 6),
             clip_value=1.0, optimizer_kwargs={"betas": (0.8, 0.9)})
    t.fit(5)
    kind, meta, tensors = read_container(tmp_path / LAST)
    assert kind == "xrnn.Trainer" and meta["step"] == 5
    assert tensors["history/train_loss"].shape == (5,)
    np.testing.assert_array_equal(tensors["history/val_step"], [2, 4, 5])
    assert meta["trainer"]["schedule"]["name"] == "cosine"
    assert meta["trainer"]["optimizer_kwargs"] == {"betas": [0.8, 0.9]}
    assert meta["data"]["position"]["position"] == t.batcher.position
    assert {"carry/h", "carry/c", "optim/head.weight/exp_avg"} <= set(tensors)
    assert os.path.exists(tmp_path / BEST)
    best = xrnn.load(tmp_path / BEST)
    assert best.step == t.best_step and best.best_val_loss == t.best_val_loss
    r = xrnn.load(tmp_path / LAST)
    assert r.history == t.history
    assert r.schedule == t.schedule and r.clip_value == 1.0


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_trainer_checkpoints_raise_checkpoint_errors(tmp_path, damage):
    t = make(corpus(1200))
    t.fit(2)
    p = tmp_path / "t.ckpt"
    t.save(p)
    data = bytearray(p.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x40
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError):
        xrnn.load(p)
    with pytest.raises(CheckpointCorruptError):
        Trainer.resume(p)
    with pytest.raises(CheckpointCorruptError):
        load_model(p)


# ---------------------------------------------------------------------------
# options, data and output
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    ({"batch_size": 0}, "batch_size"),
    ({"seq_len": -1}, "seq_len"),
    ({"optimizer": "adamax"}, "unknown optimizer"),
    ({"lr": -1.0}, "lr"),
    ({"clip": 0}, "clip"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"progress": "fancy"}, "progress"),
    ({"schedule": "cosine"}, "schedule"),
    ({"sample_temperature": 0}, "temperature"),
    ({"optimizer_kwargs": {"lr": 1}}, "lr="),
    ({"optimizer_kwargs": {"momentum": 0.9}}, "momentum"),
])
def test_bad_options_are_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        make(corpus(1200), **kw)


def test_data_problems_are_data_errors():
    with pytest.raises(DataError, match="too few"):
        make(corpus(100), batch_size=20, seq_len=20)
    c = corpus(1200)
    model = CharLM(len(c.vocab) + 1, 8, seed=0)
    with pytest.raises(ConfigError, match="vocab_size"):
        Trainer(model, c, progress=False)
    other = Corpus.from_text("abc" * 200)
    model = CharLM(len(other.vocab), 8, seed=0, vocab=other.vocab)
    with pytest.raises(ConfigError, match="vocabulary"):
        Trainer(model, Corpus.from_text("xyz" * 200), progress=False)
    with pytest.raises(ConfigError, match="corpus must be"):
        Trainer(model, 42, progress=False)


def test_plain_progress_without_tqdm(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    out = io.StringIO()
    t = make(corpus(1500), val_fraction=0.1, progress=True, file=out, log_every=2, eval_every=3,
             sample_every=4, sample_length=20)
    t.fit(4)
    text = out.getvalue()
    assert "step 2/4 (50.0%) | loss " in text and "tok/s" in text and "ETA" in text
    v = t.val_history[0][1]
    assert f"step 3: val loss {v:.4f} nats = {v / math.log(2):.4f} bpc (best)" in text
    assert "sample at step 4 (temperature 0.8)" in text
    assert "done: step 4" in text


def test_tqdm_bar_and_silence(capsys):
    pytest.importorskip("tqdm")
    out = io.StringIO()
    t = make(corpus(1500), progress="tqdm", file=out, log_every=2)
    t.fit(3)
    err = capsys.readouterr().err
    assert "3/3" in err and "loss" in err
    assert "done: step 3" in out.getvalue()
    quiet = io.StringIO()
    t2 = make(corpus(1500), progress=False, file=quiet, sample_every=1)
    t2.fit(3)
    assert quiet.getvalue() == "" and capsys.readouterr().err == ""


def test_fit_takes_a_total_target_and_exposes_the_run():
    t = make(corpus(1500))
    t.fit(3)
    t.fit(3)  # already there: nothing happens
    assert t.step == 3 and len(t.history["train_loss"]) == 3
    t.fit(5)
    assert t.step == 5 and t.tokens_seen == 5 * 4 * 8
    assert t.is_main_process
    assert 0 < t.epoch
    assert t.train is not None and "Trainer(step=5" in repr(t)
    assert isinstance(t.sample(length=10), str)
    with pytest.raises(ConfigError):
        t.fit(-1)
    assert T_MOD.DEFAULTS["model"] == "lstm"


# ---------------------------------------------------------------------------
# host synchronisation: one scalar read per step, none with check_finite=False
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("embedding_dim", [None, 6])
def test_a_step_reads_one_value_pair_or_nothing(sync_counter, embedding_dim):
    c = corpus(1500)
    for check_finite, per_step in ((True, 1), (False, 0)):
        model = CharLM(len(c.vocab), 8, 2, embedding_dim=embedding_dim, dropout=0.1,
                       device="array_api_strict:device1", dtype="float64", seed=0, vocab=c.vocab)
        t = Trainer(model, c, batch_size=3, seq_len=5, val_fraction=0.1, progress=False, clip_value=1.0,
                    check_finite=check_finite, log_every=100)
        sync_counter.clear()
        for _ in range(4):
            t.train_step()
        assert len(sync_counter) == 4 * per_step, sync_counter
        sync_counter.clear()
        t.evaluate()
        assert len(sync_counter) == 1  # the validation sum, read once
    sync_counter.clear()
    assert len(t.history["train_loss"]) == 4 and len(sync_counter) == 1  # the deferred losses, read together


def test_corpus_ids_are_range_checked_on_the_host():
    c = corpus(1200)
    bad = Corpus(c.ids.copy(), c.vocab)
    bad.ids[7] = len(c.vocab)
    model = CharLM(len(c.vocab), 8, seed=0, vocab=c.vocab)
    with pytest.raises(DataError, match=r"in \[0, "):
        Trainer(model, bad, progress=False)


def test_trainer_defaults_are_the_documented_defaults():
    import inspect

    sig = inspect.signature(Trainer.__init__).parameters
    for k in ("batch_size", "seq_len", "optimizer", "lr", "clip", "val_fraction", "eval_every", "sample_every",
              "log_every", "save_every"):
        assert sig[k].default == T_MOD.DEFAULTS[k], k


def test_xrnn_load_model_takes_every_model_kind(tmp_path):
    """xrnn.load_model: CharLM, a trainer's model, and other kinds such as Sequential."""
    from xrnn.layers import LSTM, Dense, Input

    seq = xrnn.Sequential([Input((4, 2)), LSTM(3), Dense(1)], seed=0)
    xrnn.save(seq, tmp_path / "s.ckpt")
    back = xrnn.load_model(tmp_path / "s.ckpt", device="array_api_strict:device1")
    assert isinstance(back, xrnn.Sequential) and back.device.name == "array_api_strict:device1"
    x = np.random.default_rng(0).standard_normal((5, 4, 2)).astype(np.float32)
    np.testing.assert_allclose(xrnn.to_numpy(back.predict(x)), xrnn.to_numpy(seq.predict(x)), rtol=1e-6)
    assert xrnn.load_model is load_model
