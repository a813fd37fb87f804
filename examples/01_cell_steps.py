"""One Elman RNN step and one LSTM step, as in the NumPy notebooks, reproduced with xrnn cells.

Retraces the "RNN step by step" NumPy notebooks: a single time step written out
with NumPy on fixed, hand-picked numbers, forward and backward, next to the
same step computed by :class:`xrnn.RNNCell` and :class:`xrnn.LSTMCell`. The
two columns agree to the last printed digit (float64).

The notebooks use row vectors, ``h = tanh(x Wx + h_prev Wh + b)`` with ``Wx``
of shape (I, H); xrnn keeps PyTorch's layout, ``weight_ih`` (H, I) =
``Wx.T``, and splits the bias into ``bias_ih + bias_hh``. For the LSTM the
notebook multiplies the concatenation ``[h_prev, x]`` by one (H+I, H) matrix
per gate; xrnn stacks the gates (i, f, g, o) into ``weight_ih`` (4H, I) and
``weight_hh`` (4H, H). :func:`load_notebook_rnn` and
:func:`load_notebook_lstm` show the mapping; the gradients map back the same
way (``weight_ih`` grad = ``dWx.T``).

Run::

    python examples/01_cell_steps.py                 # NumPy on the CPU
    python examples/01_cell_steps.py --device cuda   # the same numbers on a GPU
"""

from __future__ import annotations

import argparse

import numpy as np

import xrnn

# ---------------------------------------------------------------------------
# the fixed numbers (row-vector convention of the notebooks)
# ---------------------------------------------------------------------------

# Elman RNN: I = H = 3
RNN_WX = np.array([[0.1, -0.2, 0.3],
                   [0.4, 0.0, -0.1],
                   [-0.3, 0.2, 0.5]])  # (I, H)
RNN_WH = np.array([[0.2, -0.4, 0.1],
                   [0.0, 0.3, -0.2],
                   [-0.1, 0.5, 0.4]])  # (H, H)
RNN_B = np.array([0.0, 0.1, -0.05])  # (H,)
RNN_X = np.array([0.2, -0.1, 0.4])  # (I,)
RNN_H_PREV = np.array([0.05, 0.1, -0.2])  # (H,)
RNN_DH = np.array([1.0, -0.5, 0.25])  # (H,) gradient of the loss w.r.t. the new h
#: tanh(x Wx + h_prev Wh + b), worked out by hand
RNN_EXPECTED_H = np.array([-0.109558, 0.049958, 0.124353])

# LSTM: I = 3, H = 2; one (H + I, H) matrix per gate acting on [h_prev, x]
LSTM_W = {
    "i": np.array([[0.1, -0.3], [0.2, 0.4], [-0.5, 0.1], [0.3, 0.2], [0.0, -0.1]]),
    "f": np.array([[0.2, 0.1], [-0.1, 0.3], [0.4, -0.2], [0.1, 0.5], [-0.3, 0.2]]),
    "g": np.array([[-0.2, 0.5], [0.3, -0.1], [0.1, 0.2], [-0.4, 0.3], [0.2, 0.1]]),
    "o": np.array([[0.3, 0.0], [0.1, -0.2], [-0.2, 0.4], [0.5, 0.1], [0.1, 0.3]]),
}  # (H + I, H) each
LSTM_B = {"i": np.array([0.0, 0.1]), "f": np.array([1.0, 1.0]),  # forget bias 1, as char-rnn and Keras
          "g": np.array([0.05, -0.05]), "o": np.array([0.1, 0.0])}  # (H,) each
LSTM_X = np.array([0.5, -0.2, 0.1])  # (I,)
LSTM_H_PREV = np.array([0.1, -0.3])  # (H,)
LSTM_C_PREV = np.array([0.2, 0.4])  # (H,)
LSTM_DH = np.array([0.5, -1.0])  # (H,) gradient w.r.t. the new h
LSTM_DC = np.array([0.1, 0.2])  # (H,) gradient w.r.t. the new c (from the next step)
GATES = ("i", "f", "g", "o")  # PyTorch's (and xrnn's) order inside weight_ih / weight_hh


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


# ---------------------------------------------------------------------------
# the notebook computations, plain NumPy
# ---------------------------------------------------------------------------

def notebook_rnn_step(x, h_prev, Wx, Wh, b):
    """Forward: ``h = tanh(x Wx + h_prev Wh + b)``; returns h and the cache for backward."""
    h = np.tanh(x @ Wx + h_prev @ Wh + b)  # (H,)
    return h, (x, h_prev, h)


