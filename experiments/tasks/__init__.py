"""Synthetic long-context tasks, generated on the fly from a seed: `TASKS` and `make_task(name, **options)`.

=================  ====================================================  ==========================
task               what the model must do                                test slices
=================  ====================================================  ==========================
``mqar``           recall the value of each queried key (Zoology)        seq_len x num_kv_pairs
``selective_copy`` copy the scattered data tokens, in order (Mamba)      seq_len
``induction``      after the trigger's 2nd occurrence, output the token  seq_len = train length x 2^k
                   that followed its 1st (Mamba, H3)
``passkey``        repeat the digits of a key hidden in filler text      seq_len x depth
=================  ====================================================  ==========================

Shared vocabulary convention: every id is in ``[0, task.vocab_size)`` and a task's fixed-role ids are in
``task.special_ids`` (mqar: 0 filler, keys ``[1, V/2)``, values ``[V/2, V)``; selective_copy: 0 noise, V-1
marker; induction: V-1 trigger; passkey: the byte tokenizer's ids, 261 of them). Build the LanguageModel
with ``vocab_size=task.vocab_size``; train on `train_batch` with cross-entropy and ``ignore_index=-100``;
measure with `task.evaluate(predict)` or `accuracy_report(outputs, task.test_set())`.
"""

from __future__ import annotations

import difflib
from typing import Any

from experiments.tasks.base import (
    IGNORE_INDEX,
    TEST_SEED,
    SyntheticTask,
    TaskBatch,
    TaskError,
    accuracy,
    accuracy_report,
    exact_match,
    predictions_of,
)
from experiments.tasks.induction import Induction, InductionConfig
from experiments.tasks.mqar import MQAR, MQARConfig
from experiments.tasks.passkey import Passkey, PasskeyConfig
from experiments.tasks.selective_copy import SelectiveCopy, SelectiveCopyConfig

__all__ = [
    "IGNORE_INDEX",
    "MQAR",
    "TASKS",
    "TEST_SEED",
    "Induction",
    "InductionConfig",
    "MQARConfig",
    "Passkey",
    "PasskeyConfig",
    "SelectiveCopy",
    "SelectiveCopyConfig",
    "SyntheticTask",
    "TaskBatch",
    "TaskError",
    "accuracy",
    "accuracy_report",
    "exact_match",
    "make_task",
    "predictions_of",
]

TASKS: dict[str, type[SyntheticTask]] = {
    "mqar": MQAR,
    "selective_copy": SelectiveCopy,
    "induction": Induction,
    "passkey": Passkey,
}


def make_task(name: str, **options: Any) -> SyntheticTask:
    """The task `name` built from `options` (its Config's fields); unknown names and options list the valid ones."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=3)
        hint = f" — did you mean {', '.join(map(repr, close))}?" if close else ""
        raise TaskError(f"unknown task {name!r}{hint}; the tasks are {', '.join(TASKS)}")
    return TASKS[name](**options)
