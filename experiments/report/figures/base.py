"""What every figure shares: the `@figure` registry, the `Canvas` a figure draws on, the `Context` it reads,
and the axis helpers.

A figure is a function ``f(ctx, canvas) -> str | None`` registered with ``@figure("name", order)``: it draws
and saves (``canvas.save(fig, name)``) and returns None, or returns why it could not (its data is absent).
`draw` runs the figures asked for, in order, and records every skip with its reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.metrics import ALIASES, METRICS
from experiments.report.families import MARKERS, FamilyOf, family_colour, family_colours
from experiments.report.records import metric_names
from experiments.report.tables import fmt_number
from experiments.study.ledger import TrialRecord

__all__ = ["FIGURES", "Canvas", "Context", "draw", "figure"]

FigureFn = Callable[["Context", "Canvas"], "str | None"]
FIGURES: dict[str, tuple[int, FigureFn]] = {}  # name -> (order, function)


def figure(name: str, order: int) -> Callable[[FigureFn], FigureFn]:
    """Register a figure under ``name``; `draw` runs figures by ``order``."""

    def register(fn: FigureFn) -> FigureFn:
        if name in FIGURES:
            raise ValueError(f"figure {name!r} is registered twice")
        FIGURES[name] = (order, fn)
        return fn

    return register


def figure_names() -> list[str]:
    return [name for name, _ in sorted(FIGURES.items(), key=lambda kv: kv[1][0])]


@dataclass
class Context:
    """What figures read: the study (its directions, Pareto front and importances), the finished trials by
    number, the table rows, the best-of-sweep rows, the quality metric and how trials group into families."""

    study: Any
    records: dict[int, TrialRecord]
    rows: list[dict[str, Any]]
    best: list[dict[str, Any]]
    metric: str | None
    family_of: FamilyOf
    fits: dict[str, Any] = field(default_factory=dict)

    def record(self, row: dict[str, Any]) -> TrialRecord:
        return self.records[row["trial"]]

    def direction(self, metric: str) -> str:
        names = metric_names(self.study)
        if metric in names:
            return self.study.directions[names.index(metric)].name.lower()
        metric = ALIASES.get(metric, metric)
        return METRICS[metric].direction if metric in METRICS else "minimize"


class Canvas:
    """Saves figures as PNG and SVG; one colour and one marker per family across them all."""

    def __init__(self, out: Path, families: list[str], rows: list[dict[str, Any]]):
        self.out = out
        self.paths: dict[str, Path] = {}
        self.markers = {f: MARKERS[i % len(MARKERS)] for i, f in enumerate(families)}
        self.colours = family_colours(families)
        self.widths: dict[int, float] = {}
        for fam in {r["family"] for r in rows}:
            sizes = sorted({r["params"] or 0 for r in rows if r["family"] == fam})
            for r in rows:
                if r["family"] == fam:
                    self.widths[r["trial"]] = 1.0 + 1.5 * sizes.index(r["params"] or 0) / max(1, len(sizes) - 1)

    def new(self, ncols: int = 1, size: tuple[float, float] = (7.5, 4.8)) -> tuple[Any, Any]:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(size[0] * ncols if ncols > 1 else size[0], size[1]), layout="constrained")
        axes = fig.subplots(1, ncols, squeeze=False)[0]
        for ax in axes:
            ax.grid(True, which="major", alpha=0.3)
            ax.grid(True, which="minor", alpha=0.1)
        return fig, axes

    def save(self, fig: Any, name: str) -> None:
        for ext in ("png", "svg"):
            path = self.out / f"{name}.{ext}"
            fig.savefig(path, dpi=150, metadata={"Date": None} if ext == "svg" else {"Software": None})
            self.paths[f"{name}.{ext}"] = path
            fig.set_layout_engine("none")  # laid out once; the SVG reuses it
        fig.clear()

    def colour(self, family: str) -> str:
        """The family's colour in this report (every figure): `family_colours` of the report's families."""
        return self.colours.get(family) or family_colour(family)

    def width(self, row: dict[str, Any]) -> float:
        """Line width of a trial's curve: thicker for larger models within its family (1 to 2.5)."""
        return self.widths.get(row["trial"], 1.5)


STYLE = {"svg.hashsalt": "mixerlab", "svg.fonttype": "none", "axes.titlesize": "medium",
         "axes.labelsize": "medium", "legend.fontsize": "small", "figure.dpi": 100}