def notebook_rnn_step_backward(dh, cache, Wx, Wh):
    """Backward of one step: gradients of every input and parameter."""
    x, h_prev, h = cache
    dz = dh * (1.0 - h * h)  # (H,) through tanh
    return {
        "dx": dz @ Wx.T,  # (I,)
        "dh_prev": dz @ Wh.T,  # (H,)
        "dWx": np.outer(x, dz),  # (I, H)
        "dWh": np.outer(h_prev, dz),  # (H, H)
        "db": dz,  # (H,)
    }


def notebook_lstm_step(x, h_prev, c_prev, W, b):
    """Forward: gates from ``[h_prev, x]``, then ``c = f c_prev + i g``, ``h = o tanh(c)``."""
    concat = np.concatenate([h_prev, x])  # (H + I,)
    i = sigmoid(concat @ W["i"] + b["i"])  # (H,) input gate
    f = sigmoid(concat @ W["f"] + b["f"])  # (H,) forget gate
    g = np.tanh(concat @ W["g"] + b["g"])  # (H,) candidate cell
    o = sigmoid(concat @ W["o"] + b["o"])  # (H,) output gate
    c = f * c_prev + i * g  # (H,)
    h = o * np.tanh(c)  # (H,)
    return h, c, (concat, c_prev, i, f, g, o, c)


def notebook_lstm_step_backward(dh, dc_next, cache, W):
    """Backward of one LSTM step, gate by gate."""
    concat, c_prev, i, f, g, o, c = cache
    H = c.shape[0]
    tc = np.tanh(c)  # (H,)
    dc = dc_next + dh * o * (1.0 - tc * tc)  # (H,) total gradient reaching c
    dz = {
        "i": dc * g * i * (1.0 - i),  # (H,) pre-activation gradients
        "f": dc * c_prev * f * (1.0 - f),
        "g": dc * i * (1.0 - g * g),
        "o": dh * tc * o * (1.0 - o),
    }
    dconcat = sum(dz[k] @ W[k].T for k in GATES)  # (H + I,)
    out = {"dh_prev": dconcat[:H], "dx": dconcat[H:], "dc_prev": dc * f}
    for k in GATES:
        out["dW" + k] = np.outer(concat, dz[k])  # (H + I, H)
        out["db" + k] = dz[k]  # (H,)
    return out


# ---------------------------------------------------------------------------
# notebook weights -> xrnn (PyTorch layout)
# ---------------------------------------------------------------------------

def load_notebook_rnn(cell, Wx, Wh, b):
    """Put row-vector weights into an RNNCell: weight_ih = Wx.T, weight_hh = Wh.T, bias_ih = b, bias_hh = 0."""
    cell.load_state_dict({"weight_ih": Wx.T, "weight_hh": Wh.T, "bias_ih": b, "bias_hh": np.zeros_like(b)})
    return cell


def load_notebook_lstm(cell, W, b):
    """Stack the per-gate matrices: rows k*H..(k+1)*H of weight_ih are gate k's x-part, transposed."""
    H = cell.hidden_size
    weight_ih = np.concatenate([W[k][H:, :].T for k in GATES], axis=0)  # (4H, I)
    weight_hh = np.concatenate([W[k][:H, :].T for k in GATES], axis=0)  # (4H, H)
    bias_ih = np.concatenate([b[k] for k in GATES])  # (4H,)
    cell.load_state_dict({"weight_ih": weight_ih, "weight_hh": weight_hh,
                          "bias_ih": bias_ih, "bias_hh": np.zeros_like(bias_ih)})
    return cell


# ---------------------------------------------------------------------------
# printing
# ---------------------------------------------------------------------------

