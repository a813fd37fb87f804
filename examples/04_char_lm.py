"""A character language model on tiny Shakespeare, with the ``xrnn`` command and from Python.

Retraces char-rnn (Karpathy's Lua/Torch ``train.lua`` / ``sample.lua``): a
2-layer LSTM of 128 units reads the text as 50 parallel streams of
50-character windows (truncated BPTT, the hidden state carried from window
to window), Adam, the gradient norm clipped at 5, 5% of the text held out for validation, the best model
kept in a checkpoint, then sampled with a prime and a temperature.

The same run is done twice, once per interface, with the same options and
seed, and the script checks that both reach the same validation loss and
write the same sample (the command line calls the Python API: one loop).

On the command line (``xrnn`` is installed with the package; ``python -m
xrnn`` is the same)::

    xrnn train --steps 1000 --out runs/shakespeare             # checkpoints: last.ckpt, best.ckpt
    xrnn sample runs/shakespeare/best.ckpt --prime "ROMEO:" --temperature 0.8 --length 500
    xrnn info runs/shakespeare/last.ckpt                       # config, steps, best validation loss
    xrnn plot runs/shakespeare/last.ckpt -o loss.png           # loss curves (needs xrnn-array[plot])
    xrnn train --steps 3000 --out runs/shakespeare --resume    # continue the same run to step 3000

From Python::

    import xrnn
    from xrnn import load_model, train
    trainer = xrnn.train(steps=1000, out_dir="runs/shakespeare")    # the Trainer, after training
    model = load_model("runs/shakespeare/best.ckpt", device="cpu")
    print(xrnn.sample(model, length=500, prime="ROMEO:", temperature=0.8, seed=1))

Run this script (both parts: two runs of 1000 steps, a few minutes on a laptop
CPU; validation loss about 1.85 nats per character, samples with speaker
names and verse lines). The checkpoints stay in ``--out`` (default
``runs/char_lm``: ``cli/`` and ``python/``, each with ``last.ckpt`` and
``best.ckpt``); the script ends by printing them and the ``xrnn sample``
command that samples from them::

    python examples/04_char_lm.py
    python examples/04_char_lm.py --part python --steps 2000 --device auto --out runs/char_lm_gpu
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex

import xrnn
from xrnn.cli import main as xrnn_command
from xrnn.train import DEFAULTS, load_model  # the model of a training checkpoint, without optimizer state


def run_command(words: list[str], capture: bool = False) -> str:
    """Run ``xrnn WORDS...`` in this process (what the console script does); returns its output if captured."""
    print("$ xrnn " + shlex.join(words), flush=True)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf) if capture else contextlib.nullcontext():
        status = xrnn_command(words)
    if capture:
        print(buf.getvalue(), end="")
    if status != 0:
        raise SystemExit(f"xrnn {words[0]} failed with exit status {status}")
    return buf.getvalue()


def cli_part(args, out_dir: str) -> dict:
    print("\n== the command line ==")
    extra = [] if args.eval_batches is None else ["--eval-batches", str(args.eval_batches)]
    run_command([
        "train", "--steps", str(args.steps), "--model", args.cell, "--hidden-size", str(args.hidden_size),
        "--num-layers", str(args.num_layers), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
        "--lr", str(args.lr), "--eval-every", str(args.eval_every), "--sample-every", "0", "--seed", str(args.seed),
        "--device", args.device, "--out", out_dir, "--progress", "lines", "--overwrite",
    ] + extra)
    text = run_command([
        "sample", os.path.join(out_dir, "best.ckpt"), "--prime", args.prime, "--length", str(args.length),
        "--temperature", str(args.temperature), "--seed", str(args.seed), "--device", args.device,
    ], capture=True)
    run_command(["info", os.path.join(out_dir, "last.ckpt")])
    return {"sample": text.rstrip("\n"), "best_val_loss": xrnn.peek(os.path.join(out_dir, "last.ckpt"))
            .meta["best"]["val_loss"]}


def python_part(args, out_dir: str) -> dict:
    print("\n== from Python ==")
    trainer = xrnn.train(steps=args.steps, model=args.cell, hidden_size=args.hidden_size, num_layers=args.num_layers,
                         batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                         eval_every=args.eval_every, eval_batches=args.eval_batches, sample_every=0,
                         seed=args.seed, device=args.device, out_dir=out_dir, progress="plain", overwrite=True)
    print(f"trained {trainer.step} steps; best validation loss {trainer.best_val_loss:.4f} nats/char "
          f"at step {trainer.best_step}")
    model = load_model(os.path.join(out_dir, "best.ckpt"), device=args.device)  # a CharLM with its vocabulary
    text = xrnn.sample(model, length=args.length, prime=args.prime, temperature=args.temperature, seed=args.seed)
    print(text)
    return {"sample": text, "best_val_loss": trainer.best_val_loss, "trainer": trainer, "model": model}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help='"cpu", "cuda", "torch:cpu", "auto" (a GPU if usable), ...')
    p.add_argument("--part", choices=("cli", "python", "both"), default="both")
    p.add_argument("--out", default=os.path.join("runs", "char_lm"),
                   help="directory for the runs: OUT/cli and OUT/python each get last.ckpt and best.ckpt, "
                        "replaced if there (default: runs/char_lm)")
    # the defaults of `xrnn train` (char-rnn's shapes), except half its step budget since this trains twice
    p.add_argument("--cell", choices=("lstm", "gru", "rnn"), default=DEFAULTS["model"])
    p.add_argument("--hidden-size", type=int, default=DEFAULTS["hidden_size"])
    p.add_argument("--num-layers", type=int, default=DEFAULTS["num_layers"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="Adam learning rate")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-batches", type=int, default=None,
                   help="validation windows per evaluation (default: the whole validation split)")
    p.add_argument("--prime", default="ROMEO:")
    p.add_argument("--length", type=int, default=300, help="characters to sample")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=1337)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Returns ``{"cli": {"sample", "best_val_loss"}, "python": {...}}`` for the parts run."""
    args = parse_args(argv)
    results = {}
    root = args.out
    if args.part in ("cli", "both"):
        results["cli"] = cli_part(args, os.path.join(root, "cli"))
    if args.part in ("python", "both"):
        results["python"] = python_part(args, os.path.join(root, "python"))
    if args.part == "both":
        a, b = results["cli"], results["python"]
        same_loss = a["best_val_loss"] == b["best_val_loss"]
        same_text = a["sample"] == b["sample"]
        print(f"\ncommand line vs Python: best validation loss {a['best_val_loss']:.6f} vs "
              f"{b['best_val_loss']:.6f} ({'identical' if same_loss else 'DIFFERENT'}); "
              f"samples {'identical' if same_text else 'DIFFERENT'}")
    print("\nthe checkpoints are kept:")
    for part in results:
        print(f"  {os.path.join(root, part, 'last.ckpt')} and {os.path.join(root, part, 'best.ckpt')}")
    best = os.path.join(root, next(iter(results)), "best.ckpt")
    print("sample from one with:\n  " + shlex.join(["xrnn", "sample", best, "--prime", args.prime,
                                                     "--temperature", str(args.temperature), "--length", "500"]))
    results["sample_command"] = ["sample", best, "--prime", args.prime, "--temperature", str(args.temperature),
                                 "--length", "500"]
    return results


if __name__ == "__main__":
    main()
