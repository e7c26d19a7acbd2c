"""Gated linear recurrence: the scan behind linear attention, RetNet, GLA and Based, in plain PyTorch.

Per head, with a state ``S: (K, V)`` carried in fp32 and a log-decay ``g_t <= 0``:

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ        # g_t per key channel (GLA), one per head (a scalar
    o_t = scale · S_tᵀ q_t                          # gate) or fixed per head (RetNet's γ); none: no decay

Shapes (flash-linear-attention's layout): ``q, k: (B, T, H, K)``, ``v: (B, T, H, V)``; ``g``: ``(B, T, H, K)``
(per key channel) or ``(B, T, H)`` (scalar per head and step) or None; ``g_gamma: (H,)`` a fixed log-decay per
head; states ``(B, H, K, V)``. ``scale`` defaults to ``K ** -0.5``. Both functions return
``(o, final_state)`` (``final_state`` None unless ``output_final_state``); ``o`` comes back in ``v.dtype``.

- `linear_recurrence_reference`: the recurrence one token at a time (the oracle; per-step slices taken once
  with ``unbind`` so autograd stays O(T)).
- `linear_recurrence_chunked`: the sequence cut into chunks of ``chunk_size``. Within a chunk the output is a
  masked attention with decay, done as matmuls; a state passes from chunk to chunk (``exp(b) ⊙ S``, the
  chunk's ``kᵀ v`` added). ``b`` is the within-chunk cumulative log-decay. Every exponent is a difference
  ``b_t - b_s`` with ``s <= t`` (so ``<= 0``), except in the *factored* form of per-key-channel gates,
  ``(q ⊙ e^b)(k ⊙ e^-b)ᵀ``, which is used only for chunks whose total decay stays above ``exp(-80)`` (no fp32
  overflow); other chunks take the *stable* form, the ``(C, C, K)`` decay tensor, in pieces of bounded
  memory. Scalar and fixed decays always use the ``(C, C)`` decay matrix per head. T is padded to a multiple
  of the chunk (padding has no input and no decay), so results do not depend on the chunk size beyond
  rounding. Memory is linear in T; the backward pass is autograd's through these matmuls.
- `taylor_recurrence_chunked`: the undecayed recurrence of Based, over the 2nd-order Taylor features
  ``φ(x) = [1, x / d^¼, (x ⊗ x) / (√2 · √d)]`` (one feature per unordered pair, diagonal at ``1/√2``) of raw
  ``q, k: (B, T, H, d)``. Across chunks it is `linear_recurrence_chunked`'s state passing over the features;
  within a chunk it uses ``φ(q)·φ(k) = 1 + s + s²/2`` with ``s = q·k / √d``: a ``(C, C)`` score from a
  ``d``-wide product instead of a ``1 + d + d(d+1)/2``-wide one (153 for Based's ``d = 16``). Its reference
  is `linear_recurrence_reference` of `taylor_features` of ``q`` and ``k``, with ``scale=1``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["check_qkv", "linear_recurrence_chunked", "linear_recurrence_reference", "scalar_decays",
           "taylor_features", "taylor_recurrence_chunked"]

#: the factored form is used while a chunk's total per-channel decay stays above exp(-_FACTORED_SPAN)
_FACTORED_SPAN = 80.0
#: elements of the (C, C, K) decay tensor the stable form materialises at a time
_STABLE_PIECE = 1 << 24


def check_qkv(q: Tensor, k: Tensor, v: Tensor, initial_state: Tensor | None) -> tuple[int, int, int, int, int]:
    """``(B, T, H, K, V)`` of ``q, k: (B, T, H, K)``, ``v: (B, T, H, V)``, ``initial_state: (B, H, K, V)``."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must be (batch, seqlen, nheads, head_k_dim) and equal, got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    b, t, h, kd = q.shape
    if v.dim() != 4 or v.shape[:3] != (b, t, h):
        raise ValueError(f"v must be (batch, seqlen, nheads, head_v_dim) = ({b}, {t}, {h}, V), got {tuple(v.shape)}")
    vd = v.shape[-1]
    if initial_state is not None and initial_state.shape != (b, h, kd, vd):
        raise ValueError(f"initial_state must be (batch, nheads, head_k_dim, head_v_dim) = {(b, h, kd, vd)}, "
                         f"got {tuple(initial_state.shape)}")
    return b, t, h, kd, vd


