"""RNN / LSTM / GRU layers: finite differences, PyTorch autograd, dropout, seeds.

Every option the issue names is covered: 1 and 2 layers, bidirectional,
batch_first, no bias, initial state given, gradient of the final state given,
length 1, batch 1 (and unbatched input), for every cell type and backend.
"""

import numpy as np
import pytest

import xrnn

from conftest import assert_on, put, to_np
from conftest import check_gradients as _check_gradients

CELLS = {
    "rnn_tanh": (xrnn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (xrnn.RNN, {"nonlinearity": "relu"}),
    "lstm": (xrnn.LSTM, {}),
    "gru": (xrnn.GRU, {}),
}

# (name, constructor options, T, B, give initial state, give final-state gradient, unbatched)
CONFIGS = [
    ("base", {}, 3, 2, False, False, False),
    ("two_layers", {"num_layers": 2}, 3, 2, True, True, False),
    ("bidirectional", {"bidirectional": True}, 3, 2, True, True, False),
    ("bidir_two_layers", {"bidirectional": True, "num_layers": 2}, 3, 2, False, True, False),
    ("batch_first", {"batch_first": True, "num_layers": 2}, 3, 2, True, False, False),
    ("no_bias", {"bias": False}, 3, 2, False, True, False),
    ("state_given", {}, 3, 2, True, False, False),
    ("final_grad_given", {}, 3, 2, False, True, False),
    ("length_1", {"num_layers": 2, "bidirectional": True}, 1, 2, True, True, False),
    ("batch_1", {"bidirectional": True}, 3, 1, True, True, False),
    ("unbatched", {"num_layers": 2, "bidirectional": True}, 3, None, True, True, True),
]

I, H = 2, 3


def _case(dev, cell, cfg, seed=0):
    cls, extra = CELLS[cell]
    name, opts, T, B, give_state, give_dstate, unbatched = cfg
    m = cls(I, H, dtype="float64", device=dev, seed=seed, **extra, **opts)
    rng = np.random.default_rng(seed + 1)
    LD = m.num_layers * m.num_directions
    if unbatched:
        x = rng.standard_normal((T, I))
        sshape = (LD, H)
    elif m.batch_first:
        x = rng.standard_normal((B, T, I))
        sshape = (LD, B, H)
    else:
        x = rng.standard_normal((T, B, I))
        sshape = (LD, B, H)
    state = None
    if give_state:
        h0 = rng.standard_normal(sshape)
        state = (h0, rng.standard_normal(sshape)) if cell == "lstm" else h0
    out_shape = x.shape[:-1] + (H * m.num_directions,)
    R = rng.standard_normal(out_shape)
    S = rng.standard_normal(sshape) if give_dstate else None
    Q = rng.standard_normal(sshape) if (give_dstate and cell == "lstm") else None
    return m, x, state, R, S, Q


def _to_dev_state(dev, state):
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(put(dev, s) for s in state)
    return put(dev, state)


def _loss(m, dev, x, state, R, S, Q):
    out, st = m(put(dev, x), _to_dev_state(dev, state))
    h = st[0] if isinstance(st, tuple) else st
    val = float(np.sum(to_np(out) * R))
    if S is not None:
        val += float(np.sum(to_np(h) * S))
    if Q is not None:
        val += float(np.sum(to_np(st[1]) * Q))
    return val


def _analytic(m, dev, x, state, R, S, Q):
    out, st = m(put(dev, x), _to_dev_state(dev, state))
    dstate = None
    if S is not None:
        dstate = (put(dev, S), None if Q is None else put(dev, Q)) if isinstance(st, tuple) else put(dev, S)
    m.zero_grad()
    dx, ds0 = m.backward(put(dev, R), dstate)
    assert_on(dev, out, dx)
    return out, st, dx, ds0


def check_gradients(dev, m, loss_at, analytic, inputs):
    """conftest's check; off NumPy three random directions per array (the element-wise proof of
    the math is the NumPy run; torch parity covers every backend too)."""
    _check_gradients(dev, m, loss_at, analytic, inputs, directions=3, seed=123)


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("cell", list(CELLS))
def test_finite_difference_gradients(device, cell, cfg):
    m, x, state, R, S, Q = _case(device, cell, cfg)
    _, _, dx, ds0 = _analytic(m, device, x, state, R, S, Q)
    analytic = {k: to_np(v) for k, v in m.grads.items()}
    analytic["x"] = to_np(dx)
    inputs = {"x": x}
    if state is not None:
        if cell == "lstm":
            inputs.update(h0=state[0], c0=state[1])
            analytic.update(h0=to_np(ds0[0]), c0=to_np(ds0[1]))
        else:
            inputs["h0"] = state
            analytic["h0"] = to_np(ds0)

    def loss_at(x=x, h0=None, c0=None):
        st = state
        if state is not None:
            if cell == "lstm":
                st = (state[0] if h0 is None else h0, state[1] if c0 is None else c0)
            else:
                st = state if h0 is None else h0
        return _loss(m, device, x, st, R, S, Q)

    check_gradients(device, m, loss_at, analytic, inputs)


def _torch_twin(m):
    torch = pytest.importorskip("torch")
    kw = dict(num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first,
              bidirectional=m.bidirectional, dtype=torch.float64)
    if isinstance(m, xrnn.LSTM):
        t = torch.nn.LSTM(m.input_size, m.hidden_size, **kw)
    elif isinstance(m, xrnn.GRU):
        t = torch.nn.GRU(m.input_size, m.hidden_size, **kw)
    else:
        t = torch.nn.RNN(m.input_size, m.hidden_size, nonlinearity=m.nonlinearity, **kw)
    # load xrnn's weights into torch: names and layouts must match exactly
    t.load_state_dict({k: torch.from_numpy(np.array(to_np(v))) for k, v in m.state_dict().items()})
    return torch, t


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("cell", list(CELLS))
def test_matches_torch_autograd(device, cell, cfg):
    m, x, state, R, S, Q = _case(device, cell, cfg, seed=3)
    torch, t = _torch_twin(m)
    out, st, dx, ds0 = _analytic(m, device, x, state, R, S, Q)

    xt = torch.tensor(x, requires_grad=True)
    if state is None:
        st_t = None
    elif cell == "lstm":
        st_t = tuple(torch.tensor(s, requires_grad=True) for s in state)
    else:
        st_t = torch.tensor(state, requires_grad=True)
    ot, stt = t(xt, st_t)
    loss = (ot * torch.tensor(R)).sum()
    ht = stt[0] if cell == "lstm" else stt
    if S is not None:
        loss = loss + (ht * torch.tensor(S)).sum()
    if Q is not None:
        loss = loss + (stt[1] * torch.tensor(Q)).sum()
    loss.backward()

    tol = dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_np(out), ot.detach().numpy(), **tol)
    h = st[0] if cell == "lstm" else st
    np.testing.assert_allclose(to_np(h), ht.detach().numpy(), **tol)
    if cell == "lstm":
        np.testing.assert_allclose(to_np(st[1]), stt[1].detach().numpy(), **tol)
    np.testing.assert_allclose(to_np(dx), xt.grad.numpy(), **tol)
    for k, p in t.named_parameters():
        np.testing.assert_allclose(to_np(m.grads[k]), p.grad.numpy(), err_msg=k, **tol)
    if state is not None:
        if cell == "lstm":
            np.testing.assert_allclose(to_np(ds0[0]), st_t[0].grad.numpy(), **tol)
            np.testing.assert_allclose(to_np(ds0[1]), st_t[1].grad.numpy(), **tol)
        else:
            np.testing.assert_allclose(to_np(ds0), st_t.grad.numpy(), **tol)


