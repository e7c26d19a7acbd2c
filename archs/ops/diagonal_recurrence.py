"""The diagonal linear recurrence, per batch ``b``, time ``t`` and channel ``e``:

    h_t = a_t * h_{t-1} + x_t        (h_{-1} = initial_state, or 0)

what RG-LRU trains and decodes with, and what S4D's and H3's diagonal SSMs decode with (complex ``a`` and
``x``, one step at a time). Shapes: ``a, x: (B, T, E)`` (``a`` may broadcast, e.g. ``(E,)`` for an LTI
system); ``initial_state: (B, E)``.

- `diagonal_recurrence_reference`: the loop over time (the oracle), real or complex;
- `diagonal_recurrence_step`: one step, for decoding;
- `diagonal_recurrence`: the fast path for real inputs, forward and backward. The scan is associative
  (``(a1, x1) then (a2, x2) = (a1 a2, a2 x1 + x2)``), so it runs chunk-parallel: the sequence is cut into
  chunks of ``chunk_size`` steps and the recurrence runs over the positions of a chunk in every chunk at
  once (``chunk_size`` steps, each over ``B · T/chunk_size · E`` numbers, one pass over the data in all —
  a work-efficient O(T) scan rather than a Hillis–Steele one's O(T log chunk)); the chunks' totals (running
  decay products, local final states) are scanned the same way, recursively, and one pass adds each
  chunk's incoming state times its running decay. Only products of the ``a`` (and sums) are formed — no
  division, no log-space — so decays in (0, 1] cannot overflow, and strong ones underflow to the right
  limit, 0. The backward pass is the
  reverse recurrence ``g_t = dh_t + a_{t+1} g_{t+1}`` by the same scan, then ``dx = g``,
  ``da_t = g_t h_{t-1}``, ``d initial_state = a_0 g_0``; saved: ``a`` and the output (O(B·T·E)).
  Computed in float32 for half-precision inputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["DEFAULT_CHUNK_SIZE", "diagonal_recurrence", "diagonal_recurrence_reference",
           "diagonal_recurrence_step", "recurrence_grads", "recurrence_states"]

DEFAULT_CHUNK_SIZE = 64


def _check(a: Tensor, x: Tensor, initial_state: Tensor | None) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, length, channels), got shape {tuple(x.shape)}")
    try:
        torch.broadcast_shapes(a.shape, x.shape)
    except RuntimeError:
        raise ValueError(f"a of shape {tuple(a.shape)} does not broadcast to x's {tuple(x.shape)}") from None
    if initial_state is not None and tuple(initial_state.shape) != (x.shape[0], x.shape[2]):
        raise ValueError(f"initial_state must be (batch, channels) = {(x.shape[0], x.shape[2])}, "
                         f"got {tuple(initial_state.shape)}")


def diagonal_recurrence_step(h: Tensor, a: Tensor, x: Tensor) -> Tensor:
    """One step: ``a * h + x`` (any shapes that broadcast)."""
    return a * h + x


def diagonal_recurrence_reference(a: Tensor, x: Tensor, initial_state: Tensor | None = None) -> Tensor:
    """All states ``h: (B, T, E)`` by the plain loop over time (real or complex)."""
    _check(a, x, initial_state)
    a = a.expand_as(x)
    h = torch.zeros_like(x[:, 0]) if initial_state is None else initial_state.to(x.dtype)
    out = []
    for a_t, x_t in zip(a.unbind(1), x.unbind(1), strict=True):
        h = diagonal_recurrence_step(h, a_t, x_t)
        out.append(h)
    return torch.stack(out, 1)


def diagonal_recurrence(a: Tensor, x: Tensor, initial_state: Tensor | None = None, *,
                        chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """`diagonal_recurrence_reference` for real ``a, x: (B, T, E)``, by a chunked parallel scan."""
    _check(a, x, initial_state)
    if a.is_complex() or x.is_complex():
        raise NotImplementedError("the fast scan is real; use diagonal_recurrence_reference for complex inputs")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _Scan.apply(a.expand_as(x), x, initial_state, chunk_size)


def _scan(a: Tensor, x: Tensor, h0: Tensor | None, chunk: int) -> Tensor:
    """The forward scan (no autograd): states ``(B, T, E)`` from ``a, x`` (contiguous, same shape)."""
    bsz, t, e = x.shape
    if t <= chunk or chunk < 2:  # short: the loop itself
        return diagonal_recurrence_reference(a, x, h0)
    n = -(-t // chunk)
    pad = n * chunk - t
    h = torch.cat([x, x.new_zeros(bsz, pad, e)], 1) if pad else x.clone()
    a = torch.cat([a, a.new_ones(bsz, pad, e)], 1) if pad else a
    hc, ac = h.view(bsz, n, chunk, e), a.view(bsz, n, chunk, e)
    for j in range(1, chunk):  # within every chunk at once, from a zero start
        hc[:, :, j].addcmul_(ac[:, :, j], hc[:, :, j - 1])
    decay = torch.cumprod(ac, 2)  # running decay within each chunk
    # the state leaving chunk j: the same recurrence over the chunks' (total decay, local final state)
    ends = _scan(decay[:, :, -1].contiguous(), hc[:, :, -1].contiguous(), h0, chunk)
    hc[:, 1:].addcmul_(decay[:, 1:], ends[:, :-1, None])
    if h0 is not None:
        hc[:, 0].addcmul_(decay[:, 0], h0[:, None])
    return h[:, :t]


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def recurrence_states(a: Tensor, x: Tensor, initial_state: Tensor | None = None, *,
                      chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """The fast scan's forward without autograd: states ``(B, T, E)`` of real ``a, x`` (same shape), in the
    compute dtype (float32 for half inputs). For ops that fuse the recurrence into their own backward."""
    ct = _compute_dtype(x)
    return _scan(a.to(ct).contiguous(), x.to(ct).contiguous(),
                 None if initial_state is None else initial_state.to(ct), chunk_size)


def recurrence_grads(a: Tensor, h: Tensor, grad: Tensor, initial_state: Tensor | None = None, *,
                     chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[Tensor, Tensor, Tensor | None]:
    """The gradients ``(da, dx, d initial_state)`` of the recurrence from its decays ``a``, its states ``h``
    (`recurrence_states`) and ``grad = dL/dh``: ``g_t = grad_t + a_{t+1} g_{t+1}`` by the same scan over
    reversed time, then ``dx = g``, ``da_t = g_t h_{t-1}``, ``d initial_state = a_0 g_0``."""
    g_in = grad.to(a.dtype).flip(1).contiguous()
    a_next = torch.cat([a[:, 1:], a.new_zeros(a[:, :1].shape)], 1).flip(1).contiguous()
    g = _scan(a_next, g_in, None, chunk_size).flip(1)
    da = torch.empty_like(g)  # g_t h_{t-1}, h_{-1} = initial_state
    torch.mul(g[:, 1:], h[:, :-1], out=da[:, 1:])
    if initial_state is None:
        da[:, 0].zero_()
        return da, g, None
    torch.mul(g[:, 0], initial_state.to(h.dtype), out=da[:, 0])
    return da, g, a[:, 0] * g[:, 0]


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: Tensor, x: Tensor, h0: Tensor | None, chunk: int) -> Tensor:
        ct = _compute_dtype(x)
        ac = a.to(ct).contiguous()
        h0c = None if h0 is None else h0.to(ct)
        h = recurrence_states(ac, x, h0c, chunk_size=chunk)
        ctx.save_for_backward(ac, h, h0c)
        ctx.chunk, ctx.dtypes = chunk, (a.dtype, x.dtype, None if h0 is None else h0.dtype)
        return h.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        a, h, h0 = ctx.saved_tensors
        da, dx, dh0 = recurrence_grads(a, h, grad, h0, chunk_size=ctx.chunk)
        return da.to(ctx.dtypes[0]), dx.to(ctx.dtypes[1]), None if dh0 is None else dh0.to(ctx.dtypes[2]), None
