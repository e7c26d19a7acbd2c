"""Based's linear attention (Arora et al. 2024, "Simple linear attention language models balance the
recall-throughput tradeoff"): normalised linear attention with the 2nd-order Taylor feature map of exp.

``φ(x) = [1, x / d^¼, (x ⊗ x) / (√2 · √d)]`` on a small ``feature_dim`` ``d``, so that
``φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d) ≈ exp(q·k/√d)``. Per head:
``o_t = Σ_{s<=t} (φ(q_t)·φ(k_s)) v_s / (Σ_{s<=t} φ(q_t)·φ(k_s) + 1e-6)``. The ``x ⊗ x`` block is stored once
per unordered pair (diagonal at ``1/√2``, off-diagonal pairs at 1): ``1 + d + d(d+1)/2`` features.

Options, parameter names, shapes and initialisation are those of flash-linear-attention's
``BasedLinearAttention`` (``hidden_size`` is ``d_model``; its default mode, ``parallel``, is what is matched).
Backends: ``chunked`` and ``reference`` (`archs.ops.linear_recurrence`); the normaliser rides along as an extra
value column of ones. Decoding keeps the ``(H, 1 + d + d(d+1)/2, d_v + 1)`` state: constant cost per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from archs.mixers._recurrent import IMPLS, RecurrentCache, RecurrentMixer, check_choice, check_positive, split_heads
from archs.ops.linear_recurrence import linear_recurrence_chunked, linear_recurrence_reference
from registry import register_mixer

__all__ = ["Based", "BasedOptions", "taylor_feature_map"]


def taylor_feature_map(x: Tensor) -> Tensor:
    """``(..., d) -> (..., 1 + d + d(d+1)/2)``: the features whose dot products are ``1 + s + s²/2`` of
    ``s = x·y / √d``."""
    d = x.shape[-1]
    xs = x / math.sqrt(math.sqrt(d))  # so that pairs of xs carry the 1/√d
    # row i of the upper triangle, x_i · x_{i..d-1}, the diagonal term at 1/√2: slices and products (a gather
    # by index, and its scatter in the backward pass, took a quarter of the layer's time)
    rows = [xs[..., i: i + 1] * torch.cat([xs[..., i: i + 1] / math.sqrt(2), xs[..., i + 1:]], dim=-1)
            for i in range(d)]
    return torch.cat([torch.ones_like(x[..., :1]), xs, *rows], dim=-1)


@dataclass(frozen=True)
class BasedOptions:
    """fla ``BasedLinearAttention``'s options and defaults, plus ``chunk_size`` and ``impl`` (the backend)."""

    feature_dim: int = 16
    num_key_value_heads: int = 12
    num_heads: int = 12
    feature_name: str = "taylor_exp"
    eps: float = 1e-12
    causal: bool = True
    chunk_size: int = 64
    impl: str = "auto"  # "auto" | "chunked" | "reference"

    def __post_init__(self) -> None:
        check_positive(self, "feature_dim", "num_heads", "num_key_value_heads", "chunk_size")
        if self.num_key_value_heads != self.num_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} must equal num_heads={self.num_heads} "
                             f"(as in fla's layer)")
        check_choice("feature_name", self.feature_name, ("taylor_exp",))
        if self.causal is not True:
            raise ValueError("causal must be True: a mixer is causal")
        check_choice("impl", self.impl, IMPLS)


@register_mixer("based")
class Based(RecurrentMixer):
    """Based: normalised linear attention with a Taylor feature map (fla-compatible); chunked on CPU."""

    Options = BasedOptions

    def __init__(self, d_model: int, layer_idx: int = 0, **options: Any):
        super().__init__(d_model, layer_idx)
        self.opts = o = self.Options(**options)
        if d_model < o.num_heads:
            raise ValueError(f"d_model={d_model} must be at least num_heads={o.num_heads}")
        self.num_heads = h = o.num_heads
        self.head_k_dim = o.feature_dim
        self.head_v_dim = d_model // h
        self.expanded_dim = 1 + o.feature_dim + o.feature_dim * (o.feature_dim + 1) // 2
        self.q_proj = nn.Linear(d_model, h * self.head_k_dim, bias=False)
        self.k_proj = nn.Linear(d_model, h * self.head_k_dim, bias=False)
        self.v_proj = nn.Linear(d_model, h * self.head_v_dim, bias=False)
        self.o_proj = nn.Linear(h * self.head_v_dim, d_model, bias=False)

    def _state_shape(self) -> tuple[int, int, int]:
        return self.num_heads, self.expanded_dim, self.head_v_dim + 1

    def _mix(self, x: Tensor, cache: RecurrentCache | None) -> Tensor:
        ct = torch.promote_types(x.dtype, torch.float32)
        q = taylor_feature_map(split_heads(self.q_proj(x), self.head_k_dim).to(ct))  # (B, T, H, 1 + d + d(d+1)/2)
        k = taylor_feature_map(split_heads(self.k_proj(x), self.head_k_dim).to(ct))
        v = split_heads(self.v_proj(x), self.head_v_dim).to(ct)
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # the normaliser as one more value column
        y = self._scan(linear_recurrence_chunked, linear_recurrence_reference, cache, q, k, v, scale=1.0)
        y = y[..., :-1] / (y[..., -1:] + 1e-6)
        return self.o_proj(y.flatten(-2).to(x.dtype))  # (B, T, D)

    def flops_per_token(self, seq_len: int) -> int:
        """Projections, and the chunked recurrence over the expanded features (chunk ``min(chunk_size,
        seq_len)``); the feature map's products not counted."""
        return self._recurrence_flops(seq_len, self.num_heads, self.expanded_dim, self.head_v_dim + 1)
