"""Every setting of a check (`CheckPlan`), validated by `make_plan` before anything runs or is written, and
`Parts`, the finished pieces of a check on disk.

A check compares one mixer (a registered name or ``package.module:Class``, with its options) with the
baselines ``attention`` (torch SDPA) and ``mamba`` at the same width. Its costs are measured in fresh
processes; its quality probe trains one 2-layer model per subject and task. Each finished piece — one
subject's time and memory curve, its decoding curve, one probe run's result — is written to
``DIR/parts/<key>.json`` with the inputs it was made from, so an interrupted check rerun into the same
directory redoes only what was not finished (the probe runs resume from their own checkpoints). A directory
that holds a check with other settings, or of a mixer whose source has changed since, is refused before
anything is written: its card stays as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.errors import UsageError
from experiments.runs import write_json

__all__ = ["BASELINES", "PROBE_TASKS", "CheckPlan", "Parts", "fingerprint", "make_plan"]

BASELINES = ("attention", "mamba")

#: the quality probe's tasks: short, seeded and solvable by a 2-layer attention model in a few hundred steps
PROBE_TASKS: dict[str, dict[str, Any]] = {
    "mqar": {"options": {"vocab_size": 64, "num_kv_pairs": 4, "test_seq_lens": [64], "test_num_kv_pairs": [4],
                         "test_examples": 128}, "seq_len": 64,
             "what": "multi-query associative recall (Zoology): 4 key-value pairs in 64 tokens, vocab 64"},
    "induction": {"options": {"vocab_size": 16, "test_multipliers": [1, 4], "test_examples": 128}, "seq_len": 64,
                  "what": "induction heads (H3, Mamba): recall the token after the trigger's first occurrence, "
                          "vocab 16, trained at 64, tested at 64 and 256"},
}


@dataclass(frozen=True)
class CheckPlan:
    """What one check runs. ``subjects`` are the mixer under check first, then the baselines (a baseline that
    is the mixer under check is not repeated)."""

    mixer: str
    options: dict[str, Any] = field(default_factory=dict)
    d_model: int = 64
    seed: int = 0
    contract_only: bool = False
    lengths: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)  # time and memory vs T (batch 1)
    modes: tuple[str, ...] = ("fwd", "fwdbwd")
    contexts: tuple[int, ...] = (256, 1024, 4096)  # decoding after these contexts
    decode_steps: int = 32
    budget_gb: float = 4.0  # the largest T whose forward+backward peak fits
    repeats: int = 3
    threads: int | None = None  # torch threads of each cost measurement (None: torch's default)
    tasks: tuple[str, ...] = ("mqar", "induction")
    probe_steps: int = 500
    probe_lr: float = 1e-2
    probe_batch: int = 32
    jobs: int = 2  # probe runs at a time, one thread each
    timeout: float = 1800.0  # seconds per measurement process or probe run
    code: str = ""  # `fingerprint` of the mixer's source

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.mixer}({opts})" if opts else self.mixer

    @property
    def subjects(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(label, mixer, options) of every model the check measures, the mixer under check first."""
        out = [(self.label, self.mixer, dict(self.options))]
        out += [(b, b, {}) for b in BASELINES if b != self.mixer]
        return out

    def settings(self) -> dict[str, Any]:
        """What a finished check's results depend on (``contract_only`` aside: a full check may follow a
        contract-only one in the same directory)."""
        out = dataclasses.asdict(self)
        out.pop("contract_only")
        return json.loads(json.dumps(out))

    def probe_run(self, subject: tuple[str, str, dict[str, Any]], task: str) -> dict[str, Any]:
        """The model, train and data dicts of one probe run: 2 layers, no MLP, a short convolution of 4 before
        each mixer (as in Zoology's and the MQAR recipe's models), RoPE for attention and no positions
        otherwise, early stopping at 0.99 test accuracy."""
        _label, mixer, options = subject
        cfg = PROBE_TASKS[task]
        model = {"d_model": self.d_model, "n_layers": 2, "n_heads": 2 if self.d_model % 2 == 0 else 1,
                 "mixer": mixer, "mixer_options": {mixer: options} if options else {}, "mlp": "none",
                 "short_conv": 4, "positions": "rope" if mixer == "attention" else "none"}
        train = {"steps": self.probe_steps, "batch_size": self.probe_batch, "seq_len": cfg["seq_len"],
                 "lr": self.probe_lr, "warmup_steps": min(30, self.probe_steps // 10),
                 "eval_interval": max(1, min(50, self.probe_steps // 4)), "target_accuracy": 0.99,
                 "seed": self.seed, "device": "cpu", "log_interval": 10}
        return {"model": model, "train": train, "data": {"task": task, "options": dict(cfg["options"])}}


def fingerprint(mixer: str) -> str:
    """A short hash of the source file that defines ``mixer`` (a registered name or an import path): a
    finished piece of a check is reused only while it is unchanged."""
    from registry import MIXERS

    cls = MIXERS.get(mixer)
    try:
        source = Path(inspect.getsourcefile(cls) or "").read_bytes()
    except (OSError, TypeError):
        source = repr(cls).encode()
    return hashlib.sha256(source).hexdigest()[:12]


def _positive_ints(values: Any, flag: str) -> tuple[int, ...]:
    out = tuple(sorted(set(values)))
    if not out or any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in out):
        raise UsageError(f"{flag} {','.join(map(str, values))}: give positive integers, e.g. {flag} 512,1024,2048")
    return out


def make_plan(mixer: str, options: dict[str, Any] | None = None, *, out: str | os.PathLike | None = None,
              **settings: Any) -> CheckPlan:
    """A validated `CheckPlan`: the mixer and its options build (on the meta device), every cost measurement
    and probe run is well formed, and ``out`` (when given) is a directory this check may write to. Raises a
    `MixerlabError` naming the field and the fix; nothing has run or been written then."""
    from experiments.targets import resolve_target

    options = dict(options or {})
    target = resolve_target(mixer=mixer, options=options, d_model=settings.get("d_model", 64))
    for flag, name in (("--lengths", "lengths"), ("--contexts", "contexts")):
        if name in settings:
            settings[name] = _positive_ints(settings[name], flag)
    for name in ("modes", "tasks"):
        if name in settings:
            settings[name] = tuple(settings[name])
    plan = CheckPlan(mixer=mixer, options=target["options"], code=fingerprint(mixer), **settings)
    for flag, name in (("--decode-steps", "decode_steps"), ("--repeats", "repeats"), ("--jobs", "jobs"),
                       ("--probe-steps", "probe_steps"), ("--probe-batch", "probe_batch"), ("--threads", "threads"),
                       ("--seed", "seed")):
        value = getattr(plan, name)
        if value is not None and (not isinstance(value, int) or value < (0 if name == "seed" else 1)):
            raise UsageError(f"{flag} {value!r}: must be a {'non-negative' if name == 'seed' else 'positive'} integer")
    for flag, name in (("--budget-gb", "budget_gb"), ("--probe-lr", "probe_lr"), ("--timeout", "timeout")):
        if not getattr(plan, name) > 0:
            raise UsageError(f"{flag} {getattr(plan, name)!r}: must be a positive number")
    unknown = [t for t in plan.tasks if t not in PROBE_TASKS]
    if unknown or not plan.tasks:
        raise UsageError(f"--tasks {','.join(plan.tasks)}: the probe's tasks are {', '.join(PROBE_TASKS)}")
    if not plan.contract_only:
        _check_runs(plan)
    if out is not None:
        Parts(out).check_settings(plan)
    return plan


def _check_runs(plan: CheckPlan) -> None:
    """Every cost target and probe run validates (the models build on the meta device, the tasks fit)."""
    from archs.model import ModelSpec
    from experiments.config import DataSpec, TrainSpec
    from experiments.targets import resolve_target
    from experiments.train import plan as plan_run
    from registry import MixerlabError

    for subject in plan.subjects:
        resolve_target(mixer=subject[1], options=subject[2], d_model=plan.d_model)
        for task in plan.tasks:
            run = plan.probe_run(subject, task)
            try:
                plan_run(ModelSpec.from_dict(run["model"]), TrainSpec.from_dict(run["train"]),
                         DataSpec.from_dict(run["data"]))
            except MixerlabError as exc:
                raise UsageError(f"the quality probe's {task} model of {subject[0]} at --d-model {plan.d_model} "
                                 f"does not build: {exc} (use --contract-only, or another --d-model)") from exc


class Parts:
    """The finished pieces of a check in ``DIR/parts``, each stored with the inputs it was made from."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.dir = self.out / "parts"

    def check_settings(self, plan: CheckPlan) -> None:
        """Refuse a directory that is not one, or that holds a check with other settings or older code."""
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"--out {self.out}: is a file, not a directory; give a directory for the report card")
        card = self.out / "check.json"
        if not card.is_file():
            if self.out.is_dir() and any(self.out.iterdir()):
                raise UsageError(f"--out {self.out}: the directory holds other files and no check; give an empty "
                                 "or new directory")
            return
        try:
            old = json.loads(card.read_text()).get("settings", {})
        except (OSError, ValueError):
            old = {}
        new = plan.settings()
        changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v]
        if changed:
            what = ("the mixer's source changed since" if any(c.startswith("code ") for c in changed)
                    else "other settings")
            raise UsageError(f"--out {self.out} holds a check of {old.get('mixer', '?')} with {what} "
                             f"({'; '.join(changed)}); give another --out (a rerun resumes only the same check)")

    def get(self, key: str, inputs: dict[str, Any]) -> Any:
        path = self.dir / f"{key}.json"
        if not path.is_file():
            return None
        try:
            stored = json.loads(path.read_text())
        except ValueError:
            return None
        return stored["result"] if stored.get("inputs") == json.loads(json.dumps(inputs)) else None

    def put(self, key: str, inputs: dict[str, Any], result: Any) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / f"{key}.json", {"inputs": inputs, "result": result})


def safe_name(text: str) -> str:
    """``pkg.mod:Class(a=1)`` -> ``pkg.mod-Class-a=1``: a label usable as a file name."""
    keep = "".join(c if c.isalnum() or c in "._=-" else "-" for c in text)
    return "-".join(p for p in keep.split("-") if p) or "mixer"
