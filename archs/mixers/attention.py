"""Causal multi-head self-attention (Vaswani et al. 2017), with grouped-query heads (Ainslie et al. 2023),
RoPE or ALiBi positions, and a KV cache for decoding.

``softmax(q k^T / sqrt(hd) + bias) v`` per head, causal. ``impl="math"`` materialises the softmax (the
reference); ``impl="sdpa"`` calls torch's fused kernels (a flash kernel on CPU and CUDA when unmasked).
`XFormersAttention` and `SlidingWindowAttention` reuse this module and change only the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from archs.mixers.base import Mixer, MixerCache, dtype_bytes
from archs.ops.attention import attention_math, attention_sdpa
from archs.positions import Rotary, alibi_slopes, apply_rope
from registry import register_mixer

__all__ = ["Attention", "AttentionOptions", "KVCache"]

ATTENTION_POSITIONS = ("none", "rope", "alibi")


@dataclass(frozen=True)
class AttentionOptions:
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: = n_heads; fewer: grouped-query attention
    head_dim: int | None = None  # None: d_model // n_heads
    impl: str = "sdpa"  # "sdpa" | "math"
    positions: str = "none"  # "none" | "rope" | "alibi" (learned positions live in the model)
    rope_base: float = 10000.0
    bias: bool = False

    IMPLS = ("sdpa", "math")

    def __post_init__(self) -> None:
        if self.n_heads <= 0:
            raise ValueError(f"n_heads must be positive, got {self.n_heads}")
        kv = self.n_kv_heads or self.n_heads
        if kv <= 0 or self.n_heads % kv:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.impl not in self.IMPLS:
            raise ValueError(f"impl must be one of {self.IMPLS}, got {self.impl!r}")
        if self.positions not in ATTENTION_POSITIONS:
            raise ValueError(f"positions must be one of {ATTENTION_POSITIONS}, got {self.positions!r} "
                             f"(learned positions are set on the model: ModelSpec(positions='learned'))")


class KVCache(MixerCache):
    """Keys and values so far, ``(B, Hkv, L, hd)``, in a buffer that doubles when full.

    With ``window`` set, only the last ``window - 1`` tokens are kept (all a new query can see).
    """

    def __init__(self, batch_size: int, n_kv_heads: int, head_dim: int, capacity: int,
                 device: torch.device | None, dtype: torch.dtype, window: int | None = None):
        cap = max(1, capacity if window is None else min(capacity, window))
        self.k = torch.zeros(batch_size, n_kv_heads, cap, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.window = window
        self.filled = 0  # tokens held in the buffer
        self.length = 0  # tokens consumed

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append new keys/values; return every key/value the new queries may attend to."""
        t = k.shape[2]
        if self.window is not None:
            keys = torch.cat([self.k[:, :, : self.filled], k], dim=2)
            values = torch.cat([self.v[:, :, : self.filled], v], dim=2)
            keep = min(keys.shape[2], self.window - 1)
            if keep > self.k.shape[2]:
                self.k = torch.zeros_like(keys[:, :, :keep])
                self.v = torch.zeros_like(self.k)
            if keep:
                self.k[:, :, :keep] = keys[:, :, keys.shape[2] - keep:]
                self.v[:, :, :keep] = values[:, :, keys.shape[2] - keep:]
            self.filled = keep
            self.length += t
            return keys, values
        need = self.filled + t
        if need > self.k.shape[2]:
            cap = max(need, 2 * self.k.shape[2])
            grown_k = self.k.new_zeros(*self.k.shape[:2], cap, self.k.shape[3])
            grown_v = torch.zeros_like(grown_k)
            grown_k[:, :, : self.filled] = self.k[:, :, : self.filled]
            grown_v[:, :, : self.filled] = self.v[:, :, : self.filled]
            self.k, self.v = grown_k, grown_v
        self.k[:, :, self.filled: need] = k
        self.v[:, :, self.filled: need] = v
        self.filled = need
        self.length += t
        return self.k[:, :, :need], self.v[:, :, :need]

    def nbytes(self) -> int:
        b, h, _, d = self.k.shape
        return 2 * b * h * self.filled * d * self.k.element_size()


