"""`StudyRunner`: runs a recipe's trials against a storage, ``jobs`` trial processes at a time.

**Storage**: a SQLite file in the run directory by default, written only by the coordinator process (its
``--jobs`` threads each watch one trial process); PostgreSQL (``--storage postgresql://…``) for many workers
on many machines (``create=False`` joins a study another process created). Heartbeats mark the trials of a
dead worker FAIL and queue a retry with the same parameters; on one machine a dead coordinator's trials are
found by PID at the next start.

**Resume**: rerunning a recipe continues its study. Grid cells are enqueued once and each runs exactly once
(a cell is redone only if its trial was interrupted or its worker died); sampled studies run until the
budget counts enough finished trials (complete, pruned, or failed for a reason of their own). A redone
trial starts from the last checkpoint of the one it replaces when that trial's directory is on this machine
and its configuration is unchanged. ``retry_failed`` (``--retry-failed``) queues once more each trial that
failed for a reason of its own, e.g. after fixing that reason; the failed trial stays in the study.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments import trackers
from experiments.child import Isolation
from experiments.errors import RecipeError
from experiments.runs import write_json
from experiments.study import ledger
from experiments.study.queue import Action, TrialQueue
from experiments.study.recipe import Recipe
from experiments.study.trial import Outcome, TrialProcess

__all__ = ["StudyRunner"]


class StudyRunner:
    """Runs a recipe's trials against a storage, ``jobs`` trial subprocesses at a time.

    Args:
        recipe: the validated recipe.
        out_dir: the run directory (trial directories, the SQLite file by default, reports).
        storage: a storage URL; default ``sqlite:///<out_dir>/study.db``.
        jobs: trial subprocesses run in parallel by this process (default: the recipe's ``trial.jobs``).
        heartbeat: (interval, grace period) in seconds; production intervals should be >= 60 s.
        retry_failed: queue once more every trial that failed for a reason of its own (after a fix).
    """

    def __init__(self, recipe: Recipe, out_dir: str | os.PathLike, storage: str | None = None, jobs: int | None = None,
                 heartbeat: tuple[int, int] = (60, 180), progress: bool = True, log: Any = None,
                 retry_failed: bool = False):
        jobs = recipe.jobs if jobs is None else jobs
        if jobs < 1:
            raise RecipeError(f"jobs must be >= 1, got {jobs}")
        self.recipe, self.out, self.jobs = recipe, Path(out_dir), jobs
        self._trackers_lock = threading.Lock()
        self.storage_url = storage or f"sqlite:///{(self.out / 'study.db').resolve()}"
        self.heartbeat, self.progress, self.retry_failed = heartbeat, progress, retry_failed
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._running: dict[int, TrialProcess] = {}
        self.worker_id = f"{ledger.host_id()}:{os.getpid()}"
        self.max_retry = 3  # retries of one trial whose worker died, along its chain

    def _check_out_dir(self) -> None:
        """Refuse a directory holding a different recipe's study (before anything is written)."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "recipe.json"
        mine = self.recipe.to_dict()
        if path.exists():
            # a field newer than the study: the study ran with its default
            theirs = {**_recipe_defaults(), **json.loads(path.read_text())}
            for key in ("source", *_EXECUTION):  # not what the trials compute: a resume may change them
                theirs.pop(key, None)
            mine = {k: v for k, v in mine.items() if k not in _EXECUTION and k != "source"}
            if theirs != mine:
                changed = sorted(k for k in mine if theirs.get(k) != mine.get(k))
                raise RecipeError(f"{self.out} holds a study of a different recipe (fields differ: "
                                  f"{', '.join(changed)}); use another --out directory — nothing was changed")
        write_json(path, self.recipe.to_dict())

    def open(self, create: bool = True, wait_s: float = 120.0) -> Any:
        """Open (or create) the study; a worker waits up to ``wait_s`` for its coordinator to create it."""
        import warnings

        import optuna

        # we drive heartbeats and stale-trial recovery ourselves around ask/tell, on purpose
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours (see store)
        self._check_out_dir()
        self.storage = ledger.make_storage(self.storage_url, *self.heartbeat, max_retry=self.max_retry)
        deadline = time.time() + wait_s
        while True:
            try:
                self.study = ledger.open_study(self.recipe, self.storage, create=create)
                break
            except KeyError:  # a worker started before the coordinator created the study
                if time.time() > deadline:
                    raise RecipeError(f"no study {self.recipe.study_name!r} in {self.storage_url} after "
                                      f"{wait_s:.0f} s; start `mixerlab study run` for it first") from None
                time.sleep(1.0)
        self.study.set_metric_names([m for m, _ in self.recipe.objectives])
        self.queue = TrialQueue(self.study, self.recipe, worker_id=self.worker_id,
                                grace=self.heartbeat[1] if self.heartbeat else 180, max_retry=self.max_retry,
                                log=self.log)
        return self.study

    def counts(self) -> dict[str, int]:
        return self.queue.counts().as_dict()

    def run(self, create: bool = True) -> dict[str, int]:
        """Run trials until the budget is met (or Ctrl-C / SIGTERM); returns the final trial counts."""
        self.open(create=create)
        self.queue.recover()
        if self.retry_failed:
            self.queue.queue_failed()
        if self.recipe.grid and create:
            self.queue.enqueue_grid()
        self.queue.started = time.time()
        bar = self._bar()
        # Workers report their end through events, not Thread.join: a KeyboardInterrupt landing inside join()
        # can leave CPython (< 3.12) believing the thread has ended, and the trials it runs would never be
        # marked interrupted.
        ended = [threading.Event() for _ in range(self.jobs)]

        def work(done: threading.Event) -> None:
            try:
                self._loop(bar)
            finally:
                done.set()

        for done in ended:
            threading.Thread(target=work, args=(done,), daemon=True).start()
        restore = _sigterm_interrupts()
        try:
            while not all(done.is_set() for done in ended):
                time.sleep(0.2)
        except KeyboardInterrupt:
            self.log("interrupted: stopping running trials (rerun the same command to resume)")
            self._stop.set()
            with self._lock:
                running = list(self._running.values())
            for process in running:
                process.terminate()
            deadline = time.time() + 30
            while not all(done.is_set() for done in ended) and time.time() < deadline:
                time.sleep(0.1)
            raise
        finally:
            restore()
            if bar is not None:
                bar.close()
        return self.counts()

    def _bar(self) -> Any:
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        total = len(self.recipe.grid_cells()) if self.recipe.grid else self.recipe.trials
        return tqdm(total=total, initial=self.queue.counts().finished, unit="trial", desc=self.recipe.study_name,
                    dynamic_ncols=True)

    def _loop(self, bar: Any) -> None:
        last_recover = time.time()
        while True:
            action, trial = self.queue.claim(self._stop.is_set())
            if action == Action.DONE:
                return
            if trial is None:
                if action == Action.WAIT:  # others are running: look for dead workers now and then
                    if time.time() - last_recover > max(1, self.heartbeat[0] if self.heartbeat else 5):
                        self.queue.recover()
                        last_recover = time.time()
                    self._stop.wait(1.0)
                else:  # another worker took the queued trial first: look again
                    self._stop.wait(0.05)
                continue
            try:
                self.run_trial(trial)
            except Exception as exc:  # storage trouble: this trial is lost to this worker, not the others
                self.log(f"trial {trial.number}: {type(exc).__name__}: {exc}")
            if bar is not None:
                bar.update(1)

    def run_trial(self, trial: Any) -> None:
        """Run one taken trial and store its outcome. A trial that another worker finished meanwhile (its
        heartbeat went stale) is left as that worker stored it; its retry redoes it."""
        import optuna

        with ledger.heartbeat(self.study, trial):  # beats until the outcome is stored
            try:
                try:
                    outcome = self._execute(trial)
                except optuna.exceptions.UpdateFinishedTrialError:
                    raise
                except Exception as exc:  # a bug or storage trouble here must not take the other workers down
                    outcome = Outcome("failed", f"coordinator error: {type(exc).__name__}: {exc}")
                self.store(trial, outcome)
            except optuna.exceptions.UpdateFinishedTrialError:
                self.log(f"trial {trial.number} was already finished by another worker (its heartbeat went "
                         f"stale?); its retry redoes it")

    def _execute(self, trial: Any) -> Outcome:
        """Run the trial's process; raises UpdateFinishedTrialError when the trial was finished elsewhere."""
        import optuna

        params = self.recipe.suggest(trial)
        config = self.recipe.config_for(params)
        trial.set_user_attr(ledger.CONFIG, config)
        run_dir = self.out / "trials" / f"{trial.number:04d}"
        self._resume_files(trial, config, run_dir)
        study = {"study": trial.study.study_name, "trial": trial.number, "params": params,
                 "dir": str(self.out.resolve())}
        with self._trackers_lock:  # a study's tracker store is made once, here, not raced for by its trials
            trackers.prepare_study(config.get("train", {}).get("log_to", []), study)
        isolation = Isolation(threads=self.recipe.threads, timeout=self.recipe.trial_timeout_s, ignore_sigint=True,
                              on_parent_death="SIGTERM",
                              environ=((trackers.STUDY_ENV, json.dumps(study, default=str)),))
        process = TrialProcess(config, run_dir, isolation, self.recipe.measure, nproc=self.recipe.nproc)
        objective, taken = self.recipe.objectives[0][0], threading.Event()

        def on_eval(step: int, metrics: dict[str, Any]) -> str:
            answer, value = "continue", metrics.get(objective)
            if self.recipe.prunes and isinstance(value, (int, float)) and math.isfinite(value) and not taken.is_set():
                try:
                    trial.report(value, step)
                    if trial.should_prune():
                        answer = "prune"
                except optuna.exceptions.UpdateFinishedTrialError:
                    taken.set()  # failed as stale meanwhile: stop at this checkpoint for the retry
            return "stop" if self._stop.is_set() or taken.is_set() else answer

        with self._lock:
            self._running[trial.number] = process
        try:
            outcome = process.run(on_eval, self._stop)
        finally:
            with self._lock:
                self._running.pop(trial.number, None)
        if taken.is_set():
            raise optuna.exceptions.UpdateFinishedTrialError(f"trial {trial.number} was finished elsewhere")
        return outcome

    def store(self, trial: Any, outcome: Outcome) -> None:
        """Store a trial's outcome; raises UpdateFinishedTrialError when another worker finished it first."""
        summary, params = outcome.summary, ", ".join(f"{k}={v}" for k, v in trial.params.items())
        if outcome.state == "complete":
            names = [m for m, _ in self.recipe.objectives] + list(self.recipe.constraints)
            missing = [m for m in names if summary.value(m) is None]
            if missing:
                outcome = Outcome("failed", f"its summary has no {', '.join(missing)} (objective or constraint)",
                                  summary)
        if summary is not None:
            for key, value in ledger.summary_attrs(summary).items():
                trial.set_user_attr(key, value)
        if outcome.state == "complete":
            values = [summary.value(m) for m, _ in self.recipe.objectives]
            for name, limit in self.recipe.constraints.items():
                trial.set_constraint(name, summary.value(name) - limit)
            ledger.tell(self.study, trial, "complete", values if self.recipe.multi_objective else values[0])
            shown = ", ".join(f"{m}={v:.4g}" for (m, _), v in zip(self.recipe.objectives, values, strict=True))
            self.log(f"trial {trial.number} ({params}): {shown} [{summary.train_seconds:.0f} s]")
        elif outcome.state == "pruned":
            ledger.tell(self.study, trial, "pruned")
            self.log(f"trial {trial.number} ({params}): pruned at step {summary.steps if summary else '?'}")
        else:
            trial.set_user_attr(ledger.FAIL_REASON, outcome.reason)
            if not outcome.redo:
                trial.set_user_attr(ledger.FINAL, True)
            ledger.tell(self.study, trial, "failed")
            self.log(f"trial {trial.number} failed: {outcome.reason}")

    def _resume_files(self, trial: Any, config: dict[str, Any], run_dir: Path) -> None:
        """A retry starts from the checkpoint of the trial it retries, when that trial ran here with the same
        configuration (the same specs: `train` resumes it exactly as if it had never stopped)."""
        number = ledger.retried_trial(ledger.frozen(self.study, trial))
        if number is None or (run_dir / "checkpoint.pt").exists():
            return
        old_dir = self.out / "trials" / f"{number:04d}"
        old = ledger.read_trial(ledger.stored(self.study, number))
        if old.config != json.loads(json.dumps(config)) or not (old_dir / "checkpoint.pt").exists():
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        from experiments.distributed import checkpoint_files

        # the checkpoint last (after an FSDP trial's shard directories): it means "resume"
        for path in [old_dir / "spec.json", old_dir / "metrics.jsonl", *checkpoint_files(old_dir)]:
            if path.is_dir():
                shutil.copytree(path, run_dir / path.name)
            elif path.exists():
                shutil.copy2(path, run_dir / path.name)
        trial.set_user_attr(ledger.RESUMED_FROM, number)
        self.log(f"trial {trial.number} resumes trial {number} from its last checkpoint")


#: recipe fields that say how trials run, not what they compute (a resumed study may change them)
_EXECUTION = ("jobs", "nproc")


def _recipe_defaults() -> dict[str, Any]:
    """The JSON form of every Recipe field that has a default."""
    out = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
           for f in dataclasses.fields(Recipe)
           if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    return json.loads(json.dumps(out))


def _sigterm_interrupts() -> Callable[[], None]:
    """Make SIGTERM (a batch scheduler preempting the job, `kill`) stop the study as Ctrl-C does: running
    trials are stopped and marked interrupted, to be resumed. Returns the function that restores the old
    handler. Only the main thread can set handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, old)
