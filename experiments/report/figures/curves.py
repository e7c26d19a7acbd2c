"""Learning curves: the quality metric at each evaluation vs training tokens, one line per trial."""

from __future__ import annotations

from experiments.report.figures.base import Canvas, Context, figure, legend, log_axis, trial_label
from experiments.report.records import num
from experiments.report.tables import metric_label


@figure("learning_curves", 30)
def learning_curves(ctx: Context, canvas: Canvas) -> str | None:
    metric, curves = ctx.metric, []
    for r in ctx.rows:
        summary = ctx.record(r).summary
        evals = summary.evals if summary else []
        pts = [(e["tokens"], e[metric]) for e in evals if num(e.get("tokens")) and num(e.get(metric)) is not None]
        if pts:
            curves.append((r, pts))
    if metric is None or not curves:
        return "no trial has evaluations (summary.evals)"
    minimize = ctx.direction(metric) == "minimize"
    fig, (ax,) = canvas.new()
    per_trial = len(curves) <= 10
    seen: set[str] = set()
    styles = {"complete": "-", "pruned": "--", "failed": ":"}
    for r, pts in curves:
        fam = r["family"]
        label = trial_label(r) + ("" if r["status"] == "complete" else f" ({r['status']})") if per_trial else (
            fam if fam not in seen else None)
        seen.add(fam)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=canvas.colour(fam), ls=styles.get(r["status"], "-"),
                marker=canvas.markers[fam], ms=3.5, lw=canvas.width(r), alpha=0.9, label=label)
    log_axis(ax, "x")
    sized = any(len({r["params"] for r, _ in curves if r["family"] == fam}) > 1 for fam in seen)
    notes = (["thicker lines: larger models"] if sized else []) + (
        [] if per_trial else ["dashed: pruned, dotted: failed"])
    if minimize and min(len(pts) for _, pts in curves) >= 3:  # a first evaluation near the random-init loss
        first = max(pts[0][1] for _, pts in curves)
        top = max(pts[1][1] if len(pts) > 1 else pts[0][1] for _, pts in curves)
        lowest = min(p[1] for _, pts in curves for p in pts)
        if top > lowest and first > top + 0.5 * (top - lowest):
            ax.set_ylim(lowest - 0.05 * (top - lowest), top + 0.05 * (top - lowest))
            notes.append("first evaluations above the axis")
    ax.set_xlabel("training tokens (log scale)")
    ax.set_ylabel(metric_label(metric))
    ax.set_title(f"Learning curves: {metric} vs training tokens" + (f"\n({'; '.join(notes)})" if notes else ""))
    legend(ax)
    canvas.save(fig, "learning_curves")
    return None
