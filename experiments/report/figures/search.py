"""Figures of the search itself: the Pareto front (multi-objective), the optimisation history and Optuna's
hyperparameter importances."""

from __future__ import annotations

import json
import warnings

from experiments.report.families import family_sort_key
from experiments.report.figures.base import Canvas, Context, axis_label, figure, legend, log_if_wide
from experiments.report.records import metric_names


@figure("pareto", 90)
def pareto(ctx: Context, canvas: Canvas) -> str | None:
    study = ctx.study
    if len(study.directions) < 2:
        return "single-objective study"
    done = [t for t in ctx.records.values() if t.state == "complete" and t.values is not None]
    if not done:
        return "no complete trials"
    names = metric_names(study)
    front = sorted((ctx.records[t.number] for t in study.best_trials), key=lambda t: t.values[0])
    fig, (ax,) = canvas.new(size=(7.5, 5.2))
    for fam in sorted({ctx.family_of(t) for t in done}, key=family_sort_key):
        mine = [t for t in done if ctx.family_of(t) == fam]
        ax.scatter([t.values[0] for t in mine], [t.values[1] for t in mine], color=canvas.colour(fam), s=40,
                   marker=canvas.markers[fam], alpha=0.55, label=fam, linewidths=0)
    ax.scatter([t.values[0] for t in front], [t.values[1] for t in front], facecolors="none", edgecolors="black",
               s=110, linewidths=1.4, label=f"Pareto front ({len(front)} trials)", zorder=3)
    if len(front) > 1:
        # the boundary of the dominated region: horizontal first when x is minimised, vertical first otherwise
        ax.plot([t.values[0] for t in front], [t.values[1] for t in front], color="black", lw=1, alpha=0.6,
                drawstyle="steps-post" if study.directions[0].name == "MINIMIZE" else "steps-pre", zorder=2)
    for t in front:
        ax.annotate(f"#{t.number}", (t.values[0], t.values[1]), textcoords="offset points", xytext=(6, 5),
                    fontsize="small")
    log_if_wide(ax, "x", [t.values[0] for t in done])
    log_if_wide(ax, "y", [t.values[1] for t in done])
    dirs = [d.name.lower() for d in study.directions]
    ax.set_xlabel(axis_label(names[0], dirs[0]))
    ax.set_ylabel(axis_label(names[1], dirs[1]))
    extra = f" (first 2 of {len(names)} objectives)" if len(names) > 2 else ""
    ax.set_title(f"Pareto front: {names[0]} vs {names[1]}{extra}")
    legend(ax)
    canvas.save(fig, "pareto")
    return None


@figure("history", 100)
def history(ctx: Context, canvas: Canvas) -> str | None:
    from matplotlib.ticker import MaxNLocator

    trials = list(ctx.records.values())
    done = sorted((t for t in trials if t.state == "complete" and t.values is not None), key=lambda t: t.number)
    if not done:
        return "no complete trials"
    names = metric_names(ctx.study)
    fig, axes = canvas.new(ncols=len(names), size=(7.5 if len(names) == 1 else 5.5, 4.6))
    pruned = [t for t in trials if t.state == "pruned" and t.intermediate]
    families = sorted({ctx.family_of(t) for t in done}, key=family_sort_key)
    for i, (ax, metric) in enumerate(zip(axes, names, strict=True)):
        minimize = ctx.study.directions[i].name == "MINIMIZE"
        for fam in families:
            mine = [t for t in done if ctx.family_of(t) == fam]
            ax.scatter([t.number for t in mine], [t.values[i] for t in mine], color=canvas.colour(fam),
                       marker=canvas.markers[fam], s=36, label=fam, zorder=3)
        if i == 0 and len(names) == 1 and pruned:
            ax.scatter([t.number for t in pruned], [t.intermediate[t.last_step] for t in pruned],
                       marker="x", color="grey", s=30, label="pruned (last reported value)", zorder=2)
        best, xs, ys = None, [], []
        for t in done:
            v = t.values[i]
            best = v if best is None or (v < best if minimize else v > best) else best
            xs.append(t.number)
            ys.append(best)
        xs.append(max(t.number for t in trials))
        ys.append(best)
        ax.step(xs, ys, where="post", color="black", lw=1.3, label="best so far")
        log_if_wide(ax, "y", [t.values[i] for t in done])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("trial number")
        ax.set_ylabel(axis_label(metric, "minimize" if minimize else "maximize"))
        ax.set_title(f"Optimisation history: {metric}")
        legend(ax)
    canvas.save(fig, "history")
    return None


@figure("param_importances", 110)
def param_importances(ctx: Context, canvas: Canvas) -> str | None:
    import optuna

    done = [t for t in ctx.records.values() if t.state == "complete"]
    varied = {name for name in {p for t in done for p in t.params}
              if len({json.dumps(t.params.get(name), sort_keys=True) for t in done}) > 1}
    if len(ctx.study.directions) > 1 or len(done) < 4 or len(varied) < 2:
        return "needs a single-objective study with >= 4 complete trials and >= 2 varied parameters"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            importances = optuna.importance.get_param_importances(ctx.study, params=sorted(varied))
        except (ValueError, RuntimeError) as exc:
            return f"optuna could not compute importances: {exc}"
    names = sorted(importances, key=importances.get)
    fig, (ax,) = canvas.new(size=(7.5, 1.2 + 0.5 * len(names)))
    bars = ax.barh(names, [importances[n] for n in names], color="#4c72b0")
    ax.bar_label(bars, labels=[f"{importances[n]:.2f}" for n in names], padding=3, fontsize="small")
    ax.set_xlim(0, max(1e-9, max(importances.values())) * 1.15)
    ax.grid(False, axis="y")
    ax.set_xlabel("importance (Optuna PED-ANOVA, normalised to sum 1)")
    ax.set_ylabel("hyperparameter")
    ax.set_title(f"Hyperparameter importances for {metric_names(ctx.study)[0]} ({len(done)} complete trials)")
    canvas.save(fig, "param_importances")
    return None
