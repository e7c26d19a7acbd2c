"""Synthetic-task figures: accuracy vs sequence length (extrapolation), and Zoology's Figure 2 layout,
accuracy vs d_model with one panel per training length, and Based's Figure 2, accuracy vs recurrent state size."""

from __future__ import annotations

from typing import Any

from experiments.report.families import family_sort_key
from experiments.report.figures.base import Canvas, Context, figure, legend, length_axis, trial_label
from experiments.report.records import num
from experiments.report.tables import fmt_number


@figure("accuracy_vs_len", 70)
def accuracy_vs_len(ctx: Context, canvas: Canvas) -> str | None:
    curves = []
    for r in ctx.rows:
        summary = ctx.record(r).summary
        if r["status"] == "failed" or summary is None:
            continue
        by = (summary.final.get("by") or {}).get("seq_len") or {}
        pts = [(float(k), float(v)) for k, v in by.items() if num(v) is not None]
        if pts:
            curves.append((r, sorted(pts)))
    if not curves:
        return "no task trial has accuracy by seq_len (summary.final.by.seq_len)"
    fig, (ax,) = canvas.new()
    per_trial = len(curves) <= 10
    seen: set[str] = set()
    train_lens = set()
    for r, pts in curves:
        fam = r["family"]
        label = trial_label(r) if per_trial else (fam if fam not in seen else None)
        seen.add(fam)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=canvas.colour(fam), marker=canvas.markers[fam], ms=5,
                lw=canvas.width(r), ls="-" if r["status"] == "complete" else "--", label=label)
        seq = (ctx.record(r).config.get("train") or {}).get("seq_len")
        if seq:
            train_lens.add(seq)
    xs = sorted({p[0] for _, pts in curves for p in pts})
    if len(xs) > 1 and xs[-1] / xs[0] >= 4:
        length_axis(ax, xs)
    else:
        ax.set_xticks(xs, [fmt_number(int(x)) for x in xs])
    for i, s in enumerate(sorted(train_lens)):
        ax.axvline(s, color="grey", ls=":", lw=1, label="training length" if i == 0 else None)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("test accuracy (fraction correct)")
    task = next((ctx.record(r).summary.task for r, _ in curves), None)
    ax.set_title("Accuracy vs sequence length" + (f" — task {task}" if task else ""))
    legend(ax)
    canvas.save(fig, "accuracy_vs_len")
    return None


@figure("accuracy_vs_width", 80)
def accuracy_vs_width(ctx: Context, canvas: Canvas) -> str | None:
    """Test accuracy vs d_model, one panel per training length, a line per family (the best of a
    learning-rate sweep per cell where the recipe has one)."""
    done = [r for r in ctx.best if r["status"] == "complete" and r.get("accuracy") is not None and r.get("d_model")]
    panels: dict[Any, list[dict[str, Any]]] = {}
    for r in done:
        panels.setdefault(r.get("seq_len"), []).append(r)
    if not any(len({r["d_model"] for r in members}) > 1 for members in panels.values()):
        return "no task trials at two or more d_model values"
    points = {k: [(r["family"], r["d_model"], r["accuracy"]) for r in members] for k, members in panels.items()}
    _accuracy_panels(canvas, "accuracy_vs_width", points, "model dimension d_model", "accuracy vs d_model",
                     length_axis, lw=1.8, ls="-")
    return None


def _accuracy_panels(canvas: Canvas, name: str, panels: dict[Any, list[tuple[str, float, float]]], xlabel: str,
                     title: str, x_axis: Any, **line: Any) -> None:
    """Test accuracy against ``x``: one panel per training length (``panels``: length -> (family, x,
    accuracy) points), a line per family."""
    keys = sorted(panels, key=lambda k: (k is None, k or 0))
    fig, axes = canvas.new(ncols=len(keys), size=(7.5 if len(keys) == 1 else 4.2, 4.4))
    for ax, key in zip(axes, keys, strict=True):
        points = panels[key]
        for fam in sorted({p[0] for p in points}, key=family_sort_key):
            pts = sorted((x, a) for f, x, a in points if f == fam)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=canvas.colour(fam), marker=canvas.markers[fam],
                    ms=6, label=fam, **line)
        x_axis(ax, [p[1] for p in points])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(xlabel)
        ax.set_title(f"sequence length {fmt_number(key)}" if key else title)
    axes[0].set_ylabel("test accuracy (fraction correct)")
    legend(axes[-1], sources=axes, order=family_sort_key, loc="best")  # every panel's families: one may miss a length
    canvas.save(fig, name)


@figure("recall_vs_state", 85)
def recall_vs_state(ctx: Context, canvas: Canvas) -> str | None:
    """Based's Figure 2: test accuracy against the bytes of recurrent state a model carries while decoding
    (its ``state_bytes`` at the training length, batch 1, in the model's dtype: 4 bytes × Σ layers' state
    for float32; attention's is its KV cache at that length), one point per trial (the best of a sweep per
    cell), one colour per family, one panel per training length."""
    panels: dict[Any, list[tuple[str, float, float]]] = {}
    for r in ctx.best:
        summary = ctx.record(r).summary
        if r["status"] != "complete" or r.get("accuracy") is None or summary is None or not summary.state_bytes:
            continue
        panels.setdefault(r.get("seq_len"), []).append((r["family"], float(summary.state_bytes), r["accuracy"]))
    if not any(len(points) > 1 for points in panels.values()):
        return "no two finished task trials with a recorded state_bytes at one training length"
    _accuracy_panels(canvas, "recall_vs_state", panels, "recurrent state (bytes, log scale)", "accuracy vs state size",
                     lambda ax, xs: ax.set_xscale("log", base=2), lw=0.8, ls=":")
    return None
