"""Long-context probes: how time, memory, loss, decoding and task accuracy change with sequence length.

- `scaling_probe`: time and peak memory vs T (one fresh process per length, via `run_isolated`), the fitted
  scaling exponents (`fit_power_law`) and the largest T that fits a memory budget (`max_length_for_budget`);
- `decode_probe`: per-token decoding latency and cache bytes vs context length (prefill L, then time single
  steps), measured cache bytes beside the analytic ``state_bytes(L)``;
- `loss_vs_length`: loss vs token position (binned) and vs evaluation length (1x .. 8x the training length)
  for a trained corpus run; `task_accuracy_vs_length`: a trained task run's accuracy on its test slices;
- `run_probes`: a study recipe's ``[measure]`` table run on a trained trial.

Each measurement of time or memory runs in a fresh process with the `Isolation` given (threads, timeout,
device, dtype).

A model with learned positions cannot run past ``max_seq_len``: such lengths are reported as
``"n/a — learned positions, max_seq_len=N"``, never a crash.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from experiments.child import Isolation, run_isolated
from experiments.errors import MeasureError, RunError
from experiments.fits import fit_power_law, max_length_for_budget
from experiments.runs import available_bytes, load_run
from experiments.targets import length_limit, resolve_target

__all__ = [
    "MEMORY_FLOOR_BYTES",
    "TIME_FLOOR_S",
    "context_probe",
    "decode_point",
    "decode_probe",
    "decode_result",
    "loss_vs_length",
    "run_probes",
    "scaling_point",
    "scaling_probe",
    "scaling_result",
    "task_accuracy_vs_length",
]

#: values below these are treated as noise and left out of the exponent fits
MEMORY_FLOOR_BYTES = 4 * 2**20
TIME_FLOOR_S = 2e-3
_ISOLATION = Isolation(timeout=1800)


def _na_learned(limit: int) -> str:
    return f"n/a — learned positions, max_seq_len={limit}"


# time and memory vs T ---------------------------------------------------------------------------------------
def scaling_point(target: dict[str, Any], t: int, earlier: Sequence[dict[str, Any]], *, mode: str = "fwdbwd",
                  batch: int = 1, repeats: int = 3, isolation: Isolation = _ISOLATION,
                  memory_floor: float = MEMORY_FLOOR_BYTES) -> dict[str, Any]:
    """Time and peak memory of ``target`` at length ``t`` in a fresh process: one row of `scaling_probe`.

    ``earlier`` are the target's rows at shorter lengths: after a failed one, ``t`` is skipped; so is a
    length whose memory, predicted from them, would not fit in this machine's available memory.
    """
    limit = length_limit(target)
    row: dict[str, Any] = {"seq_len": t}
    if limit is not None and t > limit:
        row["status"] = _na_learned(limit)
        return row
    failed = [r for r in earlier if r["status"].startswith(("failed", "skipped"))]
    if failed:
        first = failed[0]
        row["status"] = (first["status"] if first["status"].startswith("skipped: predicted")
                         else f"skipped: a shorter length failed (T={first['seq_len']})")
        return row
    ok = [r for r in earlier if r.get("status") == "ok"]
    fit = fit_power_law([r["seq_len"] for r in ok], [r["peak_bytes"] for r in ok], floor=memory_floor)
    avail = available_bytes() if isolation.device == "cpu" else None
    predicted = fit["coef"] * t ** fit["exponent"] if fit else None
    if predicted is not None and avail is not None and predicted > 0.8 * avail:
        row["status"] = f"skipped: predicted {predicted / 2**30:.1f} GiB > 80% of the {avail / 2**30:.1f} GiB available"
        return row
    try:
        r = run_isolated("experiments.measure:bench", {
            "target": target, "seq_len": t, "batch": batch, "mode": mode, "repeats": repeats,
            "device": isolation.device, "dtype": isolation.dtype}, isolation)
        row.update(r, status="ok", seq_len=t)
    except MeasureError as exc:
        msg = str(exc).strip().splitlines()
        row.update(status="failed: " + (msg[-1] if msg else "?"), error=str(exc))
    return row


def scaling_result(target: dict[str, Any], rows: list[dict[str, Any]], *, mode: str = "fwdbwd", batch: int = 1,
                   repeats: int = 3, budget_bytes: float | None = None, isolation: Isolation = _ISOLATION,
                   memory_floor: float = MEMORY_FLOOR_BYTES, time_floor: float = TIME_FLOOR_S) -> dict[str, Any]:
    """`scaling_probe`'s result from its rows: the fitted exponents of memory and time vs T and the largest
    T within ``budget_bytes``."""
    limit = length_limit(target)
    ok = [r for r in rows if r.get("status") == "ok"]
    xs = [r["seq_len"] for r in ok]
    fits = {"memory": fit_power_law(xs, [r["peak_bytes"] for r in ok], floor=memory_floor),
            "time": fit_power_law(xs, [r["time_s"] for r in ok], floor=time_floor)}
    out: dict[str, Any] = {"probe": "scaling", "target": target, "mode": mode, "batch": batch, "repeats": repeats,
                           "device": isolation.device, "dtype": isolation.dtype, "threads": isolation.threads,
                           "rows": rows, "fit": fits}
    if budget_bytes is not None:
        out["budget"] = max_length_for_budget(xs, [r["peak_bytes"] for r in ok], fits["memory"], budget_bytes)
        if limit is not None and out["budget"].get("seq_len") and out["budget"]["seq_len"] > limit:
            out["budget"].update(seq_len=limit, note=f"capped by learned positions (max_seq_len={limit})")
    return out


def scaling_probe(target: dict[str, Any], lengths: Sequence[int], *, mode: str = "fwdbwd", batch: int = 1,
                  repeats: int = 3, budget_bytes: float | None = None, isolation: Isolation = _ISOLATION,
                  memory_floor: float = MEMORY_FLOOR_BYTES, time_floor: float = TIME_FLOOR_S,
                  on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Time and peak memory of ``target`` (see `measure.resolve_target`) at each length, each in a fresh
    process (`scaling_point`); the fitted exponents of memory and time vs T; the largest T within
    ``budget_bytes`` (`scaling_result`).

    A failed length is recorded and the longer ones are skipped; so is a length whose memory, predicted from
    the points so far, would not fit in this machine's available memory.
    """
    rows: list[dict[str, Any]] = []
    for t in sorted(set(int(t) for t in lengths)):
        rows.append(scaling_point(target, t, rows, mode=mode, batch=batch, repeats=repeats, isolation=isolation,
                                  memory_floor=memory_floor))
        if on_row is not None:
            on_row(rows[-1])
    return scaling_result(target, rows, mode=mode, batch=batch, repeats=repeats, budget_bytes=budget_bytes,
                          isolation=isolation, memory_floor=memory_floor, time_floor=time_floor)


