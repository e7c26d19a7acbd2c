"""Where a run's records go: ``metrics.jsonl`` (`MetricsLog`, the record every report reads) and the experiment
trackers ``train.log_to = ["tensorboard", "mlflow", "wandb"]`` names, which get its metrics, spec and summary.

- ``tensorboard``: event files in ``RUN/tensorboard`` (``tensorboard --logdir RUN``);
- ``mlflow``: a run in ``$MLFLOW_TRACKING_URI``, else in the run's own SQLite store ``RUN/mlflow.db`` with
  artifacts in ``RUN/mlartifacts`` (``mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db``; MLflow 3 has
  put its plain file store in maintenance mode); params are the flattened specs;
- ``wandb``: a run in ``RUN/wandb``, offline unless ``WANDB_MODE`` says otherwise (``wandb sync`` uploads it).

A resumed run continues the same tracker run (its id is kept in ``RUN/trackers.json``). Every tracker is an
optional extra; `check` refuses one that is not installed before anything runs, naming the extra. Over
several ranks only rank 0 logs.

In a study (`[base.train] log_to`), each trial logs its own run, as Optuna's MLflow and W&B integration
callbacks would make it — named ``trial-NNNN``, tagged with the study and trial number, its sampled parameters
logged — but with the whole learning curve, which those callbacks (one objective value per trial) cannot
carry: MLflow runs share the study's own store ``STUDY/mlflow.db`` under an experiment named after the study
(made once by the coordinator, `prepare_study`), W&B runs share the study's name as their group, TensorBoard
gets an HParams entry per trial (``tensorboard --logdir STUDY/trials`` compares them). The coordinator tells
its trial processes which study they belong to through ``MIXERLAB_STUDY``.
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

__all__ = ["STUDY_ENV", "TRACKERS", "MetricsLog", "Trackers", "check", "prepare_study", "truncate_metrics"]

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


#: the coordinator's description of the study a trial process belongs to (JSON: study, trial, params, dir)
STUDY_ENV = "MIXERLAB_STUDY"


def _study() -> dict[str, Any] | None:
    text = os.environ.get(STUDY_ENV)
    return json.loads(text) if text else None


def _mlflow_store(out: Path, study: dict[str, Any] | None) -> tuple[str, str | None, str]:
    """The MLflow tracking URI, the artifact location of a store of our own (None: the user's) and the
    experiment's name: a study's store and experiment, else the run's."""
    if "MLFLOW_TRACKING_URI" in os.environ:  # the user's server or store
        return os.environ["MLFLOW_TRACKING_URI"], None, study["study"] if study else "mixerlab"
    home = Path(study["dir"]) if study else out
    return (f"sqlite:///{(home / 'mlflow.db').resolve()}", (home / "mlartifacts").resolve().as_uri(),
            study["study"] if study else "mixerlab")


def _mlflow_experiment(client: Any, name: str, artifacts: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name, artifact_location=artifacts)


def prepare_study(names: list[str], study: dict[str, Any]) -> None:
    """Make a study's shared tracker store before its trials start (two trials creating one SQLite store at
    once would race); a no-op when it exists or no shared store is named."""
    if "mlflow" in names and importlib.util.find_spec("mlflow") is not None:
        import mlflow

        uri, artifacts, name = _mlflow_store(Path(study["dir"]), study)
        _mlflow_experiment(mlflow.MlflowClient(tracking_uri=uri), name, artifacts)


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
        self.study = study = _study()
        name = f"trial-{study['trial']:04d}" if study else self.out.name
        if study:
            params.update({f"optuna.{k}": v for k, v in study["params"].items()})
        self._tb = self._mlflow = self._wandb = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.out / "tensorboard"))
            self._tb.add_text("spec", "```\n" + json.dumps(specs, indent=1) + "\n```")
        if "mlflow" in names:
            import mlflow

            uri, artifacts, experiment = _mlflow_store(self.out, study)
            self._mlflow = mlflow.MlflowClient(tracking_uri=uri)
            run_id = ids.get("mlflow")
            if run_id is None:
                tags = ({"optuna.study_name": study["study"], "optuna.trial_number": str(study["trial"])}
                        if study else {})
                run_id = self._mlflow.create_run(_mlflow_experiment(self._mlflow, experiment, artifacts),
                                                 run_name=name, tags=tags).info.run_id
                from mlflow.entities import Param

                items = [Param(k[:250], str(v)[:6000]) for k, v in params.items()]
                for i in range(0, len(items), 100):  # log_batch takes at most 100 params at a time
                    self._mlflow.log_batch(run_id, params=items[i:i + 100])
            self._mlflow_run = ids["mlflow"] = run_id
        if "wandb" in names:
            import wandb

            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "mixerlab"), name=name,
                                     group=study["study"] if study else None, dir=str(self.out), id=ids.get("wandb"),
                                     resume="allow", config=params, mode=os.environ.get("WANDB_MODE", "offline"),
                                     reinit="create_new")
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
            if self.study:  # the study's HParams dashboard: this trial's sampled parameters and final metrics
                self._tb.add_hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                      for k, v in self.study["params"].items()}, final, run_name="hparams")
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
