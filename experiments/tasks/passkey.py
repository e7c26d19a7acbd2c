"""Passkey retrieval, after Mohtashami & Jaggi 2023 ("Landmark Attention"): a short numeric key hidden at a
chosen depth of long filler text must be repeated after a question at the end.

Byte-level, in the corpus tokenizer's vocabulary (`experiments.data.ByteTokenizer`, 261 ids), so a model
trained on a text corpus can be tested on it as it is. One example, in bytes::

    <filler ...> The pass key is 40912. Remember it. 40912 is the pass key. <filler ...>
     What is the pass key? The pass key is 40912

The filler is `filler` repeated, starting at a random offset. The needle sits after ``round(depth * F)``
filler bytes, F being the filler bytes that fit. Inputs are the first ``seq_len`` bytes and targets the
next byte at each of the last ``num_digits`` positions (the key's digits), -100 elsewhere. Training draws
depth uniformly from [0, 1]; test slices: ``seq_len`` x ``depth``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from experiments.data.tokenizer import BYTE_TOKENIZER
from experiments.tasks.base import IGNORE_INDEX, SyntheticTask, check

__all__ = ["FILLER", "Passkey", "PasskeyConfig"]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = " What is the pass key? The pass key is "


@dataclass(frozen=True)
class PasskeyConfig:
    seq_len: int = 512
    num_digits: int = 5
    filler: str = FILLER
    test_seq_lens: tuple[int, ...] | None = None  # default (seq_len, 2 * seq_len, 4 * seq_len)
    test_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    test_examples: int = 32

    def __post_init__(self) -> None:
        check(1 <= self.num_digits <= 18, f"num_digits={self.num_digits} must be in [1, 18]")
        check(len(self.filler.encode()) > 0, "filler must be non-empty text")
        need = self.min_seq_len
        check(
            self.seq_len >= need,
            f"seq_len={self.seq_len} is too short for num_digits={self.num_digits}: the needle, question and key "
            f"take {need} bytes; raise seq_len to at least {need} or lower num_digits",
        )
        if self.test_seq_lens is not None:
            object.__setattr__(self, "test_seq_lens", tuple(self.test_seq_lens))
            check(all(t >= need for t in self.test_seq_lens), f"test_seq_lens={self.test_seq_lens} must be >= {need}")
        object.__setattr__(self, "test_depths", tuple(self.test_depths))
        check(all(0.0 <= d <= 1.0 for d in self.test_depths), f"test_depths={self.test_depths} must be in [0, 1]")
        check(self.test_examples >= 1, f"test_examples={self.test_examples} must be >= 1")

    @property
    def min_seq_len(self) -> int:
        """The shortest seq_len that holds the needle, the question and the key (no filler)."""
        key = "0" * self.num_digits
        return len(NEEDLE.format(key=key).encode()) + len(QUESTION.encode()) + self.num_digits - 1


class Passkey(SyntheticTask):
    """Passkey retrieval in filler text; see the module docstring."""

    name = "passkey"
    Config = PasskeyConfig

    @property
    def vocab_size(self) -> int:
        return BYTE_TOKENIZER.vocab_size

    @property
    def special_ids(self) -> dict[str, int]:
        return {"digits": [ord("0"), ord("9") + 1]}

    def _train_attrs(self) -> dict[str, Any]:
        return {"seq_len": self.config.seq_len, "depth": None}

    def _test_slices(self) -> list[dict[str, Any]]:
        c = self.config
        lens = c.test_seq_lens or (c.seq_len, 2 * c.seq_len, 4 * c.seq_len)
        return [{"seq_len": t, "depth": d} for t in lens for d in c.test_depths]

    def _generate(
        self, batch_size: int, generator: torch.Generator | None, *, seq_len: int, depth: float | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        B, T, D = batch_size, seq_len, c.num_digits
        phrase = c.filler.encode()
        digits = torch.randint(0, 10, (B, D), generator=generator)  # (B, D)
        offsets = torch.randint(0, len(phrase), (B,), generator=generator)
        depths = torch.rand(B, generator=generator, dtype=torch.float64) if depth is None else None
        question = QUESTION.encode()
        rows = np.empty((B, T + 1), dtype=np.int64)
        for b in range(B):
            key = "".join(str(int(d)) for d in digits[b])
            needle = NEEDLE.format(key=key).encode()
            F = T + 1 - len(needle) - len(question) - D  # filler bytes that fit
            off = int(offsets[b])
            stream = (phrase * (F // len(phrase) + 2))[off : off + F]
            d = float(depths[b]) if depth is None else depth
            cut = round(d * F)
            seq = stream[:cut] + needle + stream[cut:] + question + key.encode()
            rows[b] = np.frombuffer(seq, dtype=np.uint8)
        full = torch.from_numpy(rows)  # (B, T+1)
        inputs = full[:, :-1].contiguous()  # (B, T)
        targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        targets[:, T - D :] = full[:, T + 1 - D :]
        return inputs, targets
