"""Example 2 is min-char-rnn exactly: side by side with a float64 NumPy port of Karpathy's min-char-rnn.py.

The port below is written from the original program (Andrej Karpathy, 2015): one tanh RNN with a single
hidden bias ``bh``, one-hot inputs, softmax outputs, the loss summed over a window of ``seq_length``
characters, BPTT inside the window, every gradient clipped to [-5, 5], Adagrad with the 1e-8 *inside*
the square root, the hidden state carried from window to window, and the smoothed loss
``0.999 * smooth + 0.001 * loss`` from ``-log(1/V) * seq_length``. Sampling is left out (it draws from
its own generator and does not touch the training).

Sizes: the original's structure and settings (seq_length 25, learning rate 0.1, clip 5, N(0, 0.01^2)
weights, zero biases) with hidden_size 100 as in the original; the text is the first 13,000 characters of
the bundled tiny Shakespeare, so 500 windows of 25 never reach the end (the original restarts at
p + 26 >= len(data), the example's batcher one window later at most).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import xrnn

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "02_min_char_rnn.py"
H, T, LR = 100, 25, 0.1


def _example():
    spec = importlib.util.spec_from_file_location("xrnn_example_02_exact", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class MinCharRNN:
    """min-char-rnn.py's model, loss and update, in float64 NumPy (column vectors, as the original)."""

    def __init__(self, vocab_size: int, hidden_size: int, rng: np.random.Generator):
        self.V, self.H = vocab_size, hidden_size
        self.Wxh = rng.standard_normal((hidden_size, vocab_size)) * 0.01  # input to hidden
        self.Whh = rng.standard_normal((hidden_size, hidden_size)) * 0.01  # hidden to hidden
        self.Why = rng.standard_normal((vocab_size, hidden_size)) * 0.01  # hidden to output
        self.bh = np.zeros((hidden_size, 1))  # hidden bias
        self.by = np.zeros((vocab_size, 1))  # output bias
        self.mem = {k: np.zeros_like(v) for k, v in self.params().items()}  # Adagrad memory

    def params(self) -> dict:
        return {"Wxh": self.Wxh, "Whh": self.Whh, "Why": self.Why, "bh": self.bh, "by": self.by}

    def lossFun(self, inputs, targets, hprev):
        """Returns the loss, the (clipped) gradients and the last hidden state, as the original."""
        xs, hs, ps = {}, {}, {}
        hs[-1] = np.copy(hprev)
        loss = 0.0
        for t in range(len(inputs)):
            xs[t] = np.zeros((self.V, 1))  # one-hot
            xs[t][inputs[t]] = 1
            hs[t] = np.tanh(np.dot(self.Wxh, xs[t]) + np.dot(self.Whh, hs[t - 1]) + self.bh)
            ys = np.dot(self.Why, hs[t]) + self.by  # unnormalized log probabilities
            ps[t] = np.exp(ys) / np.sum(np.exp(ys))
            loss += -np.log(ps[t][targets[t], 0])  # softmax (cross-entropy loss)
        dWxh, dWhh, dWhy = np.zeros_like(self.Wxh), np.zeros_like(self.Whh), np.zeros_like(self.Why)
        dbh, dby = np.zeros_like(self.bh), np.zeros_like(self.by)
        dhnext = np.zeros_like(hs[0])
        for t in reversed(range(len(inputs))):
            dy = np.copy(ps[t])
            dy[targets[t]] -= 1  # backprop into y
            dWhy += np.dot(dy, hs[t].T)
            dby += dy
            dh = np.dot(self.Why.T, dy) + dhnext  # backprop into h
            dhraw = (1 - hs[t] * hs[t]) * dh  # backprop through tanh
            dbh += dhraw
            dWxh += np.dot(dhraw, xs[t].T)
            dWhh += np.dot(dhraw, hs[t - 1].T)
            dhnext = np.dot(self.Whh.T, dhraw)
        for dparam in (dWxh, dWhh, dWhy, dbh, dby):
            np.clip(dparam, -5, 5, out=dparam)  # mitigate exploding gradients
        grads = {"Wxh": dWxh, "Whh": dWhh, "Why": dWhy, "bh": dbh, "by": dby}
        return loss, grads, hs[len(inputs) - 1]

    def update(self, grads: dict) -> None:
        for k, param in self.params().items():
            mem = self.mem[k]
            mem += grads[k] * grads[k]
            param += -LR * grads[k] / np.sqrt(mem + 1e-8)  # adagrad update


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    text = Path(xrnn.default_corpus_path()).read_text(encoding="utf-8")[:13_000]
    path = tmp_path_factory.mktemp("minchar") / "input.txt"
    path.write_text(text, encoding="utf-8")
    corpus = xrnn.read_corpus(path)
    ex = _example()
    args = ex.parse_args(["--text", str(path), "--hidden", str(H), "--dtype", "float64", "--sample-length", "0",
                          "--print-every", "100000", "--batch-size", "0"])
    assert (args.seq_len, args.lr, args.clip, args.update) == (T, LR, 5.0, "minchar")
    return ex, args, corpus, np.asarray(corpus.ids, dtype=np.int64)


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def test_teacher_forced_iterations_agree_to_1e_10(setup):
    """At each of 200 iterations the example starts from the original's weights, Adagrad memory and hidden
    state: the loss, the clipped gradients, the update and the next hidden state agree to 1e-10."""
    ex, args, corpus, ids = setup
    V = len(corpus.vocab)
    ref = MinCharRNN(V, H, np.random.default_rng(0))
    model = ex.make_model(V, args, np.random.default_rng(1))
    opt = ex.make_optimizer(model, args)
    dev = model.device
    hprev = np.zeros((H, 1))
    worst = {"loss": 0.0, "grad": 0.0, "param": 0.0, "h": 0.0}
    for n in range(200):
        p = n * T
        inputs, targets = ids[p:p + T], ids[p + 1:p + T + 1]
        ex.load_minchar(model, ref.params())
        for k, mem in ref.mem.items():
            flat = np.reshape(mem, -1) if k in ("bh", "by") else mem  # column biases are (n,) in the model
            opt.state[ex.MINCHAR_NAMES[k]]["accumulator"][...] = dev.asarray(flat, dtype="float64")
        state = dev.asarray(hprev.reshape(1, 1, H), dtype="float64")  # (layers, B, H)
        loss, state = ex.train_step(model, opt, dev.asarray(inputs[None, :]), dev.asarray(targets[None, :]),
                                    state, args.clip)
        loss_ref, grads, hnext = ref.lossFun(inputs, targets, hprev)
        ref.update(grads)
        worst["loss"] = max(worst["loss"], abs(float(loss) - loss_ref) / loss_ref)
        g = model.grads
        params = model.parameters()
        for k, name in ex.MINCHAR_NAMES.items():
            worst["grad"] = max(worst["grad"], _rel(xrnn.to_numpy(g[name]), grads[k].reshape(-1) if k in ("bh", "by")
                                                    else grads[k]))
            worst["param"] = max(worst["param"], _rel(xrnn.to_numpy(params[name]),
                                                      ref.params()[k].reshape(-1) if k in ("bh", "by")
                                                      else ref.params()[k]))
        assert not np.any(xrnn.to_numpy(params[ex.SECOND_BIAS]))  # the second bias never moves
        worst["h"] = max(worst["h"], _rel(xrnn.to_numpy(state)[0, 0], hnext[:, 0]))
        hprev = hnext
    assert max(worst.values()) < 1e-10, worst


