"""What a recipe will cost on this machine, said before it starts: the number of trials and an estimate of
the wall time, from a short measured calibration.

Every distinct trial shape (a trial's config without the parameters that do not change the cost per step:
the learning rate and the like) is built once in a fresh process with the recipe's threads and timed for a
whole training step (forward, backward, AdamW; `experiments.measure.bench_model`, mode ``train``); a trial's
estimate is its steps times that, and the study's is the trials packed onto ``jobs`` parallel slots (the
longest first). It is an upper bound where trials stop early (a target accuracy reached, a pruned learning
rate) and leaves out evaluations and process start-up. The calibration is kept in the run directory
(``estimate.json``), so a resumed study says it again without measuring again.
"""

from __future__ import annotations

import copy
import heapq
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Estimate", "estimate", "step_seconds"]

#: train fields that change what a trial learns but not what one of its steps costs
_COST_FREE = ("lr", "steps", "warmup_steps", "weight_decay", "eval_interval", "eval_examples", "eval_batches",
              "target_accuracy", "log_interval", "seed")


@dataclass(frozen=True)
class Estimate:
    trials: int
    jobs: int
    seconds: float  # the packed wall time
    trial_seconds: tuple[float, ...]
    shapes: int  # distinct shapes calibrated
    calibration_s: float  # what the calibration took (0 when it was reused)

    def describe(self, name: str) -> str:
        hours = self.seconds / 3600
        when = (f"{hours:.1f} h" if hours >= 1 else f"{self.seconds / 60:.0f} min" if self.seconds >= 60
                else "a minute")
        text = (f"{name}: {self.trials} trials, {self.jobs} at a time; estimated at most {when} on this machine "
                f"({max(self.trial_seconds, default=0) / 60:.1f} min for the longest trial; training steps timed "
                f"for {self.shapes} trial shapes" + (f" in {self.calibration_s:.0f} s" if self.calibration_s else
                                                     ", calibrated earlier") +
                "; early stops make it shorter).")
        if hours >= 1:
            text += " Longer than one sitting: Ctrl-C stops cleanly, and rerunning the same command resumes."
        return text


def _shape(config: dict[str, Any]) -> str:
    shape = copy.deepcopy(config)
    for key in _COST_FREE:
        shape.get("train", {}).pop(key, None)
    return json.dumps(shape, sort_keys=True)


def _steps(config: dict[str, Any]) -> int:
    from experiments.config import TrainSpec

    train = TrainSpec.from_dict(dict(config.get("train", {})))
    if train.tokens is not None:
        return -(-train.tokens // (train.batch_size * train.seq_len))
    return train.steps


def step_seconds(configs: list[dict[str, Any]]) -> list[float]:
    """Seconds of one training step of each config (run it in a fresh process with the trials' threads)."""
    from experiments.config import build_specs
    from experiments.measure import bench_model
    from experiments.train import plan

    out = []
    for config in configs:
        model, train, data = build_specs(config)
        p = plan(model, train, data)
        r = bench_model(p.model_spec.to_dict(), batch=train.batch_size, seq_len=p.data.seq_len, mode="train",
                        repeats=1, device=p.device.type)
        out.append(float(r["time_s"]))
    return out


def estimate(recipe: Any, out: Path, jobs: int | None = None) -> Estimate:
    """The estimate for ``recipe`` (a `Recipe`; grid cells, or its trial budget's worth of range corners),
    calibrating the shapes ``out/estimate.json`` does not hold yet."""
    import time

    from experiments.child import Isolation, run_isolated

    cells = recipe.grid_cells() if recipe.grid else recipe.configs_to_validate()
    configs = [recipe.config_for(c) for c in cells]
    if not recipe.grid and recipe.trials:  # a sampled study: its budget of trials, at the corners' mean cost
        configs = (configs * (recipe.trials // max(1, len(configs)) + 1))[:recipe.trials]
    shapes = [_shape(c) for c in configs]
    cache_path = out / "estimate.json"
    try:
        cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    except (OSError, ValueError):
        cache = {}
    todo = sorted({s for s in shapes if s not in cache})
    took = 0.0
    if todo:
        t0 = time.perf_counter()
        seconds = run_isolated("experiments.study.estimate:step_seconds",
                               {"configs": [json.loads(s) for s in todo]},
                               Isolation(threads=recipe.threads or None, timeout=1800))
        took = time.perf_counter() - t0
        cache.update(dict(zip(todo, seconds, strict=True)))
        out.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(cache, indent=1) + "\n")
    per_trial = [cache[s] * _steps(c) for s, c in zip(shapes, configs, strict=True)]
    slots = max(1, jobs or recipe.jobs)
    loads = [0.0] * slots
    for t in sorted(per_trial, reverse=True):  # longest first onto the least-loaded slot
        heapq.heapreplace(loads, loads[0] + t)
    return Estimate(trials=len(configs), jobs=slots, seconds=max(loads), trial_seconds=tuple(per_trial),
                    shapes=len(set(shapes)), calibration_s=took)
