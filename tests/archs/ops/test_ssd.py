"""The chunked SSD scan against the per-step recurrence: outputs, final states and every gradient."""

import pytest
import torch
import torch.nn.functional as F

import archs.ops.ssd as ssd_module
from archs.ops.ssd import _DecayScores, ssd_chunked, ssd_reference, ssd_step

LENGTHS = [1, 7, 63, 257]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both vanish)."""
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale else (a - b).abs().max().item()


def inputs(t: int, b: int = 2, h: int = 4, p: int = 8, g: int = 2, n: int = 5, d_has_hdim: bool = False,
           dtype: torch.dtype = torch.float32, seed: int = 0, dt_shift: float = -2.0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return {
        "x": rand(b, t, h, p),
        "dt": F.softplus(rand(b, t, h) + dt_shift),
        "A": -torch.empty(h, dtype=dtype).uniform_(1, 16, generator=gen),
        "B": rand(b, t, g, n),
        "C": rand(b, t, g, n),
        "D": rand(h, p) if d_has_hdim else rand(h),
        "initial_state": rand(b, h, p, n),
    }


def fwd_bwd(fn, args: dict, **kw):
    """Outputs and the gradients of every input under a fixed random projection of (y, final state)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in args.items()}
    y, final = fn(**leaves, return_final_state=True, **kw)
    gen = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=gen).to(y.dtype)).sum()
    loss = loss + (final * torch.randn(final.shape, generator=gen).to(final.dtype)).sum()
    loss.backward()
    return y.detach(), final.detach(), {k: v.grad for k, v in leaves.items()}


def assert_parity(args: dict, tol: float = 1e-4, **kw) -> None:
    y1, s1, g1 = fwd_bwd(ssd_chunked, args, **kw)
    y0, s0, g0 = fwd_bwd(ssd_reference, args)
    assert rel_err(y1, y0) <= tol, f"y: {rel_err(y1, y0):.2e}"
    assert rel_err(s1, s0) <= tol, f"final state: {rel_err(s1, s0):.2e}"
    for k in g0:
        assert torch.isfinite(g1[k]).all(), f"grad {k} not finite"
        assert rel_err(g1[k], g0[k]) <= tol, f"grad {k}: {rel_err(g1[k], g0[k]):.2e}"


@pytest.fixture(params=["auto", "stable"])
def path(request, monkeypatch):
    """Which within-chunk form `ssd_chunked` uses: picked per block by its decay, or the stable one always."""
    if request.param == "stable":
        monkeypatch.setattr(ssd_module, "_FACTORED_MAX_DECAY", -1.0)
    return request.param


@pytest.mark.parametrize("t", [63, 257])
def test_parity_factored_form(t, monkeypatch):
    monkeypatch.setattr(ssd_module, "_ssd_block", None)  # the stable form must not run
    assert_parity(inputs(t, dt_shift=-4.0), chunk_size=64)  # dt ~ 0.02: every chunk within the bound


@pytest.mark.parametrize("t", LENGTHS)
@pytest.mark.parametrize("chunk", [16, 64])
def test_parity_with_reference(t, chunk, path):
    assert_parity(inputs(t), chunk_size=chunk)


@pytest.mark.parametrize("t", [7, 63])
def test_parity_d_per_channel_one_group(t, path):
    assert_parity(inputs(t, g=1, d_has_hdim=True), chunk_size=16)


def test_parity_long_sequence(path):
    assert_parity(inputs(1000, b=1, h=2, p=4, g=1, n=4), chunk_size=64)


def test_blocks_pick_the_form_by_their_decay(monkeypatch):
    """Mild decays take the factored form, a block with a steep chunk the stable one; both match."""
    picked = []
    for name in ("_ssd_block", "_ssd_block_factored"):
        fn = getattr(ssd_module, name)
        monkeypatch.setattr(ssd_module, name, lambda *a, _fn=fn, _name=name: picked.append(_name) or _fn(*a))
    monkeypatch.setattr(ssd_module, "_BLOCK_ELEMENTS", 2 * 4 * 16 * 8)  # blocks of 16 steps here
    args = inputs(64, dt_shift=-6.0)  # dt ~ 0.0025: mild
    args["dt"][:, 40] = 20.0  # one steep step in the third block
    assert_parity(args, chunk_size=16)
    assert picked[:4] == ["_ssd_block_factored", "_ssd_block_factored", "_ssd_block", "_ssd_block_factored"]


