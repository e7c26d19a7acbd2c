"""Mamba-2 (Dao & Gu 2024, "Transformers are SSMs"): a selective state-space mixer with a scalar decay per head,
computed by the chunked SSD algorithm.

``in_proj`` maps each token to ``[z0, x0, z, xBC, dt]``; a causal depthwise conv then SiLU runs over ``xBC``,
which splits into ``x`` (``H`` heads of ``headdim``) and ``B, C`` (``ngroups`` groups of ``d_state``). Per head
``h``: ``dt = clamp(softplus(dt + dt_bias), dt_limit)``, ``A = -exp(A_log)``,
``state_t = exp(dt_t A) state_{t-1} + dt_t x_t ⊗ B_t``, ``y_t = state_t C_t + D x_t``; then
``y = rmsnorm(y · silu(z)) · norm.weight`` (gated RMSNorm per group), ``silu(z0) · x0`` is prepended when
``d_ssm < d_inner``, and ``out_proj`` maps back to ``d_model``.

Parameter names, shapes, dtypes and initialisation are those of mamba-ssm's ``Mamba2`` module, so state dicts
move between the two with ``strict=True``. Backends: ``chunked`` (`archs.ops.ssd.ssd_chunked`, pure PyTorch),
``reference`` (the per-step recurrence, the oracle) and ``cuda`` (mamba-ssm's Triton
``mamba_chunk_scan_combined``, CUDA inputs only). Decoding keeps a ``(B, conv_dim, d_conv)`` conv state and a
``(B, H, headdim, d_state)`` fp32 SSM state: constant cost per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archs.mixers.base import Mixer, MixerCache, dtype_bytes
from archs.ops.causal_conv import causal_conv1d
from archs.ops.ssd import ssd_chunked, ssd_reference, ssd_step
from registry import register_mixer

__all__ = ["Mamba2", "Mamba2Cache", "Mamba2Options", "gated_rmsnorm"]

#: tokens per piece of the batch that the CPU path runs at a time (results do not depend on it)
CPU_PIECE_TOKENS = 4096
#: longest chunk of the chunked path on CPU (results do not depend on it). For d_state 64, headdim 64, one
#: sample of T=4096, one thread, fwd+bwd of the scan took 78 ms at 64, 80 ms at 128, 94 ms at 32
CPU_CHUNK_SIZE = 64


@dataclass(frozen=True)
class Mamba2Options:
    """mamba-ssm ``Mamba2``'s options and defaults, plus ``impl`` (the backend)."""

    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    d_ssm: int | None = None  # None: = d_inner = expand * d_model; less: the rest is a gated MLP
    ngroups: int = 1
    A_init_range: tuple[float, float] = (1, 16)
    D_has_hdim: bool = False
    rmsnorm: bool = True
    norm_before_gate: bool = False
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    bias: bool = False
    conv_bias: bool = True
    chunk_size: int = 256
    impl: str = "auto"  # "auto" | "reference" | "chunked" | "cuda"

    IMPLS = ("auto", "reference", "chunked", "cuda")

    def __post_init__(self) -> None:
        # tuples arrive as lists from JSON/TOML
        object.__setattr__(self, "A_init_range", tuple(self.A_init_range))
        object.__setattr__(self, "dt_limit", tuple(self.dt_limit))
        for name in ("d_state", "d_conv", "headdim", "ngroups", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.expand, (int, float)) or self.expand <= 0:
            raise ValueError(f"expand must be positive, got {self.expand!r}")
        if self.d_ssm is not None:
            if not isinstance(self.d_ssm, int) or self.d_ssm <= 0:
                raise ValueError(f"d_ssm must be a positive int or None, got {self.d_ssm!r}")
            if self.d_ssm % self.headdim:
                raise ValueError(f"headdim={self.headdim} must divide d_ssm={self.d_ssm}; "
                                 f"headdims that work: {_divisors(self.d_ssm)}")
        if len(self.A_init_range) != 2 or not 0 < self.A_init_range[0] <= self.A_init_range[1]:
            raise ValueError(f"A_init_range must be (lo, hi) with 0 < lo <= hi, got {self.A_init_range}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")
        if self.dt_init_floor < 0:
            raise ValueError(f"dt_init_floor must be >= 0, got {self.dt_init_floor}")
        if len(self.dt_limit) != 2 or not 0 <= self.dt_limit[0] <= self.dt_limit[1]:
            raise ValueError(f"dt_limit must be (lo, hi) with 0 <= lo <= hi, got {self.dt_limit}")
        if self.impl not in self.IMPLS:
            raise ValueError(f"impl must be one of {self.IMPLS}, got {self.impl!r}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def gated_rmsnorm(y: Tensor, z: Tensor | None, weight: Tensor, eps: float, group_size: int,
                  norm_before_gate: bool) -> Tensor:
    """mamba-ssm's gated RMSNorm: ``rmsnorm(y · silu(z)) · weight`` (or ``rmsnorm(y) · weight · silu(z)``),
    normalised over groups of ``group_size`` channels; computed in fp32, returned in ``y.dtype``."""
    dtype, ct = y.dtype, torch.promote_types(y.dtype, torch.float32)
    yf = y.to(ct)
    zf = None if z is None else z.to(ct)
    if zf is not None and not norm_before_gate:
        yf = yf * F.silu(zf)
    groups = yf.unflatten(-1, (-1, group_size))  # (..., G, group_size)
    yf = (groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + eps)).flatten(-2) * weight.to(ct)
    if zf is not None and norm_before_gate:
        yf = yf * F.silu(zf)
    return yf.to(dtype)


