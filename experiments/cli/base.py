"""The command registry: ``@command(name, help)(configure)`` over ``run(args) -> exit code``; text layout."""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable, Iterable
from typing import Any

from experiments.errors import UsageError

__all__ = ["COMMANDS", "WIDTH", "command", "numbers", "table", "wrap"]

Configure = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[str, Configure, Run]] = {}
WIDTH = 100  # columns the commands' tables and notes fit in, unless asked for --wide


def command(name: str, help: str) -> Callable[[Configure], Callable[[Run], Run]]:
    """Register ``configure(parser)`` and ``run(args)`` for a subcommand."""

    def wrap_configure(configure: Configure) -> Callable[[Run], Run]:
        def bind(run: Run) -> Run:
            if name in COMMANDS:
                raise ValueError(f"command {name!r} is registered twice")
            COMMANDS[name] = (help, configure, run)
            return run

        return bind

    return wrap_configure


def table(rows: list[list[str]], header: list[str], width: int | None = None) -> str:
    """A plain text table, columns padded to their widest cell. With ``width``, the widest columns are
    narrowed until a line fits in ``width`` characters, and their cells wrap onto more lines."""
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    while width is not None and sum(widths) + 2 * (len(widths) - 1) > width and max(widths) > 12:
        widths[widths.index(max(widths))] -= 1
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = []
    for n, row in enumerate(cells):
        parts = [textwrap.wrap(c, w, break_on_hyphens=False) or [""] for c, w in zip(row, widths, strict=True)]
        for i in range(max(len(p) for p in parts)):
            lines.append(fmt.format(*(p[i] if i < len(p) else "" for p in parts)))
        if n == 0:
            lines.append(fmt.format(*("-" * w for w in widths)))
    return "\n".join(line.rstrip() for line in lines)


def wrap(text: str, width: int | None = None, indent: str = "    ") -> str:
    """``text`` wrapped at ``width`` (continuation lines indented); as it is without a width."""
    return text if width is None else textwrap.fill(text, width, subsequent_indent=indent, break_on_hyphens=False)


def numbers(items: str | Iterable[str], flag: str, cast: type = int) -> list[Any]:
    """The positive numbers of a flag given as ``512,1024`` or ``512 1024`` (one string or several), sorted and
    without repeats; a `UsageError` naming the flag and the bad part otherwise."""
    out = []
    for item in [items] if isinstance(items, str) else items:
        for part in str(item).replace(",", " ").split():
            try:
                v = cast(part)
            except ValueError:
                v = None
            if v is None or v <= 0:
                raise UsageError(f"{flag}: {part!r} is not a positive {'integer' if cast is int else 'number'} "
                                 f"(give e.g. {flag} 512,1024,2048)")
            out.append(v)
    if not out:
        raise UsageError(f"{flag}: give at least one value")
    return sorted(set(out))
