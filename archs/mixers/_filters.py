"""Implicit long filters (Hyena, Poli et al. 2023; Zoology's implicit long convolution), shared by ``hyena``
and ``base_conv``, and the long-filter decoding cache.

`ImplicitFilter` makes ``channels`` filters of any length ``L`` from positions, not from a table of taps:

    z(t) = [t / l_max, cos(f_k · 2π t / l_max), sin(f_k · 2π t / l_max)]   (k = 1 .. (emb_dim − 1) / 2,
                                                                             f_k = linspace(1e-4, bands − 1))
    h(t) = FFN(z(t)) · exp(−|δ_c| · t / l_max)

the FFN a small MLP (``emb_dim → order → order → channels``) with sine activations ``sin(w · x)`` (``w``
learned, per feature), the window decaying per channel at rates spread between ``log(target)/slow`` and
``log(target)/fast`` (target 1e-2, fast 0.3, slow 1.5: Hyena's defaults). ``kind="zoology"`` is Zoology's
own implicit long convolution instead (its BaseConv's): ``h(t) = FFN(z(t))`` with the FFN
``emb_dim → order → channels`` and one ReLU, and no window — a filter free to stay flat over every lag.

``l_max`` only normalises positions: a longer sequence evaluates the same functions at ``t / l_max > 1`` (the
window keeps decaying), so the filter extends past the training length by this rule rather than failing.

A long filter has no finite recurrent state in general: `ConvInputsCache` keeps every input the filter
reads, and each decoding step convolves over all of them (O(T) per token).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from archs.mixers.base import MixerCache

__all__ = ["ConvInputsCache", "ImplicitFilter", "Sin"]


class Sin(nn.Module):
    """``sin(w · x)`` with a learned frequency per feature."""

    def __init__(self, features: int, w: float = 1.0):
        super().__init__()
        self.freq = nn.Parameter(torch.full((features,), float(w)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.freq * x)


class ImplicitFilter(nn.Module):
    """``channels`` long filters ``(channels, L)`` from an MLP over positional features (see the module)."""

    KINDS = ("hyena", "zoology")

    def __init__(self, channels: int, *, order: int = 16, emb_dim: int = 3, l_max: int = 1024, w: float = 1.0,
                 fast_decay: float = 0.3, slow_decay: float = 1.5, target: float = 1e-2, kind: str = "hyena"):
        super().__init__()
        if emb_dim < 3 or emb_dim % 2 == 0:
            raise ValueError(f"emb_dim must be odd and >= 3 (time plus cos/sin pairs), got {emb_dim}")
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        self.channels, self.emb_dim, self.l_max, self.kind = channels, emb_dim, l_max, kind
        bands = (emb_dim - 1) // 2
        self.register_buffer("bands", torch.linspace(1e-4, bands - 1, bands), persistent=False)
        if kind == "zoology":  # no window: nothing to decay by
            self.ffn = nn.Sequential(nn.Linear(emb_dim, order), nn.ReLU(), nn.Linear(order, channels))
        else:
            self.ffn = nn.Sequential(nn.Linear(emb_dim, order), Sin(order, w), nn.Linear(order, order),
                                     Sin(order, w), nn.Linear(order, channels, bias=False))
            max_decay, min_decay = math.log(target) / fast_decay, math.log(target) / slow_decay
            self.register_buffer("deltas", torch.linspace(min_decay, max_decay, channels).abs(), persistent=False)

    def features(self, length: int, device: torch.device | None = None) -> Tensor:
        """``z(t)`` for ``t = 0 .. length-1``: ``(length, emb_dim)``."""
        ct = torch.promote_types(self.ffn[0].weight.dtype, torch.float32)
        t = torch.arange(length, device=device, dtype=ct)[:, None] / self.l_max
        angle = 2 * math.pi * t * self.bands.to(t.device, ct)
        return torch.cat([t, torch.cos(angle), torch.sin(angle)], -1)

    def forward(self, length: int) -> Tensor:
        """The filters, ``(channels, length)``, fp32 (fp64 for a float64 module)."""
        device = self.bands.device
        z = self.features(length, device)
        ct = torch.promote_types(self.ffn[0].weight.dtype, torch.float32)
        h = self.ffn(z.to(self.ffn[0].weight.dtype)).to(ct)  # (L, channels)
        if self.kind == "hyena":
            t = torch.arange(length, device=device, dtype=ct)[:, None] / self.l_max
            h = h * torch.exp(-t * self.deltas)
        return h.t()

    def flops(self) -> int:
        """FLOPs per position of the filter MLP and window (computed once per forward, per position)."""
        o, c = self.ffn[0].out_features, self.channels
        if self.kind == "zoology":
            return 2 * self.emb_dim * o + o + 2 * o * c + 2 * self.emb_dim
        return 2 * self.emb_dim * o + 2 * o * o + 2 * o * c + 2 * o + 3 * c + 2 * self.emb_dim


class ConvInputsCache(MixerCache):
    """Decoding state of a long-filter mixer: the inputs of its long convolutions so far, ``(B, L, C)``."""

    def __init__(self) -> None:
        self.inputs: Tensor | None = None
        self.length = 0

    def append(self, x: Tensor) -> Tensor:
        """Add ``x: (B, T, C)``; all inputs so far."""
        self.inputs = x if self.inputs is None else torch.cat([self.inputs, x], 1)
        self.length = self.inputs.shape[1]
        return self.inputs
