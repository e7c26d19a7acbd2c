"""The selective scan of Mamba-1 (S6; Gu & Dao 2023), ``mamba_ssm.selective_scan_fn``'s semantics, on CPU.

Per batch ``b``, channel ``e`` and state ``n``, with ``delta = softplus(delta + delta_bias)`` (when asked):

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t          (state, fp32)
    y_t = <h_t, C_t> + D * u_t;   out_t = y_t * silu(z_t)            (cast back to u's dtype)

Shapes: ``u, delta, z: (B, E, T)``, ``A: (E, N)``, ``B, C: (B, N, T)``, ``D, delta_bias: (E)``; optional
``initial_state: (B, E, N)``; with ``return_last_state`` the final state ``(B, E, N)`` is returned too.

- `selective_scan_reference`: the plain recurrence, one step at a time (the oracle). Per-step slices are
  taken once with ``unbind`` so its autograd graph, and so its backward, stays O(T).
- `selective_scan_chunked`: the fast path, forward and backward. The decay ``exp(delta * A)`` depends on the
  channel and the state, so nothing turns into a matmul (unlike Mamba-2's SSD); the work is elementwise and
  the cost is passes over ``(B, T, N, E)``-sized data. The sequence is cut into chunks small enough for the
  cache: per chunk the decays and inputs are built, the cheap recurrence ``h = dA * h + dBx`` runs in place
  over the chunk, and the output is one batched vector-matrix product with ``C``. Only the state entering each
  chunk is kept for the backward pass, which recomputes the chunk, runs the reverse recurrence for the state
  gradient (``dh_t = C_t dy_t + exp(delta_{t+1} A) * dh_{t+1}``) and contracts it into every input's gradient.
  No log-space cumulative sums: every product of decays is formed by multiplication, so nothing overflows.
  The decays are computed as ``exp2(delta * A * log2(e))`` (torch's exp2 is ~3x faster than exp on CPU;
  relative error ~|delta*A|·6e-8). Memory: O(B·E·T) for inputs and gradients plus O(B·E·N·T/chunk)
  boundary states.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "selective_scan_chunked",
    "selective_scan_reference",
    "selective_scan_step",
]

DEFAULT_CHUNK_SIZE = 16
_BLOCK = 128  # time steps per block of per-step work (see _ChunkedScan)
_LOG2E = 1.0 / math.log(2.0)


def _check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
                  delta_bias: Tensor | None, initial_state: Tensor | None) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, channels, length), got shape {tuple(u.shape)}")
    bsz, e, t = u.shape
    if A.dim() != 2 or A.shape[0] != e:
        raise ValueError(f"A must be (channels={e}, d_state), got shape {tuple(A.shape)}")
    if A.is_complex():
        raise NotImplementedError("complex A is not supported")
    n = A.shape[1]
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    for name, x in (("B", B), ("C", C)):
        if tuple(x.shape) != (bsz, n, t):
            raise ValueError(f"{name} must be (batch, d_state, length) = {(bsz, n, t)}, got {tuple(x.shape)} "
                             f"(only input-dependent B/C with one group are supported)")
    if D is not None and tuple(D.shape) != (e,):
        raise ValueError(f"D must be (channels={e},), got {tuple(D.shape)}")
    if delta_bias is not None and tuple(delta_bias.shape) != (e,):
        raise ValueError(f"delta_bias must be (channels={e},), got {tuple(delta_bias.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (bsz, e, n):
        raise ValueError(f"initial_state must be (batch, channels, d_state) = {(bsz, e, n)}, "
                         f"got {tuple(initial_state.shape)}")


def selective_scan_reference(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                             z: Tensor | None = None, delta_bias: Tensor | None = None,
                             delta_softplus: bool = True, *, initial_state: Tensor | None = None,
                             return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The selective scan as a plain loop over time (the reference). Shapes: see the module docstring."""
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dtype_in = u.dtype
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    bsz, e, t = u.shape
    h = u.new_zeros(bsz, e, A.shape[1]) if initial_state is None else initial_state.float()  # (B, E, N)
    ys = []
    for d_t, u_t, b_t, c_t in zip(delta.unbind(2), u.unbind(2), B.unbind(2), C.unbind(2), strict=True):
        # d_t, u_t: (B, E); b_t, c_t: (B, N)
        h = torch.exp(d_t[:, :, None] * A) * h + (d_t * u_t)[:, :, None] * b_t[:, None, :]  # (B, E, N)
        ys.append(torch.bmm(h, c_t[:, :, None])[:, :, 0])  # (B, E)
    y = torch.stack(ys, dim=2)  # (B, E, T)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    out = y.to(dtype_in)
    return (out, h) if return_last_state else out


