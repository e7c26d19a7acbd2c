"""Optuna studies over mixers, hybrids, depth and width: recipes, trial execution, storage, resume.

A **recipe** (TOML; `experiments/recipes/*.toml` or any path) names the base run (``[base.model]``,
``[base.train]``, ``[base.data]``), a search ``[space]`` over any field by dotted path, named ``[variants]``
(bundles of field values, e.g. ``attention`` vs ``mamba``) and further named axes of bundles
(``[axes.length]`` with ``T64 = {"train.seq_len" = 64, "data.options.num_kv_pairs" = 4}``), the objectives,
constraints, sampler, pruner and budget, long-context ``[measure]``ments per trial, and per-scale overrides
(``[scale.smoke]``, ``[scale.cpu]``, ``[scale.gpu]``: deep-merged over the rest, except that a scale's
``variants``, ``space`` or ``axes.X`` replaces that whole set of choices). It is validated — every grid
cell or range corner built into specs — before anything runs.

**Trials** run in their own subprocesses (isolation, and an honest peak memory). The coordinator talks to
each over a pipe: at every evaluation the child reports the value and waits for "continue" or "prune"; at
the end it sends its summary. A crash, out-of-memory kill, timeout or diverged loss fails that trial with
the reason stored on it (user attr ``fail_reason``) and the study goes on.

**Storage**: a SQLite file in the run directory by default, written only by the coordinator process (its
``--jobs`` threads each watch one trial subprocess); PostgreSQL (``--storage postgresql://…``) for many
workers on many machines (`run_worker`). Heartbeats mark the trials of a dead worker FAIL and queue a retry
with the same parameters; on one machine a dead coordinator's trials are found by PID at the next start.

**Resume**: rerunning a recipe continues its study. Grid cells are enqueued once and each runs exactly once
(a cell is redone only if its trial was interrupted or its worker died); sampled studies run until the
budget counts enough finished trials (complete, pruned, or failed for a reason of their own). A redone
trial starts from the last checkpoint of the one it replaces when that trial's directory is on this machine
and its configuration is unchanged. ``retry_failed`` (``--retry-failed``) queues once more each trial that
failed for a reason of its own, e.g. after fixing that reason; the failed trial stays in the study.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.config import ConfigError, build_specs, set_path
from registry import check_fields, did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["METRICS", "Recipe", "RecipeError", "StudyRunner", "find_recipe", "open_study", "recipe_names"]

RECIPES_DIR = Path(__file__).parent / "recipes"
SCALES = ("smoke", "cpu", "gpu")
EVAL = "@@mixerlab-eval@@ "
RESULT = "@@mixerlab-trial@@ "

#: metric -> (where it comes from, default direction, unit)
METRICS: dict[str, tuple[str, str, str]] = {
    "val_bpb": ("validation bits per byte", "minimize", "bits/byte"),
    "val_loss": ("validation loss", "minimize", "nats/token"),
    "val_ppl": ("validation perplexity", "minimize", ""),
    "accuracy": ("task test accuracy", "maximize", ""),
    "exact_match": ("task exact-match accuracy", "maximize", ""),
    "peak_memory_mb": ("peak training memory above baseline", "minimize", "MiB"),
    "params": ("parameters", "minimize", ""),
    "tokens_per_s": ("training throughput", "maximize", "tokens/s"),
    "train_seconds": ("training time", "minimize", "s"),
    "flops_per_token": ("forward FLOPs per token", "minimize", "FLOP"),
}
CORPUS_METRICS = {"val_bpb", "val_loss", "val_ppl"}
TASK_METRICS = {"accuracy", "exact_match"}
TOP_KEYS = ("name", "description", "base", "space", "variants", "axes", "objectives", "constraints", "sampler",
            "pruner", "budget", "trial", "measure", "report", "scale")
MEASURES = {"memory": ("lengths", "mode", "batch", "of", "repeats"), "decode": ("contexts", "steps", "batch"),
            "context": ("multipliers", "bins", "tokens", "examples")}
FINISHED_FAIL = "final"  # user attr set on trials that failed for a reason of their own (not interrupted)


class RecipeError(ValueError):
    """An invalid recipe; raised before anything runs. The message names the field and the valid ones."""


def _unknown(kind: str, keys: Any, valid: Any) -> None:
    check_fields(kind, keys, valid, RecipeError)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


@dataclass(frozen=True)
class Param:
    """One search dimension over a dotted field path (``model.d_model``, ``train.lr``, ...)."""

    path: str
    choices: tuple[Any, ...] | None = None  # categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False

    @classmethod
    def parse(cls, path: str, spec: Any) -> Param:
        where = f"space.{path!r}"
        if isinstance(spec, list):
            if not spec:
                raise RecipeError(f"{where}: an empty list of choices")
            return cls(path, choices=tuple(spec))
        if isinstance(spec, dict):
            _unknown(where, spec, ("low", "high", "log", "step", "int"))
            if "low" not in spec or "high" not in spec:
                raise RecipeError(f"{where}: a range needs low and high, e.g. {{low = 1e-4, high = 1e-2, log = true}}")
            low, high = spec["low"], spec["high"]
            if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and low < high):
                raise RecipeError(f"{where}: needs numbers low < high, got low={low!r}, high={high!r}")
            integer = bool(spec.get("int", isinstance(low, int) and isinstance(high, int)))
            if spec.get("log") and low <= 0:
                raise RecipeError(f"{where}: a log range needs low > 0")
            return cls(path, low=low, high=high, log=bool(spec.get("log", False)), step=spec.get("step"),
                       integer=integer)
        return cls(path, choices=(spec,))

    def suggest(self, trial: Any) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.path, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.path, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.path, self.low, self.high, log=self.log, step=self.step)

    def corners(self) -> list[Any]:
        return list(self.choices) if self.choices is not None else [self.low, self.high]


@dataclass(frozen=True)
class Recipe:
    """A validated study recipe at one scale."""

    name: str
    scale: str
    description: str
    base: dict[str, Any]
    space: tuple[Param, ...]
    axes: dict[str, dict[str, dict[str, Any]]]  # axis -> bundle name -> {path: value}; "variant" first
    objectives: tuple[tuple[str, str], ...]  # (metric, direction)
    constraints: dict[str, float]  # metric -> maximum
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    trials: int | None
    timeout_s: float | None
    trial_timeout_s: float
    threads: int | None
    jobs: int = 1  # trial subprocesses in parallel when the command line does not say (--jobs)
    measure: dict[str, dict[str, Any]] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    # loading -----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, name_or_path: str, scale: str = "cpu") -> Recipe:
        """A recipe by name (``quickstart``) or path, at ``scale``."""
        path = find_recipe(name_or_path)
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise RecipeError(f"{path} is not valid TOML: {exc}") from None
        return cls.from_dict(raw, scale=scale, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], scale: str = "cpu", source: str = "") -> Recipe:
        _unknown("recipe", raw, TOP_KEYS)
        if scale not in SCALES:
            raise RecipeError(f"scale {scale!r} is not one of {', '.join(SCALES)}")
        scales = raw.get("scale", {})
        _unknown("recipe [scale]", scales, SCALES)
        over = copy.deepcopy(scales.get(scale, {}))
        doc = {k: v for k, v in raw.items() if k != "scale"}
        # sets of choices are replaced, not merged: a scale's [variants], [space] or [axes.X] is the whole set
        for key in ("variants", "space"):
            if key in over:
                doc = {**doc, key: over.pop(key)}
        for axis, bundles in over.pop("axes", {}).items():
            doc = {**doc, "axes": {**doc.get("axes", {}), axis: bundles}}
        doc = _merge(doc, over)
        _unknown(f"recipe [scale.{scale}]", scales.get(scale, {}), TOP_KEYS)
        name = doc.get("name") or Path(source).stem
        if not name:
            raise RecipeError("recipe: give it a name (name = \"...\")")
        base = doc.get("base", {})
        _unknown("recipe [base]", base, ("model", "train", "data"))
        space = tuple(Param.parse(p, s) for p, s in doc.get("space", {}).items())
        raw_axes = {"variant": doc.get("variants", {}), **doc.get("axes", {})}
        axes: dict[str, dict[str, dict[str, Any]]] = {}
        for axis, bundles in raw_axes.items():
            if axis in {p.path for p in space}:
                raise RecipeError(f"axis {axis!r} is also a [space] field; rename the axis")
            for bname, values in bundles.items():
                if not isinstance(values, dict) or not values:
                    raise RecipeError(f"{axis}.{bname}: give a table of field = value, "
                                      f"e.g. {{\"model.mixer\" = \"mamba\"}}")
            if bundles:
                axes[str(axis)] = {str(k): dict(v) for k, v in bundles.items()}
        objectives = cls._parse_objectives(doc.get("objectives", ["val_bpb"]))
        constraints = {str(k): float(v) for k, v in doc.get("constraints", {}).items()}
        _unknown("constraints", constraints, METRICS)
        sampler = dict(doc.get("sampler", {"kind": "tpe"}))
        _unknown("sampler", sampler, ("kind", "seed", "n_startup_trials"))
        pruner = dict(doc.get("pruner", {"kind": "none"}))
        _unknown("pruner", pruner, ("kind", "n_startup_trials", "n_warmup_steps", "min_resource", "reduction_factor",
                                    "percentile"))
        budget = dict(doc.get("budget", {}))
        _unknown("budget", budget, ("trials", "timeout_s"))
        trial = dict(doc.get("trial", {}))
        _unknown("trial", trial, ("timeout_s", "threads", "jobs"))
        measure = {k: dict(v) for k, v in doc.get("measure", {}).items()}
        _unknown("measure", measure, MEASURES)
        for kind, opts in measure.items():
            _unknown(f"measure.{kind}", opts, MEASURES[kind])
            if opts.get("of", "mixer") not in ("mixer", "model"):
                raise RecipeError(f"measure.{kind}.of must be 'mixer' (the first layer's) or 'model'")
        recipe = cls(name=name, scale=scale, description=doc.get("description", ""), base=base, space=space,
                     axes=axes, objectives=objectives, constraints=constraints, sampler=sampler,
                     pruner=pruner, trials=budget.get("trials"), timeout_s=budget.get("timeout_s"),
                     trial_timeout_s=float(trial.get("timeout_s", 3600)), threads=trial.get("threads"),
                     jobs=int(trial.get("jobs", 1)),
                     measure=measure, report=dict(doc.get("report", {})), source=source)
        recipe.validate()
        return recipe

    @staticmethod
    def _parse_objectives(items: Any) -> tuple[tuple[str, str], ...]:
        if isinstance(items, str):
            items = [items]
        out = []
        for item in items:
            metric, direction = (item, None) if isinstance(item, str) else (item.get("metric"), item.get("direction"))
            _unknown("objectives", [metric], METRICS)
            direction = direction or METRICS[metric][1]
            if direction not in ("minimize", "maximize"):
                raise RecipeError(f"objective {metric}: direction must be minimize or maximize, got {direction!r}")
            out.append((metric, direction))
        if not out:
            raise RecipeError("objectives: give at least one, e.g. objectives = [\"val_bpb\"]")
        return tuple(out)

    # validation --------------------------------------------------------------------------------------------
    @property
    def grid(self) -> bool:
        return self.sampler.get("kind", "tpe") == "grid"

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def study_name(self) -> str:
        return f"{self.name}-{self.scale}"

    def validate(self) -> None:
        kind = self.sampler.get("kind", "tpe")
        if kind not in ("grid", "tpe", "random", "nsga2"):
            raise RecipeError(f"sampler.kind={kind!r}: valid: grid, tpe, random, nsga2")
        pk = self.pruner.get("kind", "none")
        if pk not in ("none", "median", "hyperband", "percentile"):
            raise RecipeError(f"pruner.kind={pk!r}: valid: none, median, hyperband, percentile")
        if self.multi_objective and pk != "none":
            raise RecipeError("a multi-objective study cannot prune (Optuna raises on trial.report); optimise one "
                              "objective and put memory or parameters under [constraints], or set pruner.kind='none'")
        if self.grid:
            ranges = [p.path for p in self.space if p.choices is None]
            if ranges:
                raise RecipeError(f"grid mode needs lists of values; {', '.join(ranges)} are ranges")
        elif self.trials is None and self.timeout_s is None:
            raise RecipeError("budget: a sampled study needs budget.trials and/or budget.timeout_s")
        probe = self.configs_to_validate()
        data_kind = None
        for params in probe:
            config = self.config_for(params)
            try:
                _, _, data = build_specs(config)
            except ConfigError as exc:
                raise RecipeError(f"recipe {self.name} ({_fmt(params)}): {exc}") from None
            data_kind = "task" if data.task else "corpus"
        for metric, _ in self.objectives:
            if data_kind == "corpus" and metric in TASK_METRICS:
                raise RecipeError(f"objective {metric} needs a task; this recipe trains on a corpus (use val_bpb)")
            if data_kind == "task" and metric in CORPUS_METRICS:
                raise RecipeError(f"objective {metric} needs a corpus; this recipe trains on a task (use accuracy)")

    def configs_to_validate(self) -> list[dict[str, Any]]:
        if self.grid:
            return self.grid_cells()
        axes = [list(b) for b in self.axes.values()] + [p.corners() for p in self.space]
        names = list(self.axes) + [p.path for p in self.space]
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*axes)][:64]

    def grid_cells(self) -> list[dict[str, Any]]:
        axes = [(a, list(b)) for a, b in self.axes.items()] + [(p.path, list(p.choices)) for p in self.space]
        names = [a for a, _ in axes]
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*[v for _, v in axes])]

    def config_for(self, params: dict[str, Any]) -> dict[str, Any]:
        """The ``{"model", "train", "data"}`` config of one trial's parameters."""
        config = copy.deepcopy(self.base)
        for axis, bundles in self.axes.items():
            if axis in params:
                if params[axis] not in bundles:
                    raise RecipeError(f"unknown {axis} {params[axis]!r}; valid: {', '.join(bundles)}")
                for path, value in bundles[params[axis]].items():
                    set_path(config, path, value)
        for path, value in params.items():
            if path not in self.axes:
                set_path(config, path, value)
        return config

    def suggest(self, trial: Any) -> dict[str, Any]:
        params = {}
        for axis, bundles in self.axes.items():
            params[axis] = trial.suggest_categorical(axis, list(bundles))
        for p in self.space:
            params[p.path] = p.suggest(trial)
        return params

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["space"] = [dataclasses.asdict(p) for p in self.space]
        return json.loads(json.dumps(d))

    # optuna objects ----------------------------------------------------------------------------------------
    def make_sampler(self) -> Any:
        import optuna

        kind, seed = self.sampler.get("kind", "tpe"), self.sampler.get("seed", 0)
        startup = self.sampler.get("n_startup_trials", 10)
        if kind in ("grid", "random"):
            return optuna.samplers.RandomSampler(seed=seed)  # grid cells are enqueued; random fills nothing
        if kind == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True,
                                          constant_liar=True)

    def make_pruner(self) -> Any:
        import optuna

        p = self.pruner
        kind = p.get("kind", "none")
        if kind == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=p.get("n_startup_trials", 3),
                                               n_warmup_steps=p.get("n_warmup_steps", 0))
        if kind == "percentile":
            return optuna.pruners.PercentilePruner(p.get("percentile", 25.0),
                                                   n_startup_trials=p.get("n_startup_trials", 3),
                                                   n_warmup_steps=p.get("n_warmup_steps", 0))
        if kind == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=p.get("min_resource", 1),
                                                  reduction_factor=p.get("reduction_factor", 3))
        return optuna.pruners.NopPruner()


