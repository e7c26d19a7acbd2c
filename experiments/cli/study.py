"""``mixerlab study run | worker | status | report | list`` and ``mixerlab reproduce``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.cli.base import command


def _study_args(p: argparse.ArgumentParser, *, storage_required: bool = False) -> None:
    p.add_argument("recipe", help="a recipe name (see `mixerlab study list`) or a path to a recipe .toml")
    p.add_argument("--scale", default="cpu", choices=("smoke", "cpu", "gpu"),
                   help="smoke: seconds, for tests; cpu: a 2-core laptop in minutes; gpu: one GPU (default cpu)")
    p.add_argument("--out", help="run directory (default runs/<recipe>-<scale>); rerunning into it resumes")
    p.add_argument("--storage", required=storage_required,
                   help="Optuna storage URL; default a SQLite file in the run directory. For many machines: "
                        "postgresql://user:password@host/db")


def _runner_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--check", action="store_true",
                   help="validate the recipe (every grid cell or range corner built into a model) and stop: "
                        "nothing runs or is written")
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
    if args.check:
        from experiments.study import Recipe

        recipe = Recipe.load(args.recipe, args.scale)
        size = f"{len(recipe.grid_cells())} grid cells" if recipe.grid else f"up to {recipe.trials} trials"
        print(f"valid: {recipe.study_name}, {size}; nothing was run or written")
        return 0
    runner = _runner(args)
    if create:
        from experiments.study.estimate import estimate, finished_cells

        done = finished_cells(runner.recipe, runner.storage_url)
        print(estimate(runner.recipe, runner.out, runner.jobs, done).describe(runner.recipe.study_name), flush=True)
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
