"""The comparison table of a study: Markdown (for the README) and CSV (full precision).

The Markdown opens with a line naming the study, objective and units, data identity, date and machine, then
the recipe's description, a units line and the command that reproduces it. Columns appear only where some
trial has a value; the long-context ones when measurements were taken.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.metrics import ALIASES, METRICS
from experiments.report.records import metric_names, objective_key, superseded
from experiments.runs import SCOPE_TRIAL
from experiments.study.ledger import TrialRecord
from experiments.study.recipe import RECIPES_DIR

__all__ = ["fmt_number", "metric_label", "write_tables"]


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
    name = ALIASES.get(name, name)
    return METRICS[name].label if name in METRICS else name


def unit_of(name: str) -> str:
    name = ALIASES.get(name, name)
    return METRICS[name].unit if name in METRICS else ""


@dataclass(frozen=True)
class _Column:
    key: str  # the CSV header
    header: str  # the Markdown header
    kind: str = "num"  # num | text


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


def _columns(rows: list[dict[str, Any]], objectives: Sequence[str], multi: bool) -> list[_Column]:
    extra: list[_Column] = []
    for metric in objectives:
        key = objective_key(metric)
        if key.startswith("objective:"):
            extra.append(_Column(key, metric))
        elif key not in {c.key for c in _FIXED_COLUMNS + _METRIC_COLUMNS + _COST_COLUMNS}:
            unit = unit_of(metric)
            extra.append(_Column(key, metric.replace("_", " ") + (f" ({unit})" if unit else "")))
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


def _header_lines(study: Any, rows: list[dict[str, Any]], records: list[TrialRecord],
                  recipe_info: dict[str, Any] | None) -> list[str]:
    names = metric_names(study)
    trials = [t for t in records if t.finished]
    summaries = [t.summary for t in trials if t.summary is not None]
    configs = [t.config for t in trials]
    objectives = ", ".join(f"{d.name.lower()} {m}" + (f" ({unit_of(m)})" if unit_of(m) else "")
                           for m, d in zip(names, study.directions, strict=True))
    what = []
    corpus_hash, n_hash = _most_common(s.corpus_hash for s in summaries)
    corpus, _ = _most_common((c.get("data") or {}).get("corpus") for c in configs)
    if corpus_hash or corpus:
        text = f"corpus {corpus or '?'}" + (f" `{str(corpus_hash)[:12]}`" if corpus_hash else "")
        what.append(text + (f" (+{n_hash - 1} other)" if n_hash > 1 else ""))
    task, _ = _most_common(s.task for s in summaries)
    task = task or _most_common((c.get("data") or {}).get("task") for c in configs)[0]
    if task:
        what.append(f"task {task}")
    dates = [t.datetime_complete for t in trials if t.datetime_complete]
    machine, n_machines = _most_common(s.machine for s in summaries)
    device, _ = _most_common(s.device for s in summaries)
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
    redone = len(superseded(records))
    line += f"; {redone} failed or interrupted trial(s) were redone and appear as their retries." if redone else "."
    lines = [line, ""]
    if recipe_info and recipe_info.get("description"):
        lines += [str(recipe_info["description"]), ""]
    has = {k for r in rows for k, v in r.items() if v not in (None, "")}
    units = [text for key, text in (
        ("val_ppl", "val ppl: validation perplexity per token"),
        ("val_bpb", "val bpb: validation bits per byte"),
        ("accuracy", "accuracy: fraction of answers correct on the task's fixed test set (acc a=v: on its slice)"),
        ("steps_to_target", "steps to target: the evaluation step at which test accuracy reached the recipe's "
                            "train.target_accuracy and training stopped (blank: not reached within the step budget)"),
        ("peak_memory_mib", _memoryunit_of(summaries)),
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


def _memoryunit_of(summaries: list[Any]) -> str:
    """What the peak MiB column measured: the training steps (this version), or the whole trial process
    (studies written before it, under their old wording)."""
    method, _ = _most_common(s.memory_method for s in summaries)
    scope, _ = _most_common(s.memory_scope for s in summaries)
    if scope == SCOPE_TRIAL:
        return "peak MiB: peak training memory above baseline" + (f" ({method})" if method else "")
    return ("peak MiB: peak memory of the first training steps above a baseline taken after the data was loaded "
            "and before the model was built — parameters, gradients, optimiser state and activations"
            + (f" ({method})" if method else ""))


def _command(recipe_info: dict[str, Any]) -> str:
    source = recipe_info.get("source") or ""
    name = recipe_info["name"]
    if source and Path(source).resolve().parent != RECIPES_DIR.resolve():
        name = source
    return f"mixerlab reproduce {name} --scale {recipe_info.get('scale', 'cpu')}"


def write_tables(study: Any, rows: list[dict[str, Any]], records: list[TrialRecord], out: Path,
                 recipe_info: dict[str, Any] | None, stem: str = "table") -> dict[str, Path]:
    """Write ``<stem>.md`` and ``<stem>.csv`` of ``rows`` (`table_rows`; ``records``: every trial of the
    study, for the header) into ``out``; return their paths by file name."""
    cols = _columns(rows, metric_names(study), len(study.directions) > 1)
    md = _header_lines(study, rows, records, recipe_info)
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
