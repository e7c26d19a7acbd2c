"""One training run over several processes and machines, on torch.distributed, launched by torchrun.

``torchrun --nproc-per-node N -m experiments train ...`` (or ``mixerlab train --nproc N ...``, which starts
torchrun's elastic agent itself) runs `experiments.train.train` in N processes. Each joins the process group
torchrun describes in its environment (`join`): gloo on CPU, NCCL on CUDA (one device per local rank). The
model is wrapped for ``train.parallel``:

- ``ddp``: `DistributedDataParallel` — every rank holds the model; gradients are all-reduced in buckets;
- ``fsdp``: FSDP2 (`fully_shard` on each block, then on the model) — parameters, gradients and optimiser
  state are sharded over the ranks and gathered a block at a time.

The global batch stays ``train.batch_size``: every rank draws the same deterministic batch (a function of
seed and step) and trains on its own rows of it (`World.rows`), in ``train.grad_accum`` micro-batches. Each
micro-batch's loss is its summed token loss over the whole batch's answer-token count, times the world size
(DDP and FSDP average gradients over ranks), so the gradient is exactly that of the one-process mean loss up
to floating-point reassociation.

Evaluation is sharded (`map_sharded`: rank k evaluates items k, k+N, ...; every rank ends with all results),
so it costs one process's work in total, and gives the same numbers as one process.

Checkpoints are world-size-free: DDP (and one process) writes full state dicts from rank 0; FSDP writes a
`torch.distributed.checkpoint` directory, every rank its shards, named by ``checkpoint.pt`` (written last,
atomically, by rank 0). Either resumes on any number of ranks, with or without FSDP (`load_state`).

Errors on one rank end the run: an exception exits that rank, and torchrun stops the others and names it
(`failure_message`); a rank that stops answering ends its peers' collectives after ``train.collective_timeout_s``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from experiments.errors import RunError

__all__ = ["World", "current", "env_world_size", "failure_message", "join", "launch", "leave",
           "load_state", "map_sharded", "save_state", "wrap"]

CHECKPOINT = "checkpoint.pt"
SHARDS = "checkpoint.dcp-"  # + step: one FSDP checkpoint directory; checkpoint.pt names the live one


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among ``size`` processes, its local rank on the machine, the
    backend of the process group (None: one process, no group) and how the model is parallelised."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None
    parallel: str | None = None  # "ddp" | "fsdp" | None (one process)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        return self.parallel == "fsdp"

    def rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch's rows."""
        n = batch.shape[0] // self.size
        return batch[self.rank * n:(self.rank + 1) * n]

    def describe(self, grad_accum: int) -> dict[str, Any]:
        return {"world_size": self.size, "backend": self.backend, "parallel": self.parallel,
                "grad_accum": grad_accum}


def env_world_size() -> int:
    """The world size torchrun gave this process (1 when not launched by it)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise RunError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} in the environment is not an integer; "
                       f"launch with torchrun (or mixerlab train --nproc N), which sets it") from None


def resolve_parallel(parallel: str, world_size: int) -> str | None:
    if world_size <= 1:
        return None
    return "ddp" if parallel == "auto" else parallel


def check(batch_size: int, grad_accum: int, world_size: int) -> None:
    """Refuse, before anything runs, a global batch that the ranks and micro-batches cannot split evenly."""
    unit = world_size * grad_accum
    if batch_size % unit:
        near = max(unit, round(batch_size / unit) * unit)
        raise RunError(
            f"train.batch_size={batch_size} does not split into {world_size} rank(s) x train.grad_accum="
            f"{grad_accum} equal micro-batches; use a multiple of {unit} (e.g. "
            f"train.batch_size={near}), or change train.grad_accum or the number of processes")


def current() -> World:
    """The world of the process group this process is in (one process when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                 dist.get_backend())


