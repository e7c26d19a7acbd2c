"""Causal attention kernels on ``q: (B, H, Tq, hd)``, ``k, v: (B, Hkv, Tk, hd)`` with ``Tk >= Tq``.

Queries are aligned to the end of the keys ("bottom-right"): query ``i`` sits at position ``Tk - Tq + i`` and
sees keys ``j <= Tk - Tq + i`` (and ``j > Tk - Tq + i - window`` with a window). This one convention covers a
full forward (``Tq == Tk``), a prefill after cached tokens, and one-token decoding.

- `attention_math`: the reference — materialises the ``(Tq, Tk)`` scores and the softmax. O(T^2) memory.
- `attention_sdpa`: torch's fused ``scaled_dot_product_attention`` (a flash kernel on CPU, with or without a
  mask; masked calls in blocks of query rows, so their memory is linear in T too).
- `attention_chunked`: exact softmax over query chunks; each chunk is recomputed in the backward pass
  (activation checkpointing) when its key span grows with T, so memory is O(chunk · T) forward and backward;
  with a window the key span is bounded and memory is O(T · (chunk + window)).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from archs.positions import alibi_bias

__all__ = ["attention_math", "attention_sdpa", "attention_chunked", "causal_mask", "repeat_kv"]


def repeat_kv(x: Tensor, n_heads: int) -> Tensor:
    """Expand ``(B, Hkv, T, hd)`` to ``(B, H, T, hd)`` for grouped-query attention."""
    groups = n_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def causal_mask(tq: int, tk: int, window: int | None, device: torch.device, q_start: int | None = None,
                k_start: int = 0) -> Tensor:
    """Boolean ``(tq, tk)`` mask, True where query may see key (bottom-right aligned unless q_start given)."""
    q0 = tk - tq if q_start is None else q_start
    qi = torch.arange(q0, q0 + tq, device=device)[:, None]
    kj = torch.arange(k_start, k_start + tk, device=device)[None, :]
    allowed = kj <= qi
    if window is not None:
        allowed &= kj > qi - window
    return allowed


def attention_math(q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None,
                   alibi: Tensor | None = None) -> Tensor:
    """Reference causal attention with a materialised softmax. ``alibi``: (H,) slopes or None."""
    tq, tk, hd = q.shape[2], k.shape[2], q.shape[3]
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(hd))  # (B, H, Tq, Tk)
    pos_q = torch.arange(tk - tq, tk, device=q.device)
    pos_k = torch.arange(tk, device=q.device)
    if alibi is not None:
        scores = scores + alibi_bias(alibi.to(scores.dtype), pos_q, pos_k)
    mask = causal_mask(tq, tk, window, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return probs @ v  # (B, H, Tq, hd)


def attention_sdpa(q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None,
                   alibi: Tensor | None = None) -> Tensor:
    """torch's fused attention: the flash kernel on CPU (and a fused kernel on CUDA), masked or not.

    With a window or ALiBi the call needs an explicit mask, a ``(Tq, Tk)`` bool or ``(1, H, Tq, Tk)`` float
    one: on CPU torch sends a 3-D ``(H, Tq, Tk)`` mask to its math path, which materialises the
    ``(B, H, Tq, Tk)`` scores twice and is 1.4-3x slower. The mask itself grows as Tq x Tk, so masked calls run
    over blocks of query rows with at most `MASKED_SCORES` elements of ``B x H x rows x Tk`` each (recomputed
    in the backward pass when there is more than one block): memory stays linear in T, e.g. for evaluating an
    ALiBi model at 64x its training length.
    """
    tq, tk = q.shape[2], k.shape[2]
    if window is None and alibi is None and (tq == tk or tq == 1):
        return F.scaled_dot_product_attention(q, k, v, is_causal=tq == tk and tq > 1,
                                              enable_gqa=q.shape[1] != k.shape[1])
    rows = max(1, MASKED_SCORES // (q.shape[0] * q.shape[1] * tk))
    if rows >= tq:
        return _sdpa_masked(q, k, v, tk - tq, 0, window, alibi)
    return _query_blocks(_sdpa_masked, q, k, v, rows, window, alibi, recompute=True)


MASKED_SCORES = 1 << 25  # score elements of one masked SDPA call (128 MiB in fp32)


def _sdpa_masked(q: Tensor, k: Tensor, v: Tensor, q_start: int, k_start: int, window: int | None,
                 alibi: Tensor | None) -> Tensor:
    tq, tk = q.shape[2], k.shape[2]
    mask = causal_mask(tq, tk, window, q.device, q_start=q_start, k_start=k_start)
    if alibi is not None:
        bias = alibi_bias(alibi.to(q.dtype), torch.arange(q_start, q_start + tq, device=q.device),
                          torch.arange(k_start, k_start + tk, device=q.device))
        mask = bias.masked_fill(~mask, float("-inf"))[None]  # (1, H, tq, tk): 4-D reaches the flash kernel
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def _chunk(q: Tensor, k: Tensor, v: Tensor, q_start: int, k_start: int, window: int | None,
           alibi: Tensor | None) -> Tensor:
    tq, tk, hd = q.shape[2], k.shape[2], q.shape[3]
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(hd))  # (B, H, c, S)
    if alibi is not None:
        scores = scores + alibi_bias(alibi.to(scores.dtype), torch.arange(q_start, q_start + tq, device=q.device),
                                     torch.arange(k_start, k_start + tk, device=q.device))
    mask = causal_mask(tq, tk, window, q.device, q_start=q_start, k_start=k_start)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")).float(), dim=-1).to(q.dtype)
    return probs @ v


def attention_chunked(q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None,
                      alibi: Tensor | None = None, chunk_size: int = 256) -> Tensor:
    """Exact causal attention over query chunks, with memory linear in T (see the module docstring)."""
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    return _query_blocks(_chunk, q, k, v, chunk_size, window, alibi, recompute=window is None)


def _query_blocks(fn: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor, rows: int, window: int | None,
                  alibi: Tensor | None, recompute: bool) -> Tensor:
    """``fn(q_block, k_span, v_span, q_start, k_start, window, alibi)`` over blocks of ``rows`` query rows,
    each with the keys it can see, concatenated; with ``recompute``, blocks are recomputed in the backward
    pass (activation checkpointing) when gradients are needed."""
    tq, tk = q.shape[2], k.shape[2]
    offset = tk - tq
    recompute = recompute and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs = []
    for s in range(0, tq, rows):
        e = min(s + rows, tq)
        k_lo = 0 if window is None else max(0, offset + s - window + 1)
        args = (q[:, :, s:e], k[:, :, k_lo:offset + e], v[:, :, k_lo:offset + e], offset + s, k_lo, window, alibi)
        outs.append(checkpoint(fn, *args, use_reentrant=False) if recompute else fn(*args))
    return torch.cat(outs, dim=2)