def selective_scan_step(h: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                        D: Tensor | None = None, z: Tensor | None = None, delta_bias: Tensor | None = None,
                        delta_softplus: bool = True) -> Tensor:
    """One decoding step, in place on ``h: (B, E, N)`` (fp32): ``u, delta, z: (B, E)``, ``B, C: (B, N)``.

    Returns ``out: (B, E)`` in ``u``'s dtype. Same maths as one step of the scans above.
    """
    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()
    if delta_softplus:
        delta = F.softplus(delta)
    h.mul_(torch.exp(delta[:, :, None] * A.float()))
    h.add_((delta * u)[:, :, None] * B.float()[:, None, :])
    y = torch.bmm(h, C.float()[:, :, None])[:, :, 0]  # (B, E)
    if D is not None:
        y = y + u * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype_in)


class _ChunkedScan(torch.autograd.Function):
    """Chunked selective scan with a hand-written backward.

    Two levels of blocking. A *block* of ``S`` steps (a multiple of the chunk, ~128) holds the per-step
    work on ``(S, B, E)`` tensors — softplus, gating, the skip term, the gradients that need no state — so
    those run as few, cache-sized ops. A *chunk* of ``L`` steps holds the per-state work on ``(L, B, N, E)``
    buffers, allocated once per call, so one time step is one contiguous ``(B, N, E)`` block and
    contractions over ``N`` or ``E`` are batched vector-matrix products. The only sequence-sized tensors
    allocated are the output (forward) and the input gradients (backward); they are stored ``(B, T, E)`` and
    returned as ``(B, E, T)`` views, the layout a Mamba block's linear layers produce and consume.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size, initial_state,
                return_last_state):
        bsz, e, t = u.shape
        n = A.shape[1]
        lc, ls = _block_sizes(chunk_size, t)
        n_chunks = (t + lc - 1) // lc
        f32 = dict(device=u.device, dtype=torch.float32)
        a2 = (A.float().t() * _LOG2E).contiguous()  # (N, E): exp(delta*A) = exp2(delta * A * log2 e)
        bias = delta_bias.float() if delta_bias is not None else None
        d_skip = D.float() if D is not None else None
        dA = torch.empty(lc, bsz, n, e, **f32)  # decays of one chunk
        hs = torch.empty(lc, bsz, n, e, **f32)  # states of one chunk
        du_buf = torch.empty(ls, bsz, e, **f32)
        y_buf = torch.empty(ls, bsz, e, **f32)
        h_in = torch.empty(n_chunks, bsz, n, e, **f32)  # state entering each chunk (kept for backward)
        if initial_state is None:
            h_in[0].zero_()
        else:
            h_in[0].copy_(initial_state.transpose(1, 2))
        out = torch.empty(bsz, t, e, device=u.device, dtype=u.dtype)  # returned as (B, E, T)
        h_last = h_in[0]
        for s0 in range(0, t, ls):
            s1 = min(t, s0 + ls)
            S = s1 - s0
            u_s = _tm(u, s0, s1)  # (S, B, E)
            d_s, _ = _softplus_delta(_tm(delta, s0, s1), bias, delta_softplus, False)
            du_s = torch.mul(d_s, u_s, out=du_buf[:S])
            b_s = _tm(B, s0, s1).contiguous()  # (S, B, N)
            c_s = _tm(C, s0, s1).contiguous()
            y_s = y_buf[:S]
            for i0 in range(0, S, lc):
                i1 = min(S, i0 + lc)
                L = i1 - i0
                ci = (s0 + i0) // lc
                h = _chunk_states(dA[:L], hs[:L], d_s[i0:i1], du_s[i0:i1], b_s[i0:i1], a2, h_in[ci])
                if ci + 1 < n_chunks:
                    h_in[ci + 1].copy_(h)
                elif return_last_state:
                    h_last = h.transpose(1, 2).contiguous()  # (B, E, N)
                _contract_c(c_s[i0:i1], hs[:L], out=y_s[i0:i1])
            if d_skip is not None:
                y_s.addcmul_(u_s, d_skip)
            if z is not None:
                y_s.mul_(F.silu(_tm(z, s0, s1)))
            out[:, s0:s1].copy_(y_s.transpose(0, 1))
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, h_in)
        ctx.delta_softplus = delta_softplus
        ctx.sizes = (lc, ls)
        ctx.has_initial_state = initial_state is not None
        ctx.h0_dtype = None if initial_state is None else initial_state.dtype
        out = out.transpose(1, 2)
        if return_last_state:
            return out, h_last
        return out

    @staticmethod
    def backward(ctx, dout, dlast=None):
        u, delta, A, B, C, D, z, delta_bias, h_in = ctx.saved_tensors
        dout = _time_major(dout)
        bsz, e, t = u.shape
        n = A.shape[1]
        lc, ls = ctx.sizes
        f32 = dict(device=u.device, dtype=torch.float32)
        a2 = (A.float().t() * _LOG2E).contiguous()  # (N, E)
        at = A.float().t().contiguous()  # (N, E)
        bias = delta_bias.float() if delta_bias is not None else None
        d_skip = D.float() if D is not None else None

        d_u = torch.empty(bsz, t, e, device=u.device, dtype=u.dtype)
        d_delta = torch.empty(bsz, t, e, device=u.device, dtype=delta.dtype)
        d_z = torch.empty(bsz, t, e, device=u.device, dtype=z.dtype) if z is not None and ctx.needs_input_grad[6] \
            else None
        d_B = torch.empty(bsz, t, n, device=u.device, dtype=B.dtype)
        d_C = torch.empty(bsz, t, n, device=u.device, dtype=C.dtype)
        d_D = torch.zeros(e, **f32)
        d_bias = torch.zeros(e, **f32)
        dA = torch.empty(lc, bsz, n, e, **f32)
        hs = torch.empty(lc, bsz, n, e, **f32)
        g = torch.empty(lc, bsz, n, e, **f32)
        du_buf, dy_buf, y_buf, gb_buf, dd_buf = (torch.empty(ls, bsz, e, **f32) for _ in range(5))
        db_buf, dc_buf = (torch.empty(ls, bsz, n, **f32) for _ in range(2))
        qd_acc = torch.zeros(lc, bsz, n, e, **f32)  # sum over chunks of q * delta (reduced to dA at the end)
        carry = torch.zeros(bsz, n, e, **f32)  # gradient reaching the state after the current chunk
        if dlast is not None:
            carry.copy_(dlast.transpose(1, 2))
        for s0 in reversed(range(0, t, ls)):
            s1 = min(t, s0 + ls)
            S = s1 - s0
            u_s = _tm(u, s0, s1)  # (S, B, E)
            d_s, sig_s = _softplus_delta(_tm(delta, s0, s1), bias, ctx.delta_softplus, True)
            du_s = torch.mul(d_s, u_s, out=du_buf[:S])
            b_s = _tm(B, s0, s1).contiguous()  # (S, B, N)
            c_s = _tm(C, s0, s1).contiguous()
            dout_s = _tm(dout, s0, s1)
            want_dz = z is not None and ctx.needs_input_grad[6]
            if z is not None:
                z_s = _tm(z, s0, s1)
                sz = torch.sigmoid(z_s)
                dy_s = torch.mul(dout_s, z_s * sz, out=dy_buf[:S])  # gradient of y before the gate
            else:
                dy_s = dy_buf[:S].copy_(dout_s)
            y_s, gb_s, dd_s, db_s, dc_s = y_buf[:S], gb_buf[:S], dd_buf[:S], db_buf[:S], dc_buf[:S]
            for i0 in reversed(range(0, S, lc)):
                i1 = min(S, i0 + lc)
                L = i1 - i0
                ci = (s0 + i0) // lc
                dA_c, hs_c, g_c = dA[:L], hs[:L], g[:L]
                d_c = d_s[i0:i1]  # (L, B, E)
                b_c, c_c = b_s[i0:i1], c_s[i0:i1]  # (L, B, N)
                _chunk_states(dA_c, hs_c, d_c, du_s[i0:i1], b_c, a2, h_in[ci])
                if want_dz:
                    _contract_c(c_c, hs_c, out=y_s[i0:i1])
                # y_t = <h_t, C_t>: dC_t = sum_e dy_t[e] h_t[:, e]
                dy_flat = dy_s[i0:i1].view(L * bsz, 1, e)
                torch.bmm(dy_flat, hs_c.view(L * bsz, n, e).transpose(1, 2), out=dc_s[i0:i1].view(L * bsz, 1, n))
                # dh_t = C_t dy_t + dA_{t+1} * dh_{t+1}, in place over the chunk, newest first
                torch.mul(c_c[:, :, :, None], dy_s[i0:i1, :, None, :], out=g_c)
                gs = g_c.unbind(0)
                das = dA_c.unbind(0)
                gs[L - 1].add_(carry)
                for i in range(L - 2, -1, -1):
                    gs[i].addcmul_(das[i + 1], gs[i + 1])
                # dBx_t = du_t B_t: dB_t = sum_e dh_t[:, e] du_t[e]; d(du_t) = sum_n dh_t[n] B_t[n]
                g_flat = g_c.view(L * bsz, n, e)
                torch.bmm(du_s[i0:i1].view(L * bsz, 1, e), g_flat.transpose(1, 2),
                          out=db_s[i0:i1].view(L * bsz, 1, n))
                torch.bmm(b_c.view(L * bsz, 1, n), g_flat, out=gb_s[i0:i1].view(L * bsz, 1, e))
                # dA_t = exp(delta_t A): with q_t = dh_t * dA_t * h_{t-1}, dA += q delta, d(delta) += sum_n q A
                q = dA_c.mul_(g_c)
                carry.copy_(q[0])
                if L > 1:
                    q[1:].mul_(hs_c[:-1])
                q[0].mul_(h_in[ci])
                qd_acc[:L].addcmul_(q, d_c[:, :, None, :])
                torch.sum(q.mul_(at), 2, out=dd_s[i0:i1])
            # through y = C h + D u, the gate, du = delta u and softplus
            if want_dz:
                if d_skip is not None:
                    y_s.addcmul_(u_s, d_skip)
                dz_s = y_s.mul_(dout_s).mul_(sz).mul_(z_s * (1 - sz) + 1)
                d_z[:, s0:s1].copy_(dz_s.transpose(0, 1))
            dd_s.addcmul_(gb_s, u_s)
            if sig_s is not None:
                dd_s.mul_(sig_s)
            if bias is not None:
                d_bias += dd_s.sum((0, 1))
            d_delta[:, s0:s1].copy_(dd_s.transpose(0, 1))
            if d_skip is not None:
                d_D += (dy_s * u_s).sum((0, 1))
            du_s = gb_s.mul_(d_s)
            if d_skip is not None:
                du_s.addcmul_(dy_s, d_skip)
            d_u[:, s0:s1].copy_(du_s.transpose(0, 1))
            d_B[:, s0:s1].copy_(db_s.transpose(0, 1))
            d_C[:, s0:s1].copy_(dc_s.transpose(0, 1))
        d_A = qd_acc.view(lc * bsz, n * e).sum(0).view(n, e)
        d_h0 = carry.transpose(1, 2).to(ctx.h0_dtype) if ctx.has_initial_state else None
        return (d_u.transpose(1, 2), d_delta.transpose(1, 2), d_A.t().to(A.dtype), d_B.transpose(1, 2),
                d_C.transpose(1, 2), d_D.to(D.dtype) if D is not None else None,
                d_z.transpose(1, 2) if d_z is not None else None,
                d_bias.to(delta_bias.dtype) if delta_bias is not None else None, None, None, d_h0, None)


def _block_sizes(chunk_size: int, t: int) -> tuple[int, int]:
    """Chunk length (state work) and block length (per-step work, a multiple of the chunk)."""
    lc = max(1, min(int(chunk_size), t))
    return lc, lc * max(1, _BLOCK // lc)


def _tm(x: Tensor, t0: int, t1: int) -> Tensor:
    """Time steps ``t0:t1`` of ``x: (B, C, T)`` as a time-major fp32 view ``(L, B, C)``."""
    return x[:, :, t0:t1].permute(2, 0, 1).float()


def _softplus_delta(raw: Tensor, bias: Tensor | None, softplus: bool, want_grad: bool
                    ) -> tuple[Tensor, Tensor | None]:
    """``delta = softplus(raw + bias)`` (threshold 20, like F.softplus) and, if asked, its derivative."""
    if bias is not None:
        raw = raw + bias
    if not softplus:
        return raw, None
    return F.softplus(raw), (torch.sigmoid(raw) if want_grad else None)


def _contract_c(c_c: Tensor, hs: Tensor, out: Tensor) -> Tensor:
    """``y_t[e] = sum_n C_t[n] h_t[n, e]`` for ``c_c: (L, B, N)``, ``hs: (L, B, N, E)`` into ``out: (L, B, E)``."""
    L, bsz, n, e = hs.shape
    torch.bmm(c_c.reshape(L * bsz, 1, n), hs.view(L * bsz, n, e), out=out.view(L * bsz, 1, e))
    return out


def _chunk_states(dA: Tensor, hs: Tensor, d_c: Tensor, du_c: Tensor, b_c: Tensor, a2: Tensor,
                  h0: Tensor) -> Tensor:
    """Fill ``dA`` with the chunk's decays and ``hs`` with its states, both ``(L, B, N, E)``; return the last.

    ``d_c, du_c: (L, B, E)``, ``b_c: (L, B, N)``, ``a2 = A^T log2(e): (N, E)``, ``h0: (B, N, E)``.
    """
    L = dA.shape[0]
    torch.mul(d_c[:, :, None, :], a2, out=dA)
    dA.exp2_()
    torch.mul(b_c[:, :, :, None], du_c[:, :, None, :], out=hs)
    das = dA.unbind(0)
    hss = hs.unbind(0)
    hss[0].addcmul_(das[0], h0)
    for i in range(1, L):
        hss[i].addcmul_(das[i], hss[i - 1])
    return hss[L - 1]


def selective_scan_chunked(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                           z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = True,
                           chunk_size: int = DEFAULT_CHUNK_SIZE, *, initial_state: Tensor | None = None,
                           return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The selective scan, chunked, with a hand-written backward. Same maths as `selective_scan_reference`.

    ``chunk_size`` trades cache locality (small) against Python overhead per chunk (large); it never changes
    the result beyond rounding.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    u, delta = _time_major(u), _time_major(delta)
    z = _time_major(z) if z is not None else None
    return _ChunkedScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size, initial_state,
                              return_last_state)


def _time_major(x: Tensor) -> Tensor:
    """``x: (B, C, T)`` backed by ``(B, T, C)`` memory (a view if it already is, else one copy)."""
    return x if x.stride(1) == 1 else x.transpose(1, 2).contiguous().transpose(1, 2)
