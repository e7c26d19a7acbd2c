"""Training: one model on one corpus or synthetic task, with evaluation, checkpoints and a summary.

``train(model_spec, train_spec, data_spec, out_dir)`` writes to ``out_dir``:

- ``spec.json``: the three specs (a rerun into the same directory must match it, and then resumes);
- ``metrics.jsonl``: one JSON line per log or eval event (``{"event": "train"|"eval", "step": ...}``);
- ``checkpoint.pt``: model, optimiser, schedule and RNG state, written atomically at every evaluation;
- ``summary.json``: the run's `TrialSummary` — status (`runs.STATUSES`), final metrics, the evaluation
  curve, the step at which a task run reached ``TrainSpec.target_accuracy`` (it ends there), the backend each
  layer ran, the peak memory of the training steps with its split, machine, data identity and wall time.

Batches are a pure function of ``(seed, step)``, so a run resumed from a checkpoint follows exactly the loss
curve of an uninterrupted one, and the same seed on the same machine gives the same curve.

Launched by torchrun as several ranks (`experiments.distributed`), every rank trains its rows of each batch
under DDP or FSDP2; rank 0 alone writes the files above, and the ranks agree on every decision (a
non-finite loss, Ctrl-C or SIGTERM, a pruner's answer) before acting on it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from archs.model import LanguageModel, ModelSpec
from experiments import distributed, trackers
from experiments.config import DataSpec, TrainSpec, resolve_device
from experiments.data.training import CorpusData, TaskData, build_data
from experiments.errors import RunError
from experiments.measure import SavedActivations, StepPeak, memory_split
from experiments.runs import (
    SCOPE_STEPS,
    TrialSummary,
    available_bytes,
    check_init_from,
    curve_point,
    load_weights,
    machine_info,
    save_torch,
    write_json,
)
from experiments.tasks.base import IGNORE_INDEX

__all__ = ["DataSpec", "Plan", "Pruned", "RunError", "StopTraining", "TrainSpec", "build_data", "plan", "train"]

logger = logging.getLogger(__name__)


class StopTraining(Exception):  # noqa: N818 — a signal from an eval callback, not an error
    """Raised by an eval callback to end a run at this evaluation: ``reason`` "pruned" (a pruner said so;
    status ``pruned``) or anything else, e.g. "interrupted" or "coordinator gone" (status ``interrupted``:
    the checkpoint just written lets a rerun continue)."""

    def __init__(self, reason: str = "interrupted"):
        super().__init__(reason)
        self.reason = reason

    @property
    def status(self) -> str:
        return "pruned" if self.reason == "pruned" else "interrupted"


class Pruned(StopTraining):
    """`StopTraining` for a pruned run."""

    def __init__(self, reason: str = "pruned"):
        super().__init__(reason)


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


def _with_defaults(specs: dict[str, Any]) -> dict[str, Any]:
    """Recorded specs as this version writes them: a field added since (with its default) is no change."""
    try:
        return {"model": ModelSpec.from_dict(specs["model"]).to_dict(),
                "train": TrainSpec.from_dict(specs["train"]).to_dict(),
                "data": DataSpec.from_dict(specs["data"]).to_dict()}
    except (KeyError, TypeError, ValueError):  # unreadable or a field that no longer exists: compare as written
        return specs


def _comparable(specs: dict[str, Any]) -> dict[str, Any]:
    """The specs without how the run is spread over processes (`TrainSpec.EXECUTION`): a resume may change
    that (another world size, DDP for FSDP, more micro-batches) and still follow the same curve."""
    train = specs.get("train")
    if not isinstance(train, dict):
        return specs
    return {**specs, "train": {k: v for k, v in train.items() if k not in TrainSpec.EXECUTION}}


def check_run_dir(out: Path, specs: dict[str, Any], resume: bool) -> Path | None:
    """The checkpoint to resume from, or None. Refuses a directory that holds another run."""
    spec_path = out / "spec.json"
    if spec_path.exists():
        recorded = _comparable(_with_defaults(json.loads(spec_path.read_text())))
        if recorded != _comparable(specs):
            changed = sorted(k for k in specs if recorded.get(k) != _comparable(specs)[k])
            raise RunError(f"{out} holds a run with different {', '.join(changed)} specs; use another --out "
                           f"directory (nothing there was changed)")
        ckpt = out / "checkpoint.pt"
        if resume and ckpt.exists():
            return ckpt
        if not resume and any(out.iterdir()):
            raise RunError(f"{out} already holds a run; pass resume=True (CLI: default) to continue it or pick "
                           f"another directory")
    return None


def _check_memory(model_spec: ModelSpec, params: int, spec: TrainSpec, data: CorpusData | TaskData,
                  device: torch.device) -> int:
    """Refuse, before anything is written, a run that cannot fit this machine; return the bound. A lower
    bound of its memory: parameters, gradients and two AdamW moments in fp32; one fp32 activation of the
    model's width per token per layer and the logits of a training batch; the logits of an evaluation batch
    at the longest test length; a task's fixed test set."""
    width = model_spec.d_model * model_spec.n_layers + model_spec.vocab_size
    longest, test_set = data.eval_extent()
    parts = {"parameters": 16 * params, "activations": 4 * spec.batch_size * data.seq_len * width,
             "evaluation": 4 * spec.batch_size * longest * (model_spec.vocab_size + model_spec.d_model),
             "test set": test_set}
    need, have = sum(parts.values()), available_bytes(device)
    if have is not None and need > have:
        gib = {k: f"{v / 2**30:.1f} GiB" for k, v in parts.items()}
        raise RunError(
            f"this run needs at least {need / 2**30:.1f} GiB but {device} has {have / 2**30:.1f} GiB free: "
            f"parameters {gib['parameters']} ({params:,} with gradients and AdamW state: model.d_model, "
            f"n_layers, vocab_size, mlp_ratio, max_seq_len, short_conv), activations {gib['activations']} "
            f"(train.batch_size={spec.batch_size} x seq_len={data.seq_len}), evaluation {gib['evaluation']} "
            f"({longest:,} tokens: the task's test_seq_lens or test_multipliers), test set {gib['test set']} "
            f"(train.eval_examples, the task's test_examples); make the largest of them smaller")
    return need


