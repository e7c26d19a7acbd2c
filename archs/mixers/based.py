"""Based's linear attention (Arora et al. 2024, "Simple linear attention language models balance the
recall-throughput tradeoff"): normalised linear attention with the 2nd-order Taylor feature map of exp.

``φ(x) = [1, x / d^¼, (x ⊗ x) / (√2 · √d)]`` on a small ``feature_dim`` ``d``, so that
``φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d) ≈ exp(q·k/√d)``. Per head:
``o_t = Σ_{s<=t} (φ(q_t)·φ(k_s)) v_s / (Σ_{s<=t} φ(q_t)·φ(k_s) + 1e-6)``. The ``x ⊗ x`` block is stored once
per unordered pair (diagonal at ``1/√2``, off-diagonal pairs at 1): ``1 + d + d(d+1)/2`` features.

Options, parameter names, shapes and initialisation are those of flash-linear-attention's
``BasedLinearAttention`` (``hidden_size`` is ``d_model``; its default mode, ``parallel``, is what is matched).
Backends: ``chunked`` (`archs.ops.linear_recurrence.taylor_recurrence_chunked`: within a chunk the scores come
from ``q·k`` itself, ``1 + s + s²/2``, not from the features) and ``reference`` (the recurrence over the
features); the normaliser rides along as an extra value column of ones. Decoding keeps the
``(H, 1 + d + d(d+1)/2, d_v + 1)`` state: constant cost per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from archs.mixers._recurrent import IMPLS, RecurrentCache, RecurrentMixer, check_choice, check_positive, split_heads
from archs.ops.linear_recurrence import linear_recurrence_reference, taylor_features, taylor_recurrence_chunked
from registry import register_mixer

__all__ = ["Based", "BasedOptions"]


def _taylor_reference(q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """The recurrence one token at a time over the Taylor features of raw ``q, k``."""
    return linear_recurrence_reference(taylor_features(q), taylor_features(k), v, scale=1.0, **kwargs)


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
        q = split_heads(self.q_proj(x), self.head_k_dim).to(ct)  # (B, T, H, d)
        k = split_heads(self.k_proj(x), self.head_k_dim).to(ct)
        v = split_heads(self.v_proj(x), self.head_v_dim).to(ct)
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # the normaliser as one more value column
        y = self._scan(taylor_recurrence_chunked, _taylor_reference, cache, q, k, v)
        y = y[..., :-1] / (y[..., -1:] + 1e-6)
        return self.o_proj(y.flatten(-2).to(x.dtype))  # (B, T, D)

    def flops_per_token(self, seq_len: int) -> int:
        """Projections, and the chunked recurrence (chunk ``min(chunk_size, seq_len)``, counted dense): the
        within-chunk scores from ``q·k`` over ``feature_dim``, scores · v, and the state in and out over the
        expanded features; the feature map's products not counted."""
        c = max(1, min(self.opts.chunk_size, seq_len))
        dv = self.head_v_dim + 1
        per_head = 2 * c * self.head_k_dim + 2 * c * dv + 2 * self.expanded_dim * dv * 2
        return int(self._projection_flops() + self.num_heads * per_head)
