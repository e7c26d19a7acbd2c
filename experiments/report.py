"""Reports from a study: a comparison table (Markdown and CSV) and figures (PNG and SVG).

`write_report(study, out_dir)` reads every trial of an Optuna study (any storage) — its ``params``, state,
objective values and the user attrs the study engine stores (``config``, ``summary``, ``fail_reason`` and,
when long-context measurements were added, ``measure``) — and writes into ``out_dir``:

- ``table.md`` / ``table.csv``: one row per finished trial (complete, pruned, failed with its reason):
  family, layer pattern, depth, width, parameters, the quality metrics (validation perplexity and bits per
  byte on a corpus; accuracy, overall and per test slice, on a task), peak memory, throughput, long-context
  numbers when measured, the backends that ran and the status. The Markdown opens with a line naming the
  study, units, data identity, date and machine, for pasting into the README. The CSV keeps full precision.
- figures, each as ``.png`` and ``.svg``: scaling (metric vs parameters and vs FLOPs per token, with a
  least-squares power law per family), learning curves, memory/time vs sequence length, decoding latency and
  cache vs context, loss vs evaluation length, accuracy vs length, the Pareto front (multi-objective), the
  optimisation history and Optuna's parameter importances. A figure whose data is absent is skipped, and
  the reason is recorded.
- ``report.json``: the fitted power laws, the skipped figures and the files written.

A **family** groups trials for colours, fits and sorting: the trial's ``variant`` parameter when the recipe
has variants, else a name derived from the layer pattern (``AAAA`` → attention, ``MMMM`` → mamba, ``SSSS``
→ mamba2, mixed → ``hybrid MMMA``). Pass ``family_of`` to group differently. Every family has one colour in
every figure (`family_colour`).

`status_text(study)` is the few lines `mixerlab study status` prints.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.probes import fit_power_law
from experiments.study import FINISHED_FAIL, METRICS, RECIPES_DIR

__all__ = [
    "FAMILY_COLOURS",
    "FIGURES",
    "Report",
    "default_family",
    "family_colour",
    "family_colours",
    "fmt_number",
    "metric_label",
    "scaling_fits",
    "status_text",
    "table_rows",
    "write_report",
]

#: fixed colours of the known mixer families (aliases map to the same colour)
FAMILY_COLOURS: dict[str, str] = {
    "attention": "#1f77b4",  # blue
    "mamba": "#ff7f0e",  # orange
    "mamba2": "#2ca02c",  # green
    "hybrid": "#9467bd",  # purple
    "sliding_window_attention": "#8c564b",  # brown
    "xformers_attention": "#17becf",  # cyan
}
_ALIASES = {
    "attn": "attention", "transformer": "attention", "full_attention": "attention", "sdpa": "attention",
    "mamba1": "mamba", "ssm": "mamba", "ssd": "mamba2", "mamba_2": "mamba2",
    "sliding_window": "sliding_window_attention", "swa": "sliding_window_attention",
    "window": "sliding_window_attention", "local_attention": "sliding_window_attention",
    "xformers": "xformers_attention", "memory_efficient_attention": "xformers_attention",
    "mea": "xformers_attention",
}
_HYBRID_COLOURS = ("#9467bd", "#d62728", "#e377c2", "#5e3c99", "#a50f15", "#c51b7d")  # purples and reds
_OTHER_COLOURS = ("#bcbd22", "#7f7f7f", "#393b79", "#637939", "#e7ba52", "#17a589", "#843c39", "#3182bd")
_FAMILY_ORDER = ("attention", "sliding_window_attention", "xformers_attention", "mamba", "mamba2", "hybrid")
_PATTERN_FAMILIES = {"A": "attention", "M": "mamba", "S": "mamba2", "W": "sliding_window_attention",
                     "X": "xformers_attention"}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")

FamilyOf = Callable[[Any], str]


# families and colours ---------------------------------------------------------------------------------------
def _canonical(family: str) -> str:
    key = family.strip().lower().replace("-", "_").replace(" ", "_")
    return _ALIASES.get(key, key)


def _stable_index(text: str, n: int) -> int:
    return int(hashlib.md5(text.encode()).hexdigest(), 16) % n


def family_colour(family: str) -> str:
    """The one colour of ``family`` in every figure (hex). Known families have fixed colours (attention
    blue, mamba orange, mamba2 green, hybrids purple/red, sliding window brown, xformers cyan); any other
    name gets a deterministic colour from its hash (the same in every run and process)."""
    key = _canonical(family)
    if key in FAMILY_COLOURS:
        return FAMILY_COLOURS[key]
    if key.startswith("hybrid"):
        return _HYBRID_COLOURS[_stable_index(key, len(_HYBRID_COLOURS))]
    return _OTHER_COLOURS[_stable_index(key, len(_OTHER_COLOURS))]


_SHADES = {  # variants of a known family (attention-rope, attention-alibi, ...): shades of its hue
    "attention": ("#08519c", "#6baed6", "#1f3b73", "#3182bd", "#9ecae1", "#2b8cbe"),
    "mamba": ("#d94801", "#fdae6b", "#a63603", "#fd8d3c", "#7f2704", "#f16913"),
    "mamba2": ("#006d2c", "#74c476", "#238b45", "#a1d99b", "#00441b", "#41ab5d"),
    "sliding_window_attention": ("#8c564b", "#c49c94", "#5b3a29", "#a0522d"),
    "xformers_attention": ("#17becf", "#0e7c86", "#9edae5", "#138d90"),
}


def _base_family(key: str) -> str:
    """``attention_rope`` → ``attention``; ``hybrid_mmma`` → ``hybrid``; an unrelated name → ``other``."""
    for name in sorted(FAMILY_COLOURS, key=len, reverse=True):
        if key.startswith(name) and key[len(name):][:1] in ("_", "("):
            return name
    return "other"


def family_colours(families: Iterable[str]) -> dict[str, str]:
    """Colours for the families of one report, all different: known families keep their fixed colour
    (`family_colour`), variants of one get shades of its hue, hybrids purples and reds, other names the
    remaining palette — assigned in sorted order, so the same set of families always gets the same colours."""
    out: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    for fam in sorted(set(families), key=_family_sort_key):
        key = _canonical(fam)
        if key in FAMILY_COLOURS:
            out[fam] = FAMILY_COLOURS[key]
        else:
            groups.setdefault(_base_family(key), []).append(fam)
    for base, members in groups.items():
        palette = _SHADES.get(base) or (_HYBRID_COLOURS if base == "hybrid" else _OTHER_COLOURS)
        free = [c for c in palette if c not in out.values()] or list(palette)
        for i, fam in enumerate(members):
            out[fam] = free[i % len(free)]
    return out


def _family_sort_key(family: str) -> tuple[int, str]:
    key = _canonical(family)
    for i, name in enumerate(_FAMILY_ORDER):
        if key == name or (name == "hybrid" and key.startswith("hybrid")):
            return i, key
    return len(_FAMILY_ORDER), key


def _period(pattern: str) -> str:
    """The shortest unit that tiles to ``pattern`` (``MMMAMMMA`` → ``MMMA``; ``MMMAMM`` → ``MMMA``)."""
    for n in range(1, len(pattern) + 1):
        unit = pattern[:n]
        if (unit * (len(pattern) // n + 1))[: len(pattern)] == pattern:
            return unit
    return pattern


def _pattern(trial: Any) -> str | None:
    summary = trial.user_attrs.get("summary") or {}
    if summary.get("layer_pattern"):
        return str(summary["layer_pattern"])
    model = (trial.user_attrs.get("config") or {}).get("model", {})
    pattern = trial.params.get("model.pattern") or model.get("pattern")
    n_layers = trial.params.get("model.n_layers") or model.get("n_layers")
    if pattern and isinstance(n_layers, int):
        return (pattern * (n_layers // len(pattern) + 1))[:n_layers]
    return pattern


def default_family(trial: Any) -> str:
    """A trial's family: its ``variant`` parameter when the recipe has variants, else from its layer pattern
    (all ``A`` → attention, all ``M`` → mamba, all ``S`` → mamba2, all ``W`` → sliding_window_attention,
    all ``X`` → xformers_attention, mixed → ``hybrid <unit>``), else its configured mixer."""
    if "variant" in trial.params:
        return str(trial.params["variant"])
    pattern = _pattern(trial)
    if pattern:
        letters = set(pattern)
        if len(letters) == 1:
            return _PATTERN_FAMILIES.get(pattern[0], pattern[0])
        return f"hybrid {_period(pattern)}"
    model = (trial.user_attrs.get("config") or {}).get("model", {})
    return str(trial.params.get("model.mixer") or model.get("mixer") or "unknown")


# numbers and labels -----------------------------------------------------------------------------------------
def fmt_number(x: Any, sig: int = 4) -> str:
    """A number for a person: integers exact with thousands separators; floats to ``sig`` significant digits
    (``2.346``, ``0.9123``), rounded to an integer with separators from ``10**(sig-1)`` up (``12,346``)."""
    if x is None:
        return ""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if x == 0:
        return "0"
    if abs(x) >= 10 ** (sig - 1):
        return f"{round(x):,}"
    text = f"{x:.{sig}g}"
    return f"{x:.{sig - 1}e}" if "e" in text else text


def metric_label(name: str) -> str:
    """``val_bpb`` → ``validation bits per byte (bits/byte)``; unknown names are returned as they are."""
    if name not in METRICS:
        return name
    what, _, unit = METRICS[name]
    return f"{what} ({unit})" if unit else what


# trial data -------------------------------------------------------------------------------------------------
def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _rows_of(data: Any) -> list[dict[str, Any]]:
    """Measurement rows from a list of rows or a probe result (``{"rows": [...]}``), without failed ones."""
    if isinstance(data, dict):
        data = data.get("rows", [])
    if not isinstance(data, list):
        return []
    return [r for r in data if isinstance(r, dict) and r.get("status", "ok") == "ok"]


def _measure(trial: Any, *names: str) -> list[dict[str, Any]]:
    measure = trial.user_attrs.get("measure") or {}
    for name in names:
        if name in measure:
            return _rows_of(measure[name])
    return []


def _memory_rows(trial: Any) -> list[dict[str, Any]]:
    rows = _measure(trial, "memory_vs_len", "scaling", "memory")
    return sorted((r for r in rows if _num(r.get("seq_len"))), key=lambda r: r["seq_len"])


def _decode_rows(trial: Any) -> list[dict[str, Any]]:
    rows = []
    for r in _measure(trial, "decode", "decode_vs_context"):
        ms = _num(r.get("latency_ms"))
        if ms is None and _num(r.get("latency_s")) is not None:
            ms = r["latency_s"] * 1e3
        if _num(r.get("context")) is not None:
            rows.append({"context": r["context"], "latency_ms": ms, "cache_bytes": _num(r.get("cache_bytes"))})
    return sorted(rows, key=lambda r: r["context"])


def _loss_len_rows(trial: Any) -> list[dict[str, Any]]:
    rows = _measure(trial, "loss_vs_len", "loss_vs_length", "context")
    return sorted((r for r in rows if _num(r.get("seq_len")) and _num(r.get("loss")) is not None),
                  key=lambda r: r["seq_len"])


def _by_sorted(values: Iterable[Any]) -> list[Any]:
    def key(v: Any) -> tuple[int, float, str]:
        try:
            return 0, float(v), ""
        except (TypeError, ValueError):
            return 1, 0.0, str(v)

    return sorted(values, key=key)


def _backends(summary: dict[str, Any]) -> str:
    ran = (summary.get("backends") or {}).values()
    return ", ".join(sorted({str(b) for b in ran}))


def _status(trial: Any) -> tuple[str, str]:
    state = trial.state.name.lower()
    summary = trial.user_attrs.get("summary") or {}
    if state == "complete":
        return "complete", ""
    if state == "pruned":
        step = summary.get("steps") or (trial.last_step if trial.intermediate_values else None)
        total = summary.get("total_steps")
        at = f" at step {step}" + (f"/{total}" if total else "") if step is not None else ""
        return "pruned", f"pruned{at}"
    if state == "fail":
        return "failed", str(trial.user_attrs.get("fail_reason") or "no reason recorded")
    return state, ""


@dataclass(frozen=True)
class _Column:
    key: str  # the CSV header
    header: str  # the Markdown header
    kind: str = "num"  # num | text


def _trial_row(trial: Any, family: str) -> dict[str, Any]:
    summary = trial.user_attrs.get("summary") or {}
    model = (trial.user_attrs.get("config") or {}).get("model", {})
    final = summary.get("final") or {}
    status, reason = _status(trial)
    pattern = _pattern(trial)
    row: dict[str, Any] = {
        "trial": trial.number,
        "family": family,
        "pattern": pattern,
        "n_layers": trial.params.get("model.n_layers") or model.get("n_layers") or (len(pattern) if pattern else None),
        "d_model": trial.params.get("model.d_model") or model.get("d_model"),
        "seq_len": ((trial.user_attrs.get("config") or {}).get("train") or {}).get("seq_len"),
        "params": summary.get("params"),
        "flops_per_token": summary.get("flops_per_token"),
    }
    for metric in ("val_ppl", "val_bpb", "val_loss", "accuracy", "exact_match"):
        row[metric] = _num(final.get(metric))
    for attr, by_value in (final.get("by") or {}).items():
        if isinstance(by_value, dict):
            for value in _by_sorted(by_value):
                row[f"accuracy[{attr}={value}]"] = _num(by_value[value])
    row["steps_to_target"] = summary.get("target_reached_step")
    row["peak_memory_mib"] = _num(summary.get("peak_memory_mb"))
    row["tokens_per_s"] = _num(summary.get("tokens_per_s"))
    row["train_seconds"] = _num(summary.get("train_seconds"))
    mem = _memory_rows(trial)
    if mem:
        xs = [r["seq_len"] for r in mem]
        top = mem[-1]
        row["max_seq_len_measured"] = top["seq_len"]
        row["peak_mib_at_max_len"] = _num(top.get("peak_bytes")) and top["peak_bytes"] / 2**20
        for what, key in (("memory", "peak_bytes"), ("time", "time_s")):
            fit = fit_power_law(xs, [_num(r.get(key)) for r in mem])
            row[f"{what}_exponent"] = fit["exponent"] if fit else None
    dec = [r for r in _decode_rows(trial) if r["latency_ms"] is not None]
    if dec:
        row["decode_context"] = dec[-1]["context"]
        row["decode_ms_per_token"] = dec[-1]["latency_ms"]
        row["cache_mib"] = dec[-1]["cache_bytes"] / 2**20 if dec[-1]["cache_bytes"] is not None else None
    lvl = _loss_len_rows(trial)
    if lvl:
        row["loss_eval_len"] = lvl[-1]["seq_len"]
        row["loss_at_eval_len"] = lvl[-1]["loss"]
    row["backends"] = _backends(summary)
    row["status"] = status
    row["reason"] = reason
    return row


_FIXED_COLUMNS = [
    _Column("trial", "trial"),
    _Column("family", "family", "text"),
    _Column("pattern", "layers", "text"),
    _Column("n_layers", "n_layers"),
    _Column("d_model", "d_model"),
    _Column("seq_len", "train T"),
    _Column("params", "params"),
]
_METRIC_COLUMNS = [
    _Column("val_ppl", "val ppl"),
    _Column("val_bpb", "val bpb (bits/byte)"),
    _Column("accuracy", "accuracy"),
    _Column("exact_match", "exact match"),
]
_COST_COLUMNS = [
    _Column("steps_to_target", "steps to target"),
    _Column("peak_memory_mib", "peak MiB"),
    _Column("tokens_per_s", "tokens/s"),
]
_LONG_COLUMNS = [
    _Column("max_seq_len_measured", "longest T measured"),
    _Column("peak_mib_at_max_len", "peak MiB at longest T"),
    _Column("memory_exponent", "memory ∝ T^k"),
    _Column("time_exponent", "time ∝ T^k"),
    _Column("decode_context", "decode context"),
    _Column("decode_ms_per_token", "decode ms/token"),
    _Column("cache_mib", "cache MiB"),
    _Column("loss_eval_len", "eval length"),
    _Column("loss_at_eval_len", "loss at eval length (nats/token)"),
]
_TAIL_COLUMNS = [_Column("best_of", "chosen by the sweep", "text"), _Column("backends", "backends", "text"),
                 _Column("status", "status", "text")]
_OBJECTIVE_KEYS = {"peak_memory_mb": "peak_memory_mib", "params": "params", "tokens_per_s": "tokens_per_s",
                   "val_bpb": "val_bpb", "val_ppl": "val_ppl", "accuracy": "accuracy", "exact_match": "exact_match",
                   "val_loss": "val_loss", "train_seconds": "train_seconds", "flops_per_token": "flops_per_token"}


def _metric_names(study: Any) -> list[str]:
    names = getattr(study, "metric_names", None)
    if names:
        return list(names)
    n = len(study.directions)
    return ["value"] if n == 1 else [f"value {i}" for i in range(n)]


def _columns(rows: list[dict[str, Any]], objectives: Sequence[str], multi: bool) -> list[_Column]:
    extra: list[_Column] = []
    for metric in objectives:
        key = _OBJECTIVE_KEYS.get(metric)
        if key and key not in {c.key for c in _FIXED_COLUMNS + _METRIC_COLUMNS + _COST_COLUMNS}:
            unit = METRICS.get(metric, ("", "", ""))[2]
            extra.append(_Column(key, metric.replace("_", " ") + (f" ({unit})" if unit else "")))
        elif not key:
            extra.append(_Column(f"objective:{metric}", metric))
    slices = []
    for row in rows:
        for key in row:
            if key.startswith("accuracy[") and key not in slices:
                slices.append(key)
    by_attr: dict[str, list[str]] = {}
    for key in slices:
        by_attr.setdefault(key[len("accuracy["):].split("=")[0], []).append(key)
    for keys in by_attr.values():  # one slice per trial (its own setting): the accuracy column says it all
        if all(sum(row.get(k) is not None for k in keys) <= 1 for row in rows):
            slices = [k for k in slices if k not in keys]
    slice_cols = [_Column(k, "acc " + k[len("accuracy["):-1]) for k in slices]
    cols = _FIXED_COLUMNS + _METRIC_COLUMNS[:2] + extra + _METRIC_COLUMNS[2:] + slice_cols + _COST_COLUMNS
    cols += _LONG_COLUMNS + _TAIL_COLUMNS
    if multi:
        cols.append(_Column("pareto", "Pareto", "text"))
    keep = {"trial", "family", "status"}
    varying = {"seq_len"}  # shown only where the trials differ in it
    return [c for c in cols if c.key in keep or (any(r.get(c.key) not in (None, "") for r in rows) and (
        c.key not in varying or len({r.get(c.key) for r in rows}) > 1))]


def superseded(trials: Sequence[Any]) -> set[int]:
    """Failed or interrupted trials whose retry (`experiments.study.retried_trial`) has since completed or been pruned:
    the tables show the retry in their place."""
    from optuna.trial import TrialState

    from experiments.study import retried_trial

    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    return {n for n in (retried_trial(t) for t in done) if n is not None}


def table_rows(study: Any, family_of: FamilyOf | None = None, sort: str = "family") -> list[dict[str, Any]]:
    """One dict per finished trial (complete, pruned, failed), raw values, sorted by family then size
    (``sort="family"``) or best objective first (``sort="objective"``)."""
    from optuna.trial import TrialState

    family_of = family_of or default_family
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    everything = study.get_trials(deepcopy=False)
    redone = superseded(everything)
    trials = [t for t in everything if t.state in finished and t.number not in redone]
    names = _metric_names(study)
    multi = len(study.directions) > 1
    front = {t.number for t in study.best_trials} if multi and any(t.state == TrialState.COMPLETE
                                                                   for t in trials) else set()
    rows = []
    for t in trials:
        row = _trial_row(t, family_of(t))
        for i, metric in enumerate(names):
            value = t.values[i] if t.values is not None and i < len(t.values) else None
            key = _OBJECTIVE_KEYS.get(metric, f"objective:{metric}")
            if row.get(key) is None and value is not None:
                row[key] = value
        if multi:
            row["pareto"] = "yes" if t.number in front else ""
        rows.append(row)
    order = {"complete": 0, "pruned": 1, "failed": 2}
    if sort == "objective" and not multi:
        sign = 1 if study.directions[0].name == "MINIMIZE" else -1
        key0 = _OBJECTIVE_KEYS.get(names[0], f"objective:{names[0]}")
        rows.sort(key=lambda r: (order.get(r["status"], 3), r.get(key0) is None, sign * (r.get(key0) or 0),
                                 r["trial"]))
    else:
        rows.sort(key=lambda r: (_family_sort_key(r["family"]), r["params"] is None, r["params"] or 0,
                                 r["n_layers"] or 0, r["d_model"] or 0, r["trial"]))
    return rows


# table ------------------------------------------------------------------------------------------------------
def _md_cell(value: Any, col: _Column, row: dict[str, Any]) -> str:
    if col.key == "status":
        text = row["status"] if row["status"] == "complete" else (
            row["reason"] if row["status"] == "pruned" else f"failed: {row['reason']}")
        if len(text) > 120:
            text = text[:117] + "..."
    elif col.key == "pattern" and value:
        text = f"`{value}`"
    elif col.key == "pareto":
        text = "★" if value else ""
    elif col.kind == "text":
        text = "" if value is None else str(value)
    else:
        text = fmt_number(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _most_common(values: Iterable[Any]) -> tuple[Any, int]:
    counted = Counter(json.dumps(v, sort_keys=True) for v in values if v)
    if not counted:
        return None, 0
    text, _ = counted.most_common(1)[0]
    return json.loads(text), len(counted)


def _header_lines(study: Any, rows: list[dict[str, Any]], trials: list[Any],
                  recipe_info: dict[str, Any] | None) -> list[str]:
    names = _metric_names(study)
    summaries = [t.user_attrs.get("summary") or {} for t in trials]
    configs = [t.user_attrs.get("config") or {} for t in trials]
    objectives = ", ".join(f"{d.name.lower()} {m}" + (f" ({METRICS[m][2]})" if METRICS.get(m, ("", "", ""))[2]
                                                      else "") for m, d in zip(names, study.directions, strict=True))
    what = []
    corpus_hash, n_hash = _most_common(s.get("corpus_hash") for s in summaries)
    corpus, _ = _most_common((c.get("data") or {}).get("corpus") for c in configs)
    if corpus_hash or corpus:
        text = f"corpus {corpus or '?'}" + (f" `{str(corpus_hash)[:12]}`" if corpus_hash else "")
        what.append(text + (f" (+{n_hash - 1} other)" if n_hash > 1 else ""))
    task, _ = _most_common(s.get("task") for s in summaries)
    task = task or _most_common((c.get("data") or {}).get("task") for c in configs)[0]
    if task:
        what.append(f"task {task}")
    dates = [t.datetime_complete for t in trials if t.datetime_complete]
    machine, n_machines = _most_common(s.get("machine") for s in summaries)
    device, _ = _most_common(s.get("device") for s in summaries)
    where = []
    if machine:
        where.append(machine.get("cuda_device") or machine.get("cpu") or "?")
        if machine.get("torch"):
            where.append(f"torch {machine['torch']}")
        if machine.get("torch_threads"):
            where.append(f"{machine['torch_threads']} threads")
    if device:
        where.append(str(device))
    if n_machines > 1:
        where.append(f"+{n_machines - 1} other machine(s)")
    counts = Counter(r["status"] for r in rows)
    line = f"**{study.study_name}** — objective: {objectives}"
    if what:
        line += "; " + "; ".join(what)
    if dates:
        line += f"; {max(dates).strftime('%Y-%m-%d')}"
    if where:
        line += "; " + ", ".join(where)
    line += f". {len(rows)} finished trials ({', '.join(f'{n} {s}' for s, n in counts.items())})"
    redone = len(superseded(study.get_trials(deepcopy=False)))
    line += f"; {redone} failed or interrupted trial(s) were redone and appear as their retries." if redone else "."
    lines = [line, ""]
    if recipe_info and recipe_info.get("description"):
        lines += [str(recipe_info["description"]), ""]
    method, _ = _most_common(s.get("memory_method") for s in summaries)
    has = {k for r in rows for k, v in r.items() if v not in (None, "")}
    units = [text for key, text in (
        ("val_ppl", "val ppl: validation perplexity per token"),
        ("val_bpb", "val bpb: validation bits per byte"),
        ("accuracy", "accuracy: fraction of answers correct on the task's fixed test set (acc a=v: on its slice)"),
        ("steps_to_target", "steps to target: the evaluation step at which test accuracy reached the recipe's "
                            "train.target_accuracy and training stopped (blank: not reached within the step budget)"),
        ("peak_memory_mib", "peak MiB: peak training memory above baseline" + (f" ({method})" if method else "")),
        ("tokens_per_s", "tokens/s: training throughput"),
        ("memory_exponent", "memory/time ∝ T^k: fitted exponent over the measured sequence lengths T"),
        ("decode_ms_per_token", "decode ms/token and cache MiB: at the longest decode context measured"),
        ("loss_at_eval_len", "loss at eval length: validation loss at the longest evaluation length measured"),
    ) if key in has]
    if units:
        lines += ["Units — " + "; ".join(units) + ".", ""]
    if recipe_info and recipe_info.get("name"):
        lines += [f"Reproduce: `{_command(recipe_info)}`", ""]
    return lines


def _command(recipe_info: dict[str, Any]) -> str:
    source = recipe_info.get("source") or ""
    name = recipe_info["name"]
    if source and Path(source).resolve().parent != RECIPES_DIR.resolve():
        name = source
    return f"mixerlab reproduce {name} --scale {recipe_info.get('scale', 'cpu')}"


def best_of_sweep(study: Any, rows: list[dict[str, Any]], sweep: Sequence[str]) -> list[dict[str, Any]]:
    """One row per cell: the best complete trial over the ``sweep`` parameters (e.g. ``["train.lr"]``),
    marked with the values it was chosen at (``best_of``); cells with no complete trial keep their first row."""
    params = {t.number: t.params for t in study.get_trials(deepcopy=False)}
    minimize = study.directions[0].name == "MINIMIZE"
    key0 = _OBJECTIVE_KEYS.get(_metric_names(study)[0], "value")
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


def _write_tables(study: Any, rows: list[dict[str, Any]], trials: list[Any], out: Path,
                  recipe_info: dict[str, Any] | None, stem: str = "table") -> dict[str, Path]:
    names = _metric_names(study)
    cols = _columns(rows, names, len(study.directions) > 1)
    md = _header_lines(study, rows, trials, recipe_info)
    if rows:
        md.append("| " + " | ".join(c.header for c in cols) + " |")
        md.append("|" + "|".join("---" if c.kind == "text" else "---:" for c in cols) + "|")
        for row in rows:
            md.append("| " + " | ".join(_md_cell(row.get(c.key), c, row) for c in cols) + " |")
    else:
        md.append("_No finished trials yet._")
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    csv_cols = [c.key for c in cols] + ["reason"]
    with (out / f"{stem}.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(csv_cols)
        for row in rows:
            writer.writerow(["" if row.get(k) is None else row.get(k) for k in csv_cols])
    return {f"{stem}.md": out / f"{stem}.md", f"{stem}.csv": out / f"{stem}.csv"}


# figures ----------------------------------------------------------------------------------------------------
class _Figures:
    """Saves figures as PNG and SVG and remembers what was written and what was skipped (and why)."""

    def __init__(self, out: Path, families: list[str], wanted: Iterable[str] | None = None):
        self.out = out
        self.wanted = None if wanted is None else set(wanted)
        self.paths: dict[str, Path] = {}
        self.skipped: dict[str, str] = {}
        self.markers = {f: _MARKERS[i % len(_MARKERS)] for i, f in enumerate(families)}
        self.colours = family_colours(families)
        self.widths: dict[int, float] = {}

    def size_widths(self, rows: list[dict[str, Any]]) -> None:
        for fam in {r["family"] for r in rows}:
            sizes = sorted({r["params"] or 0 for r in rows if r["family"] == fam})
            for r in rows:
                if r["family"] == fam:
                    self.widths[r["trial"]] = 1.0 + 1.5 * sizes.index(r["params"] or 0) / max(1, len(sizes) - 1)

    def new(self, ncols: int = 1, size: tuple[float, float] = (7.5, 4.8)) -> tuple[Any, Any]:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(size[0] * ncols if ncols > 1 else size[0], size[1]), layout="constrained")
        axes = fig.subplots(1, ncols, squeeze=False)[0]
        for ax in axes:
            ax.grid(True, which="major", alpha=0.3)
            ax.grid(True, which="minor", alpha=0.1)
        return fig, axes

    def save(self, fig: Any, name: str) -> None:
        for ext in ("png", "svg"):
            path = self.out / f"{name}.{ext}"
            fig.savefig(path, dpi=150, metadata={"Date": None} if ext == "svg" else {"Software": None})
            self.paths[f"{name}.{ext}"] = path
            fig.set_layout_engine("none")  # laid out once; the SVG reuses it
        fig.clear()

    def colour(self, family: str) -> str:
        """The family's colour in this report (every figure): `family_colours` of the report's families."""
        return self.colours.get(family) or family_colour(family)

    def width(self, row: dict[str, Any]) -> float:
        """Line width of a trial's curve: thicker for larger models within its family (1 to 2.5)."""
        return self.widths.get(row["trial"], 1.5)

    def skip(self, name: str, why: str) -> None:
        self.skipped[name] = why

    def want(self, name: str) -> bool:
        if self.wanted is None or name in self.wanted:
            return True
        self.skipped[name] = "not asked for (figures=...)"
        return False


