"""Scaling figures: the quality metric vs parameters and vs FLOPs per token, best per size, with a
least-squares power law per family (`scaling_fits`, computed whether or not the figures are drawn)."""

from __future__ import annotations

from typing import Any

from experiments.fits import fit_power_law
from experiments.report.families import family_sort_key
from experiments.report.figures.base import Canvas, Context, figure, legend, log_axis
from experiments.report.records import num
from experiments.report.tables import metric_label

__all__ = ["scaling_fits"]

_AXES = {"params": ("parameters", "scaling_params"), "flops_per_token": ("forward FLOPs per token", "scaling_flops")}


def best_per_size(rows: list[dict[str, Any]], metric: str, x: str, minimize: bool) -> dict[float, float]:
    best: dict[float, float] = {}
    for r in rows:
        if r["status"] == "complete" and num(r.get(x)) and num(r.get(metric)) is not None:
            key, y = float(r[x]), float(r[metric])
            if key not in best or (y < best[key] if minimize else y > best[key]):
                best[key] = y
    return best


def scaling_fits(rows: list[dict[str, Any]], metric: str, x: str = "params",
                 minimize: bool = True) -> dict[str, dict[str, float]]:
    """Per family, the least-squares fit of ``log metric = log coef + exponent * log x`` over the best
    complete trial at each distinct ``x`` (``params`` or ``flops_per_token``); only families with >= 2 sizes.
    ``rows`` are `table_rows`. Returns ``{family: {"exponent", "coef", "r2", "n"}}``."""
    fits = {}
    for fam in sorted({r["family"] for r in rows}, key=family_sort_key):
        best = best_per_size([r for r in rows if r["family"] == fam], metric, x, minimize)
        fit = fit_power_law(sorted(best), [best[k] for k in sorted(best)]) if len(best) >= 2 else None
        if fit:
            fits[fam] = {"exponent": fit["exponent"], "coef": fit["coef"], "r2": fit["r2"], "n": len(best)}
    return fits


def _plottable(ctx: Context, xkey: str) -> list[dict[str, Any]]:
    return [r for r in ctx.rows if r["status"] == "complete" and num(r.get(xkey)) and
            num(r.get(ctx.metric or "")) is not None]


def _scaling(ctx: Context, canvas: Canvas, xkey: str) -> str | None:
    xlabel, name = _AXES[xkey]
    done, metric = _plottable(ctx, xkey), ctx.metric
    if metric is None or not done:
        return f"no complete trial has both {xkey} and a quality metric"
    minimize = ctx.direction(metric) == "minimize"
    fits = ctx.fits.get(xkey, {})
    fig, (ax,) = canvas.new()
    n_others = 0
    for fam in sorted({r["family"] for r in done}, key=family_sort_key):
        mine = [r for r in done if r["family"] == fam]
        best = best_per_size(mine, metric, xkey, minimize)
        colour = canvas.colour(fam)
        others = [r for r in mine if best.get(float(r[xkey])) != r[metric]]
        if others:
            ax.scatter([r[xkey] for r in others], [r[metric] for r in others], color=colour, alpha=0.3, s=18,
                       marker=canvas.markers[fam], linewidths=0)
            n_others += len(others)
        bx = sorted(best)
        label = fam
        fit = fits.get(fam)
        if fit:
            lo, hi = min(bx) / 1.15, max(bx) * 1.15
            grid = [lo * (hi / lo) ** (i / 49) for i in range(50)]
            ax.plot(grid, [fit["coef"] * g ** fit["exponent"] for g in grid], color=colour, lw=1.5, ls="--")
            var = "N" if xkey == "params" else "C"
            label = f"{fam}: $\\propto {var}^{{{fit['exponent']:.3f}}}$ ($R^2$={fit['r2']:.2f})"
        ax.scatter(bx, [best[x] for x in bx], color=colour, s=42, marker=canvas.markers[fam], label=label,
                   edgecolors="white", linewidths=0.6, zorder=3)
    log_axis(ax, "x")
    if minimize:
        log_axis(ax, "y", lambda v: f"{v:.3g}")
    ax.set_xlabel(f"{xlabel} (log scale)")
    ax.set_ylabel(metric_label(metric) + (", log scale" if minimize else ""))
    if n_others:
        ax.scatter([], [], color="grey", alpha=0.3, s=18, label=f"other runs at the same size ({n_others})")
    what = "parameters" if xkey == "params" else "FLOPs per token"
    how = "best per size" + (", least-squares power law per family" if fits else
                             ", no fit (no family has 2+ sizes)" if minimize else "")
    ax.set_title(f"{metric} vs {what} — {how}")
    legend(ax)
    canvas.save(fig, name)
    return None


@figure("scaling_params", 10)
def scaling_params(ctx: Context, canvas: Canvas) -> str | None:
    return _scaling(ctx, canvas, "params")


@figure("scaling_flops", 20)
def scaling_flops(ctx: Context, canvas: Canvas) -> str | None:
    return _scaling(ctx, canvas, "flops_per_token")


def all_fits(rows: list[dict[str, Any]], metric: str | None, minimize: bool) -> dict[str, Any]:
    """``{"params" | "flops_per_token": scaling_fits(...)}`` for a minimised quality metric (a power law of
    an accuracy is no scaling law: maximised metrics are shown, not fitted)."""
    fits: dict[str, Any] = {}
    for xkey in _AXES:
        done = [r for r in rows if r["status"] == "complete" and num(r.get(xkey)) and
                num(r.get(metric or "")) is not None]
        if metric is not None and done and minimize:
            fits[xkey] = scaling_fits(done, metric, xkey)
    return fits
