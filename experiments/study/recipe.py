"""Recipes: a study written as TOML, validated into a `Recipe` before anything runs.

A recipe (`experiments/recipes/*.toml` or any path) names the base run (``[base.model]``, ``[base.train]``,
``[base.data]``), a search ``[space]`` over any field by dotted path, named ``[variants]`` (bundles of field
values, e.g. ``attention`` vs ``mamba``) and further named axes of bundles (``[axes.length]`` with
``T64 = {"train.seq_len" = 64, "data.options.num_kv_pairs" = 4}``), the objectives, constraints, sampler,
pruner and budget, long-context ``[measure]``ments per trial, and per-scale overrides (``[scale.smoke]``,
``[scale.cpu]``, ``[scale.gpu]``: deep-merged over the rest, except that a scale's ``variants``, ``space`` or
``axes.X`` replaces that whole set of choices). A grid may leave cells out: ``exclude`` lists partial cells
(``exclude = [{length = "T64", "model.d_model" = 256}]``, an axis by its bundle's name, a [space] field by its
value), and every cell matching all of an entry's keys is skipped — typically under one scale, to fit that
scale's budget. Every grid cell or range corner is built into specs first.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.config import build_specs, set_path
from experiments.errors import ConfigError, RecipeError
from experiments.metrics import metric, metric_names
from registry import check_fields, check_values, did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["PRUNERS", "RECIPES_DIR", "SAMPLERS", "SCALES", "Param", "Recipe", "find_recipe", "recipe_names"]

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
SCALES = ("smoke", "cpu", "gpu")
#: the recipe's tables and the keys each may hold (None: any, checked elsewhere)
SECTIONS: dict[str, tuple[str, ...] | None] = {
    "name": None, "description": None, "base": ("model", "train", "data"), "space": None, "variants": None,
    "axes": None, "objectives": None, "constraints": None, "sampler": ("kind", "seed", "n_startup_trials"),
    "pruner": ("kind", "n_startup_trials", "n_warmup_steps", "min_resource", "reduction_factor", "percentile",
               "margin"),
    "budget": ("trials", "timeout_s"), "trial": ("timeout_s", "threads", "jobs", "nproc"), "measure": None,
    "report": None, "exclude": None,
    "scale": SCALES,
}
MEASURES = {"memory": ("lengths", "mode", "batch", "of", "repeats"), "decode": ("contexts", "steps", "batch"),
            "context": ("multipliers", "bins", "tokens", "examples")}


@dataclass(frozen=True)
class _Sampler:
    kind: str = "tpe"
    seed: int = 0
    n_startup_trials: int = 10


@dataclass(frozen=True)
class _Pruner:
    kind: str = "none"
    n_startup_trials: int = 3
    n_warmup_steps: int = 0
    min_resource: int = 1
    reduction_factor: int = 3
    percentile: float = 25.0
    margin: float = 0.2  # sweep: how far behind a sibling (in the objective's units) a trial is stopped


@dataclass(frozen=True)
class _Budget:
    trials: int | None = None
    timeout_s: float | None = None


@dataclass(frozen=True)
class _Trial:
    timeout_s: float = 3600.0
    threads: int | None = None
    jobs: int = 1
    nproc: int = 1


@dataclass(frozen=True)
class _Report:
    sort: str = "family"
    metric: str | None = None
    best_over: list[str] | None = None


@dataclass(frozen=True)
class _Memory:
    lengths: list[int] | None = None
    mode: str = "fwdbwd"
    batch: int = 1
    of: str = "mixer"
    repeats: int = 2


@dataclass(frozen=True)
class _Decode:
    contexts: list[int] | None = None
    steps: int = 16
    batch: int = 1


@dataclass(frozen=True)
class _Context:
    multipliers: list[float] | None = None
    bins: int = 8
    tokens: int = 32768
    examples: int | None = None


_TYPED = {"sampler": _Sampler, "pruner": _Pruner, "budget": _Budget, "trial": _Trial, "report": _Report}
_MEASURE_TYPES = {"memory": _Memory, "decode": _Decode, "context": _Context}
#: (section, field) -> (smallest allowed, why)
_LOWER = {("sampler", "seed"): 0, ("sampler", "n_startup_trials"): 0, ("pruner", "n_startup_trials"): 0,
          ("pruner", "n_warmup_steps"): 0, ("pruner", "min_resource"): 1, ("pruner", "reduction_factor"): 2,
          ("budget", "trials"): 1, ("trial", "threads"): 0, ("trial", "jobs"): 1,
          ("trial", "nproc"): 1}


def _check_types(doc: dict[str, Any]) -> None:
    """Every value of the typed sections has its type and range, before anything reads it."""
    import math

    for section, cls in _TYPED.items():
        table = doc.get(section, {})
        if not isinstance(table, dict):
            raise RecipeError(f"{section} = {table!r}: must be a table, e.g. {section} = {{ ... }}")
        _unknown(section, table, [f.name for f in dataclasses.fields(cls)])
        values = check_values(f"{section}.", cls, table, RecipeError)
        for name, value in values.items():
            low = _LOWER.get((section, name))
            if isinstance(value, float) and not math.isfinite(value):
                raise RecipeError(f"{section}.{name}={value!r}: must be a finite number")
            if low is not None and value is not None and value < low:
                raise RecipeError(f"{section}.{name}={value!r}: must be at least {low}")
            if name == "timeout_s" and value is not None and value <= 0:
                raise RecipeError(f"{section}.{name}={value!r}: must be a positive number of seconds")
    for kind, opts in (doc.get("measure") or {}).items():
        if kind in _MEASURE_TYPES and isinstance(opts, dict):
            _unknown(f"measure.{kind}", opts, MEASURES[kind])
            for name, value in check_values(f"measure.{kind}.", _MEASURE_TYPES[kind], opts, RecipeError).items():
                if isinstance(value, list) and not all(v > 0 for v in value) or (
                        isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0):
                    raise RecipeError(f"measure.{kind}.{name}={value!r}: must be positive")


def _unknown(kind: str, keys: Any, valid: Any) -> None:
    check_fields(kind, keys, valid, RecipeError)


def _tpe(s: dict[str, Any]) -> Any:
    import optuna

    return optuna.samplers.TPESampler(seed=s.get("seed", 0), n_startup_trials=s.get("n_startup_trials", 10),
                                      multivariate=True, constant_liar=True)


def _random(s: dict[str, Any]) -> Any:  # a grid's cells are enqueued: its sampler fills nothing
    import optuna

    return optuna.samplers.RandomSampler(seed=s.get("seed", 0))


def _nsga2(s: dict[str, Any]) -> Any:
    import optuna

    return optuna.samplers.NSGAIISampler(seed=s.get("seed", 0))


def _median(p: dict[str, Any]) -> Any:
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=p.get("n_startup_trials", 3),
                                       n_warmup_steps=p.get("n_warmup_steps", 0))


def _percentile(p: dict[str, Any]) -> Any:
    import optuna

    return optuna.pruners.PercentilePruner(p.get("percentile", 25.0), n_startup_trials=p.get("n_startup_trials", 3),
                                           n_warmup_steps=p.get("n_warmup_steps", 0))


def _hyperband(p: dict[str, Any]) -> Any:
    import optuna

    return optuna.pruners.HyperbandPruner(min_resource=p.get("min_resource", 1),
                                          reduction_factor=p.get("reduction_factor", 3))


def _no_pruner(p: dict[str, Any]) -> Any:
    import optuna

    return optuna.pruners.NopPruner()


#: sampler.kind -> factory(sampler table); pruner.kind -> factory(pruner table)
SAMPLERS: dict[str, Callable[[dict[str, Any]], Any]] = {"grid": _random, "tpe": _tpe, "random": _random,
                                                         "nsga2": _nsga2}
PRUNERS: dict[str, Callable[[dict[str, Any]], Any]] = {"none": _no_pruner, "median": _median,
                                                        "percentile": _percentile, "hyperband": _hyperband}


def _choose(table: str, kind: str, choices: dict[str, Any]) -> None:
    if kind not in choices:
        raise RecipeError(f"{table}.kind={kind!r}{did_you_mean(kind, choices)}: valid: {', '.join(choices)}")


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
        if not isinstance(spec, dict):
            return cls(path, choices=(spec,))
        _unknown(where, spec, ("low", "high", "log", "step", "int"))
        if "low" not in spec or "high" not in spec:
            raise RecipeError(f"{where}: a range needs low and high, e.g. {{low = 1e-4, high = 1e-2, log = true}}")
        low, high = spec["low"], spec["high"]
        if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and low < high):
            raise RecipeError(f"{where}: needs numbers low < high, got low={low!r}, high={high!r}")
        integer = bool(spec.get("int", isinstance(low, int) and isinstance(high, int)))
        if spec.get("log") and low <= 0:
            raise RecipeError(f"{where}: a log range needs low > 0")
        return cls(path, low=low, high=high, log=bool(spec.get("log", False)), step=spec.get("step"), integer=integer)

    def suggest(self, trial: Any) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.path, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.path, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.path, self.low, self.high, log=self.log, step=self.step)

    def corners(self) -> list[Any]:
        return list(self.choices) if self.choices is not None else [self.low, self.high]


def _scaled(raw: dict[str, Any], scale: str) -> dict[str, Any]:
    """The recipe at ``scale``: the scale's table merged over the rest (its sets of choices replace)."""
    if scale not in SCALES:
        raise RecipeError(f"scale {scale!r} is not one of {', '.join(SCALES)}")
    scales = raw.get("scale", {})
    _unknown("recipe [scale]", scales, SCALES)
    _unknown(f"recipe [scale.{scale}]", scales.get(scale, {}), SECTIONS)
    over = copy.deepcopy(scales.get(scale, {}))
    doc = {k: v for k, v in raw.items() if k != "scale"}
    for key in ("variants", "space"):
        if key in over:
            doc[key] = over.pop(key)
    for axis, bundles in over.pop("axes", {}).items():
        doc["axes"] = {**doc.get("axes", {}), axis: bundles}
    return _merge(doc, over)


