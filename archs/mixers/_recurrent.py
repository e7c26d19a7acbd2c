"""What the linear-attention mixers (retention, gla, linear_attention, based, deltanet, gated_deltanet) share:
flash-linear-attention-compatible short convolutions and head norms, activations by fla's names, the
decoding cache, and a base class that picks the backend and carries state from prefill to one-token steps.

Parameter names follow fla's modules (``ShortConvolution`` is an ``nn.Conv1d`` holding ``weight: (D, 1, K)``
and ``bias``; a head norm holds ``weight``), so state dicts move between fla's layers and ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archs.mixers.base import Mixer, MixerCache, dtype_bytes
from archs.ops.causal_conv import causal_conv1d

__all__ = ["ACTIVATIONS", "HeadRMSNorm", "RecurrentCache", "RecurrentMixer", "ShortConvolution", "check_choice",
           "check_kv_heads", "check_positive", "elu_p1", "l2_norm", "split_heads", "whole_dim"]

#: fla's activation names (``ACT2FN``) and their torch forms
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "logsigmoid": F.logsigmoid,
    "silu": F.silu,
    "swish": F.silu,
    "sqrelu": lambda x: F.relu(x).square(),
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
}

IMPLS = ("auto", "chunked", "reference")


def elu_p1(x: Tensor) -> Tensor:
    """fla's ``elu_p1``: ``elu(x) + 1``, a positive feature map."""
    return F.elu(x) + 1


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_positive(opts: Any, *names: str) -> None:
    for name in names:
        value = getattr(opts, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_kv_heads(opts: Any) -> None:
    """``num_kv_heads`` (None: one per head) must divide ``num_heads``."""
    if opts.num_kv_heads is not None:
        check_positive(opts, "num_kv_heads")
        if opts.num_heads % opts.num_kv_heads:
            raise ValueError(f"num_kv_heads={opts.num_kv_heads} must divide num_heads={opts.num_heads}")


def l2_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """fla's ``l2norm``: ``x / sqrt(Σ x² + eps)`` over the last dimension (in fp32, returned in x.dtype)."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return (xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


def split_heads(x: Tensor, head_dim: int) -> Tensor:
    """``(B, T, H * d) -> (B, T, H, d)``."""
    return x.unflatten(-1, (-1, head_dim))


def whole_dim(what: str, value: float) -> int:
    """``round(value)``, which must be (close to) an integer: a width from ``d_model * expand``."""
    rounded = round(value)
    if not math.isclose(value, rounded) or rounded <= 0:
        raise ValueError(f"{what} = {value} must be a positive integer")
    return rounded


class ShortConvolution(nn.Conv1d):
    """Causal depthwise convolution over ``(B, T, D)`` with an optional SiLU (fla's ``ShortConvolution``)."""

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False, activation: str | None = "silu"):
        super().__init__(hidden_size, hidden_size, kernel_size, groups=hidden_size, padding=kernel_size - 1,
                         bias=bias)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D) -> (B, T, D)
        return causal_conv1d(x, self.weight[:, 0], self.bias, silu=self.activation is not None)

    def step(self, x: Tensor, state: Tensor) -> Tensor:
        """The outputs for ``x: (B, T, D)`` after the inputs held in ``state: (B, D, K - 1)`` (updated)."""
        k = self.kernel_size[0]
        window = torch.cat([state.to(x.dtype), x.transpose(1, 2)], dim=-1)  # (B, D, K - 1 + T)
        if k > 1:
            state.copy_(window[..., -(k - 1):])
        y = F.conv1d(window, self.weight, self.bias, groups=self.groups).transpose(1, 2)  # (B, T, D)
        return F.silu(y) if self.activation is not None else y


