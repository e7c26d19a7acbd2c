"""Table rows from a study's trials: one dict of raw values per finished trial, read from its `TrialRecord`.

`table_rows(study)` is what tables and figures share: family, layers, depth, width, parameters, the quality
metrics, costs, long-context numbers when measured, backends and status. A failed or interrupted trial whose
retry has finished is left out (`superseded`): its retry stands in its place.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

from experiments.fits import fit_power_law
from experiments.metrics import ALIASES, METRICS
from experiments.report.families import FamilyOf, default_family, family_sort_key, layer_pattern, layers_text
from experiments.study.ledger import TrialRecord, read_trials

__all__ = ["best_of_sweep", "decode_rows", "loss_len_rows", "memory_rows", "metric_names", "num",
           "objective_key", "superseded", "table_rows", "trial_row"]


def num(x: Any) -> float | None:
    """A finite number as a float, else None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def metric_names(study: Any) -> list[str]:
    names = getattr(study, "metric_names", None)
    if names:
        return list(names)
    n = len(study.directions)
    return ["value"] if n == 1 else [f"value {i}" for i in range(n)]


def objective_key(name: str) -> str:
    """The row key of an objective: the metric's name (old aliases resolved), else ``objective:<name>``."""
    name = ALIASES.get(name, name)
    return name if name in METRICS else f"objective:{name}"


def _measured(record: TrialRecord, kind: str) -> list[dict[str, Any]]:
    """The rows of one long-context measurement (``memory``, ``decode``, ``context``) that succeeded."""
    data = (record.summary.measure if record.summary else {}).get(kind) or {}
    rows = data.get("rows", []) if isinstance(data, dict) else []
    return [r for r in rows if isinstance(r, dict) and r.get("status", "ok") == "ok"]


def memory_rows(record: TrialRecord) -> list[dict[str, Any]]:
    rows = [r for r in _measured(record, "memory") if num(r.get("seq_len"))]
    return sorted(rows, key=lambda r: r["seq_len"])


def decode_rows(record: TrialRecord) -> list[dict[str, Any]]:
    rows = []
    for r in _measured(record, "decode"):
        if num(r.get("context")) is not None:
            ms = r["latency_s"] * 1e3 if num(r.get("latency_s")) is not None else None
            rows.append({"context": r["context"], "latency_ms": ms, "cache_bytes": num(r.get("cache_bytes"))})
    return sorted(rows, key=lambda r: r["context"])


def loss_len_rows(record: TrialRecord) -> list[dict[str, Any]]:
    rows = [r for r in _measured(record, "context") if num(r.get("seq_len")) and num(r.get("loss")) is not None]
    return sorted(rows, key=lambda r: r["seq_len"])


def _by_sorted(values: Iterable[Any]) -> list[Any]:
    def key(v: Any) -> tuple[int, float, str]:
        try:
            return 0, float(v), ""
        except (TypeError, ValueError):
            return 1, 0.0, str(v)

    return sorted(values, key=key)


def _status(record: TrialRecord) -> tuple[str, str]:
    if record.state == "pruned":
        s = record.summary
        step = (s.steps if s else None) or record.last_step
        total = s.total_steps if s else None
        at = f" at step {step}" + (f"/{total}" if total else "") if step is not None else ""
        return "pruned", f"pruned{at}"
    if record.state == "failed":
        return "failed", str(record.fail_reason or "no reason recorded")
    return record.state, ""


def trial_row(record: TrialRecord, family: str) -> dict[str, Any]:
    """One table row of raw values (`table_rows` sorts them and adds the objectives)."""
    from experiments.runs import TrialSummary

    s = record.summary or TrialSummary(status="unknown")
    model = record.config.get("model", {})
    pattern = layer_pattern(record)
    status, reason = _status(record)
    row: dict[str, Any] = {
        "trial": record.number, "family": family, "pattern": layers_text(record),
        "n_layers": s.n_layers or record.params.get("model.n_layers") or model.get("n_layers")
        or (len(pattern) if pattern else None),
        "d_model": s.d_model or record.params.get("model.d_model") or model.get("d_model"),
        "seq_len": (record.config.get("train") or {}).get("seq_len"),
        "params": s.params, "flops_per_token": s.flops_per_token,
    }
    for name in ("val_ppl", "val_bpb", "val_loss", "accuracy", "exact_match"):
        row[name] = num(s.final.get(name))
    for attr, by_value in (s.final.get("by") or {}).items():
        if isinstance(by_value, dict):
            for value in _by_sorted(by_value):
                row[f"accuracy[{attr}={value}]"] = num(by_value[value])
    row.update(steps_to_target=s.target_reached_step, peak_memory_mib=num(s.peak_memory_mib),
               tokens_per_s=num(s.tokens_per_s), train_seconds=num(s.train_seconds))
    _long_context(row, record)
    row["backends"] = ", ".join(sorted({str(b) for b in s.backends.values()}))
    row.update(status=status, reason=reason)
    return row


