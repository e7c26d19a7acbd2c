"""The residual block every mixer sits in.

Pre-norm: ``x = x + mixer(conv(norm1(x)))``, then, with an MLP, ``x = x + mlp(norm2(x))``. The optional
short causal depthwise convolution before the mixer (kernel ``short_conv``, e.g. 4) is the "short conv"
that helps small models learn associative recall (Arora et al. 2023, "Zoology"; Poli et al. 2023).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archs.mixers.base import MixerCache, dtype_bytes
from archs.mlp import make_mlp
from archs.norms import make_norm
from archs.ops.causal_conv import causal_conv1d

__all__ = ["Block", "BlockCache", "ShortConv"]


class ShortConv(nn.Module):
    """Causal depthwise conv over time: output ``t`` mixes inputs ``t-k+1 .. t`` per channel."""

    def __init__(self, d_model: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model, padding=kernel_size - 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D)
        if x.device.type == "cpu":  # in the (B, T, D) layout, no transposes; its backward is the fast one on CPU
            return causal_conv1d(x, self.conv.weight[:, 0], self.conv.bias, silu=False)
        t = x.shape[1]
        return self.conv(x.transpose(1, 2))[..., :t].transpose(1, 2)

    def step(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """``x: (B, T, D)`` after ``state: (B, D, k-1)`` (previous inputs); returns outputs and new state."""
        full = torch.cat([state, x.transpose(1, 2)], dim=2)  # (B, D, k-1+T)
        y = F.conv1d(full, self.conv.weight, self.conv.bias, groups=full.shape[1])  # (B, D, T)
        return y.transpose(1, 2), full[:, :, full.shape[2] - (self.kernel_size - 1):]


class BlockCache(MixerCache):
    """A block's decoding state: the mixer's cache and the short conv's last inputs."""

    def __init__(self, mixer: MixerCache, conv: Tensor | None):
        self.mixer = mixer
        self.conv = conv
        self.length = 0

    def nbytes(self) -> int:
        conv = 0 if self.conv is None else self.conv.numel() * self.conv.element_size()
        return self.mixer.nbytes() + conv


class Block(nn.Module):
    """Pre-norm residual block around one mixer instance (composition: the mixer is passed in)."""

    def __init__(self, mixer: nn.Module, d_model: int, *, norm: str = "rmsnorm", mlp: str = "swiglu",
                 mlp_ratio: float = 4.0, short_conv: int = 0, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.norm1 = make_norm(norm, d_model, bias=bias)
        self.short_conv = ShortConv(d_model, short_conv) if short_conv > 1 else None
        self.mixer = mixer
        self.mlp = make_mlp(mlp, d_model, mlp_ratio, bias=bias, dropout=dropout)
        self.norm2 = make_norm(norm, d_model, bias=bias) if self.mlp is not None else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D)
        h = self.norm1(x)
        if self.short_conv is not None:
            h = self.short_conv(h)
        x = x + self.dropout(self.mixer(h))
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x

    def init_cache(self, batch_size: int, max_len: int, device: torch.device | None,
                   dtype: torch.dtype) -> BlockCache:
        conv = None
        if self.short_conv is not None:
            conv = torch.zeros(batch_size, self.mixer.d_model, self.short_conv.kernel_size - 1,
                               device=device, dtype=dtype)
        return BlockCache(self.mixer.init_cache(batch_size, max_len, device, dtype), conv)

    def step(self, x: Tensor, cache: BlockCache) -> Tensor:
        h = self.norm1(x)
        if self.short_conv is not None:
            h, cache.conv = self.short_conv.step(h, cache.conv)
        x = x + self.mixer.step(h, cache.mixer)
        cache.length += x.shape[1]
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x

    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype: torch.dtype | None = None) -> int | None:
        mixer = self.mixer.state_bytes(seq_len, batch_size, dtype)
        if mixer is None:
            return None
        conv = 0
        if self.short_conv is not None:
            elem = dtype_bytes(dtype or self.norm1.weight.dtype)
            conv = batch_size * self.mixer.d_model * (self.short_conv.kernel_size - 1) * elem
        return mixer + conv
