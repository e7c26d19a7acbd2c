"""``mixerlab measure memory | speed | decode | context``: each measurement in a fresh process, results as
``results.json`` and ``results.md``, a short table on the terminal.

    mixerlab measure memory --mixer attention --option impl=math --lengths 512,1024,2048,4096 --budget-gb 4
    mixerlab measure memory --run runs/my-run --mode train --batch 16 --lengths 128   # one training step
    mixerlab measure speed  --preset transformer --d-model 256 --mode fwd --lengths 256,1024
    mixerlab measure decode --preset mamba --d-model 256 --lengths 256,1024,4096 --steps 32
    mixerlab measure context --run runs/my-run --multipliers 1,2,4,8
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from experiments.child import Isolation, run_isolated
from experiments.cli.base import command, numbers, table
from experiments.config import resolve_device
from experiments.errors import MeasureError, UsageError
from experiments.measure import MODES
from experiments.probes import decode_probe, scaling_probe
from experiments.runs import machine_info
from experiments.targets import resolve_target

__all__ = ["configure_parser", "run_cli"]


DEFAULT_LENGTHS = {"memory": "512,1024,2048,4096", "speed": "512,1024,2048,4096", "decode": "256,1024,4096"}


def _add_target_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to measure (one of)")
    g.add_argument("--mixer", metavar="NAME", help="one registered mixer layer (see `mixerlab list`)")
    g.add_argument("--preset", metavar="NAME", help="a whole model from a named preset (e.g. transformer, mamba)")
    g.add_argument("--spec", metavar="FILE.json",
                   help="a whole model from a ModelSpec JSON file (or a run's spec.json)")
    g.add_argument("--run", metavar="DIR", help="the model of a training run directory")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a mixer option (repeatable; values parse as JSON, else as text), e.g. --option impl=math")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ModelSpec field of a --preset/--spec model (repeatable), e.g. --set n_layers=2")
    p.add_argument("--d-model", type=int, default=None,
                   help="width: of the mixer layer (default 256) or of a --preset/--spec model")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu) | cpu | cuda[:N]")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))


def _add_common_args(p: argparse.ArgumentParser, lengths: str | None) -> None:
    if lengths is not None:
        p.add_argument("--lengths", nargs="+", default=[lengths], metavar="T",
                       help=f"sequence/context lengths, comma- or space-separated (default {lengths})")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads in each measurement process")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per measurement process")
    p.add_argument("--out", type=Path, default=None,
                   help="results directory (default runs/measure/<what>-<date-time>); gets results.json and .md")
    p.add_argument("--check", action="store_true", help="validate the arguments and what to measure, then stop: "
                                                         "nothing is measured or written")


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Add the ``memory | speed | decode | context`` subcommands of ``mixerlab measure`` to ``p``."""
    p.description = ("Measure time, memory and long-context behaviour, each measurement in a fresh process. "
                     "Results (with the analytic FLOPs and cache bytes beside the measured numbers) go to "
                     "--out as results.json and results.md.")
    sub = p.add_subparsers(dest="measure_command", metavar="WHAT")
    helps = {
        "memory": "peak memory and time vs sequence length, fitted exponents, the largest T within --budget-gb",
        "speed": "time and tokens/s vs sequence length (forward or forward+backward), fitted time exponent",
        "decode": "per-token decoding latency and cache bytes vs context length (prefill L, then N steps)",
        "context": "a trained run: loss vs position and vs length (1x..8x training), or task accuracy vs length",
    }
    for name in ("memory", "speed", "decode"):
        q = sub.add_parser(name, help=helps[name], description=helps[name])
        _add_target_args(q)
        _add_common_args(q, DEFAULT_LENGTHS[name])
        if name != "decode":
            q.add_argument("--mode", default="fwdbwd" if name == "memory" else "fwd", choices=MODES,
                           help="fwd (inference), fwdbwd (forward+backward; the weights exist before the "
                                "baseline) or train (a whole AdamW step with the model built after the baseline: "
                                "the figure a training run records)")
            q.add_argument("--repeats", type=int, default=3, help="timed repeats per length (median reported)")
        if name == "memory":
            q.add_argument("--budget-gb", type=float, default=None,
                           help="memory budget (GiB) for the largest-T estimate (peak above the baseline)")
        if name == "decode":
            q.add_argument("--steps", type=int, default=32, help="single-token steps timed after the prefill")
    q = sub.add_parser("context", help=helps["context"], description=helps["context"])
    q.add_argument("--run", metavar="DIR", required=True, help="a training run directory (spec.json, checkpoint.pt)")
    q.add_argument("--multipliers", nargs="+", default=["1,2,4,8"], metavar="M",
                   help="evaluation lengths as multiples of the training length (corpus runs; default 1,2,4,8)")
    q.add_argument("--bins", type=int, default=8, help="position bins per length (default 8)")
    q.add_argument("--tokens", type=int, default=32768, help="validation tokens per length (default 32768)")
    q.add_argument("--examples", type=int, default=None, help="test examples per slice (task runs)")
    q.add_argument("--batch", type=int, default=8, help="evaluation batch size (default 8)")
    q.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    _add_common_args(q, None)


