"""NumPy inference step for sampling: one token through a :class:`xrnn.models.CharLM`.

Sampling runs the model one token at a time. Through ``CharLM.forward`` a
step of a 2-layer LSTM of 128 units at batch 1 spends most of its time in
Python (argument checks, context managers, cache bookkeeping, reshapes, a
one-hot matrix and its product) and in a dozen small temporaries, not in
arithmetic. :class:`Stepper` does the same arithmetic with:

* the weights prepared once per sampling call: for the LSTM the rows of
  ``[W_ih | W_hh]`` are concatenated into one pre-transposed, contiguous
  ``(I + H, 4H)`` matrix per layer (one BLAS call per layer and step, on
  ``[x, h]``), and the input weights of a one-hot first layer become a
  ``(V, 4H)`` table with the biases added (a row lookup instead of a
  product);
* the sigmoid gates as ``0.5 * tanh(0.5 x) + 0.5``, with the factor 0.5
  folded into the weight rows of i, f, o (exact: a power of two), so one
  ``tanh`` pass activates all four LSTM gates;
* every intermediate in a buffer allocated once (``out=``, in place): no
  array is created per step except the logits handed back;
* a float32 LSTM with the fused C kernels (:mod:`xrnn.kernels.native`) activates
  the gates and updates ``c`` and ``h`` in one call per layer and step (the
  weights then keep their scale).

It keeps its own state and reads the weights when it is built: build a new one
for each sampling call (:func:`stepper_for`). It applies only where it is
exactly the model's arithmetic up to float rounding: a CharLM on NumPy whose
recurrent layer is unidirectional without extra options (no projection);
:func:`stepper_for` returns None otherwise and the caller uses the model's
forward. ``tests/test_kernels.py`` checks it against ``CharLM.forward``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["Stepper", "stepper_for", "draw"]


def draw(logits: np.ndarray, u: np.ndarray | None, t: float, k: int | None, p: float | None,
         greedy: bool) -> np.ndarray:
    """:func:`xrnn.sampling.draw` for NumPy logits (B, V) and uniforms u (B,), with the options
    already checked (``sampling.check_sampling_options``): the same NumPy operations in the same
    order, called directly instead of through array_api_compat's namespace and the draw's
    checks, so the same ids (``tests/test_sampling.py``). A character model's step spent 81 us in
    the portable draw against 19 us here (B = 1, V = 65; more than the model's step itself), and
    ``xrnn sample`` then never imports the Array API namespace (its start-up). Returns (B,) int64."""
    if greedy:
        return np.argmax(logits, axis=-1).astype(np.int64)  # (B,)
    B, V = logits.shape
    z = logits
    if z.dtype == np.float16:
        z = z.astype(np.float32)
    if t != 1.0:
        z = z / t  # (B, V)
    if k is not None and k < V:
        kth = np.flip(np.sort(z, axis=-1, kind="stable"), axis=-1)[:, k - 1:k]  # (B, 1)
        z = np.where(z >= kth, z, -math.inf)
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)  # (B, V), 0 where masked
    if p is not None and p < 1.0:
        prob = e / np.sum(e, axis=-1, keepdims=True)  # (B, V)
        ps = np.flip(np.sort(prob, axis=-1, kind="stable"), axis=-1)  # (B, V) descending
        c = np.cumsum(ps, axis=-1)  # (B, V)
        before = np.concatenate([np.zeros((B, 1), dtype=c.dtype), c], axis=-1)[:, 0:V]  # (B, V) mass before
        slack = 16.0 * float(np.finfo(ps.dtype).eps)
        smallest = np.min(np.where(before < p - slack, ps, math.inf), axis=-1, keepdims=True)  # (B, 1)
        e = np.where(prob >= smallest, e, 0.0)
    assert u is not None, "u: (B,) uniforms, unless greedy"
    cdf = np.cumsum(e, axis=-1)  # (B, V), unnormalized
    threshold = u.astype(cdf.dtype)[:, None] * cdf[:, V - 1:V]  # (B, 1)
    idx = np.sum((cdf <= threshold).astype(np.int64), axis=-1)  # (B,)
    last = np.sum((cdf < cdf[:, V - 1:V]).astype(np.int64), axis=-1)  # (B,) the last token of nonzero weight
    return np.minimum(idx, last)  # (B,)


def stepper_for(model: Any, batch: int, state: Any = None) -> Stepper | None:
    """A :class:`Stepper` for ``model`` at batch size ``batch``, starting from ``state``
    (the state ``model.forward`` returned, or None for zeros); None when the fast step
    does not apply (another backend, another model, bidirectional or projected layers,
    fast paths turned off)."""
    from . import fast_paths_enabled

    if not fast_paths_enabled():
        return None
    dev = getattr(model, "device", None)
    if dev is None or getattr(dev, "library", None) != "numpy":
        return None
    rnn = getattr(model, "rnn", None)
    head = getattr(model, "head", None)
    if rnn is None or head is None or not hasattr(model, "vocab_size"):
        return None
    if getattr(rnn, "bidirectional", True) or getattr(rnn, "_mode", None) not in ("LSTM", "GRU", "RNN"):
        return None
    if getattr(rnn, "proj_size", 0) or getattr(rnn, "batch_first", False):
        return None
    if type(model).__name__ != "CharLM":
        return None
    return Stepper(model, batch, state)


class Stepper:
    """One token per call through a CharLM on NumPy; see the module docstring.

    Args:
        model: a :class:`xrnn.models.CharLM` on a NumPy device (weights are
            read now; later changes to the model are not seen).
        batch: B, the number of sequences.
        state: the model's state for B sequences (``h`` or ``(h, c)``,
            each (L, B, H)) or None for zeros.

    Calling it with ``ids`` (B,) integer token ids in ``[0, V)`` returns the
    next-token logits (B, V) in the model's dtype (a fresh array) and advances
    the state; :meth:`state` returns it in the model's format.
    """

    def __init__(self, model: Any, batch: int, state: Any = None):
        rnn = model.rnn
        self.mode = rnn._mode
        self.relu = self.mode == "RNN" and rnn.nonlinearity == "relu"
        L, H, B = rnn.num_layers, rnn.hidden_size, int(batch)
        self.L, self.H, self.B = L, H, B
        dt = np.dtype(model.dtype)
        G = rnn._gates
        p = rnn._params
        emb = getattr(model, "embedding", None) if getattr(model, "embedding_dim", None) is not None else None
        self.emb: np.ndarray | None = None if emb is None else np.asarray(emb._params["weight"])  # (V, E)
        one_hot = self.emb is None
        # float32 LSTM with the fused C kernels (xrnn.kernels.native): one call per layer and step
        # activates the gates and updates c and h; else rows of i, f, o are scaled by 0.5 so that
        # one tanh gives tanh(x / 2) for them
        from . import native

        self.nat = native.kernels() if self.mode == "LSTM" and dt == np.float32 else None
        scale = None
        if self.mode == "LSTM" and self.nat is None:
            scale = np.full((4 * H,), 0.5, dtype=dt)
            scale[2 * H:3 * H] = 1.0
        self.table: np.ndarray | None = None  # (V, GH) one-hot first layer: W_ih^T rows plus the input biases
        self.W: list[Any] = []  # per layer: (I_l + H, GH) [W_ih | W_hh]^T, or GRU: ((I_l, 3H), (H, 3H))
        self.bias: list[Any] = []  # per layer: (GH,) or None (RNN/LSTM: b_ih + b_hh; GRU: (b_ih, b_hh))
        for layer in range(L):
            w_ih, w_hh, b_ih, b_hh = rnn._param_names(layer, 0)
            Wi = np.asarray(p[w_ih])  # (GH, I_l)
            Wh = np.asarray(p[w_hh])  # (GH, H)
            bi = np.asarray(p[b_ih]) if rnn.bias else None  # (GH,)
            bh = np.asarray(p[b_hh]) if rnn.bias else None
            if self.mode == "GRU":
                first_table = layer == 0 and one_hot
                bias_in = bi
                if first_table:
                    self.table = np.ascontiguousarray(Wi.T) if bi is None else np.ascontiguousarray(Wi.T + bi)
                    bias_in = None
                self.W.append((None if first_table else np.ascontiguousarray(Wi.T), np.ascontiguousarray(Wh.T)))
                self.bias.append((bias_in, bh))
                continue
            b = None if bi is None else (bi + bh)  # (GH,)
            if scale is not None:
                Wi, Wh = Wi * scale[:, None], Wh * scale[:, None]
                b = None if b is None else b * scale
            if layer == 0 and one_hot:
                self.table = np.ascontiguousarray(Wi.T) if b is None else np.ascontiguousarray(Wi.T + b)
                self.W.append(np.ascontiguousarray(Wh.T))  # (H, GH)
                self.bias.append(None)
            else:
                self.W.append(np.ascontiguousarray(np.concatenate([Wi, Wh], axis=1).T))  # (I_l + H, GH)
                self.bias.append(b)
        hp = model.head._params
        self.Wo = np.ascontiguousarray(np.asarray(hp["weight"]).T)  # (H, V)
        self.bo = np.asarray(hp["bias"]) if "bias" in hp else None  # (V,)
        # buffers: xh[l] = [x_l, h_l] (B, I_l + H); the top h is xh[L-1][:, -H:]
        in0 = 0 if self.emb is None else self.emb.shape[1]  # one-hot: no input columns
        self.xh = [np.zeros((B, (in0 if layer == 0 else H) + H), dtype=dt) for layer in range(L)]
        self.c: list[np.ndarray] | None = (
            [np.zeros((B, H), dtype=dt) for _ in range(L)] if self.mode == "LSTM" else None)  # (B, H) each
        self.a = np.empty((B, G * H), dtype=dt)  # (B, GH) gate pre-activations
        self.gh: np.ndarray | None = np.empty((B, G * H), dtype=dt) if self.mode == "GRU" else None  # (B, 3H)
        self.tmp = np.empty((B, H), dtype=dt)
        if self.nat is not None:
            # the product runs in the kernels' packed form ([x, h] @ [W_ih | W_hh]^T, split over threads),
            # and the kernel adds a second (B, 4H) term: the layer's bias rows, or for a one-hot first
            # layer the gathered table rows (the input's product plus the biases); c moves between two
            # buffers
            from .numpy_fast import pack_weight

            self.threads = self.nat.scan_threads()
            self.P = [pack_weight(self.nat, W.T) for W in self.W]  # (GH, K) each, packed
            self.add = [np.zeros((B, G * H), dtype=dt) if b is None else np.repeat(b[None, :], B, axis=0)
                        for b in self.bias]  # (B, GH) per layer
            self.c_next = [np.zeros((B, H), dtype=dt) for _ in range(L)]
            # the kernels' addresses, read once: per layer the product's operand (h alone for a one-hot
            # first layer) with its row stride and K, (c, c_next) (swapped with the arrays each step) and
            # (h, its row stride) inside xh
            assert self.c is not None  # LSTM
            self._px = [((xh[:, -H:] if (layer == 0 and one_hot) else xh).ctypes.data, xh.strides[0] // xh.itemsize,
                         self.W[layer].shape[0]) for layer, xh in enumerate(self.xh)]
            self._pP = [P.ctypes.data for P in self.P]
            self._padd = [a_.ctypes.data for a_ in self.add]
            self._pc = [(c.ctypes.data, cn.ctypes.data) for c, cn in zip(self.c, self.c_next)]
            self._ph = [(xh[:, -H:].ctypes.data, xh.strides[0] // xh.itemsize) for xh in self.xh]
            self._pa = self.a.ctypes.data
        if state is not None:
            h, c = (state if self.mode == "LSTM" else (state, None))
            h = np.asarray(h)  # (L, B, H)
            for layer in range(L):
                self.xh[layer][:, -H:] = h[layer]
                if c is not None and self.c is not None:  # both exactly when LSTM
                    self.c[layer][...] = np.asarray(c)[layer]

    def state(self) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The current state in the model's format: ``h`` or ``(h, c)``, each (L, B, H) (copies)."""
        h = np.stack([xh[:, -self.H:] for xh in self.xh], axis=0)  # (L, B, H)
        return (h, np.stack(self.c, axis=0)) if self.c is not None else h  # self.c exactly when LSTM

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """ids (B,) integer -> logits (B, V) for the next token; advances the state."""
        H, L = self.H, self.L
        a, tmp = self.a, self.tmp
        mode = self.mode
        with np.errstate(over="ignore", under="ignore"):
            for layer in range(L):
                xh = self.xh[layer]
                if layer == 0 and self.emb is not None:
                    np.take(self.emb, ids, axis=0, out=xh[:, :-H])  # (B, E)
                h = xh[:, -H:]  # (B, H) view: this layer's state, overwritten below
                if mode == "GRU":
                    self._gru(layer, ids, xh, h)
                elif self.nat is not None:  # float32 LSTM on the kernels
                    assert self.c is not None  # LSTM
                    px, ldx, K = self._px[layer]
                    self.nat.gemm_packed_threads(self.B, 4 * H, K, px, ldx, self._pP[layer], self._pa, 4 * H,
                                                 self.threads)  # (B, 4H) [x, h] @ W^T
                    if layer == 0 and self.table is not None:
                        np.take(self.table, ids, axis=0, out=self.add[0])  # (B, 4H) input rows plus biases
                    pc, pcn = self._pc[layer]
                    self.nat.lstm_step(self.B, H, self._pa, 4 * H, self._padd[layer], 4 * H, pc, H, pcn, H,
                                       *self._ph[layer])  # h written in place in xh
                    self.c[layer], self.c_next[layer] = self.c_next[layer], self.c[layer]
                    self._pc[layer] = (pcn, pc)
                else:
                    if layer == 0 and self.table is not None:
                        np.matmul(h, self.W[0], out=a)  # (B, GH)
                        a += self.table[ids]
                    else:
                        np.matmul(xh, self.W[layer], out=a)  # (B, GH)
                        if self.bias[layer] is not None:
                            a += self.bias[layer]
                    if mode == "LSTM":
                        np.tanh(a, out=a)  # i, f, o: tanh(x/2); g: tanh(x)
                        ifo = a[:, 0:2 * H], a[:, 3 * H:4 * H]
                        for part in ifo:  # sigmoid(x) = 0.5 tanh(x/2) + 0.5
                            part *= 0.5
                            part += 0.5
                        assert self.c is not None  # LSTM
                        c = self.c[layer]
                        c *= a[:, H:2 * H]  # f * c
                        np.multiply(a[:, 0:H], a[:, 2 * H:3 * H], out=tmp)  # i * g
                        c += tmp
                        np.tanh(c, out=tmp)
                        np.multiply(a[:, 3 * H:4 * H], tmp, out=h)  # h = o * tanh(c)
                    elif self.relu:
                        np.maximum(a, 0.0, out=h)
                    else:
                        np.tanh(a, out=h)
                if layer + 1 < L:
                    self.xh[layer + 1][:, :H] = h  # the next layer's input
            top = self.xh[L - 1][:, -H:]  # (B, H)
            logits = top @ self.Wo  # (B, V)
            if self.bo is not None:
                logits += self.bo
        return logits

    def _gru(self, layer, ids, xh, h):
        """r, z = sigmoid(x W_i^T + b_i + h W_h^T + b_h); n = tanh(x W_in^T + b_in + r (h W_hn^T + b_hn));
        h = n + z (h_prev - n)."""
        H = self.H
        a, gh, tmp = self.a, self.gh, self.tmp
        Wi, Wh = self.W[layer]
        bi, bh = self.bias[layer]
        assert gh is not None  # GRU
        if Wi is None:
            assert self.table is not None  # a one-hot first layer
            np.take(self.table, ids, axis=0, out=a)  # (B, 3H), b_ih included
        else:
            np.matmul(xh[:, :-H], Wi, out=a)
            if bi is not None:
                a += bi
        np.matmul(h, Wh, out=gh)  # (B, 3H)
        if bh is not None:
            gh += bh
        rz = a[:, 0:2 * H]
        rz += gh[:, 0:2 * H]
        rz *= 0.5
        np.tanh(rz, out=rz)
        rz *= 0.5
        rz += 0.5  # sigmoid
        n = a[:, 2 * H:3 * H]
        np.multiply(a[:, 0:H], gh[:, 2 * H:3 * H], out=tmp)  # r * (W_hn h + b_hn)
        n += tmp
        np.tanh(n, out=n)
        np.subtract(h, n, out=tmp)
        tmp *= a[:, H:2 * H]
        np.add(n, tmp, out=h)
