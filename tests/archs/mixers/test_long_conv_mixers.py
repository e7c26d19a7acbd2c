"""The long-convolution, LTI and gated-RNN mixers (s4d, h3, hyena, base_conv, rg_lru): each fast path against
its reference (outputs and every parameter gradient), decoding equal to the forward over options and long
prefixes, the papers' initialisations, S4D's kernel against its recurrence, and Hyena's filter beyond
``l_max``."""

from __future__ import annotations

import math

import pytest
import torch

from registry import MIXERS

D = 32
TOL = 1e-5  # relative RMS, fp32


def rel_rms(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()

# (mixer, options, the option that selects its reference path)
CASES = [
    ("s4d", {}, {"conv": "reference"}),
    ("s4d", {"gate": "output", "init": "inv", "d_state": 16}, {"conv": "reference"}),
    ("h3", {}, {"conv": "reference"}),
    ("h3", {"head_dim": 2, "d_state": 8}, {"conv": "reference"}),
    ("hyena", {}, {"conv": "reference"}),
    ("hyena", {"order": 3, "filter_order": 16, "emb_dim": 5, "l_max": 32}, {"conv": "reference"}),
    ("base_conv", {"implicit_long_conv": True, "l_max": 64}, {"conv": "reference"}),
    ("base_conv", {"kernel_size": -1, "long_filter": "hyena", "filter_order": 8}, {"conv": "reference"}),
    ("base_conv", {"kernel_size": -1, "long_filter": "zoology", "filter_order": 8, "filter_emb_dim": 5, "l_max": 32},
     {"conv": "reference"}),
    ("rg_lru", {}, {"scan": "reference"}),
    ("rg_lru", {"num_heads": 4, "lru_width": 48, "chunk_size": 8, "conv_width": 3}, {"scan": "reference"}),
]
IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in o.items()) or 'default'}" for n, o, _ in CASES]


def build(name, options, seed=0):
    torch.manual_seed(seed)
    return MIXERS.create(name, d_model=D, **options)


def outputs_and_grads(model, x, cot):
    x = x.clone().requires_grad_()
    y = model(x)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((y * cot).sum(), [x, *params])
    return y.detach(), dict(zip(["input"] + [n for n, p in model.named_parameters() if p.requires_grad], grads,
                                strict=True))


@pytest.mark.parametrize(("name", "options", "ref"), CASES, ids=IDS)
@pytest.mark.parametrize("t", [1, 63, 257])
def test_fast_path_equals_reference(name, options, ref, t):
    fast, slow = build(name, options), build(name, {**options, **ref})
    assert_same_outputs_and_grads(fast, slow, t)


@pytest.mark.parametrize("gate_scale", [0.1, 1.0, 10.0])
@pytest.mark.parametrize(("min_rad", "max_rad"), [(0.01, 0.5), (0.9, 0.999), (0.999, 0.99999)])
def test_rg_lru_fused_path_equals_reference_for_weak_and_strong_gates(gate_scale, min_rad, max_rad):
    opts = {"min_rad": min_rad, "max_rad": max_rad, "chunk_size": 16}
    fast, slow = build("rg_lru", opts), build("rg_lru", {**opts, "scan": "reference"})
    with torch.no_grad():
        for p in (fast.a_gate_weight, fast.input_gate_weight):
            p.mul_(gate_scale)
        fast.a_gate_bias.fill_(gate_scale - 1.0)
    assert_same_outputs_and_grads(fast, slow, 101)


def assert_same_outputs_and_grads(fast, slow, t):
    """``slow`` takes ``fast``'s weights; outputs and every gradient agree (the fp64 reference decides)."""
    slow.load_state_dict(fast.state_dict())
    torch.manual_seed(t)
    x = torch.randn(2, t, D)
    cot = torch.randn(2, t, D)
    y1, g1 = outputs_and_grads(fast, x, cot)
    y2, g2 = outputs_and_grads(slow, x, cot)
    exact = None
    for key, ref in [("output", y2), *g2.items()]:
        got = y1 if key == "output" else g1[key]
        err = rel_rms(got, ref)
        if err > TOL:  # fp32 rounding of long oscillating kernels: the fp64 reference decides
            if exact is None:
                y64, g64 = outputs_and_grads(slow.double(), x.double(), cot.double())
                exact = {"output": y64, **g64}
            err = rel_rms(got.double(), exact[key]) / max(1.0, 2 * rel_rms(ref.double(), exact[key]) / TOL)
        assert err <= TOL, f"{key}: relative RMS error {err:.1e}"


@pytest.mark.parametrize(("name", "options", "ref"), CASES, ids=IDS)
@pytest.mark.parametrize("prefill", [1, 6, 100])
def test_decoding_equals_forward(name, options, ref, prefill):
    model = build(name, options).eval()
    torch.manual_seed(1)
    x = torch.randn(2, 130, D)
    with torch.no_grad():
        full = model(x)
        cache = model.init_cache(2, 130)
        outs = [model.step(x[:, :prefill], cache)] + [model.step(x[:, t: t + 1], cache) for t in range(prefill, 130)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-4)
    assert cache.length == 130 and cache.nbytes() == model.state_bytes(130, batch_size=2)


def test_constant_and_growing_state():
    for name, grows in (("s4d", False), ("h3", False), ("rg_lru", False), ("base_conv", False), ("hyena", True)):
        m = build(name, {})
        assert (m.state_bytes(4096) > m.state_bytes(64)) == grows, name
    assert build("base_conv", {"implicit_long_conv": True}).state_bytes(4096) == 64 * build(
        "base_conv", {"implicit_long_conv": True}).state_bytes(64)