def _long_context(row: dict[str, Any], record: TrialRecord) -> None:
    mem = memory_rows(record)
    if mem:
        xs = [r["seq_len"] for r in mem]
        row["max_seq_len_measured"] = mem[-1]["seq_len"]
        row["peak_mib_at_max_len"] = num(mem[-1].get("peak_bytes")) and mem[-1]["peak_bytes"] / 2**20
        for what, key in (("memory", "peak_bytes"), ("time", "time_s")):
            fit = fit_power_law(xs, [num(r.get(key)) for r in mem])
            row[f"{what}_exponent"] = fit["exponent"] if fit else None
    dec = [r for r in decode_rows(record) if r["latency_ms"] is not None]
    if dec:
        row["decode_context"] = dec[-1]["context"]
        row["decode_ms_per_token"] = dec[-1]["latency_ms"]
        row["cache_mib"] = dec[-1]["cache_bytes"] / 2**20 if dec[-1]["cache_bytes"] is not None else None
    lvl = loss_len_rows(record)
    if lvl:
        row["loss_eval_len"] = lvl[-1]["seq_len"]
        row["loss_at_eval_len"] = lvl[-1]["loss"]


def superseded(records: Sequence[TrialRecord]) -> set[int]:
    """Failed or interrupted trials whose retry has since completed or been pruned: the tables show the retry
    in their place."""
    return {r.retry_of for r in records if r.state in ("complete", "pruned") and r.retry_of is not None}


def table_rows(study: Any, family_of: FamilyOf | None = None, sort: str = "family",
               records: list[TrialRecord] | None = None) -> list[dict[str, Any]]:
    """One dict per finished trial (complete, pruned, failed), raw values, sorted by family then size
    (``sort="family"``) or best objective first (``sort="objective"``)."""
    family_of = family_of or default_family
    everything = read_trials(study) if records is None else records
    redone = superseded(everything)
    trials = [r for r in everything if r.finished and r.number not in redone]
    names = metric_names(study)
    multi = len(study.directions) > 1
    front = {t.number for t in study.best_trials} if multi and any(r.state == "complete" for r in trials) else set()
    rows = []
    for r in trials:
        row = trial_row(r, family_of(r))
        for i, name in enumerate(names):
            value = r.values[i] if r.values is not None and i < len(r.values) else None
            key = objective_key(name)
            if row.get(key) is None and value is not None:
                row[key] = value
        if multi:
            row["pareto"] = "yes" if r.number in front else ""
        rows.append(row)
    order = {"complete": 0, "pruned": 1, "failed": 2}
    if sort == "objective" and not multi:
        sign = 1 if study.directions[0].name == "MINIMIZE" else -1
        key0 = objective_key(names[0])
        rows.sort(key=lambda r: (order.get(r["status"], 3), r.get(key0) is None, sign * (r.get(key0) or 0),
                                 r["trial"]))
    else:
        rows.sort(key=lambda r: (family_sort_key(r["family"]), r["params"] is None, r["params"] or 0,
                                 r["n_layers"] or 0, r["d_model"] or 0, r["trial"]))
    return rows


def best_of_sweep(study: Any, rows: list[dict[str, Any]], sweep: Sequence[str],
                  records: list[TrialRecord] | None = None) -> list[dict[str, Any]]:
    """One row per cell: the best complete trial over the ``sweep`` parameters (e.g. ``["train.lr"]``),
    marked with the values it was chosen at (``best_of``); cells with no complete trial keep their first row."""
    params = {r.number: r.params for r in (read_trials(study) if records is None else records)}
    minimize = study.directions[0].name == "MINIMIZE"
    key0 = objective_key(metric_names(study)[0])
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        cell = {k: v for k, v in params.get(row["trial"], {}).items() if k not in sweep}
        groups.setdefault(json.dumps(cell, sort_keys=True, default=str), []).append(row)
    out = []
    for members in groups.values():
        done = [r for r in members if r["status"] == "complete" and r.get(key0) is not None]

        def rank(r: dict[str, Any]) -> tuple[float, float]:  # ties (e.g. both solved): fewer steps to target
            steps = r.get("steps_to_target") or math.inf
            return (r[key0], steps) if minimize else (r[key0], -steps)

        best = (min if minimize else max)(done, key=rank) if done else members[0]
        chosen = ", ".join(f"{k}={params.get(best['trial'], {}).get(k)}" for k in sweep)
        out.append({**best, "best_of": f"{chosen} (best of {len(members)})"})
    order = {id(r): i for i, r in enumerate(rows)}
    return sorted(out, key=lambda r: min(order[id(m)] for m in rows if m["trial"] == r["trial"]))
