"""Scenarios that tests/test_distributed.py runs under ``mpirun -n N`` (or alone, as one process).

Usage: python tests/mpi_worker.py SCENARIO OUT_DIR

Each rank writes what it saw to ``OUT_DIR/<scenario>-rank<r>.json`` (or
``.npz``); the test compares. Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import xrnn  # noqa: E402
from xrnn import distributed as D  # noqa: E402
from xrnn.errors import DistributedError  # noqa: E402


def collectives(out: str) -> None:
    comm, dev = D.init_distributed("cpu")
    r, n = comm.rank, comm.size
    res: dict = {"rank": r, "size": n, "local_rank": comm.local_rank, "local_size": comm.local_size,
                 "backend": comm.backend}
    a = np.arange(6, dtype=np.float64).reshape(2, 3) * (r + 1)  # (2, 3)
    b = comm.allreduce_sum(a)
    res["sum_in_place"] = b is a
    res["sum"] = b.tolist()
    res["mean"] = comm.allreduce_mean(np.full(4, float(r), dtype=np.float32)).tolist()
    res["number"] = comm.allreduce_sum(r + 0.5)
    res["f16"] = comm.allreduce_sum(np.full(3, r + 1, dtype=np.float16)).tolist()
    res["int"] = comm.allreduce_sum(np.array([r, 10 * r], dtype=np.int64)).tolist()
    sdev = xrnn.resolve_device("array_api_strict:device1")
    s = comm.allreduce_sum(sdev.asarray(np.full(2, r + 1.0), "float64"))
    res["strict_device"] = xrnn.backend.device_of(s).name
    res["strict"] = xrnn.to_numpy(s).tolist()
    try:
        import torch  # noqa: F401

        tdev = xrnn.resolve_device("torch:cpu")
        t = comm.allreduce_sum(tdev.asarray(np.full(2, r + 1.0), "float32"))
        res["torch"] = [xrnn.backend.device_of(t).name, xrnn.to_numpy(t).tolist()]
    except ImportError:
        res["torch"] = None
    # broadcasts: objects, arrays into None, arrays into a matching buffer, from another root
    res["obj"] = comm.broadcast({"seed": 7, "name": "tiny", "ids": (1, 2)} if r == 0 else None)
    res["arr_none"] = comm.broadcast(np.arange(5, dtype=np.int32) * 3 if r == 0 else None).tolist()
    buf = np.zeros(3) if r != 0 else np.array([1.5, 2.5, 3.5])
    got = comm.broadcast(buf)
    res["arr_into"] = [got.tolist(), got is buf]
    res["root_last"] = comm.broadcast(f"from {r}" if r == n - 1 else None, root=n - 1)
    sb = comm.broadcast(sdev.asarray(np.full(2, 9.0) if r == 0 else np.zeros(2), "float64"))
    res["strict_bcast"] = [xrnn.backend.device_of(sb).name, xrnn.to_numpy(sb).tolist()]
    try:
        comm.broadcast({1, 2} if r == 0 else None)
        res["bad_obj"] = "no error"
    except DistributedError as e:
        res["bad_obj"] = str(e)
    comm.barrier()
    # replica checks: different weights fail on every rank, broadcast makes them equal
    model = xrnn.CharLM(5, 4, 1, "gru", device="cpu", dtype="float64", seed=100 + r)
    try:
        D.check_replicas(model, comm)
        res["replicas_before"] = "equal"
    except DistributedError as e:
        res["replicas_before"] = str(e)
    D.broadcast_parameters(model, comm)
    D.check_replicas(model, comm)
    res["replicas_after"] = "equal"
    res["weights_digest"] = D._digest(model)
    # DataParallel: 3 streams over 2 ranks (1 + 2 rows); state gathering, means, the stop vote
    dp = D.DataParallel(comm, 3)
    full = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4)  # (L, B, H)
    mine = dp.take_rows(full)
    back = dp.gather_rows((mine, mine + 0.5))
    res["dp_rows"] = [dp.rows.start, dp.rows.stop, dp.weight]
    res["dp_gather"] = [np.array_equal(back[0], full), np.array_equal(back[1], full + 0.5)]
    res["dp_mean"] = dp.mean(10.0 * (r + 1))  # rank means 10, 20 over 1 and 2 rows -> 50/3
    dp.prepare(model)
    model.zero_grad()
    _, stop = dp.reduce(model, model.device.asarray(np.array(1.0 + r), "float64"), stop=(r == 1))
    res["dp_stop"] = float(xrnn.to_numpy(stop))
    _, stop = dp.reduce(model, model.device.asarray(np.array(1.0), "float64"), stop=False)
    res["dp_no_stop"] = float(xrnn.to_numpy(stop))
    with open(os.path.join(out, f"collectives-rank{r}.json"), "w") as f:
        json.dump(res, f)


def stuck(out: str) -> None:
    """Rank 1 hangs (never joins the allreduce); rank 0 must end the job after the timeout."""
    comm, dev = D.init_distributed("cpu")
    comm.barrier()
    if comm.rank == 1:
        time.sleep(120)
    comm.allreduce_sum(np.ones(8))
    print(f"rank {comm.rank} passed the allreduce", flush=True)


def crash(out: str) -> None:
    """Rank 1 raises; the abort hook must end rank 0, which waits with a long timeout."""
    comm, dev = D.init_distributed("cpu", timeout=120)
    comm.barrier()
    if comm.rank == 1:
        raise RuntimeError("simulated failure on rank 1")
    comm.allreduce_sum(np.ones(8))
    print(f"rank {comm.rank} passed the allreduce", flush=True)


def _train_once(comm, dev, B: int, T: int, steps: int, tag: str, out: str) -> None:
    """A hand-written data-parallel CharLM loop (the trainer's steps, spelled out)."""
    from xrnn.data import StreamBatcher, Vocabulary
    from xrnn.optim import Adam, clip_grad_norm

    text = xrnn.default_corpus_path().read_text(encoding="utf-8")[:6000]
    vocab = Vocabulary.build(text)
    ids = vocab.encode(text)
    rows = D.shard_rows(B, comm.rank, comm.size)
    batcher = StreamBatcher(ids, B, T, rows=rows)
    # Deliberately different seeds per rank: broadcast_parameters must fix it.
    model = xrnn.CharLM(len(vocab), 16, 2, "lstm", dropout=0.25, device=dev, dtype="float64",
                        seed=1234 + 17 * comm.rank)
    D.broadcast_parameters(model, comm)
    D.check_replicas(model, comm, "after the broadcast")
    D.shard_dropout(model, rows, B)
    opt = Adam(model, lr=1e-2)
    buf = D.GradientBuffer(model)
    w = D.shard_weight(B, comm.rank, comm.size)
    state = None
    losses = []
    for _ in range(steps):
        x, y, new_epoch = batcher.next_batch()  # (b, T)
        if new_epoch:
            state = None
        opt.zero_grad()
        logits, state = model.forward(dev.asarray(x), state)  # (b, T, V)
        loss, dlogits = xrnn.softmax_cross_entropy(logits, dev.asarray(y))
        model.backward(dlogits)
        (global_loss,) = buf.reduce(comm, w, extras=[loss])
        clip_grad_norm(model, 0.5)
        opt.step()
        losses.append(float(global_loss))
    D.check_replicas(model, comm, "after training")
    weights = {k: xrnn.to_numpy(v) for k, v in model.parameters().items()}
    np.savez(os.path.join(out, f"train-{tag}-n{comm.size}-rank{comm.rank}.npz"),
             losses=np.array(losses), rng=np.array(json.dumps(model.rng.bit_generator.state)), **weights)


def nccl(out: str) -> None:
    """NCCLComm on CuPy (needs a GPU per rank): allreduce, broadcast, gradient reduction."""
    comm, dev = D.init_distributed("cuda", backend="nccl")
    r = comm.rank
    x = dev.asarray(np.arange(4.0) * (r + 1), "float32")  # (4,)
    y = comm.allreduce_sum(x)
    res = {"backend": comm.backend, "device": dev.name, "same": y is x, "sum": xrnn.to_numpy(y).tolist(),
           "bcast": xrnn.to_numpy(comm.broadcast(dev.asarray(np.full(2, r + 1.0), "float32"))).tolist()}
    model = xrnn.CharLM(5, 4, 1, "gru", device=dev, dtype="float32", seed=r)
    D.broadcast_parameters(model, comm)
    D.check_replicas(model, comm)
    with open(os.path.join(out, f"nccl-rank{r}.json"), "w") as f:
        json.dump(res, f)


def trainer_signal(out: str) -> None:
    """Trainer(distributed=True): rank 1 alone gets SIGTERM after step 3; every rank must stop after step 4."""
    import signal as _signal

    from xrnn.train import Trainer

    class Signalled(Trainer):
        def train_step(self):
            loss = super().train_step()
            if self.step == 3 and self.communicator.rank == 1:
                os.kill(os.getpid(), _signal.SIGTERM)
            return loss

    comm, dev = D.init_distributed("cpu")
    text = xrnn.default_corpus_path().read_text(encoding="utf-8")[:5000]
    corpus = xrnn.data.Corpus.from_text(text)
    model = xrnn.CharLM(len(corpus.vocab), 8, 1, "gru", device=dev, seed=3, vocab=corpus.vocab)
    t = Signalled(model, corpus, batch_size=4, seq_len=8, out_dir=out, progress=False, eval_every=0,
                  sample_every=0, save_every=0, distributed=True)
    t.fit(50)
    with open(os.path.join(out, f"signal-rank{comm.rank}.json"), "w") as f:
        json.dump({"step": t.step, "interrupted": t.interrupted, "main": t.is_main_process}, f)


def train(out: str) -> None:
    comm, dev = D.init_distributed("cpu")
    _train_once(comm, dev, B=4, T=8, steps=6, tag="even", out=out)
    _train_once(comm, dev, B=3, T=8, steps=6, tag="uneven", out=out)


if __name__ == "__main__":
    scenario, out_dir = sys.argv[1], sys.argv[2]
    {"collectives": collectives, "stuck": stuck, "crash": crash, "train": train, "nccl": nccl,
     "trainer_signal": trainer_signal}[scenario](out_dir)
