"""The example scripts in ``examples/`` run, with tiny sizes, and reach real outcomes.

Each example is imported from its file and its ``main(argv)`` called with
small settings; the assertions are on what the example claims (numbers that
match a hand computation, a loss that falls, a forecast that beats the naive
one, a perplexity below the vocabulary size), not merely that it ran.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

import xrnn

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@functools.cache
def example(name: str):
    """Import ``examples/<name>.py`` as a module (the file names start with digits)."""
    spec = importlib.util.spec_from_file_location(f"xrnn_example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_example_has_a_main_a_docstring_and_device_and_seed_options():
    scripts = sorted(p.stem for p in EXAMPLES.glob("[0-9][0-9]_*.py"))
    assert len(scripts) >= 4
    readme = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    for name in scripts:
        mod = example(name)
        assert callable(mod.main), name
        assert mod.__doc__ and "python examples/" + name + ".py" in mod.__doc__, name
        args = mod.parse_args([])
        assert args.seed is not None, name
        # every example takes --device (example 6 as another name for --train-device: where it trains)
        dev_opt = "device" if hasattr(args, "device") else "train_device"
        assert getattr(args, dev_opt) in ("cpu", "cuda"), name
        assert getattr(mod.parse_args(["--device", "torch:cpu"]), dev_opt) == "torch:cpu", name
        if dev_opt == "train_device":
            assert mod.parse_args(["--train-device", "torch:cpu"]).train_device == "torch:cpu", name
        assert f"{name}.py" in readme, f"examples/README.md does not list {name}.py"


# ---------------------------------------------------------------------------
# 01: cell steps
# ---------------------------------------------------------------------------

def test_cell_steps_print_the_notebook_numbers(capsys):
    out = example("01_cell_steps").main([])
    text = capsys.readouterr().out
    # the seed example, computed by hand: tanh(x Wx + h Wh + b)
    assert "numpy -0.109558  0.049958  0.124353" in text
    assert "xrnn  -0.109558  0.049958  0.124353" in text
    np.testing.assert_allclose(out["rnn"]["h"], [-0.109558, 0.049958, 0.124353], atol=5e-7)
    assert out["rnn"]["max_diff"] < 1e-12
    assert out["lstm"]["max_diff"] < 1e-12
    for step in ("rnn", "lstm"):
        assert set(out[step]["grads"]) == set(out[step]["grads_numpy"])


def test_cell_steps_on_a_strict_device_in_float32(capsys):
    out = example("01_cell_steps").main(["--device", "array_api_strict:device1", "--dtype", "float32"])
    assert "array_api_strict:device1" in capsys.readouterr().out
    assert out["rnn"]["max_diff"] < 1e-6 and out["lstm"]["max_diff"] < 1e-6


def _numeric_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp_, xm = x.copy(), x.copy()
        xp_[i] += eps
        xm[i] -= eps
        g[i] = (f(xp_) - f(xm)) / (2 * eps)
    return g


def test_cell_steps_notebook_backward_matches_finite_differences():
    """The NumPy column the example prints is itself right (not only equal to xrnn)."""
    m = example("01_cell_steps")
    # RNN: L = dh . h
    Wx, Wh, b, x, h0, dh = m.RNN_WX, m.RNN_WH, m.RNN_B, m.RNN_X, m.RNN_H_PREV, m.RNN_DH
    _, cache = m.notebook_rnn_step(x, h0, Wx, Wh, b)
    g = m.notebook_rnn_step_backward(dh, cache, Wx, Wh)
    L = lambda x_, h_, Wx_, Wh_, b_: float(dh @ m.notebook_rnn_step(x_, h_, Wx_, Wh_, b_)[0])  # noqa: E731
    np.testing.assert_allclose(g["dx"], _numeric_grad(lambda v: L(v, h0, Wx, Wh, b), x), atol=1e-8)
    np.testing.assert_allclose(g["dh_prev"], _numeric_grad(lambda v: L(x, v, Wx, Wh, b), h0), atol=1e-8)
    np.testing.assert_allclose(g["dWx"], _numeric_grad(lambda v: L(x, h0, v, Wh, b), Wx), atol=1e-8)
    np.testing.assert_allclose(g["dWh"], _numeric_grad(lambda v: L(x, h0, Wx, v, b), Wh), atol=1e-8)
    np.testing.assert_allclose(g["db"], _numeric_grad(lambda v: L(x, h0, Wx, Wh, v), b), atol=1e-8)

    # LSTM: L = dh . h + dc . c
    W, B = m.LSTM_W, m.LSTM_B
    x, h0, c0, dh, dc = m.LSTM_X, m.LSTM_H_PREV, m.LSTM_C_PREV, m.LSTM_DH, m.LSTM_DC

    def loss(x_=x, h_=h0, c_=c0, W_=W, B_=B):
        h, c, _ = m.notebook_lstm_step(x_, h_, c_, W_, B_)
        return float(dh @ h + dc @ c)

    _, _, cache = m.notebook_lstm_step(x, h0, c0, W, B)
    g = m.notebook_lstm_step_backward(dh, dc, cache, W)
    np.testing.assert_allclose(g["dx"], _numeric_grad(lambda v: loss(x_=v), x), atol=1e-8)
    np.testing.assert_allclose(g["dh_prev"], _numeric_grad(lambda v: loss(h_=v), h0), atol=1e-8)
    np.testing.assert_allclose(g["dc_prev"], _numeric_grad(lambda v: loss(c_=v), c0), atol=1e-8)
    for k in m.GATES:
        np.testing.assert_allclose(g["dW" + k], _numeric_grad(lambda v: loss(W_={**W, k: v}), W[k]), atol=1e-8)
        np.testing.assert_allclose(g["db" + k], _numeric_grad(lambda v: loss(B_={**B, k: v}), B[k]), atol=1e-8)


# ---------------------------------------------------------------------------
# 02: min-char-rnn
# ---------------------------------------------------------------------------

def test_min_char_rnn_learns_at_batch_1_and_batched(capsys):
    out = example("02_min_char_rnn").main([
        "--steps", "200", "--hidden-size", "16", "--batch-size", "4", "--batched-steps", "60",
        "--print-every", "100", "--sample-length", "20",
    ])
    text = capsys.readouterr().out
    V = out["vocab_size"]
    assert V == 65  # tiny Shakespeare's characters
    assert out["initial_loss"] == pytest.approx(25 * math.log(V))
    for run, n in (("single", 200), ("batched", 60)):
        losses = out[run]["losses"]
        assert losses.shape == (n,) and np.all(np.isfinite(losses))
        # per-window loss summed over 25 characters: well below a uniform guess after a few steps
        assert losses[-20:].mean() < 0.85 * out["initial_loss"], run
        assert out[run]["chars_per_s"] > 0
    assert out["single"]["losses"][-50:].mean() < out["single"]["losses"][:10].mean()
    assert text.count("----") >= 6  # samples were printed (two per run of 200, one for the batched run)
    assert "throughput: batch 1" in text


def test_min_char_rnn_defaults_are_karpathys(monkeypatch, capsys):
    """min-char-rnn.py's settings: hidden_size 100, seq_length 25, np.clip(-5, 5), learning_rate 1e-1,
    N(0, 0.01^2) init, 200-character samples, and the first run at batch 1 (one stream of text)."""
    m = example("02_min_char_rnn")
    a = m.parse_args([])
    assert (a.hidden_size, a.seq_len, a.clip, a.lr) == (100, 25, 5.0, 0.1)
    assert a.init == "minchar" and a.sample_length == 200
    runs = []

    def record(corpus, args, batch_size, steps, label):  # stands in for the training loop
        runs.append((batch_size, steps, args.hidden_size, args.seq_len, args.clip))
        return {"chars_per_s": 1.0, "recent_nats_per_char": 1.0, "steps": steps, "batch_size": batch_size}

    monkeypatch.setattr(m, "train", record)
    out = m.main([])
    capsys.readouterr()
    assert runs[0] == (1, a.steps, 100, 25, 5.0)  # the min-char-rnn run: batch 1
    assert out["initial_loss"] == pytest.approx(25 * math.log(out["vocab_size"]))


def test_min_char_rnn_update_rule_is_karpathys():
    """MinCharAdagrad does ``mem += g*g; p -= lr * g / sqrt(mem + 1e-8)``, twice in a row, on a strict device."""
    m = example("02_min_char_rnn")
    dev = "array_api_strict:device1"
    model = xrnn.CharLM(5, 3, num_layers=1, cell="rnn", device=dev, seed=0)
    opt = m.MinCharAdagrad(model, lr=0.1)
    p0 = {k: xrnn.to_numpy(v).astype(np.float64) for k, v in model.parameters().items()}
    rng = np.random.default_rng(1)
    mem = {k: np.zeros_like(v) for k, v in p0.items()}
    for _ in range(2):
        gs = {k: rng.standard_normal(v.shape) * (1e-5 if "bias" in k else 1.0) for k, v in p0.items()}
        model.zero_grad()
        for k, g in model.grads.items():
            g += model.device.asarray(gs[k], dtype="float32")
        opt.step()
        for k in p0:
            mem[k] += gs[k] ** 2
            p0[k] -= 0.1 * gs[k] / np.sqrt(mem[k] + 1e-8)
    for k, v in model.parameters().items():
        np.testing.assert_allclose(xrnn.to_numpy(v), p0[k], rtol=1e-5, atol=1e-6)


def test_min_char_rnn_init_is_small_gaussian_and_zero_bias():
    m = example("02_min_char_rnn")
    model = xrnn.CharLM(65, 100, num_layers=1, cell="rnn", seed=0)
    m.minchar_init(model, np.random.default_rng(0))
    for k, v in model.state_dict().items():
        v = xrnn.to_numpy(v)
        if "bias" in k:
            assert not v.any(), k
        else:
            assert 0.007 < v.std() < 0.013, k


# ---------------------------------------------------------------------------
# 03: LSTM regression
# ---------------------------------------------------------------------------

def test_lstm_regression_beats_the_naive_forecast_and_saves_a_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "forecast.png"
    out = example("03_lstm_regression").main([
        "--series", "sine", "--epochs", "40", "--units", "16", "--length", "300", "--out", str(png),
    ])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = out["sine"]
    assert set(r["mse"]) == {"vanilla", "stacked", "bidirectional"}
    for kind, mse in r["mse"].items():
        assert np.isfinite(mse) and mse < 0.8 * r["naive_mse"], kind
        assert r["pred"][kind].shape == r["truth"].shape
    assert "plot saved to" in capsys.readouterr().out


def test_lstm_regression_windows_and_units():
    m = example("03_lstm_regression")
    X, y = m.split_sequence(np.arange(10.0), 3)
    np.testing.assert_array_equal(X[0], [0, 1, 2])
    np.testing.assert_array_equal(X[-1], [6, 7, 8])
    np.testing.assert_array_equal(y, np.arange(3.0, 10.0))
    # relative windows: scaling and the last value are undone exactly
    data = m.make_dataset("seasonal", 100, 6, np.random.default_rng(0))
    rows = slice(data["n_train"], len(data["y"]))
    back = m.to_series_units(data, data["y"][rows].astype(np.float64), rows)
    np.testing.assert_allclose(back, data["truth"][rows], atol=1e-4)


def test_lstm_regression_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib")
        return real_import(name, *a, **k)

    m = example("03_lstm_regression")
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(SystemExit, match="xrnn-array\\[plot\\]"):
        m.plot({}, str(tmp_path / "x.png"))


# ---------------------------------------------------------------------------
# 05: word-level RNNLM
# ---------------------------------------------------------------------------

def test_word_rnnlm_perplexity_and_sentences(capsys):
    out = example("05_word_rnnlm").main([
        "--max-tokens", "20000", "--vocab", "300", "--hidden-size", "32", "--embedding-dim", "16", "--bptt", "10",
        "--batch-size", "8", "--steps", "150", "--eval-every", "150", "--sentences", "3",
    ])
    text = capsys.readouterr().out
    V = out["vocab_size"]
    assert V == 301  # 300 words + <unk>
    ppl = out["val_perplexity"]
    assert np.isfinite(ppl) and 1 < ppl < V / 3
    before = float(text.split("before training: validation perplexity ")[1].split()[0])
    assert before > V / 2  # an untrained model is close to uniform
    assert len(out["sentences"]) == 3
    for s in out["sentences"]:
        assert s.strip() and "<unk>" not in s


def test_word_rnnlm_perplexity_is_exp_of_the_mean_cross_entropy():
    """``perplexity`` against a hand loop over every window with a carried state."""
    m = example("05_word_rnnlm")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 7, size=81)
    model = xrnn.CharLM(7, 5, num_layers=1, cell="gru", embedding_dim=3, seed=0, dtype="float64")
    got = m.perplexity(model, ids, batch_size=2, seq_len=8)
    # 2 streams of 40 steps, 5 windows of 8
    x = ids[:80].reshape(2, 40)
    y = ids[1:81].reshape(2, 40)
    with xrnn.no_grad():
        logits, _ = model(x.astype(np.int64), None)  # one pass over the whole streams = carried windows
    logits = xrnn.to_numpy(logits)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, y[..., None], -1).mean()
    assert got == pytest.approx(math.exp(nll), rel=1e-10)


# ---------------------------------------------------------------------------
# 04: character LM with the command line and from Python
# ---------------------------------------------------------------------------

TINY_CHAR_LM = ["--hidden-size", "32", "--num-layers", "1", "--batch-size", "8", "--seq-len", "20", "--length", "60"]


def test_char_lm_command_line_and_python_give_the_same_run(tmp_path, capsys):
    out = example("04_char_lm").main(
        TINY_CHAR_LM + ["--steps", "30", "--eval-every", "30", "--eval-batches", "4", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert "$ xrnn train " in text and "$ xrnn sample " in text and "$ xrnn info " in text
    cli, py = out["cli"], out["python"]
    for part in ("cli", "python"):
        assert (tmp_path / part / "best.ckpt").is_file() and (tmp_path / part / "last.ckpt").is_file()
    # one loop behind both interfaces: same seed and options -> the same run, bit for bit
    assert np.isfinite(cli["best_val_loss"]) and cli["best_val_loss"] < math.log(65)
    assert cli["best_val_loss"] == py["best_val_loss"]
    assert py["sample"].startswith("ROMEO:") and len(py["sample"]) == len("ROMEO:") + 60
    assert cli["sample"] == py["sample"]
    assert "command line vs Python" in text and "(identical)" in text
    # the checkpoints stay in --out, and the printed command samples from them
    best = str(tmp_path / "cli" / "best.ckpt")
    assert f"the checkpoints are kept:\n  {tmp_path / 'cli' / 'last.ckpt'} and {best}" in text
    assert f"sample from one with:\n  xrnn sample {best} --prime ROMEO: --temperature 0.8 --length 500" in text
    _runs_printed_sample_command(out["sample_command"], capsys)


def _runs_printed_sample_command(command, capsys):
    from xrnn.cli import main as xrnn_main

    assert xrnn_main([*command[:-1], "20", "--seed", "0"]) == 0
    assert len(capsys.readouterr().out.strip()) >= 20


# ---------------------------------------------------------------------------
# 06: train on one device, sample on another from the checkpoint
# ---------------------------------------------------------------------------

TINY_GPU_CPU = ["--hidden-size", "32", "--num-layers", "1", "--batch-size", "8", "--seq-len", "20", "--steps", "20",
                "--length", "60", "--eval-batches", "4"]


def test_train_on_one_device_sample_on_another_from_the_checkpoint(tmp_path, capsys):
    from xrnn.train import load_model

    out = example("06_gpu_train_cpu_sample").main(
        TINY_GPU_CPU + ["--device", "array_api_strict:device1", "--sample-device", "cpu", "--out", str(tmp_path)])
    assert out["train_device"] == "array_api_strict:device1" and out["sample_device"] == "cpu"
    text = out["sample"]
    assert text.startswith("JULIET:") and len(text) == len("JULIET:") + 60
    assert set(text) <= set(out["model"].vocab.tokens)
    # the loaded copy computes what the trained model computes
    assert out["max_logit_diff"] < 1e-5
    # and the file on disk decodes to the same text again, on the CPU
    again = load_model(tmp_path / "last.ckpt", device="cpu")
    assert xrnn.sample(again, length=60, prime="JULIET:", temperature=0.8, seed=1337) == text
    printed = capsys.readouterr().out
    assert "array_api_strict:device1 vs cpu" in printed
    path = tmp_path / "last.ckpt"
    assert f"the checkpoints are kept: {path} and {tmp_path / 'best.ckpt'}" in printed
    assert (tmp_path / "best.ckpt").is_file()
    assert f"xrnn sample {path} --device cpu --prime JULIET: --temperature 0.8 --length 500" in printed
    _runs_printed_sample_command(out["sample_command"], capsys)


@pytest.mark.skipif(any(d.startswith("cuda") for d in xrnn.available_devices()), reason="a GPU is available")
def test_gpu_example_without_a_gpu_explains_and_falls_back(capsys, tmp_path):
    m = example("06_gpu_train_cpu_sample")
    out = m.main(TINY_GPU_CPU + ["--steps", "2", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "note: cannot train on 'cuda'" in printed and "CuPy" in printed
    assert out["train_device"] == "cpu" and out["sample"].startswith("JULIET:")
    with pytest.raises(SystemExit, match="cannot train on 'cuda'.*CuPy"):
        m.main(TINY_GPU_CPU + ["--no-fallback"])
