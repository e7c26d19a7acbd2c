"""Structured state-space duality (SSD), the scan of Mamba-2 (Dao & Gu 2024), in plain PyTorch.

Per head ``h`` (in group ``g = h // (H / G)``, whose heads share ``B`` and ``C``), with a scalar decay per step:

    state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * x_t ⊗ B_t        # (P, N)
    y_t     = state_t @ C_t + D_h * x_t                              # (P,)

Shapes: ``x: (Bt, T, H, P)``, ``dt: (Bt, T, H)`` (already positive: softplus and clamping are the caller's),
``A: (H,)`` (negative), ``B, C: (Bt, T, G, N)``, ``D: (H,)`` or ``(H, P)`` or None, states ``(Bt, H, P, N)``.
The state is carried in fp32; outputs come back in ``x.dtype``.

- `ssd_reference`: the recurrence one step at a time (the oracle). Per-step slices are taken once with
  ``unbind`` so that autograd stays O(T).
- `ssd_chunked`: the SSD algorithm. The sequence is cut into chunks of ``chunk_size``; within a chunk the
  output is a masked "attention with decay" ``(C Bᵀ ⊙ exp(segsum(dt·A))) (dt·x)`` done as matmuls, and a
  state is carried from chunk to chunk. Linear in T for a fixed chunk size. T is padded to a multiple of the
  chunk internally (padding has ``dt = 0``: no input, no decay), so results do not depend on the chunk size
  beyond rounding, for any T. Within a chunk the decay takes one of two forms, chosen per block of chunks:
  *factored* (``exp(acum_l - acum_s) = e_l / e_s``: one matmul shared by a group's heads, no ``(Q, Q)``
  tensor per head; used while no chunk decays by more than exp(-80)) or *stable* (the ``(Q, Q)`` decay
  matrix per head, for any decay). Both agree with the recurrence to fp32 rounding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ssd_reference", "ssd_chunked", "ssd_step"]


def _check(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
           initial_state: Tensor | None) -> tuple[int, int, int, int, int, int]:
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, seqlen, nheads, headdim), got shape {tuple(x.shape)}")
    b, t, h, p = x.shape
    if B.dim() != 4 or B.shape[:2] != (b, t) or C.shape != B.shape:
        raise ValueError(f"B and C must be (batch, seqlen, ngroups, dstate) = ({b}, {t}, G, N), "
                         f"got {tuple(B.shape)} and {tuple(C.shape)}")
    g, n = B.shape[2:]
    if h % g:
        raise ValueError(f"ngroups={g} must divide nheads={h}")
    if dt.shape != (b, t, h):
        raise ValueError(f"dt must be (batch, seqlen, nheads) = {(b, t, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must be (nheads,) = ({h},), got {tuple(A.shape)}")
    if D is not None and D.shape not in ((h,), (h, p)):
        raise ValueError(f"D must be (nheads,) or (nheads, headdim) = ({h},) or ({h}, {p}), got {tuple(D.shape)}")
    if initial_state is not None and initial_state.shape != (b, h, p, n):
        raise ValueError(f"initial_state must be (batch, nheads, headdim, dstate) = {(b, h, p, n)}, "
                         f"got {tuple(initial_state.shape)}")
    return b, t, h, p, g, n


#: exp(x) for x < -87.3 underflows fp32 (and is 4-10x slower than elsewhere in torch's CPU kernel)
_EXP_MIN = -87.0


def _exp(x: Tensor) -> Tensor:
    """exp of a non-positive exponent, clamped where fp32 underflows."""
    return torch.exp(x.clamp(min=_EXP_MIN))


def _compute_dtype(x: Tensor) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs (for gradient checks)."""
    return torch.promote_types(x.dtype, torch.float32)


def _skip(y: Tensor, x: Tensor, D: Tensor | None) -> Tensor:
    """``y + D * x`` with D per head ``(H,)`` or per channel ``(H, P)``."""
    if D is None:
        return y
    d = D.to(y.dtype) if D.dim() == 2 else D.to(y.dtype)[:, None]  # (H, P) or (H, 1)
    return y + x * d


