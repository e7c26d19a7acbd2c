"""The ``sweep`` pruner: within a cell of a grid, stop a setting of the swept parameters (a learning rate)
that has fallen hopelessly behind a sibling — the same cell with other swept values — at the same step.

Optuna's own pruners compare a trial with every other trial of the study; in a grid over mixers, widths and
lengths that prunes a hard cell because an easy one is ahead. This one (an `optuna.pruners.BasePruner`,
asked by Optuna at each reported evaluation) compares a trial only with its siblings: it is pruned at step
``s >= n_warmup_steps`` when some sibling's value at its latest report at or before ``s`` (or its final
value, when it finished earlier — e.g. it reached the target accuracy) beats this trial's by ``margin`` or
more in the objective's direction. A cell's best setting is therefore always trained to the end.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

__all__ = ["SweepPruner"]


class SweepPruner(optuna.pruners.BasePruner):
    def __init__(self, over: Iterable[str], margin: float, n_warmup_steps: int = 0):
        self.over, self.margin, self.n_warmup_steps = frozenset(over), float(margin), int(n_warmup_steps)
        if not self.over:
            raise ValueError("the sweep pruner needs the swept parameters (report.best_over)")

    def _cell(self, trial: FrozenTrial) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((k, repr(v)) for k, v in trial.params.items() if k not in self.over))

    def prune(self, study: optuna.study.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self.n_warmup_steps:
            return False
        value = trial.intermediate_values[step]
        sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
        cell = self._cell(trial)
        states = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED)
        for other in study.get_trials(deepcopy=False, states=states):
            if other.number == trial.number or self._cell(other) != cell:
                continue
            best = _value_at(other, step)
            if best is not None and sign * (best - value) >= self.margin:
                return True
        return False


def _value_at(trial: FrozenTrial, step: int) -> Any:
    """The trial's latest reported value at or before ``step``; a trial that completed earlier: its final
    value (it ended by reaching its target, or its budget)."""
    reported = [s for s in trial.intermediate_values if s <= step]
    if trial.state == TrialState.COMPLETE and trial.value is not None and (not reported or trial.last_step <= step):
        return trial.value
    return trial.intermediate_values[max(reported)] if reported else None
