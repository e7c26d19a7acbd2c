"""Misbehaving mixers for the study engine's failure tests (named by import path, not entry points)."""

import os

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