def _axes(doc: dict[str, Any], space: tuple[Param, ...]) -> dict[str, dict[str, dict[str, Any]]]:
    """Named bundles of field values per axis, ``variant`` first."""
    axes: dict[str, dict[str, dict[str, Any]]] = {}
    for axis, bundles in {"variant": doc.get("variants", {}), **doc.get("axes", {})}.items():
        if axis in {p.path for p in space}:
            raise RecipeError(f"axis {axis!r} is also a [space] field; rename the axis")
        for name, values in bundles.items():
            if not isinstance(values, dict) or not values:
                raise RecipeError(f"{axis}.{name}: give a table of field = value, e.g. {{\"model.mixer\" = \"mamba\"}}")
        if bundles:
            axes[str(axis)] = {str(k): dict(v) for k, v in bundles.items()}
    return axes


def _exclude(items: Any) -> tuple[dict[str, Any], ...]:
    if not isinstance(items, list) or not all(isinstance(e, dict) and e for e in items):
        raise RecipeError(f"exclude = {items!r}: give a list of partial cells, e.g. "
                          "exclude = [{length = \"T64\", \"model.d_model\" = 256}]")
    return tuple(dict(e) for e in items)


def _objectives(items: Any) -> tuple[tuple[str, str], ...]:
    items = [items] if isinstance(items, str) else items
    if not isinstance(items, list):
        raise RecipeError(f"objectives = {items!r}: give a metric or a list of them, e.g. objectives = [\"val_bpb\"]")
    out = []
    for item in items:
        if not isinstance(item, (str, dict)):
            raise RecipeError(f"objectives: {item!r} is not a metric name or {{metric = ..., direction = ...}}")
        name, direction = (item, None) if isinstance(item, str) else (item.get("metric"), item.get("direction"))
        _unknown("objectives", [name], metric_names())
        direction = direction or metric(name).direction
        if direction not in ("minimize", "maximize"):
            raise RecipeError(f"objective {name}: direction must be minimize or maximize, got {direction!r}")
        out.append((name, direction))
    if not out:
        raise RecipeError("objectives: give at least one, e.g. objectives = [\"val_bpb\"]")
    return tuple(out)


