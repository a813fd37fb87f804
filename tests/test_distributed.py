"""Data-parallel training: sharding, exact dropout, the flat gradient buffer, and real MPI jobs.

The in-process tests need nothing beyond the test environment. The MPI tests
start ``mpirun -n 2`` jobs of ``tests/mpi_worker.py`` in a subprocess (each
with a time limit, killed as a process group if it hangs) and skip where
mpirun or mpi4py is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import xrnn
from xrnn import distributed as D
from xrnn.errors import ConfigError, DistributedError

from conftest import assert_on, to_np

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "mpi_worker.py"


# ---------------------------------------------------------------------------
# running MPI jobs
# ---------------------------------------------------------------------------

_MPI4PY_OK: list = []


def _mpirun() -> str:
    exe = shutil.which("mpirun") or shutil.which("mpiexec")
    if exe is None:
        pytest.skip("mpirun/mpiexec not found (install openmpi-bin libopenmpi-dev)")
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install mpi4py)")
    if not _MPI4PY_OK:  # installed is not enough: its MPI library must load (checked once, in a child)
        p = subprocess.run([sys.executable, "-c", "from mpi4py import MPI; MPI.Get_library_version()"],
                           capture_output=True, text=True, timeout=60, env=mpi_env())
        why = "" if p.returncode == 0 else ((p.stderr.strip().splitlines() or ["failed"])[-1])
        _MPI4PY_OK.append(why)
    if _MPI4PY_OK[0]:
        pytest.skip(f"mpi4py cannot load its MPI library: {_MPI4PY_OK[0]}")
    return exe


def _is_open_mpi(exe: str) -> bool:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Open MPI" in (out.stdout + out.stderr)


def mpi_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    # Open MPI refuses to start as root and to place more ranks than cores
    # unless told; the CMA single-copy path fails inside containers.
    env.update({
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_rmaps_base_oversubscribe": "1",
        "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
        "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
    })
    for k in D._LAUNCHER_VARS:
        env.pop(k, None)
    env.update(extra or {})
    return env


def run_job(args: list, n: int | None, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``args`` (a Python command line) under ``mpirun -n n`` (or alone for n=None), killed if it hangs."""
    cmd = [sys.executable] + [str(a) for a in args]
    if n is not None:
        exe = _mpirun()
        flags = ["--bind-to", "none", "--oversubscribe"] if _is_open_mpi(exe) else []
        cmd = [exe, "-n", str(n)] + flags + cmd
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env=mpi_env(env), cwd=str(ROOT))
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"the job hung (killed after {timeout} s): {' '.join(cmd)}\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def run_worker(scenario: str, out: Path, n: int | None, timeout: float = 90, env: dict | None = None):
    return run_job([WORKER, scenario, out], n, timeout, env)