_STYLE = {"svg.hashsalt": "mixerlab", "svg.fonttype": "none", "axes.titlesize": "medium",
          "axes.labelsize": "medium", "legend.fontsize": "small", "figure.dpi": 100}


def _si(x: float) -> str:
    """``213248`` → ``213k``; ``1.2e6`` → ``1.2M``; below 1000 three significant digits."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def _log_axis(ax: Any, axis: str, fmt: Callable[[float], str] = _si) -> None:
    """Log scale with plain tick labels (``0.9``, ``200k``) instead of ``9 x 10^-1``."""
    from matplotlib.ticker import LogFormatter

    class _Plain(LogFormatter):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return fmt(x) if super().__call__(x, pos) else ""

    target = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    target.set_major_formatter(_Plain(labelOnlyBase=False))
    target.set_minor_formatter(_Plain(labelOnlyBase=False, minor_thresholds=(1.0, 0.4)))


def _length_axis(ax: Any, lengths: Iterable[float], axis: str = "x") -> None:
    """A log-2 axis with one tick per measured length, labelled ``1,024`` rather than ``2^10``."""
    from matplotlib.ticker import NullLocator

    ticks = sorted({float(v) for v in lengths})
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log", base=2)
    target = ax.xaxis if axis == "x" else ax.yaxis
    if len(ticks) <= 12:
        target.set_ticks(ticks, [fmt_number(int(v)) for v in ticks])
        target.set_minor_locator(NullLocator())


def _legend(ax: Any, **kwargs: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize="small", framealpha=0.85, **kwargs)


def _log_if_wide(ax: Any, axis: str, values: Sequence[float]) -> None:
    vals = [v for v in values if v is not None and v > 0]
    if vals and len(vals) == len(values) and max(vals) / min(vals) > 20:
        _log_axis(ax, axis)


_SHORT = {"val_bpb": "validation bits per byte", "val_loss": "validation loss (nats/token)",
          "val_ppl": "validation perplexity", "accuracy": "test accuracy", "exact_match": "exact-match accuracy",
          "peak_memory_mb": "peak memory (MiB)", "params": "parameters", "tokens_per_s": "throughput (tokens/s)",
          "train_seconds": "training time (s)", "flops_per_token": "FLOPs per token"}


def _axis_label(metric: str, direction: str | None = None) -> str:
    """A short axis label with the unit: ``peak memory (MiB), lower is better``."""
    label = _SHORT.get(metric, metric)
    if direction:
        label += ", lower is better" if direction == "minimize" else ", higher is better"
    return label


def _labeller(n_curves: int) -> Callable[[dict[str, Any]], str | None]:
    """Legend labels: one per trial when there are few curves, else one per family."""
    seen: set[str] = set()

    def label(row: dict[str, Any]) -> str | None:
        if n_curves <= 10:
            return _trial_label(row)
        if row["family"] in seen:
            return None
        seen.add(row["family"])
        return row["family"]

    return label


def _trial_label(row: dict[str, Any]) -> str:
    size = f", {fmt_number(row['params'], 3)} params" if row.get("params") else ""
    return f"#{row['trial']} {row['family']}{size}"


def _quality_metric(study: Any, rows: list[dict[str, Any]], recipe_info: dict[str, Any] | None) -> str | None:
    """The metric scaling plots and learning curves show: the recipe's ``report.metric``, else the first
    corpus/task objective, else val_bpb or accuracy, whichever the trials have."""
    wanted = ((recipe_info or {}).get("report") or {}).get("metric")
    candidates = ([wanted] if wanted else []) + [m for m in _metric_names(study) if m in (
        "val_bpb", "val_loss", "val_ppl", "accuracy", "exact_match")] + ["val_bpb", "val_loss", "accuracy"]
    for metric in candidates:
        if any(r.get(metric) is not None for r in rows):
            return metric
    return None


def _direction(metric: str, study: Any) -> str:
    names = _metric_names(study)
    if metric in names:
        return study.directions[names.index(metric)].name.lower()
    return METRICS.get(metric, ("", "minimize", ""))[1]


def _best_per_size(rows: list[dict[str, Any]], metric: str, x: str, minimize: bool) -> dict[float, float]:
    best: dict[float, float] = {}
    for r in rows:
        if r["status"] == "complete" and _num(r.get(x)) and _num(r.get(metric)) is not None:
            key, y = float(r[x]), float(r[metric])
            if key not in best or (y < best[key] if minimize else y > best[key]):
                best[key] = y
    return best


def scaling_fits(rows: list[dict[str, Any]], metric: str, x: str = "params",
                 minimize: bool = True) -> dict[str, dict[str, float]]:
    """Per family, the least-squares fit of ``log metric = log coef + exponent * log x`` over the best
    complete trial at each distinct ``x`` (``params`` or ``flops_per_token``); only families with >= 2 sizes.
    ``rows`` are `table_rows`. Returns ``{family: {"exponent", "coef", "r2", "n"}}``."""
    fits = {}
    for fam in sorted({r["family"] for r in rows}, key=_family_sort_key):
        best = _best_per_size([r for r in rows if r["family"] == fam], metric, x, minimize)
        fit = fit_power_law(sorted(best), [best[k] for k in sorted(best)]) if len(best) >= 2 else None
        if fit:
            fits[fam] = {"exponent": fit["exponent"], "coef": fit["coef"], "r2": fit["r2"], "n": len(best)}
    return fits


def _scaling(figs: _Figures, study: Any, rows: list[dict[str, Any]], metric: str | None,
             fits: dict[str, Any]) -> None:
    xs_of = {"params": ("parameters", "scaling_params"), "flops_per_token": ("forward FLOPs per token",
                                                                            "scaling_flops")}
    for xkey, (xlabel, name) in xs_of.items():
        done = [r for r in rows if r["status"] == "complete" and _num(r.get(xkey)) and
                _num(r.get(metric or "")) is not None]
        if metric is None or not done:
            figs.skip(name, f"no complete trial has both {xkey} and a quality metric")
            continue
        minimize = _direction(metric, study) == "minimize"
        if minimize:  # a power law of an accuracy is no scaling law; maximised metrics are shown, not fitted
            fits[xkey] = scaling_fits(done, metric, xkey)
        if not figs.want(name):
            continue
        fig, (ax,) = figs.new()
        n_others = 0
        for fam in sorted({r["family"] for r in done}, key=_family_sort_key):
            mine = [r for r in done if r["family"] == fam]
            best = _best_per_size(mine, metric, xkey, minimize)
            colour = figs.colour(fam)
            others = [r for r in mine if best.get(float(r[xkey])) != r[metric]]
            if others:
                ax.scatter([r[xkey] for r in others], [r[metric] for r in others], color=colour, alpha=0.3, s=18,
                           marker=figs.markers[fam], linewidths=0)
                n_others += len(others)
            bx = sorted(best)
            label = fam
            fit = fits.get(xkey, {}).get(fam)
            if fit:
                lo, hi = min(bx) / 1.15, max(bx) * 1.15
                grid = [lo * (hi / lo) ** (i / 49) for i in range(50)]
                ax.plot(grid, [fit["coef"] * g ** fit["exponent"] for g in grid], color=colour, lw=1.5, ls="--")
                var = "N" if xkey == "params" else "C"
                label = f"{fam}: $\\propto {var}^{{{fit['exponent']:.3f}}}$ ($R^2$={fit['r2']:.2f})"
            ax.scatter(bx, [best[x] for x in bx], color=colour, s=42, marker=figs.markers[fam], label=label,
                       edgecolors="white", linewidths=0.6, zorder=3)
        _log_axis(ax, "x")
        if minimize:
            _log_axis(ax, "y", lambda v: f"{v:.3g}")
        ax.set_xlabel(f"{xlabel} (log scale)")
        ax.set_ylabel(metric_label(metric) + (", log scale" if minimize else ""))
        if n_others:
            ax.scatter([], [], color="grey", alpha=0.3, s=18, label=f"other runs at the same size ({n_others})")
        what = "parameters" if xkey == "params" else "FLOPs per token"
        how = "best per size" + (", least-squares power law per family" if fits.get(xkey) else
                                 ", no fit (no family has 2+ sizes)" if minimize else "")
        ax.set_title(f"{metric} vs {what} — {how}")
        _legend(ax)
        figs.save(fig, name)


def _learning_curves(figs: _Figures, study: Any, trials: list[Any], rows: list[dict[str, Any]],
                     metric: str | None) -> None:
    by_number = {t.number: t for t in trials}
    curves = []
    for r in rows:
        evals = (by_number[r["trial"]].user_attrs.get("summary") or {}).get("evals") or []
        pts = [(e["tokens"], e[metric]) for e in evals if _num(e.get("tokens")) and _num(e.get(metric)) is not None]
        if pts:
            curves.append((r, pts))
    if metric is None or not curves:
        figs.skip("learning_curves", "no trial has evaluations (summary.evals)")
        return
    if not figs.want("learning_curves"):
        return
    minimize = _direction(metric, study) == "minimize"
    fig, (ax,) = figs.new()
    per_trial = len(curves) <= 10
    seen: set[str] = set()
    styles = {"complete": "-", "pruned": "--", "failed": ":"}
    for r, pts in curves:
        fam = r["family"]
        label = _trial_label(r) + ("" if r["status"] == "complete" else f" ({r['status']})") if per_trial else (
            fam if fam not in seen else None)
        seen.add(fam)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=figs.colour(fam), ls=styles.get(r["status"], "-"),
                marker=figs.markers[fam], ms=3.5, lw=figs.width(r), alpha=0.9, label=label)
    _log_axis(ax, "x")
    sized = any(len({r["params"] for r, _ in curves if r["family"] == fam}) > 1 for fam in seen)
    notes = (["thicker lines: larger models"] if sized else []) + (
        [] if per_trial else ["dashed: pruned, dotted: failed"])
    if minimize and min(len(pts) for _, pts in curves) >= 3:  # a first evaluation near the random-init loss
        first = max(pts[0][1] for _, pts in curves)
        top = max(pts[1][1] if len(pts) > 1 else pts[0][1] for _, pts in curves)
        lowest = min(p[1] for _, pts in curves for p in pts)
        if top > lowest and first > top + 0.5 * (top - lowest):
            ax.set_ylim(lowest - 0.05 * (top - lowest), top + 0.05 * (top - lowest))
            notes.append("first evaluations above the axis")
    ax.set_xlabel("training tokens (log scale)")
    ax.set_ylabel(metric_label(metric))
    ax.set_title(f"Learning curves: {metric} vs training tokens" + (f"\n({'; '.join(notes)})" if notes else ""))
    _legend(ax)
    figs.save(fig, "learning_curves")


def _log_log_pair(figs: _Figures, name: str, curves: list[tuple[dict[str, Any], list[tuple[list, str]]]],
                  xs: list[float], xlabel: str, panels: tuple[tuple[str, str], tuple[str, str]]) -> None:
    """Two side-by-side log-log panels against a length: ``curves`` holds, per table row, the (x, y) points
    of the left and right panel with a suffix for each panel's legend label; ``panels`` (y label, title)."""
    fig, axes = figs.new(ncols=2, size=(6.0, 4.6))
    label = _labeller(len(curves))
    for r, series in curves:
        kw = {"color": figs.colour(r["family"]), "marker": figs.markers[r["family"]], "ms": 4, "lw": figs.width(r)}
        name_ = label(r)
        for ax, (pts, suffix) in zip(axes, series, strict=True):
            if pts:
                ax.plot(*zip(*pts, strict=True), label=name_ and name_ + suffix, **kw)
    for ax, (what, title) in zip(axes, panels, strict=True):
        _length_axis(ax, xs)
        _log_axis(ax, "y", lambda v: f"{v:.3g}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{what}, log scale")
        ax.set_title(title)
        _legend(ax)
    figs.save(fig, name)