def join(device: torch.device, parallel: str, timeout_s: float) -> tuple[World, torch.device]:
    """Join torchrun's process group when this process was launched as one of several ranks; else stay one
    process. Returns the world and this rank's device (``cuda:LOCAL_RANK`` on CUDA)."""
    size = env_world_size()
    if size <= 1:
        return World(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        _die_with_agent()
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return World(rank, size, local, dist.get_backend(), resolve_parallel(parallel, size)), device


def _die_with_agent() -> None:
    """A rank whose launcher (torchrun's agent) is killed outright gets SIGTERM, and so stops with a
    checkpoint of its step rather than running on as an orphan."""
    from experiments.child import _die_with_parent

    _die_with_parent("SIGTERM", None)


def leave(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


class LossModule(nn.Module):
    """The model's summed token loss as a module's forward, the call DDP prepares its gradient sync in."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model.loss(ids, targets, reduction="sum")


def wrap(model: nn.Module, world: World, device: torch.device) -> tuple[Callable[..., torch.Tensor],
                                                                         Callable[[bool], Any]]:
    """Parallelise ``model`` in place for ``world`` (FSDP shards it; DDP wraps it); return the summed-loss
    function to train with and ``sync(on)``, the context that turns gradient exchange off for all but the
    last micro-batch of a step."""
    summed = LossModule(model)
    if world.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        register_fsdp_forward_method(model, "loss")

        @contextlib.contextmanager
        def fsdp_sync(on: bool) -> Iterator[None]:
            model.set_requires_gradient_sync(on)
            yield

        return summed, fsdp_sync
    if world.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(summed, device_ids=[device] if device.type == "cuda" else None)
        return ddp, (lambda on: contextlib.nullcontext() if on else ddp.no_sync())
    return summed, (lambda on: contextlib.nullcontext())


def gather_scalars(world: World, *values: float) -> torch.Tensor:
    """``(size, len(values))``: every rank's values, on every rank."""
    mine = torch.tensor(values, dtype=torch.float64)
    if world.size == 1:
        return mine[None]
    device = torch.device("cuda", torch.cuda.current_device()) if world.backend == "nccl" else torch.device("cpu")
    parts = [torch.empty_like(mine, device=device) for _ in range(world.size)]
    dist.all_gather(parts, mine.to(device))
    return torch.stack(parts).cpu()


def broadcast_int(world: World, value: int) -> int:
    """Rank 0's ``value`` on every rank."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def map_sharded(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """``[fn(x) for x in items]`` computed over the ranks: in each round, rank k takes item round·N + k; the
    results are gathered to every rank. A rank with no item left in the last round runs ``fn`` on one
    anyway and drops the result, so every rank calls ``fn`` equally often (FSDP's forward is collective)."""
    world = current()
    if world.size == 1 or not items:
        return [fn(x) for x in items]
    out: list[Any] = [None] * len(items)
    for start in range(0, len(items), world.size):
        index = start + world.rank
        result = fn(items[min(index, len(items) - 1)])
        gathered: list[Any] = [None] * world.size
        dist.all_gather_object(gathered, result if index < len(items) else None)
        for k, value in enumerate(gathered):
            if start + k < len(items):
                out[start + k] = value
    return out


# checkpoints ------------------------------------------------------------------------------------------------
def save_state(out: Path, world: World, model: nn.Module, optimizer: torch.optim.Optimizer,
               extra: dict[str, Any], save: Callable[[Any, Path], None]) -> None:
    """Write the run's checkpoint (``extra``: step, RNG, curve): full state dicts by rank 0, or for FSDP a
    sharded `torch.distributed.checkpoint` directory written by every rank, then ``checkpoint.pt`` naming it
    (rank 0, atomically, last) and the superseded directory removed."""
    if not world.fsdp:
        if world.main:
            save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **extra}, out / CHECKPOINT)
        barrier(world)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    name = f"{SHARDS}{extra['step']:08d}"
    if world.main and (out / name).exists():
        shutil.rmtree(out / name)  # a half-written one from a killed run at this step
    barrier(world)
    dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=str(out / name))
    barrier(world)
    if world.main:
        save({"sharded": name, "world_size": world.size, **extra}, out / CHECKPOINT)
        for old in out.glob(f"{SHARDS}*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    barrier(world)


def checkpoint_files(run_dir: Path) -> list[Path]:
    """The files and directories a run's checkpoint consists of, ``checkpoint.pt`` last."""
    shards = sorted(p for p in run_dir.glob(f"{SHARDS}*") if p.is_dir())
    return [*shards, run_dir / CHECKPOINT]


def load_state(state: dict[str, Any], run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
               world: World) -> None:
    """Load a checkpoint (``state``: its ``checkpoint.pt``) into ``model`` (and ``optimizer``), whatever the
    world size and parallelism it was written with and is read with."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if "sharded" in state:
        import torch.distributed.checkpoint as dcp

        shards = run_dir / state["sharded"]
        if not shards.is_dir():
            raise RunError(f"{run_dir / CHECKPOINT} names the sharded checkpoint {shards.name}, which is missing; "
                           f"copy the whole run directory (it holds {SHARDS}* directories), or train into a new "
                           f"--out")
        target = {"model": get_model_state_dict(model)}
        if optimizer is not None:
            target["optimizer"] = get_optimizer_state_dict(model, optimizer)
        import warnings

        with warnings.catch_warnings():  # one process reading a sharded checkpoint: what we mean to do
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(target, checkpoint_id=str(shards))
        set_model_state_dict(model, target["model"])
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, target["optimizer"])
        return
    if not world.fsdp:
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        return
    # full state dicts into a sharded model: read them into an unsharded copy, then let torch reshard them
    full = type(model)(model.spec)
    full.load_state_dict(state["model"])
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, full.state_dict(), options=options)
    if optimizer is not None:  # the same groups, in the same order, over the copy's parameters
        names = {id(p): n for n, p in model.named_parameters()}
        params = dict(full.named_parameters())
        plain = type(optimizer)([{**{k: v for k, v in g.items() if k != "params"},
                                  "params": [params[names[id(p)]] for p in g["params"]]}
                                 for g in optimizer.param_groups])
        plain.load_state_dict(state["optimizer"])
        set_optimizer_state_dict(model, optimizer, get_optimizer_state_dict(full, plain, options=options),
                                 options=options)


# launching --------------------------------------------------------------------------------------------------
def launch(argv: Sequence[str], nproc: int, *, threads: int | None = None, handle_sigint: bool = True,
           module: str = "experiments") -> None:
    """Run ``python -m MODULE ARGV`` as ``nproc`` ranks on this machine under torchrun's elastic agent (a
    standalone rendezvous on a free local port), as ``torchrun --standalone --nproc-per-node N`` would.
    ``handle_sigint=False`` leaves Ctrl-C to a coordinator above (a study trial). Raises `RunError` naming
    the failed rank(s) and why."""
    import sys

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    else:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    signals = "SIGTERM,SIGINT,SIGHUP,SIGQUIT" if handle_sigint else "SIGTERM,SIGHUP,SIGQUIT"
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          signals_to_handle=signals)
    try:
        elastic_launch(config, sys.executable)("-m", module, *argv)
    except ChildFailedError as exc:
        raise RunError(failure_message(exc)) from None
    except SignalException:  # Ctrl-C or SIGTERM: the agent stopped the ranks (each checkpointed its step)
        raise KeyboardInterrupt from None


def failure_message(exc: Any) -> str:
    """What a torchrun ``ChildFailedError`` says, shortly: each failed rank, and its exception or signal."""
    parts, consequences = [], []
    for rank, failure in sorted(exc.failures.items()):
        data = failure.error_file_data or {}
        message = (data.get("message") or {}) if isinstance(data.get("message"), dict) else {}
        text = message.get("message") if message else failure.message
        if not text or text.startswith("To enable traceback"):
            text = (f"killed by {failure.signal_name()}" if failure.exitcode < 0
                    else f"exit code {failure.exitcode} (its output above says why)")
        line = f"rank {rank} failed: {str(text).strip().splitlines()[-1] if text else '?'}"
        # a rank whose peer died sees its connection close: that is the consequence, not the cause
        (consequences if "caused by a remote worker" in str(text) else parts).append(line)
    return "; ".join(parts + [f"then {c}" for c in consequences]) or str(exc)
