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

`TrainSpec` (how to train) and `DataSpec` (what on) live here beside `ModelSpec`'s loader; `resolve_device`
is the one reading of a device name.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from archs.model import ModelSpec, SpecError
from experiments.errors import ConfigError, RunError, UsageError
from registry import check_fields, check_types

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ConfigError", "DataSpec", "TrainSpec", "apply_overrides", "build_specs", "load_toml", "parse_value",
           "resolve_device", "set_path"]

SECTIONS = ("model", "train", "data")


def _fields_error(cls: type, data: dict[str, Any]) -> None:
    check_fields(cls.__name__, data, [f.name for f in dataclasses.fields(cls)], RunError)


@dataclass(frozen=True)
class TrainSpec:
    """How to train. Every field has a CPU-friendly default."""

    steps: int = 300  # optimiser steps (ignored when `tokens` is set)
    tokens: int | None = None  # token budget: steps = ceil(tokens / (batch_size * seq_len))
    batch_size: int = 16
    seq_len: int = 256  # corpus windows; a task's own seq_len defaults to this
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1  # not on norms, biases, embeddings' positions, A_log, D, dt biases
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    seed: int = 0
    precision: str = "auto"  # auto (fp32 on CPU, bf16 autocast on CUDA) | fp32 | bf16
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto | cpu | cuda
    eval_interval: int = 100  # steps between evaluations (and checkpoints); the last step always evaluates
    eval_batches: int = 8  # corpus: windows batches of validation; tasks: ignored (fixed test set)
    eval_examples: int | None = None  # tasks: examples per test slice (default: the task's own)
    target_accuracy: float | None = None  # tasks: stop once an evaluation reaches this test accuracy
    log_interval: int = 10
    grad_accum: int = 1  # micro-batches per optimiser step (per rank); the global batch stays batch_size
    parallel: str = "auto"  # over several ranks (torchrun): ddp | fsdp; auto = ddp
    collective_timeout_s: float = 300.0  # a rank silent this long ends the run (several ranks only)
    log_to: list[str] = field(default_factory=list)  # trackers: tensorboard, mlflow, wandb (experiments.trackers)
    init_from: str | None = None  # fine-tune: a run directory whose weights start this run (same parameter shapes)

    #: how the run is spread over processes, not what it computes: a resumed run may change them
    EXECUTION: ClassVar[tuple[str, ...]] = ("grad_accum", "parallel", "collective_timeout_s", "log_to")

    def __post_init__(self) -> None:
        check_types("TrainSpec", self, RunError)

        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise RunError(f"TrainSpec.{name}={getattr(self, name)!r}: {msg}")

        for name in ("steps", "batch_size", "seq_len", "eval_interval", "eval_batches", "log_interval", "grad_accum"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive int")
        for name in ("batch_size", "seq_len", "eval_examples"):
            need((getattr(self, name) or 0) < 2**31, name, "must be below 2^31")
        need(self.tokens is None or (isinstance(self.tokens, int) and self.tokens > 0), "tokens",
             "must be a positive int or None")
        need(math.isfinite(self.lr) and self.lr > 0, "lr", "must be a positive number, e.g. 3e-3")
        for name in ("beta1", "beta2"):
            need(0 <= getattr(self, name) < 1, name, "must be in [0, 1) (AdamW's moment decay, e.g. 0.9)")
        need(0 <= self.seed < 2**63, "seed", "must be an integer in [0, 2^63)")
        need(self.eval_examples is None or self.eval_examples > 0, "eval_examples", "must be positive or None")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(math.isfinite(self.grad_clip) and self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 turns clipping off)")
        need(self.precision in ("auto", "fp32", "bf16"), "precision", "must be auto, fp32 or bf16")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device",
             "must be auto, cpu or cuda[:N]")
        need(self.parallel in ("auto", "ddp", "fsdp"), "parallel",
             "must be auto, ddp (every rank holds the model) or fsdp (parameters sharded over the ranks)")
        need(math.isfinite(self.collective_timeout_s) and self.collective_timeout_s > 0, "collective_timeout_s",
             "must be a positive number of seconds")
        need(self.target_accuracy is None or 0 < self.target_accuracy <= 1, "target_accuracy",
             "must be in (0, 1] or None (train every step)")
        need(self.init_from is None or bool(self.init_from.strip()), "init_from",
             "must be a run directory (spec.json + checkpoint.pt) or None (random initialisation)")

    @property
    def total_steps(self) -> int:
        if self.tokens is not None:
            return max(1, math.ceil(self.tokens / (self.batch_size * self.seq_len)))
        return self.steps

    def lr_at(self, step: int) -> float:
        """Linear warm-up to ``lr``, then cosine down to ``lr * min_lr_ratio`` at the last step."""
        total = self.total_steps
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, total - self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainSpec:
        _fields_error(cls, data)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DataSpec:
    """What to train on: a corpus (``corpus="stdlib"`` etc.) or a synthetic task (``task="mqar"``)."""

    corpus: str | None = "stdlib"
    task: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # the corpus's or the task's options
    tokenizer: str = "bytes"  # corpora: "bytes" or a local Hugging Face tokenizer directory

    def __post_init__(self) -> None:
        check_types("DataSpec", self, RunError)
        if self.task is not None and self.tokenizer != "bytes":
            raise RunError(f"DataSpec.tokenizer={self.tokenizer!r} with task {self.task!r}: synthetic tasks make "
                           f"their own token ids; a tokenizer applies to a corpus (drop data.tokenizer)")
        if self.task is not None and self.corpus is not None and self.corpus != "stdlib":
            raise RunError(f"DataSpec: give a corpus or a task, not both (corpus={self.corpus!r}, "
                           f"task={self.task!r})")
        if self.task is not None:
            object.__setattr__(self, "corpus", None)
        if self.task is None and self.corpus is None:
            raise RunError("DataSpec: give a corpus (e.g. 'stdlib') or a task (e.g. 'mqar')")
        object.__setattr__(self, "options", json.loads(json.dumps(self.options)))

    @property
    def kind(self) -> str:
        """``"task"`` or ``"corpus"``: what the run trains on, and so how it is evaluated and which metrics
        it has (accuracy, or validation loss and bits per byte)."""
        return "task" if self.task is not None else "corpus"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataSpec:
        _fields_error(cls, data)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_device(name: str) -> Any:
    """The torch device a name means: ``auto`` (CUDA when there is one, else the CPU), ``cpu``, ``cuda[:N]``."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise UsageError(f"device {name!r}: use auto, cpu or cuda[:N]")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {name!r}, but no CUDA device is available here; use auto or cpu")
    return torch.device(name)


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
        model.check_builds()
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
