"""Induction heads, after the Mamba paper (Gu & Dao 2023, Section 4.1.2 / Table 2: trained at length 256,
tested at 2x, 4x, ... up to 2^20 tokens), the task of Olsson et al. 2022 as set up in H3 (Fu et al. 2023).

A sequence of random tokens holds one trigger token somewhere, followed by the answer token; the trigger
appears again at the very end, where the model must output the answer (the token that followed the first
trigger): ``... [trigger] a ... [trigger] -> a``.

Vocabulary (ids in ``[0, vocab_size)``): ``vocab_size - 1`` the trigger, which appears exactly twice;
content tokens ``[0, vocab_size - 1)``. The first trigger is at a uniform position in ``[0, seq_len - 3]``.
Targets: the answer at the last position, -100 elsewhere. Test slices: ``seq_len`` = train length x 2^k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from experiments.tasks.base import IGNORE_INDEX, SyntheticTask, check

__all__ = ["Induction", "InductionConfig"]


@dataclass(frozen=True)
class InductionConfig:
    vocab_size: int = 16
    seq_len: int = 256
    test_multipliers: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # test lengths: seq_len * each
    test_examples: int = 64

    def __post_init__(self) -> None:
        check(self.vocab_size >= 2, f"vocab_size={self.vocab_size} must be >= 2 (trigger and content)")
        check(self.seq_len >= 3, f"seq_len={self.seq_len} must be >= 3 (trigger, answer, trigger)")
        object.__setattr__(self, "test_multipliers", tuple(self.test_multipliers))
        check(
            len(self.test_multipliers) > 0 and all(isinstance(m, int) and m >= 1 for m in self.test_multipliers),
            f"test_multipliers={self.test_multipliers} must be positive ints",
        )
        check(self.test_examples >= 1, f"test_examples={self.test_examples} must be >= 1")


class Induction(SyntheticTask):
    """Induction heads; see the module docstring."""

    name = "induction"
    Config = InductionConfig

    @property
    def special_ids(self) -> dict[str, int]:
        return {"trigger": self.config.vocab_size - 1}

    def _test_slices(self) -> list[dict[str, Any]]:
        return [{"seq_len": self.config.seq_len * m} for m in self.config.test_multipliers]

    def _generate(
        self, batch_size: int, generator: torch.Generator | None, *, seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, trigger = batch_size, seq_len, self.config.vocab_size - 1
        inputs = torch.randint(0, trigger, (B, T), generator=generator)  # (B, T) content only
        first = torch.randint(0, T - 2, (B, 1), generator=generator)  # (B, 1) in [0, T-3]
        inputs.scatter_(1, first, trigger)
        answer = inputs.gather(1, first + 1)  # (B, 1)
        inputs[:, -1] = trigger
        targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        targets[:, -1:] = answer
        return inputs, targets