@pytest.mark.parametrize("cell", list(CELLS))
def test_loads_torch_initialised_state_dict(cell):
    """The other direction: a torch module's own state dict (tensors) loads into xrnn."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    cls, extra = CELLS[cell]
    m = cls(4, 5, num_layers=2, bidirectional=True, dtype="float32", seed=1, **extra)
    _, t = _torch_twin(m)
    t = t.float()
    for p in t.parameters():
        torch.nn.init.normal_(p)
    m.load_state_dict(t.state_dict())
    x = np.random.default_rng(0).standard_normal((6, 3, 4)).astype(np.float32)
    out, _ = m(x)
    with torch.no_grad():
        ot, _ = t(torch.from_numpy(x))
    np.testing.assert_allclose(out, ot.numpy(), rtol=1e-4, atol=1e-5)


def test_torch_parameters_load_as_private_values_without_autograd():
    """named_parameters() tensors require grad; loaded onto a torch-backed layer they must
    not drag autograd into every step, nor share storage with the torch module."""
    torch = pytest.importorskip("torch")
    t = torch.nn.GRU(3, 4)
    m = xrnn.GRU(3, 4, device="torch:cpu", seed=0)
    m.load_state_dict(dict(t.named_parameters()))
    for k, v in m.state_dict().items():
        assert not v.requires_grad, k
        assert v.data_ptr() != getattr(t, k).data_ptr(), k
        np.testing.assert_array_equal(v.numpy(), getattr(t, k).detach().numpy())
    out, _ = m(torch.ones(2, 1, 3))
    assert not out.requires_grad
    m.backward(torch.ones_like(out))
    assert not any(g.requires_grad for g in m.grads.values())


def test_seed_gives_identical_weights_and_outputs_on_every_backend(device):
    ref = xrnn.LSTM(3, 4, num_layers=2, bidirectional=True, seed=42)
    m = xrnn.LSTM(3, 4, num_layers=2, bidirectional=True, seed=42, device=device)
    for k, v in ref.state_dict().items():
        np.testing.assert_array_equal(to_np(m.state_dict()[k]), v)  # bitwise: same host draws
        assert_on(device, m.state_dict()[k])
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    out_ref, _ = ref(x)
    out, (h, c) = m(put(device, x, "float32"))
    assert_on(device, out, h, c)
    np.testing.assert_allclose(to_np(out), out_ref, rtol=1e-5, atol=1e-6)
    other = xrnn.LSTM(3, 4, num_layers=2, bidirectional=True, seed=43)
    assert not np.array_equal(to_np(other.weight_ih_l0), to_np(m.weight_ih_l0))


@pytest.mark.parametrize("cell", list(CELLS))
def test_default_init_is_pytorch_uniform(cell):
    cls, extra = CELLS[cell]
    H = 16
    m = cls(8, H, num_layers=2, seed=0, **extra)
    k = 1 / np.sqrt(H)
    for name, v in m.state_dict().items():
        v = to_np(v)
        assert v.min() >= -k and v.max() <= k, name
        assert v.std() > 0.4 * k  # spread over the interval, not a constant (U(-k,k) has std k/sqrt(3))


def test_forget_bias_sets_total_forget_gate_bias():
    H = 5
    m = xrnn.LSTM(3, H, num_layers=2, bidirectional=True, forget_bias=1.0, seed=0)
    for name, v in m.state_dict().items():
        v = to_np(v)
        if name.startswith("bias_ih"):
            np.testing.assert_array_equal(v[H:2 * H], 1.0)
        if name.startswith("bias_hh"):
            np.testing.assert_array_equal(v[H:2 * H], 0.0)
    # other gates keep the uniform draw
    assert np.abs(to_np(m.bias_ih_l0)[:H]).max() > 0
    c = xrnn.LSTMCell(3, H, forget_bias=1.0, seed=0)
    np.testing.assert_array_equal(to_np(c.bias_ih)[H:2 * H] + to_np(c.bias_hh)[H:2 * H], 1.0)


def test_state_dict_names_and_shapes_match_pytorch():
    torch = pytest.importorskip("torch")
    for cls, tcls in ((xrnn.RNN, torch.nn.RNN), (xrnn.LSTM, torch.nn.LSTM), (xrnn.GRU, torch.nn.GRU)):
        for opts in ({}, {"num_layers": 3, "bidirectional": True}, {"bias": False, "num_layers": 2}):
            m = cls(7, 5, seed=0, **opts)
            t = tcls(7, 5, **opts)
            assert list(m.state_dict()) == list(t.state_dict())
            for k, v in t.state_dict().items():
                assert tuple(m.state_dict()[k].shape) == tuple(v.shape), k


def _dropout_reference(m, x, p, seed):
    """Layer-by-layer composition with PyTorch's between-layer inverted dropout,
    masks drawn in the documented order from the layer's seeded host generator."""
    rng = np.random.default_rng(seed)
    layer_in = x
    T, B, _ = x.shape
    D = m.num_directions
    for layer in range(m.num_layers):
        single = type(m)(layer_in.shape[-1], m.hidden_size, bidirectional=m.bidirectional, dtype=m.dtype)
        sd = {}
        for k, v in m.state_dict().items():
            if f"_l{layer}" in k:
                sd[k.replace(f"_l{layer}", "_l0")] = v
        single.load_state_dict(sd)
        out, _ = single(layer_in)
        if layer < m.num_layers - 1:
            keep = rng.random((T, B, D * m.hidden_size), dtype=np.float32) >= p
            out = out * keep / (1 - p)
        layer_in = out
    return layer_in


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_dropout_between_layers(light_device, cell):
    dev = light_device
    cls, extra = CELLS[cell]
    p = 0.4
    m = cls(3, 4, num_layers=3, bidirectional=True, dropout=p, dtype="float64", device=dev, seed=0, **extra)
    x = np.random.default_rng(1).standard_normal((5, 2, 3))
    host = cls(3, 4, num_layers=3, bidirectional=True, dtype="float64", seed=0, **extra)
    m.rng = np.random.default_rng(7)
    out, _ = m(put(dev, x))
    np.testing.assert_allclose(to_np(out), _dropout_reference(host, x, p, 7), rtol=1e-12, atol=1e-12)
    # eval mode: no dropout at all
    m.eval()
    out_eval, _ = m(put(dev, x))
    np.testing.assert_allclose(to_np(out_eval), host(x)[0], rtol=1e-12, atol=1e-12)
    m.train()

    # backward uses the forward's masks: finite differences with the mask fixed by reseeding
    R = np.random.default_rng(2).standard_normal(to_np(out).shape)

    def loss():
        m.rng = np.random.default_rng(11)
        return float(np.sum(to_np(m(put(dev, x))[0]) * R))

    m.rng = np.random.default_rng(11)
    m(put(dev, x))
    m.zero_grad()
    m.backward(put(dev, R))
    analytic = {k: to_np(v) for k, v in m.grads.items()}
    check_gradients(dev, m, loss, analytic, {})


