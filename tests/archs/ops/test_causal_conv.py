"""The causal depthwise conv vs ``F.conv1d`` and ``nn.Conv1d``: outputs and every gradient, short and odd lengths."""

import pytest
import torch

from archs.ops.causal_conv import causal_conv1d, causal_conv1d_reference


@pytest.mark.parametrize("t", [1, 3, 63, 300])
@pytest.mark.parametrize("bias", [True, False])
def test_causal_conv1d_matches_reference(t, bias):
    g = torch.Generator().manual_seed(t)
    x = torch.randn(2, t, 6, generator=g, requires_grad=True)
    w = torch.randn(6, 4, generator=g, requires_grad=True)
    b = torch.randn(6, generator=g, requires_grad=True) if bias else None
    leaves = [x, w] + ([b] if bias else [])
    for silu in (True, False):
        want = causal_conv1d_reference(x, w, b, silu)
        got = causal_conv1d(x, w, b, silu)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        dy = torch.randn(want.shape, generator=g)
        for a, c in zip(torch.autograd.grad(got, leaves, dy), torch.autograd.grad(want, leaves, dy), strict=True):
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("t", [1, 2, 3, 11])
@pytest.mark.parametrize("bias", [True, False])
def test_causal_conv1d_matches_nn_conv1d_with_exact_gradients(t, bias):
    """Against the layer the mixers hold (``nn.Conv1d(E, E, K, groups=E, padding=K-1)``), in float64."""
    conv = torch.nn.Conv1d(12, 12, kernel_size=4, groups=12, padding=3, bias=bias).double()
    x = torch.randn(3, t, 12, dtype=torch.float64, requires_grad=True)
    params = (x, conv.weight, conv.bias) if bias else (x, conv.weight)

    def ours(*args):
        return causal_conv1d(args[0], args[1][:, 0], args[2] if bias else None, silu=True)

    expected = torch.nn.functional.silu(conv(x.transpose(1, 2))[..., :t].transpose(1, 2))
    torch.testing.assert_close(ours(*params), expected)
    assert torch.autograd.gradcheck(ours, params, fast_mode=True)


def test_causal_conv1d_names_the_expected_shapes():
    with pytest.raises(ValueError, match=r"x: \(B, T, E\) and weight: \(E, K\)"):
        causal_conv1d(torch.randn(2, 5, 6), torch.randn(4, 3))


def test_causal_conv1d_accumulates_half_precision_in_fp32():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 50, 8, generator=g).bfloat16().requires_grad_()
    w = torch.randn(8, 4, generator=g).bfloat16().requires_grad_()
    b = torch.randn(8, generator=g).bfloat16().requires_grad_()
    y = causal_conv1d(x, w, b)
    y.float().sum().backward()
    assert y.dtype == x.grad.dtype == w.grad.dtype == b.grad.dtype == torch.bfloat16
    want = causal_conv1d_reference(x.detach().float(), w.detach().float(), b.detach().float())
    torch.testing.assert_close(y.float(), want, rtol=1e-2, atol=1e-2)  # one rounding of the output
