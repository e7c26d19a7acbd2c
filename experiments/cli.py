"""The `mixerlab` command. Thin: parses options and calls into `experiments` and `archs`."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from collections.abc import Callable, Sequence

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
    "psycopg2": "PostgreSQL storage for multi-machine studies (extra: dev)",
    "mambapy": "peer in benchmarks (extra: bench)",
    "transformers": "peer in benchmarks (extra: bench)",
}


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
    rows = [[mod, "installed" if importlib.util.find_spec(mod) else "missing", why] for mod, why in OPTIONAL.items()]
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
            rows += [[f"  accuracy by {attr}", ", ".join(f"{k}: {v:.3f}" for k, v in by.items())]]
    rows += [["tokens/s (train)", f"{summary['tokens_per_s']:,.0f}"], ["wall time", f"{summary['wall_seconds']:.1f} s"],
             ["backends", ", ".join(sorted({str(b) for b in summary["backends"].values()}))], ["out", out]]
    print(_table(rows, ["", "value"]))
    return 0 if summary["status"] in ("completed", "stopped") else 1


# main -------------------------------------------------------------------------------------------------------
def _load_command_modules() -> None:
    """Commands defined in other modules register themselves on import."""
    for mod in ("experiments.commands",):
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)


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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
