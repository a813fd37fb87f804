"""xrnn.optim against hand-computed updates, torch.optim, torch's clipping and lr_scheduler."""

import json
import math

import numpy as np
import pytest

import xrnn
from xrnn.errors import ConfigError, ShapeError, StateError
from xrnn.optim import (
    OPTIMIZERS,
    SCHEDULES,
    SGD,
    Adagrad,
    Adam,
    AdamW,
    Constant,
    Cosine,
    RMSprop,
    Schedule,
    StepDecay,
    Warmup,
    clip_grad_norm,
    clip_grad_value,
    make_optimizer,
    make_schedule,
)

from conftest import assert_on, to_np

SHAPES = {"weight": (3, 4), "bias": (3,), "scale": (2, 2, 2)}


class Tiny:
    """The smallest thing an optimizer accepts: parameters() and grads, dicts by name."""

    def __init__(self, dev, values: dict, dtype="float64"):
        self._p = {n: dev.asarray(v, dtype) for n, v in values.items()}
        self._g = {n: dev.zeros(tuple(v.shape), dtype) for n, v in values.items()}

    def parameters(self):
        return dict(self._p)

    @property
    def grads(self):
        return dict(self._g)


def host_values(seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s) for n, s in shapes.items()}


def set_grads(model, dev, host_grads, dtype="float64"):
    with dev:  # an assignment launches a copy kernel on a library with a current device
        for n, g in host_grads.items():
            model.grads[n][...] = dev.asarray(g, dtype)


def params_np(model):
    return {n: to_np(p).copy() for n, p in model.parameters().items()}


# ---------------------------------------------------------------------------
# hand-computed updates (2 steps, 2 numbers)
# ---------------------------------------------------------------------------

P0 = [1.0, -2.0]
G1 = [0.5, 1.0]
G2 = [1.0, -1.0]


def two_steps(dev, cls, **kw):
    m = Tiny(dev, {"w": np.array(P0)})
    opt = cls(m, **kw)
    out = []
    for g in (G1, G2):
        set_grads(m, dev, {"w": np.array(g)})
        opt.step()
        out.append(to_np(m.parameters()["w"]).copy())
    return out


