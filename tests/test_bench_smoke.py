"""The benchmark keeps working: a --smoke run end to end, and its bookkeeping by hand.

No timing is asserted (the suite must not depend on the machine's speed);
the smoke run proves the script, its JSON record and its Markdown table still
work with the current library, and the FLOP and memory formulas are checked
against numbers worked out by hand.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "bench.py")


@pytest.fixture(scope="module")
def bench():
    """Import benchmarks/bench.py as a module without letting it change this process's environment."""
    saved = dict(os.environ)
    try:
        spec = importlib.util.spec_from_file_location("xrnn_bench", BENCH)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["xrnn_bench"] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return mod


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("XRNN_PORTABLE", None)
    proc = subprocess.run(
        [sys.executable, BENCH, "--smoke", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(os.listdir(out))
    jsons = [f for f in files if f.endswith(".json")]
    assert len(jsons) == 1 and "latest.md" in files, files
    with open(out / jsons[0]) as f:
        rec = json.load(f)
    with open(out / "latest.md") as f:
        md = f.read()
    return rec, md, proc.stdout


def test_smoke_run_writes_a_complete_record(smoke_run, bench):
    rec, md, log = smoke_run
    assert rec["smoke"] is True and rec["threads"] == 1
    m = rec["machine"]
    for key in ("cpu_model", "logical_cpus", "python", "numpy", "numpy_blas", "xrnn", "array_api_compat", "gpu"):
        assert key in m, key
    # the thread count reached NumPy's BLAS (read back from OpenBLAS where it is the BLAS)
    assert m["numpy_blas_threads_read_back"] in (None, 1)
    assert rec["matmul_peak_gflops"]["peak"] > 0
    has_torch = importlib.util.find_spec("torch") is not None
    libs = {"xrnn", "xrnn-portable"} | ({"torch"} if has_torch else set())
    seen = {(r["lib"], r["cell"], r["shape"], r["phase"]) for r in rec["results"]}
    for s in bench.SMOKE_SHAPES:
        for cell in bench.CELLS:
            for phase in ("forward", "train"):
                assert ("xrnn", cell, s.name, phase) in seen
                if has_torch:
                    assert ("torch", cell, s.name, phase) in seen
            for lib in libs:
                assert (lib, cell, s.name, "train") in seen, (lib, cell, s.name)
    for r in rec["results"]:
        assert r["seconds_median"] > 0 and r["tokens_per_s"] > 0
        assert r["gflops"] == pytest.approx(r["gflop"] / r["seconds_median"])
        assert r["tokens_per_s"] == pytest.approx(r["T"] * r["B"] / r["seconds_median"])
        if has_torch:
            assert r["speed_ratio_vs_torch"] > 0
        if r["lib"] == "xrnn" and r["phase"] == "train":
            assert r["peak_bytes_tracemalloc"] > 0 and r["min_step_bytes"] > 0
    assert [row["T"] for row in rec["scaling"]] == list(bench.SMOKE_SCALING_T)
    if rec["machine"]["gpu"] is None:
        assert rec["gpu"]["status"] == "not yet measured"
        assert "not yet measured" in md
    assert "| LSTM |" in md and "Targets" in md
    assert "wrote" in log
    # the CPU's vector extension, the BLAS kernels and torch's backend are recorded with every run
    assert m["simd"] and "OPENBLAS_CORETYPE" in m and "CPU: SIMD" in md
    # sampling rows (xrnn.sample vs torch's step loop) and the start-up row
    assert [(r["H"], r["B"]) for r in rec["sampling"]] == list(bench.SMOKE_SAMPLE_CASES)
    for r in rec["sampling"]:
        assert r["xrnn_seconds"] > 0
        assert r["xrnn_chars_per_s"] == pytest.approx(r["length"] * r["B"] / r["xrnn_seconds"])
        if has_torch:
            assert r["speed_ratio_vs_torch"] == pytest.approx(r["torch_seconds"] / r["xrnn_seconds"])
    su = rec["startup"]
    assert su["xrnn_sample_process_seconds"] > 0 and su["import_numpy_process_seconds"] > 0
    assert su["ratio_to_numpy_plus_sampling"] == pytest.approx(
        su["xrnn_sample_process_seconds"] / (su["import_numpy_process_seconds"] + su["sampling_in_process_seconds"]))
    assert "## Sampling" in md and "## Start-up" in md
    assert any(t["target"].startswith("start-up") for t in rec["targets"])


def test_targets_mode_selects_the_issue_rows(bench):
    args = bench.parse_args(["--targets"])
    assert args.shapes == ["seed", "medium", "large"] and args.no_scaling and args.no_memory
    assert not args.portable and args.wait_quiet == 60.0 and args.wait_budget == 240.0
    assert not args.no_sampling and not args.no_startup


def test_only_startup_selects_the_one_row(bench):
    args = bench.parse_args(["--only", "startup"])
    assert args.only == "startup" and not args.no_startup
    assert bench.parse_args([]).only is None
    with pytest.raises(SystemExit):  # argparse refuses an unknown row and a contradiction
        bench.parse_args(["--only", "training"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "startup", "--no-startup"])


def test_only_startup_run_measures_just_the_startup_row(tmp_path):
    """``--only startup``: the start-up row and its target, and nothing else measured (no matmul peak,
    training, sampling or GPU rows), written where --out says."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, BENCH, "--smoke", "--only", "startup", "--threads", "1", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jsons = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    assert len(jsons) == 1 and (tmp_path / "latest-startup.md").is_file()
    with open(tmp_path / jsons[0]) as f:
        rec = json.load(f)
    assert rec["results"] == [] and rec["sampling"] == [] and rec["scaling"] == [] and rec["memory"] == []
    assert rec["matmul_peak_gflops"] is None and rec["gpu"] is None
    su = rec["startup"]
    assert su["xrnn_sample_process_seconds"] > 0 and su["import_numpy_process_seconds"] > 0
    assert [t["target"].split(" of ")[0] for t in rec["targets"]] == ["start-up"]
    md = (tmp_path / "latest-startup.md").read_text()
    assert "## Start-up" in md and "## Training step" not in md and "## GPU" not in md
    assert "matmul peak" not in proc.stdout


def test_targets_use_the_issue_thresholds(bench):
    rows = [{"lib": "xrnn", "cell": "LSTM", "shape": "medium", "phase": "train", "speed_ratio_vs_torch": 1.1},
            {"lib": "xrnn", "cell": "LSTM", "shape": "seed", "phase": "train", "speed_ratio_vs_torch": 1.0},
            {"lib": "xrnn", "cell": "GRU", "shape": "large", "phase": "forward", "speed_ratio_vs_torch": 0.99}]
    sampling = [{"H": 128, "B": 1, "length": 2000, "speed_ratio_vs_torch": 1.5}]
    startup = {"command": "xrnn sample CKPT --length 200", "ratio_to_numpy_plus_sampling": 1.6}
    got = {t["target"]: t["met"] for t in bench.targets(rows, [], [], sampling, startup)}
    assert got["LSTM medium training step xrnn/torch >= 1.2"] is False
    assert got["LSTM seed (batch 1) training step xrnn/torch >= 1.0"] is True
    assert got["GRU large forward xrnn/torch >= 1.0"] is False
    assert got["sampling 2000 chars, 2-layer LSTM H=128 B=1, xrnn/torch >= 1.0"] is True
    assert got["start-up of `xrnn sample CKPT --length 200` / (import numpy + sampling) <= 1.5"] is False


def test_gpu_run_without_a_gpu_says_not_yet_measured(tmp_path, bench):
    if bench.gpu_available()[0]:
        pytest.skip("a GPU is present: the GPU run would measure")
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, BENCH, "--smoke", "--device", "cuda", "--threads", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "latest-gpu.md") as f:
        md = f.read()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "not yet measured" in line]
    assert len(rows) == len(bench.SMOKE_SHAPES) * len(bench.CELLS)
    assert "Training step" not in md  # no CPU tables in a GPU record


def test_flop_counts_by_hand(bench):
    S = bench.Shape
    medium = S("medium", T=100, B=64, I=128, H=512)
    # LSTM forward: 2 * T * B * 4H * (I + H); backward: 2 * T * B * 4H * (2H + I) for layer 0
    fwd, bwd = bench.flops("LSTM", medium)
    assert fwd == 2 * 100 * 64 * 2048 * (128 + 512) == 16_777_216_000
    assert bwd == 2 * 100 * 64 * 2048 * (1024 + 128)
    fwd, _ = bench.flops("GRU", medium)
    assert fwd == 2 * 100 * 64 * 1536 * 640
    # two layers and a head: layer 1 reads H inputs and needs its input gradient; head 2THV fwd, 4THV bwd
    char = S("char-rnn", T=50, B=50, I=65, H=128, L=2, V=65)
    fwd, bwd = bench.flops("RNN", char)
    TB = 50 * 50
    assert fwd == 2 * TB * 128 * (65 + 128) + 2 * TB * 128 * (128 + 128) + 2 * TB * 128 * 65
    assert bwd == (2 * TB * 128 * (256 + 65)) + (2 * TB * 128 * (256 + 128) + 2 * TB * 128 * 128) \
        + 4 * TB * 128 * 65


def test_minimum_memory_by_hand(bench):
    S = bench.Shape
    medium = S("medium", T=100, B=64, I=128, H=512)
    TB = 6400
    # LSTM: gates 4H, outputs H, cells H per step and row, plus the output gradient H; float32
    assert bench.min_step_bytes("LSTM", medium) == 4 * TB * (4 * 512 + 512 + 512 + 512)
    assert bench.min_step_bytes("GRU", medium) == 4 * TB * (3 * 512 + 512 + 512 + 512)
    assert bench.min_step_bytes("RNN", medium) == 4 * TB * (512 + 512 + 512)
    seed = S("seed", T=25, B=1, I=65, H=100, V=65)
    assert bench.min_step_bytes("RNN", seed) == 4 * 25 * (100 + 100 + 100 + 65)


def test_targets_report_misses(bench):
    rows = [
        {"lib": "xrnn", "cell": "LSTM", "shape": "medium", "phase": "train", "speed_ratio_vs_torch": 0.9},
        {"lib": "xrnn", "cell": "LSTM", "shape": "large", "phase": "train", "speed_ratio_vs_torch": 1.2},
        {"lib": "xrnn", "cell": "LSTM", "shape": "seed", "phase": "train", "speed_ratio_vs_torch": 0.4},
    ]
    scaling = [{"T": 50, "xrnn_us_per_token": 1.0}, {"T": 1000, "xrnn_us_per_token": 1.5}]
    got = {t["target"].split(" xrnn")[0].split(" time")[0]: t["met"] for t in bench.targets(rows, scaling, [])}
    assert got == {"LSTM medium training step": False, "LSTM large training step": True,
                   "LSTM seed (batch 1) training step": False, "medium LSTM": False}


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("shape", ["seed", "medium"])
def test_both_libraries_train_the_same_model(bench, cell, shape):
    """The benchmark compares like with like: one training step of the xrnn runner and of
    the torch runner (same weights, loss, optimizer) gives the same loss and new weights."""
    pytest.importorskip("torch")
    import numpy as np

    import xrnn

    s = {x.name: x for x in bench.SMOKE_SHAPES}[shape]
    data = bench._data(s)
    xr = bench.XrnnRunner(cell, s, data)
    tr = bench.TorchRunner(cell, s, data, xr.model)
    for _ in range(2):
        loss_x = float(xrnn.to_numpy(xr.train_step()))
        loss_t = float(tr.train_step().detach())
        assert loss_x == pytest.approx(loss_t, rel=1e-5)
    torch_params = dict(tr.rnn.named_parameters())
    if tr.head is not None:
        torch_params.update({f"head.{k}": v for k, v in tr.head.named_parameters()})
    for k, v in xr.model.parameters().items():
        name = k.split(".", 1)[1] if k.startswith("rnn.") else k
        np.testing.assert_allclose(xrnn.to_numpy(v), torch_params[name].detach().numpy(), rtol=1e-4, atol=1e-6,
                                   err_msg=k)