def test_s4d_initialisation_is_the_papers():
    lin = build("s4d", {"d_state": 16}).ssm
    n = torch.arange(8, dtype=torch.float32)
    torch.testing.assert_close(lin.A_imag[3], math.pi * n)
    torch.testing.assert_close(lin.log_A_real.exp(), torch.full((D, 8), 0.5))
    inv = build("s4d", {"d_state": 16, "init": "inv"}).ssm
    torch.testing.assert_close(inv.A_imag[0], (16 / math.pi) * (16 / (2 * n + 1) - 1))
    dt = lin.log_dt.exp()
    assert dt.min() >= 1e-3 and dt.max() <= 1e-1
    assert torch.equal(lin.B[..., 0], torch.ones(D, 8)) and torch.equal(lin.B[..., 1], torch.zeros(D, 8))
    c = torch.view_as_complex(build("s4d", {"d_state": 256}, seed=3).ssm.C)
    assert abs(c.abs().pow(2).mean().item() - 1.0) < 0.1  # C ~ N(0, 1) complex


def test_s4d_kernel_equals_its_recurrence_step_by_step():
    ssm = build("s4d", {"d_state": 8}).ssm
    length = 200
    kernel = ssm.kernel(length)
    impulse = torch.zeros(1, length, D)
    impulse[:, 0] = 1.0
    state = ssm.init_state(1)
    with torch.no_grad():
        response = torch.cat([ssm.step(impulse[:, t: t + 1], state) for t in range(length)], 1)[0].t()
    response[:, 0] -= ssm.D.detach()  # the skip is not part of the kernel
    torch.testing.assert_close(kernel.detach(), response, rtol=1e-4, atol=1e-5)


def test_rg_lru_initialisation_and_gates():
    m = build("rg_lru", {})
    a = torch.sigmoid(m.a_param)
    assert m.width == round(4 * D / 3) and a.min() >= 0.9 and a.max() <= 0.999
    assert abs((a**2).mean().item() - (0.9**2 + 0.999**2) / 2) < 0.02  # a² uniform on [0.9², 0.999²]
    a_t, x_in = m._lru_inputs(torch.randn(2, 5, m.width))
    assert ((a_t > 0) & (a_t < 1)).all()
    # the input is normalised by sqrt(1 - a²): unit-variance inputs keep the state at unit variance
    from archs.ops.diagonal_recurrence import diagonal_recurrence

    torch.manual_seed(0)
    a_fix = torch.full((64, 4000, 1), 0.99)
    h = diagonal_recurrence(a_fix, torch.sqrt(1 - a_fix**2) * torch.randn(64, 4000, 1))
    assert abs(h[:, 2000:].var().item() - 1.0) < 0.1


def test_hyena_filter_extends_past_l_max():
    """Positions are normalised by l_max and evaluated further out: a longer sequence runs, its first
    l_max filter taps are the training-length ones, and decoding past l_max still equals the forward."""
    m = build("hyena", {"l_max": 16}).eval()
    k_short, k_long = m.filter(16), m.filter(48)
    torch.testing.assert_close(k_long[:, :16], k_short)
    assert k_long[:, 40:].abs().max() < k_long[:, :8].abs().max()  # the window keeps decaying
    x = torch.randn(1, 48, D)
    with torch.no_grad():
        full = m(x)
        cache = m.init_cache(1, 48)
        outs = [m.step(x[:, t: t + 1], cache) for t in range(48)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-4)


def test_base_conv_zoology_filter_is_a_relu_mlp_of_the_position_without_a_window():
    """Zoology's BaseConv filter (the default): Linear(3, 16), ReLU, Linear(16, d), nothing decaying it with the
    lag — a filter whose MLP outputs a constant stays that constant at every lag, where Hyena's window shrinks
    it. Hyena's filter stays one option away, with its own default width (64)."""
    zoo, hyena = (build("base_conv", {"kernel_size": -1, "l_max": 64, **extra})
                  for extra in ({}, {"long_filter": "hyena"}))
    assert (zoo.opts.long_filter, zoo.opts.filter_order, hyena.opts.filter_order) == ("zoology", 16, 64)
    assert [type(m) for m in zoo.filter.ffn] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert zoo.filter.ffn[0].out_features == 16 and zoo.filter.ffn[2].out_features == D
    assert hyena.filter.ffn[0].out_features == 64 and hyena.filter.deltas.min() > 0
    with torch.no_grad():
        zoo.filter.ffn[-1].weight.zero_()
        zoo.filter.ffn[-1].bias.fill_(0.5)
    k = zoo.filter(256)
    torch.testing.assert_close(k, torch.full((D, 256), 0.5))
    assert zoo.filter.flops() < hyena.filter.flops()
    with pytest.raises(ValueError, match=r"long_filter must be one of \('hyena', 'zoology'\), got 'relu'"):
        build("base_conv", {"kernel_size": -1, "long_filter": "relu"})


@pytest.mark.parametrize("name", ["s4d", "h3", "hyena", "rg_lru", "mamba"])
def test_a_step_with_another_cache_or_batch_is_refused(name):
    m, other = build(name, {}), build("s4d" if name != "s4d" else "h3", {})
    x = torch.randn(2, 3, D)
    with pytest.raises(TypeError, match=rf"{name}.step needs its \w+Cache \(from init_cache\), got"):
        m.step(x, other.init_cache(2, 8))
    with pytest.raises(ValueError, match=r"holds batch size 3, the input has 2; make it with init_cache\(batch_size=2"):
        m.step(x, m.init_cache(3, 8))
