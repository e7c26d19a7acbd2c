"""Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces"): the Mamba-1
block with its selective state-space model (S6), parameter for parameter like ``mamba_ssm.Mamba``.

``x, z = in_proj(u)``; ``x = silu(causal_depthwise_conv(x))``; ``dt, B, C = x_proj(x)``;
``delta = softplus(dt_proj(dt))``; per channel ``e`` and state ``n``
``h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t``, ``y_t = <h_t, C_t> + D x_t``; ``out = out_proj(y * silu(z))``.

The state is O(1) in the sequence length: decoding keeps the last ``d_conv`` inputs of the convolution and
the ``(E, N)`` SSM state per sequence. Parameter names, shapes, dtypes and initialisation are mamba-ssm's, so
a ``state_dict`` moves between the two with ``strict=True``.

Backends (option ``scan``):
- ``chunked``: the pure-PyTorch chunked scan with a hand-written backward (`archs.ops.selective_scan`);
- ``reference``: the plain sequential scan (the oracle);
- ``cuda``: mamba-ssm's ``selective_scan_fn`` (and ``causal_conv1d_fn`` when installed) — input on CUDA and
  mamba-ssm importable;
- ``auto``: ``cuda`` where it can run, else ``chunked``. The backend that ran is kept in ``self.backend``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archs.mixers.base import Mixer, MixerCache, cuda_kernel_status, dtype_bytes
from archs.ops.causal_conv import causal_conv1d
from archs.ops.selective_scan import (
    DEFAULT_CHUNK_SIZE,
    selective_scan_chunked,
    selective_scan_reference,
    selective_scan_step,
)
from registry import register_mixer

__all__ = ["Mamba", "MambaCache", "MambaOptions"]


@dataclass(frozen=True)
class MambaOptions:
    d_state: int = 16  # N
    d_conv: int = 4
    expand: float = 2  # E = int(expand * d_model)
    dt_rank: int | str = "auto"  # "auto": ceil(d_model / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init: str = "random"  # "random" | "constant"
    dt_scale: float = 1.0
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False
    scan: str = "auto"  # "auto" | "chunked" | "reference" | "cuda"
    chunk_size: int = DEFAULT_CHUNK_SIZE  # time steps per chunk of the "chunked" scan

    SCANS = ("auto", "chunked", "reference", "cuda")
    DT_INITS = ("random", "constant")

    def __post_init__(self) -> None:
        for name in ("d_state", "d_conv", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.expand, (int, float)) or self.expand <= 0:
            raise ValueError(f"expand must be a positive number, got {self.expand!r}")
        if self.dt_rank != "auto" and (not isinstance(self.dt_rank, int) or isinstance(self.dt_rank, bool)
                                       or self.dt_rank <= 0):
            raise ValueError(f"dt_rank must be 'auto' or a positive int, got {self.dt_rank!r}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")
        if self.dt_init_floor < 0:
            raise ValueError(f"dt_init_floor must be >= 0, got {self.dt_init_floor}")
        if self.dt_init not in self.DT_INITS:
            raise ValueError(f"dt_init must be one of {self.DT_INITS}, got {self.dt_init!r}")
        if self.scan not in self.SCANS:
            raise ValueError(f"scan must be one of {self.SCANS}, got {self.scan!r}")


class MambaCache(MixerCache):
    """Decoding state: the last ``d_conv`` inputs of the convolution and the SSM state."""

    def __init__(self, batch_size: int, d_inner: int, d_conv: int, d_state: int, device: torch.device | None,
                 dtype: torch.dtype):
        self.conv_state = torch.zeros(batch_size, d_inner, d_conv, device=device, dtype=dtype)  # (B, E, K)
        self.ssm_state = torch.zeros(batch_size, d_inner, d_state, device=device, dtype=torch.float32)  # (B, E, N)
        self.length = 0


@functools.cache
def _cuda_kernels() -> tuple[object | None, object | None, str]:
    """(selective_scan_fn, causal_conv1d_fn or None, "") from mamba-ssm, or (None, None, why not)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: PLC0415 — optional
    except Exception as exc:  # ImportError, or the CUDA extension failing to load
        return None, None, f"mamba_ssm does not import: {type(exc).__name__}: {exc}".splitlines()[0]
    try:
        from causal_conv1d import causal_conv1d_fn  # noqa: PLC0415 — optional
    except Exception:
        causal_conv1d_fn = None
    return selective_scan_fn, causal_conv1d_fn, ""