def _warm_up(model_spec: ModelSpec, spec: TrainSpec, data: CorpusData | TaskData, device: torch.device) -> None:
    """One short training step (the run's batch, 32 tokens) of a throwaway copy of the model, before the
    memory baseline. The first forward, backward, clipping and AdamW step of a process page in library code
    and allocate lazy workspaces (~160 MiB here, whatever the model); without this they would count as the
    model's memory. (A full-length warm-up would leave the allocator holding that step's freed memory, which
    the baseline would then hide.)"""
    model = LanguageModel(model_spec).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    x, y = data.batch(spec.batch_size, _step_generator(spec.seed, 0))
    n = min(32, x.shape[1])
    model.loss(x[:, :n].to(device), y[:, :n].to(device)).backward()
    if spec.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
    opt.step()


class _Run:
    """One training run's state: the model, its optimiser, the evaluation curve and where to write."""

    def __init__(self, model_spec: ModelSpec, spec: TrainSpec, data: CorpusData | TaskData, out: Path,
                 device: torch.device, ckpt: Path | None, world: distributed.World):
        self.spec, self.data, self.out, self.device, self.world = spec, data, out, device, world
        data.prepare(model_spec)
        if device.type == "cpu":
            _warm_up(model_spec, spec, data, device)
        self.peak = StepPeak(str(device))  # the baseline: data ready, code warm, no model yet
        torch.manual_seed(spec.seed)
        self.model = LanguageModel(model_spec)
        if ckpt is None and spec.init_from is not None:  # fine-tuning: the weights of another run
            step = load_weights(spec.init_from, self.model)
            logger.info("starting from the weights of %s (its step %s)", spec.init_from, step)
        self.model.to(device)
        loss_sum, self.sync = distributed.wrap(self.model, world, device)  # FSDP shards the model in place
        self.opt = torch.optim.AdamW(_param_groups(self.model, spec.weight_decay), lr=spec.lr,
                                     betas=(spec.beta1, spec.beta2), fused=device.type == "cuda")
        self.start, self.seconds_before, self.last_eval, self.evals = 0, 0.0, {}, []
        if ckpt is not None:
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
            distributed.load_state(state, out, self.model, self.opt, world)
            torch.set_rng_state(state["rng"])
            self.start, self.seconds_before = state["step"], state["train_seconds"]
            self.last_eval, self.evals = state.get("last_eval", {}), list(state.get("evals", []))
            del state
        self.done = self.start
        self.stop_agreed = False  # a rank asked to stop (Ctrl-C, SIGTERM) at the last step's exchange
        self.diverged_ranks: list[int] = []
        self.trackers: trackers.Trackers | None = None  # rank 0's, when train.log_to names any
        self.loss_fn = torch.compile(loss_sum) if spec.compile else loss_sum
        self.bf16 = spec.precision == "bf16" or (spec.precision == "auto" and device.type == "cuda")
        self.activations: int | None = None
        self.split: dict[str, Any] | None = None
        self.t_run = time.time()

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def seconds(self) -> float:
        return self.seconds_before + time.time() - self.t_run

    def step(self, step: int, stop_requested: bool = False) -> float:
        """One optimiser step over the global batch (this rank's rows of it, in ``grad_accum`` micro-batches);
        its loss, the mean over the batch's answer tokens (when that is not finite, nothing is updated).
        ``stop_requested``: this rank was asked to stop; the ranks exchange it with their losses."""
        self.model.train()
        x, y = self.data.batch(self.spec.batch_size, _step_generator(self.spec.seed, step))
        count = int((y != IGNORE_INDEX).sum())  # answer tokens of the whole batch: every rank divides by the same
        x, y = self.world.rows(x), self.world.rows(y)
        for group in self.opt.param_groups:
            group["lr"] = self.spec.lr_at(step)
        first = step == self.start
        if first:
            self.peak.begin()
        self.opt.zero_grad(set_to_none=True)
        total, finite, accum = 0.0, True, self.spec.grad_accum
        for i, (mx, my) in enumerate(zip(x.chunk(accum), y.chunk(accum), strict=True)):
            counting = first and i == 0 and not self.spec.compile  # hooks and torch.compile do not mix
            saved = SavedActivations(self.model) if counting else contextlib.nullcontext()
            with self.sync(i == accum - 1), self.autocast(), saved:
                summed = self.loss_fn(mx.to(self.device), my.to(self.device))
                loss = summed * (self.world.size / max(count, 1))  # DDP and FSDP average over the ranks
            if counting:
                self.activations = saved.bytes
            value = summed.item() / max(count, 1)
            total += value
            if not math.isfinite(value):
                finite = False
                if self.world.size == 1:
                    return value
            with self.sync(i == accum - 1):
                loss.backward()
        if self.world.size > 1:  # every rank's loss and stop request, so that all decide alike
            shared = distributed.gather_scalars(self.world, total if finite else math.nan, float(stop_requested))
            self.stop_agreed = bool(shared[:, 1].any())
            self.diverged_ranks = [r for r in range(self.world.size) if not math.isfinite(shared[r, 0])]
            total = float(shared[:, 0].sum())
        if not math.isfinite(total):
            return total
        if self.spec.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.spec.grad_clip)
        self.opt.step()
        self.done = step + 1
        return total

    def end_memory(self) -> None:
        """Close the memory window (before an evaluation, or after `StepPeak.steps` steps)."""
        if self.split is None and self.done > self.start:
            self.peak.end()
            self.split = memory_split(self.model, self.opt, self.activations)
        elif self.done == self.start:
            self.peak.end()

    def evaluate(self, final: bool) -> dict[str, Any]:
        self.model.eval()
        with self.autocast():
            return self.data.evaluate(self.model, self.device, final=final)  # sharded over the ranks

    def save(self) -> None:
        extra = {"step": self.done, "rng": torch.get_rng_state(), "train_seconds": self.seconds(),
                 "last_eval": self.last_eval, "evals": self.evals}
        distributed.save_state(self.out, self.world, self.model, self.opt, extra, save_torch)


