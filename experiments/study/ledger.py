"""What a study stores about its trials, and the only module that touches Optuna's internals.

Each trial carries user attributes (names below): its ``config``, its `TrialSummary` (``summary``) and
long-context measurements (``measure``), why it failed (``fail_reason``) and whether that was its own
failure (``final``: not redone) or an interruption (redone on resume), the trial it ``retry_of`` redoes, the
one whose checkpoint it ``resumed_from``, and the ``worker`` running it. `read_trial` turns a stored trial
into a typed `TrialRecord`; everything that reads trials (the queue, reports) reads them through it.

Storage, heartbeats and atomic claims use Optuna's storage layer (``study._storage``, ``trial._trial_id``,
``optuna.storages._heartbeat``): an Optuna upgrade that moves them breaks this module alone.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from experiments.errors import RecipeError
from experiments.runs import TrialSummary

__all__ = ["TrialRecord", "host_id", "make_storage", "open_study", "read_trial", "read_trials", "requeue_dead",
           "retried_trial"]

CONFIG, SUMMARY, MEASURE, FAIL_REASON, FINAL = "config", "summary", "measure", "fail_reason", "final"
RETRY_OF, RETRY_AFTER, RESUMED_FROM, WORKER = "retry_of", "retry_after", "resumed_from", "worker"
DEAD_WORKER = "dead worker"  # ``retry_after`` of a trial queued because its predecessor's worker died
_STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the study stored it."""

    number: int
    state: str  # complete | pruned | failed | running | waiting
    params: dict[str, Any]
    values: list[float] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    summary: TrialSummary | None = None
    fail_reason: str | None = None
    failed_final: bool = False  # failed for a reason of its own (crash, OOM, timeout, divergence): not redone
    retry_of: int | None = None  # the trial this one redoes (ours, or Optuna's heartbeat retry)
    resumed_from: int | None = None
    worker: str | None = None
    datetime_start: datetime | None = None
    datetime_complete: datetime | None = None
    intermediate: dict[int, float] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state in ("complete", "pruned", "failed")

    @property
    def interrupted(self) -> bool:
        """Failed, but not for a reason of its own (Ctrl-C, a dead worker, a stale heartbeat): redone."""
        return self.state == "failed" and not self.failed_final

    @property
    def last_step(self) -> int | None:
        return max(self.intermediate) if self.intermediate else None


# Every path of ours stores a reason before it fails a trial; Optuna's stale-heartbeat check (`fail_stale`) fails
# it with none, and a finished trial takes no attribute afterwards, so the reason is read as this.
STALE_REASON = "its worker died or hung: its heartbeat went stale (found by Optuna's heartbeat check)"


def read_trial(trial: Any) -> TrialRecord:
    """The `TrialRecord` of an Optuna FrozenTrial (any storage, any version of mixerlab that wrote it)."""
    attrs = trial.user_attrs
    summary = trial.user_attrs.get("summary")  # SUMMARY: the one place a stored summary is read
    state = _STATES.get(trial.state.name, trial.state.name.lower())
    reason = attrs.get(FAIL_REASON) or (STALE_REASON if state == "failed" else None)
    return TrialRecord(
        number=trial.number, state=state,
        params=dict(trial.params or trial.system_attrs.get("fixed_params", {})),
        values=list(trial.values) if trial.values is not None else None, config=attrs.get(CONFIG) or {},
        summary=TrialSummary.from_json(summary, attrs.get(MEASURE)) if summary else None,
        fail_reason=reason, failed_final=bool(attrs.get(FINAL)), retry_of=retried_trial(trial),
        resumed_from=attrs.get(RESUMED_FROM), worker=attrs.get(WORKER), datetime_start=trial.datetime_start,
        datetime_complete=trial.datetime_complete, intermediate=dict(trial.intermediate_values))


