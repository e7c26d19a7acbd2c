"""The `mixerlab` command. Thin: parses options and calls into `experiments` and `archs`.

Each subcommand lives in a module of its own and registers itself with ``@command`` (`base`). `main`
prints any `MixerlabError` — a problem the user can fix, named with its fix — as one line and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from experiments.cli import check, hf, info, measure, run, study  # noqa: F401 — each registers its commands
from experiments.cli.base import COMMANDS
from registry import MixerlabError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixerlab",
        description="Design and compare sequence mixers: attention, memory-efficient attention, "
                    "Mamba-style SSMs and hybrids.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log which backend each mixer runs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    first = ("list", "doctor", "check", "train", "generate", "measure", "study", "reproduce", "export", "import-hf")
    for name in sorted(COMMANDS, key=lambda n: (first.index(n) if n in first else len(first), n)):
        help_text, configure, _run = COMMANDS[name]
        configure(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if os.getcwd() not in sys.path:  # import paths (pkg.mod:Class) resolve as under `python -m`: installed
        sys.path.append(os.getcwd())  # packages first, then the current directory
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the command line as given (`train --nproc` hands it to its ranks)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if not args.command:
        parser.print_help()
        return 2
    rank = os.environ.get("RANK") if os.environ.get("WORLD_SIZE", "1") != "1" else None  # under torchrun
    try:
        return COMMANDS[args.command][2](args) or 0
    except MixerlabError as exc:  # names the problem and the fix: no traceback
        _record_for_torchrun(exc)
        print(f"mixerlab {args.command}: error: " + (f"rank {rank}: " if rank else "") + str(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        _record_for_torchrun(exc)
        raise


def _record_for_torchrun(exc: BaseException) -> None:
    """Under torchrun, leave the exception in the rank's error file, so that the agent's report names it."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(exc)
