"""Gated Linear Attention (Yang et al. 2024, "Gated Linear Attention Transformers with Hardware-Efficient
Training"): linear attention whose state decays per key channel by a data-dependent gate.

Per head: ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ``, ``o_t = S_tᵀ q_t / sqrt(d_k)``, with the gate
``g_t = logsigmoid(W_up W_down x_t + b) / gate_logit_normalizer`` (a low-rank projection, ``gate_low_rank_dim``).
The output is RMS-normalised per head and gated, ``rmsnorm(o) · swish(W_g x)``, then projected back.

Options, parameter names, shapes and initialisation are those of flash-linear-attention's
``GatedLinearAttention`` (``hidden_size`` is ``d_model``), so state dicts move between the two with
``strict=True``. Backends: ``chunked`` (`archs.ops.linear_recurrence.linear_recurrence_chunked`) and
``reference`` (the per-token recurrence). Decoding keeps the ``(H, d_k, d_v)`` state per sequence (and the
short convolutions' last inputs): constant cost per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
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
from registry import register_mixer

__all__ = ["GLA", "GLAOptions"]


@dataclass(frozen=True)
class GLAOptions:
    """fla ``GatedLinearAttention``'s options and defaults, plus ``chunk_size`` and ``impl`` (the backend)."""

    expand_k: float = 0.5
    expand_v: float = 1.0
    num_heads: int = 4
    num_kv_heads: int | None = None
    feature_map: str | None = None
    use_short_conv: bool = False
    conv_size: int = 4
    conv_bias: bool = False
    use_output_gate: bool = True
    gate_fn: str = "swish"
    elementwise_affine: bool = True
    norm_eps: float = 1e-5
    gate_logit_normalizer: float = 16
    gate_low_rank_dim: int = 16
    clamp_min: float | None = None
    fuse_norm: bool = True
    chunk_size: int = 64
    impl: str = "auto"  # "auto" | "chunked" | "reference"

    def __post_init__(self) -> None:
        check_positive(self, "num_heads", "conv_size", "gate_low_rank_dim", "chunk_size")
        check_kv_heads(self)
        if self.feature_map is not None:
            check_choice("feature_map", self.feature_map, tuple(ACTIVATIONS))
        check_choice("gate_fn", self.gate_fn, tuple(ACTIVATIONS))
        if not self.gate_logit_normalizer > 0:
            raise ValueError(f"gate_logit_normalizer must be > 0, got {self.gate_logit_normalizer}")
        check_choice("impl", self.impl, IMPLS)


@register_mixer("gla")
class GLA(RecurrentMixer):
    """Gated Linear Attention (fla-compatible): a per-key-channel data-dependent decay; chunked on CPU."""

    Options = GLAOptions

    def __init__(self, d_model: int, layer_idx: int = 0, **options: Any):
        super().__init__(d_model, layer_idx)
        self.opts = o = self.Options(**options)
        self._set_widths(o.expand_k, o.expand_v, o.num_heads, o.num_kv_heads)
        # construction order follows fla, so that one seed gives the same parameters there and here
        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, self.kv_key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, self.kv_value_dim, bias=False)
        if o.use_output_gate:
            self.g_proj = nn.Linear(d_model, self.value_dim, bias=False)
        if o.use_short_conv:
            self._add_short_convs(self.key_dim, self.kv_key_dim, self.kv_value_dim, o.conv_size, o.conv_bias)
        self.gk_proj = nn.Sequential(nn.Linear(d_model, o.gate_low_rank_dim, bias=False),
                                     nn.Linear(o.gate_low_rank_dim, self.kv_key_dim, bias=True))
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)
        self._add_output_norm(o.use_output_gate, o.gate_fn, o.fuse_norm, o.norm_eps, o.elementwise_affine)

    def _state_shape(self) -> tuple[int, int, int]:
        return self.num_heads, self.head_k_dim, self.head_v_dim

    def _mix(self, x: Tensor, cache: RecurrentCache | None) -> Tensor:
        o = self.opts
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if o.use_short_conv:
            q, k, v = self._short_convs(q, k, v, cache)
        gk = self.gk_proj(x)
        q = split_heads(q, self.head_k_dim)  # (B, T, H, d_k)
        k, gk = self._kv_heads(k, self.head_k_dim), self._kv_heads(gk, self.head_k_dim)
        v = self._kv_heads(v, self.head_v_dim)  # (B, T, H, d_v)
        gk = F.logsigmoid(gk.float()) / o.gate_logit_normalizer
        if o.clamp_min is not None:
            gk = gk.clamp_min(o.clamp_min)
        if o.feature_map is not None:
            q, k = ACTIVATIONS[o.feature_map](q), ACTIVATIONS[o.feature_map](k)
        y = self._scan(linear_recurrence_chunked, linear_recurrence_reference, cache, q, k, v, gk)
        return self.o_proj(self._gated_output(y, x, o.use_output_gate, o.gate_fn))  # (B, T, D)

    def flops_per_token(self, seq_len: int) -> int:
        """Projections, and the chunked recurrence (chunk ``min(chunk_size, seq_len)``, counted dense)."""
        return self._recurrence_flops(seq_len, self.num_heads, self.head_k_dim, self.head_v_dim)