def test_dropout_single_layer_warns_and_does_nothing():
    with pytest.warns(UserWarning, match="between recurrent layers"):
        m = xrnn.LSTM(3, 4, dropout=0.5, seed=0)
    ref = xrnn.LSTM(3, 4, seed=0)
    x = np.ones((4, 2, 3), np.float32)
    np.testing.assert_array_equal(m(x)[0], ref(x)[0])


def test_float32_matches_float64_reference(device):
    m64 = xrnn.GRU(4, 6, num_layers=2, bidirectional=True, dtype="float64", seed=5)
    m32 = xrnn.GRU(4, 6, num_layers=2, bidirectional=True, dtype="float32", seed=5, device=device)
    x = np.random.default_rng(0).standard_normal((7, 3, 4))
    out64, _ = m64(x)
    out32, _ = m32(put(device, x, "float32"))
    assert str(out32.dtype).endswith("float32")
    np.testing.assert_allclose(to_np(out32), out64, rtol=1e-4, atol=1e-5)
    R = np.random.default_rng(1).standard_normal(out64.shape)
    m64.backward(R)
    m32.backward(put(device, R, "float32"))
    for k in m64.grads:
        np.testing.assert_allclose(to_np(m32.grads[k]), m64.grads[k], rtol=1e-3, atol=1e-4, err_msg=k)


