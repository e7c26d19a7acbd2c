"""Misbehaving mixers for the study engine's failure tests (named by import path, not entry points)."""

import os

import torch
from torch import nn

from archs.mixers import Mixer


class Exploding(Mixer):
    """Raises in forward: a trial using it must fail with the error as its reason."""

    def __init__(self, d_model: int, layer_idx: int = 0):
        super().__init__(d_model, layer_idx)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        raise RuntimeError("Exploding mixer: boom")


class Suicidal(Mixer):
    """Kills its own process with SIGKILL, as the kernel's out-of-memory killer would."""

    def __init__(self, d_model: int, layer_idx: int = 0):
        super().__init__(d_model, layer_idx)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        os.kill(os.getpid(), 9)


class FailsWhenLong(Mixer):
    """A causal per-token map that raises on inputs longer than $TOYMIX_FAIL_ABOVE tokens (when set): a trial
    fails at its final, longer evaluation, after checkpoints were written, until the variable is unset."""

    def __init__(self, d_model: int, layer_idx: int = 0):
        super().__init__(d_model, layer_idx)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        limit = os.environ.get("TOYMIX_FAIL_ABOVE")
        if limit and x.shape[1] > int(limit):
            raise RuntimeError(f"FailsWhenLong: {x.shape[1]} tokens")
        return self.proj(x)


class Hoarder(Mixer):
    """A causal per-token map that, at its first forward pass, allocates and keeps a buffer of ``mib`` MiB:
    a known extra cost that a trial's peak memory figure must show."""

    def __init__(self, d_model: int, layer_idx: int = 0, mib: int = 0):
        super().__init__(d_model, layer_idx)
        self.proj = nn.Linear(d_model, d_model)
        self.mib = mib
        self._hoard = None

    def forward(self, x):
        if self._hoard is None:
            self._hoard = torch.ones(self.mib * 2**18)  # float32: mib MiB, touched
        return self.proj(x)
