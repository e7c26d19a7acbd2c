"""The data side of a training run: batches to train on and the one evaluation of each kind.

`build_data(data_spec, train_spec)` gives a `CorpusData` (random training windows of a corpus; validation
loss and bits per byte over its validation split in order) or a `TaskData` (fresh synthetic examples; accuracy
on the task's fixed test set). Both evaluate through one function each — `position_losses` for a corpus,
`SyntheticTask.evaluate` for a task — which the long-context probes reuse at other lengths.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from experiments.distributed import map_sharded

__all__ = ["CorpusData", "TaskData", "build_data", "position_losses"]


@torch.no_grad()
def position_losses(model: Any, corpus: Any, split: str, seq_len: int, batch_size: int,
                    max_batches: int | None, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Summed next-token loss and the number of windows at each position ``(T,)`` (float64), over the
    split's non-overlapping windows of ``seq_len`` in order (at most ``max_batches`` batches)."""
    def losses(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, int]:
        x, y = batch
        logits = model(x.to(device))  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(), reduction="none")
        return loss.view(x.shape).double().sum(0).cpu(), x.shape[0]

    sums = torch.zeros(seq_len, dtype=torch.float64)
    counts = torch.zeros(seq_len, dtype=torch.float64)
    # over several ranks each evaluates its share of the batches; the sums are taken in order on every rank
    for batch_sums, n in map_sharded(losses, list(corpus.eval_batches(split, batch_size, seq_len, max_batches))):
        sums += batch_sums
        counts += n
    return sums, counts


class CorpusData:
    """Random training windows and sequential validation windows of a corpus."""

    kind = "corpus"

    def __init__(self, spec: Any, train: Any):
        from experiments.data import load_corpus

        self.corpus = load_corpus(spec.corpus, tokenizer=spec.tokenizer, **spec.options)
        self.vocab_size = self.corpus.vocab_size
        self.seq_len = train.seq_len
        self.batch_size = train.batch_size
        self.eval_batches = train.eval_batches
        for split in ("train", "val"):  # fail now, not at the first eval
            self.corpus._check_fits(split, train.seq_len, train.batch_size)

    def prepare(self, model_spec: Any) -> None:
        """Everything evaluation needs, made before training (nothing to make for a corpus)."""

    def eval_extent(self) -> tuple[int, int]:
        """The longest evaluation length, and the bytes of a fixed test set (none for a corpus)."""
        return self.seq_len, 0

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return self.corpus.sample_batch("train", batch_size, self.seq_len, generator)

    def evaluate(self, model: Any, device: torch.device, final: bool = True) -> dict[str, float]:
        """Validation loss (nats/token), perplexity and bits per byte over ``eval_batches`` batches."""
        sums, counts = position_losses(model, self.corpus, "val", self.seq_len, self.batch_size,
                                       self.eval_batches, device)
        count = float(counts.sum())
        loss = float(sums.sum()) / count
        bpb = loss / math.log(2) * self.corpus.tokens_per_byte("val")
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_bpb": bpb, "val_tokens": int(count)}

    def describe(self) -> dict[str, Any]:
        return {"corpus": self.corpus.describe(), "unigram_bpb": self.corpus.unigram_bits_per_byte("val")}


class TaskData:
    """Fresh synthetic examples for training; the task's fixed test set for evaluation."""

    kind = "task"

    def __init__(self, spec: Any, train: Any):
        from experiments.tasks import make_task

        options = dict(spec.options)
        options.setdefault("seq_len", train.seq_len)
        self.task = make_task(spec.task, **options)
        self.vocab_size = self.task.vocab_size
        self.seq_len = self.task.seq_len
        self.batch_size = train.batch_size
        self.examples = train.eval_examples

    def eval_extent(self) -> tuple[int, int]:
        """The longest test length, and the bytes of the fixed test set (int64 inputs and targets)."""
        slices = self.task.test_slices()
        n = self.examples or self.task.config.test_examples
        lengths = [int(s.get("seq_len", self.seq_len)) for s in slices]
        return max(lengths, default=self.seq_len), 16 * n * sum(lengths)

    def prepare(self, model_spec: Any) -> None:
        """Build the fixed test set now, so that it is not counted in the training memory."""
        self.task.test_set(self.examples)

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return self.task.train_batch(batch_size, generator)

    def evaluate(self, model: Any, device: torch.device, final: bool = True) -> dict[str, Any]:
        """Accuracy on the fixed test set: every slice at the end, the training-length slices before.

        Slices longer than a model with learned positions can run are not applicable (None in ``by``)."""
        test_set = self.task.test_set(self.examples)
        if not final:
            test_set = [b for b in test_set if b.inputs.shape[1] == self.seq_len] or test_set
        report = self.report(model, device, test_set)
        out = {"accuracy": report["accuracy"], "exact_match": report["exact_match"], "by": report["by"]}
        if report["not_applicable"]:
            out["not_applicable"] = report["not_applicable"]
        return out

    def report(self, model: Any, device: torch.device | str, test_set: list | None = None) -> dict[str, Any]:
        """`SyntheticTask.evaluate` of ``model`` over the slices it can run, with the others named: the
        accuracy report plus ``skipped`` (the slices beyond learned positions) and ``not_applicable`` (why)."""
        test_set = self.task.test_set(self.examples) if test_set is None else test_set
        limit = model.spec.length_limit
        runnable = [b for b in test_set if limit is None or b.inputs.shape[1] <= limit]
        skipped = [b for b in test_set if b not in runnable]

        def predict(inputs: Tensor) -> Tensor:
            return model(inputs.to(device)).argmax(-1).cpu()

        report = self.task.evaluate(predict, runnable, batch_size=self.batch_size)
        for batch in skipped:
            for attr, value in batch.attrs.items():
                report["by"].setdefault(attr, {})[value] = None
        report["skipped"] = skipped
        report["not_applicable"] = (f"inputs longer than max_seq_len={limit} (learned positions)"
                                    if skipped else None)
        return report

    def describe(self) -> dict[str, Any]:
        return {"task": self.task.describe()}


def build_data(spec: Any, train: Any) -> CorpusData | TaskData:
    """The data source a `DataSpec` names (corpus loaded and checked, or task built)."""
    return TaskData(spec, train) if spec.kind == "task" else CorpusData(spec, train)
