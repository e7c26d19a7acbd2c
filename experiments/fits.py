"""Fits over measurements: power laws (scaling exponents) and the longest length within a memory budget."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["fit_power_law", "max_length_for_budget"]


def fit_power_law(xs: Sequence[float], ys: Sequence[float | None], *, floor: float = 0.0) -> dict[str, Any] | None:
    """Least-squares fit of ``log y = log c + k log x`` over the points with ``y > floor``.

    Returns ``{"exponent": k, "coef": c, "r2", "used": [x...], "dropped": [x...]}``, or ``None`` when fewer
    than two points (at distinct x) are above the floor.
    """
    pts = [(float(x), float(y)) for x, y in zip(xs, ys, strict=True)
           if y is not None and x > 0 and math.isfinite(y) and y > max(floor, 0.0)]
    if len({x for x, _ in pts}) < 2:
        return None
    lx = [math.log(x) for x, _ in pts]
    ly = [math.log(y) for _, y in pts]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    k = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sxx
    log_c = my - k * mx
    ss_res = sum((b - (log_c + k * a)) ** 2 for a, b in zip(lx, ly, strict=True))
    ss_tot = sum((b - my) ** 2 for b in ly)
    used = [x for x, _ in pts]
    return {"exponent": k, "coef": math.exp(log_c), "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0,
            "used": [int(x) if x.is_integer() else x for x in used],
            "dropped": [x for x in xs if float(x) not in used], "floor": floor}


def max_length_for_budget(xs: Sequence[int], ys: Sequence[float | None], fit: dict[str, Any] | None,
                          budget: float) -> dict[str, Any]:
    """The largest length whose value (peak bytes) stays within ``budget``.

    ``how`` is ``"measured"`` when the budget is crossed inside the measured lengths (the answer is the
    largest measured length that fits; ``estimate`` interpolates the fit), else ``"extrapolated"`` from the
    fit (``None`` length when the value does not grow with T).
    """
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    fits = [x for x, y in pts if y <= budget]
    over = [x for x, y in pts if y > budget]
    estimate = None
    if fit is not None and fit["exponent"] > 1e-3:
        estimate = int(math.floor((budget / fit["coef"]) ** (1.0 / fit["exponent"])))
    out: dict[str, Any] = {"budget_bytes": int(budget), "estimate": estimate}
    if over and fits and min(over) > max(fits):
        return {**out, "seq_len": max(fits), "how": "measured"}
    if over and fits:  # not monotone (noise): the largest length that fits below the first that does not
        below = [x for x in fits if x < min(over)]
        if below:
            return {**out, "seq_len": max(below), "how": "measured"}
    if fit is None:
        return {**out, "seq_len": max(fits) if fits else None, "how": "measured (no fit)"}
    if fit["exponent"] <= 1e-3:
        return {**out, "seq_len": None, "how": "extrapolated", "note": "memory does not grow with T"}
    return {**out, "seq_len": estimate, "how": "extrapolated"}
