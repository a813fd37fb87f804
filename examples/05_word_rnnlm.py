"""A word-level recurrent language model in the style of Denny Britz's RNN tutorial (RNNLM).

Retraces "Recurrent Neural Networks Tutorial" (WildML, parts 2-4): the text is
split into words, the vocabulary is capped to the N most frequent words and
every other word becomes an unknown token, an Elman RNN (or a GRU, part 4)
reads one word at a time and predicts the next, it is trained with
backpropagation through time truncated to a fixed window, and the trained
model writes new sentences, never choosing the unknown token.

What changes from the tutorial: the corpus is the bundled tiny Shakespeare
(lowercased; a line break is a token, so verse keeps its shape) instead of
Reddit comments; the text is read as B parallel streams of fixed windows
(:class:`xrnn.StreamBatcher`) with the hidden state carried across windows
(truncated BPTT as in char-rnn and PyTorch's word_language_model) instead of
one sentence at a time; words go through an embedding (Britz's ``U`` applied
to a one-hot vector is exactly an embedding lookup). The score is
perplexity, ``exp(mean cross-entropy)``, on a held-out validation split: a
uniform guess scores V, the unigram frequencies a few hundred. At the end the
generated sentences, each of its own length, are scored together in one
right-padded batch (:func:`xrnn.pad_sequences` and ``lengths=``: the
recurrence never runs on the padding, the same machinery as Keras'
``Masking``), Britz's ``calculate_loss`` per sentence.

Run (a minute or two on a laptop CPU)::

    python examples/05_word_rnnlm.py
    python examples/05_word_rnnlm.py --cell gru --vocab 4000 --steps 5000 --device cuda
    python examples/05_word_rnnlm.py --optimizer sgd --lr 1.0
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

import xrnn

SENTENCE_END = (".", "!", "?")


def perplexity(model: xrnn.CharLM, ids: np.ndarray, batch_size: int, seq_len: int) -> float:
    """``exp`` of the mean next-word cross-entropy over ``ids`` (state carried across windows)."""
    batch_size = max(1, min(batch_size, (len(ids) - 1) // seq_len))
    batches = xrnn.StreamBatcher(ids, batch_size, seq_len)
    dev = model.device
    total, n, state = None, 0, None
    was = model.training
    model.eval()
    with xrnn.no_grad():
        for x, y in batches.iterate_once():
            logits, state = model(xrnn.to_device(x, dev), state)  # (B, T, V)
            loss, _ = xrnn.softmax_cross_entropy(logits, xrnn.to_device(y, dev))
            with dev:
                total = loss * y.size if total is None else total + loss * y.size
            n += y.size
    model.train(was)
    return math.exp(float(total) / n)  # one host read


def generate_sentence(model: xrnn.CharLM, rng: np.random.Generator, prime: str = "\n", max_words: int = 40,
                      temperature: float = 1.0) -> str:
    """Britz's ``generate_sentence``: draw word after word until a sentence ends, never the unknown token.

    Written with the lower-level pieces (a forward per word, :func:`xrnn.draw`)
    to show the loop that :func:`xrnn.sample` runs, plus the ``<unk>`` ban.
    """
    vocab, dev = model.vocab, model.device
    V = len(vocab)
    ban = np.zeros(V)
    if vocab.unk_id is not None:
        ban[vocab.unk_id] = -np.inf
    ban = dev.asarray(ban, dtype=model.dtype)  # (V,) added to the logits: the unknown token gets probability 0
    ids = vocab.encode(prime)  # (P,)
    words: list[int] = []
    was = model.training
    model.eval()
    with xrnn.no_grad():
        logits, state = model(dev.asarray(ids[None, :], dtype="int64"), None)  # (1, P, V)
        for _ in range(max_words):
            with dev:
                last = logits[:, -1, :] + ban  # (1, V)
            u = dev.asarray(rng.random(1), dtype=model.dtype)  # (1,) uniform, drawn on the host
            tok = xrnn.draw(last, u, temperature=temperature)  # (1,) on the device
            words.append(int(xrnn.to_numpy(tok)[0]))
            if vocab.token(words[-1]) in SENTENCE_END:
                break
            with dev:
                logits, state = model(dev.xp.reshape(tok, (1, 1)), state)  # (1, 1, V)
    model.train(was)
    return vocab.decode(words)


def sentence_perplexities(model: xrnn.CharLM, sentences: list[str], start: str = "\n") -> list[float]:
    """Per-word perplexity of each sentence under the model, all sentences in one padded batch.

    Each sentence is read after ``start`` (a line break, as generation primes);
    the batch is right-padded to the longest and run with ``lengths=``, so
    every row's logits are exactly those of the sentence alone.
    """
    vocab, dev = model.vocab, model.device
    seqs = [vocab.encode(start + s) for s in sentences]  # (T_i,) ids, T_i >= 2
    ids, lengths = xrnn.pad_sequences(seqs, batch_first=True, device=dev)  # (B, T) on the device, lengths on the host
    was = model.training
    model.eval()
    with xrnn.no_grad():
        logits, _ = model(ids, lengths=lengths)  # (B, T, V); each row's recurrence stops at its length
        with dev:
            logp = xrnn.functional.log_softmax(dev.xp, logits)  # (B, T, V)
    model.train(was)
    logp = xrnn.to_numpy(logp)  # one host read for the whole batch
    out = []
    for b, seq in enumerate(seqs):
        n = len(seq) - 1  # predictions of tokens 1..n from positions 0..n-1
        nll = -logp[b, np.arange(n), seq[1:]].mean()
        out.append(math.exp(float(nll)))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help='"cpu", "cuda", "torch:cpu", "auto" (a GPU if usable), ...')
    p.add_argument("--text", default=None, help="UTF-8 text file (default: the bundled tiny Shakespeare)")
    p.add_argument("--max-tokens", type=int, default=None, help="use only the first N words of the text")
    p.add_argument("--vocab", type=int, default=2000, help="most frequent words kept; the rest become <unk>")
    p.add_argument("--cell", choices=("rnn", "gru", "lstm"), default="rnn", help="rnn (Britz parts 2-3), gru (part 4)")
    p.add_argument("--hidden-size", type=int, default=128, help="units of the recurrent layer")
    p.add_argument("--embedding-dim", type=int, default=64, help="word embedding size")
    p.add_argument("--bptt", type=int, default=20, help="words per window: backpropagation is truncated here")
    p.add_argument("--batch-size", type=int, default=32, help="parallel streams")
    p.add_argument("--steps", type=int, default=2000, help="training windows")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: adam 2e-3, sgd 1.0)")
    p.add_argument("--clip", type=float, default=5.0, help="clip the global gradient norm to this")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=500, help="report validation perplexity every N steps")
    p.add_argument("--sentences", type=int, default=5, help="sentences to generate at the end")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 2e-3 if args.optimizer == "adam" else 1.0
    return args


def main(argv=None) -> dict:
    """Returns ``{"vocab_size", "val_perplexity", "history": [(step, train_ppl, val_ppl)], "sentences"}``."""
    args = parse_args(argv)
    corpus = xrnn.read_corpus(args.text or xrnn.default_corpus_path(), level="word", max_vocab=args.vocab,
                              lowercase=True)
    ids = corpus.ids[: args.max_tokens] if args.max_tokens else corpus.ids
    train_ids, val_ids = xrnn.split(ids, args.val_fraction)
    vocab = corpus.vocab
    V = len(vocab)
    unk_share = float(np.mean(ids == vocab.unk_id)) if vocab.unk_id is not None else 0.0
    print(f"{len(ids):,} words, vocabulary {V} ({args.vocab} most frequent + <unk>, which covers "
          f"{unk_share:.1%} of the text); {len(train_ids):,} train / {len(val_ids):,} validation")

    rng = np.random.default_rng(args.seed)
    model = xrnn.CharLM(V, args.hidden_size, num_layers=1, cell=args.cell, embedding_dim=args.embedding_dim,
                        device=args.device, seed=rng, vocab=vocab)
    if args.optimizer == "adam":
        opt = xrnn.optim.Adam(model, lr=args.lr)
    else:
        opt = xrnn.optim.SGD(model, lr=args.lr)
    batches = xrnn.StreamBatcher(train_ids, args.batch_size, args.bptt)
    dev, xp = model.device, model.device.xp
    print(f"{args.cell.upper()} language model: {model.num_parameters():,} parameters on {dev.name}; "
          f"{args.batch_size} streams x {args.bptt} words, {args.optimizer} lr={args.lr}")
    print(f"before training: validation perplexity {perplexity(model, val_ids, args.batch_size, args.bptt):.1f} "
          f"(uniform guess: {V})")

    history, pending, state = [], [], None
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y, new_epoch = batches.next_batch()  # (B, T) word ids
        logits, state = model(xrnn.to_device(x, dev), None if new_epoch else state)  # (B, T, V)
        loss, dlogits = xrnn.softmax_cross_entropy(logits, xrnn.to_device(y, dev))
        model.zero_grad()
        model.backward(dlogits)  # BPTT through this window only: the carried state is a constant
        xrnn.clip_grad_norm(model, args.clip)
        opt.step()
        pending.append(loss)
        if step % args.eval_every == 0 or step == args.steps:
            with dev:
                train_ppl = math.exp(float(xp.mean(xp.stack(pending))))  # one host read per report
            pending = []
            val_ppl = perplexity(model, val_ids, args.batch_size, args.bptt)
            history.append((step, train_ppl, val_ppl))
            words = step * args.batch_size * args.bptt
            print(f"step {step:>6}  epoch {words / len(train_ids):5.2f}  train perplexity {train_ppl:8.1f}  "
                  f"validation perplexity {val_ppl:8.1f}  ({time.perf_counter() - t0:.0f} s)")

    print("\ngenerated sentences (each starts after a line break; <unk> is never drawn):")
    sentences = [generate_sentence(model, rng) for _ in range(args.sentences)]
    scores = sentence_perplexities(model, sentences) if sentences else []
    for s, ppl in zip(sentences, scores):
        words = " / ".join(line.strip() for line in s.strip().split("\n") if line.strip())
        print(f"  {words}   (perplexity {ppl:.0f})")
    return {"vocab_size": V, "val_perplexity": history[-1][2] if history else float("nan"),
            "history": history, "sentences": sentences, "sentence_perplexities": scores, "model": model}


if __name__ == "__main__":
    main()
