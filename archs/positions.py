"""Position information: learned absolute embeddings (model level), RoPE and ALiBi (inside attention).

- RoPE (Su et al. 2021, "RoFormer"): rotate query/key channel pairs by angle ``pos * base^(-2i/d)``; the
  rotate-half layout (pairs ``(i, i + d/2)``) as in GPT-NeoX and Llama.
- ALiBi (Press et al. 2022, "Train Short, Test Long"): add ``-slope_h * (i - j)`` to the attention score of
  query ``i`` and key ``j``; slopes a geometric sequence ``2^(-8h/H)``, interleaved for non-power-of-2 H.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from registry import MixerlabError

POSITIONS = ("learned", "rope", "alibi", "none")

__all__ = ["POSITIONS", "LearnedPositions", "LengthError", "Rotary", "alibi_slopes", "alibi_bias", "apply_rope"]


class LengthError(MixerlabError, ValueError):
    """An input longer than a model with learned positions can run; the message names the limit and the fix."""


class LearnedPositions(nn.Module):
    """Absolute position embeddings with a hard limit ``max_seq_len``."""

    def __init__(self, max_seq_len: int, d_model: int):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.weight = nn.Parameter(torch.empty(max_seq_len, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, seq_len: int, offset: int = 0) -> Tensor:  # (T, D)
        end = offset + seq_len
        if end > self.max_seq_len:
            raise LengthError(
                f"position {end - 1} is beyond this model's learned position embeddings "
                f"(max_seq_len={self.max_seq_len}, input of {seq_len} tokens after {offset} cached). "
                f"Build the model with ModelSpec(max_seq_len={end}) or more, or use positions='rope', "
                f"'alibi' or 'none', which have no length limit"
            )
        return self.weight[offset:end]


class Rotary(nn.Module):
    """cos/sin tables for RoPE, grown on demand and cached (not saved in the state dict)."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self._cos: Tensor | None = None
        self._sin: Tensor | None = None

    def forward(self, seq_len: int, offset: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        end = offset + seq_len
        if self._cos is None or self._cos.shape[0] < end or self._cos.device != device:
            n = max(end, 2 * (self._cos.shape[0] if self._cos is not None else 256))
            t = torch.arange(n, device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device))  # (n, hd/2)
            emb = torch.cat([freqs, freqs], dim=-1)  # (n, hd)
            self._cos, self._sin = emb.cos(), emb.sin()
        return self._cos[offset:end].to(dtype), self._sin[offset:end].to(dtype)  # (T, hd) each


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x: (B, H, T, hd)`` by the tables ``cos, sin: (T, hd)``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi's per-head slopes, shape (H,)."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_2(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_2(closest) + power_of_2(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """ALiBi score bias ``-slope * (i - j)`` for query positions ``q_pos`` and key positions ``k_pos``.

    Returns (H, Tq, Tk); entries with ``j > i`` are positive and must be masked by the caller.
    """
    dist = (q_pos[:, None] - k_pos[None, :]).to(slopes.dtype)  # (Tq, Tk)
    return -slopes[:, None, None] * dist