HAND = [
    # SGD lr=0.1 momentum=0.9: b1 = g1 = [.5, 1]; b2 = .9 b1 + g2 = [1.45, -.1]
    (SGD, dict(lr=0.1, momentum=0.9), [[1 - 0.05, -2 - 0.1], [0.95 - 0.145, -2.1 + 0.01]]),
    # + dampening .5: the first buffer is still g1 (torch); b2 = .9 b1 + .5 g2 = [.95, .4]
    (SGD, dict(lr=0.1, momentum=0.9, dampening=0.5), [[0.95, -2.1], [0.95 - 0.095, -2.1 - 0.04]]),
    # Nesterov: step 1 uses g1 + .9 g1 = [.95, 1.9]; step 2 g2 + .9 [1.45, -.1] = [2.305, -1.09]
    (SGD, dict(lr=0.1, momentum=0.9, nesterov=True), [[1 - 0.095, -2 - 0.19], [0.905 - 0.2305, -2.19 + 0.109]]),
    # weight decay .5, no momentum: g1 + .5 p0 = [1, 0]; p1 = [.9, -2]; g2 + .5 p1 = [1.45, -2]
    (SGD, dict(lr=0.1, weight_decay=0.5), [[0.9, -2.0], [0.9 - 0.145, -2.0 + 0.2]]),
    # Adagrad lr=.1 eps=0: s1 = g1^2, step = .1 sign(g1); s2 = [1.25, 2]
    (Adagrad, dict(lr=0.1, eps=0.0),
     [[0.9, -2.1], [0.9 - 0.1 / math.sqrt(1.25), -2.1 + 0.1 / math.sqrt(2.0)]]),
    # lr_decay .5: step 2 uses clr = .1 / 1.5; accumulator starting at 1: s1 = [1.25, 2], s2 = [2.25, 3]
    (Adagrad, dict(lr=0.1, eps=0.0, lr_decay=0.5, initial_accumulator_value=1.0),
     [[1 - 0.05 / math.sqrt(1.25), -2 - 0.1 / math.sqrt(2.0)],
      [1 - 0.05 / math.sqrt(1.25) - (0.1 / 1.5) / 1.5, -2 - 0.1 / math.sqrt(2.0) + (0.1 / 1.5) / math.sqrt(3.0)]]),
    # RMSprop alpha=.5 eps=0: v1 = .5 g1^2 = [.125, .5] -> steps .1 sqrt(2) sign(g1); v2 = [.5625, .75]
    (RMSprop, dict(lr=0.1, alpha=0.5, eps=0.0),
     [[1 - 0.1 * math.sqrt(2), -2 - 0.1 * math.sqrt(2)],
      [1 - 0.1 * math.sqrt(2) - 0.1 / 0.75, -2 - 0.1 * math.sqrt(2) + 0.1 / math.sqrt(0.75)]]),
    # centered: m1 = .5 g1 = [.25, .5], v1 - m1^2 = [.0625, .25] -> step 1 = .1 [.5/.25, 1/.5] = [.2, .2]
    #           m2 = [.625, -.25], v2 - m2^2 = [.5625 - .390625, .75 - .0625] = [.171875, .6875]
    (RMSprop, dict(lr=0.1, alpha=0.5, eps=0.0, centered=True),
     [[0.8, -2.2], [0.8 - 0.1 / math.sqrt(0.171875), -2.2 + 0.1 / math.sqrt(0.6875)]]),
    # momentum .5: b1 = g1 / sqrt(v1) = sqrt(2) sign(g1); b2 = .5 b1 + g2 / sqrt(v2)
    (RMSprop, dict(lr=0.1, alpha=0.5, eps=0.0, momentum=0.5),
     [[1 - 0.1 * math.sqrt(2), -2 - 0.1 * math.sqrt(2)],
      [1 - 0.1 * math.sqrt(2) - 0.1 * (0.5 * math.sqrt(2) + 1 / 0.75),
       -2 - 0.1 * math.sqrt(2) - 0.1 * (0.5 * math.sqrt(2) - 1 / math.sqrt(0.75))]]),
    # Adam betas (.5, .5) eps=0: step 1 = lr sign(g1); mhat2 = [.625, -.25]/.75, vhat2 = [.5625, .75]/.75
    (Adam, dict(lr=0.1, betas=(0.5, 0.5), eps=0.0),
     [[0.9, -2.1], [0.9 - 0.1 * (0.625 / 0.75) / math.sqrt(0.75), -2.1 + 0.1 * (0.25 / 0.75) / 1.0]]),
    # AdamW wd=.5: p <- p (1 - .05) before each Adam step
    (AdamW, dict(lr=0.1, betas=(0.5, 0.5), eps=0.0, weight_decay=0.5),
     [[0.95 - 0.1, -1.9 - 0.1],
      [0.85 * 0.95 - 0.1 * (0.625 / 0.75) / math.sqrt(0.75), -2.0 * 0.95 + 0.1 * (0.25 / 0.75)]]),
]


@pytest.mark.parametrize("cls,kw,expected", HAND, ids=[f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(HAND)])
def test_hand_computed_two_steps(light_device, cls, kw, expected):
    got = two_steps(light_device, cls, **kw)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-14, atol=1e-14)


def test_hand_computed_amsgrad_keeps_the_max(light_device):
    # betas (.5, .5), eps 0. g1 = [2, 2], g2 = [.1, .1]: v1 = 2, v2 = 1 + .005 = 1.005 < v1 -> vmax = 2.
    # m1 = 1, m2 = .5 + .05 = .55 -> mhat = .55 / .75;
    # bias-corrected denominators: plain sqrt(1.005/.75), amsgrad sqrt(2/.75).
    dev = light_device
    for amsgrad, v in ((False, 1.005), (True, 2.0)):
        m = Tiny(dev, {"w": np.array([0.0, 0.0])})
        opt = Adam(m, lr=0.1, betas=(0.5, 0.5), eps=0.0, amsgrad=amsgrad)
        for g in (2.0, 0.1):
            set_grads(m, dev, {"w": np.array([g, g])})
            opt.step()
        expected = -0.1 - 0.1 * (0.55 / 0.75) / math.sqrt(v / 0.75)
        np.testing.assert_allclose(to_np(m.parameters()["w"]), [expected, expected], rtol=1e-14)


# ---------------------------------------------------------------------------
# against torch.optim, every option combination
# ---------------------------------------------------------------------------