def _pairs(items: list[str], flag: str) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} impl=math")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _device(name: str) -> str:
    return str(resolve_device(name))


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        v = getattr(args, name, None)
        if v is not None and v <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {v}")


def _command_line(args: argparse.Namespace) -> str:
    skip = {"measure_command", "command", "verbose"}
    parts = ["mixerlab", "measure", args.measure_command]
    for key, value in vars(args).items():
        if key in skip or key.startswith("_") or value is None or value == [] or callable(value):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, list):
            if key in ("option", "set"):
                parts += [x for v in value for x in (flag, str(v))]
            else:
                parts += [flag, ",".join(map(str, value))]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def _mib(b: float | None) -> str:
    if b is None:
        return "-"
    m = b / 2**20
    return f"{m:,.1f}" if m >= 10 or m == 0 else f"{m:.3g}"


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def _fit_line(name: str, fit: dict[str, Any] | None, unit: str = "T") -> str:
    if fit is None:
        return f"{name} ∝ {unit}^k: not enough points above the noise floor to fit"
    dropped = f"; left out (below noise): {fit['dropped']}" if fit["dropped"] else ""
    return (f"{name} ∝ {unit}^{fit['exponent']:.2f} (least squares over {unit} = {fit['used']}, "
            f"R² = {fit['r2']:.3f}{dropped})")


