"""Multi-scale retention (Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large Language
Models"): linear attention with a fixed decay per head and rotary positions on queries and keys.

Per head ``h``: ``S_t = γ_h S_{t-1} + k_t v_tᵀ`` with ``γ_h = 1 - 2^(-5-h)``, ``o_t = S_tᵀ q_t / sqrt(d_k)``,
q and k rotated by RoPE (GPT-NeoX halves, base 10000) first. The output is RMS-normalised per head and gated,
``rmsnorm(o) · swish(W_g x)``, then projected back.

Options, parameter names, shapes and initialisation are those of flash-linear-attention's
``MultiScaleRetention`` (``hidden_size`` is ``d_model``), so state dicts move between the two with
``strict=True``. Backends: ``chunked`` and ``reference`` (`archs.ops.linear_recurrence`). Decoding keeps the
``(H, d_k, d_v)`` state and the position: constant cost per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from archs.mixers._recurrent import (
    ACTIVATIONS,
    IMPLS,
    RecurrentCache,
    RecurrentMixer,
    check_choice,
    check_kv_heads,
    check_positive,
    split_heads,
)
from archs.ops.linear_recurrence import linear_recurrence_chunked, linear_recurrence_reference
from archs.positions import Rotary, apply_rope
from registry import register_mixer

__all__ = ["Retention", "RetentionOptions", "retention_log_decays"]


def retention_log_decays(num_heads: int) -> Tensor:
    """``log(1 - 2^(-5-h))`` for each head ``h``: RetNet's fixed decays, in log space."""
    return torch.log1p(-(2.0 ** (-5.0 - torch.arange(num_heads, dtype=torch.float64)))).float()


@dataclass(frozen=True)
class RetentionOptions:
    """fla ``MultiScaleRetention``'s options and defaults, plus ``chunk_size`` and ``impl`` (the backend)."""

    expand_k: float = 1.0
    expand_v: float = 2.0
    num_heads: int = 8
    num_kv_heads: int | None = None
    feature_map: str | None = None
    use_short_conv: bool = False
    conv_size: int = 4
    conv_bias: bool = False
    use_output_gate: bool = True
    gate_fn: str = "swish"
    elementwise_affine: bool = True
    norm_eps: float = 1e-5
    fuse_norm: bool = True
    chunk_size: int = 64
    impl: str = "auto"  # "auto" | "chunked" | "reference"

    def __post_init__(self) -> None:
        check_positive(self, "num_heads", "conv_size", "chunk_size")
        check_kv_heads(self)
        if self.feature_map is not None:
            check_choice("feature_map", self.feature_map, tuple(ACTIVATIONS))
        check_choice("gate_fn", self.gate_fn, tuple(ACTIVATIONS))
        check_choice("impl", self.impl, IMPLS)


@register_mixer("retention")
class Retention(RecurrentMixer):
    """RetNet's multi-scale retention (fla-compatible): fixed per-head decays, RoPE; chunked on CPU."""

    Options = RetentionOptions

    def __init__(self, d_model: int, layer_idx: int = 0, **options: Any):
        super().__init__(d_model, layer_idx)
        self.opts = o = self.Options(**options)
        self._set_widths(o.expand_k, o.expand_v, o.num_heads, o.num_kv_heads)
        if self.head_k_dim % 2:
            raise ValueError(f"rotary positions need an even key head width, got d_model * expand_k / num_heads "
                             f"= {self.head_k_dim}")
        # construction order follows fla, so that one seed gives the same parameters there and here
        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, self.kv_key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, self.kv_value_dim, bias=False)
        if o.use_output_gate:
            self.g_proj = nn.Linear(d_model, self.value_dim, bias=False)
        if o.use_short_conv:
            self._add_short_convs(self.key_dim, self.kv_key_dim, self.kv_value_dim, o.conv_size, o.conv_bias)
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)
        self._add_output_norm(o.use_output_gate, o.gate_fn, o.fuse_norm, o.norm_eps, o.elementwise_affine)
        self.rotary = Rotary(self.head_k_dim)
        self.register_buffer("log_decay", retention_log_decays(self.num_heads), persistent=False)

    def _state_shape(self) -> tuple[int, int, int]:
        return self.num_heads, self.head_k_dim, self.head_v_dim

    def _mix(self, x: Tensor, cache: RecurrentCache | None) -> Tensor:
        o = self.opts
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if o.use_short_conv:
            q, k, v = self._short_convs(q, k, v, cache)
        q, k = split_heads(q, self.head_k_dim), split_heads(k, self.head_k_dim)  # (B, T, H[_kv], d_k)
        if o.feature_map is not None:
            q, k = ACTIVATIONS[o.feature_map](q), ACTIVATIONS[o.feature_map](k)
        offset = 0 if cache is None else cache.length
        cos, sin = self.rotary(x.shape[1], offset, x.device, torch.float32)  # (T, d_k)
        q = apply_rope(q.float(), cos[:, None], sin[:, None]).to(q.dtype)
        k = apply_rope(k.float(), cos[:, None], sin[:, None]).to(k.dtype)
        if self.num_kv_groups > 1:  # keys rotated before they are shared, as fla does
            k = k.repeat_interleave(self.num_kv_groups, dim=2)
        v = self._kv_heads(v, self.head_v_dim)
        y = self._scan(linear_recurrence_chunked, linear_recurrence_reference, cache, q, k, v,
                       g_gamma=self.log_decay)
        return self.o_proj(self._gated_output(y, x, o.use_output_gate, o.gate_fn))  # (B, T, D)

    def flops_per_token(self, seq_len: int) -> int:
        """Projections, and the chunked recurrence (chunk ``min(chunk_size, seq_len)``, counted dense)."""
        return self._recurrence_flops(seq_len, self.num_heads, self.head_k_dim, self.head_v_dim)
