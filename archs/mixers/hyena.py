"""The Hyena operator (Poli, Massaroli, Nguyen, Fu, Dao, Baccus, Bengio, Ermon & Ré 2023, "Hyena Hierarchy:
Towards Larger Convolutional Language Models"), of order N (default 2).

``in_proj`` makes N + 1 projections of the input, a short causal depthwise convolution (``short_filter``
taps, 3) runs over all of them, and they split into ``x_1 … x_N, v``; then

    z = v;   z = x_n ⊙ (h_n * z + b_n ⊙ z)   for n = 1 .. N;   out = out_proj(z)

(order 2: ``y = x_2 ⊙ (h_2 * (x_1 ⊙ (h_1 * v)))``, each long convolution with a per-channel skip ``b_n``).
The filters ``h_n`` are implicit (`ImplicitFilter`: an MLP with sine activations over positional features,
times an exponentially decaying window) and applied by FFT convolution over 2T. ``l_max`` normalises the
filters' positions; a sequence longer than ``l_max`` evaluates the same functions further out (the window
keeps decaying) — the filter extends by this rule, it does not fail.

Decoding: the short convolution keeps its last ``short_filter − 1`` inputs; the long filters have no finite
state, so the cache keeps each stage's inputs ``(B, T, D)`` and a step convolves over them (O(T) per
token); ``state_bytes`` counts them (Zoology's ``state_size()`` counts ``d_model · T`` per long filter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from archs.mixers._filters import ImplicitFilter
from archs.mixers.base import Mixer, MixerCache, dtype_bytes
from archs.ops.causal_conv import causal_conv1d
from archs.ops.long_conv import LONG_CONVS, long_conv_flops, long_conv_last
from registry import register_mixer

__all__ = ["Hyena", "HyenaCache", "HyenaOptions"]


@dataclass(frozen=True)
class HyenaOptions:
    order: int = 2  # N: long convolutions (and gates)
    filter_order: int = 64  # width of the filter MLP
    emb_dim: int = 3  # positional features: time and (emb_dim - 1) / 2 cos/sin pairs
    short_filter: int = 3  # taps of the short depthwise convolution
    l_max: int = 1024  # the filters' position scale (training length)
    w: float = 1.0  # initial frequency of the sine activations
    conv: str = "auto"  # "auto" (= "fft") | "fft" | "reference"

    CONVS = ("auto", "fft", "reference")

    def __post_init__(self) -> None:
        for name in ("order", "filter_order", "short_filter", "l_max"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not isinstance(self.emb_dim, int) or self.emb_dim < 3 or self.emb_dim % 2 == 0:
            raise ValueError(f"emb_dim must be an odd int >= 3, got {self.emb_dim!r}")
        if self.conv not in self.CONVS:
            raise ValueError(f"conv must be one of {self.CONVS}, got {self.conv!r}")


class HyenaCache(MixerCache):
    """Decoding state: the short convolution's last inputs ``(B, K−1, (N+1)·D)`` and every input of each
    long convolution so far (``stages``: N tensors ``(B, T, D)``)."""

    def __init__(self, window: Tensor, order: int):
        self.window = window
        self.stages: list[Tensor | None] = [None] * order
        self.length = 0

    def tensors(self) -> list[Tensor]:
        return [self.window, *(s for s in self.stages if s is not None)]


@register_mixer("hyena")
class Hyena(Mixer):
    """Hyena operator (order 2 by default): gates ⊙ implicit long filters (sine-MLP, decay window) by FFT."""

    Options = HyenaOptions

    def __init__(self, d_model: int, layer_idx: int = 0, **options):
        super().__init__(d_model, layer_idx)
        self.opts = opts = self.Options(**options)
        width = (opts.order + 1) * d_model
        self.in_proj = nn.Linear(d_model, width)
        self.short_weight = nn.Parameter(torch.empty(width, opts.short_filter))
        self.short_bias = nn.Parameter(torch.zeros(width))
        nn.init.uniform_(self.short_weight, -opts.short_filter**-0.5, opts.short_filter**-0.5)
        self.filter = ImplicitFilter(opts.order * d_model, order=opts.filter_order, emb_dim=opts.emb_dim,
                                     l_max=opts.l_max, w=opts.w)
        self.filter_bias = nn.Parameter(torch.randn(opts.order, d_model))
        self.out_proj = nn.Linear(d_model, d_model)

    @classmethod
    def available_backends(cls) -> dict[str, str]:
        return {"fft": "yes", "reference": "yes", "direct": "yes"}  # direct: one-token decoding steps

    def _conv(self, z: Tensor, k: Tensor, n: int) -> Tensor:
        conv = LONG_CONVS[self.opts.conv]
        return conv(z, k) + z * self.filter_bias[n].to(z.dtype)

    def _split(self, u: Tensor) -> tuple[list[Tensor], Tensor]:
        parts = u.split(self.d_model, dim=-1)
        return list(parts[:-1]), parts[-1]

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D)
        self._ran("reference" if self.opts.conv == "reference" else "fft")
        u = causal_conv1d(self.in_proj(x), self.short_weight, self.short_bias, silu=False)
        gates, z = self._split(u)
        filters = self.filter(x.shape[1]).split(self.d_model, dim=0)  # N of (D, T)
        for n, (gate, k) in enumerate(zip(gates, filters, strict=True)):
            z = gate * self._conv(z, k, n)
        return self.out_proj(z)

    # decoding --------------------------------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_len: int, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> HyenaCache:
        dtype = dtype if dtype is not None else self.in_proj.weight.dtype
        window = torch.zeros(batch_size, self.opts.short_filter - 1, self.in_proj.out_features,
                             device=device or self.in_proj.weight.device, dtype=dtype)
        return HyenaCache(window, self.opts.order)

    def step(self, x: Tensor, cache: MixerCache) -> Tensor:
        """Consume ``x: (B, T, D)``: the short convolution from its window, each long convolution over its
        stage's inputs so far."""
        self._check_cache(cache, HyenaCache, x)
        t, k = x.shape[1], self.opts.short_filter
        self._ran("fft" if t > 1 else "direct")
        window = torch.cat([cache.window.to(x.dtype), self.in_proj(x)], 1)
        cache.window.copy_(window[:, window.shape[1] - (k - 1):])
        u = causal_conv1d(window, self.short_weight, self.short_bias, silu=False)[:, k - 1:]
        gates, z = self._split(u)
        total = cache.length + t
        filters = self.filter(total).split(self.d_model, dim=0)
        for n, (gate, kn) in enumerate(zip(gates, filters, strict=True)):
            prev = cache.stages[n]
            inputs = z if prev is None else torch.cat([prev, z], 1)
            cache.stages[n] = inputs
            conv = LONG_CONVS[self.opts.conv]
            z = gate * (long_conv_last(inputs, kn, t, conv) + z * self.filter_bias[n].to(z.dtype))
        cache.length = total
        return self.out_proj(z)

    # costs -----------------------------------------------------------------------------------------------
    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype: torch.dtype | None = None) -> int:
        """Grows with ``seq_len``: every long-convolution input ``N · (B, T, D)`` plus the short window."""
        b = dtype_bytes(dtype if dtype is not None else self.in_proj.weight.dtype)
        window = batch_size * (self.opts.short_filter - 1) * self.in_proj.out_features * b
        return window + self.opts.order * batch_size * seq_len * self.d_model * b

    def flops_per_token(self, seq_len: int) -> int:
        d, n = self.d_model, self.opts.order
        proj = 2 * d * (n + 1) * d + 2 * d * d
        short = 2 * (n + 1) * d * self.opts.short_filter
        long = n * (long_conv_flops(seq_len, d) + 3 * d)  # conv, skip, gate
        return proj + short + long + self.filter.flops()
