"""The chunked gated linear recurrence and the chunkwise delta rule against their per-token references:
outputs, final states and every gradient (inputs, gates, β, initial state) under random cotangents, as a
relative RMS error (fla's metric), on odd lengths, chunk sizes 16/32/64, weak/medium/strong gates
(``logsigmoid`` scaled by 0.1, 1, 10), d_k ≠ d_v and head widths that are not multiples of 16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archs.ops.delta_rule import delta_rule_chunked, delta_rule_reference
from archs.ops.linear_recurrence import (
    linear_recurrence_chunked,
    linear_recurrence_reference,
    taylor_features,
    taylor_recurrence_chunked,
)

B, H, K, V = 2, 3, 20, 12
LENGTHS = [1, 7, 63, 257, 1000]
CASES = [(t, (16, 32, 64)[i % 3], s) for i, t in enumerate(LENGTHS) for s in (0.1, 1.0, 10.0)]
IDS = [f"T{t}-C{c}-g{s}" for t, c, s in CASES]
TOL = 1e-4  # fla allows 5e-3 (outputs) to 2e-2 (gate gradients) in half precision; this is fp32


def rel_rms(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _run(fn, inputs: dict[str, torch.Tensor], cotangents: tuple[torch.Tensor, torch.Tensor] | None,
         dtype: torch.dtype, **kw) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Outputs, final state and the gradient of every input under the cotangents (drawn if None)."""
    leaves = {k: v.detach().to(dtype).clone().requires_grad_() for k, v in inputs.items()}
    o, s = fn(**leaves, output_final_state=True, **kw)
    do, ds = cotangents if cotangents is not None else (torch.randn_like(o), torch.randn_like(s))
    grads = torch.autograd.grad((o * do.to(dtype)).sum() + (s * ds.to(dtype)).sum(), list(leaves.values()))
    results = {"output": o, "final state": s} | {f"d{name}": g for name, g in zip(leaves, grads, strict=True)}
    return {k: v.detach().double() for k, v in results.items()}, (do, ds)


def compare(ref_fn, fast_fn, inputs: dict[str, torch.Tensor], chunk: int, **kw) -> None:
    """Every result within TOL of the fp32 reference; where one is not (a gradient that is a sum of terms
    cancelling to ~1e-7, as for a fixed decay of exp(-20)), the fp64 reference decides: the chunked error
    must then be no worse than twice the fp32 reference's own."""
    ref, cot = _run(ref_fn, inputs, None, torch.float32, **kw)
    fast, _ = _run(fast_fn, inputs, cot, torch.float32, chunk_size=chunk, **kw)
    errors = {k: rel_rms(fast[k], ref[k]) for k in ref}
    if any(not e <= TOL for e in errors.values()):
        exact, _ = _run(ref_fn, inputs, cot, torch.float64, **kw)
        errors = {k: rel_rms(fast[k], exact[k]) / max(TOL, 2 * rel_rms(ref[k], exact[k])) * TOL for k in ref}
    bad = {k: f"{v:.1e}" for k, v in errors.items() if not v <= TOL}
    assert not bad, f"relative RMS errors above {TOL}: {bad}"


def qkv(t: int) -> dict[str, torch.Tensor]:
    return {"q": torch.randn(B, t, H, K), "k": torch.randn(B, t, H, K), "v": torch.randn(B, t, H, V),
            "initial_state": torch.randn(B, H, K, V)}


@pytest.mark.parametrize(("t", "chunk", "strength"), CASES, ids=IDS)
@pytest.mark.parametrize("gate", ["none", "per-head", "per-channel", "fixed"])
def test_linear_recurrence_chunked_equals_reference(t, chunk, strength, gate):
    torch.manual_seed(t)
    inputs = qkv(t)
    kw = {}
    if gate == "per-head":
        inputs["g"] = F.logsigmoid(torch.randn(B, t, H)) * strength
    elif gate == "per-channel":
        inputs["g"] = F.logsigmoid(torch.randn(B, t, H, K)) * strength
    elif gate == "fixed":
        inputs["g_gamma"] = F.logsigmoid(torch.randn(H)) * strength
    compare(linear_recurrence_reference, linear_recurrence_chunked, inputs, chunk, **kw)


