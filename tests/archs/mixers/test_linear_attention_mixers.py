"""The linear-attention family against flash-linear-attention's layers: same option names, same parameter
names, shapes and initialisation (one seed gives equal weights), state dicts loading both ways with
``strict=True``, and equal outputs and gradients — fla's kernels routed to its pure-PyTorch references
(the ``fla`` fixture). Plus each mixer's backends against each other, and decoding against the forward."""

from __future__ import annotations

import pytest
import torch

from registry import MIXERS

D = 48
B, T = 2, 70  # T > 64: fla's layers take their chunked mode (routed to the references here)

# (our mixer, fla layer class, options given to both)
CASES = [
    ("gla", "GatedLinearAttention", {}),
    ("gla", "GatedLinearAttention", {"num_kv_heads": 2, "use_short_conv": True, "conv_bias": True,
                                     "feature_map": "relu", "clamp_min": -0.05, "gate_low_rank_dim": 8}),
    ("gla", "GatedLinearAttention", {"expand_k": 1.0, "num_heads": 3, "fuse_norm": False, "gate_fn": "sigmoid",
                                     "gate_logit_normalizer": 4}),
    ("gla", "GatedLinearAttention", {"use_output_gate": False, "elementwise_affine": False}),
    ("retention", "MultiScaleRetention", {}),
    ("retention", "MultiScaleRetention", {"num_heads": 4, "num_kv_heads": 2, "use_short_conv": True}),
    ("retention", "MultiScaleRetention", {"num_heads": 4, "expand_k": 0.5, "fuse_norm": False, "gate_fn": "sigmoid"}),
    ("retention", "MultiScaleRetention", {"use_output_gate": False, "feature_map": "relu"}),
    ("linear_attention", "LinearAttention", {}),
    ("linear_attention", "LinearAttention", {"feature_map": "hedgehog", "do_feature_map_norm": True,
                                             "num_kv_heads": 4}),
    ("linear_attention", "LinearAttention", {"feature_map": "elu", "norm_q": True, "norm_k": True,
                                             "output_norm": "identity", "num_heads": 4}),
    ("linear_attention", "LinearAttention", {"feature_map": "dpfp", "do_feature_map_norm": True, "num_heads": 4}),
    ("linear_attention", "LinearAttention", {"feature_map": "t2r", "tie_feature_map_qk": True, "expand_v": 0.5}),
    ("based", "BasedLinearAttention", {}),
    ("based", "BasedLinearAttention", {"num_heads": 4, "num_key_value_heads": 4, "feature_dim": 8}),
    ("based", "BasedLinearAttention", {"num_heads": 6, "num_key_value_heads": 6, "feature_dim": 5}),
    ("deltanet", "DeltaNet", {}),
    ("deltanet", "DeltaNet", {"use_gate": True, "allow_neg_eigval": True, "conv_bias": True, "num_heads": 3}),
    ("deltanet", "DeltaNet", {"qk_activation": "elu", "qk_norm": "sum", "use_beta": False}),
    ("deltanet", "DeltaNet", {"use_short_conv": False, "expand_k": 0.5, "qk_activation": "relu"}),
    ("gated_deltanet", "GatedDeltaNet", {"head_dim": 16, "num_heads": 3}),
    ("gated_deltanet", "GatedDeltaNet", {"head_dim": 8, "num_heads": 2, "num_v_heads": 4, "expand_v": 1.5,
                                         "allow_neg_eigval": True, "conv_bias": True}),
    ("gated_deltanet", "GatedDeltaNet", {"head_dim": 12, "num_heads": 2, "use_gate": False,
                                         "use_short_conv": False}),
    ("gated_deltanet", "GatedDeltaNet", {"head_dim": 16, "num_heads": 2, "output_gate_activation": "sigmoid"}),
]


