"""The `mamba` mixer: mamba-ssm's parameters and initialisation, backend parity, decoding, costs, and (when
mamba-ssm is installed) state_dict round trips and equal outputs against mamba-ssm's own PyTorch path."""

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from archs.mixers.mamba import Mamba, MambaCache, MambaOptions
from registry import MIXERS, RegistryError

D_MODEL = 64
KEYS = {  # mamba-ssm's Mamba(d_model=64): E = 128, N = 16, R = 4, d_conv = 4
    "A_log": ((128, 16), torch.float32),
    "D": ((128,), torch.float32),
    "in_proj.weight": ((256, 64), torch.float32),
    "conv1d.weight": ((128, 1, 4), torch.float32),
    "conv1d.bias": ((128,), torch.float32),
    "x_proj.weight": ((36, 128), torch.float32),
    "dt_proj.weight": ((128, 4), torch.float32),
    "dt_proj.bias": ((128,), torch.float32),
    "out_proj.weight": ((64, 128), torch.float32),
}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.double().norm().item()
    diff = (got.double() - want.double()).norm().item()
    return diff / scale if scale > 0 else diff


def build(seed: int = 0, **options) -> Mamba:
    torch.manual_seed(seed)
    return MIXERS.create("mamba", d_model=D_MODEL, **options)


