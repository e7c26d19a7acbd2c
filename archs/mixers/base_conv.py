"""BaseConv (Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language Models"): a
gated convolution, the simplest of the gated-convolution family,

    y = (x W₁ + b₁) ⊙ conv(x W₂ + b₂)

with ``conv`` a causal depthwise convolution of ``kernel_size`` taps (short, Zoology's default 3) or, with
``implicit_long_conv=True`` (or ``kernel_size=-1``, Zoology's spelling), an implicit long filter spanning
the whole sequence (`ImplicitFilter`, positions normalised by ``l_max``; longer sequences extend it) applied
by FFT convolution, plus a per-channel skip. ``long_filter`` picks the filter: ``"zoology"`` (the default,
Zoology's own ``ImplicitLongConvolution``: a ReLU MLP of the position, 3 → ``filter_order`` (16) → d_model,
no window) or ``"hyena"`` (Hyena's sine MLP under a decaying window, ``filter_order`` 64 — what
``base_conv`` built before 2026-12-07, and what the committed MQAR study's BaseConv rows ran with).

Decoding: the short convolution keeps its last ``kernel_size − 1`` inputs (O(1)); the long filter has no
finite state, so the cache keeps every input and each step convolves over them (O(T) per token), and
``state_bytes`` says so. Zoology's ``state_size()`` counts ``d_model · kernel_size`` numbers for a short
convolution and ``d_model · T`` for a long one; ours counts the bytes the cache holds: ``kernel_size − 1``
inputs (the newest input is not state) and ``T`` inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from archs.mixers._filters import ConvInputsCache, ImplicitFilter
from archs.mixers.base import Mixer, MixerCache, dtype_bytes
from archs.ops.causal_conv import causal_conv1d
from archs.ops.long_conv import LONG_CONVS, long_conv_flops, long_conv_last
from registry import register_mixer

__all__ = ["BaseConv", "BaseConvOptions", "ShortConvCache"]


@dataclass(frozen=True)
class BaseConvOptions:
    kernel_size: int = 3  # taps of the short convolution; -1: the implicit long filter
    implicit_long_conv: bool = False  # the implicit long filter instead of the short convolution
    l_max: int = 1024  # the long filter's position scale (training length)
    filter_order: int | None = None  # width of the long filter's MLP; None: 16 ("zoology"), 64 ("hyena")
    filter_emb_dim: int = 3  # positional features: time and (emb_dim - 1) / 2 cos/sin pairs
    long_filter: str = "zoology"  # "zoology": ReLU MLP, no window | "hyena": sine MLP, decaying window
    conv: str = "auto"  # long filter: "auto" (= "fft") | "fft" | "reference"

    CONVS = ("auto", "fft", "reference")

    FILTER_ORDERS = {"zoology": 16, "hyena": 64}

    def __post_init__(self) -> None:
        if self.long_filter not in ImplicitFilter.KINDS:
            raise ValueError(f"long_filter must be one of {ImplicitFilter.KINDS}, got {self.long_filter!r}")
        if self.filter_order is None:
            object.__setattr__(self, "filter_order", self.FILTER_ORDERS[self.long_filter])
        if not isinstance(self.kernel_size, int) or (self.kernel_size < 1 and self.kernel_size != -1):
            raise ValueError(f"kernel_size must be a positive int or -1 (implicit long filter), "
                             f"got {self.kernel_size!r}")
        for name in ("l_max", "filter_order"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.conv not in self.CONVS:
            raise ValueError(f"conv must be one of {self.CONVS}, got {self.conv!r}")

    @property
    def long(self) -> bool:
        return self.implicit_long_conv or self.kernel_size == -1


class ShortConvCache(MixerCache):
    """Decoding state of the short convolution: its last ``kernel_size - 1`` inputs, ``(B, K-1, D)``."""

    def __init__(self, batch_size: int, d: int, k: int, device: torch.device | None, dtype: torch.dtype):
        self.window = torch.zeros(batch_size, k - 1, d, device=device, dtype=dtype)
        self.length = 0


@register_mixer("base_conv")
class BaseConv(Mixer):
    """Zoology's BaseConv: a projection ⊙ a causal convolution of another (short, or implicit long by FFT)."""

    Options = BaseConvOptions

    def __init__(self, d_model: int, layer_idx: int = 0, **options):
        super().__init__(d_model, layer_idx)
        self.opts = opts = self.Options(**options)
        self.projection = nn.Linear(d_model, d_model)
        self.in_proj = nn.Linear(d_model, d_model)
        if opts.long:
            self.filter = ImplicitFilter(d_model, order=opts.filter_order, emb_dim=opts.filter_emb_dim,
                                         l_max=opts.l_max, kind=opts.long_filter)
            self.bias = nn.Parameter(torch.randn(d_model))  # the per-channel skip of the long convolution
        else:
            self.conv_weight = nn.Parameter(torch.empty(d_model, opts.kernel_size))
            self.conv_bias = nn.Parameter(torch.zeros(d_model))
            nn.init.uniform_(self.conv_weight, -opts.kernel_size**-0.5, opts.kernel_size**-0.5)

    @classmethod
    def available_backends(cls) -> dict[str, str]:
        return {"short": "yes", "fft": "yes", "reference": "yes", "direct": "yes"}  # direct: long-filter decoding

    def _long(self, u: Tensor, k: Tensor) -> Tensor:
        conv = LONG_CONVS[self.opts.conv]
        return conv(u, k) + u * self.bias.to(u.dtype)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D)
        u = self.in_proj(x)
        if self.opts.long:
            self._ran("reference" if self.opts.conv == "reference" else "fft")
            c = self._long(u, self.filter(x.shape[1]))
        else:
            self._ran("short")
            c = causal_conv1d(u, self.conv_weight, self.conv_bias, silu=False)
        return self.projection(x) * c

    # decoding --------------------------------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_len: int, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> MixerCache:
        if self.opts.long:
            return ConvInputsCache()
        return ShortConvCache(batch_size, self.d_model, self.opts.kernel_size, device or self.in_proj.weight.device,
                              self._dtype(dtype))

    def step(self, x: Tensor, cache: MixerCache) -> Tensor:
        u, t = self.in_proj(x), x.shape[1]
        if isinstance(cache, ConvInputsCache) and self.opts.long:
            self._ran("fft" if t > 1 else "direct")
            inputs = cache.append(u)
            k = self.filter(inputs.shape[1])
            conv = LONG_CONVS[self.opts.conv]
            c = long_conv_last(inputs, k, t, conv) + u * self.bias.to(u.dtype)
        elif isinstance(cache, ShortConvCache) and not self.opts.long:
            self._ran("short")
            window = torch.cat([cache.window.to(u.dtype), u], 1)
            k = self.opts.kernel_size
            cache.window.copy_(window[:, window.shape[1] - (k - 1):])
            cache.length += t
            c = causal_conv1d(window, self.conv_weight, self.conv_bias, silu=False)[:, k - 1:]
        else:
            raise TypeError(f"{self.mixer_name}.step got a {type(cache).__name__}; use this mixer's init_cache")
        return self.projection(x) * c

    # costs -----------------------------------------------------------------------------------------------
    def _dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        return dtype if dtype is not None else self.in_proj.weight.dtype

    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype: torch.dtype | None = None) -> int:
        """Long filter: every input so far, ``(B, T, D)`` — grows with T. Short: ``(B, K-1, D)``, constant."""
        kept = seq_len if self.opts.long else self.opts.kernel_size - 1
        return batch_size * kept * self.d_model * dtype_bytes(self._dtype(dtype))

    def flops_per_token(self, seq_len: int) -> int:
        d = self.d_model
        if self.opts.long:
            conv = long_conv_flops(seq_len, d) + self.filter.flops() + 2 * d
        else:
            conv = 2 * d * self.opts.kernel_size + d
        return 2 * 2 * d * d + 2 * d + conv + d