@pytest.mark.parametrize(("t", "chunk", "strength"), CASES, ids=IDS)
@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
def test_delta_rule_chunked_equals_reference(t, chunk, strength, gated):
    torch.manual_seed(t)
    inputs = qkv(t)
    inputs["q"], inputs["k"] = F.normalize(inputs["q"], dim=-1), F.normalize(inputs["k"], dim=-1)
    inputs["beta"] = torch.rand(B, t, H)
    if gated:
        inputs["g"] = F.logsigmoid(torch.randn(B, t, H)) * strength
    compare(delta_rule_reference, delta_rule_chunked, inputs, chunk)


def _taylor_reference(q, k, v, **kw):
    return linear_recurrence_reference(taylor_features(q), taylor_features(k), v, scale=1.0, **kw)


@pytest.mark.parametrize(("t", "chunk", "scale"), CASES, ids=[i.replace("-g", "-x") for i in IDS])
@pytest.mark.parametrize("d", [16, 5])
def test_taylor_recurrence_chunked_equals_reference(t, chunk, scale, d):
    """Based's recurrence: within a chunk 1 + s + s²/2 of s = q·k/√d, not the features' product; q and k
    small (the linear term leads), unit, or large (the square leads)."""
    torch.manual_seed(t + d)
    features = 1 + d + d * (d + 1) // 2
    inputs = {"q": torch.randn(B, t, H, d) * scale, "k": torch.randn(B, t, H, d), "v": torch.randn(B, t, H, V),
              "initial_state": torch.randn(B, H, features, V)}
    compare(_taylor_reference, taylor_recurrence_chunked, inputs, chunk)


def test_taylor_features_dot_products_are_the_taylor_kernel():
    torch.manual_seed(0)
    x, y = torch.randn(7, 16, dtype=torch.float64), torch.randn(7, 16, dtype=torch.float64)
    s = (x * y).sum(-1) / 4.0
    assert torch.allclose((taylor_features(x) * taylor_features(y)).sum(-1), 1 + s + s * s / 2)
    assert taylor_features(x).shape[-1] == 1 + 16 + 16 * 17 // 2


@pytest.mark.parametrize("fn", [linear_recurrence_chunked, delta_rule_chunked])
def test_results_do_not_depend_on_the_chunk_size(fn):
    torch.manual_seed(0)
    inputs = qkv(100)
    if fn is delta_rule_chunked:
        inputs["beta"] = torch.rand(B, 100, H)
    inputs["g"] = F.logsigmoid(torch.randn(B, 100, H))
    outs = [fn(**inputs, chunk_size=c, output_final_state=True) for c in (1, 13, 64, 128)]
    for o, s in outs[1:]:
        assert rel_rms(o, outs[0][0]) < 1e-5 and rel_rms(s, outs[0][1]) < 1e-5


def test_a_decay_that_vanishes_within_a_chunk_stays_finite():
    """A per-channel gate of -1000 per step: the factored form would overflow; the stable form is exact."""
    torch.manual_seed(0)
    inputs = qkv(50)
    g = F.logsigmoid(torch.randn(B, 50, H, K))
    g[:, :, :, :5] = -1000.0
    o, s = linear_recurrence_chunked(**inputs, g=g, output_final_state=True)
    ref_o, ref_s = linear_recurrence_reference(**inputs, g=g, output_final_state=True)
    assert torch.isfinite(o).all() and rel_rms(o, ref_o) < 1e-5 and rel_rms(s, ref_s) < 1e-5


def test_shape_errors_name_the_argument():
    inputs = qkv(5)
    with pytest.raises(ValueError, match="g must be"):
        linear_recurrence_chunked(**inputs, g=torch.zeros(B, 5, H, K + 1))
    with pytest.raises(ValueError, match="beta must be"):
        delta_rule_chunked(**inputs, beta=torch.zeros(B, 5))
