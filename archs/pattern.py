"""Per-layer mixer choice for hybrids: tiled pattern strings, attention ratios and explicit lists.

- A **pattern** is a string of letters tiled over the layers (``"MMMA"`` over 12 layers gives
  ``MMMAMMMAMMMA``; over 6 layers ``MMMAMM``). A **legend** maps letters to registered mixers; the default
  legend covers every built-in mixer and a user legend adds or overrides letters (plugins included).
- An **attention ratio** places ``round(n_layers * ratio)`` attention layers evenly among the others, as
  Megatron-LM's hybrid allocation does: the other layers are cut into ``n_attn + 1`` equal runs with one
  attention layer between consecutive runs, so attention is never first or last when that is avoidable.
- An **explicit list** names each layer's mixer.

Each resolves to a list of `LayerSpec` (mixer name + options), stored in the model spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from registry import MixerlabError

__all__ = ["DEFAULT_LEGEND", "LayerSpec", "PatternError", "pattern_of", "ratio_placement", "tile_pattern"]

DEFAULT_LEGEND: dict[str, str] = {
    "A": "attention",
    "X": "xformers_attention",
    "W": "sliding_window_attention",
    "M": "mamba",
    "S": "mamba2",
    "R": "retention",
    "G": "gla",
    "L": "linear_attention",
    "B": "based",
    "D": "deltanet",
    "N": "gated_deltanet",
    "K": "s4d",
    "H": "h3",
    "Y": "hyena",
    "C": "base_conv",
    "Q": "rg_lru",
}


class PatternError(MixerlabError, ValueError):
    """An invalid pattern, legend, ratio or layer list; the message names the fix."""


@dataclass(frozen=True)
class LayerSpec:
    """One layer's mixer: a registered name (or import path) and its options."""

    mixer: str
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"mixer": self.mixer, "options": dict(self.options)}

    @classmethod
    def parse(cls, item: Any, where: str) -> LayerSpec:
        """From ``"name"``, ``{"mixer": name, "options": {...}}`` or a `LayerSpec`."""
        if isinstance(item, LayerSpec):
            return item
        if isinstance(item, str):
            return cls(item)
        if isinstance(item, dict) and "mixer" in item and set(item) <= {"mixer", "options"}:
            options = item.get("options") or {}
            if not isinstance(options, dict):
                raise PatternError(f"{where}: options must be a table/dict, got {options!r}")
            return cls(str(item["mixer"]), dict(options))
        raise PatternError(f"{where}: expected a mixer name or {{'mixer': name, 'options': {{...}}}}, got {item!r}")


def tile_pattern(pattern: str, n_layers: int) -> str:
    """Repeat ``pattern`` over ``n_layers`` layers (the last repeat may be cut short)."""
    if not pattern:
        raise PatternError("pattern is empty; give at least one letter, e.g. pattern='MMMA'")
    if n_layers <= 0:
        raise PatternError(f"n_layers must be positive, got {n_layers}")
    return "".join(pattern[i % len(pattern)] for i in range(n_layers))


def ratio_placement(n_layers: int, ratio: float) -> list[bool]:
    """Which of ``n_layers`` layers are attention for an attention ``ratio`` in [0, 1] (see module doc)."""
    if not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0.0 <= ratio <= 1.0:
        raise PatternError(f"attn_ratio must be a number in [0, 1], got {ratio!r}")
    n_attn = round(n_layers * ratio)
    n_other = n_layers - n_attn
    run = n_other / (n_attn + 1)  # length of each run of other layers
    flags = [False] * n_layers
    for i in range(1, n_attn + 1):
        flags[math.floor(i * run + 0.5) + i - 1] = True
    return flags


def resolve_legend(legend: dict[str, Any] | None) -> dict[str, LayerSpec]:
    """The default legend updated with a user legend (letter -> name or {'mixer', 'options'})."""
    merged: dict[str, LayerSpec] = {k: LayerSpec(v) for k, v in DEFAULT_LEGEND.items()}
    for letter, item in (legend or {}).items():
        if not (isinstance(letter, str) and len(letter) == 1 and not letter.isspace()):
            raise PatternError(f"legend keys must be single letters, got {letter!r}")
        merged[letter] = LayerSpec.parse(item, f"legend[{letter!r}]")
    return merged


def pattern_of(layers: list[LayerSpec], legend: dict[str, Any] | None = None) -> str:
    """The pattern string naming ``layers`` (``?`` where no legend letter matches)."""
    by_name = {spec.mixer: letter for letter, spec in reversed(list(resolve_legend(legend).items()))}
    return "".join(by_name.get(layer.mixer, "?") for layer in layers)
