"""One trial in its own process: `TrialProcess` runs it and says how it ended (`Outcome`); `run_trial` is
what runs in the child.

The child trains the trial's config (`experiments.train.train`) and, at every evaluation, reports the
metrics and waits for the coordinator's answer: "continue", "prune" (a pruner said so) or "stop" (Ctrl-C,
SIGTERM, or the trial was finished elsewhere). After training it runs the recipe's long-context
measurements and returns its `TrialSummary`. A crash, an out-of-memory kill, a timeout or a diverged loss is
a failed trial with the reason, never a failed study.

A recipe's ``[trial] nproc = N`` trains each trial over N ranks on the worker's machine: the child starts
them under torchrun's elastic agent (`experiments.distributed.launch`), rank 0 inherits the child's pipes
and speaks the protocol (each evaluation, the coordinator's answer), and the child measures and returns the
summary rank 0 wrote.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.child import Channel, ChildProcess, Isolation
from experiments.runs import TrialSummary

__all__ = ["INTERRUPTED", "Outcome", "TrialProcess", "run_trial"]

INTERRUPTED = "interrupted (Ctrl-C or SIGTERM); will be redone on resume"
_STOPS = {"prune": "pruned", "stop": "interrupted", "": "coordinator gone"}


@dataclass(frozen=True)
class Outcome:
    """How a trial ended: ``state`` complete, pruned or failed; for a failure the ``reason``, and ``redo``
    when it was not the trial's own (interrupted): it is run again on resume."""

    state: str
    reason: str = ""
    summary: TrialSummary | None = None
    redo: bool = False


class TrialProcess:
    """A trial's child process, training ``config`` into ``run_dir``.

    ``on_eval(step, metrics)`` is called at each of the child's evaluations and returns its answer:
    "continue", "prune" or "stop". ``stopping`` set means the study is stopping (Ctrl-C): a trial that ends
    then without a result was interrupted, not crashed.
    """

    def __init__(self, config: dict[str, Any], run_dir: Path, isolation: Isolation,
                 measure: dict[str, Any] | None = None, nproc: int = 1):
        self.run_dir = Path(run_dir)
        self.isolation = isolation
        self.kwargs = {"config": config, "out": str(run_dir), "measure": measure or {}, "threads": isolation.threads,
                       "nproc": nproc}
        self.child: ChildProcess | None = None
        self._started = threading.Event()

    def run(self, on_eval: Callable[[int, dict[str, Any]], str], stopping: threading.Event) -> Outcome:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        answers: list[str] = []
        with (self.run_dir / "stderr.log").open("w+") as stderr:
            child = self.child = ChildProcess("experiments.study.trial:run_trial", self.kwargs, self.isolation,
                                              stderr=stderr, channel=True)
            self._started.set()
            try:
                for msg in child.messages():
                    if msg.kind == "eval":
                        answers.append(on_eval(msg.data["step"], msg.data["metrics"]))
                        child.reply(answers[-1])
            finally:
                child.close()
            return self._outcome(child, answers, stopping)

    def terminate(self) -> None:
        if self.child is not None:
            self.child.terminate()

    def _outcome(self, child: ChildProcess, answers: list[str], stopping: threading.Event) -> Outcome:
        summary = TrialSummary.from_json(child.result) if child.result is not None else None
        if "stop" in answers or (stopping.is_set() and summary is None):
            return Outcome("failed", INTERRUPTED, summary, redo=True)
        if child.timed_out.is_set():
            return Outcome("failed", f"timed out after {self.isolation.timeout:.0f} s (trial.timeout_s)", summary)
        if summary is None:
            why = child.failure()
            return Outcome("failed", why if why.startswith("killed") else f"crashed: {why}")
        if summary.status == "pruned":  # a prune answered to its last evaluation leaves it complete
            return Outcome("pruned", "pruned", summary)
        if summary.status == "diverged":
            return Outcome("failed", f"diverged (non-finite loss at step {summary.final.get('diverged_at_step', '?')})",
                           summary)
        if summary.status == "interrupted":
            return Outcome("failed", INTERRUPTED, summary, redo=True)
        if summary.status != "completed":
            return Outcome("failed", f"ended with status {summary.status}", summary)
        return Outcome("complete", "", summary)


def _asking(channel: Channel) -> Callable[[int, dict[str, Any]], None]:
    """The eval callback that reports to the coordinator and obeys its answer."""
    from experiments.train import StopTraining

    def on_eval(step: int, metrics: dict[str, Any]) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        answer = channel.ask("eval", {"step": step, "metrics": scalars})
        if answer != "continue":
            raise StopTraining(_STOPS.get(answer, answer))

    return on_eval


def run_trial(config: dict[str, Any], out: str, measure: dict[str, Any], threads: int | None,
              channel: Channel, nproc: int = 1) -> dict[str, Any]:
    """The child's side: train (over ``nproc`` ranks), report each evaluation and obey the answer, measure,
    return the summary."""
    from archs.model import ModelSpec
    from experiments.config import build_specs
    from experiments.probes import run_probes
    from experiments.train import plan, train

    model, train_spec, data = build_specs(config)
    if nproc > 1:
        from experiments.distributed import launch

        plan(model, train_spec, data, world_size=nproc)  # a bad split of the batch fails here, not in N ranks
        launch([json.dumps(config), out], nproc, threads=threads, handle_sigint=False,
               module="experiments.study.trial")
        summary = TrialSummary.from_json(json.loads((Path(out) / "summary.json").read_text()))
    else:
        summary = train(model, train_spec, data, out, on_eval=_asking(channel), progress=False)
    if measure and summary.status == "completed":
        summary.measure = run_probes(measure, out, ModelSpec.from_dict(summary.model), data.kind == "task",
                                     Isolation(threads=threads, timeout=1800))
    return summary.to_json()


def _rank_main() -> None:
    """One rank of a trial over several (``python -m experiments.study.trial CONFIG_JSON OUT`` under
    torchrun): rank 0 reports to the coordinator through the pipes it inherited."""
    import os
    import sys

    from experiments.config import build_specs
    from experiments.train import train

    config, out = json.loads(sys.argv[1]), sys.argv[2]
    on_eval = _asking(Channel()) if os.environ.get("RANK") == "0" else None
    train(*build_specs(config), out, on_eval=on_eval, progress=False)


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    record(_rank_main)()