# ---------------------------------------------------------------------------
# sharding
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("B", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("N", [1, 2, 3, 4])
def test_shard_rows_partition_the_streams(B, N):
    if B < N:
        with pytest.raises(ConfigError, match="at least one"):
            D.shard_rows(B, 0, N)
        return
    rows = [list(range(B))[D.shard_rows(B, r, N)] for r in range(N)]
    assert sum(rows, []) == list(range(B))  # disjoint, ordered, complete
    sizes = [len(x) for x in rows]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    weights = [D.shard_weight(B, r, N) for r in range(N)]
    assert weights == [s / B for s in sizes]
    assert abs(sum(weights) - 1.0) < 1e-15


@pytest.mark.parametrize("args", [(4, 2, 2), (4, -1, 2), (4, 0, 0), (0, 0, 1), (4, 0.5, 2), (True, 0, 1)])
def test_shard_rows_rejects_bad_arguments(args):
    with pytest.raises(ConfigError):
        D.shard_rows(*args)


def test_rows_generator_draws_the_rows_of_the_full_mask():
    full = np.random.default_rng(5)
    part = np.random.default_rng(5)
    rows = np.array([1, 3])
    g = D._RowsGenerator(part.bit_generator, rows, 4)
    a = full.random((3, 4, 5), dtype=np.float32)  # (T, B, H)
    b = g.random((3, 2, 5), dtype=np.float32)  # (T, b, H)
    np.testing.assert_array_equal(b, a[:, rows, :])
    # other draws pass through and the stream stays in step with the full generator
    np.testing.assert_array_equal(g.random(4), full.random(4))
    np.testing.assert_array_equal(g.standard_normal((3, 2, 5)), full.standard_normal((3, 2, 5)))
    assert g.bit_generator.state == full.bit_generator.state
    assert isinstance(g, np.random.Generator)


def _charlm(dev, seed=3, dropout=0.3, cell="lstm"):
    return xrnn.CharLM(11, 6, 2, cell, dropout=dropout, device=dev, dtype="float64", seed=seed)


@pytest.mark.parametrize("B,N", [(4, 2), (3, 2), (5, 3)])
def test_replicas_with_row_shares_give_the_full_batch_gradient(light_device, B, N):
    """Independent of MPI: N replicas on their rows, gradients weighted by tokens, equal one model on all B rows."""
    dev, T = light_device, 5
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 11, size=(B, T + 1))
    x, y = ids[:, :-1], ids[:, 1:]
    full = _charlm(dev)
    logits, _ = full.forward(dev.asarray(x))
    loss_full, d = xrnn.softmax_cross_entropy(logits, dev.asarray(y))
    full.backward(d)
    want = to_np(D.GradientBuffer(full, extras=1).flatten(extras=[loss_full]))

    total = np.zeros_like(want)
    for r in range(N):
        rows = D.shard_rows(B, r, N)
        rep = _charlm(dev)
        D.shard_dropout(rep, rows, B)
        logits, _ = rep.forward(dev.asarray(x[rows]))
        loss, d = xrnn.softmax_cross_entropy(logits, dev.asarray(y[rows]))
        rep.backward(d)
        flat = D.GradientBuffer(rep, extras=1).flatten(extras=[loss])
        assert_on(dev, flat)
        total += D.shard_weight(B, r, N) * to_np(flat)
        # the replica's generator advanced exactly as the full model's did
        assert rep.rng.bit_generator.state == full.rng.bit_generator.state
    np.testing.assert_allclose(total, want, rtol=1e-12, atol=1e-15)


def test_row_shares_without_shard_dropout_would_differ():
    """The check above can fail: plain per-rank masks are not the rows of the full mask."""
    dev, B, T = xrnn.resolve_device("cpu"), 4, 5
    ids = np.random.default_rng(1).integers(0, 11, size=(B, T))
    full = _charlm(dev)
    a, _ = full.forward(dev.asarray(ids))
    rep = _charlm(dev)
    b, _ = rep.forward(dev.asarray(ids[:2]))
    assert not np.allclose(to_np(a)[:2], to_np(b))
    rep = _charlm(dev)
    D.shard_dropout(rep, slice(0, 2), B)
    b, _ = rep.forward(dev.asarray(ids[:2]))
    np.testing.assert_allclose(to_np(a)[:2], to_np(b), rtol=1e-13)


# ---------------------------------------------------------------------------
# the flat buffer
# ---------------------------------------------------------------------------

def test_gradient_buffer_round_trip(device):
    model = xrnn.CharLM(7, 5, 2, "gru", embedding_dim=3, device=device, dtype="float32", seed=0)
    rng = np.random.default_rng(2)
    host = {k: rng.standard_normal(tuple(g.shape)).astype(np.float32) for k, g in model.grads.items()}
    with device:
        for k, g in model.grads.items():
            g[...] = device.asarray(host[k], "float32")
    before = {k: id(g) for k, g in model.grads.items()}
    buf = D.GradientBuffer(model, extras=2)
    flat = buf.flatten(extras=[device.asarray(np.array(1.25), "float32"), 2.5])
    assert_on(device, flat)
    want = np.concatenate([host[k].reshape(-1) for k in model.parameters()] + [np.array([1.25, 2.5], np.float32)])
    np.testing.assert_array_equal(to_np(flat), want)
    assert buf.numel == sum(v.size for v in host.values()) and tuple(flat.shape) == (buf.numel + 2,)
    assert buf.flatten() is flat  # one buffer, reused
    extras = buf.unflatten(device.asarray(want * 3, "float32"))
    for k, g in model.grads.items():
        assert id(g) == before[k]  # written in place: optimizers keep their references
        assert_on(device, g)
        np.testing.assert_array_equal(to_np(g), host[k] * 3)
    assert [float(to_np(e)) for e in extras] == [3.75, 7.5]


