"""``mixerlab check MIXER [KEY=VALUE ...]``: a mixer's report card — its contract (one line per check, exit 1
if any fails), its costs beside attention and mamba, and a short quality probe.

    mixerlab check my_pkg.mixer:MyMixer --contract-only            # a plugin's CI: exit 1 on a broken contract
    mixerlab check gla expand_k=0.5 --d-model 64 --out runs/check/gla   # the full card: check.md, figures
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from experiments.check.plan import BASELINES, PROBE_TASKS, CheckPlan, Parts, make_plan, safe_name
from experiments.cli.base import command, numbers, table
from experiments.errors import UsageError

__all__ = ["run_check"]


def _configure(p: argparse.ArgumentParser) -> None:
    p.description = ("A report card for one mixer: the mixer contract (shape, causality, finite fp32/bf16 "
                     "gradients, batch independence, determinism, decoding equal to the forward, state bytes, "
                     "FLOPs), then its costs (time and memory vs T, decoding vs context) beside "
                     f"{' and '.join(BASELINES)} at the same width, then a short quality probe "
                     f"({', '.join(PROBE_TASKS)}) of 2-layer models of each. Exits 1 if the contract fails.")
    p.add_argument("mixer", metavar="MIXER", help="a registered mixer (see `mixerlab list`) or package.module:Class")
    p.add_argument("options", nargs="*", metavar="KEY=VALUE",
                   help="the mixer's options, validated like everywhere else, e.g. expand_k=0.5 use_short_conv=true")
    p.add_argument("--d-model", type=int, default=64, help="width of every model the check builds (default 64)")
    p.add_argument("--contract-only", action="store_true",
                   help="the contract alone (seconds): for a plugin's CI; writes files only with --out")
    p.add_argument("--out", type=Path, default=None,
                   help="report card directory (default runs/check/<mixer>-<date-time>); rerunning the same "
                        "check into it resumes: finished measurements and probe runs are reused")
    g = p.add_argument_group("costs")
    g.add_argument("--lengths", default="512,1024,2048,4096,8192", help="T of the time/memory curves (batch 1)")
    g.add_argument("--modes", default="fwd,fwdbwd", help="fwd, fwdbwd and/or train (a whole AdamW step)")
    g.add_argument("--contexts", default="256,1024,4096", help="context lengths decoding starts after")
    g.add_argument("--decode-steps", type=int, default=32, help="one-token steps timed after each prefill")
    g.add_argument("--budget-gb", type=float, default=4.0, help="memory budget of the largest-T estimate (GiB)")
    g.add_argument("--repeats", type=int, default=3, help="timed repeats per length (median)")
    g.add_argument("--threads", type=int, default=None, help="torch threads in each cost measurement")
    g = p.add_argument_group("quality probe")
    g.add_argument("--tasks", default=",".join(PROBE_TASKS), help=f"probe tasks ({', '.join(PROBE_TASKS)})")
    g.add_argument("--probe-steps", type=int, default=500, help="training steps per probe run at most (default 500)")
    g.add_argument("--probe-lr", type=float, default=1e-2, help="learning rate of every probe run (default 1e-2)")
    g.add_argument("--probe-batch", type=int, default=32, help="sequences per step (default 32)")
    g.add_argument("--jobs", type=int, default=2, help="probe runs at a time, one thread each (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the contract's inputs and of the probe runs")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per measurement or probe run")


def _plan(args: argparse.Namespace) -> CheckPlan:
    from experiments.config import parse_value

    options = {}
    for item in args.options:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"option {item!r}: expected KEY=VALUE, e.g. `mixerlab check {args.mixer} d_state=16`")
        options[key.strip()] = parse_value(value.strip())
    modes = tuple(m for m in args.modes.replace(",", " ").split())
    bad = [m for m in modes if m not in ("fwd", "fwdbwd", "train")]
    if bad or not modes:
        raise UsageError(f"--modes {args.modes!r}: give fwd, fwdbwd and/or train, e.g. --modes fwd,fwdbwd")
    return make_plan(
        args.mixer, options, out=args.out if args.out is not None else None, d_model=args.d_model,
        contract_only=args.contract_only, lengths=tuple(numbers(args.lengths, "--lengths")), modes=modes,
        contexts=tuple(numbers(args.contexts, "--contexts")), decode_steps=args.decode_steps, budget_gb=args.budget_gb,
        repeats=args.repeats, threads=args.threads, tasks=tuple(args.tasks.replace(",", " ").split()),
        probe_steps=args.probe_steps, probe_lr=args.probe_lr, probe_batch=args.probe_batch, jobs=args.jobs,
        seed=args.seed, timeout=args.timeout)


def _command_line(plan: CheckPlan, out: Path | None) -> str:
    default = CheckPlan(mixer=plan.mixer)
    parts = ["mixerlab", "check", plan.mixer, *(f"{k}={v}" for k, v in plan.options.items())]
    for name in ("d_model", "lengths", "modes", "contexts", "decode_steps", "budget_gb", "repeats", "threads",
                 "tasks", "probe_steps", "probe_lr", "probe_batch", "jobs", "seed", "timeout"):
        value = getattr(plan, name)
        if value != getattr(default, name):
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            parts += [f"--{name.replace('_', '-')}", text]
    if plan.contract_only:
        parts.append("--contract-only")
    if out is not None:
        parts += ["--out", str(out)]
    return shlex.join(parts)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_check(args: argparse.Namespace) -> int:
    """Run ``mixerlab check`` from parsed arguments. Returns 0, 1 when a contract check fails, 2 on bad input."""
    from archs.contract import check_mixer
    from experiments.runs import machine_info

    plan = _plan(args)  # everything validated: nothing has run or been written before this returns
    out = args.out
    if out is None and not plan.contract_only:
        out = Path("runs") / "check" / f"{safe_name(plan.label)}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    card: dict[str, Any] = {
        "mixer": plan.mixer, "label": plan.label, "subjects": [s[0] for s in plan.subjects],
        "settings": {**plan.settings(), "contract_only": plan.contract_only}, "command": _command_line(plan, out),
        "date": datetime.datetime.now().isoformat("T", "seconds"), "machine": machine_info(), "status": "running",
        "contract": [], "costs": None, "probe": None}
    parts = Parts(out) if out is not None else None
    started = time.time()
    print(f"mixerlab check {plan.label} (d_model {plan.d_model})")
    try:
        return _stages(plan, card, parts, check_mixer, started)
    except KeyboardInterrupt:
        if parts is not None:
            card["status"] = "interrupted"
            _write(parts, card)
            _say(f"interrupted: what finished is kept in {parts.out}; run the same command with --out {parts.out} "
                 "to resume")
        raise


def _write(parts: Parts | None, card: dict[str, Any]) -> None:
    from experiments.check.card import write_card

    if parts is not None:
        parts.out.mkdir(parents=True, exist_ok=True)
        write_card(parts.out, card)


def _stages(plan: CheckPlan, card: dict[str, Any], parts: Parts | None, check_mixer: Any, started: float) -> int:
    results = check_mixer(plan.mixer, plan.options, d_model=plan.d_model, seed=plan.seed)
    card["contract"] = [{"name": c.name, "passed": c.passed, "figure": c.figure, "where": c.where} for c in results]
    print("contract:")
    for c in results:
        print("  " + c.line())
    failed = [c.name for c in results if not c.passed]
    if failed:
        card["status"] = f"contract failed: {', '.join(failed)}"
        _write(parts, card)
        print(f"contract: {len(failed)} of {len(results)} checks FAIL ({', '.join(failed)})"
              + ("; costs and the quality probe were not run" if not plan.contract_only else ""))
        _where(parts)
        return 1
    print(f"contract: all {len(results)} checks pass")
    if plan.contract_only or parts is None:
        card["status"] = "complete"
        _write(parts, card)
        _where(parts)
        return 0
    _write(parts, card)
    from experiments.check.costs import measure_costs, summarise_costs
    from experiments.check.quality import quality_probe

    card["costs"] = measure_costs(plan, parts, _say)
    _write(parts, card)
    _print_costs(plan, summarise_costs(card["costs"]))
    card["probe"] = quality_probe(plan, parts, _say)
    card["status"] = "complete"
    card["wall_s"] = time.time() - started
    _write(parts, card)
    _print_probe(card["probe"])
    _where(parts)
    return 0


def _where(parts: Parts | None) -> None:
    if parts is not None:
        print(f"report card: {parts.out / 'check.md'} (and check.json, figures)")


def _print_costs(plan: CheckPlan, summary: list[dict[str, Any]]) -> None:
    header = ["model"]
    for mode in plan.modes:
        header += [f"{mode} ms", f"{mode} MiB", "time/mem ∝ T^k"]
    header += ["decode ms/token", "cache bytes"]
    rows = []
    for r in summary:
        row = [r["subject"]]
        for mode in plan.modes:
            m = r.get(mode, {})
            k = [f"{v:.2f}" if v is not None else "-" for v in (m.get("time_exponent"), m.get("memory_exponent"))]
            row += [f"{m['time_s'] * 1e3:.3g}" if m.get("time_s") else "-",
                    f"{m['peak_bytes'] / 2**20:.3g}" if m.get("peak_bytes") else "-", "/".join(k)]
        d = r.get("decode") or {}
        row += [f"{d['ms_per_token']:.3f}" if d.get("ms_per_token") else "-",
                f"{d['cache_bytes']:,}" if d.get("cache_bytes") is not None else "-"]
        rows.append(row)
    t = {mode: next((r[mode]["seq_len"] for r in summary if mode in r), None) for mode in plan.modes}
    print(f"costs (batch 1, times and peaks at T = {', '.join(f'{m} {v}' for m, v in t.items())}; decoding after "
          f"{max(plan.contexts)} tokens):")
    print(table(rows, header))


def _print_probe(probe: dict[str, dict[str, Any]]) -> None:
    rows = [[task, label, "-" if r.get("accuracy") is None else f"{r['accuracy']:.3f}",
             str(r.get("target_reached_step") or "-"), r["status"]]
            for task, by in probe.items() for label, r in by.items()]
    print("quality probe (test accuracy):")
    print(table(rows, ["task", "model", "accuracy", "step reaching 0.99", "status"]))


@command("check", "a report card for one mixer: its contract, its costs beside attention and mamba, and a "
                  "short quality probe")(_configure)
def _run_check(args: argparse.Namespace) -> int:
    return run_check(args)
