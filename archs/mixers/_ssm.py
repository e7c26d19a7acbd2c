"""`DiagonalSSM`: a bank of diagonal LTI state-space models, one per channel, as S4D defines them — shared
by ``s4d`` (the whole mixer) and ``h3`` (its diagonal SSM) — with `ShiftSSM`, H3's shift SSM (a learned
FIR filter), and their decoding state.

Per channel ``h`` with ``N/2`` complex modes: ``A = −exp(log_A_real) + i·A_imag``, ``Δ = exp(log_dt)``,
complex ``B`` and ``C``, skip ``D``. Zero-order hold gives ``z = exp(ΔA)``, ``B̄ = (z − 1)/A · B`` and

    y = K * u + D ⊙ u,   K_l = 2 · Re( Σ_n C_n B̄_n z_n^l )      (training: FFT convolution)
    h_t = z ⊙ h_{t−1} + B̄ u_t,   y_t = 2 Re(Σ_n C_n h_{t,n}) + D u_t      (decoding, the same function)

Initialisation: S4D-Lin ``A_n = −1/2 + iπn`` or S4D-Inv ``A_n = −1/2 + i(N/π)(N/(2n+1) − 1)``, ``B = 1``,
``C ~ N(0, 1)`` complex, ``log Δ ~ U(log dt_min, log dt_max)``, ``D ~ N(0, 1)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from archs.ops.causal_conv import causal_conv1d
from archs.ops.diagonal_recurrence import diagonal_recurrence_reference, diagonal_recurrence_step
from archs.ops.long_conv import long_conv_fft, long_conv_flops, long_conv_reference
from archs.ops.ssm_kernel import ssm_kernel, ssm_kernel_reference

__all__ = ["DiagonalSSM", "ShiftSSM", "s4d_init_A"]


def s4d_init_A(channels: int, modes: int, init: str) -> tuple[Tensor, Tensor]:
    """(log of −Re A, Im A), each ``(channels, modes)``, for S4D-Lin (``"lin"``) or S4D-Inv (``"inv"``) with
    N = 2 · modes."""
    n = torch.arange(modes, dtype=torch.float32)
    if init == "lin":
        imag = math.pi * n
    elif init == "inv":
        big_n = 2 * modes
        imag = (big_n / math.pi) * (big_n / (2 * n + 1) - 1)
    else:
        raise ValueError(f"init must be 'lin' or 'inv', got {init!r}")
    return torch.full((channels, modes), math.log(0.5)), imag.expand(channels, -1).clone()


class DiagonalSSM(nn.Module):
    """``channels`` diagonal SSMs of ``d_state`` (N/2 complex modes each); see the module docstring."""

    def __init__(self, channels: int, d_state: int = 64, *, init: str = "lin", dt_min: float = 1e-3,
                 dt_max: float = 1e-1, reference: bool = False):
        super().__init__()
        if d_state < 2 or d_state % 2:
            raise ValueError(f"d_state must be an even int >= 2 (N/2 complex modes), got {d_state!r}")
        self.channels, self.modes, self.reference = channels, d_state // 2, reference
        self.init, self.dt_min, self.dt_max = init, dt_min, dt_max
        self.log_dt = nn.Parameter(torch.empty(channels))
        self.log_A_real = nn.Parameter(torch.empty(channels, self.modes))
        self.A_imag = nn.Parameter(torch.empty(channels, self.modes))
        self.B = nn.Parameter(torch.empty(channels, self.modes, 2))  # complex, as (real, imag)
        self.C = nn.Parameter(torch.empty(channels, self.modes, 2))
        self.D = nn.Parameter(torch.empty(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.log_dt.uniform_(math.log(self.dt_min), math.log(self.dt_max))
            log_re, imag = s4d_init_A(self.channels, self.modes, self.init)
            self.log_A_real.copy_(log_re)
            self.A_imag.copy_(imag)
            self.B.copy_(torch.view_as_real(torch.ones(self.channels, self.modes, dtype=torch.complex64)))
            self.C.copy_(torch.view_as_real(torch.randn(self.channels, self.modes, dtype=torch.complex64)))
            self.D.normal_()
        for p in (self.log_dt, self.log_A_real, self.A_imag, self.B, self.D):
            p._no_weight_decay = True  # type: ignore[attr-defined]

    @property
    def _real(self) -> torch.dtype:
        """The dtype the SSM computes in: float32, or float64 for a float64 module."""
        return torch.promote_types(self.D.dtype, torch.float32)

    @property
    def _complex(self) -> torch.dtype:
        return torch.complex128 if self._real == torch.float64 else torch.complex64

    def discretised(self) -> tuple[Tensor, Tensor, Tensor]:
        """(``ΔA``, ``B̄``, ``C``), complex ``(channels, N/2)`` (complex64; complex128 for a float64 module)."""
        ct = self._real
        a = torch.complex(-torch.exp(self.log_A_real.to(ct)), self.A_imag.to(ct))
        dta = a * torch.exp(self.log_dt.to(ct))[:, None]
        b_bar = torch.expm1(dta) / a * torch.view_as_complex(self.B.to(ct).contiguous())
        return dta, b_bar, torch.view_as_complex(self.C.to(ct).contiguous())

    def kernel(self, length: int) -> Tensor:
        """``K: (channels, length)``, fp32."""
        dta, b_bar, c = self.discretised()
        return (ssm_kernel_reference if self.reference else ssm_kernel)(c * b_bar, dta, length)

    def forward(self, u: Tensor) -> Tensor:
        """``y = K * u + D u`` for ``u: (B, T, channels)``."""
        conv = long_conv_reference if self.reference else long_conv_fft
        return conv(u, self.kernel(u.shape[1])) + u * self.D.to(u.dtype)

    def init_state(self, batch_size: int, device: torch.device | None = None) -> Tensor:
        return torch.zeros(batch_size, self.channels, self.modes, device=device or self.D.device,
                           dtype=self._complex)

    def step(self, u: Tensor, state: Tensor) -> Tensor:
        """The recurrence over ``u: (B, T, channels)`` from ``state: (B, channels, N/2)`` (updated in place);
        returns ``y: (B, T, channels)`` (fp32)."""
        dta, b_bar, c = self.discretised()
        uf = u.to(self._real)
        inputs = b_bar * uf[..., None]  # (B, T, channels, N/2)
        if u.shape[1] == 1:
            states = diagonal_recurrence_step(state, torch.exp(dta), inputs[:, 0])[:, None]
        else:
            bsz, t = u.shape[:2]
            states = diagonal_recurrence_reference(torch.exp(dta).flatten(), inputs.flatten(2), state.flatten(1))
            states = states.view(bsz, t, self.channels, self.modes)
        state.copy_(states[:, -1])
        return 2 * torch.einsum("bthn,hn->bth", states, c).real + uf * self.D.to(uf.dtype)

    def state_bytes(self, batch_size: int) -> int:
        return batch_size * self.channels * self.modes * self._complex.itemsize

    def flops(self, seq_len: int) -> int:
        """Forward FLOPs per token: the kernel (8 per complex multiply-add per mode), the FFT convolution,
        the skip."""
        return 8 * self.channels * self.modes + long_conv_flops(seq_len, self.channels) + 2 * self.channels


class ShiftSSM(nn.Module):
    """H3's shift SSM: ``A`` the shift matrix, so the kernel is ``C`` itself — a learned causal filter of
    ``d_state`` taps per channel — plus a skip ``D``: ``y_t = Σ_{l<N} C_l u_{t−l} + D u_t``. Its decoding
    state is the last ``N − 1`` inputs."""

    def __init__(self, channels: int, d_state: int = 64):
        super().__init__()
        self.channels, self.taps = channels, d_state
        self.C = nn.Parameter(torch.randn(channels, d_state) / math.sqrt(d_state))  # C_l multiplies u_{t-l}
        self.D = nn.Parameter(torch.randn(channels))

    def forward(self, u: Tensor) -> Tensor:
        return causal_conv1d(u, self.C.flip(-1), None, silu=False) + u * self.D.to(u.dtype)

    def step(self, u: Tensor, window: Tensor) -> tuple[Tensor, Tensor]:
        """``u: (B, T, channels)`` after the last ``N − 1`` inputs ``window``; (outputs, the new window)."""
        full = torch.cat([window.to(u.dtype), u], 1)
        y = causal_conv1d(full, self.C.flip(-1), None, silu=False)[:, full.shape[1] - u.shape[1]:]
        return y + u * self.D.to(u.dtype), full[:, full.shape[1] - (self.taps - 1):]

    def flops(self) -> int:
        return 2 * self.channels * (self.taps + 1)