class _Doubling(D.Communicator):
    """A fake 2-rank job whose other rank holds exactly the same gradients."""

    size = 2

    def allreduce_sum(self, x):
        dev = xrnn.backend.device_of(x)
        with dev:
            return x * 2


def test_gradient_buffer_reduce_weights_and_extras(light_device):
    model = _charlm(light_device, dropout=0.0)
    g0 = {k: light_device.asarray(np.full(tuple(g.shape), 0.5), "float64") for k, g in model.grads.items()}
    with light_device:
        for k, g in model.grads.items():
            g[...] = g0[k]
    buf = D.GradientBuffer(model)
    (loss,) = buf.reduce(_Doubling(), weight=0.25, extras=[4.0])  # 2 * 0.25 * g
    assert float(to_np(loss)) == 2.0
    for g in model.grads.values():
        np.testing.assert_array_equal(to_np(g), 0.25)
    (loss,) = buf.reduce(D.SingleProcess(), extras=[3.0])
    assert float(to_np(loss)) == 3.0
    for g in model.grads.values():
        np.testing.assert_array_equal(to_np(g), 0.25)


def test_gradient_buffer_checks_shapes():
    model = _charlm("cpu")
    buf = D.GradientBuffer(model)
    grads = dict(model.grads)
    grads["head.bias"] = np.zeros(3)
    with pytest.raises(DistributedError, match="head.bias"):
        buf.flatten(grads)
    with pytest.raises(ConfigError, match="extra"):
        buf.flatten(extras=[1.0, 2.0])


# ---------------------------------------------------------------------------
# single process, configuration, watchdog
# ---------------------------------------------------------------------------

def test_single_process_is_the_identity(monkeypatch):
    for k in D._LAUNCHER_VARS:
        monkeypatch.delenv(k, raising=False)
    comm, dev = D.init_distributed("cpu")
    assert isinstance(comm, D.SingleProcess) and dev == xrnn.resolve_device("cpu")
    assert (comm.rank, comm.size, comm.local_rank, comm.is_main, comm.backend) == (0, 1, 0, True, "single")
    a = np.arange(3.0)
    assert comm.allreduce_sum(a) is a and comm.allreduce_mean(a) is a
    assert comm.allreduce_sum(2) == 2.0 and isinstance(comm.allreduce_sum(2), float)
    assert comm.broadcast({"a": (1, 2)}) == {"a": [1, 2]}
    assert comm.broadcast(a) is a
    with pytest.raises(DistributedError, match="JSON-able"):
        comm.broadcast({1, 2})
    comm.barrier()
    model = _charlm("cpu")
    D.broadcast_parameters(model, comm)
    D.check_replicas(model, comm)
    assert D.get_communicator("cpu").size == 1


def test_data_parallel_in_one_process_changes_nothing():
    model = _charlm("cpu")
    dp = D.DataParallel(D.SingleProcess(), 4)
    assert not dp.active and dp.rows == slice(0, 4) and dp.weight == 1.0
    rng_before = model.rng
    dp.prepare(model)
    assert model.rng is rng_before
    h = np.ones((2, 4, 3))
    assert dp.gather_rows(h) is h and dp.take_rows((h, h))[0] is h and dp.gather_rows(None) is None
    loss = np.asarray(1.5)
    assert dp.reduce(model, loss) == (loss, None)
    assert dp.mean(2.5) == 2.5


def test_launcher_detection(monkeypatch):
    for k in D._LAUNCHER_VARS + ("SLURM_NTASKS",):
        monkeypatch.delenv(k, raising=False)
    assert not D.launched_by_mpi() and D.launcher_world_size() is None
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert D.launched_by_mpi() and D.launcher_world_size() == 2
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
    monkeypatch.setenv("PMIX_RANK", "0")
    monkeypatch.setenv("SLURM_NTASKS", "3")
    assert D.launched_by_mpi() and D.launcher_world_size() == 3


def test_collective_timeout(monkeypatch):
    monkeypatch.delenv(D.TIMEOUT_ENV, raising=False)
    assert D.collective_timeout() == D.DEFAULT_TIMEOUT == 300.0
    monkeypatch.setenv(D.TIMEOUT_ENV, "12.5")
    assert D.collective_timeout() == 12.5
    assert D.collective_timeout(3) == 3.0
    for bad in ("0", "-1", "soon", "nan", "inf"):
        monkeypatch.setenv(D.TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match=D.TIMEOUT_ENV):
            D.collective_timeout()
    with pytest.raises(ConfigError, match="positive"):
        D.collective_timeout(0)
    with pytest.raises(ConfigError):
        D.get_communicator("cpu", backend="gloo")


