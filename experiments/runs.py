"""What a run records, and the files of a run directory.

`TrialSummary` is the one record of a training run: `train` writes it to ``summary.json``, a study trial adds
its long-context measurements and stores it on the Optuna trial, reports read it back. Everything that
crosses a module boundary about a run goes through it (`to_json` / `from_json`), so writers and readers
cannot drift. `from_json` also reads the records of earlier versions (``peak_memory_mb``, a nested
``dataset``), so old studies still report.

Also here: atomic writes (`write_json`, `save_torch`), `machine_info` and `load_run`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from experiments.errors import RunError
from experiments.metrics import ALIASES

__all__ = ["STATUSES", "TrialSummary", "atomic_write", "available_bytes", "check_init_from", "curve_point", "load_run",
           "load_weights", "machine_info", "run_specs", "save_torch", "write_json", "write_text"]

#: how a run ended: every step done (or the target accuracy reached); a non-finite loss; stopped by a pruner;
#: stopped by Ctrl-C, SIGTERM or a lost coordinator (resumable); stopped on purpose at ``stop_at``
STATUSES = ("completed", "diverged", "pruned", "interrupted", "stopped")
#: what the peak memory figure covers: the training steps above a baseline taken once the data was ready
#: and before the model was built (this version); the whole trial process from before the data was loaded
#: (studies written before it)
SCOPE_STEPS, SCOPE_TRIAL = "training steps", "whole trial"
_MACHINE_KEYS = ("cpu", "torch", "cuda_device", "torch_threads")
_MAX_BY_CHARS = 4000  # per-slice accuracies bigger than this stay in summary.json, out of the study


def curve_point(step: int, tokens: int, metrics: dict[str, Any], seq_len: int | None) -> dict[str, Any]:
    """One point of a run's learning curve: the step, the tokens seen and the evaluation's scalar metrics.

    Every evaluation during training measures the test slices at the training length ``seq_len``; the final
    one of an extrapolation task measures every length too. Its point keeps the curve on the training length
    (``accuracy`` from its ``by.seq_len``, the same slices pooled the same way) and carries the all-lengths
    figures as ``accuracy_all_lengths`` and ``exact_match_all_lengths``, so a curve does not drop at its end
    because the last evaluation measured something else."""
    point = {"step": step, "tokens": tokens, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    lengths = (metrics.get("by") or {}).get("seq_len") or {}
    at_train = next((v for k, v in lengths.items() if str(k) == str(seq_len)), None)
    if len(lengths) > 1 and isinstance(at_train, (int, float)):
        for key in ("accuracy", "exact_match"):
            if key in point:
                point[f"{key}_all_lengths"] = point.pop(key)
        point["accuracy"] = at_train
    return point


@dataclass
class TrialSummary:
    """How one training run went: status, metrics, costs, where it ran and what it was."""

    status: str
    steps: int = 0
    total_steps: int = 0
    target_reached_step: int | None = None  # the evaluation step that reached TrainSpec.target_accuracy
    tokens: int = 0
    final: dict[str, Any] = field(default_factory=dict)  # the last evaluation (val_bpb, ... or accuracy, by)
    evals: list[dict[str, Any]] = field(default_factory=list)  # {"step", "tokens", scalar metrics} per eval
    train_seconds: float = 0.0
    wall_seconds: float | None = None
    tokens_per_s: float | None = None
    params: int | None = None
    params_non_embedding: int | None = None
    flops_per_token: int | None = None
    state_bytes: int | None = None
    backends: dict[str, Any] = field(default_factory=dict)  # "layer:mixer" -> the backend that ran
    device: str | None = None
    precision: str | None = None
    peak_memory_mib: float | None = None
    memory_method: str | None = None
    memory_scope: str | None = None  # SCOPE_STEPS or SCOPE_TRIAL
    memory_split: dict[str, int] | None = None  # bytes: params, grads, optimizer, activations_saved
    corpus_hash: str | None = None
    unigram_bpb: float | None = None
    task: str | None = None
    layer_pattern: str | None = None
    model: dict[str, Any] | None = None  # the resolved ModelSpec (its to_dict)
    train: dict[str, Any] | None = None  # the TrainSpec
    data: dict[str, Any] | None = None  # the DataSpec
    dataset: dict[str, Any] | None = None  # the corpus's or task's full description (summary.json only)
    machine: dict[str, Any] = field(default_factory=dict)
    measure: dict[str, Any] = field(default_factory=dict)  # long-context measurements: memory, decode, context
    distributed: dict[str, Any] | None = None  # several ranks: world_size, backend, parallel, grad_accum

    def value(self, name: str) -> float | None:
        """The metric ``name`` (`experiments.metrics`): from the final evaluation, else the summary's field."""
        name = ALIASES.get(name, name)
        for v in (self.final.get(name), getattr(self, name, None)):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
        return None

    @property
    def d_model(self) -> int | None:
        return (self.model or {}).get("d_model")

    @property
    def n_layers(self) -> int | None:
        return (self.model or {}).get("n_layers")

    def to_json(self, *, for_study: bool = False) -> dict[str, Any]:
        """A JSON-ready dict. ``for_study``: the form stored on an Optuna trial — without the dataset's full
        description and the measurements (stored beside it), the machine in four fields, and large per-slice
        accuracies left to ``summary.json``."""
        out = json.loads(json.dumps(dataclasses.asdict(self), default=str))
        if for_study:
            for key in ("dataset", "measure"):
                out.pop(key)
            out["machine"] = {k: self.machine.get(k) for k in _MACHINE_KEYS}
            if len(json.dumps(out["final"].get("by", {}))) >= _MAX_BY_CHARS:
                out["final"].pop("by")
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], measure: dict[str, Any] | None = None) -> TrialSummary:
        """Read a summary written by this or an earlier version; unknown keys are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "peak_memory_mb" in data and "peak_memory_mib" not in data:  # before the memory fix
            values["peak_memory_mib"] = data["peak_memory_mb"]
            values.setdefault("memory_scope", SCOPE_TRIAL)
        dataset = data.get("dataset") or {}
        if "corpus" in dataset:
            values.setdefault("corpus_hash", dataset["corpus"].get("content_hash"))
            values.setdefault("unigram_bpb", dataset.get("unigram_bpb"))
        if "task" in dataset:
            values.setdefault("task", dataset["task"].get("task"))
        if measure:
            values["measure"] = measure
        for key in ("final", "backends", "machine", "measure"):
            if values.get(key) is None:
                values.pop(key, None)
        evals, final = list(values.get("evals") or []), values.get("final") or {}
        if evals and "accuracy_all_lengths" not in evals[-1] and evals[-1].get("step") == values.get("steps"):
            # written before curve_point: the last point was the final all-lengths evaluation's mean
            last = evals[-1]
            metrics = {k: v for k, v in last.items() if k not in ("step", "tokens")}
            evals[-1] = curve_point(last["step"], last.get("tokens", 0), {**metrics, "by": final.get("by")},
                                    (values.get("train") or {}).get("seq_len"))
            values["evals"] = evals
        values.setdefault("status", "unknown")
        return cls(**values)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Write a file atomically: ``write(f)`` fills a temporary file beside ``path`` (flushed to disk), which
    then replaces ``path``. A reader sees the old file or the new one, never half of one; a failure leaves
    the old file as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; run files are shared like any other
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save`, atomically."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def machine_info() -> dict[str, Any]:
    """Where a result was measured."""
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["memory_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def available_bytes(device: Any = "cpu") -> int | None:
    """Memory free for a new allocation on ``device``: MemAvailable on the CPU (Linux), the CUDA device's free
    memory; None where it cannot be read."""
    if str(device).startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_specs(run_dir: str | os.PathLike, what: str = "pass the --out of a training run") -> dict[str, Any]:
    """The specs of a run directory that holds a checkpoint (``{"model", "train", "data", ...}``); ``what`` ends
    the message when it is not one."""
    run = Path(run_dir)
    if not (run / "spec.json").is_file():
        raise RunError(f"{run} is not a run directory (no spec.json); {what}")
    if not (run / "checkpoint.pt").is_file():
        raise RunError(f"{run} has no checkpoint.pt (the run saved no evaluation yet); {what}")
    return json.loads((run / "spec.json").read_text())


def load_weights(run_dir: str | os.PathLike, model: Any) -> int | None:
    """Load a run's checkpointed weights into ``model`` (built from its spec, not yet wrapped for several
    ranks), whichever way they were written (one file, or FSDP's shards); return the checkpoint's step."""
    import torch

    run = Path(run_dir)
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    if "sharded" in ckpt:  # written by FSDP ranks: a torch.distributed.checkpoint directory beside it
        from experiments.distributed import World, load_state

        load_state(ckpt, run, model, None, World())
    else:
        model.load_state_dict(ckpt["model"])
    return ckpt.get("step")


def check_init_from(model_spec: Any, init_from: str, data_vocab: int) -> None:
    """A fine-tuning run starts from ``init_from``'s weights: they must exist, fit the model parameter by
    parameter, and embed every token id of the data (a padded vocabulary may be larger than the tokenizer)."""
    import torch

    from archs.model import LanguageModel, ModelSpec

    source = run_specs(init_from, "TrainSpec.init_from must name a run directory (from train or import-hf)")
    try:
        theirs = ModelSpec.from_dict(source["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise RunError(f"TrainSpec.init_from={init_from!r}: its spec.json holds no readable model spec "
                       f"({exc})") from exc
    if data_vocab > model_spec.vocab_size:
        raise RunError(f"TrainSpec.init_from={init_from!r}: the data has {data_vocab} token ids but the model embeds "
                       f"{model_spec.vocab_size}; tokenize with the run's own tokenizer (data.tokenizer="
                       f"{source.get('data', {}).get('tokenizer', 'bytes')!r})")
    with torch.device("meta"):
        ours, start = LanguageModel(model_spec).state_dict(), LanguageModel(theirs).state_dict()

    def shape(t: Any) -> str:
        return "absent" if t is None else f"of shape {tuple(t.shape)}"

    for name in sorted(ours.keys() | start.keys()):
        a, b = ours.get(name), start.get(name)
        if a is None or b is None or a.shape != b.shape:
            raise RunError(f"TrainSpec.init_from={init_from!r}: parameter {name} is {shape(b)} there and "
                           f"{shape(a)} in this model; fine-tuning keeps the architecture: drop the model changes "
                           f"that alter shapes (its model spec is {init_from}/spec.json)")


def load_run(run_dir: str | os.PathLike, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """The trained model of a run directory (``spec.json`` + ``checkpoint.pt``), in eval mode, and its specs
    (``{"model", "train", "data", "step"}``)."""
    from archs.model import LanguageModel, ModelSpec

    specs = run_specs(run_dir)
    model = LanguageModel(ModelSpec.from_dict(specs["model"]))
    specs["step"] = load_weights(run_dir, model)
    return model.to(device).eval(), specs
