"""What a recipe will cost on this machine, said before it starts: the number of trials (and, on a resume, how
many are left) and an estimate of the wall time, from a short measured calibration.

Every distinct trial shape (a trial's config without the parameters that do not change its cost: the learning
rate and the like) is built once in a fresh process with the recipe's threads, ``jobs`` such processes at a
time as the study runs its trials (so each is timed beside the same competition for cores, caches and memory
bandwidth), and timed for a whole training step (forward, backward, AdamW; `experiments.measure.bench_model`,
mode ``train``), one evaluation during training and the final one (every test slice), and the making of its
test set; a process's start-up is the calibrating process's own. A trial's estimate is

    start-up + test set + steps x step + (evaluations - 1) x evaluation + final evaluation,

and the study's is its trials left packed onto ``jobs`` parallel slots (the longest first). That is the cost
when no trial stops early; a target accuracy reached or a pruned learning rate make it shorter. It is a
measurement of this machine now: a busier or slower one later makes it longer. The calibration is kept in the
run directory (``estimate.json``, keyed by the slots and threads it was timed with), so a resumed study says
it again without measuring again.
"""

from __future__ import annotations

import copy
import heapq
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Estimate", "calibrate", "estimate", "finished_cells", "trial_seconds"]

#: train fields that change what a trial learns but not what it costs per step or per evaluation
_COST_FREE = ("lr", "steps", "warmup_steps", "weight_decay", "eval_interval", "target_accuracy", "log_interval",
              "seed")
_PARTS = ("step_s", "eval_s", "final_eval_s", "prepare_s", "startup_s")


@dataclass(frozen=True)
class Estimate:
    trials: int  # the study's
    left: int  # of them, still to run
    jobs: int
    seconds: float  # the packed wall time of the trials left
    trial_seconds: tuple[float, ...]  # of the trials left
    shapes: int  # distinct shapes calibrated
    calibration_s: float  # what the calibration took (0 when it was reused)

    def describe(self, name: str) -> str:
        hours = self.seconds / 3600
        when = (f"{hours:.1f} h" if hours >= 1 else f"{self.seconds / 60:.0f} min" if self.seconds >= 60
                else "a minute")
        count = f"{self.trials} trials" + (f" ({self.left} left)" if self.left != self.trials else "")
        if not self.left:
            return f"{name}: {count}; nothing left to run."
        text = (f"{name}: {count}, {self.jobs} at a time; estimated {when} on this machine if no trial stops "
                f"early ({max(self.trial_seconds, default=0) / 60:.1f} min for the longest trial: training steps, "
                f"evaluations and start-up timed for {self.shapes} trial shapes, {self.jobs} at a time" +
                (f", in {self.calibration_s:.0f} s" if self.calibration_s else ", calibrated earlier") + ").")
        if hours >= 1:
            text += " Longer than one sitting: Ctrl-C stops cleanly, and rerunning the same command resumes."
        return text


def _shape(config: dict[str, Any]) -> str:
    shape = copy.deepcopy(config)
    for key in _COST_FREE:
        shape.get("train", {}).pop(key, None)
    return json.dumps(shape, sort_keys=True)


