"""One-step cells: the seed example, finite differences, torch, and tape BPTT."""

import numpy as np
import pytest

import xrnn
from xrnn.errors import ShapeError, StateError
from xrnn.gradcheck import numerical_gradient, parameter_gradients

from conftest import assert_on, put, to_np

CELLS = [xrnn.RNNCell, xrnn.LSTMCell, xrnn.GRUCell]


def test_seed_example_rnn_step(device):
    """The RNN-step example: tanh(x Wx + h Wh + b), with PyTorch's transposed layout."""
    Wx = np.array([[0.1, -0.2, 0.3], [0.4, 0.0, -0.1], [-0.3, 0.2, 0.5]])
    Wh = np.array([[0.2, -0.4, 0.1], [0.0, 0.3, -0.2], [-0.1, 0.5, 0.4]])
    b = np.array([0.0, 0.1, -0.05])
    cell = xrnn.RNNCell(3, 3, device=device, dtype="float64")
    # x @ Wx == x @ weight_ih.T  =>  weight_ih = Wx.T
    cell.load_state_dict({"weight_ih": Wx.T, "weight_hh": Wh.T, "bias_ih": b, "bias_hh": np.zeros(3)})
    h = cell(put(device, [0.2, -0.1, 0.4]), put(device, [0.05, 0.1, -0.2]))
    assert_on(device, h)
    np.testing.assert_allclose(to_np(h), [-0.109558, 0.049958, 0.124353], atol=5e-7)


def test_seed_example_lstm_step_by_hand(device):
    """An LSTM step checked against the notebook formulas written out in NumPy."""
    rng = np.random.default_rng(0)
    I, H = 3, 2
    W = rng.standard_normal((4 * H, I)) * 0.5
    U = rng.standard_normal((4 * H, H)) * 0.5
    b = rng.standard_normal(4 * H) * 0.1
    x, h, c = rng.standard_normal(I), rng.standard_normal(H), rng.standard_normal(H)
    z = W @ x + U @ h + b
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    i, f, g, o = sig(z[:H]), sig(z[H:2 * H]), np.tanh(z[2 * H:3 * H]), sig(z[3 * H:])
    c_ref = f * c + i * g
    h_ref = o * np.tanh(c_ref)
    cell = xrnn.LSTMCell(I, H, device=device, dtype="float64")
    cell.load_state_dict({"weight_ih": W, "weight_hh": U, "bias_ih": b, "bias_hh": np.zeros(4 * H)})
    h1, c1 = cell(put(device, x), (put(device, h), put(device, c)))
    np.testing.assert_allclose(to_np(h1), h_ref, rtol=1e-12)
    np.testing.assert_allclose(to_np(c1), c_ref, rtol=1e-12)


def _torch_cell(cell):
    torch = pytest.importorskip("torch")
    kind = {xrnn.RNNCell: torch.nn.RNNCell, xrnn.LSTMCell: torch.nn.LSTMCell, xrnn.GRUCell: torch.nn.GRUCell}
    kw = {"nonlinearity": cell.nonlinearity} if isinstance(cell, xrnn.RNNCell) else {}
    t = kind[type(cell)](cell.input_size, cell.hidden_size, bias=cell.bias, dtype=torch.float64, **kw)
    t.load_state_dict({k: torch.from_numpy(np.array(to_np(v))) for k, v in cell.state_dict().items()})
    return torch, t


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cls,kw", [(xrnn.RNNCell, {}), (xrnn.RNNCell, {"nonlinearity": "relu"}),
                                    (xrnn.LSTMCell, {}), (xrnn.GRUCell, {})],
                         ids=["RNNCell-tanh", "RNNCell-relu", "LSTMCell", "GRUCell"])
