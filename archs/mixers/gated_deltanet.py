"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule"):
the delta rule with Mamba-2's data-dependent scalar decay per head.

Per value head: ``S_t = α_t (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ``, ``o_t = S_tᵀ q_t / sqrt(d_k)``, with
``log α_t = -exp(A_log) · softplus(W_a x_t + dt_bias)`` (Mamba-2's parametrisation), ``β_t = sigmoid(W_β x_t)``
(times 2 with ``allow_neg_eigval``), q and k L2-normalised after a short causal convolution and SiLU. With
``num_v_heads > num_heads`` each query/key head serves ``num_v_heads / num_heads`` value heads (value head
``i`` reads head ``i // (num_v_heads / num_heads)``). The output is RMS-normalised per head and gated,
``rmsnorm(o) · swish(W_g x)``, then projected back.

Options, parameter names, shapes and initialisation are those of flash-linear-attention's ``GatedDeltaNet``
(``hidden_size`` is ``d_model``), so state dicts move between the two with ``strict=True``. Backends:
``chunked`` (`archs.ops.delta_rule.delta_rule_chunked` with the decay) and ``reference``. Decoding keeps the
``(H_v, d_k, d_v)`` state and the convolutions' last inputs: constant cost per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archs.mixers._recurrent import (
    IMPLS,
    HeadRMSNorm,
    RecurrentCache,
    RecurrentMixer,
    check_choice,
    check_positive,
    l2_norm,
    split_heads,
)
from archs.mixers.deltanet import delta_flops, normed_output
from archs.ops.delta_rule import delta_rule_chunked, delta_rule_reference
from registry import register_mixer

__all__ = ["GatedDeltaNet", "GatedDeltaNetOptions"]


@dataclass(frozen=True)
class GatedDeltaNetOptions:
    """fla ``GatedDeltaNet``'s options and defaults, plus ``chunk_size`` and ``impl`` (the backend)."""

    expand_v: float = 2
    head_dim: int = 256
    num_heads: int = 6
    num_v_heads: int | None = None
    use_gate: bool = True
    use_short_conv: bool = True
    allow_neg_eigval: bool = False
    conv_size: int = 4
    conv_bias: bool = False
    norm_eps: float = 1e-5
    output_gate_activation: str = "swish"
    chunk_size: int = 64
    impl: str = "auto"  # "auto" | "chunked" | "reference"

    def __post_init__(self) -> None:
        check_positive(self, "head_dim", "num_heads", "conv_size", "chunk_size")
        if self.num_v_heads is not None:
            check_positive(self, "num_v_heads")
            if self.num_v_heads < self.num_heads or self.num_v_heads % self.num_heads:
                raise ValueError(f"num_v_heads={self.num_v_heads} must be a multiple of num_heads={self.num_heads}")
        head_v = self.head_dim * self.expand_v
        if not math.isclose(head_v, round(head_v)) or round(head_v) <= 0:
            raise ValueError(f"head_dim * expand_v = {self.head_dim} * {self.expand_v} must be a positive integer")
        check_choice("output_gate_activation", self.output_gate_activation, ("swish", "silu", "sigmoid"))
        check_choice("impl", self.impl, IMPLS)


@register_mixer("gated_deltanet")
class GatedDeltaNet(RecurrentMixer):
    """Gated DeltaNet (fla-compatible): the delta rule with a Mamba-2 decay per head; chunked on CPU."""

    Options = GatedDeltaNetOptions

    def __init__(self, d_model: int, layer_idx: int = 0, **options: Any):
        super().__init__(d_model, layer_idx)
        self.opts = o = self.Options(**options)
        self.num_heads = o.num_heads
        self.num_v_heads = hv = o.num_v_heads or o.num_heads
        self.head_k_dim = o.head_dim
        self.head_v_dim = round(o.head_dim * o.expand_v)
        self.key_dim = o.num_heads * self.head_k_dim
        self.value_dim = hv * self.head_v_dim
        # construction order follows fla, so that one seed gives the same parameters there and here
        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.a_proj = nn.Linear(d_model, hv, bias=False)
        self.b_proj = nn.Linear(d_model, hv, bias=False)
        A = torch.empty(hv, dtype=torch.float32).uniform_(0, 16)
        self.A_log = nn.Parameter(torch.log(A))
        dt_min, dt_max, dt_init_floor = 0.001, 0.1, 1e-4
        dt = torch.exp(torch.rand(hv) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = torch.clamp(dt, min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        for p in (self.A_log, self.dt_bias):
            p._no_weight_decay = True  # type: ignore[attr-defined]
        if o.use_short_conv:
            self._add_short_convs(self.key_dim, self.key_dim, self.value_dim, o.conv_size, o.conv_bias)
        if o.use_gate:
            self.g_proj = nn.Linear(d_model, self.value_dim, bias=False)
            self.o_norm = HeadRMSNorm(self.head_v_dim, o.norm_eps, activation=o.output_gate_activation)
        else:
            self.o_norm = HeadRMSNorm(self.head_v_dim, o.norm_eps)
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)

    def _state_shape(self) -> tuple[int, int, int]:
        return self.num_v_heads, self.head_k_dim, self.head_v_dim

    def _mix(self, x: Tensor, cache: RecurrentCache | None) -> Tensor:
        o = self.opts
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if o.use_short_conv:
            q, k, v = self._short_convs(q, k, v, cache)
        else:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q, k = l2_norm(split_heads(q, self.head_k_dim)), l2_norm(split_heads(k, self.head_k_dim))  # (B, T, H, d_k)
        v = split_heads(v, self.head_v_dim)  # (B, T, H_v, d_v)
        if self.num_v_heads > self.num_heads:
            group = self.num_v_heads // self.num_heads
            q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
        ct = torch.promote_types(x.dtype, torch.float32)
        g = -self.A_log.to(ct).exp() * F.softplus(self.a_proj(x).to(ct) + self.dt_bias.to(ct))  # (B, T, H_v)
        beta = self.b_proj(x).to(ct).sigmoid()
        if o.allow_neg_eigval:
            beta = beta * 2.0
        y = self._scan(delta_rule_chunked, delta_rule_reference, cache, q, k, v, beta, g)
        return normed_output(self, y, x)

    def flops_per_token(self, seq_len: int) -> int:
        """Projections and convolutions, and the chunked delta rule (chunk ``min(chunk_size, seq_len)``)."""
        return delta_flops(self, seq_len, self.num_v_heads, self.head_k_dim, self.head_v_dim)