def _fmt(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def find_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
        return path
    candidate = RECIPES_DIR / f"{name_or_path}.toml"
    if candidate.is_file():
        return candidate
    names = recipe_names()
    raise RecipeError(f"unknown recipe {name_or_path!r}{did_you_mean(name_or_path, names)}; recipes: "
                      f"{', '.join(names)} (or give a .toml path)")


# ---------------------------------------------------------------------------------------------------------
# storage
# ---------------------------------------------------------------------------------------------------------


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


def open_study(recipe: Recipe, storage: Any, create: bool = True) -> Any:
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


def _cell_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


DEAD_WORKER = "dead worker"  # user attr ``retry_after`` of a trial queued because its predecessor's worker died


def requeue_dead(study: Any, trial: Any, max_retry: int | None, log: Callable[[str], None] | None = None) -> bool:
    """Queue once more a trial (FrozenTrial, already FAIL) whose worker died, with its parameters and a clean
    set of attributes (``retry_of``), unless it has already been retried ``max_retry`` times for a dead worker
    along its chain of retries (a trial that takes its worker down, e.g. out of memory, is not retried for
    ever). Returns whether it was queued."""
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    deaths, t = 0, trial
    while t is not None and t.user_attrs.get("retry_after") == DEAD_WORKER:
        deaths += 1
        t = by_number.get(retried_trial(t))
    if max_retry is not None and deaths >= max_retry:
        if log:
            log(f"trial {trial.number}: its worker died {deaths + 1} times; not retried again (does the trial "
                f"kill its worker, e.g. out of memory?)")
        return False
    study.enqueue_trial(_params_of(trial), user_attrs={"retry_of": trial.number, "retry_after": DEAD_WORKER})
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------------------
# the coordinator / worker
# ---------------------------------------------------------------------------------------------------------


class StudyRunner:
    """Runs a recipe's trials against a storage, ``jobs`` trial subprocesses at a time.

    Args:
        recipe: the validated recipe.
        out_dir: the run directory (trial directories, the SQLite file by default, reports).
        storage: a storage URL; default ``sqlite:///<out_dir>/study.db``.
        jobs: trial subprocesses run in parallel by this process (default: the recipe's ``trial.jobs``).
        heartbeat: (interval, grace period) in seconds; production intervals should be >= 60 s.
        retry_failed: queue once more every trial that failed for a reason of its own (after a fix). A retry,
            like the retry of an interrupted trial, resumes from the failed trial's last checkpoint when that
            trial's directory is here and its configuration is unchanged; the failed trial stays as it was.
    """

    def __init__(self, recipe: Recipe, out_dir: str | os.PathLike, storage: str | None = None, jobs: int | None = None,
                 heartbeat: tuple[int, int] = (60, 180), progress: bool = True, log: Any = None,
                 retry_failed: bool = False):
        jobs = recipe.jobs if jobs is None else jobs
        if jobs < 1:
            raise RecipeError(f"jobs must be >= 1, got {jobs}")
        self.recipe = recipe
        self.out = Path(out_dir)
        self.storage_url = storage or f"sqlite:///{(self.out / 'study.db').resolve()}"
        self.jobs = jobs
        self.heartbeat = heartbeat
        self.progress = progress
        self.retry_failed = retry_failed
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._children: dict[int, subprocess.Popen] = {}
        self._started = 0.0
        self.host = host_id()
        self.worker_id = f"{self.host}:{os.getpid()}"
        self.max_retry = 3  # retries of one trial whose worker died, along its chain

    # set-up ------------------------------------------------------------------------------------------------
    def _check_out_dir(self) -> None:
        """Refuse a directory holding a different recipe's study (before anything is written)."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "recipe.json"
        mine = self.recipe.to_dict()
        mine.pop("source", None)
        if path.exists():
            theirs = json.loads(path.read_text())
            theirs.pop("source", None)
            if theirs != mine:
                changed = sorted(k for k in mine if theirs.get(k) != mine.get(k))
                raise RecipeError(f"{self.out} holds a study of a different recipe (fields differ: "
                                  f"{', '.join(changed)}); use another --out directory — nothing was changed")
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # two processes may start in one directory at once
        tmp.write_text(json.dumps({**mine, "source": self.recipe.source}, indent=2) + "\n")
        os.replace(tmp, path)

    def open(self, create: bool = True, wait_s: float = 120.0) -> Any:
        import warnings

        import optuna

        # we drive heartbeats and stale-trial recovery ourselves around ask/tell, on purpose
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours (see _run_trial)
        self._check_out_dir()
        self.storage = make_storage(self.storage_url, *self.heartbeat, max_retry=self.max_retry)
        deadline = time.time() + wait_s
        while True:
            try:
                self.study = open_study(self.recipe, self.storage, create=create)
                break
            except KeyError:  # a worker started before the coordinator created the study
                if time.time() > deadline:
                    raise RecipeError(f"no study {self.recipe.study_name!r} in {self.storage_url} after "
                                      f"{wait_s:.0f} s; start `mixerlab study run` for it first") from None
                time.sleep(1.0)
        self.study.set_metric_names([m for m, _ in self.recipe.objectives])
        return self.study

    def _recover(self) -> None:
        """Fail the trials of dead workers and queue their retries: a stale heartbeat (any machine), a dead PID
        on this machine, or no worker recorded long after the trial started (its worker died the moment it
        took the trial, before it could say who it was or beat once)."""
        import datetime

        import optuna
        from optuna.storages import fail_stale_trials
        from optuna.trial import TrialState

        fail_stale_trials(self.study)
        grace = self.heartbeat[1] if self.heartbeat else 180
        now = datetime.datetime.now()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            who = t.user_attrs.get("worker")
            if who is None:
                if t.datetime_start is None or (now - t.datetime_start).total_seconds() < grace:
                    continue
                reason = f"its worker died as it took the trial (no worker recorded {grace} s after the start)"
            else:
                whost, _, pid = who.rpartition(":")
                if whost != self.host or not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
                    continue
                reason = f"worker {who} died"
            try:
                self.storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
                self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker got there first
            # queued here, grid or not: a worker (which never enqueues the grid) may be the one to find it
            if requeue_dead(self.study, self.storage.get_trial(t._trial_id), self.max_retry, self.log):
                self.log(f"trial {t.number} marked FAIL ({reason}); it will be retried")

    def _enqueue_grid(self) -> None:
        from optuna.trial import TrialState

        live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING, TrialState.RUNNING)
        have, interrupted = set(), {}
        for t in self.study.get_trials(deepcopy=False):
            key = _cell_key(_params_of(t))
            if t.state in live or (t.state == TrialState.FAIL and t.user_attrs.get(FINISHED_FAIL)):
                have.add(key)
            elif t.state == TrialState.FAIL:
                interrupted[key] = t.number  # the latest; its retry resumes from its checkpoint
        for cell in self.recipe.grid_cells():
            key = _cell_key(cell)
            if key not in have:
                retry = {"retry_of": interrupted[key]} if key in interrupted else None
                self.study.enqueue_trial(cell, user_attrs=retry)

    def _queue_failed(self) -> None:
        """Queue once more each trial that failed for a reason of its own and has not been retried yet."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        retried = {retried_trial(t) for t in trials}
        for t in trials:
            if t.state == TrialState.FAIL and t.user_attrs.get(FINISHED_FAIL) and t.number not in retried:
                self.study.enqueue_trial(_params_of(t), user_attrs={"retry_of": t.number})
                self.log(f"trial {t.number} ({_fmt(t.params)}) failed: {t.user_attrs.get('fail_reason')}; "
                         f"queued again")

    def _resume_files(self, trial: Any, config: dict[str, Any], run_dir: Path) -> None:
        """A retry starts from the checkpoint of the trial it retries, when that trial ran here with the same
        configuration (the same specs: `train` resumes it exactly as if it had never stopped)."""
        number = retried_trial(self.study._storage.get_trial(trial._trial_id))
        if number is None or (run_dir / "checkpoint.pt").exists():
            return
        old_dir = self.out / "trials" / f"{number:04d}"
        old = next((t for t in self.study.get_trials(deepcopy=False) if t.number == number), None)
        same = old is not None and old.user_attrs.get("config") == json.loads(json.dumps(config))
        if not same or not (old_dir / "checkpoint.pt").exists():
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in ("spec.json", "metrics.jsonl", "checkpoint.pt"):  # the checkpoint last: it means "resume"
            if (old_dir / name).exists():
                shutil.copy2(old_dir / name, run_dir / name)
        trial.set_user_attr("resumed_from", number)
        self.log(f"trial {trial.number} resumes trial {number} from its last checkpoint")

    # budget ------------------------------------------------------------------------------------------------
    def _counts(self) -> dict[str, int]:
        from optuna.trial import TrialState

        c = {"complete": 0, "pruned": 0, "failed": 0, "running": 0, "waiting": 0, "interrupted": 0}
        for t in self.study.get_trials(deepcopy=False):
            if t.state == TrialState.COMPLETE:
                c["complete"] += 1
            elif t.state == TrialState.PRUNED:
                c["pruned"] += 1
            elif t.state == TrialState.FAIL:
                c["failed" if t.user_attrs.get(FINISHED_FAIL) else "interrupted"] += 1
            elif t.state == TrialState.RUNNING:
                c["running"] += 1
            elif t.state == TrialState.WAITING:
                c["waiting"] += 1
        return c

    def _claim(self) -> str | None | bool:
        """"queued": take a queued trial; "new": sample a new one; None: wait (others are running); False: this
        worker is done."""
        if self._stop.is_set():
            return False
        if self.recipe.timeout_s and time.time() - self._started > self.recipe.timeout_s:
            return False
        c = self._counts()
        if c["waiting"]:  # grid cells, and retries of failed or interrupted trials
            return "queued"
        if self.recipe.grid:
            return None if c["running"] else False
        done = c["complete"] + c["pruned"] + c["failed"]
        budget = self.recipe.trials
        if budget is None or done + c["running"] < budget:
            return "new"
        return None if done < budget and c["running"] else False

    def _take(self, claim: str) -> Any:
        """The trial to run now, or None when another worker took the queued one first. A queued trial is taken
        with one atomic WAITING -> RUNNING update; unlike ``study.ask()``, losing that race never samples a new
        trial, which in a grid study would run a cell twice."""
        import optuna
        from optuna.trial import TrialState

        if claim == "new":
            return self.study.ask()
        storage = self.study._storage
        for t in storage.get_all_trials(self.study._study_id, deepcopy=False, states=(TrialState.WAITING,)):
            try:
                if storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                    return optuna.trial.Trial(self.study, t._trial_id)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
        return None

    # running -----------------------------------------------------------------------------------------------
    def run(self, create: bool = True) -> dict[str, int]:
        """Run trials until the budget is met (or Ctrl-C); returns the final trial counts."""
        self.open(create=create)
        self._recover()
        if self.retry_failed:
            self._queue_failed()
        if self.recipe.grid and create:
            self._enqueue_grid()
        self._started = time.time()
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
            self._terminate_children()
            deadline = time.time() + 30
            while not all(done.is_set() for done in ended) and time.time() < deadline:
                time.sleep(0.1)
            raise
        finally:
            restore()
            if bar is not None:
                bar.close()
        return self._counts()

    def _bar(self) -> Any:
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        total = len(self.recipe.grid_cells()) if self.recipe.grid else self.recipe.trials
        c = self._counts()
        return tqdm(total=total, initial=c["complete"] + c["pruned"] + c["failed"], unit="trial",
                    desc=self.recipe.study_name, dynamic_ncols=True)

    def _terminate_children(self) -> None:
        with self._lock:
            children = list(self._children.values())
        for proc in children:
            if proc.poll() is None:
                proc.terminate()

    def _loop(self, bar: Any) -> None:
        last_recover = time.time()
        while True:
            with self._lock:
                claim = self._claim()
                trial = self._take(claim) if claim else None
                if trial is not None:
                    self._mark_mine(trial)
            if claim is False:
                return
            if trial is None:
                if claim is None:  # others are running: look for dead workers now and then
                    if time.time() - last_recover > max(1, self.heartbeat[0] if self.heartbeat else 5):
                        self._recover()
                        last_recover = time.time()
                    self._stop.wait(1.0)
                else:  # another worker took the queued trial first: look again
                    self._stop.wait(0.05)
                continue
            try:
                self._run_trial(trial)
            except Exception as exc:  # storage trouble: this trial is lost to this worker, not the others
                self.log(f"trial {trial.number}: {type(exc).__name__}: {exc}")
            if bar is not None:
                bar.update(1)

    def _mark_mine(self, trial: Any) -> None:
        """Beat once and record this worker on a trial just taken, before anything else: a worker that dies
        from here on is found by its PID or its heartbeat (and before it, by `_recover`'s no-worker rule)."""
        from optuna.storages._heartbeat import is_heartbeat_enabled

        storage = self.study._storage
        if is_heartbeat_enabled(storage):
            storage.record_heartbeat(trial._trial_id)
        trial.set_user_attr("worker", self.worker_id)

    def _run_trial(self, trial: Any) -> None:
        import optuna
        from optuna.storages._heartbeat import get_heartbeat_thread

        storage, tid = self.study._storage, trial._trial_id
        heartbeat = get_heartbeat_thread(tid, storage)
        heartbeat.start()
        try:
            try:
                params = self.recipe.suggest(trial)
                config = self.recipe.config_for(params)
                trial.set_user_attr("config", config)
                run_dir = self.out / "trials" / f"{trial.number:04d}"
                self._resume_files(trial, config, run_dir)
                outcome = self._execute(trial, config, run_dir)
            except optuna.exceptions.UpdateFinishedTrialError:
                raise
            except Exception as exc:  # a bug or storage trouble here must not take the other workers down
                outcome = ("fail", f"coordinator error: {type(exc).__name__}: {exc}", None, True)
            self._finish(trial, outcome)
        except optuna.exceptions.UpdateFinishedTrialError:
            self.log(f"trial {trial.number} was already finished by another worker (its heartbeat went stale?); "
                     f"its retry redoes it")
        finally:
            heartbeat.join()  # beats until the outcome is stored: a slow write is not taken for a dead worker

    def _finish(self, trial: Any, outcome: tuple[str, str, Any, bool]) -> None:
        """Store a trial's outcome; raises UpdateFinishedTrialError when another worker finished it first."""
        from optuna.trial import TrialState

        state, reason, summary, final = outcome
        params = trial.params
        if summary is not None:
            trial.set_user_attr("summary", _compact(summary))
            if summary.get("measure"):
                trial.set_user_attr("measure", summary["measure"])
        if state == "complete":
            values = [_metric(summary, m) for m, _ in self.recipe.objectives]
            for metric, limit in self.recipe.constraints.items():
                trial.set_constraint(metric, _metric(summary, metric) - limit)
            self._tell(trial, TrialState.COMPLETE, values if self.recipe.multi_objective else values[0])
            shown = ", ".join(f"{m}={v:.4g}" for (m, _), v in zip(self.recipe.objectives, values, strict=True))
            self.log(f"trial {trial.number} ({_fmt(params)}): {shown} "
                     f"[{summary.get('train_seconds', 0):.0f} s]")
        elif state == "pruned":
            self._tell(trial, TrialState.PRUNED)
            self.log(f"trial {trial.number} ({_fmt(params)}): pruned at step {summary.get('steps', '?')}"
                     if summary else f"trial {trial.number}: pruned")
        else:
            trial.set_user_attr("fail_reason", reason)
            if final:
                trial.set_user_attr(FINISHED_FAIL, True)
            self._tell(trial, TrialState.FAIL)
            self.log(f"trial {trial.number} failed: {reason}")

    def _tell(self, trial: Any, state: Any, values: Any = None) -> None:
        import optuna

        told = self.study.tell(trial, values, state=state, skip_if_finished=True)
        if told.state != state:  # finished meanwhile by another worker's recovery
            raise optuna.exceptions.UpdateFinishedTrialError

    def _execute(self, trial: Any, config: dict[str, Any], run_dir: Path) -> tuple[str, str, Any, bool]:
        """Run one trial subprocess; returns (state, reason, summary, final)."""
        import optuna

        run_dir.mkdir(parents=True, exist_ok=True)
        job = {"config": config, "out": str(run_dir), "threads": self.recipe.threads, "measure": self.recipe.measure,
               "prune": not self.recipe.multi_objective and self.recipe.pruner.get("kind", "none") != "none"}
        stderr = (run_dir / "stderr.log").open("w")
        proc = subprocess.Popen([sys.executable, "-m", "experiments.study"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=stderr, text=True, bufsize=1)
        with self._lock:
            self._children[trial.number] = proc
        timed_out = threading.Event()
        timer = threading.Timer(self.recipe.trial_timeout_s, lambda: (timed_out.set(), proc.kill()))
        timer.start()
        summary, pruned_here, stopped_here, taken = None, False, False, False
        objective = self.recipe.objectives[0][0]
        try:
            proc.stdin.write(json.dumps(job) + "\n")
            proc.stdin.flush()
            for line in proc.stdout:
                if line.startswith(EVAL):
                    ev = json.loads(line[len(EVAL):])
                    answer, value = "continue", ev["metrics"].get(objective)
                    if job["prune"] and isinstance(value, (int, float)) and math.isfinite(value) and not taken:
                        try:
                            trial.report(value, ev["step"])
                            if trial.should_prune():
                                answer, pruned_here = "prune", True
                        except optuna.exceptions.UpdateFinishedTrialError:
                            taken = True  # failed as stale meanwhile: stop at this checkpoint for the retry
                    if self._stop.is_set() or taken:
                        answer, stopped_here = "stop", True
                    proc.stdin.write(answer + "\n")
                    proc.stdin.flush()
                elif line.startswith(RESULT):
                    summary = json.loads(line[len(RESULT):])
            proc.wait()
        except (BrokenPipeError, OSError):
            proc.wait()
        finally:
            if proc.poll() is None:  # an error here: no orphaned trial process
                proc.kill()
                proc.wait()
            timer.cancel()
            stderr.close()
            with self._lock:
                self._children.pop(trial.number, None)
        if taken:
            raise optuna.exceptions.UpdateFinishedTrialError(f"trial {trial.number} was finished elsewhere")
        if stopped_here or (self._stop.is_set() and summary is None):
            return "fail", "interrupted (Ctrl-C or SIGTERM); will be redone on resume", summary, False
        if timed_out.is_set():
            return "fail", f"timed out after {self.recipe.trial_timeout_s:.0f} s (trial.timeout_s)", summary, True
        if summary is None:
            code = proc.returncode
            if code is not None and code < 0:
                sig = signal.Signals(-code).name
                why = " (out of memory?)" if -code == signal.SIGKILL else ""
                return "fail", f"killed by {sig}{why}", None, True
            tail = (run_dir / "stderr.log").read_text().strip().splitlines()[-6:]
            return "fail", f"crashed (exit {code}): " + " | ".join(tail), None, True
        status = summary.get("status")
        if status == "pruned" or pruned_here:
            return "pruned", "pruned", summary, True
        if status == "diverged":
            step = summary.get("final", {}).get("diverged_at_step", "?")
            return "fail", f"diverged (non-finite loss at step {step})", summary, True
        if status != "completed":
            return "fail", f"ended with status {status}", summary, True
        return "complete", "", summary, True


def _params_of(trial: Any) -> dict[str, Any]:
    """A trial's parameters; for one that died before suggesting them, those it was enqueued with."""
    return trial.params or trial.system_attrs.get("fixed_params", {})


def retried_trial(trial: Any) -> int | None:
    """The number of the trial that ``trial`` (a FrozenTrial) redoes: queued by us (user attr ``retry_of``) or
    by Optuna's heartbeat callback for a dead worker (system attr ``failed_trial``); None for a first run."""
    number = trial.user_attrs.get("retry_of")
    return number if number is not None else trial.system_attrs.get("failed_trial")


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


def _metric(summary: dict[str, Any], name: str) -> float:
    final = summary.get("final", {})
    if name in final:
        return float(final[name])
    if name in summary and summary[name] is not None:
        return float(summary[name])
    raise RecipeError(f"trial summary has no metric {name!r}")


def _compact(summary: dict[str, Any]) -> dict[str, Any]:
    keep = ("status", "steps", "total_steps", "target_reached_step", "tokens", "final", "evals", "train_seconds",
            "tokens_per_s", "params", "params_non_embedding", "flops_per_token", "state_bytes", "backends", "device",
            "precision", "peak_memory_mb", "memory_method")
    out = {k: summary[k] for k in keep if k in summary}
    out["final"] = {k: v for k, v in summary.get("final", {}).items() if k != "by" or len(json.dumps(v)) < 4000}
    ds = summary.get("dataset", {})
    if "corpus" in ds:
        out["corpus_hash"] = ds["corpus"].get("content_hash")
        out["unigram_bpb"] = ds.get("unigram_bpb")
    if "task" in ds:
        out["task"] = ds["task"].get("task")
    out["layer_pattern"] = summary.get("layer_pattern")
    out["machine"] = {k: summary.get("machine", {}).get(k) for k in ("cpu", "torch", "cuda_device", "torch_threads")}
    return out


# ---------------------------------------------------------------------------------------------------------
# the trial subprocess
# ---------------------------------------------------------------------------------------------------------


def run_measurements(measure: dict[str, dict[str, Any]], run_dir: str, model: Any, task: bool,
                     threads: int | None) -> dict[str, Any]:
    """The recipe's long-context measurements of a trained trial, each case in a fresh process (probes).

    ``memory``: time and peak memory vs T of the first layer's mixer (``of = "mixer"``) or the whole model;
    ``decode``: per-token latency and cache bytes vs context; ``context``: loss vs position and evaluation
    length (corpus) or accuracy vs length (task). A failing probe is recorded, the trial still completes.
    """
    from experiments.measure import resolve_target
    from experiments.probes import decode_probe, loss_vs_length, scaling_probe, task_accuracy_vs_length

    out: dict[str, Any] = {}
    layer = model.resolved_layers[0]
    for kind, opts in measure.items():
        try:
            if kind == "memory":
                if opts.get("of", "mixer") == "mixer":
                    target = resolve_target(mixer=layer.mixer, options=layer.options, d_model=model.d_model)
                else:
                    target = resolve_target(run=run_dir)
                out[kind] = scaling_probe(target, opts["lengths"], mode=opts.get("mode", "fwdbwd"),
                                          batch=opts.get("batch", 1), repeats=opts.get("repeats", 2), threads=threads)
            elif kind == "decode":
                out[kind] = decode_probe(resolve_target(run=run_dir), opts["contexts"], steps=opts.get("steps", 16),
                                         batch=opts.get("batch", 1), threads=threads)
            elif task:
                out[kind] = task_accuracy_vs_length(run_dir, examples=opts.get("examples"))
            else:
                out[kind] = loss_vs_length(run_dir, multipliers=opts.get("multipliers", (1, 2, 4, 8)),
                                           bins=opts.get("bins", 8), tokens=opts.get("tokens", 32768))
        except Exception as exc:  # recorded; the trial's training result stands
            out[kind] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def _trial_main() -> None:
    """Entry of a trial subprocess: read the job, train, talk to the coordinator, print the summary."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle; it stops us
    job = json.loads(sys.stdin.readline())
    from archs.model import LanguageModel  # noqa: F401 — import cost outside the memory baseline
    from experiments.measure import PeakMemory
    from experiments.train import Pruned, train

    model, train_spec, data = build_specs(job["config"])

    def on_eval(step: int, metrics: dict[str, Any]) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        sys.stdout.write(EVAL + json.dumps({"step": step, "metrics": scalars}) + "\n")
        sys.stdout.flush()
        answer = sys.stdin.readline().strip()
        if answer in ("prune", "stop", ""):  # "" : the coordinator is gone
            raise Pruned(answer or "coordinator gone")

    with PeakMemory("cuda" if train_spec.device.startswith("cuda") else "cpu") as pm:
        summary = train(model, train_spec, data, job["out"], on_eval=on_eval, progress=False,
                        threads=job.get("threads"))
    summary["peak_memory_mb"] = pm.peak_bytes / 2**20
    summary["memory_method"] = pm.method
    summary["layer_pattern"] = model.layer_pattern
    if job.get("measure") and summary["status"] == "completed":
        summary["measure"] = run_measurements(job["measure"], job["out"], model, bool(data.task), job.get("threads"))
    sys.stdout.write(RESULT + json.dumps(summary, default=str) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    _trial_main()
