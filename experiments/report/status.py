"""`status_text(study)`: the few lines `mixerlab study status` prints."""

from __future__ import annotations

from collections import Counter
from typing import Any

from experiments.report.families import FamilyOf, default_family
from experiments.report.records import metric_names
from experiments.report.tables import fmt_number, unit_of
from experiments.study.ledger import TrialRecord, read_trials

__all__ = ["status_text"]


def status_text(study: Any, family_of: FamilyOf | None = None) -> str:
    """Trials done / running / waiting / failed / pruned, and the best so far (single objective) or the
    Pareto front (multi-objective), as a few lines of text."""
    family_of = family_of or default_family
    records = read_trials(study)
    c = Counter(r.state for r in records)
    interrupted = sum(1 for r in records if r.interrupted)
    done = c["complete"] + c["pruned"] + c["failed"]
    names = metric_names(study)
    dirs = [d.name.lower() for d in study.directions]
    lines = [f"study {study.study_name}: " + ", ".join(f"{d} {m}" for m, d in zip(names, dirs, strict=True)),
             f"trials: {done} done ({c['complete']} complete, {c['pruned']} pruned, {c['failed']} failed"
             + (f", {interrupted} of them interrupted" if interrupted else "")
             + f"), {c['running']} running, {c['waiting']} waiting"]
    if not c["complete"]:
        lines.append("best so far: none (no complete trial yet)")
        return "\n".join(lines)
    by_number = {r.number: r for r in records}

    def describe(number: int) -> str:
        r = by_number[number]
        size = f", {fmt_number(r.summary.params)} params" if r.summary and r.summary.params else ""
        values = ", ".join(f"{m} = {fmt_number(v)}" + (f" {unit_of(m)}" if unit_of(m) else "")
                           for m, v in zip(names, r.values, strict=True))
        return f"trial #{r.number} ({family_of(r)}{size}): {values}"

    if len(study.directions) == 1:
        lines.append("best so far: " + describe(study.best_trial.number))
    else:
        front = sorted(study.best_trials, key=lambda t: t.values[0])
        lines.append(f"Pareto front: {len(front)} trial(s)")
        lines += [f"  {describe(t.number)}" for t in front[:10]]
        if len(front) > 10:
            lines.append(f"  ... and {len(front) - 10} more")
    failed: list[TrialRecord] = [r for r in records if r.state == "failed" and r.fail_reason]
    for r in failed[-3:]:
        lines.append(f"failed: trial #{r.number}: {r.fail_reason}")
    return "\n".join(lines)