class _GatedRMSNormFn(torch.autograd.Function):
    """`gated_rmsnorm` with ``z``, fused by hand: about half the passes over the activations of autograd's
    version, and only ``y``, ``z`` and the per-group scales are kept for the backward pass."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int,
                norm_before_gate: bool) -> Tensor:
        ct = torch.promote_types(y.dtype, torch.float32)
        yf, zf, wf = y.to(ct), z.to(ct), weight.to(ct)
        gate = F.silu(zf)
        h = yf if norm_before_gate else yf * gate  # what is normalised
        hg = h.unflatten(-1, (-1, group_size))  # (..., G, group_size)
        rstd = torch.linalg.vector_norm(hg, dim=-1, keepdim=True).square_().div_(group_size).add_(eps).rsqrt_()
        out = (hg * rstd).flatten(-2).mul_(wf)
        if norm_before_gate:
            out.mul_(gate)
        ctx.save_for_backward(y, z, weight, rstd)
        ctx.group_size, ctx.norm_before_gate = group_size, norm_before_gate
        return out.to(y.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        y, z, weight, rstd = ctx.saved_tensors
        gs, norm_first = ctx.group_size, ctx.norm_before_gate
        ct = torch.promote_types(y.dtype, torch.float32)
        yf, zf, wf, g = y.to(ct), z.to(ct), weight.to(ct), grad.to(ct)
        gate = F.silu(zf)
        h = yf if norm_first else yf * gate
        n = (h.unflatten(-1, (-1, gs)) * rstd).flatten(-2)  # the normalised h, (..., d)
        g_nw = g * gate if norm_first else g  # d out / d (n · w)
        gw = (g_nw * n).sum(tuple(range(n.dim() - 1)))
        gn = (g_nw * wf).unflatten(-1, (-1, gs))  # (..., G, gs)
        ng = n.unflatten(-1, (-1, gs))
        dot = (gn * ng).mean(-1, keepdim=True)  # (..., G, 1)
        gh = gn.sub_(ng * dot).mul_(rstd).flatten(-2)  # d / d h
        if norm_first:
            gy = gh
            gz = torch.ops.aten.silu_backward(g * n * wf, zf)
        else:
            gy = gh * gate
            gz = torch.ops.aten.silu_backward(gh.mul_(yf), zf)
        return gy.to(y.dtype), gz.to(z.dtype), gw.to(weight.dtype), None, None, None


class Mamba2Cache(MixerCache):
    """Decoding state: the last ``d_conv`` pre-conv inputs of ``xBC`` and the SSM state (fp32)."""

    def __init__(self, batch_size: int, conv_dim: int, d_conv: int, nheads: int, headdim: int, d_state: int,
                 device: torch.device | None, dtype: torch.dtype):
        self.conv_state = torch.zeros(batch_size, conv_dim, d_conv, device=device, dtype=dtype)
        self.ssm_state = torch.zeros(batch_size, nheads, headdim, d_state, device=device, dtype=torch.float32)
        self.length = 0


class _RMSNormGated(nn.Module):
    """Holds ``weight`` (the name mamba-ssm's gated RMSNorm uses); the maths is `gated_rmsnorm`."""

    def __init__(self, hidden_size: int, eps: float, group_size: int, norm_before_gate: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate

    def forward(self, y: Tensor, z: Tensor | None = None) -> Tensor:
        if z is None:
            return gated_rmsnorm(y, z, self.weight, self.eps, self.group_size, self.norm_before_gate)
        return _GatedRMSNormFn.apply(y, z, self.weight, self.eps, self.group_size, self.norm_before_gate)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}"


@register_mixer("mamba2")
class Mamba2(Mixer):
    """Mamba-2 (SSD): selective SSM with a scalar decay per head; chunked pure-PyTorch or mamba-ssm Triton."""

    Options = Mamba2Options

    def __init__(self, d_model: int, layer_idx: int = 0, **options: Any):
        super().__init__(d_model, layer_idx)
        self.opts = opts = self.Options(**options)
        d_inner = opts.expand * d_model
        if d_inner != int(d_inner):
            raise ValueError(f"expand * d_model = {opts.expand} * {d_model} must be an integer")
        self.d_inner = d_inner = int(d_inner)
        self.d_ssm = d_ssm = d_inner if opts.d_ssm is None else opts.d_ssm
        if d_ssm > d_inner:
            raise ValueError(f"d_ssm={d_ssm} must be <= d_inner = expand * d_model = {d_inner}")
        if d_ssm % opts.headdim:
            where = ("d_ssm" if opts.d_ssm is not None
                     else f"d_ssm = d_inner = expand * d_model = {opts.expand} * {d_model}")
            raise ValueError(f"headdim={opts.headdim} must divide {where} = {d_ssm}; set headdim to one of "
                             f"{_divisors(d_ssm)} (or change d_model/expand/d_ssm)")
        self.headdim = opts.headdim
        self.nheads = nheads = d_ssm // opts.headdim
        if nheads % opts.ngroups:
            raise ValueError(f"ngroups={opts.ngroups} must divide the number of heads d_ssm / headdim = "
                             f"{d_ssm} / {opts.headdim} = {nheads}; ngroups that work: {_divisors(nheads)}")
        self.ngroups = g = opts.ngroups
        self.d_state = n = opts.d_state
        self.d_conv = opts.d_conv
        self.d_mlp = d_inner - d_ssm
        self.conv_dim = conv_dim = d_ssm + 2 * g * n

        # construction order follows mamba-ssm (in_proj, conv1d, dt_bias, A_log, D, norm, out_proj), so that
        # one seed gives the same parameters there and here
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * g * n + nheads, bias=opts.bias)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, kernel_size=opts.d_conv, groups=conv_dim,
                                padding=opts.d_conv - 1, bias=opts.conv_bias)
        dt = torch.exp(torch.rand(nheads) * (math.log(opts.dt_max) - math.log(opts.dt_min)) + math.log(opts.dt_min))
        dt = torch.clamp(dt, min=opts.dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        A = torch.empty(nheads, dtype=torch.float32).uniform_(*opts.A_init_range)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(d_ssm if opts.D_has_hdim else nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # type: ignore[attr-defined]
        self.norm = (_RMSNormGated(d_ssm, eps=1e-5, group_size=d_ssm // g, norm_before_gate=opts.norm_before_gate)
                     if opts.rmsnorm else None)
        self.out_proj = nn.Linear(d_inner, d_model, bias=opts.bias)

    # backends ------------------------------------------------------------------------------------------
    @classmethod
    def available_backends(cls) -> dict[str, str]:
        return {"chunked": "yes", "reference": "yes", "cuda": _cuda_status()}

    def _backend(self, x: Tensor) -> tuple[str, str]:
        impl = self.opts.impl
        if impl in ("chunked", "reference"):
            return impl, ""
        status = _cuda_status(x.device)
        if impl == "cuda":
            if status != "yes":
                raise RuntimeError(f"mamba2 impl='cuda' cannot run: {status}; use impl='auto' or 'chunked'")
            return "cuda", ""
        if status == "yes":
            return "cuda", ""
        return "chunked", "" if x.device.type != "cuda" else f"cuda backend unavailable: {status}"

    # forward -------------------------------------------------------------------------------------------
    def _split(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        d_mlp, d_ssm = self.d_mlp, self.d_ssm
        z0, x0, z, xbc, dt = zxbcdt.split([d_mlp, d_mlp, d_ssm, self.conv_dim, self.nheads], dim=-1)
        return z0, x0, z, xbc, dt

    def _dt(self, dt: Tensor) -> Tensor:
        """``clamp(softplus(dt + dt_bias), dt_limit)`` in fp32 (fp64 for fp64 inputs)."""
        ct = torch.promote_types(dt.dtype, torch.float32)
        dt = F.softplus(dt.to(ct) + self.dt_bias.to(ct))  # (B, T, H)
        lo, hi = self.opts.dt_limit
        if (lo, hi) != (0.0, float("inf")):
            dt = dt.clamp(min=lo, max=hi)
        return dt

    def _D(self) -> Tensor:
        return self.D.view(self.nheads, self.headdim) if self.opts.D_has_hdim else self.D

    def _ssm_inputs(self, xbc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = xbc.shape
        x, B, C = xbc.split([self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        return (x.view(b, t, self.nheads, self.headdim),  # (B, T, H, P)
                B.view(b, t, self.ngroups, self.d_state),  # (B, T, G, N)
                C.view(b, t, self.ngroups, self.d_state))

    def _finish(self, y: Tensor, z0: Tensor, x0: Tensor, z: Tensor) -> Tensor:
        """Gate/normalise the SSM output ``y: (B, T, d_ssm)``, prepend the MLP part, project out."""
        y = self.norm(y, z) if self.norm is not None else y * F.silu(z)
        if self.d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)  # (B, T, d_inner)
        return self.out_proj(y)  # (B, T, D)

    def forward(self, u: Tensor) -> Tensor:  # (B, T, D) -> (B, T, D)
        backend, why = self._backend(u)
        self._ran(backend, why)
        b, t, _ = u.shape
        if u.device.type == "cpu" and b > 1 and b * t > CPU_PIECE_TOKENS:
            # on CPU, one piece of the batch at a time keeps the activations small enough to stay in the
            # allocator's reusable memory (tensors above 32 MB are fresh pages on every allocation)
            per = max(1, CPU_PIECE_TOKENS // t)
            return torch.cat([self._forward(piece, backend) for piece in u.split(per)], dim=0)
        return self._forward(u, backend)

    def _conv(self, xbc: Tensor) -> Tensor:
        """``silu(causal depthwise conv(xbc))``, ``(B, T, conv_dim)`` in and out."""
        if xbc.device.type == "cpu":
            return causal_conv1d(xbc, self.conv1d.weight[:, 0], self.conv1d.bias, silu=True)
        t = xbc.shape[1]
        return F.silu(self.conv1d(xbc.transpose(1, 2))[..., :t].transpose(1, 2))

    def _forward(self, u: Tensor, backend: str) -> Tensor:
        b, t, _ = u.shape
        z0, x0, z, xbc, dt_raw = self._split(self.in_proj(u))
        x, B, C = self._ssm_inputs(self._conv(xbc))  # (B, T, conv_dim) split
        A = -torch.exp(self.A_log.to(torch.promote_types(u.dtype, torch.float32)))  # (H,)
        if backend == "cuda":
            y = self._cuda_scan(x, dt_raw, A, B, C)
        else:
            dt = self._dt(dt_raw)
            if backend == "reference":
                y = ssd_reference(x, dt, A, B, C, self._D())
            else:
                y = ssd_chunked(x, dt, A, B, C, self._D(), chunk_size=self._chunk(u))
        return self._finish(y.reshape(b, t, self.d_ssm), z0, x0, z)

    def _chunk(self, u: Tensor) -> int:
        return self.opts.chunk_size if u.device.type == "cuda" else min(self.opts.chunk_size, CPU_CHUNK_SIZE)

    def _cuda_scan(self, x: Tensor, dt_raw: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   initial_state: Tensor | None = None) -> Any:
        """mamba-ssm's Triton scan; with ``initial_state``, returns ``(y, final_state)``."""
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        limit = {} if self.opts.dt_limit == (0.0, float("inf")) else {"dt_limit": self.opts.dt_limit}
        if initial_state is not None:
            limit.update(initial_states=initial_state, return_final_states=True)
        return mamba_chunk_scan_combined(x, dt_raw, A, B, C, chunk_size=self.opts.chunk_size, D=self._D(),
                                         z=None, dt_bias=self.dt_bias, dt_softplus=True, **limit)

    # decoding ------------------------------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_len: int, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> Mamba2Cache:
        device = device if device is not None else self.out_proj.weight.device
        return Mamba2Cache(batch_size, self.conv_dim, self.d_conv, self.nheads, self.headdim, self.d_state,
                           device, self._dtype(dtype))

    def step(self, u: Tensor, cache: MixerCache) -> Tensor:
        self._check_cache(cache, Mamba2Cache, u)
        b, t, _ = u.shape
        z0, x0, z, xbc, dt_raw = self._split(self.in_proj(u))
        # causal conv over [the last d_conv inputs, the new ones]; keep the outputs of the new ones
        window = torch.cat([cache.conv_state.to(xbc.dtype), xbc.transpose(1, 2)], dim=-1)  # (B, conv_dim, d_conv+T)
        cache.conv_state.copy_(window[..., -self.d_conv:])
        conv = F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)[..., 1:]
        x, B, C = self._ssm_inputs(F.silu(conv.transpose(1, 2)))  # (B, T, conv_dim) split
        A = -torch.exp(self.A_log.to(torch.promote_types(u.dtype, torch.float32)))
        dt = self._dt(dt_raw)
        if t == 1:  # the recurrence, one step
            y = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], self._D(), cache.ssm_state)[:, None]
        else:  # a prefill: the scan from the cached state
            backend, _ = self._backend(u)
            if backend == "cuda":
                y, final = self._cuda_scan(x, dt_raw, A, B, C, initial_state=cache.ssm_state)
            elif backend == "reference":
                y, final = ssd_reference(x, dt, A, B, C, self._D(), initial_state=cache.ssm_state,
                                         return_final_state=True)
            else:
                y, final = ssd_chunked(x, dt, A, B, C, self._D(), chunk_size=self._chunk(u),
                                       initial_state=cache.ssm_state, return_final_state=True)
            cache.ssm_state.copy_(final)
        cache.length += t
        return self._finish(y.reshape(b, t, self.d_ssm), z0, x0, z)

    # costs ---------------------------------------------------------------------------------------------
    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype: torch.dtype | None = None) -> int:
        conv = batch_size * self.conv_dim * self.d_conv * dtype_bytes(self._dtype(dtype))
        ssm = batch_size * self.nheads * self.headdim * self.d_state * 4
        return conv + ssm

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token of the chunked algorithm (chunk ``min(chunk_size, seq_len)``; the
        within-chunk matmuls counted dense), projections and conv included, small elementwise work not."""
        q = max(1, min(self.opts.chunk_size, seq_len))
        h, p, g, n = self.nheads, self.headdim, self.ngroups, self.d_state
        proj = 2 * self.d_model * self.in_proj.out_features + 2 * self.d_inner * self.d_model
        conv = 2 * self.conv_dim * self.d_conv
        within = 2 * g * q * n + 2 * h * q * p  # C Bᵀ, then (scores ⊙ decay) (dt x)
        across = 2 * h * p * n * 2  # chunk states, and C times the carried state
        return int(proj + conv + within + across)


def _cuda_status(device: torch.device | None = None) -> str:
    """"yes" if mamba-ssm's Triton SSD kernel can run (on ``device``, if given), else why not."""
    if device is not None and device.type != "cuda":
        return f"input is on {device.type}, the Triton kernel needs CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # noqa: F401
    except Exception as exc:  # ImportError, or a broken CUDA/Triton install
        return f"mamba_ssm's Triton kernels do not import ({type(exc).__name__}: {exc})"
    return "yes"