def test_gradients_accumulate_until_zero_grad(device):
    m = xrnn.LSTM(2, 3, dtype="float64", seed=0, device=device)
    x = put(device, np.random.default_rng(0).standard_normal((3, 2, 2)))
    out, _ = m(x)
    m.backward(out)
    once = {k: to_np(v).copy() for k, v in m.grads.items()}
    out, _ = m(x)
    m.backward(out)
    for k, v in m.grads.items():
        np.testing.assert_allclose(to_np(v), 2 * once[k], rtol=1e-12, err_msg=k)
    m.zero_grad()
    for k, v in m.grads.items():
        assert not np.any(to_np(v)), k


def test_to_moves_parameters_and_gradients(device):
    m = xrnn.GRU(3, 4, num_layers=2, seed=0)
    x = np.random.default_rng(0).standard_normal((4, 2, 3)).astype(np.float32)
    out, _ = m(x)
    m.backward(np.ones_like(out))
    grads = {k: to_np(v).copy() for k, v in m.grads.items()}
    m.to(device)
    assert m.device == device
    for k in grads:
        assert_on(device, m.parameters()[k], m.grads[k])
        np.testing.assert_array_equal(to_np(m.grads[k]), grads[k])
    out2, _ = m(put(device, x, "float32"))
    np.testing.assert_allclose(to_np(out2), out, rtol=1e-5, atol=1e-6)
    m.to("cpu", dtype="float64")
    assert m.dtype == "float64" and to_np(m.weight_hh_l1).dtype == np.float64