def _length_plots(figs: _Figures, trials: list[Any], rows: list[dict[str, Any]]) -> None:
    by_number = {t.number: t for t in trials}
    mem = [(r, _memory_rows(by_number[r["trial"]])) for r in rows]
    mem = [(r, m) for r, m in mem if m]
    if mem and figs.want("memory_time_vs_len"):
        curves, fits = [], len(mem) <= 10  # exponents in the legend while it stays readable
        for r, m in mem:
            mem_pts = [(p["seq_len"], p["peak_bytes"] / 2**20) for p in m if _num(p.get("peak_bytes"))]
            time_pts = [(p["seq_len"], p["time_s"]) for p in m if _num(p.get("time_s"))]
            suffixes = [f" ($\\propto T^{{{k:.2f}}}$)" if fits and k is not None else ""
                        for k in (r.get("memory_exponent"), r.get("time_exponent"))]
            curves.append((r, list(zip((mem_pts, time_pts), suffixes, strict=True))))
        _log_log_pair(figs, "memory_time_vs_len", curves, [p["seq_len"] for _, m in mem for p in m],
                      "sequence length T (tokens, log scale)",
                      (("peak memory (MiB)", "Peak memory vs sequence length"),
                       ("time per step (s)", "Time vs sequence length")))
    elif not mem:
        figs.skip("memory_time_vs_len", "no trial has measure.memory_vs_len")
    dec = [(r, _decode_rows(by_number[r["trial"]])) for r in rows]
    dec = [(r, d) for r, d in dec if d]
    if dec and figs.want("decode_vs_context"):
        curves = [(r, [([(p["context"], p["latency_ms"]) for p in d if p["latency_ms"] is not None], ""),
                       ([(p["context"], p["cache_bytes"] / 2**20) for p in d if p["cache_bytes"]], "")])
                  for r, d in dec]
        _log_log_pair(figs, "decode_vs_context", curves, [p["context"] for _, d in dec for p in d],
                      "context length (tokens, log scale)",
                      (("decode latency (ms/token)", "Per-token decoding latency vs context"),
                       ("cache/state size (MiB)", "Decoding cache vs context")))
    elif not dec:
        figs.skip("decode_vs_context", "no trial has measure.decode")
    lvl = [(r, _loss_len_rows(by_number[r["trial"]])) for r in rows]
    lvl = [(r, d) for r, d in lvl if d]
    if lvl and figs.want("loss_vs_len"):
        fig, (ax,) = figs.new()
        train_lens = set()
        label = _labeller(len(lvl))
        for r, d in lvl:
            ax.plot([p["seq_len"] for p in d], [p["loss"] for p in d], color=figs.colour(r["family"]),
                    marker=figs.markers[r["family"]], ms=4, lw=figs.width(r), label=label(r))
            seq = ((by_number[r["trial"]].user_attrs.get("config") or {}).get("train") or {}).get("seq_len")
            if seq:
                train_lens.add(seq)
        for i, t in enumerate(sorted(train_lens)):
            ax.axvline(t, color="grey", ls=":", lw=1, label="training length" if i == 0 else None)
        _length_axis(ax, [p["seq_len"] for _, d in lvl for p in d])
        ax.set_xlabel("evaluation length (tokens, log scale)")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title("Loss vs evaluation length (extrapolation beyond the training length)")
        _legend(ax)
        figs.save(fig, "loss_vs_len")
    elif not lvl:
        figs.skip("loss_vs_len", "no trial has measure.loss_vs_len")