class HeadRMSNorm(nn.Module):
    """RMSNorm over the last (head) dimension in fp32, times ``weight``, optionally times ``act(gate)``: fla's
    ``RMSNorm`` (no gate) and ``FusedRMSNormGated`` (``activation``: swish/silu or sigmoid)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, elementwise_affine: bool = True,
                 activation: str | None = None):
        super().__init__()
        self.hidden_size, self.eps, self.activation = hidden_size, eps, activation
        self.weight = nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        ct = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(ct)
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.to(ct)
        if gate is not None:
            y = y * ACTIVATIONS[self.activation or "swish"](gate.to(ct))
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}" + (f", activation={self.activation}" if self.activation else "")


class RecurrentCache(MixerCache):
    """Decoding state: the recurrent state per head ``(B, H, K, V)`` (fp32) and the short convolutions' last
    ``K - 1`` inputs, by name."""

    def __init__(self, state: Tensor, convs: dict[str, Tensor]):
        self.state = state
        self.convs = convs
        self.length = 0

    def tensors(self) -> list[Tensor]:
        return [self.state, *self.convs.values()]


class RecurrentMixer(Mixer):
    """Base of the linear-attention mixers: backends ``chunked`` and ``reference``, a `RecurrentCache`, and
    ``forward``/``step`` through one ``_mix(x, cache)``.

    A subclass defines ``_mix`` (calling ``self._scan`` for its op), ``_state_shape()`` (``(H, K, V)`` of the
    recurrent state) and ``flops_per_token``; the helpers below build and run what fla's layers share (their
    width arithmetic, the q/k/v short convolutions, the per-head output norm and gate).
    """

    _conv_channels: dict[str, int] = {}

    # what fla's layers share -------------------------------------------------------------------------
    def _set_widths(self, expand_k: float, expand_v: float, num_heads: int, num_kv_heads: int | None = None) -> None:
        """fla's widths: ``key_dim = d_model * expand_k`` and ``value_dim = d_model * expand_v`` split over
        ``num_heads``; keys and values over ``num_kv_heads``, each shared by ``num_kv_groups`` heads."""
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.num_kv_groups = num_heads // self.num_kv_heads
        self.key_dim = whole_dim("d_model * expand_k", self.d_model * expand_k)
        self.value_dim = whole_dim("d_model * expand_v", self.d_model * expand_v)
        for what, dim in (("key", self.key_dim), ("value", self.value_dim)):
            if dim % num_heads:
                raise ValueError(f"the {what} width {dim} (d_model * expand_{what[0]}) must be divisible by "
                                 f"num_heads={num_heads}")
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads
        self.kv_key_dim = self.key_dim // self.num_kv_groups
        self.kv_value_dim = self.value_dim // self.num_kv_groups

    def _kv_heads(self, x: Tensor, head_dim: int) -> Tensor:
        """``(B, T, H_kv * d) -> (B, T, H, d)``: key/value head ``i`` serves heads ``i * groups ...``."""
        x = split_heads(x, head_dim)
        return x.repeat_interleave(self.num_kv_groups, dim=2) if self.num_kv_groups > 1 else x

    def _add_short_convs(self, q_dim: int, k_dim: int, v_dim: int, size: int, bias: bool,
                         qk_activation: str | None = "silu") -> None:
        """fla's ``q_conv1d``, ``k_conv1d``, ``v_conv1d`` (v's always with SiLU)."""
        self.q_conv1d = ShortConvolution(q_dim, size, bias=bias, activation=qk_activation)
        self.k_conv1d = ShortConvolution(k_dim, size, bias=bias, activation=qk_activation)
        self.v_conv1d = ShortConvolution(v_dim, size, bias=bias)
        self._conv_channels = {"q_conv1d": q_dim, "k_conv1d": k_dim, "v_conv1d": v_dim}

    def _short_convs(self, q: Tensor, k: Tensor, v: Tensor, cache: RecurrentCache | None) -> tuple[Tensor, ...]:
        return tuple(self._conv(name, t, cache) for name, t in zip(self._conv_channels, (q, k, v), strict=True))

    def _add_output_norm(self, use_output_gate: bool, gate_fn: str, fuse_norm: bool, eps: float,
                         elementwise_affine: bool) -> None:
        """fla's per-head output norm: ``g_norm_swish_gate`` (RMSNorm times swish of the gate) when the gate is
        swish and fused, else ``g_norm`` (then times ``gate_fn`` of the gate, if any)."""
        self.fuse_norm_and_gate = gate_fn == "swish" and fuse_norm and use_output_gate
        norm = HeadRMSNorm(self.head_v_dim, eps, elementwise_affine,
                           activation="swish" if self.fuse_norm_and_gate else None)
        if self.fuse_norm_and_gate:
            self.g_norm_swish_gate = norm
        else:
            self.g_norm = norm

    def _gated_output(self, y: Tensor, x: Tensor, use_output_gate: bool, gate_fn: str) -> Tensor:
        """Per-head norm and output gate of ``y: (B, T, H, d_v)``, flattened to ``(B, T, H * d_v)``."""
        if not use_output_gate:
            return self.g_norm(y).flatten(-2)
        g = self.g_proj(x)
        if self.fuse_norm_and_gate:
            return self.g_norm_swish_gate(y, split_heads(g, self.head_v_dim)).flatten(-2)
        return self.g_norm(y).flatten(-2) * ACTIVATIONS[gate_fn](g)

    def _projection_flops(self) -> int:
        """Forward FLOPs per token of every ``nn.Linear`` and short convolution in the layer."""
        proj = sum(2 * m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear))
        return proj + sum(2 * m.weight.numel() for m in self.modules() if isinstance(m, ShortConvolution))

    def _recurrence_flops(self, seq_len: int, h: int, dk: int, dv: int) -> int:
        """`_projection_flops`, and a chunked linear recurrence over ``h`` heads of ``dk × dv`` (``q kᵀ``,
        scores · v, the state in and out; chunk ``min(chunk_size, seq_len)``, counted dense)."""
        c = max(1, min(self.opts.chunk_size, seq_len))
        return int(self._projection_flops() + h * (2 * c * dk + 2 * c * dv + 2 * dk * dv * 2))

    @classmethod
    def available_backends(cls) -> dict[str, str]:
        return {"chunked": "yes", "reference": "yes"}

    def _backend(self) -> str:
        return "reference" if self.opts.impl == "reference" else "chunked"

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D) -> (B, T, D)
        self._ran(self._backend())
        return self._mix(x, None)

    def _mix(self, x: Tensor, cache: RecurrentCache | None) -> Tensor:
        raise NotImplementedError

    def _scan(self, chunked: Callable[..., tuple[Tensor, Tensor | None]],
              reference: Callable[..., tuple[Tensor, Tensor | None]], cache: RecurrentCache | None,
              *args: Any, **kwargs: Any) -> Tensor:
        """Run the op (chunked or reference) from the cache's state, updating it; or from zero. A single
        decoding step runs the reference: the recurrence itself."""
        single = cache is not None and args[0].shape[1] == 1
        if self._backend() == "reference" or single:
            fn = reference
        else:
            fn, kwargs = chunked, {**kwargs, "chunk_size": self.opts.chunk_size}
        if cache is None:
            return fn(*args, **kwargs)[0]
        o, final = fn(*args, initial_state=cache.state, output_final_state=True, **kwargs)
        cache.state.copy_(final)
        return o

    def _conv(self, name: str, x: Tensor, cache: RecurrentCache | None) -> Tensor:
        conv: ShortConvolution = getattr(self, name)
        return conv(x) if cache is None else conv.step(x, cache.convs[name])

    # decoding ------------------------------------------------------------------------------------------
    def _state_shape(self) -> tuple[int, int, int]:
        raise NotImplementedError

    def _conv_dims(self) -> dict[str, int]:
        return dict(self._conv_channels)

    def _conv_size(self) -> int:
        return getattr(self.opts, "conv_size", 1)

    def init_cache(self, batch_size: int, max_len: int, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> RecurrentCache:
        device = device if device is not None else next(self.parameters()).device
        dtype = self._dtype(dtype)
        state = torch.zeros(batch_size, *self._state_shape(), device=device,
                            dtype=torch.promote_types(dtype, torch.float32))
        convs = {name: torch.zeros(batch_size, dim, self._conv_size() - 1, device=device, dtype=dtype)
                 for name, dim in self._conv_dims().items()}
        return RecurrentCache(state, convs)

    def step(self, x: Tensor, cache: MixerCache) -> Tensor:
        self._check_cache(cache, RecurrentCache, x)
        self._ran(self._backend())  # one-token steps are the recurrence itself, the same maths
        y = self._mix(x, cache)
        cache.length += x.shape[1]
        return y

    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype: torch.dtype | None = None) -> int:
        dtype = self._dtype(dtype)
        h, k, v = self._state_shape()
        state = batch_size * h * k * v * dtype_bytes(torch.promote_types(dtype, torch.float32))
        convs = sum(batch_size * d * (self._conv_size() - 1) for d in self._conv_dims().values())
        return state + convs * dtype_bytes(dtype)