TORCH_CASES = [
    (SGD, dict(lr=0.1)),
    (SGD, dict(lr=0.1, weight_decay=0.1)),
    (SGD, dict(lr=0.05, momentum=0.9)),
    (SGD, dict(lr=0.05, momentum=0.9, dampening=0.3)),
    (SGD, dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.1)),
    (SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (SGD, dict(lr=0.05, momentum=0.7, nesterov=True, weight_decay=0.1)),
    (SGD, dict()),
    (Adagrad, dict()),
    (Adagrad, dict(lr=0.1, lr_decay=0.05)),
    (Adagrad, dict(lr=0.1, weight_decay=0.1, initial_accumulator_value=0.5)),
    (Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.2, eps=1e-3)),
    (RMSprop, dict()),
    (RMSprop, dict(lr=0.01, alpha=0.9, centered=True)),
    (RMSprop, dict(lr=0.01, momentum=0.8)),
    (RMSprop, dict(lr=0.01, momentum=0.8, centered=True, weight_decay=0.1)),
    (RMSprop, dict(lr=0.01, alpha=0.3, centered=True, eps=1e-4)),
    (RMSprop, dict(lr=0.01, weight_decay=0.1)),
    (Adam, dict()),
    (Adam, dict(lr=0.01, weight_decay=0.1)),
    (Adam, dict(lr=0.01, amsgrad=True)),
    (Adam, dict(lr=0.01, betas=(0.3, 0.7), eps=1e-6, weight_decay=0.1, amsgrad=True)),
    (AdamW, dict()),
    (AdamW, dict(lr=0.01, weight_decay=0.3, amsgrad=True)),
    (AdamW, dict(lr=0.01, betas=(0.3, 0.7), weight_decay=0.0)),
]


def run_against_torch(dev, cls, kw, dtype="float64", steps=10, seed=0):
    torch = pytest.importorskip("torch")
    tdtype = getattr(torch, dtype)
    init = host_values(seed)
    m = Tiny(dev, init, dtype)
    tparams = {n: torch.tensor(v, dtype=tdtype, requires_grad=True) for n, v in init.items()}
    opt = cls(m, **kw)
    topt = getattr(torch.optim, cls.__name__)(list(tparams.values()), foreach=False, **kw)
    rng = np.random.default_rng(seed + 1)
    for _ in range(steps):
        grads = {n: rng.standard_normal(s).astype(dtype) for n, s in SHAPES.items()}
        set_grads(m, dev, grads, dtype)
        for n, t in tparams.items():
            t.grad = torch.tensor(grads[n], dtype=tdtype)
        opt.step()
        topt.step()
    return m, opt, tparams, topt


@pytest.mark.parametrize("cls,kw", TORCH_CASES, ids=[f"{c.__name__}-{kw}" for c, kw in TORCH_CASES])
def test_matches_torch_float64(device, cls, kw):
    m, opt, tparams, topt = run_against_torch(device, cls, kw)
    assert opt.steps == 10
    for n, t in tparams.items():
        p = m.parameters()[n]
        assert_on(device, p)
        np.testing.assert_allclose(to_np(p), t.detach().numpy(), rtol=1e-13, atol=1e-14, err_msg=n)
        tstate = topt.state[t]
        for slot, arr in opt.state[n].items():  # same slot names as torch
            assert_on(device, arr)
            np.testing.assert_allclose(to_np(arr), tstate[slot].numpy(), rtol=1e-13, atol=1e-14,
                                       err_msg=f"{n}/{slot}")
        assert set(opt.state[n]) == set(tstate) - {"step"}


