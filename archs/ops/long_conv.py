"""Causal long convolution, the training path of the LTI and implicit-filter mixers (S4D, H3, Hyena,
BaseConv's long filter): per channel ``e``,

    y[b, t, e] = sum_{s=0}^{t} k[e, t - s] * u[b, s, e]        (k: (E, L), zero beyond L)

- `long_conv_reference`: the direct sum, ``F.conv1d`` with the flipped filter and left padding, O(T·L)
  (the oracle);
- `long_conv_fft`: the same by real FFTs, O(T log T): input and filter are zero-padded to a length
  ``n >= T + L - 1`` (a power of two, 2T when L = T) so the circular convolution equals the linear one on
  the first T outputs; half-precision inputs are computed in float32 and the result cast back. Both are
  differentiable through torch's own FFTs (the backward is two more transforms per tensor).

The mixers work in ``(B, T, E)``; the transforms run over the time axis of a ``(B, E, T)`` copy, where each
channel's sequence is contiguous.
"""

from __future__ import annotations

from collections.abc import Callable

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
    ct = _compute_dtype(u)
    kk = k[:, :t].to(ct)
    n = fft_size(t, kk.shape[1])
    u_f = torch.fft.rfft(u.to(ct).transpose(1, 2), n=n)  # (B, E, n/2 + 1)
    k_f = torch.fft.rfft(kk, n=n)  # (E, n/2 + 1)
    y = torch.fft.irfft(u_f * k_f, n=n)[..., :t]
    return y.transpose(1, 2).to(u.dtype)


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
