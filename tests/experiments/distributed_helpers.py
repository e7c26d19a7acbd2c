"""What the torch.distributed tests run inside their ranks: a plugin mixer that fails on one rank, and an
entry point that trains a config with ``stop_at`` (``python -m distributed_helpers CONFIG_JSON OUT STOP_AT``,
with this directory on PYTHONPATH)."""

import json
import os
import sys

import torch
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from archs.mixers import Mixer


class BreakingMixer(Mixer):
    """A causal running mean that, on rank ``rank`` and from its ``at``-th training forward on, raises
    (``mode="raise"``) or returns NaN (``mode="nan"``)."""

    def __init__(self, d_model: int, layer_idx: int = 0, rank: int = 1, at: int = 3, mode: str = "raise"):
        super().__init__(d_model, layer_idx)
        self.proj = nn.Linear(d_model, d_model)
        self.rank, self.at, self.mode, self.calls = rank, at, mode, 0

    def forward(self, x):
        self.calls += self.training
        y = self.proj(x).cumsum(dim=1) / torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[None, :, None]
        if self.training and self.calls >= self.at and os.environ.get("RANK") == str(self.rank):
            if self.mode == "raise":
                raise RuntimeError(f"BreakingMixer breaks on rank {self.rank} at forward {self.calls}")
            return y * float("nan")
        return y


@record  # the rank's exception goes to torchrun's error file, and so into the launcher's report
def main() -> None:
    from experiments.config import build_specs
    from experiments.train import train

    config, out, stop_at = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    train(*build_specs(config), out, stop_at=stop_at or None, progress=False)


if __name__ == "__main__":
    main()
