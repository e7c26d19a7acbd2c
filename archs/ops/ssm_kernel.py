"""The convolution kernel of a diagonal LTI state-space model (S4D's, and H3's diagonal SSM): per channel
``h`` with complex modes ``n`` (one of each conjugate pair kept),

    K[h, l] = 2 · Re( sum_n coef[h, n] · exp(dtA[h, n] · l) ),   l = 0 .. L-1

(S4D with zero-order hold: ``coef = C · B · (exp(dtA) − 1) / A``; the factor 2 adds the conjugate modes).

- `ssm_kernel_reference`: the Vandermonde matrix ``exp(dtA · l)`` of shape ``(H, N, L)`` made whole (the
  oracle: memory H·N·L complex numbers);
- `ssm_kernel`: the same product with the powers split as ``l = j·S + i`` (``S = ceil(sqrt(L))``):
  ``exp(dtA·l) = exp(dtA·j·S) · exp(dtA·i)``, so the kernel is one batched complex matrix product of an
  ``(H, L/S, N)`` and an ``(H, N, S)`` factor — H·N·L multiply-adds, but O(H·N·sqrt(L)) memory and
  exponentials, and torch's autograd through the product saves only the two small factors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ssm_kernel", "ssm_kernel_reference"]


def _check(coef: Tensor, dtA: Tensor, length: int) -> None:
    if coef.shape != dtA.shape or coef.dim() != 2 or not (coef.is_complex() and dtA.is_complex()):
        raise ValueError(f"coef and dtA must be complex (channels, modes) of one shape, got "
                         f"{tuple(coef.shape)} {coef.dtype} and {tuple(dtA.shape)} {dtA.dtype}")
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")


def ssm_kernel_reference(coef: Tensor, dtA: Tensor, length: int) -> Tensor:
    """``K: (H, L)`` real, from the whole Vandermonde matrix."""
    _check(coef, dtA, length)
    pos = torch.arange(length, device=dtA.device, dtype=dtA.real.dtype)
    return 2 * torch.einsum("hn,hnl->hl", coef, torch.exp(dtA[..., None] * pos)).real


def ssm_kernel(coef: Tensor, dtA: Tensor, length: int) -> Tensor:
    """``K: (H, L)`` real, by the factored Vandermonde product (see the module docstring)."""
    _check(coef, dtA, length)
    s = max(1, math.isqrt(length - 1) + 1)  # ceil(sqrt(L))
    n_blocks = -(-length // s)
    real = dtA.real.dtype
    inner = torch.exp(dtA[..., None] * torch.arange(s, device=dtA.device, dtype=real))  # (H, N, S)
    outer = torch.exp(dtA[:, None, :] * (s * torch.arange(n_blocks, device=dtA.device, dtype=real))[:, None])
    k = torch.bmm(coef[:, None, :] * outer, inner)  # (H, L/S, S)
    return 2 * k.real.flatten(1)[:, :length]