def draw(ctx: Context, canvas: Canvas, wanted: Iterable[str] | None = None) -> dict[str, str]:
    """Draw the figures asked for (default all) in order, each in the same style; return the skipped ones
    with why."""
    import matplotlib
    import matplotlib.style

    wanted = None if wanted is None else set(wanted)
    skipped: dict[str, str] = {}
    with matplotlib.rc_context():  # the same look whatever style the caller set; nothing leaks out
        matplotlib.style.use("default")
        matplotlib.rcParams.update(STYLE)
        for name in figure_names():
            if wanted is not None and name not in wanted:
                skipped[name] = "not asked for (figures=...)"
                continue
            why = FIGURES[name][1](ctx, canvas)
            if why:
                skipped[name] = why
    return skipped


def axis_label(metric: str, direction: str | None = None) -> str:
    """A short axis label with the unit: ``peak memory (MiB), lower is better``."""
    key = ALIASES.get(metric, metric)
    label = METRICS[key].axis if key in METRICS else metric
    if direction:
        label += ", lower is better" if direction == "minimize" else ", higher is better"
    return label


def si(x: float) -> str:
    """``213248`` → ``213k``; ``1.2e6`` → ``1.2M``; below 1000 three significant digits."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def log_axis(ax: Any, axis: str, fmt: Callable[[float], str] = si) -> None:
    """Log scale with plain tick labels (``0.9``, ``200k``) instead of ``9 x 10^-1``."""
    from matplotlib.ticker import LogFormatter

    class _Plain(LogFormatter):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return fmt(x) if super().__call__(x, pos) else ""

    target = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    target.set_major_formatter(_Plain(labelOnlyBase=False))
    target.set_minor_formatter(_Plain(labelOnlyBase=False, minor_thresholds=(1.0, 0.4)))


def length_axis(ax: Any, lengths: Iterable[float], axis: str = "x") -> None:
    """A log-2 axis with one tick per measured length, labelled ``1,024`` rather than ``2^10``."""
    from matplotlib.ticker import NullLocator

    ticks = sorted({float(v) for v in lengths})
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log", base=2)
    target = ax.xaxis if axis == "x" else ax.yaxis
    if len(ticks) <= 12:
        target.set_ticks(ticks, [fmt_number(int(v)) for v in ticks])
        target.set_minor_locator(NullLocator())


def legend(ax: Any, sources: Sequence[Any] | None = None, order: Any = None, **kwargs: Any) -> None:
    """``ax``'s legend in the figures' style. ``sources``: the panels whose entries it holds instead of its own,
    one per label (sorted by ``order``), so that one legend names what every panel draws."""
    handles, labels = ax.get_legend_handles_labels()
    if sources is not None:
        shown: dict[str, Any] = {}
        for source in sources:
            for handle, label in zip(*source.get_legend_handles_labels(), strict=True):
                shown.setdefault(label, handle)
        labels = sorted(shown, key=order) if order else list(shown)
        handles = [shown[k] for k in labels]
    if handles:
        ax.legend(handles, labels, fontsize="small", framealpha=0.85, **kwargs)


def log_if_wide(ax: Any, axis: str, values: Sequence[float]) -> None:
    vals = [v for v in values if v is not None and v > 0]
    if vals and len(vals) == len(values) and max(vals) / min(vals) > 20:
        log_axis(ax, axis)


def labeller(n_curves: int) -> Callable[[dict[str, Any]], str | None]:
    """Legend labels: one per trial when there are few curves, else one per family."""
    seen: set[str] = set()

    def label(row: dict[str, Any]) -> str | None:
        if n_curves <= 10:
            return trial_label(row)
        if row["family"] in seen:
            return None
        seen.add(row["family"])
        return row["family"]

    return label


def trial_label(row: dict[str, Any]) -> str:
    size = f", {fmt_number(row['params'], 3)} params" if row.get("params") else ""
    return f"#{row['trial']} {row['family']}{size}"


def log_log_pair(figs: Canvas, name: str, curves: list[tuple[dict[str, Any], list[tuple[list, str]]]],
                  xs: list[float], xlabel: str, panels: tuple[tuple[str, str], tuple[str, str]]) -> None:
    """Two side-by-side log-log panels against a length: ``curves`` holds, per table row, the (x, y) points
    of the left and right panel with a suffix for each panel's legend label; ``panels`` (y label, title)."""
    fig, axes = figs.new(ncols=2, size=(6.0, 4.6))
    label = labeller(len(curves))
    for r, series in curves:
        kw = {"color": figs.colour(r["family"]), "marker": figs.markers[r["family"]], "ms": 4, "lw": figs.width(r)}
        name_ = label(r)
        for ax, (pts, suffix) in zip(axes, series, strict=True):
            if pts:
                ax.plot(*zip(*pts, strict=True), label=name_ and name_ + suffix, **kw)
    for ax, (what, title) in zip(axes, panels, strict=True):
        length_axis(ax, xs)
        log_axis(ax, "y", lambda v: f"{v:.3g}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{what}, log scale")
        ax.set_title(title)
        legend(ax)
    figs.save(fig, name)