def test_device_for_rank_keeps_cpu_devices():
    assert D.device_for_rank("cpu", 3) == xrnn.resolve_device("cpu")
    assert D.device_for_rank("array_api_strict:device1", 1).name == "array_api_strict:device1"


def _wait_for(event: threading.Event, seconds: float = 10.0) -> bool:
    return event.wait(seconds)


def test_watchdog_fires_on_a_late_collective_and_not_on_finished_ones():
    fired, errors = threading.Event(), []
    calls = []

    def late(what, waited):
        calls.append((what, waited))
        fired.set()

    wd = D._Watchdog(0.2, late, interval=0.005)
    try:
        for _ in range(5):
            wd.watch(lambda: True, "done allreduce")
        deadline = time.monotonic() + 10
        while wd.pending() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert wd.pending() == 0 and not fired.is_set()
        wd.watch(lambda: False, "allreduce")
        assert _wait_for(fired)
        assert calls[0][0] == "allreduce" and calls[0][1] > 0.2 and wd.fired
    finally:
        wd.close()

    def poll():
        raise RuntimeError("NCCL_ERROR_SYSTEM_ERROR: peer gone")

    got = threading.Event()
    wd = D._Watchdog(100, late, lambda e: (errors.append(e), got.set()), poll=poll, interval=0.005)
    try:
        assert _wait_for(got)
        assert "peer gone" in str(errors[0])
    finally:
        wd.close()


# ---------------------------------------------------------------------------
# real MPI jobs
# ---------------------------------------------------------------------------

def test_mpi_collectives(tmp_path):
    p = run_worker("collectives", tmp_path, 2)
    assert p.returncode == 0, p.stderr
    res = [json.loads((tmp_path / f"collectives-rank{r}.json").read_text()) for r in range(2)]
    for r, x in enumerate(res):
        assert (x["rank"], x["size"], x["local_rank"], x["local_size"], x["backend"]) == (r, 2, r, 2, "mpi")
        assert x["sum_in_place"] is True
        assert x["sum"] == (np.arange(6.0).reshape(2, 3) * 3).tolist()  # (1 + 2) * arange
        assert x["mean"] == [0.5] * 4 and x["number"] == 2.0 and x["f16"] == [3.0] * 3 and x["int"] == [1, 10]
        assert x["strict_device"] == "array_api_strict:device1" and x["strict"] == [3.0, 3.0]
        if x["torch"] is not None:
            assert x["torch"] == ["torch:cpu", [3.0, 3.0]]
        assert x["obj"] == {"seed": 7, "name": "tiny", "ids": [1, 2]}
        assert x["arr_none"] == [0, 3, 6, 9, 12]
        assert x["arr_into"] == [[1.5, 2.5, 3.5], True]
        assert x["root_last"] == "from 1"
        assert x["strict_bcast"] == ["array_api_strict:device1", [9.0, 9.0]]
        assert "JSON-able" in x["bad_obj"] and "set" in x["bad_obj"]
        assert "rank(s) [1]" in x["replicas_before"] and x["replicas_after"] == "equal"
    assert res[0]["weights_digest"] == res[1]["weights_digest"]
    assert res[0]["dp_rows"] == [0, 1, 1 / 3] and res[1]["dp_rows"] == [1, 3, 2 / 3]
    for x in res:
        assert x["dp_gather"] == [True, True]
        assert x["dp_mean"] == pytest.approx(50 / 3, rel=1e-15)
        assert x["dp_stop"] > 0 and x["dp_no_stop"] == 0  # rank 1 asked to stop: both ranks see it