@pytest.mark.parametrize("cls,kw", [(Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
                                    (RMSprop, dict(centered=True, momentum=0.5)),
                                    (SGD, dict(lr=0.1, momentum=0.9, nesterov=True))])
def test_matches_torch_float32(cls, kw):
    dev = xrnn.resolve_device("cpu")
    m, opt, tparams, _ = run_against_torch(dev, cls, kw, dtype="float32")
    for n, t in tparams.items():
        p = m.parameters()[n]
        assert p.dtype == np.float32
        np.testing.assert_allclose(to_np(p), t.detach().numpy(), rtol=2e-6, atol=2e-6)


def test_trains_an_xrnn_module_like_torch():
    """A Linear layer fitted by Adam with clipping: the whole loss curve equals torch's."""
    torch = pytest.importorskip("torch")
    dev = xrnn.resolve_device("cpu")
    lin = xrnn.Linear(4, 3, dtype="float64", seed=3)
    tlin = torch.nn.Linear(4, 3).double()
    with torch.no_grad():
        for n, p in tlin.named_parameters():
            p.copy_(torch.from_numpy(to_np(lin.parameters()[n])))
    opt, topt = Adam(lin, lr=0.05), torch.optim.Adam(tlin.parameters(), lr=0.05, foreach=False)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, 4)), rng.standard_normal((16, 3))
    losses, tlosses = [], []
    for _ in range(20):
        opt.zero_grad()
        out = lin(dev.asarray(x, "float64"))
        diff = out - dev.asarray(y, "float64")
        losses.append(float(np.mean(to_np(diff) ** 2)))
        lin.backward(2 * diff / diff.size)
        clip_grad_norm(lin, 0.5)
        opt.step()
        topt.zero_grad()
        tloss = ((tlin(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2).mean()
        tlosses.append(tloss.item())
        tloss.backward()
        torch.nn.utils.clip_grad_norm_(tlin.parameters(), 0.5, foreach=False)
        topt.step()
    np.testing.assert_allclose(losses, tlosses, rtol=1e-12)
    assert losses[-1] < 0.8 * losses[0]


# ---------------------------------------------------------------------------
# parameters in place, state on the device, following the model
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_on_model_device_and_dtype(name):
    dev = xrnn.resolve_device("array_api_strict:device1")
    lin = xrnn.Linear(3, 2, device=dev, dtype="float32", seed=0)
    kw = {"sgd": dict(momentum=0.9), "rmsprop": dict(centered=True, momentum=0.5),
          "adam": dict(amsgrad=True), "adamw": dict(amsgrad=True), "adagrad": {}}[name]
    opt = make_optimizer(name, lin, **kw)
    ids = {n: id(p) for n, p in lin.parameters().items()}
    before = params_np(lin)
    rng = np.random.default_rng(0)
    for _ in range(2):
        set_grads(lin, dev, {n: rng.standard_normal(s) for n, s in [("weight", (2, 3)), ("bias", (2,))]}, "float32")
        opt.step()
    assert opt.device == dev and opt.dtype == "float32"
    for n, p in lin.parameters().items():
        assert id(p) == ids[n], "parameters are updated in place"
        assert not np.array_equal(to_np(p), before[n])
        assert opt.state[n]
        for arr in opt.state[n].values():
            assert_on(dev, arr)
            assert xrnn.backend.dtype_name(arr.dtype) == "float32"
    for slots in opt.state_dict()["state"].values():
        for arr in slots.values():
            assert_on(dev, arr)


def test_optimizer_follows_replaced_parameters():
    """Module.load_state_dict swaps the arrays; the optimizer looks them up by name each step."""
    dev = xrnn.resolve_device("cpu")
    lin = xrnn.Linear(2, 2, dtype="float64", seed=0)
    opt = SGD(lin, lr=1.0)
    lin.load_state_dict({"weight": np.zeros((2, 2)), "bias": np.zeros(2)})
    set_grads(lin, dev, {"weight": np.ones((2, 2)), "bias": np.ones(2)})
    opt.step()
    np.testing.assert_array_equal(to_np(lin.weight), -np.ones((2, 2)))


def test_state_moves_with_the_model():
    torch = pytest.importorskip("torch")  # noqa: F841
    lin = xrnn.Linear(2, 2, dtype="float64", seed=0)
    opt = Adam(lin, lr=0.1)
    set_grads(lin, lin.device, {"weight": np.ones((2, 2)), "bias": np.ones(2)})
    opt.step()
    lin.to("torch:cpu", dtype="float32")
    opt.step()
    assert opt.device.name == "torch:cpu" and opt.dtype == "float32"
    for arr in opt.state["weight"].values():
        assert_on(lin.device, arr)


def test_zero_grad_with_and_without_model_zero_grad(light_device):
    dev = light_device
    lin = xrnn.Linear(2, 2, device=dev, dtype="float64", seed=0)
    tiny = Tiny(dev, host_values())
    for model in (lin, tiny):
        opt = SGD(model)
        with dev:
            for g in model.grads.values():
                g[...] = 3.0
        opt.zero_grad()
        for g in model.grads.values():
            assert not np.any(to_np(g))


def test_lr_is_a_plain_float_that_takes_effect(light_device):
    dev = light_device
    m = Tiny(dev, {"w": np.array([1.0])})
    opt = SGD(m, lr=0.5)
    set_grads(m, dev, {"w": np.array([1.0])})
    opt.lr = 0.25
    assert isinstance(opt.lr, float) and opt.lr == 0.25
    opt.step()
    np.testing.assert_allclose(to_np(m.parameters()["w"]), [0.75])
    assert opt.momentum == 0.0 and opt.hyper["lr"] == 0.25


# ---------------------------------------------------------------------------
# state dicts: exact resume
# ---------------------------------------------------------------------------

RESUME = [(SGD, dict(lr=0.05, momentum=0.9, nesterov=True)), (Adagrad, dict(lr_decay=0.1)),
          (RMSprop, dict(centered=True, momentum=0.5)), (Adam, dict(amsgrad=True)), (AdamW, dict())]


@pytest.mark.parametrize("cls,kw", RESUME, ids=[c.__name__ for c, _ in RESUME])
@pytest.mark.parametrize("via_host", [False, True])
def test_state_dict_resume_is_bit_identical(light_device, cls, kw, via_host):
    dev = light_device
    rng = np.random.default_rng(7)
    grads = [{n: rng.standard_normal(s) for n, s in SHAPES.items()} for _ in range(6)]
    a = Tiny(dev, host_values())
    opt_a = cls(a, **kw)
    for g in grads[:3]:
        set_grads(a, dev, g)
        opt_a.step()
    sd = opt_a.state_dict()
    if via_host:  # what a checkpoint does: host NumPy arrays, JSON for the rest
        sd = json.loads(json.dumps({k: v for k, v in sd.items() if k != "state"})) | {
            "state": {n: {s: to_np(v).copy() for s, v in slots.items()} for n, slots in sd["state"].items()}}
    b = Tiny(dev, params_np(a))
    opt_b = cls(b, lr=0.123)  # other hyperparameters: the state dict restores them
    opt_b.load_state_dict(sd)
    assert opt_b.steps == 3 and opt_b.hyper == opt_a.hyper
    for g in grads[3:]:
        for model, opt in ((a, opt_a), (b, opt_b)):
            set_grads(model, dev, g)
            opt.step()
    for n in SHAPES:
        np.testing.assert_array_equal(to_np(a.parameters()[n]), to_np(b.parameters()[n]))
        for s in opt_a.state[n]:
            assert_on(dev, opt_b.state[n][s])
            np.testing.assert_array_equal(to_np(opt_a.state[n][s]), to_np(opt_b.state[n][s]))


def test_load_state_dict_casts_and_moves_and_copies():
    dev = xrnn.resolve_device("array_api_strict:device1")
    m = Tiny(dev, {"w": np.zeros(3)}, "float32")
    opt = Adam(m)
    host = {"name": "Adam", "hyper": {"lr": 0.01, "betas": [0.8, 0.9], "eps": 1e-8, "weight_decay": 0.0,
                                      "amsgrad": False},
            "steps": 4, "state": {"w": {"exp_avg": np.ones(3), "exp_avg_sq": np.full(3, 2.0)}}}
    opt.load_state_dict(host)
    assert opt.betas == (0.8, 0.9) and opt.lr == 0.01 and opt.steps == 4
    for arr in opt.state["w"].values():
        assert_on(dev, arr)
        assert xrnn.backend.dtype_name(arr.dtype) == "float32"
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    set_grads(m, dev, {"w": np.ones(3)}, "float32")
    opt.step()  # mutates the optimizer's state, not the dict it was loaded from
    np.testing.assert_array_equal(to_np(sd["state"]["w"]["exp_avg"]), np.ones(3))


def test_sgd_state_dict_before_first_step_has_no_buffer():
    dev = xrnn.resolve_device("cpu")
    m = Tiny(dev, {"w": np.zeros(2)})
    opt = SGD(m, lr=0.1, momentum=0.9)
    sd = opt.state_dict()
    assert sd["state"] == {"w": {}} and sd["steps"] == 0
    SGD(m, lr=0.1, momentum=0.9).load_state_dict(sd)
    with pytest.raises(ShapeError, match="momentum_buffer"):
        SGD(m, lr=0.1, momentum=0.9).load_state_dict(sd | {"steps": 1})


# ---------------------------------------------------------------------------
# clipping
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("max_norm,norm_type", [(1.0, 2.0), (100.0, 2.0), (0.5, float("inf")), (1.0, 1.0),
                                                (2.0, 3.0), (0.3, "inf")])
def test_clip_grad_norm_matches_torch(device, max_norm, norm_type):
    torch = pytest.importorskip("torch")
    dev = device
    rng = np.random.default_rng(0)
    grads = {n: rng.standard_normal(s) for n, s in SHAPES.items()}
    m = Tiny(dev, host_values())
    set_grads(m, dev, grads)
    tparams = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in SHAPES.values()]
    for t, g in zip(tparams, grads.values()):
        t.grad = torch.tensor(g)
    total = clip_grad_norm(m, max_norm, norm_type)
    ttotal = torch.nn.utils.clip_grad_norm_(tparams, max_norm, norm_type, foreach=False)
    assert_on(dev, total)
    assert total.ndim == 0
    np.testing.assert_allclose(to_np(total), ttotal.numpy(), rtol=1e-13)
    for g, t in zip(m.grads.values(), tparams):
        np.testing.assert_allclose(to_np(g), t.grad.numpy(), rtol=1e-13, atol=1e-15)
    if max_norm == 100.0:  # below the threshold: unchanged
        for n, g in m.grads.items():
            np.testing.assert_allclose(to_np(g), grads[n], rtol=1e-6)


def test_clip_grad_norm_hand_computed_and_float32():
    dev = xrnn.resolve_device("array_api_strict:device1")
    m = Tiny(dev, {"a": np.zeros(2), "b": np.zeros(1)}, "float32")
    set_grads(m, dev, {"a": np.array([3.0, 0.0]), "b": np.array([4.0])}, "float32")
    total = clip_grad_norm(m, 1.0)  # |(3, 0, 4)| = 5 -> scale 1 / (5 + 1e-6)
    assert xrnn.backend.dtype_name(total.dtype) == "float32"
    np.testing.assert_allclose(to_np(total), 5.0)
    np.testing.assert_allclose(to_np(m.grads["a"]), [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(to_np(m.grads["b"]), [0.8], rtol=1e-6)


def test_clip_grad_value(device):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    grads = {n: 8 * rng.standard_normal(s) for n, s in SHAPES.items()}
    m = Tiny(device, host_values())
    set_grads(m, device, grads)
    ids = [id(g) for g in m.grads.values()]
    clip_grad_value(m, 5.0)
    for (n, g), i in zip(m.grads.items(), ids):
        assert id(g) == i
        t = torch.tensor(grads[n], requires_grad=True)
        t.grad = torch.tensor(grads[n])
        torch.nn.utils.clip_grad_value_([t], 5.0)
        np.testing.assert_array_equal(to_np(g), t.grad.numpy())
        assert np.max(np.abs(to_np(g))) == 5.0


# ---------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------

def _torch_lrs(make_scheduler, n, lr=1.0):
    torch = pytest.importorskip("torch")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = make_scheduler(opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_step_decay_matches_torch_steplr():
    torch = pytest.importorskip("torch")
    ours = StepDecay(0.1, factor=0.5, every=7)
    theirs = _torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5), 40, lr=0.1)
    np.testing.assert_allclose([ours.lr_at(s) for s in range(40)], theirs, rtol=1e-14)


def test_step_decay_char_rnn():
    """char-rnn's train.lua: after iteration i, if i % ipe == 0 and epoch >= decay_after: lr *= 0.97."""
    for spe, after in ((5, 10), (3, 2), (4, 0)):
        sched = StepDecay.from_epochs(2e-3, steps_per_epoch=spe, factor=0.97, decay_after_epochs=after)
        lr, expected = 2e-3, []
        for i in range(1, 80 + 1):
            expected.append(lr)  # the rate used by iteration i (1-based), i.e. step i - 1
            if i % spe == 0 and i / spe >= after:
                lr *= 0.97
        np.testing.assert_allclose([sched.lr_at(s) for s in range(80)], expected, rtol=1e-13)
    assert StepDecay.from_epochs(1.0, 100, decay_after_epochs=10).start == 1000


def test_step_decay_closed_form():
    s = StepDecay(1.0, factor=0.1, every=10, start=25)
    assert [s.lr_at(k) for k in (0, 24, 25, 34, 35, 45)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.001])


def test_cosine_matches_torch():
    torch = pytest.importorskip("torch")
    ours = Cosine(0.1, total_steps=20, min_lr=0.01)
    theirs = _torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20, eta_min=0.01), 21, lr=0.1)
    np.testing.assert_allclose([ours.lr_at(s) for s in range(21)], theirs, rtol=1e-12)
    assert ours.lr_at(0) == 0.1 and ours.lr_at(10) == pytest.approx(0.055) and ours.lr_at(20) == 0.01
    assert ours.lr_at(35) == 0.01  # held at min_lr afterwards


