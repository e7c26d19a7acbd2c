"""H3, Hungry Hungry Hippos (Fu, Dao, Saab, Thomas, Rudra & Ré 2023, "Hungry Hungry Hippos: Towards Language
Modeling with State Space Models").

``q, k, v`` are projections of the input; ``k`` passes through a shift SSM (a learned causal filter of
``d_state`` taps, `ShiftSSM`), then ``k ⊙ v`` through a diagonal SSM (S4D-Lin, `DiagonalSSM`), and ``q``
reads the result out; ``out_proj`` mixes the channels. With ``head_dim = d > 1`` (``H = d_model / d``
heads) the product is an outer product per head, the diagonal SSM runs over its ``d²`` channels, and ``q``
contracts it back:

    S[t, h, i, j] = SSM_diag(shift(k)[·, h, i] · v[·, h, j])[t],    y[t, h, j] = Σ_i q[t, h, i] S[t, h, i, j]

(``head_dim = 1`` is the elementwise form ``q ⊙ SSM_diag(shift(k) ⊙ v)``.) Both SSMs train by convolution
(the diagonal one by FFT, `archs.ops.long_conv`) and decode by their recurrences: the shift SSM keeps its
last ``d_state − 1`` inputs, the diagonal SSM its ``(B, H·d², N/2)`` complex64 modes — O(1) in the context.
Zoology counts H3's state as its diagonal SSM's ``d_model · head_dim · d_state`` numbers; ours also counts
the shift SSM's window, which Zoology leaves out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from archs.mixers._ssm import DiagonalSSM, ShiftSSM
from archs.mixers.base import Mixer, MixerCache, dtype_bytes
from registry import register_mixer

__all__ = ["H3", "H3Cache", "H3Options"]


@dataclass(frozen=True)
class H3Options:
    d_state: int = 64  # taps of the shift SSM and N of the diagonal SSM (N/2 complex modes)
    head_dim: int = 1
    dt_min: float = 0.001
    dt_max: float = 0.1
    conv: str = "auto"  # "auto" (= "fft") | "fft" | "reference"

    CONVS = ("auto", "fft", "reference")

    def __post_init__(self) -> None:
        if not isinstance(self.d_state, int) or self.d_state < 2 or self.d_state % 2:
            raise ValueError(f"d_state must be an even int >= 2, got {self.d_state!r}")
        if not isinstance(self.head_dim, int) or self.head_dim < 1:
            raise ValueError(f"head_dim must be a positive int, got {self.head_dim!r}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")
        if self.conv not in self.CONVS:
            raise ValueError(f"conv must be one of {self.CONVS}, got {self.conv!r}")


class H3Cache(MixerCache):
    """Decoding state: the shift SSM's last ``d_state − 1`` inputs and the diagonal SSM's modes."""

    def __init__(self, window: Tensor, modes: Tensor):
        self.window, self.modes = window, modes
        self.length = 0


@register_mixer("h3")
class H3(Mixer):
    """H3: q ⊙ diagSSM(shiftSSM(k) ⊙ v), multi-head; FFT convolutions, recurrent decoding."""

    Options = H3Options

    def __init__(self, d_model: int, layer_idx: int = 0, **options):
        super().__init__(d_model, layer_idx)
        self.opts = opts = self.Options(**options)
        if d_model % opts.head_dim:
            raise ValueError(f"d_model={d_model} must be a multiple of head_dim={opts.head_dim}")
        self.n_heads = d_model // opts.head_dim
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.shift = ShiftSSM(d_model, opts.d_state)
        self.ssm = DiagonalSSM(d_model * opts.head_dim, opts.d_state, init="lin", dt_min=opts.dt_min,
                               dt_max=opts.dt_max, reference=opts.conv == "reference")
        self.out_proj = nn.Linear(d_model, d_model)

    @classmethod
    def available_backends(cls) -> dict[str, str]:
        return {"fft": "yes", "reference": "yes", "recurrent": "yes"}  # recurrent: decoding

    def _kv(self, k: Tensor, v: Tensor) -> Tensor:
        """``(B, T, H·d·d)``: per head the outer product of shifted ``k`` and ``v`` (``k ⊙ v`` for d = 1)."""
        d = self.opts.head_dim
        if d == 1:
            return k * v
        k, v = k.unflatten(-1, (self.n_heads, d)), v.unflatten(-1, (self.n_heads, d))
        return (k[..., :, None] * v[..., None, :]).flatten(2)

    def _read(self, q: Tensor, s: Tensor) -> Tensor:
        d = self.opts.head_dim
        if d == 1:
            return q * s
        s = s.unflatten(-1, (self.n_heads, d, d))
        return torch.einsum("bthi,bthij->bthj", q.unflatten(-1, (self.n_heads, d)), s).flatten(2)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D)
        self._ran("reference" if self.opts.conv == "reference" else "fft")
        q, k, v = self.q_proj(x), self.shift(self.k_proj(x)), self.v_proj(x)
        return self.out_proj(self._read(q, self.ssm(self._kv(k, v))))

    def init_cache(self, batch_size: int, max_len: int, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> H3Cache:
        device = device or self.q_proj.weight.device
        window = torch.zeros(batch_size, self.opts.d_state - 1, self.d_model, device=device, dtype=self._dtype(dtype))
        return H3Cache(window, self.ssm.init_state(batch_size, device))

    def step(self, x: Tensor, cache: MixerCache) -> Tensor:
        """Consume ``x: (B, T, D)`` by the recurrences, updating ``cache`` in place."""
        self._check_cache(cache, H3Cache, x)
        self._ran("recurrent")
        k, window = self.shift.step(self.k_proj(x), cache.window)
        cache.window.copy_(window)
        s = self.ssm.step(self._kv(k, self.v_proj(x)), cache.modes).to(x.dtype)
        cache.length += x.shape[1]
        return self.out_proj(self._read(self.q_proj(x), s))

    def _dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        return dtype if dtype is not None else self.q_proj.weight.dtype

    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype: torch.dtype | None = None) -> int:
        """Constant in ``seq_len``: the shift window ``(B, N−1, D)`` + the diagonal modes ``(B, D·d, N/2)``."""
        window = batch_size * (self.opts.d_state - 1) * self.d_model * dtype_bytes(self._dtype(dtype))
        return window + self.ssm.state_bytes(batch_size)

    def flops_per_token(self, seq_len: int) -> int:
        """Four projections, the shift filter, the outer products, the diagonal SSM and the read-out."""
        d, hd = self.d_model, self.opts.head_dim
        return 4 * 2 * d * d + self.shift.flops() + d * hd + self.ssm.flops(seq_len) + 2 * d * hd
