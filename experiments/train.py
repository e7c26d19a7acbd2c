"""Training: one model on one corpus or synthetic task, with evaluation, checkpoints and a summary.

``train(model_spec, train_spec, data_spec, out_dir)`` writes to ``out_dir``:

- ``spec.json``: the three specs (a rerun into the same directory must match it, and then resumes);
- ``metrics.jsonl``: one JSON line per log or eval event (``{"event": "train"|"eval", "step": ...}``);
- ``checkpoint.pt``: model, optimiser, schedule and RNG state, written atomically (temp file, rename);
- ``summary.json``: specs, final metrics, status (``completed``, ``diverged``, ``pruned``, ``stopped``),
  the step at which a task run reached ``TrainSpec.target_accuracy`` (it ends there), the backend each
  layer ran, machine, torch version, data identity (corpus hash) and wall time.

Batches are a pure function of ``(seed, step)``, so a run resumed from a checkpoint follows exactly the loss
curve of an uninterrupted one, and the same seed on the same machine gives the same curve.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from archs.model import LanguageModel, ModelSpec
from registry import check_fields

__all__ = ["DataSpec", "Pruned", "RunError", "TrainSpec", "build_data", "train"]

STATUSES = ("completed", "diverged", "pruned", "stopped")


class RunError(ValueError):
    """A bad spec or run directory; raised before any training starts. The message names the fix."""


class Pruned(Exception):
    """Raised by an eval callback to stop a run early (an Optuna pruner said so)."""


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

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise RunError(f"TrainSpec.{name}={getattr(self, name)!r}: {msg}")

        for name in ("steps", "batch_size", "seq_len", "eval_interval", "eval_batches", "log_interval"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive int")
        need(self.tokens is None or (isinstance(self.tokens, int) and self.tokens > 0), "tokens",
             "must be a positive int or None")
        need(self.lr > 0, "lr", "must be positive")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 turns clipping off)")
        need(self.precision in ("auto", "fp32", "bf16"), "precision", "must be auto, fp32 or bf16")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device",
             "must be auto, cpu or cuda[:N]")
        need(self.target_accuracy is None or 0 < self.target_accuracy <= 1, "target_accuracy",
             "must be in (0, 1] or None (train every step)")

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

    def __post_init__(self) -> None:
        if self.task is not None and self.corpus is not None and self.corpus != "stdlib":
            raise RunError(f"DataSpec: give a corpus or a task, not both (corpus={self.corpus!r}, "
                           f"task={self.task!r})")
        if self.task is not None:
            object.__setattr__(self, "corpus", None)
        if self.task is None and self.corpus is None:
            raise RunError("DataSpec: give a corpus (e.g. 'stdlib') or a task (e.g. 'mqar')")
        object.__setattr__(self, "options", json.loads(json.dumps(self.options)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataSpec:
        _fields_error(cls, data)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _CorpusData:
    """Random training windows and sequential validation windows of a corpus."""

    def __init__(self, spec: DataSpec, train: TrainSpec):
        from experiments.data import load_corpus

        self.corpus = load_corpus(spec.corpus, **spec.options)
        self.vocab_size = self.corpus.vocab_size
        self.seq_len = train.seq_len
        for split in ("train", "val"):  # fail now, not at the first eval
            self.corpus._check_fits(split, train.seq_len, train.batch_size)

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return self.corpus.sample_batch("train", batch_size, self.seq_len, generator)

    @torch.no_grad()
    def evaluate(self, model: LanguageModel, train: TrainSpec, device: torch.device,
                 final: bool = True) -> dict[str, float]:
        total, count = 0.0, 0
        for x, y in self.corpus.eval_batches("val", train.batch_size, self.seq_len, train.eval_batches):
            loss = model.loss(x.to(device), y.to(device))
            total += float(loss) * y.numel()
            count += y.numel()
        loss = total / count
        bpb = loss / math.log(2) * self.corpus.tokens_per_byte("val")
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_bpb": bpb, "val_tokens": count}

    def describe(self) -> dict[str, Any]:
        return {"corpus": self.corpus.describe(), "unigram_bpb": self.corpus.unigram_bits_per_byte("val")}


class _TaskData:
    """Fresh synthetic examples for training; the task's fixed test set for evaluation."""

    def __init__(self, spec: DataSpec, train: TrainSpec):
        from experiments.tasks import make_task

        options = dict(spec.options)
        options.setdefault("seq_len", train.seq_len)
        self.task = make_task(spec.task, **options)
        self.vocab_size = self.task.vocab_size
        self.seq_len = self.task.seq_len
        self.examples = train.eval_examples

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return self.task.train_batch(batch_size, generator)

    @torch.no_grad()
    def evaluate(self, model: LanguageModel, train: TrainSpec, device: torch.device,
                 final: bool = True) -> dict[str, Any]:
        """Accuracy on the fixed test set: every slice at the end, the training-length slices before.

        Slices longer than a model with learned positions can run are reported as not applicable (None)."""
        from experiments.tasks import accuracy_report

        test_set = self.task.test_set(self.examples)
        if not final:
            test_set = [b for b in test_set if b.inputs.shape[1] == self.seq_len] or test_set
        limit = model.spec.max_seq_len if model.spec.positions == "learned" else None
        runnable = [b for b in test_set if limit is None or b.inputs.shape[1] <= limit]
        skipped = [b for b in test_set if b not in runnable]
        outputs = []
        for batch in runnable:
            chunks = [model(batch.inputs[i: i + train.batch_size].to(device)).argmax(-1).cpu()
                      for i in range(0, len(batch), train.batch_size)]
            outputs.append(torch.cat(chunks))
        report = accuracy_report(outputs, runnable)
        by = report["by"]
        for batch in skipped:  # n/a: beyond the learned position table
            for attr, value in batch.attrs.items():
                by.setdefault(attr, {})[value] = None
        out = {"accuracy": report["accuracy"], "exact_match": report["exact_match"], "by": by}
        if skipped:
            out["not_applicable"] = f"inputs longer than max_seq_len={limit} (learned positions)"
        return out

    def describe(self) -> dict[str, Any]:
        return {"task": self.task.describe()}