def test_warmup_matches_torch_linearlr():
    torch = pytest.importorskip("torch")
    W = 5
    ours = Warmup(0.2, W)
    theirs = _torch_lrs(lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1 / W, total_iters=W - 1), 12,
                        lr=0.2)
    np.testing.assert_allclose([ours.lr_at(s) for s in range(12)], theirs, rtol=1e-14)
    assert [ours.lr_at(s) for s in range(6)] == pytest.approx([0.04, 0.08, 0.12, 0.16, 0.2, 0.2])


def test_warmup_scales_the_inner_schedule_on_the_global_step():
    inner = Cosine(1.0, total_steps=100)
    w = Warmup(inner, 10)
    assert w.lr_at(3) == pytest.approx(inner.lr_at(3) * 4 / 10)
    assert w.lr_at(50) == inner.lr_at(50)
    assert Warmup(inner, 0).lr_at(0) == 1.0


def test_schedule_sets_optimizer_lr_and_round_trips_config():
    dev = xrnn.resolve_device("cpu")
    opt = Adam(Tiny(dev, {"w": np.zeros(1)}))
    for sched in (Constant(0.3), StepDecay(0.3, 0.9, every=4, start=2), Cosine(0.3, 50, min_lr=0.001),
                  Warmup(Cosine(0.3, 50), 5), make_schedule("cosine", lr=0.3, total_steps=50, warmup_steps=5)):
        assert sched(opt, 7) == sched.lr_at(7) == opt.lr
        cfg = json.loads(json.dumps(sched.to_config()))
        again = Schedule.from_config(cfg)
        assert again == sched
        assert [again.lr_at(s) for s in range(60)] == [sched.lr_at(s) for s in range(60)]
    assert make_schedule("STEP", lr=1.0, every=3) == StepDecay(1.0, every=3, start=3)
    assert SCHEDULES == ("constant", "step", "cosine")


