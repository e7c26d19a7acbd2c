"""``mixerlab list`` and ``mixerlab doctor``: the registered mixers, and what this machine can run."""

from __future__ import annotations

import argparse
import importlib
import importlib.util

from experiments.cli.base import WIDTH, command, table, wrap


def _configure_list(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default="*", help="shell wildcard over mixer names (default: all)")
    p.add_argument("--options", action="store_true", help="also print each mixer's options and defaults")
    p.add_argument("--wide", action="store_true", help=f"do not cut lines to {WIDTH} columns")


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
    width = None if args.wide else WIDTH
    print(table([r[:3] for r in rows], ["mixer", "description", "backends available here"], width))
    print()
    for name, _desc, _live, off, source in rows:
        print(wrap(f"{name}: from {source}" + (f"; unavailable here: {off}" if off != "-" else ""), width))
        if args.options:
            print(wrap("    options: " + ", ".join(str(o) for o in MIXERS.options(name)), width, " " * 13))
    return 0


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


def _configure_doctor(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wide", action="store_true", help=f"do not cut lines to {WIDTH} columns")


@command("doctor", "say what this machine can run: torch, devices, optional packages, live backends")(
    _configure_doctor)
def _run_doctor(args: argparse.Namespace) -> int:
    import platform

    import torch

    from registry import MIXERS

    print(f"python {platform.python_version()}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    cuda = torch.cuda.is_available()
    print("cuda: " + (f"yes ({torch.cuda.get_device_name()})" if cuda else "no — pure-PyTorch paths only"))
    print()
    width = None if args.wide else WIDTH
    rows = [[mod, _import_status(mod), why] for mod, why in OPTIONAL.items()]
    print(table(rows, ["package", "status", "used for"], width))
    print()
    rows = []
    for name in MIXERS.names():
        for backend, ok in MIXERS.backends(name).items():
            rows.append([name, backend, ok])
    print(table(rows, ["mixer", "backend", "live?"], width))
    return 0