def state_of(trial: Any) -> str:
    """complete | pruned | failed | interrupted | running | waiting, of a FrozenTrial (without reading its
    summary): ``failed`` is a failure of its own, ``interrupted`` one that will be redone."""
    state = _STATES.get(trial.state.name, trial.state.name.lower())
    return "interrupted" if state == "failed" and not trial.user_attrs.get(FINAL) else state


def summary_attrs(summary: TrialSummary) -> dict[str, Any]:
    """The user attributes a trial's summary is stored as: ``summary`` (`TrialSummary.to_json` for a study)
    and, when taken, ``measure``."""
    attrs: dict[str, Any] = {SUMMARY: summary.to_json(for_study=True)}
    if summary.measure:
        attrs[MEASURE] = summary.measure
    return attrs


def read_trials(study: Any, states: tuple[str, ...] | None = None) -> list[TrialRecord]:
    """Every trial of ``study`` as a `TrialRecord` (those in ``states`` when given), by number."""
    records = [read_trial(t) for t in study.get_trials(deepcopy=False)]
    return [r for r in records if states is None or r.state in states]


def retried_trial(trial: Any) -> int | None:
    """The number of the trial that ``trial`` (a FrozenTrial) redoes: queued by us (user attr ``retry_of``) or
    by Optuna's heartbeat callback for a dead worker (system attr ``failed_trial``); None for a first run."""
    number = trial.user_attrs.get(RETRY_OF)
    return number if number is not None else trial.system_attrs.get("failed_trial")


# storage ------------------------------------------------------------------------------------------------------
def make_storage(url: str, heartbeat_interval: int | None = 60, grace_period: int | None = None,
                 max_retry: int | None = 3) -> Any:
    """An RDB storage (SQLite or PostgreSQL) with heartbeats and retry of crashed workers' trials."""
    import optuna
    from optuna.storages import RDBStorage

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    if heartbeat_interval:
        kwargs.update(heartbeat_interval=heartbeat_interval, grace_period=grace_period or 2 * heartbeat_interval,
                      heartbeat_stale_trial_callback=_RequeueStale(max_retry))
    try:
        return RDBStorage(url, **kwargs)
    except (ImportError, ModuleNotFoundError) as exc:
        raise RecipeError(f"storage {url.split('://')[0]}: a driver is missing ({exc}); for PostgreSQL "
                          f"pip install 'mixerlab[postgres]' (psycopg 3)") from None
    except optuna.exceptions.StorageInternalError as exc:
        raise RecipeError(f"cannot open storage {url}: {exc}") from None


def open_study(recipe: Any, storage: Any, create: bool = True) -> Any:
    """The recipe's study in ``storage``: created if asked and absent (a concurrent creation is fine)."""
    import optuna

    directions = [d for _, d in recipe.objectives]
    if create:
        try:
            return optuna.create_study(study_name=recipe.study_name, storage=storage, directions=directions,
                                       sampler=recipe.make_sampler(), pruner=recipe.make_pruner(),
                                       load_if_exists=True)
        except optuna.exceptions.DuplicatedStudyError:
            pass  # created concurrently by another worker
    return optuna.load_study(study_name=recipe.study_name, storage=storage, sampler=recipe.make_sampler(),
                             pruner=recipe.make_pruner())


def frozen(study: Any, trial: Any) -> Any:
    """The stored (frozen) state of a live trial."""
    return study._storage.get_trial(trial._trial_id)


def stored(study: Any, number: int) -> Any:
    """The stored (frozen) trial numbered ``number``."""
    storage = study._storage
    return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study._study_id, number))