def perturb(m: Mamba, seed: int = 1) -> Mamba:
    """Move parameters off their structured init (A = -(1..N), D = 1) so tests see general values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m


# parameters and initialisation --------------------------------------------------------------------------

def test_registered_with_docstring():
    assert MIXERS.get("mamba") is Mamba
    assert "Gu & Dao 2023" in sys.modules[Mamba.__module__].__doc__


def test_state_dict_matches_mamba_ssm_names_shapes_dtypes():
    sd = build().state_dict()
    assert list(sd) == list(KEYS)
    for k, (shape, dtype) in KEYS.items():
        assert tuple(sd[k].shape) == shape and sd[k].dtype == dtype, k


def test_bias_options_add_the_bias_keys():
    sd = build(bias=True, conv_bias=False).state_dict()
    assert "in_proj.bias" in sd and "out_proj.bias" in sd and "conv1d.bias" not in sd


def test_initialisation():
    opts = MambaOptions()
    m = build()
    e, n = m.d_inner, m.d_state
    assert m.dt_rank == math.ceil(D_MODEL / 16)
    torch.testing.assert_close(m.A_log, torch.log(torch.arange(1, n + 1).float()).expand(e, n))
    assert torch.equal(m.D, torch.ones(e))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= opts.dt_init_floor * 0.999 and dt.min() >= opts.dt_min * 0.999
    assert dt.max() <= opts.dt_max * 1.001
    std = m.dt_rank**-0.5 * opts.dt_scale
    assert m.dt_proj.weight.abs().max() <= std
    assert build(dt_init="constant").dt_proj.weight.eq(std).all()
    assert getattr(m.A_log, "_no_weight_decay", False) and getattr(m.D, "_no_weight_decay", False)


@pytest.mark.parametrize("bad", [
    {"d_state": 0}, {"d_conv": -1}, {"expand": 0}, {"dt_rank": 0}, {"dt_rank": "big"}, {"dt_min": 0.5},
    {"dt_init": "normal"}, {"scan": "triton"}, {"chunk_size": 0}, {"dt_init_floor": -1.0},
])
def test_bad_options_fail_before_building(bad):
    with pytest.raises(RegistryError):
        MIXERS.create("mamba", d_model=D_MODEL, **bad)
    with pytest.raises(ValueError):
        MambaOptions(**bad)


def test_unknown_option_is_named():
    with pytest.raises(RegistryError, match="d_sate.*did you mean 'd_state'"):
        MIXERS.create("mamba", d_model=D_MODEL, d_sate=8)


# backends ------------------------------------------------------------------------------------------------

def test_available_backends():
    b = Mamba.available_backends()
    assert b["chunked"] == "yes" and b["reference"] == "yes"
    if not torch.cuda.is_available():
        assert b["cuda"] != "yes" and b["cuda"]


def test_auto_runs_chunked_on_cpu_and_records_it():
    m = build()
    m(torch.randn(1, 5, D_MODEL))
    assert m.backend == "chunked"
    r = build(scan="reference")
    r(torch.randn(1, 5, D_MODEL))
    assert r.backend == "reference"


def test_cuda_scan_on_cpu_is_an_error():
    m = build(scan="cuda")
    with pytest.raises(RuntimeError, match="CUDA"):
        m(torch.randn(1, 5, D_MODEL))


@pytest.mark.parametrize("t", [1, 7, 63, 130])
def test_chunked_layer_matches_reference_layer(t):
    """Outputs and the gradients of the input and of every parameter."""
    ref = perturb(build(scan="reference"))
    fast = build(scan="chunked", chunk_size=16)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, t, D_MODEL, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y_ref, y = ref(x), fast(x2)
    y_ref.square().sum().backward()
    y.square().sum().backward()
    assert rel_err(y, y_ref) <= 1e-4
    assert rel_err(x2.grad, x.grad) <= 1e-4
    ref_grads = dict(ref.named_parameters())
    for k, p in fast.named_parameters():
        assert rel_err(p.grad, ref_grads[k].grad) <= 1e-4, k


# decoding ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scan", ["chunked", "reference"])
@pytest.mark.parametrize("prefill", [1, 2, 9])
def test_prefill_then_steps_equals_forward(scan, prefill):
    m = perturb(build(scan=scan)).eval()
    x = torch.randn(2, 20, D_MODEL)
    with torch.no_grad():
        full = m(x)
        cache = m.init_cache(2, 20)
        outs = [m.step(x[:, :prefill], cache)]
        t = prefill
        for size in (1, 3, 1, 1, 2):  # one-token steps and short prefills after cached tokens
            outs.append(m.step(x[:, t: t + size], cache))
            t += size
        while t < 20:
            outs.append(m.step(x[:, t: t + 1], cache))
            t += 1
    assert cache.length == 20
    assert rel_err(torch.cat(outs, 1), full) <= 1e-5


def test_cache_holds_the_last_pre_conv_inputs():
    m = build().eval()
    x = torch.randn(1, 6, D_MODEL)
    cache = m.init_cache(1, 6)
    with torch.no_grad():
        m.step(x, cache)
        xc = F.linear(x, m.in_proj.weight[: m.d_inner])  # (1, 6, E): the inputs of the convolution
    assert isinstance(cache, MambaCache)
    assert cache.conv_state.shape == (1, m.d_inner, m.d_conv) and cache.ssm_state.dtype == torch.float32
    torch.testing.assert_close(cache.conv_state, xc[0, -m.d_conv:].t()[None])


def test_step_cost_is_constant_in_context_length():
    m = build().eval()
    cache = m.init_cache(1, 1000)
    shapes = None
    with torch.no_grad():
        m.step(torch.randn(1, 50, D_MODEL), cache)
        for _ in range(3):
            m.step(torch.randn(1, 1, D_MODEL), cache)
            now = [tuple(t.shape) for t in cache.tensors()]
            assert shapes is None or now == shapes
            shapes = now


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_bytes_equal_the_cache(dtype):
    m = build().to(dtype).eval()
    for t in (1, 17):
        cache = m.init_cache(3, t, dtype=dtype)
        with torch.no_grad():
            m.step(torch.randn(3, t, D_MODEL, dtype=dtype), cache)
        assert cache.nbytes() == m.state_bytes(t, batch_size=3, dtype=dtype) > 0
    assert m.state_bytes(10) == m.state_bytes(100000)


def test_flops_per_token():
    m = build()
    f = m.flops_per_token(128)
    assert isinstance(f, int) and f == m.flops_per_token(4096)
    d, e = D_MODEL, m.d_inner
    assert f > 2 * (2 * d * e + e * d)  # at least in_proj and out_proj


def test_bfloat16_layer_runs():
    m = build().to(torch.bfloat16)
    x = torch.randn(2, 9, D_MODEL, dtype=torch.bfloat16, requires_grad=True)
    y = m(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    y.float().square().mean().backward()
    assert torch.isfinite(x.grad.float()).all()


# mamba-ssm compatibility (only where mamba-ssm is installed) --------------------------------------------

@pytest.fixture
def mamba_ssm(monkeypatch, request):
    """mamba-ssm's modules, usable on CPU through its pure-PyTorch reference path.

    Without a GPU mamba-ssm's CUDA extension ``selective_scan_cuda`` is absent and ``import mamba_ssm``
    fails; a stand-in module lets the package import (its CUDA functions are never called here). The scan
    and convolution it would call are pointed at ``selective_scan_ref`` and ``F.conv1d``. Everything is
    undone afterwards.
    """
    request.getfixturevalue("mamba_ssm_on_cpu")
    try:
        import mamba_ssm.modules.mamba_simple as simple
        import mamba_ssm.ops.selective_scan_interface as ssi
    except ImportError as exc:
        pytest.skip(f"mamba_ssm not importable: {exc}")

    def conv_fn(x, weight, bias=None, activation=None, **_):
        y = F.conv1d(x, weight[:, None], bias, padding=weight.shape[1] - 1, groups=weight.shape[0])
        y = y[..., : x.shape[-1]]
        return F.silu(y) if activation in ("silu", "swish") else y

    monkeypatch.setattr(simple, "selective_scan_fn", ssi.selective_scan_ref)
    monkeypatch.setattr(simple, "causal_conv1d_fn", None)
    monkeypatch.setattr(simple, "causal_conv1d_update", None)
    monkeypatch.setattr(simple, "selective_state_update", None)
    monkeypatch.setattr(ssi, "selective_scan_fn", ssi.selective_scan_ref)
    monkeypatch.setattr(ssi, "causal_conv1d_fn", conv_fn)
    yield types.SimpleNamespace(Mamba=simple.Mamba, selective_scan_ref=ssi.selective_scan_ref,
                                mamba_inner_ref=ssi.mamba_inner_ref)
    monkeypatch.undo()
    from archs.mixers import mamba as ours

    ours._cuda_kernels.cache_clear()


def test_their_state_dict_loads_strictly_and_gives_our_outputs(mamba_ssm):
    torch.manual_seed(0)
    theirs = perturb(mamba_ssm.Mamba(D_MODEL, use_fast_path=False))
    ours = build(seed=5)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 37, D_MODEL)
    with torch.no_grad():
        assert rel_err(ours(x), theirs(x)) <= 1e-5


def test_our_state_dict_loads_strictly_into_theirs(mamba_ssm):
    ours = perturb(build(seed=3))
    theirs = mamba_ssm.Mamba(D_MODEL, use_fast_path=False)
    assert set(theirs.state_dict()) == set(ours.state_dict())
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 37, D_MODEL)
    with torch.no_grad():
        assert rel_err(theirs(x), ours(x)) <= 1e-5


def test_same_init_distribution_as_theirs(mamba_ssm):
    torch.manual_seed(0)
    theirs = mamba_ssm.Mamba(D_MODEL, use_fast_path=False)
    torch.manual_seed(0)
    ours = Mamba(D_MODEL)
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, msg=k)


def test_matches_mamba_inner_ref(mamba_ssm):
    m = perturb(build())
    x = torch.randn(2, 29, D_MODEL)
    with torch.no_grad():
        xz = (x @ m.in_proj.weight.t()).transpose(1, 2)
        want = mamba_ssm.mamba_inner_ref(xz, m.conv1d.weight, m.conv1d.bias, m.x_proj.weight, m.dt_proj.weight,
                                         m.out_proj.weight, m.out_proj.bias, -torch.exp(m.A_log.float()),
                                         None, None, m.D.float(), delta_bias=m.dt_proj.bias.float())
        assert rel_err(m(x), want) <= 1e-5


def test_scan_matches_selective_scan_ref_with_gradients(mamba_ssm):
    from archs.ops.selective_scan import selective_scan_chunked

    g = torch.Generator().manual_seed(0)
    b, e, n, t = 2, 8, 4, 77
    ins = [torch.randn(b, e, t, generator=g), torch.randn(b, e, t, generator=g) - 1,
           -torch.rand(e, n, generator=g) - 0.5, torch.randn(b, n, t, generator=g),
           torch.randn(b, n, t, generator=g), torch.randn(e, generator=g), torch.randn(b, e, t, generator=g),
           torch.randn(e, generator=g)]
    ins = [v.requires_grad_() for v in ins]
    want, want_last = mamba_ssm.selective_scan_ref(*ins[:6], z=ins[6], delta_bias=ins[7], delta_softplus=True,
                                                   return_last_state=True)
    got, got_last = selective_scan_chunked(*ins, delta_softplus=True, chunk_size=16, return_last_state=True)
    assert rel_err(got, want) <= 1e-5 and rel_err(got_last, want_last) <= 1e-5
    dy = torch.randn(want.shape, generator=g)
    for a, c in zip(torch.autograd.grad(got, ins, dy), torch.autograd.grad(want, ins, dy), strict=True):
        assert rel_err(a, c) <= 1e-4


def test_decoding_matches_their_step(mamba_ssm):
    torch.manual_seed(0)
    theirs = perturb(mamba_ssm.Mamba(D_MODEL, use_fast_path=False)).eval()
    ours = build().eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 6, D_MODEL)
    cache = ours.init_cache(2, 6)
    conv_state = torch.zeros(2, theirs.d_inner, theirs.d_conv)
    ssm_state = torch.zeros(2, theirs.d_inner, theirs.d_state)
    with torch.no_grad():
        for t in range(6):
            want, conv_state, ssm_state = theirs.step(x[:, t: t + 1], conv_state, ssm_state)
            got = ours.step(x[:, t: t + 1], cache)
            assert rel_err(got, want) <= 1e-5
    torch.testing.assert_close(cache.conv_state, conv_state)
    torch.testing.assert_close(cache.ssm_state, ssm_state, rtol=1e-5, atol=1e-6)


# GPU ----------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_chunked_matches_mamba_ssm_cuda_kernels():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if Mamba.available_backends()["cuda"] != "yes":
        pytest.skip(Mamba.available_backends()["cuda"])
    from mamba_ssm.modules.mamba_simple import Mamba as TheirMamba

    torch.manual_seed(0)
    theirs = perturb(TheirMamba(D_MODEL)).cuda()
    kernel = build(scan="cuda").cuda()
    fast = build(scan="chunked").cuda()
    kernel.load_state_dict(theirs.state_dict())
    fast.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 300, D_MODEL, device="cuda")
    xs = [x.clone().requires_grad_() for _ in range(3)]
    outs = [m(xi) for m, xi in zip((theirs, kernel, fast), xs, strict=True)]
    assert kernel.backend == "cuda" and fast.backend == "chunked"
    for o in outs:
        o.square().mean().backward()
    assert rel_err(outs[2], outs[0]) <= 1e-3 and rel_err(outs[1], outs[0]) <= 1e-3
    assert rel_err(xs[2].grad, xs[0].grad) <= 1e-3
    their_params = dict(theirs.named_parameters())
    for k, p in fast.named_parameters():
        assert rel_err(p.grad, their_params[k].grad) <= 1e-3, k
