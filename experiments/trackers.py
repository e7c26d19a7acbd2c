"""Where a run's records go: ``metrics.jsonl`` (`MetricsLog`, the record every report reads) and the experiment
trackers ``train.log_to = ["tensorboard", "mlflow", "wandb"]`` names, which get its metrics, spec and summary.

- ``tensorboard``: event files in ``RUN/tensorboard`` (``tensorboard --logdir RUN``);
- ``mlflow``: a run in ``$MLFLOW_TRACKING_URI``, else in the run's own SQLite store ``RUN/mlflow.db`` with
  artifacts in ``RUN/mlartifacts`` (``mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db``; MLflow 3 has
  put its plain file store in maintenance mode); params are the flattened specs;
- ``wandb``: a run in ``RUN/wandb``, offline unless ``WANDB_MODE`` says otherwise (``wandb sync`` uploads it).

A resumed run continues the same tracker run (its id is kept in ``RUN/trackers.json``). Every tracker is an
optional extra; `check` refuses one that is not installed before anything runs, naming the extra. Over
several ranks only rank 0 logs. A study's trials each log their own run, named after the trial directory.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from experiments.errors import RunError

__all__ = ["TRACKERS", "MetricsLog", "Trackers", "check", "truncate_metrics"]

#: tracker -> (the module it needs, the extra that installs it)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


def check(names: list[str]) -> None:
    """Refuse an unknown or uninstalled tracker (before anything is written)."""
    for name in names:
        if name not in TRACKERS:
            raise RunError(f"train.log_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise RunError(f"train.log_to includes {name!r}, but {module} is not installed: pip install "
                           f"'mixerlab[{extra}]' (or drop it from train.log_to)")


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value if isinstance(value, (int, float, str, bool)) or value is None else json.dumps(value)
    return out


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record's finite numbers, named ``train/loss``, ``eval/val_bpb``, ..."""
    event = record.get("event", "train")
    return {f"{event}/{k}": float(v) for k, v in record.items()
            if k not in ("event", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


class Trackers:
    """The run's trackers: `log` each metrics record, `finish` with the summary, then `close`."""

    def __init__(self, names: list[str], out: Path, specs: dict[str, Any], resumed: bool):
        self.names, self.out = list(names), Path(out)
        ids_path = self.out / "trackers.json"
        ids = json.loads(ids_path.read_text()) if resumed and ids_path.exists() else {}
        params = _flat("", {k: specs[k] for k in ("model", "train", "data")}, {})
        self._tb = self._mlflow = self._wandb = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.out / "tensorboard"))
            self._tb.add_text("spec", "```\n" + json.dumps(specs, indent=1) + "\n```")
        if "mlflow" in names:
            import mlflow

            own = "MLFLOW_TRACKING_URI" not in os.environ  # else the user's server or store
            uri = f"sqlite:///{(self.out / 'mlflow.db').resolve()}" if own else os.environ["MLFLOW_TRACKING_URI"]
            self._mlflow = mlflow.MlflowClient(tracking_uri=uri)
            run_id = ids.get("mlflow")
            if run_id is None:
                experiment = self._mlflow.get_experiment_by_name("mixerlab")
                artifacts = (self.out / "mlartifacts").resolve().as_uri() if own else None
                eid = (experiment.experiment_id if experiment else
                       self._mlflow.create_experiment("mixerlab", artifact_location=artifacts))
                run_id = self._mlflow.create_run(eid, run_name=self.out.name).info.run_id
                for key, value in params.items():
                    self._mlflow.log_param(run_id, key[:250], str(value)[:6000])
            self._mlflow_run = ids["mlflow"] = run_id
        if "wandb" in names:
            import wandb

            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "mixerlab"), name=self.out.name,
                                     dir=str(self.out), id=ids.get("wandb"), resume="allow", config=params,
                                     mode=os.environ.get("WANDB_MODE", "offline"), reinit="create_new")
            ids["wandb"] = self._wandb.id
        if ids:
            ids_path.write_text(json.dumps(ids) + "\n")

    def log(self, record: dict[str, Any]) -> None:
        values, step = scalars(record), int(record.get("step", 0))
        if not values:
            return
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
        if self._mlflow is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._mlflow.log_batch(self._mlflow_run, metrics=[Metric(k.replace("/", "."), v, now, step)
                                                              for k, v in values.items()])
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        final = scalars({**summary.get("final", {}), "event": "final"})
        status = summary.get("status", "unknown")
        if self._tb is not None:
            for key, value in final.items():
                self._tb.add_scalar(key, value, summary.get("steps", 0))
            self._tb.add_text("summary", "```\n" + json.dumps(summary, indent=1, default=str)[:60000] + "\n```")
        if self._mlflow is not None:
            for key, value in final.items():
                self._mlflow.log_metric(self._mlflow_run, key.replace("/", "."), value, step=summary.get("steps", 0))
            self._mlflow.log_dict(self._mlflow_run, summary, "summary.json")
            self._mlflow.set_terminated(self._mlflow_run, "FINISHED" if status == "completed" else "KILLED")
        if self._wandb is not None:
            self._wandb.summary.update({**final, "status": status})

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class MetricsLog:
    """Where each record goes: ``metrics.jsonl`` (rank 0's; None elsewhere) and the run's trackers."""

    def __init__(self, path: Path | None, trackers: Trackers | None):
        self.file = path.open("a") if path is not None else None
        self.trackers = trackers

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.trackers is not None:
            self.trackers.log(record)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records past ``step`` (written after the checkpoint we resume from)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))