def build_data(spec: DataSpec, train: TrainSpec) -> _CorpusData | _TaskData:
    """The data source a `DataSpec` names (corpus loaded and checked, or task built)."""
    return _TaskData(spec, train) if spec.task is not None else _CorpusData(spec, train)


def _device(train: TrainSpec) -> torch.device:
    if train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if train.device.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"TrainSpec.device={train.device!r} but no CUDA device is available; use device='auto'")
    return torch.device(train.device)


def _param_groups(model: LanguageModel, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on norms, biases, A_log, D or dt biases (mamba-ssm's rule)."""
    no_decay_names = ("A_log", "D", "dt_bias")
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        leaf = name.rsplit(".", 1)[-1]
        if p.dim() < 2 or leaf in no_decay_names or getattr(p, "_no_weight_decay", False) or ".pos." in f".{name}":
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + 17) % 2**63)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _with_defaults(specs: dict[str, Any]) -> dict[str, Any]:
    """Recorded specs as this version writes them: a field added since (with its default) is no change."""
    try:
        return {"model": ModelSpec.from_dict(specs["model"]).to_dict(),
                "train": TrainSpec.from_dict(specs["train"]).to_dict(),
                "data": DataSpec.from_dict(specs["data"]).to_dict()}
    except (KeyError, TypeError, ValueError):  # unreadable or a field that no longer exists: compare as written
        return specs


