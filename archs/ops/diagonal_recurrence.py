"""The diagonal linear recurrence, per batch ``b``, time ``t`` and channel ``e``:

    h_t = a_t * h_{t-1} + x_t        (h_{-1} = initial_state, or 0)

what RG-LRU trains and decodes with, and what S4D's and H3's diagonal SSMs decode with (complex ``a`` and
``x``, one step at a time). Shapes: ``a, x: (B, T, E)`` (``a`` may broadcast, e.g. ``(E,)`` for an LTI
system); ``initial_state: (B, E)``.

- `diagonal_recurrence_reference`: the loop over time (the oracle), real or complex;
- `diagonal_recurrence_step`: one step, for decoding;
- `diagonal_recurrence`: the fast path for real inputs, forward and backward. The scan is associative
  (``(a1, x1) then (a2, x2) = (a1 a2, a2 x1 + x2)``), so it runs as a chunked parallel scan: within chunks
  of ``chunk_size`` steps a Hillis–Steele scan (log2(chunk) whole-tensor passes), across chunks the same
  scan over the chunks' totals (recursively), then one pass adds each chunk's incoming state times its
  running decay. Only products of the ``a`` (and sums) are formed — no division, no log-space — so decays
  in (0, 1] cannot overflow, and strong ones underflow to the right limit, 0. The backward pass is the
  reverse recurrence ``g_t = dh_t + a_{t+1} g_{t+1}`` by the same scan, then ``dx = g``,
  ``da_t = g_t h_{t-1}``, ``d initial_state = a_0 g_0``; saved: ``a`` and the output (O(B·T·E)).
  Computed in float32 for half-precision inputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["DEFAULT_CHUNK_SIZE", "diagonal_recurrence", "diagonal_recurrence_reference",
           "diagonal_recurrence_step"]

DEFAULT_CHUNK_SIZE = 32


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


def _hillis_steele(a: Tensor, h: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Inclusive scan along ``dim`` of (a, h) pairs in place: afterwards ``h`` holds the states from a zero
    start and ``a`` the running products of the decays."""
    n, d = a.shape[dim], 1
    while d < n:
        hi, lo = h.narrow(dim, d, n - d), h.narrow(dim, 0, n - d)
        ahi, alo = a.narrow(dim, d, n - d), a.narrow(dim, 0, n - d)
        hi.addcmul_(ahi, lo.clone())  # the lower half is read before this pass writes it
        ahi.mul_(alo.clone())
        d *= 2
    return a, h


def _scan(a: Tensor, x: Tensor, h0: Tensor | None, chunk: int) -> Tensor:
    """The forward scan (no autograd): states ``(B, T, E)`` from ``a, x`` (contiguous, same shape)."""
    bsz, t, e = x.shape
    h = x.clone()
    if h0 is not None:
        h[:, 0].addcmul_(a[:, 0], h0)
    if t <= chunk or chunk < 2:  # one scan over the whole sequence
        return _hillis_steele(a.clone(), h, 1)[1]
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        h = torch.cat([h, h.new_zeros(bsz, pad, e)], 1)
        a = torch.cat([a, a.new_ones(bsz, pad, e)], 1)
    hc, ac = h.view(bsz, n, chunk, e), a.reshape(bsz, n, chunk, e).clone()
    _hillis_steele(ac, hc, 2)  # within each chunk, from a zero start
    # the state entering chunk j: the scan over the chunks' (total decay, final state) pairs, shifted by one
    ends = _scan(ac[:, :, -1].contiguous(), hc[:, :, -1].contiguous(), None, chunk)
    hc[:, 1:].addcmul_(ac[:, 1:], ends[:, :-1, None])
    return h[:, :t]


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: Tensor, x: Tensor, h0: Tensor | None, chunk: int) -> Tensor:
        ct = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        ac, xc = a.to(ct).contiguous(), x.to(ct).contiguous()
        h0c = None if h0 is None else h0.to(ct)
        h = _scan(ac, xc, h0c, chunk)
        ctx.save_for_backward(ac, h, h0c)
        ctx.chunk, ctx.dtypes = chunk, (a.dtype, x.dtype, None if h0 is None else h0.dtype)
        return h.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        a, h, h0 = ctx.saved_tensors
        g_in = grad.to(a.dtype).flip(1).contiguous()
        a_next = torch.cat([a[:, 1:], a.new_zeros(a[:, :1].shape)], 1).flip(1).contiguous()
        g = _scan(a_next, g_in, None, ctx.chunk).flip(1)  # g_t = dh_t + a_{t+1} g_{t+1}
        prev = torch.cat([(h0 if h0 is not None else h.new_zeros(h[:, 0].shape))[:, None], h[:, :-1]], 1)
        da, dx = g * prev, g
        dh0 = None if h0 is None else (a[:, 0] * g[:, 0]).to(ctx.dtypes[2])
        return da.to(ctx.dtypes[0]), dx.to(ctx.dtypes[1]), dh0, None
