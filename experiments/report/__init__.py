"""Reports from a study: a comparison table (Markdown and CSV) and figures (PNG and SVG).

`write_report(study, out_dir)` reads every trial of an Optuna study (any storage) as a `TrialRecord`
(`experiments.study.ledger`) and writes into ``out_dir``:

- ``table.md`` / ``table.csv`` (`tables`): one row per finished trial (`records.table_rows`); with a
  learning-rate sweep (``report.best_over``), the best of the sweep per cell, every trial in ``table_all.*``;
- the figures (`figures`, each registered with ``@figure``), each as ``.png`` and ``.svg``; a figure whose
  data is absent is skipped and the reason recorded;
- ``report.json``: the fitted power laws, the skipped figures, the families' colours and the files written.

`status_text(study)` is the few lines `mixerlab study status` prints.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from experiments.report.families import (
    FAMILY_COLOURS,
    FamilyOf,
    default_family,
    family_colour,
    family_colours,
    family_sort_key,
)
from experiments.report.figures import FIGURES, Canvas, Context, draw, figure_names
from experiments.report.figures.scaling import all_fits, scaling_fits
from experiments.report.records import best_of_sweep, metric_names, superseded, table_rows
from experiments.report.status import status_text
from experiments.report.tables import fmt_number, metric_label, write_tables
from experiments.runs import write_json
from experiments.study.ledger import read_trials

__all__ = ["FAMILY_COLOURS", "FIGURES", "Report", "default_family", "family_colour", "family_colours",
           "fmt_number", "metric_label", "scaling_fits", "status_text", "superseded", "table_rows", "write_report"]


class Report(dict):
    """What `write_report` wrote: file name → path (``"table.md"``, ``"scaling_params.png"``, ...).

    Attributes: ``fits`` ({"params" | "flops_per_token": {family: {"exponent", "coef", "r2", "n"}}}), also
    under the key ``"fits"`` of ``report.json``; ``skipped`` (figure → why it was not drawn); ``rows`` (the
    table's rows, raw values)."""

    fits: dict[str, dict[str, dict[str, float]]]
    skipped: dict[str, str]
    rows: list[dict[str, Any]]


def _quality_metric(study: Any, rows: list[dict[str, Any]], recipe_info: dict[str, Any] | None) -> str | None:
    """The metric scaling plots and learning curves show: the recipe's ``report.metric``, else the first
    corpus/task objective, else val_bpb or accuracy, whichever the trials have."""
    wanted = ((recipe_info or {}).get("report") or {}).get("metric")
    candidates = ([wanted] if wanted else []) + [m for m in metric_names(study) if m in (
        "val_bpb", "val_loss", "val_ppl", "accuracy", "exact_match")] + ["val_bpb", "val_loss", "accuracy"]
    for metric in candidates:
        if any(r.get(metric) is not None for r in rows):
            return metric
    return None


def write_report(study: Any, out_dir: str | os.PathLike, *, recipe_info: dict[str, Any] | None = None,
                 family_of: FamilyOf | None = None, figures: Iterable[str] | None = None) -> Report:
    """Write ``table.md``, ``table.csv``, the figures (PNG + SVG) and ``report.json`` for ``study`` into
    ``out_dir``; return a `Report` (file name → path, with ``.fits`` and ``.skipped``).

    Args:
        study: an Optuna study (any storage), trials as the study engine stores them.
        out_dir: where to write (created if missing).
        recipe_info: the recipe as a dict (`Recipe.to_dict`): its description and reproduce command go into
            the table header; ``report.sort`` ("family" or "objective") orders the table and ``report.metric``
            chooses the metric of the scaling plots and learning curves.
        family_of: `TrialRecord` → family name, for colours, fits and sorting (default `default_family`).
        figures: the names (`FIGURES`) of the figures to draw; default all whose data exists. The fits are
            computed either way.
    """
    if figures is not None and set(figures) - set(FIGURES):
        raise ValueError(f"unknown figure(s) {sorted(set(figures) - set(FIGURES))}; figures: "
                         f"{', '.join(figure_names())}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    family_of = family_of or default_family
    options = (recipe_info or {}).get("report") or {}
    records = read_trials(study)
    rows = table_rows(study, family_of, sort=options.get("sort", "family"), records=records)
    sweep = list(options.get("best_over") or [])
    best = best_of_sweep(study, rows, sweep, records=records) if sweep else rows
    if sweep:  # table.md: the best of the sweep per cell; table_all.*: every trial
        paths = Report(write_tables(study, rows, records, out, recipe_info, stem="table_all"))
        paths.update(write_tables(study, best, records, out, recipe_info))
    else:
        paths = Report(write_tables(study, rows, records, out, recipe_info))

    families = sorted({r["family"] for r in rows}, key=family_sort_key)
    metric = _quality_metric(study, rows, recipe_info)
    ctx = Context(study=study, records={r.number: r for r in records if r.finished}, rows=rows, best=best,
                  metric=metric, family_of=family_of)
    if metric is not None:
        ctx.fits = all_fits(rows, metric, ctx.direction(metric) == "minimize")
    canvas = Canvas(out, families, rows)
    skipped = draw(ctx, canvas, figures)
    paths.update(canvas.paths)
    info = {"study": study.study_name, "metric": metric, "fits": ctx.fits, "skipped": skipped,
            "colours": {f: canvas.colour(f) for f in families},
            "files": sorted([*paths, "report.json"]),
            "written": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    write_json(out / "report.json", info)
    paths["report.json"] = out / "report.json"
    paths.fits, paths.skipped, paths.rows = ctx.fits, skipped, rows
    return paths


