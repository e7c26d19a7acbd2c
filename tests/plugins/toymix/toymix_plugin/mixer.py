"""A minimal third-party mixer: only __init__ and forward, as the plugin guide promises."""

import torch
from torch import nn

from archs.mixers import Mixer


class ToyMixer(Mixer):
    """Causal running mean of a gated projection (a toy plugin mixer)."""

    def __init__(self, d_model: int, layer_idx: int = 0, gate: bool = True):
        super().__init__(d_model, layer_idx)
        self.proj = nn.Linear(d_model, d_model)
        self.gate = nn.Linear(d_model, d_model) if gate else None

    def forward(self, x):  # (B, T, D)
        h = self.proj(x)
        steps = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[None, :, None]
        y = h.cumsum(dim=1) / steps
        return y * torch.sigmoid(self.gate(x)) if self.gate is not None else y