def test_free_running_agrees_then_smoothed_loss_within_1_percent(setup, capsys):
    """From the same weights and data: the first 3 iterations agree to 1e-9; after 500 iterations the
    smoothed loss is within 1% of the original's (rounding differences grow chaotically in between)."""
    ex, args, corpus, ids = setup
    V = len(corpus.vocab)
    ref = MinCharRNN(V, H, np.random.default_rng(2))
    init = {k: v.copy() for k, v in ref.params().items()}
    out = ex.train(corpus, args, 1, 500, "side by side", init=init)
    capsys.readouterr()
    smooth = -np.log(1.0 / V) * T
    hprev = np.zeros((H, 1))
    losses = []
    for n in range(500):
        p = n * T
        assert p + T + 1 < len(ids)  # no restart inside the compared run
        loss, grads, hprev = ref.lossFun(ids[p:p + T], ids[p + 1:p + T + 1], hprev)
        smooth = smooth * 0.999 + loss * 0.001
        ref.update(grads)
        losses.append(loss)
    mine = out["losses"]
    assert mine.shape == (500,)
    np.testing.assert_allclose(mine[:3], losses[:3], rtol=1e-9, atol=0)
    assert abs(out["smooth_loss"] - smooth) < 0.01 * smooth
    assert smooth < -np.log(1.0 / V) * T - 2  # it learned something in 500 iterations (both did)
