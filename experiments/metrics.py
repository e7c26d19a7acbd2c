"""The one table of metrics: what each is called, how it is labelled and which way is better.

Recipes name metrics as objectives and constraints, trial summaries record them, reports label their
columns and axes with them. ``peak_memory_mb`` is the old name of ``peak_memory_mib`` (it always held MiB);
recipes and studies that use it still work.
"""

from __future__ import annotations

from dataclasses import dataclass

from experiments.errors import RecipeError
from registry import check_fields

__all__ = ["ALIASES", "CORPUS", "METRICS", "TASK", "Metric", "metric", "metric_names"]

CORPUS, TASK, COST = "corpus", "task", "cost"


@dataclass(frozen=True)
class Metric:
    name: str  # the key in a trial summary (``final`` metrics first, then the summary's own fields)
    what: str  # a phrase: "validation bits per byte"
    axis: str  # a short axis label with its unit: "peak memory (MiB)"
    unit: str  # "bits/byte", "MiB", "" (a plain number)
    direction: str  # "minimize" | "maximize": the default when a recipe does not say
    kind: str  # "corpus" (needs a corpus run), "task" (needs a task run) or "cost" (any run)

    @property
    def label(self) -> str:
        """``validation bits per byte (bits/byte)``."""
        return f"{self.what} ({self.unit})" if self.unit else self.what


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("val_bpb", "validation bits per byte", "validation bits per byte", "bits/byte", "minimize", CORPUS),
    Metric("val_loss", "validation loss", "validation loss (nats/token)", "nats/token", "minimize", CORPUS),
    Metric("val_ppl", "validation perplexity", "validation perplexity", "", "minimize", CORPUS),
    Metric("accuracy", "task test accuracy", "test accuracy", "", "maximize", TASK),
    Metric("exact_match", "task exact-match accuracy", "exact-match accuracy", "", "maximize", TASK),
    Metric("peak_memory_mib", "peak training memory above baseline", "peak memory (MiB)", "MiB", "minimize", COST),
    Metric("params", "parameters", "parameters", "", "minimize", COST),
    Metric("tokens_per_s", "training throughput", "throughput (tokens/s)", "tokens/s", "maximize", COST),
    Metric("train_seconds", "training time", "training time (s)", "s", "minimize", COST),
    Metric("flops_per_token", "forward FLOPs per token", "FLOPs per token", "FLOP", "minimize", COST),
)}
ALIASES = {"peak_memory_mb": "peak_memory_mib"}


def metric(name: str) -> Metric:
    """The metric called ``name`` (or an old alias of it); an unknown name lists the known ones."""
    name = ALIASES.get(name, name)
    if name not in METRICS:
        check_fields("metrics", [name], METRICS, RecipeError)
    return METRICS[name]


def metric_names() -> list[str]:
    """Every name a recipe may use: the metrics and their aliases."""
    return [*METRICS, *ALIASES]
