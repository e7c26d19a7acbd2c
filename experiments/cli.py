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