@register_mixer("attention")
class Attention(Mixer):
    """Causal multi-head attention (GQA, RoPE/ALiBi); impl 'math' (reference) or 'sdpa' (fused)."""

    Options = AttentionOptions
    window: int | None = None  # keys visible to a query (None: all earlier ones)

    def __init__(self, d_model: int, layer_idx: int = 0, **options):
        super().__init__(d_model, layer_idx)
        self.opts = opts = self.Options(**options)
        self.n_heads = opts.n_heads
        self.n_kv_heads = opts.n_kv_heads or opts.n_heads
        if opts.head_dim is None and d_model % opts.n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={opts.n_heads}; "
                             f"set head_dim or pick n_heads dividing d_model")
        self.head_dim = opts.head_dim or d_model // opts.n_heads
        qkv_out = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.wqkv = nn.Linear(d_model, qkv_out, bias=opts.bias)
        self.out_proj = nn.Linear(self.n_heads * self.head_dim, d_model, bias=opts.bias)
        self.rotary = Rotary(self.head_dim, opts.rope_base) if opts.positions == "rope" else None
        if opts.positions == "alibi":
            self.register_buffer("alibi", alibi_slopes(self.n_heads), persistent=False)
        else:
            self.alibi = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.wqkv, self.out_proj):
            nn.init.normal_(lin.weight, std=0.02)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    # kernels -------------------------------------------------------------------------------------------
    @classmethod
    def available_backends(cls) -> dict[str, str]:
        return {"math": "yes", "sdpa": "yes"}

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """(B, H, Tq, hd), (B, Hkv, Tk, hd) x2 -> (B, H, Tq, hd), causal and bottom-right aligned."""
        if self.opts.impl == "math":
            self._ran("math")
            return attention_math(q, k, v, window=self.window, alibi=self.alibi)
        self._ran("sdpa")
        return attention_sdpa(q, k, v, window=self.window, alibi=self.alibi)

    # forward -------------------------------------------------------------------------------------------
    def _qkv(self, x: Tensor, offset: int) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        h, hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv(x).split([h * hd, hkv * hd, hkv * hd], dim=-1)
        q = q.view(b, t, h, hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(b, t, hkv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(b, t, hkv, hd).transpose(1, 2)
        if self.rotary is not None:
            cos, sin = self.rotary(t, offset, x.device, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def _out(self, y: Tensor) -> Tensor:
        b, _, t, _ = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(b, t, -1))  # (B, T, D)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._qkv(x, 0)
        return self._out(self.attend(q, k, v))

    # decoding ------------------------------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_len: int, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> KVCache:
        return KVCache(batch_size, self.n_kv_heads, self.head_dim, max_len, device, self._dtype(dtype),
                       window=self.window)

    def step(self, x: Tensor, cache: MixerCache) -> Tensor:
        assert isinstance(cache, KVCache), f"{self.mixer_name} needs its KVCache, got {type(cache).__name__}"
        q, k, v = self._qkv(x, cache.length)
        keys, values = cache.extend(k, v)
        return self._out(self.attend(q, keys, values))

    # costs ---------------------------------------------------------------------------------------------
    def _visible(self, seq_len: int) -> float:
        """Keys a query sees, averaged over the positions of a sequence of ``seq_len``."""
        w = self.window
        if w is None or w >= seq_len:
            return (seq_len + 1) / 2
        return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len

    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype: torch.dtype | None = None) -> int:
        held = seq_len if self.window is None else min(seq_len, self.window - 1)
        return 2 * batch_size * self.n_kv_heads * self.head_dim * held * dtype_bytes(self._dtype(dtype))

    def flops_per_token(self, seq_len: int) -> int:
        hd, h, hkv, d = self.head_dim, self.n_heads, self.n_kv_heads, self.d_model
        proj = 2 * d * (h + 2 * hkv) * hd + 2 * h * hd * d
        return int(proj + 4 * h * hd * self._visible(seq_len))  # q·k and p·v
