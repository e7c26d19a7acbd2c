"""A check's quality probe: a 2-layer model of the mixer under check, of ``attention`` and of ``mamba``
(`CheckPlan.probe_run`: same width, same steps, same learning rate, same data) trained on each probe task,
``jobs`` runs at a time, each in a fresh process with one thread. Each run's directory is
``DIR/probe/<task>/<subject>`` (metrics, checkpoint, summary: an interrupted probe resumes from its last
evaluation), and its result a `Parts` piece."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from experiments.check.plan import CheckPlan, Parts, safe_name
from experiments.child import Isolation, run_isolated
from experiments.errors import MeasureError

__all__ = ["quality_probe", "train_probe"]

Say = Callable[[str], None]
FINISHED = ("completed", "diverged")  # a run that ends this way ends so again: its result is kept


def train_probe(run: dict[str, Any], out: str) -> dict[str, Any]:
    """Train one probe run (in the child process); its accuracy curve and final figures."""
    from archs.model import ModelSpec
    from experiments.config import DataSpec, TrainSpec
    from experiments.train import train

    s = train(ModelSpec.from_dict(run["model"]), TrainSpec.from_dict(run["train"]), DataSpec.from_dict(run["data"]),
              out, progress=False)
    by_len = {str(k): v for k, v in ((s.final.get("by") or {}).get("seq_len") or {}).items()}
    accuracy = by_len.get(str(run["train"]["seq_len"]), s.final.get("accuracy"))
    curve = [[e["step"], e.get("accuracy")] for e in s.evals]  # training-length slices before the end
    if curve and s.final:
        curve[-1][1] = accuracy  # the last evaluation covers every length: keep the training length's
    return {"status": s.status, "steps": s.steps, "total_steps": s.total_steps,
            "target_reached_step": s.target_reached_step, "curve": curve, "accuracy": accuracy,
            "by_seq_len": by_len, "params": s.params,
            "train_seconds": s.train_seconds, "tokens_per_s": s.tokens_per_s, "backends": s.backends}


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _one(plan: CheckPlan, parts: Parts, subject: tuple[str, str, dict[str, Any]], task: str, say: Say
         ) -> dict[str, Any]:
    run = plan.probe_run(subject, task)
    key = f"probe-{task}-{safe_name(subject[0])}"
    inputs = {"run": run, "code": plan.code if subject[0] == plan.label else ""}
    done = parts.get(key, inputs)
    if done is not None:
        say(f"{task}, {subject[0]}: reused from an earlier run of this check (accuracy {_acc(done['accuracy'])})")
        return done
    out = Path(parts.out) / "probe" / task / safe_name(subject[0])
    try:
        result = run_isolated("experiments.check.quality:train_probe", {"run": run, "out": str(out)},
                              Isolation(threads=1, timeout=plan.timeout, on_parent_death="SIGTERM"))
    except MeasureError as exc:
        lines = str(exc).strip().splitlines()
        say(f"{task}, {subject[0]}: failed: {lines[-1] if lines else exc}")
        return {"status": "failed", "error": str(exc), "curve": [], "accuracy": None, "by_seq_len": {}}
    reached = result["target_reached_step"]
    say(f"{task}, {subject[0]}: {result['status']}, accuracy {_acc(result['accuracy'])} after {result['steps']} "
        f"steps" + (f" (0.99 reached at step {reached})" if reached else "") + f", {result['train_seconds']:.0f} s")
    if result["status"] in FINISHED:
        parts.put(key, inputs, result)
    return result


def quality_probe(plan: CheckPlan, parts: Parts, say: Say) -> dict[str, dict[str, Any]]:
    """``{task: {subject label: result}}``: every subject trained on every probe task."""
    jobs = [(task, subject) for task in plan.tasks for subject in plan.subjects]
    say(f"training {len(jobs)} probe models ({', '.join(plan.tasks)}; {plan.probe_steps} steps at most, "
        f"batch {plan.probe_batch}, lr {plan.probe_lr:g}, d_model {plan.d_model}), {plan.jobs} at a time")
    with ThreadPoolExecutor(max_workers=plan.jobs) as pool:
        futures = [(task, subject, pool.submit(_one, plan, parts, subject, task, say)) for task, subject in jobs]
        results: dict[str, dict[str, Any]] = {}
        for task, subject, future in futures:
            results.setdefault(task, {})[subject[0]] = future.result()
    return results
