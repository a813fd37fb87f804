"""Data-parallel scaling: the same training job on 1 and 2 MPI ranks, tokens/s and efficiency.

Run from the repository root (needs mpirun and mpi4py)::

    python benchmarks/bench_scaling.py             # about 5 minutes on 2 cores
    python benchmarks/bench_scaling.py --smoke     # tiny model, seconds, writes to a temp dir
    python benchmarks/bench_scaling.py --ranks 1 2 4 --cores 4

The job: :class:`xrnn.train.Trainer` (the loop of ``xrnn train
--distributed``) on a CharLM (one-hot V=65 -> LSTM 2 x 512 -> head),
float32, Adam, global-norm clipping, B=64 streams x T=50 steps per window on
the embedded tiny Shakespeare, so the matrix products dominate. The total
batch is fixed (strong scaling): N ranks take B/N streams each and reduce
their gradients (one flat buffer, one allreduce per step).

Configurations (``--cores C``, default: the CPUs this process may use):

* ``N ranks x 1 thread`` for every N in ``--ranks``: per-rank resources fixed,
  so ``efficiency(N) = tokens/s(N) / (N * tokens/s(1 rank x 1 thread))``;
* ``N ranks x C/N threads``: the whole machine in every run (2 ranks x 1
  thread against 1 rank x 2 threads on a 2-core machine): whether
  data-parallel ranks use a machine better than BLAS threads
  (``speed-up = tokens/s(N ranks) / tokens/s(1 rank x C threads)``).

Thread counts are set through ``OMP_NUM_THREADS``/``OPENBLAS_NUM_THREADS``
in each rank's environment before NumPy loads, ranks are not bound to cores
(``--bind-to none``). Each run times ``--steps`` steps after ``--warmup``
steps, between barriers; the time inside the gradient reduction (copy into the
flat buffer, allreduce, copy back) is reported separately.

Writes ``benchmarks/results/scaling-<cpu>-<n>cpu-<date>.json`` (with the
machine: CPU model, cores, MPI library, versions) and
``benchmarks/results/scaling-latest.md``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _setup  # noqa: E402  (standard library only)

_setup.use_this_checkout()
_ROOT = _setup.ROOT

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

SHAPE = {"V": 65, "H": 512, "L": 2, "B": 64, "T": 50, "cell": "lstm"}
SMOKE_SHAPE = {"V": 65, "H": 32, "L": 1, "B": 4, "T": 8, "cell": "lstm"}


# ---------------------------------------------------------------------------
# worker: one rank of one configuration
# ---------------------------------------------------------------------------

def worker(args) -> None:
    import xrnn
    from xrnn import distributed as D
    from xrnn.data import Corpus
    from xrnn.train import Trainer

    class TimedTrainer(Trainer):
        """The trainer of ``xrnn train --distributed``, timing its gradient reduction."""

        reduce_seconds = 0.0

        def _reduce_gradients(self, loss):
            t0 = time.perf_counter()
            out = super()._reduce_gradients(loss)
            self.reduce_seconds += time.perf_counter() - t0
            return out

    shape = json.loads(args.shape)
    comm, dev = D.init_distributed("cpu")
    B, T = shape["B"], shape["T"]
    corpus = Corpus.from_text(xrnn.default_corpus_path().read_text(encoding="utf-8"))
    model = xrnn.CharLM(len(corpus.vocab), shape["H"], shape["L"], shape["cell"], device=dev, dtype="float32",
                        seed=0, vocab=corpus.vocab)
    trainer = TimedTrainer(model, corpus, batch_size=B, seq_len=T, optimizer="adam", lr=2e-3, clip=5.0,
                           val_fraction=0.0, eval_every=0, sample_every=0, save_every=0, progress=False,
                           distributed=comm)
    trainer.fit(args.warmup)
    comm.barrier()
    trainer.reduce_seconds = 0.0
    t0 = time.perf_counter()
    trainer.fit(args.warmup + args.steps)
    comm.barrier()
    elapsed = time.perf_counter() - t0
    times = comm.broadcast(elapsed)  # rank 0's wall time is the job's
    red = comm.allreduce_sum(trainer.reduce_seconds) / comm.size
    if comm.is_main:
        out = {
            "ranks": comm.size,
            "threads_per_rank": int(os.environ.get("OMP_NUM_THREADS", "0") or 0),
            "steps": args.steps,
            "seconds": times,
            "tokens_per_s": B * T * args.steps / times,
            "ms_per_step": 1e3 * times / args.steps,
            "reduce_ms_per_step": 1e3 * red / args.steps,
            "reduce_fraction": red / times,
            "gradient_floats": sum(int(p.size) for p in model.parameters().values()),
            "final_loss": trainer.train_losses[-1],
        }
        with open(args.result, "w") as f:
            json.dump(out, f)


# ---------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------

def _mpi_version(mpirun: str) -> str:
    try:
        p = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
        return (p.stdout or p.stderr).strip().splitlines()[0]
    except Exception as e:
        return f"unknown ({e})"


def machine_info(mpirun: str) -> dict:
    import numpy as np

    try:
        import mpi4py

        mpi4py_version = mpi4py.__version__
    except ImportError:
        mpi4py_version = None
    return {
        "hostname": socket.gethostname(),
        "cpu_model": _setup.cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "mpi4py": mpi4py_version,
        "mpi": _mpi_version(mpirun),
        "loadavg": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def _run(cmd: list, env: dict, timeout: float) -> None:
    p = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise SystemExit(f"timed out after {timeout} s: {' '.join(cmd)}") from None
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{out}\n{err}")


def run_config(args, mpirun: str, ranks: int, threads: int, shape: dict, tmp: str) -> dict:
    result = os.path.join(tmp, f"r{ranks}t{threads}.json")
    env = dict(os.environ)
    for var in _setup.THREAD_VARS:
        env[var] = str(threads)
    env.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                "OMPI_MCA_rmaps_base_oversubscribe": "1", "OMPI_MCA_btl_vader_single_copy_mechanism": "none"})
    py = [sys.executable, os.path.abspath(__file__), "--worker", "--result", result, "--shape", json.dumps(shape),
          "--steps", str(args.steps), "--warmup", str(args.warmup)]
    flags = ["--bind-to", "none"] if "Open MPI" in args.mpi_version else []
    _run([mpirun, "-n", str(ranks)] + flags + py, env, args.timeout)
    with open(result) as f:
        return json.load(f)


def markdown(rec: dict) -> str:
    m, s = rec["machine"], rec["shape"]
    lines = [
        "# Data-parallel scaling (xrnn.distributed over MPI, CPU)",
        "",
        f"Machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs ({m['cpus_available']} available), "
        f"{m['platform']}; Python {m['python']}, NumPy {m['numpy']}, mpi4py {m['mpi4py']}, {m['mpi']}. "
        f"Created {rec['created']} by `{rec['command']}`.",
        "",
        f"Job: xrnn.train.Trainer on a CharLM {s['cell'].upper()} {s['L']} x {s['H']}, one-hot V={s['V']}, "
        f"float32, Adam, clipping; "
        f"B={s['B']} streams x T={s['T']} per step in total (strong scaling: B/N per rank); "
        f"{rec['steps']} timed steps after {rec['warmup']} warm-up, median of {rec['rounds']} interleaved "
        f"rounds; one allreduce of "
        f"{rec['runs'][0]['gradient_floats'] + 2} floats per step (gradients, loss, stop vote).",
        "",
        "| ranks x threads | tokens/s (median) | all rounds | ms/step | reduce ms/step (share) "
        "| efficiency vs 1 x 1 | speed-up vs 1 x all cores |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rec["runs"]:
        eff = "" if r.get("efficiency") is None else f"{100 * r['efficiency']:.0f} %"
        sp = "" if r.get("speedup_vs_all_threads") is None else f"{r['speedup_vs_all_threads']:.2f}x"
        lines.append(
            f"| {r['ranks']} x {r['threads_per_rank']} | {r['tokens_per_s']:,.0f} | "
            f"{', '.join(f'{x:,.0f}' for x in r['tokens_per_s_all_rounds'])} | {r['ms_per_step']:.1f} | "
            f"{r['reduce_ms_per_step']:.2f} ({100 * r['reduce_fraction']:.1f} %) | {eff} | {sp} |"
        )
    lines += [
        "",
        "Efficiency = tokens/s(N x 1) / (N * tokens/s(1 x 1)): per-rank resources fixed. "
        "Speed-up = tokens/s(N ranks x C/N threads) / tokens/s(1 rank x C threads): the whole machine in both. "
        "Reduce time includes waiting for the slower rank. Other load on the machine inflates times "
        f"(load average at start: {m['loadavg']}, at the end: {rec.get('loadavg_end')}); the spread of "
        "the rounds shows how much.",
        "",
    ]
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "machine"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="*", default=[1, 2], help="rank counts (default 1 2)")
    p.add_argument("--cores", type=int, default=None, help="cores to share out (default: CPUs available)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 12, smoke 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, smoke 1)")
    p.add_argument("--rounds", type=int, default=None, help="runs of every configuration, interleaved; the median "
                   "is reported (default 5, smoke 1)")
    p.add_argument("--smoke", action="store_true", help="tiny model, seconds; writes to a temp dir")
    p.add_argument("--out", default=None, help="output directory (default benchmarks/results)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration before it is killed")
    # worker mode (internal)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 3 if args.smoke else 12
    if args.warmup is None:
        args.warmup = 1 if args.smoke else 3
    if args.rounds is None:
        args.rounds = 1 if args.smoke else 5
    if args.worker:
        worker(args)
        return {}

    mpirun = shutil.which("mpirun") or shutil.which("mpiexec")
    if mpirun is None:
        raise SystemExit("mpirun not found: install openmpi-bin libopenmpi-dev (Debian/Ubuntu) and pip install mpi4py")
    args.mpi_version = _mpi_version(mpirun)
    cores = args.cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    shape = SMOKE_SHAPE if args.smoke else SHAPE
    ranks = sorted(set(args.ranks) | {1})
    configs = [(n, 1) for n in ranks] + [(n, max(1, cores // n)) for n in ranks if max(1, cores // n) != 1]
    rec = {
        "schema": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python benchmarks/bench_scaling.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "smoke": args.smoke,
        "cores": cores,
        "shape": shape,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "machine": machine_info(mpirun),
        "runs": [],
    }
    trials: dict = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="xrnn-scaling-") as tmp:
        for k in range(args.rounds):  # interleaved, so a burst of other load hits every configuration alike
            for n, t in configs:
                t0 = time.perf_counter()
                r = run_config(args, mpirun, n, t, shape, tmp)
                r["threads_per_rank"] = t
                trials[(n, t)].append(r)
                print(f"round {k + 1}: {n} rank(s) x {t} thread(s): {r['tokens_per_s']:,.0f} tokens/s, "
                      f"{r['ms_per_step']:.1f} ms/step, reduce {r['reduce_ms_per_step']:.2f} ms/step "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    for c in configs:  # the median round of each configuration (by tokens/s)
        runs = sorted(trials[c], key=lambda r: r["tokens_per_s"])
        r = dict(runs[(len(runs) - 1) // 2])
        r["tokens_per_s_all_rounds"] = [x["tokens_per_s"] for x in trials[c]]
        rec["runs"].append(r)
    rec["loadavg_end"] = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    base1 = next(r for r in rec["runs"] if r["ranks"] == 1 and r["threads_per_rank"] == 1)
    baseall = next((r for r in rec["runs"] if r["ranks"] == 1 and r["threads_per_rank"] == max(1, cores)), base1)
    for r in rec["runs"]:
        r["efficiency"] = (r["tokens_per_s"] / (r["ranks"] * base1["tokens_per_s"])
                           if r["threads_per_rank"] == 1 else None)
        r["speedup_vs_all_threads"] = (r["tokens_per_s"] / baseall["tokens_per_s"]
                                       if r["ranks"] * r["threads_per_rank"] == cores else None)
    out_dir = args.out or (tempfile.mkdtemp(prefix="xrnn-scaling-") if args.smoke
                           else os.path.join(_ROOT, "benchmarks", "results"))
    os.makedirs(out_dir, exist_ok=True)
    m = rec["machine"]
    stem = f"scaling-{_slug(m['cpu_model'])}-{m['logical_cpus']}cpu-{rec['created'][:10]}"
    json_path = os.path.join(out_dir, stem + ".json")
    md_path = os.path.join(out_dir, "scaling-latest.md")
    with open(json_path, "w") as f:
        json.dump(rec, f, indent=1)
    with open(md_path, "w") as f:
        f.write(markdown(rec))
    print(f"wrote {json_path} and {md_path}")
    rec["paths"] = {"json": json_path, "markdown": md_path}
    return rec


if __name__ == "__main__":
    main()