def _accuracy_vs_len(figs: _Figures, trials: list[Any], rows: list[dict[str, Any]]) -> None:
    by_number = {t.number: t for t in trials}
    curves = []
    for r in rows:
        if r["status"] == "failed":
            continue
        t = by_number[r["trial"]]
        by = (((t.user_attrs.get("summary") or {}).get("final") or {}).get("by") or {}).get("seq_len") or {}
        pts = [(float(k), float(v)) for k, v in by.items() if _num(v) is not None]
        if pts:
            curves.append((r, t, sorted(pts)))
    if not curves:
        figs.skip("accuracy_vs_len", "no task trial has accuracy by seq_len (summary.final.by.seq_len)")
        return
    if not figs.want("accuracy_vs_len"):
        return
    fig, (ax,) = figs.new()
    per_trial = len(curves) <= 10
    seen: set[str] = set()
    train_lens = set()
    for r, t, pts in curves:
        fam = r["family"]
        label = _trial_label(r) if per_trial else (fam if fam not in seen else None)
        seen.add(fam)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=figs.colour(fam), marker=figs.markers[fam], ms=5,
                lw=figs.width(r), ls="-" if r["status"] == "complete" else "--", label=label)
        seq = ((t.user_attrs.get("config") or {}).get("train") or {}).get("seq_len")
        if seq:
            train_lens.add(seq)
    xs = sorted({p[0] for _, _, pts in curves for p in pts})
    if len(xs) > 1 and xs[-1] / xs[0] >= 4:
        _length_axis(ax, xs)
    else:
        ax.set_xticks(xs, [fmt_number(int(x)) for x in xs])
    for i, s in enumerate(sorted(train_lens)):
        ax.axvline(s, color="grey", ls=":", lw=1, label="training length" if i == 0 else None)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("test accuracy (fraction correct)")
    task = next(((t.user_attrs.get("summary") or {}).get("task") for _, t, _ in curves), None)
    ax.set_title("Accuracy vs sequence length" + (f" — task {task}" if task else ""))
    _legend(ax)
    figs.save(fig, "accuracy_vs_len")


