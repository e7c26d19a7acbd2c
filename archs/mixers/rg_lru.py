"""Hawk's recurrent block with the Real-Gated Linear Recurrent Unit (De et al. 2024, "Griffin: Mixing Gated
Linear Recurrences with Local Attention for Efficient Language Models").

Two branches of width ``W`` (``lru_width``, default round(4/3 · d_model) as in the paper, a multiple of
``num_heads``): ``y = GeLU(linear_y(x))`` and ``u = conv1d(linear_x(x))`` (causal, depthwise, width
``conv_width`` = 4, with bias), then the RG-LRU over ``u``:

    r_t = σ(W_a u_t + b_a),   i_t = σ(W_x u_t + b_x)            (block-diagonal W: num_heads blocks)
    log a_t = c · r_t · log σ(Λ)                                 (c = 8; a_t = σ(Λ)^{c r_t})
    h_t = a_t ⊙ h_{t-1} + sqrt(1 − a_t²) ⊙ (i_t ⊙ u_t)

and ``out = linear_out(y ⊙ h)``. ``Λ`` is initialised so that ``a = σ(Λ)`` has ``a²`` uniform in
[0.9², 0.999²] (a in [0.9, 0.999]); ``sqrt(1 − a_t²)`` is computed as ``sqrt(−expm1(2 log a_t))``, exact as
a_t → 1. GeLU is the tanh approximation. Sequences are not reset inside a batch row (no document
boundaries here).

Training runs the chunked parallel scan of `archs.ops.diagonal_recurrence` (option ``scan="chunked"``, the
default) or its loop (``"reference"``); decoding keeps the last ``conv_width − 1`` conv inputs and the
state ``h`` (fp32): O(1) in the context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archs.mixers.base import Mixer, MixerCache, dtype_bytes
from archs.ops.causal_conv import causal_conv1d
from archs.ops.diagonal_recurrence import (
    DEFAULT_CHUNK_SIZE,
    diagonal_recurrence,
    diagonal_recurrence_reference,
    diagonal_recurrence_step,
    recurrence_grads,
    recurrence_states,
)
from registry import register_mixer

__all__ = ["RGLRU", "RGLRUCache", "RGLRUOptions"]


class _RGLRU(torch.autograd.Function):
    """The RG-LRU from its gate logits to its states, fused: forward ``r, i = σ(·)``, ``log a = −c r
    softplus(−Λ)``, ``b = sqrt(1 − a²) ⊙ i ⊙ u``, ``h`` by the chunked scan; it saves ``r, i, u, h`` alone
    and its backward recomputes ``a`` and ``sqrt(1 − a²)`` — the same derivatives autograd takes through
    `RGLRU._lru_inputs` (the reference), in about half the passes and saved memory. Computed in fp32
    (fp64 for fp64 inputs)."""

    @staticmethod
    def forward(ctx: Any, r_logit: Tensor, i_logit: Tensor, u: Tensor, lam: Tensor, c: float, chunk: int) -> Tensor:
        ct = torch.promote_types(u.dtype, torch.float32)
        neg_c_sp = F.softplus(-lam.to(ct)).mul_(-c)  # (W,): c · log σ(Λ)
        r, i, uf = torch.sigmoid(r_logit.to(ct)), torch.sigmoid(i_logit.to(ct)), u.to(ct)
        log_a = r * neg_c_sp
        a = torch.exp(log_a)
        b = torch.expm1(log_a.mul_(2)).neg_().sqrt_().mul_(i).mul_(uf)
        h = recurrence_states(a, b, chunk_size=chunk)
        ctx.save_for_backward(r, i, uf, h, lam)
        ctx.c, ctx.chunk, ctx.dtypes = c, chunk, (r_logit.dtype, i_logit.dtype, u.dtype)
        return h

    @staticmethod
    def backward(ctx: Any, dh: Tensor) -> tuple[Tensor | None, ...]:
        r, i, uf, h, lam = ctx.saved_tensors
        neg_c_sp = F.softplus(-lam.to(r.dtype)).mul_(-ctx.c)
        log_a = r * neg_c_sp
        a = torch.exp(log_a)
        m = torch.expm1(log_a.mul_(2)).neg_().sqrt_()  # sqrt(1 - a²)
        da, db, _ = recurrence_grads(a, h, dh.to(r.dtype), chunk_size=ctx.chunk)
        di = db * m
        du = di * i
        di.mul_(uf)
        # d log a = da · a + d m · (−a² / m), with d m = db ⊙ i ⊙ u
        dlog_a = da.mul_(a).sub_(db.mul_(i).mul_(uf).mul_(a.square_()).div_(m))
        d_lam = (dlog_a * r).sum((0, 1)).mul_(-ctx.c).mul_(-torch.sigmoid(-lam.to(r.dtype)))
        dr_logit = dlog_a.mul_(neg_c_sp).mul_(r).mul_(1 - r)
        di_logit = di.mul_(i).mul_(1 - i)
        dt = ctx.dtypes
        return dr_logit.to(dt[0]), di_logit.to(dt[1]), du.to(dt[2]), d_lam.to(lam.dtype), None, None


@dataclass(frozen=True)
class RGLRUOptions:
    lru_width: int | None = None  # W; None: round(4/3 * d_model) to a multiple of num_heads
    num_heads: int = 1  # blocks of the block-diagonal gate weights
    conv_width: int = 4
    c: float = 8.0
    min_rad: float = 0.9  # a = sigmoid(Lambda) at initialisation: a^2 uniform in [min_rad^2, max_rad^2]
    max_rad: float = 0.999
    scan: str = "auto"  # "auto" (= "chunked") | "chunked" | "reference"
    chunk_size: int = DEFAULT_CHUNK_SIZE

    SCANS = ("auto", "chunked", "reference")

    def __post_init__(self) -> None:
        for name in ("num_heads", "conv_width", "chunk_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.lru_width is not None and (not isinstance(self.lru_width, int) or self.lru_width <= 0
                                           or self.lru_width % self.num_heads):
            raise ValueError(f"lru_width must be a positive multiple of num_heads={self.num_heads}, "
                             f"got {self.lru_width!r}")
        if not self.c > 0:
            raise ValueError(f"c must be positive, got {self.c}")
        if not 0 < self.min_rad <= self.max_rad < 1:
            raise ValueError(f"need 0 < min_rad <= max_rad < 1, got {self.min_rad}, {self.max_rad}")
        if self.scan not in self.SCANS:
            raise ValueError(f"scan must be one of {self.SCANS}, got {self.scan!r}")


class RGLRUCache(MixerCache):
    """Decoding state: the last ``conv_width - 1`` inputs of the convolution and the recurrent state."""

    def __init__(self, batch_size: int, width: int, conv_width: int, device: torch.device | None,
                 dtype: torch.dtype):
        self.conv_state = torch.zeros(batch_size, conv_width - 1, width, device=device, dtype=dtype)  # (B, K-1, W)
        self.h = torch.zeros(batch_size, width, device=device, dtype=torch.float32)  # (B, W)
        self.length = 0


@register_mixer("rg_lru")
class RGLRU(Mixer):
    """Hawk's recurrent block: GeLU branch ⊙ RG-LRU (real-gated diagonal recurrence) over a width-4 conv."""

    Options = RGLRUOptions

    def __init__(self, d_model: int, layer_idx: int = 0, **options):
        super().__init__(d_model, layer_idx)
        self.opts = opts = self.Options(**options)
        h = opts.num_heads
        w = opts.lru_width or max(h, h * round(4 * d_model / 3 / h))
        self.width, self.head_dim = w, w // h
        self.linear_y = nn.Linear(d_model, w)
        self.linear_x = nn.Linear(d_model, w)
        self.conv_weight = nn.Parameter(torch.empty(w, opts.conv_width))  # (W, K); tap K-1 is the current input
        self.conv_bias = nn.Parameter(torch.zeros(w))
        self.a_gate_weight = nn.Parameter(torch.empty(h, self.head_dim, self.head_dim))
        self.a_gate_bias = nn.Parameter(torch.zeros(h, self.head_dim))
        self.input_gate_weight = nn.Parameter(torch.empty(h, self.head_dim, self.head_dim))
        self.input_gate_bias = nn.Parameter(torch.zeros(h, self.head_dim))
        self.a_param = nn.Parameter(torch.empty(w))  # Lambda: a = sigmoid(Lambda)
        self.linear_out = nn.Linear(w, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's defaults for the linear layers; the conv taps and gates uniform in ±1/sqrt(fan-in); Λ so
        that a² is uniform in [min_rad², max_rad²]."""
        o = self.opts
        for lin in (self.linear_y, self.linear_x, self.linear_out):
            lin.reset_parameters()
        with torch.no_grad():
            nn.init.uniform_(self.conv_weight, -o.conv_width**-0.5, o.conv_width**-0.5)
            self.conv_bias.zero_()
            for wt, b in ((self.a_gate_weight, self.a_gate_bias), (self.input_gate_weight, self.input_gate_bias)):
                nn.init.uniform_(wt, -self.head_dim**-0.5, self.head_dim**-0.5)
                b.zero_()
            a = torch.empty(self.width).uniform_(o.min_rad**2, o.max_rad**2).sqrt()
            self.a_param.copy_(torch.log(a) - torch.log1p(-a))  # logit(a)
        self.a_param._no_weight_decay = True  # type: ignore[attr-defined]

    @classmethod
    def available_backends(cls) -> dict[str, str]:
        return {"chunked": "yes", "reference": "yes"}

    def _gate_logits(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """``u W_a + b_a`` and ``u W_x + b_x`` (the gates before their sigmoids), block-diagonal, as one
        product (``u: (B, T, W)``)."""
        h, d = self.opts.num_heads, self.head_dim
        w = torch.cat([self.a_gate_weight, self.input_gate_weight], -1).to(u.dtype)  # (H, d, 2d)
        b = torch.cat([self.a_gate_bias, self.input_gate_bias], -1).to(u.dtype)  # (H, 2d)
        if h == 1:
            g = torch.addmm(b[0], u.reshape(-1, d), w[0]).view(*u.shape[:-1], 2 * d)
        else:
            g = torch.einsum("bthi,hij->bthj", u.unflatten(-1, (h, d)), w) + b
        r, i = g.split(d, dim=-1)
        return r.reshape(u.shape), i.reshape(u.shape)

    def _lru_inputs(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """``a_t`` and the normalised, gated input ``sqrt(1 - a_t²) ⊙ i_t ⊙ u_t``, in fp32 (by autograd: the
        reference path and decoding)."""
        uf = u.to(torch.promote_types(u.dtype, torch.float32))
        r, i = (torch.sigmoid(z) for z in self._gate_logits(uf))
        log_a = -self.opts.c * r * F.softplus(-self.a_param.to(uf.dtype))  # c * r * log(sigmoid(Lambda))
        a = torch.exp(log_a)
        return a, torch.sqrt(-torch.expm1(2 * log_a)) * (i * uf)

    def _branches(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return F.gelu(self.linear_y(x), approximate="tanh"), self.linear_x(x)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D)
        backend = "reference" if self.opts.scan == "reference" else "chunked"
        self._ran(backend)
        y, u = self._branches(x)
        u = causal_conv1d(u, self.conv_weight, self.conv_bias, silu=False)
        if backend == "reference":
            h = diagonal_recurrence_reference(*self._lru_inputs(u))
        else:
            uf = u.to(torch.promote_types(u.dtype, torch.float32))
            h = _RGLRU.apply(*self._gate_logits(uf), u, self.a_param, self.opts.c, self.opts.chunk_size)
        return self.linear_out(y * h.to(y.dtype))

    # decoding ------------------------------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_len: int, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> RGLRUCache:
        return RGLRUCache(batch_size, self.width, self.opts.conv_width, device or self.a_param.device,
                          self._dtype(dtype))

    def step(self, x: Tensor, cache: MixerCache) -> Tensor:
        """Consume ``x: (B, T, D)`` (a prefill or one token), updating ``cache`` in place."""
        self._check_cache(cache, RGLRUCache, x)
        t, k = x.shape[1], self.opts.conv_width
        y, u = self._branches(x)
        window = torch.cat([cache.conv_state.to(u.dtype), u], 1)  # (B, K-1+T, W)
        cache.conv_state.copy_(window[:, window.shape[1] - (k - 1):])
        u = causal_conv1d(window, self.conv_weight, self.conv_bias, silu=False)[:, k - 1:]
        a, b = self._lru_inputs(u)
        if t == 1:
            h = diagonal_recurrence_step(cache.h, a[:, 0], b[:, 0])[:, None]
        else:
            h = diagonal_recurrence(a, b, cache.h, chunk_size=self.opts.chunk_size)
        cache.h.copy_(h[:, -1])
        cache.length += t
        self._ran("reference" if self.opts.scan == "reference" else "chunked")
        return self.linear_out(y * h.to(y.dtype))

    # costs ---------------------------------------------------------------------------------------------
    def _dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        return dtype if dtype is not None else self.linear_x.weight.dtype

    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype: torch.dtype | None = None) -> int:
        """Constant in ``seq_len``: ``conv_state (B, K-1, W)`` in ``dtype`` + ``h (B, W)`` fp32."""
        return batch_size * self.width * ((self.opts.conv_width - 1) * dtype_bytes(self._dtype(dtype)) + 4)

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token (a multiply-add is 2; sigmoid, exp, sqrt, gelu count 1); constant in length."""
        d, w, k = self.d_model, self.width, self.opts.conv_width
        proj = 2 * d * w * 2 + 2 * w * d
        conv = 2 * w * k
        gates = 2 * 2 * w * self.head_dim + 2 * 2 * w  # two block-diagonal products (+ bias, sigmoid)
        lru = 12 * w  # softplus, c*r*, exp, expm1, sqrt, i*u, *, a*h + b (2), gelu, y*h
        return proj + conv + gates + lru
