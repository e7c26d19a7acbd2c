"""Speed and memory comparisons, each case measured in a fresh process. Not tests: results are committed
under benchmarks/results/ with the command that regenerates them (`run_meta`, `write_results`)."""

from __future__ import annotations

import datetime
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["package_version", "run_meta", "write_results"]


def package_version(distribution: str) -> str:
    """The installed version of ``distribution``, or "not installed"."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_meta(module: str, argv: list[str] | None, **extra: Any) -> dict[str, Any]:
    """Where and how a benchmark ran: the command that regenerates it (``python -m module ARGS``), the date,
    the machine (`experiments.runs.machine_info`), the commit, and ``extra``."""
    from experiments.runs import machine_info

    given = argv if argv is not None else sys.argv[1:]
    return {"command": " ".join(["python -m " + module, *map(shlex.quote, given)]),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(),
            "commit": _commit(), **extra}


def write_results(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any], markdown: str) -> None:
    """``out``.json (meta and rows) and ``out``.md (the table), and the table on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    out.with_name(out.name + ".md").write_text(markdown)
    print(markdown)
