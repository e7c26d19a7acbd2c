"""Long-context probes: how time, memory, loss, decoding and task accuracy change with sequence length.

- `scaling_probe`: time and peak memory vs T (one fresh process per length, via `run_isolated`), the fitted
  scaling exponents (`fit_power_law`) and the largest T that fits a memory budget (`max_length_for_budget`);
- `decode_probe`: per-token decoding latency and cache bytes vs context length (prefill L, then time single
  steps), measured cache bytes beside the analytic ``state_bytes(L)``;
- `loss_vs_length`: loss vs token position (binned) and vs evaluation length (1x .. 8x the training length)
  for a trained corpus run; `task_accuracy_vs_length`: a trained task run's accuracy on its test slices.

A model with learned positions cannot run past ``max_seq_len``: such lengths are reported as
``"n/a — learned positions, max_seq_len=N"``, never a crash.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from experiments.measure import MeasureError, length_limit, run_isolated

__all__ = [
    "MEMORY_FLOOR_BYTES",
    "TIME_FLOOR_S",
    "context_probe",
    "decode_probe",
    "fit_power_law",
    "load_run",
    "loss_vs_length",
    "max_length_for_budget",
    "scaling_probe",
    "task_accuracy_vs_length",
]

#: values below these are treated as noise and left out of the exponent fits
MEMORY_FLOOR_BYTES = 4 * 2**20
TIME_FLOOR_S = 2e-3


def _na_learned(limit: int) -> str:
    return f"n/a — learned positions, max_seq_len={limit}"


# fitting ----------------------------------------------------------------------------------------------------
def fit_power_law(xs: Sequence[float], ys: Sequence[float | None], *, floor: float = 0.0) -> dict[str, Any] | None:
    """Least-squares fit of ``log y = log c + k log x`` over the points with ``y > floor``.

    Returns ``{"exponent": k, "coef": c, "r2", "used": [x...], "dropped": [x...]}``, or ``None`` when fewer
    than two points (at distinct x) are above the floor.
    """
    pts = [(float(x), float(y)) for x, y in zip(xs, ys, strict=True)
           if y is not None and x > 0 and math.isfinite(y) and y > max(floor, 0.0)]
    if len({x for x, _ in pts}) < 2:
        return None
    lx = [math.log(x) for x, _ in pts]
    ly = [math.log(y) for _, y in pts]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    k = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sxx
    log_c = my - k * mx
    ss_res = sum((b - (log_c + k * a)) ** 2 for a, b in zip(lx, ly, strict=True))
    ss_tot = sum((b - my) ** 2 for b in ly)
    used = [x for x, _ in pts]
    return {"exponent": k, "coef": math.exp(log_c), "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0,
            "used": [int(x) if x.is_integer() else x for x in used],
            "dropped": [x for x in xs if float(x) not in used], "floor": floor}


def max_length_for_budget(xs: Sequence[int], ys: Sequence[float | None], fit: dict[str, Any] | None,
                          budget: float) -> dict[str, Any]:
    """The largest length whose value (peak bytes) stays within ``budget``.

    ``how`` is ``"measured"`` when the budget is crossed inside the measured lengths (the answer is the
    largest measured length that fits; ``estimate`` interpolates the fit), else ``"extrapolated"`` from the
    fit (``None`` length when the value does not grow with T).
    """
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    fits = [x for x, y in pts if y <= budget]
    over = [x for x, y in pts if y > budget]
    estimate = None
    if fit is not None and fit["exponent"] > 1e-3:
        estimate = int(math.floor((budget / fit["coef"]) ** (1.0 / fit["exponent"])))
    out: dict[str, Any] = {"budget_bytes": int(budget), "estimate": estimate}
    if over and fits and min(over) > max(fits):
        return {**out, "seq_len": max(fits), "how": "measured"}
    if over and fits:  # not monotone (noise): the largest length that fits below the first that does not
        below = [x for x in fits if x < min(over)]
        if below:
            return {**out, "seq_len": max(below), "how": "measured"}
    if fit is None:
        return {**out, "seq_len": max(fits) if fits else None, "how": "measured (no fit)"}
    if fit["exponent"] <= 1e-3:
        return {**out, "seq_len": None, "how": "extrapolated", "note": "memory does not grow with T"}
    return {**out, "seq_len": estimate, "how": "extrapolated"}


# time and memory vs T ---------------------------------------------------------------------------------------
def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def scaling_probe(target: dict[str, Any], lengths: Sequence[int], *, mode: str = "fwdbwd", batch: int = 1,
                  repeats: int = 3, budget_bytes: float | None = None, device: str = "cpu",
                  dtype: str = "float32", threads: int | None = None, timeout: float | None = 1800,
                  memory_floor: float = MEMORY_FLOOR_BYTES, time_floor: float = TIME_FLOOR_S,
                  on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Time and peak memory of ``target`` (see `measure.resolve_target`) at each length, each in a fresh
    process; the fitted exponents of memory and time vs T; the largest T within ``budget_bytes``.

    A failed length is recorded and the longer ones are skipped; so is a length whose memory, predicted from
    the points so far, would not fit in this machine's available memory.
    """
    lengths = sorted(set(int(t) for t in lengths))
    limit = length_limit(target)
    rows: list[dict[str, Any]] = []
    stop = ""
    for t in lengths:
        row: dict[str, Any] = {"seq_len": t}
        if limit is not None and t > limit:
            row["status"] = _na_learned(limit)
        elif stop:
            row["status"] = stop
        else:
            fit = fit_power_law([r["seq_len"] for r in rows if r.get("status") == "ok"],
                                [r["peak_bytes"] for r in rows if r.get("status") == "ok"], floor=memory_floor)
            avail = _mem_available() if device == "cpu" else None
            predicted = fit["coef"] * t ** fit["exponent"] if fit else None
            if predicted is not None and avail is not None and predicted > 0.8 * avail:
                row["status"] = stop = (f"skipped: predicted {predicted / 2**30:.1f} GiB > 80% of the "
                                        f"{avail / 2**30:.1f} GiB available")
            else:
                try:
                    r = run_isolated("experiments.measure:bench", {
                        "target": target, "seq_len": t, "batch": batch, "mode": mode, "repeats": repeats,
                        "device": device, "dtype": dtype}, threads=threads, timeout=timeout)
                    row.update(r, status="ok", seq_len=t)
                except MeasureError as exc:
                    msg = str(exc).strip().splitlines()
                    row["status"] = "failed: " + (msg[-1] if msg else "?")
                    row["error"] = str(exc)
                    stop = f"skipped: a shorter length failed (T={t})"
        rows.append(row)
        if on_row is not None:
            on_row(row)
    ok = [r for r in rows if r.get("status") == "ok"]
    xs = [r["seq_len"] for r in ok]
    fits = {"memory": fit_power_law(xs, [r["peak_bytes"] for r in ok], floor=memory_floor),
            "time": fit_power_law(xs, [r["time_s"] for r in ok], floor=time_floor)}
    out: dict[str, Any] = {"probe": "scaling", "target": target, "mode": mode, "batch": batch, "repeats": repeats,
                           "device": device, "dtype": dtype, "threads": threads, "rows": rows, "fit": fits}
    if budget_bytes is not None:
        out["budget"] = max_length_for_budget(xs, [r["peak_bytes"] for r in ok], fits["memory"], budget_bytes)
        if limit is not None and out["budget"].get("seq_len") and out["budget"]["seq_len"] > limit:
            out["budget"].update(seq_len=limit, note=f"capped by learned positions (max_seq_len={limit})")
    return out


