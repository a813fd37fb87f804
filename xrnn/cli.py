"""The ``xrnn`` command (also ``python -m xrnn``): train, sample, info, plot.

::

    xrnn train [TEXT_FILE] [options]      train a character model (default: tiny Shakespeare)
    xrnn sample CHECKPOINT [options]      stream text from a trained model
    xrnn info CHECKPOINT                  config, parameters, steps, best validation loss
    xrnn plot CHECKPOINT -o loss.png      training and validation loss curves

``xrnn train`` calls :func:`xrnn.train.train`, so the command line and the
Python API run the same loop. Errors (bad option values, missing or empty
files, damaged checkpoints, a diverging run, running out of memory, a full
disk, ...) are reported as one line
``xrnn: error: ...`` with exit status 2; ``--debug`` shows the traceback
instead. An interrupted ``xrnn train`` (Ctrl-C, SIGTERM) saves its state and
exits with status 128 + the signal number (130, 143); ``--resume`` continues.
``mpirun -n N xrnn train ... --distributed`` trains one model on N ranks
(data-parallel, see :mod:`xrnn.distributed`); there an error on any rank
ends every rank.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from .errors import XRNNError, plural

__all__ = ["main", "build_parser"]

PROG = "xrnn"


class _UsageError(Exception):
    """A bad command line (reported like any other error: one line, exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage and exit; we want one line
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:  # a mistyped command or choice: offer the closest one
            import difflib

            near = difflib.get_close_matches(m.group(1), re.findall(r"'([^']*)'", m.group(2)), n=1)
            if near:
                message += f"; did you mean {near[0]!r}?"
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def _command_parser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    """The sub-parser of ``command`` (the top-level parser when there is none)."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction) and command in a.choices:
            return a.choices[command]
    return parser


def _suggestion(extra: Sequence[str], parser: argparse.ArgumentParser) -> str:
    """``"; did you mean --hidden-size?"`` for an unknown flag close to a real one, else ``""``.

    argparse suggests nothing before Python 3.14 (``suggest_on_error``); a flag that is the start
    of exactly one real flag (``--hidden`` for ``--hidden-size``) or close in spelling
    (``--hiden-size``) is offered.
    """
    import difflib

    flags = sorted({s for a in parser._actions for s in a.option_strings if s.startswith("--")})
    out = []
    for word in extra:
        if not word.startswith("--"):
            continue
        word = word.split("=", 1)[0]
        starts = [f for f in flags if f.startswith(word)]
        near = starts if len(starts) == 1 else difflib.get_close_matches(word, flags, n=1, cutoff=0.75)
        if near:
            out.append((word, near[0]))
    if len(out) == 1:
        return f"; did you mean {out[0][1]}?"
    return f"; did you mean {', '.join(f'{w} -> {f}' for w, f in out)}?" if out else ""


def _device_arg(spec: str) -> Any:
    """``--device`` as given, except ``auto``: the chosen Device, with the choice printed on stderr."""
    if spec.strip().lower() != "auto":
        return spec
    from .backend import auto_device

    dev, reason = auto_device()
    print(f"{PROG}: --device auto: {reason}", file=sys.stderr, flush=True)
    return dev


def _check_train_contradictions(args: argparse.Namespace) -> None:
    """Options that cannot all hold are refused, not silently ignored."""
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise _UsageError(f"--out {args.out!r} is a file; --out names the directory that holds the run's "
                          "last.ckpt and best.ckpt")
    if args.steps == 0 and not args.resume:
        raise _UsageError("--steps 0 would start a run that trains nothing; give --steps N with N >= 1")


# Python argument names in the library's messages, and the flags that say the same on the command line
_FLAG_FOR = {"out_dir": "--out", "sample_temperature": "--temperature", "resume": "--resume",
             "overwrite": "--overwrite"}


def _in_flags(message: str, parser: argparse.ArgumentParser) -> str:
    """A library message as the command line says it: ``resume=True`` -> ``--resume``,
    ``hidden_size=256`` -> ``--hidden-size 256``, ``out_dir`` -> ``--out``; a flag then repeated
    in parentheses right after (``out_dir (--out)``) is said once."""
    flags = {a.dest: s for a in parser._actions for s in a.option_strings[-1:] if s.startswith("--")}
    flags.update({k: v for k, v in _FLAG_FOR.items() if v in flags.values()})
    flags.pop("help", None)
    if not flags:
        return message
    names = "|".join(sorted(map(re.escape, flags), key=len, reverse=True))

    def assignment(m: re.Match) -> str:
        flag, value = flags[m.group(1)], m.group(2)
        if value == "True":
            return flag
        if value == "None" and flag == "--clip":  # clip=None is no norm clipping: --clip 0
            value = "0"
        if value[:1] in "'\"" and value[-1:] == value[:1]:
            value = value[1:-1]
        return f"{flag} {value}"

    message = re.sub(rf"(?<![\w.-])({names})=(True|'[^']*'|\"[^\"]*\"|[\w.+-]+)", assignment, message)
    message = re.sub(rf"(?<![\w.=*+-])({names})(?![\w=(*+-])",
                     lambda m: flags[m.group(1)] if "_" in m.group(1) else m.group(1), message)
    # "(device='cpu', --device cpu)" became "(--device cpu, --device cpu)": say it once
    message = re.sub(r"(--[\w-]+(?: [^\s,;()]+)?), \1(?=[),;])", r"\1", message)
    # "--resume (--resume)", "--batch-size or --seq-len (--batch-size, --seq-len)": say each flag once
    return re.sub(r"(--[\w-]+(?: \S+)?)((?:,? (?:or |and )?--[\w-]+(?: \S+)?)*) \((--[\w-]+(?:, --[\w-]+)*)\)",
                  lambda m: m.group(1) + m.group(2)
                  if set(m.group(3).split(", ")) <= set(re.findall(r"--[\w-]+", m.group(1) + m.group(2)))
                  else m.group(0), message)


# ---------------------------------------------------------------------------
# value types: each rejects a bad value with a message argparse puts on one line
# ---------------------------------------------------------------------------

def _int_at_least(lo: int, what: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v

    parse.__name__ = what
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_count = _int_at_least(0, "an integer >= 0")


def _float_in(what: str, ok):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (math.isfinite(v) and ok(v)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return v

    parse.__name__ = what
    return parse


_positive_float = _float_in("a number > 0", lambda v: v > 0)
_non_negative_float = _float_in("a number >= 0", lambda v: v >= 0)
_dropout = _float_in("a probability in [0, 1)", lambda v: 0 <= v < 1)
_fraction = _float_in("a fraction in [0, 1)", lambda v: 0 <= v < 1)
_top_p = _float_in("a probability in (0, 1]", lambda v: 0 < v <= 1)
_decay = _float_in("a decay factor in (0, 1] (the learning rate is multiplied by it every epoch)",
                   lambda v: 0 < v <= 1)
_temperature = _float_in("a temperature > 0 (use --greedy for the most likely token)", lambda v: v > 0)


def _lower(text: str) -> str:
    return text.lower()


# ---------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from ._defaults import DEFAULTS

    D = DEFAULTS
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")

    parser = _Parser(
        prog=PROG,
        description="Recurrent neural networks (RNN, LSTM, GRU) on NumPy or CuPy: train character "
                    "language models and sample from them.",
        parents=[common],
        allow_abbrev=False,
    )
    from ._version import __version__

    parser.add_argument("--version", action="version", version=f"xrnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    # -- train -------------------------------------------------------------------
    t = sub.add_parser(
        "train", parents=[common], allow_abbrev=False,
        help="train a character-level language model",
        description="Train a character-level language model. With no TEXT_FILE it trains on the tiny "
                    "Shakespeare corpus shipped with xrnn, on the CPU, for a budget of a few minutes. "
                    "Checkpoints go to --out: last.ckpt (every --save-every steps, at the end, and on "
                    "Ctrl-C) and best.ckpt (best validation loss). Ctrl-C saves and exits; run the "
                    "same command with --resume to continue exactly where it stopped.",
    )
    t.add_argument("text_file", nargs="?", metavar="TEXT_FILE",
                   help="UTF-8 text file to train on (default: the shipped tiny Shakespeare; with --resume: "
                        "the run's own corpus)")
    g = t.add_argument_group("model")
    g.add_argument("--model", type=_lower, choices=("lstm", "gru", "rnn"),
                   help=f"recurrent cell (default: {D['model']})")
    g.add_argument("--hidden-size", type=_positive_int, metavar="N",
                   help=f"units per recurrent layer (default: {D['hidden_size']})")
    g.add_argument("--num-layers", type=_positive_int, metavar="L",
                   help=f"stacked recurrent layers (default: {D['num_layers']})")
    g.add_argument("--embedding-dim", type=_positive_int, metavar="E",
                   help="size of a learned input embedding (default: one-hot input, as char-rnn)")
    g.add_argument("--dropout", type=_dropout, metavar="P",
                   help=f"dropout probability between layers and before the output (default: {D['dropout']})")
    g.add_argument("--dtype", type=_lower, choices=("float32", "float64"),
                   help=f"parameter dtype (default: {D['dtype']})")
    g = t.add_argument_group("optimization")
    g.add_argument("--steps", type=_count, metavar="N",
                   help=f"total number of optimizer steps (default: {D['steps']}); with --resume: the interrupted "
                        "run's own target unless given")
    g.add_argument("--batch-size", type=_positive_int, metavar="B",
                   help=f"parallel text streams per step (default: {D['batch_size']})")
    g.add_argument("--seq-len", type=_positive_int, metavar="T",
                   help=f"characters per window, the truncated-BPTT length (default: {D['seq_len']})")
    g.add_argument("--optimizer", type=_lower, choices=("adam", "adamw", "sgd", "adagrad", "rmsprop"),
                   help=f"optimizer (default: {D['optimizer']})")
    g.add_argument("--lr", type=_positive_float, metavar="X", help=f"learning rate (default: {D['lr']})")
    g.add_argument("--schedule", type=_lower, choices=("constant", "cosine", "step"),
                   help="learning-rate schedule: constant; cosine decay to --min-lr at --steps; or step: "
                        "char-rnn's decay, x --decay-rate at the end of every epoch from epoch --decay-after on "
                        "(default: constant)")
    g.add_argument("--decay-rate", type=_decay, metavar="F",
                   help="--schedule step: factor per epoch (default: 0.97, as char-rnn)")
    g.add_argument("--decay-after", type=_count, metavar="E",
                   help="--schedule step: first epoch whose end decays the rate (default: 10, as char-rnn)")
    g.add_argument("--warmup", type=_count, metavar="N",
                   help="linear learning-rate warm-up over the first N steps (default: 0)")
    g.add_argument("--min-lr", type=_non_negative_float, metavar="X",
                   help="final learning rate of the cosine schedule (default: 0)")
    g.add_argument("--clip", type=_non_negative_float, metavar="X",
                   help=f"clip the global gradient norm to X; 0 turns it off (default: {D['clip']})")
    g.add_argument("--clip-value", type=_positive_float, metavar="X",
                   help="also clamp every gradient element to [-X, X], as min-char-rnn (default: off)")
    g.add_argument("--seed", type=_count, metavar="S",
                   help=f"seed of the initial weights, dropout and samples (default: {D['seed']})")
    g = t.add_argument_group("data")
    g.add_argument("--val-fraction", type=_fraction, metavar="F",
                   help=f"fraction of the text held out for validation; 0 turns validation off "
                        f"(default: {D['val_fraction']})")
    g.add_argument("--level", type=_lower, choices=("char", "word"),
                   help="model characters or words (default: char)")
    g.add_argument("--max-vocab", type=_positive_int, metavar="N",
                   help="word level: keep the N most frequent words, the rest become <unk> (default: all)")
    g.add_argument("--lowercase", action="store_true", default=None, help="lowercase the text first")
    g = t.add_argument_group("run")
    g.add_argument("--device", default="cpu", metavar="D",
                   help="where to train: cpu, cuda, cuda:N, ..., or auto: the first usable GPU, else the CPU "
                        "(default: cpu)")
    g.add_argument("--out", default="out", metavar="DIR",
                   help="directory for last.ckpt and best.ckpt (default: out)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run saved in DIR/last.ckpt (model and optimizer options come from the "
                        "checkpoint; giving different ones is an error)")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run even though DIR already holds one (it is replaced)")
    g.add_argument("--init-from", metavar="CKPT",
                   help="fine-tune: start a new run on TEXT_FILE (step 0, a new optimizer) from the weights of "
                        "checkpoint CKPT; the model options come from it (giving different ones is an error)")
    g.add_argument("--extend-vocab", action="store_true",
                   help="with --init-from: add the characters of TEXT_FILE that CKPT's vocabulary lacks (new rows "
                        "initialised as a new model's); without it such characters are an error")
    g.add_argument("--eval-every", type=_count, metavar="N",
                   help=f"validate every N steps and at the end; 0: only at the end (default: {D['eval_every']})")
    g.add_argument("--eval-batches", type=_positive_int, metavar="N",
                   help="validation windows per evaluation (default: the whole validation split)")
    g.add_argument("--sample-every", type=_count, metavar="N",
                   help=f"print a sample every N steps and at the end; 0: never (default: {D['sample_every']})")
    g.add_argument("--sample-length", type=_count, metavar="N",
                   help="characters per printed sample (default: 200)")
    g.add_argument("--temperature", type=_temperature, metavar="T",
                   help="temperature of the printed samples (default: 0.8)")
    g.add_argument("--log-every", type=_positive_int, metavar="N",
                   help=f"progress/loss report interval in steps (default: {D['log_every']})")
    g.add_argument("--save-every", type=_count, metavar="N",
                   help=f"write DIR/last.ckpt every N steps; 0: only at the end (default: {D['save_every']})")
    g.add_argument("--progress", type=_lower, choices=("auto", "bar", "lines", "off"), default="auto",
                   help="progress display: a tqdm bar (needs xrnn-array[progress]), plain lines, or off; auto: a bar "
                        "on a terminal when tqdm is installed (default: auto)")
    g.add_argument("--threads", type=_positive_int, metavar="N",
                   help="CPU threads for the BLAS (and torch) math; lower it on a shared or busy machine "
                        "(default: the cores this process may use, per its CPU affinity)")
    g.add_argument("--lazy-nan-check", action="store_true",
                   help="read the loss only every --log-every steps instead of every step (faster on a GPU; "
                        "a divergence is then caught up to that many steps late)")
    g = t.add_argument_group("distributed (mpirun -n N xrnn train ... --distributed)")
    g.add_argument("--distributed", action="store_true",
                   help="data-parallel training over the ranks of the MPI job this command was started in: "
                        "each rank takes batch-size/N streams on its own device (--device cuda: the GPU of its "
                        "local rank), gradients are averaged every step (MPI on CPUs, NCCL on GPUs), rank 0 "
                        "prints and saves; without mpirun it is one process. A collective that waits longer "
                        "than $XRNN_COLLECTIVE_TIMEOUT seconds (default 300) ends the job")
    t.set_defaults(func=_cmd_train)

    # -- sample ------------------------------------------------------------------
    s = sub.add_parser(
        "sample", parents=[common], allow_abbrev=False,
        help="generate text from a checkpoint",
        description="Stream text from a trained model (a model checkpoint or a training run's "
                    "last.ckpt/best.ckpt) to standard output as it is produced.",
    )
    s.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file (e.g. out/best.ckpt)")
    s.add_argument("--length", type=_count, default=500, metavar="N", help="new characters to generate (default: 500)")
    s.add_argument("--temperature", type=_temperature, default=None, metavar="T",
                   help="below 1 is more conservative, above 1 more surprising (default: 1.0)")
    s.add_argument("--top-k", type=_positive_int, metavar="K", help="sample only from the K most likely characters")
    s.add_argument("--top-p", type=_top_p, metavar="P",
                   help="sample only from the most likely characters holding probability P (nucleus)")
    s.add_argument("--greedy", action="store_true",
                   help="always take the most likely character (not with --temperature, --top-k or --top-p)")
    s.add_argument("--prime", default="", metavar="TEXT",
                   help="text to start from (printed first; default: a random first character)")
    s.add_argument("--device", default="cpu", metavar="D",
                   help="where to run: cpu, cuda, ..., or auto: the first usable GPU, else the CPU (default: cpu)")
    s.add_argument("--seed", type=_count, metavar="S", help="seed for reproducible samples (default: random)")
    s.add_argument("--allow-nonfinite", action="store_true",
                   help="sample even from weights holding NaN or infinity (a diverged run; refused by default)")
    s.set_defaults(func=_cmd_sample)

    # -- info ----------------------------------------------------------------------
    i = sub.add_parser(
        "info", parents=[common], allow_abbrev=False,
        help="describe a checkpoint",
        description="Print a checkpoint's model configuration, parameter count, training steps and best "
                    "validation loss (nats and bits per character). Reads no weights and needs no device.",
    )
    i.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file")
    i.add_argument("--json", action="store_true", help="print the information as one JSON object")
    i.set_defaults(func=_cmd_info)

    # -- plot ----------------------------------------------------------------------
    p = sub.add_parser(
        "plot", parents=[common], allow_abbrev=False,
        help="plot training and validation loss",
        description='Draw the training and validation loss curves of a training run (needs matplotlib: '
                    'pip install "xrnn-array[plot]").',
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a training run's checkpoint (e.g. out/last.ckpt)")
    p.add_argument("-o", "--output", default="loss.png", metavar="FILE",
                   help="image file to write; the format follows the extension (.png, .pdf, .svg) "
                        "(default: loss.png)")
    p.add_argument("--smooth", type=_positive_int, default=None, metavar="N",
                   help="moving-average window for the training curve, in steps (default: about 1/50 of the run)")
    p.set_defaults(func=_cmd_plot)
    return parser


# ---------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------

def _cmd_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .optim import Cosine, Warmup
    from .threads import set_threads
    from .train import DEFAULTS, train

    set_threads(args.threads)  # NumPy is loaded already: this also sets its BLAS at run time

    schedule: Any = None  # None, a Schedule, or (--schedule step) steps_per_epoch -> Schedule
    if args.schedule != "step" and (args.decay_rate is not None or args.decay_after is not None):
        raise _UsageError("--decay-rate and --decay-after apply to --schedule step")
    if args.schedule != "cosine" and args.min_lr is not None:
        raise _UsageError("--min-lr applies to --schedule cosine")
    lr = args.lr if args.lr is not None else DEFAULTS["lr"]
    if args.schedule == "step":
        rate = 0.97 if args.decay_rate is None else args.decay_rate
        after = 10 if args.decay_after is None else args.decay_after
        warmup = args.warmup

        def per_epoch(steps_per_epoch: int) -> Any:
            from .optim import StepDecay

            inner = StepDecay.from_epochs(lr, steps_per_epoch, rate, after)
            return Warmup(inner, warmup) if warmup else inner

        schedule = per_epoch
    elif args.schedule is not None or args.warmup:
        steps = args.steps if args.steps is not None else DEFAULTS["steps"]
        if args.schedule == "cosine":
            inner: Any = Cosine(lr, total_steps=max(steps, 1), min_lr=args.min_lr or 0.0)
        else:
            from .optim import Constant

            inner = Constant(lr)
        schedule = Warmup(inner, args.warmup) if args.warmup else inner
    progress = {"auto": True, "bar": "tqdm", "lines": "plain", "off": False}[args.progress]
    runtime: dict[str, Any] = {"progress": progress}
    for opt, key in (("eval_every", "eval_every"), ("eval_batches", "eval_batches"),
                     ("sample_every", "sample_every"), ("sample_length", "sample_length"),
                     ("temperature", "sample_temperature"), ("log_every", "log_every"),
                     ("save_every", "save_every")):
        v = getattr(args, opt)
        if v is not None:
            runtime[key] = v
    if args.lazy_nan_check:
        runtime["check_finite"] = False
    words = list(argv)
    if "--resume" not in words:
        words.append("--resume")
    words = [w for w in words if w != "--overwrite"]  # resuming must not replace the run
    import shlex

    hint = "xrnn " + shlex.join(words)
    if args.distributed:
        hint = "mpirun -n N " + hint
    else:
        from .distributed import launcher_world_size

        n = launcher_world_size()
        if n is not None and n > 1:
            raise _UsageError(
                f"this command was started by an MPI launcher with {n} ranks but without --distributed: every "
                f"rank would train its own copy and write the same files; add --distributed (or run one process)"
            )
    _check_train_contradictions(args)
    device = args.device if args.distributed else _device_arg(args.device)
    trainer = train(
        args.text_file,
        steps=args.steps,
        model=args.model,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        embedding_dim=args.embedding_dim,
        dropout=args.dropout,
        dtype=args.dtype,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        optimizer=args.optimizer,
        lr=args.lr,
        clip=(False if args.clip == 0 else args.clip),
        clip_value=args.clip_value,
        schedule=schedule,
        val_fraction=args.val_fraction,
        seed=args.seed,
        device=device,
        out_dir=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        level=args.level,
        max_vocab=args.max_vocab,
        lowercase=args.lowercase,
        distributed=args.distributed,
        init_from=args.init_from,
        extend_vocab=args.extend_vocab,
        _resume_hint=hint,
        **runtime,
    )
    if trainer.interrupted:
        import signal

        return 128 + int(getattr(signal, trainer.interrupted))
    return 0


def _cmd_sample(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .models import load_language_model
    from .sampling import check_sampling_options, generate

    if args.greedy:
        given = [flag for flag, v in (("--temperature", args.temperature), ("--top-k", args.top_k),
                                      ("--top-p", args.top_p)) if v is not None]
        if given:
            raise _UsageError(f"--greedy always takes the most likely character, so {' and '.join(given)} would "
                              f"be ignored; give either --greedy or {' / '.join(given)}")
    temperature = 1.0 if args.temperature is None else args.temperature
    check_sampling_options(temperature, args.top_k, args.top_p, args.greedy)
    model = load_language_model(args.checkpoint, device=_device_arg(args.device),
                                 allow_nonfinite=args.allow_nonfinite)
    out = sys.stdout
    last = ""
    for piece in generate(model, length=args.length, prime=args.prime, temperature=temperature,
                          top_k=args.top_k, top_p=args.top_p, greedy=args.greedy, seed=args.seed):
        out.write(piece)
        out.flush()
        if piece:
            last = piece
    if not last.endswith("\n"):
        out.write("\n")
    out.flush()
    return 0


def _fmt_loss(nats: Any, unit: str) -> str:
    if nats is None:
        return "-"
    return f"{nats:.4f} nats = {nats / math.log(2):.4f} {unit}"


def _describe_model(cfg: dict) -> str:
    cell = str(cfg.get("cell", "?")).upper()
    inp = "one-hot input" if cfg.get("embedding_dim") is None else f"embedding {cfg['embedding_dim']}"
    s = f"{cfg.get('num_layers', '?')}-layer {cell}, hidden size {cfg.get('hidden_size', '?')}, {inp}"
    if cfg.get("dropout"):
        s += f", dropout {cfg['dropout']}"
    return s + f", {cfg.get('dtype', '?')}"


def _info(path: str) -> dict:
    """What ``xrnn info`` prints, as a dict (from the header only: no weights are read)."""
    from .checkpoint import peek
    from .models import TRAINER_KIND, CharLM

    info = peek(path)
    meta = info.meta
    out: dict = {
        "file": os.path.abspath(path),
        "file_size": info.file_size,
        "format": info.format_version,
        "xrnn_version": info.xrnn_version,
        "kind": info.kind,
    }
    if info.kind == TRAINER_KIND:
        model_meta = meta.get("model") or {}
        prefix = "model/"
    elif info.kind == CharLM.checkpoint_kind:
        model_meta = meta
        prefix = ""
    else:
        out["meta_keys"] = sorted(meta)
        return out
    cfg = dict(model_meta.get("config") or {})
    vocab = model_meta.get("vocab") or {}
    out["model"] = cfg
    out["vocabulary"] = {"size": len(vocab.get("tokens") or []) or cfg.get("vocab_size"),
                         "level": vocab.get("level", "char")}
    out["parameters"] = int(sum(math.prod(t.shape) for k, t in info.tensors.items()
                                if k.startswith(prefix) and (prefix or "/" not in k)))
    if info.kind == TRAINER_KIND:
        traj = meta.get("trainer") or {}
        best = meta.get("best") or {}
        summ = meta.get("summary") or {}
        ident = (meta.get("data") or {}).get("corpus") or {}
        pos = (meta.get("data") or {}).get("position") or {}
        out.update({
            "step": meta.get("step"),
            "tokens_seen": meta.get("tokens_seen"),
            "training_seconds": meta.get("elapsed"),
            "train_loss_recent": summ.get("train_loss_recent"),
            "best_val_loss": best.get("val_loss"),
            "best_val_step": best.get("step"),
            "last_val_loss": summ.get("val_loss_last"),
            "optimizer": meta.get("optimizer"),
            "trainer": traj,
            "seed": meta.get("seed"),
            "corpus": ident,
            "epoch": summ.get("epoch", pos.get("epoch")),
        })
    return out


def _cmd_info(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .errors import CheckpointCorruptError

    try:
        return _print_info(args)
    except XRNNError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        # a checksum-valid file whose metadata has the wrong types (forged, or from an incompatible writer)
        raise CheckpointCorruptError(f"checkpoint {args.checkpoint!r} has malformed metadata: "
                                     f"{type(e).__name__}: {e}") from e


def _print_info(args: argparse.Namespace) -> int:
    d = _info(args.checkpoint)
    if args.json:
        print(json.dumps(d, indent=2, sort_keys=True))
        return 0
    rows = [("file", f"{d['file']} ({d['file_size']:,} bytes, format {d['format']}, written by xrnn "
                     f"{d['xrnn_version']})")]
    if "model" not in d:
        rows.append(("kind", f"{d['kind']} (not a language model or training run)"))
    else:
        kind = "training run (trainer checkpoint)" if d["kind"] == "xrnn.Trainer" else "language model"
        rows.append(("kind", f"{kind}, {d['kind']}"))
        rows.append(("model", f"CharLM: {_describe_model(d['model'])}"))
        v = d["vocabulary"]
        rows.append(("vocabulary", plural(v["size"], v["level"]) if isinstance(v["size"], int)
                     else f"{v['size']} {v['level']}s"))
        rows.append(("parameters", f"{d['parameters']:,}"))
        unit = "bpc" if v["level"] == "char" else "bits/token"
        if d["kind"] == "xrnn.Trainer":
            rows.append(("steps", f"{d['step']:,} ({plural(d['tokens_seen'] or 0, 'token')}, "
                                  f"{_epochs(d.get('epoch'))}, {_duration(d['training_seconds'])} of training)"))
            rows.append(("train loss", _fmt_loss(d["train_loss_recent"], unit) + " (mean of the last 100 steps)"))
            if d["best_val_loss"] is not None:
                rows.append(("best val loss", f"{_fmt_loss(d['best_val_loss'], unit)} at step {d['best_val_step']:,}"))
            elif (d.get("trainer") or {}).get("val_fraction") == 0:
                rows.append(("best val loss", "- (validation off: --val-fraction 0)"))
            else:
                rows.append(("best val loss", "- (not validated yet)"))
            if d["last_val_loss"] is not None:
                rows.append(("last val loss", _fmt_loss(d["last_val_loss"], unit)))
            tr = d["trainer"]
            om = d["optimizer"] or {}
            hyper = ", ".join(f"{k}={v}" for k, v in (om.get("hyper") or {}).items() if k != "lr")
            rows.append(("optimizer", f"{om.get('name')} ({hyper}); schedule {_describe_schedule(tr.get('schedule'))}"))
            clip = []
            if tr.get("clip") is not None:
                clip.append(f"global norm {tr['clip']:g}")
            if tr.get("clip_value") is not None:
                clip.append(f"value {tr['clip_value']:g}")
            rows.append(("clipping", ", ".join(clip) or "off"))
            rows.append(("batches", f"{tr.get('batch_size')} streams x {tr.get('seq_len')} steps; "
                                    f"validation fraction {tr.get('val_fraction')}"))
            c = d["corpus"] or {}
            src = "the shipped tiny Shakespeare" if c.get("default") else (c.get("path") or "an in-memory text")
            rows.append(("corpus", f"{src}: {c.get('num_tokens', 0):,} {c.get('level', 'char')}s, "
                                   f"sha256 {str(c.get('sha256'))[:16]}"))
            rows.append(("seed", str(d["seed"])))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _epochs(epoch: Any) -> str:
    if not isinstance(epoch, (int, float)):
        return "? epochs"
    return f"{epoch:.2f} epochs"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "?"
    from .train import _fmt_time

    return _fmt_time(float(seconds))


def _describe_schedule(cfg: Any) -> str:
    if not isinstance(cfg, dict):
        return "?"
    name = cfg.get("name")
    if name == "constant":
        return f"constant {cfg.get('lr'):g}"
    if name == "warmup":
        return f"{cfg.get('warmup_steps')} warm-up steps, then {_describe_schedule(cfg.get('schedule'))}"
    if name == "cosine":
        return f"cosine {cfg.get('lr'):g} -> {cfg.get('min_lr'):g} over {cfg.get('total_steps')} steps"
    if name == "step":
        return f"{cfg.get('lr'):g} x {cfg.get('factor')} every {cfg.get('every')} steps from {cfg.get('start')}"
    return str(name)


def _cmd_plot(args: argparse.Namespace, argv: Sequence[str]) -> int:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise _CliError('plotting needs matplotlib, which is not installed: pip install "xrnn-array[plot]"') from None
    import numpy as np

    from .checkpoint import read_container
    from .errors import CheckpointKindError
    from .train import Trainer

    c = read_container(args.checkpoint)
    if c.kind != Trainer.checkpoint_kind:
        raise CheckpointKindError(
            f"checkpoint {args.checkpoint!r} holds a {c.kind!r} without a loss history; plot the last.ckpt or "
            "best.ckpt of a training run"
        )
    from .errors import CheckpointCorruptError

    def bad(what: str):
        return CheckpointCorruptError(f"checkpoint {args.checkpoint!r} is damaged or was not written by xrnn: {what}")

    try:
        train = np.asarray(c.tensors.get("history/train_loss", np.zeros(0)), dtype=np.float64)
        vs = np.asarray(c.tensors.get("history/val_step", np.zeros(0)), dtype=np.int64)
        vl = np.asarray(c.tensors.get("history/val_loss", np.zeros(0)), dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise bad(f"its loss history is not numeric ({e})") from None
    if train.ndim != 1 or vs.ndim != 1 or vl.ndim != 1 or vs.shape != vl.shape:
        raise bad(f"its loss history has shapes {train.shape}, {vs.shape} (validation steps) and {vl.shape} "
                  "(validation losses); expected one-dimensional arrays, the last two of equal length")
    model_meta = c.meta.get("model")
    model_meta = model_meta if isinstance(model_meta, dict) else {}
    vocab: Any = model_meta.get("vocab") if isinstance(model_meta.get("vocab"), dict) else {}
    cfg: Any = model_meta.get("config") if isinstance(model_meta.get("config"), dict) else {}
    if train.size == 0:
        raise _CliError(f"checkpoint {args.checkpoint!r} has no recorded losses yet (step 0); train first")
    steps = np.arange(1, train.size + 1)
    w = args.smooth or max(1, train.size // 50)
    w = min(w, train.size)
    smooth = np.convolve(train, np.ones(w) / w, mode="valid")  # (n - w + 1,)
    unit = "bits per character" if vocab.get("level", "char") == "char" else "bits per token"

    fig = Figure(figsize=(8, 5), dpi=120)
    ax = fig.add_subplot()
    ax.plot(steps, train, color="tab:blue", alpha=0.25, linewidth=0.8, label="training (per step)")
    if w > 1:
        ax.plot(steps[w - 1:], smooth, color="tab:blue", linewidth=1.6, label=f"training ({w}-step mean)")
    if vs.size:
        ax.plot(vs, vl, "o-", color="tab:orange", linewidth=1.6, markersize=4, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    sec = ax.secondary_yaxis("right", functions=(lambda x: np.divide(x, math.log(2)),
                                                 lambda x: np.multiply(x, math.log(2))))
    sec.set_ylabel(unit)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(f"{os.path.basename(args.checkpoint)}: {_describe_model(cfg)}", fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(args.output)
    except ValueError as e:  # e.g. an unknown image format
        raise _CliError(f"cannot write {args.output!r}: {e}") from None
    print(f"wrote {args.output}")
    return 0


class _CliError(Exception):
    """A problem the command line reports as one line (missing optional dependency, ...)."""


# ---------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------

def _one_line(e: BaseException) -> str:
    msg = str(e)
    if isinstance(e, OSError) and not isinstance(e, XRNNError) and getattr(e, "filename", None):
        msg = f"{e.strerror or e}: {e.filename!r}"
    return " ".join(msg.split()) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``xrnn`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    entry = argv is None  # the process's own command line: the process exits when this returns
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    speak = None  # the command's parser, whose flags the library's messages are translated into
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if getattr(args, "command", None):
            speak = _command_parser(parser, args.command)
        if extra:
            where = f"{PROG} {args.command}" if getattr(args, "command", None) else PROG
            hint = _suggestion(extra, _command_parser(parser, getattr(args, "command", None)))
            raise _UsageError(f"unrecognized arguments: {' '.join(extra)}{hint} (see '{where} --help')")
        if args.command is None:  # as git and pip do: the usage on stderr, status 2
            parser.print_help(sys.stderr)
            return 2
        status = args.func(args, argv)
        if entry and args.command in ("sample", "info"):
            _skip_final_collections()
        return status
    except KeyboardInterrupt:
        if debug:
            raise
        print(file=sys.stderr)
        world = _distributed_world()
        if world is not None:
            world.abort(f"{PROG}: interrupted", 130)
        return 130
    except BrokenPipeError:
        # the reader went away (xrnn sample | head): stop quietly
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except (_UsageError, _CliError, XRNNError, OSError) as e:
        if debug:
            raise
        world = _distributed_world()
        msg = _one_line(e)
        if isinstance(e, XRNNError) and speak is not None:
            msg = _in_flags(msg, speak)
        if world is None:
            print(f"{PROG}: error: {msg}", file=sys.stderr)
            return 2
        # One rank returning while the others wait in a collective would hang the job until the
        # time-out: end every rank now (all ranks usually fail together and say the same).
        print(f"{PROG}: error (rank {world.rank} of {world.size}): {msg}", file=sys.stderr, flush=True)
        world.abort("", 2)
        return 2
    except Exception as e:
        # an out-of-memory error outside the library's own guards (reading a huge text, ...)
        from .backend import OOM_HINT, is_out_of_memory

        if debug or not is_out_of_memory(e):
            raise
        print(f"{PROG}: error: out of memory: {_one_line(e)}; {OOM_HINT}", file=sys.stderr)
        return 2


def _skip_final_collections() -> None:
    """Before the process exits after a read-only command: move every object into the garbage
    collector's permanent generation (``gc.freeze``), so the full collections the interpreter runs
    while it shuts down skip them. Those collections take about 20 ms after ``xrnn sample``
    (a tenth of its run on a 2-core machine) and would only find cycles that the operating system
    reclaims with the process anyway: reference counting still frees everything else as modules
    are torn down, output is flushed as it is written, and files are closed by their ``with`` blocks.
    Only for ``main()`` as the process entry (``xrnn``, ``python -m xrnn``), never when called in a
    longer-lived process."""
    import gc

    gc.freeze()


def _distributed_world():
    """The MPI communicator of a data-parallel job of more than one rank, if this process joined one."""
    mod = sys.modules.get("xrnn.distributed")
    world = getattr(mod, "_WORLD", None) if mod is not None else None
    return world if world is not None and world.size > 1 else None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
