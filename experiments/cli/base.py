"""The command registry: ``@command(name, help)(configure)`` over ``run(args) -> exit code``."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["COMMANDS", "command", "table"]

Configure = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[str, Configure, Run]] = {}


def command(name: str, help: str) -> Callable[[Configure], Callable[[Run], Run]]:
    """Register ``configure(parser)`` and ``run(args)`` for a subcommand."""

    def wrap(configure: Configure) -> Callable[[Run], Run]:
        def bind(run: Run) -> Run:
            if name in COMMANDS:
                raise ValueError(f"command {name!r} is registered twice")
            COMMANDS[name] = (help, configure, run)
            return run

        return bind

    return wrap


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain text table, columns padded to their widest cell."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)
