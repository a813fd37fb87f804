"""The xrnn command: end to end in subprocesses, help, one-line errors, SIGINT + --resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import xrnn
from xrnn.checkpoint import read_container
from xrnn.cli import build_parser, main
from xrnn.data import default_corpus_path
from xrnn.train import Trainer  # noqa: F401  (registers the trainer checkpoint kind with xrnn.load)

from conftest import SLOW_CLI

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = open(default_corpus_path(), encoding="utf-8").read()
SMALL = ["--hidden-size", "16", "--num-layers", "1", "--batch-size", "4", "--seq-len", "16"]


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["PYTHONUNBUFFERED"] = "1"
    e.setdefault("OPENBLAS_NUM_THREADS", "1")
    return e


def run(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "xrnn", *map(str, args)], capture_output=True, text=True,
                          env=env(), cwd=cwd, timeout=timeout)


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny.txt"
    p.write_text(SHAKESPEARE[:4000], encoding="utf-8")
    return p


def one_line_error(err: str):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("xrnn: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------

def test_train_sample_info_plot_end_to_end(tmp_path, tiny):
    out = tmp_path / "run"
    r = run("train", tiny, *SMALL, "--steps", "30", "--out", out, "--eval-every", "10", "--sample-every", "15",
            "--sample-length", "40", "--log-every", "10", "--progress", "lines", "--seed", "7")
    assert r.returncode == 0, r.stderr
    assert "step 30/30 (100.0%)" in r.stdout and "tok/s" in r.stdout
    assert "step 20: val loss" in r.stdout and "bpc" in r.stdout
    assert "sample at step 15" in r.stdout
    assert (out / "last.ckpt").is_file() and (out / "best.ckpt").is_file()
    assert read_container(out / "last.ckpt").meta["step"] == 30

    s = run("sample", out / "last.ckpt", "--length", "80", "--seed", "3", "--prime", "First", "--top-k", "5")
    assert s.returncode == 0, s.stderr
    assert s.stdout.startswith("First") and len(s.stdout) == len("First") + 80 + 1
    model = xrnn.load(out / "last.ckpt").model
    assert s.stdout == model.sample(length=80, prime="First", seed=3, top_k=5) + "\n"  # same text as the API

    i = run("info", out / "last.ckpt")
    assert i.returncode == 0, i.stderr
    assert "1-layer LSTM, hidden size 16" in i.stdout
    assert f"{model.num_parameters():,}" in i.stdout
    assert "steps          30" in i.stdout and "best val loss" in i.stdout and "bpc at step" in i.stdout

    png = tmp_path / "loss.png"
    p = run("plot", out / "last.ckpt", "-o", png)
    assert p.returncode == 0, p.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sigint_then_resume_equals_an_uninterrupted_run(tmp_path, tiny):
    args = ["train", str(tiny), *SMALL, "--dropout", "0.2", "--num-layers", "2", "--steps", "60",
            "--eval-every", "20", "--sample-every", "0", "--save-every", "1000", "--log-every", "5",
            "--progress", "lines"]
    child = SLOW_CLI
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "-c", child, *args, "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env())
    seen = []
    deadline = time.time() + 60
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step 10/60"):
            proc.send_signal(signal.SIGINT)
            break
        assert time.time() < deadline, "".join(seen)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "SIGINT: stopping after the current step and saving" in err  # said at once, on stderr
    assert "interrupted by SIGINT at step" in err and "resume with: xrnn train" in err and "--resume" in err
    stopped = read_container(out / "last.ckpt").meta["step"]
    assert 10 <= stopped < 60

    assert main([*args, "--out", str(out), "--resume"]) == 0
    ref = tmp_path / "reference"
    assert main([*args, "--out", str(ref)]) == 0
    a, b = read_container(out / "last.ckpt"), read_container(ref / "last.ckpt")
    assert a.meta["step"] == b.meta["step"] == 60
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        np.testing.assert_array_equal(a.tensors[k], b.tensors[k], err_msg=k)  # weights, optimizer, history


def test_a_closed_output_pipe_saves_the_run_and_says_so_on_stderr(tmp_path, tiny):
    """``xrnn train ... | head``: the reader goes away; the run stops after the step with a
    checkpoint (as for SIGTERM) and the one-line note goes to stderr, not into the dead pipe."""
    out = tmp_path / "run"
    args = ["train", str(tiny), *SMALL, "--steps", "400", "--eval-every", "0", "--sample-every", "0",
            "--save-every", "1000", "--log-every", "1", "--progress", "lines", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "xrnn", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env())
    for _ in range(3):
        proc.stdout.readline()
    proc.stdout.close()  # what head does after its lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 128 + signal.SIGPIPE, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "output was closed" in lines[0] and "--resume" in lines[0], err
    stopped = read_container(out / "last.ckpt").meta["step"]
    assert 1 <= stopped < 400
    assert f"at step {stopped} of 400" in lines[0]


def test_resume_rejects_conflicting_options_and_missing_runs(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    base = ["train", str(tiny), *SMALL, "--steps", "3", "--progress", "off", "--out", str(out)]
    assert main(base) == 0
    capsys.readouterr()
    assert main([*base, "--steps", "5"]) == 2  # the directory holds a run: refuse to overwrite it
    assert "--resume" in one_line_error(capsys.readouterr().err)
    assert main([*base, "--steps", "5", "--resume", "--hidden-size", "32"]) == 2
    assert "--hidden-size 32 (the checkpoint has 16)" in one_line_error(capsys.readouterr().err)
    assert main([*base, "--steps", "5", "--resume", "--clip", "0"]) == 2
    assert "--clip 0 (the checkpoint has 5.0)" in one_line_error(capsys.readouterr().err)
    assert main([*base, "--steps", "5", "--resume"]) == 0  # the same options are fine
    assert read_container(out / "last.ckpt").meta["step"] == 5
    assert main(["train", "--resume", "--out", str(tmp_path / "none"), "--progress", "off"]) == 2
    assert "does not exist" in one_line_error(capsys.readouterr().err)
    assert main([*base, "--steps", "2", "--overwrite"]) == 0
    assert read_container(out / "last.ckpt").meta["step"] == 2


def test_sample_accepts_model_and_trainer_checkpoints(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    assert main(["train", str(tiny), *SMALL, "--steps", "4", "--progress", "off", "--out", str(out)]) == 0
    model = xrnn.load(out / "last.ckpt").model
    xrnn.save(model, tmp_path / "model.ckpt")
    capsys.readouterr()
    texts = []
    for ck in (out / "last.ckpt", tmp_path / "model.ckpt"):
        assert main(["sample", str(ck), "--length", "50", "--seed", "9", "--temperature", "0.7",
                     "--top-p", "0.9"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and len(texts[0]) == 51
    assert main(["sample", str(ck), "--length", "20", "--greedy"]) == 0
    g1 = capsys.readouterr().out
    assert main(["info", str(tmp_path / "model.ckpt"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["kind"] == "xrnn.CharLM" and d["parameters"] == model.num_parameters()
    assert main(["info", str(out / "last.ckpt"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["step"] == 4 and d["model"]["hidden_size"] == 16 and d["best_val_loss"] > 0
    assert len(g1) == 21


# ---------------------------------------------------------------------------
# help and errors
# ---------------------------------------------------------------------------

def _options(parser, command):
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices[command]
    return [a for a in sub._actions if a.option_strings and a.dest != "help"]


@pytest.mark.parametrize("command", ["train", "sample", "info", "plot"])
def test_every_option_has_help(command, capsys):
    parser = build_parser()
    opts = _options(parser, command)
    assert opts
    for a in opts:
        assert a.help and len(a.help) > 10, a.option_strings
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for a in opts:
        assert a.option_strings[-1] in text


def test_no_command_prints_usage_exits_2_and_version(capsys):
    assert main([]) == 2  # a bare command did nothing: as git and pip, the usage on stderr and status 2
    out, err = capsys.readouterr()
    assert out == "" and "usage: xrnn" in err and "train" in err
    with pytest.raises(SystemExit):
        main(["--version"])
    assert xrnn.__version__ in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["train", "--hidden-size", "-5"], "--hidden-size: expected a positive integer"),
    (["train", "--num-layers", "0"], "--num-layers"),
    (["train", "--batch-size", "abc"], "--batch-size"),
    (["train", "--dropout", "1"], "--dropout"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--optimizer", "adamax"], "invalid choice: 'adamax'"),
    (["train", "--model", "transformer"], "invalid choice"),
    (["train", "--bogus"], "unrecognized arguments: --bogus (see 'xrnn train --help')"),
    (["--bogus"], "unrecognized arguments: --bogus (see 'xrnn --help')"),
    (["train", "--min-lr", "0.1"], "--min-lr applies to --schedule cosine"),
    (["train", "/no/such/file.txt"], "does not exist"),
    (["train", "--device", "tpu"], "unknown device 'tpu'"),
    (["sample", "CKPT", "--temperature", "0"], "temperature > 0"),
    (["sample", "CKPT", "--top-p", "1.5"], "--top-p: expected a probability in (0, 1]"),
    (["sample", "CKPT", "--top-k", "0"], "--top-k"),
    (["sample", "/no/such.ckpt"], "does not exist"),
    (["info", "/no/such.ckpt"], "does not exist"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_values_give_one_line_and_exit_2(argv, needle, capsys, tmp_path):
    argv = [str(tmp_path / "x.ckpt") if a == "CKPT" else a for a in argv]
    assert main(argv) == 2
    assert needle in one_line_error(capsys.readouterr().err)


def test_empty_and_binary_files_and_damaged_checkpoints(tmp_path, tiny, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert main(["train", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "is empty" in one_line_error(capsys.readouterr().err)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"abc\x00def" * 100)
    assert main(["train", str(binary), "--out", str(tmp_path / "o")]) == 2
    assert "binary" in one_line_error(capsys.readouterr().err)
    short = tmp_path / "short.txt"
    short.write_text("hello world\n" * 3)
    assert main(["train", str(short), "--out", str(tmp_path / "o")]) == 2
    assert "too few" in one_line_error(capsys.readouterr().err)

    out = tmp_path / "run"
    assert main(["train", str(tiny), *SMALL, "--steps", "2", "--progress", "off", "--out", str(out)]) == 0
    data = (out / "last.ckpt").read_bytes()
    (tmp_path / "trunc.ckpt").write_bytes(data[: len(data) // 3])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    (tmp_path / "flip.ckpt").write_bytes(bytes(flipped))
    capsys.readouterr()
    for name in ("trunc.ckpt", "flip.ckpt"):
        for cmd in ("sample", "info", "plot"):
            assert main([cmd, str(tmp_path / name)]) == 2
            line = one_line_error(capsys.readouterr().err)
            assert "truncated" in line or "damaged" in line or "checksum" in line
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    assert main(["sample", str(tmp_path / "text.ckpt")]) == 2
    assert "not an xrnn checkpoint" in one_line_error(capsys.readouterr().err)


def test_plot_without_matplotlib_names_the_extra(tmp_path, tiny, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["train", str(tiny), *SMALL, "--steps", "2", "--progress", "off", "--out", str(out)]) == 0
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    capsys.readouterr()
    assert main(["plot", str(out / "last.ckpt"), "-o", str(tmp_path / "l.png")]) == 2
    assert 'pip install "xrnn-array[plot]"' in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "l.png").exists()


def test_plot_needs_a_training_run(tmp_path, tiny, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    assert main(["train", str(tiny), *SMALL, "--steps", "2", "--progress", "off", "--out", str(out)]) == 0
    xrnn.save(xrnn.load(out / "last.ckpt").model, tmp_path / "m.ckpt")
    capsys.readouterr()
    assert main(["plot", str(tmp_path / "m.ckpt")]) == 2
    assert "loss history" in one_line_error(capsys.readouterr().err)
    assert main(["plot", str(out / "last.ckpt"), "-o", str(tmp_path / "l.unknownext")]) == 2
    one_line_error(capsys.readouterr().err)


def test_debug_shows_the_traceback(tmp_path):
    r = run("train", tmp_path / "missing.txt", "--debug")
    assert r.returncode != 0
    assert "Traceback" in r.stderr and "DataError" in r.stderr
    r = run("train", tmp_path / "missing.txt")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    one_line_error(r.stderr)


def test_no_text_file_trains_on_the_shipped_corpus_and_resumes_on_it(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--hidden-size", "8", "--num-layers", "1", "--batch-size", "2", "--seq-len", "8",
            "--eval-batches", "1", "--sample-length", "10", "--warmup", "2",
            "--progress", "lines", "--out", str(out)]
    assert main([*base, "--steps", "3"]) == 0
    text = capsys.readouterr().out
    assert "on the shipped tiny Shakespeare (1,115,394 chars, vocabulary 65)" in text
    assert main([*base, "--steps", "5", "--resume"]) == 0
    assert "steps 3->5" in capsys.readouterr().out
    assert main(["info", str(out / "last.ckpt")]) == 0
    info = capsys.readouterr().out
    assert "the shipped tiny Shakespeare: 1,115,394 chars" in info
    assert "2 warm-up steps, then constant 0.004" in info
    assert "steps          5 (80 tokens" in info
    # a cosine schedule ends at --steps: another target is another schedule, which a resume refuses
    cos = [*base[:-1], str(tmp_path / "cos"), "--schedule", "cosine"]
    assert main([*cos, "--steps", "3"]) == 0
    capsys.readouterr()
    assert main([*cos, "--steps", "5", "--resume"]) == 2
    assert "'total_steps': 3" in one_line_error(capsys.readouterr().err)


def test_char_rnn_step_decay_schedule_counts_epochs(tmp_path, tiny, capsys):
    """--schedule step: x decay-rate at the end of every epoch from --decay-after on (char-rnn)."""
    from xrnn.data import StreamBatcher, split
    from xrnn.optim import Schedule

    out = tmp_path / "run"
    # tiny: 4000 chars, 5% validation -> 3800 train; 4 streams x 16 steps -> 59 windows per epoch
    train_ids, _ = split(np.zeros(4000, np.int64), 0.05)
    spe = StreamBatcher(train_ids, 4, 16).windows_per_epoch
    assert spe == (3800 - 1) // 4 // 16
    steps = 2 * spe + 3

    def args(n, rate="0.5"):
        return ["train", str(tiny), *SMALL, "--steps", str(n), "--progress", "off", "--out", str(out),
                "--eval-every", "0", "--sample-every", "0", "--lr", "0.01", "--schedule", "step",
                "--decay-rate", rate, "--decay-after", "1"]

    assert main(args(steps)) == 0
    sched = Schedule.from_config(read_container(out / "last.ckpt").meta["trainer"]["schedule"])
    # hand count: epoch 1 ends after step spe, epoch 2 after 2*spe; each end halves the rate
    assert sched.lr_at(spe - 1) == 0.01
    assert sched.lr_at(spe) == 0.005
    assert sched.lr_at(2 * spe) == 0.0025
    t = xrnn.load(out / "last.ckpt")
    assert t.optimizer.lr == pytest.approx(0.0025)
    capsys.readouterr()
    # the same options resume; a different rate is a clear conflict
    assert main([*args(steps + 1), "--resume"]) == 0
    assert main([*args(steps + 2, rate="0.9"), "--resume"]) == 2
    assert "different schedule" in one_line_error(capsys.readouterr().err)
    assert main(["train", str(tiny), "--decay-rate", "0.9", "--out", str(tmp_path / "x")]) == 2
    assert "apply to --schedule step" in one_line_error(capsys.readouterr().err)
    for bad in ("2", "0", "-0.5"):  # a char-rnn decay shrinks the rate: (0, 1]
        assert main([*args(steps), "--decay-rate", bad]) == 2
        assert "expected a decay factor in (0, 1]" in one_line_error(capsys.readouterr().err)


def test_info_says_validation_is_off_rather_than_not_yet_done(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    assert main(["train", str(tiny), *SMALL, "--steps", "3", "--val-fraction", "0", "--progress", "off",
                 "--sample-every", "0", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["info", str(out / "last.ckpt")]) == 0
    text = capsys.readouterr().out
    assert "validation off: --val-fraction 0" in text and "not validated yet" not in text


# ---------------------------------------------------------------------------
# contradictions refused, flags suggested, messages in flags, --device auto
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["train", "--hidden", "64"], "unrecognized arguments: --hidden; did you mean --hidden-size?"),
    (["train", "--num-layer=2"], "unrecognized arguments: --num-layer=2; did you mean --num-layers?"),
    (["train", "--hiden-size", "3"], "did you mean --hidden-size?"),
    (["sample", "CKPT", "--temprature", "0.5"], "did you mean --temperature?"),
    (["train", "--zzzzzz"], "unrecognized arguments: --zzzzzz (see 'xrnn train --help')"),
    (["trian"], "invalid choice: 'trian' (choose from 'train', 'sample', 'info', 'plot'); did you mean 'train'?"),
    (["sample", "CKPT", "--greedy", "--temperature", "0.5"],
     "--greedy always takes the most likely character, so --temperature would be ignored"),
    (["sample", "CKPT", "--greedy", "--top-k", "3", "--top-p", "0.9"], "so --top-k and --top-p would be ignored"),
    (["train", "--steps", "0", "--out", "OUT"], "--steps 0 would start a run that trains nothing"),
    (["train", "--out", "FILE"], "--out 'FILE' is a file"),
])
def test_contradictions_and_near_misses_give_one_line_and_exit_2(argv, needle, capsys, tmp_path):
    (tmp_path / "FILE").write_text("not a folder")
    subst = {"CKPT": str(tmp_path / "x.ckpt"), "OUT": str(tmp_path / "o"), "FILE": str(tmp_path / "FILE")}
    argv = [subst.get(a, a) for a in argv]
    needle = needle.replace("'FILE'", repr(subst["FILE"]))
    assert main(argv) == 2
    assert needle in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()  # nothing was started


def test_library_messages_speak_in_flags(tmp_path, tiny, capsys):
    """train() says resume=True / out_dir / hidden_size=...; the command line says --resume / --out / ..."""
    out = tmp_path / "run"
    base = ["train", str(tiny), *SMALL, "--steps", "2", "--progress", "off", "--sample-every", "0", "--out", str(out)]
    assert main(base) == 0
    capsys.readouterr()
    assert main(base) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "continue it with --resume, choose another --out, or pass --overwrite" in line, line
    assert main([*base, "--resume", "--hidden-size", "8"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "--hidden-size 8 (the checkpoint has 16)" in line and "in another --out" in line, line
    for python_name in ("resume=True", "out_dir", "overwrite=True", "hidden_size"):
        assert python_name not in line
    big = ["train", str(tiny), "--batch-size", "400", "--seq-len", "16", "--out", str(tmp_path / "o2")]
    assert main(big) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "too few for --batch-size 400 streams of --seq-len 16" in line and "lower --batch-size or --seq-len," in line


def test_device_auto_says_what_it_picked(tmp_path, tiny, capsys, monkeypatch):
    import xrnn.backend as backend

    monkeypatch.setattr(backend, "auto_device", lambda: (backend.resolve_device("cpu"), "no usable GPU (test); "
                                                                                          "using the CPU"))
    out = tmp_path / "run"
    assert main(["train", str(tiny), *SMALL, "--steps", "2", "--progress", "off", "--sample-every", "0",
                 "--out", str(out), "--device", "auto"]) == 0
    o, err = capsys.readouterr()
    assert "xrnn: --device auto: no usable GPU (test); using the CPU" in err and (out / "last.ckpt").exists()
    assert main(["sample", str(out / "last.ckpt"), "--length", "5", "--seed", "0", "--device", "auto"]) == 0
    o, err = capsys.readouterr()
    assert err.strip() == "xrnn: --device auto: no usable GPU (test); using the CPU" and len(o.strip()) >= 5


@pytest.mark.parametrize("command, message, expected", [
    ("train", "resume=True needs out_dir (the directory holding last.ckpt)",
     "--resume needs --out (the directory holding last.ckpt)"),
    ("train", "lower batch_size or seq_len (--batch-size, --seq-len), or give more text; one window needs "
              "batch_size*seq_len+1 = 65 tokens", "lower --batch-size or --seq-len, or give more text; one window "
                                                 "needs batch_size*seq_len+1 = 65 tokens"),
    ("train", "cannot resume with different settings: model='gru' (the checkpoint has 'lstm'); clip=None "
              "(the checkpoint has 5.0)",
     "cannot resume with different settings: --model gru (the checkpoint has 'lstm'); --clip 0 "
     "(the checkpoint has 5.0)"),
    ("train", "schedule={'name': 'cosine'} differs", "schedule={'name': 'cosine'} differs"),
    ("sample", "load it on another device (device='cpu', --device cpu), or free memory",
     "load it on another device (--device cpu), or free memory"),
    ("sample", "top_k must be an integer >= 1; for the most likely token use greedy=True",
     "--top-k must be an integer >= 1; for the most likely token use --greedy"),
])
def test_library_messages_are_translated_into_the_commands_flags(command, message, expected):
    from xrnn.cli import _command_parser, _in_flags

    assert _in_flags(message, _command_parser(build_parser(), command)) == expected