# ---------------------------------------------------------------------------
# construction by name and errors
# ---------------------------------------------------------------------------

def test_make_optimizer_by_name():
    dev = xrnn.resolve_device("cpu")
    m = Tiny(dev, {"w": np.zeros(1)})
    assert OPTIMIZERS == ("sgd", "adagrad", "rmsprop", "adam", "adamw")
    for name, cls in zip(OPTIMIZERS, (SGD, Adagrad, RMSprop, Adam, AdamW)):
        assert type(make_optimizer(name.upper(), m, lr=0.5)) is cls
    o = make_optimizer("AdamW", m)
    assert (o.lr, o.betas, o.eps, o.weight_decay, o.amsgrad) == (1e-3, (0.9, 0.999), 1e-8, 1e-2, False)
    with pytest.raises(ConfigError, match="sgd, adagrad, rmsprop, adam, adamw"):
        make_optimizer("adadelta", m)
    with pytest.raises(ConfigError, match="momentum"):
        make_optimizer("adam", m, momentum=0.9)


def _model():
    return Tiny(xrnn.resolve_device("cpu"), {"w": np.zeros(2)})


@pytest.mark.parametrize("cls,kw,match", [
    (SGD, dict(lr=-0.1), "lr must be >= 0"),
    (SGD, dict(lr=float("nan")), "finite"),
    (SGD, dict(lr="0.1"), "real number"),
    (SGD, dict(momentum=-0.5), "momentum"),
    (SGD, dict(weight_decay=-1), "weight_decay"),
    (SGD, dict(nesterov=True), "nesterov=True needs momentum > 0"),
    (SGD, dict(momentum=0.9, dampening=0.1, nesterov=True), "dampening == 0"),
    (SGD, dict(nesterov="yes"), "True or False"),
    (Adagrad, dict(lr_decay=-1), "lr_decay"),
    (Adagrad, dict(initial_accumulator_value=-1), "initial_accumulator_value"),
    (Adagrad, dict(eps=-1e-10), "eps"),
    (RMSprop, dict(alpha=1.5), r"alpha must be in \[0, 1\]"),
    (RMSprop, dict(momentum=-1), "momentum"),
    (Adam, dict(betas=(1.0, 0.999)), r"betas\[0\] must be in \[0, 1\)"),
    (Adam, dict(betas=(0.9, -0.1)), r"betas\[1\]"),
    (Adam, dict(betas=0.9), "pair"),
    (AdamW, dict(eps=-1.0), "eps"),
    (AdamW, dict(weight_decay=-0.01), "weight_decay"),
    (Adam, dict(amsgrad=1), "True or False"),
])
def test_bad_hyperparameters(cls, kw, match):
    with pytest.raises(ConfigError, match=match):
        cls(_model(), **kw)


