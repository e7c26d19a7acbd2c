"""Causal sliding-window (local) attention (Beltagy et al. 2020, "Longformer"; Mistral 7B): each query
sees itself and the ``window - 1`` tokens before it.

``impl="chunked"`` (default) walks query blocks and reads only the keys in reach, so time and memory are
O(T · window); ``impl="sdpa"`` and ``impl="math"`` apply a banded mask to full attention (the references).
The KV cache keeps the last ``window - 1`` tokens, so decoding cost is bounded by the window.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from archs.mixers.attention import Attention, AttentionOptions
from archs.ops.attention import attention_chunked, attention_math, attention_sdpa
from registry import register_mixer

__all__ = ["SlidingWindowAttention", "SlidingWindowOptions"]


@dataclass(frozen=True)
class SlidingWindowOptions(AttentionOptions):
    window: int = 256  # tokens a query sees, itself included
    impl: str = "chunked"  # "chunked" | "sdpa" | "math"
    positions: str = "rope"

    IMPLS = ("chunked", "sdpa", "math")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")


@register_mixer("sliding_window_attention")
class SlidingWindowAttention(Attention):
    """Causal local attention over the last `window` tokens; O(T·window) time, memory and cache."""

    Options = SlidingWindowOptions

    def __init__(self, d_model: int, layer_idx: int = 0, **options):
        super().__init__(d_model, layer_idx, **options)
        self.window = self.opts.window

    @classmethod
    def available_backends(cls) -> dict[str, str]:
        return {"chunked": "yes", "sdpa": "yes", "math": "yes"}

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        impl = self.opts.impl
        self._ran(impl)
        if impl == "math":
            return attention_math(q, k, v, window=self.window, alibi=self.alibi)
        if impl == "sdpa":
            return attention_sdpa(q, k, v, window=self.window, alibi=self.alibi)
        return attention_chunked(q, k, v, window=self.window, alibi=self.alibi,
                                 chunk_size=max(16, min(self.window, 256)))
