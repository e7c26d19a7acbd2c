"""Causal long convolution, the training path of the LTI and implicit-filter mixers (S4D, H3, Hyena,
BaseConv's long filter): per channel ``e``,

    y[b, t, e] = sum_{s=0}^{t} k[e, t - s] * u[b, s, e]        (k: (E, L), zero beyond L)

- `long_conv_reference`: the direct sum, ``F.conv1d`` with the flipped filter and left padding, O(T·L)
  (the oracle);
- `long_conv_fft`: the same by real FFTs, O(T log T): input and filter are zero-padded to a length
  ``n >= T + L - 1`` (a power of two, 2T when L = T) so the circular convolution equals the linear one on
  the first T outputs; half-precision inputs are computed in float32 and the result cast back. It runs a
  block of channels at a time, so each block's transforms stay in cache (past ~2K steps the whole tensor's
  do not, and the work turns memory-bound), and its backward is written out: three transforms per block,
  nothing saved but the inputs (`_FFTConv`).

The mixers work in ``(B, T, E)``; the transforms run over the time axis of a ``(B, E, T)`` copy, where each
channel's sequence is contiguous.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LONG_CONVS", "fft_size", "long_conv_fft", "long_conv_flops", "long_conv_last", "long_conv_reference"]


def _check(u: Tensor, k: Tensor) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, length, channels), got shape {tuple(u.shape)}")
    if k.dim() != 2 or k.shape[0] != u.shape[2]:
        raise ValueError(f"k must be (channels={u.shape[2]}, filter length), got shape {tuple(k.shape)}")


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def fft_size(t: int, filter_len: int) -> int:
    """The transform length: the smallest power of two holding the linear convolution's first ``t`` outputs."""
    need = t + min(filter_len, t) - 1
    return 1 << max(0, (need - 1).bit_length())


def long_conv_reference(u: Tensor, k: Tensor) -> Tensor:
    """``u: (B, T, E)`` convolved causally with ``k: (E, L)`` per channel, directly (see the module docstring)."""
    _check(u, k)
    t, e = u.shape[1], u.shape[2]
    ct = _compute_dtype(u)
    kk = k[:, :t].to(ct)
    y = F.conv1d(F.pad(u.to(ct).transpose(1, 2), (kk.shape[1] - 1, 0)), kk.flip(-1)[:, None, :], groups=e)
    return y.transpose(1, 2).to(u.dtype)


def long_conv_fft(u: Tensor, k: Tensor) -> Tensor:
    """`long_conv_reference` of ``u: (B, T, E)`` and ``k: (E, L)`` by real FFTs of length `fft_size`."""
    _check(u, k)
    t = u.shape[1]
    kk = k[:, :t]
    return _FFTConv.apply(u, kk, fft_size(t, kk.shape[1]))


#: transform rows (batch x channels) times transform length per block: ~8 MiB of fp32, cache-sized
_BLOCK_ELEMENTS = 1 << 21


def _channel_blocks(batch: int, channels: int, n: int) -> range:
    step = max(8, _BLOCK_ELEMENTS // (n * batch))
    return range(0, channels, step)


class _FFTConv(torch.autograd.Function):
    """The FFT convolution a block of channels at a time (its transforms stay in cache), saving only ``u``
    and ``k``: the backward recomputes their transforms (cheaper than keeping complex copies of both) and
    takes ``du = irfft(rfft(dy) · conj(rfft(k)))[:T]`` and ``dk = irfft(Σ_b rfft(dy) · conj(rfft(u)))[:L]``
    (the correlations; exact because ``n >= T + L - 1`` leaves no wrap-around)."""

    @staticmethod
    def forward(ctx: Any, u: Tensor, k: Tensor, n: int) -> Tensor:
        b, t, e = u.shape
        ct = _compute_dtype(u)
        y = torch.empty_like(u)
        blocks = _channel_blocks(b, e, n)
        for e0 in blocks:
            sl = slice(e0, e0 + blocks.step)
            u_f = torch.fft.rfft(u[:, :, sl].transpose(1, 2).to(ct), n=n)  # (B, e, n/2 + 1)
            u_f.mul_(torch.fft.rfft(k[sl].to(ct), n=n))
            y[:, :, sl] = torch.fft.irfft(u_f, n=n)[..., :t].transpose(1, 2)
        ctx.save_for_backward(u, k)
        ctx.n = n
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor, Tensor, None]:
        u, k = ctx.saved_tensors
        b, t, e = u.shape
        n, ct, taps = ctx.n, _compute_dtype(u), k.shape[1]
        du, dk = torch.empty_like(u), torch.empty_like(k)
        blocks = _channel_blocks(b, e, n)
        for e0 in blocks:
            sl = slice(e0, e0 + blocks.step)
            dy_f = torch.fft.rfft(dy[:, :, sl].transpose(1, 2).to(ct), n=n)
            u_f = torch.fft.rfft(u[:, :, sl].transpose(1, 2).to(ct), n=n)
            k_f = torch.fft.rfft(k[sl].to(ct), n=n)
            dk[sl] = torch.fft.irfft((u_f.conj() * dy_f).sum(0), n=n)[..., :taps]
            du[:, :, sl] = torch.fft.irfft(dy_f.mul_(k_f.conj()), n=n)[..., :t].transpose(1, 2)
        return du, dk, None


#: a mixer's ``conv`` option -> the op ("auto" is the FFT: it is the fast path on every device)
LONG_CONVS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "auto": long_conv_fft, "fft": long_conv_fft, "reference": long_conv_reference}


def long_conv_last(u: Tensor, k: Tensor, n: int, conv: Callable[[Tensor, Tensor], Tensor] = long_conv_fft) -> Tensor:
    """The last ``n`` outputs ``(B, n, E)`` of the causal convolution of every input so far ``u: (B, T, E)``
    with ``k: (E, >= T)`` — a decoding step. One output is a dot product of the inputs with the reversed
    filter (fp32 accumulation, as `long_conv_fft`); more go through ``conv``."""
    _check(u, k)
    if n == 1:
        t = u.shape[1]
        dot = torch.einsum("btd,dt->bd", u.to(_compute_dtype(u)), k[:, :t].flip(-1).to(_compute_dtype(u)))
        return dot[:, None].to(u.dtype)
    return conv(u, k)[:, -n:]


def long_conv_flops(t: int, channels: int, filter_len: int | None = None) -> int:
    """Forward FLOPs of `long_conv_fft` per token, filter transform included: three real FFTs of length n
    (~2.5 n log2 n each: input, filter, inverse) plus the complex product (6 per frequency), per channel."""
    n = fft_size(t, filter_len or t)
    log_n = max(1, n.bit_length() - 1)
    return int(channels * (3 * 2.5 * n * log_n + 6 * (n // 2 + 1)) / t)
