"""Multi-query associative recall (MQAR), after Zoology (Arora et al. 2023, "Zoology: Measuring and
Improving Recall in Efficient Language Models").

A sequence opens with `num_kv_pairs` key-value pairs ``k1 v1 k2 v2 ...``; later each key is queried once,
at a gap after the pairs drawn from a power law (``p(gap = g) ∝ g^(power_a - 1)``, g = 1..space, with
``power_a = 0.01`` most queries come soon after the pairs, a few much later). The model must output the
value at the position of the query key. Keys and values are distinct within a sequence.

Vocabulary (ids in ``[0, vocab_size)``): ``0`` filler; keys ``[1, vocab_size // 2)``; values
``[vocab_size // 2, vocab_size)``. Positions that hold neither a pair nor a query are filler ``0``, or,
with ``random_non_queries`` (the default, as in Zoology's generator; its Figure 2 turns it off), a uniformly
random id of ``[0, vocab_size)``. From a small vocabulary those random ids often repeat a queried key before
its query, with a random token after it — at vocab_size 256 and T/16 pairs before 4.9% / 8.9% / 15.5% of the
queries at T = 64 / 128 / 256 — which a model that keeps the latest association for a key answers wrongly; at
Zoology's 8192 it is 32x rarer. As in Zoology the value never follows its query in the inputs (the next
position is filler or noise).

Targets: the value at each query key's position, -100 elsewhere. Test slices: ``seq_len`` x
``num_kv_pairs`` (every feasible pair of `test_seq_lens` and `test_num_kv_pairs`, 4 * pairs <= seq_len).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from experiments.tasks.base import IGNORE_INDEX, SyntheticTask, check

__all__ = ["MQAR", "MQARConfig"]


def _check_shape(vocab_size: int, seq_len: int, num_kv_pairs: int, what: str) -> None:
    check(num_kv_pairs >= 1, f"{what}: num_kv_pairs={num_kv_pairs} must be >= 1")
    check(
        4 * num_kv_pairs <= seq_len,
        f"{what}: seq_len={seq_len} is too short for num_kv_pairs={num_kv_pairs}: the pairs and their queries "
        f"need 4 * num_kv_pairs = {4 * num_kv_pairs} positions; raise seq_len or lower num_kv_pairs",
    )
    check(
        num_kv_pairs <= vocab_size // 2 - 1,
        f"{what}: vocab_size={vocab_size} has only {vocab_size // 2 - 1} keys for num_kv_pairs={num_kv_pairs} distinct "
        f"keys; raise vocab_size to at least {2 * num_kv_pairs + 2}",
    )


@dataclass(frozen=True)
class MQARConfig:
    vocab_size: int = 8192
    seq_len: int = 64
    num_kv_pairs: int = 4
    power_a: float = 0.01
    random_non_queries: bool = True
    test_seq_lens: tuple[int, ...] | None = None  # default (seq_len, 2 * seq_len, 4 * seq_len)
    test_num_kv_pairs: tuple[int, ...] | None = None  # default (num_kv_pairs, 2x, 4x)
    test_examples: int = 128

    def __post_init__(self) -> None:
        check(self.vocab_size >= 4, f"vocab_size={self.vocab_size} must be >= 4")
        check(0 < self.power_a <= 1, f"power_a={self.power_a} must be in (0, 1]")
        _check_shape(self.vocab_size, self.seq_len, self.num_kv_pairs, "mqar")
        for name in ("test_seq_lens", "test_num_kv_pairs"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(v))
                check(
                    len(v) > 0 and all(isinstance(x, int) and x > 0 for x in v), f"{name}={v} must hold positive ints"
                )
        check(self.test_examples >= 1, f"test_examples={self.test_examples} must be >= 1")


class MQAR(SyntheticTask):
    """Zoology's multi-query associative recall; see the module docstring."""

    name = "mqar"
    Config = MQARConfig

    @property
    def special_ids(self) -> dict[str, int]:
        v = self.config.vocab_size
        return {"filler": 0, "first_key": 1, "first_value": v // 2, "keys": [1, v // 2], "values": [v // 2, v]}

    def _train_attrs(self) -> dict[str, Any]:
        return {"seq_len": self.config.seq_len, "num_kv_pairs": self.config.num_kv_pairs}

    def _test_slices(self) -> list[dict[str, Any]]:
        c = self.config
        lens = c.test_seq_lens or (c.seq_len, 2 * c.seq_len, 4 * c.seq_len)
        pairs = c.test_num_kv_pairs or (c.num_kv_pairs, 2 * c.num_kv_pairs, 4 * c.num_kv_pairs)
        out = [
            {"seq_len": t, "num_kv_pairs": k} for t in lens for k in pairs if 4 * k <= t and k <= c.vocab_size // 2 - 1
        ]
        check(bool(out), f"no feasible test slice among seq_lens {lens} x num_kv_pairs {pairs} (need 4 * pairs <= len)")
        return out

    def _generate(
        self, batch_size: int, generator: torch.Generator | None, *, seq_len: int, num_kv_pairs: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        B, T, K, V = batch_size, seq_len, num_kv_pairs, c.vocab_size
        _check_shape(V, T, K, "mqar")
        half = V // 2
        keys = torch.rand(B, half - 1, generator=generator).argsort(dim=1)[:, :K] + 1  # (B, K) in [1, V/2)
        values = torch.rand(B, V - half, generator=generator).argsort(dim=1)[:, :K] + half  # (B, K) in [V/2, V)
        # query slots: the region after the pairs holds `space` (key, answer) slots; slot g is chosen with
        # probability ∝ (g + 1)^(power_a - 1), K distinct slots per sequence (query i asks keys[:, i])
        space = (T - 2 * K) // 2
        p = c.power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (c.power_a - 1)  # (space,)
        slots = torch.multinomial(p.expand(B, space), K, replacement=False, generator=generator)  # (B, K)
        query_pos = 2 * K + 2 * slots  # (B, K) positions of the query keys in inputs

        inputs = torch.zeros(B, T, dtype=torch.long)  # (B, T)
        inputs[:, 0 : 2 * K : 2] = keys
        inputs[:, 1 : 2 * K : 2] = values
        inputs.scatter_(1, query_pos, keys)
        if c.random_non_queries:
            filler = torch.ones(B, T, dtype=torch.bool)
            filler[:, : 2 * K] = False
            filler.scatter_(1, query_pos, False)
            noise = torch.randint(0, V, (B, T), generator=generator)
            inputs = torch.where(filler, noise, inputs)
        targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        targets.scatter_(1, query_pos, values)
        return inputs, targets
