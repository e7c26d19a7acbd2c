"""Position-wise feed-forward layers: GELU MLP (Vaswani et al. 2017; GPT-2) and SwiGLU (Shazeer 2020)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

MLPS = ("none", "gelu", "swiglu")

__all__ = ["MLPS", "GeluMLP", "SwiGLU", "make_mlp", "mlp_hidden"]


def mlp_hidden(kind: str, d_model: int, ratio: float) -> int:
    """Hidden width: ``ratio * d_model`` for GELU; ``2/3`` of that for SwiGLU (same parameter count),
    rounded up to a multiple of 8."""
    hidden = ratio * d_model * (2 / 3 if kind == "swiglu" else 1)
    return int(-(-hidden // 8) * 8)


class GeluMLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.fc_in = nn.Linear(d_model, hidden, bias=bias)
        self.fc_out = nn.Linear(hidden, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D)
        return self.dropout(self.fc_out(F.gelu(self.fc_in(x))))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.fc_in = nn.Linear(d_model, 2 * hidden, bias=bias)  # [gate, up]
        self.fc_out = nn.Linear(hidden, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D)
        gate, up = self.fc_in(x).chunk(2, dim=-1)
        return self.dropout(self.fc_out(F.silu(gate) * up))


def make_mlp(kind: str, d_model: int, ratio: float = 4.0, bias: bool = False,
             dropout: float = 0.0) -> nn.Module | None:
    if kind == "none":
        return None
    if kind not in MLPS:
        raise ValueError(f"mlp must be one of {MLPS}, got {kind!r}")
    cls = SwiGLU if kind == "swiglu" else GeluMLP
    return cls(d_model, mlp_hidden(kind, d_model, ratio), bias=bias, dropout=dropout)
