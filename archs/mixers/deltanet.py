"""DeltaNet (Schlag et al. 2021; Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length"): linear attention whose state is written by the delta rule.

Per head: ``S_t = (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ``, ``o_t = S_tᵀ q_t / sqrt(d_k)``, with
``β_t = sigmoid(W_β x_t)`` (times 2 with ``allow_neg_eigval``) and q, k L2-normalised after a short causal
convolution and SiLU. The output is RMS-normalised per head (gated by ``swish(W_g x)`` with ``use_gate``) and
projected back.

Options, parameter names, shapes and initialisation are those of flash-linear-attention's ``DeltaNet``
(``hidden_size`` is ``d_model``), so state dicts move between the two with ``strict=True``. Backends:
``chunked`` (`archs.ops.delta_rule.delta_rule_chunked`, the UT-transform form) and ``reference``. Decoding
keeps the ``(H, d_k, d_v)`` state and the convolutions' last inputs: constant cost per token.
"""

from __future__ import annotations

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
    elu_p1,
    l2_norm,
    split_heads,
)
from archs.ops.delta_rule import delta_rule_chunked, delta_rule_reference
from registry import register_mixer

__all__ = ["DeltaNet", "DeltaNetOptions"]

_QK_ACTIVATIONS = {"silu": F.silu, "relu": F.relu, "elu": elu_p1, "identity": lambda x: x}


@dataclass(frozen=True)
class DeltaNetOptions:
    """fla ``DeltaNet``'s options and defaults, plus ``chunk_size`` and ``impl`` (the backend)."""

    expand_k: float = 1.0
    expand_v: float = 1.0
    num_heads: int = 4
    use_beta: bool = True
    use_gate: bool = False
    use_short_conv: bool = True
    conv_size: int = 4
    conv_bias: bool = False
    allow_neg_eigval: bool = False
    qk_activation: str = "silu"
    qk_norm: str = "l2"
    norm_eps: float = 1e-5
    chunk_size: int = 64
    impl: str = "auto"  # "auto" | "chunked" | "reference"

    def __post_init__(self) -> None:
        check_positive(self, "num_heads", "conv_size", "chunk_size")
        check_choice("qk_activation", self.qk_activation, tuple(_QK_ACTIVATIONS))
        check_choice("qk_norm", self.qk_norm, ("l2", "sum"))
        check_choice("impl", self.impl, IMPLS)


@register_mixer("deltanet")
class DeltaNet(RecurrentMixer):
    """DeltaNet (fla-compatible): linear attention written by the delta rule; chunked (UT transform) on CPU."""

    Options = DeltaNetOptions

    def __init__(self, d_model: int, layer_idx: int = 0, **options: Any):
        super().__init__(d_model, layer_idx)
        self.opts = o = self.Options(**options)
        self._set_widths(o.expand_k, o.expand_v, o.num_heads)
        h = self.num_heads
        # construction order follows fla, so that one seed gives the same parameters there and here
        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, self.value_dim, bias=False)
        if o.use_beta:
            self.b_proj = nn.Linear(d_model, h, bias=False)
        if o.use_short_conv:
            self._add_short_convs(self.key_dim, self.key_dim, self.value_dim, o.conv_size, o.conv_bias,
                                  qk_activation="silu" if o.qk_activation == "silu" else None)
        if o.use_gate:
            self.g_proj = nn.Linear(d_model, self.value_dim, bias=False)
            self.o_norm = HeadRMSNorm(self.head_v_dim, o.norm_eps, activation="swish")
        else:
            self.o_norm = HeadRMSNorm(self.head_v_dim, o.norm_eps)
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)

    def _state_shape(self) -> tuple[int, int, int]:
        return self.num_heads, self.head_k_dim, self.head_v_dim

    def _mix(self, x: Tensor, cache: RecurrentCache | None) -> Tensor:
        o = self.opts
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if o.use_short_conv:
            q, k, v = self._short_convs(q, k, v, cache)
        else:
            if o.qk_activation == "silu":
                q, k = F.silu(q), F.silu(k)
            v = F.silu(v)
        q, k = split_heads(q, self.head_k_dim), split_heads(k, self.head_k_dim)  # (B, T, H, d_k)
        v = split_heads(v, self.head_v_dim)
        if o.qk_activation != "silu":
            q, k = _QK_ACTIVATIONS[o.qk_activation](q), _QK_ACTIVATIONS[o.qk_activation](k)
        if o.qk_norm == "sum":
            q, k = F.normalize(q, p=1, dim=-1, eps=1e-6), F.normalize(k, p=1, dim=-1, eps=1e-6)
        else:
            q, k = l2_norm(q), l2_norm(k)
        beta = self.b_proj(x).sigmoid() if o.use_beta else torch.ones_like(q[..., 0])  # (B, T, H)
        if o.allow_neg_eigval:
            beta = beta * 2.0
        y = self._scan(delta_rule_chunked, delta_rule_reference, cache, q, k, v, beta)
        return normed_output(self, y, x)

    def flops_per_token(self, seq_len: int) -> int:
        """Projections and convolutions, and the chunked delta rule (chunk ``min(chunk_size, seq_len)``)."""
        return delta_flops(self, seq_len, self.num_heads, self.head_k_dim, self.head_v_dim)


def normed_output(m: RecurrentMixer, y: Tensor, x: Tensor) -> Tensor:
    """A delta-rule layer's output: ``o_norm`` per head (gated by ``g_proj(x)`` with ``use_gate``), then
    ``o_proj``."""
    y = m.o_norm(y, split_heads(m.g_proj(x), m.head_v_dim)) if m.opts.use_gate else m.o_norm(y)
    return m.o_proj(y.flatten(-2))  # (B, T, D)


def delta_flops(m: RecurrentMixer, seq_len: int, h: int, dk: int, dv: int) -> int:
    """Forward FLOPs per token of a delta-rule mixer: every ``nn.Linear`` and short convolution in it, and the
    chunkwise algorithm (``K Kᵀ``, the triangular solve, ``W S``, the state update, ``Q Kᵀ`` and the output)."""
    c = max(1, min(m.opts.chunk_size, seq_len))
    scan = h * (2 * c * dk + c * (dv + dk) + 2 * dk * dv + 2 * dk * dv + 2 * c * dk + 2 * c * dv + 2 * dk * dv)
    return int(m._projection_flops() + scan)
