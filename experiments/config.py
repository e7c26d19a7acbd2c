"""Run configuration: TOML files with ``[model]``, ``[train]`` and ``[data]`` tables, plus ``key=value``
overrides from the command line — all validated into specs before anything runs.

    [model]                       # ModelSpec fields, or preset = "jamba" plus overrides
    preset = "transformer"
    d_model = 128
    [train]                       # TrainSpec fields
    steps = 300
    [data]                        # DataSpec: corpus = "stdlib" | task = "mqar", options = {...}
    task = "mqar"
    options = { num_kv_pairs = 4 }

Overrides address any field by a dotted path: ``model.d_model=256 train.lr=1e-3 data.options.seq_len=64``;
values are TOML literals (``true``, ``[1, 2]``, ``"text"``), bare words are strings.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

from archs.model import ModelSpec, SpecError
from experiments.train import DataSpec, RunError, TrainSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ConfigError", "apply_overrides", "build_specs", "load_toml", "parse_value", "set_path"]

SECTIONS = ("model", "train", "data")


class ConfigError(ValueError):
    """A bad config file, override or value; the message names the key and the fix."""


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}") from None


def parse_value(text: str) -> Any:
    """A TOML literal (``3``, ``1e-3``, ``true``, ``[1, 2]``, ``{a = 1}``, ``"s"``), a JSON object or array
    (``{"mamba2": {"d_state": 64}}``, as people type them in a shell), or else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    if text.lstrip()[:1] in ("{", "["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass  # e.g. a glob such as [ab]*.txt: a bare string
    return text


def set_path(config: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``config[a][b][c] = value`` for ``"a.b.c"``, creating tables on the way."""
    keys = dotted.split(".")
    if any(not k for k in keys):
        raise ConfigError(f"bad key {dotted!r}: write it as section.field, e.g. model.d_model")
    node = config
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {dotted!r}: {k!r} is a value ({nxt!r}), not a table")
        node = nxt
    node[keys[-1]] = value


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``config`` with ``key=value`` overrides applied."""
    out = copy.deepcopy(config)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value (e.g. model.d_model=256)")
        key = key.strip()
        if key.split(".")[0] not in SECTIONS:
            raise ConfigError(f"override {item!r}: the key must start with one of {', '.join(SECTIONS)} "
                              f"(e.g. train.steps=100)")
        set_path(out, key, parse_value(value.strip()))
    return out


def build_specs(config: dict[str, Any]) -> tuple[ModelSpec, TrainSpec, DataSpec]:
    """Validate a ``{"model", "train", "data"}`` config into the three specs."""
    unknown = set(config) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"unknown config section(s) {', '.join(sorted(unknown))}; sections: {', '.join(SECTIONS)}")
    model_cfg = dict(config.get("model", {}))
    try:
        preset = model_cfg.pop("preset", None)
        model = ModelSpec.from_preset(preset, **model_cfg) if preset else ModelSpec.from_dict(model_cfg)
    except TypeError as exc:
        raise ConfigError(f"[model]: {exc}") from None
    except (SpecError, KeyError, ValueError) as exc:
        raise ConfigError(f"[model]: {exc}") from None
    try:
        train = TrainSpec.from_dict(dict(config.get("train", {})))
        data = DataSpec.from_dict(dict(config.get("data", {})))
    except (RunError, TypeError) as exc:
        raise ConfigError(str(exc)) from None
    return model, train, data