def test_mpi_training_equals_one_process_with_the_combined_batch(tmp_path):
    """2 ranks x B/2 streams (and an uneven 3 = 1 + 2 split) train exactly like 1 process x B streams.

    float64, LSTM with dropout 0.25 (masks must be the rows of the single-process masks), Adam,
    global-norm clipping, rank 1 seeded differently (the broadcast must make the replicas equal).
    """
    p = run_worker("train", tmp_path, 2)
    assert p.returncode == 0, p.stderr
    p = run_worker("train", tmp_path, None)
    assert p.returncode == 0, p.stderr
    for tag in ("even", "uneven"):
        one = np.load(tmp_path / f"train-{tag}-n1-rank0.npz")
        r0 = np.load(tmp_path / f"train-{tag}-n2-rank0.npz")
        r1 = np.load(tmp_path / f"train-{tag}-n2-rank1.npz")
        assert len(one["losses"]) == 6
        assert one["losses"][-1] < one["losses"][0]  # it trained
        np.testing.assert_allclose(r0["losses"], one["losses"], rtol=1e-12)
        np.testing.assert_array_equal(r0["losses"], r1["losses"])
        for k in one.files:
            if k in ("losses", "rng"):
                continue
            np.testing.assert_allclose(r0[k], one[k], rtol=1e-10, atol=1e-13, err_msg=k)
            np.testing.assert_array_equal(r0[k], r1[k], err_msg=k)  # identical replicas
        assert str(r0["rng"]) == str(one["rng"])  # the dropout stream advanced as in one process


def test_a_stuck_rank_ends_the_job_with_a_timeout_message(tmp_path):
    start = time.monotonic()
    p = run_worker("stuck", tmp_path, 2, timeout=60, env={D.TIMEOUT_ENV: "2"})
    assert p.returncode != 0
    assert "allreduce timed out on rank 0 of 2 after" in p.stderr, p.stderr
    assert "DistributedError" in p.stderr and D.TIMEOUT_ENV in p.stderr
    assert "passed the allreduce" not in p.stdout
    assert time.monotonic() - start < 60


def test_an_exception_on_one_rank_ends_every_rank(tmp_path):
    # rank 0 waits with a 120 s timeout; only the abort hook can end it sooner than the 60 s limit
    p = run_worker("crash", tmp_path, 2, timeout=60)
    assert p.returncode != 0
    assert "[rank 1/2] RuntimeError: simulated failure on rank 1" in p.stderr, p.stderr
    assert "rank 1 of 2 failed with RuntimeError; ending every rank" in p.stderr
    assert "passed the allreduce" not in p.stdout


def test_nccl_collectives(tmp_path):
    """NCCLComm on real GPUs (skipped without CuPy and a GPU: it has not run in this project)."""
    try:
        import cupy

        ngpu = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        pytest.skip(f"NCCL needs CuPy and a GPU ({e})")
    if ngpu < 1:
        pytest.skip("no GPU")
    n = min(ngpu, 2)
    p = run_worker("nccl", tmp_path, n, timeout=180)
    assert p.returncode == 0, p.stderr
    for r in range(n):
        x = json.loads((tmp_path / f"nccl-rank{r}.json").read_text())
        assert x["backend"] == "nccl" and x["same"] is True and x["device"] == f"cuda:{r}"
        assert x["sum"] == (np.arange(4.0) * sum(range(1, n + 1))).tolist()
        assert x["bcast"] == [1.0, 1.0]


# ---------------------------------------------------------------------------
# the trainer and the command line
# ---------------------------------------------------------------------------

_TINY_ARGS = ["--batch-size", "4", "--seq-len", "16", "--hidden-size", "24", "--num-layers", "2",
              "--dropout", "0.2", "--dtype", "float64", "--eval-every", "4", "--sample-every", "0",
              "--log-every", "2", "--save-every", "4", "--progress", "lines"]


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(xrnn.default_corpus_path().read_text(encoding="utf-8")[:20000], encoding="utf-8")
    return path