def test_misuse_errors():
    dev = xrnn.resolve_device("cpu")
    m = _model()
    opt = Adam(m)
    with pytest.raises(ConfigError, match="lr must be >= 0"):
        opt.lr = -1.0
    with pytest.raises(ConfigError, match="only lr can change"):
        opt.betas = (0.5, 0.5)
    with pytest.raises(ConfigError, match="no parameters"):
        Adam(Tiny(dev, {}))
    with pytest.raises(ConfigError, match="parameters"):
        Adam(object())
    mixed = Tiny(dev, {"w": np.zeros(2)})
    mixed._p["v"] = dev.asarray(np.zeros(2), "float32")
    mixed._g["v"] = dev.zeros((2,), "float32")
    with pytest.raises(ConfigError, match="one dtype"):
        Adam(mixed)
    m._p["new"] = dev.asarray(np.zeros(1), "float64")
    with pytest.raises(StateError, match="new"):
        opt.step()
    del m._p["new"]
    del m._g["w"]
    with pytest.raises(StateError, match="no gradient for w"):
        opt.step()


def test_load_state_dict_errors():
    m = _model()
    sd = Adam(m, amsgrad=True).state_dict()
    with pytest.raises(ConfigError, match="belongs to a 'Adam' optimizer"):
        SGD(m).load_state_dict(sd)
    with pytest.raises(ConfigError, match="lacks steps"):
        Adam(m).load_state_dict({k: v for k, v in sd.items() if k != "steps"})
    with pytest.raises(ConfigError, match="missing amsgrad"):
        Adam(m).load_state_dict(sd | {"hyper": {k: v for k, v in sd["hyper"].items() if k != "amsgrad"}})
    with pytest.raises(ConfigError, match="betas"):
        Adam(m).load_state_dict(sd | {"hyper": sd["hyper"] | {"betas": [1.5, 0.9]}})
    with pytest.raises(ConfigError, match="steps"):
        Adam(m).load_state_dict(sd | {"steps": -1})
    with pytest.raises(ShapeError, match="no state for w"):
        Adam(m).load_state_dict(sd | {"state": {}})
    with pytest.raises(ShapeError, match="unknown parameters x"):
        Adam(m).load_state_dict(sd | {"state": sd["state"] | {"x": {}}})
    with pytest.raises(ShapeError, match="max_exp_avg_sq"):  # amsgrad=True needs it
        Adam(m).load_state_dict(sd | {"state": {"w": {k: v for k, v in sd["state"]["w"].items()
                                                      if k != "max_exp_avg_sq"}}})
    with pytest.raises(ShapeError, match=r"shape \(3,\)"):
        Adam(m).load_state_dict(sd | {"state": {"w": sd["state"]["w"] | {"exp_avg": np.zeros(3)}}})
    opt = Adam(m)
    before = opt.state_dict()
    with pytest.raises(ShapeError):
        opt.load_state_dict(sd | {"state": {"w": sd["state"]["w"] | {"exp_avg": np.zeros(3)}}})
    assert opt.hyper == before["hyper"], "a failed load changes nothing"


