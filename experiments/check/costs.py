"""A check's costs: time and peak memory vs T (forward, forward+backward), the fitted exponents and the
largest T whose peak fits the budget, and decoding latency and cache bytes vs context — of the mixer under
check and of each baseline at the same width, taking turns in the same run, each point in a fresh process
(`experiments.probes`). Each point is a `Parts` piece: a rerun reuses the finished ones."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from experiments.check.plan import CheckPlan, Parts, safe_name
from experiments.child import Isolation
from experiments.probes import decode_point, decode_result, scaling_point, scaling_result
from experiments.targets import resolve_target

__all__ = ["measure_costs", "summarise_costs"]

Say = Callable[[str], None]
MODE_NAMES = {"fwd": "forward", "fwdbwd": "forward+backward", "train": "training step"}


def _point(row: dict[str, Any]) -> str:
    if row.get("status") != "ok":
        return row.get("status", "?")
    if "latency_s" in row:
        return f"{row['latency_s'] * 1e3:.3f} ms/token, cache {row['cache_bytes']:,} bytes"
    return f"{row['time_s'] * 1e3:.2f} ms, peak {row['peak_bytes'] / 2**20:.1f} MiB"


def measure_costs(plan: CheckPlan, parts: Parts, say: Say) -> dict[str, Any]:
    """``{"scaling": {label: {mode: scaling result}}, "decode": {label: decode result}}`` for every subject.

    The subjects take turns at each length (T = 512: the mixer, attention, mamba; then T = 1024 ...), so a
    slow spell of the machine touches them alike and the ratios between them hold."""
    isolation = Isolation(threads=plan.threads, timeout=plan.timeout)
    targets = {label: resolve_target(mixer=mixer, options=options, d_model=plan.d_model)
               for label, mixer, options in plan.subjects}
    code = {label: plan.code if label == plan.label else "" for label in targets}  # a changed source: measured anew

    def point(kind: str, label: str, at: int, inputs: dict[str, Any], measure: Callable[..., dict[str, Any]],
              **kwargs: Any) -> dict[str, Any]:
        key = f"{kind}-{safe_name(label)}-{at}"
        inputs = {"target": targets[label], "code": code[label], **inputs}
        row = parts.get(key, inputs)
        if row is None:
            row = measure(targets[label], at, isolation=isolation, **kwargs)
            if not row["status"].startswith(("skipped", "n/a")):
                parts.put(key, inputs, row)
            say(f"  {label}: {_point(row)}")
        else:
            say(f"  {label}: {_point(row)} (reused from an earlier run of this check)")
        return row

    out: dict[str, Any] = {"scaling": {label: {} for label in targets}, "decode": {}}
    for mode in plan.modes:
        rows: dict[str, list[dict[str, Any]]] = {label: [] for label in targets}
        for t in plan.lengths:
            say(f"{MODE_NAMES.get(mode, mode)} at T = {t}:")
            for label in targets:
                rows[label].append(point(f"cost-{mode}", label, t, {"repeats": plan.repeats, "threads": plan.threads},
                                         scaling_point, earlier=rows[label], mode=mode, repeats=plan.repeats))
        for label, target in targets.items():
            out["scaling"][label][mode] = scaling_result(target, rows[label], mode=mode, repeats=plan.repeats,
                                                         budget_bytes=plan.budget_gb * 2**30, isolation=isolation)
    rows = {label: [] for label in targets}
    for c in plan.contexts:
        say(f"decoding {plan.decode_steps} steps after {c} tokens:")
        for label in targets:
            rows[label].append(point("decode", label, c, {"steps": plan.decode_steps, "threads": plan.threads},
                                     decode_point, steps=plan.decode_steps))
    for label, target in targets.items():
        out["decode"][label] = decode_result(target, rows[label], steps=plan.decode_steps, isolation=isolation)
    return out


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "ok"]


def summarise_costs(costs: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per subject and mode: the time and memory at the longest length every subject reached, the
    fitted exponents, the largest T within the budget; and the decoding latency and cache at the longest
    context."""
    common: dict[str, int | None] = {}
    for mode in {m for by_mode in costs["scaling"].values() for m in by_mode}:
        reached = [{r["seq_len"] for r in _ok(by_mode[mode]["rows"])} for by_mode in costs["scaling"].values()
                   if mode in by_mode]
        shared = set.intersection(*reached) if reached else set()
        common[mode] = max(shared) if shared else None
    rows = []
    for label, by_mode in costs["scaling"].items():
        row: dict[str, Any] = {"subject": label}
        for mode, result in by_mode.items():
            at = {r["seq_len"]: r for r in _ok(result["rows"])}
            t = common[mode]
            fit = result["fit"]
            budget = result.get("budget") or {}
            row[mode] = {"seq_len": t, "time_s": at[t]["time_s"] if t in at else None,
                         "peak_bytes": at[t]["peak_bytes"] if t in at else None,
                         "time_exponent": fit["time"]["exponent"] if fit["time"] else None,
                         "memory_exponent": fit["memory"]["exponent"] if fit["memory"] else None,
                         "max_seq_len": budget.get("seq_len"), "max_how": budget.get("how"),
                         "longest": max(at) if at else None,
                         "failed": [r["seq_len"] for r in result["rows"] if r.get("status") != "ok"]}
        dec = costs["decode"].get(label)
        if dec is not None:
            ok = _ok(dec["rows"])
            last = ok[-1] if ok else None
            row["decode"] = {"context": last["context"] if last else None,
                             "ms_per_token": last["latency_s"] * 1e3 if last else None,
                             "cache_bytes": last["cache_bytes"] if last else None,
                             "state_bytes": last.get("state_bytes") if last else None,
                             "growth": dec.get("growth"),
                             "cache_exponent": (dec["fit"]["cache_bytes"] or {}).get("exponent")}
        rows.append(row)
    return rows