def trial_seconds(config: dict[str, Any], cost: dict[str, float]) -> float:
    """A trial's estimated wall time from its shape's calibrated ``cost`` (see the module's formula)."""
    from experiments.config import TrainSpec

    train = TrainSpec.from_dict(dict(config.get("train", {})))
    steps = train.total_steps
    evals = -(-steps // train.eval_interval)  # at every eval_interval steps and at the last one
    return (cost["startup_s"] + cost["prepare_s"] + steps * cost["step_s"] + (evals - 1) * cost["eval_s"]
            + cost["final_eval_s"])


def calibrate(configs: list[dict[str, Any]]) -> dict[str, Any]:
    """In a fresh process with the trials' threads: each config's seconds of one training step, of making its
    test set, of one evaluation during training and of the final one; and the seconds this process spent."""
    import torch

    from archs.model import LanguageModel
    from experiments.config import build_specs
    from experiments.measure import bench_model
    from experiments.train import plan

    t0, out = time.perf_counter(), []
    for config in configs:
        model, train, data = build_specs(config)
        p = plan(model, train, data)
        t = time.perf_counter()
        p.data.prepare(p.model_spec)
        prepare = time.perf_counter() - t
        step = float(bench_model(p.model_spec.to_dict(), batch=train.batch_size, seq_len=p.data.seq_len,
                                 mode="train", repeats=3, device=p.device.type)["time_s"])  # the median
        lm = LanguageModel(p.model_spec).to(p.device).eval()
        timed = []
        with torch.no_grad():
            p.data.evaluate(lm, p.device, final=False)  # warm-up
            for final in (False, True) if p.data.eval_extent()[0] > p.data.seq_len else (False,):
                t = time.perf_counter()
                p.data.evaluate(lm, p.device, final=final)
                timed.append(time.perf_counter() - t)
        out.append({"step_s": step, "eval_s": timed[0], "final_eval_s": timed[-1], "prepare_s": prepare})
    return {"costs": out, "busy_s": time.perf_counter() - t0}


def finished_cells(recipe: Any, storage_url: str) -> list[dict[str, Any]]:
    """The params of the trials the recipe's study in ``storage_url`` has finished (complete, pruned, or failed
    for a reason of its own); none when the study does not exist yet. Reads only."""
    import optuna

    from experiments.study import ledger

    if storage_url.startswith("sqlite:///") and not Path(storage_url[len("sqlite:///"):]).exists():
        return []
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=recipe.study_name, storage=ledger.make_storage(storage_url, None))
    except KeyError:
        return []
    return [r.params for r in ledger.read_trials(study)
            if r.state in ("complete", "pruned") or (r.state == "failed" and r.failed_final)]


def _configs(recipe: Any, finished: list[dict[str, Any]]) -> tuple[int, list[dict[str, Any]]]:
    """The study's trial count and the configs of the trials left (a sampled study: its budget of trials
    left, at its range corners' mean cost)."""
    if recipe.grid:
        cells = recipe.grid_cells()
        done = {json.dumps(p, sort_keys=True) for p in finished}
        return len(cells), [recipe.config_for(c) for c in cells if json.dumps(c, sort_keys=True) not in done]
    corners = [recipe.config_for(c) for c in recipe.configs_to_validate()]
    total = recipe.trials or len(corners)
    left = max(0, total - len(finished))
    return total, (corners * (left // max(1, len(corners)) + 1))[:left]


def estimate(recipe: Any, out: Path, jobs: int | None = None,
             finished: list[dict[str, Any]] | None = None) -> Estimate:
    """The estimate for ``recipe`` (a `Recipe`) without the trials whose params are in ``finished``,
    calibrating the shapes ``out/estimate.json`` does not hold yet."""
    from experiments.child import Isolation, run_isolated

    slots = max(1, jobs or recipe.jobs)
    total, configs = _configs(recipe, finished or [])
    context = f"jobs={slots} threads={recipe.threads or 'default'}"
    shapes = [_shape(c) for c in configs]
    cache_path = out / "estimate.json"
    try:
        cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    except (OSError, ValueError):
        cache = {}
    known = cache.get(context, {}) if isinstance(cache.get(context), dict) else {}
    todo = sorted({s for s in shapes if not set(_PARTS) <= set(known.get(s) or {})})
    took = 0.0
    if todo:
        groups = [todo[i::slots] for i in range(min(slots, len(todo)))]

        def run(group: list[str]) -> list[dict[str, float]]:
            t = time.perf_counter()
            got = run_isolated("experiments.study.estimate:calibrate", {"configs": [json.loads(s) for s in group]},
                               Isolation(threads=recipe.threads or None, timeout=3600))
            startup = max(0.0, time.perf_counter() - t - got["busy_s"])
            return [{**c, "startup_s": startup} for c in got["costs"]]

        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(groups)) as pool:  # the slots run at once, as the study's trials will
            for group, costs in zip(groups, pool.map(run, groups), strict=True):
                known.update(zip(group, costs, strict=True))
        took = time.perf_counter() - t0
        cache = {k: v for k, v in cache.items() if isinstance(v, dict)}  # an older format's entries go
        cache[context] = known
        out.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(cache, indent=1) + "\n")
    per_trial = [trial_seconds(c, known[s]) for s, c in zip(shapes, configs, strict=True)]
    loads = [0.0] * slots
    for t in sorted(per_trial, reverse=True):  # longest first onto the least-loaded slot
        heapq.heapreplace(loads, loads[0] + t)
    return Estimate(trials=total, left=len(configs), jobs=slots, seconds=max(loads), trial_seconds=tuple(per_trial),
                    shapes=len(set(shapes)), calibration_s=took)
