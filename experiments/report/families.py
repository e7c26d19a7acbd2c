"""Families of trials and their colours.

A **family** groups trials for colours, fits and sorting: the trial's ``variant`` parameter when the recipe
has variants, else a name derived from the layer pattern (``AAAA`` → attention, ``MMMM`` → mamba, ``SSSS`` →
mamba2, mixed → ``hybrid MMMA``). Every family has one colour in every figure of a report (`family_colours`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

from archs.model import layers_text as archs_layers_text
from archs.pattern import tile_pattern
from experiments.study.ledger import TrialRecord, read_trial

__all__ = ["FAMILY_COLOURS", "FamilyOf", "default_family", "family_colour", "family_colours", "family_sort_key",
           "layer_pattern", "layers_text"]

#: fixed colours of the known mixer families (aliases map to the same colour)
FAMILY_COLOURS: dict[str, str] = {
    "attention": "#1f77b4",  # blue
    "mamba": "#ff7f0e",  # orange
    "mamba2": "#2ca02c",  # green
    "hybrid": "#9467bd",  # purple
    "sliding_window_attention": "#8c564b",  # brown
    "xformers_attention": "#17becf",  # cyan
}
_ALIASES = {
    "attn": "attention", "transformer": "attention", "full_attention": "attention", "sdpa": "attention",
    "mamba1": "mamba", "ssm": "mamba", "ssd": "mamba2", "mamba_2": "mamba2",
    "sliding_window": "sliding_window_attention", "swa": "sliding_window_attention",
    "window": "sliding_window_attention", "local_attention": "sliding_window_attention",
    "xformers": "xformers_attention", "memory_efficient_attention": "xformers_attention",
    "mea": "xformers_attention",
}
_HYBRID_COLOURS = ("#9467bd", "#d62728", "#e377c2", "#5e3c99", "#a50f15", "#c51b7d")  # purples and reds
_OTHER_COLOURS = ("#bcbd22", "#7f7f7f", "#393b79", "#637939", "#e7ba52", "#17a589", "#843c39", "#3182bd")
_FAMILY_ORDER = ("attention", "sliding_window_attention", "xformers_attention", "mamba", "mamba2", "hybrid")
_PATTERN_FAMILIES = {"A": "attention", "M": "mamba", "S": "mamba2", "W": "sliding_window_attention",
                     "X": "xformers_attention"}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")

FamilyOf = Callable[[Any], str]


def _canonical(family: str) -> str:
    key = family.strip().lower().replace("-", "_").replace(" ", "_")
    return _ALIASES.get(key, key)


def _stable_index(text: str, n: int) -> int:
    return int(hashlib.md5(text.encode()).hexdigest(), 16) % n


def family_colour(family: str) -> str:
    """The one colour of ``family`` in every figure (hex). Known families have fixed colours (attention
    blue, mamba orange, mamba2 green, hybrids purple/red, sliding window brown, xformers cyan); any other
    name gets a deterministic colour from its hash (the same in every run and process)."""
    key = _canonical(family)
    if key in FAMILY_COLOURS:
        return FAMILY_COLOURS[key]
    if key.startswith("hybrid"):
        return _HYBRID_COLOURS[_stable_index(key, len(_HYBRID_COLOURS))]
    return _OTHER_COLOURS[_stable_index(key, len(_OTHER_COLOURS))]


_SHADES = {  # variants of a known family (attention-rope, attention-alibi, ...): shades of its hue
    "attention": ("#08519c", "#6baed6", "#1f3b73", "#3182bd", "#9ecae1", "#2b8cbe"),
    "mamba": ("#d94801", "#fdae6b", "#a63603", "#fd8d3c", "#7f2704", "#f16913"),
    "mamba2": ("#006d2c", "#74c476", "#238b45", "#a1d99b", "#00441b", "#41ab5d"),
    "sliding_window_attention": ("#8c564b", "#c49c94", "#5b3a29", "#a0522d"),
    "xformers_attention": ("#17becf", "#0e7c86", "#9edae5", "#138d90"),
}


def _base_family(key: str) -> str:
    """``attention_rope`` → ``attention``; ``hybrid_mmma`` → ``hybrid``; an unrelated name → ``other``."""
    for name in sorted(FAMILY_COLOURS, key=len, reverse=True):
        if key.startswith(name) and key[len(name):][:1] in ("_", "("):
            return name
    return "other"


def family_colours(families: Iterable[str]) -> dict[str, str]:
    """Colours for the families of one report, all different: known families keep their fixed colour
    (`family_colour`), variants of one get shades of its hue, hybrids purples and reds, other names the
    remaining palette — assigned in sorted order, so the same set of families always gets the same colours."""
    out: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    for fam in sorted(set(families), key=family_sort_key):
        key = _canonical(fam)
        if key in FAMILY_COLOURS:
            out[fam] = FAMILY_COLOURS[key]
        else:
            groups.setdefault(_base_family(key), []).append(fam)
    for base, members in groups.items():
        palette = _SHADES.get(base) or (_HYBRID_COLOURS if base == "hybrid" else _OTHER_COLOURS)
        free = [c for c in palette if c not in out.values()] or list(palette)
        for i, fam in enumerate(members):
            out[fam] = free[i % len(free)]
    return out


def family_sort_key(family: str) -> tuple[int, str]:
    key = _canonical(family)
    for i, name in enumerate(_FAMILY_ORDER):
        if key == name or (name == "hybrid" and key.startswith("hybrid")):
            return i, key
    return len(_FAMILY_ORDER), key


def _period(pattern: str) -> str:
    """The shortest unit that tiles to ``pattern`` (``MMMAMMMA`` → ``MMMA``; ``MMMAMM`` → ``MMMA``)."""
    for n in range(1, len(pattern) + 1):
        unit = pattern[:n]
        if (unit * (len(pattern) // n + 1))[: len(pattern)] == pattern:
            return unit
    return pattern


def layer_pattern(record: TrialRecord) -> str | None:
    """A trial's layers as a pattern string: recorded in its summary, else tiled from its config."""
    if record.summary is not None and record.summary.layer_pattern:
        return str(record.summary.layer_pattern)
    model = record.config.get("model", {})
    pattern = record.params.get("model.pattern") or model.get("pattern")
    n_layers = record.params.get("model.n_layers") or model.get("n_layers")
    if pattern and isinstance(n_layers, int):
        return tile_pattern(pattern, n_layers)
    return pattern