def _check_run_dir(out: Path, specs: dict[str, Any], resume: bool) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None. Refuses a directory that holds another run."""
    spec_path = out / "spec.json"
    if spec_path.exists():
        recorded = _with_defaults(json.loads(spec_path.read_text()))
        if recorded != specs:
            changed = sorted(k for k in specs if recorded.get(k) != specs[k])
            raise RunError(f"{out} holds a run with different {', '.join(changed)} specs; use another --out "
                           f"directory (nothing there was changed)")
        ckpt = out / "checkpoint.pt"
        if resume and ckpt.exists():
            return torch.load(ckpt, map_location="cpu", weights_only=False)
        if not resume and any(out.iterdir()):
            raise RunError(f"{out} already holds a run; pass resume=True (CLI: default) to continue it or pick "
                           f"another directory")
    return None


def train(model_spec: ModelSpec, train_spec: TrainSpec, data_spec: DataSpec, out_dir: str | os.PathLike, *,
          on_eval: Callable[[int, dict[str, Any]], None] | None = None, resume: bool = True,
          stop_at: int | None = None, progress: bool = True, threads: int | None = None) -> dict[str, Any]:
    """Train, evaluate and checkpoint; return the summary (also written to ``out_dir/summary.json``).

    ``on_eval(step, metrics)`` runs after every evaluation and may raise `Pruned`. ``stop_at`` ends the run
    after that step with status ``stopped`` (a checkpoint is written; rerunning resumes).
    """
    from experiments.measure import machine_info

    t_start = time.time()
    if threads:
        torch.set_num_threads(threads)
    device = _device(train_spec)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormals slowed CPU training by up to ~20x here
    data = build_data(data_spec, train_spec)
    if train_spec.target_accuracy is not None and not isinstance(data, _TaskData):
        raise RunError(f"TrainSpec.target_accuracy={train_spec.target_accuracy} needs a task to measure accuracy "
                       f"on; corpus runs report loss (set data.task, or drop target_accuracy)")
    if model_spec.vocab_size != data.vocab_size:
        model_spec = model_spec.replace(vocab_size=data.vocab_size)
    if model_spec.positions == "learned" and data.seq_len > model_spec.max_seq_len:
        raise RunError(f"training sequences of {data.seq_len} tokens exceed the model's learned positions "
                       f"(max_seq_len={model_spec.max_seq_len}); raise ModelSpec.max_seq_len or shorten seq_len")
    specs = {"model": model_spec.to_dict(), "train": train_spec.to_dict(), "data": data_spec.to_dict()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = _check_run_dir(out, specs, resume)
    _write_json(out / "spec.json", specs)

    torch.manual_seed(train_spec.seed)
    model = LanguageModel(model_spec).to(device)
    opt = torch.optim.AdamW(_param_groups(model, train_spec.weight_decay), lr=train_spec.lr,
                            betas=(train_spec.beta1, train_spec.beta2), fused=device.type == "cuda")
    start, elapsed_before, last_eval, evals = 0, 0.0, {}, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        start, elapsed_before, last_eval = ckpt["step"], ckpt["train_seconds"], ckpt.get("last_eval", {})
        evals = list(ckpt.get("evals", []))
    metrics_path = out / "metrics.jsonl"
    _truncate_metrics(metrics_path, start)
    loss_fn = torch.compile(model.loss) if train_spec.compile else model.loss
    use_bf16 = train_spec.precision == "bf16" or (train_spec.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    total = train_spec.total_steps
    status, done, tokens_per_step = "completed", start, train_spec.batch_size * data.seq_len
    target_step = _target_reached(train_spec, evals)  # a resumed run may have reached it already
    log = metrics_path.open("a")
    bar = _progress(total, start, progress)
    t_run = time.time()
    try:
        for step in range(start, total):
            if target_step is not None:
                break
            if stop_at is not None and step >= stop_at:
                status = "stopped"
                break
            model.train()
            x, y = data.batch(train_spec.batch_size, _step_generator(train_spec.seed, step))
            x, y = x.to(device), y.to(device)
            for group in opt.param_groups:
                group["lr"] = train_spec.lr_at(step)
            with autocast:
                loss = loss_fn(x, y)
            if not torch.isfinite(loss):
                status = "diverged"
                _log(log, {"event": "diverged", "step": step + 1, "loss": loss.item()})
                last_eval = {**last_eval, "diverged_at_step": step + 1}
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if train_spec.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_spec.grad_clip)
            opt.step()
            done = step + 1
            seconds = elapsed_before + time.time() - t_run
            if done % train_spec.log_interval == 0 or done == total:
                rate = (done - start) * tokens_per_step / max(time.time() - t_run, 1e-9)
                _log(log, {"event": "train", "step": done, "loss": loss.item(), "lr": train_spec.lr_at(step),
                           "tokens": done * tokens_per_step, "tokens_per_s": rate, "seconds": seconds})
                bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:,.0f}")
            bar.update(1)
            if done % train_spec.eval_interval == 0 or done == total:
                model.eval()
                with autocast:
                    last_eval = data.evaluate(model, train_spec, device, final=done == total)
                _log(log, {"event": "eval", "step": done, **last_eval})
                evals.append(_eval_record(done, done * tokens_per_step, last_eval))
                target_step = _target_reached(train_spec, evals)
                if target_step is not None:
                    if done != total:  # this is the end: evaluate every slice, as at the last step
                        with autocast:
                            last_eval = data.evaluate(model, train_spec, device, final=True)
                        _log(log, {"event": "eval", "step": done, **last_eval})
                        evals[-1] = _eval_record(done, done * tokens_per_step, last_eval)
                    evals[-1]["target_reached"] = True
                _atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": done,
                              "rng": torch.get_rng_state(), "train_seconds": seconds, "last_eval": last_eval,
                              "evals": evals}, out / "checkpoint.pt")
                if on_eval is not None:
                    try:
                        on_eval(done, last_eval)
                    except Pruned:
                        status = "pruned"
                        break
        if status == "stopped":
            _atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": done,
                          "rng": torch.get_rng_state(), "train_seconds": elapsed_before + time.time() - t_run,
                          "last_eval": last_eval, "evals": evals}, out / "checkpoint.pt")
    finally:
        bar.close()
        log.close()

    steps_done = done
    train_seconds = elapsed_before + time.time() - t_run
    summary = {
        "status": status,
        "steps": steps_done,
        "total_steps": total,
        "target_reached_step": target_step,
        "tokens": steps_done * tokens_per_step,
        "final": last_eval,
        "evals": evals,
        "train_seconds": train_seconds,
        "wall_seconds": time.time() - t_start,
        "tokens_per_s": (steps_done - start) * tokens_per_step / max(time.time() - t_run, 1e-9),
        "params": model.num_params(),
        "params_non_embedding": model.num_params(non_embedding=True),
        "flops_per_token": model.flops_per_token(data.seq_len),
        "state_bytes": model.state_bytes(data.seq_len),
        "backends": model.backends(),
        "dataset": data.describe(),
        "machine": machine_info(),
        "device": str(device),
        "precision": "bf16-autocast" if use_bf16 else "fp32",
        **specs,
    }
    _write_json(out / "summary.json", summary)
    return summary


def _eval_record(step: int, tokens: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """One entry of the eval curve: the step, tokens seen and the evaluation's scalar metrics."""
    return {"step": step, "tokens": tokens, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}


def _target_reached(spec: TrainSpec, evals: list[dict[str, Any]]) -> int | None:
    """The step whose evaluation reached ``spec.target_accuracy`` (None: not set or not reached)."""
    if spec.target_accuracy is None or not evals:
        return None
    last = evals[-1]
    reached = last.get("target_reached") or (last.get("accuracy") or 0.0) >= spec.target_accuracy
    return last["step"] if reached else None


def _log(handle: Any, record: dict[str, Any]) -> None:
    handle.write(json.dumps(record) + "\n")
    handle.flush()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records past ``step`` (written after the checkpoint we resume from)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _progress(total: int, start: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True, leave=False)