def _cli(text, out, steps, n=None, extra=()):
    args = ["-m", "xrnn", "train", str(text), "--steps", str(steps), "--out", str(out)] + _TINY_ARGS + list(extra)
    if n is not None:
        args.append("--distributed")
    p = run_job(args, n, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def _assert_same_run(a: Path, b: Path):
    from xrnn.checkpoint import read_container

    ca, cb = read_container(a), read_container(b)
    assert ca.meta["step"] == cb.meta["step"]
    assert ca.meta["data"]["position"] == cb.meta["data"]["position"]
    assert ca.meta["model"]["rng_state"] == cb.meta["model"]["rng_state"]  # dropout stream
    assert ca.meta["tokens_seen"] == cb.meta["tokens_seen"]
    assert sorted(ca.tensors) == sorted(cb.tensors)
    for k in ca.tensors:
        np.testing.assert_allclose(ca.tensors[k], cb.tensors[k], rtol=1e-9, atol=1e-12, err_msg=k)
    assert len(ca.tensors["history/train_loss"]) == ca.meta["step"]
    assert list(ca.tensors["history/val_step"]) == [4, 8]


def test_cli_distributed_run_equals_one_process_with_the_whole_batch(tiny_text, tmp_path):
    """mpirun -n 2 xrnn train --distributed == xrnn train: losses, validation, weights, optimizer, state."""
    _cli(tiny_text, tmp_path / "one", 8)
    p = _cli(tiny_text, tmp_path / "two", 8, n=2)
    assert "data-parallel over 2 MPI ranks (2 streams each)" in p.stdout
    assert p.stdout.count("training a 2-layer LSTM") == 1  # rank 0 alone prints
    _assert_same_run(tmp_path / "one" / "last.ckpt", tmp_path / "two" / "last.ckpt")
    _assert_same_run(tmp_path / "one" / "best.ckpt", tmp_path / "two" / "best.ckpt")


def test_cli_resume_on_another_number_of_ranks(tiny_text, tmp_path):
    _cli(tiny_text, tmp_path / "ref", 8)
    _cli(tiny_text, tmp_path / "a", 4, n=2)  # 2 ranks, then 1 process
    _cli(tiny_text, tmp_path / "a", 8, extra=["--resume"])
    _assert_same_run(tmp_path / "ref" / "last.ckpt", tmp_path / "a" / "last.ckpt")
    _cli(tiny_text, tmp_path / "b", 4)  # 1 process, then 2 ranks
    _cli(tiny_text, tmp_path / "b", 8, n=2, extra=["--resume"])
    _assert_same_run(tmp_path / "ref" / "last.ckpt", tmp_path / "b" / "last.ckpt")


def test_cli_refuses_mpirun_without_distributed(tiny_text, tmp_path):
    p = run_job(["-m", "xrnn", "train", tiny_text, "--steps", "2", "--out", tmp_path / "x"], 2, timeout=60)
    assert p.returncode != 0
    assert "started by an MPI launcher with 2 ranks but without --distributed" in p.stderr
    assert not (tmp_path / "x").exists()


def test_cli_error_on_every_rank_ends_the_job(tiny_text, tmp_path):
    p = run_job(["-m", "xrnn", "train", tiny_text, "--steps", "2", "--batch-size", "1", "--distributed",
                 "--out", tmp_path / "x"], 2, timeout=60)
    assert p.returncode != 0
    assert "--batch-size 1 streams cannot be shared by 2 ranks" in p.stderr, p.stderr  # said in flags


def test_trainer_stops_every_rank_at_the_same_step_when_one_gets_a_signal(tmp_path):
    from xrnn.checkpoint import read_container

    p = run_worker("trainer_signal", tmp_path, 2)
    assert p.returncode == 0, p.stderr
    res = [json.loads((tmp_path / f"signal-rank{r}.json").read_text()) for r in range(2)]
    assert res[0] == {"step": 4, "interrupted": "SIGTERM", "main": True}
    assert res[1] == {"step": 4, "interrupted": "SIGTERM", "main": False}
    c = read_container(tmp_path / "last.ckpt")
    assert c.meta["step"] == 4 and c.tensors["carry/h"].shape == (1, 4, 8)  # all 4 streams' state


def test_scaling_benchmark_smoke(tmp_path):
    _mpirun()
    p = run_job([ROOT / "benchmarks" / "bench_scaling.py", "--smoke", "--cores", "2", "--out", tmp_path], None,
                timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    rec = json.loads(next(tmp_path.glob("scaling-*.json")).read_text())
    got = {(r["ranks"], r["threads_per_rank"]): r for r in rec["runs"]}
    assert set(got) == {(1, 1), (2, 1), (1, 2)}
    assert all(r["tokens_per_s"] > 0 and np.isfinite(r["final_loss"]) for r in rec["runs"])
    assert got[(1, 1)]["efficiency"] == 1.0 and got[(2, 1)]["speedup_vs_all_threads"] is not None
    assert rec["machine"]["cpu_model"] and "mpi" in rec["machine"]
    assert (tmp_path / "scaling-latest.md").read_text().startswith("# Data-parallel scaling")