def _measure(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    measure = {k: dict(v) for k, v in doc.get("measure", {}).items()}
    _unknown("measure", measure, MEASURES)
    for kind, opts in measure.items():
        _unknown(f"measure.{kind}", opts, MEASURES[kind])
        if opts.get("of", "mixer") not in ("mixer", "model"):
            raise RecipeError(f"measure.{kind}.of must be 'mixer' (the first layer's) or 'model'")
    return measure


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
    nproc: int = 1  # ranks of one trial (torchrun on the worker's machine; `experiments.distributed`)
    measure: dict[str, dict[str, Any]] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    exclude: tuple[dict[str, Any], ...] = ()  # partial grid cells left out
    source: str = ""

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
        _unknown("recipe", raw, SECTIONS)
        doc = _scaled(raw, scale)
        _check_types(doc)
        for section, keys in SECTIONS.items():
            if keys is not None and section != "scale":
                _unknown(f"recipe [{section}]" if section == "base" else section, doc.get(section, {}), keys)
        for key in ("name", "description"):
            if not isinstance(doc.get(key, ""), str):
                raise RecipeError(f"{key} = {doc[key]!r}: must be a string")
        for key in ("space", "variants", "axes", "base", "measure"):
            if not isinstance(doc.get(key, {}), dict):
                raise RecipeError(f"{key} = {doc[key]!r}: must be a table")
        name = doc.get("name") or Path(source).stem
        if not name:
            raise RecipeError("recipe: give it a name (name = \"...\")")
        space = tuple(Param.parse(p, s) for p, s in doc.get("space", {}).items())
        raw_constraints = doc.get("constraints", {})
        if not isinstance(raw_constraints, dict):
            raise RecipeError(f"constraints = {raw_constraints!r}: must be a table of metric = maximum")
        _unknown("constraints", raw_constraints, metric_names())
        for k, v in raw_constraints.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                raise RecipeError(f"constraints.{k}={v!r}: must be a number (the metric's maximum)")
        constraints = {str(k): float(v) for k, v in raw_constraints.items()}
        budget, trial = doc.get("budget", {}), doc.get("trial", {})
        recipe = cls(name=name, scale=scale, description=doc.get("description", ""), base=doc.get("base", {}),
                     space=space, axes=_axes(doc, space), objectives=_objectives(doc.get("objectives", ["val_bpb"])),
                     constraints=constraints, sampler=dict(doc.get("sampler", {"kind": "tpe"})),
                     pruner=dict(doc.get("pruner", {"kind": "none"})), trials=budget.get("trials"),
                     timeout_s=budget.get("timeout_s"), trial_timeout_s=float(trial.get("timeout_s", 3600)),
                     threads=trial.get("threads"), jobs=int(trial.get("jobs", 1)),
                     nproc=int(trial.get("nproc", 1)), measure=_measure(doc),
                     report=dict(doc.get("report", {})), exclude=_exclude(doc.get("exclude", [])),
                     source=source)
        recipe.validate()
        return recipe

    @property
    def grid(self) -> bool:
        return self.sampler.get("kind", "tpe") == "grid"

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def prunes(self) -> bool:
        return not self.multi_objective and self.pruner.get("kind", "none") != "none"

    @property
    def study_name(self) -> str:
        return f"{self.name}-{self.scale}"

    def validate(self) -> None:
        _choose("sampler", self.sampler.get("kind", "tpe"), SAMPLERS)
        _choose("pruner", self.pruner.get("kind", "none"), [*PRUNERS, "sweep"])
        if self.pruner.get("kind") == "sweep":
            if not self.report.get("best_over"):
                raise RecipeError("pruner.kind='sweep' stops a cell's swept settings that fall behind their "
                                  "siblings: name the swept parameters in [report] best_over, e.g. ['train.lr']")
            if not self.pruner.get("margin", 0.2) > 0:
                raise RecipeError(f"pruner.margin={self.pruner.get('margin')!r} must be positive (how far behind "
                                  "a sibling, in the objective's units, a trial is stopped)")
        if self.multi_objective and self.pruner.get("kind", "none") != "none":
            raise RecipeError("a multi-objective study cannot prune (Optuna raises on trial.report); optimise one "
                              "objective and put memory or parameters under [constraints], or set pruner.kind='none'")
        if self.grid:
            ranges = [p.path for p in self.space if p.choices is None]
            if ranges:
                raise RecipeError(f"grid mode needs lists of values; {', '.join(ranges)} are ranges")
        elif self.trials is None and self.timeout_s is None:
            raise RecipeError("budget: a sampled study needs budget.trials and/or budget.timeout_s")
        self._check_exclude()
        kind = None
        for params in self.configs_to_validate():
            try:
                _, _, data = build_specs(self.config_for(params))
            except ConfigError as exc:
                raise RecipeError(f"recipe {self.name} ({_fmt(params)}): {exc}") from None
            kind = data.kind
        for name, _ in self.objectives:
            needs = metric(name).kind
            if needs in ("corpus", "task") and kind is not None and needs != kind:
                use = "val_bpb" if kind == "corpus" else "accuracy"
                raise RecipeError(f"objective {name} needs a {needs}; this recipe trains on a {kind} (use {use})")

    def configs_to_validate(self) -> list[dict[str, Any]]:
        if self.grid:
            return self.grid_cells()
        axes = [list(b) for b in self.axes.values()] + [p.corners() for p in self.space]
        names = list(self.axes) + [p.path for p in self.space]
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*axes)][:64]

    def grid_cells(self) -> list[dict[str, Any]]:
        """The grid's cells, in order, without the ``exclude``d ones."""
        cells = self._all_cells()
        return [c for c in cells if not any(all(c[k] == v for k, v in e.items()) for e in self.exclude)]

    def _all_cells(self) -> list[dict[str, Any]]:
        axes = [(a, list(b)) for a, b in self.axes.items()] + [(p.path, list(p.choices)) for p in self.space]
        names = [a for a, _ in axes]
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*[v for _, v in axes])]

    def _check_exclude(self) -> None:
        if not self.exclude:
            return
        if not self.grid:
            raise RecipeError("exclude leaves cells out of a grid; this recipe samples (sampler.kind="
                              f"{self.sampler.get('kind', 'tpe')!r}): remove exclude or set sampler.kind = \"grid\"")
        choices = {a: list(b) for a, b in self.axes.items()} | {p.path: list(p.choices or ()) for p in self.space}
        for i, entry in enumerate(self.exclude):
            for key, value in entry.items():
                if key not in choices:
                    raise RecipeError(f"exclude[{i}].{key}: not an axis or [space] field of this recipe "
                                      f"(scale {self.scale}){did_you_mean(key, choices)}; valid: {', '.join(choices)}")
                if value not in choices[key]:
                    raise RecipeError(f"exclude[{i}].{key}={value!r}: not one of its values at scale {self.scale} "
                                      f"({', '.join(map(repr, choices[key]))}); put the entry under that scale's "
                                      "[scale.X] table if it belongs to one scale")
        if not self.grid_cells():
            raise RecipeError("exclude leaves no cell of the grid: nothing would run")

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
        params = {axis: trial.suggest_categorical(axis, list(bundles)) for axis, bundles in self.axes.items()}
        for p in self.space:
            params[p.path] = p.suggest(trial)
        return params

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["space"] = [dataclasses.asdict(p) for p in self.space]
        return json.loads(json.dumps(d))

    def make_sampler(self) -> Any:
        return SAMPLERS[self.sampler.get("kind", "tpe")](self.sampler)

    def make_pruner(self) -> Any:
        if self.pruner.get("kind") == "sweep":
            from experiments.study.pruners import SweepPruner

            return SweepPruner(self.report.get("best_over", []), self.pruner.get("margin", 0.2),
                               self.pruner.get("n_warmup_steps", 0))
        return PRUNERS[self.pruner.get("kind", "none")](self.pruner)


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