@dataclass(frozen=True)
class Plan:
    """A validated run, before anything is written: the model spec (vocabulary from the data), the data, the
    device, the parameter count and the memory the run needs at least."""

    model_spec: ModelSpec
    data: CorpusData | TaskData
    device: torch.device
    params: int
    need_bytes: int

    def __iter__(self) -> Any:
        return iter((self.model_spec, self.data, self.device))


def plan(model_spec: ModelSpec, train_spec: TrainSpec, data_spec: DataSpec, world_size: int | None = None) -> Plan:
    """Validate a run completely without writing anything: the device, the split of the batch over
    ``world_size`` ranks (default: the world torchrun launched this process in) and ``grad_accum``, the data
    (corpus loaded, task built), the pairing of specs, the model built on the meta device, and a lower bound
    of its memory against what the device has free. Raises a `MixerlabError` naming the field and the fix."""
    device = resolve_device(train_spec.device)
    distributed.check(train_spec.batch_size, train_spec.grad_accum,
                      distributed.env_world_size() if world_size is None else world_size)
    trackers.check(train_spec.log_to)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormals slowed CPU training by up to ~20x here
    data = build_data(data_spec, train_spec)
    if train_spec.target_accuracy is not None and data.kind != "task":
        raise RunError(f"TrainSpec.target_accuracy={train_spec.target_accuracy} needs a task to measure accuracy "
                       f"on; corpus runs report loss (set data.task, or drop target_accuracy)")
    if train_spec.init_from is not None:
        check_init_from(model_spec, train_spec.init_from, data.vocab_size)
    elif model_spec.vocab_size != data.vocab_size:
        model_spec = model_spec.replace(vocab_size=data.vocab_size)
    limit = model_spec.length_limit
    if limit is not None and data.seq_len > limit:
        raise RunError(f"training sequences of {data.seq_len} tokens exceed the model's learned positions "
                       f"(max_seq_len={limit}); raise ModelSpec.max_seq_len or shorten seq_len")
    params = model_spec.check_builds()
    need = _check_memory(model_spec, params, train_spec, data, device)
    return Plan(model_spec, data, device, params, need)