def _render(what: str, result: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, notes) of the short table for a result."""
    notes: list[str] = []
    if what in ("memory", "speed"):
        header = ["T", "time (s)", "tokens/s", "peak MiB", "state MiB (analytic)", "GFLOP/token (analytic)",
                  "status"]
        rows = [[str(r["seq_len"]), _fmt(r.get("time_s")), _fmt(r.get("tokens_per_s"), ",.0f"),
                 _mib(r.get("peak_bytes")), _mib(r.get("state_bytes")),
                 _fmt(r["flops_per_token"] / 1e9 if r.get("flops_per_token") is not None else None, ".4g"),
                 r["status"]] for r in result["rows"]]
        notes.append(_fit_line("peak memory", result["fit"]["memory"]))
        notes.append(_fit_line("time", result["fit"]["time"]))
        b = result.get("budget")
        if b:
            t = "unbounded" if b["seq_len"] is None else f"T = {b['seq_len']:,}"
            est = f" (fit's estimate {b['estimate']:,})" if b.get("estimate") and b["how"] == "measured" else ""
            notes.append(f"largest T within {b['budget_bytes'] / 2**30:g} GiB: {t}, {b['how']}{est}"
                         + (f"; {b['note']}" if b.get("note") else ""))
    elif what == "decode":
        header = ["context", "ms/token (median)", "ms/token (min)", "tokens/s", "prefill (s)",
                  "cache MiB (measured)", "cache MiB (analytic)", "MFLOP/step (analytic)", "prefill peak MiB",
                  "status"]
        rows = [[str(r["context"]), _fmt(r["latency_s"] * 1e3 if "latency_s" in r else None, ".3f"),
                 _fmt(r["latency_min_s"] * 1e3 if "latency_min_s" in r else None, ".3f"),
                 _fmt(r.get("tokens_per_s"), ",.1f"), _fmt(r.get("prefill_s")), _mib(r.get("cache_bytes")),
                 _mib(r.get("state_bytes")),
                 _fmt(r["decode_flops_per_token"] / 1e6 if r.get("decode_flops_per_token") else None, ".4g"),
                 _mib(r.get("peak_bytes")), r["status"]] for r in result["rows"]]
        notes.append(_fit_line("per-token latency (median)", result["fit"]["latency"], "L"))
        notes.append(_fit_line("per-token latency (min)", result["fit"]["latency_min"], "L"))
        notes.append(_fit_line("cache bytes", result["fit"]["cache_bytes"], "L"))
        if result.get("growth") is not None:
            notes.append(f"latency at the longest context / at the shortest: {result['growth']:.2f}x (median), "
                         f"{result['growth_min']:.2f}x (min)")
    elif result["probe"] == "loss_vs_length":
        header = ["length", "x train", "loss", "ppl", "loss ≤ train len", "loss > train len", "status"]
        rows = [[str(r["seq_len"]), f"{r['multiplier']:g}", _fmt(r.get("loss"), ".4f"), _fmt(r.get("ppl"), ".3f"),
                 _fmt(r.get("loss_within_train_len"), ".4f"), _fmt(r.get("loss_beyond_train_len"), ".4f"),
                 r["status"]] for r in result["rows"]]
        for r in result["rows"]:
            if r["status"] == "ok":
                notes.append(f"loss by position at {r['seq_len']}: " + ", ".join(
                    f"[{b['start']},{b['end']}) {_fmt(b['loss'], '.3f')}" for b in r["by_position"]))
    else:
        header = ["slice", "length", "x train", "accuracy", "exact match", "status"]
        rows = [[r["slice"], str(r["seq_len"]), f"{r['multiplier']:g}", _fmt(r.get("accuracy"), ".3f"),
                 _fmt(r.get("exact_match"), ".3f"), r["status"]] for r in result["rows"]]
        notes.append("accuracy by length: " + ", ".join(
            f"{b['seq_len']}: {_fmt(b.get('accuracy'), '.3f') if b['status'] == 'ok' else b['status']}"
            for b in result["by_seq_len"]))
    return header, rows, notes


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _plan(args: argparse.Namespace) -> dict[str, Any]:
    """Validate every input and say what to run; raises before any measurement starts."""
    what = args.measure_command
    if what is None:
        raise UsageError("say what to measure: mixerlab measure memory|speed|decode|context (see --help)")
    _positive(args, "batch", "threads", "timeout", "repeats", "steps", "budget_gb", "bins", "tokens", "examples",
              "d_model")
    device = _device(args.device)
    if what == "context":
        if not (Path(args.run) / "spec.json").is_file():
            raise UsageError(f"--run {args.run}: not a run directory (no spec.json)")
        if not (Path(args.run) / "checkpoint.pt").is_file():
            raise UsageError(f"--run {args.run}: no checkpoint.pt (the run saved no evaluation yet)")
        return {"kwargs": {"run": str(args.run), "multipliers": numbers(args.multipliers, "--multipliers", float),
                           "bins": args.bins, "tokens": args.tokens, "examples": args.examples,
                           "batch": args.batch, "device": device}}
    lengths = numbers(args.lengths, "--lengths")
    target = resolve_target(mixer=args.mixer, options=_pairs(args.option, "--option"), d_model=args.d_model,
                            preset=args.preset, spec=args.spec, run=args.run, overrides=_pairs(args.set, "--set"))
    isolation = Isolation(threads=args.threads, timeout=args.timeout, device=device, dtype=args.dtype)
    return {"target": target, "lengths": lengths, "isolation": isolation}


def run_cli(args: argparse.Namespace) -> int:
    """Run ``mixerlab measure WHAT`` from parsed arguments; write ``results.json`` and ``results.md`` to
    ``--out``; print a short table. Returns 0, 1 when nothing could be measured, 2 on bad input."""
    what = getattr(args, "measure_command", None)
    plan = _plan(args)
    if args.check:
        subject = plan["target"]["label"] if "target" in plan else plan["kwargs"]["run"]
        print(f"valid: {what} of {subject}" + (f" at {plan['lengths']}" if "lengths" in plan else "")
              + "; nothing was measured or written")
        return 0
    command = _command_line(args)
    started = time.time()

    def show(row: dict[str, Any]) -> None:
        key = "seq_len" if "seq_len" in row else "context"
        extra = ""
        if row.get("status") == "ok":
            if "latency_s" in row:
                extra = f"{row['latency_s'] * 1e3:.3f} ms/token, cache {_mib(row['cache_bytes'])} MiB"
            else:
                extra = f"{row['time_s']:.4f} s, peak {_mib(row['peak_bytes'])} MiB"
        print(f"  {key}={row[key]}: {extra or row.get('status')}", file=sys.stderr, flush=True)

    if what in ("memory", "speed"):
        print(f"measuring {plan['target']['label']} at T = {plan['lengths']} ({args.mode}, batch {args.batch}) ...",
              file=sys.stderr, flush=True)
        budget = args.budget_gb * 2**30 if getattr(args, "budget_gb", None) else None
        result = scaling_probe(plan["target"], plan["lengths"], mode=args.mode, batch=args.batch,
                               repeats=args.repeats, budget_bytes=budget, isolation=plan["isolation"], on_row=show)
        ok = any(r["status"] == "ok" for r in result["rows"])
    elif what == "decode":
        print(f"decoding {plan['target']['label']} after contexts {plan['lengths']} ({args.steps} steps, "
              f"batch {args.batch}) ...", file=sys.stderr, flush=True)
        result = decode_probe(plan["target"], plan["lengths"], steps=args.steps, batch=args.batch,
                              isolation=plan["isolation"], on_row=show)
        ok = any(r["status"] == "ok" for r in result["rows"])
    else:
        print(f"evaluating {args.run} vs length ...", file=sys.stderr, flush=True)
        try:
            result = run_isolated("experiments.probes:context_probe", plan["kwargs"],
                                  Isolation(threads=args.threads, timeout=args.timeout))
        except MeasureError as exc:
            print(f"mixerlab measure context: error: {exc}", file=sys.stderr)
            return 1
        ok = any(r["status"] == "ok" for r in result["rows"])

    out = args.out or Path("runs") / "measure" / f"{what}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": machine_info(), "what": what, "wall_s": time.time() - started, "result": result}
    (out / "results.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    header, rows, notes = _render(what, result)
    title = {"memory": "Peak memory and time vs length", "speed": "Time and throughput vs length",
             "decode": "Decoding latency and cache vs context", "context": "Long-context quality vs length"}[what]
    subject = result.get("target", {}).get("label") or result.get("run")
    m = record["machine"]
    setup = ""
    if what in ("memory", "speed"):
        setup = f"mode {result['mode']}, batch {result['batch']}, {result['dtype']}, {result['device']}. "
    elif what == "decode":
        setup = f"{result['steps']} timed steps, batch {result['batch']}, {result['dtype']}, {result['device']}. "
    md = [f"# {title}: {subject}", "", f"Command: `{command}` — {record['date']}, {m['cpu']}, "
          f"{m['cpu_count']} CPUs, torch {m['torch']}" + (f", {m['cuda_device']}" if "cuda_device" in m else "")
          + ".", "", setup + "Memory is the peak above a post-warm-up baseline, each length in a fresh process; "
          "analytic columns come from the mixers' cost formulas.", "", _md_table(header, rows), ""]
    md += [f"- {n}" for n in notes]
    (out / "results.md").write_text("\n".join(md) + "\n")
    print(f"{title}: {subject}")
    print(table(rows, header))
    for n in notes:
        print(n)
    print(f"results: {out / 'results.json'}, {out / 'results.md'}")
    return 0 if ok else 1


@command("measure", "measure memory, speed, long-context behaviour and decoding of a mixer or model, each case "
                    "in a fresh process")(configure_parser)
def _run_measure(args: argparse.Namespace) -> int:
    return run_cli(args)