def _accuracy_vs_width(figs: _Figures, rows: list[dict[str, Any]]) -> None:
    """Zoology's Figure 2 layout: test accuracy vs d_model, one panel per training length, a line per family
    (the rows given: the best of a learning-rate sweep per cell where the recipe has one)."""
    done = [r for r in rows if r["status"] == "complete" and r.get("accuracy") is not None and r.get("d_model")]
    panels: dict[Any, list[dict[str, Any]]] = {}
    for r in done:
        panels.setdefault(r.get("seq_len"), []).append(r)
    if not any(len({r["d_model"] for r in members}) > 1 for members in panels.values()):
        figs.skip("accuracy_vs_width", "no task trials at two or more d_model values")
        return
    if not figs.want("accuracy_vs_width"):
        return
    keys = sorted(panels, key=lambda k: (k is None, k or 0))
    fig, axes = figs.new(ncols=len(keys), size=(7.5 if len(keys) == 1 else 4.2, 4.4))
    for ax, key in zip(axes, keys, strict=True):
        members = panels[key]
        for fam in sorted({r["family"] for r in members}, key=_family_sort_key):
            pts = sorted((r["d_model"], r["accuracy"]) for r in members if r["family"] == fam)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=figs.colour(fam), marker=figs.markers[fam],
                    ms=6, lw=1.8, label=fam)
        _length_axis(ax, [r["d_model"] for r in members])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("model dimension d_model")
        ax.set_title(f"sequence length {fmt_number(key)}" if key else "accuracy vs d_model")
    axes[0].set_ylabel("test accuracy (fraction correct)")
    _legend(axes[-1], loc="lower right")
    figs.save(fig, "accuracy_vs_width")