def _check(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, g_gamma: Tensor | None,
           initial_state: Tensor | None) -> tuple[int, int, int, int, int]:
    b, t, h, kd, vd = check_qkv(q, k, v, initial_state)
    if g is not None and g_gamma is not None:
        raise ValueError("give g (data-dependent log-decay) or g_gamma (fixed per head), not both")
    if g is not None and g.shape not in ((b, t, h), (b, t, h, kd)):
        raise ValueError(f"g must be (batch, seqlen, nheads) or (batch, seqlen, nheads, head_k_dim) = "
                         f"{(b, t, h)} or {(b, t, h, kd)}, got {tuple(g.shape)}")
    if g_gamma is not None and g_gamma.shape != (h,):
        raise ValueError(f"g_gamma must be (nheads,) = ({h},), got {tuple(g_gamma.shape)}")
    return b, t, h, kd, vd


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _initial_state(initial_state: Tensor | None, shape: tuple[int, ...], device: torch.device,
                   ct: torch.dtype) -> Tensor:
    """The state a scan starts from, in the compute dtype: the given one, or zeros."""
    return torch.zeros(shape, device=device, dtype=ct) if initial_state is None else initial_state.to(ct)


def _chunked_inputs(q: Tensor, k: Tensor, v: Tensor, scale: float | None, chunk_size: int):
    """What both chunked ops start from: ``(qc · scale, kc, vc, C, N, ct, causal)`` with ``qc, kc, vc`` in
    ``(B, H, N, C, *)`` (zero-padded to ``N * C`` tokens, compute dtype ``ct``) and the ``(C, C)`` causal mask."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    t, kd = q.shape[1], q.shape[-1]
    ct = _compute_dtype(v)
    scale = kd ** -0.5 if scale is None else scale
    c = max(1, min(chunk_size, t))
    n = -(-t // c)
    qc, kc, vc = _chunks(q, n, c, ct) * scale, _chunks(k, n, c, ct), _chunks(v, n, c, ct)
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril_()
    return qc, kc, vc, c, n, ct, causal


def linear_recurrence_reference(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, *,
                                g_gamma: Tensor | None = None, scale: float | None = None,
                                initial_state: Tensor | None = None,
                                output_final_state: bool = False) -> tuple[Tensor, Tensor | None]:
    """The recurrence one step at a time (see the module docstring for shapes)."""
    b, t, h, kd, vd = _check(q, k, v, g, g_gamma, initial_state)
    ct = _compute_dtype(v)
    scale = kd ** -0.5 if scale is None else scale
    state = _initial_state(initial_state, (b, h, kd, vd), q.device, ct)
    fixed = None if g_gamma is None else g_gamma.to(ct).exp()[None, :, None, None]  # (1, H, 1, 1)
    gates = [None] * t if g is None else g.to(ct).unbind(1)
    outs = []
    for q_t, k_t, v_t, g_t in zip(q.to(ct).unbind(1), k.to(ct).unbind(1), v.to(ct).unbind(1), gates, strict=True):
        if fixed is not None:
            state = fixed * state
        elif g_t is not None:
            state = (g_t.exp()[..., None, None] if g_t.dim() == 2 else g_t.exp()[..., None]) * state
        state = state + k_t[..., :, None] * v_t[..., None, :]  # (B, H, K, V)
        outs.append(torch.einsum("bhk,bhkv->bhv", q_t * scale, state))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(b, 0, h, vd, dtype=ct)
    return o.to(v.dtype), (state if output_final_state else None)


def _chunks(x: Tensor, n: int, c: int, ct: torch.dtype) -> Tensor:
    """``(B, T, H, *)`` -> ``(B, H, N, C, *)``, zero-padded to ``N * C`` tokens, in ``ct``."""
    b, t, h = x.shape[:3]
    x = x.to(ct)
    if n * c != t:
        x = torch.cat([x, x.new_zeros(b, n * c - t, *x.shape[2:])], dim=1)
    return x.view(b, n, c, h, *x.shape[3:]).movedim(3, 1)


def scalar_decays(gl: Tensor, causal: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """From log-decays ``gl: (..., C)`` of one chunk: ``between[t, s] = exp(Σ_{s<j<=t} g_j)`` for ``s <= t``
    (0 above the diagonal), ``exp(b_t)`` (decay from the chunk's start), ``exp(Σ_{j>s} g_j)`` (decay to its
    end) and the whole chunk's decay. A factor that is exactly 1 (the diagonal of ``between``, the last
    position's decay to the end) is built without a path to ``g``: as a difference ``b_t - b_t`` its gradient
    would be ``a - a`` summed in a different order, a rounding residue that swamps the true gradient of a
    strong fixed decay (exp(-20) per step: true 4e-8, residue 1e-7)."""
    bc = gl.cumsum(-1)  # (..., C)
    c = gl.shape[-1]
    strict = causal.tril(-1)
    between = (bc[..., :, None] - bc[..., None, :]).masked_fill(~strict, -math.inf).exp()
    between = between + torch.eye(c, dtype=gl.dtype, device=gl.device)
    after = torch.cat([gl[..., 1:].flip(-1).cumsum(-1).flip(-1), gl.new_zeros(*gl.shape[:-1], 1)], dim=-1)
    return between, bc.exp(), after.exp(), bc[..., -1].exp()


def _stable_scores(q: Tensor, k: Tensor, bc: Tensor, causal: Tensor) -> Tensor:
    """``A_ts = Σ_k q_tk k_sk exp(bc_tk - bc_sk)`` for ``s <= t``: ``q, k, bc: (M, C, K)`` -> ``(M, C, C)``."""
    m, c, kd = q.shape
    per = max(1, _STABLE_PIECE // (c * c * kd))
    parts = []
    for qs, ks, bs in zip(q.split(per), k.split(per), bc.split(per), strict=True):
        diff = (bs[:, :, None, :] - bs[:, None, :, :]).masked_fill(~causal[..., None], -math.inf)  # (m, C, C, K)
        parts.append(torch.einsum("mtk,msk,mtsk->mts", qs, ks, diff.exp()))
    return torch.cat(parts)


def linear_recurrence_chunked(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, *,
                              g_gamma: Tensor | None = None, scale: float | None = None,
                              initial_state: Tensor | None = None, output_final_state: bool = False,
                              chunk_size: int = 64) -> tuple[Tensor, Tensor | None]:
    """The chunked recurrence (see the module docstring); equal to `linear_recurrence_reference`."""
    b, t, h, kd, vd = _check(q, k, v, g, g_gamma, initial_state)
    qc, kc, vc, c, n, ct, causal = _chunked_inputs(q, k, v, scale, chunk_size)  # (B, H, N, C, *)
    decay = None  # per chunk, what the carried state is multiplied by
    if g is None and g_gamma is None:
        scores = (qc @ kc.transpose(-1, -2)).masked_fill_(~causal, 0.0)  # (B, H, N, C, C)
        q_in, k_out = qc, kc
    elif g is None or g.dim() == 3:  # one decay per head and step
        if g_gamma is not None:
            gl = g_gamma.to(ct)[None, :, None].expand(b, h, t)
            gl = _chunks(gl.transpose(1, 2)[..., None], n, c, ct)[..., 0]  # (B, H, N, C), padding 0
        else:
            gl = _chunks(g[..., None], n, c, ct)[..., 0]
        between, to_here, to_end, whole = scalar_decays(gl, causal)  # (B, H, N, C, C), (B, H, N, C) ...
        scores = (qc @ kc.transpose(-1, -2)) * between
        q_in = qc * to_here[..., None]
        k_out = kc * to_end[..., None]
        decay = whole[..., None, None]  # (B, H, N, 1, 1)
    else:  # one decay per key channel
        bc = _chunks(g, n, c, ct).cumsum(-2)  # (B, H, N, C, K)
        q_in = qc * bc.exp()
        k_out = kc * (bc[..., -1:, :] - bc).exp()
        decay = bc[..., -1, :].exp()[..., None]  # (B, H, N, K, 1)
        factored = (-bc[..., -1, :]).amax(-1) <= _FACTORED_SPAN  # (B, H, N)
        k_neg = kc * torch.where(factored[..., None, None], -bc, 0.0).exp()
        scores = (q_in @ k_neg.transpose(-1, -2)).masked_fill_(~causal, 0.0)
        if not bool(factored.all()):
            where = (~factored).nonzero(as_tuple=True)
            stable = _stable_scores(qc[where], kc[where], bc[where], causal)
            scores = scores.index_put(where, stable)
    updates = k_out.transpose(-1, -2) @ vc  # (B, H, N, K, V): each chunk's contribution to the state
    state = _initial_state(initial_state, (b, h, kd, vd), q.device, ct)
    if decay is None:  # no decay: the states are a running sum
        entering = torch.cat([state[:, :, None], updates[:, :, :-1]], dim=2).cumsum(2)  # (B, H, N, K, V)
        state = entering[:, :, -1] + updates[:, :, -1]
    else:
        states = []
        for d_c, u_c in zip(decay.unbind(2), updates.unbind(2), strict=True):  # slices taken once: O(T) backward
            states.append(state)
            state = d_c * state + u_c
        entering = torch.stack(states, dim=2)  # (B, H, N, K, V)
    o = q_in @ entering + scores @ vc  # (B, H, N, C, V)
    o = o.movedim(1, 3).reshape(b, n * c, h, vd)[:, :t]
    return o.to(v.dtype), (state if output_final_state else None)


def taylor_features(x: Tensor) -> Tensor:
    """``(..., d) -> (..., 1 + d + d(d+1)/2)``: the features whose dot products are ``1 + s + s²/2`` of
    ``s = x·y / √d``."""
    d = x.shape[-1]
    xs = x / math.sqrt(math.sqrt(d))  # so that pairs of xs carry the 1/√d
    # row i of the upper triangle, x_i · x_{i..d-1}, the diagonal term at 1/√2: slices and products (a gather
    # by index, and its scatter in the backward pass, took a quarter of the layer's time)
    rows = [xs[..., i: i + 1] * torch.cat([xs[..., i: i + 1] / math.sqrt(2), xs[..., i + 1:]], dim=-1)
            for i in range(d)]
    return torch.cat([torch.ones_like(x[..., :1]), xs, *rows], dim=-1)


def taylor_recurrence_chunked(q: Tensor, k: Tensor, v: Tensor, *, initial_state: Tensor | None = None,
                              output_final_state: bool = False, chunk_size: int = 64) -> tuple[Tensor, Tensor | None]:
    """Based's recurrence from raw ``q, k: (B, T, H, d)`` (see the module docstring); the state is over the
    features, ``(B, H, 1 + d + d(d+1)/2, V)``. Equal to `linear_recurrence_reference` of the features."""
    b, t, h, d = check_qkv(q, k, v, None)[:4]
    kd, vd = 1 + d + d * (d + 1) // 2, v.shape[-1]
    if initial_state is not None and initial_state.shape != (b, h, kd, vd):
        raise ValueError(f"initial_state must be (batch, nheads, 1 + d + d(d+1)/2, head_v_dim) = {(b, h, kd, vd)}, "
                         f"got {tuple(initial_state.shape)}")
    qc, kc, vc, c, n, ct, causal = _chunked_inputs(q, k, v, 1.0, chunk_size)  # raw q, k: (B, H, N, C, d)
    s = (qc @ kc.transpose(-1, -2)) * d ** -0.5  # (B, H, N, C, C)
    scores = (1.0 + s + 0.5 * s * s).masked_fill_(~causal, 0.0)
    # the features made in the chunks' layout (contiguous for the matmuls); a padded key's features meet a
    # zero value, so padding adds nothing to the state
    q_in, k_out = taylor_features(qc), taylor_features(kc)  # (B, H, N, C, F)
    updates = k_out.transpose(-1, -2) @ vc  # (B, H, N, F, V)
    state = _initial_state(initial_state, (b, h, kd, vd), q.device, ct)
    entering = torch.cat([state[:, :, None], updates[:, :, :-1]], dim=2).cumsum(2)  # (B, H, N, F, V)
    state = entering[:, :, -1] + updates[:, :, -1]
    o = q_in @ entering + scores @ vc  # (B, H, N, C, V)
    o = o.movedim(1, 3).reshape(b, n * c, h, vd)[:, :t]
    return o.to(v.dtype), (state if output_final_state else None)
