"""Normalisation layers: RMSNorm (Zhang & Sennrich 2019) and LayerNorm (Ba et al. 2016)."""

from __future__ import annotations

from torch import nn

NORMS = ("rmsnorm", "layernorm")

__all__ = ["NORMS", "make_norm"]


def make_norm(kind: str, d_model: int, eps: float = 1e-5, bias: bool = False) -> nn.Module:
    """A norm over the last dimension: ``"rmsnorm"`` or ``"layernorm"``."""
    if kind == "rmsnorm":
        return nn.RMSNorm(d_model, eps=eps)
    if kind == "layernorm":
        return nn.LayerNorm(d_model, eps=eps, bias=bias)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