def _pareto(figs: _Figures, study: Any, trials: list[Any], family_of: FamilyOf) -> None:
    from optuna.trial import TrialState

    if len(study.directions) < 2:
        figs.skip("pareto", "single-objective study")
        return
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values is not None]
    if not done:
        figs.skip("pareto", "no complete trials")
        return
    if not figs.want("pareto"):
        return
    names = _metric_names(study)
    front = sorted((t for t in study.best_trials), key=lambda t: t.values[0])
    fig, (ax,) = figs.new(size=(7.5, 5.2))
    families = sorted({family_of(t) for t in done}, key=_family_sort_key)
    for fam in families:
        mine = [t for t in done if family_of(t) == fam]
        ax.scatter([t.values[0] for t in mine], [t.values[1] for t in mine], color=figs.colour(fam), s=40,
                   marker=figs.markers[fam], alpha=0.55, label=fam, linewidths=0)
    ax.scatter([t.values[0] for t in front], [t.values[1] for t in front], facecolors="none", edgecolors="black",
               s=110, linewidths=1.4, label=f"Pareto front ({len(front)} trials)", zorder=3)
    if len(front) > 1:
        # the boundary of the dominated region: horizontal first when x is minimised, vertical first otherwise
        ax.plot([t.values[0] for t in front], [t.values[1] for t in front], color="black", lw=1, alpha=0.6,
                drawstyle="steps-post" if study.directions[0].name == "MINIMIZE" else "steps-pre", zorder=2)
    for t in front:
        ax.annotate(f"#{t.number}", (t.values[0], t.values[1]), textcoords="offset points", xytext=(6, 5),
                    fontsize="small")
    _log_if_wide(ax, "x", [t.values[0] for t in done])
    _log_if_wide(ax, "y", [t.values[1] for t in done])
    dirs = [d.name.lower() for d in study.directions]
    ax.set_xlabel(_axis_label(names[0], dirs[0]))
    ax.set_ylabel(_axis_label(names[1], dirs[1]))
    extra = f" (first 2 of {len(names)} objectives)" if len(names) > 2 else ""
    ax.set_title(f"Pareto front: {names[0]} vs {names[1]}{extra}")
    _legend(ax)
    figs.save(fig, "pareto")


