"""min-char-rnn with xrnn: a vanilla RNN character model trained with Adagrad, then the same model batched.

Retraces Andrej Karpathy's ``min-char-rnn.py``: one tanh RNN layer of 100
units over one-hot characters, a linear softmax head, weights drawn from
N(0, 0.01^2) and zero biases, windows of 25 characters with the hidden state
carried from one window to the next, the loss *summed* over the window,
every gradient clipped to [-5, 5], Adagrad with learning rate 0.1, a
smoothed loss (``0.999 * smooth + 0.001 * loss``, starting at
``25 * log V``) and a 200-character sample every few hundred steps. Batch 1,
exactly as the original; then the same model trained on B parallel streams of
the text (:class:`xrnn.StreamBatcher`), and both throughputs.

The model is :class:`xrnn.CharLM` with ``cell="rnn"``, one layer and no
embedding: Karpathy's ``Wxh``, ``Whh``, ``Why``, ``bh``, ``by`` are its
``rnn.weight_ih_l0``, ``rnn.weight_hh_l0``, ``head.weight``,
``rnn.bias_ih_l0`` and ``head.bias`` (:data:`MINCHAR_NAMES`). min-char-rnn
has *one* hidden bias; xrnn's RNN, as PyTorch's, has two (``bias_ih_l0 +
bias_hh_l0``), and training both would give the effective bias twice the
original's step. So ``rnn.bias_hh_l0`` is held at zero: it starts at 0 and
its gradient is zeroed before every update (:func:`train_step`), so it never
moves and ``bh`` is ``rnn.bias_ih_l0`` exactly.

The update rule: min-char-rnn writes ``param += -lr * dparam / np.sqrt(mem + 1e-8)``
(the 1e-8 *inside* the square root), which is Keras' Adagrad rule:
``--update minchar`` (the default) uses
:class:`xrnn.keras_optim.KerasAdagrad` with ``initial_accumulator_value=0,
epsilon=1e-8`` (:func:`MinCharAdagrad`). ``--update torch`` uses
:class:`xrnn.optim.Adagrad` (``torch.optim.Adagrad``: ``sqrt(mem) + eps``,
eps outside), which differs while a parameter's accumulated squared gradient
is tiny (below ~1e-8).

"Exactly as the original" means (``tests/test_min_char_rnn_exact.py``, in
float64 against a NumPy port of min-char-rnn.py written in the test): from
the same weights, Adagrad memory, hidden state and window, one iteration
gives the same loss, clipped gradients and update to 1e-10 relative, at each
of 200 iterations; run freely from the same start the two agree to 1e-9 for
the first iterations, then float rounding grows chaotically (as between two
runs of the original itself), and the smoothed loss after 500 iterations is
within 1%. The default run is float32 (``--dtype float64`` for the
comparison's precision).

Run (about a minute on a laptop CPU; the loss per 25 characters falls from
104 to about 52 and the samples grow words and speaker names)::

    python examples/02_min_char_rnn.py
    python examples/02_min_char_rnn.py --steps 50000 --device cuda
    python examples/02_min_char_rnn.py --text my_corpus.txt --update torch --dtype float64
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

import xrnn

#: min-char-rnn's parameters -> the model's (``bh`` and ``by`` are (n, 1) columns there, (n,) here)
MINCHAR_NAMES = {"Wxh": "rnn.weight_ih_l0", "Whh": "rnn.weight_hh_l0", "Why": "head.weight",
                 "bh": "rnn.bias_ih_l0", "by": "head.bias"}
#: PyTorch's second hidden bias, which min-char-rnn does not have: held at zero
SECOND_BIAS = "rnn.bias_hh_l0"


def MinCharAdagrad(model: xrnn.Module, lr: float = 0.1) -> xrnn.keras_optim.KerasAdagrad:
    """min-char-rnn's Adagrad, ``mem += g * g; p += -lr * g / sqrt(mem + 1e-8)``: Keras' Adagrad rule
    (epsilon inside the square root) with a zero initial accumulator and epsilon 1e-8. The memory is
    ``opt.state[name]["accumulator"]``, on the model's device."""
    return xrnn.keras_optim.KerasAdagrad(model, learning_rate=lr, initial_accumulator_value=0.0, epsilon=1e-8)


