"""The delta rule, with an optional scalar decay per head (DeltaNet, Gated DeltaNet), in plain PyTorch.

Per head, with a state ``S: (K, V)`` carried in fp32, a write strength ``β_t`` and a log-decay ``g_t <= 0``:

    S_t = exp(g_t) (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ
    o_t = scale · S_tᵀ q_t

Shapes (flash-linear-attention's layout): ``q, k: (B, T, H, K)`` (normalised by the caller, e.g. L2),
``v: (B, T, H, V)``, ``beta: (B, T, H)``, ``g: (B, T, H)`` or None (no decay), states ``(B, H, K, V)``;
``scale`` defaults to ``K ** -0.5``. Both functions return ``(o, final_state)``.

- `delta_rule_reference`: the recurrence one token at a time (the oracle).
- `delta_rule_chunked`: the chunkwise form of Yang et al. 2024 ("Parallelizing Linear Transformers with the
  Delta Rule over Sequence Length"). Writing ``S_t = γ_t S_0 + Σ_{s<=t} (γ_t/γ_s) k_s u_sᵀ`` within a chunk
  (``γ_t = exp(b_t)``, ``b`` the cumulative log-decay from the chunk's start), the pseudo-values ``u`` solve
  the unit lower-triangular system ``(I + diag(β) L) U = diag(β) (V - diag(γ) K S_0)`` with
  ``L_ts = (γ_t/γ_s) k_t·k_s`` for ``s < t`` (the UT transform, one ``solve_triangular`` per chunk, batched).
  So ``U = Ũ - W S_0`` with ``Ũ, W`` known before any state: only ``W S_0`` and the state update
  ``S_C = γ_C S_0 + Σ_s (γ_C/γ_s) k_s u_sᵀ`` run chunk after chunk; the outputs
  ``o = diag(γ) Q S_0 + (Q Kᵀ ⊙ Γ) U`` are then one batched matmul. Every exponent is ``b_t - b_s <= 0``:
  finite for any gate. T is padded to a multiple of the chunk with ``β = 0, g = 0`` (no write, no decay).
  Memory is linear in T; the backward pass is autograd's through the matmuls and the triangular solve.
"""

from __future__ import annotations

import torch
from torch import Tensor

from archs.ops.linear_recurrence import (
    _chunked_inputs,
    _chunks,
    _compute_dtype,
    _initial_state,
    check_qkv,
    scalar_decays,
)

__all__ = ["delta_rule_chunked", "delta_rule_reference"]


def _check(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None,
           initial_state: Tensor | None) -> tuple[int, int, int, int, int]:
    b, t, h, kd, vd = check_qkv(q, k, v, initial_state)
    if beta.shape != (b, t, h):
        raise ValueError(f"beta must be (batch, seqlen, nheads) = {(b, t, h)}, got {tuple(beta.shape)}")
    if g is not None and g.shape != (b, t, h):
        raise ValueError(f"g must be (batch, seqlen, nheads) = {(b, t, h)}, got {tuple(g.shape)}")
    return b, t, h, kd, vd


def delta_rule_reference(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None, *,
                         scale: float | None = None, initial_state: Tensor | None = None,
                         output_final_state: bool = False) -> tuple[Tensor, Tensor | None]:
    """The recurrence one step at a time (see the module docstring for shapes)."""
    b, t, h, kd, vd = _check(q, k, v, beta, g, initial_state)
    ct = _compute_dtype(v)
    scale = kd ** -0.5 if scale is None else scale
    state = _initial_state(initial_state, (b, h, kd, vd), q.device, ct)
    gates = [None] * t if g is None else g.to(ct).unbind(1)
    outs = []
    for q_t, k_t, v_t, b_t, g_t in zip(q.to(ct).unbind(1), k.to(ct).unbind(1), v.to(ct).unbind(1),
                                       beta.to(ct).unbind(1), gates, strict=True):
        if g_t is not None:
            state = g_t.exp()[..., None, None] * state
        u = b_t[..., None] * (v_t - torch.einsum("bhk,bhkv->bhv", k_t, state))  # (B, H, V)
        state = state + k_t[..., :, None] * u[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q_t * scale, state))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(b, 0, h, vd, dtype=ct)
    return o.to(v.dtype), (state if output_final_state else None)


def delta_rule_chunked(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None, *,
                       scale: float | None = None, initial_state: Tensor | None = None,
                       output_final_state: bool = False, chunk_size: int = 64) -> tuple[Tensor, Tensor | None]:
    """The chunkwise delta rule (see the module docstring); equal to `delta_rule_reference`."""
    b, t, h, kd, vd = _check(q, k, v, beta, g, initial_state)
    qc, kc, vc, c, n, ct, causal = _chunked_inputs(q, k, v, scale, chunk_size)  # (B, H, N, C, *)
    bt = _chunks(beta[..., None], n, c, ct)[..., 0]  # (B, H, N, C)
    strict = causal.tril(-1)
    if g is None:
        between = causal.to(ct)
        k_in, k_out, q_in, decay = kc, kc, qc, None
    else:
        between, to_here, to_end, whole = scalar_decays(_chunks(g[..., None], n, c, ct)[..., 0], causal)
        k_in, q_in = kc * to_here[..., None], qc * to_here[..., None]
        k_out = kc * to_end[..., None]
        decay = whole[..., None, None]  # (B, H, N, 1, 1)
    lower = (kc @ kc.transpose(-1, -2) * between).masked_fill_(~strict, 0.0)  # L, (B, H, N, C, C)
    system = lower * bt[..., :, None] + torch.eye(c, dtype=ct, device=q.device)
    rhs = torch.cat([vc, k_in], dim=-1) * bt[..., None]  # diag(β) [V | diag(γ) K]
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u_known, w = solved.split([vd, kd], dim=-1)  # Ũ (B, H, N, C, V), W (B, H, N, C, K)
    state = _initial_state(initial_state, (b, h, kd, vd), q.device, ct)
    scores = (qc @ kc.transpose(-1, -2)) * between  # (B, H, N, C, C), causal incl. the diagonal
    # chunk after chunk: the pseudo-values, the outputs and the state. Per-chunk slices are taken once
    # (indexing inside the loop would make autograd build a full-size zero gradient for every chunk), and the
    # outputs are made here rather than from a stack of every entering state (one (K, V) state per chunk kept
    # once, for autograd, instead of twice).
    outs = []
    decays = [None] * n if decay is None else decay.unbind(2)
    for u_c, w_c, k_c, q_c, s_c, d_c in zip(u_known.unbind(2), w.unbind(2), k_out.transpose(-1, -2).unbind(2),
                                            q_in.unbind(2), scores.unbind(2), decays, strict=True):
        u = u_c - w_c @ state  # (B, H, C, V)
        outs.append(q_c @ state + s_c @ u)
        state = (state if d_c is None else d_c * state) + k_c @ u
    o = torch.stack(outs, dim=2)  # (B, H, N, C, V)
    o = o.movedim(1, 3).reshape(b, n * c, h, vd)[:, :t]
    return o.to(v.dtype), (state if output_final_state else None)