def _history(figs: _Figures, study: Any, trials: list[Any], family_of: FamilyOf) -> None:
    from matplotlib.ticker import MaxNLocator
    from optuna.trial import TrialState

    done = sorted((t for t in trials if t.state == TrialState.COMPLETE and t.values is not None),
                  key=lambda t: t.number)
    if not done:
        figs.skip("history", "no complete trials")
        return
    if not figs.want("history"):
        return
    names = _metric_names(study)
    fig, axes = figs.new(ncols=len(names), size=(7.5 if len(names) == 1 else 5.5, 4.6))
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    for i, (ax, metric) in enumerate(zip(axes, names, strict=True)):
        minimize = study.directions[i].name == "MINIMIZE"
        families = sorted({family_of(t) for t in done}, key=_family_sort_key)
        for fam in families:
            mine = [t for t in done if family_of(t) == fam]
            ax.scatter([t.number for t in mine], [t.values[i] for t in mine], color=figs.colour(fam),
                       marker=figs.markers[fam], s=36, label=fam, zorder=3)
        if i == 0 and len(names) == 1 and pruned:
            ax.scatter([t.number for t in pruned], [t.intermediate_values[t.last_step] for t in pruned],
                       marker="x", color="grey", s=30, label="pruned (last reported value)", zorder=2)
        best, xs, ys = None, [], []
        for t in done:
            v = t.values[i]
            best = v if best is None or (v < best if minimize else v > best) else best
            xs.append(t.number)
            ys.append(best)
        xs.append(max(t.number for t in trials))
        ys.append(best)
        ax.step(xs, ys, where="post", color="black", lw=1.3, label="best so far")
        _log_if_wide(ax, "y", [t.values[i] for t in done])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("trial number")
        ax.set_ylabel(_axis_label(metric, "minimize" if minimize else "maximize"))
        ax.set_title(f"Optimisation history: {metric}")
        _legend(ax)
    figs.save(fig, "history")