@register_mixer("mamba")
class Mamba(Mixer):
    """Mamba-1 block (selective SSM, S6), mamba-ssm compatible; chunked CPU scan or mamba-ssm CUDA kernels."""

    Options = MambaOptions

    def __init__(self, d_model: int, layer_idx: int = 0, **options):
        super().__init__(d_model, layer_idx)
        self.opts = opts = self.Options(**options)
        self.d_state = opts.d_state
        self.d_conv = opts.d_conv
        self.d_inner = int(opts.expand * d_model)
        if self.d_inner <= 0:
            raise ValueError(f"expand={opts.expand} gives d_inner={self.d_inner} for d_model={d_model}")
        self.dt_rank = math.ceil(d_model / 16) if opts.dt_rank == "auto" else opts.dt_rank
        e, n, r = self.d_inner, self.d_state, self.dt_rank
        # built in mamba-ssm's order, so that one seed gives the same weights in both
        self.in_proj = nn.Linear(d_model, 2 * e, bias=opts.bias)
        self.conv1d = nn.Conv1d(e, e, kernel_size=opts.d_conv, groups=e, padding=opts.d_conv - 1,
                                bias=opts.conv_bias)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, e, bias=True)
        self.A_log = nn.Parameter(torch.empty(e, n, dtype=torch.float32))  # fp32, like mamba-ssm
        self.D = nn.Parameter(torch.empty(e, dtype=torch.float32))
        self._init_ssm()
        self.out_proj = nn.Linear(e, d_model, bias=opts.bias)

    def reset_parameters(self) -> None:
        """mamba-ssm's initialisation, drawing random numbers in its order (linear layers and the
        convolution keep torch's defaults)."""
        for mod in (self.in_proj, self.conv1d, self.x_proj, self.dt_proj):
            mod.reset_parameters()
        self._init_ssm()
        self.out_proj.reset_parameters()

    def _init_ssm(self) -> None:
        """dt_proj (weight and bias), A_log and D, as mamba-ssm initialises them."""
        opts = self.opts
        std = self.dt_rank**-0.5 * opts.dt_scale
        with torch.no_grad():
            if opts.dt_init == "constant":
                nn.init.constant_(self.dt_proj.weight, std)
            else:
                nn.init.uniform_(self.dt_proj.weight, -std, std)
            # dt_proj.bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max], at least dt_init_floor
            log_min, log_max = math.log(opts.dt_min), math.log(opts.dt_max)
            dt = torch.exp(torch.rand(self.d_inner) * (log_max - log_min) + log_min).clamp(min=opts.dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            # S4D-real: A = -(1, 2, ..., N) in every channel
            self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand(self.d_inner, -1))
            self.D.fill_(1.0)
        self.dt_proj.bias._no_reinit = True  # type: ignore[attr-defined]
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D._no_weight_decay = True  # type: ignore[attr-defined]

    # backends ------------------------------------------------------------------------------------------
    @classmethod
    def available_backends(cls) -> dict[str, str]:
        scan_fn, _, why = _cuda_kernels()
        cuda = cuda_kernel_status(scan_fn is not None, why, "mamba_ssm")
        return {"chunked": "yes", "reference": "yes", "cuda": cuda}

    def _pick_backend(self, x: Tensor) -> tuple[str, str]:
        """The backend for input ``x`` and, when it is not the one asked for, why."""
        scan = self.opts.scan
        if scan not in ("auto", "cuda"):
            return scan, ""
        if not x.is_cuda:
            if scan == "cuda":
                raise RuntimeError(f"scan='cuda' needs the input on a CUDA device (got {x.device}); "
                                   f"use scan='auto' or 'chunked' on CPU")
            return "chunked", f"mamba-ssm's kernels need CUDA; input on {x.device}"
        scan_fn, _, why = _cuda_kernels()
        if scan_fn is not None and self.d_state <= 256:
            return "cuda", ""
        why = why or f"mamba-ssm's kernels need d_state <= 256, got {self.d_state}"
        if scan == "cuda":
            raise RuntimeError(f"scan='cuda' was asked for, but {why}; use scan='auto'")
        return "chunked", why

    def _dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        return dtype if dtype is not None else self.in_proj.weight.dtype

    # forward -------------------------------------------------------------------------------------------
    def _in_proj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x, z = in_proj(x)`` as two products, so the backward pass never concatenates their gradients."""
        w, b, e = self.in_proj.weight, self.in_proj.bias, self.d_inner
        return (F.linear(x, w[:e], b[:e] if b is not None else None),
                F.linear(x, w[e:], b[e:] if b is not None else None))

    def _ssm_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """From the convolved ``x: (B, T, E)``: ``delta`` (before bias and softplus) ``(B, T, E)``,
        ``B, C: (B, T, N)`` and ``A = -exp(A_log)`` (fp32)."""
        n, r = self.d_state, self.dt_rank
        x_dbl = self.x_proj(x)  # (B, T, R + 2N)
        dt, b, c = x_dbl.split([r, n, n], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight)  # (B, T, E); the bias is added inside the scan, in fp32
        return delta, b, c, -torch.exp(self.A_log.float())

    def _scan(self, backend: str, x: Tensor, delta: Tensor, A: Tensor, b: Tensor, c: Tensor, z: Tensor,
              initial_state: Tensor | None = None, return_last_state: bool = False):
        """The selective scan on ``(B, T, ·)`` tensors; returns ``y: (B, T, E)`` (and the last state)."""
        args = (x.transpose(1, 2), delta.transpose(1, 2), A, b.transpose(1, 2), c.transpose(1, 2),
                self.D.float(), z.transpose(1, 2), self.dt_proj.bias.float())
        if backend == "reference":
            res = selective_scan_reference(*args, delta_softplus=True, initial_state=initial_state,
                                           return_last_state=return_last_state)
        else:
            res = selective_scan_chunked(*args, delta_softplus=True, chunk_size=self.opts.chunk_size,
                                         initial_state=initial_state, return_last_state=return_last_state)
        if return_last_state:
            return res[0].transpose(1, 2), res[1]
        return res.transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D) -> (B, T, D)
        backend, why = self._pick_backend(x)
        self._ran(backend, why)
        if backend == "cuda":
            return self._forward_cuda(x)
        xc, z = self._in_proj(x)  # (B, T, E) each
        xc = causal_conv1d(xc, self.conv1d.weight[:, 0], self.conv1d.bias, silu=True)  # (B, T, E)
        delta, b, c, A = self._ssm_inputs(xc)
        y = self._scan(backend, xc, delta, A, b, c, z)  # (B, T, E)
        return self.out_proj(y)

    def _forward_cuda(self, x: Tensor) -> Tensor:
        scan_fn, conv_fn, _ = _cuda_kernels()
        t = x.shape[1]
        xc, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # (B, E, T) each
        if conv_fn is not None:
            xc = conv_fn(xc, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        else:
            xc = F.silu(self.conv1d(xc)[..., :t])
        delta, b, c, A = self._ssm_inputs(xc.transpose(1, 2))
        y = scan_fn(xc.contiguous(), delta.transpose(1, 2).contiguous(), A, b.transpose(1, 2).contiguous(),
                    c.transpose(1, 2).contiguous(), self.D.float(), z=z.contiguous(),
                    delta_bias=self.dt_proj.bias.float(), delta_softplus=True)  # (B, E, T)
        return self.out_proj(y.transpose(1, 2))

    # decoding ------------------------------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_len: int, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> MambaCache:
        if device is None:
            device = self.in_proj.weight.device
        return MambaCache(batch_size, self.d_inner, self.d_conv, self.d_state, device, self._dtype(dtype))

    def step(self, x: Tensor, cache: MixerCache) -> Tensor:
        """Consume ``x: (B, T, D)`` (a prefill or one token), updating ``cache`` in place."""
        self._check_cache(cache, MambaCache, x)
        bsz, t, _ = x.shape
        k = self.d_conv
        xc, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T, E)
        window = torch.cat([cache.conv_state, xc.transpose(1, 2).to(cache.conv_state.dtype)], dim=2)  # (B, E, K+T)
        cache.conv_state.copy_(window[:, :, -k:])
        w = self.conv1d.weight
        xc = F.conv1d(window[:, :, 1:].to(w.dtype), w, self.conv1d.bias, groups=self.d_inner)  # (B, E, T)
        xc = F.silu(xc).transpose(1, 2)  # (B, T, E)
        delta, b, c, A = self._ssm_inputs(xc)
        backend = "reference" if self.opts.scan == "reference" else "chunked"
        self._ran(backend, "" if backend == self.opts.scan else "decoding runs the PyTorch scan")
        if t == 1:
            y = selective_scan_step(cache.ssm_state, xc[:, 0], delta[:, 0], A, b[:, 0], c[:, 0], self.D.float(),
                                    z[:, 0], self.dt_proj.bias.float())[:, None]  # (B, 1, E)
        else:
            y, last = self._scan(backend, xc, delta, A, b, c, z, initial_state=cache.ssm_state,
                                 return_last_state=True)
            cache.ssm_state.copy_(last)
        cache.length += t
        return self.out_proj(y)

    # costs ---------------------------------------------------------------------------------------------
    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype: torch.dtype | None = None) -> int:
        """Constant in ``seq_len``: ``conv_state (B, E, d_conv)`` in ``dtype`` + ``ssm_state (B, E, N)`` fp32."""
        e = self.d_inner
        return batch_size * e * (self.d_conv * dtype_bytes(self._dtype(dtype)) + self.d_state * 4)

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token (a multiply-add is 2; exp, softplus, silu count 1); constant in length."""
        d, e, n, r, k = self.d_model, self.d_inner, self.d_state, self.dt_rank, self.d_conv
        proj = 2 * d * 2 * e + 2 * e * (r + 2 * n) + 2 * r * e + 2 * e * d
        conv = 2 * e * k + e  # depthwise taps, silu
        # per (e, n): delta*A, exp, (delta*x)*B, h = dA*h + dBx (2), <h, C> (2); per e: bias, softplus,
        # delta*x, D*x + y (2), silu(z), gate
        scan = 7 * e * n + 7 * e
        return proj + conv + scan