def ssd_reference(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None, *,
                  initial_state: Tensor | None = None,
                  return_final_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The SSD recurrence, one step at a time. Returns ``y`` and, if asked, the final state (fp32)."""
    b, t, h, p, g, n = _check(x, dt, A, B, C, D, initial_state)
    dtype, ct = x.dtype, _compute_dtype(x)
    xf, dtf, Af = x.to(ct), dt.to(ct), A.to(ct)
    Bf = B.to(ct).repeat_interleave(h // g, dim=2)  # (Bt, T, H, N)
    Cf = C.to(ct).repeat_interleave(h // g, dim=2)
    decay = torch.exp(dtf * Af)  # (Bt, T, H)
    state = x.new_zeros(b, h, p, n, dtype=ct) if initial_state is None else initial_state.to(ct)
    ys = []
    steps = zip(xf.unbind(1), dtf.unbind(1), decay.unbind(1), Bf.unbind(1), Cf.unbind(1), strict=True)
    for x_t, dt_t, a_t, b_t, c_t in steps:  # x_t (Bt, H, P), dt_t/a_t (Bt, H), b_t/c_t (Bt, H, N)
        state = state * a_t[:, :, None, None] + (x_t * dt_t[:, :, None])[:, :, :, None] * b_t[:, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, c_t))
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(b, 0, h, p)  # (Bt, T, H, P)
    y = _skip(y, xf, D).to(dtype)
    return (y, state) if return_final_state else y


def ssd_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, state: Tensor) -> Tensor:
    """One decoding step, updating ``state: (Bt, H, P, N)`` (fp32) in place.

    ``x: (Bt, H, P)``, ``dt: (Bt, H)``, ``B, C: (Bt, G, N)``; returns ``y: (Bt, H, P)`` in ``x.dtype``.
    """
    h, g = x.shape[1], B.shape[1]
    xf, dtf = x.to(state.dtype), dt.to(state.dtype)
    Bf = B.to(state.dtype).repeat_interleave(h // g, dim=1)  # (Bt, H, N)
    Cf = C.to(state.dtype).repeat_interleave(h // g, dim=1)
    decay = torch.exp(dtf * A.to(state.dtype))  # (Bt, H)
    state.mul_(decay[:, :, None, None]).add_((xf * dtf[:, :, None])[:, :, :, None] * Bf[:, :, None, :])
    y = torch.einsum("bhpn,bhn->bhp", state, Cf)
    return _skip(y, xf, D).to(x.dtype)


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None, *,
                chunk_size: int = 64, initial_state: Tensor | None = None,
                return_final_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The chunked SSD algorithm (see the module docstring). Same arguments and results as `ssd_reference`.

    The chunks are processed in blocks of several chunks at a time, the state carried from block to block, so
    that the temporaries stay small (on CPU, tensors above 32 MB are fresh pages from the kernel on every
    allocation, and cost more than the arithmetic on them).
    """
    b, t, h, p, g, n = _check(x, dt, A, B, C, D, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype, ct = x.dtype, _compute_dtype(x)
    hg = h // g  # heads per group
    q = min(chunk_size, max(t, 1))
    pad = (-t) % q
    xf, dtf, Bf, Cf = x.to(ct), dt.to(ct), B.to(ct), C.to(ct)
    if pad:  # dt = 0 past the end: no input, no decay
        xf = F.pad(xf, (0, 0, 0, 0, 0, pad))
        dtf = F.pad(dtf, (0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
    if initial_state is None:
        state = xf.new_zeros(b, g, n, hg, p)
    else:  # (Bt, H, P, N) -> (Bt, G, N, Hg, P)
        state = initial_state.to(ct).view(b, g, hg, p, n).permute(0, 1, 4, 2, 3)
    per_token = b * h * max(p, q, n)  # elements per token of the largest temporaries
    block = q * max(1, _BLOCK_ELEMENTS // (per_token * q))
    Af = A.to(ct)
    ys = []
    for xb, dtb, Bb, Cb in zip(xf.split(block, 1), dtf.split(block, 1), Bf.split(block, 1), Cf.split(block, 1),
                               strict=True):
        with torch.no_grad():  # the largest decay over one chunk in this block, Σ_chunk dt·|A|
            spread = -(dtb * Af).view(b, -1, q, h).sum(2).min().item()
        block_fn = _ssd_block_factored if spread <= _FACTORED_MAX_DECAY else _ssd_block
        y_b, state = block_fn(xb, dtb, Af, Bb, Cb, state, q)
        ys.append(y_b)
    y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)  # (Bt, T', H, P)
    y = y[:, :t] if pad else y
    y = _skip(y, x.to(ct), D).to(dtype)
    if not return_final_state:
        return y
    final = state.permute(0, 1, 3, 4, 2).reshape(b, h, p, n)  # (Bt, H, P, N)
    return y, final


#: the factored path runs a block when no chunk decays by more than exp(-this) (see `_ssd_block_factored`).
#: Its factors then lie within exp(±40): far from fp32 overflow, even for gradients scaled by 1e10
_FACTORED_MAX_DECAY = 80.0
#: elements of the largest temporaries of one block of `ssd_chunked` (16 MB in fp32)
_BLOCK_ELEMENTS = 1 << 22


class _DecayScores(torch.autograd.Function):
    """``scores[h, l, s] = exp(acum[h, l] - acum[h, s]) · cb[g(h), l, s]`` for ``l >= s``, 0 above the diagonal.

    ``acum: (..., H, Q)`` (non-increasing along Q), ``cb: (..., G, Q, Q)`` shared by the H/G heads of a group.
    Fused by hand because autograd spends most of this step's time in the backward of sub/clamp/exp/mask.
    The exponents are clamped at -87 (fp32 underflows there anyway; torch's exp is slow below it). The
    diagonal is ``cb`` itself, so no gradient reaches ``acum`` through it (it would cancel, but only up to
    rounding), nor through the masked entries.
    """

    @staticmethod
    def forward(ctx: Any, acum: Tensor, cb: Tensor) -> Tensor:
        *lead, h, q = acum.shape
        g = cb.shape[-3]
        strict = torch.ones(q, q, dtype=torch.bool, device=acum.device).tril(-1)
        decay = acum[..., :, None] - acum[..., None, :]  # (..., H, Q, Q)
        decay.clamp_(_EXP_MIN, 0.0).exp_()
        cb_strict = cb * strict  # (..., G, Q, Q)
        scores = decay.view(*lead, g, h // g, q, q) * cb_strict.unsqueeze(-3)
        scores.diagonal(dim1=-2, dim2=-1).copy_(cb.diagonal(dim1=-2, dim2=-1).unsqueeze(-2))
        ctx.save_for_backward(decay, cb_strict)
        return scores.view(*lead, h, q, q)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        decay, cb_strict = ctx.saved_tensors
        *lead, h, q, _ = decay.shape
        g = cb_strict.shape[-3]
        gd = (grad * decay).view(*lead, g, h // g, q, q)  # d/d(cb) per head, before the mask
        gcb = gd.sum(-3).tril(-1)
        gcb.diagonal(dim1=-2, dim2=-1).copy_(grad.view(*lead, g, h // g, q, q).diagonal(dim1=-2, dim2=-1).sum(-2))
        gseg = gd.mul_(cb_strict.unsqueeze(-3)).view(*lead, h, q, q)  # d/d(acum_l - acum_s), 0 where masked
        gacum = gseg.sum(-1) - gseg.sum(-2)
        return gacum, gcb


def _ssd_block(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, state: Tensor,
               q: int) -> tuple[Tensor, Tensor]:
    """SSD over whole chunks of ``q`` steps from ``state: (Bt, G, N, Hg, P)``; returns ``y`` (no D term) and
    the state at the end. ``x: (Bt, T, H, P)``, ``dt: (Bt, T, H)``, ``B, C: (Bt, T, G, N)``, T a multiple of q."""
    b, t, h, p = x.shape
    g, n = B.shape[2:]
    hg, nc = h // g, t // q

    # decays within each chunk; every exponent below is <= 0 (A <= 0, dt >= 0)
    a = (dt * A).view(b, nc, q, h)  # (Bt, c, Q, H)
    acum = a.cumsum(2)  # Σ_{j<=l} a_j
    # Σ_{j>s} a_j, summed directly rather than as acum[-1] - acum[s], so its gradient has no cancellation
    to_end = F.pad(a[:, :, 1:], (0, 0, 0, 1)).flip(2).cumsum(2).flip(2)  # (Bt, c, Q, H)
    acum_h = acum.transpose(2, 3)  # (Bt, c, H, Q)

    xc = x.view(b, nc, q, h, p)
    dtc = dt.view(b, nc, q, h)
    Bc = B.view(b, nc, q, g, n).transpose(2, 3)  # (Bt, c, G, Q, N)
    Cc = C.view(b, nc, q, g, n).transpose(2, 3)  # (Bt, c, G, Q, N)

    # 1. within chunks: (C Bᵀ ⊙ decay) (dt x)
    cb = Cc @ Bc.transpose(-1, -2)  # (Bt, c, G, Q, Q)
    scores = _DecayScores.apply(acum_h, cb)  # (Bt, c, H, Q, Q)
    xdt = (xc * dtc[..., None]).permute(0, 1, 3, 2, 4)  # (Bt, c, H, Q, P)
    y_diag = scores @ xdt  # (Bt, c, H, Q, P)

    # 2. the state each chunk adds by its end: Bᵀ (decay-to-end · dt · x)
    w = dtc * _exp(to_end)  # (Bt, c, Q, H)
    xw = (xc * w[..., None]).view(b, nc, q, g, hg * p).transpose(2, 3)  # (Bt, c, G, Q, Hg*P)
    chunk_states = Bc.transpose(-1, -2) @ xw  # (Bt, c, G, N, Hg*P)

    # 3. carry the state across chunks
    chunk_decay = _exp(acum[:, :, -1, :]).view(b, nc, g, 1, hg, 1)  # (Bt, c, G, 1, Hg, 1)
    entering = []
    for decay_c, add_c in zip(chunk_decay.unbind(1), chunk_states.view(b, nc, g, n, hg, p).unbind(1), strict=True):
        entering.append(state)
        state = state * decay_c + add_c
    prev = torch.stack(entering, dim=1).view(b, nc, g, n, hg * p)  # (Bt, c, G, N, Hg*P)

    # 4. what the carried state contributes, exp(acum) · C state, plus the within-chunk part
    y_off = (Cc @ prev).view(b, nc, g, q, hg, p).transpose(2, 3).reshape(b, nc, q, h, p)  # (Bt, c, Q, H, P)
    y = y_off * _exp(acum)[..., None] + y_diag.transpose(2, 3)  # (Bt, c, Q, H, P), contiguous like y_off
    return y.view(b, t, h, p), state


def _ssd_block_factored(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, state: Tensor,
                        q: int) -> tuple[Tensor, Tensor]:
    """`_ssd_block` with the within-chunk decay factored: ``exp(acum_l - acum_s) = e_l / e_s``.

    With ``e = exp(acum - m)``, ``m`` the middle of the chunk's decay range, the masked decay no longer needs a
    ``(Q, Q)`` matrix per head: ``C Bᵀ`` (shared by a group's heads) multiplies ``dt·x / e`` for all heads at
    once, in the same matmul shape as the state terms, and the state added by a chunk reuses ``dt·x / e``. The
    factors stay within fp32 range while every chunk's total decay is at most `_FACTORED_MAX_DECAY` (then
    ``|acum - m| <= 40``), which the caller checks. The diagonal (decay 1) is added apart, so that no gradient
    reaches the decays through it.
    """
    b, t, h, p = x.shape
    g, n = B.shape[2:]
    hg, nc = h // g, t // q

    acum = (dt * A).view(b, nc, q, h).cumsum(2)  # (Bt, c, Q, H), Σ_{j<=l} a_j
    mid = acum[:, :, -1:, :] * 0.5  # (Bt, c, 1, H)
    e = torch.exp(acum - mid)  # (Bt, c, Q, H), within exp(±40)
    ue = x.view(b, nc, q, h, p) * (dt.view(b, nc, q, h) * torch.exp(mid - acum))[..., None]  # dt·x / e
    ue = ue.view(b, nc, q, g, hg * p).transpose(2, 3)  # (Bt, c, G, Q, Hg*P)
    Bc = B.view(b, nc, q, g, n).transpose(2, 3)  # (Bt, c, G, Q, N)
    Cc = C.view(b, nc, q, g, n).transpose(2, 3)  # (Bt, c, G, Q, N)
    cb = Cc @ Bc.transpose(-1, -2)  # (Bt, c, G, Q, Q)

    # the state each chunk adds by its end: Σ_s exp(acum_last - acum_s) dt_s x_s ⊗ B_s, and
    # acum_last - acum_s = (acum_last - mid) + (mid - acum_s) with acum_last - mid = mid
    half = torch.exp(mid[:, :, 0]).view(b, nc, g, 1, hg, 1)  # (Bt, c, G, 1, Hg, 1)
    chunk_decay = half * half
    added = (Bc.transpose(-1, -2) @ ue).view(b, nc, g, n, hg, p)  # (Bt, c, G, N, Hg, P), before the factor
    entering = []  # the state entering each chunk, times exp(mid) (so that e_l finishes its decay)
    for half_c, decay_c, add_c in zip(half.unbind(1), chunk_decay.unbind(1), added.unbind(1), strict=True):
        entering.append(state * half_c)
        state = state * decay_c + add_c * half_c
    prev = torch.stack(entering, dim=1).view(b, nc, g, n, hg * p)  # (Bt, c, G, N, Hg*P)

    # y_l = e_l · (C_l state' + Σ_{s<l} (C_l·B_s) dt_s x_s / e_s) + (C_l·B_l) dt_l x_l
    inner = torch.matmul(cb.tril(-1), ue) + Cc @ prev  # (Bt, c, G, Q, Hg*P)
    inner = inner.view(b, nc, g, q, hg, p).transpose(2, 3).reshape(b, nc, q, h, p)  # (Bt, c, Q, H, P)
    diag = cb.diagonal(dim1=-2, dim2=-1).transpose(2, 3).repeat_interleave(hg, dim=-1)  # (Bt, c, Q, H)
    y = torch.addcmul(inner * e[..., None], x.view(b, nc, q, h, p), (diag * dt.view(b, nc, q, h))[..., None])
    return y.view(b, t, h, p), state