def assert_rms_close(got: torch.Tensor, ref: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    """Relative RMS error ``‖got - ref‖ / ‖ref‖`` at most ``tol`` (fla's metric; fp32 here, so far tighter)."""
    err = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err <= tol, f"{what}: relative RMS error {err:.2e} > {tol:.0e}"


def _perturb(module: torch.nn.Module) -> None:
    """Move every parameter off its initial value (norm weights start at one, biases at zero)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize(("name", "layer", "options"), CASES,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CASES)])
def test_matches_fla(fla, name, layer, options):
    torch.manual_seed(0)
    theirs = getattr(fla, layer)(hidden_size=D, **options)
    torch.manual_seed(0)
    ours = MIXERS.create(name, d_model=D, **options)
    ref, got = theirs.state_dict(), ours.state_dict()
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    for key, value in ref.items():  # the same initialisation: one seed, equal weights
        assert torch.equal(got[key], value), f"{name}: {key} initialised differently from fla's {layer}"

    _perturb(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(B, T, D)
    x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_theirs, y_ours = theirs(x_theirs), ours(x_ours)
    if isinstance(y_theirs, tuple):  # (o, attentions, cache); BasedLinearAttention returns o alone
        y_theirs = y_theirs[0]
    assert_rms_close(y_ours, y_theirs, f"{name} output")
    cotangent = torch.randn_like(y_ours)
    (y_theirs * cotangent).sum().backward()
    (y_ours * cotangent).sum().backward()
    assert_rms_close(x_ours.grad, x_theirs.grad, f"{name} input gradient")
    grads = dict(theirs.named_parameters())
    for pname, p in ours.named_parameters():
        # a parameter's gradient sums over every token: fp32 rounding of that sum (fla allows 2.5x more
        # for gate gradients than for outputs)
        assert_rms_close(p.grad, grads[pname].grad, f"{name} gradient of {pname}", tol=5e-5)


@pytest.mark.parametrize(("name", "options"), [(n, o) for n, _, o in CASES],
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CASES)])
def test_chunked_equals_reference(name, options):
    torch.manual_seed(0)
    chunked = MIXERS.create(name, d_model=D, impl="chunked", chunk_size=16, **options)
    reference = MIXERS.create(name, d_model=D, impl="reference", **options)
    reference.load_state_dict(chunked.state_dict())
    x = torch.randn(B, 37, D, requires_grad=True)
    y = chunked(x)
    torch.testing.assert_close(y, reference(x), rtol=1e-4, atol=1e-5)
    assert chunked.backend == "chunked" and reference.backend == "reference"


@pytest.mark.parametrize(("name", "options"), [(n, o) for n, _, o in CASES],
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CASES)])
@pytest.mark.parametrize("prefill", [1, 6, 40])
def test_decoding_equals_forward(name, options, prefill):
    torch.manual_seed(0)
    m = MIXERS.create(name, d_model=D, chunk_size=16, **options).eval()
    x = torch.randn(B, 45, D)
    full = m(x)
    cache = m.init_cache(B, 45)
    outs = [m.step(x[:, :prefill], cache)]
    outs += [m.step(x[:, t: t + 1], cache) for t in range(prefill, 45)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-5)
    assert cache.nbytes() == m.state_bytes(45, batch_size=B) == m.state_bytes(10_000, batch_size=B)


FLA_CHUNKED = {"DeltaNet": ("deltanet", {}), "GatedDeltaNet": ("gated_deltanet", {"head_dim": 16, "num_heads": 3}),
               "LinearAttention": ("linear_attention", {}), "MultiScaleRetention": ("retention", {}),
               "BasedLinearAttention": ("based", {})}


@pytest.mark.parametrize("layer", sorted(FLA_CHUNKED))
def test_fla_chunked_references_agree(monkeypatch, layer):
    """fla's naive chunked forms (the benchmark's `fla/chunk` peers) compute what our mixers compute."""
    pytest.importorskip("fla.layers")
    from benchmarks.fla_cpu import CHUNKED_LAYERS, install

    assert layer in CHUNKED_LAYERS
    fla = install(monkeypatch.setattr, monkeypatch.setitem, ops="chunk")
    name, options = FLA_CHUNKED[layer]
    torch.manual_seed(0)
    theirs = getattr(fla, layer)(hidden_size=D, **options)
    ours = MIXERS.create(name, d_model=D, **options)
    _perturb(theirs)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(1, 256, D)
    with torch.no_grad():
        y = theirs(x)
        assert_rms_close(ours(x), y[0] if isinstance(y, tuple) else y, f"{name} vs fla's chunked {layer}", tol=1e-4)
