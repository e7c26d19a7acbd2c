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
    HeadRMSNorm,
    RecurrentCache,
    RecurrentMixer,
    ShortConvolution,
    check_choice,
    check_positive,
    split_heads,
    whole_dim,
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
        if self.num_kv_heads is not None:
            check_positive(self, "num_kv_heads")
            if self.num_heads % self.num_kv_heads:
                raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
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
        self.num_heads = h = o.num_heads
        self.num_kv_heads = o.num_kv_heads or h
        self.num_kv_groups = h // self.num_kv_heads
        self.key_dim = whole_dim("d_model * expand_k", d_model * o.expand_k)
        self.value_dim = whole_dim("d_model * expand_v", d_model * o.expand_v)
        for what, dim in (("key", self.key_dim), ("value", self.value_dim)):
            if dim % h:
                raise ValueError(f"the {what} width {dim} (d_model * expand_{what[0]}) must be divisible by "
                                 f"num_heads={h}")
        self.head_k_dim, self.head_v_dim = self.key_dim // h, self.value_dim // h
        kd_g, vd_g = self.key_dim // self.num_kv_groups, self.value_dim // self.num_kv_groups
        # construction order follows fla, so that one seed gives the same parameters there and here
        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, kd_g, bias=False)
        self.v_proj = nn.Linear(d_model, vd_g, bias=False)
        if o.use_output_gate:
            self.g_proj = nn.Linear(d_model, self.value_dim, bias=False)
        if o.use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, o.conv_size, bias=o.conv_bias)
            self.k_conv1d = ShortConvolution(kd_g, o.conv_size, bias=o.conv_bias)
            self.v_conv1d = ShortConvolution(vd_g, o.conv_size, bias=o.conv_bias)
        self.gk_proj = nn.Sequential(nn.Linear(d_model, o.gate_low_rank_dim, bias=False),
                                     nn.Linear(o.gate_low_rank_dim, kd_g, bias=True))
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)
        self.fuse_norm_and_gate = o.gate_fn == "swish" and o.fuse_norm and o.use_output_gate
        norm = HeadRMSNorm(self.head_v_dim, o.norm_eps, o.elementwise_affine,
                           activation="swish" if self.fuse_norm_and_gate else None)
        if self.fuse_norm_and_gate:
            self.g_norm_swish_gate = norm
        else:
            self.g_norm = norm

    def _conv_dims(self) -> dict[str, int]:
        if not self.opts.use_short_conv:
            return {}
        kd_g, vd_g = self.key_dim // self.num_kv_groups, self.value_dim // self.num_kv_groups
        return {"q_conv1d": self.key_dim, "k_conv1d": kd_g, "v_conv1d": vd_g}

    def _state_shape(self) -> tuple[int, int, int]:
        return self.num_heads, self.head_k_dim, self.head_v_dim

    def _kv_heads(self, x: Tensor, head_dim: int) -> Tensor:
        """``(B, T, H_kv * d) -> (B, T, H, d)``, each key/value head shared by ``num_kv_groups`` heads."""
        x = split_heads(x, head_dim)
        return x.repeat_interleave(self.num_kv_groups, dim=2) if self.num_kv_groups > 1 else x

    def _mix(self, x: Tensor, cache: RecurrentCache | None) -> Tensor:
        o = self.opts
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if o.use_short_conv:
            q, k, v = (self._conv(name, t, cache) for name, t in (("q_conv1d", q), ("k_conv1d", k), ("v_conv1d", v)))
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
        return self._finish(y, x)

    def _finish(self, y: Tensor, x: Tensor) -> Tensor:
        """Per-head RMSNorm and output gate of ``y: (B, T, H, d_v)``, then the output projection."""
        o = self.opts
        if o.use_output_gate:
            g = self.g_proj(x)
            if self.fuse_norm_and_gate:
                y = self.g_norm_swish_gate(y, split_heads(g, self.head_v_dim)).flatten(-2)
            else:
                y = self.g_norm(y).flatten(-2) * ACTIVATIONS[o.gate_fn](g)
        else:
            y = self.g_norm(y).flatten(-2)
        return self.o_proj(y)  # (B, T, D)

    def flops_per_token(self, seq_len: int) -> int:
        """Projections, and the chunked recurrence (chunk ``min(chunk_size, seq_len)``, counted dense)."""
        c = max(1, min(self.opts.chunk_size, seq_len))
        h, dk, dv, d = self.num_heads, self.head_k_dim, self.head_v_dim, self.d_model
        proj = sum(2 * d * m.out_features for m in (self.q_proj, self.k_proj, self.v_proj, self.gk_proj[0]))
        proj += 2 * self.gk_proj[1].in_features * self.gk_proj[1].out_features + 2 * self.value_dim * d
        if self.opts.use_output_gate:
            proj += 2 * d * self.value_dim
        scan = h * (2 * c * dk + 2 * c * dv + 2 * dk * dv * 2)  # q kᵀ, scores · v, state in and out
        return int(proj + scan)