def test_parity_without_optional_inputs():
    args = inputs(63)
    y1 = ssd_chunked(args["x"], args["dt"], args["A"], args["B"], args["C"], chunk_size=16)
    y0 = ssd_reference(args["x"], args["dt"], args["A"], args["B"], args["C"])
    assert rel_err(y1, y0) <= 1e-4


def test_fp64_matches_tightly():
    args = inputs(63, dtype=torch.float64)
    y1, s1 = ssd_chunked(**args, chunk_size=16, return_final_state=True)
    y0, s0 = ssd_reference(**args, return_final_state=True)
    assert y1.dtype == torch.float64
    assert rel_err(y1, y0) < 1e-12 and rel_err(s1, s0) < 1e-12


@pytest.mark.parametrize("t", [63, 257])
def test_chunk_size_does_not_change_results(t):
    args = inputs(t)
    ys = {c: ssd_chunked(**args, chunk_size=c, return_final_state=True) for c in (4, 16, 64, 256)}
    for c in (16, 64, 256):
        # within a chunk the decays come from differences of cumulative sums, whose fp32 rounding grows
        # with |Σ dt·A| over the chunk (here ~1 per step): ~1e-6 at chunk 64, a few 1e-6 at 256
        tol = 2e-6 if c <= 64 else 1e-5
        assert rel_err(ys[c][0], ys[4][0]) < tol, c
        assert rel_err(ys[c][1], ys[4][1]) < tol, c


def test_decay_scores_gradcheck():
    acum = (-torch.rand(1, 2, 4, 5, dtype=torch.float64)).cumsum(-1).requires_grad_()
    cb = torch.randn(1, 2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_DecayScores.apply, (acum, cb), fast_mode=True)


def test_large_decays_stay_finite():
    """Big dt·A inside a long chunk must not overflow (the decays are formed from differences, not ratios)."""
    args = inputs(300, dt_shift=3.0)  # dt ~ 3, A up to -16: |Σ dt·A| over a chunk ~ 10^4
    y1, s1, g1 = fwd_bwd(ssd_chunked, args, chunk_size=256)
    y0, s0, g0 = fwd_bwd(ssd_reference, args)
    assert torch.isfinite(y1).all() and all(torch.isfinite(g).all() for g in g1.values())
    assert rel_err(y1, y0) <= 1e-4 and rel_err(s1, s0) <= 1e-4
    for k in g0:
        assert rel_err(g1[k], g0[k]) <= 1e-4, k


def test_state_carries_a_split_sequence():
    args = inputs(50)
    full, final = ssd_chunked(**args, chunk_size=16, return_final_state=True)
    first = {k: (v[:, :20] if k in ("x", "dt", "B", "C") else v) for k, v in args.items()}
    second = {k: (v[:, 20:] if k in ("x", "dt", "B", "C") else v) for k, v in args.items()}
    y1, mid = ssd_chunked(**first, chunk_size=16, return_final_state=True)
    second["initial_state"] = mid
    y2, end = ssd_chunked(**second, chunk_size=16, return_final_state=True)
    assert rel_err(torch.cat([y1, y2], 1), full) < 1e-5 and rel_err(end, final) < 1e-5


def test_step_matches_reference():
    args = inputs(9)
    y0, s0 = ssd_reference(**args, return_final_state=True)
    state = args["initial_state"].clone()
    ys = [ssd_step(args["x"][:, i], args["dt"][:, i], args["A"], args["B"][:, i], args["C"][:, i], args["D"], state)
          for i in range(9)]
    assert rel_err(torch.stack(ys, 1), y0) < 1e-6 and rel_err(state, s0) < 1e-6


def test_low_precision_inputs_keep_their_dtype():
    args = {k: v.to(torch.bfloat16) for k, v in inputs(33).items()}
    y, s = ssd_chunked(**args, chunk_size=16, return_final_state=True)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    y0 = ssd_reference(**args)
    assert rel_err(y.float(), y0.float()) < 2e-2


def test_shape_errors_are_clear():
    args = inputs(7)
    with pytest.raises(ValueError, match="ngroups=3 must divide nheads=4"):
        ssd_chunked(args["x"], args["dt"], args["A"], args["B"].repeat(1, 1, 2, 1)[:, :, :3], args["C"][:, :, :1]
                    .repeat(1, 1, 3, 1))
    with pytest.raises(ValueError, match="dt must be"):
        ssd_chunked(args["x"], args["dt"][:, :, :2], args["A"], args["B"], args["C"])
    with pytest.raises(ValueError, match="D must be"):
        ssd_chunked(args["x"], args["dt"], args["A"], args["B"], args["C"], torch.ones(3))
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_chunked(args["x"], args["dt"], args["A"], args["B"], args["C"], chunk_size=0)