def train(model_spec: ModelSpec, train_spec: TrainSpec, data_spec: DataSpec, out_dir: str | os.PathLike, *,
          on_eval: Callable[[int, dict[str, Any]], None] | None = None, resume: bool = True,
          stop_at: int | None = None, progress: bool = True, threads: int | None = None) -> TrialSummary:
    """Train, evaluate and checkpoint; return the `TrialSummary` (also written to ``out_dir/summary.json``).

    ``on_eval(step, metrics)`` runs after every evaluation (and its checkpoint) and may raise `StopTraining`
    (`Pruned` for a pruned run); over several ranks, rank 0's runs and every rank obeys it. ``stop_at`` ends
    the run after that step with status ``stopped`` (a checkpoint is written; rerunning resumes).
    """
    t_start = time.time()
    if threads:
        torch.set_num_threads(threads)
    model_spec, data, device = plan(model_spec, train_spec, data_spec)
    specs = {"model": model_spec.to_dict(), "train": train_spec.to_dict(), "data": data_spec.to_dict()}
    out = Path(out_dir)
    ckpt = check_run_dir(out, specs, resume) if out.is_dir() else None  # read by every rank before any writes
    finished = _finished(out) if ckpt is not None else None
    if finished is not None:
        logger.warning("%s holds this run, finished (%s at step %d); nothing was changed — use another --out "
                       "to train it again", out, finished.status, finished.steps)
        return finished
    owned, run = not (torch.distributed.is_available() and torch.distributed.is_initialized()), None
    world, device = distributed.join(device, train_spec.parallel, train_spec.collective_timeout_s)
    try:
        if world.main:
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "spec.json", specs)
        distributed.barrier(world)
        run = _Run(model_spec, train_spec, data, out, device, ckpt, world)
        if world.main and train_spec.log_to:
            run.trackers = trackers.Trackers(train_spec.log_to, out, specs, resumed=ckpt is not None)
        with _Interrupts() as interrupts:
            status = _loop(run, on_eval, stop_at, progress and world.main, interrupts)
        summary = _summary(run, status, model_spec, specs, t_start)
        if world.main:
            write_json(out / "summary.json", summary.to_json())
            if run.trackers is not None:
                run.trackers.finish(summary.to_json())
        distributed.barrier(world)
    finally:
        if run is not None and run.trackers is not None:
            run.trackers.close()
        if owned:
            distributed.leave(world)
    return summary


