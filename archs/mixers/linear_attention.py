"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"): attention with the softmax replaced
by a feature map, ``φ(q)ᵀ Σ_s φ(k_s) v_sᵀ``, computed as a recurrence with no decay.

Per head: ``S_t = S_{t-1} + φ(k_t) v_tᵀ``, ``o_t = S_tᵀ φ(q_t) / sqrt(d_φ)``, optionally normalised by
``φ(q_t)·Σ_s φ(k_s)`` (``do_feature_map_norm``); then an RMSNorm per head and the output projection. Feature
maps (fla's names): ``elementwise_product`` (the default: ``W_1 x ⊙ W_2 x``, learned), ``hedgehog``
(``softmax([Wx, -Wx])``, learned), ``t2r`` (``relu(Wx)``, learned), ``dpfp``, ``elu`` (elu + 1), ``relu``,
``identity``.

Options, parameter names, shapes and initialisation are those of flash-linear-attention's
``LinearAttention`` (``hidden_size`` is ``d_model``), so state dicts move between the two with
``strict=True``. Backends: ``chunked`` and ``reference`` (`archs.ops.linear_recurrence`); the normaliser rides
along as an extra value column of ones, so it is carried in the same state. Decoding: constant cost per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from archs.mixers._recurrent import (
    IMPLS,
    HeadRMSNorm,
    RecurrentCache,
    RecurrentMixer,
    check_choice,
    check_kv_heads,
    check_positive,
    elu_p1,
    split_heads,
)
from archs.ops.linear_recurrence import linear_recurrence_chunked, linear_recurrence_reference
from registry import register_mixer

__all__ = ["FEATURE_MAPS", "LinearAttention", "LinearAttentionOptions"]

FEATURE_MAPS = ("elementwise_product", "hedgehog", "t2r", "dpfp", "elu", "relu", "identity")


class HadamardFeatureMap(nn.Module):
    """``layer1(x) ⊙ layer2(x)``."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.layer1 = nn.Linear(head_dim, head_dim)
        self.layer2 = nn.Linear(head_dim, head_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer1(x) * self.layer2(x)


class HedgehogFeatureMap(nn.Module):
    """``softmax([2 W x, -2 W x])`` (Zhang et al. 2024), ``W`` initialised to the identity."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.layer = nn.Linear(head_dim, head_dim)
        nn.init.eye_(self.layer.weight)
        nn.init.zeros_(self.layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        y = 2 * self.layer(x)
        return torch.cat([y, -y], dim=-1).softmax(-1)


class T2RFeatureMap(nn.Module):
    """``relu(W x)`` (Kasai et al. 2021)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.layer = nn.Linear(head_dim, head_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x).relu()


def dpfp(x: Tensor, nu: int = 4) -> Tensor:
    """Deterministic parameter-free projection (Schlag et al. 2021): ``2 · nu · d`` features."""
    x = torch.cat([x.relu(), (-x).relu()], dim=-1)
    rolled = torch.cat([x.roll(shifts=j, dims=-1) for j in range(1, nu + 1)], dim=-1)
    return torch.cat([x] * nu, dim=-1) * rolled


def _feature_map(name: str, head_dim: int) -> Any:
    if name == "elementwise_product":
        return HadamardFeatureMap(head_dim)
    if name == "hedgehog":
        return HedgehogFeatureMap(head_dim)
    if name == "t2r":
        return T2RFeatureMap(head_dim)
    return {"dpfp": dpfp, "elu": elu_p1, "relu": nn.ReLU(), "identity": nn.Identity()}[name]


@dataclass(frozen=True)
class LinearAttentionOptions:
    """fla ``LinearAttention``'s options and defaults, plus ``chunk_size`` and ``impl`` (the backend)."""

    expand_k: float = 1.0
    expand_v: float = 1.0
    num_heads: int = 8
    num_kv_heads: int | None = None
    feature_map: str = "elementwise_product"
    tie_feature_map_qk: bool = False
    output_norm: str = "rmsnorm"
    norm_q: bool = False
    norm_k: bool = False
    do_feature_map_norm: bool = False
    elementwise_affine: bool = True
    norm_eps: float = 1e-5
    chunk_size: int = 64
    impl: str = "auto"  # "auto" | "chunked" | "reference"

    def __post_init__(self) -> None:
        check_positive(self, "num_heads", "chunk_size")
        check_kv_heads(self)
        check_choice("feature_map", self.feature_map, FEATURE_MAPS)
        check_choice("output_norm", self.output_norm, ("rmsnorm", "identity"))
        check_choice("impl", self.impl, IMPLS)


@register_mixer("linear_attention")
class LinearAttention(RecurrentMixer):
    """Linear attention with a feature map (fla-compatible), optionally normalised; chunked on CPU."""

    Options = LinearAttentionOptions

    def __init__(self, d_model: int, layer_idx: int = 0, **options: Any):
        super().__init__(d_model, layer_idx)
        self.opts = o = self.Options(**options)
        self._set_widths(o.expand_k, o.expand_v, o.num_heads, o.num_kv_heads)
        self.feature_dim = {"hedgehog": 2, "dpfp": 8}.get(o.feature_map, 1) * self.head_k_dim
        # construction order follows fla, so that one seed gives the same parameters there and here
        self.feature_map_q = _feature_map(o.feature_map, self.head_k_dim)
        if o.tie_feature_map_qk or o.feature_map in ("dpfp", "elu", "relu", "identity"):
            self.feature_map_k = self.feature_map_q
        else:
            self.feature_map_k = _feature_map(o.feature_map, self.head_k_dim)
        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, self.kv_key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, self.kv_value_dim, bias=False)
        self.norm = (HeadRMSNorm(self.head_v_dim, o.norm_eps, o.elementwise_affine) if o.output_norm == "rmsnorm"
                     else nn.Identity())
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)

    def _state_shape(self) -> tuple[int, int, int]:
        return self.num_heads, self.feature_dim, self.head_v_dim + int(self.opts.do_feature_map_norm)

    def _mix(self, x: Tensor, cache: RecurrentCache | None) -> Tensor:
        o = self.opts
        q = split_heads(self.q_proj(x), self.head_k_dim)  # (B, T, H, d_k)
        k, v = self._kv_heads(self.k_proj(x), self.head_k_dim), self._kv_heads(self.v_proj(x), self.head_v_dim)
        q, k = self.feature_map_q(q), self.feature_map_k(k)  # (B, T, H, d_φ)
        if o.norm_q:
            q = q / (q.sum(-1, keepdim=True) + 1e-4)
        if o.norm_k:
            k = k / (k.sum(-1, keepdim=True) + 1e-4)
        if o.do_feature_map_norm:  # the normaliser φ(q)·Σφ(k) as one more value column
            v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        y = self._scan(linear_recurrence_chunked, linear_recurrence_reference, cache, q, k, v)
        if o.do_feature_map_norm:
            y = y[..., :-1] / (y[..., -1:] + 1e-10)
        return self.o_proj(self.norm(y).flatten(-2))  # (B, T, D)

    def flops_per_token(self, seq_len: int) -> int:
        """Projections and learned feature maps, and the chunked recurrence (chunk ``min(chunk_size, seq_len)``)."""
        extra = int(self.opts.do_feature_map_norm)
        return self._recurrence_flops(seq_len, self.num_heads, self.feature_dim, self.head_v_dim + extra)