def _mixers(record: TrialRecord) -> list[str]:
    layers = ((record.summary.model if record.summary else None) or {}).get("resolved_layers") or []
    return [layer.get("mixer", "?") for layer in layers if isinstance(layer, dict)]


def layers_text(record: TrialRecord) -> str | None:
    """The table's "layers": the pattern, or the mixers' names where a layer has no legend letter."""
    pattern = layer_pattern(record)
    return archs_layers_text(pattern, _mixers(record)) if pattern else pattern


def default_family(trial: Any) -> str:
    """A trial's family (a `TrialRecord` or an Optuna trial): its ``variant`` parameter when the recipe has
    variants, else from its layer pattern (all ``A`` → attention, all ``M`` → mamba, all ``S`` → mamba2, all
    ``W`` → sliding_window_attention, all ``X`` → xformers_attention, mixed → ``hybrid <unit>``), else its
    configured mixer."""
    record = trial if isinstance(trial, TrialRecord) else read_trial(trial)
    if "variant" in record.params:
        return str(record.params["variant"])
    pattern = layer_pattern(record)
    mixers = _mixers(record)
    if pattern and "?" in pattern and mixers:  # a plugin without a legend letter: its name
        return mixers[0] if len(set(mixers)) == 1 else "hybrid " + "+".join(dict.fromkeys(mixers))
    if pattern:
        if len(set(pattern)) == 1:
            return _PATTERN_FAMILIES.get(pattern[0], pattern[0])
        return f"hybrid {_period(pattern)}"
    model = record.config.get("model", {})
    return str(record.params.get("model.mixer") or model.get("mixer") or "unknown")