# decoding vs context ----------------------------------------------------------------------------------------
def decode_point(target: dict[str, Any], context: int, *, steps: int = 32, batch: int = 1,
                 isolation: Isolation = _ISOLATION) -> dict[str, Any]:
    """Per-token decoding latency and cache bytes after prefilling ``context`` tokens, in a fresh process:
    one row of `decode_probe`."""
    limit = length_limit(target)
    row: dict[str, Any] = {"context": context}
    if limit is not None and context + steps > limit:
        row["status"] = _na_learned(limit)
        return row
    try:
        r = run_isolated("experiments.measure:bench_decode", {
            "target": target, "context": context, "steps": steps, "batch": batch, "device": isolation.device,
            "dtype": isolation.dtype}, isolation)
        row.update(r, status="ok", context=context)
    except MeasureError as exc:
        msg = str(exc).strip().splitlines()
        row.update(status="failed: " + (msg[-1] if msg else "?"), error=str(exc))
    return row


def decode_result(target: dict[str, Any], rows: list[dict[str, Any]], *, steps: int = 32, batch: int = 1,
                  isolation: Isolation = _ISOLATION) -> dict[str, Any]:
    """`decode_probe`'s result from its rows: the latency growth and the fitted exponents vs context."""
    ok = [r for r in rows if r.get("status") == "ok"]
    xs = [r["context"] for r in ok]
    lat, lat_min = [r["latency_s"] for r in ok], [r["latency_min_s"] for r in ok]
    out: dict[str, Any] = {"probe": "decode", "target": target, "steps": steps, "batch": batch,
                           "device": isolation.device, "dtype": isolation.dtype, "threads": isolation.threads,
                           "rows": rows,
                           "fit": {"latency": fit_power_law(xs, lat), "latency_min": fit_power_law(xs, lat_min),
                                   "cache_bytes": fit_power_law(xs, [r["cache_bytes"] for r in ok])}}
    out["growth"] = lat[-1] / lat[0] if len(lat) >= 2 and lat[0] > 0 else None
    out["growth_min"] = lat_min[-1] / lat_min[0] if len(lat) >= 2 and lat_min[0] > 0 else None
    return out


