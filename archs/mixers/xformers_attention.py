"""Memory-efficient causal attention (Rabe & Staats 2021, "Self-attention Does Not Need O(n^2) Memory";
xformers' ``memory_efficient_attention``), with the same maths and options as `attention`.

Backends, chosen per call by where the input lives:
- ``xformers``: ``xformers.ops.memory_efficient_attention`` — input on CUDA and xformers imports;
- ``sdpa-flash``: torch's fused flash kernel — CPU (or CUDA without xformers), no ALiBi;
- ``chunked``: exact softmax over query chunks with recomputation in the backward pass — with ALiBi, or
  ``cpu_impl="chunked"``.
Every path's memory grows linearly with T, forward and backward. The backend that ran is logged once and
kept in ``self.backend``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from archs.mixers.attention import Attention, AttentionOptions
from archs.mixers.base import cuda_kernel_status
from archs.ops.attention import attention_chunked, attention_sdpa, repeat_kv
from registry import register_mixer

__all__ = ["XFormersAttention", "XFormersAttentionOptions"]


@dataclass(frozen=True)
class XFormersAttentionOptions(AttentionOptions):
    impl: str = "auto"  # "auto" | "xformers" | "sdpa" | "chunked"
    chunk_size: int = 256  # query chunk of the "chunked" path

    IMPLS = ("auto", "xformers", "sdpa", "chunked")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {self.chunk_size}")


@functools.cache
def _xformers_ops():
    """xformers.ops, or the reason it cannot be used."""
    try:
        import xformers.ops as xops  # noqa: PLC0415 — optional, CUDA-only kernels

        return xops, ""
    except Exception as exc:  # ImportError, or a broken extension
        return None, f"xformers does not import: {type(exc).__name__}: {exc}".splitlines()[0]


@register_mixer("xformers_attention")
class XFormersAttention(Attention):
    """Memory-efficient causal attention: xformers kernel on CUDA, linear-memory exact path on CPU."""

    Options = XFormersAttentionOptions

    @classmethod
    def available_backends(cls) -> dict[str, str]:
        xops, why = _xformers_ops()
        xf = cuda_kernel_status(xops is not None, why, "xformers")
        return {"xformers": xf, "sdpa-flash": "yes", "chunked": "yes"}

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        impl = self.opts.impl
        if impl in ("auto", "xformers") and q.is_cuda:
            xops, why = _xformers_ops()
            if xops is not None:
                self._ran("xformers")
                return self._attend_xformers(xops, q, k, v)
            if impl == "xformers":
                raise RuntimeError(f"impl='xformers' was asked for, but {why}; use impl='auto'")
        elif impl == "xformers":
            raise RuntimeError("impl='xformers' needs the input on a CUDA device; use impl='auto' on CPU")
        if impl in ("auto", "sdpa") and self.alibi is None:
            self._ran("sdpa-flash", "" if impl == "sdpa" else f"xformers kernels need CUDA; input on {q.device}")
            return attention_sdpa(q, k, v)
        self._ran("chunked", "" if impl == "chunked" else "ALiBi bias: exact query-chunked path")
        return attention_chunked(q, k, v, alibi=self.alibi, chunk_size=self.opts.chunk_size)

    def _attend_xformers(self, xops, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        tq, tk = q.shape[2], k.shape[2]
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        # xformers' layout is (B, M, H, K)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        fa = xops.fmha.attn_bias
        if self.alibi is not None:
            from archs.ops.attention import causal_mask
            from archs.positions import alibi_bias

            bias = alibi_bias(self.alibi.to(q.dtype), torch.arange(tk - tq, tk, device=q.device),
                              torch.arange(tk, device=q.device))
            bias = bias.masked_fill(~causal_mask(tq, tk, None, q.device), float("-inf"))
            attn_bias = bias.unsqueeze(0).expand(q.shape[0], -1, -1, -1)
        elif tq == 1:
            attn_bias = None
        else:
            attn_bias = fa.LowerTriangularFromBottomRightMask()
        return xops.memory_efficient_attention(q, k, v, attn_bias=attn_bias).transpose(1, 2)