# decoding vs context ----------------------------------------------------------------------------------------
def decode_probe(target: dict[str, Any], contexts: Sequence[int], *, steps: int = 32, batch: int = 1,
                 device: str = "cpu", dtype: str = "float32", threads: int | None = None,
                 timeout: float | None = 1800,
                 on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Per-token decoding latency and cache bytes after prefilling each context length (fresh process each).

    ``growth`` is the ratio of the per-token latency at the longest context to that at the shortest
    (``growth_min`` the same for the fastest step of each), and ``fit`` the fitted exponents vs context.
    """
    contexts = sorted(set(int(c) for c in contexts))
    limit = length_limit(target)
    rows: list[dict[str, Any]] = []
    for c in contexts:
        row: dict[str, Any] = {"context": c}
        if limit is not None and c + steps > limit:
            row["status"] = _na_learned(limit)
        else:
            try:
                r = run_isolated("experiments.measure:bench_decode", {
                    "target": target, "context": c, "steps": steps, "batch": batch, "device": device,
                    "dtype": dtype}, threads=threads, timeout=timeout)
                row.update(r, status="ok", context=c)
            except MeasureError as exc:
                msg = str(exc).strip().splitlines()
                row.update(status="failed: " + (msg[-1] if msg else "?"), error=str(exc))
        rows.append(row)
        if on_row is not None:
            on_row(row)
    ok = [r for r in rows if r.get("status") == "ok"]
    xs = [r["context"] for r in ok]
    lat, lat_min = [r["latency_s"] for r in ok], [r["latency_min_s"] for r in ok]
    out: dict[str, Any] = {"probe": "decode", "target": target, "steps": steps, "batch": batch, "device": device,
                           "dtype": dtype, "threads": threads, "rows": rows,
                           "fit": {"latency": fit_power_law(xs, lat), "latency_min": fit_power_law(xs, lat_min),
                                   "cache_bytes": fit_power_law(xs, [r["cache_bytes"] for r in ok])}}
    out["growth"] = lat[-1] / lat[0] if len(lat) >= 2 and lat[0] > 0 else None
    out["growth_min"] = lat_min[-1] / lat_min[0] if len(lat) >= 2 and lat_min[0] > 0 else None
    return out


# trained runs: loss and accuracy vs length ------------------------------------------------------------------
def load_run(run_dir: str | Path, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """The trained model of a run directory (``spec.json`` + ``checkpoint.pt``), in eval mode, and its specs."""
    import torch

    from archs.model import LanguageModel, ModelSpec

    run = Path(run_dir)
    if not (run / "spec.json").is_file():
        raise FileNotFoundError(f"{run} is not a run directory (no spec.json); pass the --out of a training run")
    if not (run / "checkpoint.pt").is_file():
        raise FileNotFoundError(f"{run} has no checkpoint.pt (the run saved no evaluation yet)")
    specs = json.loads((run / "spec.json").read_text())
    model = LanguageModel(ModelSpec.from_dict(specs["model"]))
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(ckpt["model"])
    specs["step"] = ckpt.get("step")
    return model.to(device).eval(), specs


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
    import torch
    import torch.nn.functional as F

    from experiments.data import load_corpus

    model, specs = load_run(run_dir, device)
    data = specs["data"]
    if data.get("task"):
        raise ValueError(f"{run_dir} trained on task {data['task']!r}; use task_accuracy_vs_length")
    corpus = load_corpus(data["corpus"], **data.get("options", {}))
    train_len = specs["train"]["seq_len"]
    limit = model.spec.max_seq_len if model.spec.positions == "learned" else None
    rows = []
    for m in multipliers:
        length = int(round(train_len * m))
        row: dict[str, Any] = {"multiplier": m, "seq_len": length}
        windows = max(1, min(tokens // length, corpus.num_eval_windows(split, length)))
        if limit is not None and length > limit:
            row["status"] = _na_learned(limit)
        elif corpus.num_eval_windows(split, length) < 1:
            row["status"] = f"n/a — the {split} split has {corpus.num_tokens(split)} tokens"
        else:
            sums = torch.zeros(length, dtype=torch.float64)
            counts = torch.zeros(length, dtype=torch.float64)
            with torch.no_grad():
                for x, y in corpus.eval_batches(split, min(batch, windows), length,
                                                max_batches=math.ceil(windows / min(batch, windows))):
                    logits = model(x.to(device))  # (B, T, V)
                    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(), reduction="none")
                    sums += loss.view(x.shape).double().sum(0).cpu()
                    counts += x.shape[0]
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
    """Accuracy of a trained task run on each slice of its task's fixed test set, and by sequence length."""
    import torch

    from experiments.tasks import make_task, predictions_of

    model, specs = load_run(run_dir, device)
    data = specs["data"]
    if not data.get("task"):
        raise ValueError(f"{run_dir} trained on corpus {data.get('corpus')!r}, not a task; use loss_vs_length")
    options = dict(data.get("options", {}))
    options.setdefault("seq_len", specs["train"]["seq_len"])
    task = make_task(data["task"], **options)
    limit = model.spec.max_seq_len if model.spec.positions == "learned" else None
    rows, by_len = [], {}
    with torch.no_grad():
        for sl in task.test_set(examples):
            length = sl.inputs.shape[1]
            row: dict[str, Any] = {"slice": sl.name, "seq_len": length, **sl.attrs,
                                   "multiplier": length / task.seq_len}
            if limit is not None and length > limit:
                row["status"] = _na_learned(limit)
                by_len.setdefault(length, None)
            else:
                preds = torch.cat([predictions_of(model(sl.inputs[i:i + batch].to(device))).cpu()
                                   for i in range(0, len(sl), batch)])
                row.update(status="ok", accuracy=task.accuracy(preds, sl), exact_match=task.exact_match(preds, sl),
                           examples=len(sl))
                hits = float(((preds == sl.targets) & (sl.targets != -100)).sum())
                n = float((sl.targets != -100).sum())
                prev = by_len.get(length) or [0.0, 0.0]
                by_len[length] = [prev[0] + hits, prev[1] + n]
            rows.append(row)
    by = []
    for length in sorted(by_len):
        v = by_len[length]
        by.append({"seq_len": length, "multiplier": length / task.seq_len,
                   **({"status": "ok", "accuracy": v[0] / v[1] if v[1] else None} if v
                      else {"status": _na_learned(limit)})})
    return {"probe": "task_accuracy_vs_length", "run": str(run_dir), "task": data["task"],
            "train_seq_len": task.seq_len, "positions": model.spec.positions, "max_seq_len": model.spec.max_seq_len,
            "step": specs.get("step"), "rows": rows, "by_seq_len": by}


def context_probe(run: str, **kwargs: Any) -> dict[str, Any]:
    """`loss_vs_length` for a corpus run, `task_accuracy_vs_length` for a task run (kwargs that apply)."""
    specs = json.loads((Path(run) / "spec.json").read_text())
    if specs["data"].get("task"):
        keep = {k: v for k, v in kwargs.items() if k in ("examples", "batch", "device")}
        return task_accuracy_vs_length(run, **keep)
    keep = {k: v for k, v in kwargs.items() if k in ("multipliers", "bins", "tokens", "batch", "split", "device")}
    return loss_vs_length(run, **keep)
