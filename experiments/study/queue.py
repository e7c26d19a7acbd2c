"""Which trial a worker runs next, and the recovery of trials whose worker died.

`TrialQueue.claim()` says what to do (`Action`) and takes the trial to run, under one lock per process:
a queued trial (a grid cell, a retry) is taken atomically so two workers never run one cell; a sampled
study asks Optuna for a new trial until the budget counts enough finished ones. `recover` fails the trials
of dead workers (a stale heartbeat on any machine, a dead PID on this one, or no worker recorded long after
the start) and queues their retries.
"""

from __future__ import annotations

import enum
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from experiments.study import ledger
from experiments.study.ledger import RETRY_OF, TrialRecord, read_trials, state_of

__all__ = ["Action", "Counts", "TrialQueue"]


class Action(enum.Enum):
    TAKE = "take a queued trial"
    SAMPLE = "sample a new trial"
    WAIT = "wait: other workers are running the last trials"
    DONE = "nothing left for this worker"


@dataclass(frozen=True)
class Counts:
    complete: int = 0
    pruned: int = 0
    failed: int = 0  # failed for a reason of their own
    running: int = 0
    waiting: int = 0
    interrupted: int = 0  # failed, to be redone (Ctrl-C, a dead worker)

    @property
    def finished(self) -> int:
        """What counts against the budget: complete, pruned and failed trials."""
        return self.complete + self.pruned + self.failed

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _cell_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TrialQueue:
    """The trials of one recipe's study, as this worker sees them.

    Args:
        study: the Optuna study.
        recipe: its `Recipe` (grid cells, budget).
        worker_id: ``host:pid`` recorded on the trials this worker takes.
        grace: seconds after which a RUNNING trial with no worker recorded is taken for dead.
        max_retry: retries of one trial whose worker died, along its chain.
    """

    def __init__(self, study: Any, recipe: Any, *, worker_id: str, grace: float = 180, max_retry: int = 3,
                 log: Callable[[str], None] = print):
        self.study, self.recipe, self.worker_id = study, recipe, worker_id
        self.host = worker_id.rpartition(":")[0]
        self.grace, self.max_retry, self.log = grace, max_retry, log
        self.started = time.time()
        self._lock = threading.Lock()

    def counts(self) -> Counts:
        c = {"complete": 0, "pruned": 0, "failed": 0, "running": 0, "waiting": 0, "interrupted": 0}
        for t in self.study.get_trials(deepcopy=False):
            c[state_of(t)] += 1
        return Counts(**c)

    def next_action(self, stopping: bool = False) -> Action:
        if stopping or (self.recipe.timeout_s and time.time() - self.started > self.recipe.timeout_s):
            return Action.DONE
        c = self.counts()
        if c.waiting:  # grid cells, and retries of failed or interrupted trials
            return Action.TAKE
        if self.recipe.grid:
            return Action.WAIT if c.running else Action.DONE
        budget = self.recipe.trials
        if budget is None or c.finished + c.running < budget:
            return Action.SAMPLE
        return Action.WAIT if c.finished < budget and c.running else Action.DONE

    def take(self, action: Action) -> Any:
        """The trial to run for ``action`` (TAKE or SAMPLE); None when another worker took the queued one
        first. It is not yet marked as this worker's (`claim` does both)."""
        return self.study.ask() if action == Action.SAMPLE else ledger.take_waiting(self.study)

    def claim(self, stopping: bool = False) -> tuple[Action, Any]:
        """`next_action`, and for TAKE or SAMPLE the trial `take` gives, marked as this worker's before
        anything else — one step among this process's workers."""
        with self._lock:
            action = self.next_action(stopping)
            trial = self.take(action) if action in (Action.TAKE, Action.SAMPLE) else None
            if trial is not None:
                ledger.mark_mine(self.study, trial, self.worker_id)
        return action, trial

    def recover(self) -> None:
        """Fail the trials of dead workers and queue their retries: a stale heartbeat (any machine), a dead PID
        on this machine, or no worker recorded long after the trial started (its worker died the moment it
        took the trial, before it could say who it was or beat once)."""
        import datetime

        ledger.fail_stale(self.study)
        now = datetime.datetime.now()
        for r in read_trials(self.study, ("running",)):
            reason = self._dead(r, now)
            if not reason or not ledger.fail_running(self.study, r.number, reason):
                continue  # alive, or another worker got there first
            # queued here, grid or not: a worker (which never enqueues the grid) may be the one to find it
            if ledger.requeue_dead(self.study, ledger.stored(self.study, r.number), self.max_retry, self.log):
                self.log(f"trial {r.number} marked FAIL ({reason}); it will be retried")

    def _dead(self, r: TrialRecord, now: Any) -> str | None:
        """Why a running trial's worker is dead, or None (alive, or not known to be dead)."""
        if r.worker is None:
            if r.datetime_start is None or (now - r.datetime_start).total_seconds() < self.grace:
                return None
            return f"its worker died as it took the trial (no worker recorded {self.grace:g} s after the start)"
        host, _, pid = r.worker.rpartition(":")
        if host != self.host or not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            return None
        return f"worker {r.worker} died"

    def enqueue_grid(self) -> None:
        """Queue every grid cell that has no live or finished trial; a cell whose trial was interrupted is
        queued as its retry (it resumes from that trial's checkpoint)."""
        have, interrupted = set(), {}
        for r in read_trials(self.study):
            key = _cell_key(r.params)
            if r.state != "failed" or r.failed_final:
                have.add(key)
            else:
                interrupted[key] = r.number  # the latest
        for cell in self.recipe.grid_cells():
            key = _cell_key(cell)
            if key not in have:
                attrs = {RETRY_OF: interrupted[key]} if key in interrupted else {}
                ledger.enqueue(self.study, cell, **attrs)

    def queue_failed(self) -> None:
        """Queue once more each trial that failed for a reason of its own and has not been retried yet."""
        records = read_trials(self.study)
        retried = {r.retry_of for r in records}
        for r in records:
            if r.state == "failed" and r.failed_final and r.number not in retried:
                ledger.enqueue(self.study, r.params, **{RETRY_OF: r.number})
                self.log(f"trial {r.number} ({', '.join(f'{k}={v}' for k, v in r.params.items())}) failed: "
                         f"{r.fail_reason}; queued again")

