"""What every synthetic task shares: batches with ignore-labels, a fixed test set in slices, accuracy helpers.

Conventions, for every task:

- a sequence is ``inputs`` (B, T) int64 with ids in ``[0, task.vocab_size)``; ``targets`` (B, T) int64 holds
  the id the model must output *at* each position, and `IGNORE_INDEX` (-100) everywhere except the answer
  positions, so ``F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-100)`` trains it;
- the answer at position t may depend on ``inputs[:, :t+1]`` only (causal);
- `train_batch(batch_size, generator)` draws fresh examples; the same generator state gives the same batch;
- `test_set()` is built from a fixed seed: a list of `TaskBatch`, one per slice (a length, a number of
  pairs, a depth, ...), each slice seeded on its own so adding a slice leaves the others unchanged;
- `accuracy_report(outputs, test_set)` gives the accuracy overall, per slice and per slice attribute.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from experiments.errors import MixerlabError
from registry import check_values

__all__ = [
    "IGNORE_INDEX",
    "TEST_SEED",
    "SyntheticTask",
    "TaskBatch",
    "TaskError",
    "accuracy",
    "accuracy_report",
    "as_generator",
    "check",
    "exact_match",
    "make_config",
    "predictions_of",
]

IGNORE_INDEX = -100
TEST_SEED = 20231201


class TaskError(MixerlabError, ValueError):
    """A bad task name, option or argument. The message lists what is valid."""


@dataclass(frozen=True, eq=False)
class TaskBatch:
    """One slice of a test set: inputs and targets (B, T) and the slice's attributes (e.g. ``{"seq_len": 128}``).

    Unpacks like the tuple `train_batch` returns: ``inputs, targets = batch``.
    """

    inputs: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64, IGNORE_INDEX except at answers
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.attrs.items()) or "all"

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.inputs, self.targets))

    def __len__(self) -> int:
        return self.inputs.shape[0]


def as_generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    """A torch.Generator from a generator (used as is), an int seed, or None (torch's global generator)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int):
        return torch.Generator().manual_seed(generator)
    raise TaskError(f"generator must be a torch.Generator, an int seed or None, not {type(generator).__name__}")


def predictions_of(output: torch.Tensor) -> torch.Tensor:
    """Predicted ids (B, T) from logits (B, T, V) (argmax) or from ids (B, T) (as they are)."""
    if output.dim() == 3:
        return output.argmax(dim=-1)
    if output.dim() == 2:
        return output
    raise TaskError(f"expected logits (B, T, V) or predicted ids (B, T), got shape {tuple(output.shape)}")


def _targets_of(batch: TaskBatch | torch.Tensor | tuple) -> torch.Tensor:
    if isinstance(batch, TaskBatch):
        return batch.targets
    if isinstance(batch, tuple | list):
        return batch[1]
    return batch


def _hits(output: torch.Tensor, batch: TaskBatch | torch.Tensor | tuple) -> tuple[torch.Tensor, torch.Tensor]:
    targets = _targets_of(batch)
    preds = predictions_of(output).to(targets.device)
    if preds.shape != targets.shape:
        raise TaskError(f"predictions have shape {tuple(preds.shape)} but the targets {tuple(targets.shape)}")
    mask = targets != IGNORE_INDEX  # (B, T)
    return (preds == targets) & mask, mask


def accuracy(output: torch.Tensor, batch: TaskBatch | torch.Tensor | tuple) -> float:
    """Fraction of answer tokens predicted right. `batch`: a TaskBatch, (inputs, targets), or the targets."""
    hits, mask = _hits(output, batch)
    n = int(mask.sum())
    return float(hits.sum()) / n if n else float("nan")


def exact_match(output: torch.Tensor, batch: TaskBatch | torch.Tensor | tuple) -> float:
    """Fraction of examples whose every answer token is right."""
    hits, mask = _hits(output, batch)
    ok = (hits | ~mask).all(dim=1)  # (B,)
    return float(ok.float().mean()) if ok.numel() else float("nan")


def accuracy_report(outputs: Sequence[torch.Tensor], test_set: Sequence[TaskBatch]) -> dict[str, Any]:
    """Accuracy of `outputs` (one per slice of `test_set`, logits or ids) overall, per slice and per attribute.

    Returns ``{"accuracy", "exact_match", "answers", "examples", "slices": {name: {...}},
    "by": {attribute: {value: accuracy}}}``; token accuracy is pooled over the answers it covers.
    """
    if len(outputs) != len(test_set):
        raise TaskError(f"got {len(outputs)} outputs for a test set of {len(test_set)} slices; pass one per slice")
    totals = {"hits": 0, "answers": 0, "exact": 0, "examples": 0}
    slices: dict[str, dict[str, Any]] = {}
    by: dict[str, dict[Any, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for out, batch in zip(outputs, test_set, strict=True):
        hits, mask = _hits(out, batch)
        h, n = int(hits.sum()), int(mask.sum())
        exact = int((hits | ~mask).all(dim=1).sum())
        slices[batch.name] = {
            "accuracy": h / n if n else float("nan"),
            "exact_match": exact / len(batch),
            "answers": n,
            "examples": len(batch),
            **batch.attrs,
        }
        for key, value in zip(("hits", "answers", "exact", "examples"), (h, n, exact, len(batch)), strict=True):
            totals[key] += value
        for attr, value in batch.attrs.items():
            by[attr][value][0] += h
            by[attr][value][1] += n
    return {
        "accuracy": totals["hits"] / totals["answers"] if totals["answers"] else float("nan"),
        "exact_match": totals["exact"] / totals["examples"] if totals["examples"] else float("nan"),
        "answers": totals["answers"],
        "examples": totals["examples"],
        "slices": slices,
        "by": {a: {v: (h / n if n else float("nan")) for v, (h, n) in sorted(d.items())} for a, d in by.items()},
    }


class SyntheticTask:
    """Base of the tasks: a frozen `Config` dataclass, training batches, a fixed sliced test set, accuracy.

    A task implements `_generate(batch_size, generator, **attrs)` and `_test_slices()`; everything else is here.
    """

    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, config: Any = None, **options: Any) -> None:
        if config is not None and options:
            raise TaskError(f"pass either a {self.Config.__name__} or options, not both")
        if config is None:
            config = make_config(self.Config, options, task=self.name)
        elif not isinstance(config, self.Config):
            raise TaskError(f"{self.name} takes a {self.Config.__name__}, not {type(config).__name__}")
        self.config = config
        self._test_sets: dict[tuple[int, int], list[TaskBatch]] = {}

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def seq_len(self) -> int:
        """The training length T of `train_batch`'s inputs."""
        return self.config.seq_len

    @property
    def special_ids(self) -> dict[str, int]:
        """Named ids with a fixed role in this task (noise, markers, ...)."""
        return {}

    def train_batch(
        self, batch_size: int, generator: torch.Generator | int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh training examples: (inputs, targets), int64 (B, seq_len); targets -100 except at answers."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise TaskError(f"batch_size={batch_size!r} must be a positive integer")
        return self._generate(batch_size, as_generator(generator), **self._train_attrs())

    def _train_attrs(self) -> dict[str, Any]:
        return {"seq_len": self.config.seq_len}

    def _generate(self, batch_size: int, generator: torch.Generator | None, **attrs: Any) -> tuple:
        raise NotImplementedError

    def _test_slices(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def test_slices(self) -> list[dict[str, Any]]:
        """The attributes of each slice of the test set, in order."""
        return self._test_slices()

    def test_set(self, num_examples: int | None = None, seed: int = TEST_SEED) -> list[TaskBatch]:
        """The fixed test set: one `TaskBatch` of `num_examples` (default ``config.test_examples``) per slice."""
        n = self.config.test_examples if num_examples is None else num_examples
        if not isinstance(n, int) or n < 1:
            raise TaskError(f"num_examples={n!r} must be a positive integer")
        if (n, seed) not in self._test_sets:
            batches = []
            for attrs in self._test_slices():
                name = ",".join(f"{k}={v}" for k, v in attrs.items())
                g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
                inputs, targets = self._generate(n, g, **attrs)
                batches.append(TaskBatch(inputs, targets, dict(attrs)))
            self._test_sets[(n, seed)] = batches
        return self._test_sets[(n, seed)]

    accuracy = staticmethod(accuracy)
    exact_match = staticmethod(exact_match)
    accuracy_report = staticmethod(accuracy_report)

    @torch.no_grad()
    def evaluate(
        self,
        predict: Callable[[torch.Tensor], torch.Tensor],
        test_set: Sequence[TaskBatch] | None = None,
        batch_size: int = 64,
    ) -> dict[str, Any]:
        """Run `predict` (inputs (b, T) -> logits (b, T, V) or ids (b, T)) over the test set in chunks; report.
        In a run over several ranks, each predicts its share of the chunks and all get every prediction."""
        from experiments.distributed import map_sharded

        test_set = self.test_set() if test_set is None else test_set
        chunks = [(n, i) for n, batch in enumerate(test_set) for i in range(0, len(batch), batch_size)]
        predicted = map_sharded(lambda c: predictions_of(predict(test_set[c[0]].inputs[c[1]:c[1] + batch_size])),
                                chunks)
        outputs = [torch.cat([p for (n, _), p in zip(chunks, predicted, strict=True) if n == k] or
                             [torch.empty(0, batch.inputs.shape[1], dtype=torch.long)])
                   for k, batch in enumerate(test_set)]
        return accuracy_report(outputs, test_set)

    def describe(self) -> dict[str, Any]:
        """The task, its config and its vocabulary, JSON-ready, for a result to record."""
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.config).items()}
        return {"task": self.name, "config": cfg, "vocab_size": self.vocab_size, "special_ids": self.special_ids}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def make_config(config_cls: type, options: dict[str, Any], *, task: str) -> Any:
    """Build `config_cls(**options)`, naming the valid options when one is unknown."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        valid = ", ".join(
            f"{n}={f.default!r}" if f.default is not dataclasses.MISSING else n for n, f in fields.items()
        )
        raise TaskError(f"unknown option(s) {', '.join(unknown)} for the {task!r} task; its options are {valid}")
    return config_cls(**check_values("data.options.", config_cls, options, TaskError))


def check(condition: bool, message: str) -> None:
    """Raise `TaskError(message)` unless `condition`: config validation in one line."""
    if not condition:
        raise TaskError(message)
