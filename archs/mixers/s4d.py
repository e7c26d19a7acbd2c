"""S4D (Gu, Gupta, Goel & Ré 2022, "On the Parameterization and Initialization of Diagonal State Space
Models"): a diagonal linear time-invariant SSM per channel, trained as a long convolution.

Per channel (``H = d_model``) an SSM of ``d_state = N`` (N/2 complex modes, each standing for a conjugate
pair; `archs.mixers._ssm.DiagonalSSM`): with the zero-order hold it is the convolution with

    K_l = 2 · Re( Σ_n C_n B_n (exp(ΔA_n) − 1) / A_n · exp(ΔA_n)^l )      (`archs.ops.ssm_kernel`)

so ``y = K * u + D ⊙ u`` (FFT convolution, `archs.ops.long_conv`), then GeLU, then

- ``gate="none"``: ``out = out_proj(GeLU(y))`` — the "S4, no gate" row of the Mamba paper's Table 1;
- ``gate="output"``: ``out = out_proj(GeLU(y) ⊙ SiLU(gate_proj(x)))``, a multiplicative gate from the input.

Initialisation (the paper's): S4D-Lin ``A_n = −1/2 + iπn`` (``init="lin"``) or S4D-Inv
``A_n = −1/2 + i(N/π)(N/(2n+1) − 1)`` (``"inv"``), ``B = 1``, ``C ~ N(0, 1)`` complex,
``log Δ ~ U(log dt_min, log dt_max)``.

Decoding runs the equivalent recurrence (`archs.ops.diagonal_recurrence`, complex): O(1) state, the
``(B, H, N/2)`` complex64 mode states. Zoology's ``state_size()`` counts an SSM layer's state as
``d_model · d_state`` numbers; ours is the same count in bytes of complex64 (N/2 complex = N real numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archs.mixers._ssm import DiagonalSSM
from archs.mixers.base import Mixer, MixerCache
from registry import register_mixer

__all__ = ["S4D", "S4DCache", "S4DOptions"]


@dataclass(frozen=True)
class S4DOptions:
    d_state: int = 64  # N: N/2 complex modes per channel
    init: str = "lin"  # "lin" (S4D-Lin) | "inv" (S4D-Inv)
    dt_min: float = 0.001
    dt_max: float = 0.1
    gate: str = "none"  # "none" | "output"
    conv: str = "auto"  # "auto" (= "fft") | "fft" | "reference" (direct convolution, whole Vandermonde)

    INITS = ("lin", "inv")
    GATES = ("none", "output")
    CONVS = ("auto", "fft", "reference")

    def __post_init__(self) -> None:
        if not isinstance(self.d_state, int) or isinstance(self.d_state, bool) or self.d_state < 2 or self.d_state % 2:
            raise ValueError(f"d_state must be an even int >= 2 (N/2 complex modes), got {self.d_state!r}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")
        for name, allowed in (("init", self.INITS), ("gate", self.GATES), ("conv", self.CONVS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")


class S4DCache(MixerCache):
    """Decoding state: the complex mode states ``(B, H, N/2)``."""

    def __init__(self, h: Tensor):
        self.h = h
        self.length = 0


@register_mixer("s4d")
class S4D(Mixer):
    """S4D: diagonal LTI SSM per channel (S4D-Lin/Inv), FFT convolution; gate none (S4) or a SiLU output gate."""

    Options = S4DOptions

    def __init__(self, d_model: int, layer_idx: int = 0, **options):
        super().__init__(d_model, layer_idx)
        self.opts = opts = self.Options(**options)
        self.ssm = DiagonalSSM(d_model, opts.d_state, init=opts.init, dt_min=opts.dt_min, dt_max=opts.dt_max,
                               reference=opts.conv == "reference")
        self.gate_proj = nn.Linear(d_model, d_model) if opts.gate == "output" else None
        self.out_proj = nn.Linear(d_model, d_model)

    @classmethod
    def available_backends(cls) -> dict[str, str]:
        return {"fft": "yes", "reference": "yes", "recurrent": "yes"}  # recurrent: decoding

    def _out(self, y: Tensor, x: Tensor) -> Tensor:
        y = F.gelu(y)
        if self.gate_proj is not None:
            y = y * F.silu(self.gate_proj(x))
        return self.out_proj(y)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D)
        self._ran("reference" if self.opts.conv == "reference" else "fft")
        return self._out(self.ssm(x), x)

    def init_cache(self, batch_size: int, max_len: int, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> S4DCache:
        return S4DCache(self.ssm.init_state(batch_size, device))

    def step(self, x: Tensor, cache: MixerCache) -> Tensor:
        """Consume ``x: (B, T, D)`` by the recurrence, updating ``cache`` in place."""
        self._check_cache(cache, S4DCache, x)
        self._ran("recurrent")
        y = self.ssm.step(x, cache.h)
        cache.length += x.shape[1]
        return self._out(y.to(x.dtype), x)

    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype: torch.dtype | None = None) -> int:
        """Constant in ``seq_len``: the complex64 mode states ``(B, H, N/2)``."""
        return self.ssm.state_bytes(batch_size)

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token: the SSM (kernel, FFT convolution, skip), GeLU, the gate, the projection."""
        h, gated = self.d_model, self.gate_proj is not None
        return self.ssm.flops(seq_len) + h + 2 * h * h * (2 if gated else 1) + (2 * h if gated else 0)