def fmt(a) -> str:
    """A vector or matrix as fixed 6-decimal numbers (rows separated by ' | ')."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        return " ".join(f"{v:9.6f}" for v in a)
    return " | ".join(fmt(row) for row in a)


def show(name: str, ref, got) -> float:
    """Print the notebook value and the xrnn value one above the other; return their max |difference|."""
    ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    diff = float(np.max(np.abs(ref - got)))
    print(f"  {name:<10} numpy {fmt(ref)}")
    print(f"  {'':<10} xrnn  {fmt(got)}   max|diff| {diff:.1e}")
    return diff


# ---------------------------------------------------------------------------
# the two steps
# ---------------------------------------------------------------------------

def rnn_step(device, dtype) -> dict:
    cell = load_notebook_rnn(xrnn.RNNCell(3, 3, device=device, dtype=dtype, seed=0), RNN_WX, RNN_WH, RNN_B)
    h_ref, cache = notebook_rnn_step(RNN_X, RNN_H_PREV, RNN_WX, RNN_WH, RNN_B)
    ref = notebook_rnn_step_backward(RNN_DH, cache, RNN_WX, RNN_WH)

    dev = cell.device
    h = cell(dev.asarray(RNN_X, dtype=dtype), dev.asarray(RNN_H_PREV, dtype=dtype))  # (H,)
    dx, dh_prev = cell.backward(dev.asarray(RNN_DH, dtype=dtype))  # (I,), (H,)
    g = {k: xrnn.to_numpy(v) for k, v in cell.grads.items()}
    got = {"dx": xrnn.to_numpy(dx), "dh_prev": xrnn.to_numpy(dh_prev),
           "dWx": g["weight_ih"].T, "dWh": g["weight_hh"].T, "db": g["bias_ih"]}

    print("Elman RNN step  h = tanh(x Wx + h_prev Wh + b)   [I = H = 3]")
    diffs = {"h": show("h", h_ref, xrnn.to_numpy(h))}
    print(f"  backward with dL/dh = {fmt(RNN_DH)}")
    for k in ("dx", "dh_prev", "dWx", "dWh", "db"):
        diffs[k] = show(k, ref[k], got[k])
    return {"h": xrnn.to_numpy(h), "h_numpy": h_ref, "grads": got, "grads_numpy": ref, "max_diff": max(diffs.values())}


def lstm_step(device, dtype) -> dict:
    cell = load_notebook_lstm(xrnn.LSTMCell(3, 2, device=device, dtype=dtype, seed=0), LSTM_W, LSTM_B)
    h_ref, c_ref, cache = notebook_lstm_step(LSTM_X, LSTM_H_PREV, LSTM_C_PREV, LSTM_W, LSTM_B)
    ref = notebook_lstm_step_backward(LSTM_DH, LSTM_DC, cache, LSTM_W)

    dev = cell.device
    put = lambda a: dev.asarray(a, dtype=dtype)  # noqa: E731
    h, c = cell(put(LSTM_X), (put(LSTM_H_PREV), put(LSTM_C_PREV)))  # (H,), (H,)
    dx, (dh_prev, dc_prev) = cell.backward(put(LSTM_DH), put(LSTM_DC))
    g = {k: xrnn.to_numpy(v) for k, v in cell.grads.items()}
    H = cell.hidden_size
    got = {"dx": xrnn.to_numpy(dx), "dh_prev": xrnn.to_numpy(dh_prev), "dc_prev": xrnn.to_numpy(dc_prev)}
    for n, k in enumerate(GATES):
        rows = slice(n * H, (n + 1) * H)
        # back to the notebook's (H + I, H) per-gate layout: [weight_hh rows; weight_ih rows], transposed
        got["dW" + k] = np.concatenate([g["weight_hh"][rows, :].T, g["weight_ih"][rows, :].T], axis=0)
        got["db" + k] = g["bias_ih"][rows]

    print("LSTM step  [I = 3, H = 2; gates i, f, g, o from concat(h_prev, x)]")
    diffs = {"h": show("h", h_ref, xrnn.to_numpy(h)), "c": show("c", c_ref, xrnn.to_numpy(c))}
    print(f"  backward with dL/dh = {fmt(LSTM_DH)}, dL/dc = {fmt(LSTM_DC)}")
    for k in ["dx", "dh_prev", "dc_prev"] + ["dW" + k for k in GATES] + ["db" + k for k in GATES]:
        diffs[k] = show(k, ref[k], got[k])
    return {"h": xrnn.to_numpy(h), "c": xrnn.to_numpy(c), "h_numpy": h_ref, "c_numpy": c_ref,
            "grads": got, "grads_numpy": ref, "max_diff": max(diffs.values())}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu",
                   help='where the xrnn cells run: "cpu", "cuda", "torch:cpu", "auto" (a GPU if usable), ...')
    p.add_argument("--dtype", default="float64", help="float64 (default, agrees to ~1e-16) or float32")
    p.add_argument("--seed", type=int, default=0, help="unused: every number here is fixed (kept for uniformity)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Run both steps; returns ``{"rnn": {...}, "lstm": {...}}`` with the xrnn and NumPy values."""
    args = parse_args(argv)
    print(f"xrnn cells on {xrnn.resolve_device(args.device).name} ({args.dtype}) against the NumPy notebook formulas\n")
    rnn = rnn_step(args.device, args.dtype)
    print()
    lstm = lstm_step(args.device, args.dtype)
    print(f"\nlargest difference anywhere: {max(rnn['max_diff'], lstm['max_diff']):.1e}")
    return {"rnn": rnn, "lstm": lstm}


if __name__ == "__main__":
    main()
