"""Where the time of one LSTM training step goes, piece by piece (the profile behind the fast path).

    python benchmarks/profile_step.py                  # medium LSTM, 2 threads, wall clock
    python benchmarks/profile_step.py --threads 1 --cpu-time --shape 50,50,128,128

Times, per training step of one LSTM layer (T, B, I, H): the input projection
``X @ W_ih^T``, the T recurrent products forward and backward alone, the
forward and backward scans of the portable and the NumPy fast path (their
difference from the products alone is the element-wise gate math and its
temporaries), the weight-gradient products, and the whole layer's forward and
backward. ``--cpu-time`` uses the process's CPU time, which with one thread
is robust against other processes on a shared machine.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _setup  # noqa: E402  (standard library only)

_setup.pin_threads()
_setup.use_this_checkout()

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import xrnn  # noqa: E402
from xrnn.kernels import PORTABLE, numpy_fast, use_fast_paths  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="2")
    p.add_argument("--shape", default="100,64,128,512", help="T,B,I,H (default: the medium shape)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cpu-time", action="store_true", help="process CPU time instead of wall clock")
    args = p.parse_args()
    T, B, I, H = (int(v) for v in args.shape.split(","))
    clock = time.process_time if args.cpu_time else time.perf_counter
    xp = xrnn.resolve_device("cpu").xp
    rng = np.random.default_rng(0)
    f32 = np.float32
    X = rng.standard_normal((T * B, I), dtype=f32)
    W_ih = rng.uniform(-0.04, 0.04, (4 * H, I)).astype(f32)
    W_hh = rng.uniform(-0.04, 0.04, (4 * H, H)).astype(f32)
    h0 = np.zeros((B, H), f32)
    dY = rng.standard_normal((T, B, H), dtype=f32)
    A0 = (X @ W_ih.T).reshape(T, B, 4 * H)

    def timed(fn, setup=None):
        out = []
        for _ in range(args.repeats + 1):
            if setup is not None:
                setup()
            t0 = clock()
            fn()
            out.append(clock() - t0)
        return min(out[1:]) * 1e3  # the least disturbed run

    rows = []
    hw = np.empty((B, 4 * H), f32)
    dh = np.empty((B, H), f32)
    rows.append(("input projection X @ W_ih^T (fresh array)", timed(lambda: X @ W_ih.T)))
    rows.append(("forward recurrent products alone (T x h @ W_hh^T)",
                 timed(lambda: [np.matmul(h0, W_hh.T, out=hw) for _ in range(T)])))
    rows.append(("backward recurrent products alone (T x dz @ W_hh)",
                 timed(lambda: [np.matmul(hw, W_hh, out=dh) for _ in range(T)])))
    A = A0.copy()
    Y, C = np.empty((T, B, H), f32), np.empty((T, B, H), f32)

    def reset():
        A[...] = A0

    for name, impl in (("portable", PORTABLE), ("fast", numpy_fast.SCANS)):
        rows.append((f"lstm_scan, {name}",
                     timed(lambda: impl.lstm_scan(xp, A, W_hh, h0, h0, Y, slice(0, H), C, False), reset)))

        def fwd_then_bwd(impl=impl):
            impl.lstm_scan(xp, A, W_hh, h0, h0, Y, slice(0, H), C, False)

        def bwd(impl=impl):
            impl.lstm_scan_backward(xp, A, C, h0, W_hh, dY, slice(0, H), None, None, False)

        rows.append((f"lstm_scan_backward, {name}", timed(bwd, lambda: (reset(), fwd_then_bwd()))))
    Z = A.reshape(T * B, 4 * H)
    Hp = Y.reshape(T * B, H)
    rows.append(("dW_ih = Z^T @ X", timed(lambda: Z.T @ X)))
    rows.append(("dW_hh = Z^T @ H_prev", timed(lambda: Z.T @ Hp)))
    rows.append(("bias gradient sum(Z, axis=0)", timed(lambda: np.sum(Z, axis=0))))
    rows.append(("dX = Z @ W_ih (not needed for data inputs)", timed(lambda: Z @ W_ih)))
    m = xrnn.LSTM(I, H, seed=0)
    x = m.device.asarray(X.reshape(T, B, I), "float32")
    for fast in (False, True):
        def step():
            with use_fast_paths(fast):
                out, _ = m(x)
                m.backward(dY, input_grad=False)
        rows.append((f"whole layer forward + backward, {'fast' if fast else 'portable'}", timed(step)))
    print(f"LSTM T={T} B={B} I={I} H={H}, {args.threads} threads, "
          f"{'CPU time' if args.cpu_time else 'wall clock'}, best of {args.repeats}")
    for name, ms in rows:
        print(f"  {name:55s} {ms:9.2f} ms")


if __name__ == "__main__":
    main()
