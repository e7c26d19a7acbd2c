"""The `mixerlab` command. Thin: parses options and calls into `experiments` and `archs`."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["main"]

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str):
    """Register ``configure(parser)`` and ``run(args)`` for a subcommand."""

    def wrap(configure):
        def bind(run):
            COMMANDS[name] = (help, configure, run)
            return run

        return bind

    return wrap


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


# list -------------------------------------------------------------------------------------------------------
def _configure_list(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default="*", help="shell wildcard over mixer names (default: all)")
    p.add_argument("--options", action="store_true", help="also print each mixer's options and defaults")


@command("list", "list the registered mixers (built-in and plugins) and their backends on this machine")(
    _configure_list)
def _run_list(args: argparse.Namespace) -> int:
    from registry import MIXERS

    rows = []
    for entry in MIXERS.entries(args.pattern):
        backends = MIXERS.backends(entry.name)
        live = ", ".join(b for b, ok in backends.items() if ok == "yes")
        off = "; ".join(f"{b}: {why}" for b, why in backends.items() if why != "yes")
        rows.append([entry.name, entry.description, live, off or "-", entry.source])
    if not rows:
        print(f"no mixer matches {args.pattern!r}; known: {', '.join(MIXERS.names())}")
        return 1
    print(_table([r[:3] for r in rows], ["mixer", "description", "backends available here"]))
    print()
    for name, _desc, _live, off, source in rows:
        print(f"{name}: from {source}" + (f"; unavailable here: {off}" if off != "-" else ""))
        if args.options:
            print("    options: " + ", ".join(str(o) for o in MIXERS.options(name)))
    return 0


# doctor -----------------------------------------------------------------------------------------------------
OPTIONAL = {
    "mamba_ssm": "CUDA kernels for mamba / mamba2 (extra: cuda)",
    "causal_conv1d": "CUDA causal conv for mamba (extra: cuda)",
    "xformers": "memory-efficient attention kernels (extra: cuda)",
    "datasets": "Hugging Face corpora (extra: hf)",
    "psycopg": "PostgreSQL storage for multi-machine studies (extra: postgres)",
    "mambapy": "peer in benchmarks (extra: bench)",
    "transformers": "peer in benchmarks (extra: bench)",
}


def _import_status(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "missing"
    try:
        importlib.import_module(module)
    except Exception as exc:  # installed but broken (e.g. mamba_ssm without its CUDA extension)
        return f"installed, does not import ({type(exc).__name__}: {str(exc).splitlines()[0][:60]})"
    return "ok"


@command("doctor", "say what this machine can run: torch, devices, optional packages, live backends")(
    lambda p: None)
def _run_doctor(args: argparse.Namespace) -> int:
    import platform

    import torch

    from registry import MIXERS

    print(f"python {platform.python_version()}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    cuda = torch.cuda.is_available()
    print("cuda: " + (f"yes ({torch.cuda.get_device_name()})" if cuda else "no — pure-PyTorch paths only"))
    print()
    rows = [[mod, _import_status(mod), why] for mod, why in OPTIONAL.items()]
    print(_table(rows, ["package", "status", "used for"]))
    print()
    rows = []
    for name in MIXERS.names():
        for backend, ok in MIXERS.backends(name).items():
            rows.append([name, backend, ok])
    print(_table(rows, ["mixer", "backend", "live?"]))
    return 0


# train ------------------------------------------------------------------------------------------------------
def _configure_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override any field: model.d_model=256 train.lr=1e-3 data.options.num_kv_pairs=8")
    p.add_argument("--config", type=str, help="TOML file with [model], [train] and [data] tables")
    p.add_argument("--preset", help="a named model (classic-transformer, transformer, mamba, mamba2, jamba, "
                                    "nvidia-hybrid, hybrid)")
    p.add_argument("--mixer", help="every layer's mixer (a registered name or package.module:Class)")
    p.add_argument("--pattern", help="hybrid pattern tiled over the layers, e.g. MMMA")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--corpus", help="train on a corpus: stdlib (default), textfile, hf")
    data.add_argument("--task", help="train on a synthetic task: mqar, selective_copy, induction, passkey")
    p.add_argument("--steps", type=int, help="optimiser steps (= train.steps=N)")
    p.add_argument("--out", default=None, help="run directory (default runs/train-<model>-<data>); rerunning "
                                               "into the same directory resumes from its checkpoint")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@command("train", "train one model on a corpus or task; writes metrics.jsonl, checkpoint.pt, summary.json")(
    _configure_train)
def _run_train(args: argparse.Namespace) -> int:
    from experiments.config import apply_overrides, build_specs, load_toml
    from experiments.train import train

    config = load_toml(args.config) if args.config else {}
    config.setdefault("model", {})
    config.setdefault("data", {})
    if args.preset:
        config["model"]["preset"] = args.preset
    if args.mixer:
        config["model"]["mixer"] = args.mixer
    if args.pattern:
        config["model"]["pattern"] = args.pattern
    if args.corpus:
        config["data"] = {"corpus": args.corpus, **{k: v for k, v in config["data"].items() if k == "options"}}
    if args.task:
        config["data"] = {"task": args.task, **{k: v for k, v in config["data"].items() if k == "options"}}
    if args.steps:
        config.setdefault("train", {})["steps"] = args.steps
    model, train_spec, data = build_specs(apply_overrides(config, args.overrides))
    label = data.task or data.corpus
    out = args.out or f"runs/train-{args.preset or model.layer_pattern.lower()}-{label}"
    summary = train(model, train_spec, data, out, progress=not args.no_progress, threads=args.threads)
    final = summary["final"]
    rows = [["status", summary["status"]], ["steps", f"{summary['steps']}/{summary['total_steps']}"],
            ["params", f"{summary['params']:,}"], ["layers", model.layer_pattern]]
    if "val_bpb" in final:
        rows += [["val loss (nats/token)", f"{final['val_loss']:.4f}"],
                 ["val bits per byte", f"{final['val_bpb']:.4f}"],
                 ["unigram baseline (bits per byte)", f"{summary['dataset']['unigram_bpb']:.4f}"]]
    if "accuracy" in final:
        rows += [["test accuracy", f"{final['accuracy']:.4f}"]]
        for attr, by in final.get("by", {}).items():
            rows += [[f"  accuracy by {attr}", ", ".join(f"{k}: " + ("n/a" if v is None else f"{v:.3f}")
                                                         for k, v in by.items())]]
        if final.get("not_applicable"):
            rows += [["  n/a", final["not_applicable"]]]
    rows += [["tokens/s (train)", f"{summary['tokens_per_s']:,.0f}"], ["wall time", f"{summary['wall_seconds']:.1f} s"],
             ["backends", ", ".join(sorted({str(b) for b in summary["backends"].values()}))], ["out", out]]
    print(_table(rows, ["", "value"]))
    return 0 if summary["status"] in ("completed", "stopped") else 1


# generate ---------------------------------------------------------------------------------------------------
def _configure_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a training run directory (spec.json + checkpoint.pt)")
    p.add_argument("--prompt", default="def ", help="text to continue (byte-level corpus runs)")
    p.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens")
    p.add_argument("--seed", type=int, default=0)


@command("generate", "continue a prompt with a trained corpus model, decoding with the layers' caches")(
    _configure_generate)
def _run_generate(args: argparse.Namespace) -> int:
    import torch

    from experiments.data import BYTE_TOKENIZER
    from experiments.probes import load_run

    model, specs = load_run(args.run)
    if specs["data"].get("task"):
        print(f"mixerlab generate: error: {args.run} was trained on task {specs['data']['task']!r}, not text",
              file=sys.stderr)
        return 2
    ids = torch.tensor([list(BYTE_TOKENIZER.encode(args.prompt))], dtype=torch.long)
    out = model.generate(ids, args.tokens, temperature=args.temperature, top_k=args.top_k,
                         generator=torch.Generator().manual_seed(args.seed))
    print(BYTE_TOKENIZER.decode(out[0].tolist(), skip_specials=True))
    return 0


# measure ----------------------------------------------------------------------------------------------------
def _configure_measure(p: argparse.ArgumentParser) -> None:
    from experiments.measure import configure_parser

    configure_parser(p)


@command("measure", "measure memory, speed, long-context behaviour and decoding of a mixer or model, each case "
                    "in a fresh process")(_configure_measure)
def _run_measure(args: argparse.Namespace) -> int:
    from experiments.measure import run_cli

    return run_cli(args)


# study / reproduce ------------------------------------------------------------------------------------------
def _study_args(p: argparse.ArgumentParser, *, storage_required: bool = False) -> None:
    p.add_argument("recipe", help="a recipe name (see `mixerlab study list`) or a path to a recipe .toml")
    p.add_argument("--scale", default="cpu", choices=("smoke", "cpu", "gpu"),
                   help="smoke: seconds, for tests; cpu: a 2-core laptop in minutes; gpu: one GPU (default cpu)")
    p.add_argument("--out", help="run directory (default runs/<recipe>-<scale>); rerunning into it resumes")
    p.add_argument("--storage", required=storage_required,
                   help="Optuna storage URL; default a SQLite file in the run directory. For many machines: "
                        "postgresql://user:password@host/db")


def _runner_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", type=int, default=None,
                   help="trial subprocesses to run in parallel on this machine (default: the recipe's trial.jobs, "
                        "else 1)")
    p.add_argument("--heartbeat", type=int, default=60,
                   help="seconds between heartbeats of running trials (a dead worker's trial is failed and "
                        "retried after 3x this); keep >= 60 in production")
    p.add_argument("--retry-failed", action="store_true",
                   help="run once more every trial that failed for a reason of its own (e.g. after fixing its "
                        "cause); a retry resumes from the failed trial's last checkpoint when its config is "
                        "unchanged, and the failed trial stays in the study as it was")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _out_dir(args: argparse.Namespace, recipe) -> str:
    return args.out or f"runs/{recipe.name}-{recipe.scale}"


def _runner(args: argparse.Namespace):
    from experiments.study import Recipe, StudyRunner

    recipe = Recipe.load(args.recipe, args.scale)
    return StudyRunner(recipe, _out_dir(args, recipe), storage=args.storage, jobs=getattr(args, "jobs", None),
                       heartbeat=(getattr(args, "heartbeat", 60), 3 * getattr(args, "heartbeat", 60)),
                       progress=not getattr(args, "no_progress", True),
                       retry_failed=getattr(args, "retry_failed", False))


def _report(runner) -> dict:
    from experiments.report import write_report

    paths = write_report(runner.study, runner.out, recipe_info=runner.recipe.to_dict())
    return paths


def _run_and_report(args: argparse.Namespace, create: bool = True) -> int:
    runner = _runner(args)
    try:
        counts = runner.run(create=create)
    except KeyboardInterrupt:
        print(f"stopped. Rerun the same command to resume the study in {runner.out}.", file=sys.stderr)
        return 130
    print(f"{runner.recipe.study_name}: {counts['complete']} complete, {counts['pruned']} pruned, "
          f"{counts['failed']} failed" + (f", {counts['interrupted']} interrupted" if counts["interrupted"] else ""))
    if create:
        paths = _report(runner)
        table = paths.get("table.md") if isinstance(paths, dict) else None
        if table:
            print(Path(table).read_text())
        print(f"report written to {runner.out}")
    return 0


def _configure_study(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="study_command", metavar="ACTION", required=True)
    run = sub.add_parser("run", help="create or resume a study and run its trials here, then report",
                         description="Create or resume the recipe's study and run trials until its budget is met; "
                                     "then write table.md, table.csv and figures. Ctrl-C stops cleanly; rerunning "
                                     "resumes without losing or repeating a finished trial.")
    _study_args(run)
    _runner_args(run)
    worker = sub.add_parser("worker", help="join a study in shared storage (PostgreSQL) and run trials",
                            description="Join an existing study (created by `study run` with the same --storage) "
                                        "and run its trials; start one per machine.")
    _study_args(worker, storage_required=True)
    _runner_args(worker)
    status = sub.add_parser("status", help="trials done/running/failed/pruned and the best so far")
    _study_args(status)
    report = sub.add_parser("report", help="write table.md, table.csv and figures from a study")
    _study_args(report)
    sub.add_parser("list", help="list the bundled recipes")


@command("study", "run, join, inspect and report Optuna studies that compare mixers")(_configure_study)
def _run_study(args: argparse.Namespace) -> int:
    from experiments.study import Recipe, recipe_names

    if args.study_command == "list":
        for name in recipe_names():
            print(f"{name:24s} {Recipe.load(name, 'cpu').description}")
        return 0
    if args.study_command == "run":
        return _run_and_report(args)
    if args.study_command == "worker":
        return _run_and_report(args, create=False)
    runner = _runner(args)
    runner.open(create=False, wait_s=0)
    if args.study_command == "status":
        from experiments.report import status_text

        print(status_text(runner.study))
        return 0
    paths = _report(runner)
    print("\n".join(str(p) for p in (paths.values() if isinstance(paths, dict) else paths)))
    return 0


def _configure_reproduce(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="quickstart, depth-width, mqar, selective-copy, induction-extrapolation, "
                                  "long-context (or a .toml path)")
    p.add_argument("--scale", default="cpu", choices=("smoke", "cpu", "gpu"),
                   help="smoke: seconds; cpu: a 2-core laptop (the README's tables); gpu: one GPU")
    p.add_argument("--out", help="run directory (default runs/<recipe>-<scale>); rerunning resumes")
    p.add_argument("--storage", help="Optuna storage URL (default: SQLite in the run directory)")
    _runner_args(p)


@command("reproduce", "run a named recipe end to end: its study, then table.md, table.csv and figures")(
    _configure_reproduce)
def _run_reproduce(args: argparse.Namespace) -> int:
    return _run_and_report(args)


# main -------------------------------------------------------------------------------------------------------
def _load_command_modules() -> None:
    """Commands defined in other modules register themselves on import."""
    for mod in ("experiments.commands",):
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)


USER_ERRORS = {"RecipeError", "ConfigError", "SpecError", "RunError", "RegistryError", "DataError",
               "CorpusNotFoundError", "EmptyCorpusError", "UndecodableTextError", "SplitTooSmallError",
               "MissingDependencyError", "TaskError", "PatternError", "MeasureError"}


def build_parser() -> argparse.ArgumentParser:
    _load_command_modules()
    parser = argparse.ArgumentParser(
        prog="mixerlab",
        description="Design and compare sequence mixers: attention, memory-efficient attention, "
                    "Mamba-style SSMs and hybrids.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log which backend each mixer runs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, configure, _run) in COMMANDS.items():
        configure(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command][2](args) or 0
    except (ValueError, KeyError) as exc:  # our errors name the problem and the fix: no traceback
        if type(exc).__name__ not in USER_ERRORS:
            raise
        print(f"mixerlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
