"""Registry-wide contract tests: every registered mixer — built-in or plugin — is checked here."""

import pytest
import torch

from archs.mixers import Mixer
from archs.model import LanguageModel, ModelSpec
from registry import MIXERS

D = 32
B, T = 2, 13


def names():
    return MIXERS.names()


def build(name: str) -> Mixer:
    torch.manual_seed(0)
    return MIXERS.create(name, d_model=D, layer_idx=0).eval()


@pytest.fixture(params=names())
def name(request):
    return request.param


def test_describes_itself(name):
    entry = MIXERS.entry(name)
    assert entry.description, f"{name} has no one-line description (give its class a docstring)"
    assert issubclass(entry.obj, Mixer)
    backends = MIXERS.backends(name)
    assert backends and any(ok == "yes" for ok in backends.values()), f"{name}: no backend runs here"


def test_shape_and_dtype(name):
    m = build(name)
    x = torch.randn(B, T, D)
    y = m(x)
    assert y.shape == (B, T, D) and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    assert m.backend is None or isinstance(m.backend, str)


def test_causal(name):
    m = build(name)
    x = torch.randn(B, T, D)
    y = m(x)
    for t in (0, 5, T - 2):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:]) * 3
        y2 = m(x2)
        torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], rtol=1e-5, atol=1e-5,
                                   msg=lambda s, t=t: f"{name}: outputs <= {t} changed with inputs > {t}: {s}")
        assert not torch.allclose(y2[:, t + 1:], y[:, t + 1:]), f"{name}: output ignores later inputs"


def test_finite_gradients(name):
    m = build(name).train()
    x = torch.randn(B, T, D, requires_grad=True)
    m(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}.{pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}.{pname} has a non-finite gradient"


@pytest.mark.parametrize("prefill", [1, 6])
def test_decoding_equals_forward(name, prefill):
    m = build(name)
    x = torch.randn(B, T, D)
    full = m(x)
    cache = m.init_cache(B, T)
    outs = [m.step(x[:, :prefill], cache)]
    for t in range(prefill, T):
        outs.append(m.step(x[:, t: t + 1], cache))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-5)
    assert cache.length == T


def test_state_bytes_match_the_cache(name):
    m = build(name)
    cache = m.init_cache(B, T)
    with torch.no_grad():
        m.step(torch.randn(B, T, D), cache)
    analytic = m.state_bytes(T, batch_size=B)
    assert analytic is not None and analytic > 0
    assert cache.nbytes() == analytic, f"{name}: cache holds {cache.nbytes()} bytes, state_bytes says {analytic}"


def test_flops_per_token(name):
    f = build(name).flops_per_token(T)
    assert f is None or (isinstance(f, int) and f > 0)


def test_in_a_language_model(name):
    spec = ModelSpec(vocab_size=50, d_model=D, n_layers=2, layers=[name, name], positions="none")
    model = LanguageModel(spec).eval()
    ids = torch.randint(0, 50, (B, T))
    assert model(ids).shape == (B, T, 50)
    assert model.generate(ids[:, :4], 3).shape == (B, 7)