def take_waiting(study: Any) -> Any:
    """A queued trial taken with one atomic WAITING -> RUNNING update, or None when another worker took it
    first. Unlike ``study.ask()``, losing the race never samples a new trial (a grid cell run twice). Retries
    come first, in the order they were queued (an interrupted trial continues from its checkpoint before a
    new one starts), then the rest in theirs."""
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    waiting = storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.WAITING,))
    for t in sorted(waiting, key=lambda t: retried_trial(t) is None):  # stable: queue order within each
        try:
            if storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                return optuna.trial.Trial(study, t._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def mark_mine(study: Any, trial: Any, worker_id: str) -> None:
    """Beat once and record the worker on a trial just taken, before anything else: a worker that dies from
    here on is found by its PID or its heartbeat (and before it, by the queue's no-worker rule)."""
    from optuna.storages._heartbeat import is_heartbeat_enabled

    if is_heartbeat_enabled(study._storage):
        study._storage.record_heartbeat(trial._trial_id)
    trial.set_user_attr(WORKER, worker_id)


def record_heartbeat(study: Any, trial: Any) -> None:
    study._storage.record_heartbeat(trial._trial_id)


@contextlib.contextmanager
def heartbeat(study: Any, trial: Any) -> Iterator[None]:
    """Beat for ``trial`` while inside (a thread, when the storage has heartbeats)."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    beat = get_heartbeat_thread(trial._trial_id, study._storage)
    beat.start()
    try:
        yield
    finally:
        beat.join()


def fail_stale(study: Any) -> None:
    """Fail the trials whose heartbeat went stale (Optuna's callback then queues their retries)."""
    from optuna.storages import fail_stale_trials

    fail_stale_trials(study)


def fail_running(study: Any, number: int, reason: str) -> bool:
    """Mark a RUNNING trial FAIL with ``reason`` (not its own failure: it will be redone); False when another
    worker finished it first."""
    import optuna
    from optuna.trial import TrialState

    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    try:
        study._storage.set_trial_user_attr(trial_id, FAIL_REASON, reason)
        return study._storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def tell(study: Any, trial: Any, state: str, values: Any = None) -> None:
    """Store a trial's end; raises UpdateFinishedTrialError when another worker finished it meanwhile."""
    import optuna
    from optuna.trial import TrialState

    wanted = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL}[state]
    told = study.tell(trial, values, state=wanted, skip_if_finished=True)
    if told.state != wanted:
        raise optuna.exceptions.UpdateFinishedTrialError


def enqueue(study: Any, params: dict[str, Any], **attrs: Any) -> None:
    study.enqueue_trial(params, user_attrs=attrs or None)


def requeue_dead(study: Any, trial: Any, max_retry: int | None, log: Callable[[str], None] | None = None) -> bool:
    """Queue once more a trial (FrozenTrial, already FAIL) whose worker died, with its parameters and a clean
    set of attributes (``retry_of``), unless it has already been retried ``max_retry`` times for a dead worker
    along its chain of retries (a trial that takes its worker down, e.g. out of memory, is not retried for
    ever). Returns whether it was queued."""
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    deaths, t = 0, trial
    while t is not None and t.user_attrs.get(RETRY_AFTER) == DEAD_WORKER:
        deaths += 1
        t = by_number.get(retried_trial(t))
    if max_retry is not None and deaths >= max_retry:
        if log:
            log(f"trial {trial.number}: its worker died {deaths + 1} times; not retried again (does the trial "
                f"kill its worker, e.g. out of memory?)")
        return False
    params = trial.params or trial.system_attrs.get("fixed_params", {})
    study.enqueue_trial(params, user_attrs={RETRY_OF: trial.number, RETRY_AFTER: DEAD_WORKER})
    return True


class _RequeueStale:
    """Heartbeat callback for a trial whose worker stopped beating: `requeue_dead`. (Optuna's own
    RetryHeartbeatStaleTrialCallback copies the dead trial's user attributes, its worker among them, onto the
    retry, which another worker's PID check could then take for a dead worker's trial.)"""

    def __init__(self, max_retry: int | None):
        self.max_retry = max_retry

    def __call__(self, study: Any, trial: Any) -> None:
        requeue_dead(study, trial, self.max_retry)


def host_id() -> str:
    """This machine and PID namespace: two containers with one hostname but their own PIDs differ here, so
    neither takes the other's live workers for dead ones."""
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return socket.gethostname()
    return f"{socket.gethostname()}#{ns}"