def _finished(out: Path) -> TrialSummary | None:
    """The recorded summary of a run that has nothing left to do (completed, or diverged: it would diverge
    again at the same step), or None."""
    path = out / "summary.json"
    if not path.exists():
        return None
    try:
        summary = TrialSummary.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError):
        return None
    return summary if summary.status in ("completed", "diverged") else None


class _Interrupts:
    """While inside, SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption, or the coordinator of a study
    trial going away) ask the run to stop after the current step, with a checkpoint of it; a second Ctrl-C
    stops at once (a repeated SIGTERM does not: the kernel may send the parent-death signal more than once).
    Signals whose handler is not the default (a trial ignores SIGINT: its coordinator handles Ctrl-C) are
    left alone, and outside the main thread nothing changes."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = self.requested or signal.Signals(signum).name

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _loop(run: _Run, on_eval: Callable[[int, dict[str, Any]], None] | None, stop_at: int | None,
          progress: bool, interrupts: _Interrupts) -> str:
    """The training steps from the run's start to its end; returns the status."""
    spec, total = run.spec, run.spec.total_steps
    tokens_per_step = spec.batch_size * run.data.seq_len
    target_step = _target_reached(spec, run.evals)  # a resumed run may have reached it already
    status = "completed"
    metrics = run.out / "metrics.jsonl"
    if run.world.main:
        trackers.truncate_metrics(metrics, run.start)
    with trackers.MetricsLog(metrics if run.world.main else None, run.trackers) as log, \
            _progress(total, run.start, progress) as bar:
        for step in range(run.start, total):
            if target_step is not None:
                break
            # several ranks act on the request they agreed on at the last step, so that all stop together
            requested = run.stop_agreed if run.world.size > 1 else bool(interrupts.requested)
            if requested or (stop_at is not None and step >= stop_at):
                status = "interrupted" if requested else "stopped"
                run.end_memory()
                run.save()
                break
            loss = run.step(step, bool(interrupts.requested))
            if not math.isfinite(loss):
                status = "diverged"
                where = {"ranks": run.diverged_ranks} if run.world.size > 1 else {}
                _log(log, {"event": "diverged", "step": step + 1, "loss": loss, **where})
                run.last_eval = {**run.last_eval, "diverged_at_step": step + 1,
                                 **({"diverged_on_ranks": run.diverged_ranks} if where else {})}
                break
            done = run.done
            evaluating = done % spec.eval_interval == 0 or done == total
            if evaluating or done - run.start >= StepPeak.steps:
                run.end_memory()
            if done % spec.log_interval == 0 or done == total:
                rate = (done - run.start) * tokens_per_step / max(time.time() - run.t_run, 1e-9)
                _log(log, {"event": "train", "step": done, "loss": loss, "lr": spec.lr_at(step),
                           "tokens": done * tokens_per_step, "tokens_per_s": rate, "seconds": run.seconds()})
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
            bar.update(1)
            if not evaluating:
                continue
            target_step = _evaluate(run, log, done, tokens_per_step)
            run.save()
            if on_eval is not None or run.world.size > 1:  # ranks other than 0 take rank 0's answer
                stop = _answer(run.world, on_eval, done, run.last_eval)
                if stop == "pruned" and (target_step is not None or done == total):
                    stop = None  # its last evaluation: the run is complete, there is nothing left to save
                if stop is not None:
                    status = stop
                    break
    run.end_memory()
    return status