def test_cell_gradients_finite_differences_and_torch(device, cls, kw, bias, batched):
    I, H, B = 3, 2, 2
    cell = cls(I, H, bias=bias, device=device, dtype="float64", seed=1, **kw)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((B, I) if batched else (I,))
    sshape = (B, H) if batched else (H,)
    h0 = rng.standard_normal(sshape)
    c0 = rng.standard_normal(sshape)
    R, Q = rng.standard_normal(sshape), rng.standard_normal(sshape)
    lstm = cls is xrnn.LSTMCell

    def run(x=x, h0=h0, c0=c0):
        st = (put(device, h0), put(device, c0)) if lstm else put(device, h0)
        return cell(put(device, x), st)

    def loss(**kw):
        out = run(**kw)
        if lstm:
            return float(np.sum(to_np(out[0]) * R) + np.sum(to_np(out[1]) * Q))
        return float(np.sum(to_np(out) * R))

    run()
    cell.zero_grad()
    if lstm:
        dx, (dh0, dc0) = cell.backward(put(device, R), put(device, Q))
    else:
        dx, dh0 = cell.backward(put(device, R))
    grads = {k: to_np(v) for k, v in cell.grads.items()}
    cell.clear()

    tol = dict(rtol=1e-6, atol=1e-8)
    num = parameter_gradients(cell, loss)
    for k in grads:
        np.testing.assert_allclose(grads[k], num[k], err_msg=k, **tol)
    np.testing.assert_allclose(to_np(dx), numerical_gradient(lambda v: loss(x=v), x), **tol)
    np.testing.assert_allclose(to_np(dh0), numerical_gradient(lambda v: loss(h0=v), h0), **tol)
    if lstm:
        np.testing.assert_allclose(to_np(dc0), numerical_gradient(lambda v: loss(c0=v), c0), **tol)

    torch, t = _torch_cell(cell)
    xt = torch.tensor(x, requires_grad=True)
    ht = torch.tensor(h0, requires_grad=True)
    ct = torch.tensor(c0, requires_grad=True)
    if lstm:
        o = t(xt, (ht, ct))
        ((o[0] * torch.tensor(R)).sum() + (o[1] * torch.tensor(Q)).sum()).backward()
    else:
        o = t(xt, ht)
        (o * torch.tensor(R)).sum().backward()
    np.testing.assert_allclose(to_np(dx), xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_np(dh0), ht.grad.numpy(), rtol=1e-10, atol=1e-12)
    for k, p in t.named_parameters():
        np.testing.assert_allclose(grads[k], p.grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("cls,layer", [(xrnn.RNNCell, xrnn.RNN), (xrnn.LSTMCell, xrnn.LSTM), (xrnn.GRUCell, xrnn.GRU)])
def test_tape_bptt_with_cells_equals_layer(light_device, cls, layer):
    """T forwards then T backwards through a cell is BPTT: equal to the layer's."""
    dev = light_device
    T, B, I, H = 4, 2, 3, 5
    seq = layer(I, H, dtype="float64", seed=3, device=dev)
    cell = cls(I, H, dtype="float64", device=dev)
    cell.load_state_dict({k[:-3]: v for k, v in seq.state_dict().items()})  # weight_ih_l0 -> weight_ih
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, I))
    R = rng.standard_normal((T, B, H))
    out, _ = seq(put(dev, x))
    dx_seq, _ = seq.backward(put(dev, R))

    lstm = cls is xrnn.LSTMCell
    state = None
    outs = []
    for t in range(T):
        state = cell(put(dev, x[t]), state)
        outs.append(to_np(state[0] if lstm else state))
    np.testing.assert_allclose(np.stack(outs), to_np(out), rtol=1e-12, atol=1e-14)
    dh, dc = None, None
    dxs = []
    for t in reversed(range(T)):
        with dev:
            g = put(dev, R[t]) if dh is None else put(dev, R[t]) + dh
        if lstm:
            dxt, (dh, dc) = cell.backward(g, dc)
        else:
            dxt, dh = cell.backward(g)
        dxs.append(to_np(dxt))
    np.testing.assert_allclose(np.stack(dxs[::-1]), to_np(dx_seq), rtol=1e-10, atol=1e-12)
    for k, v in seq.grads.items():
        np.testing.assert_allclose(to_np(cell.grads[k[:-3]]), to_np(v), rtol=1e-10, atol=1e-12, err_msg=k)
    with pytest.raises(StateError, match="no forward step left"):
        cell.backward(put(dev, R[0]))


def test_cell_no_grad_and_clear_keep_nothing():
    cell = xrnn.GRUCell(2, 3, seed=0)
    with xrnn.no_grad():
        h = cell(np.ones((1, 2), np.float32))
    with pytest.raises(StateError):
        cell.backward(h)
    cell(np.ones((1, 2), np.float32))
    cell.clear()
    with pytest.raises(StateError):
        cell.backward(h)


def test_cell_shape_errors():
    cell = xrnn.LSTMCell(3, 4, seed=0)
    with pytest.raises(ShapeError, match=r"\(B, 3\)"):
        cell(np.ones((2, 5), np.float32))
    with pytest.raises(ShapeError, match=r"\(2, 4\)"):
        cell(np.ones((2, 3), np.float32), (np.zeros((3, 4), np.float32), np.zeros((2, 4), np.float32)))
    with pytest.raises(ShapeError, match="tuple"):
        cell(np.ones((2, 3), np.float32), np.zeros((2, 4), np.float32))