def minchar_init(model: xrnn.CharLM, rng: np.random.Generator) -> None:
    """min-char-rnn's initialisation: weights ~ N(0, 0.01^2), biases 0 (in state-dict order)."""
    state = {}
    for name, p in model.state_dict().items():
        shape = tuple(int(s) for s in p.shape)
        state[name] = np.zeros(shape) if "bias" in name else rng.standard_normal(shape) * 0.01
    model.load_state_dict(state)


def load_minchar(model: xrnn.CharLM, params: dict) -> None:
    """Load min-char-rnn's ``{"Wxh", "Whh", "Why", "bh", "by"}`` arrays (its shapes) into the model."""
    state = {MINCHAR_NAMES[k]: np.reshape(np.asarray(v), -1) if k in ("bh", "by") else np.asarray(v)
             for k, v in params.items()}
    state[SECOND_BIAS] = np.zeros(model.hidden_size)
    model.load_state_dict(state)


def make_model(V: int, args, rng: np.random.Generator, vocab=None) -> xrnn.CharLM:
    """The min-char-rnn model: one tanh RNN layer over one-hot characters, a linear head, one hidden bias."""
    model = xrnn.CharLM(V, args.hidden_size, num_layers=1, cell="rnn", device=args.device, dtype=args.dtype,
                        seed=rng, vocab=vocab)
    if args.init == "minchar":
        minchar_init(model, rng)
    model.load_state_dict({SECOND_BIAS: np.zeros(args.hidden_size)}, strict=False)  # min-char-rnn has one bias
    return model


def make_optimizer(model: xrnn.CharLM, args):
    if args.update == "minchar":
        return MinCharAdagrad(model, lr=args.lr)
    return xrnn.optim.Adagrad(model, lr=args.lr, eps=1e-8)


def train_step(model: xrnn.CharLM, opt, x, y, state, clip: float):
    """One min-char-rnn iteration on x, y (B, T) device ids from ``state``: forward, the loss summed over
    the window (mean over streams), BPTT, the second hidden bias' gradient zeroed (so it stays 0),
    every gradient clipped to [-clip, clip], one update. Returns (loss, a 0-d device array; final state).
    The clipped gradients stay in ``model.grads``."""
    dev = model.device
    T = int(x.shape[1])
    logits, state = model(x, state)  # (B, T, V); state carried to the next window
    loss, dlogits = xrnn.softmax_cross_entropy(logits, y)  # mean over B*T chars
    model.zero_grad()
    with dev:
        model.backward(dlogits * T)  # sum over the window (min-char-rnn), mean over streams
        model.grads[SECOND_BIAS][...] = 0  # min-char-rnn's one bias bh is rnn.bias_ih_l0
    xrnn.clip_grad_value(model, clip)  # np.clip(dparam, -5, 5, out=dparam)
    opt.step()
    with dev:
        return loss * T, state


