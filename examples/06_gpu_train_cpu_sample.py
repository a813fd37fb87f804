"""Train on a GPU, sample on the CPU from the same checkpoint.

The everyday split: train where the arithmetic is fast, then generate text
wherever the model is needed (a laptop, a CPU server). xrnn checkpoints hold
plain little-endian arrays, no device objects and no pickles, so a file
written while the weights were CuPy arrays on a GPU loads directly onto any
other device: ``load_model(path, device="cpu")`` (or ``xrnn.load``), with no
conversion step and no GPU needed on the reading side.

The script trains a character LSTM on tiny Shakespeare on ``--train-device``
(or ``--device``, as in the other examples; default ``cuda``), saves
``last.ckpt``, loads it on ``--sample-device`` (default ``cpu``) and
samples. It then checks that the two copies of the model
agree: the next-character logits of a probe text, computed by the trained
model on the training device and by the loaded model on the sampling device,
differ only by float32 rounding.

Without a usable GPU (no CuPy, no CUDA device) the script says why, with
xrnn's own message, and trains on the CPU instead, so it runs everywhere;
``--no-fallback`` makes that an error.

The checkpoints stay in ``--out`` (default ``runs/gpu_cpu``); the script
ends by printing where they are and the ``xrnn sample`` command for them.

Run::

    python examples/06_gpu_train_cpu_sample.py                       # cuda -> cpu
    python examples/06_gpu_train_cpu_sample.py --train-device cuda:1 --steps 2000
    python examples/06_gpu_train_cpu_sample.py --train-device array_api_strict:device1   # no GPU needed

The same with the command line::

    xrnn train --device cuda --hidden-size 256 --batch-size 64 --seq-len 64 --steps 1000 --out runs/gpu
    xrnn sample runs/gpu/last.ckpt --device cpu --prime "JULIET:"
"""

from __future__ import annotations

import argparse
import os
import shlex

import numpy as np

import xrnn
from xrnn.errors import BackendUnavailableError, DeviceError
from xrnn.train import DEFAULTS, load_model  # the model of a training checkpoint, without optimizer state


def pick_train_device(spec: str, fallback: bool) -> str:
    """``spec`` if it works here; otherwise explain (xrnn's message) and return "cpu" (or exit)."""
    try:
        return xrnn.resolve_device(spec).name
    except (BackendUnavailableError, DeviceError) as e:
        if not fallback:
            raise SystemExit(f"cannot train on {spec!r}: {e}") from None
        print(f"note: cannot train on {spec!r}: {e}\nnote: training on the CPU instead "
              f"(available here: {', '.join(xrnn.available_devices())}); with the default sizes this takes "
              "several minutes, lower --steps or --hidden-size for a quick look")
        return "cpu"


def logits_on(model: xrnn.CharLM, text: str) -> np.ndarray:
    """Next-character logits (T, V) for ``text``, computed on the model's device, as a host array."""
    ids = model.vocab.encode(text)[None, :]  # (1, T)
    with xrnn.no_grad():
        logits, _ = model(model.device.asarray(ids, dtype="int64"), None)  # (1, T, V)
    return xrnn.to_numpy(logits)[0]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-device", "--device", dest="train_device", default="cuda",
                   help='where to train: "cuda", "cuda:1", "torch:cuda", "auto" (a GPU if usable, else the CPU), '
                        '... (--device is the same option, as in the other examples)')
    p.add_argument("--sample-device", default="cpu", help="where to load the checkpoint and sample")
    p.add_argument("--no-fallback", action="store_true", help="fail instead of training on the CPU without a GPU")
    p.add_argument("--out", default=os.path.join("runs", "gpu_cpu"),
                   help="directory for last.ckpt and best.ckpt, replaced if there (default: runs/gpu_cpu)")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="Adam learning rate")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval-batches", type=int, default=None,
                   help="validation windows at the end (default: the whole validation split)")
    p.add_argument("--prime", default="JULIET:")
    p.add_argument("--length", type=int, default=300, help="characters to sample")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=1337)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Returns ``{"train_device", "sample_device", "checkpoint", "sample", "max_logit_diff"}``."""
    args = parse_args(argv)
    train_device = pick_train_device(args.train_device, fallback=not args.no_fallback)
    out_dir = args.out
    print(f"== training on {train_device} ==")
    trainer = xrnn.train(steps=args.steps, hidden_size=args.hidden_size, num_layers=args.num_layers,
                         batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, eval_every=args.steps,
                         eval_batches=args.eval_batches, sample_every=0, seed=args.seed,
                         device=train_device, out_dir=out_dir, progress="plain", overwrite=True)
    path = os.path.join(out_dir, "last.ckpt")

    print(f"\n== loading {path} on {args.sample_device} ==")
    info = xrnn.peek(path)  # header only: no weights read, no device needed
    print(f"checkpoint: {info.kind}, {info.file_size:,} bytes, step {info.meta.get('step')}")
    model = load_model(path, device=args.sample_device)  # weights straight onto the sampling device
    print(f"model on {model.device.name}: {model}")
    text = xrnn.sample(model, length=args.length, prime=args.prime, temperature=args.temperature,
                       seed=args.seed)
    print("----\n" + text + "\n----")

    probe = "ROMEO:\nBut, soft! what light through yonder window breaks?"
    diff = float(np.max(np.abs(logits_on(trainer.model, probe) - logits_on(model, probe))))
    print(f"next-character logits of a probe line, {trainer.model.device.name} vs {model.device.name}: "
          f"max |difference| {diff:.2e}")
    command = ["sample", path, "--device", args.sample_device, "--prime", args.prime, "--temperature",
               str(args.temperature), "--length", "500"]
    print(f"\nthe checkpoints are kept: {path} and {os.path.join(out_dir, 'best.ckpt')}\n"
          f"sample from them with:\n  {shlex.join(['xrnn', *command])}")
    return {"train_device": train_device, "sample_device": model.device.name, "checkpoint": path,
            "sample": text, "max_logit_diff": diff, "model": model, "sample_command": command}


if __name__ == "__main__":
    main()
