"""Selective copying, after the Mamba paper (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with
Selective State Spaces", Section 3.1 and Figure 2).

`num_data_tokens` data tokens are scattered, in order, at random positions of a region of noise; then as
many marker tokens follow, and at the i-th marker the model must output the i-th data token. Unlike plain
copying the gaps vary, so a model must select by content, not by a fixed time offset.

Vocabulary (ids in ``[0, vocab_size)``): ``0`` noise; ``vocab_size - 1`` the marker; data tokens
``[1, vocab_size - 1)`` (drawn with replacement). Layout of the inputs (length ``seq_len``): a region of
``seq_len - num_data_tokens`` positions, then ``num_data_tokens`` markers. Targets: the data tokens in order
at the marker positions, -100 elsewhere. Test slices: ``seq_len`` (the region grows, the data stays).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from experiments.tasks.base import IGNORE_INDEX, SyntheticTask, check

__all__ = ["SelectiveCopy", "SelectiveCopyConfig"]


@dataclass(frozen=True)
class SelectiveCopyConfig:
    vocab_size: int = 16
    seq_len: int = 256
    num_data_tokens: int = 16
    test_seq_lens: tuple[int, ...] | None = None  # default (seq_len, 2 * seq_len, 4 * seq_len)
    test_examples: int = 128

    def __post_init__(self) -> None:
        check(self.vocab_size >= 3, f"vocab_size={self.vocab_size} must be >= 3 (noise, marker, one data token)")
        check(self.num_data_tokens >= 1, f"num_data_tokens={self.num_data_tokens} must be >= 1")
        check(
            self.seq_len >= 2 * self.num_data_tokens,
            f"seq_len={self.seq_len} must be >= 2 * num_data_tokens = {2 * self.num_data_tokens} "
            f"(a region holding the data, then one marker per data token)",
        )
        if self.test_seq_lens is not None:
            object.__setattr__(self, "test_seq_lens", tuple(self.test_seq_lens))
            check(
                len(self.test_seq_lens) > 0 and all(t >= 2 * self.num_data_tokens for t in self.test_seq_lens),
                f"test_seq_lens={self.test_seq_lens} must each be >= 2 * num_data_tokens",
            )
        check(self.test_examples >= 1, f"test_examples={self.test_examples} must be >= 1")


class SelectiveCopy(SyntheticTask):
    """The Mamba paper's selective copying; see the module docstring."""

    name = "selective_copy"
    Config = SelectiveCopyConfig

    @property
    def special_ids(self) -> dict[str, int]:
        return {"noise": 0, "marker": self.config.vocab_size - 1}

    def _test_slices(self) -> list[dict[str, Any]]:
        c = self.config
        return [{"seq_len": t} for t in (c.test_seq_lens or (c.seq_len, 2 * c.seq_len, 4 * c.seq_len))]

    def _generate(
        self, batch_size: int, generator: torch.Generator | None, *, seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, K, V = batch_size, self.config.num_data_tokens, self.config.vocab_size
        R = seq_len - K  # region length
        data = torch.randint(1, V - 1, (B, K), generator=generator)  # (B, K)
        pos = torch.rand(B, R, generator=generator).argsort(dim=1)[:, :K].sort(dim=1).values  # (B, K) increasing
        region = torch.zeros(B, R, dtype=torch.long).scatter_(1, pos, data)  # (B, R)
        markers = torch.full((B, K), V - 1, dtype=torch.long)
        inputs = torch.cat([region, markers], dim=1)  # (B, T)
        targets = torch.cat([torch.full((B, R), IGNORE_INDEX, dtype=torch.long), data], dim=1)  # (B, T)
        return inputs, targets
