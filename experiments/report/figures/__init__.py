"""The report's figures, each a function registered with ``@figure`` (`base`): scaling, learning curves,
long-context measurements, task accuracy, and the search itself. Importing this package registers them all;
`FIGURES` then lists them (`figure_names` in order) and `draw` runs them."""

from experiments.report.figures import curves, lengths, scaling, search, tasks  # noqa: F401 — registers them
from experiments.report.figures.base import FIGURES, Canvas, Context, draw, figure, figure_names

__all__ = ["FIGURES", "Canvas", "Context", "draw", "figure", "figure_names"]