_STOP_CODES = {0: None, 1: "pruned", 2: "interrupted"}


def _answer(world: distributed.World, on_eval: Callable[[int, dict[str, Any]], None] | None, step: int,
            metrics: dict[str, Any]) -> str | None:
    """Rank 0 asks ``on_eval`` (a study's pruner, its coordinator); every rank gets the answer: None to go
    on, else the status to end with."""
    code = 0
    if world.main and on_eval is not None:
        try:
            on_eval(step, metrics)
        except StopTraining as stop:
            code = 1 if stop.status == "pruned" else 2
    return _STOP_CODES[distributed.broadcast_int(world, code)]


def _evaluate(run: _Run, log: Any, done: int, tokens_per_step: int) -> int | None:
    """Evaluate at step ``done`` (every slice if it is the last step or reaches the target); the step at
    which the target accuracy was reached, or None."""
    total = run.spec.total_steps
    run.last_eval = run.evaluate(final=done == total)
    _log(log, {"event": "eval", "step": done, **run.last_eval})
    run.evals.append(curve_point(done, done * tokens_per_step, run.last_eval, run.data.seq_len))
    target_step = _target_reached(run.spec, run.evals)
    if target_step is not None:
        if done != total:  # this is the end: evaluate every slice, as at the last step
            run.last_eval = run.evaluate(final=True)
            _log(log, {"event": "eval", "step": done, **run.last_eval})
            run.evals[-1] = curve_point(done, done * tokens_per_step, run.last_eval, run.data.seq_len)
        run.evals[-1]["target_reached"] = True
    return target_step


def _summary(run: _Run, status: str, model_spec: ModelSpec, specs: dict[str, Any], t_start: float) -> TrialSummary:
    model, data, done = run.model, run.data, run.done
    tokens_per_step = run.spec.batch_size * data.seq_len
    described = data.describe()
    corpus = described.get("corpus") or {}
    return TrialSummary(
        status=status, steps=done, total_steps=run.spec.total_steps,
        target_reached_step=_target_reached(run.spec, run.evals), tokens=done * tokens_per_step,
        final=run.last_eval, evals=run.evals, train_seconds=run.seconds(), wall_seconds=time.time() - t_start,
        tokens_per_s=(done - run.start) * tokens_per_step / max(time.time() - run.t_run, 1e-9),
        params=model.num_params(), params_non_embedding=model.num_params(non_embedding=True),
        flops_per_token=model.flops_per_token(data.seq_len), state_bytes=model.state_bytes(data.seq_len),
        backends=model.backends(), device=str(run.device), precision="bf16-autocast" if run.bf16 else "fp32",
        peak_memory_mib=None if run.peak.peak_bytes is None else run.peak.peak_bytes / 2**20,
        memory_method=run.peak.method, memory_scope=SCOPE_STEPS, memory_split=run.split,
        corpus_hash=corpus.get("content_hash"), unigram_bpb=described.get("unigram_bpb"),
        task=(described.get("task") or {}).get("task"), layer_pattern=model_spec.layer_pattern,
        distributed=run.world.describe(run.spec.grad_accum) if run.world.size > 1 else None,
        model=specs["model"], train=specs["train"], data=specs["data"], dataset=described, machine=machine_info())


def _target_reached(spec: TrainSpec, evals: list[dict[str, Any]]) -> int | None:
    """The step whose evaluation reached ``spec.target_accuracy`` (None: not set or not reached)."""
    if spec.target_accuracy is None or not evals:
        return None
    last = evals[-1]
    reached = last.get("target_reached") or (last.get("accuracy") or 0.0) >= spec.target_accuracy
    return last["step"] if reached else None


def _log(log: trackers.MetricsLog, record: dict[str, Any]) -> None:
    log.write(record)


def _progress(total: int, start: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True, leave=False)
