"""The ops of the long-convolution and LTI mixers against their references: the FFT long convolution
(forward and both gradients at T = 1, 7, 63, 257, 1000, 4096, short and full-length filters, half inputs),
the chunked diagonal recurrence (outputs and the gradients of a, x and the initial state, weak to strong
decays, odd lengths and chunk sizes) and the factored SSM kernel (against the whole Vandermonde matrix and
against the recurrence run step by step)."""

from __future__ import annotations

import pytest
import torch

from archs.ops.diagonal_recurrence import diagonal_recurrence, diagonal_recurrence_reference
from archs.ops.long_conv import fft_size, long_conv_fft, long_conv_reference
from archs.ops.ssm_kernel import ssm_kernel, ssm_kernel_reference

TOL = 1e-5


def rel_rms(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def grads(fn, inputs: list[torch.Tensor], cot: torch.Tensor | None = None, dtype=torch.float64):
    leaves = [x.detach().to(dtype).clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    cot = torch.randn_like(out) if cot is None else cot
    return out.detach(), torch.autograd.grad((out * cot.to(out.dtype)).sum(), leaves), cot


@pytest.mark.parametrize("t", [1, 7, 63, 257, 1000, 4096])
@pytest.mark.parametrize("filter_len", ["full", "short"])
def test_fft_long_conv_equals_direct(t, filter_len):
    torch.manual_seed(t)
    e = 5
    length = t if filter_len == "full" else min(t, 3)
    u, k = torch.randn(2, t, e), torch.randn(e, length) * torch.exp(-0.01 * torch.arange(length))
    ref, ref_g, cot = grads(long_conv_reference, [u, k])
    fast, fast_g, _ = grads(long_conv_fft, [u, k], cot, dtype=torch.float32)
    assert rel_rms(fast.double(), ref) < TOL
    for name, g, r in zip(("du", "dk"), fast_g, ref_g, strict=True):
        assert rel_rms(g.double(), r) < TOL, name
    assert fft_size(t, length) >= t + length - 1


def test_fft_long_conv_pads_to_2t_and_is_causal():
    assert fft_size(1000, 1000) == 2048 and fft_size(4096, 4096) == 8192 and fft_size(1, 1) == 1
    u, k = torch.randn(1, 50, 3), torch.randn(3, 50)
    y = long_conv_fft(u, k)
    u2 = u.clone()
    u2[:, 30:] += 5
    assert torch.allclose(long_conv_fft(u2, k)[:, :30], y[:, :30], atol=1e-5)  # FFT rounding only
    assert not torch.allclose(long_conv_fft(u2, k)[:, 30:], y[:, 30:])


def test_fft_long_conv_half_inputs_accumulate_in_fp32():
    torch.manual_seed(0)
    u, k = torch.randn(2, 300, 4), torch.randn(4, 300) * 0.1
    ref = long_conv_reference(u.double(), k.double())
    got = long_conv_fft(u.bfloat16(), k)
    assert got.dtype == torch.bfloat16
    assert rel_rms(got.double(), ref) < 2e-2  # bf16 rounding of the input and output only


@pytest.mark.parametrize(("t", "chunk"), [(1, 32), (7, 4), (63, 8), (257, 32), (1000, 16), (1000, 1)])
@pytest.mark.parametrize("strength", [0.01, 1.0, 20.0])
def test_diagonal_recurrence_equals_loop(t, chunk, strength):
    torch.manual_seed(t)
    b, e = 2, 6
    a = torch.exp(-strength * torch.rand(b, t, e))  # weak (~0.99) to strong (~e^-20) decays
    x, h0 = torch.randn(b, t, e), torch.randn(b, e)
    ref, ref_g, cot = grads(diagonal_recurrence_reference, [a, x, h0])
    fast, fast_g, _ = grads(lambda *z: diagonal_recurrence(*z, chunk_size=chunk), [a, x, h0], cot,
                            dtype=torch.float32)
    assert rel_rms(fast.double(), ref) < TOL
    for name, g, r in zip(("da", "dx", "dh0"), fast_g, ref_g, strict=True):
        assert rel_rms(g.double(), r) < TOL, name


def test_diagonal_recurrence_broadcasts_a_and_rejects_bad_shapes():
    a, x = torch.rand(4) * 0.9, torch.randn(2, 9, 4)
    assert torch.allclose(diagonal_recurrence(a, x), diagonal_recurrence_reference(a, x), atol=1e-6)
    with pytest.raises(ValueError, match="initial_state must be"):
        diagonal_recurrence(a, x, torch.zeros(2, 5))
    with pytest.raises(NotImplementedError, match="complex"):
        diagonal_recurrence(a.to(torch.complex64), x.to(torch.complex64))


@pytest.mark.parametrize("length", [1, 2, 17, 100, 1024, 4099])
def test_ssm_kernel_factored_equals_vandermonde(length):
    torch.manual_seed(length)
    h, n = 4, 8
    dta = torch.complex(-torch.rand(h, n) * 0.05, torch.rand(h, n) * 3)
    coef = torch.randn(h, n, dtype=torch.complex64)
    leaves = [coef.clone().requires_grad_(), dta.clone().requires_grad_()]
    ref = ssm_kernel_reference(*leaves, length)
    cot = torch.randn_like(ref)
    ref_g = torch.autograd.grad((ref * cot).sum(), leaves)
    leaves2 = [coef.clone().requires_grad_(), dta.clone().requires_grad_()]
    got = ssm_kernel(*leaves2, length)
    got_g = torch.autograd.grad((got * cot).sum(), leaves2)
    assert got.shape == (h, length) and rel_rms(got, ref) < 1e-4
    for g, r in zip(got_g, ref_g, strict=True):
        assert rel_rms(torch.view_as_real(g), torch.view_as_real(r)) < 1e-4


def test_ssm_kernel_is_the_recurrence_impulse_response():
    """K_l = 2 Re(sum_n coef_n z_n^l): the response of h_t = z h_{t-1} + coef u_t, y = 2 Re(sum h), to u = δ."""
    torch.manual_seed(0)
    h, n, length = 3, 5, 40
    dta = torch.complex(-torch.rand(h, n) * 0.3, torch.rand(h, n) * 2).to(torch.complex128)
    coef = torch.randn(h, n, dtype=torch.complex128)
    impulse = torch.zeros(1, length, h * n, dtype=torch.complex128)
    impulse[:, 0] = coef.flatten()
    states = diagonal_recurrence_reference(torch.exp(dta).flatten(), impulse)
    response = 2 * states.view(length, h, n).sum(-1).real.t()
    assert torch.allclose(ssm_kernel(coef, dta, length), response, atol=1e-10)