def train(corpus, args, batch_size: int, steps: int, label: str, init: dict | None = None) -> dict:
    """Train a fresh min-char-rnn model on ``batch_size`` streams for ``steps`` windows.

    ``init``: optional starting weights in min-char-rnn's names and shapes
    (``{"Wxh", "Whh", "Why", "bh", "by"}``), instead of ``--init``'s draw.

    Returns the per-window losses (summed over the window, averaged over the
    streams), the final smoothed loss, the training throughput and the model.
    """
    V, T = len(corpus.vocab), args.seq_len
    rng = np.random.default_rng(args.seed)
    model = make_model(V, args, rng, vocab=corpus.vocab)
    if init is not None:
        load_minchar(model, init)
    opt = make_optimizer(model, args)
    batches = xrnn.StreamBatcher(corpus.ids, batch_size=batch_size, seq_len=T)
    dev, xp = model.device, model.device.xp

    print(f"\n== {label}: {batch_size} stream(s) x {T} chars, {steps} steps, "
          f"{model.num_parameters() - args.hidden_size:,} trained parameters ({SECOND_BIAS} held at 0), "
          f"on {dev.name} ==")
    smooth = T * math.log(V)  # min-char-rnn's starting point: a uniform guess
    losses: list[float] = []
    pending = []  # per-step losses still on the device: read once per report, not once per step
    state = None
    train_time, t0 = 0.0, time.perf_counter()
    for step in range(1, steps + 1):
        x, y, new_epoch = batches.next_batch()  # (B, T) host ids; y is x shifted by one
        if new_epoch:
            state = None  # min-char-rnn: hprev = zeros at the start of each pass over the text
        loss, state = train_step(model, opt, xrnn.to_device(x, dev), xrnn.to_device(y, dev), state, args.clip)
        pending.append(loss)
        if step % args.print_every == 0 or step == steps:
            with dev:
                new = xrnn.to_numpy(xp.stack(pending)).astype(np.float64)  # one host read (a sync on a GPU)
            pending = []
            train_time += time.perf_counter() - t0
            for v in new:
                smooth = smooth * 0.999 + float(v) * 0.001
            losses.extend(float(v) for v in new)
            recent = float(np.mean(losses[-100:])) / T
            print(f"iter {step}, loss: {smooth:.2f} (smoothed, as min-char-rnn; "
                  f"last {min(len(losses), 100)} windows: {recent:.3f} nats/char)")
            if args.sample_length > 0:
                prime = corpus.vocab.decode([int(x[0, 0])])
                text = xrnn.sample(model, length=args.sample_length, prime=prime, seed=args.seed + step)
                print("----\n" + text + "\n----")
            t0 = time.perf_counter()
    rate = steps * batch_size * T / max(train_time, 1e-9)
    recent = float(np.mean(losses[-100:])) / T
    print(f"{label}: {rate:,.0f} chars/s of training ({steps * batch_size * T:,} chars in {train_time:.1f} s), "
          f"final loss {recent:.3f} nats/char")
    return {"losses": np.array(losses), "smooth_loss": smooth, "recent_nats_per_char": recent,
            "chars_per_s": rate, "model": model, "batch_size": batch_size, "steps": steps}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu",
                   help='"cpu", "cuda", "cuda:1", "torch:cpu", "auto" (a GPU if usable), ...')
    p.add_argument("--text", default=None, help="UTF-8 text file (default: the bundled tiny Shakespeare)")
    p.add_argument("--hidden-size", type=int, default=100, help="hidden units (min-char-rnn: 100)")
    p.add_argument("--seq-len", type=int, default=25, help="characters per window (min-char-rnn: 25)")
    p.add_argument("--lr", type=float, default=0.1, help="Adagrad learning rate (min-char-rnn: 0.1)")
    p.add_argument("--clip", type=float, default=5.0, help="clip every gradient element to [-clip, clip]")
    p.add_argument("--update", choices=("minchar", "torch"), default="minchar",
                   help="minchar: the original formula (Keras' Adagrad rule, eps inside the sqrt); "
                        "torch: xrnn.optim.Adagrad (eps outside the sqrt)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="parameter dtype")
    p.add_argument("--init", choices=("minchar", "torch"), default="minchar",
                   help="minchar: N(0, 0.01^2) weights, zero biases; torch: xrnn's default uniform init")
    p.add_argument("--steps", type=int, default=20000, help="windows to train on with batch 1")
    p.add_argument("--batch-size", type=int, default=32, help="streams for the batched run (0 skips it)")
    p.add_argument("--batched-steps", type=int, default=2000, help="windows for the batched run")
    p.add_argument("--print-every", type=int, default=2000, help="report the loss and sample every N steps")
    p.add_argument("--sample-length", type=int, default=200, help="characters per sample (0: no samples)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("hidden_size", "seq_len", "steps", "print_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv=None) -> dict:
    """Train batch 1, then batched; returns ``{"vocab_size", "initial_loss", "single", "batched"}``."""
    args = parse_args(argv)
    path = args.text or xrnn.default_corpus_path()
    corpus = xrnn.read_corpus(path)
    V = len(corpus.vocab)
    print(f"data has {len(corpus):,} characters, {V} unique (uniform guess: {args.seq_len * math.log(V):.2f} "
          f"per {args.seq_len} chars)")
    out = {"vocab_size": V, "initial_loss": args.seq_len * math.log(V)}
    out["single"] = train(corpus, args, 1, args.steps, "min-char-rnn (batch 1)")
    if args.batch_size > 0 and args.batched_steps > 0:
        out["batched"] = train(corpus, args, args.batch_size, args.batched_steps,
                               f"the same model, batched (B={args.batch_size})")
        s, b = out["single"], out["batched"]
        print(f"\nthroughput: batch 1 {s['chars_per_s']:,.0f} chars/s, batch {args.batch_size} "
              f"{b['chars_per_s']:,.0f} chars/s ({b['chars_per_s'] / s['chars_per_s']:.1f}x); final loss "
              f"{s['recent_nats_per_char']:.3f} vs {b['recent_nats_per_char']:.3f} nats/char after "
              f"{s['steps'] * args.seq_len:,} vs {b['steps'] * b['batch_size'] * args.seq_len:,} characters")
    return out


if __name__ == "__main__":
    main()