def test_clip_and_schedule_errors():
    m = _model()
    with pytest.raises(ConfigError, match="max_norm must be > 0"):
        clip_grad_norm(m, 0.0)
    with pytest.raises(ConfigError, match="norm_type"):
        clip_grad_norm(m, 1.0, norm_type=-2)
    with pytest.raises(ConfigError, match="clip must be > 0"):
        clip_grad_value(m, -5)
    with pytest.raises(ConfigError, match="no gradients"):
        clip_grad_norm({}, 1.0)
    with pytest.raises(ConfigError, match="every"):
        StepDecay(1.0, every=0)
    with pytest.raises(ConfigError, match="total_steps"):
        Cosine(1.0, total_steps=0)
    with pytest.raises(ConfigError, match="min_lr"):
        Cosine(0.1, total_steps=10, min_lr=1.0)
    with pytest.raises(ConfigError, match="warmup_steps"):
        Warmup(0.1, -1)
    with pytest.raises(ConfigError, match="step must be an integer"):
        Constant(0.1).lr_at(-1)
    with pytest.raises(ConfigError, match="constant, step, cosine"):
        make_schedule("linear", lr=0.1)
    with pytest.raises(ConfigError, match="needs total_steps"):
        make_schedule("cosine", lr=0.1)
    with pytest.raises(ConfigError, match="'name'"):
        Schedule.from_config({"lr": 0.1})


# ---------------------------------------------------------------------------
# no host synchronisation inside a step or a clip
# ---------------------------------------------------------------------------

def _no_sync(*args, **kwargs):
    raise AssertionError("host synchronisation: a device array was converted to a Python value")


@pytest.fixture
def sync_detector(monkeypatch):
    """array-api-strict arrays that refuse every conversion that would be a device->host sync on a GPU."""
    xs = pytest.importorskip("array_api_strict")
    for name in ("__bool__", "__float__", "__int__", "__index__", "__complex__", "__array__", "__dlpack__"):
        monkeypatch.setattr(xs._array_object.Array, name, _no_sync, raising=False)
    return xrnn.resolve_device("array_api_strict:device1")


@pytest.mark.parametrize("cls,kw", TORCH_CASES, ids=[f"{c.__name__}-{kw}" for c, kw in TORCH_CASES])
def test_step_and_clip_never_sync_with_the_host(sync_detector, cls, kw):
    dev = sync_detector
    m = Tiny(dev, host_values())
    opt = cls(m, **kw)
    rng = np.random.default_rng(0)
    for _ in range(3):
        set_grads(m, dev, {n: rng.standard_normal(s) for n, s in SHAPES.items()})
        total = clip_grad_norm(m, 1.0, norm_type=2.0 if opt.steps % 2 else float("inf"))
        clip_grad_value(m, 0.5)
        opt.step()
    with pytest.raises(AssertionError, match="host synchronisation"):
        float(total)  # the detector itself works