def decode_probe(target: dict[str, Any], contexts: Sequence[int], *, steps: int = 32, batch: int = 1,
                 isolation: Isolation = _ISOLATION,
                 on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Per-token decoding latency and cache bytes after prefilling each context length (fresh process each).

    ``growth`` is the ratio of the per-token latency at the longest context to that at the shortest
    (``growth_min`` the same for the fastest step of each), and ``fit`` the fitted exponents vs context.
    """
    rows = []
    for c in sorted(set(int(c) for c in contexts)):
        rows.append(decode_point(target, c, steps=steps, batch=batch, isolation=isolation))
        if on_row is not None:
            on_row(rows[-1])
    return decode_result(target, rows, steps=steps, batch=batch, isolation=isolation)


# trained runs: loss and accuracy vs length ------------------------------------------------------------------
def _bins(losses: Any, counts: Any, n_bins: int) -> list[dict[str, Any]]:
    """Mean loss over ``n_bins`` equal ranges of positions; ``losses``/``counts`` are per position (T,)."""
    t = losses.shape[0]
    n_bins = max(1, min(n_bins, t))
    edges = [round(i * t / n_bins) for i in range(n_bins + 1)]
    out = []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        n = float(counts[a:b].sum())
        out.append({"start": a, "end": b, "loss": float(losses[a:b].sum()) / n if n else None})
    return out


def loss_vs_length(run_dir: str | Path, *, multipliers: Sequence[float] = (1, 2, 4, 8), bins: int = 8,
                   tokens: int = 32768, batch: int = 8, split: str = "val", device: str = "cpu") -> dict[str, Any]:
    """Loss of a trained corpus run vs evaluation length (``multipliers`` x its training length) and vs token
    position (``bins`` equal ranges of each length), on ``tokens`` tokens of ``split`` per length."""
    from experiments.config import DataSpec
    from experiments.data import load_corpus
    from experiments.data.training import position_losses

    model, specs = load_run(run_dir, device)
    data = specs["data"]
    if DataSpec.from_dict(data).kind == "task":
        raise RunError(f"{run_dir} trained on task {data['task']!r}; use task_accuracy_vs_length")
    corpus = load_corpus(data["corpus"], **data.get("options", {}))
    train_len = specs["train"]["seq_len"]
    limit = model.spec.length_limit
    rows = []
    for m in multipliers:
        length = int(round(train_len * m))
        row: dict[str, Any] = {"multiplier": m, "seq_len": length}
        available = corpus.num_eval_windows(split, length)
        if limit is not None and length > limit:
            row["status"] = _na_learned(limit)
        elif available < 1:
            row["status"] = f"n/a — the {split} split has {corpus.num_tokens(split)} tokens"
        else:
            windows = max(1, min(tokens // length, available))
            size = min(batch, windows)
            sums, counts = position_losses(model, corpus, split, length, size, math.ceil(windows / size), device)
            total = float(sums.sum() / counts.sum())
            inside = min(train_len, length)
            row.update(status="ok", loss=total, ppl=math.exp(min(total, 50.0)), tokens=int(counts.sum()),
                       loss_within_train_len=float(sums[:inside].sum() / counts[:inside].sum()),
                       loss_beyond_train_len=(float(sums[inside:].sum() / counts[inside:].sum())
                                              if length > train_len else None),
                       by_position=_bins(sums, counts, bins))
        rows.append(row)
    return {"probe": "loss_vs_length", "run": str(run_dir), "train_seq_len": train_len, "split": split,
            "positions": model.spec.positions, "max_seq_len": model.spec.max_seq_len, "step": specs.get("step"),
            "dataset": corpus.describe()["content_hash"], "rows": rows}


def task_accuracy_vs_length(run_dir: str | Path, *, examples: int | None = None, batch: int = 32,
                            device: str = "cpu") -> dict[str, Any]:
    """Accuracy of a trained task run on each slice of its task's fixed test set, and by sequence length
    (the training run's own evaluation, `TaskData.report`, over every slice)."""
    from experiments.config import DataSpec, TrainSpec
    from experiments.data.training import TaskData

    model, specs = load_run(run_dir, device)
    spec = DataSpec.from_dict(specs["data"])
    if spec.kind != "task":
        raise RunError(f"{run_dir} trained on corpus {spec.corpus!r}, not a task; use loss_vs_length")
    data = TaskData(spec, TrainSpec(seq_len=specs["train"]["seq_len"], batch_size=batch, eval_examples=examples))
    report = data.report(model, device)
    task, limit = data.task, model.spec.length_limit
    rows = []
    for sl in data.task.test_set(examples):
        row: dict[str, Any] = {"slice": sl.name, "seq_len": sl.inputs.shape[1], **sl.attrs,
                               "multiplier": sl.inputs.shape[1] / task.seq_len}
        if sl in report["skipped"]:
            row["status"] = _na_learned(limit)
        else:
            got = report["slices"][sl.name]
            row.update(status="ok", accuracy=got["accuracy"], exact_match=got["exact_match"], examples=len(sl))
        rows.append(row)
    by = [{"seq_len": length, "multiplier": length / task.seq_len,
           **({"status": "ok", "accuracy": acc} if acc is not None else {"status": _na_learned(limit)})}
          for length, acc in sorted(report["by"].get("seq_len", {}).items())]
    return {"probe": "task_accuracy_vs_length", "run": str(run_dir), "task": spec.task,
            "train_seq_len": task.seq_len, "positions": model.spec.positions, "max_seq_len": model.spec.max_seq_len,
            "step": specs.get("step"), "rows": rows, "by_seq_len": by}


def context_probe(run: str, **kwargs: Any) -> dict[str, Any]:
    """`loss_vs_length` for a corpus run, `task_accuracy_vs_length` for a task run (kwargs that apply)."""
    from experiments.config import DataSpec

    specs = json.loads((Path(run) / "spec.json").read_text())
    if DataSpec.from_dict(specs["data"]).kind == "task":
        keep = {k: v for k, v in kwargs.items() if k in ("examples", "batch", "device")}
        return task_accuracy_vs_length(run, **keep)
    keep = {k: v for k, v in kwargs.items() if k in ("multipliers", "bins", "tokens", "batch", "split", "device")}
    return loss_vs_length(run, **keep)


def run_probes(measure: dict[str, dict[str, Any]], run_dir: str | Path, model: Any, task: bool,
               isolation: Isolation = _ISOLATION) -> dict[str, Any]:
    """A recipe's ``[measure]`` table on a trained trial, each case in a fresh process.

    ``memory``: time and peak memory vs T of the first layer's mixer (``of = "mixer"``) or the whole model;
    ``decode``: per-token latency and cache bytes vs context; ``context``: loss vs position and evaluation
    length (corpus) or accuracy vs length (task). ``model`` is the trial's `ModelSpec`. A failing probe is
    recorded (``{"error": ...}``); the trial's training result stands.
    """
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
                                          batch=opts.get("batch", 1), repeats=opts.get("repeats", 2),
                                          isolation=isolation)
            elif kind == "decode":
                out[kind] = decode_probe(resolve_target(run=run_dir), opts["contexts"], steps=opts.get("steps", 16),
                                         batch=opts.get("batch", 1), isolation=isolation)
            elif task:
                out[kind] = task_accuracy_vs_length(run_dir, examples=opts.get("examples"))
            else:
                out[kind] = loss_vs_length(run_dir, multipliers=opts.get("multipliers", (1, 2, 4, 8)),
                                           bins=opts.get("bins", 8), tokens=opts.get("tokens", 32768))
        except Exception as exc:  # recorded; the trial's training result stands
            out[kind] = {"error": f"{type(exc).__name__}: {exc}"}
    return out
