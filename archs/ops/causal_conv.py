"""Causal depthwise convolution over time, the short conv in front of Mamba's and Mamba-2's scans and the
block's optional ``short_conv``: ``nn.Conv1d(E, E, K, groups=E, padding=K-1)``, first ``T`` outputs.

- `causal_conv1d_reference`: ``F.conv1d`` on the transposed input (the oracle).
- `causal_conv1d`: the same in the ``(B, T, E)`` layout the mixers work in, as ``K`` shifted multiply-adds
  over the whole sequence, forward and backward: no transposes, no padded copy, the pre-activation recomputed
  in the backward pass (one saved activation: x), and a backward several times faster than torch's
  depthwise-convolution backward on CPU. Computed in fp32 for half-precision inputs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["causal_conv1d", "causal_conv1d_reference"]


def causal_conv1d_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None, silu: bool = True) -> Tensor:
    """Causal depthwise convolution of ``x: (B, T, E)`` with ``weight: (E, K)`` (+ ``bias``), then SiLU.

    ``out_t = bias + sum_k weight[:, k] * x_{t-K+1+k}`` (zeros before the start): ``nn.Conv1d`` with
    ``groups=E, padding=K-1``, first ``T`` outputs, as in Mamba's block. The reference, via ``F.conv1d``.
    """
    t = x.shape[1]
    y = F.conv1d(x.transpose(1, 2), weight[:, None, :], bias, padding=weight.shape[1] - 1,
                 groups=weight.shape[0])[..., :t]
    return (F.silu(y) if silu else y).transpose(1, 2)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, silu: bool = True) -> Tensor:
    """`causal_conv1d_reference` of ``x: (B, T, E)`` with ``weight: (E, K)`` (+ ``bias: (E,)``), fast on CPU."""
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[2]:
        raise ValueError(f"need x: (B, T, E) and weight: (E, K), got {tuple(x.shape)} and {tuple(weight.shape)}")
    return _CausalConv1d.apply(x, weight, bias, silu)


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
        xc = x.to(_compute_dtype(x))
        taps = weight.detach().to(xc.dtype).t().contiguous()  # (K, E); tap K-1 multiplies the current input
        b = None if bias is None else bias.detach().to(xc.dtype)
        pre = _conv(xc, taps, b)
        # SiLU's derivative needs ``pre``: recomputed in backward (K multiply-adds) rather than kept, which
        # costs no measurable time per layer and saves a (B, T, E) activation
        ctx.save_for_backward(xc, taps, b)
        ctx.silu, ctx.weight_dtype = silu, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return (F.silu(pre) if silu else pre).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, taps, b = ctx.saved_tensors
        t, k = x.shape[1], taps.shape[0]
        g = grad.to(x.dtype).contiguous()
        if ctx.silu:
            g = torch.ops.aten.silu_backward(g, _conv(x, taps, b))  # d/d(pre), (B, T, E)
        gx = g * taps[k - 1]
        gw = torch.zeros_like(taps)  # (K, E)
        gw[k - 1] = (g * x).sum((0, 1))
        for shift in range(1, min(k, t)):  # tap K-1-shift reads x_{t-shift}
            gx[:, : t - shift].addcmul_(g[:, shift:], taps[k - 1 - shift])
            gw[k - 1 - shift] = (g[:, shift:] * x[:, : t - shift]).sum((0, 1))
        gb = None if ctx.bias_dtype is None else g.sum((0, 1)).to(ctx.bias_dtype)
        return gx.to(grad.dtype), gw.t().to(ctx.weight_dtype), gb, None


def _conv(x: Tensor, taps: Tensor, bias: Tensor | None) -> Tensor:
    """Pre-activation output ``(B, T, E)``: ``bias + sum_shift taps[K-1-shift] * x_{t-shift}``."""
    t, k = x.shape[1], taps.shape[0]
    pre = x * taps[k - 1] if bias is None else torch.addcmul(bias, x, taps[k - 1])
    for shift in range(1, min(k, t)):
        pre[:, shift:].addcmul_(x[:, : t - shift], taps[k - 1 - shift])
    return pre


def _compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 for half-precision inputs (accumulation), the input's own dtype for fp32 and fp64."""
    return torch.promote_types(x.dtype, torch.float32)