def _importances(figs: _Figures, study: Any, trials: list[Any]) -> None:
    import optuna
    from optuna.trial import TrialState

    done = [t for t in trials if t.state == TrialState.COMPLETE]
    varied = {name for name in {p for t in done for p in t.params}
              if len({json.dumps(t.params.get(name), sort_keys=True) for t in done}) > 1}
    if len(study.directions) > 1 or len(done) < 4 or len(varied) < 2:
        figs.skip("param_importances", "needs a single-objective study with >= 4 complete trials and >= 2 "
                                       "varied parameters")
        return
    if not figs.want("param_importances"):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            importances = optuna.importance.get_param_importances(study, params=sorted(varied))
        except (ValueError, RuntimeError) as exc:
            figs.skip("param_importances", f"optuna could not compute importances: {exc}")
            return
    names = sorted(importances, key=importances.get)
    fig, (ax,) = figs.new(size=(7.5, 1.2 + 0.5 * len(names)))
    bars = ax.barh(names, [importances[n] for n in names], color="#4c72b0")
    ax.bar_label(bars, labels=[f"{importances[n]:.2f}" for n in names], padding=3, fontsize="small")
    ax.set_xlim(0, max(1e-9, max(importances.values())) * 1.15)
    ax.grid(False, axis="y")
    ax.set_xlabel("importance (Optuna PED-ANOVA, normalised to sum 1)")
    ax.set_ylabel("hyperparameter")
    ax.set_title(f"Hyperparameter importances for {_metric_names(study)[0]} ({len(done)} complete trials)")
    figs.save(fig, "param_importances")


# the report -------------------------------------------------------------------------------------------------
class Report(dict):
    """What `write_report` wrote: file name → path (``"table.md"``, ``"scaling_params.png"``, ...).

    Attributes: ``fits`` ({"params" | "flops_per_token": {family: {"exponent", "coef", "r2", "n"}}}), also
    under the key ``"fits"`` of ``report.json``; ``skipped`` (figure → why it was not drawn); ``rows`` (the
    table's rows, raw values)."""

    fits: dict[str, dict[str, dict[str, float]]]
    skipped: dict[str, str]
    rows: list[dict[str, Any]]


FIGURES = ("scaling_params", "scaling_flops", "learning_curves", "memory_time_vs_len", "decode_vs_context",
           "loss_vs_len", "accuracy_vs_len", "accuracy_vs_width", "pareto", "history", "param_importances")


def write_report(study: Any, out_dir: str | os.PathLike, *, recipe_info: dict[str, Any] | None = None,
                 family_of: FamilyOf | None = None, figures: Iterable[str] | None = None) -> Report:
    """Write ``table.md``, ``table.csv``, the figures (PNG + SVG) and ``report.json`` for ``study`` into
    ``out_dir``; return a `Report` (file name → path, with ``.fits`` and ``.skipped``).

    Args:
        study: an Optuna study (any storage), trials as the study engine stores them.
        out_dir: where to write (created if missing).
        recipe_info: the recipe as a dict (`Recipe.to_dict`): its description and reproduce command go into
            the table header; ``report.sort`` ("family" or "objective") orders the table and ``report.metric``
            chooses the metric of the scaling plots and learning curves.
        family_of: trial → family name, for colours, fits and sorting (default `default_family`).
        figures: the names (`FIGURES`) of the figures to draw; default all whose data exists. The fits are
            computed either way.
    """
    from optuna.trial import TrialState

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    family_of = family_of or default_family
    options = (recipe_info or {}).get("report") or {}
    rows = table_rows(study, family_of, sort=options.get("sort", "family"))
    trials = [t for t in study.get_trials(deepcopy=False)
              if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]
    sweep = list(options.get("best_over") or [])
    best = best_of_sweep(study, rows, sweep) if sweep else rows
    if sweep:  # table.md: the best of the sweep per cell; table_all.*: every trial
        paths = Report(_write_tables(study, rows, trials, out, recipe_info, stem="table_all"))
        paths.update(_write_tables(study, best, trials, out, recipe_info))
    else:
        paths = Report(_write_tables(study, rows, trials, out, recipe_info))

    import matplotlib
    import matplotlib.style

    families = sorted({r["family"] for r in rows}, key=_family_sort_key)
    if figures is not None and set(figures) - set(FIGURES):
        raise ValueError(f"unknown figure(s) {sorted(set(figures) - set(FIGURES))}; figures: {', '.join(FIGURES)}")
    figs = _Figures(out, families, figures)
    figs.size_widths(rows)
    fits: dict[str, Any] = {}
    metric = _quality_metric(study, rows, recipe_info)
    with matplotlib.rc_context():  # the same look whatever style the caller set; nothing leaks out
        matplotlib.style.use("default")
        matplotlib.rcParams.update(_STYLE)
        _scaling(figs, study, rows, metric, fits)
        _learning_curves(figs, study, trials, rows, metric)
        _length_plots(figs, trials, rows)
        _accuracy_vs_len(figs, trials, rows)
        _accuracy_vs_width(figs, best)
        _pareto(figs, study, trials, family_of)
        _history(figs, study, trials, family_of)
        _importances(figs, study, trials)
    paths.update(figs.paths)

    info = {"study": study.study_name, "metric": metric, "fits": fits, "skipped": figs.skipped,
            "colours": {f: figs.colour(f) for f in families},
            "files": sorted(paths), "written": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    (out / "report.json").write_text(json.dumps(info, indent=2) + "\n")
    paths["report.json"] = out / "report.json"
    paths.fits, paths.skipped, paths.rows = fits, figs.skipped, rows
    return paths


# status -----------------------------------------------------------------------------------------------------
def _interrupted(trial: Any) -> bool:
    """A failed trial that will be redone: Ctrl-C, a dead worker, a stale heartbeat (not its own failure)."""
    if trial.user_attrs.get(FINISHED_FAIL):
        return False
    reason = str(trial.user_attrs.get("fail_reason") or "")
    return not reason or "interrupted" in reason or "died" in reason


def status_text(study: Any, family_of: FamilyOf | None = None) -> str:
    """Trials done / running / waiting / failed / pruned, and the best so far (single objective) or the
    Pareto front (multi-objective), as a few lines of text."""
    from optuna.trial import TrialState

    family_of = family_of or default_family
    trials = study.get_trials(deepcopy=False)
    c = Counter(t.state for t in trials)
    interrupted = sum(1 for t in trials if t.state == TrialState.FAIL and _interrupted(t))
    done = c[TrialState.COMPLETE] + c[TrialState.PRUNED] + c[TrialState.FAIL]
    names = _metric_names(study)
    dirs = [d.name.lower() for d in study.directions]
    lines = [f"study {study.study_name}: " + ", ".join(f"{d} {m}" for m, d in zip(names, dirs, strict=True)),
             f"trials: {done} done ({c[TrialState.COMPLETE]} complete, {c[TrialState.PRUNED]} pruned, "
             f"{c[TrialState.FAIL]} failed" + (f", {interrupted} of them interrupted" if interrupted else "")
             + f"), {c[TrialState.RUNNING]} running, {c[TrialState.WAITING]} waiting"]
    if not c[TrialState.COMPLETE]:
        lines.append("best so far: none (no complete trial yet)")
        return "\n".join(lines)

    def describe(t: Any) -> str:
        summary = t.user_attrs.get("summary") or {}
        size = f", {fmt_number(summary['params'])} params" if summary.get("params") else ""
        values = ", ".join(f"{m} = {fmt_number(v)}" + (f" {METRICS[m][2]}" if METRICS.get(m, ('', '', ''))[2]
                                                       else "") for m, v in zip(names, t.values, strict=True))
        return f"trial #{t.number} ({family_of(t)}{size}): {values}"

    if len(study.directions) == 1:
        lines.append("best so far: " + describe(study.best_trial))
    else:
        front = sorted(study.best_trials, key=lambda t: t.values[0])
        lines.append(f"Pareto front: {len(front)} trial(s)")
        lines += [f"  {describe(t)}" for t in front[:10]]
        if len(front) > 10:
            lines.append(f"  ... and {len(front) - 10} more")
    failed = [t for t in trials if t.state == TrialState.FAIL and t.user_attrs.get("fail_reason")]
    for t in failed[-3:]:
        lines.append(f"failed: trial #{t.number}: {t.user_attrs['fail_reason']}")
    return "\n".join(lines)