def test_no_grad_keeps_nothing():
    m = xrnn.RNN(2, 3, seed=0)
    with xrnn.no_grad():
        m(np.ones((2, 1, 2), np.float32))
    with pytest.raises(xrnn.errors.StateError, match="preceding forward"):
        m.backward(np.ones((2, 1, 3), np.float32))


def test_input_grad_false_skips_dx_but_keeps_parameter_grads():
    m = xrnn.LSTM(3, 4, num_layers=2, dtype="float64", seed=0)
    ref = xrnn.LSTM(3, 4, num_layers=2, dtype="float64", seed=0)
    x = np.random.default_rng(0).standard_normal((4, 2, 3))
    for mod, flag in ((m, False), (ref, True)):
        out, _ = mod(x)
        dx, _ = mod.backward(np.ones_like(out), input_grad=flag)
        assert (dx is None) == (not flag)
    for k in m.grads:
        np.testing.assert_allclose(m.grads[k], ref.grads[k], rtol=1e-12, err_msg=k)


def test_load_state_dict_returns_and_loads_as_torch_does():
    """torch's habit: (missing_keys, unexpected_keys) back; strict=True raises on a mismatch and loads
    nothing, strict=False loads what matches; a mis-shaped entry is an error either way."""
    torch = pytest.importorskip("torch")
    from xrnn.errors import ShapeError

    m = xrnn.LSTM(3, 4, num_layers=2, seed=0)
    t = torch.nn.LSTM(3, 4, num_layers=2)
    source = xrnn.LSTM(3, 4, num_layers=2, seed=1).state_dict()
    full = {k: torch.from_numpy(np.array(to_np(v))) for k, v in source.items()}

    res_x, res_t = m.load_state_dict(full), t.load_state_dict(full)
    assert (res_x.missing_keys, res_x.unexpected_keys) == (res_t.missing_keys, res_t.unexpected_keys) == ([], [])
    assert repr(res_x) == repr(res_t) == "<All keys matched successfully>"

    partial = {k: v for k, v in full.items() if k != "bias_hh_l1"}
    partial["weight_ih_l9"] = torch.zeros(16, 3)
    before = {k: to_np(v).copy() for k, v in xrnn.LSTM(3, 4, num_layers=2, seed=0).state_dict().items()}
    fresh = xrnn.LSTM(3, 4, num_layers=2, seed=0)
    with pytest.raises(ShapeError, match="missing keys: bias_hh_l1; unexpected keys: weight_ih_l9"):
        fresh.load_state_dict(partial)
    with pytest.raises(RuntimeError, match="bias_hh_l1"):
        torch.nn.LSTM(3, 4, num_layers=2).load_state_dict(partial)
    for k, v in fresh.state_dict().items():  # strict refusal loaded nothing
        np.testing.assert_array_equal(to_np(v), before[k])

    t2 = torch.nn.LSTM(3, 4, num_layers=2)
    keep = t2.bias_hh_l1.detach().numpy().copy()
    res_x, res_t = fresh.load_state_dict(partial, strict=False), t2.load_state_dict(partial, strict=False)
    missing, unexpected = res_x  # unpacks like torch's NamedTuple
    assert (missing, unexpected) == (res_t.missing_keys, res_t.unexpected_keys) == (["bias_hh_l1"], ["weight_ih_l9"])
    assert res_x._fields == res_t._fields == ("missing_keys", "unexpected_keys")
    for k, v in fresh.state_dict().items():
        want = before[k] if k == "bias_hh_l1" else full[k].numpy()
        np.testing.assert_array_equal(to_np(v), want.astype(np.float32))
        np.testing.assert_array_equal(to_np(v), getattr(t2, k).detach().numpy() if k != "bias_hh_l1" else to_np(v))
    np.testing.assert_array_equal(t2.bias_hh_l1.detach().numpy(), keep)

    bad = dict(full, weight_hh_l0=torch.zeros(5, 5))
    with pytest.raises(ShapeError, match="'weight_hh_l0' has shape \\(5, 5\\)"):
        fresh.load_state_dict(bad, strict=False)
    with pytest.raises(RuntimeError, match="size mismatch for weight_hh_l0"):
        t2.load_state_dict(bad, strict=False)
